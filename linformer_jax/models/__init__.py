"""Models. ``LinformerSelfAttention`` is re-exported here as part of the model API."""
from linformer_jax.layers.attention import FullSelfAttention, LinformerSelfAttention
from linformer_jax.models import linformer
from linformer_jax.models.linformer import (Linformer, LinformerClassifier, LinformerConfig, LinformerEncDec,
                                            LinformerFields, LinformerLM, count_projection_matrices, shift_right)
from linformer_jax.models.registry import create_model, get_classifier, list_models, reset_classifier
from linformer_jax.models.vit import VisionTransformer
from linformer_jax.models.xcit import (LPI, XCA, ClassAttentionBlock, ConvPatchEmbed,
                                       FourierPositionalEncoding, XCABlock, XCiT)

# The constants are assigned (not imported) so that each has its ``#:`` doc here, where autodoc looks for it.
#: Values of the Linformer models' ``attention`` field (``linformer.ATTENTIONS``).
ATTENTIONS = linformer.ATTENTIONS
#: The ``ValueError`` message for ``causal=True`` with Linformer attention (``linformer.CAUSAL_ERROR``).
CAUSAL_ERROR = linformer.CAUSAL_ERROR
#: Values of the Linformer models' ``norm`` field (``linformer.NORMS``).
NORMS = linformer.NORMS

__all__ = ["FullSelfAttention", "LinformerSelfAttention", "ATTENTIONS", "CAUSAL_ERROR", "NORMS", "Linformer",
           "LinformerClassifier", "LinformerConfig", "LinformerEncDec", "LinformerFields", "LinformerLM",
           "count_projection_matrices", "shift_right", "create_model", "get_classifier", "list_models",
           "reset_classifier", "VisionTransformer", "LPI", "XCA", "ClassAttentionBlock", "ConvPatchEmbed",
           "FourierPositionalEncoding", "XCABlock", "XCiT"]
