"""benchmarks/ab.py, the A/B of two builds: it alternates the order of the builds from round to round, reads the
field from each run's JSON and reports the medians and their ratio; a failing run stops it with the run's error."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stand-in benchmark: appends its tree's name to a log and writes its tree's number as the result.
FAKE = """
import json, os, sys
from pathlib import Path
here = Path.cwd()
with open(sys.argv[1], "a") as log:
    log.write(here.name + "\\n")
if (here / "fail").exists():
    sys.exit("this build is broken")
value = float((here / "value").read_text())
Path(os.environ["OUT"], "fake.json").write_text(json.dumps({"runs": [{"rate": value}]}))
"""


def _tree(tmp_path: Path, name: str, value: float) -> Path:
    tree = tmp_path / name
    (tree / "dsv3").mkdir(parents=True)
    (tree / "fakebench.py").write_text(FAKE)
    (tree / "value").write_text(str(value))
    return tree


def _ab(tmp_path: Path, a: Path, b: Path, rounds: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks.ab", "--trees", str(a), str(b), "--rounds", str(rounds),
                           "--field", "runs.0.rate", "--", "fakebench", str(tmp_path / "log")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_alternates_the_order_and_reports_the_ratio(tmp_path):
    a, b = _tree(tmp_path, "old", 400.0), _tree(tmp_path, "new", 440.0)
    done = _ab(tmp_path, a, b, rounds=3)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "log").read_text().split() == ["old", "new", "new", "old", "old", "new"]
    results = json.loads((tmp_path / "out" / "ab_fakebench.json").read_text())
    assert results["order"] == "ABBAAB" and results["values"] == [[400.0] * 3, [440.0] * 3]
    assert abs(results["ratio_b_over_a"] - 1.1) < 1e-12


def test_a_failing_build_stops_with_its_error(tmp_path):
    a, b = _tree(tmp_path, "old", 1.0), _tree(tmp_path, "new", 1.0)
    (b / "fail").touch()
    done = _ab(tmp_path, a, b, rounds=1)
    assert done.returncode != 0 and "this build is broken" in done.stderr and str(b) in done.stderr
