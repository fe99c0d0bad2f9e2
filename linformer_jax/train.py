"""The training loop ``train_and_evaluate(config, workdir)`` (flax-examples / big_vision style).

It compiles the pure ``train_step(state, batch, rng) -> (state, metrics)`` of ``linformer_jax.steps`` once, through
the run's ``linformer_jax.parallel.DataParallel``, and runs it. The workdir receives ``config.json``,
``dataset_info.json`` (the dataset's info: ``linformer_jax.runs.load_model`` rebuilds the model from these two),
``metrics.jsonl`` (host 0), TensorBoard events, ``checkpoints/`` (Orbax: train state + data position + config,
asynchronous, every ``checkpoint_every`` steps and at the end) and ``plots/*.png``. Running again on a workdir with
checkpoints resumes from the latest; data come from ``dataset.batch_at(step)``, a pure function of the step, so a
resumed run sees exactly the batches an uninterrupted run would.

Reliability (docs/reliability.md): every config field and input is checked before anything is compiled
(``run_config.RunConfig``, dataset and model construction, batch divisibility, a checkpoint of another config, an
unwritable or full workdir: ``linformer_jax.workdir``); SIGTERM/SIGINT write a checkpoint of the current step and
return normally (``final["preempted"]``, ``linformer_jax.preemption``); unreadable checkpoints are skipped with a
warning; a non-finite loss stops the run naming the step window, or with ``skip_nonfinite_steps=True`` the bad
updates are dropped and counted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import parallel as par
from linformer_jax.data import make_dataset
from linformer_jax.metrics import MetricWriter, plot_metrics
from linformer_jax.optim import make_optimizer
from linformer_jax.preemption import FaultHook, StopRequest
from linformer_jax.runs import write_dataset_info
from linformer_jax.run_config import RunConfig, config_diff_hint, config_to_json
from linformer_jax.steps import (TrainState, abstract_train_state, build_model, check_trainable_precision, evaluate,
                                 init_state, make_eval_step, make_train_step)
from linformer_jax.workdir import check_disk_space, enable_compilation_cache, prepare_workdir


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built by ``_start`` before the first step."""
  config: RunConfig
  workdir: pathlib.Path
  dataset: Any
  kind: str
  dp: par.DataParallel
  checkpointer: ckpt_lib.Checkpointer
  config_json: str
  state: TrainState
  rng: jax.Array
  start: int = 0
  skipped_before: int = 0

  def host_batch(self, step: int) -> dict:
    return self.dataset.batch_at(step, self.config.batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count())

  def evaluate(self) -> dict:
    return evaluate(self.dp.eval_step, self.state, self.dataset, self.config.eval_batch, self.kind,
                    self.config.eval_max_batches)


def _check_model_fits_data(model, info: dict, model_name: str) -> None:
  """Image sizes vs the model's patch size, and a causal-LM objective vs the model's causality, checked before
  tracing (the model itself checks shapes at call time)."""
  if info.get("objective") == "causal" and not getattr(model, "causal", False):
    raise ValueError(f"data.objective='causal' scores each position on the next byte, which a model without "
                     f"causal=True reads at its next position; set model.causal=True (model.name={model_name!r}).")
  patch = getattr(model, "patch_size", None)
  if info["kind"] == "image" and patch:
    h, w = info["image_shape"][:2]
    if h % patch or w % patch:
      raise ValueError(f"data.image_size={h} is not divisible by the patch size {patch} of "
                       f"model.name={model_name!r}; allowed: multiples of {patch}.")


def _start(run: RunConfig, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> _Run:
  """Checks everything, builds the model, state and compiled steps, and restores the latest checkpoint."""
  prepare_workdir(workdir)
  dataset = make_dataset(run.data, str(workdir))
  info = dataset.info
  kind = info["kind"]
  model = build_model(run.model, info)
  check_trainable_precision(model)  # float16 needs loss scaling: refused before anything is traced
  _check_model_fits_data(model, info, run.model.name)
  dp = par.create_data_parallel(run.parallel, run.mesh)
  dp.check_batch(run.batch_size, "batch_size")
  dp.check_batch(run.eval_batch, "eval_batch_size")
  optimizer = make_optimizer(run.optimizer, run.total_steps)  # evaluates the schedule at step 0 (a tiny compile)

  # Shapes of the whole train state by tracing only (nothing compiled yet): disk space and a checkpoint of
  # another model/optimizer config are reported now.
  first_batch = dataset.batch_at(0, run.batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  abstract_state = abstract_train_state(model, optimizer.tx, first_batch, kind)
  check_disk_space(workdir, abstract_state)
  config_json = config_to_json(config, indent=1)  # a callable (optimizer.schedule) as its name
  mismatch_hint = config_diff_hint(config_json)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=run.keep_checkpoints)
  try:
    checkpointer.check_compatible(abstract_state, hint=mismatch_hint)
    if run.compilation_cache:
      enable_compilation_cache(run.compilation_cache_dir)
    init_rng = jax.random.split(jax.random.key(run.seed))[0]
    state = init_state(model, optimizer.tx, first_batch, kind, init_rng)
    if not checkpointer.all_steps() and run.init_from:
      variables = ckpt_lib.take_matching({"params": state.params, **state.model_state},
                                         ckpt_lib.restore_variables(run.init_from))
      state = state.replace(params=variables.pop("params"), model_state=variables)
    state = dp.restore_target(state)
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
  state = dp.place(state)
  dp.compile(make_train_step(dp.step_model(model), optimizer.tx, kind, axis_name=dp.axis_name,
                             skip_nonfinite=run.skip_nonfinite_steps),
             make_eval_step(model, kind, axis_name=dp.axis_name), state)
  train_rng = dp.make_rng(lambda: jax.random.split(jax.random.key(run.seed))[1])
  return _Run(run, workdir, dataset, kind, dp, checkpointer, config_json, state, train_rng, start, skipped_before)


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
  run_config = RunConfig.from_config(config)  # field names, types and ranges before the environment is read
  fault = FaultHook.from_env()
  run = _start(run_config, config, pathlib.Path(workdir))
  if jax.process_index() == 0:
    (run.workdir / "config.json").write_text(run.config_json)
    write_dataset_info(run.workdir, run.dataset.info)  # the data-derived model fields, for runs.load_model
  writer = MetricWriter(run.workdir, tensorboard=run.config.tensorboard)
  stop = StopRequest().install()
  try:
    final, skipped, preempted = _loop(run, writer, stop, fault)
  finally:
    stop.restore()
    run.checkpointer.close()
    writer.close()
  if preempted is not None:
    return preempted
  info = run.dataset.info
  if jax.process_index() == 0 and run.config.plots:
    plot_metrics(run.workdir)
  if run.kind == "mlm":
    final["baseline_unigram_perplexity"] = info.get("unigram_perplexity")
  else:
    final["baseline_majority_accuracy"] = info.get("majority_accuracy")
    if info.get("outer_operator_accuracy") is not None:
      final["baseline_outer_operator_accuracy"] = info["outer_operator_accuracy"]
  if run.config.skip_nonfinite_steps:
    final["nonfinite_skipped"] = skipped
  final["step"] = int(jax.device_get(run.dp.saved_view(run.state).step))
  return final


class _Log:
  """The host side of logging: progress bar, throughput and the finite-check window."""

  def __init__(self, run: _Run):
    from tqdm.auto import tqdm
    c = run.config
    self.run = run
    self.progress = tqdm(total=c.total_steps, initial=run.start, disable=not sys.stderr.isatty(),
                         dynamic_ncols=True, desc="train")
    self.throughput = "images_per_s" if run.kind == "image" else "tokens_per_s"
    self.per_step = c.batch_size * (1 if run.kind == "image" else (run.dataset.info.get("max_len") or 0))
    self.last_step, self.last_time, self.checked_step = run.start, time.perf_counter(), run.start
    self.skipped = run.skipped_before
    self.pending: dict = {}

  def check(self, done: int, values: dict) -> None:
    """Raises FloatingPointError for a non-finite value since the last check (unless bad steps are skipped)."""
    if not self.run.config.skip_nonfinite_steps and not bool(values["all_finite"]):
      checkpointer = self.run.checkpointer
      checkpointer.wait()
      raise FloatingPointError(
          f"non-finite loss, gradients or parameters within steps {self.checked_step + 1}..{done}; "
          f"the last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory} (nothing "
          f"after step {self.checked_step} was saved). Lower the learning rate, or set skip_nonfinite_steps=True "
          "to skip such updates.")
    self.checked_step = done
    self.skipped = int(values["skipped"])

  def row(self, done: int, values: dict) -> dict:
    now = time.perf_counter()
    steps_per_s = (done - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = done, now
    row = {k: float(values[k]) for k in ("loss", "accuracy", "grad_norm", "param_norm", "lr")}
    row["steps_per_s"] = steps_per_s
    row[self.throughput] = steps_per_s * self.per_step
    if self.run.config.skip_nonfinite_steps:
      row["nonfinite_skipped"] = self.skipped
    row.update(self.pending)
    self.pending = {}
    self.progress.set_postfix({"loss": f"{row['loss']:.4f}", self.throughput: f"{row[self.throughput]:.0f}"})
    return row


def _loop(run: _Run, writer: MetricWriter, stop: StopRequest, fault: FaultHook
          ) -> tuple[dict, int, Optional[dict]]:
  """Steps from ``run.start`` to ``total_steps`` → (final eval metrics, skipped updates, preemption record)."""
  c = run.config
  log = _Log(run)
  all_finite = jnp.array(True)
  skipped = jnp.array(run.skipped_before, jnp.int32)
  final, preempted = {}, None
  t_start = time.perf_counter()
  try:
    for step in range(run.start, c.total_steps):
      run.state, metrics = run.dp.train_step(run.state, run.host_batch(step), run.rng)
      all_finite = all_finite & metrics["finite"]
      if c.skip_nonfinite_steps:
        skipped = skipped + (~metrics["finite"]).astype(jnp.int32)
      done = step + 1
      fault.after_step(done, run.checkpointer.wait)
      stopping = stop.requested(done, c.log_every, c.checkpoint_every)
      row = {}
      if step == run.start:  # compilation (or a persistent-cache hit) + the first step
        jax.block_until_ready(run.state.params)
        log.pending["time_to_first_step_s"] = time.perf_counter() - t_start
        log.last_time = time.perf_counter()
      is_last = done == c.total_steps
      is_checkpoint = done % c.checkpoint_every == 0 or is_last or stopping
      if done % c.log_every == 0 or is_last or is_checkpoint:
        values = jax.device_get({**metrics, "all_finite": all_finite, "skipped": skipped})
        log.check(done, values)
        if done % c.log_every == 0 or is_last:
          row.update(log.row(done, values))
      if (done % c.eval_every == 0 or is_last) and not stopping:
        final = run.evaluate()
        row.update(final)
      if row:
        writer.write(done, row)
      if is_checkpoint:
        run.checkpointer.save(done, run.dp.saved_view(run.state), {
            "step": done, "data_step": done, "nonfinite_skipped": log.skipped,
            "config": json.loads(run.config_json)})
        fault.after_save(done)
      log.progress.update(1)
      if stopping:
        run.checkpointer.wait()
        preempted = {"step": done, "preempted": True, "signal": signal.Signals(stop.signum).name,
                     "checkpoint": os.path.join(run.checkpointer.directory, str(done))}
        break
    if not final and preempted is None:  # the workdir already holds the final checkpoint: just evaluate
      final = run.evaluate()
  finally:
    log.progress.close()
  return final, log.skipped, preempted
