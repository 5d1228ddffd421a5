"""Checkpoints of other frameworks, in and out: Hugging Face causal LMs (safetensors)."""
