"""BucketServe's tests: unit (no server), integration (a real tritonserver), gpu (CUDA only)."""
