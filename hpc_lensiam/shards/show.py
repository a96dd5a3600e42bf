"""A PNG grid of simulated samples, so a user can look at what was simulated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ..core.config import option
from ..core.errors import ConfigError, UserError
from ..core.io import check_output_file
from .display import DEFAULT_STRETCH, STRETCH_HELP, STRETCHES
from .manifest import read_manifest
from .reader import iter_samples


@dataclass
class ShowConfig:
    """``hpc-lensiam show``: a PNG grid of a data set's first samples."""

    data_dir: str | None = option(None, "the shard folder", positional=True, required=True)
    out: str | None = option(None, "the PNG", required=True)
    n: int = option(8, "how many samples", flag="-n")
    stretch: str = option(DEFAULT_STRETCH, STRETCH_HELP, choices=STRETCHES)

    def validate(self, where: str) -> None:
        if self.n < 1:
            raise ConfigError(f"{where}.n: expected >= 1, got {self.n}")


def caption(params: dict) -> str:
    """Lens parameters that are known (all of them for simulations, labels for ingested images),
    and an ingested image's file name (whole: the figure shortens it to fit its panel)."""
    lens = params.get("lens") or {}
    parts = [
        f"{sym}={lens[k]:{fmt}}"
        for k, sym, fmt in (("theta_E", "θE", ".2f"), ("gamma", "γ", ".2f"), ("e1", "e1", "+.2f"))
        if k in lens
    ]
    if "is_lens" in params:
        parts.append("lens" if params["is_lens"] else "non-lens")
    if "ingest" in params:
        parts.insert(0, Path(params["ingest"]["file"]).name)
    return "  ".join(parts)


def show_pairs(
    data_dir: str | os.PathLike, out: str | os.PathLike, n: int = 8, stretch: str = "asinh", what: str = "show"
) -> str:
    """Draw ``n`` samples (view1 | view2 side by side, or the single images in rows of up to 4), lens
    params captioned, each image stretched from its own noise level with an arcsec scale bar
    (:mod:`hpc_lensiam.shards.display`)."""
    from .display import check_stretch, describe, draw_panels, noise_sigma, pixel_scale_of

    check_stretch(stretch)
    if n < 1:
        raise UserError(f"-n: expected >= 1, got {n}")
    check_output_file(out, "--out")
    samples = list(islice(iter_samples(data_dir), n))
    if not samples:
        raise UserError(f"{data_dir}: the shards hold no samples")
    scale = pixel_scale_of(read_manifest(data_dir))
    views = [v for v in ("view1", "view2", "image") if v in samples[0]]
    panels = []
    for sample in samples:
        for j, view in enumerate(views):
            img = sample[view]
            sigma, _ = noise_sigma(img, sample["params"], view=int(view[-1]) if view[-1].isdigit() else 1)
            cap = "\n".join(t for t in (sample["key"], caption(sample["params"])) if t) if j == 0 else ""
            label = view if len(views) > 1 else None
            panels.append({"image": img, "caption": cap, "sigma": sigma, "pixel_scale": scale, "label": label})
    what_n = f"{len(samples)} {'pair' if len(views) > 1 else 'image'}{'s' * (len(samples) > 1)}"
    title = f"{Path(data_dir).name}: {what_n}; {describe(stretch)}"
    draw_panels(panels, out, title, stretch, max_cols=4, step=len(views), dpi=100)
    print(f"{what}: drew {len(samples)} samples from {data_dir} to {out} ({stretch} stretch)", flush=True)
    return str(out)
