"""Quantized matmul kernels: Triton (GPU; TRITON_INTERPRET=1 on CPU), CPU kernels, torch references.

Named `qkernels`, not `kernels`: transformers imports the hub `kernels` distribution, which a top-level
`kernels` package here would shadow (tests/test_layout.py checks that no package of ours shadows one).
Importing this package is free of side effects.
"""
