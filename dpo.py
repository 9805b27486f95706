"""
dpo.py: Direct Preference Optimization of the policy on preference pairs against a frozen reference.

No reward model and no sampling: the policy's log-probs of the chosen and rejected replies, relative
to the reference's, are the reward.

    out/sft.pt + data/prefs.jsonl  ->  out/dpo.pt

Run (after `python sft.py`):

    python dpo.py                                         # CPU defaults, ~1 minute on 2 cores
    python dpo.py --loss-type ipo --beta 0.5              # IPO; also hinge, robust
    python dpo.py --device cuda --batch-size 64 --steps 1000 --precompute-ref     # one GPU
    torchrun --nproc_per_node 8 dpo.py --batch-size 256               # many GPUs, no code change

Implementation details:
1. The policy and the reference both start as sft.pt; the reference is frozen. With
   `--precompute-ref` the reference log-probs of every pair the run will see are computed once,
   by the policy itself before its first step (it IS the reference then), and no second model
   is held in memory.
2. A reply is rendered as the assistant turn the policy writes (tokenizer.encode_reply), `reply<|im_end|>` after
   `<|im_start|>assistant\\n`; log pi(reply | prompt) is the SUM of the per-token log-probs of
   the reply tokens and the closing <|im_end|> (model.shared_prompt_logprobs, temperature 1):
   prompt and padding tokens contribute nothing, and padding changes nothing.
3. Batches: random pairs each step (model.batch_indices, as sft.py). The
   prompts of a batch run once (left-padded) into a KV cache, and the chosen and the rejected
   replies (right-padded) run on top of it as two passes, so a short chosen reply is not padded to
   the length of a rambling rejected one and no prompt is computed twice (TRL concatenates them
   into one batch of 2B rows, each prompt twice, most chosen replies padded to the rejected's length).
4. Losses, on h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
     sigmoid  -(1-e) log s(b h) - e log s(-b h)         DPO, Rafailov et al. 2023 (e > 0: cDPO)
     robust   (-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)   rDPO, Chowdhury et al. 2024
     hinge    max(0, 1 - b h)                            SLiC, Zhao et al. 2023
     ipo      (h - 1/(2b))^2                             IPO, Azar et al. 2023, on summed log-probs
   TRL's IPO divides each log-ratio by its reply's token count, so one beta sets another target margin
   there; `--ipo-length-normalized` is TRL's form. e > 0 smooths the sigmoid loss as TRL did up to 0.28
   (newer TRL's sigmoid ignores label_smoothing).
5. The implicit rewards b (log pi - log ref) of the chosen and rejected replies are logged as
   rewards/chosen, rewards/rejected, their difference as the margin and the share of pairs whose
   margin is > 0 as the accuracy (TRL's names; a tie counts as wrong, so it is 0 at step 0).
6. Bad pairs are skipped and counted as in reward.py: identical sides, an empty or
   whitespace-only side, a prompt + reply longer than the context; a non-string side is an error
   naming file:line, and nothing usable left is a one-line error.
7. Before and after, on held-out data: the preference accuracy on data/prefs_eval.jsonl, the share
   of pairs where the model finds the chosen reply more likely than the rejected one (the
   reference before, the policy after; per rejected kind); the implicit-reward accuracy, the
   share of pairs with a positive margin (0 before by construction: the policy is the reference,
   every margin is 0); and the task accuracy of greedy replies on data/eval.jsonl, so one sees
   whether DPO helped the task, not only the pairs.
8. The schedule, optimizer, clipping, DDP and progress line are sft.py's; the loss of a step is
   the sum over the pairs of the global batch divided by their count.
9. `--lora-rank r` trains a LoRA adapter instead of every weight (sft.py detail 8), and the
   reference is then the policy itself with its adapter switched off (model.lora_disabled): the
   frozen base, with no second copy of the model in memory, as TRL does with a PEFT model.
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

from engine import batch_indices, format_accuracy, heldout_accuracy, left_pad, right_pad, shared_prompt_logprobs
from lora import add_lora, lora_disabled
from model import load_checkpoint, save_checkpoint
from tokenizer import Tokenizer

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


@dataclass
class Args:
    init: str = "out/sft.pt"
    """policy and reference to start from (from sft.py)"""
    data: str = "data/prefs.jsonl"
    """preference pairs, one {"prompt", "chosen", "rejected"} per line"""
    eval_data: str = "data/prefs_eval.jsonl"
    """held-out preference pairs, for the before/after preference accuracy"""
    task_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the before/after task accuracy"""
    out: str = "out/dpo.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), robust (rDPO), hinge (SLiC) or ipo (IPO)"""
    beta: float = 0.1
    """strength of the pull towards the reference (higher = stay closer)"""
    label_smoothing: float = 0.0
    """assumed share of flipped labels, for sigmoid (cDPO) and robust; below 0.5"""
    ipo_length_normalized: bool = False
    """ipo only: divide each reply's log-ratio by its token count first (TRL's IPO; beta then counts per token)"""
    precompute_ref: bool = False
    """compute the reference log-probs once before training and hold no reference model"""
    steps: int = 100
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
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the model"""
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


# detail 4: h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)); the loss is a function of β h
def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
             ref_logp_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards (B,), (B,) of the chosen and rejected replies; with the
    token counts (B,) of the replies, ipo divides each log-ratio by its count (TRL's IPO)."""
    h = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)                  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":  # -(1-ε) log σ(βh) - ε log σ(-βh)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":  # (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":  # max(0, 1 - βh)
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":  # (h - 1/(2β))²
        if chosen_tokens is not None:  # detail 4: --ipo-length-normalized, log-ratios per token
            h = (logp_chosen - ref_logp_chosen) / chosen_tokens - (logp_rejected - ref_logp_rejected) / rejected_tokens
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    # detail 5: implicit rewards r = β (log π - log π_ref)
    chosen_rewards = beta * (logp_chosen - ref_logp_chosen).detach()
    rejected_rewards = beta * (logp_rejected - ref_logp_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# detail 2, 3: log π(reply | prompt) summed over the reply tokens
def pair_logps(model, pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (B,), (B,) of the chosen and rejected replies."""
    prompt_ids, prompt_mask = left_pad([p["prompt"] for p in pairs], pad_id, device)              # (B, P)
    chosen_ids, chosen_mask = right_pad([p["chosen"] for p in pairs], pad_id, device)             # (B, Nc)
    rejected_ids, rejected_mask = right_pad([p["rejected"] for p in pairs], pad_id, device)       # (B, Nr)
    chosen, rejected = shared_prompt_logprobs(model, prompt_ids, prompt_mask, [(chosen_ids, chosen_mask),
                                                                                (rejected_ids, rejected_mask)])
    return chosen.sum(dim=1), rejected.sum(dim=1)


@torch.no_grad()
def all_pair_logps(model, pairs: list[dict], pad_id: int, device, batch_size: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps over many pairs, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with autocast:
            c, r = pair_logps(model, pairs[start : start + batch_size], pad_id, device)
        chosen.append(c.float())
        rejected.append(r.float())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


# detail 7: held-out preference accuracy
def preference_metrics(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, kinds: list[str], beta: float) -> dict:
    """accuracy: log π(c) > log π(r); implicit_accuracy: β log π/π_ref(c) > β log π/π_ref(r); both overall
    and per kind; margin: the mean implicit reward margin."""
    _, chosen_rewards, rejected_rewards = dpo_loss(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta)
    prefers_chosen = (logp_chosen > logp_rejected).float()                   # (B,)
    implicit_prefers_chosen = (chosen_rewards > rejected_rewards).float()    # (B,) all 0 when policy = reference
    result = {"accuracy": prefers_chosen.mean().item(), "implicit_accuracy": implicit_prefers_chosen.mean().item(),
              "margin": (chosen_rewards - rejected_rewards).mean().item()}
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds], device=prefers_chosen.device)
        result[f"accuracy/{kind}"] = prefers_chosen[rows].mean().item()
        result[f"implicit_accuracy/{kind}"] = implicit_prefers_chosen[rows].mean().item()
    return result


def format_pairs(result: dict) -> str:
    kinds = " ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in result.items() if k.startswith("accuracy/"))
    return (f"preference accuracy {result['accuracy']:.1%} ({kinds}) | implicit reward accuracy "
            f"{result['implicit_accuracy']:.1%}, margin {result['margin']:.2f}")


# detail 6: tokenize the pairs; skip and count the unusable ones
def preference_pairs(tokenizer: Tokenizer, records: list[dict], context: int, path: str) -> tuple[list[dict], dict]:
    """Token ids of each usable pair and the number of skipped pairs per reason."""
    pairs, skipped = [], {"identical": 0, "empty side": 0, "longer than the context": 0}
    for line_no, record in enumerate(records, 1):
        chosen, rejected = record["chosen"], record["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{path}:{line_no}: 'chosen' and 'rejected' must be strings")
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
        pairs.append({"prompt": prompt, "chosen": chosen_ids, "rejected": rejected_ids, "kind": str(record.get("kind", "all"))})
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({format_skipped(skipped)})")
    return pairs, skipped


def format_skipped(skipped: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in skipped.items())


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
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.ipo_length_normalized and args.loss_type != "ipo":
        raise ValueError(f"--ipo-length-normalized applies to --loss-type ipo, got {args.loss_type!r}")
    if args.beta <= 0:  # the strength of the KL to the reference; IPO divides by it
        raise ValueError(f"--beta must be > 0, got {args.beta}")

    # -------------------------------------------------------------- data and models
    policy, tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")
    if args.lora_rank:  # detail 9: only the adapter trains
        add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    context = policy.config.max_position_embeddings
    pairs, skipped = preference_pairs(tokenizer, read_jsonl(args.data, ("prompt", "chosen", "rejected")), context, args.data)
    if len(pairs) < args.batch_size:
        raise ValueError(f"{args.data}: {len(pairs)} usable pairs, fewer than --batch-size {args.batch_size}")
    eval_pairs, eval_skipped = preference_pairs(tokenizer, read_jsonl(args.eval_data, ("prompt", "chosen", "rejected")),
                                                context, args.eval_data)
    eval_pairs.sort(key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))  # detail 3
    task_records = read_jsonl(args.task_data, ("prompt", "answer"))
    pad_id, kinds = tokenizer.pad_id, [p["kind"] for p in eval_pairs]
    # detail 1: the reference log-probs; the policy is the reference until its first step
    ref_eval = all_pair_logps(policy, eval_pairs, pad_id, args.device, args.eval_batch_size, autocast) if master else None
    reference = None
    if args.precompute_ref:  # only the pairs this rank will see
        mine = sorted({i for step in range(args.steps) for i in batch_indices(len(pairs), args.batch_size, args.seed, step)[rank::world]})
        ref_chosen = torch.full((len(pairs),), float("nan"), device=args.device)
        ref_rejected = torch.full((len(pairs),), float("nan"), device=args.device)
        ref_chosen[mine], ref_rejected[mine] = all_pair_logps(policy, [pairs[i] for i in mine], pad_id, args.device,
                                                             args.eval_batch_size, autocast)
    elif args.lora_rank:  # detail 9: the reference is the policy with its adapter off
        reference = policy
    else:
        reference, _, _ = load_checkpoint(args.init, device=args.device, head="lm")
        reference.eval().requires_grad_(False)
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    model = torch.compile(policy) if args.compile else policy
    if ddp:
        model = DDP(model, device_ids=[torch.device(args.device).index] if device_type == "cuda" else None)

    # -------------------------------------------------------------- the training loop
    if master:  # detail 7: held-out preference and task accuracy before training
        before = {"pairs": preference_metrics(*ref_eval, *ref_eval, kinds, args.beta),
                  "task": heldout_accuracy(policy, tokenizer, task_records, args.max_new_tokens)}
        print(f"dpo | {len(pairs)} pairs ({format_skipped(skipped)} skipped), {len(eval_pairs)} held out "
              f"({format_skipped(eval_skipped)} skipped), {world} process(es) on {args.device} in {args.dtype}, "
              f"{args.loss_type} loss, beta {args.beta}, reference {'precomputed' if args.precompute_ref else 'the policy, adapter off' if args.lora_rank else 'model'}")
        print(f"dpo | before: {format_pairs(before['pairs'])}")
        print(f"dpo | before: task {format_accuracy(before['task'])}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    model.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_indices(len(pairs), args.batch_size, args.seed, step)[rank::world]
        stats = torch.zeros(5, device=args.device)  # loss, rewards/chosen, rewards/rejected, correct, margin: global sums
        for micro in range(args.grad_accum):
            indices = batch[micro * micro_batch : (micro + 1) * micro_batch]
            rows = [pairs[i] for i in indices]
            tokens_seen += sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in rows) * world
            if reference is None:
                ref_logp_chosen, ref_logp_rejected = ref_chosen[indices], ref_rejected[indices]  # (b,), (b,)
            else:
                with torch.no_grad(), autocast, lora_disabled(reference):
                    ref_logp_chosen, ref_logp_rejected = pair_logps(reference, rows, pad_id, args.device)
            no_sync = model.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext  # sync on the last micro-step
            tokens = ([torch.tensor([len(p[side]) for p in rows], device=args.device) for side in ("chosen", "rejected")]
                      if args.ipo_length_normalized else [None, None])  # detail 4: reply + <|im_end|> token counts
            with no_sync(), autocast:
                logp_chosen, logp_rejected = pair_logps(model, rows, pad_id, args.device)  # (b,), (b,)
                losses, chosen_rewards, rejected_rewards = dpo_loss(logp_chosen, logp_rejected, ref_logp_chosen.float(),
                                                                    ref_logp_rejected.float(), args.beta, args.loss_type,
                                                                    args.label_smoothing, *tokens)
                loss = losses.sum() / args.batch_size  # detail 8: its share of the global mean
            with no_sync():
                (loss * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            stats += torch.stack([loss.detach(), chosen_rewards.sum(), rejected_rewards.sum(),
                                  (chosen_rewards > rejected_rewards).sum().float(), (chosen_rewards - rejected_rewards).sum()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            if ddp:
                dist.all_reduce(stats)
            if master:
                loss, chosen, rejected, accuracy, margin = stats[0].item(), *(stats[1:] / args.batch_size).tolist()
                now = time.time()
                elapsed, rate = now - start_time, step / (now - start_time)
                tok_per_s, tokens_seen, last_time = tokens_seen / (now - last_time), 0, now
                print(f"dpo | step {step}/{args.steps} | loss {loss:.4f} | rewards/chosen {chosen:+.3f} | rewards/rejected "
                      f"{rejected:+.3f} | accuracy {accuracy:.1%} | margin {margin:.3f} | lr {lr:.1e} | {tok_per_s / 1e3:.1f}k tok/s | "
                      f"{format_time(elapsed)} elapsed, {format_time((args.steps - step) / rate)} left")
                log_file.write(json.dumps({"step": step, "loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected,
                                           "rewards/accuracy": accuracy, "rewards/margin": margin, "lr": lr,
                                           "tok_per_s": tok_per_s}) + "\n")
                log_file.flush()

    if master:
        logp_eval = all_pair_logps(policy, eval_pairs, pad_id, args.device, args.eval_batch_size, autocast)
        after = {"pairs": preference_metrics(*logp_eval, *ref_eval, kinds, args.beta),
                 "task": heldout_accuracy(policy, tokenizer, task_records, args.max_new_tokens)}
        save_checkpoint(args.out, policy, tokenizer, "dpo", parent=args.init, step=step, args=dataclasses.asdict(args),
                        metrics={"before": before, "after": after, "skipped": skipped})
        print(f"dpo | done in {format_time(time.time() - start_time)}")
        print(f"dpo | before: {format_pairs(before['pairs'])}")
        print(f"dpo | after:  {format_pairs(after['pairs'])}")
        print(f"dpo | before: task {format_accuracy(before['task'])}")
        print(f"dpo | after:  task {format_accuracy(after['task'])} | wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
