"""Training data with no shards: ``--data online[:FAMILY_OR_CONFIG]`` renders every batch on the device.

``OnlineLoader`` has ``ShardLoader``'s interface (``batches_per_epoch``, ``epoch(e, start)``, the
same batch dicts: ``{"x1", "x2"}`` pairs for ``--views lens``, ``{"x"}`` singles for ``--views
standard``, each (B, 1, H, W) float32, plus ``"keys"`` and ``"bad"``), so the training loop does not
know where its batches come from. Each rank renders its own micro-batch with the torch renderer on
its training device just before the step, from a generator seeded by (seed, rank, batch index):
a resumed run, which restarts at the same epoch and batch index, sees exactly the same pairs.

An epoch is ``online_epoch_samples`` samples over all ranks (TrainConfig; default 100,000, the
paper's data set size), which fixes the lr schedule's steps per epoch as shards of that size would.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.rng import derive_seed
from ..simulate.config import INSTRUMENT_PRESETS, TORCH_FAMILIES, SimulationConfig, simulation_config

PREFIX = "online"


def online_config(data: str) -> SimulationConfig:
    """The simulation config an ``online[:FAMILY_OR_CONFIG]`` spec names.

    ``online`` and ``online:paper``: the paper family's defaults (hst); ``online:hst`` /
    ``online:euclid``: that preset; ``online:FILE.yaml``: a SimulationConfig YAML (as ``simulate
    --config``).
    """
    spec = data[len(PREFIX) + 1 :] if data.startswith(PREFIX + ":") else ""
    if spec in ("",) + TORCH_FAMILIES:
        return simulation_config()
    if spec in INSTRUMENT_PRESETS:
        return simulation_config(preset=spec)
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return simulation_config(config_path=spec)
    raise UserError(
        f"--data {data}: unknown simulation family or config {spec!r} (expected online, "
        f"online:{'|'.join(TORCH_FAMILIES + tuple(INSTRUMENT_PRESETS))} or online:CONFIG.yaml)"
    )


class OnlineLoader:
    """One rank's freshly rendered batches, epoch by epoch (``ShardLoader``'s interface)."""

    SALT = 0x0411E  # keeps the render stream apart from the augmentation seeds (seed, rank, step, micro)

    def __init__(
        self,
        data: str,
        views: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        grad_accum: int = 1,
        epoch_samples: int = 100_000,
        device="cpu",
        compile: bool = False,
    ):
        from ..simulate.torch_render import TorchLensSimulator

        if views not in ("lens", "standard"):
            raise UserError(f"--views: {views!r} is not one of lens, standard")
        per_step = batch_size * world_size * grad_accum
        if epoch_samples < per_step:
            raise UserError(
                f"--online-epoch-samples {epoch_samples} is smaller than one step ({batch_size} per "
                f"rank x {world_size} rank(s) x {grad_accum} accumulation = {per_step} samples)"
            )
        cfg = online_config(data)
        with warnings.catch_warnings():  # "no cosmos_dir": the config says so; not once per rank
            warnings.simplefilter("ignore", UserWarning)
            self.sim = TorchLensSimulator(cfg, device=device, dtype=torch.float32, compile=compile)
        self.views, self.batch_size, self.rank, self.seed = views, batch_size, rank, seed
        self.batches_per_epoch = epoch_samples // per_step * grad_accum
        self.image_shape = (self.sim.num_pix, self.sim.num_pix)
        self.config = cfg

    @classmethod
    def from_train_config(cls, cfg, rank: int, world_size: int, device) -> OnlineLoader:
        return cls(
            cfg.data,
            cfg.views,
            cfg.batch_size,
            rank,
            world_size,
            cfg.seed,
            cfg.grad_accum,
            cfg.online_epoch_samples,
            device,
            cfg.online_compile,
        )

    def generator(self, epoch: int, index: int) -> torch.Generator:
        g = torch.Generator(device=self.sim.device)
        g.manual_seed(derive_seed(self.SALT, self.seed, self.rank, epoch * self.batches_per_epoch + index))
        return g

    def batch(self, epoch: int, index: int) -> dict:
        """Micro-batch ``index`` of ``epoch`` on this rank: always the same images."""
        g = self.generator(epoch, index)
        keys = [f"online_r{self.rank}_e{epoch}_b{index}_{j}" for j in range(self.batch_size)]
        if self.views == "lens":
            out = self.sim.sample_pairs(self.batch_size, g)
            return {"x1": out["view1"][:, None], "x2": out["view2"][:, None], "keys": keys, "bad": 0}
        out = self.sim.sample_singles(self.batch_size, g)
        return {"x": out["image"][:, None], "keys": keys, "bad": 0}

    def epoch(self, epoch: int, start: int = 0):
        """Batches ``start .. batches_per_epoch-1`` of ``epoch`` (the same ones whatever ``start``)."""
        for index in range(start, self.batches_per_epoch):
            yield self.batch(epoch, index)
