"""Peak memory per rank and traffic on the Megatron path (`twist train`), side by side in one run.

    python benchmarks/megatron_memory.py [--ranks 4] [--bf16] [--out runs/bench-megatron-memory]
    python benchmarks/megatron_memory.py --smoke   # seconds-long version (CI): tiny model, 2 ranks

Three jobs on the same model, data and precision, every rank a data-parallel rank (TP = PP = 1):
* dense: plain data parallel, the full model on every rank, gradients averaged over all ranks every
  step (the project's one train step, optim/step.py, as the subnets use it);
* twist: TwistTrainer, 2 subnets at kappa 0.5 (ranks / 2 replicas each), the central model
  replicated (weights, 2 Adam moments and the aggregation buffer, fp32, on every rank);
* twist-sharded: the same with `--twist-shard-central` (1/ranks of the central model per rank).
Memory is the peak resident set (VmHWM) of each rank over model building and the steps, minus the
resident set after imports and process-group set-up (the peak is reset there through
/proc/self/clear_refs); the table shows the fullest rank. Traffic: the bytes TwIST's rounds move
per rank at their collectives (RoundRecord.aggregation_bytes: all-reduce payload when replicated,
all-gather + reduce-scatter when sharded) against the gradient bytes dense data parallel all-reduces
in the same steps (RoundRecord.dense_dp_bytes), per token. Writes OUT/memory.json and a plot.
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
from common import free_port, prepare_out, save_plot, status_kib  # noqa: E402
from deepspeed_memory import MODEL, SMOKE  # noqa: E402  (the same models as the DeepSpeed benchmark)

KINDS = ("dense", "twist", "twist-sharded")


def worker(kind: str, out: Path, sizes: dict, bf16: bool, steps: int) -> None:
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_twist.config import ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.cpu_shim import seed_everything
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown

    model = ModelConfig(**sizes)
    train = TrainConfig(train_iters=steps, micro_batch_size=2, log_interval=100, bf16=bf16)
    twist = TwistConfig(
        keep_ratio=1.0 if kind == "dense" else 0.5, num_subnets=1 if kind == "dense" else 2, local_steps=2
    )
    init_distributed()
    groups = build_twist_groups(twist)
    seed_everything(train.seed)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status_kib("VmRSS")
    record = {}
    if kind == "dense":
        import torch

        from megatron_twist.model.gpt import build_gpt_model
        from megatron_twist.optim.optimizer import build_optimizer, build_scheduler
        from megatron_twist.optim.step import StepParallelism, train_step

        module = build_gpt_model(model)
        twin = build_gpt_model(model, params_dtype=torch.bfloat16).bfloat16() if bf16 else None
        optimizer = build_optimizer(module, train)
        scheduler = build_scheduler(optimizer, train)
        batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=0)
        parallel = StepParallelism(subnet_group=dist.group.WORLD)
        for it in range(steps):
            b = batches.get(it, groups.rank, groups.world_size)
            train_step(module, optimizer, scheduler, b, it, train.clip_grad, parallel, compute=twin)
    else:
        from megatron_twist.training.twist_trainer import TwistTrainer, build_central, build_sharded_central

        batches = SyntheticBatches(model.vocab_size, model.seq_length, train.micro_batch_size, seed=0)
        if kind == "twist-sharded":  # as `twist train --twist-shard-central` builds it
            central = build_sharded_central(model, train.seed, groups.data_parallel_group)
        else:
            central = build_central(model, train.seed)
        trainer = TwistTrainer(model, twist, train, groups, batches, central=central, log=lambda m: None)
        del central
        rounds = trainer.run().rounds
        record = {
            "aggregation_bytes": sum(r.aggregation_bytes for r in rounds),
            "dense_dp_bytes": sum(r.dense_dp_bytes for r in rounds),
            "tokens": sum(r.tokens for r in rounds),
        }
    peak = status_kib("VmHWM")
    record.update(peak_mib=(peak - base) / 1024, baseline_mib=base / 1024)
    (out / f"{kind}-rank{groups.rank}.json").write_text(json.dumps(record))
    shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="processes per job (even: 2 subnets x replicas)")
    p.add_argument("--bf16", action="store_true", help="every job in bf16 from fp32 masters (--bf16)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per job (rounds of 2)")
    p.add_argument("--out", default="runs/bench-megatron-memory")
    p.add_argument("--smoke", action="store_true", help="seconds-long version: tiny model, 2 ranks (CI)")
    p.add_argument("--worker", metavar="KIND", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = SMOKE if args.smoke else MODEL
    if args.smoke:
        args.ranks = 2
    out = prepare_out(args.out, worker=bool(args.worker))
    if args.worker:
        worker(args.worker, out, sizes, args.bf16, args.steps)
        return 0
    # A fixed glibc mmap threshold: freed large tensors leave the resident set at once (deployment.py).
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MALLOC_MMAP_THRESHOLD_="65536")
    result = {"model": sizes, "ranks": args.ranks, "bf16": args.bf16, "steps": args.steps}
    for kind in KINDS:
        print(f"[bench] {args.ranks} ranks: {kind} ...", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--out", str(out)]
        cmd += ["--worker", kind, "--steps", str(args.steps)]
        cmd += (["--smoke"] if args.smoke else []) + (["--bf16"] if args.bf16 else [])
        subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
        ranks = [json.loads((out / f"{kind}-rank{r}.json").read_text()) for r in range(args.ranks)]
        row = {"peak_mib": max(r["peak_mib"] for r in ranks)}
        if kind != "dense":
            r0 = ranks[0]
            row.update({k: r0[k] for k in ("aggregation_bytes", "dense_dp_bytes", "tokens")})
            row["traffic_ratio"] = r0["aggregation_bytes"] / r0["dense_dp_bytes"]
        result[kind] = row
    dense = result["dense"]["peak_mib"]
    precision = "bf16 from fp32 masters" if args.bf16 else "fp32"
    print(f"\n{args.ranks} ranks, {precision}; peak MiB per rank above the baseline (fullest rank):")
    print(f"{'job':<15s} {'MiB/rank':>10s} {'vs dense':>9s} {'round bytes / dense DP bytes':>29s}")
    for kind in KINDS:
        r = result[kind]
        ratio = f"{r['traffic_ratio']:.3f}" if "traffic_ratio" in r else "-"
        print(f"{kind:<15s} {r['peak_mib']:10.1f} {r['peak_mib'] / dense:9.2f} {ratio:>29s}")
    (out / "memory.json").write_text(json.dumps(result, indent=1))

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(list(KINDS), [result[k]["peak_mib"] for k in KINDS], color=["gray", "tab:blue", "tab:green"])
        ax.set_ylabel("peak MiB per rank (above baseline)")
        ax.set_title(f"Megatron path, {args.ranks} ranks, {precision}", fontsize=9)
        return fig

    save_plot(out / "memory.png", out / "memory.json", draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
