"""What a ListOps accuracy means: lookup tables from simple features of the tree to the label.

    python -m experiments.listops_baselines --out DIR [--quick] [--min_tree_length 50 --max_tree_length 200 ...]

Each baseline maps a feature of the input (the outermost operator; that operator plus statistics of *all* digits;
that operator plus statistics of its *direct* digit arguments, which needs the bracket depth) to the most frequent
training label for that feature value, and is scored on the test split. The data are the generated splits that the
`lra_listops` sweep uses for the same arguments (``ListOpsDataset``, the same seed and cache), so the numbers sit
beside that sweep's test accuracies. Writes ``DIR/listops_baselines.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
from typing import Callable, List, Sequence, Tuple

import numpy as np

from linformer_jax.data.listops import OPERATORS, RENAMED_ARGS, SPLIT_FILES, ListOpsDataset, read_tsv, tokenize

Features = Tuple[str, List[int], List[int]]  # (outermost operator, all digits, direct digit arguments)


def features(source: str) -> Features:
  """(outermost operator token, every digit in order, the digits at bracket depth 1) of one tree string."""
  tokens = tokenize(source)
  if not tokens:
    return "", [], []
  depth, digits, direct = 0, [], []
  for t in tokens:
    if t in OPERATORS:
      depth += 1
    elif t == "X":
      depth -= 1
    else:
      digits.append(int(t))
      if depth <= 1:  # a bare digit (depth 0) is its own value
        direct.append(int(t))
  return (tokens[0] if tokens[0] in OPERATORS else ""), digits, direct


def _op_stat(op: str, values: Sequence[int]) -> int:
  if not values:
    return -1
  return {"[MAX": max(values), "[MIN": min(values), "[MED": int(np.median(values)),
          "[SM": sum(values) % 10}.get(op, -1)


BASELINES: Tuple[Tuple[str, Callable[[Features], tuple]], ...] = (
    ("majority class", lambda f: ()),
    ("outermost operator", lambda f: (f[0],)),
    ("outermost operator + max, min of all digits", lambda f: (f[0], max(f[1], default=-1), min(f[1], default=-1))),
    ("outermost operator + its operation over all digits", lambda f: (f[0], _op_stat(f[0], f[1]))),
    ("outermost operator + count, max, min of its direct digits",
     lambda f: (f[0], len(f[2]), max(f[2], default=-1), min(f[2], default=-1))),
    ("outermost operator + its operation over its direct digits", lambda f: (f[0], _op_stat(f[0], f[2]))),
)


def lookup_accuracy(key: Callable[[Features], tuple], train: Sequence[Tuple[Features, int]],
                    test: Sequence[Tuple[Features, int]]) -> float:
  """Accuracy on `test` of the table feature → most frequent training label (the overall majority label for a
  feature value never seen in training; ties → the smaller label)."""
  table = collections.defaultdict(collections.Counter)
  for f, label in train:
    table[key(f)][label] += 1
  overall = collections.Counter(label for _, label in train)
  best = lambda c: min(c, key=lambda label: (-c[label], label))
  hits = [(best(table[key(f)]) if key(f) in table else best(overall)) == label for f, label in test]
  return float(np.mean(hits)) if hits else float("nan")


def run(out: str | os.PathLike, *, min_tree_length: int, max_tree_length: int, num_train: int, num_eval: int,
        num_test: int, seed: int = 0, cache_dir=None) -> dict:
  ds = ListOpsDataset(seed=seed, max_len=max_tree_length, num_train=num_train, num_eval=num_eval, num_test=num_test,
                      min_tree_length=min_tree_length, max_tree_length=max_tree_length, cache_dir=cache_dir)
  splits = {}
  for name in ("train", "test"):
    sources, labels = read_tsv(os.path.join(ds.source_dir, SPLIT_FILES[name]))
    splits[name] = [(features(s), int(label)) for s, label in zip(sources, labels)]
  rows = [{"baseline": name, "test_accuracy": lookup_accuracy(key, splits["train"], splits["test"])}
          for name, key in BASELINES]
  doc = {"min_tree_length": min_tree_length, "max_tree_length": max_tree_length, "num_train": len(splits["train"]),
         "num_test": len(splits["test"]), "seed": seed, "rows": rows}
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "listops_baselines.json").write_text(json.dumps(doc, indent=1))
  lines = [f"# ListOps lookup-table baselines (tree lengths {min_tree_length}–{max_tree_length}, "
           f"{doc['num_train']} train / {doc['num_test']} test examples, seed {seed})", "",
           "Each row: a table from the feature to the most frequent training label, scored on the test split.", "",
           "| baseline | test accuracy % |", "|---|---|"]
  lines += [f"| {r['baseline']} | {100 * r['test_accuracy']:.1f} |" for r in rows]
  (out / "listops_baselines.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return doc


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quick", action="store_true", help="2,000 / 500 examples (seconds)")
  p.add_argument("--min_tree_length", type=int, default=50, help="keep trees of more tokens than this")
  p.add_argument("--max_tree_length", type=int, default=200, help="keep trees of fewer tokens than this")
  for old in RENAMED_ARGS:  # the old flags, only to name the new ones
    p.add_argument(f"--{old}", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--num_train", type=int, default=96000)
  p.add_argument("--num_eval", type=int, default=2000)
  p.add_argument("--num_test", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_dir", default=None, help="where the generated data are cached (default "
                 "~/.cache/linformer_jax)")
  a = p.parse_args(argv)
  for old, new in RENAMED_ARGS.items():
    if getattr(a, old) is not None:
      p.error(f"--{old} was renamed to --{new} (ListOps tree lengths, as data.{new}).")
  if a.quick:
    a.num_train, a.num_eval, a.num_test = 2000, 500, 500
  return run(a.out, min_tree_length=a.min_tree_length, max_tree_length=a.max_tree_length, num_train=a.num_train,
             num_eval=a.num_eval, num_test=a.num_test, seed=a.seed, cache_dir=a.cache_dir)


if __name__ == "__main__":
  main()
