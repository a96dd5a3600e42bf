"""The package's one rule for deriving a seed from integer parts (seed, rank, epoch, step, ...).

Every stream that must be reproducible across resumes and rank counts (the shard order, the
shuffle buffer, the baseline augmentations, the on-the-fly renderer) is seeded by
``derive_seed(seed, ...)``: numpy's SeedSequence mixes the parts, so neighbouring tuples give
independent streams.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integer ``parts`` (SeedSequence entropy mixing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
