"""Images: digits (scikit-learn) and CIFAR-10 pickle directories; resize, normalisation, augmentation."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.data import ImageDataset, make_dataset
from linformer_jax.data import images
from helpers import write_fake_cifar


@pytest.fixture(scope="module")
def digits():
  return make_dataset({"name": "digits", "image_size": 16})


def test_digits_shapes_labels_split(digits):
  from sklearn.datasets import load_digits
  raw = load_digits()
  assert digits.info["num_train"] == 1500 and digits.info["num_eval"] == 297
  assert digits.info["image_shape"] == (16, 16, 3)
  ev = list(digits.eval_batches(100))
  labels = np.concatenate([b["label"] for b in ev])[np.concatenate([b["valid"] for b in ev])]
  np.testing.assert_array_equal(labels, raw.target[-297:])
  counts = np.bincount(raw.target[-297:], minlength=10)
  assert digits.info["majority_accuracy"] == pytest.approx(counts.max() / 297)
  b = digits.batch_at(0, 32)
  np.testing.assert_array_equal(b["label"], raw.target[:1500][digits.global_indices(0, 32)])
  assert b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.float32
  np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])  # Grey replicated.


def test_digits_normalised_with_train_statistics(digits):
  everything = np.concatenate([digits.batch_at(s, 100)["image"] for s in range(15)])  # One epoch.
  everything = everything.astype(np.float64)
  np.testing.assert_allclose(everything.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(everything.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
  mean, std = np.array(digits.info["mean"]), np.array(digits.info["std"])
  assert mean.shape == (3,) and np.all(std > 0)
  # Undoing the normalisation gives the resized source images in [0, 1].
  raw = everything * std + mean
  assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_digits_image_matches_resized_source(digits):
  from sklearn.datasets import load_digits
  raw = load_digits().images.astype(np.float32) / 16.0
  b = digits.batch_at(2, 4)
  idx = digits.global_indices(2, 4)
  expected = images.resize_bilinear(raw[idx], (16, 16))
  got = b["image"][..., 0] * digits.info["std"][0] + digits.info["mean"][0]
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (16, 24), (8, 8)])
def test_resize_matches_jax_image_resize_upscaling(size):
  x = np.random.default_rng(0).random((3, 8, 8, 2)).astype(np.float32)
  ours = images.resize_bilinear(x, size)
  ref = jax.image.resize(jnp.asarray(x), (3, *size, 2), method="bilinear")
  np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)
  np.testing.assert_allclose(images.resize_bilinear(x[..., 0], size), ours[..., 0], atol=1e-6)


def test_cifar_fake_directory(tmp_path):
  x_train, y_train, x_test, y_test = write_fake_cifar(str(tmp_path / "cifar"))
  ds = make_dataset({"name": "cifar10", "path": str(tmp_path / "cifar")})
  assert isinstance(ds, ImageDataset)
  assert ds.info["num_train"] == 60 and ds.info["num_eval"] == 10
  assert ds.label_names == tuple(f"c{i}" for i in range(10))
  mean = x_train.reshape(-1, 3).astype(np.float64).mean(0) / 255
  std = x_train.reshape(-1, 3).astype(np.float64).std(0) / 255
  np.testing.assert_allclose(ds.info["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(ds.info["std"], std, rtol=1e-4)
  b = ds.batch_at(1, 6)
  idx = ds.global_indices(1, 6)
  np.testing.assert_array_equal(b["label"], y_train[idx])
  np.testing.assert_allclose(b["image"], (x_train[idx] / 255.0 - mean) / std, atol=1e-4)
  (ev,) = list(ds.eval_batches(16))
  assert ev["valid"].sum() == 10
  np.testing.assert_array_equal(ev["label"][:10], y_test)
  np.testing.assert_allclose(ev["image"][:10], (x_test / 255.0 - mean) / std, atol=1e-4)
  # Channel layout: the first 1024 values of a row are the red plane.
  assert (x_train[0, :, :, 0].ravel() == x_train[0].transpose(2, 0, 1).reshape(-1)[:1024]).all()
  small = make_dataset({"name": "cifar10", "path": str(tmp_path / "cifar"), "image_size": 16,
                        "num_train": 20, "num_eval": 4})
  assert small.batch_at(0, 4)["image"].shape == (4, 16, 16, 3)
  assert small.info["num_train"] == 20 and small.info["num_eval"] == 4


def test_cifar_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="needs data.path"):
    make_dataset({"name": "cifar10"})
  with pytest.raises(FileNotFoundError, match="not a directory"):
    make_dataset({"name": "cifar10", "path": str(tmp_path / "nope")})
  d = tmp_path / "cifar"
  write_fake_cifar(str(d))
  os.remove(d / "data_batch_3")
  with pytest.raises(FileNotFoundError, match="data_batch_3"):
    make_dataset({"name": "cifar10", "path": str(d)})
  with open(d / "data_batch_3", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match="data_batch_3.*uint8 \\(N, 3072\\)"):
    make_dataset({"name": "cifar10", "path": str(d)})
  with open(d / "data_batch_3", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
  with pytest.raises(ValueError, match="data_batch_3.*ints in 0..9"):
    make_dataset({"name": "cifar10", "path": str(d)})
  (d / "data_batch_3").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="data_batch_3.*not a readable pickle"):
    make_dataset({"name": "cifar10", "path": str(d)})


def test_digits_errors():
  with pytest.raises(ValueError, match="data.path='x' must be None"):
    make_dataset({"name": "digits", "path": "x"})
  with pytest.raises(ValueError, match="data.num_train=2000 exceeds"):
    make_dataset({"name": "digits", "num_train": 2000})
  with pytest.raises(ValueError, match="data.image_size=0"):
    make_dataset({"name": "digits", "image_size": 0})


def test_augmentation_seeded_per_row():
  ds = make_dataset({"name": "digits", "image_size": 8, "augment": True, "num_train": 64})
  plain = make_dataset({"name": "digits", "image_size": 8, "num_train": 64})
  a = ds.batch_at(4, 16)
  np.testing.assert_array_equal(a["image"], ds.batch_at(4, 16)["image"])
  half = ds.batch_at(4, 16, process_index=1, process_count=2)
  np.testing.assert_array_equal(half["image"], a["image"][8:])
  assert not np.array_equal(a["image"], plain.batch_at(4, 16)["image"])
  np.testing.assert_array_equal(a["label"], plain.batch_at(4, 16)["label"])
  # Each augmented image is a flipped/shifted crop of the zero-padded normalised original.
  p = ds.crop_padding
  orig = np.pad(plain.batch_at(4, 16)["image"], ((0, 0), (p, p), (p, p), (0, 0)))
  for r in range(16):
    crops = [np.flip(c, 1) if f else c for f in (0, 1)
             for dy in range(2 * p + 1) for dx in range(2 * p + 1)
             for c in [orig[r, dy:dy + 8, dx:dx + 8]]]
    assert any(np.array_equal(a["image"][r], c) for c in crops)
  # Eval is never augmented.
  np.testing.assert_array_equal(next(ds.eval_batches(8))["image"], next(plain.eval_batches(8))["image"])
