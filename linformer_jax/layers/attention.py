"""Multi-head attention: Linformer (low-rank keys/values) and ordinary full softmax attention.

Linformer head i (arXiv 2006.04768, Eq. 7):

    head_i = softmax( Q W_i^Q (E_i K W_i^K)^T / sqrt(d_h) ) · F_i V W_i^V

where E_i, F_i ∈ R^{k×n} project the n keys/values down to k positions (``SeqProjection``). Sharing
(Sec. 4): ``none`` = own E_i, F_i per head; ``headwise`` = one E, one F per layer; ``kv`` = one matrix per
layer used as both E and F; ``layerwise`` = one matrix for the whole network, passed in as
``shared_projection``.

Padding: rows of K and V at padded positions (mask False) are zeroed before the projection, so outputs at
real tokens depend neither on the content of padded positions nor on how much padding follows.

The softmax kernel both modules call (``softmax_attention``, ``attention_weights``, ``softmax_last``) lives in
``linformer_jax.layers.softmax_kernel`` and is re-exported here; the modules pass it their ``attention_impl`` and
``attention_block_rows`` fields.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from linformer_jax._validate import check_bool, check_choice, check_int, check_length, check_mask, check_rate
from linformer_jax.layers.causal_linformer import (CAUSAL_ERROR, CAUSAL_PROJECTIONS, DEFAULT_CHUNK,
                                                   causal_linformer_attention, decode_step)
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.projections import PROJECTIONS, SeqProjection, check_projected_length
# The kernel lives in softmax_kernel; its public names stay importable from here.
from linformer_jax.layers import softmax_kernel as _softmax_kernel
from linformer_jax.layers.softmax_kernel import (attention_weights, check_kernel_args, default_block_rows,
                                                 default_implementation, softmax_attention, softmax_last)
from linformer_jax.remat import REMAT_POLICIES

#: The kernel's implementations (``softmax_kernel.IMPLEMENTATIONS``, re-exported): "xla" | "dot_product_attention".
IMPLEMENTATIONS = _softmax_kernel.IMPLEMENTATIONS

#: Parameter-sharing modes of the E/F projections, from none to one matrix for the whole network (Sec. 4).
SHARING = ("none", "headwise", "kv", "layerwise")

__all__ = ["SHARING", "FullSelfAttention", "LinformerSelfAttention", "IMPLEMENTATIONS", "attention_weights",
           "default_block_rows", "default_implementation", "softmax_attention", "softmax_last"]


def _check_decoding(decoding: bool, causal: bool) -> None:
  """decoding=True is only for causal attention (a decoder has not seen the later positions)."""
  check_bool("decoding", decoding)
  if decoding and not causal:
    raise ValueError("decoding=True (one position per call, from a cache) needs causal=True: without it every "
                     "position attends to later ones, which a decoder has not seen yet.")


class _MultiHead(nn.Module):
  """Shared pieces: per-head Q/K/V maps (no bias) and the output map W^O (with bias).

  Attributes:
    num_heads: number of heads h.
    head_dim: width d_h of each head; None = input dim // num_heads.
    out_dim: output width; None = input width.
    w_o_intermediate_dim: None = W^O is one (h·d_h → out) map; an int w = two maps h·d_h → w → out with no
      nonlinearity between (linformer-pytorch's ``w_o_intermediate_dim``).
    attention_dropout: dropout on the attention weights (train mode only).
    qkv_bias: biases on the Q/K/V maps (ViT style; the Linformer original has none).
    remat_heads: compute the attention core one head at a time under ``jax.checkpoint`` (level C2).
    remat_policy: the checkpoint policy name used then (see ``linformer_jax.remat``).
    attention_impl: the kernel's implementation, one of ``IMPLEMENTATIONS`` ("xla" | "dot_product_attention");
      None = the default for the backend and dtype (``default_implementation``).
    attention_block_rows: queries per block of the "xla" kernel; None = the backend's default
      (``default_block_rows``: blocks only for large scores on the CPU), 0 = never block.
  """
  num_heads: int
  head_dim: Optional[int] = None
  qkv_bias: bool = False
  remat_heads: bool = False
  remat_policy: str = "nothing_saveable"
  out_dim: Optional[int] = None
  w_o_intermediate_dim: Optional[int] = None
  attention_dropout: float = 0.0
  attention_impl: Optional[str] = None
  attention_block_rows: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_common(self):
    check_int("num_heads", self.num_heads, minimum=1)
    check_int("head_dim", self.head_dim, minimum=1, allow_none=True)
    check_int("out_dim", self.out_dim, minimum=1, allow_none=True)
    check_int("w_o_intermediate_dim", self.w_o_intermediate_dim, minimum=1, allow_none=True)
    check_rate("attention_dropout", self.attention_dropout)
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    check_kernel_args(self.attention_impl, self.attention_block_rows,
                      names=("attention_impl", "attention_block_rows"))

  def _head_dim(self, dim: int) -> int:
    if self.head_dim is not None:
      return self.head_dim
    if dim % self.num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={self.num_heads}; "
                       "set head_dim explicitly or choose num_heads dividing dim.")
    return dim // self.num_heads

  def _dense(self, features, name, axis=-1, use_bias=False):
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, dot_general=flat_dot_general, name=name)

  def _qkv(self, x, context):
    """x: (b, t, dim) → q (b, t, h, d_h); context: (b, s, dim_c) → k, v (b, s, h, d_h)."""
    feats = (self.num_heads, self._head_dim(x.shape[-1]))
    dense = lambda name: self._dense(feats, name, use_bias=self.qkv_bias)
    q = checkpoint_name(dense("query")(x), "query")
    k = checkpoint_name(dense("key")(context), "key")
    v = checkpoint_name(dense("value")(context), "value")
    return q, k, v

  def _out(self, o, dim):
    """o: (b, t, h, d_h) → (b, t, out_dim)."""
    out_dim = self.out_dim or dim
    if self.w_o_intermediate_dim is None:
      return self._dense(out_dim, "out", axis=(-2, -1), use_bias=True)(o)
    o = self._dense(self.w_o_intermediate_dim, "out_1", axis=(-2, -1), use_bias=True)(o)
    return self._dense(out_dim, "out_2", use_bias=True)(o)

  def _kernel_kwargs(self):
    """The kernel's explicit choices (``softmax_attention`` arguments) from this module's fields."""
    return dict(head_remat_policy=self.remat_policy if self.remat_heads else None,
                implementation=self.attention_impl, block_rows=self.attention_block_rows)

  def _dropout_rng(self, deterministic):
    if deterministic or self.attention_dropout == 0.0:
      return None
    return self.make_rng("dropout")

  def _sow_fn(self):
    """Attention maps are stored in "intermediates" only when the caller makes it mutable."""
    if not self.is_mutable_collection("intermediates"):
      return None
    return lambda w: self.sow("intermediates", "attention_weights", w)

  def _decode_position(self, x):
    """decoding=True: the position t of this call's one token (the cache's counter, advanced unless initialising).

    Positions at or after the cache length are not detected inside a jitted loop; ``linformer_jax.generate``
    checks the length before it starts.
    """
    if x.ndim != 3 or x.shape[1] != 1:
      raise ValueError(f"decoding=True takes one position per call: x must have shape (batch, 1, dim), got "
                       f"{x.shape}.")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    t = index.value
    if not self.is_initializing():
      index.value = t + 1
    return t

  def _inputs(self, x, context, mask):
    if x.ndim != 3:
      raise ValueError(f"x must have shape (batch, n, dim), got {x.shape}.")
    context = x if context is None else context
    if context.ndim != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(f"context must have shape (batch={x.shape[0]}, n, dim), got {context.shape}.")
    check_mask(mask, context.shape[0], context.shape[1])
    return context


class FullSelfAttention(_MultiHead):
  """Ordinary multi-head softmax attention (O(n²)), via ``softmax_attention``.

  Attributes:
    causal: position i attends only to positions <= i.
    decoding: one position per call (autoregressive generation) against a key/value cache of ``max_len``
      positions in the ``"cache"`` collection. Needs causal=True.
    max_len: the cache length (decoding=True only).
    num_heads: number of heads h.
    head_dim: width d_h of each head; None = input dim // num_heads.
    qkv_bias: biases on the Q/K/V maps (ViT style; the Linformer original has none).
    remat_heads: compute the attention core one head at a time under ``jax.checkpoint`` (level C2).
    remat_policy: the checkpoint policy name used then (one of ``linformer_jax.remat.REMAT_POLICIES``).
    out_dim: output width; None = input width.
    w_o_intermediate_dim: None = W^O is one (h·d_h → out) map; an int w = two maps h·d_h → w → out with no
      nonlinearity between (linformer-pytorch's ``w_o_intermediate_dim``).
    attention_dropout: dropout on the attention weights (train mode only).
    attention_impl: the kernel's implementation, one of ``IMPLEMENTATIONS`` ("xla" | "dot_product_attention");
      None = the default for the backend and dtype (``default_implementation``).
    attention_block_rows: queries per block of the "xla" kernel; None = the backend's default
      (``default_block_rows``: blocks only for large scores on the CPU), 0 = never block.
    dtype: the computation dtype (matmul operands).
    param_dtype: the dtype parameters are stored in.
  """
  causal: bool = False
  decoding: bool = False
  max_len: Optional[int] = None

  def __post_init__(self):
    self._check_common()
    _check_decoding(self.decoding, self.causal)
    check_int("max_len", self.max_len, minimum=1, allow_none=True)
    if self.decoding and self.max_len is None:
      raise ValueError("decoding=True needs max_len, the number of positions its key/value cache holds.")
    super().__post_init__()

  def _decode(self, x):
    """decoding=True: position t attends to the key/value cache of positions <= t ((batch, max_len, heads, d))."""
    t = self._decode_position(x)
    q, k, v = self._qkv(x, x)
    b, _, h, d = k.shape
    keys = self.variable("cache", "keys", jnp.zeros, (b, self.max_len, h, d), k.dtype)
    values = self.variable("cache", "values", jnp.zeros, (b, self.max_len, h, v.shape[-1]), v.dtype)
    if not self.is_initializing():
      keys.value = jax.lax.dynamic_update_slice_in_dim(keys.value, k, t, axis=1)
      values.value = jax.lax.dynamic_update_slice_in_dim(values.value, v, t, axis=1)
    seen = jnp.broadcast_to(jnp.arange(self.max_len)[None, :] <= t, (b, self.max_len))
    return self._out(softmax_attention(q, keys.value, values.value, key_mask=seen), x.shape[-1])

  @nn.compact
  def __call__(self, x, context=None, mask=None, deterministic: bool = True):
    """Attends from the queries ``x`` to ``context`` (default: ``x`` itself).

    Args:
      x: queries, (batch, t, dim).
      context: keys/values, (batch, s, dim_c); None = ``x`` (self-attention).
      mask: (batch, s) bool over the keys, True = real token; None = no padding.
      deterministic: False applies ``attention_dropout`` (needs a ``"dropout"`` rng).

    Returns:
      (batch, t, out_dim).
    """
    if self.decoding:
      if context is not None or mask is not None:
        raise ValueError("decoding=True is causal self-attention over the cache: pass context=None, mask=None.")
      return self._decode(x)
    context = self._inputs(x, context, mask)
    q, k, v = self._qkv(x, context)
    o = softmax_attention(q, k, v, key_mask=mask, is_causal=self.causal,
                          dropout_rate=self.attention_dropout,
                          dropout_rng=self._dropout_rng(deterministic), sow=self._sow_fn(),
                          **self._kernel_kwargs())
    return self._out(o, x.shape[-1])


class LinformerSelfAttention(_MultiHead):
  """Linformer multi-head attention: keys/values projected from n to k along the sequence (Eq. 7).

  Attributes:
    max_len: largest key/value length n (E, F are built for it).
    k: projected length.
    sharing: one of ``SHARING``: "none" | "headwise" | "kv" | "layerwise" (the last needs ``shared_projection``).
    projection: "learnable" | "conv" | "mean_pool" | "max_pool" | "fixed" (see ``SeqProjection``).
    projection_bias: bias on E/F (linformer-pytorch compatibility; the paper has none).
    shared_projection: the network-wide ``SeqProjection`` used as E and F when sharing="layerwise".
    num_heads: number of heads h.
    head_dim: width d_h of each head; None = input dim // num_heads.
    qkv_bias: biases on the Q/K/V maps (ViT style; the Linformer original has none).
    remat_heads: compute the attention core one head at a time under ``jax.checkpoint`` (level C2).
    remat_policy: the checkpoint policy name used then (one of ``linformer_jax.remat.REMAT_POLICIES``).
    out_dim: output width; None = input width.
    w_o_intermediate_dim: None = W^O is one (h·d_h → out) map; an int w = two maps h·d_h → w → out with no
      nonlinearity between (linformer-pytorch's ``w_o_intermediate_dim``).
    attention_dropout: dropout on the attention weights (train mode only).
    attention_impl: the kernel's implementation, one of ``IMPLEMENTATIONS`` ("xla" | "dot_product_attention");
      None = the default for the backend and dtype (``default_implementation``).
    attention_block_rows: queries per block of the "xla" kernel; None = the backend's default
      (``default_block_rows``: blocks only for large scores on the CPU), 0 = never block.
    causal: the exactly causal Linformer (``causal_linformer_attention``): position t attends to the projection
      of positions <= t. Self-attention only; projection "learnable" or "fixed"; every sharing mode.
    causal_chunk: positions per chunk of the causal computation (cost O(n (c + k) d) per head).
    decoding: one position per call (autoregressive generation), from a state in the ``"cache"`` collection: the
      sums of E[j]ᵀ k_j and F[j]ᵀ v_j over the positions so far, (batch, heads, k, d) each, whatever the context
      length (``causal_linformer.decode_step``). Needs causal=True.
    dtype: the computation dtype (matmul operands).
    param_dtype: the dtype parameters are stored in.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from linformer_jax.layers import LinformerSelfAttention
    >>> layer = LinformerSelfAttention(num_heads=4, max_len=64, k=16)
    >>> x = jnp.ones((2, 64, 32))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> variables["params"]["E"]["kernel"].shape  # one (max_len, k) projection per head
    (4, 64, 16)
    >>> layer.apply(variables, x).shape
    (2, 64, 32)
    >>> mask = jnp.arange(48)[None, :] < jnp.array([[48], [30]])  # shorter inputs, with padding
    >>> layer.apply(variables, jnp.ones((2, 48, 32)), mask=mask).shape
    (2, 48, 32)
  """
  max_len: int = 512
  k: int = 128
  sharing: str = "none"
  projection: str = "learnable"
  projection_bias: bool = False
  shared_projection: Optional[nn.Module] = None
  causal: bool = False
  causal_chunk: int = DEFAULT_CHUNK
  decoding: bool = False

  def __post_init__(self):
    self._check_common()
    check_choice("sharing", self.sharing, SHARING)
    check_choice("projection", self.projection, PROJECTIONS)
    check_projected_length(self.k, self.max_len)
    check_bool("causal", self.causal)
    check_int("causal_chunk", self.causal_chunk, minimum=1)
    if self.causal and self.projection not in CAUSAL_PROJECTIONS:
      raise ValueError(f"projection={self.projection!r}: {CAUSAL_ERROR}")
    _check_decoding(self.decoding, self.causal)
    if self.sharing == "layerwise" and self.shared_projection is None:
      raise ValueError("sharing='layerwise' needs shared_projection (the network-wide E=F); the Linformer "
                       "encoder passes it. Standalone layers use sharing 'none', 'headwise' or 'kv'.")
    super().__post_init__()

  def _decode(self, t, q, k, v, e, f, e_bias, f_bias):
    """decoding=True: position t from the (batch, heads, k, d) state of positions < t (``decode_step``)."""
    b, _, h, d = q.shape
    slots = e.shape[-1]
    state = {"keys": self.variable("cache", "keys", jnp.zeros, (b, h, slots, d), jnp.float32),
             "values": self.variable("cache", "values", jnp.zeros, (b, h, slots, v.shape[-1]), jnp.float32),
             "visible": self.variable("cache", "visible", jnp.zeros, (h, slots), bool)}
    row = lambda m: jax.lax.dynamic_index_in_dim(m, t, axis=m.ndim - 2, keepdims=False)  # E[t]: (…, k)
    out, new = decode_step(q[:, 0], k[:, 0], v[:, 0], row(e), row(f), {n: s.value for n, s in state.items()},
                           e_bias=e_bias, f_bias=f_bias)
    if not self.is_initializing():
      for name, var in state.items():
        var.value = new[name]
    return out[:, None]

  def _projections(self):
    make = lambda name, heads=None: SeqProjection(
        self.max_len, self.k, self.projection, num_heads=heads, use_bias=self.projection_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.sharing == "layerwise":
      return self.shared_projection, self.shared_projection
    if self.sharing == "kv":
      e = make("EF")
      return e, e
    heads = self.num_heads if self.sharing == "none" else None
    return make("E", heads), make("F", heads)

  @nn.compact
  def __call__(self, x, context=None, mask=None, deterministic: bool = True):
    """Attends from the queries ``x`` to the k projected positions of ``context`` (default: ``x`` itself).

    Args:
      x: queries, (batch, t, dim).
      context: keys/values, (batch, n, dim_c) with n <= ``max_len``; None = ``x`` (self-attention).
      mask: (batch, n) bool, True = real token; keys and values at padded positions are zeroed before the
        projection.
      deterministic: False applies ``attention_dropout`` (needs a ``"dropout"`` rng).

    Returns:
      (batch, t, out_dim).
    """
    if self.causal and context is not None:
      raise ValueError("causal=True is self-attention (position t of x attends to positions <= t of x); "
                       "pass context=None, or use causal=False for cross-attention.")
    context = self._inputs(x, context, mask)
    check_length("context" if context is not x else "x", context.shape[1], self.max_len)
    q, k, v = self._qkv(x, context)
    if mask is not None:  # zero padded K, V rows before the projection
      keep = mask[:, :, None, None]
      k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
    proj_e, proj_f = self._projections()
    if self.causal:
      (e, e_bias), (f, f_bias) = proj_e(k, matrix=True), proj_f(v, matrix=True)
      if self.decoding:
        return self._out(self._decode(self._decode_position(x), q, k, v, e, f, e_bias, f_bias), x.shape[-1])
      n = k.shape[1]
      e, f = e[..., :n, :], f[..., :n, :]
      o = causal_linformer_attention(q, k, v, e, f, e_bias=e_bias, f_bias=f_bias, chunk=self.causal_chunk,
                                     dropout_rate=self.attention_dropout,
                                     dropout_rng=self._dropout_rng(deterministic), sow=self._sow_fn(),
                                     head_remat_policy=self._kernel_kwargs()["head_remat_policy"])
      return self._out(o, x.shape[-1])
    k_bar = checkpoint_name(proj_e(k), "k_bar")  # (b, k, h, d_h)
    v_bar = checkpoint_name(proj_f(v), "v_bar")
    # P̄ = softmax(Q K̄ᵀ / sqrt(d_h)): (b, h, t, k), sown as "attention_weights" when requested
    o = softmax_attention(q, k_bar, v_bar, dropout_rate=self.attention_dropout,
                          dropout_rng=self._dropout_rng(deterministic), sow=self._sow_fn(),
                          **self._kernel_kwargs())
    return self._out(o, x.shape[-1])
