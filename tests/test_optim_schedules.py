"""The optimizers as optax transformations (linformer_jax.optim.adafactor / adamw / relative_step): any optax
schedule is applied exactly as given (the LR recovered from each update of a toy quadratic, against numpy float64
second moments, and the recorded LR), schedule validation, per-head factoring through the functional API, the new
named config schedules (warmup_cosine, linear, piecewise_constant) against numpy formulas, a callable schedule in a
config (make_optimizer, the command line, config.json, a short training run that resumes)."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from linformer_jax import optim
from linformer_jax.optim import current_learning_rate, default_optimizer_config, make_optimizer
from linformer_jax.run_config import config_diff_hint, config_to_json
from helpers import optimizer_config

STEPS = 1000
EPS1 = 1e-30


config = optimizer_config


def find(state, cls):
  found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  assert len(found) == 1, found
  return found[0]


# small graphs: XLA's backend optimisations cost more compile time than they save
fast_jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))


# ------------------------------------------------------------------------------------------------------------------
# an optax schedule is applied exactly: the LR recovered from every update of a toy quadratic

SCHEDULES = {
    # warmup 0 → 1e-2 over 100 updates, then cosine to 1e-3 at 1000 (end > 0: no float32 cancellation near the end)
    "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=100, decay_steps=STEPS,
                                                                end_value=1e-3),
    # constant 5e-3 for 300 updates, then halving every 200 (each piece counts from its boundary)
    "join constant+exponential": lambda: optax.join_schedules(
        [optax.constant_schedule(5e-3), optax.exponential_decay(5e-3, transition_steps=200, decay_rate=0.5)], [300]),
}


def quadratic_run(tx, steps=STEPS):
  """L(p) = Σ ½ a (p − c)² over a vector and a (3, 5) matrix (second-largest axis 3 < 32: not factored), c far
  from p so that g keeps its sign (no cancellation in the moments). Returns per update: g, Δp, recorded LR."""
  rs = np.random.RandomState(0)
  shapes = {"v": (16,), "m": (3, 5)}
  a = {k: jnp.asarray(rs.uniform(0.5, 2.0, s), jnp.float32) for k, s in shapes.items()}
  c = {k: jnp.asarray(20.0 + rs.uniform(0.0, 1.0, s), jnp.float32) for k, s in shapes.items()}
  p0 = {k: jnp.asarray(rs.normal(0.0, 1.0, s), jnp.float32) for k, s in shapes.items()}
  loss = lambda p: sum(0.5 * jnp.sum(a[k] * jnp.square(p[k] - c[k])) for k in p)

  def body(carry, _):
    p, state = carry
    g = jax.grad(loss)(p)
    upd, state = tx.update(g, state, p)
    return (optax.apply_updates(p, upd), state), (g, upd, current_learning_rate(state))

  out = fast_jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[1])(p0)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def np_adafactor_direction(g, decay_rate=0.8):
  """U_t = g_t/sqrt(V̂_t) (float64), unfactored: V̂_t = β̂_t V̂_{t−1} + (1 − β̂_t)(g_t² + ε1), β̂_t = 1 − t^−c."""
  v, out = np.zeros_like(g[0]), np.empty_like(g)
  for t in range(1, len(g) + 1):
    beta = 1.0 - t ** (-decay_rate)
    v = beta * v + (1.0 - beta) * (g[t - 1] ** 2 + EPS1)
    out[t - 1] = g[t - 1] / np.sqrt(v)
  return out


def np_adam_direction(g, b1, b2, eps):
  """U_t = m̂_t/(sqrt(v̂_t) + eps) (float64)."""
  m, v, out = np.zeros_like(g[0]), np.zeros_like(g[0]), np.empty_like(g)
  for t in range(1, len(g) + 1):
    m = b1 * m + (1 - b1) * g[t - 1]
    v = b2 * v + (1 - b2) * g[t - 1] ** 2
    out[t - 1] = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return out


def schedule_values(schedule):
  """The schedule's own (float32) values: optax's warmup piece (0 − peak)·(1 − s/w) + peak cancels in float32, so a
  float64 formula would differ by more than 1e-6 at the first steps; what is tested is that the value is applied."""
  want = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(STEPS)), np.float64)
  for s in (0, 1, 99, 100, 101, 299, 300, 301, 999):  # eager, Python-int steps: the same values
    np.testing.assert_allclose(float(schedule(s)), want[s], rtol=1e-6, atol=0)
  return want


def assert_recovered_lr(direction_fn, tx, schedule):
  g, upd, recorded = quadratic_run(tx)
  want = schedule_values(schedule)
  for k in g:
    u = direction_fn(g[k].reshape(STEPS, -1))
    lr = -upd[k].reshape(STEPS, -1) / u  # Δp = −lr(s) · U: every element of every update gives lr(s)
    np.testing.assert_allclose(lr, np.broadcast_to(want[:, None], lr.shape), rtol=1e-6, atol=0, err_msg=k)
  np.testing.assert_allclose(recorded, want, rtol=1e-6, atol=0)  # after update s: the LR update s used


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_adafactor_applies_an_optax_schedule_exactly(name):
  schedule = SCHEDULES[name]()
  tx = optim.adafactor(schedule, clipping_threshold=None, multiply_by_parameter_scale=False)
  assert_recovered_lr(np_adafactor_direction, tx, schedule)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_adamw_applies_an_optax_schedule_exactly(name):
  # β's exact in float32 and far from 1: optax's float32 bias correction 1 − β^t is then exact to an ulp of itself
  # (with β2 = 0.999 the float32 1 − β2^t alone is off by ~1e-5 relative at t = 1, hiding what is tested: the LR)
  b1, b2, eps = 0.5, 0.75, 1e-8
  schedule = SCHEDULES[name]()
  assert_recovered_lr(lambda g: np_adam_direction(g, b1, b2, eps), optim.adamw(schedule, b1=b1, b2=b2, eps=eps),
                      schedule)


def test_paper_adafactor_is_relative_step_and_the_config_default():
  """adafactor(relative_step()) = make_optimizer(default config) update for update; ρ_t = min(1e-2, 1/sqrt(t))."""
  rho = optim.relative_step()
  t = np.array([1, 2, 100, 10_000, 10_001, 40_000])
  np.testing.assert_allclose(jax.vmap(rho)(jnp.asarray(t - 1)), np.minimum(1e-2, 1 / np.sqrt(t)), rtol=1e-6)
  functional = optim.adafactor(rho)
  configured = make_optimizer(default_optimizer_config(), 100).tx
  rs = np.random.RandomState(1)
  params = {"w": jnp.asarray(rs.normal(0, 0.05, (40, 48)), jnp.float32), "b": jnp.zeros((48,))}
  states = [functional.init(params), configured.init(params)]
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rs.normal(0, 1, p.shape), jnp.float32), params)
    (u1, states[0]), (u2, states[1]) = (tx.update(grads, s, params) for tx, s in zip((functional, configured),
                                                                                       states))
    for k in params:
      np.testing.assert_array_equal(u1[k], u2[k])
    assert float(current_learning_rate(states[0])) == float(rho(step))
    params = optax.apply_updates(params, u1)


def test_float_learning_rate_is_a_constant_schedule():
  tx = optim.adamw(3e-4)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update({"w": jnp.full((4, 3), 0.5)}, state, params)
    assert float(current_learning_rate(state)) == pytest.approx(3e-4, rel=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# schedule validation (before anything is traced)


def _traced_branch(count):
  return 1e-3 if count < 10 else 1e-4  # Python control flow on the step: fails under jit


BAD_LEARNING_RATES = {
    "string": ("1e-3", TypeError, ["learning_rate", "'1e-3'", "optax schedule"]),
    "None": (None, TypeError, ["learning_rate", "None", "relative_step()"]),
    "list": ([1e-3], TypeError, ["learning_rate", "list"]),
    "bool": (True, TypeError, ["learning_rate"]),
    "negative float": (-1e-3, ValueError, ["learning_rate=-0.001"]),
    "zero float": (0.0, ValueError, ["learning_rate=0.0"]),
    "nan float": (float("nan"), ValueError, ["learning_rate=nan"]),
    "inf float": (float("inf"), ValueError, ["learning_rate=inf"]),
    "negative at step 0": (lambda s: -0.5 + 0.0 * s, ValueError, ["learning_rate", "step 0", "-0.5"]),
    "nan at step 0": (lambda s: jnp.where(s == 0, jnp.nan, 1e-3), ValueError, ["learning_rate", "step 0", "nan"]),
    "inf at step 0": (lambda s: jnp.inf * jnp.ones_like(s, jnp.float32), ValueError, ["learning_rate", "inf"]),
    "not traceable": (_traced_branch, TypeError, ["learning_rate", "traced int32"]),
    "vector valued": (lambda s: jnp.full((3,), 1e-3), TypeError, ["learning_rate", "scalar"]),
}


@pytest.mark.parametrize("case", list(BAD_LEARNING_RATES))
@pytest.mark.parametrize("build", [optim.adafactor, optim.adamw], ids=["adafactor", "adamw"])
def test_bad_learning_rate_is_refused(build, case):
  value, exc, substrings = BAD_LEARNING_RATES[case]
  with pytest.raises(exc) as err:
    build(value)
  for sub in substrings:
    assert sub in str(err.value), f"{sub!r} not in {str(err.value)!r}"


def test_valid_learning_rates_are_accepted():
  for lr in (1e-3, 1, np.float32(2e-3), jnp.asarray(1e-3), optax.constant_schedule(0.0), optim.relative_step()):
    optim.adafactor(lr)
    optim.adamw(lr)


def test_functional_arguments_are_checked():
  with pytest.raises(ValueError, match=r"clipping_threshold=0.5 is out of range; it must be >= 1.0 \(Adafactor"):
    optim.adafactor(1e-3, clipping_threshold=0.5)
  with pytest.raises(ValueError, match="weight_decay_mask='bias'"):
    optim.adamw(1e-3, weight_decay_mask="bias")
  with pytest.raises(TypeError, match="min_dim_size_to_factor"):
    optim.adafactor(1e-3, min_dim_size_to_factor=32.0)
  with pytest.raises(ValueError, match="b2=1.0"):
    optim.adamw(1e-3, b2=1.0)


@pytest.mark.parametrize("build", [optim.adafactor, optim.adamw], ids=["adafactor", "adamw"])
def test_weight_decay_mask_takes_an_optax_mask(build):
  """A callable mask (optax style) decays exactly the leaves it marks, by lr · wd · p."""
  lr, wd = 0.1, 0.3
  tx = build(lr, weight_decay=wd, weight_decay_mask=lambda p: {"w": False, "b": True})
  params = {"w": jnp.full((4, 6), 2.0), "b": jnp.full((6,), 3.0)}
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_array_equal(upd["w"], 0.0)
  np.testing.assert_allclose(upd["b"], -lr * wd * 3.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# per-head factoring and float32 statistics through the functional API


def test_rank3_kernels_are_factored_per_head():
  dim, heads, head_dim = 512, 8, 64
  shapes = {"q": (dim, heads, head_dim), "o": (heads, head_dim, dim), "b": (dim,)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()}
  state = jax.eval_shape(optim.adafactor(optax.linear_schedule(0.0, 1e-2, 100)).init, params)
  fs = find(state, optax.FactoredState)
  # heads are a batch axis: one rank-1 fit of each (dim × head_dim) slice
  assert (fs.v_row["q"].shape, fs.v_col["q"].shape, fs.v["q"].shape) == ((heads, head_dim), (dim, heads), (1,))
  assert (fs.v_row["o"].shape, fs.v_col["o"].shape, fs.v["o"].shape) == ((heads, head_dim), (heads, dim), (1,))
  assert fs.v["b"].shape == (dim,)
  assert {x.dtype for x in jax.tree.leaves(state)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
  full = find(jax.eval_shape(optim.adafactor(1e-3, min_dim_size_to_factor=128).init, params), optax.FactoredState)
  assert full.v["q"].shape == (dim, heads, head_dim)  # optax's default threshold: no factoring


# ------------------------------------------------------------------------------------------------------------------
# named config schedules against numpy formulas


def np_named(name, s, lr=None, warmup=0, total=None, end_fraction=0.0, boundaries=(), piecewise_values=()):
  s = np.asarray(s, np.float64)
  end = None if lr is None else end_fraction * lr
  if name == "warmup_cosine":
    frac = np.clip(s - warmup, 0, total - warmup) / (total - warmup)
    return np.where(s < warmup, lr * s / max(warmup, 1), end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)))
  if name == "linear":
    frac = np.clip(s - warmup, 0, total - warmup) / (total - warmup)
    return np.where(s < warmup, lr * s / max(warmup, 1), lr + (end - lr) * frac)
  if name == "piecewise_constant":
    return np.asarray(piecewise_values, np.float64)[np.searchsorted(np.asarray(boundaries), s, side="right")]
  raise ValueError(name)


NAMED = {
    "warmup_cosine": dict(schedule="warmup_cosine", learning_rate=2e-2, warmup_steps=5, end_lr_fraction=0.1),
    "warmup_cosine no warmup": dict(schedule="warmup_cosine", learning_rate=2e-2),
    "linear": dict(schedule="linear", learning_rate=1e-2, warmup_steps=8, end_lr_fraction=0.25),
    "linear no warmup to 0": dict(schedule="linear", learning_rate=1e-2),
    "piecewise_constant": dict(schedule="piecewise_constant", boundaries=(10, 25, 26),
                               piecewise_values=(3e-3, 1e-3, 0.0, 5e-4)),
    "piecewise_constant one value": dict(schedule="piecewise_constant", boundaries=(), piecewise_values=(2e-3,)),
}


@pytest.mark.parametrize("case", list(NAMED))
@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_named_schedule_values(case, name):
  total, accumulate = 80, 2  # horizon T = 40 updates
  over = NAMED[case]
  opt = make_optimizer(config(name=name, accumulate_steps=accumulate, **over), total)
  steps = np.arange(0, 60)
  want = np_named(over["schedule"], steps, over.get("learning_rate"), over.get("warmup_steps", 0), total // accumulate,
                  over.get("end_lr_fraction", 0.0), over.get("boundaries", ()), over.get("piecewise_values", ()))
  peak = float(np.max(want))  # optax computes the cosine in float32 as ½(1 + cos): absolute error ~ ulp · peak
  np.testing.assert_allclose(jax.jit(opt.schedule)(jnp.asarray(steps)), want, rtol=2e-6, atol=1e-7 * peak)
  np.testing.assert_allclose([float(opt.schedule(int(s))) for s in (0, 9, 10, 39, 45)], want[[0, 9, 10, 39, 45]],
                             rtol=2e-6, atol=1e-7 * peak)


def test_piecewise_constant_is_applied_by_the_optimizer():
  opt = make_optimizer(config(name="adamw", schedule="piecewise_constant", boundaries=(2, 4),
                              piecewise_values=(0.3, 0.2, 0.1)), 10)
  params = {"w": jnp.ones((3,))}
  state = opt.tx.init(params)
  logged = []
  for _ in range(6):
    _, state = opt.tx.update({"w": jnp.ones((3,))}, state, params)
    logged.append(float(current_learning_rate(state)))
  np.testing.assert_allclose(logged, [0.3, 0.3, 0.2, 0.2, 0.1, 0.1], rtol=1e-7)


PIECEWISE = dict(schedule="piecewise_constant", boundaries=(10, 20), piecewise_values=(1e-3, 1e-4, 1e-5))
CONFIG_ERRORS = {
    "piecewise lengths": (dict(PIECEWISE, piecewise_values=(1e-3, 1e-4)), ValueError,
                          ["len(piecewise_values) == len(boundaries) + 1"]),
    "piecewise not increasing": (dict(PIECEWISE, boundaries=(20, 20)), ValueError, ["boundaries=(20, 20)",
                                                                                     "strictly increasing"]),
    "piecewise boundary 0": (dict(PIECEWISE, boundaries=(0, 20)), ValueError, ["boundaries[0]=0", ">= 1"]),
    "piecewise float boundary": (dict(PIECEWISE, boundaries=(10.5, 20)), TypeError, ["boundaries[0]", "int"]),
    "piecewise negative value": (dict(PIECEWISE, piecewise_values=(1e-3, -1e-4, 1e-5)), ValueError,
                                 ["piecewise_values[1]=-0.0001"]),
    "piecewise nan value": (dict(PIECEWISE, piecewise_values=(1e-3, float("nan"), 1e-5)), ValueError,
                            ["piecewise_values[1]=nan"]),
    "piecewise inf value": (dict(PIECEWISE, piecewise_values=(float("inf"), 1e-4, 1e-5)), ValueError,
                            ["piecewise_values[0]=inf", "finite"]),
    "piecewise with learning_rate": (dict(PIECEWISE, learning_rate=1e-3), ValueError, ["learning_rate=0.001",
                                                                                       "piecewise_constant"]),
    "piecewise with warmup": (dict(PIECEWISE, warmup_steps=5), ValueError, ["warmup_steps=5", "piecewise_constant"]),
    "piecewise without values": (dict(schedule="piecewise_constant", boundaries=(10,)), TypeError,
                                 ["piecewise_values", "tuple", "None"]),
    "boundaries with cosine": (dict(schedule="cosine", learning_rate=1e-3, boundaries=(10,)), ValueError,
                               ["boundaries=(10,)", "piecewise_constant"]),
    "linear without lr": (dict(schedule="linear"), ValueError, ["learning_rate=None", "'linear'"]),
    "linear warmup = horizon": (dict(schedule="linear", learning_rate=1e-3, warmup_steps=50), ValueError,
                                ["warmup_steps=50", "'linear'"]),
    "warmup_cosine warmup > horizon": (dict(schedule="warmup_cosine", learning_rate=1e-3, warmup_steps=60),
                                       ValueError, ["warmup_steps=60", "'warmup_cosine'"]),
    "end_lr_fraction with rsqrt": (dict(schedule="rsqrt", learning_rate=1e-3, warmup_steps=5, end_lr_fraction=0.1),
                                   ValueError, ["end_lr_fraction", "'linear'"]),
    "schedule a number": (dict(schedule=3), TypeError, ["schedule", "3", "callable"]),
    "callable with learning_rate": (dict(schedule=optax.constant_schedule(1e-3), learning_rate=1e-3), ValueError,
                                    ["learning_rate=0.001", "callable schedule", "learning_rate=None"]),
    "callable with warmup": (dict(schedule=optax.constant_schedule(1e-3), warmup_steps=10), ValueError,
                             ["warmup_steps=10", "callable schedule"]),
    "callable with end_lr_fraction": (dict(schedule=optax.constant_schedule(1e-3), end_lr_fraction=0.1), ValueError,
                                      ["end_lr_fraction=0.1", "callable schedule"]),
    "callable negative at 0": (dict(schedule=optax.constant_schedule(-1e-3)), ValueError, ["schedule", "step 0"]),
    "callable not traceable": (dict(schedule=_traced_branch), TypeError, ["schedule", "traced int32"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_schedule_errors(case):
  overrides, exc, substrings = CONFIG_ERRORS[case]
  with pytest.raises(exc) as err:
    make_optimizer(config(**overrides), 50)
  for sub in substrings:
    assert sub in str(err.value), f"{sub!r} not in {str(err.value)!r}"


# ------------------------------------------------------------------------------------------------------------------
# a callable schedule in a config


def test_config_takes_a_callable_schedule_and_applies_it_as_given():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=10, decay_steps=50, end_value=1e-3)
  cfg = default_optimizer_config()
  cfg.schedule = schedule  # the field accepts a callable (it used to be a str field: TypeError)
  opt = make_optimizer(cfg, 50)
  assert opt.schedule is schedule
  functional = optim.adafactor(schedule)
  params = {"w": jnp.asarray(np.random.RandomState(2).normal(0, 0.1, (6, 40)), jnp.float32)}
  grads = {"w": jnp.asarray(np.random.RandomState(3).normal(0, 1, (6, 40)), jnp.float32)}
  s1, s2 = opt.tx.init(params), functional.init(params)
  for step in range(12):
    (u1, s1), (u2, s2) = opt.tx.update(grads, s1, params), functional.update(grads, s2, params)
    np.testing.assert_array_equal(u1["w"], u2["w"])
    assert float(current_learning_rate(s1)) == float(schedule(step))
  cfg.schedule = "linear"  # and a name again
  cfg.learning_rate = 1e-3
  assert float(make_optimizer(cfg, 50).schedule(0)) == pytest.approx(1e-3)


def test_command_line_sets_named_schedules_and_piecewise_fields():
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", "--cfg.optimizer.schedule=piecewise_constant", "--cfg.optimizer.boundaries=(10, 20)",
          "--cfg.optimizer.piecewise_values=(0.01, 0.001, 0.0001)"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("cfg", ml_collections.ConfigDict({"optimizer": default_optimizer_config()}),
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  opt_cfg = fv.cfg.optimizer
  assert (opt_cfg.schedule, opt_cfg.boundaries, opt_cfg.piecewise_values) == ("piecewise_constant", (10, 20),
                                                                    (0.01, 0.001, 0.0001))
  np.testing.assert_allclose(jax.vmap(make_optimizer(opt_cfg, 40).schedule)(jnp.asarray([0, 9, 10, 19, 20])),
                             [0.01, 0.01, 0.001, 0.001, 0.0001], rtol=1e-6)
  argv = ["prog", "--cfg.optimizer.schedule=cosine", "--cfg.optimizer.learning_rate=0.001"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("cfg", ml_collections.ConfigDict({"optimizer": default_optimizer_config()}),
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert fv.cfg.optimizer.schedule == "cosine" and fv.cfg.optimizer.learning_rate == 0.001


def test_config_json_names_a_callable_schedule():
  from helpers import train_config
  plain = train_config("listops_linformer")
  assert config_to_json(plain, indent=1) == plain.to_json_best_effort(indent=1)  # no callable: unchanged

  def make():
    cfg = train_config("listops_linformer")
    cfg.optimizer.schedule = optax.join_schedules([optax.constant_schedule(1e-3),
                                                   optax.linear_schedule(1e-3, 1e-4, 4)], [2])
    cfg.optimizer.learning_rate = None
    cfg.optimizer.warmup_steps = 0
    return cfg

  text = config_to_json(make(), indent=1)
  assert json.loads(text)["optimizer"]["schedule"] == (
      "<callable optax.schedules._join.join_schedules.<locals>.schedule: not reproducible from this JSON>")
  assert config_to_json(make(), indent=1) == text  # no memory address: a rebuilt config compares equal
  assert config_diff_hint(text)({"config": json.loads(text)}) == ""
  assert "functools.partial of math.pow" in config_to_json(ml_collections.ConfigDict(
      {"f": functools.partial(math.pow, 2.0)}))


def test_training_run_with_a_callable_schedule_logs_it_and_resumes(tmp_path):
  from helpers import train_config
  from linformer_jax.train import train_and_evaluate
  schedule = optax.join_schedules([optax.constant_schedule(1e-3), optax.linear_schedule(1e-3, 1e-4, 4)], [2])

  def cfg(total_steps):
    c = train_config("listops_linformer", total_steps=total_steps)  # runlocal: 6 steps, log every 2
    c.optimizer.schedule = schedule
    c.optimizer.learning_rate = None
    c.optimizer.warmup_steps = 0
    return c

  train_and_evaluate(cfg(4), tmp_path)  # stops after step 4 (its last checkpoint), then the same run continues
  final = train_and_evaluate(cfg(6), tmp_path)
  assert final["step"] == 6
  with open(tmp_path / "metrics.jsonl") as f:
    logged = {r["step"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
  assert sorted(logged) == [2, 4, 6]
  for step, lr in logged.items():  # the LR of update step − 1 (0-based)
    assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
  saved = json.loads((tmp_path / "config.json").read_text())
  assert "not reproducible" in saved["optimizer"]["schedule"]
