"""What the bench scripts share: where things live, the commands they run, the markdown they write.

- The layout: ``REPO``, ``BIN`` (the venv's scripts), ``REPORTS`` (docs/science/: the one folder every
  generated report and its figures go to), :func:`out_dir` and :class:`RunLayout` (a protocol's
  working folder: shards, runs, embeddings, probe reports).
- The command builders: :func:`hl` (``hpc-lensiam ARGS``), :func:`on_ranks` (the same on N torchrun
  processes), :func:`launcher`, :func:`embed_cmd`, :func:`probe_cmd`; the ledger that runs them once is
  :mod:`bench.ledger`.
- The report helpers: :func:`interval`, :func:`table`, :func:`machine_line`, :func:`commands_table`,
  :func:`made_by`, :func:`ridge`.

Scripts run as modules from the repository root (``.venv/bin/python -m bench.NAME``): none edits sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REPORTS = REPO / "docs" / "science"  # generated reports (<tag>.md) and their figures
PARAMS = ("theta_E", "e1", "gamma")  # the lens parameters the probe tables show


# ------------------------------------------------------------------------------------------ layout
def out_dir(path: str | Path) -> Path:
    """A working folder given on the command line: relative paths are relative to the repository."""
    return Path(path) if Path(path).is_absolute() else REPO / path


class RunLayout:
    """Where a protocol's files live under its working folder ``out``."""

    def __init__(self, out: Path):
        self.out = out

    def shards(self, name: str) -> Path:
        return self.out / "shards" / name

    def run(self, name: str) -> Path:
        return self.out / f"run_{name}"

    def last(self, name: str) -> Path:
        """The final checkpoint of run ``name``."""
        return self.run(name) / "checkpoints" / "last.pt"

    def emb(self, name: str) -> Path:
        return self.out / f"emb_{name}.h5"

    def probe(self, name: str) -> Path:
        return self.out / f"probe_{name}.json"

    def sim_yaml(self, num_pix: int, write: bool = True) -> Path:
        """The simulation config of every set (only the image side differs from the defaults)."""
        path = self.out / "sim.yaml"
        if write:
            path.write_text(f"instrument:\n  num_pix: {num_pix}\n")
        return path


# -------------------------------------------------------------------------------- command builders
def shown(cmd: list) -> str:
    """The command as a user types it from the repository root (.venv/bin/..., relative paths)."""
    return shlex.join([str(c) for c in cmd]).replace(str(BIN) + "/", ".venv/bin/").replace(str(REPO) + "/", "")


def hl(*args) -> list:
    """``hpc-lensiam ARGS`` in one plain process."""
    return [BIN / "hpc-lensiam", *args]


def on_ranks(nproc: int, *args) -> list:
    """``hpc-lensiam ARGS`` on ``nproc`` torchrun processes of this machine."""
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", nproc, "-m", "hpc_lensiam", *args]


def launcher(nproc: int) -> list:
    """The prefix that runs a subcommand on ``nproc`` processes (a plain process for 1)."""
    return on_ranks(nproc) if nproc > 1 else hl()


def embed_cmd(launch: list, ckpt: Path | str, data: Path, emb: Path, *extra) -> list:
    """``hpc-lensiam embed`` of ``data`` with checkpoint (or run folder, or ``none``) ``ckpt``."""
    return [*launch, "embed", "--checkpoint", ckpt, *extra, "--data", data, "--out", emb]


def probe_cmd(emb: Path, pj: Path, against: Path | None = None) -> list:
    """``hpc-lensiam probe`` of ``emb`` (paired against ``against``) into ``pj``."""
    return hl("probe", "--embeddings", emb, *(["--against", against] if against is not None else []), "--json", pj)


# --------------------------------------------------------------------------------------- reports
def load(path: Path):
    """A JSON file's content, or None if it does not exist (yet)."""
    return json.loads(path.read_text()) if path.is_file() else None


def ridge(probe_json: Path) -> dict:
    """The ridge probe's R^2 and 95% interval per parameter, from ``hpc-lensiam probe --json``."""
    res = next(iter(json.loads(probe_json.read_text())["results"].values()))
    params = {p: {"r2": res["ridge"][p], "ci95": res["ridge_ci95"][p], "knn_r2": res["knn"][p]} for p in PARAMS}
    return {"params": params, "n_test_systems": res.get("systems_test")}


def interval(value: float, ci, signed: bool = False) -> str:
    """``0.123 [0.100, 0.150]`` (``signed``: ``+0.123 [+0.100, +0.150]``), three decimals."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table: the header row, its rule and one line per row (cells as given)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def machine_line() -> str:
    return f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; Python {platform.python_version()}."


def commands_table(title: str, done: dict, sort: bool = False) -> list[str]:
    """A section with every ledger step that finished: name, wall seconds and the command as typed."""
    items = sorted(done.items()) if sort else done.items()
    rows = [[name, f"{s['seconds']:.0f}", f"`{s['command']}`"] for name, s in items]
    return ["", f"## {title}", "", *table(["step", "seconds", "command"], rows)]


def made_by(module: str) -> str:
    """The invocation that makes a report (``--report-only`` left out): ``.venv/bin/python -m bench.X ARGS``."""
    argv = shlex.join(x for x in sys.argv[1:] if x != "--report-only")  # an empty value shows as ''
    return f"`.venv/bin/python -m bench.{module} {argv}`"


def warmup_epochs(epochs: int) -> int:
    """The benches' lr warm-up (``train --warmup-epochs``): a tenth of the epochs, at least one."""
    return max(1, epochs // 10)


# ------------------------------------------------------------------------------- quick mode, ratio
RATIO = "bench ratio:"  # the line prefix `make bench` (bench.registry) reads a script's figure from


def parse_quick(ap, argv, quick: dict):
    """``ap.parse_args(argv)`` with a ``--quick`` flag: a small run of minutes, ``quick`` the defaults it
    changes (flags given on the command line still win)."""
    ap.add_argument("--quick", action="store_true", help="a small run of minutes (make bench runs it)")
    a = ap.parse_args(argv)
    if a.quick:
        ap.set_defaults(**quick)
        a = ap.parse_args(argv)
    return a


def print_ratio(value: float, what: str) -> None:
    """The figure of merit of a run, one line that ``make bench`` collects into its table."""
    print(f"{RATIO} {value:.4g} ({what})", flush=True)
