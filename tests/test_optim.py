"""Optimizers (linformer_jax.optim) against independent numpy (float64) re-implementations: Adafactor's factored
second moment, update clipping, parameter scale, relative step, schedules, LR logging, weight-decay masks, AdamW,
gradient accumulation, float32 statistics with bf16 params, state memory, and config validation."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linformer_jax.optim import LearningRateState, current_learning_rate, make_optimizer
from helpers import optimizer_config

EPS1 = 1e-30


config = optimizer_config


def rand(seed, shape, scale=1.0):
  return np.random.RandomState(seed).normal(0.0, scale, shape).astype(np.float32)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def find(state, cls):
  found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  assert len(found) == 1, found
  return found[0]


def rms(x):
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


# small graphs: XLA's backend optimisations cost more compile time than they save
fast_jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))


@functools.lru_cache(maxsize=None)
def jitted(opt):
  return fast_jit(opt.tx.init), fast_jit(opt.tx.update)


def run(opt, params, grads_seq):
  """Applies each grads tree in turn; returns the list of (params_before, update) and the final state."""
  init, update = jitted(opt)
  state = init(params)
  history = []
  for grads in grads_seq:
    upd, state = update(grads, state, params)
    history.append((params, upd))
    params = optax.apply_updates(params, upd)
  return history, state, params


# ------------------------------------------------------------------------------------------------------------------
# numpy references


def np_schedule(name, s, lr=None, warmup=0, total=None, end_fraction=0.0):
  s = np.asarray(s, np.float64)
  warm = np.minimum(1.0, s / warmup) if warmup > 0 else np.ones_like(s)
  if name == "constant":
    return lr * warm
  if name == "rsqrt":
    return lr * warm * np.sqrt(warmup / np.maximum(s, warmup))
  if name == "cosine":
    end = end_fraction * lr
    frac = np.clip(s - warmup, 0, total - warmup) / (total - warmup)
    return np.where(s < warmup, lr * s / max(warmup, 1), end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)))
  if name == "relative_step":
    return np.minimum(1e-2, 1.0 / np.sqrt(s + 1.0))
  raise ValueError(name)


def np_factor_axes(shape, min_dim):
  """(row axis, col axis) = (second-largest, largest), or None; the other axes are batch axes."""
  if len(shape) < 2:
    return None
  order = sorted(range(len(shape)), key=lambda a: (shape[a], a))
  if shape[order[-2]] < min_dim:
    return None
  return order[-2], order[-1]


class NpAdafactor:
  """Adafactor in float64, written from the paper: β̂2_t = 1 − t^−c (or, for a fixed β2, Adam's bias-corrected EMA),
  V̂ = R C / mean(R) over the two largest axes, U = G/√V̂, clip by max(1, RMS(U)/d), × lr_t × max(1e-3, RMS(p)),
  momentum = EMA of the scaled step, decoupled weight decay lr_t·wd·p on ≥2-D tensors."""

  def __init__(self, lr_fn, decay_rate=0.8, beta2=None, clip=1.0, param_scale=True, momentum=None, wd=0.0,
               min_dim=32, factored=True, decay_all=False):
    self.__dict__.update(lr_fn=lr_fn, c=decay_rate, beta2=beta2, clip=clip, param_scale=param_scale,
                         momentum=momentum, wd=wd, min_dim=min_dim, factored=factored, decay_all=decay_all)
    self.t = 0
    self.stats = {}
    self.m = {}

  def step(self, params, grads):
    self.t += 1
    t = self.t
    lr = float(self.lr_fn(t - 1))
    new = {}
    for key, p in params.items():
      p = np.asarray(p, np.float64)
      g = np.asarray(grads[key], np.float64)
      g2 = g * g + EPS1
      axes = np_factor_axes(p.shape, self.min_dim) if self.factored else None
      if axes is None:
        stats = (g2,)
      else:
        r_ax, c_ax = axes
        stats = (g2.mean(axis=c_ax, keepdims=True), g2.mean(axis=r_ax, keepdims=True))
      if self.beta2 is None:  # β̂2_t, no bias correction needed (β̂2_1 = 0)
        beta = 1.0 - t ** (-self.c)
        old = self.stats.get(key, tuple(np.zeros_like(x) for x in stats))
        self.stats[key] = tuple(beta * o + (1 - beta) * x for o, x in zip(old, stats))
        cur = self.stats[key]
      else:  # Adam: EMA with fixed β2, then divide by 1 − β2^t
        old = self.stats.get(key, tuple(np.zeros_like(x) for x in stats))
        self.stats[key] = tuple(self.beta2 * o + (1 - self.beta2) * x for o, x in zip(old, stats))
        cur = tuple(x / (1 - self.beta2 ** t) for x in self.stats[key])
      if axes is None:
        vhat = cur[0]
      else:
        row, col = cur
        vhat = row * col / row.mean(axis=axes[0], keepdims=True)
      u = g / np.sqrt(vhat)
      if self.clip is not None:
        u = u / max(1.0, rms(u) / self.clip)
      u = u * lr
      if self.param_scale:
        u = u * max(1e-3, rms(p))
      if self.momentum is not None:
        self.m[key] = self.momentum * self.m.get(key, 0.0) + (1 - self.momentum) * u
        u = self.m[key]
      if self.wd and (self.decay_all or p.ndim >= 2):
        u = u + lr * self.wd * p
      new[key] = p - u
    return new


class NpAdamW:
  def __init__(self, lr_fn, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decay_all=False, clip_norm=None):
    self.__dict__.update(lr_fn=lr_fn, b1=b1, b2=b2, eps=eps, wd=wd, decay_all=decay_all, clip_norm=clip_norm)
    self.t, self.mu, self.nu = 0, {}, {}

  def step(self, params, grads):
    self.t += 1
    t, lr = self.t, float(self.lr_fn(self.t - 1))
    grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
    if self.clip_norm is not None:
      norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
      grads = {k: g * min(1.0, self.clip_norm / norm) for k, g in grads.items()}
    new = {}
    for key, p in params.items():
      p, g = np.asarray(p, np.float64), grads[key]
      self.mu[key] = self.b1 * self.mu.get(key, 0.0) + (1 - self.b1) * g
      self.nu[key] = self.b2 * self.nu.get(key, 0.0) + (1 - self.b2) * g * g
      mhat, vhat = self.mu[key] / (1 - self.b1 ** t), self.nu[key] / (1 - self.b2 ** t)
      u = mhat / (np.sqrt(vhat) + self.eps)
      if self.wd and (self.decay_all or p.ndim >= 2):
        u = u + self.wd * p
      new[key] = p - lr * u
    return new


def assert_trajectory(opt, np_opt, params, grads_seq, rtol=5e-5):
  """Each step's update equals numpy's step from the same (current) params; errors are relative to the step."""
  init, update = jitted(opt)
  state = init(params)
  for i, grads in enumerate(grads_seq):
    upd, state = update(grads, state, params)
    p_np = {k: np.asarray(v, np.float64) for k, v in params.items()}
    new_np = np_opt.step(p_np, grads)
    for k in params:
      want = new_np[k] - p_np[k]
      np.testing.assert_allclose(np.asarray(upd[k]), want, rtol=rtol, atol=1e-5 * np.abs(want).max() + 1e-30,
                                 err_msg=f"step {i} {k}")
    params = optax.apply_updates(params, upd)
  return state


# ------------------------------------------------------------------------------------------------------------------
# memory / factoring


def test_matrix_state_is_n_plus_m_and_adamw_is_2nm():
  params = {"w": jax.ShapeDtypeStruct((512, 2048), jnp.float32)}
  ada = jax.eval_shape(make_optimizer(config(), 10).tx.init, params)
  fs = find(ada, optax.FactoredState)
  assert fs.v_row["w"].shape == (512,) and fs.v_col["w"].shape == (2048,)
  assert nbytes((fs.v_row, fs.v_col, fs.v)) == (512 + 2048) * 4 + 4  # + the (1,) dummy v, as in the reference
  # whole state: 10,248 B as in the reference + this module's LR record (count, lr) = 8 B
  assert nbytes(ada) == 10_248 + 8
  adamw = jax.eval_shape(make_optimizer(config(name="adamw", schedule="constant", learning_rate=1e-3), 10).tx.init,
                         params)
  adam_state = find(adamw, optax.ScaleByAdamState)
  assert nbytes((adam_state.mu, adam_state.nu)) == 2 * 512 * 2048 * 4
  assert nbytes(adamw) > 800 * nbytes(ada)


def test_attention_kernels_are_factored():
  shapes = {"q": (512, 8, 64), "o": (8, 64, 512), "w": (512, 2048), "b": (2048,)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  state = jax.eval_shape(make_optimizer(config(), 10).tx.init, params)
  fs = find(state, optax.FactoredState)
  # heads are a batch axis: one rank-1 fit of each (512 × 64) head slice
  assert (fs.v_row["q"].shape, fs.v_col["q"].shape) == ((8, 64), (512, 8))
  assert (fs.v_row["o"].shape, fs.v_col["o"].shape) == ((8, 64), (8, 512))
  for k in ("q", "o"):
    assert fs.v[k].shape == (1,)
    assert nbytes((fs.v_row[k], fs.v_col[k])) == 8 * (512 + 64) * 4  # O(heads·(n+m)), not O(nm)
  assert fs.v["b"].shape == (2048,)  # vectors keep the full second moment (paper, Algorithm 5)
  assert nbytes(state) < 0.01 * nbytes(params)
  # optax's default threshold 128 would keep a full v for the attention kernels
  state128 = jax.eval_shape(make_optimizer(config(min_dim_size_to_factor=128), 10).tx.init, params)
  assert find(state128, optax.FactoredState).v["q"].shape == (512, 8, 64)


def test_linformer_lm_state_is_small():
  from linformer_jax.models import LinformerLM
  model = LinformerLM(vocab_size=258, max_len=512, dim=512, depth=2, num_heads=8, k=128)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 512), jnp.int32))["params"]
  state = jax.eval_shape(make_optimizer(config(), 1000).tx.init, params)
  fs = find(state, optax.FactoredState)
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    v = functools.reduce(lambda t, k: t[k.key], path, fs.v)
    assert (v.shape == (1,)) == (len(p.shape) >= 2), jax.tree_util.keystr(path)  # every kernel factored
  ratio = nbytes(state) / nbytes(params)
  assert ratio < 0.05, ratio
  state128 = jax.eval_shape(make_optimizer(config(min_dim_size_to_factor=128), 1000).tx.init, params)
  assert nbytes(state128) / nbytes(params) > 0.15  # the attention kernels dominate without factoring


# ------------------------------------------------------------------------------------------------------------------
# Adafactor maths


def test_factored_first_step_matches_numpy():
  n, m = 48, 80
  g = rand(0, (n, m)) * np.linspace(0.1, 3.0, n)[:, None]  # row-scaled
  opt = make_optimizer(config(schedule="constant", learning_rate=1.0, clipping_threshold=None,
                              multiply_by_parameter_scale=False), 10)
  params = {"w": jnp.asarray(rand(1, (n, m)))}
  history, state, _ = run(opt, params, [{"w": jnp.asarray(g)}])
  (_, upd), = history
  fs = find(state, optax.FactoredState)
  g2 = g.astype(np.float64) ** 2 + EPS1
  r, c = g2.mean(axis=1), g2.mean(axis=0)
  np.testing.assert_allclose(fs.v_row["w"], r, rtol=1e-6)
  np.testing.assert_allclose(fs.v_col["w"], c, rtol=1e-6)
  vhat = np.outer(r, c) / r.mean()
  np.testing.assert_allclose(upd["w"], -g / np.sqrt(vhat), rtol=1e-5)
  # row-sum form of the paper, R C / (1ᵀR), is the same estimate
  np.testing.assert_allclose(np.outer(g2.sum(1), g2.sum(0)) / g2.sum(), vhat, rtol=1e-12)


ADAFACTOR_CASES = {
    "defaults": dict(),
    "momentum+wd": dict(momentum=0.9, weight_decay=0.05),
    "fixed beta2, no clip": dict(beta2=0.99, clipping_threshold=None),
    "unfactored, clip 2, decay 0.5": dict(factored=False, clipping_threshold=2.0, decay_rate=0.5),
    "wd all, no param scale": dict(weight_decay=0.1, weight_decay_mask="all", multiply_by_parameter_scale=False),
}


@pytest.mark.parametrize("case", list(ADAFACTOR_CASES))
def test_adafactor_trajectory_matches_numpy(case):
  over = dict(ADAFACTOR_CASES[case])
  total, warmup = 12, 3
  cfg = config(schedule="cosine", learning_rate=0.05, warmup_steps=warmup, end_lr_fraction=0.1,
               min_dim_size_to_factor=4, **over)
  opt = make_optimizer(cfg, total)
  lr_fn = functools.partial(np_schedule, "cosine", lr=0.05, warmup=warmup, total=total, end_fraction=0.1)
  np_opt = NpAdafactor(lr_fn, decay_rate=cfg.decay_rate, beta2=cfg.beta2, clip=cfg.clipping_threshold,
                       param_scale=cfg.multiply_by_parameter_scale, momentum=cfg.momentum, wd=cfg.weight_decay,
                       min_dim=4, factored=cfg.factored, decay_all=cfg.weight_decay_mask == "all")
  shapes = {"heads": (12, 3, 8), "mat": (10, 6), "vec": (7,), "thin": (3, 9)}  # thin: 3 < 4 → unfactored
  params = {k: jnp.asarray(rand(i, s, 0.5)) for i, (k, s) in enumerate(shapes.items())}
  grads = [{k: jnp.asarray(rand(100 + 10 * t + i, s) * (1 + 4 * (t == 5))) for i, (k, s) in enumerate(shapes.items())}
           for t in range(8)]
  assert_trajectory(opt, np_opt, params, grads)


def test_fixed_beta2_is_bias_corrected_adam_second_moment():
  """β̂2_t = β2(1−β2^(t−1))/(1−β2^t) reproduces Adam's v/(1−β2^t) (vector, no clip, no param scale, lr 1)."""
  b2 = 0.9
  opt = make_optimizer(config(schedule="constant", learning_rate=1.0, beta2=b2, clipping_threshold=None,
                              multiply_by_parameter_scale=False), 10)
  params = {"v": jnp.zeros((5,))}
  grads = [{"v": jnp.asarray(rand(t, (5,)))} for t in range(6)]
  history, _, _ = run(opt, params, grads)
  v = np.zeros(5)
  for t, ((_, upd), g) in enumerate(zip(history, grads), start=1):
    g = np.asarray(g["v"], np.float64)
    v = b2 * v + (1 - b2) * (g * g + EPS1)
    np.testing.assert_allclose(upd["v"], -g / np.sqrt(v / (1 - b2 ** t)), rtol=1e-5)


def test_update_clipping_bounds_rms():
  shapes = {"w": (40, 64), "b": (64,)}
  params = {k: jnp.asarray(rand(i, s)) for i, (k, s) in enumerate(shapes.items())}
  grads = [{k: jnp.asarray(rand(50 + t, s) * (50.0 if t == 10 else 1.0)) for k, s in shapes.items()}
           for t in range(20)]

  def max_ratio(d):
    opt = make_optimizer(config(schedule="constant", learning_rate=1.0, clipping_threshold=d,
                                multiply_by_parameter_scale=False), 100)
    history, _, _ = run(opt, params, grads)
    return max(rms(u[k]) for _, u in history for k in u)  # lr = 1

  assert max_ratio(None) > 2.0  # the spike makes the stale second moment give oversized steps
  assert max_ratio(1.0) <= 1.0 + 1e-5
  assert 1.5 < max_ratio(2.0) <= 2.0 + 1e-5


# ------------------------------------------------------------------------------------------------------------------
# schedules


SCHEDULE_CASES = {
    "constant": dict(schedule="constant", learning_rate=3e-3, warmup_steps=0),
    "constant+warmup": dict(schedule="constant", learning_rate=3e-3, warmup_steps=4),
    "rsqrt": dict(schedule="rsqrt", learning_rate=1e-2, warmup_steps=5),
    "cosine": dict(schedule="cosine", learning_rate=2e-2, warmup_steps=5, end_lr_fraction=0.1),
    "cosine no warmup": dict(schedule="cosine", learning_rate=2e-2, warmup_steps=0),
    "relative_step": dict(schedule="relative_step"),
}


def np_schedule_for(cfg, total):
  return functools.partial(np_schedule, cfg.schedule, lr=cfg.learning_rate, warmup=cfg.warmup_steps,
                           total=total // cfg.accumulate_steps, end_fraction=cfg.end_lr_fraction)


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_schedule_values(case):
  total = 40
  cfg = config(**SCHEDULE_CASES[case])
  opt = make_optimizer(cfg, total)
  steps = np.arange(0, 60)
  want = np_schedule_for(cfg, total)(steps)
  np.testing.assert_allclose(jax.jit(opt.schedule)(jnp.asarray(steps)), want, rtol=2e-6, atol=1e-12)
  np.testing.assert_allclose([float(opt.schedule(int(s))) for s in (0, 7, 39)], want[[0, 7, 39]], rtol=1e-6)


def test_rsqrt_peak_and_lra_numbers():
  opt = make_optimizer(config(schedule="rsqrt", learning_rate=2e-3, warmup_steps=100), 1000)
  np.testing.assert_allclose(float(opt.schedule(100)), 2e-3, rtol=1e-6)
  assert float(opt.schedule(99)) < 2e-3 and float(opt.schedule(101)) < 2e-3 and float(opt.schedule(0)) == 0.0
  # LRA: 0.05 · min(1, s/1000) / sqrt(max(s, 1000)) ≡ rsqrt with learning_rate 0.05/sqrt(1000) ≈ 1.58e-3
  lra = make_optimizer(config(schedule="rsqrt", learning_rate=0.05 / math.sqrt(1000), warmup_steps=1000), 10**6)
  s = np.array([0, 1, 10, 500, 999, 1000, 1001, 4000, 10**5])
  want = 0.05 * np.minimum(1, s / 1000) / np.sqrt(np.maximum(s, 1000))
  np.testing.assert_allclose(lra.schedule(jnp.asarray(s)), want, rtol=1e-6)
  np.testing.assert_allclose(float(lra.schedule(1000)), 1.5811388e-3, rtol=1e-6)


def test_cosine_horizon_counts_updates_with_accumulation():
  cfg = config(schedule="cosine", learning_rate=1.0, warmup_steps=2, end_lr_fraction=0.25, accumulate_steps=2)
  opt = make_optimizer(cfg, 20)  # 20 micro-steps = 10 updates
  np.testing.assert_allclose(opt.schedule(jnp.arange(12)), np_schedule("cosine", np.arange(12), 1.0, 2, 10, 0.25),
                             rtol=1e-6)
  assert float(opt.schedule(10)) == pytest.approx(0.25)


def _constant_gradient_run(opt, params, signs, steps):
  """Jitted scan of `steps` updates with gradient g = signs · |c| (so U = ±1 exactly); returns params, updates."""
  def magnitude(shape):  # rank-1 g² for matrices, so the factored V̂ is exact and U = ±1
    if len(shape) == 2:
      return np.outer(np.abs(rand(7, shape[:1])) + 0.1, np.abs(rand(8, shape[1:])) + 0.1)
    return np.abs(rand(7, shape)) + 0.1

  scales = {k: jnp.asarray(magnitude(v.shape), jnp.float32) for k, v in params.items()}

  def body(carry, _):
    p, state = carry
    grads = {k: signs(p[k]) * scales[k] for k in p}
    upd, state = opt.tx.update(grads, state, p)
    return (optax.apply_updates(p, upd), state), (p, upd)

  _, (ps, upds) = fast_jit(lambda p: jax.lax.scan(body, (p, opt.tx.init(p)), None, length=steps))(params)
  return jax.tree.map(np.asarray, ps), jax.tree.map(np.asarray, upds)


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_adafactor_follows_schedule_and_params_are_independent(case):
  """|Δp| = schedule(s) · max(1e-3, RMS(p_s)) for constant-direction gradients; "a" alone = "a" with others."""
  total, steps = 30, 30
  cfg = config(**SCHEDULE_CASES[case])
  opt = make_optimizer(cfg, total)
  want_lr = np_schedule_for(cfg, total)(np.arange(steps))
  params = {"a": jnp.asarray(rand(1, (64,), 0.5)), "b": jnp.asarray(rand(2, (32,), 3.0)),
            "z": jnp.zeros((16,)), "w": jnp.asarray(rand(3, (40, 48), 0.02))}
  flip = lambda p: jnp.where(jnp.arange(p.size).reshape(p.shape) % 3 == 0, -1.0, 1.0)
  ps, upds = _constant_gradient_run(opt, params, flip, steps)
  for k in params:
    signs = np.asarray(flip(params[k]))
    scale = np.array([max(1e-3, rms(p)) for p in ps[k]])
    want = -want_lr.reshape((-1,) + (1,) * params[k].ndim) * scale.reshape(want_lr.shape + (1,) * params[k].ndim) \
        * signs
    np.testing.assert_allclose(upds[k], want, rtol=2e-5, atol=1e-12, err_msg=k)
  if case == "cosine":  # HF #9751 regression: one tensor's step must not depend on the others
    _, alone_upds = _constant_gradient_run(opt, {"a": params["a"]}, flip, steps)
    np.testing.assert_array_equal(alone_upds["a"], upds["a"])


def test_relative_step_is_paper_rho_times_param_scale():
  """Δp = min(1e-2, 1/sqrt(t)) · max(1e-3, RMS(p)) for t = 1 … 10,050 (1/sqrt(t) takes over at t = 10⁴)."""
  steps = 10_050
  opt = make_optimizer(config(), steps)
  params = {"a": jnp.asarray(rand(4, (24,), 0.3)), "z": jnp.zeros((8,))}
  ps, upds = _constant_gradient_run(opt, params, lambda p: jnp.where(p >= 0, 1.0, -1.0), steps)
  t = np.arange(1, steps + 1)
  rho = np.minimum(1e-2, 1.0 / np.sqrt(t))
  for k in params:
    scale = np.sqrt(np.mean(ps[k].astype(np.float64) ** 2, axis=1))
    np.testing.assert_allclose(np.abs(upds[k]).max(1), rho * np.maximum(1e-3, scale), rtol=2e-5, err_msg=k)
    np.testing.assert_allclose(np.abs(upds[k]).min(1), rho * np.maximum(1e-3, scale), rtol=2e-5, err_msg=k)
  assert np.abs(upds["z"][0]).max() == pytest.approx(1e-5)  # zero-init tensor moves by ρ_1 · ε2
  # learning_rate=None in optax.adafactor would be a step of 1 × RMS(p): make sure ours is 100× smaller
  assert rms(upds["a"][0]) / rms(ps["a"][0]) == pytest.approx(1e-2, rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_current_learning_rate_matches_schedule(accumulate):
  cfg = config(schedule="cosine", learning_rate=0.1, warmup_steps=3, accumulate_steps=accumulate)
  opt = make_optimizer(cfg, 10 * accumulate)
  init, update = jitted(opt)
  params = {"w": jnp.ones((6, 4))}
  state = init(params)
  assert float(current_learning_rate(state)) == pytest.approx(float(opt.schedule(0)))
  lr_log = jax.jit(current_learning_rate)
  for call in range(1, 8 * accumulate + 1):
    upd, state = update({"w": jnp.full((6, 4), 0.5)}, state, params)
    params = optax.apply_updates(params, upd)
    k = call // accumulate  # applied updates so far
    want = float(np_schedule("cosine", max(k - 1, 0), 0.1, 3, 10))
    assert float(lr_log(state)) == pytest.approx(want, rel=1e-6, abs=1e-12), call
    assert int(find(state, LearningRateState).count) == k


# ------------------------------------------------------------------------------------------------------------------
# weight decay, AdamW, accumulation, clipping, dtypes


def _wd_params():
  return {"dense": {"kernel": jnp.asarray(rand(0, (4, 6))), "bias": jnp.asarray(rand(1, (6,)))},
          "ln": {"scale": jnp.asarray(1 + rand(2, (6,))), "bias": jnp.asarray(rand(3, (6,)))},
          "emb": {"embedding": jnp.asarray(rand(4, (10, 4)))}}


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
@pytest.mark.parametrize("mask", ["no_bias_norm", "all"])
def test_weight_decay_mask(name, mask):
  lr, wd = 0.1, 0.3
  cfg = config(name=name, schedule="constant", learning_rate=lr, weight_decay=wd, weight_decay_mask=mask)
  opt = make_optimizer(cfg, 10)
  params = _wd_params()
  zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradient → the update is the weight decay alone
  init, update = jitted(opt)
  upd, _ = update(zeros, init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(upd)[0]:
    p = functools.reduce(lambda t, k: t[k.key], path, params)
    decayed = mask == "all" or p.ndim >= 2
    np.testing.assert_allclose(u, -lr * wd * np.asarray(p) if decayed else 0.0, rtol=1e-6, atol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_adamw_matches_numpy():
  cfg = config(name="adamw", schedule="rsqrt", learning_rate=0.05, warmup_steps=2, weight_decay=0.1,
               b1=0.8, b2=0.95, eps=1e-6)
  total = 20
  opt = make_optimizer(cfg, total)
  np_opt = NpAdamW(np_schedule_for(cfg, total), b1=0.8, b2=0.95, eps=1e-6, wd=0.1)
  shapes = {"w": (5, 7), "b": (7,)}
  params = {k: jnp.asarray(rand(i, s)) for i, (k, s) in enumerate(shapes.items())}
  grads = [{k: jnp.asarray(rand(20 + 3 * t + i, s)) for i, (k, s) in enumerate(shapes.items())} for t in range(6)]
  assert_trajectory(opt, np_opt, params, grads)


def test_grad_clip_norm_clips_global_norm_before_optimizer():
  cfg = config(name="adamw", schedule="constant", learning_rate=0.1, grad_clip_norm=1.0)
  opt = make_optimizer(cfg, 10)
  np_opt = NpAdamW(lambda s: 0.1, clip_norm=1.0)
  shapes = {"w": (5, 7), "b": (7,)}
  params = {k: jnp.asarray(rand(i, s)) for i, (k, s) in enumerate(shapes.items())}
  # step 1 norm ≫ 1 (clipped), step 2 norm < 1 (untouched), step 3 clipped again
  grads = [{k: jnp.asarray(rand(30 + 3 * t + i, s) * f) for i, (k, s) in enumerate(shapes.items())}
           for t, f in enumerate([10.0, 0.05, 3.0])]
  assert_trajectory(opt, np_opt, params, grads)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_accumulate_two_microsteps_equals_mean_gradient_update(name):
  extra = dict(name=name, schedule="constant", learning_rate=0.01, weight_decay=0.1, grad_clip_norm=0.5)
  if name == "adafactor":
    extra["momentum"] = 0.5
  acc = make_optimizer(config(accumulate_steps=2, **extra), 20)
  one = make_optimizer(config(**extra), 10)
  shapes = {"w": (40, 36), "b": (36,)}
  params = {k: jnp.asarray(rand(i, s)) for i, (k, s) in enumerate(shapes.items())}
  micro = [{k: jnp.asarray(rand(40 + 2 * t + i, s)) for i, (k, s) in enumerate(shapes.items())} for t in range(4)]
  mean = [jax.tree.map(lambda a, b: (a + b) / 2, micro[2 * j], micro[2 * j + 1]) for j in range(2)]
  hist_acc, _, p_acc = run(acc, params, micro)
  hist_one, _, p_one = run(one, params, mean)
  for j in range(2):
    for k in shapes:
      np.testing.assert_array_equal(hist_acc[2 * j][1][k], 0.0)  # first micro-step: no update
      np.testing.assert_allclose(hist_acc[2 * j + 1][1][k], hist_one[j][1][k], rtol=1e-5, atol=1e-9)
  for k in shapes:
    np.testing.assert_allclose(p_acc[k], p_one[k], rtol=1e-6, atol=1e-8)


def test_bf16_params_keep_float32_statistics():
  for name in ("adafactor", "adamw"):  # without accumulation: every state leaf is float32 (or an int counter)
    cfg = config(name=name, schedule="constant", learning_rate=1e-3, momentum=0.9 if name == "adafactor" else None)
    state = jax.eval_shape(make_optimizer(cfg, 10).tx.init, {"w": jax.ShapeDtypeStruct((64, 96), jnp.bfloat16)})
    assert {x.dtype for x in jax.tree.leaves(state)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, state
  accumulate = 2  # MultiSteps + bf16 params (optax #377)
  cfg = config(momentum=0.9, weight_decay=0.01, accumulate_steps=accumulate)
  opt = make_optimizer(cfg, 10)
  shapes = {"w": (64, 96), "b": (96,)}
  p32 = {k: jnp.asarray(rand(i, s)) for i, (k, s) in enumerate(shapes.items())}
  g32 = {k: jnp.asarray(rand(9 + i, s)) for i, (k, s) in enumerate(shapes.items())}
  p16, g16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in (p32, g32))
  init, update = jitted(opt)
  state = init(p16)
  for _ in range(accumulate):
    upd, state = update(g16, state, p16)
  fs = find(state, optax.FactoredState)
  assert fs.v_row["w"].dtype == fs.v_col["w"].dtype == fs.v["b"].dtype == jnp.float32
  assert find(state, optax.EmaState).ema["w"].dtype == jnp.float32
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(upd))
  # the maths runs in float32 on the bf16 values: equal to the float32 run on the same (bf16-rounded) inputs
  ref_state = init(jax.tree.map(lambda x: x.astype(jnp.float32), p16))
  for _ in range(accumulate):
    ref, ref_state = update(jax.tree.map(lambda x: x.astype(jnp.float32), g16), ref_state,
                            jax.tree.map(lambda x: x.astype(jnp.float32), p16))
  np.testing.assert_allclose(fs.v_row["w"], find(ref_state, optax.FactoredState).v_row["w"], rtol=1e-6)
  for k in shapes:
    np.testing.assert_array_equal(upd[k], ref[k].astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------------------------------
# validation

LR = dict(schedule="constant", learning_rate=1e-3)
VALIDATION = {
    "unknown name": (dict(name="sgd"), 10, ["name", "'sgd'", "'adafactor'", "'adamw'"]),
    "unknown schedule": (dict(schedule="exponential"), 10, ["schedule", "'exponential'", "'constant'", "'rsqrt'",
                                                            "'cosine'", "'relative_step'", "'linear'", "callable"]),
    "unknown mask": (dict(weight_decay_mask="bias"), 10, ["weight_decay_mask", "'all'", "'no_bias_norm'"]),
    "relative_step with lr": (dict(schedule="relative_step", learning_rate=1e-3), 10,
                              ["learning_rate", "relative_step"]),
    "relative_step with adamw": (dict(name="adamw", schedule="relative_step"), 10, ["relative_step", "adafactor"]),
    "relative_step without param scale": (dict(multiply_by_parameter_scale=False), 10,
                                          ["relative_step", "multiply_by_parameter_scale"]),
    "relative_step with warmup": (dict(warmup_steps=10), 100, ["warmup_steps", "relative_step"]),
    "constant without lr": (dict(schedule="constant"), 10, ["learning_rate=None", "relative_step"]),
    "cosine without lr": (dict(schedule="cosine"), 10, ["learning_rate=None"]),
    "negative lr": (dict(schedule="constant", learning_rate=-1e-3), 10, ["learning_rate"]),
    "negative warmup": (dict(warmup_steps=-1, **LR), 10, ["warmup_steps"]),
    "cosine warmup = total": (dict(schedule="cosine", learning_rate=1e-3, warmup_steps=10), 10,
                              ["warmup_steps=10", "cosine"]),
    "cosine warmup > total/accumulate": (dict(schedule="cosine", learning_rate=1e-3, warmup_steps=6,
                                              accumulate_steps=2), 10, ["warmup_steps=6", "5"]),
    "rsqrt without warmup": (dict(schedule="rsqrt", learning_rate=1e-3, warmup_steps=0), 10,
                             ["warmup_steps", "rsqrt"]),
    "clipping_threshold < 1": (dict(clipping_threshold=0.5), 10, ["clipping_threshold", "1.0"]),
    "negative weight decay": (dict(weight_decay=-0.1, **LR), 10, ["weight_decay"]),
    "accumulate_steps 0": (dict(accumulate_steps=0), 10, ["accumulate_steps"]),
    "beta2 = 1": (dict(beta2=1.0), 10, ["beta2", "(0.0, 1.0)"]),
    "beta2 = 0": (dict(beta2=0.0), 10, ["beta2"]),
    "beta2 with adamw": (dict(name="adamw", beta2=0.99, **LR), 10, ["beta2", "b2"]),
    "momentum with adamw": (dict(name="adamw", momentum=0.9, **LR), 10, ["momentum", "b1"]),
    "momentum = 1": (dict(momentum=1.0), 10, ["momentum"]),
    "end_lr_fraction with constant": (dict(end_lr_fraction=0.1, **LR), 10, ["end_lr_fraction", "cosine"]),
    "end_lr_fraction > 1": (dict(schedule="cosine", learning_rate=1e-3, end_lr_fraction=1.5), 10,
                            ["end_lr_fraction"]),
    "grad_clip_norm 0": (dict(grad_clip_norm=0.0), 10, ["grad_clip_norm"]),
    "decay_rate 0": (dict(decay_rate=0.0), 10, ["decay_rate"]),
    "adamw b2 = 1": (dict(name="adamw", b2=1.0, **LR), 10, ["b2"]),
    "adamw eps 0": (dict(name="adamw", eps=0.0, **LR), 10, ["eps"]),
    "total_steps 0": (dict(), 0, ["total_steps"]),
    "total < accumulate": (dict(accumulate_steps=4), 3, ["total_steps=3", "accumulate_steps=4"]),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_validation_errors(case):
  overrides, total, substrings = VALIDATION[case]
  with pytest.raises(ValueError) as err:
    make_optimizer(config(**overrides), total)
  for sub in substrings:
    assert sub in str(err.value), f"{sub!r} not in {str(err.value)!r}"


def test_unknown_field_and_dict_config():
  with pytest.raises(ValueError, match="learning_rat"):
    make_optimizer({"learning_rat": 1e-3}, 10)
  opt = make_optimizer({"name": "adamw", "schedule": "constant", "learning_rate": 1e-3}, 10)  # dict, rest default
  assert float(opt.schedule(3)) == pytest.approx(1e-3)
  with pytest.raises(TypeError, match="accumulate_steps"):
    make_optimizer({"accumulate_steps": 2.0}, 10)


def test_type_errors_name_the_field_and_what_is_allowed():
  """The optimizer's checks are _validate's: the message names the field, the value and the allowed range."""
  with pytest.raises(TypeError, match=r"weight_decay must be a float >= 0.0, got 'big'"):
    make_optimizer({"weight_decay": "big"}, 10)
  with pytest.raises(TypeError, match=r"grad_clip_norm must be a float > 0.0 or None, got True"):
    make_optimizer({"grad_clip_norm": True}, 10)
  with pytest.raises(TypeError, match=r"factored must be a bool \(True/False\), got 1"):
    make_optimizer({"factored": 1}, 10)
  with pytest.raises(ValueError, match=r"clipping_threshold=0.5 is out of range; it must be >= 1.0 \(Adafactor"):
    make_optimizer({"clipping_threshold": 0.5}, 10)
