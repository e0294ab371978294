"""TwIST inside Megatron-LM's GPT pretraining, without modifying Megatron-LM.

Three touch points (see examples/pretrain_gpt_twist.py for the full script):

1. ``extra_args_provider=add_twist_args``: TwIST's flags join Megatron-LM's parser.
2. ``TwistMegatronLM(model_provider).model_provider``: a wrapped model provider.
   It builds the user's model once at full size (the CENTRAL model, kept by
   TwIST, never handed to Megatron-LM's optimizer) and once with the subnet's
   sizes swapped into ``args`` (the model Megatron-LM trains on this rank).
3. ``TwistMegatronLM.install(megatron.training.training)``: wraps
   Megatron-LM's ``train_step`` so that, before each iteration, the round hook
   (integrations/round_hook.py) aggregates, resamples and refills at round
   boundaries. Megatron-LM sets ``args.curr_iteration`` before every
   ``train_step``; that is the only thing the hook reads from the loop.

Supported: every rank trains one subnet (data-parallel size = subnets x
replicas), fp32 parameters with Megatron's non-distributed optimizer, whose
``.optimizer`` is the torch Adam holding per-parameter state. Refused with a
clear error: ``--use-distributed-optimizer``, fp16/bf16 main-parameter
copies, ``--whole-layers`` (Megatron-LM's args hold one size for all layers).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch

from ..arguments import add_twist_args, validate_twist_args
from ..config import ConfigError, ModelConfig
from ..twist.central import CentralModel
from ..twist.sampler import SubnetSampler

__all__ = ["add_twist_args", "TwistMegatronLM", "model_config_from_megatron_args"]


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


class TwistMegatronLM:
    def __init__(self, model_provider: Callable, get_args: Optional[Callable] = None):
        self.base_provider = model_provider
        self._get_args = get_args
        self.central: Optional[CentralModel] = None
        self.hook = None
        self.twist = None
        self.model_config: Optional[ModelConfig] = None

    extra_args_provider = staticmethod(add_twist_args)

    def args(self):
        if self._get_args is None:
            from megatron.training import get_args  # Megatron-LM, not megatron-core

            self._get_args = get_args
        return self._get_args()

    def validate(self, args) -> None:
        self.twist = validate_twist_args(args)
        self.model_config = model_config_from_megatron_args(args)
        if self.twist.whole_layers:
            raise ConfigError(
                "--whole-layers needs per-layer sizes, which Megatron-LM's arguments cannot express; "
                "use `twist train` for it"
            )
        if getattr(args, "use_distributed_optimizer", False):
            raise ConfigError("TwIST refills Adam state per parameter; run without --use-distributed-optimizer")
        if getattr(args, "fp16", False) or getattr(args, "bf16", False):
            raise ConfigError("TwIST under Megatron-LM supports fp32 parameters in this release; drop --fp16/--bf16")
        self.twist.check_against_model(self.model_config, getattr(args, "tensor_model_parallel_size", 1))

    def model_provider(self, pre_process: bool = True, post_process: bool = True, *extra, **kwargs):
        args = self.args()
        self.validate(args)
        central_module = self.base_provider(pre_process, post_process, *extra, **kwargs)
        if torch.cuda.is_available():
            central_module = central_module.cuda(torch.cuda.current_device())
        self.central = CentralModel(self.model_config, central_module)
        tp = getattr(args, "tensor_model_parallel_size", 1)
        size = SubnetSampler(self.model_config, self.twist, tp).subnet_layer_sizes()[0]
        with overlay(
            args,
            num_attention_heads=size.num_attention_heads,
            num_query_groups=size.num_query_groups,
            ffn_hidden_size=size.ffn_hidden_size,
            kv_channels=self.model_config.head_dim,
        ):
            return self.base_provider(pre_process, post_process, *extra, **kwargs)

    def make_hook(self, model, optimizer):
        from ..distributed.runtime import build_twist_groups
        from .round_hook import TwistRoundHook

        args = self.args()
        groups = build_twist_groups(
            self.twist, getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1)
        )
        module = model[0] if isinstance(model, (list, tuple)) else model
        module = getattr(module, "module", module)  # unwrap Megatron's DDP
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # Megatron's FP32Optimizer wraps torch Adam
        return TwistRoundHook(self.model_config, self.twist, groups, self.central, module, torch_optimizer)

    def install(self, training_module) -> None:
        """Wrap ``training_module.train_step`` (Megatron-LM's megatron.training.training)."""
        original = training_module.train_step

        @functools.wraps(original)
        def train_step(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs):
            if self.hook is None:
                self.hook = self.make_hook(model, optimizer)
            self.hook.on_iteration_start(self.args().curr_iteration)
            return original(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs)

        training_module.train_step = train_step
