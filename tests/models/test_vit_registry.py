"""Model registry (timm names) and the ViT/DeiT baseline: every registered name builds with the configuration its
name and the papers imply, error messages, timm's ViT parameter counts (eval_shape), and ViT numerics against a
float64 numpy pre-LN transformer (a block alone, and a whole model at a resolution other than img_size, which
bilinearly resizes the position table)."""
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze

from linformer_jax.models import VisionTransformer, XCiT, create_model, list_models
from linformer_jax.models.vit import ViTBlock

# published configurations (XCiT paper Table 1; ViT/DeiT papers): width, heads
XCIT_CFG = {"nano": (128, 4), "tiny": (192, 4), "small": (384, 8), "medium": (512, 8), "large": (768, 16)}
XCIT_DEPTHS = {"nano": (12,), "tiny": (12, 24), "small": (12, 24), "medium": (24,), "large": (24,)}
VIT_CFG = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}

XCIT_NAMES = {f"xcit_{v}_{d}_p{p}_{r}" for v, ds in XCIT_DEPTHS.items() for d in ds for p in (16, 8)
              for r in (224, 384)}
VIT_NAMES = ({f"vit_{s}_patch16_{r}" for s in VIT_CFG for r in (224, 384)}
             | {f"deit_{s}_patch16_224" for s in VIT_CFG})


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def param_shapes(model, hw=(32, 32)):
  return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
def test_registered_names():
  names = list_models()
  assert names == sorted(names) and len(names) == len(set(names))
  assert len(XCIT_NAMES) == 28
  assert set(list_models("xcit_*")) == XCIT_NAMES
  assert set(names) == XCIT_NAMES | VIT_NAMES | {"linformer_lm", "linformer_classifier", "linformer_encdec",
                                                 "linformer_base", "linformer_large", "linformer_base_classifier",
                                                 "linformer_large_classifier"}
  assert set(list_models("xcit_*_p8_*")) == {n for n in XCIT_NAMES if "_p8_" in n}
  assert list_models("nothing_*") == []


@pytest.mark.parametrize("name", sorted(XCIT_NAMES | VIT_NAMES))
def test_create_every_name(name):
  model = create_model(name)
  if name.startswith("xcit"):
    variant, depth, patch, res = re.fullmatch(r"xcit_(\w+?)_(\d+)_p(\d+)_(\d+)", name).groups()
    width, heads = XCIT_CFG[variant]
    assert isinstance(model, XCiT)
    assert (model.embed_dim, model.num_heads, model.depth) == (width, heads, int(depth))
    assert (model.patch_size, model.img_size, model.num_classes) == (int(patch), int(res), 1000)
    assert model.eta == (1.0 if depth == "12" else 1e-5)
    assert model.tokens_norm == (variant != "nano")
    assert model.cls_attn_layers == 2 and model.mlp_ratio == 4
  else:
    size, res = re.fullmatch(r"(?:vit|deit)_(\w+)_patch16_(\d+)", name).groups()
    width, heads = VIT_CFG[size]
    assert isinstance(model, VisionTransformer)
    assert (model.embed_dim, model.num_heads, model.depth, model.patch_size) == (width, heads, 12, 16)
    assert (model.img_size, model.num_classes) == (int(res), 1000)


@pytest.mark.parametrize("name", ["xcit_small_12_p8_384", "vit_small_patch16_384", "deit_tiny_patch16_224"])
def test_eval_shape_init(name):
  model = create_model(name, num_classes=7)
  shapes = param_shapes(model, (48, 32))
  assert shapes["params"]["head"]["kernel"].shape == (model.embed_dim, 7)
  out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct((2, 48, 32, 3), jnp.float32))
  assert out.shape == (2, 7)


def test_unknown_name_lists_names():
  with pytest.raises(ValueError) as e:
    create_model("xcit_huge_12_p16_224")
  assert "xcit_huge_12_p16_224" in str(e.value) and "xcit_nano_12_p16_224" in str(e.value)
  with pytest.raises(ValueError) as e:
    create_model("resnet50")
  assert "vit_base_patch16_224" in str(e.value) and "xcit_large_24_p8_384" in str(e.value)


def test_overrides():
  model = create_model("xcit_nano_12_p16_224", num_classes=10, drop_path_rate=0.1)
  assert (model.num_classes, model.drop_path_rate, model.embed_dim, model.depth) == (10, 0.1, 128, 12)
  assert create_model("vit_tiny_patch16_224", img_size=384).img_size == 384
  with pytest.raises(TypeError, match="num_clases"):
    create_model("xcit_nano_12_p16_224", num_clases=10)
  with pytest.raises(TypeError, match="tokens_norm"):
    create_model("vit_tiny_patch16_224", tokens_norm=True)  # an XCiT field, not a ViT one


def test_vit_drop_path_linear_over_depth():
  model = create_model("deit_small_patch16_224", drop_path_rate=0.1)
  bound = model.bind(param_shapes(model))
  np.testing.assert_allclose([blk.drop_path_rate for blk in bound.blocks], np.linspace(0, 0.1, 12), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# ViT parameter counts (timm)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [("vit_tiny_patch16_224", 5_717_416), ("vit_small_patch16_224", 22_050_664),
                                        ("vit_base_patch16_224", 86_567_656),
                                        ("deit_tiny_patch16_224", 5_717_416)])
def test_vit_param_counts(name, count):
  assert n_params(param_shapes(create_model(name))["params"]) == count


def test_vit_384_count_differs_only_by_position_table():
  c224 = n_params(param_shapes(create_model("vit_base_patch16_224"))["params"])
  c384 = n_params(param_shapes(create_model("vit_base_patch16_384"))["params"])
  assert c384 - c224 == (24 * 24 - 14 * 14) * 768
  assert c384 == 86_859_496  # timm vit_base_patch16_384


# ----------------------------------------------------------------------------------------------------------
# ViT numerics vs numpy
# ----------------------------------------------------------------------------------------------------------
def randomize(tree, seed, std=0.2):
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(unfreeze(tree))
  out = {p: np.asarray((1.0 if p[-1] == "scale" else 0.0) + std * rng.standard_normal(tuple(l.shape)),
                       np.float32) for p, l in flat.items()}
  return flax.traverse_util.unflatten_dict(out)


def rand_vars(module, *args, seed, **kwargs):
  return randomize(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)), seed)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), unfreeze(tree))


_erf = np.vectorize(math.erf)


def np_softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def np_mlp(x, p):
  h = x @ p["wi"]["kernel"] + p["wi"]["bias"]
  h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
  return h @ p["wo"]["kernel"] + p["wo"]["bias"]


def np_mha(x, p, heads):
  """Multi-head self-attention, one head at a time, with per-head slices of the (C, h, d) kernels."""
  b, n, c = x.shape
  out = np.zeros((b, n, c)) + p["out"]["bias"]
  for h in range(heads):
    q = x @ p["query"]["kernel"][:, h] + p["query"]["bias"][h]
    k = x @ p["key"]["kernel"][:, h] + p["key"]["bias"][h]
    v = x @ p["value"]["kernel"][:, h] + p["value"]["bias"][h]
    a = np_softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]))
    out += (a @ v) @ p["out"]["kernel"][h]
  return out


def np_vit_block(x, p, heads):
  x = x + np_mha(np_ln(x, p["norm1"]), p["attn"], heads)
  return x + np_mlp(np_ln(x, p["norm2"]), p["mlp"])


def np_resize_bilinear(a, out_h, out_w):
  """Half-pixel-centre bilinear resize of (H, W, C), edge-clamped (upsampling)."""
  def axis_weights(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    i0 = np.floor(src).astype(int)
    t = src - i0
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
      m[o, np.clip(i0[o], 0, n_in - 1)] += 1 - t[o]
      m[o, np.clip(i0[o] + 1, 0, n_in - 1)] += t[o]
    return m
  return np.einsum("oh,pw,hwc->opc", axis_weights(a.shape[0], out_h), axis_weights(a.shape[1], out_w), a)


def np_vit_features(img, p, patch, heads, depth):
  b, h, w, _ = img.shape
  hp, wp = h // patch, w // patch
  patches = img.reshape(b, hp, patch, wp, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * wp, -1)
  x = patches @ p["patch_embed"]["kernel"].reshape(-1, p["patch_embed"]["kernel"].shape[-1])
  x = x + p["patch_embed"]["bias"]
  c = x.shape[-1]
  pos = p["pos_embed"][0]
  g = int(round(math.sqrt(pos.shape[0] - 1)))
  grid_pos = pos[1:].reshape(g, g, c)
  if (hp, wp) != (g, g):
    grid_pos = np_resize_bilinear(grid_pos, hp, wp)
  x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, c)), x], axis=1)
  x = x + np.concatenate([pos[:1], grid_pos.reshape(hp * wp, c)], axis=0)
  for i in range(depth):
    x = np_vit_block(x, p[f"blocks_{i}"], heads)
  return np_ln(x, p["norm"])


def test_vit_block_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))  # the shapes of the model below at 32×32 (eager op reuse)
  block = ViTBlock(num_heads=4)
  params = rand_vars(block, x, seed=1)["params"]
  got = block.apply({"params": params}, x)
  np.testing.assert_allclose(got, np_vit_block(np.asarray(x, np.float64), f64(params), 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_vit_any_resolution_matches_numpy(hw):
  model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=4, num_classes=3)
  variables = rand_vars(model, jnp.zeros((1, 32, 32, 3)), seed=2)
  assert variables["params"]["pos_embed"].shape == (1, 1 + 4, 16)
  img = jax.random.normal(jax.random.key(3), (2, *hw, 3))
  feats = model.apply(variables, img, method=VisionTransformer.forward_features)
  logits = model.apply(variables, feats, method=VisionTransformer.forward_head)
  p = f64(variables["params"])
  want = np_vit_features(np.asarray(img, np.float64), p, 16, 4, 1)
  assert feats.shape == (2, 1 + (hw[0] // 16) * (hw[1] // 16), 16)
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, want[:, 0] @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-4, atol=1e-4)


def test_vit_bad_input():
  model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=4, num_classes=3)
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), spec(1, 32, 32, 3))
  with pytest.raises(ValueError, match="patch_size"):
    jax.eval_shape(model.apply, variables, spec(1, 40, 32, 3))
  with pytest.raises(ValueError):
    jax.eval_shape(model.apply, variables, spec(1, 32, 32, 1))
  with pytest.raises(ValueError):
    VisionTransformer(img_size=40, patch_size=16)
