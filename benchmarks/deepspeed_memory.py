"""Peak memory per rank: TwIST (kappa 0.5, 2 subnets) against dense training, same ZeRO stage, side by side.

    python benchmarks/deepspeed_memory.py [--ranks 2 4] [--stages 0 1 2 3] [--out runs/bench-memory]
    python benchmarks/deepspeed_memory.py --smoke   # seconds-long version (CI): tiny model, 2 ranks, ZeRO 2

For each rank count and ZeRO stage, two jobs on the same model and ds_config (fp32, CPU):
* dense: DeepSpeed trains the full model; its data-parallel group is every rank, so ZeRO
  partitions over all of them;
* twist: `train_with_deepspeed` with 2 subnets: each subnet is trained by ranks/2 replicas
  (its own data-parallel group, over which ZeRO partitions it) PLUS TwIST's central model,
  sharded over every rank (weights and two Adam moments, 1/ranks each).
Memory is the peak resident set (VmHWM) of each rank after model building and 4 optimizer
steps, minus the resident set after imports and process-group set-up (the peak is reset
there through /proc/self/clear_refs). Prints a table of MiB per rank and ratios; writes
OUT/memory.json and OUT/memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, prepare_out, status_kib  # noqa: E402

MODEL = dict(
    family="llama",
    num_layers=8,
    hidden_size=512,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=1408,
    vocab_size=8192,
    seq_length=256,
)
SMOKE = dict(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=512,
    seq_length=32,
)


def worker(kind: str, stage: int, out: Path, ranks: int, sizes: dict) -> None:
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_twist.config import ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown
    from megatron_twist.model.gpt import build_gpt_model, gpt_forward
    from megatron_twist.optim.optimizer import build_optimizer
    from megatron_twist.optim.step import masked_mean_loss

    model = ModelConfig(**sizes)
    train = TrainConfig(train_iters=4, micro_batch_size=2, log_interval=100)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
    }
    twist = TwistConfig(
        keep_ratio=0.5 if kind == "twist" else 1.0,
        num_subnets=2 if kind == "twist" else 1,
        local_steps=2,
        coverage=True,
    )
    init_distributed()
    groups = build_twist_groups(twist)
    from megatron_twist.cpu_shim import seed_everything

    seed_everything(train.seed)
    import deepspeed  # noqa: F401  (imported before the baseline so its import is not counted)

    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status_kib("VmRSS")
    batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=0)
    if kind == "twist":
        from megatron_twist.training.deepspeed_trainer import train_with_deepspeed

        train_with_deepspeed(model, twist, train, groups, batches, ds_config, log=lambda m: None)
    else:
        module = build_gpt_model(model)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, train), config=ds_config)
        for it in range(train.train_iters):
            b = batches.get(it, groups.rank, groups.world_size)
            loss = masked_mean_loss(gpt_forward(engine, b["tokens"], b["labels"]), b["loss_mask"])
            engine.backward(loss)
            engine.step()
    peak = status_kib("VmHWM")
    (out / f"{kind}-zero{stage}-n{ranks}-rank{groups.rank}.json").write_text(
        json.dumps({"peak_mib": (peak - base) / 1024, "baseline_mib": base / 1024})
    )
    shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="processes per job (even)")
    p.add_argument("--out", default="runs/bench-memory")
    p.add_argument("--smoke", action="store_true", help="seconds-long version: tiny model, 2 ranks, ZeRO 2 (CI)")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "STAGE", "RANKS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = SMOKE if args.smoke else MODEL
    if args.smoke:
        args.ranks, args.stages = [2], [2]
    out = prepare_out(args.out, worker=bool(args.worker))
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), out, int(args.worker[2]), sizes)
        return 0
    # A fixed glibc mmap threshold: freed large tensors leave the resident set at once, so VmHWM is
    # the live tensors' peak and not an artefact of malloc's adaptive threshold (deployment.py).
    env = dict(
        os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536"
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    rows = []
    for ranks in args.ranks:
        for stage in args.stages:
            row = {"ranks": ranks, "stage": stage}
            for kind in ("dense", "twist"):  # alternate inside one run, same machine state
                print(f"[bench] {ranks} ranks, ZeRO {stage}: {kind} ...", flush=True)
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={ranks}",
                    "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}",
                    __file__,
                    "--out",
                    str(out),
                    "--worker",
                    kind,
                    str(stage),
                    str(ranks),
                    *(["--smoke"] if args.smoke else []),
                ]
                subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
                peaks = [
                    json.loads((out / f"{kind}-zero{stage}-n{ranks}-rank{r}.json").read_text())["peak_mib"]
                    for r in range(ranks)
                ]
                row[kind] = max(peaks)
            row["ratio"] = row["twist"] / row["dense"]
            rows.append(row)
    print(f"\n{'ranks':>5s} {'ZeRO':>4s} {'dense MiB/rank':>15s} {'TwIST MiB/rank':>15s} {'TwIST/dense':>12s}")
    for r in rows:
        print(f"{r['ranks']:>5d} {r['stage']:>4d} {r['dense']:15.1f} {r['twist']:15.1f} {r['ratio']:12.2f}")
    (out / "memory.json").write_text(json.dumps({"model": sizes, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["dense"] for r in rows], 0.4, label="dense")
        ax.bar([x + 0.2 for x in xs], [r["twist"] for r in rows], 0.4, label="TwIST kappa 0.5")
        ax.set_xticks(list(xs), [f"{r['ranks']}r ZeRO {r['stage']}" for r in rows], fontsize=8)
        ax.set_ylabel("peak MiB per rank (above baseline)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=120)
        print(f"plot: {out / 'memory.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
