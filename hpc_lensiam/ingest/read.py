"""Read one real cutout (FITS HDU or .npy) with its pixel scale, orientation and bad-pixel mask.

Two passes use this module: :func:`inspect_cutout` reads headers only (cheap; it is the check that
runs over a whole catalogue before anything is written), :func:`read_cutout` reads the pixels.
Both raise a :class:`UserError` naming the file for every problem a user can fix.

Pixel scale and orientation come from the WCS: the 2x2 pixel-scale matrix (CD, or CDELT with
PC/CROTA, through astropy.wcs) in arcsec per pixel, rows = (RA, Dec), columns = (x, y) pixel axes.
A file without CD/CDELT keys (and every .npy) takes ``input_pixel_scale_arcsec`` and is assumed to
be stored the FITS way, north up and east left: matrix diag(-s, s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from .config import IngestConfig


@dataclass
class CutoutInfo:
    """What the header says: enough to plan the data set without reading pixels."""

    path: str
    hdu: str  # the HDU as named in params.json ("VIS_FLUX", "1", or "" for .npy)
    shape: tuple[int, int]  # (rows, columns)
    scale_matrix_arcsec: np.ndarray  # (2, 2): d(RA, Dec) / d(x, y), arcsec per pixel
    scale_from: str  # "wcs" or "flag"
    mask_hdu: str = ""  # the RMS / weight HDU used for masking, "" if none
    mask_kind: str = ""  # "rms" | "weight" | ""

    @property
    def pixel_scales_arcsec(self) -> tuple[float, float]:
        """Size of a pixel along x (columns) and y (rows), in arcsec."""
        m = self.scale_matrix_arcsec
        return float(np.hypot(m[0, 0], m[1, 0])), float(np.hypot(m[0, 1], m[1, 1]))


def _hdu_key(spec: str):
    """'3' -> 3 (index), 'VIS_FLUX' -> 'VIS_FLUX' (name)."""
    s = str(spec).strip()
    return int(s) if s.lstrip("-").isdigit() else s


def _scale_matrix(header, path: str, fallback: float | None) -> tuple[np.ndarray, str]:
    has_cd = any(k in header for k in ("CD1_1", "CD2_2", "CD1_2", "CD2_1"))
    has_cdelt = "CDELT1" in header and "CDELT2" in header
    if has_cd or has_cdelt:
        import warnings

        from astropy.wcs import WCS, FITSFixedWarning

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                w = WCS(header, naxis=2)
            m = np.array(w.pixel_scale_matrix, dtype=np.float64)
            units = [str(u) for u in w.wcs.cunit]
        except Exception as exc:
            raise UserError(f"{path}: unreadable WCS ({type(exc).__name__}: {exc})") from None
        factor = {"deg": 3600.0, "": 3600.0, "arcmin": 60.0, "arcsec": 1.0, "mas": 1e-3}
        if units[0] not in factor or units[1] not in factor:
            raise UserError(f"{path}: WCS axis units {units} are not angles (expected deg, arcmin, arcsec)")
        m = m * np.array([[factor[units[0]]], [factor[units[1]]]])
        if not (np.all(np.isfinite(m)) and abs(np.linalg.det(m)) > 0):
            raise UserError(f"{path}: WCS pixel-scale matrix {m.tolist()} is singular")
        return m, "wcs"
    if fallback is None:
        raise UserError(f"{path}: no pixel scale (no CD or CDELT keys in its header); pass --pixel-scale ARCSEC")
    return np.array([[-fallback, 0.0], [0.0, fallback]]), "flag"


def _image_hdu(hdul, spec, path: str):
    if spec is None:
        for i, h in enumerate(hdul):
            if h.header.get("NAXIS", 0) == 2 and getattr(h, "is_image", False):
                return i, h
        found = ", ".join(f"{h.name or i} {_dims(h.header)}" for i, h in enumerate(hdul))
        raise UserError(f"{path}: no 2-D image HDU (found: {found}); give one with --hdu NAME|INDEX")
    key = _hdu_key(spec)
    try:
        h = hdul[key]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise UserError(f"{path}: no HDU {spec!r} (it has {len(hdul)}: {', '.join(names)})") from None
    return hdul.index_of(key) if isinstance(key, str) else key, h


def _dims(header) -> tuple:
    """numpy-order shape from NAXISn keys."""
    return tuple(header.get(f"NAXIS{i}") for i in range(header.get("NAXIS", 0), 0, -1))


def _mask_hdu(hdul, image_name: str, cfg: IngestConfig, path: str):
    """(index, kind) of the RMS or weight HDU to mask with, or (None, '')."""
    if cfg.weight_hdu is not None:
        return _image_hdu(hdul, cfg.weight_hdu, path)[0], "weight"
    if cfg.rms_hdu is None or str(cfg.rms_hdu).lower() == "none":
        return None, ""
    if str(cfg.rms_hdu).lower() == "auto":
        for suffix in ("_FLUX", "_SCI"):
            if image_name.upper().endswith(suffix):
                name = image_name[: -len(suffix)] + "_RMS"
                if name in hdul:
                    return hdul.index_of(name), "rms"
        return None, ""
    return _image_hdu(hdul, cfg.rms_hdu, path)[0], "rms"


def _check_truncated(hdul, index: int, path: str) -> None:
    info = hdul.fileinfo(index)
    if info and info.get("datLoc") is not None:
        end = info["datLoc"] + info["datSpan"]
        if end > os.path.getsize(path):
            raise UserError(f"{path}: truncated (HDU {index} needs {end} bytes, the file has {os.path.getsize(path)})")


def _open_fits(path: str):
    import warnings

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    try:
        with warnings.catch_warnings():  # "may have been truncated": _check_truncated says it, once
            warnings.simplefilter("ignore", AstropyUserWarning)
            return fits.open(path, memmap=True, lazy_load_hdus=False)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as FITS ({type(exc).__name__}: {exc})") from None


def inspect_cutout(path: str, cfg: IngestConfig, hdu: str | None = None) -> CutoutInfo:
    """Header-level checks of one input: readable, 2-D, a pixel scale, an RMS/weight HDU of its shape."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise UserError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
        if arr.ndim != 2:
            raise UserError(f"{path}: array has shape {arr.shape} (expected a 2-D image)")
        m, src = _scale_matrix({}, path, cfg.input_pixel_scale_arcsec)
        return CutoutInfo(str(path), "", tuple(arr.shape), m, src)
    with _open_fits(path) as hdul:
        index, h = _image_hdu(hdul, hdu if hdu is not None else cfg.hdu, path)
        name = h.name or str(index)
        label = h.name if h.name and h.name != "PRIMARY" else str(index)
        if h.header.get("NAXIS", 0) != 2 or not getattr(h, "is_image", False):
            raise UserError(f"{path}: HDU {label} is not a 2-D image (shape {_dims(h.header)})")
        _check_truncated(hdul, index, path)
        shape = (int(h.header["NAXIS2"]), int(h.header["NAXIS1"]))
        m, src = _scale_matrix(h.header, path, cfg.input_pixel_scale_arcsec)
        mi, kind = _mask_hdu(hdul, name, cfg, path)
        mask_name = ""
        if mi is not None:
            mh = hdul[mi]
            mask_name = mh.name or str(mi)
            mshape = (mh.header.get("NAXIS2"), mh.header.get("NAXIS1"))
            if mh.header.get("NAXIS", 0) != 2 or mshape != shape:
                raise UserError(f"{path}: {kind} HDU {mask_name} has shape {mshape}, the image {shape}")
            _check_truncated(hdul, mi, path)
    return CutoutInfo(str(path), label, shape, m, src, mask_name, kind)


def read_cutout(info: CutoutInfo, cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray]:
    """(image float64, bad-pixel mask) of an inspected cutout.

    Bad = not finite, or flagged by the RMS HDU (not finite, <= 0, or >= ``rms_no_data``) or the
    weight HDU (not finite or <= 0).
    """
    if not info.hdu:  # .npy
        img = np.array(np.load(info.path, allow_pickle=False), dtype=np.float64)
        return img, ~np.isfinite(img)
    try:
        with _open_fits(info.path) as hdul:
            img = np.array(hdul[_hdu_key(info.hdu)].data, dtype=np.float64)
            aux = np.array(hdul[info.mask_hdu].data, dtype=np.float64) if info.mask_hdu else None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{info.path}: cannot read HDU {info.hdu} ({type(exc).__name__}: {exc})") from None
    bad = ~np.isfinite(img)
    if aux is not None:
        with np.errstate(invalid="ignore"):
            if info.mask_kind == "rms":
                bad |= ~np.isfinite(aux) | (aux <= 0) | (aux >= cfg.rms_no_data)
            else:
                bad |= ~np.isfinite(aux) | (aux <= 0)
    return img, bad
