"""Serving runtimes: what each takes (checks), exact rewrites for them, GGUF and mlx-lm."""
