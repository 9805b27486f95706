"""
grpo.py: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300), verifiable reward.

Run (after `python sft.py`), out/sft.pt + data/prompts.jsonl -> out/grpo.pt:

    python grpo.py                                                  # CPU defaults
    python grpo.py --device cuda --prompts-per-step 64 --group-size 16 --steps 500    # one GPU
    torchrun --nproc_per_node 8 grpo.py --prompts-per-step 256                       # many GPUs

Implementation details:
1. Rollout (engine.rollout): `group_size` replies to each of `prompts_per_step` prompts, in adjacent
   rows of one rank, each prompt run once; prompts with no room for `max_new_tokens` are skipped.
2. Old log-probs: the loss's own call after sampling (ratio 1 at first); 1 iteration: logp detached.
3. Reward = [final answer == answer] + reward_weight * a learned reward (normalised by its stored
   mean and std) - length_penalty * length / max_new_tokens.
4. A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), unbiased std (as TRL); `--scale-rewards
   batch` divides by the global batch's std, `none` only centres (Dr. GRPO, arXiv:2503.20783).
5. L_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3, k3 = exp(ref - logp)
   - (ref - logp) - 1 >= 0 (Schulman's KL estimator). `--eps-high 0.28`: DAPO's clip-higher.
6. `--loss-type grpo` averages each reply over its tokens, then the replies; `dapo` averages over
   the global batch's tokens; `dr_grpo` divides the sum by replies x max_new_tokens (Dr. GRPO).
   `--mask-truncated` leaves out replies that never ended (overlong filtering, arXiv:2503.14476).
7. `iterations` optimizer steps per batch of samples (mu); with 1, REINFORCE with a group baseline.
8. Logged: reward, accuracy, think rate, KL to the reference (a reply's summed log-ratio), clip,
   entropy, length, "equal" (share of groups with equal rewards); held-out accuracy before, after.
9. `--lora-rank r` trains a LoRA adapter; the reference is the policy with it off (as TRL with
   PEFT). Its dropout must be 0: replies sampled under one mask, trained under another.
10. `--save-samples`: the trained policy's own replies, 4 to each of `sample_prompts` prompts,
   for the labeler (`python data.py label`) in iterative RL (DeepSeekMath 4.1.4; iterate.sh).
11. `--process-reward`: P(step right) per step, normalised over the group's steps; a token's
   advantage sums those at or after it (DeepSeekMath 4.1.3). No answers unless --process-outcome.
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

from engine import (all_gathered, batch_indices, completion_logprobs, encode_prompts,
                    format_accuracy, heldout_accuracy, judge_replies, load_policy, load_reward,
                    masked_mean, process_advantages, rollout, save_samples, step_end_mask)
from model import save_checkpoint


@dataclass
class Args:
    init: str = "out/sft.pt"
    """policy to train, and the frozen reference (from sft.py)"""
    data: str = "data/prompts.jsonl"
    """prompts with answers, one {"prompt", "answer"} per line"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the before/after accuracy"""
    out: str = "out/grpo.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    reward_model: str = ""
    """optional learned reward (from reward.py) added to the verifiable one"""
    reward_weight: float = 1.0
    """weight of the normalised learned reward"""
    length_penalty: float = 0.0
    """subtracted from the reward times the reply length / max_new_tokens"""
    process_reward: str = ""
    """a process reward model (reward.py --process): per-step rewards instead (detail 11)"""
    process_outcome: bool = False
    """with --process-reward: add the outcome advantage (details 3, 4) on top"""
    steps: int = 12
    """optimizer steps = steps x iterations; one batch of samples per step"""
    prompts_per_step: int = 16
    """prompts sampled per step, summed over ranks"""
    group_size: int = 8
    """replies sampled per prompt (G)"""
    max_new_tokens: int = 48
    """reply length limit, for sampling and for the held-out evaluation"""
    temperature: float = 1.0
    """sampling temperature; the loss divides the logits by the same value"""
    iterations: int = 2
    """optimizer steps per batch of samples (mu)"""
    lr: float = 5e-4
    """peak learning rate"""
    warmup: int = 5
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    beta: float = 0.1
    """weight of the k3 KL to the reference (0 = none; DeepSeekMath 0.04: it let chat drift here)"""
    eps_low: float = 0.2
    """the ratio is clipped below at 1 - eps_low"""
    eps_high: float = 0.2
    """the ratio is clipped above at 1 + eps_high (0.28 = DAPO clip-higher)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide the advantages by the std of the group, of the global batch, or not (detail 4)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """loss aggregation: per reply, then over replies; over all tokens; / (B x max_new_tokens)"""
    mask_truncated: bool = False
    """leave replies that never emitted <|im_end|> out of the loss"""
    log_every: int = 5
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
    """random seed (prompt order and sampling)"""
    lora_rank: int = 0
    """LoRA: rank of the trained update of each target layer (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA: the update is scaled by alpha / rank"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input (must be 0 here: detail 9)"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """LoRA: the layers that get an adapter (add gate_proj,up_proj,down_proj for the MLP too)"""
    save_samples: str = ""
    """after training, write replies sampled from the policy to this JSONL file (detail 10)"""
    sample_prompts: int = 1000
    """prompts of --data (drawn by --seed) that --save-samples replies to, 4 replies each"""


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


# ----------------------------------------------------------------------------- ALGO LOGIC: GRPO

# detail 3: r = [final answer == answer] + reward_weight * score - length_penalty * len / max_len
def grpo_rewards(correct, scores, lengths, reward_weight, length_penalty, max_new_tokens):
    """correct, lengths (B,), scores (B,) or None -> rewards (B,)."""
    rewards = correct + reward_weight * scores if scores is not None else correct
    return rewards - length_penalty * lengths / max_new_tokens


# detail 4: A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
def grpo_advantages(rewards, group_size, scale="group", eps=1e-4):
    """rewards (B,), the G replies of a prompt in adjacent rows -> advantages (B,)."""
    grouped = rewards.view(-1, group_size)                       # (prompts, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"--scale-rewards must be group, batch or none, got {scale!r}")
    return advantages.flatten()


# detail 5: k3 = exp(ref - logp) - (ref - logp) - 1, unbiased for KL(policy || reference), >= 0
def k3_kl(logp, ref_logp):
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


# detail 5: L_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3
def grpo_token_loss(logp, old_logp, advantages, eps_low, eps_high, ref_logp=None, beta=0.0):
    """Per-token loss (B, N) and where the clip removed the gradient (B, N); advantages (B,)."""
    ratio = torch.exp(logp - old_logp)                           # (B, N)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, N)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    clipped = (((ratio > 1 + eps_high) & (advantages > 0))
               | ((ratio < 1 - eps_low) & (advantages < 0)))
    return (-surrogate + beta * k3_kl(logp, ref_logp) if beta > 0 else -surrogate), clipped


# detail 6: grpo: mean_i (sum_t L_it / |o_i|);  dapo: sum_it L_it / sum_i |o_i|;
#           dr_grpo: sum_it L_it / (B * max_new_tokens)
def aggregate_loss(token_loss, loss_mask, loss_type, max_new_tokens):
    masked = token_loss * loss_mask                              # (B, N): 0 after EOS, on padding
    if loss_type == "grpo":
        return (masked.sum(dim=1) / loss_mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return masked.sum() / loss_mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (loss_mask.shape[0] * max_new_tokens)
    raise ValueError(f"--loss-type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def main(args: Args):
    if args.group_size < 2:
        raise ValueError(f"--group-size {args.group_size}: a group needs at least 2 replies")
    if args.temperature <= 0:  # the loss divides the logits by it
        raise ValueError(f"--temperature {args.temperature}: GRPO samples, so it must be > 0")
    if args.lora_dropout:  # detail 9
        raise ValueError(f"--lora-dropout {args.lora_dropout}: must be 0 (see detail 9)")
    ddp, rank, world, device_type, autocast = setup(args)
    master, G = rank == 0, args.group_size
    torch.manual_seed(args.seed)
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step}: not divisible by {world}")
    lora = (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    policy, tokenizer, reference, as_reference = load_policy(args.init, args.device, lora,
                                                             with_reference=args.beta > 0)
    reward, process = (load_reward(path, tokenizer, args.device, kind) if path else None  # 3, 11
                       for path, kind in ((args.reward_model, False), (args.process_reward, True)))
    context = policy.config.max_position_embeddings
    no_key = reward or (process and not args.process_outcome)  # detail 3: answers not needed
    data = read_jsonl(args.data, ("prompt",) if no_key else ("prompt", "answer"))
    records, too_long = encode_prompts(tokenizer, data, args.max_new_tokens, context, args.data,
                                       args.prompts_per_step)
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    policy.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    model = torch.compile(policy) if args.compile else policy
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    model = DDP(model, device_ids=device_ids) if ddp and not args.fsdp else model
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)  # ranks differ
    if master:  # detail 8: held-out accuracy before training
        before = heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens)
        print(f"grpo | {len(records)} prompts ({too_long} too long for the context), "
              f"{args.prompts_per_step} x {G} replies per step, {world} process(es) on "
              f"{args.device} in {args.dtype}"
              + (", reference the policy, adapter off" if reference is policy else ""))
        print(f"grpo | before: {format_accuracy(before)}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(policy, optimizer, bf16=args.dtype == "bfloat16")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(len(records), args.prompts_per_step, args.seed, step)[rank::world]
        prompts, answers = zip(*[records[i] for i in indices for _ in range(G)])  # groups adjacent

        # ---------------------------------------------------------- rollout (detail 1, 2)
        with torch.no_grad(), autocast:  # with one iteration, old_logp is the loss's own, detached
            batch, old_logp, ref_logp = rollout(policy, tokenizer, prompts, args.max_new_tokens,
                                                args.temperature, sampler, reference, as_reference,
                                                G, old_logp=args.iterations > 1)
            scores = reward(batch) if reward else None
            step_rewards = process(batch) if process else None                         # (B, N)
        prompt_ids, _, completion_ids, completion_mask = batch
        tokens_seen += (prompt_ids.numel() + completion_ids.numel()) * world

        # ---------------------------------------------------------- rewards, advantages (3, 4)
        correct, ended, accuracy, think = judge_replies(tokenizer, *batch[2:], answers)
        lengths = completion_mask.sum(dim=1)                                             # (B,)
        rewards = grpo_rewards(correct, scores, lengths, args.reward_weight, args.length_penalty,
                               args.max_new_tokens)
        all_rewards = all_gathered(rewards) if ddp else rewards  # the global batch's
        advantages = grpo_advantages(all_rewards, G, args.scale_rewards).view(world, -1)[rank]
        if process:  # detail 11: per-token advantages (B, N); a rank holds whole groups
            by_steps = process_advantages(step_rewards, step_end_mask(tokenizer, *batch[2:]), G)
            advantages = by_steps + advantages[:, None] * args.process_outcome
        equal_groups = (all_rewards.view(-1, G).diff(dim=1) == 0).all(dim=1).float().mean()
        loss_mask = completion_mask * ended[:, None] if args.mask_truncated else completion_mask
        scale = (loss_mask.sum() * world / all_gathered(loss_mask.sum()[None]).sum().clamp(min=1)
                 if ddp and args.loss_type == "dapo" else 1.0)  # detail 6: the global token mean

        # ---------------------------------------------------------- optimisation (detail 5, 6, 7)
        model.train()
        loss_sum = clip_sum = entropy_sum = 0.0
        for iteration in range(args.iterations):
            with autocast:
                logp, entropy = completion_logprobs(model, *batch, temperature=args.temperature,
                                                    return_entropy=True, group_size=G)  # (B, N)
                if iteration == 0 and old_logp is None:
                    old_logp = logp.detach()
                token_loss, clipped = grpo_token_loss(logp, old_logp, advantages, args.eps_low,
                                                      args.eps_high, ref_logp, args.beta)
                loss = aggregate_loss(token_loss, loss_mask, args.loss_type,
                                      args.max_new_tokens) * scale
            loss.backward()  # DDP averages the gradients over ranks
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clip_sum += masked_mean(clipped, loss_mask).item()  # over the tokens trained on
            entropy_sum += masked_mean(entropy.detach(), loss_mask).item()
            loss_sum += loss.item()
        step += 1

        # ---------------------------------------------------------- metrics (detail 8)
        kl = (old_logp - ref_logp).sum(dim=1).mean().item() if reference is not None else 0.0
        metrics = {"loss": loss_sum / args.iterations, "reward": rewards.mean().item(),
                   "accuracy": accuracy, "think": think, "kl": kl,
                   "clip": clip_sum / args.iterations, "entropy": entropy_sum / args.iterations,
                   "length": lengths.mean().item(), "equal": equal_groups.item(),
                   **({"process": step_rewards.sum(dim=1).mean().item()} if process else {})}
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("grpo", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()

    policy = gathered(policy) if args.fsdp else policy  # all ranks gather
    if master:
        after = heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens)
        save_checkpoint(args.out, policy, tokenizer, "grpo", parent=args.init, step=step,
                        args=dataclasses.asdict(args), metrics={"before": before, "after": after})
        print(f"grpo | done in {format_time(time.time() - start_time)}")
        print(f"grpo | before: {format_accuracy(before)}")
        print(f"grpo | after:  {format_accuracy(after)} | wrote {args.out}")
        if args.save_samples:  # detail 10
            count = save_samples(args.save_samples, policy, tokenizer, data, args.sample_prompts,
                                 args.max_new_tokens, args.temperature, sampler, args.seed)
            print(f"grpo | wrote 4 replies to each of {count} prompts to {args.save_samples}")
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
