"""Build the default model offline: a seeded random Llama and a byte-level BPE tokenizer.

No model hub is reachable from our machines, so the default checkpoint is made locally and saved
with ``save_pretrained``; it then loads through ``from_pretrained(DIR)``, the same path a user's
real checkpoint takes. The default shape is the one vLLM and the other peers in docs/peers.md were
measured on: 19.6M parameters, so figures are comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bucketserve_client.defaults import corpus, default_model_dir

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
MARKER = "bucketserve-model.json"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the built model; defaults give 19.6M parameters (fp32: 78 MB)."""

    vocab_size: int = 32_000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0
    tokenizer_corpus_bytes: int = 6_000_000


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
"""A plain role-tagged template, so that chat clients work with the default model."""


def build_tokenizer(spec: ModelSpec, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(spec.tokenizer_corpus_bytes), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_model(spec: ModelSpec, out_dir: Path, vocab_size: int, special_ids: dict[str, int]) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **special_ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = special_ids["pad_token_id"]
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def is_built(out_dir: Path) -> bool:
    return (Path(out_dir) / MARKER).is_file()


def build(out_dir: Path, spec: ModelSpec = ModelSpec(), log=print) -> Path:
    """Write tokenizer and weights into ``out_dir``; the marker file is written last, so a
    half-built directory is never mistaken for a finished one."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"[build-model] training byte-level BPE tokenizer (vocab {spec.vocab_size}) on Python's stdlib ...")
    build_tokenizer(spec, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    log(f"[build-model] writing seeded random Llama weights (seed {spec.seed}) ...")
    n_params = build_model(spec, out_dir, len(tokenizer), special)
    (out_dir / MARKER).write_text(json.dumps({**asdict(spec), "parameters": n_params}, indent=2))
    log(f"[build-model] done: {n_params / 1e6:.1f}M parameters in {out_dir}")
    return out_dir


def add_chat_template(out_dir: Path, log=print) -> None:
    """Give a default model built before it shipped a chat template the template (the weights stay)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer.chat_template is None:
        log(f"[bucketserve] adding the chat template to the default model in {out_dir}")
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(out_dir)


def ensure_default_model(log=print) -> Path:
    """The default model's directory, built there first if it is not yet."""
    default = default_model_dir()
    if not is_built(default):
        log(f"[bucketserve] default model missing; building it in {default} (once)")
        build(default, log=log)
    else:
        add_chat_template(default, log)
    return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ModelSpec()
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=value, help=f"default {value}")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory holds a model")


def main(args: argparse.Namespace) -> int:
    if is_built(args.out_dir) and not args.force:
        print(f"[build-model] {args.out_dir} already holds a built model (use --force to rebuild)")
        return 0
    spec = ModelSpec(**{f: getattr(args, f) for f in asdict(ModelSpec()).keys()})
    build(args.out_dir, spec)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
