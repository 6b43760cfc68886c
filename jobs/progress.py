"""Progress of a long loop: a tqdm bar on a terminal, a JSON log line every few seconds in a pod."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("jobs")


class Progress:
    """Counts units of work (images, steps) and reports them; `fields` go into every log line."""

    def __init__(self, total: int, unit: str, initial: int = 0, every_seconds: float = 30.0):
        self.total, self.unit, self.done = total, unit, initial
        self.every_seconds = every_seconds
        self.started = self.last_report = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, count: int = 1, **fields: object) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            if fields:
                self.bar.set_postfix(fields, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_report >= self.every_seconds or self.done >= self.total:
            self.last_report = now
            line = {"done": self.done, "total": self.total, "unit": self.unit, **fields}
            log.info("progress", extra={"fields": line})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
