"""``python -m hpc_lensiam.launch`` = ``torchrun`` with the package's one-line failures.

Takes exactly torchrun's arguments (it *is* torchrun: ``torch.distributed.run``), e.g.::

    python -m hpc_lensiam.launch --standalone --nproc_per_node 4 -m hpc_lensiam train --data D --out R

Why: when a rank exits with an error, plain torchrun adds ~40 lines (its own warnings, a traceback of
the agent and a ``ChildFailedError`` report) after the rank's ``hpc-lensiam: error: ...`` line and
exits 1. Here the failing rank's line is the whole report and its exit code is kept: 2 for bad
input. A rank that stopped because another one failed or hung (exit code
:data:`~hpc_lensiam.core.errors.PEER_EXIT_CODE`) has said so itself, or stays quiet for the rank that
failed; a rank that failed any other way (a crash, a signal) gets one line naming rank, host, pid
and exit code; its own traceback is above it.

Signals. SIGTERM and SIGUSR1 sent to this process (Slurm's ``scancel --signal=TERM``, ``kill``) are
passed to the ranks, which finish their step, save ``last.pt`` and exit 0; the launcher then exits
0 too. Plain torchrun forwards SIGTERM the same way but its own handler raises ``SignalException``:
it exits 1 with a traceback although every rank saved (and it does not handle SIGUSR1 at all). A
rank still running torchrun's shutdown timeout (``--shutdown-timeout``, default 30 s) after the
signal is killed, and the launcher says so in one line. SIGINT, SIGHUP and SIGQUIT keep torchrun's
handling (the ranks get the signal), reported in one line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from .core.errors import PEER_EXIT_CODE

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _children() -> list[int]:
    """Pids of this process's children (torchrun starts each rank as a direct child)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == me and state != "Z":  # an exited rank that torchrun has not reaped yet is done
            out.append(int(entry))
    return out


class _Forward:
    """Pass SIGTERM/SIGUSR1 to the ranks and let torchrun watch them end; kill them after ``grace`` s."""

    def __init__(self, grace: int):
        self.grace, self.signum = grace, 0
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        signal.signal(signal.SIGALRM, self._expired)

    def _forward(self, signum, frame):
        from torch.distributed.elastic.multiprocessing.api import SignalException

        children = _children()
        if not children:  # no rank started yet: stop the way torchrun would
            raise SignalException(f"got {signal.Signals(signum).name} before any rank started", sigval=signum)
        if not self.signum:
            self.signum = signum
            signal.alarm(self.grace)
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _expired(self, signum, frame):
        from torch.distributed.elastic.multiprocessing.api import SignalException

        if not _children():  # every rank has ended (torchrun may wait for other nodes' agents)
            return
        raise SignalException("ranks still running after the grace period", sigval=signal.SIGKILL)

    def close(self):
        signal.alarm(0)


def main(argv: list[str] | None = None) -> int:
    # torchrun prints a banner when it sets OMP_NUM_THREADS=1 itself; same value, no banner.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # the agent's W/E lines (torchelastic's loggers carry their own level: set each one)
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(argv if argv is not None else sys.argv[1:])
    forwarded = {s.name for s in FORWARDED}
    args.signals_to_handle = ",".join(
        s for s in (x.strip() for x in args.signals_to_handle.split(",")) if s and s not in forwarded
    )
    grace = args.shutdown_timeout
    if grace is None:
        grace = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    forward = _Forward(max(1, grace))
    try:
        torchrun.run(args)
    except SignalException as exc:
        if exc.sigval == signal.SIGKILL:
            what = signal.Signals(forward.signum).name
            print(
                f"hpc-lensiam: error: rank(s) still running {grace} s after {what} were killed "
                f"(--shutdown-timeout); --resume continues from the last checkpoint saved",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(
            f"hpc-lensiam: error: stopped by {exc.sigval.name}: torchrun passed it to the ranks",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failures = exc.failures
        if any(f.exitcode == 2 for f in failures.values()):  # a rank said what was wrong, in one line
            return 2
        # A rank that stopped for a peer said so (hung peer) or stays quiet (the failed rank, or another
        # node's launcher, says why); ranks that ended after it were stopped by torchrun because of it.
        peer_t = min((f.timestamp for f in failures.values() if f.exitcode == PEER_EXIT_CODE), default=None)
        own = {
            r: f
            for r, f in failures.items()
            if f.exitcode != PEER_EXIT_CODE and (peer_t is None or f.timestamp <= peer_t)
        }
        if not own:
            return 1
        rank = min(own, key=lambda r: own[r].timestamp)
        failure = own[rank]
        code = failure.exitcode
        how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
        print(
            f"hpc-lensiam: error: rank {rank} (host {os.uname().nodename}, pid {failure.pid}) failed with "
            f"{how}; its output is above",
            file=sys.stderr,
            flush=True,
        )
        return code if code > 0 else 1
    finally:
        forward.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
