"""The remat benchmark's target check, on hand-made rows (the benchmark itself is too slow for CI)."""
from experiments.bench_remat import check_targets

MIB = 2 ** 20


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
