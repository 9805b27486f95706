"""
bench/bench_lora.py: full fine-tuning against LoRA r=8 on this machine, float32, one SFT training
step (forward, backward, gradient clipping, AdamW) of a 100M-parameter Qwen2-style model.

    python bench/bench_lora.py              # ~2 minutes on 2 CPU cores
    python bench/bench_lora.py --quick      # one round, 2 steps each
    python bench/bench_lora.py --rank 16 \
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

Printed for each: trainable parameters, AdamW state (bytes of its moment tensors, counted exactly),
peak RSS of the process over the training steps and that peak above the RSS after set-up (the model
built, before the first step: what training adds to holding the weights), and the best step time of
the rounds. Each measurement runs in a fresh process (peak RSS only grows), and the rounds alternate
full and LoRA, so a machine whose speed drifts slows both. The last lines are the LoRA / full ratios
of the same run, and what DPO / GRPO / PPO save by taking the reference as the policy with its
adapter off: a second copy of the weights.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import add_lora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CONFIG = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     max_position_embeddings=256)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(mode, rank, alpha, targets, batch, steps):
    """One process: build the model, maybe add LoRA, run `steps` training steps: a dict of
    numbers."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    if mode == "lora":
        add_lora(model, rank, alpha, 0.0, targets)
    model.train()
    optimizer = model.configure_optimizer(lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.max_position_embeddings + 1))
    setup = rss_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer_bytes": state, "peak_rss": peak, "setup_rss": setup,
            "step_s": min(times[1:] or times)}  # step 1 allocates AdamW's state, warms the kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rank, args.alpha, args.targets, args.batch,
                                 args.steps)))
        return
    if args.quick:
        args.steps, args.rounds = 2, 1
    results = {}
    for _ in range(args.rounds):
        for mode in ("full", "lora"):
            command = [sys.executable, __file__, "--child", mode, "--rank", str(args.rank),
                       "--alpha", str(args.alpha), "--targets", args.targets,
                       "--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            best = results.setdefault(mode, r)
            best["step_s"] = min(best["step_s"], r["step_s"])
            best["peak_rss"] = max(best["peak_rss"], r["peak_rss"])
            best["setup_rss"] = min(best["setup_rss"], r["setup_rss"])
    full, lora = results["full"], results["lora"]
    mb = lambda n: f"{n / 2**20:,.0f} MB"  # noqa: E731
    print(f"model: {full['total'] / 1e6:.0f}M parameters ({CONFIG.num_hidden_layers} layers of "
          f"{CONFIG.hidden_size}, vocab {CONFIG.vocab_size}), batch {args.batch} x "
          f"{CONFIG.max_position_embeddings} tokens, float32, {torch.get_num_threads()} threads; "
          f"LoRA r={args.rank} on {args.targets}")
    print(f"{'':>6} | {'trainable':>12} | {'AdamW state':>11} | {'peak RSS':>9} | "
          f"{'above set-up':>12} | {'step':>7}")
    for name, r in (("full", full), ("lora", lora)):
        print(f"{name:>6} | {r['trainable']:>12,} | {mb(r['optimizer_bytes']):>11} | "
              f"{mb(r['peak_rss']):>9} | {mb(r['peak_rss'] - r['setup_rss']):>12} | "
              f"{r['step_s']:>6.2f}s")
    above = (lora['peak_rss'] - lora['setup_rss']) / (full['peak_rss'] - full['setup_rss'])
    print(f"lora / full: trainable {lora['trainable'] / full['trainable']:.4f}, AdamW state "
          f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.4f}, peak RSS "
          f"{lora['peak_rss'] / full['peak_rss']:.2f}, above set-up {above:.2f}, "
          f"step time {lora['step_s'] / full['step_s']:.2f}")
    print(f"a frozen reference copy (DPO, GRPO, PPO without LoRA) holds another "
          f"{mb(full['weights_bytes'])} of weights; with --lora-rank the reference is the policy "
          f"with its adapter off: 0 MB")


if __name__ == "__main__":
    main()
