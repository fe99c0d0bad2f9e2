"""Layers: attention variants, the softmax attention kernel, sequence projections, feed-forward, embeddings."""
from linformer_jax.layers.attention import SHARING, FullSelfAttention, LinformerSelfAttention
from linformer_jax.layers.conv import DepthwiseConv2D
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.embeddings import POS_EMBS, TokenEmbedder, sinusoidal_positions
from linformer_jax.layers.mlp import ACTIVATIONS, FeedForward, exact_gelu
from linformer_jax.layers.projections import CONSTANTS, PROJECTIONS, SeqProjection, pool_window
from linformer_jax.layers.softmax_kernel import (IMPLEMENTATIONS, attention_weights, default_block_rows,
                                                 default_implementation, softmax_attention, softmax_last)

__all__ = ["SHARING", "FullSelfAttention", "LinformerSelfAttention", "IMPLEMENTATIONS", "softmax_attention",
           "attention_weights", "softmax_last", "default_implementation", "default_block_rows", "POS_EMBS",
           "TokenEmbedder", "sinusoidal_positions", "ACTIVATIONS", "FeedForward", "exact_gelu", "CONSTANTS",
           "PROJECTIONS", "SeqProjection", "pool_window", "DepthwiseConv2D", "flat_dot_general"]
