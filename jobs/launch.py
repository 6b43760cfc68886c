"""Run a training job under `accelerate launch` when its pod has several GPUs or is one of several nodes.

A pod learns the shape of a distributed run from environment variables, in one of three dialects:

- plain Indexed Job (k8s/overlays/multinode): `NNODES`, `JOB_COMPLETION_INDEX` (node rank),
  `MASTER_ADDR`, `MASTER_PORT`, and `NPROC_PER_NODE` (default: the GPUs the pod sees);
- Kubeflow Trainer v2 (and PyTorchJob from training-operator 1.8 on): `PET_NNODES`,
  `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`;
- older PyTorchJob: `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE` and `RANK`, where both count
  pods, not processes: WORLD_SIZE is the number of nodes and RANK this pod's node rank. (From
  1.8 on the operator sets WORLD_SIZE to nodes x nprocPerNode and adds the PET_ variables, which
  win here, so WORLD_SIZE is only read when they are absent.)

The job then re-runs itself once per process under accelerate (torchrun underneath), unless it
already runs inside a launcher or one process is all the pod asks for.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jobs.errors import BAD_INPUT_EXIT_CODE, BadInput

log = logging.getLogger(__name__)

# Set by torchrun / accelerate in every process they start: such a process must not launch again.
LAUNCHED_MARKERS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")
DEFAULT_MASTER_PORT = 29500
# torchrun gives its workers 30 s after SIGTERM before SIGKILL, too short for a checkpoint of a
# full UNet; the pod's terminationGracePeriodSeconds is the real limit, so wait up to an hour.
SHUTDOWN_TIMEOUT_S = "3600"


@dataclass(frozen=True)
class Topology:
    """Where this pod sits in a run: how many nodes, processes per node, and how to meet rank 0."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    cpu: bool = False

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def inside_launcher(env: Mapping[str, str]) -> bool:
    """True in a process started by torchrun or accelerate (or a PyTorchJob pod already under torchrun)."""
    return any(name in env for name in LAUNCHED_MARKERS)


def _integer(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env[name]
    try:
        number = int(value)
    except ValueError:
        hint = " (elastic node ranges are not supported: give a fixed count)" if ":" in value else ""
        raise BadInput(f"{name}={value!r} is not a whole number{hint}") from None
    if number < minimum:
        raise BadInput(f"{name}={value!r} must be at least {minimum}")
    return number


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((name for name in names if env.get(name, "") != ""), None)


def topology(env: Mapping[str, str], gpus: int) -> Topology:
    """Read the run's shape from the pod's variables; `gpus` is what this pod sees (torch.cuda.device_count())."""
    nodes_var = _first(env, "PET_NNODES", "NNODES")
    if nodes_var is None and _first(env, "WORLD_SIZE") and _first(env, "RANK"):
        nodes_var = "WORLD_SIZE"  # older PyTorchJob: pods, not processes
    nnodes = _integer(env, nodes_var, 1) if nodes_var else 1

    nproc_var = _first(env, "PET_NPROC_PER_NODE", "NPROC_PER_NODE")
    if nproc_var and env[nproc_var] not in ("auto", "gpu"):  # torchrun's words for "one per GPU"
        nproc_per_node = _integer(env, nproc_var, 1)
    else:
        nproc_per_node = max(gpus, 1)

    if nnodes == 1:
        # JOB_COMPLETION_INDEX of a one-node Indexed Job is a shard, not a node rank.
        port = _first(env, "PET_MASTER_PORT", "MASTER_PORT")
        return Topology(1, nproc_per_node, 0, None, _integer(env, port, 1) if port else None, gpus == 0)

    rank_var = _first(env, "PET_NODE_RANK", "JOB_COMPLETION_INDEX", "RANK")
    node_rank = _integer(env, rank_var, 0) if rank_var else 0
    if node_rank >= nnodes:
        raise BadInput(f"{rank_var}={node_rank} must be below the node count {nodes_var}={nnodes}")
    addr_var = _first(env, "PET_MASTER_ADDR", "MASTER_ADDR")
    if addr_var is None:
        raise BadInput(f"{nodes_var}={nnodes} needs MASTER_ADDR (or PET_MASTER_ADDR): the address of node 0")
    port_var = _first(env, "PET_MASTER_PORT", "MASTER_PORT")
    port = _integer(env, port_var, 1) if port_var else DEFAULT_MASTER_PORT
    return Topology(nnodes, nproc_per_node, node_rank, env[addr_var], port, gpus == 0)


def accelerate_launch(shape: Topology, target: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` arguments and the extra environment that run `target` in every process."""
    # --multi_gpu selects accelerate's torchrun launcher; it serves CPU processes too (gloo), which
    # accelerate only uses when ACCELERATE_USE_CPU is set, since `--cpu` would start one process.
    args = ["--multi_gpu", "--num_machines", str(shape.nnodes), "--num_processes", str(shape.world_size)]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # defaults; the job's settings win
    if shape.nnodes > 1:
        args += ["--machine_rank", str(shape.node_rank), "--main_process_ip", str(shape.master_addr), "--same_network"]
    # Port 0: a free port, for a one-node run that was given none (other runs may share the machine).
    args += ["--main_process_port", str(shape.master_port or 0)]
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": SHUTDOWN_TIMEOUT_S}
    if shape.cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return [*args, *target], env


def run_accelerate(args: list[str], env: Mapping[str, str]) -> int:
    """Run accelerate's launcher in this process, keeping exit code 2 when a worker rejected its input.

    torch's elastic agent replaces this process's SIGTERM handler (jobs/sigterm.py) with its own: it
    forwards the signal to every worker, waits for them to save and exit, then raises SignalException."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name, value in env.items():
        os.environ.setdefault(name, value)
    try:
        launch_command(launch_command_parser().parse_args(args))
    except ChildFailedError as error:
        codes = sorted({failure.exitcode for failure in error.failures.values()})
        print(f"error: training processes failed with exit codes {codes}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE if BAD_INPUT_EXIT_CODE in codes else 1
    except SignalException as stop:  # SIGTERM (eviction, preemption): workers were told and waited for
        return 128 + int(stop.sigval)
    return 0


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def relaunch(target: Sequence[str], env: Mapping[str, str] | None = None) -> int | None:
    """Run `target` (e.g. `-m jobs.cli lora ...`) under accelerate if this pod needs several processes.

    Returns the launcher's exit code, or None when this process should run the job itself.
    """
    env = os.environ if env is None else env
    if inside_launcher(env):
        return None
    try:
        shape = topology(env, gpu_count())
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    if shape.world_size == 1:
        return None
    args, extra_env = accelerate_launch(shape, target)
    log.info("launching %d processes", shape.world_size, extra={"fields": {"accelerate_launch": args}})
    return run_accelerate(args, extra_env)
