"""End-to-end training through train_and_evaluate: every config's runlocal variant, resume, failure modes."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax.train import train_and_evaluate
from helpers import train_config as _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_KEYS = {"step", "loss", "lr", "grad_norm", "steps_per_s"}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir):
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  state, meta = checkpointer.restore_raw(step)
  checkpointer.close()
  assert meta["data_step"] == step
  return step, state["params"]


@pytest.mark.parametrize("name,throughput,eval_keys", [
    ("mlm_linformer", "tokens_per_s", {"eval_loss", "eval_accuracy", "eval_perplexity"}),
    ("listops_linformer", "tokens_per_s", {"eval_loss", "eval_accuracy"}),
    ("listops_transformer", "tokens_per_s", {"eval_loss", "eval_accuracy"}),
    ("digits_xcit", "images_per_s", {"eval_loss", "eval_accuracy"}),
])
def test_config_trains_end_to_end(tmp_path, name, throughput, eval_keys):
  config = _config(name)
  final = train_and_evaluate(config, tmp_path)
  rows = _rows(tmp_path)
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(config.log_every, config.total_steps + 1, config.log_every))
  for r in logged:
    assert LOG_KEYS | {throughput} <= set(r) and np.isfinite(r["loss"]) and r[throughput] > 0
  assert "time_to_first_step_s" in logged[0]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert eval_rows and eval_keys <= set(eval_rows[-1]) and eval_rows[-1]["step"] == config.total_steps
  assert final["step"] == config.total_steps and eval_keys <= set(final)
  assert any(k.startswith("baseline_") for k in final)
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == config.total_steps
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [
      config.checkpoint_every, config.total_steps]


def test_resume_gives_the_uninterrupted_result(tmp_path):
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  train_and_evaluate(_config("mlm_linformer", **{"model.dropout": 0.1}), straight)
  # the interrupted run stops after step 3 (its last checkpoint), then the same command continues
  train_and_evaluate(_config("mlm_linformer", total_steps=3, **{"model.dropout": 0.1}), interrupted)
  assert _final_params(interrupted)[0] == 3
  final = train_and_evaluate(_config("mlm_linformer", **{"model.dropout": 0.1}), interrupted)
  assert final["step"] == 6
  (step_a, params_a), (step_b, params_b) = _final_params(straight), _final_params(interrupted)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the first run logged steps 2 and 3 (its last); the resumed run only the steps after 3
  steps = [r["step"] for r in _rows(interrupted) if "loss" in r]
  assert steps == [2, 3, 4, 6]


def test_non_finite_loss_stops_with_step_range_and_keeps_last_good_checkpoint(tmp_path):
  config = _config("mlm_linformer", total_steps=8, checkpoint_every=2, log_every=2)
  config.optimizer.name = "adamw"
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match=r"within steps \d+\.\.\d+; the last good checkpoint") as info:
    train_and_evaluate(config, tmp_path)
  first, last = map(int, re.search(r"within steps (\d+)\.\.(\d+)", str(info.value)).groups())
  assert last - first + 1 <= 2 and "skip_nonfinite_steps=True" in str(info.value)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  assert all(step < first for step in checkpointer.all_steps())  # nothing from the bad window was saved
  for step in checkpointer.all_steps():  # whatever was saved is finite
    params = checkpointer.restore_raw(step)[0]["params"]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
  checkpointer.close()


def test_bfloat16_compute_trains(tmp_path):
  """model.dtype=bfloat16 (compute) with the default model.param_dtype=float32: the checkpoint holds float32."""
  final = train_and_evaluate(_config("listops_linformer", **{"model.dtype": "bfloat16"}), tmp_path)
  assert np.isfinite(final["eval_loss"])
  _, params = _final_params(tmp_path)
  assert {np.asarray(a).dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_cli_rejects_misspelled_field(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                         "configs/mlm_linformer.py:runlocal", "--workdir", str(tmp_path),
                         "--config.modle.k=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: no such config field 'modle' (in a --config.FIELD=VALUE override). "
                                 'Did you mean "model" instead of "modle"?')  # one line, no traceback


def test_cli_names_the_new_name_of_a_renamed_field(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                         "configs/listops_linformer.py:runlocal", "--workdir", str(tmp_path),
                         "--config.data.max_length=50"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: ValueError: data.max_length was renamed to data.max_tree_length")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_init_from_converted_checkpoint(tmp_path):
  """init_from loads every matching variable of a converter checkpoint; a head of another size is fresh."""
  from linformer_jax.convert.xcit import save_xcit_checkpoint
  from linformer_jax.models import create_model
  config = _config("digits_xcit", total_steps=2, checkpoint_every=2, log_every=2, eval_every=2)
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  source = create_model(config.model.name, num_classes=7, **overrides)  # digits has 10 classes
  images = jax.numpy.zeros((1, 16, 16, 3))
  variables = jax.jit(source.init)(jax.random.key(42), images)
  save_xcit_checkpoint(tmp_path / "converted", variables, config.model.name, {"num_classes": 7, **overrides})
  config.init_from = str(tmp_path / "converted")
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 1e-30  # parameters stay (to 1e-20) where init_from put them
  config.optimizer.weight_decay = 0.0
  train_and_evaluate(config, tmp_path / "run")
  step, params = _final_params(tmp_path / "run")
  assert step == 2
  flat_src = jax.tree_util.tree_leaves_with_path(variables["params"])
  flat_got = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, value in flat_src:
    if "head" in jax.tree_util.keystr(path):
      assert flat_got[path].shape[-1] == 10 and value.shape[-1] == 7  # fresh 10-class head
    else:
      np.testing.assert_allclose(np.asarray(flat_got[path]), np.asarray(value), rtol=1e-6, atol=1e-20)


def test_init_from_a_previous_run(tmp_path):
  """init_from also takes a run's checkpoints/ directory (its latest step) or one step of it: the train state's
  params and other collections are the variables; every one of them is taken (same model)."""
  config = _config("mlm_linformer", total_steps=2, checkpoint_every=2, log_every=2, eval_every=2)
  train_and_evaluate(config, tmp_path / "first")
  _, first = _final_params(tmp_path / "first")
  by_step = ckpt_lib.restore_variables(tmp_path / "first" / "checkpoints" / "2")
  assert jax.tree.structure(by_step["params"]) == jax.tree.structure(first)
  for a, b in zip(jax.tree.leaves(by_step["params"]), jax.tree.leaves(first)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  config = _config("mlm_linformer", total_steps=2, checkpoint_every=2, log_every=2, eval_every=2, seed=1)
  config.init_from = str(tmp_path / "first" / "checkpoints")
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 1e-30  # parameters stay (to 1e-20) where init_from put them
  config.optimizer.weight_decay = 0.0
  train_and_evaluate(config, tmp_path / "second")
  _, second = _final_params(tmp_path / "second")
  for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(first)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-20)
