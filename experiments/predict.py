"""Predictions of a trained run (``python -m experiments.train --workdir DIR``).

    python -m experiments.predict --workdir DIR --text "The qu_ck brown fox"       # masked LM: fills the _ bytes
    python -m experiments.predict --workdir DIR --text "[MAX 2 9 [MIN 4 7 ] 0 ]"   # ListOps: class probabilities
    python -m experiments.predict --workdir DIR --image digit.png [--invert]       # image runs: class probabilities

``--step N`` picks a checkpoint (default: the latest committed one); ``--mask_char`` the masked-LM marker
(default ``_``); ``--top K`` how many classes are printed. Errors (no such run, no checkpoint, an input of another
kind than the run's model takes, …) are printed as one line ``error: ...`` on stderr, exit status 1 (2 for bad
arguments). A thin CLI over ``linformer_jax.runs.load_model`` and ``linformer_jax.predict``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np

from experiments.cli import print_or_exit


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="masked-LM text with --mask_char bytes to fill, or a ListOps expression")
  source.add_argument("--image", help="an image file (PNG, JPEG, ... or .npy) for image runs")
  parser.add_argument("--mask_char", default="_", help="masked-LM: the character marking bytes to fill")
  parser.add_argument("--invert", action="store_true",
                      help="image runs: use 1 - pixel (digits are light strokes on black)")
  parser.add_argument("--top", type=int, default=5, help="classifiers: how many classes to print")
  return parser.parse_args(argv)


def class_lines(probs: np.ndarray, top: int, names: Optional[Sequence[str]] = None) -> list[str]:
  """``class <c>: <p>`` lines of the ``top`` most likely classes, most likely first."""
  order = np.argsort(-probs, kind="stable")[:max(top, 1)]
  return [f"class {names[c] if names else c}: {probs[c]:.4f}" for c in order]


def predict(args: argparse.Namespace) -> str:
  """The text printed for ``args``: the filled text, or the top class probabilities."""
  from linformer_jax import predict as pred  # pylint: disable=import-outside-toplevel
  from linformer_jax.runs import load_model, read_dataset_info  # pylint: disable=import-outside-toplevel
  # Cheap checks first: the run's input kind from config.json / dataset_info.json, before the model is restored.
  info = read_dataset_info(args.workdir)
  kind = pred.input_kind(info)
  given = "--image" if args.image is not None else "--text"
  if (kind == "image") != (given == "--image"):
    raise ValueError(f"the run in {args.workdir} takes {pred.INPUT_KINDS[kind]}, not {given}.")
  module, variables, _ = load_model(args.workdir, args.step)
  if kind == "mlm":
    return pred.fill_masked(module, variables, info, args.text, args.mask_char)
  if kind == "listops":
    return "\n".join(class_lines(pred.classify_listops(module, variables, info, args.text), args.top))
  probs = pred.classify_image(module, variables, info, pred.read_image(args.image), invert=args.invert)
  return "\n".join(class_lines(probs, args.top))


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  print_or_exit(lambda: predict(args))


if __name__ == "__main__":
  main()
