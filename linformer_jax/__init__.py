"""linformer_jax: efficient attention (Linformer, XCiT) as Flax linen modules."""
__version__ = "0.1.0"
