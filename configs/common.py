"""Shared config pieces: argument parsing (big_vision style) and the fields every training config has."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from linformer_jax.data import default_data_config
from linformer_jax.optim import default_optimizer_config


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
  """Loop, logging, checkpoint and runtime fields, plus data/optimizer defaults and an empty model."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32
  c.eval_batch_size = config_dict.placeholder(int)   # None = batch_size
  c.eval_max_batches = config_dict.placeholder(int)  # None = the whole eval split
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.compute_dtype = "float32"                        # "bfloat16": bf16 compute with float32 params
  c.compilation_cache = True                         # JAX persistent compilation cache
  c.compilation_cache_dir = config_dict.placeholder(str)  # None = ~/.cache/linformer_jax/jax_cache
  c.tensorboard = True
  c.plots = True                                     # plots/*.png at the end of a run
  c.skip_nonfinite_steps = False                     # True: drop (and count) updates with a non-finite loss
  c.init_from = config_dict.placeholder(str)         # Orbax checkpoint from `python -m linformer_jax.convert`
  c.parallel = "jit"                                 # "jit" (NamedSharding over `mesh`) | "pmap"
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1 = the remaining devices; fsdp > 1: ZeRO-3
  c.data = default_data_config(data_name)
  c.optimizer = default_optimizer_config()
  c.model = ml_collections.ConfigDict()
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
