"""Linformer paper Table 3 on this machine: inference time and memory saved by Linformer over a Transformer.

    python -m experiments.bench_efficiency --out DIR [--quick] [--max-mem-gib G] [--ns N,...] [--tokens T]
        [--sections time,memory] [--attention-block-rows R]

Both models are ``linformer_jax.models.Linformer`` with the same block (pre-LN, GELU FF, no dropout); the
Transformer is ``attention="full"`` (``softmax_attention``: for float32 heads-first einsums on every backend — the
composition ``jax.nn.dot_product_attention`` lowers to, as fast on a GPU and faster on CPU, keeping one n × n
array per layer instead of two), the Linformer
``sharing="layerwise"`` (one E=F for the whole network, as in the paper's Table 3). Each n: one full-attention
baseline and every k < n, timed in interleaved rounds in the same run (median of >= 5 after a warm-up; compile
reported separately).

The baseline is the paper's *standard* Transformer, which holds each head's n × n scores at once. On CPU our
``softmax_attention`` would otherwise run large score arrays in query blocks recomputed in the backward pass
(``linformer_jax.layers.default_block_rows``: exact, faster there, and never holding the n × n scores), so the
baseline is built with those blocks off (``bench_common.unblocked``: ``attention_block_rows=0``); the blocked
Transformer is measured in the same rounds as a second baseline (``*_full_blocked_*`` columns, ratios
``time_saved_blocked`` / ``mem_saved_blocked``): what Linformer saves over the best exact attention we have on CPU.
Off the CPU there are no query blocks, and no second baseline. ``--attention-block-rows R`` sets the blocks of the
Linformer and of the blocked Transformer (R queries per block, 0 = none) instead of the backend's default rule.

Section "time+memory" (timed): dim 256, 4 heads (head dim 64), FF 1024, depth 2, batch = max(1, 8192 // n)
sequences (the paper measured at the largest batch that fits; here the batch keeps ~8k tokens per call).
Section "memory only": the BERT-base geometry (dim 768, 12 heads, FF 3072, depth 12, batch 1), XLA memory
from compilation alone, nothing executed.

Memory = XLA ``memory_analysis()`` temp + argument bytes of the jitted forward (deterministic; arguments
include the parameters and the input), counted with ``bench_common.counted_memory``: on CPU the program is
compiled once more without YNNPACK fusions for the count, because a fused q·kᵀ → softmax → ·v allocates the n × n
scores outside XLA's buffer assignment (the timed program is the ordinary one). Also the temp-only ratio and the
peak-RSS rise of the first execution (of the timed program) with its ratio ``rss_saved``.
A full-attention run whose XLA memory exceeds the budget (``--max-mem-gib``, default 60 % of MemAvailable)
is not executed: its row keeps the compile-time memory and says why the time is missing (on a GPU/TPU the default
budget is 60 % of the device memory JAX may use, and peak RSS is not measured: the arrays live on the device).
``flop_saved`` = XLA's FLOP count (``cost_analysis``) of the full-attention forward / the Linformer's: the time
ratio both programs would show if they ran at the same FLOP rate (a compute-bound machine's expectation).
Rows: section, n, k, batch, time_full_s, time_linformer_s, time_saved, paper_time_saved, flop_saved, flops_*,
mem_full_bytes, mem_linformer_bytes, mem_saved, paper_mem_saved, temp_saved, rss_rise_*, compile_*_s, on CPU
*_full_blocked_* with time_saved_blocked and mem_saved_blocked, note.
Writes DIR/efficiency.{json,md,png}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench_common import (bench_parser, blocking, compile_fn, counted_memory, finish, first_run_rss_rise,
                                      flops_of, fmt_bytes, interleaved_median_times, memory_budget, random_like,
                                      on_accelerator, sweep_mode, unblocked, write_plot)
from linformer_jax.models import Linformer

# Linformer paper (arXiv 2006.04768) Table 3: (time saved ×, memory saved ×) by (n, k); V100, max batch.
PAPER_TABLE3 = {
    (512, 128): (1.5, 1.7), (512, 256): (1.3, 1.5),
    (1024, 128): (1.7, 3.0), (1024, 256): (1.6, 2.9), (1024, 512): (1.3, 1.8),
    (2048, 128): (2.6, 6.1), (2048, 256): (2.4, 5.6), (2048, 512): (2.1, 3.6), (2048, 1024): (1.3, 2.0),
    (4096, 128): (3.4, 14), (4096, 256): (3.2, 13), (4096, 512): (2.8, 8.3), (4096, 1024): (2.2, 4.3),
    (4096, 2048): (1.3, 2.3),
    (8192, 128): (5.5, 28), (8192, 256): (5.0, 26), (8192, 512): (4.4, 17), (8192, 1024): (3.5, 8.5),
    (8192, 2048): (2.1, 4.5),
    (16384, 128): (8.6, 56), (16384, 256): (7.8, 48), (16384, 512): (7.0, 32), (16384, 1024): (5.6, 16),
    (16384, 2048): (3.3, 8),
}

SWEEPS = {  # ns, ks, model geometry, tokens per call; memory-only geometry, its ns and ks
    "full": dict(ns=(512, 1024, 2048, 4096, 8192, 16384), ks=(128, 256, 512, 1024, 2048),
                 model=dict(dim=256, num_heads=4, dim_ff=1024, depth=2), tokens=8192,
                 mem_model=dict(dim=768, num_heads=12, dim_ff=3072, depth=12),
                 mem_ns=(512, 1024, 2048, 4096, 8192, 16384), mem_ks=(128, 256, 512, 1024, 2048)),
    "quick": dict(ns=(512, 1024, 2048), ks=(128, 256), model=dict(dim=256, num_heads=4, dim_ff=1024, depth=2),
                  tokens=4096, mem_model=dict(dim=768, num_heads=12, dim_ff=3072, depth=12),
                  mem_ns=(1024, 4096), mem_ks=(128,)),
    "tiny": dict(ns=(64, 256), ks=(32,), model=dict(dim=32, num_heads=2, dim_ff=64, depth=1), tokens=256,
                 mem_model=dict(dim=64, num_heads=4, dim_ff=128, depth=1), mem_ns=(256,), mem_ks=(32,)),
}

COLUMNS = ["section", "n", "k", "batch", "time_full_s", "time_linformer_s", "time_saved", "paper_time_saved",
           "flop_saved", "mem_full_bytes", "mem_linformer_bytes", "mem_saved", "paper_mem_saved", "temp_saved",
           "rss_saved", "time_saved_blocked", "mem_saved_blocked", "note"]


def _model(n, k, attention, geometry):
  return Linformer(max_len=n, k=min(k, n), attention=attention, sharing="layerwise", **geometry)


def _compile_forward(model, x_shape, run=True, standard=False):
  """(compiled program to run or None, abstract variables, compile seconds, counted memory).

  standard: the model with its attention never in query blocks (``bench_common.unblocked``: each head's n × n
  scores at once). FLOPs (``flops_of``) are always counted on the unblocked model: a loop body counts once."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  standard_model = unblocked(model)
  if standard:
    model = standard_model
  if not run:
    return None, variables, 0.0, counted_memory(model.apply, variables, x)
  compiled, seconds, memory = compile_fn(model.apply, variables, x, count_all_buffers=True,
                                         flops_fn=standard_model.apply)
  return compiled, variables, seconds, memory


def _has_blocked_baseline() -> bool:
  """Whether the full-attention model runs differently with query blocks (CPU only; see the module docstring)."""
  return not on_accelerator()




def _mem(memory):
  return memory["temp_bytes"] + memory["argument_bytes"]


def _ratios(row):
  paper = PAPER_TABLE3.get((row["n"], row["k"]))
  row["paper_time_saved"], row["paper_mem_saved"] = paper if paper else (None, None)
  if row.get("time_full_s") and row.get("time_linformer_s"):
    row["time_saved"] = round(row["time_full_s"] / row["time_linformer_s"], 3)
  if row.get("flops_full") and row.get("flops_linformer"):
    row["flop_saved"] = round(row["flops_full"] / row["flops_linformer"], 3)
  row["mem_saved"] = round(row["mem_full_bytes"] / row["mem_linformer_bytes"], 3)
  row["temp_saved"] = round(row["temp_full_bytes"] / row["temp_linformer_bytes"], 3)
  if row.get("rss_rise_full_bytes") and row.get("rss_rise_linformer_bytes"):
    row["rss_saved"] = round(row["rss_rise_full_bytes"] / row["rss_rise_linformer_bytes"], 3)
  if row.get("time_full_blocked_s") and row.get("time_linformer_s"):
    row["time_saved_blocked"] = round(row["time_full_blocked_s"] / row["time_linformer_s"], 3)
  if row.get("mem_full_blocked_bytes"):
    row["mem_saved_blocked"] = round(row["mem_full_blocked_bytes"] / row["mem_linformer_bytes"], 3)


def _print(row):
  t = f"{row['time_saved']:.2f}x" if row.get("time_saved") else "  –  "
  pt = row["paper_time_saved"] if row["paper_time_saved"] is not None else "–"
  pm = row["paper_mem_saved"] if row["paper_mem_saved"] is not None else "–"
  print(f"{row['section']:>12} n {row['n']:>5} k {row['k']:>4}: time saved {t} (paper {pt}x), memory saved "
        f"{row['mem_saved']:.1f}x (paper {pm}x) [full {fmt_bytes(row['mem_full_bytes'])}, linformer "
        f"{fmt_bytes(row['mem_linformer_bytes'])}]{_blocked_text(row)}{'  ' + row['note'] if row.get('note') else ''}",
        flush=True)


def _blocked_text(row):
  if not row.get("mem_saved_blocked"):
    return ""
  t = f"{row['time_saved_blocked']:.2f}x, " if row.get("time_saved_blocked") else ""
  return f"; vs blocked full attention {t}memory {row['mem_saved_blocked']:.1f}x"


def timed_section(sweep, repeats, budget):
  rows = []
  geometry = sweep["model"]
  for n in sweep["ns"]:
    batch = max(1, sweep["tokens"] // n)
    shape = (batch, n, geometry["dim"])
    full_model = _model(n, n, "full", geometry)
    full_c, full_abstract, full_compile_s, full_mem = _compile_forward(full_model, shape, standard=True)
    x = random_like(jax.ShapeDtypeStruct(shape, jnp.float32), seed=1, scale=1.0)
    full_vars = random_like(full_abstract)
    fns, lin, blocked = {}, {}, {}
    note = ""
    if _has_blocked_baseline():  # the same model and weights with CPU query blocks
      blocked_c, _, blocked_compile_s, blocked_mem = _compile_forward(full_model, shape)
      blocked = dict(mem_full_blocked_bytes=_mem(blocked_mem), temp_full_blocked_bytes=blocked_mem["temp_bytes"],
                     rss_rise_full_blocked_bytes=first_run_rss_rise(blocked_c, full_vars, x),
                     compile_full_blocked_s=round(blocked_compile_s, 3))
      fns["full_blocked"] = blocking(blocked_c, full_vars, x)
    if _mem(full_mem) <= budget:
      full_rss = first_run_rss_rise(full_c, full_vars, x)
      fns["full"] = blocking(full_c, full_vars, x)
    else:
      full_rss = None
      note = (f"full attention not run: XLA memory {_mem(full_mem) / 2**30:.1f} GiB > budget "
              f"{budget / 2**30:.1f} GiB (the n×n scores are {n * n * 4 / 2**30:.2f} GiB per head and sequence)")
    full_flops = flops_of(full_c)
    for k in [k for k in sweep["ks"] if k < n]:
      model = _model(n, k, "linformer", geometry)
      compiled, abstract, compile_s, mem = _compile_forward(model, shape)
      variables = random_like(abstract)
      lin[k] = dict(mem=mem, compile_s=compile_s, rss=first_run_rss_rise(compiled, variables, x),
                    flops=flops_of(compiled))
      fns[k] = blocking(compiled, variables, x)
    times = interleaved_median_times(fns, repeats=repeats)
    for k, res in lin.items():
      row = dict(section="time+memory", n=n, k=k, batch=batch, **geometry,
                 time_full_s=times.get("full"), time_linformer_s=times[k],
                 flops_full=full_flops, flops_linformer=res["flops"],
                 mem_full_bytes=_mem(full_mem), mem_linformer_bytes=_mem(res["mem"]),
                 temp_full_bytes=full_mem["temp_bytes"], temp_linformer_bytes=res["mem"]["temp_bytes"],
                 rss_rise_full_bytes=full_rss, rss_rise_linformer_bytes=res["rss"],
                 compile_full_s=round(full_compile_s, 3), compile_linformer_s=round(res["compile_s"], 3),
                 time_full_blocked_s=times.get("full_blocked"), **blocked, note=note)
      _ratios(row)
      rows.append(row)
      _print(row)
    del fns, full_c, full_vars
  return rows


def memory_section(sweep):
  rows = []
  geometry = sweep["mem_model"]
  for n in sweep["mem_ns"]:
    shape = (1, n, geometry["dim"])
    full_model = _model(n, n, "full", geometry)
    _, _, _, full_mem = _compile_forward(full_model, shape, run=False, standard=True)
    blocked = {}
    if _has_blocked_baseline():
      _, _, _, blocked_mem = _compile_forward(full_model, shape, run=False)
      blocked = dict(mem_full_blocked_bytes=_mem(blocked_mem), temp_full_blocked_bytes=blocked_mem["temp_bytes"])
    for k in [k for k in sweep["mem_ks"] if k < n]:
      _, _, _, mem = _compile_forward(_model(n, k, "linformer", geometry), shape, run=False)
      row = dict(section="memory only", n=n, k=k, batch=1, **geometry, mem_full_bytes=_mem(full_mem),
                 mem_linformer_bytes=_mem(mem), temp_full_bytes=full_mem["temp_bytes"],
                 temp_linformer_bytes=mem["temp_bytes"], **blocked, note="compiled, not executed")
      _ratios(row)
      rows.append(row)
      _print(row)
  return rows


def run(mode: str, repeats: int, max_mem_gib=None, ns=None, tokens=None, sections=("time", "memory"),
        block_rows=None):
  sweep = dict(SWEEPS[mode])
  if block_rows is not None:  # the models' query blocks (attention_block_rows), recorded in each row's geometry
    for key in ("model", "mem_model"):
      sweep[key] = dict(sweep[key], attention_block_rows=block_rows)
  if tokens:  # tokens per timed call (batch = max(1, tokens // n)): a GPU needs more than ~8k to be filled
    sweep["tokens"] = tokens
  if ns:  # a subset of the sequence lengths (e.g. one n again with a larger memory budget)
    sweep.update(ns=[n for n in sweep["ns"] if n in ns], mem_ns=[n for n in sweep["mem_ns"] if n in ns])
  budget = memory_budget(max_mem_gib)
  return ((timed_section(sweep, repeats, budget) if "time" in sections else [])
          + (memory_section(sweep) if "memory" in sections else []))


def plot(rows, path):
  def draw(axes):
    for ax, key, paper_key, label in ((axes[0], "time_saved", "paper_time_saved", "inference time saved (×)"),
                                      (axes[1], "mem_saved", "paper_mem_saved", "memory saved (×)")):
      timed = [r for r in rows if r["section"] == "time+memory"]
      for i, k in enumerate(sorted({r["k"] for r in timed})):
        pts = sorted((r["n"], r) for r in timed if r["k"] == k and r.get(key))
        if not pts:
          continue
        line, = ax.plot([n for n, _ in pts], [r[key] for _, r in pts], "-o", label=f"ours k={k}")
        paper = [(n, r[paper_key]) for n, r in pts if r[paper_key]]
        if paper:
          ax.plot(*zip(*paper), "--", color=line.get_color(), alpha=0.6, label=f"paper k={k}")
      ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=label)
      if ax.lines:  # a memory-only run has no timed rows to draw
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_title("Linformer / Transformer: time (dashed: paper Table 3)")
    axes[1].set_title("memory (XLA temp + arguments)")
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.add_argument("--max-mem-gib", type=float, default=None,
                 help="largest XLA memory a full-attention run may use (default: 60%% of MemAvailable; on a "
                      "GPU/TPU of the device memory)")
  p.add_argument("--ns", type=lambda v: [int(n) for n in v.split(",")], default=None,
                 help="only these sequence lengths of the sweep, comma-separated")
  p.add_argument("--tokens", type=int, default=None,
                 help="tokens per timed call, batch = max(1, tokens // n) (default: 8192; quick: 4096)")
  p.add_argument("--sections", default="time,memory",
                 help="comma-separated subset of: time (the timed section), memory (the memory-only section)")
  p.add_argument("--attention-block-rows", type=int, default=None,
                 help="queries per attention block of the Linformer and the blocked Transformer (0 = no blocks; "
                      "default: the backend's rule, blocks only for large scores on the CPU)")
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, max(args.repeats, 5), args.max_mem_gib, args.ns, args.tokens, args.sections.split(","),
             args.attention_block_rows)
  return finish(args, "efficiency", rows, COLUMNS, "Linformer vs Transformer inference (paper Table 3)",
                "time_saved = time_full_s / time_linformer_s (same run, interleaved, median of >= 5); "
                "mem = XLA temp + argument bytes of the jitted forward, every buffer counted (on CPU compiled "
                "without YNNPACK fusions, whose scratch XLA does not count); rss_saved = ratio of the peak-RSS "
                "rises of the timed programs' first runs; temp_saved = temp-only ratio; flop_saved = XLA FLOPs full / "
                "Linformer (the time ratio at equal FLOP rates); "
                "paper_* = Linformer paper Table 3 (V100, max batch).", plot)


if __name__ == "__main__":
  main()
