"""Stochastic depth (drop path): drop a residual branch for a whole sample with probability ``rate``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
  """Attributes: rate ∈ [0, 1). Call ``(x, deterministic=True)``; x (batch, …); uses the "dropout" rng.

  Kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)
