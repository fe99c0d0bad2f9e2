"""Command-line converters: ``python -m linformer_jax.convert <kind> ...``.

    python -m linformer_jax.convert xcit --name xcit_nano_12_p16_224 \\
        --src xcit_nano_12_p16_224.safetensors --out /abs/or/relative/ckpt_dir

reads the file with ``load_state_dict`` (``.safetensors`` without torch; ``.pth`` / ``.pt`` / ``.bin`` need torch
and are loaded with ``weights_only=True``), converts it with ``from_timm_xcit`` and writes an Orbax checkpoint
``{"params", "batch_stats"}`` to ``--out``; read it back with
``linformer_jax.convert.xcit.restore_xcit_checkpoint(out)``. Each converter is one subcommand (add a
``_add_<kind>(subparsers)`` below).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np


def _run_xcit(args: argparse.Namespace) -> int:
  import jax

  from linformer_jax.convert.io import load_state_dict
  from linformer_jax.convert.xcit import from_timm_xcit, save_xcit_checkpoint

  overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
  state_dict = load_state_dict(args.src)
  module, variables = from_timm_xcit(state_dict, args.name, **overrides)
  overrides["num_classes"] = module.num_classes  # stored so the restore needs no arguments
  out = save_xcit_checkpoint(args.out, variables, args.name, overrides, force=args.overwrite)
  for col in ("params", "batch_stats"):
    leaves = jax.tree.leaves(variables[col])
    print(f"{col}: {len(leaves)} arrays, {sum(int(np.prod(x.shape)) for x in leaves):,} values")
  print(f"wrote Orbax checkpoint of {args.name} (num_classes={module.num_classes}) from {args.src} to {out}")
  return 0


def _add_xcit(subparsers) -> None:
  p = subparsers.add_parser("xcit", help="timm / official XCiT weights → Orbax checkpoint",
                            description="Convert timm or official (facebookresearch/xcit) XCiT weights.")
  p.add_argument("--name", required=True, help="registered model name, e.g. xcit_nano_12_p16_224")
  p.add_argument("--src", required=True, help="weights file: .safetensors, or .pth/.pt/.bin (needs torch)")
  p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
  p.add_argument("--num-classes", type=int, default=None, help="default: rows of head.weight (0 = no head)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
  p.set_defaults(func=_run_xcit)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m linformer_jax.convert",
                                   description="Convert PyTorch checkpoints to linformer_jax Orbax checkpoints.")
  subparsers = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
  _add_xcit(subparsers)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (FileNotFoundError, FileExistsError, ImportError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
