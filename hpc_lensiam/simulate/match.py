"""``simulate --match FILE`` and the ``hst-f140w`` preset: simulate the instrument a real image came from.

The networks only know their simulations, so real-data answers depend on the simulations having the
real image's pixel scale, field, PSF, noise and flux scale. This module reads those from a cutout that
``ingest`` reads (lenstronomy HDF5 with a ``psf_*.h5`` beside it, or a FITS file whose RMS and PSF
HDUs sit beside its image HDU), through ``hpc_lensiam.shards.cutouts``, and renders in the file's flux
units (e-/s for HST and Euclid) before the usual max normalisation of the stored images.

Choices (docs/simulation.md, "Matching a real image"):

- **Flux scale**: magnitudes through the band's zero point (AB): ``flux_e_per_s = 10**(-0.4 (m - ZP))``.
  ZP comes from the file's header (``MAGZERO``), else from a table of HST WFC3/IR filters named in the
  file name, else it is calibrated so that the real image's central flux (within
  ``CALIBRATION_RADIUS_ARCSEC``) is the deflector prior's middle magnitude (``zero_point_from`` says which).
- **Noise**: Poisson on the model (``image / exposure_time`` variance, the file's median exposure;
  none when the file gives no exposure) plus background noise of ``background_rms_e_per_s``, white or
  with a nearest-neighbour correlation ``correlated_noise_rho`` (separable 3-tap kernel, variance kept).
- **PSF**: the file's ``kernel_point_source`` (refused unless it sums to 1 within 5%; then normalised),
  resampled when its header gives another pixel scale, plus ``bank_size - 1`` copies blurred by a small
  elliptical Gaussian (FWHM up to ``broadening_frac`` wider): the bank of PSF uncertainty a real fit has.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import Range, check_range, from_dict
from ..core.errors import ConfigError, UserError
from .config import InstrumentConfig, LensPrior, SourcePrior
from .psf import PSFBank, fwhm_arcsec
from .simulator import LensSimulator

PRESETS = ("hst-f140w",)
# AB zero points (e-/s) of HST WFC3/IR filters (STScI WFC3 IR photometry tables, infinite aperture)
WFC3_IR_ZERO_POINTS_AB = {"F105W": 26.27, "F110W": 26.82, "F125W": 26.23, "F140W": 26.45, "F160W": 25.95}
CALIBRATION_RADIUS_ARCSEC = 2.0
PSF_SUM_TOLERANCE = 0.05
DATA_DIR = Path(__file__).with_name("data")


# ------------------------------------------------------------------------------------------ config
@dataclass
class MatchedLensLight:
    """Two elliptical Sersic components (a compact bulge and an extended envelope) sharing the mass's
    centre and ellipticity (perturbed), with a total magnitude in the band; ``bulge_fraction`` of the
    flux in the bulge."""

    mag: Range = (17.0, 20.0)
    bulge_fraction: Range = (0.3, 0.8)
    bulge_R_sersic_arcsec: Range = (0.1, 0.6)
    bulge_n_sersic: Range = (3.0, 5.5)
    envelope_R_sersic_arcsec: Range = (0.6, 2.0)
    envelope_n_sersic: Range = (0.8, 2.0)
    follow_mass_sigma_frac: float = 0.025

    def validate(self, where: str) -> None:
        check_range(where, "mag", self.mag)
        check_range(where, "bulge_fraction", self.bulge_fraction, lo=0.0, hi=1.0)
        for name in ("bulge_R_sersic_arcsec", "envelope_R_sersic_arcsec"):
            check_range(where, name, getattr(self, name), lo=0.0, strict_lo=True)
        for name in ("bulge_n_sersic", "envelope_n_sersic"):
            check_range(where, name, getattr(self, name), lo=0.2, hi=10.0)


@dataclass
class MatchedNoise:
    """The file's noise: background RMS and exposure in its own units (e-/s, seconds)."""

    background_rms_e_per_s: float = 0.0155
    exposure_time_s: float | None = 452.0  # None: no Poisson term (the file gave no exposure)
    correlated_noise_rho: float = 0.0  # nearest-neighbour correlation of the background noise

    def validate(self, where: str) -> None:
        if not self.background_rms_e_per_s > 0:
            raise ConfigError(f"{where}.background_rms_e_per_s: must be > 0")
        if self.exposure_time_s is not None and not self.exposure_time_s > 0:
            raise ConfigError(f"{where}.exposure_time_s: must be > 0 (or null: no Poisson noise)")
        if not 0.0 <= self.correlated_noise_rho <= 0.7:
            raise ConfigError(
                f"{where}.correlated_noise_rho: {self.correlated_noise_rho} is outside [0, 0.7] "
                "(a 3-tap kernel reaches 1/sqrt(2))"
            )


@dataclass
class MatchedPSF:
    """The bank around the file's PSF: kernel 0 is the file's; the others are blurred by an elliptical
    Gaussian that widens the FWHM by a fraction in ``broadening_frac`` with axis ratio 1 - ``ellipticity``."""

    bank_size: int = 8
    broadening_frac: Range = (0.0, 0.03)
    ellipticity: Range = (0.0, 0.1)

    def validate(self, where: str) -> None:
        if self.bank_size < 1:
            raise ConfigError(f"{where}.bank_size: must be >= 1")
        check_range(where, "broadening_frac", self.broadening_frac, lo=0.0, hi=0.5)
        check_range(where, "ellipticity", self.ellipticity, lo=0.0, hi=0.5)


@dataclass
class MatchedSimulationConfig:
    """The paper family's simulator with a real image's instrument (``--match``/``hst-f140w``)."""

    preset: str = "match"
    match_file: str | None = None  # the cutout whose instrument this is (None: a stored preset)
    match_psf_file: str | None = None  # where its PSF came from ("repo:..." for a stored preset)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    lens: LensPrior = field(default_factory=LensPrior)
    lens_light: MatchedLensLight = field(default_factory=MatchedLensLight)
    source: SourcePrior = field(default_factory=SourcePrior)
    source_mag: Range = (20.5, 24.0)  # unlensed total magnitude of the source
    noise: MatchedNoise = field(default_factory=MatchedNoise)
    psf: MatchedPSF = field(default_factory=MatchedPSF)
    zero_point_mag: float = 26.45
    zero_point_from: str = "WFC3/IR F140W AB"
    flux_units: str = "e-/s"
    psf_kernel_sha256: str = ""  # of the file's normalised kernel: part of the config hash
    cosmos_dir: str | None = None
    psf_files: list[str] = field(default_factory=list)  # unused (the PSF is the file's); kept for input_hashes
    psf_pixel_scale_arcsec: float | None = None
    psf_bank_seed: int = 0

    def validate(self, where: str) -> None:
        check_range(where, "source_mag", self.source_mag)
        half = self.instrument.num_pix * self.instrument.pixel_scale_arcsec / 2
        reach = max(abs(v) for v in self.lens.center_x_arcsec) + max(abs(v) for v in self.source.center_arcsec)
        if reach >= half:
            raise ConfigError(f'{where}: lens and source centres reach outside the field (+-{half:g}")')


# -------------------------------------------------------------------------------- reading the file
@dataclass
class MatchedInstrument:
    """What a real cutout says about its instrument, in its own units."""

    path: str
    shape: tuple[int, int]
    pixel_scale_arcsec: float
    psf_kernel: np.ndarray  # at pixel_scale_arcsec, odd, centred, sum 1
    psf_path: str
    background_rms_e_per_s: float
    exposure_time_s: float | None
    zero_point_mag: float | None  # None: not in the header or the filter table
    zero_point_from: str
    image: np.ndarray  # the real pixels (for the flux calibration and the figure)


def _fail(path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


def _fits_band_psf(info, path: str) -> tuple[np.ndarray, float | None, str]:
    """A FITS cutout's PSF: the HDU named like its image HDU with ``_PSF`` (``VIS_FLUX`` -> ``VIS_PSF``)."""
    from ..shards.cutouts import _open_fits
    from .psf import _header_scale

    name = info.hdu
    base = re.sub(r"_(FLUX|SCI|IMAGE)$", "", str(name), flags=re.I)
    with _open_fits(path) as hdul:
        names = [h.name for h in hdul]
        psf_name = f"{base}_PSF"
        if psf_name not in names:
            raise _fail(path, f"no PSF found (expected an HDU {psf_name!r} beside {name!r}; it has {', '.join(names)})")
        h = hdul[psf_name]
        return np.array(h.data, dtype=np.float64), _header_scale(h.header), f"{path}[{psf_name}]"


def read_instrument(path: str, psf: str | None = None) -> MatchedInstrument:
    """Read a cutout's instrument with ingest's reader; a UserError naming the file for anything missing."""
    from ..shards.cutouts import CutoutOptions, find_psf, inspect_cutout, read_cutout, read_psf

    cfg = CutoutOptions()
    info = inspect_cutout(str(path), cfg)
    if info.kind not in ("hdf5", "fits"):
        raise _fail(path, f"a {info.kind} file has no instrument to match (expected a lenstronomy HDF5 or FITS cutout)")
    image, bad = read_cutout(info, cfg)
    sx, sy = info.pixel_scales_arcsec
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise _fail(path, f'pixels are not square ({sx:g}" x {sy:g}"); expected square pixels')
    scale = 0.5 * (sx + sy)
    psf_scale = None
    if info.kind == "hdf5":
        psf_path = find_psf(str(path), psf)
        if psf_path is None:
            raise _fail(
                path, "no PSF found (expected one psf_*.h5 with 'kernel_point_source' beside it, or --match-psf)"
            )
        kernel = read_psf(psf_path, "--match PSF")
    elif psf:
        psf_path, kernel = psf, read_psf(psf, "--match PSF")
    else:
        kernel, psf_scale, psf_path = _fits_band_psf(info, str(path))
    total = float(np.sum(kernel))
    if not (np.all(np.isfinite(kernel)) and abs(total - 1.0) <= PSF_SUM_TOLERANCE):
        raise _fail(
            psf_path, f"PSF sums to {total:.4g} (expected a normalised kernel, sum 1 within {PSF_SUM_TOLERANCE})"
        )
    kernel = np.clip(kernel, 0.0, None)
    if psf_scale is not None and abs(psf_scale - scale) > 1e-3 * scale:
        from .psf import resample_psf

        kernel = resample_psf(kernel, psf_scale, scale, max(kernel.shape) | 1, where=psf_path)
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        kernel = kernel[: kernel.shape[0] - 1 + kernel.shape[0] % 2, : kernel.shape[1] - 1 + kernel.shape[1] % 2]
    kernel = kernel / kernel.sum()
    rms = info.extra.get("background_rms")
    if not (rms and rms > 0):
        raise _fail(path, "no background noise level (expected 'background_rms' or an RMS HDU beside the image)")
    exposure = info.extra.get("exposure_time_s") or None
    zp, zp_from = _zero_point(path)
    return MatchedInstrument(
        str(path),
        tuple(image.shape),
        float(scale),
        kernel,
        str(psf_path),
        float(rms),
        float(exposure) if exposure else None,
        zp,
        zp_from,
        np.where(bad, 0.0, image),
    )


def _zero_point(path) -> tuple[float | None, str]:
    """AB zero point from a FITS header (MAGZERO/ZP) or a WFC3/IR filter in the file name; (None, '') if neither."""
    p = Path(path)
    if p.suffix.lower() in (".fits", ".fit", ".fz"):
        from astropy.io import fits

        with fits.open(p) as hdul:
            for h in hdul:
                for key in ("MAGZERO", "MAGZPT", "ZP", "ZEROPNT"):
                    v = h.header.get(key)
                    if isinstance(v, (int, float)):
                        return float(v), f"header {key} of {h.name}"
    m = re.search(r"F\d{3}[WXMNL]P?", p.stem.upper())
    if m and m.group(0) in WFC3_IR_ZERO_POINTS_AB:
        return WFC3_IR_ZERO_POINTS_AB[m.group(0)], f"WFC3/IR {m.group(0)} AB (file name)"
    return None, ""


def central_flux_e_per_s(image: np.ndarray, pixel_scale_arcsec: float, radius_arcsec: float) -> float:
    """Flux within ``radius_arcsec`` of the cutout centre (the lens): what the flux calibration matches."""
    n0, n1 = image.shape
    yy, xx = np.mgrid[:n0, :n1]
    r = np.hypot(yy - (n0 - 1) / 2, xx - (n1 - 1) / 2) * pixel_scale_arcsec
    return float(image[r <= radius_arcsec].sum())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kernel_sha256(kernel: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(kernel, dtype="<f8").tobytes()).hexdigest()


# --------------------------------------------------------------------------------------- presets
def _preset_kernel(name: str) -> np.ndarray:
    k = np.load(DATA_DIR / f"psf_{name.replace('-', '_')}.npy", allow_pickle=False).astype(np.float64)
    return k / k.sum()


def _base(preset: str, instrument: dict, noise: dict, zp: float, zp_from: str, kernel, **more) -> dict:
    return {
        "preset": preset,
        "instrument": {
            "name": preset,
            "supersampling_factor": 2,
            "psf_size_pix": int(kernel.shape[0]),
            **instrument,
        },
        # theta_E of DESI-HST-like lenses (0.87-3.32" measured); centres within a pixel of the cutout centre;
        # mass axis ratios q >~ 0.5 (|e| <= 0.28; the five fitted DESI-HST lenses have q 0.66-0.95, the
        # paper's e1, e2 in [-0.5, 0.5] made q ~ 0.2 deflectors that no such sample has)
        "lens": {
            "theta_E_arcsec": (0.5, 3.5),
            "e1": (-0.2, 0.2),
            "e2": (-0.2, 0.2),
            "center_x_arcsec": (-0.08, 0.08),
            "center_y_arcsec": (-0.08, 0.08),
        },
        "source": {"center_arcsec": (-0.3, 0.3)},
        "noise": noise,
        "zero_point_mag": zp,
        "zero_point_from": zp_from,
        "psf_kernel_sha256": kernel_sha256(kernel),
        **more,
    }


PRESET_NUMBERS = {
    # From desi_hst/*.h5 (10 DESI Legacy Surveys lenses, HST WFC3/IR F140W SNAPshots): 0.08"/px,
    # background_rms median 0.0160 e-/s (0.0121-0.0185), exposure median 452 s (444-459 s), the
    # psf_F140W.h5 kernel (cropped to 41 x 41, renormalised: hpc_lensiam/simulate/data/psf_hst_f140w.npy).
    # 100 px = 8" holds arcs of theta_E up to 3.5" (the real cutouts are 94-230 px).
    "hst-f140w": dict(
        instrument={"num_pix": 100, "pixel_scale_arcsec": 0.08},
        noise={"background_rms_e_per_s": 0.0160, "exposure_time_s": 452.0},
        zp=WFC3_IR_ZERO_POINTS_AB["F140W"],
        zp_from="WFC3/IR F140W AB",
    ),
}


def matched_config(
    match: str | None = None,
    preset: str | None = None,
    config_path: str | None = None,
    num_pix: int | None = None,
    correlated_noise_rho: float | None = None,
    cosmos_dir: str | None = None,
    match_psf: str | None = None,
) -> MatchedSimulationConfig:
    """The validated config of ``--match FILE`` or of a stored preset; YAML (``--config``) and flags on top."""
    from ..core.config import read_yaml

    if match is not None:
        inst = read_instrument(match, match_psf)
        n = int(num_pix) if num_pix else int(max(inst.shape))
        zp, zp_from = inst.zero_point_mag, inst.zero_point_from
        if zp is None:  # calibrate: the real central flux is the deflector prior's middle magnitude
            flux = central_flux_e_per_s(inst.image, inst.pixel_scale_arcsec, CALIBRATION_RADIUS_ARCSEC)
            if not flux > 0:
                raise _fail(match, "no zero point (header, filter) and no positive central flux to calibrate one from")
            zp = float(np.mean(MatchedLensLight().mag) + 2.5 * math.log10(flux))
            zp_from = f'calibrated: flux within {CALIBRATION_RADIUS_ARCSEC}" of the centre = the middle deflector mag'
        data = _base(
            "match",
            {"num_pix": n, "pixel_scale_arcsec": inst.pixel_scale_arcsec},
            {"background_rms_e_per_s": inst.background_rms_e_per_s, "exposure_time_s": inst.exposure_time_s},
            zp,
            zp_from,
            inst.psf_kernel,
            match_file=str(Path(match).resolve()),
            match_psf_file=str(Path(inst.psf_path.split("[")[0]).resolve())
            + (inst.psf_path[len(inst.psf_path.split("[")[0]) :] if "[" in inst.psf_path else ""),
        )
    else:
        if preset not in PRESETS:
            raise UserError(f"--preset: {preset!r} is not a matched preset ({', '.join(PRESETS)})")
        kernel = _preset_kernel(preset)
        p = PRESET_NUMBERS[preset]
        data = _base(
            preset, p["instrument"], p["noise"], p["zp"], p["zp_from"], kernel, match_psf_file=f"repo:{preset}"
        )
        if num_pix:
            data["instrument"]["num_pix"] = int(num_pix)
    if config_path:
        extra = read_yaml(config_path)
        for k, v in extra.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    if correlated_noise_rho is not None:
        data["noise"] = {**data["noise"], "correlated_noise_rho": float(correlated_noise_rho)}
    if cosmos_dir is not None:
        data["cosmos_dir"] = cosmos_dir
    return from_dict(MatchedSimulationConfig, data, str(config_path or match or preset))


def config_kernel(cfg: MatchedSimulationConfig) -> np.ndarray:
    """The base PSF kernel of a matched config (the file's, or the stored preset's), checked against its hash."""
    if cfg.match_file:
        kernel = read_instrument(cfg.match_file, _explicit_psf(cfg)).psf_kernel
    else:
        kernel = _preset_kernel(cfg.preset)
    if cfg.psf_kernel_sha256 and kernel_sha256(kernel) != cfg.psf_kernel_sha256:
        raise UserError(f"{cfg.match_psf_file}: PSF kernel changed since this config was made (sha256 differs)")
    return kernel


def _explicit_psf(cfg) -> str | None:
    p = cfg.match_psf_file or ""
    return None if (not p or "[" in p or p.startswith("repo:")) else p


# ------------------------------------------------------------------------------------- physics
def sersic_total_flux(amp: float, R_sersic_arcsec: float, n_sersic: float) -> float:
    """Total flux of lenstronomy's SERSIC(_ELLIPSE) with amplitude ``amp`` (surface brightness at R_sersic).

    lenstronomy's elliptical radius sqrt(q x^2 + y^2 / q) keeps the area, so the total does not depend on
    the ellipticity: F = amp 2 pi n R^2 e^b Gamma(2n) / b^(2n), with lenstronomy's own b(n) (the
    1.9992 n - 0.3271 approximation it renders with: the exact root would be 0.1% off at n = 1).
    """
    from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil
    from scipy.special import gamma

    b = float(SersicUtil.b_n(n_sersic))
    shape = 2 * math.pi * n_sersic * math.exp(b) * gamma(2 * n_sersic) / b ** (2 * n_sersic)
    return float(amp * R_sersic_arcsec**2 * shape)


def mag_to_e_per_s(mag: float, zero_point_mag: float) -> float:
    return float(10.0 ** (-0.4 * (mag - zero_point_mag)))


def neighbour_kernel_tap(rho: float) -> float:
    """Tap c of the separable kernel [c, 1, c] (x) [c, 1, c] whose white-noise output has correlation
    ``rho`` between adjacent pixels: rho = 2c / (1 + 2c^2), the smaller root."""
    if rho <= 0:
        return 0.0
    return (1.0 - math.sqrt(max(0.0, 1.0 - 2.0 * rho * rho))) / (2.0 * rho)


def background_noise(rng: np.random.Generator, shape, rms_e_per_s: float, rho: float = 0.0) -> np.ndarray:
    """Stationary Gaussian noise of per-pixel RMS ``rms_e_per_s`` and nearest-neighbour correlation ``rho``.

    White noise on a field one pixel larger on every side is filtered by [c, 1, c] along each axis
    ('valid' part only, so edges are not special), then scaled back to the asked RMS.
    """
    c = neighbour_kernel_tap(rho)
    if c == 0.0:
        return rng.normal(0.0, rms_e_per_s, size=shape)
    w = rng.normal(0.0, 1.0, size=(shape[0] + 2, shape[1] + 2))
    a = w[:, :-2] * c + w[:, 1:-1] + w[:, 2:] * c
    b = a[:-2] * c + a[1:-1] + a[2:] * c
    return b * (rms_e_per_s / (1.0 + 2.0 * c * c))


def neighbour_correlation(noise: np.ndarray) -> float:
    """Mean correlation of horizontally and vertically adjacent pixels of a noise field."""
    x = noise - noise.mean()
    v = float((x * x).mean())
    return 0.5 * (float((x[:, 1:] * x[:, :-1]).mean()) + float((x[1:] * x[:-1]).mean())) / v


def robust_noise_rms(image: np.ndarray, border_pix: int = 8) -> float:
    """Noise RMS from the border strips, by the MAD of adjacent-pixel differences / sqrt(2): smooth light
    (a lens galaxy's wing) cancels in the differences, white noise does not (correlated noise reads low)."""
    b = border_pix
    strips = [image[:b], image[-b:], image[b:-b, :b], image[b:-b, -b:]]
    d = np.concatenate([np.diff(s, axis=1).ravel() for s in strips])
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def psf_bank(cfg: MatchedSimulationConfig, kernel: np.ndarray) -> PSFBank:
    """Kernel 0 = the file's; kernel i > 0 blurred by an elliptical Gaussian (seeded by ``psf_bank_seed``)
    whose size is solved for (bisection) so that the blurred kernel's fitted FWHM is (1 + f) x the file's,
    f drawn from ``broadening_frac``: the FWHM promise holds for any PSF shape, not only a Gaussian one."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.psf_bank_seed), 0x3A7C]))
    scale = cfg.instrument.pixel_scale_arcsec
    kernels, names = [kernel], ["match:0"]
    with warnings.catch_warnings():  # scipy's "covariance could not be estimated": the fit itself is fine
        warnings.simplefilter("ignore")
        fwhm0 = fwhm_arcsec(kernel, scale)
        for i in range(1, cfg.psf.bank_size):
            f = float(rng.uniform(*cfg.psf.broadening_frac))
            e = float(rng.uniform(*cfg.psf.ellipticity))
            phi = float(rng.uniform(0.0, math.pi))
            lo, hi = 0.0, max(1.0, fwhm0 / scale)
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                if fwhm_arcsec(_blur_elliptical(kernel, mid, e, phi), scale) > (1.0 + f) * fwhm0:
                    hi = mid
                else:
                    lo = mid
            kernels.append(_blur_elliptical(kernel, lo, e, phi))
            names.append(f"match:{i}")
    return PSFBank(kernels, names, scale)


def _blur_elliptical(kernel: np.ndarray, sigma_pix: float, ellipticity: float, phi: float) -> np.ndarray:
    """``kernel`` convolved with an elliptical Gaussian (sigmas sigma sqrt(1 +- e), major axis at ``phi``).

    Done in Fourier space (transfer function exp(-2 pi^2 k.C.k)), so a blur of a fraction of a pixel is
    exact: a Gaussian that narrow sampled at pixel centres would be a delta and blur nothing. The kernel
    is zero-padded so nothing wraps round; tiny negative ringing is clipped and the sum kept at 1.
    """
    if sigma_pix <= 0:
        return kernel
    pad = int(math.ceil(4 * sigma_pix)) + 2
    k = np.pad(kernel, pad)
    ky = np.fft.fftfreq(k.shape[0])[:, None]
    kx = np.fft.rfftfreq(k.shape[1])[None, :]
    u = kx * math.cos(phi) + ky * math.sin(phi)
    v = -kx * math.sin(phi) + ky * math.cos(phi)
    sa2, sb2 = sigma_pix**2 * (1 + ellipticity), sigma_pix**2 * (1 - ellipticity)
    out = np.fft.irfft2(np.fft.rfft2(k) * np.exp(-2 * math.pi**2 * (sa2 * u**2 + sb2 * v**2)), s=k.shape)
    out = np.clip(out[pad:-pad, pad:-pad], 0.0, None)
    return out / out.sum()


# ------------------------------------------------------------------------------------ simulator
class MatchedSimulator(LensSimulator):
    """LensSimulator in the matched file's units: lens (two Sersics) and source by magnitude through the
    zero point, the file's PSF bank, Poisson + background noise of the file. Stored images are divided by
    their maximum, like every other image of this package; ``peak_e_per_s`` in a view's params gives the
    divisor, so ``image x peak_e_per_s`` is the image in the file's units (e-/s)."""

    def __init__(self, config: MatchedSimulationConfig):
        from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

        from .instrument import DetectorGrid
        from .simulator import EPLShearRayShooter
        from .sources import CosmosCatalog, SourceRenderer

        self.config = config
        self.grid = DetectorGrid.from_config(config.instrument)
        self.ray_shooter = EPLShearRayShooter(self.grid.x_arcsec, self.grid.y_arcsec)
        self._lens_light = SersicElliptic()
        sp = config.source
        self.catalog = (
            CosmosCatalog(
                config.cosmos_dir,
                min_size_pix=sp.cosmos_min_size_pix,
                max_noise_frac=sp.cosmos_max_noise_frac,
                clean_k_sigma=sp.cosmos_clean_k_sigma,
            )
            if config.cosmos_dir
            else None
        )
        self.sources = SourceRenderer(self.catalog)
        self.psf_bank = psf_bank(config, config_kernel(config))

    def _draw_view_nuisance(self, rng: np.random.Generator, lens: dict) -> dict:
        from .priors import draw_source, uniform

        cfg, ll = self.config, self.config.lens_light
        f = ll.follow_mass_sigma_frac
        lp = cfg.lens

        def width(b):
            return float(b[1] - b[0])

        shared = {
            "e1": lens["e1"] + float(rng.normal(0.0, f * width(lp.e1))),
            "e2": lens["e2"] + float(rng.normal(0.0, f * width(lp.e2))),
            "center_x": lens["center_x"] + float(rng.normal(0.0, f * width(lp.center_x_arcsec))),
            "center_y": lens["center_y"] + float(rng.normal(0.0, f * width(lp.center_y_arcsec))),
        }
        e = math.hypot(shared["e1"], shared["e2"])
        if e > 0.95:
            shared["e1"], shared["e2"] = shared["e1"] * 0.95 / e, shared["e2"] * 0.95 / e
        mag = uniform(rng, ll.mag)
        frac = uniform(rng, ll.bulge_fraction)
        bulge = {"R_sersic": uniform(rng, ll.bulge_R_sersic_arcsec), "n_sersic": uniform(rng, ll.bulge_n_sersic)}
        env = {"R_sersic": uniform(rng, ll.envelope_R_sersic_arcsec), "n_sersic": uniform(rng, ll.envelope_n_sersic)}
        total = mag_to_e_per_s(mag, cfg.zero_point_mag)
        for comp, flux in ((bulge, frac * total), (env, (1.0 - frac) * total)):
            comp.update(shared)
            comp["flux_e_per_s"] = flux
            comp["amp"] = flux / sersic_total_flux(1.0, comp["R_sersic"], comp["n_sersic"])
        source = draw_source(rng, cfg.source, lens, self.catalog, self.sources)
        source_mag = uniform(rng, cfg.source_mag)
        return {
            "lens_light": {"mag": mag, "bulge_fraction": frac, "components": [bulge, env]},
            "source": source,
            "source_mag": source_mag,
            "psf_id": int(rng.integers(len(self.psf_bank))),
        }

    def _physical_image(self, beta_x, beta_y, view: dict, lens: dict) -> np.ndarray:
        """Noiseless image in e-/s per pixel: mean surface brightness x pixel area, PSF-convolved."""
        cfg = self.config
        area = self.grid.pixel_area_arcsec2
        image = self._source_image(beta_x, beta_y, view["source"], lens) * mag_to_e_per_s(
            view["source_mag"], cfg.zero_point_mag
        )
        for comp in view["lens_light"]["components"]:
            unit = self._lens_light_unit(comp)
            image = image + comp["amp"] * unit
        return self.psf_bank.convolve(image * area, view["psf_id"])

    def add_noise(self, image_e_per_s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson (Gaussian approximation of counts / exposure) + background noise, in e-/s."""
        n = self.config.noise
        out = np.array(image_e_per_s, dtype=np.float64)
        if n.exposure_time_s:
            out = out + rng.normal(0.0, 1.0, size=out.shape) * np.sqrt(np.clip(out, 0.0, None) / n.exposure_time_s)
        return out + background_noise(rng, out.shape, n.background_rms_e_per_s, n.correlated_noise_rho)

    def _sample(self, rng: np.random.Generator, n_views: int):
        from ..shards.manifest import LENS_PARAMS
        from .priors import draw_lens

        lens = draw_lens(rng, self.config.lens)
        beta_x, beta_y = self.ray_shoot(lens)
        images, views = [], []
        for _ in range(n_views):
            view = self._draw_view_nuisance(rng, lens)
            noisy = self.add_noise(self._physical_image(beta_x, beta_y, view, lens), rng)
            peak = float(noisy.max())
            if not (np.isfinite(peak) and peak > 0):
                raise UserError("simulate --match: an image has no positive flux")
            view["psf_name"] = self.psf_bank.names[view["psf_id"]]
            view["peak_e_per_s"] = peak
            # background RMS in the stored image's units (what display.noise_sigma reads)
            view["noise_sigma"] = self.config.noise.background_rms_e_per_s / peak
            view["flux_units"] = self.config.flux_units
            images.append((noisy / peak).astype(np.float32))
            views.append(view)
        return images, {"lens": {k: float(lens[k]) for k in LENS_PARAMS}, "views": views}
