"""What every command-line entry point of npllm does with an error: one line, an exit status, no traceback."""

from __future__ import annotations

import sys


def run_command(prog: str, run, *args) -> int:
    """Call ``run(*args)``; bad input (ValueError, FileNotFoundError, ImportError for a missing CuPy) becomes one line
    ``PROG: error: ...`` on stderr and exit status 2, Ctrl-C exit status 130. Anything else is a bug: its traceback."""
    try:
        run(*args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0
