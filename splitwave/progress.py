"""One progress display for every long run: a rich bar over rounds on a terminal, a log line per round otherwise.

Simulated runs (the engine) also show simulated time beside the wall clock; real-process runs show phases."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


class RoundProgress:
    """Progress over `total` rounds. `simulated`: also show the virtual clock (`event`, `round_done(sim_t=)`)."""

    def __init__(self, total: int, name: str, enabled: bool = True, simulated: bool = False):
        self.total, self.simulated, self.t0, self._last = total, simulated, time.monotonic(), 0.0
        self.bar: Progress | None = None
        console = Console(stderr=True)
        if enabled and console.is_terminal:
            columns: list[ProgressColumn | str] = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn()]
            if simulated:
                columns.append(TextColumn("simulated {task.fields[sim]:>9.1f} s"))
            columns += [TextColumn("{task.fields[info]}"), TextColumn("wall"), TimeElapsedColumn()]
            self.bar = Progress(*columns, console=console)
            self.task = self.bar.add_task("rounds", total=total, sim=0.0, info="starting")
            self.bar.start()

    def event(self, sim_t: float) -> None:
        """The virtual clock moved (throttled to a few updates a second)."""
        if self.bar is not None and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self.bar.update(self.task, sim=sim_t)

    def round_done(self, round_idx: int, accuracy: float | None = None, sim_t: float | None = None) -> None:
        info = f"round {round_idx + 1}" + (f" acc {accuracy:.3f}" if accuracy is not None else "")
        if self.bar is not None:
            extra = {"sim": sim_t} if sim_t is not None else {}
            self.bar.update(self.task, completed=round_idx + 1, info=info, **extra)
            return
        where = f", simulated {sim_t:.1f} s" if sim_t is not None else ""
        log.info("%d/%d rounds: %s%s, wall %.1f s", round_idx + 1, self.total, info, where, time.monotonic() - self.t0)

    def note(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=info)

    def phase(self, name: str, detail: str = "") -> None:
        """A new phase of the run (training, replay, report): on the bar and in the log."""
        self.note(f"{name}: {detail}" if detail else name)
        log.info("phase %s%s", name, f": {detail}" if detail else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
