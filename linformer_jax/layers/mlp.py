"""Position-wise feed-forward network: Dense(dim_ff) → activation → dropout → Dense(dim) → dropout."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import check_bool, check_choice, check_int, check_rate
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.remat import REMAT_POLICIES, checkpoint_policy

_SQRT_HALF = 0.7071067811865476  # 1/√2


def exact_gelu(x: jax.Array) -> jax.Array:
  """``GELU(x) = x·Φ(x) = ½·x·(1 + erf(x/√2))``: the exact (erf) GELU, by the formula of torch's CPU kernel.

  Same function as ``jax.nn.gelu(x, approximate=False)``, which evaluates ½·x·erfc(−x/√2); XLA:CPU computes erf
  about twice as fast as erfc (forward and backward of the FF activation). The two agree to ~1e-6 absolute; the erf
  form loses relative precision only where ``|GELU(x)| < 1e-5`` (x < −4.4), as torch's does. Written as
  h + h·erf(x/√2) with h = x/2: one scalar constant fewer for XLA:CPU's fused kernels, which take each scalar as
  a full (tokens, dim_ff) array (timings: docs/benchmarks.md §2, "GELU without the "1 +"").
  """
  half = 0.5 * x
  return half + half * jax.lax.erf(x * _SQRT_HALF)


#: Activation functions of ``FeedForward`` by name; "gelu" is the exact (erf) GELU, as torch's ``nn.GELU()``.
ACTIVATIONS = {
    "gelu": exact_gelu,  # exact (erf) GELU, as torch's F.gelu / nn.GELU()
    "relu": jax.nn.relu,
}


def sequence_chunks(n: int, dim: int, dim_ff: int) -> int:
  """How many chunks the feed-forward splits a length-n sequence into at level C2.

  The largest divisor of n that is <= dim_ff // dim (the width ratio, 4 in the usual FF): one chunk's hidden
  activations (n/chunks × dim_ff) are then no bigger than the sub-layer's input (n × dim).
  """
  ratio = max(1, dim_ff // dim)
  return max(c for c in range(1, min(ratio, n) + 1) if n % c == 0)


class FeedForward(nn.Module):
  """Position-wise feed-forward network: Dense(dim_ff) → activation → dropout → Dense(dim) → dropout.

  Attributes:
    dim_ff: hidden width.
    activation: a key of ``ACTIVATIONS``, "gelu" | "relu".
    dropout: rate of both dropouts.
    remat_chunks: (level C2) run over the sequence axis (-2) in ``sequence_chunks`` pieces, each under
      ``jax.checkpoint`` with ``remat_policy``, so only one chunk's (n/chunks × dim_ff) hidden activations are
      live in the backward pass. Same parameters and (without dropout) the same values as unchunked.
    remat_policy: the checkpoint policy name of the chunks (one of ``linformer_jax.remat.REMAT_POLICIES``).
  """
  dim_ff: int
  activation: str = "gelu"
  dropout: float = 0.0
  remat_chunks: bool = False
  remat_policy: str = "nothing_saveable"
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_int("dim_ff", self.dim_ff, minimum=1)
    check_choice("activation", self.activation, tuple(ACTIVATIONS))
    check_rate("dropout", self.dropout)
    check_bool("remat_chunks", self.remat_chunks)
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    super().__post_init__()

  def _ff(self, block, x, deterministic):
    """The network on x (..., dim), its submodules created on ``block`` (self, or self inside a lifted
    transform) with explicit names, so the parameter tree is the same with and without chunks."""
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                     dot_general=flat_dot_general, parent=block)
    drop = lambda y: nn.Dropout(self.dropout, parent=block)(y, deterministic=deterministic)
    h = drop(ACTIVATIONS[self.activation](dense(self.dim_ff, "wi")(x)))
    return drop(dense(x.shape[-1], "wo")(h))

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """Applies the network to every position of ``x``.

    Args:
      x: (..., n, dim).
      deterministic: False applies dropout (needs a ``"dropout"`` rng).

    Returns:
      (..., n, dim).
    """
    if not self.remat_chunks or x.ndim < 2:
      return self._ff(self, x, deterministic)
    n, dim = x.shape[-2:]
    chunks = sequence_chunks(n, dim, self.dim_ff)
    if chunks == 1:
      return self._ff(self, x, deterministic)
    xs = jnp.moveaxis(x.reshape(x.shape[:-2] + (chunks, n // chunks, dim)), -3, 0)  # (chunks, ..., n/c, dim)
    body = nn.remat(lambda block, carry, xc: (carry, self._ff(block, xc, deterministic)),
                    policy=checkpoint_policy(self.remat_policy), prevent_cse=False)
    _, ys = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                    length=chunks)(self, None, xs)
    return jnp.moveaxis(ys, 0, -3).reshape(x.shape[:-1] + (ys.shape[-1],))
