"""The train state and the pure step functions the trainer compiles.

``train_step(state, batch, rng) -> (state, metrics)`` and ``eval_step(state, batch) -> sums`` are pure functions
of arrays: ``linformer_jax.train`` compiles them once (``jax.jit`` with shardings or ``jax.pmap``, see
``linformer_jax.parallel``) and the benchmarks time exactly these functions.

A batch is a dict of arrays whose keys depend on the data kind (``dataset.info["kind"]``):

* ``"mlm"``: ``inputs`` (batch, n) int, ``mask`` (batch, n) bool, ``targets`` (batch, n) int, ``weights``
  (batch, n) float (1 at the masked positions that are scored);
* ``"classification"``: ``inputs`` (batch, n) int, ``mask`` (batch, n) bool, ``label`` (batch,) int;
* ``"image"``: ``image`` (batch, height, width, channels) float, ``label`` (batch,) int.

Evaluation batches may carry ``valid`` (batch,) (0 for the padding rows of the last batch).
"""
from __future__ import annotations

import difflib
import itertools
from typing import Any, Callable, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from linformer_jax._validate import as_dtype
from linformer_jax.models import create_model, list_models
from linformer_jax.models.registry import model_fields, unknown_fields_message
from linformer_jax.optim import current_learning_rate

#: model.name → the data kind it trains on; every other registered name is an image model.
DATA_KIND_OF_MODEL = {"linformer_lm": "mlm", "linformer_classifier": "classification",
                      "linformer_encdec": "seq2seq", "linformer_base": "mlm", "linformer_large": "mlm",
                      "linformer_base_classifier": "classification", "linformer_large_classifier": "classification"}
#: Model fields set from the dataset's info (never from the model config), by data kind.
FIELDS_FROM_DATA = {"mlm": ("vocab_size", "max_len"), "classification": ("num_classes", "vocab_size", "max_len"),
                    "seq2seq": ("vocab_size", "max_len"), "image": ("num_classes",)}


@flax.struct.dataclass
class TrainState:
  """What a train step reads and returns, and what a checkpoint holds.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the "params" collection.
    opt_state: the optax state of ``params``.
    model_state: the other variable collections (e.g. "batch_stats", "constants" — the fixed Linformer
      projection).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any


def build_model(model_config, info: dict) -> nn.Module:
  """The model of a run: ``create_model(model.name, **other model fields, **fields from the dataset)``.

  Args:
    model_config: the config's ``model`` section: ``name`` (``linformer_jax.models.list_models()``) and module
      fields; vocabulary size, length and class count come from the dataset and may not be set here. ``dtype``
      and ``param_dtype`` are names ("float32", "bfloat16", "float16"; ``linformer_jax._validate.DTYPES``).
    info: ``dataset.info`` (``kind`` and the data-derived fields).

  Raises:
    ValueError: an unknown name, a model for another data kind, a data-derived field in the model config, or an
      unknown dtype name.
  """
  kwargs = dict(model_config)
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = as_dtype(f"model.{key}", kwargs[key])
  name = kwargs.pop("name", None)
  registered = list_models()
  if name not in registered:
    close = difflib.get_close_matches(str(name), registered, n=6, cutoff=0.6)
    raise ValueError(f"model.name={name!r} is not supported; allowed values: "
                     f"{', '.join(map(repr, DATA_KIND_OF_MODEL))} or a registered image model "
                     f"(linformer_jax.models.list_models(), e.g. {', '.join(map(repr, close or registered[:3]))}).")
  kind = DATA_KIND_OF_MODEL.get(name, "image")
  if info.get("kind") != kind:
    raise ValueError(f"model.name={name!r} needs {kind!r} data, but the dataset gives {info.get('kind')!r} "
                     "data; pick a model for this data.name.")
  from_data = FIELDS_FROM_DATA[kind]
  for key in kwargs:
    if key in from_data:
      raise ValueError(f"model.{key} is set from the dataset ({key}={info.get(key)!r}); remove it from the "
                       "model config.")
  unknown = sorted(set(kwargs) - model_fields(name))
  if unknown:
    raise ValueError(unknown_fields_message(name, unknown))
  return create_model(name, **kwargs, **{key: info[key] for key in from_data})


def _apply(model, variables, batch, kind, train, rng):
  """Forward pass for a batch of this data kind → (logits, new non-param collections or None)."""
  rngs = {"dropout": rng} if train else {}
  if kind == "image":
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    out = model.apply(variables, batch["image"], train=train, mutable=mutable, rngs=rngs)
    return (out[0], out[1]) if mutable else (out, None)
  return model.apply(variables, batch["inputs"], batch["mask"], deterministic=not train, rngs=rngs), None


def _losses(logits, batch, kind):
  """Per-example (or per-token) cross-entropy, correctness and weights."""
  logits = logits.astype(jnp.float32)
  if kind == "mlm":
    targets, weights = batch["targets"], batch["weights"]
  else:
    targets, weights = batch["label"], jnp.ones(batch["label"].shape, jnp.float32)
  if "valid" in batch:  # padded eval examples
    valid = batch["valid"].reshape(batch["valid"].shape + (1,) * (weights.ndim - 1))
    weights = weights * valid
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ce, correct, weights


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def check_trainable_precision(model: nn.Module, prefix: str = "model.") -> None:
  """Raises ValueError (before anything is traced) for a model that computes or stores parameters in float16.

  float16 training needs loss scaling (its smallest normal number is 6e-5, so small gradients flush to zero), which
  this trainer does not implement; bfloat16 has float32's exponent range and needs none. float16 inference works.
  """
  for field in ("dtype", "param_dtype"):
    value = getattr(model, field, jnp.float32)
    if jnp.dtype(value) == jnp.dtype(jnp.float16):
      raise ValueError(f"{prefix}{field}='float16' cannot be trained here: float16 gradients underflow without "
                       "loss scaling, which this trainer does not implement. Use bfloat16 (float32's exponent range, "
                       "no loss scaling needed) or float32; float16 models work for inference.")


def model_inputs(batch: dict, kind: str) -> tuple:
  """The positional model inputs of a batch: (image,) or (inputs, mask)."""
  return (batch["image"],) if kind == "image" else (batch["inputs"], batch["mask"])


def init_state(model: nn.Module, tx: optax.GradientTransformation, batch: dict, kind: str,
               rng: jax.Array) -> TrainState:
  """A fresh train state: ``model.init`` on ``batch``'s shapes and ``tx.init`` of its parameters."""
  variables = dict(jax.jit(model.init)(rng, *model_inputs(batch, kind)))
  params = variables.pop("params")
  return TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params), variables)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, batch: dict,
                         kind: str) -> TrainState:
  """``init_state``'s result as ShapeDtypeStructs, by tracing only (nothing is compiled or computed)."""
  return jax.eval_shape(lambda key: init_state(model, tx, batch, kind, key), jax.eval_shape(jax.random.key, 0))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, kind: str,
                    axis_name: Optional[str] = None, skip_nonfinite: bool = False) -> Callable:
  """Returns the pure ``train_step(state, batch, rng) -> (state, metrics)``; dropout key = fold_in(rng, step).

  Precision is the model's: its ``dtype`` field casts parameters and inputs where they are used (a bfloat16 model
  runs its matmuls in bfloat16 on the stored parameters); the loss is computed in float32 from the logits, and the
  gradients arrive in the parameters' dtype.

  Args:
    model: the flax module.
    tx: the optax transformation (``linformer_jax.optim.make_optimizer(...).tx``).
    kind: the data kind ("mlm", "classification" or "image"), which fixes the batch keys (module docstring).
    axis_name: None under ``jax.jit`` (the batch is one global array); the mapped axis under ``jax.pmap``: each
      replica's loss is its share of the global weighted mean (sums divided by the ``psum`` of the weights) and
      loss, gradients and accuracy are ``psum``-ed, so the update equals the single-device one; new BatchNorm
      statistics are ``pmean``-ed.
    skip_nonfinite: drop an update whose loss, gradient norm or parameter norm is not finite.

  Returns:
    ``train_step``; its metrics are scalars: loss, accuracy, grad_norm, param_norm, lr and finite (bool).

  Raises:
    ValueError: a float16 model (``check_trainable_precision``).
  """
  check_trainable_precision(model)

  def loss_fn(params, state, batch, rng):
    variables = {"params": params, **state.model_state}
    logits, new_model_state = _apply(model, variables, batch, kind, True, rng)
    ce, correct, weights = _losses(logits, batch, kind)
    total = weights.sum()
    if axis_name is not None:
      total = jax.lax.psum(total, axis_name)
    denom = jnp.maximum(total, 1.0)
    return (ce * weights).sum() / denom, ((correct * weights).sum() / denom, new_model_state)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, (accuracy, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, step_rng)
    if axis_name is not None:
      loss, accuracy, grads = jax.lax.psum((loss, accuracy, grads), axis_name)
      if new_model_state:
        new_model_state = jax.lax.pmean(new_model_state, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = dict(state.model_state)
    if new_model_state:
      model_state.update(_cast(new_model_state, jnp.float32))
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    if skip_nonfinite:  # drop the whole update (params, optimizer statistics, BatchNorm statistics)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      model_state = keep(model_state, dict(state.model_state))
      param_norm = jnp.where(finite, param_norm, optax.tree.norm(state.params))
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "param_norm": param_norm,
               "lr": current_learning_rate(opt_state), "finite": finite}
    return TrainState(state.step + 1, params, opt_state, model_state), metrics

  return train_step


def make_eval_step(model: nn.Module, kind: str, axis_name: Optional[str] = None) -> Callable:
  """``eval_step(state, batch) -> sums`` of loss, correct predictions and weights (padding excluded);
  with ``axis_name`` (pmap) the sums are ``psum``-ed over replicas. Arguments as ``make_train_step``; any model
  dtype (float16 included) evaluates."""

  def eval_step(state: TrainState, batch: dict):
    variables = {"params": state.params, **state.model_state}
    logits, _ = _apply(model, variables, batch, kind, False, None)
    ce, correct, weights = _losses(logits, batch, kind)
    sums = {"loss": (ce * weights).sum(), "correct": (correct * weights).sum(), "weight": weights.sum()}
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)

  return eval_step


def eval_sums(eval_step: Callable, state: TrainState, batches: Iterable[dict]) -> dict:
  """Host-side sums of ``eval_step``'s loss, correct predictions and weights over ``batches``."""
  totals = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(state, batch))
    for key in totals:
      totals[key] += float(sums[key])
  return totals


def evaluate(eval_step: Callable, state: TrainState, dataset, batch_size: int, kind: str,
             max_batches: Optional[int] = None) -> dict:
  """Eval loss and accuracy (and perplexity for "mlm") over ``dataset``'s eval split, this process's share."""
  batches = dataset.eval_batches(batch_size, process_index=jax.process_index(), process_count=jax.process_count())
  totals = eval_sums(eval_step, state, itertools.islice(batches, max_batches))
  weight = max(totals["weight"], 1.0)
  out = {"eval_loss": totals["loss"] / weight, "eval_accuracy": totals["correct"] / weight}
  if kind == "mlm":
    out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 50.0)))
  return out
