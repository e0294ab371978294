"""Megatron GPTDataset samples from a prepared directory, alone and on 2 gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_twist.data import (
    DataError,
    Document,
    SentencePieceTokenizer,
    build_gpt_dataset,
    load_token_stream,
    prepare_data,
    train_sentencepiece,
)

SEQ = 32
NUM_SAMPLES = 40


def _documents_of(prefix):
    """Token ids of every document of an IndexedDataset, as int64 arrays."""
    dataset = IndexedDataset(prefix)
    docs = [numpy.asarray(dataset[i], dtype=numpy.int64) for i in range(len(dataset))]
    del dataset
    return docs


def _occurs_in(needle, haystack):
    """Whether int array ``needle`` is a contiguous run of ``haystack``."""
    n = len(needle)
    if n == 0:
        return True
    if n > len(haystack):
        return False
    windows = numpy.lib.stride_tricks.sliding_window_view(haystack, n)
    return bool((windows == needle).all(axis=1).any())


def _is_window_of_packed_documents(window, docs, eod):
    """``window`` = tail of one document, whole documents, head of one document.

    That is exactly what a GPT sample over eod-separated, back-to-back
    documents must look like; a sample stitched from random tokens or with
    an off-by-one offset fails it.
    """
    cuts = numpy.flatnonzero(window == eod) + 1
    pieces = numpy.split(window, cuts)
    if len(pieces) == 1:  # inside a single document
        return any(_occurs_in(window, d) for d in docs)
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    doc_set = {d.tobytes() for d in docs}
    return (
        any(len(d) >= len(first) and numpy.array_equal(d[len(d) - len(first) :], first) for d in docs)
        and all(p.tobytes() in doc_set for p in middle)
        and any(numpy.array_equal(d[: len(last)], last) for d in docs)
    )


def _samples(dataset, n):
    return [dataset[i] for i in range(n)]


def test_samples_are_megatron_gpt_samples(prepared, tmp_path):
    dataset = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=7, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) >= NUM_SAMPLES
    docs = _documents_of(prepared.prefix("train"))
    eod = prepared.eod_id
    for sample in _samples(dataset, NUM_SAMPLES):
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        for value in sample.values():
            assert isinstance(value, torch.Tensor) and value.shape == (SEQ,)
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.dtype == labels.dtype == torch.int64
        assert torch.equal(labels[:-1], tokens[1:])  # labels are the next tokens
        assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert int(tokens.min()) >= 0 and int(tokens.max()) < prepared.vocab_size
        window = torch.cat([tokens, labels[-1:]]).numpy()
        assert _is_window_of_packed_documents(window, docs, eod)
    # Megatron wrote its index cache where we asked, keyed by the data's fingerprint.
    cached = os.listdir(tmp_path / "cache" / prepared.fingerprint)
    assert any(name.endswith("shuffle_index.npy") for name in cached)


def test_same_seed_same_samples_other_seed_other_order(prepared, tmp_path):
    # Separate caches: the second build recomputes rather than reloading the first.
    a = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=3, cache_dir=str(tmp_path / "a"))
    b = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=3, cache_dir=str(tmp_path / "b"))
    c = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=4, cache_dir=str(tmp_path / "c"))
    a_tokens = torch.stack([s["tokens"] for s in _samples(a, NUM_SAMPLES)])
    b_tokens = torch.stack([s["tokens"] for s in _samples(b, NUM_SAMPLES)])
    c_tokens = torch.stack([s["tokens"] for s in _samples(c, NUM_SAMPLES)])
    assert torch.equal(a_tokens, b_tokens)
    assert not torch.equal(a_tokens, c_tokens)
    # Reloading from the cache gives the same samples too.
    again = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=3, cache_dir=str(tmp_path / "a"))
    assert torch.equal(torch.stack([s["tokens"] for s in _samples(again, NUM_SAMPLES)]), a_tokens)


def test_more_samples_than_one_epoch(prepared, tmp_path):
    per_epoch = prepared.splits["train"].tokens // SEQ
    dataset = build_gpt_dataset(prepared.data_dir, SEQ, 2 * per_epoch + 5, seed=1, cache_dir=str(tmp_path))
    assert len(dataset) >= 2 * per_epoch + 5
    last = dataset[len(dataset) - 1]
    assert torch.equal(last["labels"][:-1], last["tokens"][1:])


def test_too_short_data_raises(prepared, tmp_path):
    tiny = prepare_data(
        str(tmp_path / "tiny"),
        [Document("t", "x = 1\n")],
        [Document("v", "y = 2\n")],
        tokenizer_model=prepared.tokenizer_path,
        progress=False,
    )
    n = tiny.splits["train"].tokens
    with pytest.raises(DataError, match=f"has {n} tokens, fewer than"):
        build_gpt_dataset(tiny.data_dir, seq_length=n, num_samples=1, seed=0)
    # Exactly seq_length + 1 tokens is enough for one sample.
    assert len(build_gpt_dataset(tiny.data_dir, seq_length=n - 1, num_samples=1, seed=0)) >= 1


def test_dataset_refuses_a_foreign_tokenizer_and_bad_sizes(prepared, small_docs, tmp_path):
    other = SentencePieceTokenizer(train_sentencepiece(small_docs[0], str(tmp_path / "other"), 450))
    with pytest.raises(DataError, match="sha256"):
        build_gpt_dataset(prepared.data_dir, SEQ, 4, seed=0, tokenizer=other, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="seq_length"):
        build_gpt_dataset(prepared.data_dir, 0, 4, seed=0, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="prepare-data"):
        build_gpt_dataset(str(tmp_path / "nowhere"), SEQ, 4, seed=0)


def test_token_stream_is_documents_in_order(prepared, small_docs):
    _, valid = small_docs
    tok = SentencePieceTokenizer(prepared.tokenizer_path)
    expected = [t for doc in valid for t in tok.tokenize(doc.text) + [tok.eod]]
    stream = load_token_stream(prepared.data_dir, "valid")
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert stream.tolist() == expected
    assert len(load_token_stream(prepared.data_dir, "train")) == prepared.splits["train"].tokens


# ---------------------------------------------------------------- two gloo ranks

# Run as a separate script (not a pickled test function) so the ranks do not
# depend on how pytest imported this module (the project uses importlib mode).
_WORKER = r"""
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from megatron_twist.data import build_gpt_dataset

data_dir, cache_dir, out_dir, seq, num_samples, seed = sys.argv[1:7]
seq, num_samples, seed = int(seq), int(num_samples), int(seed)
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # env:// rendezvous
try:
    rank = dist.get_rank()
    dataset = build_gpt_dataset(data_dir, seq, num_samples, seed=seed, cache_dir=cache_dir)
    samples = [dataset[i] for i in range(num_samples)]
    torch.save(
        {
            "len": len(dataset),
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
finally:
    dist.destroy_process_group()
"""


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(script, args, log_dir, timeout_s=120):
    """Run ranks 0 and 1 of a gloo group on 127.0.0.1; fail with their logs if either fails."""
    port = _free_port()
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs, logs = [], []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p),
        )
        # Logs go to files, not pipes: a rank blocked on a full pipe would hang the group.
        logs.append(os.path.join(log_dir, f"rank{rank}.log"))
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-W", "ignore", script, *map(str, args)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-rank gloo run did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode:
            with open(log) as f:
                failed.append(f"rank {rank} exited with {proc.returncode}:\n{f.read()[-3000:]}")
    assert not failed, "\n\n".join(failed)


@pytest.mark.multiprocess
def test_two_gloo_ranks_get_identical_samples(prepared, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cache_dir = tmp_path / "cache"  # empty: rank 0 must build it, rank 1 must load it
    _run_two_ranks(str(script), [prepared.data_dir, cache_dir, tmp_path, SEQ, NUM_SAMPLES, 11], tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0["len"] == rank1["len"] >= NUM_SAMPLES
    assert torch.equal(rank0["tokens"], rank1["tokens"])
    assert torch.equal(rank0["labels"], rank1["labels"])
    # Exactly one index cache was written (rank 1 reused rank 0's).
    assert len([n for n in os.listdir(cache_dir / prepared.fingerprint) if n.endswith(".npy")]) == 3
    # And it is the same dataset a single process builds with that seed.
    single = build_gpt_dataset(prepared.data_dir, SEQ, NUM_SAMPLES, seed=11, cache_dir=str(tmp_path / "single"))
    assert torch.equal(torch.stack([s["tokens"] for s in _samples(single, NUM_SAMPLES)]), rank0["tokens"])
