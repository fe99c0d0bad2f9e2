"""√L segment checkpointing: train-step XLA memory and time against depth, with and without ``remat_every="sqrt"``.

    python -m experiments.bench_segments --out DIR [--quick]

Step: the trainer's ``linformer_jax.steps.make_train_step`` (jitted with the state donated, ``bench_roofline.
DonatingStep``) of the byte-level masked LM ``linformer_lm`` with ``scan_layers=True``, level C0, Adafactor. The two
sides at each depth differ only in ``remat_every``: None (every layer's activations kept for the backward pass) or
"sqrt" (depth / s segments of s ≈ √depth layers, each recomputed in the backward pass from its input). Sizes — full:
depth 16, 36, 64 at n=1024, dim 128, 4 heads, k=64, batch 2; --quick: the same depths at n=256, dim 64, 2 heads,
k=32, batch 2. Both variants of a depth are compiled (memory counted), then timed in interleaved rounds.
Rows: depth, variant, segment (s), step_time_s, temp_bytes (XLA's compile-time temp buffers, every buffer counted),
grad_temp_bytes (the same for the gradient of the loss alone, ``jax.grad`` without the optimizer update: what
checkpointing acts on, without the parameter-sized buffers of the update), compile_s, and on the "sqrt" rows
time_vs_c0 and temp_vs_c0. Targets: the "sqrt" temp memory grows as √depth
(log-log slope over the depths <= 0.6) at <= 1.4× the time of C0. Writes DIR/segments.{json,md,png}.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_common import bench_parser, compile_fn, finish, host_load, interleaved_median_times, \
    sweep_mode, write_plot
from experiments.bench_roofline import DonatingStep, mlm_batch, mlm_model
from linformer_jax import steps
from linformer_jax.models.linformer import segment_length
from linformer_jax.optim import default_optimizer_config, make_optimizer

VARIANTS = {"C0": None, "sqrt": "sqrt"}  # variant name -> remat_every
COLUMNS = ["depth", "variant", "segment", "step_time_s", "time_vs_c0", "temp_bytes", "temp_vs_c0", "grad_temp_bytes",
           "compile_s"]
TARGET_SLOPE, TARGET_TIME = 0.6, 1.4
SIZES = {
    "full": dict(depths=(16, 36, 64), n=1024, dim=128, heads=4, k=64, batch=2),
    "quick": dict(depths=(16, 36, 64), n=256, dim=64, heads=2, k=32, batch=2),
    "tiny": dict(depths=(4, 9), n=32, dim=16, heads=2, k=8, batch=1),
}


def masked_lm_loss(model, params, batch) -> jax.Array:
  """The weighted token cross-entropy of the masked-LM batch (the train step's loss, without the update)."""
  logits = model.apply({"params": params}, batch["inputs"], batch["mask"]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return (ce * batch["weights"]).sum() / jnp.maximum(batch["weights"].sum(), 1.0)


def measure(depth: int, size: dict, repeats: int) -> list[dict]:
  """Both variants at one depth: compiled (memory counted), then timed in the same interleaved rounds."""
  batch = jax.tree.map(jnp.asarray, mlm_batch(size["batch"], size["n"]))
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  rng = jax.random.key(1)
  models = {name: mlm_model(size["n"], dim=size["dim"], depth=depth, num_heads=size["heads"], k=size["k"],
                            scan_layers=True, remat_every=every) for name, every in VARIANTS.items()}
  state = steps.init_state(models["C0"], tx, batch, "mlm", jax.random.key(0))  # one parameter tree for both
  runs, rows = {}, {}
  for name, model in models.items():
    compiled, compile_s, memory = compile_fn(steps.make_train_step(model, tx, "mlm"), state, batch, rng,
                                             donate_argnums=0, count_all_buffers=True)
    runs[name] = DonatingStep(compiled, jax.tree.map(jnp.copy, state), batch, rng)
    grad = jax.grad(lambda params, m=model: masked_lm_loss(m, params, batch))
    grad_memory = compile_fn(grad, state.params, count_all_buffers=True)[2]
    rows[name] = dict(depth=depth, variant=name, segment=segment_length(VARIANTS[name], depth) or depth,
                      temp_bytes=memory["temp_bytes"], grad_temp_bytes=grad_memory["temp_bytes"],
                      compile_s=round(compile_s, 3))
  for name, seconds in interleaved_median_times(runs, repeats=repeats).items():
    rows[name]["step_time_s"] = seconds
  rows["sqrt"]["time_vs_c0"] = round(rows["sqrt"]["step_time_s"] / rows["C0"]["step_time_s"], 3)
  rows["sqrt"]["temp_vs_c0"] = round(rows["sqrt"]["temp_bytes"] / max(rows["C0"]["temp_bytes"], 1), 3)
  return list(rows.values())


def slope(rows, variant: str, key: str = "temp_bytes") -> float:
  """Least-squares slope of log(row[key]) against log(depth) over the rows of one variant."""
  pts = [(math.log(r["depth"]), math.log(r[key])) for r in rows if r["variant"] == variant]
  x, y = np.array(pts).T
  return float(np.polyfit(x, y, 1)[0])


def check_targets(rows) -> list[str]:
  """The issue's targets against this run's rows."""
  s_sqrt, s_c0 = slope(rows, "sqrt"), slope(rows, "C0")
  g_sqrt, g_c0 = slope(rows, "sqrt", "grad_temp_bytes"), slope(rows, "C0", "grad_temp_bytes")
  lines = [f"Targets (✅ met, ❌ missed): train-step temp memory of remat_every='sqrt' grows with a log-log slope <= "
           f"{TARGET_SLOPE} over depth: {s_sqrt:.2f} {'✅' if s_sqrt <= TARGET_SLOPE else '❌'} (C0: {s_c0:.2f}); "
           f"the gradient alone (no optimizer update): {g_sqrt:.2f} {'✅' if g_sqrt <= TARGET_SLOPE else '❌'} (C0: "
           f"{g_c0:.2f}); step time <= {TARGET_TIME}× C0's:"]
  for r in rows:
    if r["variant"] == "sqrt":
      lines.append(f"- depth {r['depth']} (segments of {r['segment']}): {r['time_vs_c0']:.2f}× the time "
                   f"{'✅' if r['time_vs_c0'] <= TARGET_TIME else '❌'}, {r['temp_vs_c0']:.2f}× the temp memory")
  return lines


NOTES = ("One parameter tree for both variants (remat_every does not change it); step_time_s = median of >= 5 "
         "interleaved runs after warm-up; temp_bytes = XLA compile-time temp buffers of one train step, every buffer "
         "counted. Temp memory also holds buffers that do not grow with depth (embeddings, logits) and "
         "parameter-sized ones that grow as depth whatever the checkpointing (the gradients, Adafactor's work), so "
         "the slope over these depths is an upper bound of the activations' own.")


def plot(rows, path):
  def draw(axes):
    for ax, key, unit, scale in ((axes[0], "temp_bytes", "XLA temp memory (MiB)", 2.0 ** -20),
                                 (axes[1], "step_time_s", "step time (ms)", 1e3)):
      for variant in VARIANTS:
        pts = [(r["depth"], r[key] * scale) for r in rows if r["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", label=variant)
      ax.set(xscale="log", yscale="log", xlabel="depth", ylabel=unit, title=f"train step: {unit.split(' (')[0]}")
      ax.legend()
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__, quick_help="CPU-sized sweep (a few minutes on one core)")
  args = p.parse_args(argv)
  size = SIZES[sweep_mode(args)]
  rows = []
  for depth in size["depths"]:
    rows += measure(depth, size, max(args.repeats, 5))
    for r in rows[-2:]:
      print(f"depth {depth:3d} {r['variant']:>4}: step {r['step_time_s'] * 1e3:9.2f} ms, temp "
            f"{r['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
  targets = check_targets(rows)
  print("\n".join(targets))
  load = host_load()
  where = (f"Ran on {load['usable_cores']} usable core(s), load average {load['loadavg'][0]} at the end "
           f"({sweep_mode(args)} sizes: n={size['n']}, dim {size['dim']}, {size['heads']} heads, k={size['k']}, "
           f"batch {size['batch']}).")
  return finish(args, "segments", rows, COLUMNS, "√L segment checkpointing: memory and time against depth",
                where + "\n\n" + "\n".join(targets) + "\n\n" + NOTES, plot)


if __name__ == "__main__":
  main()
