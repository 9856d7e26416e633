"""The training loop, checkpoints, progress display and throughput accounting."""
