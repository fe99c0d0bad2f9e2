"""Mixed precision end to end: the model's ``dtype`` decides the compute dtype of the trainer's step.

With dtype=bfloat16 the matmuls and convolutions of the whole train step (forward and backward) take bfloat16
operands, parameters and optimizer state stay float32, and the loss is within a rounding-error bound of the float32
step's; float16 evaluates but is refused for training (no loss scaling); dtype names are checked before tracing.
"""
import collections
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from linformer_jax import steps
from linformer_jax.models import create_model
from linformer_jax.optim import default_optimizer_config, make_optimizer
from linformer_jax.run_config import RunConfig
from helpers import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, N = 50, 32
LM = dict(vocab_size=VOCAB, max_len=N, dim=32, depth=2, num_heads=4, k=8)
XCIT = "xcit_nano_12_p16_224"
IMG = 32  # 32×32 images: a 2×2 token grid after the stride-16 stem
U_BF16, U_FP16 = 2.0 ** -8, 2.0 ** -11  # unit roundoff (round to nearest) of bfloat16 (8-bit significand), float16
LAMBDA = 3.0  # probabilistic rounding-error bound (Higham & Mary 2019): relative error <= λ·√m·u w.h.p.

_TENSOR = r"tensor<(?:[^>]*x)?(\w+)>"  # the element type of a tensor type, e.g. tensor<2x4xbf16> → bf16
_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b.*?:\s*\(" + _TENSOR + ", " + _TENSOR + r"\)")


def op_dtypes(hlo_text: str) -> collections.Counter:
  """{(op, lhs element type, rhs element type): count} of the dot_general and convolution ops of StableHLO text."""
  found = collections.Counter()
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if match:
      found[match.groups()] += 1
  return found


def lm(**fields):
  return create_model("linformer_lm", **LM, **fields)


def xcit(**fields):
  return create_model(XCIT, num_classes=10, **fields)


def mlm_batch():
  rng = np.random.default_rng(0)
  return {"inputs": jnp.asarray(rng.integers(0, VOCAB, (2, N)), jnp.int32), "mask": jnp.ones((2, N), bool),
          "targets": jnp.asarray(rng.integers(0, VOCAB, (2, N)), jnp.int32),
          "weights": jnp.asarray(rng.random((2, N)) < 0.5, jnp.float32)}


def image_batch():
  rng = np.random.default_rng(1)
  return {"image": jnp.asarray(rng.standard_normal((2, IMG, IMG, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, (2,)), jnp.int32)}


TX = make_optimizer(default_optimizer_config(), 100).tx


def _floats(tree):
  return [a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]


@pytest.mark.parametrize("make,batch,kind", [(lm, mlm_batch, "mlm"), (xcit, image_batch, "image")], ids=["lm", "xcit"])
def test_bfloat16_train_step_runs_its_matmuls_in_bfloat16(make, batch, kind):
  """Lowered (not compiled) train step of a bfloat16 model: >= 95 % of the dot_general/convolution ops take bfloat16
  operands; the state it updates (parameters, optimizer state) is float32."""
  model, b = make(dtype=jnp.bfloat16), batch()
  state = steps.abstract_train_state(model, TX, b, kind)
  assert set(_floats(state.params)) == {jnp.dtype(jnp.float32)}
  assert set(_floats(state.opt_state)) == {jnp.dtype(jnp.float32)}
  text = jax.jit(steps.make_train_step(model, TX, kind)).lower(state, b, jax.random.key(0)).as_text()
  counts = op_dtypes(text)
  total = sum(counts.values())
  bf16 = sum(n for (_, lhs, rhs), n in counts.items() if lhs == rhs == "bf16")
  assert total >= (60 if kind == "mlm" else 250), dict(counts)  # the whole step was counted, backward included
  if kind == "image":
    assert sum(n for (op, _, _), n in counts.items() if op == "convolution") >= 4, dict(counts)  # the stem
  assert bf16 >= 0.95 * total, f"{bf16} / {total} ops with bfloat16 operands: {dict(counts)}"


def _roundings_lm(depth):
  """Roundings to bfloat16 along the longest path from the tokens to the logits of the LinformerLM (each a relative
  error <= u): embedding 3 (table cast, position cast, sum); per layer, attention sub-layer 10 (LayerNorm output;
  Q/K/V kernel cast and output; E/F kernel cast and output; attention weights cast; weights·V output; out kernel
  cast and output; residual sum), feed-forward sub-layer 7 (LayerNorm; wi kernel cast and output; GELU; wo kernel
  cast and output; residual sum); final LayerNorm and head kernel cast and output 3."""
  return 3 + 17 * depth + 3


def _roundings_xcit(depth, cls_layers, stages=4):
  """As ``_roundings_lm`` for XCiT: image cast 1; per stem stage 4 (conv kernel cast and output, BatchNorm output,
  GELU); position encoding 3 (kernel cast, output, sum); per XCA block 30 (XCA 11: LayerNorm, qkv kernel and
  output, q̂/k̂ cast, weights cast, weights·V, proj kernel and output, γ cast and product, residual; LPI 10:
  LayerNorm, two convs × (kernel, output), GELU, BatchNorm, γ cast and product, residual; MLP 9: LayerNorm,
  wi and wo × (kernel, output), GELU, γ cast and product, residual); cls_token cast 1; per class-attention block 22;
  final LayerNorm, head kernel cast and output 3."""
  return 1 + 4 * stages + 3 + 30 * depth + 1 + 22 * cls_layers + 3


def _logit_tolerance(roundings, scale, unit=U_BF16):
  """Bound on |Δz| of the logits: m roundings of relative error <= u each, with independent signs (probabilistic
  analysis, Higham & Mary 2019): the accumulated relative error is <= λ·√m·u (λ = 3), taken relative to the
  logits' scale max|z| of the float32 computation."""
  return LAMBDA * math.sqrt(roundings) * unit * scale


def _loss_tolerance(roundings, scale):
  """Bound on |ΔL| of the mean cross-entropy: ∂CE/∂z = p − y with Σ_i |p_i − y_i| <= 2, so to first order a
  token's (or image's) loss moves by <= 2·max|Δz|, and so does their weighted mean."""
  return 2.0 * _logit_tolerance(roundings, scale)


def _one_step_losses(make, batch, kind, state, **apply_kwargs):
  """The train step's loss metric of the float32 and the bfloat16 model from the same float32 state, and max|z| of
  the float32 logits that loss was computed from (the scale of the bounds)."""
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    _, metrics = jax.jit(steps.make_train_step(make(dtype=dtype), TX, kind))(state, batch, jax.random.key(1))
    losses[dtype] = float(metrics["loss"])
  variables = {"params": state.params, **state.model_state}
  forward = jax.jit(lambda v, *x: make(dtype=jnp.float32).apply(v, *x, **apply_kwargs))
  logits = forward(variables, *steps.model_inputs(batch, kind))
  logits = logits[0] if isinstance(logits, tuple) else logits
  return losses[jnp.float32], losses[jnp.bfloat16], float(jnp.max(jnp.abs(logits)))


def test_bfloat16_lm_step_loss_within_rounding_bound_of_float32():
  b = mlm_batch()
  state = steps.init_state(lm(), TX, b, "mlm", jax.random.key(0))
  f32, bf16, scale = _one_step_losses(lm, b, "mlm", state)
  tol = _loss_tolerance(_roundings_lm(LM["depth"]), scale)
  assert 0.0 < abs(bf16 - f32) <= tol, f"float32 {f32}, bfloat16 {bf16}, |Δ| {abs(bf16 - f32):.3g}, tol {tol:.3g}"
  # the logits themselves (no averaging over tokens): within the per-logit bound
  variables = {"params": state.params}
  z32, z16 = (jax.jit(lm(dtype=dtype).apply)(variables, b["inputs"], b["mask"]) for dtype in (jnp.float32,
                                                                                               jnp.bfloat16))
  assert z16.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(z16.astype(jnp.float32) - z32)))
  assert err <= _logit_tolerance(_roundings_lm(LM["depth"]), scale), (err, scale)


def test_bfloat16_xcit_step_loss_within_rounding_bound_of_float32():
  """XCiT-N12 cut to one XCA and one class-attention block (compile time: the full model's step is lowered by
  the test above); the step updates BatchNorm statistics (train mode)."""
  make = lambda **kw: xcit(depth=1, cls_attn_layers=1, **kw)  # noqa: E731
  b = image_batch()
  state = steps.init_state(make(), TX, b, "image", jax.random.key(0))
  f32, bf16, scale = _one_step_losses(make, b, "image", state, train=True, mutable=["batch_stats"])
  tol = _loss_tolerance(_roundings_xcit(1, 1), scale)
  assert 0.0 < abs(bf16 - f32) <= tol, f"float32 {f32}, bfloat16 {bf16}, |Δ| {abs(bf16 - f32):.3g}, tol {tol:.3g}"


def test_bfloat16_parameters_keep_float32_optimizer_state():
  """param_dtype=bfloat16: parameters stored (and returned by the step) in bfloat16, the optimizer state float32
  before and after a step (traced only: dtypes do not depend on values)."""
  model, b = lm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), mlm_batch()
  state = steps.abstract_train_state(model, TX, b, "mlm")
  assert set(_floats(state.params)) == {jnp.dtype(jnp.bfloat16)}
  assert set(_floats(state.opt_state)) == {jnp.dtype(jnp.float32)}
  new_state, metrics = jax.eval_shape(steps.make_train_step(model, TX, "mlm"), state, b, jax.random.key(1))
  assert set(_floats(new_state.params)) == {jnp.dtype(jnp.bfloat16)}
  assert set(_floats(new_state.opt_state)) == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32


def test_float16_inference_close_to_float32_and_training_refused():
  b = mlm_batch()
  variables = jax.jit(lm().init)(jax.random.key(0), b["inputs"], b["mask"])
  z32, z16 = (jax.jit(lm(dtype=dtype).apply)(variables, b["inputs"], b["mask"]) for dtype in (jnp.float32,
                                                                                               jnp.float16))
  assert z16.dtype == jnp.float16
  scale = float(jnp.max(jnp.abs(z32)))
  err = float(jnp.max(jnp.abs(z16.astype(jnp.float32) - z32)))
  assert 0.0 < err <= _logit_tolerance(_roundings_lm(LM["depth"]), scale, U_FP16), (err, scale)
  for fields in ({"dtype": jnp.float16}, {"param_dtype": jnp.float16}):
    with pytest.raises(ValueError, match="loss scaling") as info:
      steps.make_train_step(lm(**fields), TX, "mlm")
    assert "bfloat16" in str(info.value) and f"model.{next(iter(fields))}='float16'" in str(info.value)
  steps.make_eval_step(lm(dtype=jnp.float16), "mlm")  # evaluation is allowed


def test_dtype_names_and_dtypes():
  assert lm(dtype="bfloat16").dtype is jnp.bfloat16 and xcit(param_dtype=np.dtype("float16")).param_dtype is jnp.float16
  for make in (lm, xcit):
    with pytest.raises(ValueError, match=r"dtype='float64' is not supported; allowed values: 'float32', "
                                         r"'bfloat16', 'float16'"):
      make(dtype="float64")
    with pytest.raises(ValueError, match=r"param_dtype='int8'"):
      make(param_dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"model\.dtype='bf16' is not supported; allowed values: 'float32', "
                                       r"'bfloat16', 'float16'"):
    steps.build_model({"name": "linformer_lm", **{k: v for k, v in LM.items() if k not in ("vocab_size", "max_len")},
                       "dtype": "bf16"}, {"kind": "mlm", "vocab_size": VOCAB, "max_len": N})
  model = steps.build_model({"name": XCIT, "dtype": "bfloat16", "param_dtype": "float32"},
                            {"kind": "image", "num_classes": 10})
  assert model.dtype is jnp.bfloat16 and model.param_dtype is jnp.float32


def test_compute_dtype_is_replaced_by_model_dtype():
  config = train_config("mlm_linformer")
  config.compute_dtype = "bfloat16"
  with pytest.raises(ValueError, match="compute_dtype was replaced by model.dtype") as info:
    RunConfig.from_config(config)
  assert "model.param_dtype" in str(info.value) and "--config.model.dtype=bfloat16" in str(info.value)


@pytest.mark.parametrize("name", ["mlm_linformer", "listops_linformer", "listops_transformer", "digits_xcit"])
def test_cli_sets_model_dtype_for_every_config(name):
  """``--config.model.dtype=bfloat16`` (ml_collections' config_flags, locked as experiments/train.py) parses for every
  config, and the default is float32."""
  argv = ["train", f"--config={os.path.join(ROOT, 'configs', name + '.py')}:runlocal",
          "--config.model.dtype=bfloat16", "--config.model.param_dtype=float32"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert fv.config.model.dtype == "bfloat16" and fv.config.model.param_dtype == "float32"
  default = train_config(name)
  assert isinstance(default.model, ml_collections.ConfigDict)
  assert (default.model.dtype, default.model.param_dtype) == ("float32", "float32")


def test_cli_override_of_compute_dtype_names_model_dtype():
  """``--config.compute_dtype=bfloat16`` (a field the locked config no longer has) is reported with its new name."""
  from experiments.train import one_line
  fv = flags.FlagValues()
  argv = ["train", f"--config={os.path.join(ROOT, 'configs', 'mlm_linformer.py')}:runlocal",
          "--config.compute_dtype=bfloat16"]
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
  with pytest.raises((KeyError, AttributeError)) as info:
    fv(argv)
  message = one_line(info.value)
  assert message.startswith("error: ValueError: compute_dtype was replaced by model.dtype"), message
