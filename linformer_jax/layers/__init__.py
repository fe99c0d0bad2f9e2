"""Layers: attention variants, the softmax attention kernel, sequence projections, feed-forward, embeddings.

Mixed precision: every layer with parameters has ``dtype`` (compute) and ``param_dtype`` (storage) fields, as flax's
own layers. Matmuls and convolutions take operands of ``dtype``; parameters are stored in ``param_dtype`` and cast
where used. What stays float32 with ``dtype=bfloat16`` (or float16), and why: LayerNorm and BatchNorm statistics and
normalisation (flax promotes them to at least float32: a mean or variance over hundreds of features in bfloat16
would carry errors of order 2^-8 · √features), the attention logits and softmax (``float32_einsum``: exponentials
amplify logit errors, and the row sums run over every key; the weights are cast to ``dtype`` for weights·V), the
loss (``linformer_jax.steps``: cross-entropy from logits cast to float32) and the optimizer state
(``linformer_jax.optim``: float32 moments, whatever the parameters' dtype).
"""
from linformer_jax.layers import attention, embeddings, mlp, projections, softmax_kernel
from linformer_jax.layers.attention import FullSelfAttention, LinformerSelfAttention
from linformer_jax.layers.conv import DepthwiseConv2D
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.embeddings import TokenEmbedder, sinusoidal_positions
from linformer_jax.layers.mlp import FeedForward, exact_gelu
from linformer_jax.layers.projections import SeqProjection, pool_window
from linformer_jax.layers.softmax_kernel import (attention_weights, default_block_rows, default_implementation,
                                                 float32_einsum, softmax_attention, softmax_last)

# The constants are assigned (not imported) so that each has its ``#:`` doc here, where autodoc looks for it.
#: Parameter-sharing modes of the E/F projections (``attention.SHARING``).
SHARING = attention.SHARING
#: The implementations of ``softmax_attention`` (``softmax_kernel.IMPLEMENTATIONS``).
IMPLEMENTATIONS = softmax_kernel.IMPLEMENTATIONS
#: Position-embedding kinds of ``TokenEmbedder`` (``embeddings.POS_EMBS``).
POS_EMBS = embeddings.POS_EMBS
#: Activation functions of ``FeedForward`` by name (``mlp.ACTIVATIONS``).
ACTIVATIONS = mlp.ACTIVATIONS
#: Name of the collection of non-trainable variables (``projections.CONSTANTS``).
CONSTANTS = projections.CONSTANTS
#: The projection methods of ``SeqProjection`` (``projections.PROJECTIONS``).
PROJECTIONS = projections.PROJECTIONS

__all__ = ["SHARING", "FullSelfAttention", "LinformerSelfAttention", "IMPLEMENTATIONS", "softmax_attention",
           "attention_weights", "softmax_last", "default_implementation", "default_block_rows", "POS_EMBS",
           "TokenEmbedder", "sinusoidal_positions", "ACTIVATIONS", "FeedForward", "exact_gelu", "CONSTANTS",
           "PROJECTIONS", "SeqProjection", "pool_window", "DepthwiseConv2D", "flat_dot_general", "float32_einsum"]
