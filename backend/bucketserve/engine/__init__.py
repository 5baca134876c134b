"""The paper's scheduler and a request's life, in plain Python: no torch, no Triton (so tests and a simulator
can run it without a model)."""
