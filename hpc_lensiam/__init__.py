"""hpc_lensiam: LenSiam self-supervised representation learning for strong lenses, laptop to Slurm."""

from .core import __version__

__all__ = ["__version__"]
