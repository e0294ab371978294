"""megatron-twist: TwIST (independent subnetwork training) on Megatron-core and DeepSpeed.

Parts (docs/ARCHITECTURE.md):
    config          ModelConfig / TwistConfig / TrainConfig
    arguments       add_twist_args (Megatron extra_args_provider) and the CLI's flags
    cpu_shim        the one place Megatron-core is adapted to CUDA-less machines
    model/          Megatron-core GPTModel construction (llama and gpt2 families)
    twist/          sampler, slicing, hooks, aggregation, central model, worker, extraction
    distributed/    process groups and their lifecycle
    training/       optimizer, the train step, batch sources, the TwIST loop
    data/           corpus, sentencepiece tokenizer, Megatron indexed datasets
    checkpointing, model_io, evaluation, cli
"""

from .arguments import add_twist_args, validate_twist_args
from .config import ConfigError, ModelConfig, TrainConfig, TwistConfig

__version__ = "0.1.0"
__all__ = ["add_twist_args", "validate_twist_args", "ConfigError", "ModelConfig", "TrainConfig", "TwistConfig"]
