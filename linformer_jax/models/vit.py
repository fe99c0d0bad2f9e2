"""Plain ViT / DeiT baselines with full softmax attention (Dosovitskiy et al. 2020; Touvron et al. 2021),
laid out as timm's ``VisionTransformer`` so parameter counts match, for side-by-side comparison with XCiT.

Parameter tree: ``patch_embed`` (Conv p×p stride p), ``cls_token`` (1, 1, C), ``pos_embed`` (1, 1 + N, C) for
the default grid, ``blocks_{i}/{norm1, attn/{query, key, value, out}, norm2, mlp/{wi, wo}}``, ``norm``, ``head``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax.layers.attention import FullSelfAttention
from linformer_jax.layers.drop_path import DropPath
from linformer_jax.layers.mlp import FeedForward
from linformer_jax.layers.softmax_kernel import check_kernel_args
from linformer_jax.models.image_classifier import BlockFields, TokenClassifier, check_images

#: LayerNorm epsilon of every LayerNorm in the model (timm's).
LN_EPS = 1e-6
# Initialiser of the CLS token, the position table and the head: truncated normal, standard deviation 0.02.
_dense_init = nn.initializers.truncated_normal(0.02)


class ViTBlock(BlockFields):
  """Pre-LN block: x ← x + DropPath(Attn(LN(x))); x ← x + DropPath(MLP(LN(x))).

  Besides the ``BlockFields``:

  Attributes:
    drop_path_rate: stochastic-depth rate of both branches.
    attention_impl: the attention kernel's implementation (``FullSelfAttention`` field).
    attention_block_rows: queries per block of the attention kernel (``FullSelfAttention`` field).
  """
  drop_path_rate: float = 0.0
  attention_impl: Optional[str] = None
  attention_block_rows: Optional[int] = None
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to tokens x (batch, N, C); ``train`` enables dropout and drop path. Returns (batch, N, C)."""
    det = not train
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop_path = lambda y: DropPath(self.drop_path_rate)(y, deterministic=det)
    attn = FullSelfAttention(self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attn_drop_rate,
                             attention_impl=self.attention_impl, attention_block_rows=self.attention_block_rows,
                             **precision, name="attn")
    y = attn(nn.LayerNorm(LN_EPS, **precision, name="norm1")(x), deterministic=det)
    x = x + drop_path(nn.Dropout(self.drop_rate)(y, deterministic=det))
    mlp = FeedForward(int(x.shape[-1] * self.mlp_ratio), "gelu", self.drop_rate, **precision, name="mlp")
    return x + drop_path(mlp(nn.LayerNorm(LN_EPS, **precision, name="norm2")(x), deterministic=det))


class VisionTransformer(TokenClassifier):
  """ViT with a CLS token and learned position embeddings.

  The fields are those of ``TokenClassifier`` plus the two below. ``img_size`` is the position table's
  resolution; other sizes divisible by patch_size are handled by bilinear resizing of the table.
  ``drop_path_rate`` increases linearly over depth, as DeiT. With dtype=bfloat16 the patch convolution, every
  matmul and attention product and the residual stream are bfloat16, while the LayerNorm statistics, the attention
  logits and softmax (``linformer_jax.layers``), the loss and the optimizer state stay float32 (sums and
  exponentials, whose rounding would grow with the token count); cls_token and pos_embed are stored in param_dtype
  and cast to dtype where added. Call: ``module.apply(variables, images, train=False)``; images
  (batch, H, W, in_chans) → (batch, num_classes).

  Attributes:
    attention_impl: "xla" | "dot_product_attention"; None = the default for the backend and dtype (see
      ``linformer_jax.layers.softmax_kernel``).
    attention_block_rows: queries per block of the attention kernel; None = the backend's default, 0 = never
      block.
  """
  attention_impl: Optional[str] = None
  attention_block_rows: Optional[int] = None

  def __post_init__(self):
    check_kernel_args(self.attention_impl, self.attention_block_rows,
                      names=("attention_impl", "attention_block_rows"))
    super().__post_init__()
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}.")

  def setup(self):
    p, g = self.patch_size, self.img_size // self.patch_size
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", **precision)
    self.cls_token = self.param("cls_token", _dense_init, (1, 1, self.embed_dim), self.param_dtype)
    self.pos_embed = self.param("pos_embed", _dense_init, (1, 1 + g * g, self.embed_dim), self.param_dtype)
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    self.blocks = [ViTBlock(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate, self.attn_drop_rate,
                            r, attention_impl=self.attention_impl, attention_block_rows=self.attention_block_rows,
                            **precision)
                   for r in rates]
    self.norm = nn.LayerNorm(LN_EPS, **precision)
    self.pos_drop = nn.Dropout(self.drop_rate)
    self.head_drop = nn.Dropout(self.drop_rate)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, **precision)

  def _pos_embed(self, hp: int, wp: int) -> jax.Array:
    g = self.img_size // self.patch_size
    table = self.pos_embed.astype(self.dtype)  # resized (a matmul per axis) in the compute dtype
    cls_pos, grid_pos = table[:, :1], table[:, 1:]
    if (hp, wp) != (g, g):
      grid = grid_pos.reshape(1, g, g, self.embed_dim)
      grid_pos = jax.image.resize(grid, (1, hp, wp, self.embed_dim), "bilinear").reshape(1, hp * wp, -1)
    return jnp.concatenate([cls_pos, grid_pos], axis=1)

  def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images (batch, H, W, in_chans) → tokens after the final LayerNorm, (batch, 1 + N, C), CLS first."""
    check_images(images, self.in_chans, self.patch_size)
    x = self.patch_embed(images)
    b, hp, wp, c = x.shape
    cls = jnp.broadcast_to(self.cls_token, (b, 1, c)).astype(x.dtype)
    x = jnp.concatenate([cls, x.reshape(b, hp * wp, c)], axis=1)
    x = self.pos_drop(x + self._pos_embed(hp, wp), deterministic=not train)
    for blk in self.blocks:
      x = blk(x, train)
    return self.norm(x)
