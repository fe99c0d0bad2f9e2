"""Every example of the documentation runs: the ```python blocks of README.md and of the pages under docs/, and the
``>>>`` examples in the docstrings of every public module.

A page's blocks run in order in one namespace (as a reader pastes them into one session), in a fresh namespace per
page. Where a block's result can be checked against an independent computation, ``CHECKS`` names the page, a text
that occurs in the block, and the check, which receives the namespace right after that block.
"""
import doctest
import importlib
import pathlib
import re
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = ("_build", "_autosummary", "bench", "results")  # benchmark/result tables are written by the scripts
sys.path.insert(0, str(DOCS / "_ext"))
from api_coverage import public_modules  # noqa: E402  pylint: disable=wrong-import-position

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages() -> list[str]:
  """README.md and every hand-written markdown page under docs/, as paths relative to the repository root."""
  pages = [p for p in DOCS.rglob("*.md") if not set(p.relative_to(DOCS).parts[:-1]) & set(GENERATED)]
  return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in pages)


def python_blocks(page: str) -> list[str]:
  """The ```python blocks of a markdown page, in order."""
  return PYTHON_BLOCK.findall((ROOT / page).read_text())


# --- checks of particular examples against independent computations -------------------------------------------

def _check_encoder(ns):
  assert ns["y"].shape == (2, 700, 128)


def _check_xcit(ns):
  assert ns["logits"].shape == (2, 1000)
  assert ns["tokens"].shape == (2, 1 + 14 * 20, 128)
  assert ns["new_variables"]["params"]["head"]["kernel"].shape == (128, 10)


def _check_classifier(ns):
  # CLS pooling: the logits are the CAM row of position 0 plus the bias (numpy, float64)
  feats = np.asarray(ns["feats"], np.float64)
  w = {k: np.asarray(v, np.float64) for k, v in ns["w"].items()}
  np.testing.assert_allclose(np.asarray(ns["logits"]), feats[:, 0] @ w["kernel"] + w["bias"], atol=1e-4)
  assert ns["new_variables"]["params"]["head"]["kernel"].shape == (64, 3)


def _check_presets(ns):
  # BERT-base geometry counted by hand: token + position embeddings, per layer Q/K/V (no bias), output projection,
  # feed-forward, two LayerNorms and one (n, k) E = F, then the final LayerNorm; the output embedding is tied
  d, ff, vocab, n, k, layers = 768, 3072, 30522, 512, 256, 12
  layer = 3 * d * d + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d + n * k
  expected = vocab * d + n * d + layers * layer + 2 * d
  assert ns["n_params"] == expected == 110_435_328


def _check_bf16(ns):
  assert ns["xcit_bf16"].dtype == np.dtype("bfloat16")


def _check_optimizer(ns):
  assert float(ns["lr"]) == 0.0  # warmup from 0: the first update's LR is the schedule's value at 0
  factored = ns["opt_state"][1][0]  # per head: rows (heads, head_dim), columns (dim, heads), no full moment
  assert factored.v_row["qkv"]["kernel"].shape == (4, 64) and factored.v_col["qkv"]["kernel"].shape == (128, 4)
  np.testing.assert_array_equal(np.asarray(ns["params"]["qkv"]["kernel"]), np.ones((128, 4, 64)))  # LR 0: unchanged


def _check_eq7(ns):
  # Eq. 7 in float64 numpy from the layer's parameters: softmax(Q (E K)^T / sqrt(d_k)) (F V), heads concatenated, W^O
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in ns["attn_variables"]["params"].items()}
  x = np.asarray(ns["x_attn"], np.float64)[0]
  e, f = p["E"]["kernel"].T, p["F"]["kernel"].T
  heads = []
  for i in range(p["query"]["kernel"].shape[1]):
    q, k, v = (x @ p[name]["kernel"][:, i] for name in ("query", "key", "value"))
    logits = q @ (e @ k).T / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append(weights / weights.sum(-1, keepdims=True) @ (f @ v))
  w_o = p["out"]["kernel"].reshape(-1, p["out"]["kernel"].shape[-1])
  np.testing.assert_allclose(np.asarray(ns["out"])[0], np.concatenate(heads, -1) @ w_o + p["out"]["bias"], atol=1e-5)


def _check_sharing_counts(ns):
  layers, heads = 12, 12  # paper Sec. 4: E and F per head per layer / per layer / one per layer / one
  assert ns["counts"] == {"none": 2 * heads * layers, "headwise": 2 * layers, "kv": layers, "layerwise": 1}


def _check_k_per_layer(ns):
  assert ns["k_per_layer"] == [max(1, 32 - i * 8) for i in range(3)]


def _check_converted(ns):
  # the output of linformer-pytorch 0.19.3 recorded in the fixture
  with np.load(ROOT / "tests" / "fixtures" / "linformer_pytorch" / "mask_kv.npz") as fixture:
    np.testing.assert_allclose(np.asarray(ns["y_converted"]), fixture["y"], atol=1e-5)


def _check_xcit_maps(ns):
  # softmax rows: each channel's (XCA) and the CLS query's (class attention) weights sum to one
  np.testing.assert_allclose(np.asarray(ns["xca_map"], np.float64).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ns["cls_map"], np.float64).sum(-1), 1.0, atol=1e-5)
  assert ns["cls_grid"].shape == (2, 4, 14, 20)


def _check_cam(ns):
  # global_pool="avg": logits = mean over the patch tokens of their class scores + bias (numpy, float64)
  tokens = np.asarray(ns["tokens"], np.float64)[:, 1:]
  kernel, bias = (np.asarray(ns["w"][name], np.float64) for name in ("kernel", "bias"))
  np.testing.assert_allclose(np.asarray(ns["cam_logits"]), (tokens @ kernel).mean(1) + bias, atol=1e-4)


def _check_first_model(ns):
  assert ns["losses"][-1] < ns["losses"][0]


CHECKS = {  # page -> [(text in the block, check)]
    "README.md": [("Linformer(max_len=1024", _check_encoder)],
    "docs/linformer.md": [("eq7 =", _check_eq7), ("Linformer(max_len=1024", _check_encoder),
                          ("counts[sharing]", _check_sharing_counts), ("k_per_layer =", _check_k_per_layer),
                          ("forward_features", _check_classifier), ("linformer_base", _check_presets),
                          ("from_linformer_pytorch(sd", _check_converted)],
    "docs/xcit.md": [("XCiT.forward_features", _check_xcit), ("cls_grid =", _check_xcit_maps),
                     ("cam_logits =", _check_cam)],
    "docs/training.md": [("xcit_bf16", _check_bf16), ("optim.adafactor", _check_optimizer)],
    "docs/getting_started.md": [("losses.append", _check_first_model)],
}


def run_page(page: str) -> set[str]:
  """Runs a page's python blocks in one namespace; applies its ``CHECKS``; returns the markers that were checked."""
  namespace, checked = {"__name__": f"docs_example_{page}"}, set()
  for i, code in enumerate(python_blocks(page)):
    exec(compile(code, f"{page} (python block {i + 1})", "exec"), namespace)  # pylint: disable=exec-used
    for marker, check in CHECKS.get(page, []):
      if marker in code and marker not in checked:
        check(namespace)
        checked.add(marker)
  return checked


@pytest.mark.parametrize("page", [p for p in _pages() if python_blocks(p)])
def test_page_examples_run(page):
  checked = run_page(page)
  assert checked == {marker for marker, _ in CHECKS.get(page, [])}, "a checked example is no longer on the page"


def test_checked_pages_exist():
  for page in CHECKS:
    assert (ROOT / page).is_file(), page


def test_readme_starts_with_two_commands():
  text = (ROOT / "README.md").read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S)
  assert first_block is not None and text.index("```bash") < text.index("\n## ")
  commands = [line for line in first_block.group(1).splitlines() if line.strip()]
  assert [c.split("#")[0].strip() for c in commands] == ["make train", "make test"]


@pytest.mark.parametrize("module_name", public_modules("linformer_jax"))
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module_name}"
