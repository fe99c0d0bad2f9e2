"""The README's example runs as written, and the README starts with exactly two commands."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_two_commands():
  text = README.read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S)
  assert first_block is not None and text.index("```bash") < text.index("\n## ")
  commands = [line for line in first_block.group(1).splitlines() if line.strip()]
  assert [c.split("#")[0].strip() for c in commands] == ["make train", "make test"]


def test_readme_example_runs():
  text = README.read_text()
  example = text.split("### Example", 1)[1]
  code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
  namespace = {}
  exec(compile(code, "README-example", "exec"), namespace)  # the example's own asserts must hold
  assert namespace["y"].shape == (2, 700, 128)


def test_readme_xcit_example_runs():
  text = README.read_text()
  code = re.search(r"```python\n(.*?)```", text.split("## XCiT", 1)[1], re.S).group(1)
  namespace = {}
  exec(compile(code, "README-xcit-example", "exec"), namespace)
  assert namespace["logits"].shape == (2, 1000)
  assert namespace["tokens"].shape == (2, 1 + 14 * 20, 128)
  assert namespace["new_variables"]["params"]["head"]["kernel"].shape == (128, 10)


def _python_block(after: str) -> str:
  return re.search(r"```python\n(.*?)```", README.read_text().split(after, 1)[1], re.S).group(1)


def test_readme_classifier_example_runs():
  namespace = {}
  exec(compile(_python_block("### Classifiers, presets, precision"), "README-classifier-example", "exec"), namespace)
  # CLS pooling: the logits are the CAM row of position 0 plus the bias (numpy, float64)
  feats = np.asarray(namespace["feats"], np.float64)
  w = {k: np.asarray(v, np.float64) for k, v in namespace["w"].items()}
  np.testing.assert_allclose(np.asarray(namespace["logits"]), feats[:, 0] @ w["kernel"] + w["bias"], atol=1e-4)
  assert namespace["new_variables"]["params"]["head"]["kernel"].shape == (64, 3)
  # BERT-base geometry counted by hand: token + position embeddings, per layer Q/K/V (no bias), output projection,
  # feed-forward, two LayerNorms and one (n, k) E = F, then the final LayerNorm; the output embedding is tied
  d, ff, vocab, n, k, layers = 768, 3072, 30522, 512, 256, 12
  layer = 3 * d * d + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d + n * k
  expected = vocab * d + n * d + layers * layer + 2 * d
  assert namespace["n_params"] == expected == 110_435_328
  assert namespace["xcit_bf16"].dtype == np.dtype("bfloat16")


def test_readme_optimizer_example_runs():
  namespace = {}
  exec(compile(_python_block("Both optimizers are optax transformations"), "README-optim-example", "exec"), namespace)
  assert float(namespace["lr"]) == 0.0  # warmup from 0: the first update's LR is the schedule's value at 0
  factored = namespace["opt_state"][1][0]  # per head: rows (heads, head_dim), columns (dim, heads), no full moment
  assert factored.v_row["qkv"]["kernel"].shape == (4, 64) and factored.v_col["qkv"]["kernel"].shape == (128, 4)
  params = namespace["params"]["qkv"]["kernel"]
  np.testing.assert_array_equal(np.asarray(params), np.ones((128, 4, 64)))  # a zero LR left the parameters alone
