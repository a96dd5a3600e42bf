"""``hpc-lensiam ingest``: real cutouts -> single-mode shards, MPI-parallel like ``simulate``.

Two passes over the inputs, both split across ranks:

1. check: every input is inspected and prepared (:func:`prepare`) without being kept; the ranks
   share their verdicts, so all of them know the same list of good inputs. Bad input stops the
   command here, before anything is written (one error line naming the file), or, with
   ``skip_bad``, is left out with a warning and counted.
2. write: the good inputs, in input order, fill shards of ``shard_size``; shard i holds inputs
   i*shard_size.. and is written by whichever rank, through the simulator's shard machinery
   (:func:`hpc_lensiam.shards.writer.write_shard_set`): the same bytes for any rank count,
   complete shards kept on a rerun, ``manifest.json`` last.

Preparation runs twice per input (check, then write): the price of refusing bad input before
writing anything; it is milliseconds per cutout, far below reading the files from disk.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..core import __version__
from ..core.config import to_dict
from ..core.errors import UserError
from ..core.io import sha256_file, sha256_json
from ..shards.manifest import LENS_PARAMS, MANIFEST_FORMAT, shard_name
from ..shards.writer import ShardPlan, check_existing, encode_sample, write_shard_set, write_tar
from .config import IngestConfig
from .prepare import prepare
from .read import inspect_cutout

LABEL_NAMES = (*LENS_PARAMS, "is_lens")


# ------------------------------------------------------------------------------------- inputs
def _read_csv(path: str, what: str) -> tuple[list[str], list[dict]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{what} {path}: cannot read as CSV ({exc})") from None
    if "file" not in columns:
        raise UserError(f"{what} {path}: no 'file' column (columns: {', '.join(columns) or 'none'})")
    return columns, [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in rows]


def read_catalog(list_csv: str) -> list[tuple[str, str | None]]:
    """``--list catalog.csv``: a ``file`` column (relative paths are relative to the CSV's folder),
    optionally ``hdu`` per row."""
    _, rows = _read_csv(list_csv, "--list")
    base = Path(list_csv).parent
    out = []
    for i, r in enumerate(rows, start=2):
        if not r["file"]:
            raise UserError(f"--list {list_csv}: line {i} has an empty 'file'")
        path = Path(r["file"])
        out.append((str(path if path.is_absolute() else base / path), r.get("hdu") or None))
    if not out:
        raise UserError(f"--list {list_csv}: lists no files")
    return out


def read_labels(labels_csv: str, inputs: Sequence[tuple[str, str | None]]) -> dict[int, dict]:
    """``--labels labels.csv`` -> {input index: {"lens": {...}, "is_lens": 0|1}}.

    Column ``file`` names an input by its path as given, its resolved path, or its file name
    (when that name is unique among the inputs); the other columns are lens parameters by their
    lenstronomy names and ``is_lens``. Empty cells are unknown. A row matching no input, an
    unknown column or a non-number is an error.
    """
    columns, rows = _read_csv(labels_csv, "--labels")
    unknown = [c for c in columns if c != "file" and c not in LABEL_NAMES]
    if unknown:
        raise UserError(
            f"--labels {labels_csv}: unknown column {unknown[0]!r} (expected file and any of: {', '.join(LABEL_NAMES)})"
        )
    by_name: dict[str, list[int]] = {}
    index: dict[str, int] = {}
    for i, (path, _) in enumerate(inputs):
        index.setdefault(path, i)
        index.setdefault(str(Path(path).resolve()), i)
        by_name.setdefault(Path(path).name, []).append(i)
    out: dict[int, dict] = {}
    for line, r in enumerate(rows, start=2):
        key = r["file"]
        i = index.get(key, index.get(str(Path(key).resolve())))
        if i is None and len(by_name.get(key, [])) == 1:
            i = by_name[key][0]
        if i is None:
            raise UserError(f"--labels {labels_csv}: line {line}: {key!r} matches no input file")
        lab: dict = {"lens": {}}
        for name in LABEL_NAMES:
            v = r.get(name, "")
            if v == "":
                continue
            try:
                x = float(v)
            except ValueError:
                raise UserError(f"--labels {labels_csv}: line {line}: {name}={v!r} is not a number") from None
            if not math.isfinite(x) or (name == "is_lens" and x not in (0.0, 1.0)):
                raise UserError(
                    f"--labels {labels_csv}: line {line}: {name}={v!r} "
                    f"(expected {'0 or 1' if name == 'is_lens' else 'a finite number'})"
                )
            if name == "is_lens":
                lab["is_lens"] = int(x)
            else:
                lab["lens"][name] = x
        out[i] = lab
    return out


# -------------------------------------------------------------------------------------- passes
def _check_inputs(
    inputs, cfg: IngestConfig, comm, rank: int, size: int, progress: bool
) -> tuple[dict[int, str], dict[int, str]]:
    """({input index: error message}, {input index: sha256 of the file}) over all ranks (each checks
    inputs rank::size). The sha256 of each good input goes into the plan, so a rerun over a folder
    whose inputs were edited since is refused instead of keeping shards of the old contents."""
    mine = range(rank, len(inputs), size)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=len(mine),
            unit="file",
            desc="ingest: check (rank 0)",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None,
        )  # None: only on a terminal, so bad input stays one line
    bad: dict[int, str] = {}
    shas: dict[int, str] = {}
    for i in mine:
        path, hdu = inputs[i]
        try:
            prepare(inspect_cutout(path, cfg, hdu), cfg)
            shas[i] = sha256_file(path)
        except UserError as exc:
            bad[i] = str(exc)
        except OSError as exc:
            bad[i] = f"{path}: cannot read ({exc.strerror})"
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if comm is not None and size > 1:
        for part in comm.allgather(bad):
            bad.update(part)
        for part in comm.allgather(shas):
            shas.update(part)
    return bad, shas


def _write_one(out_dir: Path, cfg: IngestConfig, inputs, good: list[int], labels: dict, shards: ShardPlan):
    def write(index: int, tick) -> str:
        start = index * shards.shard_size

        def samples():
            for j in range(shards.size_of(index)):
                i = good[start + j]
                path, hdu = inputs[i]
                image, meta = prepare(inspect_cutout(path, cfg, hdu), cfg)
                lab = labels.get(i, {"lens": {}})
                params = {**lab, "ingest": {**meta, "input_index": i}}
                yield encode_sample(f"{index:06d}_{j:06d}", {"image": image, "params": params})

        return write_tar(out_dir / shard_name(index), samples(), tick)

    return write


def ingest(
    out_dir: str,
    files: Sequence[str] | None = None,
    list_csv: str | None = None,
    labels_csv: str | None = None,
    config: IngestConfig | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Ingest real cutouts into single-mode shards under ``out_dir``; return the manifest."""
    from ..core.runtime import mpi_world

    cfg = config or IngestConfig()
    if bool(files) == bool(list_csv):
        raise UserError("ingest: give input files or --list catalog.csv (one of the two)")
    inputs = [(str(f), None) for f in files] if files else read_catalog(list_csv)
    labels = read_labels(labels_csv, inputs) if labels_csv else {}
    comm, rank, size = mpi_world()

    bad, shas = _check_inputs(inputs, cfg, comm, rank, size, progress)
    if bad and not skip_bad:
        first = min(bad)
        more = f" (and {len(bad) - 1} more bad input(s); --skip-bad leaves them out)" if len(bad) > 1 else ""
        raise UserError(bad[first] + more)
    if rank == 0:
        for i in sorted(bad):
            print(f"ingest: warning: skipping {bad[i]}", file=sys.stderr, flush=True)
    good = [i for i in range(len(inputs)) if i not in bad]
    if not good:
        raise UserError(f"ingest: none of the {len(inputs)} input(s) is usable")

    resolved = replace(cfg, num_pix=cfg.target_num_pix, pixel_scale_arcsec=cfg.target_pixel_scale_arcsec)
    config = to_dict(resolved)
    kept = [[inputs[i][0], inputs[i][1]] for i in good]
    plan = {
        "format": MANIFEST_FORMAT,
        "version": __version__,
        "kind": "ingest",
        "mode": "single",
        "seed": 0,
        "num_samples": len(good),
        "shard_size": cfg.shard_size,
        "preset": cfg.preset,
        "image_shape": [resolved.num_pix] * 2,
        "pixel_scale_arcsec": resolved.pixel_scale_arcsec,
        "config": config,
        "skipped_inputs": len(bad),
        "config_hash": sha256_json(
            {"config": config, "inputs": kept, "labels": {str(i): labels[i] for i in sorted(labels)}}
        ),
    }
    # the inputs' contents, by resolved path: compared on a rerun (shards.writer.check_existing), so a file
    # edited between a killed run and its rerun is named and refused, never kept as stale shards
    plan["inputs"] = {"cutouts": {str(Path(inputs[i][0]).resolve()): shas[i] for i in good}}
    plan["inputs_sha256"] = sha256_json(plan["inputs"])
    out = Path(out_dir)
    check_existing(out, plan)
    shards = ShardPlan(len(good), cfg.shard_size)
    manifest = write_shard_set(
        out, plan, shards, progress, "ingest", _write_one(out, cfg, inputs, good, labels, shards)
    )
    if rank == 0:
        print(
            f"ingest: {len(good)} of {len(inputs)} input(s) on a {resolved.num_pix}x{resolved.num_pix} grid "
            f'of {resolved.pixel_scale_arcsec}"/px ({cfg.orientation} orientation), {len(labels)} labelled, '
            f"{len(bad)} skipped as bad",
            flush=True,
        )
    return manifest
