"""``hpc-lensiam`` command line: argparse subcommands, each calling one public function.

Every user mistake surfaces as a :class:`~hpc_lensiam.core.errors.UserError`: one line on stderr and
exit code 2. The Python API is the same functions, so the CLI adds no behaviour of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing

from .core.errors import PEER_EXIT_CODE, PeerFailure, UserError, os_error_line
from .core.runtime import is_rank0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2 (its default code too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of config dataclass ``cls``, generated from its :func:`~hpc_lensiam.core.config.option`
    metadata (help, choices, spelling; ``batch_size`` -> ``--batch-size`` by default). Every flag
    defaults to None (not given), so the config's defaults and the ``--config`` file stay in force."""
    from .core.config import choices_of, option_meta

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("flag") is False:  # False: set another way (train's --method-param)
            continue
        meta = option_meta(cls, f)
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)  # Optional[X] and X | None
        base = args[0] if optional and args else tp
        many = typing.get_origin(base) is list
        item = (typing.get_args(base) or (str,))[0] if many else base
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = meta.get("help") or f.name.replace("_", " ")
        if meta.get("required"):
            text += " (required)"
        elif default not in (None, [], "") and item is not bool:
            text += f" (default: {default})"
        kw = {"help": text.replace("%", "%%"), "default": None}
        if item is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = item if item in (int, float) else str
            if choices_of(cls, f):  # shown here, checked by the config (one `hpc-lensiam: error:` line)
                kw["metavar"] = "{" + ",".join(map(str, choices_of(cls, f))) + "}"
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            if many:
                kw["nargs"] = "*" if meta.get("positional") else "+"
        if meta.get("positional"):
            kw.setdefault("nargs", "?")
            parser.add_argument(f.name, **kw)
            continue
        names = [meta.get("flag") or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        parser.add_argument(*names, dest=f.name, **kw)


def _dataclass_overrides(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def _config(a: argparse.Namespace):
    """The command's validated config: defaults <- ``--config`` YAML <- the flags given."""
    from .core.config import resolve

    cls = _config_class(a.command)
    cfg = resolve(cls, a.config, _dataclass_overrides(a, cls))
    complete = getattr(cfg, "check_complete", None)
    if complete:
        complete()
    return cfg


# ------------------------------------------------------------------------------------- commands
def _cmd_simulate(a):
    from .simulate.writer import simulate_shards

    c = _config(a)
    simulate_shards(
        out_dir=c.out,
        num_samples=c.pairs,
        shard_size=c.shard_size,
        mode=c.mode,
        preset=c.preset,
        seed=c.seed,
        cosmos_dir=c.cosmos_dir,
        psf_files=c.psf or None,
        psf_pixel_scale_arcsec=c.psf_pixel_scale,
        config_path=c.physics,
        family=c.family,
        lens_fraction=c.lens_fraction,
        engine=c.renderer,
        device=c.device,
        match={
            "file": c.match,
            "num_pix": c.num_pix,
            "correlated_noise_rho": c.correlated_noise,
            "psf": c.match_psf,
        },
    )


def _cmd_ingest(a):
    from .ingest.run import ingest

    c = _config(a)
    if c.preview is not None:  # checked before anything is read or written
        from .core.io import check_output_file

        check_output_file(c.preview, "--preview")
    ingest(
        out_dir=c.out,
        files=c.files,
        list_csv=c.list_csv,
        labels_csv=c.labels_csv,
        config=c.grid(),
        skip_bad=c.skip_bad,
    )
    if c.preview is not None and is_rank0():  # rank 0 wrote the manifest last: the data set is complete
        from .shards.show import show_pairs

        show_pairs(c.out, c.preview, n=c.preview_n, stretch=c.stretch, what="ingest --preview")


def _cmd_verify(a):
    from pathlib import Path

    from .shards.integrity import verify_dataset

    bad = verify_dataset(a.data_dir)
    if bad:
        raise UserError(
            f"{a.data_dir}: {len(bad)} bad shard(s): "
            f"{', '.join(Path(b.split(': ', 1)[0]).name for b in bad)}; rerun the same "
            f"`hpc-lensiam simulate` command to redo them"
        )


def _cmd_show(a):
    from .shards.show import show_pairs

    c = _config(a)
    show_pairs(data_dir=c.data_dir, out=c.out, n=c.n, stretch=c.stretch)


def _cmd_train(a):
    from .core.config import name_flags
    from .core.errors import ConfigError
    from .train.config import RENAMED, TrainConfig, parse_method_params
    from .train.loop import train, train_config

    flags = _dataclass_overrides(a, TrainConfig)
    flags.update({k: getattr(a, k) for k in RENAMED if getattr(a, k, None) is not None})  # refused, named
    flags["method_params"] = parse_method_params(a.method_param)
    try:
        cfg = train_config(config_path=a.config, **flags)
    except ConfigError as exc:  # a bad flag is named as typed (--batch-size), not as a field
        text = re.sub(r"\bflags\.method_params\.(\w+)", r"--method-param \1", str(exc))
        raise ConfigError(name_flags(text, TrainConfig)) from None
    train(
        cfg,
        resume=a.resume,
        allow_config_change=a.allow_config_change,
    )


def _cmd_embed(a):
    from .embed.extract import extract_embeddings

    extract_embeddings(config=_config(a))


def _cmd_umap(a):
    from .embed.umap import run_umap

    run_umap(config=_config(a))


def _cmd_probe(a):
    from .embed.probe import probe

    probe(config=_config(a))


def _cmd_similar(a):
    from .embed.similar import similar

    similar(config=_config(a))


def _cmd_export(a):
    from .downstream.export import export_backbone

    export_backbone(config=_config(a))


def _cmd_finetune(a):
    from .downstream.finetune import finetune
    from .downstream.seeds import finetune_seeds

    c = _config(a)
    kw = dict(
        backbone=c.backbone,
        train_dir=c.train,
        test_dir=c.test,
        target=c.target,
        n_train=c.n_train,
        n_test=c.n_test,
        epochs=c.epochs,
        freeze_backbone=c.freeze_backbone,
        batch_size=c.batch_size,
        lr=c.lr,
        arch=c.arch,
        task=c.task,
        verify=c.verify,
        save_model=c.save_model,
        val_fraction=c.val_fraction,
        weight_decay=c.weight_decay,
        n_boot=c.n_boot,
    )
    if c.seeds is None:
        finetune(seed=0 if c.seed is None else c.seed, out_json=c.json, **kw)
    else:
        finetune_seeds(c.seed_list(), out_json=c.json, resume=c.resume, **kw)


def _cmd_predict(a):
    from .downstream.predict import predict

    predict(config=_config(a))


def _cmd_compare(a):
    from .downstream.seeds import compare

    compare(config=_config(a))


def _cmd_config(a):
    """Print COMMAND's full default configuration as YAML (what its ``--config`` reads back)."""
    from .core.config import dump_yaml

    if a.name == "train":
        from .train.loop import train_config

        cfg = train_config()  # the default method's recipe applied, as `train` resolves it
    else:
        cfg = _config_class(a.name)()
    sys.stdout.write(dump_yaml(cfg))


# name -> (help, config class "module:Class" or None, runner)
COMMANDS: dict[str, tuple[str, str | None, typing.Callable]] = {
    "simulate": (
        "simulate lens pairs (MPI ranks) into WebDataset shards",
        "simulate.config:SimulateConfig",
        _cmd_simulate,
    ),
    "ingest": (
        "real cutouts (FITS, .npy, lenstronomy HDF5, PNG/JPEG) -> single-image shards (MPI ranks)",
        "ingest.config:IngestCommandConfig",
        _cmd_ingest,
    ),
    "verify": (
        "check every shard of a data set against its manifest (size, tar structure, sample count, sha256); "
        "exit 2 naming bad shards",
        None,
        _cmd_verify,
    ),
    "show": ("draw a PNG grid of simulated pairs", "shards.show:ShowConfig", _cmd_show),
    "train": (
        "SimSiam/LenSiam pretraining (run under torchrun for several processes)",
        "train.config:TrainConfig",
        _cmd_train,
    ),
    "embed": ("backbone features of every image to HDF5 (run under torchrun)", "embed.config:EmbedConfig", _cmd_embed),
    "umap": ("2-D UMAP of embeddings, coloured by any of its columns", "embed.config:UmapConfig", _cmd_umap),
    "probe": (
        "held-out R^2 of k-NN and ridge probes for the 8 lens parameters",
        "embed.config:ProbeConfig",
        _cmd_probe,
    ),
    "similar": (
        "nearest neighbours by cosine similarity (faiss); --anomaly: most isolated",
        "embed.config:SimilarConfig",
        _cmd_similar,
    ),
    "export": (
        "export the backbone as a stock torchvision state_dict",
        "downstream.config:ExportConfig",
        _cmd_export,
    ),
    "finetune": (
        "regress a lens parameter on an independent set with few labels",
        "downstream.config:FinetuneConfig",
        _cmd_finetune,
    ),
    "predict": (
        "apply fine-tuned models (finetune --save-model) to shard sets: a catalogue",
        "downstream.config:PredictConfig",
        _cmd_predict,
    ),
    "compare": (
        "paired, seed-aware difference of two finetune reports on one test set",
        "downstream.config:CompareConfig",
        _cmd_compare,
    ),
}

# Spellings that were renamed: refused with one line naming the new one (before any work).
RENAMED: dict[str, dict[str, str]] = {
    "simulate": {
        "--mode": "--samples pairs|single (was --mode lensiam|single)",
        "--engine": "--renderer lenstronomy|torch",
        "--config": "--physics (the simulation YAML); --config is now the command's own config",
    },
    "ingest": {"--pixel-scale": "--input-pixel-scale (the inputs' arcsec/pixel; --target-pixel-scale: the grid's)"},
    "similar": {
        "--pixel-scale": "--input-pixel-scale",
        "--source": "--data-dir (the data folder that holds --key)",
    },
}


def _config_class(command: str):
    import importlib

    spec = COMMANDS[command][1]
    module, name = spec.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _check_renamed(argv: list[str]) -> None:
    command = next((x for x in argv if not x.startswith("-")), None)
    for arg in argv:
        old = arg.split("=", 1)[0]
        new = RENAMED.get(command or "", {}).get(old)
        if new is not None and not (command == "simulate" and old == "--config" and _is_command_yaml(argv)):
            raise UserError(f"{command} {old}: renamed to {new}")


def _is_command_yaml(argv: list[str]) -> bool:
    """``simulate --config FILE``: the command's config (accepted) or an old simulation YAML (refused)."""
    from .core.config import read_yaml
    from .simulate.config import SimulateConfig

    i = next((k for k, x in enumerate(argv) if x.split("=", 1)[0] == "--config"), None)
    path = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else None)
    if path is None:
        return True  # argparse names the missing value
    try:
        data = read_yaml(path)
    except UserError:
        return True  # resolve() names the file
    names = {f.name for f in dataclasses.fields(SimulateConfig)}
    return all(k in names for k in data)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's flags are generated (the others' choices may
    import torch: the backbone names)."""
    p = _Parser(prog="hpc-lensiam", description="LenSiam: self-supervised representations of strong lenses")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (text, _spec, func) in COMMANDS.items():
        s = sub.add_parser(name, help=text, description=text)
        s.set_defaults(func=func)
        if command not in (None, name):
            continue
        if name == "verify":
            s.add_argument("data_dir", help="the shard folder")
            continue
        s.add_argument(
            "--config",
            default=None,
            metavar="YAML",
            help=f"{name}'s config (`hpc-lensiam config {name}` prints every key with its default); flags override it",
        )
        if name == "train":
            s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
            s.add_argument(
                "--allow-config-change",
                action="store_true",
                help="with --resume: continue although data/seed/lr/views/batch/arch changed "
                "(recorded in OUT/config_history.yaml)",
            )
            s.add_argument(
                "--method-param",
                action="append",
                metavar="KEY=VALUE",
                help="the method's own hyperparameter (repeatable; YAML method_params:), e.g. --method byol "
                "--method-param ema_tau_base=0.99 (docs/methods.md lists each method's keys)",
            )
            from .train.config import RENAMED as TRAIN_RENAMED

            for old in TRAIN_RENAMED:  # renamed flags: refused with one line naming the new spelling
                s.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)
        _add_dataclass_flags(s, _config_class(name))
    s = sub.add_parser(
        "config", help="print a command's full default configuration as YAML (what its --config reads back)"
    )
    s.add_argument("name", metavar="COMMAND", choices=[n for n, v in COMMANDS.items() if v[1]])
    s.set_defaults(func=_cmd_config)
    return p


def _loader_line(exc: RuntimeError, command: str) -> str | None:
    """A DataLoader worker that died while the main process was not waiting for a batch (torch's
    SIGCHLD handler raises in whatever the main process runs): one line, as the loaders give."""
    if not str(exc).startswith("DataLoader "):
        return None
    from .data.loader import loader_failure

    return loader_failure(exc, command)


def _rank_prefix() -> str:
    """'rank N: ' on a rank other than 0 (each rank's own disk or loader can fail), '' on rank 0:
    the package's one-line form, 'hpc-lensiam: error: rank N: ...', as the trainer's failing rank."""
    from .core.runtime import launcher_rank

    rank = launcher_rank()
    return f"rank {rank}: " if rank else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _check_renamed(argv)
    except UserError as exc:
        print(f"hpc-lensiam: error: {exc}", file=sys.stderr)
        return 2
    command = next((x for x in argv if not x.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        if is_rank0():
            print(f"hpc-lensiam: error: {exc}", file=sys.stderr)
        return 2
    except PeerFailure as exc:  # another rank failed (it says why) or hung (named here)
        if not exc.quiet:
            print(f"hpc-lensiam: error: {exc}", file=sys.stderr, flush=True)
        return PEER_EXIT_CODE
    except OSError as exc:  # rank-local (one rank's disk): every rank that hits it says so
        line = os_error_line(exc)
        if line is None:
            raise
        print(f"hpc-lensiam: error: {_rank_prefix()}{line}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a loader worker's death, which torch's SIGCHLD handler raises anywhere
        line = _loader_line(exc, args.command)
        if line is None:
            raise
        print(f"hpc-lensiam: error: {_rank_prefix()}{line}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The ``hpc-lensiam`` / ``python -m hpc_lensiam`` entry point: :func:`main`, then exit.

    A torchrun rank leaves without the interpreter's finalization (:func:`exit_torchrun_rank`)."""
    from .core.runtime import exit_torchrun_rank

    rc = main()
    exit_torchrun_rank(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
