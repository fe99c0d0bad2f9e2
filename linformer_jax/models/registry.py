"""Model registry: every model the trainer trains, under one name each, and the timm-style classifier API.

Names: ``linformer_lm``, ``linformer_classifier``, ``linformer_encdec`` (no preset: every required field is an
override); the BERT-size presets ``linformer_base``, ``linformer_large`` (masked LM, tied output embedding) and
``linformer_base_classifier``, ``linformer_large_classifier`` (BERT/RoBERTa geometry, max_len 512, k 256,
sharing "kv"; vocab_size is required, and num_classes for the classifiers); timm's XCiT names
(``xcit_nano_12_p16_224`` …) and the ViT/DeiT baselines (``vit_tiny_patch16_224`` …)::

    model = create_model("xcit_nano_12_p16_224", num_classes=10)
    lm = create_model("linformer_lm", vocab_size=256, max_len=128, dim=64, depth=2, num_heads=4, k=32)
    bert = create_model("linformer_base", vocab_size=30522)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)))

Every classifier (``LinformerClassifier``, ``XCiT``, ``VisionTransformer``) has timm's classifier API::

    feats = model.apply(variables, x, method=model.forward_features)   # (batch, tokens, dim), before pooling
    pooled = model.apply(variables, feats, pre_logits=True, method=model.forward_head)   # (batch, dim)
    logits = model.apply(variables, feats, method=model.forward_head)  # = model.apply(variables, x)
    w = model.get_classifier(variables)     # {"kernel": (dim, classes), "bias": (classes,)}: logits = pooled·W + b
    new_model, transfer = model.reset_classifier(5)    # or reset_classifier(model, 5)
    new_variables = transfer(variables, rng)           # everything but the head carried over

(``LinformerClassifier`` also takes the mask: ``forward_features(x, mask)``, ``forward_head(feats, mask)``; its
``get_classifier`` needs head="linear", and raises a ValueError for the default MLP head.)
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

import dataclasses

import flax.linen as nn

from linformer_jax._validate import as_dtype
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

# BERT / RoBERTa geometry (Devlin et al. 2019, Liu et al. 2019) with the Linformer paper's k=256 at n=512 and one
# E=F per layer; the vocabulary is the user's, so vocab_size is a required override of these presets.
_BERT = {
    "base": dict(depth=12, num_heads=12, dim=768, dim_ff=3072),
    "large": dict(depth=24, num_heads=16, dim=1024, dim_ff=4096),
}
_BERT_LINFORMER = dict(max_len=512, k=256, sharing="kv", pos_emb="learned")

_REGISTRY: dict[str, tuple[type, dict]] = {
    "linformer_lm": (LinformerLM, {}),
    "linformer_classifier": (LinformerClassifier, {}),
    "linformer_encdec": (LinformerEncDec, {}),
}
# Fields a name needs as overrides besides the module's fields without a default.
_REQUIRED: dict[str, tuple[str, ...]] = {}
for _size, _cfg in _BERT.items():
  _REGISTRY[f"linformer_{_size}"] = (LinformerLM, dict(_cfg, **_BERT_LINFORMER, tie_embeddings=True))
  _REGISTRY[f"linformer_{_size}_classifier"] = (LinformerClassifier, dict(_cfg, **_BERT_LINFORMER))
  _REQUIRED[f"linformer_{_size}"] = _REQUIRED[f"linformer_{_size}_classifier"] = ("vocab_size",)
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
    **overrides: module fields that replace the preset's (e.g. num_classes=10, drop_path_rate=0.1); the names
      linformer_lm/_classifier/_encdec have no preset, so their required fields (max_len, dim, depth, num_heads,
      k, vocab_size, …) go here; the BERT-size presets need vocab_size (and num_classes for the classifiers).
      Every model has dtype (compute) and param_dtype (storage): jnp.float32 | jnp.bfloat16 | jnp.float16, or
      their names.

  Returns:
    The (unbound) flax module.

  Raises:
    ValueError: an unknown name, or an unknown dtype/param_dtype.
    TypeError: an override that is not a field of the model, or a required field missing.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from linformer_jax.models import create_model, list_models
    >>> list_models("xcit_nano_*")
    ['xcit_nano_12_p16_224', 'xcit_nano_12_p16_384', 'xcit_nano_12_p8_224', 'xcit_nano_12_p8_384']
    >>> lm = create_model("linformer_lm", vocab_size=256, max_len=64, dim=32, depth=2, num_heads=4, k=16)
    >>> tokens = jnp.zeros((2, 64), jnp.int32)
    >>> variables = lm.init(jax.random.key(0), tokens)
    >>> lm.apply(variables, tokens).shape
    (2, 64, 256)
    >>> model = create_model("xcit_nano_12_p16_224", num_classes=10, dtype="bfloat16")
    >>> model.embed_dim, model.depth, jnp.dtype(model.dtype).name
    (128, 12, 'bfloat16')
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))  # no computation
    >>> shapes["params"]["head"]["kernel"].shape
    (128, 10)
  """
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.split("_")[0] == name.split("_")[0]] or list(_REGISTRY)
    raise ValueError(f"unknown model name={name!r}; registered names include: {', '.join(sorted(close))}.")
  unknown = sorted(set(overrides) - model_fields(name))
  if unknown:
    raise TypeError(unknown_fields_message(name, unknown))
  for key in ("dtype", "param_dtype"):  # a name ("bfloat16") or a dtype (jnp.bfloat16) → the jnp dtype
    if key in overrides:
      overrides[key] = as_dtype(key, overrides[key])
  cls, cfg = _REGISTRY[name]
  missing = [f for f in required_fields(name) if f not in overrides]
  if missing:
    hint = (" The presets fix the geometry, not the vocabulary: pass your tokenizer's size (e.g. vocab_size=30522 "
            "for BERT's uncased WordPiece)." if "vocab_size" in missing and cfg else "")
    raise TypeError(f"create_model({name!r}) needs the field(s) {', '.join(missing)} as overrides, e.g. "
                    f"create_model({name!r}, {', '.join(f'{m}=...' for m in missing)}).{hint}")
  return cls(**{**cfg, **overrides})


def required_fields(name: str) -> tuple[str, ...]:
  """The fields ``create_model(name, ...)`` cannot do without: the module's fields without a default that the
  name's preset does not set, and those the preset requires (``vocab_size`` of the BERT-size presets)."""
  cls, cfg = _REGISTRY[name]
  no_default = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in cfg]
  return tuple(dict.fromkeys(no_default + list(_REQUIRED.get(name, ()))))


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


def get_classifier(model_or_variables, variables=None) -> dict:
  """timm's ``get_classifier``: the linear map that produces the logits from the pre-logits features.

  ``get_classifier(model, variables)`` is ``model.get_classifier(variables)``. The older form
  ``get_classifier(variables)`` reads ``params["head"]`` and refuses variables with an MLP head (a ``pre_logits``
  layer, ``LinformerClassifier(head="mlp")``).

  Returns:
    {"kernel": (features, num_classes), "bias": (num_classes,)}.

  Raises:
    ValueError: the head is not linear (MLP head) or absent (num_classes=0). TypeError: a model without the
      classifier API, or a model without its variables.
  """
  if variables is not None:
    return _classifier_method(model_or_variables, "get_classifier")(variables)
  if isinstance(model_or_variables, nn.Module):
    raise TypeError("get_classifier(model) needs the variables too: get_classifier(model, variables).")
  params = model_or_variables["params"]
  if "pre_logits" in params:
    raise ValueError("get_classifier: these variables have an MLP head (pre_logits → activation → head), whose "
                     "logits are not linear in the pooled features; use a LinformerClassifier with head='linear'.")
  if "head" not in params:
    raise ValueError("get_classifier: these variables have no 'head' (the model was built with num_classes=0).")
  return {"kernel": params["head"]["kernel"], "bias": params["head"]["bias"]}


def reset_classifier(model: nn.Module, num_classes: int) -> tuple[nn.Module, Callable]:
  """timm's ``reset_classifier``: ``model.reset_classifier(num_classes)``, i.e. ``(new_model, transfer)`` where
  ``new_model`` has a fresh head with ``num_classes`` outputs (0 = none, XCiT/ViT only) and
  ``transfer(variables, rng) -> new_variables`` carries every other parameter and batch statistic over and
  initialises the new head."""
  return _classifier_method(model, "reset_classifier")(num_classes)


def _classifier_method(model, method: str) -> Callable:
  if not isinstance(model, nn.Module) or not hasattr(model, method):
    raise TypeError(f"{method} needs a classifier (LinformerClassifier, XCiT or VisionTransformer), got "
                    f"{type(model).__name__}.")
  return getattr(model, method)
