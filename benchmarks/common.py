"""Helpers shared by the benchmark scripts (each script's own directory is on sys.path when run)."""

from __future__ import annotations

import math
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident set, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def prepare_out(path, worker: bool = False) -> Path:
    """The benchmark's --out folder: new, empty, or one a benchmark made (marked); a user's own
    non-empty folder is refused before any work (SystemExit naming the fix), never written into.
    Worker processes get the folder their parent already claimed."""
    from megatron_twist.outputs import OutputError, check_output, claim_directory

    out = Path(path)
    if worker:
        return out
    try:
        check_output(out, ("benchmark",), "--out", overwrite_flag=None)
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None
    return claim_directory(out, "benchmark")


# ---------------------------------------------------------------- runs of the `twist` command
def bench_env() -> dict:
    """The environment of a `twist` subprocess: one thread, loopback, no rank variables leaked."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    for leaked in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(leaked, None)
    return env


def model_flags(model: dict, kappa: float = 1.0) -> List[str]:
    """`twist train` flags of ``model`` (a benchmark's size dict) with heads and neurons scaled by kappa."""
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    return [
        *("--num-layers", str(model["num_layers"]), "--hidden-size", str(model["hidden_size"])),
        *("--num-attention-heads", str(int(model["num_attention_heads"] * kappa))),
        *("--num-query-groups", str(model["num_query_groups"]), "--kv-channels", str(head_dim)),
        *("--ffn-hidden-size", str(int(model["ffn_hidden_size"] * kappa)), "--seq-length", str(model["seq_length"])),
    ]


def twist_command(nproc: int = 1) -> List[str]:
    """`python -m megatron_twist` in one process, or under torchrun with ``nproc`` ranks on 127.0.0.1."""
    if nproc == 1:
        return [sys.executable, "-m", "megatron_twist"]
    return [
        *(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"),
        *(f"--master_port={free_port()}", "-m", "megatron_twist"),
    ]


def run_twist(argv: List[str], what: str, nproc: int = 1, in_process: bool = False) -> str:
    """Run one `twist` command (SystemExit with its output's tail if it fails); returns its stdout.
    ``in_process`` (--smoke, one rank): through the command's own entry point in this process, see
    run_twist_in_process."""
    if in_process and nproc == 1:
        return run_twist_in_process(argv, what)
    proc = subprocess.run(
        [*twist_command(nproc), *map(str, argv)], cwd=REPO, env=bench_env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_twist_in_process(argv: List[str], what: str) -> str:
    """One `twist` command through ``megatron_twist.cli.main`` (what `python -m megatron_twist` runs, and
    which creates and destroys its process group) in this process: a smoke's dozen short runs pay the
    seconds of importing torch and Megatron-core once instead of once each. The full runs start a
    process per command (torchrun for two ranks)."""
    import contextlib
    import io
    import random

    import numpy
    import torch

    from megatron_twist.cli import main
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown

    # As in a process of its own: the command creates and destroys its own process group and seeds its
    # own RNGs; this process's one-rank group (it prepares, prunes, evaluates) and random streams resume.
    rng = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    shutdown()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([str(a) for a in argv])
    finally:
        init_distributed()
        init_model_parallel()
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        numpy.random.set_state(rng[2])
    if status:
        raise SystemExit(f"{what} failed (status {status}):\n{out.getvalue()[-2000:]}\n{err.getvalue()[-4000:]}")
    return out.getvalue()


def train(tag: str, name: str, data: Path, out: Path, flags: List[str], args, steps: Optional[int] = None) -> Path:
    """One `twist train` run on ``data`` (``args``: steps, nproc, micro_batch, lr, local_steps, retrain,
    seed); a finished checkpoint is reused unless --retrain. Returns the checkpoint."""
    ckpt = out / name
    if (ckpt / "meta.json").is_file() and not args.retrain:
        print(f"[{tag}] {name}: reusing {ckpt}", flush=True)
        return ckpt
    steps = args.steps if steps is None else steps
    argv = [
        *("train", "--data-path", data, "--train-iters", steps, "--micro-batch-size", args.micro_batch),
        *("--lr", args.lr, "--local-steps", args.local_steps, "--log-interval", max(1, steps // 4)),
        *("--seed", getattr(args, "seed", 1234), *flags, "--save", ckpt),
    ]
    if args.retrain and ckpt.exists():
        argv.append("--overwrite")
    t0 = time.perf_counter()
    print(f"[{tag}] {name}: training ({steps} steps) ...", flush=True)
    run_twist(argv, name, args.nproc, in_process=getattr(args, "smoke", False))
    print(f"[{tag}] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt


# ---------------------------------------------------------------- a user's corpus (issue #15 item 8)
def is_prepared(path) -> bool:
    return path is not None and (Path(path) / "manifest.json").is_file()


def user_documents(path, valid_fraction: float = 0.1, max_bytes: Optional[int] = None):
    """(train, held-out) documents of a text file or folder (as `twist prepare-data PATH`: each file a
    document, every 10th held out; a single file, or fewer than 20, split into paragraphs), or of a prepared
    directory (its token streams decoded with its own tokenizer, its own split kept)."""
    from megatron_twist.data import text_documents
    from megatron_twist.data.corpus import paragraph_documents, split_documents

    p = Path(path)
    if is_prepared(p):
        return prepared_documents(p)
    if not p.exists():
        raise SystemExit(f"error: corpus {p} does not exist (a text file, a folder or a `twist prepare-data` dir)")
    docs = list(text_documents(str(p)))
    if p.is_file() or len(docs) < 20:  # too few files for a held-out split: their paragraphs
        docs = list(paragraph_documents(docs))
    if max_bytes is not None:
        kept, total = [], 0
        for d in docs:
            total += len(d.text.encode("utf-8"))
            if total > max_bytes and kept:
                break
            kept.append(d)
        docs = kept
    return split_documents(docs, valid_fraction)


def prepared_documents(path: Path):
    """A prepared directory back to text: each split's token stream cut at end-of-document, decoded."""
    from megatron_twist.data import load_manifest, load_token_stream
    from megatron_twist.data.corpus import Document
    from megatron_twist.data.hf_tokenizer import open_tokenizer

    tok = open_tokenizer(load_manifest(str(path)).tokenizer_path)
    splits = []
    for split in ("train", "valid"):
        ids, docs, start = load_token_stream(str(path), split).tolist(), [], 0
        for i, t in enumerate(ids + [tok.eod]):
            if t == tok.eod:
                if i > start:
                    docs.append(Document(name=f"{path}:{split}:{len(docs)}", text=tok.detokenize(ids[start:i])))
                start = i + 1
        splits.append(docs)
    return splits[0], splits[1]


def prepare_corpus(data: Path, docs, vocab: int, source: str, tokenizer: Optional[Path] = None) -> Path:
    """``data`` made from (train, held-out) documents, with a new tokenizer of ``vocab`` pieces or the
    given one (a sentencepiece .model or a HF tokenizer directory); kept if already complete."""
    from megatron_twist.data import prepare_data

    if not is_prepared(data):
        kw = {}
        if tokenizer is not None:
            kw = {"hf_tokenizer": str(tokenizer)} if Path(tokenizer).is_dir() else {"tokenizer_model": str(tokenizer)}
        prepare_data(str(data), docs[0], docs[1], vocab_size=None if kw else vocab, progress=False, source=source, **kw)
    return data


# ---------------------------------------------------------------- seeds and the size check
def spread(values: List[float]) -> dict:
    """mean, std (population), min, max and n of one figure over seeds."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def merge_seeds(runs: List[dict]):
    """One result from per-seed results of the same shape: every {"perplexity": ...} entry gets the
    mean as "perplexity" and the per-seed values and spread as "perplexity_seeds" / "perplexity_spread";
    lists are concatenated; other values are taken from the first seed."""
    first = runs[0]
    if isinstance(first, dict):
        if "perplexity" in first:
            values = [r["perplexity"] for r in runs]
            s = spread(values)
            return {**first, "perplexity": s["mean"], "perplexity_seeds": values, "perplexity_spread": s}
        return {k: merge_seeds([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        return [x for r in runs for x in r]
    return first


def show(entry: dict) -> str:
    """A perplexity with its spread over seeds when there are several: '41.20 [40.1-42.3]'."""
    s = entry.get("perplexity_spread")
    if not s or s["n"] < 2:
        return f"{entry['perplexity']:.2f}"
    return f"{entry['perplexity']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def size_matters(full: dict, smaller: Dict[str, dict]) -> dict:
    """Issue #15 item 2: does the full dense model beat every smaller dense model on the same tokens?"""
    worst = min(smaller, key=lambda k: smaller[k]["perplexity"])
    ok = all(full["perplexity"] < v["perplexity"] for v in smaller.values())
    return {
        "size_matters": ok,
        "full_perplexity": full["perplexity"],
        "best_smaller_kappa": worst,
        "best_smaller_perplexity": smaller[worst]["perplexity"],
    }


# ---------------------------------------------------------------- plots
def save_plot(png: Path, data: Path, draw: Callable) -> None:
    """``draw(plt)`` makes a figure and returns it; saved as ``png`` (dpi 120), or only a note when
    matplotlib is missing (the JSON at ``data`` holds every figure either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\ndata: {data} (matplotlib missing: no plot)")
        return
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nplot: {png}; data: {data}")


# ---------------------------------------------------------------- extra arms
def parse_variants(parser, specs: List[str], default_lengths: List[int]) -> Tuple[dict, dict]:
    """``--variant NAME[@L,L]=FLAGS`` values -> ({name: [flags]}, {name: [lengths]}); a bad one is a
    usage error naming the form."""
    flags, lengths = {}, {}
    for v in specs:
        name, sep, rest = v.partition("=")
        name, _, at = name.partition("@")
        if not sep or not name.isidentifier() or not all(x.isdigit() for x in at.split(",") if at):
            parser.error(
                f"--variant {v!r}: expected NAME[@L,L]=FLAGS, NAME a plain word, e.g. nopin='--no-twist-pin-cut'"
            )
        flags[name] = shlex.split(rest)
        lengths[name] = [int(x) for x in at.split(",")] if at else list(default_lengths)
    return flags, lengths


# ---------------------------------------------------------------- compute
def flops_per_token(m: dict, vocab: int, kappa: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 per multiply-add) of a Llama-style
    model with its heads and neurons scaled by kappa: its matrix multiplies, the attention scores
    and the output layer; the embedding lookup is free."""
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    heads, ffn = m["num_attention_heads"] * kappa, m["ffn_hidden_size"] * kappa
    qkv = m["hidden_size"] * (heads + 2 * m["num_query_groups"]) * head_dim
    proj = heads * head_dim * m["hidden_size"]
    mlp = 3 * m["hidden_size"] * ffn  # gate, up, down
    scores = 2 * m["seq_length"] * heads * head_dim  # QK^T and AV
    per_layer = 2 * (qkv + proj + mlp) + 2 * scores
    return 3 * (m["num_layers"] * per_layer + 2 * m["hidden_size"] * vocab)
