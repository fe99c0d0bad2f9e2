"""Position-wise feed-forward network: Dense(dim_ff) → activation → dropout → Dense(dim) → dropout."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import check_choice, check_int, check_rate

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU, as torch's F.gelu
    "relu": jax.nn.relu,
}


class FeedForward(nn.Module):
  """Attributes: dim_ff hidden width; activation "gelu" | "relu"; dropout rate on both dropouts.

  Call: ``(x, deterministic=True)`` with x (..., dim); returns (..., dim).
  """
  dim_ff: int
  activation: str = "gelu"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_int("dim_ff", self.dim_ff, minimum=1)
    check_choice("activation", self.activation, tuple(ACTIVATIONS))
    check_rate("dropout", self.dropout)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = ACTIVATIONS[self.activation](dense(self.dim_ff, "wi")(x))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.Dropout(self.dropout)(dense(x.shape[-1], "wo")(h), deterministic=deterministic)
