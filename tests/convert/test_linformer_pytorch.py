"""from_linformer_pytorch against reference outputs of linformer-pytorch 0.19.3 (no torch needed).

The fixtures are made by tests/fixtures/make_linformer_pytorch_fixtures.py (see there).
"""
import contextlib
import json
import pathlib

import numpy as np
import pytest

from linformer_jax.convert import from_linformer_pytorch

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "linformer_pytorch"
CASES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
TOL = 1e-5


def load(case):
  """Returns (state_dict, kwargs, x, mask or None, y) of a fixture."""
  with np.load(FIXTURES / f"{case}.npz") as data:
    values, state_dict, offset = data["sd_values"], {}, 0
    for name, shape in json.loads(str(data["sd_index"])):
      size = int(np.prod(shape, dtype=np.int64))
      state_dict[name] = values[offset:offset + size].reshape(shape)
      offset += size
    assert offset == values.size
    mask = data["mask"] if "mask" in data.files else None
    return state_dict, json.loads(str(data["kwargs"])), data["x"], mask, data["y"]


def max_diff(module, variables, x, mask, y):
  return float(np.max(np.abs(np.asarray(module.apply(variables, x, mask=mask)) - y)))


def test_fixtures_present():
  assert len(CASES) >= 20, f"expected the linformer-pytorch fixtures in {FIXTURES}"


@pytest.mark.parametrize("case", CASES)
def test_matches_pytorch(case):
  state_dict, kwargs, x, mask, y = load(case)
  ignored = kwargs.get("parameter_sharing", "layerwise") == "layerwise" and kwargs.get("k_reduce_by_layer")
  ctx = pytest.warns(UserWarning, match="k_reduce_by_layer") if ignored else contextlib.nullcontext()
  with ctx:
    module, variables = from_linformer_pytorch(state_dict, **kwargs)
  assert module.norm == "post" and module.projection_bias
  assert max_diff(module, variables, x, mask, y) <= TOL


def test_layerwise_k_reduce_warns_and_converts_with_zero():
  state_dict, kwargs, x, mask, y = load("kreduce_layerwise_ignored")
  assert kwargs["parameter_sharing"] == "layerwise" and kwargs["k_reduce_by_layer"] > 0
  with pytest.warns(UserWarning, match="no effect"):
    module, variables = from_linformer_pytorch(state_dict, **kwargs)
  assert module.k_reduce_by_layer == 0
  assert max_diff(module, variables, x, mask, y) <= TOL


def test_checkpoint_level_accepted():
  state_dict, kwargs, x, mask, y = load("sharing_headwise")
  module, variables = from_linformer_pytorch(state_dict, **dict(kwargs, checkpoint_level="C2"))
  assert max_diff(module, variables, x, mask, y) <= TOL


def test_fixture_detects_swapped_projections():
  """Swapping E and F of one head must change the output (the fixtures are sensitive to the mapping)."""
  state_dict, kwargs, x, mask, y = load("sharing_none")
  sd = dict(state_dict)
  for p in ("weight", "bias"):
    e, f = f"seq.0.fn.heads.1.E.{p}", f"seq.0.fn.heads.1.F.{p}"
    sd[e], sd[f] = state_dict[f], state_dict[e]
  module, variables = from_linformer_pytorch(sd, **kwargs)
  assert max_diff(module, variables, x, mask, y) > 1e-3


def test_missing_key():
  state_dict, kwargs, *_ = load("sharing_none")
  del state_dict["seq.2.fn.to_q.1.weight"]
  with pytest.raises(ValueError, match=r"missing key 'seq\.2\.fn\.to_q\.1\.weight'"):
    from_linformer_pytorch(state_dict, **kwargs)


def test_missing_copy_of_shared_module():
  state_dict, kwargs, *_ = load("sharing_layerwise")
  del state_dict["seq.2.fn.heads.1.F.bias"]
  with pytest.raises(ValueError, match=r"missing key 'seq\.2\.fn\.heads\.1\.F\.bias'"):
    from_linformer_pytorch(state_dict, **kwargs)


def test_unequal_copies_of_shared_module():
  state_dict, kwargs, *_ = load("sharing_kv")
  state_dict["seq.0.fn.heads.1.F.weight"] = state_dict["seq.0.fn.heads.1.F.weight"] + 1.0
  with pytest.raises(ValueError, match=r"'seq\.0\.fn\.heads\.1\.F\.weight' differs"):
    from_linformer_pytorch(state_dict, **kwargs)


@pytest.mark.parametrize("key", ["seq.0.fn.w_o.weight", "seq.1.fn.w_1.bias", "seq.0.fn.heads.0.E.weight",
                                 "seq.2.norm.weight"])
def test_wrong_shape(key):
  state_dict, kwargs, *_ = load("sharing_none")
  state_dict[key] = np.zeros(state_dict[key].shape + (1,), np.float32)
  with pytest.raises(ValueError, match=rf"key '{key}' has shape"):
    from_linformer_pytorch(state_dict, **kwargs)


def test_wrong_option_gives_shape_error():
  state_dict, kwargs, *_ = load("sharing_none")
  with pytest.raises(ValueError, match=r"key 'seq\.1\.fn\.w_1\.weight' has shape"):
    from_linformer_pytorch(state_dict, **dict(kwargs, dim_ff=17))


@pytest.mark.parametrize("case,key", [("sharing_none", "seq.4.fn.extra.weight"),
                                      ("no_ff", "seq.1.fn.w_1.weight")])
def test_unused_key(case, key):
  state_dict, kwargs, *_ = load(case)
  state_dict[key] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError, match=rf"unused keys.*'{key}'"):
    from_linformer_pytorch(state_dict, **kwargs)


def test_unknown_kwarg():
  state_dict, kwargs, *_ = load("sharing_none")
  with pytest.raises(TypeError, match="emb_dim"):
    from_linformer_pytorch(state_dict, **kwargs, emb_dim=8)


@pytest.mark.parametrize("option,match", [(dict(decoder_mode=True), "decoder_mode"),
                                          (dict(causal=True), "causal"),
                                          (dict(ff_intermediate=12), "ff_intermediate"),
                                          (dict(method="no_params"), "not saved in state_dict"),
                                          (dict(method="pooling"), "method"),
                                          (dict(activation="tanh"), "activation"),
                                          (dict(parameter_sharing="all"), "parameter_sharing")])
def test_unsupported_option(option, match):
  state_dict, kwargs, *_ = load("sharing_none")
  with pytest.raises(ValueError, match=match):
    from_linformer_pytorch(state_dict, **dict(kwargs, **option))


def test_convolution_needs_k_dividing_n():
  state_dict, kwargs, *_ = load("conv_headwise")
  with pytest.raises(ValueError, match="k to divide input_size"):
    from_linformer_pytorch(state_dict, **dict(kwargs, dim_k=5))
