"""SeqProjection (E, F) methods against numpy: learnable, fixed, conv, mean_pool, max_pool."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from linformer_jax.layers import CONSTANTS, LinformerSelfAttention, SeqProjection, pool_window
from linformer_jax.models import Linformer
from helpers import np_init, rand

ATOL = 1e-5
# real inits (jax.random) compile slowly op by op on CPU: jit them without backend optimisation
fast_jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))
B, H, D = 2, 2, 3  # batch, heads, head_dim of the (batch, n, heads, head_dim) inputs


def np_windows(x, max_len, k):
  """Zero-pad x (b, n, h, d) at the end to s·k (s = ceil(max_len/k)); return windows (b, k, s, h, d), s."""
  x = np.asarray(x, np.float64)
  s = math.ceil(max_len / k)
  padded = np.zeros((x.shape[0], s * k) + x.shape[2:])
  padded[:, :x.shape[1]] = x
  return np.stack([padded[:, j * s:(j + 1) * s] for j in range(k)], axis=1), s


# ----------------------------------------------------------------------------------------------------------
# learnable
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_learnable_is_matrix_product(per_head, bias):
  max_len, n, k = 10, 7, 4
  proj = SeqProjection(max_len, k, "learnable", num_heads=H if per_head else None, use_bias=bias)
  x = rand(0, (B, n, H, D))
  variables = np_init(proj, x)
  p = variables["params"]
  assert p["kernel"].shape == ((H,) if per_head else ()) + (max_len, k)
  assert ("bias" in p) == bias
  got = np.asarray(proj.apply(variables, x))
  assert got.shape == (B, k, H, D)
  xs = np.asarray(x, np.float64)
  for hi in range(H):
    e = np.asarray(p["kernel"][hi] if per_head else p["kernel"], np.float64)[:n].T  # (k, n)
    for bi in range(B):
      want = e @ xs[bi, :, hi]  # (k, D)
      if bias:
        want = want + np.asarray(p["bias"][hi] if per_head else p["bias"], np.float64)[:, None]
      np.testing.assert_allclose(got[bi, :, hi], want, atol=ATOL)


def test_learnable_init_is_xavier_normal():
  """Default init: xavier-normal over (fan_in = max_len, fan_out = k): std = sqrt(2 / (max_len + k))."""
  max_len, k = 128, 32
  proj = SeqProjection(max_len, k, "learnable")
  variables = fast_jit(proj.init)(jax.random.PRNGKey(0), jnp.zeros((1, max_len, 1, 1)))
  kernel = np.asarray(variables["params"]["kernel"])
  assert kernel.shape == (max_len, k)
  np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / (max_len + k)), rtol=0.05)


# ----------------------------------------------------------------------------------------------------------
# fixed
# ----------------------------------------------------------------------------------------------------------
def test_fixed_lives_in_constants_with_variance_one_over_k():
  max_len, k = 256, 64
  proj = SeqProjection(max_len, k, "fixed")
  x = rand(1, (1, max_len, 1, 1))
  init = fast_jit(proj.init)
  variables = init(jax.random.PRNGKey(0), x)
  assert CONSTANTS == "constants"
  assert "constants" in variables
  assert not jax.tree.leaves(variables.get("params", {}))  # nothing trainable
  e = np.asarray(variables["constants"]["kernel"], np.float64)
  assert e.shape == (max_len, k)
  # 16384 entries: the variance estimate has relative std ≈ sqrt(2/N) ≈ 1.1 %
  np.testing.assert_allclose(e.var(), 1.0 / k, rtol=0.06)
  assert abs(e.mean()) < 4 * math.sqrt(1.0 / k / e.size)
  # deterministic given the init rng, different for another rng
  again = init(jax.random.PRNGKey(0), x)["constants"]["kernel"]
  other = init(jax.random.PRNGKey(1), x)["constants"]["kernel"]
  np.testing.assert_array_equal(e, again)
  assert np.abs(e - np.asarray(other)).max() > 0.1


@pytest.mark.parametrize("per_head", [False, True])
def test_fixed_output_is_product_with_stored_matrix(per_head):
  max_len, n, k = 10, 6, 4
  proj = SeqProjection(max_len, k, "fixed", num_heads=H if per_head else None)
  x = rand(2, (B, n, H, D))
  variables = fast_jit(proj.init)(jax.random.PRNGKey(3), x)
  e_all = np.asarray(variables["constants"]["kernel"], np.float64)
  assert e_all.shape == ((H,) if per_head else ()) + (max_len, k)
  got = np.asarray(proj.apply(variables, x))
  xs = np.asarray(x, np.float64)
  for hi in range(H):
    e = (e_all[hi] if per_head else e_all)[:n].T
    for bi in range(B):
      np.testing.assert_allclose(got[bi, :, hi], e @ xs[bi, :, hi], atol=ATOL)
  # apply uses the stored matrix: replacing it changes the output accordingly
  doubled = {"constants": {"kernel": 2 * variables["constants"]["kernel"]}}
  np.testing.assert_allclose(proj.apply(doubled, x), 2 * got, atol=ATOL)


def test_fixed_projection_not_trainable_in_attention_layer():
  layer = LinformerSelfAttention(num_heads=H, max_len=12, k=5, projection="fixed", sharing="headwise")
  x = rand(4, (B, 12, 8))
  variables = fast_jit(layer.init)(jax.random.PRNGKey(0), x)
  assert set(variables["params"]) == {"query", "key", "value", "out"}
  assert set(variables["constants"]) == {"E", "F"}
  assert variables["constants"]["E"]["kernel"].shape == (12, 5)
  # E and F are distinct draws
  assert np.abs(np.asarray(variables["constants"]["E"]["kernel"] - variables["constants"]["F"]["kernel"])
                ).max() > 0.1


# ----------------------------------------------------------------------------------------------------------
# 5. fixed projection survives save / restore
# ----------------------------------------------------------------------------------------------------------
def test_fixed_projection_survives_serialization_roundtrip():
  model = Linformer(max_len=12, dim=8, depth=2, num_heads=2, k=5, projection="fixed", sharing="headwise",
                    dim_ff=16)
  x = rand(5, (B, 12, 8))
  init = fast_jit(model.init)
  variables = init(jax.random.PRNGKey(0), x)
  other = init(jax.random.PRNGKey(1), x)
  assert "constants" in variables
  out = np.asarray(model.apply(variables, x))
  out_other = np.asarray(model.apply(other, x))
  assert np.abs(out - out_other).max() > 1e-3

  blob = serialization.to_bytes(variables)
  restored = serialization.from_bytes(other, blob)  # template from a different seed
  for a, b in zip(jax.tree.leaves(restored["constants"]), jax.tree.leaves(variables["constants"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model.apply(restored, x), out)

  # the same through the raw msgpack state dict
  state = serialization.msgpack_restore(blob)
  assert "kernel" in state["constants"]["layer_0"]["attention"]["E"]
  restored2 = serialization.from_state_dict(other, state)
  np.testing.assert_array_equal(model.apply(restored2, x), out)
  # params alone (without the constants collection) cannot reproduce the model
  params_only = {"params": restored["params"], "constants": other["constants"]}
  assert np.abs(np.asarray(model.apply(params_only, x)) - out).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# conv
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len,k,n", [(10, 4, 10), (10, 4, 7), (12, 4, 12), (9, 9, 5)])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_matches_numpy_loop(max_len, k, n, per_head, bias):
  proj = SeqProjection(max_len, k, "conv", num_heads=H if per_head else None, use_bias=bias)
  x = rand(6, (B, n, H, D))
  variables = np_init(proj, x)
  p = variables["params"]
  s = math.ceil(max_len / k)
  assert pool_window(max_len, k) == s
  assert p["conv_kernel"].shape == ((H,) if per_head else ()) + (s, D, D)
  got = np.asarray(proj.apply(variables, x))
  assert got.shape == (B, k, H, D)  # exactly k outputs, also when k does not divide max_len
  # numpy loop: zero-pad to s·k, y[j] = Σ_t x[j·s + t] @ W[t] (+ b)
  xs = np.zeros((B, s * k, H, D))
  xs[:, :n] = np.asarray(x, np.float64)
  w = np.asarray(p["conv_kernel"], np.float64)
  want = np.zeros((B, k, H, D))
  for bi in range(B):
    for j in range(k):
      for hi in range(H):
        for t in range(s):
          wt = w[hi, t] if per_head else w[t]
          want[bi, j, hi] += xs[bi, j * s + t, hi] @ wt
        if bias:
          want[bi, j, hi] += np.asarray(p["bias"][hi] if per_head else p["bias"], np.float64)
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_conv_padding_example_max_len_10_k_4():
  """max_len=10, k=4 → s=3, input padded to 12: window 3 = positions 9, 10, 11 where 10 and 11 are zeros."""
  proj = SeqProjection(10, 4, "conv")
  x = rand(7, (1, 10, 1, 1))
  variables = {"params": {"conv_kernel": jnp.array([1.0, 10.0, 100.0]).reshape(3, 1, 1)}}
  got = np.asarray(proj.apply(variables, x))[0, :, 0, 0]
  xs = np.asarray(x, np.float64)[0, :, 0, 0]
  want = [xs[0] + 10 * xs[1] + 100 * xs[2], xs[3] + 10 * xs[4] + 100 * xs[5],
          xs[6] + 10 * xs[7] + 100 * xs[8], xs[9]]
  np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean_pool", "max_pool"])
@pytest.mark.parametrize("max_len,k,n", [(10, 4, 10), (10, 4, 6), (12, 3, 12), (7, 7, 7)])
def test_pooling_matches_numpy_windows(method, max_len, k, n):
  proj = SeqProjection(max_len, k, method)
  x = rand(8, (B, n, H, D))
  variables = proj.init(jax.random.PRNGKey(0), x)
  assert not jax.tree.leaves(variables)  # parameter-free
  got = np.asarray(proj.apply(variables, x))
  assert got.shape == (B, k, H, D)
  windows, s = np_windows(x, max_len, k)
  want = windows.mean(axis=2) if method == "mean_pool" else windows.max(axis=2)
  np.testing.assert_allclose(got, want, atol=ATOL)
  # explicit first window
  xs = np.asarray(x, np.float64)
  first = xs[:, :s].mean(1) if method == "mean_pool" else xs[:, :s].max(1)
  np.testing.assert_allclose(got[:, 0], first, atol=ATOL)


def test_projection_rejects_too_long_input():
  proj = SeqProjection(6, 3, "learnable")
  with pytest.raises(ValueError, match="max_len"):
    proj.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 1, 2)))
