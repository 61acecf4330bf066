"""Shared plumbing for command-line entries: user errors become one line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from slimforge import SlimforgeError


def exit_on_error(main: Callable[[], object]) -> None:
    """Run `main`; a SlimforgeError prints `error: <message>` on stderr and exits with status 2."""
    try:
        main()
    except SlimforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
