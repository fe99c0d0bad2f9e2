"""Argument checks shared by all modules.

Every check raises before any tracing, with a message that names the argument, the value given and
what is allowed.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable, Optional


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  choices = tuple(choices)
  if value not in choices:
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}.")


def check_int(name: str, value: Any, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, allow_none: bool = False) -> None:
  """Raises TypeError unless `value` is an int (not a bool), ValueError if out of range."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value} is out of range; it must be >= {minimum}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name}={value} is out of range; it must be <= {maximum}.")


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool (True/False), got {value!r}.")


def check_rate(name: str, value: Any) -> None:
  """A dropout rate: a float in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a float in [0, 1), got {value!r}.")
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{name}={value} is out of range; it must be in [0, 1).")


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
  if n > max_len:
    raise ValueError(f"{name} has sequence length n={n}, which exceeds max_len={max_len}; "
                     f"inputs must have n <= max_len (build the model with max_len >= {n}).")
