"""Pretraining: the DDP | DeepSpeed engine, the loop, checkpoints."""
