"""Request Bucketing Manager: half-open prompt-length buckets that split and merge with the queue.

Buckets start as one ``[0, L_max)``. Before each scheduling decision the waiting requests are
sorted into the current buckets (O(n log k)), then (paper, Algorithm 1):

- merge: when fewer requests wait than ``merge_ratio x N_max`` of the whole range, every bucket
  collapses back into ``[0, L_max)``. The paper merges below N_max itself (``merge_ratio = 1``);
  a lower mark than the split mark keeps load that hovers near N_max from flipping the buckets
  back and forth every step.
- split: a bucket ``[low, up)`` holding more than its N_max requests splits at its midpoint ``m``
  when more than ``theta`` of them are shorter than ``m``; with ``symmetric_split`` also when more
  than ``theta`` are at least ``m``. Children split again while the rule holds, down to
  ``min_width``. Requests follow their length into a child; boundaries move, requests never do.

Bucketing is by prompt length, the length a prefill batch pads to.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Sequence

from bucketserve.engine.request import Request


@dataclass
class Bucket:
    low: int
    up: int
    requests: list[Request] = field(default_factory=list)

    def __contains__(self, length: int) -> bool:
        return self.low <= length < self.up


@dataclass(frozen=True)
class BucketRules:
    theta: float = 0.5
    """Share of a bucket's requests that must fall in one half for it to split (the paper's 0.5)."""
    merge_ratio: float = 0.5
    """Merge when fewer than merge_ratio x N_max requests wait; 1.0 is the paper's rule."""
    symmetric_split: bool = False
    """Also split when the upper half is crowded (the paper splits only for the lower half)."""
    min_width: int = 16
    """Buckets narrower than twice this do not split."""


BatchLimit = Callable[[Bucket], int]
"""N_max of a bucket: how many of its requests one batch may hold (from its upper bound)."""


class BucketManager:
    def __init__(self, max_len: int, rules: BucketRules = BucketRules()):
        self.max_len = max_len
        self.rules = rules
        self.bounds = [0, max_len]
        self.splits = 0
        self.merges = 0
        self._settled: dict[int, Bucket] = {}
        """The buckets the last refit returned, by identity: handed back unchanged, none of them splits."""

    def index(self, request: Request) -> int:
        """Which of the current buckets (those the last update or refit returned) holds ``request``."""
        return bisect.bisect_right(self.bounds, min(request.prompt_len, self.max_len - 1)) - 1

    def _assign(self, waiting: Sequence[Request]) -> list[Bucket]:
        buckets = [Bucket(low, up) for low, up in zip(self.bounds, self.bounds[1:])]
        for request in waiting:
            buckets[self.index(request)].requests.append(request)
        return buckets

    def update(self, waiting: Sequence[Request], batch_limit: BatchLimit, most: int | None = None) -> list[Bucket]:
        """Sort ``waiting`` (in its order) into buckets, merge or split them; return the buckets. ``most``: no
        ``batch_limit`` exceeds it (limits that cannot decide a rule are then not computed)."""
        return self.refit(self._assign(waiting), waiting, batch_limit, most)

    def refit(self, buckets: list[Bucket], waiting: Sequence[Request], batch_limit: BatchLimit,
              most: int | None = None) -> list[Bucket]:
        """Merge or split ``buckets``, which hold ``waiting`` in the current bounds (the last buckets with the
        requests that left taken out, when only some left: no need to sort the queue again). Buckets that
        neither merge nor split come back as the same objects."""
        few = most is None or len(waiting) < self.rules.merge_ratio * most
        if (len(buckets) > 1 and few
                and len(waiting) < self.rules.merge_ratio * batch_limit(Bucket(0, self.max_len, list(waiting)))):
            self.bounds = [0, self.max_len]
            self.merges += 1
            buckets = self._assign(waiting)
        split = [child for bucket in buckets for child in self._split(bucket, batch_limit, most)]
        self.bounds = [b.low for b in split] + [self.max_len]
        self._settled = {id(b): b for b in split}
        return split

    def _split(self, bucket: Bucket, batch_limit: BatchLimit, most: int | None) -> list[Bucket]:
        if self._settled.get(id(bucket)) is bucket or bucket.up - bucket.low < 2 * self.rules.min_width:
            return [bucket]
        crowded = most is not None and len(bucket.requests) > most
        if not crowded and len(bucket.requests) <= batch_limit(bucket):
            return [bucket]
        mid = (bucket.low + bucket.up) // 2
        lower = [r for r in bucket.requests if r.prompt_len < mid]
        upper = [r for r in bucket.requests if r.prompt_len >= mid]
        share = len(lower) / len(bucket.requests)
        if share > self.rules.theta or (self.rules.symmetric_split and 1 - share > self.rules.theta):
            self.splits += 1
            return (self._split(Bucket(bucket.low, mid, lower), batch_limit, most)
                    + self._split(Bucket(mid, bucket.up, upper), batch_limit, most))
        return [bucket]
