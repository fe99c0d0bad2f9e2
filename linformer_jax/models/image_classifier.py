"""What the image classifiers (XCiT, ViT) share: input checks and the timm-style head API."""
from __future__ import annotations

import flax.linen as nn
import jax

from linformer_jax._validate import check_choice, check_int, check_rate


def check_images(images: jax.Array, in_chans: int, patch_size: int) -> None:
  """images must be NHWC (batch, H, W, in_chans) with H and W divisible by patch_size (ValueError)."""
  if images.ndim != 4 or images.shape[-1] != in_chans:
    raise ValueError(f"images must be NHWC (batch, H, W, {in_chans}), got shape {images.shape}.")
  h, w = images.shape[1:3]
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}; "
                     f"resize or crop to multiples of {patch_size}.")


class BlockFields(nn.Module):
  """The fields every image-transformer block starts with (ViT, XCA and class-attention blocks).

  Attributes:
    num_heads: attention heads. mlp_ratio: MLP hidden width / embedding width. qkv_bias: biases on Q, K, V.
    drop_rate: dropout after the attention projection and in the MLP. attn_drop_rate: dropout on the weights.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0


class TokenClassifier(nn.Module):
  """The fields XCiT and ViT share (defined and checked here once), and ``forward_head``/``__call__`` for modules
  with ``forward_features`` returning (batch, 1 + N, C), CLS first, and submodules ``head_drop``, ``head``.

  Attributes:
    img_size: the resolution of the published variant / position table. patch_size; in_chans: input channels.
    num_classes: head outputs (0 = no head). embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
    drop_rate, attn_drop_rate, drop_path_rate: dropout rates (each model's docstring says where they apply).
    global_pool: "token" (CLS) | "avg" (mean of the patch tokens).
  """
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  global_pool: str = "token"

  def __post_init__(self):
    for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
      check_int(name, getattr(self, name), minimum=1)
    check_int("num_classes", self.num_classes, minimum=0)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    check_choice("global_pool", self.global_pool, ("token", "avg"))
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
      check_rate(name, getattr(self, name))
    super().__post_init__()

  def forward_head(self, tokens: jax.Array, pre_logits: bool = False, train: bool = False) -> jax.Array:
    """tokens (batch, 1 + N, C) → pooled features (batch, C) if pre_logits else logits (batch, num_classes)."""
    x = tokens[:, 1:].mean(axis=1) if self.global_pool == "avg" else tokens[:, 0]
    x = self.head_drop(x, deterministic=not train)
    return x if pre_logits or not self.num_classes else self.head(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.forward_head(self.forward_features(images, train), train=train)
