"""Training: one pure jitted ``train_step(state, batch, rng) -> (state, metrics)`` and the loop
``train_and_evaluate(config, workdir)`` (flax-examples / big_vision style).

The workdir receives ``config.json``, ``metrics.jsonl`` (host 0), TensorBoard events, ``checkpoints/``
(Orbax: train state + data position + config, asynchronous, every ``checkpoint_every`` steps and at the end)
and ``plots/*.png``. Running again on a workdir with checkpoints resumes from the latest; data come from
``dataset.batch_at(step)``, a pure function of the step, so a resumed run sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import parallel as par
from linformer_jax.data import make_dataset
from linformer_jax.metrics import MetricWriter, plot_metrics
from linformer_jax.models import LinformerClassifier, LinformerLM, create_model
from linformer_jax.optim import current_learning_rate, make_optimizer

LINFORMER_MODELS = {"linformer_lm": LinformerLM, "linformer_classifier": LinformerClassifier}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
                    compute_dtype=jnp.float32, axis_name: Optional[str] = None) -> Callable:
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
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(params), "lr": current_learning_rate(opt_state)}
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(metrics["param_norm"])
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


def evaluate(eval_step: Callable, state: TrainState, dataset, batch_size: int, kind: str,
             max_batches: Optional[int] = None) -> dict:
  totals = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
  for i, batch in enumerate(dataset.eval_batches(batch_size, process_index=jax.process_index(),
                                                 process_count=jax.process_count())):
    if max_batches is not None and i >= max_batches:
      break
    sums = jax.device_get(eval_step(state, batch))
    for key in totals:
      totals[key] += float(sums[key])
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final metrics
  (last eval row plus ``baseline_*`` entries: majority-class accuracy or unigram perplexity)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.get("compilation_cache", True):
    _enable_compilation_cache(config)
  dataset = make_dataset(config.data, str(workdir))
  info = dataset.info
  kind = info["kind"]
  model = build_model(config.model, info)
  optimizer = make_optimizer(config.optimizer, config.total_steps)
  compute_dtype = COMPUTE_DTYPES[config.get("compute_dtype", "float32")]

  eval_batch_size = config.get("eval_batch_size") or config.batch_size
  parallel = config.get("parallel", "jit")
  mesh_config = config.get("mesh", None)
  if parallel == "jit":
    mesh = par.make_mesh(mesh_config)
    n_data = par.data_parallel_size(mesh)
  elif parallel == "pmap":
    pmap_devices = par.pmap_devices(mesh_config)
    n_data = len(pmap_devices) * jax.process_count()
  else:
    raise ValueError(f"parallel={parallel!r} is not supported; allowed values: 'jit', 'pmap'.")
  par.check_global_batch(config.batch_size, n_data, "batch_size")
  par.check_global_batch(eval_batch_size, n_data, "eval_batch_size")

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state = init_state(model, optimizer.tx, _host_batch(dataset, 0, config.batch_size), kind, init_rng)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
  start = checkpointer.latest_step() or 0
  if not start and config.get("init_from"):
    state = _init_from(state, config.init_from)
  if parallel == "jit":  # fresh global buffers from host copies (safe to donate), restored sharded
    state_sh = par.state_shardings(state, mesh)
    batch_sh, repl = par.batch_sharding(mesh), par.replicated(mesh)
    state = par.put_global(state, state_sh)
  if start:
    state, meta = checkpointer.restore(start, state)
    if meta.get("data_step", start) != start:
      raise ValueError(f"checkpoint {start} records data position {meta['data_step']}, expected {start}.")

  step_model = model
  if parallel == "pmap" and getattr(model, "bn_axis_name", "") is None:
    step_model = model.clone(bn_axis_name="batch")  # cross-replica BatchNorm statistics (SyncBatchNorm)
  train_fn = make_train_step(step_model, optimizer.tx, kind, compute_dtype,
                             axis_name="batch" if parallel == "pmap" else None)
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

  config_json = config.to_json_best_effort(indent=1)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config_json)
  writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
  tokens_per_example = info.get("max_len") or 0

  from tqdm.auto import tqdm
  progress = tqdm(total=config.total_steps, initial=start, disable=not sys.stderr.isatty(),
                  dynamic_ncols=True, desc="train")
  all_finite = jnp.array(True)
  last_log_step, last_log_time, checked_step = start, time.perf_counter(), start
  final, pending = {}, {}
  t_start = time.perf_counter()
  try:
    for step in range(start, config.total_steps):
      batch = _host_batch(dataset, step, config.batch_size)
      state, metrics = train_step(state, batch, train_rng)
      all_finite = all_finite & metrics["finite"]
      done = step + 1
      row = {}
      if step == start:  # compilation (or a persistent-cache hit) + the first step
        jax.block_until_ready(state.params)
        pending["time_to_first_step_s"] = time.perf_counter() - t_start
        last_log_time = time.perf_counter()
      is_last = done == config.total_steps
      if done % config.log_every == 0 or is_last or done % config.checkpoint_every == 0:
        values = jax.device_get({**metrics, "all_finite": all_finite})
        if not bool(values["all_finite"]):
          checkpointer.wait()
          last_good = checkpointer.latest_step()
          raise FloatingPointError(
              f"non-finite loss, gradients or parameters within steps {checked_step + 1}..{done}; "
              f"the last good checkpoint is step {last_good} in {checkpointer.directory}.")
        checked_step = done
        if done % config.log_every == 0 or is_last:
          now = time.perf_counter()
          steps_per_s = (done - last_log_step) / max(now - last_log_time, 1e-9)
          last_log_step, last_log_time = done, now
          row.update({k: float(values[k]) for k in ("loss", "accuracy", "grad_norm", "param_norm", "lr")})
          row["steps_per_s"] = steps_per_s
          throughput = "images_per_s" if kind == "image" else "tokens_per_s"
          row[throughput] = steps_per_s * config.batch_size * (1 if kind == "image" else tokens_per_example)
          row.update(pending)
          pending = {}
          progress.set_postfix({"loss": f"{row['loss']:.4f}", throughput: f"{row[throughput]:.0f}"})
      if done % config.eval_every == 0 or is_last:
        final = evaluate(eval_step, state, dataset, eval_batch_size, kind, config.get("eval_max_batches"))
        row.update(final)
      if row:
        writer.write(done, row)
      if done % config.checkpoint_every == 0 or is_last:
        checkpointer.save(done, saved_view(state), {"step": done, "data_step": done, "config": json.loads(config_json)})
      progress.update(1)
    if not final:  # nothing left to train (the workdir already holds the final checkpoint): just evaluate
      final = evaluate(eval_step, state, dataset, eval_batch_size, kind, config.get("eval_max_batches"))
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
  if jax.process_index() == 0:
    plot_metrics(workdir)
  if kind == "mlm":
    final["baseline_unigram_perplexity"] = info.get("unigram_perplexity")
  else:
    final["baseline_majority_accuracy"] = info.get("majority_accuracy")
  final["step"] = int(jax.device_get(saved_view(state).step))
  return final
