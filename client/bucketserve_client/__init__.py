"""Thin gRPC client for a BucketServe (or any vllm_backend-compatible) Triton model."""

from bucketserve_client.client import AsyncBucketServeClient, BucketServeClient, BucketServeError, Completion

__all__ = ["AsyncBucketServeClient", "BucketServeClient", "BucketServeError", "Completion"]
