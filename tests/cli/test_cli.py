"""The CLI's flags carry the config dataclasses' types, whichever way an optional field is spelt."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from hpc_lensiam.cli import _add_dataclass_flags, build_parser


def test_train_optional_int_flag_parses_as_int():
    """TrainConfig.max_steps is ``int | None``: ``--max-steps 3`` must arrive as the int 3, not "3"."""
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--max-steps", "3"])
    assert a.max_steps == 3 and isinstance(a.max_steps, int)
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o"]).max_steps is None


@dataclass
class _Both:
    old_style: Optional[float] = None  # noqa: UP045 -- the spelling under test
    new_style: float | None = None
    flag: bool = False


def test_both_optional_spellings_give_typed_flags():
    p = argparse.ArgumentParser()
    _add_dataclass_flags(p, _Both)
    a = p.parse_args(["--old-style", "0.5", "--new-style", "0.25", "--flag"])
    assert (a.old_style, a.new_style, a.flag) == (0.5, 0.25, True)
    assert isinstance(a.old_style, float) and isinstance(a.new_style, float)


def test_demo_config_trains_short_runs_without_zero_init_residual():
    """`make demo` trains a few dozen steps: with the zero-init residual default the backbone stays
    little more than its stem (README), so its config turns it off, and says nothing false about bf16."""
    from pathlib import Path

    from hpc_lensiam.train.loop import train_config

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert train_config(str(demo)).zero_init_residual is False
    assert "20x slower" not in demo.read_text()
