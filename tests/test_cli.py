"""`python -m inferflux` end to end, as a subprocess on a checkpoint from tools/tiny_checkpoint.py.

Greedy completions are checked against transformers' `generate` on the same folder (decoded with
the checkpoint's own tokenizer.json), and `--chat` against a hand-rendered ChatML prompt, so the
test fails if the CLI drops a flag, mixes up prompts or prints the wrong text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tests.test_generation import hf_greedy

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
# A small engine: 4 token buckets to compile at warm-up.
ENGINE_FLAGS = [
    "--max-num-seqs=2",
    "--max-num-batched-tokens=8",
    "--max-model-len=64",
    "--dtype=float32",
]
GREEDY_FLAGS = ["--temperature=0", "--ignore-eos", f"--max-tokens={NEW_TOKENS}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny default checkpoint, written by the tool exactly as the README runs it."""
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tiny_checkpoint.py"), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # NOTE: a persistent compilation cache shared by this module's runs: the second warm-up
    # loads the compiled steps instead of compiling them again (~10 s -> ~1 s on 2 cores).
    cache = tmp_path_factory.mktemp("jax-cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inferflux", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def hf_greedy_text(folder: Path, prompt_ids: list[int]) -> str:
    """transformers' greedy continuation, decoded; fails if a near-tie makes it ambiguous."""
    [(tokens, tie)] = hf_greedy(folder, [prompt_ids], NEW_TOKENS)
    assert tie == NEW_TOKENS, "near-tie: pick another prompt"
    return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(tokens)


def completions(stdout: str, n: int) -> list[str]:
    """Splits stdout into n completions (each printed with one trailing newline)."""
    assert stdout.endswith("\n")
    parts = stdout[:-1].split("\n")
    assert len(parts) == n, stdout  # the references below contain no newline
    return parts


def same_text(ours: str, ref: str) -> bool:
    # NOTE: the engine holds back a trailing partial UTF-8 character (U+FFFD) at the end.
    return ours.rstrip("\ufffd") == ref.rstrip("\ufffd")


def test_generate_matches_transformers(checkpoint: Path, cli_env: dict[str, str]) -> None:
    prompts = ["Once upon a time", "Hello, world!"]
    proc = run_cli(["--model", str(checkpoint), *GREEDY_FLAGS, *ENGINE_FLAGS, *prompts], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    refs = [hf_greedy_text(checkpoint, tok.encode(p).ids) for p in prompts]
    for ours, ref in zip(completions(proc.stdout, len(prompts)), refs, strict=True):
        assert ours.strip(), "empty completion"
        assert same_text(ours, ref), (ours, ref)
    assert f"generated {2 * NEW_TOKENS} tokens for 2 prompt(s)" in proc.stderr
    assert "tokens/s" in proc.stderr.splitlines()[-1]


def test_chat_uses_the_chat_template(checkpoint: Path, cli_env: dict[str, str]) -> None:
    proc = run_cli(
        ["--model", str(checkpoint), "--chat", *GREEDY_FLAGS, *ENGINE_FLAGS, "What is InferFlux?"],
        cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    # The ChatML template of tools/tiny_checkpoint.py, rendered by hand: BOS comes from the text.
    text = "<s><|im_start|>user\nWhat is InferFlux?<|im_end|>\n<|im_start|>assistant\n"
    ref = hf_greedy_text(checkpoint, tok.encode(text, add_special_tokens=False).ids)
    (ours,) = completions(proc.stdout, 1)
    assert ours.strip()
    assert same_text(ours, ref), (ours, ref)


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli(["--model", str(missing), "Hello"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"python -m inferflux: error: model folder {str(missing)!r} does not exist"
    ]


def test_folder_without_weights(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    proc = run_cli(["--model", str(tmp_path), "Hello"], {**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m inferflux: error: no weights")


def test_bad_sampling_setting_and_help(checkpoint: Path) -> None:
    proc = run_cli(["--model", str(checkpoint), "--top-p", "1.5", "Hello"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m inferflux: error: top_p must be in (0.0, 1.0], got 1.5"
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for flag in ("--model", "--chat", "--max-tokens", "--temperature", "--max-model-len"):
        assert flag in proc.stdout


def test_readme_main_command_uses_the_bundled_model(cli_env: dict[str, str]) -> None:
    """`python -m inferflux "ROMEO."` with no --model: the bundled model, real words out."""
    proc = run_cli(["--temperature=0", "--max-tokens=24", *ENGINE_FLAGS[:3], "ROMEO."], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "default_model" in proc.stderr  # the loading line names the bundled folder
    assert len(re.findall(r"[A-Za-z]{3,}", proc.stdout)) >= 4, proc.stdout
