"""Reading PyTorch-style checkpoints into ``{name: np.ndarray}`` without trusting their contents.

Usage::

    state_dict = load_state_dict("xcit_nano_12_p16_224.safetensors")   # no torch needed
    state_dict = load_state_dict("xcit_nano_12_p16_224.pth")           # needs torch; weights_only=True

``.safetensors`` files are read with ``safetensors.numpy`` (plain tensors, nothing executable). ``.pth`` / ``.pt``
/ ``.bin`` files are pickles; they are opened only through ``torch.load(..., weights_only=True)``, whose
restricted unpickler refuses anything but tensors and plain containers, so a checkpoint carrying arbitrary
objects (and code that would run when unpickled) is rejected instead of executed. This module never calls
``pickle.load`` itself.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

#: File suffixes read with ``safetensors.numpy`` (no torch needed).
SAFETENSORS_SUFFIXES = (".safetensors",)
#: File suffixes of ``torch.save`` pickles, loaded with ``torch.load(..., weights_only=True)``.
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
#: Every suffix :func:`load_state_dict` accepts (compared case-insensitively).
ALLOWED_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
#: Keys of a checkpoint wrapper dict whose value is the state_dict, tried in this order.
WRAPPER_KEYS = ("model", "state_dict")

#: Python code, shown in the error for a ``.pth`` file when torch is missing, that converts it to safetensors.
TO_SAFETENSORS_SNIPPET = """\
import torch, safetensors.torch
sd = torch.load("model.pth", map_location="cpu", weights_only=True)
safetensors.torch.save_file({k: v.contiguous() for k, v in sd.get("model", sd).items()}, "model.safetensors")"""


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
  """Returns the state_dict inside a checkpoint: ``obj["model"]`` or ``obj["state_dict"]`` when ``obj`` is such a
  wrapper (as official training scripts save ``{"model": ..., "optimizer": ..., "epoch": ...}``), else ``obj``."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}.")
  for key in WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      return obj[key]
  return obj


def _to_numpy(name: str, value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen, the converters cast anyway
      value = value.float()
    return value.numpy()
  if isinstance(value, (int, float, bool, np.generic)):
    return np.asarray(value)
  raise ValueError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor.")


def _load_torch(path: pathlib.Path) -> Any:
  try:
    import torch
  except ImportError as err:
    raise ImportError(
        f"{path} is a PyTorch pickle ({path.suffix}); reading it needs torch, which is not installed. Either "
        f"install torch, or convert the file to safetensors once in an environment that has torch:\n\n"
        f"{TO_SAFETENSORS_SNIPPET}\n\nand pass the .safetensors file instead.") from err
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for disallowed objects
    raise ValueError(
        f"refusing to load {path}: it is not a plain tensor checkpoint (torch.load with weights_only=True "
        f"rejected it: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Only files "
        f"holding tensors and plain containers are accepted; arbitrary pickled objects are never unpickled."
    ) from err


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into ``{name: np.ndarray}`` (original shapes and dtypes; bfloat16 → float32).

  Args:
    path: ``.safetensors`` (read with ``safetensors.numpy``; torch not needed) or ``.pth`` / ``.pt`` / ``.bin``
      (a ``torch.save`` pickle; needs torch and is loaded with ``weights_only=True``). A top-level
      ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: unknown suffix, or a pickle holding anything but tensors and plain containers.
    ImportError: a PyTorch pickle and torch is not installed (the message shows how to convert to safetensors).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint file at {str(path)!r}.")
  suffix = path.suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    from safetensors.numpy import load_file
    raw = load_file(str(path))
  elif suffix in TORCH_SUFFIXES:
    raw = _load_torch(path)
  else:
    raise ValueError(f"unsupported checkpoint suffix {path.suffix!r} for {str(path)!r}; allowed: "
                     f"{', '.join(ALLOWED_SUFFIXES)}.")
  state_dict = unwrap_state_dict(raw)
  return {str(k): _to_numpy(str(k), v) for k, v in state_dict.items()}
