"""The `pai-diffusion` command: `pai-diffusion JOB [--flag value ...]`, every job run through `run_job`."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import sys
import time

from jobs import sigterm
from jobs.config import describe, load
from jobs.errors import BAD_INPUT_EXIT_CODE, BadInput
from jobs.launch import relaunch
from jobs.registry import JOBS, Job

# mallopt(3) parameters, and glibc's ceiling for the mmap threshold on 64-bit machines.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20

log = logging.getLogger("jobs")


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


def run_job(job: Job, argv: list[str]) -> int:
    """Resolve the configuration, run the job, and map bad input to exit code 2 with one line."""
    setup_logging()
    keep_freed_memory()
    started = time.perf_counter()
    is_main_process = os.environ.get("RANK", "0") == "0"  # under a multi-process launcher, say things once
    try:
        config = load(job.config, argv, prog=job.prog)
        if is_main_process:
            print(describe(config), file=sys.stderr, flush=True)
        job.run_function()(config)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    if is_main_process:
        log.info("done in %.1f s", time.perf_counter() - started)
    return 0


def usage() -> str:
    jobs = "\n".join(f"  {job.name:<9} {job.summary}" for job in JOBS.values())
    return f"usage: pai-diffusion JOB [--flag value ...]\n\njobs:\n{jobs}"


def main(argv: list[str] | None = None) -> int:
    sigterm.install()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr)
        return 0 if argv else BAD_INPUT_EXIT_CODE
    job = JOBS.get(argv[0])
    if job is None:
        print(f"error: unknown job {argv[0]!r}\n{usage()}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if job.distributed:
        setup_logging()
        if (code := relaunch(["-m", "jobs.cli", *argv])) is not None:
            return code
    return run_job(job, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
