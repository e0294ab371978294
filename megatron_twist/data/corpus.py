"""Where training text comes from.

Two sources:

* :func:`stdlib_documents` - the *embedded default corpus*: the ``*.py``
  sources of the running Python's standard library. Every user has it, it
  needs no network, it is real code with real structure (so a small model
  visibly learns), and it is identical for everyone on the same Python
  version, so runs are comparable. A fixed, named list of modules is held out
  as the validation split, so held-out perplexity measures generalisation to
  unseen *modules* rather than to unseen lines of a file it trained on.
* :func:`text_documents` - the user's own files: plain text (one document per
  file) or JSON lines (one document per line).

Both produce :class:`Document` objects; everything downstream (tokenizer
training, :func:`megatron_twist.data.prepare.prepare_data`) only sees those.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "valid")

# Default size caps. ~6 MB of source is ~1.4 M tokens with an 8k vocabulary:
# enough for a small model to learn something in minutes, small enough that
# preparing the data (tokenizer training + tokenization) takes seconds on one
# core. The valid cap is above the size of the held-out modules on 3.10-3.12
# (~0.85 MB), so by default the whole held-out set is used.
DEFAULT_TRAIN_MAX_BYTES = 6_000_000
DEFAULT_VALID_MAX_BYTES = 1_000_000
DEFAULT_MAX_BYTES = {"train": DEFAULT_TRAIN_MAX_BYTES, "valid": DEFAULT_VALID_MAX_BYTES}

# Held-out modules (a directory name means the whole package). Chosen to exist
# in Python 3.10, 3.11 and 3.12, to be ordinary library code (not generated
# tables), and to mix styles: a big package (email), protocol code (http),
# parsing (json, csv, shlex), numerics (statistics), text (textwrap) and a
# large single-file module (argparse). Names absent from a given Python are
# simply skipped.
HELDOUT_MODULES: Tuple[str, ...] = (
    "argparse.py",
    "csv.py",
    "email",
    "http",
    "json",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
)

# Directories never used: test suites (huge, repetitive, and they would leak
# the held-out modules' behaviour into training), third-party packages
# (site-packages differs per machine, which would break reproducibility),
# generated or data-like code (encodings tables, pydoc topics), GUI/demo code
# and vendored wheels.
EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib-dynload",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "tkinter",
        "turtledemo",
    }
)
# Build-time generated files that differ between machines with the same
# Python version (paths, compiler flags); including them would make the
# "same corpus for everyone" promise false.
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
_EXCLUDED_DIR_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu/

# File types picked up when a *directory* is given to text_documents. A file
# given explicitly is always read, whatever its suffix.
TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl", ".json")
# Read as JSON lines (one JSON object per line), like Megatron-LM's own
# tools/preprocess_data.py does for its ".json" inputs.
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Document:
    """One unit of text that ends with an end-of-document token once tokenized.

    ``name`` says where it came from (a stdlib-relative path, a file path, or
    ``path:line`` for JSON lines) so errors and manifests can point at it.
    """

    name: str
    text: str

    @property
    def nbytes(self) -> int:
        """Size in UTF-8 bytes (what size caps and throughput are measured in)."""
        return len(self.text.encode("utf-8"))


# ----------------------------------------------------------------------------
# The embedded stdlib corpus


def stdlib_root() -> Path:
    """The directory holding the running Python's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _dir_is_excluded(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith(_EXCLUDED_DIR_PREFIXES) or name.startswith(".")


def _split_of(rel: PurePosixPath) -> str:
    """'valid' if ``rel`` belongs to a held-out module, else 'train'."""
    if rel.parts[0] in HELDOUT_MODULES:  # a held-out package dir or top-level file
        return "valid"
    return "train"


def stdlib_files(split: str, root: Optional[PathLike] = None) -> List[Tuple[str, Path]]:
    """``(relative posix name, path)`` of every corpus file of ``split``, sorted by name.

    Sorting by the relative POSIX name (not by ``os.walk`` order, which
    depends on the filesystem) is what makes the corpus deterministic.
    """
    _check_split(split)
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise DataError(
            f"the standard-library directory {str(base)!r} does not exist; this Python "
            "installation has no stdlib sources - pass your own text with --input PATH"
        )
    found: List[Tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Prune in place so huge trees (site-packages, test) are never walked.
        dirnames[:] = [d for d in dirnames if not _dir_is_excluded(d)]
        for fname in filenames:
            if not fname.endswith(".py") or fname.startswith(_EXCLUDED_FILE_PREFIXES):
                continue
            path = Path(dirpath) / fname
            rel = PurePosixPath(path.relative_to(base).as_posix())
            if _split_of(rel) == split:
                found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _read_python_source(path: Path) -> Optional[str]:
    """Decode a .py file honouring its PEP 263 coding cookie; None if unreadable.

    An unreadable stdlib file is skipped rather than fatal: the default corpus
    must work on any distribution's Python, and one odd file should not stop
    a run. (It is still deterministic: the same Python skips the same file.)
    """
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def stdlib_documents(
    split: str = "train",
    max_bytes: Optional[int] = None,
    *,
    root: Optional[PathLike] = None,
) -> List[Document]:
    """The standard-library corpus: one :class:`Document` per ``*.py`` file.

    Args:
        split: ``"train"`` (everything except the held-out modules) or
            ``"valid"`` (only :data:`HELDOUT_MODULES`). The two never share a file.
        max_bytes: cap on the total UTF-8 size. Files are taken in sorted name
            order and the selection stops at the first file that would exceed
            the cap, so a smaller cap always gives a prefix of a larger one.
            ``None`` means the split's default (:data:`DEFAULT_MAX_BYTES`);
            pass ``sys.maxsize`` for no cap.
        root: read another directory instead of the running Python's stdlib
            (for tests or for a different Python's sources).

    Raises:
        DataError: unknown split, non-positive cap, or nothing selected.
    """
    _check_split(split)
    cap = DEFAULT_MAX_BYTES[split] if max_bytes is None else int(max_bytes)
    if cap <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    docs: List[Document] = []
    total = 0
    for name, path in stdlib_files(split, root):
        text = _read_python_source(path)
        if text is None or not text.strip():
            continue  # empty __init__.py files would only add an end-of-document token
        size = len(text.encode("utf-8"))
        if total + size > cap:
            break
        docs.append(Document(name=name, text=text))
        total += size
    if not docs:
        raise DataError(
            f"the standard-library {split} corpus is empty (max_bytes={cap}, "
            f"root={str(root) if root is not None else str(stdlib_root())!r}); raise max_bytes "
            "above the size of the first file, or pass your own text with --input PATH"
        )
    return docs


def describe_stdlib(split: str, documents: Sequence[Document]) -> str:
    """A one-line provenance string for the manifest (Python version, split, size)."""
    import platform

    nbytes = sum(d.nbytes for d in documents)
    return (
        f"python{platform.python_version()} stdlib {split}: {len(documents)} files, "
        f"{nbytes} bytes (held out: {', '.join(HELDOUT_MODULES)})"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")


# ----------------------------------------------------------------------------
# User-supplied text


def _as_path_list(paths: Union[PathLike, Iterable[PathLike]]) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _resolve_input_files(paths: Union[PathLike, Iterable[PathLike]]) -> List[Path]:
    """Expand directories into their text files, failing fast on missing paths.

    Done eagerly (before any document is yielded) so a typo in the last of
    several paths is reported at once, not after minutes of tokenization.
    """
    path_list = _as_path_list(paths)
    if not path_list:
        raise DataError("no input paths given; pass at least one file or directory with --input PATH")
    files: List[Path] = []
    for path in path_list:
        if not path.exists():
            raise DataError(
                f"input path {str(path)!r} does not exist; check the spelling, or pass an "
                "existing text/JSON-lines file or a directory of them (--input PATH)"
            )
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                for fname in filenames:
                    if not _is_hidden(fname) and fname.endswith(TEXT_SUFFIXES):
                        found.append(Path(dirpath) / fname)
            if not found:
                raise DataError(
                    f"directory {str(path)!r} holds no {'/'.join('*' + s for s in TEXT_SUFFIXES)} "
                    "files; point --input at the files themselves or at a directory that has some"
                )
            # Sort on the relative POSIX path: deterministic on every filesystem.
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        else:
            files.append(path)
    return files


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); convert it "
            "to UTF-8 or leave it out of --input"
        ) from err


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg}); a .jsonl/.json input must hold one "
                    "JSON object per line - give plain text another suffix such as .txt"
                ) from err
            except UnicodeDecodeError as err:  # pragma: no cover - raised by the file iterator
                raise DataError(f"{where}: not UTF-8 text; convert the file to UTF-8") from err
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{where}: no {field!r} field (found {keys}); choose the text field with --json-field NAME"
                )
            text = record[field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {field!r} is a {type(text).__name__}, not a string; "
                    "choose a text field with --json-field NAME"
                )
            yield Document(name=where, text=text)


def _iter_documents(files: List[Path], field: str) -> Iterator[Document]:
    count = 0
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            docs: Iterable[Document] = _jsonl_documents(path, field)
        else:
            docs = [Document(name=str(path), text=_read_text_file(path))]
        for doc in docs:
            # Whitespace-only documents carry no signal and would become a
            # lone end-of-document token; skipping them keeps counts honest.
            if doc.text.strip():
                count += 1
                yield doc
    if count == 0:
        raise DataError(
            f"the input corpus is empty: {len(files)} file(s) "
            f"({', '.join(str(p) for p in files[:3])}{', ...' if len(files) > 3 else ''}) hold "
            "no non-whitespace text; check --input and --json-field"
        )


def text_documents(paths: Union[PathLike, Iterable[PathLike]], json_field: Optional[str] = None) -> Iterator[Document]:
    """Documents from user files: plain text files and JSON-lines files.

    Args:
        paths: one path or several. A directory is walked recursively (hidden
            entries skipped) for ``*.txt``, ``*.py``, ``*.md``, ``*.jsonl`` and
            ``*.json`` files, in sorted order. A plain file is one document; a
            ``*.jsonl``/``*.json`` file is JSON lines: one document per
            non-blank line, taken from ``json_field``.
        json_field: the JSON key holding the text (default ``"text"``).

    Returns:
        An iterator (files are read lazily, so large corpora are streamed).

    Raises:
        DataError: immediately for a missing path or a directory without text
            files; while iterating for undecodable files, bad JSON lines, a
            missing field, or when no non-whitespace document was found.
    """
    files = _resolve_input_files(paths)
    return _iter_documents(files, json_field or "text")


def paragraph_documents(documents: Iterable[Document]) -> Iterator[Document]:
    """Cut each plain-text document at blank lines: one document per paragraph.

    For a corpus that is one long file (a play, a book), so that it can be split into train and
    validation documents; JSON-lines documents (``name`` ends in ``:LINE``) pass through whole.
    """
    import re

    for doc in documents:
        if re.search(r":\d+$", doc.name):
            yield doc
            continue
        for i, part in enumerate(re.split(r"\n[ \t]*\n", doc.text)):
            if part.strip():
                yield Document(name=f"{doc.name}#{i}", text=part.strip("\n") + "\n")


def corpus_documents(
    inputs: Optional[Sequence[PathLike]] = None,
    json_field: str = "text",
    split_paragraphs: bool = False,
    valid_fraction: float = 0.1,
    max_bytes: Optional[int] = None,
) -> Tuple[List[Document], List[Document], str]:
    """(train documents, held-out documents, a line saying where they came from) for
    `twist prepare-data`: the user's files (every k-th document held out, k = round(1 / fraction)),
    or the Python standard library's sources (its fixed held-out modules)."""
    if not inputs:
        return (
            stdlib_documents("train", max_bytes=max_bytes),
            stdlib_documents("valid", max_bytes=None),
            "python standard library",
        )
    docs = text_documents(inputs, json_field=json_field)
    if split_paragraphs:
        docs = paragraph_documents(docs)
    train, valid = split_documents(list(docs), valid_fraction)
    return train, valid, f"{len(inputs)} input path(s)"


def split_documents(docs: List[Document], valid_fraction: float) -> Tuple[List[Document], List[Document]]:
    """Deterministic split: every k-th document goes to validation."""
    if not 0 < valid_fraction < 1:
        raise DataError(f"--valid-fraction must lie in (0, 1), got {valid_fraction}")
    if len(docs) < 2:
        raise DataError(
            f"need at least 2 documents to make a train/validation split, the input has {len(docs)}; "
            "pass more text (each file is a document; with --split-paragraphs each paragraph is one)"
        )
    every = max(2, round(1 / valid_fraction))
    valid = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, valid
