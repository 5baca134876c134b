"""Triton loads this file; the backend lives in the installed `bucketserve` package."""

from bucketserve.triton.model import TritonPythonModel

__all__ = ["TritonPythonModel"]
