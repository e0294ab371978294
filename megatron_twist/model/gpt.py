"""Megatron-core GPTModel construction for the two supported families.

The project never writes its own transformer: central models, materialized
subnets and cut-out models are all Megatron-core ``GPTModel`` instances built
from the local (non Transformer-Engine) layer spec. Models whose layers differ
in size (a subnet with some layers kept whole) use Megatron's own
heterogeneous-block hook (``heterogeneous_block_specs`` +
``get_config_for_layer``), so no Megatron module is modified.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModelConfig
from ..cpu_shim import apply_cpu_shim


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF GPT-2's 'gelu_new')."""
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


@dataclass(frozen=True)
class LayerSize:
    """Sizes of one transformer layer: query heads, key-value groups, MLP neurons."""

    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int


def full_layer_sizes(model: ModelConfig) -> list:
    return [LayerSize(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)] * model.num_layers


@dataclass
class PerLayerTransformerConfig(TransformerConfig):
    """A TransformerConfig whose layers may differ in heads / groups / FFN size.

    Megatron's TransformerBlock asks ``get_config_for_layer`` for each layer
    when ``heterogeneous_block_specs`` is set; we answer with this config with
    that layer's sizes substituted.
    """

    layer_sizes: Optional[tuple] = None

    def __post_init__(self):
        super().__post_init__()
        self.heterogeneous_block_specs = True

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        size = self.layer_sizes[layer_number - 1]
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(TransformerConfig)}
        base.update(
            num_attention_heads=size.num_attention_heads,
            num_query_groups=size.num_query_groups,
            ffn_hidden_size=size.ffn_hidden_size,
            heterogeneous_block_specs=False,
        )
        return TransformerConfig(**base)


def transformer_config(
    model: ModelConfig,
    layer_sizes: Optional[Sequence[LayerSize]] = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
) -> TransformerConfig:
    sizes = list(layer_sizes) if layer_sizes is not None else full_layer_sizes(model)
    if len(sizes) != model.num_layers:
        raise ValueError(f"{len(sizes)} layer sizes given for a {model.num_layers}-layer model")
    first = sizes[0]
    llama = model.family == "llama"
    common = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        # Head dim stays the central model's: a subnet has fewer heads of the same size.
        kv_channels=model.head_dim,
        num_attention_heads=first.num_attention_heads,
        num_query_groups=first.num_query_groups,
        ffn_hidden_size=first.ffn_hidden_size,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        init_method_std=model.init_method_std,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm" if llama else "LayerNorm",
        gated_linear_unit=llama,
        activation_func=ACTIVATION_FUNCS[model.activation],
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        # Fused kernels are CUDA-only; the unfused paths compute the same maths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # p2p buffers between pipeline stages need a dtype; unused without pipeline parallelism
        pipeline_dtype=params_dtype,
    )
    if all(s == first for s in sizes):
        return TransformerConfig(**common)
    return PerLayerTransformerConfig(**common, layer_sizes=tuple(sizes))


def default_device() -> torch.device:
    """This rank's CUDA device when there is one (torchrun sets it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_gpt_model(
    model: ModelConfig,
    layer_sizes: Optional[Sequence[LayerSize]] = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> GPTModel:
    """Build a Megatron-core GPTModel (local spec) on ``device``. Needs parallel_state initialised.

    Weights are initialised on the CPU (``use_cpu_initialization``: identical on every
    rank and device for a seed) and then moved.
    """
    from megatron.core import parallel_state

    apply_cpu_shim()
    # A pipeline stage builds only its own layers; first/last stages hold embedding/output layer.
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = transformer_config(model, layer_sizes, tensor_parallel_size, pipeline_parallel_size, params_dtype)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if model.family == "llama" else "LayerNorm")
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.family == "gpt2",
        position_embedding_type="rope" if model.family == "llama" else "learned_absolute",
        rotary_base=model.rotary_base,
    )
    return gpt.to(device if device is not None else default_device())


def count_parameters(module: torch.nn.Module) -> int:
    """Unique parameters (tied embedding/output counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def gpt_forward(model: GPTModel, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward with implicit causal mask and default positions.

    Returns logits [b, s, v] without labels, or per-token loss [b, s] with labels.
    """
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels)
