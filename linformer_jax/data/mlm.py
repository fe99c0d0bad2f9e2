"""Byte-level masked language modelling (BERT-style masking) over local text files.

Corpus (`data.path`):

* None: the Python standard library's own source, ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
  (``site-packages``/``dist-packages`` excluded), sorted by relative POSIX path. Nothing is downloaded;
  the corpus therefore depends on the Python version (e.g. 3.11.7 here).
* a file: that file;
* a directory: every ``*.py`` and ``*.txt`` below it (recursively), sorted by relative POSIX path;
* a glob (contains ``*``, ``?`` or ``[``): the matching files (``recursive=True``), sorted.

Files are read as raw bytes, in order, joined with a single NUL byte (0, the document separator), and
cut at `max_bytes` (default 20 MB) so start-up stays fast. The byte array is cached as
``<cache_dir>/mlm/<sha1>.npy``, keyed by the files' paths, sizes and mtimes and `max_bytes`.

Examples: the array is cut into ``C = ceil(len / max_len)`` consecutive chunks of `max_len` bytes (the
last one padded with PAD). Split by chunk index: the `num_eval` eval chunks are evenly spaced,
``round(linspace(0, C - 1, num_eval))`` (so eval covers the whole corpus, not just its last files);
train = the first `num_train` of the remaining chunks in order. Defaults: num_eval = min(1000,
max(1, C // 20)), num_train = all remaining.

Vocabulary (`VOCAB_SIZE` = 258): ids 0..255 = the bytes, 256 = PAD, 257 = MASK.

Masking (BERT): each real (non-PAD) position is selected independently with probability `mask_rate`
(0.15); a selected position becomes MASK with probability 0.8, a uniformly random byte 0..255 with 0.1,
and stays unchanged with 0.1. ``weights`` = 1.0 on selected positions. Train rows draw from
``default_rng([seed, 0, step, global_row])``, eval example i from ``default_rng([seed, 1, 0, i])``.

Objective ``"causal"`` (a causal LM, next-byte prediction; ``objective="mlm"`` is the masking above): nothing is
masked, ``inputs`` = the chunk, ``targets`` = the chunk shifted left by one (position t is scored on byte t + 1),
``weights`` = 1 where that next byte is real — the last position of a chunk and padding are not scored. The batch
keys are the same, so the "mlm" train step serves both; the model must then be causal (``causal=True``), or it
would read the byte it predicts (the trainer refuses that).

Baseline ``info["unigram_perplexity"]``: exp of the cross-entropy of the train chunks' byte unigram
distribution (add-one smoothed over the 256 bytes) on the eval split's scored (weights = 1) targets.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from typing import List, Optional, Sequence

import numpy as np

from linformer_jax._validate import check_choice, check_int, check_rate
from linformer_jax.data.base import EVAL_STREAM, TRAIN_STREAM, Batch, Dataset, row_rng

#: Token id of padding (ids 0..255 are the bytes).
PAD_ID = 256
#: Token id of the ``[MASK]`` token.
MASK_ID = 257
#: Size of the vocabulary: 256 bytes, PAD and MASK.
VOCAB_SIZE = 258
#: The byte placed between two files of the corpus.
SEPARATOR = b"\x00"
#: Suffixes of the files read from a corpus directory.
TEXT_SUFFIXES = (".py", ".txt")
#: Default length, in bytes, of an example (a chunk of the corpus).
DEFAULT_MAX_LEN = 512
#: Default cap on the number of corpus bytes read.
DEFAULT_MAX_BYTES = 20_000_000
#: Training objectives: BERT masking, or next-byte prediction (a causal LM).
OBJECTIVES = ("mlm", "causal")
#: Default probability that a real position is selected for prediction.
DEFAULT_MASK_RATE = 0.15
#: Upper bound of the default number of eval chunks, ``min(MAX_DEFAULT_EVAL, max(1, C // 20))``.
MAX_DEFAULT_EVAL = 1000
_CACHE_VERSION = 1
_GLOB_CHARS = "*?["
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> str:
  """Directory of the Python standard library (``sysconfig.get_paths()["stdlib"]``)."""
  return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffixes: Sequence[str], exclude: Sequence[str] = ()) -> List[str]:
  """Files below `root` ending in one of `suffixes`, sorted by relative POSIX path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in exclude]
    for name in filenames:
      if name.endswith(tuple(suffixes)):
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
  return [full for _, full in sorted(found)]


def list_files(path: Optional[str]) -> List[str]:
  """The corpus files of `path` (see the module docstring), in reading order.

  Raises FileNotFoundError for a path that does not exist / a glob with no match, ValueError for a
  directory with no ``*.py``/``*.txt`` files.
  """
  if path is None:
    root = stdlib_dir()
    files = _walk(root, (".py",), _EXCLUDED_DIRS)
    if not files:
      raise FileNotFoundError(f"no *.py files found in the standard library directory {root!r} "
                              "(sysconfig stdlib); set data.path to a text file, directory or glob.")
    return files
  path = os.path.expanduser(str(path))
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    files = _walk(path, TEXT_SUFFIXES, ("__pycache__",))
    if not files:
      patterns = "/".join("*" + s for s in TEXT_SUFFIXES)
      raise ValueError(f"data.path={path!r} is a directory with no {patterns} files (searched "
                       "recursively).")
    return files
  if any(c in path for c in _GLOB_CHARS):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise FileNotFoundError(f"data.path={path!r}: the glob matches no files.")
    return files
  raise FileNotFoundError(f"data.path={path!r} does not exist (expected a text file, a directory of "
                          "*.py/*.txt files, or a glob).")


def _select(files: Sequence[str], max_bytes: int) -> List[os.stat_result]:
  """Stats of the leading files needed to reach `max_bytes` (with separators)."""
  stats = []
  total = 0
  for f in files:
    st = os.stat(f)
    stats.append(st)
    total += st.st_size + len(SEPARATOR)
    if total >= max_bytes:
      break
  return stats


def load_corpus(files: Sequence[str], max_bytes: int, cache_dir: Optional[str] = None) -> np.ndarray:
  """The corpus bytes (uint8 (≤ max_bytes,)): files joined with NUL and cut at `max_bytes`, cached."""
  check_int("data.max_bytes", max_bytes, minimum=1)
  stats = _select(files, max_bytes)
  used = files[:len(stats)]
  key = hashlib.sha1(repr((_CACHE_VERSION, max_bytes, [(os.path.abspath(f), st.st_size, st.st_mtime_ns)
                                                       for f, st in zip(used, stats)])).encode()).hexdigest()
  cache_path = os.path.join(cache_dir, "mlm", f"{key}.npy") if cache_dir else None
  if cache_path and os.path.isfile(cache_path):
    try:
      return np.load(cache_path)
    except (OSError, ValueError):
      pass  # Rebuild a corrupt cache entry.
  parts = []
  total = 0
  for f in used:
    with open(f, "rb") as fh:
      data = fh.read()
    parts.append(data)
    parts.append(SEPARATOR)
    total += len(data) + len(SEPARATOR)
    if total >= max_bytes:
      break
  if parts:
    parts.pop()  # No separator after the last file.
  arr = np.frombuffer(b"".join(parts), dtype=np.uint8)[:max_bytes].copy()
  if cache_path and arr.size:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = f"{cache_path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, cache_path)
  return arr


def next_byte_row(tokens: np.ndarray):
  """The causal-LM example of one row: position t predicts byte t + 1.

  Args:
    tokens: int32 (n,) byte ids, PAD_ID on padding.

  Returns:
    (inputs int32 (n,) = tokens, targets int32 (n,) = tokens shifted left with PAD_ID last, weights float32 (n,) =
    1 where the target is a real byte).
  """
  targets = np.concatenate([tokens[1:], np.full((1,), PAD_ID, tokens.dtype)])
  return tokens.copy(), targets, (targets != PAD_ID).astype(np.float32)


def mask_row(tokens: np.ndarray, rng: np.random.Generator, mask_rate: float):
  """BERT masking of one row.

  Args:
    tokens: int32 (n,) byte ids, PAD_ID on padding.
    rng: the row's generator.
    mask_rate: selection probability of a real position.

  Returns:
    (inputs int32 (n,), weights float32 (n,)).
  """
  n = tokens.shape[0]
  select = rng.random(n)
  kind = rng.random(n)
  random_bytes = rng.integers(0, 256, size=n, dtype=np.int32)
  chosen = (select < mask_rate) & (tokens != PAD_ID)
  inputs = tokens.copy()
  inputs[chosen & (kind < 0.8)] = MASK_ID
  rand = chosen & (kind >= 0.8) & (kind < 0.9)
  inputs[rand] = random_bytes[rand]
  return inputs, chosen.astype(np.float32)


class MLMDataset(Dataset):
  """Byte-level masked LM (see the module docstring).

  Batches: ``"inputs"`` int32 (b, max_len) masked ids, ``"targets"`` int32 (b, max_len) original ids
  (PAD on padding), ``"weights"`` float32 (b, max_len) = 1 on scored (selected) positions, ``"mask"`` bool
  (b, max_len) True on real (non-PAD) tokens. Eval batches add ``"valid"`` bool (b,).

  Args:
    path: corpus (None = the standard library; a file, directory or glob).
    seed: shuffling and masking seed.
    max_len: chunk length.
    num_train, num_eval: chunks used (None = the defaults of the module docstring).
    cache_dir: where the corpus ``.npy`` is cached (None = no cache; `make_dataset` always passes one).
    mask_rate: BERT selection rate (objective "mlm").
    max_bytes: at most this many corpus bytes are read.
    objective: "mlm" (BERT masking) | "causal" (next-byte prediction, for a causal LM).
  """

  EVAL_SPLITS = ("eval",)

  def __init__(self, *, path: Optional[str] = None, seed: int = 0, max_len: int = DEFAULT_MAX_LEN,
               num_train: Optional[int] = None, num_eval: Optional[int] = None,
               cache_dir: Optional[str] = None, mask_rate: float = DEFAULT_MASK_RATE,
               max_bytes: int = DEFAULT_MAX_BYTES, objective: str = "mlm"):
    check_int("data.seed", seed, minimum=0)
    check_int("data.max_len", max_len, minimum=1)
    check_int("data.num_train", num_train, minimum=1, allow_none=True)
    check_int("data.num_eval", num_eval, minimum=1, allow_none=True)
    check_int("data.max_bytes", max_bytes, minimum=1)
    check_rate("data.mask_rate", mask_rate, allow_zero=False)
    check_choice("data.objective", objective, OBJECTIVES)
    self.objective = objective
    self.files = list_files(path)
    corpus = load_corpus(self.files, max_bytes, cache_dir)
    if corpus.size == 0:
      raise ValueError(f"data.path={path!r}: the corpus is empty (all {len(self.files)} files have 0 "
                       "bytes).")
    self.max_len = int(max_len)
    self.mask_rate = float(mask_rate)
    num_chunks = -(-corpus.size // self.max_len)
    chunks = np.full((num_chunks * self.max_len,), PAD_ID, dtype=np.uint16)
    chunks[:corpus.size] = corpus
    self._chunks = chunks.reshape(num_chunks, self.max_len)
    if num_chunks < 2:
      raise ValueError(f"data.path={path!r}: the corpus has {corpus.size} bytes = {num_chunks} chunk of "
                       f"max_len={max_len}; at least 2 are needed (one train, one eval).")
    if num_eval is None:
      num_eval = min(MAX_DEFAULT_EVAL, max(1, num_chunks // 20))
    if num_eval >= num_chunks:
      raise ValueError(f"data.num_eval={num_eval} must be < the number of chunks ({num_chunks} = "
                       f"ceil({corpus.size} bytes / max_len {max_len})).")
    eval_ids = np.unique(np.round(np.linspace(0, num_chunks - 1, num_eval)).astype(np.int64))
    train_ids = np.setdiff1d(np.arange(num_chunks), eval_ids)
    if num_train is not None:
      if num_train > train_ids.size:
        raise ValueError(f"data.num_train={num_train} exceeds the {train_ids.size} train chunks "
                         f"(corpus {corpus.size} bytes, max_len={max_len}, num_eval={num_eval}); "
                         "raise data.max_bytes or lower data.num_train.")
      train_ids = train_ids[:num_train]
    self.train_ids, self.eval_ids = train_ids, eval_ids
    self.corpus_bytes = int(corpus.size)
    super().__init__(seed=seed, num_train=int(train_ids.size))
    self.info = {
        "kind": "mlm",
        "vocab_size": VOCAB_SIZE,
        "max_len": self.max_len,
        "num_train": int(train_ids.size),
        "num_eval": int(eval_ids.size),
        "pad_id": PAD_ID,
        "mask_id": MASK_ID,
        "mask_rate": self.mask_rate,
        "objective": self.objective,
        "corpus_bytes": self.corpus_bytes,
        "num_files": len(self.files),
    }
    self.info["unigram_perplexity"] = self._unigram_perplexity()

  def _unigram_perplexity(self) -> float:
    counts = np.bincount(self._chunks[self.train_ids].ravel(), minlength=VOCAB_SIZE)[:256] + 1.0
    logp = np.log(counts / counts.sum())
    total, num = 0.0, 0.0
    for i in range(self.eval_ids.size):
      tokens = self._chunks[self.eval_ids[i]].astype(np.int32)
      if self.objective == "causal":
        _, targets, w = next_byte_row(tokens)
      else:
        targets = tokens
        _, w = mask_row(tokens, row_rng(self.seed, EVAL_STREAM, 0, i), self.mask_rate)
      sel = w > 0
      total -= float(logp[targets[sel]].sum())
      num += float(sel.sum())
    return float(np.exp(total / max(num, 1.0)))

  def _make(self, chunk_ids: np.ndarray, rngs) -> Batch:
    tokens = self._chunks[chunk_ids].astype(np.int32)
    if self.objective == "causal":
      inputs, targets, weights = (np.stack(parts) for parts in zip(*(next_byte_row(row) for row in tokens)))
      return {"inputs": inputs, "targets": targets, "weights": weights, "mask": inputs != PAD_ID}
    inputs = np.empty_like(tokens)
    weights = np.empty(tokens.shape, dtype=np.float32)
    for r, rng in enumerate(rngs):
      inputs[r], weights[r] = mask_row(tokens[r], rng, self.mask_rate)
    return {"inputs": inputs, "targets": tokens, "weights": weights, "mask": tokens != PAD_ID}

  def _train_examples(self, indices: np.ndarray, step: int, rows: np.ndarray) -> Batch:
    return self._make(self.train_ids[indices],
                      (row_rng(self.seed, TRAIN_STREAM, step, r) for r in rows))

  def _num_eval_examples(self, split: str) -> int:
    return int(self.eval_ids.size)

  def _eval_examples(self, indices: np.ndarray, split: str) -> Batch:
    return self._make(self.eval_ids[indices],
                      (row_rng(self.seed, EVAL_STREAM, 0, i) for i in indices))
