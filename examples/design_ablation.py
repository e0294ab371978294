"""Measure TwIST's design choices side by side in one run (single process, same data and seed).

    python examples/design_ablation.py [--data-path DIR] [--train-iters 150] [--out runs/ablation]

Variants: activation correction {rescale, none} x optimizer state {aggregate},
plus {rescale, reset}. For each: held-out perplexity of the central (full)
model, and of kappa=0.5 cut-outs chosen by weight magnitude and by 3 random
sampler draws. Prints a table, writes OUT/ablation.json and OUT/ablation.png.
Without --data-path it prepares the standard-library corpus (as the main job).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")

VARIANTS = [("rescale", "aggregate"), ("none", "aggregate"), ("rescale", "reset")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=None)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--model-preset", default="small")
    p.add_argument("--train-iters", type=int, default=150)
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args(argv)

    import dataclasses

    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.data import build_gpt_dataset, load_manifest, load_token_stream, prepare_data, stdlib_documents
    from megatron_twist.data.batches import MegatronBatches
    from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, init_model_parallel, shutdown
    from megatron_twist.evaluation import perplexity
    from megatron_twist.training.twist_trainer import TwistTrainer
    from megatron_twist.twist.extraction import cut_model, select_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = args.data_path
    if data_path is None:
        data_path = str(out / "data")
        if not (out / "data" / "manifest.json").exists():
            prepare_data(data_path, stdlib_documents("train"), stdlib_documents("valid"), vocab_size=args.vocab_size)
    manifest = load_manifest(data_path)
    model = ModelConfig(**dict(MODEL_PRESETS[args.model_preset], vocab_size=manifest.vocab_size))
    train = TrainConfig(train_iters=args.train_iters, micro_batch_size=args.micro_batch_size, log_interval=10**9)
    heldout = load_token_stream(data_path, "valid")

    init_distributed()
    init_model_parallel()
    rows = []
    try:
        for correction, opt_state in VARIANTS:
            twist = TwistConfig(
                keep_ratio=0.5,
                num_subnets=2,
                local_steps=args.local_steps,
                correction=correction,
                optimizer_state=opt_state,
            )
            groups = build_twist_groups(twist)
            dataset = build_gpt_dataset(
                data_path, model.seq_length, train.train_iters * 2 * train.micro_batch_size, seed=train.seed
            )
            t0 = time.perf_counter()
            result = TwistTrainer(
                model, twist, train, groups, MegatronBatches(dataset, train.micro_batch_size), log=lambda m: None
            ).run()
            seconds = time.perf_counter() - t0
            params = result.central.params

            def ppl(module):
                return perplexity(module, heldout, model.seq_length, max_tokens=args.eval_tokens)["perplexity"]

            row = {
                "correction": correction,
                "optimizer_state": opt_state,
                "train_seconds": round(seconds, 1),
                "final_train_loss": statistics.mean(result.loss_curve()[-10:]),
                "central_ppl": ppl(result.central.module),
            }
            row["cut_magnitude_ppl"] = ppl(cut_model(model, twist, params, select_plan(model, twist, params, 0.5))[0])
            randoms = [
                ppl(cut_model(model, twist, params, select_plan(model, twist, params, 0.5, f"random:{s}"))[0])
                for s in (1, 2, 3)
            ]
            row["cut_random_ppl_mean"] = statistics.mean(randoms)
            row["cut_random_ppl_min_max"] = [min(randoms), max(randoms)]
            rows.append(row)
            print(f"[ablation] {correction:8s} {opt_state:9s} done in {seconds:.0f}s: {json.dumps(row)}", flush=True)
    finally:
        shutdown()

    header = (
        f"{'correction':10s} {'opt state':10s} {'train loss':>10s} {'central ppl':>12s} "
        f"{'cut 0.5 magn.':>14s} {'cut 0.5 random (mean, min-max)':>32s}"
    )
    print("\n" + header)
    for r in rows:
        lo, hi = r["cut_random_ppl_min_max"]
        print(
            f"{r['correction']:10s} {r['optimizer_state']:10s} {r['final_train_loss']:10.3f} "
            f"{r['central_ppl']:12.2f} {r['cut_magnitude_ppl']:14.2f} "
            f"{r['cut_random_ppl_mean']:14.2f} ({lo:.2f}-{hi:.2f})"
        )
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "model": model.to_dict(),
                "train": dataclasses.asdict(train),
                "eval_tokens": args.eval_tokens,
                "rows": rows,
            },
            indent=1,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['correction']}\n{r['optimizer_state']}" for r in rows]
        width = 0.27
        for i, (key, name) in enumerate(
            [
                ("central_ppl", "central"),
                ("cut_magnitude_ppl", "cut 0.5 magnitude"),
                ("cut_random_ppl_mean", "cut 0.5 random (mean)"),
            ]
        ):
            ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=name)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ablation.png", dpi=120)
        print(f"plot: {out / 'ablation.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
