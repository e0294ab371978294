"""Megatron-LM's GPT pretraining with TwIST: a drop-in for Megatron-LM's pretrain_gpt.py.

Run it from a Megatron-LM checkout (it imports Megatron-LM's own pretrain_gpt.py), with
megatron-twist installed, exactly like pretrain_gpt.py plus TwIST's flags:

    cd Megatron-LM
    torchrun --nproc_per_node 8 /path/to/megatron-twist/examples/pretrain_gpt_twist.py \\
        <your usual pretrain_gpt.py arguments: --num-layers ... --data-path ... > \\
        --keep-ratio 0.5 --num-subnets 4 --local-steps 15

Step by step, what changes against pretrain_gpt.py (nothing inside Megatron-LM is modified):

1. Arguments: TwIST's flags (--keep-ratio, --num-subnets, --local-steps, --twist-seed,
   --twist-split, --no-coverage, --activation-correction, --optimizer-state,
   --twist-balance-shards) are added through Megatron-LM's `extra_args_provider`.
2. Model: `TwistMegatronLM(model_provider).model_provider` calls YOUR model_provider twice:
   once at full size (the central model, kept by TwIST, not trained directly) and once with
   the subnet's sizes swapped into `args` (the model Megatron-LM trains on this rank).
3. The per-iteration hook: `install(megatron.training.training)` wraps Megatron-LM's
   `train_step`. Before each iteration it reads `args.curr_iteration`; every
   `--local-steps` iterations it averages all subnets into the central model over the
   aggregation group, draws the next round's subnets and refills this rank's model and Adam
   state. Data-parallel size must be num_subnets x replicas (each rank trains one subnet).
4. At the end the central model is saved with megatron-twist's checkpoint format; cut the
   deployable dense model with `twist extract --load <dir> --keep-ratio 0.5`.

Limits of this path (refused with a clear message): --use-distributed-optimizer, fp16/bf16
main-parameter copies, --whole-layers. Everything above except Megatron-LM's own `pretrain`
loop is tested in tests/integrations/ (Megatron-LM is not a dependency of this project).
"""

from __future__ import annotations

import os


def main() -> None:
    # Megatron-LM (not megatron-core): its training loop and its GPT example's pieces.
    import megatron.training.training as megatron_training
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain
    from pretrain_gpt import forward_step, model_provider, train_valid_test_datasets_provider

    from megatron_twist.checkpoint.models import save_central
    from megatron_twist.integrations.megatron_lm import TwistMegatronLM

    twist_lm = TwistMegatronLM(model_provider)
    twist_lm.install(megatron_training)
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        train_valid_test_datasets_provider,
        twist_lm.model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        extra_args_provider=TwistMegatronLM.extra_args_provider,
    )
    args = get_args()
    twist_lm.hook.finish(args.train_iters)
    save_dir = os.path.join(args.save or ".", "twist-central")
    import torch.distributed as dist

    if dist.get_rank() == 0:  # TP=1/PP=1: rank 0 holds the whole central model
        from megatron_twist.config import TrainConfig

        save_central(save_dir, twist_lm.central, twist_lm.twist, TrainConfig(train_iters=args.train_iters))
        print(f"[twist] central model saved to {save_dir}; cut it with `twist extract --load {save_dir}`")


if __name__ == "__main__":
    main()
