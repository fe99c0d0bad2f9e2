"""Metric logging: host-0 JSON lines, TensorBoard event files (tensorboardX) and end-of-run plots."""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Optional

import jax


class MetricWriter:
  """Writes ``metrics.jsonl`` (one JSON object per row, ``step`` first) and TensorBoard scalars.

  Only process 0 writes; other processes get a no-op writer. Rows are appended, so a resumed run continues
  the same file.

  Args:
    workdir: the run directory; ``metrics.jsonl`` and ``tensorboard/`` are created in it.
    tensorboard: also write TensorBoard scalars (needs ``tensorboardX``).
  """

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._file = open(self.workdir / "metrics.jsonl", "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    """Appends one row ``{"step": step, **values}`` and flushes it.

    Arrays and numpy scalars are converted with ``.item()``. Finite numeric values (not ``step``) also go to
    TensorBoard as scalars at ``step``.

    Args:
      step: the training step of the row.
      values: metric name → JSON-serialisable value.
    """
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _plain(v) for k, v in values.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    """Closes ``metrics.jsonl`` and the TensorBoard writer."""
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl``, in file order; ``[]`` when the file does not exist."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(workdir: str | os.PathLike, keys: Optional[list[str]] = None) -> list[pathlib.Path]:
  """Writes ``plots/<key>.png`` (value vs step) for the loss/metric curves in metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(workdir)
  keys = keys or ["loss", "lr", "grad_norm"] + sorted(
      {k for r in rows for k in r if k.startswith("eval_") and isinstance(r[k], (int, float))})
  out_dir = pathlib.Path(workdir) / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for key in keys:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
    ax.set(xlabel="step", ylabel=key, title=key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{key}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written
