"""Attention maps of XCiT and Linformer, drawn with matplotlib (Agg backend, PNG files).

    python -m experiments.plot_attention --out DIR [--model xcit_nano_12_p16_224] [--image PATH.npy|PATH.png]
        [--size 224] [--seed 0] [--checkpoint DIR] [--quick] [--flax-init]

Writes into DIR:
  cls_attention.png        per head, the CLS → patch attention of the last class-attention block, reshaped to the
                           Hp × Wp token grid and overlaid on the image;
  xca_attention.png        the d_h × d_h cross-covariance (channel) attention of the first and last XCA block, per head;
  linformer_attention.png  the P̄ = softmax(Q K̄ᵀ / √d_h) maps (n × k) per layer and head of a small random
                           Linformer on random tokens.
The maps are collected with ``module.apply(..., mutable=["intermediates"])`` (the modules ``sow`` them).

Weights: an Orbax checkpoint directory holding {"params", "batch_stats"} (``--checkpoint``), otherwise random. Random
weights are drawn with numpy from the shapes given by ``jax.eval_shape`` (every kernel N(0, 1/fan_in), norms scale 1 and
bias 0, LayerScale = eta, temperature 1, BatchNorm statistics 0 / 1): on a CPU, ``model.init`` compiles one XLA program
per parameter shape and takes tens of seconds; ``--flax-init`` uses it anyway (the model's own initialisers).
Without ``--image`` a synthetic picture (gradient, disk, square, stripes) is used. ``--quick`` keeps only the first two
XCA blocks of the model (a few seconds on a CPU, for smoke tests).
"""
from __future__ import annotations

import argparse
import functools
import os
import warnings
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from flax.core import unfreeze  # noqa: E402

from linformer_jax.models import Linformer, XCiT, create_model  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
QUICK_DEPTH = 2


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
  """(size, size, 3) float32 in [0, 1]: a colour gradient with a red disk, a blue square and diagonal stripes."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
  img = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 - 0.2 * xx], axis=-1)
  cy, cx = rng.uniform(0.25, 0.45, 2)
  disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 0.15 ** 2
  img[disk] = [0.9, 0.15, 0.1]
  sy, sx = rng.uniform(0.55, 0.7, 2)
  square = (np.abs(yy - sy) < 0.12) & (np.abs(xx - sx) < 0.12)
  img[square] = [0.1, 0.2, 0.85]
  stripes = (np.sin((xx + yy) * 40.0) > 0.6) & (yy > 0.8)
  img[stripes] = [0.95, 0.95, 0.2]
  return np.clip(img, 0.0, 1.0).astype(np.float32)


def load_image(path: str, size: int) -> np.ndarray:
  """A .npy array or an image file read by matplotlib → (size, size, 3) float32 in [0, 1]."""
  img = np.load(path) if path.endswith(".npy") else mpimg.imread(path)
  img = np.asarray(img)
  if img.dtype == np.uint8:
    img = img.astype(np.float32) / 255.0
  img = img.astype(np.float32)
  if img.ndim == 2:
    img = np.stack([img] * 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{path}: expected an (H, W), (H, W, 1|3|4) image, got shape {img.shape}.")
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  img = img[..., :3]
  if img.max() > 1.0:  # e.g. a float array in 0..255
    img = img / 255.0
  img = np.asarray(jax.image.resize(jnp.asarray(img), (size, size, 3), "bilinear"))
  return np.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
def _fan_in(path: tuple, shape: tuple) -> int:
  parent = path[-2] if len(path) > 1 else ""
  if parent in ("E", "F", "EF"):  # sequence projections (heads?, n, k): contraction over n
    return shape[-2]
  if len(shape) in (2, 4) or parent.startswith("out"):  # Dense (in, out), conv HWIO, attention out (h, d, C)
    return int(np.prod(shape[:-1]))
  return shape[0]  # query / key / value DenseGeneral (C, h, d)


def random_variables(model, example, seed: int = 0, eta: float = 1.0) -> dict:
  """Random variables for ``model`` with numpy, shaped by ``jax.eval_shape(model.init, …)`` (no XLA compile)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(unfreeze(shapes)).items():
    name, shape = path[-1], tuple(leaf.shape)
    if name in ("scale", "var", "temperature"):
      val = np.ones(shape)
    elif name in ("bias", "mean"):
      val = np.zeros(shape)
    elif name.startswith("gamma"):
      val = np.full(shape, eta)
    elif name in ("cls_token", "pos_embed"):
      val = 0.02 * rng.standard_normal(shape)
    else:
      val = rng.standard_normal(shape) / np.sqrt(max(_fan_in(path, shape), 1))
    out[path] = np.asarray(val, leaf.dtype)  # numpy leaves: no per-shape device conversion to compile
  return traverse_util.unflatten_dict(out)


def load_checkpoint(path: str) -> dict:
  """An Orbax (StandardCheckpointer / PyTreeCheckpointer) directory holding {"params", "batch_stats"}."""
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():  # "sharding info not provided": restored onto the default device, as wanted
    warnings.simplefilter("ignore", UserWarning)
    restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  missing = {"params", "batch_stats"} - set(restored)
  if missing:
    raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; it has {sorted(restored)}.")
  return {"params": restored["params"], "batch_stats": restored["batch_stats"]}


# ----------------------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sown_forward(model):
  """jit(apply with "intermediates" mutable), one per (hashable) module so repeated calls reuse the compile."""
  return jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))


def xcit_maps(model: XCiT, variables: dict, image: np.ndarray) -> dict:
  """Runs one image (H, W, 3) in [0, 1] and returns the sown maps:
  {"logits": (classes,), "cls": [(heads, 1 + N) per class-attention block], "xca": [(heads, d_h, d_h) per block],
   "grid": (Hp, Wp)}."""
  x = ((image - IMAGENET_MEAN) / IMAGENET_STD)[None].astype(np.float32)
  logits, state = _sown_forward(model)(variables, jnp.asarray(x))
  inter = state["intermediates"]
  xca = [np.asarray(inter[f"blocks_{i}"]["attn"]["attention_weights"][0][0]) for i in range(model.depth)
         if "attention_weights" in inter.get(f"blocks_{i}", {}).get("attn", {})]
  cls = [np.asarray(inter[f"cls_attn_blocks_{j}"]["attn"]["attention_weights"][0][0, :, 0])
         for j in range(model.cls_attn_layers)]
  grid = (image.shape[0] // model.patch_size, image.shape[1] // model.patch_size)
  return {"logits": np.asarray(logits[0]), "cls": cls, "xca": xca, "grid": grid}


def linformer_maps(seed: int = 0, n: int = 64, k: int = 16, dim: int = 32, depth: int = 2,
                   heads: int = 4) -> np.ndarray:
  """P̄ maps (depth, heads, n, k) of a random Linformer on random tokens (batch element 0)."""
  model = Linformer(max_len=n, dim=dim, depth=depth, num_heads=heads, k=k)
  x = jax.random.normal(jax.random.key(seed), (1, n, dim))
  variables = random_variables(model, x, seed)
  _, state = _sown_forward(model)(variables, x)
  inter = state["intermediates"]
  return np.stack([np.asarray(inter[f"layer_{i}"]["attention"]["attention_weights"][0][0])
                   for i in range(depth)])


# ----------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------
def plot_cls_attention(image: np.ndarray, cls: np.ndarray, grid: tuple, path: str, title: str) -> None:
  """cls (heads, 1 + N): CLS → patch weights of one class-attention block, drawn over the image."""
  heads = cls.shape[0]
  fig, axes = plt.subplots(1, heads + 1, figsize=(2.6 * (heads + 1), 3.0), squeeze=False, layout="constrained")
  axes = axes[0]
  axes[0].imshow(image)
  axes[0].set_title("image")
  h, w = image.shape[:2]
  for i in range(heads):
    m = cls[i, 1:].reshape(grid)  # row-major token grid; CLS → CLS weight dropped
    axes[i + 1].imshow(image)
    axes[i + 1].imshow(m, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    axes[i + 1].set_title(f"head {i} (cls {cls[i, 0]:.2f})")
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_xca_attention(maps: list, labels: list, path: str, title: str) -> None:
  """maps: list of (heads, d_h, d_h) arrays, one row each."""
  rows, heads = len(maps), maps[0].shape[0]
  fig, axes = plt.subplots(rows, heads, figsize=(2.4 * heads + 1, 2.5 * rows), squeeze=False,
                           layout="constrained")
  vmax = max(float(m.max()) for m in maps)
  for r, (m, label) in enumerate(zip(maps, labels)):
    for i in range(heads):
      ax = axes[r, i]
      im = ax.imshow(m[i], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
      ax.set_title(f"{label} head {i}", fontsize=8)
      ax.set_xlabel("key channel j", fontsize=7)
      ax.set_ylabel("query channel i", fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  fig.suptitle(title)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_linformer_attention(maps: np.ndarray, path: str, title: str) -> None:
  """maps (layers, heads, n, k)."""
  layers, heads = maps.shape[:2]
  fig, axes = plt.subplots(layers, heads, figsize=(2.4 * heads, 2.8 * layers), squeeze=False,
                           layout="constrained")
  for l in range(layers):
    for i in range(heads):
      ax = axes[l, i]
      ax.imshow(maps[l, i], cmap="magma", aspect="auto", interpolation="nearest")
      ax.set_title(f"layer {l} head {i}", fontsize=8)
      ax.set_xlabel(f"projected key (k={maps.shape[3]})", fontsize=7)
      ax.set_ylabel(f"query (n={maps.shape[2]})", fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(title)
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------
def build(model_name: str, size: int, quick: bool) -> XCiT:
  overrides = {"depth": QUICK_DEPTH} if quick else {}
  model = create_model(model_name, **overrides)
  if not isinstance(model, XCiT):
    raise ValueError(f"--model must be an XCiT model (xcit_*), got {model_name!r}.")
  if size % model.patch_size:
    raise ValueError(f"--size={size} must be a multiple of the patch size {model.patch_size}.")
  return model


def main(argv: Optional[list] = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory for the PNG files")
  p.add_argument("--model", default="xcit_nano_12_p16_224", help="registered XCiT name")
  p.add_argument("--image", default=None, help=".npy array or image file (PNG); default: synthetic image")
  p.add_argument("--size", type=int, default=224, help="image side (multiple of the patch size)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint", default=None, help='Orbax checkpoint directory with {"params", "batch_stats"}')
  p.add_argument("--quick", action="store_true", help=f"keep only {QUICK_DEPTH} XCA blocks (fast smoke run)")
  p.add_argument("--flax-init", action="store_true", help="random weights from model.init (slow on CPU)")
  args = p.parse_args(argv)
  try:
    model = build(args.model, args.size, args.quick)
  except ValueError as e:
    p.error(str(e))

  image = load_image(args.image, args.size) if args.image else synthetic_image(args.size, args.seed)
  example = jnp.zeros((1, args.size, args.size, model.in_chans), jnp.float32)
  if args.checkpoint:
    variables, source = load_checkpoint(args.checkpoint), f"checkpoint {args.checkpoint}"
  elif args.flax_init:
    variables, source = jax.jit(model.init)(jax.random.key(args.seed), example), "random (model.init)"
  else:
    variables, source = random_variables(model, example, args.seed, model.eta), "random"

  maps = xcit_maps(model, variables, image)
  os.makedirs(args.out, exist_ok=True)
  paths = {name: os.path.join(args.out, f"{name}.png")
           for name in ("cls_attention", "xca_attention", "linformer_attention")}
  desc = f"{args.model}{' (quick)' if args.quick else ''}, {source} weights, {args.size}x{args.size}"
  plot_cls_attention(image, maps["cls"][-1], maps["grid"], paths["cls_attention"],
                     f"class attention (last CA block): {desc}")
  xca = [maps["xca"][0], maps["xca"][-1]]
  labels = ["block 0", f"block {len(maps['xca']) - 1}"]
  plot_xca_attention(xca, labels, paths["xca_attention"], f"XCA channel attention: {desc}")
  plot_linformer_attention(linformer_maps(args.seed), paths["linformer_attention"],
                           "Linformer P̄ (random weights, random tokens): n=64, k=16")
  for path in paths.values():
    print(path)
  return {"paths": paths, "source": source, "logits": maps["logits"], "grid": maps["grid"]}


if __name__ == "__main__":
  main()
