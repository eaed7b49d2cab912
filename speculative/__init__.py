"""Step-level and token-level speculation over the model actors (Lookahead Reasoning, FPSR)."""
