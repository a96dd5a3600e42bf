"""Typed configs of the commands of this stage: ``embed``, ``umap``, ``probe`` and ``similar``.

Each field is a flag (:func:`hpc_lensiam.core.config.option`): its default, help and allowed values
are written here once; ``hpc-lensiam config COMMAND`` prints them as YAML that ``--config`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import option
from ..core.errors import ConfigError
from ..shards.display import DEFAULT_STRETCH, STRETCH_HELP, STRETCHES

ORIENTATIONS = ("simulator", "sky", "asis")
INDEXES = ("auto", "flat", "ivf")


def archs() -> tuple:
    from ..models.backbones import BACKBONES  # the live registry (torch: imported only when the choices are needed)

    return tuple(BACKBONES)


def stretch_option():
    return option(DEFAULT_STRETCH, STRETCH_HELP, choices=STRETCHES)


@dataclass
class EmbedConfig:
    """``hpc-lensiam embed``: backbone features of every image to HDF5."""

    checkpoint: str | None = option(
        None,
        "RUN, RUN/checkpoints/last.pt or a DeepSpeed folder; 'none': random weights (no-pretraining reference)",
        required=True,
    )
    arch: str | None = option(
        None, "the arch the checkpoint must hold; with --checkpoint none: which (resnet18)", choices=archs
    )
    seed: int | None = option(None, "with --checkpoint none: the weights' seed (0)")
    data: list[str] = option(help="shard folder(s): several go into one file", required=True, default_factory=list)
    out: str | None = option(None, "the embeddings file (HDF5)", required=True)
    batch_size: int = option(128, "images per forward pass")
    workers: int = option(1, "loader worker processes per rank")
    loader_timeout: float | None = option(
        None,
        "seconds to wait for one batch from the loader's workers, then fail naming them (default 600)",
        metavar="S",
    )
    verify: bool = option(False, "check every shard's sha256 against the manifest first")
    table: str | None = option(None, "also a table: one row per image (name, kept columns)", metavar="T.csv|T.fits")

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"{where}.workers: must be >= 0, got {self.workers}")
        if self.loader_timeout is not None and not self.loader_timeout > 0:
            raise ConfigError(f"{where}.loader_timeout: must be > 0 seconds, got {self.loader_timeout}")
        if self.seed is not None and str(self.checkpoint).lower() != "none":
            raise ConfigError(f"{where}.seed: only with --checkpoint none (a checkpoint's weights are already drawn)")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")


@dataclass
class UmapConfig:
    """``hpc-lensiam umap``: a 2-D UMAP of embeddings, coloured by any of its columns."""

    embeddings: str | None = option(None, "the embeddings file (read only)", required=True)
    out: str | None = option(None, "the figure (PNG, or PDF/SVG by suffix)", required=True)
    color: str = option(
        "theta_E,e1,gamma",
        "columns of the file, comma-separated: lens parameters, is_lens, source, view, any params/ column",
    )
    seed: int = option(0, "UMAP's random seed")
    n_neighbors: int = option(15, "UMAP's neighbourhood size")
    min_dist: float = option(0.1, "UMAP's minimum distance between embedded points")
    overlay: str | None = option(None, "embeddings of real images to draw on the fitted map")
    coords: str | None = option(None, "the 2-D coordinates (default: --out with .csv)", metavar="CSV")
    stretch: str = stretch_option()

    def validate(self, where: str) -> None:
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        if self.n_neighbors < 2:
            raise ConfigError(f"{where}.n_neighbors: must be >= 2, got {self.n_neighbors}")
        if self.min_dist < 0:
            raise ConfigError(f"{where}.min_dist: must be >= 0, got {self.min_dist}")
        if not [c for c in self.color.split(",") if c.strip()]:
            raise ConfigError(f"{where}.color: expected one or more column names, got {self.color!r}")


@dataclass
class ProbeConfig:
    """``hpc-lensiam probe``: held-out R^2 of k-NN and ridge probes for the lens parameters."""

    embeddings: str | None = option(None, "the embeddings file", required=True)
    against: str | None = option(None, "a second embeddings file to compare with")
    json: str | None = option(None, "write the table as JSON here too")
    test_fraction: float = option(0.2, "held-out fraction of the images")
    k: int = option(10, "neighbours of the k-NN probe", flag="--knn")

    def validate(self, where: str) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"{where}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.k < 1:
            raise ConfigError(f"{where}.k: must be >= 1, got {self.k}")


@dataclass
class SimilarConfig:
    """``hpc-lensiam similar``: nearest neighbours by cosine similarity (faiss); --anomaly: most isolated."""

    embeddings: str | None = option(None, "the embeddings file", required=True)
    key: str | None = option(None, "query: a sample key or object name of the file (view 1)")
    image: str | None = option(None, "query: a FITS/.npy cutout, ingested and embedded (--checkpoint)")
    anomaly: bool = option(False, "rank every image by distance to its k-th neighbour")
    data_dir: str | None = option(None, "with --key: the data folder, when several hold the key")
    checkpoint: str | None = option(None, "with --image: the backbone the embeddings were made with")
    k: int = option(16, "neighbours (with --anomaly: which neighbour)", flag="-k")
    top: int = option(16, "with --anomaly: how many to show")
    out: str | None = option(None, "PNG grid of the query and its neighbours")
    json: str | None = option(None, "the neighbours / ranking as JSON")
    table: list[str] = option(
        help="the neighbours / ranking as CSV and/or FITS: name, source, kept catalogue columns, labels",
        metavar="T.csv|T.fits",
        default_factory=list,
    )
    index: str = option("auto", "faiss index: exact (flat), inverted lists (ivf), or by size (auto)", choices=INDEXES)
    hdu: str | None = option(None, "with --image: the image HDU")
    input_pixel_scale: float | None = option(None, "with --image: its arcsec/pixel, if its header has no WCS")
    orientation: str = option("simulator", "with --image: how its pixels are laid out", choices=ORIENTATIONS)
    stretch: str = stretch_option()

    def validate(self, where: str) -> None:
        if sum(x is not None and x is not False for x in (self.key, self.image, self.anomaly or None)) > 1:
            raise ConfigError(f"{where}.key: give exactly one of --key, --image, --anomaly")
        if self.image is not None and self.checkpoint is None:
            raise ConfigError(f"{where}.image: needs --checkpoint (the backbone the embeddings were made with)")
        if self.k < 1:
            raise ConfigError(f"{where}.k: must be >= 1, got {self.k}")
        if self.top < 1:
            raise ConfigError(f"{where}.top: must be >= 1, got {self.top}")
        if self.input_pixel_scale is not None and not self.input_pixel_scale > 0:
            raise ConfigError(f"{where}.input_pixel_scale: must be > 0, got {self.input_pixel_scale}")

    def check_complete(self) -> None:
        if self.key is None and self.image is None and not self.anomaly:
            raise ConfigError("similar: give exactly one of --key, --image, --anomaly")
