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


def report_error(prog: str, err: Exception, code: int, vote) -> int:
    """One line for an expected error of a command that may run under mpirun: said once by world rank 0 when every
    rank hit it (then every rank returns ``code``), else by the rank that hit it, which then aborts the job (the
    others wait in a collective). vote: the ``npllm.parallel.comm.ErrorVote`` made at the command's start."""
    from .parallel.comm import abort_job

    if vote.all_failed():
        if vote.rank == 0:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return code
    print(f"{prog}: error: [rank {vote.rank}] {err}", file=sys.stderr)
    abort_job(code)
