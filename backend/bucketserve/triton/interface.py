"""The model's tensor interface, declared once: vllm_backend's tensors plus the TRT-LLM names
genai-perf sends. ``auto_complete_config`` fills it into configs that leave it out (the baseline
models), and a test keeps the documented config.pbtxt in step with it."""

from __future__ import annotations

INPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("text_input", "TYPE_STRING", [1]),
    ("prompt_token_ids", "TYPE_INT64", [-1]),
    ("stream", "TYPE_BOOL", [1]),
    ("sampling_parameters", "TYPE_STRING", [1]),
    ("exclude_input_in_output", "TYPE_BOOL", [1]),
    ("max_tokens", "TYPE_INT32", [1]),
    ("min_tokens", "TYPE_INT32", [1]),
    ("min_length", "TYPE_INT32", [1]),
    ("top_k", "TYPE_INT32", [1]),
    ("temperature", "TYPE_FP32", [1]),
    ("top_p", "TYPE_FP32", [1]),
    ("seed", "TYPE_UINT64", [1]),
    ("stop_words", "TYPE_STRING", [-1]),
    ("ignore_eos", "TYPE_BOOL", [1]),
    ("priority", "TYPE_INT32", [1]),
    ("slo_ms", "TYPE_INT32", [1]),
    ("return_finish_reason", "TYPE_BOOL", [1]),
    ("return_num_input_tokens", "TYPE_BOOL", [1]),
    ("return_num_output_tokens", "TYPE_BOOL", [1]),
    ("return_logprobs", "TYPE_BOOL", [1]),
    ("return_cumulative_logprob", "TYPE_BOOL", [1]),
)
REQUIRED_INPUTS = ("text_input",)
OUTPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [-1]),
    ("num_input_tokens", "TYPE_UINT32", [1]),
    ("num_output_tokens", "TYPE_UINT32", [-1]),
    ("logprobs", "TYPE_STRING", [-1]),
    ("cumulative_logprob", "TYPE_FP32", [-1]),
)
INPUT_NAMES = tuple(name for name, _, _ in INPUTS)


def complete(config: object) -> object:
    """Add every input and output ``config`` lacks and make it decoupled (python_backend's
    auto-complete object: as_dict, add_input, add_output, set_model_transaction_policy)."""
    present = config.as_dict()  # type: ignore[attr-defined]
    have_in = {t["name"] for t in present.get("input", [])}
    have_out = {t["name"] for t in present.get("output", [])}
    for name, dtype, dims in INPUTS:
        if name not in have_in:
            config.add_input({"name": name, "data_type": dtype, "dims": dims,  # type: ignore[attr-defined]
                              "optional": name not in REQUIRED_INPUTS})
    for name, dtype, dims in OUTPUTS:
        if name not in have_out:
            config.add_output({"name": name, "data_type": dtype, "dims": dims})  # type: ignore[attr-defined]
    config.set_model_transaction_policy({"decoupled": True})  # type: ignore[attr-defined]
    return config
