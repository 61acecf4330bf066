"""Shared plumbing for command-line entries: user errors become one line and exit status 2; log
lines and progress go to stderr, in one format, at the level SLIMFORGE_LOG_LEVEL names.

Progress (`progress`): on a terminal, a tqdm bar. In a log (stderr not a TTY: DVC, Prefect, CI,
pytest) a bar's carriage-return redraws would pile up into one huge line, and tqdm's own
`disable=None` would print nothing at all; there a bar instead writes an ordinary log line, at
most one every SLIMFORGE_PROGRESS_SECONDS (15 s) across all bars of the process -- a heartbeat
saying which loop runs, how far it is and how long it has left -- plus a final line for a bar
that logged before it ended. A loop shorter than the interval after the last line writes nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable

from tqdm import tqdm

from slimforge import SlimforgeError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Our own loggers get SLIMFORGE_LOG_LEVEL; everyone else's (MLflow, alembic, httpx, ...) only
# reaches the log at WARNING and above.
OWN_LOGGERS = ("slimforge", "stages", "kernels", "experiments", "__main__")
HEARTBEAT_S = 15.0  # default SLIMFORGE_PROGRESS_SECONDS: a line every 15 s is ~240 lines an hour


def exit_on_error(main: Callable[[], object]) -> None:
    """Run `main`; a SlimforgeError prints `error: <message>` on stderr and exits with status 2."""
    try:
        main()
    except SlimforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def setup_logging(level: str | None = None) -> None:
    """Log to stderr as LOG_FORMAT, our loggers at `level` (default: env SLIMFORGE_LOG_LEVEL, else
    INFO). Called once by each command-line entry; a second call only resets the level."""
    name = (level or os.environ.get("SLIMFORGE_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(name), int):
        raise SlimforgeError(f"SLIMFORGE_LOG_LEVEL={name!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    for logger in OWN_LOGGERS:
        logging.getLogger(logger).setLevel(name)
    if not _is_tty() and os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") == "1":
        # transformers and huggingface_hub draw their own tqdm bars ("Loading weights", "Writing
        # model shards") on every load and save; in a log each is a run of carriage returns. The
        # variable covers a later import; a stage's entry has imported transformers already.
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


_last_line = [time.monotonic()]  # when any log-mode bar last wrote a line (one heartbeat per process)


class _NullFile:
    def write(self, _s: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _LogBar(tqdm):
    """A tqdm whose display is a log line, written at most every `interval` seconds (see module doc)."""

    monitor_interval = 0  # no monitor thread: lines come from the loop's own updates

    def __init__(self, *args, log: logging.Logger, interval: float, **kwargs):
        self._log, self._interval, self._logged = log, interval, False
        super().__init__(*args, file=_NullFile(), **kwargs)

    def display(self, msg=None, pos=None):
        if msg is None and pos is None:  # a refresh (close() passes pos; it logs its own last line)
            now = time.monotonic()
            if now - _last_line[0] >= self._interval:
                _last_line[0], self._logged = now, True
                self._log.info("%s", str(self))  # formatted now: a handler may format later
        return True

    def close(self):
        if not self.disable and self._logged:
            _last_line[0] = time.monotonic()
            self._log.info("%s", str(self))  # formatted now: a handler may format later
        super().close()


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             log: logging.Logger | None = None, enabled: bool = True, leave: bool | None = None, **kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand, with `total`): tqdm on a terminal, log
    lines to `log` (INFO) elsewhere, nothing when `enabled` is False or `log` is quieter than INFO.
    Extra keyword arguments go to tqdm (`initial`, `postfix`, ...)."""
    log = log or logging.getLogger("slimforge.progress")
    disable = not enabled or not log.isEnabledFor(logging.INFO)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_tty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, file=sys.stderr,
                    mininterval=0.5, dynamic_ncols=True, **kwargs)
    interval = float(os.environ.get("SLIMFORGE_PROGRESS_SECONDS", HEARTBEAT_S))
    bar_format = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, ~{remaining} left, "
                  "{rate_fmt}{postfix}" if total else "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}{postfix}")
    # smoothing=0: the rate is the run's average, which is what a log reader wants; miniters=1 and
    # mininterval=1: the bar looks at the clock on every update but formats a line at most once a second.
    return _LogBar(iterable, desc=desc, total=total, unit=unit, disable=disable, log=log, interval=interval,
                   bar_format=bar_format, smoothing=0, miniters=1, mininterval=min(1.0, interval), **kwargs)
