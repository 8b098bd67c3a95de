"""Model families against Hugging Face transformers: logits of a ragged batch, all positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inferflux.model_loader import load_model, logical_axes
from tests.hf_fixtures import load_hf_model
from tests.model_harness import ragged_logits

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
PROMPT_LENS = (7, 33, 1, 20)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in PROMPT_LENS]


def _hf_logits(folder, prompts: list[list[int]]) -> list[np.ndarray]:
    hf = load_hf_model(folder)
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


def _assert_close(ours: list[np.ndarray], ref: list[np.ndarray], atol: float) -> None:
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=atol * scale, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_checkpoint, family: str) -> None:
    folder = tiny_checkpoint(family)
    model = load_model(folder, "float32")
    prompts = _prompts(model.config.vocab_size)
    # NOTE: the Mistral fixture's sliding window (24) is shorter than the 33-token prompt, and
    # page_size 4 / chunk 16 make attention cross several chunks, so both paths are exercised.
    _assert_close(ragged_logits(model, prompts), _hf_logits(folder, prompts), atol=1e-4)


def test_sliding_window_is_exercised(tiny_checkpoint) -> None:
    cfg = load_model(tiny_checkpoint("mistral")).config
    assert cfg.sliding_windows[0] is not None and cfg.sliding_windows[0] < max(PROMPT_LENS)


def test_llama3_rope_scaling_is_read(tiny_checkpoint) -> None:
    cfg = load_model(tiny_checkpoint("llama3")).config
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_4_config_style(tiny_checkpoint, family: str) -> None:
    v5 = load_model(tiny_checkpoint(family))
    v4_folder = tiny_checkpoint(family, transformers_version_style=4)
    raw = json.loads((v4_folder / "config.json").read_text())
    assert "torch_dtype" in raw and "rope_parameters" not in raw
    v4 = load_model(v4_folder)
    assert v4.config == v5.config
    prompts = _prompts(v4.config.vocab_size)
    _assert_close(ragged_logits(v4, prompts), _hf_logits(v4_folder, prompts), atol=1e-4)


def test_tied_embeddings_and_shards(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("qwen3", tie_word_embeddings=True, shards=True)
    assert (folder / "model.safetensors.index.json").is_file()
    model = load_model(folder)
    assert model.config.tie_word_embeddings
    prompts = _prompts(model.config.vocab_size, seed=1)
    _assert_close(ragged_logits(model, prompts), _hf_logits(folder, prompts), atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tiny_checkpoint, dtype: str) -> None:
    folder = tiny_checkpoint("llama", dtype=dtype)
    model = load_model(folder)  # "auto" takes the checkpoint's dtype
    assert str(np.dtype(model.dtype)) == dtype
    prompts = _prompts(model.config.vocab_size)
    ours = ragged_logits(model, prompts)
    # The reference runs the same half-precision weights in float32: differences are rounding.
    ref = _hf_logits(folder, prompts)
    _assert_close(ours, ref, atol=3e-2)
    # The argmax agrees except where the reference's top-2 gap is within rounding.
    for a, b in zip(ours, ref, strict=True):
        top2 = np.sort(b, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 0.1
        assert (a.argmax(-1) == b.argmax(-1))[clear].all()


def test_weights_carry_logical_axes(tiny_checkpoint) -> None:
    axes = logical_axes(load_model(tiny_checkpoint("qwen2")).state)
    assert axes[("embed_tokens",)] == ("vocab", "embed")
    assert axes[("layers", 0, "q_proj", "kernel")] == ("embed", "q_heads")
    assert axes[("layers", 0, "q_proj", "bias")] == ("q_heads",)
    assert axes[("layers", 1, "down_proj", "kernel")] == ("ffw", "embed")


def test_unsupported_architecture_and_missing_files(tmp_path, tiny_checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_model(tmp_path)
    src = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(src, "float64")
