"""LinformerSelfAttention / FullSelfAttention against plain-numpy references (float64, per-head loops)."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.layers import FullSelfAttention, LinformerSelfAttention
from linformer_jax.models import Linformer, LinformerEncDec, VisionTransformer
from helpers import np_init, rand

ATOL = 1e-5
B, DIM, HEADS = 2, 8, 2
# Random-number code compiles slowly op by op on CPU (~2 s per new shape); train-mode (dropout) calls are
# jitted without backend optimisation instead (~0.4 s).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# ----------------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------------
def np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def np_attention_and_grads(q, k, v, w, key_mask=None, causal=False):
  """float64 softmax(q kᵀ/√d) v and the gradients of Σ w ⊙ it w.r.t. q, k, v (chain rule by hand).

  All arrays (batch, n, heads, d); key_mask (batch, s) bool; causal: query i sees keys j <= i."""
  q64, k64, v64, w64 = (np.swapaxes(np.asarray(a, np.float64), 1, 2) for a in (q, k, v, w))  # (b, h, n, d)
  scale = 1.0 / math.sqrt(q64.shape[-1])
  s = np.einsum("bhtd,bhsd->bhts", q64, k64) * scale
  if key_mask is not None:
    s = np.where(np.asarray(key_mask)[:, None, None, :], s, -1e30)
  if causal:
    s = np.where(np.arange(s.shape[-2])[:, None] >= np.arange(s.shape[-1])[None, :], s, -1e30)
  p = np_softmax(s)
  dp = np.einsum("bhtd,bhsd->bhts", w64, v64)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  grads = [np.einsum("bhts,bhsd->bhtd", ds, k64) * scale, np.einsum("bhts,bhtd->bhsd", ds, q64) * scale,
           np.einsum("bhts,bhtd->bhsd", p, w64)]
  back = lambda a: np.swapaxes(a, 1, 2)
  return back(np.einsum("bhts,bhsd->bhtd", p, v64)), [back(g) for g in grads]


def np_weights(p):
  """Q/K/V/out weights as float64 numpy: Wq/Wk/Wv (dim, h, d), Wo (h, d, out), bo (out,)."""
  f = lambda a: np.asarray(a, np.float64)
  return (f(p["query"]["kernel"]), f(p["key"]["kernel"]), f(p["value"]["kernel"]),
          f(p["out"]["kernel"]), f(p["out"]["bias"]))


def np_full_mha(x, p, key_mask=None, causal=False):
  """Ordinary multi-head softmax attention, one (batch, head) at a time."""
  x = np.asarray(x, np.float64)
  wq, wk, wv, wo, bo = np_weights(p)
  b, n, _ = x.shape
  h, d = wq.shape[1], wq.shape[2]
  out = np.zeros((b, n, wo.shape[-1]))
  for bi in range(b):
    heads = []
    for hi in range(h):
      q, k, v = x[bi] @ wq[:, hi], x[bi] @ wk[:, hi], x[bi] @ wv[:, hi]
      s = q @ k.T / math.sqrt(d)
      allowed = np.ones((n, n), bool)
      if key_mask is not None:
        allowed &= np.asarray(key_mask[bi], bool)[None, :]
      if causal:
        allowed &= np.tril(np.ones((n, n), bool))
      s = np.where(allowed, s, -1e30)
      heads.append(np_softmax(s) @ v)
    out[bi] = np.concatenate(heads, -1) @ wo.reshape(h * d, -1) + bo
  return out


def np_linformer_mha(x, p, e_mats, f_mats, e_bias=None, f_bias=None, mask=None):
  """Linformer attention (Eq. 7). e_mats[h], f_mats[h]: (max_len, k) stored kernels, E_paper = kernel[:n].T;
  e_bias[h], f_bias[h]: (k,) or None. Padded K, V rows are zeroed before the projection."""
  x = np.asarray(x, np.float64)
  wq, wk, wv, wo, bo = np_weights(p)
  b, n, _ = x.shape
  h, d = wq.shape[1], wq.shape[2]
  out = np.zeros((b, n, wo.shape[-1]))
  for bi in range(b):
    heads = []
    for hi in range(h):
      q, k, v = x[bi] @ wq[:, hi], x[bi] @ wk[:, hi], x[bi] @ wv[:, hi]
      if mask is not None:
        keep = np.asarray(mask[bi], np.float64)[:, None]
        k, v = k * keep, v * keep
      e = np.asarray(e_mats[hi], np.float64)[:n].T  # (k, n)
      f = np.asarray(f_mats[hi], np.float64)[:n].T
      k_bar, v_bar = e @ k, f @ v  # (k, d)
      if e_bias is not None:
        k_bar = k_bar + np.asarray(e_bias[hi], np.float64)[:, None]
        v_bar = v_bar + np.asarray(f_bias[hi], np.float64)[:, None]
      heads.append(np_softmax(q @ k_bar.T / math.sqrt(d)) @ v_bar)
    out[bi] = np.concatenate(heads, -1) @ wo.reshape(h * d, -1) + bo
  return out


def per_head(params, sharing, heads, name):
  """List (one per head) of the E (name="kernel") or bias matrices of a layer, for each of E and F."""
  if sharing == "none":
    e, f = params["E"][name], params["F"][name]
    return [e[i] for i in range(heads)], [f[i] for i in range(heads)]
  if sharing == "headwise":
    return [params["E"][name]] * heads, [params["F"][name]] * heads
  assert sharing == "kv"
  return [params["EF"][name]] * heads, [params["EF"][name]] * heads


def proj_names(sharing):
  return {"none": ("E", "F"), "headwise": ("E", "F"), "kv": ("EF",)}[sharing]


# ----------------------------------------------------------------------------------------------------------
# 1. k = n and E = F = identity → full attention
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_identity_projection_equals_full_attention(sharing):
  n = 9
  layer = LinformerSelfAttention(num_heads=HEADS, max_len=n, k=n, sharing=sharing)
  x = rand(0, (B, n, DIM))
  params = flax.core.unfreeze(np_init(layer, x))["params"]
  for name in proj_names(sharing):
    kernel = params[name]["kernel"]
    params[name]["kernel"] = jnp.broadcast_to(jnp.eye(n, dtype=kernel.dtype), kernel.shape)
  got = layer.apply({"params": params}, x)
  want = np_full_mha(x, params)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
  # the layer's own (random) E/F are not the identity, so the check above is not vacuous
  params0 = np_init(layer, x)
  assert np.abs(np.asarray(layer.apply(params0, x)) - want).max() > 1e-3


def test_identity_projection_equals_full_self_attention_module():
  """Same Q/K/V/out params in FullSelfAttention and an identity-E Linformer layer give the same output."""
  n = 9
  lin = LinformerSelfAttention(num_heads=HEADS, max_len=n, k=n, sharing="headwise")
  full = FullSelfAttention(num_heads=HEADS)
  x = rand(2, (B, n, DIM))
  params = flax.core.unfreeze(np_init(lin, x))["params"]
  params["E"]["kernel"] = jnp.eye(n)
  params["F"]["kernel"] = jnp.eye(n)
  full_params = {name: params[name] for name in ("query", "key", "value", "out")}
  np.testing.assert_allclose(lin.apply({"params": params}, x), full.apply({"params": full_params}, x),
                             atol=ATOL)


def test_full_self_attention_with_key_padding_mask():
  n = 9
  layer = FullSelfAttention(num_heads=HEADS)
  x = rand(4, (B, n, DIM))
  mask = jnp.array([[True] * 6 + [False] * 3, [True] * 9])
  variables = np_init(layer, x, mask=mask)
  got = layer.apply(variables, x, mask=mask)
  np.testing.assert_allclose(got, np_full_mha(x, variables["params"], key_mask=mask), atol=ATOL)
  # the mask matters for batch element 0
  unmasked = np_full_mha(x, variables["params"])
  assert np.abs(np.asarray(got)[0] - unmasked[0]).max() > 1e-4


def test_full_self_attention_causal():
  n = 9
  layer = FullSelfAttention(num_heads=HEADS, causal=True)
  x = rand(6, (B, n, DIM))
  variables = np_init(layer, x)
  got = np.asarray(layer.apply(variables, x))
  np.testing.assert_allclose(got, np_full_mha(x, variables["params"], causal=True), atol=ATOL)
  # position 0 sees only itself; the non-causal reference differs there
  assert np.abs(got[:, 0] - np_full_mha(x, variables["params"])[:, 0]).max() > 1e-4


def test_full_self_attention_causal_and_mask():
  n = 9
  layer = FullSelfAttention(num_heads=HEADS, causal=True)
  x = rand(8, (B, n, DIM))
  mask = jnp.array([[True, False, True, True, False, True, True, False, True], [True] * 7 + [False] * 2])
  variables = np_init(layer, x, mask=mask)
  np.testing.assert_allclose(layer.apply(variables, x, mask=mask),
                             np_full_mha(x, variables["params"], key_mask=mask, causal=True), atol=ATOL)


def test_full_self_attention_cross_context():
  layer = FullSelfAttention(num_heads=HEADS)
  x, ctx = rand(10, (B, 3, DIM)), rand(11, (B, 9, DIM))
  mask = jnp.array([[True] * 9, [True] * 2 + [False] * 7])
  variables = np_init(layer, x, ctx, mask)
  p = variables["params"]
  # numpy cross attention
  wq, wk, wv, wo, bo = np_weights(p)
  xs, cs = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
  want = np.zeros((B, 3, DIM))
  for bi in range(B):
    heads = []
    for hi in range(HEADS):
      s = (xs[bi] @ wq[:, hi]) @ (cs[bi] @ wk[:, hi]).T / math.sqrt(wq.shape[2])
      s = np.where(np.asarray(mask[bi])[None], s, -1e30)
      heads.append(np_softmax(s) @ (cs[bi] @ wv[:, hi]))
    want[bi] = np.concatenate(heads, -1) @ wo.reshape(-1, DIM) + bo
  np.testing.assert_allclose(layer.apply(variables, x, ctx, mask), want, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# 2. general Linformer attention with random E/F (and bias), n < max_len
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_random_projection_matches_numpy(sharing, bias, use_mask):
  max_len, n, k = 12, 9, 5
  layer = LinformerSelfAttention(num_heads=HEADS, max_len=max_len, k=k, sharing=sharing,
                                 projection_bias=bias)
  x = rand(12, (B, n, DIM))
  params = flax.core.unfreeze(np_init(layer, x))["params"]
  for j, name in enumerate(proj_names(sharing)):
    assert params[name]["kernel"].shape[-2:] == (max_len, k)
    params[name]["kernel"] = rand(20 + j, params[name]["kernel"].shape, 0.5)
    if bias:
      assert params[name]["bias"].shape == ((HEADS, k) if sharing == "none" else (k,))
      params[name]["bias"] = rand(30 + j, params[name]["bias"].shape)
    else:
      assert "bias" not in params[name]
  mask = jnp.array([[True] * 7 + [False] * 2, [True] * 9]) if use_mask else None
  got = layer.apply({"params": params}, x, mask=mask)
  e_mats, f_mats = per_head(params, sharing, HEADS, "kernel")
  e_bias, f_bias = per_head(params, sharing, HEADS, "bias") if bias else (None, None)
  want = np_linformer_mha(x, params, e_mats, f_mats, e_bias, f_bias, mask=mask)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_head_dim_and_out_dim_and_w_o_intermediate():
  """head_dim != dim/heads, and a two-matrix output map h·d → w → dim with no nonlinearity."""
  max_len, n, k, hd, w = 8, 8, 3, 5, 6
  layer = LinformerSelfAttention(num_heads=3, head_dim=hd, max_len=max_len, k=k, sharing="headwise",
                                 w_o_intermediate_dim=w)
  x = rand(40, (B, n, 7))
  params = np_init(layer, x)["params"]
  assert params["query"]["kernel"].shape == (7, 3, hd)
  assert params["out_1"]["kernel"].shape == (3, hd, w)
  assert params["out_2"]["kernel"].shape == (w, 7)
  # fold the two output maps into one (linear composition) and reuse the numpy reference
  w1 = np.asarray(params["out_1"]["kernel"], np.float64).reshape(3 * hd, w)
  w2 = np.asarray(params["out_2"]["kernel"], np.float64)
  folded = dict(params, out={"kernel": (w1 @ w2).reshape(3, hd, 7),
                             "bias": np.asarray(params["out_1"]["bias"], np.float64) @ w2
                             + np.asarray(params["out_2"]["bias"], np.float64)})
  want = np_linformer_mha(x, folded, [params["E"]["kernel"]] * 3, [params["F"]["kernel"]] * 3)
  np.testing.assert_allclose(layer.apply({"params": params}, x), want, atol=ATOL)


def test_cross_attention_context():
  """Linformer cross-attention: queries from x (length 3), keys/values from a context of length n <= max_len."""
  max_len, n, k = 12, 9, 5
  layer = LinformerSelfAttention(num_heads=HEADS, max_len=max_len, k=k, sharing="kv")
  x, ctx = rand(50, (B, 3, DIM)), rand(51, (B, n, DIM))
  params = np_init(layer, x, ctx)["params"]
  got = np.asarray(layer.apply({"params": params}, x, ctx))
  assert got.shape == (B, 3, DIM)
  wq, wk, wv, wo, bo = np_weights(params)
  e = np.asarray(params["EF"]["kernel"], np.float64)[:n].T
  xs, cs = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
  for bi in range(B):
    heads = []
    for hi in range(HEADS):
      kb, vb = e @ (cs[bi] @ wk[:, hi]), e @ (cs[bi] @ wv[:, hi])
      heads.append(np_softmax((xs[bi] @ wq[:, hi]) @ kb.T / math.sqrt(wq.shape[2])) @ vb)
    np.testing.assert_allclose(got[bi], np.concatenate(heads, -1) @ wo.reshape(-1, DIM) + bo, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# 11. dropout (layer level)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_kwargs", [
    (LinformerSelfAttention, dict(max_len=12, k=5, sharing="headwise")),
    (FullSelfAttention, dict()),
])
def test_attention_dropout(cls_kwargs):
  cls, kwargs = cls_kwargs
  x = rand(60, (B, 12, DIM))
  layer = cls(num_heads=HEADS, attention_dropout=0.5, **kwargs)
  no_drop = cls(num_heads=HEADS, attention_dropout=0.0, **kwargs)
  variables = np_init(layer, x)
  ref = np.asarray(no_drop.apply(variables, x))
  # deterministic=True equals rate 0 (no rng needed)
  np.testing.assert_allclose(layer.apply(variables, x, deterministic=True), ref, atol=1e-6)
  # train mode needs a "dropout" rng ...
  with pytest.raises(Exception, match="dropout"):
    layer.apply(variables, x, deterministic=False)
  # ... and changes the output; same rng → same output, another rng → another output
  train = fast_jit(lambda v, x, r: layer.apply(v, x, deterministic=False, rngs={"dropout": r}))
  a = np.asarray(train(variables, x, jax.random.PRNGKey(1)))
  a2 = np.asarray(train(variables, x, jax.random.PRNGKey(1)))
  c = np.asarray(train(variables, x, jax.random.PRNGKey(2)))
  assert np.abs(a - ref).max() > 1e-3
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - c).max() > 1e-3
  # with rate 0 the rng is irrelevant
  np.testing.assert_allclose(
      no_drop.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}), ref,
      atol=1e-6)


def test_attention_dropout_matches_numpy_with_reconstructed_keep_mask():
  """Train-mode full attention with dropout p equals numpy softmax·keep/(1-p)·V for the keep mask implied by
  the same rng (jax.random.bernoulli on the (b, h, t, s) weight shape)."""
  from linformer_jax.layers import softmax_attention
  q, k, v = rand(70, (1, 4, 2, 3)), rand(71, (1, 5, 2, 3)), rand(72, (1, 5, 2, 3))
  rng, p = jax.random.PRNGKey(73), 0.25
  got = fast_jit(lambda q, k, v, r: softmax_attention(q, k, v, dropout_rate=p, dropout_rng=r))(q, k, v, rng)
  keep = np.asarray(fast_jit(lambda r: jax.random.bernoulli(r, 1 - p, (1, 2, 4, 5)))(rng))
  assert 0 < keep.sum() < keep.size
  qs, ks, vs = (np.asarray(a, np.float64) for a in (q, k, v))
  w = np_softmax(np.einsum("bthd,bshd->bhts", qs, ks) / math.sqrt(3))
  want = np.einsum("bhts,bshd->bthd", np.where(keep, w / (1 - p), 0.0), vs)
  np.testing.assert_allclose(got, want, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# softmax_last: softmax with a contraction-shaped derivative
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (2, 3, 5, 11)])
def test_softmax_last_values_and_derivatives_match_numpy(shape):
  """Forward = numpy softmax; VJP = Jᵀḡ and JVP = J ẋ with the softmax Jacobian J = diag(p) − p pᵀ in float64."""
  from linformer_jax.layers.attention import softmax_last
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32) * 3
  g = rng.normal(size=shape).astype(np.float32)
  p, vjp = jax.vjp(softmax_last, jnp.asarray(x))
  (xbar,) = vjp(jnp.asarray(g))
  p64 = np_softmax(x.astype(np.float64))
  jac = np.einsum("...i,ij->...ij", p64, np.eye(shape[-1])) - p64[..., :, None] * p64[..., None, :]
  want = np.einsum("...ij,...i->...j", jac, g.astype(np.float64))
  np.testing.assert_allclose(p, p64, atol=1e-6)
  np.testing.assert_allclose(xbar, want, atol=1e-6)
  # masked entries (finfo.min logits, as attention_weights writes them) get zero weight and zero gradient
  xm = x.copy()
  xm[..., 0] = np.finfo(np.float32).min
  pm, vjpm = jax.vjp(softmax_last, jnp.asarray(xm))
  assert np.all(np.asarray(pm)[..., 0] == 0) and np.all(np.asarray(vjpm(jnp.asarray(g))[0])[..., 0] == 0)
  # forward mode (J ẋ) works too and matches the same Jacobian; so does a second derivative through it
  _, tangent = jax.jvp(softmax_last, (jnp.asarray(x),), (jnp.asarray(g),))
  np.testing.assert_allclose(tangent, np.einsum("...ij,...j->...i", jac, g.astype(np.float64)), atol=1e-6)
  hvp = jax.jvp(jax.grad(lambda z: jnp.sum(softmax_last(z) ** 2)), (jnp.asarray(x),), (jnp.asarray(g),))[1]
  ref = jax.jvp(jax.grad(lambda z: jnp.sum(jax.nn.softmax(z, axis=-1) ** 2)), (jnp.asarray(x),), (jnp.asarray(g),))[1]
  np.testing.assert_allclose(hvp, ref, atol=1e-5)


def test_full_attention_gradients_match_numpy():
  """Gradient of Σ w ⊙ softmax(q kᵀ/√d) v w.r.t. q, k, v against float64 numpy (the chain rule by hand)."""
  from linformer_jax.layers.attention import softmax_attention
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 6, 2, 4)).astype(np.float32) for _ in range(3))
  w = rng.normal(size=(2, 6, 2, 4)).astype(np.float32)
  gq, gk, gv = jax.grad(lambda q, k, v: jnp.sum(w * softmax_attention(q, k, v)), argnums=(0, 1, 2))(q, k, v)
  _, want = np_attention_and_grads(q, k, v, w)
  for got, ref in zip((gq, gk, gv), want):
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_default_block_rows_rule():
  """Blocks only on the CPU, past the per-head score limit; a block's scores are 32 KiB × head dim per head;
  >= min rows. The limits are the function's argument defaults (nothing else reads them)."""
  import inspect
  from linformer_jax.layers.softmax_kernel import default_block_rows
  params = inspect.signature(default_block_rows).parameters
  assert (params["scores_block_bytes"].default, params["bytes_per_head_dim"].default,
          params["min_rows"].default) == (2 * 2**20, 32 * 2**10, 16)
  f32 = jnp.float32
  rows = functools.partial(default_block_rows, backend="cpu")
  assert rows((1, 4096, 4, 16), 128, f32) == 4096     # 2 MiB per head: at the limit, no blocks
  assert rows((1, 16384, 4, 16), 128, f32) == 1024    # 8 MiB; 512 KiB blocks = 1024 rows of 128 keys
  assert rows((1, 4096, 4, 16), 4096, f32) == 32      # full attention: 32 rows of 4096 keys
  assert rows((2, 4096, 4, 64), 4096, f32) == 128     # d = 64: 2 MiB blocks
  assert rows((1, 1024, 4, 16), 1024, f32) == 128
  assert rows((8, 1024, 8, 64), 256, f32) == 1024     # 1 MiB per head (batch and heads do not count)
  assert rows((1, 65536, 1, 1), 65536, f32) == 16     # never fewer than 16 rows
  assert rows((1, 16381, 4, 16), 128, f32) == 1024    # any t: the last block is padded
  assert rows((1, 1000, 4, 16), 1000, jnp.float16) == 1000  # 2 bytes per score: under the limit
  for backend in ("gpu", "tpu"):  # off the CPU: never blocks
    assert default_block_rows((1, 4096, 4, 16), 4096, f32, backend=backend) == 4096
  # the limits as explicit arguments: 11·s·4 B > 64 → blocks of 4·s·4 / (s·4) = 4 queries
  assert rows((2, 11, 2, 4), 3, f32, scores_block_bytes=64, bytes_per_head_dim=4 * 3, min_rows=2) == 4
  assert rows((2, 11, 2, 4), 3, f32, scores_block_bytes=11 * 3 * 4) == 11  # at the limit: no blocks
  assert rows((2, 11, 2, 4), 3, f32, scores_block_bytes=64, bytes_per_head_dim=1, min_rows=5) == 5
  # with backend=None the backend is jax's default (the tests run on the CPU)
  assert default_block_rows((1, 4096, 4, 16), 4096, f32) == (32 if jax.default_backend() == "cpu" else 4096)


def test_default_implementation_rule():
  """Half precision off the CPU → jax.nn.dot_product_attention; float32 anywhere and anything on the CPU → the
  heads-first einsums ("xla")."""
  from linformer_jax.layers.softmax_kernel import IMPLEMENTATIONS, default_implementation
  assert IMPLEMENTATIONS == ("xla", "dot_product_attention")
  for backend in ("gpu", "tpu"):
    assert default_implementation(jnp.float32, backend=backend) == "xla"
    assert default_implementation(jnp.bfloat16, backend=backend) == "dot_product_attention"
    assert default_implementation(jnp.float16, backend=backend) == "dot_product_attention"
  assert default_implementation(jnp.bfloat16, backend="cpu") == "xla"
  assert default_implementation(jnp.float32, backend="cpu") == "xla"


def test_softmax_attention_defaults_are_the_default_functions():
  """implementation=None / block_rows=None trace the same program as the default functions' choices passed
  explicitly (here, on the CPU, one in query blocks)."""
  from linformer_jax.layers.softmax_kernel import default_block_rows, default_implementation, softmax_attention
  q = jax.ShapeDtypeStruct((1, 2048, 1, 16), jnp.float32)  # 16 MiB of scores per head: blocks on the CPU
  kv = jax.ShapeDtypeStruct((1, 2048, 1, 16), jnp.float32)
  explicit = dict(implementation=default_implementation(q.dtype), block_rows=default_block_rows(q.shape, 2048, q.dtype))
  by_default = str(jax.make_jaxpr(lambda q, k, v: softmax_attention(q, k, v))(q, kv, kv))
  assert by_default == str(jax.make_jaxpr(lambda q, k, v: softmax_attention(q, k, v, **explicit))(q, kv, kv))
  if jax.default_backend() == "cpu":
    assert explicit == dict(implementation="xla", block_rows=64) and "scan" in by_default


@pytest.mark.parametrize("s,causal", [(3, False), (11, False), (11, True)])  # few keys (the Linformer core);
@pytest.mark.parametrize("use_mask", [False, True])                        # as many as queries (full attention)
def test_blocked_attention_matches_numpy(use_mask, s, causal):
  """With block_rows=4 the "xla" core runs query blocks in a loop; values and gradients equal float64 numpy."""
  from linformer_jax.layers.softmax_kernel import softmax_attention
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 11, 2, 4)).astype(np.float32)
  k, v = (rng.normal(size=(2, s, 2, 4)).astype(np.float32) for _ in range(2))
  w = rng.normal(size=(2, 11, 2, 4)).astype(np.float32)
  mask = (np.arange(s)[None, :] % np.array([[2], [3]]) != 1) if use_mask else None
  # blocks of 4 queries: 3 blocks, the last one padded with one zero query
  attend = lambda q, k, v: softmax_attention(q, k, v, key_mask=mask, is_causal=causal, block_rows=4)
  loss = lambda q, k, v: jnp.sum(w * attend(q, k, v))
  jaxpr = str(jax.make_jaxpr(loss)(q, k, v))
  assert "scan" in jaxpr and "remat" in jaxpr  # the blocked path ran, each block under jax.checkpoint
  out, want = np_attention_and_grads(q, k, v, w, mask, causal)
  np.testing.assert_allclose(attend(q, k, v), out, atol=1e-5)
  gq, gk, gv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for got, ref in zip((gq, gk, gv), want):
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_block_rows_zero_and_at_least_t_never_block():
  """block_rows=0 or >= t: no loop (on any backend, whatever the default rule would choose); 1 .. t-1: a loop."""
  from linformer_jax.layers.softmax_kernel import softmax_attention
  q = jax.ShapeDtypeStruct((1, 2048, 1, 16), jnp.float32)  # the CPU default would block these
  jaxpr = lambda rows: str(jax.make_jaxpr(lambda q: softmax_attention(q, q, q, block_rows=rows))(q))
  assert "scan" not in jaxpr(0) and "scan" not in jaxpr(2048) and "scan" not in jaxpr(4096)
  assert "scan" in jaxpr(1024) and "scan" in jaxpr(1)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_off_the_cpu_routes_by_dtype(monkeypatch, causal):
  """The GPU/TPU defaults (backend="gpu"): float32 runs the einsum core without query blocks (values and gradients
  equal float64 numpy, no jax.nn.dot_product_attention call even where the CPU would block); half precision goes
  to jax.nn.dot_product_attention."""
  from linformer_jax.layers.softmax_kernel import default_block_rows, default_implementation, softmax_attention
  calls = []  # jax.nn.dot_product_attention's calls (wrapped: jax's function, not a global of ours)
  real_dpa = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(a[0].dtype) or real_dpa(*a, **kw))
  rng = np.random.default_rng(3)
  q, k, v, w = (rng.normal(size=(2, 9, 2, 4)).astype(np.float32) for _ in range(4))
  mask = np.arange(9)[None, :] % np.array([[2], [4]]) != 1
  limits = dict(scores_block_bytes=64, bytes_per_head_dim=4 * 9, min_rows=2)  # the CPU: blocks of 4 queries
  assert default_block_rows(q.shape, 9, jnp.float32, backend="cpu", **limits) == 4
  kernel = dict(implementation=default_implementation(jnp.float32, backend="gpu"),
                block_rows=default_block_rows(q.shape, 9, jnp.float32, backend="gpu", **limits))
  assert kernel == dict(implementation="xla", block_rows=9)  # off the CPU: no blocks whatever the limits
  attend = lambda q, k, v, **kw: softmax_attention(q, k, v, key_mask=mask, is_causal=causal, **kw)
  loss = lambda q, k, v, **kw: jnp.sum(w * attend(q, k, v, **kw))
  jaxpr = lambda **kw: str(jax.make_jaxpr(lambda *a: loss(*a, **kw))(q, k, v))
  assert "scan" in jaxpr(block_rows=4)  # the CPU's choice: blocks
  assert "scan" not in jaxpr(**kernel)
  out, want = np_attention_and_grads(q, k, v, w, mask, causal)
  np.testing.assert_allclose(attend(q, k, v, **kernel), out, atol=1e-5)
  for got, ref in zip(jax.grad(functools.partial(loss, **kernel), argnums=(0, 1, 2))(q, k, v), want):
    np.testing.assert_allclose(got, ref, atol=1e-5)
  assert calls == []
  half_impl = default_implementation(jnp.bfloat16, backend="gpu")
  assert half_impl == "dot_product_attention"
  half = attend(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), implementation=half_impl, block_rows=4)
  assert calls == [jnp.bfloat16] and half.dtype == jnp.bfloat16  # block_rows does not apply to it
  np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=5e-2)
  # float32 through dot_product_attention, chosen explicitly: the same values
  np.testing.assert_allclose(attend(q, k, v, implementation="dot_product_attention"), out, atol=1e-5)
  assert calls == [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("kwargs,message", [
    (dict(implementation="flash"), "implementation='flash' is not supported; allowed values: 'xla', "
                                   "'dot_product_attention', None"),
    (dict(implementation="XLA"), "implementation='XLA' is not supported"),
    (dict(block_rows=-1), "block_rows=-1 is out of range; it must be >= 0"),
])
def test_softmax_attention_rejects_bad_kernel_args(kwargs, message):
  from linformer_jax.layers.softmax_kernel import softmax_attention
  q = jnp.zeros((1, 4, 2, 3))
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    softmax_attention(q, q, q, **kwargs)
  with pytest.raises(TypeError, match="block_rows must be an int"):
    softmax_attention(q, q, q, block_rows=2.0)


@pytest.mark.parametrize("build", [
    lambda **kw: FullSelfAttention(2, **kw),
    lambda **kw: LinformerSelfAttention(2, max_len=8, k=4, **kw),
    lambda **kw: Linformer(max_len=8, dim=8, depth=1, num_heads=2, k=4, **kw),
    lambda **kw: VisionTransformer(**kw),
])
def test_modules_reject_bad_kernel_fields(build):
  """attention_impl / attention_block_rows are checked when the module is built, naming the field."""
  with pytest.raises(ValueError, match="attention_impl='flash' is not supported; allowed values: 'xla'"):
    build(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_block_rows=-3 is out of range"):
    build(attention_block_rows=-3)
  build(attention_impl="dot_product_attention", attention_block_rows=0)  # valid values build


def _scans(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("scan[")


@pytest.mark.parametrize("attention", ["linformer", "full"])
def test_linformer_model_block_rows_field(attention):
  """A whole model built with attention_block_rows=0 and with 4: the same parameter tree and outputs, and only the
  second runs query blocks (two nested loops per attention layer, each block under jax.checkpoint)."""
  geometry = dict(max_len=12, dim=8, depth=2, num_heads=2, k=6, attention=attention, causal=attention == "full")
  x = rand(80, (2, 12, 8))
  mask = np.arange(12)[None, :] < np.array([[12], [9]])
  unblocked, blocked = (Linformer(**geometry, attention_block_rows=r) for r in (0, 4))
  variables = unblocked.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, blocked.init(jax.random.PRNGKey(0), x))
  out = lambda model: lambda v, x: model.apply(v, x, mask)
  assert _scans(out(unblocked), variables, x) == 0
  assert _scans(out(blocked), variables, x) == 2 * 2  # depth 2
  assert "remat" in str(jax.make_jaxpr(out(blocked))(variables, x))
  np.testing.assert_allclose(out(blocked)(variables, x), out(unblocked)(variables, x), atol=1e-6)
  # and the default: the backend's rule (no blocks at these sizes)
  np.testing.assert_array_equal(out(Linformer(**geometry))(variables, x), out(unblocked)(variables, x))


def test_encdec_and_vit_pass_block_rows_to_every_attention():
  """LinformerEncDec: encoder, decoder self- and cross-attention all get attention_block_rows; so do ViT's blocks."""
  encdec = dict(max_len=12, dim=8, depth=1, num_heads=2, k=6, vocab_size=11)
  src, tgt = jnp.arange(24).reshape(2, 12) % 11, jnp.arange(20).reshape(2, 10) % 11
  models = [LinformerEncDec(**encdec, attention_block_rows=r) for r in (0, 4)]
  variables = models[0].init(jax.random.PRNGKey(0), src, tgt)
  outs = [lambda v, s, t, m=m: m.apply(v, s, t) for m in models]
  assert _scans(outs[0], variables, src, tgt) == 0
  assert _scans(outs[1], variables, src, tgt) == 2 * 3  # encoder, decoder self-attention, cross-attention
  np.testing.assert_allclose(outs[1](variables, src, tgt), outs[0](variables, src, tgt), atol=1e-5)
  vit = dict(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3)  # 17 tokens
  images = rand(81, (1, 16, 16, 3))
  models = [VisionTransformer(**vit, attention_block_rows=r) for r in (0, 5)]
  variables = models[0].init(jax.random.PRNGKey(0), images)
  outs = [lambda v, x, m=m: m.apply(v, x) for m in models]
  assert _scans(outs[0], variables, images) == 0 and _scans(outs[1], variables, images) == 2 * 2
  np.testing.assert_allclose(outs[1](variables, images), outs[0](variables, images), atol=1e-5)
