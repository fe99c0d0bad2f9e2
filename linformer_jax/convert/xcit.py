"""Load timm / official (facebookresearch/xcit) XCiT weights into ``linformer_jax.models.xcit.XCiT``.

Usage::

    from linformer_jax.convert import load_state_dict, from_timm_xcit
    module, variables = from_timm_xcit(load_state_dict("xcit_nano_12_p16_224.safetensors"), "xcit_nano_12_p16_224")
    logits = module.apply(variables, images_nhwc)          # images (B, H, W, 3), H and W multiples of 16

Pure numpy + JAX: torch is never imported (``load_state_dict`` only imports it for ``.pth`` files).

Accepted layouts (C = embed_dim, h heads, d_h = C / h):

* timm (``timm.create_model(...).state_dict()``, HF hub ``timm/xcit_*``): ``pos_embed.*``; class attention as
  separate ``cls_attn_blocks.j.attn.{q,k,v}.{weight,bias}`` (C, C), (C,).
* official (``dl.fbaipublicfiles.com/xcit/*.pth``): ``{"model": state_dict, ...}``; ``pos_embeder.*``; class
  attention fused ``cls_attn_blocks.j.attn.qkv.{weight,bias}`` (3C, C), (3C,), rows q | k | v.

A ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper, a DistributedDataParallel ``module.`` prefix and the
BatchNorm ``num_batches_tracked`` counters are removed.

Mapping (PyTorch tensor W → Flax leaf; every shape is checked against ``jax.eval_shape(module.init, ...)``)::

    conv (O, I, kh, kw), depthwise (C, 1, 3, 3)   → kernel W.transpose(2, 3, 1, 0): (kh, kw, I, O) / (3, 3, 1, C)
      patch_embed.proj.{2i}.0.weight              → patch_embed/conv_i/kernel
      patch_embed.proj.{2i}.1.*                   → patch_embed/bn_i          (stage i; odd indices are GELUs)
    Linear (out, in)                              → kernel Wᵀ (in, out); bias unchanged
      blocks.i.attn.qkv / attn.proj               → blocks_i/attn/qkv / attn/proj
      *.mlp.fc1 / *.mlp.fc2                       → */mlp/wi / */mlp/wo;  head → head
    class attention (FullSelfAttention DenseGeneral kernels)
      cls_attn_blocks.j.attn.{q,k,v}.weight (C, C) → cls_attn_blocks_j/attn/{query,key,value}/kernel
                                                     Wᵀ.reshape(C, h, d_h); bias (C,) → (h, d_h)
      cls_attn_blocks.j.attn.proj.weight (C, C)   → cls_attn_blocks_j/attn/out/kernel Wᵀ.reshape(h, d_h, C)
    pos_embed.token_projection.weight (C, 64, 1, 1) → pos_embed/token_projection/kernel (64, C)
    blocks.i.attn.temperature (h, 1, 1)           → blocks_i/attn/temperature (h,)
    LayerNorm / BatchNorm weight, bias            → params .../scale, .../bias
    BatchNorm running_mean, running_var           → batch_stats .../mean, .../var
    cls_token (1, 1, C), gamma1/2/3 (C,)          → unchanged

``num_classes`` is taken from ``head.weight`` (0 when there is no head) unless given as an override.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from linformer_jax.convert.io import _to_numpy, unwrap_state_dict
from linformer_jax.models.registry import create_model
from linformer_jax.models.xcit import XCiT

#: The Flax variable collections of an ``XCiT`` (``batch_stats`` holds the BatchNorm running statistics).
COLLECTIONS = ("params", "batch_stats")
_MAX_LISTED = 20


# --- key layout ------------------------------------------------------------------------------------------------

def to_timm_layout(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Normalises a timm or official XCiT state_dict to timm's key layout, as numpy arrays.

  Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips a ``module.`` prefix present on every key, renames
  ``pos_embeder.`` → ``pos_embed.``, splits fused class-attention ``attn.qkv`` (3C, ...) into ``attn.{q,k,v}``
  (C, ...) and drops ``num_batches_tracked``.
  """
  sd = unwrap_state_dict(state_dict)
  keys = [str(k) for k in sd]
  strip = len("module.") if keys and all(k.startswith("module.") for k in keys) else 0
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    key = str(key)[strip:]
    if key.endswith("num_batches_tracked"):
      continue
    if key.startswith("pos_embeder."):
      key = "pos_embed." + key[len("pos_embeder."):]
    if key in out:
      raise ValueError(f"state_dict has {key!r} twice (both the official and the timm spelling).")
    out[key] = _to_numpy(key, value)
  for key in [k for k in out if re.fullmatch(r"cls_attn_blocks\.\d+\.attn\.qkv\.(weight|bias)", k)]:
    fused = out.pop(key)
    if fused.ndim < 1 or fused.shape[0] % 3:
      raise ValueError(f"{key}: fused q|k|v must have a leading dimension divisible by 3, got {fused.shape}.")
    for part, value in zip("qkv", np.split(fused, 3, axis=0)):
      split_key = key.replace(".qkv.", f".{part}.")
      if split_key in out:
        raise ValueError(f"state_dict has both the fused {key!r} and the split {split_key!r}.")
      out[split_key] = value
  return out


# --- per-leaf rules ----------------------------------------------------------------------------------------------

# kind → (PyTorch shape expected for a Flax leaf shape s, conversion of the PyTorch array a to shape s)
_KINDS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda s: tuple(s), lambda a, s: a),
    "linear": (lambda s: (s[1], s[0]), lambda a, s: a.T),
    "conv": (lambda s: (s[3], s[2], s[0], s[1]), lambda a, s: a.transpose(2, 3, 1, 0)),
    "conv1x1": (lambda s: (s[1], s[0], 1, 1), lambda a, s: a.reshape(s[1], s[0]).T),
    "heads_in": (lambda s: (s[1] * s[2], s[0]), lambda a, s: a.T.reshape(s)),
    "heads_out": (lambda s: (s[2], s[0] * s[1]), lambda a, s: a.T.reshape(s)),
    "heads_bias": (lambda s: (s[0] * s[1],), lambda a, s: a.reshape(s)),
    "temperature": (lambda s: (s[0], 1, 1), lambda a, s: a.reshape(s)),
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_HEAD_NAMES = {"query": "q", "key": "k", "value": "v", "out": "proj"}


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(timm key, kind) for a Flax leaf path (collection excluded), e.g.
  ("cls_attn_blocks_1", "attn", "query", "kernel") → ("cls_attn_blocks.1.attn.q.weight", "heads_in")."""
  *modules, leaf = path
  parts = []
  for i, m in enumerate(modules):
    stem = re.fullmatch(r"(conv|bn)_(\d+)", m) if i > 0 and modules[0] == "patch_embed" else None
    block = re.fullmatch(r"((?:cls_attn_)?blocks)_(\d+)", m)
    if stem:
      parts += ["proj", str(2 * int(stem[2])), "0" if stem[1] == "conv" else "1"]
    elif block:
      parts += [block[1], block[2]]
    elif m in ("wi", "wo") and i > 0 and modules[i - 1] == "mlp":
      parts.append({"wi": "fc1", "wo": "fc2"}[m])
    elif m in _HEAD_NAMES and i > 0 and modules[i - 1] == "attn":
      parts.append(_HEAD_NAMES[m])
    else:
      parts.append(m)
  parts.append(_LEAF_NAMES.get(leaf, leaf))
  return ".".join(parts), _kind(modules, leaf)


def _kind(modules: list[str], leaf: str) -> str:
  owner = modules[-1] if modules else ""
  if leaf == "temperature":
    return "temperature"
  if owner in _HEAD_NAMES and modules[-2:-1] == ["attn"]:
    return {"kernel": "heads_out" if owner == "out" else "heads_in",
            "bias": "copy" if owner == "out" else "heads_bias"}[leaf]
  if leaf == "kernel":
    if owner == "token_projection":
      return "conv1x1"
    return "conv" if owner.startswith("conv") else "linear"
  return "copy"


# --- conversion --------------------------------------------------------------------------------------------------

def abstract_variables(module: XCiT) -> dict:
  """``jax.eval_shape`` of ``module.init`` on a (1, 2p, 2p, in_chans) image: {"params", "batch_stats"} of
  ShapeDtypeStructs (no memory allocated)."""
  side = 2 * module.patch_size
  images = jax.ShapeDtypeStruct((1, side, side, module.in_chans), jnp.float32)
  abstract = jax.eval_shape(module.init, jax.eval_shape(jax.random.key, 0), images)  # nothing compiled
  return {c: abstract.get(c, {}) for c in COLLECTIONS}


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f" … and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"{title} ({len(items)}): " + ", ".join(shown) + more


def convert_state_dict(state_dict: Mapping[str, Any], abstract: Mapping[str, Any]) -> dict:
  """Converts a timm-layout state_dict (see ``to_timm_layout``) to the variables described by ``abstract``
  ({"params": ..., "batch_stats": ...} of ShapeDtypeStructs). Raises ValueError listing every missing,
  unexpected and wrong-shaped key (in timm terms) at once."""
  sd = dict(state_dict)
  flat_out, missing, wrong = {}, [], []
  used = set()
  for col in COLLECTIONS:
    for path, leaf in flatten_dict(abstract.get(col, {})).items():
      key, kind = timm_key(path)
      src_shape_fn, convert = _KINDS[kind]
      want = tuple(int(d) for d in src_shape_fn(leaf.shape))
      if key not in sd:
        missing.append(f"{key} {want}")
        continue
      used.add(key)
      value = np.asarray(sd[key])
      if value.shape != want:
        wrong.append(f"{key}: got {value.shape}, expected {want} (→ {col}/{'/'.join(path)} {tuple(leaf.shape)})")
        continue
      flat_out[(col,) + path] = (convert, value, leaf)  # converted once every key is known to fit
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or wrong:
    report = [_listing(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                  ("wrong shapes", wrong)) if items]
    raise ValueError("the state_dict does not fit this model (check the model name and overrides such as "
                     "num_classes) — " + "; ".join(report))
  variables = unflatten_dict({k: jnp.asarray(np.asarray(convert(value, leaf.shape)).astype(leaf.dtype))
                              for k, (convert, value, leaf) in flat_out.items()})
  return {c: variables.get(c, {}) for c in COLLECTIONS}


def from_timm_xcit(state_dict: Mapping[str, Any], name: str, **overrides: Any) -> tuple[XCiT, dict]:
  """Builds ``create_model(name, **overrides)`` and converts a timm- or official-layout XCiT state_dict to it.

  Args:
    state_dict: {key: array or torch tensor}, possibly wrapped in {"model": ...} (e.g. from ``load_state_dict``).
    name: a registered XCiT name, e.g. "xcit_nano_12_p16_224" (see ``list_models("xcit_*")``).
    **overrides: model fields; ``num_classes`` defaults to ``head.weight.shape[0]`` (0 without a head).
  Returns:
    (module, variables) with variables = {"params": ..., "batch_stats": ...} of float32 jax arrays, ready for
    ``module.apply(variables, images)``, images (B, H, W, in_chans).
  Raises:
    ValueError: not an XCiT name, or missing / unexpected / wrong-shaped keys (all listed).
  """
  sd = to_timm_layout(state_dict)
  if "num_classes" not in overrides:
    overrides["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  module = create_model(name, **overrides)
  if not isinstance(module, XCiT):
    raise ValueError(f"{name!r} is not an XCiT model; from_timm_xcit converts XCiT weights only.")
  return module, convert_state_dict(sd, abstract_variables(module))


# --- Orbax checkpoints -------------------------------------------------------------------------------------------

def save_xcit_checkpoint(directory: str | os.PathLike, variables: Mapping[str, Any], name: str,
                         overrides: Optional[Mapping[str, Any]] = None, *, force: bool = False) -> pathlib.Path:
  """Writes ``{"params", "batch_stats"}`` as an Orbax checkpoint (``StandardCheckpointer``) in ``directory``,
  with the model name and overrides as custom metadata (read back by ``restore_xcit_checkpoint``).
  ``force`` overwrites an existing checkpoint (else FileExistsError). Returns the absolute directory."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).resolve()
  if directory.exists() and not force:
    raise FileExistsError(f"{directory} already exists; pass force=True (CLI: --overwrite) to replace it.")
  meta = {"model_name": name, "overrides": dict(overrides or {}), "format": "linformer_jax.xcit/v1"}
  json.dumps(meta)  # overrides must be JSON-serialisable
  state = {c: dict(variables.get(c, {})) for c in COLLECTIONS}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, state, force=force, custom_metadata=meta)
    ckptr.wait_until_finished()
  return directory


def restore_xcit_checkpoint(directory: str | os.PathLike, name: Optional[str] = None,
                            **overrides: Any) -> tuple[XCiT, dict]:
  """Reads a checkpoint written by ``save_xcit_checkpoint`` / ``python -m linformer_jax.convert xcit``.

  ``name`` defaults to the model name stored in the checkpoint; ``overrides`` are merged over the stored ones
  (which include ``num_classes``). Returns (module, {"params", "batch_stats"}) restored against
  ``jax.eval_shape`` of the module, so a checkpoint of another shape raises instead of loading silently.
  """
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).resolve()
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {str(directory)!r}.")
  with ocp.StandardCheckpointer() as ckptr:
    meta = dict(ckptr.metadata(directory).custom_metadata or {})
    name = name or meta.get("model_name")
    if not name:
      raise ValueError(f"{directory} stores no model name; pass name=... (e.g. 'xcit_nano_12_p16_224').")
    module = create_model(name, **{**meta.get("overrides", {}), **overrides})
    if not isinstance(module, XCiT):
      raise ValueError(f"{name!r} is not an XCiT model.")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          abstract_variables(module))
    restored = ckptr.restore(directory, target)
  return module, {c: restored.get(c, {}) for c in COLLECTIONS}
