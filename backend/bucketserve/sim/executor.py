"""An executor that computes nothing: each forward pass moves a simulated clock on by what the cost model
says it takes, and every row gets a token that never ends it early (requests run to max_tokens)."""

from __future__ import annotations

from typing import Sequence

from bucketserve.engine.executor import StepOutput
from bucketserve.engine.memory import KVCostModel
from bucketserve.engine.request import Request
from bucketserve.sim.cost import CostModel

TOKEN = 0
"""What every step generates; not an end-of-sequence token (the executor has none)."""


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SimExecutor:
    """Implements the engine's ``Executor`` protocol in simulated time. ``page_size`` > 0: paged KV, packed and
    chunked prefill, and a step's prefill and decode as one forward (our executor); 0: padded caches, prefill
    padded to the longest prompt, then a separate decode step."""

    UNIFIED = True
    """Whether paged steps run as one forward (the disaggregated halves below each run one kind only)."""

    def __init__(self, cost: CostModel, clock: SimClock, page_size: int = 128, activation_reserve: int = 0):
        self.cost = cost
        self.clock = clock
        self.page_size = page_size
        self.num_parameters = cost.model.num_parameters
        self.max_position_embeddings = cost.model.max_len
        self.eos_ids: frozenset[int] = frozenset()
        self.last_decode_positions = (0, 0)
        self.oom_retries = 0
        self.unified_step = self.UNIFIED and bool(page_size)
        self.activation_reserve = activation_reserve
        self.lengths: dict[int, int] = {}
        """Cached positions of each running request, by id, in running order."""
        self.rows: list[Request] = []
        self.forward_seconds = 0.0

    def info(self) -> dict[str, str]:
        c = self.cost
        return {"executor": "simulated", "hardware": c.hw.name, "model": c.model.name, "devices": str(c.devices),
                "dtype": c.hw.dtype}

    def kv_cost(self) -> KVCostModel:
        m = self.cost.model
        return KVCostModel(m.layers, m.kv_heads, m.head_dim, self.cost.dtype_bytes)

    def free_device_memory(self, max_prefill_tokens: int, max_len: int) -> int | None:
        """What the devices hold beyond the weights and the activations of the largest prefill."""
        hw, c = self.cost.hw, self.cost
        return max(0, int(hw.memory_bytes * c.devices - c.weight_bytes - self.activation_reserve))

    def allocate(self, budget_bytes: int) -> None:
        self.reset()

    def install_faults(self, spec: str) -> None:
        raise ValueError("the simulator has no fault injection")

    def prefill_positions(self, lengths: list[int], decode_rows: int = 0) -> int:
        return sum(lengths) if self.page_size else len(lengths) * max(lengths)

    def _run(self, seconds: float) -> None:
        self.forward_seconds += seconds
        self.clock.advance(seconds)

    def prefill(self, batch: Sequence[Request]) -> StepOutput:
        self._run(self.cost.prefill_s([r.prompt_len for r in batch], padded=not self.page_size))
        for request in batch:
            self.lengths[request.id] = request.prompt_len
        self.rows += batch
        out = StepOutput()
        out.add(batch, [TOKEN] * len(batch))
        return out

    def decode(self) -> StepOutput:
        contexts = [self.lengths[r.id] + 1 for r in self.rows]
        read = sum(contexts) if self.page_size else len(contexts) * max(contexts)
        self.last_decode_positions = (read, read - sum(contexts))
        self._run(self.cost.decode_s(contexts if self.page_size else [max(contexts)] * len(contexts)))
        for request in self.rows:
            self.lengths[request.id] += 1
        out = StepOutput()
        out.add(list(self.rows), [TOKEN] * len(self.rows))
        return out

    def step(self, batch: Sequence[Request]) -> StepOutput:
        rows = list(self.rows)
        contexts = [self.lengths[r.id] + 1 for r in rows]
        self.last_decode_positions = (sum(contexts), 0)
        complete = [r for r in batch if r.prefill_end == r.prompt_len]
        self._run(self.cost.step_s([(r.prefill_end - r.prefilled, r.prefilled) for r in batch], len(complete), contexts))
        for request in rows:
            self.lengths[request.id] += 1
        for request in batch:
            self.lengths[request.id] = request.prefill_end
        self.rows += complete
        out = StepOutput()
        out.add(rows + complete, [TOKEN] * (len(rows) + len(complete)))
        return out

    def drop(self, ids: set[int]) -> None:
        for i in ids:
            self.lengths.pop(i, None)
        self.rows = [r for r in self.rows if r.id not in ids]

    def reset(self) -> None:
        self.lengths.clear()
        self.rows = []

    def kv_bytes(self) -> int:
        per_token = self.cost.model.kv_bytes_per_token(self.cost.dtype_bytes)
        if self.page_size:
            return sum(-(-n // self.page_size) for n in self.lengths.values()) * self.page_size * per_token
        return len(self.lengths) * max(self.lengths.values(), default=0) * per_token


class PrefillOnlyExecutor(SimExecutor):
    """The prefill devices of a disaggregated deployment: they compute prompts and first tokens; decoding
    happens elsewhere, so a decode step here is empty (the runner moves the rows out after each step)."""

    UNIFIED = False

    def decode(self) -> StepOutput:
        self.last_decode_positions = (0, 0)
        return StepOutput()


class DecodeOnlyExecutor(SimExecutor):
    """The decode devices of a disaggregated deployment: a request arrives with its prompt's KV and first
    token already made, so joining the running set computes nothing."""

    UNIFIED = False

    def prefill(self, batch: Sequence[Request]) -> StepOutput:
        for request in batch:
            self.lengths[request.id] = request.prompt_len + request.num_output - 1
        self.rows += batch
        return StepOutput()

