"""bench/skippipe_planner.py prints decjax's plan beside the reference planner's own plan."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_bench_compares_with_the_reference_plan():
    command = [sys.executable, "bench/skippipe_planner.py", "--evaluations=20", "--budget=60",
               "--reference_budget=60", "--rotation=0", "--gcma_budget=0", "--exact=false"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    reference = re.search(r"reference planner, its CA paths\s+([\d.]+)", out)
    ours = [float(x) for x in re.findall(r"planned, aware, seed \d\s+([\d.]+)\s+[-+]", out)]
    assert reference and len(ours) == 4  # one on the stage-major allocation, 3 on the reference's
    assert max(ours[1:]) <= float(reference.group(1)) + 1e-6
    assert "65.68 s in its own simulator" in out
