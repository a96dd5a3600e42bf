"""The simulation's typed config: lens, lens-light and source priors, the instrument and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import Range, check_fraction, check_range, from_dict, option, read_yaml
from ..core.errors import ConfigError


@dataclass
class LensPrior:
    """Elliptical power-law mass (lenstronomy EPL) + external shear (SHEAR); uniform priors."""

    theta_E_arcsec: Range = (0.8, 1.8)
    gamma: Range = (1.5, 2.5)  # power-law slope, 2 = isothermal
    e1: Range = (-0.5, 0.5)
    e2: Range = (-0.5, 0.5)
    center_x_arcsec: Range = (-0.15, 0.15)
    center_y_arcsec: Range = (-0.15, 0.15)
    gamma1: Range = (-0.12, 0.12)  # external shear components
    gamma2: Range = (-0.12, 0.12)

    def validate(self, where: str) -> None:
        check_range(where, "theta_E_arcsec", self.theta_E_arcsec, lo=0.0, strict_lo=True)
        check_range(where, "gamma", self.gamma, lo=1.0, hi=3.0, strict_lo=True)
        for name in ("e1", "e2"):
            check_range(where, name, getattr(self, name), lo=-0.9, hi=0.9)
        for name in ("center_x_arcsec", "center_y_arcsec"):
            check_range(where, name, getattr(self, name))
        for name in ("gamma1", "gamma2"):
            check_range(where, name, getattr(self, name), lo=-0.5, hi=0.5)


@dataclass
class LensLightPrior:
    """Elliptical Sersic lens light whose centre and ellipticity follow the mass, perturbed."""

    R_sersic_arcsec: Range = (0.5, 1.5)
    n_sersic: Range = (2.0, 5.0)
    peak_ratio: Range = (0.2, 1.5)  # lens-light peak / lensed-source peak, before noise
    follow_mass_sigma_frac: float = 0.025  # Gaussian sigma, as a fraction of that parameter's prior range

    def validate(self, where: str) -> None:
        check_range(where, "R_sersic_arcsec", self.R_sersic_arcsec, lo=0.0, strict_lo=True)
        check_range(where, "n_sersic", self.n_sersic, lo=0.2, hi=10.0)
        check_range(where, "peak_ratio", self.peak_ratio, lo=0.0)
        if self.follow_mass_sigma_frac < 0:
            raise ConfigError(f"{where}.follow_mass_sigma_frac: must be >= 0")


@dataclass
class SourcePrior:
    """Source mix: COSMOS real galaxies, analytic core-Sersic, mergers of two."""

    cosmos_fraction: float = 0.75  # used only when a COSMOS catalog is given
    merger_fraction: float = 0.10
    center_arcsec: Range = (-0.25, 0.25)  # source position relative to the lens centre
    merger_offset_arcsec: Range = (0.1, 0.4)
    merger_flux_ratio: Range = (0.3, 1.0)  # second merger component's total flux / the first's
    R_sersic_arcsec: Range = (0.08, 0.35)
    n_sersic: Range = (0.8, 4.0)
    e1: Range = (-0.3, 0.3)
    e2: Range = (-0.3, 0.3)
    R_b_arcsec: Range = (0.01, 0.05)  # core-Sersic break radius
    core_gamma: Range = (0.0, 0.5)  # inner power-law slope
    core_alpha: Range = (2.0, 5.0)  # sharpness of the transition
    cosmos_min_size_pix: int = 50  # paper cut: stamp side >= 50 px
    cosmos_max_noise_frac: float = 0.05  # paper cut: noise RMS < 5% of the stamp's peak
    cosmos_scale: Range = (0.5, 1.0)  # source-plane arcsec per COSMOS arcsec (redshift dimming of size)
    cosmos_clean_k_sigma: float | None = None  # clean stamps: pedestal off, pixels < k noise RMS -> 0

    def validate(self, where: str) -> None:
        check_fraction(where, "cosmos_fraction", self.cosmos_fraction)
        check_fraction(where, "merger_fraction", self.merger_fraction)
        check_range(where, "center_arcsec", self.center_arcsec)
        check_range(where, "merger_offset_arcsec", self.merger_offset_arcsec, lo=0.0)
        check_range(where, "merger_flux_ratio", self.merger_flux_ratio, lo=0.0, strict_lo=True)
        check_range(where, "R_sersic_arcsec", self.R_sersic_arcsec, lo=0.0, strict_lo=True)
        check_range(where, "n_sersic", self.n_sersic, lo=0.2, hi=10.0)
        check_range(where, "e1", self.e1, lo=-0.9, hi=0.9)
        check_range(where, "e2", self.e2, lo=-0.9, hi=0.9)
        check_range(where, "R_b_arcsec", self.R_b_arcsec, lo=0.0, strict_lo=True)
        check_range(where, "core_gamma", self.core_gamma, lo=0.0)
        check_range(where, "core_alpha", self.core_alpha, lo=0.0, strict_lo=True)
        check_range(where, "cosmos_scale", self.cosmos_scale, lo=0.0, strict_lo=True)
        if self.cosmos_min_size_pix < 1:
            raise ConfigError(f"{where}.cosmos_min_size_pix: must be >= 1")
        if self.cosmos_max_noise_frac <= 0:
            raise ConfigError(f"{where}.cosmos_max_noise_frac: must be > 0")
        if self.cosmos_clean_k_sigma is not None and self.cosmos_clean_k_sigma < 0:
            raise ConfigError(f"{where}.cosmos_clean_k_sigma: must be >= 0 (or null: no cleaning)")


@dataclass
class InstrumentConfig:
    """Detector grid, noise and the built-in diffraction PSF of one telescope."""

    name: str = "hst"
    num_pix: int = 110
    pixel_scale_arcsec: float = 0.05
    supersampling_factor: int = 2
    adaptive_supersampling_factor: int = 16  # pixels whose sub-samples differ by more than adaptive_threshold
    adaptive_threshold: float = 0.1  # x the peak are re-rendered at this factor; 0: off (bench/numerics.py)
    noise_sigma: Range = (0.002, 0.05)  # Gaussian sigma as a fraction of the noiseless image peak
    aperture_diameter_m: float = 2.4
    obstruction_frac: float = 0.33  # central obstruction, fraction of the aperture diameter
    wavelength_nm: float = 814.0
    aberration_rms_waves: float = 0.04  # random low-order Zernike aberrations per built-in PSF
    detector_blur_sigma_pix: float = 0.4  # built-in PSF: CCD charge diffusion + pointing jitter (Gaussian)
    psf_bank_size: int = 23  # the paper used 23 TinyTim HST PSFs
    psf_size_pix: int = 21  # odd kernel side, detector pixels

    def validate(self, where: str) -> None:
        if self.num_pix < 8:
            raise ConfigError(f"{where}.num_pix: {self.num_pix} is too small (expected >= 8)")
        if self.pixel_scale_arcsec <= 0:
            raise ConfigError(f"{where}.pixel_scale_arcsec: must be > 0")
        if self.supersampling_factor < 1:
            raise ConfigError(f"{where}.supersampling_factor: must be >= 1")
        if self.adaptive_supersampling_factor < 0 or self.adaptive_threshold < 0:
            raise ConfigError(f"{where}: adaptive_supersampling_factor and adaptive_threshold must be >= 0")
        check_range(where, "noise_sigma", self.noise_sigma, lo=0.0)
        if self.aperture_diameter_m <= 0 or self.wavelength_nm <= 0:
            raise ConfigError(f"{where}: aperture_diameter_m and wavelength_nm must be > 0")
        if not 0.0 <= self.obstruction_frac < 1.0:
            raise ConfigError(f"{where}.obstruction_frac: expected a value in [0, 1)")
        if self.detector_blur_sigma_pix < 0 or self.aberration_rms_waves < 0:
            raise ConfigError(f"{where}: detector_blur_sigma_pix and aberration_rms_waves must be >= 0")
        if self.psf_bank_size < 1:
            raise ConfigError(f"{where}.psf_bank_size: must be >= 1")
        if self.psf_size_pix < 3 or self.psf_size_pix % 2 == 0:
            raise ConfigError(f"{where}.psf_size_pix: expected an odd number >= 3, got {self.psf_size_pix}")


INSTRUMENT_PRESETS: dict[str, dict] = {
    # The paper's setup: HST/ACS-like, 110x110 at 0.05"/px.
    "hst": {},
    # Euclid-VIS-like: coarser pixels, a 1.2 m aperture (wider PSF), noisier; the independent
    # downstream set the pretraining never sees.
    "euclid": dict(
        name="euclid",
        pixel_scale_arcsec=0.1,
        aperture_diameter_m=1.2,
        obstruction_frac=0.3,
        wavelength_nm=725.0,
        noise_sigma=(0.01, 0.1),
        psf_size_pix=15,
    ),
}


@dataclass
class SimulationConfig:
    preset: str = "hst"
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    lens: LensPrior = field(default_factory=LensPrior)
    lens_light: LensLightPrior = field(default_factory=LensLightPrior)
    source: SourcePrior = field(default_factory=SourcePrior)
    cosmos_dir: str | None = None  # GalSim real-galaxy-catalog folder; None = analytic only
    psf_files: list[str] = field(default_factory=list)  # FITS PSFs; empty = built-in bank
    psf_pixel_scale_arcsec: float | None = None  # pixel scale of psf_files (else from FITS header)
    psf_bank_seed: int = 0  # seed of the built-in PSF bank (part of the data set)

    def validate(self, where: str) -> None:
        if self.preset not in INSTRUMENT_PRESETS:
            raise ConfigError(
                f"{where}.preset: unknown preset {self.preset!r} (expected one of: {', '.join(INSTRUMENT_PRESETS)})"
            )
        # Positions must fall inside the field: a lens (or its source) off the image is an empty,
        # noise-only sample that still trains as a "lens".
        half = self.instrument.num_pix * self.instrument.pixel_scale_arcsec / 2
        for name in ("center_x_arcsec", "center_y_arcsec"):
            lens_c, src_c = getattr(self.lens, name), self.source.center_arcsec
            reach = max(abs(v) for v in lens_c) + max(abs(v) for v in src_c)
            if max(abs(v) for v in lens_c) >= half:
                raise ConfigError(
                    f"{where}.lens.{name}: range [{lens_c[0]}, {lens_c[1]}] reaches outside the "
                    f'field (+-{half:g}" = num_pix x pixel_scale_arcsec / 2)'
                )
            if reach >= half:
                raise ConfigError(
                    f"{where}.source.center_arcsec: range [{src_c[0]}, {src_c[1]}] around a lens "
                    f'centre up to {max(abs(v) for v in lens_c):g}" reaches outside the field '
                    f'(+-{half:g}")'
                )
        if self.psf_bank_seed < 0:
            raise ConfigError(f"{where}.psf_bank_seed: must be >= 0, got {self.psf_bank_seed}")
        if self.psf_pixel_scale_arcsec is not None and self.psf_pixel_scale_arcsec <= 0:
            raise ConfigError(f"{where}.psf_pixel_scale_arcsec: must be > 0")


def simulation_config(
    preset: str | None = None, config_path: str | Path | None = None, **overrides
) -> SimulationConfig:
    """Resolve a SimulationConfig: preset defaults <- YAML file <- keyword overrides (non-None)."""
    data: dict = read_yaml(config_path) if config_path else {}
    where = str(config_path) if config_path else "config"
    data = dict(data)
    if preset is not None:
        data["preset"] = preset
    name = data.get("preset", "hst")
    if name not in INSTRUMENT_PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r} (expected one of: {', '.join(INSTRUMENT_PRESETS)})")
    instrument = {**INSTRUMENT_PRESETS[name], **(data.get("instrument") or {})}
    data["instrument"] = instrument
    for k, v in overrides.items():  # nested dicts (instrument={"num_pix": 48}) update, not replace
        if v is None:
            continue
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return from_dict(SimulationConfig, data, where)


SAMPLE_KINDS = ("pairs", "single")  # simulate --samples
MODES = ("lensiam", "single")  # the manifest's name of each of SAMPLE_KINDS, in order
RENDERERS = ("lenstronomy", "torch")  # LensSimulator, or its batched torch twin (docs/online.md)
TORCH_FAMILIES = ("paper",)  # the families the torch renderer implements (the EPL + shear one)
FAMILIES = ("paper", "survey")  # the generative models (simulate/families.py)
# lsst: the survey family only; hst-f140w: simulate/match.py's matched preset
SIMULATE_PRESETS = ("hst", "euclid", "lsst", "hst-f140w")


@dataclass
class SimulateConfig:
    """``hpc-lensiam simulate``: what to simulate, how many and where; the physics is ``physics``'s YAML."""

    out: str | None = option(None, "output shard directory", required=True)
    pairs: int | None = option(None, "number of samples (pairs, or images with --samples single)", required=True)
    samples: str = option(
        "pairs", "pairs: two views of each lens (LenSiam pretraining); single: one image each", choices=SAMPLE_KINDS
    )
    shard_size: int = option(1000, "samples per shard")
    preset: str | None = option(
        None, "instrument; hst-f140w: the DESI-HST F140W lenses' (docs/simulation.md)", choices=SIMULATE_PRESETS
    )
    seed: int = option(0, "random seed of the data set")
    physics: str | None = option(
        None, "simulation YAML: priors and instrument (SimulationConfig, or the survey family's)", metavar="YAML"
    )
    family: str = option(
        "paper", "generative model: the paper's or the survey-realistic one (docs/survey.md)", choices=FAMILIES
    )
    lens_fraction: float | None = option(
        None, "survey family: fraction of lenses (default 0.5 single, 1.0 pairs); the rest non-lenses"
    )
    renderer: str = option(
        "lenstronomy",
        "paper family: lenstronomy (LensSimulator) or the batched torch renderer (docs/online.md)",
        choices=RENDERERS,
    )
    device: str = option("cpu", "--renderer torch: torch device (cpu, cuda, cuda:1)")
    match: str | None = option(
        None,
        "simulate the instrument of a real cutout (lenstronomy HDF5 or FITS): scale, field, PSF, noise, flux",
        metavar="FILE",
    )
    match_psf: str | None = option(None, "--match: its PSF (default: found as ingest does)", metavar="FILE")
    num_pix: int | None = option(None, "--match / hst-f140w: image side (default: the file's)")
    correlated_noise: float | None = option(
        None, "--match / hst-f140w: neighbour correlation of the background noise (default 0: white)", metavar="RHO"
    )
    cosmos_dir: str | None = option(None, "GalSim real-galaxy-catalog folder (COSMOS 23.5/25.2)")
    psf: list[str] = option(help="PSF FITS files (image or cube)", metavar="FITS", default_factory=list)
    psf_pixel_scale: float | None = option(None, "arcsec/pixel of the PSF files")

    def validate(self, where: str) -> None:
        if self.pairs is not None and self.pairs < 1:
            raise ConfigError(f"{where}.pairs: must be >= 1, got {self.pairs}")
        if self.shard_size < 1:
            raise ConfigError(f"{where}.shard_size: must be >= 1, got {self.shard_size}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        if self.lens_fraction is not None:
            check_fraction(where, "lens_fraction", self.lens_fraction)
        if self.renderer == "torch" and self.family not in TORCH_FAMILIES:
            raise ConfigError(
                f"{where}.renderer: torch renders the paper family (EPL + shear) only, not --family {self.family}"
            )
        matched = (self.match, self.match_psf, self.num_pix, self.correlated_noise)
        if self.renderer == "torch" and (any(v is not None for v in matched) or self.preset == "hst-f140w"):
            raise ConfigError(
                f"{where}.renderer: torch renders the paper presets only, not --match or a matched preset"
            )

    @property
    def mode(self) -> str:
        """The manifest's name of ``samples``: lensiam (pairs) or single."""
        return MODES[SAMPLE_KINDS.index(self.samples)]
