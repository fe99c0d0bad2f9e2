"""Model registry with timm names, and the timm-style fine-tuning API (classifier access and replacement).

    model = create_model("xcit_nano_12_p16_224", num_classes=10)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)))
    new_model, transfer = reset_classifier(model, num_classes=5)
    new_variables = transfer(variables, rng)          # everything but the head carried over
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

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

_REGISTRY: dict[str, tuple[type, dict]] = {}
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
  """Builds a registered model; keyword overrides replace fields (e.g. num_classes=10, drop_path_rate=0.1)."""
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.split("_")[0] == name.split("_")[0]] or list(_REGISTRY)
    raise ValueError(f"unknown model name={name!r}; registered names include: {', '.join(sorted(close))}.")
  cls, cfg = _REGISTRY[name]
  fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown override(s) {unknown} for {name} ({cls.__name__}); allowed: {sorted(fields)}.")
  return cls(**{**cfg, **overrides})


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
