"""benchmarks/gpu.py runs (its --tiny CPU mode): a smoke test of the GPU benchmark's code
path, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_tiny_mode_writes_its_tables(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(row["config"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {("unpruned", 1), ("visionzip-64", 1), ("dart-64", 1), ("usual-fastv-mask-64", 1),
                         ("unpruned", 2), ("visionzip-64", 2), ("dart-64", 2)}
    for (config, batch), row in rows.items():
        assert row["prefill_ms"] > 0
        if config not in ("unpruned", "usual-fastv-mask-64"):
            # the FLOPs-ideal speedup is the cost model's: 576 -> 64 visual tokens at least halves the prefill
            assert row["flops_ideal_speedup"] > 2 and row["decode_ms_per_token"] > 0
            assert row["predicted_prefill_speedup"] >= 1
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("\n| visionzip-64 | 64 |") == 2 and "usual-fastv-mask-64" in table
