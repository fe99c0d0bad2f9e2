"""Converters from other Linformer implementations' checkpoints to linformer_jax models."""
from linformer_jax.convert.linformer_pytorch import from_linformer_pytorch
from linformer_jax.convert.io import load_state_dict
from linformer_jax.convert.xcit import from_timm_xcit, restore_xcit_checkpoint, save_xcit_checkpoint

__all__ = ["from_linformer_pytorch"]
__all__ += ["load_state_dict", "from_timm_xcit", "restore_xcit_checkpoint", "save_xcit_checkpoint"]
