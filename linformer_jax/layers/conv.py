"""Depthwise 2-D convolution written as a sum of shifted slices.

    y[i, j, c] = b[c] + Σ_{u, v} x_pad[i + u, j + v, c] · K[u, v, 0, c]

Same parameters as ``nn.Conv(C, (kh, kw), feature_group_count=C)`` (kernel (kh, kw, 1, C), bias (C,), same
initialisers), so checkpoints and converted weights are interchangeable. XLA fuses the kh·kw multiply-adds into
one elementwise loop, where XLA:CPU lowers the grouped ``lax.conv`` it replaces to a slow generic loop (XCiT's
LPI; timings of both: docs/benchmarks.md §3).
Only x and the kernel are kept for the backward pass (the shifted products are recomputed).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class DepthwiseConv2D(nn.Module):
  """Depthwise 2-D convolution, stride 1, "same" zero padding; parameters as ``nn.Conv(..., feature_group_count=C)``.

  Attributes:
    kernel_size: (kh, kw), both odd.
    use_bias: add a per-channel bias.
  """
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.kernel_size) != 2 or any(k < 1 or k % 2 == 0 for k in self.kernel_size):
      raise ValueError(f"kernel_size must be two odd positive ints, got {self.kernel_size}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves each channel of x (batch, H, W, C) with its own kernel; returns (batch, H, W, C)."""
    kh, kw = self.kernel_size
    c = x.shape[-1]
    kernel = self.param("kernel", nn.linear.default_kernel_init, (kh, kw, 1, c), self.param_dtype)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    y = _depthwise(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype).astype(self.dtype)
    return y


@jax.checkpoint  # keep only x and the kernel for the backward pass, not the kh·kw shifted products
def _depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  kh, kw = kernel.shape[:2]
  h, w = x.shape[-3:-1]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return sum(xp[:, u:u + h, v:v + w, :] * kernel[u, v, 0] for u in range(kh) for v in range(kw))
