"""Training data sources: ``train --data SPEC`` -> where the trainer's batches come from.

The trainer knows nothing of shards or simulators: :func:`source_for` picks the entry of
:data:`SOURCES` whose ``matches(spec)`` is true, and the run uses that entry's two answers:

* ``identity(data)``: a sha256 of what defines the data, which every checkpoint stores so that
  ``--resume`` with other data is refused (train/rundir.py). It also checks ``--data``, before the
  run folder is created: a bad spec is a one-line error and nothing is written.
* ``loader(cfg, engine)``: this rank's batches, an object with ``batches_per_epoch`` (micro-batches
  per epoch on each rank, a multiple of ``grad_accum``), ``image_shape`` (H, W: the model is built
  for that side) and ``epoch(e, start=0)``, a closable iterator of micro-batches ``start ..`` of epoch
  ``e``, each a dict ``{"x1", "x2"}`` (``--views lens``, a pair) or ``{"x"}`` (``--views standard``),
  float32 ``(B, 1, H, W)``, plus ``"keys"`` and ``"bad"`` (samples skipped). Batch ``i`` of epoch
  ``e`` must be the same whatever ``start``: that is what makes a resumed run continue exactly.

Two sources today: ``online[:FAMILY_OR_CONFIG]`` renders every batch on the device (data/online.py),
and anything else is a shard directory (data/loader.py), the fallback. Adding one is a class with
these three methods plus one line in :data:`SOURCES` (docs/extending.md shows an example).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.config import to_dict
from ..core.errors import UserError
from ..core.io import sha256_file, sha256_json
from ..core.runtime import cpu_budget_warning
from ..shards.manifest import MANIFEST_NAME, read_manifest
from .online import PREFIX, OnlineLoader, online_config


class DataSource:
    """One kind of ``--data``; subclasses fill in the three methods."""

    def matches(self, data: str) -> bool:
        raise NotImplementedError

    def identity(self, data: str) -> str:
        raise NotImplementedError

    def inputs(self, data: str) -> dict[str, str]:
        """{resolved path: sha256} of the files the data are made from (part of ``identity``), so a
        refused ``--resume`` can name the file that changed; {} when there are none."""
        return {}

    def loader(self, cfg, engine):
        raise NotImplementedError


class PrefixSource(DataSource):
    """A source named by a scheme: ``--data PREFIX`` or ``--data PREFIX:SPEC``."""

    prefix = ""

    def matches(self, data: str) -> bool:
        return data == self.prefix or data.startswith(self.prefix + ":")

    def spec(self, data: str) -> str:
        """What follows ``PREFIX:`` (empty for a bare ``PREFIX``)."""
        return data[len(self.prefix) + 1 :] if data.startswith(self.prefix + ":") else ""


class ShardSource(DataSource):
    """A directory of WebDataset shards written by ``simulate`` or ``ingest`` (its manifest.json)."""

    def matches(self, data: str) -> bool:
        return True  # the fallback: any --data no other source claims is a shard directory

    def identity(self, data: str) -> str:
        read_manifest(data)  # a bad --data fails before the run folder is created
        return sha256_file(Path(data) / MANIFEST_NAME)

    def loader(self, cfg, engine):
        from .loader import ShardLoader

        loader = ShardLoader(
            cfg.data,
            cfg.views,
            cfg.batch_size,
            engine.rank,
            engine.world_size,
            cfg.workers,
            cfg.seed,
            cfg.shuffle_buffer,
            cfg.grad_accum,
            cfg.skip_bad_samples,
            verify=cfg.verify,
            pin_memory=engine.plan.pin_memory,
            timeout=cfg.loader_timeout,
        )
        if engine.is_main and (
            busy := cpu_budget_warning(loader.workers if cfg.workers else 0, engine.local_world_size)
        ):
            print(f"train: warning: {busy}", file=sys.stderr, flush=True)
        return loader


class OnlineSource(PrefixSource):
    """Pairs rendered on this rank's device before each step (docs/online.md): no shards at all."""

    prefix = PREFIX

    def identity(self, data: str) -> str:
        """The simulation config, and the contents of the PSF files and COSMOS catalog it names: a
        file edited between a run and its ``--resume`` is other data (without files: the config's
        sha256 alone, as before)."""
        config = to_dict(online_config(data))
        files = self.inputs(data)
        return sha256_json({"config": config, "files": files}) if files else sha256_json(config)

    def inputs(self, data: str) -> dict[str, str]:
        from ..simulate.writer import input_hashes

        try:
            named = input_hashes(online_config(data))
        except OSError:  # a missing or unreadable PSF: the loader names it when it loads the bank
            return {}
        return {path: sha for files in named.values() for path, sha in files.items()}

    def loader(self, cfg, engine):
        return OnlineLoader.from_train_config(cfg, engine.rank, engine.world_size, engine.device)


# The fallback (shards) is tried last, whatever the order entries were added in.
DEFAULT = "shards"
SOURCES: dict[str, DataSource] = {"online": OnlineSource(), DEFAULT: ShardSource()}


def source_for(data: str) -> DataSource:
    """The source that serves ``--data data``: the first registered one that claims it, else shards."""
    if not data:
        raise UserError("--data: no shard directory given")
    for name, source in SOURCES.items():
        if name != DEFAULT and source.matches(data):
            return source
    return SOURCES[DEFAULT]
