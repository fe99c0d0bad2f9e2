"""Image classification: scikit-learn's bundled digits, and CIFAR-10 from its python-pickle directory.

``digits``: ``sklearn.datasets.load_digits()`` (1,797 grey 8×8 images, values 0..16, 10 classes; shipped
inside scikit-learn, nothing is downloaded), scaled to [0, 1] (÷16), resized bilinearly to
`image_size` × `image_size` (`resize_bilinear`), grey replicated to 3 channels. Split (fixed, independent
of the seed): the first 1,500 images are train, the last 297 eval; `num_train` / `num_eval` take the first
ones of each.

``cifar10``: the "CIFAR-10 python version" directory (``cifar-10-batches-py``): ``data_batch_1`` ..
``data_batch_5`` (train, 50,000) and ``test_batch`` (eval, 10,000), each a pickle of a dict with
``b"data"`` uint8 (N, 3072) (1024 R, 1024 G, 1024 B values, rows of 32) and ``b"labels"`` (N ints 0..9);
``batches.meta`` (optional) gives ``b"label_names"``. Only these named files are unpickled
(``encoding="bytes"``): pickles can run code, so point `data.path` only at the official archive or
another trusted source. Resized bilinearly when `image_size` != 32.

Normalisation: ``(x - mean) / std`` per channel, with mean/std of the (used) train images in [0, 1]
(``info["mean"]``, ``info["std"]``, (3,) each).

Augmentation (``augment=True``, off by default): random crop of the image zero-padded (after
normalisation, i.e. with the channel mean) by `crop_padding` pixels per side, then a horizontal flip with
probability 0.5, drawn per example from ``default_rng([seed, 0, step, global_row])``.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional, Tuple

import numpy as np

from linformer_jax._validate import check_bool, check_choice, check_int
from linformer_jax.data.base import TRAIN_STREAM, Batch, Dataset, row_rng

#: Number of classes of both digits and CIFAR-10.
NUM_CLASSES = 10
#: Number of digits images (the last ones) in the eval split; the first 1,500 are train.
DIGITS_NUM_EVAL = 297
#: The CIFAR-10 training pickles inside ``cifar-10-batches-py``.
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
#: The CIFAR-10 test pickle, used as the eval split.
CIFAR_TEST_FILE = "test_batch"
#: The optional CIFAR-10 pickle holding the label names.
CIFAR_META_FILE = "batches.meta"
#: Default side length, in pixels, of the (square) images fed to the model.
DEFAULT_IMAGE_SIZE = 32
#: Default zero padding, in pixels per side, before the random crop of the augmentation.
DEFAULT_CROP_PADDING = 4


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of linear interpolation with half-pixel centres, edges clamped."""
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  centres = np.clip(centres, 0.0, in_size - 1)
  lo = np.floor(centres).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = centres - lo
  w = np.zeros((out_size, in_size), dtype=np.float64)
  np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(w, (np.arange(out_size), hi), frac)
  return w


def resize_bilinear(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Bilinear resize with half-pixel centres (as ``jax.image.resize(..., "bilinear")`` when upscaling).

  No antialiasing: for downscaling by a large factor prefer an area filter. Args: images float
  (N, H, W) or (N, H, W, C); size (H', W'). Returns float32 (N, H', W'[, C]).
  """
  images = np.asarray(images, dtype=np.float32)
  h, w = images.shape[1:3]
  if (h, w) == tuple(size):
    return images
  wh = _linear_weights(h, size[0]).astype(np.float32)
  ww = _linear_weights(w, size[1]).astype(np.float32)
  if images.ndim == 3:
    return np.einsum("ph,nhw,qw->npq", wh, images, ww, optimize=True).astype(np.float32)
  return np.einsum("ph,nhwc,qw->npqc", wh, images, ww, optimize=True).astype(np.float32)


def load_digits_arrays(image_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn digits → (images float32 (1797, S, S, 3) in [0, 1], labels int32 (1797,))."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - dependency missing
    raise ImportError("data.name='digits' needs scikit-learn (pip install scikit-learn).") from e
  digits = load_digits()
  grey = digits.images.astype(np.float32) / 16.0
  grey = resize_bilinear(grey, (image_size, image_size))
  return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int32)


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 pickle → (uint8 (N, 32, 32, 3), int32 (N,)); ValueError naming the file if malformed."""
  with open(path, "rb") as f:
    try:
      d = pickle.load(f, encoding="bytes")
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"CIFAR-10 file {path!r} is not a readable pickle: {e}") from None
  if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
    raise ValueError(f"CIFAR-10 file {path!r} must hold a dict with keys b'data' and b'labels'.")
  data = np.asarray(d[b"data"])
  labels = np.asarray(d[b"labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"CIFAR-10 file {path!r}: b'data' must be uint8 (N, 3072), got {data.dtype} "
                     f"{data.shape}.")
  if labels.shape != (data.shape[0],) or labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"CIFAR-10 file {path!r}: b'labels' must be {data.shape[0]} ints in 0..9.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def check_cifar_dir(path: Optional[str]) -> str:
  """Raises FileNotFoundError unless `path` is a CIFAR-10 python directory; returns it expanded."""
  if path is None:
    raise FileNotFoundError("data.name='cifar10' needs data.path = the extracted 'cifar-10-batches-py' "
                            f"directory ({', '.join(CIFAR_TRAIN_FILES)}, {CIFAR_TEST_FILE}); nothing is "
                            "downloaded.")
  path = os.path.expanduser(str(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"data.path={path!r} is not a directory (expected the CIFAR-10 python "
                            "directory 'cifar-10-batches-py').")
  for name in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,):
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(f"CIFAR-10 file {os.path.join(path, name)!r} not found (data.path={path!r} "
                              f"must hold {', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_TEST_FILE}).")
  return path


def load_cifar10_arrays(path: str):
  """CIFAR-10 directory → (train uint8 (N,32,32,3), train labels, test uint8, test labels, names)."""
  path = check_cifar_dir(path)
  parts = [_read_cifar_batch(os.path.join(path, name)) for name in CIFAR_TRAIN_FILES]
  x_train = np.concatenate([p[0] for p in parts])
  y_train = np.concatenate([p[1] for p in parts])
  x_test, y_test = _read_cifar_batch(os.path.join(path, CIFAR_TEST_FILE))
  names = None
  meta = os.path.join(path, CIFAR_META_FILE)
  if os.path.isfile(meta):
    with open(meta, "rb") as f:
      m = pickle.load(f, encoding="bytes")
    if isinstance(m, dict) and b"label_names" in m:
      names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in m[b"label_names"])
  return x_train, y_train, x_test, y_test, names


class ImageDataset(Dataset):
  """Image classification with the `Dataset` interface.

  Batches: ``"image"`` float32 (b, S, S, 3) normalised per channel, ``"label"`` int32 (b,); eval
  batches add ``"valid"`` bool (b,).

  Args:
    name: "digits" or "cifar10".
    path: None for digits (must be); the CIFAR-10 directory for cifar10.
    seed, num_train, num_eval: as in the data config (None = all).
    image_size: output side S.
    augment, crop_padding: training augmentation (see the module docstring).
  """

  EVAL_SPLITS = ("eval",)

  def __init__(self, *, name: str, path: Optional[str] = None, seed: int = 0,
               num_train: Optional[int] = None, num_eval: Optional[int] = None,
               image_size: int = DEFAULT_IMAGE_SIZE, augment: bool = False,
               crop_padding: int = DEFAULT_CROP_PADDING):
    check_choice("name", name, ("digits", "cifar10"))
    check_int("data.seed", seed, minimum=0)
    check_int("data.num_train", num_train, minimum=1, allow_none=True)
    check_int("data.num_eval", num_eval, minimum=1, allow_none=True)
    check_int("data.image_size", image_size, minimum=1)
    check_int("data.crop_padding", crop_padding, minimum=0)
    check_bool("data.augment", augment)
    self.label_names = None
    if name == "digits":
      if path is not None:
        raise ValueError(f"data.path={path!r} must be None for data.name='digits' (the images ship with "
                         "scikit-learn).")
      images, labels = load_digits_arrays(image_size)
      x_train, y_train = images[:-DIGITS_NUM_EVAL], labels[:-DIGITS_NUM_EVAL]
      x_eval, y_eval = images[-DIGITS_NUM_EVAL:], labels[-DIGITS_NUM_EVAL:]
      scale = 1.0
    else:
      check_cifar_dir(path)
      x_train, y_train, x_eval, y_eval, self.label_names = load_cifar10_arrays(path)
      if image_size != 32:
        x_train = resize_bilinear(x_train.astype(np.float32) / 255.0, (image_size, image_size))
        x_eval = resize_bilinear(x_eval.astype(np.float32) / 255.0, (image_size, image_size))
        scale = 1.0
      else:
        scale = 1.0 / 255.0  # Kept as uint8; scaled per batch.
    for arg, want, have in (("num_train", num_train, len(y_train)), ("num_eval", num_eval, len(y_eval))):
      if want is not None and want > have:
        raise ValueError(f"data.{arg}={want} exceeds the {have} examples of {name!r}.")
    if num_train is not None:
      x_train, y_train = x_train[:num_train], y_train[:num_train]
    if num_eval is not None:
      x_eval, y_eval = x_eval[:num_eval], y_eval[:num_eval]
    if len(y_train) == 0 or len(y_eval) == 0:
      raise ValueError(f"{name!r}: empty split (train {len(y_train)}, eval {len(y_eval)} examples).")
    self.name = name
    self._scale = np.float32(scale)
    self._x_train, self._y_train = x_train, y_train
    self._x_eval, self._y_eval = x_eval, y_eval
    self.mean, self.std = self._channel_stats(x_train, scale)
    self.augment = augment
    self.crop_padding = int(crop_padding)
    super().__init__(seed=seed, num_train=len(y_train))
    counts = np.bincount(y_eval, minlength=NUM_CLASSES)
    self.info = {
        "kind": "image",
        "num_classes": NUM_CLASSES,
        "image_shape": (int(image_size), int(image_size), 3),
        "num_train": len(y_train),
        "num_eval": len(y_eval),
        "majority_accuracy": float(counts.max() / len(y_eval)),
        "pad_id": None,
        "mean": tuple(float(v) for v in self.mean),
        "std": tuple(float(v) for v in self.std),
    }

  @staticmethod
  def _channel_stats(x: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32 (3,)) of `x * scale`, accumulated in float64."""
    s = np.zeros(3, np.float64)
    s2 = np.zeros(3, np.float64)
    n = 0
    for lo in range(0, len(x), 5000):
      part = x[lo:lo + 5000].astype(np.float64) * scale
      s += part.sum(axis=(0, 1, 2))
      s2 += (part * part).sum(axis=(0, 1, 2))
      n += part.shape[0] * part.shape[1] * part.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # A constant channel is only centred.
    return mean.astype(np.float32), std.astype(np.float32)

  def _normalise(self, x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) * self._scale - self.mean) / self.std

  def _train_examples(self, indices: np.ndarray, step: int, rows: np.ndarray) -> Batch:
    images = self._normalise(self._x_train[indices])
    if self.augment:
      p = self.crop_padding
      h, w = images.shape[1:3]
      padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
      for r, row in enumerate(rows):
        rng = row_rng(self.seed, TRAIN_STREAM, step, row)
        dy, dx = rng.integers(0, 2 * p + 1, size=2)
        flip = rng.random() < 0.5
        crop = padded[r, dy:dy + h, dx:dx + w]
        images[r] = crop[:, ::-1] if flip else crop
    return {"image": images, "label": self._y_train[indices].copy()}

  def _num_eval_examples(self, split: str) -> int:
    return len(self._y_eval)

  def _eval_examples(self, indices: np.ndarray, split: str) -> Batch:
    return {"image": self._normalise(self._x_eval[indices]), "label": self._y_eval[indices].copy()}
