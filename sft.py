"""
sft.py: supervised fine-tuning on conversations, with the loss on assistant tokens only.

    out/pretrain.pt + data/sft.jsonl  ->  out/sft.pt

Run:

    python sft.py                                                     # CPU defaults
    python sft.py --device cuda --batch-size 64 --grad-accum 1 --steps 2000  # one GPU
    torchrun --nproc_per_node 8 sft.py --batch-size 256 --grad-accum 1   # many GPUs, no code change
    python sft.py --resume                                # continue after a crash / kill -9

Implementation details:
1. A conversation is rendered with the ChatML template by `encode_chat`, with its assistant mask:
   1 on the replies and their closing <|im_end|>, 0 on system and user turns and on the
   `<|im_start|>assistant\\n` headers. The model learns to answer and to stop, not to be the user.
2. Targets are the next tokens where the mask is 1 and -100 (ignored) elsewhere, so the loss is
   the cross-entropy over assistant tokens only.
3. Conversations longer than the context are cut at the context (counted in a warning).
4. Batches: random conversations, a fresh order every epoch, not sorted by length (engine.py
   detail 4). A step's rows are sorted by length and cut into --grad-accum micro-batches, each
   right-padded to its own longest row: little padding, the same gradient (detail 5). The default
   4 is for the CPU, where padding costs time (on 2 cores a step takes ~0.15 s, not ~0.23 s with 1).
5. Step loss = sum of the losses of the global batch's assistant tokens / (batch size x the mean
   assistant tokens per conversation of the data set): a constant, so every token weighs the same
   on any micro-batch or rank (N ranks give one process's loss).
6. The schedule, optimizer, clipping, DDP (or --fsdp), resume and progress line are pretrain.py's.
7. Before and after: greedy replies to the held-out prompts (data/eval.jsonl), exact match of the
   final answer per task family, the think rate, the share of replies ending with <|im_end|>, and
   after, the accuracy when every reply is made to start with <think> (what RL can reach).
8. `--lora-rank r` trains a LoRA adapter on the frozen model (lora.py); out/sft.pt holds the merged
   weights and the adapter. A resumed LoRA run reloads its base from --init, its adapter from --out.
9. Against forgetting (InstructGPT's ptx), round(--ptx-share x batch) rows are random windows of
   pretraining text, every token a target, in micro-batches of their own, each weighing 1 / batch.
"""

import argparse
import ast
import dataclasses
import gc
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import batch_indices, by_length, check_resumable, format_accuracy, heldout_accuracy
from model import load_checkpoint, save_checkpoint
from tokenizer import Tokenizer, read_documents


@dataclass
class Args:
    init: str = "out/pretrain.pt"
    """checkpoint to fine-tune (from pretrain.py)"""
    data: str = "data/sft.jsonl"
    """conversations, one {"messages": [...]} per line (several files: comma-separated)"""
    ptx_data: str = "data/pretrain.txt"
    """pretraining text mixed into the batches (detail 9), read as pretrain.py reads --data"""
    ptx_share: float = 0.1
    """share of each step's rows (and of its loss) that are windows of --ptx-data (0 = off)"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the before/after accuracy"""
    out: str = "out/sft.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    steps: int = 400
    """optimizer steps"""
    batch_size: int = 32
    """rows per optimizer step (conversations, text windows), summed over ranks and accumulation"""
    grad_accum: int = 4
    """micro-batches per optimizer step (per rank), each of rows of like length (detail 4)"""
    lr: float = 5e-4
    """peak learning rate"""
    warmup: int = 50
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    max_new_tokens: int = 48
    """reply length limit for the held-out evaluation"""
    save_every: int = 200
    """write a resumable checkpoint every N steps"""
    log_every: int = 50
    """print a progress line every N steps"""
    resume: bool = False
    """continue from the resumable checkpoint at --out"""
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
    """random seed (data order)"""
    lora_rank: int = 0
    """LoRA: rank of the trained update of each target layer (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA: the update is scaled by alpha / rank"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """LoRA: the layers that get an adapter (add gate_proj,up_proj,down_proj for the MLP too)"""


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


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    """The records of a JSONL file; a malformed line is an error naming file:line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python data.py` first, or pass the path")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            missing = [key for key in required if not isinstance(record, dict) or key not in record]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing {', '.join(map(repr, missing))}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} has no records")
    return records


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


# detail 1, 2, 3: render, mask, shift, truncate
def sft_example(tokenizer: Tokenizer, messages: list[dict],
                context: int) -> tuple[list[int], list[int], bool]:
    """(inputs, targets, truncated): targets are the next tokens where the mask is 1, else -100."""
    ids, mask = tokenizer.encode_chat(messages)
    truncated = len(ids) > context + 1
    ids, mask = ids[: context + 1], mask[: context + 1]
    targets = [token if keep else -100 for token, keep in zip(ids[1:], mask[1:])]
    return ids[:-1], targets, truncated


def sft_examples(tokenizer: Tokenizer, paths: str, context: int) -> tuple[list[tuple], int]:
    """(inputs, targets) of each conversation of the files `paths` (comma-separated) with an
    assistant token, and how many were cut at the context."""
    examples, truncated = [], 0
    records = ((path, line_no, record) for path in paths.split(",")
               for line_no, record in enumerate(read_jsonl(path, required=("messages",)), 1))
    for path, line_no, record in records:
        messages = record["messages"]
        if not isinstance(messages, list) or not any(
                isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise ValueError(f"{path}:{line_no}: a conversation needs at least one assistant turn")
        try:
            inputs, targets, cut = sft_example(tokenizer, messages, context)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        truncated += cut
        if any(t != -100 for t in targets):
            examples.append((inputs, targets))
    return examples, truncated


# detail 4, 9: the micro-batches of step s on a rank, a function of (seed, s) like batch_indices
def micro_batches(examples: list[tuple], text, n_text: int, context: int, batch_size: int,
                  seed: int, step: int, rank=0, world=1, grad_accum=1) -> list[list[tuple]]:
    """(inputs, targets) rows: the rank's share of batch_size - n_text conversations, by length, in
    grad_accum micro-batches, then its share of n_text windows of `text` (context + 1 tokens) in as
    many micro-batches as rank 0 (--fsdp's collectives run in each): else one row, no target."""
    chat = [examples[i] for i in batch_indices(len(examples), batch_size - n_text, seed, step)]
    micros = by_length(chat[rank::world], grad_accum, length=lambda e: len(e[0]))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # a short text: 1 window
    starts = torch.randint(0, max(1, len(text) - context), (n_text,), generator=generator).tolist()
    windows = [text[s : s + context + 1].tolist() for s in starts]
    micro = batch_size // (world * grad_accum)  # rows per micro-batch
    return micros + [[(row[:-1], row[1:]) for row in windows[rank::world][i : i + micro]]
                     or [([0], [-100])] for i in range(0, len(windows[::world]), micro)]  # loss 0


def pad_batch(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])  # (B, T)


def main(args: Args):
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x "
                         f"--grad-accum = {world * args.grad_accum}")
    n_text = round(args.ptx_share * args.batch_size)  # detail 9: rows of text in every step
    if not 0 <= args.ptx_share < 1 or args.batch_size - n_text < world * args.grad_accum:
        raise ValueError(f"--ptx-share {args.ptx_share}: not in [0, 1), or leaves a micro-batch "
                         "without a conversation")

    # -------------------------------------------------------------- data and model
    resume_whole_model = args.resume and not args.lora_rank  # detail 8: a LoRA base is --init
    model, tokenizer, _ = load_checkpoint(args.out if resume_whole_model else args.init,
                                          device=args.device, head="lm")
    if args.lora_rank:  # detail 8: only the adapter trains
        from lora import add_lora
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    context = model.config.max_position_embeddings
    examples, truncated = sft_examples(tokenizer, args.data, context)
    if len(examples) < args.batch_size:
        raise ValueError(f"{args.data}: {len(examples)} usable conversations, fewer than "
                         f"--batch-size {args.batch_size}")
    if truncated and master:
        print(f"sft | warning: {truncated} of {len(examples)} conversations were longer than the "
              f"context ({context}) and were cut")
    text = (tokenizer.encode_array(read_documents(args.ptx_data), tokenizer.text_tokens)
            if n_text else [])  # detail 9: one token stream, as pretrain.py reads it
    lengths = [len(inputs) for inputs, _ in examples]
    tokens_per_conversation = sum(t != -100 for _, targets in examples
                                  for t in targets) / len(examples)  # detail 5: x batch size
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    step = 0
    if args.resume:  # the model came from --out above; now the optimizer, RNG and step
        checkpoint = torch.load(args.out, map_location=args.device, weights_only=True)
        check_resumable(args.out, checkpoint, args, (
            "init", "data", "steps", "batch_size", "lr", "warmup", "weight_decay", "seed",
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "ptx_data", "ptx_share"))
        if args.lora_rank:  # the adapter; the base came from --init
            model.load_state_dict(checkpoint["lora"]["weights"], strict=False)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        step = checkpoint["step"]
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    if args.resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
    model.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    raw_model, model = model, torch.compile(model) if args.compile else model
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    model = DDP(model, device_ids=device_ids) if ddp and not args.fsdp else model

    # -------------------------------------------------------------- the training loop
    if master:  # detail 7: held-out accuracy before training
        before = (checkpoint["metrics"]["before"] if args.resume else
                  heldout_accuracy(raw_model, tokenizer, eval_records, args.max_new_tokens))
        print(f"sft | {len(examples)} conversations, {sum(lengths) / len(lengths):.0f} tokens on "
              f"average, {world} process(es) on {args.device} in {args.dtype}")
        print(f"sft | before: {format_accuracy(before)}")
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
    start_time, last_time, tokens_seen = time.time(), time.time(), 0
    sums, steps_since_log = {}, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micros = micro_batches(examples, text, n_text, context, args.batch_size, args.seed, step,
                               rank, world, args.grad_accum)
        loss_sum = torch.zeros((), device=args.device)
        for micro, rows in enumerate(micros):
            per_row = context if micro >= args.grad_accum else tokens_per_conversation  # detail 9
            inputs = pad_batch([inputs for inputs, _ in rows], tokenizer.pad_id).to(args.device)
            targets = pad_batch([targets for _, targets in rows], -100).to(args.device)
            tokens_seen += inputs.numel() * world
            # gradients are synchronised on the last micro-step only
            no_sync = model.no_sync if ddp and micro < len(micros) - 1 else nullcontext
            with no_sync(), autocast:
                _, loss = model(inputs, targets)  # mean over this micro-batch's target tokens
                loss = loss * (targets != -100).sum() / (args.batch_size * per_row)  # detail 5
            with no_sync():
                (loss * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        metrics = {"loss": loss_sum.item() * world}  # this rank's share, as a whole-batch loss
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("sft", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()
        if (master or args.fsdp) and step % args.save_every == 0 and step < args.steps:
            save_checkpoint(args.out, raw_model, tokenizer, "sft", parent=args.init, step=step,
                            args=dataclasses.asdict(args), metrics={"before": master and before},
                            optimizer=optimizer.state_dict(), rng={"torch": torch.get_rng_state()})

    raw_model = gathered(raw_model) if args.fsdp else raw_model  # all ranks gather
    if master:
        # detail 7: and the forced-think accuracy, the ceiling of what RL can teach
        after = heldout_accuracy(raw_model, tokenizer, eval_records, args.max_new_tokens,
                                 forced_too=tokenizer.think_id is not None)
        save_checkpoint(args.out, raw_model, tokenizer, "sft", parent=args.init, step=step,
                        args=dataclasses.asdict(args), metrics={"before": before, "after": after})
        print(f"sft | done in {format_time(time.time() - start_time)}")
        print(f"sft | before: {format_accuracy(before)}")
        print(f"sft | after:  {format_accuracy(after)} | wrote {args.out}")
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
