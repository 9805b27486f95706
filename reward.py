"""
reward.py: a Bradley-Terry reward model (the SFT Transformer with a scalar head) on preference pairs.

    out/sft.pt + data/prefs.jsonl  ->  out/reward.pt

Run (after `python sft.py`):

    python reward.py                                      # CPU defaults, ~1 minute on 2 cores
    python reward.py --device cuda --batch-size 64 --steps 1000       # one GPU
    torchrun --nproc_per_node 8 reward.py --batch-size 256            # many GPUs, no code change

Implementation details:
1. The reward model is sft.pt with its language-model head swapped for a scalar head `score`
   (Qwen2ForSequenceClassification's name): every other weight is copied, `score` starts from
   N(0, 1/sqrt(hidden + 1)) as TRL does, so the first rewards are of order 1 and not all equal.
2. A reply is rendered as the assistant turn the policy would write (tokenizer.encode_reply), `reply<|im_end|>` after
   `<|im_start|>assistant\\n`, and the reward is the score at the LAST REAL token of prompt +
   reply, found from the attention mask (model.sequence_scores), never by looking for a pad id
   (the pad id is <|endoftext|>, a real token too).
3. Batches: random pairs each step (model.batch_indices, as sft.py), and the
   chosen and rejected replies of a batch are two forward passes (prompts left-padded, replies
   right-padded), so a short chosen reply is not padded to the length of a rambling rejected one.
   The held-out pairs are evaluated sorted by length for the same reason.
4. Loss, Bradley-Terry with an optional margin (Llama 2) and reward centering (Eisenstein et al.
   2023, TRL's center_rewards_coefficient): -log sigmoid(r_c - r_r - m) + c * mean((r_c + r_r)^2).
   Without centering only differences of rewards matter, so the reward's offset is arbitrary:
   the checkpoint stores the mean and std of the rewards of the chosen and rejected replies of
   `--stats-pairs` training pairs, which PPO uses to normalise scores.
5. Bad pairs are skipped and counted, never a crash mid-run: identical chosen and rejected (no
   preference), an empty or whitespace-only side (no reply to score; an evasive reply such as
   "?" is a real, scorable failure), and a prompt + reply longer than the context. A side that is
   not a string, or a margin that is not a number, is a malformed line: an error naming
   file:line. Nothing usable left is a one-line error.
6. The loss of a step is the sum over the pairs of the global batch divided by their count, so
   N ranks give the same loss as one process. Schedule, optimizer, clipping, DDP and progress
   line are sft.py's.
7. Before and after training: pairwise accuracy on the held-out pairs (data/prefs_eval.jsonl),
   overall and per rejected `kind`, so one sees which failures the reward model learned. A tie
   counts as wrong.
8. `--lora-rank r` trains a LoRA adapter on the trunk (sft.py detail 8) and the new score head in
   full: a fresh head has no weights to adapt (PEFT calls it a module to save). The checkpoint
   holds the merged weights, which PPO's critic starts from; `hf.py export` exports them.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import batch_indices, left_pad, right_pad, sequence_scores
from lora import add_lora
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tokenizer import Tokenizer


@dataclass
class Args:
    init: str = "out/sft.pt"
    """checkpoint to start from (from sft.py); its lm head is replaced by a scalar head"""
    data: str = "data/prefs.jsonl"
    """preference pairs, one {"prompt", "chosen", "rejected"} per line (optional "margin")"""
    eval_data: str = "data/prefs_eval.jsonl"
    """held-out preference pairs, for the before/after pairwise accuracy"""
    out: str = "out/reward.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    steps: int = 120
    """optimizer steps"""
    batch_size: int = 32
    """pairs per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 1
    """micro-batches per optimizer step (per rank)"""
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
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the model"""
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


def parse_args(cls):
    """argparse from a dataclass: each field is an option, the string under it is its help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:]) if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=docs.get(field.name))
        else:
            parser.add_argument(flag, type=field.type, default=field.default, help=docs.get(field.name))
    return cls(**vars(parser.parse_args()))


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
                raise ValueError(f"{path}:{line_no}: missing {', '.join(repr(k) for k in missing)}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def format_time(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


# detail 4: L = -log σ(r_c - r_r - m) + c · mean((r_c + r_r)²)
def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss (B,) from the rewards (B,) of the chosen and rejected replies."""
    difference = chosen_rewards - rejected_rewards - (0 if margin is None else margin)
    return -F.logsigmoid(difference) + center_coef * (chosen_rewards + rejected_rewards) ** 2


# detail 7: accuracy = mean(r_c > r_r), a tie counts as wrong
def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    return (chosen_rewards > rejected_rewards).float().mean().item()


# detail 1: the scalar-head model from an lm-head checkpoint
def reward_model_from(lm_model: Transformer, seed: int) -> Transformer:
    """The Transformer of `lm_model` with a fresh `score` head instead of `lm_head`."""
    config = ModelConfig(**{**dataclasses.asdict(lm_model.config), "head": "score"})
    reward_model = Transformer(config)
    weights = {k: v for k, v in lm_model.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = reward_model.load_state_dict(weights, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.normal_(reward_model.score.weight, std=1 / math.sqrt(config.hidden_size + 1),
                          generator=torch.Generator().manual_seed(seed))
    return reward_model.to(next(lm_model.parameters()).device)


# detail 2, 5: tokenize the pairs; skip and count the unusable ones
def preference_pairs(tokenizer: Tokenizer, records: list[dict], context: int, path: str) -> tuple[list[dict], dict]:
    """Token ids of each usable pair and the number of skipped pairs per reason."""
    pairs, skipped = [], {"identical": 0, "empty side": 0, "longer than the context": 0}
    for line_no, record in enumerate(records, 1):
        chosen, rejected, margin = record["chosen"], record["rejected"], record.get("margin", 0.0)
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{path}:{line_no}: 'chosen' and 'rejected' must be strings")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"{path}:{line_no}: 'margin' must be a number")
        if not chosen.strip() or not rejected.strip():
            skipped["empty side"] += 1
            continue
        if chosen.strip() == rejected.strip():
            skipped["identical"] += 1
            continue
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{line_no}: bad prompt ({e})") from None
        chosen_ids, rejected_ids = tokenizer.encode_reply(chosen), tokenizer.encode_reply(rejected)
        if len(prompt) + max(len(chosen_ids), len(rejected_ids)) > context:
            skipped["longer than the context"] += 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen_ids, "rejected": rejected_ids, "margin": float(margin),
                      "kind": str(record.get("kind", "all"))})
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({format_skipped(skipped)})")
    return pairs, skipped


def format_skipped(skipped: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in skipped.items())


# detail 3: chosen and rejected replies as two batches, each padded to its own longest reply
def pair_rewards(reward_model, pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B,), (B,) of the chosen and rejected replies."""
    prompt_ids, prompt_mask = left_pad([p["prompt"] for p in pairs], pad_id, device)              # (B, P)
    chosen_ids, chosen_mask = right_pad([p["chosen"] for p in pairs], pad_id, device)             # (B, Nc)
    rejected_ids, rejected_mask = right_pad([p["rejected"] for p in pairs], pad_id, device)       # (B, Nr)
    return (sequence_scores(reward_model, prompt_ids, prompt_mask, chosen_ids, chosen_mask),
            sequence_scores(reward_model, prompt_ids, prompt_mask, rejected_ids, rejected_mask))


@torch.no_grad()
def all_pair_rewards(reward_model, pairs: list[dict], pad_id: int, device, batch_size: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_rewards over many pairs, in eval mode, in batches."""
    was_training = reward_model.training
    reward_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with autocast:
            c, r = pair_rewards(reward_model, pairs[start : start + batch_size], pad_id, device)
        chosen.append(c.float())
        rejected.append(r.float())
    reward_model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


# detail 7: held-out pairwise accuracy
def heldout_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, kinds: list[str]) -> dict:
    """Pairwise accuracy, overall and per rejected kind, and the mean reward margin."""
    result = {"accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
              "margin": (chosen_rewards - rejected_rewards).mean().item()}
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds], device=chosen_rewards.device)
        result[f"accuracy/{kind}"] = pairwise_accuracy(chosen_rewards[rows], rejected_rewards[rows])
    return result


def format_pairs(result: dict) -> str:
    kinds = " ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in result.items() if k.startswith("accuracy/"))
    return f"pairwise accuracy {result['accuracy']:.1%} ({kinds}) | margin {result['margin']:.2f}"


def main(args: Args):
    # -------------------------------------------------------------- distributed, device, dtype
    ddp = "RANK" in os.environ  # set by torchrun
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (--device auto picks what there is)")
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    device_type = "cuda" if args.device.startswith("cuda") else args.device
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if args.dtype not in ("bfloat16", "float32") or args.steps < 1:
        raise ValueError(f"--dtype must be auto, bfloat16 or float32 (got {args.dtype!r}) and --steps at least 1 (got {args.steps})")
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x --grad-accum = {world * args.grad_accum}")
    micro_batch = args.batch_size // (world * args.grad_accum)

    # -------------------------------------------------------------- data and model
    lm_model, tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")
    reward_model = reward_model_from(lm_model, args.seed)  # detail 1
    if args.lora_rank:  # detail 8: an adapter on the trunk, the new score head trained in full
        add_lora(reward_model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        reward_model.score.requires_grad_(True)
    del lm_model
    context = reward_model.config.max_position_embeddings
    pairs, skipped = preference_pairs(tokenizer, read_jsonl(args.data, ("prompt", "chosen", "rejected")), context, args.data)
    if len(pairs) < args.batch_size:
        raise ValueError(f"{args.data}: {len(pairs)} usable pairs, fewer than --batch-size {args.batch_size}")
    eval_pairs, eval_skipped = preference_pairs(tokenizer, read_jsonl(args.eval_data, ("prompt", "chosen", "rejected")),
                                                context, args.eval_data)
    eval_pairs.sort(key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))  # detail 3
    kinds = [p["kind"] for p in eval_pairs]
    optimizer = reward_model.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    model = torch.compile(reward_model) if args.compile else reward_model
    if ddp:
        model = DDP(model, device_ids=[torch.device(args.device).index] if device_type == "cuda" else None)

    # -------------------------------------------------------------- the training loop
    if master:  # detail 7: held-out accuracy before training
        before = heldout_metrics(*all_pair_rewards(reward_model, eval_pairs, tokenizer.pad_id, args.device, args.eval_batch_size,
                                                   autocast), kinds)
        print(f"reward | {len(pairs)} pairs ({format_skipped(skipped)} skipped), {len(eval_pairs)} held out "
              f"({format_skipped(eval_skipped)} skipped), {world} process(es) on {args.device} in {args.dtype}")
        print(f"reward | before: {format_pairs(before)}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [pairs[i] for i in batch_indices(len(pairs), args.batch_size, args.seed, step)][rank::world]
        stats = torch.zeros(3, device=args.device)  # loss, correct pairs, margin sum over the global batch
        for micro in range(args.grad_accum):
            rows = batch[micro * micro_batch : (micro + 1) * micro_batch]
            margin = torch.tensor([p["margin"] for p in rows], device=args.device)
            tokens_seen += sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in rows) * world
            no_sync = model.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext  # sync on the last micro-step
            with no_sync(), autocast:
                chosen_rewards, rejected_rewards = pair_rewards(model, rows, tokenizer.pad_id, args.device)  # (b,), (b,)
                loss = reward_loss(chosen_rewards, rejected_rewards, margin, args.center_coef).sum() / args.batch_size  # detail 6
            with no_sync():
                (loss * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            stats += torch.stack([loss.detach(), (chosen_rewards > rejected_rewards).sum().float(),
                                  (chosen_rewards - rejected_rewards).detach().sum()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            if ddp:
                dist.all_reduce(stats)
            if master:
                loss, accuracy, margin = stats[0].item(), stats[1].item() / args.batch_size, stats[2].item() / args.batch_size
                now = time.time()
                elapsed, rate = now - start_time, step / (now - start_time)
                tok_per_s, tokens_seen, last_time = tokens_seen / (now - last_time), 0, now
                print(f"reward | step {step}/{args.steps} | loss {loss:.4f} | accuracy {accuracy:.1%} | margin {margin:.2f} | "
                      f"lr {lr:.1e} | {tok_per_s / 1e3:.1f}k tok/s | {format_time(elapsed)} elapsed, {format_time((args.steps - step) / rate)} left")
                log_file.write(json.dumps({"step": step, "loss": loss, "accuracy": accuracy, "margin": margin, "lr": lr,
                                           "tok_per_s": tok_per_s}) + "\n")
                log_file.flush()

    if master:
        after = heldout_metrics(*all_pair_rewards(reward_model, eval_pairs, tokenizer.pad_id, args.device, args.eval_batch_size,
                                                  autocast), kinds)
        # detail 4: the mean and std of the rewards of training replies, chosen and rejected, for PPO's normalisation
        sample = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))[: args.stats_pairs].tolist()
        rewards = torch.cat(all_pair_rewards(reward_model, [pairs[i] for i in sample], tokenizer.pad_id, args.device,
                                             args.eval_batch_size, autocast))
        save_checkpoint(args.out, reward_model, tokenizer, "reward", parent=args.init, step=step, args=dataclasses.asdict(args),
                        metrics={"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                                 "before": before, "after": after, "skipped": skipped})
        print(f"reward | done in {format_time(time.time() - start_time)} | training rewards: mean {rewards.mean().item():.3f}, "
              f"std {rewards.std().item():.3f} (stored for PPO)")
        print(f"reward | before: {format_pairs(before)}")
        print(f"reward | after:  {format_pairs(after)} | wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
