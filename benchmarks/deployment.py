"""The cut-out model at deployment on CPU: forward latency and peak memory, kappa 0.5 vs the dense model.

    python benchmarks/deployment.py [--repeats 20] [--out runs/bench-deploy]
    python benchmarks/deployment.py --smoke      # seconds-long version (CI)

Both models are Megatron-core GPTModels of the benchmark's Llama-style architecture (the `small`
preset: 4 layers, hidden 256, 8 heads in 4 KV groups, FFN 704, vocab 4096): the dense central model
and the dense kappa-0.5 model cut from it by `twist extract`'s code (4 heads, FFN 352; the
embedding and output layer keep their size). Weight values do not change the speed, so the central
model is freshly initialised. Latency: inference forward (no grad) of batch 1 and batch 8 at
sequence 256, median over --repeats runs after warm-up, the two models alternated run by run in one
process. Peak memory: the peak resident set (VmHWM) of a fresh process that builds one model and
runs one forward (batch 1, batch 8), above the same process's baseline after imports, with glibc's
mmap threshold fixed (see main); median of 3 alternated processes. Writes
OUT/deployment.json and OUT/deployment.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare_out, status_kib  # noqa: E402

sys.path.insert(0, str(REPO))
SMOKE = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=512,
    seq_length=64,
)


def _models(smoke: bool):
    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig
    from megatron_twist.cpu_shim import seed_everything
    from megatron_twist.model.gpt import build_gpt_model
    from megatron_twist.twist.extraction import cut_model, select_plan

    model = ModelConfig(**dict(MODEL_PRESETS["small"], **(SMOKE if smoke else {})))
    seed_everything(0)
    dense = build_gpt_model(model).eval()
    twist = TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False)
    params = dict(dense.named_parameters())
    cut, _ = cut_model(model, twist, params, select_plan(model, twist, params, 0.5))
    return model, dense, cut.eval()


def memory_worker(which: str, batch: int, smoke: bool, out: Path) -> None:
    """Peak memory of building one model and running one forward, in this fresh process."""
    import torch

    from megatron_twist.config import MODEL_PRESETS, ModelConfig, TwistConfig
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel
    from megatron_twist.model.gpt import build_gpt_model, full_layer_sizes, gpt_forward
    from megatron_twist.twist.sampler import SubnetSampler

    init_distributed()
    init_model_parallel()
    model = ModelConfig(**dict(MODEL_PRESETS["small"], **(SMOKE if smoke else {})))
    sizes = (
        full_layer_sizes(model)
        if which == "dense"
        else SubnetSampler(model, TwistConfig(keep_ratio=0.5, num_subnets=1, coverage=False)).subnet_layer_sizes()
    )
    tokens = torch.randint(0, model.vocab_size, (batch, model.seq_length))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
    base = status_kib("VmRSS")
    module = build_gpt_model(model, sizes).eval()
    with torch.no_grad():
        gpt_forward(module, tokens)
    (out / f"mem-{which}.json").write_text(json.dumps({"peak_mib": (status_kib("VmHWM") - base) / 1024}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="runs/bench-deploy")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--memory-worker", nargs=2, metavar=("WHICH", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    out = prepare_out(args.out, worker=bool(args.memory_worker))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]), args.smoke, out)
        return 0
    import torch

    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown
    from megatron_twist.model.gpt import count_parameters, gpt_forward

    repeats = 3 if args.smoke else args.repeats
    init_distributed()
    init_model_parallel()
    model, dense, cut = _models(args.smoke)
    rows = {}
    for batch in (1, 8):
        tokens = torch.randint(0, model.vocab_size, (batch, model.seq_length))
        times = {"dense": [], "cut": []}
        with torch.no_grad():
            for module in (dense, cut):  # warm-up
                gpt_forward(module, tokens)
            for _ in range(repeats):
                for name, module in (("dense", dense), ("cut", cut)):  # alternated
                    t0 = time.perf_counter()
                    gpt_forward(module, tokens)
                    times[name].append(time.perf_counter() - t0)
        rows[f"latency_ms_batch{batch}"] = {k: 1000 * statistics.median(v) for k, v in times.items()}
    shutdown()
    # Resident-set peaks depend on glibc's malloc: by default its mmap threshold grows after the
    # first large free, so later large tensors come from the heap and stay resident, and the peak
    # of the same run varied from 109 to 148 MiB. A fixed threshold returns every freed large
    # tensor at once, so the peak is the live tensors' peak (spread under 0.2 MiB over 4 runs).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MALLOC_MMAP_THRESHOLD_="65536")
    for batch in (1, 8):
        mem = {"dense": [], "cut": []}
        for _ in range(1 if args.smoke else 3):
            for which in ("dense", "cut"):  # alternated, each in a fresh process
                subprocess.run(
                    [sys.executable, __file__, "--out", str(out), "--memory-worker", which, str(batch)]
                    + (["--smoke"] if args.smoke else []),
                    check=True,
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                mem[which].append(json.loads((out / f"mem-{which}.json").read_text())["peak_mib"])
        rows[f"peak_mib_batch{batch}"] = {k: statistics.median(v) for k, v in mem.items()}
    rows["parameters"] = {"dense": count_parameters(dense), "cut": count_parameters(cut)}
    print(f"\n{'':22s} {'dense':>10s} {'kappa 0.5':>10s} {'ratio':>7s}")
    for key, label in (
        ("parameters", "parameters"),
        ("latency_ms_batch1", "latency ms, batch 1"),
        ("latency_ms_batch8", "latency ms, batch 8"),
        ("peak_mib_batch1", "peak MiB, batch 1"),
        ("peak_mib_batch8", "peak MiB, batch 8"),
    ):
        d, c = rows[key]["dense"], rows[key]["cut"]
        rows[key]["ratio"] = c / d
        print(f"{label:22s} {d:10,.2f} {c:10,.2f} {c / d:7.2f}")
    (out / "deployment.json").write_text(
        json.dumps(
            {"seq_length": model.seq_length, "repeats": repeats, "threads": torch.get_num_threads(), **rows}, indent=1
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ["parameters", "latency_ms_batch1", "latency_ms_batch8", "peak_mib_batch1", "peak_mib_batch8"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(keys)), [rows[k]["ratio"] for k in keys])
        ax.axhline(0.6, color="r", ls="--", lw=1, label="target 0.6")
        ax.set_xticks(range(len(keys)), ["params", "latency b1", "latency b8", "peak mem b1", "peak mem b8"])
        ax.set_ylabel("kappa 0.5 / dense")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "deployment.png", dpi=120)
        print(f"plot: {out / 'deployment.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
