"""The Dockerfile under hadolint and its contract with the manifests, and the docker command `make run-local` runs.

Building and running the image is `make test-image` (tests/image/check_image.py): too slow for `make test`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import __version__

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def make(*args: str, **env: str) -> str:
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_dockerfile_is_clean_under_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_keeps_the_container_contract():
    text = DOCKERFILE.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    base = r"^ARG BASE_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+@sha256:[0-9a-f]{64}$"
    assert re.search(base, text, re.M), "base pinned by tag and digest"
    assert "USER 1000:1000" in final_stage  # the manifests' runAsUser
    assert "HF_HOME=/cache/huggingface" in final_stage
    assert 'VOLUME ["/cache", "/outputs"]' in final_stage
    assert 'ENTRYPOINT ["tini", "--", "pai-diffusion"]' in final_stage  # a real init as PID 1
    assert "COPY --from=builder /opt/venv /opt/venv" in final_stage


def docker_command(dry_run: str) -> list[str]:
    """The `... run ...` line of `make -n run-local` output, as argv."""
    lines = dry_run.replace("\\\n", " ").splitlines()
    return shlex.split(next(line for line in lines if " run " in line))


@pytest.mark.parametrize("docker", ["docker", "podman"])
def test_run_local_command(docker):
    argv = docker_command(make("-n", "run-local", "JOB=generate", "PROMPT=一只猫", f"DOCKER={docker}"))
    words = " ".join(argv)
    assert argv[:3] == [docker, "run", "--rm"]
    assert ("--gpus all" in words) == (docker == "docker")  # podman takes CDI devices through GPUS
    assert "--read-only --tmpfs /tmp" in words
    assert f"-v {REPO}/data:/data:ro" in words
    assert f"-v {REPO}/outputs:/outputs" in words
    assert re.search(r"-v \S+:/cache( |$)", words)
    assert "-e PROMPT" in words and "-e OUTPUT_DIR" in words  # by name: docker reads the values from make's env
    assert argv[-2:] == [f"pai-diffusion-jobs:{__version__}", "generate"]


def test_run_local_passes_values_through(tmp_path):
    """A stand-in `docker` prints what it received: the values arrive intact, whatever their spaces and script."""
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "$@"\necho "PROMPT=$PROMPT"\necho "OUTPUT_DIR=$OUTPUT_DIR"\necho "SEED=$SEED"\n')
    fake.chmod(0o755)
    common = [f"DOCKER={fake}", f"DATA={tmp_path}/data", f"OUTPUTS={tmp_path}/outputs", f"MODEL_CACHE={tmp_path}/c"]

    out = make("run-local", *common, "JOB=lora", "PROMPT=一只猫 坐在 '窗台' 上", SEED="7")
    assert "PROMPT=一只猫 坐在 '窗台' 上" in out
    assert "OUTPUT_DIR=/outputs/lora" in out  # default: the job's folder in the outputs volume
    assert "SEED=7" in out and "-e SEED" in out  # exported settings pass too
    assert "--gpus all" in out

    out = make("run-local", *common, "OUTPUT_DIR=/outputs/night-1")
    assert "OUTPUT_DIR=/outputs/night-1" in out


def test_build_and_push_commands():
    build = shlex.split(make("-n", "build", "DOCKER=podman", "TAG=dev").replace("\\\n", " "))
    assert build[:5] == ["podman", "build", "--build-arg", f"VERSION={__version__}", "--build-arg"]
    assert re.fullmatch(r"REVISION=[0-9a-f]{40}", build[5])  # the commit, for the OCI revision label
    assert build[6:] == ["-t", "pai-diffusion-jobs:dev", "."]
    registry = "registry.example.com/ml/pai-diffusion-jobs"
    assert f"docker push {registry}:{__version__}" in make("-n", "push", f"IMAGE={registry}")
    refused = subprocess.run(["make", "-C", str(REPO), "push"], capture_output=True, text=True)
    assert refused.returncode != 0 and "set IMAGE to a registry path" in refused.stderr
