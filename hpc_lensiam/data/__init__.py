"""Shard loading and the batched baseline SimSiam augmentations."""
