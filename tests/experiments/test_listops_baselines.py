"""experiments.listops_baselines: the tree features, the lookup-table accuracy on hand-made data, and a quick run
whose outermost-operator row equals the dataset's own (separately written) outermost-operator baseline."""
import json

import pytest

from experiments import listops_baselines as lb
from linformer_jax.data.listops import ListOpsDataset


def test_features_direct_digits_need_the_bracket_depth():
  # LRA format (with parentheses): [MAX 2 [MIN 3 4 ] 5 ]
  src = "( ( ( ( [MAX 2 ) ( ( ( [MIN 3 ) 4 ) ] ) ) 5 ) ] )"
  assert lb.features(src) == ("[MAX", [2, 3, 4, 5], [2, 5])
  assert lb.features("7") == ("", [7], [7])
  assert lb._op_stat("[SM", [9, 4, 5]) == 8 and lb._op_stat("[MED", [1, 9, 3, 4]) == 3
  assert lb._op_stat("[MAX", []) == -1


def test_lookup_accuracy_by_hand():
  f = lambda op: (op, [], [])
  train = [(f("[MAX"), 9), (f("[MAX"), 9), (f("[MAX"), 7), (f("[MIN"), 0), (f("[MIN"), 1), (f("[SM"), 3)]
  test = [(f("[MAX"), 9), (f("[MAX"), 7), (f("[MIN"), 0), (f("[MED"), 9)]
  # [MAX → 9 (2 of 3); [MIN → tie 0/1 → 0; [MED unseen → overall majority 9: hits 1, 0, 1, 1
  assert lb.lookup_accuracy(lambda x: (x[0],), train, test) == pytest.approx(0.75)
  assert lb.lookup_accuracy(lambda x: (), train, test) == pytest.approx(0.5)  # always 9


def test_quick_run_matches_the_dataset_baseline(tmp_path):
  doc = lb.main(["--out", str(tmp_path), "--quick", "--min_tree_length", "20", "--max_tree_length", "60", "--cache_dir",
                 str(tmp_path / "cache")])
  ds = ListOpsDataset(seed=0, max_len=60, num_train=2000, num_eval=500, num_test=500, min_tree_length=20,
                      max_tree_length=60, cache_dir=str(tmp_path / "other_cache"))  # generated again, independently
  acc = {r["baseline"]: r["test_accuracy"] for r in doc["rows"]}
  assert acc["outermost operator"] == pytest.approx(ds.outer_operator_accuracy("test"))
  assert acc["outermost operator + its operation over its direct digits"] > acc["outermost operator"]
  assert json.loads((tmp_path / "listops_baselines.json").read_text())["num_test"] == 500
  assert "| outermost operator | " in (tmp_path / "listops_baselines.md").read_text()
