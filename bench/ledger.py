"""The resumable step runner the long bench scripts share (bench.science, bench.methods).

``OUT/steps.json`` records every command that succeeded and how long it took. On a rerun a step is
skipped when the same command succeeded before and its outputs still exist; an interrupted training
step is rerun with ``--resume`` (``resume_flag``), so a protocol of hours may be run in parts.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from hpc_lensiam.core.io import atomic_write_json

from .common import BIN, REPO, shown

__all__ = ["BIN", "REPO", "Steps", "shown"]


class Steps:
    """Run named steps once: ``OUT/steps.json`` maps a step's name to its command and seconds."""

    def __init__(self, out: Path, tag: str = "bench"):
        self.path = out / "steps.json"
        self.tag = tag
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, cmd: list, outputs: list[Path] = (), resume_flag: bool = False) -> None:
        cmd = [str(c) for c in cmd]
        prev = self.done.get(name)
        if prev and prev["command"] == shown(cmd) and all(Path(o).exists() for o in outputs):
            print(f"[{self.tag}] {name}: done before ({prev['seconds']:.0f} s), skipped", flush=True)
            return
        full = cmd + (["--resume"] if resume_flag else [])
        print(f"\n[{self.tag}] {name}: {shlex.join(full)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(full, check=True, cwd=REPO)
        self.done[name] = {"command": shown(cmd), "seconds": time.perf_counter() - t0}
        atomic_write_json(self.path, self.done)
        print(f"[{self.tag}] {name}: {self.done[name]['seconds']:.0f} s", flush=True)
