"""hpc_lensiam: LenSiam self-supervised representation learning for strong lenses, laptop to Slurm."""

__version__ = "0.1.0"
