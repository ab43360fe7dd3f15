"""Wall time and peak memory per stage, and the progress lines a user (or a CI log) sees."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from rich.console import Console

from publisher.report import StageCost


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its descendants (a publish's converting children included)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


class Monitor:
    """Records each stage's cost and prints one line per finished step (nothing when quiet)."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None, spinner: bool = True) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.spinner = spinner
        self.costs: list[StageCost] = []
        self._process = psutil.Process()

    def beside(self) -> Monitor:
        """A monitor for stages that run in another thread beside this monitor's: it prints to the
        same console, without a spinner (a console shows one live display at a time), and keeps
        costs of its own, so that each list is in its thread's order whatever the timing."""
        return Monitor(quiet=self.quiet, console=self.console, spinner=False)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    @contextmanager
    def stage(self, name: str, detail: str = "", *, record: bool = True) -> Iterator[None]:
        """Time a stage and sample the process tree's RSS every 50 ms to find its peak.

        ``record=False`` shows the line but keeps the stage out of the report (housekeeping whose
        cost would only make two otherwise identical reports differ).
        """
        peak = tree_rss(self._process)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                peak = max(peak, tree_rss(self._process))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        label = f"{name} {detail}".strip()
        started = time.perf_counter()
        live = self.spinner and not self.quiet and self.console.is_terminal
        status = self.console.status(f"{label} ...") if live else None
        try:
            if status:
                status.start()
            yield
        finally:
            if status:
                status.stop()
            stop.set()
            sampler.join()
        seconds = time.perf_counter() - started
        if record:
            self.costs.append(StageCost(stage=label, seconds=round(seconds, 3), peak_rss_bytes=peak))
        self.say(f"[green]✓[/green] {label} [dim]({seconds:.1f} s, peak {peak / 2**30:.2f} GiB)[/dim]")
