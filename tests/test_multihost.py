"""Multi-host training: two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 4 CPU devices each)
run experiments.train; the result equals a one-process run on 8 devices with the same global batch."""
import importlib
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"batch_size": 8, "model.dropout": 0.0, "tensorboard": False}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _state(workdir, target=None):
  """(step, state) of the latest checkpoint; `target` gives this process's devices (a checkpoint written by
  the 2-process run records the other topology's device ids)."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  state = checkpointer.restore_raw(step)[0] if target is None else checkpointer.restore(step, target)[0]
  checkpointer.close()
  return step, state


def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "two"
  cmd = [sys.executable, "-m", "experiments.train", "--config", "configs/mlm_linformer.py:runlocal",
         "--workdir", str(workdir), "--config.mesh.data=-1", "--coordinator_address", f"127.0.0.1:{port}",
         "--num_processes", "2"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = [subprocess.Popen(cmd + ["--process_id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "final eval perplexity" in outs[0] and "final eval perplexity" not in outs[1]  # host 0 reports

  config = importlib.import_module("configs.mlm_linformer").get_config("runlocal")
  config.compilation_cache = False
  config.mesh.data = -1  # the 8 devices of this (one) process
  config.batch_size = OVERRIDES["batch_size"]
  config.model.dropout = 0.0
  config.tensorboard = False
  train_and_evaluate(config, tmp_path / "one")

  step_one, one = _state(tmp_path / "one")
  step_two, two = _state(workdir, target=one)
  assert step_two == step_one == config.total_steps
  for key in ("params", "opt_state"):
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(two[key]), jax.tree.leaves(one[key])))
    print(f"two-process vs one-process max |diff| {key}: {diff:.3g}")
    assert diff <= 1e-6, (key, diff)
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == len(set(rows))  # one writer
