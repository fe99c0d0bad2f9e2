"""XCiT vs ViT/DeiT across resolutions, and our XCiT-N12/16 vs timm's.

    python -m experiments.bench_xcit --out DIR [--quick] [--torch-python PATH]

Scaling (section "scaling"): inference (``train=False``), batch 1, random weights, images 224² … 1024² (``--quick``:
224² and 512²) for XCiT-N12/16, XCiT-T12/16, XCiT-S12/16 and DeiT-Ti/16, DeiT-S/16 (ViT with full attention,
position table resized). The pairs of equal width are T12 vs DeiT-Ti (192) and S12 vs DeiT-S (384); N12 (128) vs
DeiT-Ti is listed too. All models of one resolution are timed in interleaved rounds (median of >= 5 after a warm-up;
compile reported separately). Memory: XLA temp + argument bytes of the jitted forward, every buffer counted
(``bench_common.counted_memory``: on CPU without YNNPACK fusions, which keep ViT's token × token scores outside
XLA's count). XCiT's attention is d_h × d_h per head (independent of the N tokens), ViT's N × N.

timm (section "timm"): our ``xcit_nano_12_p16_224`` vs ``timm.create_model("xcit_nano_12_p16_224")`` (eager
PyTorch, ``no_grad``, eval) at 224² and 384², batch 1, same number of threads (all usable cores), measured in
the same run (on a GPU: both on the GPU, TensorFloat-32 on both sides or neither, following JAX's default
matmul precision): ours in this process (timed before and after timm's run; the mean), timm's in a subprocess of
``--torch-python`` (a Python with torch and
timm; default: this interpreter if it has torch, otherwise the section is skipped with a message). Memory:
peak-RSS rise of the first forward on both sides (and XLA temp + argument bytes for ours).
``--sections timm`` runs only the timm comparison.

FLOPs (section "flops", not in the default set; also a ``flops`` column of the scaling rows): XLA's
``cost_analysis()`` FLOPs of each forward, compile only. xcit_over_vit_flops is the time ratio XCiT would reach
against its ViT if both ran at the same FLOP/s. Rows: section, model, res, tokens, time_s, mem_bytes, ...
Writes DIR/xcit.{json,md,png}.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from experiments import bench_torch
from experiments.bench_common import (bench_parser, blocking, compile_fn, finish, first_run_rss_rise, flops_of,
                                      host_load, interleaved_median_times, random_like, sweep_mode,
                                      torch_device_spec, unblocked, write_plot)
from linformer_jax.models import create_model

MODELS = {"N12": "xcit_nano_12_p16_224", "T12": "xcit_tiny_12_p16_224", "S12": "xcit_small_12_p16_224",
          "DeiT-Ti": "deit_tiny_patch16_224", "DeiT-S": "deit_small_patch16_224"}
PARTNER = {"T12": "DeiT-Ti", "S12": "DeiT-S", "N12": "DeiT-Ti"}  # the ViT of equal (N12: nearest) width
SWEEPS = {  # models, resolutions, timm resolutions, model overrides
    "full": (("N12", "T12", "S12", "DeiT-Ti", "DeiT-S"), (224, 384, 512, 768, 1024), (224, 384), {}),
    "quick": (("N12", "T12", "DeiT-Ti"), (224, 512), (224,), {}),
    "tiny": (("N12", "DeiT-Ti"), (32,), (), dict(depth=1)),  # test mode: one block each
}
COLUMNS = ["section", "model", "res", "tokens", "time_s", "time_vs_224", "mem_bytes", "mem_vs_224",
           "xcit_over_vit_time", "xcit_over_vit_mem", "flops", "xcit_over_vit_flops", "timm_time_s",
           "ours_over_timm_time", "rss_rise_bytes", "timm_rss_rise_bytes", "compile_s"]


def compile_model(name: str, res: int, **overrides):
  model = create_model(name, **overrides)
  images = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  flops_fn = unblocked(model).apply if "attention_block_rows" in model.__dataclass_fields__ else None
  compiled, seconds, memory = compile_fn(model.apply, abstract, images, count_all_buffers=True, flops_fn=flops_fn)
  variables = random_like(abstract)
  x = random_like(images, seed=1, scale=1.0)
  return compiled, (variables, x), seconds, memory


def scaling(models, resolutions, repeats, overrides):
  rows = []
  for res in resolutions:
    fns, info = {}, {}
    for short in models:
      compiled, args, seconds, memory = compile_model(MODELS[short], res, **overrides)
      info[short] = dict(compile_s=round(seconds, 3), mem_bytes=memory["temp_bytes"] + memory["argument_bytes"],
                         temp_bytes=memory["temp_bytes"], flops=flops_of(compiled),
                         rss_rise_bytes=first_run_rss_rise(compiled, *args))
      fns[short] = blocking(compiled, *args)
    times = interleaved_median_times(fns, repeats=repeats)
    for short in models:
      rows.append(dict(section="scaling", model=short, name=MODELS[short], res=res, tokens=(res // 16) ** 2,
                       time_s=times[short], **info[short]))
      print(f"{res:>5}² {short:<8} {times[short] * 1e3:9.1f} ms  XLA mem {info[short]['mem_bytes'] / 2**20:8.1f} MiB",
            flush=True)
    del fns
  by = {(r["model"], r["res"]): r for r in rows}
  first = min(resolutions)
  for r in rows:
    r["time_vs_224"] = round(r["time_s"] / by[(r["model"], first)]["time_s"], 2)
    r["mem_vs_224"] = round(r["mem_bytes"] / by[(r["model"], first)]["mem_bytes"], 2)
  return _against_partner(rows, ("time", "time_s"), ("mem", "mem_bytes"), ("flops", "flops"))


def _against_partner(rows, *quantities):
  """Adds xcit_over_vit_<name> = row[key] / the same of the ViT of equal width at the same resolution."""
  by = {(r["model"], r["res"]): r for r in rows}
  for r in rows:
    vit = PARTNER.get(r["model"])
    if (vit, r["res"]) in by:
      r["compared_with"] = vit
      for name, key in quantities:
        r[f"xcit_over_vit_{name}"] = round(r[key] / by[(vit, r["res"])][key], 3)
  return rows


def flop_counts(models, resolutions, overrides):
  """Compile-only: XLA FLOPs of each forward pass. The FLOP ratio bounds the time ratio XCiT/ViT can reach
  at equal efficiency (no timing, so this section takes about a minute)."""
  rows = []
  for res in resolutions:
    for short in models:
      compiled, _, seconds, memory = compile_model(MODELS[short], res, **overrides)
      rows.append(dict(section="flops", model=short, name=MODELS[short], res=res, tokens=(res // 16) ** 2,
                       flops=flops_of(compiled), mem_bytes=memory["temp_bytes"] + memory["argument_bytes"],
                       compile_s=round(seconds, 3)))
      print(f"{res:>5}² {short:<8} {rows[-1]['flops'] / 1e9:9.2f} GFLOP", flush=True)
  return _against_partner(rows, ("flops", "flops"), ("mem", "mem_bytes"))


def versus_timm(resolutions, repeats, torch_python):
  rows = []
  threads = host_load()["usable_cores"]
  for res in resolutions:
    compiled, args, seconds, memory = compile_model(MODELS["N12"], res)
    rise = first_run_rss_rise(compiled, *args)
    # ours is timed before and after timm's subprocess (the mean is used), bracketing drifts in machine load
    ours_before = interleaved_median_times({"ours": blocking(compiled, *args)}, repeats=repeats)["ours"]
    theirs = bench_torch.run_worker_best_threads(torch_python, dict(
        task="timm", name=MODELS["N12"], img=res, batch=1, repeats=repeats, warmup=2, **torch_device_spec()),
        threads)
    ours_after = interleaved_median_times({"ours": blocking(compiled, *args)}, repeats=repeats)["ours"]
    ours = (ours_before + ours_after) / 2
    rows.append(dict(section="timm", model="N12", name=MODELS["N12"], res=res, tokens=(res // 16) ** 2,
                     time_s=ours, timm_time_s=theirs["fwd_time_s"],
                     ours_over_timm_time=round(ours / theirs["fwd_time_s"], 3),
                     mem_bytes=memory["temp_bytes"] + memory["argument_bytes"], rss_rise_bytes=rise,
                     timm_rss_rise_bytes=theirs.get("fwd_rss_rise_bytes"),
                     timm_device_peak_rise_bytes=theirs.get("fwd_device_peak_rise_bytes"),
                     torch_device=theirs.get("torch_device"), torch_tf32=theirs.get("torch_tf32"),
                     compile_s=round(seconds, 3),
                     threads=threads, torch=theirs["torch"], timm=theirs["timm"],
                     time_s_before_after=[ours_before, ours_after],
                     timm_best_threads=theirs["fwd_best_threads"], timm_params=theirs["params"],
                     timm_time_s_by_threads={k.split("_")[-1]: v for k, v in theirs.items()
                                             if k.startswith("fwd_time_s_")}))
    r = rows[-1]
    print(f"{res:>5}² N12 ours {ours * 1e3:8.1f} ms  timm {theirs['fwd_time_s'] * 1e3:8.1f} ms  "
          f"ours/timm {r['ours_over_timm_time']}", flush=True)
  return rows


def run(mode: str, repeats: int, torch_python, sections=("scaling", "timm")):
  models, resolutions, timm_res, overrides = SWEEPS[mode]
  rows = scaling(models, resolutions, repeats, overrides) if "scaling" in sections else []
  if "flops" in sections:
    rows += flop_counts(models, resolutions, overrides)
  if timm_res and "timm" in sections:
    ok, why = bench_torch.torch_python_ok(torch_python) if torch_python else (False, "no --torch-python")
    if ok:
      rows += versus_timm(timm_res, repeats, torch_python)
    else:
      print(f"timm comparison skipped: {why} (pass --torch-python PATH to a Python with torch and timm)")
      rows.append(dict(section="timm", model="N12", note=f"skipped: {why}"))
  return rows


def plot(rows, path):
  def draw(axes):
    scal = [r for r in rows if r["section"] == "scaling"]
    if not scal:  # flops-only run: FLOPs instead of time
      scal = [dict(r, time_s=r["flops"] / 1e3) for r in rows if r["section"] == "flops"]
    for short in dict.fromkeys(r["model"] for r in scal):
      pts = sorted((r["tokens"], r) for r in scal if r["model"] == short)
      style = "-o" if short in ("N12", "T12", "S12") else "--s"
      name = f"XCiT-{short}/16" if short in ("N12", "T12", "S12") else f"{short}/16"
      axes[0].plot([t for t, _ in pts], [r["time_s"] * 1e3 for _, r in pts], style, label=name)
      axes[1].plot([t for t, _ in pts], [r["mem_bytes"] / 2**20 for _, r in pts], style, label=name)
    for ax, label in zip(axes, ("forward time (ms)", "XLA temp + argument memory (MiB)")):
      ax.set(xscale="log", yscale="log", xlabel="tokens (res/16)²", ylabel=label)
      if ax.lines:
        ax.legend(fontsize=7)
    axes[0].set_title("XCiT (linear in tokens) vs DeiT (quadratic): time")
    axes[1].set_title("memory")
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.add_argument("--torch-python", default=None,
                 help="a Python with torch and timm for the timm comparison (default: this one if it has torch)")
  p.add_argument("--sections", default="scaling,timm",
                 help="comma-separated subset of: scaling, timm, flops (compile-only FLOP counts)")
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, max(args.repeats, 5), args.torch_python or bench_torch.default_torch_python(),
             args.sections.split(","))
  return finish(args, "xcit", rows, COLUMNS, "XCiT vs ViT/DeiT, and vs timm",
                "time_s = median forward time (batch 1, interleaved rounds); mem = XLA temp + argument "
                "bytes, every buffer counted (CPU: compiled without YNNPACK fusions for the count); "
                "*_vs_224 relative to the smallest resolution; xcit_over_vit_* against the ViT of equal width "
                "(T12: DeiT-Ti, S12: DeiT-S; N12: DeiT-Ti); timm rows: ours vs timm (eager PyTorch) in the same "
                "run, same thread count.", plot)


if __name__ == "__main__":
  main()
