"""Progress output that suits where it goes: a tqdm bar on a terminal, and plain lines every
``every_s`` seconds (and one at the end) when stderr is a file or a pipe, where tqdm's redraws
would fill a log with hundreds of carriage-return updates."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``update(n)``, ``set_postfix(**values)``, ``write(text)``, ``close()`` (tqdm's names).

    Args:
        total: units to do (steps, completions).
        desc: the name printed in front (``sdpo``, ``eval``).
        initial: units already done (a resumed run's steps).
        unit: what a unit is, for the plain lines.
        stream: where to write (default stderr); a TTY gets tqdm.
        every_s: seconds between plain lines.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        unit: str = "it",
        stream: TextIO | None = None,
        every_s: float = 30.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = self.start = initial
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                file=self.stream,
            )  # fmt: skip

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s and self.n < self.total:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def write(self, text: str, file: TextIO | None = None) -> None:
        if self.bar is not None:
            self.bar.write(text, file=file or self.stream)
        else:
            print(text, file=file or self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.n > self.start:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last = now
        done = self.n - self.start
        rate = (now - self.t0) / done if done else 0.0
        left = rate * (self.total - self.n)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        eta = f", {_duration(left)} left" if self.n < self.total else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%)"
            f", {_duration(now - self.t0)} elapsed{eta}{extra}",
            file=self.stream,
            flush=True,
        )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
