"""Lens simulation: priors, sources, PSFs, instruments, LensSimulator and the MPI shard writer."""
