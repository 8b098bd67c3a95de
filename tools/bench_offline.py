"""Offline throughput: InferFlux `LLM.generate` against transformers `generate`, in one run.

The same random-weight Llama-shaped checkpoint and the same prompts (32 random prompt tokens,
128 new tokens, EOS ignored, greedy) go through both; output tokens/s at each batch size, the
ratio, and the achieved weight bandwidth against the machine's measured memory bandwidth.

    python tools/bench_offline.py                      # the ~60M model (hidden 512, 8 layers)
    python tools/bench_offline.py --shape tiny --batches 1 16
    python tools/bench_offline.py --skip-transformers  # InferFlux only

Compile time (warm-up) is reported separately and excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.tiny_checkpoint import TinyLlamaShape, num_parameters, write_tiny_checkpoint  # noqa: E402

SHAPES = {
    "60m": TinyLlamaShape(
        hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1408, vocab=32000, max_position=2048
    ),
    "tiny": TinyLlamaShape(),
}


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a jitted sum and a jitted matrix-vector product over
    `size_mb` of float32 (the second is what a batch-1 decode step does to its weights)."""
    import jax
    import jax.numpy as jnp

    side = int((size_mb * (1 << 20) // 4) ** 0.5)
    matrix = jnp.ones((side, side), jnp.float32)
    vector = jnp.ones((side,), jnp.float32)
    programs = [(jax.jit(jnp.sum), (matrix,)), (jax.jit(jnp.matmul), (matrix, vector))]
    best = float("inf")
    for fn, args in programs:
        fn(*args).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return matrix.nbytes / best / 1e9


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab, size=prompt_len).tolist() for _ in range(batch)]


def bench_inferflux(folder: Path, batches: list[int], args: argparse.Namespace) -> dict:
    from inferflux import LLM, SamplingParams

    max_seqs = max(batches)
    start = time.perf_counter()
    llm = LLM(
        str(folder),
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max(args.token_budget, max_seqs),
        enable_prefix_caching=False,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    results = {"startup_s": round(startup, 1), "warm_up_s": round(llm.engine.warm_up_seconds, 1)}
    for batch in batches:
        prompts = make_prompts(batch, args.prompt_len, llm.engine.vocab_size)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # settle
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert tokens == batch * args.new_tokens
        results[batch] = tokens / elapsed
    return results


def bench_transformers(folder: Path, batches: list[int], args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    results = {}
    for batch in batches:
        prompts = make_prompts(batch, args.prompt_len, model.config.vocab_size)
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        with torch.no_grad():
            model.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            elapsed = time.perf_counter() - start
        results[batch] = (out.shape[1] - ids.shape[1]) * batch / elapsed
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="60m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--model", type=Path, help="an existing checkpoint instead of a random one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_tiny_checkpoint(Path(tmp) / "model", shape, dtype="float32")
        params = num_parameters(shape) if args.model is None else None
        import jax

        print(
            f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, cpus: {os.cpu_count()}"
        )
        bandwidth = memory_bandwidth_gbs()
        print(
            f"memory read bandwidth (best of jitted sum / matvec over 1 GiB): {bandwidth:.1f} GB/s"
        )
        ours = bench_inferflux(Path(folder), args.batches, args)
        print(f"inferflux startup {ours['startup_s']}s (compile {ours['warm_up_s']}s)")
        theirs = (
            {} if args.skip_transformers else bench_transformers(Path(folder), args.batches, args)
        )

    itemsize = 4 if args.dtype == "float32" else 2
    # A decode step reads every weight once, except the embedding table (one row per token).
    weight_bytes = (params - shape.vocab * shape.hidden) * itemsize if params else None
    rows = []
    header = f"{'batch':>5} {'inferflux tok/s':>16} {'transformers tok/s':>19} {'ratio':>6} {'weight GB/s':>12} {'of roofline':>12}"
    print(header)
    for batch in args.batches:
        ours_tps = ours[batch]
        theirs_tps = theirs.get(batch)
        ratio = ours_tps / theirs_tps if theirs_tps else None
        # Each decode step reads every weight once for the whole batch.
        gbs = ours_tps / batch * weight_bytes / 1e9 if weight_bytes else None
        row = {
            "batch": batch,
            "inferflux_tok_s": round(ours_tps, 1),
            "transformers_tok_s": round(theirs_tps, 1) if theirs_tps else None,
            "ratio": round(ratio, 2) if ratio else None,
            "weight_gb_s": round(gbs, 2) if gbs else None,
            "roofline_fraction": round(gbs / bandwidth, 2) if gbs else None,
        }
        rows.append(row)
        print(
            f"{batch:>5} {ours_tps:>16.1f} {theirs_tps or float('nan'):>19.1f} "
            f"{ratio or float('nan'):>6.2f} {gbs or float('nan'):>12.2f} "
            f"{(gbs or float('nan')) / bandwidth:>12.2f}"
        )
    if args.json:
        summary = {
            "shape": args.shape,
            "parameters": params,
            "dtype": args.dtype,
            "bandwidth_gb_s": round(bandwidth, 1),
            "startup_s": ours["startup_s"],
            "warm_up_s": ours["warm_up_s"],
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
