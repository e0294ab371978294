"""Turn documents into a prepared data directory that training reads.

Layout of a prepared directory (``twist prepare-data --output DIR``)::

    DIR/tokenizer.model        SentencePiece model (trained here or copied)
    DIR/train.bin, train.idx   Megatron IndexedDataset, one sequence per document
    DIR/valid.bin, valid.idx   (tokens of the document, then the eod token)
    DIR/manifest.json          what is in it; written LAST
    DIR/cache/                 Megatron's sample-index cache (made by training)

Why it is written this way:

* Every file is written under a temporary name in ``DIR`` and moved into
  place with :func:`os.replace` (atomic on POSIX), and any old manifest is
  deleted *first*. ``manifest.json`` is the commit marker: if it exists, the
  files it describes are complete and belong together. An interrupted run
  leaves no manifest, so :func:`load_manifest` tells the user to re-run
  rather than training on a half-written or mismatched dataset.
* The manifest records the tokenizer's sha256 and vocabulary size, so
  :func:`check_tokenizer` can refuse to train a model whose embedding table
  does not match the ids in the ``.bin`` files - a silent, disastrous bug
  otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

from .. import outputs
from ..errors import DataError
from .corpus import SPLITS, Document
from .hf_tokenizer import open_tokenizer
from .tokenizer import DEFAULT_TOKENIZER_SEED, SentencePieceTokenizer, atomic_write_bytes, train_sentencepiece

MANIFEST_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"  # instead of tokenizer.model when prepared with --hf-tokenizer
CACHE_DIR = "cache"
DEFAULT_PROGRESS_EVERY = 200  # documents between progress lines


def _rerun_hint(data_dir: str) -> str:
    return f"run `twist prepare-data --output {data_dir}` first"


@dataclass
class SplitStats:
    """Size of one split of a prepared dataset."""

    documents: int
    tokens: int  # including one eod token per document
    bytes: int  # UTF-8 bytes of the source text
    bin_sha256: str  # of the .bin file; identifies the content for caches


@dataclass
class Manifest:
    """Contents of ``manifest.json`` plus the directory it was loaded from."""

    format_version: int
    vocab_size: int
    eod_id: int
    tokenizer_sha256: str
    dtype: str  # numpy dtype name of the .bin token ids
    splits: Dict[str, SplitStats]
    source: str
    data_dir: str = field(default="", compare=False)  # not serialised
    tokenizer_file: str = TOKENIZER_FILE  # or HF_TOKENIZER_DIR

    # -- paths
    def prefix(self, split: str) -> str:
        """The IndexedDataset path prefix (``.bin``/``.idx`` without suffix) of ``split``."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
        return os.path.join(self.data_dir, split)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, self.tokenizer_file)

    @property
    def fingerprint(self) -> str:
        """Short content hash of the whole dataset (tokenizer + every split's tokens).

        Used to key Megatron's index cache so a re-prepared directory never
        reuses sample indices built for its previous contents.
        """
        blob = json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "tokenizer_file": self.tokenizer_file,
            "tokenizer_sha256": self.tokenizer_sha256,
            "dtype": self.dtype,
            "splits": {
                name: {
                    "documents": s.documents,
                    "tokens": s.tokens,
                    "bytes": s.bytes,
                    "bin_sha256": s.bin_sha256,
                }
                for name, s in self.splits.items()
            },
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict, data_dir: str) -> "Manifest":
        """Validate and build; DataError on anything missing or of the wrong type."""
        where = os.path.join(data_dir, MANIFEST_FILE)

        def bad(why: str) -> DataError:
            return DataError(f"{where} is malformed ({why}); re-run `twist prepare-data --output {data_dir}`")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        version = d.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise DataError(
                f"{where} has format_version {version!r}, this version of megatron_twist reads "
                f"{MANIFEST_FORMAT_VERSION}; re-run `twist prepare-data --output {data_dir}`"
            )
        for key, typ in (
            ("vocab_size", int),
            ("eod_id", int),
            ("tokenizer_sha256", str),
            ("dtype", str),
            ("splits", dict),
            ("source", str),
        ):
            if not isinstance(d.get(key), typ) or isinstance(d.get(key), bool):
                raise bad(f"{key!r} missing or not of type {typ.__name__}")
        splits = {}
        for name in SPLITS:
            s = d["splits"].get(name)
            if not isinstance(s, dict):
                raise bad(f"no {name!r} split")
            try:
                splits[name] = SplitStats(
                    documents=int(s["documents"]),
                    tokens=int(s["tokens"]),
                    bytes=int(s["bytes"]),
                    bin_sha256=str(s["bin_sha256"]),
                )
            except (KeyError, TypeError, ValueError) as err:
                raise bad(f"split {name!r}: {err!r}") from err
        try:
            numpy.dtype(d["dtype"])
        except TypeError as err:
            raise bad(f"unknown dtype {d['dtype']!r}") from err
        return cls(
            format_version=version,
            vocab_size=d["vocab_size"],
            eod_id=d["eod_id"],
            tokenizer_sha256=d["tokenizer_sha256"],
            dtype=d["dtype"],
            splits=splits,
            source=d["source"],
            data_dir=data_dir,
            tokenizer_file=_tokenizer_file(d.get("tokenizer_file", TOKENIZER_FILE), bad),
        )


def _tokenizer_file(name, bad) -> str:
    if name not in (TOKENIZER_FILE, HF_TOKENIZER_DIR):
        raise bad(f"tokenizer_file {name!r} is neither {TOKENIZER_FILE!r} nor {HF_TOKENIZER_DIR!r}")
    return name


class _Progress:
    """Throughput lines on stderr: every N documents and once at the end."""

    def __init__(self, label: str, enabled: bool, every: int) -> None:
        self.label, self.enabled, self.every = label, enabled, max(1, every)
        self.t0 = time.perf_counter()

    def line(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        if not self.enabled or (not final and docs % self.every):
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        mb = nbytes / 1e6
        print(
            f"[prepare-data] {self.label}: {docs} documents, {tokens} tokens, {mb:.2f} MB, "
            f"{mb / dt:.2f} MB/s{' (done in %.1f s)' % dt if final else ''}",
            file=sys.stderr,
            flush=True,
        )


def _write_split(
    out_dir: str,
    split: str,
    documents: Iterable[Document],
    tokenizer: SentencePieceTokenizer,
    dtype: type,
    progress: bool,
    progress_every: int,
) -> SplitStats:
    """Tokenize ``documents`` into ``out_dir/split.{bin,idx}`` (atomically)."""
    tmp_prefix = os.path.join(out_dir, f".{split}.tmp-{os.getpid()}")
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)
    eod = tokenizer.eod
    digest = hashlib.sha256()
    docs = tokens = nbytes = 0
    report = _Progress(split, progress, progress_every)
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    try:
        for doc in documents:
            if not doc.text:
                continue
            ids = tokenizer.tokenize(doc.text)
            ids.append(eod)
            arr = numpy.asarray(ids, dtype=dtype)
            # One sequence per document: GPTDataset splits by sequence and
            # packs documents back to back, eod between them.
            builder.add_document(arr, [arr.size])
            digest.update(arr.tobytes(order="C"))
            docs += 1
            tokens += arr.size
            nbytes += doc.nbytes
            report.line(docs, tokens, nbytes)
        if docs == 0:
            raise DataError(
                f"the {split} split has no documents; give it text (for your own data pass "
                f"--input for training text and --valid-input for held-out text)"
            )
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, get_bin_path(os.path.join(out_dir, split)))
        os.replace(tmp_idx, get_idx_path(os.path.join(out_dir, split)))
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.unlink(tmp)
    report.line(docs, tokens, nbytes, final=True)
    return SplitStats(documents=docs, tokens=tokens, bytes=nbytes, bin_sha256=digest.hexdigest())


def prepare_data(
    out_dir: str,
    train_docs: Iterable[Document],
    valid_docs: Iterable[Document],
    vocab_size: Optional[int] = None,
    tokenizer_model: Optional[str] = None,
    progress: bool = True,
    *,
    hf_tokenizer: Optional[str] = None,
    source: Optional[str] = None,
    seed: int = DEFAULT_TOKENIZER_SEED,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    overwrite: bool = False,
) -> Manifest:
    """Write a prepared data directory (see the module docstring) and return its manifest.

    Args:
        out_dir: created if missing; existing prepared files are replaced.
        train_docs, valid_docs: the documents of each split.
        vocab_size: train a new tokenizer of this size on ``train_docs``
            (``train_docs`` is then held in memory, as it is read twice).
        tokenizer_model: instead, copy this existing SentencePiece model.
        hf_tokenizer: or use this HuggingFace tokenizer directory (e.g. of a
            model imported with `twist import-hf`); copied to DIR/hf_tokenizer.
            Exactly one of ``vocab_size`` / ``tokenizer_model`` / ``hf_tokenizer`` must be given.
        progress: print progress lines on stderr.
        source: free-text provenance stored in the manifest.
        seed: tokenizer-training seed.
        progress_every: documents between progress lines.
        overwrite: write into ``out_dir`` even if it is a non-empty directory that is not a
            prepared data directory (``--overwrite``); refused otherwise, before any work.

    Raises:
        DataError: bad arguments, an unusable tokenizer, or an empty split.
    """
    if sum(x is not None for x in (vocab_size, tokenizer_model, hf_tokenizer)) != 1:
        raise DataError(
            "give exactly one of vocab_size (train a new tokenizer, --vocab-size N), "
            "tokenizer_model (reuse one, --tokenizer-model PATH) or hf_tokenizer (--hf-tokenizer DIR)"
        )
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"output path {out_dir!r} exists and is not a directory; choose another --output")
    # Files are written INTO the directory: refuse a user's own folder before any work (--overwrite).
    outputs.check_output(out_dir, (outputs.PREPARED_DATA,), "--output", overwrite)
    outputs.claim_directory(out_dir, outputs.PREPARED_DATA)  # an interrupted run stays ours: rerun it
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    # Invalidate first: from here until the new manifest lands, the directory
    # is "not prepared", whatever happens.
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)

    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE if hf_tokenizer is None else HF_TOKENIZER_DIR)
    if hf_tokenizer is not None:
        import shutil

        from .hf_tokenizer import HFTokenizer

        tmp_dir = os.path.join(out_dir, f".hf_tokenizer.tmp-{os.getpid()}")
        HFTokenizer(hf_tokenizer).save(tmp_dir)  # validates it first
        if os.path.isdir(tokenizer_path):
            shutil.rmtree(tokenizer_path)
        os.replace(tmp_dir, tokenizer_path)
    elif vocab_size is not None:
        train_docs = list(train_docs)  # read twice: tokenizer training, then tokenization
        t0 = time.perf_counter()
        tmp_model = train_sentencepiece(
            train_docs, os.path.join(out_dir, f".tokenizer.tmp-{os.getpid()}"), vocab_size, seed=seed
        )
        os.replace(tmp_model, tokenizer_path)
        if progress:
            print(
                f"[prepare-data] tokenizer: trained a {vocab_size}-piece BPE model on "
                f"{len(train_docs)} documents in {time.perf_counter() - t0:.1f} s -> {tokenizer_path}",
                file=sys.stderr,
                flush=True,
            )
    else:
        source_tokenizer = SentencePieceTokenizer(tokenizer_model)  # validates it is a model
        with open(source_tokenizer.model_path, "rb") as f:
            atomic_write_bytes(tokenizer_path, f.read())
    tokenizer = open_tokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    splits = {
        "train": _write_split(out_dir, "train", train_docs, tokenizer, dtype, progress, progress_every),
        "valid": _write_split(out_dir, "valid", valid_docs, tokenizer, dtype, progress, progress_every),
    }
    manifest = Manifest(
        format_version=MANIFEST_FORMAT_VERSION,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod,
        tokenizer_sha256=tokenizer.model_sha256,
        dtype=numpy.dtype(dtype).name,
        splits=splits,
        source=source if source is not None else "documents passed to prepare_data",
        data_dir=out_dir,
        tokenizer_file=os.path.basename(tokenizer_path),
    )
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(manifest_path, text.encode("utf-8"))  # last: the commit marker
    return manifest


def load_manifest(data_dir: str) -> Manifest:
    """Read and check a prepared directory; DataError naming the fix if anything is off.

    Checks that the manifest parses, that every file it implies exists, and
    that each ``.bin`` has exactly the size the manifest's token count implies
    (catches truncated copies and files from another preparation).
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist; {_rerun_hint(data_dir)}")
    manifest_path = os.path.join(data_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise DataError(
            f"{manifest_path!r} not found: {data_dir!r} is not a prepared data directory "
            f"(or its preparation was interrupted); {_rerun_hint(data_dir)}"
        )
    try:
        with open(manifest_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{manifest_path} is malformed ({err}); re-run `twist prepare-data --output {data_dir}`"
        ) from err
    manifest = Manifest.from_dict(raw, data_dir)

    required = [manifest.tokenizer_path]
    for split in SPLITS:
        required += [get_bin_path(manifest.prefix(split)), get_idx_path(manifest.prefix(split))]
    for path in required:
        if not os.path.exists(path):
            raise DataError(f"{path!r} is missing from the prepared data; {_rerun_hint(data_dir)}")
    itemsize = numpy.dtype(manifest.dtype).itemsize
    for split in SPLITS:
        bin_path = get_bin_path(manifest.prefix(split))
        expected = manifest.splits[split].tokens * itemsize
        actual = os.path.getsize(bin_path)
        if actual != expected:
            raise DataError(
                f"{bin_path!r} has {actual} bytes but the manifest promises {expected} "
                f"({manifest.splits[split].tokens} {manifest.dtype} tokens); the directory is "
                f"inconsistent - {_rerun_hint(data_dir)}"
            )
    return manifest


def check_tokenizer(manifest: Manifest, tokenizer: SentencePieceTokenizer) -> None:
    """Refuse a tokenizer other than the one the dataset was tokenized with.

    Raises:
        DataError: sha256, vocabulary size or eod id differ.
    """
    hint = (
        f"use the dataset's own tokenizer ({manifest.tokenizer_path}), or re-prepare the data "
        f"with this one: `twist prepare-data --tokenizer {getattr(tokenizer, 'model_path', 'PATH')} "
        f"--output {manifest.data_dir}`"
    )
    if tokenizer.model_sha256 != manifest.tokenizer_sha256:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'model_path', tokenizer)!r} (sha256 "
            f"{tokenizer.model_sha256[:12]}...) is not the one {manifest.data_dir!r} was prepared "
            f"with (sha256 {manifest.tokenizer_sha256[:12]}...); {hint}"
        )
    if tokenizer.vocab_size != manifest.vocab_size:
        raise DataError(
            f"tokenizer vocab size {tokenizer.vocab_size} != {manifest.vocab_size} of the data in "
            f"{manifest.data_dir!r}; {hint}"
        )
    if tokenizer.eod != manifest.eod_id:
        raise DataError(
            f"tokenizer eod id {tokenizer.eod} != {manifest.eod_id} of the data in {manifest.data_dir!r}; {hint}"
        )


def load_tokenizer(data_dir: str) -> SentencePieceTokenizer:
    """The prepared directory's own tokenizer, checked against its manifest."""
    manifest = load_manifest(data_dir)
    tokenizer = open_tokenizer(manifest.tokenizer_path)
    check_tokenizer(manifest, tokenizer)
    return tokenizer
