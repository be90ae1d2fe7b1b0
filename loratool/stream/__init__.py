"""Streaming: the read-compute-write pipeline, deltas of two checkpoints, scale-out."""
