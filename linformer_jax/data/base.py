"""The `Dataset` base class: a stateless, step-indexed numpy input pipeline.

A training batch is a pure function of ``(seed, step, batch_size)``:

* epoch ``e = step * batch_size // num_train``; the epoch's order is
  ``np.random.default_rng([seed, e]).permutation(num_train)``;
* the global batch is the ``batch_size`` consecutive positions ``step * batch_size + [0, batch_size)`` of
  the concatenation of the epoch orders (a batch that crosses an epoch boundary wraps into the next
  epoch's permutation), so over one epoch every training example appears exactly once;
* a host takes rows ``[process_index * batch_size // process_count, (process_index + 1) * ...)`` of that
  global batch;
* per-example randomness (MLM masking, image augmentation) is drawn from
  ``np.random.default_rng([seed, 0, step, global_row])``, so a row is identical whatever the
  ``process_count``; evaluation randomness (MLM eval masking) from
  ``np.random.default_rng([seed, 1, split_id, example_index])``, fixed for a seed.

Nothing is iterator state: resuming at step ``s`` is calling ``batch_at(s, ...)``.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np

from linformer_jax._validate import check_choice, check_int

#: A batch: field name → numpy array with the rows as leading axis (e.g. ``"inputs"``, ``"mask"``, ``"label"``).
Batch = Dict[str, np.ndarray]

#: Stream tag (second seed word) of the per-example generators of training rows (see the module docstring).
TRAIN_STREAM = 0
#: Stream tag (second seed word) of the per-example generators of evaluation examples.
EVAL_STREAM = 1


def resolve_cache_dir(cache_dir: Optional[str], workdir: Optional[str]) -> str:
  """`cache_dir` if given, else `<workdir>/data_cache`, else `~/.cache/linformer_jax`."""
  if cache_dir:
    return os.path.expanduser(str(cache_dir))
  if workdir:
    return os.path.join(os.path.expanduser(str(workdir)), "data_cache")
  return os.path.join(os.path.expanduser("~"), ".cache", "linformer_jax")


def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
  """Writes `arrays` to `path` (.npz) via a temporary file and an atomic rename."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def row_rng(seed: int, stream: int, *key: int) -> np.random.Generator:
  """The generator of one example: ``default_rng([seed, stream, *key])``."""
  return np.random.default_rng([seed, stream, *[int(k) for k in key]])


class Dataset:
  """Base class of the step-indexed datasets.

  Subclasses set `self.info` and implement `_train_examples(indices, step, rows)` (the examples at
  train-set `indices`, with per-example randomness keyed by `(seed, step, rows)`) and
  `_eval_examples(indices, split)` / `_num_eval_examples(split)`.

  Attributes:
    info: dict with at least `kind`, `num_train`, `num_eval`, `pad_id` (see the subclasses).
    seed: the data seed (int >= 0).
  """

  #: Names accepted by `eval_batches(split=...)`; the first one is the default.
  EVAL_SPLITS: Sequence[str] = ("eval",)

  def __init__(self, *, seed: int, num_train: int):
    check_int("data.seed", seed, minimum=0)
    check_int("num_train", num_train, minimum=1)
    self.seed = int(seed)
    self.num_train = int(num_train)
    self.info: Dict[str, Any] = {}
    self._perm_cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
    self._perm_lock = threading.Lock()

  # ---- to implement -------------------------------------------------------------------------------
  def _train_examples(self, indices: np.ndarray, step: int, rows: np.ndarray) -> Batch:
    """Examples at train indices `indices` (b,), random per (seed, step, rows[i]) → batch dict."""
    raise NotImplementedError

  def _eval_examples(self, indices: np.ndarray, split: str) -> Batch:
    """Examples at `indices` (b,) of the eval split `split` → batch dict (deterministic)."""
    raise NotImplementedError

  def _num_eval_examples(self, split: str) -> int:
    raise NotImplementedError

  # ---- order ------------------------------------------------------------------------------------------
  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """``np.random.default_rng([seed, epoch]).permutation(num_train)`` (int64 (num_train,)), cached."""
    with self._perm_lock:
      perm = self._perm_cache.get(epoch)
      if perm is not None:
        self._perm_cache.move_to_end(epoch)
        return perm
    perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_train)
    with self._perm_lock:
      self._perm_cache[epoch] = perm
      while len(self._perm_cache) > 4:
        self._perm_cache.popitem(last=False)
    return perm

  def global_indices(self, step: int, batch_size: int) -> np.ndarray:
    """Train-set indices (int64 (batch_size,)) of the global batch at `step`."""
    check_int("step", step, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    pos = int(step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
    epochs = pos // self.num_train
    within = pos % self.num_train
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch_permutation(int(e))[within[sel]]
    return out

  @staticmethod
  def _host_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    check_int("batch_size", batch_size, minimum=1)
    check_int("process_count", process_count, minimum=1)
    check_int("process_index", process_index, minimum=0)
    if process_index >= process_count:
      raise ValueError(f"process_index={process_index} is out of range; it must be < process_count="
                       f"{process_count}.")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count} "
                       "(batch_size is the global batch, split evenly across processes).")
    lo = process_index * batch_size // process_count
    hi = (process_index + 1) * batch_size // process_count
    return np.arange(lo, hi, dtype=np.int64)

  # ---- public API -----------------------------------------------------------------------------------
  def batch_at(self, step: int, batch_size: int, *, process_index: int = 0,
               process_count: int = 1) -> Batch:
    """The training batch of global step `step`: this host's `batch_size // process_count` rows.

    Args:
      step: global step (int >= 0).
      batch_size: GLOBAL batch size; must be divisible by `process_count`.
      process_index, process_count: this host's slice of the global batch.

    Returns:
      dict of numpy arrays with leading dimension `batch_size // process_count` (keys per dataset).
    """
    rows = self._host_rows(batch_size, process_index, process_count)
    check_int("step", step, minimum=0)
    indices = self.global_indices(step, batch_size)[rows]
    return self._train_examples(indices, int(step), rows)

  def eval_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                   split: Optional[str] = None) -> Iterator[Batch]:
    """Iterates over the whole eval split in a fixed order, `batch_size` (global) examples at a time.

    The last batch is padded to `batch_size` by repeating the split's last example; every batch has a
    `"valid"` bool (b,) array, False on padding rows (for MLM their `"weights"` are also zeroed).
    Each host gets rows ``[process_index * b // process_count, ...)`` of every global batch, and all
    hosts see the same number of batches.
    """
    rows = self._host_rows(batch_size, process_index, process_count)
    split = self.EVAL_SPLITS[0] if split is None else split
    check_choice("split", split, self.EVAL_SPLITS)
    n = self._num_eval_examples(split)  # May raise FileNotFoundError (e.g. a missing test file).
    return self._eval_iter(n, batch_size, rows, split)

  def _eval_iter(self, n: int, batch_size: int, rows: np.ndarray, split: str) -> Iterator[Batch]:
    for start in range(0, n, batch_size):
      pos = start + rows
      valid = pos < n
      indices = np.minimum(pos, n - 1)
      batch = self._eval_examples(indices, split)
      if "weights" in batch:
        batch["weights"] = batch["weights"] * valid[:, None].astype(batch["weights"].dtype)
      batch["valid"] = valid
      yield batch

  def __repr__(self) -> str:
    keys = ("kind", "num_train", "num_eval")
    desc = ", ".join(f"{k}={self.info.get(k)!r}" for k in keys)
    return f"{type(self).__name__}({desc})"
