"""The ingest command's typed config (``IngestConfig``): real cutouts onto a preset's grid."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError
from ..shards.cutouts import CutoutOptions
from ..simulate.config import INSTRUMENT_PRESETS, InstrumentConfig

ORIENTATIONS = ("simulator", "sky", "asis")


@dataclass
class IngestConfig(CutoutOptions):
    """Real cutouts -> the simulator's grid (``hpc-lensiam ingest``); the target grid is a preset's.

    ``num_pix`` / ``pixel_scale_arcsec`` are the *target* grid (None: the preset's), so ingested
    images match what a backbone was trained on. ``input_pixel_scale_arcsec`` is used only for
    files whose header gives none (no CD/CDELT keys, and every .npy); it and the other reading options
    are :class:`~hpc_lensiam.shards.cutouts.CutoutOptions`'s.
    """

    preset: str = "hst"
    num_pix: int | None = None
    pixel_scale_arcsec: float | None = None
    orientation: str = "simulator"  # simulator: columns grow with RA, rows with Dec
    sky_sigma: float = 3.0  # sigma-clipping threshold of the sky estimate
    shard_size: int = 1000
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
