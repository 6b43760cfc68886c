"""What the benchmarks share: each contender is its own process, timed whole, as a user would time it.

A machine's speed drifts between runs (on a shared 2-core VM by 10-15%), so `--rounds N` runs every
contender N times, in reverse order every other round: a contender and the baseline then run close
in time, and a slow stretch falls on all of them alike. Ratios are taken within a round, then averaged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine(device: str) -> str:
    """The line a figure needs to be read against: which GPU, or which CPU and whether it has bf16."""
    import torch

    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return f"CPU: {names[0] if names else 'unknown'}, {os.cpu_count()} cores, bf16: {bf16}, torch {torch.__version__}"


@dataclass
class Contender:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def timed(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a command; return its wall time, when it was launched, and the JSON object it prints last."""
    launched_at, started = time.time(), time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"benchmark process failed: {' '.join(map(str, args[:4]))} ...\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "launched_at": launched_at, **json.loads(done.stdout.strip().splitlines()[-1])}


def run_rounds(contenders: dict[str, Contender], rounds: int, work: Path, env: dict[str, str]) -> dict[str, list[dict]]:
    """Every contender's runs, round by round; each run writes to its own fresh OUTPUT_DIR."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in order:
            output = work / f"round-{round_index}" / f"contender-{list(contenders).index(name)}"
            output.mkdir(parents=True)
            run_env = {**env, **contenders[name].env, "OUTPUT_DIR": str(output)}
            runs[name].append(timed(contenders[name].command, run_env))
            # As it goes, so that a run cut short by a time limit still says what it measured.
            print(f"  {name}: {runs[name][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return runs


def round_ratios(runs: dict[str, list[dict]], baseline: str, rate: Callable[[dict], float]) -> dict[str, list[float]]:
    """Each contender's rate over the baseline's, round by round."""
    return {
        name: [rate(run) / rate(base) for run, base in zip(own, runs[baseline], strict=True)]
        for name, own in runs.items()
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def print_spread(title: str, ratios: dict[str, list[float]]) -> None:
    """With more than one round: each contender's ratio in every round, so the spread is in view."""
    if len(next(iter(ratios.values()))) < 2:
        return
    print(f"\n{title}, round by round")
    for name, values in ratios.items():
        print(f"{name:<55} " + " ".join(f"{value:.2f}" for value in values))
