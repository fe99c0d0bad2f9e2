"""Exactly causal Linformer vs causal full attention: train-step time and memory, and the cost per generated token.

    python -m experiments.bench_causal --out DIR [--quick] [--ns N,...] [--contexts C,...] [--max-mem-gib G]
        [--max-step-s S]

Models: the trainer's byte-level ``linformer_lm`` (``steps.build_model``, vocabulary 256) with causal=True, either
``attention="linformer"`` (the exactly causal Linformer, ``linformer_jax.layers.causal_linformer``: learnable
projections, sharing "headwise", chunks of ``causal_chunk`` = 128 positions) at k = 128 and k = 256, or
``attention="full"`` (causal softmax attention, on the CPU in query blocks recomputed in the backward pass:
``linformer_jax.layers.default_block_rows``, the library's default). Same geometry on all sides: dim 256, 4 heads
(head dim 64), FF 1024, depth 2, batch 1.

Section "train step": the trainer's own ``steps.make_train_step`` (data kind "mlm": cross-entropy against
``targets`` with ``weights``; here targets are the next tokens, weight 0 on the last position, so it is the
next-token loss of a causal LM), jitted with the state donated (``bench_roofline.DonatingStep``), Adafactor
(``optim.make_optimizer``, default config). n = 1024 … 16384 (--quick: 256, 512). Per n every model is compiled, run
once (the warm-up, its time recorded), then timed in the same interleaved rounds (``interleaved_median_times``,
median of ``--repeats`` >= 3 rounds). Memory: XLA's compile-time temp bytes of the step, every buffer counted
(``bench_common.compile_fn`` / ``counted_memory``: on CPU from a compilation without YNNPACK fusions). On CPU the
full-attention rows also give ``temp_unblocked_bytes``: the same step with its attention never in query blocks
(``bench_common.unblocked``, a standard Transformer holding each head's n × n scores; compiled, not run). A model
whose XLA memory (temp + arguments) exceeds the budget (--max-mem-gib, default 60 % of MemAvailable), or whose
warm-up step takes longer than --max-step-s, is not timed; its row says why.

Section "decoding": the same models with ``decoding=True`` and ``max_len`` = the context C (1024, 4096, 16384;
--quick: 128, 256). The ``"cache"`` collection is built from ``jax.eval_shape(decoder.init, ...)``, filled (random
keys/values or Linformer states, every slot visible) and its counters (each layer's ``index``, the model's
``position``) set to C − 1. The timed program is one jitted ``lax.fori_loop`` of T = 64 steps (--quick: 16), each
``decoder.apply({**variables, "cache": cache}, token, mutable=["cache"])`` at position C − 1 followed by the argmax
(greedy, as ``linformer_jax.generate(..., temperature=0.0)`` does inside its ``lax.scan``), the counters put back
to C − 1 after every step and the cache donated, so it is updated in place as in ``generate``; time per token =
median call time / T (Python dispatch amortised over T tokens). The causal Linformer's state is (batch, heads, k, d)
float32 per layer, the full attention's key/value cache (batch, C, heads, d) per layer; cache_bytes = the
collection's bytes; step_temp_bytes = XLA temp bytes of one decoding step (counted as above).

Targets (issue 24, item 4): the Linformer's time per token flat (<= 1.2× from the shortest to the longest context)
and >= 4× faster per token than the KV cache at the longest context; met/missed is reported per k.
Rows: section, n (sequence length or context), model, attention, k, time_s (median step time, or time per
token), temp_bytes (step temp), argument_bytes, cache_bytes (decoding), full_over_linformer_time and
full_over_linformer_memory (on Linformer rows: full attention's / this row's; train: temp bytes, decoding: cache
bytes), vs_shortest (decoding: time per token / that at the shortest context), compile_s, warmup_s, note.
Writes DIR/causal.{json,md,png}.
"""
from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_common import (bench_parser, compile_fn, counted_memory, host_load, interleaved_median_times,
                                      markdown_table, memory_budget, on_accelerator, random_like, sweep_mode,
                                      unblocked, write_outputs, write_plot)
from experiments.bench_roofline import DonatingStep
from linformer_jax import steps
from linformer_jax.optim import default_optimizer_config, make_optimizer

NAME = "causal"
VOCAB_SIZE = 256
TARGET_FLAT, TARGET_SPEEDUP = 1.2, 4.0  # decoding: Linformer <= 1.2× from shortest to longest, >= 4× the KV cache
SIZES = {
    "full": dict(ns=(1024, 2048, 4096, 8192, 16384), contexts=(1024, 4096, 16384), ks=(128, 256),
                 geometry=dict(dim=256, num_heads=4, dim_ff=1024, depth=2), batch=1, tokens_per_call=64),
    # CPU smoke sizes: k below every n and context of the sweep
    "quick": dict(ns=(256, 512), contexts=(128, 256), ks=(32, 64),
                  geometry=dict(dim=256, num_heads=4, dim_ff=1024, depth=2), batch=1, tokens_per_call=16),
    # the tests' sweep: one n (each train step compiles in seconds), two contexts
    "tiny": dict(ns=(64,), contexts=(32, 64), ks=(16,), geometry=dict(dim=32, num_heads=2, dim_ff=64, depth=1,
                                                                      causal_chunk=16),
                 batch=1, tokens_per_call=4),
}
TRAIN_COLUMNS = ["n", "model", "time_s", "full_over_linformer_time", "temp_bytes", "full_over_linformer_memory",
                 "temp_unblocked_bytes", "argument_bytes", "warmup_s", "compile_s", "note"]
DECODE_COLUMNS = ["n", "model", "time_s", "vs_shortest", "full_over_linformer_time", "cache_bytes",
                  "full_over_linformer_memory", "temp_bytes", "compile_s", "note"]


def lm(n: int, attention: str, k: int, geometry: dict, decoding: bool = False):
  """The trainer's causal byte-level LM for sequences (or a context) of n (``steps.build_model``)."""
  model = steps.build_model({"name": "linformer_lm", "causal": True, "attention": attention, "k": min(k, n),
                             **geometry}, {"kind": "mlm", "vocab_size": VOCAB_SIZE, "max_len": n})
  return model.clone(decoding=True) if decoding else model


def label(attention: str, k: int) -> str:
  return f"linformer k={k}" if attention == "linformer" else "full"


def next_token_batch(batch: int, n: int, seed: int = 0) -> dict:
  """A "mlm"-kind batch that is the next-token task: targets[t] = inputs[t + 1], the last position unscored."""
  tokens = np.random.default_rng(seed).integers(0, VOCAB_SIZE, (batch, n + 1), dtype=np.int32)
  weights = np.ones((batch, n), np.float32)
  weights[:, -1] = 0.0  # nothing follows the last input here (its target is a random byte): not scored
  return jax.tree.map(jnp.asarray, {"inputs": tokens[:, :-1], "mask": np.ones((batch, n), bool),
                                    "targets": tokens[:, 1:], "weights": weights})


def random_state(model, tx, batch: dict) -> steps.TrainState:
  """A train state with random parameters (``random_like``: no forward pass is run to initialise, which at 16k
  would cost a full-attention forward) and the optimizer's own initial state."""
  abstract = steps.abstract_train_state(model, tx, batch, "mlm")
  params = random_like(abstract.params)
  return steps.TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params),
                          random_like(abstract.model_state))


def _mem_note(memory, budget):
  total = memory["temp_bytes"] + memory["argument_bytes"]
  return (f"not timed: XLA memory {total / 2**30:.2f} GiB > budget {budget / 2**30:.2f} GiB"
          if total > budget else "")


def train_section(sizes, repeats: int, budget: int, max_step_s: float) -> list[dict]:
  rows = []
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  rng = jax.random.key(1)
  for n in sizes["ns"]:
    batch = next_token_batch(sizes["batch"], n)
    models = {label(a, k): (a, k, lm(n, a, k, sizes["geometry"]))
              for a, k in [("linformer", k) for k in sizes["ks"] if k < n] + [("full", n)]}
    runs, results = {}, {}
    for name, (attention, k, model) in models.items():
      state = random_state(model, tx, batch)
      step = steps.make_train_step(model, tx, "mlm")
      compiled, compile_s, memory = compile_fn(step, state, batch, rng, donate_argnums=0, count_all_buffers=True)
      row = dict(section="train step", n=n, model=name, attention=attention, k=k if attention == "linformer" else None,
                 batch=sizes["batch"], **sizes["geometry"], **memory, compile_s=round(compile_s, 3),
                 step="linformer_jax.steps.make_train_step (mlm kind, next-token targets)",
                 note=_mem_note(memory, budget))
      if attention == "full" and not on_accelerator():  # the standard Transformer: n × n scores per head at once
        row["temp_unblocked_bytes"] = counted_memory(steps.make_train_step(unblocked(model), tx, "mlm"), state,
                                                     batch, rng)["temp_bytes"]
      if not row["note"]:
        run = DonatingStep(compiled, state, batch, rng)
        row["warmup_s"] = _timed(run)
        if row["warmup_s"] > max_step_s:
          row["note"] = f"not timed: the warm-up step took {row['warmup_s']:.0f} s > --max-step-s {max_step_s:g}"
        else:
          runs[name] = run
      results[name] = row
    for name, seconds in interleaved_median_times(runs, repeats=repeats, warmup=0).items():
      results[name]["time_s"] = seconds
    _ratios(results, "temp_bytes")
    for row in results.values():
      rows.append(row)
      _print(row)
    del runs
  return rows


def _timed(fn) -> float:
  """Seconds of one call of fn (the warm-up run)."""
  t0 = time.perf_counter()
  fn()
  return round(time.perf_counter() - t0, 3)


def _ratios(results: dict, memory_key: str):
  """On the Linformer rows: full attention's time and memory over the row's."""
  full = results.get("full")
  for row in results.values():
    if row["attention"] != "linformer" or full is None:
      continue
    if full.get("time_s") and row.get("time_s"):
      row["full_over_linformer_time"] = round(full["time_s"] / row["time_s"], 3)
    row["full_over_linformer_memory"] = round(full[memory_key] / row[memory_key], 3)


def _print(row):
  t = f"{row['time_s'] * 1e3:10.3f} ms" if row.get("time_s") else "     –    "
  ratio = f", full/linformer time {row['full_over_linformer_time']:.2f}x" if row.get("full_over_linformer_time") \
      else ""
  mem = (f"cache {row['cache_bytes'] / 2**20:8.2f} MiB" if row["section"] == "decoding"
         else f"temp {row['temp_bytes'] / 2**20:8.1f} MiB")
  print(f"{row['section']:>10} n {row['n']:>5} {row['model']:>16}: {t}, {mem}{ratio}"
        f"{'  ' + row['note'] if row.get('note') else ''}", flush=True)


def filled_cache(abstract_cache, position: int):
  """A decoding cache as it stands before position ``position``: random keys/values (or Linformer states), every
  Linformer slot visible, every counter (layer ``index``, model ``position``) = position."""
  def fill(a):
    if jnp.issubdtype(a.dtype, jnp.integer):
      return jnp.full(a.shape, position, a.dtype)
    if a.dtype == jnp.bool_:
      return jnp.ones(a.shape, bool)
    return random_like(a, seed=3, scale=1.0)
  return jax.tree.map(fill, abstract_cache)


def tree_bytes(tree) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def decode_tokens(decoder, count: int):
  """``run(variables, cache, token) -> (cache, token)``: ``count`` greedy decoding steps in a ``lax.fori_loop``, each
  at the cache's own position (its integer counters are put back after every step, everything else is updated)."""
  def one_step(variables, cache, token):
    logits, updates = decoder.apply({**variables, "cache": cache}, token, mutable=["cache"])
    return updates["cache"], jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]

  def run(variables, cache, token):
    def body(_, carry):
      cache, token = carry
      new, token = one_step(variables, cache, token)
      keep = jax.tree.map(lambda n, o: o if jnp.issubdtype(o.dtype, jnp.integer) else n, new, cache)
      return keep, token
    return jax.lax.fori_loop(0, count, body, (cache, token))
  return run, one_step


class DonatingDecode:
  """Runs the compiled ``run(variables, cache, token)`` once, the cache donated and replaced by the returned one."""

  def __init__(self, compiled, variables, cache, token):
    self.compiled, self.variables, self.cache, self.token = compiled, variables, cache, token

  def __call__(self):
    self.cache, self.token = jax.block_until_ready(self.compiled(self.variables, self.cache, self.token))


def decode_section(sizes, repeats: int, budget: int) -> list[dict]:
  rows, count = [], sizes["tokens_per_call"]
  shortest = {}
  for context in sizes["contexts"]:
    token = jnp.zeros((sizes["batch"], 1), jnp.int32)
    runs, results = {}, {}
    for attention, k in [("linformer", k) for k in sizes["ks"] if k < context] + [("full", context)]:
      name = label(attention, k)
      decoder = lm(context, attention, k, sizes["geometry"], decoding=True)
      abstract = jax.eval_shape(decoder.init, jax.random.key(0), token)
      variables = random_like({c: v for c, v in abstract.items() if c != "cache"})
      cache = filled_cache(abstract["cache"], context - 1)
      run, one_step = decode_tokens(decoder, count)
      compiled, compile_s, _ = compile_fn(run, variables, cache, token, donate_argnums=1)
      memory = counted_memory(one_step, variables, cache, token)
      row = dict(section="decoding", n=context, model=name, attention=attention,
                 k=k if attention == "linformer" else None, batch=sizes["batch"], **sizes["geometry"],
                 cache_bytes=tree_bytes(cache), temp_bytes=memory["temp_bytes"],
                 argument_bytes=memory["argument_bytes"], compile_s=round(compile_s, 3), tokens_per_call=count,
                 position=context - 1, note=_mem_note(memory, budget))
      if not row["note"]:
        runs[name] = DonatingDecode(compiled, variables, cache, token)
      results[name] = row
    for name, seconds in interleaved_median_times(runs, repeats=repeats).items():
      results[name]["time_s"] = seconds / count
    _ratios(results, "cache_bytes")
    for name, row in results.items():
      if row.get("time_s"):
        shortest.setdefault(name, row["time_s"])
        row["vs_shortest"] = round(row["time_s"] / shortest[name], 3)
      rows.append(row)
      _print(row)
  return rows


def check_targets(rows) -> list[str]:
  """Met/missed for the decoding targets, per Linformer k, on the sweep's shortest and longest contexts."""
  dec = [r for r in rows if r["section"] == "decoding" and r.get("time_s")]
  if not dec:
    return ["Decoding targets: no timed decoding rows."]
  lo, hi = min(r["n"] for r in dec), max(r["n"] for r in dec)
  lines = [f"Decoding targets (issue 24): the causal Linformer's time per token flat, <= {TARGET_FLAT}× from context "
           f"{lo} to {hi}, and >= {TARGET_SPEEDUP:g}× faster per token than the KV cache at {hi} (✅ met, ❌ missed):",
           ""]
  for k in sorted({r["k"] for r in dec if r["attention"] == "linformer"}):
    first = next((r for r in dec if r["k"] == k and r["n"] == lo), None)
    last = next((r for r in dec if r["k"] == k and r["n"] == hi), None)
    if first is None or last is None:
      lines.append(f"- k={k}: not measured at both {lo} and {hi}")
      continue
    flat = last["time_s"] / first["time_s"]
    lines.append(f"- k={k}: {first['time_s'] * 1e3:.3f} → {last['time_s'] * 1e3:.3f} ms per token, {flat:.2f}× "
                 f"{'✅' if flat <= TARGET_FLAT else '❌'}; the KV cache is "
                 + (f"{last['full_over_linformer_time']:.2f}× slower at {hi} "
                    f"{'✅' if last['full_over_linformer_time'] >= TARGET_SPEEDUP else '❌'}"
                    if last.get("full_over_linformer_time") else f"not timed at {hi} ❌"))
  return lines


def train_summary(rows) -> list[str]:
  """Log-log slopes of step time and temp memory over n per model (1 = linear in n, 2 = quadratic)."""
  lines = ["Train step, log-log slope over n (1 = linear, 2 = quadratic):", ""]
  train = [r for r in rows if r["section"] == "train step"]
  for name in dict.fromkeys(r["model"] for r in train):
    pts = sorted((r["n"], r) for r in train if r["model"] == name)
    (n0, a), (n1, b) = pts[0], pts[-1]
    if n0 == n1:
      continue
    span = math.log(n1 / n0)
    time = (f"time {math.log(b['time_s'] / a['time_s']) / span:.2f}" if a.get("time_s") and b.get("time_s")
            else "time –")
    mem = f"temp memory {math.log(b['temp_bytes'] / a['temp_bytes']) / span:.2f}"
    extra = ""
    if a.get("temp_unblocked_bytes"):
      extra = (f" (without query blocks: "
               f"{math.log(b['temp_unblocked_bytes'] / a['temp_unblocked_bytes']) / span:.2f})")
    lines.append(f"- {name}: n {n0} → {n1}: {time}, {mem}{extra}")
  return lines if len(lines) > 2 else []


def notes(mode: str, repeats: int) -> str:
  s = SIZES[mode]
  g = s["geometry"]
  return (
      f"Geometry: dim {g['dim']}, {g['num_heads']} heads, FF {g['dim_ff']}, depth {g['depth']}, batch {s['batch']}, "
      f"vocabulary {VOCAB_SIZE}; the causal Linformer with learnable projections (sharing headwise), chunk "
      f"{g.get('causal_chunk', 128)}; full = causal softmax attention (on CPU in query blocks, recomputed in the "
      "backward pass: the library's default).\n\n"
      f"Train step: `steps.make_train_step` (next-token cross-entropy, Adafactor), state donated; time_s = median of "
      f"{repeats} interleaved rounds after a warm-up step (warmup_s, compilation excluded: compile_s); temp_bytes = "
      "XLA compile-time temp memory of the step, every buffer counted (on CPU compiled without YNNPACK fusions); "
      "temp_unblocked_bytes = the same for full attention without query blocks (a standard Transformer holding each "
      "head's n × n scores; compiled, not run).\n\n"
      f"Decoding: time_s = time per token: a jitted `lax.fori_loop` of {s['tokens_per_call']} greedy steps of "
      "`decoder.apply({**variables, 'cache': cache}, token, mutable=['cache'])` at position n − 1 (the cache built "
      "with `jax.eval_shape(decoder.init, ...)`, filled, its counters set to n − 1 and put back after each step, "
      "donated so it updates in place as inside `linformer_jax.generate`'s scan), median of "
      f"{repeats} interleaved rounds / {s['tokens_per_call']}; each model's max_len = n. cache_bytes = the "
      "`cache` collection (Linformer: a (batch, heads, k, d) float32 key state and value state per layer; full: a "
      "(batch, n, heads, d) key and value cache per layer); temp_bytes = XLA temp of one step; vs_shortest = time "
      "per token / that at the shortest context. full_over_linformer_* on the Linformer rows: full attention's "
      "time (memory: train temp bytes, decoding cache bytes) over the row's.")


def write_report(out_dir, rows, text: str) -> pathlib.Path:
  """DIR/causal.json (rows, each with the machine) and DIR/causal.md (header as ``write_outputs``, two tables)."""
  train = [r for r in rows if r["section"] == "train step"]
  dec = [r for r in rows if r["section"] == "decoding"]
  body = ("## Train step (forward + backward + Adafactor update)\n\n" + markdown_table(train, TRAIN_COLUMNS)
          + "\n## Decoding (per generated token, at position n − 1)\n\n" + markdown_table(dec, DECODE_COLUMNS))
  return write_outputs(out_dir, NAME, rows, [], "Exactly causal Linformer: train step and decoding vs causal full "
                       "attention", notes=text, body=body)


def plot(rows, path):
  def draw(axes):
    for ax, section, key, scale, ylabel, title in (
        (axes[0], "train step", "time_s", 1.0, "step time (s)", "train step time"),
        (axes[1], "train step", "temp_bytes", 2.0 ** -20, "XLA temp memory (MiB)", "train step memory"),
        (axes[2], "decoding", "time_s", 1e3, "time per token (ms)", "decoding, per token")):
      sel = [r for r in rows if r["section"] == section]
      for name in dict.fromkeys(r["model"] for r in sel):
        pts = sorted((r["n"], r[key] * scale) for r in sel if r["model"] == name and r.get(key))
        if pts:
          ax.plot(*zip(*pts), "-o", label=name)
      if section == "train step" and key == "temp_bytes":
        pts = sorted((r["n"], r["temp_unblocked_bytes"] * scale) for r in sel if r.get("temp_unblocked_bytes"))
        if pts:
          ax.plot(*zip(*pts), "--", color="gray", label="full, no query blocks (not run)")
      ax.set(xscale="log", yscale="log", xlabel="context n" if section == "decoding" else "sequence length n",
             ylabel=ylabel, title=title)
      if ax.lines:
        ax.legend(fontsize=7)
  write_plot(path, draw, ncols=3, figsize=(15, 4))


def main(argv=None):
  p = bench_parser(__doc__, quick_help="CPU smoke sizes (a few minutes on one core)")
  p.add_argument("--ns", type=lambda v: [int(n) for n in v.split(",")], default=None,
                 help="train-step sequence lengths, comma-separated (default: the sweep's)")
  p.add_argument("--contexts", type=lambda v: [int(n) for n in v.split(",")], default=None,
                 help="decoding contexts, comma-separated (default: the sweep's)")
  p.add_argument("--max-mem-gib", type=float, default=None,
                 help="largest XLA memory (temp + arguments) a run may use (default: 60%% of MemAvailable; on a "
                      "GPU/TPU of the device memory)")
  p.add_argument("--max-step-s", type=float, default=300.0,
                 help="a train step whose warm-up run takes longer is not timed (default 300)")
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  sizes = dict(SIZES[mode])
  if args.ns:
    sizes["ns"] = args.ns
  if args.contexts:
    sizes["contexts"] = args.contexts
  repeats = max(args.repeats, 3)
  budget = memory_budget(args.max_mem_gib)
  rows = train_section(sizes, repeats, budget, args.max_step_s) + decode_section(sizes, repeats, budget)
  summary = train_summary(rows)
  lines = summary + [""] * bool(summary) + check_targets(rows)
  print("\n".join(lines))
  load = host_load()
  where = (f"Ran on {load['usable_cores']} usable core(s), load average {load['loadavg'][0]} at the end "
           f"({mode} sizes).")
  out = write_report(args.out, rows, where + "\n\n" + "\n".join(lines) + "\n\n" + notes(mode, repeats))
  plot(rows, out / f"{NAME}.png")
  print(f"wrote {out / NAME}.json, .md, .png")
  return rows


if __name__ == "__main__":
  main()
