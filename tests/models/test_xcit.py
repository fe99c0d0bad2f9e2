"""XCiT (linformer_jax.models.xcit) against float64 numpy re-implementations written here from the paper and
the official code / timm description (reference doc section 1): XCA, Fourier position encoding, conv stem,
LPI, XCA block, class-attention block (timm's real update rule, patch tokens doubled), and a whole tiny model.
Also: published parameter counts of all 14 variants (eval_shape), BatchNorm bookkeeping (momentum, train/eval,
cross-replica statistics under pmap on the 8 fake CPU devices), drop path, attention maps via sow, the timm-style
head API and the ablation switches.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze

from linformer_jax.layers.drop_path import DropPath
from linformer_jax.models import create_model, get_classifier, reset_classifier
from linformer_jax.models.xcit import (LPI, XCA, ClassAttentionBlock, ConvPatchEmbed,
                                       FourierPositionalEncoding, XCABlock, XCiT, fourier_features)
from helpers import assert_only_head_replaced

B, H_IMG, W_IMG, C, HEADS, CLASSES = 2, 32, 48, 32, 4, 5
TINY = dict(embed_dim=C, depth=2, num_heads=HEADS, num_classes=CLASSES, patch_size=16)


# ----------------------------------------------------------------------------------------------------------
# helpers: random parameters and float64 numpy building blocks
# ----------------------------------------------------------------------------------------------------------
def randomize(tree, seed, std=0.2):
  """Replace every leaf by random values: LN/BN 'scale' ~ 1 + N(0, std), BN 'var' ~ U(0.5, 1.5), else N(0, std)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(unfreeze(tree))
  out = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if path[-1] == "scale":
      val = 1.0 + std * rng.standard_normal(shape)
    elif path[-1] == "var":
      val = rng.uniform(0.5, 1.5, shape)
    else:
      val = std * rng.standard_normal(shape)
    out[path] = np.asarray(val, np.float32)
  return flax.traverse_util.unflatten_dict(out)


def rand_vars(module, *args, seed, std=0.2, **kwargs):
  """Random variables for ``module`` without running ``init`` (on CPU, init compiles one XLA program per
  parameter shape: ~100 ms each, tens of seconds for a model); shapes come from jax.eval_shape."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return randomize(shapes, seed, std)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), unfreeze(tree))


_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + p.get("bias", 0.0)


def np_mlp(x, p):
  return np_dense(np_gelu(np_dense(x, p["wi"])), p["wo"])


def np_bn_eval(x, p, s, eps=1e-5):
  return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def np_conv(x, w, stride=1, pad=(1, 1), depthwise=False, bias=None):
  """x (B, H, W, Cin); w HWIO; zero padding pad=(before, after) on both spatial axes (PyTorch-style (1, 1))."""
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      out += patch * w[i, j, 0] if depthwise else patch @ w[i, j]
  return out if bias is None else out + bias


def np_stem(img, p, s, stages):
  x = img
  for i in range(stages):
    x = np_bn_eval(np_conv(x, p[f"conv_{i}"]["kernel"], stride=2), p[f"bn_{i}"], s[f"bn_{i}"])
    if i < stages - 1:
      x = np_gelu(x)
  return x


def np_fourier(hp, wp, hidden=32, temperature=10000.0):
  """Per channel c: frequency 10000^(2⌊c/2⌋/32), sin for even c, cos for odd c; y channels first, then x."""
  feats = np.zeros((hp, wp, 2 * hidden))
  for r in range(hp):
    for col in range(wp):
      py = (r + 1) / (hp + 1e-6) * 2 * math.pi
      px = (col + 1) / (wp + 1e-6) * 2 * math.pi
      for c in range(hidden):
        freq = temperature ** (2 * (c // 2) / hidden)
        trig = math.sin if c % 2 == 0 else math.cos
        feats[r, col, c] = trig(py / freq)
        feats[r, col, hidden + c] = trig(px / freq)
  return feats.reshape(hp * wp, 2 * hidden)


def np_xca(x, p, heads, normalize=True, temperature=None, return_maps=False):
  b, n, c = x.shape
  dh = c // heads
  qkv = np_dense(x, p["qkv"])
  q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
  temp = np.ones(heads) if temperature is None else temperature
  out = np.zeros((b, n, c))
  maps = np.zeros((b, heads, dh, dh))
  for h in range(heads):
    sl = slice(h * dh, (h + 1) * dh)
    qh, kh, vh = (t[..., sl].transpose(0, 2, 1) for t in (q, k, v))  # (b, d_h, N)
    if normalize:
      qh = qh / np.maximum(np.linalg.norm(qh, axis=-1, keepdims=True), 1e-12)
      kh = kh / np.maximum(np.linalg.norm(kh, axis=-1, keepdims=True), 1e-12)
    a = np_softmax(qh @ kh.transpose(0, 2, 1) * temp[h])  # (b, d_h, d_h), rows = query channel i
    maps[:, h] = a
    out[..., sl] = (a @ vh).transpose(0, 2, 1)  # out_i = Σ_j A_ij v_j
  out = np_dense(out, p["proj"])
  return (out, maps) if return_maps else out


def np_lpi(x, grid, p, s):
  b, n, c = x.shape
  y = np_conv(x.reshape(b, *grid, c), p["conv1"]["kernel"], depthwise=True, bias=p["conv1"]["bias"])
  y = np_bn_eval(np_gelu(y), p["bn"], s["bn"])
  y = np_conv(y, p["conv2"]["kernel"], depthwise=True, bias=p["conv2"]["bias"])
  return y.reshape(b, n, c)


def np_xca_block(x, grid, p, s, heads):
  x = x + p["gamma1"] * np_xca(np_ln(x, p["norm1"]), p["attn"], heads, temperature=p["attn"]["temperature"])
  x = x + p["gamma3"] * np_lpi(np_ln(x, p["norm3"]), grid, p["local_mp"], s["local_mp"])
  return x + p["gamma2"] * np_mlp(np_ln(x, p["norm2"]), p["mlp"])


def np_class_attention(xn, p, heads):
  """CLS query (from xn[:, :1]) over all tokens of xn; DenseGeneral kernels (C, h, d) and out (h, d, C)."""
  q = np.einsum("btc,chd->bthd", xn[:, :1], p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btc,chd->bthd", xn, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btc,chd->bthd", xn, p["value"]["kernel"]) + p["value"]["bias"]
  d = q.shape[-1]
  a = np_softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d))
  o = np.einsum("bhqk,bkhd->bqhd", a, v)
  return np.einsum("bqhd,hdc->bqc", o, p["out"]["kernel"]) + p["out"]["bias"]


def np_ca_block(x, p, heads, tokens_norm):
  """timm ClassAttentionBlock.forward, line by line."""
  xn = np_ln(x, p["norm1"])
  x_attn = np.concatenate([np_class_attention(xn, p["attn"], heads), xn[:, 1:]], axis=1)
  x = x + p["gamma1"] * x_attn
  if tokens_norm:
    x = np_ln(x, p["norm2"])
  else:
    x = np.concatenate([np_ln(x[:, :1], p["norm2"]), x[:, 1:]], axis=1)
  x_res = x
  cls = p["gamma2"] * np_mlp(x[:, :1], p["mlp"])
  return x_res + np.concatenate([cls, x[:, 1:]], axis=1)


def np_xcit_features(img, p, s, depth, heads, stages, tokens_norm, cls_layers=2):
  x = np_stem(img, p["patch_embed"], s["patch_embed"], stages)
  b, hp, wp, c = x.shape
  x = x.reshape(b, hp * wp, c) + np_dense(np_fourier(hp, wp), p["pos_embed"]["token_projection"])
  for i in range(depth):
    x = np_xca_block(x, (hp, wp), p[f"blocks_{i}"], s[f"blocks_{i}"], heads)
  x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, c)), x], axis=1)
  for j in range(cls_layers):
    x = np_ca_block(x, p[f"cls_attn_blocks_{j}"], heads, tokens_norm)
  return np_ln(x, p["norm"])


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1), (B, H_IMG, W_IMG, 3))


@pytest.fixture(scope="module")
def tiny():
  """Tiny XCiT with fully random parameters and running statistics."""
  model = XCiT(**TINY)
  return model, rand_vars(model, jnp.zeros((1, H_IMG, W_IMG, 3)), seed=10)


# ----------------------------------------------------------------------------------------------------------
# components vs numpy
# ----------------------------------------------------------------------------------------------------------
# component inputs share the tiny model's shapes (batch 2, C=32, 4 heads, 2×3 grid), so that eager JAX reuses the
# per-operation executables compiled once per shape (~0.1 s each on a small CPU)
GRID = (2, 3)
N_TOK = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def tokens():
  return jax.random.normal(jax.random.key(2), (B, N_TOK, C))


@pytest.mark.parametrize("normalize_qk", [True, False])
def test_xca_matches_numpy(tokens, normalize_qk):
  mod = XCA(num_heads=HEADS, normalize_qk=normalize_qk)
  params = rand_vars(mod, tokens, seed=3, std=0.3)["params"]
  temperature = np.array([0.5, 1.7, 3.0, 0.8], np.float32)
  params["temperature"] = jnp.asarray(temperature)
  got, state = mod.apply({"params": params}, tokens, mutable=["intermediates"])
  x = np.asarray(tokens, np.float64)
  want, want_maps = np_xca(x, f64(params), HEADS, normalize=normalize_qk, temperature=temperature,
                           return_maps=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  (maps,) = state["intermediates"]["attention_weights"]
  assert maps.shape == (B, HEADS, C // HEADS, C // HEADS)
  np.testing.assert_allclose(maps, want_maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mod.apply({"params": params}, tokens), got, rtol=1e-6, atol=1e-6)
  # the temperature matters (guards against it being ignored)
  assert np.abs(want - np_xca(x, f64(params), HEADS, normalize=normalize_qk)).max() > 1e-3


@pytest.mark.parametrize("n", [1, 3, 500])
def test_xca_map_size_independent_of_token_count(n):
  mod = XCA(num_heads=2)
  x = jax.ShapeDtypeStruct((1, n, 8), jnp.float32)
  out, state = jax.eval_shape(lambda x: mod.init_with_output(jax.random.key(0), x, mutable=True), x)
  assert out.shape == (1, n, 8)
  assert state["intermediates"]["attention_weights"][0].shape == (1, 2, 4, 4)


def test_xca_without_learnable_temperature_has_no_param_and_equals_tau_one(tokens):
  mod = XCA(num_heads=HEADS, learnable_temperature=False)
  params = rand_vars(mod, tokens, seed=4, std=0.3)["params"]
  assert "temperature" not in params
  want = np_xca(np.asarray(tokens, np.float64), f64(params), HEADS)
  np.testing.assert_allclose(mod.apply({"params": params}, tokens), want, rtol=1e-5, atol=1e-5)


def test_fourier_features_match_numpy_non_square():
  hp, wp = 3, 5
  got = fourier_features(hp, wp)
  want = np_fourier(hp, wp)
  assert got.shape == (15, 64)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # y first: the first 32 channels are constant along a row, the last 32 along a column
  g = got.reshape(hp, wp, 64)
  np.testing.assert_array_equal(g[:, :1, :32].repeat(wp, 1), g[:, :, :32])
  np.testing.assert_array_equal(g[:1, :, 32:].repeat(hp, 0), g[:, :, 32:])
  assert not np.allclose(fourier_features(wp, hp), got)  # not symmetric in (Hp, Wp)


def test_fourier_positional_encoding_projection():
  mod = FourierPositionalEncoding(dim=C)
  params = rand_vars(mod, GRID, seed=5)["params"]
  got = mod.apply({"params": params}, GRID)
  assert got.shape == (N_TOK, C)
  np.testing.assert_allclose(got, np_dense(np_fourier(*GRID), f64(params)["token_projection"]), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("patch,grid", [(16, (2, 3)), (8, (4, 6))])
def test_conv_patch_embed_shapes_and_numpy(patch, grid):
  img = jax.random.normal(jax.random.key(3), (B, H_IMG, W_IMG, 3))
  mod = ConvPatchEmbed(patch_size=patch, embed_dim=C)
  v = rand_vars(mod, img, seed=6)
  stages = {16: 4, 8: 3}[patch]
  assert set(v["params"]) == {f"conv_{i}" for i in range(stages)} | {f"bn_{i}" for i in range(stages)}
  widths = [v["params"][f"conv_{i}"]["kernel"].shape[-1] for i in range(stages)]
  assert widths == [C // 2 ** (stages - 1 - i) for i in range(stages)]
  assert all("bias" not in v["params"][f"conv_{i}"] for i in range(stages))
  p, s = v["params"], v["batch_stats"]
  got = mod.apply(v, img)
  assert got.shape == (B, *grid, C)
  want = np_stem(np.asarray(img, np.float64), f64(p), f64(s), stages)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stem_conv_uses_symmetric_padding_not_same():
  img = jax.random.normal(jax.random.key(4), (B, H_IMG, W_IMG, 3))
  mod = ConvPatchEmbed(patch_size=16, embed_dim=C)
  v = rand_vars(mod, img, seed=7)
  _, st = mod.apply(v, img, capture_intermediates=True, mutable=["intermediates"])
  conv0 = st["intermediates"]["conv_0"]["__call__"][0]
  w = np.asarray(v["params"]["conv_0"]["kernel"], np.float64)
  x = np.asarray(img, np.float64)
  np.testing.assert_allclose(conv0, np_conv(x, w, 2, (1, 1)), atol=1e-5)
  lax_ref = jax.lax.conv_general_dilated(img, v["params"]["conv_0"]["kernel"], (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv0, lax_ref, atol=1e-5)
  assert np.abs(np.asarray(conv0) - np_conv(x, w, 2, (0, 1))).max() > 1e-2  # 'SAME' would pad (0, 1)


@pytest.mark.parametrize("h,w", [(50, 70), (33, 17)])
def test_stem_stage_sizes(h, w):
  img = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  mod = ConvPatchEmbed(patch_size=16, embed_dim=C)
  _, st = jax.eval_shape(lambda x: mod.init_with_output(jax.random.key(0), x, capture_intermediates=True), img)
  hh, ww = h, w
  for i in range(4):
    hh, ww = (hh - 1) // 2 + 1, (ww - 1) // 2 + 1
    assert st["intermediates"][f"conv_{i}"]["__call__"][0].shape[1:3] == (hh, ww)


def test_lpi_non_square_matches_numpy(tokens):
  grid, x = GRID, tokens
  mod = LPI()
  v = rand_vars(mod, x, grid, seed=8)
  assert v["params"]["conv1"]["kernel"].shape == (3, 3, 1, C)  # depthwise
  p, s = v["params"], v["batch_stats"]
  got = mod.apply({"params": p, "batch_stats": s}, x, grid)
  assert got.shape == (B, N_TOK, C)
  np.testing.assert_allclose(got, np_lpi(np.asarray(x, np.float64), grid, f64(p), f64(s)), rtol=1e-5,
                             atol=1e-5)
  # row-major grid: reading the same tokens as a 3×2 grid gives a different result
  assert not np.allclose(got, mod.apply({"params": p, "batch_stats": s}, x, (3, 2)), atol=1e-3)


def test_xca_block_matches_numpy(tokens):
  grid, x = GRID, tokens
  mod = XCABlock(num_heads=HEADS, eta=0.5)
  v = rand_vars(mod, x, grid, seed=12)
  p, s = v["params"], v["batch_stats"]
  got = mod.apply({"params": p, "batch_stats": s}, x, grid)
  want = np_xca_block(np.asarray(x, np.float64), grid, f64(p), f64(s), HEADS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens_norm", [False, True])
def test_class_attention_block_matches_numpy(tokens_norm):
  x = jax.random.normal(jax.random.key(7), (B, 1 + N_TOK, C))
  mod = ClassAttentionBlock(num_heads=HEADS, tokens_norm=tokens_norm)
  p = rand_vars(mod, x, seed=14, std=0.3)["params"]
  got = mod.apply({"params": p}, x)
  want = np_ca_block(np.asarray(x, np.float64), f64(p), HEADS, tokens_norm)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # patch tokens follow the real rule: (x + γ1·LN1(x)) [normed if tokens_norm], then doubled by the MLP residual
  xp = np.asarray(x, np.float64)
  pp = f64(p)
  patches = xp[:, 1:] + pp["gamma1"] * np_ln(xp, pp["norm1"])[:, 1:]
  if tokens_norm:
    patches = np_ln(patches, pp["norm2"])
  np.testing.assert_allclose(got[:, 1:], 2 * patches, rtol=1e-4, atol=1e-4)


def test_whole_tiny_xcit_matches_numpy(tiny, images):
  model, variables = tiny
  p, s = f64(variables["params"]), f64(variables["batch_stats"])
  feats = model.apply(variables, images, method=XCiT.forward_features)
  want = np_xcit_features(np.asarray(images, np.float64), p, s, depth=2, heads=HEADS, stages=4,
                          tokens_norm=False)
  assert feats.shape == (B, 1 + 6, C)
  np.testing.assert_allclose(feats, want, rtol=2e-4, atol=2e-4)
  logits = model.apply(variables, images)
  np.testing.assert_allclose(logits, np_dense(want[:, 0], p["head"]), rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------------------
# published variants
# ----------------------------------------------------------------------------------------------------------
PUBLISHED = {
    16: dict(nano_12=3_053_224, tiny_12=6_716_272, tiny_24=12_116_896, small_12=26_253_304,
             small_24=47_671_384, medium_24=84_395_752, large_24=189_096_136),
    8: dict(nano_12=3_049_016, tiny_12=6_706_504, tiny_24=12_107_128, small_12=26_213_032,
            small_24=47_631_112, medium_24=84_323_624, large_24=188_932_648),
}


@pytest.mark.parametrize("name,count", [(f"xcit_{v}_p{p}_224", n) for p, d in PUBLISHED.items()
                                        for v, n in d.items()])
def test_published_parameter_counts(name, count):
  model = create_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert n_params(shapes["params"]) == count
  n_bn = 4 if "_p16_" in name else 3
  assert len(jax.tree.leaves(shapes["batch_stats"])) == 2 * (n_bn + model.depth)  # stem BNs + one per LPI
  assert model.eta == (1.0 if model.depth == 12 else 1e-5)
  assert model.tokens_norm == ("nano" not in name)


# ----------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------
def test_non_square_and_other_sizes(tiny, images):
  model, variables = tiny
  out = model.apply(variables, images)  # 32×48 → 2×3 grid
  assert out.shape == (B, CLASSES) and np.isfinite(np.asarray(out)).all()
  # one set of parameters at several sizes (a 1-block model keeps the compile short)
  small = XCiT(**{**TINY, "depth": 1, "cls_attn_layers": 1})
  v = rand_vars(small, images, seed=40)
  feats = jax.jit(lambda v, x: small.apply(v, x, method=XCiT.forward_features))
  f = feats(v, jax.random.normal(jax.random.key(3), (1, 16, 80, 3)))
  assert f.shape == (1, 1 + 1 * 5, C) and np.isfinite(np.asarray(f)).all()
  # shape contract of published models at sizes other than their name's (traced only)
  for name, (h, w) in [("xcit_nano_12_p16_224", (384, 160)), ("xcit_nano_12_p8_384", (224, 96))]:
    m = create_model(name, depth=1, num_classes=7)
    spec = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), spec)
    feats = jax.eval_shape(lambda v, x: m.apply(v, x, method=XCiT.forward_features), v, spec)
    p = m.patch_size
    assert feats.shape == (2, 1 + (h // p) * (w // p), 128)
    assert jax.eval_shape(m.apply, v, spec).shape == (2, 7)


def test_bad_inputs_raise(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match="patch_size"):
    model.apply(variables, jnp.zeros((1, 40, 48, 3)))
  with pytest.raises(ValueError, match="patch_size"):
    model.apply(variables, jnp.zeros((1, 32, 50, 3)))
  with pytest.raises(ValueError, match="3"):
    model.apply(variables, jnp.zeros((1, 32, 48, 1)))
  with pytest.raises(ValueError):
    model.apply(variables, jnp.zeros((32, 48, 3)))
  with pytest.raises(ValueError):
    XCiT(**{**TINY, "patch_size": 4})
  with pytest.raises(ValueError):
    XCiT(**{**TINY, "num_heads": 5})


# ----------------------------------------------------------------------------------------------------------
# BatchNorm, dropout, drop path
# ----------------------------------------------------------------------------------------------------------
def test_train_mode_updates_batch_stats_with_momentum_0_9(tiny, images):
  model, variables = tiny
  _, upd = model.apply(variables, images, train=True, mutable=["batch_stats"])
  old = variables["batch_stats"]["patch_embed"]["bn_0"]
  new = upd["batch_stats"]["patch_embed"]["bn_0"]
  conv0 = np_conv(np.asarray(images, np.float64),
                  np.asarray(variables["params"]["patch_embed"]["conv_0"]["kernel"], np.float64), 2, (1, 1))
  bmean = conv0.mean(axis=(0, 1, 2))
  bvar = conv0.var(axis=(0, 1, 2))  # biased, as Flax
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * bmean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * bvar, rtol=1e-4, atol=1e-5)
  # every BatchNorm (4 stem + 1 LPI per block) moved
  for a, b in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(upd["batch_stats"])):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6


def test_eval_mode_leaves_batch_stats_unchanged(tiny, images):
  model, variables = tiny
  out, upd = model.apply(variables, images, train=False, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(upd["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out, model.apply(variables, images))


def test_train_mode_uses_batch_statistics(tiny, images):
  model, variables = tiny
  out_train, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(out_train) - np.asarray(model.apply(variables, images))).max() > 1e-3


@pytest.mark.parametrize("field", ["drop_path_rate", "attn_drop_rate", "drop_rate"])
def test_stochastic_regularisers_need_rng_and_change_train_outputs(tiny, images, field):
  base, variables = tiny
  model = base.clone(**{field: 0.5})
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, images, train=True, mutable=["batch_stats"])
  # evaluation ignores the rates entirely
  np.testing.assert_array_equal(model.apply(variables, images), base.apply(variables, images))
  if field != "drop_path_rate":  # (dropout's many mask shapes cost seconds of compiling; same rng mechanism)
    return
  ref, _ = base.apply(variables, images, train=True, mutable=["batch_stats"])
  outs = [model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(s)})[0]
          for s in (0, 1)]
  assert np.abs(np.asarray(outs[0]) - np.asarray(ref)).max() > 1e-4
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-4


def test_drop_path_zeroes_whole_samples_and_rescales():
  rate = 0.25
  x = jax.random.normal(jax.random.key(0), (4000, 3, 5)) + 3.0  # no exact zeros
  y = np.asarray(DropPath(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
  xs = np.asarray(x)
  dropped = np.all(y == 0, axis=(1, 2))
  kept = ~dropped
  np.testing.assert_allclose(y[kept], xs[kept] / (1 - rate), rtol=1e-6)
  assert not np.any(y[kept] == 0)  # per-sample, never per-element
  frac = dropped.mean()
  assert abs(frac - rate) < 4 * math.sqrt(rate * (1 - rate) / len(xs))
  np.testing.assert_array_equal(DropPath(rate).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(DropPath(0.0).apply({}, x, deterministic=False), x)  # no rng needed


def test_drop_path_rate_constant_over_xca_blocks():
  model = create_model("xcit_nano_12_p16_224", drop_path_rate=0.1)
  bound = model.bind(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)))
  assert [blk.drop_path_rate for blk in bound.blocks] == [0.1] * 12  # official dpr = [rate] * depth, not linear


def test_cross_replica_batch_norm_equals_global_batch():
  n_dev = 8
  assert jax.device_count() >= n_dev
  model = XCiT(**{**TINY, "depth": 1, "cls_attn_layers": 1}, bn_axis_name="batch")  # stem BNs + one LPI BN
  x = jax.random.normal(jax.random.key(2), (2 * n_dev, H_IMG, W_IMG, 3))
  v = rand_vars(model, x[:1], seed=20)

  step = lambda v, xs: model.apply(v, xs, train=True, mutable=["batch_stats"])
  out, upd = jax.pmap(step, axis_name="batch", in_axes=(None, 0),
                      devices=jax.devices()[:n_dev])(v, x.reshape(n_dev, 2, H_IMG, W_IMG, 3))
  local = model.clone(bn_axis_name=None)
  want_out, want_upd = jax.jit(lambda v, x: local.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  np.testing.assert_allclose(np.asarray(out).reshape(2 * n_dev, CLASSES), want_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(want_upd["batch_stats"])):
    got = np.asarray(got)
    np.testing.assert_array_equal(got, np.broadcast_to(got[:1], got.shape))  # same on every replica
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
  # the global statistics are not those of any one replica's 2 images
  conv0 = np_conv(np.asarray(x[:2], np.float64),
                  np.asarray(v["params"]["patch_embed"]["conv_0"]["kernel"], np.float64), 2, (1, 1))
  shard0 = 0.9 * np.asarray(v["batch_stats"]["patch_embed"]["bn_0"]["mean"]) + 0.1 * conv0.mean((0, 1, 2))
  assert np.abs(np.asarray(upd["batch_stats"]["patch_embed"]["bn_0"]["mean"][0]) - shard0).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# attention maps, head API, ablation switches
# ----------------------------------------------------------------------------------------------------------
def test_attention_maps_sown(tiny, images):
  model, variables = tiny
  out, state = model.apply(variables, images, mutable=["intermediates"])
  inter = state["intermediates"]
  np.testing.assert_allclose(out, model.apply(variables, images), rtol=1e-5, atol=1e-5)
  n = (H_IMG // 16) * (W_IMG // 16)
  dh = C // HEADS
  for i in range(2):
    (a,) = inter[f"blocks_{i}"]["attn"]["attention_weights"]
    assert a.shape == (B, HEADS, dh, dh)
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)
    assert (np.asarray(a) >= 0).all()
  for j in range(2):
    (a,) = inter[f"cls_attn_blocks_{j}"]["attn"]["attention_weights"]
    assert a.shape == (B, HEADS, 1, 1 + n)
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)
  # the first XCA map equals the numpy map computed from the stem + position encoding output
  p, s = f64(variables["params"]), f64(variables["batch_stats"])
  x0 = np_stem(np.asarray(images, np.float64), p["patch_embed"], s["patch_embed"], 4).reshape(B, n, C)
  x0 = np_ln(x0 + np_dense(np_fourier(2, 3), p["pos_embed"]["token_projection"]), p["blocks_0"]["norm1"])
  qkv = np_dense(x0, p["blocks_0"]["attn"]["qkv"])
  q = qkv[..., :C].reshape(B, n, HEADS, dh)
  k = qkv[..., C:2 * C].reshape(B, n, HEADS, dh)
  q, k = q / np.linalg.norm(q, axis=1, keepdims=True), k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = np.einsum("bnhi,bnhj->bhij", q, k) * p["blocks_0"]["attn"]["temperature"][:, None, None]
  np.testing.assert_allclose(inter["blocks_0"]["attn"]["attention_weights"][0], np_softmax(logits),
                             rtol=1e-4, atol=1e-4)


def test_forward_features_and_head(tiny, images):
  model, variables = tiny
  feats = model.apply(variables, images, method=XCiT.forward_features)
  assert feats.shape == (B, 7, C)
  logits = model.apply(variables, feats, method=XCiT.forward_head)
  np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-6, atol=1e-6)
  head = f64(model.get_classifier(variables))
  np.testing.assert_allclose(logits, np.asarray(feats[:, 0], np.float64) @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-5)
  pre = model.apply(variables, feats, True, method=XCiT.forward_head)
  np.testing.assert_allclose(pre, feats[:, 0])
  avg = model.clone(global_pool="avg")
  np.testing.assert_allclose(avg.apply(variables, images),
                             np.asarray(feats[:, 1:], np.float64).mean(1) @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-5)


def test_reset_classifier_transfer(tiny, images):
  model, variables = tiny
  assert model.get_classifier(variables)["kernel"].shape == (C, CLASSES)
  new_model, transfer = reset_classifier(model, 3)
  assert new_model.num_classes == 3 and model.num_classes == CLASSES
  new_vars = transfer(variables, jax.random.key(5))
  assert_only_head_replaced(variables, new_vars, (C, 3))
  for a, b in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(new_vars["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  out = new_model.apply(new_vars, images)
  assert out.shape == (B, 3) and np.isfinite(np.asarray(out)).all()
  # the transferred tree is exactly what the new model expects
  want = jax.eval_shape(new_model.init, jax.random.key(0), images)
  assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(lambda a: a.shape, unfreeze(new_vars))
  # num_classes=0: no head, forward returns pooled features
  bare, transfer0 = reset_classifier(model, 0)
  bare_vars = transfer0(variables, jax.random.key(0))
  assert "head" not in bare_vars["params"]
  with pytest.raises(ValueError):
    bare.get_classifier(bare_vars)
  with pytest.raises(ValueError):
    get_classifier(bare_vars)  # the module-level, variables-only form
  np.testing.assert_allclose(bare.apply(bare_vars, images),
                             model.apply(variables, images, method=XCiT.forward_features)[:, 0], atol=1e-6)


def _tree_keys(params):
  return {"/".join(k) for k in flax.traverse_util.flatten_dict(unfreeze(params))}


def test_ablation_switches(tiny, images):
  base, _ = tiny
  shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), images)
  ref = _tree_keys(shapes(base)["params"])
  assert "blocks_0/attn/temperature" in ref and "blocks_0/local_mp/conv1/kernel" in ref

  sa = _tree_keys(shapes(base.clone(attention="self"))["params"])
  assert "blocks_0/attn/qkv/kernel" not in sa and "blocks_0/attn/query/kernel" in sa
  assert not any("temperature" in k for k in sa)

  no_lpi_model = base.clone(use_lpi=False)
  no_lpi = shapes(no_lpi_model)
  keys = _tree_keys(no_lpi["params"])
  assert not any("local_mp" in k or "gamma3" in k or "norm3" in k for k in keys)
  assert set(no_lpi["batch_stats"]) == {"patch_embed"}

  no_temp = _tree_keys(shapes(base.clone(learnable_temperature=False))["params"])
  assert no_temp == {k for k in ref if "temperature" not in k}
  assert _tree_keys(shapes(base.clone(normalize_qk=False))["params"]) == ref
  no_pos = _tree_keys(shapes(base.clone(use_pos_embed=False))["params"])
  assert no_pos == {k for k in ref if not k.startswith("pos_embed")}

  # every variant runs, and changes the function computed from the shared parameters
  v = rand_vars(base, images, seed=30)
  y = np.asarray(base.apply(v, images))
  y_nq = np.asarray(base.clone(normalize_qk=False).apply(v, images))
  assert np.isfinite(y_nq).all() and np.abs(y_nq - y).max() > 1e-4
  for m in (base.clone(attention="self"), no_lpi_model, base.clone(learnable_temperature=False),
            base.clone(use_pos_embed=False)):
    vm = rand_vars(m, images, seed=31)
    out = m.apply(vm, images)
    assert out.shape == (B, CLASSES) and np.isfinite(np.asarray(out)).all()
