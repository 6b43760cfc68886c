"""The benchmarks run end to end on the tiny model and print a ratio for every contender (no timing asserted)."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import run_process

RATIO = re.compile(r"\s(\d+\.\d\d)x\s")
SPREAD = re.compile(r"\s(\d+\.\d\d) (\d+\.\d\d)$")


@pytest.mark.parametrize(
    ("script", "args", "rows"),
    [
        # Two rounds: below the table, every row also lists its ratio in each round (SPREAD).
        ("bench/generate.py", "--size tiny --prompts 2 --rounds 2".split(), 4),
        # Without the COMPILE=true rows, which would add minutes: tests/test_compile.py covers compiling.
        ("bench/train.py", "--size tiny --resolution 32 --steps 3 --batch 2 --images 4 --no-compile".split(), 8),
        ("bench/vae_decode.py", "--size tiny --batch 2 --resolution 32 --repeats 1".split(), 2),
    ],
)
def test_benchmark_prints_a_ratio_for_every_contender(script, args, rows):
    result = run_process([sys.executable, script, *args], {"OMP_WAIT_POLICY": "PASSIVE"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if RATIO.search(line)]
    assert len(table) == rows, result.stdout
    assert RATIO.search(table[0])[1] == "1.00"  # the baseline's own row
    assert all(float(RATIO.search(line)[1]) > 0 for line in table)
    if "--rounds" in args:
        spread = [SPREAD.search(line) for line in result.stdout.splitlines() if SPREAD.search(line)]
        assert len(spread) == rows, result.stdout
        assert spread[0].groups() == ("1.00", "1.00")
