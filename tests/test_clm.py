"""The causal byte-level LM: next-byte examples from the corpus, a runlocal training run of configs/clm_linformer.py
(Linformer and full attention), ``experiments.generate`` on it, and the trainer refusing a non-causal model."""
import numpy as np
import pytest

from experiments import generate as generate_cli
from linformer_jax.data.mlm import PAD_ID, MLMDataset
from linformer_jax.train import train_and_evaluate
from helpers import train_config


def _corpus(tmp_path):
  text = b"def f(x):\n    return x + 1\n" * 40
  path = tmp_path / "corpus.txt"
  path.write_bytes(text)
  return path, text


def test_causal_examples_are_the_next_bytes(tmp_path):
  path, text = _corpus(tmp_path)
  data = MLMDataset(path=str(path), max_len=16, num_eval=2, objective="causal")
  batch = data.batch_at(3, 4)
  chunks = np.frombuffer(text, np.uint8).astype(np.int32)
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    start = next(i for i in range(0, len(chunks), 16) if np.array_equal(chunks[i:i + 16], inputs[inputs != PAD_ID]))
    real = inputs != PAD_ID
    np.testing.assert_array_equal(targets[:-1][real[1:]], chunks[start + 1:start + 16][real[1:]])
    assert targets[-1] == PAD_ID and weights[-1] == 0.0  # the last byte of a chunk has no next byte in it
    np.testing.assert_array_equal(weights, (targets != PAD_ID).astype(np.float32))
  assert data.info["objective"] == "causal"


@pytest.fixture(scope="module")
def clm_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("clm")
  out = {}
  for attention in ("linformer", "full"):
    out[attention] = str(root / attention)
    train_and_evaluate(train_config("clm_linformer", **{"model.attention": attention}), out[attention])
  return out


@pytest.mark.parametrize("attention", ["linformer", "full"])
def test_generate_cli_continues_the_prompt(clm_runs, attention, capsys):
  generate_cli.main(["--workdir", clm_runs[attention], "--prompt", "def ", "--max_new_tokens", "12",
                     "--temperature", "0"])
  text = capsys.readouterr().out
  assert text.startswith("def ") and len(text.encode("utf-8", errors="replace")) >= 4


def test_generate_cli_errors(clm_runs, tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    generate_cli.main(["--workdir", clm_runs["linformer"], "--prompt", "x" * 70, "--max_new_tokens", "1"])
  assert info.value.code == 1 and "exceeds the model's max_len=64" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    generate_cli.main(["--workdir", str(tmp_path / "missing"), "--prompt", "a"])
  assert capsys.readouterr().err.startswith("error: ")


def test_causal_objective_needs_a_causal_model(tmp_path):
  config = train_config("clm_linformer", **{"model.causal": False})
  with pytest.raises(ValueError, match="data.objective='causal'.*model.causal=True"):
    train_and_evaluate(config, str(tmp_path / "run"))
