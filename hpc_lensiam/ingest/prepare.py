"""One cutout -> one simulator-like image: mask, sky, orientation, flux-conserving resampling, max = 1.

The steps, in order (each one says why it is where it is):

1. bad pixels (non-finite, RMS/weight-flagged) are excluded from the sky estimate;
2. sky = sigma-clipped median of the good pixels (astropy.stats), in the file's flux units,
   subtracted; bad pixels are then set to 0 (= the sky), so they carry no flux;
3. orientation (flips / a transpose only, never an interpolation): ``simulator`` puts RA along
   increasing columns and Dec along increasing rows, the lenstronomy grid the simulator draws on
   (labels in lenstronomy's (RA, Dec) convention then mean the same thing on both); ``sky`` is
   north up, east left (FITS display convention); ``asis`` keeps the stored array;
4. resampling by exact pixel-area overlap (separable, the PSF module's overlap matrix), centred
   on the cutout centre: every output pixel holds the flux that falls in it, so the total flux in
   the field is conserved (tested to 1e-6);
5. divided by its maximum and cast to float32, exactly as the simulator normalises. The divisor
   (``flux_scale``) and the sky are recorded, so pixel x flux_scale + sky gives back file units.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..shards.cutouts import CutoutInfo, read_cutout
from ..shards.resample import overlap_matrix
from .config import IngestConfig


def sky_level(image: np.ndarray, bad: np.ndarray, sigma: float = 3.0) -> float:
    """Sigma-clipped median of the good pixels."""
    return sky_stats(image, bad, sigma)[0]


def sky_stats(image: np.ndarray, bad: np.ndarray, sigma: float = 3.0) -> tuple[float, float]:
    """(median, standard deviation) of the good pixels, sigma-clipped: the sky and its noise."""
    from astropy.stats import sigma_clipped_stats

    good = image[~bad]
    if good.size == 0:
        return 0.0, 0.0
    _, median, std = sigma_clipped_stats(good, sigma=sigma, maxiters=10)
    return float(median), float(std)


def white_noise_gain(sx: float, sy: float, ny: int, nx: int, num_pix: int, scale_out: float) -> float:
    """sigma of a target pixel / sigma of an input pixel for white noise through :func:`resample`
    (the central target pixel): sqrt(sum of squared overlap weights) along each axis."""
    c = num_pix // 2
    wy = overlap_matrix(ny, sy, num_pix, scale_out, (ny - 1) / 2.0)[c]
    wx = overlap_matrix(nx, sx, num_pix, scale_out, (nx - 1) / 2.0)[c]
    return float(np.sqrt((wy**2).sum() * (wx**2).sum()))


def orient(image: np.ndarray, matrix: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Flip/transpose ``image`` (rows = y, columns = x) to ``orientation``; return the new matrix too.

    ``matrix`` is d(RA, Dec)/d(x, y). Only exact 90-degree moves: a residual rotation of the
    WCS stays (recorded in params.json as ``rotation_deg``).
    """
    m = np.array(matrix, dtype=np.float64)
    ops: list[str] = []
    if orientation == "asis":
        return image, m, ops
    if abs(m[0, 1]) > abs(m[0, 0]):  # RA runs mostly along the rows: swap the axes
        image, m = image.T, m[:, ::-1]
        ops.append("transpose")
    want_ra = 1.0 if orientation == "simulator" else -1.0  # sign of dRA/dx wanted
    if np.sign(m[0, 0]) != want_ra:
        image, m = image[:, ::-1], m * np.array([[-1.0, 1.0]])
        ops.append("flip_x")
    if m[1, 1] < 0:  # north up in both conventions
        image, m = image[::-1, :], m * np.array([[1.0, -1.0]])
        ops.append("flip_y")
    return image, m, ops


def resample(
    image: np.ndarray, scale_x_arcsec: float, scale_y_arcsec: float, num_pix: int, scale_out_arcsec: float
) -> np.ndarray:
    """Flux-conserving resample onto ``num_pix`` x ``num_pix`` pixels of ``scale_out_arcsec``,
    centred on the image centre (the same centring as the simulator's grid)."""
    ny, nx = image.shape
    wy = overlap_matrix(ny, scale_y_arcsec, num_pix, scale_out_arcsec, (ny - 1) / 2.0)
    wx = overlap_matrix(nx, scale_x_arcsec, num_pix, scale_out_arcsec, (nx - 1) / 2.0)
    return wy @ image @ wx.T


def check_covers(info: CutoutInfo, cfg: IngestConfig) -> None:
    """A cutout must cover the target field (up to one target pixel, padded with sky)."""
    field = cfg.target_num_pix * cfg.target_pixel_scale_arcsec
    sx, sy = info.pixel_scales_arcsec
    h, w = info.shape
    m = info.scale_matrix_arcsec
    if abs(m[0, 1]) > abs(m[0, 0]) and cfg.orientation != "asis":
        (h, w), (sx, sy) = (w, h), (sy, sx)
    got = min(w * sx, h * sy)
    if got < field - cfg.target_pixel_scale_arcsec:
        raise UserError(
            f'{info.path}: cutout is {w * sx:.2f}" x {h * sy:.2f}" ({w}x{h} px), smaller than the '
            f'target field {field:.2f}" ({cfg.target_num_pix} px of {cfg.target_pixel_scale_arcsec}")'
        )


# The target grid may resample an input by at most this factor either way. Real pairs stay well
# inside it (SDSS 0.396"/px onto HST's 0.05" is 7.9; JWST 0.031" onto Euclid's 0.1" is 1/3.2); a
# factor beyond it is a wrong --input-pixel-scale or WCS (50"/px, 1 deg/px), whose result is one input
# pixel smeared over the whole field: a constant image.
MAX_RESAMPLE = 20.0


def check_scale(info: CutoutInfo, cfg: IngestConfig) -> None:
    """The input's pixel scale is within :data:`MAX_RESAMPLE` of the target's, either way."""
    t = cfg.target_pixel_scale_arcsec
    sx, sy = info.pixel_scales_arcsec
    up, down = max(sx, sy) / t, t / min(sx, sy)
    if up <= MAX_RESAMPLE and down <= MAX_RESAMPLE:
        return
    factor = f"upsampled {up:.3g}x" if up > MAX_RESAMPLE else f"downsampled {down:.3g}x"
    scale = f'{sx:g}"/px' if abs(sx - sy) <= 1e-9 * sx else f'{sx:g}" x {sy:g}"/px'
    flag = info.scale_from == "flag"
    where = f"--input-pixel-scale {cfg.input_pixel_scale_arcsec:g}: {info.path}" if flag else info.path
    raise UserError(
        f"{where}: input pixel scale {scale} ({'from --input-pixel-scale' if flag else 'from its WCS'}) "
        f'would be {factor} onto the target grid of {t:g}"/px (expected within {MAX_RESAMPLE:g}x either way: '
        f'an input scale of {t / MAX_RESAMPLE:g} to {t * MAX_RESAMPLE:g}"/px); check the pixel scale'
    )


def prepare(info: CutoutInfo, cfg: IngestConfig) -> tuple[np.ndarray, dict]:
    """(float32 image, max 1, on the target grid; metadata for params.json)."""
    check_scale(info, cfg)
    if not cfg.pad:
        check_covers(info, cfg)
    image, bad = read_cutout(info, cfg)
    if image.shape != info.shape:
        raise UserError(f"{info.path}: image changed since it was inspected ({image.shape} vs {info.shape})")
    sky, sky_std = sky_stats(image, bad, cfg.sky_sigma)
    image = np.where(bad, 0.0, image - sky)
    image, m, ops = orient(image, info.scale_matrix_arcsec, cfg.orientation)
    bad, _, _ = orient(bad, info.scale_matrix_arcsec, cfg.orientation)
    sx, sy = float(np.hypot(m[0, 0], m[1, 0])), float(np.hypot(m[0, 1], m[1, 1]))
    n, s = cfg.target_num_pix, cfg.target_pixel_scale_arcsec
    out = resample(image, sx, sy, n, s)
    # fraction of the output field with no data: masked input pixels plus any area outside the cutout
    area = (s / sx) * (s / sy)
    covered = resample(np.ones_like(image), sx, sy, n, s) / area
    masked = resample(bad.astype(np.float64), sx, sy, n, s) / area
    no_data = np.clip(masked + (1.0 - covered), 0.0, 1.0)
    mask_fraction = float(np.where(no_data < 1e-9, 0.0, no_data).mean())  # rounding noise (1e-16) is no mask
    top = float(out.max())
    if not (np.isfinite(top) and top > 0):
        raise UserError(
            f"{info.path}: HDU {info.hdu or 'array'} has no positive flux in the field after sky "
            f"subtraction (sky {sky:g}, {mask_fraction:.0%} masked)"
        )
    if float(out.max() - out.min()) <= 1e-6 * top:
        raise UserError(
            f"{info.path}: HDU {info.hdu or 'array'} is constant on the target grid (no structure: the "
            f'{n}x{n} px field of {s:g}"/px sees one flat level; expected an image with a source in it)'
        )
    # residual angle between the x axis and the wanted +RA (simulator) or -RA (sky) direction
    want = 1.0 if cfg.orientation == "simulator" else -1.0
    rotation = math.degrees(math.atan2(want * m[1, 0], want * m[0, 0])) if cfg.orientation != "asis" else None
    square = abs(sx - sy) <= 1e-9 * sx
    extra = dict(info.extra)
    if "background_rms" not in extra:  # no noise level in the file: the sigma-clipped scatter of the sky
        extra["background_rms"], extra["noise_from"] = sky_std, "sigma-clipped std of the sky pixels"
    rms = extra.pop("background_rms")
    gain = white_noise_gain(sx, sy, image.shape[0], image.shape[1], n, s)
    meta = {
        "file": str(Path(info.path).resolve()),
        "format": info.kind,
        "hdu": info.hdu,
        **({"row": int(info.member)} if info.member else {}),
        "pixel_scale_arcsec": sx if square else [sx, sy],
        "pixel_scale_from": info.scale_from,
        "shape": list(info.shape),
        "sky_level": sky,
        "mask_fraction": mask_fraction,
        "mask_hdu": info.mask_hdu,
        "flux_scale": top,
        "orientation": cfg.orientation,
        "orientation_ops": ops,
        "rotation_deg": None if rotation is None else round(rotation, 6),
        "num_pix": n,
        "target_pixel_scale_arcsec": s,
        "upsample_factor": round(max(sx, sy) / s, 6),  # > 1: the input pixels are coarser than the target's
        "background_rms": rms,  # per input pixel, in the file's units
        # the same noise in the stored image's units (pixel x flux_scale = file units): per input pixel,
        # and per target pixel for white noise carried through the resampling
        "noise_rms": rms / top,
        "noise_rms_target_pixel": rms * gain / top,
        **extra,
    }
    return (out / top).astype(np.float32), meta
