"""Write a small random Llama-architecture checkpoint in Hugging Face format.

No torch or transformers needed: numpy, safetensors, tokenizers and json only. The output folder
holds config.json (transformers-5 style), model.safetensors (HF weight names, shapes
[out_features, in_features]), a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json
with a ChatML chat template) and generation_config.json.

    python tools/tiny_checkpoint.py OUT_DIR [--hidden 512 --layers 8 --heads 8 --kv-heads 8
        --intermediate 1408 --vocab 32000 --seed 0]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4 in this order

# NOTE: ChatML turns; the bos token leads the rendered prompt (Llama-3 style), so the prompt
# must be tokenized without adding special tokens again (as transformers' apply_chat_template does).
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

TRAINING_TEXT = """\
InferFlux serves language models on accelerators. A request arrives over HTTP, is checked
against the caller's key, role and quota, is rendered through the chat template and split into
tokens, and then waits in the scheduler until there is room in the key-value cache. Each step the
engine hands out a budget of tokens: long prompts are cut into chunks, short decodes ride along,
and every sequence writes its keys and values into pages of a shared pool. The model reads those
pages back through paged attention, the sampler picks the next token with temperature, top-k,
top-p and penalties, and the text streams back to the client one delta at a time.
The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs! Numbers such
as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 2024 and 3.14159 appear too, with "quotes",
(brackets), [lists], {braces}, e-mail@example.com, snake_case, CamelCase and a tab\tor two.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
"""


@dataclass(frozen=True)
class TinyLlamaShape:
    """The architecture of the written checkpoint."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    head_dim: int | None = None  # default hidden // heads
    max_position: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.vocab < len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab must be at least {len(SPECIAL_TOKENS) + 256} (byte alphabet)")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads


def train_bpe_tokenizer(vocab_size: int, text: str = TRAINING_TEXT) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `text`, padded to exactly `vocab_size` entries.

    A paragraph supports only a few hundred merges; the remaining ids get filler vocabulary
    entries (never produced by encoding, but they decode to text like any other token).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return _pad_vocab(tok, vocab_size)


def _pad_vocab(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Add filler entries to the BPE vocabulary until it holds `vocab_size` tokens."""
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"trained vocabulary ({len(vocab)}) exceeds vocab_size {vocab_size}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(vocab) < vocab_size:
        n, word = i, ""
        while True:  # base-26 spelling of i
            word = letters[n % 26] + word
            n = n // 26 - 1
            if n < 0:
                break
        i += 1
        piece = "Ġ" + word  # "Ġ" is the byte-level symbol for a leading space
        if piece not in vocab:
            vocab[piece] = len(vocab)
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_config(
    special: dict[int, str], chat_template: str, bos: str, eos: str, pad: str, max_length: int
) -> dict[str, object]:
    """tokenizer_config.json for a `tokenizers` BPE: special tokens by id, the chat template."""
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in special.items()
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
    }


def write_tokenizer(out_dir: str | Path, vocab_size: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special tokens' ids by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids: dict[str, int] = {}
    for name in SPECIAL_TOKENS:
        token_id = tok.token_to_id(name)
        assert token_id is not None, name
        ids[name] = token_id
    config = tokenizer_config(
        {ids[t]: t for t in SPECIAL_TOKENS}, CHATML_TEMPLATE, BOS, EOS, PAD, 1_000_000
    )
    config.update(add_bos_token=True, add_eos_token=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
    )
    return ids


def random_llama_weights(
    shape: TinyLlamaShape, seed: int = 0, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face Llama names; linear weights are [out, in]."""
    rng = np.random.default_rng(seed)
    h, d, i = shape.hidden, shape.dim_per_head, shape.intermediate

    def linear(out_f: int, in_f: int) -> np.ndarray:
        # NOTE: std 1/sqrt(fan_in) keeps activations O(1) so logits are far from uniform.
        return rng.normal(0.0, in_f**-0.5, size=(out_f, in_f)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # away from 1.0 so a missed norm weight shows up
        return rng.uniform(0.5, 1.5, size=(n,)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.normal(0.0, 1.0, size=(shape.vocab, h)).astype(np.float32)
    }
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        w[f"{p}.self_attn.q_proj.weight"] = linear(shape.heads * d, h)
        w[f"{p}.self_attn.k_proj.weight"] = linear(shape.kv_heads * d, h)
        w[f"{p}.self_attn.v_proj.weight"] = linear(shape.kv_heads * d, h)
        w[f"{p}.self_attn.o_proj.weight"] = linear(h, shape.heads * d)
        w[f"{p}.mlp.gate_proj.weight"] = linear(i, h)
        w[f"{p}.mlp.up_proj.weight"] = linear(i, h)
        w[f"{p}.mlp.down_proj.weight"] = linear(h, i)
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
    w["model.norm.weight"] = norm(h)
    if not shape.tie_word_embeddings:
        w["lm_head.weight"] = linear(shape.vocab, h)
    return {k: _cast(v, dtype) for k, v in w.items()}


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        import ml_dtypes  # NOTE: ships with jax; imported only when bf16 is asked for

        return x.astype(ml_dtypes.bfloat16)
    raise ValueError(f"unsupported dtype {dtype!r}: use float32, float16 or bfloat16")


def llama_config(shape: TinyLlamaShape, ids: dict[str, int], dtype: str) -> dict[str, object]:
    """config.json as transformers 5 writes it for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[BOS],
        "dtype": dtype,
        "eos_token_id": ids[EOS],
        "head_dim": shape.dim_per_head,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_position,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_token_id": ids[PAD],
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": shape.tie_word_embeddings,
        "transformers_version": "5.24.0",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def write_tiny_checkpoint(
    out_dir: str | Path, shape: TinyLlamaShape | None = None, *, seed: int = 0, dtype="float32"
) -> Path:
    """Write a complete random Llama checkpoint (weights, config, tokenizer) into `out_dir`."""
    shape = shape or TinyLlamaShape()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, shape.vocab)
    weights = random_llama_weights(shape, seed=seed, dtype=dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = llama_config(shape, ids, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[IM_END]],
        "pad_token_id": ids[PAD],
        "transformers_version": "5.24.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def num_parameters(shape: TinyLlamaShape) -> int:
    """Parameter count of the checkpoint `shape` describes."""
    h, d = shape.hidden, shape.dim_per_head
    attn = 2 * h * shape.heads * d + 2 * h * shape.kv_heads * d
    per_layer = attn + 3 * h * shape.intermediate + 2 * h
    heads = 1 if shape.tie_word_embeddings else 2
    return shape.layers * per_layer + heads * shape.vocab * h + h


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--max-position", type=int, default=2048)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = TinyLlamaShape(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        head_dim=args.head_dim,
        max_position=args.max_position,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    out = write_tiny_checkpoint(args.out_dir, shape, seed=args.seed, dtype=args.dtype)
    n_params = num_parameters(shape)
    print(f"wrote {out} ({n_params / 1e6:.1f}M parameters, {args.dtype})")


if __name__ == "__main__":
    main()
