"""The remat benchmark: its target check on hand-made rows, and its hidden --tiny sweep, which must time the
trainer's own step (``linformer_jax.steps.make_train_step``: "mlm" for the masked LM, "image" for XCiT)."""
import json

from experiments import bench_remat
from experiments.bench_remat import check_targets
from linformer_jax.remat import REMAT_LEVELS

MIB = 2 ** 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(c1_fraction, c2_fraction, c1_growth_mib):
  rows = []
  for depth in (4, 12, 24):
    for heads in (4, 16):
      c0 = 100 * depth * MIB
      c1 = 50 * MIB + c1_growth_mib * depth * MIB
      if depth == 12:
        c1 = c1_fraction * c0
      for level, temp in (("C0", c0), ("C1", c1), ("C2", c2_fraction * c1)):
        rows.append(dict(model="linformer_x", sharing="headwise", depth=depth, heads=heads, level=level,
                         policy="nothing_saveable", temp_bytes=temp, step_time_s=1.0,
                         saved_input_bytes_per_layer=2 * MIB))
  return rows


def test_targets_met():
  lines = check_targets(_rows(0.15, 0.6, 2.0), quick=False)
  assert sum("❌" in line for line in lines[1:]) == 0
  assert sum("✅" in line for line in lines[1:]) == 2 + 3
  growth = [line for line in lines if "grows" in line]
  assert "grows 2.00 MiB/layer" in growth[0] and "inputs are 2.00 MiB/layer" in growth[0]


def test_targets_missed():
  lines = check_targets(_rows(0.25, 0.9, 2.0), quick=False)
  assert sum("❌" in line for line in lines[1:]) == 2 + 3
  assert any("C1 temp = 25.0% of C0" in line for line in lines)


def test_tiny_sweep_times_the_trainers_step(tmp_path, monkeypatch):
  from linformer_jax import steps
  kinds, real = [], steps.make_train_step

  def spy(model, tx, kind, *args, **kwargs):
    kinds.append(kind)
    return real(model, tx, kind, *args, **kwargs)
  monkeypatch.setattr(steps, "make_train_step", spy)
  bench_remat.main(["--out", str(tmp_path), "--tiny"])
  rows = json.loads((tmp_path / "remat.json").read_text())
  assert (tmp_path / "remat.md").read_text().startswith("# ") and "Targets" in (tmp_path / "remat.md").read_text()
  assert (tmp_path / "remat.png").read_bytes()[:8] == PNG_MAGIC
  lm = [r for r in rows if r["model"].startswith("linformer_lm")]
  xcit = [r for r in rows if r["model"].startswith("xcit")]
  assert len(lm) + len(xcit) == len(rows) and [r["level"] for r in xcit] == list(REMAT_LEVELS)
  assert kinds == ["mlm"] * len(lm) + ["image"] * len(xcit)  # one trainer's step compiled per row, nothing else
  assert all(r["step"] == "linformer_jax.steps.make_train_step (mlm)" for r in lm)
  assert all(r["step"] == "linformer_jax.steps.make_train_step (image)" for r in xcit)
  for r in rows:
    assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["step_time_s"] > 0 and r["compile_s"] > 0
    if r["policy"] == "nothing_saveable":
      assert r["temp_vs_C0"] > 0 and r["time_vs_C0"] > 0
  assert {r["sharing"] for r in lm} == {"headwise", "none"}
