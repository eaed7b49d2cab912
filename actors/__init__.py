"""What hosts models: the model zoo, the generation engine and the Ray actor classes."""
