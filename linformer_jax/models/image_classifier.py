"""What the image classifiers (XCiT, ViT) share: input checks and the timm-style head API."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import as_dtype, check_choice, check_int, check_rate


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
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / embedding width.
    qkv_bias: biases on Q, K, V.
    drop_rate: dropout after the attention projection and in the MLP.
    attn_drop_rate: dropout on the attention weights.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0


class TokenClassifier(nn.Module):
  """The fields XCiT and ViT share (defined and checked here once), and ``forward_head``/``__call__``/
  ``get_classifier``/``reset_classifier`` for modules with ``forward_features`` returning (batch, 1 + N, C), CLS
  first, and submodules ``head_drop``, ``head``.

  Attributes:
    img_size: the resolution of the published variant / position table.
    patch_size: side of the square patches, in pixels.
    in_chans: input channels.
    num_classes: head outputs (0 = no head).
    embed_dim: token width C.
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden width / embed_dim.
    qkv_bias: biases on Q, K, V.
    drop_rate: dropout rate (each model's docstring says where it applies).
    attn_drop_rate: dropout rate on the attention weights.
    drop_path_rate: stochastic-depth rate (each model's docstring says how it is spread over the blocks).
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
  #: Compute dtype (``jnp.float32`` | ``jnp.bfloat16`` | ``jnp.float16``; the names in a config) of every
  #: convolution, matmul and attention product, and of the activations. Each model's docstring says what stays
  #: float32.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in (cast to ``dtype`` where used).
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
      check_int(name, getattr(self, name), minimum=1)
    check_int("num_classes", self.num_classes, minimum=0)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    check_choice("global_pool", self.global_pool, ("token", "avg"))
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
      check_rate(name, getattr(self, name))
    as_dtype("dtype", self.dtype)
    as_dtype("param_dtype", self.param_dtype)
    super().__post_init__()

  def forward_head(self, tokens: jax.Array, pre_logits: bool = False, train: bool = False) -> jax.Array:
    """tokens (batch, 1 + N, C) → pooled features (batch, C) if pre_logits else logits (batch, num_classes)."""
    x = tokens[:, 1:].mean(axis=1) if self.global_pool == "avg" else tokens[:, 0]
    x = self.head_drop(x, deterministic=not train)
    return x if pre_logits or not self.num_classes else self.head(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits, ``forward_head(forward_features(images, train), train=train)``.

    Args:
      images: NHWC (batch, H, W, in_chans), H and W multiples of ``patch_size``.
      train: enables dropout and stochastic depth (rng "dropout") and, where the model has BatchNorm, batch
        statistics (``batch_stats`` mutable).

    Returns:
      logits (batch, num_classes), or the pooled features (batch, embed_dim) when num_classes=0.
    """
    return self.forward_head(self.forward_features(images, train), train=train)

  @nn.nowrap
  def get_classifier(self, variables) -> dict:
    """The linear map that produces the logits from ``forward_head(..., pre_logits=True)``'s features.

    Args:
      variables: this model's variables.

    Returns:
      {"kernel": (embed_dim, num_classes), "bias": (num_classes,)}: the ``head`` Dense.

    Raises:
      ValueError: the model has no head (num_classes=0).
    """
    if not self.num_classes:
      raise ValueError(f"get_classifier: this {type(self).__name__} has no head (num_classes=0); its forward "
                       "returns the pooled features. Add one with reset_classifier(model, num_classes).")
    head = variables["params"]["head"]
    return {"kernel": head["kernel"], "bias": head["bias"]}

  @nn.nowrap
  def reset_classifier(self, num_classes: int):
    """timm's ``reset_classifier``, functional: a copy of this model with a new head of num_classes outputs.

    Args:
      num_classes: outputs of the new head; 0 = no head (forward then returns the pooled features).

    Returns:
      ``(new_model, transfer)``; ``transfer(variables, rng) -> new_variables`` keeps every variable (parameters and
      batch statistics) but the ``head`` Dense and initialises a new one with rng.
    """
    new_model = self.clone(num_classes=num_classes)
    tokens = jax.numpy.zeros((1, 2, self.embed_dim), jax.numpy.float32)

    def transfer(variables, rng: jax.Array):
      params = {name: p for name, p in variables["params"].items() if name != "head"}
      if num_classes:
        params["head"] = new_model.init(rng, tokens, method="forward_head")["params"]["head"]
      return {**variables, "params": params}

    return new_model, transfer
