"""linformer_jax: efficient attention (Linformer, XCiT) as Flax linen modules.

The top level holds the two entry points that work on whole models: ``load_model`` (a trained run's module,
variables and config; ``linformer_jax.runs``) and ``generate`` (autoregressive decoding of a causal
``LinformerLM``; ``linformer_jax.decoding``). Both are imported on first use, so importing the package stays cheap.
"""
__version__ = "0.1.0"
__all__ = ["generate", "load_model"]

_LAZY = {"load_model": "linformer_jax.runs", "generate": "linformer_jax.decoding"}


def __getattr__(name):
  """``load_model`` and ``generate`` are imported from their modules on first use."""
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
