"""Shared config pieces: argument parsing (big_vision style) and the fields every training config has."""
from __future__ import annotations

import ml_collections
from linformer_jax.data import default_data_config
from linformer_jax.optim import default_optimizer_config
from linformer_jax.run_config import default_config_fields


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"runlocal,k=64,attention=full"`` into a ConfigDict over ``defaults``: a bare word sets a bool
  field to True; ``key=value`` is converted to the default's type. Unknown keys raise ValueError."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}.")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def base_config(data_name: str) -> ml_collections.ConfigDict:
  """The run fields with their defaults (``linformer_jax.run_config.RunConfig``), data/optimizer defaults and a
  model section holding only the precision fields: ``model.dtype`` (compute) and ``model.param_dtype`` (stored
  parameters), "float32" | "bfloat16" | "float16", so that ``--config.model.dtype=bfloat16`` works for every
  config. Config files add the model's name and fields with ``c.model.update(...)``."""
  c = default_config_fields()
  c.data = default_data_config(data_name)
  c.optimizer = default_optimizer_config()
  c.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32"))
  return c


def runlocal(c: ml_collections.ConfigDict, steps: int = 6) -> None:
  """Shrinks a config in place so a run takes seconds (CI)."""
  c.total_steps = steps
  c.batch_size = 4
  c.log_every = 2
  c.eval_every = steps
  c.checkpoint_every = steps // 2
  c.eval_max_batches = 2
  c.compilation_cache = False
  c.tensorboard = True
  c.mesh.data = 1  # a one-device smoke test (batch 4); --config.mesh.data=-1 for all devices
