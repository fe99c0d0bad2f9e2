"""Training: one pure jitted ``train_step(state, batch, rng) -> (state, metrics)`` and the loop
``train_and_evaluate(config, workdir)`` (flax-examples / big_vision style).

The workdir receives ``config.json``, ``metrics.jsonl`` (host 0), TensorBoard events, ``checkpoints/``
(Orbax: train state + data position + config, asynchronous, every ``checkpoint_every`` steps and at the end)
and ``plots/*.png``. Running again on a workdir with checkpoints resumes from the latest; data come from
``dataset.batch_at(step)``, a pure function of the step, so a resumed run sees exactly the batches an
uninterrupted run would.

Reliability (docs/reliability.md): every config field and input is checked before anything is compiled
(``validate_config``, dataset and model construction, batch divisibility, a checkpoint of another config, an
unwritable or full workdir); SIGTERM/SIGINT write a checkpoint of the current step and return normally
(``final["preempted"]``); unreadable checkpoints are skipped with a warning; a non-finite loss stops the run
naming the step window, or with ``skip_nonfinite_steps=True`` the bad updates are dropped and counted.
``$LINFORMER_JAX_FAULT`` (``KILL@3``, ``KILL@4:save``, ``TERM@5``, ``INT@5``) sends this process a signal after
that step (or right after that step's asynchronous checkpoint save started): the fault tests' hook.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import itertools
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import parallel as par
from linformer_jax._validate import check_bool, check_choice, check_int
from linformer_jax.data import make_dataset
from linformer_jax.metrics import MetricWriter, plot_metrics
from linformer_jax.models import LinformerClassifier, LinformerLM, create_model, list_models
from linformer_jax.optim import current_learning_rate, make_optimizer

LINFORMER_MODELS = {"linformer_lm": LinformerLM, "linformer_classifier": LinformerClassifier}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FAULT_ENV = "LINFORMER_JAX_FAULT"
FAULT_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}

# Top-level config fields train_and_evaluate reads (configs/common.py: base_config). Integer fields: (minimum,
# None allowed). A field not listed here is an error (a misspelling would otherwise be ignored silently).
INT_FIELDS = {"seed": (0, False), "total_steps": (1, False), "batch_size": (1, False), "log_every": (1, False),
              "eval_every": (1, False), "checkpoint_every": (1, False), "keep_checkpoints": (1, False),
              "eval_batch_size": (1, True), "eval_max_batches": (1, True)}
BOOL_FIELDS = ("compilation_cache", "tensorboard", "skip_nonfinite_steps", "plots")
OTHER_FIELDS = ("compute_dtype", "compilation_cache_dir", "init_from", "parallel", "mesh", "data", "optimizer",
                "model")
REQUIRED_FIELDS = ("seed", "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "data",
                   "optimizer", "model")
CONFIG_FIELDS = tuple(INT_FIELDS) + BOOL_FIELDS + OTHER_FIELDS
PARALLEL_MODES = ("jit", "pmap")


def _unknown_field_error(kind: str, name: str, allowed) -> ValueError:
  close = difflib.get_close_matches(name, list(allowed), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ValueError(f"unknown {kind} field {name!r}{hint}; allowed fields: {', '.join(sorted(allowed))}.")


def validate_config(config) -> None:
  """Checks the top-level training fields (names, types, ranges, choices) before anything is loaded or
  compiled; the data, model and optimizer sections are checked by their own constructors."""
  for name in config:
    if name not in CONFIG_FIELDS:
      raise _unknown_field_error("config", name, CONFIG_FIELDS)
  for name in REQUIRED_FIELDS:
    if name not in config:
      raise ValueError(f"the config has no field {name!r}; required fields: {', '.join(REQUIRED_FIELDS)}.")
  for name, (minimum, allow_none) in INT_FIELDS.items():
    if name in config:
      check_int(name, config[name], minimum=minimum, allow_none=allow_none)
  for name in BOOL_FIELDS:
    if name in config:
      check_bool(name, config[name])
  check_choice("compute_dtype", config.get("compute_dtype", "float32"), COMPUTE_DTYPES)
  check_choice("parallel", config.get("parallel", "jit"), PARALLEL_MODES)
  if "name" not in config.model:
    raise ValueError("model.name is missing; allowed: 'linformer_lm', 'linformer_classifier' or a registry "
                     "name (linformer_jax.models.list_models()).")
  init_from = config.get("init_from")
  if init_from and not os.path.isdir(os.path.expanduser(str(init_from))):
    raise FileNotFoundError(f"init_from={str(init_from)!r} is not a directory; it must be an Orbax checkpoint "
                            "written by `python -m linformer_jax.convert`.")


def parse_fault(value: Optional[str]) -> Optional[tuple[int, int, str]]:
  """``$LINFORMER_JAX_FAULT`` → (signal, step, point) or None. ``SIGNAL@STEP`` sends SIGNAL (KILL, TERM, INT)
  to this process once step STEP has been dispatched; ``SIGNAL@STEP:save`` right after the asynchronous save of
  the checkpoint of step STEP started (while it is being written)."""
  if not value:
    return None
  sig, _, rest = value.partition("@")
  step, _, point = rest.partition(":")
  if sig not in FAULT_SIGNALS or not step.isdigit() or int(step) < 1 or point not in ("", "save"):
    raise ValueError(f"{FAULT_ENV}={value!r} is not supported; allowed: SIGNAL@STEP or SIGNAL@STEP:save with "
                     f"SIGNAL one of {', '.join(FAULT_SIGNALS)} and STEP >= 1 (e.g. KILL@3, KILL@4:save, TERM@5).")
  return FAULT_SIGNALS[sig], int(step), point or "step"


class StopRequest:
  """SIGTERM/SIGINT handler for the training loop: the first signal sets ``signum`` (the loop then writes a
  checkpoint of the current step and returns); a second one gets the previous behaviour (exit /
  KeyboardInterrupt). Only installed in the main thread; ``restore()`` puts the previous handlers back."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: dict = {}

  def install(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # asked twice: stop waiting for the checkpoint
      self.restore()
      signal.raise_signal(signum)
      return
    self.signum = signum

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous.clear()


def _prepare_workdir(workdir: pathlib.Path) -> None:
  """Creates ``workdir`` and writes a probe file into it: an unwritable workdir fails now, not at the first
  checkpoint."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe.{uuid.uuid4().hex}"  # unique per process, also on a shared file system
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    probe.unlink(missing_ok=True)
  except OSError as err:
    raise type(err)(err.errno, f"workdir={str(workdir)!r} is not writable ({err.strerror or err}); checkpoints, "
                    "metrics and config.json go there: pick a writable --workdir.") from None


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _check_disk_space(workdir: pathlib.Path, abstract_state) -> None:
  """OSError(ENOSPC) unless the workdir's file system has room for two checkpoints (one being written while the
  previous one is kept) plus 16 MiB."""
  state_bytes = _tree_bytes(abstract_state)
  need = 2 * state_bytes + (16 << 20)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise OSError(errno.ENOSPC, f"not enough free disk space in workdir={str(workdir)!r}: {free / 2**20:.1f} MiB "
                  f"free, a checkpoint takes {state_bytes / 2**20:.1f} MiB and a run needs at least "
                  f"{need / 2**20:.1f} MiB; free some space or pick another --workdir.")


def _check_model_fits_data(model: nn.Module, info: dict, model_config) -> None:
  """Image sizes vs the model's patch size, checked before tracing (the model itself checks at call time)."""
  patch = getattr(model, "patch_size", None)
  if info["kind"] == "image" and patch:
    h, w = info["image_shape"][:2]
    if h % patch or w % patch:
      raise ValueError(f"data.image_size={h} is not divisible by the patch size {patch} of "
                       f"model.name={model_config.name!r}; allowed: multiples of {patch}.")


def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_diff_hint(config_json: str) -> Callable[[dict], str]:
  """For a checkpoint-mismatch message: the model/optimizer fields that differ from the checkpoint's config."""
  now = json.loads(config_json)

  def hint(meta: dict) -> str:
    then = meta.get("config") or {}
    diffs = []
    for section in ("model", "optimizer"):
      a, b = _flat(then.get(section)), _flat(now.get(section))
      for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
          diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    return ("Config fields that differ: " + "; ".join(diffs[:8]) + ".") if diffs else ""

  return hint


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params; opt_state; model_state: the other variable collections
  (e.g. "batch_stats", "constants" — the fixed Linformer projection)."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any


def build_model(model_config, info: dict) -> nn.Module:
  """``model.name`` "linformer_lm" | "linformer_classifier" | a registry name (``list_models()``); the other
  ``model`` fields are the module's fields. Vocabulary, length and class count come from the dataset."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  registered = list_models()
  if name not in LINFORMER_MODELS and name not in registered:
    close = difflib.get_close_matches(str(name), list(LINFORMER_MODELS) + registered, n=6, cutoff=0.6)
    raise ValueError(f"model.name={name!r} is not supported; allowed values: {', '.join(map(repr, LINFORMER_MODELS))} "
                     f"or a registered image model (linformer_jax.models.list_models(), e.g. "
                     f"{', '.join(map(repr, close or registered[:3]))}).")
  wanted_kind = {"linformer_lm": "mlm", "linformer_classifier": "classification"}.get(name, "image")
  if info.get("kind") != wanted_kind:
    raise ValueError(f"model.name={name!r} needs {wanted_kind!r} data, but the dataset gives {info.get('kind')!r} "
                     "data; pick a model for this data.name.")
  if name in LINFORMER_MODELS:
    cls = LINFORMER_MODELS[name]
    from_data = {"vocab_size", "max_len"} | ({"num_classes"} if name == "linformer_classifier" else set())
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - from_data
    for key in kwargs:
      if key in from_data:
        raise ValueError(f"model.{key} is set from the dataset ({key}={info.get(key)!r}); remove it from the "
                         "model config.")
      if key not in fields:
        raise _unknown_field_error(f"model (name={name!r})", key, fields)
  if name == "linformer_lm":
    return LinformerLM(vocab_size=info["vocab_size"], max_len=info["max_len"], **kwargs)
  if name == "linformer_classifier":
    return LinformerClassifier(num_classes=info["num_classes"], vocab_size=info["vocab_size"],
                               max_len=info["max_len"], **kwargs)
  return create_model(name, num_classes=info["num_classes"], **kwargs)


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, kind: str,
                    compute_dtype=jnp.float32, axis_name: Optional[str] = None,
                    skip_nonfinite: bool = False) -> Callable:
  """Returns the pure ``train_step(state, batch, rng) -> (state, metrics)``; dropout key = fold_in(rng, step).

  compute_dtype: bfloat16 runs the forward/backward pass with bf16 copies of the float32 params.
  axis_name: None under ``jax.jit`` (the batch is one global array); the mapped axis under ``jax.pmap``: each
    replica's loss is its share of the global weighted mean (sums divided by the ``psum`` of the weights) and
    loss, gradients and accuracy are ``psum``-ed, so the update equals the single-device one; new BatchNorm
    statistics are ``pmean``-ed.
  """

  def loss_fn(params, state, batch, rng):
    variables = {"params": _cast(params, compute_dtype), **state.model_state}
    logits, new_model_state = _apply(model, variables, _cast(batch, compute_dtype), kind, True, rng)
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


def make_eval_step(model: nn.Module, kind: str, compute_dtype=jnp.float32,
                   axis_name: Optional[str] = None) -> Callable:
  """``eval_step(state, batch) -> sums`` of loss, correct predictions and weights (padding excluded);
  with ``axis_name`` (pmap) the sums are ``psum``-ed over replicas."""

  def eval_step(state: TrainState, batch: dict):
    variables = {"params": _cast(state.params, compute_dtype), **state.model_state}
    logits, _ = _apply(model, variables, _cast(batch, compute_dtype), kind, False, None)
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
  batches = dataset.eval_batches(batch_size, process_index=jax.process_index(), process_count=jax.process_count())
  totals = eval_sums(eval_step, state, itertools.islice(batches, max_batches))
  weight = max(totals["weight"], 1.0)
  out = {"eval_loss": totals["loss"] / weight, "eval_accuracy": totals["correct"] / weight}
  if kind == "mlm":
    out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 50.0)))
  return out


def _enable_compilation_cache(config) -> None:
  directory = config.get("compilation_cache_dir") or os.path.join(
      os.path.expanduser("~"), ".cache", "linformer_jax", "jax_cache")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _init_from(state: TrainState, path: str) -> TrainState:
  """Starts from converted weights (``python -m linformer_jax.convert xcit``): every variable whose path and
  shape match is taken; a classifier head of another size keeps its fresh initialisation."""
  from linformer_jax.convert.xcit import restore_xcit_checkpoint
  _, loaded = restore_xcit_checkpoint(path)
  flat_loaded = flax.traverse_util.flatten_dict({"params": loaded.get("params", {}),
                                                 **{k: v for k, v in loaded.items() if k != "params"}})

  def take(collection_tree, collection):
    flat = flax.traverse_util.flatten_dict(collection_tree)
    for key, value in flat.items():
      src = flat_loaded.get((collection,) + key)
      if src is not None and src.shape == value.shape:
        flat[key] = jnp.asarray(src, value.dtype)
    return flax.traverse_util.unflatten_dict(flat)

  model_state = {c: take(v, c) for c, v in state.model_state.items()}
  return state.replace(params=take(state.params, "params"), model_state=model_state)


def _host_batch(dataset, step: int, batch_size: int) -> dict:
  return dataset.batch_at(step, batch_size, process_index=jax.process_index(),
                          process_count=jax.process_count())


def init_state(model: nn.Module, tx, batch: dict, kind: str, rng: jax.Array) -> TrainState:
  inputs = (batch["image"],) if kind == "image" else (batch["inputs"], batch["mask"])
  variables = jax.jit(model.init)(rng, *inputs)
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params), variables)


def abstract_train_state(model: nn.Module, tx, batch: dict, kind: str) -> TrainState:
  """``init_state``'s result as ShapeDtypeStructs, by tracing only (nothing is compiled or computed)."""
  return jax.eval_shape(lambda key: init_state(model, tx, batch, kind, key), jax.eval_shape(jax.random.key, 0))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest readable checkpoint) and returns the final
  metrics (last eval row plus ``baseline_*`` entries: majority-class accuracy or unigram perplexity).

  Bad config values, data paths, a checkpoint of another config or an unwritable workdir raise ValueError /
  TypeError / OSError before anything is compiled. After SIGTERM/SIGINT the checkpoint of the current step is
  written and ``{"step": ..., "preempted": True, "signal": ...}`` returned (no final evaluation); running the
  same call again continues. A non-finite loss raises FloatingPointError naming the steps since the last check,
  without saving the bad state, unless ``skip_nonfinite_steps`` (then the update is skipped and counted in
  ``nonfinite_skipped``).
  """
  validate_config(config)
  fault = parse_fault(os.environ.get(FAULT_ENV))
  workdir = pathlib.Path(workdir)
  _prepare_workdir(workdir)
  skip_nonfinite = config.get("skip_nonfinite_steps", False)
  dataset = make_dataset(config.data, str(workdir))
  info = dataset.info
  kind = info["kind"]
  model = build_model(config.model, info)
  _check_model_fits_data(model, info, config.model)
  optimizer = make_optimizer(config.optimizer, config.total_steps)
  compute_dtype = COMPUTE_DTYPES[config.get("compute_dtype", "float32")]

  eval_batch_size = config.get("eval_batch_size") or config.batch_size
  parallel = config.get("parallel", "jit")
  mesh_config = config.get("mesh", None)
  if parallel == "jit":
    mesh = par.make_mesh(mesh_config)
    n_data = par.data_parallel_size(mesh)
  else:
    pmap_devices = par.pmap_devices(mesh_config)
    n_data = len(pmap_devices) * jax.process_count()
  par.check_global_batch(config.batch_size, n_data, "batch_size")
  par.check_global_batch(eval_batch_size, n_data, "eval_batch_size")

  # Shapes of the whole train state by tracing only (nothing compiled yet): disk space and a checkpoint of
  # another model/optimizer config are reported now.
  first_batch = _host_batch(dataset, 0, config.batch_size)
  abstract_state = abstract_train_state(model, optimizer.tx, first_batch, kind)
  _check_disk_space(workdir, abstract_state)
  config_json = config.to_json_best_effort(indent=1)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
  try:
    mismatch_hint = _config_diff_hint(config_json)
    checkpointer.check_compatible(abstract_state, hint=mismatch_hint)
  except BaseException:
    checkpointer.close()
    raise

  if config.get("compilation_cache", True):
    _enable_compilation_cache(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state = init_state(model, optimizer.tx, first_batch, kind, init_rng)
  if not checkpointer.all_steps() and config.get("init_from"):
    state = _init_from(state, config.init_from)
  if parallel == "jit":  # fresh global buffers from host copies (safe to donate), restored sharded
    state_sh = par.state_shardings(state, mesh)
    batch_sh, repl = par.batch_sharding(mesh), par.replicated(mesh)
    state = par.put_global(state, state_sh)
  try:
    restored = checkpointer.restore_latest(state, hint=mismatch_hint)
  except BaseException:
    checkpointer.close()
    raise
  start, skipped_before = 0, 0
  if restored is not None:
    start, state, meta = restored
    skipped_before = int(meta.get("nonfinite_skipped", 0))
    if meta.get("data_step", start) != start:
      checkpointer.close()
      raise ValueError(f"checkpoint {start} records data position {meta['data_step']}, expected {start}.")

  step_model = model
  if parallel == "pmap" and getattr(model, "bn_axis_name", "") is None:
    step_model = model.clone(bn_axis_name="batch")  # cross-replica BatchNorm statistics (SyncBatchNorm)
  train_fn = make_train_step(step_model, optimizer.tx, kind, compute_dtype,
                             axis_name="batch" if parallel == "pmap" else None, skip_nonfinite=skip_nonfinite)
  eval_fn = make_eval_step(model, kind, compute_dtype, axis_name="batch" if parallel == "pmap" else None)
  if parallel == "jit":
    jit_train = jax.jit(train_fn, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                        donate_argnums=(0,))
    jit_eval = jax.jit(eval_fn, in_shardings=(state_sh, batch_sh), out_shardings=repl)
    train_rng = jax.jit(lambda: jax.random.split(jax.random.key(config.seed))[1], out_shardings=repl)()

    def train_step(state, host_batch, rng):
      return jit_train(state, par.shard_batch(host_batch, batch_sh), rng)

    def eval_step(state, host_batch):
      return jit_eval(state, par.shard_batch(host_batch, batch_sh))

    saved_view = lambda s: s  # noqa: E731
  else:
    state = par.replicate(state, pmap_devices)
    pmap_train = jax.pmap(train_fn, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,),
                          devices=pmap_devices)
    pmap_eval = jax.pmap(eval_fn, axis_name="batch", devices=pmap_devices)

    def train_step(state, host_batch, rng):
      state, metrics = pmap_train(state, par.split_for_pmap(host_batch, pmap_devices), rng)
      return state, par.unreplicate(metrics)

    def eval_step(state, host_batch):
      return par.unreplicate(pmap_eval(state, par.split_for_pmap(host_batch, pmap_devices)))

    saved_view = par.unreplicate  # checkpoints hold one copy of the state

  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config_json)
  writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
  tokens_per_example = info.get("max_len") or 0

  from tqdm.auto import tqdm
  progress = tqdm(total=config.total_steps, initial=start, disable=not sys.stderr.isatty(),
                  dynamic_ncols=True, desc="train")
  all_finite = jnp.array(True)
  skipped = jnp.array(skipped_before, jnp.int32)
  skipped_host = skipped_before
  last_log_step, last_log_time, checked_step = start, time.perf_counter(), start
  final, pending = {}, {}
  preempted = None
  stop = StopRequest().install()
  t_start = time.perf_counter()

  def check_finite(done, values):
    if not skip_nonfinite and not bool(values["all_finite"]):
      checkpointer.wait()
      last_good = checkpointer.latest_step()
      raise FloatingPointError(
          f"non-finite loss, gradients or parameters within steps {checked_step + 1}..{done}; "
          f"the last good checkpoint is step {last_good} in {checkpointer.directory} (nothing after step "
          f"{checked_step} was saved). Lower the learning rate, or set skip_nonfinite_steps=True to skip such "
          "updates.")

  def save(done):
    checkpointer.save(done, saved_view(state), {"step": done, "data_step": done, "nonfinite_skipped": skipped_host,
                                                "config": json.loads(config_json)})
    if fault and fault[1] == done and fault[2] == "save":
      signal.raise_signal(fault[0])  # synchronous in this thread: deterministic

  try:
    for step in range(start, config.total_steps):
      batch = _host_batch(dataset, step, config.batch_size)
      state, metrics = train_step(state, batch, train_rng)
      all_finite = all_finite & metrics["finite"]
      if skip_nonfinite:
        skipped = skipped + (~metrics["finite"]).astype(jnp.int32)
      done = step + 1
      if fault and fault[1] == done and fault[2] == "step":
        checkpointer.wait()  # deterministic: every earlier checkpoint is committed when the signal comes
        signal.raise_signal(fault[0])
      stopping = _stop_requested(stop, done, config)
      row = {}
      if step == start:  # compilation (or a persistent-cache hit) + the first step
        jax.block_until_ready(state.params)
        pending["time_to_first_step_s"] = time.perf_counter() - t_start
        last_log_time = time.perf_counter()
      is_last = done == config.total_steps
      is_checkpoint = done % config.checkpoint_every == 0 or is_last or stopping
      if done % config.log_every == 0 or is_last or is_checkpoint:
        values = jax.device_get({**metrics, "all_finite": all_finite, "skipped": skipped})
        check_finite(done, values)
        checked_step = done
        skipped_host = int(values["skipped"])
        if done % config.log_every == 0 or is_last:
          now = time.perf_counter()
          steps_per_s = (done - last_log_step) / max(now - last_log_time, 1e-9)
          last_log_step, last_log_time = done, now
          row.update({k: float(values[k]) for k in ("loss", "accuracy", "grad_norm", "param_norm", "lr")})
          row["steps_per_s"] = steps_per_s
          throughput = "images_per_s" if kind == "image" else "tokens_per_s"
          row[throughput] = steps_per_s * config.batch_size * (1 if kind == "image" else tokens_per_example)
          if skip_nonfinite:
            row["nonfinite_skipped"] = skipped_host
          row.update(pending)
          pending = {}
          progress.set_postfix({"loss": f"{row['loss']:.4f}", throughput: f"{row[throughput]:.0f}"})
      if (done % config.eval_every == 0 or is_last) and not stopping:
        final = evaluate(eval_step, state, dataset, eval_batch_size, kind, config.get("eval_max_batches"))
        row.update(final)
      if row:
        writer.write(done, row)
      if is_checkpoint:
        save(done)
      progress.update(1)
      if stopping:
        checkpointer.wait()
        preempted = {"step": done, "preempted": True, "signal": signal.Signals(stop.signum).name,
                     "checkpoint": os.path.join(checkpointer.directory, str(done))}
        break
    if not final and preempted is None:  # the workdir already holds the final checkpoint: just evaluate
      final = evaluate(eval_step, state, dataset, eval_batch_size, kind, config.get("eval_max_batches"))
  finally:
    stop.restore()
    progress.close()
    checkpointer.close()
    writer.close()
  if preempted is not None:
    return preempted
  if jax.process_index() == 0 and config.get("plots", True):
    plot_metrics(workdir)
  if kind == "mlm":
    final["baseline_unigram_perplexity"] = info.get("unigram_perplexity")
  else:
    final["baseline_majority_accuracy"] = info.get("majority_accuracy")
    if info.get("outer_operator_accuracy") is not None:
      final["baseline_outer_operator_accuracy"] = info["outer_operator_accuracy"]
  if skip_nonfinite:
    final["nonfinite_skipped"] = skipped_host
  final["step"] = int(jax.device_get(saved_view(state).step))
  return final


def _stop_requested(stop: StopRequest, done: int, config) -> bool:
  """Whether a SIGTERM/SIGINT arrived. Multi-process runs agree on it (any process signalled) at log and
  checkpoint steps, so all of them write the same checkpoint; single-process runs react after any step."""
  if jax.process_count() == 1:
    return stop.signum is not None
  if done % config.log_every and done % config.checkpoint_every:
    return False
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.int32(stop.signum is not None))
  if stop.signum is None and np.any(flags):
    stop.signum = int(signal.SIGTERM)
  return bool(np.any(flags))
