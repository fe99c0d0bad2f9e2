"""Token and position embeddings."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linformer_jax._validate import check_choice, check_int, check_length

#: Position-embedding kinds of ``TokenEmbedder``: a trainable table or the fixed ``sinusoidal_positions``.
POS_EMBS = ("learned", "sinusoidal")


def sinusoidal_positions(n: int, dim: int, base: float = 10000.0) -> np.ndarray:
  """(n, dim) table [sin(p·ω_j) | cos(p·ω_j)] with ω_j = base^(-2j/dim), halves concatenated.

  This is the layout of linformer-pytorch's ``PositionalEmbedding`` (which uses base=100000).
  """
  if dim % 2:
    raise ValueError(f"sinusoidal position embedding needs an even dim, got dim={dim}.")
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class TokenEmbedder(nn.Module):
  """Token embedding plus absolute position embedding.

  Attributes:
    vocab_size: number of token ids.
    dim: embedding width.
    max_len: longest sequence accepted.
    pos_emb: "learned" (trainable (max_len, dim) table, N(0, 0.02)) or "sinusoidal" (fixed,
      ``sinusoidal_positions``).
    pos_emb_base: base of the sinusoidal table's frequencies.
  """
  vocab_size: int
  dim: int
  max_len: int
  pos_emb: str = "learned"
  pos_emb_base: float = 10000.0
  #: The computation dtype: inputs and parameters are cast to it.
  dtype: Any = jnp.float32
  #: The dtype parameters are stored in.
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_int("vocab_size", self.vocab_size, minimum=1)
    check_choice("pos_emb", self.pos_emb, POS_EMBS)
    super().__post_init__()

  def setup(self):
    self.token = nn.Embed(self.vocab_size, self.dim, embedding_init=nn.initializers.normal(0.02),
                          dtype=self.dtype, param_dtype=self.param_dtype, name="token")
    if self.pos_emb == "learned":
      self.position = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.dim),
                                 self.param_dtype)

  def __call__(self, tokens: jax.Array, offset: Optional[jax.Array] = None) -> jax.Array:
    """Embeds token ids and adds the position embedding of positions 0..n-1 (offset … offset + n - 1).

    Args:
      tokens: int array (batch, n), n <= ``max_len``.
      offset: None, or the position of the first token (an int scalar, may be traced; decoding one token at a
        time). Positions past ``max_len`` are clamped to the table's end (not detected inside jit).

    Returns:
      (batch, n, dim) embeddings in ``dtype``.

    Raises:
      TypeError: ``tokens`` is not a 2-D integer array.
      ValueError: n > ``max_len``.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be an int array of shape (batch, n), got {tokens.dtype} {tokens.shape}.")
    n = tokens.shape[1]
    check_length("tokens", n, self.max_len)
    if self.pos_emb == "learned":
      table = self.position
    else:
      table = jnp.asarray(sinusoidal_positions(self.max_len if offset is not None else n, self.dim,
                                               self.pos_emb_base))
    pos = table[:n] if offset is None else jax.lax.dynamic_slice_in_dim(table, offset, n, axis=0)
    return self.token(tokens) + pos.astype(self.dtype)[None]

  def attend(self, h: jax.Array) -> jax.Array:
    """Maps hidden states (..., dim) to vocabulary logits (..., vocab_size) with the transposed token embedding.

    Used for weight tying: the output layer shares the token embedding matrix.
    """
    return self.token.attend(h)
