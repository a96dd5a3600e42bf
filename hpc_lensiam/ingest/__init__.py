"""Real survey cutouts in: FITS/.npy/HDF5/PNG -> the simulator's grid and normalisation -> single-mode shards.

prepare.py (sky, orientation, resampling, max = 1), run.py (catalogue, labels, the MPI check and write
passes); one file is read by hpc_lensiam/shards/cutouts.py (HDU, pixel scale, masks, noise, PSF), which
``simulate --match`` shares.
"""
