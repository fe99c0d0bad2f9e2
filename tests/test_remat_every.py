"""√L segment checkpointing (``remat_every``): the same loss and gradients as C0 on the same parameter tree, the
segment length that "sqrt" picks, and clear errors for what it does not support."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax.models import LinformerLM
from linformer_jax.models.linformer import segment_length

BASE = dict(vocab_size=17, max_len=16, dim=16, depth=6, num_heads=2, k=4, dim_ff=32, scan_layers=True)


@pytest.mark.parametrize("every,remat,projection", [(1, "C0", "learnable"), (2, "C0", "fixed"), (3, "C1", "learnable"),
                                                    ("sqrt", "C2", "learnable"), (6, "C0", "learnable")])
def test_segments_equal_c0(every, remat, projection):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 17)
  plain = LinformerLM(**BASE, projection=projection)
  segmented = LinformerLM(**BASE, projection=projection, remat=remat, remat_every=every)
  variables = plain.init(jax.random.key(0), tokens)
  shapes = jax.eval_shape(segmented.init, jax.random.key(0), tokens)  # the parameter tree does not change
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
  assert [s.shape for s in jax.tree_util.tree_leaves(shapes)] == [a.shape for a in jax.tree_util.tree_leaves(variables)]
  w = jax.random.normal(jax.random.key(2), (2, 16, 17))
  loss = lambda model: lambda params: jnp.sum(model.apply({**variables, "params": params}, tokens) * w)
  (l0, g0), (l1, g1) = (jax.value_and_grad(loss(m))(variables["params"]) for m in (plain, segmented))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sqrt_is_the_smallest_divisor_not_below_the_square_root():
  for depth in range(1, 101):
    s = segment_length("sqrt", depth)
    assert depth % s == 0 and s * s >= depth
    assert all(depth % t or t * t < depth for t in range(1, s))  # no smaller divisor >= √depth
    if math.isqrt(depth) ** 2 == depth:  # a perfect square: √depth itself
      assert s == math.isqrt(depth)
  assert [segment_length("sqrt", d) for d in (16, 24, 36, 64, 7)] == [4, 6, 6, 8, 7]
  assert segment_length(None, 12) is None and segment_length(3, 12) == 3


def test_bad_remat_every_raises_before_tracing():
  with pytest.raises(ValueError, match=r"remat_every=4 does not divide depth=6.*\[1, 2, 3, 6\]"):
    LinformerLM(**BASE, remat_every=4)
  with pytest.raises(ValueError, match="remat_every"):
    LinformerLM(**BASE, remat_every="log")
  with pytest.raises(TypeError, match="remat_every"):
    LinformerLM(**BASE, remat_every=2.0)
  with pytest.raises(ValueError, match="needs scan_layers=True"):
    LinformerLM(**dict(BASE, scan_layers=False), remat_every=2)
