"""Tokenizers for exported HF directories, and checks that they fit the model.

A sentencepiece BPE model (ours, from `twist prepare-data`) becomes a
transformers ``LlamaTokenizer`` built from its vocabulary and merges
(transformers' own ``SentencePieceExtractor``), with no dummy prefix and
byte fallback, as ours is trained. The conversion is verified before it is
written: a probe text (code, non-ASCII, runs of whitespace) must encode to
the same ids with both, or the export is refused. A HuggingFace tokenizer
directory is copied through ``AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from ..config import ConfigError

PROBE_TEXT = (
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\tclass Déjà(vu):\n"
    '        pass  \n日本語 ☃ naïve — "quotes"\r\n    \n'
)


def find_tokenizer(path: Optional[str]) -> Optional[str]:
    """A tokenizer at ``path``: a sentencepiece file, a prepare-data directory, or a HF tokenizer directory."""
    if not path:
        return None
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return str(p)
    if p.is_dir():
        if (p / "hf_tokenizer").is_dir():  # a prepare-data directory made with --hf-tokenizer
            return str(p / "hf_tokenizer")
        if (p / "tokenizer.model").is_file():
            return str(p / "tokenizer.model")
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return str(p)
    return None


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hf_tokenizer_from_sentencepiece(model_file: str):
    """transformers LlamaTokenizer equivalent to our sentencepiece BPE model (verified on a probe)."""
    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    from ..data.tokenizer import EOS_ID, UNK_ID

    extractor = SentencePieceExtractor(model_file)
    if extractor.proto.trainer_spec.model_type != 2:  # 2 = BPE in sentencepiece's model proto
        raise ConfigError(f"{model_file} is not a BPE sentencepiece model; only BPE models are exported")
    parts = extractor.extract(BPE)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    tok = LlamaTokenizer(
        vocab=parts["vocab"],
        merges=parts["merges"],
        add_prefix_space=False,
        unk_token=sp.id_to_piece(UNK_ID),
        eos_token=sp.id_to_piece(EOS_ID),
        bos_token=None,
        add_bos_token=False,
        add_eos_token=False,
    )
    if tok.encode(PROBE_TEXT, add_special_tokens=False) != sp.encode(PROBE_TEXT):
        raise ConfigError(
            f"{model_file}: the HuggingFace conversion does not reproduce sentencepiece's ids "
            "(a normalisation or dummy-prefix setting it cannot express); export with "
            "--tokenizer pointing at a HuggingFace tokenizer directory instead"
        )
    return tok


def export_tokenizer(source: str, out_dir: str, model_vocab: int, expected_sha256: Optional[str] = None) -> dict:
    """Write tokenizer files for ``source`` into ``out_dir``; refuses one that does not fit the model."""
    from transformers import AutoTokenizer

    if source.endswith(".model"):
        if not Path(source).is_file():
            raise ConfigError(f"tokenizer {source} does not exist")
        digest = _sha256(source)
        if expected_sha256 and digest != expected_sha256:
            raise ConfigError(
                f"tokenizer {source} (sha256 {digest[:12]}...) is not the one the model was trained "
                f"with (sha256 {expected_sha256[:12]}...); pass the training data's tokenizer.model"
            )
        tok = hf_tokenizer_from_sentencepiece(source)
        info = {"kind": "sentencepiece", "sha256": digest}
    else:
        from ..data.hf_tokenizer import directory_sha256

        digest = directory_sha256(source)
        if expected_sha256 and digest != expected_sha256:
            raise ConfigError(
                f"tokenizer {source} is not the one the model was trained with (sha256 differs); "
                "pass the training data's tokenizer"
            )
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{source} is not a readable HuggingFace tokenizer directory ({e})") from None
        info = {"kind": "huggingface", "sha256": digest}
    if len(tok) > model_vocab:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but the model's vocabulary is {model_vocab}: "
            "wrong tokenizer for this model"
        )
    tok.save_pretrained(out_dir)
    return dict(info, vocab_size=len(tok), source=str(Path(source).resolve()))
