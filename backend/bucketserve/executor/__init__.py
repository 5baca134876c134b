"""Executors: run the engine's plan on a device with torch (today: any transformers causal LM)."""
