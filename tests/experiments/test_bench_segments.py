"""bench_segments at tiny sizes: both variants per depth share one parameter tree and the trainer's step; the
ratios, the segment lengths and the fitted slope follow from the rows."""
import math

import numpy as np
import pytest

from test_benchmarks import run_bench


def test_segments(tmp_path):
  rows = run_bench("segments", tmp_path)
  assert [(r["depth"], r["variant"], r["segment"]) for r in rows] == [(4, "C0", 4), (4, "sqrt", 2), (9, "C0", 9),
                                                                     (9, "sqrt", 3)]
  for c0, seg in zip(rows[::2], rows[1::2]):
    assert c0["temp_bytes"] > 0 and seg["temp_bytes"] > 0 and c0["step_time_s"] > 0
    assert seg["time_vs_c0"] == pytest.approx(seg["step_time_s"] / c0["step_time_s"], rel=0.01)
    assert seg["temp_vs_c0"] == pytest.approx(seg["temp_bytes"] / c0["temp_bytes"], rel=0.01)
    assert 0 < c0["grad_temp_bytes"] and 0 < seg["grad_temp_bytes"]
  sqrt_rows = [r for r in rows if r["variant"] == "sqrt"]
  want = (math.log(sqrt_rows[1]["temp_bytes"]) - math.log(sqrt_rows[0]["temp_bytes"])) / (math.log(9) - math.log(4))
  md = (tmp_path / "segments.md").read_text()
  assert f"{want:.2f}" in md and "log-log slope" in md
  assert np.isfinite(want)
