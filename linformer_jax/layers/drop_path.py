"""Stochastic depth (drop path): drop a residual branch for a whole sample with probability ``rate``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
  """Drops the whole input of a sample with probability ``rate``.

  Kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged.

  Attributes:
    rate: drop probability, in [0, 1).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Zeroes each sample of x (batch, ...) with probability ``rate`` and rescales the others.

    Args:
      x: (batch, ...); the decision is per sample (leading axis).
      deterministic: True (or ``rate == 0``) returns x unchanged; False draws from the ``"dropout"`` rng.

    Returns:
      An array of x's shape and dtype.
    """
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)
