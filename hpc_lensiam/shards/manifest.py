"""The shard set's contract, written and read here only: the manifest, shard names, the lens
parameters every sample carries, and the ``.npy`` member encoding (one encoder, one decoder).

A shard set is ``DIR/manifest.json`` (format ``hpc_lensiam.shards/1``) listing ``shard-NNNNNN.tar``
files; each sample is ``KEY.params.json`` plus ``KEY.view1.npy``/``KEY.view2.npy`` (lensiam) or
``KEY.image.npy`` (single): C-order float32 2-D arrays, never pickles.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ..core.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hpc_lensiam.shards/1"
# The 8 lens-mass parameters every sample stores, under their lenstronomy names (EPL + SHEAR);
# theta_E, center_x, center_y in arcsec, the rest dimensionless.
LENS_PARAMS = ("theta_E", "gamma", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")
# units of the lens parameters that have one (the rest are dimensionless)
UNITS = {"theta_E": "arcsec", "center_x": "arcsec", "center_y": "arcsec"}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_of_key(key: str) -> str:
    """The shard a sample key ``NNNNNN_...`` was written to (``shard-NNNNNN.tar``)."""
    return f"shard-{key.split('_')[0]}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class NpyDecoder:
    """``np.save`` bytes -> float32 2-D array view; parses the header once, then ``np.frombuffer``."""

    def __init__(self):
        self.header = b""
        self.shape = None

    def __call__(self, data: bytes) -> np.ndarray:
        if not self.header or not data.startswith(self.header):
            self._parse(data)
        return np.frombuffer(data, dtype=np.float32, count=self.count, offset=len(self.header)).reshape(self.shape)

    def _parse(self, data: bytes) -> None:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:  # a pickle: never loaded (np.load's own refusal, in its words)
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise ValueError(f"expected a C-order float32 2-D npy array, got {dtype} {shape}")
        self.header, self.shape, self.count = data[: f.tell()], shape, int(np.prod(shape))
        if len(data) != f.tell() + 4 * self.count:
            raise ValueError(f"npy payload is {len(data) - f.tell()} bytes, expected {4 * self.count}")


def decode_npy(data: bytes) -> np.ndarray:
    """The bytes of one ``.npy`` shard member -> a (writable) numpy array; no pickles
    (:class:`NpyDecoder`, whose header parse a stream of members reuses)."""
    return NpyDecoder()(data).copy()


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and check ``DIR/manifest.json``; a clear UserError if it is missing or malformed."""
    path = Path(data_dir) / MANIFEST_NAME
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: no such data directory (expected shards made by `hpc-lensiam simulate`)")
    if not path.is_file():
        raise UserError(f"{path}: missing (expected a shard directory written by `hpc-lensiam simulate`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for key in ("shards", "mode", "num_samples"):
        if key not in manifest:
            raise UserError(f"{path}: missing key {key!r}")
    if not manifest["shards"]:
        raise UserError(f"{path}: lists no shards")
    check_shard_names(manifest, path)
    return manifest


def check_shard_names(manifest: dict, path: str | os.PathLike) -> None:
    """Every shard entry names a plain file inside the data folder: a name with a folder part
    (``../x.tar``, ``/abs/x.tar``, ``sub/x.tar``) would make readers and ``verify`` follow it out."""
    for i, entry in enumerate(manifest["shards"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or "/" in name
            or "\\" in name
            or "\0" in name
            or Path(name).name != name
        ):
            raise UserError(
                f"{path}: shard entry {i} has name {name!r}, not a plain file name (expected a shard "
                f"file inside the data folder, e.g. shard-000000.tar)"
            )


def shard_paths(data_dir: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Absolute paths of every shard the manifest lists, in manifest order."""
    manifest = manifest or read_manifest(data_dir)
    check_shard_names(manifest, Path(data_dir) / MANIFEST_NAME)
    return [str(Path(data_dir).resolve() / s["name"]) for s in manifest["shards"]]


def data_grid(data_dir: str | os.PathLike) -> dict:
    """The pixel grid of a shard set: ``{"pixel_scale_arcsec", "image_shape"}`` from its manifest
    (an ingested set's target grid, a simulated set's instrument; None where it does not say)."""
    m = read_manifest(data_dir)
    cfg = m.get("config") or {}
    scale = m.get("pixel_scale_arcsec") or (cfg.get("instrument") or {}).get("pixel_scale_arcsec")
    scale = scale if scale is not None else cfg.get("pixel_scale_arcsec")
    return {"pixel_scale_arcsec": None if scale is None else float(scale), "image_shape": m.get("image_shape")}
