"""Jobs: `python -m pipelines.<job> [PRESET | FILE.yaml] [key.path=value ...]`."""
