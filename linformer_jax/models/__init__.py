"""Models. ``LinformerSelfAttention`` is re-exported here as part of the model API."""
from linformer_jax.layers.attention import FullSelfAttention, LinformerSelfAttention
from linformer_jax.models.linformer import (ATTENTIONS, CAUSAL_ERROR, NORMS, Linformer,
                                            LinformerClassifier, LinformerEncDec, LinformerFields,
                                            LinformerLM, count_projection_matrices, shift_right)

__all__ = ["FullSelfAttention", "LinformerSelfAttention", "ATTENTIONS", "CAUSAL_ERROR", "NORMS", "Linformer",
           "LinformerClassifier", "LinformerEncDec", "LinformerFields", "LinformerLM",
           "count_projection_matrices", "shift_right"]
