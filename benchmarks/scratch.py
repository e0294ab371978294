"""From scratch over training length and compute (issue #15 items 1-3, 5): the gaps that decide TwIST.

    python benchmarks/scratch.py [--corpus PATH] [--lengths 120 400 1000] [--seeds 1 2 3] [--out runs/bench-scratch]
    python benchmarks/scratch.py --variant nopin@400,1000='--no-twist-pin-cut'   # a TwIST variant at L = 400 and 1000
    python benchmarks/scratch.py --smoke      # seconds-long version (CI): tiny model, few steps

At each length L (optimizer steps of the full dense model), every model trains on one corpus (default:
the Python standard library; --corpus: a text file, a folder or a `twist prepare-data` directory) with
the same ranks, micro batch, sequence length, learning rate and data-order seed:
  dense       the full dense model, L steps (the reference; also pruned without retraining, magnitude
              and activation-aware, at the cut size);
  twist       TwIST (2 subnets at kappa 0.5), L steps: the same tokens; central model and its cut;
  twist-flops TwIST for L x r steps, r = training FLOPs per token of the full model / of a subnet: the
              same training FLOPs as `dense` (TwIST's steps are cheaper, so it sees more tokens);
  small       a dense model of the cut's size from scratch, L steps (same tokens) and L x r steps
              (same FLOPs: its FLOPs per token are a subnet's);
  VARIANT     each --variant NAME[@L,L]=FLAGS: TwIST with extra `twist train` flags (they may override
              any: `--num-subnets 1 --keep-ratio 1.0 --micro-batch-size 4` is a dense variant), L steps,
              at the lengths after @ (default: --variant-lengths, else every length); with
              --variant-budget flops (or both) also for L x r steps, as `twist-NAME-flops`.
Seeds: every length runs the first --seeds value; the lengths in --all-seeds-at (default: the longest)
run every seed (mean and [min-max]). Prints per length the gaps (cut vs the best pruning, cut vs small
at the same tokens and at the same FLOPs, central vs dense), each model's wall-clock, and whether the
full dense model beats the small one ("regime where size matters"); writes OUT/scratch.json and
OUT/scratch.png (the gaps against L).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    flops_per_token,
    is_prepared,
    merge_seeds,
    model_flags,
    parse_variants,
    prepare_corpus,
    prepare_out,
    save_plot,
    show,
    train,
    user_documents,
)
from continued import LR, MODELS, SMOKE_LR  # noqa: E402  (the continued-training benchmark's model and lr)
from quality import SMOKE  # noqa: E402

sys.path.insert(0, str(REPO))
KAPPA = 0.5
DENSE = ["--num-subnets", "1", "--keep-ratio", "1.0"]
TWIST = ["--num-subnets", "2", "--keep-ratio", str(KAPPA)]


def data_dir(args, out: Path) -> Path:
    if is_prepared(args.corpus):
        return Path(args.corpus)
    if args.corpus:
        docs = user_documents(args.corpus, max_bytes=args.corpus_bytes)
    else:
        from megatron_twist.data import stdlib_documents

        docs = (
            stdlib_documents("train", max_bytes=args.corpus_bytes),
            stdlib_documents("valid", max_bytes=150_000 if args.smoke else None),
        )
    return prepare_corpus(out / "data", docs, args.vocab, str(args.corpus or "stdlib"))


def timed(args, name, data, out, flags, steps) -> float:
    """Train (or reuse) one model; its wall-clock seconds (None when reused)."""
    t0 = time.perf_counter()
    reused = (out / name / "meta.json").is_file() and not args.retrain
    train("scratch", name, data, out, flags, args, steps)
    return None if reused else round(time.perf_counter() - t0, 1)


def run_one(args, data: Path, length: int, out: Path) -> Dict:
    m, r = args.model, args.flops_ratio
    long = max(length, round(length * r))
    wall = {
        "dense": timed(args, "dense", data, out, [*model_flags(m), *DENSE], length),
        "twist": timed(args, "twist", data, out, [*model_flags(m), *TWIST], length),
        "twist_flops": timed(args, "twist-flops", data, out, [*model_flags(m), *TWIST], long),
        "small": timed(args, "small", data, out, [*model_flags(m, KAPPA), *DENSE], length),
        "small_flops": timed(args, "small-flops", data, out, [*model_flags(m, KAPPA), *DENSE], long),
    }
    variants = [n for n in args.variants if length in args.variant_at[n]]
    for name in variants:
        flags = [*model_flags(m), *TWIST, *args.variants[name]]
        for budget in variant_budgets(args):
            arm = variant_checkpoint(name, budget)
            wall[arm.replace("-", "_")] = timed(args, arm, data, out, flags, length if budget == "tokens" else long)
    res = evaluate(args, data, out, variants)
    res["wall_s"] = wall
    res["steps"] = {"equal_tokens": length, "equal_flops": long}
    return res


def variant_budgets(args) -> Tuple[str, ...]:
    """The budgets every --variant trains at: "tokens" (L steps), "flops" (L x r steps) or both."""
    return ("tokens", "flops") if args.variant_budget == "both" else (args.variant_budget,)


def variant_checkpoint(name: str, budget: str) -> str:
    return f"twist-{name}" if budget == "tokens" else f"twist-{name}-flops"


def variant_rows(args, variants: List[str]) -> List[Tuple[str, str]]:
    """(result key, label) of the variants' rows: each trained checkpoint's central model and cut."""
    checkpoints = [variant_checkpoint(v, b) for v in variants for b in variant_budgets(args)]
    return [
        (f"{c.replace('-', '_')}_{w}", f"variant {c.removeprefix('twist-')}: {w}")
        for c in checkpoints
        for w in ("central", "cut")
    ]


def variant_gaps(r: Dict, name: str) -> Dict[str, float]:
    """A variant's gaps, like :func:`gaps` for the default arms, at the budgets it was trained at."""
    p = {k: v["perplexity"] for k, v in r.items() if isinstance(v, dict) and "perplexity" in v}
    res = {}
    for suffix, budget, small in (("", "equal_tokens", "small"), ("_flops", "equal_flops", "small_flops")):
        if f"twist_{name}{suffix}_cut" in p:
            res[f"cut_vs_small_{budget}"] = p[f"twist_{name}{suffix}_cut"] / p[small] - 1
            res[f"central_vs_dense_{budget}"] = p[f"twist_{name}{suffix}_central"] / p["dense"] - 1
    return res


def evaluate(args, data: Path, out: Path, variants: List[str]) -> Dict:
    from pruning import Pruner, calibration

    from megatron_twist.checkpoint.models import load_central
    from megatron_twist.data import load_token_stream
    from megatron_twist.evaluation import perplexity
    from megatron_twist.twist.extraction import cut_model, select_plan

    tokens, seq = load_token_stream(str(data), "valid"), args.model["seq_length"]

    def ppl(module):
        return {"perplexity": perplexity(module, tokens, seq, max_tokens=args.eval_tokens)["perplexity"]}

    def cut(name):
        c, cfg, _ = load_central(str(out / name))
        return ppl(c.module), ppl(cut_model(c.config, cfg, c.params, select_plan(c.config, cfg, c.params, KAPPA))[0])

    dense, _, _ = load_central(str(out / "dense"))
    pruner = Pruner(dense, calibration(data, args.calib_sequences, seq))
    res = {"dense": ppl(dense.module)}
    res["prune_magnitude"] = ppl(pruner.prune(KAPPA, "magnitude")[0])
    res["prune_activation"] = ppl(pruner.prune(KAPPA, "activation")[0])
    trained = [variant_checkpoint(v, b) for v in variants for b in variant_budgets(args)]
    for name in ("twist", "twist-flops", *trained):
        key = name.replace("-", "_")
        res[f"{key}_central"], res[f"{key}_cut"] = cut(name)
    res["small"] = ppl(load_central(str(out / "small"))[0].module)
    res["small_flops"] = ppl(load_central(str(out / "small-flops"))[0].module)
    return res


def gaps(r: Dict) -> Dict[str, float]:
    best_prune = min(r["prune_magnitude"]["perplexity"], r["prune_activation"]["perplexity"])
    p = {k: v["perplexity"] for k, v in r.items() if isinstance(v, dict) and "perplexity" in v}
    return {
        "cut_vs_best_pruning": p["twist_cut"] / best_prune - 1,
        "cut_vs_small_equal_tokens": p["twist_cut"] / p["small"] - 1,
        "cut_vs_small_equal_flops": p["twist_flops_cut"] / p["small_flops"] - 1,
        "central_vs_dense_equal_tokens": p["twist_central"] / p["dense"] - 1,
        "central_vs_dense_equal_flops": p["twist_flops_central"] / p["dense"] - 1,
    }


ROWS = (
    ("dense", "dense full (L steps)"),
    ("prune_magnitude", "  + magnitude pruning, no retraining"),
    ("prune_activation", "  + activation-aware pruning, no retraining"),
    ("twist_central", "TwIST central (L steps: same tokens)"),
    ("twist_cut", "TwIST cut (same tokens)"),
    ("twist_flops_central", "TwIST central (L x r steps: same FLOPs)"),
    ("twist_flops_cut", "TwIST cut (same FLOPs)"),
    ("small", "small dense from scratch (same tokens)"),
    ("small_flops", "small dense from scratch (same FLOPs)"),
)


def report(results: List[Dict], args) -> None:
    out = Path(args.out)
    for res in results:
        n = len(res.get("seeds", [1]))
        print(
            f"\n== L = {res['length']} steps ({res['steps']['equal_flops']} at equal FLOPs), kappa {KAPPA}, "
            f"{res['tokens']:,} tokens at L{f', mean [min-max] of {n} seeds' if n > 1 else ''} =="
        )
        rows = list(ROWS) + variant_rows(args, res["variants"])
        for key, label in rows:
            wall = res["wall_s"].get(key.replace("_central", "").replace("_cut", ""))
            print(f"  {label:<48s} {show(res[key]):>24s}" + (f"   ({wall:.0f} s)" if wall else ""))
        print("  gaps: " + ", ".join(f"{k} {v:+.1%}" for k, v in res["gaps"].items()))
        for v, g in res.get("variant_gaps", {}).items():
            print(f"  variant {v}: " + ", ".join(f"{k} {x:+.1%}" for k, x in g.items()))
        print(f"  regime where size matters: {'yes' if res['size_matters'] else 'no'}")
    (out / "scratch.json").write_text(json.dumps({"results": results, "flops_ratio": args.flops_ratio}, indent=1))

    def draw(plt):
        if len(results) == 1:  # one length: no curve to draw, so each arm's perplexity with its seed range
            return draw_arms(plt, results[0], args)
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [r["length"] for r in results]
        for key in results[0]["gaps"]:
            ax.plot(xs, [100 * r["gaps"][key] for r in results], marker="o", label=key.replace("_", " "))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training length L (steps of the dense model)")
        ax.set_ylabel("perplexity gap, % (below 0: TwIST better)")
        ax.set_title(f"from scratch, kappa {KAPPA}")
        ax.legend(fontsize=7)
        return fig

    save_plot(out / "scratch.png", out / "scratch.json", draw)


def draw_arms(plt, res: Dict, args):
    """One length's plot: every arm's held-out perplexity (the mean, the seed range as an error bar)."""
    extra = [k for k, _ in variant_rows(args, res["variants"])]
    keys = [k for k, _ in ROWS] + extra
    labels = [label.strip(" +") for _, label in ROWS] + [k.removeprefix("twist_").replace("_", " ") for k in extra]
    ys = [res[k]["perplexity"] for k in keys]
    spans = [res[k].get("perplexity_spread") or {"min": y, "max": y} for k, y in zip(keys, ys)]
    err = [[y - s["min"] for y, s in zip(ys, spans)], [s["max"] - y for y, s in zip(ys, spans)]]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(keys) + 1.2))
    ax.barh(range(len(keys)), ys, xerr=err, color=["C1" if k.startswith("twist") else "C0" for k in keys])
    ax.set_yticks(range(len(keys)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(res["dense"]["perplexity"], color="k", lw=0.8, ls="--")
    n = len(res.get("seeds", [1]))
    ax.set_xlabel(f"held-out perplexity (mean{f' and range of {n} seeds' if n > 1 else ''}; dashed: dense full)")
    ax.set_title(f"from scratch, L = {res['length']}, kappa {KAPPA}")
    fig.tight_layout()
    return fig


def main() -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="text file, folder or prepared dir (default: stdlib)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="cap on the training text")
    p.add_argument("--lengths", nargs="+", type=int, default=[120, 400, 1000])
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--all-seeds-at", nargs="*", type=int, default=None, help="lengths run with every seed")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    p.add_argument("--variant-lengths", nargs="+", type=int, default=None, help="default: every length")
    p.add_argument(
        "--variant-budget",
        choices=("tokens", "flops", "both"),
        default="tokens",
        help="train each --variant for L steps (tokens: the same tokens as dense), L x r steps (flops: the "
        "same training FLOPs; the arm is twist-NAME-flops) or both",
    )
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="base",
        help="base: RESULTS.md's model; quick: a third of its FLOPs per token (quality_set.sh)",
    )
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate of every model (default {LR})")
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--calib-sequences", type=int, default=128)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--out", default="runs/bench-scratch")
    p.add_argument("--smoke", action="store_true", help="seconds-long version: tiny model, few steps (CI)")
    args = p.parse_args()
    args.model = SMOKE if args.smoke else MODELS[args.model]
    if args.lr is None:
        args.lr = SMOKE_LR if args.smoke else LR
    if args.smoke:
        args.lengths, args.nproc, args.micro_batch, args.local_steps, args.vocab = [4], 1, 2, 2, 512
        args.corpus_bytes, args.eval_tokens, args.calib_sequences = 60_000, 2048, 8
    args.variants, args.variant_at = parse_variants(p, args.variant, args.variant_lengths or args.lengths)
    all_seeds = set(args.all_seeds_at if args.all_seeds_at is not None else [max(args.lengths)])
    args.flops_ratio = flops_per_token(args.model, args.vocab) / flops_per_token(args.model, args.vocab, KAPPA)
    prepare_out(args.out)  # before any work: a user's own folder is refused
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown

    t0, out = time.perf_counter(), Path(args.out)
    print(f"[scratch] FLOPs per token, full / kappa-{KAPPA} subnet: r = {args.flops_ratio:.3f}", flush=True)
    init_distributed()  # this process prepares, prunes and evaluates: a single-rank group in memory
    results = []
    try:
        init_model_parallel()
        data = data_dir(args, out)
        for length in args.lengths:
            runs = []
            for seed in args.seeds if length in all_seeds else args.seeds[:1]:
                args.seed = seed
                runs.append(run_one(args, data, length, out / f"L{length}" / f"seed-{seed}"))
            res = merge_seeds(runs)
            res["seeds"] = [r for r in (args.seeds if length in all_seeds else args.seeds[:1])]
            res["wall_s"] = runs[0]["wall_s"]
            res["gaps"] = gaps(res)
            res["gaps_per_seed"] = [gaps(r) for r in runs]
            res["variants"] = [n for n in args.variants if length in args.variant_at[n]]
            res["variant_gaps"] = {v: variant_gaps(res, v) for v in res["variants"]}
            res["length"], res["tokens"] = length, length * args.micro_batch * args.nproc * args.model["seq_length"]
            res["size_matters"] = res["dense"]["perplexity"] < res["small"]["perplexity"]
            results.append(res)
            print(f"[scratch] L={length}: " + ", ".join(f"{k} {v:+.1%}" for k, v in res["gaps"].items()), flush=True)
    finally:
        shutdown()
    report(results, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
