"""The PyTorch side of the benchmarks, run in a subprocess by a Python that has torch (never our venv).

Only the standard library is imported at module level, so any interpreter with torch can run it:

    TORCH_PYTHON -m experiments.bench_torch '{"task": "linformer", "n": 1024, ...}'

It prints one JSON object (prefixed by ``RESULT_PREFIX``) on stdout. Tasks:

* ``linformer``: ``linformer_pytorch.Linformer`` (0.19.3), eval forward (``no_grad``) and train forward+backward of
  mean(y²); optionally saves its state_dict, input and eval output to ``save_npz`` so the JAX side can convert
  the very same weights (``linformer_jax.convert.from_linformer_pytorch``) and check the outputs agree.
* ``transformer``: ``torch.nn.TransformerEncoder`` of post-LN GELU ``TransformerEncoderLayer``s (batch_first,
  default SDPA, eval fast path allowed), same two modes.
* ``timm``: ``timm.create_model(name)`` eval forward on (batch, 3, H, W) images.

The parent (``run_worker_best_threads``) runs each task with the requested threads and with 1 thread and keeps
the better time, so a loaded machine does not unfairly slow eager PyTorch's many small parallel regions.

Device: ``spec["device"]`` ("cpu", the default, or "cuda": model and input on the GPU, each timed run ended by
``torch.cuda.synchronize()``, one thread count only); ``spec["tf32"]`` (default False) allows TensorFloat-32 in
matmuls and cuDNN convolutions, to match a JAX side whose float32 matmuls use it (the parent decides from JAX's
default matmul precision). On CUDA the memory reported is the rise of ``torch.cuda.max_memory_allocated`` over the
first run (``*_device_peak_rise_bytes``) instead of the host RSS.

Timing: ``warmup`` untimed runs, then the median of ``repeats`` runs (``time.perf_counter``); threads
``torch.set_num_threads(threads)``. Memory: the process's peak-RSS rise during the first run (the kernel's
high-water mark is reset through ``/proc/self/clear_refs`` just before it), and for forward+backward the bytes
autograd saves for the backward pass (``saved_tensors_hooks``, unique storages).

The RSS helpers at the top are shared with the JAX side (``experiments.bench_common``).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH_TORCH_RESULT "


# --------------------------------------------------------------------------------------------- RSS (Linux)
def _status_kib(field: str):
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes():
  """Current resident set size of this process in bytes (None where /proc is unavailable)."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def peak_rss_bytes():
  """High-water mark of the resident set (VmHWM) in bytes, since start or the last ``reset_peak_rss``."""
  kib = _status_kib("VmHWM")
  return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if impossible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rss_rise(run) -> int | None:
  """Peak-RSS rise (bytes) while ``run()`` executes: high-water mark reset just before, minus the RSS then."""
  gc.collect()
  base = rss_bytes()
  ok = reset_peak_rss()
  run()
  peak = peak_rss_bytes()
  if not ok or base is None or peak is None:
    return None
  return max(0, peak - base)


def median_seconds(run, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------------------------- the parent's side
def torch_python_ok(python: str) -> tuple[bool, str]:
  """Whether ``python`` can import torch; (ok, torch version or the reason it cannot)."""
  try:
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True, timeout=120)
  except (OSError, subprocess.TimeoutExpired) as e:
    return False, f"{python}: {e}"
  if out.returncode:
    return False, f"{python} cannot import torch ({out.stderr.strip().splitlines()[-1:] or ['?']})"
  return True, out.stdout.strip()


def default_torch_python() -> str | None:
  """sys.executable when this interpreter has torch, else None."""
  import importlib.util
  return sys.executable if importlib.util.find_spec("torch") is not None else None


def run_worker(python: str, spec: dict, timeout: float = 1800) -> dict:
  """Runs one task in a fresh ``python`` process (the repository root on its path) and returns its result."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([python, "-m", "experiments.bench_torch", json.dumps(spec)], capture_output=True,
                        text=True, cwd=root, env=env, timeout=timeout)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"torch worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def run_worker_best_threads(python: str, spec: dict, threads: int, timeout: float = 1800) -> dict:
  """``run_worker`` with ``threads`` and, if > 1, again with 1 thread (eager PyTorch issues many small ops, each
  a parallel region whose threads must all be scheduled: on a loaded machine 1 thread can be much faster).
  Times (``*_time_s``) are the better of the two (the comparison is then conservative for us); each count's
  times are kept as ``*_time_s_<t>threads``; the other fields (memory, versions) come from the ``threads`` run.
  A CUDA task runs once (host threads only launch its kernels)."""
  res = run_worker(python, dict(spec, threads=threads), timeout)
  counts = [threads] + ([1] if threads > 1 and spec.get("device", "cpu") == "cpu" else [])
  runs = [res] + [run_worker(python, dict(spec, threads=t, save_npz=None), timeout) for t in counts[1:]]
  for key in [k for k in res if k.endswith("_time_s")]:
    for t, r in zip(counts, runs):
      res[f"{key}_{t}threads"] = r[key]
    best = min(zip(counts, runs), key=lambda tr: tr[1][key])
    res[key], res[f"{key[:-len('_time_s')]}_best_threads"] = best[1][key], best[0]
  return res


# ----------------------------------------------------------------------------------------- the worker
def _saved_bytes(torch, fn) -> tuple[int, object]:
  """Bytes of the unique storages autograd saves for backward while ``fn()`` runs the forward pass."""
  seen = {}

  def pack(t):
    try:
      storage = t.untyped_storage()
      seen[storage.data_ptr()] = storage.nbytes()
    except (RuntimeError, NotImplementedError):
      pass
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    out = fn()
  return sum(seen.values()), out


def _synced(torch, device: str, fn):
  """``fn`` followed by a wait for the device's queued work (CUDA), so that wall time covers the computation."""
  if device == "cpu":
    return fn

  def run():
    out = fn()
    torch.cuda.synchronize()
    return out
  return run


def _memory_rise(torch, device: str, fn) -> dict:
  """First-run memory: host peak-RSS rise on CPU; on CUDA the rise of the allocator's peak over the bytes held."""
  if device == "cpu":
    return {"rss_rise_bytes": rss_rise(fn)}
  torch.cuda.synchronize()
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  fn()
  return {"device_peak_rise_bytes": torch.cuda.max_memory_allocated() - base}


def _measure(torch, spec: dict, mode: str, fn) -> dict:
  """First-run memory (``_memory_rise``) and median time of ``fn`` on the spec's device, keys prefixed by mode."""
  device = spec.get("device", "cpu")
  fn = _synced(torch, device, fn)
  res = {f"{mode}_{key}": v for key, v in _memory_rise(torch, device, fn).items()}
  res[f"{mode}_time_s"] = median_seconds(fn, spec["repeats"], spec["warmup"])
  return res


def _sequence_task(torch, spec: dict) -> dict:
  n, dim, batch = spec["n"], spec["dim"], spec["batch"]
  device = spec.get("device", "cpu")
  torch.manual_seed(spec.get("seed", 0))
  if spec["task"] == "linformer":
    import linformer_pytorch
    model = linformer_pytorch.Linformer(**spec["kwargs"])
  else:
    kw = spec["kwargs"]
    layer = torch.nn.TransformerEncoderLayer(kw["d_model"], kw["nhead"], kw["dim_feedforward"], dropout=0.0,
                                             activation="gelu", batch_first=True, norm_first=False)
    model = torch.nn.TransformerEncoder(layer, kw["num_layers"], enable_nested_tensor=False)
  x = torch.randn(batch, n, dim)
  saved_x = x
  model, x = model.to(device), x.to(device)
  params = sum(p.numel() for p in model.parameters())
  res = {"params": params}

  def fwd():
    model.eval()
    with torch.no_grad():
      return model(x)

  def fwdbwd():
    model.train()
    model.zero_grad(set_to_none=True)
    loss = (model(x) ** 2).mean()
    loss.backward()
    return loss

  for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
    if mode not in spec.get("modes", ("fwd", "fwdbwd")):
      continue
    res.update(_measure(torch, spec, mode, fn))
    if mode == "fwdbwd":
      model.train()
      res["saved_for_backward_bytes"], _ = _saved_bytes(torch, lambda: model(x))
  if spec.get("save_npz"):  # the weights, input and eval output, for the JAX side's same-model check
    import numpy as np
    np.savez(spec["save_npz"], x=saved_x.numpy(), y=fwd().cpu().numpy(),
             **{"sd/" + k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
  return res


def _timm_task(torch, spec: dict) -> dict:
  import timm
  torch.manual_seed(spec.get("seed", 0))
  device = spec.get("device", "cpu")
  model = timm.create_model(spec["name"], pretrained=False).eval().to(device)
  x = torch.randn(spec["batch"], 3, spec["img"], spec["img"]).to(device)

  def fwd():
    with torch.no_grad():
      return model(x)

  return {"params": sum(p.numel() for p in model.parameters()), "timm": timm.__version__,
          **_measure(torch, spec, "fwd", fwd)}


def worker(spec: dict) -> dict:
  import torch
  torch.set_num_threads(spec["threads"])
  if spec.get("device", "cpu") != "cpu":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(spec.get("tf32", False))
  task = {"linformer": _sequence_task, "transformer": _sequence_task, "timm": _timm_task}[spec["task"]]
  res = task(torch, spec)
  res.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_device=spec.get("device", "cpu"))
  if res["torch_device"] != "cpu":
    res.update(torch_device_name=torch.cuda.get_device_name(), torch_tf32=torch.backends.cuda.matmul.allow_tf32)
  if spec["task"] == "linformer":
    import importlib.metadata
    res["linformer_pytorch"] = importlib.metadata.version("linformer-pytorch")
  return res


if __name__ == "__main__":
  print(RESULT_PREFIX + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
