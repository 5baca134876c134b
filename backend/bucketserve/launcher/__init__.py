"""`bucketserve serve`: finds and starts tritonserver, and watches its model processes."""
