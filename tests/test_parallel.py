"""Data parallelism (8 fake CPU devices): jit + NamedSharding, pmap, FSDP-sharded state, batch checks, and
end-to-end train_and_evaluate runs that equal the one-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import parallel as par
from linformer_jax.data import make_dataset
from linformer_jax.optim import make_optimizer
from linformer_jax.steps import build_model, init_state, make_train_step
from linformer_jax.train import train_and_evaluate
from helpers import train_config

TOL = 1e-6


def _config(name="mlm_linformer", **overrides):
  config = train_config(name, **overrides)
  config.tensorboard = False
  return config


def _max_diff(a, b, skip=()):
  """Max abs difference over the leaves whose path contains none of the strings in `skip`."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
           for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))
           if not any(s in jax.tree_util.keystr(path) for s in skip)]
  return max(diffs, default=0.0)


# XCiT's class-attention key bias has an exactly zero gradient (softmax is shift-invariant), so its "gradient"
# is float rounding noise that AdamW normalises to ±lr: it differs by ~1e-4 between reduction orders (measured:
# 1.0e-4 jit-on-8 vs one device); every other parameter and the BatchNorm statistics agree to ~1e-7.
ZERO_GRAD = ("['cls_attn_blocks_0']['attn']['key']['bias']",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A small MLM Linformer, Adam (moments hold the gradients), a global batch of 16, and its host state."""
  # AdamW with a constant LR moves the params at step 0; eps=1 keeps the first update (lr·g/(|g| + eps))
  # well-conditioned: with eps=1e-8 it is lr·sign(g), and float-rounding noise in near-zero gradients (e.g. the
  # rows of tokens absent from the batch) flips whole lr-sized steps (measured 1e-5 for fsdp=8). The gradients
  # themselves are checked through Adam's first moment (mu = 0.1·g) in opt_state.
  config = _config(**{"model.dropout": 0.0, "batch_size": 16, "optimizer.name": "adamw",
                      "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                      "optimizer.learning_rate": 0.1, "optimizer.eps": 1.0})
  dataset = make_dataset(config.data, str(tmp_path_factory.mktemp("data")))
  kind = dataset.info["kind"]
  model = build_model(config.model, dataset.info)
  tx = make_optimizer(config.optimizer, config.total_steps).tx
  batch = dataset.batch_at(0, config.batch_size)
  state = jax.device_get(init_state(model, tx, batch, kind, jax.random.key(0)))
  rng = jax.random.key(1)
  ref_state, ref_metrics = jax.jit(make_train_step(model, tx, kind))(state, batch, rng)
  return dict(model=model, tx=tx, kind=kind, batch=batch, state=state, rng=rng,
              ref=(jax.device_get(ref_state), jax.device_get(ref_metrics)))


def _jit_step(setup, mesh_config):
  mesh = par.make_mesh(mesh_config)
  state_sh = par.state_shardings(setup["state"], mesh)
  batch_sh, repl = par.batch_sharding(mesh), par.replicated(mesh)
  step = jax.jit(make_train_step(setup["model"], setup["tx"], setup["kind"]),
                 in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=0)
  state = par.put_global(setup["state"], state_sh)
  new_state, metrics = step(state, par.shard_batch(setup["batch"], batch_sh), setup["rng"])
  return new_state, metrics


def _assert_matches_reference(setup, new_state, metrics):
  ref_state, ref_metrics = setup["ref"]
  new_state, metrics = jax.device_get(new_state), jax.device_get(metrics)
  assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) <= TOL
  assert abs(float(metrics["grad_norm"]) - float(ref_metrics["grad_norm"])) <= TOL * max(
      1.0, float(ref_metrics["grad_norm"]))
  assert _max_diff(new_state.params, setup["state"].params) > 1e-4  # the step did update the parameters
  assert _max_diff(new_state.params, ref_state.params) <= TOL
  assert _max_diff(new_state.opt_state, ref_state.opt_state) <= TOL  # Adam's mu/nu: the gradients
  assert int(new_state.step) == 1


def test_jit_on_8_devices_equals_single_device(setup):
  new_state, metrics = _jit_step(setup, {"data": -1, "fsdp": 1})
  leaf = jax.tree.leaves(new_state.params)[0]
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.spec == jax.P()
  _assert_matches_reference(setup, new_state, metrics)


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_fsdp_equals_replicated(setup, fsdp):
  new_state, metrics = _jit_step(setup, {"data": -1, "fsdp": fsdp})
  specs = [a.sharding.spec for a in jax.tree.leaves(new_state.params)]
  assert any("fsdp" in tuple(s) for s in specs)  # parameters really are sharded
  big = max(jax.tree.leaves(new_state.params), key=lambda a: a.size)
  assert "fsdp" in tuple(big.sharding.spec)
  shard = big.addressable_shards[0].data
  assert shard.size == big.size // fsdp
  _assert_matches_reference(setup, new_state, metrics)


def test_pmap_equals_jit(setup):
  devices = jax.local_devices()
  step = jax.pmap(make_train_step(setup["model"], setup["tx"], setup["kind"], axis_name="batch"),
                  axis_name="batch", in_axes=(0, 0, None), devices=devices)
  new_state, metrics = step(par.replicate(setup["state"], devices),
                            par.split_for_pmap(setup["batch"], devices), setup["rng"])
  jit_state, jit_metrics = _jit_step(setup, {"data": 8})
  one, metrics = par.unreplicate(new_state), par.unreplicate(metrics)
  assert abs(float(metrics["loss"]) - float(jit_metrics["loss"])) <= TOL
  assert _max_diff(one.params, jit_state.params) <= TOL
  assert _max_diff(one.opt_state, jit_state.opt_state) <= TOL
  _assert_matches_reference(setup, one, metrics)


def test_state_shardings_rules():
  mesh = par.make_mesh({"data": 2, "fsdp": 4})
  tree = {"w": jnp.zeros((6, 12)), "b": jnp.zeros((3,)), "s": jnp.zeros(()), "v": jnp.zeros((8, 16))}
  specs = {k: v.spec for k, v in par.state_shardings(tree, mesh).items()}
  assert specs == {"w": jax.P(None, "fsdp"), "b": jax.P(), "s": jax.P(), "v": jax.P(None, "fsdp")}
  assert par.batch_sharding(mesh).spec == jax.P(("data", "fsdp"))


def test_make_mesh_errors():
  assert dict(zip(par.make_mesh({"data": -1, "fsdp": 2}).axis_names,
                  par.make_mesh({"data": -1, "fsdp": 2}).devices.shape)) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    par.make_mesh({"data": 16, "fsdp": 1})
  with pytest.raises(ValueError, match="do not divide"):
    par.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="not supported"):
    par.make_mesh({"model": 2})


def test_non_divisible_global_batch_is_an_error_before_compiling(tmp_path, monkeypatch):
  import linformer_jax.train as train_lib

  def no_init(*args, **kwargs):
    raise AssertionError("initialised/compiled before checking the batch")

  monkeypatch.setattr(train_lib, "init_state", no_init)
  with pytest.raises(ValueError, match=r"batch_size=4 .*8 data-parallel devices"):
    train_and_evaluate(_config(**{"mesh.data": 8}), tmp_path / "a")
  with pytest.raises(ValueError, match=r"eval_batch_size=12 .*8 data-parallel devices"):
    train_and_evaluate(_config(batch_size=8, eval_batch_size=12, **{"mesh.data": -1}), tmp_path / "b")
  with pytest.raises(ValueError, match=r"batch_size=4 .*8 data-parallel devices"):
    train_and_evaluate(_config(parallel="pmap", **{"mesh.data": 8}), tmp_path / "c")
  with pytest.raises(ValueError, match="parallel='nope'"):
    train_and_evaluate(_config(parallel="nope"), tmp_path / "d")


def _final_state(workdir):
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
  state, _ = checkpointer.restore_raw(checkpointer.latest_step())
  checkpointer.close()
  return state


@pytest.mark.parametrize("name,overrides", [
    ("mlm_linformer", {"model.dropout": 0.0}),
    ("digits_xcit", {"model.drop_path_rate": 0.0}),  # pmap: cross-replica BatchNorm (bn_axis_name="batch")
])
def test_train_and_evaluate_parallel_equals_one_device(tmp_path, name, overrides):
  runs = {"one": {"mesh.data": 1}, "jit8": {"mesh.data": 8}, "pmap8": {"mesh.data": 8, "parallel": "pmap"}}
  finals, states = {}, {}
  for tag, extra in runs.items():
    finals[tag] = train_and_evaluate(_config(name, batch_size=8, **overrides, **extra), tmp_path / tag)
    states[tag] = _final_state(tmp_path / tag)
  for tag in ("jit8", "pmap8"):
    assert finals[tag]["step"] == finals["one"]["step"] == 6
    assert _max_diff(states[tag]["params"], states["one"]["params"], ZERO_GRAD) <= 1e-5, tag
    assert _max_diff(states[tag]["model_state"], states["one"]["model_state"]) <= 1e-5, tag
    assert abs(finals[tag]["eval_loss"] - finals["one"]["eval_loss"]) <= 1e-5, tag
  if name == "digits_xcit":
    assert "batch_stats" in states["one"]["model_state"]


def test_pmap_resume_gives_the_uninterrupted_result(tmp_path):
  cfg = dict(batch_size=8, parallel="pmap", **{"model.dropout": 0.0, "mesh.data": 8})
  train_and_evaluate(_config(**cfg), tmp_path / "straight")
  train_and_evaluate(_config(total_steps=3, **cfg), tmp_path / "resumed")
  train_and_evaluate(_config(**cfg), tmp_path / "resumed")
  a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
  assert int(b["step"]) == 6
  assert _max_diff(a["params"], b["params"]) <= 1e-6
