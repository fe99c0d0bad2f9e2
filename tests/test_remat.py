"""Checkpoint levels C0/C1/C2 and named remat policies: same numbers, same parameter tree, less memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from linformer_jax.models import Linformer, LinformerEncDec, LinformerLM
from linformer_jax.remat import REMAT_POLICIES, checkpoint_policy, validate_remat

X = jax.random.normal(jax.random.key(1), (2, 10, 16))
MASK = jnp.arange(10)[None] < jnp.array([[10], [6]])
SMALL = dict(max_len=12, dim=16, depth=3, num_heads=2, k=5)


def _loss_and_grads(model, variables, *args):
  return jax.jit(jax.value_and_grad(lambda v: jnp.mean(model.apply(v, *args) ** 2)))(variables)


def _max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("sharing,attention,projection", [
    ("none", "linformer", "learnable"), ("kv", "linformer", "conv"), ("layerwise", "linformer", "fixed"),
    ("headwise", "linformer", "max_pool"), ("none", "full", "learnable")])
@pytest.mark.parametrize("level", ["C1", "C2"])
def test_levels_match_c0_with_mask(sharing, attention, projection, level):
  base = Linformer(**SMALL, sharing=sharing, attention=attention, projection=projection)
  variables = base.init(jax.random.key(0), X)
  ref_loss, ref_grads = _loss_and_grads(base, variables, X, MASK)
  model = base.clone(remat=level)
  # same parameter tree: the C0 variables are used as they are
  assert jax.tree.structure(model.init(jax.random.key(0), X)) == jax.tree.structure(variables)
  loss, grads = _loss_and_grads(model, variables, X, MASK)
  assert abs(float(loss - ref_loss)) <= 1e-5
  assert _max_diff(grads, ref_grads) <= 1e-5


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_every_policy_matches_c0(policy):
  base = Linformer(**SMALL)
  variables = base.init(jax.random.key(0), X)
  ref_loss, ref_grads = _loss_and_grads(base, variables, X, MASK)
  loss, grads = _loss_and_grads(base.clone(remat="C2", remat_policy=policy), variables, X, MASK)
  assert abs(float(loss - ref_loss)) <= 1e-5 and _max_diff(grads, ref_grads) <= 1e-5


def test_lm_and_encdec_levels_match():
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 30)
  lm = LinformerLM(vocab_size=30, **SMALL)
  v = lm.init(jax.random.key(0), tokens)
  ref = _loss_and_grads(lm, v, tokens)
  for level in ("C1", "C2"):
    got = _loss_and_grads(lm.clone(remat=level), v, tokens)
    assert _max_diff(got, ref) <= 1e-5
  ed = LinformerEncDec(vocab_size=30, **SMALL)
  v = ed.init(jax.random.key(0), tokens, tokens[:, :7])
  ref = _loss_and_grads(ed, v, tokens, tokens[:, :7])
  got = _loss_and_grads(ed.clone(remat="C2"), v, tokens, tokens[:, :7])
  assert _max_diff(got, ref) <= 1e-5


def test_scan_layers_equals_unrolled_layers():
  """Stacking the unrolled layers' params on a leading axis gives the scanned model the same function."""
  unrolled = Linformer(**SMALL, sharing="kv")
  v = unrolled.init(jax.random.key(0), X)
  layers = [v["params"][f"layer_{i}"] for i in range(SMALL["depth"])]
  stacked = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers), "ln_final": v["params"]["ln_final"]}
  scanned = unrolled.clone(scan_layers=True)
  assert jax.tree.structure(scanned.init(jax.random.key(0), X)["params"]) == jax.tree.structure(stacked)
  want = unrolled.apply(v, X, MASK)
  for level in ("C0", "C1", "C2"):
    got = scanned.clone(remat=level).apply({"params": stacked}, X, MASK)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_scan_layers_rejects_different_layers():
  with pytest.raises(ValueError, match="k_reduce_by_layer"):
    Linformer(**SMALL, scan_layers=True, k_reduce_by_layer=1)
  with pytest.raises(ValueError, match="layerwise"):
    Linformer(**SMALL, scan_layers=True, sharing="layerwise")


def test_unknown_level_and_policy():
  with pytest.raises(ValueError, match="remat='C3'.*'C0', 'C1', 'C2'"):
    Linformer(**SMALL, remat="C3")
  with pytest.raises(ValueError, match="remat_policy='fast'.*nothing_saveable"):
    Linformer(**SMALL, remat="C1", remat_policy="fast")
  with pytest.raises(ValueError, match="remat_policy"):
    checkpoint_policy("everything")
  validate_remat("C1", "offload_dots")  # the CPU backend has pinned host memory


def _residual_names(policy):
  model = Linformer(**SMALL, remat="C1", remat_policy=policy)
  v = model.init(jax.random.key(0), X)
  res = saved_residuals(lambda v: jnp.mean(model.apply(v, X) ** 2), v)
  return [d for _, d in res]


def test_save_projections_keeps_exactly_the_tagged_tensors():
  named = [d.split(" from")[0] for d in _residual_names("save_projections") if d.startswith("named")]
  per_layer = {"named 'query'", "named 'key'", "named 'value'", "named 'k_bar'", "named 'v_bar'"}
  assert sorted(named) == sorted(list(per_layer) * SMALL["depth"])
  assert not any(d.startswith("named") for d in _residual_names("nothing_saveable"))


def _temp_bytes(model, shape=(4, 512, 64)):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  step = jax.jit(jax.grad(lambda v, x: jnp.mean(model.apply(v, x) ** 2)))
  return step.lower(v, x).compile().memory_analysis().temp_size_in_bytes


def test_remat_shrinks_saved_memory_with_scanned_layers():
  """XLA temp memory of a gradient step (scanned layers; see jax_engineering.md §2.4 for why scanned)."""
  model = lambda depth, heads, level, sharing="none": Linformer(
      max_len=512, dim=64, depth=depth, num_heads=heads, k=128, sharing=sharing, scan_layers=True, remat=level)
  c0 = {d: _temp_bytes(model(d, 4, "C0")) for d in (2, 8)}
  c1 = {d: _temp_bytes(model(d, 4, "C1")) for d in (2, 8)}
  assert c1[8] < 0.5 * c0[8]
  # C1's growth with depth is much smaller than C0's (only sub-layer inputs are kept per layer)
  assert c1[8] - c1[2] < 0.3 * (c0[8] - c0[2])
  # C2: with many heads, one head's n×k scores at a time
  assert _temp_bytes(model(2, 16, "C2")) < 0.8 * _temp_bytes(model(2, 16, "C1"))
  # ... so the head count costs little: 16 heads within 10 % of 4 heads (C1: n×k scores for all heads).
  # Headwise sharing: with sharing "none" each head's own E/F gradient (n×k) is parameter-sized memory.
  c2 = {(d, h): _temp_bytes(model(d, h, "C2", "headwise")) for d, h in ((2, 4), (2, 16), (8, 16))}
  c1 = {d: _temp_bytes(model(d, 16, "C1", "headwise")) for d in (2, 8)}
  assert abs(c2[2, 16] - c2[2, 4]) < 0.1 * c2[2, 4]
  # ... and one input per layer is kept across layers (C1: one per sub-layer), so depth costs less than at C1
  per_layer_input = 4 * 512 * 64 * 4
  assert c2[8, 16] - c2[2, 16] < c1[8] - c1[2]
  assert (c2[8, 16] - c2[2, 16]) / 6 < 2.5 * per_layer_input


def _xcit_loss_and_grads(model, variables, images):
  def loss(params):
    out, stats = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                             mutable=["batch_stats"])
    return jnp.mean(out ** 2), stats
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("attention", ["xca", "self"])
def test_xcit_levels_match_c0(attention):
  from linformer_jax.models import XCiT
  images = jax.random.normal(jax.random.key(1), (2, 16, 32, 3))
  base = XCiT(embed_dim=16, depth=1, num_heads=2, num_classes=3, attention=attention, patch_size=8)
  variables = base.init(jax.random.key(0), images)
  (ref_loss, ref_stats), ref_grads = _xcit_loss_and_grads(base, variables, images)
  for level in ("C1", "C2"):
    model = base.clone(remat=level)
    assert jax.tree.structure(model.init(jax.random.key(0), images)) == jax.tree.structure(variables)
    (loss, stats), grads = _xcit_loss_and_grads(model, variables, images)
    assert abs(float(loss - ref_loss)) <= 1e-5
    assert _max_diff(grads, ref_grads) <= 1e-5 and _max_diff(stats, ref_stats) <= 1e-6


def test_xcit_remat_shrinks_temp_memory():
  from linformer_jax.models import XCiT
  images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)

  def temp(level):
    model = XCiT(embed_dim=64, depth=6, num_heads=4, num_classes=10, patch_size=8, scan_layers=True,
                 remat=level)
    v = jax.eval_shape(model.init, jax.random.key(0), images)
    grad = jax.jit(jax.grad(lambda v, x: jnp.mean(model.apply(v, x) ** 2)))
    return grad.lower(v, images).compile().memory_analysis().temp_size_in_bytes

  assert temp("C1") < 0.6 * temp("C0")
  assert temp("C2") < temp("C1")
