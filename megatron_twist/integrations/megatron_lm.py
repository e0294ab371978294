"""TwIST inside Megatron-LM's GPT pretraining (its own ``pretrain()`` loop), Megatron-LM unmodified.

Touch points (examples/pretrain_gpt_twist.py is the whole script):

1. ``extra_args_provider``: TwIST's flags join Megatron-LM's parser (plus ``--twist-metrics-file``).
2. ``model_provider``: builds the user's model once at full size (the CENTRAL model, kept by
   TwIST, never handed to Megatron-LM's optimizer) and once with the subnet's sizes swapped
   into ``args`` (the model Megatron-LM trains on this rank).
3. ``install(megatron.training.training)``:
   * Megatron-LM's ``DistributedDataParallel`` reduces gradients over the SUBNET group (the
     replicas of this rank's subnet), not Megatron's whole data-parallel group: ranks training
     different subnets hold different units of the central model in the same shapes, so
     averaging their gradients would mix unrelated units. Everything else keeps Megatron's
     data-parallel group: the data sampler (each rank its own samples: subnet s at step t reads
     the samples ``twist train`` gives it) and the logged loss (the mean over subnets).
   * ``train_step`` is wrapped: before each iteration the round hook (integrations/round_hook.py)
     aggregates, resamples and refills at round boundaries (``args.curr_iteration``).
4. ``forward_step(fn)``: records each subnet's own loss per iteration (Megatron-LM logs the mean
   over data parallel) for ``--twist-metrics-file``.
5. ``save_checkpoint`` is wrapped: with ``--save``, each Megatron-LM checkpoint gets TwIST's state
   (the central model, its moments, step and round) in SAVE/twist, so ``--load`` resumes exactly
   (megatron_lm_state.py). ``finish()``: aggregates the last round; ``--twist-save DIR`` writes
   the central model (gathered over TP/PP) there. Both are megatron-twist's format, which
   ``twist extract`` reads.

``--bf16``: Megatron-LM's Float16Module trains bf16 parameters from fp32 masters
(``param.main_param``); TwIST refills and reads the masters (:class:`MainParams`) and copies
them into the bf16 parameters after a refill; the central model stays fp32.

Refused before any work, with the reason: see :meth:`TwistMegatronLM.validate`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..arguments import add_twist_args, validate_twist_args
from ..config import ConfigError, ModelConfig, TrainConfig
from ..twist.central import CentralModel
from ..twist.sampler import SubnetSampler
from .megatron_lm_env import use_megatron_lm

__all__ = ["add_twist_args", "TwistMegatronLM", "model_config_from_megatron_args", "use_megatron_lm"]


def model_config_from_megatron_args(args) -> ModelConfig:
    """The sizes TwIST slices by, read from Megatron-LM's parsed arguments."""
    gated = bool(getattr(args, "swiglu", False))
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    return ModelConfig(
        family="llama" if gated else "gpt2",
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=getattr(args, "padded_vocab_size", None) or args.vocab_size,
        seq_length=args.seq_length,
        kv_channels=getattr(args, "kv_channels", None),
    )


@contextlib.contextmanager
def overlay(args, **values):
    """Temporarily set attributes of ``args`` (used to build the subnet with its sizes)."""
    saved = {k: getattr(args, k, None) for k in values}
    for k, v in values.items():
        setattr(args, k, v)
    try:
        yield args
    finally:
        for k, v in saved.items():
            setattr(args, k, v)


@contextlib.contextmanager
def twist_seeded(seed: int):
    """Build the central model from TwIST's seeding (``twist train --seed``: the same default RNG
    and RNG-tracker states on every rank), so it starts from the weights ``twist train`` starts
    from at the same layout; Megatron-LM's own RNG streams are restored afterwards (its
    per-stage seeds would give other initial weights, and the subnet it trains is refilled from
    the central model before the first step anyway)."""
    from megatron.core.tensor_parallel import random as mrandom

    from ..cpu_shim import seed_everything

    tracker = mrandom.get_cuda_rng_tracker()
    cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    seed_everything(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        tracker.set_states(tracker_states)


def add_megatron_lm_args(parser):
    """TwIST's flags plus this adapter's own, for Megatron-LM's ``extra_args_provider``."""
    add_twist_args(parser)
    parser.add_argument(
        "--twist-save",
        default=None,
        help="directory for the central model at the end (also without --save); with --save it is "
        "saved with every checkpoint in SAVE/twist as well",
    )
    parser.add_argument(
        "--twist-metrics-file",
        default=None,
        help="JSON file (rank 0) with each subnet's loss per iteration and the central step/round",
    )
    return parser


# Megatron-LM flags TwIST cannot honour on its path, with the reason and the fix.
_REFUSED = {
    "use_distributed_optimizer": "--use-distributed-optimizer shards Adam's state over data parallel, but "
    "TwIST refills and aggregates each subnet parameter's whole Adam state every round; drop the flag",
    "use_torch_fsdp2": "--use-torch-fsdp2 shards parameters over data parallel; TwIST needs each rank's "
    "whole subnet shard: drop the flag",
    "use_megatron_fsdp": "--use-megatron-fsdp shards parameters over data parallel; TwIST needs each rank's "
    "whole subnet shard: drop the flag",
    "fp16": "--fp16 scales the loss and may skip optimizer steps, which would put subnets' step counts out "
    "of step with the round; use fp32 (no flag)",
}


class TwistMegatronLM:
    def __init__(self, model_provider: Callable, get_args: Optional[Callable] = None):
        self.base_provider = model_provider
        self._get_args = get_args
        self.central: Optional[CentralModel] = None
        self.hook = None
        self.twist = None
        self.groups = None
        self.model_config: Optional[ModelConfig] = None
        self.losses = {}  # iteration -> (loss sum, tokens) of this rank's micro-batches
        self._step_loss = None  # accumulates while Megatron-LM's train_step runs
        self.last_iteration = 0  # iterations Megatron-LM completed (an --exit-interval may stop early)

    extra_args_provider = staticmethod(add_megatron_lm_args)

    def args(self):
        if self._get_args is None:
            from megatron.training import get_args  # Megatron-LM, not megatron-core

            self._get_args = get_args
        return self._get_args()

    def validate(self, args) -> None:
        """Every refusal, before any model is built (the first model_provider call)."""
        self.twist = validate_twist_args(args)
        self.model_config = model_config_from_megatron_args(args)
        if self.twist.whole_layers:
            raise ConfigError(
                "--whole-layers needs per-layer sizes, which Megatron-LM's arguments cannot express; "
                "use `twist train` for it"
            )
        for dest, reason in _REFUSED.items():
            if getattr(args, dest, False):
                raise ConfigError(reason)
        if getattr(args, "virtual_pipeline_model_parallel_size", None):
            raise ConfigError("virtual pipeline stages are not supported with TwIST: drop --num-layers-per-virtual-*")
        if getattr(args, "context_parallel_size", 1) > 1:
            raise ConfigError("context parallelism is not supported with TwIST: drop --context-parallel-size")
        if getattr(args, "num_experts", None):
            raise ConfigError("mixture-of-experts models are not supported with TwIST: drop --num-experts")
        dp = getattr(args, "data_parallel_size", None)
        if dp is not None and (dp < self.twist.num_subnets or dp % self.twist.num_subnets):
            raise ConfigError(
                f"{dp} data-parallel ranks cannot each train one of --num-subnets {self.twist.num_subnets} "
                "(Megatron-LM trains one model per rank): launch num_subnets x replicas data-parallel ranks "
                "(world size / (tensor x pipeline parallel size))"
            )
        from .megatron_lm_cpu import check_cpu_args
        from .megatron_lm_state import check_save_args

        check_cpu_args(args)
        check_save_args(args, self.twist.local_steps)
        self.twist.check_against_model(self.model_config, getattr(args, "tensor_model_parallel_size", 1))

    def model_provider(self, pre_process: bool = True, post_process: bool = True, *extra, **kwargs):
        args = self.args()
        if self.groups is None:
            self.validate(args)
            from ..distributed.runtime import build_twist_groups

            # collective; before Megatron-LM wraps the model in DDP, which needs the subnet group
            self.groups = build_twist_groups(
                self.twist, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            )
        # the central model, its moments and aggregation stay fp32 under --bf16 (as in `twist train`)
        with twist_seeded(args.seed), overlay(args, bf16=False, params_dtype=torch.float32):
            central_module = self.base_provider(pre_process, post_process, *extra, **kwargs)
        if torch.cuda.is_available():
            central_module = central_module.cuda(torch.cuda.current_device())
        self.central = CentralModel(self.model_config, central_module)
        size = SubnetSampler(self.model_config, self.twist, args.tensor_model_parallel_size).subnet_layer_sizes()[0]
        with overlay(
            args,
            num_attention_heads=size.num_attention_heads,
            num_query_groups=size.num_query_groups,
            ffn_hidden_size=size.ffn_hidden_size,
            kv_channels=self.model_config.head_dim,
        ):
            return self.base_provider(pre_process, post_process, *extra, **kwargs)

    def subnet_process_groups(self):
        """Megatron's process groups with data parallel narrowed to this rank's subnet replicas."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        pgs = ProcessGroupCollection.use_mpu_process_groups()
        group = self.groups.subnet_group
        pgs.dp = pgs.dp_cp = pgs.intra_dp_cp = pgs.expt_dp = pgs.intra_expt_dp = group
        return pgs

    def make_hook(self, model, optimizer):
        from megatron.core.utils import unwrap_model

        from .megatron_lm_optim import MainParams, MastersToModel, torch_optimizer_of
        from .round_hook import TwistRoundHook

        module = unwrap_model(model[0] if isinstance(model, (list, tuple)) else model)
        torch_optimizer = torch_optimizer_of(optimizer)
        if getattr(self.args(), "bf16", False):
            # Megatron-LM's Float16Module: bf16 parameters, each with its fp32 `main_param` that the
            # optimizer steps; TwIST refills and reads the fp32 masters, then the bf16 copies follow.
            hook = TwistRoundHook(
                self.model_config, self.twist, self.groups, self.central, MainParams(module), torch_optimizer,
                compute_module=module,
            )  # fmt: skip
            hook.worker = MastersToModel(hook.worker, module)
        else:
            hook = TwistRoundHook(self.model_config, self.twist, self.groups, self.central, module, torch_optimizer)
        args = self.args()
        if args.load and args.iteration > 0:  # Megatron-LM resumed: TwIST's state for that iteration
            from .megatron_lm_state import resume_central

            g = self.groups
            resume_central(args.load, args.iteration, self.central, self.twist, g.tp_rank, g.tp_size, hook.first_layer)
        return hook

    def scale_subnet_lr(self, optimizer, scheduler) -> None:
        """--twist-lr-scale on the optimizer Megatron-LM built: every param group's peak and floor lr,
        then the scheduler re-sets the current lr from them (it set it before TwIST saw the optimizer)."""
        from ..optim.optimizer import set_group_lr_bounds
        from .megatron_lm_optim import torch_optimizer_of

        args, scale = self.args(), self.twist.lr_scale
        set_group_lr_bounds(torch_optimizer_of(optimizer).param_groups, args.lr * scale, args.min_lr * scale)
        scheduler.step(0)

    def install(self, training_module) -> None:
        """Wrap Megatron-LM's ``train_step`` and narrow its DDP to the subnet group."""
        original = training_module.train_step
        twist_lm = self

        class SubnetDDP(training_module.DDP):
            """Megatron's DDP reducing gradients among the replicas of this rank's subnet only."""

            def __init__(self, *args, **kwargs):
                if kwargs.get("pg_collection") is None:
                    kwargs["pg_collection"] = twist_lm.subnet_process_groups()
                super().__init__(*args, **kwargs)

        training_module.DDP = SubnetDDP
        original_save = training_module.save_checkpoint

        @functools.wraps(original_save)
        def save_checkpoint(iteration, *args, **kwargs):
            self.before_megatron_save(iteration)
            return original_save(iteration, *args, **kwargs)

        training_module.save_checkpoint = save_checkpoint

        @functools.wraps(original)
        def train_step(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs):
            if self.hook is None:
                self.hook = self.make_hook(model, optimizer)
                self.scale_subnet_lr(optimizer, rest[0] if rest else kwargs["opt_param_scheduler"])
            iteration = self.args().curr_iteration
            self.hook.on_iteration_start(iteration)
            self._step_loss = [0.0, 0]
            try:
                out = original(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs)
                self.last_iteration = iteration + 1
                return out
            finally:
                if self._step_loss[1]:
                    self.losses[iteration] = tuple(self._step_loss)
                self._step_loss = None

        training_module.train_step = train_step

    def forward_step(self, forward_step_func: Callable) -> Callable:
        """Megatron-LM's forward step, its loss function recording this rank's (loss sum, tokens)."""

        @functools.wraps(forward_step_func)
        def forward_step(*args, **kwargs):
            output, loss_func = forward_step_func(*args, **kwargs)

            def recording_loss_func(*la, **lk):
                out = loss_func(*la, **lk)
                if self._step_loss is not None:  # training micro-batches only, not evaluation
                    self._step_loss[0] += float(out[0].detach())
                    self._step_loss[1] += int(out[1])
                return out

            return output, recording_loss_func

        return forward_step

    def before_megatron_save(self, iteration: int) -> None:
        """Collective, before Megatron-LM writes ``iter_XXXXXXX``: close the round ending here and
        write the central model to SAVE/twist (megatron_lm_state.py: why in this order)."""
        if self.hook is None:
            return
        from .megatron_lm_state import save_central_series, twist_save_dir

        self.hook.clock.finish(iteration)  # the next train_step opens the next round
        args = self.args()
        save_central_series(
            twist_save_dir(args.save),
            iteration,
            self.central,
            self.twist,
            self.train_config(),
            self.full_state,
            self.groups.is_logging_rank,
        )

    def finish(self) -> None:
        """After ``pretrain()``: fold the last round in, save the central model, write the metrics."""
        args = self.args()
        if self.hook is None:
            return
        self.hook.finish(self.last_iteration)
        if args.twist_save:
            from .megatron_lm_state import save_central_once

            save_central_once(
                args.twist_save,
                self.central,
                self.twist,
                self.train_config(),
                self.full_state,
                self.groups.is_logging_rank,
            )
        if args.twist_metrics_file:
            self.write_metrics(args.twist_metrics_file)
        dist.barrier()

    def full_state(self):
        """(weights, moments) of the whole central model, gathered over TP/PP (a collective)."""
        from megatron.core import parallel_state

        from ..distributed.full_state import gather_full_state

        g, central = self.groups, self.central
        if g.tp_size == 1 and g.pp_size == 1:
            return dict(central.params), central.moments
        tp_group = parallel_state.get_tensor_model_parallel_group() if g.tp_size > 1 else None
        pp_group = parallel_state.get_pipeline_model_parallel_group() if g.pp_size > 1 else None

        def gather(tensors):
            return gather_full_state(
                tensors, self.model_config, g.tp_rank, g.tp_size, self.hook.first_layer, tp_group, pp_group
            )

        return gather(central.params), {m: gather(t) for m, t in central.moments.items()}

    def train_config(self) -> TrainConfig:
        args = self.args()
        return TrainConfig(
            train_iters=args.train_iters,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_iters=args.lr_warmup_iters,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            seed=args.seed,
        )

    def subnet_losses(self) -> dict:
        """Collective: {subnet: [loss per iteration]} (each subnet's mean over its replicas' tokens)."""
        g = self.groups
        iterations = sorted(self.losses)  # the same on every replica of a subnet (same stage)
        rows = torch.tensor(
            [self.losses.get(i, (0.0, 0)) for i in iterations], dtype=torch.float64, device="cpu"
        ).reshape(-1, 2)  # host-side bookkeeping (gloo or NCCL: sent as an object below)
        if g.subnet_group is not None and g.layout.replicas > 1:
            rows = rows.to(_collective_device())
            dist.all_reduce(rows, group=g.subnet_group)
            rows = rows.cpu()
        mine = None
        if self.losses and g.tp_rank == 0 and g.replica_index == 0:
            mine = (self.hook.subnet, [float(a / b) for a, b in rows.tolist()], iterations)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        out = {}
        for item in gathered:
            if item is not None:
                subnet, losses, its = item
                out[subnet] = dict(zip(its, losses))
        return out

    def write_metrics(self, path: str) -> None:
        losses = self.subnet_losses()
        if not self.groups.is_logging_rank:
            return
        subnets = sorted(losses)
        iterations = sorted(set().union(*(losses[s] for s in subnets))) if subnets else []
        record = {
            "central_step": self.central.step,
            "central_round": self.central.round,
            "iterations": iterations,
            "subnet_losses": {str(s): [losses[s][i] for i in iterations] for s in subnets},
            "loss_curve": [sum(losses[s][i] for s in subnets) / len(subnets) for i in iterations],
        }
        from .megatron_lm_state import ensure_dir

        ensure_dir(path)
        with open(path, "w") as f:
            json.dump(record, f)


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
