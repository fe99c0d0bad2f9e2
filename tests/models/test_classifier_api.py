"""The classifier API every classifier shares (timm's names): forward_features, forward_head, get_classifier,
reset_classifier, on LinformerClassifier, XCiT and ViT.

The class activation map (CAM) identity is checked against numpy float64: with CAM_c[t] = features[t] · W[:, c] + b[c]
(features from forward_features, W and b from get_classifier), logit c is the mean of CAM_c over the pooled tokens
for mean pooling (Linformer: masked mean over the real tokens; XCiT/ViT global_pool="avg": the patch tokens) and
CAM_c at the CLS token (t = 0) for CLS pooling.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze

from linformer_jax.models import LinformerClassifier, create_model, get_classifier, reset_classifier
from helpers import assert_only_head_replaced

B, N, DIM, CLASSES, VOCAB, MLP_DIM = 2, 10, 8, 3, 11, 6
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (B, N)), jnp.int32)
MASK = jnp.asarray(np.arange(N)[None] < np.array([[N], [6]]))  # the second sequence has 4 padding tokens
IMAGES = jnp.asarray(np.random.RandomState(1).normal(size=(B, 32, 32, 3)), jnp.float32)
LINFORMER = dict(max_len=N, dim=DIM, depth=1, num_heads=2, k=4, dim_ff=16, num_classes=CLASSES, vocab_size=VOCAB)
IMAGE_MODELS = {  # tiny versions of the registered names: 2 × 2 patches of 16 pixels
    "xcit": ("xcit_nano_12_p16_224", dict(embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1)),
    "vit": ("vit_tiny_patch16_224", dict(embed_dim=32, depth=1, num_heads=2, img_size=32)),
}


def f64(a):
  return np.asarray(a, np.float64)


def random_variables(model, *args, seed=0):
  """Variables shaped like ``model.init`` (eval_shape only) filled with numpy normals; BatchNorm variances
  positive. Random (non-zero) biases make the bias term of the CAM matter."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rs = np.random.RandomState(seed)

  def fill(path, s):
    if path[-1].key == "var":
      return jnp.asarray(rs.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rs.normal(0.0, 0.3, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def build(kind: str, pool: str, head: str = "linear"):
  """(model, variables, inputs, mask) for a kind ("linformer", "xcit", "vit") and a pooling ("mean" | "cls")."""
  if kind == "linformer":
    model = LinformerClassifier(**LINFORMER, pool=pool, head=head, mlp_dim=MLP_DIM if head == "mlp" else None)
    return model, random_variables(model, TOKENS, MASK), TOKENS, MASK
  name, overrides = IMAGE_MODELS[kind]
  model = create_model(name, **overrides, num_classes=CLASSES, global_pool="avg" if pool == "mean" else "token")
  return model, random_variables(model, IMAGES), IMAGES, None


def features_and_logits(model, variables, inputs, mask):
  """forward_features' output and the model's logits (jitted: one compilation each)."""
  if mask is None:
    feats = jax.jit(lambda v, x: model.apply(v, x, method=model.forward_features))(variables, inputs)
    return feats, jax.jit(model.apply)(variables, inputs)
  feats = jax.jit(lambda v, x, m: model.apply(v, x, m, method=model.forward_features))(variables, inputs, mask)
  return feats, jax.jit(model.apply)(variables, inputs, mask)


def cam(feats, classifier):
  """CAM (batch, tokens, classes) in float64: features[t] · W + b."""
  return f64(feats) @ f64(classifier["kernel"]) + f64(classifier["bias"])


@pytest.mark.parametrize("kind", ["linformer", "xcit", "vit"])
def test_cam_mean_over_tokens_is_the_logit(kind):
  model, variables, inputs, mask = build(kind, "mean")
  feats, logits = features_and_logits(model, variables, inputs, mask)
  maps = cam(feats, model.get_classifier(variables))
  if kind == "linformer":  # all n tokens are features; the mean is over the real ones
    assert feats.shape == (B, N, DIM)
    m = f64(MASK)[..., None]
    want = (maps * m).sum(1) / m.sum(1)
    unmasked = maps.mean(1)  # the padding changes the plain mean: the mask matters
    assert np.abs(unmasked[1] - want[1]).max() > 1e-3
  else:  # CLS first, then the patch tokens, which global_pool="avg" averages
    assert feats.shape == (B, 1 + 4, 32)
    want = maps[:, 1:].mean(1)
  np.testing.assert_allclose(f64(logits), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linformer", "xcit", "vit"])
def test_cam_at_cls_token_is_the_logit(kind):
  """With CLS pooling the logit is the CAM at the CLS position (features[:, 0]); the other tokens reach the
  logits only through attention, so no map over them sums to the logit."""
  model, variables, inputs, mask = build(kind, "cls")
  feats, logits = features_and_logits(model, variables, inputs, mask)
  assert feats.shape[1] == (1 + N if kind == "linformer" else 1 + 4)
  np.testing.assert_allclose(f64(logits), cam(feats, model.get_classifier(variables))[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linformer", "xcit", "vit"])
def test_get_classifier_is_the_head_dense(kind):
  model, variables, _, _ = build(kind, "mean")
  head = variables["params"]["head"]
  for classifier in (model.get_classifier(variables), get_classifier(model, variables), get_classifier(variables)):
    assert set(classifier) == {"kernel", "bias"}
    np.testing.assert_array_equal(classifier["kernel"], head["kernel"])
    np.testing.assert_array_equal(classifier["bias"], head["bias"])
  dim = DIM if kind == "linformer" else 32
  assert head["kernel"].shape == (dim, CLASSES) and head["bias"].shape == (CLASSES,)


@pytest.mark.parametrize("kind,head", [("linformer", "linear"), ("linformer", "mlp"), ("xcit", None),
                                       ("vit", None)])
def test_forward_head_pre_logits(kind, head):
  """pre_logits=True returns what the final linear map receives, and the logits come from it: the pooled features
  (batch, dim), or for the MLP head its hidden layer (batch, mlp_dim)."""
  model, variables, inputs, mask = build(kind, "mean", head or "linear")
  feats, logits = features_and_logits(model, variables, inputs, mask)
  extra = () if mask is None else (mask,)
  pre = model.apply(variables, feats, *extra, pre_logits=True, method=model.forward_head)
  assert pre.shape == (B, {"linear": DIM, "mlp": MLP_DIM, None: 32}[head])
  kernel, bias = f64(variables["params"]["head"]["kernel"]), f64(variables["params"]["head"]["bias"])
  np.testing.assert_allclose(f64(logits), f64(pre) @ kernel + bias, rtol=0, atol=1e-5)
  if head != "mlp":  # the pooled features themselves
    f = f64(feats)
    m = f64(MASK)[..., None] if kind == "linformer" else None
    pooled = (f * m).sum(1) / m.sum(1) if kind == "linformer" else f[:, 1:].mean(1)
    np.testing.assert_allclose(f64(pre), pooled, rtol=0, atol=1e-5)


def test_forward_is_forward_head_of_forward_features_with_the_mask():
  for pool in ("cls", "mean"):
    model, variables, inputs, mask = build("linformer", pool, "mlp")
    feats = model.apply(variables, inputs, mask, method=model.forward_features)
    np.testing.assert_array_equal(model.apply(variables, feats, mask, method=model.forward_head),
                                  model.apply(variables, inputs, mask))
    with pytest.raises(ValueError, match="mask"):  # the mask is that of the inputs, (batch, n)
      model.apply(variables, feats, jnp.ones((B, N + 3), bool), method=model.forward_head)


def test_get_classifier_refuses_an_mlp_head():
  model, variables, _, _ = build("linformer", "mean", "mlp")
  assert set(variables["params"]) == {"embed", "encoder", "pre_logits", "head"}  # the tree of earlier versions
  with pytest.raises(ValueError, match="head='mlp'") as info:
    model.get_classifier(variables)
  assert "head='linear'" in str(info.value)  # says what to use
  with pytest.raises(ValueError, match="MLP head"):
    get_classifier(variables)  # the variables-only form: a pre_logits layer means an MLP head
  with pytest.raises(ValueError, match="head='linear'"):
    get_classifier(model, variables)


def test_get_classifier_without_a_head():
  model, variables, _, _ = build("vit", "mean")
  bare, transfer = reset_classifier(model, 0)
  bare_vars = transfer(variables, jax.random.key(0))
  with pytest.raises(ValueError, match="num_classes=0"):
    bare.get_classifier(bare_vars)
  with pytest.raises(TypeError, match="classifier"):
    get_classifier(create_model("linformer_lm", vocab_size=VOCAB, max_len=N, dim=DIM, depth=1, num_heads=2, k=4),
                   variables)


def test_head_field_validation():
  with pytest.raises(ValueError, match="head='sigmoid'.*'mlp', 'linear'"):
    LinformerClassifier(**LINFORMER, head="sigmoid")
  with pytest.raises(ValueError, match="mlp_dim=16.*head='linear'"):
    LinformerClassifier(**LINFORMER, head="linear", mlp_dim=16)
  assert LinformerClassifier(**LINFORMER).head == "mlp"  # the default keeps existing runs and checkpoints working


@pytest.mark.parametrize("head", ["mlp", "linear"])
@pytest.mark.parametrize("use_registry", [False, True])
def test_reset_classifier_linformer(head, use_registry):
  model, variables, inputs, mask = build("linformer", "cls", head)
  new_model, transfer = reset_classifier(model, 5) if use_registry else model.reset_classifier(5)
  assert new_model.num_classes == 5 and model.num_classes == CLASSES and new_model.head == head
  new_vars = transfer(variables, jax.random.key(3))  # every other parameter kept (pre_logits included)
  assert_only_head_replaced(variables, new_vars, (DIM if head == "linear" else MLP_DIM, 5))
  want = jax.eval_shape(new_model.init, jax.random.key(0), inputs, mask)
  assert jax.tree.map(lambda a: a.shape, unfreeze(want)) == jax.tree.map(lambda a: a.shape, unfreeze(new_vars))
  out = new_model.apply(new_vars, inputs, mask)
  assert out.shape == (B, 5) and np.isfinite(np.asarray(out)).all()
  feats = model.apply(variables, inputs, mask, method=model.forward_features)
  np.testing.assert_array_equal(new_model.apply(new_vars, inputs, mask, method=new_model.forward_features), feats)
  with pytest.raises(ValueError, match="num_classes"):
    model.reset_classifier(0)
