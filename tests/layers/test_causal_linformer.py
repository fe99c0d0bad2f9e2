"""The exactly causal Linformer: the chunked kernel against a float64 numpy computation of each position's prefix
projection, E = F = I against causal softmax attention, the last position against the bidirectional layer, and
exact zeros in the Jacobian ∂o_t/∂x_{t'} for t' > t through whole encoders (masks, pre/post-LN, remat C0/C1/C2,
scan, every sharing mode, learnable and fixed projections, dropout)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.layers import LinformerSelfAttention, SeqProjection
from linformer_jax.layers.causal_linformer import causal_linformer_attention
from linformer_jax.models import Linformer, LinformerLM
from helpers import rand

ATOL = 1e-5


def np_causal_linformer(q, k, v, e, f, e_bias=None, f_bias=None):
  """Position by position in float64: K̄_t = Σ_{j≤t} E[j]ᵀ k_j (+ bias), softmax over the slots some j ≤ t wrote."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, n, h, d = q.shape
  per_head = lambda a: np.broadcast_to(np.asarray(a, np.float64), (h,) + np.shape(a)[-2:])
  e, f = per_head(e), per_head(f)
  out = np.zeros(v.shape)
  for bi in range(b):
    for hi in range(h):
      for t in range(n):
        keys = e[hi, :t + 1].T @ k[bi, :t + 1, hi]
        values = f[hi, :t + 1].T @ v[bi, :t + 1, hi]
        if e_bias is not None:
          keys = keys + np.broadcast_to(e_bias, (h, e.shape[-1]))[hi][:, None]
          values = values + np.broadcast_to(f_bias, (h, e.shape[-1]))[hi][:, None]
        scores = np.where((e[hi, :t + 1] != 0).any(0), keys @ q[bi, t, hi] / np.sqrt(d), -np.inf)
        p = np.exp(scores - scores.max())
        out[bi, t, hi] = (p / p.sum()) @ values
  return out


def np_causal_softmax_attention(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n = q.shape[1]
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)


def _qkv(n, h=3, d=4, b=2, seed=0):
  return rand(seed, (b, n, h, d)), rand(seed + 1, (b, n, h, d)), rand(seed + 2, (b, n, h, d))


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("per_head,bias", [(True, False), (False, False), (True, True)])
def test_kernel_matches_numpy(chunk, per_head, bias):
  n, h, kp = 13, 3, 5
  q, k, v = _qkv(n, h)
  lead = (h,) if per_head else ()
  e, f = rand(10, lead + (n, kp)), rand(11, lead + (n, kp))
  e_bias, f_bias = (rand(12, lead + (kp,)), rand(13, lead + (kp,))) if bias else (None, None)
  got = causal_linformer_attention(q, k, v, e, f, e_bias=e_bias, f_bias=f_bias, chunk=chunk)
  np.testing.assert_allclose(np.asarray(got), np_causal_linformer(q, k, v, e, f, e_bias, f_bias), atol=ATOL)
  per_head_remat = causal_linformer_attention(q, k, v, e, f, e_bias=e_bias, f_bias=f_bias, chunk=chunk,
                                              head_remat_policy="nothing_saveable")
  np.testing.assert_allclose(np.asarray(per_head_remat), np.asarray(got), atol=1e-6)


def _dense_reference(q, k, v, e, f):
  """The same equations without chunks, in jnp: the (n, k, d) prefix states written out (small n only)."""
  keys = jnp.cumsum(jnp.einsum("hnr,bnhd->bhnrd", e, k), axis=2)
  values = jnp.cumsum(jnp.einsum("hnr,bnhd->bhnrd", f, v), axis=2)
  scores = jnp.einsum("bnhd,bhnrd->bhnr", q, keys) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhnr,bhnrd->bnhd", jax.nn.softmax(scores, axis=-1), values)


def test_kernel_gradients_match_unchunked_reference():
  n, h, kp = 11, 2, 4
  q, k, v = _qkv(n, h, seed=3)
  e, f = rand(20, (h, n, kp)), rand(21, (h, n, kp))
  w = rand(22, q.shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)
  got = jax.grad(loss(lambda *a: causal_linformer_attention(*a, chunk=4)), argnums=(0, 1, 2, 3, 4))(q, k, v, e, f)
  want = jax.grad(loss(_dense_reference), argnums=(0, 1, 2, 3, 4))(q, k, v, e, f)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [3, 16])
def test_identity_projection_is_causal_softmax_attention(chunk):
  n = 16
  q, k, v = _qkv(n, seed=5)
  eye = jnp.eye(n)
  got = causal_linformer_attention(q, k, v, eye, eye, chunk=chunk)
  np.testing.assert_allclose(np.asarray(got), np_causal_softmax_attention(q, k, v), atol=ATOL)


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
@pytest.mark.parametrize("projection,bias", [("learnable", False), ("fixed", False), ("learnable", True)])
@pytest.mark.parametrize("n", [16, 11])
def test_last_position_equals_bidirectional_layer(sharing, projection, bias, n):
  fields = dict(num_heads=2, max_len=16, k=6, sharing=sharing, projection=projection, projection_bias=bias)
  causal = LinformerSelfAttention(causal=True, causal_chunk=4, **fields)
  bidirectional = LinformerSelfAttention(**fields)
  x = rand(30, (2, n, 8))
  variables = causal.init(jax.random.key(0), x)
  if bias:  # non-zero biases, so that they are tested
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if "bias" in jax.tree_util.keystr(path) else a, variables)
  got, want = causal.apply(variables, x), bidirectional.apply(variables, x)
  np.testing.assert_allclose(np.asarray(got[:, -1]), np.asarray(want[:, -1]), atol=ATOL)
  assert np.abs(np.asarray(got[:, 0] - want[:, 0])).max() > 1e-3  # position 0 sees only itself
  # padding at the end: the last real token sees the same K̄ as the bidirectional layer with the mask
  mask = jnp.arange(n)[None, :] < jnp.array([[n], [n - 4]])
  got, want = causal.apply(variables, x, mask=mask), bidirectional.apply(variables, x, mask=mask)
  np.testing.assert_allclose(np.asarray(got[1, n - 5]), np.asarray(want[1, n - 5]), atol=ATOL)


def _assert_exactly_causal(fn, x):
  """∂out_t/∂x_{t'} (out, x: (batch, n, ·)) is exactly zero for every t' > t, and not for t' ≤ t."""
  jac = np.asarray(jax.jacrev(fn)(x))  # (b, n, d_out, b, n, d_in)
  n = x.shape[1]
  for t in range(n - 1):
    assert np.all(jac[:, t, :, :, t + 1:] == 0.0), f"position {t} depends on a later position"
  assert np.abs(jac[:, n - 1, :, :, 0]).max() > 0.0  # the last position sees the first


ENCODERS = {
    "learnable, none, pre-LN, C0": dict(),
    "fixed, kv, post-LN, C1, scan": dict(projection="fixed", sharing="kv", norm="post", remat="C1",
                                         scan_layers=True),
    "learnable, headwise, C2": dict(sharing="headwise", remat="C2"),
    "learnable, layerwise, C2": dict(sharing="layerwise", remat="C2"),
    "learnable+bias, none, post-LN, C2, scan": dict(projection_bias=True, norm="post", remat="C2", scan_layers=True),
}


@pytest.mark.parametrize("case", list(ENCODERS))
def test_encoder_jacobian_is_exactly_causal(case):
  n = 12
  model = Linformer(max_len=n, dim=8, depth=2, num_heads=2, k=5, dim_ff=16, causal=True, causal_chunk=4,
                    **ENCODERS[case])
  x = rand(40, (2, n, 8))
  variables = model.init(jax.random.key(0), x)
  mask = jnp.arange(n)[None, :] < jnp.array([[n], [9]])
  _assert_exactly_causal(lambda xx: model.apply(variables, xx, mask=mask), x)


def test_train_mode_with_dropout_is_exactly_causal():
  n = 10
  model = Linformer(max_len=n, dim=8, depth=2, num_heads=2, k=4, dim_ff=16, causal=True, causal_chunk=4,
                    dropout=0.1, attention_dropout=0.2)
  x = rand(41, (2, n, 8))
  variables = model.init(jax.random.key(0), x)
  rngs = {"dropout": jax.random.key(3)}
  _assert_exactly_causal(lambda xx: model.apply(variables, xx, deterministic=False, rngs=rngs), x)


@pytest.mark.parametrize("remat", ["C1", "C2"])
def test_remat_levels_equal_c0(remat):
  base = dict(max_len=12, dim=8, depth=2, num_heads=2, k=5, dim_ff=16, vocab_size=17, causal=True, causal_chunk=4)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 17)
  model0, model = LinformerLM(**base), LinformerLM(**base, remat=remat)
  variables = model0.init(jax.random.key(0), tokens)
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
  (l0, g0), (l1, g1) = (jax.value_and_grad(loss(m))(variables["params"]) for m in (model0, model))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_attention_weights_are_distributions_over_the_visible_slots():
  layer = LinformerSelfAttention(num_heads=2, max_len=8, k=8, causal=True, causal_chunk=3)
  x = rand(50, (1, 8, 4))
  variables = layer.init(jax.random.key(0), x)
  eye = jnp.eye(8)  # slot r is written first at position r: position t sees t + 1 slots
  variables = flax.core.copy(variables, {"params": {**variables["params"], "E": {"kernel": jnp.stack([eye, eye])},
                                                    "F": {"kernel": jnp.stack([eye, eye])}}})
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  weights = np.asarray(state["intermediates"]["attention_weights"][0])  # (batch, heads, n, k)
  assert weights.shape == (1, 2, 8, 8)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert np.all(weights[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0.0)


def test_bad_causal_arguments_raise_before_tracing():
  layer = LinformerSelfAttention(num_heads=2, max_len=8, k=4, causal=True)
  x = jnp.ones((1, 8, 4))
  with pytest.raises(ValueError, match="causal=True is self-attention"):
    layer.init(jax.random.key(0), x, context=x)
  for projection in ("conv", "mean_pool", "max_pool"):
    with pytest.raises(ValueError, match=f"projection='{projection}'.*'learnable' or 'fixed'"):
      LinformerSelfAttention(num_heads=2, max_len=8, k=4, causal=True, projection=projection)
  with pytest.raises(ValueError, match="causal_chunk"):
    LinformerSelfAttention(num_heads=2, max_len=8, k=4, causal=True, causal_chunk=0)
  with pytest.raises(ValueError, match="matrix=True needs method 'learnable' or 'fixed'"):
    SeqProjection(8, 4, "conv").init(jax.random.key(0), jnp.ones((1, 8, 2, 4)), matrix=True)
  with pytest.raises(ValueError, match="e must have shape"):
    causal_linformer_attention(*_qkv(8), jnp.ones((7, 4)), jnp.ones((8, 4)))
