"""load_model reads a finished run back (module + every variable collection + config) and reproduces its final
eval metrics with an independent numpy eval loop; its errors name the path and the problem; the predict library
and CLI (experiments.predict) on masked-LM, ListOps and image runs.

Three tiny runs (configs' runlocal variants, trained in-process as tests/test_train.py does) are shared by the
module: a masked-LM Linformer with projection="fixed" (its E/F in the "constants" collection), a ListOps
classifier and an XCiT on digits (BatchNorm statistics in "batch_stats").
"""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from linformer_jax import checkpoint as ckpt_lib
from linformer_jax import load_model
from linformer_jax import predict as pred
from linformer_jax.data import make_dataset
from linformer_jax.runs import checkpoint_steps, read_dataset_info
from linformer_jax.train import train_and_evaluate
from experiments import predict as predict_cli
from helpers import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"mlm": ("mlm_linformer", {"model.projection": "fixed"}), "listops": ("listops_linformer", {}),
        "image": ("digits_xcit", {})}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: workdir} of the three trained runs (6 steps, checkpoints at steps 3 and 6)."""
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for name, (config_name, overrides) in RUNS.items():
    out[name] = root / name
    train_and_evaluate(train_config(config_name, **overrides), out[name])
  return out


def _copy(run, dest, checkpoints=True):
  """A copy of a run's workdir without its data cache, plots and events (and optionally its checkpoints)."""
  skip = ["data_cache", "plots", "tensorboard"] + ([] if checkpoints else ["checkpoints"])
  shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*skip))
  return dest


def _last_eval_row(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [row for row in map(json.loads, f) if "eval_loss" in row][-1]


def _numpy_eval(module, variables, config, workdir):
  """Eval loss / accuracy over the trainer's eval batches: own forward call, cross-entropy in float64 numpy."""
  dataset = make_dataset(config.data, str(workdir))
  kind = dataset.info["kind"]
  apply = jax.jit(module.apply)
  totals = np.zeros(3)  # loss, correct, weight
  batch_size = config.eval_batch_size or config.batch_size
  for batch in itertools.islice(dataset.eval_batches(batch_size), config.eval_max_batches):
    inputs = (batch["image"],) if kind == "image" else (batch["inputs"], batch["mask"])
    logits = np.asarray(apply(variables, *inputs), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    if kind == "mlm":
      targets, weights = batch["targets"], batch["weights"] * batch["valid"][:, None]
    else:
      targets, weights = batch["label"], batch["valid"].astype(np.float64)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    totals += [(nll * weights).sum(), ((logits.argmax(-1) == targets) * weights).sum(), weights.sum()]
  return {"eval_loss": totals[0] / totals[2], "eval_accuracy": totals[1] / totals[2]}


@pytest.mark.parametrize("name,module_type,collections", [
    ("mlm", "LinformerLM", {"params", "constants"}),
    ("listops", "LinformerClassifier", {"params"}),
    ("image", "XCiT", {"params", "batch_stats"}),
])
def test_load_model_reproduces_the_final_eval(runs, name, module_type, collections):
  """The eval metrics of metrics.jsonl to float32 rounding: the trainer sums float32 cross-entropies per batch on
  the device (optax), this loop recomputes them in float64 from the logits of its own compiled forward pass.
  Accuracy is a count of argmax hits, equal unless a logit tie flips, which float32 noise does not cause here."""
  workdir = runs[name]
  module, variables, config = load_model(workdir)
  assert type(module).__name__ == module_type and set(variables) == collections
  assert config.model.name == json.loads((workdir / "config.json").read_text())["model"]["name"]
  ours, theirs = _numpy_eval(module, variables, config, workdir), _last_eval_row(workdir)
  assert theirs["step"] == config.total_steps
  np.testing.assert_allclose(ours["eval_loss"], theirs["eval_loss"], rtol=1e-5)
  assert ours["eval_accuracy"] == theirs["eval_accuracy"]


def test_fixed_projection_needs_the_constants_collection(runs):
  """Why load_model returns every collection: the fixed E/F are not parameters."""
  module, variables, _ = load_model(runs["mlm"])
  inputs = np.zeros((1, module.max_len), np.int32)
  with pytest.raises(Exception, match="constants"):
    module.apply({"params": variables["params"]}, inputs, inputs == 0)


def test_step_selection_and_dataset_info(runs, tmp_path):
  workdir = runs["listops"]
  assert checkpoint_steps(workdir) == [3, 6]
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
  saved = {step: checkpointer.restore_raw(step)[0]["params"] for step in (3, 6)}
  checkpointer.close()
  for step, expected in ((None, saved[6]), (3, saved[3])):
    params = load_model(workdir, step=step)[1]["params"]
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the trainer saved the dataset info (JSON: tuples as lists); a run without it rebuilds it from config.data
  config = load_model(workdir)[2]
  info = json.loads(json.dumps(make_dataset(config.data, str(workdir)).info))
  assert json.loads((workdir / "dataset_info.json").read_text()) == info
  old = _copy(workdir, tmp_path / "old")
  os.remove(old / "dataset_info.json")
  assert read_dataset_info(old) == info
  assert load_model(old)[0] == load_model(workdir)[0]
  # an unfinished write of a later step is not a committed checkpoint
  os.makedirs(old / "checkpoints" / "9.orbax-checkpoint-tmp-1" / "state")
  assert checkpoint_steps(old) == [3, 6]


def test_errors_name_the_path_and_the_problem(runs, tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f"workdir '{tmp_path / 'missing'}' does not exist")):
    load_model(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"'.*empty' is not a training run: it is empty"):
    load_model(tmp_path / "empty")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"is not a training run: it has no config.json"):
    load_model(tmp_path / "other")
  no_ckpt = _copy(runs["listops"], tmp_path / "no_ckpt", checkpoints=False)
  with pytest.raises(FileNotFoundError, match=r"no_ckpt/checkpoints holds no committed checkpoint\.$"):
    load_model(no_ckpt)
  os.makedirs(no_ckpt / "checkpoints" / "3.orbax-checkpoint-tmp-1")
  with pytest.raises(FileNotFoundError, match="holds no committed checkpoint .one is still being written"):
    load_model(no_ckpt)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 in .*checkpoints; available steps: 3, 6\."):
    load_model(runs["listops"], step=4)
  with pytest.raises(TypeError, match="step must be an int, got '6'"):
    load_model(runs["listops"], step="6")


# A failed TensorStore read can leave a callback for Orbax's closed asyncio loop (reported at garbage collection).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncated arrays", "garbled metadata"])
def test_corrupt_checkpoint_is_named_and_left_in_place(runs, tmp_path, damage):
  workdir = _copy(runs["listops"], tmp_path / "run")
  step_dir = workdir / "checkpoints" / "6"
  if damage == "truncated arrays":
    for p in (step_dir / "state").rglob("*"):
      if p.is_file() and p.parent.name == "d":
        with open(p, "r+b") as f:
          f.truncate(p.stat().st_size // 2)
  else:
    (step_dir / "state" / "_METADATA").write_bytes(b"\x00garbage{")
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match=f"checkpoint {step_dir} is unreadable") as info:
    load_model(workdir)
  assert isinstance(info.value, ValueError) and "Traceback" not in str(info.value)
  assert checkpoint_steps(workdir) == [3, 6]  # nothing moved: loading never writes to a run
  assert set(load_model(workdir, step=3)[1]) == {"params"}


def test_checkpoint_of_another_model_is_a_mismatch(runs, tmp_path):
  edited = _copy(runs["mlm"], tmp_path / "edited")
  config = json.loads((edited / "config.json").read_text())
  config["model"]["dim_ff"] = 48  # was 64
  (edited / "config.json").write_text(json.dumps(config))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"checkpoints/6 does not fit the model of .*config.json \(model.name='linformer_lm'\): "
                           r"params\.encoder\.layer_0\.ff\.wi\.bias: checkpoint shape \(64,\), model shape \(48,\) "
                           r"\(all differences: wrong shapes \(6\): "):
    load_model(edited)
  config["model"]["dim_ff"] = 64  # every shape agrees again, but a field differs from the checkpoint's config
  config["model"]["dropout"] = 0.0
  (edited / "config.json").write_text(json.dumps(config))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"checkpoints/6 was saved with another model config "
                     r"than .*edited/config.json: model.dropout: checkpoint 0.1, config.json 0.0\. "):
    load_model(edited)
  swapped = _copy(runs["mlm"], tmp_path / "swapped", checkpoints=False)
  shutil.copytree(runs["listops"] / "checkpoints", swapped / "checkpoints")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"does not fit the model .*: (params|constants)\.\S+: "):
    load_model(swapped)


def test_predict_library_matches_a_direct_forward_pass(runs, tmp_path):
  module, variables, _ = load_model(runs["mlm"])
  info = read_dataset_info(runs["mlm"])
  text = "def f(x):\n    re_urn x"
  filled = pred.fill_masked(module, variables, info, text)
  data = list(text.encode())
  inputs = np.full((1, module.max_len), 256, np.int32)
  inputs[0, :len(data)] = data
  inputs[0, text.index("_")] = 257
  logits = np.asarray(module.apply(variables, inputs, inputs != 256))
  expected = bytearray(text.encode())
  expected[text.index("_")] = int(logits[0, text.index("_"), :256].argmax())
  assert filled == expected.decode("utf-8", errors="replace")
  with pytest.raises(ValueError, match="has no '_'"):
    pred.fill_masked(module, variables, info, "no mask")
  with pytest.raises(ValueError, match="at most max_len=64"):
    pred.fill_masked(module, variables, info, "_" * 65)

  module, variables, _ = load_model(runs["listops"])
  info = read_dataset_info(runs["listops"])
  probs = pred.classify_listops(module, variables, info, "( ( [MAX 2 ) 9 [MIN 4 7 ] 0 ] )")
  ids = np.zeros((1, module.max_len), np.int32)
  ids[0, :9] = [12, 3, 10, 11, 5, 8, 15, 1, 15]  # [MAX 2 9 [MIN 4 7 X 0 X in the fixed vocabulary
  logits = np.asarray(module.apply(variables, ids, ids != 0), np.float64)[0]
  np.testing.assert_allclose(probs, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match=r"not ListOps tokens: '\[MAXX'"):
    pred.classify_listops(module, variables, info, "[MAXX 1 2 ]")
  with pytest.raises(ValueError, match="takes text with masked bytes"):
    pred.classify_listops(module, variables, read_dataset_info(runs["mlm"]), "[MAX 1 2 ]")

  # an image read from a file is prepared as the dataset prepares its own: digits eval image 0 (8×8, 0..16)
  from sklearn.datasets import load_digits
  config = load_model(runs["image"])[2]
  info = read_dataset_info(runs["image"])
  np.save(tmp_path / "digit.npy", load_digits().images[-297] / 16.0)
  batch = next(make_dataset(config.data, str(runs["image"])).eval_batches(1))
  np.testing.assert_allclose(pred.preprocess_image(pred.read_image(tmp_path / "digit.npy"), info), batch["image"],
                             rtol=1e-5, atol=1e-5)


def test_predict_cli(runs, tmp_path, capsys):
  proc = subprocess.run([sys.executable, "-m", "experiments.predict", "--workdir", str(runs["mlm"]), "--text",
                         "import o_"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.rstrip("\n")
  assert out.startswith("import o") and len(out.encode("utf-8", errors="surrogateescape")) >= 9
  predict_cli.main(["--workdir", str(runs["listops"]), "--text", "[MAX 2 9 [MIN 4 7 ] 0 ]", "--top", "10"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 10 and all(line.startswith("class ") for line in lines)
  probs = [float(line.split(": ")[1]) for line in lines]
  assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1.0) < 1e-3
  import matplotlib.image as mpimg
  mpimg.imsave(tmp_path / "digit.png", np.tile(np.linspace(0, 1, 24), (20, 1)), cmap="gray")
  predict_cli.main(["--workdir", str(runs["image"]), "--image", str(tmp_path / "digit.png"), "--invert"])
  assert len(capsys.readouterr().out.splitlines()) == 5
  for args, message in (
      (["--workdir", str(runs["image"]), "--text", "[MAX 1 2 ]"], "takes an image file (--image), not --text."),
      (["--workdir", str(runs["listops"]), "--image", "x.png"], "takes a ListOps expression (--text), not --image."),
      (["--workdir", str(tmp_path / "none"), "--text", "a_"], "does not exist."),
      (["--workdir", str(runs["listops"]), "--step", "5", "--text", "[MAX 1 2 ]"], "available steps: 3, 6.")):
    with pytest.raises(SystemExit) as exit_info:
      predict_cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.strip().endswith(message), err
    assert len(err.strip().splitlines()) == 1
