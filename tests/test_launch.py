"""jobs/launch.py: the accelerate command for each way Kubernetes describes a run, and real CPU launches."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from jobs.errors import BadInput
from jobs.launch import Topology, accelerate_launch, inside_launcher, topology

TARGET = ["-m", "jobs.cli", "lora", "--max_train_steps", "10"]


def launch_args(env: dict[str, str], gpus: int = 8) -> list[str]:
    args, _ = accelerate_launch(topology(env, gpus), TARGET)
    return args


def test_one_gpu_needs_no_launcher() -> None:
    assert topology({}, 1).world_size == 1
    assert topology({}, 0).world_size == 1
    assert topology({"JOB_COMPLETION_INDEX": "3"}, 1) == Topology(cpu=False)


def test_several_gpus_in_one_pod() -> None:
    assert launch_args({}, gpus=4) == [
        "--multi_gpu", "--num_machines", "1", "--num_processes", "4",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0",
        *TARGET,
    ]  # fmt: skip


def test_indexed_job_with_nodes_and_gpus() -> None:
    env = {"NNODES": "3", "JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "train-0.train", "MASTER_PORT": "29400"}
    assert topology(env, 8) == Topology(3, 8, 2, "train-0.train", 29400, False)
    assert launch_args(env) == [
        "--multi_gpu", "--num_machines", "3", "--num_processes", "24",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--machine_rank", "2", "--main_process_ip", "train-0.train", "--same_network",
        "--main_process_port", "29400",
        *TARGET,
    ]  # fmt: skip


def test_nproc_per_node_overrides_the_gpu_count() -> None:
    env = {"NNODES": "2", "JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "a", "NPROC_PER_NODE": "2"}
    assert topology(env, 8) == Topology(2, 2, 0, "a", 29500, False)


def test_kubeflow_trainer_v2() -> None:
    env = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29400",
        "JOB_COMPLETION_INDEX": "1",
    }
    assert topology(env, 8) == Topology(2, 4, 1, "job-node-0-0.job", 29400, False)
    assert topology({**env, "PET_NPROC_PER_NODE": "auto"}, 8).nproc_per_node == 8


def test_pytorchjob_from_operator_1_8() -> None:
    """WORLD_SIZE is nodes x nprocPerNode here; the PET_ variables the operator adds say how it splits."""
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "8",
        "RANK": "1",
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
    }
    assert topology(env, 4) == Topology(2, 4, 1, "job-master-0", 23456, False)


def test_older_pytorchjob_counts_pods() -> None:
    """Before the PET_ variables, WORLD_SIZE was the pod count and RANK the pod's (node) rank."""
    env = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    assert topology(env, 2) == Topology(3, 2, 2, "job-master-0", 23456, False)
    assert "--num_processes" in (args := launch_args(env, gpus=2)) and args[args.index("--num_processes") + 1] == "6"


def test_cpu_pod_asks_accelerate_for_cpu_processes() -> None:
    args, env = accelerate_launch(topology({"NPROC_PER_NODE": "2"}, 0), TARGET)
    assert env["ACCELERATE_USE_CPU"] == "true"
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 600
    assert args[args.index("--num_processes") + 1] == "2"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2", "JOB_COMPLETION_INDEX": "0"}, "needs MASTER_ADDR"),
        ({"NNODES": "2", "JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "a"}, "must be below"),
        ({"PET_NNODES": "1:4", "PET_MASTER_ADDR": "a"}, "elastic"),
        ({"NPROC_PER_NODE": "0"}, "at least 1"),
        ({"NNODES": "two"}, "not a whole number"),
    ],
)
def test_bad_shapes_are_bad_input(env: dict[str, str], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        topology(env, 1)


def test_processes_started_by_a_launcher_do_not_launch_again() -> None:
    assert inside_launcher({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert inside_launcher({"ACCELERATE_USE_CPU": "False"})  # `accelerate launch` with one process
    assert not inside_launcher({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "a"})  # a PyTorchJob pod


# End to end: real `accelerate launch` runs of CPU processes, through jobs.launch.relaunch.

PROBE = str(REPO / "tests" / "launch_probe.py")


def start(command: list[str | Path], **env: object) -> subprocess.Popen:
    """`command` in a fresh process, with no launcher variable from this one, on CPU."""
    launcher = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE"}
    clean = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("PET_", "ACCELERATE_"))}
    return subprocess.Popen(
        [str(part) for part in command],
        env={**clean, "CUDA_VISIBLE_DEVICES": "", **{k: str(v) for k, v in env.items()}},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def probe(out: Path, *probe_args: str, **env: object) -> subprocess.Popen:
    """`relaunch` of tests/launch_probe.py, as the training jobs call it."""
    code = "import sys; from jobs.launch import relaunch; sys.exit(relaunch(sys.argv[1:]))"
    return start([sys.executable, "-c", code, PROBE, out, *probe_args], **env)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output = process.communicate(timeout=120)[0]
    return process.returncode, output


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def test_two_cpu_processes_in_one_pod(tmp_path: Path) -> None:
    code, output = finish(probe(tmp_path, NPROC_PER_NODE=2))
    assert code == 0, output[-3000:]
    assert reports(tmp_path) == [
        {"rank": r, "world_size": 2, "distributed_type": "MULTI_CPU", "all_reduce": 2.0} for r in (0, 1)
    ]


def test_two_nodes_of_an_indexed_job(tmp_path: Path) -> None:
    """Two launchers on this machine stand in for two pods; they meet at MASTER_ADDR:MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = {"NNODES": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    nodes = [probe(tmp_path, JOB_COMPLETION_INDEX=i, **rendezvous) for i in (0, 1)]
    results = [finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], results
    assert [(r["rank"], r["world_size"]) for r in reports(tmp_path)] == [(0, 2), (1, 2)]


def test_bad_input_in_a_worker_keeps_exit_code_2(tmp_path: Path) -> None:
    code, output = finish(probe(tmp_path, "2", NPROC_PER_NODE=2))
    assert code == 2, output[-3000:]
    # The other rank exits 0 or, when torchrun stops it first, -15 (SIGTERM): either way 2 is listed.
    listed = re.search(r"failed with exit codes \[([^\]]*)\]", output)
    assert listed and "2" in listed.group(1).split(", "), output[-3000:]


def test_sigterm_reaches_every_process_and_is_waited_for(tmp_path: Path) -> None:
    """Kubernetes signals only the launcher (PID 1); each process must get time to save a checkpoint."""
    launcher = probe(tmp_path, "sigterm", NPROC_PER_NODE=2)
    deadline = time.monotonic() + 60
    while len(reports(tmp_path)) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    code, output = finish(launcher)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.stopped")) == ["rank-0.stopped", "rank-1.stopped"], output[-3000:]


def test_lora_job_runs_two_cpu_processes_when_the_pod_asks(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    """`pai-diffusion lora` configured by env vars, as in a pod, with NPROC_PER_NODE=2: one run, two ranks."""
    output = tmp_path / "lora"
    settings = {"RESOLUTION": 32, "TRAIN_BATCH_SIZE": 1, "MAX_TRAIN_STEPS": 2, "CHECKPOINTING_STEPS": 2}
    settings |= {"LR_WARMUP_STEPS": 0, "REPORT_TO": "none", "NPROC_PER_NODE": 2}
    job = [Path(sys.executable).parent / "pai-diffusion", "lora"]
    code, log = finish(start(job, MODEL_NAME=tiny_model, TRAIN_DIR=dataset, OUTPUT_DIR=output, **settings))
    assert code == 0, log[-3000:]
    assert '"message": "launching 2 processes"' in log and '"processes": 2' in log
    assert log.count('"message": "saved"') == 1
    assert {p.name for p in (output / "checkpoint-2").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert (output / "pytorch_lora_weights.safetensors").is_file()
