"""Exactly causal Linformer attention: the projection of the prefix, computed in chunks with matmuls only.

With position-indexed projections E, F ∈ R^{n×k} (row j belongs to position j), position t attends to the projection
of its own prefix (per head, ``k_j``/``v_j`` the key/value of position j):

    K̄_t = Σ_{j ≤ t} E[j]ᵀ k_j,   V̄_t = Σ_{j ≤ t} F[j]ᵀ v_j   (each k × d),   o_t = softmax_r(q_t K̄_tᵀ / √d) V̄_t,

which uses no position after t and at the last position equals the bidirectional Linformer (Eq. 7 of arXiv
2006.04768) with the same E, F. The same idea: ABC (Peng et al. 2021, arXiv 2110.02488), Luna's causal form.

Projected slot r takes part in the softmax of position t only once some position j ≤ t has written to it
(E[j, r] ≠ 0): with k = n and E = F = I this is exactly causal softmax attention, and for a dense E (learnable or
fixed) every slot takes part from position 0. A learnable/fixed projection bias b (linformer-pytorch's layout) is
added to every K̄_t (V̄_t) as in the bidirectional layer.

In chunks of c positions (chunk m covers positions mc … mc + c − 1; S_m = Σ_{j < mc} E[j]ᵀ k_j the state before it):

    scores_m = Q_m S_mᵀ + (tril ⊙ Q_m K_mᵀ) E_m,     o_m = P_m T_m + (tril ⊙ P_m F_mᵀ) V_m,

with P_m the softmax of scores_m / √d over the visible slots and T_m the value state. Compute O(n (c + k) d) per
head; memory linear in n: the per-chunk states (n/c, k, d), the scores (n, k) and the in-chunk products (n, c) —
never an n × k × d array.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from linformer_jax._validate import check_int, check_rate
from linformer_jax.remat import checkpoint_policy

#: The projections with a causal form: position-indexed matrices (row j of E, F belongs to position j).
CAUSAL_PROJECTIONS = ("learnable", "fixed")

#: The ``ValueError`` message for ``causal=True`` with a Linformer projection that has no causal form.
CAUSAL_ERROR = (
    "causal=True with attention='linformer' needs a position-indexed projection: projection='learnable' or "
    "'fixed' (row j of E, F belongs to position j, so position t attends to the projection of positions <= t; "
    "see linformer_jax.layers.causal_linformer). The conv and pooling projections mix a window of positions "
    "into each slot (a convolution, mean or max over the window) and have no causal form here; use "
    "projection='learnable' or 'fixed', or attention='full'.")

#: Default chunk length c of ``causal_linformer_attention`` (positions per chunk).
DEFAULT_CHUNK = 128


def slot_visibility(e: jax.Array) -> jax.Array:
  """Which projected slots position t sees: slot r once some position j ≤ t has E[j, r] ≠ 0.

  Args:
    e: the projection, (n, k) or (heads, n, k).

  Returns:
    bool array of ``e``'s shape: ``visible[..., t, r]``.
  """
  return jnp.cumsum((e != 0).astype(jnp.int32), axis=-2) > 0


def _chunk_states(x: jax.Array, e: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
  """Per chunk m the state before it, Σ_{j < mc} E[j]ᵀ x_j (+ bias on every slot).

  x: (b, m, c, h, d); e: (h, m, c, k). Returns (b, m, h, k, d) (an exclusive prefix sum over chunks).
  """
  per_chunk = jnp.einsum("bmchd,hmcr->bmhrd", x, e)
  before = jnp.cumsum(per_chunk, axis=1)[:, :-1]
  states = jnp.concatenate([jnp.zeros_like(per_chunk[:, :1]), before], axis=1)  # exact zeros for chunk 0
  if bias is not None:
    states = states + bias[None, None, :, :, None].astype(states.dtype)
  return states


def _masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
  """softmax over the last axis restricted to ``visible`` (rows with no visible slot give zeros); float32."""
  scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def _chunked(q, k, v, e, f, e_bias, f_bias, chunk, dropout_rate, dropout_rng):
  """The attention on inputs already padded to a multiple of ``chunk``; e/f/biases have a heads axis."""
  b, n, h, d = q.shape
  m, c = n // chunk, chunk
  split = lambda a: a.reshape(b, m, c, h, a.shape[-1])
  qc, kc, vc = split(q), split(k), split(v)
  ec, fc = (a.reshape(a.shape[0], m, c, a.shape[-1]) for a in (e, f))
  tril = jnp.tril(jnp.ones((c, c), bool))

  key_states = _chunk_states(kc, ec, e_bias)  # (b, m, h, k, d)
  value_states = _chunk_states(vc, fc, f_bias)
  inside = jnp.where(tril, jnp.einsum("bmihd,bmjhd->bmhij", qc, kc), 0)  # q_i·k_j for j ≤ i in the chunk
  scores = jnp.einsum("bmihd,bmhrd->bmhir", qc, key_states) + jnp.einsum("bmhij,hmjr->bmhir", inside, ec)
  visible = slot_visibility(e).reshape(e.shape[0], m, c, e.shape[-1]).transpose(1, 0, 2, 3)  # (m, h, c, k)
  weights = _masked_softmax(scores / math.sqrt(d), visible[None])
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  weights = weights.astype(q.dtype)
  mixed = jnp.where(tril, jnp.einsum("bmhir,hmjr->bmhij", weights, fc), 0)  # Σ_r P_ir F[j, r] for j ≤ i
  out = jnp.einsum("bmhir,bmhrd->bmihd", weights, value_states) + jnp.einsum("bmhij,bmjhd->bmihd", mixed, vc)
  return out.reshape(b, n, h, v.shape[-1]), weights


def causal_linformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, e: jax.Array, f: jax.Array, *,
                               e_bias: Optional[jax.Array] = None, f_bias: Optional[jax.Array] = None,
                               chunk: int = DEFAULT_CHUNK, dropout_rate: float = 0.0,
                               dropout_rng: Optional[jax.Array] = None, sow=None,
                               head_remat_policy: Optional[str] = None) -> jax.Array:
  """Exactly causal Linformer attention per head (see the module docstring for the equations).

  Args:
    q: (batch, n, heads, d) queries.
    k: (batch, n, heads, d) keys (zero at padded positions: they then add nothing).
    v: (batch, n, heads, d_v) values.
    e: the key projection's first n rows, (n, k) shared by the heads or (heads, n, k).
    f: the value projection, same shapes as ``e``.
    e_bias: None, or the key projection's bias, (k,) or (heads, k).
    f_bias: None, or the value projection's bias.
    chunk: positions per chunk c (clipped to n); the cost is O(n (c + k) d) per head.
    dropout_rate: dropout on the attention weights (applied only with a ``dropout_rng``).
    dropout_rng: PRNG key for that dropout.
    sow: a callable receiving the (batch, heads, n, k) weights over the projected slots.
    head_remat_policy: one head at a time under ``jax.checkpoint`` with that policy (level C2).

  Returns:
    (batch, n, heads, d_v).

  Raises:
    ValueError: ``chunk`` < 1, a dropout rate outside [0, 1), or shapes that do not fit together.
  """
  check_int("chunk", chunk, minimum=1)
  check_rate("dropout_rate", dropout_rate)
  b, n, h, _ = q.shape
  if k.shape[:3] != (b, n, h) or v.shape[:3] != (b, n, h):
    raise ValueError(f"q, k, v must share (batch, n, heads); got {q.shape}, {k.shape}, {v.shape}.")
  for name, proj in (("e", e), ("f", f)):
    if proj.ndim not in (2, 3) or proj.shape[-2] != n or (proj.ndim == 3 and proj.shape[0] != h):
      raise ValueError(f"{name} must have shape (n={n}, k) or (heads={h}, n={n}, k); got {proj.shape}.")
  if e.shape[-1] != f.shape[-1]:
    raise ValueError(f"e and f project to different k: {e.shape[-1]} and {f.shape[-1]}.")
  lead = lambda a: jnp.broadcast_to(a, (h,) + a.shape[-2:]) if a.ndim == 2 else a
  heads = lambda bias: None if bias is None else jnp.broadcast_to(bias, (h, e.shape[-1]))
  e, f, e_bias, f_bias = lead(e), lead(f), heads(e_bias), heads(f_bias)
  c = min(chunk, n)
  pad = -n % c
  if pad:  # zero rows of E, F and zero keys/values: the padded positions come last and add nothing
    grow = lambda a, axis: jnp.pad(a, [(0, pad) if i == axis else (0, 0) for i in range(a.ndim)])
    q, k, v, e, f = grow(q, 1), grow(k, 1), grow(v, 1), grow(e, 1), grow(f, 1)
  rate = dropout_rate if dropout_rng is not None else 0.0
  if head_remat_policy is not None and sow is None:
    keys = jax.random.split(dropout_rng, h) if rate > 0.0 else jnp.zeros((h,), jnp.uint32)

    def one_head(args):
      qh, kh, vh, eh, fh, ebh, fbh, key = args
      out, _ = _chunked(qh[:, :, None], kh[:, :, None], vh[:, :, None], eh[None], fh[None],
                        None if ebh is None else ebh[None], None if fbh is None else fbh[None], c, rate,
                        key if rate > 0.0 else None)
      return out[:, :, 0]

    by_head = lambda a: jnp.moveaxis(a, 2, 0)
    out = jax.lax.map(jax.checkpoint(one_head, policy=checkpoint_policy(head_remat_policy)),
                      (by_head(q), by_head(k), by_head(v), e, f, e_bias, f_bias, keys))
    out = jnp.moveaxis(out, 0, 2)
  else:
    out, weights = _chunked(q, k, v, e, f, e_bias, f_bias, c, rate, dropout_rng)
    if sow is not None:
      bw, m, hw, cw, kw = weights.shape
      sow(weights.transpose(0, 2, 1, 3, 4).reshape(bw, hw, m * cw, kw)[:, :, :n])
  return out[:, :n]


def decode_step(q: jax.Array, k: jax.Array, v: jax.Array, e_row: jax.Array, f_row: jax.Array,
                state: dict, *, e_bias: Optional[jax.Array] = None,
                f_bias: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """One position t of the causal Linformer from the state of positions < t: constant cost in t.

  Args:
    q: (batch, heads, d) query of position t.
    k: (batch, heads, d) its key.
    v: (batch, heads, d_v) its value.
    e_row: E[t], (k,) or (heads, k).
    f_row: F[t], same shape.
    state: ``{"keys": (batch, heads, k, d), "values": (batch, heads, k, d_v), "visible": (heads, k) bool}``, the
      sums Σ_{j < t} E[j]ᵀ k_j, Σ_{j < t} F[j]ᵀ v_j and the slots written so far (all zeros / False at t = 0),
      float32 so that long contexts do not accumulate rounding error in a half-precision sum.
    e_bias: None, or the key projection's bias, (k,) or (heads, k).
    f_bias: None, or the value projection's bias.

  Returns:
    (output (batch, heads, d_v) in ``q``'s dtype, the state including position t).
  """
  heads, slots = q.shape[1], e_row.shape[-1]
  e_row, f_row = (jnp.broadcast_to(r, (heads, slots)) for r in (e_row, f_row))
  f32 = lambda a: a.astype(jnp.float32)
  state = {"keys": state["keys"] + jnp.einsum("hr,bhd->bhrd", f32(e_row), f32(k)),
           "values": state["values"] + jnp.einsum("hr,bhd->bhrd", f32(f_row), f32(v)),
           "visible": state["visible"] | (e_row != 0)}
  keys, values = state["keys"], state["values"]
  if e_bias is not None:
    keys = keys + jnp.broadcast_to(f32(e_bias), (heads, slots))[None, :, :, None]
  if f_bias is not None:
    values = values + jnp.broadcast_to(f32(f_bias), (heads, slots))[None, :, :, None]
  scores = jnp.einsum("bhd,bhrd->bhr", f32(q), keys) / math.sqrt(q.shape[-1])
  weights = _masked_softmax(scores, state["visible"][None])
  return jnp.einsum("bhr,bhrd->bhd", weights, values).astype(q.dtype), state
