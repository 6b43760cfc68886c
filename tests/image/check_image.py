"""`make test-image`: build the project's Dockerfile and run two jobs inside the image, as production runs them.

No image registry is reachable here, so the build swaps two ARGs: BASE_IMAGE becomes a Debian bookworm made
with debootstrap (its python3 is 3.11, like the local CPU torch wheel) and TORCH_SPEC that wheel. Every other
line of the Dockerfile runs as in production, through `make build`. Then `generate` and a short `lora` run in
the image through `make run-local DOCKER=podman`, as a restricted Kubernetes pod would run them: UID 1000,
read-only root filesystem, a tmpfs /tmp, no capabilities, no network, HF_HUB_OFFLINE=1, a tiny PAI-shaped model
and a dataset mounted read-only, an outputs and a cache folder mounted read-write. Their outputs are checked
on the host. Last, a job is stopped as it starts and one second later, as Kubernetes stops a pod: SIGTERM, then
a long grace period; it must exit with 143 within seconds, which needs a real init (tini) as the image's PID 1.

Needs root (rootful podman, debootstrap) and Debian's archive; installs podman, runc and debootstrap with apt.
Caches outside git: the base image and the build layers in podman's storage, the rest under CACHE
(`podman rmi` both images and delete CACHE for a cold run). Prints one result line; details go to the log.

    python tests/image/check_image.py [--preflight]   # --preflight: only tell whether this machine can run it
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PAI_IMAGE_CACHE", "/var/tmp/pai-diffusion-jobs/test-image"))
LOG = CACHE / "test-image.log"
BASE = "localhost/pai-diffusion-stand-in:bookworm"
IMAGE, TAG = "localhost/pai-diffusion-jobs", "test"
TORCH_WHEEL = Path(os.environ.get("TORCH_WHEEL", "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["podman", "runc", "debootstrap"]
APP_UID = 1000

# What podman needs on these machines (REFERENCE.md): runc (Debian's podman prefers crun), cgroupfs and a
# file for events (no systemd), and default ulimits below the machine's hard limits.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# This machine reaches PyPI through a TLS-intercepting proxy whose CA is in the host's bundle, not in pip's
# certifi: pip in the build reads this site config, mounted for the build only (its files never reach the image).
PIP_CONF = """\
[global]
cert = /etc/xdg/pip/ca-certificates.crt
"""


class Failed(Exception):
    pass


def preflight() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root (rootful podman and debootstrap)"
    if not shutil.which("apt-get"):
        return "needs Debian's apt-get"
    if not TORCH_WHEEL.is_file():
        return f"no CPU torch wheel at {TORCH_WHEEL} (set TORCH_WHEEL)"
    for url in (f"{DEBIAN_MIRROR}/dists/bookworm/Release", "https://pypi.org/simple/pip/"):
        try:
            urllib.request.urlopen(url, timeout=20).close()
        except OSError as error:
            return f"cannot reach {url}: {error}"
    return None


def sh(*args: str | Path, log, what: str = "", **kwargs) -> None:
    """Run a command, its output appended to the log; raise Failed naming it (or `what`) when it fails."""
    args = [str(a) for a in args]
    log.write(f"\n$ {' '.join(args)}\n")
    log.flush()
    done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode:
        raise Failed(f"{what or ' '.join(args[:2])} exited with {done.returncode}")


def install_tools(log) -> None:
    missing = [p for p in PACKAGES if subprocess.run(["dpkg-query", "-W", p], capture_output=True).returncode]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", log=log, env=env)
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, log=log, env=env)


def podman_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image]).returncode == 0


def base_image(log) -> bool:
    """The stand-in for the CUDA base: a minimal bookworm with python3. Returns whether it was cached."""
    if podman_exists(BASE):
        return True
    rootfs, tarball = CACHE / "rootfs", CACHE / "rootfs.tar"
    shutil.rmtree(rootfs, ignore_errors=True)
    sh("debootstrap", "--variant=minbase", "--include=python3", "bookworm", rootfs, DEBIAN_MIRROR, log=log)
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
        sh("find", rootfs / leftovers, "-type", "f", "-delete", log=log)
    sh("tar", "-C", rootfs, "-cf", tarball, ".", log=log)
    # A real base image sets PATH; without it the Dockerfile's `PATH=/opt/venv/bin:$PATH` would lose /usr/bin.
    path = "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    sh("podman", "import", "--change", path, tarball, BASE, log=log)
    shutil.rmtree(rootfs)
    tarball.unlink()
    return False


def build(log) -> None:
    pip_dir = CACHE / "pip"
    pip_dir.mkdir(exist_ok=True)
    (pip_dir / "pip.conf").write_text(PIP_CONF)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", pip_dir)
    # The two volumes exist during the build only (they leave empty /wheels and /etc/xdg/pip in this test image).
    flags = [
        "--pull=never",
        "--network=host",  # the build's RUN steps reach apt and PyPI like the host; the test runs use none
        f"--volume={TORCH_WHEEL.parent}:/wheels:ro",
        f"--volume={pip_dir}:/etc/xdg/pip:ro",
        f"--build-arg=BASE_IMAGE={BASE}",
        "--build-arg=TORCH_INDEX_URL=https://pypi.org/simple",
        f"--build-arg=TORCH_SPEC=/wheels/{TORCH_WHEEL.name}",
    ]
    make_vars = ["DOCKER=podman", f"IMAGE={IMAGE}", f"TAG={TAG}", "BUILD_FLAGS=" + " ".join(flags)]
    sh("make", "-C", REPO, "build", *make_vars, log=log, what="make build")


def fixtures(run: Path) -> dict[str, Path]:
    """A data folder (a tiny PAI-shaped model, a captioned dataset in the seed's layout), folders UID 1000 can write."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_dataset import write_dataset
    from tiny_model import build as build_model

    shutil.rmtree(run, ignore_errors=True)
    paths = {name: run / name for name in ("data", "outputs", "cache")}
    build_model(paths["data"] / "pai-tiny")
    write_dataset(paths["data"] / "dataset", count=4)
    for writable in ("outputs", "cache"):
        paths[writable].mkdir()
        os.chown(paths[writable], APP_UID, APP_UID)
    for path in [run, *run.rglob("*")]:  # the data only needs to be readable
        path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))
    return paths


# `make run-local` already runs the image as a pod does (its UID 1000, read-only root, tmpfs /tmp, volumes);
# these add the rest of the restricted profile, and no network to prove the jobs need none.
POD_FLAGS = "--network=none --cap-drop=all --security-opt=no-new-privileges"


def run_job(job: str, paths: dict[str, Path], settings: dict[str, str], log) -> float:
    """Run one job in the image through `make run-local DOCKER=podman`, outputs in /outputs/JOB; return seconds."""
    make_vars = {
        "DOCKER": "podman",
        "IMAGE": IMAGE,
        "TAG": TAG,
        "JOB": job,
        "RUN_FLAGS": POD_FLAGS,
        "DATA": paths["data"],
        "OUTPUTS": paths["outputs"],
        "MODEL_CACHE": paths["cache"],
        "HF_HUB_OFFLINE": "1",
        "MODEL_NAME": "/data/pai-tiny",
        **settings,
    }
    started = time.perf_counter()
    run_local = ["make", "-C", REPO, "run-local", *(f"{name}={value}" for name, value in make_vars.items())]
    sh(*run_local, log=log, what=f"`{job}` in the image", timeout=900)
    return time.perf_counter() - started


def owned_by_app(folder: Path) -> None:
    others = [p for p in folder.rglob("*") if p.stat().st_uid != APP_UID]
    if others:
        raise Failed(f"{others[0]} is owned by UID {others[0].stat().st_uid}, not {APP_UID}")


def check_generate(folder: Path) -> str:
    from PIL import Image

    images = sorted(folder.glob("*.png"))
    if not images:
        raise Failed(f"generate wrote no PNG in {folder}")
    for image in images:
        Image.open(image).verify()
    if not list(folder.glob("*.jsonl")):
        raise Failed(f"generate wrote no manifest in {folder}")
    owned_by_app(folder)
    return f"{len(images)} PNG + manifest"


def check_lora(folder: Path) -> str:
    from safetensors import safe_open

    weights = folder / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        raise Failed(f"lora wrote no {weights.name} in {folder}")
    with safe_open(weights, "pt") as tensors:
        count = len(list(tensors.keys()))
    if not count:
        raise Failed(f"{weights} holds no tensors")
    if not (folder / "model_index.json").is_file():
        raise Failed(f"lora wrote no merged pipeline (model_index.json) in {folder}")
    owned_by_app(folder)
    return f"{count} LoRA tensors + merged pipeline"


# The jobs run in the image, their settings (tiny and short), and the check of their output folder.
JOBS = [
    ("generate", {"PROMPT": "一只猫坐在窗台上", "NUM_INFERENCE_STEPS": "2"}, check_generate),
    (
        "lora",
        {"TRAIN_DIR": "/data/dataset", "RESOLUTION": "32", "TRAIN_BATCH_SIZE": "2", "MAX_TRAIN_STEPS": "2"},
        check_lora,
    ),
]


def stop_in_the_first_second(paths: dict[str, Path], log) -> str:
    """SIGTERM as a job starts and one second later, while Python starts and imports torch, with 60 s of
    grace: the container must end with 143 within seconds. Right at the start only a real init as PID 1
    (tini) can do that: the kernel ignores SIGTERM for a PID 1 without a handler (measured without tini:
    the job ignored it and ran on to its end)."""
    results = []
    for delay in (0, 1):
        name = f"pai-diffusion-sigterm-{os.getpid()}-{delay}"
        run = ["podman", "run", "--detach", f"--name={name}", *POD_FLAGS.split(), "--read-only", "--tmpfs=/tmp"]
        run += [f"--user={APP_UID}:{APP_UID}", f"--volume={paths['data']}:/data:ro", "--env=HF_HUB_OFFLINE=1"]
        run += ["--env=MODEL_NAME=/data/pai-tiny", "--env=PROMPT=一只猫", f"{IMAGE}:{TAG}", "generate"]
        sh(*run, log=log, what="podman run --detach")
        try:
            time.sleep(delay)
            started = time.perf_counter()
            sh("podman", "stop", "--time=60", name, log=log, what="podman stop")
            seconds = time.perf_counter() - started
            code = int(subprocess.check_output(["podman", "inspect", "--format={{.State.ExitCode}}", name], text=True))
        finally:
            subprocess.run(["podman", "rm", "--force", name], stdout=log, stderr=subprocess.STDOUT)
        if code != 143 or seconds > 10:
            raise Failed(f"SIGTERM {delay} s after the start: exit {code} after {seconds:.1f} s (want 143 within 10 s)")
        results.append(f"{seconds:.1f} s")
    return f"SIGTERM at the start and 1 s in: 143 in {' and '.join(results)}"


def build_and_run(log) -> tuple[str, list[str]]:
    """Everything after the preflight; returns the result line's details and the jobs not in this tree."""
    install_tools(log)
    base = "cached" if base_image(log) else "built"
    started = time.perf_counter()
    build(log)
    build_seconds = time.perf_counter() - started
    size = json.loads(subprocess.check_output(["podman", "image", "inspect", f"{IMAGE}:{TAG}"]))[0]["Size"]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the libraries' progress bars
        paths = fixtures(CACHE / "run")
    done, missing = [], []
    for job, env, check in JOBS:
        if not (REPO / "jobs" / f"{job}.py").is_file():
            missing.append(job)
            continue
        seconds = run_job(job, paths, env, log)
        done.append(f"{job} {check(paths['outputs'] / job)} in {seconds:.0f} s")
    done.append(stop_in_the_first_second(paths, log))
    details = (
        f"base {base}, image built in {build_seconds:.0f} s ({size / 1e9:.2f} GB); "
        f"as UID {APP_UID}, read-only root, offline: {', '.join(done) or 'no job ran'}"
    )
    return details, missing


def main() -> int:
    started = time.perf_counter()
    why_not = preflight()
    if "--preflight" in sys.argv:
        print(why_not or "this machine can run make test-image")
        return 1 if why_not else 0
    if why_not:
        print(f"test-image: FAIL, cannot run on this machine: {why_not}")
        return 1
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(CACHE / "containers.conf")
    with open(LOG, "w") as log:
        try:
            details, missing = build_and_run(log)
        except (Failed, subprocess.SubprocessError, OSError) as error:
            log.flush()
            print("\n".join(LOG.read_text().splitlines()[-40:]), file=sys.stderr)
            print(f"test-image: FAIL after {time.perf_counter() - started:.0f} s: {error} (log: {LOG})")
            return 1
    verdict = f"INCOMPLETE ({', '.join(missing)} not in this tree yet)" if missing else "PASS"
    print(f"test-image: {verdict} in {time.perf_counter() - started:.0f} s: {details}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
