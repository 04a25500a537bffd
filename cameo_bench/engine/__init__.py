"""The engine: one build path from an experiment spec to a runnable training run, the step, the loop,
checkpoints, DDP, and one tracked launch shared by the CLI and sweep trials."""
