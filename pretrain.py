"""
pretrain.py: next-token pretraining of a small Qwen2-style Transformer on packed text.

    tokenizer + data/pretrain.txt  ->  out/pretrain.pt

Run (after `python data.py` and `python tokenizer.py`):

    python pretrain.py                                    # the CPU defaults
    python pretrain.py --preset 30m --device cuda --compile          # one GPU
    torchrun --nproc_per_node 8 pretrain.py --preset 125m            # many GPUs, no code change
    torchrun --nproc_per_node 8 pretrain.py --preset 125m --fsdp     # each GPU holds 1/8 (fsdp.py)
    python pretrain.py --resume                           # continue after a crash / kill -9
    python pretrain.py --init out/pretrain.pt --context 512 --rope-theta 1e6 --out out/long.pt

Implementation details:
1. The corpus is tokenized once and cached as a numpy memmap next to the data
   (`data/pretrain.txt.<hash>.bin`); the hash covers the tokenizer and the data bytes.
2. Documents (tokenizer.read_documents) are joined with <|endoftext|>; <|im_start|>, <|im_end|>,
   <think> and </think> in the text are special tokens (conversations in the chat template).
   Training reads random windows of `context + 1` tokens from the stream (packed: no padding).
   The last `val_fraction` of the stream is held out.
3. The windows of step s come from a generator seeded with (seed, s): the data position is the
   step, so `--resume` replays exactly the batches an uninterrupted run would have seen.
4. DDP: every rank draws the same global batch and takes its rows (rank::world), so N processes
   see the data of one process with the same global batch. Only rank 0 prints and saves.
5. AdamW with weight decay on matrices only, or `--optimizer muon`: Muon on the blocks' matrices
   (model.py detail 10), AdamW on the rest. Linear warmup then cosine decay to 10 % of each peak
   lr (nanoGPT), gradient accumulation, clipping at 1.0. bf16 autocast on CUDA; `--compile`.
6. Bits per byte = loss / ln 2 * tokens / bytes of the validation text (<|endoftext|> is 0 bytes):
   it does not depend on the tokenizer. Next to it, the unigram entropy H = -sum_t p_t log p_t.
7. Checkpoints every `--save-every` steps carry the optimizer and RNG state (resumable); the final
   one does not. Writes are atomic, so a kill -9 during a save leaves the previous checkpoint.
8. Two-phase pretraining (Qwen2, Qwen2.5): `--init` continues a checkpoint's weights at a longer
   `--context` with a raised RoPE base `--rope-theta` (ABF, Xiong et al. 2023, arXiv:2309.16039),
   a fresh optimizer and schedule; nothing else in its config changes.
"""

import argparse
import ast
import dataclasses
import gc
import hashlib
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import check_resumable, generate
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tokenizer import Tokenizer, read_documents

PRESETS = {  # name: (hidden, layers, heads, kv heads, intermediate, context)
    "tiny": (128, 4, 4, 4, 384, 128),  # ~1M params with the tied embeddings: the CPU default
    "30m": (384, 12, 6, 2, 1024, 1024),  # 25M with a 16k vocab, 31M with 32k: one GPU
    "125m": (768, 12, 12, 4, 2048, 1024),  # 100M with a 32k vocab (tied), GPT-2 small scale
}


@dataclass
class Args:
    data: str = "data/pretrain.txt"
    """training text: .txt (documents separated by a blank line) or .jsonl with {"text": ...}"""
    tokenizer: str = "out/tokenizer.json"
    """tokenizer file written by tokenizer.py"""
    out: str = "out/pretrain.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    preset: Literal["tiny", "30m", "125m"] = "tiny"
    """model size: tiny (CPU), 30m or 125m (one GPU); the size flags below override it"""
    hidden_size: int = 0
    """width of the residual stream (0 = from the preset)"""
    num_layers: int = 0
    """number of Transformer blocks (0 = from the preset)"""
    context: int = 0
    """sequence length in tokens (0 = from the preset)"""
    steps: int = 500
    """optimizer steps"""
    batch_size: int = 16
    """sequences per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 1
    """micro-batches per optimizer step (per rank)"""
    lr: float = 6e-3
    """peak learning rate (AdamW's)"""
    optimizer: Literal["adamw", "muon"] = "muon"
    """adamw, or muon for the blocks' matrices (AdamW for embeddings, head, norms and biases)"""
    muon_lr: float = 0.02
    """peak learning rate of the Muon matrices (with --optimizer muon)"""
    warmup: int = 100
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    val_fraction: float = 0.02
    """share of the token stream held out for validation"""
    eval_every: int = 200
    """evaluate (validation loss, bits per byte, a sample) every N steps"""
    eval_batches: int = 8
    """validation batches per evaluation"""
    save_every: int = 200
    """write a resumable checkpoint every N steps"""
    log_every: int = 50
    """print a progress line every N steps"""
    resume: bool = False
    """continue from the resumable checkpoint at --out"""
    init: str = ""
    """a checkpoint to go on from (phase 2, detail 8): its weights and config but the two below"""
    rope_theta: float = 0.0
    """RoPE base (0: 10000, or --init's); raised with --context for a long phase (detail 8)"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the model"""
    grad_checkpoint: bool = False
    """recompute each block's activations in the backward pass: less memory, more compute"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and optimizer state over the ranks (fsdp.py)"""
    seed: int = 0
    """random seed (weights and data order)"""


def parse_args(cls):
    """argparse from a dataclass: an option per field, the docstring its help, Literal = choices."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        kind = ({"action": argparse.BooleanOptionalAction} if field.type is bool else
                {"choices": get_args(field.type)} if get_origin(field.type) is Literal else
                {"type": field.type})
        parser.add_argument("--" + field.name.replace("_", "-"), default=field.default,
                            help=docs.get(field.name), **kind)
    return cls(**vars(parser.parse_args()))


def setup(args):
    """Device, DDP (torchrun sets RANK) and dtype: (ddp, rank, world, device_type, autocast)."""
    ddp, rank, world = "RANK" in os.environ, 0, 1
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (--device auto picks one)")
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    device_type = "cuda" if args.device.startswith("cuda") else args.device
    if args.dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        args.dtype = "bfloat16" if bf16 else "float32"
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: at least 1")
    log_path = os.path.abspath(os.path.splitext(args.out)[0] + ".jsonl")  # the metrics' file
    for name, value in vars(args).items():  # --out data/sft.pt: metrics over --data data/sft.jsonl
        if isinstance(value, str) and os.path.abspath(value) == log_path:
            raise ValueError(f"--out {args.out} would write its metrics over --{name} {value}")
    bf16 = args.dtype == "bfloat16"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return ddp, rank, world, device_type, autocast


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def format_time(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def mean_metrics(sums: dict, count: int, ddp: bool, device) -> dict:
    """Each summed metric averaged over `count` steps and over every rank."""
    values = torch.tensor(list(sums.values()), device=device)
    if ddp:
        dist.all_reduce(values)
        count *= dist.get_world_size()
    return dict(zip(sums, (values / count).tolist()))


def progress_line(stage: str, step: int, steps: int, metrics: dict, elapsed: float) -> str:
    """`sft | step 120/600 | loss 1.2345 | lr 3.0e-04 | 12.3k tok/s | 00:41 elapsed, 02:45 left`"""
    shown = [f"{name} {value:.4f}" for name, value in metrics.items()
             if name not in ("lr", "tok_per_s")]
    left = format_time(elapsed / step * (steps - step))
    speed = f"{metrics['tok_per_s'] / 1e3:.1f}k tok/s"
    return " | ".join([f"{stage} | step {step}/{steps}", *shown, f"lr {metrics['lr']:.1e}", speed,
                       f"{format_time(elapsed)} elapsed, {left} left"])


# detail 1: tokenize once, cache as a memmap keyed by the tokenizer and the data
def load_tokens(path: str, tokenizer: Tokenizer) -> np.ndarray:
    """The corpus as one token stream (documents joined by <|endoftext|>), cached by the data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `python data.py` first, or pass --data")
    key = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())
    with open(path, "rb") as f:
        key.update(f.read())
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    cache = f"{path}.{key.hexdigest()[:12]}.bin"
    if not os.path.exists(cache):  # detail 2: the chat template's and think tokens are special
        tokens = tokenizer.encode_array(read_documents(path), tokenizer.text_tokens)
        tmp = f"{cache}.{os.getpid()}.tmp"  # two runs at once (pipeline.sh's student) both write
        with open(tmp, "wb") as f:
            f.write(np.asarray(tokens, dtype=dtype).tobytes())
        os.replace(tmp, cache)  # the same bytes from either: the last replace is as good
    return np.memmap(cache, dtype=dtype, mode="r")


# detail 3: the windows of a step depend only on (seed, step)
def get_batch(tokens: np.ndarray, batch_size: int, context: int, seed: int, step: int):
    """batch_size random windows of context + 1 tokens: inputs and next-token targets."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
    windows = np.stack([tokens[s : s + context + 1].astype(np.int64) for s in starts.tolist()])
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


# detail 6: H = -sum_t p_t log p_t over the token frequencies p_t (nats per token)
def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def model_config(args: Args, vocab_size: int, parent: dict | None = None) -> ModelConfig:
    """The preset's shape, with --hidden-size, --num-layers, --context overriding it; with --init,
    its config with --context and --rope-theta (detail 8)."""
    if parent is not None:
        config = ModelConfig(**parent["config"])
        context = args.context or config.max_position_embeddings
        return dataclasses.replace(config, max_position_embeddings=context,
                                   rope_theta=args.rope_theta or config.rope_theta)
    preset_hidden, layers, heads, kv_heads, intermediate, context = PRESETS[args.preset]
    hidden = args.hidden_size or preset_hidden
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=args.num_layers or layers,
        intermediate_size=intermediate * hidden // preset_hidden,  # the preset's width ratio
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=args.context or context, rope_theta=args.rope_theta or 10000.0)


@torch.no_grad()
def evaluate(model, tokenizer, val_tokens, args, batch_size, context, autocast):
    """Validation loss over --eval-batches fixed windows, and a sampled text (48 tokens)."""
    model.eval()
    losses = []
    for i in range(args.eval_batches):
        inputs, targets = get_batch(val_tokens, batch_size, context, 10_000 + args.seed, step=i)
        with autocast:
            losses.append(model(inputs.to(args.device), targets.to(args.device))[1].item())
    generator = torch.Generator(args.device).manual_seed(0)
    sample = generate(model, [[tokenizer.eot_id]], 48, temperature=0.8, top_k=50,
                      generator=generator)[0]
    model.train()
    return sum(losses) / len(losses), tokenizer.decode(sample[0].tolist())


def main(args: Args):
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x "
                         f"--grad-accum = {world * args.grad_accum}")
    micro_batch = args.batch_size // (world * args.grad_accum)
    if args.muon_lr <= 0:
        raise ValueError(f"--muon-lr {args.muon_lr}: must be > 0")
    if args.init and (args.hidden_size or args.num_layers):
        raise ValueError("--init takes its checkpoint's shape: no --hidden-size, --num-layers")

    # -------------------------------------------------------------- data and model
    tokenizer = Tokenizer.load(args.tokenizer)  # a missing file: "run `python tokenizer.py`"
    if ddp and not master:
        dist.barrier()  # rank 0 writes the token cache first
    tokens = load_tokens(args.data, tokenizer)
    if ddp and master:
        dist.barrier()
    parent = load_checkpoint(args.init)[2] if args.init else None  # detail 8
    if parent is not None and parent["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"--init {args.init} has another tokenizer than {args.tokenizer}")
    config = model_config(args, tokenizer.vocab_size, parent)
    context = config.max_position_embeddings
    n_val = max(int(len(tokens) * args.val_fraction), context + 2)
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    if len(train_tokens) < context + 2:
        raise ValueError(f"{args.data}: {len(tokens)} tokens is too few for a context of {context}")
    model, step = Transformer(config).to(args.device), 0
    if parent is not None:  # the RoPE base is no weight: phase 1's weights load as they are
        model.load_state_dict(parent["model"])
    if args.resume:  # detail 7: the model, optimizer, RNG and step of the last resumable checkpoint
        model, _, checkpoint = load_checkpoint(args.out, device=args.device)
        check_resumable(args.out, checkpoint, args, (
            "data", "tokenizer", "preset", "hidden_size", "num_layers", "context", "steps", "seed",
            "batch_size", "lr", "optimizer", "muon_lr", "warmup", "weight_decay", "val_fraction",
            "init", "rope_theta"))
        if checkpoint["tokenizer"] != tokenizer.to_dict():
            raise ValueError(f"{args.out} was trained with another tokenizer than "
                             f"{args.tokenizer}: resume with its own")
        torch.set_rng_state(checkpoint["rng"]["torch"])
        step = checkpoint["step"]
    model.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    muon_lr = args.muon_lr if args.optimizer == "muon" else 0.0
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, device_type=device_type,
                                          muon_lr=muon_lr)
    if args.resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
    raw_model, model = model, torch.compile(model) if args.compile else model
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    model = DDP(model, device_ids=device_ids) if ddp and not args.fsdp else model
    # detail 6: bits per byte needs the bytes per token of the validation text
    tokens_per_byte = len(val_tokens) / tokenizer.count_bytes(val_tokens)
    entropy = unigram_entropy(train_tokens, tokenizer.vocab_size)

    # -------------------------------------------------------------- the training loop
    tokens_per_step = args.batch_size * context
    if master:
        print(f"pretrain | {raw_model.num_params() / 1e6:.2f}M params (non-embedding), context "
              f"{context}, {len(train_tokens) / 1e6:.2f}M train tokens, {world} process(es) on "
              f"{args.device} in {args.dtype}")
        n_tokens = args.steps * tokens_per_step
        print(f"pretrain | {n_tokens / 1e6:.1f}M tokens to see: "
              f"{n_tokens / raw_model.num_params(non_embedding=False):.1f} tokens per parameter "
              f"(Chinchilla-optimal is ~20) | unigram entropy {entropy:.3f} nats/token")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_path = os.path.splitext(args.out)[0] + ".jsonl"
        kept = []  # on resume, keep only the log lines of the steps that are not replayed
        if args.resume and os.path.exists(log_path):
            kept = [line for line in open(log_path) if json.loads(line)["step"] <= step]
        log_file = open(log_path, "w")
        log_file.writelines(kept)
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(raw_model, optimizer, bf16=args.dtype == "bfloat16")
    start_time = last_time = time.time()
    sums, steps_since_log, tokens_seen = {}, 0, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:  # a Muon group's peak is --muon-lr
            group["lr"] = lr * muon_lr / args.lr if group.get("muon") else lr
        # detail 4: the global batch of this step, of which this rank takes its rows
        inputs, targets = get_batch(train_tokens, args.batch_size, context, args.seed, step)
        inputs, targets = inputs[rank::world].to(args.device), targets[rank::world].to(args.device)
        loss_sum = torch.zeros((), device=args.device)
        for micro in range(args.grad_accum):
            rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
            last = micro == args.grad_accum - 1
            no_sync = model.no_sync if ddp and not last else nullcontext  # sync on the last
            with no_sync(), autocast:
                _, loss = model(inputs[rows], targets[rows])
            with no_sync():
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step

        metrics = {"loss": loss_sum.item()}
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("pretrain", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()
        evaluating = step % args.eval_every == 0 or step == args.steps
        evaluated = gathered(raw_model) if args.fsdp and evaluating else raw_model  # all ranks
        if master and evaluating:
            val_loss, sample = evaluate(evaluated, tokenizer, val_tokens, args, micro_batch,
                                        context, autocast)
            val_bpb = val_loss / math.log(2) * tokens_per_byte
            print(f"pretrain | step {step} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f} | "
                  f"sample: {sample[:120]!r}")
            log_file.write(json.dumps({"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
                           + "\n")
            log_file.flush()
        # detail 7: resumable checkpoints carry the optimizer and RNG state (--fsdp: all gather)
        if (master or args.fsdp) and step % args.save_every == 0 and step < args.steps:
            save_checkpoint(args.out, raw_model, tokenizer, "pretrain", args.init or None, step,
                            args=dataclasses.asdict(args), optimizer=optimizer.state_dict(),
                            rng={"torch": torch.get_rng_state()})

    raw_model = gathered(raw_model) if args.fsdp else raw_model  # all ranks gather
    if master:
        metrics = {"val_loss": val_loss, "val_bpb": val_bpb, "unigram_entropy": entropy}
        save_checkpoint(args.out, raw_model, tokenizer, "pretrain", args.init or None, step,
                        args=dataclasses.asdict(args), metrics=metrics)
        print(f"pretrain | done in {format_time(time.time() - start_time)} | val loss "
              f"{val_loss:.4f} nats/token (unigram entropy {entropy:.4f}) | val bpb "
              f"{val_bpb:.4f} | wrote {args.out}")
        log_file.close()
    if ddp:  # the ranks leave together, once rank 0 has evaluated and saved
        dist.barrier()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:  # DDP sits in a reference cycle: only a gc pass frees it and the group it holds
        if dist.is_initialized():
            gc.collect()  # before the group is destroyed, else a gloo rank can abort at exit
            dist.destroy_process_group()
