"""
ppo.py: RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT, arXiv:2203.02155).

    out/sft.pt + out/reward.pt + data/prompts.jsonl  ->  out/ppo.pt

Run (after `python sft.py` and `python reward.py`):

    python ppo.py                                                   # CPU defaults
    python ppo.py --device cuda --prompts-per-step 256 --minibatches 4 --steps 500   # one GPU
    torchrun --nproc_per_node 8 ppo.py --prompts-per-step 1024                      # many GPUs
    python ppo.py --adaptive-kl --kl-target 0.5           # Ziegler et al.'s adaptive KL controller

Implementation details:
1. Rollout, as grpo.py: `prompts_per_step` prompts a step (engine.batch_indices), one reply each,
   sampled with the KV cache; old log-probs come from the loss's own call (logits / temperature)
   after sampling, so the ratio starts at exactly 1.
2. Four models, as TRL's PPOTrainer: the policy and a frozen reference from sft.pt, a frozen reward
   model and a value model (critic) from reward.pt; the critic has its own trunk.
3. Score = the reward model at the last real token, normalised with reward.py's mean and std; a
   reply that never emitted <|im_end|> loses `missing_eos_penalty` (TRL's).
4. r_t = -kl_coef (logp_t - ref_logp_t) at every reply token, + the score at the last real token
   (Ziegler et al.): the KL is in the reward, not in the loss. `--adaptive-kl` steers kl_coef
   towards kl_target (proportional, error clipped to +-0.2).
5. GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, R_t = A_t + V_t,
   0 past the last real token; then A is whitened over the real tokens (TRL's masked_whiten).
6. Policy loss: token mean of -min(ratio A, clip(ratio, 1 +- clip) A); value loss: 0.5 token mean
   of max((V - R)^2, (V_old + clip(V - V_old, +-vf_clip) - R)^2); loss = policy + vf_coef * value.
7. `ppo_epochs` passes in `minibatches` shuffled minibatches; the step stops early once the
   approximate KL to the rollout policy, mean((ratio - 1) - log ratio), averaged over ranks,
   exceeds `target_kl` (CleanRL).
8. Logged: score, accuracy (the true answers, never shown to the reward model), think rate, KL to
   the reference (summed log-ratio of a reply), clip fraction, approximate KL, value loss,
   explained variance, entropy, length, updates, kl_coef.
9. Prompts that leave no room for `max_new_tokens` in the context are skipped and counted.
10. Before and after: greedy held-out accuracy on data/eval.jsonl (did it learn the task or to
   please the reward model?) and the mean score of those replies.
11. `--lora-rank r` trains a LoRA adapter on the policy (the critic trains in full, as in TRL); the
   reference is the policy with it off. Its dropout must be 0, or the ratio would not start at 1.
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
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import (batch_indices, completion_logprobs, completion_values, format_accuracy,
                    generate, heldout_accuracy, left_pad, reply_texts, sequence_scores)
from model import load_checkpoint, save_checkpoint
from tokenizer import final_answer, thinks


@dataclass
class Args:
    init: str = "out/sft.pt"
    """policy to train, and the frozen reference (from sft.py)"""
    reward_model: str = "out/reward.pt"
    """reward model (from reward.py); it also initialises the value model"""
    data: str = "data/prompts.jsonl"
    """prompts, one {"prompt"} per line (an "answer", if there, only for the logged accuracy)"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the before/after accuracy"""
    out: str = "out/ppo.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    steps: int = 30
    """rollout steps; each does ppo_epochs x minibatches optimizer steps"""
    prompts_per_step: int = 32
    """prompts sampled per step (one reply each), summed over ranks"""
    max_new_tokens: int = 48
    """reply length limit, for sampling and for the held-out evaluation"""
    temperature: float = 1.0
    """sampling temperature; the loss divides the logits by the same value"""
    ppo_epochs: int = 2
    """passes over each batch of samples"""
    minibatches: int = 2
    """minibatches per pass (per rank)"""
    lr: float = 1e-4
    """peak learning rate of the policy and the value model"""
    warmup: int = 5
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip each model's global gradient norm at this value (0 = off)"""
    kl_coef: float = 0.2
    """weight of the per-token KL penalty in the reward (TRL: 0.05; docs/reward-hacking.md)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards kl_target (Ziegler et al. 2019)"""
    kl_target: float = 1.0
    """target KL per reply of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in replies"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    clip: float = 0.2
    """the ratio is clipped to 1 +- clip"""
    vf_clip: float = 0.2
    """the new values are clipped to the old ones +- vf_clip"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a reply that never emitted <|im_end|>"""
    target_kl: float = 0.1
    """stop a step's updates once the approximate KL to the rollout policy exceeds it (0: never)"""
    log_every: int = 5
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the models"""
    seed: int = 0
    """random seed (prompt order, sampling, minibatches)"""
    lora_rank: int = 0
    """LoRA: rank of the trained update of each target layer (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA: the update is scaled by alpha / rank"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input (must be 0 here: detail 11)"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """LoRA: the layers that get an adapter (add gate_proj,up_proj,down_proj for the MLP too)"""


def parse_args(cls):
    """argparse from a dataclass: each field an option, the string under it its help, a Literal
    its choices."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        flag, help = "--" + field.name.replace("_", "-"), docs.get(field.name)
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help)
        elif typing.get_origin(field.type) is Literal:
            parser.add_argument(flag, choices=typing.get_args(field.type), default=field.default,
                                help=help)
        else:
            parser.add_argument(flag, type=field.type, default=field.default, help=help)
    return cls(**vars(parser.parse_args()))


def setup(args):
    """Device, DDP (torchrun sets RANK) and dtype: (ddp, rank, world, device_type, autocast)."""
    ddp = "RANK" in os.environ
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (--device auto picks one)")
    rank, world = 0, 1
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
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else nullcontext())
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
    """STAGE | step 120/600 | loss 1.2345 | ... | lr 3.0e-04 | 12.3k tok/s | 00:41 elapsed, 02:45 left
    (each metric by name, then the learning rate, the speed and the time)."""  # noqa: E501
    shown = [f"{name} {value:.4f}" for name, value in metrics.items()
             if name not in ("lr", "tok_per_s")]
    left = format_time(elapsed / step * (steps - step))
    speed = f"{metrics['tok_per_s'] / 1e3:.1f}k tok/s"
    return " | ".join([f"{stage} | step {step}/{steps}", *shown, f"lr {metrics['lr']:.1e}", speed,
                       f"{format_time(elapsed)} elapsed, {left} left"])


# ----------------------------------------------------------------------------- ALGO LOGIC: PPO

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# detail 4: r_t = -kl_coef * (logp_t - ref_logp_t), + score at the last real token
def ppo_rewards(logp, ref_logp, scores, completion_mask, kl_coef):
    """Per-token rewards (B, N): logp, ref_logp, completion_mask (B, N), scores (B,)."""
    rewards = -kl_coef * (logp - ref_logp) * completion_mask                 # (B, N)
    last = (completion_mask.sum(dim=1).long() - 1).clamp(min=0)              # (B,) right-padded
    return rewards.index_put((torch.arange(len(last), device=last.device), last), scores,
                             accumulate=True)


# detail 5: delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};
#           R_t = A_t + V_t
def gae(rewards, values, completion_mask, gamma, lam):
    """Advantages and returns (B, N) from rewards and values (B, N); 0 past the last real token."""
    rewards, values = rewards * completion_mask, values * completion_mask
    advantages = torch.zeros_like(rewards)
    last, next_value = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t], next_value = last, values[:, t]
    advantages = advantages * completion_mask
    return advantages, advantages + values


# detail 5: (x - mean) / sqrt(var + eps) over the mask, var unbiased (TRL's masked_whiten)
def masked_whiten(x, mask, eps=1e-8):
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# detail 6: ratio = exp(logp - old_logp);  L = token mean of -min(ratio A, clip(ratio) A)
def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """Loss () and where the clip removed the gradient (B, N); every argument (B, N)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    clipped = ((ratio > 1 + clip) & (advantages > 0)) | ((ratio < 1 - clip) & (advantages < 0))
    return masked_mean(-surrogate, mask), clipped


# detail 6: L_V = 0.5 * token mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
def ppo_value_loss(values, old_values, returns, mask, vf_clip):
    clipped_values = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2),
                             mask)


# detail 4: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al. 2019)
def adaptive_kl_coef(kl_coef, kl, target, horizon, n_replies):
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_replies / horizon)


# detail 7: approximate KL(old || new) = token mean of (ratio - 1) - log ratio (k3, as CleanRL)
def approximate_kl(logp, old_logp, mask):
    log_ratio = logp - old_logp
    return masked_mean(log_ratio.exp() - 1 - log_ratio, mask)


# detail 8: 1 - Var(R - V) / Var(R) over the real tokens
def explained_variance(returns, values, mask):
    residual = returns - values
    residual_var = ((residual - masked_mean(residual, mask)) ** 2 * mask).sum()
    return 1 - residual_var / ((returns - masked_mean(returns, mask)) ** 2 * mask).sum().clamp(
        min=1e-8)


# ----------------------------------------------------------------------------- models and data

def load_models(args):
    """The policy and its tokenizer; the frozen reference and the context it runs in (a LoRA
    policy's adapter off: detail 11)."""
    policy, tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")
    if args.lora_rank:  # lora.py is needed only here
        from lora import add_lora, lora_disabled
        add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        return policy, tokenizer, policy, lora_disabled
    reference = load_checkpoint(args.init, device=args.device, head="lm")[0]
    return policy, tokenizer, reference.eval().requires_grad_(False), nullcontext


def load_reward(args, tokenizer):
    """A learned reward (reward.py) as a function of a batch: the score at the last real token,
    normalised with the mean and std that reward.py stored (detail 3)."""
    model, reward_tokenizer, checkpoint = load_checkpoint(args.reward_model, device=args.device,
                                                          head="score")
    if reward_tokenizer is None or reward_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{args.reward_model} was trained with another tokenizer than {args.init}")
    model.eval().requires_grad_(False)
    stats = checkpoint["metrics"]
    mean, std = stats.get("reward_mean", 0.0), stats.get("reward_std", 1.0)
    return lambda batch: (sequence_scores(model, *batch) - mean) / std


def load_prompts(path, tokenizer, max_new_tokens, context, required, needed):
    """[(prompt ids, stripped answer or None)] of the prompts that leave room for max_new_tokens
    in the context (at least `needed` of them), and how many do not (detail 9)."""
    records, too_long = [], 0
    for line_no, record in enumerate(read_jsonl(path, required), 1):
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{line_no}: not a prompt ({e})") from None
        if len(prompt) + max_new_tokens > context:
            too_long += 1
            continue
        answer = record.get("answer")
        records.append((prompt, None if answer is None else str(answer).strip()))
    if len(records) < needed:
        raise ValueError(f"{path}: {len(records)} usable prompts, fewer than {needed} a step")
    return records, too_long


def mean_over_ranks(x, ddp):
    """x averaged over every rank, in place (x itself without DDP)."""
    if ddp:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def wrap(model, args, ddp, device_type):
    """The model as it trains: compiled with --compile, in DDP under torchrun."""
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.device(args.device).index]
                    if device_type == "cuda" else None)
    return model


def judge(tokenizer, completion_ids, completion_mask, answers):
    """correct (B,): 1.0 where the reply's final answer is the answer (a reply whose think block
    never closes has none); ended (B,); the accuracy over the replies that have an answer; the
    share of replies that think (details 3, 8)."""
    texts, ended = reply_texts(tokenizer, completion_ids, completion_mask)
    correct = torch.tensor([float(answer is not None and final_answer(text) == answer)
                            for text, answer in zip(texts, answers)], device=completion_ids.device)
    accuracy = (correct.sum() / max(1, sum(answer is not None for answer in answers))).item()
    return correct, ended, accuracy, sum(map(thinks, texts)) / len(texts)


def sample(policy, tokenizer, prompts, max_new_tokens, temperature, generator=None):
    """One reply to each prompt: (prompt_ids, prompt_mask) (B, P) left-padded as generate pads
    them, (completion_ids, completion_mask) (B, N) right-padded, up to and with <|im_end|>."""
    completion_ids, _, completion_mask = generate(
        policy, prompts, max_new_tokens, temperature, eos_id=tokenizer.im_end_id,
        pad_id=tokenizer.pad_id, generator=generator)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, completion_ids.device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@torch.no_grad()
def rollout(policy, reference, as_reference, value_model, reward, tokenizer, prompts, args,
            sampler):
    """One reply sampled per prompt, and what PPO needs of it (details 1-3): the batch, the old
    and the reference log-probs, the values (B, N) and the normalised scores (B,)."""
    batch = sample(policy, tokenizer, prompts, args.max_new_tokens, args.temperature, sampler)
    old_logp = completion_logprobs(policy, *batch, temperature=args.temperature)
    with as_reference(reference):  # detail 11: a LoRA policy with its adapter off
        ref_logp = completion_logprobs(reference, *batch, temperature=args.temperature)
    return batch, old_logp, ref_logp, completion_values(value_model, *batch), reward(batch)


def minibatches(n_rows, size, epochs, device):
    """The rows of each minibatch: `epochs` passes over the batch, each in a fresh order (detail
    7). A generator: a pass's order is drawn only if the updates get that far."""
    for _ in range(epochs):
        order = torch.randperm(n_rows, device=device)
        for start in range(0, n_rows, size):
            yield order[start : start + size]


@torch.no_grad()
def heldout(policy, reward, tokenizer, records, max_new_tokens, batch_size=128):
    """heldout_accuracy's result, and "score": the mean normalised score of the greedy replies to
    the held-out prompts (detail 10)."""
    result, total = heldout_accuracy(policy, tokenizer, records, max_new_tokens), 0.0
    for start in range(0, len(records), batch_size):
        prompts = [tokenizer.encode_prompt(r["prompt"]) for r in records[start:start + batch_size]]
        total += reward(sample(policy, tokenizer, prompts, max_new_tokens, 0.0)).sum().item()
    return {**result, "score": total / len(records)}


def main(args: Args):
    if args.temperature <= 0:  # the loss divides the logits by it
        raise ValueError(f"--temperature {args.temperature}: PPO samples, so it must be > 0")
    if args.lora_dropout:  # detail 11
        raise ValueError(f"--lora-dropout {args.lora_dropout}: must be 0 (see detail 11)")
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.prompts_per_step % (world * args.minibatches):
        raise ValueError(f"--prompts-per-step {args.prompts_per_step}: not divisible by ranks x "
                         f"--minibatches = {world * args.minibatches}")
    minibatch_size = args.prompts_per_step // (world * args.minibatches)

    # -------------------------------------------------------------- models and data (detail 2)
    policy, tokenizer, reference, as_reference = load_models(args)
    reward = load_reward(args, tokenizer)
    value_model = load_checkpoint(args.reward_model, device=args.device, head="score")[0]
    context = policy.config.max_position_embeddings
    records, too_long = load_prompts(args.data, tokenizer, args.max_new_tokens, context,
                                     ("prompt",), args.prompts_per_step)
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    value_optimizer = value_model.configure_optimizer(args.lr, args.weight_decay,
                                                      device_type=device_type)
    raw_policy, policy = policy, wrap(policy, args, ddp, device_type)
    raw_value_model, value_model = value_model, wrap(value_model, args, ddp, device_type)
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)  # ranks differ
    kl_coef = args.kl_coef

    if master:  # detail 10: held-out accuracy and score before training
        before = heldout(raw_policy, reward, tokenizer, eval_records, args.max_new_tokens)
        print(f"ppo | {len(records)} prompts, {args.prompts_per_step} replies per step, "
              f"{args.ppo_epochs} epochs x {args.minibatches} minibatches, {world} process(es) on "
              f"{args.device} in {args.dtype}"
              + (", reference the policy, adapter off" if reference is raw_policy else ""))
        if too_long:
            print(f"ppo | skipped {too_long} prompts that leave no room for "
                  f"{args.max_new_tokens} new tokens in the context ({context})")
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups + value_optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(len(records), args.prompts_per_step, args.seed, step)[rank::world]
        prompts, answers = [records[i][0] for i in indices], [records[i][1] for i in indices]

        # ---------------------------------------------------------- rollout (detail 1, 2, 3)
        with autocast:
            batch, old_logp, ref_logp, old_values, scores = rollout(
                raw_policy, reference, as_reference, raw_value_model, reward, tokenizer, prompts,
                args, sampler)
        prompt_ids, _, completion_ids, completion_mask = batch
        tokens_seen += (prompt_ids.numel() + completion_ids.numel()) * world
        _, ended, accuracy, think = judge(tokenizer, completion_ids, completion_mask, answers)

        # ---------------------------------------------------------- rewards, GAE (detail 3, 4, 5)
        penalized_scores = scores - args.missing_eos_penalty * (~ended).float()
        rewards = ppo_rewards(old_logp, ref_logp, penalized_scores, completion_mask, kl_coef)
        advantages, returns = gae(rewards, old_values, completion_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, completion_mask)
        kl = mean_over_ranks((old_logp - ref_logp).sum(dim=1).mean(), ddp)          # sequence KL

        # ---------------------------------------------------------- PPO updates (detail 6, 7)
        policy.train()
        value_model.train()
        update_sums, updates = {}, 0
        for rows in minibatches(len(prompts), minibatch_size, args.ppo_epochs, args.device):
            minibatch, mask = [x[rows] for x in batch], completion_mask[rows]
            with autocast:
                logp, entropy = completion_logprobs(policy, *minibatch, return_entropy=True,
                                                    temperature=args.temperature)
                values = completion_values(value_model, *minibatch)
                policy_loss, clipped = ppo_policy_loss(logp, old_logp[rows], advantages[rows],
                                                       mask, args.clip)
                value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask,
                                            args.vf_clip)
                loss = policy_loss + args.vf_coef * value_loss
            loss.backward()  # DDP averages the gradients over ranks
            for model, model_optimizer in ((policy, optimizer), (value_model, value_optimizer)):
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                model_optimizer.step()
                model_optimizer.zero_grad(set_to_none=True)
            updates += 1
            # detail 7: averaged over ranks, so that every rank stops at the same update
            approx_kl = mean_over_ranks(approximate_kl(logp.detach(), old_logp[rows], mask), ddp)
            update = {"loss": loss.detach(), "clip": masked_mean(clipped.float(), mask),
                      "approx_kl": approx_kl, "value_loss": value_loss.detach(),
                      "entropy": masked_mean(entropy.detach(), mask)}
            update_sums = {name: update_sums.get(name, 0) + value
                           for name, value in update.items()}
            if args.target_kl > 0 and approx_kl.item() > args.target_kl:
                break
        if args.adaptive_kl:  # detail 4
            kl_coef = adaptive_kl_coef(kl_coef, kl.item(), args.kl_target, args.kl_horizon,
                                       args.prompts_per_step)
        step += 1

        # ---------------------------------------------------------- metrics (detail 8)
        metrics = {**{name: (value / updates).item() for name, value in update_sums.items()},
                   "score": scores.mean().item(), "accuracy": accuracy, "think": think,
                   "kl": kl.item(), "length": completion_mask.sum(dim=1).mean().item(),
                   "explained_var": explained_variance(returns, old_values, completion_mask).item(),
                   "updates": updates}
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(kl_coef=kl_coef, lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("ppo", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()

    if master:
        after = heldout(raw_policy, reward, tokenizer, eval_records, args.max_new_tokens)
        save_checkpoint(args.out, raw_policy, tokenizer, "ppo", parent=args.init, step=step,
                        args=dataclasses.asdict(args), metrics={"before": before, "after": after})
        print(f"ppo | done in {format_time(time.time() - start_time)}")
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        print(f"ppo | after:  {format_accuracy(after)} | score {after['score']:.3f} | "
              f"wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
