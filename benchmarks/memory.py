"""Peak resident memory of a process tree, sampled while a benchmark runs."""

from __future__ import annotations

import threading
import time

import psutil


class PeakMemory:
    """Peak resident memory, sampled every 0.2 s: of this process and every Ray worker process, or, given
    `pid`, of that process and its descendants."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _total(self) -> int:
        if self.pid is not None:
            try:
                root = psutil.Process(self.pid)
                return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:  # the process ended between listing and reading
                return 0
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "ray::" in cmdline and proc.info["memory_info"]:
                total += proc.info["memory_info"].rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
