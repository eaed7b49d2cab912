"""Quantized matmul kernels: Triton (GPU; TRITON_INTERPRET=1 on CPU), CPU kernels, torch references.

Importing this package is free of side effects: transformers probes for a top-level `kernels` module (its
hub-kernels integration) and must find nothing usable here (tests/test_layout.py checks that).
"""
