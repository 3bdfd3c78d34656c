"""What every command-line entry point shares: usage errors as one `error:` line, the wrapper that
turns user errors and signals into one line and an exit status, and the banner of the embedded defaults."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mmprune.base.errors import UserInputError
from mmprune.base.interrupt import EXIT_STATUS as INTERRUPTED_EXIT, Interrupted, signals_raise


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error:` line (exit 2), like our other errors."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def banner(lines: list[str]) -> None:
    width = min(max(len(line) for line in lines) + 4, 100)
    sys.stderr.write("\n" + "=" * width + "\n")
    for line in lines:
        sys.stderr.write(f"  {line}\n")
    sys.stderr.write("=" * width + "\n\n")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Entry-point wrapper: user errors become one `error:` line and exit status 2; SIGINT (Ctrl-C),
    SIGTERM and SIGHUP remove unfinished outputs and become one `error: interrupted` line, exit 130."""
    with signals_raise():
        try:
            return main(argv)
        except UserInputError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        except KeyboardInterrupt as exc:
            name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
            sys.stderr.write(f"\nerror: interrupted by {name}; unfinished outputs were removed\n")
            return INTERRUPTED_EXIT
