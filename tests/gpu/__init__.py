"""Tests that need a CUDA GPU; skipped elsewhere."""
