"""A HuggingFace tokenizer directory in the shape Megatron-core's GPTDataset expects.

For data meant for a model imported with `twist import-hf`: the text must be
tokenized with that model's own tokenizer. Loaded with ``AutoTokenizer``
from a local directory only (no hub, no remote code). Its identity is the
sha256 over the directory's tokenizer files (name and bytes), recorded in the
dataset manifest and checked like a sentencepiece model's.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

try:  # megatron-core 0.14+ renamed the dataset-side tokenizer ABC
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _MegatronTokenizerABC
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _MegatronTokenizerABC

from ..errors import DataError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def tokenizer_files(directory: str) -> List[str]:
    return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]


def directory_sha256(directory: str) -> str:
    h = hashlib.sha256()
    for name in tokenizer_files(directory):
        h.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


class HFTokenizer(_MegatronTokenizerABC):
    def __init__(self, directory: str) -> None:
        self._init(os.fspath(directory))

    def _init(self, directory: str) -> None:
        from transformers import AutoTokenizer

        if not os.path.isdir(directory) or not tokenizer_files(directory):
            raise DataError(
                f"{directory!r} is not a HuggingFace tokenizer directory (no tokenizer.json or "
                "tokenizer_config.json); pass the model directory you imported"
            )
        try:
            self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{directory!r}: the tokenizer cannot be loaded ({err})") from err
        if self._tok.eos_token_id is None:
            raise DataError(
                f"the tokenizer in {directory!r} has no end-of-sequence token, which marks document "
                "ends; use a tokenizer that defines eos_token"
            )
        self.model_path = directory
        self.model_sha256 = directory_sha256(directory)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("model_sha256", self.model_sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
            ]
        )
        self.unique_description = str(dict(self.unique_identifiers))

    def __getstate__(self):
        return {"directory": self.model_path}

    def __setstate__(self, state) -> None:
        self._init(state["directory"])

    def save(self, directory: str) -> None:
        self._tok.save_pretrained(directory)

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab()

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def eos(self) -> int:
        return self._tok.eos_token_id

    @property
    def pad(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} pads with Megatron's -1")

    @property
    def bos(self) -> int:
        if self._tok.bos_token_id is None:
            raise NotImplementedError(f"{type(self).__name__} has no bos token")
        return self._tok.bos_token_id


def open_tokenizer(path: str):
    """A sentencepiece ``.model`` file or a HuggingFace tokenizer directory."""
    if os.path.isdir(path):
        return HFTokenizer(path)
    from .tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(path)
