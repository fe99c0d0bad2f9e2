"""Reliability (docs/reliability.md): bad inputs give a clear error before anything is compiled; kill -9,
SIGTERM/SIGINT, corrupted checkpoints, non-finite losses and an unwritable or full workdir are survived or
reported; weight loading never executes code."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest
from jax._src import dispatch

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import preemption, steps
from linformer_jax import train as train_lib
from linformer_jax import workdir as workdir_lib
from linformer_jax.convert import from_timm_xcit, load_state_dict
from linformer_jax.data import make_dataset
from linformer_jax.models import LinformerLM
from linformer_jax.optim import make_optimizer
from helpers import train_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEXT = ("def f(x):\n    return [i * x for i in range(10) if i % 3]\n\nclass A:\n    pass\n" * 120)  # 8 KB


# ----------------------------------------------------------------------------------------------------------
# Bad input → a clear error before any compilation
# ----------------------------------------------------------------------------------------------------------
class JaxEvents:
  """Records JAX's tracing and compilation events (jax.monitoring) while active."""

  def __enter__(self):
    self.events = []
    self._listener = lambda event, duration, **kw: self.events.append(event)
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)

  @property
  def compiled(self):
    return dispatch.BACKEND_COMPILE_EVENT in self.events

  @property
  def traced(self):
    return dispatch.JAXPR_TRACE_EVENT in self.events


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  (root / "text.txt").write_text(TEXT)
  return root


def _tiny(corpus, name="mlm_linformer", **overrides):
  """The smallest byte-MLM config (the table's base; every error below comes from its one override)."""
  base = {"data.path": str(corpus / "text.txt"), "data.cache_dir": str(corpus / "cache"), "data.max_len": 32,
          "data.num_eval": 8, "model.depth": 1, "model.dim": 16, "model.num_heads": 2, "model.dim_ff": 32,
          "model.k": 8, "tensorboard": False, "plots": False} if name == "mlm_linformer" else {}
  return train_config(name, **{**base, **overrides})


def _listops_dir(root, train_rows):
  root.mkdir(exist_ok=True)
  good = "( ( [MAX 2 ) 9 ] )\t9\n"
  (root / "basic_train.tsv").write_text("Source\tTarget\n" + "".join(train_rows))
  (root / "basic_val.tsv").write_text("Source\tTarget\n" + good * 4)
  return str(root)


def _weights_file(path, drop=None, reshape=None):
  """An XCiT-nano state_dict of zeros (from the fixture manifest) as .safetensors, with one key dropped or one
  tensor of the wrong shape."""
  from safetensors.numpy import save_file
  manifest = json.loads((FIXTURES / "xcit" / "xcit_nano_12_p16.json").read_text())["manifest"]
  sd = {key: np.zeros(shape, dtype) for key, shape, dtype in manifest if key != drop}
  if reshape:
    sd[reshape] = np.zeros((3, 5), np.float32)
  save_file(sd, str(path))
  return path


def _mismatched_checkpoint(corpus, workdir):
  """A checkpoint of the dim=24 config (zeros, written without compiling anything) in ``workdir``."""
  config = _tiny(corpus, **{"model.dim": 24})
  dataset = make_dataset(config.data, str(workdir))
  model = steps.build_model(config.model, dataset.info)
  tx = make_optimizer(config.optimizer, config.total_steps).tx
  abstract = steps.abstract_train_state(model, tx, dataset.batch_at(0, config.batch_size), "mlm")
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", asynchronous=False)
  checkpointer.save(3, state, {"step": 3, "data_step": 3, "config": json.loads(config.to_json_best_effort())})
  checkpointer.close()


def _train(config_fn, workdir_fn=None):
  """A table entry that runs train_and_evaluate(config_fn(ctx), workdir)."""
  def run(ctx):
    workdir = workdir_fn(ctx) if workdir_fn else ctx.tmp / "run"
    return train_lib.train_and_evaluate(config_fn(ctx), workdir)
  return run


def _cfg(**overrides):
  return _train(lambda ctx: _tiny(ctx.corpus, **overrides))


def _model_call(make, *args, **kwargs):
  return lambda ctx: jax.eval_shape(lambda: make().init(jax.random.PRNGKey(0), *args, **kwargs))


def _no_space(ctx):
  ctx.monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 20))
  return _cfg()(ctx)


def _bad_fault_hook(ctx):
  ctx.monkeypatch.setenv(preemption.FAULT_ENV, "KILL@x")
  return _cfg()(ctx)


def _regular_file(ctx):
  (ctx.tmp / "file").write_text("not a directory")
  return ctx.tmp / "file" / "run"


def _mismatch(ctx):
  _mismatched_checkpoint(ctx.corpus, ctx.tmp / "run")
  return _tiny(ctx.corpus)


LM = lambda: LinformerLM(vocab_size=11, max_len=12, dim=8, depth=1, num_heads=2, k=4)  # noqa: E731
TOK = np.ones((2, 12), np.int32)

# id: (what is wrong, action(ctx), exception type, substrings of the message, may trace (jax.eval_shape))
BAD_INPUTS = {
    "unknown sharing": ("model.sharing='rowwise'", _cfg(**{"model.sharing": "rowwise"}), ValueError,
                        ["sharing='rowwise'", "allowed values", "'none'", "'headwise'", "'kv'", "'layerwise'"], False),
    "unknown projection": ("model.projection='random'", _cfg(**{"model.projection": "random"}), ValueError,
                           ["projection='random'", "'learnable'", "'conv'", "'mean_pool'"], False),
    "unknown remat level": ("model.remat='C3'", _cfg(**{"model.remat": "C3"}), ValueError,
                            ["remat='C3'", "'C0'", "'C1'", "'C2'"], False),
    "unknown remat policy": ("model.remat_policy='fast'", _cfg(**{"model.remat": "C1", "model.remat_policy": "fast"}),
                             ValueError, ["remat_policy='fast'", "'nothing_saveable'", "'save_projections'"], False),
    "dim not divisible by heads": ("model.dim=30, num_heads=4", _cfg(**{"model.dim": 30, "model.num_heads": 4}),
                                   ValueError, ["dim=30", "num_heads=4", "head_dim"], False),
    "k = 0": ("model.k=0", _cfg(**{"model.k": 0}), ValueError, ["k=0", ">= 1"], False),
    "k > max_len": ("model.k=33 with max_len 32", _cfg(**{"model.k": 33}), ValueError, ["k=33", "max_len=32"], False),
    "unknown model name": ("model.name='xcit_tiny_13'", _cfg(**{"model.name": "xcit_tiny_13"}), ValueError,
                           ["model.name='xcit_tiny_13'", "'linformer_lm'", "'xcit_tiny_12_p"], False),
    "misspelled model field": ("model.dimm=16", _cfg(**{"model.dimm": 16}), ValueError,
                               ["'dimm'", "did you mean 'dim'", "allowed fields"], False),
    "misspelled top-level field": ("skip_nonfinite_step=True", _cfg(skip_nonfinite_step=True), ValueError,
                                   ["'skip_nonfinite_step'", "did you mean 'skip_nonfinite_steps'"], False),
    "misspelled data field": ("data.mask_rat=0.2", _cfg(**{"data.mask_rat": 0.2}), ValueError,
                              ["data.mask_rat", "did you mean 'mask_rate'"], False),
    "misspelled optimizer field": ("optimizer.learning_rat=1e-3", _cfg(**{"optimizer.learning_rat": 1e-3}),
                                   ValueError, ["learning_rat", "allowed fields", "learning_rate"], False),
    "log_every = 0": ("log_every=0", _cfg(log_every=0), ValueError, ["log_every=0", ">= 1"], False),
    "log_every not an int": ("log_every=None", _cfg(log_every=None), TypeError,
                             ["log_every must be an int", "None"], False),
    "total_steps float (ConfigDict)": ("total_steps=6.5", lambda ctx: _tiny(ctx.corpus, total_steps=6.5), TypeError,
                                       ["'total_steps'", "6.5", "cannot be casted to type <class 'int'>"], False),
    "unknown model.dtype": ("model.dtype='float64'", _cfg(**{"model.dtype": "float64"}), ValueError,
                            ["model.dtype='float64'", "'float32'", "'bfloat16'", "'float16'"], False),
    "compute_dtype (replaced)": ("compute_dtype='bfloat16'", _cfg(compute_dtype="bfloat16"), ValueError,
                                 ["compute_dtype was replaced by model.dtype", "model.param_dtype"], False),
    "float16 training": ("model.dtype='float16'", _cfg(**{"model.dtype": "float16"}), ValueError,
                         ["model.dtype='float16'", "loss scaling", "bfloat16"], False),
    "unknown parallel": ("parallel='pjit'", _cfg(parallel="pjit"), ValueError, ["parallel='pjit'", "'jit'", "'pmap'"],
                         False),
    "batch not divisible by devices": ("batch_size=6 on mesh.data=4", _cfg(batch_size=6, **{"mesh.data": 4}),
                                       ValueError, ["batch_size=6", "divisible by the 4 data-parallel devices"], False),
    "mask_rate out of range": ("data.mask_rate=1.5", _cfg(**{"data.mask_rate": 1.5}), ValueError,
                               ["data.mask_rate=1.5", "(0, 1)"], False),
    "data path missing": ("data.path='/nonexistent/corpus'", _cfg(**{"data.path": "/nonexistent/corpus"}),
                          FileNotFoundError, ["data.path='/nonexistent/corpus'", "does not exist"], False),
    "data dir empty (mlm)": ("data.path=<empty dir>", _train(lambda ctx: _tiny(ctx.corpus, **{
        "data.path": str(ctx.tmp)})), ValueError, ["data.path=", "no *.py/*.txt files"], False),
    "data dir empty (ListOps)": ("ListOps data.path=<empty dir>", _train(lambda ctx: _tiny(
        ctx.corpus, "listops_linformer", **{"data.path": str(ctx.tmp)})), FileNotFoundError,
        ["basic_train.tsv", "not found", "data.path="], False),
    "malformed ListOps row": ("a TSV row with 3 fields", _train(lambda ctx: _tiny(ctx.corpus, "listops_linformer", **{
        "data.path": _listops_dir(ctx.tmp / "lo", ["( [MAX 2 9 ] )\t9\n", "( [MIN 1 3 ] )\t1\textra\n"])})),
        ValueError, ["basic_train.tsv", "line 3", "expected 2 tab-separated fields"], False),
    "ListOps label out of range": ("Target 12", _train(lambda ctx: _tiny(ctx.corpus, "listops_linformer", **{
        "data.path": _listops_dir(ctx.tmp / "lo", ["( [MAX 2 9 ] )\t12\n"])})), ValueError,
        ["basic_train.tsv", "line 2", "Target must be an integer 0..9", "'12'"], False),
    "image size not divisible by patch": ("data.image_size=20, patch 8", _train(lambda ctx: _tiny(
        ctx.corpus, "digits_xcit", **{"data.image_size": 20})), ValueError,
        ["data.image_size=20", "patch size 8", "multiples of 8"], False),
    "init_from missing": ("init_from='/nonexistent/ckpt'", _cfg(init_from="/nonexistent/ckpt"), FileNotFoundError,
                          ["init_from='/nonexistent/ckpt'", "Orbax checkpoint"], False),
    "workdir unwritable": ("workdir under a regular file", _train(lambda ctx: _tiny(ctx.corpus), _regular_file),
                           OSError, ["workdir=", "is not writable", "pick a writable --workdir"], False),
    "disk full": ("1 MiB free", _no_space, OSError, ["not enough free disk space", "MiB free"], True),
    "fault hook malformed": (f"{preemption.FAULT_ENV}=KILL@x", _bad_fault_hook, ValueError,
                             ["LINFORMER_JAX_FAULT='KILL@x'", "KILL, TERM, INT"], False),
    "checkpoint of another config": ("workdir holds a dim=24 checkpoint", _train(_mismatch), ValueError,
                                     ["checkpoint 3", "different model", "params.", "checkpoint (24,",
                                      "model.dim: checkpoint 24, config 16"], True),
    "sequence longer than max_len": ("tokens (2, 13), max_len=12", _model_call(LM, np.ones((2, 13), np.int32)),
                                     ValueError, ["tokens", "n=13", "max_len=12"], True),
    "mask of the wrong shape": ("mask (2, 11) for (2, 12)", _model_call(LM, TOK, np.ones((2, 11), bool)),
                                ValueError, ["mask", "(2, 11)", "(2, 12)"], True),
    "mask of the wrong dtype": ("int32 mask", _model_call(LM, TOK, np.ones((2, 12), np.int32)), TypeError,
                                ["mask", "dtype bool", "int32"], True),
    "weight file missing": ("nothere.safetensors", lambda ctx: load_state_dict(ctx.tmp / "nothere.safetensors"),
                            FileNotFoundError, ["nothere.safetensors"], False),
    "weight file of unknown type": ("weights.npz", lambda ctx: load_state_dict(ctx.tmp / "w.npz"), ValueError,
                                    ["'.npz'", ".safetensors, .pth, .pt, .bin"], False),
    "weight file missing a tensor": ("no cls_token", lambda ctx: from_timm_xcit(load_state_dict(_weights_file(
        ctx.tmp / "w.safetensors", drop="cls_token")), "xcit_nano_12_p16_224"), ValueError,
        ["missing keys (1)", "cls_token (1, 1, 128)"], True),
    "weight file with a wrong shape": ("pos_embed.token_projection.weight (3, 5)", lambda ctx: from_timm_xcit(
        load_state_dict(_weights_file(ctx.tmp / "w.safetensors", reshape="pos_embed.token_projection.weight")),
        "xcit_nano_12_p16_224"), ValueError,
        ["wrong shapes (1)", "pos_embed.token_projection.weight: got (3, 5), expected (128, 64, 1, 1)"], True),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error_before_compiling(case, corpus, tmp_path, monkeypatch):
  _, action, exc, substrings, may_trace = BAD_INPUTS[case]
  (tmp_path / "w.npz").write_bytes(b"")
  ctx = types.SimpleNamespace(corpus=corpus, tmp=tmp_path, monkeypatch=monkeypatch)
  with JaxEvents() as events, pytest.raises(exc) as info:
    action(ctx)
  message = str(info.value)
  for sub in substrings:
    assert sub in message, f"{sub!r} not in {message!r}"
  assert "\n" not in message  # one line
  assert not events.compiled, f"compiled before raising: {events.events}"
  assert may_trace or not events.traced, f"traced before raising: {events.events}"


def test_table_covers_the_issue():
  assert len(BAD_INPUTS) >= 15
  assert sum(e[2] is ValueError for e in BAD_INPUTS.values()) >= 10


def test_cli_prints_one_line_and_exits_nonzero(corpus, tmp_path):
  """A bad value reaches train_and_evaluate: one 'error:' line on stderr, no traceback, exit status 1."""
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "configs/mlm_linformer.py:runlocal",
                         "--workdir", str(tmp_path), f"--config.data.path={corpus / 'text.txt'}",
                         "--config.model.sharing=rowwise"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ValueError: sharing='rowwise' is not supported; allowed values:")
  assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------
# Faults: kill -9 at three points, SIGTERM, a corrupted checkpoint → bitwise the uninterrupted result
# ----------------------------------------------------------------------------------------------------------
def _cli(workdir, corpus, cache, compilation_cache=True):
  return [sys.executable, "-m", "experiments.train", "--config", "configs/mlm_linformer.py:runlocal",
          "--workdir", str(workdir), f"--config.data.path={corpus / 'text.txt'}", "--config.data.max_len=32",
          "--config.data.num_eval=8", "--config.model.depth=1", "--config.model.dim=16", "--config.model.dim_ff=32",
          "--config.model.k=8", "--config.model.dropout=0.1", "--config.total_steps=8", "--config.checkpoint_every=2",
          "--config.log_every=2", "--config.eval_every=8", "--config.eval_max_batches=1",
          "--config.keep_checkpoints=10", "--config.tensorboard=False", "--config.plots=False",
          f"--config.compilation_cache={compilation_cache}", f"--config.compilation_cache_dir={cache}"]


def _run(cmd, fault=None, **popen):
  env = {k: v for k, v in os.environ.items() if k != preemption.FAULT_ENV}
  env["JAX_PLATFORMS"] = "cpu"
  if fault:
    env[preemption.FAULT_ENV] = fault
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc):
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _committed(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def _params(workdir, step):
  checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  state, meta = checkpointer.restore_raw(step)
  checkpointer.close()
  assert meta["data_step"] == step
  return state["params"]


def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)


def test_kill_sigterm_and_corruption_resume_bitwise(corpus, tmp_path):
  cache = tmp_path / "jax_cache"
  straight, chain = tmp_path / "straight", tmp_path / "chain"
  reference = _run(_cli(straight, corpus, cache, compilation_cache=False))  # in parallel with the chain
  cmd = _cli(chain, corpus, cache)

  # 1. kill -9 after step 3 (checkpoint 2 committed): resumes from 2
  rc, _, err = _finish(_run(cmd, "KILL@3"))
  assert rc == -signal.SIGKILL, err
  assert _committed(chain) == [2]
  # 2. kill -9 while checkpoint 4 is being written (asynchronously): 4 never commits, 2 is still the latest
  rc, _, err = _finish(_run(cmd, "KILL@4:save"))
  assert rc == -signal.SIGKILL, err
  assert _committed(chain) == [2]
  assert any(p.name.startswith("4.orbax-checkpoint-tmp") for p in (chain / "checkpoints").iterdir())
  # 3. SIGTERM after step 5 (not a checkpoint step): checkpoint 5 is written, exit 0
  rc, out, err = _finish(_run(cmd, "TERM@5"))
  assert rc == 0, err
  assert "stopped by SIGTERM after step 5" in out
  assert _committed(chain) == [2, 4, 5]
  # 4. checkpoint 5 corrupted (array files truncated): skipped with a warning, resume from 4; kill -9 after step 6
  _truncate_arrays(chain / "checkpoints" / "5")
  rc, _, err = _finish(_run(cmd, "KILL@6"))
  assert rc == -signal.SIGKILL
  assert "skipping unreadable checkpoint" in err and str(chain / "checkpoints" / "5") in err
  assert _committed(chain) == [2, 4]
  assert any(p.name.startswith("5-") for p in (chain / "checkpoints.corrupt").iterdir())
  # 5. the same command again finishes the run
  rc, out, err = _finish(_run(cmd))
  assert rc == 0, err
  assert "final eval perplexity" in out
  rc, out_ref, err = _finish(reference)
  assert rc == 0, err
  assert _committed(straight)[-1] == _committed(chain)[-1] == 8
  a, b = _params(straight, 8), _params(chain, 8)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 5
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y))  # bitwise
  assert json.loads(out.splitlines()[-1]) == json.loads(out_ref.splitlines()[-1])  # same final eval


def test_stop_request_turns_signals_into_a_flag_and_restores_handlers():
  calls = []
  outer = lambda signum, frame: calls.append(signum)  # a known previous handler (the worker's may be anything)
  saved = {s: signal.signal(s, outer) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    stop = preemption.StopRequest().install()
    try:
      assert stop.signum is None
      # raise_signal runs the Python handler in this thread before it returns (os.kill may land on a JAX thread)
      signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the loop checks the flag after the step
      assert stop.signum == signal.SIGINT and calls == []
    finally:
      stop.restore()
    assert all(signal.getsignal(s) is outer for s in saved)
    signal.raise_signal(signal.SIGINT)  # the previous handler is back
    assert calls == [signal.SIGINT]
  finally:
    for s, handler in saved.items():
      signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------------
# Corrupted checkpoints (Checkpointer level: no training needed)
# ----------------------------------------------------------------------------------------------------------
def _numpy_checkpoints(directory, steps):
  state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "step": np.int32(0)}
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=10, asynchronous=False)
  for s in steps:
    checkpointer.save(s, {**state, "step": np.int32(s)}, {"step": s, "data_step": s})
  checkpointer.close()
  return state


@pytest.mark.parametrize("damage", ["truncated arrays", "missing meta", "missing state"])
def test_unreadable_checkpoint_is_skipped_with_warning(tmp_path, damage):
  directory = tmp_path / "checkpoints"
  state = _numpy_checkpoints(directory, [1, 2, 3])
  if damage == "truncated arrays":
    _truncate_arrays(directory / "3")
  elif damage == "missing meta":
    os.remove(directory / "3" / "meta" / "metadata")
  else:
    shutil.rmtree(directory / "3" / "state")
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=10)
  with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint .*checkpoints/3 "):
    step, restored, meta = checkpointer.restore_latest(state)
  assert step == 2 and meta["step"] == 2 and int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert checkpointer.all_steps() == [1, 2]  # 3 moved aside, so step 3 can be written again
  checkpointer.save(3, state, {"step": 3})
  checkpointer.close()
  assert (directory / "3" / "commit_success.txt").exists() and len(os.listdir(tmp_path / "checkpoints.corrupt")) == 1


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  directory = tmp_path / "checkpoints"
  state = _numpy_checkpoints(directory, [1, 2])
  _truncate_arrays(directory / "2")
  os.remove(directory / "1" / "meta" / "metadata")
  checkpointer = ckpt_lib.Checkpointer(directory)
  with warnings.catch_warnings(record=True), pytest.raises(ckpt_lib.CheckpointCorruptError) as info:
    checkpointer.restore_latest(state)
  checkpointer.close()
  assert isinstance(info.value, ValueError)
  for sub in ("no readable checkpoint in", "step 2:", "step 1:", "FileNotFoundError", "new --workdir"):
    assert sub in str(info.value)


def test_empty_checkpoint_directory_restores_nothing(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.restore_latest({"w": np.zeros(3)}) is None
  checkpointer.close()


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss with skip_nonfinite_steps: bad updates are dropped and counted
# ----------------------------------------------------------------------------------------------------------
def test_skip_nonfinite_steps_drops_and_counts_bad_updates(corpus, tmp_path):
  config = _tiny(corpus, total_steps=5, checkpoint_every=1, log_every=1, eval_every=5, keep_checkpoints=10,
                 skip_nonfinite_steps=True)
  config.optimizer.update(name="adamw", schedule="constant", warmup_steps=0, learning_rate=1e30, weight_decay=0.0)
  final = train_lib.train_and_evaluate(config, tmp_path)
  rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
  counts = {r["step"]: r["nonfinite_skipped"] for r in rows}
  assert list(counts) == [1, 2, 3, 4, 5] and final["nonfinite_skipped"] == counts[5] >= 2
  params = {s: jax.tree.leaves(_params(tmp_path, s)) for s in counts}
  for s in range(2, 6):
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(params[s - 1], params[s]))
    assert same == (counts[s] > counts[s - 1]), s  # a skipped update leaves the parameters bit for bit
    assert all(np.isfinite(np.asarray(a)).all() for a in params[s])


# ----------------------------------------------------------------------------------------------------------
# Security: weights are loaded without executing code
# ----------------------------------------------------------------------------------------------------------
def test_pth_goes_through_torch_load_weights_only(tmp_path, monkeypatch):
  """Without torch installed here, a stand-in torch module records how .pth files are opened (the real refusal
  of a malicious pickle is tests/convert/test_xcit_convert.py::test_malicious_pickle_is_refused)."""
  calls = []

  def fake_load(path, **kwargs):
    calls.append(kwargs)
    return {"w": np.ones(2, np.float32)}

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
  (tmp_path / "w.pth").write_bytes(b"not read by the stub")
  assert list(load_state_dict(tmp_path / "w.pth")) == ["w"]
  assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_weight_loading_never_unpickles(tmp_path, monkeypatch):
  import pickle
  from safetensors.numpy import save_file
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("pickle used while loading weights"))
  save_file({"w": np.arange(3, dtype=np.float32)}, str(tmp_path / "w.safetensors"))
  np.testing.assert_array_equal(load_state_dict(tmp_path / "w.safetensors")["w"], np.arange(3))
