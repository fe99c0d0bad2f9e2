"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path with conftest.py)."""
import functools
import importlib
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np


def optimizer_config(**overrides):
  """``default_optimizer_config()`` with the given fields set."""
  from linformer_jax.optim import default_optimizer_config
  c = default_optimizer_config()
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def assert_only_head_replaced(variables, new_variables, head_kernel_shape):
  """reset_classifier's transfer: the same parameter names, every non-head array kept, a head of the new shape."""
  from flax.core import unfreeze
  from flax.traverse_util import flatten_dict
  old = flatten_dict(unfreeze(variables["params"]))
  new = flatten_dict(unfreeze(new_variables["params"]))
  assert set(old) == set(new)
  for path, value in old.items():
    if path[0] != "head":
      np.testing.assert_array_equal(new[path], value)
  assert new[("head", "kernel")].shape == head_kernel_shape
  assert new[("head", "bias")].shape == head_kernel_shape[-1:]


def rand(seed, shape, scale=1.0):
  """Test data from numpy (new jax.random shapes cost ~0.5 s of XLA compilation each on CPU)."""
  return jnp.asarray(np.random.RandomState(seed).normal(0.0, scale, shape), jnp.float32)


def np_init(module, *args, seed=0, scale=0.4, **kwargs):
  """Variables shaped like ``module.init`` (eval_shape only) filled with numpy N(0, scale²)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0), *args)
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rs.normal(0.0, scale, s.shape), s.dtype), shapes)


def write_fake_cifar(directory, n_per_batch=12, n_test=10, seed=0):
  """A tiny directory in the CIFAR-10 python format; returns (x_train, y_train, x_test, y_test)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  xs, ys = [], []
  for i in range(1, 6):
    data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
    with open(os.path.join(directory, f"data_batch_{i}"), "wb") as f:
      pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"fake"}, f)
    xs.append(data)
    ys.extend(labels)
  test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
  test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
  with open(os.path.join(directory, "test_batch"), "wb") as f:
    pickle.dump({b"data": test, b"labels": test_labels}, f)
  with open(os.path.join(directory, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
  to_img = lambda d: d.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return to_img(np.concatenate(xs)), np.array(ys), to_img(test), np.array(test_labels)


def train_config(name, arg="runlocal", **overrides):
  """configs/<name>.py's get_config(arg) with the persistent compilation cache off and dotted-key overrides,
  e.g. ``train_config("mlm_linformer", **{"model.dropout": 0.1})``."""
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config.compilation_cache = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
