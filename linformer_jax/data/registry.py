"""`make_dataset(data_config, workdir)` and `default_data_config(name)`."""
from __future__ import annotations

import difflib
import types
from typing import Any, Mapping, Optional

import ml_collections
from ml_collections import config_dict

from linformer_jax.data import images, listops, mlm
from linformer_jax.data.base import Dataset, check_int_arg, check_prob, resolve_cache_dir

DATASETS = ("listops", "mlm", "digits", "cifar10")

# Fields every data config has (name → default); dataset-specific extras below.
_COMMON = {
    "path": None,        # None = the embedded default (generated ListOps, stdlib corpus, sklearn digits).
    "seed": 0,
    "max_len": None,     # Text sequence length; per-dataset default.
    "num_train": None,   # None = the dataset's full default.
    "num_eval": None,
    "cache_dir": None,   # None = <workdir>/data_cache, or ~/.cache/linformer_jax without a workdir.
    "mask_rate": mlm.DEFAULT_MASK_RATE,
    "image_size": images.DEFAULT_IMAGE_SIZE,
}
_MAX_LEN = {"listops": listops.DEFAULT_MAX_LEN, "mlm": mlm.DEFAULT_MAX_LEN, "digits": None, "cifar10": None}
_EXTRAS = {
    "listops": {"num_test": None, "min_length": listops.DEFAULT_MIN_LENGTH,
                "max_length": listops.DEFAULT_MAX_LENGTH, "max_depth": listops.DEFAULT_MAX_DEPTH,
                "max_args": listops.DEFAULT_MAX_ARGS},
    "mlm": {"max_bytes": mlm.DEFAULT_MAX_BYTES},
    "digits": {"augment": False, "crop_padding": images.DEFAULT_CROP_PADDING},
    "cifar10": {"augment": False, "crop_padding": images.DEFAULT_CROP_PADDING},
}
# Types of the fields whose default is None (ml_collections placeholders, so CLI overrides parse).
_NONE_TYPES = {"path": str, "num_train": int, "num_eval": int, "cache_dir": str, "num_test": int,
               "max_len": int}


# Every field some dataset reads: a data config with another field (a misspelling) is an error.
KNOWN_FIELDS = frozenset({"name"} | set(_COMMON) | {k for extras in _EXTRAS.values() for k in extras})


def _check_fields(keys) -> None:
  for key in keys:
    if key not in KNOWN_FIELDS:
      close = difflib.get_close_matches(str(key), sorted(KNOWN_FIELDS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ValueError(f"unknown data config field data.{key}{hint}; allowed fields: "
                       f"{', '.join(sorted(KNOWN_FIELDS))}.")


def _check_name(name: Any) -> None:
  if name not in DATASETS:
    allowed = ", ".join(repr(d) for d in DATASETS)
    raise ValueError(f"data.name={name!r} is not supported; allowed values: {allowed}.")


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """All data-config fields of dataset `name` with their defaults.

  Common: name, path, seed, max_len, num_train, num_eval, cache_dir, mask_rate, image_size.
  listops adds num_test, min_length, max_length, max_depth, max_args; mlm adds max_bytes;
  digits/cifar10 add augment, crop_padding. Fields whose default is None are typed placeholders.
  """
  _check_name(name)
  values = dict(_COMMON, max_len=_MAX_LEN[name])
  values.update(_EXTRAS[name])
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  for key, value in values.items():
    if value is None and key in _NONE_TYPES:
      setattr(cfg, key, config_dict.placeholder(_NONE_TYPES[key]))
    else:
      setattr(cfg, key, value)
  return cfg


def make_dataset(data_config: Any, workdir: Optional[str] = None) -> Dataset:
  """Builds the dataset described by `data_config` (a ConfigDict, a dict or any object with attributes).

  Missing optional fields take the defaults of `default_data_config(name)`. Raises ValueError /
  FileNotFoundError (naming the field or path) before loading anything; a field no dataset knows (a misspelling)
  is a ValueError.
  """
  if isinstance(data_config, ml_collections.ConfigDict):
    _check_fields(list(data_config.keys()))
  elif isinstance(data_config, Mapping):
    _check_fields(list(data_config.keys()))
    data_config = types.SimpleNamespace(**data_config)
  elif isinstance(data_config, types.SimpleNamespace):
    _check_fields(list(vars(data_config)))
  name = getattr(data_config, "name", None)
  _check_name(name)
  defaults = default_data_config(name)

  def get(key):
    value = getattr(data_config, key, None)
    return defaults[key] if value is None else value

  seed = get("seed")
  check_int_arg("data.seed", seed, minimum=0)
  cache_dir = resolve_cache_dir(getattr(data_config, "cache_dir", None), workdir)
  path = getattr(data_config, "path", None)
  if path is not None and not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
    raise TypeError(f"data.path must be a str path or None, got {path!r}.")
  path = None if path is None else str(path)
  if name == "listops":
    return listops.ListOpsDataset(
        path=path, seed=seed, max_len=get("max_len"), num_train=get("num_train"),
        num_eval=get("num_eval"), num_test=get("num_test"), cache_dir=cache_dir,
        min_length=get("min_length"), max_length=get("max_length"), max_depth=get("max_depth"),
        max_args=get("max_args"))
  if name == "mlm":
    check_prob("data.mask_rate", get("mask_rate"))
    return mlm.MLMDataset(path=path, seed=seed, max_len=get("max_len"), num_train=get("num_train"),
                          num_eval=get("num_eval"), cache_dir=cache_dir, mask_rate=get("mask_rate"),
                          max_bytes=get("max_bytes"))
  return images.ImageDataset(name=name, path=path, seed=seed, num_train=get("num_train"),
                             num_eval=get("num_eval"), image_size=get("image_size"),
                             augment=get("augment"), crop_padding=get("crop_padding"))
