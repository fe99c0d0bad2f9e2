"""The BERT-size Linformer presets: geometry, required fields, the trainer's data kinds, and parameter counts
(jax.eval_shape only: nothing of BERT size is initialised) against a count written out by hand from the geometry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax import steps
from linformer_jax.models import LinformerClassifier, LinformerLM, create_model, list_models

BERT_VOCAB, CLASSES = 30522, 2  # BERT's uncased WordPiece vocabulary
# BERT-base / BERT-large (Devlin et al. 2019), as RoBERTa: depth, heads, width, feed-forward width
GEOMETRY = {"base": (12, 12, 768, 3072), "large": (24, 16, 1024, 4096)}
MAX_LEN, K = 512, 256
PRESETS = [f"linformer_{size}{kind}" for size in GEOMETRY for kind in ("", "_classifier")]


def preset_param_count(name, vocab_size, num_classes=None, head="mlp"):
  """By hand, for pre-LN layers with one E=F projection per layer (sharing="kv") and learned positions:

  embeddings V·d + 512·d; per layer: Q, K, V (d·d each, no biases), O (d·d + d), E=F (n_enc·k, no bias, the same
  for every head), two LayerNorms (2·d each), feed-forward (d·f + f + f·d + d); final LayerNorm 2·d. The LM's
  output layer is the tied token embedding (no bias, nothing added). The classifier prepends a CLS vector (d), so
  its encoder is built for n_enc = 512 + 1 positions, and adds its head: "mlp" = pre_logits (d·d + d) and head
  (d·C + C), "linear" = head (d·C + C).
  """
  size = name.split("_")[1]
  depth, _, d, f = GEOMETRY[size]
  classifier = name.endswith("_classifier")
  n_enc = MAX_LEN + 1 if classifier else MAX_LEN
  per_layer = 3 * d * d + (d * d + d) + n_enc * K + 2 * (2 * d) + (d * f + f + f * d + d)
  total = vocab_size * d + MAX_LEN * d + depth * per_layer + 2 * d
  if classifier:
    total += d + (d * d + d if head == "mlp" else 0) + d * num_classes + num_classes
  return total


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def param_shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, MAX_LEN), jnp.int32))["params"]


def test_presets_are_registered():
  assert set(PRESETS) <= set(list_models("linformer_*"))
  assert set(list_models("linformer_*")) == set(PRESETS) | {"linformer_lm", "linformer_classifier", "linformer_encdec"}


@pytest.mark.parametrize("name", PRESETS)
def test_geometry(name):
  depth, heads, dim, dim_ff = GEOMETRY[name.split("_")[1]]
  kw = dict(num_classes=CLASSES) if name.endswith("_classifier") else {}
  model = create_model(name, vocab_size=BERT_VOCAB, **kw)
  assert isinstance(model, LinformerClassifier if name.endswith("_classifier") else LinformerLM)
  assert (model.depth, model.num_heads, model.dim, model.dim_ff) == (depth, heads, dim, dim_ff)
  assert (model.max_len, model.k, model.sharing, model.pos_emb, model.vocab_size) == (
      MAX_LEN, K, "kv", "learned", BERT_VOCAB)
  if isinstance(model, LinformerLM):
    assert model.tie_embeddings
  assert create_model(name, vocab_size=100, depth=2, **kw).depth == 2  # a preset's field is an override too


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count(name):
  """The whole tree and the shapes the hand count assumes (one (n_enc, k) E=F per layer, no output bias)."""
  classifier = name.endswith("_classifier")
  model = create_model(name, vocab_size=BERT_VOCAB, **(dict(num_classes=CLASSES) if classifier else {}))
  shapes = param_shapes(model)
  assert n_params(shapes) == preset_param_count(name, BERT_VOCAB, CLASSES)
  n_enc = MAX_LEN + 1 if classifier else MAX_LEN
  assert shapes["encoder"]["layer_0"]["attention"]["EF"]["kernel"].shape == (n_enc, K)
  assert set(shapes) == ({"embed", "encoder", "cls", "pre_logits", "head"} if classifier else {"embed", "encoder"})
  if classifier:  # the linear head instead of the MLP
    linear = param_shapes(model.clone(head="linear"))
    assert n_params(linear) == preset_param_count(name, BERT_VOCAB, CLASSES, head="linear")


@pytest.mark.parametrize("name", PRESETS)
def test_vocab_size_is_required(name):
  with pytest.raises(TypeError, match="vocab_size") as info:
    create_model(name, **(dict(num_classes=CLASSES) if name.endswith("_classifier") else {}))
  assert "30522" in str(info.value)  # says what to pass
  if name.endswith("_classifier"):
    with pytest.raises(TypeError, match="num_classes"):
      create_model(name, vocab_size=BERT_VOCAB)


@pytest.mark.parametrize("name", PRESETS)
def test_trainer_builds_preset_from_data(name):
  """steps.build_model sets vocab_size, max_len (and num_classes) from the dataset's info."""
  kind = "classification" if name.endswith("_classifier") else "mlm"
  assert steps.DATA_KIND_OF_MODEL[name] == kind
  info = {"kind": kind, "vocab_size": 99, "max_len": 300, "num_classes": 4}
  model = steps.build_model({"name": name, "dropout": 0.1}, info)
  assert (model.vocab_size, model.max_len, model.dropout) == (99, 300, 0.1)
  assert model.dim == GEOMETRY[name.split("_")[1]][2]
  if kind == "classification":
    assert model.num_classes == 4
  with pytest.raises(ValueError, match="vocab_size"):
    steps.build_model({"name": name, "vocab_size": 5}, info)
