"""Quantized checkpoints: what a checkpoint's quantization is, and how to merge into it without
losing the adapter.

- :mod:`.layout`: detection (config.json and the tensors) and the layouts loratool reads exactly;
- one module per scheme, with dequantize, quantize and the streaming merge step: :mod:`.fp8`;
- :mod:`.rounding`: the rounding rules (nearest, stochastic) and the ``kept`` measure of what a
  rounded merge still carries of its delta;
- :mod:`.native` and ``csrc/``: the compiled kernels and their loader.

A new scheme (MXFP4, NVFP4, INT4) is one new module beside :mod:`.fp8`, with its layout in
:mod:`.layout`.
"""
