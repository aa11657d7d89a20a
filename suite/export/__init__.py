"""Quantized checkpoints that leave the suite (``qbench export``).

A cell's quantized model is re-created from its quantization state (``LayerQState`` per
layer) and written in a format that engines nobody here wrote load:

* ``to_gguf``: GGUF for llama.cpp (and transformers' GGUF loader), block types Q4_0, Q4_1,
  Q5_0, Q5_1 and Q8_0, each written from the integer codes, never requantized;
* ``to_ctensors``: compressed-tensors safetensors with the ``quantization_config`` that
  transformers and vLLM read;
* ``rebuild``: finds a published cell by run key and re-runs it deterministically to recover
  the state a record alone does not hold.

A format that a target cannot represent exactly (up to the float16 rounding of its block
constants) is refused with one line (``suite.errors.ExportRefused``).
"""
