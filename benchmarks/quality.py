"""Quality of the cut-out model against post-training pruning and a small dense model, same tokens.

    python benchmarks/quality.py [--corpora stdlib shakespeare] [--steps 120] [--out runs/bench-quality]
    python benchmarks/quality.py --smoke      # seconds-long version (CI): tiny model, few steps

For each corpus (the standard-library corpus of the main job; tinyshakespeare, if its file is
found: --shakespeare PATH, default ../shared/data/tinyshakespeare.txt) every model is trained on
the same tokens (same steps, ranks, micro batch, sequence length, data order seed) and evaluated
on the same held-out tokens (`twist eval`'s windows):
  a. TwIST (2 subnets at kappa 0.5 on 2 ranks), cut at kappa 0.25 / 0.5 / 0.75 (magnitude, zero cost);
  b. the dense model trained normally, then structured magnitude pruning of heads and neurons to
     the same sizes (the same weight-only score as (a)'s cut), no calibration;
  c. the same dense model pruned with an activation-aware structured score (Wanda-style:
     |W| x ||X|| per unit, from 128 calibration sequences of the training split), no retraining;
  d. a dense model of the cut-out size trained from scratch (the honest control);
  e. the dense full model (reference) and TwIST's central model.
Also: perplexity spread of 10 random kappa-0.5 subnets of the TwIST model against 10 of the dense
model (the "golden ticket" claim), and TwIST with the activation-shift correction on ('rescale';
on the stdlib corpus only by default, --correction-corpora: one more training run per corpus).
TwIST is trained once, at kappa 0.5, and cut at every kappa (training per kappa would cost 2 more
runs per corpus). Writes OUT/quality.json, OUT/quality.png and prints the tables.

Issue #15: `--corpus PATH ...` adds a user's corpus (a text file, a folder, or a `twist prepare-data`
directory; `--corpora` with no name: only those); `--seeds S ...` runs every arm once per seed
(OUT/CORPUS/seed-S) and reports the mean and [min-max]; every table ends with whether the full dense
model beats every smaller dense model on the same tokens ("regime where size matters: yes/no",
also `regime` / `size_matters` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    is_prepared,
    merge_seeds,
    model_flags,
    prepare_corpus,
    prepare_out,
    show,
    size_matters,
    user_documents,
)
from common import train as run_train  # noqa: E402

sys.path.insert(0, str(REPO))
KAPPAS = (0.25, 0.5, 0.75)  # --smoke: 0.5 only
# 8 query heads in 2 KV groups: kappa 0.25 keeps 1 head per group, so every kappa is a whole cut.
FULL = dict(
    family="llama",
    num_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=704,
    seq_length=256,
)
SMOKE = dict(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=128,
    seq_length=64,
)


def train(name: str, data: Path, out: Path, flags: List[str], args) -> Path:
    return run_train("quality", name, data, out, flags, args)


def evaluate(args, corpus: str, data: Path, out: Path) -> Dict:

    from pruning import Pruner, calibration

    from megatron_twist.checkpoint.models import load_central, load_model
    from megatron_twist.data import load_token_stream
    from megatron_twist.evaluation import perplexity
    from megatron_twist.model.gpt import count_parameters
    from megatron_twist.twist.extraction import cut_model, select_plan

    tokens = load_token_stream(str(data), "valid")
    seq = args.model["seq_length"]

    def ppl(module):
        r = perplexity(module, tokens, seq, max_tokens=args.eval_tokens)
        return {"perplexity": r["perplexity"], "parameters": count_parameters(module), "tokens": r["tokens"]}

    res: Dict = {"corpus": corpus}
    twist_central, twist_cfg, _ = load_central(str(out / "twist"))
    dense_central, _, _ = load_central(str(out / "dense"))
    res["e_dense_full"] = ppl(dense_central.module)
    res["e_twist_central"] = ppl(twist_central.module)
    pruner = Pruner(dense_central, calibration(data, args.calib_sequences, seq))
    cut_cfg = pruner.cfg
    for kappa in KAPPAS:
        k = str(kappa)
        plan = select_plan(twist_central.config, twist_cfg, twist_central.params, kappa)
        res.setdefault("a_twist_cut", {})[k] = ppl(
            cut_model(twist_central.config, twist_cfg, twist_central.params, plan)[0]
        )
        res.setdefault("b_dense_magnitude", {})[k] = ppl(pruner.prune(kappa, "magnitude")[0])
        res.setdefault("c_dense_activation", {})[k] = ppl(pruner.prune(kappa, "activation")[0])
        small, _ = load_model(str(out / f"small-{kappa}"))
        res.setdefault("d_small_from_scratch", {})[k] = ppl(small)
        print(
            f"[quality] {corpus} kappa {kappa}: TwIST cut {res['a_twist_cut'][k]['perplexity']:.2f}, "
            f"magnitude {res['b_dense_magnitude'][k]['perplexity']:.2f}, activation "
            f"{res['c_dense_activation'][k]['perplexity']:.2f}, "
            f"small {res['d_small_from_scratch'][k]['perplexity']:.2f}",
            flush=True,
        )
    for label, central, cfg in (("twist", twist_central, twist_cfg), ("dense", dense_central, cut_cfg)):
        values = []
        for seed in range(args.random_subnets):
            plan = select_plan(central.config, cfg, central.params, 0.5, f"random:{seed}")
            values.append(ppl(cut_model(central.config, cfg, central.params, plan)[0])["perplexity"])
        res.setdefault("golden_ticket", {})[label] = values
    if (out / "twist-rescale" / "meta.json").is_file():
        central, cfg, _ = load_central(str(out / "twist-rescale"))
        plan = select_plan(central.config, cfg, central.params, 0.5)
        res["correction_rescale"] = {
            "central": ppl(central.module),
            "cut_0.5": ppl(cut_model(central.config, cfg, central.params, plan)[0]),
        }
    return res


def prepare(args, corpus: str, data: Path) -> Path:
    """The corpus's prepared directory: a user's prepared directory as is, else made under --out."""
    from megatron_twist.data import stdlib_documents

    if corpus in args.user_corpora and is_prepared(args.user_corpora[corpus]):
        return Path(args.user_corpora[corpus])
    if corpus == "stdlib":
        docs = (
            stdlib_documents("train", max_bytes=args.stdlib_bytes),
            stdlib_documents("valid", max_bytes=None if not args.smoke else 150_000),
        )
    elif is_prepared(data):
        docs = ([], [])  # made by an earlier run: kept
    else:  # tinyshakespeare (one file: its paragraphs) or a user's file or folder
        path = args.shakespeare if corpus == "shakespeare" else args.user_corpora[corpus]
        docs = user_documents(path, max_bytes=args.stdlib_bytes if args.smoke else None)
    return prepare_corpus(data, docs, args.vocab, corpus)


def run_seed(args, corpus: str, data: Path, out: Path) -> Dict:
    m = args.model
    train("twist", data, out, [*model_flags(m), "--num-subnets", "2", "--keep-ratio", "0.5"], args)
    train("dense", data, out, [*model_flags(m), "--num-subnets", "1", "--keep-ratio", "1.0"], args)
    for kappa in KAPPAS:
        train(f"small-{kappa}", data, out, [*model_flags(m, kappa), "--num-subnets", "1", "--keep-ratio", "1.0"], args)
    if corpus in args.correction_corpora:
        train(
            "twist-rescale",
            data,
            out,
            [*model_flags(m), "--num-subnets", "2", "--keep-ratio", "0.5", "--activation-correction", "rescale"],
            args,
        )
    return evaluate(args, corpus, data, out)


def run_corpus(args, corpus: str) -> Dict:
    """Every arm on one corpus, once per seed (one seed: OUT/CORPUS; several: OUT/CORPUS/seed-S)."""
    out = Path(args.out) / corpus
    data = prepare(args, corpus, out / "data")
    runs = []
    for seed in args.seeds:
        args.seed = seed
        runs.append(run_seed(args, corpus, data, out if len(args.seeds) == 1 else out / f"seed-{seed}"))
    res = merge_seeds(runs)
    res["seeds"] = list(args.seeds)
    res["regime"] = size_matters(res["e_dense_full"], res["d_small_from_scratch"])
    return res


def report(results: List[Dict], args) -> None:
    for r in results:
        seeds = f", mean [min-max] of seeds {r['seeds']}" if len(r["seeds"]) > 1 else ""
        print(f"\n== {r['corpus']}: held-out perplexity (parameters){seeds} ==")
        print(
            f"{'kappa':>6s} {'(a) TwIST cut':>18s} {'(b) magnitude':>18s} {'(c) activation':>18s} "
            f"{'(d) small dense':>18s} {'a vs best(b,c)':>15s} {'a vs d':>8s}"
        )
        for k in map(str, KAPPAS):
            a, b, c, d = (
                r[key][k] for key in ("a_twist_cut", "b_dense_magnitude", "c_dense_activation", "d_small_from_scratch")
            )
            best = min(b["perplexity"], c["perplexity"])
            print(
                f"{k:>6s} "
                + " ".join(f"{show(x):>9s} ({x['parameters'] / 1e6:4.2f}M)" for x in (a, b, c, d))
                + f" {a['perplexity'] / best - 1:+14.1%} {a['perplexity'] / d['perplexity'] - 1:+7.1%}"
            )
        print(
            f"(e) dense full {show(r['e_dense_full'])} ({r['e_dense_full']['parameters'] / 1e6:.2f}M), "
            f"TwIST central {show(r['e_twist_central'])}"
        )
        g = r["regime"]
        print(
            f"regime where size matters: {'yes' if g['size_matters'] else 'no'} (dense full "
            f"{g['full_perplexity']:.2f} vs the best smaller dense model, kappa {g['best_smaller_kappa']}: "
            f"{g['best_smaller_perplexity']:.2f})"
        )
        for label, values in r["golden_ticket"].items():
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            print(
                f"random kappa-0.5 subnets of the {label:5s} model: mean {mean:9.2f}, std {std:8.2f}, "
                f"min {min(values):9.2f}, max {max(values):9.2f} (n={len(values)})"
            )
        if "correction_rescale" in r:
            cr = r["correction_rescale"]
            print(
                f"correction 'rescale': central {cr['central']['perplexity']:.2f}, cut 0.5 "
                f"{cr['cut_0.5']['perplexity']:.2f} (vs 'none': {r['e_twist_central']['perplexity']:.2f}, "
                f"{r['a_twist_cut']['0.5']['perplexity']:.2f})"
            )
    out = Path(args.out)
    (out / "quality.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "steps": args.steps,
                "nproc": args.nproc,
                "micro_batch": args.micro_batch,
                "seeds": list(args.seeds),
                "size_matters": all(r["regime"]["size_matters"] for r in results),
                "results": results,
            },
            indent=1,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
        for ax, r in zip(axes[0], results):
            labels = [
                ("a_twist_cut", "TwIST cut"),
                ("b_dense_magnitude", "dense + magnitude"),
                ("c_dense_activation", "dense + activation"),
                ("d_small_from_scratch", "small dense"),
            ]
            for j, (key, label) in enumerate(labels):
                ax.bar(
                    [i + 0.2 * (j - 1.5) for i in range(len(KAPPAS))],
                    [r[key][str(k)]["perplexity"] for k in KAPPAS],
                    0.2,
                    label=label,
                )
            ax.axhline(r["e_dense_full"]["perplexity"], color="k", ls="--", lw=1, label="dense full")
            ax.set_xticks(range(len(KAPPAS)), [f"kappa {k}" for k in KAPPAS])
            ax.set_yscale("log")
            ax.set_title(r["corpus"])
            ax.set_ylabel("held-out perplexity (log)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "quality.png", dpi=120)
        print(f"\nplot: {out / 'quality.png'}; data: {out / 'quality.json'}")
    except ImportError:
        print(f"\ndata: {out / 'quality.json'} (matplotlib missing: no plot)")


def main() -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", nargs="*", default=["stdlib", "shakespeare"], choices=["stdlib", "shakespeare"])
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[1234], help="every arm once per seed (init, data order, subnets)"
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        metavar="PATH",
        help="a user's corpus as well (`--corpora` with no name: only it): a text file (its paragraphs are the "
        "documents), a folder of text files, or a `twist prepare-data` directory; named after its last component",
    )
    p.add_argument("--shakespeare", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    # 120 steps x 8 sequences x 256 tokens x 2 ranks = 491,520 tokens per model: what keeps the whole
    # benchmark set (benchmarks/run_all.sh) within one hour on 2 CPU cores.
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--stdlib-bytes", type=int, default=None, help="cap on the stdlib training text")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--calib-sequences", type=int, default=128)
    p.add_argument("--random-subnets", type=int, default=10)
    p.add_argument(
        "--correction-corpora",
        nargs="*",
        default=["stdlib"],
        choices=["stdlib", "shakespeare"],
        help="corpora on which TwIST is also trained with the 'rescale' correction (none: no such run)",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--smoke", action="store_true", help="seconds-long version: tiny model, few steps (CI)")
    args = p.parse_args()
    args.model = SMOKE if args.smoke else FULL
    if args.smoke:
        args.steps, args.nproc, args.micro_batch, args.local_steps, args.vocab = 4, 1, 2, 2, 512
        args.stdlib_bytes, args.eval_tokens, args.calib_sequences, args.random_subnets = 60_000, 2048, 8, 2
        args.correction_corpora = []
        args.corpora = ["stdlib"] if args.corpora else []
        global KAPPAS
        KAPPAS = (0.5,)
    corpora = [c for c in args.corpora if c != "shakespeare" or Path(args.shakespeare).is_file()]
    if len(corpora) < len(args.corpora):
        print(f"[quality] {args.shakespeare} not found: tinyshakespeare skipped", flush=True)
    args.user_corpora = {}
    for path in args.corpus:
        name = Path(path).resolve().name.split(".")[0] or "corpus"
        while name in corpora:
            name += "_"
        if not Path(path).exists():
            raise SystemExit(f"error: --corpus {path} does not exist")
        args.user_corpora[name] = path
        corpora.append(name)
    if not corpora:
        raise SystemExit("error: no corpus to run (pass --corpora NAME... or --corpus PATH)")
    prepare_out(args.out)  # before any work: a user's own folder is refused
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown

    t0 = time.perf_counter()
    init_distributed()  # this process evaluates: a single-rank group in memory (no port)
    try:
        init_model_parallel()
        results = [run_corpus(args, c) for c in corpora]
    finally:
        shutdown()
    report(results, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
