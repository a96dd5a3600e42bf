"""``python -m hpc_lensiam.launch`` = ``torchrun`` with the package's one-line failures.

Takes exactly torchrun's arguments (it *is* torchrun: ``torch.distributed.run``), e.g.::

    python -m hpc_lensiam.launch --standalone --nproc_per_node 4 -m hpc_lensiam train --data D --out R

Why: when a rank exits with an error, plain torchrun adds ~40 lines (its own warnings, a traceback of
the agent and a ``ChildFailedError`` report) after the rank's ``hpc-lensiam: error: ...`` line and
exits 1. Here the failing rank's line is the whole report and its exit code is kept: 2 for bad
input. A rank that failed any other way (a crash, a signal) gets one line naming rank, host, pid
and exit code; its own traceback is above it. Signals sent to this process (SIGTERM from Slurm or
``kill``) are forwarded to the ranks by torchrun as usual.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    # torchrun prints a banner when it sets OMP_NUM_THREADS=1 itself; same value, no banner.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # the agent's W/E lines
    args = torchrun.parse_args(argv if argv is not None else sys.argv[1:])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code == 2:  # the rank said what was wrong, in one line
            return 2
        how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
        print(
            f"hpc-lensiam: error: rank {rank} (host {os.uname().nodename}, pid {failure.pid}) failed with "
            f"{how}; its output is above",
            file=sys.stderr,
            flush=True,
        )
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
