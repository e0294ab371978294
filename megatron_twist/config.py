"""Configuration objects, one per concern.

* :class:`ModelConfig`  - the architecture of the central (full) model.
* :class:`TwistConfig`  - the TwIST method: keep ratio, subnets, rounds, units.
* :class:`TrainConfig`  - optimisation, data and logging of a training run.

Each validates itself on construction so a bad value is refused before any
process group is created or any weight is allocated. Errors name the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import ConfigError, TrainingError  # noqa: F401  (re-exported: the config API raises them)

MODEL_FAMILIES = ("llama", "gpt2")
ACTIVATIONS = {"llama": ("silu",), "gpt2": ("gelu", "gelu_tanh")}  # first: the family's default
SPLIT_UNITS = ("heads", "mlp", "both")
CORRECTIONS = ("rescale", "none")
OPTIMIZER_STATE_POLICIES = ("aggregate", "reset")
# --twist-cut-share's default with cut-aware sampling (issue #15 item 5, docs/RESULTS.md "Importance-aware
# sampling"): at 0.75 the kappa-0.5 cut was better in both regimes (three seeds, ranges apart: -6.0%
# continuing a pretrained model, -9.7% from scratch), the central model better from scratch (-8.1%) and
# worse when continuing (+6.8%); at 1 the cut gained more but the central model and the other cut sizes
# lost when continuing (+38.6% central).
DEFAULT_CUT_SHARE = 0.75
# --twist-lr-scale's rule when not given: the subnets' lr (and min lr) is --lr x sqrt(num_subnets). Each
# subnet's Adam normalises its own gradient, and aggregation then averages the subnets' updates of a unit,
# so the central model moves by less than one dense optimizer at the same --lr would (docs/RESULTS.md
# "The learning rate of TwIST's subnets").
LR_SCALE_RULES = {"sqrt": math.sqrt}  # rule name -> the scale as a function of num_subnets
DEFAULT_LR_SCALE = "sqrt"
NONFINITE_POLICIES = ("skip", "stop")  # a subnet whose loss/gradient turns non-finite (docs: Reliability)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the central model. Subnets derive their (smaller) sizes from it.

    ``family='llama'``: RMSNorm, SwiGLU MLP, rotary positions, grouped-query
    attention, untied output layer, no biases.
    ``family='gpt2'``: LayerNorm, GELU MLP, learned absolute positions,
    multi-head attention with biases, tied embeddings.
    """

    family: str = "llama"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = None  # None: multi-head attention (one group per head)
    ffn_hidden_size: int = 704
    vocab_size: int = 4096
    seq_length: int = 256
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    rotary_base: int = 10000
    kv_channels: Optional[int] = None  # head size; None: hidden_size // num_attention_heads
    # MLP activation; None: the family's (llama: 'silu' gated, gpt2: 'gelu'). gpt2 also takes
    # 'gelu_tanh' (HF GPT-2's 'gelu_new'), so an imported GPT-2 computes what it was trained with.
    activation: Optional[str] = None

    def __post_init__(self):
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"model family {self.family!r} is unknown; use one of {MODEL_FAMILIES}")
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; choose a head count that divides it"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}; grouped-query attention needs whole groups"
            )
        if self.family == "gpt2" and self.num_query_groups != self.num_attention_heads:
            raise ConfigError("the gpt2 family uses multi-head attention: leave num_query_groups unset")
        allowed = ACTIVATIONS[self.family]
        if self.activation is None:
            object.__setattr__(self, "activation", allowed[0])
        elif self.activation not in allowed:
            raise ConfigError(
                f"activation {self.activation!r} is not available for the {self.family} family; use one of {allowed}"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; is this a megatron-twist checkpoint?")
        return cls(**d)


# Named sizes: 'tiny' is what the tests run; 'small' is the README's main job.
MODEL_PRESETS = {
    "tiny": dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        vocab_size=512,
        seq_length=64,
    ),
    "tiny-gpt2": dict(
        family="gpt2",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=256,
        vocab_size=512,
        seq_length=64,
    ),
    "small": dict(
        family="llama",
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=704,
        vocab_size=4096,
        seq_length=256,
    ),
    "small-gpt2": dict(
        family="gpt2",
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        ffn_hidden_size=1024,
        vocab_size=4096,
        seq_length=256,
    ),
}


@dataclass(frozen=True)
class TwistConfig:
    """The TwIST method.

    keep_ratio:        kappa, the fraction of heads and MLP neurons each subnet keeps.
    num_subnets:       subnets trained independently between aggregations.
    local_steps:       optimizer steps each subnet takes between aggregations (a round).
    seed:              with the round number, fixes every subnet's units on every rank.
    split:             which units are split: 'heads', 'mlp' or 'both'.
    whole_layers:      layer indices (negative counts from the end) kept whole and shared.
    coverage:          deal units so that every unit is in some subnet each round
                       (needs num_subnets * keep_ratio >= 1).
    correction:        activation-shift correction, see docs/ARCHITECTURE.md:
                       'rescale' scales the summed head/neuron outputs of a subnet by
                       1/kappa while training and at extraction; 'none' (default, the
                       better one measured in docs/RESULTS.md) applies no scale.
    optimizer_state:   'aggregate' slices Adam moments with the weights and averages them
                       back like the weights; 'reset' starts every round from zero moments.
    balance_shards:    units are drawn with an equal quota from each of this many equal
                       blocks of heads and of neurons, so that any tensor-parallel size
                       dividing it keeps shards balanced. 0: the run's tensor-parallel size.
                       Part of the run's identity: the same value gives the same subnets
                       at every layout (TP=1 reproduces a TP=2 run, checkpoints reshard).
    pin_cut:           subnet 0 holds, every round, the units a magnitude cut at keep_ratio
                       of the current central model would keep (the zero-cost extraction's
                       choice); the other subnets are dealt the rest. The final cut is then
                       trained as one model all along (issue #15's cut-aware sampling).
                       Every layout: TP/PP shards and ZeRO partitions sum their parts of
                       the scores (twist/pin.py).
    cut_from_step:     with pin_cut, from this global step (a round boundary) on EVERY subnet
                       holds the pinned cut: the final rounds train the cut-out model densely
                       on all subnets' tokens, the other units stay as they are (issue #15's
                       cut-aware final rounds). None: never.
    cut_share:         F in [0, 1], with pin_cut: in every bucket each subnet other than subnet 0
                       takes n_cut = round(F x quota) of its quota from the pinned cut (drawn at
                       random) and the rest from the unpinned units, which are dealt round-robin
                       in a random order over subnets 1..N-1 as with F = 0; a subnet keeps as many
                       of its dealt units as it has slots, so some unpinned units may sit out a
                       round: the cut's units train on more subnets' tokens (issue #15's
                       importance-aware sampling). Edge cases, chosen here:
                       * round is Python's (half to even: F 0.5 of a quota of 1 takes 0 cut units);
                       * F = 0 is pin_cut's draw from before cut_share bit for bit (its fill-ups
                         may pick cut units too);
                         with F > 0 a subnet holds exactly n_cut cut units, more only when the
                         unpinned units are fewer than its other slots (keep_ratio > 0.5): the
                         extra slots then take pinned units it does not hold yet;
                       * a subnet dealt fewer unpinned units than its slots fills up with unpinned
                         units it does not hold yet, at random (then pinned ones, as above);
                       * coverage=False: every subnet draws its n_cut cut units and its unpinned
                         units independently of the others;
                       * num_subnets = 1: subnet 0 is the cut, F has nothing to change;
                       * F = 1: every subnet holds the cut, like cut_from_step from step 0;
                         cut_from_step, when set, still takes over from its step.
                       None (default): DEFAULT_CUT_SHARE (0.75) with pin_cut, 0 without it.
                       0.0: off (the draw of pin_cut alone). A checkpoint written before it
                       existed resumes at 0.0, as it was trained.
    lr_scale:          the subnets' optimizers run at TrainConfig's lr and min_lr times this
                       (warm-up and decay unchanged); dense training is unaffected. 'sqrt':
                       sqrt(num_subnets). None (default): DEFAULT_LR_SCALE ('sqrt'). Stored
                       resolved (a float). A checkpoint written before it existed resumes
                       at 1.0, as it was trained.
    """

    keep_ratio: float = 0.5
    num_subnets: int = 2
    local_steps: int = 15
    seed: int = 1234
    split: str = "both"
    whole_layers: Tuple[int, ...] = ()
    coverage: bool = True
    correction: str = "none"
    optimizer_state: str = "aggregate"
    balance_shards: int = 0
    pin_cut: bool = True
    cut_from_step: Optional[int] = None
    cut_share: Optional[float] = None
    lr_scale: object = None  # a positive float, a rule of LR_SCALE_RULES, None: DEFAULT_LR_SCALE

    def __post_init__(self):
        object.__setattr__(self, "whole_layers", tuple(int(i) for i in self.whole_layers))
        if not (0.0 < self.keep_ratio <= 1.0):
            raise ConfigError(f"--keep-ratio must lie in (0, 1], got {self.keep_ratio}")
        if self.num_subnets < 1:
            raise ConfigError(f"--num-subnets must be at least 1, got {self.num_subnets}")
        if self.local_steps < 1:
            raise ConfigError(f"--local-steps must be at least 1 (steps per round), got {self.local_steps}")
        if self.split not in SPLIT_UNITS:
            raise ConfigError(f"--twist-split must be one of {SPLIT_UNITS}, got {self.split!r}")
        if self.correction not in CORRECTIONS:
            raise ConfigError(f"--activation-correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ConfigError(
                f"--optimizer-state must be one of {OPTIMIZER_STATE_POLICIES}, got {self.optimizer_state!r}"
            )
        if self.cut_from_step is not None:
            if not self.pin_cut:
                raise ConfigError("--twist-cut-from-step trains the pinned cut: it needs --twist-pin-cut (the default)")
            if self.cut_from_step < 0 or self.cut_from_step % self.local_steps:
                raise ConfigError(
                    f"--twist-cut-from-step {self.cut_from_step} must be a round boundary: a non-negative multiple "
                    f"of --local-steps {self.local_steps}"
                )
        if self.cut_share is None:  # the default: the measured share with cut-aware sampling, none without it
            object.__setattr__(self, "cut_share", DEFAULT_CUT_SHARE if self.pin_cut else 0.0)
        if not 0.0 <= self.cut_share <= 1.0:
            raise ConfigError(f"--twist-cut-share must lie in [0, 1] (a fraction of each quota), got {self.cut_share}")
        if self.cut_share and not self.pin_cut:
            raise ConfigError("--twist-cut-share shares the pinned cut: it needs --twist-pin-cut (the default)")
        object.__setattr__(self, "lr_scale", resolve_lr_scale(self.lr_scale, self.num_subnets))
        if self.coverage and self.num_subnets * self.keep_ratio < 1.0 - 1e-9:
            raise ConfigError(
                f"coverage needs num_subnets x keep_ratio >= 1, got {self.num_subnets} x {self.keep_ratio} = "
                f"{self.num_subnets * self.keep_ratio:g}; raise --num-subnets to at least "
                f"{int(-(-1 // self.keep_ratio))} or pass --no-coverage"
            )

    def cut_only(self, round_index: int) -> bool:
        """Whether every subnet of this round holds the pinned cut (``cut_from_step``)."""
        return self.cut_from_step is not None and round_index * self.local_steps >= self.cut_from_step

    @property
    def splits_heads(self) -> bool:
        return self.split in ("heads", "both")

    @property
    def splits_mlp(self) -> bool:
        return self.split in ("mlp", "both")

    def whole_layer_set(self, num_layers: int) -> frozenset:
        out = set()
        for i in self.whole_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(f"--whole-layers index {i} is outside a {num_layers}-layer model")
            out.add(j)
        return frozenset(out)

    def shards_for(self, tensor_parallel_size: int) -> int:
        """Number of balance blocks for a run at this tensor-parallel size."""
        shards = self.balance_shards or tensor_parallel_size
        if shards % tensor_parallel_size:
            raise ConfigError(
                f"--twist-balance-shards {shards} is not a multiple of tensor parallel size {tensor_parallel_size}; "
                "shards could not keep equal numbers of units"
            )
        return shards

    def check_against_model(self, model: ModelConfig, tensor_parallel_size: int = 1) -> None:
        """Refuse a keep ratio that does not give whole units on every shard/group."""
        tp = tensor_parallel_size
        blocks = self.shards_for(tp)
        if model.num_query_groups % tp:
            raise ConfigError(
                f"num_query_groups {model.num_query_groups} does not divide over tensor parallel size {tp}; "
                f"use a tensor parallel size that divides it"
            )
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"num_attention_heads {model.num_attention_heads} does not divide over tensor parallel size {tp}"
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(f"ffn_hidden_size {model.ffn_hidden_size} does not divide over tensor parallel size {tp}")
        if self.splits_heads:
            if model.num_attention_heads % blocks or model.ffn_hidden_size % blocks:
                raise ConfigError(
                    f"heads {model.num_attention_heads} and FFN {model.ffn_hidden_size} must divide "
                    f"into {blocks} balance shards"
                )
            bucket, what = _head_bucket(model, blocks)
            kept = bucket * self.keep_ratio
            if abs(kept - round(kept)) > 1e-9 or round(kept) < 1:
                raise ConfigError(
                    f"keep_ratio {self.keep_ratio} x {bucket} heads per {what} = {kept:g} is not a whole, "
                    f"positive number of heads; choose a keep ratio that is a multiple of 1/{bucket}"
                )
        if self.splits_mlp:
            per_shard = model.ffn_hidden_size // blocks
            kept = per_shard * self.keep_ratio
            if abs(kept - round(kept)) > 1e-9 or round(kept) < 1:
                raise ConfigError(
                    f"keep_ratio {self.keep_ratio} x {per_shard} MLP neurons per tensor-parallel shard = {kept:g} "
                    f"is not whole; choose an ffn_hidden_size or keep ratio that gives whole neurons"
                )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["whole_layers"] = list(self.whole_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TwistConfig":
        # A checkpoint written before pin_cut (or cut_share) existed trained without it: resume it the same way.
        return cls(**{"pin_cut": False, "cut_share": 0.0, "lr_scale": 1.0, **d})


def resolve_lr_scale(value, num_subnets: int) -> float:
    """--twist-lr-scale's number: ``value`` itself, or its rule applied to ``num_subnets``."""
    if value is None:  # not given (a flag or ds_config key left out): the default rule
        value = DEFAULT_LR_SCALE
    if isinstance(value, str) and value in LR_SCALE_RULES:
        return LR_SCALE_RULES[value](num_subnets)
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        rules = tuple(LR_SCALE_RULES)
        raise ConfigError(f"--twist-lr-scale must be a positive number or one of {rules}, got {value!r}")
    return scale


def _head_bucket(model: ModelConfig, tp: int) -> Tuple[int, str]:
    """The group inside which query heads are sampled with a fixed quota.

    With grouped-query attention every KV group is kept and query heads are
    sampled inside each group (equal quota per group keeps TP shards balanced
    and the result a valid GQA config). With multi-head attention a head owns
    its K/V, so heads are sampled with a fixed quota per tensor-parallel shard.
    """
    if model.heads_per_group > 1:
        return model.heads_per_group, "key-value group"
    return model.num_attention_heads // tp, "tensor-parallel shard"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and bookkeeping of one training run."""

    data_prefix: Optional[str] = None  # output prefix of `twist prepare-data`
    train_iters: int = 300  # optimizer steps of every subnet (global steps)
    micro_batch_size: int = 8
    # Megatron's --global-batch-size: samples per optimizer step of ONE subnet, over its replicas
    # (micro_batch_size x replicas x micro-batches); None: one micro-batch per step.
    global_batch_size: Optional[int] = None
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 20
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    log_interval: int = 10
    save: Optional[str] = None
    eval_iters: int = 20
    seed: int = 1234
    exit_interval: Optional[int] = None  # stop (and save) after the round that reaches this step
    nonfinite_policy: str = "skip"  # 'skip': leave a non-finite subnet out of its round; 'stop': stop the run
    # Megatron's --bf16: subnets compute in bf16 (weights, activations, gradients) from fp32 master
    # weights that the optimizer steps; the central model, its moments and aggregation stay fp32.
    bf16: bool = False
    # Knowledge distillation (optim/distill.py): a dense checkpoint to distil from, or 'central' (TwIST's
    # central model as it stood at the round's start); the loss is (1 - w) CE + w T^2 KL(teacher || student).
    distill_teacher: Optional[str] = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

    def __post_init__(self):
        if self.train_iters < 1:
            raise ConfigError(f"--train-iters must be at least 1, got {self.train_iters}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be at least 1, got {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"--global-batch-size must be at least 1, got {self.global_batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ConfigError(f"--distill-weight must be in (0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ConfigError(f"--nonfinite-policy must be one of {NONFINITE_POLICIES}, got {self.nonfinite_policy!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def microbatches(self, replicas: int) -> int:
        """Micro-batches per optimizer step for a subnet trained by ``replicas`` data-parallel ranks."""
        per_pass = self.micro_batch_size * replicas
        if self.global_batch_size is None:
            return 1
        if self.global_batch_size % per_pass:
            lower = max(per_pass, self.global_batch_size // per_pass * per_pass)
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x {replicas} replica(s) of each subnet = {per_pass}; use e.g. "
                f"--global-batch-size {lower} or {lower + per_pass}"
            )
        return self.global_batch_size // per_pass


CKPT_FORMATS = ("safetensors", "torch_dist")

# Why pipeline parallelism stays off the DeepSpeed path (also the planner's refusal): a DeepSpeed engine
# runs its model's whole forward and backward in one call, so a Megatron-core pipeline stage inside it
# cannot exchange activations with the next stage mid-step (Megatron's 1F1B schedule drives the stages
# from outside); DeepSpeed's own pipeline engine needs its PipelineModule (a list of layers it cuts
# itself, ZeRO 0/1 only) instead of a GPTModel stage whose layers TwIST sizes per subnet.
DEEPSPEED_NO_PP = (
    "--pipeline-model-parallel-size > 1 is not supported with --deepspeed: a DeepSpeed engine runs the whole "
    "forward and backward of its model in one call, so it cannot drive Megatron-core's pipeline schedule, and "
    "DeepSpeed's own pipeline engine needs its PipelineModule (ZeRO 0/1 only), not a Megatron GPTModel stage. "
    "Use --tensor-model-parallel-size under --deepspeed, or `twist train` without --deepspeed for pipeline "
    "parallel layouts (Megatron-core's 1F1B path)"
)


@dataclass(frozen=True)
class RunConfig:
    """Run-level settings of `twist train`: layout, checkpoints, monitoring, engine. Not recorded in
    checkpoints (a resumed run may change them); validated here, before any work."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    save: Optional[str] = None  # a checkpoint, or (series) a save directory of iter_XXXXXXX + pointer
    load: Optional[str] = None  # resolved: the checkpoint to continue from (None: start at step 0)
    series: bool = False  # --save is a save directory (--save-interval, or it already has a pointer)
    save_interval: Optional[int] = None
    keep_checkpoints: int = 0  # with a series: keep the newest K (0: all)
    ckpt_format: str = "safetensors"
    metrics_file: Optional[str] = None
    overwrite: bool = False  # --save / --metrics-file may replace what megatron-twist did not write
    distributed_timeout_minutes: float = 10.0
    deepspeed_config: Optional[str] = None  # the ds_config file: the DeepSpeed engine path
    # the central model sharded over data parallel (distributed/sharded_round.py), not replicated
    shard_central: bool = False

    def __post_init__(self):
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError(f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"--keep-checkpoints must be 0 (keep all) or more, got {self.keep_checkpoints}")
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConfigError(f"--ckpt-format must be one of {CKPT_FORMATS}, got {self.ckpt_format!r}")
        if self.shard_central and self.deepspeed_config:
            raise ConfigError(
                "--twist-shard-central is the Megatron path's; under --deepspeed the central model is always "
                "sharded over data parallel: drop the flag"
            )
        if self.shard_central and self.ckpt_format == "torch_dist":
            raise ConfigError(
                "--twist-shard-central saves its own shards, one safetensors file per rank (not torch_dist); "
                "use --ckpt-format safetensors, or leave --twist-shard-central off for torch_dist"
            )
        if self.save_interval is not None and not self.save:
            raise ConfigError("--save-interval needs --save DIR (the directory of the periodic checkpoints)")
        if self.deepspeed_config and self.pipeline_parallel_size > 1:
            raise ConfigError(DEEPSPEED_NO_PP)

    @property
    def deepspeed(self) -> bool:
        return self.deepspeed_config is not None

    @property
    def timeout_s(self) -> float:
        return self.distributed_timeout_minutes * 60


def dump_configs(**configs) -> str:
    return json.dumps({k: v.to_dict() for k, v in configs.items()}, indent=2, sort_keys=True)
