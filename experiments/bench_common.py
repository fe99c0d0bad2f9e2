"""Shared benchmark utilities: machine description, timing, XLA memory, and JSON / markdown / PNG output.

Timings exclude the warm-up (compilation), which is reported separately; each timing is the median of at
least ``repeats`` runs, each ended by ``block_until_ready``. Memory is XLA's compile-time
``memory_analysis()`` (deterministic): temp bytes and argument bytes.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import jax


def machine_info() -> dict:
  """CPU model, core count, backend, devices and library versions, recorded in every benchmark JSON."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import flax
  import numpy
  info = {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "flax": flax.__version__,
          "numpy": numpy.__version__, "python": platform.python_version(),
          "matmul_precision": jax.config.jax_default_matmul_precision or "default"}
  info.update(host_load())
  return info


def host_load() -> dict:
  """What else the machine is doing: load averages (1/5/15 min: > cores means contention), usable cores, the
  memory available, and the XLA flags in force (JAX's CPU thread pool uses every core it may run on)."""
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  info = {"loadavg": [round(v, 2) for v in os.getloadavg()], "usable_cores": usable,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  available = mem_available_bytes()
  if available is not None:
    info["mem_available_bytes"] = available
  return info


def mem_available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (bytes), None where unavailable."""
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def on_accelerator() -> bool:
  """Whether JAX computes on a GPU/TPU (then host RSS says nothing about the arrays, and memory is the device's)."""
  return jax.default_backend() != "cpu"


def device_bytes_limit() -> int | None:
  """The memory JAX's allocator may use on the first device (None on CPU or where the backend does not say)."""
  if not on_accelerator():
    return None
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def torch_device_spec(backend: str | None = None) -> dict:
  """Where the PyTorch side of a comparison runs, matched to JAX's: {"device": "cpu"} on CPU; on a GPU
  {"device": "cuda", "tf32": ...}, TensorFloat-32 allowed exactly when JAX's float32 matmuls may use it (XLA:GPU's
  default precision does; ``JAX_DEFAULT_MATMUL_PRECISION=highest`` makes both sides full float32).
  backend: JAX's backend ("cpu", "gpu", "tpu", ...); None = ``jax.default_backend()``."""
  backend = jax.default_backend() if backend is None else backend
  if backend != "gpu":
    if backend != "cpu":
      warnings.warn(f"the PyTorch side runs on the CPU while JAX runs on {backend}: its times and "
                    "memory are not comparable with ours")
    return {"device": "cpu"}
  precision = str(jax.config.jax_default_matmul_precision or "default").lower()
  return {"device": "cuda", "tf32": precision not in ("highest", "float32", "precision.highest")}


def memory_budget(max_gib: float | None, fraction: float = 0.6) -> int:
  """Bytes a single measurement may use: ``max_gib`` if given, else ``fraction`` of the device's memory (GPU/TPU)
  or of MemAvailable now (CPU)."""
  if max_gib is not None:
    return int(max_gib * 2**30)
  limit = device_bytes_limit()
  if limit:
    return int(fraction * limit)
  available = mem_available_bytes()
  return int(fraction * available) if available is not None else 8 * 2**30


def interleaved_median_times(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict:
  """Median wall time of each zero-argument callable (each must block until its result is ready), timed in
  rounds — one run of every callable per round — so that a change in machine load hits all of them alike.
  Returns {name: seconds}."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def blocking(compiled: Callable, *args) -> Callable[[], Any]:
  """A zero-argument callable running ``compiled(*args)`` to completion (for ``interleaved_median_times``)."""
  return lambda: jax.block_until_ready(compiled(*args))


def first_run_rss_rise(compiled: Callable, *args) -> int | None:
  """Peak-RSS rise of the process during one execution of ``compiled(*args)`` (high-water mark reset just before;
  None where /proc/self/clear_refs is unavailable, and on a GPU/TPU, whose arrays are not in host memory).
  Meaningful for large buffers: smaller freed blocks may stay in the allocator and hide part of the rise."""
  if on_accelerator():
    return None
  from experiments.bench_torch import rss_rise
  return rss_rise(blocking(compiled, *args))


def random_like(abstract_tree, seed: int = 0, scale: float = 0.02):
  """Concrete arrays for a tree of ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(model.init, ...)``): normal
  values × ``scale`` drawn with numpy, so no per-shape random kernels are compiled. For timing and memory only
  (values do not change the work done); use the model's ``init`` where the numbers matter."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jax.numpy.asarray((rng.standard_normal(s.shape) * scale).astype(s.dtype)),
                      abstract_tree)


def write_plot(path, draw: Callable, ncols: int = 2, figsize=(11, 4)) -> None:
  """Saves a matplotlib figure of ``ncols`` axes drawn by ``draw(axes)`` to ``path`` (Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
  draw(list(axes[0]))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fmt_bytes(b) -> str:
  return "–" if b is None else f"{b / 2**20:.1f} MiB"


def bench_parser(doc: str, quick_help: str = "small sweep (< 2 min on 2 CPU cores)"):
  """The argument parser of a benchmark script (its module docstring as help) with the common arguments."""
  import argparse
  return add_common_args(argparse.ArgumentParser(description=doc,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter), quick_help)


def sweep_mode(args) -> str:
  """"tiny" (hidden test mode), "quick" or "full"."""
  return "tiny" if args.tiny else "quick" if args.quick else "full"


def finish(args, name: str, rows: list[dict], columns: Sequence[str], title: str, notes: str,
           plot: Callable) -> list[dict]:
  """Writes DIR/name.{json,md} (``write_outputs``) and DIR/name.png (``plot(rows, path)``); returns rows."""
  out = write_outputs(args.out, name, rows, columns, title, notes=notes)
  plot(rows, out / f"{name}.png")
  print(f"wrote {out / name}.json, .md, .png")
  return rows


def add_common_args(p, quick_help: str = "small sweep (< 2 min on 2 CPU cores)"):
  """--out, --quick, --repeats, and a hidden --tiny (a seconds-long sweep for the tests)."""
  import argparse
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quick", action="store_true", help=quick_help)
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; at least 5)")
  return p


def _memory_dict(compiled) -> dict:
  mem = compiled.memory_analysis()
  return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes)}


# XLA:CPU's YNNPACK fusions (e.g. q·kᵀ → softmax → ·v) allocate their scratch outside XLA's buffer assignment, so
# memory_analysis() of the program that runs can leave out the n × n attention scores (n = 8192 full attention:
# 104 MiB counted, 1.16 GiB peak-RSS rise). Compiled without those fusions, every buffer is XLA's and is counted.
UNFUSED_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _counted(lowered, compiled=None) -> dict:
  """Memory dict of a lowered program with every buffer counted; `compiled`: its ordinary compilation, if done."""
  if jax.default_backend() == "cpu":
    try:
      return _memory_dict(lowered.compile(compiler_options=UNFUSED_CPU_OPTIONS))
    except Exception as e:  # a jaxlib without that XLA option: say so, count the ordinary program
      warnings.warn(f"counted_memory: compiling without YNNPACK fusions failed ({type(e).__name__}: {e}); "
                    "reporting the fused program's memory_analysis(), which may leave out fusion scratch")
  return _memory_dict(compiled or lowered.compile())


def compile_fn(fn: Callable, *args, donate_argnums=(), count_all_buffers: bool = False,
               flops_fn: Callable | None = None) -> tuple[Any, float, dict]:
  """jit-compiles fn for args; returns (compiled, compile seconds, memory dict with temp/argument bytes).

  count_all_buffers: the memory dict as ``counted_memory`` gives it (on CPU from a second compilation of the same
  lowering without YNNPACK fusions; not included in the seconds); otherwise the compiled program's own analysis.
  flops_fn: the function whose FLOPs ``flops_of`` reports for this program (same arguments; default fn). XLA's
  ``cost_analysis`` counts a loop body once, so a program running attention in query blocks (a ``lax.map``) would
  report the FLOPs of one block: pass the same computation unblocked, e.g. built from ``unblocked(model)``.
  """
  t0 = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  # FLOPs are counted only if flops_of asks (a second trace, see _cpu_flops); shapes kept, not the arrays
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if _is_array(a) else a, args)
  _FLOPS_LATER[compiled] = lambda: _cpu_flops(flops_fn or fn, abstract)
  return compiled, seconds, _counted(lowered, compiled) if count_all_buffers else _memory_dict(compiled)


def counted_memory(fn: Callable, *args) -> dict:
  """temp/argument/output bytes of ``fn(*args)`` with every buffer counted (compile only, nothing runs).

  On CPU the program is compiled without YNNPACK fusions (``UNFUSED_CPU_OPTIONS``) for this count, because those
  fusions' internal scratch is invisible to ``memory_analysis()``; elsewhere it is the ordinary compile.
  """
  return _counted(jax.jit(fn).lower(*args))


def unblocked(model):
  """``model`` with its attention kernel never in query blocks: ``model.clone(attention_block_rows=0)`` (a field of
  every model with softmax attention; see ``linformer_jax.layers.default_block_rows``). Each head's (t, s) scores
  are then held at once, as in a standard Transformer. For the paper's baseline (bench_efficiency) and for FLOP
  counts (``compile_fn``'s flops_fn), since XLA's ``cost_analysis`` counts a loop body once: a blocked program's
  count leaves out all blocks but one."""
  return model.clone(attention_block_rows=0)


# For each program compiled by compile_fn, how to count its FLOPs (``_cpu_flops``), run on demand.
_FLOPS_LATER: "weakref.WeakKeyDictionary[Any, Callable[[], float]]" = weakref.WeakKeyDictionary()


def _is_array(a) -> bool:
  return hasattr(a, "shape") and hasattr(a, "dtype")


def _flops(analysis) -> float:
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def _cpu_flops(fn: Callable, args) -> float:
  """XLA:CPU's FLOP count of ``fn(*args)`` traced as on this backend but lowered for the host CPU (nothing is
  compiled or run): the count does not depend on where the program would run, and XLA:GPU's own counts are
  unusable (an H100 reported 0 FLOPs for a 4096³ ``jnp.dot``, both before and after optimization). A loop body
  counts once, so fn should run its attention unblocked (``unblocked``; see ``compile_fn``'s flops_fn)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

  def on_cpu(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) if _is_array(a) else a
  try:
    lowered = jax.jit(lambda *a: fn(*a)).lower(*jax.tree.map(on_cpu, args))  # a fresh function: a new trace
    return _flops(lowered.cost_analysis())
  except Exception as e:  # say so rather than report a wrong count
    warnings.warn(f"flops: lowering for the CPU failed ({type(e).__name__}: {e}); FLOPs reported as 0")
    return 0.0


def flops_of(compiled) -> float:
  """XLA's FLOP count of a function (2·M·N·K per matmul plus elementwise ops). For programs from ``compile_fn`` it is
  XLA:CPU's count of its flops_fn (default: the compiled function) traced again (``_cpu_flops``; on CPU the count
  of an unblocked program equals its compiled program's); for anything else the compiled program's own count."""
  if compiled in _FLOPS_LATER:
    return _FLOPS_LATER[compiled]()
  return _flops(compiled.cost_analysis())


def median_time(compiled: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time (seconds) of ``compiled(*args)`` over ``repeats`` runs after ``warmup`` runs."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | os.PathLike, name: str, rows: list[dict], columns: Sequence[str],
                  title: str, notes: str = "", body: str | None = None) -> pathlib.Path:
  """Writes DIR/name.json (a list of row objects, each carrying the "machine" it ran on) and DIR/name.md (the
  header, the notes, then ``body`` if given — e.g. several tables — else one table of ``columns``)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  info = machine_info()
  (out / f"{name}.json").write_text(json.dumps([dict(row, machine=info) for row in rows], indent=1))
  device = f" ({info['devices'][0]}, float32 matmul precision {info['matmul_precision']})" if on_accelerator() else ""
  header = (f"# {title}\n\nMachine: {info['cpu']}, {info['cores']} cores, backend {info['backend']}{device}, "
            f"jax {info['jax']}.\n\n")
  table = markdown_table(rows, columns) if body is None else body
  (out / f"{name}.md").write_text(header + (notes + "\n\n" if notes else "") + table)
  return out
