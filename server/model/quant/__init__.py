"""Quantized base weights: the base GEMM of a ``MultiLoRALinear`` on int4 or int8 codes.

Adapters stay in full precision and run as side paths over the quantized base; merged copies are
not made over a quantized base. ``int_weights.py`` holds the code layouts and their GEMMs,
``gguf_codes.py`` reads a GGUF file's own Q4_0/Q4_1/Q4_K blocks into them exactly.
"""
