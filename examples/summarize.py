"""Print the main job's table and plot its loss curve.

    python examples/summarize.py RUN_DIR

Reads RUN_DIR/eval-*.json (the JSON lines `twist eval` prints) and
RUN_DIR/metrics.json (`twist train --metrics-file`); writes RUN_DIR/loss.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    run = Path(run_dir)
    rows = []
    for f in sorted(run.glob("eval-*.json")):
        r = json.loads(f.read_text())
        name = "central (dense, full size)" if r["kind"] == "central" else f"cut-out, kappa={r['keep_ratio']}"
        rows.append((name, r["parameters"], r["perplexity"], r["tokens"]))
    full = max(p for _, p, _, _ in rows)
    print(f"\n{'model':30s} {'parameters':>12s} {'of full':>8s} {'held-out ppl':>13s} {'tokens':>8s}")
    for name, params, ppl, tokens in rows:
        print(f"{name:30s} {params:12,d} {params / full:8.2f} {ppl:13.2f} {tokens:8d}")
    metrics_file = run / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        curve = metrics["loss_curve"]
        print(
            f"\ntraining loss (mean over subnets): first 10 steps {sum(curve[:10]) / 10:.3f} -> "
            f"last 10 steps {sum(curve[-10:]) / 10:.3f} over {len(curve)} steps"
        )
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(curve) + 1), curve, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over subnets)")
        tw = metrics["twist"]
        ax.set_title(f"TwIST: {tw['num_subnets']} subnets, kappa {tw['keep_ratio']}, {tw['local_steps']} local steps")
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=120)
        print(f"loss plot: {run / 'loss.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/stdlib-main")
