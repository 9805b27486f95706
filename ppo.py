"""
ppo.py: RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT, arXiv:2203.02155).

    out/sft.pt + out/reward.pt + data/prompts.jsonl  ->  out/ppo.pt

Run (after `python sft.py` and `python reward.py`):

    python ppo.py                                         # CPU defaults, ~1 minute on 2 cores
    python ppo.py --device cuda --prompts-per-step 256 --minibatches 4 --steps 500   # one GPU
    torchrun --nproc_per_node 8 ppo.py --prompts-per-step 1024                      # many GPUs
    python ppo.py --adaptive-kl --kl-target 0.5           # Ziegler et al.'s adaptive KL controller

Implementation details:
1. Rollout, as grpo.py: every step draws `prompts_per_step` prompts (ranks take different ones)
   and samples one reply each as one batch with the KV cache at `temperature`; old log-probs
   are recomputed once after sampling (no grad) with the logits divided by the same temperature,
   the same call as the loss makes, so the ratio is exactly 1 on the first update.
2. Four models: the policy and a frozen reference from sft.pt, a frozen reward model and a
   separate value model (critic), both from reward.pt, as TRL's PPOTrainer. The critic has its own
   trunk: sharing the policy's would let the value loss pull on the policy's representations.
3. Score = the reward model's output at the last real token of prompt + reply, normalised with the
   mean / std reward.py stored, so 0 is a typical reply. A reply that never emitted <|im_end|>
   loses `missing_eos_penalty` (TRL's missing_eos_penalty): a reply cut at max_new_tokens is not
   a reply, and the reward model may well like its first half.
4. Rewards per token (Ziegler et al.): r_t = -kl_coef * (logp_t - ref_logp_t) at every reply
   token, plus the score once, at the last real token (the <|im_end|>, or the last token of a cut
   reply); nothing past it is trained. The KL is part of the reward here, not a loss term as in
   grpo.py: it flows into the advantages and the value targets. `--adaptive-kl` moves kl_coef
   towards a target KL (proportional controller, error clipped to +-0.2, horizon 10000 replies).
   kl_coef 0.2 is four times TRL's 0.05: the built-in reward model cannot check the arithmetic of a
   trace, so far from the SFT model's traces its score stops meaning "right" (seed 0: 0.05 gave
   65.7 % held-out accuracy, 0.2 gave 79.7 %, 0 gave 1 %: README, "Reward hacking, shown").
5. GAE (gamma 1, lambda 0.95, TRL's defaults) computed backwards over the reply; rewards and
   values are 0 past the last real token, so the bootstrap stops there. returns = advantages +
   values, before the advantages are whitened (mean 0, std 1 over the real tokens of the rank's
   batch, TRL's masked_whiten; the returns are not whitened).
6. Policy loss: token mean over the minibatch of -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A).
   Value loss: 0.5 * token mean of max((V - R)^2, (V_old + clip(V - V_old, +-vf_clip) - R)^2)
   (the PPO2 / TRL value clipping). loss = policy loss + vf_coef * value loss.
7. `ppo_epochs` passes over the batch, in `minibatches` shuffled minibatches each. Early stop: the
   approximate KL between the old and the new policy, mean((ratio - 1) - log ratio) (CleanRL), is
   averaged over ranks after every minibatch, so every rank takes the same decision; above
   `target_kl` the step's remaining updates are skipped.
8. Logged at every step: score, accuracy of the rollouts against the true answers (never shown to
   the reward model), think rate (replies that start with <think>), KL to the reference (summed log-ratio of a reply, averaged over replies, as
   grpo.py logs it), clip fraction, approximate KL, value loss, explained variance of the values,
   entropy, reply length, kl_coef.
9. Bad input: prompts that leave no room for `max_new_tokens` in the context are skipped and
   counted; a reward model with another tokenizer or a missing checkpoint is a one-line error.
10. Before and after: greedy held-out accuracy on data/eval.jsonl (the true answers: did the policy
   learn the task, or learn to please the reward model?) and the mean reward-model score of those
   greedy replies.
11. `--lora-rank r` trains a LoRA adapter on the policy (sft.py detail 8); the reference is the
   policy with its adapter switched off (model.lora_disabled), no second copy. The critic trains in
   full, as beside a PEFT policy in TRL's PPOTrainer: a separate model with a new score head. The
   adapter's dropout must be 0: the replies and their old log-probs would come from other dropout
   masks than the update's, and the ratio would not start at 1.
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
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import completion_logprobs, completion_values, format_accuracy, generate, heldout_accuracy, left_pad, reply_texts, sequence_scores
from lora import add_lora, lora_disabled
from model import load_checkpoint, save_checkpoint
from tokenizer import final_answer, thinks


@dataclass
class Args:
    init: str = "out/sft.pt"
    """policy to train, and the frozen reference (from sft.py)"""
    reward_model: str = "out/reward.pt"
    """reward model (from reward.py); it also initialises the value model"""
    data: str = "data/prompts.jsonl"
    """prompts, one {"prompt"} per line (an "answer", if there, is only used for the logged accuracy)"""
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
    """weight of the per-token KL penalty in the reward (see detail 4 for why not TRL's 0.05)"""
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
    """stop the step's updates when the approximate KL to the rollout policy exceeds this (0 = never)"""
    log_every: int = 5
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: str = "auto"
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


def prompt_indices(n_records: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the prompts of `step`: a fresh permutation every epoch, depending only on (seed, step)."""
    batches_per_epoch = n_records // batch_size
    epoch, index = divmod(step, batches_per_epoch)
    order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[index * batch_size : (index + 1) * batch_size]


# ----------------------------------------------------------------------------- ALGO LOGIC: the PPO math

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# detail 4: r_t = -kl_coef * (logp_t - ref_logp_t), + score at the last real token
def ppo_rewards(logp, ref_logp, scores, completion_mask, kl_coef):
    """Per-token rewards (B, N): logp, ref_logp, completion_mask (B, N), scores (B,)."""
    rewards = -kl_coef * (logp - ref_logp) * completion_mask                 # (B, N)
    last = (completion_mask.sum(dim=1).long() - 1).clamp(min=0)              # (B,) right padding: count - 1
    return rewards.index_put((torch.arange(len(last), device=last.device), last), scores, accumulate=True)


# detail 5: delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};  R_t = A_t + V_t
def gae(rewards, values, completion_mask, gamma, lam):
    """Advantages and returns (B, N) from rewards and values (B, N); both 0 past the last real token."""
    rewards, values = rewards * completion_mask, values * completion_mask
    advantages = torch.zeros_like(rewards)
    last, next_value = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t], next_value = last, values[:, t]
    advantages = advantages * completion_mask
    return advantages, advantages + values


# detail 5: (x - mean) / sqrt(var + eps) over the mask, var with Bessel's correction (TRL's masked_whiten)
def masked_whiten(x, mask, eps=1e-8):
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# detail 6: ratio = exp(logp - old_logp);  L = token mean of -min(ratio A, clip(ratio, 1 - clip, 1 + clip) A)
def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """Loss () and where the clip removed the gradient (B, N); every argument (B, N)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    clipped = ((ratio > 1 + clip) & (advantages > 0)) | ((ratio < 1 - clip) & (advantages < 0))
    return masked_mean(-surrogate, mask), clipped


# detail 6: L_V = 0.5 * token mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
def ppo_value_loss(values, old_values, returns, mask, vf_clip):
    clipped_values = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


# detail 4: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al. 2019)
def adaptive_kl_coef(kl_coef, kl, target, horizon, n_replies):
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_replies / horizon)


@torch.no_grad()
def heldout_score(policy, reward_model, tokenizer, records, max_new_tokens, mean, std, batch_size=128):
    """Mean normalised reward-model score of the greedy replies to the held-out prompts (detail 10)."""
    device, total = next(policy.parameters()).device, 0.0
    for start in range(0, len(records), batch_size):
        prompts = [tokenizer.encode_prompt(r["prompt"]) for r in records[start : start + batch_size]]
        completion_ids, _, completion_mask = generate(policy, prompts, max_new_tokens, temperature=0.0,
                                                      eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id)
        prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, device)
        total += ((sequence_scores(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask) - mean) / std).sum().item()
    return total / len(records)


METRICS = ("loss", "score", "accuracy", "think", "kl", "clip", "approx_kl", "value_loss", "explained_var", "entropy", "length", "updates")


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
    if args.prompts_per_step % (world * args.minibatches):
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be divisible by ranks x --minibatches = {world * args.minibatches}")
    if args.temperature <= 0:  # the loss divides the logits by it
        raise ValueError(f"--temperature {args.temperature}: PPO samples, so it must be > 0 (1.0 is the policy itself)")
    minibatch_size = args.prompts_per_step // (world * args.minibatches)
    if args.lora_dropout:  # detail 11
        raise ValueError(f"--lora-dropout {args.lora_dropout}: PPO samples, scores and trains one network, so it must be 0")

    # -------------------------------------------------------------- data and models (detail 2)
    policy, tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")
    if args.lora_rank:  # detail 11: only the adapter trains, and the reference is the policy with it off
        add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        reference = policy
    else:
        reference = load_checkpoint(args.init, device=args.device, head="lm")[0].eval().requires_grad_(False)
    reward_model, reward_tokenizer, reward_checkpoint = load_checkpoint(args.reward_model, device=args.device, head="score")
    if reward_tokenizer is None or reward_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{args.reward_model} was trained with another tokenizer than {args.init}")
    reward_model.eval().requires_grad_(False)
    value_model = load_checkpoint(args.reward_model, device=args.device, head="score")[0]
    reward_mean = reward_checkpoint["metrics"].get("reward_mean", 0.0)  # detail 3
    reward_std = reward_checkpoint["metrics"].get("reward_std", 1.0)
    context = policy.config.max_position_embeddings
    records, too_long = [], 0
    for line_no, record in enumerate(read_jsonl(args.data, required=("prompt",)), 1):
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{args.data}:{line_no}: not a prompt ({e})") from None
        if len(prompt) + args.max_new_tokens > context:  # detail 9: skipped and counted
            too_long += 1
            continue
        records.append((prompt, None if record.get("answer") is None else str(record["answer"]).strip()))
    if len(records) < args.prompts_per_step:
        raise ValueError(f"{args.data}: {len(records)} usable prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    value_optimizer = value_model.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    raw_policy, raw_value_model = policy, value_model
    if args.compile:
        policy, value_model = torch.compile(policy), torch.compile(value_model)
    if ddp:
        device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
        policy, value_model = DDP(policy, device_ids=device_ids), DDP(value_model, device_ids=device_ids)
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)  # ranks sample differently
    kl_coef = args.kl_coef

    # -------------------------------------------------------------- the training loop
    if master:  # detail 10: held-out accuracy and score before training
        before = heldout_accuracy(raw_policy, tokenizer, eval_records, args.max_new_tokens)
        before["score"] = heldout_score(raw_policy, reward_model, tokenizer, eval_records, args.max_new_tokens, reward_mean, reward_std)
        print(f"ppo | {len(records)} prompts, {args.prompts_per_step} replies per step, {args.ppo_epochs} epochs x "
              f"{args.minibatches} minibatches, {world} process(es) on {args.device} in {args.dtype}"
              + (", reference the policy, adapter off" if reference is raw_policy else ""))
        if too_long:
            print(f"ppo | skipped {too_long} prompts that leave no room for {args.max_new_tokens} new tokens in the context ({context})")
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    totals, steps_since_log = torch.zeros(len(METRICS), device=args.device), 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups + value_optimizer.param_groups:
            group["lr"] = lr
        batch = [records[i] for i in prompt_indices(len(records), args.prompts_per_step, args.seed, step)][rank::world]
        prompts = [prompt for prompt, _ in batch]
        answers = [answer for _, answer in batch]

        # ---------------------------------------------------------- rollout (detail 1, 2, 3)
        with torch.no_grad(), autocast:
            completion_ids, _, completion_mask = generate(raw_policy, prompts, args.max_new_tokens, args.temperature,
                                                          eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id, generator=sampler)
            prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, args.device)   # (B, P), as generate padded them
            rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask)
            old_logp = completion_logprobs(raw_policy, *rollout, temperature=args.temperature)   # (B, N)
            with lora_disabled(reference):  # detail 11: a no-op unless the reference is the LoRA policy
                ref_logp = completion_logprobs(reference, *rollout, temperature=args.temperature)  # (B, N)
            old_values = completion_values(raw_value_model, *rollout)                            # (B, N) V(s_t)
            scores = (sequence_scores(reward_model, *rollout) - reward_mean) / reward_std        # (B,)
        tokens_seen += (prompt_ids.numel() + completion_ids.numel()) * world
        texts, ended = reply_texts(tokenizer, completion_ids, completion_mask)
        has_answer = torch.tensor([answer is not None for answer in answers], device=args.device)
        correct = torch.tensor([float(final_answer(text) == answer) for text, answer in zip(texts, answers)], device=args.device)

        # ---------------------------------------------------------- rewards, GAE (detail 3, 4, 5)
        penalized_scores = scores - args.missing_eos_penalty * (~ended).float()
        rewards = ppo_rewards(old_logp, ref_logp, penalized_scores, completion_mask, kl_coef)    # (B, N)
        advantages, returns = gae(rewards, old_values, completion_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, completion_mask)
        kl = (old_logp - ref_logp).sum(dim=1).mean()                                             # sequence KL
        if ddp:
            dist.all_reduce(kl)
            kl /= world

        # ---------------------------------------------------------- PPO epochs over minibatches (detail 6, 7)
        policy.train()
        value_model.train()
        sums, updates, stop = torch.zeros(6, device=args.device), 0, False
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(len(prompts), device=args.device)
            for start in range(0, len(prompts), minibatch_size):
                rows = order[start : start + minibatch_size]
                mb = [x[rows] for x in rollout]
                mask = completion_mask[rows]
                with autocast:
                    logp, entropy = completion_logprobs(policy, *mb, temperature=args.temperature, return_entropy=True)
                    values = completion_values(value_model, *mb)
                    policy_loss, clipped = ppo_policy_loss(logp, old_logp[rows], advantages[rows], mask, args.clip)
                    value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask, args.vf_clip)
                    loss = policy_loss + args.vf_coef * value_loss
                loss.backward()  # DDP averages the gradients over ranks
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.grad_clip)
                optimizer.step()
                value_optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
                updates += 1
                with torch.no_grad():
                    log_ratio = logp - old_logp[rows]
                    approx_kl = masked_mean(log_ratio.exp() - 1 - log_ratio, mask)   # k3(old || new)
                    if ddp:  # detail 7: every rank stops at the same update
                        dist.all_reduce(approx_kl)
                        approx_kl /= world
                    sums += torch.stack([loss.detach(), masked_mean(clipped.float(), mask), approx_kl, value_loss.detach(),
                                         masked_mean(entropy.detach(), mask), torch.ones((), device=args.device)])
                if args.target_kl > 0 and approx_kl.item() > args.target_kl:
                    stop = True
                    break
            if stop:
                break
        if args.adaptive_kl:  # detail 4
            kl_coef = adaptive_kl_coef(kl_coef, kl.item(), args.kl_target, args.kl_horizon, args.prompts_per_step)
        step += 1

        # ---------------------------------------------------------- metrics (detail 8)
        residual = returns - old_values
        explained_var = 1 - ((residual - masked_mean(residual, completion_mask)) ** 2 * completion_mask).sum() / \
            ((returns - masked_mean(returns, completion_mask)) ** 2 * completion_mask).sum().clamp(min=1e-8)
        loss_mean, clip_frac, approx_kl_mean, value_loss_mean, entropy_mean, _ = (sums / sums[-1]).tolist()
        totals += torch.tensor([loss_mean, scores.mean().item(), (correct.sum() / has_answer.sum().clamp(min=1)).item(),
                                sum(map(thinks, texts)) / len(texts), kl.item(), clip_frac, approx_kl_mean, value_loss_mean, explained_var.item(), entropy_mean,
                                completion_mask.sum(dim=1).mean().item(), updates], device=args.device)
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            if ddp:
                dist.all_reduce(totals)
            metrics = dict(zip(METRICS, (totals / (steps_since_log * world)).tolist()))
            totals.zero_()
            steps_since_log = 0
            if master:
                now = time.time()
                elapsed, rate = now - start_time, step / (now - start_time)
                tok_per_s, tokens_seen, last_time = tokens_seen / (now - last_time), 0, now
                print(f"ppo | step {step}/{args.steps} | loss {metrics['loss']:.4f} | score {metrics['score']:.3f} | "
                      f"acc {metrics['accuracy']:.1%} | think {metrics['think']:.1%} | kl {metrics['kl']:.4f} | clip {metrics['clip']:.3f} | "
                      f"approx_kl {metrics['approx_kl']:.4f} | vf_loss {metrics['value_loss']:.4f} | "
                      f"expl_var {metrics['explained_var']:.2f} | entropy {metrics['entropy']:.3f} | len {metrics['length']:.1f} | "
                      f"lr {lr:.1e} | {tok_per_s / 1e3:.1f}k tok/s | {format_time(elapsed)} elapsed, {format_time((args.steps - step) / rate)} left")
                log_file.write(json.dumps({"step": step, **metrics, "kl_coef": kl_coef, "lr": lr, "tok_per_s": tok_per_s}) + "\n")
                log_file.flush()

    if master:
        after = heldout_accuracy(raw_policy, tokenizer, eval_records, args.max_new_tokens)
        after["score"] = heldout_score(raw_policy, reward_model, tokenizer, eval_records, args.max_new_tokens, reward_mean, reward_std)
        save_checkpoint(args.out, raw_policy, tokenizer, "ppo", parent=args.init, step=step, args=dataclasses.asdict(args),
                        metrics={"before": before, "after": after})
        print(f"ppo | done in {format_time(time.time() - start_time)}")
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        print(f"ppo | after:  {format_accuracy(after)} | score {after['score']:.3f} | wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
