"""Converters from other Linformer implementations' checkpoints to linformer_jax models."""
from linformer_jax.convert.linformer_pytorch import from_linformer_pytorch

__all__ = ["from_linformer_pytorch"]
