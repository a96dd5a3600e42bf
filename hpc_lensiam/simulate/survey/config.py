"""Typed configuration of the survey family: population, composite mass, observation, selection.

Validated once, like every config of the package (``hpc_lensiam.core.config.from_dict``): unknown keys,
wrong types and impossible ranges raise a ConfigError naming the file and key. The resolved config
(with ``lens_fraction`` filled in) is stored in the shard manifest, so a data set says how it was made.
The priors and their sources are documented where they are drawn (population.py, mass.py).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from ...core.config import Range, check_fraction, from_dict, read_yaml
from ...core.errors import ConfigError
from ..config import INSTRUMENT_PRESETS, InstrumentConfig

FAMILY = "survey"
# Observation config of each instrument preset (sky, read noise, exposure, zero point): euclid is
# lenstronomy's SimulationAPI Euclid VIS config; hst is ACS/WFC F814W, the band of the preset's 814 nm
# PSF, given in noise.py (lenstronomy ships HST only as WFC3/F160W, whose sky and zero point do not go
# with an 814 nm PSF; issue 28 (4)).
# lsst: lenstronomy's LSST i-band config at its default 10-year coadd (460 x 15 s, sky 20.48 mag/arcsec^2,
# zero point 27.79, read noise 10 e-), the observatory the slsim LSST sets of ../shared/data use.
OBSERVATIONS = {"euclid": ("Euclid", "VIS"), "hst": ("HST", "ACS_F814W"), "lsst": ("LSST", "i")}

# The survey family's changes to the package's instrument presets (config.INSTRUMENT_PRESETS, shared with
# the paper family, which keeps them). euclid: the built-in diffraction PSF of a 1.2 m aperture at 725 nm
# with the paper family's 0.4 px detector blur is 0.17-0.18" FWHM; the real VIS PSF is 0.207" (issue 28
# (7); Euclid Collaboration: Cropper et al. 2024 quote 0.16-0.2" across the band and field, the Q1 lens
# PSF of ../shared/data measures 0.207"). A 0.55 px Gaussian blur (charge diffusion, jitter and the
# broad band together) gives a median FWHM of 0.207" over the bank (0.20-0.22"). hst: ACS/WFC F814W
# at 0.05"/px drizzled, PSF 0.09-0.1" FWHM as built in.
#
# lsst (survey family only, not a paper-family preset): Rubin's 8.36 m aperture (0.61 linear obstruction)
# at 0.2"/px in i (755 nm), a 64 px (12.8") field. Its diffraction core (0.02") is nothing beside the
# atmosphere: the Gaussian "detector" blur here carries the seeing, 1.455 px, so the bank's pixel-integrated
# FWHM is 0.71" (tests/ops/test_bench_lens_finding.py), lenstronomy's LSST i-band seeing (a Gaussian PSF there too).
# The built-in bank samples the diffraction pattern finely enough for any aperture (psf.py).
SURVEY_INSTRUMENT = {
    "euclid": {"detector_blur_sigma_pix": 0.55},
    "hst": {},
    "lsst": {
        "name": "lsst",
        "num_pix": 64,
        "pixel_scale_arcsec": 0.2,
        "aperture_diameter_m": 8.36,
        "obstruction_frac": 0.61,
        "wavelength_nm": 755.0,
        "detector_blur_sigma_pix": 1.455,
        "psf_size_pix": 15,
    },
}


# Allowed values of every number in a survey config: (low, high, low excluded, high excluded); a [min, max]
# range must lie inside its field's bounds at both ends. Generous: they refuse what no galaxy-scale lens
# survey holds (a 1e9 magnification cut, a 5000 km/s deflector), which would otherwise draw for minutes
# before the per-sample draw budget ends in an error; a merely too strict in-range choice is caught by
# the simulator's early stop (simulator.FAIL_FAST_DRAWS). docs/survey.md lists them.
Bounds = dict[str, tuple[float, float, bool, bool]]


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _check_bounds(obj, where: str, bounds: Bounds) -> None:
    """One ConfigError naming the key, its value and the allowed interval, for the first field out of it."""
    for name, (lo, hi, lo_open, hi_open) in bounds.items():
        value = getattr(obj, name)
        if value is None:
            continue
        ends = value if isinstance(value, (tuple, list)) else (value,)
        ok = all((v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) for v in ends)
        if not ok:
            shown = f"range [{ends[0]:g}, {ends[1]:g}]" if len(ends) == 2 else f"{value:g}"
            raise ConfigError(
                f"{where}.{name}: {shown} is outside the allowed range {_interval(lo, hi, lo_open, hi_open)}"
            )


def _closed(lo: float, hi: float) -> tuple[float, float, bool, bool]:
    return (lo, hi, False, False)


def _above(lo: float, hi: float) -> tuple[float, float, bool, bool]:
    """(lo, hi]: strictly above lo."""
    return (lo, hi, True, False)


@dataclass
class PopulationPrior:
    """Deflector and source populations (redshifts, velocity dispersions, luminosities, sizes)."""

    H0_km_s_Mpc: float = 70.0
    Omega_m: float = 0.3
    z_lens: Range = (0.05, 1.2)  # drawn from dV_c/dz (constant comoving density)
    z_source_max: float = 4.0
    z_source_min_gap: float = 0.1  # z_s >= z_l + gap
    z_source_z0: float = 1.0  # Smail et al. (1994) n(z) ~ z^2 exp(-(z/z0)^1.5)
    sigma_v_km_s: Range = (100.0, 400.0)  # Choi et al. (2007) VDF, lensing-weighted by sigma^4
    fj_M_at_200: float = -21.5  # Faber-Jackson: M_r at sigma = 200 km/s (Bernardi+2003)
    fj_slope: float = -10.0  # dM / dlog10(sigma): L ~ sigma^4
    fj_scatter_mag: float = 0.5
    k_correction_per_z: float = 1.0  # deflector K+e correction in the VIS band, mag per unit z
    size_R_kpc_at_M0: float = 4.0  # early types: R_e(M = fj_M_at_200) (Shen+2003, R ~ L^0.65)
    size_dlogR_dM: float = -0.26
    size_scatter_dex: float = 0.11
    n_sersic_lens: Range = (3.0, 5.0)
    q_light_mean: float = 0.75  # early-type axis ratios (Padilla & Strauss 2008)
    q_light_sigma: float = 0.12
    q_min: float = 0.45
    lens_center_arcsec: Range = (-0.1, 0.1)
    source_M_star: float = -21.0  # source luminosity function (Schechter), M* and alpha
    source_alpha: float = -1.3
    source_M: Range = (-23.0, -18.5)
    source_size_R_kpc_at_M_star: float = 3.0  # late types: R ~ L^0.25 (Shen+2003), (1+z)^-0.75 (van der Wel+2014)
    source_size_dlogR_dM: float = -0.1
    source_size_z_power: float = -0.75
    source_size_scatter_dex: float = 0.2
    source_n_sersic: Range = (0.5, 2.0)
    source_q: Range = (0.3, 1.0)
    source_radius_theta_E: float = 1.2  # lens attempts: source uniform in a disk of this x theta_E_SIS
    interloper_density_arcmin2: float = 15.0  # field galaxies, m in interloper_mag (both classes)
    interloper_mag: Range = (20.0, 25.5)
    interloper_count_slope: float = 0.3  # dN/dm ~ 10^(slope m) (faint galaxy counts)

    BOUNDS: typing.ClassVar[Bounds] = {
        "H0_km_s_Mpc": _closed(20.0, 200.0),
        "Omega_m": (0.0, 1.0, True, True),
        "z_lens": _above(0.0, 5.0),
        "z_source_max": _above(0.0, 10.0),
        "z_source_min_gap": _above(0.0, 5.0),
        "z_source_z0": _above(0.0, 10.0),
        "sigma_v_km_s": _closed(20.0, 1000.0),
        "fj_M_at_200": _closed(-26.0, -16.0),
        "fj_slope": _closed(-20.0, 0.0),
        "fj_scatter_mag": _closed(0.0, 2.0),
        "k_correction_per_z": _closed(-5.0, 5.0),
        "size_R_kpc_at_M0": _above(0.0, 50.0),
        "size_dlogR_dM": _closed(-1.0, 1.0),
        "size_scatter_dex": _closed(0.0, 1.0),
        "n_sersic_lens": _closed(0.2, 10.0),
        "q_light_mean": _above(0.0, 1.0),
        "q_light_sigma": _closed(0.0, 1.0),
        "q_min": _above(0.0, 1.0),
        "lens_center_arcsec": _closed(-50.0, 50.0),  # and inside the field: SurveySimulationConfig.validate
        "source_M_star": _closed(-26.0, -16.0),
        "source_alpha": _closed(-3.0, 1.0),
        "source_M": _closed(-28.0, -10.0),
        "source_size_R_kpc_at_M_star": _above(0.0, 50.0),
        "source_size_dlogR_dM": _closed(-1.0, 1.0),
        "source_size_z_power": _closed(-3.0, 1.0),
        "source_size_scatter_dex": _closed(0.0, 1.0),
        "source_n_sersic": _closed(0.2, 10.0),
        "source_q": _closed(0.05, 1.0),
        "source_radius_theta_E": _above(0.0, 10.0),
        "interloper_density_arcmin2": _closed(0.0, 1000.0),
        "interloper_mag": _closed(10.0, 35.0),
        "interloper_count_slope": _closed(-1.0, 1.0),
    }

    def validate(self, where: str) -> None:
        _check_bounds(self, where, self.BOUNDS)
        if self.z_source_max <= self.z_lens[1] + self.z_source_min_gap:
            raise ConfigError(f"{where}.z_source_max: must exceed z_lens max + z_source_min_gap")


@dataclass
class MassPrior:
    """Composite mass: stellar Sersic (M/L from the lensing budget) + elliptical NFW + shear + m=3,4."""

    stellar_fraction_theta_E: Range = (0.45, 0.85)  # f_* inside theta_E (Auger et al. 2010, SLACS)
    stellar_ml_r_max: float = 8.0  # cap on M*/L_r (solar): old populations, Salpeter to bottom-heavy IMF (mass.py)
    halo_concentration_scatter_dex: float = 0.11  # scatter about c(M) of Duffy et al. (2008) (mass.py)
    halo_q_mean: float = 0.8
    halo_q_sigma: float = 0.1
    mass_light_q_sigma: float = 0.08  # stellar-mass axis ratio = light's + this scatter
    misalignment_deg_sigma: float = 10.0  # light-mass position angle (Bolton+2008, Koopmans+2006)
    shear_median: float = 0.04  # external shear, log-normal (Holder & Schechter 2003)
    shear_scatter_dex: float = 0.25
    shear_max: float = 0.15
    a3_sigma_theta_E: float = 0.005  # multipoles a_m / theta_E (Van de Vyvere et al. 2022)
    a4_sigma_theta_E: float = 0.01
    central_image_radius_theta_E: float = 0.12  # no lensed light, no image counted inside (simulator.py)

    BOUNDS: typing.ClassVar[Bounds] = {
        "stellar_fraction_theta_E": _closed(0.0, 1.0),
        "stellar_ml_r_max": _above(0.0, 100.0),
        "halo_concentration_scatter_dex": _closed(0.0, 1.0),
        "halo_q_mean": _above(0.0, 1.0),
        "halo_q_sigma": _closed(0.0, 1.0),
        "mass_light_q_sigma": _closed(0.0, 1.0),
        "misalignment_deg_sigma": _closed(0.0, 180.0),
        "shear_median": _closed(0.0, 0.5),
        "shear_scatter_dex": _closed(0.0, 1.0),
        "shear_max": _above(0.0, 0.5),
        "a3_sigma_theta_E": _closed(0.0, 0.5),
        "a4_sigma_theta_E": _closed(0.0, 0.5),
        "central_image_radius_theta_E": _closed(0.0, 0.5),
    }

    def validate(self, where: str) -> None:
        _check_bounds(self, where, self.BOUNDS)


@dataclass
class ObservationSettings:
    """Noise in physical units from lenstronomy's SimulationAPI observation config of the preset."""

    num_exposures: int | None = None  # None: the lenstronomy config's value
    exposure_time_s: float | None = None  # per exposure; None: the config's
    sky_brightness_jitter_mag: float = 0.2  # per view: sky varies with pointing (uniform +-)

    BOUNDS: typing.ClassVar[Bounds] = {
        "num_exposures": _closed(1, 10000),
        "exposure_time_s": _above(0.0, 1e5),
        "sky_brightness_jitter_mag": _closed(0.0, 5.0),
    }

    def validate(self, where: str) -> None:
        _check_bounds(self, where, self.BOUNDS)


@dataclass
class SelectionCuts:
    """Survey detectability cuts in the style of Collett (2015), for the systems labelled lens."""

    min_magnification: float = 3.0  # total magnification of the source (extended)
    min_arc_snr: float = 20.0  # arc S/N over pixels where the arc exceeds 1 sigma of the noise
    resolution_factor: float = 1.0  # theta_E^2 > f^2 (r_source^2 + (FWHM / 2)^2)
    min_theta_E_fwhm: float = 1.5  # resolvable: theta_E >= this x the PSF bank's median FWHM (3 half-widths)
    min_theta_E_arcsec: float = 0.0  # and >= this explicit minimum (arcsec)
    max_deflector_mag: float | None = 22.5  # deflector apparent magnitude limit (VIS 22.5); null: none
    edge_frame_pix: int = 3  # the source's light stays below the noise in this outer frame (0: off; selection.py)
    min_images: int = 2  # a lens is multiply imaged (images with |mu| >= min_image_mag)
    min_image_mag: float = 0.1  # demagnified central images below this do not count
    source_tries: int = 20  # sources tried per deflector before a new deflector is drawn
    max_tries: int = 2000  # deflector draws per sample before giving up (an error)

    BOUNDS: typing.ClassVar[Bounds] = {
        "min_magnification": _closed(0.0, 100.0),  # an extended source is rarely magnified past ~50
        "min_arc_snr": _closed(0.0, 1000.0),
        "resolution_factor": _closed(0.0, 10.0),
        "min_theta_E_fwhm": _closed(0.0, 20.0),
        "min_theta_E_arcsec": _closed(0.0, 10.0),
        "max_deflector_mag": _closed(10.0, 35.0),
        "edge_frame_pix": _closed(0, 50),
        "min_images": _closed(1, 5),  # a galaxy-scale lens makes at most 5 images (one is central)
        "min_image_mag": _closed(0.0, 100.0),
        "source_tries": _closed(1, 1000),
        "max_tries": _closed(1, 100000),
    }

    def validate(self, where: str) -> None:
        _check_bounds(self, where, self.BOUNDS)


@dataclass
class SurveySourceSettings:
    """COSMOS real galaxies as survey sources (with ``cosmos_dir``; the paper family's key names).

    A COSMOS source keeps the magnitude and half-light radius the population assigns for its redshift:
    its stamp is scaled to that size and its flux to that magnitude (simulator.py). Stamps are cleaned by
    default (unlike the paper family): this family adds its own noise in physical units, and a stamp's own
    noise floor and pedestal would both add noise and inflate its measured half-light radius.
    """

    cosmos_fraction: float = 0.75  # the paper family's mix; the rest are analytic Sersic sources
    cosmos_min_size_pix: int = 50  # the paper's cuts: stamp side >= 50 px,
    cosmos_max_noise_frac: float = 0.05  # noise RMS < 5% of the stamp's peak
    cosmos_clean_k_sigma: float | None = 1.0  # pedestal off, pixels < k noise RMS -> 0; null: raw stamps
    cosmos_min_stamp_pixel: float = 0.5  # stamps scaled finer than this x the detector pixel are
    #                                              block-summed to it (simulator.py: flux kept, no aliasing)

    BOUNDS: typing.ClassVar[Bounds] = {
        "cosmos_min_size_pix": _closed(1, 10000),
        "cosmos_max_noise_frac": _above(0.0, 1.0),
        "cosmos_clean_k_sigma": _closed(0.0, 100.0),  # or null: raw stamps
        "cosmos_min_stamp_pixel": _closed(0.0, 10.0),  # 0: stamps never rebinned
    }

    def validate(self, where: str) -> None:
        check_fraction(where, "cosmos_fraction", self.cosmos_fraction)
        _check_bounds(self, where, self.BOUNDS)


NEGATIVE_KINDS = ("elliptical", "ring", "spiral", "merger", "group")


@dataclass
class NegativeMix:
    """Kinds of non-lenses and their fractions (sum 1; simulator.py ``_lookalike`` draws each).

    elliptical: the selected deflector alone (with an unlensed background galaxy or not); ring: its light
    partly in a ring (collisional / polar / star-forming rings); spiral: a bulge + disk with two spiral arms;
    merger: a close companion with a tidal tail; group: 1-3 early-type companions. The central galaxy keeps
    the deflector's total magnitude in every kind, so the deflector magnitude distribution is that of lenses.
    Lenses get companions too (``lens_companion_fraction``, as many as the merger and group non-lenses have),
    so a neighbour is no class cue: lenses live in groups as often (their light only; their mass is left out).
    ``lens_spiral_fraction`` of lenses have a spiral deflector's light (bulge + armed disk, the mass unchanged):
    ~10-20% of galaxy-scale lenses are late types (Treu et al. 2011, SWELLS), so arms alone say no "non-lens".
    """

    elliptical: float = 0.4
    ring: float = 0.15
    spiral: float = 0.15
    merger: float = 0.15
    group: float = 0.15
    ring_flux_fraction: Range = (0.05, 0.25)  # of the galaxy's light in its ring
    ring_radius_theta_E: Range = (0.7, 1.5)  # ring radius / the deflector's theta_E (arc-like radii)
    spiral_bulge_fraction: Range = (0.4, 0.8)  # B/T of lens-like (Sa-Sb) spirals
    spiral_arm_amplitude: Range = (0.3, 0.8)  # m=2 modulation of the disk
    companion_dmag: Range = (0.0, 2.5)  # companion magnitude - central galaxy's
    companion_distance_arcsec: Range = (0.8, 3.0)
    tail_flux_fraction: Range = (0.05, 0.2)  # of the pair's light in the tidal tail
    lens_companion_fraction: float = 0.3  # lenses with 1-3 companions (light only): as many as merger + group
    lens_spiral_fraction: float = 0.1  # lenses whose deflector light is a bulge + spiral disk (SWELLS-like)

    BOUNDS: typing.ClassVar[Bounds] = {
        **{k: _closed(0.0, 1.0) for k in NEGATIVE_KINDS},
        "ring_flux_fraction": _closed(0.0, 1.0),
        "ring_radius_theta_E": _above(0.0, 10.0),
        "spiral_bulge_fraction": _closed(0.0, 1.0),
        "spiral_arm_amplitude": _closed(0.0, 1.0),
        "companion_dmag": _closed(-5.0, 10.0),
        "companion_distance_arcsec": _above(0.0, 50.0),
        "tail_flux_fraction": _closed(0.0, 1.0),
        "lens_companion_fraction": _closed(0.0, 1.0),
        "lens_spiral_fraction": _closed(0.0, 1.0),
    }

    def validate(self, where: str) -> None:
        _check_bounds(self, where, self.BOUNDS)
        total = sum(getattr(self, k) for k in NEGATIVE_KINDS)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{where}.{'+'.join(NEGATIVE_KINDS)}: the fractions sum to {total:g}, not 1")

    def fractions(self) -> list[float]:
        return [getattr(self, k) for k in NEGATIVE_KINDS]


@dataclass
class SurveySimulationConfig:
    """The survey family: its own priors and noise, the preset's detector grid and PSF bank."""

    family: str = FAMILY
    preset: str = "euclid"
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    population: PopulationPrior = field(default_factory=PopulationPrior)
    mass: MassPrior = field(default_factory=MassPrior)
    observation: ObservationSettings = field(default_factory=ObservationSettings)
    selection: SelectionCuts = field(default_factory=SelectionCuts)
    source: SurveySourceSettings = field(default_factory=SurveySourceSettings)
    negatives: NegativeMix = field(default_factory=NegativeMix)
    lens_fraction: float | None = None  # None: 0.5 in single mode, 1.0 for LenSiam pairs
    non_lens_source_absent_fraction: float = 0.5  # non-lenses: no source; else a singly imaged one
    cosmos_dir: str | None = None  # GalSim real-galaxy-catalog folder; None = analytic Sersic sources
    psf_files: list[str] = field(default_factory=list)
    psf_pixel_scale_arcsec: float | None = None
    psf_bank_seed: int = 0

    def validate(self, where: str) -> None:
        if self.family != FAMILY:
            raise ConfigError(f"{where}.family: expected {FAMILY!r}, got {self.family!r}")
        if self.preset not in OBSERVATIONS:
            raise ConfigError(f"{where}.preset: {self.preset!r} is not one of {', '.join(OBSERVATIONS)}")
        if self.lens_fraction is not None:
            check_fraction(where, "lens_fraction", self.lens_fraction)
        check_fraction(where, "non_lens_source_absent_fraction", self.non_lens_source_absent_fraction)
        _check_bounds(self, where, {"psf_pixel_scale_arcsec": _above(0.0, 10.0)})
        if self.psf_bank_seed < 0:
            raise ConfigError(f"{where}.psf_bank_seed: must be >= 0, got {self.psf_bank_seed}")
        # the deflector inside the field (as the paper family's lens centre): off it, every draw is rejected
        half = self.instrument.num_pix * self.instrument.pixel_scale_arcsec / 2
        c = self.population.lens_center_arcsec
        if max(abs(v) for v in c) >= half:
            raise ConfigError(
                f"{where}.population.lens_center_arcsec: range [{c[0]:g}, {c[1]:g}] reaches outside the field "
                f'(allowed: inside (-{half:g}, {half:g})" = num_pix x pixel_scale_arcsec / 2)'
            )


def default_lens_fraction(mode: str) -> float:
    """Single images: a balanced lens-finding set; LenSiam pairs: lenses (pairs share the mass)."""
    return 0.5 if mode == "single" else 1.0


def survey_config(
    preset: str | None = None,
    config_path: str | Path | None = None,
    mode: str = "single",
    lens_fraction: float | None = None,
    **overrides,
) -> SurveySimulationConfig:
    """Resolve the survey config: preset grid <- YAML <- keyword overrides; lens_fraction filled in."""
    data: dict = dict(read_yaml(config_path)) if config_path else {}
    where = str(config_path) if config_path else "config"
    if preset is not None:
        data["preset"] = preset
    name = data.get("preset", "euclid")
    if name not in OBSERVATIONS:
        raise ConfigError(
            f"{where}: unknown preset {name!r} for the survey family (expected one of: {', '.join(OBSERVATIONS)})"
        )
    base = INSTRUMENT_PRESETS.get(name, {})  # lsst is the survey family's own preset
    data["instrument"] = {**base, **SURVEY_INSTRUMENT[name], **(data.get("instrument") or {})}
    for k, v in overrides.items():
        if v is None:
            continue
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    if lens_fraction is not None:
        data["lens_fraction"] = lens_fraction
    cfg = from_dict(SurveySimulationConfig, data, where)
    if cfg.lens_fraction is None:
        cfg.lens_fraction = default_lens_fraction(mode)
    return cfg
