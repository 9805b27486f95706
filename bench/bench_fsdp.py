"""
bench/bench_fsdp.py: DDP against FSDP2 (the stages' --fsdp, fsdp.py) on this machine: 2 ranks on the
CPU (gloo), pretrain.py's 30m preset, float32, a few training steps (forward, backward, gradient
clipping, AdamW, or with --optimizer muon pretrain.py's default: Muon on the blocks' matrices) on
random tokens; with --modes, LoRA r=8 on q/k/v/o under DDP and under FSDP too.

    python bench/bench_fsdp.py                  # ~2 minutes on 2 CPU cores
    python bench/bench_fsdp.py --steps 3 --context 256
    python bench/bench_fsdp.py --modes ddp,fsdp,lora,lora+fsdp
    python bench/bench_fsdp.py --optimizer muon

Printed per rank for each: the bytes of weights + gradients + optimizer state it holds (counted
from its tensors: with FSDP its shards; gradients of the trained weights only), its RSS after set-up
(model and optimizer built, before the first step), its peak RSS over the steps, its RSS after
them (weights, gradients freed, optimizer state, what the allocator kept), the median step time;
then each mode's ratios to DDP's. Each runs in fresh processes (peak RSS only grows).
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fsdp import shard  # noqa: E402
from lora import add_lora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from pretrain import PRESETS  # noqa: E402


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard


def worker(args):
    """One rank: build, wrap (DDP or shard), train --steps steps, report to rank 0."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, layers, heads, kv_heads, intermediate, context = PRESETS[args.preset]
    config = ModelConfig(vocab_size=args.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate,
                         max_position_embeddings=args.context or context)
    torch.manual_seed(0)
    raw = Transformer(config)
    if args.mode.startswith("lora"):
        add_lora(raw, 8)
    muon_lr = 0.02 if args.optimizer == "muon" else 0.0  # pretrain.py's --muon-lr
    optimizer = raw.configure_optimizer(3e-4, 0.1, muon_lr=muon_lr)  # before sharding, as stages
    model = shard(raw, optimizer) if args.mode.endswith("fsdp") else DDP(raw)
    setup_rss = rss_bytes()
    generator = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        shape = (args.batch_size, config.max_position_embeddings + 1)
        tokens = torch.randint(0, config.vocab_size, shape, generator=generator)
        start = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    def size(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors)
    moments = size(v for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)
    # a gradient per trained weight (freed by zero_grad by now)
    state = size(raw.parameters()) + size(p for p in raw.parameters() if p.requires_grad) + moments
    report = {"rank": rank, "state": state, "setup_rss": setup_rss, "end_rss": rss_bytes(),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_s": statistics.median(times[1:] or times)}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        print("REPORT " + json.dumps({"mode": args.mode, "params": raw.num_params(False),
                                      "ranks": reports}))
    del model, raw, optimizer  # DDP sits in a reference cycle: a gc pass frees it (and the group)
    gc.collect()  # before the group is destroyed, else a gloo rank can abort at exit
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="30m", choices=list(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--context", type=int, default=0, help="0 = the preset's")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--modes", default="ddp,fsdp", help="of ddp, fsdp, lora, lora+fsdp")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--mode", choices=["ddp", "fsdp", "lora", "lora+fsdp"],
                        help=argparse.SUPPRESS)  # a worker
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    # glibc's malloc raises its mmap threshold as large blocks are freed, then keeps later ones in
    # the heap after they are freed: RSS would count FSDP's freed all-gather buffers. A fixed
    # threshold hands them back, so RSS measures what is held
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    modes = args.modes.split(",")
    if modes[0] != "ddp" or not set(modes) <= {"ddp", "fsdp", "lora", "lora+fsdp"}:
        sys.exit(f"--modes {args.modes}: ddp first (the baseline), then fsdp, lora, lora+fsdp")
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(args.nproc), os.path.abspath(__file__),
                              *sys.argv[1:], "--mode", mode], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        line = next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))
        results[mode] = json.loads(line[len("REPORT "):])
    mb = 2 ** 20
    params = results["ddp"]["params"]
    print(f"{args.preset} preset: {params / 1e6:.1f}M params, {args.nproc} ranks on CPU (gloo), "
          f"float32, {args.optimizer}, {args.batch_size} sequence(s) per rank, {args.steps} steps, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
          f"MALLOC_MMAP_THRESHOLD_={env['MALLOC_MMAP_THRESHOLD_']}")
    print("mode       rank  weights+grads+optim  RSS after set-up  peak RSS  RSS at the end  "
          "step time")
    for mode, result in results.items():
        for r in result["ranks"]:
            print(f"{mode:10s} {r['rank']:4d}  {r['state'] / mb:16.0f} MB  "
                  f"{r['setup_rss'] / mb:13.0f} MB  {r['peak_rss'] / mb:5.0f} MB  "
                  f"{r['end_rss'] / mb:11.0f} MB  {r['step_s']:8.2f} s")
    ddp = results["ddp"]["ranks"]
    for mode in modes[1:]:
        other = results[mode]["ranks"]
        ratios = [f"{name} {max(r[key] for r in other) / max(r[key] for r in ddp):.2f}"
                  for key, name in (("state", "weights+grads+optim"), ("peak_rss", "peak RSS"),
                                    ("end_rss", "RSS at the end"), ("step_s", "step time"))]
        saved = max(r["peak_rss"] for r in ddp) - max(r["peak_rss"] for r in other)
        print(f"{mode} / ddp (worst rank): {', '.join(ratios)}; peak RSS saved per rank "
              f"{saved / mb:.0f} MB")
    state = results["ddp"]["ranks"][0]["state"]  # 16 bytes per parameter with AdamW
    print(f"(expected from FSDP over {args.nproc} ranks: (N - 1) / N of DDP's state fewer, "
          f"{state * (args.nproc - 1) / args.nproc / mb:.0f} MB)")


if __name__ == "__main__":
    main()
