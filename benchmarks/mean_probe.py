"""Probe of a mean (bias) correction at extraction (issue #15 item 5), on finished benchmark runs.

    python benchmarks/mean_probe.py --run RUN/seed-1 --data RUN/phase2-data      # continued.py's OUT = RUN
    python benchmarks/mean_probe.py --run RUN/L1000/seed-1 --data RUN/data       # scratch.py's OUT = RUN

A cut drops heads and MLP neurons; their outputs were not zero on average, so the residual stream of
the cut model is shifted. The candidate correction adds, per layer, the mean contribution of the
dropped units as a constant vector after linear_proj (heads) and linear_fc2 (neurons):
    b = W[:, dropped columns] @ mean(input of the projection)[dropped columns]
(mean ablation instead of zero ablation; FLAP's bias compensation does the same with calibration data).
TwIST could gather these means during training at no cost (every forward computes them); this probe
takes them from the finished central model on the first --sequences training windows, which is what
such a running mean would converge to, and measures whether the correction would pay before it is
built into the trainer. It is applied to TwIST's cut (magnitude plan) and, for reference, to the
dense model pruned without retraining (magnitude and activation-aware plans, benchmarks/pruning.py).
Prints held-out perplexity without / with the correction and writes --json if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def projection_input_means(module, calib: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Per layer, the mean over calibration tokens of the inputs of linear_proj and linear_fc2."""
    from pruning import projection_input_sums

    sums = projection_input_sums(module, calib, 1)
    return [{k: sums[(i, k)] / sums["tokens"] for k in ("proj", "fc2")} for i in range(len(module.decoder.layers))]


def compensation(model, central_module, plan, means) -> List[Dict[str, torch.Tensor]]:
    """Per layer, the constant output each projection loses when ``plan`` drops units."""
    from megatron_twist.twist.slicing import proj_columns

    out = []
    for i, (layer, lu) in enumerate(zip(central_module.decoder.layers, plan.layers)):
        dropped_heads = sorted(set(range(model.num_attention_heads)) - set(lu.heads))
        dropped_neurons = sorted(set(range(model.ffn_hidden_size)) - set(lu.neurons))
        w_proj = layer.self_attention.linear_proj.weight.detach().double()
        w_fc2 = layer.mlp.linear_fc2.weight.detach().double()
        cols = proj_columns(model, dropped_heads, device=w_proj.device)
        idx = torch.as_tensor(dropped_neurons, dtype=torch.long, device=w_fc2.device)
        out.append(
            {
                "proj": w_proj[:, cols] @ means[i]["proj"][cols],
                "fc2": w_fc2[:, idx] @ means[i]["fc2"][idx],
            }
        )
    return out


def add_biases(module, biases) -> list:
    """Forward hooks adding each layer's constant to linear_proj / linear_fc2 outputs (Megatron's
    linear layers return (output, bias))."""
    handles = []
    for layer, b in zip(module.decoder.layers, biases):
        for kind, sub in (("proj", layer.self_attention.linear_proj), ("fc2", layer.mlp.linear_fc2)):
            vec = b[kind].to(dtype=next(sub.parameters()).dtype)

            def hook(mod, inputs, output, vec=vec):
                y, bias = output
                return y + vec, bias

            handles.append(sub.register_forward_hook(hook))
    return handles


def probe(central, twist_cfg, plan, means, tokens, seq, eval_tokens) -> Dict[str, float]:
    from megatron_twist.evaluation import perplexity
    from megatron_twist.twist.extraction import cut_model

    module = cut_model(central.config, twist_cfg, central.params, plan)[0]
    plain = perplexity(module, tokens, seq, max_tokens=eval_tokens)["perplexity"]
    handles = add_biases(module, compensation(central.config, central.module, plan, means))
    corrected = perplexity(module, tokens, seq, max_tokens=eval_tokens)["perplexity"]
    for h in handles:
        h.remove()
    return {"plain": plain, "mean_corrected": corrected}


def main() -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a seed folder holding twist/ and dense/ checkpoints")
    p.add_argument("--data", required=True, help="the prepared data directory the run trained on")
    p.add_argument("--kappas", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--sequences", type=int, default=128, help="training windows for the means")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from megatron_twist.distributed.runtime import init_distributed, init_model_parallel, shutdown

    init_distributed()  # a single-rank group in memory (Megatron-core's layers need one)
    try:
        init_model_parallel()
        res = measure(args)
    finally:
        shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "data": args.data, "results": res}, indent=1))
    return 0


def measure(args) -> Dict:
    from pruning import Pruner, calibration

    from megatron_twist.checkpoint.models import load_central
    from megatron_twist.data import load_token_stream
    from megatron_twist.twist.extraction import select_plan

    run = Path(args.run)
    tokens = load_token_stream(str(args.data), "valid")
    tw, tw_cfg, _ = load_central(str(run / "twist"))
    dense, _, _ = load_central(str(run / "dense"))
    seq = tw.config.seq_length
    calib = calibration(args.data, args.sequences, seq)
    tw_means = projection_input_means(tw.module, calib)
    dense_means = projection_input_means(dense.module, calib)
    pruner = Pruner(dense, calib)
    res = {}
    for kappa in args.kappas:
        k = str(kappa)
        res[k] = {
            "twist_cut": probe(
                tw, tw_cfg, select_plan(tw.config, tw_cfg, tw.params, kappa), tw_means, tokens, seq, args.eval_tokens
            )
        }
        for method in ("magnitude", "activation"):
            plan = pruner.plan(kappa, method)
            res[k][f"dense_{method}"] = probe(dense, pruner.cfg, plan, dense_means, tokens, seq, args.eval_tokens)
        print(
            f"kappa {kappa}: "
            + ", ".join(f"{a} {r['plain']:.2f} -> {r['mean_corrected']:.2f}" for a, r in res[k].items()),
            flush=True,
        )
    return res


if __name__ == "__main__":
    sys.exit(main())
