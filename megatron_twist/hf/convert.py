"""Megatron-core GPTModel <-> HuggingFace names, layouts and configs (pure functions, no I/O).

Llama family <-> ``LlamaForCausalLM``:
* ``linear_qkv`` rows are grouped per KV group g: [q heads of g | k_g | v_g]
  (twist/slicing.py); HF keeps ``q_proj`` (query heads in order, head h in
  group h // heads_per_group, which is HF's ``repeat_kv`` order), ``k_proj``
  and ``v_proj`` apart.
* ``linear_fc1`` rows are [gate | up] (SwiGLU); HF: ``gate_proj``, ``up_proj``.
* Rotary: Megatron's default (non-interleaved, rotate-half) is HF's; no
  permutation of q/k rows is needed.

GPT-2 family <-> ``GPT2LMHeadModel``:
* HF's ``Conv1D`` stores weights as [in, out]: every linear is transposed.
* ``c_attn`` output columns are [all q | all k | all v]; Megatron's
  ``linear_qkv`` rows are per head [q_h | k_h | v_h] (multi-head attention
  has one group per head).
* Embedding and output layer are tied in both.

Cut-out models: per-layer sizes come from the checkpoint's ``layer_sizes``.
HF configs hold ONE size per model, so a model whose layers differ (layers
kept whole) cannot be expressed and is refused. GPT-2 derives its head size
from ``n_embd / n_head``, so a GPT-2 with fewer heads than the central model
cannot be expressed either and is refused; its MLP can be cut (``n_inner``).
Llama states ``head_dim`` explicitly, so any cut Llama is expressible.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..config import ConfigError, ModelConfig
from ..model.gpt import LayerSize

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # ours -> HF GPT-2's activation_function
FROM_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class ExportError(ConfigError):
    """A model that a HuggingFace config cannot express; the message says why and what to do."""


# ----------------------------------------------------------------------------------------- configs
def uniform_size(model: ModelConfig, layer_sizes: Sequence[LayerSize]) -> LayerSize:
    sizes = list(layer_sizes)
    if any(s != sizes[0] for s in sizes):
        raise ExportError(
            "this model's layers differ in size (it was cut with layers kept whole: "
            f"{sorted({(s.num_attention_heads, s.ffn_hidden_size) for s in sizes})} heads/neurons); a "
            "HuggingFace config has one size for all layers. Cut it without --whole-layers, or use "
            "the megatron-twist checkpoint directly"
        )
    return sizes[0]


def hf_config(model: ModelConfig, layer_sizes: Sequence[LayerSize]):
    """The transformers config of a (possibly cut) model."""
    from transformers import GPT2Config, LlamaConfig

    size = uniform_size(model, layer_sizes)
    if model.family == "llama":
        if model.hidden_size % size.num_attention_heads:
            # transformers (5.x) validates hidden_size % num_attention_heads == 0 for Llama even though
            # its config states head_dim; such a model cannot be saved or loaded as a LlamaConfig.
            fits = [
                h
                for h in range(1, model.num_attention_heads + 1)
                if model.hidden_size % h == 0 and h % size.num_query_groups == 0
            ]
            raise ExportError(
                f"a Llama with {size.num_attention_heads} of {model.num_attention_heads} heads and hidden size "
                f"{model.hidden_size} cannot be expressed as a HuggingFace LlamaConfig (transformers requires the "
                f"hidden size to be a multiple of the number of heads). Cut at a keep ratio that keeps {fits} "
                "heads, or use the megatron-twist checkpoint directly"
            )
        return LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=size.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=size.num_attention_heads,
            num_key_value_heads=size.num_query_groups,
            head_dim=model.head_dim,
            max_position_embeddings=model.seq_length,
            rms_norm_eps=model.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            architectures=["LlamaForCausalLM"],
        )
    if size.num_attention_heads * model.head_dim != model.hidden_size:
        raise ExportError(
            f"a GPT-2 with {size.num_attention_heads} of {model.num_attention_heads} heads cannot be expressed "
            "as a HuggingFace GPT2Config (it derives the head size from n_embd / n_head). Cut only MLP neurons "
            "(train with --twist-split mlp), or use the llama family, whose config states head_dim"
        )
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.seq_length,
        n_embd=model.hidden_size,
        n_layer=model.num_layers,
        n_head=size.num_attention_heads,
        n_inner=size.ffn_hidden_size,
        activation_function=HF_ACTIVATIONS[model.activation],
        layer_norm_epsilon=model.norm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )


def model_config_from_hf(config, seq_length: int = None) -> ModelConfig:
    """ModelConfig of a HF Llama-family or GPT-2 config; anything else is refused with the reason."""
    kind = getattr(config, "model_type", None)
    if kind in ("llama", "mistral", "qwen2"):
        if kind != "llama":
            raise ConfigError(f"model_type {kind!r} is not supported; supported: llama (Llama-family) and gpt2")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {config.hidden_act!r}: only SwiGLU (silu) Llama models are supported")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ConfigError("Llama models with attention or MLP biases are not supported")
        if getattr(config, "tie_word_embeddings", False):
            raise ConfigError("a Llama model with tied embeddings is not supported (the llama family unties them)")
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope scaling {rope.get('rope_type')!r} is not supported; only plain RoPE")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ModelConfig(
            family="llama",
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            seq_length=seq_length or config.max_position_embeddings,
            norm_epsilon=config.rms_norm_eps,
            rotary_base=int(rope.get("rope_theta", getattr(config, "rope_theta", 10000))),
            kv_channels=None if head_dim * config.num_attention_heads == config.hidden_size else head_dim,
        )
    if kind == "gpt2":
        act = config.activation_function
        if act not in FROM_HF_ACTIVATIONS:
            raise ConfigError(f"GPT-2 activation_function {act!r} is not supported; use gelu or gelu_new")
        if seq_length and seq_length > config.n_positions:
            raise ConfigError(f"--seq-length {seq_length} exceeds the model's {config.n_positions} positions")
        return ModelConfig(
            family="gpt2",
            num_layers=config.n_layer,
            hidden_size=config.n_embd,
            num_attention_heads=config.n_head,
            ffn_hidden_size=config.n_inner or 4 * config.n_embd,
            vocab_size=config.vocab_size,
            seq_length=config.n_positions,
            norm_epsilon=config.layer_norm_epsilon,
            activation=FROM_HF_ACTIVATIONS[act],
        )
    raise ConfigError(f"model_type {kind!r} is not supported; supported: llama (Llama-family) and gpt2")


# ----------------------------------------------------------------------------------------- weights
def _qkv_split(model: ModelConfig, size: LayerSize, qkv: torch.Tensor):
    """Megatron's grouped qkv rows (or bias) -> (q, k, v) in HF head order."""
    hd, groups = model.head_dim, size.num_query_groups
    per_group = size.num_attention_heads // groups
    blocks = qkv.reshape(groups, (per_group + 2) * hd, *qkv.shape[1:])
    q = blocks[:, : per_group * hd].reshape(groups * per_group * hd, *qkv.shape[1:])
    k = blocks[:, per_group * hd : (per_group + 1) * hd].reshape(groups * hd, *qkv.shape[1:])
    v = blocks[:, (per_group + 1) * hd :].reshape(groups * hd, *qkv.shape[1:])
    return q, k, v


def _qkv_join(model: ModelConfig, size: LayerSize, q, k, v) -> torch.Tensor:
    hd, groups = model.head_dim, size.num_query_groups
    per_group = size.num_attention_heads // groups
    rest = q.shape[1:]
    blocks = torch.cat(
        [q.reshape(groups, per_group * hd, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)], dim=1
    )
    return blocks.reshape(groups * (per_group + 2) * hd, *rest)


def to_hf_state(
    model: ModelConfig, layer_sizes: Sequence[LayerSize], state: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Megatron-core parameter names -> HF names (Llama / GPT-2)."""
    size = uniform_size(model, layer_sizes)
    out: Dict[str, torch.Tensor] = {}
    if model.family == "llama":
        out["model.embed_tokens.weight"] = state["embedding.word_embeddings.weight"]
        out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
        out["lm_head.weight"] = state["output_layer.weight"]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, k, v = _qkv_split(model, size, state[m + "self_attention.linear_qkv.weight"])
            out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
            out[h + "self_attn.v_proj.weight"] = v
            out[h + "self_attn.o_proj.weight"] = state[m + "self_attention.linear_proj.weight"]
            gate, up = state[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = state[m + "mlp.linear_fc2.weight"]
            out[h + "input_layernorm.weight"] = state[m + "input_layernorm.weight"]
            out[h + "post_attention_layernorm.weight"] = state[m + "pre_mlp_layernorm.weight"]
    else:
        out["transformer.wte.weight"] = state["embedding.word_embeddings.weight"]
        out["transformer.wpe.weight"] = state["embedding.position_embeddings.weight"]
        out["transformer.ln_f.weight"] = state["decoder.final_layernorm.weight"]
        out["transformer.ln_f.bias"] = state["decoder.final_layernorm.bias"]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for suffix in ("weight", "bias"):
                q, k, v = _qkv_split(model, size, state[m + f"self_attention.linear_qkv.{suffix}"])
                joined = torch.cat([q, k, v], dim=0)
                out[h + f"attn.c_attn.{suffix}"] = joined.t() if suffix == "weight" else joined
                out[h + f"ln_1.{suffix}"] = state[m + f"input_layernorm.{suffix}"]
                out[h + f"ln_2.{suffix}"] = state[m + f"pre_mlp_layernorm.{suffix}"]
            out[h + "attn.c_proj.weight"] = state[m + "self_attention.linear_proj.weight"].t()
            out[h + "attn.c_proj.bias"] = state[m + "self_attention.linear_proj.bias"]
            out[h + "mlp.c_fc.weight"] = state[m + "mlp.linear_fc1.weight"].t()
            out[h + "mlp.c_fc.bias"] = state[m + "mlp.linear_fc1.bias"]
            out[h + "mlp.c_proj.weight"] = state[m + "mlp.linear_fc2.weight"].t()
            out[h + "mlp.c_proj.bias"] = state[m + "mlp.linear_fc2.bias"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state(model: ModelConfig, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF names -> Megatron-core parameter names (full-size model). Missing tensors raise KeyError."""
    size = LayerSize(model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)
    out: Dict[str, torch.Tensor] = {}
    if model.family == "llama":
        out["embedding.word_embeddings.weight"] = state["model.embed_tokens.weight"]
        out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
        out["output_layer.weight"] = state["lm_head.weight"]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            out[m + "self_attention.linear_qkv.weight"] = _qkv_join(
                model,
                size,
                state[h + "self_attn.q_proj.weight"],
                state[h + "self_attn.k_proj.weight"],
                state[h + "self_attn.v_proj.weight"],
            )
            out[m + "self_attention.linear_proj.weight"] = state[h + "self_attn.o_proj.weight"]
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [state[h + "mlp.gate_proj.weight"], state[h + "mlp.up_proj.weight"]], dim=0
            )
            out[m + "mlp.linear_fc2.weight"] = state[h + "mlp.down_proj.weight"]
            out[m + "input_layernorm.weight"] = state[h + "input_layernorm.weight"]
            out[m + "pre_mlp_layernorm.weight"] = state[h + "post_attention_layernorm.weight"]
    else:
        out["embedding.word_embeddings.weight"] = state["transformer.wte.weight"]
        out["embedding.position_embeddings.weight"] = state["transformer.wpe.weight"][: model.seq_length]
        out["decoder.final_layernorm.weight"] = state["transformer.ln_f.weight"]
        out["decoder.final_layernorm.bias"] = state["transformer.ln_f.bias"]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for suffix in ("weight", "bias"):
                joined = state[h + f"attn.c_attn.{suffix}"]
                joined = joined.t() if suffix == "weight" else joined
                q, k, v = joined.chunk(3, dim=0)
                out[m + f"self_attention.linear_qkv.{suffix}"] = _qkv_join(model, size, q, k, v)
                out[m + f"input_layernorm.{suffix}"] = state[h + f"ln_1.{suffix}"]
                out[m + f"pre_mlp_layernorm.{suffix}"] = state[h + f"ln_2.{suffix}"]
            out[m + "self_attention.linear_proj.weight"] = state[h + "attn.c_proj.weight"].t()
            out[m + "self_attention.linear_proj.bias"] = state[h + "attn.c_proj.bias"]
            out[m + "mlp.linear_fc1.weight"] = state[h + "mlp.c_fc.weight"].t()
            out[m + "mlp.linear_fc1.bias"] = state[h + "mlp.c_fc.bias"]
            out[m + "mlp.linear_fc2.weight"] = state[h + "mlp.c_proj.weight"].t()
            out[m + "mlp.linear_fc2.bias"] = state[h + "mlp.c_proj.bias"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}
