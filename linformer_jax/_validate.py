"""Argument checks shared by all modules: the one validation vocabulary of the library.

Every check raises before any tracing, with a message that names the argument, the value given and
what is allowed:

* `check_int` / `check_real`: numbers with optional bounds (`check_real` also open bounds);
* `check_rate`: a probability or dropout rate in [0, 1) (or (0, 1));
* `check_bool`, `check_choice`: flags and enumerations;
* `check_fields`: the keys of a config section against its allowed fields (with a did-you-mean);
* `check_mask`, `check_length`: model inputs;
* `as_dtype`: a compute or parameter dtype (``DTYPES``: a name, or the jnp dtype itself).

A TypeError means the value has the wrong type, a ValueError that it is out of range or not allowed.
"""
from __future__ import annotations

import difflib
import numbers
from typing import Any, Iterable, Optional

import jax.numpy as jnp

# The floating-point dtypes a model may compute in or store its parameters in, by the names configs use.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  choices = tuple(choices)
  if value not in choices:
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}.")


def check_int(name: str, value: Any, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, allow_none: bool = False) -> None:
  """Raises TypeError unless `value` is an int (not a bool), ValueError if out of [minimum, maximum].

  Args:
    name: the argument's name as the user writes it (e.g. ``"data.seed"``).
    value: the value given.
    minimum, maximum: inclusive bounds (None = unbounded).
    allow_none: None is accepted (and not checked further).
  """
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r} "
                    f"of type {type(value).__name__}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value} is out of range; it must be >= {minimum}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name}={value} is out of range; it must be <= {maximum}.")


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
  """``">= 0"``, ``"< 1"``, ``"in (0, 1]"`` or ``""`` (unbounded); bounds are written as given."""
  if low is None and high is None:
    return ""
  if low is None:
    return f"<{'' if high_open else '='} {high}"
  if high is None:
    return f">{'' if low_open else '='} {low}"
  return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_real(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, allow_none: bool = False, why: str = "") -> None:
  """Raises TypeError unless `value` is a real number (an int or float, not a bool), ValueError if out of range.

  Args:
    name: the argument's name.
    value: the value given.
    low, high: bounds (None = unbounded); written in the message as given (``0`` or ``0.0``).
    low_open, high_open: the bound itself is excluded (``low < value`` instead of ``low <= value``).
    allow_none: None is accepted (and not checked further).
    why: appended to the range in the ValueError message (e.g. ``" (Adafactor's update clipping d)"``).
  """
  if value is None and allow_none:
    return
  rng = _range_text(low, high, low_open, high_open)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a float{' ' + rng if rng else ''}{' or None' if allow_none else ''}, "
                    f"got {value!r}.")
  lo_ok = low is None or (value > low if low_open else value >= low)
  hi_ok = high is None or (value < high if high_open else value <= high)
  if not (lo_ok and hi_ok):
    raise ValueError(f"{name}={value} is out of range; it must be {rng}{why}.")


def check_rate(name: str, value: Any, *, allow_zero: bool = True) -> None:
  """A rate or probability: a float in [0, 1) (a dropout rate), or in (0, 1) with ``allow_zero=False``."""
  check_real(name, value, low=0, high=1, low_open=not allow_zero, high_open=True)


def check_bool(name: str, value: Any) -> None:
  """Raises TypeError unless `value` is a bool (an int 0/1 is not accepted)."""
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool (True/False), got {value!r}.")


def check_fields(keys: Iterable[Any], allowed: Iterable[str], *, what: str, prefix: str = "",
                 scope: str = "") -> None:
  """Raises ValueError for the first of `keys` not in `allowed`.

  The message names the field (as ``prefix + key``), `what` it belongs to, the closest allowed field
  (did you mean), and every allowed field (of `scope`).

  Args:
    keys: the fields given.
    allowed: the fields accepted.
    what: what the fields describe, e.g. ``"data config"``.
    prefix: written before the field's name, e.g. ``"data."``.
    scope: which variant the allowed fields belong to, e.g. ``"data.name='mlm'"`` (empty: not named).
  """
  allowed = sorted(allowed)
  for key in keys:
    if key not in allowed:
      close = difflib.get_close_matches(str(key), allowed, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      of = f" for {scope}" if scope else ""
      raise ValueError(f"unknown {what} field {prefix}{key}{hint}; allowed fields{of}: {', '.join(allowed)}.")


def check_mask(mask: Any, batch: int, length: int, name: str = "mask") -> None:
  """A padding mask: bool array of shape (batch, length), True = real token."""
  if mask is None:
    return
  shape = getattr(mask, "shape", None)
  dtype = getattr(mask, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{name} must be a bool array of shape ({batch}, {length}), got {type(mask).__name__}.")
  if dtype != bool:
    raise TypeError(f"{name} must have dtype bool (True = real token), got dtype {dtype}; "
                    f"use `{name}.astype(bool)`.")
  if tuple(shape) != (batch, length):
    raise ValueError(f"{name} has shape {tuple(shape)}, expected (batch, n) = ({batch}, {length}) "
                     "to match the input.")


def check_length(name: str, n: int, max_len: int) -> None:
  """Raises ValueError if the sequence length `n` of input `name` exceeds the model's `max_len`."""
  if n > max_len:
    raise ValueError(f"{name} has sequence length n={n}, which exceeds max_len={max_len}; "
                     f"inputs must have n <= max_len (build the model with max_len >= {n}).")


def as_dtype(name: str, value: Any):
  """The jnp dtype of a ``dtype``/``param_dtype`` field: a name of ``DTYPES`` ("float32", "bfloat16", "float16") or
  one of those dtypes (``jnp.bfloat16``, ``np.dtype("float32")``, ...).

  Args:
    name: the field as the user writes it (``"model.dtype"``, ``"param_dtype"``).
    value: the value given.

  Returns:
    The scalar type of ``DTYPES`` (``jnp.float32``, ``jnp.bfloat16`` or ``jnp.float16``).

  Raises:
    ValueError: any other name or dtype, naming the field, the value and the allowed names.
  """
  if isinstance(value, str):
    found = DTYPES.get(value)
  else:
    try:
      dtype = jnp.dtype(value)
    except TypeError:
      dtype = None
    found = next((t for t in DTYPES.values() if dtype == jnp.dtype(t)), None)
  if found is None:
    shown = value if isinstance(value, str) else getattr(value, "__name__", value)
    raise ValueError(f"{name}={shown!r} is not supported; allowed values: "
                     f"{', '.join(map(repr, DTYPES))}.")
  return found
