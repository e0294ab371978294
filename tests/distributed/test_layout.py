"""Parallel layouts are validated before any process group exists (pure checks, no processes)."""

from __future__ import annotations

import pytest

from megatron_twist.config import MODEL_PRESETS, ConfigError, ModelConfig, TwistConfig
from megatron_twist.distributed.runtime import ParallelLayout
from megatron_twist.training.twist_trainer import check_model_layout


@pytest.mark.parametrize(
    "world,subnets,tp,pp,replicas,per_rank",
    [
        (8, 2, 2, 1, 2, 1),  # TP=2, DP=4 = 2 subnets x 2 replicas
        (4, 2, 2, 1, 1, 1),  # TP=2 x 2 subnets
        (4, 2, 1, 2, 1, 1),  # PP=2 x 2 subnets
        (2, 4, 1, 1, 1, 2),  # 2 ranks take 4 subnets in turn
        (16, 4, 2, 2, 1, 1),
    ],
)
def test_valid_layouts(world, subnets, tp, pp, replicas, per_rank):
    layout = ParallelLayout.for_world(world, subnets, tp, pp)
    assert layout.data_parallel * tp * pp == world
    assert layout.replicas == replicas and layout.subnets_per_rank == per_rank


@pytest.mark.parametrize(
    "world,subnets,tp,pp,match",
    [
        (6, 2, 4, 1, "do not divide into tensor parallel 4 x pipeline parallel 1"),
        (6, 4, 1, 1, "6 data-parallel ranks do not divide into 4 subnets"),
        (4, 3, 2, 1, "--num-subnets 3 does not divide over 2 data-parallel ranks"),
        (4, 2, 0, 1, "must be at least 1"),
    ],
)
def test_bad_layouts(world, subnets, tp, pp, match):
    with pytest.raises(ConfigError, match=match):
        ParallelLayout.for_world(world, subnets, tp, pp)


def test_model_must_split_over_the_layout():
    tiny = ModelConfig(**MODEL_PRESETS["tiny"])  # 2 layers, 4 heads in 2 groups, ffn 128, vocab 512
    twist = TwistConfig(keep_ratio=0.5, num_subnets=2)
    check_model_layout(tiny, twist, 2, 2)
    with pytest.raises(ConfigError, match="2 layers do not divide over pipeline parallel size 4"):
        check_model_layout(tiny, twist, 1, 4)
    with pytest.raises(ConfigError, match="num_query_groups 2 does not divide over tensor parallel size 4"):
        check_model_layout(tiny, twist, 4, 1)
    with pytest.raises(ConfigError, match="vocabulary 510 does not divide over tensor parallel size 4"):
        odd = ModelConfig(**dict(MODEL_PRESETS["tiny"], vocab_size=510, num_attention_heads=8, num_query_groups=4))
        check_model_layout(odd, twist, 4, 1)
    with pytest.raises(ConfigError, match="ties embedding and output weights"):
        check_model_layout(ModelConfig(**MODEL_PRESETS["tiny-gpt2"]), twist, 1, 2)


def test_balance_shards_must_be_a_multiple_of_tp():
    tiny = ModelConfig(**MODEL_PRESETS["tiny"])
    with pytest.raises(ConfigError, match="not a multiple of tensor parallel size 2"):
        check_model_layout(tiny, TwistConfig(keep_ratio=0.5, num_subnets=2, balance_shards=3), 2, 1)
