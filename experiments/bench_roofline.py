"""Roofline of a Linformer train step: XLA-counted FLOPs per second against this machine's matmul peak.

    python -m experiments.bench_roofline --out DIR [--quick]

Step: the trainer's own ``linformer_jax.steps.make_train_step`` (data kind "mlm", jitted with the state donated, as
``linformer_jax.train`` runs it) on a ``TrainState`` from ``steps.init_state``, with the trainer's optimizer
(``linformer_jax.optim.make_optimizer``, default config: Adafactor), of the byte-level masked LM
``linformer_lm`` (``LinformerLM``: token + position embedding, ``Linformer(dim, num_heads, k, sharing="none")``,
LM head over the 258-symbol byte vocabulary; cross-entropy on 15 % of the positions) — full run: n=4096, dim 512,
8 heads, k=256, batch 8, depth 1, FF 2048 (``--quick``: n=1024, batch 2). FLOPs = XLA's count of the whole step
(``bench_common.flops_of``: 2·M·N·K per matmul plus elementwise ops, counted on the model without query blocks, since
a loop body counts once). Peak = a large float32 ``jnp.dot`` (full: 4096×4096 @ 4096×4096; quick: 2048), timed in
the same interleaved rounds as the step, so load from other processes hits both. Also the forward pass alone and
each part, forward+backward at the step's shapes (Q/K/V/O projections, the E/F sequence projections, the attention
core, the feed-forward, the LayerNorms, the LM head with its loss, the optimizer update), each timed and counted the
same way: where the step loses to the peak.
CPU seconds (user/system) of one step run come from ``os.times()`` (user + system < 2 × wall means the cores
were shared with other processes; system time is mostly page-faulting of freshly mapped buffers).
Rows: part, flops, time_s, gflops_per_s, fraction_of_peak, time_share, user_s, system_s.
Writes DIR/roofline.{json,md,png}.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_common import (bench_parser, blocking, compile_fn, finish, flops_of, interleaved_median_times,
                                      random_like, sweep_mode, unblocked, write_plot)
from linformer_jax import steps
from linformer_jax.data.mlm import VOCAB_SIZE
from linformer_jax.layers.attention import softmax_attention
from linformer_jax.layers.mlp import FeedForward
from linformer_jax.optim import default_optimizer_config, make_optimizer

SIZES = {
    "full": dict(n=4096, dim=512, heads=8, k=256, batch=8, depth=1, peak_n=4096),
    "quick": dict(n=1024, dim=512, heads=8, k=256, batch=2, depth=1, peak_n=2048),
    "tiny": dict(n=64, dim=32, heads=2, k=16, batch=1, depth=1, peak_n=128),
}
COLUMNS = ["part", "flops", "time_s", "gflops_per_s", "fraction_of_peak", "time_share", "user_s", "system_s"]
TRAIN_STEP = "linformer_jax.steps.make_train_step (mlm)"  # what the "train step" row times


def mlm_model(n: int, **fields):
  """The trainer's byte-level masked LM (``steps.build_model`` of a ``linformer_lm`` config) for sequences of n."""
  return steps.build_model({"name": "linformer_lm", **fields}, {"kind": "mlm", "vocab_size": VOCAB_SIZE,
                                                                 "max_len": n})


def mlm_batch(batch: int, n: int, seed: int = 0) -> dict:
  """A masked-LM batch as the trainer feeds it (``steps`` "mlm" keys): random bytes, 15 % of them scored."""
  rng = np.random.default_rng(seed)
  return {"inputs": rng.integers(0, VOCAB_SIZE, (batch, n), dtype=np.int32), "mask": np.ones((batch, n), bool),
          "targets": rng.integers(0, VOCAB_SIZE, (batch, n), dtype=np.int32),
          "weights": (rng.random((batch, n)) < 0.15).astype(np.float32)}


class DonatingStep:
  """A zero-argument callable running the compiled ``train_step(state, batch, rng)`` once, its state donated: each
  call continues from the state the previous one returned (as in the training loop)."""

  def __init__(self, compiled, state, batch, rng):
    self.compiled, self.state, self.batch, self.rng = compiled, state, batch, rng

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    return jax.block_until_ready((self.state, metrics))


def parts(s):
  """(name, function of one tuple argument, abstract argument) for each part of the layer, fwd+bwd; then the LM
  head with the loss (once per step, not per layer)."""
  b, n, d, h, k = s["batch"], s["n"], s["dim"], s["heads"], s["k"]
  hd = d // h
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  x, qkv = f32(b, n, d), f32(b, n, h, hd)
  ff = FeedForward(4 * d, "gelu")
  ff_params = jax.eval_shape(ff.init, jax.random.key(0), x)
  ln = nn.LayerNorm(epsilon=1e-5)
  ln_params = jax.eval_shape(ln.init, jax.random.key(0), x)
  return [
      ("Q/K/V/O projections", lambda a: jnp.einsum("bnhe,hed->bnd", jnp.einsum(
          "bnd,dhe->bnhe", a[0], a[1]) + jnp.einsum("bnd,dhe->bnhe", a[0], a[2]) + jnp.einsum(
              "bnd,dhe->bnhe", a[0], a[3]), a[4]), (x, f32(d, h, hd), f32(d, h, hd), f32(d, h, hd), f32(h, hd, d))),
      ("E/F projections (per head)", lambda a: jnp.einsum("bnhd,hnk->bkhd", a[0], a[2]) + jnp.einsum(
          "bnhd,hnk->bkhd", a[1], a[3]), (qkv, qkv, f32(h, n, k), f32(h, n, k))),
      ("attention core (n×k)", lambda a: softmax_attention(a[0], a[1], a[2]), (qkv, f32(b, k, h, hd),
                                                                              f32(b, k, h, hd))),
      ("feed-forward (GELU)", lambda a: ff.apply(a[0], a[1]), (ff_params, x)),
      ("2 LayerNorms", lambda a: ln.apply(a[0], ln.apply(a[0], a[1])), (ln_params, x)),
      (HEAD, lambda a: optax.softmax_cross_entropy_with_integer_labels(
          jnp.einsum("bnd,dv->bnv", a[0], a[1]) + a[2], a[3]) * a[4],
       (x, f32(d, VOCAB_SIZE), f32(VOCAB_SIZE), jax.ShapeDtypeStruct((b, n), jnp.int32), f32(b, n))),
  ]


HEAD = "LM head + loss"


def _cpu_times():
  t = os.times()
  return t.user + t.children_user, t.system + t.children_system


def run(mode: str, repeats: int):
  s = SIZES[mode]
  model = mlm_model(s["n"], dim=s["dim"], depth=s["depth"], num_heads=s["heads"], k=s["k"], sharing="none")
  flat = unblocked(model)  # FLOPs are counted without query blocks (XLA counts a loop body once)
  tx = make_optimizer(default_optimizer_config(), 1000).tx
  batch = jax.tree.map(jnp.asarray, mlm_batch(s["batch"], s["n"]))
  rng = jax.random.key(1)
  state = steps.init_state(model, tx, batch, "mlm", jax.random.key(0))
  params, model_state = state.params, state.model_state
  measured = {}  # part → (zero-argument callable, flops, compile seconds)

  def add(name, fn, *args, flops_fn=None, run=None):
    compiled, seconds, _ = compile_fn(fn, *args, flops_fn=flops_fn, donate_argnums=0 if run else ())
    measured[name] = (run(compiled) if run else blocking(compiled, *args), flops_of(compiled), seconds)

  pn = s["peak_n"]
  a = random_like(jax.ShapeDtypeStruct((pn, pn), jnp.float32), seed=2, scale=1.0)
  add("peak: jnp.dot f32", jnp.dot, a, a)
  add("train step", steps.make_train_step(model, tx, "mlm"), state, batch, rng,
      flops_fn=steps.make_train_step(flat, tx, "mlm"),
      run=lambda compiled: DonatingStep(compiled, jax.tree.map(jnp.copy, state), batch, rng))
  forward = lambda m: lambda p, b: m.apply({"params": p, **model_state}, b["inputs"], b["mask"])  # noqa: E731
  add("forward", forward(model), params, batch, flops_fn=forward(flat))
  for name, fn, abstract in parts(s)[2:3] if mode == "tiny" else parts(s):  # test mode: one part (the core)
    grad = lambda fn: jax.grad(lambda args: jnp.mean(fn(args) ** 2), allow_int=True)  # noqa: E731 (int labels)
    add(name + " (fwd+bwd)", grad(fn), random_like(abstract),
        flops_fn=grad(lambda a: softmax_attention(*a, block_rows=0)) if "core" in name else None)
  grads = jax.tree.map(jnp.ones_like, params)
  add("optimizer update", lambda g, o, p: tx.update(g, o, p), grads, state.opt_state, params)

  # CPU seconds (user vs system) of one step run after a warm-up run
  measured["train step"][0]()
  u0, s0 = _cpu_times()
  measured["train step"][0]()
  u1, s1 = _cpu_times()

  times = interleaved_median_times({name: m[0] for name, m in measured.items()}, repeats=repeats)
  peak_flops = measured["peak: jnp.dot f32"][1] / times["peak: jnp.dot f32"]
  step_time = times["train step"]
  rows = []
  for name, (_, flops, compile_s) in measured.items():
    t = times[name]
    rows.append(dict(part=name, flops=flops, time_s=t, gflops_per_s=round(flops / t / 1e9, 2),
                     fraction_of_peak=round(flops / t / peak_flops, 3), compile_s=round(compile_s, 3), **s))
    if name not in ("peak: jnp.dot f32", "train step", "forward"):  # layer parts run once per layer
      per_step = 1 if name.startswith((HEAD, "optimizer")) else s["depth"]
      rows[-1]["time_share"] = round(t * per_step / step_time, 3)
    rows[-1].update(model="linformer_lm", vocab_size=VOCAB_SIZE)
    if name == "train step":
      rows[-1].update(step=TRAIN_STEP, user_s=round(u1 - u0, 3), system_s=round(s1 - s0, 3))
    r = rows[-1]
    print(f"{name:<40} {flops / 1e9:10.2f} GFLOP {t * 1e3:10.1f} ms {r['gflops_per_s']:8.1f} GFLOP/s "
          f"{100 * r['fraction_of_peak']:6.1f} % of peak", flush=True)
  return rows


def plot(rows, path):
  def draw(axes):
    names = [r["part"] for r in rows]
    axes[0].barh(names, [100 * r["fraction_of_peak"] for r in rows])
    axes[0].axvline(50, color="gray", ls=":")
    axes[0].set(xlabel="% of measured matmul peak (FLOPs / time)", title="Linformer train step roofline")
    axes[0].invert_yaxis()
    shares = [r for r in rows if r.get("time_share") is not None]
    axes[1].barh([r["part"] for r in shares], [100 * r["time_share"] for r in shares])
    axes[1].set(xlabel="% of the step's time (each part timed alone)", title="where time goes")
    axes[1].invert_yaxis()
  write_plot(path, draw, figsize=(13, 4.5))


def main(argv=None):
  p = bench_parser(__doc__)
  args = p.parse_args(argv)
  mode = sweep_mode(args)
  rows = run(mode, max(args.repeats, 5))
  return finish(args, "roofline", rows, COLUMNS, "Roofline: Linformer train step vs matmul peak",
                "train step = the trainer's linformer_jax.steps.make_train_step (masked LM, state donated); "
                "flops = XLA cost_analysis of each function (bench_common.flops_of); time = median of >= 5 in "
                "interleaved rounds; fraction_of_peak = (flops / time) / (peak dot flops / time); "
                "time_share = part time × (depth for the layer's parts, 1 for the LM head and the optimizer) / "
                "train-step time.", plot)


if __name__ == "__main__":
  main()
