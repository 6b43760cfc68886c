"""A stand-in training process for tests/test_launch.py: joins the process group and reports its place.

Usage: launch_probe.py OUT_DIR [EXIT_CODE_OF_LAST_RANK]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator


def main(out_dir: Path, last_rank_exit: int) -> int:
    state = Accelerator().state
    total = torch.tensor([1.0])
    dist.all_reduce(total)  # proves the processes really met
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": state.distributed_type.value,
        "all_reduce": total.item(),
    }
    (out_dir / f"rank-{state.process_index}.json").write_text(json.dumps(report))
    last = state.process_index == state.num_processes - 1
    dist.destroy_process_group()  # gloo aborts at exit when a group is left open
    return last_rank_exit if last else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0))
