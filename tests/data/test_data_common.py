"""The `Dataset` contract on every dataset: determinism, resume, host sharding, epoch coverage, eval."""
import inspect
import os
import types

import numpy as np
import pytest

from linformer_jax.data import (DATASETS, Dataset, ImageDataset, ListOpsDataset, MLMDataset, data_fields,
                                default_data_config, make_dataset)
from helpers import write_fake_cifar

NAMES = ("listops", "mlm", "digits", "cifar10")


def write_text_corpus(directory, n_files=6, size=3000, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  words = [b"def", b"return", b"import", b"class", b"self", b"x", b"=", b"(", b")", b":", b"\n", b"    "]
  for i in range(n_files):
    parts = [words[j] for j in rng.integers(0, len(words), size=size // 3)]
    with open(os.path.join(directory, f"f{i}.py"), "wb") as f:
      f.write(b" ".join(parts)[:size])
  return directory


def small_config(name, tmp):
  """Tiny config of each dataset, reading/writing only under `tmp`."""
  cfg = default_data_config(name)
  if "cache_dir" in cfg:  # ListOps and MLM cache; the image datasets have no cache_dir
    cfg.cache_dir = str(tmp / "cache")
  if name == "listops":
    cfg.num_train, cfg.num_eval = 60, 13
    cfg.min_tree_length, cfg.max_tree_length, cfg.max_len = 20, 100, 64
  elif name == "mlm":
    cfg.path = write_text_corpus(str(tmp / "corpus"))
    cfg.max_len, cfg.num_eval = 64, 11
  elif name == "digits":
    cfg.num_train, cfg.num_eval, cfg.image_size = 70, 13, 12
  elif name == "cifar10":
    write_fake_cifar(str(tmp / "cifar"))
    cfg.path = str(tmp / "cifar")
    cfg.image_size = 32
  return cfg


@pytest.fixture(scope="module", params=NAMES)
def built(request, tmp_path_factory):
  tmp = tmp_path_factory.mktemp(request.param)
  cfg = small_config(request.param, tmp)
  return cfg, make_dataset(cfg)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_datasets_tuple():
  assert DATASETS == ("listops", "mlm", "digits", "cifar10")


def test_info_keys(built):
  cfg, ds = built
  assert isinstance(ds, Dataset)
  info = ds.info
  for key in ("kind", "num_train", "num_eval", "pad_id"):
    assert key in info
  if cfg.name == "listops":
    assert info["kind"] == "classification" and info["num_classes"] == 10
    assert info["vocab_size"] == 17 and info["max_len"] == 64 and info["pad_id"] == 0
    assert 0.1 <= info["majority_accuracy"] <= 1.0
  elif cfg.name == "mlm":
    assert info["kind"] == "mlm" and info["vocab_size"] == 258 and info["max_len"] == 64
    assert info["pad_id"] == 256 and info["unigram_perplexity"] > 1.0
  else:
    assert info["kind"] == "image" and info["num_classes"] == 10
    assert info["image_shape"] == (cfg.image_size, cfg.image_size, 3)
    assert 0.1 <= info["majority_accuracy"] <= 1.0


def test_batch_dtypes_and_shapes(built):
  cfg, ds = built
  b = ds.batch_at(0, 8)
  if cfg.name == "listops":
    assert set(b) == {"inputs", "mask", "label"}
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (8, 64)
    assert b["mask"].dtype == bool and b["label"].dtype == np.int32 and b["label"].shape == (8,)
    np.testing.assert_array_equal(b["mask"], b["inputs"] != 0)
  elif cfg.name == "mlm":
    assert set(b) == {"inputs", "targets", "weights", "mask"}
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["weights"].dtype == np.float32 and b["mask"].dtype == bool
    for v in b.values():
      assert v.shape == (8, 64)
  else:
    assert set(b) == {"image", "label"}
    assert b["image"].dtype == np.float32 and b["image"].shape == (8, cfg.image_size, cfg.image_size, 3)
    assert b["label"].dtype == np.int32


def test_deterministic_and_step_dependent(built):
  cfg, ds = built
  a = ds.batch_at(5, 8)
  assert_batches_equal(a, ds.batch_at(5, 8))
  other = ds.batch_at(6, 8)
  key = "image" if "image" in a else "inputs"
  assert not np.array_equal(a[key], other[key])


def test_resume_after_restart(built):
  cfg, ds = built
  expected = [ds.batch_at(s, 8) for s in range(3, 6)]
  restarted = make_dataset(cfg)  # Fresh object, as after a restart (cached data reused).
  for s, e in zip(range(3, 6), expected):
    assert_batches_equal(restarted.batch_at(s, 8), e)


def test_seed_changes_order(built):
  cfg, ds = built
  a = ds.global_indices(0, 8)
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.seed = cfg.seed + 1
  if cfg.name == "listops":  # Another seed generates another set; compare only the shuffle.
    np.testing.assert_array_equal(
        ds.global_indices(0, ds.num_train),
        np.random.default_rng([cfg.seed, 0]).permutation(ds.num_train))
    return
  assert not np.array_equal(a, make_dataset(cfg2).global_indices(0, 8))


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_union_is_global_batch(built, process_count):
  cfg, ds = built
  for step in (0, 7):
    whole = ds.batch_at(step, 8)
    parts = [ds.batch_at(step, 8, process_index=i, process_count=process_count)
             for i in range(process_count)]
    for k in whole:
      assert all(p[k].shape[0] == 8 // process_count for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)


def test_epoch_coverage_and_wrap(built):
  cfg, ds = built
  n = ds.num_train
  bs = 7
  steps = -(-n // bs)
  seen = np.concatenate([ds.global_indices(s, bs) for s in range(steps)])[:n]
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # Each example exactly once in epoch 0.
  np.testing.assert_array_equal(seen, np.random.default_rng([cfg.seed, 0]).permutation(n))
  # The batch crossing the epoch boundary continues with epoch 1's permutation.
  pos = (steps - 1) * bs + np.arange(bs)
  expected = np.where(pos < n, np.random.default_rng([cfg.seed, 0]).permutation(n)[pos % n],
                      np.random.default_rng([cfg.seed, 1]).permutation(n)[pos % n])
  np.testing.assert_array_equal(ds.global_indices(steps - 1, bs), expected)


def test_batch_larger_than_train_set(built):
  cfg, ds = built
  bs = 2 * ds.num_train + 3
  idx = ds.global_indices(1, bs)
  assert idx.shape == (bs,) and idx.min() >= 0 and idx.max() < ds.num_train


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split(built, process_count):
  cfg, ds = built
  n = ds.info["num_eval"]
  bs = 8
  per_host = [list(ds.eval_batches(bs, process_index=i, process_count=process_count))
              for i in range(process_count)]
  assert len({len(b) for b in per_host}) == 1 and len(per_host[0]) == -(-n // bs)
  merged = [{k: np.concatenate([h[j][k] for h in per_host]) for k in per_host[0][j]}
            for j in range(len(per_host[0]))]
  valid = np.concatenate([b["valid"] for b in merged])
  assert valid.dtype == bool and valid.sum() == n and valid[:n].all()
  for b in merged:
    assert all(v.shape[0] == bs for v in b.values())
  # Deterministic, and equal across a second pass.
  again = list(ds.eval_batches(bs))
  for a, b in zip(again, merged):
    assert_batches_equal(a, b)
  if cfg.name == "mlm":
    assert merged[-1]["weights"][~merged[-1]["valid"]].sum() == 0


def test_batch_size_not_divisible(built):
  _, ds = built
  with pytest.raises(ValueError, match="process_count"):
    ds.batch_at(0, 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_count"):
    next(ds.eval_batches(6, process_count=4))
  with pytest.raises(ValueError, match="process_index"):
    ds.batch_at(0, 8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="step"):
    ds.batch_at(-1, 8)


def test_unknown_name():
  with pytest.raises(ValueError, match="data.name='imagenet'.*allowed values"):
    make_dataset({"name": "imagenet"})
  with pytest.raises(ValueError, match="allowed values"):
    default_data_config("text")


# Each dataset's fields, spelled out (the registry derives them from the constructors).
EXPECTED_FIELDS = {
    "listops": {"name", "path", "seed", "max_len", "num_train", "num_eval", "num_test", "cache_dir",
                "min_tree_length", "max_tree_length", "max_depth", "max_args"},
    "mlm": {"name", "path", "seed", "max_len", "num_train", "num_eval", "cache_dir", "mask_rate", "max_bytes",
            "objective"},
    "digits": {"name", "path", "seed", "num_train", "num_eval", "image_size", "augment", "crop_padding"},
    "cifar10": {"name", "path", "seed", "num_train", "num_eval", "image_size", "augment", "crop_padding"},
}
CLASSES = {"listops": ListOpsDataset, "mlm": MLMDataset, "digits": ImageDataset, "cifar10": ImageDataset}


def _constructor_defaults(cls):
  """name → default of the keyword arguments of `cls` (its own `name` argument excluded)."""
  params = inspect.signature(cls.__init__).parameters.values()
  return {p.name: p.default for p in params if p.name not in ("self", "name") and p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("name", NAMES)
def test_default_config_holds_exactly_its_constructor_fields(name):
  cfg = default_data_config(name)
  defaults = _constructor_defaults(CLASSES[name])
  assert set(cfg.keys()) == {"name"} | set(defaults) == EXPECTED_FIELDS[name]
  assert data_fields(name) == ("name",) + tuple(defaults)
  assert cfg.name == name
  for key, default in defaults.items():
    assert cfg[key] == default, key


def test_no_dataset_carries_another_datasets_fields():
  assert "mask_rate" not in default_data_config("listops") and "image_size" not in default_data_config("listops")
  assert "image_size" not in default_data_config("mlm") and "num_test" not in default_data_config("mlm")
  for name in ("digits", "cifar10"):
    assert not {"max_len", "cache_dir", "mask_rate"} & set(default_data_config(name).keys())
  assert default_data_config("listops").max_len == 2000 and default_data_config("mlm").max_len == 512
  assert default_data_config("listops").max_tree_length == 2000
  assert default_data_config("listops").min_tree_length == 500


def test_none_defaults_are_typed_placeholders():
  """None-valued fields are typed placeholders, so --config.data.FIELD overrides parse and type-check."""
  cfg = default_data_config("listops")
  cfg.num_train, cfg.num_test, cfg.path, cfg.cache_dir = 10, 3, "/x", "/c"
  with pytest.raises(TypeError):
    cfg.num_train = "many"
  with pytest.raises(TypeError):
    cfg.path = 5
  img = default_data_config("digits")
  img.num_eval = 7
  with pytest.raises(TypeError):
    img.num_eval = "some"


def test_unknown_field_names_field_dataset_and_allowed(tmp_path):
  with pytest.raises(ValueError) as err:
    make_dataset({"name": "mlm", "mask_rat": 0.2})
  msg = str(err.value)
  for sub in ("data.mask_rat", "did you mean 'mask_rate'", "data.name='mlm'", "allowed fields",
              ", ".join(sorted(EXPECTED_FIELDS["mlm"]))):
    assert sub in msg, (sub, msg)
  # Another dataset's field: named with the datasets that have it.
  with pytest.raises(ValueError) as err:
    make_dataset({"name": "listops", "mask_rate": 0.2, "cache_dir": str(tmp_path)})
  msg = str(err.value)
  for sub in ("data.mask_rate", "data.name='listops'", "'mlm'", "allowed fields", "max_tree_length"):
    assert sub in msg, (sub, msg)
  cfg = default_data_config("digits")
  cfg.max_len = 64  # ConfigDict accepts a new key; make_dataset refuses it.
  with pytest.raises(ValueError, match=r"data.max_len is not a field of data.name='digits'"):
    make_dataset(cfg)
  with pytest.raises(ValueError, match="data.image_size is not a field of data.name='mlm'"):
    make_dataset(types.SimpleNamespace(name="mlm", image_size=8))
  assert not os.listdir(tmp_path)  # Nothing generated before the checks.


def test_plain_object_config_with_missing_fields(tmp_path):
  class Cfg:
    name = "digits"
    num_train = 50
  ds = make_dataset(Cfg())
  assert ds.info["num_train"] == 50 and ds.info["num_eval"] == 297


def test_bad_seed():
  with pytest.raises(ValueError, match="data.seed"):
    make_dataset({"name": "digits", "seed": -1})
