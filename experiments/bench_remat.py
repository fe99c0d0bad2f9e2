"""Memory/time of checkpoint levels C0/C1/C2 and named remat policies for a training step.

    python -m experiments.bench_remat --out DIR [--quick]

Sweeps depth × heads × level (policy "nothing_saveable") for a Linformer gradient step (scanned layers,
n=1024, dim=128, k=128, batch 2, E/F sharing --sharing, default "headwise"; --quick: n=512, dim=128, k=64,
batch 2, fewer points), every named policy at depth 12 / 8 heads (C1; --quick: two policies), the three
levels at depth 12 with sharing "none" for comparison (per-head E/F: their gradients, 2·h·n·k floats per
layer, are memory no remat can drop), and XCiT-T12 (224², batch 2; --quick: XCiT-N12 at 32², batch 2).
Rows: model, sharing, depth, heads, level, policy, temp_bytes (XLA temp, compile time, deterministic; every buffer
counted: on CPU from a compilation without YNNPACK fusions, ``bench_common.counted_memory``),
argument_bytes, compile_s, step_time_s (median of ≥5 runs after warm-up). Writes DIR/remat.{json,md,png};
the markdown starts with the issue's targets checked against the rows.

The step is a stand-in for the levels' comparison, not the trainer's step: ``optax.adafactor`` on the mean squared
output of the encoder stack (inputs of shape (batch, n, dim), no embedding or LM head), so the memory and the time
*ratios* are those of the remat levels alone. The trainer's own step (``linformer_jax.steps.make_train_step``) is
what ``bench_roofline`` and ``bench_compile`` time.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

from experiments.bench_common import bench_parser, compile_fn, finish, median_time, write_plot
from linformer_jax.models import Linformer, create_model
from linformer_jax.remat import REMAT_LEVELS, REMAT_POLICIES

COLUMNS = ["model", "sharing", "depth", "heads", "level", "policy", "temp_bytes", "temp_vs_C0", "step_time_s",
           "time_vs_C0", "compile_s"]


def _stand_in_step(apply_fn, tx):
  """One optimizer step on the mean squared output (a stand-in loss with the encoder's backward pass); this
  benchmark's own, not the trainer's step (module docstring)."""
  def step(params, opt_state, extra, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(apply_fn({"params": p, **extra}, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def measure(model, x, repeats: int) -> dict:
  variables = model.init(jax.random.key(0), x)
  params = variables.pop("params") if isinstance(variables, dict) else variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adafactor(1e-3)
  opt_state = tx.init(params)
  step = _stand_in_step(model.apply, tx)
  compiled, compile_s, memory = compile_fn(step, params, opt_state, extra, x, count_all_buffers=True)
  return dict(memory, compile_s=round(compile_s, 3),
              step_time_s=median_time(compiled, params, opt_state, extra, x, repeats=repeats))


def run(quick: bool, repeats: int, sharing: str = "headwise"):
  if quick:
    n, dim, k, batch, depths, heads_list = 512, 128, 64, 2, (2, 6), (4, 16)
    xcit_name, img, img_batch = "xcit_nano_12_p16_224", 32, 2
  else:
    n, dim, k, batch, depths, heads_list = 1024, 128, 128, 2, (2, 4, 8, 12, 24), (4, 8, 16)
    xcit_name, img, img_batch = "xcit_tiny_12_p16_224", 224, 2
  x = jax.random.normal(jax.random.key(1), (batch, n, dim))
  rows = []

  def add(model_name, depth, heads, level, policy, result, sharing=sharing):
    rows.append(dict(model=model_name, sharing=sharing, depth=depth, heads=heads, level=level, policy=policy,
                     **result))
    r = rows[-1]
    print(f"{model_name:>22} {sharing or '-':>8} depth {depth:>2} heads {heads:>2} {level} {policy:<34} temp "
          f"{r['temp_bytes'] / 2**20:9.1f} MiB  step {r['step_time_s'] * 1e3:8.1f} ms", flush=True)

  lin = f"linformer_n{n}_d{dim}_k{k}_b{batch}"
  for depth, heads in itertools.product(depths, heads_list):
    for level in REMAT_LEVELS:
      model = Linformer(max_len=n, dim=dim, depth=depth, num_heads=heads, k=k, sharing=sharing,
                        scan_layers=True, remat=level)
      add(lin, depth, heads, level, "nothing_saveable", measure(model, x, repeats))
      # inputs kept per layer across layers: one per sub-layer at C1, one per layer at C2
      rows[-1]["saved_input_bytes_per_layer"] = (1 if level == "C2" else 2) * batch * n * dim * 4
  pdepth, pheads = (6, 4) if quick else (12, 8)
  policies = ("dots_saveable", "save_projections") if quick else REMAT_POLICIES[1:]
  for policy in policies:
    model = Linformer(max_len=n, dim=dim, depth=pdepth, num_heads=pheads, k=k, sharing=sharing,
                      scan_layers=True, remat="C1", remat_policy=policy)
    add(lin, pdepth, pheads, "C1", policy, measure(model, x, repeats))
  if sharing != "none":
    cdepth = depths[-1] if quick else 12
    for heads, level in itertools.product(heads_list, REMAT_LEVELS):
      model = Linformer(max_len=n, dim=dim, depth=cdepth, num_heads=heads, k=k, sharing="none",
                        scan_layers=True, remat=level)
      add(lin, cdepth, heads, level, "nothing_saveable", measure(model, x, repeats), sharing="none")

  images = jax.random.normal(jax.random.key(2), (img_batch, img, img, 3))
  for level in REMAT_LEVELS:
    model = create_model(xcit_name, scan_layers=True, remat=level)
    add(f"{xcit_name}@{img}", model.depth, model.num_heads, level, "nothing_saveable",
        measure(model, images, repeats), sharing=None)

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
                title=f"Linformer train step: memory (sharing {sharing})")
    axes[1].set(xlabel="depth", ylabel="step time (ms)", title="Linformer train step: time")
    axes[0].legend(fontsize=7, ncol=3)
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.add_argument("--sharing", default="headwise", choices=("none", "headwise", "kv"),
                 help="E/F sharing of the main Linformer sweep (layerwise cannot be scanned)")
  args = p.parse_args(argv)
  quick = args.quick or args.tiny  # no smaller sweep than --quick here
  rows = run(quick, max(args.repeats, 5), args.sharing)
  targets = check_targets(rows, quick)
  print("\n".join(targets))
  return finish(args, "remat", rows, COLUMNS, "Checkpoint levels C0/C1/C2: memory and time",
                "\n".join(targets) + "\n\ntemp_bytes = XLA compile-time temp buffers of one optimizer step; "
                "step_time_s = median of >= 5 runs after warm-up.", plot)


if __name__ == "__main__":
  main()
