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


# ------------------------------------------------------------------ generated flags, `config COMMAND`
import dataclasses  # noqa: E402

import pytest  # noqa: E402

from hpc_lensiam.cli import COMMANDS, _config, _config_class, main  # noqa: E402
from hpc_lensiam.core.config import option_meta, read_yaml  # noqa: E402

# the required options of each command, as flags (the --config file leaves them null)
REQUIRED = {
    "simulate": ["--out", "o", "--pairs", "4"],
    "ingest": ["--out", "o", "f.fits"],
    "show": ["d", "--out", "o.png"],
    "train": ["--data", "d", "--out", "o"],
    "embed": ["--checkpoint", "none", "--data", "d", "--out", "o.h5"],
    "umap": ["--embeddings", "e.h5", "--out", "o.png"],
    "probe": ["--embeddings", "e.h5"],
    "similar": ["--embeddings", "e.h5", "--anomaly"],
    "export": ["--checkpoint", "c", "--out", "o.pt"],
    "finetune": ["--backbone", "none", "--train", "a", "--test", "b"],
    "predict": ["--model", "m", "--data", "d", "--out", "o.csv"],
    "compare": ["a.json", "b.json"],
}


def test_train_help_shows_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    shown = (("--arch", "resnet18"), ("--method", "byol"), ("--engine", "deepspeed"), ("--precision", "bf16"))
    for flag, some in shown:
        assert f"{flag} {{" in text and some in text.split(f"{flag} {{", 1)[1].split("}", 1)[0]


@pytest.mark.parametrize("command", sorted(c for c, v in COMMANDS.items() if v[1]))
def test_every_flag_has_help_and_choices_shown(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    cls = _config_class(command)
    for f in dataclasses.fields(cls):
        meta = option_meta(cls, f)
        assert meta.get("help"), f"{command} {f.name}: no help text"
        if meta.get("choices") and not callable(meta["choices"]):
            assert "{" + ",".join(meta["choices"]) + "}" in text


def test_bad_value_names_the_flag_not_the_field(capsys):
    assert main(["train", "--data", "d", "--out", "o", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "flags." not in err
    assert main(["embed", "--checkpoint", "none", "--data", "d", "--out", "o.h5", "--batch-size", "0"]) == 2
    assert "hpc-lensiam: error: --batch-size: must be >= 1" in capsys.readouterr().err
    assert main(["ingest", "f.fits", "--out", "o", "--input-pixel-scale", "-1"]) == 2
    assert "error: --input-pixel-scale: must be > 0" in capsys.readouterr().err
    assert main(["finetune", "--backbone", "none", "--train", "a", "--test", "b", "--seed", "1", "--seeds", "1,2"]) == 2
    assert "error: --seed: give one of --seed and --seeds" in capsys.readouterr().err
    assert main(["simulate", "--out", "o", "--pairs", "2", "--samples", "lensiam"]) == 2
    assert "error: --samples: 'lensiam' is not one of pairs, single" in capsys.readouterr().err
    assert main(["train", "--data", "d", "--out", "o", "--arch", "resnet7"]) == 2
    assert "error: --arch: 'resnet7' is not one of resnet18" in capsys.readouterr().err


def test_missing_required_option_names_the_flag(capsys):
    assert main(["embed", "--data", "d", "--out", "o.h5"]) == 2
    assert "error: --checkpoint: required" in capsys.readouterr().err


def test_bad_value_in_config_file_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("batch_size: 0\n")
    assert main(["embed", "--config", str(cfg), *REQUIRED["embed"]]) == 2
    assert f"error: {cfg}.batch_size: must be >= 1" in capsys.readouterr().err
    cfg.write_text("nonsense: 1\n")
    assert main(["embed", "--config", str(cfg), *REQUIRED["embed"]]) == 2
    assert f"{cfg}: unknown key 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,new",
    [
        (["simulate", "--out", "o", "--pairs", "2", "--mode", "single"], "--samples"),
        (["simulate", "--out", "o", "--pairs", "2", "--engine", "torch"], "--renderer"),
        (["ingest", "f.fits", "--out", "o", "--pixel-scale", "0.1"], "--input-pixel-scale"),
        (["similar", "--embeddings", "e", "--key", "k", "--source", "d"], "--data-dir"),
        (["similar", "--embeddings", "e", "--image", "i", "--pixel-scale=0.1"], "--input-pixel-scale"),
    ],
)
def test_old_spellings_refused_naming_the_new_one(argv, new, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpc-lensiam: error:") and new in err and len(err.strip().splitlines()) == 1


def test_simulate_config_refuses_an_old_simulation_yaml(tmp_path, capsys):
    phys = tmp_path / "sim.yaml"
    phys.write_text("preset: hst\ninstrument:\n  num_pix: 48\n")
    assert main(["simulate", "--out", "o", "--pairs", "2", "--config", str(phys)]) == 2
    assert "--physics" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(c for c, v in COMMANDS.items() if v[1]))
def test_config_command_round_trips_through_config_flag(command, tmp_path, capsys):
    """`hpc-lensiam config CMD` prints every option with its default; `CMD --config` reads it back to the
    same config (the required options, null in the file, given as flags)."""
    assert main(["config", command]) == 0
    path = tmp_path / f"{command}.yaml"
    path.write_text(capsys.readouterr().out)
    cls = _config_class(command)
    assert set(read_yaml(path)) == {f.name for f in dataclasses.fields(cls)}
    plain = _config(build_parser(command).parse_args([command, *REQUIRED[command]]))
    if command == "train":
        from hpc_lensiam.train.loop import train_config

        plain = train_config(data="d", out="o")
        a = build_parser(command).parse_args([command, "--config", str(path), *REQUIRED[command]])
        back = train_config(config_path=str(path), data="d", out="o")
        assert a.config == str(path)
    else:
        back = _config(build_parser(command).parse_args([command, "--config", str(path), *REQUIRED[command]]))
    assert back == plain
