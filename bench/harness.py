"""What the benchmarks share: each contender is its own process, timed whole, as a user would time it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a command; return its wall time and the JSON object it prints last (its peak memory)."""
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"benchmark process failed: {' '.join(map(str, args[:4]))} ...\n{done.stderr[-3000:]}")
    return {"seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}
