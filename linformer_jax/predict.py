"""Inference on a loaded run (``linformer_jax.runs.load_model``): inputs prepared exactly as its dataset does.

Usage::

    module, variables, config = load_model(workdir)
    info = read_dataset_info(workdir, config)
    fill_masked(module, variables, info, "The qu_ck brown fox")          # masked LM: "The quick brown fox"
    classify_listops(module, variables, info, "[MAX 2 9 [MIN 4 7 ] 0 ]")  # (10,) class probabilities
    classify_image(module, variables, info, read_image("digit.png"))     # (10,) class probabilities

``input_kind(info)`` says which of the three a run takes ("mlm", "listops" or "image"); each function raises
ValueError for a run of another kind or an input the model cannot take.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from linformer_jax.data import listops
from linformer_jax.data.images import resize_bilinear

#: The input kinds of ``input_kind``, each with the description (and CLI flags) used in error messages.
INPUT_KINDS = {"mlm": "text with masked bytes (--text, --mask_char)", "listops": "a ListOps expression (--text)",
               "image": "an image file (--image)"}


def input_kind(info: dict) -> str:
  """"mlm", "listops" or "image": the input a run with dataset info ``info`` takes."""
  kind = info.get("kind")
  if kind == "mlm" or kind == "image":
    return kind
  if kind == "classification" and info.get("vocab") is not None and tuple(info["vocab"]) == listops.VOCAB:
    return "listops"
  raise ValueError(f"no prediction for data of kind {kind!r} (supported: masked LM, ListOps, images).")


def check_input_kind(info: dict, wanted: str) -> None:
  """ValueError unless the run takes ``wanted`` input ("mlm", "listops" or "image"), naming what it takes."""
  have = input_kind(info)
  if have != wanted:
    raise ValueError(f"this run's model takes {INPUT_KINDS[have]}, not {INPUT_KINDS[wanted].split(' (')[0]}.")


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _logits(module: nn.Module, variables: Any, *inputs) -> np.ndarray:
  """float32 logits of one deterministic forward pass (the modules' call defaults are inference)."""
  return np.asarray(jax.jit(module.apply)(variables, *inputs), np.float32)


def encode_masked_text(text: str, info: dict, mask_char: str = "_") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The MLM inputs of ``text`` whose ``mask_char`` bytes are to be filled.

  Args:
    text: UTF-8 text of at most ``info["max_len"]`` bytes.
    info: the run's dataset info (``mask_id``, ``pad_id``, ``max_len``).
    mask_char: a one-byte (ASCII) character marking the bytes to predict.

  Returns:
    (inputs int32 (1, max_len): bytes, MASK at the masked ones, PAD after the text; mask bool (1, max_len): True
    on the text; positions int64 (m,) of the masked bytes).

  Raises:
    ValueError: a multi-byte mask character, no mask character in the text, or a text longer than max_len.
  """
  check_input_kind(info, "mlm")
  marker = mask_char.encode("utf-8")
  if len(mask_char) != 1 or len(marker) != 1:
    raise ValueError(f"mask_char={mask_char!r} must be one ASCII character (the model predicts single bytes).")
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  max_len = int(info["max_len"])
  if data.size > max_len:
    raise ValueError(f"the text has {data.size} bytes; the model takes at most max_len={max_len}.")
  positions = np.flatnonzero(data == marker[0])
  if positions.size == 0:
    raise ValueError(f"the text has no {mask_char!r}: mark the bytes to fill with it (or pick --mask_char).")
  inputs = np.full((1, max_len), int(info["pad_id"]), np.int32)
  inputs[0, :data.size] = data
  inputs[0, positions] = int(info["mask_id"])
  mask = np.zeros((1, max_len), bool)
  mask[0, :data.size] = True
  return inputs, mask, positions


def fill_masked(module: nn.Module, variables: Any, info: dict, text: str, mask_char: str = "_") -> str:
  """``text`` with each ``mask_char`` replaced by the model's most likely byte (bytes 0..255 only; the result is
  decoded as UTF-8, invalid sequences as U+FFFD). Arguments and errors as ``encode_masked_text``."""
  inputs, mask, positions = encode_masked_text(text, info, mask_char)
  logits = _logits(module, variables, inputs, mask)[0]
  filled = bytearray(text.encode("utf-8"))
  for pos in positions:
    filled[pos] = int(np.argmax(logits[pos, :256]))
  return filled.decode("utf-8", errors="replace")


def encode_listops(text: str, info: dict) -> tuple[np.ndarray, np.ndarray]:
  """The model inputs of a ListOps expression, tokenised as the dataset does (``data.listops.encode``).

  Args:
    text: e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` (LRA's parentheses are allowed and dropped).
    info: the run's dataset info (``max_len``).

  Returns:
    (inputs int32 (1, max_len) token ids padded with 0, mask bool (1, max_len)).

  Raises:
    ValueError: an empty expression, a token outside the vocabulary, or more than max_len tokens.
  """
  check_input_kind(info, "listops")
  ids = listops.encode(text)
  unknown = [t for t in listops.tokenize(text) if t not in listops.TOKEN_TO_ID]
  if unknown:
    raise ValueError(f"not ListOps tokens: {', '.join(map(repr, unknown[:8]))}; allowed: digits 0-9, "
                     f"{', '.join(listops.OPERATORS)} and ']' (closes an operator).")
  if ids.size == 0:
    raise ValueError("the ListOps expression is empty.")
  max_len = int(info["max_len"])
  if ids.size > max_len:
    raise ValueError(f"the expression has {ids.size} tokens; the model takes at most max_len={max_len}.")
  inputs = np.zeros((1, max_len), np.int32)
  inputs[0, :ids.size] = ids
  return inputs, inputs != listops.PAD_ID


def classify_listops(module: nn.Module, variables: Any, info: dict, text: str) -> np.ndarray:
  """Class probabilities float64 (num_classes,) of a ListOps expression (class c = the value c)."""
  return _softmax(_logits(module, variables, *encode_listops(text, info))[0])


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file (PNG, JPEG, … via matplotlib / Pillow) or a ``.npy`` array → float32 (H, W, C) in [0, 1].

  Raises:
    FileNotFoundError: no such file. ValueError: not a readable image.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file {path!r} not found.")
  try:
    if path.endswith(".npy"):
      image = np.load(path, allow_pickle=False)
    else:
      import matplotlib.image as mpimg  # pylint: disable=import-outside-toplevel
      image = mpimg.imread(path)
  except Exception as err:  # pylint: disable=broad-except  (Pillow / numpy raise many types)
    raise ValueError(f"{path!r} is not a readable image ({type(err).__name__}: {err}).") from None
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if image.dtype == np.uint16:
    return image.astype(np.float32) / 65535.0
  return image.astype(np.float32)


def preprocess_image(image: np.ndarray, info: dict, invert: bool = False) -> np.ndarray:
  """An image in [0, 1] → the model input float32 (1, S, S, 3), as the dataset prepares its images.

  Grey is replicated to 3 channels and an alpha channel dropped; the image is resized bilinearly
  (``data.images.resize_bilinear``) to the run's ``info["image_shape"]`` and normalised with its per-channel
  ``mean`` / ``std``. ``invert`` (1 − x) first: scikit-learn's digits are light strokes on black.

  Raises:
    ValueError: not an (H, W) or (H, W, 1|3|4) array.
  """
  check_input_kind(info, "image")
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise ValueError(f"expected an (H, W) or (H, W, 1|3|4) image, got shape {image.shape}.")
  if invert:
    image = np.concatenate([1.0 - image[..., :3], image[..., 3:]], -1)
  image = image[..., :3] if image.shape[-1] != 1 else np.repeat(image, 3, axis=-1)
  height, width = info["image_shape"][:2]
  image = resize_bilinear(image[None], (int(height), int(width)))
  return ((image - np.asarray(info["mean"], np.float32)) / np.asarray(info["std"], np.float32)).astype(np.float32)


def classify_image(module: nn.Module, variables: Any, info: dict, image: np.ndarray,
                   invert: bool = False) -> np.ndarray:
  """Class probabilities float64 (num_classes,) of an image in [0, 1] (``preprocess_image``'s arguments)."""
  return _softmax(_logits(module, variables, preprocess_image(image, info, invert))[0])
