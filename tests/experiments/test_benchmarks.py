"""The benchmark scripts (experiments/bench_*.py) in their hidden test-sized mode (--tiny): each writes
DIR/X.json (rows with the documented keys and sane values, machine info with the load), DIR/X.md and DIR/X.png."""
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(name, tmp_path):
  module = importlib.import_module(f"experiments.bench_{name}")
  stem = name
  module.main(["--out", str(tmp_path), "--tiny"])
  rows = json.loads((tmp_path / f"{stem}.json").read_text())
  assert rows and (tmp_path / f"{stem}.md").read_text().startswith("# ")
  assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
  machine = rows[0]["machine"]
  assert {"cpu", "cores", "backend", "jax", "loadavg", "usable_cores"} <= set(machine)
  assert len(machine["loadavg"]) == 3
  return rows


def test_efficiency(tmp_path):
  rows = run_bench("efficiency", tmp_path)
  timed = [r for r in rows if r["section"] == "time+memory"]
  for r in timed:
    assert {"n", "k", "time_full_s", "time_linformer_s", "mem_full_bytes", "mem_linformer_bytes", "time_saved",
            "mem_saved", "paper_time_saved", "paper_mem_saved"} <= set(r)
    assert r["k"] < r["n"] and r["time_full_s"] > 0 and r["time_linformer_s"] > 0
    assert r["time_saved"] == pytest.approx(r["time_full_s"] / r["time_linformer_s"], rel=0.01)
  largest = max(r["n"] for r in timed)
  for r in rows:
    if r["n"] == largest:
      assert r["mem_linformer_bytes"] < r["mem_full_bytes"] and r["mem_saved"] > 1
  for r in timed:
    if r["n"] == largest:  # FLOPs: q·kᵀ and p·v cost 4·b·n·n·dim per layer, the Linformer's 4·b·n·k·dim plus
      # 4·b·n·k·dim for E·K and F·V; the rest of the block is the same, softmax adds a little on top
      matmuls = 4 * r["batch"] * r["n"] * r["dim"] * (r["n"] - 2 * r["k"]) * r["depth"]
      assert matmuls <= r["flops_full"] - r["flops_linformer"] <= 1.5 * matmuls
      assert r["flop_saved"] == pytest.approx(r["flops_full"] / r["flops_linformer"], rel=0.01)
  memory_only = [r for r in rows if r["section"] == "memory only"]
  assert memory_only and all(r.get("time_full_s") is None and r["mem_saved"] > 1 for r in memory_only)


def test_efficiency_baselines_standard_and_blocked(tmp_path):
  """On CPU the Table-3 baseline is the standard Transformer (each head's n × n scores held at once), and the same
  model with query blocks is a second baseline; --attention-block-rows 16 makes the tiny sweep use blocks (of 16
  queries). FLOPs are those of the unblocked models (a loop body would count once)."""
  from experiments import bench_efficiency
  bench_efficiency.main(["--out", str(tmp_path), "--tiny", "--attention-block-rows", "16"])
  rows = json.loads((tmp_path / "efficiency.json").read_text())
  geometry = bench_efficiency.SWEEPS["tiny"]["model"]
  heads = geometry["num_heads"]
  largest = max(r["n"] for r in rows)
  for r in rows:
    scores = r["batch"] * heads * r["n"] ** 2 * 4  # one layer's n × n scores, float32
    assert r["temp_full_bytes"] >= scores
    if r["n"] == largest:  # there the scores outweigh the rest of the forward
      assert scores > r["temp_full_blocked_bytes"] and r["mem_saved_blocked"] < r["mem_saved"]
    assert r["mem_saved_blocked"] == pytest.approx(r["mem_full_blocked_bytes"] / r["mem_linformer_bytes"], rel=0.01)
    assert r["attention_block_rows"] == 16
    if r["section"] == "time+memory":
      assert r["time_full_blocked_s"] > 0
      assert r["time_saved_blocked"] == pytest.approx(r["time_full_blocked_s"] / r["time_linformer_s"], rel=0.01)
      if r["n"] == largest:  # both models ran in blocks, FLOPs counted unblocked: the hand count of test_efficiency
        matmuls = 4 * r["batch"] * r["n"] * r["dim"] * (r["n"] - 2 * r["k"]) * r["depth"]
        assert matmuls <= r["flops_full"] - r["flops_linformer"] <= 1.5 * matmuls
  md = (tmp_path / "efficiency.md").read_text()
  assert "time_saved_blocked" in md and "mem_saved_blocked" in md


def test_efficiency_flops_are_those_of_the_unblocked_model():
  """bench_efficiency compiles a model in query blocks, but flops_of counts the same model unblocked (flops_fn):
  the count equals the standard (unblocked) program's, while XLA's own count of the blocked one is lower."""
  from experiments.bench_common import flops_of
  from experiments.bench_efficiency import _compile_forward, _model
  model = _model(64, 16, "full", dict(dim=16, num_heads=2, dim_ff=32, depth=1, attention_block_rows=8))
  blocked, _, _, _ = _compile_forward(model, (1, 64, 16))
  standard, _, _, _ = _compile_forward(model, (1, 64, 16), standard=True)
  assert blocked.cost_analysis()["flops"] < standard.cost_analysis()["flops"]  # the blocked loop body counts once
  assert flops_of(blocked) == flops_of(standard) > 0


def test_counted_memory_includes_the_attention_scores():
  """Full attention without query blocks must hold one head's n × n scores at some point: the counted temp bytes
  cover at least that (on CPU the fused program's own memory_analysis() may not: YNNPACK fusions keep them outside
  XLA's count)."""
  from experiments.bench_common import counted_memory, unblocked
  from linformer_jax.models import Linformer
  n, heads, dim = 2048, 4, 256  # large enough for XLA:CPU to fuse (the fused count is 1/8 of the scores here)
  model = unblocked(Linformer(max_len=n, k=n, attention="full", dim=dim, num_heads=heads, dim_ff=512, depth=1))
  assert model.attention_block_rows == 0  # no query blocks
  x = jax.ShapeDtypeStruct((1, n, dim), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  mem = counted_memory(model.apply, variables, x)
  assert mem["temp_bytes"] >= heads * n * n * 4 and mem["argument_bytes"] >= n * dim * 4


def test_counted_memory_says_when_it_cannot_unfuse(monkeypatch):
  from experiments import bench_common
  monkeypatch.setattr(bench_common, "UNFUSED_CPU_OPTIONS", {"xla_no_such_option_for_this_test": ""})
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  with pytest.warns(UserWarning, match="YNNPACK"):
    mem = bench_common.counted_memory(lambda a: a @ a, x)
  assert mem["argument_bytes"] == 64 * 64 * 4


def _independent_adafactor_floats(shape, min_dim):
  """Second-moment floats: rows + columns of the two largest axes if the second-largest is >= min_dim."""
  dims = sorted(shape)
  if len(shape) >= 2 and dims[-2] >= min_dim:
    return math.prod(shape) // dims[-1] + math.prod(shape) // dims[-2]
  return math.prod(shape)


def test_optimizer_state(tmp_path):
  rows = run_bench("optimizer", tmp_path)
  from experiments.bench_optimizer import GEOMETRY
  from linformer_jax.models import LinformerLM
  for sharing in ("none", "layerwise"):
    sel = {r["optimizer"]: r for r in rows if r["sharing"] == sharing}
    model = LinformerLM(**GEOMETRY["tiny"], sharing=sharing)
    shapes = [p.shape for p in jax.tree.leaves(jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, GEOMETRY["tiny"]["max_len"]), jnp.int32))["params"])]
    n_params = sum(math.prod(s) for s in shapes)
    assert sel["adamw (ours)"]["params"] == n_params
    adam = sel["adamw (ours)"]["state_bytes"]
    assert adam == pytest.approx(8 * n_params, abs=64)  # mu + nu (+ counters)
    ada = sel["adafactor (ours)"]["state_bytes"]
    expected = 4 * sum(_independent_adafactor_floats(s, 32) for s in shapes)
    # + one placeholder float per factored/unfactored slot and a few counters
    assert expected <= ada <= expected + 4 * 3 * len(shapes) + 64
    assert sel["adafactor (ours)"]["adam_over_this"] == pytest.approx(adam / ada, rel=0.01)
    assert sel["adafactor (ours)"]["adam_over_this"] > 5
    for r in sel.values():
      assert r["expected_bytes"] <= r["state_bytes"] <= r["expected_bytes"] + 4 * 3 * len(shapes) + 64


def _spy_on_train_steps(monkeypatch):
  """Records the data kind of every ``linformer_jax.steps.make_train_step`` call (the trainer's step)."""
  from linformer_jax import steps
  kinds, real = [], steps.make_train_step

  def spy(model, tx, kind, *args, **kwargs):
    kinds.append(kind)
    return real(model, tx, kind, *args, **kwargs)
  monkeypatch.setattr(steps, "make_train_step", spy)
  return kinds


def test_compile(tmp_path, monkeypatch):
  kinds = _spy_on_train_steps(monkeypatch)
  rows = run_bench("compile", tmp_path)
  assert {r["scan_layers"] for r in rows} == {True, False}
  for r in rows:
    assert r["lower_s"] > 0 and r["compile_s"] > 0 and r["total_vs_depth4"] > 0
    assert r["total_s"] == pytest.approx(r["lower_s"] + r["compile_s"], abs=0.002)
    assert r["model"] == "linformer_lm" and r["step"].startswith("linformer_jax.steps.make_train_step")
  assert kinds == ["mlm"] * sum(r["repeats"] for r in rows)  # every compiled step is the trainer's


def test_roofline(tmp_path, monkeypatch):
  kinds = _spy_on_train_steps(monkeypatch)
  rows = run_bench("roofline", tmp_path)
  assert kinds == ["mlm", "mlm"]  # the timed step and its unblocked twin for the FLOP count
  by = {r["part"]: r for r in rows}
  assert by["peak: jnp.dot f32"]["fraction_of_peak"] == 1.0
  n = by["peak: jnp.dot f32"]["peak_n"]
  assert by["peak: jnp.dot f32"]["flops"] == pytest.approx(2 * n ** 3, rel=0.01)
  step = by["train step"]
  assert step["step"].startswith("linformer_jax.steps.make_train_step") and step["model"] == "linformer_lm"
  assert step["flops"] > 2 * by["forward"]["flops"] > 0  # backward ≈ 2 × forward, + the optimizer
  assert 0 < step["fraction_of_peak"] < 2 and step["user_s"] >= 0 and step["system_s"] >= 0
  assert all(r["time_s"] > 0 for r in rows)


def test_xcit(tmp_path):
  rows = run_bench("xcit", tmp_path)
  scaling = [r for r in rows if r["section"] == "scaling"]
  assert {r["model"] for r in scaling} == {"N12", "DeiT-Ti"}
  for r in scaling:
    assert r["time_s"] > 0 and r["mem_bytes"] > 0 and r["tokens"] == (r["res"] // 16) ** 2
  assert all(r["xcit_over_vit_time"] > 0 for r in scaling if r["model"] == "N12")


def test_xcit_flops_section(tmp_path):
  """Compile-only FLOP counts: each ViT forward does at least 2·tokens·(its Dense kernel sizes) FLOPs."""
  from experiments import bench_xcit
  from linformer_jax.models import create_model
  bench_xcit.main(["--out", str(tmp_path), "--tiny", "--sections", "flops"])
  rows = json.loads((tmp_path / "xcit.json").read_text())
  assert {r["section"] for r in rows} == {"flops"} and {r["model"] for r in rows} == {"N12", "DeiT-Ti"}
  deit = next(r for r in rows if r["model"] == "DeiT-Ti")
  model = create_model(bench_xcit.MODELS["DeiT-Ti"], depth=1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), "float32"))
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
                if "kernel" in jax.tree_util.keystr(path) and len(leaf.shape) == 2)
  assert deit["flops"] >= 2 * deit["tokens"] * kernels
  n12 = next(r for r in rows if r["model"] == "N12")
  assert n12["xcit_over_vit_flops"] == pytest.approx(n12["flops"] / deit["flops"], rel=1e-3)


def test_vs_pytorch(tmp_path):
  rows = run_bench("vs_pytorch", tmp_path)  # the PyTorch side only where this Python has torch
  assert {(r["model"], r["mode"]) for r in rows} == {(m, d) for m in ("linformer", "transformer")
                                                     for d in ("fwd", "fwdbwd")}
  for r in rows:
    assert r["time_ours_s"] > 0 and r["mem_ours_xla_bytes"] > 0
    # XLA's FLOP count covers at least the dense maps: per token 3·2d² (QKV) + 2d² (W^O) + 2·2·d·ff (FF)
    d, ff = r["dim"], r["ff"]
    dense = r["batch"] * r["n"] * r["depth"] * (8 * d * d + 4 * d * ff)
    assert r["flops_ours"] >= (dense if r["mode"] == "fwd" else 2 * dense)
    assert r["peak_gflops_per_s"] > 0
    assert r["floor_s"] == pytest.approx(r["flops_ours"] / (r["peak_gflops_per_s"] * 1e9), rel=1e-2)
    if bench_torch.default_torch_python() is None:
      assert r["time_torch_s"] is None and "skipped" in r["note"]
    else:
      assert r["time_torch_s"] > 0 and r["ours_over_torch"] > 0


def test_rss_rise_sees_a_large_allocation():
  rise = bench_torch.rss_rise(lambda: np.ones(64 * 2**20 // 8).sum())
  if rise is None:
    pytest.skip("/proc/self/clear_refs not available")
  assert rise >= 48 * 2**20


def test_efficiency_tokens_and_sections(tmp_path):
  """--tokens sets batch = max(1, tokens // n); --sections picks the timed and/or the memory-only section."""
  from experiments import bench_efficiency
  bench_efficiency.main(["--out", str(tmp_path / "t"), "--tiny", "--tokens", "512", "--sections", "time"])
  rows = json.loads((tmp_path / "t" / "efficiency.json").read_text())
  assert {r["section"] for r in rows} == {"time+memory"}
  assert {(r["n"], r["batch"]) for r in rows} == {(64, 8), (256, 2)}
  bench_efficiency.main(["--out", str(tmp_path / "m"), "--tiny", "--sections", "memory"])
  rows = json.loads((tmp_path / "m" / "efficiency.json").read_text())
  assert rows and {r["section"] for r in rows} == {"memory only"}


def test_flops_are_counted_on_the_lowered_program():
  """flops_of gives XLA's FLOPs of what compile_fn compiled: 2·M·N·K for a matmul, counted on demand from the same
  function lowered for the host CPU (_cpu_flops; on an accelerator XLA's own counts leave out library matmuls)."""
  from experiments import bench_common
  from experiments.bench_common import _cpu_flops, compile_fn, flops_of
  a, b = jnp.ones((64, 96)), jnp.ones((96, 32))
  compiled, _, _ = compile_fn(jnp.dot, a, b)
  assert compiled in bench_common._FLOPS_LATER and flops_of(compiled) == 2 * 64 * 96 * 32
  assert compiled.cost_analysis()["flops"] == 2 * 64 * 96 * 32  # the compiled count agrees here
  assert _cpu_flops(jnp.dot, (a, b)) == 2 * 64 * 96 * 32
  # a pytree argument with a non-array leaf (as an optimizer state may hold) lowers too
  assert _cpu_flops(lambda t: t["a"] @ t["b"] * t["s"], ({"a": a, "b": b, "s": 2.0},)) >= 2 * 64 * 96 * 32


def test_flops_of_blocked_attention_count_every_block():
  """XLA's cost_analysis counts a loop body once, so attention run in query blocks (a lax.map) reports the FLOPs
  of one block; with compile_fn's flops_fn (the same attention unblocked) flops_of counts every block: q·kᵀ and p·v,
  2·b·h·t·s·d each (hand count)."""
  from experiments.bench_common import compile_fn, flops_of
  from linformer_jax.layers import softmax_attention
  b, t, s, h, d = 2, 256, 128, 2, 16
  q = jnp.ones((b, t, h, d))
  kv = jnp.ones((b, s, h, d))
  fn = lambda q, k, v: softmax_attention(q, k, v, block_rows=32)  # 8 blocks
  assert "scan" in str(jax.make_jaxpr(fn)(q, kv, kv))
  matmuls = 2 * (2 * b * h * t * s * d)
  compiled, _, _ = compile_fn(fn, q, kv, kv)
  assert compiled.cost_analysis()["flops"] < matmuls / 4  # the loop body alone
  assert flops_of(compiled) < matmuls / 4  # without flops_fn: the same undercount
  compiled, _, _ = compile_fn(fn, q, kv, kv, flops_fn=lambda q, k, v: softmax_attention(q, k, v, block_rows=0))
  assert compiled.cost_analysis()["flops"] < matmuls / 4
  assert matmuls <= flops_of(compiled) <= 1.5 * matmuls  # + softmax and scaling


def test_torch_side_follows_the_jax_backend():
  """On CPU the PyTorch side runs on the CPU; the memory budget there comes from MemAvailable."""
  from experiments.bench_common import device_bytes_limit, memory_budget, on_accelerator, torch_device_spec
  assert jax.default_backend() == "cpu" and not on_accelerator()
  assert torch_device_spec() == {"device": "cpu"} and device_bytes_limit() is None
  assert memory_budget(1.5) == int(1.5 * 2**30) and memory_budget(None) > 0


def test_gpu_precision_decides_tf32():
  """On a GPU, TensorFloat-32 on the torch side exactly when JAX's float32 matmuls may use it."""
  from experiments import bench_common
  with jax.default_matmul_precision("highest"):
    assert bench_common.torch_device_spec(backend="gpu") == {"device": "cuda", "tf32": False}
  assert bench_common.torch_device_spec(backend="gpu") == {"device": "cuda", "tf32": True}


def test_torch_worker_cuda_path_synchronizes_and_reads_the_allocator():
  """The worker's CUDA helpers, with a stand-in for torch.cuda: every timed call waits for the device, and the
  first-run memory is the allocator's peak minus what was held before (reset just before the run)."""
  calls = []

  class Cuda:
    held, peak = 100, 0

    def synchronize(self):
      calls.append("sync")

    def memory_allocated(self):
      return self.held

    def reset_peak_memory_stats(self):
      self.peak = self.held

    def max_memory_allocated(self):
      return self.peak

  class Torch:
    cuda = Cuda()

  def work():
    calls.append("work")
    Torch.cuda.peak = 100 + 4096  # the run allocates 4096 bytes on top of what was held
    return 7

  fn = bench_torch._synced(Torch, "cuda", work)
  assert fn() == 7 and calls == ["work", "sync"]
  assert bench_torch._memory_rise(Torch, "cuda", fn) == {"device_peak_rise_bytes": 4096}
  assert bench_torch._synced(Torch, "cpu", work) is work  # on CPU nothing is added


def test_torch_side_on_cpu_against_a_tpu_is_flagged():
  from experiments import bench_common
  with pytest.warns(UserWarning, match="not comparable"):
    assert bench_common.torch_device_spec(backend="tpu") == {"device": "cpu"}


def test_precision(tmp_path, monkeypatch):
  """float32 vs bfloat16 train steps of each model: both measured with the trainer's step, the same float32 state
  (argument bytes equal), the bfloat16 rows' ratios computed from the float32 rows; the notes say what a CPU run
  means."""
  kinds = _spy_on_train_steps(monkeypatch)
  rows = run_bench("precision", tmp_path)
  assert kinds == ["mlm", "mlm", "image", "image"]
  assert [(r["model"], r["dtype"]) for r in rows] == [
      ("linformer_lm", "float32"), ("linformer_lm", "bfloat16"),
      ("vit_tiny_patch16_224", "float32"), ("vit_tiny_patch16_224", "bfloat16")]
  for f32, bf16 in zip(rows[::2], rows[1::2]):
    assert f32["step_time_s"] > 0 and bf16["step_time_s"] > 0 and f32["temp_bytes"] > 0
    assert f32["argument_bytes"] == bf16["argument_bytes"]  # float32 parameters and optimizer state on both sides
    assert bf16["speedup"] == pytest.approx(f32["step_time_s"] / bf16["step_time_s"], rel=0.01)
    assert bf16["temp_vs_f32"] == pytest.approx(bf16["temp_bytes"] / f32["temp_bytes"], rel=0.01)
    assert bf16["step"].startswith("linformer_jax.steps.make_train_step")
  md = (tmp_path / "precision.md").read_text()
  assert "XLA:CPU has no bfloat16 matmul units" in md and "measured on a GPU" in md and "1.7×" in md


def test_causal(tmp_path, monkeypatch):
  """Causal Linformer vs causal full attention: train steps are the trainer's (mlm kind with next-token targets);
  decoding's cache bytes are the Linformer's (batch, heads, k, d) float32 states (constant in the context) and the
  full attention's (batch, n, heads, d) key/value cache (linear in it); ratios and targets follow from the rows."""
  from experiments.bench_causal import SIZES, next_token_batch
  kinds = _spy_on_train_steps(monkeypatch)
  rows = run_bench("causal", tmp_path)
  s = SIZES["tiny"]
  g = s["geometry"]
  train = [r for r in rows if r["section"] == "train step"]
  decoding = [r for r in rows if r["section"] == "decoding"]
  models = [f"linformer k={k}" for k in s["ks"]] + ["full"]
  assert [(r["n"], r["model"]) for r in train] == [(n, m) for n in s["ns"] for m in models]
  assert [(r["n"], r["model"]) for r in decoding] == [(n, m) for n in s["contexts"] for m in models]
  assert kinds.count("mlm") == len(train) + sum(r["attention"] == "full" for r in train)  # + the unblocked twin
  batch = next_token_batch(1, 8)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # next-token targets
  assert batch["weights"][0, -1] == 0 and batch["weights"][0, :-1].min() == 1
  for r in rows:
    assert r["time_s"] > 0 and r["temp_bytes"] > 0 and not r["note"]
  for r in train:
    assert r["warmup_s"] > 0 and r["argument_bytes"] > 0
    assert (r.get("temp_unblocked_bytes", 0) > 0) == (r["attention"] == "full")
  by = {(r["section"], r["n"], r["model"]): r for r in rows}
  d = g["dim"] // g["num_heads"]
  for r in decoding:
    per_layer = (2 * g["num_heads"] * r["k"] * d * 4 + g["num_heads"] * r["k"] if r["attention"] == "linformer"
                 else 2 * r["n"] * g["num_heads"] * d * 4)
    assert r["cache_bytes"] == g["depth"] * (per_layer + 4) + 4  # + each layer's index, the model's position
    assert r["vs_shortest"] == pytest.approx(r["time_s"] / by[("decoding", s["contexts"][0], r["model"])]["time_s"],
                                             rel=0.01)
  for r in rows:
    if r["attention"] == "linformer":
      full = by[(r["section"], r["n"], "full")]
      assert r["full_over_linformer_time"] == pytest.approx(full["time_s"] / r["time_s"], rel=0.01)
      key = "cache_bytes" if r["section"] == "decoding" else "temp_bytes"
      assert r["full_over_linformer_memory"] == pytest.approx(full[key] / r[key], rel=0.01)
  md = (tmp_path / "causal.md").read_text()
  assert "## Train step" in md and "## Decoding" in md and "≥ 4" not in md and ">= 4× faster" in md
  assert md.count("✅") + md.count("❌") == 2 + 2 * len(s["ks"])  # the legend, then two verdicts per k
