"""bench.ledger: the long protocols' step ledger skips only what really finished."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.ledger import Steps


def _append(log, text: str) -> list:
    """A step that leaves a trace: appends ``text`` to ``log`` each time it really runs."""
    return [sys.executable, "-c", f"open({str(log)!r}, 'a').write({text!r})"]


def test_finished_steps_are_skipped_and_changed_or_lost_ones_rerun(tmp_path):
    log, out = tmp_path / "ran.txt", tmp_path / "work"
    out.mkdir()
    Steps(out).run("a", _append(log, "a"), [log])
    Steps(out).run("a", _append(log, "a"), [log])  # a fresh ledger read from disk: skipped
    assert log.read_text() == "a"
    Steps(out).run("a", _append(log, "A"), [log])  # another command under the same name: runs
    assert log.read_text() == "aA"
    log.unlink()  # its output gone: runs again
    Steps(out).run("a", _append(log, "A"), [log])
    assert log.read_text() == "A"
    done = json.loads((out / "steps.json").read_text())
    assert list(done) == ["a"] and "'A'" in done["a"]["command"] and done["a"]["seconds"] >= 0


def test_a_failed_step_is_not_recorded_and_resume_flag_is_appended(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    with pytest.raises(subprocess.CalledProcessError):
        Steps(out).run("fails", [sys.executable, "-c", "raise SystemExit(3)"])
    assert not (out / "steps.json").exists()
    seen = tmp_path / "argv.txt"
    cmd = [sys.executable, "-c", f"import sys; open({str(seen)!r}, 'w').write(' '.join(sys.argv[1:]))", "x"]
    Steps(out).run("train", cmd, [seen], resume_flag=True)
    assert seen.read_text() == "x --resume"
    # the ledger records the command without --resume, so the resumed step counts as the same one
    Steps(out).run("train", cmd, [seen], resume_flag=False)
    assert (
        seen.read_text() == "x --resume"
        and "--resume" not in json.loads((out / "steps.json").read_text())["train"]["command"]
    )
