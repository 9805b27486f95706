"""
dpo.py: Direct Preference Optimization on preference pairs against a frozen reference,
out/sft.pt + data/prefs.jsonl -> out/dpo.pt (after `python sft.py`):

    python dpo.py                                                     # CPU defaults
    python dpo.py --loss-type ipo --beta 0.5                          # IPO; also hinge, robust
    python dpo.py --device cuda --batch-size 64 --steps 1000 --precompute-ref       # one GPU
    torchrun --nproc_per_node 8 dpo.py --batch-size 256               # many GPUs, no code change

Implementation details:
1. The reference is sft.pt, frozen. `--precompute-ref` computes its log-probs of the run's pairs
   once, with the policy before its first step (it is the reference then): no second model.
2. log π(reply | prompt) is the SUM of the log-probs of the reply tokens and its <|im_end|>.
3. Batches: random pairs (engine.batch_indices). Each prompt runs once into a KV cache, and the
   chosen and rejected replies run on it as two passes (engine.pair_logps).
4. Losses of h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)): sigmoid (DPO, Rafailov
   et al. 2023; label smoothing: cDPO), robust (rDPO, Chowdhury et al. 2024), hinge (SLiC, Zhao
   et al. 2023), ipo (IPO, Azar et al. 2023) on summed log-probs; --ipo-length-normalized: TRL's.
5. The implicit rewards β (log π - log π_ref) and their margin are logged under TRL's names.
6. Before and after: held-out preference accuracy (log π(c) > log π(r)) and implicit-reward
   accuracy, per rejected kind, and the task accuracy of greedy replies to data/eval.jsonl.
7. `--lora-rank r` trains a LoRA adapter; the reference is the policy with its adapter off, as TRL.
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import (all_pairs, batch_indices, format_accuracy, format_skipped, heldout_accuracy,
                    load_policy, pair_logps, preference_pairs)
from model import save_checkpoint

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]
LOSS_TYPES = get_args(LossType)


@dataclass
class Args:
    init: str = "out/sft.pt"
    """policy and reference to start from (from sft.py)"""
    data: str = "data/prefs.jsonl"
    """preference pairs, one {"prompt", "chosen", "rejected"} per line"""
    eval_pairs: str = "data/prefs_eval.jsonl"
    """held-out preference pairs, for the before/after preference accuracy"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the before/after task accuracy"""
    out: str = "out/dpo.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    loss_type: LossType = "sigmoid"
    """sigmoid (DPO), robust (rDPO), hinge (SLiC) or ipo (IPO)"""
    beta: float = 0.1
    """strength of the pull towards the reference (higher = stay closer)"""
    label_smoothing: float = 0.0
    """assumed share of flipped labels, for sigmoid (cDPO) and robust; below 0.5"""
    ipo_length_normalized: bool = False
    """ipo only: each reply's log-ratio per token (TRL's IPO; beta then counts per token)"""
    precompute_ref: bool = False
    """compute the reference log-probs once before training and hold no reference model"""
    steps: int = 20
    """optimizer steps"""
    batch_size: int = 32
    """pairs per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 1
    """micro-batches per optimizer step (per rank)"""
    lr: float = 1e-4
    """peak learning rate"""
    warmup: int = 10
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    max_new_tokens: int = 48
    """reply length limit for the held-out task evaluation"""
    eval_batch_size: int = 128
    """pairs per forward pass when evaluating"""
    log_every: int = 25
    """print a progress line every N steps"""
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


# detail 4: the loss is a function of h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))
def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
             ref_logp_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None):
    """Per-pair losses (B,) and the implicit rewards (B,), (B,) of the chosen and rejected replies;
    with the replies' token counts (B,), ipo divides each log-ratio by its count (TRL's IPO)."""
    h = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)           # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":  # -(1-ε) log σ(βh) - ε log σ(-βh)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":  # (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)
        losses = ((-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h))
                  / (1 - 2 * eps))
    elif loss_type == "hinge":  # max(0, 1 - βh)
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":  # (h - 1/(2β))², log-ratios per token with the token counts
        if chosen_tokens is not None:
            h = ((logp_chosen - ref_logp_chosen) / chosen_tokens
                 - (logp_rejected - ref_logp_rejected) / rejected_tokens)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    # detail 5: implicit rewards r = β (log π - log π_ref)
    chosen_rewards = beta * (logp_chosen - ref_logp_chosen).detach()
    rejected_rewards = beta * (logp_rejected - ref_logp_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# detail 6: log π(c) > log π(r) and β log π/π_ref(c) > β log π/π_ref(r), overall, per kind
def preference_metrics(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected,
                       kinds: list[str], beta: float) -> dict:
    _, chosen_rewards, rejected_rewards = dpo_loss(logp_chosen, logp_rejected, ref_logp_chosen,
                                                   ref_logp_rejected, beta)
    prefers_chosen = {"accuracy": (logp_chosen > logp_rejected).float(),  # (B,)
                      "implicit_accuracy": (chosen_rewards > rejected_rewards).float()}
    result = {name: prefers.mean().item() for name, prefers in prefers_chosen.items()}
    result["margin"] = (chosen_rewards - rejected_rewards).mean().item()
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds], device=logp_chosen.device)
        result.update({f"{name}/{kind}": prefers[rows].mean().item()
                       for name, prefers in prefers_chosen.items()})
    return result


def format_pairs(result: dict) -> str:
    kinds = " ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in result.items()
                     if k.startswith("accuracy/"))
    return (f"preference accuracy {result['accuracy']:.1%} ({kinds}) | implicit reward accuracy "
            f"{result['implicit_accuracy']:.1%}, margin {result['margin']:.2f}")


def main(args: Args):
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x "
                         f"--grad-accum = {world * args.grad_accum}")
    micro_batch = args.batch_size // (world * args.grad_accum)
    if args.beta <= 0 or not 0 <= args.label_smoothing < 0.5:  # IPO divides by beta
        raise ValueError(f"--beta must be > 0 and --label-smoothing in [0, 0.5), got {args.beta} "
                         f"and {args.label_smoothing}")
    if args.ipo_length_normalized and args.loss_type != "ipo":
        raise ValueError(f"--ipo-length-normalized needs --loss-type ipo, not {args.loss_type!r}")

    # detail 1, 7: a frozen copy of --init or the policy with its adapter off, unless precomputed
    lora = (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    policy, tokenizer, reference, reference_off = load_policy(
        args.init, args.device, lora, with_reference=not args.precompute_ref)
    context, pad_id = policy.config.max_position_embeddings, tokenizer.pad_id
    columns = ("prompt", "chosen", "rejected")
    pairs, skipped = preference_pairs(tokenizer, read_jsonl(args.data, columns), context, args.data)
    if len(pairs) < args.batch_size:
        raise ValueError(f"{args.data}: {len(pairs)} usable pairs, fewer than "
                         f"--batch-size {args.batch_size}")
    eval_pairs, eval_skipped = preference_pairs(
        tokenizer, read_jsonl(args.eval_pairs, columns), context, args.eval_pairs)
    eval_pairs.sort(key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))
    eval_records = read_jsonl(args.eval_data, ("prompt", "answer"))
    kinds = [p["kind"] for p in eval_pairs]
    lengths = torch.tensor([[len(p["chosen"]), len(p["rejected"])] for p in pairs],
                           device=args.device)  # (N, 2) reply + <|im_end|> tokens, for detail 4
    # detail 1: the reference log-probs; the policy is the reference until its first step
    def all_logps(pairs):  # in eval mode, in batches of --eval-batch-size
        return all_pairs(pair_logps, policy, pairs, pad_id, args.device, args.eval_batch_size,
                         autocast)
    ref_eval = all_logps(eval_pairs) if master else None
    if args.precompute_ref:  # only the pairs this rank will see
        mine = sorted({i for step in range(args.steps) for i in batch_indices(
            len(pairs), args.batch_size, args.seed, step)[rank::world]})
        ref_logps = torch.full((2, len(pairs)), float("nan"), device=args.device)
        ref_logps[:, mine] = torch.stack(all_logps([pairs[i] for i in mine]))
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    policy.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    model = torch.compile(policy) if args.compile else policy
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    model = DDP(model, device_ids=device_ids) if ddp and not args.fsdp else model

    if master:  # detail 6: held-out preference and task accuracy before training
        before = {"pairs": preference_metrics(*ref_eval, *ref_eval, kinds, args.beta),
                  "task": heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens)}
        source = ("precomputed" if args.precompute_ref else
                  "the policy, adapter off" if args.lora_rank else "model")
        print(f"dpo | {len(pairs)} pairs ({format_skipped(skipped)} skipped), {len(eval_pairs)} "
              f"held out ({format_skipped(eval_skipped)} skipped), {world} process(es) on "
              f"{args.device} in {args.dtype}, {args.loss_type} loss, beta {args.beta}, "
              f"reference {source}")
        print(f"dpo | before: {format_pairs(before['pairs'])}")
        print(f"dpo | before: task {format_accuracy(before['task'])}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(policy, optimizer, bf16=args.dtype == "bfloat16")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_indices(len(pairs), args.batch_size, args.seed, step)[rank::world]
        stats = torch.zeros(5, device=args.device)  # this rank's sums, in the order of `names`
        for micro in range(args.grad_accum):
            indices = batch[micro * micro_batch: (micro + 1) * micro_batch]
            rows = [pairs[i] for i in indices]
            tokens_seen += world * sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                                       for p in rows)
            if reference is None:
                ref_chosen, ref_rejected = ref_logps[:, indices]  # (b,), (b,)
            else:
                with torch.no_grad(), autocast, reference_off(reference):
                    ref_chosen, ref_rejected = pair_logps(reference, rows, pad_id, args.device)
            tokens = lengths[indices].T if args.ipo_length_normalized else [None, None]  # detail 4
            no_sync = model.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext
            with no_sync(), autocast:
                logp_chosen, logp_rejected = pair_logps(model, rows, pad_id, args.device)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    logp_chosen, logp_rejected, ref_chosen.float(), ref_rejected.float(),
                    args.beta, args.loss_type, args.label_smoothing, *tokens)
                loss = losses.sum() / args.batch_size  # its share of the global batch's mean
            with no_sync():
                (loss * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            margins = chosen_rewards - rejected_rewards  # (b,)
            stats += torch.stack([losses.detach().sum(), chosen_rewards.sum(),
                                  rejected_rewards.sum(), (margins > 0).sum(), margins.sum()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
        metrics = dict(zip(names, (stats * world / args.batch_size).tolist()))  # batch means
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("dpo", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()

    policy = gathered(policy) if args.fsdp else policy  # all ranks gather
    if master:
        after = {"pairs": preference_metrics(*all_logps(eval_pairs), *ref_eval, kinds, args.beta),
                 "task": heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens)}
        save_checkpoint(args.out, policy, tokenizer, "dpo", parent=args.init, step=step,
                        args=dataclasses.asdict(args),
                        metrics={"before": before, "after": after, "skipped": skipped})
        print(f"dpo | done in {format_time(time.time() - start_time)}")
        print(f"dpo | before: {format_pairs(before['pairs'])}")
        print(f"dpo | after:  {format_pairs(after['pairs'])}")
        print(f"dpo | before: task {format_accuracy(before['task'])}")
        print(f"dpo | after:  task {format_accuracy(after['task'])} | wrote {args.out}")
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
