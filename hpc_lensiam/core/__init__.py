"""The floor every stage stands on, no stage's knowledge: errors, seeds, locks, atomic files and
hashes, the config machinery, and ranks/devices for every launcher. Imports nothing above it."""

__version__ = "0.1.0"
