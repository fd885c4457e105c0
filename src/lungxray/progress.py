"""What a long job says while it runs: bars on a terminal, plain lines anywhere else.

``bar`` is tqdm's bar when standard error is a terminal. Piped to a file or a CI log, the same bar
prints plain lines instead: one each tenth of the way (when ``TENTH_SECONDS`` have passed since
the last; one every ``QUIET_SECONDS`` on a long stretch), one when it ends; never a carriage return
or an escape code.
``stage`` prints a heading (scanning, searching, training, evaluating) and ``note`` one line for
a finished trial or epoch: on a terminal the bars show those figures, so notes only go to the log.
``log_to`` (``--log-file``) copies every plain line, time-stamped, to a file whatever the terminal
(what ``--quiet`` silences is not logged either).

Holds no pipeline logic: the stages call these functions with their own ``progress`` switch.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

QUIET_SECONDS = 30.0  # a line at least this often on a long stretch between tenths
TENTH_SECONDS = 5.0  # ... and no line for a tenth sooner than this after the last one
_log: TextIO | None = None
_log_path: Path | None = None
_lock = threading.Lock()


def interactive() -> bool:
    """Standard error is a terminal: bars redraw in place there."""
    return sys.stderr.isatty()


def log_to(path: Path | None, header: str = "") -> None:
    """Copy every plain line to ``path`` (appended), starting with a line that says when, and
    ``header`` (the command and version): runs appended to one file stay apart. None stops copying."""
    global _log, _log_path
    with _lock:
        if _log is not None:
            _log.close()
        _log = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115 - closed by log_to(None)
        _log_path = path
        if _log is not None:
            _write_log(f"{_stamp()} ==== {header}".rstrip())


def _stamp() -> str:
    """The log file's time: the date too, as runs appended to one file may be days apart."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _emit(text: str, to_stderr: bool, enabled: bool = True) -> None:
    if not enabled:
        return
    with _lock:
        if to_stderr:
            if interactive():
                from tqdm import tqdm

                tqdm.write(text, file=sys.stderr)  # above any bar, which redraws below it
            else:
                print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)
        if _log is not None:
            _write_log(f"{_stamp()} {text}")


def _write_log(line: str) -> None:
    """``line`` into the log file; one that cannot be written (a full disk) is closed, said once,
    and the job goes on without it. Called holding ``_lock``."""
    global _log
    try:
        _log.write(line + "\n")
        _log.flush()
    except OSError as exc:
        log, _log = _log, None
        with contextlib.suppress(OSError):  # its unwritten lines fail again on close
            log.close()
        print(f"{time.strftime('%H:%M:%S')} warning: cannot write the log file {_log_path}: {exc.strerror or exc}; "
              "the log stops here and the job goes on (hint: free space on its disk, or pass another --log-file)",
              file=sys.stderr, flush=True)  # fmt: skip


def logged(text: str) -> None:
    """``text`` in the log file only (what the caller has already printed)."""
    _emit(text, to_stderr=False)


@contextlib.contextmanager
def stdout_copied_to_log() -> Iterator[None]:
    """While inside, what is printed to standard output (the results) is also logged, line by line."""
    if _log is None:
        yield
        return
    original = sys.stdout

    class Copy(io.TextIOBase):
        pending = ""

        def write(self, text: str) -> int:
            original.write(text)
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                logged(line)
            return len(text)

        def flush(self) -> None:
            original.flush()

    sys.stdout = copy = Copy()
    try:
        yield
    finally:
        sys.stdout = original
        if copy.pending:
            logged(copy.pending)


def stage(text: str, enabled: bool = True) -> None:
    """A heading: the job has moved on to ``text``."""
    _emit(f"== {text}", True, enabled)


def note(text: str, enabled: bool = True) -> None:
    """One line of news (a finished trial, an epoch and its loss): printed off a terminal, where
    no bar shows it, and always logged."""
    _emit(text, not interactive(), enabled)


class Bar:
    """tqdm's interface (iterate, ``update``, ``set_postfix_str``, ``close``, a context manager)
    over a tqdm bar on a terminal and plain lines elsewhere and in the log."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, disable=False, leave=True):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.disable = initial, "", disable
        self.to_stderr = not disable and not interactive()
        self.started = self.last_line = time.monotonic()
        self.next_tenth = self._tenth() + 1
        self.closed = False
        self.tqdm = None
        if not disable and interactive():
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=self.total, desc=desc, unit=unit, initial=initial, leave=leave)

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def _count(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.n}{total} {self.unit}" + (f" ({self.postfix})" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.tqdm is not None:
            self.tqdm.update(n)
        now = time.monotonic()
        tenth = self._tenth() >= self.next_tenth and now - self.last_line >= TENTH_SECONDS
        if tenth or now - self.last_line >= QUIET_SECONDS:
            self.next_tenth = self._tenth() + 1
            self.last_line = now
            if not self.disable and (self.total is None or self.n < self.total):  # the end: close()'s line
                _emit(f"{self.desc}: {self._count()}", self.to_stderr)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(text)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tqdm is not None:
            self.tqdm.close()
        if not self.disable:
            _emit(f"{self.desc}: {self._count()} in {time.monotonic() - self.started:.1f} s", self.to_stderr)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable=None, **kw) -> Bar:
    """A progress bar over ``iterable`` or up to ``total`` (tqdm's keywords: desc, unit, initial,
    disable, leave)."""
    return Bar(iterable, **kw)
