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
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "flax": flax.__version__,
          "numpy": numpy.__version__, "python": platform.python_version()}


def compile_fn(fn: Callable, *args, donate_argnums=()) -> tuple[Any, float, dict]:
  """jit-compiles fn for args; returns (compiled, compile seconds, memory dict with temp/argument bytes)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  memory = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}
  return compiled, seconds, memory


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
                  title: str, notes: str = "") -> pathlib.Path:
  """Writes DIR/name.json (a list of row objects, each carrying the "machine" it ran on) and DIR/name.md."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  info = machine_info()
  (out / f"{name}.json").write_text(json.dumps([dict(row, machine=info) for row in rows], indent=1))
  header = (f"# {title}\n\nMachine: {info['cpu']}, {info['cores']} cores, backend {info['backend']}, "
            f"jax {info['jax']}.\n\n")
  (out / f"{name}.md").write_text(header + (notes + "\n\n" if notes else "") + markdown_table(rows, columns))
  return out
