"""Argument validation: bad hyper-parameters raise at module construction (before init or tracing), bad inputs
raise at call time before any computation; every message names the argument (and, for choices, the allowed
values)."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from linformer_jax import _validate
from linformer_jax.layers import FeedForward, FullSelfAttention, LinformerSelfAttention, SeqProjection, TokenEmbedder
from linformer_jax.models import Linformer, LinformerClassifier, LinformerEncDec, LinformerLM

BASE = dict(max_len=12, dim=8, depth=2, num_heads=2, k=4, dim_ff=16)
MODELS = {
    "Linformer": (Linformer, {}),
    "LinformerLM": (LinformerLM, dict(vocab_size=11)),
    "LinformerClassifier": (LinformerClassifier, dict(num_classes=3)),
    "LinformerEncDec": (LinformerEncDec, dict(vocab_size=11)),
}

# (overrides, exception type, substrings the message must contain)
FIELD_ERRORS = {
    "unknown sharing": (dict(sharing="rowwise"), ValueError,
                        ["sharing", "'rowwise'", "'none'", "'headwise'", "'kv'", "'layerwise'"]),
    "unknown projection": (dict(projection="random"), ValueError,
                           ["projection", "'learnable'", "'conv'", "'mean_pool'", "'max_pool'", "'fixed'"]),
    "unknown norm": (dict(norm="sandwich"), ValueError, ["norm", "'pre'", "'post'"]),
    "unknown attention": (dict(attention="performer"), ValueError, ["attention", "'linformer'", "'full'"]),
    "unknown activation": (dict(activation="swish"), ValueError, ["activation", "'gelu'", "'relu'"]),
    "unknown remat level": (dict(remat="C3"), ValueError, ["remat", "'C3'", "'C0'", "'C1'", "'C2'"]),
    "unknown remat policy": (dict(remat="C1", remat_policy="fast"), ValueError,
                             ["remat_policy", "'fast'", "'nothing_saveable'", "'save_projections'"]),
    "scan_layers with k_reduce_by_layer": (dict(scan_layers=True, k_reduce_by_layer=1), ValueError,
                                           ["scan_layers", "k_reduce_by_layer"]),
    "dim not divisible by heads": (dict(dim=10, num_heads=4), ValueError, ["dim=10", "num_heads=4", "head_dim"]),
    "k > max_len": (dict(k=13), ValueError, ["k=13", "max_len=12"]),
    "k = 0": (dict(k=0), ValueError, ["k=0"]),
    "k < 0": (dict(k=-3), ValueError, ["k=-3"]),
    "k float": (dict(k=4.0), TypeError, ["k must be an int", "4.0"]),
    "k bool": (dict(k=True), TypeError, ["k must be an int"]),
    "layerwise + k_reduce_by_layer": (dict(sharing="layerwise", k_reduce_by_layer=1), ValueError,
                                      ["k_reduce_by_layer", "layerwise"]),
    "negative k_reduce_by_layer": (dict(k_reduce_by_layer=-1), ValueError, ["k_reduce_by_layer"]),
    "causal with a conv projection": (dict(causal=True, projection="conv"), ValueError,
                                      ["causal", "projection='conv'", "'learnable'", "'fixed'"]),
    "causal_chunk = 0": (dict(causal=True, causal_chunk=0), ValueError, ["causal_chunk", "0"]),
    "depth 0": (dict(depth=0), ValueError, ["depth"]),
    "num_heads float": (dict(num_heads=2.0), TypeError, ["num_heads"]),
    "dropout 1": (dict(dropout=1.0), ValueError, ["dropout"]),
    "attention_dropout negative": (dict(attention_dropout=-0.1), ValueError, ["attention_dropout"]),
    "projection_bias not bool": (dict(projection_bias=1), TypeError, ["projection_bias"]),
    "max_len float": (dict(max_len=12.0), TypeError, ["max_len"]),
    "dim_ff zero": (dict(dim_ff=0), ValueError, ["dim_ff"]),
}


def _check_message(err, substrings):
  msg = str(err)
  for sub in substrings:
    assert sub in msg, f"{sub!r} not in {msg!r}"


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(FIELD_ERRORS))
def test_field_errors_at_construction(case, model):
  overrides, exc, substrings = FIELD_ERRORS[case]
  cls, extra = MODELS[model]
  with pytest.raises(exc) as info:
    cls(**dict(BASE, **extra, **overrides))  # construction only: no init, no tracing
  _check_message(info.value, substrings)


@pytest.mark.parametrize("model", list(MODELS))
def test_valid_configuration_constructs(model):
  """The table's base config itself is valid (so each error above comes from its one override)."""
  cls, extra = MODELS[model]
  cls(**dict(BASE, **extra))


def test_indivisible_dim_ok_with_head_dim():
  model = Linformer(**dict(BASE, dim=10, num_heads=4, head_dim=3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 10)))
  assert shapes["params"]["layer_0"]["attention"]["query"]["kernel"].shape == (10, 4, 3)
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 12, 10)))
  assert out.shape == (1, 12, 10)


def test_full_attention_ignores_k_bound_and_allows_causal():
  Linformer(**dict(BASE, attention="full", causal=True))
  Linformer(**dict(BASE, attention="full", k=100))


MODEL_ONLY_ERRORS = [
    (LinformerClassifier, dict(num_classes=3, pool="max"), ValueError, ["pool", "'cls'", "'mean'"]),
    (LinformerClassifier, dict(num_classes=0), ValueError, ["num_classes"]),
    (LinformerClassifier, dict(num_classes=3, vocab_size=2.5), TypeError, ["vocab_size"]),
    (LinformerClassifier, dict(num_classes=3, pos_emb="rope"), ValueError, ["pos_emb", "'learned'",
                                                                             "'sinusoidal'"]),
    (LinformerLM, dict(vocab_size=0), ValueError, ["vocab_size"]),
    (LinformerLM, dict(vocab_size=11, pos_emb="rotary"), ValueError, ["pos_emb", "'learned'", "'sinusoidal'"]),
    (LinformerLM, dict(vocab_size=11, tie_embeddings="yes"), TypeError, ["tie_embeddings"]),
    (LinformerEncDec, dict(vocab_size=11, decoder_depth=0), ValueError, ["decoder_depth"]),
    (LinformerEncDec, dict(vocab_size=11, max_target_len=1.5), TypeError, ["max_target_len"]),
]


@pytest.mark.parametrize("cls,overrides,exc,substrings", MODEL_ONLY_ERRORS,
                         ids=[f"{c.__name__}-{next(iter(o.items()))[0]}-{list(o)[-1]}"
                              for c, o, _, _ in MODEL_ONLY_ERRORS])
def test_model_specific_field_errors(cls, overrides, exc, substrings):
  with pytest.raises(exc) as info:
    cls(**dict(BASE, **overrides))
  _check_message(info.value, substrings)


LAYER_ERRORS = [
    (LinformerSelfAttention, dict(num_heads=2, sharing="rowwise"), ValueError, ["sharing", "'headwise'"]),
    (LinformerSelfAttention, dict(num_heads=2, projection="svd"), ValueError, ["projection", "'conv'"]),
    (LinformerSelfAttention, dict(num_heads=2, max_len=8, k=9), ValueError, ["k=9", "8"]),
    (LinformerSelfAttention, dict(num_heads=2, max_len=8, k=0), ValueError, ["k=0"]),
    (LinformerSelfAttention, dict(num_heads=2, max_len=8, k=2.0), TypeError, ["k must be an int"]),
    (LinformerSelfAttention, dict(num_heads=2, sharing="layerwise"), ValueError,
     ["sharing='layerwise'", "shared_projection"]),
    (LinformerSelfAttention, dict(num_heads=0), ValueError, ["num_heads"]),
    (LinformerSelfAttention, dict(num_heads=2, attention_dropout=1.5), ValueError, ["attention_dropout"]),
    (FullSelfAttention, dict(num_heads=2, head_dim=0), ValueError, ["head_dim"]),
    (SeqProjection, dict(max_len=8, k=4, method="pca"), ValueError, ["projection", "'max_pool'"]),
    (SeqProjection, dict(max_len=8, k=10), ValueError, ["k=10"]),
    (FeedForward, dict(dim_ff=8, activation="tanh"), ValueError, ["activation", "'gelu'", "'relu'"]),
    (FeedForward, dict(dim_ff=8, dropout=2.0), ValueError, ["dropout"]),
    (TokenEmbedder, dict(vocab_size=5, dim=4, max_len=8, pos_emb="alibi"), ValueError,
     ["pos_emb", "'learned'", "'sinusoidal'"]),
]


@pytest.mark.parametrize("cls,kwargs,exc,substrings", LAYER_ERRORS,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _, _) in enumerate(LAYER_ERRORS)])
def test_layer_field_errors_at_construction(cls, kwargs, exc, substrings):
  with pytest.raises(exc) as info:
    cls(**kwargs)
  _check_message(info.value, substrings)


# ----------------------------------------------------------------------------------------------------------
# call-time errors: raised while tracing, before any computation (jax.eval_shape computes nothing)
# ----------------------------------------------------------------------------------------------------------
KEY = jax.random.PRNGKey(0)
X = jnp.zeros((2, 12, 8))
MASK = jnp.ones((2, 12), bool)
TOK = jnp.ones((2, 12), jnp.int32)


def _encoder():
  return Linformer(**BASE)


CALL_ERRORS = {
    "n > max_len": (_encoder, (jnp.zeros((2, 13, 8)),), {}, ValueError, ["x", "n=13", "max_len=12"]),
    "mask wrong shape": (_encoder, (X,), dict(mask=jnp.ones((2, 11), bool)), ValueError,
                         ["mask", "(2, 11)", "(2, 12)"]),
    "mask wrong batch": (_encoder, (X,), dict(mask=jnp.ones((1, 12), bool)), ValueError, ["mask"]),
    "mask non-bool": (_encoder, (X,), dict(mask=jnp.ones((2, 12), jnp.int32)), TypeError, ["mask", "bool"]),
    "mask float": (_encoder, (X,), dict(mask=jnp.ones((2, 12), jnp.float32)), TypeError, ["mask", "bool"]),
    "x wrong last dim": (_encoder, (jnp.zeros((2, 12, 7)),), {}, ValueError, ["x", "dim=8", "(2, 12, 7)"]),
    "x rank 2": (_encoder, (jnp.zeros((12, 8)),), {}, ValueError, ["x", "dim=8"]),
    "LM tokens float": (lambda: LinformerLM(**BASE, vocab_size=11), (jnp.ones((2, 12)),), {}, TypeError,
                        ["tokens", "int", "float32"]),
    "LM tokens too long": (lambda: LinformerLM(**BASE, vocab_size=11), (jnp.ones((2, 13), jnp.int32),), {},
                           ValueError, ["tokens", "max_len=12"]),
    "LM mask non-bool": (lambda: LinformerLM(**BASE, vocab_size=11), (TOK,), dict(mask=jnp.ones((2, 12))),
                         TypeError, ["mask", "bool"]),
    "classifier too long": (lambda: LinformerClassifier(**BASE, num_classes=3), (jnp.zeros((2, 13, 8)),), {},
                            ValueError, ["inputs", "max_len=12"]),
    "classifier mask shape": (lambda: LinformerClassifier(**BASE, num_classes=3), (X,),
                              dict(mask=jnp.ones((2, 5), bool)), ValueError, ["mask"]),
    "classifier x wrong dim": (lambda: LinformerClassifier(**BASE, num_classes=3, pool="mean"),
                               (jnp.zeros((2, 12, 6)),), {}, ValueError, ["x", "dim=8"]),
    "encdec tgt_mask shape": (lambda: LinformerEncDec(**BASE, vocab_size=11), (TOK, TOK),
                              dict(tgt_mask=jnp.ones((2, 3), bool)), ValueError, ["tgt_mask"]),
    "encdec src too long": (lambda: LinformerEncDec(**BASE, vocab_size=11), (jnp.ones((2, 13), jnp.int32), TOK),
                            {}, ValueError, ["tokens", "max_len=12"]),
    "attention n > max_len": (lambda: LinformerSelfAttention(num_heads=2, max_len=12, k=4),
                              (jnp.zeros((2, 13, 8)),), {}, ValueError, ["x", "n=13", "max_len=12"]),
    "attention context > max_len": (lambda: LinformerSelfAttention(num_heads=2, max_len=12, k=4),
                                    (X, jnp.zeros((2, 14, 8))), {}, ValueError, ["context", "n=14"]),
    "attention dim not divisible": (lambda: LinformerSelfAttention(num_heads=3, max_len=12, k=4), (X,), {},
                                    ValueError, ["dim=8", "num_heads=3", "head_dim"]),
    "attention mask dtype": (lambda: FullSelfAttention(num_heads=2), (X,),
                             dict(mask=jnp.ones((2, 12), jnp.int32)), TypeError, ["mask", "bool"]),
    "projection too long": (lambda: SeqProjection(12, 4), (jnp.zeros((1, 13, 2, 4)),), {}, ValueError,
                            ["n=13", "max_len=12"]),
}


@pytest.mark.parametrize("case", list(CALL_ERRORS))
def test_call_time_errors(case):
  make, args, kwargs, exc, substrings = CALL_ERRORS[case]
  module = make()  # construction is fine
  with pytest.raises(exc) as info:
    jax.eval_shape(functools.partial(module.init, **kwargs), KEY, *args)
  _check_message(info.value, substrings)


def test_call_time_errors_also_on_apply():
  """With valid variables, bad inputs fail in apply the same way (eval_shape: no computation happens)."""
  model = _encoder()
  variables = jax.eval_shape(model.init, KEY, X)
  for bad_x, bad_mask, exc, sub in [(jnp.zeros((2, 13, 8)), None, ValueError, "max_len"),
                                    (X, jnp.ones((2, 12), jnp.int32), TypeError, "mask"),
                                    (X, jnp.ones((3, 12), bool), ValueError, "mask"),
                                    (jnp.zeros((2, 12, 9)), None, ValueError, "dim=8")]:
    with pytest.raises(exc, match=re.escape(sub)):
      jax.eval_shape(functools.partial(model.apply, mask=bad_mask), variables, bad_x)
  # and the valid call goes through
  assert jax.eval_shape(functools.partial(model.apply, mask=MASK), variables, X).shape == X.shape


# ---- the one validation vocabulary (linformer_jax._validate) ------------------------------------------------------

VOCAB_ERRORS = {
    "int not int": (lambda: _validate.check_int("data.seed", 1.5, minimum=0), TypeError,
                    ["data.seed must be an int", "1.5", "float"]),
    "int or None": (lambda: _validate.check_int("num_eval", "x", minimum=1, allow_none=True), TypeError,
                    ["num_eval must be an int or None", "'x'"]),
    "int bool": (lambda: _validate.check_int("depth", True), TypeError, ["depth must be an int", "True"]),
    "int below": (lambda: _validate.check_int("step", -1, minimum=0), ValueError, ["step=-1", ">= 0"]),
    "int above": (lambda: _validate.check_int("k", 9, maximum=8), ValueError, ["k=9", "<= 8"]),
    "real not real": (lambda: _validate.check_real("weight_decay", "big", low=0.0), TypeError,
                      ["weight_decay must be a float >= 0.0", "'big'"]),
    "real open low": (lambda: _validate.check_real("learning_rate", 0.0, low=0.0, low_open=True), ValueError,
                      ["learning_rate=0.0", "> 0.0"]),
    "real interval": (lambda: _validate.check_real("beta2", 1.0, low=0.0, high=1.0, low_open=True, high_open=True),
                      ValueError, ["beta2=1.0", "in (0.0, 1.0)"]),
    "real upper": (lambda: _validate.check_real("x", 3, high=2), ValueError, ["x=3", "<= 2"]),
    "real why": (lambda: _validate.check_real("d", 0.5, low=1.0, why=" (clipping)"), ValueError,
                 ["d=0.5", ">= 1.0 (clipping)"]),
    "real None": (lambda: _validate.check_real("eps", None, low=0.0), TypeError, ["eps must be a float", "None"]),
    "rate 1": (lambda: _validate.check_rate("dropout", 1.0), ValueError, ["dropout=1.0", "in [0, 1)"]),
    "rate str": (lambda: _validate.check_rate("dropout", "0.1"), TypeError,
                 ["dropout must be a float in [0, 1)", "'0.1'"]),
    "rate no zero": (lambda: _validate.check_rate("data.mask_rate", 0.0, allow_zero=False), ValueError,
                     ["data.mask_rate=0.0", "in (0, 1)"]),
    "bool": (lambda: _validate.check_bool("data.augment", 1), TypeError, ["data.augment must be a bool", "1"]),
    "choice": (lambda: _validate.check_choice("split", "dev", ("val", "test")), ValueError,
               ["split='dev'", "'val'", "'test'"]),
    "fields": (lambda: _validate.check_fields(["dimm"], ["dim", "depth"], what="model", scope="name='x'"),
               ValueError, ["unknown model field dimm", "did you mean 'dim'", "allowed fields for name='x'",
                            "depth, dim"]),
}


@pytest.mark.parametrize("case", list(VOCAB_ERRORS))
def test_validate_messages_name_argument_value_and_allowed(case):
  call, exc, substrings = VOCAB_ERRORS[case]
  with pytest.raises(exc) as info:
    call()
  _check_message(info.value, substrings)


def test_validate_accepts_valid_values():
  _validate.check_int("n", None, allow_none=True)
  _validate.check_int("n", 3, minimum=3, maximum=3)
  _validate.check_real("x", None, allow_none=True)
  _validate.check_real("x", 1, low=1, high=1)  # inclusive bounds; an int is a real
  _validate.check_rate("dropout", 0.0)
  _validate.check_rate("mask_rate", 0.5, allow_zero=False)
  _validate.check_bool("flag", False)
  _validate.check_fields(["dim"], ["dim", "depth"], what="model")


def test_one_check_family():
  """The data and optimizer checkers were folded into _validate: no second family is left."""
  from linformer_jax import optim
  from linformer_jax.data import base, images, listops, mlm, registry
  for module, name in [(base, "check_int_arg"), (base, "check_prob"), (optim, "_check_real"), (optim, "_real")]:
    assert not hasattr(module, name), f"{module.__name__}.{name}"
  for module in (base, images, listops, mlm, optim):
    assert module.check_int is _validate.check_int, module.__name__
  assert registry.check_fields is _validate.check_fields and optim.check_real is _validate.check_real
  assert mlm.check_rate is _validate.check_rate
