"""
bench/long_context.py: how far past its training context a small model still reads. The retrieval
task (data.py --retrieval, detail 9) at 1, 2, 4, 8 and 16 times the phase-1 context, for plain RoPE,
YaRN, ABF phase 2 (pretrain.py detail 8), Dual Chunk Attention (model.py detail 11) training-free on
the phase-1 model and on the phase-2 model: the README's long-context table.

    python bench/long_context.py                   # seeds 0 and 1
    python bench/long_context.py --seeds 0 --eval 20 --steps 100 --phase2-steps 20   # a quick check

Writes docs/long_context.json (every accuracy, the settings) and prints the table.

1. Per seed, as a user runs them, one thread each: `data.py --retrieval L`, `tokenizer.py` on
   retrieval.txt, `pretrain.py` on it at context L with --layers blocks (phase 1), then
   `pretrain.py --init` on retrieval_long.txt at 4L with the RoPE base raised to --rope-theta
   (phase 2, as Qwen2.5).
2. A method is a checkpoint and changes to its config, nothing trained: YaRN with factor k at k x L
   (HF's rope_scaling); DCA with chunk_size 3/4 and local_size 1/8 of the trained context
   (ChunkLlama's defaults, An et al. 2024). max_position_embeddings only lifts generate's limit.
3. Accuracy: the greedy continuation of <|endoftext|> + the prompt is right when its first number is
   the answer; the held-out questions of retrieval_eval.jsonl, the same at every seed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import RETRIEVAL_LENGTHS  # noqa: E402
from engine import generate  # noqa: E402
from model import load_checkpoint  # noqa: E402


def dca(context):
    """ChunkLlama's defaults for a model trained at `context` (detail 2)."""
    return {"dual_chunk_attention_config": {"chunk_size": 3 * context // 4,
                                            "local_size": context // 8}}


def yarn(factor, context):
    return ({"rope_scaling": {"type": "yarn", "factor": float(factor),
                              "original_max_position_embeddings": context}} if factor > 1 else {})


# name: (phase, config changes at k x the phase-1 context L) (detail 2)
METHODS = {
    "RoPE": (1, lambda k, L: {}),
    "YaRN": (1, lambda k, L: yarn(k, L)),
    "ABF phase 2": (2, lambda k, L: {}),
    "DCA (training-free)": (1, lambda k, L: dca(L)),
    "DCA + YaRN": (1, lambda k, L: {**dca(L), **yarn(k, L)}),
    "phase 2 + DCA": (2, lambda k, L: dca(4 * L)),
}


def run(log, *command):
    """A repository script as a user runs it (one thread), its output appended to `log`."""
    with open(log, "a") as f:
        f.write(f"$ python {' '.join(command)}\n")
        f.flush()
        subprocess.run([sys.executable, *command], cwd=ROOT, check=True, stdout=f,
                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train(args, seed, work):
    """detail 1: the data, the tokenizer, phase 1 and phase 2 of one seed."""
    data, log, L = f"{work}/data", f"{work}/log.txt", args.context
    tokenizer, phase1, phase2 = f"{work}/tokenizer.json", f"{work}/phase1.pt", f"{work}/phase2.pt"
    run(log, "data.py", "--out", data, "--seed", str(seed), "--retrieval", str(L),
        "--retrieval-eval", str(args.eval), "--scale", str(args.scale))
    run(log, "tokenizer.py", "--data", f"{data}/retrieval.txt", "--vocab-size", "1024", "--out",
        tokenizer)
    common = ["--tokenizer", tokenizer, "--seed", str(seed), "--eval-every", "100000",
              "--save-every", "100000", "--device", "cpu", "--log-every", "100"]
    run(log, "pretrain.py", *common, "--data", f"{data}/retrieval.txt", "--context", str(L),
        "--num-layers", str(args.layers), "--steps", str(args.steps), "--batch-size", "16",
        "--out", phase1)
    run(log, "pretrain.py", *common, "--data", f"{data}/retrieval_long.txt", "--init", phase1,
        "--context", str(4 * L), "--rope-theta", str(args.rope_theta), "--steps",
        str(args.phase2_steps), "--batch-size", "4", "--warmup", "20", "--out", phase2)
    return f"{data}/retrieval_eval.jsonl", {1: phase1, 2: phase2}


@torch.no_grad()
def accuracy(model, tokenizer, records, batch_tokens=16384):
    """detail 3: the share of records whose greedy continuation starts with the answer."""
    prompts = [[tokenizer.eot_id, *tokenizer.encode(r["prompt"])] for r in records]
    batch = max(1, batch_tokens // max(map(len, prompts)))
    right = 0
    for i in range(0, len(prompts), batch):
        completions, _, _ = generate(model, prompts[i:i + batch], 4, temperature=0,
                                     pad_id=tokenizer.pad_id)
        for record, ids in zip(records[i:i + batch], completions.tolist()):
            number = re.match(r"\s*(\d+)", tokenizer.decode(ids))
            right += bool(number) and number[1] == record["answer"]
    return right / len(records), sum(map(len, prompts)) / len(prompts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--context", type=int, default=128, help="phase-1 context (tokens)")
    parser.add_argument("--layers", type=int, default=6,
                        help="blocks of the phase-1 model (the tiny preset's width)")
    parser.add_argument("--steps", type=int, default=1500, help="phase-1 steps (batch 16)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="data.py --scale: retrieval.txt is 1.5M pieces at 1")
    parser.add_argument("--phase2-steps", type=int, default=600, help="phase-2 steps (batch 4)")
    parser.add_argument("--rope-theta", type=float, default=1e6, help="phase 2's RoPE base")
    parser.add_argument("--eval", type=int, default=50, help="questions per length")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--work", default="/tmp/long_context", help="runs and their logs")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "long_context.json"))
    parser.add_argument("--skip-training", action="store_true", help="reuse --work's checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: {} for name in args.methods}
    for seed in args.seeds:
        work, start = os.path.join(args.work, f"seed{seed}"), time.time()
        os.makedirs(work, exist_ok=True)
        if args.skip_training:
            eval_path = f"{work}/data/retrieval_eval.jsonl"
            paths = {1: f"{work}/phase1.pt", 2: f"{work}/phase2.pt"}
        else:
            eval_path, paths = train(args, seed, work)
        print(f"seed {seed}: trained in {time.time() - start:.0f}s")
        records = [json.loads(line) for line in open(eval_path)]
        for name in args.methods:
            phase, changes = METHODS[name]
            for k in RETRIEVAL_LENGTHS:
                model, tokenizer, _ = load_checkpoint(  # detail 2: nothing trained
                    paths[phase], max_position_embeddings=k * args.context + 64,
                    **changes(k, args.context))
                acc, tokens = accuracy(model.eval(), tokenizer,
                                       [r for r in records if r["length"] == k])
                results[name].setdefault(k, []).append(acc)
                print(f"seed {seed} | {name:<20} | {k:>2}x ({tokens:.0f} tokens) | {acc:.1%}",
                      flush=True)
    print(f"\n| method | {' | '.join(f'{k}x' for k in RETRIEVAL_LENGTHS)} |")
    print("|---|" + "---:|" * len(RETRIEVAL_LENGTHS))
    for name, by_length in results.items():
        cells = [" / ".join(f"{a:.0%}" for a in by_length[k]) for k in RETRIEVAL_LENGTHS]
        print(f"| {name} | {' | '.join(cells)} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "accuracy": results}, f, indent=1)


if __name__ == "__main__":
    main()
