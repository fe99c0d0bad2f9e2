"""ListOps: generator vs an independent evaluator, lengths, dedup, TSV I/O, tokenisation, errors."""
import os

import numpy as np
import pytest

from linformer_jax.data import ListOpsDataset, default_data_config, make_dataset
from linformer_jax.data import listops

GEN = dict(min_tree_length=20, max_tree_length=100, max_depth=10, max_args=10)


def evaluate(source):
  """Independent evaluator: parses a tree string (with parentheses) with a stack."""
  stack = []  # Frames [op, args].
  result = None
  for tok in source.split():
    if tok in ("(", ")"):
      continue
    if tok.startswith("["):
      stack.append([tok, []])
    elif tok == "]":
      op, args = stack.pop()
      assert len(args) >= 2
      if op == "[MIN":
        value = min(args)
      elif op == "[MAX":
        value = max(args)
      elif op == "[MED":
        value = int(np.median(args))
      elif op == "[SM":
        value = sum(args) % 10
      else:
        raise AssertionError(op)
      if stack:
        stack[-1][1].append(value)
      else:
        result = value
    else:
      value = int(tok)
      if stack:
        stack[-1][1].append(value)
      else:
        result = value
  assert not stack
  return result


def n_tokens(source):
  return sum(tok not in ("(", ")") for tok in source.split())


@pytest.fixture(scope="module")
def generated():
  return listops.generate(400, seed=3, **GEN)


def test_labels_match_independent_evaluator(generated):
  sources, labels = generated
  assert len(sources) == 400
  for s, y in zip(sources, labels):
    assert evaluate(s) == y


def test_lengths_within_bounds_and_deduplicated(generated):
  sources, _ = generated
  lengths = np.array([n_tokens(s) for s in sources])
  assert lengths.min() > 20 and lengths.max() < 100
  assert len(set(sources)) == len(sources)
  # The ragged encoding counts the same tokens.
  _, offsets = listops.encode_many(sources)
  np.testing.assert_array_equal(np.diff(offsets), lengths)


def test_generator_is_seeded(generated):
  again = listops.generate(400, seed=3, **GEN)
  assert again == generated
  other, _ = listops.generate(50, seed=4, **GEN)
  assert other != generated[0][:50]
  # A prefix of a longer run: generation is sequential in insertion order.
  assert listops.generate(100, seed=3, **GEN)[0] == generated[0][:100]


def test_tree_format():
  # Every operator prints as left-nested pairs: ( ( ( [OP a ) b ) ] ).
  sources, _ = listops.generate(30, seed=0, min_tree_length=2, max_tree_length=12, max_depth=3, max_args=3)
  for s in sources:
    toks = s.split()
    assert toks.count("(") == toks.count(")")
    assert toks.count("]") == sum(t.startswith("[") for t in toks)
  s = "( ( ( [MAX 2 ) 9 ) ] )"
  assert evaluate(s) == 9 and listops.tokenize(s) == ["[MAX", "2", "9", "X"]


def test_median_floor():
  assert evaluate("( ( ( [MED 2 ) 7 ) ] )") == 4  # int(np.median([2, 7])) = int(4.5)


def test_fixed_vocabulary():
  assert listops.VOCAB == ("<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
                           "[MIN", "[MAX", "[MED", "[SM", "X", "<oov>")
  assert listops.VOCAB_SIZE == 17 and listops.PAD_ID == 0 and listops.OOV_ID == 16
  ids = listops.encode("( ( ( [MAX 2 ) 9 ) ] ) [FIRST")
  np.testing.assert_array_equal(ids, [12, 3, 10, 15, 16])
  assert listops.decode([12, 3, 10, 15, 0, 0]) == "[MAX 2 9 X"


def test_tsv_round_trip(tmp_path, generated):
  sources, labels = generated
  path = str(tmp_path / "basic_train.tsv")
  listops.write_tsv(path, sources, labels)
  with open(path) as f:
    assert f.readline() == "Source\tTarget\n"
  assert listops.read_tsv(path) == (sources, labels)
  assert listops.read_tsv(path, limit=7) == (sources[:7], labels[:7])


def _write_lra_dir(directory, rows_by_split, crlf=True):
  os.makedirs(directory, exist_ok=True)
  end = "\r\n" if crlf else "\n"
  for split, rows in rows_by_split.items():
    with open(os.path.join(directory, f"basic_{split}.tsv"), "w", newline="") as f:
      f.write("Source\tTarget" + end)
      for s, y in rows:
        f.write(f"{s}\t{y}{end}")


def test_reads_lra_style_directory(tmp_path):
  rows = {
      "train": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( ( [SM 5 ) 6 ) 7 ) ] )", 8),
                ("( ( ( [MIN ( ( ( [MED 1 ) 4 ) ] ) ) 3 ) ] )", 2)],
      "val": [("( ( ( [MIN 4 ) 1 ) ] )", 1), ("( ( ( [MED 4 ) 1 ) ] )", 2)],
      "test": [("( ( ( [MAX 0 ) 0 ) ] )", 0)],
  }
  d = str(tmp_path / "lra")
  _write_lra_dir(d, rows)  # LRA's csv.writer ends lines with \r\n.
  for split in rows:
    for s, y in rows[split]:
      assert evaluate(s) == y
  ds = make_dataset({"name": "listops", "path": d, "max_len": 8})
  assert ds.info["num_train"] == 3 and ds.info["num_eval"] == 2
  assert ds.info["majority_accuracy"] == 0.5
  (ev,) = list(ds.eval_batches(2))
  np.testing.assert_array_equal(ev["inputs"][0], [11, 5, 2, 15, 0, 0, 0, 0])
  np.testing.assert_array_equal(ev["label"], [1, 2])
  (test,) = list(ds.eval_batches(4, split="test"))
  np.testing.assert_array_equal(test["valid"], [True, False, False, False])
  np.testing.assert_array_equal(test["label"], [0, 0, 0, 0])
  # Truncation to max_len.
  ds3 = make_dataset({"name": "listops", "path": d, "max_len": 3, "num_train": 2})
  assert ds3.info["num_train"] == 2
  b = ds3.batch_at(0, 2)
  assert b["inputs"].shape == (2, 3) and b["mask"].all()


def test_eval_split_argument(tmp_path):
  d = str(tmp_path / "lra")
  _write_lra_dir(d, {"train": [("1", 1)], "val": [("2", 2)]}, crlf=False)
  ds = make_dataset({"name": "listops", "path": d})
  with pytest.raises(ValueError, match="split='train'.*allowed values: 'val', 'test'"):
    ds.eval_batches(2, split="train")
  with pytest.raises(FileNotFoundError, match="basic_test.tsv"):
    ds.eval_batches(2, split="test")


@pytest.mark.parametrize("content,match", [
    ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n1\t2\t3\n", "line 3: expected 2 tab-separated"),
    ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\tnine\n", "line 2: Target must be an integer"),
    ("Source\tTarget\n1\t12\n", "line 2: Target must be an integer 0..9"),
    ("src\tlabel\n1\t1\n", "line 1: expected the header"),
    ("", "line 1: expected the header"),
])
def test_malformed_tsv(tmp_path, content, match):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "basic_train.tsv").write_text(content)
  (d / "basic_val.tsv").write_text("Source\tTarget\n1\t1\n")
  path = str(d / "basic_train.tsv")
  with pytest.raises(ValueError, match=match) as err:
    make_dataset({"name": "listops", "path": str(d)})
  assert path in str(err.value)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    make_dataset({"name": "listops", "path": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="basic_train.tsv"):
    make_dataset({"name": "listops", "path": str(tmp_path)})
  (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n")
  (tmp_path / "basic_val.tsv").write_text("Source\tTarget\n1\t1\n")
  with pytest.raises(ValueError, match="has no examples"):
    make_dataset({"name": "listops", "path": str(tmp_path)})


def test_generator_argument_errors(tmp_path):
  base = {"name": "listops", "cache_dir": str(tmp_path), "num_train": 5, "num_eval": 2}
  with pytest.raises(ValueError, match="data.min_tree_length=50 and data.max_tree_length=51"):
    make_dataset(dict(base, min_tree_length=50, max_tree_length=51))
  with pytest.raises(ValueError, match="data.min_tree_length=500 is unreachable"):
    make_dataset(dict(base, max_depth=2, max_args=3))
  with pytest.raises(ValueError, match="data.max_args=1"):
    make_dataset(dict(base, max_args=1))
  with pytest.raises(ValueError, match="data.num_train=0"):
    make_dataset(dict(base, num_train=0))
  with pytest.raises(RuntimeError, match="found only"):
    listops.generate(100, seed=0, min_tree_length=0, max_tree_length=3, max_depth=2, max_args=2, max_attempts=500)
  assert not os.listdir(tmp_path)  # Nothing written before the checks.


@pytest.mark.parametrize("old,new", [("min_length", "min_tree_length"), ("max_length", "max_tree_length")])
def test_old_tree_length_names_raise_naming_the_new_ones(tmp_path, old, new):
  """min_length / max_length were renamed (they are tree lengths, not the model's max_len)."""
  message = f"data.{old} was renamed to data.{new}"
  base = {"name": "listops", "cache_dir": str(tmp_path), "num_train": 5, "num_eval": 2}
  with pytest.raises(ValueError, match=message) as err:
    make_dataset(dict(base, **{old: 300}))
  assert "data.max_len" in str(err.value)
  cfg = default_data_config("listops")
  cfg[old] = 300  # e.g. --config.data.max_length=300 on an old command line
  with pytest.raises(ValueError, match=message):
    make_dataset(cfg)
  with pytest.raises(ValueError, match=message):
    ListOpsDataset(cache_dir=str(tmp_path), **{old: 300})
  with pytest.raises(ValueError, match=message):
    listops.generate(3, seed=0, **{old: 300})
  assert not os.listdir(tmp_path)  # Nothing generated before the checks.


def test_other_unexpected_keywords_are_type_errors():
  with pytest.raises(TypeError, match="ListOpsDataset.. got an unexpected keyword argument 'max_lenn'"):
    ListOpsDataset(max_lenn=3)
  with pytest.raises(TypeError, match="generate.. got an unexpected keyword argument 'depth'"):
    listops.generate(3, seed=0, depth=3)


def test_cache_key_format_unchanged_by_the_rename():
  """Sets cached before min_length / max_length became min_tree_length / max_tree_length are reused."""
  key = listops.cache_key(0, {"train": 64, "val": 16, "test": 16}, min_tree_length=10, max_tree_length=60,
                          max_depth=10, max_args=10)
  assert key == "v1_seed0_n64-16-16_len10-60_d10_a10"


def test_longest_tree_length():
  assert listops.longest_tree_length(1, 10) == 1
  assert listops.longest_tree_length(2, 3) == 5  # [OP d d d ]
  assert listops.longest_tree_length(3, 2) == 2 + 2 * 4


def test_cache_files_and_reuse(tmp_path):
  cfg = default_data_config("listops")
  cfg.update(dict(num_train=30, num_eval=5, num_test=4, cache_dir=str(tmp_path), **GEN))
  ds = make_dataset(cfg)
  key = listops.cache_key(0, {"train": 30, "val": 5, "test": 4}, 20, 100, 10, 10)
  d = tmp_path / "listops" / key
  for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv", "encoded.npz"):
    assert (d / name).is_file()
  # The cached TSVs are an LRA-format directory: reading them as data.path gives the same batches.
  from_files = make_dataset({"name": "listops", "path": str(d), "max_len": 2000})
  np.testing.assert_array_equal(from_files.batch_at(2, 6)["inputs"], ds.batch_at(2, 6)["inputs"])
  sources, labels = listops.read_tsv(str(d / "basic_train.tsv"))
  assert (sources, labels) == tuple(x[:30] for x in listops.generate(39, seed=0, **GEN))
  assert all(evaluate(s) == y for s, y in zip(sources, labels))
  test_ev = list(ds.eval_batches(4, split="test"))
  assert len(test_ev) == 1 and test_ev[0]["valid"].all()
  assert ds.lengths("train").min() > 20 and ds.lengths("test").max() < 100
  # Whole-sequence tokens of the batch equal the encoded source.
  b = ds.batch_at(0, 4)
  idx = ds.global_indices(0, 4)
  for r, i in enumerate(idx):
    ids = listops.encode(sources[i])
    np.testing.assert_array_equal(b["inputs"][r, :len(ids)], ids)
    assert not b["inputs"][r, len(ids):].any()
    assert b["label"][r] == labels[i]
  assert isinstance(ds, ListOpsDataset)


def test_default_generation_speed_smoke():
  """2,000 LRA-default examples take ~1.5 s here; 200 must take well under a few seconds."""
  import time
  t = time.perf_counter()
  sources, labels = listops.generate(200, seed=0)
  assert time.perf_counter() - t < 20
  lengths = np.array([n_tokens(s) for s in sources])
  assert lengths.min() > 500 and lengths.max() < 2000
  assert all(evaluate(s) == y for s, y in zip(sources[:20], labels[:20]))


def test_outer_operator_baseline_hand_counted(tmp_path):
  """Lookup table: train MAX → {9, 9, 7} → 9, MIN → {0} → 0, SM → {8} → 8; an operator unseen in train (MED)
  falls back to the train majority (9). Val: MAX 9 ✓, MAX 5 ✗, MIN 0 ✓, MED 9 ✓ (fallback), SM 3 ✗ → 3/5."""
  rows = {
      "train": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [MAX 9 ) 1 ) ] )", 9), ("( ( ( [MAX 7 ) 1 ) ] )", 7),
                ("( ( ( [MIN 0 ) 4 ) ] )", 0), ("( ( ( ( [SM 5 ) 6 ) 7 ) ] )", 8)],
      "val": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [MAX 5 ) 1 ) ] )", 5), ("( ( ( [MIN 0 ) 0 ) ] )", 0),
              ("( ( ( [MED 9 ) 9 ) ] )", 9), ("( ( ( [SM 1 ) 2 ) ] )", 3)],
      "test": [("( ( ( [MIN 3 ) 4 ) ] )", 3), ("( ( ( [MAX 3 ) 9 ) ] )", 9)],
  }
  d = str(tmp_path / "lra")
  _write_lra_dir(d, rows)
  ds = make_dataset({"name": "listops", "path": d, "max_len": 8})
  assert ds.info["outer_operator_accuracy"] == pytest.approx(3 / 5)
  assert ds.outer_operator_accuracy("test") == pytest.approx(1 / 2)


@pytest.mark.parametrize("config", ["listops_linformer", "listops_transformer"])
def test_listops_configs_use_the_tree_length_names(tmp_path, config):
  import importlib
  cfg = importlib.import_module(f"configs.{config}").get_config("runlocal")
  assert set(cfg.data.keys()) == set(default_data_config("listops").keys())
  assert (cfg.data.min_tree_length, cfg.data.max_tree_length, cfg.data.max_len) == (10, 60, 64)
  cpu = importlib.import_module(f"configs.{config}").get_config("cpu")
  assert (cpu.data.min_tree_length, cpu.data.max_tree_length, cpu.data.max_len) == (50, 300, 300)
  cfg.data.cache_dir = str(tmp_path)
  ds = make_dataset(cfg.data)
  assert ds.info["num_train"] == 64 and ds.lengths("train").min() > 10 and ds.lengths("train").max() < 60
  assert os.path.basename(ds.source_dir) == "v1_seed0_n64-16-16_len10-60_d10_a10"
