"""mlxbatch: run a file of prompts through a local MLX model, in validated, resumable batches."""

__version__ = "0.1.0"
