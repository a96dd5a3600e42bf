"""The bench package: every script has a quick mode in the registry `make bench` runs, and the quick
mode's defaults give way to flags given on the command line."""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import RATIO, parse_quick, print_ratio
from bench.registry import REGISTRY, main
from support import REPO

HELPERS = {"__init__", "common", "ledger", "registry"}


def test_every_bench_script_is_in_the_registry_once():
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")} - HELPERS
    listed = [b.module for b in REGISTRY]
    assert sorted(listed) == sorted(set(listed)), "a script listed twice"
    assert set(listed) == scripts, f"not in bench/registry.py: {scripts - set(listed)}; gone: {set(listed) - scripts}"


def test_quick_defaults_yield_to_given_flags(capsys):
    def parser():
        ap = argparse.ArgumentParser()
        ap.add_argument("--pairs", type=int, default=2048)
        ap.add_argument("--steps", type=int, default=320)
        return ap

    assert vars(parse_quick(parser(), [], {"pairs": 8, "steps": 2})) == {"pairs": 2048, "steps": 320, "quick": False}
    a = parse_quick(parser(), ["--quick", "--steps", "5"], {"pairs": 8, "steps": 2})
    assert (a.pairs, a.steps) == (8, 5)
    print_ratio(2 / 3, "what")
    assert capsys.readouterr().out == f"{RATIO} 0.6667 (what)\n"


def test_make_bench_refuses_an_unknown_script_before_running_anything(capsys):
    assert main(["--only", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("hpc-lensiam: error: --only nosuch")


def test_every_registered_quick_mode_is_a_flag_of_its_script():
    for b in REGISTRY:
        r = subprocess.run(
            [sys.executable, "-m", f"bench.{b.module}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, (b.module, r.stderr[-2000:])
        assert all(f in r.stdout for f in b.argv if f.startswith("--")), (b.module, b.argv)
