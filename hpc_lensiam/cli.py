"""``hpc-lensiam`` command line: argparse subcommands, each calling one public function.

Every user mistake surfaces as a :class:`~hpc_lensiam.core.errors.UserError`: one line on stderr and
exit code 2. The Python API is the same functions, so the CLI adds no behaviour of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from .core.errors import PEER_EXIT_CODE, PeerFailure, UserError, os_error_line
from .core.runtime import is_rank0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2 (its default code too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field (``batch_size`` -> ``--batch-size``), default None."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag") is False:  # set another way (train's --method-param KEY=VALUE)
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)  # Optional[X] and X | None
        base = args[0] if optional and args else tp
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=base if base in (int, float) else str,
                default=None,
                help=f"(default: {f.default if f.default is not dataclasses.MISSING else '...'})",
            )


def _add_stretch_flag(parser: argparse.ArgumentParser) -> None:
    """``--stretch asinh|linear|log`` of every command that draws images; checked by the command (one
    ``hpc-lensiam: error:`` line naming the allowed values, before any compute)."""
    from .shards.display import DEFAULT_STRETCH, STRETCH_HELP, STRETCHES

    parser.add_argument(
        "--stretch", default=DEFAULT_STRETCH, metavar="{" + ",".join(STRETCHES) + "}", help=STRETCH_HELP
    )


def _dataclass_overrides(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


# ------------------------------------------------------------------------------------- commands
def _cmd_simulate(a):
    from .simulate.writer import simulate_shards

    simulate_shards(
        out_dir=a.out,
        num_samples=a.pairs,
        shard_size=a.shard_size,
        mode=a.mode,
        preset=a.preset,
        seed=a.seed,
        cosmos_dir=a.cosmos_dir,
        psf_files=a.psf,
        psf_pixel_scale_arcsec=a.psf_pixel_scale,
        config_path=a.config,
        family=a.family,
        lens_fraction=a.lens_fraction,
        engine=a.engine,
        device=a.device,
        match={
            "file": a.match,
            "num_pix": a.num_pix,
            "correlated_noise_rho": a.correlated_noise,
            "psf": a.match_psf,
        },
    )


def _cmd_ingest(a):
    from .core.config import from_dict
    from .ingest.config import IngestConfig
    from .ingest.run import ingest

    flags = {
        "preset": a.preset,
        "num_pix": a.num_pix,
        "pixel_scale_arcsec": a.target_pixel_scale,
        "hdu": a.hdu,
        "rms_hdu": a.rms_hdu,
        "weight_hdu": a.weight_hdu,
        "input_pixel_scale_arcsec": a.pixel_scale,
        "orientation": a.orientation,
        "shard_size": a.shard_size,
        "each_hdu": a.each_hdu or None,
        "pad": a.pad or None,
        "psf": a.psf,
    }
    cfg = from_dict(IngestConfig, {k: v for k, v in flags.items() if v is not None}, "ingest flags")
    if a.preview is not None:  # checked before anything is read or written
        from .core.io import check_output_file
        from .shards.display import check_stretch

        check_stretch(a.stretch)
        check_output_file(a.preview, "--preview")
        if a.preview_n < 1:
            raise UserError(f"--preview-n: expected >= 1, got {a.preview_n}")
    ingest(out_dir=a.out, files=a.files, list_csv=a.list, labels_csv=a.labels, config=cfg, skip_bad=a.skip_bad)
    if a.preview is not None and is_rank0():  # rank 0 wrote the manifest last: the data set is complete
        from .shards.show import show_pairs

        show_pairs(a.out, a.preview, n=a.preview_n, stretch=a.stretch, what="ingest --preview")


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

    show_pairs(data_dir=a.data_dir, out=a.out, n=a.n, stretch=a.stretch)


def _cmd_train(a):
    from .train.config import RENAMED, TrainConfig, parse_method_params
    from .train.loop import train, train_config

    overrides = _dataclass_overrides(a, TrainConfig)
    overrides.update({k: getattr(a, k) for k in RENAMED if getattr(a, k, None) is not None})  # refused, named
    overrides["method_params"] = parse_method_params(a.method_param)
    train(
        train_config(config_path=a.config, **overrides),
        resume=a.resume,
        allow_config_change=a.allow_config_change,
    )


def _cmd_embed(a):
    from .embed.extract import extract_embeddings

    extract_embeddings(
        checkpoint=a.checkpoint,
        data_dir=a.data,
        out=a.out,
        batch_size=a.batch_size,
        workers=a.workers,
        verify=a.verify,
        arch=a.arch,
        seed=a.seed,
        loader_timeout=a.loader_timeout,
        table=a.table,
    )


def _cmd_umap(a):
    from .embed.umap import run_umap

    run_umap(
        embeddings=a.embeddings,
        out=a.out,
        color=a.color.split(","),
        seed=a.seed,
        overlay=a.overlay,
        coords_out=a.coords,
        stretch=a.stretch,
    )


def _cmd_probe(a):
    from .embed.probe import probe

    probe(embeddings=a.embeddings, against=a.against, out_json=a.json)


def _cmd_similar(a):
    from .embed.similar import similar

    similar(
        embeddings=a.embeddings,
        key=a.key,
        source=a.source,
        image=a.image,
        checkpoint=a.checkpoint,
        k=a.k,
        out=a.out,
        json_out=a.json,
        anomaly=a.anomaly,
        index=a.index,
        hdu=a.hdu,
        pixel_scale=a.pixel_scale,
        orientation=a.orientation,
        top=a.top,
        table=a.table,
        stretch=a.stretch,
    )


def _cmd_export(a):
    from .downstream.export import export_backbone

    export_backbone(checkpoint=a.checkpoint, out=a.out, fmt=a.format, arch=a.arch)


def _cmd_finetune(a):
    from .downstream.finetune import finetune

    kw = dict(
        backbone=a.backbone,
        train_dir=a.train,
        test_dir=a.test,
        target=a.target,
        n_train=a.n_train,
        n_test=a.n_test,
        epochs=a.epochs,
        freeze_backbone=a.freeze_backbone,
        batch_size=a.batch_size,
        lr=a.lr,
        arch=a.arch,
        task=a.task,
        verify=a.verify,
        save_model=a.save_model,
    )
    if a.seeds is None:
        if a.resume:
            raise UserError("--resume: only with --seeds (it keeps the seeds already in --json)")
        finetune(seed=0 if a.seed is None else a.seed, out_json=a.json, **kw)
        return
    from .downstream.seeds import finetune_seeds, parse_seeds

    if a.seed is not None:
        raise UserError("--seed and --seeds: give one of them")
    finetune_seeds(parse_seeds(a.seeds), out_json=a.json, resume=a.resume, **kw)


def _cmd_predict(a):
    from .downstream.predict import predict

    predict(
        a.model,
        a.data,
        a.out,
        batch_size=a.batch_size,
        allow_grid_mismatch=a.allow_grid_mismatch,
        verify=a.verify,
    )


def _cmd_compare(a):
    from .downstream.seeds import compare

    compare(a.a, a.b, out_json=a.json, n_boot=a.n_boot, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    from .downstream.tasks import TASKS
    from .train.config import RENAMED, TrainConfig

    p = _Parser(prog="hpc-lensiam", description="LenSiam: self-supervised representations of strong lenses")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="simulate lens pairs (MPI ranks) into WebDataset shards")
    s.add_argument("--out", required=True, help="output shard directory")
    s.add_argument("--pairs", type=int, required=True, help="number of samples (pairs, or images in single mode)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--mode", choices=("lensiam", "single"), default="lensiam")
    s.add_argument(
        "--preset",
        choices=("hst", "euclid", "hst-f140w"),
        default=None,
        help="instrument; hst-f140w: the DESI-HST F140W lenses' (docs/simulation.md)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--match",
        default=None,
        metavar="FILE",
        help="simulate the instrument of a real cutout (lenstronomy HDF5 or FITS): scale, field, PSF, noise, flux",
    )
    s.add_argument("--match-psf", default=None, metavar="FILE", help="--match: its PSF (default: found as ingest does)")
    s.add_argument("--num-pix", type=int, default=None, help="--match / hst-f140w: image side (default: the file's)")
    s.add_argument(
        "--correlated-noise",
        type=float,
        default=None,
        metavar="RHO",
        help="--match / hst-f140w: neighbour correlation of the background noise (default 0: white)",
    )
    s.add_argument("--cosmos-dir", default=None, help="GalSim real-galaxy-catalog folder (COSMOS 23.5/25.2)")
    s.add_argument("--psf", nargs="+", default=None, metavar="FITS", help="PSF FITS files (image or cube)")
    s.add_argument("--psf-pixel-scale", type=float, default=None, help="arcsec/pixel of the PSF files")
    s.add_argument("--config", default=None, help="simulation YAML (SimulationConfig, or the survey family's)")
    s.add_argument(
        "--family",
        choices=("paper", "survey"),
        default="paper",
        help="generative model: the paper's (default) or the survey-realistic one (docs/survey.md)",
    )
    s.add_argument(
        "--lens-fraction",
        type=float,
        default=None,
        help="survey family: fraction of lenses (default 0.5 single, 1.0 lensiam); the rest non-lenses",
    )
    s.add_argument(
        "--engine",
        choices=("lenstronomy", "torch"),
        default="lenstronomy",
        help="paper family: lenstronomy (LensSimulator) or the batched torch renderer (docs/online.md)",
    )
    s.add_argument("--device", default="cpu", help="--engine torch: torch device (cpu, cuda, cuda:1)")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser(
        "ingest", help="real cutouts (FITS, .npy, lenstronomy HDF5, PNG/JPEG) -> single-mode shards (MPI ranks)"
    )
    s.add_argument(
        "files", nargs="*", help="FITS, .npy (2-D, or an (N,H,W) stack), lenstronomy .h5/.hdf5, PNG/JPEG (or --list)"
    )
    s.add_argument("--out", required=True, help="output shard directory")
    s.add_argument(
        "--list",
        default=None,
        metavar="CSV",
        help="catalogue: a 'file' column, optional 'hdu'/'idx', 'name'/'id', 'psf', 'pixel_scale'; others kept",
    )
    s.add_argument(
        "--labels",
        default=None,
        metavar="CSV",
        help="'file' (or 'name'/'id', or 'idx' for one stack) + lens parameters / is_lens; other columns kept",
    )
    s.add_argument("--each-hdu", action="store_true", help="FITS: every 2-D image HDU is an object (stamp files)")
    s.add_argument("--pad", action="store_true", help="pad cutouts smaller than the target field with sky (0)")
    s.add_argument("--psf", default=None, metavar="FILE", help="PSF of every input (default: psf_*.h5 beside an .h5)")
    s.add_argument("--preset", choices=("hst", "euclid"), default=None, help="target grid (default hst)")
    s.add_argument("--num-pix", type=int, default=None, help="target image side (default: the preset's)")
    s.add_argument(
        "--target-pixel-scale",
        type=float,
        default=None,
        metavar="ARCSEC",
        help="target arcsec/pixel (default: the preset's)",
    )
    s.add_argument(
        "--pixel-scale",
        type=float,
        default=None,
        metavar="ARCSEC",
        help="arcsec/pixel of inputs whose header has no CD/CDELT (and of .npy files)",
    )
    s.add_argument("--hdu", default=None, help="image HDU name or index (default: the first 2-D image)")
    s.add_argument("--rms-hdu", default=None, help="RMS HDU masking no-data pixels: NAME|INDEX|auto|none (auto)")
    s.add_argument("--weight-hdu", default=None, help="weight HDU: weight <= 0 masks a pixel")
    s.add_argument(
        "--orientation",
        choices=("simulator", "sky", "asis"),
        default=None,
        help="simulator (default): columns grow with RA, rows with Dec; sky: north up, east left",
    )
    s.add_argument("--shard-size", type=int, default=None, help="images per shard (default 1000)")
    s.add_argument("--skip-bad", action="store_true", help="leave bad inputs out with a warning instead of stopping")
    s.add_argument("--preview", default=None, metavar="PNG", help="draw the ingested images (as `show` does) here")
    s.add_argument("--preview-n", type=int, default=16, metavar="N", help="with --preview: how many (16)")
    _add_stretch_flag(s)
    s.set_defaults(func=_cmd_ingest)
    s = sub.add_parser(
        "verify",
        help="check every shard of a data set against its manifest (size, "
        "tar structure, sample count, sha256); exit 2 naming bad shards",
    )
    s.add_argument("data_dir")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("show", help="draw a PNG grid of simulated pairs")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    s.add_argument("-n", type=int, default=8)
    _add_stretch_flag(s)
    s.set_defaults(func=_cmd_show)

    s = sub.add_parser("train", help="SimSiam/LenSiam pretraining (run under torchrun for several processes)")
    s.add_argument("--config", default=None, help="training YAML (TrainConfig); flags override it")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although data/seed/lr/views/batch/arch changed "
        "(recorded in OUT/config_history.yaml)",
    )
    _add_dataclass_flags(s, TrainConfig)
    s.add_argument(
        "--method-param",
        action="append",
        metavar="KEY=VALUE",
        help="the method's own hyperparameter (repeatable; YAML method_params:), e.g. --method byol "
        "--method-param ema_tau_base=0.99 (docs/methods.md lists each method's keys)",
    )
    for old in RENAMED:  # renamed flags: refused with one line naming the new spelling
        s.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("embed", help="backbone features of every image to HDF5 (run under torchrun)")
    s.add_argument(
        "--checkpoint",
        required=True,
        help="RUN, RUN/checkpoints/last.pt or a DeepSpeed folder; 'none': random weights (no-pretraining reference)",
    )
    s.add_argument(
        "--arch", default=None, help="the arch the checkpoint must hold; with --checkpoint none: which (resnet18)"
    )
    s.add_argument("--seed", type=int, default=None, help="with --checkpoint none: the weights' seed (0)")
    s.add_argument("--data", required=True, nargs="+", help="shard folder(s): several go into one file")
    s.add_argument("--out", required=True)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument(
        "--loader-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for one batch from the loader's workers, then fail naming them (default 600)",
    )
    s.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest first")
    s.add_argument(
        "--table", default=None, metavar="T.csv|T.fits", help="also a table: one row per image (name, kept columns)"
    )
    s.set_defaults(func=_cmd_embed)

    s = sub.add_parser("umap", help="2-D UMAP of embeddings, coloured by any of its columns")
    s.add_argument("--embeddings", required=True, help="read only")
    s.add_argument("--out", required=True, help="the figure (PNG, or PDF/SVG by suffix)")
    s.add_argument(
        "--color",
        default="theta_E,e1,gamma",
        help="columns of the file, comma-separated: lens parameters, is_lens, source, view, any params/ column",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overlay", default=None, help="embeddings of real images to draw on the fitted map")
    s.add_argument("--coords", default=None, metavar="CSV", help="the 2-D coordinates (default: --out with .csv)")
    _add_stretch_flag(s)
    s.set_defaults(func=_cmd_umap)

    s = sub.add_parser("probe", help="held-out R^2 of k-NN and ridge probes for the 8 lens parameters")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--against", default=None, help="a second embeddings file to compare with")
    s.add_argument("--json", default=None, help="write the table as JSON here too")
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("similar", help="nearest neighbours by cosine similarity (faiss); --anomaly: most isolated")
    s.add_argument("--embeddings", required=True)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--key", default=None, help="query: a sample key or object name of the file (view 1)")
    q.add_argument("--image", default=None, help="query: a FITS/.npy cutout, ingested and embedded (--checkpoint)")
    q.add_argument("--anomaly", action="store_true", help="rank every image by distance to its k-th neighbour")
    s.add_argument("--source", default=None, help="with --key: the data folder, when several hold the key")
    s.add_argument("--checkpoint", default=None, help="with --image: the backbone the embeddings were made with")
    s.add_argument("-k", type=int, default=16, help="neighbours (with --anomaly: which neighbour)")
    s.add_argument("--top", type=int, default=16, help="with --anomaly: how many to show")
    s.add_argument("--out", default=None, help="PNG grid of the query and its neighbours")
    s.add_argument("--json", default=None)
    s.add_argument(
        "--table",
        nargs="+",
        default=None,
        metavar="T.csv|T.fits",
        help="the neighbours / ranking as CSV and/or FITS: name, source, kept catalogue columns, labels",
    )
    s.add_argument("--index", choices=("auto", "flat", "ivf"), default="auto")
    s.add_argument("--hdu", default=None, help="with --image: the image HDU")
    s.add_argument("--pixel-scale", type=float, default=None, help="with --image: arcsec/pixel if no WCS")
    s.add_argument("--orientation", choices=("simulator", "sky", "asis"), default="simulator")
    _add_stretch_flag(s)
    s.set_defaults(func=_cmd_similar)

    s = sub.add_parser("export", help="export the backbone as a stock torchvision state_dict")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    s.add_argument("--arch", default=None, help="expected arch: refuse a checkpoint of another one")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("finetune", help="regress a lens parameter on an independent set with few labels")
    s.add_argument("--backbone", required=True, help="exported backbone, a torchvision weights file, or 'none'")
    s.add_argument("--train", required=True)
    s.add_argument("--test", required=True)
    s.add_argument(
        "--task",
        choices=tuple(TASKS),
        default="regress",
        help="regress a lens parameter, or classify (--target is_lens: lens finding, survey family)",
    )
    s.add_argument("--target", default="theta_E")
    s.add_argument("--n-train", type=int, default=1000)
    s.add_argument("--n-test", type=int, default=1000)
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    s.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="run the recipe once per seed (e.g. 0,1,2): per-seed numbers and mean +- sd",
    )
    s.add_argument("--resume", action="store_true", help="with --seeds: keep the seeds already in --json")
    s.add_argument("--freeze-backbone", action="store_true")
    s.add_argument(
        "--arch", default=None, help="arch for --backbone none (default resnet101); else checked against the file"
    )
    s.add_argument("--json", default=None)
    s.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest first")
    s.add_argument(
        "--save-model",
        default=None,
        metavar="M.safetensors",
        help="save the fine-tuned network for `predict` (with --seeds: M.seedS.safetensors per seed)",
    )
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("predict", help="apply fine-tuned models (finetune --save-model) to shard sets: a catalogue")
    s.add_argument("--model", nargs="+", required=True, help="saved model(s) of one task: several = an ensemble")
    s.add_argument("--data", nargs="+", required=True, help="shard set(s) to predict (simulated or ingested)")
    s.add_argument("--out", required=True, help="catalogue: .csv or .fits, one row per image")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument(
        "--allow-grid-mismatch",
        action="store_true",
        help="predict data on another pixel grid than the models' training data (refused by default)",
    )
    s.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest first")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("compare", help="paired, seed-aware difference of two finetune reports on one test set")
    s.add_argument(
        "a",
        help="finetune --json report of backbone A (one seed or --seeds); several pretraining seeds of A: "
        "A_s0.json,A_s1.json (pretraining and fine-tuning seeds are then both resampled)",
    )
    s.add_argument(
        "b",
        help="finetune --json report(s) of backbone B, same test set and fine-tuning seeds: one per report "
        "of A (paired in order), or one (e.g. random init)",
    )
    s.add_argument("--json", default=None, help="write the comparison as JSON here too")
    s.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    s.set_defaults(func=_cmd_compare)
    return p


def _loader_line(exc: RuntimeError, command: str) -> str | None:
    """A DataLoader worker that died while the main process was not waiting for a batch (torch's
    SIGCHLD handler raises in whatever the main process runs): one line, as the loaders give."""
    if not str(exc).startswith("DataLoader "):
        return None
    from .data.loader import loader_failure

    return loader_failure(exc, command)


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
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
        rank = "" if is_rank0() else f" (rank {os.environ.get('RANK') or os.environ.get('PMI_RANK')})"
        print(f"hpc-lensiam: error{rank}: {line}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a loader worker's death, which torch's SIGCHLD handler raises anywhere
        line = _loader_line(exc, args.command)
        if line is None:
            raise
        rank = "" if is_rank0() else f" (rank {os.environ.get('RANK') or os.environ.get('PMI_RANK')})"
        print(f"hpc-lensiam: error{rank}: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
