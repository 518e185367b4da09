"""Training loops, checkpoints, EMA, randomness, logging and evaluation orchestration."""
