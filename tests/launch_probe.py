"""A stand-in training process for tests/test_launch.py: joins the process group and reports its place.

Usage: launch_probe.py OUT_DIR [EXIT_CODE_OF_LAST_RANK | sigterm]
With `sigterm` every process then waits for SIGTERM and, like a job saving a checkpoint, takes a
moment before it writes rank-N.stopped and exits 0.
"""

import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator


def main(out_dir: Path, then: str) -> int:
    state = Accelerator().state
    total = torch.tensor([1.0])
    dist.all_reduce(total)  # proves the processes really met
    rank = state.process_index
    dist.destroy_process_group()  # gloo aborts at exit when a group is left open
    report = {
        "rank": rank,
        "world_size": state.num_processes,
        "distributed_type": state.distributed_type.value,
        "all_reduce": total.item(),
    }
    if then == "sigterm":

        def save_and_stop(*_: object) -> None:
            time.sleep(2)
            (out_dir / f"rank-{rank}.stopped").touch()
            sys.exit(0)

        signal.signal(signal.SIGTERM, save_and_stop)
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(report))
    while then == "sigterm":
        time.sleep(0.1)
    return int(then) if rank == state.num_processes - 1 else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "0"))
