"""The training loop and what it needs: schedule, logging, checkpoints, FLOP counts."""
