"""experiments.ablate: every sweep's --quick variant runs (its arms on the config's runlocal variant: a tiny model,
runlocal's 6 steps) and writes its JSON / markdown / PNG; a rerun skips finished runs; every arm builds a valid
config; the sweeps are found beside their configs; bad arguments are refused."""
import dataclasses
import importlib
import json
import os

import pytest

from configs.sweep import ALIASES
from experiments import ablate

QUICK_STEPS = 6  # configs.common.runlocal's total_steps: the run length of every --quick run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"sweep", "arm", "seed", "overrides", "status", "final", "steps", "wall_time_s", "eval_curve",
            "param_count", "opt_state_bytes", "run_key", "config"}


def check_outputs(out, name, result, arms):
  sweep = ablate.SWEEPS[name]
  for ext in ("json", "md", "png"):
    assert result["paths"][ext] == out / f"{name}.{ext}" and os.path.getsize(out / f"{name}.{ext}") > 100
  with open(out / f"{name}.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  doc = json.loads((out / f"{name}.json").read_text())
  assert doc["sweep"] == name and doc["quick"] is True and doc["metric"] == sweep.metric
  assert [r["arm"] for r in doc["rows"]] == arms and [s["arm"] for s in doc["summary"]] == arms
  for row in doc["rows"]:
    assert ROW_KEYS <= set(row)
    assert row["status"] == "ok" and row["steps"] == QUICK_STEPS and row["wall_time_s"] > 0
    assert row["config"]["total_steps"] == QUICK_STEPS and row["config"]["batch_size"] <= 8
    assert sweep.metric in row["final"] and row["eval_curve"][-1][0] == QUICK_STEPS
    assert row["opt_state_bytes"] > 0 and row["param_count"] > 0
    assert os.path.exists(out / name / f"{row['arm']}_seed0" / ablate.RUN_MARKER)
  md = (out / f"{name}.md").read_text()
  assert sweep.claim in md and all(f"| {a} |" in md for a in arms)
  return doc


# Real training (runlocal: 6 steps of a tiny model) for the four kinds of sweep: MLM (with a rerun that skips),
# ListOps (both arms, with the test split of the final checkpoint), XCiT on digits and the optimizer arms.
@pytest.mark.parametrize("name,arms", [("linformer_k", "k32"), ("lra_listops", None), ("lra_listops_long", "linformer"),
                                       ("xcit_components", "self_attention"), ("adafactor", "unfactored")])
def test_quick_sweep_runs_and_writes_outputs(tmp_path, name, arms):
  result = ablate.main(["--sweep", name, "--out", str(tmp_path), "--quick"] + (["--arms", arms] if arms else []))
  arms = arms.split(",") if arms else [a for a, _ in ablate.SWEEPS[name].arms]
  doc = check_outputs(tmp_path, name, result, arms)
  if name.startswith("lra_listops"):  # test split of the final checkpoint, evaluated after training
    final = doc["rows"][0]["final"]
    assert final["test_checkpoint_step"] == QUICK_STEPS and final["test_examples"] == 16
    assert 0.0 <= final["test_accuracy"] <= 1.0 and "test_accuracy_mean" in doc["summary"][0]
    assert 0.0 <= final["test_baseline_outer_operator_accuracy"] <= 1.0
    assert "outermost-operator lookup table" in (tmp_path / f"{name}.md").read_text()
    assert doc["rows"][0]["config"]["model"]["pos_emb"] == ("learned" if name.endswith("long") else "sinusoidal")
  if name == "linformer_k":  # rerun: everything is skipped, outputs rewritten from the markers
    assert doc["rows"][0]["config"]["model"]["k"] == 32 and doc["rows"][0]["config"]["data"]["max_len"] == 256
    mtime = os.path.getmtime(tmp_path / name / "k32_seed0" / "metrics.jsonl")
    again = ablate.run_sweep(name, tmp_path, quick=True, arms=["k32"], log=lambda m: None)
    assert all(r["skipped"] for r in again["rows"])
    assert os.path.getmtime(tmp_path / name / "k32_seed0" / "metrics.jsonl") == mtime
    assert [r["final"] for r in again["rows"]] == [r["final"] for r in result["rows"]]


def test_signal_stopped_run_is_not_marked_finished(tmp_path, monkeypatch, capsys):
  """SIGTERM during a run: the trainer checkpoints and returns; the sweep must stop without a marker (not
  evaluate and record the half-trained run), and the same command then continues the run to the end."""
  argv = ["--sweep", "linformer_k", "--out", str(tmp_path), "--quick", "--arms", "k32"]
  monkeypatch.setenv("LINFORMER_JAX_FAULT", "TERM@1")
  with pytest.raises(SystemExit) as stopped:
    ablate.main(argv)
  assert stopped.value.code == 0 and "stopped by SIGTERM after step 1" in capsys.readouterr().err
  workdir = tmp_path / "linformer_k" / "k32_seed0"
  assert not (workdir / ablate.RUN_MARKER).exists() and not (tmp_path / "linformer_k.json").exists()
  assert (workdir / "checkpoints" / "1").is_dir()
  monkeypatch.delenv("LINFORMER_JAX_FAULT")
  result = ablate.main(argv)
  assert result["rows"][0]["steps"] == QUICK_STEPS and (workdir / ablate.RUN_MARKER).exists()


def fake_train_and_evaluate(config, workdir):
  """Stands in for the trainer (same files and return value); checks the model and optimizer build."""
  from linformer_jax.metrics import MetricWriter
  ablate._state_sizes(config, workdir)
  ppl = 20.0 + config.model.get("k", 0) / 100.0
  writer = MetricWriter(workdir, tensorboard=False)
  for step in range(1, config.total_steps + 1):
    writer.write(step, {"loss": 3.0 / step, "steps_per_s": 1.0, "eval_perplexity": ppl + 1.0 / step,
                        "eval_accuracy": 0.5})
  writer.close()
  return {"eval_loss": 3.0, "eval_accuracy": 0.5, "eval_perplexity": ppl + 1.0 / config.total_steps,
          "baseline_unigram_perplexity": 25.0, "step": config.total_steps}


# The other MLM sweeps differ from linformer_k only in model/data fields: their quick variants run through
# the sweep machinery with a stand-in trainer (real model and optimizer construction, no compilation).
@pytest.mark.parametrize("name", ["linformer_sharing", "linformer_projection", "linformer_nonuniform_k"])
def test_quick_sweep_other_mlm(tmp_path, monkeypatch, name):
  monkeypatch.setattr("linformer_jax.train.train_and_evaluate", fake_train_and_evaluate)
  result = ablate.run_sweep(name, tmp_path, quick=True, log=lambda m: None)
  check_outputs(tmp_path, name, result, [a for a, _ in ablate.SWEEPS[name].arms])
  for s in result["summary"]:
    assert s["eval_perplexity_std"] == 0.0 and s["eval_perplexity_mean"] > 20


def test_linformer_n_scores_every_n_on_the_same_bytes(tmp_path):
  """linformer_n (real runlocal runs of the arms n = 1024 and 2048): each final checkpoint is also scored on the
  n=2048 eval set (the longest arm's, n512 not run), cut into pieces of its own n. Independent checks: the scored
  byte count is the weight sum of that eval set read from the dataset directly; for n = 2048 (no cut) the score
  equals the trainer's own full evaluation; the ratio column divides the common scores."""
  import numpy as np
  from linformer_jax.data import make_dataset
  result = ablate.main(["--sweep", "linformer_n", "--out", str(tmp_path), "--quick", "--arms", "n1024,n2048",
                        "--set", "eval_max_batches=null"])
  short, long = result["rows"]
  assert (short["arm"], long["arm"]) == ("n1024", "n2048")
  sweep = ablate.SWEEPS["linformer_n"]
  config = sweep.run_config(dict(sweep.arms)["n2048"], 0, True)
  assert config.data.max_len == 2048 and config.total_steps == QUICK_STEPS
  dataset = make_dataset(config.data, str(tmp_path / "linformer_n" / "n2048_seed0"))
  weight = sum(float(np.asarray(b["weights"]).sum()) for b in dataset.eval_batches(8))
  for row in (short, long):
    final = row["final"]
    assert final["common_eval_len"] == 2048 and final["common_eval_checkpoint_step"] == QUICK_STEPS
    assert final["common_eval_bytes"] == weight > 0
    assert 0.0 <= final["common_eval_accuracy"] <= 1.0
    assert final["common_eval_perplexity"] == pytest.approx(np.exp(final["common_eval_loss"]), rel=1e-6)
  assert long["final"]["common_eval_loss"] == pytest.approx(long["final"]["eval_loss"], rel=1e-5)
  assert short["final"]["common_eval_loss"] != pytest.approx(long["final"]["common_eval_loss"], rel=1e-6)
  ref, other = ablate.summarize(dataclasses.replace(sweep, reference="n1024"), result["rows"])  # n512 not run
  assert other["vs_reference"] == pytest.approx(long["final"]["common_eval_perplexity"]
                                                / short["final"]["common_eval_perplexity"])
  assert "| common_eval_perplexity |" in (tmp_path / "linformer_n.md").read_text()
  # a run recorded without the common score (before the option existed) gets it added on the next invocation
  marker = tmp_path / "linformer_n" / "n1024_seed0" / ablate.RUN_MARKER
  row = json.loads(marker.read_text())
  row["final"] = {k: v for k, v in row["final"].items() if not k.startswith("common_eval")}
  marker.write_text(json.dumps(row))
  again = ablate.run_sweep("linformer_n", tmp_path, quick=True, arms=["n1024"], extra={"eval_max_batches": None},
                           log=lambda m: None)
  assert again["rows"][0]["skipped"] and again["rows"][0]["final"] == short["final"]
  assert json.loads(marker.read_text())["final"] == short["final"]
  with pytest.raises(ValueError, match="multiple of data.max_len=1024"):
    ablate.evaluate_common(sweep.run_config(dict(sweep.arms)["n1024"], 0, True),
                           tmp_path / "linformer_n" / "n1024_seed0", 1536)


def test_seeds_mean_and_std(tmp_path, monkeypatch):
  monkeypatch.setattr("linformer_jax.train.train_and_evaluate", fake_train_and_evaluate)
  result = ablate.main(["--sweep", "linformer_sharing", "--out", str(tmp_path), "--quick", "--seeds", "0,1",
                        "--arms", "layerwise"])
  assert [(r["arm"], r["seed"]) for r in result["rows"]] == [("layerwise", 0), ("layerwise", 1)]
  (summary,) = result["summary"]
  assert summary["seeds"] == [0, 1] and summary["eval_perplexity_std"] == 0.0
  md = (tmp_path / "linformer_sharing.md").read_text()
  assert "±" in md and "unigram perplexity 25.00" in md


def test_diverged_run_is_recorded(tmp_path, monkeypatch):
  def diverge(config, workdir):
    raise FloatingPointError("non-finite loss within steps 1..2")
  monkeypatch.setattr("linformer_jax.train.train_and_evaluate", diverge)
  result = ablate.run_sweep("adafactor", tmp_path, quick=True, arms=["unfactored"], log=lambda m: None)
  (row,) = result["rows"]
  assert row["status"] == "diverged" and "non-finite" in row["error"]
  assert result["summary"][0]["diverged"] == 1 and result["summary"][0]["eval_perplexity_mean"] is None
  assert "non-finite" in (tmp_path / "adafactor.md").read_text()


def _field(config, key):
  for part in ALIASES.get(key, key).split("."):
    config = config[part]
  return config


def test_every_arm_builds_a_valid_config(tmp_path):
  """Full and --quick configs of every arm: the arm's and the sweep's overrides are set, the optimizer and the model
  build (shapes only); --quick is the module's runlocal config (its steps: an arm's total_steps is not applied)."""
  from linformer_jax.optim import make_optimizer
  for name, sweep in ablate.SWEEPS.items():
    assert len({a for a, _ in sweep.arms}) == len(sweep.arms) and sweep.seeds
    module = importlib.import_module("configs." + sweep.config.partition(":")[0])
    runlocal = module.get_config("runlocal")
    assert runlocal.total_steps == QUICK_STEPS and runlocal.batch_size == 4
    for quick in (False, True):
      for arm, overrides in sweep.arms:
        config = sweep.run_config(overrides, 3, quick)
        assert config.seed == 3
        make_optimizer(config.optimizer, config.total_steps)  # validates the optimizer arms
        for key, value in {**sweep.base_for(quick), **overrides}.items():
          if quick and key == "total_steps":
            assert config.total_steps == QUICK_STEPS, (name, arm)
          else:
            assert _field(config, key) == value, (name, arm, key)
        if quick:  # everything else is runlocal's
          assert config.data.to_dict() == {**runlocal.data.to_dict(), **{
              k.partition(".")[2]: v for k, v in {**sweep.quick, **overrides}.items() if k.startswith("data.")}}
          ablate._state_sizes(config, tmp_path)  # the model builds (k within n, k_i > 0, patch divides the image)


def test_sweeps_live_beside_their_configs():
  """ablate.SWEEPS is what the config modules' get_sweeps() return (in module-name order), nothing else."""
  found = {}
  for module in ("clm_linformer", "digits_xcit", "listops", "mlm_linformer"):
    for sweep in importlib.import_module(f"configs.{module}").get_sweeps():
      assert sweep.config.partition(":")[0].startswith(module) and sweep.name not in found
      found[sweep.name] = sweep
  assert list(found) == list(ablate.SWEEPS) and found == ablate.SWEEPS
  assert {"linformer_k", "linformer_n", "linformer_sharing", "linformer_projection", "linformer_nonuniform_k",
          "lra_listops", "lra_listops_long", "xcit_components", "adafactor", "causal_lm"} == set(found)


def test_lra_listops_long_equals_the_documented_commands():
  """lra_listops_long's runs are the lra_listops runs recorded in docs/ablations.md (`--sweep lra_listops --set
  ...`): the resolved configs must be equal, field by field."""
  sets = {"data.num_train": 96000, "data.num_eval": 2000, "data.num_test": 2000, "warmup": 1000,
          "eval_every": 250, "model.pos_emb": "learned"}
  long, short = ablate.SWEEPS["lra_listops_long"], ablate.SWEEPS["lra_listops"]
  for (arm, overrides), steps in zip(long.arms, (20000, 8000)):
    ours = long.run_config(overrides, 1, False).to_dict()
    documented = short.run_config(dict(short.arms)[arm], 1, False, {**sets, "total_steps": steps}).to_dict()
    assert ours == documented and ours["model"]["pos_emb"] == "learned" and ours["total_steps"] == steps


def test_optimizer_state_bytes_of_the_adafactor_arms(tmp_path):
  sweep = ablate.SWEEPS["adafactor"]
  arms = dict(sweep.arms)
  size = {a: ablate._state_sizes(sweep.run_config(arms[a], 0, False), tmp_path)
          for a in ("adamw", "adafactor", "unfactored")}
  params = size["adamw"]["param_bytes"]
  assert size["adamw"]["opt_state_bytes"] > 2 * params  # m and v
  assert params < size["unfactored"]["opt_state_bytes"] < params + 1024  # v + small counters
  assert size["adafactor"]["opt_state_bytes"] < params / 3  # factored: rows + columns


def test_changed_config_in_a_finished_workdir_is_refused(tmp_path):
  sweep = ablate.SWEEPS["linformer_projection"]
  run = tmp_path / "linformer_projection" / "conv_seed0"
  run.mkdir(parents=True)
  (run / ablate.RUN_MARKER).write_text(json.dumps({"run_key": "something else"}))
  with pytest.raises(ValueError, match="another config"):
    ablate.run_one(sweep, "conv", dict(sweep.arms)["conv"], 0, tmp_path, True, log=lambda m: None)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown sweep"):
    ablate.run_sweep("nope", tmp_path)
  with pytest.raises(ValueError, match="unknown arm"):
    ablate.run_sweep("linformer_k", tmp_path, quick=True, arms=["k999"])
  with pytest.raises(ValueError, match="unknown config field"):
    ablate.run_sweep("linformer_k", tmp_path, quick=True, extra={"optimizer.nope": 1})
  with pytest.raises(SystemExit):
    ablate.main(["--out", str(tmp_path)])


def test_total_steps_extends_finished_runs(tmp_path, monkeypatch):
  calls = []

  def trainer(config, workdir):
    calls.append(config.total_steps)
    return fake_train_and_evaluate(config, workdir)
  monkeypatch.setattr("linformer_jax.train.train_and_evaluate", trainer)
  argv = ["--sweep", "linformer_projection", "--out", str(tmp_path), "--quick", "--arms", "conv"]
  ablate.main(argv)
  result = ablate.main(argv + ["--total_steps", "12"])
  assert calls == [QUICK_STEPS, 12] and result["rows"][0]["steps"] == 12 and not result["rows"][0].get("skipped")
  again = ablate.main(argv + ["--total_steps", "12"])
  assert calls == [QUICK_STEPS, 12] and again["rows"][0]["skipped"]
  with pytest.raises(ValueError, match="more than total_steps"):
    ablate.main(argv)
  # the cosine schedule (the XCiT sweep) depends on total_steps: no extension
  ablate.run_sweep("xcit_components", tmp_path, quick=True, arms=["xca"], log=lambda m: None)
  with pytest.raises(ValueError, match="cosine"):
    ablate.run_sweep("xcit_components", tmp_path, quick=True, arms=["xca"], extra={"total_steps": 12},
                     log=lambda m: None)
