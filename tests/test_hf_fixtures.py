"""The tiny checkpoints load back with transformers, and tools/tiny_checkpoint.py is HF-valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from tests.hf_fixtures import FAMILIES, load_hf_model
from tools import tiny_checkpoint as tool

PROMPT_LEN = 40  # longer than Mistral's sliding window (24)


def _prompt(vocab_size: int, length: int = PROMPT_LEN) -> torch.Tensor:
    rng = np.random.default_rng(1)
    return torch.tensor(rng.integers(5, vocab_size, size=(1, length)))  # [1, S]


@torch.no_grad()
def _logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> np.ndarray:
    return model(ids).logits[0].numpy()  # [S, V]


def _safetensors_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_config_styles_agree(tiny_checkpoint, family: str) -> None:
    v5 = tiny_checkpoint(family)
    v4 = tiny_checkpoint(family, transformers_version_style=4)
    raw5 = json.loads((v5 / "config.json").read_text())
    raw4 = json.loads((v4 / "config.json").read_text())
    assert "rope_parameters" in raw5 and "dtype" in raw5 and "rope_theta" not in raw5
    assert "rope_parameters" not in raw4 and raw4["torch_dtype"] == "float32"
    assert raw4["rope_theta"] == raw5["rope_parameters"]["rope_theta"] == 10000.0

    m5, m4 = load_hf_model(v5), load_hf_model(v4)
    assert m5.config.num_attention_heads == 4 and m5.config.num_key_value_heads == 2
    assert m5.config.rope_parameters == m4.config.rope_parameters
    ids = _prompt(m5.config.vocab_size)
    l5, l4 = _logits(m5, ids), _logits(m4, ids)
    np.testing.assert_array_equal(l5, l4)
    probs = torch.softmax(torch.from_numpy(l5), -1)
    assert probs.max(-1).values.mean() > 30.0 / m5.config.vocab_size  # far from uniform

    params = dict(m5.named_parameters())
    for name, p in params.items():
        if name.endswith("norm.weight"):
            assert not torch.allclose(p, torch.ones_like(p)), name
    if family == "qwen2":
        bias = params["model.layers.0.self_attn.q_proj.bias"]
        assert bias.abs().min() > 0
    if family == "qwen3":
        assert "model.layers.1.self_attn.k_norm.weight" in params


def test_llama3_rope_scaling_in_both_styles(tiny_checkpoint) -> None:
    raw5 = json.loads((tiny_checkpoint("llama3") / "config.json").read_text())
    raw4 = json.loads(
        (tiny_checkpoint("llama3", transformers_version_style=4) / "config.json").read_text()
    )
    assert raw5["rope_parameters"]["rope_type"] == "llama3"
    assert raw5["rope_parameters"]["factor"] == 8.0
    assert raw4["rope_scaling"]["rope_type"] == "llama3"
    assert raw4["rope_scaling"]["original_max_position_embeddings"] == 64
    # The scaled rope must change the model: compare with plain Llama of the same weights.
    ids = _prompt(raw5["vocab_size"], 200)
    scaled = _logits(load_hf_model(tiny_checkpoint("llama3")), ids)
    plain = _logits(load_hf_model(tiny_checkpoint("llama")), ids)
    assert not np.allclose(scaled, plain, atol=1e-3)


def test_mistral_sliding_window_is_effective(tiny_checkpoint) -> None:
    windowed = load_hf_model(tiny_checkpoint("mistral"))
    full = load_hf_model(tiny_checkpoint("mistral", sliding_window=None))
    assert windowed.config.sliding_window == 24
    ids = _prompt(windowed.config.vocab_size)
    a, b = _logits(windowed, ids), _logits(full, ids)
    np.testing.assert_allclose(a[:24], b[:24], atol=1e-5)  # inside the window: identical
    assert not np.allclose(a[30:], b[30:], atol=1e-3)


def test_sharded_and_tied_checkpoints(tiny_checkpoint) -> None:
    single = tiny_checkpoint("qwen3")
    sharded = tiny_checkpoint("qwen3", shards=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == _safetensors_keys(single)
    ids = _prompt(100)
    np.testing.assert_array_equal(
        _logits(load_hf_model(single), ids), _logits(load_hf_model(sharded), ids)
    )

    tied = tiny_checkpoint("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in _safetensors_keys(tied)
    model = load_hf_model(tied)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_bfloat16_checkpoint(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("qwen2", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_tokenizer_and_generation_config(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    assert len(hf_tok) == raw_tok.get_vocab_size(True) == config["vocab_size"]
    text = "Hello, world! The quick brown fox."
    assert hf_tok(text)["input_ids"] == raw_tok.encode(text).ids
    prompt = str(
        hf_tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
        )
    )
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("assistant\n")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] in np.atleast_1d(generation["eos_token_id"])


@pytest.mark.parametrize("tie,dtype", [(False, "float32"), (True, "bfloat16")])
def test_tool_checkpoint_loads_in_transformers(tmp_path: Path, tie: bool, dtype: str) -> None:
    args = [str(tmp_path), "--vocab", "600", "--layers", "3", "--dtype", dtype, "--seed", "3"]
    tool.main([*args, "--tie-word-embeddings"] if tie else args)
    loaded: Any = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True
    )
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 600
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
        q = f.get_tensor("model.layers.2.self_attn.q_proj.weight")
    assert q.dtype == getattr(torch, dtype)
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, q)
    shape = tool.TinyLlamaShape(vocab=600, layers=3, tie_word_embeddings=tie)
    assert model.num_parameters() == tool.num_parameters(shape)

    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 600
    assert tok.decode(tok("Hello, world!")["input_ids"], skip_special_tokens=True) == (
        "Hello, world!"
    )
    assert str(tok.decode([599])).strip()  # padded vocabulary entries decode to text
    model = model.float().eval()
    with torch.no_grad():
        logits = model(_prompt(600, 12)).logits  # [1, 12, V]
    assert torch.isfinite(logits).all() and logits.std() > 0.1
