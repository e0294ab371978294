"""Training throughput and traffic: TwIST against dense data parallel, same model, same 2 ranks.

    python benchmarks/speed.py [--steps 60] [--repeats 2] [--out runs/bench-speed]
    python benchmarks/speed.py --smoke      # seconds-long version (CI)

Jobs, alternated in one run (dense, twist, masked, twist-reset, then again), each a 2-rank
torchrun of `TwistTrainer` on synthetic tokens (speed does not depend on the data):
* dense:  1 subnet at kappa 1 = ordinary data parallel over both ranks (gradients all-reduced
          every step);
* twist:  2 subnets at kappa 0.5, one per rank, materialized (each rank trains a physically
          smaller GPTModel), aggregated every --local-steps steps (weights + Adam moments);
* masked: the same rounds, but every subnet is the FULL model with the units outside a kappa-0.5
          subnet masked to zero (twist/hooks.attach_mask): TwIST without the smaller matrices;
* twist-reset: as twist with --optimizer-state reset (only weights move at aggregation).
Throughput is tokens per second per job, over all rounds but the first (warm-up), including
aggregation. Traffic is counted AT THE COLLECTIVES: every torch.distributed all_reduce /
reduce_scatter / all_gather call in the worker adds its payload bytes. The ideal speed-up is the
ratio of training FLOPs per token (6 x matmul parameters + attention scores; the embedding and
output layer are not split). Writes OUT/speed.json and OUT/speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, prepare_out  # noqa: E402

sys.path.insert(0, str(REPO))
MODEL = dict(
    family="llama",
    num_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=704,
    vocab_size=2048,
    seq_length=256,
)
SMOKE_MODEL = dict(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=512,
    seq_length=64,
)
JOBS = {
    "dense": dict(keep_ratio=1.0, num_subnets=1),
    "twist": dict(keep_ratio=0.5, num_subnets=2),
    "masked": dict(keep_ratio=1.0, num_subnets=2),
    "twist-reset": dict(keep_ratio=0.5, num_subnets=2, optimizer_state="reset"),
}


def flops_per_token(model, layer_sizes) -> float:
    """Training FLOPs per token: 3 x forward; forward = 2 x matmul parameters + attention (QK^T, AV)."""
    hd, h, s = model.head_dim, model.hidden_size, model.seq_length
    total = 2 * model.vocab_size * h  # output layer (not split)
    for size in layer_sizes:
        qkv = h * hd * (size.num_attention_heads + 2 * size.num_query_groups)
        proj = size.num_attention_heads * hd * h
        mlp = (3 if model.gated_mlp else 2) * h * size.ffn_hidden_size
        total += 2 * (qkv + proj + mlp) + 2 * 2 * s * size.num_attention_heads * hd
    return 3.0 * total


class CollectiveCounter:
    """Adds the payload bytes of every all_reduce / reduce_scatter / all_gather this process issues
    (all_reduce: the tensor; reduce_scatter: its input; all_gather: its output)."""

    def __init__(self):
        import torch.distributed as dist

        self.bytes = 0
        payload = {
            "all_reduce": lambda a: a[0],
            "reduce_scatter_tensor": lambda a: a[1],
            "all_gather_into_tensor": lambda a: a[0],
        }
        for name, which in payload.items():
            original = getattr(dist, name)

            def counted(*a, _original=original, _which=which, **kw):
                t = _which(a)
                self.bytes += t.numel() * t.element_size()
                return _original(*a, **kw)

            setattr(dist, name, counted)


def worker(kind: str, out: Path, steps: int, local_steps: int, micro_batch: int, smoke: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_twist.config import ModelConfig, TrainConfig, TwistConfig
    from megatron_twist.cpu_shim import seed_everything
    from megatron_twist.data.batches import SyntheticBatches
    from megatron_twist.distributed.runtime import build_twist_groups, init_distributed, shutdown
    from megatron_twist.training.twist_trainer import TwistTrainer

    model = ModelConfig(**(SMOKE_MODEL if smoke else MODEL))
    job = dict(JOBS[kind])
    twist = TwistConfig(local_steps=local_steps, coverage=True, **job)
    train = TrainConfig(train_iters=steps, micro_batch_size=micro_batch, log_interval=10**9)
    init_distributed()
    groups = build_twist_groups(twist)
    seed_everything(train.seed)
    batches = SyntheticBatches(model.vocab_size, model.seq_length, micro_batch, seed=0)
    trainer = TwistTrainer(model, twist, train, groups, batches, log=lambda m: None)
    if kind == "masked":  # full-size subnets with the units outside a kappa-0.5 subnet masked to zero
        from megatron_twist.twist.hooks import attach_mask
        from megatron_twist.twist.sampler import SubnetSampler

        half = TwistConfig(keep_ratio=0.5, num_subnets=2, local_steps=local_steps)
        sampler = SubnetSampler(model, half)
        load = trainer.worker.load

        def load_masked(central, plan, _load=load):
            _load(central, plan)
            subnet = trainer.local_subnets[0]
            trainer.worker.state.hooks.add(
                attach_mask(trainer.worker.module, model, half, sampler.sample(central.round)[subnet])
            )

        trainer.worker.load = load_masked
    counter = CollectiveCounter()
    dist.barrier()
    result = trainer.run()
    rounds = result.rounds[1:] if len(result.rounds) > 1 else result.rounds
    seconds = sum(r.seconds for r in rounds)
    tokens = sum(r.tokens for r in rounds)  # all ranks' tokens
    from megatron_twist.model.gpt import full_layer_sizes

    sizes = full_layer_sizes(model) if kind == "masked" else trainer.sampler.subnet_layer_sizes()
    record = {
        "kind": kind,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "collective_bytes_per_rank": counter.bytes,
        "tokens_per_rank": steps * micro_batch * model.seq_length * len(trainer.local_subnets),
        "flops_per_token": flops_per_token(model, sizes),
    }
    if groups.rank == 0:
        with open(out / f"{kind}.json", "w") as f:
            json.dump(record, f)
    shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/bench-speed")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--smoke", action="store_true", help="seconds-long version: tiny model, dense and twist only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.local_steps, args.micro_batch, args.repeats = 4, 2, 2, 1
        args.jobs = ["dense", "twist"]
    out = prepare_out(args.out, worker=bool(args.worker))
    if args.worker:
        worker(args.worker, out, args.steps, args.local_steps, args.micro_batch, args.smoke)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    jobs = [k for k in JOBS if k in args.jobs or k in ("dense", "twist")]
    runs = {k: [] for k in jobs}
    for rep in range(args.repeats):
        for kind in jobs:  # alternated: dense, twist, masked, twist-reset, dense, ...
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                "--master_addr=127.0.0.1",
                f"--master_port={free_port()}",
                __file__,
                "--out",
                str(out),
                "--worker",
                kind,
                "--steps",
                str(args.steps),
                "--local-steps",
                str(args.local_steps),
                "--micro-batch",
                str(args.micro_batch),
            ] + (["--smoke"] if args.smoke else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise SystemExit(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            runs[kind].append(json.loads((out / f"{kind}.json").read_text()))
            print(
                f"[speed] repeat {rep + 1}/{args.repeats} {kind}: {runs[kind][-1]['tokens_per_s']:,.0f} tok/s "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    mean = {k: sum(r["tokens_per_s"] for r in v) / len(v) for k, v in runs.items()}
    dense, twist = runs["dense"][0], runs["twist"][0]
    ideal = dense["flops_per_token"] / twist["flops_per_token"]
    measured = mean["twist"] / mean["dense"]
    per_token = {k: v[0]["collective_bytes_per_rank"] / v[0]["tokens_per_rank"] for k, v in runs.items()}
    summary = {
        "tokens_per_s": mean,
        "speedup_measured": measured,
        "speedup_ideal_flops": ideal,
        "speedup_fraction_of_ideal": measured / ideal,
        "bytes_per_rank_per_token": per_token,
        "traffic_ratio": {k: per_token[k] / per_token["dense"] for k in jobs},
        "traffic_ratio_theory_aggregate": 3 / args.local_steps,
        "traffic_ratio_theory_reset": 1 / args.local_steps,
        "local_steps": args.local_steps,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "runs": runs,
    }
    (out / "speed.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'job':12s} {'tokens/s':>10s} {'vs dense':>9s} {'bytes/rank/token':>17s} {'vs dense':>9s}")
    for k in jobs:
        print(
            f"{k:12s} {mean[k]:10,.0f} {mean[k] / mean['dense']:9.2f} {per_token[k]:17.1f} "
            f"{per_token[k] / per_token['dense']:9.3f}"
        )
    print(f"TwIST speed-up {measured:.2f}x measured vs {ideal:.2f}x ideal from FLOPs: {measured / ideal:.0%} of ideal")
    ratio = summary["traffic_ratio"]
    print(
        f"traffic: TwIST {ratio['twist']:.3f} of dense (theory 3/{args.local_steps} = {3 / args.local_steps:.3f})"
        + (
            f"; with --optimizer-state reset {ratio['twist-reset']:.3f} (theory 1/{args.local_steps} = "
            f"{1 / args.local_steps:.3f})"
            if "twist-reset" in ratio
            else ""
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.bar(jobs, [mean[k] for k in jobs])
        a.set_ylabel("tokens / s (2 ranks)")
        b.bar(jobs, [per_token[k] for k in jobs])
        b.set_ylabel("bytes / rank / token")
        b.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=120)
        print(f"plot: {out / 'speed.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
