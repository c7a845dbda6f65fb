"""Progress of a long stage: a tqdm bar on a terminal, periodic log lines otherwise.

Recipes run for hours under nohup, torchrun or a CI log, where a tqdm bar either vanishes
(disable=None turns it off without a TTY) or floods the file with carriage returns. Off a
terminal, LogProgress writes one line per tenth of the stage (and at least once a minute):
step, rate, time left, and the latest postfix (the loss).
"""

from __future__ import annotations

import sys
import time
from typing import Callable


class LogProgress:
    def __init__(self, total: int, desc: str, log: Callable[[str], None],
                 every_s: float = 60.0, initial: int = 0):
        self.total, self.desc, self.log, self.every_s = max(0, int(total)), desc, log, every_s
        self.n = self.initial = int(initial)  # steps done before (a resumed run): not in the rate
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.next_step = self._step_mark(self.n)

    def _step_mark(self, n: int) -> int:
        tenth = max(1, self.total // 10)
        return (n // tenth + 1) * tenth

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.next_step or now - self.last >= self.every_s or self.n == self.total:
            self.next_step = self._step_mark(self.n)
            self.last = now
            elapsed = now - self.start
            rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            self.log(f"  {self.desc}: {self.n}/{self.total} steps, {rate:.2f} steps/s, "
                     f"{left / 60:.1f} min left" + (f", {self.postfix}" if self.postfix else ""))

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, log: Callable[[str], None], initial: int = 0):
    """A tqdm bar when stderr is a terminal, else a LogProgress writing through `log`.
    `initial`: steps already done (a resumed stage), shown but not counted in the rate."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, initial=initial)
    return LogProgress(total, desc, log, initial=initial)
