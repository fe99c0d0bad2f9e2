"""FeedForward and TokenEmbedder / sinusoidal_positions against numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.layers import FeedForward, TokenEmbedder, sinusoidal_positions
from linformer_jax.layers.mlp import sequence_chunks
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


@pytest.mark.parametrize("n,dim,dim_ff,chunks", [(12, 8, 32, 4), (9, 8, 32, 3), (7, 8, 32, 1), (12, 8, 16, 2),
                                                 (12, 8, 4, 1)])
def test_sequence_chunks(n, dim, dim_ff, chunks):
  """Largest divisor of n that is <= dim_ff // dim."""
  assert sequence_chunks(n, dim, dim_ff) == chunks


@pytest.mark.parametrize("n", [12, 9])
def test_feedforward_remat_chunks_match_plain_math(n):
  """Level C2's chunked feed-forward: same parameters, values and gradients as the plain formula."""
  x = rand(1, (2, n, 8), 2.0)
  ff = FeedForward(dim_ff=32, remat_chunks=True)
  variables = ff.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(FeedForward(dim_ff=32).init(jax.random.key(0), x))

  def plain(params, x):
    h = jax.nn.gelu(x @ params["wi"]["kernel"] + params["wi"]["bias"], approximate=False)
    return h @ params["wo"]["kernel"] + params["wo"]["bias"]

  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))
  want, want_g = jax.value_and_grad(loss(plain))(variables["params"])
  got, got_g = jax.value_and_grad(loss(lambda p, x: ff.apply({"params": p}, x)))(variables["params"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_feedforward_gelu_is_exact_not_tanh():
  """Exact GELU (erf), as torch's default: differs from the tanh approximation by ~1e-4 at x = 2 to 3."""
  ff = FeedForward(dim_ff=1)
  variables = {"params": {"wi": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)},
                          "wo": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}}}
  x = jnp.array([[-2.5], [2.5], [1.7]])
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(ff.apply(variables, x), 0.5 * xs * (1 + np_erf(xs / math.sqrt(2))), atol=1e-6)


def test_exact_gelu_value_and_derivative_against_float64():
  """exact_gelu = ½·x·(1 + erf(x/√2)) and its derivative Φ(x) + x·φ(x), against float64 math; also the same
  function as jax.nn.gelu(approximate=False) (which evaluates it through erfc) to float32 accuracy."""
  from linformer_jax.layers import exact_gelu
  x = np.concatenate([np.linspace(-9.0, 9.0, 1001), rand(3, (500,), 3.0)]).astype(np.float32)
  xd = x.astype(np.float64)
  cdf = 0.5 * (1.0 + np_erf(xd / math.sqrt(2.0)))
  pdf = np.exp(-0.5 * xd ** 2) / math.sqrt(2.0 * math.pi)
  np.testing.assert_allclose(exact_gelu(jnp.asarray(x)), xd * cdf, atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(exact_gelu))(jnp.asarray(x)), cdf + xd * pdf, atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(exact_gelu(jnp.asarray(x)), jax.nn.gelu(jnp.asarray(x), approximate=False), atol=2e-6)
  assert exact_gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


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
