"""megatron-twist: TwIST (independent subnetwork training) for Megatron-core and DeepSpeed."""

from setuptools import find_packages, setup

# Pinned to the set measured to work together on Python 3.11 (see docs/ARCHITECTURE.md,
# "Platform"). torch must be installed FIRST with the same pin (scripts/setup_env.sh),
# otherwise pip may resolve a multi-GB CUDA build.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "sentencepiece==0.2.3",
    "safetensors>=0.4",
    "protobuf>=4",  # transformers reads sentencepiece models with it (tokenizer export to HF)
    "numpy>=1.26",
    "mpich==5.0.2",
    "mpi4py==4.1.2",
]

setup(
    name="megatron-twist",
    version="0.1.0",
    description="TwIST: independent subnetwork training of transformers on Megatron-core and DeepSpeed",
    packages=find_packages(include=["megatron_twist", "megatron_twist.*"]),
    python_requires=">=3.10,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff==0.17.6"],
        "plot": ["matplotlib>=3.8"],
        # lm-evaluation-harness on exported models (examples/lm_eval); tested in the suite
        "eval": ["lm-eval==0.4.13"],
    },
    entry_points={"console_scripts": ["twist=megatron_twist.cli:main"]},
)
