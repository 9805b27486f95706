"""
grpo.py: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300) with a verifiable reward.

    out/sft.pt + data/prompts.jsonl  ->  out/grpo.pt

Run (after `python sft.py`):

    python grpo.py                                        # CPU defaults, ~1 minute on 2 cores
    python grpo.py --device cuda --prompts-per-step 64 --group-size 16 --steps 500    # one GPU
    torchrun --nproc_per_node 8 grpo.py --prompts-per-step 256                       # many GPUs
    python grpo.py --loss-type dr_grpo --beta 0 --eps-high 0.28     # Dr. GRPO / DAPO variants

Implementation details:
1. Rollout: every step draws `prompts_per_step` prompts (ranks take different ones), repeats each
   `group_size` times and samples all of them as one batch with the KV cache at `temperature`.
   The G replies of a prompt are adjacent rows, so a group never straddles two ranks, and each
   prompt runs through the model once for its G replies, in the prefill and in every log-prob pass
   (`group_size=G` of generate and completion_logprobs, model.py detail 10): the same numbers to
   rounding, the prompt's cost paid once, not G times.
2. Old log-probs are recomputed once after sampling (no grad) with `completion_logprobs` and the
   logits divided by the sampling temperature, the same call as the loss makes, so the ratio is
   exactly 1 on the first iteration (to rounding with --compile, where the loss runs the compiled
   model). (generate's own log-probs come from a different code path,
   the KV cache, and would give a ratio that is 1 only up to rounding.) With one iteration the
   old log-probs are the loss's own, detached (as TRL): the same numbers, one forward fewer.
3. Reward = 1 if the reply's final answer equals the answer, stripped, else 0: the reply is the
   text before the first <|im_end|> (the whole completion if it never ended) and its final answer
   the text after </think> when it thinks (tokenizer.final_answer, the rule of heldout_accuracy and
   of every stage; an unclosed think block has none). No reward for thinking itself: the model
   thinks more only where thinking gets answers right. Optionally `+ reward_weight * score` of a
   learned reward model (normalised with its stored mean / std; prompts may then lack an
   answer) and `- length_penalty * tokens / max_new_tokens`, the guard against the classic hack
   of a reward that grows with length.
4. Advantages (r - mean_group) / (std_group + eps), std unbiased and eps 1e-4 as TRL;
   `--scale-rewards batch` divides by the std of the whole global batch (rewards are gathered
   from every rank first), `none` only centres (Dr. GRPO). A group whose rewards are all equal
   has advantage 0 for every reply: no policy gradient, only the KL term.
5. Per-token loss, as GRPO defines it: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
   + beta * k3, with k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, Schulman's unbiased,
   always-positive estimator of KL(policy || reference). beta = 0 skips the reference model.
   eps_high > eps_low is DAPO's clip-higher.
6. Loss aggregation: `grpo` averages each reply over its tokens, then the replies (long replies
   weigh less per token); `dapo` averages over all tokens of the global batch; `dr_grpo` sums
   and divides by the constant replies x max_new_tokens (no length bias, and padding never
   changes it). Tokens after EOS and padding have mask 0 and contribute nothing;
   `--mask-truncated` also zeroes the replies that never ended (DAPO's overlong filtering).
7. `iterations` optimizer steps per batch of samples (mu in the paper), old log-probs fixed.
   With 1 the ratio is always 1 and the clip never acts: plain REINFORCE with a group baseline.
8. Logged at every step: reward, accuracy, think rate (replies that start with <think>), KL to the reference (the sequence KL, summed
   log-ratio of a reply, averaged over replies, as ppo.py logs it), clip fraction (tokens
   where the clip removed the gradient), entropy, reply length, and the share of groups whose
   rewards are all equal (they teach nothing; at 100 % the task is too easy or too hard).
9. Bad input: prompts that leave no room for `max_new_tokens` in the context are skipped and
   counted; a missing answer without a learned reward and a group below 2 are one-line errors.
10. Before and after: greedy held-out accuracy on data/eval.jsonl, as sft.py measures it.
11. `--lora-rank r` trains a LoRA adapter instead of every weight (sft.py detail 8), and the
   reference is the policy itself with its adapter switched off (model.lora_disabled): no second
   copy of the model in memory, as TRL does with a PEFT model. The adapter's dropout must be 0: the
   replies would be sampled under one dropout mask and trained on under another.
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

from engine import completion_logprobs, format_accuracy, generate, heldout_accuracy, left_pad, reply_texts, sequence_scores
from lora import add_lora, lora_disabled
from model import load_checkpoint, save_checkpoint
from tokenizer import final_answer, thinks


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
    steps: int = 20
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
    beta: float = 0.04
    """weight of the k3 KL to the reference in the loss (0 = no reference model)"""
    eps_low: float = 0.2
    """the ratio is clipped below at 1 - eps_low"""
    eps_high: float = 0.2
    """the ratio is clipped above at 1 + eps_high (0.28 = DAPO clip-higher)"""
    scale_rewards: str = "group"
    """advantage scaling: group, batch or none"""
    loss_type: str = "grpo"
    """loss aggregation: grpo, dapo or dr_grpo"""
    mask_truncated: bool = False
    """leave replies that never emitted <|im_end|> out of the loss"""
    log_every: int = 5
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the model"""
    seed: int = 0
    """random seed (prompt order and sampling)"""
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


# ----------------------------------------------------------------------------- ALGO LOGIC: the GRPO math

# detail 4: A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
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


# detail 5: k3 = exp(ref - logp) - (ref - logp) - 1, an unbiased estimate of KL(policy || reference), >= 0
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


# detail 5: ratio = exp(logp - old_logp);  L_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3
def grpo_token_loss(logp, old_logp, advantages, eps_low, eps_high, ref_logp=None, beta=0.0):
    """Per-token loss (B, N) and where the clip removed the gradient (B, N); logp, old_logp (B, N), advantages (B,)."""
    ratio = torch.exp(logp - old_logp)                           # (B, N)
    advantages = advantages[:, None]                             # (B, 1): every token of a reply shares it
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    clipped = ((ratio > 1 + eps_high) & (advantages > 0)) | ((ratio < 1 - eps_low) & (advantages < 0))
    loss = -surrogate
    if beta > 0:
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss, clipped


# detail 6: grpo: mean_i (sum_t L_it / |o_i|);  dapo: sum_it L_it / sum_i |o_i|;  dr_grpo: sum_it L_it / (B * max_new_tokens)
def aggregate_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    masked = token_loss * loss_mask                              # (B, N): 0 after EOS and on padding
    if loss_type == "grpo":
        return (masked.sum(dim=1) / loss_mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return masked.sum() / loss_mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (loss_mask.shape[0] * max_new_tokens)
    raise ValueError(f"--loss-type must be grpo, dapo or dr_grpo, got {loss_type!r}")


METRICS = ("loss", "reward", "accuracy", "think", "kl", "clip", "entropy", "length", "equal")


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
    if args.group_size < 2:  # detail 9
        raise ValueError(f"--group-size {args.group_size}: a group needs at least 2 replies to compare")
    if args.temperature <= 0:  # the loss divides the logits by it, and a group of greedy replies is one reply
        raise ValueError(f"--temperature {args.temperature}: GRPO samples, so it must be > 0 (1.0 is the policy itself)")
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the number of ranks ({world})")
    grpo_advantages(torch.zeros(args.group_size), args.group_size, args.scale_rewards)  # check the choices now,
    aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), args.loss_type, 1)             # not after the first rollout
    if args.lora_dropout:  # detail 11
        raise ValueError(f"--lora-dropout {args.lora_dropout}: GRPO samples, scores and trains one network, so it must be 0")

    # -------------------------------------------------------------- data and models
    policy, tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")
    reference = reward_model = None
    if args.lora_rank:  # detail 11: only the adapter trains, and the reference is the policy with it off
        add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        reference = policy if args.beta > 0 else None
    elif args.beta > 0:  # detail 5: the frozen reference, only when the KL term is on
        reference = load_checkpoint(args.init, device=args.device, head="lm")[0].eval().requires_grad_(False)
    if args.reward_model:  # detail 3: an optional learned reward on top of the verifiable one
        reward_model, reward_tokenizer, reward_checkpoint = load_checkpoint(args.reward_model, device=args.device, head="score")
        if reward_tokenizer is None or reward_tokenizer.to_dict() != tokenizer.to_dict():
            raise ValueError(f"{args.reward_model} was trained with another tokenizer than {args.init}")
        reward_model.eval().requires_grad_(False)
        reward_mean = reward_checkpoint["metrics"].get("reward_mean", 0.0)
        reward_std = reward_checkpoint["metrics"].get("reward_std", 1.0)
    context = policy.config.max_position_embeddings
    records, too_long = [], 0
    for line_no, record in enumerate(read_jsonl(args.data, required=("prompt",) if reward_model else ("prompt", "answer")), 1):
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
    raw_policy = policy
    if args.compile:
        policy = torch.compile(policy)
    if ddp:
        policy = DDP(policy, device_ids=[torch.device(args.device).index] if device_type == "cuda" else None)
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)  # ranks sample differently

    # -------------------------------------------------------------- the training loop
    if master:  # detail 10: held-out accuracy before training
        before = heldout_accuracy(raw_policy, tokenizer, eval_records, args.max_new_tokens)
        print(f"grpo | {len(records)} prompts, {args.prompts_per_step} x {args.group_size} replies per step, "
              f"{world} process(es) on {args.device} in {args.dtype}"
              + (", reference the policy, adapter off" if reference is raw_policy else ""))
        if too_long:
            print(f"grpo | skipped {too_long} prompts that leave no room for {args.max_new_tokens} new tokens in the context ({context})")
        print(f"grpo | before: {format_accuracy(before)}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    totals, steps_since_log = torch.zeros(len(METRICS), device=args.device), 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [records[i] for i in prompt_indices(len(records), args.prompts_per_step, args.seed, step)][rank::world]
        prompts = [prompt for prompt, _ in batch for _ in range(args.group_size)]   # detail 1: groups adjacent
        answers = [answer for _, answer in batch for _ in range(args.group_size)]

        # ---------------------------------------------------------- rollout (detail 1, 2)
        with torch.no_grad(), autocast:
            completion_ids, _, completion_mask = generate(raw_policy, prompts, args.max_new_tokens, args.temperature,
                                                          eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id, generator=sampler,
                                                          group_size=args.group_size)
            prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, args.device)   # (B, P), as generate padded them
            rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask)
            old_logp = None  # with one iteration the policy is the rollout policy: old = new, detached (TRL)
            if args.iterations > 1:
                old_logp = completion_logprobs(raw_policy, *rollout, temperature=args.temperature,
                                               group_size=args.group_size)                             # (B, N)
            with lora_disabled(reference):  # detail 11: a no-op unless the reference is the LoRA policy
                ref_logp = (completion_logprobs(reference, *rollout, temperature=args.temperature, group_size=args.group_size)
                            if reference else None)                                              # (B, N)
            scores = (sequence_scores(reward_model, *rollout) - reward_mean) / reward_std if reward_model else None
        tokens_seen += (prompt_ids.numel() + completion_ids.numel()) * world

        # ---------------------------------------------------------- rewards and advantages (detail 3, 4)
        texts, ended = reply_texts(tokenizer, completion_ids, completion_mask)
        has_answer = torch.tensor([answer is not None for answer in answers], device=args.device)
        correct = torch.tensor([float(final_answer(text) == answer) for text, answer in zip(texts, answers)], device=args.device)
        think_rate = sum(map(thinks, texts)) / len(texts)
        lengths = completion_mask.sum(dim=1)                                             # (B,)
        rewards = correct.clone()
        if reward_model is not None:
            rewards += args.reward_weight * scores
        if args.length_penalty:
            rewards -= args.length_penalty * lengths / args.max_new_tokens
        all_rewards = rewards
        if ddp:  # statistics of the global batch: every rank gathers every reward
            gathered = [torch.zeros_like(rewards) for _ in range(world)]
            dist.all_gather(gathered, rewards)
            all_rewards = torch.cat(gathered)
        advantages = grpo_advantages(all_rewards, args.group_size, args.scale_rewards)[rank * len(prompts) : (rank + 1) * len(prompts)]
        grouped = all_rewards.view(-1, args.group_size)
        equal_groups = (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean()
        loss_mask = completion_mask * ended[:, None] if args.mask_truncated else completion_mask  # detail 6
        if ddp and args.loss_type == "dapo":  # the token mean of the global batch, not of this rank's share
            global_tokens = loss_mask.sum()
            dist.all_reduce(global_tokens)
            dapo_scale = loss_mask.sum() * world / global_tokens.clamp(min=1)

        # ---------------------------------------------------------- optimisation (detail 5, 6, 7)
        policy.train()
        clip_sum = entropy_sum = loss_sum = 0.0
        for iteration in range(args.iterations):
            with autocast:
                logp, entropy = completion_logprobs(policy, *rollout, temperature=args.temperature, return_entropy=True,
                                                    group_size=args.group_size)                         # (B, N)
                if iteration == 0 and old_logp is None:
                    old_logp = logp.detach()
                token_loss, clipped = grpo_token_loss(logp, old_logp, advantages, args.eps_low, args.eps_high, ref_logp, args.beta)
                loss = aggregate_loss(token_loss, loss_mask, args.loss_type, args.max_new_tokens)
                if ddp and args.loss_type == "dapo":
                    loss = loss * dapo_scale
            loss.backward()  # DDP averages the gradients over ranks
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_tokens = loss_mask.sum().clamp(min=1)  # the tokens that are trained on
            clip_sum += ((clipped * loss_mask).sum() / n_tokens).item()
            entropy_sum += ((entropy.detach() * loss_mask).sum() / n_tokens).item()
            loss_sum += loss.item()
        step += 1

        # ---------------------------------------------------------- metrics (detail 8)
        kl = ((old_logp - ref_logp).sum(dim=1).mean() if reference is not None else torch.zeros((), device=args.device))
        totals += torch.tensor([loss_sum / args.iterations, rewards.mean().item(),
                                (correct.sum() / has_answer.sum().clamp(min=1)).item(), think_rate, kl.item(), clip_sum / args.iterations,
                                entropy_sum / args.iterations, lengths.mean().item(), equal_groups.item()], device=args.device)
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
                print(f"grpo | step {step}/{args.steps} | loss {metrics['loss']:.4f} | reward {metrics['reward']:.3f} | "
                      f"acc {metrics['accuracy']:.1%} | think {metrics['think']:.1%} | kl {metrics['kl']:.4f} | clip {metrics['clip']:.3f} | "
                      f"entropy {metrics['entropy']:.3f} | len {metrics['length']:.1f} | equal {metrics['equal']:.0%} | "
                      f"lr {lr:.1e} | {tok_per_s / 1e3:.1f}k tok/s | {format_time(elapsed)} elapsed, {format_time((args.steps - step) / rate)} left")
                log_file.write(json.dumps({"step": step, **metrics, "lr": lr, "tok_per_s": tok_per_s}) + "\n")
                log_file.flush()

    if master:
        after = heldout_accuracy(raw_policy, tokenizer, eval_records, args.max_new_tokens)
        save_checkpoint(args.out, raw_policy, tokenizer, "grpo", parent=args.init, step=step, args=dataclasses.asdict(args),
                        metrics={"before": before, "after": after})
        print(f"grpo | done in {format_time(time.time() - start_time)}")
        print(f"grpo | before: {format_accuracy(before)}")
        print(f"grpo | after:  {format_accuracy(after)} | wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
