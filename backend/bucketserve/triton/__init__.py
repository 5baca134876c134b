"""The only code that imports triton_python_backend_utils: the Triton adapter of the engine."""
