"""The data contract, read and written in one place, torch-free: the manifest and npy members, the
tar reader and writer, the shard-set writer with its MPI progress, integrity checks, the one sample
reader, flux-conserving resampling and ``show``."""
