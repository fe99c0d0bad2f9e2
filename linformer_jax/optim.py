"""Optimizers for the training loop: Adafactor (Shazeer & Stern 2018, arXiv 1804.04235) and AdamW.

Usage::

    opt = make_optimizer(config.optimizer, total_steps=config.num_train_steps)
    opt_state = opt.tx.init(params)
    updates, opt_state = opt.tx.update(grads, opt_state, params)   # params are required (Adafactor)
    params = optax.apply_updates(params, updates)
    lr = current_learning_rate(opt_state)                          # log it

Schedules (``Optimizer.schedule(s)``, s = 0-based index of the optimizer update, w = warmup_steps,
T = total_steps // accumulate_steps, lr = learning_rate):

    constant       lr · min(1, s/w)                       (lr for w = 0)
    rsqrt          lr · min(1, s/w) · sqrt(w / max(s, w)) (w >= 1; peak = lr at s = w)
    cosine         lr · s/w for s < w, then end + (lr − end) · ½(1 + cos(π · min(s − w, T − w)/(T − w))),
                   end = end_lr_fraction · lr
    relative_step  ρ_{s+1} = min(1e-2, 1/sqrt(s + 1))     (Adafactor only; the paper's relative step)

LRA (google-research/long-range-arena) uses ``constant · min(1, s/w) / sqrt(max(s, w))`` with constant 0.05 and
w = 1000: that is ``rsqrt`` with learning_rate = 0.05/sqrt(1000) ≈ 1.58e-3 (its peak, at s = 1000).

The applied step of one tensor p at update s is, with U = G/sqrt(V̂) the second-moment-normalised gradient:

    adafactor  Δp = −[ EMA_β1( schedule(s) · max(1e-3, RMS(p)) · U / max(1, RMS(U)/d) ) + schedule(s) · wd · p ]
               (param scale only with multiply_by_parameter_scale, the EMA only with momentum, the clip only with
               clipping_threshold d; RMS over the whole tensor)
    adamw      Δp = −schedule(s) · ( m̂/(sqrt(v̂) + eps) + wd · p )            (= optax.adamw)

Both weight decays are multiplied by the schedule's LR (decoupled weight decay as in AdamW), so
``weight_decay`` means the same for both optimizers. This differs from ``optax.adafactor`` / T5X, whose
``weight_decay_rate`` is not LR-scaled (there wd = 1e-2 would shrink every kernel by 1 % per step).

Design choices:

* **Factoring of rank-3 attention kernels.** optax factors the two largest axes of a tensor (the others are
  batch axes) when the second-largest is >= ``min_dim_size_to_factor``. Flax attention kernels are
  (dim, heads, head_dim) and (heads, head_dim, dim); with optax's default 128 and head_dim 64 they keep a full
  second moment. The default here is 32: (512, 8, 64) is factored over (512, 64) with heads as a batch axis,
  i.e. one rank-1 fit per head, state v_row (8, 64) + v_col (512, 8) = 4,608 floats instead of 262,144.
  Linformer E/F kernels (heads, max_len, k) are factored over (max_len, k) per head the same way. No head
  axes are merged (that would need per-parameter rules, as T5X's factor rules); per-head factoring is at
  least as fine as a merged (dim, heads·head_dim) fit.
* **float32 statistics.** optax keeps optimizer state in the parameter dtype. The whole transformation is
  wrapped so that grads and params are cast to float32 on the way in (state initialised from float32 params:
  v_row/v_col/v, momentum, Adam's mu/nu and the accumulation buffer of ``accumulate_steps`` are float32) and
  the updates are cast back to each parameter's dtype on the way out.
* **Fixed beta2.** ``beta2=None`` uses the paper's increasing decay β̂2_t = 1 − t^(−decay_rate), t = s + 1.
  A float β2 uses the paper's (§7) equivalent of bias-corrected Adam,
  β̂2_t = β2 (1 − β2^(t−1)) / (1 − β2^t),
  passed to ``optax.scale_by_factored_rms(decay_rate_fn=...)``: the statistic equals
  (EMA_β2 of g² + ε1) / (1 − β2^t), and β̂2_1 = 0 as in the default.
* **LR logging.** The learning rate is applied by a small transformation whose state
  (``LearningRateState``) records the LR that the last update used; ``current_learning_rate(opt_state)``
  reads it (no ``optax.inject_hyperparams``, so none of its ``static_args`` pitfalls, and it works inside
  ``MultiSteps``). After k >= 1 applied updates it is ``schedule(k − 1)``; before the first update it is
  ``schedule(0)``, the LR the first update will use (the ``inject_hyperparams`` convention). With
  accumulate_steps > 1 it only advances on the calls that apply an update.
* **Units.** ``total_steps`` passed to ``make_optimizer`` counts ``tx.update`` calls (the train loop's steps,
  i.e. micro-batches when accumulating). The schedule's s, ``warmup_steps`` and the cosine horizon
  T = total_steps // accumulate_steps count applied optimizer updates. With accumulate_steps = 1 they coincide.
* Global-norm clipping (``grad_clip_norm``) acts on the (accumulated, mean) gradient before the optimizer.

Fields that belong to the other optimizer are ignored (adamw ignores clipping_threshold,
multiply_by_parameter_scale, decay_rate, factored, min_dim_size_to_factor; adafactor ignores b1, b2, eps),
except ``momentum``/``beta2``, which must stay None for adamw (use b1/b2).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from linformer_jax._validate import check_bool, check_choice, check_int, check_real

NAMES = ("adafactor", "adamw")
SCHEDULES = ("constant", "rsqrt", "cosine", "relative_step")
WEIGHT_DECAY_MASKS = ("all", "no_bias_norm")

ADAFACTOR_EPS1 = 1e-30  # ε1 added to g² (paper, optax)
RELATIVE_STEP_MAX = 1e-2  # ρ_t = min(1e-2, 1/sqrt(t))

Schedule = Callable[[Any], jax.Array]


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Defaults: Adafactor with the paper's relative step (ρ_t = min(1e-2, 1/sqrt(t)) × max(1e-3, RMS(p))).

  To use an explicit LR set ``schedule`` and ``learning_rate`` together (e.g. schedule="rsqrt",
  learning_rate=1e-2, warmup_steps=1000).
  """
  return ml_collections.ConfigDict(dict(
      name="adafactor",
      learning_rate=config_dict.placeholder(float),  # None only with schedule="relative_step"
      schedule="relative_step",
      warmup_steps=0,
      end_lr_fraction=0.0,  # cosine only
      weight_decay=0.0,  # decoupled, multiplied by the schedule's LR (both optimizers)
      weight_decay_mask="no_bias_norm",  # decay only >= 2-D kernels/embeddings
      grad_clip_norm=config_dict.placeholder(float),  # global-norm clipping before the optimizer
      accumulate_steps=1,  # > 1: optax.MultiSteps, mean gradient over this many calls
      # Adafactor
      momentum=config_dict.placeholder(float),  # β1; None = no first moment (paper default)
      clipping_threshold=1.0,  # d; None disables update clipping
      multiply_by_parameter_scale=True,
      decay_rate=0.8,  # c in β̂2_t = 1 − t^(−c)
      beta2=config_dict.placeholder(float),  # None = decay_rate schedule; float = bias-corrected fixed β2
      factored=True,
      min_dim_size_to_factor=32,  # factor when the second-largest axis is >= this (see module doc)
      # AdamW
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ))


class Optimizer(NamedTuple):
  """``tx``: the optax transformation (call ``tx.update(grads, state, params)``).
  ``schedule``: 0-based update index → LR applied at that update (before Adafactor's parameter scale)."""
  tx: optax.GradientTransformation
  schedule: Schedule


class LearningRateState(NamedTuple):
  """State of the LR-applying transformation: applied updates and the LR the last one used."""
  count: jax.Array  # int32
  learning_rate: jax.Array  # float32; schedule(0) before the first update


def current_learning_rate(opt_state) -> jax.Array:
  """The LR (float32 scalar) that the last applied update used: ``schedule(k − 1)`` after k >= 1 updates,
  ``schedule(0)`` (the LR the first update will use) before any. Works under jit; for Adafactor it is ρ, not the
  parameter-scaled step."""
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, LearningRateState))
           if isinstance(x, LearningRateState)]
  if len(found) != 1:
    raise ValueError(f"opt_state holds {len(found)} LearningRateState entries, expected exactly 1; pass the state "
                     "of a transformation built by make_optimizer.")
  return found[0].learning_rate


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def _make_schedule(schedule: str, lr: Optional[float], warmup: int, horizon: int,
                   end_lr_fraction: float) -> Schedule:
  def as_float(s):
    return jnp.asarray(s, jnp.float32)

  def warmup_factor(s):
    return jnp.minimum(1.0, s / warmup) if warmup > 0 else jnp.ones_like(s)

  if schedule == "relative_step":
    def fn(step):
      return jnp.minimum(RELATIVE_STEP_MAX, jax.lax.rsqrt(as_float(step) + 1.0))
  elif schedule == "constant":
    def fn(step):
      return lr * warmup_factor(as_float(step))
  elif schedule == "rsqrt":
    def fn(step):
      s = as_float(step)
      return lr * warmup_factor(s) * jnp.sqrt(warmup / jnp.maximum(s, float(warmup)))
  elif schedule == "cosine":
    end = end_lr_fraction * lr
    decay_len = float(horizon - warmup)

    def fn(step):
      s = as_float(step)
      # ½(1 + cos(π·progress)) = sin²(π/2 · remaining), remaining = 1 − progress: accurate near the end too
      remaining = jnp.clip(horizon - s, 0.0, decay_len) / decay_len
      cosine = end + (lr - end) * jnp.square(jnp.sin(0.5 * math.pi * remaining))
      return jnp.where(s < warmup, lr * s / max(warmup, 1), cosine)
  else:  # validated before
    raise AssertionError(schedule)
  return fn


def _scale_by_recorded_schedule(schedule: Schedule) -> optax.GradientTransformation:
  """Multiplies updates by schedule(count) and records that LR in the state."""

  def init_fn(params):
    del params
    return LearningRateState(jnp.zeros([], jnp.int32), jnp.asarray(schedule(0), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    updates = jax.tree.map(lambda u: None if u is None else (lr * u).astype(u.dtype), updates,
                           is_leaf=lambda x: x is None)
    return updates, LearningRateState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------------------------
# Adafactor pieces


def _paper_decay(step, exponent):
  """β̂2_t = 1 − t^(−c), t = step + 1 (0 at the first update)."""
  t = jnp.asarray(step, jnp.float32) + 1.0
  return 1.0 - t ** (-exponent)


def _fixed_beta2_decay(beta2: float):
  """β̂2_t = β2 (1 − β2^(t−1)) / (1 − β2^t): bias-corrected EMA with fixed β2 (paper §7)."""
  log_b = math.log(beta2)

  def fn(step, exponent):
    del exponent
    t = jnp.asarray(step, jnp.float32) + 1.0
    return beta2 * -jnp.expm1((t - 1.0) * log_b) / -jnp.expm1(t * log_b)

  return fn


def _is_float(x) -> bool:
  return x is not None and jnp.issubdtype(x.dtype, jnp.floating)


def _with_float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` on float32 grads/params (so its state is float32) and casts updates back to the param dtype."""
  inner = optax.with_extra_args_support(inner)

  def to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if _is_float(x) else x, tree,
                        is_leaf=lambda x: x is None)

  def init_fn(params):
    return inner.init(to_f32(params))

  def update_fn(updates, state, params=None, **extra_args):
    ref = updates if params is None else params
    out, state = inner.update(to_f32(updates), state, None if params is None else to_f32(params), **extra_args)
    out = jax.tree.map(lambda u, r: u if u is None or not _is_float(r) else u.astype(r.dtype), out, ref,
                       is_leaf=lambda x: x is None)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_bias_norm_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _config_dict(opt_config) -> dict:
  cfg = opt_config.to_dict() if hasattr(opt_config, "to_dict") else dict(opt_config)
  defaults = default_optimizer_config().to_dict()
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(f"unknown optimizer config field(s) {unknown}; allowed fields: {sorted(defaults)}.")
  return {**defaults, **cfg}


def _validate(c: dict, total_steps: int) -> None:
  check_choice("name", c["name"], NAMES)
  check_choice("schedule", c["schedule"], SCHEDULES)
  check_choice("weight_decay_mask", c["weight_decay_mask"], WEIGHT_DECAY_MASKS)
  check_int("total_steps", total_steps, minimum=1)
  check_int("accumulate_steps", c["accumulate_steps"], minimum=1)
  check_int("warmup_steps", c["warmup_steps"], minimum=0)
  check_int("min_dim_size_to_factor", c["min_dim_size_to_factor"], minimum=1)
  for flag in ("factored", "multiply_by_parameter_scale"):
    check_bool(flag, c[flag])
  k = c["accumulate_steps"]
  if total_steps < k:
    raise ValueError(f"total_steps={total_steps} is smaller than accumulate_steps={k}: no update would be applied.")
  horizon = total_steps // k
  name, sched, lr, warmup = c["name"], c["schedule"], c["learning_rate"], c["warmup_steps"]

  if sched == "relative_step":
    if lr is not None:
      raise ValueError(f"learning_rate={lr!r} contradicts schedule='relative_step', whose step is "
                       "min(1e-2, 1/sqrt(t)) × max(1e-3, RMS(p)) and ignores any learning_rate; "
                       "set learning_rate=None, or use schedule='constant'/'rsqrt'/'cosine' with a learning_rate.")
    if name != "adafactor":
      raise ValueError(f"schedule='relative_step' requires name='adafactor' (got name={name!r}); it is Adafactor's "
                       "relative step size; allowed schedules for adamw: 'constant', 'rsqrt', 'cosine'.")
    if not c["multiply_by_parameter_scale"]:
      raise ValueError("schedule='relative_step' requires multiply_by_parameter_scale=True (the paper's step is "
                       "ρ_t × max(1e-3, RMS(p))); got multiply_by_parameter_scale=False.")
    if warmup != 0:
      raise ValueError(f"warmup_steps={warmup} is not used by schedule='relative_step' (min(1e-2, 1/sqrt(t)) has no "
                       "warmup); set warmup_steps=0 or use schedule='rsqrt'.")
  else:
    if lr is None:
      raise ValueError(f"learning_rate=None is only allowed with schedule='relative_step'; schedule={sched!r} needs "
                       "a float learning_rate > 0.")
    check_real("learning_rate", lr, low=0.0, low_open=True)
  if sched == "rsqrt" and warmup < 1:
    raise ValueError(f"warmup_steps={warmup} is out of range for schedule='rsqrt'; it must be >= 1 "
                     "(lr · min(1, s/w) · sqrt(w / max(s, w)) is undefined for w = 0).")
  if sched == "cosine" and warmup >= horizon:
    raise ValueError(f"warmup_steps={warmup} must be < the number of optimizer updates "
                     f"total_steps // accumulate_steps = {total_steps} // {k} = {horizon} for schedule='cosine'.")
  check_real("end_lr_fraction", c["end_lr_fraction"], low=0.0, high=1.0)
  if c["end_lr_fraction"] != 0 and sched != "cosine":
    raise ValueError(f"end_lr_fraction={c['end_lr_fraction']!r} is only used by schedule='cosine' "
                     f"(got schedule={sched!r}); set it to 0.0.")
  check_real("weight_decay", c["weight_decay"], low=0.0)
  check_real("grad_clip_norm", c["grad_clip_norm"], low=0.0, low_open=True, allow_none=True)

  if name == "adafactor":
    check_real("clipping_threshold", c["clipping_threshold"], low=1.0, allow_none=True,
               why=" (Adafactor's update clipping d; None disables it)")
    check_real("momentum", c["momentum"], low=0.0, high=1.0, high_open=True, allow_none=True)
    check_real("decay_rate", c["decay_rate"], low=0.0, high=1.0, low_open=True)
    check_real("beta2", c["beta2"], low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True)
  else:
    for field, use in (("momentum", "b1"), ("beta2", "b2")):
      if c[field] is not None:
        raise ValueError(f"{field}={c[field]!r} is an Adafactor field; for name='adamw' set {use} instead and leave "
                         f"{field}=None.")
    check_real("b1", c["b1"], low=0.0, high=1.0, high_open=True)
    check_real("b2", c["b2"], low=0.0, high=1.0, high_open=True)
    check_real("eps", c["eps"], low=0.0, low_open=True)


# ----------------------------------------------------------------------------------------------------------------


def make_optimizer(opt_config, total_steps: int) -> Optimizer:
  """Builds the optimizer described by `opt_config` (see ``default_optimizer_config`` and the module docstring).

  total_steps: number of ``tx.update`` calls the training will make (micro-batches when accumulate_steps > 1).
  Raises ValueError/TypeError for inconsistent settings before anything is traced.
  """
  c = _config_dict(opt_config)
  _validate(c, total_steps)
  k = c["accumulate_steps"]
  schedule = _make_schedule(c["schedule"], c["learning_rate"], c["warmup_steps"], total_steps // k,
                            float(c["end_lr_fraction"]))
  mask = _no_bias_norm_mask if c["weight_decay_mask"] == "no_bias_norm" else None
  wd = float(c["weight_decay"])

  txs = []
  if c["grad_clip_norm"] is not None:
    txs.append(optax.clip_by_global_norm(float(c["grad_clip_norm"])))
  if c["name"] == "adafactor":
    decay_fn = _paper_decay if c["beta2"] is None else _fixed_beta2_decay(float(c["beta2"]))
    txs.append(optax.scale_by_factored_rms(
        factored=c["factored"], decay_rate=float(c["decay_rate"]), step_offset=0,
        min_dim_size_to_factor=c["min_dim_size_to_factor"], epsilon=ADAFACTOR_EPS1, decay_rate_fn=decay_fn))
    if c["clipping_threshold"] is not None:
      txs.append(optax.clip_by_block_rms(float(c["clipping_threshold"])))
    txs.append(_scale_by_recorded_schedule(schedule))
    if c["multiply_by_parameter_scale"]:
      txs.append(optax.scale_by_param_block_rms())  # × max(1e-3, RMS(p))
    if c["momentum"] is not None:
      txs.append(optax.ema(float(c["momentum"]), debias=False, accumulator_dtype=jnp.float32))
    if wd > 0:
      txs.append(optax.add_decayed_weights(lambda count: wd * schedule(count), mask=mask))
  else:
    txs.append(optax.scale_by_adam(b1=float(c["b1"]), b2=float(c["b2"]), eps=float(c["eps"])))
    if wd > 0:
      txs.append(optax.add_decayed_weights(wd, mask=mask))
    txs.append(_scale_by_recorded_schedule(schedule))
  txs.append(optax.scale(-1.0))

  tx = optax.chain(*txs)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k, use_grad_mean=True).gradient_transformation()
  return Optimizer(tx=_with_float32_state(tx), schedule=schedule)
