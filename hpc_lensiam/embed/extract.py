"""Backbone features of every image in a shard set, from every rank, joined into one HDF5 file.

``torchrun --nproc_per_node P -m hpc_lensiam embed --checkpoint C --data DIR --out emb.h5``

Rank ``r`` of ``W`` embeds shards ``r::W`` (every sample exactly once, no collective inside the
loop, so uneven shares cannot hang), writes ``emb.partR.h5`` atomically, and after a barrier rank 0
joins the parts in a fixed order (sorted by sample key, then view) into ``emb.h5`` through a
temporary name and a rename, then deletes the parts. A rerun with the same weights (sha256) and
the same data (manifest sha256) finds the finished file and does nothing; a rank whose part is
already complete from an interrupted run reuses it.

HDF5 layout (``FORMAT``), N rows = images (lensiam shards: 2 per sample, single shards: 1)::

    features        (N, D) float32   backbone output (D = 512 resnet18, 2048 resnet50/101)
    keys            (N,)   str       webdataset sample key, e.g. "000003_000017" (ingested: the object name, sanitised)
    name            (N,)   str       the object's name (params.json ``name``: ingested images), else the key
    catalog         (N,)   str       JSON of the columns ingest kept (params.json ``catalog``), "{}" for none
    source          (N,)   str       the data folder of the row, as given to --data (several may be)
    view            (N,)   int8      1 or 2 (which image of the pair; single shards: 1)
    pair_id         (N,)   int64     index of the lens system (sorted unique keys): both views share it
    params/<name>   (N,)   float64   the 8 lens parameters (io.LENS_PARAMS), same for both views;
                                     a parameter no image has (ingested real images) is left out,
                                     one some images lack is 0 there with params_known/<name> False
    params/is_lens  (N,)   int8      1 lens, 0 non-lens: only when every sample's params.json has is_lens
                                     (survey family, docs/survey.md; ingested images labelled with it)
    umap            (N, 2) float32   added later by ``hpc-lensiam umap``
    attrs: format, checkpoint, weights_sha256 (of the backbone weights), step, arch, train_mode, config_hash,
           data_dir, data_mode, manifest_sha256, num_samples, num_images, feature_dim, world_size,
           precision (fp32 on a CPU; bf16, or fp16 without native bf16, on a GPU: autocast). A rerun
           counts as up to date only with the same weights, data manifest and precision.
           training_grid / data_grids (JSON: the backbone's training pixel grid, each folder's)

``table=`` (``embed --table T.csv|.fits``) also writes one row per image (name, key, source, view, file,
the kept catalogue columns, the known labels) with astropy, for a catalogue tool.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_path, check_output_file, sha256_file, sha256_json
from ..core.runtime import ControlGroup
from ..shards.integrity import check_shards, shard_samples
from ..shards.manifest import LENS_PARAMS, MANIFEST_NAME, data_grid, read_manifest, shard_paths
from ..shards.reader import LABELS, image_rows, views_of
from .config import EmbedConfig

FORMAT = "hpc_lensiam.embeddings/1"


# ----------------------------------------------------------------------------------- shard reading
def _collate(rows):
    keys, views, images, lens, *meta = zip(*rows)
    out = list(keys), np.array(views, np.int8), np.stack(images).astype(np.float32), np.stack(lens)
    return (*out, [_identity(p) for p in meta[0]]) if meta else out


def _identity(params: dict) -> str:
    """What a row carries of its object beyond labels, as JSON: name, catalogue columns, source file."""
    kept = params.get("catalog") if isinstance(params.get("catalog"), dict) else {}
    ingest = params.get("ingest") if isinstance(params.get("ingest"), dict) else {}
    out = {"name": params.get("name"), "catalog": kept, "file": ingest.get("file")}
    return json.dumps({k: v for k, v in out.items() if v})


def checked_samples(sizes: dict[str, int]):
    """webdataset stage: shard urls -> their samples, each shard read by the package's tar reader
    (end-of-archive required) and held to its manifest sample count (``sizes[url]``)."""

    def read(urls):
        for d in urls:
            yield from shard_samples(d["url"], sizes.get(d["url"]))

    return read


def row_loader(
    paths: list[str],
    mode: str,
    batch_size: int,
    workers: int,
    sizes: dict[str, int] | None = None,
    timeout: float | None = None,
    with_identity: bool = False,
):
    """Batches (keys, views, images (B,H,W) float32, lens (B,8)) over ``paths``, in shard order
    with ``workers`` <= 1 (several workers interleave shards; the join sorts anyway); with
    ``with_identity`` a fifth item, each row's name / catalogue / file as JSON (:func:`_identity`).
    A damaged shard found by a worker is one line naming the shard and the sample, and so is a worker
    that dies, or hands over no batch for ``timeout`` s (default ``LOADER_TIMEOUT``; ``worker_batches``)."""
    import torch
    import webdataset as wds

    from ..data.loader import LOADER_TIMEOUT, handover_buffer, init_worker, worker_batches

    workers = max(0, min(workers, len(paths)))
    ds = wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        checked_samples(sizes or {}),
        image_rows(mode, with_params=with_identity),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    # torch's DataLoader itself, not wds.WebLoader: its iterator hides _shutdown_workers
    handover_buffer()
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=init_worker,
        timeout=(LOADER_TIMEOUT if timeout is None else timeout) if workers else 0,
    )
    return worker_batches(loader, "embed")


# ------------------------------------------------------------------------------------ distribution
def _device():
    """This rank's device, by the same rule as training (hpc_lensiam.core.runtime)."""
    import torch

    from ..core.runtime import device_for, runtime

    device = device_for(runtime(command="embed"), exclusive=False)  # gloo: ranks may share a GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def embed_precision(device) -> str:
    """What the features are computed in on ``device``: fp32 on a CPU, the autocast dtype on a GPU
    (bf16 where native, else fp16: :func:`hpc_lensiam.train.plan.inference_dtype`)."""
    import torch

    from ..core.runtime import DeviceCaps, inference_dtype

    dtype = inference_dtype(DeviceCaps.detect(device))
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------------------------------- HDF5 io
def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.part{rank}{out.suffix or '.h5'}")


def _write_part(path: Path, run_id: str, shards: list, keys, views, feats, lens, sources, ident=None) -> None:
    import h5py

    sources = np.asarray(sources, np.int32)
    order = np.lexsort((views, np.array(keys, dtype=object).astype(str), sources)) if keys else np.zeros(0, int)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["run_id"], f.attrs["shards"] = run_id, json.dumps(shards)
            f["features"] = feats[order]
            f.create_dataset("keys", data=np.array(keys, dtype=object)[order], dtype=_str_dtype())
            f["view"] = np.asarray(views, np.int8)[order]
            f["lens"] = lens[order]
            f["source"] = sources[order]
            ident = ident if ident is not None else ["{}"] * len(keys)
            f.create_dataset("ident", data=np.array(ident, dtype=object)[order], dtype=_str_dtype())


def _str_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def _part_done(path: Path, run_id: str, shards: list) -> bool:
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("run_id") == run_id and json.loads(f.attrs.get("shards", "[]")) == shards
    except (OSError, ValueError):
        return False


def _join(
    out: Path, parts: list[Path], run_id: str, attrs: dict, expected_rows: int, sources: list[str], block: int = 8192
) -> int:
    """Merge sorted parts into ``out`` (atomic), ordered by (source, key, view); return the row count."""
    import h5py

    files = [h5py.File(p, "r") for p in parts]
    try:
        for p, f in zip(parts, files):
            if f.attrs.get("run_id") != run_id:
                raise RuntimeError(f"{p}: part of another run (stale file); remove it and rerun")
        keys = [f["keys"].asstr()[...] for f in files]
        views = [f["view"][...] for f in files]
        srcs = [f["source"][...] for f in files]
        owner = np.concatenate([np.full(len(k), i) for i, k in enumerate(keys)]) if keys else np.zeros(0)
        row = np.concatenate([np.arange(len(k)) for k in keys])
        all_keys = np.concatenate(keys).astype(str)
        all_views = np.concatenate(views)
        all_srcs = np.concatenate(srcs)
        n = len(all_keys)
        if n != expected_rows:
            raise RuntimeError(f"embed: joined {n} images, expected {expected_rows}: shards changed under us?")
        order = np.lexsort((all_views, all_keys, all_srcs))
        pairs = set(zip(all_srcs.tolist(), all_keys.tolist(), all_views.tolist()))
        if len(pairs) != n:
            raise RuntimeError("embed: an image was embedded twice (duplicate key and view across parts)")
        k_sorted, s_sorted = all_keys[order], all_srcs[order]
        new_system = np.ones(n, bool)  # sorted by (source, key): a system starts where either changes
        new_system[1:] = (k_sorted[1:] != k_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
        pair_id = np.cumsum(new_system) - 1
        dim = files[0]["features"].shape[1]
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as g:
                for k, v in attrs.items():
                    g.attrs[k] = v
                feats = g.create_dataset(
                    "features", (n, dim), np.float32, chunks=(max(1, min(n, 1024)), dim) if n else None
                )
                g.create_dataset("keys", data=all_keys[order].astype(object), dtype=_str_dtype())
                g.create_dataset("source", data=np.array(sources, dtype=object)[s_sorted], dtype=_str_dtype())
                g["view"] = all_views[order].astype(np.int8)
                g["pair_id"] = pair_id.astype(np.int64)
                ident = np.concatenate([f["ident"].asstr()[...] for f in files]).astype(object)[order]
                parsed = [json.loads(t) for t in ident]
                names = [str(d.get("name") or k) for d, k in zip(parsed, k_sorted)]
                g.create_dataset("name", data=np.array(names, dtype=object), dtype=_str_dtype())
                cats = [
                    json.dumps({**d.get("catalog", {}), **({"file": d["file"]} if d.get("file") else {})})
                    for d in parsed
                ]
                g.create_dataset("catalog", data=np.array(cats, dtype=object), dtype=_str_dtype())
                lens = np.empty((n, files[0]["lens"].shape[1]))
                src_owner, src_row = owner[order], row[order]
                for a in range(0, n, block):  # each part's rows in a block are one contiguous range
                    b = min(n, a + block)
                    buf = np.empty((b - a, dim), np.float32)
                    for i, f in enumerate(files):
                        sel = np.nonzero(src_owner[a:b] == i)[0]
                        if len(sel):
                            lo, hi = src_row[a + sel[0]], src_row[a + sel[-1]] + 1
                            assert hi - lo == len(sel)
                            buf[sel] = f["features"][lo:hi]
                            lens[a + sel] = f["lens"][lo:hi]
                    feats[a:b] = buf
                _write_params(g, lens)
                g.attrs["num_images"] = n
                g.attrs["num_samples"] = int(new_system.sum())
        return n
    finally:
        for f in files:
            f.close()


def _write_params(g, lens: np.ndarray) -> None:
    """params/<name> without NaN: a parameter no row knows is left out (listed in the attribute
    ``missing_params``); one that some rows lack is 0 there, with ``params_known/<name>`` False."""
    grp = g.create_group("params")
    missing = []
    for j, name in enumerate(LENS_PARAMS):
        known = np.isfinite(lens[:, j])
        if not known.any() and len(known):
            missing.append(name)
            continue
        grp[name] = np.where(known, lens[:, j], 0.0)
        if not known.all():
            g.require_group("params_known")[name] = known
    g.attrs["missing_params"] = json.dumps(missing)
    if lens.shape[1] > len(LENS_PARAMS) and len(lens) and not np.isnan(lens[:, len(LENS_PARAMS)]).any():
        grp["is_lens"] = lens[:, len(LENS_PARAMS)].astype(np.int8)


def load_embeddings(path: str | os.PathLike, need_params: bool = True) -> dict:
    """Read an embeddings file: features, keys, view, pair_id, params {name: array}, attrs, umap,
    is_lens (int8 array, or None when the file has no params/is_lens).

    A missing file, a file that is not HDF5, or one without features (or, with ``need_params``,
    without the 8 lens parameters) is a UserError naming it.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: embeddings file not found (make one with `hpc-lensiam embed`)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path}: not an HDF5 file (expected the output of `hpc-lensiam embed`)") from None
    with f:
        if "features" not in f or f["features"].ndim != 2:
            raise UserError(f"{path}: no 2-D 'features' dataset (expected the output of `hpc-lensiam embed`)")
        if f["features"].shape[1] == 0:  # every cosine, distance and fit on it is meaningless
            raise UserError(
                f"{path}: 'features' has shape {f['features'].shape}, no feature columns "
                "(expected the output of `hpc-lensiam embed`)"
            )
        n = f["features"].shape[0]
        out = {"path": str(path), "features": f["features"][...].astype(np.float32, copy=False), "attrs": dict(f.attrs)}
        out["keys"] = f["keys"].asstr()[...] if "keys" in f else np.array([str(i) for i in range(n)])
        bad = ~np.isfinite(out["features"]).all(axis=1)
        if bad.any():
            raise UserError(
                f"{path}: {int(bad.sum())} row(s) with non-finite features (first: key "
                f"{out['keys'][int(np.argmax(bad))]!r}); re-embed them with `hpc-lensiam embed`"
            )
        out["view"] = f["view"][...] if "view" in f else np.ones(n, np.int8)
        if "pair_id" in f:
            out["pair_id"] = f["pair_id"][...]
        else:
            out["pair_id"] = np.unique(out["keys"], return_inverse=True)[1]
        out["umap"] = f["umap"][...] if "umap" in f else None
        out["source"] = f["source"].asstr()[...] if "source" in f else np.full(n, "", dtype=object)
        out["name"] = f["name"].asstr()[...] if "name" in f else out["keys"]
        out["catalog"] = f["catalog"].asstr()[...] if "catalog" in f else np.full(n, "{}", dtype=object)
        out["params_known"] = (
            {name: f["params_known"][name][...] for name in f["params_known"]} if "params_known" in f else {}
        )
        params = {}
        if "params" in f:
            params = {name: f["params"][name][...] for name in f["params"] if name in LENS_PARAMS}
        missing = [p for p in LENS_PARAMS if p not in params]
        if need_params and missing:
            raise UserError(
                f"{path}: no lens parameters (missing params/{', params/'.join(missing)}); "
                "expected an embeddings file written by `hpc-lensiam embed`"
            )
        for name, arr in params.items():
            if len(arr) != n:
                raise UserError(f"{path}: params/{name} has {len(arr)} rows, features {n}")
        out["params"] = params
        out["is_lens"] = f["params"]["is_lens"][...].astype(np.int8) if "params/is_lens" in f else None
    return out


# ----------------------------------------------------------------------------------------- embed
def _shard_jobs(dirs: list[str]):
    """[(source index, shard path, mode, images in it)] over every folder, and the manifests."""
    jobs, manifests = [], []
    for k, d in enumerate(dirs):
        manifest = read_manifest(d)
        n_views = len(views_of(manifest["mode"]))
        for p, entry in zip(shard_paths(d, manifest), manifest["shards"]):
            if not Path(p).is_file():
                raise UserError(f"{p}: shard listed in {d}/manifest.json is missing")
            jobs.append((k, p, manifest["mode"], int(entry["num_samples"]) * n_views))
        manifests.append(manifest)
    return jobs, manifests


def extract_embeddings(
    checkpoint: str | None = None,
    data_dir: str | list[str] | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    verify: bool | None = None,
    arch: str | None = None,
    seed: int | None = None,
    loader_timeout: float | None = None,
    table: str | None = None,
    config: EmbedConfig | None = None,
) -> dict:
    """Embed every image of ``data_dir`` (one shard folder, or several into one file with a
    ``source`` column) with the checkpoint's backbone into HDF5 ``out``.

    ``checkpoint="none"``: a random-weight ``arch`` backbone drawn from ``seed`` (default 0), the
    no-pretraining reference a probe compares trained features against. ``arch`` with a checkpoint:
    the arch it must hold. Runs as one process or as every rank of ``torchrun``; returns the
    output's attributes. ``loader_timeout``: seconds to wait for one batch from the loader's workers
    (default ``data.loader.LOADER_TIMEOUT``), then a one-line error instead of a hang.
    """
    from ..models.weights import load_backbone, random_backbone

    if config is None:  # the Python API's arguments (None: the config's default), validated once
        if isinstance(data_dir, (str, os.PathLike)):
            data_dir = [data_dir]
        data = [str(d) for d in data_dir] if data_dir is not None else None
        config = from_flags(
            EmbedConfig,
            dict(
                checkpoint=None if checkpoint is None else str(checkpoint),
                data=data,
                out=None if out is None else str(out),
                batch_size=batch_size,
                workers=workers,
                verify=verify,
                arch=arch,
                seed=seed,
                loader_timeout=loader_timeout,
                table=None if table is None else str(table),
            ),
        )
    c = config
    checkpoint, out, batch_size, workers, verify = c.checkpoint, Path(c.out), c.batch_size, c.workers, c.verify
    arch, seed, loader_timeout, table = c.arch, c.seed, c.loader_timeout, c.table
    random_weights = str(checkpoint).lower() == "none"
    dirs = list(c.data)
    resolved = [str(Path(d).resolve()) for d in dirs]
    if not dirs or len(set(resolved)) != len(dirs):
        raise UserError(f"--data: expected one or more different shard folders, got {dirs}")
    jobs, manifests = _shard_jobs(dirs)
    modes = [m["mode"] for m in manifests]
    shas = [sha256_file(Path(d) / MANIFEST_NAME) for d in dirs]
    manifest_sha = shas[0] if len(dirs) == 1 else sha256_json(shas)
    num_samples = sum(int(m["num_samples"]) for m in manifests)
    num_images = sum(j[3] for j in jobs)
    for d, m in zip(dirs, manifests):
        check_shards(d, m, verify=verify)
    check_output_file(out, "--out")
    if table is not None:
        from ..downstream.predict import TABLE_SUFFIXES

        if Path(table).suffix not in TABLE_SUFFIXES:
            raise UserError(f"--table {table}: expected a file ending in {' or '.join(TABLE_SUFFIXES)}")
        check_output_file(table, "--table")

    world = ControlGroup(command="embed")
    try:
        start = time.perf_counter()
        if random_weights:  # same seed -> same weights on every rank
            side = (manifests[0].get("image_shape") or [None])[-1]
            backbone, info = random_backbone(arch or "resnet18", 0 if seed is None else seed, side)
        else:  # same bad checkpoint -> same UserError on every rank
            backbone, info = load_backbone(checkpoint, arch)
        attrs = {
            "format": FORMAT,
            "checkpoint": info["checkpoint"],
            "weights_sha256": info["weights_sha256"],
            "step": int(info["step"]),
            "arch": info["arch"],
            "train_mode": info["mode"],
            "config_hash": info["config_hash"],
            "data_dir": resolved[0] if len(dirs) == 1 else json.dumps(resolved),
            "data_dirs": json.dumps(resolved),
            "sources": json.dumps(dirs),
            "data_mode": "+".join(dict.fromkeys(modes)),
            "manifest_sha256": manifest_sha,
            "feature_dim": int(info["feature_dim"]),
            "views": max(len(views_of(m)) for m in modes),
            "precision": embed_precision(_device()),  # bf16/fp16 GPU features are not an fp32 rerun's
        }
        grids = [data_grid(d) for d in dirs]
        attrs["training_grid"] = json.dumps(info.get("training_grid"))
        attrs["data_grids"] = json.dumps(grids)
        if world.rank == 0:
            for d, g in zip(dirs, grids):
                if (w := grid_mismatch(g, info.get("training_grid"))) is not None:
                    print(f"embed: warning: --data {d}: {w}", file=sys.stderr, flush=True)
        if world.bcast(_same_run(out, attrs) if world.rank == 0 else None):
            if world.rank == 0:
                print(
                    f"embed: {out} is up to date (same weights sha256 {attrs['weights_sha256'][:12]}, "
                    f"step {attrs['step']}, same data manifest); nothing to do",
                    flush=True,
                )
                if table is not None:
                    write_embedding_table(out, table)
            return attrs
        attrs["world_size"] = world.size
        run_id = sha256_json({k: attrs[k] for k in ("weights_sha256", "manifest_sha256", "world_size", "precision")})

        mine = [list(j[:3]) for j in jobs[world.rank :: world.size]]
        part = part_path(out, world.rank)
        n_mine = sum(j[3] for j in jobs[world.rank :: world.size])
        if _part_done(part, run_id, mine):
            print(f"embed: rank {world.rank} reuses its complete part {part}", flush=True)
        else:
            sizes = {j[1]: j[3] // len(views_of(j[2])) for j in jobs}  # samples per shard, as listed
            _embed_part(
                backbone,
                mine,
                batch_size,
                workers,
                part,
                run_id,
                n_mine,
                progress and world.rank == 0,
                info["feature_dim"],
                sizes,
                loader_timeout,
            )
        world.barrier()
        result = attrs
        if world.rank == 0:
            parts = [part_path(out, r) for r in range(world.size)]
            n = _join(out, parts, run_id, attrs, num_images, dirs)
            for p in parts:
                p.unlink(missing_ok=True)
            dt = time.perf_counter() - start
            per = ", ".join(f"{m['num_samples']} x {len(views_of(m['mode']))}" for m in manifests)
            print(
                f"embed: {n} images ({num_samples} samples x {attrs['views']} view(s)) of "
                f"{len(jobs)} shards{f' in {len(dirs)} folders ({per})' if len(dirs) > 1 else ''}, "
                f"{attrs['arch']} step {attrs['step']}, {attrs['feature_dim']}-d "
                f"features, {world.size} rank(s) in {dt:.1f} s ({n / max(dt, 1e-9):.1f} images/s) "
                f"-> {out}",
                flush=True,
            )
            result = {**attrs, "num_images": n, "num_samples": num_samples}
            if table is not None:
                write_embedding_table(out, table)
        world.barrier()  # nobody leaves (or reruns) before the joined file exists
        return result
    finally:
        world.close()


def _same_run(out: Path, attrs: dict) -> bool:
    import h5py

    if not out.is_file():
        return False
    try:
        with h5py.File(out, "r") as f:
            return (
                all(
                    f.attrs.get(k) == attrs[k]
                    for k in ("format", "weights_sha256", "step", "manifest_sha256", "arch", "precision")
                )
                and "features" in f
            )
    except OSError:
        return False


def _embed_part(backbone, jobs, batch_size, workers, part, run_id, n_rows, show, dim, sizes, timeout=None):
    """Embed this rank's shards (``jobs``: [source index, path, mode]), folder by folder."""
    import contextlib
    import itertools

    import torch

    from ..core.runtime import DeviceCaps, inference_dtype

    device = _device()
    model = backbone.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        amp = inference_dtype(DeviceCaps.detect(device))  # bf16 only where native (not V100/T4's emulation)
    keys, views, lens, sources, ident = [], [], [], [], []
    feats = np.empty((n_rows, dim), np.float32)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=n_rows, unit="img", desc="embed (rank 0)", dynamic_ncols=True, file=sys.stderr)
    groups = [(src, mode, [j[1] for j in js]) for (src, mode), js in itertools.groupby(jobs, lambda j: (j[0], j[2]))]
    batches = itertools.chain.from_iterable(
        ((src, b) for b in row_loader(paths, mode, batch_size, workers, sizes, timeout, with_identity=True))
        for src, mode, paths in groups
    )
    i = 0
    with torch.inference_mode(), contextlib.nullcontext() if bar is None else bar:  # an error starts its own line
        for src, (k, v, img, p, who) in batches:
            # (the DataLoader turns numpy batches into tensors)
            x = torch.as_tensor(img).unsqueeze(1).to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=amp):
                    y = model(x)
            else:
                y = model(x)
            y = y.float().cpu().numpy()
            finite = np.isfinite(y).all(axis=1)
            if not finite.all():  # finite input (checked at read), so the weights: never a NaN row
                first = int(np.argmin(finite))
                raise UserError(
                    f"the backbone gives non-finite features for sample {k[first]!r} (view {v[first]}) "
                    f"of {[j[1] for j in jobs]}: its weights hold NaN/inf"
                )
            if i + len(y) > n_rows:
                raise RuntimeError(f"embed: shards hold more images than their manifest says ({jobs})")
            feats[i : i + len(y)] = y
            i += len(y)
            keys += k
            views.append(np.asarray(v, np.int8))
            lens.append(np.asarray(p, np.float64))
            sources += [src] * len(y)
            ident += who
            if bar:
                bar.update(len(y))
    views = np.concatenate(views) if views else np.zeros(0, np.int8)
    lens = np.concatenate(lens) if lens else np.zeros((0, len(LABELS)))
    _write_part(part, run_id, jobs, keys, views, feats[:i], lens, sources, ident)


GRID_TOLERANCE = 0.01  # relative pixel-scale difference taken as the same grid (as predict)


def grid_mismatch(grid: dict, trained: dict | None) -> str | None:
    """Why a data folder's pixel grid is not the backbone's training grid, or None (same, or unknown)."""
    if not trained:
        return None
    problems = []
    a, b = grid.get("pixel_scale_arcsec"), trained.get("pixel_scale_arcsec")
    if a is not None and b is not None and abs(a - b) > GRID_TOLERANCE * b:
        problems.append(f'{a:g}"/px, the backbone was trained on {b:g}"/px ({a / b:.3g}x)')
    s, t = grid.get("image_shape"), trained.get("image_shape")
    if s and t and list(s) != list(t):
        problems.append(f"images {s[0]}x{s[1]} px, trained on {t[0]}x{t[1]}")
    if not problems:
        return None
    return (
        "another pixel grid than the backbone's training data (" + "; ".join(problems) + "): a lens of one size "
        "looks like another size to it; neighbours and probes compare such features as they are, "
        "`predict` refuses them"
    )


def write_embedding_table(h5: str | os.PathLike, table: str) -> str:
    """One row per image of an embeddings file (name, key, source, view, the kept catalogue columns,
    the known labels) as CSV or FITS (astropy Table, missing values masked)."""
    import h5py

    from ..downstream.predict import write_table

    with h5py.File(h5, "r") as f:  # everything but the features (8 GB at 10^6 x 2048)
        e = {k: f[k].asstr()[...] for k in ("keys", "name", "source", "catalog") if k in f}
        e.setdefault("name", e["keys"])  # a file from before names were kept
        e.setdefault("source", np.full(len(e["keys"]), "", dtype=object))
        e.setdefault("catalog", np.full(len(e["keys"]), "{}", dtype=object))
        e["view"] = f["view"][...]
        e["params"] = {p: f["params"][p][...] for p in f["params"] if p in LENS_PARAMS} if "params" in f else {}
        e["params_known"] = {p: f["params_known"][p][...] for p in f["params_known"]} if "params_known" in f else {}
        e["is_lens"] = f["params"]["is_lens"][...] if "params/is_lens" in f else None
    rows = []
    for i in range(len(e["keys"])):
        row = {
            "name": str(e["name"][i]),
            "key": str(e["keys"][i]),
            "source": str(e["source"][i]),
            "view": int(e["view"][i]),
        }
        kept = json.loads(e["catalog"][i] or "{}")
        row.update({k: v for k, v in kept.items() if k not in row and not isinstance(v, (dict, list))})
        for p, v in e["params"].items():
            known = e["params_known"].get(p)
            row[p] = float(v[i]) if known is None or known[i] else None
        if e["is_lens"] is not None:
            row["is_lens"] = int(e["is_lens"][i])
        rows.append(row)
    write_table(rows, str(table))
    print(f"embed: table of {len(rows)} rows -> {table}", flush=True)
    return str(table)
