"""linformer_jax: efficient attention (Linformer, XCiT) as Flax linen modules."""
__version__ = "0.1.0"


def __getattr__(name):
  """``load_model`` (``linformer_jax.runs``) is imported on first use: importing the package stays cheap."""
  if name == "load_model":
    from linformer_jax.runs import load_model  # pylint: disable=import-outside-toplevel
    return load_model
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
