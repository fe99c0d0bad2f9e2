"""The run-config schema: every top-level training field, its type and its default, stated once (``RunConfig``).

A training config (``configs/*.py: get_config(arg)``) is an ``ml_collections.ConfigDict`` with these fields plus
the ``data``, ``optimizer`` and ``model`` sections, which their own constructors check
(``linformer_jax.data.make_dataset``, ``linformer_jax.optim.make_optimizer``, ``linformer_jax.models.create_model``).
``configs/common.py: base_config`` takes its defaults from here.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import typing
from typing import Any, Callable, Mapping, Optional

import ml_collections
from ml_collections import config_dict

from linformer_jax._validate import check_bool, check_choice, check_int

#: Values of ``config.parallel`` (see ``linformer_jax.parallel``).
PARALLEL_MODES = ("jit", "pmap")
#: The required config sections (ConfigDicts of their own).
SECTIONS = ("data", "optimizer", "model")
#: Top-level fields that were replaced → the error message saying what to write instead.
RENAMED_FIELDS = {
    "compute_dtype": ("compute_dtype was replaced by model.dtype (the compute dtype: 'float32', 'bfloat16' or "
                      "'float16') and model.param_dtype (the dtype parameters are stored in); remove compute_dtype "
                      "and set e.g. --config.model.dtype=bfloat16 (parameters and optimizer state stay float32)."),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """The top-level fields of a training config, typed and checked.

  Attributes:
    seed: model initialisation and dropout seed (the data have their own ``data.seed``).
    total_steps: number of updates.
    batch_size: global batch (all devices and processes).
    eval_batch_size: global eval batch; None = batch_size.
    eval_max_batches: eval batches per evaluation; None = the whole eval split.
    log_every / eval_every / checkpoint_every: intervals in steps (the last step always logs, evaluates and
      saves).
    keep_checkpoints: how many checkpoints the workdir keeps.
    compilation_cache: use JAX's persistent compilation cache.
    compilation_cache_dir: its directory; None = ``workdir.DEFAULT_COMPILATION_CACHE_DIR``.
    tensorboard: write TensorBoard events beside ``metrics.jsonl``.
    plots: write ``plots/*.png`` at the end of a run.
    skip_nonfinite_steps: drop (and count) updates with a non-finite loss instead of stopping.
    init_from: an Orbax checkpoint directory to take matching variables from (``checkpoint.restore_variables``).
    parallel: "jit" (NamedSharding over ``mesh``) | "pmap".
    mesh: {"data": -1, "fsdp": 1}: -1 = the remaining devices; fsdp > 1 shards parameters (ZeRO-3).
    data / optimizer / model: the sections, checked by their own constructors.
  """
  seed: int = 0
  total_steps: int = 1000
  batch_size: int = 32
  eval_batch_size: Optional[int] = None
  eval_max_batches: Optional[int] = None
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  compilation_cache: bool = True
  compilation_cache_dir: Optional[str] = None
  tensorboard: bool = True
  plots: bool = True
  skip_nonfinite_steps: bool = False
  init_from: Optional[str] = None
  parallel: str = "jit"
  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1})
  data: Any = None
  optimizer: Any = None
  model: Any = None

  def __post_init__(self):
    for name in SECTIONS:
      if getattr(self, name) is None:
        raise ValueError(f"the config has no field {name!r}; required sections: {', '.join(SECTIONS)}.")
    minimum = {"seed": 0}
    for name, kind in _field_types().items():
      if kind is int:
        allow_none = _field_defaults()[name] is None
        check_int(name, getattr(self, name), minimum=minimum.get(name, 1), allow_none=allow_none)
      elif kind is bool:
        check_bool(name, getattr(self, name))
    check_choice("parallel", self.parallel, PARALLEL_MODES)
    if "name" not in self.model:
      raise ValueError("model.name is missing; allowed: a name of linformer_jax.models.list_models(), e.g. "
                       "'linformer_lm', 'linformer_classifier' or 'xcit_nano_12_p16_224'.")
    if self.init_from and not os.path.isdir(os.path.expanduser(str(self.init_from))):
      raise FileNotFoundError(f"init_from={str(self.init_from)!r} is not a directory; it must be an Orbax "
                              "checkpoint (e.g. written by `python -m linformer_jax.convert`, or a run's "
                              "checkpoints/ directory).")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "RunConfig":
    """Checks a ConfigDict/dict's top-level fields (names, types, ranges, choices) before anything is loaded or
    compiled. A field that is not in the schema (a misspelling) is a ValueError with a did-you-mean."""
    names = [f.name for f in dataclasses.fields(cls)]
    for name in config:
      if name in RENAMED_FIELDS:
        raise ValueError(RENAMED_FIELDS[name])
      if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config field {name!r}{hint}; allowed fields: {', '.join(sorted(names))}.")
    return cls(**{name: config[name] for name in config})

  @property
  def eval_batch(self) -> int:
    """The global eval batch size."""
    return self.eval_batch_size or self.batch_size

def _field_types() -> dict[str, type]:
  """{field: int | bool | str | ...} of the scalar fields (Optional[X] → X); sections and mesh left out."""
  hints = typing.get_type_hints(RunConfig)
  out = {}
  for f in dataclasses.fields(RunConfig):
    kind = hints[f.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
      kind = args[0]
    if kind in (int, bool, str, float):
      out[f.name] = kind
  return out


def _field_defaults() -> dict[str, Any]:
  return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
          for f in dataclasses.fields(RunConfig)}


def default_config_fields() -> ml_collections.ConfigDict:
  """The schema's defaults as a ConfigDict (None fields as typed placeholders, so CLI overrides parse); the
  sections are left to the config file."""
  c = ml_collections.ConfigDict()
  types = _field_types()
  for name, value in _field_defaults().items():
    if name in SECTIONS:
      continue
    if value is None:
      value = config_dict.placeholder(types[name])
    elif isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    c[name] = value
  return c


def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff_hint(config_json: str) -> Callable[[dict], str]:
  """For a checkpoint-mismatch message: a function of a checkpoint's meta that names the model/optimizer fields
  that differ between the checkpoint's config and ``config_json``."""
  now = json.loads(config_json)

  def hint(meta: dict) -> str:
    then = meta.get("config") or {}
    diffs = []
    for section in ("model", "optimizer"):
      a, b = _flat(then.get(section)), _flat(now.get(section))
      for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
          diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    return ("Config fields that differ: " + "; ".join(diffs[:8]) + ".") if diffs else ""

  return hint


def describe_callable(fn: Callable) -> str:
  """The text ``config.json`` records for a callable config value (e.g. ``optimizer.schedule``).

  Args:
    fn: the callable (a function, a ``functools.partial`` or a callable object).

  Returns:
    ``"<callable MODULE.QUALNAME: not reproducible from this JSON>"``: no memory address, so the same callable
    gives the same text in every run (the resume comparison of configs stays meaningful).
  """
  partial = isinstance(fn, functools.partial)
  target = fn.func if partial else fn
  name = getattr(target, "__qualname__", None) or type(target).__qualname__
  module = getattr(target, "__module__", None) or type(target).__module__
  return f"<callable {'functools.partial of ' if partial else ''}{module}.{name}: not reproducible from this JSON>"


def config_to_json(config: ml_collections.ConfigDict, **kwargs) -> str:
  """The JSON that ``config.json`` and checkpoints record, callables written as ``describe_callable``'s text.

  Args:
    config: the training config.
    **kwargs: passed to ``json.dumps`` (e.g. ``indent=1``).

  Returns:
    ``config.to_json_best_effort(**kwargs)``, except that each callable value (ml_collections would write
    ``"function schedule"``, a repr with a memory address, or the object's attributes) is replaced by
    ``describe_callable(value)``.
  """
  text = config.to_json_best_effort(**kwargs)
  data = json.loads(text)
  found = []

  def replace(node, out):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(out.get(key), dict):
        replace(value, out[key])
      elif callable(value) and not isinstance(value, type):
        out[key] = describe_callable(value)
        found.append(key)

  replace(config, data)
  return json.dumps(data, **kwargs) if found else text
