"""
bench/grad_checkpoint.py: peak memory and time of a training step against the sequence length,
with and without activation checkpointing (model.py detail 12, `--grad-checkpoint` in every stage),
on CPU, for the 30m preset; and the longest sequence that trains within a memory budget, as a ratio.

    python bench/grad_checkpoint.py                          # 512 ... 8192 tokens, both ways
    python bench/grad_checkpoint.py --lengths 256 512        # a quick check

Writes docs/grad_checkpoint.json and prints the table.

1. Each point is a fresh process, so its peak resident memory (ru_maxrss) is its own: the 30m
   preset's shape (pretrain.py PRESETS) with a 16k vocabulary, AdamW, batch 1, random tokens. A
   step on 16 tokens first allocates the optimizer state; the step at the length is the one timed.
2. The peak grows linearly with the length (SDPA's causal kernel holds no T x T matrix, the loss is
   chunked): peak = a + b T per mode, least squares; the longest length within --budget is
   (budget - a) / b, checked by a run at it where one is affordable (--check-below tokens).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import ModelConfig, Transformer  # noqa: E402
from pretrain import PRESETS  # noqa: E402


def one_step(length, checkpointed, vocab_size=16384):
    """detail 1: a fresh process's peak memory (MB) and step time (s) at `length` tokens."""
    torch.manual_seed(0)
    hidden, layers, heads, kv_heads, intermediate, _ = PRESETS["30m"]
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=hidden,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, intermediate_size=intermediate,
                                    max_position_embeddings=length))
    model.grad_checkpoint = checkpointed
    optimizer = model.configure_optimizer(3e-4, 0.1)
    seconds = 0.0
    for tokens in (16, length):  # the first step allocates AdamW's moments
        ids = torch.randint(0, vocab_size, (1, tokens + 1))
        start = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds


def measure(length, checkpointed):
    """one_step in a process of its own."""
    out = subprocess.run([sys.executable, __file__, "--one", str(length), str(int(checkpointed))],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                             "1")})
    return json.loads(out.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--budget", type=float, default=4096, help="memory budget (MB)")
    parser.add_argument("--check-below", type=int, default=16384,
                        help="run the fitted longest length when it is under this many tokens")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "grad_checkpoint.json"))
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        peak, seconds = one_step(args.one[0], bool(args.one[1]))
        print(json.dumps({"peak_mb": peak, "step_s": seconds}))
        return
    rows, longest = [], {}
    for checkpointed in (False, True):
        for length in args.lengths:
            rows.append({"length": length, "checkpointed": checkpointed,
                         **measure(length, checkpointed)})
            print(json.dumps(rows[-1]), flush=True)
        points = [(r["length"], r["peak_mb"]) for r in rows if r["checkpointed"] == checkpointed]
        per_token, base = np.polyfit(*zip(*points), 1)  # detail 2: peak = base + per_token * T
        fit = int((args.budget - base) / per_token)
        check = measure(fit, checkpointed) if fit < args.check_below else None
        longest[checkpointed] = {"base_mb": base, "mb_per_token": per_token, "longest": fit,
                                 "check": check}
        print(json.dumps(longest[checkpointed]), flush=True)
    print("\n| tokens | peak MB | step s | peak MB, checkpointed | step s, checkpointed |")
    print("|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        plain, ckpt = (next(r for r in rows if r["length"] == length and r["checkpointed"] == c)
                       for c in (False, True))
        print(f"| {length} | {plain['peak_mb']:.0f} | {plain['step_s']:.2f} | "
              f"{ckpt['peak_mb']:.0f} | {ckpt['step_s']:.2f} |")
    ratio = longest[True]["longest"] / longest[False]["longest"]
    print(f"\nlongest within {args.budget:.0f} MB: {longest[False]['longest']} tokens without, "
          f"{longest[True]['longest']} with checkpointing: {ratio:.1f}x")
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "longest": longest, "ratio": ratio}, f,
                  indent=1)


if __name__ == "__main__":
    main()
