"""What every command-line entry point of npllm does with an error: one line, an exit status, no traceback."""

from __future__ import annotations

import sys


def one_line(err: BaseException) -> str:
    """An expected error as one line: an OSError as ``PATH: reason`` (a permission, a full disk, a file where a
    directory should be), anything else as its message with newlines folded."""
    if isinstance(err, OSError) and err.strerror:
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{paths}: {err.strerror}" if paths else err.strerror
    return " ".join(str(err).split("\n"))


def run_command(prog: str, run, *args) -> int:
    """Call ``run(*args)``; bad input (ValueError, FileNotFoundError, ImportError for a missing CuPy) and any OSError
    become one line ``PROG: error: ...`` on stderr and exit status 2 (1 for an OSError), Ctrl-C exit status 130.
    Anything else is a bug: its traceback."""
    try:
        run(*args)
    except (ValueError, ImportError, OSError) as err:  # FileNotFoundError is an OSError with a message of ours
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1 if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) else 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0


def report_error(prog: str, err: BaseException, code: int, vote) -> int:
    """One line for an expected error of a command that may run under mpirun: said once by world rank 0 when every
    rank hit it (then every rank returns ``code``), else by the rank that hit it, which then aborts the job (the
    others wait in a collective). vote: the ``npllm.parallel.comm.ErrorVote`` made at the command's start."""
    from .parallel.comm import abort_job

    if vote.all_failed():
        if vote.rank == 0:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return code
    print(f"{prog}: error: [rank {vote.rank}] {one_line(err)}", file=sys.stderr)
    abort_job(code)


# ----------------------------------------------------------------------------------------------------------
# console scripts (pyproject.toml [project.scripts]): the same entry points as ``python -m npllm.<command>``


def train_entry() -> None:
    """npllm-train: under mpirun, this rank's share of the cores for BLAS is set before NumPy loads (and OpenBLAS's
    idle threads told not to spin), and malloc keeps the memory a step frees for the next one."""
    from .allocator import keep_freed_memory
    from .parallel.threads import prepare_blas

    prepare_blas()
    keep_freed_memory()
    from .parallel.comm import run_main
    from .train import main

    sys.exit(run_main(main))


def generate_entry() -> None:
    from .generate import main

    sys.exit(main())


def evaluate_entry() -> None:
    from .evaluate import main

    sys.exit(main())


def data_entry() -> None:
    from .data import main

    sys.exit(main())


def tokenizer_entry() -> None:
    from .tokenizer import main

    sys.exit(main())


def convert_entry() -> None:
    from .convert import main

    sys.exit(main())
