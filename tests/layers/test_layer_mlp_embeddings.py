"""FeedForward and TokenEmbedder / sinusoidal_positions against numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.layers import FeedForward, TokenEmbedder, sinusoidal_positions
from helpers import np_init, rand

ATOL = 1e-5


np_erf = np.vectorize(math.erf)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_feedforward_matches_numpy(activation):
  ff = FeedForward(dim_ff=16, activation=activation)
  x = rand(0, (2, 9, 8), 2.0)
  variables = np_init(ff, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xs = np.asarray(x, np.float64)
  h = xs @ p["wi"]["kernel"] + p["wi"]["bias"]
  h = 0.5 * h * (1.0 + np_erf(h / math.sqrt(2.0))) if activation == "gelu" else np.maximum(h, 0.0)
  want = h @ p["wo"]["kernel"] + p["wo"]["bias"]
  np.testing.assert_allclose(ff.apply(variables, x), want, atol=ATOL)


def test_feedforward_gelu_is_exact_not_tanh():
  """Exact GELU (erf), as torch's default: differs from the tanh approximation by ~1e-4 at x = 2 to 3."""
  ff = FeedForward(dim_ff=1)
  variables = {"params": {"wi": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)},
                          "wo": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}}}
  x = jnp.array([[-2.5], [2.5], [1.7]])
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(ff.apply(variables, x), 0.5 * xs * (1 + np_erf(xs / math.sqrt(2))), atol=1e-6)


@pytest.mark.parametrize("base", [10000.0, 100000.0])
def test_sinusoidal_positions_formula(base):
  n, dim = 7, 6
  table = sinusoidal_positions(n, dim, base)
  assert table.shape == (n, dim) and table.dtype == np.float32
  for p in range(n):
    for j in range(dim // 2):
      angle = p / base ** (2 * j / dim)
      assert math.isclose(table[p, j], math.sin(angle), abs_tol=1e-6)
      assert math.isclose(table[p, dim // 2 + j], math.cos(angle), abs_tol=1e-6)
  with pytest.raises(ValueError, match="dim"):
    sinusoidal_positions(4, 5)


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal"])
def test_token_embedder(pos_emb):
  emb = TokenEmbedder(vocab_size=11, dim=6, max_len=9, pos_emb=pos_emb)
  tokens = jnp.array([[1, 2, 3, 10, 0], [4, 4, 5, 6, 7]])
  variables = np_init(emb, tokens)
  p = variables["params"]
  assert p["token"]["embedding"].shape == (11, 6)
  assert ("position" in p) == (pos_emb == "learned")
  table = np.asarray(p["token"]["embedding"], np.float64)
  if pos_emb == "learned":
    pos = np.asarray(p["position"], np.float64)[:5]
  else:
    angles = np.arange(5)[:, None] / 10000.0 ** (np.arange(0, 6, 2) / 6)[None]
    pos = np.concatenate([np.sin(angles), np.cos(angles)], -1)
  want = table[np.asarray(tokens)] + pos[None]
  np.testing.assert_allclose(emb.apply(variables, tokens), want, atol=ATOL)
  # weight tying: attend = h @ embeddingᵀ
  h = rand(2, (2, 5, 6))
  np.testing.assert_allclose(emb.apply(variables, h, method=TokenEmbedder.attend),
                             np.asarray(h, np.float64) @ table.T, atol=ATOL)
