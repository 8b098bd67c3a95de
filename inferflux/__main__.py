"""Command-line generation: `python -m inferflux [--model PATH] "PROMPT" ...`.

Loads a Hugging Face checkpoint folder into an offline `LLM`, generates a completion for each
prompt (or each chat message with `--chat`) and prints it. Completions go to stdout; prompt
headers, progress and the final tokens/s line go to stderr, so `> out.txt` keeps only the text.
Usage errors (a missing or unusable model folder, a bad setting) are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from inferflux.config import DEFAULT_MODEL, EngineConfig
from inferflux.sampling_params import SamplingParams

PROG = "python -m inferflux"
EXIT_USAGE = 2
DEFAULT_MAX_NUM_SEQS = 8

EPILOG = """\
examples:
  python -m inferflux "ROMEO."                             # the bundled Shakespeare model
  python tools/tiny_checkpoint.py /tmp/inferflux-tiny     # a tiny random model (output is noise)
  python -m inferflux --model /tmp/inferflux-tiny "Once upon a time"
  python -m inferflux --model /tmp/inferflux-tiny --chat --temperature 0 "Hello!" "Who are you?"

Warm-up compiles one step per token bucket (powers of two up to --max-num-batched-tokens),
so small values start faster; larger ones batch more work per step.
"""


class UsageError(Exception):
    """A mistake of the caller: reported as one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with an InferFlux engine from a local Hugging Face "
        "checkpoint folder (config.json, *.safetensors, tokenizer files).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    p.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        metavar="PATH",
        help="checkpoint folder (default: the bundled Shakespeare model)",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: --model)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through the model's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")

    s = p.add_argument_group("sampling")
    s.add_argument(
        "--max-tokens", type=int, metavar="N", default=64, help="tokens per completion (64)"
    )
    s.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=0.8,
        help="0 is greedy decoding (default 0.8)",
    )
    s.add_argument(
        "--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling (1.0: off)"
    )
    s.add_argument(
        "--top-k", type=int, metavar="K", default=0, help="sample among the k likeliest (0: off)"
    )
    s.add_argument("--min-p", type=float, metavar="P", default=0.0, help="min-p filter (0.0: off)")
    s.add_argument("--repetition-penalty", type=float, metavar="X", default=1.0, help="(1.0: off)")
    s.add_argument("--seed", type=int, metavar="N", default=0, help="random seed (default 0)")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (may be repeated)")
    s.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")

    e = p.add_argument_group("engine")
    e.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and KV dtype (auto: the checkpoint's)",
    )
    e.add_argument(
        "--max-model-len",
        type=int,
        metavar="N",
        help="longest prompt + completion (default: min(model limit, 4096))",
    )
    e.add_argument(
        "--max-num-seqs",
        type=int,
        metavar="N",
        help="sequences per step (default: 8, at most --max-num-batched-tokens)",
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        default=64,
        help="token budget per step (64)",
    )
    e.add_argument("--page-size", type=int, metavar="N", default=16, help="tokens per KV page (16)")
    e.add_argument(
        "--num-pages", type=int, metavar="N", help="KV pages (default: from --kv-cache-gib)"
    )
    e.add_argument(
        "--kv-cache-gib",
        type=float,
        metavar="GIB",
        default=2.0,
        help="KV cache budget in GiB (default 2)",
    )
    e.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix caching")
    return p


def check_model_folder(path: str) -> None:
    """Fails fast (before JAX loads) on a folder that cannot be a checkpoint."""
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"model folder {path!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"--model must be a checkpoint folder, {path!r} is a file")
    if not (folder / "config.json").is_file():
        raise UsageError(f"no config.json in model folder {path!r}")


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` keyword arguments from the command line."""
    if args.kv_cache_gib <= 0:
        raise UsageError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
    return {
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": (
            args.max_num_seqs
            if args.max_num_seqs is not None
            else min(DEFAULT_MAX_NUM_SEQS, max(1, args.max_num_batched_tokens))
        ),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "page_size": args.page_size,
        "num_pages": args.num_pages,
        "kv_cache_bytes": int(args.kv_cache_gib * (1 << 30)),
        "enable_prefix_caching": not args.no_prefix_caching,
        "seed": args.seed,
    }


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> None:
    check_model_folder(args.model)
    params = sampling_params(args)
    config = engine_args(args)
    try:
        EngineConfig(model=args.model, **config)  # NOTE: settings checked before JAX loads
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from inferflux.llm import LLM  # NOTE: imported late so --help and usage errors skip JAX

    print(f"loading {args.model} and compiling the step ...", file=sys.stderr, flush=True)
    try:
        llm = LLM(args.model, **config)
    except (OSError, ValueError) as exc:  # missing files, bad config.json, bad settings
        raise UsageError(str(exc)) from None
    print(f"ready (warm-up {llm.engine.warm_up_seconds:.1f} s)", file=sys.stderr, flush=True)

    start = time.perf_counter()
    try:
        if args.chat:
            head = [{"role": "system", "content": args.system}] if args.system else []
            chats = [[*head, {"role": "user", "content": p}] for p in args.prompts]
            outputs = llm.chat(chats, params, use_tqdm=False)
        else:
            outputs = llm.generate(list(args.prompts), params, use_tqdm=False)
    except ValueError as exc:  # NOTE: everything is validated before the first step runs
        raise UsageError(str(exc)) from None
    elapsed = time.perf_counter() - start

    num_tokens = 0
    for i, (prompt, out) in enumerate(zip(args.prompts, outputs, strict=True), start=1):
        completion = out.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"=== [{i}/{len(outputs)}] {prompt!r}", file=sys.stderr, flush=True)
        print(completion.text, flush=True)
    rate = num_tokens / elapsed if elapsed > 0 else 0.0
    print(
        f"generated {num_tokens} tokens for {len(outputs)} prompt(s) in {elapsed:.2f} s: "
        f"{rate:.1f} tokens/s",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
