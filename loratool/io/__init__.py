"""File I/O: checkpoints read by streaming, safetensors headers, writers, atomic outputs, direct I/O.

Everything that touches ``safetensors`` files or the output file system lives here.
"""
