"""Reading and writing HuggingFace model directories (local only: no hub, no remote code).

* ``import_hf(DIR, OUT)``: a Llama-family or GPT-2 checkpoint (config.json +
  safetensors, one file or an index of shards) becomes a megatron-twist
  central checkpoint at step 0 that `twist train --load OUT` continues.
* ``export_hf(MODEL, OUT)``: a central or cut-out megatron-twist checkpoint
  becomes a directory ``AutoModelForCausalLM.from_pretrained`` loads
  (config.json with the reduced sizes, model.safetensors, tokenizer files),
  written atomically (a temporary sibling renamed into place).
* ``load_hf_model(DIR)``: such a directory, for `twist eval`.

Weights are read only from safetensors; pickle-based ``*.bin`` files are
refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from .. import outputs
from ..checkpoint.detect import locate
from ..checkpoint.files import CheckpointError, fsync_dir, load_checkpoint, swap_in
from ..config import ConfigError, ModelConfig, TrainConfig, TwistConfig
from ..model.gpt import LayerSize, full_layer_sizes
from .convert import from_hf_state, hf_config, model_config_from_hf, to_hf_state
from .tokenizer import export_tokenizer, find_tokenizer

EXPORT_META = "twist_export.json"


def is_hf_directory(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "meta.json").is_file()


def read_hf_config(path: str):
    from transformers import AutoConfig

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; pass a local HuggingFace model directory")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} has no config.json: it is not a HuggingFace model directory")
    try:
        return AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root}/config.json cannot be read as a transformers config ({e})") from None


def read_hf_weights(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a HF directory's safetensors file(s); refuses pickle-only checkpoints."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt ({e})") from None
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in root.glob("*.bin"))
        hint = (
            (
                f" ({', '.join(pickled)} are pickle files, which are never loaded here: re-save the model with "
                "`model.save_pretrained(DIR, safe_serialization=True)`)"
            )
            if pickled
            else ""
        )
        raise CheckpointError(f"{root} has no model.safetensors{hint}")
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(root / name)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{root / name} is not a readable safetensors file ({e})") from None
    return state


def import_hf(path: str, out: str, seq_length: Optional[int] = None, overwrite: bool = False) -> ModelConfig:
    """A HF checkpoint -> a megatron-twist central checkpoint (step 0, zero Adam moments)."""
    outputs.check_output(out, (outputs.CENTRAL,), "--save", overwrite)  # before any work
    from ..checkpoint.models import save_central
    from ..model.gpt import build_gpt_model
    from ..twist.central import CentralModel
    from ..twist.extraction import load_named_parameters

    config = read_hf_config(path)
    model = model_config_from_hf(config, seq_length)
    state = read_hf_weights(path)
    try:
        megatron_state = from_hf_state(model, state)
    except KeyError as e:
        raise CheckpointError(f"{path}: tensor {e} is missing from the safetensors files") from None
    central = CentralModel(model, build_gpt_model(model))
    try:
        load_named_parameters(central.module, megatron_state)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tokenizer = find_tokenizer(path)
    save_central(
        out,
        central,
        TwistConfig(),
        TrainConfig(),
        data={"hf_tokenizer": str(Path(path).resolve())} if tokenizer else None,
        extra={"origin": {"format": "huggingface", "path": str(Path(path).resolve()), "model_type": config.model_type}},
        overwrite=overwrite,
    )
    return model


def export_hf(load: str, out: str, tokenizer: Optional[str] = None, overwrite: bool = False) -> dict:
    """A central or cut-out megatron-twist checkpoint -> a HF directory. Returns a summary."""
    from transformers import AutoModelForCausalLM

    final = Path(out).resolve()
    outputs.check_output(final, (outputs.HF_EXPORT,), "--save", overwrite)  # before any work

    load = str(locate(load))  # a save directory's latest, a DeepSpeed save's central/, or the checkpoint
    meta, tensors = load_checkpoint(load)
    if meta.get("kind") not in ("central", "extracted"):
        raise CheckpointError(f"{load} holds a {meta.get('kind')!r} checkpoint; export a central or cut-out model")
    from ..checkpoint.files import model_config_of
    from ..checkpoint.models import read_central

    model = model_config_of(meta, load)
    if meta["kind"] == "central":
        weights = read_central(load)[1]  # consolidates a sharded (DeepSpeed) central checkpoint too
        sizes = full_layer_sizes(model)
    else:
        weights = tensors["model"]
        sizes = [LayerSize(**d) for d in meta["layer_sizes"]]
    config = hf_config(model, sizes)
    if tokenizer is not None:
        source_tokenizer = find_tokenizer(tokenizer)
        if source_tokenizer is None:
            raise ConfigError(
                f"--tokenizer {tokenizer} is neither a sentencepiece .model file, nor a directory from "
                "`twist prepare-data`, nor a HuggingFace tokenizer directory"
            )
    else:
        source_tokenizer = find_tokenizer(meta.get("data", {}).get("path")) or find_tokenizer(
            meta.get("data", {}).get("hf_tokenizer")
        )
    if source_tokenizer is None:
        raise ConfigError(
            f"no tokenizer found for {load}: pass --tokenizer (a sentencepiece .model, a directory "
            "from `twist prepare-data`, or a HuggingFace tokenizer directory)"
        )
    state = to_hf_state(model, sizes, weights)
    if model.family == "gpt2":
        state["lm_head.weight"] = state["transformer.wte.weight"]
    hf_model = AutoModelForCausalLM.from_config(config)
    result = hf_model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{load}: weights do not fit the HF model (missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]})"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.make_temporary(final.parent / f".{final.name}.tmp-{os.getpid()}")
    hf_model.save_pretrained(str(tmp), safe_serialization=True)
    vocab = export_tokenizer(
        source_tokenizer, str(tmp), model.vocab_size, expected_sha256=meta.get("data", {}).get("tokenizer_sha256")
    )
    summary = {
        "source": str(Path(load).resolve()),
        "kind": meta["kind"],
        "keep_ratio": meta.get("keep_ratio", 1.0),
        "family": model.family,
        "layer_sizes": [s.__dict__ for s in sizes],
        "tokenizer": vocab,
        "data": meta.get("data", {}),
    }
    (tmp / EXPORT_META).write_text(json.dumps(summary, indent=1))
    fsync_dir(tmp)
    outputs.check_replaceable(final, outputs.HF_EXPORT, overwrite)
    swap_in(tmp, final)
    return summary


def load_hf_model(path: str):
    """(HF model in fp32, eval mode; pseudo-meta for evaluation) of an exported or any local HF directory."""
    from transformers import AutoModelForCausalLM

    config = read_hf_config(path)
    model_config_from_hf(config)  # refuses unsupported architectures with the reason
    read_hf_weights(path)  # refuses pickle-only or corrupt weights before transformers touches them
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, dtype=torch.float32, use_safetensors=True
    )
    model.eval()
    info = {}
    if (Path(path) / EXPORT_META).is_file():
        info = json.loads((Path(path) / EXPORT_META).read_text())
    seq = getattr(config, "max_position_embeddings", None) or config.n_positions
    meta = {
        "kind": "huggingface",
        "keep_ratio": info.get("keep_ratio", 1.0),
        "model": {"seq_length": seq, "vocab_size": config.vocab_size},
        "data": info.get("data", {}),
    }
    return model, meta


def hf_forward(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood [b, s] of a HF causal LM (same contract as gpt_forward)."""
    logits = model(input_ids=tokens).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
