"""``hpc-lensiam show``: a PNG grid of a shard set's samples, so a user can look at what was simulated."""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

from ..core.errors import UserError
from ..core.io import atomic_path, check_output_file
from .reader import iter_samples


def caption(params: dict) -> str:
    """Lens parameters that are known (all of them for simulations, labels for ingested images),
    and an ingested image's file name."""
    lens = params.get("lens") or {}
    parts = [
        f"{sym}={lens[k]:{fmt}}"
        for k, sym, fmt in (("theta_E", "θE", ".2f"), ("gamma", "γ", ".2f"), ("e1", "e1", "+.2f"))
        if k in lens
    ]
    if "is_lens" in params:
        parts.append("lens" if params["is_lens"] else "non-lens")
    if "ingest" in params:
        parts.insert(0, Path(params["ingest"]["file"]).name[:24])
    return "  ".join(parts)


def show_pairs(data_dir: str | os.PathLike, out: str | os.PathLike, n: int = 8) -> str:
    """Draw ``n`` samples, one row each (view1 | view2, or the single image), lens params captioned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if n < 1:
        raise UserError(f"-n: expected >= 1, got {n}")
    check_output_file(out, "--out")
    samples = list(islice(iter_samples(data_dir), n))
    if not samples:
        raise UserError(f"{data_dir}: the shards hold no samples")
    views = [v for v in ("view1", "view2", "image") if v in samples[0]]
    fig, axes = plt.subplots(len(samples), len(views), figsize=(2.2 * len(views), 2.3 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples):
        for ax, view in zip(row, views):
            ax.imshow(sample[view], origin="lower", cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        row[0].set_title(caption(sample["params"]), fontsize=8, loc="left")
    for ax, view in zip(axes[-1], views):
        ax.set_xlabel(view, fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"show: drew {len(samples)} samples from {data_dir} to {out}", flush=True)
    return str(out)
