"""The softmax attention kernel: softmax(q kᵀ / sqrt(d)) v per head, for full and Linformer attention alike.

Two implementations (``IMPLEMENTATIONS``): ``"xla"``, two heads-first einsums around ``softmax_last`` (optionally
in blocks of queries, see ``default_block_rows``), and ``"dot_product_attention"``, ``jax.nn.dot_product_attention``.
Every choice is an explicit argument of ``softmax_attention``; ``None`` takes the default for the backend and dtype
(``default_implementation``, ``default_block_rows``), read from ``jax.default_backend()`` unless a ``backend`` is
passed to those functions. Why these defaults: docs/benchmarks.md §2 (query blocks, ``softmax_last``) and §8.1
(einsums instead of ``dot_product_attention`` for float32 on a GPU).

Mixed precision: q, k and v come in the model's compute dtype. The logits q·kᵀ are a float32 result of a product of
those operands (``float32_einsum``), the softmax runs in float32, and its weights are cast to v's dtype for the
weights·v product, so every matmul takes operands of the compute dtype while the exponentials and row sums do not
lose precision.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from linformer_jax._validate import check_choice, check_int
from linformer_jax.remat import map_heads

#: The implementations of ``softmax_attention``: heads-first einsums, or ``jax.nn.dot_product_attention``.
IMPLEMENTATIONS = ("xla", "dot_product_attention")

# Defaults of ``default_block_rows`` only (bound as argument defaults: nothing reads or swaps them at run time).
_SCORES_BLOCK_BYTES = 2 * 2**20  # one (batch row, head)'s (t, s) scores above this: queries run in blocks on CPU
_BLOCK_BYTES_PER_HEAD_DIM = 32 * 2**10  # a block's scores per head: this × head dim (512 KiB at d = 16)
_MIN_BLOCK_ROWS = 16  # fewest queries per block


def _heads_first(x: jax.Array) -> jax.Array:
  """(batch, length, heads, d) ↔ (batch, heads, length, d)."""
  return jnp.swapaxes(x, 1, 2)


def _backend(backend: Optional[str]) -> str:
  """``backend`` if given, else ``jax.default_backend()`` (read when called: at trace time inside a jit)."""
  return jax.default_backend() if backend is None else backend


def default_implementation(dtype, backend: Optional[str] = None) -> str:
  """The implementation ``softmax_attention`` uses when none is given.

  Half-precision inputs (itemsize < 4) off the CPU: ``"dot_product_attention"`` (softmax in float32, cuDNN's fused
  kernel available); everything else: ``"xla"`` (the heads-first einsums, whose backward pass keeps one (t, s)
  array per layer where ``jax.nn.dot_product_attention``'s keeps two; docs/benchmarks.md §8.1).

  Args:
    dtype: the dtype of q.
    backend: "cpu", "gpu", "tpu", ...; None = ``jax.default_backend()``.

  Returns:
    One of ``IMPLEMENTATIONS``.
  """
  if _backend(backend) != "cpu" and jnp.dtype(dtype).itemsize < 4:
    return "dot_product_attention"
  return "xla"


def default_block_rows(q_shape, s: int, dtype, *, backend: Optional[str] = None,
                       scores_block_bytes: int = _SCORES_BLOCK_BYTES,
                       bytes_per_head_dim: int = _BLOCK_BYTES_PER_HEAD_DIM,
                       min_rows: int = _MIN_BLOCK_ROWS) -> int:
  """How many queries one block of the ``"xla"`` core holds by default (``t`` = all at once, no blocks).

  XLA:CPU fuses q·kᵀ → softmax → ·v into one kernel, and it slows down superlinearly once one head's (t, s)
  scores outgrow the caches; its gradient also keeps every (t, s) weight for the backward pass. Queries are
  independent, so ``softmax_attention`` runs blocks of them in a ``lax.map`` under ``jax.checkpoint`` (each block's
  weights are recomputed in the backward pass, never stored whole) when, on the CPU, one (batch row, head)'s scores
  exceed ``scores_block_bytes`` (causal or not). A block's scores take ``bytes_per_head_dim`` × d bytes per head
  (larger heads do more work per score), and a block holds at least ``min_rows`` queries: full attention, d = 16,
  n = 4096: blocks of 32 queries; d = 64: blocks of 128; the Linformer core (s = k = 128, d = 16, t = 16384): blocks
  of 1024. Off the CPU: no blocks. Timings: docs/benchmarks.md §2 ("Query blocks on CPU").

  Args:
    q_shape: (batch, t, heads, d).
    s: number of keys.
    dtype: the scores' dtype.
    backend: "cpu", "gpu", "tpu", ...; None = ``jax.default_backend()``.
    scores_block_bytes: per-head score bytes above which queries run in blocks.
    bytes_per_head_dim: a block's score bytes per head, per unit of head dim.
    min_rows: fewest queries per block.

  Returns:
    Queries per block, in [1, t]; ``t`` means no blocks.
  """
  t, d = q_shape[1], q_shape[-1]
  itemsize = jnp.dtype(dtype).itemsize
  if _backend(backend) != "cpu" or t * s * itemsize <= scores_block_bytes:
    return t
  rows = max(min_rows, bytes_per_head_dim * d // (s * itemsize))
  return min(t, rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _float32_result(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@_float32_result.defjvp
def _float32_result_jvp(spec, primals, tangents):
  (a, b), (da, db) = primals, tangents
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  # each tangent product in the operands' dtype: transposed, the backward products take operands of that dtype too
  return _float32_result(spec, a, b), f32(jnp.einsum(spec, da, b)) + f32(jnp.einsum(spec, a, db))


def float32_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` with a float32 result, for logits that go into a float32 softmax.

  Half-precision operands (bfloat16, float16) are multiplied as they are, accumulated and returned in float32
  (``preferred_element_type``); the derivatives are products in the operands' dtype too (JAX's own transpose of a
  float32-result product would cast the other operand up and run the backward matmuls in float32). float32 operands:
  the plain einsum.

  Args:
    spec: a two-operand einsum spec, e.g. ``"bhtd,bhsd->bhts"``.
    a, b: the operands, of one floating dtype.

  Returns:
    The product, float32.
  """
  if jnp.dtype(a.dtype).itemsize >= 4 and jnp.dtype(b.dtype).itemsize >= 4:
    return jnp.einsum(spec, a, b)
  return _float32_result(spec, a, b)


def softmax_last(logits: jax.Array) -> jax.Array:
  """``jax.nn.softmax(logits, axis=-1)`` whose derivative keeps the row sum a contraction.

  Same values and derivatives as ``jax.nn.softmax`` (forward and reverse mode): ṗ = p ⊙ (ẋ − Σ_s p ⊙ ẋ), so
  the backward pass is x̄ = p ⊙ (ḡ − Σ_s ḡ ⊙ p). Here both the row sum and its broadcast back are einsums, and
  their transposes in the backward pass are contractions too. With ``jax.nn.softmax``'s own rule the backward
  row sum is a reduction that XLA:CPU fuses into its elementwise consumer and recomputes for every element of
  the row, which made the softmax backward the slowest step of attention on CPU (docs/benchmarks.md §2).
  """
  return _softmax_last(logits)


@jax.custom_jvp
def _softmax_last(logits: jax.Array) -> jax.Array:
  """``softmax_last`` with its custom derivative (a plain function wraps it so that it documents as one)."""
  return jax.nn.softmax(logits, axis=-1)


@_softmax_last.defjvp
def _softmax_last_jvp(primals, tangents):
  (logits,), (t,) = primals, tangents
  p = _softmax_last(logits)
  row = jnp.einsum("...s,...s->...", p, t)
  return p, p * t - jnp.einsum("...s,...->...s", p, row)


def attention_weights(q: jax.Array, k: jax.Array, *, key_mask: Optional[jax.Array] = None,
                      is_causal: bool = False, q_offset=0) -> jax.Array:
  """softmax(q kᵀ / sqrt(d)) over keys: q (batch, t, heads, d), k (batch, s, heads, d) → (batch, heads, t, s).

  The scale is applied to q (t·d multiplies, not t·s) and the product runs heads-first, which is the layout
  XLA's batched dot wants (no transposes of the (t, s) scores). q_offset: position of the first query, for
  ``is_causal`` on a block of queries (query i sees keys j <= q_offset + i). The logits and the weights are float32
  whatever q's dtype (``float32_einsum``). The softmax is ``softmax_last`` for float32 q; for half-precision q it is
  ``jax.nn.softmax`` (same values and derivatives), whose backward row sums are reductions: ``softmax_last``'s
  contractions would be float32 matmuls inside a half-precision program, and the XLA:CPU fusion problem they avoid
  concerns float32 training on the CPU.
  """
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = float32_einsum("bhtd,bhsd->bhts", _heads_first(q * scale), _heads_first(k))
  big_neg = jnp.finfo(logits.dtype).min
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, big_neg)
  if is_causal:  # query i (at position q_offset + i) sees keys j <= q_offset + i
    t, s = logits.shape[-2:]
    allowed = (q_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
    logits = jnp.where(allowed, logits, big_neg)
  return softmax_last(logits) if jnp.dtype(q.dtype).itemsize >= 4 else jax.nn.softmax(logits, axis=-1)


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
  """softmax(q kᵀ / sqrt(d)) v with heads-first einsums (the "xla" core), shapes as ``softmax_attention``."""
  return _attend(attention_weights(q, k, key_mask=key_mask, is_causal=is_causal, q_offset=q_offset), v)


def _attend(weights, v):
  """Σ_s weights · v: weights (batch, heads, t, s), v (batch, s, heads, d) → (batch, t, heads, d)."""
  return _heads_first(jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), _heads_first(v)))


def check_kernel_args(implementation: Optional[str], block_rows: Optional[int], *,
                      names=("implementation", "block_rows")) -> None:
  """Raises ValueError (TypeError for a non-int ``block_rows``) naming the argument, the value and what is allowed.

  Args:
    implementation: one of ``IMPLEMENTATIONS`` or None.
    block_rows: None, or an int >= 0.
    names: the argument names used in the messages (e.g. a module's field names).
  """
  check_choice(names[0], implementation, IMPLEMENTATIONS + (None,))
  check_int(names[1], block_rows, minimum=0, allow_none=True)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: Optional[jax.Array] = None,
                      is_causal: bool = False, dropout_rate: float = 0.0,
                      dropout_rng: Optional[jax.Array] = None, sow=None,
                      head_remat_policy: Optional[str] = None, implementation: Optional[str] = None,
                      block_rows: Optional[int] = None) -> jax.Array:
  """softmax(q kᵀ / sqrt(d)) v per head.

  Without dropout and without ``sow`` the weights stay inside the kernel, and ``implementation`` picks it:
  ``"xla"``: two heads-first einsums around ``softmax_last``, whose backward pass keeps only the normalised
  weights, optionally in blocks of ``block_rows`` queries (a ``lax.map`` with each block under ``jax.checkpoint``,
  never holding one head's whole (t, s) scores); ``"dot_product_attention"``: ``jax.nn.dot_product_attention``
  (softmax in float32 for half-precision inputs; ``block_rows`` does not apply). Attention-weight dropout and
  ``sow`` need the weights, so then they are written out (the ``"xla"`` einsums, no blocks, whatever
  ``implementation`` says). Why the defaults: docs/benchmarks.md §2 and §8.1.

  Args:
    q: (batch, t, heads, d) queries.
    k: (batch, s, heads, d) keys.
    v: (batch, s, heads, d_v) values.
    key_mask: (batch, s) bool, True = attend.
    is_causal: query i sees keys j <= i.
    dropout_rate: dropout on the attention weights (applied only with a ``dropout_rng``).
    dropout_rng: PRNG key for that dropout.
    sow: a callable receiving the (batch, heads, t, s) weights (attention maps).
    head_remat_policy: one head at a time under ``jax.checkpoint`` with that policy (level C2; not combined
      with ``sow``, which needs all heads' weights).
    implementation: one of ``IMPLEMENTATIONS``; None = ``default_implementation(q.dtype)`` (half precision off the
      CPU → "dot_product_attention", else "xla").
    block_rows: queries per block of the "xla" core; None = ``default_block_rows(q.shape, s, q.dtype)`` (blocks only
      for large scores on the CPU), 0 = never block, an int > 0 = that many (clipped to t; t or more = no blocks).

  Returns:
    (batch, t, heads, d_v).

  Raises:
    ValueError: ``implementation`` not one of ``IMPLEMENTATIONS``/None, or ``block_rows`` < 0 (TypeError if it is
      not an int).
  """
  check_kernel_args(implementation, block_rows)
  if head_remat_policy is not None and sow is None:
    keys = None
    if dropout_rate > 0.0 and dropout_rng is not None:
      keys = jax.random.split(dropout_rng, q.shape[2])
    one_head = lambda qh, kh, vh, key=None: softmax_attention(
        qh, kh, vh, key_mask=key_mask, is_causal=is_causal, dropout_rate=dropout_rate, dropout_rng=key,
        implementation=implementation, block_rows=block_rows)
    return map_heads(one_head, head_remat_policy, q, k, v, extra=keys)
  if (dropout_rate == 0.0 or dropout_rng is None) and sow is None:  # no weights needed outside
    if implementation is None:
      implementation = default_implementation(q.dtype)
    if implementation == "dot_product_attention":
      mask = None if key_mask is None else key_mask[:, None, None, :]
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    t = q.shape[1]
    if block_rows is None:
      rows = default_block_rows(q.shape, k.shape[1], q.dtype)  # t (no blocks) off the CPU
    else:
      rows = t if block_rows == 0 else min(t, block_rows)
    if rows == t:
      return _einsum_attention(q, k, v, key_mask, is_causal)
    return _blocked_attention(q, k, v, key_mask, is_causal, rows)
  weights = attention_weights(q, k, key_mask=key_mask, is_causal=is_causal)
  if sow is not None:
    sow(weights)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return _attend(weights, v)
