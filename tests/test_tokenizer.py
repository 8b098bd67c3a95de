"""Tokenizer wrapper and incremental detokenizer, checked against transformers/sentencepiece."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizer_fixtures import CORPUS_LINES, write_bpe_tokenizer, write_sentencepiece_tokenizer
from transformers import AutoTokenizer

from inferflux.detokenizer import IncrementalDetokenizer
from inferflux.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

TEXTS = [
    "Hello world",
    " Hello  there,\n\nnew lines\tand tabs ",
    "Le café est très chaud — déjà prêt à déguster!",
    "東京は日本の首都です。我们正在构建服务器",
    "Emoji: 😀🚀 👍🏽 👨‍👩‍👧 ❤️ done",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "x <s> y</s>z",
    "",
    "1234567890 + 42 = ?",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        "bpe": write_bpe_tokenizer(root / "bpe"),
        "bpe_pp_bos": write_bpe_tokenizer(root / "bpe_pp_bos", bos_in_post_processor=True),
        "bpe_pp_bos_off": write_bpe_tokenizer(
            root / "bpe_pp_bos_off", bos_in_post_processor=True, add_bos_token=False
        ),
        "bpe_cfg_bos": write_bpe_tokenizer(root / "bpe_cfg_bos", add_bos_token=True),
        "sp": write_sentencepiece_tokenizer(root / "sp", vocab_size=512),
        "sp_nobos": write_sentencepiece_tokenizer(root / "sp_nobos", 512, add_bos_token=False),
    }


@pytest.fixture(scope="module")
def bpe(folders: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(folders["bpe"])


@pytest.fixture(scope="module")
def sp(folders: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(folders["sp"])


# --- fixtures themselves ---------------------------------------------------------------------
def test_fixtures_are_deterministic(tmp_path: Path) -> None:
    a = write_bpe_tokenizer(tmp_path / "a", vocab_size=400)
    b = write_bpe_tokenizer(tmp_path / "b", vocab_size=400)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    c = write_sentencepiece_tokenizer(tmp_path / "c", vocab_size=450)
    d = write_sentencepiece_tokenizer(tmp_path / "d", vocab_size=450)
    assert (c / "tokenizer.model").read_bytes() == (d / "tokenizer.model").read_bytes()
    assert not (c / "tokenizer_config.json").exists()
    assert Tokenizer.from_pretrained(a).vocab_size == 400
    assert Tokenizer.from_pretrained(c).vocab_size == 450


# --- tokenizer.json (tokenizers backend) -----------------------------------------------------
@pytest.mark.parametrize("name", ["bpe", "bpe_pp_bos", "bpe_pp_bos_off", "bpe_cfg_bos"])
def test_bpe_encode_matches_transformers(folders: dict[str, Path], name: str) -> None:
    ours = Tokenizer.from_pretrained(folders[name])
    ref = AutoTokenizer.from_pretrained(str(folders[name]))
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS + CORPUS_LINES[:20]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(
                text, add_special_tokens=special
            ), (name, text, special)
    bos_first = ours.encode("abc")[0] == ours.bos_token_id
    assert bos_first == (name in ("bpe_pp_bos", "bpe_pp_bos_off"))


def test_bpe_decode_and_lookups_match_transformers(
    folders: dict[str, Path], bpe: Tokenizer
) -> None:
    ref = AutoTokenizer.from_pretrained(str(folders["bpe"]))
    rng = random.Random(0)
    for text in TEXTS:
        ids = bpe.encode(text)
        assert bpe.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert bpe.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
        assert bpe.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    for _ in range(20):
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert bpe.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert bpe.vocab_size == len(ref) == 512
    assert (bpe.bos_token, bpe.eos_token) == ("<s>", "</s>")
    assert (bpe.bos_token_id, bpe.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (0, 1)
    assert bpe.pad_token_id == ref.pad_token_id == 2
    assert bpe.all_special_ids == set(ref.all_special_ids) | {3, 4}
    assert bpe.token_to_id("<|im_end|>") == 4 and bpe.id_to_piece(4) == "<|im_end|>"
    assert bpe.token_to_id("no-such-token") is None
    assert bpe.model_max_length == 2048
    assert bpe.chat_template is not None and "<|im_start|>" in bpe.chat_template


def test_encode_is_thread_safe(bpe: Tokenizer, sp: Tokenizer) -> None:
    texts = (TEXTS + CORPUS_LINES) * 3
    expected = ([bpe.encode(x) for x in texts], [sp.encode(x) for x in texts])
    results: list[bool] = []

    def work() -> None:
        got = ([bpe.encode(x) for x in texts], [sp.encode(x) for x in texts])
        results.append(got == expected)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


# --- tokenizer.model (sentencepiece backend) -------------------------------------------------
def test_sentencepiece_matches_sentencepiece(folders: dict[str, Path], sp: Tokenizer) -> None:
    ref = spm.SentencePieceProcessor(model_file=str(folders["sp"] / "tokenizer.model"))
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.bos_token_id, sp.eos_token_id) == (1, 2)
    assert sp.vocab_size == ref.get_piece_size() == 512
    assert sp.all_special_ids == {0, 1, 2}
    assert sp.chat_template is None and sp.model_max_length is None
    for text in TEXTS[:5] + CORPUS_LINES[:30]:
        ids = sp.encode(text)
        assert ids == [1] + ref.encode(text), text  # Llama-2: BOS by default
        assert sp.encode(text, add_special_tokens=False) == ref.encode(text)
        assert sp.decode(ids) == ref.decode(ids) == text
        assert sp.convert_ids_to_tokens(ids) == [ref.id_to_piece(i) for i in ids]
    no_bos = Tokenizer.from_pretrained(folders["sp_nobos"])
    assert no_bos.encode("Hello") == ref.encode("Hello")


def test_sentencepiece_special_tokens_match_transformers(
    folders: dict[str, Path], sp: Tokenizer
) -> None:
    # transformers 5 loads a bare tokenizer.model without BOS; the text between special
    # tokens is encoded chunk by chunk (each with its dummy prefix) in both.
    ref = AutoTokenizer.from_pretrained(str(folders["sp"]))
    for text in TEXTS + ["<s>[INST] hi [/INST] answer</s><s>[INST] more [/INST]"]:
        assert sp.encode(text) == [1] + ref.encode(text), text
    ids = sp.encode("<s>[INST] hi [/INST] ok</s>")
    assert sp.decode(ids, skip_special_tokens=False) == "<s><s>[INST] hi [/INST] ok</s>"
    assert sp.decode(ids) == "[INST] hi [/INST] ok"


def test_config_parsing(tmp_path: Path) -> None:
    folder = write_sentencepiece_tokenizer(tmp_path / "m", vocab_size=450, write_config=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<s>", "lstrip": False, "special": True}
    cfg["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length if tools else 0 }}"},
    ]
    cfg["added_tokens_decoder"] = {"450": {"content": "<|extra|>", "special": True}}
    cfg["model_max_length"] = 1000000000000000019884624838656  # transformers' "unset"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.bos_token == "<s>" and tok.bos_token_id == 1
    assert tok.model_max_length is None
    assert tok.vocab_size == 451 and 450 in tok.all_special_ids
    assert 450 in tok.encode("a<|extra|>b", add_special_tokens=False)
    ids = tok.encode("a<|extra|>b", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == "a<|extra|>b"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "Dhi"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]) == "T1"
    assert tok.apply_chat_template(msgs, chat_template="tool_use") == "T0"
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_pretrained(folder).apply_chat_template(msgs) == "J1"


def test_missing_files_and_missing_template(tmp_path: Path, sp: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and str(tmp_path) in msg
    with pytest.raises(ValueError, match="no chat template"):
        sp.apply_chat_template([{"role": "user", "content": "hi"}])


# --- incremental detokenizer -----------------------------------------------------------------
def _stream(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool, seed: int) -> str:
    """Feed `out` in random-sized chunks; check the deltas add up; return the output text."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    rng, deltas, i = random.Random(seed), [], 0
    while i < len(out):
        n = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add_tokens(out[i : i + n]))
        i += n
    assert "".join(deltas) == detok.output_text
    return detok.output_text


STREAM_TEXTS = [
    ("User: say hello.", " Hello! Ça va? 東京 😀👍🏽 naïve façade."),
    ("東京は", "日本の首都です。🚀 fin"),
    ("Emoji 😀", "😃😄 🎉 ❤️ 한국어 ok"),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "Sure — 你好!<|im_end|>"),
    ("", "  leading spaces and\nnew lines\n\n"),
]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_ordinary_text(kind: str, skip: bool, bpe: Tokenizer, sp: Tokenizer) -> None:
    tok = bpe if kind == "bpe" else sp
    for k, (prompt_text, out_text) in enumerate(STREAM_TEXTS):
        prompt = tok.encode(prompt_text)
        out = tok.encode(prompt_text + out_text, add_special_tokens=False)
        out = out[len(tok.encode(prompt_text, add_special_tokens=False)) :]
        full = tok.decode(prompt + out, skip)
        head = tok.decode(prompt, skip)
        assert full.startswith(head)
        text = _stream(tok, prompt, out, skip, seed=k)
        assert head + text == full
        assert "\ufffd" not in text


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_detokenizer_random_ids(kind: str, bpe: Tokenizer, sp: Tokenizer) -> None:
    tok = bpe if kind == "bpe" else sp
    rng = random.Random(1)
    checked = 0
    for trial in range(150):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        out = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        skip = trial % 2 == 0
        text = _stream(tok, prompt, out, skip, seed=trial)
        full, head = tok.decode(prompt + out, skip), tok.decode(prompt, skip)
        if full.startswith(head) and not head.endswith("\ufffd"):
            expected = full[len(head) :]
            # Only a trailing incomplete character may be held back.
            assert text == expected or (
                expected.endswith("\ufffd") and text == expected.rstrip("\ufffd")[: len(text)]
            ), (prompt, out, text, expected)
            assert text.endswith("\ufffd") is False or expected.endswith("\ufffd")
            checked += 1
    assert checked > 100


def test_detokenizer_holds_split_utf8(bpe: Tokenizer, sp: Tokenizer) -> None:
    for tok in (bpe, sp):
        ids = tok.encode("🦜𝄞", add_special_tokens=False)
        assert len(ids) >= 2  # the emoji are split over several (byte) tokens
        prompt = tok.encode("go")
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add_tokens([i]) for i in ids]
        assert all("\ufffd" not in d for d in deltas) and "" in deltas  # something was held
        expected = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
        assert "".join(deltas) == detok.output_text == expected
        assert expected.strip() == "🦜𝄞"


class _SpyTokenizer:
    """Wraps a tokenizer and records the longest id list passed to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.longest = inner, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_detokenizer_work_per_token_is_bounded(bpe: Tokenizer, sp: Tokenizer) -> None:
    for tok in (bpe, sp):
        text = " ".join(CORPUS_LINES[:40])
        ids = tok.encode(text, add_special_tokens=False)
        spy = _SpyTokenizer(tok)
        prompt = tok.encode("prompt " * 200)
        detok = IncrementalDetokenizer(spy, prompt)  # type: ignore[arg-type]
        for i in ids:
            detok.add_tokens([i])
        head = tok.decode(prompt)
        assert head + detok.output_text == tok.decode(prompt + ids)
        assert spy.longest <= 16, spy.longest
        assert len(ids) > 500
