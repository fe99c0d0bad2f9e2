"""DepthwiseConv2D against a numpy loop and against flax's grouped nn.Conv (same parameters)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from linformer_jax.layers import DepthwiseConv2D
from helpers import rand


@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 5)])
def test_depthwise_conv_matches_numpy_loop(kernel_size):
  x = rand(0, (2, 6, 5, 4), 1.0)
  conv = DepthwiseConv2D(kernel_size)
  variables = conv.init(jax.random.key(0), x)
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  bias = rand(1, (4,), 1.0)
  variables = {"params": {"kernel": variables["params"]["kernel"], "bias": bias}}
  kh, kw = kernel_size
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  want = np.zeros(x.shape) + np.asarray(bias, np.float64)
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      for u in range(kh):
        for v in range(kw):
          want[:, i, j, :] += xp[:, i + u, j + v, :] * kernel[u, v, 0, :]
  np.testing.assert_allclose(conv.apply(variables, x), want, atol=1e-5)


def test_depthwise_conv_has_grouped_conv_parameters():
  """Same parameter names, shapes and initial values as nn.Conv(C, (3, 3), feature_group_count=C)."""
  x = rand(2, (1, 5, 5, 8), 1.0)
  ours = DepthwiseConv2D((3, 3)).init(jax.random.key(3), x)
  grouped = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=8)
  theirs = grouped.init(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(DepthwiseConv2D((3, 3)).apply(theirs, x), grouped.apply(theirs, x), atol=1e-5)


def test_even_kernel_is_refused():
  with pytest.raises(ValueError, match="kernel_size must be two odd positive ints"):
    DepthwiseConv2D((2, 3))
