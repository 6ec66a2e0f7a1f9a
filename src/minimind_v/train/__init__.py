"""The training loop and its parts: stages, freezing, optimizer and schedule, checkpoints, DDP, metrics."""
