"""Real survey cutouts in: FITS/.npy -> the simulator's grid and normalisation -> single-mode shards.

read.py (one file: HDU, pixel scale, masks), prepare.py (sky, orientation, resampling, max = 1),
run.py (catalogue, labels, the MPI check and write passes).
"""
