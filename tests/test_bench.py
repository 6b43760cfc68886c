"""The benchmarks run end to end on the tiny model and print a ratio for every contender (no timing asserted)."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import REPO, run_process

sys.path.insert(0, str(REPO / "bench"))

from harness import Contender, print_spread, round_ratios, run_rounds  # noqa: E402

RATIO = re.compile(r"\s(\d+\.\d\d)x\s")
SPREAD = re.compile(r"\s(\d+\.\d\d) (\d+\.\d\d)$")


@pytest.mark.parametrize(
    ("script", "args", "rows"),
    [
        ("bench/generate.py", "--size tiny --prompts 2".split(), 4),
        # Without the COMPILE=true rows, which would add minutes: tests/test_compile.py covers compiling.
        ("bench/train.py", "--size tiny --resolution 32 --steps 3 --batch 2 --images 4 --no-compile".split(), 8),
        ("bench/vae_decode.py", "--size tiny --batch 2 --resolution 32 --repeats 1".split(), 2),
        ("bench/step_parts.py", "--size tiny --batch 2 --resolution 32 --repeats 1".split(), 2),
        # One compile, the smallest (seconds here).
        (
            "bench/compiled_pass.py",
            "--size tiny --batch 2 --resolution 32 --kinds inference --compiled blocks".split(),
            2,
        ),
        # Its S3 source (SeaweedFS) alone; HEAD stands in for the baseline commit, which a clone may lack.
        ("bench/bookkeeping.py", "--items 200 --images 20 --rounds 1 --baseline HEAD".split(), 2),
        ("bench/data.py", "--sizes 12 --steps 3 --batch 2 --resolution 32 --baseline HEAD --sources s3".split(), 3),
        ("bench/buckets.py", "--images 12 --records 5000 --rounds 1".split(), 7),
    ],
)
def test_benchmark_prints_a_ratio_for_every_contender(script, args, rows):
    result = run_process([sys.executable, script, *args], {"OMP_WAIT_POLICY": "PASSIVE"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if RATIO.search(line)]
    assert len(table) == rows, result.stdout
    assert RATIO.search(table[0])[1] == "1.00"  # the baseline's own row
    assert all(float(RATIO.search(line)[1]) > 0 for line in table)


def test_rounds_alternate_the_order_and_print_every_rounds_ratio(tmp_path, capsys):
    """`--rounds N`: every other round runs the contenders in reverse, each run in its own OUTPUT_DIR,
    and below the table every row lists its ratio in each round."""
    report = "import json, os, time; print(json.dumps({'output': os.environ['OUTPUT_DIR'], 'at': time.time()}))"
    contenders = {name: Contender([sys.executable, "-c", report]) for name in ("baseline", "contender")}
    runs = run_rounds(contenders, rounds=2, work=tmp_path, env={})
    assert runs["baseline"][0]["at"] < runs["contender"][0]["at"]
    assert runs["contender"][1]["at"] < runs["baseline"][1]["at"]
    assert len({run["output"] for own in runs.values() for run in own}) == 4
    print_spread("ratio", round_ratios(runs, "baseline", lambda run: 1 / run["seconds"]))
    spread = [SPREAD.search(line) for line in capsys.readouterr().out.splitlines() if SPREAD.search(line)]
    assert len(spread) == 2
    assert spread[0].groups() == ("1.00", "1.00")
