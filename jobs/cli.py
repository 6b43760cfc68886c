"""The `pai-diffusion` command: the job is the first argument, and every job runs through `run_job`."""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from jobs.config import BAD_INPUT_EXIT_CODE, PREEMPTED_EXIT_CODE, BadInput, JobConfig, describe, load
from jobs.launch import relaunch

JOBS = {
    "generate": "text to image",
    "img2img": "text-guided image editing",
    "finetune": "full UNet fine-tuning",
    "lora": "LoRA fine-tuning",
}
# Jobs that run on every GPU of the pod (and on several pods) through jobs/launch.py.
DISTRIBUTED_JOBS = ("finetune", "lora")

# mallopt(3) parameters, and glibc's ceiling for the mmap threshold on 64-bit machines.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20

log = logging.getLogger("jobs")
Config = TypeVar("Config", bound=JobConfig)


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors; fields passed as `extra={"fields": {...}}` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging() -> None:
    """JSON lines on stderr when it is not a terminal (pods), plain lines on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Python as a container's first process ignores SIGTERM unless it handles it: stop now, exit 143.

    Nothing is lost: outputs are renamed into place whole, and training replaces this handler
    with its own, which saves a checkpoint first.
    """
    raise SystemExit(PREEMPTED_EXIT_CODE)


def keep_freed_memory() -> bool:
    """Keep freed blocks in the heap for the next step instead of handing them back to the OS.

    glibc returns blocks of a few MB to the kernel when they are freed, so on a CPU every training
    or denoising step page-faults its activations in afresh (85 MB a step in the medium LoRA
    benchmark: 3-4% of its time). The price: memory freed in blocks under 32 MB stays with the
    process until it exits. Returns whether it took (glibc only; GPU jobs barely notice either way).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def run_job(config_cls: type[Config], job: Callable[[Config], None], argv: list[str] | None = None) -> int:
    """Resolve the configuration, run the job, and map bad input to exit code 2 with one line."""
    setup_logging()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    keep_freed_memory()
    started = time.perf_counter()
    is_main_process = os.environ.get("RANK", "0") == "0"  # under a multi-process launcher, say things once
    try:
        config = load(config_cls, argv)
        if is_main_process:
            print(describe(config), file=sys.stderr, flush=True)
        job(config)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    if is_main_process:
        log.info("done in %.1f s", time.perf_counter() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        jobs = "\n".join(f"  {name:<9} {what}" for name, what in JOBS.items())
        print(f"usage: pai-diffusion JOB [--flag value ...]\n\njobs:\n{jobs}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else BAD_INPUT_EXIT_CODE
    if argv[0] in DISTRIBUTED_JOBS:
        setup_logging()
        if (code := relaunch(["-m", "jobs.cli", *argv])) is not None:
            return code
    return importlib.import_module(f"jobs.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
