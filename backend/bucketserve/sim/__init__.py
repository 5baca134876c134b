"""``bucketserve simulate``: the engine's own scheduler in simulated time over a cost model of each step."""
