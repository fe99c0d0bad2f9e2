"""Optimizers: Adafactor (Shazeer & Stern 2018, arXiv 1804.04235) and AdamW as optax transformations.

Usage in your own training loop (any float or optax schedule as the learning rate)::

    from linformer_jax import optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=1000, decay_steps=100_000,
                                                  end_value=1e-4)
    tx = optim.adafactor(schedule)            # or optim.adafactor(optim.relative_step()) (the paper's Adafactor),
                                              # optim.adamw(3e-4, weight_decay=0.1), optax.chain(clip, tx), ...
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required (parameter scale, weight decay)
    params = optax.apply_updates(params, updates)
    lr = optim.current_learning_rate(opt_state)                # the LR that update used (log it)

The learning rate is applied exactly as given: update s (0-based count of this transformation's updates) uses
``learning_rate(s)``. ``adafactor(lr)`` with ``multiply_by_parameter_scale=True`` (the default) moves each tensor
p by ``lr(s) · max(1e-3, RMS(p))`` times its normalised gradient, i.e. the learning rate is relative to the
tensor's scale; the paper's relative step ρ_t = min(1e-2, 1/sqrt(t)) is not implied by anything and is
``relative_step()``. There is no ``learning_rate=None`` (``optax.adafactor(None)`` applies no LR at all, a step of
1 × RMS(p)). A schedule is checked before anything is traced: it must trace with an int32 step and give a
finite LR >= 0 at step 0.

From a training config (``config.optimizer``, see ``default_optimizer_config``)::

    opt = make_optimizer(config.optimizer, total_steps=config.total_steps)   # Optimizer(tx, schedule)
    opt_state = opt.tx.init(params)                                           # then as above

``make_optimizer`` builds the same ``adafactor`` / ``adamw`` transformation, preceded by global-norm clipping
(``grad_clip_norm``) and wrapped in ``optax.MultiSteps`` for ``accumulate_steps`` > 1.

Config schedules (``Optimizer.schedule(s)``, s = 0-based index of the optimizer update, w = warmup_steps,
T = total_steps // accumulate_steps, lr = learning_rate, end = end_lr_fraction · lr)::

    constant            lr · min(1, s/w)                       (lr for w = 0)
    rsqrt               lr · min(1, s/w) · sqrt(w / max(s, w)) (w >= 1; peak = lr at s = w)
    cosine              lr · s/w for s < w, then end + (lr − end) · ½(1 + cos(π · min(s − w, T − w)/(T − w)))
    warmup_cosine       the same curve computed by optax:
                        optax.warmup_cosine_decay_schedule(0, lr, warmup_steps=w, decay_steps=T, end_value=end)
    linear              lr · s/w for s < w, then lr + (end − lr) · min(s − w, T − w)/(T − w): linear from lr at
                        s = w to end at s = T, end afterwards (w < T)
    piecewise_constant  v_i for b_{i−1} <= s < b_i, i = 0 … n, with v = piecewise_values (n + 1 LRs >= 0),
                        b = boundaries (n increasing ints >= 1), b_{−1} = 0, b_n = ∞; learning_rate must be
                        None (the values are the LRs), w = 0; boundaries >= T are never reached
    relative_step       ρ_{s+1} = min(1e-2, 1/sqrt(s + 1))     (Adafactor only: the paper's relative step)
    a callable          any optax schedule, set from a Python config (``config.optimizer.schedule = fn``),
                        applied as given with s as above; learning_rate must be None, w = 0, end_lr_fraction = 0

A Python config may set ``schedule`` to a callable (the field accepts a name or a callable; from the command
line ``--config.optimizer.schedule=cosine`` still works). ``config.json`` then records only the callable's
name (``linformer_jax.run_config.config_to_json``): such a run is not reproducible from its JSON alone.

LRA (google-research/long-range-arena) uses ``constant · min(1, s/w) / sqrt(max(s, w))`` with constant 0.05 and
w = 1000: that is ``rsqrt`` with learning_rate = 0.05/sqrt(1000) ≈ 1.58e-3 (its peak, at s = 1000).

The applied step of one tensor p at update s is, with U = G/sqrt(V̂) the second-moment-normalised gradient::

    adafactor  Δp = −[ EMA_β1( lr(s) · max(1e-3, RMS(p)) · U / max(1, RMS(U)/d) ) + lr(s) · wd · p ]
               (param scale only with multiply_by_parameter_scale, the EMA only with momentum, the clip only with
               clipping_threshold d; RMS over the whole tensor)
    adamw      Δp = −lr(s) · ( m̂/(sqrt(v̂) + eps) + wd · p )            (= optax.adamw)

Both weight decays are multiplied by the LR (decoupled weight decay as in AdamW), so ``weight_decay`` means the
same for both optimizers. This differs from ``optax.adafactor`` / T5X, whose ``weight_decay_rate`` is not
LR-scaled (there wd = 1e-2 would shrink every kernel by 1 % per step).

Design choices:

* **Factoring of rank-3 attention kernels.** optax factors the two largest axes of a tensor (the others are
  batch axes) when the second-largest is >= ``min_dim_size_to_factor``. Flax attention kernels are
  (dim, heads, head_dim) and (heads, head_dim, dim); with optax's default 128 and head_dim 64 they keep a full
  second moment. The default here is 32: (512, 8, 64) is factored over (512, 64) with heads as a batch axis,
  i.e. one rank-1 fit per head, state v_row (8, 64) + v_col (512, 8) = 4,608 floats instead of 262,144.
  Linformer E/F kernels (heads, max_len, k) are factored over (max_len, k) per head the same way. No head
  axes are merged (that would need per-parameter rules, as T5X's factor rules); per-head factoring is at
  least as fine as a merged (dim, heads·head_dim) fit.
* **float32 statistics.** optax keeps optimizer state in the parameter dtype. Each transformation is wrapped
  so that grads and params are cast to float32 on the way in (state initialised from float32 params:
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
  ``MultiSteps``). After k >= 1 applied updates it is ``lr(k − 1)``; before the first update it is
  ``lr(0)``, the LR the first update will use (the ``inject_hyperparams`` convention). With
  accumulate_steps > 1 it only advances on the calls that apply an update. An opt_state holding several of
  these transformations (e.g. ``optax.multi_transform`` of two) has no single LR: ``current_learning_rate``
  raises.
* **Units.** ``total_steps`` passed to ``make_optimizer`` counts ``tx.update`` calls (the train loop's steps,
  i.e. micro-batches when accumulating). The schedule's s, ``warmup_steps``, ``boundaries`` and the horizon
  T = total_steps // accumulate_steps count applied optimizer updates. With accumulate_steps = 1 they coincide.
* Global-norm clipping (``grad_clip_norm``) acts on the (accumulated, mean) gradient before the optimizer.

Config fields that belong to the other optimizer are ignored (adamw ignores clipping_threshold,
multiply_by_parameter_scale, decay_rate, factored, min_dim_size_to_factor; adafactor ignores b1, b2, eps),
except ``momentum``/``beta2``, which must stay None for adamw (use b1/b2).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from linformer_jax._validate import check_bool, check_choice, check_int, check_real

#: Optimizer names of ``config.optimizer.name``.
NAMES = ("adafactor", "adamw")
#: Schedule names of ``config.optimizer.schedule`` (see the table in the module docstring).
SCHEDULES = ("constant", "rsqrt", "cosine", "warmup_cosine", "linear", "piecewise_constant", "relative_step")
#: The schedules that depend on ``total_steps`` (and use ``end_lr_fraction``).
HORIZON_SCHEDULES = ("cosine", "warmup_cosine", "linear")
#: Named weight-decay masks: ``"all"`` tensors, or ``"no_bias_norm"`` (only tensors of rank >= 2).
WEIGHT_DECAY_MASKS = ("all", "no_bias_norm")

#: Adafactor's ε1, added to g² (paper, optax).
ADAFACTOR_EPS1 = 1e-30
#: The cap of the paper's relative step ρ_t = min(1e-2, 1/sqrt(t)).
RELATIVE_STEP_MAX = 1e-2

#: A learning-rate schedule: update count (an int32 array) → learning rate.
Schedule = Callable[[Any], jax.Array]
#: A constant learning rate or a ``Schedule``.
ScalarOrSchedule = Union[float, Schedule]


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Defaults: Adafactor with the paper's relative step (ρ_t = min(1e-2, 1/sqrt(t)) × max(1e-3, RMS(p))).

  To use an explicit LR set ``schedule`` and ``learning_rate`` together (e.g. schedule="rsqrt",
  learning_rate=1e-2, warmup_steps=1000); ``schedule`` also takes a callable (an optax schedule) from a Python
  config, with learning_rate left None.

  Returns:
    The ``config.optimizer`` section with every field ``make_optimizer`` accepts.
  """
  return ml_collections.ConfigDict(dict(
      name="adafactor",
      learning_rate=config_dict.placeholder(float),  # None with relative_step, piecewise_constant or a callable
      # a name of SCHEDULES or a callable (any type: ``object``, so the CLI parses a plain word as a string)
      schedule=config_dict.FieldReference("relative_step", field_type=object),
      warmup_steps=0,
      end_lr_fraction=0.0,  # cosine, warmup_cosine, linear
      boundaries=config_dict.placeholder(tuple),  # piecewise_constant: increasing update indices >= 1
      # piecewise_constant: len(boundaries) + 1 LRs >= 0 (not "values": that is a ConfigDict method)
      piecewise_values=config_dict.placeholder(tuple),
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
  """The LR that the last applied update used.

  Args:
    opt_state: the state of a transformation built by ``adafactor``, ``adamw`` or ``make_optimizer`` (also
      inside ``optax.chain`` / ``MultiSteps``).

  Returns:
    A float32 scalar: ``lr(k − 1)`` after k >= 1 updates, ``lr(0)`` (the LR the first update will use) before
    any. Works under jit; for Adafactor it is the LR before the parameter scale max(1e-3, RMS(p)).

  Raises:
    ValueError: `opt_state` holds no or several ``LearningRateState`` entries.
  """
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, LearningRateState))
           if isinstance(x, LearningRateState)]
  if len(found) != 1:
    raise ValueError(f"opt_state holds {len(found)} LearningRateState entries, expected exactly 1; pass the state "
                     "of one transformation built by linformer_jax.optim.adafactor/adamw/make_optimizer.")
  return found[0].learning_rate


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def relative_step() -> Schedule:
  """Adafactor's relative step ρ_t = min(1e-2, 1/sqrt(t)), t = s + 1 (paper §8-9, Algorithm 6).

  ``adafactor(relative_step())`` (with the default ``multiply_by_parameter_scale=True``) is the paper's step
  α_t = max(1e-3, RMS(p)) · ρ_t.

  Returns:
    An optax schedule: 0-based update count s → min(1e-2, 1/sqrt(s + 1)) (float32).
  """
  def schedule(count):
    return jnp.minimum(RELATIVE_STEP_MAX, jax.lax.rsqrt(jnp.asarray(count, jnp.float32) + 1.0))

  return schedule


def _is_real(value) -> bool:
  """A Python/numpy real number or a concrete 0-d real array (not a bool)."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
    return False
  if isinstance(value, numbers.Real):
    return True
  dtype = getattr(value, "dtype", None)
  return getattr(value, "shape", None) == () and dtype is not None and np.issubdtype(dtype, np.number) \
      and not np.issubdtype(dtype, np.complexfloating)


_CHECKED_ATTR = "_linformer_jax_checked_schedule"


def _check_schedule(learning_rate: ScalarOrSchedule, name: str = "learning_rate") -> Schedule:
  """Checks a learning rate (a float or an optax schedule) before anything is traced and returns it as a schedule.

  A callable is returned unchanged (it is applied exactly as given); a float becomes a constant schedule.

  Args:
    learning_rate: a float > 0, or a callable mapping the int32 update count (0-based) to a scalar LR.
    name: the argument's name in error messages.

  Returns:
    The schedule.

  Raises:
    TypeError: `learning_rate` is neither a real number nor callable, or the schedule cannot be traced with an
      int32 step, or does not return a real scalar.
    ValueError: a float that is not finite and > 0, or a schedule whose value at step 0 is negative or not finite.
  """
  if not callable(learning_rate):
    if not _is_real(learning_rate):
      hint = "; for the paper's relative step use relative_step()" if learning_rate is None else ""
      raise TypeError(f"{name} must be a float > 0 or an optax schedule (a callable: update count → learning "
                      f"rate), got {learning_rate!r} of type {type(learning_rate).__name__}{hint}.")
    value = float(learning_rate)
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"{name}={value!r} is out of range; it must be a finite float > 0.")

    def constant(count):
      del count
      return jnp.asarray(value, jnp.float32)

    return constant

  schedule = learning_rate
  step = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    out = jax.eval_shape(schedule, step)
  except Exception as err:  # any failure to trace: report it as the schedule's
    raise TypeError(f"{name}: the schedule {schedule!r} cannot be called with a traced int32 update count (it runs "
                    f"inside jit): {type(err).__name__}: {err}") from err
  if not (hasattr(out, "shape") and out.shape == () and np.issubdtype(out.dtype, np.number)):
    raise TypeError(f"{name}: the schedule must return a real scalar, got {out!r} at step 0.")
  if getattr(schedule, _CHECKED_ATTR, False):  # built by _make_schedule from validated fields: no step-0 compile
    return schedule
  first = schedule(jnp.zeros((), jnp.int32))
  if isinstance(first, jax.core.Tracer):  # built inside a trace: the value is not known yet
    return schedule
  value = float(np.asarray(first))
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{name}: the schedule's learning rate at step 0 is {value!r}; it must be finite and >= 0.")
  return schedule


def _scale_by_recorded_schedule(schedule: Schedule) -> optax.GradientTransformation:
  """Multiplies updates by schedule(count) and records that LR in the state."""

  def init_fn(params):
    del params
    return LearningRateState(jnp.zeros([], jnp.int32), jnp.asarray(schedule(jnp.zeros([], jnp.int32)), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    updates = jax.tree.map(lambda u: None if u is None else (lr * u).astype(u.dtype), updates,
                           is_leaf=lambda x: x is None)
    return updates, LearningRateState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


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


def _resolve_mask(mask):
  """A weight-decay mask name ("no_bias_norm", "all") or an optax mask (None, a pytree or a callable) → optax's."""
  if isinstance(mask, str):
    check_choice("weight_decay_mask", mask, WEIGHT_DECAY_MASKS)
    return _no_bias_norm_mask if mask == "no_bias_norm" else None
  return mask


# ----------------------------------------------------------------------------------------------------------------
# The optimizers


def adafactor(learning_rate: ScalarOrSchedule, *, factored: bool = True, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
              momentum: Optional[float] = None, weight_decay: float = 0.0, weight_decay_mask: Any = "no_bias_norm",
              min_dim_size_to_factor: int = 32, beta2: Optional[float] = None,
              eps: float = ADAFACTOR_EPS1) -> optax.GradientTransformation:
  """Adafactor with per-head factoring of rank-3 kernels and float32 statistics (see the module docstring).

  The step of tensor p at update s is −[EMA_momentum(lr(s) · max(1e-3, RMS(p)) · clip_d(G/sqrt(V̂)))
  + lr(s) · weight_decay · p].

  Args:
    learning_rate: a float > 0 or an optax schedule (update count s, from 0 → LR), applied exactly as given.
      With ``multiply_by_parameter_scale`` it is multiplied by max(1e-3, RMS(p)) per tensor; the paper's
      relative step ρ_t = min(1e-2, 1/sqrt(t)) is ``relative_step()`` (nothing replaces a given schedule).
    factored: factor the second moment of tensors whose second-largest axis is >= ``min_dim_size_to_factor``
      over their two largest axes (the others are batch axes); False keeps a full second moment everywhere.
    decay_rate: c in β̂2_t = 1 − t^(−c), in (0, 1] (used when ``beta2`` is None).
    clipping_threshold: d of the update clipping U / max(1, RMS(U)/d), >= 1; None disables it.
    multiply_by_parameter_scale: multiply the LR by max(1e-3, RMS(p)) per tensor.
    momentum: β1 in [0, 1) of an EMA of the scaled steps (no bias correction); None = no first moment.
    weight_decay: decoupled weight decay >= 0, multiplied by the LR.
    weight_decay_mask: "no_bias_norm" (only >= 2-D tensors), "all" or None (every tensor), or an optax mask
      (a pytree of bools or a callable params → such a pytree).
    min_dim_size_to_factor: an int >= 1 (optax's default is 128; 32 factors (dim, heads, 64) kernels per head).
    beta2: None for the paper's β̂2_t, or a fixed β2 in (0, 1) with Adam's bias correction.
    eps: ε1 > 0 added to g².

  Returns:
    The transformation; ``update`` needs ``params``. Its state records the LR (``current_learning_rate``).

  Raises:
    TypeError: learning_rate is neither a real number nor callable, or a schedule that cannot be traced with an
      int32 step or does not return a scalar; another argument of the wrong type.
    ValueError: a float learning_rate that is not finite and > 0, a schedule whose value at step 0 is negative
      or not finite; another argument out of range.

  Examples:
    >>> import jax.numpy as jnp
    >>> from linformer_jax import optim
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,))}
    >>> tx = optim.adafactor(1e-2, weight_decay=0.1)
    >>> opt_state = tx.init(params)
    >>> grads = {"w": jnp.full((64, 32), 0.5), "b": jnp.full((32,), 0.5)}
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> # w: lr · RMS(w) · U + lr · wd · w with U = 1; b: lr · 1e-3 (RMS(b) = 0), no weight decay on a 1-D tensor
    >>> round(float(updates["w"][0, 0]), 6), round(float(updates["b"][0]), 8)
    (-0.011, -1e-05)
    >>> round(float(optim.current_learning_rate(opt_state)), 6)
    0.01
  """
  schedule = _check_schedule(learning_rate)
  mask = _resolve_mask(weight_decay_mask)
  check_bool("factored", factored)
  check_bool("multiply_by_parameter_scale", multiply_by_parameter_scale)
  check_int("min_dim_size_to_factor", min_dim_size_to_factor, minimum=1)
  check_real("clipping_threshold", clipping_threshold, low=1.0, allow_none=True,
             why=" (Adafactor's update clipping d; None disables it)")
  check_real("momentum", momentum, low=0.0, high=1.0, high_open=True, allow_none=True)
  check_real("decay_rate", decay_rate, low=0.0, high=1.0, low_open=True)
  check_real("beta2", beta2, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True)
  check_real("weight_decay", weight_decay, low=0.0)
  check_real("eps", eps, low=0.0, low_open=True)

  decay_fn = _paper_decay if beta2 is None else _fixed_beta2_decay(float(beta2))
  txs = [optax.scale_by_factored_rms(factored=factored, decay_rate=float(decay_rate), step_offset=0,
                                     min_dim_size_to_factor=min_dim_size_to_factor, epsilon=float(eps),
                                     decay_rate_fn=decay_fn)]
  if clipping_threshold is not None:
    txs.append(optax.clip_by_block_rms(float(clipping_threshold)))
  txs.append(_scale_by_recorded_schedule(schedule))
  if multiply_by_parameter_scale:
    txs.append(optax.scale_by_param_block_rms())  # × max(1e-3, RMS(p))
  if momentum is not None:
    txs.append(optax.ema(float(momentum), debias=False, accumulator_dtype=jnp.float32))
  if weight_decay > 0:
    wd = float(weight_decay)
    txs.append(optax.add_decayed_weights(lambda count: wd * schedule(count), mask=mask))
  txs.append(optax.scale(-1.0))
  return _with_float32_state(optax.chain(*txs))


def adamw(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, weight_decay_mask: Any = "no_bias_norm") -> optax.GradientTransformation:
  """AdamW (= ``optax.adamw``) with float32 statistics and the LR recorded in its state.

  The step is −lr(s) · (m̂/(sqrt(v̂) + eps) + weight_decay · p).

  Args:
    learning_rate: a float > 0 or an optax schedule (update count s, from 0 → LR), applied exactly as given.
    b1, b2: the moments' decay rates, in [0, 1).
    eps: > 0, added to sqrt(v̂).
    weight_decay: decoupled weight decay >= 0 (multiplied by the LR).
    weight_decay_mask: "no_bias_norm" (only >= 2-D tensors), "all" or None (every tensor), or an optax mask.

  Returns:
    The transformation (``update`` needs ``params`` when weight_decay > 0); ``current_learning_rate`` reads
    its LR.

  Raises:
    TypeError: learning_rate is neither a real number nor callable, or a schedule that cannot be traced with an
      int32 step or does not return a scalar; another argument of the wrong type.
    ValueError: a float learning_rate that is not finite and > 0, a schedule whose value at step 0 is negative
      or not finite; another argument out of range.
  """
  schedule = _check_schedule(learning_rate)
  mask = _resolve_mask(weight_decay_mask)
  check_real("b1", b1, low=0.0, high=1.0, high_open=True)
  check_real("b2", b2, low=0.0, high=1.0, high_open=True)
  check_real("eps", eps, low=0.0, low_open=True)
  check_real("weight_decay", weight_decay, low=0.0)
  txs = [optax.scale_by_adam(b1=float(b1), b2=float(b2), eps=float(eps))]
  if weight_decay > 0:
    txs.append(optax.add_decayed_weights(float(weight_decay), mask=mask))
  txs += [_scale_by_recorded_schedule(schedule), optax.scale(-1.0)]
  return _with_float32_state(optax.chain(*txs))


# ----------------------------------------------------------------------------------------------------------------
# From a config


def _config_dict(opt_config) -> dict:
  cfg = opt_config.to_dict() if hasattr(opt_config, "to_dict") else dict(opt_config)
  defaults = default_optimizer_config().to_dict()
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(f"unknown optimizer config field(s) {unknown}; allowed fields: {sorted(defaults)}.")
  return {**defaults, **cfg}


def _schedule_names() -> str:
  return ", ".join(repr(s) for s in SCHEDULES)


def _validate_piecewise(boundaries, values) -> None:
  """boundaries: increasing ints >= 1; piecewise_values: len(boundaries) + 1 finite reals >= 0."""
  for field, seq in (("boundaries", boundaries), ("piecewise_values", values)):
    if not isinstance(seq, (tuple, list)):
      raise TypeError(f"{field} must be a tuple (of {'ints' if field == 'boundaries' else 'floats'}) for "
                      f"schedule='piecewise_constant', got {seq!r}.")
  for i, b in enumerate(boundaries):
    check_int(f"boundaries[{i}]", b, minimum=1)
    if i and b <= boundaries[i - 1]:
      raise ValueError(f"boundaries={tuple(boundaries)!r} must be strictly increasing (update indices at which the "
                       "learning rate changes).")
  for i, v in enumerate(values):
    check_real(f"piecewise_values[{i}]", v, low=0.0)
    if not math.isfinite(v):
      raise ValueError(f"piecewise_values[{i}]={v} is out of range; it must be a finite float >= 0.0.")
  if len(values) != len(boundaries) + 1:
    raise ValueError(f"piecewise_values has {len(values)} entries and boundaries {len(boundaries)}; schedule="
                     "'piecewise_constant' needs len(piecewise_values) == len(boundaries) + 1 (piecewise_values[i] "
                     "applies on "
                     "[boundaries[i-1], boundaries[i])).")


def _validate_schedule(c: dict, horizon: int, k: int, total_steps: int) -> None:
  """Checks the schedule fields: schedule (a name or a callable), learning_rate, warmup_steps, end_lr_fraction,
  boundaries, piecewise_values."""
  name, sched, lr, warmup = c["name"], c["schedule"], c["learning_rate"], c["warmup_steps"]
  if callable(sched) and not isinstance(sched, str):
    for field, unused in (("learning_rate", None), ("warmup_steps", 0), ("end_lr_fraction", 0),
                          ("boundaries", None), ("piecewise_values", None)):
      if c[field] != unused:
        raise ValueError(f"{field}={c[field]!r} contradicts a callable schedule, which is applied as given (its "
                         f"value at each update is the learning rate); set {field}={unused!r}, or fold it into "
                         "the schedule.")
    _check_schedule(sched, "schedule")
    return
  if not isinstance(sched, str):
    raise TypeError(f"schedule must be a name ({_schedule_names()}) or an optax schedule (a callable: update "
                    f"count → learning rate), got {sched!r} of type {type(sched).__name__}.")
  if sched not in SCHEDULES:
    raise ValueError(f"schedule={sched!r} is not supported; allowed values: {_schedule_names()}, or a callable "
                     "(an optax schedule) set from a Python config.")
  if sched == "relative_step":
    if lr is not None:
      raise ValueError(f"learning_rate={lr!r} contradicts schedule='relative_step', whose step is "
                       "min(1e-2, 1/sqrt(t)) × max(1e-3, RMS(p)) and ignores any learning_rate; "
                       "set learning_rate=None, or use schedule='constant'/'rsqrt'/'cosine' with a learning_rate.")
    if name != "adafactor":
      raise ValueError(f"schedule='relative_step' requires name='adafactor' (got name={name!r}); it is Adafactor's "
                       "relative step size; allowed schedules for adamw: the others of "
                       f"{_schedule_names()}.")
    if not c["multiply_by_parameter_scale"]:
      raise ValueError("schedule='relative_step' requires multiply_by_parameter_scale=True (the paper's step is "
                       "ρ_t × max(1e-3, RMS(p))); got multiply_by_parameter_scale=False.")
  elif sched == "piecewise_constant":
    if lr is not None:
      raise ValueError(f"learning_rate={lr!r} contradicts schedule='piecewise_constant', whose values are the "
                       "learning rates themselves; set learning_rate=None.")
    _validate_piecewise(c["boundaries"], c["piecewise_values"])
  else:
    if lr is None:
      raise ValueError(f"learning_rate=None is only allowed with schedule='relative_step' or 'piecewise_constant' "
                       f"or a callable schedule; schedule={sched!r} needs a float learning_rate > 0.")
    check_real("learning_rate", lr, low=0.0, low_open=True)
  if warmup != 0 and sched in ("relative_step", "piecewise_constant"):
    raise ValueError(f"warmup_steps={warmup} is not used by schedule={sched!r} (it has no warmup); set "
                     "warmup_steps=0" + (" or use schedule='rsqrt'." if sched == "relative_step" else
                                         " and start piecewise_values with a small learning rate."))
  if sched != "piecewise_constant":
    for field in ("boundaries", "piecewise_values"):
      if c[field] is not None:
        raise ValueError(f"{field}={c[field]!r} is only used by schedule='piecewise_constant' (got schedule="
                         f"{sched!r}); set {field}=None.")
  if sched == "rsqrt" and warmup < 1:
    raise ValueError(f"warmup_steps={warmup} is out of range for schedule='rsqrt'; it must be >= 1 "
                     "(lr · min(1, s/w) · sqrt(w / max(s, w)) is undefined for w = 0).")
  if sched in HORIZON_SCHEDULES and warmup >= horizon:
    raise ValueError(f"warmup_steps={warmup} must be < the number of optimizer updates "
                     f"total_steps // accumulate_steps = {total_steps} // {k} = {horizon} for schedule={sched!r}.")
  check_real("end_lr_fraction", c["end_lr_fraction"], low=0.0, high=1.0)
  if c["end_lr_fraction"] != 0 and sched not in HORIZON_SCHEDULES:
    raise ValueError(f"end_lr_fraction={c['end_lr_fraction']!r} is only used by schedule='cosine', "
                     f"'warmup_cosine' and 'linear' (got schedule={sched!r}); set it to 0.0.")


def _validate(c: dict, total_steps: int) -> None:
  check_choice("name", c["name"], NAMES)
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
  _validate_schedule(c, total_steps // k, k, total_steps)
  check_real("weight_decay", c["weight_decay"], low=0.0)
  check_real("grad_clip_norm", c["grad_clip_norm"], low=0.0, low_open=True, allow_none=True)
  if c["name"] == "adamw":
    for field, use in (("momentum", "b1"), ("beta2", "b2")):
      if c[field] is not None:
        raise ValueError(f"{field}={c[field]!r} is an Adafactor field; for name='adamw' set {use} instead and leave "
                         f"{field}=None.")


def _make_schedule(c: dict, horizon: int) -> Schedule:
  """The config's schedule (validated before): a named one, or the callable itself."""
  schedule = c["schedule"]
  if callable(schedule):
    return schedule
  named = _named_schedule(c, horizon)
  setattr(named, _CHECKED_ATTR, True)  # its fields were range-checked: _check_schedule skips the step-0 evaluation
  return named


def _named_schedule(c: dict, horizon: int) -> Schedule:
  """The schedule named by the config's validated ``schedule`` field."""
  schedule, lr, warmup = c["schedule"], c["learning_rate"], c["warmup_steps"]
  end = None if lr is None else float(c["end_lr_fraction"]) * lr

  def as_float(s):
    return jnp.asarray(s, jnp.float32)

  def warmup_factor(s):
    return jnp.minimum(1.0, s / warmup) if warmup > 0 else jnp.ones_like(s)

  if schedule == "relative_step":
    return relative_step()
  if schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=horizon, end_value=end)
  if schedule == "piecewise_constant":
    bounds = jnp.asarray(c["boundaries"], jnp.int32).reshape(-1)
    values = jnp.asarray(c["piecewise_values"], jnp.float32)
    # the number of boundaries <= step: values[i] on [boundaries[i-1], boundaries[i]) (elementwise for arrays)
    return lambda step: values[jnp.searchsorted(bounds, jnp.asarray(step, jnp.int32), side="right")]
  if schedule == "constant":
    return lambda step: lr * warmup_factor(as_float(step))
  if schedule == "rsqrt":
    def rsqrt(step):
      s = as_float(step)
      return lr * warmup_factor(s) * jnp.sqrt(warmup / jnp.maximum(s, float(warmup)))
    return rsqrt
  decay_len = float(horizon - warmup)
  if schedule == "linear":
    def linear(step):
      s = as_float(step)
      decayed = lr + (end - lr) * jnp.clip(s - warmup, 0.0, decay_len) / decay_len
      return jnp.where(s < warmup, lr * s / max(warmup, 1), decayed)
    return linear
  if schedule == "cosine":
    def cosine(step):
      s = as_float(step)
      # ½(1 + cos(π·progress)) = sin²(π/2 · remaining), remaining = 1 − progress: accurate near the end too
      remaining = jnp.clip(horizon - s, 0.0, decay_len) / decay_len
      decayed = end + (lr - end) * jnp.square(jnp.sin(0.5 * math.pi * remaining))
      return jnp.where(s < warmup, lr * s / max(warmup, 1), decayed)
    return cosine
  raise AssertionError(schedule)  # validated before


def make_optimizer(opt_config, total_steps: int) -> Optimizer:
  """Builds the optimizer described by `opt_config` on top of ``adafactor`` / ``adamw``.

  Args:
    opt_config: a ConfigDict or dict of ``default_optimizer_config`` fields (missing ones take the defaults).
    total_steps: number of ``tx.update`` calls the training will make (micro-batches when accumulate_steps > 1).

  Returns:
    ``Optimizer(tx, schedule)``: the transformation (global-norm clipping, then the optimizer, in
    ``optax.MultiSteps`` for accumulate_steps > 1) and the schedule (a callable schedule is returned as given).

  Raises:
    ValueError, TypeError: inconsistent or out-of-range settings, before anything is traced.
  """
  c = _config_dict(opt_config)
  _validate(c, total_steps)
  k = c["accumulate_steps"]
  schedule = _make_schedule(c, total_steps // k)
  if c["name"] == "adafactor":
    core = adafactor(schedule, factored=c["factored"], decay_rate=c["decay_rate"],
                     clipping_threshold=c["clipping_threshold"],
                     multiply_by_parameter_scale=c["multiply_by_parameter_scale"], momentum=c["momentum"],
                     weight_decay=c["weight_decay"], weight_decay_mask=c["weight_decay_mask"],
                     min_dim_size_to_factor=c["min_dim_size_to_factor"], beta2=c["beta2"], eps=ADAFACTOR_EPS1)
  else:
    core = adamw(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"], weight_decay=c["weight_decay"],
                 weight_decay_mask=c["weight_decay_mask"])
  txs = [] if c["grad_clip_norm"] is None else [optax.clip_by_global_norm(float(c["grad_clip_norm"]))]
  tx = optax.chain(*txs, core)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k, use_grad_mean=True).gradient_transformation()
  return Optimizer(tx=_with_float32_state(tx), schedule=schedule)
