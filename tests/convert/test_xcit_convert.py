"""from_timm_xcit / load_state_dict / the conversion CLI against timm 1.0.31 reference outputs (no torch needed).

The fixtures in tests/fixtures/xcit/ hold only the timm state_dict manifest, uint8 input images and timm's
outputs; the (deliberately perturbed) weights are regenerated here from the seed by
tests/fixtures/xcit_weights.py, exactly as tests/fixtures/make_xcit_fixtures.py loaded them into timm.
"""
from __future__ import annotations

import builtins
import functools
import importlib.util
import json
import pathlib
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from linformer_jax.convert import from_timm_xcit, load_state_dict, restore_xcit_checkpoint
from linformer_jax.convert.__main__ import main as convert_main

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
_spec = importlib.util.spec_from_file_location("xcit_weights", FIXTURES / "xcit_weights.py")
xcit_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xcit_weights)

TOL = 1e-4  # measured ~2e-6 (float32 through 12 blocks)
MODELS = {"xcit_nano_12_p16": "xcit_nano_12_p16_224", "xcit_nano_12_p8": "xcit_nano_12_p8_224"}


@functools.cache
def fixture(stem: str):
  """(meta, arrays, state_dict, module, variables) of one fixture model; converted once per session."""
  meta = json.loads((FIXTURES / "xcit" / f"{stem}.json").read_text())
  with np.load(FIXTURES / "xcit" / f"{stem}.npz") as data:
    arrays = {k: data[k] for k in data.files}
  state_dict = xcit_weights.make_state_dict(meta["manifest"], meta["seed"])
  module, variables = from_timm_xcit(state_dict, MODELS[stem])
  return meta, arrays, state_dict, module, variables


def images(arrays, case):
  """NCHW uint8 fixture → NHWC float32 model input."""
  return jnp.asarray(xcit_weights.decode_images(arrays[f"{case}.images_u8"]).transpose(0, 2, 3, 1))


# Faster XLA:CPU compiles (≈3 s instead of ≈7 s per input shape, same results to the last bit here).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(m, x):
  """x (B, H, W, 3) → (logits, features, patch_embed (B, N, C), pos_embed (N, C), block0 (B, N, C))."""
  tokens = m.patch_embed(x)
  b, hp, wp, c = tokens.shape
  tokens = tokens.reshape(b, hp * wp, c)
  pos = m.pos_embed((hp, wp))
  block0 = m.blocks[0](tokens + pos[None], (hp, wp))
  features = m.forward_features(x)
  return m.forward_head(features), features, tokens, pos, block0


@functools.cache
def compiled(module, image_shape):
  """Compiled (variables, images) → ``_run`` outputs, for one module and input shape."""
  fn = jax.jit(lambda variables, x: module.apply(variables, x, method=_run))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), fixture_abstract(module))
  return fn.lower(abstract, jax.ShapeDtypeStruct(image_shape, jnp.float32)).compile(FAST_COMPILE)


def fixture_abstract(module):
  from linformer_jax.convert.xcit import abstract_variables
  return abstract_variables(module)


def outputs(stem, case, variables=None):
  _, arrays, _, module, variables0 = fixture(stem)
  x = images(arrays, case)
  logits, features, tokens, pos, block0 = compiled(module, x.shape)(variables or variables0, x)
  return dict(logits=logits, features=features, patch_embed=tokens, pos_embed=pos, block0=block0)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flat(variables):
  return flatten_dict(jax.tree.map(np.asarray, variables))


def assert_same_variables(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=str(key))


def official_layout(state_dict):
  """timm layout → facebookresearch/xcit layout: pos_embeder.*, fused class-attention qkv, {"model": ...}."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("pos_embed."):
      key = "pos_embeder." + key[len("pos_embed."):]
    out[key] = value
  j = 0
  while f"cls_attn_blocks.{j}.attn.q.weight" in out:
    for leaf in ("weight", "bias"):
      parts = [out.pop(f"cls_attn_blocks.{j}.attn.{p}.{leaf}") for p in "qkv"]
      out[f"cls_attn_blocks.{j}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
    j += 1
  assert j == 2
  return {"model": out}


# --- parity with timm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", sorted(MODELS))
def test_fixture_weights_regenerate(stem):
  meta, arrays, state_dict, _, _ = fixture(stem)
  assert list(state_dict) == [k for k, _, _ in meta["manifest"]]
  assert xcit_weights.state_dict_digest(state_dict) == meta["weights_sha256"], (
      "make_state_dict no longer reproduces the weights the fixtures were made with; regenerate the fixtures")
  assert sum(a.nbytes for a in arrays.values()) < 1_000_000


CASES = [("xcit_nano_12_p16", "small"), ("xcit_nano_12_p16", "full"), ("xcit_nano_12_p8", "small")]


@pytest.mark.parametrize("stem,case", CASES)
def test_logits_match_timm(stem, case):
  _, arrays, _, _, _ = fixture(stem)
  got = outputs(stem, case)
  for name in ("logits", "features"):
    diff = max_diff(got[name], arrays[f"{case}.{name}"])
    print(f"{stem}/{case} {name}: max abs diff {diff:.2e}")
    assert diff <= TOL, f"{name}: {diff}"


@pytest.mark.parametrize("stem", sorted(MODELS))
@pytest.mark.parametrize("name", ["patch_embed", "pos_embed", "block0"])
def test_intermediates_match_timm(stem, name):
  _, arrays, _, _, _ = fixture(stem)
  want = arrays[f"small.{name}"]
  got = np.asarray(outputs(stem, "small")[name])
  assert got.shape == want.shape
  diff = max_diff(got, want)
  print(f"{stem}/small {name}: max abs diff {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("stem", sorted(MODELS))
def test_logits_depend_on_input(stem):
  """The perturbed weights make the check meaningful: the two fixture images give clearly different logits."""
  _, arrays, _, _, _ = fixture(stem)
  logits = arrays["small.logits"]
  assert logits.std() > 0.5
  assert np.abs(logits[0] - logits[1]).max() > 1000 * TOL


MUTATIONS = {  # plausible mapping bugs; each must move the logits far beyond the tolerance
    "transposed XCA proj": lambda p, s: p["blocks_3"]["attn"]["proj"].update(
        kernel=p["blocks_3"]["attn"]["proj"]["kernel"].T),
    "gamma1 <-> gamma3": lambda p, s: p["blocks_5"].update(gamma1=p["blocks_5"]["gamma3"],
                                                           gamma3=p["blocks_5"]["gamma1"]),
    "temperature = 1": lambda p, s: p["blocks_7"]["attn"].update(
        temperature=jnp.ones_like(p["blocks_7"]["attn"]["temperature"])),
    "BN stats ignored": lambda p, s: s["blocks_2"]["local_mp"]["bn"].update(
        mean=jnp.zeros(128), var=jnp.ones(128)),
    "depthwise kernel flipped": lambda p, s: p["blocks_9"]["local_mp"]["conv1"].update(
        kernel=p["blocks_9"]["local_mp"]["conv1"]["kernel"][::-1]),
    "stem conv H<->W": lambda p, s: p["patch_embed"]["conv_1"].update(
        kernel=p["patch_embed"]["conv_1"]["kernel"].transpose(1, 0, 2, 3)),
    "CA value heads swapped": lambda p, s: p["cls_attn_blocks_1"]["attn"]["value"].update(
        kernel=p["cls_attn_blocks_1"]["attn"]["value"]["kernel"][:, ::-1]),
    "CA proj transposed": lambda p, s: p["cls_attn_blocks_0"]["attn"]["out"].update(
        kernel=p["cls_attn_blocks_0"]["attn"]["out"]["kernel"].reshape(128, 128).T.reshape(4, 32, 128)),
    "pos-embed features y<->x": lambda p, s: p["pos_embed"]["token_projection"].update(
        kernel=jnp.roll(p["pos_embed"]["token_projection"]["kernel"], 32, axis=0)),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mapping_bugs_cannot_hide(mutation):
  _, arrays, _, _, variables = fixture("xcit_nano_12_p16")
  mutated = jax.tree.map(lambda a: a, variables)  # fresh containers, shared arrays
  MUTATIONS[mutation](mutated["params"], mutated["batch_stats"])
  diff = max_diff(outputs("xcit_nano_12_p16", "small", mutated)["logits"], arrays["small.logits"])
  assert diff > 100 * TOL, f"{mutation}: logits moved only {diff}"


# --- layouts and files ---------------------------------------------------------------------------------------------

def test_official_layout_gives_identical_variables():
  _, arrays, state_dict, module, variables = fixture("xcit_nano_12_p16")
  official = official_layout(state_dict)
  assert "pos_embeder.token_projection.weight" in official["model"]
  assert official["model"]["cls_attn_blocks.0.attn.qkv.weight"].shape == (384, 128)
  module2, variables2 = from_timm_xcit(official, "xcit_nano_12_p16_224")
  assert module2 == module
  assert_same_variables(variables2, variables)
  # also without num_batches_tracked, with a DDP "module." prefix and a "state_dict" wrapper
  stripped = {"state_dict": {"module." + k: v for k, v in official["model"].items()
                             if not k.endswith("num_batches_tracked")}}
  assert_same_variables(from_timm_xcit(stripped, "xcit_nano_12_p16_224")[1], variables)


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_safetensors_round_trip(tmp_path, layout):
  from safetensors.numpy import save_file
  _, arrays, state_dict, _, variables = fixture("xcit_nano_12_p16")
  sd = state_dict if layout == "timm" else official_layout(state_dict)["model"]
  path = tmp_path / "xcit.safetensors"
  save_file(sd, str(path))
  loaded = load_state_dict(path)
  assert list(loaded) == list(sd) or sorted(loaded) == sorted(sd)
  for key, value in sd.items():
    assert loaded[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded[key], value)
  assert_same_variables(from_timm_xcit(loaded, "xcit_nano_12_p16_224")[1], variables)


class _WritesMarker:
  """Unpickling this would create a marker file (a harmless stand-in for arbitrary code execution)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return builtins.open, (self.marker, "w")


def _malicious_pth(tmp_path, state_dict):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pth"
  payload = {"model": {"cls_token": state_dict["cls_token"], "evil": _WritesMarker(marker)}}
  with open(path, "wb") as f:
    pickle.dump(payload, f)
  assert not marker.exists()
  return path, marker


def test_malicious_pickle_is_refused(tmp_path):
  pytest.importorskip("torch")
  _, _, state_dict, _, _ = fixture("xcit_nano_12_p16")
  path, marker = _malicious_pth(tmp_path, state_dict)
  with pytest.raises(ValueError, match="refusing to load"):
    load_state_dict(path)
  assert not marker.exists()


def test_pth_without_torch_explains_safetensors(tmp_path, monkeypatch):
  _, _, state_dict, _, _ = fixture("xcit_nano_12_p16")
  path, marker = _malicious_pth(tmp_path, state_dict)
  monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
  with pytest.raises(ImportError, match=r"safetensors(.|\n)*weights_only=True"):
    load_state_dict(path)
  assert not marker.exists()


def test_load_state_dict_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
    load_state_dict(tmp_path / "nothere.safetensors")
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match=r"\.safetensors, \.pth, \.pt, \.bin"):
    load_state_dict(tmp_path / "w.npz")


# --- error reporting ---------------------------------------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_keys_are_named():
  _, _, state_dict, _, _ = fixture("xcit_nano_12_p16")
  sd = dict(state_dict)
  del sd["blocks.4.gamma3"]
  sd["blocks.0.attn.temperature"] = np.ones((4,), np.float32)
  sd["head_dist.weight"] = np.zeros((1000, 128), np.float32)
  with pytest.raises(ValueError) as err:
    from_timm_xcit(sd, "xcit_nano_12_p16_224")
  msg = str(err.value)
  assert "missing keys (1): blocks.4.gamma3 (128,)" in msg
  assert "unexpected keys (1): head_dist.weight" in msg
  assert "blocks.0.attn.temperature: got (4,), expected (4, 1, 1)" in msg


def test_wrong_model_or_num_classes():
  _, _, state_dict, _, variables = fixture("xcit_nano_12_p16")
  with pytest.raises(ValueError, match="head.weight: got"):
    from_timm_xcit(state_dict, "xcit_nano_12_p16_224", num_classes=10)
  with pytest.raises(ValueError, match="wrong shapes"):
    from_timm_xcit(state_dict, "xcit_tiny_12_p16_224")
  with pytest.raises(ValueError, match="missing keys"):  # p8 has one stem stage fewer, so the p16 dict fits wrongly
    from_timm_xcit(fixture("xcit_nano_12_p8")[2], "xcit_nano_12_p16_224")
  with pytest.raises(ValueError, match="not an XCiT model"):
    from_timm_xcit(state_dict, "deit_tiny_patch16_224")
  headless = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
  module, headless_vars = from_timm_xcit(headless, "xcit_nano_12_p16_224")
  assert module.num_classes == 0 and "head" not in headless_vars["params"]


# --- CLI and Orbax -------------------------------------------------------------------------------------------------

def test_cli_writes_orbax_checkpoint_that_restores(tmp_path, capsys):
  from safetensors.numpy import save_file
  _, arrays, state_dict, module, variables = fixture("xcit_nano_12_p16")
  src = tmp_path / "xcit.safetensors"
  save_file(official_layout(state_dict)["model"], str(src))
  out = tmp_path / "ckpt"
  assert convert_main(["xcit", "--name", "xcit_nano_12_p16_224", "--src", str(src), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert str(out) in printed and "params: 343 arrays, 3,053,224 values" in printed
  restored_module, restored = restore_xcit_checkpoint(out)
  assert restored_module == module
  assert_same_variables(restored, variables)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_main(["xcit", "--name", "xcit_nano_12_p16_224", "--src", str(src), "--out", str(out)])
  assert convert_main(["xcit", "--name", "xcit_nano_12_p16_224", "--src", str(src), "--out", str(out),
                       "--overwrite"]) == 0
  assert_same_variables(restore_xcit_checkpoint(out, "xcit_nano_12_p16_224")[1], variables)
