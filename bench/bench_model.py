"""
bench/bench_model.py: model.py against Hugging Face transformers on this machine, float32.

    python bench/bench_model.py             # everything, a few minutes on 2 CPU cores
    python bench/bench_model.py --quick     # fewer steps
    python bench/bench_model.py --threads 1 --cpu-time   # steady on a machine shared with others

1. training step (forward + backward + AdamW step) tokens/s of the same config and weights, ours
   vs `Qwen2ForCausalLM` (sdpa attention, its own shifted-label loss): the tiny CPU default, a ~10M
   model, and the tiny model with a 32k vocabulary
2. generation tokens/s, batch 64 left-padded prompts, 64 new tokens, greedy: ours vs
   `model.generate`
3. peak memory of forward + backward at vocab 32k, sequence 2048: the chunked loss vs full logits
   and F.cross_entropy, each in a fresh process (peak RSS over the RSS after set-up)
4. GRPO's log-prob pass (forward + backward of completion_logprobs, 16 prompts x 8 replies, prompts
   of 24-39 tokens, replies of 4-16 padded to 16): each prompt once for its group (group_size=8)
   vs once per reply, the way TRL's GRPOTrainer joins every prompt to every completion
Speed pairs run interleaved, twice, and keep the best of each: the machine may be shared.
"""
import argparse
import os
import resource
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import completion_logprobs, generate, left_pad, right_pad  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CONFIGS = {  # name: (config, benchmark generation too)
    "tiny (default)": (ModelConfig(vocab_size=1024), True),
    "~10M": (ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256), True),
    "tiny, vocab 32k": (ModelConfig(vocab_size=32000), False),  # where the lm head + loss dominate
}


def hf_model(ours):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = ours.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers,
                         num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads,
                         max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         attn_implementation="sdpa", pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(ours.state_dict())
    return model


CLOCK = time.perf_counter  # --cpu-time: time.process_time, with --threads 1 robust to other load


def train_tokens_per_second(model, step_fn, batch, seq, steps, vocab):
    # the same optimizer for both
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            t0 = CLOCK()
        loss = step_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * seq * steps / (CLOCK() - t0)


def ours_step(model, ids):
    return model(ids[:, :-1], ids[:, 1:])[1]


def hf_step(model, ids):
    # HF shifts the labels itself (so it scores 255 targets per row to our 256: under 0.5 % less
    # work); use_cache=False: its config says True, which would build a KV cache in every step
    return model(ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss


def bench_train(steps):
    print("1. training step, batch 16 x seq 256, float32, torch threads:",
          torch.get_num_threads())
    for name, (config, _) in CONFIGS.items():
        torch.manual_seed(0)
        ours = Transformer(config).train()
        hf = hf_model(ours).train()
        results = {}
        # interleaved, best of 2
        for label, model, fn in (("ours", ours, ours_step), ("transformers", hf, hf_step),
                                 ("ours", ours, ours_step), ("transformers", hf, hf_step)):
            tps = train_tokens_per_second(model, fn, 16, 256, steps, config.vocab_size)
            results[label] = max(results.get(label, 0), tps)
        print(f"   {name:15s} {ours.num_params(False) / 1e6:5.2f}M params | "
              f"ours {results['ours']:8.0f} tok/s | "
              f"transformers {results['transformers']:8.0f} tok/s | "
              f"ratio {results['ours'] / results['transformers']:.2f}x")


def bench_generate(repeats):
    print("2. generation, batch 64, prompts of 8-24 tokens, 64 new tokens, greedy")
    for name, (config, with_generation) in CONFIGS.items():
        if not with_generation:
            continue
        torch.manual_seed(0)
        ours = Transformer(config).eval()
        hf = hf_model(ours).eval()
        prompts = [torch.randint(1, config.vocab_size, (8 + i % 17,)).tolist() for i in range(64)]
        ids, mask = left_pad(prompts, pad_id=0)
        timings = {"ours": [], "transformers": []}
        run = {"ours": lambda: generate(ours, prompts, 64, temperature=0)[0],
               "transformers": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=64,
                                                   min_new_tokens=64, do_sample=False,
                                                   pad_token_id=0, eos_token_id=None)}
        with torch.no_grad():
            completions, out = run["ours"](), run["transformers"]()  # warm-up, untimed
            for r in range(repeats):  # interleaved, each side first in turn
                for side in (["ours", "transformers"] if r % 2 == 0 else ["transformers", "ours"]):
                    t0 = CLOCK()
                    run[side]()
                    timings[side].append(CLOCK() - t0)
        same = (out[:, ids.shape[1]:] == completions).float().mean().item()
        ours_tps, hf_tps = 64 * 64 / min(timings["ours"]), 64 * 64 / min(timings["transformers"])
        print(f"   {name:15s} ours {ours_tps:8.0f} tok/s | transformers {hf_tps:8.0f} tok/s | "
              f"ratio {ours_tps / hf_tps:.2f}x | same tokens {same:.1%}")


def rss_mb():
    """Resident set size now (Linux /proc), in MB."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_memory_child(variant):
    """Run in a fresh process: peak RSS growth (MB) of one forward + backward. A thread samples the
    RSS every 0.2 ms, since ru_maxrss alone can miss the peak on some kernels."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32000, max_position_embeddings=2048)).train()
    ids = torch.randint(0, 32000, (1, 2049))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    base, base_maxrss = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    if variant == "chunked":
        _, loss = model(inputs, targets)
    else:
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    done.set()
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(max(peak[0] - base, maxrss - max(base, base_maxrss)))


def bench_grpo_logprobs(repeats):
    print("4. GRPO log-prob pass, forward + backward, 16 prompts x 8 replies (tiny model)")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=1024)).train()
    prompts = [torch.randint(1, 1024, (24 + i,)).tolist() for i in range(16)]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(8)], pad_id=0)
    replies = [torch.randint(1, 1024, (4 + i % 13,)).tolist() for i in range(128)]
    reply_ids, reply_mask = right_pad(replies, pad_id=0)
    timings = {1: [], 8: []}
    for r in range(repeats + 1):  # the first round warms up; interleaved, each side first in turn
        for group_size in ([1, 8] if r % 2 == 0 else [8, 1]):
            t0 = CLOCK()
            completion_logprobs(model, prompt_ids, prompt_mask, reply_ids, reply_mask,
                                group_size=group_size).sum().backward()
            if r:
                timings[group_size].append(CLOCK() - t0)
            model.zero_grad(set_to_none=True)
    shared, joined = min(timings[8]), min(timings[1])
    print(f"   shared prompt {shared * 1e3:6.1f} ms | "
          f"prompt per reply (as TRL) {joined * 1e3:6.1f} ms | ratio {joined / shared:.2f}x faster")


def bench_memory():
    print("3. peak memory of forward + backward, vocab 32000, sequence 2048 "
          "(tiny default model otherwise)")
    peaks = {}
    for variant in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant],
                             capture_output=True, text=True, check=True)
        peaks[variant] = float(out.stdout.strip().splitlines()[-1])
    print(f"   chunked loss {peaks['chunked']:7.1f} MB | full logits {peaks['naive']:7.1f} MB | "
          f"ratio {peaks['chunked'] / peaks['naive']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--only", choices=("train", "generate", "memory", "grpo"),
                        help="run one benchmark")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's "
                        "default); 1 is steadier on a shared machine")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock "
                        "(with --threads 1: the compute each side did, unaffected by other "
                        "processes)")
    parser.add_argument("--memory-child", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        sys.exit()
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:  # CPU time sums every thread, busy-waiting OpenMP threads included
            parser.error("--cpu-time needs --threads 1")
        CLOCK = time.process_time
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{'CPU' if args.cpu_time else 'wall'} clock")
    if args.only in (None, "train"):
        bench_train(steps=2 if args.quick else 4)
    if args.only in (None, "generate"):
        bench_generate(repeats=1 if args.quick else 2)
    if args.only in (None, "grpo"):
        bench_grpo_logprobs(repeats=2 if args.quick else 6)
    if args.only in (None, "memory"):
        bench_memory()
