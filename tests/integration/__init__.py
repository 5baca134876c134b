"""Tests against a real tritonserver started through `bucketserve serve`."""
