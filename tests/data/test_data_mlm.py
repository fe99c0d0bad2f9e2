"""Byte-level MLM: corpus reading, chunking/split, BERT masking statistics, baselines, errors."""
import os
import sysconfig

import numpy as np
import pytest

from linformer_jax.data import MLMDataset, make_dataset
from linformer_jax.data import mlm


def _make(tmp_path, **kw):
  """make_dataset for MLM with the cache under `tmp_path`."""
  return make_dataset(dict(name="mlm", cache_dir=str(tmp_path / "cache"), **kw))


def _corpus(tmp_path, texts):
  d = tmp_path / "corpus"
  d.mkdir(exist_ok=True)
  for name, text in texts.items():
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text)
  return d


@pytest.fixture(scope="module")
def big(tmp_path_factory):
  rng = np.random.default_rng(0)
  d = tmp_path_factory.mktemp("mlm_big")
  text = bytes(rng.integers(32, 127, size=120_000, dtype=np.uint8))
  (d / "a.txt").write_bytes(text)
  ds = make_dataset({"name": "mlm", "path": str(d), "max_len": 128, "num_eval": 40,
                     "cache_dir": str(d / "cache")})
  return ds, text


def test_corpus_order_and_chunks(tmp_path):
  d = _corpus(tmp_path, {"b.py": b"BBBB", "a.txt": b"AAA", "sub/c.py": b"CC", "skip.md": b"zz"})
  ds = make_dataset({"name": "mlm", "path": str(d), "max_len": 4, "num_eval": 1,
                     "cache_dir": str(tmp_path / "cache")})
  assert [os.path.basename(f) for f in ds.files] == ["a.txt", "b.py", "c.py"]
  corpus = b"AAA\x00BBBB\x00CC"  # Sorted relative paths, NUL separators.
  assert ds.corpus_bytes == len(corpus)
  chunks = [list(corpus[i:i + 4]) for i in range(0, len(corpus), 4)]
  chunks[-1] += [mlm.PAD_ID] * (4 - len(chunks[-1]))
  np.testing.assert_array_equal(ds._chunks, chunks)
  assert ds.eval_ids.tolist() == [0] and ds.train_ids.tolist() == [1, 2]


def test_eval_chunks_evenly_spaced(big):
  ds, text = big
  n = -(-len(text) // 128)
  assert ds.info["num_eval"] == 40 and ds.info["num_train"] == n - 40
  np.testing.assert_array_equal(ds.eval_ids, np.round(np.linspace(0, n - 1, 40)).astype(int))
  assert not set(ds.eval_ids) & set(ds.train_ids)


def test_masking_statistics(big):
  ds, _ = big
  b = ds.batch_at(0, 512)
  real = b["mask"]
  selected = b["weights"] > 0
  assert not (selected & ~real).any()
  rate = selected.sum() / real.sum()
  assert abs(rate - 0.15) < 0.01
  n = selected.sum()
  to_mask = (b["inputs"] == mlm.MASK_ID) & selected
  unchanged = (b["inputs"] == b["targets"]) & selected
  random = selected & ~to_mask & ~unchanged
  assert abs(to_mask.sum() / n - 0.8) < 0.02
  # Random replacements equal the original byte 1/256 of the time, counted as "unchanged".
  assert abs(unchanged.sum() / n - 0.1 - 0.1 / 256) < 0.015
  assert abs(random.sum() / n - 0.1) < 0.015
  # Unselected positions are untouched; MASK only where selected; random bytes are bytes.
  np.testing.assert_array_equal(b["inputs"][~selected], b["targets"][~selected])
  assert b["inputs"][random].max() < 256
  assert not (b["inputs"][~selected] == mlm.MASK_ID).any()


def test_targets_are_the_original_chunks(big):
  ds, text = big
  b = ds.batch_at(3, 16)
  idx = ds.train_ids[ds.global_indices(3, 16)]
  for r, c in enumerate(idx):
    expected = np.frombuffer(text[c * 128:(c + 1) * 128], np.uint8)
    np.testing.assert_array_equal(b["targets"][r, :len(expected)], expected)


def test_pads_never_selected(tmp_path):
  d = _corpus(tmp_path, {"a.txt": b"x" * 130})
  ds = make_dataset({"name": "mlm", "path": str(d), "max_len": 100, "num_eval": 1, "mask_rate": 0.9,
                     "cache_dir": str(tmp_path / "c")})
  # 2 chunks: eval = chunk 0, train = chunk 1 (30 real bytes + 70 PAD).
  for step in range(20):
    b = ds.batch_at(step, 4)
    assert b["mask"][:, :30].all() and not b["mask"][:, 30:].any()
    assert not b["weights"][:, 30:].any()
    assert (b["inputs"][:, 30:] == mlm.PAD_ID).all() and (b["targets"][:, 30:] == mlm.PAD_ID).all()


def test_masking_independent_of_process_count(big):
  ds, _ = big
  whole = ds.batch_at(11, 8)
  quarter = ds.batch_at(11, 8, process_index=3, process_count=4)
  for k in whole:
    np.testing.assert_array_equal(quarter[k], whole[k][6:8])
  # Different steps mask the same example differently.
  a = ds._train_examples(np.array([0]), 1, np.array([0]))
  b = ds._train_examples(np.array([0]), 2, np.array([0]))
  assert not np.array_equal(a["weights"], b["weights"])


def test_eval_masking_fixed_by_seed(big, tmp_path):
  ds, _ = big
  a = next(ds.eval_batches(8))
  b = next(ds.eval_batches(8))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_unigram_perplexity(tmp_path):
  d = _corpus(tmp_path, {"a.txt": b"ab" * 200 + b"c" * 40})
  ds = make_dataset({"name": "mlm", "path": str(d), "max_len": 20, "num_eval": 4, "seed": 1,
                     "cache_dir": str(tmp_path / "c")})
  train = ds._chunks[ds.train_ids]
  counts = np.bincount(train[train != mlm.PAD_ID].astype(int), minlength=256) + 1.0
  p = counts / counts.sum()
  nll, num = 0.0, 0
  for b in ds.eval_batches(3):
    sel = (b["weights"] > 0) & b["valid"][:, None]
    nll -= np.log(p[b["targets"][sel]]).sum()
    num += sel.sum()
  assert num > 0
  np.testing.assert_allclose(ds.info["unigram_perplexity"], np.exp(nll / num), rtol=1e-9)
  assert 1.0 < ds.info["unigram_perplexity"] < 256


def test_path_forms_and_cache(tmp_path):
  d = _corpus(tmp_path, {"a.txt": b"hello world " * 20, "b.py": b"print(1)\n" * 20})
  single = _make(tmp_path, path=str(d / "a.txt"), max_len=16, num_eval=2)
  assert single.files == [str(d / "a.txt")] and single.corpus_bytes == 240
  globbed = _make(tmp_path, path=str(d / "*.py"), max_len=16, num_eval=2)
  assert globbed.files == [str(d / "b.py")]
  assert len(os.listdir(tmp_path / "cache" / "mlm")) == 2  # One .npy per distinct file list.
  _make(tmp_path, path=str(d), max_len=16, num_eval=2)
  assert len(os.listdir(tmp_path / "cache" / "mlm")) == 3
  _make(tmp_path, path=str(d), max_len=32, num_eval=2)  # Same bytes: cache hit.
  assert len(os.listdir(tmp_path / "cache" / "mlm")) == 3
  limited = _make(tmp_path, path=str(d), max_len=16, num_eval=2, max_bytes=100, num_train=3)
  assert limited.corpus_bytes == 100 and limited.info["num_train"] == 3


def test_default_corpus_is_stdlib(tmp_path):
  ds = make_dataset({"name": "mlm", "max_len": 256, "max_bytes": 200_000, "num_eval": 10,
                     "cache_dir": str(tmp_path)})
  root = sysconfig.get_paths()["stdlib"]
  assert all(f.startswith(root) and f.endswith(".py") for f in ds.files)
  assert not any("site-packages" in f for f in ds.files)
  assert ds.corpus_bytes == 200_000 and ds.info["vocab_size"] == 258
  assert isinstance(ds, MLMDataset)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _make(tmp_path, path=str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.md").write_text("not a corpus file")
  with pytest.raises(ValueError, match="no \\*.py/\\*.txt files"):
    _make(tmp_path, path=str(empty))
  with pytest.raises(FileNotFoundError, match="matches no files"):
    _make(tmp_path, path=str(tmp_path / "*.nothing"))
  (empty / "zero.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="corpus is empty"):
    _make(tmp_path, path=str(empty))
  (empty / "zero.txt").write_bytes(b"abc")
  with pytest.raises(ValueError, match="at least 2 are needed"):
    _make(tmp_path, path=str(empty), max_len=8)
  with pytest.raises(ValueError, match="data.mask_rate"):
    _make(tmp_path, path=str(empty), mask_rate=1.5)
  with pytest.raises(ValueError, match="data.num_eval=5 must be <"):
    _make(tmp_path, path=str(empty), max_len=1, num_eval=5)
  with pytest.raises(ValueError, match="data.num_train=9 exceeds"):
    _make(tmp_path, path=str(empty), max_len=1, num_eval=1, num_train=9)
