"""Compile time of a Linformer train step vs depth, with and without ``scan_layers``.

    python -m experiments.bench_compile --out DIR [--quick]

The trainer's own step, ``linformer_jax.steps.make_train_step`` (data kind "mlm", ``jax.jit`` with the state donated,
as ``linformer_jax.train`` compiles it), with the trainer's optimizer (``linformer_jax.optim.make_optimizer``, default
config: Adafactor), of the byte-level masked LM ``linformer_lm`` (``LinformerLM``: embeddings,
``Linformer(dim=128, num_heads=4, k=64, sharing="none")``, LM head) at n = 512, batch 2; the ``TrainState`` is
``steps.abstract_train_state`` (shapes only, nothing executed): ``lower_s`` = that + tracing + lowering to StableHLO,
``compile_s`` = XLA compilation, both the median of ``--repeats`` (default 3: an unrolled depth-24 compile takes
minutes on 2 loaded cores) fresh ``jax.jit``s (a new model object each time, so nothing is reused; the persistent
compilation cache is not used). Depths 2, 4, 8, 12, 24 scanned, 4, 8, 24 unrolled (``--quick``: 4 and 24 scanned, 4
and 8 unrolled).
Rows: depth, scan_layers, lower_s, compile_s, total_s, total_vs_depth4. Writes DIR/compile.{json,md,png}.
"""
from __future__ import annotations

import statistics
import time

import jax

from experiments.bench_common import bench_parser, finish, sweep_mode, write_plot
from experiments.bench_roofline import TRAIN_STEP, mlm_batch, mlm_model
from linformer_jax import steps
from linformer_jax.optim import default_optimizer_config, make_optimizer

COLUMNS = ["depth", "scan_layers", "lower_s", "compile_s", "total_s", "total_vs_depth4"]
SWEEPS = {  # (scanned depths, unrolled depths, model size)
    "full": ((2, 4, 8, 12, 24), (4, 8, 24), dict(max_len=512, dim=128, num_heads=4, k=64)),
    "quick": ((4, 24), (4, 8), dict(max_len=512, dim=128, num_heads=4, k=64)),
    "tiny": ((1, 2), (1,), dict(max_len=32, dim=16, num_heads=2, k=8)),
}


def measure(depth: int, scan: bool, size: dict, tx) -> tuple[float, float]:
  fields = {k: v for k, v in size.items() if k != "max_len"}
  model = mlm_model(size["max_len"], depth=depth, scan_layers=scan, sharing="none", **fields)
  batch = mlm_batch(2, size["max_len"])
  t0 = time.perf_counter()
  state = steps.abstract_train_state(model, tx, batch, "mlm")
  lowered = jax.jit(steps.make_train_step(model, tx, "mlm"), donate_argnums=0).lower(state, batch,
                                                                                     jax.random.key(0))
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def run(mode: str, repeats: int):
  scanned, unrolled, size = SWEEPS[mode]
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  rows = []
  for scan, depths in ((True, scanned), (False, unrolled)):
    for depth in depths:
      lower, comp = zip(*(measure(depth, scan, size, tx) for _ in range(repeats)))
      rows.append(dict(depth=depth, scan_layers=scan, lower_s=round(statistics.median(lower), 3),
                       compile_s=round(statistics.median(comp), 3), repeats=repeats, **size, batch=2,
                       model="linformer_lm", step=TRAIN_STEP))
      r = rows[-1]
      r["total_s"] = round(r["lower_s"] + r["compile_s"], 3)
      print(f"depth {depth:>2} scan {str(scan):<5} lower {r['lower_s']:7.2f} s  compile {r['compile_s']:7.2f} s",
            flush=True)
  base_depth = 4 if 4 in scanned + unrolled else min(scanned + unrolled)
  base = {r["scan_layers"]: r["total_s"] for r in rows if r["depth"] == base_depth}
  for r in rows:
    r["total_vs_depth4"] = round(r["total_s"] / base[r["scan_layers"]], 3)  # (tiny mode: vs the smallest)
  return rows


def plot(rows, path):
  def draw(axes):
    for scan, style in ((True, "-o"), (False, "--s")):
      pts = sorted((r["depth"], r) for r in rows if r["scan_layers"] == scan)
      label = "scan_layers" if scan else "unrolled"
      axes[0].plot([d for d, _ in pts], [r["compile_s"] for _, r in pts], style, label=f"{label}: compile")
      axes[0].plot([d for d, _ in pts], [r["lower_s"] for _, r in pts], style, alpha=0.5,
                   label=f"{label}: trace+lower")
      axes[1].plot([d for d, _ in pts], [r["total_vs_depth4"] for _, r in pts], style, label=label)
    axes[0].set(xlabel="depth", ylabel="seconds", title="Linformer train step: compile time")
    axes[1].axhline(1.3, color="gray", ls=":", label="target 1.3× (scan)")
    axes[1].set(xlabel="depth", ylabel="total time / depth 4", title="relative to depth 4")
    for ax in axes:
      ax.legend(fontsize=7)
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.set_defaults(repeats=3)
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, 1 if args.tiny else max(args.repeats, 3))
  return finish(args, "compile", rows, COLUMNS, "Compile time vs depth (scan_layers)",
                "lower_s = trace + lower, compile_s = XLA compile; medians of fresh jits; "
                "total_vs_depth4 = total_s / total_s at depth 4 with the same scan_layers.", plot)


if __name__ == "__main__":
  main()
