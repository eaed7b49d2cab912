"""MoE-aware quantization (HQQ/RTN, MiLo, CodeQuant), quantized modules, checkpoints, perplexity."""
