"""Layers: attention variants, sequence projections, feed-forward, embeddings."""
from linformer_jax.layers.attention import (SHARING, FullSelfAttention, LinformerSelfAttention,
                                            attention_weights, softmax_attention)
from linformer_jax.layers.conv import DepthwiseConv2D
from linformer_jax.layers.dense import flat_dot_general
from linformer_jax.layers.embeddings import POS_EMBS, TokenEmbedder, sinusoidal_positions
from linformer_jax.layers.mlp import ACTIVATIONS, FeedForward, exact_gelu
from linformer_jax.layers.projections import CONSTANTS, PROJECTIONS, SeqProjection, pool_window

__all__ = ["SHARING", "FullSelfAttention", "LinformerSelfAttention", "softmax_attention", "attention_weights", "POS_EMBS",
           "TokenEmbedder", "sinusoidal_positions", "ACTIVATIONS", "FeedForward", "exact_gelu", "CONSTANTS",
           "PROJECTIONS", "SeqProjection", "pool_window", "DepthwiseConv2D",
           "flat_dot_general"]
