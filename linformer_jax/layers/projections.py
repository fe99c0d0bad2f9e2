"""Sequence-axis projections E, F of Linformer (arXiv 2006.04768, Eq. 7 and Sec. 4).

Keys and values of shape (batch, n, heads, head_dim) are mapped along the sequence axis from n <= max_len
to k positions: K̄ = E·K with E ∈ R^{k×n}. Methods:

* ``learnable``: a trainable matrix, stored as ``kernel`` of shape (max_len, k) (or (heads, max_len, k)),
  xavier-normal initialised as in linformer-pytorch; optional bias of shape (k,) (``use_bias=True``, as
  linformer-pytorch's ``nn.Linear(n, k)``; the paper has no bias).
* ``fixed``: a random matrix drawn N(0, 1/k) (variance 1/k, as in the paper's Theorem 2) at ``init`` and stored
  in the non-trainable ``"constants"`` collection, so it is saved and restored with the model.
* ``conv``: a 1-D convolution over the sequence with kernel = stride = s = ceil(max_len / k), mixing the
  head_dim channels, stored as ``conv_kernel`` (s, head_dim, head_dim) and ``bias`` (head_dim,).
* ``mean_pool`` / ``max_pool``: parameter-free pooling with window = stride = s = ceil(max_len / k).

Variable length: for n < max_len the learnable/fixed matrices are sliced to their first n rows; conv and
pooling zero-pad the input to max_len. Padding for exactly k windows: when k does not divide max_len the
input is zero-padded at the end from max_len to s·k, so the output always has exactly k positions
(e.g. max_len=500, k=128: s=4, 12 zero rows appended). When k divides max_len this is plain
kernel = stride = max_len/k, identical to linformer-pytorch's ``Conv1d``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from linformer_jax._validate import check_choice, check_int

#: The projection methods of ``SeqProjection`` (see the module docstring).
PROJECTIONS = ("learnable", "conv", "mean_pool", "max_pool", "fixed")
#: Name of the variable collection of non-trainable variables (the ``fixed`` random projection).
CONSTANTS = "constants"


def pool_window(max_len: int, k: int) -> int:
  """Kernel = stride of the conv/pooling projections: ceil(max_len / k)."""
  return -(-max_len // k)


def fixed_projection_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Entries drawn from N(0, 1/k) (variance 1/k), k = shape[-1]."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


def check_projected_length(k: int, max_len: int) -> None:
  """The one check of k against max_len: ints with 1 <= k <= max_len (the projection maps n <= max_len positions
  to k). Raises TypeError / ValueError naming both."""
  check_int("max_len", max_len, minimum=1)
  check_int("k", k, minimum=1)
  if k > max_len:
    raise ValueError(f"k={k} exceeds max_len={max_len}; the projection maps n <= max_len positions to k, so k must "
                     "be in [1, max_len].")


class SeqProjection(nn.Module):
  """Projects (batch, n, heads, head_dim) to (batch, k, heads, head_dim) along the sequence axis.

  Attributes:
    max_len: largest sequence length n the projection accepts.
    k: number of projected positions.
    method: one of ``PROJECTIONS``.
    num_heads: None = one projection shared by all heads; an int = one projection per head (sharing="none").
    use_bias: add a bias of shape (k,) (learnable) or (head_dim,) (conv) — linformer-pytorch compatibility.
  """
  max_len: int
  k: int
  method: str = "learnable"
  num_heads: Optional[int] = None
  use_bias: bool = False
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_choice("projection", self.method, PROJECTIONS)
    check_projected_length(self.k, self.max_len)
    check_int("num_heads", self.num_heads, minimum=1, allow_none=True)
    super().__post_init__()

  def _lead(self) -> tuple:
    return () if self.num_heads is None else (self.num_heads,)

  @nn.compact
  def __call__(self, x: jax.Array, matrix: bool = False):
    """Projects ``x`` along the sequence axis, or returns the matrix that would (``matrix=True``).

    Args:
      x: (batch, n, heads, head_dim), n <= max_len.
      matrix: return ``(E, bias)`` instead of applying them: E = the whole learnable/fixed matrix,
        (max_len, k) or (heads, max_len, k), in ``dtype`` (row j belongs to position j); bias (k,) or (heads, k),
        or None without ``use_bias`` (the causal Linformer applies them itself).

    Returns:
      (batch, k, heads, head_dim), or ``(E, bias)`` with ``matrix=True``.

    Raises:
      ValueError: n > max_len, a head count other than ``num_heads``, or ``matrix=True`` with a conv/pooling
        method (no matrix of positions).
    """
    b, n, h, d = x.shape
    if n > self.max_len:
      raise ValueError(f"sequence length n={n} exceeds max_len={self.max_len} of the projection.")
    if self.num_heads is not None and h != self.num_heads:
      raise ValueError(f"input has {h} heads, projection was built for num_heads={self.num_heads}.")
    per_head = self.num_heads is not None
    x = x.astype(self.dtype)
    if matrix and self.method not in ("learnable", "fixed"):
      raise ValueError(f"matrix=True needs method 'learnable' or 'fixed' (a matrix of positions), got "
                       f"{self.method!r}.")

    if self.method in ("learnable", "fixed"):
      shape = self._lead() + (self.max_len, self.k)
      if self.method == "learnable":
        init = nn.initializers.xavier_normal(in_axis=-2, out_axis=-1,
                                             batch_axis=(0,) if per_head else ())
        e = self.param("kernel", init, shape, self.param_dtype)
      else:
        e = self.variable(CONSTANTS, "kernel", lambda: fixed_projection_init(
            self.make_rng("params"), shape, self.param_dtype)).value
      e = e.astype(self.dtype)
      bias = None
      if self.use_bias:
        bias = self.param("bias", nn.initializers.zeros, self._lead() + (self.k,), self.param_dtype)
        bias = bias.astype(self.dtype)
      if matrix:
        return e, bias
      e = e[..., :n, :]  # variable length: first n rows of E
      # K̄_{j} = Σ_i E_{ij} K_i
      y = jnp.einsum("bnhd,hnk->bkhd" if per_head else "bnhd,nk->bkhd", x, e)
      if bias is not None:
        y = y + (bias.T[None, :, :, None] if per_head else bias[None, :, None, None])
      return y

    # conv / pooling: pad to max_len (variable length), then to s·k so there are exactly k windows.
    s = pool_window(self.max_len, self.k)
    x = jnp.pad(x, ((0, 0), (0, s * self.k - n), (0, 0), (0, 0)))
    windows = x.reshape(b, self.k, s, h, d)  # window j holds positions j·s … j·s + s - 1
    if self.method == "mean_pool":
      return windows.mean(axis=2)
    if self.method == "max_pool":
      return windows.max(axis=2)
    # conv: kernel = stride = s; y_{j,e} = Σ_{t,c} x_{j·s+t, c} W_{t,c,e} + b_e
    kernel = self.param(
        "conv_kernel",
        nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,) if per_head else ()),
        self._lead() + (s, d, d), self.param_dtype).astype(self.dtype)
    y = jnp.einsum("bkshc,hsce->bkhe" if per_head else "bkshc,sce->bkhe", windows, kernel)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, self._lead() + (d,), self.param_dtype)
      y = y + bias.astype(self.dtype)  # (d,) or (h, d) broadcasts over (b, k, h, d)
    return y
