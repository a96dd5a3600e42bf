"""The ingest command's typed config (``IngestConfig``): real cutouts onto a preset's grid."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import option
from ..core.errors import ConfigError
from ..shards.cutouts import CutoutOptions
from ..shards.display import DEFAULT_STRETCH, STRETCH_HELP, STRETCHES
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

    preset: str = option("hst", "target grid: a simulation preset's", choices=tuple(INSTRUMENT_PRESETS))
    num_pix: int | None = option(None, "target image side (default: the preset's)")
    pixel_scale_arcsec: float | None = option(
        None, "target arcsec/pixel (default: the preset's)", flag="--target-pixel-scale", metavar="ARCSEC"
    )
    orientation: str = option(
        "simulator",
        "simulator: columns grow with RA, rows with Dec; sky: north up, east left; asis: as stored",
        choices=ORIENTATIONS,
    )
    sky_sigma: float = option(3.0, "sigma-clipping threshold of the sky estimate")
    shard_size: int = option(1000, "images per shard")
    pad: bool = option(False, "pad cutouts smaller than the target field with sky (0) instead of refusing them")
    psf: str | None = option(
        None,
        "PSF of every input: HDF5 kernel_point_source, .npy or FITS (default: psf_*.h5 beside an .h5)",
        metavar="FILE",
    )

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


@dataclass
class IngestCommandConfig(IngestConfig):
    """``hpc-lensiam ingest``: the inputs, the output and the preview besides :class:`IngestConfig`
    (whose fields alone go into the data set's manifest)."""

    files: list[str] = option(
        help="FITS, .npy (2-D, or an (N,H,W) stack), lenstronomy .h5/.hdf5, PNG/JPEG (or --list)",
        positional=True,
        default_factory=list,
    )
    out: str | None = option(None, "output shard directory", required=True)
    list_csv: str | None = option(
        None,
        "catalogue: a 'file' column, optional 'hdu'/'idx', 'name'/'id', 'psf', 'pixel_scale'; others kept",
        flag="--list",
        metavar="CSV",
    )
    labels_csv: str | None = option(
        None,
        "'file' (or 'name'/'id', or 'idx' for one stack) + lens parameters / is_lens; other columns kept",
        flag="--labels",
        metavar="CSV",
    )
    skip_bad: bool = option(False, "leave bad inputs out with a warning instead of stopping")
    preview: str | None = option(None, "draw the ingested images (as `show` does) here", metavar="PNG")
    preview_n: int = option(16, "with --preview: how many", metavar="N")
    stretch: str = option(DEFAULT_STRETCH, STRETCH_HELP, choices=STRETCHES)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.preview_n < 1:
            raise ConfigError(f"{where}.preview_n: expected >= 1, got {self.preview_n}")
        if self.files and self.list_csv:
            raise ConfigError(f"{where}.list_csv: give input files or --list catalog.csv (one of the two)")

    def check_complete(self) -> None:
        if not self.files and not self.list_csv:
            raise ConfigError("ingest: give input files or --list catalog.csv (one of the two)")

    def grid(self) -> IngestConfig:
        """The data set's own config (what the manifest records)."""
        from dataclasses import fields

        return IngestConfig(**{f.name: getattr(self, f.name) for f in fields(IngestConfig)})
