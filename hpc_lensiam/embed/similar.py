"""``hpc-lensiam similar``: images like a given one by cosine similarity, and the most isolated ones.

``similar --embeddings emb.h5 (--key KEY [--data-dir DIR] | --image FILE --checkpoint CKPT | --anomaly)
[-k 16] [--out grid.png] [--json out.json]``

- Vectors: the file's features minus their mean (backbone features are post-ReLU averages, all
  positive, so raw cosines crowd near 1), l2-normalised, float32. Cosine similarity = inner product.
- Search: faiss ``IndexFlatIP`` (exact). ``--anomaly`` queries every row, O(N^2 D) exactly; above
  ``IVF_MIN_ROWS`` rows it uses an ``IndexIVFFlat`` (``4 sqrt(N)`` lists, ``nprobe`` 16), which
  ``bench/similar.py`` measures against exact search (recall and speed).
- ``--key`` queries with a row of the file (view 1 of a pair) and leaves out the query's own
  lens system (its other view would rank first); ``--image`` ingests a FITS/.npy cutout onto the
  grid of the file's first data folder (:mod:`hpc_lensiam.ingest`) and embeds it with the
  checkpoint, which must be the one the file was made with (weights sha256).
- ``--anomaly`` ranks every image by its cosine distance (1 - similarity) to its k-th nearest
  neighbour outside its own lens system: large = unlike anything else in the set.
- ``--key`` takes a sample key or an object name (ingested images: the name kept in params.json); it
  needs ``--data-dir`` only when several folders hold it.
- Output: a table on stdout, ``--json`` (atomic), ``--table`` CSV and/or FITS (astropy Table: one row
  per image with its name, source folder, file and the catalogue columns ingest kept), ``--out`` a PNG
  grid of the query and its neighbours (or the top anomalies), images read back from the shards by
  key, captioned.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_write_json, check_output_file
from ..shards.manifest import read_manifest
from .config import SimilarConfig
from .extract import load_embeddings

IVF_MIN_ROWS = 50_000  # --anomaly switches from exact to IVF search above this many rows
IVF_NPROBE = 16
IVF_TRAIN_PER_LIST = 40  # k-means sample: vectors per IVF list (faiss wants >= 39)


# ------------------------------------------------------------------------------------ vectors


def unit_vectors(features: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Mean-centred, l2-normalised float32 copy (C-contiguous, what faiss wants)."""
    x = np.array(features, dtype=np.float32, order="C")
    x -= x.mean(0) if mean is None else mean
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def openblas_coretype(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The OpenBLAS kernel name for this x86 CPU from its flags (SkylakeX: AVX-512; Haswell: AVX2 + FMA),
    or None where the flags do not say (another architecture, or no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def import_faiss():
    """``faiss``, with its bundled OpenBLAS on this CPU's kernel.

    faiss-cpu's wheel bundles OpenBLAS 0.3.15, which does not recognise recent x86 CPUs and falls back
    to a generic kernel: on an AVX-512 machine its matrix products (IVF training and assignment, flat
    search of batches) ran at 12-14 GFLOP/s per core against 50-64 with the right kernel
    (docs/real_images.md). OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so it is
    set from the CPU's own flags just for faiss's first import (a value the user set is kept), then
    removed again: numpy's OpenBLAS, already loaded, and child processes are not affected."""
    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ and (kernel := openblas_coretype()):
        os.environ["OPENBLAS_CORETYPE"] = kernel
        try:
            import faiss
        finally:
            del os.environ["OPENBLAS_CORETYPE"]
    import faiss

    return faiss


def build_index(x: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = IVF_NPROBE):
    """faiss inner-product index over unit vectors ``x``: ``flat`` (exact) or ``ivf``.

    ``x`` may be a read-only memory map (``bench/similar.py`` passes one): faiss copies the vectors
    into the index (IVF adds them 65536 at a time), so the index is the only full copy in memory."""
    faiss = import_faiss()

    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(len(x))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = x[np.sort(rng.choice(len(x), min(len(x), IVF_TRAIN_PER_LIST * nlist), replace=False))]
        index.train(train)
        index.nprobe = min(nprobe, nlist)
    else:
        raise UserError(f"--index: {kind!r} is not one of flat, ivf, auto")
    index.add(x)
    return index


def anomaly_scores(
    x: np.ndarray, pair_id: np.ndarray, k: int, kind: str = "auto", batch: int = 4096, progress: bool = True
) -> tuple[np.ndarray, str]:
    """Cosine distance of every row to its k-th nearest row of another lens system; (scores, index kind)."""
    kind = ("ivf" if len(x) > IVF_MIN_ROWS else "flat") if kind == "auto" else kind
    index = build_index(x, kind)
    per_system = int(np.bincount(pair_id).max())  # self and its other views come back first: skip them
    want = min(len(x), k + per_system)
    scores = np.empty(len(x), np.float32)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(
            total=len(x), unit="img", desc="similar --anomaly", dynamic_ncols=True, file=sys.stderr, disable=None
        )
    for a in range(0, len(x), batch):
        sims, idx = index.search(x[a : a + batch], want)
        own = (idx < 0) | (pair_id[np.clip(idx, 0, None)] == pair_id[a : a + batch, None])
        sims = np.where(own, -np.inf, sims)
        kth = -np.sort(-sims, axis=1)[:, k - 1]
        scores[a : a + batch] = 1.0 - kth
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return scores, kind


# -------------------------------------------------------------------------------------- images
def source_dirs(emb: dict) -> dict[str, str]:
    """source name (as in the file's ``source`` column) -> shard folder."""
    a = emb["attrs"]
    dirs = json.loads(a["data_dirs"]) if "data_dirs" in a else [str(a.get("data_dir", ""))]
    names = json.loads(a["sources"]) if "sources" in a else [""]
    return dict(zip(names, dirs))


class ShardImages:
    """Images and params.json read back from shards by (folder, key, view), one shard at a time
    (:class:`hpc_lensiam.shards.reader.SamplesByKey`)."""

    def __init__(self):
        from ..shards.reader import SamplesByKey

        self._samples = SamplesByKey()

    def get(self, data_dir: str, key: str, view: int) -> tuple[np.ndarray, dict]:
        from ..shards.integrity import decode_member

        sample = self._samples.get(data_dir, key)
        name = next(n for n in (f"view{view}.npy", "image.npy") if n in sample)
        image = decode_member(sample[name], sample.get("__url__", data_dir), key, name)
        return image, json.loads(sample["params.json"])


def _caption(rank: int | None, sim: float | None, key: str, params: dict, label: str = "") -> str:
    from ..shards.show import caption

    head = label or (f"#{rank}  cos {sim:.3f}" if rank is not None else "")
    return "\n".join(t for t in (head, key, caption(params)) if t)


def _panel(img: np.ndarray, cap: str, params: dict, view: int, scale: float | None) -> dict:
    """One figure panel: the image, its caption, its noise sigma and pixel scale (hpc_lensiam.shards.display)."""
    from ..shards.display import noise_sigma

    return {"image": img, "caption": cap, "sigma": noise_sigma(img, params, view)[0], "pixel_scale": scale}


def _pixel_scales(dirs: dict[str, str]) -> dict[str, float | None]:
    """source name -> arcsec/pixel of its shard set (None where the manifest cannot be read)."""
    from ..shards.display import pixel_scale_of

    out = {}
    for name, d in dirs.items():
        try:
            out[name] = pixel_scale_of(read_manifest(d))
        except UserError:
            out[name] = None
    return out


def draw_grid(panels: list[dict], out: str, title: str, stretch: str = "asinh") -> None:
    """The query and its neighbours (or the top anomalies): :func:`hpc_lensiam.shards.display.draw_panels`."""
    from ..shards.display import describe, draw_panels

    draw_panels(panels, out, f"{title}; {describe(stretch)}", stretch, max_cols=6, dpi=110)


# --------------------------------------------------------------------------------------- query
def _row_of(emb: dict, key: str, source: str | None) -> int:
    """The view-1 row of a sample key or an object name, in ``source`` if given."""
    rows = np.nonzero(((emb["keys"] == key) | (emb["name"] == key)) & (emb["view"] == 1))[0]
    if source is not None:
        rows = rows[emb["source"][rows] == source]
    if len(rows) == 0:
        where = f" in source {source!r}" if source is not None else ""
        raise UserError(
            f"--key {key}: no such sample or object name{where} in {emb['path']} "
            f"(keys look like {emb['keys'][0]!r}; sources: {', '.join(sorted(set(emb['source'])))})"
        )
    if len(rows) > 1:
        raise UserError(
            f"--key {key}: in several sources ({', '.join(emb['source'][rows])}); add --data-dir with one of them"
        )
    return int(rows[0])


def embed_image(
    emb: dict, image: str, checkpoint: str, hdu: str | None, pixel_scale: float | None, orientation: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(feature vector, the ingested image, its ingest metadata) on the grid of the file's data."""
    import torch

    from ..core.config import from_dict
    from ..ingest.config import IngestConfig
    from ..ingest.prepare import prepare
    from ..models.weights import load_backbone
    from ..shards.cutouts import inspect_cutout

    backbone, info = load_backbone(checkpoint)
    if info["weights_sha256"] != emb["attrs"].get("weights_sha256"):
        raise UserError(
            f"--checkpoint {checkpoint}: not the backbone {emb['path']} was made with (weights sha256 "
            f"{info['weights_sha256'][:12]} vs {str(emb['attrs'].get('weights_sha256'))[:12]}): "
            "features would not be comparable"
        )
    data_dir = next(iter(source_dirs(emb).values()))
    manifest = read_manifest(data_dir)
    scale = manifest.get("pixel_scale_arcsec") or manifest["config"]["instrument"]["pixel_scale_arcsec"]
    cfg = from_dict(
        IngestConfig,
        {
            "preset": manifest.get("preset", "hst"),
            "num_pix": manifest["image_shape"][0],
            "pixel_scale_arcsec": scale,
            "hdu": hdu,
            "input_pixel_scale_arcsec": pixel_scale,
            "orientation": orientation,
        },
        "similar --image",
    )
    img, meta = prepare(inspect_cutout(image, cfg), cfg)
    with torch.inference_mode():
        feat = backbone(torch.as_tensor(img)[None, None]).float().numpy()
    return feat, img, meta


def similar(
    embeddings: str | None = None,
    key: str | None = None,
    data_dir: str | None = None,
    image: str | None = None,
    checkpoint: str | None = None,
    k: int | None = None,
    out: str | None = None,
    json_out: str | None = None,
    anomaly: bool | None = None,
    index: str | None = None,
    hdu: str | None = None,
    input_pixel_scale: float | None = None,
    orientation: str | None = None,
    top: int | None = None,
    progress: bool = True,
    table: list[str] | str | None = None,
    stretch: str | None = None,
    config: SimilarConfig | None = None,
) -> dict:
    """Nearest neighbours of one image (``key`` or ``image``), or ``anomaly`` scores of all; see module doc.
    ``stretch``: the figure's image display (:mod:`hpc_lensiam.shards.display`)."""
    if config is None:  # the Python API's arguments (None: the config's default), validated once
        config = from_flags(
            SimilarConfig,
            dict(
                embeddings=embeddings,
                key=key,
                data_dir=data_dir,
                image=image,
                checkpoint=checkpoint,
                k=k,
                out=out,
                json=json_out,
                anomaly=anomaly,
                index=index,
                hdu=hdu,
                input_pixel_scale=input_pixel_scale,
                orientation=orientation,
                top=top,
                table=[table] if isinstance(table, str) else table,
                stretch=stretch,
            ),
        )
        config.check_complete()
    c = config
    embeddings, key, source, image, checkpoint, k, out = (
        c.embeddings,
        c.key,
        c.data_dir,
        c.image,
        c.checkpoint,
        c.k,
        c.out,
    )
    json_out, anomaly, index, hdu, pixel_scale, orientation = (
        c.json,
        c.anomaly,
        c.index,
        c.hdu,
        c.input_pixel_scale,
        c.orientation,
    )
    top, table, stretch = c.top, c.table, c.stretch
    for path, flag in ((out, "--out"), (json_out, "--json")):  # before the search, not after it
        if path:
            check_output_file(path, flag)
    tables = [table] if isinstance(table, str) else list(table or [])
    for t in tables:
        from ..downstream.predict import TABLE_SUFFIXES

        if Path(t).suffix not in TABLE_SUFFIXES:
            raise UserError(f"--table {t}: expected a file ending in {' or '.join(TABLE_SUFFIXES)}")
        check_output_file(t, "--table")
    emb = load_embeddings(embeddings, need_params=False)
    n = len(emb["features"])
    t0 = time.perf_counter()
    mean = emb["features"].mean(0, dtype=np.float64).astype(np.float32)
    x = unit_vectors(emb.pop("features"), mean)  # the raw features are not needed again: one copy fewer
    dirs = source_dirs(emb)
    scales = _pixel_scales(dirs) if out else {}
    shards = ShardImages()
    report: dict = {"embeddings": str(embeddings), "rows": n, "k": k}
    if anomaly:
        if n < k + 2:
            raise UserError(f"{embeddings}: {n} rows; --anomaly -k {k} needs at least {k + 2}")
        scores, kind = anomaly_scores(x, emb["pair_id"], k, "auto" if index == "auto" else index, progress=progress)
        order = np.argsort(-scores, kind="stable")
        rows = [_row(emb, int(i), r + 1, score=float(scores[i])) for r, i in enumerate(order)]
        report.update(
            mode="anomaly", index=kind, score="cosine distance to the k-th neighbour of another system", ranking=rows
        )
        shown = rows[:top]
        panels = []
        for r in shown if out else []:
            img, params = shards.get(dirs[r["source"]], r["key"], r["view"])
            cap = _caption(None, None, r["key"], params, f"#{r['rank']}  dist {r['score']:.3f}")
            panels.append(_panel(img, cap, params, r["view"], scales.get(r["source"])))
        title = f"most isolated images: cosine distance to the {k}-th neighbour ({n} images, {kind} index)"
    else:
        if key is not None:
            q = _row_of(emb, key, source)
            query_vec, skip = x[q : q + 1], emb["pair_id"] == emb["pair_id"][q]
            query = {
                "key": str(emb["keys"][q]),
                "name": str(emb["name"][q]),
                "source": str(emb["source"][q]),
                "view": 1,
            }
            q_img, q_params = shards.get(dirs[query["source"]], query["key"], 1) if out else (None, {})
        else:
            feat, q_img, meta = embed_image(emb, image, checkpoint, hdu, pixel_scale, orientation)
            query_vec, skip = unit_vectors(feat, mean), np.zeros(n, bool)
            query, q_params = {"image": str(image)}, {"ingest": meta}
        kind = "flat" if index == "auto" else index
        idx_obj = build_index(x, kind)
        want = min(n, k + int(skip.sum()))
        sims, idx = idx_obj.search(query_vec, want)
        keep = [(float(s), int(i)) for s, i in zip(sims[0], idx[0]) if i >= 0 and not skip[i]][:k]
        rows = [_row(emb, i, r + 1, similarity=s) for r, (s, i) in enumerate(keep)]
        report.update(mode="query", index=kind, query=query, neighbours=rows)
        panels = []
        if out:
            q_cap = _caption(None, None, query.get("key", Path(str(image)).name), q_params, "query")
            src = query.get("source")
            q_scale = scales[src] if src is not None else q_params["ingest"].get("target_pixel_scale_arcsec")
            panels.append(_panel(q_img, q_cap, q_params, 1, q_scale))
            for r in rows:
                img, params = shards.get(dirs[r["source"]], r["key"], r["view"])
                cap = _caption(r["rank"], r["similarity"], r["key"], params)
                panels.append(_panel(img, cap, params, r["view"], scales.get(r["source"])))
        shown = rows
        title = f"{k} nearest neighbours by cosine similarity among {n} images"
    report["seconds"] = time.perf_counter() - t0
    print(format_table(shown, anomaly), flush=True)
    if out:
        draw_grid(panels, out, title, stretch)
    if json_out:
        atomic_write_json(json_out, report)
    for t in tables:
        write_rows_table(rows, t, anomaly, report.get("query"))
    print(
        f"similar: {report['mode']} over {n} images ({report['index']} index) in {report['seconds']:.2f} s"
        + (f"; grid {out}" if out else "")
        + (f"; json {json_out}" if json_out else "")
        + "".join(f"; table {t}" for t in tables),
        flush=True,
    )
    return report


def write_rows_table(rows: list[dict], path: str, anomaly: bool, query: dict | None = None) -> None:
    """The neighbours (or the ranking) as a CSV/FITS table: rank, cosine (or distance), name, key, source
    folder, view, then the catalogue columns ingest kept and the known labels; a query by key or image
    is named in the ``query`` column."""
    from ..downstream.predict import write_table

    out = []
    for r in rows:
        row = {"rank": r["rank"], ("distance" if anomaly else "cosine"): r["score" if anomaly else "similarity"]}
        if query:
            row["query"] = query.get("name") or query.get("key") or query.get("image")
        row.update({"name": r["name"], "key": r["key"], "source": r["source"], "view": r["view"]})
        row.update({k: v for k, v in r["catalog"].items() if k not in row and not isinstance(v, (dict, list))})
        row.update({p: v for p, v in r["params"].items() if p not in row})
        out.append(row)
    write_table(out, path)


def _row(emb: dict, i: int, rank: int, **value) -> dict:
    """One table/JSON row: the image's identity, its known lens parameters and ``value``."""
    params = {
        p: float(v[i]) for p, v in emb["params"].items() if p not in emb["params_known"] or emb["params_known"][p][i]
    }
    if emb.get("is_lens") is not None:
        params["is_lens"] = int(emb["is_lens"][i])
    return {
        "rank": rank,
        **value,
        "name": str(emb["name"][i]),
        "key": str(emb["keys"][i]),
        "source": str(emb["source"][i]),
        "view": int(emb["view"][i]),
        "catalog": json.loads(emb["catalog"][i] or "{}"),
        "params": params,
    }


def format_table(rows: list[dict], anomaly: bool) -> str:
    head = ["rank", "distance" if anomaly else "cosine", "source", "name", "view", "theta_E", "gamma", "e1"]
    shown = ("theta_E", "gamma", "e1")
    body = [
        [
            str(r["rank"]),
            f"{r['score' if anomaly else 'similarity']:.4f}",
            r["source"] or "-",
            r["name"],
            str(r["view"]),
        ]
        + [f"{r['params'][p]:.3f}" if p in r["params"] else "-" for p in shown]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), "-" * len(line(head)), *map(line, body)])
