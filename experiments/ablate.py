"""Ablation sweeps: every run of a sweep through the normal trainer, then JSON + markdown + PNG.

    python -m experiments.ablate --sweep NAME --out DIR [--quick] [--seeds 0,1,2] [--arms a,b]
    python -m experiments.ablate --list

The sweeps live beside their configs (``get_sweeps()`` in ``configs/*.py``; ``configs.sweep.Sweep``). Each run
(arm × seed) trains with ``linformer_jax.train.train_and_evaluate`` in its own workdir ``DIR/NAME/<arm>_seed<s>``, so
it resumes from its checkpoints; a finished run leaves ``ablate_run.json`` there and is skipped next time. Outputs:
``DIR/NAME.json`` (a row per run: overrides, final metrics, steps, wall time, curves, parameter count, optimizer-state
bytes; a summary per arm: mean ± std over seeds), ``DIR/NAME.md`` and ``DIR/NAME.png`` (curves per arm). ``--quick``
runs the arms on the config's ``runlocal`` variant, one seed (the tests). ListOps sweeps also score the final
checkpoint on the *test* split; ``linformer_n`` scores every final checkpoint on the *same* masked bytes
(``common_eval_*``). A run stopped by a non-finite loss is recorded as ``diverged``, not failing the sweep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from configs.sweep import Sweep, find_sweeps
from experiments import bench_common
from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import steps
from linformer_jax import train as train_lib  # train_lib.train_and_evaluate: looked up per call (tests patch it)
from linformer_jax.data import make_dataset
from linformer_jax.metrics import read_metrics
from linformer_jax.optim import HORIZON_SCHEDULES, make_optimizer

RUN_MARKER = "ablate_run.json"
SWEEPS = find_sweeps()  # {name: Sweep}: the get_sweeps() of configs/*.py


# Sizes and final-checkpoint scores of a run, built with linformer_jax.steps as the trainer builds them ---------------
def _built(config, workdir, batch_size: int):
  """(dataset, model, data kind, abstract TrainState: shapes only, nothing compiled) of a run's config."""
  dataset = make_dataset(config.data, str(workdir))
  model, kind = steps.build_model(config.model, dataset.info), dataset.info["kind"]
  tx = make_optimizer(config.optimizer, config.total_steps).tx
  return dataset, model, kind, steps.abstract_train_state(model, tx, dataset.batch_at(0, batch_size), kind)


def _state_sizes(config, workdir) -> dict:
  """Parameter count and optimizer-state bytes (exact, from the abstract train state)."""
  state = _built(config, workdir, min(2, config.batch_size))[3]
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  return {"param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
          "param_bytes": nbytes(state.params), "opt_state_bytes": nbytes(state.opt_state)}


def _restore_final(config, workdir):
  """(dataset, final TrainState restored from the run's checkpoints, its step, jitted eval_step)."""
  dataset, model, kind, abstract = _built(config, workdir, config.batch_size)
  checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", asynchronous=False)
  try:
    step = checkpointer.latest_step()
    state, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return dataset, state, int(step), jax.jit(steps.make_eval_step(model, kind))


def evaluate_split(config, workdir, split: str) -> dict:
  """Accuracy/loss on ``split`` of the final checkpoint in ``workdir``."""
  dataset, state, step, eval_step = _restore_final(config, workdir)
  bs = config.get("eval_batch_size") or config.batch_size
  totals = steps.eval_sums(eval_step, state, dataset.eval_batches(bs, split=split))
  w = max(totals["weight"], 1.0)
  out = {f"{split}_loss": totals["loss"] / w, f"{split}_accuracy": totals["correct"] / w,
         f"{split}_examples": int(totals["weight"]), f"{split}_checkpoint_step": step}
  if hasattr(dataset, "outer_operator_accuracy"):  # ListOps: the same split's outermost-operator baseline
    out[f"{split}_baseline_outer_operator_accuracy"] = dataset.outer_operator_accuracy(split)
  return out


def evaluate_common(config, workdir, length: int) -> dict:
  """MLM loss/accuracy/perplexity of the final checkpoint on the same masked bytes for every n: the eval set of
  ``data.max_len = length`` (same corpus, seed and num_eval), each of its chunks cut into ``length / n`` pieces
  of this run's n = data.max_len (so every byte is scored with at most n bytes of context)."""
  n = config.data.max_len
  if length % n:
    raise ValueError(f"common eval length {length} must be a multiple of data.max_len={n}.")
  own, state, step, eval_step = _restore_final(config, workdir)
  if own.info["kind"] != "mlm":
    raise ValueError(f"common_eval needs an MLM sweep, got data kind {own.info['kind']!r}.")
  common = ml_collections.ConfigDict(config.data.to_dict())
  common.max_len = length
  dataset = make_dataset(common, str(workdir))
  rows = max(1, (config.get("eval_batch_size") or config.batch_size) * n // length)

  def pieces():
    for batch in dataset.eval_batches(rows):
      valid = batch["valid"]
      cut = {k: np.asarray(batch[k])[valid].reshape(-1, n) for k in ("inputs", "targets", "weights", "mask")}
      real = cut["mask"].any(-1)  # drop pieces of pure padding (the corpus' last chunk)
      yield {k: v[real] for k, v in cut.items()}

  totals = steps.eval_sums(eval_step, state, pieces())
  w = max(totals["weight"], 1.0)
  loss = totals["loss"] / w
  return {"common_eval_loss": loss, "common_eval_accuracy": totals["correct"] / w,
          "common_eval_perplexity": float(np.exp(min(loss, 50.0))), "common_eval_bytes": int(totals["weight"]),
          "common_eval_len": int(length), "common_eval_checkpoint_step": step}


# One run --------------------------------------------------------------------------------------------------------------
class SweepStopped(Exception):
  """A run was stopped by SIGTERM/SIGINT: no marker, no outputs; rerunning the command continues it."""


def run_one(sweep: Sweep, arm: str, overrides: dict, seed: int, out: pathlib.Path, quick: bool,
            extra: Optional[dict] = None, log=print) -> dict:
  """Trains one run (or returns its recorded row if it already finished) → row dict."""
  config = sweep.run_config(overrides, seed, quick, extra)
  workdir = out / sweep.name / f"{arm}_seed{seed}"
  key = sweep.run_key(overrides, seed, quick, extra)
  marker, previous_wall = workdir / RUN_MARKER, 0.0
  if marker.exists():
    row = json.loads(marker.read_text())
    if row.get("run_key") != key:
      raise ValueError(f"{workdir} holds a finished run of another config (run key {row.get('run_key')} != "
                       f"{key}); delete it or use another --out.")
    if row["steps"] > config.total_steps and row["status"] == "ok":
      raise ValueError(f"{workdir} holds a run of {row['steps']} steps, more than total_steps="
                       f"{config.total_steps}; pass --total_steps {row['steps']} or use another --out.")
    if row["steps"] == config.total_steps or row["status"] != "ok":
      if sweep.common_eval and row["status"] == "ok" and "common_eval_perplexity" not in row["final"]:
        row["final"].update(evaluate_common(config, workdir, sweep.longest_max_len(quick, extra)))
        marker.write_text(json.dumps(_plain(row), indent=1, allow_nan=False))  # a run recorded without it
        log(f"[{sweep.name}] {arm} seed {seed}: added common_eval_perplexity "
            f"{row['final']['common_eval_perplexity']:.3f}")
      log(f"[{sweep.name}] {arm} seed {seed}: done already, skipped")
      return {**row, "skipped": True}
    schedule = config.optimizer.schedule
    if callable(schedule) or schedule in HORIZON_SCHEDULES:
      what = "a callable schedule may depend" if callable(schedule) else f"schedule={schedule!r} depends"
      raise ValueError(f"{workdir} holds a finished run of {row['steps']} steps; it cannot be extended to "
                       f"{config.total_steps} because {what} on total_steps.")
    previous_wall = row["wall_time_s"]  # extend: resume from the final checkpoint (the schedule and the
    marker.unlink()                     # step-indexed data do not depend on total_steps, so this equals a
    log(f"[{sweep.name}] {arm} seed {seed}: extending {row['steps']} → {config.total_steps} steps")  # longer run)
  log(f"[{sweep.name}] {arm} seed {seed}: training {config.total_steps} steps in {workdir}")
  t0 = time.perf_counter()
  status, error, final = "ok", None, {}
  try:
    final = train_lib.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # recorded, not fatal: instability is a result of some ablations
    status, error = "diverged", str(e)
  if final.get("preempted"):  # SIGTERM/SIGINT: the trainer wrote a checkpoint; the run is not finished
    raise SweepStopped(f"[{sweep.name}] {arm} seed {seed}: stopped by {final['signal']} after step "
                       f"{final['step']} (checkpoint written in {workdir}); run the same command again to "
                       "continue.")
  wall = time.perf_counter() - t0 + previous_wall
  metrics = read_metrics(workdir)
  curve = lambda metric: [[r["step"], r[metric]] for r in metrics if metric in r]
  applied = {**sweep.arm_overrides(overrides, quick), **(extra or {})}
  row = {"sweep": sweep.name, "arm": arm, "seed": seed, "overrides": applied, "status": status, "error": error,
         "wall_time_s": wall,
         "steps": final.get("step", max([r["step"] for r in metrics], default=0)),
         "final": {k: v for k, v in final.items() if k != "step"},
         "eval_curve": curve(sweep.metric), "train_loss_curve": curve("loss"),
         "steps_per_s": statistics.median([r["steps_per_s"] for r in metrics  # the first row includes compilation
                                           if "steps_per_s" in r and "time_to_first_step_s" not in r] or [0.0]),
         "time_to_first_step_s": next((r["time_to_first_step_s"] for r in metrics
                                       if "time_to_first_step_s" in r), None),
         "run_key": key, "config": json.loads(config.to_json_best_effort())}
  row.update(_state_sizes(config, workdir))
  if sweep.test_split and status == "ok":
    row["final"].update(evaluate_split(config, workdir, "test"))
  if sweep.common_eval and status == "ok":
    row["final"].update(evaluate_common(config, workdir, sweep.longest_max_len(quick, extra)))
  jax.clear_caches()
  row = _plain(row)
  marker.write_text(json.dumps(row, indent=1, allow_nan=False))
  shown = {k: v for k, v in row["final"].items() if isinstance(v, float)}
  log(f"[{sweep.name}] {arm} seed {seed}: {status} in {wall:.0f}s {json.dumps(shown)}")
  return row


# Aggregation and outputs ----------------------------------------------------------------------------------------------
_BASELINE_NAMES = {"baseline_unigram_perplexity": "unigram perplexity", "baseline_majority_accuracy": "majority class",
                   "baseline_outer_operator_accuracy": "outermost-operator lookup table"}


def _headline(sweep: Sweep) -> list:
  """The summarised metrics: the sweep's, test accuracy (test_split), eval accuracy (MLM), the common scores."""
  keys = [sweep.metric] + ["test_accuracy"] * sweep.test_split
  keys += ["eval_accuracy"] * (sweep.metric == "eval_perplexity")
  return keys + ["common_eval_perplexity", "common_eval_accuracy"] * sweep.common_eval


def summarize(sweep: Sweep, rows: list) -> list:
  """One row per arm: mean ± std (over seeds; std = 0 for one seed) of the headline metrics."""
  out = []
  for arm in dict.fromkeys(r["arm"] for r in rows):
    runs = [r for r in rows if r["arm"] == arm]
    ok = [r for r in runs if r["status"] == "ok"]
    s = {"arm": arm, "overrides": runs[0]["overrides"], "seeds": [r["seed"] for r in runs],
         "diverged": sum(r["status"] != "ok" for r in runs), "steps": max(r["steps"] for r in runs),
         "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
         "steps_per_s": statistics.mean(r["steps_per_s"] for r in runs),
         "param_count": runs[0]["param_count"], "opt_state_bytes": runs[0]["opt_state_bytes"]}
    for key in _headline(sweep):
      vals = [r["final"][key] for r in ok if key in r["final"]]
      s[key + "_mean"] = statistics.mean(vals) if vals else None
      s[key + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else (0.0 if vals else None)
    out.append(s)
  ref = next((s for s in out if s["arm"] == sweep.reference), None)
  for s in out:
    mean, ref_mean = s[sweep.ratio_metric + "_mean"], ref and ref[sweep.ratio_metric + "_mean"]
    s["vs_reference"] = mean / ref_mean if mean is not None and ref_mean else None
  return out


def _overridden_note(sweep: Sweep, rows, extra, quick: bool) -> list:
  """A line saying where this run departs from the sweep's own settings (the "Shrunk" text describes those)."""
  seeds = sorted({r["seed"] for r in rows})
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  parts = [f"{k}={json.dumps(v)}" for k, v in (extra or {}).items()]
  if not quick and seeds != sorted(sweep.seeds):
    parts.append(f"seeds {', '.join(map(str, seeds))}")
  if arms != [a for a, _ in sweep.arms]:
    parts.append(f"arms {', '.join(arms)} only")
  return [f"**This run differs from that:** {'; '.join(parts)}.", ""] if parts else []


def write_markdown(sweep: Sweep, rows: list, summary: list, path: pathlib.Path, quick: bool, machine: dict,
                   extra: Optional[dict] = None) -> None:
  pct = sweep.metric == "eval_accuracy"
  table = []
  for s in summary:
    n = len(s["seeds"]) - s["diverged"]
    t = {"arm": s["arm"], "overrides": ", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "(base)",
         "seeds": len(s["seeds"]), "diverged": s["diverged"], "steps": s["steps"]}
    for key in _headline(sweep):
      mean, std, scale = s[key + "_mean"], s[key + "_std"], 100.0 if "accuracy" in key else 1.0
      t[key + (" %" if "accuracy" in key else "")] = "–" if mean is None else (
          f"{mean * scale:.2f}" + (f" ± {std * scale:.2f}" if n > 1 else ""))
    if sweep.reference:
      t[f"÷ {sweep.reference}"] = "–" if s["vs_reference"] is None else f"{s['vs_reference']:.3f}"
    b = s["opt_state_bytes"]
    t.update({"params": s["param_count"],
              "opt state": f"{b / 1024:.1f} KiB" if b < 1024 ** 2 else f"{b / 1024 ** 2:.2f} MiB",
              "steps/s": f"{s['steps_per_s']:.2f}", "wall s/run": f"{s['wall_time_s']:.0f}"})
    table.append(t)
  module, _, arg = sweep.config.partition(":")
  arg = "runlocal" if quick else arg
  baselines = {}  # baseline_* entries of the first run that has each (the same data for every run)
  for r in rows:
    for k, v in r["final"].items():
      if k.startswith(("baseline_", "test_baseline_")) and v is not None:
        baselines.setdefault(k, v)
  base_text = "; ".join(f"{_BASELINE_NAMES.get(k.removeprefix('test_'), k)}"
                        f"{' (test split)' if k.startswith('test_') else ''} {v * (100 if pct else 1):.2f}"
                        for k, v in baselines.items())
  lines = [f"# Ablation sweep `{sweep.name}`{' (--quick)' if quick else ''}", "",
           f"Command: `python -m experiments.ablate --sweep {sweep.name} --out DIR{' --quick' if quick else ''}"
           + "".join(f" --total_steps {v}" if k == "total_steps" else f" --set {k}={json.dumps(v)}"
                     for k, v in (extra or {}).items()) + "`; "
           f"base config `configs/{module}.py{':' + arg if arg else ''}`"
           f" + `{json.dumps(sweep.base_for(quick))}`.", "",
           f"Machine: {machine['cpu']}, {machine['cores']} cores, backend {machine['backend']}, jax {machine['jax']}.",
           "", f"**Paper claim.** {sweep.claim}", "", f"**Shrunk.** {sweep.shrunk}", "",
           *_overridden_note(sweep, rows, extra, quick),
           f"Headline metric: final `{sweep.metric}` (mean ± population std over seeds when there are several)"
           + (f"; baselines (validation split unless marked): {base_text}" if base_text else "")
           + (f"; the ÷ {sweep.reference} column divides `{sweep.ratio_metric}`"
              if sweep.reference and sweep.ratio_metric != sweep.metric else "") + ".",
           "", bench_common.markdown_table(table, list(table[0])) if table else "(no runs)", ""]
  bad = [r for r in rows if r["status"] != "ok"]
  if bad:
    lines += ["Runs stopped by a non-finite loss:", ""]
    lines += [f"- `{r['arm']}` seed {r['seed']}: {r['error']}" for r in bad] + [""]
  lines += [f"Per-run rows, eval curves and the final metrics of every run: `{sweep.name}.json`; curves: "
            f"`{sweep.name}.png`.", ""]
  path.write_text("\n".join(lines))


def write_plot(sweep: Sweep, rows: list, path: pathlib.Path) -> None:
  import matplotlib.ticker

  def draw(axes):
    for arm in dict.fromkeys(r["arm"] for r in rows):
      for ax, key in zip(axes, ("eval_curve", "train_loss_curve")):
        curves = [{s: y for s, y in r[key] if y is not None} for r in rows if r["arm"] == arm and r[key]]
        steps = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
        if not steps:
          continue
        ys = np.array([[c[s] for s in steps] for c in curves])
        line, = ax.plot(steps, ys.mean(0), marker="o" if key == "eval_curve" else None, ms=3, label=arm)
        if len(curves) > 1:
          ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_title(f"{sweep.metric} (mean over seeds; band = min–max)")
    axes[1].set_title("train loss")
    if sweep.metric == "eval_perplexity":
      axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for ax in axes:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    if axes[0].get_legend_handles_labels()[0]:
      axes[0].legend(fontsize=8)
    axes[0].figure.suptitle(f"ablation sweep {sweep.name}")

  bench_common.write_plot(path, draw)


def _plain(v):
  """JSON-safe copy: numpy scalars → Python numbers, non-finite floats → None (strict JSON has no NaN)."""
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  v = v.item() if hasattr(v, "item") else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def run_sweep(name: str, out: str | os.PathLike, quick: bool = False, seeds: Optional[Sequence[int]] = None,
              arms: Optional[Sequence[str]] = None, extra: Optional[dict] = None, log=print) -> dict:
  """Runs (or skips, when finished) every run of sweep ``name`` and writes DIR/NAME.{json,md,png}.
  Returns {"rows", "summary", "paths"}."""
  if name not in SWEEPS:
    raise ValueError(f"unknown sweep {name!r}; allowed: {', '.join(SWEEPS)}.")
  sweep = SWEEPS[name]
  arm_list = sweep.select_arms(arms)
  seed_list = tuple(seeds) if seeds else sweep.seeds_for(quick)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = [run_one(sweep, arm, overrides, seed, out, quick, extra, log)
          for arm, overrides in arm_list for seed in seed_list]
  summary = summarize(sweep, rows)
  machine = bench_common.machine_info()
  paths = {ext: out / f"{name}.{ext}" for ext in ("json", "md", "png")}
  doc = {"sweep": name, "quick": quick, "metric": sweep.metric, "claim": sweep.claim, "shrunk": sweep.shrunk,
         "base_config": sweep.config, "base_overrides": sweep.base_for(quick),
         "extra_overrides": extra or {}, "seeds": list(seed_list), "machine": machine, "summary": summary,
         "rows": [{k: v for k, v in r.items() if k != "skipped"} for r in rows]}
  paths["json"].write_text(json.dumps(_plain(doc), indent=1, allow_nan=False))
  write_markdown(sweep, rows, summary, paths["md"], quick, machine, extra)
  write_plot(sweep, rows, paths["png"])
  log(" ".join(str(p) for p in paths.values()))
  return {"rows": rows, "summary": summary, "paths": paths}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="the sweep to run")
  parser.add_argument("--out", help="output directory (run workdirs go to OUT/SWEEP/<arm>_seed<s>)")
  parser.add_argument("--quick", action="store_true", help="the arms on the config's runlocal variant, one seed")
  parser.add_argument("--seeds", help="comma-separated seeds instead of the sweep's own set")
  parser.add_argument("--arms", help="comma-separated subset of the sweep's arms")
  parser.add_argument("--total_steps", type=int, help="train every run this many steps; finished shorter runs "
                      "are continued from their final checkpoint (not with a schedule that depends on total_steps: "
                      "cosine, warmup_cosine, linear, a callable)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="extra dotted config override for every run (JSON value), e.g. data.path=DIR")
  parser.add_argument("--list", action="store_true", help="list the sweeps and their arms")
  args = parser.parse_args(argv)
  if args.list:
    for s in SWEEPS.values():
      print(f"{s.name}: {', '.join(a for a, _ in s.arms)} × seeds {list(s.seeds)}")
    return {}
  if not args.sweep or not args.out:
    parser.error("--sweep and --out are required")
  extra = {}
  for key, eq, text in (item.partition("=") for item in args.set):
    if not eq:
      parser.error(f"--set {key}: expected FIELD=VALUE")
    try:
      extra[key] = json.loads(text)
    except json.JSONDecodeError:  # a bare string, e.g. a path
      extra[key] = text
  if args.total_steps:
    extra["total_steps"] = args.total_steps
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
  arms = args.arms.split(",") if args.arms else None
  try:
    return run_sweep(args.sweep, args.out, args.quick, seeds, arms, extra,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
  except SweepStopped as e:  # a requested stop, not an error: exit 0 like experiments.train
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(0) from None


if __name__ == "__main__":
  main()
