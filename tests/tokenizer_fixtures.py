"""Builders of tiny, deterministic tokenizers for tests (byte-level BPE and SentencePiece).

Other tests call these to give tiny random checkpoints a real tokenizer. Both builders train on
a small multilingual text written here (accents, CJK, emoji), take well under 2 s, and produce
the same files on every run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# NOTE: the corpus mixes scripts on purpose, so that the trained vocabularies contain tokens
# that hold only part of a multi-byte UTF-8 character (byte-level BPE) or fall back to bytes
# (SentencePiece), which is what the incremental detokenizer tests need.
_BASE_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "An inference server batches many requests and streams tokens back to each client.",
    "Paged attention keeps the key and value cache in fixed-size pages of memory.",
    "Le café est très chaud, mais la crème brûlée est déjà prête à déguster.",
    "Él comió piñas y jalapeños en la montaña; ¿quién más quería açaí?",
    "Straße, Mädchen, Größe und Übermut: schöne grüße aus München.",
    "Ça va? Oui, ça va très bien — merci beaucoup, à bientôt!",
    "東京は日本の首都です。今日は天気がとても良いです。",
    "我们正在构建一个大型语言模型推理服务器，它支持流式输出。",
    "你好，世界！机器学习和深度学习都很有趣。",
    "한국어 문장도 조금 있습니다. 안녕하세요!",
    "Emoji time: 😀 😃 😄 🚀 🔥 👍🏽 ❤️ 🎉 and a family 👨‍👩‍👧 emoji.",
    "Greek and Cyrillic: αβγδ λόγος, привет мир, спасибо.",
    "Numbers 0123456789, symbols #$%&*+-/<=>@[]^_{|}~ and code: def f(x): return x * 2",
    "Mixed: naïve coöperation, résumé façade, jalapeño 🌶️ 辣椒 hot!",
]
_SYLLABLES = [
    "ka",
    "ri",
    "to",
    "mu",
    "se",
    "na",
    "lo",
    "pe",
    "zu",
    "fi",
    "ch",
    "th",
    "qu",
    "ée",
    "ça",
    "ñu",
    "ö",
    "ü",
    "ß",
    "的",
    "是",
    "了",
    "人",
    "日",
    "本",
    "語",
    "学",
    "ко",
    "ра",
    "ми",
    "де",
    "λα",
    "πο",
    "😀",
    "🚀",
    "✨",
    "한",
    "국",
    "ab",
    "cd",
    "ing",
    "tion",
    "ment",
    "er",
    "ly",
]


def _synthetic_lines(n: int) -> list[str]:
    """Pseudo-words from a fixed linear congruential sequence (deterministic, no `random`)."""
    state, lines = 12345, []
    for _ in range(n):
        words = []
        for _ in range(10):
            word = ""
            for _ in range(2 + state % 3):
                state = (state * 1103515245 + 12345) % (2**31)
                word += _SYLLABLES[(state >> 8) % len(_SYLLABLES)]
            words.append(word)
        lines.append(" ".join(words))
    return lines


CORPUS_LINES: list[str] = [
    f"{line} {i}" if i % 3 else line for i in range(12) for line in _BASE_LINES
] + _synthetic_lines(400)

BPE_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_bpe_tokenizer(
    folder: str | Path,
    vocab_size: int = 512,
    chat_template: str | None = CHATML_TEMPLATE,
    *,
    bos_in_post_processor: bool = False,
    add_bos_token: bool | None = None,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE tokenizer and save tokenizer.json + tokenizer_config.json.

    Ids 0..4 are the special tokens `<s>`, `</s>`, `<pad>`, `<|im_start|>`, `<|im_end|>` (bos, eos,
    pad, ChatML markers); the vocabulary has at most `vocab_size` ids (fewer only if the corpus
    runs out of merges, above ~5600). `bos_in_post_processor` writes a post-processor that
    prepends `<s>`; `add_bos_token`, when not None, is written to tokenizer_config.json.
    Returns the folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer=trainer)
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))

    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(BPE_SPECIAL_TOKENS)
        },
    }
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


def write_sentencepiece_tokenizer(
    folder: str | Path,
    vocab_size: int = 512,
    chat_template: str | None = None,
    *,
    model_type: str = "bpe",
    write_config: bool = False,
    add_bos_token: bool | None = None,
) -> Path:
    """Train a Llama-2 style SentencePiece model (byte_fallback) and save it as tokenizer.model.

    Ids: 0 `<unk>`, 1 `<s>` (bos), 2 `</s>` (eos), then 256 byte pieces, then learned pieces;
    `vocab_size` must be at least ~420 (the corpus' characters + 259). Only tokenizer.model is
    written unless `write_config` (or a chat template / `add_bos_token`) asks for a
    tokenizer_config.json. Returns the folder.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS_LINES),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    if write_config or chat_template is not None or add_bos_token is not None:
        config: dict[str, object] = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": 2048,
        }
        if add_bos_token is not None:
            config["add_bos_token"] = add_bos_token
        if chat_template is not None:
            config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
