"""ListOps (Long Range Arena): a seeded re-implementation of the LRA generator, LRA TSV I/O, tokeniser.

Generator (``lra_benchmarks/data/listops.py``, task ``basic``): a tree node at depth < max_depth is an
operator with probability 0.25, otherwise (and always at depth == max_depth) a digit 0–9. An operator
node has ``randint(2, max_args)`` children and an operator drawn uniformly from
``[MIN [MAX [MED [SM``; it prints as left-nested pairs,

    MAX(2, 9) → ``( ( ( [MAX 2 ) 9 ) ] )``

and its length (tokens without parentheses) is 2 + the children's lengths. Labels: MIN, MAX,
MED = ``int(np.median(args))`` (the floor of the mean of the two middle values for an even count),
SM = ``sum(args) % 10``: 10 classes. Trees with ``min_tree_length < length < max_tree_length`` (strict)
are kept unless already seen (deduplicated with a set of strings), in insertion order until
``num_train + num_val + num_test`` are found; the first `num_train` are train, the next `num_val` val,
the last `num_test` test. LRA defaults: 96,000 / 2,000 / 2,000, lengths (500, 2000), depth 10, 10 args.

The tree lengths `min_tree_length` / `max_tree_length` (``data.min_tree_length`` / ``data.max_tree_length``,
called ``min_length`` / ``max_length`` before) bound the generated trees; they are not the model's sequence
length ``data.max_len``, to which every example is truncated or padded.

Difference from LRA: LRA draws from Python's *unseeded* ``random`` module and splits in (hash-dependent)
set order; here every draw comes from ``np.random.default_rng(seed)`` (one uniform per decision) and the
split follows insertion order, so a seed gives the same data set on every machine. The distribution of
trees is the same. Trees that grow past `max_tree_length` are abandoned as soon as they do (they would be
rejected anyway).

Files (LRA format): ``basic_train.tsv``, ``basic_val.tsv``, ``basic_test.tsv``, each with the header
``Source<TAB>Target`` and one ``<tree string><TAB><label>`` row per example. ``data.path`` may point at a
directory with LRA's original files; generated sets are cached in
``<cache_dir>/listops/<key>/`` (TSVs plus an encoded ``encoded.npz``).

Tokenisation (as LRA's ``listops/input_pipeline.py``): drop ``(`` and ``)``, ``]`` → ``X``, split on
whitespace; then a FIXED vocabulary (LRA's is built from a set, so its order varies between runs):

    0 <pad>, 1..10 digits "0".."9", 11 "[MIN", 12 "[MAX", 13 "[MED", 14 "[SM", 15 "X", 16 <oov>

`VOCAB_SIZE` = 17 (LRA: also 17 = 15 tokens + pad + OOV). Sequences are truncated/padded with 0 to
`max_len` (2000 in LRA; the classifier prepends CLS itself).
"""
from __future__ import annotations

import csv
import itertools
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from linformer_jax._validate import check_int
from linformer_jax.data.base import Batch, Dataset, atomic_save_npz, resolve_cache_dir

#: The operator tokens, in vocabulary order.
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
#: A node below ``max_depth`` is an operator when its uniform draw ``r <= VALUE_P``, else a digit leaf (as LRA).
VALUE_P = 0.25
#: The LRA ListOps task name, the prefix of the TSV file names.
TASK = "basic"
#: File name of each split's TSV (LRA naming).
SPLIT_FILES = {"train": f"{TASK}_train.tsv", "val": f"{TASK}_val.tsv", "test": f"{TASK}_test.tsv"}
#: The header row of an LRA ListOps TSV file.
HEADER = ("Source", "Target")
#: Number of label classes (the values 0–9).
NUM_CLASSES = 10

#: Token id of padding.
PAD_ID = 0
#: The fixed vocabulary: ``VOCAB[i]`` is the token of id ``i``.
VOCAB: Tuple[str, ...] = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("X", "<oov>")
#: Token → id for the real tokens (``<pad>`` and ``<oov>`` excluded).
TOKEN_TO_ID: Dict[str, int] = {t: i for i, t in enumerate(VOCAB) if not t.startswith("<")}
#: Token id of any token not in the vocabulary.
OOV_ID = VOCAB.index("<oov>")
#: Size of the vocabulary (17).
VOCAB_SIZE = len(VOCAB)

#: LRA's number of examples per split.
DEFAULT_COUNTS = {"train": 96_000, "val": 2_000, "test": 2_000}
#: LRA's lower bound on a tree's length (kept trees are strictly longer).
DEFAULT_MIN_TREE_LENGTH = 500
#: LRA's upper bound on a tree's length (kept trees are strictly shorter).
DEFAULT_MAX_TREE_LENGTH = 2000
#: LRA's maximum tree depth.
DEFAULT_MAX_DEPTH = 10
#: LRA's maximum number of arguments of an operator.
DEFAULT_MAX_ARGS = 10
#: LRA's model sequence length: every example is truncated or padded to it.
DEFAULT_MAX_LEN = 2000

#: Arguments renamed so that the tree lengths cannot be confused with the model's ``max_len``: old → new name.
RENAMED_ARGS = {"min_length": "min_tree_length", "max_length": "max_tree_length"}

_CACHE_VERSION = 1
_PAREN_TABLE = str.maketrans({"(": " ", ")": " ", "]": "X"})
_CHUNK = 1 << 16


class _TooLong(Exception):
  pass


def longest_tree_length(max_depth: int, max_args: int) -> int:
  """The longest possible tree: every node above max_depth an operator with max_args children."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def renamed_arg_error(old: str) -> ValueError:
  """The error for a renamed ListOps argument `old` (a key of `RENAMED_ARGS`)."""
  new = RENAMED_ARGS[old]
  return ValueError(f"data.{old} was renamed to data.{new} (ListOps tree lengths: kept trees have "
                    "min_tree_length < tokens < max_tree_length; the model's sequence length is data.max_len).")


def _reject_unknown_kwargs(where: str, kwargs: Dict[str, object]) -> None:
  """ValueError for a renamed argument, TypeError (as Python's) for any other unexpected keyword."""
  for key in kwargs:
    if key in RENAMED_ARGS:
      raise renamed_arg_error(key)
  if kwargs:
    raise TypeError(f"{where}() got an unexpected keyword argument {next(iter(kwargs))!r}")


def check_generator_args(min_tree_length: int, max_tree_length: int, max_depth: int, max_args: int) -> None:
  """Validates the generator settings (names as in the data config)."""
  check_int("data.min_tree_length", min_tree_length, minimum=0)
  check_int("data.max_tree_length", max_tree_length, minimum=2)
  check_int("data.max_depth", max_depth, minimum=1)
  check_int("data.max_args", max_args, minimum=2)
  if max_tree_length - min_tree_length < 2:
    raise ValueError(f"data.min_tree_length={min_tree_length} and data.max_tree_length={max_tree_length} leave no "
                     "length: kept trees satisfy min_tree_length < length < max_tree_length (strict), so "
                     "max_tree_length must be >= min_tree_length + 2.")
  longest = longest_tree_length(max_depth, max_args)
  if longest <= min_tree_length:
    raise ValueError(f"data.min_tree_length={min_tree_length} is unreachable: with data.max_depth={max_depth} and "
                     f"data.max_args={max_args} the longest tree has {longest} tokens.")


def generate(num_examples: int, *, seed: int, min_tree_length: int = DEFAULT_MIN_TREE_LENGTH,
             max_tree_length: int = DEFAULT_MAX_TREE_LENGTH, max_depth: int = DEFAULT_MAX_DEPTH,
             max_args: int = DEFAULT_MAX_ARGS, max_attempts: Optional[int] = None, **renamed
             ) -> Tuple[List[str], List[int]]:
  """Generates `num_examples` distinct ListOps trees (see the module docstring).

  Randomness: one stream of uniforms ``np.random.default_rng(seed).random(...)``; every decision takes
  the next uniform u: operator iff u <= 0.25 (at depth < max_depth), children ``2 + int(u*(max_args-1))``,
  operator ``OPERATORS[int(4u)]`` (drawn after the children, as in LRA), digit ``int(10u)``. Two passes
  per tree: a cheap length-only pass that gives up once the length reaches `max_tree_length`, then, only
  for trees of an accepted length, a pass over the same uniforms that builds the string and its value.

  Args:
    num_examples: how many distinct trees to keep.
    seed: seed of ``np.random.default_rng``.
    min_tree_length, max_tree_length: keep ``min_tree_length < length < max_tree_length`` (tokens without
      parentheses).
    max_depth, max_args: tree depth limit (root = depth 1) and the most children of an operator.
    max_attempts: give up (RuntimeError) after this many trees; default ``1000 * num_examples + 10**6``.
    **renamed: only to reject the old names ``min_length`` / ``max_length`` with a ValueError naming the new
      ones.

  Returns:
    (sources, labels): lists of tree strings (LRA format, with parentheses) and int labels 0..9, in
    insertion order.
  """
  _reject_unknown_kwargs("generate", renamed)
  check_int("num_examples", num_examples, minimum=0)
  check_int("data.seed", seed, minimum=0)
  check_generator_args(min_tree_length, max_tree_length, max_depth, max_args)
  if max_attempts is None:
    max_attempts = 1000 * num_examples + 10**6
  rng = np.random.default_rng(seed)
  span = max_args - 1
  # Most uniforms one tree can take before its length reaches max_tree_length (3 per node, 1 node per token).
  need = 3 * max_tree_length + 16
  buf: List[float] = []
  pos = 0
  count = 0
  digits = tuple(str(d) for d in range(10))

  def size(depth: int) -> None:
    """Length-only pass from an operator node's first child count: advances pos, adds to count.

    Called after the node's leaf/operator uniform; raises _TooLong once count reaches max_tree_length.
    Leaf children are handled inline (3/4 of all nodes) to save calls.
    """
    nonlocal pos, count
    m = 2 + int(buf[pos] * span)
    pos += 1
    count += 2
    child_can_branch = depth + 1 < max_depth
    for _ in range(m):
      if child_can_branch:
        r = buf[pos]
        pos += 1
        if r <= VALUE_P:
          size(depth + 1)
          continue
      count += 1
      if count >= max_tree_length:
        raise _TooLong
      pos += 1  # The digit.
    pos += 1  # The operator.

  def build(depth: int) -> Tuple[str, int]:
    """Second pass over the same uniforms for an operator node: (string, value)."""
    nonlocal pos
    m = 2 + int(buf[pos] * span)
    pos += 1
    child_can_branch = depth + 1 < max_depth
    strs = []
    vals = []
    for _ in range(m):
      if child_can_branch:
        r = buf[pos]
        pos += 1
        if r <= VALUE_P:
          s, v = build(depth + 1)
          strs.append(s)
          vals.append(v)
          continue
      d = int(buf[pos] * 10)
      pos += 1
      strs.append(digits[d])
      vals.append(d)
    op = int(buf[pos] * 4)
    pos += 1
    if op == 0:
      value = min(vals)
    elif op == 1:
      value = max(vals)
    elif op == 2:
      vals.sort()
      h = m // 2
      value = vals[h] if m % 2 else (vals[h - 1] + vals[h]) // 2
    else:
      value = sum(vals) % 10
    return "( " * (m + 1) + OPERATORS[op] + " " + " ) ".join(strs) + " ) ] )", value

  def root_size() -> None:
    nonlocal pos, count
    if max_depth > 1:
      r = buf[pos]
      pos += 1
      if r <= VALUE_P:
        size(1)
        return
    count = 1  # A single digit.
    if count >= max_tree_length:
      raise _TooLong
    pos += 1

  def root_build() -> Tuple[str, int]:
    nonlocal pos
    if max_depth > 1:
      r = buf[pos]
      pos += 1
      if r <= VALUE_P:
        return build(1)
    d = int(buf[pos] * 10)
    pos += 1
    return digits[d], d

  seen = set()
  sources: List[str] = []
  labels: List[int] = []
  attempts = 0
  limit = sys.getrecursionlimit()
  if max_depth + 100 > limit:
    sys.setrecursionlimit(max_depth + 200)
  try:
    while len(sources) < num_examples:
      attempts += 1
      if attempts > max_attempts:
        raise RuntimeError(
            f"ListOps generation found only {len(sources)} of {num_examples} distinct trees with "
            f"{min_tree_length} < length < {max_tree_length} in {max_attempts} attempts "
            f"(max_depth={max_depth}, max_args={max_args}); widen the length range or lower num_train/num_eval.")
      if len(buf) - pos < need:
        buf = buf[pos:] + rng.random(_CHUNK).tolist()
        pos = 0
      start = pos
      count = 0
      try:
        root_size()
      except _TooLong:
        continue  # The stream continues after the abandoned tree's last uniform.
      if min_tree_length < count < max_tree_length:
        end = pos
        pos = start
        s, v = root_build()
        assert pos == end
        if s not in seen:
          seen.add(s)
          sources.append(s)
          labels.append(v)
  finally:
    if sys.getrecursionlimit() != limit:
      sys.setrecursionlimit(limit)
  return sources, labels


# ---- TSV I/O ------------------------------------------------------------------------------------------
def write_tsv(path: str, sources: Sequence[str], labels: Sequence[int]) -> None:
  """Writes LRA's TSV (header ``Source<TAB>Target``) atomically (temporary file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write("Source\tTarget\n")
    for s, y in zip(sources, labels):
      f.write(f"{s}\t{int(y)}\n")
  os.replace(tmp, path)


def read_tsv(path: str, limit: Optional[int] = None) -> Tuple[List[str], List[int]]:
  """Reads an LRA ListOps TSV: header ``Source<TAB>Target``, rows ``<tree><TAB><label 0..9>``.

  Accepts ``\\n`` and ``\\r\\n`` line ends (LRA writes with Python's csv module). Reads at most `limit`
  rows (None = all). Raises FileNotFoundError if `path` is missing, ValueError naming the file and line
  on a bad header or row.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ListOps TSV file not found: {path!r}.")
  sources: List[str] = []
  labels: List[int] = []
  with open(path, "r", encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
    try:
      header = next(reader, None)
    except csv.Error as e:
      raise ValueError(f"{path}: line 1: unreadable TSV header ({e}).") from None
    if header is None or tuple(h.strip() for h in header) != HEADER:
      raise ValueError(f"{path}: line 1: expected the header 'Source<TAB>Target', got {header!r}.")
    while limit is None or len(sources) < limit:
      try:
        row = next(reader, None)
      except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: malformed TSV row ({e}).") from None
      if row is None:
        break
      if not row or (len(row) == 1 and not row[0].strip()):
        continue  # Blank line.
      if len(row) != 2:
        raise ValueError(f"{path}: line {reader.line_num}: expected 2 tab-separated fields "
                         f"(Source, Target), got {len(row)}.")
      target = row[1].strip()
      if target not in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"):
        raise ValueError(f"{path}: line {reader.line_num}: Target must be an integer 0..9, got "
                         f"{row[1]!r}.")
      sources.append(row[0])
      labels.append(int(target))
  return sources, labels


# ---- tokeniser ----------------------------------------------------------------------------------------
def tokenize(source: str) -> List[str]:
  """LRA's tokenisation: drop ``(`` and ``)``, ``]`` → ``X``, split on whitespace."""
  return source.translate(_PAREN_TABLE).split()


def encode(source: str) -> np.ndarray:
  """Token ids (int32 (n,)) of one tree string under the fixed vocabulary (unknown → `OOV_ID`)."""
  get = TOKEN_TO_ID.get
  return np.asarray([get(t, OOV_ID) for t in tokenize(source)], dtype=np.int32)


def encode_many(sources: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Ragged encoding of many strings: (tokens uint8 (total,), offsets int64 (N + 1,)).

  Example i is ``tokens[offsets[i]:offsets[i + 1]]``.
  """
  get = TOKEN_TO_ID.get
  lengths = np.zeros(len(sources) + 1, dtype=np.int64)
  token_lists = [s.translate(_PAREN_TABLE).split() for s in sources]
  lengths[1:] = [len(t) for t in token_lists]
  offsets = np.cumsum(lengths)
  flat = itertools.chain.from_iterable(token_lists)
  tokens = np.fromiter(map(get, flat, itertools.repeat(OOV_ID)), dtype=np.uint8, count=int(offsets[-1]))
  return tokens, offsets


def decode(ids: Sequence[int]) -> str:
  """Token ids → space-separated tokens (padding dropped)."""
  return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


class _Split:
  """One encoded split: ragged tokens + labels."""

  def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
    self.tokens = tokens
    self.offsets = offsets
    self.labels = labels.astype(np.int32)

  @classmethod
  def from_sources(cls, sources: Sequence[str], labels: Sequence[int]) -> "_Split":
    tokens, offsets = encode_many(sources)
    return cls(tokens, offsets, np.asarray(labels, dtype=np.int32))

  def __len__(self) -> int:
    return len(self.labels)

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def batch(self, indices: np.ndarray, max_len: int) -> Batch:
    b = len(indices)
    inputs = np.zeros((b, max_len), dtype=np.int32)
    for r, i in enumerate(indices):
      lo = self.offsets[i]
      n = min(int(self.offsets[i + 1] - lo), max_len)
      inputs[r, :n] = self.tokens[lo:lo + n]
    return {"inputs": inputs, "mask": inputs != PAD_ID, "label": self.labels[indices].copy()}


def cache_key(seed: int, counts: Dict[str, int], min_tree_length: int, max_tree_length: int, max_depth: int,
              max_args: int) -> str:
  """Directory name of a generated set under ``<cache_dir>/listops/``.

  Unchanged by the renaming of min_length / max_length: ``..._len{min_tree_length}-{max_tree_length}_...``,
  so sets cached before it are reused.
  """
  return (f"v{_CACHE_VERSION}_seed{seed}_n{counts['train']}-{counts['val']}-{counts['test']}"
          f"_len{min_tree_length}-{max_tree_length}_d{max_depth}_a{max_args}")


def generate_to_dir(out_dir: str, *, seed: int, counts: Dict[str, int], min_tree_length: int,
                    max_tree_length: int, max_depth: int, max_args: int) -> Dict[str, _Split]:
  """Generates a set, writes the three TSVs and ``encoded.npz`` into `out_dir`; returns the splits."""
  total = counts["train"] + counts["val"] + counts["test"]
  sources, labels = generate(total, seed=seed, min_tree_length=min_tree_length,
                             max_tree_length=max_tree_length, max_depth=max_depth, max_args=max_args)
  bounds = {"train": (0, counts["train"]),
            "val": (counts["train"], counts["train"] + counts["val"]),
            "test": (counts["train"] + counts["val"], total)}
  splits = {}
  arrays = {}
  for name, (lo, hi) in bounds.items():
    write_tsv(os.path.join(out_dir, SPLIT_FILES[name]), sources[lo:hi], labels[lo:hi])
    split = _Split.from_sources(sources[lo:hi], labels[lo:hi])
    splits[name] = split
    arrays.update({f"{name}_tokens": split.tokens, f"{name}_offsets": split.offsets,
                   f"{name}_labels": split.labels})
  atomic_save_npz(os.path.join(out_dir, "encoded.npz"), **arrays)
  return splits


def _load_encoded(path: str) -> Optional[Dict[str, _Split]]:
  try:
    with np.load(path) as z:
      return {name: _Split(z[f"{name}_tokens"], z[f"{name}_offsets"], z[f"{name}_labels"])
              for name in ("train", "val", "test")}
  except (OSError, KeyError, ValueError):
    return None


class ListOpsDataset(Dataset):
  """ListOps classification (10 classes) with the `Dataset` interface.

  Batches: ``"inputs"`` int32 (b, max_len) token ids padded with 0, ``"mask"`` bool (b, max_len)
  True = real token, ``"label"`` int32 (b,). Eval batches add ``"valid"`` bool (b,).
  `eval_batches(split="val")` (default) or ``split="test"``.

  Args:
    path: None = generate (cached under `cache_dir`); else a directory with LRA's
      ``basic_{train,val,test}.tsv`` (the test file is only needed for ``split="test"``).
    seed: generator seed (when generating) and shuffling seed.
    max_len: sequence length (truncate / pad).
    num_train, num_eval, num_test: examples used (None = all in the files, or 96,000 / 2,000 / 2,000 when
      generating; num_test None = num_eval when generating).
    cache_dir: where generated sets are cached.
    min_tree_length, max_tree_length: keep trees with ``min_tree_length < tokens < max_tree_length`` (the
      generator's tree lengths, not `max_len`; ignored when `path` is given).
    max_depth, max_args: the other generator settings (ignored when `path` is given).
    **renamed: only to reject the old names ``min_length`` / ``max_length`` with a ValueError naming the new
      ones.
  """

  EVAL_SPLITS = ("val", "test")

  def __init__(self, *, path: Optional[str] = None, seed: int = 0, max_len: int = DEFAULT_MAX_LEN,
               num_train: Optional[int] = None, num_eval: Optional[int] = None,
               num_test: Optional[int] = None, cache_dir: Optional[str] = None,
               min_tree_length: int = DEFAULT_MIN_TREE_LENGTH, max_tree_length: int = DEFAULT_MAX_TREE_LENGTH,
               max_depth: int = DEFAULT_MAX_DEPTH, max_args: int = DEFAULT_MAX_ARGS, **renamed):
    _reject_unknown_kwargs(type(self).__name__, renamed)
    check_int("data.seed", seed, minimum=0)
    check_int("data.max_len", max_len, minimum=1)
    check_int("data.num_train", num_train, minimum=1, allow_none=True)
    check_int("data.num_eval", num_eval, minimum=1, allow_none=True)
    check_int("data.num_test", num_test, minimum=1, allow_none=True)
    self.max_len = int(max_len)
    self._test: Optional[_Split] = None
    self._test_path: Optional[str] = None
    self._num_test = num_test
    self.source_dir: str
    if path is not None:
      path = os.path.expanduser(str(path))
      if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={path!r} is not a directory; for ListOps it must be a "
                                f"directory holding LRA's {', '.join(SPLIT_FILES.values())}.")
      for name in ("train", "val"):
        f = os.path.join(path, SPLIT_FILES[name])
        if not os.path.isfile(f):
          raise FileNotFoundError(f"ListOps file {f!r} not found (data.path={path!r} must hold "
                                  f"{', '.join(SPLIT_FILES.values())}).")
      self.source_dir = path
      train = _Split.from_sources(*read_tsv(os.path.join(path, SPLIT_FILES["train"]), num_train))
      val = _Split.from_sources(*read_tsv(os.path.join(path, SPLIT_FILES["val"]), num_eval))
      for name, split, want in (("train", train, num_train), ("val", val, num_eval)):
        if len(split) == 0:
          raise ValueError(f"ListOps file {os.path.join(path, SPLIT_FILES[name])!r} has no examples.")
        if want is not None and len(split) < want:
          raise ValueError(f"data.num_{'train' if name == 'train' else 'eval'}={want} but "
                           f"{os.path.join(path, SPLIT_FILES[name])!r} has only {len(split)} examples.")
      self._test_path = os.path.join(path, SPLIT_FILES["test"])
    else:
      check_generator_args(min_tree_length, max_tree_length, max_depth, max_args)
      counts = {"train": DEFAULT_COUNTS["train"] if num_train is None else int(num_train),
                "val": DEFAULT_COUNTS["val"] if num_eval is None else int(num_eval)}
      counts["test"] = counts["val"] if num_test is None else int(num_test)
      if cache_dir is None:
        cache_dir = resolve_cache_dir(None, None)
      out_dir = os.path.join(str(cache_dir), "listops",
                             cache_key(seed, counts, min_tree_length, max_tree_length, max_depth, max_args))
      self.source_dir = out_dir
      splits = _load_encoded(os.path.join(out_dir, "encoded.npz"))
      if splits is None:
        splits = generate_to_dir(out_dir, seed=seed, counts=counts, min_tree_length=min_tree_length,
                                 max_tree_length=max_tree_length, max_depth=max_depth, max_args=max_args)
      train, val, self._test = splits["train"], splits["val"], splits["test"]
    super().__init__(seed=seed, num_train=len(train))
    self._train, self._val = train, val
    counts_val = np.bincount(val.labels, minlength=NUM_CLASSES)
    self.info = {
        "kind": "classification",
        "num_classes": NUM_CLASSES,
        "vocab_size": VOCAB_SIZE,
        "max_len": self.max_len,
        "num_train": len(train),
        "num_eval": len(val),
        "majority_accuracy": float(counts_val.max() / len(val)),
        "outer_operator_accuracy": self.outer_operator_accuracy("val"),
        "pad_id": PAD_ID,
        "oov_id": OOV_ID,
        "vocab": VOCAB,
    }

  def _split(self, split: str) -> _Split:
    if split == "val":
      return self._val
    if self._test is None:
      assert self._test_path is not None
      self._test = _Split.from_sources(*read_tsv(self._test_path, self._num_test))
      if len(self._test) == 0:
        raise ValueError(f"ListOps file {self._test_path!r} has no examples.")
    return self._test

  def _num_eval_examples(self, split: str) -> int:
    return len(self._split(split))

  def _train_examples(self, indices: np.ndarray, step: int, rows: np.ndarray) -> Batch:
    del step, rows  # No per-example randomness.
    return self._train.batch(indices, self.max_len)

  def _eval_examples(self, indices: np.ndarray, split: str) -> Batch:
    return self._split(split).batch(indices, self.max_len)

  def outer_operator_accuracy(self, split: str = "val") -> float:
    """Accuracy on `split` of a lookup table: the most frequent training label for each outermost operator.

    A model that has learned only which operator is outermost (``[MAX`` → 9, ``[MIN`` → 0, …) scores this;
    it depends on the length range (longer trees push MAX/MIN further to 9/0). At LRA's lengths 500–2000 it
    is ≈ 36 %, which is where LRA's Transformer and Linformer land (docs/ablations.md).
    """
    def first_tokens(sp: _Split) -> np.ndarray:  # OOV for an empty example
      if len(sp.tokens) == 0:
        return np.full(len(sp), OOV_ID)
      first = sp.tokens[np.minimum(sp.offsets[:-1], len(sp.tokens) - 1)]
      return np.where(sp.lengths() > 0, first, OOV_ID)

    train_ops, train_labels = first_tokens(self._train), self._train.labels
    table = np.full(VOCAB_SIZE, int(np.bincount(train_labels, minlength=NUM_CLASSES).argmax()))
    for op in np.unique(train_ops):
      table[op] = int(np.bincount(train_labels[train_ops == op], minlength=NUM_CLASSES).argmax())
    target = self._split(split)
    return float(np.mean(table[first_tokens(target)] == target.labels))

  def lengths(self, split: str = "train") -> np.ndarray:
    """Token counts (before truncation) of a split ("train", "val", "test"), int64 (N,)."""
    return self._train.lengths() if split == "train" else self._split(split).lengths()

