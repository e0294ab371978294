"""HuggingFace import/export (transformers' Llama and GPT-2 classes; local directories only)."""
