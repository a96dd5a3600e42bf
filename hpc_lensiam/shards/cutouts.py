"""Read one real cutout with its pixel scale, orientation, bad-pixel mask, noise, exposure and PSF.

Formats: FITS (one HDU; ``each_hdu``: every 2-D image HDU an object), ``.npy`` (a 2-D image, or an
(N, H, W) stack whose rows are objects, ``member`` = the row), lenstronomy HDF5 cutouts (``.h5`` /
``.hdf5``: ``image_data``, ``background_rms``, ``exposure_time``/``exposure_map``,
``transform_pix2angle``, ``ra_at_xy_0``/``dec_at_xy_0``; a ``psf_*.h5`` beside it) and 8-bit display
images (``.png``, ``.jpg``/``.jpeg``: RGB averaged into one channel, not calibrated flux).

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import option
from ..core.errors import UserError


@dataclass
class CutoutOptions:
    """How a cutout file is read (the reader's part of ``ingest``'s config, which extends it; ``simulate
    --match`` reads with the defaults). Lives with the reader, below both stages that read real files."""

    hdu: str | None = option(None, "image HDU name or index (default: the first 2-D image)")
    rms_hdu: str | None = option("auto", "RMS HDU masking no-data pixels: NAME|INDEX|auto|none")
    weight_hdu: str | None = option(None, "weight HDU: weight <= 0 masks a pixel")
    rms_no_data: float = option(1e15, "RMS at or above this (Euclid writes 1e16) is no data")
    input_pixel_scale_arcsec: float | None = option(
        None,
        "arcsec/pixel of inputs whose header has no CD/CDELT (and of .npy files)",
        flag="--input-pixel-scale",
        metavar="ARCSEC",
    )
    each_hdu: bool = option(False, "FITS: every 2-D image HDU is an object (stamp files), not only the first")


@dataclass
class CutoutInfo:
    """What the header says: enough to plan the data set without reading pixels."""

    path: str
    hdu: str  # the HDU as named in params.json ("VIS_FLUX", "1", or "" for .npy)
    shape: tuple[int, int]  # (rows, columns)
    scale_matrix_arcsec: np.ndarray  # (2, 2): d(RA, Dec) / d(x, y), arcsec per pixel
    scale_from: str  # "wcs" or "flag"
    mask_hdu: str = ""  # the RMS / weight HDU used for masking, "" if none
    mask_kind: str = ""  # "rms" | "weight" | "exposure" | ""
    kind: str = "fits"  # fits | npy | hdf5 | display
    member: str = ""  # .npy stack: the row; "" otherwise
    extra: dict = field(default_factory=dict)  # what the file says besides pixels: noise, exposure, PSF, ...

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
        raise UserError(f"{path}: no pixel scale (no CD or CDELT keys in its header); pass --input-pixel-scale ARCSEC")
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


def _mask_hdu(hdul, image_name: str, cfg: CutoutOptions, path: str):
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


def inspect_cutout(path: str, cfg: CutoutOptions, hdu: str | None = None) -> CutoutInfo:
    """Header-level checks of one input: readable, 2-D, a pixel scale, an RMS/weight HDU of its shape."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return _inspect_hdf5(str(path), cfg)
    if suffix in DISPLAY_SUFFIXES:
        return _inspect_display(str(path), cfg)
    if suffix == ".npy":
        arr = _load_npy(str(path))
        member = ""
        if arr.ndim == 3 and hdu not in (None, ""):
            row = _hdu_key(hdu)
            if not isinstance(row, int) or not 0 <= row < arr.shape[0]:
                raise UserError(f"{path}: row {hdu!r} is not in its stack of {arr.shape[0]} images")
            member, shape = str(row), tuple(arr.shape[1:])
        elif arr.ndim != 2:
            raise UserError(
                f"{path}: array has shape {arr.shape} (expected a 2-D image, or an (N, H, W) stack: one object per row)"
            )
        else:
            shape = tuple(arr.shape)
        m, src = _scale_matrix({}, path, cfg.input_pixel_scale_arcsec)
        return CutoutInfo(str(path), "", shape, m, src, kind="npy", member=member)
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
        extra = {}
        if isinstance(h.header.get("EXPTIME"), (int, float)):
            extra["exposure_time_s"] = float(h.header["EXPTIME"])
    return CutoutInfo(str(path), label, shape, m, src, mask_name, kind, extra=extra)


def read_cutout(info: CutoutInfo, cfg: CutoutOptions) -> tuple[np.ndarray, np.ndarray]:
    """(image float64, bad-pixel mask) of an inspected cutout.

    Bad = not finite, or flagged by the RMS HDU (not finite, <= 0, or >= ``rms_no_data``) or the
    weight HDU (not finite or <= 0).
    """
    if info.kind == "hdf5":
        return _read_hdf5(info)
    if info.kind == "display":
        img = _read_display(info.path)
        return img, ~np.isfinite(img)
    if info.kind == "npy":
        arr = np.load(info.path, mmap_mode="r", allow_pickle=False)
        img = np.array(arr[int(info.member)] if info.member else arr, dtype=np.float64)
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
                good = aux[~bad]
                if good.size:  # the RMS map's typical value: the noise level of this cutout
                    info.extra.setdefault("background_rms", float(np.median(good)))
                    info.extra.setdefault("noise_from", f"median of RMS HDU {info.mask_hdu}")
            else:
                bad |= ~np.isfinite(aux) | (aux <= 0)
    return img, bad


# ------------------------------------------------------------------------- more formats
HDF5_SUFFIXES = (".h5", ".hdf5")
DISPLAY_SUFFIXES = (".png", ".jpg", ".jpeg")
# 8-bit display images hold a stretched colour composite, not flux: one channel is made by this rule
CHANNEL_RULE = "mean of the R, G, B channels (alpha dropped); rows flipped so row 0 is the bottom, as in FITS"
PSF_DATASET = "kernel_point_source"


def _load_npy(path: str):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from None


def expand(path: str, cfg: CutoutOptions, hdu: str | None = None) -> list[tuple[str | None, str]]:
    """The objects in one input file: [(member, name suffix)]. One for a 2-D image; every row of an
    (N, H, W) ``.npy`` stack (suffix ``_<row>``); with ``cfg.each_hdu`` every 2-D image HDU of a FITS
    file (suffix ``_hdu<N>``). A file that cannot be opened is one object: the check pass names it."""
    p = Path(path)
    suffix = p.suffix.lower()
    if hdu is not None or not p.is_file():
        return [(hdu, "")]
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception:
            return [(None, "")]
        if arr.ndim == 3:
            return [(str(i), f"_{i}") for i in range(arr.shape[0])]
        return [(None, "")]
    if cfg.each_hdu and suffix not in HDF5_SUFFIXES + DISPLAY_SUFFIXES:
        try:
            with _open_fits(path) as hdul:
                found = [
                    i for i, h in enumerate(hdul) if h.header.get("NAXIS", 0) == 2 and getattr(h, "is_image", False)
                ]
        except UserError:
            return [(None, "")]
        return [(str(i), f"_hdu{i}") for i in found] or [(None, "")]
    return [(None, "")]


def _h5_value(f, name: str, path: str):
    try:
        return np.array(f[name][()], dtype=np.float64)
    except Exception as exc:
        raise UserError(f"{path}: cannot read dataset {name!r} ({type(exc).__name__}: {exc})") from None


def _inspect_hdf5(path: str, cfg: CutoutOptions) -> CutoutInfo:
    """A lenstronomy HDF5 cutout: ``image_data`` (H, W); ``transform_pix2angle`` (2x2 arcsec per pixel,
    d(RA, Dec)/d(x, y), x = column) gives the pixel scale and orientation; ``background_rms``
    (scalar or map), ``exposure_time`` (scalar or map) or ``exposure_map``, ``ra_at_xy_0`` /
    ``dec_at_xy_0`` are kept; the PSF is a ``psf_*.h5`` beside it (:func:`find_psf`)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise UserError(f"{path}: cannot read as HDF5 ({type(exc).__name__}: {exc})") from None
    with f:
        if "image_data" not in f:
            raise UserError(
                f"{path}: no 'image_data' dataset (found: {', '.join(f.keys()) or 'none'}; expected lenstronomy's "
                "cutout layout: image_data, background_rms, exposure_time, transform_pix2angle)"
            )
        shape = tuple(f["image_data"].shape)
        if len(shape) != 2:
            raise UserError(f"{path}: image_data has shape {shape} (expected a 2-D image)")
        extra: dict = {}
        if "transform_pix2angle" in f:
            m = _h5_value(f, "transform_pix2angle", path)
            if m.shape != (2, 2) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) <= 0:
                raise UserError(f"{path}: transform_pix2angle {m.tolist()} is not an invertible 2x2 matrix")
            src = "transform_pix2angle"
        else:
            m, src = _scale_matrix({}, path, cfg.input_pixel_scale_arcsec)
        for name in ("ra_at_xy_0", "dec_at_xy_0"):
            if name in f and f[name].size == 1:
                extra[name] = float(_h5_value(f, name, path))
        mask_kind, mask_name = "", ""
        if "background_rms" in f:
            rms = _h5_value(f, "background_rms", path)
            if rms.size == 1:
                extra["background_rms"], extra["noise_from"] = float(rms), "background_rms"
            elif rms.shape == shape:
                mask_kind, mask_name = "rms", "background_rms"
            else:
                raise UserError(f"{path}: background_rms has shape {rms.shape} (expected a scalar or {shape})")
        for name in ("exposure_time", "exposure_map"):
            if name in f:
                exp = _h5_value(f, name, path)
                if exp.size == 1:
                    extra["exposure_time_s"], extra["exposure_from"] = float(exp), name
                elif exp.shape == shape:
                    good = exp[np.isfinite(exp) & (exp > 0)]
                    extra["exposure_time_s"] = float(np.median(good)) if good.size else 0.0
                    extra["exposure_from"] = f"median of the {name} map"
                    if not mask_kind:
                        mask_kind, mask_name = "exposure", name
                else:
                    raise UserError(f"{path}: {name} has shape {exp.shape} (expected a scalar or {shape})")
                break
    return CutoutInfo(path, "", shape, m, src, mask_name, mask_kind, kind="hdf5", extra=extra)


def _read_hdf5(info: CutoutInfo) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        with h5py.File(info.path, "r") as f:
            img = np.array(f["image_data"][()], dtype=np.float64)
            aux = np.array(f[info.mask_hdu][()], dtype=np.float64) if info.mask_hdu else None
    except Exception as exc:
        raise UserError(f"{info.path}: cannot read image_data ({type(exc).__name__}: {exc})") from None
    bad = ~np.isfinite(img)
    if aux is not None:
        with np.errstate(invalid="ignore"):
            bad |= ~np.isfinite(aux) | (aux <= 0)  # an RMS of 0 or an exposure of 0: no data
        if info.mask_kind == "rms" and (~bad).any():
            info.extra.setdefault("background_rms", float(np.median(aux[~bad])))
            info.extra.setdefault("noise_from", "median of the background_rms map")
    return img, bad


def _inspect_display(path: str, cfg: CutoutOptions) -> CutoutInfo:
    img = _read_display(path)
    m, src = _scale_matrix({}, path, cfg.input_pixel_scale_arcsec)
    extra = {"display_image": True, "channel_rule": CHANNEL_RULE}
    return CutoutInfo(path, "", tuple(img.shape), m, src, kind="display", extra=extra)


def _read_display(path: str) -> np.ndarray:
    """One float64 channel of an 8-bit (or 16-bit) display image by :data:`CHANNEL_RULE`."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as a PNG/JPEG image ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64).mean(axis=2)
    if arr.ndim != 2:
        raise UserError(f"{path}: image has shape {arr.shape} (expected grey or RGB)")
    return np.ascontiguousarray(arr[::-1], dtype=np.float64)  # display row 0 is the top; FITS row 0 the bottom


def find_psf(path: str, explicit: str | None = None) -> str | None:
    """The PSF file of an input: ``explicit`` (flag or CSV column), else for an HDF5 cutout the one
    ``psf_*.h5``/``psf_*.hdf5`` beside it, or among several the one named after it (``image_X.h5`` /
    ``data_X.h5`` -> ``psf_X.h5``); None when there is none or it is ambiguous."""
    if explicit:
        return explicit
    p = Path(path)
    if p.suffix.lower() not in HDF5_SUFFIXES:
        return None
    found = sorted(q for q in p.parent.glob("psf_*") if q.suffix.lower() in HDF5_SUFFIXES and q != p)
    if len(found) == 1:
        return str(found[0])
    stem = p.stem
    for prefix in ("image_", "data_"):
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
    named = [q for q in found if q.stem == f"psf_{stem}"]
    return str(named[0]) if len(named) == 1 else None


def read_psf(path: str, flag: str = "psf") -> np.ndarray:
    """The PSF kernel in ``path``: ``kernel_point_source`` of an HDF5 file, a 2-D ``.npy``, or the first
    2-D image HDU of a FITS file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        if p.suffix.lower() in HDF5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as f:
                if PSF_DATASET not in f:
                    raise UserError(f"{flag} {path}: no {PSF_DATASET!r} dataset (found: {', '.join(f.keys())})")
                k = np.array(f[PSF_DATASET][()], dtype=np.float64)
        elif p.suffix.lower() == ".npy":
            k = np.array(np.load(path, allow_pickle=False), dtype=np.float64)
        else:
            with _open_fits(path) as hdul:
                k = np.array(_image_hdu(hdul, None, path)[1].data, dtype=np.float64)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{flag} {path}: cannot read a PSF kernel ({type(exc).__name__}: {exc})") from None
    if k.ndim != 2 or not np.all(np.isfinite(k)) or not k.sum() > 0:
        raise UserError(f"{flag} {path}: PSF kernel of shape {k.shape} is not a finite 2-D image with positive sum")
    return k
