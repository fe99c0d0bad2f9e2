"""The Linformer encoder: numpy reference of the whole stack, projection/parameter counts per sharing mode,
padding-mask invariance, k per layer, full/causal attention, dropout."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.models import CAUSAL_ERROR, Linformer, count_projection_matrices
from helpers import np_init, rand

ATOL = 1e-5
SHARINGS = ["none", "headwise", "kv", "layerwise"]
PROJECTIONS = ["learnable", "fixed", "conv", "mean_pool", "max_pool"]
# tiny common config: dim 8, 2 heads of 4, max_len 12, k 5 (conv/pool window s = 3, padded to 15)
CFG = dict(max_len=12, dim=8, depth=2, num_heads=2, k=5, dim_ff=16)
# random-number code compiles slowly op by op on CPU: train-mode calls are jitted without backend optimisation
fast_jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))


def n_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# numpy reference of the encoder (float64, per-head loops)
# ----------------------------------------------------------------------------------------------------------
def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), flax.core.unfreeze(tree))


def np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


np_erf = np.vectorize(math.erf)


def np_ff(x, p):
  h = x @ p["wi"]["kernel"] + p["wi"]["bias"]
  h = 0.5 * h * (1.0 + np_erf(h / math.sqrt(2.0)))
  return h @ p["wo"]["kernel"] + p["wo"]["bias"]


def np_attention(x, p, mask=None, causal=False, proj=None):
  """x (b, n, dim). proj = None (full attention) or (e_mats, f_mats, e_bias, f_bias), lists over heads of
  (max_len, k) kernels and (k,) biases (or None). mask (b, n) bool: key padding (full) / zeroed K, V rows."""
  wq, wk, wv = p["query"]["kernel"], p["key"]["kernel"], p["value"]["kernel"]
  wo, bo = p["out"]["kernel"], p["out"]["bias"]
  b, n, _ = x.shape
  h, d = wq.shape[1], wq.shape[2]
  out = np.zeros((b, n, wo.shape[-1]))
  for bi in range(b):
    heads = []
    keep = np.ones(n, bool) if mask is None else np.asarray(mask[bi], bool)
    for hi in range(h):
      q, k, v = x[bi] @ wq[:, hi], x[bi] @ wk[:, hi], x[bi] @ wv[:, hi]
      if proj is None:
        s = q @ k.T / math.sqrt(d)
        allowed = np.broadcast_to(keep[None, :], (n, n))
        if causal:
          allowed = allowed & np.tril(np.ones((n, n), bool))
        heads.append(np_softmax(np.where(allowed, s, -1e30)) @ v)
      else:
        e_mats, f_mats, e_bias, f_bias = proj
        k, v = k * keep[:, None], v * keep[:, None]
        k_bar, v_bar = e_mats[hi][:n].T @ k, f_mats[hi][:n].T @ v
        if e_bias is not None:
          k_bar, v_bar = k_bar + e_bias[hi][:, None], v_bar + f_bias[hi][:, None]
        heads.append(np_softmax(q @ k_bar.T / math.sqrt(d)) @ v_bar)
    out[bi] = np.concatenate(heads, -1) @ wo.reshape(h * d, -1) + bo
  return out


def np_projections(params, layer_params, sharing, heads, bias):
  """E/F matrices per head for one layer, from the variable tree."""
  if sharing == "layerwise":
    src = {"E": params["EF"], "F": params["EF"]}
  elif sharing == "kv":
    src = {"E": layer_params["EF"], "F": layer_params["EF"]}
  else:
    src = {"E": layer_params["E"], "F": layer_params["F"]}
  def per_head(node, name):
    a = node[name]
    return [a[i] for i in range(heads)] if sharing == "none" else [a] * heads
  e_b = per_head(src["E"], "bias") if bias else None
  f_b = per_head(src["F"], "bias") if bias else None
  return per_head(src["E"], "kernel"), per_head(src["F"], "kernel"), e_b, f_b


def np_encoder(x, params, *, depth, num_heads, sharing="none", attention="linformer", norm="pre",
               mask=None, causal=False, projection_bias=False, **_):
  params = f64(params)
  h = np.asarray(x, np.float64)
  for i in range(depth):
    lp = params[f"layer_{i}"]
    proj = (np_projections(params, lp["attention"], sharing, num_heads, projection_bias)
            if attention == "linformer" else None)
    attn = lambda z: np_attention(z, lp["attention"], mask=mask, causal=causal, proj=proj)
    if norm == "pre":
      h = h + attn(np_layer_norm(h, lp["ln_attention"]))
      h = h + np_ff(np_layer_norm(h, lp["ln_ff"]), lp["ff"])
    else:
      h = np_layer_norm(h + attn(h), lp["ln_attention"])
      h = np_layer_norm(h + np_ff(h, lp["ff"]), lp["ln_ff"])
  if norm == "pre":
    h = np_layer_norm(h, params["ln_final"])
  return h


@pytest.mark.parametrize("sharing,norm,bias,k_reduce", [
    ("none", "pre", False, 2),
    ("headwise", "post", True, 1),
    ("kv", "pre", True, 0),
    ("layerwise", "post", False, 0),
    ("layerwise", "pre", True, 0),
])
def test_encoder_matches_numpy_reference(sharing, norm, bias, k_reduce):
  cfg = dict(CFG, sharing=sharing, norm=norm, projection_bias=bias, k_reduce_by_layer=k_reduce)
  model = Linformer(**cfg)
  x = rand(0, (2, 9, 8))
  mask = jnp.array([[True] * 7 + [False] * 2, [True] * 9])
  variables = np_init(model, x, mask=mask)
  got = model.apply(variables, x, mask=mask)
  want = np_encoder(x, variables["params"], mask=mask, **cfg)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_full_attention_matches_numpy_reference(norm):
  cfg = dict(CFG, attention="full", norm=norm, depth=1)
  model = Linformer(**cfg)
  x = rand(1, (2, 9, 8))
  mask = jnp.array([[True] * 6 + [False] * 3, [True] * 9])
  variables = np_init(model, x, mask=mask)
  assert "E" not in variables["params"]["layer_0"]["attention"]
  got = model.apply(variables, x, mask=mask)
  np.testing.assert_allclose(got, np_encoder(x, variables["params"], mask=mask, **cfg), atol=ATOL)
  # the mask is used: without it (numpy) the first sequence's output differs
  unmasked = np_encoder(x, variables["params"], **cfg)
  assert np.abs(np.asarray(got)[0] - unmasked[0]).max() > 1e-3


def test_full_attention_padding_invariance_and_differs_from_linformer():
  full = Linformer(**dict(CFG, attention="full"))
  lin = Linformer(**dict(CFG, attention="linformer", sharing="headwise"))
  x = rand(2, (2, 9, 8))
  mask = jnp.arange(9)[None] < jnp.array([[7], [4]])
  lin_vars = np_init(lin, x, mask=mask)
  # same Q/K/V/out/LN/FF weights: drop E, F from the Linformer tree
  full_params = flax.core.unfreeze(lin_vars["params"])
  for i in range(CFG["depth"]):
    for name in ("E", "F"):
      del full_params[f"layer_{i}"]["attention"][name]
  out_full = np.asarray(full.apply({"params": full_params}, x, mask=mask))
  out_lin = np.asarray(lin.apply(lin_vars, x, mask=mask))
  assert np.abs(out_full[0, :7] - out_lin[0, :7]).max() > 1e-3
  x2 = x.at[:, 7:].set(rand(3, (2, 2, 8))).at[1, 4:].set(rand(4, (5, 8)))
  out2 = np.asarray(full.apply({"params": full_params}, x2, mask=mask))
  np.testing.assert_allclose(out2[0, :7], out_full[0, :7], atol=ATOL)
  np.testing.assert_allclose(out2[1, :4], out_full[1, :4], atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# 3. projection-matrix and parameter counts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection,sharing,expected", [
    ("learnable", "none", 288), ("learnable", "headwise", 24), ("learnable", "kv", 12),
    ("learnable", "layerwise", 1), ("fixed", "none", 288), ("fixed", "kv", 12)])
def test_projection_matrix_count_12_layers_12_heads(projection, sharing, expected):
  model = Linformer(max_len=8, dim=24, depth=12, num_heads=12, k=4, dim_ff=8, sharing=sharing,
                    projection=projection)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 24)))
  assert count_projection_matrices(shapes) == expected
  # independent count from the tree: walk all E/F/EF nodes
  count = 0
  collection = shapes["params" if projection == "learnable" else "constants"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
    names = [p.key for p in path]
    if names[-1] == "kernel" and names[-2] in ("E", "F", "EF"):
      count += leaf.shape[0] if leaf.ndim == 3 else 1
  assert count == expected


@pytest.mark.parametrize("sharing,expected", [("none", 48), ("headwise", 4), ("kv", 2), ("layerwise", 1)])
def test_projection_matrix_count_conv_and_pool(sharing, expected):
  """Conv kernels count like matrices (per head for sharing none); pooling has none."""
  kw = dict(max_len=8, dim=8, depth=2, num_heads=12, head_dim=2, k=4, dim_ff=8, sharing=sharing)
  x = jnp.zeros((1, 8, 8))
  conv = jax.eval_shape(Linformer(projection="conv", **kw).init, jax.random.PRNGKey(0), x)
  pool = jax.eval_shape(Linformer(projection="mean_pool", **kw).init, jax.random.PRNGKey(0), x)
  assert count_projection_matrices(conv) == expected
  assert count_projection_matrices(pool) == 0


def expected_param_count(*, max_len, dim, depth, num_heads, k, dim_ff, sharing, projection="learnable",
                         projection_bias=False, k_reduce_by_layer=0, norm="pre", head_dim=None, **_):
  """Hand-written count: per layer Q, K, V (dim·h·d_h each, no bias), out (h·d_h·dim + dim), two LayerNorms
  (2·dim each), FF (dim·dim_ff + dim_ff + dim_ff·dim + dim); E/F per sharing mode; final LN for pre-LN."""
  d_h = head_dim or dim // num_heads
  per_layer = 3 * dim * num_heads * d_h + num_heads * d_h * dim + dim + 2 * (2 * dim)
  per_layer += dim * dim_ff + dim_ff + dim_ff * dim + dim
  total = depth * per_layer + (2 * dim if norm == "pre" else 0)

  def one_matrix(k_i):
    if projection == "learnable":
      return max_len * k_i + (k_i if projection_bias else 0)
    if projection == "conv":
      s = -(-max_len // k_i)
      return s * d_h * d_h + (d_h if projection_bias else 0)
    return 0  # fixed (constants) and pooling: nothing trainable

  if sharing == "layerwise":
    return total + one_matrix(k)
  for i in range(depth):
    k_i = max(1, k - i * k_reduce_by_layer)
    total += {"none": 2 * num_heads, "headwise": 2, "kv": 1}[sharing] * one_matrix(k_i)
  return total


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("projection,bias,k_reduce,norm", [
    ("learnable", False, 0, "pre"),
    ("learnable", True, 3, "post"),
    ("conv", True, 3, "pre"),
    ("fixed", False, 1, "post"),
    ("max_pool", False, 0, "pre"),
])
def test_parameter_count_formula(sharing, projection, bias, k_reduce, norm):
  if sharing == "layerwise":
    k_reduce = 0
  cfg = dict(max_len=20, dim=12, depth=2, num_heads=3, k=7, dim_ff=10, sharing=sharing, projection=projection,
             projection_bias=bias, k_reduce_by_layer=k_reduce, norm=norm)
  shapes = jax.eval_shape(Linformer(**cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 20, 12)))
  assert n_params(shapes["params"]) == expected_param_count(**cfg)


@pytest.mark.parametrize("sharing,expected", [("none", 1_725_312), ("headwise", 543_360), ("kv", 346_368),
                                              ("layerwise", 215_040)])
def test_parameter_count_matches_linformer_pytorch(sharing, expected):
  """Counts measured with linformer-pytorch 0.19.3 (n=512, k=128, channels 64, 4 heads, depth 3, dim_ff 256;
  post-LN, E/F with bias) — see the reference notes."""
  cfg = dict(max_len=512, dim=64, depth=3, num_heads=4, k=128, dim_ff=256, sharing=sharing, norm="post",
             projection_bias=True)
  shapes = jax.eval_shape(Linformer(**cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 512, 64)))
  assert n_params(shapes["params"]) == expected == expected_param_count(**cfg)


def test_fixed_projection_is_not_a_parameter():
  cfg = dict(CFG, projection="fixed", sharing="headwise")
  shapes = jax.eval_shape(Linformer(**cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 8)))
  assert n_params(shapes["constants"]) == CFG["depth"] * 2 * 12 * 5
  assert n_params(shapes["params"]) == expected_param_count(**cfg)


# ----------------------------------------------------------------------------------------------------------
# 6. padding-mask invariance, every projection × sharing
# ----------------------------------------------------------------------------------------------------------
def _padded_inputs(seed):
  """Two sequences with 7 and 4 real tokens: (a) length 9, (b) length 9 with other padding content,
  (c) length 12 with other padding content. Returns [(x, mask)], lengths."""
  lengths = np.array([7, 4])
  real = rand(seed, (2, 12, 8))
  def variant(n, pad_seed):
    x = np.array(rand(pad_seed, (2, n, 8), 3.0))
    for bi, length in enumerate(lengths):
      x[bi, :length] = np.asarray(real)[bi, :length]
    return jnp.asarray(x), jnp.asarray(np.arange(n)[None] < lengths[:, None])
  return [variant(9, seed + 1), variant(9, seed + 2), variant(12, seed + 3)], lengths


def _assert_real_tokens_equal(outs, lengths, atol=ATOL):
  for out in outs[1:]:
    for bi, length in enumerate(lengths):
      np.testing.assert_allclose(np.asarray(out)[bi, :length], np.asarray(outs[0])[bi, :length], atol=atol)


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_mask_invariance(projection, sharing):
  model = Linformer(**dict(CFG, sharing=sharing, projection=projection))
  inputs, lengths = _padded_inputs(10)
  variables = np_init(model, *inputs[2])
  outs = [model.apply(variables, x, mask=m) for x, m in inputs]
  _assert_real_tokens_equal(outs, lengths)
  # control: without the mask, the padded content does leak into real tokens
  (xa, _), (xb, _) = inputs[:2]
  a, b = np.asarray(model.apply(variables, xa)), np.asarray(model.apply(variables, xb))
  assert np.abs(a[1, :4] - b[1, :4]).max() > 1e-4


def test_mask_invariance_with_k_reduce_and_bias():
  model = Linformer(**dict(CFG, sharing="none", projection_bias=True, k_reduce_by_layer=2, norm="post"))
  inputs, lengths = _padded_inputs(20)
  variables = np_init(model, *inputs[2])
  _assert_real_tokens_equal([model.apply(variables, x, mask=m) for x, m in inputs], lengths)


# ----------------------------------------------------------------------------------------------------------
# 7. k per layer
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_k_reduce_by_layer_kernel_shapes(sharing):
  k, r, depth, max_len = 5, 2, 4, 12
  model = Linformer(**dict(CFG, depth=depth, k=k, k_reduce_by_layer=r, sharing=sharing))
  expected = [max(1, k - i * r) for i in range(depth)]
  assert expected == [5, 3, 1, 1]
  assert model.k_per_layer() == expected
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, max_len, 8)))["params"]
  for i, k_i in enumerate(expected):
    attn = shapes[f"layer_{i}"]["attention"]
    names = ("EF",) if sharing == "kv" else ("E", "F")
    assert set(names) <= set(attn) and not ({"E", "F", "EF"} - set(names)) & set(attn)
    for name in names:
      lead = (2,) if sharing == "none" else ()
      assert attn[name]["kernel"].shape == lead + (max_len, k_i)


@pytest.mark.parametrize("projection", ["conv", "mean_pool"])
def test_k_reduce_by_layer_conv_and_pool(projection):
  k, r, depth, max_len = 5, 2, 3, 12
  model = Linformer(**dict(CFG, depth=depth, k=k, k_reduce_by_layer=r, sharing="headwise",
                           projection=projection))
  x = jnp.zeros((2, max_len, 8))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # shapes only: nothing is compiled
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables, x)
  for i, k_i in enumerate([5, 3, 1]):
    s_i = math.ceil(max_len / k_i)
    if projection == "conv":
      assert variables["params"][f"layer_{i}"]["attention"]["E"]["conv_kernel"].shape == (s_i, 4, 4)
    for name in ("E", "F"):
      (k_bar,) = state["intermediates"][f"layer_{i}"]["attention"][name]["__call__"]
      assert k_bar.shape == (2, k_i, 2, 4)


def test_layerwise_with_k_reduce_raises():
  with pytest.raises(ValueError, match="k_reduce_by_layer"):
    Linformer(**dict(CFG, sharing="layerwise", k_reduce_by_layer=1))


def test_layerwise_shares_one_matrix():
  model = Linformer(**dict(CFG, depth=3, sharing="layerwise"))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 8)))["params"]
  assert shapes["EF"]["kernel"].shape == (12, 5)
  for i in range(3):
    assert not {"E", "F", "EF"} & set(shapes[f"layer_{i}"]["attention"])


# ----------------------------------------------------------------------------------------------------------
# 9. causal
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["conv", "mean_pool", "max_pool"])
def test_causal_linformer_without_position_matrix_raises_with_explanation(projection):
  with pytest.raises(ValueError) as info:
    Linformer(**dict(CFG, causal=True, projection=projection))
  msg = str(info.value)
  assert msg == f"projection={projection!r}: {CAUSAL_ERROR}"
  assert "causal" in msg and "'learnable'" in msg and "'fixed'" in msg and "attention='full'" in msg


def test_causal_full_attention():
  cfg = dict(CFG, attention="full", causal=True)
  model = Linformer(**cfg)
  x = rand(40, (2, 9, 8))
  variables = np_init(model, x)
  out = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(out, np_encoder(x, variables["params"], **cfg), atol=ATOL)
  for j in (0, 3, 8):
    out_j = np.asarray(model.apply(variables, x.at[:, j].add(rand(j, (2, 8)))))
    np.testing.assert_allclose(out_j[:, :j], out[:, :j], atol=ATOL)
    assert np.abs(out_j[:, j] - out[:, j]).max() > 1e-3
  # non-causal full attention: position 0 does see position 8
  nc = Linformer(**dict(CFG, attention="full"))
  assert np.abs(np.asarray(nc.apply(variables, x.at[:, 8].add(rand(8, (2, 8)))))[:, 0]
                - np.asarray(nc.apply(variables, x))[:, 0]).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# 11. dropout
# ----------------------------------------------------------------------------------------------------------
def test_encoder_dropout():
  model = Linformer(**dict(CFG, dropout=0.3, attention_dropout=0.2))
  plain = Linformer(**CFG)
  x = rand(50, (2, 12, 8))
  variables = np_init(model, x)
  ref = np.asarray(plain.apply(variables, x))
  np.testing.assert_allclose(model.apply(variables, x, deterministic=True), ref, atol=1e-6)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, deterministic=False)
  train = fast_jit(lambda v, x, r: model.apply(v, x, deterministic=False, rngs={"dropout": r}))
  a = np.asarray(train(variables, x, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(a, train(variables, x, jax.random.PRNGKey(0)))
  assert np.abs(a - ref).max() > 1e-2
  assert np.abs(a - np.asarray(train(variables, x, jax.random.PRNGKey(1)))).max() > 1e-2
  # rate 0 in train mode is the identity
  rate0 = plain.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  np.testing.assert_allclose(rate0, ref, atol=1e-6)


def test_head_dim_allows_indivisible_dim():
  model = Linformer(**dict(CFG, dim=9, num_heads=2, head_dim=3, depth=1))
  x = rand(60, (2, 12, 9))
  variables = np_init(model, x)
  assert variables["params"]["layer_0"]["attention"]["query"]["kernel"].shape == (9, 2, 3)
  cfg = dict(CFG, dim=9, head_dim=3, depth=1)
  np.testing.assert_allclose(model.apply(variables, x), np_encoder(x, variables["params"], **cfg), atol=ATOL)
