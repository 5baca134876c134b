"""The engine's view of a Hugging Face tokenizer: prompt text to ids, and how long a prompt may be.

Tokenizing runs on the callers' threads (Triton's, or ``LLM``'s) while the output thread decodes
with the same tokenizer, so fast tokenizers are encoded through their Rust object directly:
``tokenizer(text)`` may reconfigure it (a mutable borrow) and fail with "Already borrowed".
"""

from __future__ import annotations

from typing import Any

from bucketserve.engine.request import InvalidInput


class PromptTokenizer:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        # no token stands for more bytes of text than its own spelling takes: an upper bound per token
        vocab = tokenizer.get_vocab()
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        """Prompt token ids given by a client must be below this."""

    def encode(self, text: str) -> list[int]:
        """Prompt ids with the model's special tokens. Through ``encode_batch``, which lets go of the GIL while
        it works (``encode`` holds it: ~6 ms for a 1,570-token prompt here, during which the engine thread could
        not start its next op); the ids are the same."""
        if self._backend is not None:
            return self._backend.encode_batch([text])[0].ids
        return self.tokenizer(text).input_ids


def check_prompt_bytes(prompt: str, max_model_len: int, max_token_bytes: int) -> None:
    """Refuse, before tokenizing it, a prompt too many bytes long to fit the context in any tokenization:
    each token covers at most ``max_token_bytes`` bytes, so such a prompt has more tokens than the context."""
    size = len(prompt.encode("utf-8"))
    limit = max_model_len * max_token_bytes
    if size > limit:
        raise InvalidInput(f"prompt is {size} bytes: more than the {max_model_len}-token context can hold "
                           f"(at most {limit} bytes with this tokenizer)")


def check_lengths(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Prompt and output must fit the context, or the request could never finish."""
    if prompt_len >= max_model_len:
        raise InvalidInput(f"prompt is {prompt_len} tokens, longer than the context allows ({max_model_len - 1})")
    if prompt_len + max_tokens > max_model_len:
        raise InvalidInput(
            f"max_tokens {max_tokens} is beyond the context: prompt {prompt_len} + max_tokens must be <= {max_model_len}"
        )
