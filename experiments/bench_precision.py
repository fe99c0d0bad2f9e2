"""Mixed precision: float32 vs bfloat16 train-step time and XLA memory per model, on the current backend.

    python -m experiments.bench_precision --out DIR [--quick]

Step: the trainer's own ``linformer_jax.steps.make_train_step`` (jitted with the state donated, as
``linformer_jax.train`` runs it; ``bench_roofline.DonatingStep``) on a ``TrainState`` from ``steps.init_state``, with
the trainer's optimizer (``linformer_jax.optim.make_optimizer``, default config: Adafactor). The two sides differ only
in the model's ``dtype`` ("float32" | "bfloat16", the config's ``model.dtype``); parameters (``param_dtype``) and
optimizer state are float32 on both. Models: the byte-level masked LM ``linformer_lm`` (``bench_roofline.mlm_model``,
data kind "mlm"), XCiT-N12/16 and ViT-Ti/16 (data kind "image", random pixels and labels, 1000 classes).
Sizes — full (meant for a GPU): LM n=4096, dim 512, 8 heads, k=256, depth 4, batch 8; XCiT-N12 and ViT-Ti at 224²,
batch 64. --quick (CPU-sized, a few minutes on one core): LM n=1024, dim 256, 4 heads, k=128, depth 2, batch 2;
XCiT-N12 and ViT-Ti at 96², batch 2.
Both dtypes of a model are compiled first, then timed in the same interleaved rounds (``interleaved_median_times``:
load from other processes hits both alike).
Rows: model, shape, dtype, step_time_s (median of >= 5 runs after warm-up), temp_bytes / argument_bytes /
output_bytes (XLA's compile-time memory_analysis, every buffer counted: on CPU from a compilation without YNNPACK
fusions, ``bench_common.compile_fn``), compile_s, and on the bfloat16 rows speedup (float32 time / bfloat16 time),
temp_vs_f32 and total_vs_f32 (temp + argument bytes). Writes DIR/precision.{json,md,png}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench_common import (bench_parser, compile_fn, finish, host_load, interleaved_median_times,
                                      on_accelerator, sweep_mode, write_plot)
from experiments.bench_remat import image_batch
from experiments.bench_roofline import DonatingStep, mlm_batch, mlm_model
from linformer_jax import steps
from linformer_jax.models import create_model
from linformer_jax.optim import default_optimizer_config, make_optimizer

DTYPES = ("float32", "bfloat16")
COLUMNS = ["model", "shape", "dtype", "step_time_s", "speedup", "temp_bytes", "temp_vs_f32", "argument_bytes",
           "total_vs_f32", "compile_s"]
TARGET_SPEEDUP, TARGET_MEMORY = 1.7, 0.6  # the GPU targets: bfloat16 >= 1.7× faster, <= 0.6× the memory
SIZES = {
    "full": dict(lm=dict(n=4096, dim=512, heads=8, k=256, depth=4, batch=8),
                 images=(("xcit_nano_12_p16_224", 224, 64), ("vit_tiny_patch16_224", 224, 64))),
    "quick": dict(lm=dict(n=1024, dim=256, heads=4, k=128, depth=2, batch=2),
                  images=(("xcit_nano_12_p16_224", 96, 2), ("vit_tiny_patch16_224", 96, 2))),
    # the tests' sweep: a 1-layer LM and a 1-block ViT-Ti on one token (the image step compiles fastest)
    "tiny": dict(lm=dict(n=64, dim=32, heads=2, k=16, depth=1, batch=1),
                 images=(("vit_tiny_patch16_224", 16, 1),), image_fields=dict(depth=1)),
}


def cases(mode: str):
  """(model name, shape text, {dtype: model}, batch, data kind) for each model of the sweep."""
  s = SIZES[mode]
  lm = s["lm"]
  models = {d: mlm_model(lm["n"], dim=lm["dim"], depth=lm["depth"], num_heads=lm["heads"], k=lm["k"], dtype=d)
            for d in DTYPES}
  yield ("linformer_lm", f"n={lm['n']} dim={lm['dim']} heads={lm['heads']} k={lm['k']} depth={lm['depth']} "
         f"batch={lm['batch']}", models, jax.tree.map(jnp.asarray, mlm_batch(lm["batch"], lm["n"])), "mlm")
  for name, img, batch in s["images"]:
    models = {d: create_model(name, dtype=d, **s.get("image_fields", {})) for d in DTYPES}
    yield name, f"{img}² batch={batch}", models, image_batch(models["float32"], batch, img), "image"


def measure(models: dict, batch: dict, kind: str, repeats: int) -> dict:
  """{dtype: row fields}: both dtypes' train steps compiled (memory counted), then timed in interleaved rounds."""
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  rng = jax.random.key(1)
  state = steps.init_state(models["float32"], tx, batch, kind, jax.random.key(0))  # float32 params on both sides
  runs, out = {}, {}
  for dtype, model in models.items():
    step = steps.make_train_step(model, tx, kind)
    compiled, compile_s, memory = compile_fn(step, state, batch, rng, donate_argnums=0, count_all_buffers=True)
    runs[dtype] = DonatingStep(compiled, jax.tree.map(jnp.copy, state), batch, rng)
    out[dtype] = dict(memory, compile_s=round(compile_s, 3))
  for dtype, seconds in interleaved_median_times(runs, repeats=repeats).items():
    out[dtype]["step_time_s"] = seconds
  return out


def run(mode: str, repeats: int) -> list[dict]:
  rows = []
  for name, shape, models, batch, kind in cases(mode):
    result = measure(models, batch, kind, repeats)
    base = result["float32"]
    for dtype in DTYPES:
      r = dict(model=name, shape=shape, dtype=dtype, **result[dtype], step=f"linformer_jax.steps.make_train_step "
               f"({kind})")
      if dtype != "float32":
        r["speedup"] = round(base["step_time_s"] / r["step_time_s"], 3)
        r["temp_vs_f32"] = round(r["temp_bytes"] / max(base["temp_bytes"], 1), 3)
        r["total_vs_f32"] = round((r["temp_bytes"] + r["argument_bytes"]) /
                                  max(base["temp_bytes"] + base["argument_bytes"], 1), 3)
      rows.append(r)
      print(f"{name:>22} {dtype:>9}: step {r['step_time_s'] * 1e3:9.2f} ms, temp {r['temp_bytes'] / 2**20:8.1f} MiB, "
            f"arguments {r['argument_bytes'] / 2**20:8.1f} MiB", flush=True)
  return rows


def check_targets(rows) -> list[str]:
  """The GPU targets against the bfloat16 rows of this run (on a CPU they are not expected to hold)."""
  where = "this backend" + ("" if on_accelerator() else " (a CPU: bfloat16 is not expected to be faster here)")
  lines = [f"Targets for a GPU: bfloat16 >= {TARGET_SPEEDUP}× faster, <= {TARGET_MEMORY}× the XLA temp memory of "
           f"float32; on {where} (✅ met, ❌ missed):", ""]
  for r in rows:
    if r["dtype"] != "float32":
      ok_time, ok_mem = r["speedup"] >= TARGET_SPEEDUP, r["temp_vs_f32"] <= TARGET_MEMORY
      lines.append(f"- {r['model']} ({r['shape']}): {r['speedup']:.2f}× the float32 speed {'✅' if ok_time else '❌'}, "
                   f"temp memory {r['temp_vs_f32']:.2f}× {'✅' if ok_mem else '❌'} (temp + arguments "
                   f"{r['total_vs_f32']:.2f}×)")
  return lines


NOTES = (
    "The two sides differ only in the model's dtype (config model.dtype); parameters and optimizer state are "
    "float32 on both (model.param_dtype float32), so argument bytes are equal and only activations (temp) can "
    "shrink. step_time_s = median of >= 5 interleaved runs after warm-up; temp_bytes = XLA compile-time temp "
    "buffers of one train step, every buffer counted.\n\n"
    "On a CPU bfloat16 may well be slower than float32: XLA:CPU has no bfloat16 matmul units and converts operands "
    "to float32 around each product, so bfloat16 saves memory traffic at best and adds conversions. Its memory "
    "says little about a GPU's either: with every buffer counted, those float32 copies of the operands are "
    "temporaries of their own, and at the small --quick batches the parameter-sized buffers (the bfloat16 copies of "
    "the float32 weights that the forward and backward products read, next to the float32 gradients) outweigh the "
    "activations that bfloat16 halves. The targets (bfloat16 >= 1.7× faster and <= 0.6× the memory of float32) are "
    "GPU targets, to be measured on a GPU (`python -m experiments.bench_precision --out DIR` there, the full "
    "sizes).")


LABELS = {"linformer_lm": "LinformerLM", "xcit_nano_12_p16_224": "XCiT-N12", "vit_tiny_patch16_224": "ViT-Ti"}


def plot(rows, path):
  labels = [LABELS.get(r["model"], r["model"]) for r in rows if r["dtype"] == "float32"]

  def draw(axes):
    for ax, key, unit, scale in ((axes[0], "step_time_s", "step time (ms)", 1e3),
                                 (axes[1], "temp_bytes", "XLA temp memory (MiB)", 2.0 ** -20)):
      for i, dtype in enumerate(DTYPES):
        values = [r[key] * scale for r in rows if r["dtype"] == dtype]
        ax.bar([x + 0.4 * i for x in range(len(values))], values, width=0.4, label=dtype)
      ax.set_xticks([x + 0.2 for x in range(len(labels))], labels)
      ax.set(ylabel=unit, title=f"train step: {unit.split(' (')[0]}")
      ax.legend()
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__, quick_help="CPU-sized sweep (a few minutes on one core)")
  args = p.parse_args(argv)
  rows = run(sweep_mode(args), max(args.repeats, 5))
  targets = check_targets(rows)
  print("\n".join(targets))
  load = host_load()
  where = (f"Ran on {load['usable_cores']} usable core(s), load average {load['loadavg'][0]} at the end "
           f"({sweep_mode(args)} sizes).")
  return finish(args, "precision", rows, COLUMNS, "Mixed precision: float32 vs bfloat16 train step",
                where + "\n\n" + "\n".join(targets) + "\n\n" + NOTES, plot)


if __name__ == "__main__":
  main()
