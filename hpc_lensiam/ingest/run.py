"""``hpc-lensiam ingest``: real cutouts -> single-mode shards, MPI-parallel like ``simulate``.

Two passes over the inputs, both split across ranks:

1. check: every input is inspected and prepared (:func:`prepare`) without being kept; the ranks
   share their verdicts, so all of them know the same list of good inputs. Bad input stops the
   command here, before anything is written (one error line naming the file), or, with
   ``skip_bad``, is left out with a warning and counted.
2. write: the good inputs, in input order, fill shards of ``shard_size``; shard i holds inputs
   i*shard_size.. and is written by whichever rank, through the simulator's shard machinery
   (:func:`hpc_lensiam.simulate.writer.write_shard_set`): the same bytes for any rank count,
   complete shards kept on a rerun, ``manifest.json`` last.

Preparation runs twice per input (check, then write): the price of refusing bad input before
writing anything; it is milliseconds per cutout, far below reading the files from disk.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..core import __version__
from ..core.config import FLAGS, from_dict, name_flags, to_dict
from ..core.errors import ConfigError, UserError
from ..core.io import sha256_file, sha256_json
from ..shards.cutouts import CHANNEL_RULE, HDF5_SUFFIXES, PSF_DATASET, expand, find_psf, inspect_cutout, read_psf
from ..shards.manifest import LENS_PARAMS, MANIFEST_FORMAT, UNITS, shard_name
from ..shards.writer import ShardPlan, check_existing, encode_sample, write_shard_set, write_tar
from .config import IngestCommandConfig, IngestConfig
from .prepare import prepare

LABEL_NAMES = (*LENS_PARAMS, "is_lens")


# ------------------------------------------------------------------------------------- inputs
NAME_COLUMNS = ("name", "id")  # a catalogue's object name (the first present)
ROW_COLUMNS = ("idx", "row")  # the row of an (N, H, W) .npy stack
SCALE_COLUMNS = ("pixel_scale", "pixel_scale_arcsec")  # input arcsec/pixel where the file has none


@dataclass
class Obj:
    """One object to ingest: a file, the HDU / stack row in it, its name and the columns kept."""

    path: str
    member: str | None  # FITS HDU, .npy stack row, or None
    name: str
    catalog: dict = field(default_factory=dict)
    psf: str | None = None  # PSF file named by a flag or a CSV column
    pixel_scale: float | None = None  # per-object input pixel scale (CSV column)
    labels: dict = field(default_factory=dict)
    source_row: dict = field(default_factory=dict)  # the --list row that gave it
    default_name: str = ""

    @property
    def key(self) -> str:
        return shard_key(self.name)


def shard_key(name: str) -> str:
    """A valid webdataset key from an object name: no dots or slashes (the tar member is KEY.ext), only
    letters, digits, '_', '+', '-'; anything else becomes '_'. The name itself is kept in params.json."""
    return re.sub(r"[^A-Za-z0-9_+-]", "_", name) or "_"


def _value(v: str):
    """A catalogue cell: '' -> None, else int, float or the string."""
    if v == "":
        return None
    for cast in (int, float):
        try:
            x = cast(v)
            return x if cast is int or math.isfinite(x) else v
        except ValueError:
            pass
    return v


def _read_csv(path: str, what: str, need: tuple[str, ...] = ("file",)) -> tuple[list[str], list[dict]]:
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
    if not any(c in columns for c in need):
        raise UserError(
            f"{what} {path}: no {' or '.join(repr(c) for c in need)} column (columns: {', '.join(columns) or 'none'})"
        )
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise UserError(f"{what} {path}: column {dup!r} appears twice")
    return columns, [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in rows]


def _first(row: dict, names: tuple[str, ...]) -> str:
    return next((row[c] for c in names if row.get(c)), "")


def _scale_of(row: dict, what: str, line: int) -> float | None:
    v = _first(row, SCALE_COLUMNS)
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise UserError(f"{what}: line {line}: pixel scale {v!r} (expected arcsec per pixel > 0)")
    return x


def _catalog_of(row: dict) -> dict:
    return {k: _value(v) for k, v in row.items() if k != "file" and k not in LABEL_NAMES}


def read_catalog(list_csv: str) -> list[tuple[str, str | None, dict]]:
    """``--list catalog.csv``: a ``file`` column (relative paths are relative to the CSV's folder),
    optionally ``hdu`` (FITS HDU or .npy stack row) per row; every other column is kept (the row)."""
    _, rows = _read_csv(list_csv, "--list")
    base = Path(list_csv).parent
    out = []
    for i, r in enumerate(rows, start=2):
        if not r["file"]:
            raise UserError(f"--list {list_csv}: line {i} has an empty 'file'")
        path = Path(r["file"])
        member = r.get("hdu") or _first(r, ROW_COLUMNS) or None
        out.append((str(path if path.is_absolute() else base / path), member, {**r, "__line__": i}))
    if not out:
        raise UserError(f"--list {list_csv}: lists no files")
    return out


def make_objects(entries, cfg: IngestConfig, list_csv: str | None = None) -> list[Obj]:
    """Input entries (path, member, --list row) -> objects, multi-object files expanded; names from the
    file stem (``_hduN`` / ``_<row>`` for several objects in one file) or the row's name/id column."""
    objs = []
    times = Counter(str(Path(p).resolve()) for p, _, _ in entries)
    for path, member, row in entries:
        line = row.pop("__line__", None) if row else None
        for m, suffix in expand(path, cfg, member):
            if m is not None and not suffix:  # a member named by --list: a stack row, or one of several HDUs
                if Path(path).suffix.lower() == ".npy":
                    suffix = f"_{m}"
                elif times[str(Path(path).resolve())] > 1:
                    suffix = f"_hdu{m}"
            stem = Path(path).stem
            given = _first(row, NAME_COLUMNS) if row else ""
            o = Obj(path, m, (given + suffix) if given else stem + suffix, default_name=stem + suffix)
            if row:
                where = f"--list {list_csv}"
                o.catalog = _catalog_of(row)
                o.pixel_scale = _scale_of(row, where, line)
                o.labels = _labels_of(row, where, line)
                if row.get("psf"):
                    q = Path(row["psf"])
                    o.psf = str(q if q.is_absolute() else Path(list_csv).parent / q)
                o.source_row = row
            objs.append(o)
    return objs


def _labels_of(row: dict, what: str, line: int) -> dict:
    lab: dict = {}
    for name in LABEL_NAMES:
        v = row.get(name, "")
        alias = f"{name}_arcsec" if UNITS.get(name) == "arcsec" else None  # lens-model tables say the unit
        if alias and row.get(alias, "") != "":
            if v != "" and float(v) != float(row[alias]):
                raise UserError(f"{what}: line {line}: {name}={v!r} but {alias}={row[alias]!r}: give one of them")
            v = row[alias]
        if v == "":
            continue
        try:
            x = float(v)
        except ValueError:
            raise UserError(f"{what}: line {line}: {name}={v!r} is not a number") from None
        if not math.isfinite(x) or (name == "is_lens" and x not in (0.0, 1.0)):
            raise UserError(
                f"{what}: line {line}: {name}={v!r} (expected {'0 or 1' if name == 'is_lens' else 'a finite number'})"
            )
        if name == "is_lens":
            lab["is_lens"] = int(x)
        else:
            lab.setdefault("lens", {})[name] = x
    return lab


def read_labels(labels_csv: str, objs: list[Obj]) -> int:
    """``--labels labels.csv``: each row names one object and gives its labels and catalogue columns;
    returns how many rows matched (every row must match exactly one object).

    A row finds its object by ``file`` (the path as given, resolved, or the file name when unique)
    narrowed by ``hdu`` / ``idx`` / ``row`` for multi-object files; without ``file``, by ``name``/``id``
    (the object's default name) or, for a single ``.npy`` stack, by ``idx``/``row``. Lens parameters
    (lenstronomy names; an angle also as ``NAME_arcsec``, as lens-model tables write ``theta_E_arcsec``)
    and ``is_lens`` are labels; every other column is kept in params.json under
    ``catalog`` (RA, Dec, magnitudes, flags ...); a ``name``/``id`` cell renames the object, a
    ``pixel_scale`` cell gives its input pixel scale, a ``psf`` cell its PSF file. A column spelled like
    a label in another case (``theta_e``) is refused as a typo.
    """
    what = f"--labels {labels_csv}"
    columns, rows = _read_csv(labels_csv, "--labels", ("file", *NAME_COLUMNS, *ROW_COLUMNS))
    lower = {n.lower(): n for n in LABEL_NAMES}
    typo = [c for c in columns if c not in LABEL_NAMES and c.lower() in lower]
    if typo:
        raise UserError(
            f"{what}: unknown column {typo[0]!r} (did you mean {lower[typo[0].lower()]!r}? label columns: "
            f"{', '.join(LABEL_NAMES)}; other columns are kept as catalogue columns)"
        )
    by_path: dict[str, list[int]] = {}
    by_file: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for i, o in enumerate(objs):
        for k in {o.path, str(Path(o.path).resolve())}:
            by_path.setdefault(k, []).append(i)
        by_file.setdefault(Path(o.path).name, []).append(i)
        for k in {o.name, o.default_name}:  # the name given by --list, or the file's own
            by_name.setdefault(k, []).append(i)
    files_by_name = {k: {objs[i].path for i in v} for k, v in by_file.items()}
    stacks = {o.path for o in objs if o.member is not None and Path(o.path).suffix.lower() == ".npy"}
    seen: dict[int, int] = {}
    base = Path(labels_csv).parent
    for line, r in enumerate(rows, start=2):
        member = r.get("hdu") or _first(r, ROW_COLUMNS)
        if r.get("file"):
            key = r["file"]
            cand = by_path.get(key) or by_path.get(str(Path(key).resolve()))
            if cand is None and len(files_by_name.get(key, ())) == 1:
                cand = by_file[key]
            cand = list(cand or [])
            if len(cand) > 1 and member:
                cand = [i for i in cand if objs[i].member == member]
            desc = repr(key)
        elif _first(r, NAME_COLUMNS) and _first(r, NAME_COLUMNS) in by_name:
            key = _first(r, NAME_COLUMNS)
            cand, desc = list(by_name[key]), f"name {key!r}"
        elif member and len(stacks) == 1:
            cand = [i for i, o in enumerate(objs) if o.path in stacks and o.member == member]
            desc = f"row {member!r} of {next(iter(stacks))}"
        else:
            ident = _first(r, NAME_COLUMNS) or member
            raise UserError(
                f"{what}: line {line}: {ident!r} matches no input (no 'file' column, and no object of that name)"
            )
        if not cand:
            raise UserError(f"{what}: line {line}: {desc} matches no input file")
        if len(cand) > 1:
            raise UserError(
                f"{what}: line {line}: {desc} matches {len(cand)} objects of one file; add an hdu or idx column"
            )
        i = cand[0]
        if i in seen:
            raise UserError(f"{what}: lines {seen[i]} and {line} both label {objs[i].name!r}")
        seen[i] = line
        o = objs[i]
        o.labels = _labels_of(r, what, line)
        o.catalog = {**o.catalog, **_catalog_of(r)}
        if _first(r, NAME_COLUMNS):
            o.name = _first(r, NAME_COLUMNS)
        o.pixel_scale = _scale_of(r, what, line) or o.pixel_scale
        if r.get("psf"):
            q = Path(r["psf"])
            o.psf = str(q if q.is_absolute() else base / q)
    return len(seen)


def check_names(objs: list[Obj]) -> None:
    """Object names (and the shard keys made from them) are unique: one line naming both files."""
    seen: dict[str, Obj] = {}
    for o in objs:
        other = seen.get(o.key)
        if other is not None:
            what = (
                f"name {o.name!r}"
                if other.name == o.name
                else f"key {o.key!r} (from names {other.name!r} and {o.name!r})"
            )
            also = other.path if other.member is None else f"{other.path} {other.member}"
            raise UserError(
                f"{o.path}: duplicate object {what} (also {also}); names must be unique: "
                "give a name or id column in --list/--labels"
            )
        seen[o.key] = o


def _object_cfg(o: Obj, cfg: IngestConfig) -> IngestConfig:
    return replace(cfg, input_pixel_scale_arcsec=o.pixel_scale) if o.pixel_scale else cfg


def prepare_object(o: Obj, cfg: IngestConfig) -> tuple[np.ndarray, dict]:
    """(image, ingest metadata) of one object, its PSF described (file, sha256, shape) when it has one."""
    c = _object_cfg(o, cfg)
    info = inspect_cutout(o.path, c, o.member)
    image, meta = prepare(info, c)
    if o.pixel_scale and meta["pixel_scale_from"] == "flag":
        meta["pixel_scale_from"] = "catalogue column"
    explicit = o.psf or cfg.psf
    psf = find_psf(o.path, explicit)
    if psf:
        k = read_psf(psf, "--psf" if explicit and explicit == cfg.psf else "psf")
        meta["psf"] = {
            "file": str(Path(psf).resolve()),
            "sha256": sha256_file(psf),
            "dataset": PSF_DATASET if Path(psf).suffix.lower() in HDF5_SUFFIXES else "",
            "shape": list(k.shape),
            "sum": float(k.sum()),
            "pixel_scale_arcsec": meta["pixel_scale_arcsec"],  # lenstronomy's kernels share the image's pixels
            "from": "column psf" if o.psf else ("--psf" if cfg.psf else "found beside the file"),
        }
    return image, meta


# -------------------------------------------------------------------------------------- passes
def _check_inputs(
    objs: list[Obj], cfg: IngestConfig, comm, rank: int, size: int, progress: bool
) -> tuple[dict[int, str], dict[int, dict]]:
    """({object index: error message}, {object index: what the check saw}) over all ranks (each checks
    objects rank::size). The sha256 of each good input goes into the plan, so a rerun over a folder
    whose inputs were edited since is refused instead of keeping shards of the old contents."""
    mine = range(rank, len(objs), size)
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
    seen: dict[int, dict] = {}
    shas: dict[str, str] = {}
    for i in mine:
        o = objs[i]
        try:
            _, meta = prepare_object(o, cfg)
            if o.path not in shas:
                shas[o.path] = sha256_file(o.path)
            seen[i] = {
                "sha256": shas[o.path],
                "psf_sha256": (meta.get("psf") or {}).get("sha256"),
                "upsample": meta["upsample_factor"],
                "scale": meta["pixel_scale_arcsec"],
                "display": bool(meta.get("display_image")),
            }
        except UserError as exc:
            bad[i] = str(exc)
        except OSError as exc:
            bad[i] = f"{o.path}: cannot read ({exc.strerror})"
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if comm is not None and size > 1:
        for part in comm.allgather(bad):
            bad.update(part)
        for part in comm.allgather(seen):
            seen.update(part)
    return bad, seen


def _warn_once(objs: list[Obj], good: list[int], seen: dict[int, dict], target: float) -> None:
    """One line each: inputs upsampled onto a finer grid; display images that are not flux."""
    up = [i for i in good if seen[i]["upsample"] > 1.01]
    if up:
        f = sorted(seen[i]["upsample"] for i in up)
        factor = f"{f[0]:.3g}x" if f[-1] - f[0] < 0.01 else f"{f[0]:.3g}x to {f[-1]:.3g}x"
        print(
            f"ingest: warning: {len(up)} of {len(good)} input(s) upsampled {factor} onto the target grid of "
            f'{target:g}"/px (e.g. {objs[up[0]].path}, {np.max(seen[up[0]]["scale"]):.4g}"/px): interpolated '
            "pixels, no new detail; a backbone trained on sharper images sees them blurred (a coarser preset?)",
            file=sys.stderr,
            flush=True,
        )
    shown = [i for i in good if seen[i]["display"]]
    if shown:
        print(
            f"ingest: warning: {len(shown)} input(s) are 8-bit display images (e.g. {objs[shown[0]].path}): "
            f"not calibrated flux (one channel = the {CHANNEL_RULE.split(';')[0]}; the display stretch is kept)",
            file=sys.stderr,
            flush=True,
        )


def _write_one(out_dir: Path, cfg: IngestConfig, objs: list[Obj], good: list[int], shards: ShardPlan):
    def write(index: int, tick) -> str:
        start = index * shards.shard_size

        def samples():
            for j in range(shards.size_of(index)):
                i = good[start + j]
                o = objs[i]
                image, meta = prepare_object(o, cfg)
                params = {"lens": {}, **o.labels, "name": o.name}
                if o.catalog:
                    params["catalog"] = o.catalog
                params["ingest"] = {**meta, "input_index": i}
                yield encode_sample(o.key, {"image": image, "params": params})

        return write_tar(out_dir / shard_name(index), samples(), tick)

    return write


def check_args(
    out_dir: str,
    files: Sequence[str] | None,
    list_csv: str | None,
    labels_csv: str | None,
    config: IngestConfig,
    skip_bad: bool,
) -> IngestConfig:
    """The Python API's arguments checked as the command's config (:class:`IngestCommandConfig`: its checks,
    written once, name the flags), before anything is read; the data set's own config (validated)."""
    from dataclasses import fields

    values = {f.name: getattr(config, f.name) for f in fields(IngestConfig)}
    values.update(
        out=str(out_dir),
        files=[str(f) for f in files or ()],
        list_csv=None if list_csv is None else str(list_csv),
        labels_csv=None if labels_csv is None else str(labels_csv),
        skip_bad=skip_bad,
    )
    try:
        cmd = from_dict(IngestCommandConfig, values, FLAGS)
    except ConfigError as exc:
        raise ConfigError(name_flags(str(exc), IngestCommandConfig)) from None
    cmd.check_complete()
    return cmd.grid()


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

    cfg = check_args(out_dir, files, list_csv, labels_csv, config or IngestConfig(), skip_bad)
    entries = [(str(f), None, {}) for f in files] if files else read_catalog(list_csv)
    objs = make_objects(entries, cfg, list_csv)
    n_labelled = read_labels(labels_csv, objs) if labels_csv else 0
    check_names(objs)
    if cfg.psf:
        read_psf(cfg.psf, "--psf")
    comm, rank, size = mpi_world()

    bad, seen = _check_inputs(objs, cfg, comm, rank, size, progress)
    if bad and not skip_bad:
        first = min(bad)
        more = f" (and {len(bad) - 1} more bad input(s); --skip-bad leaves them out)" if len(bad) > 1 else ""
        raise UserError(bad[first] + more)
    if rank == 0:
        for i in sorted(bad):
            print(f"ingest: warning: skipping {bad[i]}", file=sys.stderr, flush=True)
    good = [i for i in range(len(objs)) if i not in bad]
    if not good:
        raise UserError(f"ingest: none of the {len(objs)} input(s) is usable")
    if rank == 0:
        _warn_once(objs, good, seen, cfg.target_pixel_scale_arcsec)

    resolved = replace(cfg, num_pix=cfg.target_num_pix, pixel_scale_arcsec=cfg.target_pixel_scale_arcsec)
    config = to_dict(resolved)
    kept = [[objs[i].path, objs[i].member, objs[i].name, objs[i].psf] for i in good]
    labels = {str(i): {"labels": objs[i].labels, "catalog": objs[i].catalog} for i in good}
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
        "config_hash": sha256_json({"config": config, "inputs": kept, "labels": labels}),
    }
    # the inputs' contents, by resolved path: compared on a rerun (shards.writer.check_existing), so a file
    # edited between a killed run and its rerun is named and refused, never kept as stale shards
    plan["inputs"] = {"cutouts": {str(Path(objs[i].path).resolve()): seen[i]["sha256"] for i in good}}
    psfs = {
        str(Path(find_psf(objs[i].path, objs[i].psf or cfg.psf)).resolve()): seen[i]["psf_sha256"]
        for i in good
        if seen[i]["psf_sha256"]
    }
    if psfs:
        plan["inputs"]["psfs"] = psfs
    plan["inputs_sha256"] = sha256_json(plan["inputs"])
    out = Path(out_dir)
    check_existing(out, plan)
    shards = ShardPlan(len(good), cfg.shard_size)
    manifest = write_shard_set(out, plan, shards, progress, "ingest", _write_one(out, cfg, objs, good, shards))
    if rank == 0:
        print(
            f"ingest: {len(good)} of {len(objs)} input(s) on a {resolved.num_pix}x{resolved.num_pix} grid "
            f'of {resolved.pixel_scale_arcsec}"/px ({cfg.orientation} orientation), {n_labelled} labelled, '
            f"{len(bad)} skipped as bad",
            flush=True,
        )
    return manifest
