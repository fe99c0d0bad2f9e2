"""What the image classifiers (XCiT, ViT) share: input checks and the timm-style head API."""
from __future__ import annotations

import flax.linen as nn
import jax


def check_images(images: jax.Array, in_chans: int, patch_size: int) -> None:
  """images must be NHWC (batch, H, W, in_chans) with H and W divisible by patch_size (ValueError)."""
  if images.ndim != 4 or images.shape[-1] != in_chans:
    raise ValueError(f"images must be NHWC (batch, H, W, {in_chans}), got shape {images.shape}.")
  h, w = images.shape[1:3]
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}; "
                     f"resize or crop to multiples of {patch_size}.")


class TokenClassifier(nn.Module):
  """``forward_head`` and ``__call__`` for modules with ``forward_features`` returning (batch, 1 + N, C),
  CLS first, and fields ``global_pool`` ("token" | "avg"), ``num_classes``, submodules ``head_drop``, ``head``."""

  def forward_head(self, tokens: jax.Array, pre_logits: bool = False, train: bool = False) -> jax.Array:
    """tokens (batch, 1 + N, C) → pooled features (batch, C) if pre_logits else logits (batch, num_classes)."""
    x = tokens[:, 1:].mean(axis=1) if self.global_pool == "avg" else tokens[:, 0]
    x = self.head_drop(x, deterministic=not train)
    return x if pre_logits or not self.num_classes else self.head(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.forward_head(self.forward_features(images, train), train=train)
