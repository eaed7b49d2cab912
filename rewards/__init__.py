"""Judging text: step verifiers and SAPO rewards."""
