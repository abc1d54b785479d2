"""experiments/payments/run.py: the quick grid runs end to end and writes its table and plots."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_payments_quick_grid_writes_table_and_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/payments/run.py", "--grid=quick", f"--out={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "quick.md").read_text()
    assert "| 4 (1) | 3 | 61 | 61 | 60 |" in table  # SyncPCN, n = 4, l = 3: measured = formula
    assert "| 7 (2) | 2 | 65 | 65 | 64 |" in table
    assert "(≠" not in table  # no measured count differs from its module's formula
    assert table.count("exceeds it in 0") == 2  # random delays never add messages
    assert "**no**" not in table  # every run committed without a checker violation
    assert "| synthetic (4 stages, 25% skips, 200 steps) | PSyncPCN | 5 |" in table
    for plot in ("quick_messages_vs_hops.png", "quick_latency_vs_hops.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    record = json.loads((tmp_path / "quick_measurements.json").read_text())
    assert len(record["cells"]) == 2 * 3 * 2
    assert all(not c["violations"] for c in record["cells"])
    for row in record["settlements"]:
        assert row["violations"] == []
        paid = {k: v for k, v in row["received"].items() if k not in row["failed"]}
        assert all(paid[k] == row["amounts"][k] for k in paid)
    assert "plots:" in result.stdout
