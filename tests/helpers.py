"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path with conftest.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def rand(seed, shape, scale=1.0):
  """Test data from numpy (new jax.random shapes cost ~0.5 s of XLA compilation each on CPU)."""
  return jnp.asarray(np.random.RandomState(seed).normal(0.0, scale, shape), jnp.float32)


def np_init(module, *args, seed=0, scale=0.4, **kwargs):
  """Variables shaped like ``module.init`` (eval_shape only) filled with numpy N(0, scale²)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0), *args)
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rs.normal(0.0, scale, s.shape), s.dtype), shapes)
