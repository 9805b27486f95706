"""
reward.py: a Bradley-Terry reward model (the SFT Transformer with a scalar head) on preferences.

Run (after `python sft.py`), out/sft.pt + data/prefs.jsonl -> out/reward.pt:

    python reward.py                                                  # CPU defaults
    python reward.py --device cuda --batch-size 64 --steps 1000       # one GPU
    torchrun --nproc_per_node 8 reward.py --batch-size 256            # many GPUs, no code change
    python reward.py --process --out out/prm.pt     # a process reward model, on data/steps.jsonl

Implementation details:
1. The reward model is sft.pt with a scalar head `score` (Qwen2ForSequenceClassification's name)
   for the lm head, initialised from N(0, 1/sqrt(hidden + 1)) as in TRL.
2. The reward of a reply (tokenizer.encode_reply) is the score at the last real token of prompt +
   reply, found from the attention mask (engine.sequence_scores), never from a pad id.
3. Batches: random pairs (engine.batch_indices), in --grad-accum micro-batches by length
   (engine.by_length); the chosen and the rejected replies are two passes, each padded to its own
   longest reply. The held-out pairs are evaluated sorted by length.
4. L = -log σ(r_c - r_r - m) + c mean((r_c + r_r)²): Bradley-Terry, margin m (Llama 2), centering
   (Eisenstein et al. 2023); the checkpoint stores the rewards' mean and std (for PPO's scaling).
5. Unusable pairs (identical or empty sides, longer than the context) are skipped and counted.
6. The loss of a step is the mean over the pairs of the global batch (N ranks: one process's loss).
7. Before and after: pairwise accuracy on held-out pairs, per rejected `kind`; a tie is wrong.
8. `--lora-rank r`: a LoRA adapter on the trunk, the new score head trained in full (PEFT's
   modules_to_save); the checkpoint holds the merged weights, which PPO's critic starts from.
9. `--process`: a process reward model (stage "prm") on stepwise records, kept a language model:
   P(step k right) = σ(s_k), s_k = m_k + step_offset, m_k the least log-prob of the step's tokens
   and the one after it (engine.process_logits); L = mean of BCE over the batch's steps.
10. Its before/after: step accuracy (s_k > 0), first-wrong-step accuracy (none counts), and the
   held-out pairs by each reply's least step (Math-Shepherd's min aggregate).
11. Iterative RL (DeepSeekMath 4.1.4): `--init` a reward model trains it further, its head kept, on
   the policy's own replies judged by the labeler (pairs, or steps with --process), with a
   `--replay-share` of old records from `--replay-data`.
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
from functools import partial
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import (all_pairs, batch_indices, by_length, format_skipped, least_step_scores,
                    pair_scores, preference_pairs, sequence_scores, step_accuracy, step_examples,
                    step_scores)
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint


@dataclass
class Args:
    init: str = "out/sft.pt"
    """checkpoint to start from (from sft.py); its lm head is replaced by a scalar head"""
    data: str = "data/prefs.jsonl"
    """preference pairs, one {"prompt", "chosen", "rejected"} per line (optional "margin")"""
    eval_pairs: str = "data/prefs_eval.jsonl"
    """held-out preference pairs, for the before/after pairwise accuracy"""
    process: bool = False
    """train a process reward model on --step-data instead of the pairs (details 9, 10)"""
    step_data: str = "data/steps.jsonl"
    """with --process: {"prompt", "completions": [step, ...], "labels": [bool, ...]} per line"""
    eval_steps: str = "data/steps_eval.jsonl"
    """with --process: held-out stepwise records, for the before/after step accuracy"""
    step_offset: float = 4.0
    """with --process: P(step right) = σ(least log-prob of its tokens + step_offset) (detail 9)"""
    out: str = "out/reward.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    steps: int = 120
    """optimizer steps"""
    batch_size: int = 32
    """pairs per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 2
    """micro-batches per optimizer step (per rank), the step's pairs sorted by length (detail 3)"""
    lr: float = 1e-3
    """peak learning rate"""
    warmup: int = 12
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    center_coef: float = 0.01
    """weight of the reward-centering term mean((r_chosen + r_rejected)^2) (0 = off)"""
    stats_pairs: int = 256
    """training pairs whose rewards give the stored mean and std (for PPO)"""
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
    """random seed (score head and data order)"""
    lora_rank: int = 0
    """LoRA: rank of the trained update of each target layer (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA: the update is scaled by alpha / rank"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """LoRA: the layers that get an adapter (add gate_proj,up_proj,down_proj for the MLP too)"""
    replay_data: str = ""
    """old preference pairs (stepwise records with --process) replayed among the new (detail 11)"""
    replay_share: float = 0.1
    """share of the training pairs that are replayed from --replay-data (DeepSeekMath: a tenth)"""


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


# detail 4: L = -log σ(r_c - r_r - m) + c · mean((r_c + r_r)²), per pair (B,) from rewards (B,)
def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                margin: torch.Tensor | None = None, center_coef: float = 0.0) -> torch.Tensor:
    difference = chosen_rewards - rejected_rewards - (0 if margin is None else margin)
    return -F.logsigmoid(difference) + center_coef * (chosen_rewards + rejected_rewards) ** 2


# detail 7: accuracy = mean(r_c > r_r), a tie counts as wrong
def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    return (chosen_rewards > rejected_rewards).float().mean().item()


# detail 1: the Transformer of `lm_model` with a fresh `score` head instead of `lm_head`
def reward_model_from(lm_model: Transformer, seed: int) -> Transformer:
    config = ModelConfig(**{**dataclasses.asdict(lm_model.config), "head": "score"})
    reward_model = Transformer(config)
    weights = {k: v for k, v in lm_model.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = reward_model.load_state_dict(weights, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.normal_(reward_model.score.weight, std=1 / math.sqrt(config.hidden_size + 1),
                          generator=torch.Generator().manual_seed(seed))
    return reward_model.to(next(lm_model.parameters()).device)


# detail 7: held-out pairwise accuracy, overall and per rejected kind, and the mean margin
def heldout_metrics(reward_model, pairs: list[dict], pad_id: int, args, autocast,
                    score=sequence_scores) -> dict:
    chosen_rewards, rejected_rewards = all_pairs(partial(pair_scores, score=score), reward_model,
                                                 pairs, pad_id, args.device, args.eval_batch_size,
                                                 autocast)
    result = {"accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
              "margin": (chosen_rewards - rejected_rewards).mean().item()}
    for kind in sorted({p["kind"] for p in pairs}):
        rows = torch.tensor([p["kind"] == kind for p in pairs], device=chosen_rewards.device)
        result[f"accuracy/{kind}"] = pairwise_accuracy(chosen_rewards[rows], rejected_rewards[rows])
    return result


def format_pairs(result: dict) -> str:
    if "first_wrong" in result:  # a process reward model's (detail 10)
        return (f"step accuracy {result['accuracy']:.1%} | first wrong step "
                f"{result['first_wrong']:.1%} | pairs by the least step: " + format_pairs(
                    {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("pairs/")}))
    kinds = " ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in result.items() if "/" in k)
    return f"pairwise accuracy {result['accuracy']:.1%} ({kinds}) | margin {result['margin']:.2f}"


# detail 9: L = sum over steps k of BCE(σ(s_k), y_k), divided by the global batch's step count
def process_loss(step_logits, step_labels, step_mask):
    """Each reply's summed per-step binary cross-entropy (B,): logits s_k at the step ends, labels,
    step mask (B, N)."""
    losses = F.binary_cross_entropy_with_logits(step_logits, step_labels, reduction="none")
    return (losses * step_mask).sum(dim=1)


# detail 10: step and first-wrong-step accuracy, pairs by each reply's least step score
def process_metrics(reward_model, pairs, pad_id, args, autocast, tokenizer, examples) -> dict:
    with autocast:
        result = step_accuracy(reward_model, examples, pad_id, args.device, args.step_offset,
                               args.eval_batch_size)
    least = partial(least_step_scores, tokenizer=tokenizer, offset=args.step_offset)
    by_pairs = heldout_metrics(reward_model, pairs, pad_id, args, autocast, least)
    return {**result, **{f"pairs/{key}": value for key, value in by_pairs.items()}}


# detail 11: share / (1 - share) old pairs per new pair, drawn at random (all if too few)
def with_replay(pairs: list, old_pairs: list, share: float, seed: int) -> list:
    n_old = min(len(old_pairs), round(len(pairs) * share / (1 - share)))
    order = torch.randperm(len(old_pairs), generator=torch.Generator().manual_seed(seed))
    return pairs + [old_pairs[i] for i in order[:n_old].tolist()]


def pair_tokens(pair: dict) -> int:
    """The tokens a pair (or a process example) puts through the model: its prompt and replies."""
    return sum(len(pair[key]) for key in ("prompt", "chosen", "rejected", "reply") if key in pair)


def main(args: Args):
    if not 0 <= args.replay_share < 1:
        raise ValueError(f"--replay-share {args.replay_share}: must be in [0, 1)")
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x "
                         f"--grad-accum = {world * args.grad_accum}")

    reward_model, tokenizer, _ = load_checkpoint(args.init, device=args.device)
    if reward_model.config.head == "lm" and not args.process:  # detail 1 (11: or go on; 9)
        reward_model = reward_model_from(reward_model, args.seed)
    if args.lora_rank:  # detail 8: an adapter on the trunk, the new score head trained in full
        from lora import add_lora
        lora = (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        add_lora(reward_model, *lora)
        if not args.process:
            reward_model.score.requires_grad_(True)
    context, pad_id = reward_model.config.max_position_embeddings, tokenizer.pad_id
    columns, data = ("prompt", "chosen", "rejected"), args.step_data if args.process else args.data
    evaluate, sides = heldout_metrics, ("prompt", "prompt", "chosen", "rejected")  # tokens
    if args.process:  # detail 9: it trains on stepwise records, not pairs
        step_columns = ("prompt", "completions", "labels")
        pairs, skipped = step_examples(tokenizer, read_jsonl(data, step_columns), context, data)
        if args.replay_data:  # detail 11
            old_pairs = step_examples(tokenizer, read_jsonl(args.replay_data, step_columns),
                                      context, args.replay_data)[0]
            pairs = with_replay(pairs, old_pairs, args.replay_share, args.seed)
        eval_steps = step_examples(tokenizer, read_jsonl(args.eval_steps, step_columns), context,
                                   args.eval_steps)[0]
        evaluate, sides = partial(process_metrics, tokenizer=tokenizer, examples=eval_steps), (
            "prompt", "reply")
    else:
        pairs, skipped = preference_pairs(tokenizer, read_jsonl(data, columns), context, data)
        if args.replay_data:  # detail 11
            old_pairs = preference_pairs(tokenizer, read_jsonl(args.replay_data, columns), context,
                                         args.replay_data)[0]
            pairs = with_replay(pairs, old_pairs, args.replay_share, args.seed)
    if len(pairs) < args.batch_size:
        raise ValueError(f"{data}: {len(pairs)} usable records, fewer than "
                         f"--batch-size {args.batch_size}")
    eval_pairs, eval_skipped = preference_pairs(
        tokenizer, read_jsonl(args.eval_pairs, columns), context, args.eval_pairs)
    eval_pairs.sort(key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))
    optimizer = reward_model.configure_optimizer(args.lr, args.weight_decay,
                                                 device_type=device_type)
    reward_model.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    model = torch.compile(reward_model) if args.compile else reward_model
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    model = DDP(model, device_ids=device_ids) if ddp and not args.fsdp else model

    # -------------------------------------------------------------- the training loop
    if master:  # detail 7: held-out accuracy before training
        before = evaluate(reward_model, eval_pairs, pad_id, args, autocast)
        kind = "step-labelled replies" if args.process else "pairs"
        print(f"reward | {len(pairs)} {kind} ({format_skipped(skipped)} skipped), "
              f"{len(eval_pairs)} held out ({format_skipped(eval_skipped)} skipped), "
              f"{world} process(es) on {args.device} in {args.dtype}")
        print(f"reward | before: {format_pairs(before)}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(reward_model, optimizer, bf16=args.dtype == "bfloat16")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(len(pairs), args.batch_size, args.seed, step)
        # detail 6 (9): the mean over the global batch's pairs (steps)
        count = sum(len(pairs[i]["labels"]) for i in indices) if args.process else args.batch_size
        indices = indices[rank::world]
        stats = torch.zeros(3, device=args.device)  # this rank's sums: losses, correct, margins
        # detail 3: the step's pairs (process: replies) by length, in --grad-accum micro-batches
        for micro, rows in enumerate(by_length([pairs[i] for i in indices], args.grad_accum,
                                               pair_tokens)):
            tokens_seen += world * sum(len(p[side]) for p in rows for side in sides)
            no_sync = model.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext
            with no_sync(), autocast:
                if args.process:  # detail 9: margins (steps,) > 0 where judged as the labeler
                    logits, labels, step_mask = step_scores(model, rows, pad_id, args.device,
                                                            args.step_offset)
                    losses = process_loss(logits, labels, step_mask)
                    margins = ((2 * labels - 1) * logits)[step_mask.bool()]
                else:
                    margin = torch.tensor([p["margin"] for p in rows], device=args.device)
                    chosen_rewards, rejected_rewards = pair_scores(model, rows, pad_id, args.device)
                    losses = reward_loss(chosen_rewards, rejected_rewards, margin, args.center_coef)
                    margins = chosen_rewards - rejected_rewards  # (b,)
                loss = losses.sum() / count  # detail 6: its share of the global mean
            with no_sync():
                (loss * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            margins = margins.detach()
            stats += torch.stack([losses.detach().sum(), (margins > 0).sum(), margins.sum()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        values = (stats * world / count).tolist()  # as the means of the whole batch
        metrics = dict(zip(("loss", "accuracy", "margin"), values))
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("reward", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()

    reward_model = gathered(reward_model) if args.fsdp else reward_model  # all ranks gather
    if master:
        after = evaluate(reward_model, eval_pairs, pad_id, args, autocast)
        mean, std = 0.0, 1.0  # a process reward model's rewards are log-probabilities
        if not args.process:  # detail 4: the mean and std of training replies' rewards, for PPO
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))
            sample = [pairs[i] for i in order[: args.stats_pairs].tolist()]
            rewards = torch.cat(all_pairs(pair_scores, reward_model, sample, pad_id, args.device,
                                          args.eval_batch_size, autocast))
            mean, std = rewards.mean().item(), rewards.std().item()
        metrics = {"reward_mean": mean, "reward_std": std, "before": before, "after": after,
                   "skipped": skipped}
        if args.process:  # what engine.load_reward reads the steps with
            metrics["step_offset"] = args.step_offset
        save_checkpoint(args.out, reward_model, tokenizer, "prm" if args.process else "reward",
                        parent=args.init, step=step, args=dataclasses.asdict(args), metrics=metrics)
        print(f"reward | done in {format_time(time.time() - start_time)}" + ("" if args.process else
              f" | training rewards: mean {mean:.3f}, std {std:.3f} (stored for PPO)"))
        print(f"reward | before: {format_pairs(before)}")
        print(f"reward | after:  {format_pairs(after)} | wrote {args.out}")
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
