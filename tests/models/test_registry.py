"""The one generic model test (timm style): every name of ``list_models()`` builds through ``create_model``,
initialises, runs forward and backward, and has the parameter count of an independent source (published counts for
XCiT/ViT presets, the hand-written Linformer formula of test_linformer.py for the Linformer names and the hand count
of test_presets.py for the BERT-size Linformer presets, which are traced at full size but never initialised)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.models import create_model, list_models
from linformer_jax.models.registry import model_fields
from test_linformer import expected_param_count
from test_presets import preset_param_count
from test_vit_registry import n_params
from test_xcit import PUBLISHED

LINFORMER = dict(max_len=12, dim=8, depth=2, num_heads=2, k=4, dim_ff=16, sharing="kv")
VOCAB, CLASSES = 11, 3
# Small Linformer-family configs (no presets) and the inputs of each family.
SMALL = {
    "linformer_lm": dict(LINFORMER, vocab_size=VOCAB),
    "linformer_classifier": dict(LINFORMER, vocab_size=VOCAB, num_classes=CLASSES, pool="mean"),
    "linformer_encdec": dict(LINFORMER, vocab_size=VOCAB),
}
# The BERT-size presets: full geometry, only the user's vocabulary (and classes) given.
PRESETS = {name: dict(vocab_size=VOCAB, **({"num_classes": CLASSES} if name.endswith("_classifier") else {}))
           for name in list_models("linformer_*") if name not in SMALL}
SEQUENCE_OUTPUTS = {"linformer_lm", "linformer_encdec", "linformer_base", "linformer_large"}  # (batch, n, vocab)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, LINFORMER["max_len"])), jnp.int32)
IMAGE = jnp.asarray(np.random.RandomState(1).normal(size=(2, 32, 32, 3)), jnp.float32)
PUBLISHED_COUNTS = {f"xcit_{v}_p{p}_224": n for p, d in PUBLISHED.items() for v, n in d.items()}
PUBLISHED_COUNTS.update({"vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664,
                         "vit_base_patch16_224": 86_567_656, "deit_tiny_patch16_224": 5_717_416,
                         "deit_small_patch16_224": 22_050_664, "deit_base_patch16_224": 86_567_656})


def _build(name):
  """(model, inputs, apply kwargs for training) with the depth cut to keep the test small."""
  if name in SMALL:
    model = create_model(name, **SMALL[name])
    inputs = (TOKENS, TOKENS) if name == "linformer_encdec" else (TOKENS,)
    return model, inputs, {"deterministic": True}
  if name in PRESETS:
    return create_model(name, **PRESETS[name]), (TOKENS,), {"deterministic": True}
  shallow = {"depth": 1, "num_classes": CLASSES}
  if "cls_attn_layers" in model_fields(name):
    shallow["cls_attn_layers"] = 1
  return create_model(name, **shallow), (IMAGE,), {"train": False}


def test_every_trained_family_is_registered():
  names = set(list_models())
  assert {"linformer_lm", "linformer_classifier", "linformer_encdec"} <= names
  assert any(n.startswith("xcit_") for n in names) and any(n.startswith("vit_") for n in names)


def _loss_fn(model, variables, inputs, kwargs):
  def loss(params):
    return jnp.sum(jnp.square(model.apply({**variables, "params": params}, *inputs, **kwargs)))
  return loss


@pytest.mark.parametrize("name", list_models())
def test_init_forward_backward_shapes(name):
  """Every name, traced only (no compilation): init, forward and the gradient of every parameter."""
  model, inputs, kwargs = _build(name)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
  out = jax.eval_shape(lambda v: model.apply(v, *inputs, **kwargs), variables)
  if name in SEQUENCE_OUTPUTS:
    assert out.shape == (2, inputs[-1].shape[1], VOCAB)
  else:
    assert out.shape == (2, CLASSES)
  grads = jax.eval_shape(lambda v: jax.grad(_loss_fn(model, v, inputs, kwargs))(v["params"]), variables)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  assert all(g.shape == p.shape for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(variables["params"])))


@pytest.mark.parametrize("name", ["linformer_lm", "linformer_classifier", "linformer_encdec",
                                  "xcit_nano_12_p16_224", "xcit_nano_12_p8_224", "vit_tiny_patch16_224"])
def test_init_forward_backward_values(name):
  """One name per family and patch size, computed: finite outputs, finite and mostly non-zero gradients."""
  model, inputs, kwargs = _build(name)
  variables = jax.jit(lambda key: model.init(key, *inputs, **kwargs))(jax.random.key(0))
  out = jax.jit(lambda v: model.apply(v, *inputs, **kwargs))(variables)
  assert bool(jnp.all(jnp.isfinite(out)))
  grads = jax.jit(jax.grad(_loss_fn(model, variables, inputs, kwargs)))(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= 0.9 * len(norms)


@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name):
  if name in PRESETS:
    model, inputs, kwargs = _build(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))["params"]
    assert n_params(shapes) == preset_param_count(name, VOCAB, CLASSES)
    return
  if name in SMALL:
    model, inputs, kwargs = _build(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))["params"]
    encoder = shapes["encoder"]
    assert n_params(encoder) == expected_param_count(**LINFORMER)
    d, n = LINFORMER["dim"], LINFORMER["max_len"]
    embed = VOCAB * d + n * d  # token + learned positions
    if name == "linformer_lm":
      assert n_params(shapes) == embed + n_params(encoder) + d * VOCAB + VOCAB
    elif name == "linformer_classifier":
      assert n_params(shapes) == embed + n_params(encoder) + (d * d + d) + (d * CLASSES + CLASSES)
    else:  # two embeddings, encoder, decoder = encoder-shaped layers + causal self-attention (4·d² + d) and its
      # LayerNorm (2·d) each (the cross-attention has the encoder layer's shapes), logits
      decoder = n_params(encoder) + LINFORMER["depth"] * (4 * d * d + 3 * d)
      assert n_params(shapes) == 2 * embed + n_params(encoder) + decoder + d * VOCAB + VOCAB
    return
  model = create_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  expected = PUBLISHED_COUNTS[name.replace("_384", "_224")]
  if name.endswith("_384") and name.startswith("vit_"):  # a learned position table of 1 + (384/16)² rows
    expected += ((384 // 16) ** 2 - (224 // 16) ** 2) * model.embed_dim
  assert n_params(shapes["params"]) == expected  # XCiT's Fourier positions have no table: same count at 384
