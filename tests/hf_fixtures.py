"""Tiny random Hugging Face checkpoints, written at test time with transformers + torch.

Each family gets a 2-layer, hidden-64 model with GQA (4 query heads, 2 KV heads, head_dim 16),
random weights at std 0.1 (so logits are far from uniform), norm weights drawn away from 1.0 and,
for Qwen2, non-zero q/k/v biases. The folder also holds a byte-level BPE tokenizer with a ChatML
chat template and a generation_config.json, like a real Hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from tests.tokenizer_fixtures import write_bpe_tokenizer

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")
TOKENIZER_VOCAB = 384
WEIGHT_STD = 0.1
EMBED_STD = 0.5  # embeddings and lm_head: logits std ~4, so greedy picks rarely near-tie

# NOTE: Qwen-style ChatML: no bos token in the template and none added by the tokenizer.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ARCH: dict[str, tuple[Any, Any]] = {  # family -> (config class, model class)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def special_token_ids(folder: Path) -> dict[str, int | None]:
    """Ids of bos/eos/pad (from tokenizer_config.json) and <|im_end|>, None where absent."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    ids: dict[str, int | None] = {}
    for name in ("bos", "eos", "pad"):
        token = tok_config.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        ids[name] = tok.token_to_id(token) if token else None
    ids["im_end"] = tok.token_to_id("<|im_end|>")
    return ids


def config_kwargs(family: str, vocab_size: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """The transformers config arguments of a tiny `family` model (before overrides)."""
    kwargs: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    if family == "llama3":
        kwargs["rope_parameters"] = {**_LLAMA3_ROPE, "rope_theta": 10000.0}
    elif family == "mistral":
        kwargs["sliding_window"] = 24
    elif family in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    return kwargs


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: N(0, WEIGHT_STD) for matrices and biases (EMBED_STD for the
    embedding and lm_head), U(0.5, 1.5) for norm weights.

    NOTE: transformers initialises norms to 1 and Qwen2's q/k/v biases to 0, which would hide a
    loader that drops them; this makes every tensor matter.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            new = torch.rand(param.shape, generator=gen) + 0.5
        else:
            std = EMBED_STD if "embed_tokens" in name or "lm_head" in name else WEIGHT_STD
            new = torch.randn(param.shape, generator=gen) * std
        param.copy_(new.to(param.dtype))


def to_v4_style(config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a transformers-5 config.json dict the way transformers 4 wrote it.

    v5: `dtype`, `rope_parameters: {rope_theta, rope_type, ...}`, `layer_types` on Qwen.
    v4: `torch_dtype`, top-level `rope_theta`, `rope_scaling` (null or the scaling dict), and
    no `layer_types` (as on most Hub checkpoints).
    """
    out = dict(config)
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    rope = dict(out.pop("rope_parameters", None) or {})
    out["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    elif out.get("model_type") != "mistral":  # MistralConfig v4 had no rope_scaling
        out["rope_scaling"] = None
    if all(t == "full_attention" for t in out.get("layer_types") or []):
        out.pop("layer_types", None)
    out["transformers_version"] = "4.51.3"
    return dict(sorted(out.items()))


def make_tiny_checkpoint(
    folder: str | Path,
    family: str,
    *,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    transformers_version_style: int = 5,
    shards: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random `family` checkpoint (weights, config, tokenizer) into `folder`.

    `overrides` replace transformers config arguments (e.g. num_hidden_layers=3). `shards=True`
    splits the weights over several safetensors files plus model.safetensors.index.json.
    """
    if family not in _ARCH:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if transformers_version_style not in (4, 5):
        raise ValueError("transformers_version_style must be 4 or 5")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_bpe_tokenizer(folder, vocab_size=TOKENIZER_VOCAB, chat_template=CHATML_TEMPLATE)
    ids = special_token_ids(folder)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(True)
    kwargs = config_kwargs(family, vocab, ids)
    kwargs.update(overrides)
    config_cls, model_cls = _ARCH[family]
    config = config_cls(tie_word_embeddings=tie_word_embeddings, **kwargs)
    model = model_cls(config)
    randomize_weights(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    max_shard = "200KB" if shards else "10GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard)
    _write_generation_config(folder, ids)
    if transformers_version_style == 4:
        path = folder / "config.json"
        path.write_text(json.dumps(to_v4_style(json.loads(path.read_text())), indent=2) + "\n")
    return folder


def _write_generation_config(folder: Path, ids: dict[str, int | None]) -> None:
    """generation_config.json with a list of stop ids (eos and <|im_end|>), as chat models ship."""
    eos = [i for i in (ids["eos"], ids["im_end"]) if i is not None]
    generation = {
        "bos_token_id": ids["bos"],
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": ids["pad"],
        "transformers_version": transformers.__version__,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def load_hf_model(folder: str | Path) -> transformers.PreTrainedModel:
    """The checkpoint as a transformers model: float32, eager attention, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
