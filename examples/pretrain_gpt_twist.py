"""Megatron-LM's GPT pretraining with TwIST: a drop-in for Megatron-LM's pretrain_gpt.py.

Launch it exactly like pretrain_gpt.py, plus TwIST's flags (README, "Megatron-LM's own loop"):

    export MEGATRON_LM_PATH=/path/to/Megatron-LM     # default: ../shared/megatron-lm from this repo
    torchrun --nproc_per_node 8 examples/pretrain_gpt_twist.py \\
        <your usual pretrain_gpt.py arguments: --num-layers ... --data-path ... > \\
        --keep-ratio 0.5 --num-subnets 4 --local-steps 15

What changes against pretrain_gpt.py (nothing inside Megatron-LM is modified):

1. Arguments: TwIST's flags join Megatron-LM's parser through its ``extra_args_provider``.
2. Model: ``TwistMegatronLM(model_provider).model_provider`` calls Megatron-LM's model_provider
   twice: at full size (the central model, kept by TwIST) and with the subnet's sizes (the model
   Megatron-LM trains on this rank). Megatron-LM's DistributedDataParallel reduces gradients
   over the SUBNET's replicas only (integrations/megatron_lm.py).
3. The per-iteration hook wraps Megatron-LM's ``train_step``: every ``--local-steps`` iterations
   all subnets are averaged into the central model, the next round's subnets drawn and this
   rank's model and Adam state refilled.
4. Checkpoints: with ``--save DIR`` every Megatron-LM checkpoint gets TwIST's state (central model,
   moments, step, round) in ``DIR/twist``, so ``--load DIR`` resumes exactly; ``--twist-save DIR2``
   writes the final central model to DIR2. Cut the dense model with
   ``twist extract --load DIR/twist --keep-ratio 0.5 --save cut/`` (any TP/PP).

On a machine without CUDA, megatron_twist/integrations/megatron_lm_cpu.py bends Megatron-LM's
loop for CPU + gloo at run time (pass ``--distributed-backend gloo --transformer-impl local``).
"""

from __future__ import annotations

import os
import sys

# Run from a checkout without installing: the repository root holds the megatron_twist package.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from megatron_twist.integrations.megatron_lm import TwistMegatronLM, use_megatron_lm

    use_megatron_lm()  # Megatron-LM on sys.path; on a CPU machine, the run-time CPU shim
    from functools import partial

    import megatron.training.training as megatron_training  # Megatron-LM, not megatron-core
    from gpt_builders import gpt_builder
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from model_provider import model_provider
    from pretrain_gpt import forward_step, get_embedding_ranks, train_valid_test_datasets_provider

    twist_lm = TwistMegatronLM(partial(model_provider, gpt_builder))
    twist_lm.install(megatron_training)
    train_valid_test_datasets_provider.is_distributed = True
    try:
        pretrain(
            train_valid_test_datasets_provider,
            twist_lm.model_provider,
            ModelType.encoder_or_decoder,
            twist_lm.forward_step(forward_step),
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
            extra_args_provider=twist_lm.extra_args_provider,
            get_embedding_ranks=get_embedding_ranks,
        )
    except SystemExit as stop:  # --exit-interval: Megatron-LM saved (TwIST's state too) and exits
        if stop.code not in (0, None):
            raise
    twist_lm.finish()


if __name__ == "__main__":
    from megatron_twist.errors import ConfigError

    try:
        main()
    except ConfigError as refused:  # a flag TwIST cannot honour: the reason and the fix, exit code 2
        print(f"pretrain_gpt_twist.py: error: {refused}", file=sys.stderr, flush=True)
        sys.exit(2)
