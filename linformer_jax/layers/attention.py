"""Multi-head attention: Linformer (low-rank keys/values) and ordinary full softmax attention.

Linformer head i (arXiv 2006.04768, Eq. 7):

    head_i = softmax( Q W_i^Q (E_i K W_i^K)^T / sqrt(d_h) ) · F_i V W_i^V

where E_i, F_i ∈ R^{k×n} project the n keys/values down to k positions (``SeqProjection``). Sharing
(Sec. 4): ``none`` = own E_i, F_i per head; ``headwise`` = one E, one F per layer; ``kv`` = one matrix per
layer used as both E and F; ``layerwise`` = one matrix for the whole network, passed in as
``shared_projection``.

Padding: rows of K and V at padded positions (mask False) are zeroed before the projection, so outputs at
real tokens depend neither on the content of padded positions nor on how much padding follows.
"""
from __future__ import annotations

import math

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from linformer_jax._validate import check_choice, check_int, check_length, check_mask, check_rate
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.projections import PROJECTIONS, SeqProjection
from linformer_jax.remat import REMAT_POLICIES, map_heads

SHARING = ("none", "headwise", "kv", "layerwise")


def _heads_first(x: jax.Array) -> jax.Array:
  """(batch, length, heads, d) ↔ (batch, heads, length, d)."""
  return jnp.swapaxes(x, 1, 2)


@jax.custom_jvp
def softmax_last(logits: jax.Array) -> jax.Array:
  """``jax.nn.softmax(logits, axis=-1)`` whose derivative keeps the row sum a contraction.

  Same values and derivatives as ``jax.nn.softmax`` (forward and reverse mode): ṗ = p ⊙ (ẋ − Σ_s p ⊙ ẋ), so
  the backward pass is x̄ = p ⊙ (ḡ − Σ_s ḡ ⊙ p). Here both the row sum and its broadcast back are einsums, and
  their transposes in the backward pass are contractions too. With ``jax.nn.softmax``'s own rule the backward
  row sum is a reduction that XLA:CPU fuses into its elementwise consumer and recomputes for every element of
  the row, which made the softmax backward the slowest step of attention on CPU (docs/benchmarks.md §2).
  """
  return jax.nn.softmax(logits, axis=-1)


@softmax_last.defjvp
def _softmax_last_jvp(primals, tangents):
  (logits,), (t,) = primals, tangents
  p = softmax_last(logits)
  row = jnp.einsum("...s,...s->...", p, t)
  return p, p * t - jnp.einsum("...s,...->...s", p, row)


def attention_weights(q: jax.Array, k: jax.Array, *, key_mask: Optional[jax.Array] = None,
                      is_causal: bool = False, q_offset=0) -> jax.Array:
  """softmax(q kᵀ / sqrt(d)) over keys: q (batch, t, heads, d), k (batch, s, heads, d) → (batch, heads, t, s).

  The scale is applied to q (t·d multiplies, not t·s) and the product runs heads-first, which is the layout
  XLA's batched dot wants (no transposes of the (t, s) scores). q_offset: position of the first query, for
  ``is_causal`` on a block of queries (query i sees keys j <= q_offset + i).
  """
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = jnp.einsum("bhtd,bhsd->bhts", _heads_first(q * scale), _heads_first(k))
  big_neg = jnp.finfo(logits.dtype).min
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, big_neg)
  if is_causal:  # query i (at position q_offset + i) sees keys j <= q_offset + i
    t, s = logits.shape[-2:]
    allowed = (q_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
    logits = jnp.where(allowed, logits, big_neg)
  return softmax_last(logits)


CPU_SCORES_BLOCK_BYTES = 2 * 2**20  # one (batch row, head)'s (t, s) scores above this: queries run in blocks on CPU
CPU_BLOCK_BYTES_PER_HEAD_DIM = 32 * 2**10  # a block's scores per head: this × head dim (512 KiB at d = 16)
CPU_MIN_BLOCK_ROWS = 16  # fewest queries per block


def query_block_rows(q_shape, s: int, dtype) -> int:
  """How many queries one block of the CPU attention core holds (``t`` = all at once, no blocks).

  XLA:CPU fuses q·kᵀ → softmax → ·v into one kernel, and it slows down superlinearly once one head's (t, s)
  scores outgrow the caches; its gradient also keeps every (t, s) weight for the backward pass. Queries are
  independent, so ``softmax_attention`` runs blocks of them in a ``lax.map`` under ``jax.checkpoint`` (each block's
  weights are recomputed in the backward pass, never stored whole) when one head's scores exceed
  ``CPU_SCORES_BLOCK_BYTES`` (causal or not). A block's scores take ``CPU_BLOCK_BYTES_PER_HEAD_DIM`` × d bytes per
  head (larger heads do more work per score): full attention, d = 16, n = 4096: blocks of 32 queries, forward
  270 → 122 ms, fwd+bwd 1022 → 595 ms, temp 514 → 52 MiB; d = 64: blocks of 128; the Linformer core (s = k = 128,
  d = 16, t = 16384): blocks of 1024, forward 50 → 13 ms, fwd+bwd 88 → 50 ms (one core, docs/benchmarks.md §2).
  q_shape: (batch, t, heads, d); s: number of keys; dtype: the scores' dtype. Off the CPU: t.
  """
  t, d = q_shape[1], q_shape[-1]
  itemsize = jnp.dtype(dtype).itemsize
  if jax.default_backend() != "cpu" or t * s * itemsize <= CPU_SCORES_BLOCK_BYTES:
    return t
  rows = max(CPU_MIN_BLOCK_ROWS, CPU_BLOCK_BYTES_PER_HEAD_DIM * d // (s * itemsize))
  return min(t, rows)


def _blocked_attention(q, k, v, key_mask, is_causal: bool, rows: int):
  """``_einsum_attention`` one batch row and one block of ``rows`` queries at a time (q zero-padded to a multiple
  of ``rows``, the pad cut off after), each block under ``jax.checkpoint``; shapes as ``softmax_attention``."""
  b, t, h, d = q.shape
  chunks = -(-t // rows)
  q = jnp.pad(q, ((0, 0), (0, chunks * rows - t), (0, 0), (0, 0))).reshape(b, chunks, 1, rows, h, d)
  k, v = k[:, None], v[:, None]  # (b, 1, s, h, d): one batch row at a time
  key_mask = None if key_mask is None else key_mask[:, None]
  offsets = jnp.arange(chunks) * rows  # position of each block's first query (for is_causal)

  def one_row(row):
    q_row, k_row, v_row, mask_row = row
    one_block = jax.checkpoint(lambda block: _einsum_attention(block[0], k_row, v_row, mask_row, is_causal,
                                                               q_offset=block[1]))
    return jax.lax.map(one_block, (q_row, offsets))  # (chunks, 1, rows, h, d_v)

  out = jax.lax.map(one_row, (q, k, v, key_mask))
  return out.reshape(b, chunks * rows, h, v.shape[-1])[:, :t]


def _einsum_attention(q, k, v, key_mask=None, is_causal=False, q_offset=0):
  """softmax(q kᵀ / sqrt(d)) v with heads-first einsums (the CPU path), shapes as ``softmax_attention``."""
  return _attend(attention_weights(q, k, key_mask=key_mask, is_causal=is_causal, q_offset=q_offset), v)


def _attend(weights, v):
  """Σ_s weights · v: weights (batch, heads, t, s), v (batch, s, heads, d) → (batch, t, heads, d)."""
  return _heads_first(jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), _heads_first(v)))


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: Optional[jax.Array] = None,
                      is_causal: bool = False, dropout_rate: float = 0.0,
                      dropout_rng: Optional[jax.Array] = None, sow=None,
                      head_remat_policy: Optional[str] = None) -> jax.Array:
  """softmax(q kᵀ / sqrt(d)) v per head.

  q: (batch, t, heads, d); k, v: (batch, s, heads, d); key_mask: (batch, s) bool, True = attend.
  Without dropout and without ``sow``: two heads-first einsums around ``softmax_last``, whose backward pass keeps
  only the normalised weights. ``jax.nn.dot_product_attention`` lowers float32 inputs to the same XLA composition
  on every backend, with a derivative that keeps both exp(logits) and the weights (measured on an H200: the same
  speed, ±5 %, and one (t, s) array less per layer in the backward pass with the einsums; on CPU the einsums are
  also faster: train step of the roofline config −16 %, docs/benchmarks.md); on CPU large scores run in blocks of
  queries (``query_block_rows``). Half-precision inputs on a GPU/TPU go to ``jax.nn.dot_product_attention``
  (softmax in float32). Attention-weight dropout and ``sow`` (a callable receiving the (batch, heads, t, s)
  weights, for attention maps) need the weights, so then they are written out. ``head_remat_policy`` (level C2):
  one head at a time under ``jax.checkpoint`` with that policy (not combined with ``sow``, which needs all heads'
  weights).
  """
  if head_remat_policy is not None and sow is None:
    keys = None
    if dropout_rate > 0.0 and dropout_rng is not None:
      keys = jax.random.split(dropout_rng, q.shape[2])
    one_head = lambda qh, kh, vh, key=None: softmax_attention(
        qh, kh, vh, key_mask=key_mask, is_causal=is_causal, dropout_rate=dropout_rate, dropout_rng=key)
    return map_heads(one_head, head_remat_policy, q, k, v, extra=keys)
  if (dropout_rate == 0.0 or dropout_rng is None) and sow is None:  # no weights needed outside
    if jax.default_backend() != "cpu" and jnp.dtype(q.dtype).itemsize < 4:
      mask = None if key_mask is None else key_mask[:, None, None, :]
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    rows = query_block_rows(q.shape, k.shape[1], q.dtype)  # t (no blocks) off the CPU
    if rows == q.shape[1]:
      return _einsum_attention(q, k, v, key_mask, is_causal)
    return _blocked_attention(q, k, v, key_mask, is_causal, rows)  # large (t, s) scores on CPU (see query_block_rows)
  weights = attention_weights(q, k, key_mask=key_mask, is_causal=is_causal)
  if sow is not None:
    sow(weights)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return _attend(weights, v)


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
  """
  num_heads: int
  head_dim: Optional[int] = None
  qkv_bias: bool = False
  remat_heads: bool = False
  remat_policy: str = "nothing_saveable"
  out_dim: Optional[int] = None
  w_o_intermediate_dim: Optional[int] = None
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_common(self):
    check_int("num_heads", self.num_heads, minimum=1)
    check_int("head_dim", self.head_dim, minimum=1, allow_none=True)
    check_int("out_dim", self.out_dim, minimum=1, allow_none=True)
    check_int("w_o_intermediate_dim", self.w_o_intermediate_dim, minimum=1, allow_none=True)
    check_rate("attention_dropout", self.attention_dropout)
    check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)

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

  def _dropout_rng(self, deterministic):
    if deterministic or self.attention_dropout == 0.0:
      return None
    return self.make_rng("dropout")

  def _sow_fn(self):
    """Attention maps are stored in "intermediates" only when the caller makes it mutable."""
    if not self.is_mutable_collection("intermediates"):
      return None
    return lambda w: self.sow("intermediates", "attention_weights", w)

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

  Attributes (besides those of ``_MultiHead``):
    causal: position i attends only to positions <= i.
  Call: ``(x, context=None, mask=None, deterministic=True)``; x (batch, t, dim) queries; context
  (batch, s, dim_c) keys/values (default x); mask (batch, s) bool over keys, True = real token.
  Returns (batch, t, out_dim).
  """
  causal: bool = False

  def __post_init__(self):
    self._check_common()
    super().__post_init__()

  @nn.compact
  def __call__(self, x, context=None, mask=None, deterministic: bool = True):
    context = self._inputs(x, context, mask)
    q, k, v = self._qkv(x, context)
    o = softmax_attention(q, k, v, key_mask=mask, is_causal=self.causal,
                          dropout_rate=self.attention_dropout,
                          dropout_rng=self._dropout_rng(deterministic), sow=self._sow_fn(),
                          head_remat_policy=self.remat_policy if self.remat_heads else None)
    return self._out(o, x.shape[-1])


class LinformerSelfAttention(_MultiHead):
  """Linformer multi-head attention: keys/values projected from n to k along the sequence (Eq. 7).

  Attributes (besides those of ``_MultiHead``):
    max_len: largest key/value length n (E, F are built for it).
    k: projected length.
    sharing: "none" | "headwise" | "kv" | "layerwise" (the last needs ``shared_projection``).
    projection: "learnable" | "conv" | "mean_pool" | "max_pool" | "fixed" (see ``SeqProjection``).
    projection_bias: bias on E/F (linformer-pytorch compatibility; the paper has none).
    shared_projection: the network-wide ``SeqProjection`` used as E and F when sharing="layerwise".
  Call: ``(x, context=None, mask=None, deterministic=True)``; x (batch, t, dim) queries; context
  (batch, n, dim_c) keys/values (default x, i.e. self-attention), n <= max_len; mask (batch, n) bool,
  True = real token. Returns (batch, t, out_dim).
  """
  max_len: int = 512
  k: int = 128
  sharing: str = "none"
  projection: str = "learnable"
  projection_bias: bool = False
  shared_projection: Optional[nn.Module] = None

  def __post_init__(self):
    self._check_common()
    check_choice("sharing", self.sharing, SHARING)
    check_choice("projection", self.projection, PROJECTIONS)
    check_int("max_len", self.max_len, minimum=1)
    check_int("k", self.k, minimum=1, maximum=self.max_len)
    if self.sharing == "layerwise" and self.shared_projection is None:
      raise ValueError("sharing='layerwise' needs shared_projection (the network-wide E=F); the Linformer "
                       "encoder passes it. Standalone layers use sharing 'none', 'headwise' or 'kv'.")
    super().__post_init__()

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
    context = self._inputs(x, context, mask)
    check_length("context" if context is not x else "x", context.shape[1], self.max_len)
    q, k, v = self._qkv(x, context)
    if mask is not None:  # zero padded K, V rows before the projection
      keep = mask[:, :, None, None]
      k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
    proj_e, proj_f = self._projections()
    k_bar = checkpoint_name(proj_e(k), "k_bar")  # (b, k, h, d_h)
    v_bar = checkpoint_name(proj_f(v), "v_bar")
    # P̄ = softmax(Q K̄ᵀ / sqrt(d_h)): (b, h, t, k), sown as "attention_weights" when requested
    o = softmax_attention(q, k_bar, v_bar, dropout_rate=self.attention_dropout,
                          dropout_rng=self._dropout_rng(deterministic), sow=self._sow_fn(),
                          head_remat_policy=self.remat_policy if self.remat_heads else None)
    return self._out(o, x.shape[-1])
