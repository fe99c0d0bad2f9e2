"""Our Linformer vs linformer-pytorch 0.19.3, our full-attention Transformer vs ``torch.nn.TransformerEncoder``.

    python -m experiments.bench_vs_pytorch --out DIR [--quick] [--torch-python PATH]

Same model, same input, same CPU threads (on a GPU: the same GPU, and TensorFloat-32 matmuls on both sides or on
neither, following JAX's default matmul precision), measured in the same run. The PyTorch side runs in a subprocess of
``--torch-python`` (a Python with ``torch`` and ``linformer-pytorch``; default: this interpreter if it can import
torch; otherwise the PyTorch columns are empty and the rows say why). torch is not a dependency of this package.

Config "reference" (``docs``' CPU reference): batch 1, d=64, 4 heads, depth 2, FF 256 (GELU), k=128, n ∈ {1024,
4096, 16384}, dropout 0; plus config "larger": dim 256, 4 heads, depth 4, FF 1024, k=256, batch 2, n=4096.
``--quick``: reference at n ∈ {1024, 4096}.
* Linformer: ``linformer_pytorch.Linformer(parameter_sharing="layerwise")`` (post-LN, biased E); its weights and
  input are handed over (npz) and converted with ``linformer_jax.convert.from_linformer_pytorch``, so both sides run
  the very same model on the very same input (``max_abs_diff`` of the eval outputs is recorded).
* Transformer: ``nn.TransformerEncoder`` of post-LN GELU layers (``batch_first``, default SDPA; the eval fast path is
  allowed) vs our ``Linformer(attention="full", norm="post")`` (``softmax_attention``: heads-first einsums, in query
  blocks on CPU), both randomly initialised (parameter counts recorded). Modes: ``fwd`` = eval forward (torch
  ``no_grad``); ``fwdbwd`` = gradient of mean(y²) w.r.t. the parameters (torch ``loss.backward()``). Time: median of
  >= 5 after warm-up (JAX compile excluded and reported). Threads: torch ``set_num_threads(usable cores)``; XLA:CPU
  uses all usable cores (its Eigen pool). Memory: peak-RSS rise of the first execution on both sides (high-water mark
  reset via ``/proc/self/clear_refs``), plus XLA temp + argument bytes for ours (``bench_common.counted_memory``:
  every buffer counted) and autograd's saved-for-backward bytes for torch. A JAX run whose XLA memory exceeds the
  budget (``--max-mem-gib``, default 50 % of MemAvailable) is not executed (row note says so). Floor: ``flops_ours``
  (XLA ``cost_analysis``) over the machine's f32 matmul peak (``jnp.dot`` 2048², same cores, same run) is ``floor_s``,
  the time of those FLOPs at peak; ``floor_over_torch`` = floor_s / time_torch_s is the smallest ``ours_over_torch``
  any implementation of the same model can reach on this machine. Rows: config, model, mode, n, time_ours_s,
  time_torch_s, ours_over_torch, floor_over_torch, rss_rise_ours_bytes, rss_rise_torch_bytes, mem_ours_xla_bytes,
  torch_saved_bytes, ... Writes DIR/vs_pytorch.{json,md,png}."""
from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_torch
from experiments.bench_common import (bench_parser, blocking, compile_fn, finish, first_run_rss_rise, flops_of,
                                      host_load, interleaved_median_times, memory_budget, on_accelerator,
                                      random_like, sweep_mode, torch_device_spec, unblocked, write_plot)
from linformer_jax.convert import from_linformer_pytorch
from linformer_jax.models import Linformer

REFERENCE = dict(dim=64, heads=4, depth=2, ff=256, k=128, batch=1)
CONFIGS = {  # mode → [(config name, geometry, ns)]
    "full": [("reference", REFERENCE, (1024, 4096, 16384)),
             ("larger", dict(dim=256, heads=4, depth=4, ff=1024, k=256, batch=2), (4096,))],
    "quick": [("reference", REFERENCE, (1024, 4096))],
    "tiny": [("tiny", dict(dim=32, heads=2, depth=1, ff=64, k=32, batch=1), (128,))],
}
COLUMNS = ["config", "model", "mode", "n", "time_ours_s", "time_torch_s", "ours_over_torch", "floor_over_torch",
           "rss_rise_ours_bytes", "rss_rise_torch_bytes", "mem_ours_xla_bytes", "torch_saved_bytes", "max_abs_diff",
           "note"]


def torch_kwargs(g, n):
  if g is None:
    return None
  return dict(input_size=n, channels=g["dim"], dim_k=g["k"], dim_ff=g["ff"], nhead=g["heads"], depth=g["depth"],
              dropout=0.0, dropout_ff=0.0, activation="gelu", parameter_sharing="layerwise")


def our_model(kind, g, n):
  common = dict(max_len=n, dim=g["dim"], depth=g["depth"], num_heads=g["heads"], dim_ff=g["ff"], norm="post",
                activation="gelu")
  if kind == "linformer":
    return Linformer(k=g["k"], sharing="layerwise", projection_bias=True, **common)
  return Linformer(k=min(g["k"], n), attention="full", **common)


def measure_ours(model, variables, x, repeats, budget):
  """fwd and fwdbwd of ``model``: time (interleaved), XLA memory, RSS rise; modes over budget are not run."""
  def fwd(v, x, model=model):
    return model.apply(v, x)

  def fwdbwd(v, x, model=model):
    return jax.grad(lambda p: jnp.mean(model.apply({**v, "params": p}, x) ** 2))(v["params"])

  res, fns = {}, {}
  flat = unblocked(model)  # FLOPs of the model without query blocks (a loop body counts once)
  for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
    compiled, seconds, memory = compile_fn(fn, variables, x, count_all_buffers=True,
                                           flops_fn=functools.partial(fn, model=flat))
    mem = memory["temp_bytes"] + memory["argument_bytes"]
    res[mode] = dict(mem_ours_xla_bytes=mem, compile_s=round(seconds, 3), flops_ours=flops_of(compiled))
    if mem > budget:
      res[mode]["note"] = f"ours not run: XLA memory {mem / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
      continue
    res[mode]["rss_rise_ours_bytes"] = first_run_rss_rise(compiled, variables, x)
    fns[mode] = blocking(compiled, variables, x)
  for mode, t in interleaved_median_times(fns, repeats=repeats).items():
    res[mode]["time_ours_s"] = t
  return res


def matmul_peak_flops(repeats, n=None):
  """FLOP/s of a large f32 ``jnp.dot`` on this machine (all usable cores; n = 2048, on a GPU/TPU 8192): the
  roofline for the floor column."""
  n = n or (8192 if on_accelerator() else 2048)
  a = random_like(jax.ShapeDtypeStruct((n, n), jnp.float32), seed=2, scale=1.0)
  compiled, _, _ = compile_fn(jnp.dot, a, a)
  return 2 * n ** 3 / interleaved_median_times({"dot": blocking(compiled, a, a)}, repeats=repeats)["dot"]


def run_config(name, g, n, repeats, torch_python, budget, threads, tmp, peak):
  rows = []
  shape = (g["batch"], n, g["dim"])
  for kind in ("linformer", "transformer"):
    theirs, diff, note = {}, None, ""
    if torch_python:
      npz = os.path.join(tmp, f"{kind}_{n}.npz") if kind == "linformer" else None
      kwargs = torch_kwargs(g, n) if kind == "linformer" else dict(
          d_model=g["dim"], nhead=g["heads"], dim_feedforward=g["ff"], num_layers=g["depth"])
      theirs = bench_torch.run_worker_best_threads(torch_python, dict(
          task=kind, n=n, dim=g["dim"], batch=g["batch"], kwargs=kwargs, repeats=repeats, warmup=2,
          save_npz=npz, **torch_device_spec()), threads)
    if kind == "linformer" and torch_python:
      data = np.load(npz)
      sd = {key[3:]: data[key] for key in data.files if key.startswith("sd/")}
      model, variables = from_linformer_pytorch(sd, **torch_kwargs(g, n))
      x = jnp.asarray(data["x"])
      diff = float(jnp.max(jnp.abs(jax.jit(model.apply)(variables, x) - data["y"])))
    else:
      model = our_model(kind, g, n)
      x_abs = jax.ShapeDtypeStruct(shape, jnp.float32)
      variables = random_like(jax.eval_shape(model.init, jax.random.key(0), x_abs))
      x = random_like(x_abs, seed=1, scale=1.0)
      if not torch_python:
        note = "torch side skipped (no Python with torch given)"
    ours = measure_ours(model, variables, x, repeats, budget)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    for mode in ("fwd", "fwdbwd"):
      row = dict(config=name, model=kind, mode=mode, n=n, **g, threads=threads, params_ours=n_params,
                 params_torch=theirs.get("params"), time_torch_s=theirs.get(f"{mode}_time_s"),
                 rss_rise_torch_bytes=theirs.get(f"{mode}_rss_rise_bytes"),
                 device_peak_rise_torch_bytes=theirs.get(f"{mode}_device_peak_rise_bytes"),
                 torch_device=theirs.get("torch_device"), torch_tf32=theirs.get("torch_tf32"),
                 torch_saved_bytes=theirs.get("saved_for_backward_bytes") if mode == "fwdbwd" else None,
                 torch=theirs.get("torch"), linformer_pytorch=theirs.get("linformer_pytorch"),
                 torch_best_threads=theirs.get(f"{mode}_best_threads"), max_abs_diff=diff, **ours[mode])
      row["time_torch_s_by_threads"] = {k.split("_")[-1]: v for k, v in theirs.items()
                                        if k.startswith(f"{mode}_time_s_")}
      row["note"] = "; ".join(s for s in (note, row.get("note", "")) if s)
      if row.get("time_ours_s") and row.get("time_torch_s"):
        row["ours_over_torch"] = round(row["time_ours_s"] / row["time_torch_s"], 3)
      row["peak_gflops_per_s"] = round(peak / 1e9, 3)
      row["floor_s"] = row["flops_ours"] / peak  # the model's FLOPs at matmul peak: no implementation is faster
      if row.get("time_torch_s"):
        row["floor_over_torch"] = round(row["floor_s"] / row["time_torch_s"], 3)
      rows.append(row)
      t = lambda v: "   –    " if v is None else f"{v * 1e3:8.1f}"
      mib = lambda v: "  – " if v is None else f"{v / 2**20:6.1f}"
      print(f"{name:>9} {kind:<11} {mode:<6} n {n:>5}: ours {t(row.get('time_ours_s'))} ms  torch "
            f"{t(row['time_torch_s'])} ms  ratio {row.get('ours_over_torch')} (floor "
            f"{row.get('floor_over_torch')})  RSS rise ours "
            f"{mib(row.get('rss_rise_ours_bytes'))} / torch {mib(row['rss_rise_torch_bytes'])} MiB"
            f"{'  ' + row['note'] if row['note'] else ''}", flush=True)
  return rows


def run(mode, repeats, torch_python, max_mem_gib=None):
  if torch_python:
    ok, why = bench_torch.torch_python_ok(torch_python)
    if not ok:
      print(f"PyTorch side skipped: {why}")
      torch_python = None
  else:
    print("PyTorch side skipped: this Python has no torch and no --torch-python was given")
  threads = host_load()["usable_cores"]
  budget = memory_budget(max_mem_gib, fraction=0.5)
  peak = matmul_peak_flops(repeats)
  print(f"matmul peak (f32 jnp.dot, {threads} cores, backend {jax.default_backend()}): {peak / 1e9:.1f} GFLOP/s; "
        f"PyTorch side: {torch_device_spec()}", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, g, ns in CONFIGS[mode]:
      for n in ns:
        rows += run_config(name, g, n, repeats, torch_python, budget, threads, tmp, peak)
  return rows


def plot(rows, path):
  def draw(axes):
    ref = [r for r in rows if r["config"] == rows[0]["config"]]
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
      for kind, color in (("linformer", "C0"), ("transformer", "C1")):
        pts = sorted((r["n"], r) for r in ref if r["model"] == kind and r["mode"] == mode)
        for key, style, who in (("time_ours_s", "-o", "ours"), ("time_torch_s", "--s", "PyTorch")):
          xy = [(n, r[key]) for n, r in pts if r.get(key)]
          if xy:
            ax.plot(*zip(*xy), style, color=color, label=f"{kind} {who}")
      ax.set(xscale="log", yscale="log", xlabel="n", ylabel="seconds",
             title=f"{'forward' if mode == 'fwd' else 'forward + backward'} ({rows[0]['config']} config)")
      ax.legend(fontsize=7)
  write_plot(path, draw)


def main(argv=None):
  p = bench_parser(__doc__)
  p.add_argument("--torch-python", default=None,
                 help="a Python with torch and linformer-pytorch (default: this one if it has torch)")
  p.add_argument("--max-mem-gib", type=float, default=None,
                 help="largest XLA memory a JAX run may use (default: 50%% of MemAvailable; on a GPU/TPU of "
                      "the device memory)")
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, max(args.repeats, 5), args.torch_python or bench_torch.default_torch_python(), args.max_mem_gib)
  return finish(args, "vs_pytorch", rows, COLUMNS, "linformer_jax vs linformer-pytorch / nn.TransformerEncoder",
                "ours_over_torch = time_ours_s / time_torch_s (< 1: ours faster); fwd = eval forward, "
                "fwdbwd = grad of mean(y²) w.r.t. parameters; floor_over_torch = (XLA-counted FLOPs of ours / "
                "measured f32 matmul peak) / time_torch_s, the smallest ours_over_torch those FLOPs allow on "
                "this machine; RSS rise = peak-RSS rise of the first "
                "execution; max_abs_diff = |ours − PyTorch| eval output on the same converted weights.", plot)


if __name__ == "__main__":
  main()
