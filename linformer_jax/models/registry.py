"""Model registry: every model the trainer trains, under one name each, and the timm-style fine-tuning API.

Names: ``linformer_lm``, ``linformer_classifier``, ``linformer_encdec`` (no preset: every required field is an
override), timm's XCiT names (``xcit_nano_12_p16_224`` …) and the ViT/DeiT baselines (``vit_tiny_patch16_224`` …).

    model = create_model("xcit_nano_12_p16_224", num_classes=10)
    lm = create_model("linformer_lm", vocab_size=256, max_len=128, dim=64, depth=2, num_heads=4, k=32)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)))
    new_model, transfer = reset_classifier(model, num_classes=5)
    new_variables = transfer(variables, rng)          # everything but the head carried over
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from linformer_jax.models.linformer import LinformerClassifier, LinformerEncDec, LinformerLM
from linformer_jax.models.vit import VisionTransformer
from linformer_jax.models.xcit import XCiT

# XCiT variants (paper Table 1 / timm): embed_dim, depth, heads, LayerScale eta, tokens_norm.
_XCIT = {
    "nano_12": dict(embed_dim=128, depth=12, num_heads=4, eta=1.0, tokens_norm=False),
    "tiny_12": dict(embed_dim=192, depth=12, num_heads=4, eta=1.0, tokens_norm=True),
    "tiny_24": dict(embed_dim=192, depth=24, num_heads=4, eta=1e-5, tokens_norm=True),
    "small_12": dict(embed_dim=384, depth=12, num_heads=8, eta=1.0, tokens_norm=True),
    "small_24": dict(embed_dim=384, depth=24, num_heads=8, eta=1e-5, tokens_norm=True),
    "medium_24": dict(embed_dim=512, depth=24, num_heads=8, eta=1e-5, tokens_norm=True),
    "large_24": dict(embed_dim=768, depth=24, num_heads=16, eta=1e-5, tokens_norm=True),
}
_VIT = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

_REGISTRY: dict[str, tuple[type, dict]] = {
    "linformer_lm": (LinformerLM, {}),
    "linformer_classifier": (LinformerClassifier, {}),
    "linformer_encdec": (LinformerEncDec, {}),
}
for _variant, _cfg in _XCIT.items():
  for _patch in (16, 8):
    for _res in (224, 384):
      _REGISTRY[f"xcit_{_variant}_p{_patch}_{_res}"] = (XCiT, dict(_cfg, patch_size=_patch, img_size=_res))
for _size, _cfg in _VIT.items():
  for _res in (224, 384):
    _REGISTRY[f"vit_{_size}_patch16_{_res}"] = (VisionTransformer, dict(_cfg, patch_size=16, img_size=_res))
  _REGISTRY[f"deit_{_size}_patch16_224"] = (VisionTransformer, dict(_cfg, patch_size=16, img_size=224))


def list_models(pattern: str = "*") -> list[str]:
  """Registered names matching a shell-style pattern, e.g. ``list_models("xcit_*_p8_*")``."""
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: a name of ``list_models()``.
    **overrides: module fields that replace the preset's (e.g. num_classes=10, drop_path_rate=0.1); the Linformer
      names have no preset, so their required fields (max_len, dim, depth, num_heads, k, vocab_size, …) go here.

  Returns:
    The (unbound) flax module.

  Raises:
    ValueError: an unknown name. TypeError: an override that is not a field of the model.
  """
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.split("_")[0] == name.split("_")[0]] or list(_REGISTRY)
    raise ValueError(f"unknown model name={name!r}; registered names include: {', '.join(sorted(close))}.")
  unknown = sorted(set(overrides) - model_fields(name))
  if unknown:
    raise TypeError(unknown_fields_message(name, unknown))
  cls, cfg = _REGISTRY[name]
  return cls(**{**cfg, **overrides})


def model_fields(name: str) -> frozenset[str]:
  """The fields ``create_model(name, **overrides)`` accepts (the module's dataclass fields)."""
  cls, _ = _REGISTRY[name]
  return frozenset(f for f in cls.__dataclass_fields__ if f not in ("parent", "name"))


def unknown_fields_message(name: str, unknown: list[str]) -> str:
  """'unknown field(s) … of <name> (did you mean …?); allowed fields: …' for overrides that are not fields."""
  fields = sorted(model_fields(name))
  close = [m for u in unknown for m in difflib.get_close_matches(u, fields, n=1)]
  hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
  return (f"unknown field(s) {', '.join(map(repr, unknown))} for model {name!r} ({_REGISTRY[name][0].__name__})"
          f"{hint}; allowed fields: {', '.join(fields)}.")


def get_classifier(variables) -> dict:
  """The classifier head's parameters {"kernel": (C, num_classes), "bias": (num_classes,)}."""
  params = variables["params"]
  if "head" not in params:
    raise ValueError("these variables have no 'head' (the model was built with num_classes=0).")
  return params["head"]


def reset_classifier(model: nn.Module, num_classes: int) -> tuple[nn.Module, Callable]:
  """timm's ``reset_classifier``: returns ``(new_model, transfer)`` where ``new_model`` has a fresh head with
  ``num_classes`` outputs (0 = none) and ``transfer(variables, rng) -> new_variables`` carries every other
  parameter and batch statistic over and initialises the new head."""
  new_model = model.clone(num_classes=num_classes)

  def transfer(variables, rng: jax.Array):
    # the head is the only parameter that depends on num_classes: init it alone via a 1-token forward_head
    new_vars = unfreeze(jax.tree.map(lambda a: a, variables))
    new_vars["params"].pop("head", None)
    if num_classes:
      dim = jax.tree.leaves(variables["params"]["cls_token"])[0].shape[-1]
      head = nn.Dense(num_classes, kernel_init=nn.initializers.truncated_normal(0.02))
      new_vars["params"]["head"] = head.init(rng, jnp.zeros((1, dim)))["params"]
    return new_vars

  return new_model, transfer
