"""`make_dataset(data_config, workdir)` and `default_data_config(name)`.

A dataset's data-config fields are its class's constructor arguments, read from the signature, with the
constructor's defaults: `default_data_config("listops")` holds `name` plus the arguments of `ListOpsDataset`
and nothing else, "mlm" those of `MLMDataset`, "digits" / "cifar10" those of `ImageDataset` (whose own
`name` argument is the config's `name`). A new constructor argument is a new config field, with no list to
keep in step.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections
from ml_collections import config_dict

from linformer_jax._validate import check_choice, check_fields
from linformer_jax.data import images, listops, mlm
from linformer_jax.data.base import Dataset, resolve_cache_dir

#: Names accepted by :func:`make_dataset` and :func:`default_data_config`.
DATASETS = ("listops", "mlm", "digits", "cifar10")

_CLASSES = {"listops": listops.ListOpsDataset, "mlm": mlm.MLMDataset, "digits": images.ImageDataset,
            "cifar10": images.ImageDataset}
# Constructor arguments that are not fields of their own: ImageDataset(name=...) is the config's `name`.
_NOT_FIELDS = ("self", "name")


def _field_type(annotation: Any, where: str) -> type:
  """The type of a field from its annotation: ``Optional[int]`` / ``int | None`` → int."""
  if isinstance(annotation, type):
    return annotation
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if (typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
      and isinstance(args[0], type)):
    return args[0]
  raise TypeError(f"{where}: cannot derive a config field type from the annotation {annotation!r}; annotate it "
                  "with a class or Optional[class].")


@functools.lru_cache(maxsize=None)
def _fields(name: str) -> Dict[str, Tuple[Any, type]]:
  """Field → (default, type) of dataset `name`, in the constructor's order (`name` itself excluded)."""
  cls = _CLASSES[name]
  hints = typing.get_type_hints(cls.__init__)
  out = {}
  for param in inspect.signature(cls.__init__).parameters.values():
    if param.name in _NOT_FIELDS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
      continue
    where = f"{cls.__name__}({param.name}=...)"
    if param.default is param.empty:
      raise TypeError(f"{where} has no default; every data-config field needs one.")
    out[param.name] = (param.default, _field_type(hints[param.name], where))
  return out


def data_fields(name: str) -> Tuple[str, ...]:
  """The data-config fields of dataset `name`: ``"name"`` and its constructor's arguments, in order."""
  check_choice("data.name", name, DATASETS)
  return ("name",) + tuple(_fields(name))


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """The data config of dataset `name`: `name` and its constructor's arguments with their defaults.

  listops: path, seed, max_len, num_train, num_eval, num_test, cache_dir, min_tree_length, max_tree_length,
  max_depth, max_args; mlm: path, seed, max_len, num_train, num_eval, cache_dir, mask_rate, max_bytes, objective;
  digits / cifar10: path, seed, num_train, num_eval, image_size, augment, crop_padding (`data_fields(name)`).
  Fields whose default is None are typed placeholders (so ``--config.data.num_train=100`` parses).
  """
  check_choice("data.name", name, DATASETS)
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  for key, (default, typ) in _fields(name).items():
    setattr(cfg, key, config_dict.placeholder(typ) if default is None else default)
  return cfg


def _given_fields(data_config: Any) -> Optional[list]:
  """The fields a config sets, where they can be listed (ConfigDict, mapping, SimpleNamespace), else None."""
  if isinstance(data_config, ml_collections.ConfigDict):
    return list(data_config.keys())
  if isinstance(data_config, Mapping):
    return list(data_config.keys())
  if isinstance(data_config, types.SimpleNamespace):
    return list(vars(data_config))
  return None


def _check_data_fields(name: str, keys) -> None:
  """Raises ValueError for a field dataset `name` does not have.

  An old ListOps name (min_length / max_length) names its replacement; another dataset's field names the
  datasets that have it; any other unknown field the closest allowed one. All name the allowed fields.
  """
  allowed = data_fields(name)
  for key in keys:
    if key in listops.RENAMED_ARGS:
      raise listops.renamed_arg_error(key)
    owners = [other for other in DATASETS if key not in allowed and key in _fields(other)]
    if owners:
      raise ValueError(f"data.{key} is not a field of data.name={name!r} (only of "
                       f"{', '.join(repr(o) for o in owners)}); allowed fields for data.name={name!r}: "
                       f"{', '.join(sorted(allowed))}.")
  check_fields(keys, allowed, what="data config", prefix="data.", scope=f"data.name={name!r}")


def make_dataset(data_config: Any, workdir: Optional[str] = None) -> Dataset:
  """Builds the dataset described by `data_config` (a ConfigDict, a dict or any object with attributes).

  Missing (or None) fields take the defaults of `default_data_config(name)`. Raises ValueError /
  FileNotFoundError (naming the field or path) before loading anything; a field the dataset does not have
  (a misspelling, or another dataset's field) is a ValueError.
  """
  keys = _given_fields(data_config)
  if isinstance(data_config, Mapping) and not isinstance(data_config, ml_collections.ConfigDict):
    data_config = types.SimpleNamespace(**data_config)
  name = getattr(data_config, "name", None)
  check_choice("data.name", name, DATASETS)
  if keys is not None:
    _check_data_fields(name, keys)
  kwargs = {}
  for key, (default, _) in _fields(name).items():
    value = getattr(data_config, key, None)
    kwargs[key] = default if value is None else value
  path = kwargs["path"]
  if path is not None and not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
    raise TypeError(f"data.path must be a str path or None, got {path!r}.")
  kwargs["path"] = None if path is None else str(path)
  if "cache_dir" in kwargs:
    kwargs["cache_dir"] = resolve_cache_dir(kwargs["cache_dir"], workdir)
  if _CLASSES[name] is images.ImageDataset:
    kwargs["name"] = name
  return _CLASSES[name](**kwargs)
