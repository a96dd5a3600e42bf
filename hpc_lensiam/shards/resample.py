"""Flux-conserving resampling onto a pixel grid: the PSF bank (simulate) and real cutouts (ingest)
both land on the shards' grid through it."""

from __future__ import annotations

import numpy as np


def overlap_matrix(n_in: int, scale_in: float, n_out: int, scale_out: float, center_in: float) -> np.ndarray:
    """(n_out, n_in) weights: length of input pixel j inside output pixel i, in input pixels.

    Input pixel j covers [j - 0.5, j + 0.5] (input-pixel units); output pixels, ``scale_out``
    wide, are laid out symmetrically around input coordinate ``center_in``. Summing input flux
    with these weights integrates the (piecewise-constant) PSF over each output pixel, which
    conserves flux.
    """
    r = scale_out / scale_in  # output pixel width in input pixels
    edges_out = center_in + (np.arange(n_out + 1) - n_out / 2.0) * r
    lo_in = np.arange(n_in) - 0.5
    hi_in = lo_in + 1.0
    lo = np.maximum(edges_out[:-1, None], lo_in[None, :])
    hi = np.minimum(edges_out[1:, None], hi_in[None, :])
    return np.clip(hi - lo, 0.0, None)
