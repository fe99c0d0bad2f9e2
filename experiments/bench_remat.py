"""Memory/time of checkpoint levels C0/C1/C2 and named remat policies for the trainer's train step.

    python -m experiments.bench_remat --out DIR [--quick]

Step: the trainer's own ``linformer_jax.steps.make_train_step`` (jitted with the state donated, as
``linformer_jax.train`` runs it; ``bench_roofline.DonatingStep``) on a ``TrainState`` from ``steps.init_state``, with
the trainer's optimizer (``linformer_jax.optim.make_optimizer``, default config: Adafactor). Linformer rows: the
byte-level masked LM ``linformer_lm`` (``bench_roofline.mlm_model``: token + position embedding, the encoder, LM
head over the 258-symbol byte vocabulary; data kind "mlm", cross-entropy on 15 % of the positions,
``bench_roofline.mlm_batch``). XCiT rows: data kind "image" (a batch of "image" and "label"; the step updates the
BatchNorm statistics).

Sweeps depth × heads × level (policy "nothing_saveable") for the masked LM (scanned encoder layers, n=1024, dim=128,
k=128, batch 2, E/F sharing --sharing, default "headwise"; --quick: n=512, dim=128, k=64, batch 2, fewer points),
every named policy at depth 12 / 8 heads (C1; --quick: two policies), the three levels at depth 12 with sharing
"none" for comparison (per-head E/F: their gradients, 2·h·n·k floats per layer, are memory no remat can drop), and
XCiT-T12 (224², batch 2; --quick: XCiT-N12 at 32², batch 2).
Rows: model, sharing, depth, heads, level, policy, temp_bytes (XLA temp, compile time, deterministic; every buffer
counted: on CPU from a compilation without YNNPACK fusions, ``bench_common.counted_memory``), argument_bytes,
compile_s, step_time_s (median of ≥5 runs after warm-up), step (the step function and its data kind). Writes
DIR/remat.{json,md,png}; the markdown starts with the issue's targets checked against the rows.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_common import (bench_parser, compile_fn, finish, interleaved_median_times, sweep_mode,
                                      write_plot)
from experiments.bench_roofline import DonatingStep, mlm_batch, mlm_model
from linformer_jax import steps
from linformer_jax.models import create_model
from linformer_jax.optim import default_optimizer_config, make_optimizer
from linformer_jax.remat import REMAT_LEVELS, REMAT_POLICIES

COLUMNS = ["model", "sharing", "depth", "heads", "level", "policy", "temp_bytes", "temp_vs_C0", "step_time_s",
           "time_vs_C0", "compile_s"]
SIZES = {
    "full": dict(n=1024, dim=128, k=128, batch=2, depths=(2, 4, 8, 12, 24), heads=(4, 8, 16), policy_at=(12, 8),
                 policies=REMAT_POLICIES[1:], none_depth=12, xcit="xcit_tiny_12_p16_224", img=224, img_batch=2),
    "quick": dict(n=512, dim=128, k=64, batch=2, depths=(2, 6), heads=(4, 16), policy_at=(6, 4),
                  policies=("dots_saveable", "save_projections"), none_depth=6, xcit="xcit_nano_12_p16_224", img=32,
                  img_batch=2),
    # the tests' sweep (13 points): a 1-block XCiT-N12 with 10 classes
    "tiny": dict(n=64, dim=32, k=16, batch=1, depths=(1, 2), heads=(2,), policy_at=(2, 2),
                 policies=("save_projections",), none_depth=2, xcit="xcit_nano_12_p16_224", img=16, img_batch=1,
                 xcit_fields=dict(depth=1, num_classes=10)),
}


def train_step_name(kind: str) -> str:
  """What the "step" field of a row records: the trainer's step function and the data kind it ran on."""
  return f"linformer_jax.steps.make_train_step ({kind})"


def measure(model, batch: dict, kind: str, repeats: int) -> dict:
  """Counted temp memory, compile seconds and median step time of the trainer's train step for ``model`` on
  ``batch`` (data kind ``kind``), its state donated from call to call as in the training loop."""
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  state = steps.init_state(model, tx, batch, kind, jax.random.key(0))
  rng = jax.random.key(1)
  step = steps.make_train_step(model, tx, kind)
  compiled, compile_s, memory = compile_fn(step, state, batch, rng, donate_argnums=0, count_all_buffers=True)
  run_step = DonatingStep(compiled, state, batch, rng)
  seconds = interleaved_median_times({"step": run_step}, repeats=repeats)["step"]
  return dict(memory, compile_s=round(compile_s, 3), step_time_s=seconds, step=train_step_name(kind))


def image_batch(model, batch: int, img: int) -> dict:
  """An "image" batch as the trainer feeds it: normal pixels and random labels of the model's classes."""
  rng = np.random.default_rng(2)
  return {"image": jnp.asarray(rng.standard_normal((batch, img, img, 3)).astype(np.float32)),
          "label": jnp.asarray(rng.integers(0, model.num_classes, (batch,), dtype=np.int32))}


def run(mode: str, repeats: int, sharing: str = "headwise"):
  s = SIZES[mode]
  n, dim, k, batch, depths, heads_list = s["n"], s["dim"], s["k"], s["batch"], s["depths"], s["heads"]
  tokens = jax.tree.map(jnp.asarray, mlm_batch(batch, n))
  rows = []

  def add(model_name, depth, heads, level, policy, result, sharing=sharing):
    rows.append(dict(model=model_name, sharing=sharing, depth=depth, heads=heads, level=level, policy=policy,
                     **result))
    r = rows[-1]
    print(f"{model_name:>22} {sharing or '-':>8} depth {depth:>2} heads {heads:>2} {level} {policy:<34} temp "
          f"{r['temp_bytes'] / 2**20:9.1f} MiB  step {r['step_time_s'] * 1e3:8.1f} ms", flush=True)

  def lm(depth, heads, **fields):
    return mlm_model(n, dim=dim, depth=depth, num_heads=heads, k=k, scan_layers=True, **fields)

  lin = f"linformer_lm_n{n}_d{dim}_k{k}_b{batch}"
  for depth, heads in itertools.product(depths, heads_list):
    for level in REMAT_LEVELS:
      add(lin, depth, heads, level, "nothing_saveable",
          measure(lm(depth, heads, sharing=sharing, remat=level), tokens, "mlm", repeats))
      # encoder inputs kept per layer across layers: one per sub-layer at C1, one per layer at C2
      rows[-1]["saved_input_bytes_per_layer"] = (1 if level == "C2" else 2) * batch * n * dim * 4
  pdepth, pheads = s["policy_at"]
  for policy in s["policies"]:
    add(lin, pdepth, pheads, "C1", policy,
        measure(lm(pdepth, pheads, sharing=sharing, remat="C1", remat_policy=policy), tokens, "mlm", repeats))
  if sharing != "none":
    for heads, level in itertools.product(heads_list, REMAT_LEVELS):
      add(lin, s["none_depth"], heads, level, "nothing_saveable",
          measure(lm(s["none_depth"], heads, sharing="none", remat=level), tokens, "mlm", repeats), sharing="none")

  xcits = {level: create_model(s["xcit"], scan_layers=True, remat=level, **s.get("xcit_fields", {}))
           for level in REMAT_LEVELS}
  images = image_batch(xcits["C0"], s["img_batch"], s["img"])
  for level, model in xcits.items():
    add(f"{s['xcit']}@{s['img']}", model.depth, model.num_heads, level, "nothing_saveable",
        measure(model, images, "image", repeats), sharing=None)

  # ratios against C0 of the same model/depth/heads (policy nothing_saveable)
  base = {(r["model"], r["sharing"], r["depth"], r["heads"]): r for r in rows if r["level"] == "C0"}
  for r in rows:
    b = base.get((r["model"], r["sharing"], r["depth"], r["heads"]))
    if b:
      r["temp_vs_C0"] = round(r["temp_bytes"] / b["temp_bytes"], 3)
      r["time_vs_C0"] = round(r["step_time_s"] / b["step_time_s"], 3)
  return rows


def check_targets(rows, quick: bool) -> list[str]:
  """The issue's targets, evaluated on the rows (main sharing mode, policy nothing_saveable)."""
  sharing = rows[0]["sharing"]
  lin = {(r["depth"], r["heads"], r["level"]): r for r in rows if r["model"].startswith("linformer")
         and r["sharing"] == sharing and r["policy"] == "nothing_saveable"}
  depths = sorted({d for d, _, _ in lin})
  heads_list = sorted({h for _, h, _ in lin})
  d12 = 12 if 12 in depths else depths[-1]
  lines = [f"Targets (sharing {sharing!r}, policy nothing_saveable; ✅ met, ❌ missed):", ""]
  for h in heads_list:
    c0, c1 = lin[d12, h, "C0"], lin[d12, h, "C1"]
    ok = c1["temp_bytes"] <= 0.2 * c0["temp_bytes"] and c1["step_time_s"] <= 1.4 * c0["step_time_s"]
    lines.append(f"- depth {d12}, {h} heads: C1 temp = {c1['temp_bytes'] / c0['temp_bytes']:.1%} of C0 "
                 f"(≤ 20 %), step time {c1['step_time_s'] / c0['step_time_s']:.2f}× C0 (≤ 1.4×) "
                 f"{'✅' if ok else '❌'}")
  h = heads_list[-1]
  for d in depths:
    c1, c2 = lin[d, h, "C1"], lin[d, h, "C2"]
    ratio = c2["temp_bytes"] / c1["temp_bytes"]
    lines.append(f"- {h} heads, depth {d}: C2 temp = {ratio:.3f}× C1 (≤ 0.7×) {'✅' if ratio <= 0.7 else '❌'}")
  lo, hi = (depths[0], depths[-1]) if quick else (4, 24)
  mib = 2.0 ** 20
  def growth(h, level):  # MiB of temp memory per added layer
    return (lin[hi, h, level]["temp_bytes"] - lin[lo, h, level]["temp_bytes"]) / (hi - lo) / mib

  for h in heads_list:
    saved = lin[hi, h, "C1"]["saved_input_bytes_per_layer"] / mib
    lines.append(f"- {h} heads: C1 temp grows {growth(h, 'C1'):.2f} MiB/layer from depth {lo} to {hi}; the two "
                 f"saved sub-layer inputs are {saved:.2f} MiB/layer (C0 grows {growth(h, 'C0'):.2f}; C2, which "
                 f"keeps one input per layer, {growth(h, 'C2'):.2f})")
  c2 = [lin[d12, h, "C2"]["temp_bytes"] / mib for h in heads_list]
  lines.append(f"- C2 at depth {d12} and {' / '.join(map(str, heads_list))} heads: "
               f"{' / '.join(f'{t:.1f}' for t in c2)} MiB (head count costs little: max/min = "
               f"{max(c2) / min(c2):.2f})")
  return lines


def plot(rows, path):
  sharing = rows[0]["sharing"]
  lin = [r for r in rows if r["model"].startswith("linformer") and r["policy"] == "nothing_saveable"
         and r["sharing"] == sharing]
  heads_list = sorted({r["heads"] for r in lin})

  def draw(axes):
    for level, style in zip(REMAT_LEVELS, ("-o", "--s", ":^")):
      for heads in heads_list:
        pts = sorted((r["depth"], r) for r in lin if r["level"] == level and r["heads"] == heads)
        axes[0].plot([d for d, _ in pts], [r["temp_bytes"] / 2**20 for _, r in pts], style,
                     label=f"{level} h={heads}")
        axes[1].plot([d for d, _ in pts], [r["step_time_s"] * 1e3 for _, r in pts], style,
                     label=f"{level} h={heads}")
    axes[0].set(xlabel="depth", ylabel="XLA temp memory (MiB)",
                title=f"Linformer masked-LM train step: memory (sharing {sharing})")
    axes[1].set(xlabel="depth", ylabel="step time (ms)", title="Linformer masked-LM train step: time")
    axes[0].legend(fontsize=7, ncol=3)
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.add_argument("--sharing", default="headwise", choices=("none", "headwise", "kv"),
                 help="E/F sharing of the main Linformer sweep (layerwise cannot be scanned)")
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, max(args.repeats, 5), args.sharing)
  targets = check_targets(rows, quick=mode != "full")
  print("\n".join(targets))
  return finish(args, "remat", rows, COLUMNS, "Checkpoint levels C0/C1/C2: memory and time",
                "\n".join(targets) + "\n\nStep: the trainer's linformer_jax.steps.make_train_step (state donated, "
                "default optimizer: Adafactor) of the byte-level masked LM linformer_lm (embedding, scanned encoder, "
                "LM head; data kind mlm) and of XCiT (data kind image). temp_bytes = XLA compile-time temp buffers "
                "of one train step, every buffer counted; step_time_s = median of >= 5 runs after warm-up.", plot)


if __name__ == "__main__":
  main()
