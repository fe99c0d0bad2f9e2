"""flat_dot_general: the same contraction as lax.dot_general (values and gradients against numpy), run as 2-D."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jax_core

from linformer_jax.layers import flat_dot_general
from helpers import rand


def _dot_shapes(jaxpr):
  """(lhs ndim, rhs ndim, dimension_numbers) of every dot_general in a closed jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim, eqn.params["dimension_numbers"]))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      found += _dot_shapes(sub)
  return found


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims, spec", [
    ((2, 5, 3), (3, 4), (((2,), (0,)), ((), ())), "btd,df->btf"),                 # nn.Dense on a sequence
    ((2, 5, 6), (6, 2, 3), (((2,), (0,)), ((), ())), "btd,dhe->bthe"),            # DenseGeneral → (heads, d_h)
    ((2, 5, 2, 3), (2, 3, 6), (((2, 3), (0, 1)), ((), ())), "bthe,hed->btd"),     # (heads, d_h) → dim
    ((3,), (3, 4), (((0,), (0,)), ((), ())), "d,df->f"),                          # no leading axes
    ((4, 3), (3, 5), (((1,), (0,)), ((), ())), "md,df->mf"),                      # already 2-D
    ((2, 5, 3), (2, 3, 4), (((2,), (1,)), ((0,), (0,))), "btd,bdf->btf"),         # batch axes: passed through
    ((5, 3), (4, 3), (((1,), (1,)), ((), ())), "md,fd->mf"),                      # rhs contracting last: passed through
])
def test_flat_dot_general_values_and_gradients_match_numpy(lhs_shape, rhs_shape, dims, spec):
  x, w = rand(0, lhs_shape, 1.0), rand(1, rhs_shape, 1.0)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  np.testing.assert_allclose(flat_dot_general(x, w, dims), np.einsum(spec, x64, w64), rtol=1e-5, atol=1e-5)
  y = np.einsum(spec, x64, w64)
  g = rand(2, y.shape, 1.0)  # cotangent of the output
  gx, gw = jax.vjp(lambda a, b: flat_dot_general(a, b, dims), x, w)[1](g)
  lhs_s, rest = spec.split(",")
  rhs_s, out_s = rest.split("->")
  g64 = np.asarray(g, np.float64)
  np.testing.assert_allclose(gx, np.einsum(f"{out_s},{rhs_s}->{lhs_s}", g64, w64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum(f"{lhs_s},{out_s}->{rhs_s}", x64, g64), rtol=1e-5, atol=1e-5)


def test_dense_weight_gradient_is_one_2d_product():
  """Through nn.Dense on (batch, n, dim), every product of the forward and backward pass is 2-D by 2-D; with
  lax.dot_general the weight gradient contracts the batch and position axes of 3-D arrays at once."""
  x = rand(0, (2, 7, 3), 1.0)
  for dot, want_2d in ((flat_dot_general, True), (lax.dot_general, False)):
    layer = nn.Dense(4, dot_general=dot)
    params = layer.init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(layer.apply(p, x) ** 2)
    shapes = _dot_shapes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert len(shapes) == 2  # forward, weight gradient
    assert all(lhs == rhs == 2 for lhs, rhs, _ in shapes) == want_2d, shapes


def test_dense_with_flat_dot_general_keeps_parameters_and_values():
  x = rand(3, (2, 5, 6), 1.0)
  plain, flat = nn.DenseGeneral((2, 3)), nn.DenseGeneral((2, 3), dot_general=flat_dot_general)
  params = plain.init(jax.random.key(1), x)
  same = flat.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(same)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  want = np.einsum("btd,dhe->bthe", np.asarray(x, np.float64), np.asarray(params["params"]["kernel"], np.float64))
  np.testing.assert_allclose(flat.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_flat_dot_general_keeps_preferred_element_type():
  x, w = rand(0, (2, 5, 3), 1.0).astype(jnp.bfloat16), rand(1, (3, 4), 1.0).astype(jnp.bfloat16)
  y = flat_dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == (2, 5, 4)
