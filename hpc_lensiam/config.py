"""Typed configuration for every stage: dataclasses, loaded from YAML, validated once at start.

Ranges are ``(min, max)`` pairs written as two-element YAML lists. Unknown keys, wrong types and
impossible ranges raise :class:`ConfigError` naming the file and key. The resolved config is saved
next to every output (shard manifest, run folder) so a result always says how it was made.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
Range = tuple[float, float]


# --------------------------------------------------------------------------------------- machinery
def _is_range(tp) -> bool:
    return tp == Range or (typing.get_origin(tp) is tuple and typing.get_args(tp) == (float, float))


def _coerce(tp, value, where: str):
    """Convert a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if _is_range(tp):
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ConfigError(f"{where}: expected a [min, max] pair, got {value!r}")
        lo, hi = (_coerce(float, v, where) for v in value)
        if lo > hi:
            raise ConfigError(f"{where}: impossible range [{lo}, {hi}] (min > max)")
        return (lo, hi)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range comparison; inf gives NaN images
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(where)
    return obj


def merge(base, overrides: dict, where: str = "config"):
    """Return a copy of dataclass ``base`` with ``overrides`` (nested dicts) applied and validated."""
    data = to_dict(base)

    def deep(dst: dict, src: dict):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(data, overrides)
    return from_dict(type(base), data, where)


def to_dict(obj) -> dict:
    """Plain-data (YAML/JSON-able) copy of a config dataclass; tuples become lists."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(asdict(obj))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj) if is_dataclass(obj) else obj, sort_keys=False)


def _check_range(
    where: str, name: str, rng: Range, lo: float | None = None, hi: float | None = None, strict_lo: bool = False
) -> None:
    a, b = rng
    if a > b:
        raise ConfigError(f"{where}.{name}: impossible range [{a}, {b}] (min > max)")
    if lo is not None and (a <= lo if strict_lo else a < lo):
        raise ConfigError(f"{where}.{name}: range [{a}, {b}] must be {'>' if strict_lo else '>='} {lo}")
    if hi is not None and b > hi:
        raise ConfigError(f"{where}.{name}: range [{a}, {b}] must be <= {hi}")


def _check_fraction(where: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}.{name}: {value} is not a fraction in [0, 1]")


# -------------------------------------------------------------------------------------- simulation
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
        _check_range(where, "theta_E_arcsec", self.theta_E_arcsec, lo=0.0, strict_lo=True)
        _check_range(where, "gamma", self.gamma, lo=1.0, hi=3.0, strict_lo=True)
        for name in ("e1", "e2"):
            _check_range(where, name, getattr(self, name), lo=-0.9, hi=0.9)
        for name in ("center_x_arcsec", "center_y_arcsec"):
            _check_range(where, name, getattr(self, name))
        for name in ("gamma1", "gamma2"):
            _check_range(where, name, getattr(self, name), lo=-0.5, hi=0.5)


@dataclass
class LensLightPrior:
    """Elliptical Sersic lens light whose centre and ellipticity follow the mass, perturbed."""

    R_sersic_arcsec: Range = (0.5, 1.5)
    n_sersic: Range = (2.0, 5.0)
    peak_ratio: Range = (0.2, 1.5)  # lens-light peak / lensed-source peak, before noise
    follow_mass_sigma_frac: float = 0.025  # Gaussian sigma, as a fraction of that parameter's prior range

    def validate(self, where: str) -> None:
        _check_range(where, "R_sersic_arcsec", self.R_sersic_arcsec, lo=0.0, strict_lo=True)
        _check_range(where, "n_sersic", self.n_sersic, lo=0.2, hi=10.0)
        _check_range(where, "peak_ratio", self.peak_ratio, lo=0.0)
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
        _check_fraction(where, "cosmos_fraction", self.cosmos_fraction)
        _check_fraction(where, "merger_fraction", self.merger_fraction)
        _check_range(where, "center_arcsec", self.center_arcsec)
        _check_range(where, "merger_offset_arcsec", self.merger_offset_arcsec, lo=0.0)
        _check_range(where, "merger_flux_ratio", self.merger_flux_ratio, lo=0.0, strict_lo=True)
        _check_range(where, "R_sersic_arcsec", self.R_sersic_arcsec, lo=0.0, strict_lo=True)
        _check_range(where, "n_sersic", self.n_sersic, lo=0.2, hi=10.0)
        _check_range(where, "e1", self.e1, lo=-0.9, hi=0.9)
        _check_range(where, "e2", self.e2, lo=-0.9, hi=0.9)
        _check_range(where, "R_b_arcsec", self.R_b_arcsec, lo=0.0, strict_lo=True)
        _check_range(where, "core_gamma", self.core_gamma, lo=0.0)
        _check_range(where, "core_alpha", self.core_alpha, lo=0.0, strict_lo=True)
        _check_range(where, "cosmos_scale", self.cosmos_scale, lo=0.0, strict_lo=True)
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
        _check_range(where, "noise_sigma", self.noise_sigma, lo=0.0)
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


# ---------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """SimSiam / LenSiam pretraining (the LenSiam paper's recipe). CLI flags override YAML values.

    The defaults below are SimSiam's recipe on a ResNet; ``method`` and ``arch`` choose another
    recipe (:func:`hpc_lensiam.models.methods.recipe`, docs/methods.md), which
    :func:`hpc_lensiam.train.loop.train_config` applies under the YAML file and the flags.
    """

    data: str = ""
    out: str = "runs/pretrain"
    mode: str = "lensiam"  # lensiam: stored pair; simsiam: two augmentations of one image
    method: str = "simsiam"  # simsiam | byol | vicreg | simclr (docs/methods.md)
    optimizer: str = "sgd"  # sgd | lars | adamw (the method's/backbone's recipe sets it)
    lr_scaling: str = "linear"  # linear: lr = base_lr x batch/256; sqrt: base_lr x sqrt(batch)
    engine: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # fp32 | bf16 | fp16
    arch: str = "resnet101"  # resnet18 | resnet50 | resnet101 | vit_{tiny,small,base}_p{8,10,11}
    zero_init_residual: bool = True  # SimSiam reference init; false for short runs (docs/results.md)
    batch_size: int = 64  # per rank
    grad_accum: int = 1
    epochs: int = 100
    max_steps: int | None = None  # stop early (tests, smoke runs)
    base_lr: float = 0.03  # lr = base_lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    fix_pred_lr: bool = True
    proj_dim: int = 2048  # projector output width
    proj_hidden_dim: int | None = None  # projector hidden width (None: proj_dim; SimSiam uses proj_dim)
    pred_dim: int = 512  # predictor hidden width (SimSiam, BYOL)
    ema_tau_base: float = 0.996  # BYOL: target decay at step 0, cosine to 1
    temperature: float = 0.1  # SimCLR: NT-Xent temperature
    vicreg_sim_coeff: float = 25.0  # VICReg: invariance, variance, covariance weights
    vicreg_std_coeff: float = 25.0
    vicreg_cov_coeff: float = 1.0
    workers: int = 2
    loader_timeout: float = 600.0  # s without a batch from the loader's workers, then a one-line error (no hang)
    shuffle_buffer: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # steps between periodic checkpoints (plus last.pt)
    keep_last: int = 3  # periodic step_*.pt kept (newest); 0 keeps all
    deterministic: bool = False  # deterministic algorithms, cudnn.benchmark off (docs/gpu.md)
    probe_data: str | None = None  # held-out shards: ridge R^2 of theta_E, e1, gamma every probe_every
    probe_every: int = 500  # steps between lens-physics probes (with probe_data)
    probe_samples: int = 256  # samples of probe_data embedded per probe (first ones, manifest order)
    channels_last: bool = True  # CUDA only
    sync_batchnorm: bool = True  # SyncBatchNorm across ranks (world size > 1); false: per-rank BN
    deepspeed_config: str | None = None
    zero_stage: int = 0
    skip_bad_samples: bool = False
    dist_timeout: float = 30.0  # minutes a collective waits for a silent rank before the run stops naming it
    verify: bool = False  # sha256 of every shard against the manifest before training
    online_epoch_samples: int = 100_000  # --data online: samples (pairs or images) per epoch, all ranks
    online_compile: bool = False  # --data online: torch.compile the ray shooting (minutes once, then fast)

    def validate(self, where: str) -> None:
        from .models.backbones import ARCHS
        from .models.methods import METHODS
        from .train.optim import OPTIMIZERS

        choices = {
            "mode": ("lensiam", "simsiam"),
            "engine": ("ddp", "deepspeed"),
            "precision": ("fp32", "bf16", "fp16"),
            "arch": ARCHS,
            "method": tuple(METHODS),
            "optimizer": OPTIMIZERS,
            "lr_scaling": ("linear", "sqrt"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in (
            "batch_size",
            "grad_accum",
            "epochs",
            "log_every",
            "ckpt_every",
            "proj_dim",
            "pred_dim",
            "probe_every",
            "probe_samples",
            "online_epoch_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps: must be >= 1")
        if self.keep_last < 0:
            raise ConfigError(f"{where}.keep_last: must be >= 0 (0 keeps every periodic checkpoint)")
        if self.workers < 0 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError(f"{where}: workers >= 0, base_lr > 0 and warmup_epochs >= 0 expected")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{where}.momentum: {self.momentum} is not in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"{where}.shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        if not self.loader_timeout > 0:
            raise ConfigError(f"{where}.loader_timeout: must be > 0 seconds, got {self.loader_timeout}")
        if self.proj_hidden_dim is not None and self.proj_hidden_dim < 1:
            raise ConfigError(f"{where}.proj_hidden_dim: must be >= 1, got {self.proj_hidden_dim}")
        if not 0.0 <= self.ema_tau_base <= 1.0:
            raise ConfigError(f"{where}.ema_tau_base: {self.ema_tau_base} is not in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {self.temperature}")
        for name in ("vicreg_sim_coeff", "vicreg_std_coeff", "vicreg_cov_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"{where}.zero_stage: expected 0 or 1 (ZeRO buys nothing for ResNet101)")
        if not self.dist_timeout > 0:
            raise ConfigError(f"{where}.dist_timeout: must be > 0 minutes, got {self.dist_timeout}")
        if self.engine == "deepspeed" and self.zero_stage >= 1 and self.optimizer == "lars":
            # ZeRO-1 flattens each param group into one fp32 partition and steps the optimizer on that
            # flat tensor: LARS then computes one trust ratio for the whole partition, not per layer
            # (measured: one step moves conv1 by 5.6e-2 and the block convs by 0, where ZeRO-0 moves
            # every layer by lr x eta). The byol, simclr and vicreg recipes use LARS.
            raise ConfigError(
                f"{where}.zero_stage: --zero-stage {self.zero_stage} with --optimizer lars is refused: ZeRO >= 1 "
                f"flattens each parameter group into one partition, so LARS would compute one trust ratio for "
                f"all layers instead of one per layer; use --zero-stage 0 (or --engine ddp) with LARS, or "
                f"--optimizer sgd/adamw under ZeRO-1"
            )
        if self.grad_accum > 1 and self.method in ("simclr", "vicreg"):
            # the lr would be scaled for grad_accum x the batch, while SimCLR's negatives, VICReg's
            # variance/covariance terms and BatchNorm only ever see one micro-batch
            raise ConfigError(
                f"{where}.grad_accum: --grad-accum {self.grad_accum} with --method {self.method} is refused: the "
                f"lr would be scaled for a {self.grad_accum}x larger batch, but "
                f"{'the negatives' if self.method == 'simclr' else 'the variance and covariance terms'} and "
                f"BatchNorm see one micro-batch of {self.batch_size} per rank; use --grad-accum 1 and raise "
                f"--batch-size or the number of ranks"
            )


# ------------------------------------------------------------------------------------------ ingest
ORIENTATIONS = ("simulator", "sky", "asis")


@dataclass
class IngestConfig:
    """Real cutouts -> the simulator's grid (``hpc-lensiam ingest``); the target grid is a preset's.

    ``num_pix`` / ``pixel_scale_arcsec`` are the *target* grid (None: the preset's), so ingested
    images match what a backbone was trained on. ``input_pixel_scale_arcsec`` is used only for
    files whose header gives none (no CD/CDELT keys, and every .npy).
    """

    preset: str = "hst"
    num_pix: int | None = None
    pixel_scale_arcsec: float | None = None
    hdu: str | None = None  # name or index; None: the first HDU holding a 2-D image
    rms_hdu: str | None = "auto"  # name/index, "auto" (X_FLUX -> X_RMS if present) or None
    weight_hdu: str | None = None  # inverse-variance map: weight <= 0 = no data
    rms_no_data: float = 1e15  # RMS at or above this (Euclid writes 1e16) = no data
    input_pixel_scale_arcsec: float | None = None
    orientation: str = "simulator"  # simulator: columns grow with RA, rows with Dec
    sky_sigma: float = 3.0  # sigma-clipping threshold of the sky estimate
    shard_size: int = 1000
    each_hdu: bool = False  # FITS: every 2-D image HDU is an object (stamp files), not only the first
    pad: bool = False  # a cutout smaller than the target field is padded with sky (0) instead of refused
    psf: str | None = None  # PSF file for every input (HDF5 kernel_point_source, .npy or FITS); None: found

    def validate(self, where: str) -> None:
        if self.preset not in INSTRUMENT_PRESETS:
            raise ConfigError(
                f"{where}.preset: unknown preset {self.preset!r} (expected one of: {', '.join(INSTRUMENT_PRESETS)})"
            )
        if self.num_pix is not None and self.num_pix < 8:
            raise ConfigError(f"{where}.num_pix: {self.num_pix} is too small (expected >= 8)")
        for name in ("pixel_scale_arcsec", "input_pixel_scale_arcsec", "rms_no_data", "sky_sigma"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {v}")
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(f"{where}.orientation: {self.orientation!r} is not one of {', '.join(ORIENTATIONS)}")
        if self.shard_size < 1:
            raise ConfigError(f"{where}.shard_size: must be >= 1, got {self.shard_size}")

    @property
    def target_num_pix(self) -> int:
        return self.num_pix or InstrumentConfig(**INSTRUMENT_PRESETS[self.preset]).num_pix

    @property
    def target_pixel_scale_arcsec(self) -> float:
        return self.pixel_scale_arcsec or InstrumentConfig(**INSTRUMENT_PRESETS[self.preset]).pixel_scale_arcsec
