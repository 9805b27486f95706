"""
ppo.py: RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT, arXiv:2203.02155).

Run (after sft.py and reward.py), out/sft.pt + out/reward.pt + data/prompts.jsonl -> out/ppo.pt:

    python ppo.py                                                   # CPU defaults
    python ppo.py --device cuda --prompts-per-step 256 --minibatches 4 --steps 500   # one GPU
    torchrun --nproc_per_node 8 ppo.py --prompts-per-step 1024                      # many GPUs

Implementation details:
1. Rollout (engine.rollout): a reply to each of `prompts_per_step` prompts; old log-probs from the
   loss's own call, so the ratio starts at exactly 1.
2. Four models, as TRL's PPOTrainer: policy and frozen reference from sft.pt, frozen reward model
   and critic (its own trunk) from reward.pt. Score: normalised as reward.py stored it, minus
   `missing_eos_penalty` for a reply that never emitted <|im_end|> (TRL's).
3. r_t = -kl_coef (logp_t - ref_logp_t) + the score at the last real token (Ziegler et al.; KL in
   the reward, not the loss; `--adaptive-kl` steers kl_coef). A process reward model (reward.py
   --process): 2 P(step right) - 1 at each step's last token; critic: its trunk, score head at 0.
4. GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, R_t = A_t + V_t,
   0 past the last real token; A whitened over the real tokens (engine.masked_whiten, TRL's).
5. Policy loss: token mean of -min(ratio A, clip(ratio, 1 +- clip) A); value loss: 0.5 token mean
   of max((V - R)^2, (V_old + clip(V - V_old, +-vf_clip) - R)^2); loss = policy + vf_coef * value.
6. `ppo_epochs` passes over `minibatches` shuffled minibatches, stopped once the approximate KL to
   the rollout policy, mean((ratio - 1) - log ratio) over ranks, exceeds `target_kl` (CleanRL).
7. Logged: score, accuracy (true answers, never shown to the reward model), think rate, KL to the
   reference, clip, approx KL, value loss, explained variance, entropy, length, updates, kl_coef.
8. `--lora-rank r` trains a LoRA adapter on the policy (the critic in full, as TRL); the reference
   is the policy with it off. Its dropout must be 0, or the ratio would not start at 1.
9. `--save-samples`: the trained policy's own replies, 4 to each of `sample_prompts` prompts,
   for the labeler (`python data.py label`) in iterative RL (DeepSeekMath 4.1.4; iterate.sh).
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

from engine import (approximate_kl, batch_indices, completion_logprobs, completion_values,
                    encode_prompts, explained_variance, format_accuracy, heldout_accuracy,
                    judge_replies, load_policy, load_reward, load_value_model, masked_mean,
                    masked_whiten, mean_over_ranks, minibatches, rollout, save_samples)
from model import save_checkpoint


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
    steps: int = 20
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
    lr: float = 2e-4
    """peak learning rate of the policy and the value model"""
    warmup: int = 5
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip each model's global gradient norm at this value (0 = off)"""
    kl_coef: float = 0.4
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
    grad_checkpoint: bool = False
    """recompute each block's activations in the backward pass: less memory, more compute"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and optimizer state over the ranks (fsdp.py)"""
    seed: int = 0
    """random seed (prompt order, sampling, minibatches)"""
    lora_rank: int = 0
    """LoRA: rank of the trained update of each target layer (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA: the update is scaled by alpha / rank"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input (must be 0 here: detail 8)"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """LoRA: the layers that get an adapter (add gate_proj,up_proj,down_proj for the MLP too)"""
    save_samples: str = ""
    """after training, write replies sampled from the policy to this JSONL file (detail 9)"""
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


# ----------------------------------------------------------------------------- ALGO LOGIC: PPO

# detail 3: r_t = -kl_coef * (logp_t - ref_logp_t) + step reward_t, + score at the last real token
def ppo_rewards(logp, ref_logp, scores, completion_mask, kl_coef, step_rewards=None):
    """(B, N) from logp, ref_logp, completion_mask, step_rewards (B, N) and scores (B,)."""
    rewards = -kl_coef * (logp - ref_logp) * completion_mask                 # (B, N)
    if step_rewards is not None:
        rewards = rewards + step_rewards * completion_mask
    last = (completion_mask.sum(dim=1).long() - 1).clamp(min=0)              # (B,) right-padded
    return rewards.index_put((torch.arange(len(last), device=last.device), last), scores,
                             accumulate=True)


# detail 4: delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};
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


# detail 5: ratio = exp(logp - old_logp);  L = token mean of -min(ratio A, clip(ratio) A)
def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """Loss () and where the clip removed the gradient (B, N); every argument (B, N)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    clipped = ((ratio > 1 + clip) & (advantages > 0)) | ((ratio < 1 - clip) & (advantages < 0))
    return masked_mean(-surrogate, mask), clipped


# detail 5: L_V = 0.5 * token mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
def ppo_value_loss(values, old_values, returns, mask, vf_clip):
    clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# detail 3: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al. 2019)
def adaptive_kl_coef(kl_coef, kl, target, horizon, n_replies):
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_replies / horizon)


def main(args: Args):
    if args.temperature <= 0:  # the loss divides the logits by it
        raise ValueError(f"--temperature {args.temperature}: PPO samples, so it must be > 0")
    if args.lora_dropout:  # detail 8
        raise ValueError(f"--lora-dropout {args.lora_dropout}: must be 0 (see detail 8)")
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.prompts_per_step % (world * args.minibatches):
        raise ValueError(f"--prompts-per-step {args.prompts_per_step}: not divisible by ranks x "
                         f"--minibatches = {world * args.minibatches}")
    minibatch_size = args.prompts_per_step // (world * args.minibatches)
    lora = (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    policy, tokenizer, reference, as_reference = load_policy(args.init, args.device, lora)
    reward = load_reward(args.reward_model, tokenizer, args.device)  # detail 2: four models
    value_model = load_value_model(args.reward_model, args.device)
    context = policy.config.max_position_embeddings
    data = read_jsonl(args.data, ("prompt",))
    records, too_long = encode_prompts(tokenizer, data, args.max_new_tokens, context, args.data,
                                       args.prompts_per_step)
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    value_optimizer = value_model.configure_optimizer(args.lr, args.weight_decay,
                                                      device_type=device_type)
    # policy and critic as they train (compiled, in DDP or sharded); rollouts use the plain modules
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    policy.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    value_model.grad_checkpoint = args.grad_checkpoint
    model, critic = (torch.compile(m) if args.compile else m for m in (policy, value_model))
    if ddp and not args.fsdp:
        model, critic = DDP(model, device_ids=device_ids), DDP(critic, device_ids=device_ids)
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1000 + rank)  # ranks differ
    kl_coef = args.kl_coef
    if master:  # detail 7: held-out accuracy and score before training
        before = heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens,
                                  score=reward)
        print(f"ppo | {len(records)} prompts ({too_long} too long for the context), "
              f"{args.prompts_per_step} replies per step, {world} process(es) on {args.device} in "
              f"{args.dtype}" + (", reference the policy, adapter off" if args.lora_rank else ""))
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(policy, optimizer, bf16=args.dtype == "bfloat16")
        shard(value_model, value_optimizer, bf16=args.dtype == "bfloat16")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups + value_optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(len(records), args.prompts_per_step, args.seed, step)[rank::world]
        prompts, answers = zip(*[records[i] for i in indices])

        # ---------------------------------------------------------- rollout (detail 1, 2)
        with torch.no_grad(), autocast:
            batch, old_logp, ref_logp = rollout(policy, tokenizer, prompts, args.max_new_tokens,
                                                args.temperature, sampler, reference, as_reference)
            old_values, scores = completion_values(value_model, *batch), reward(batch)
        prompt_ids, _, completion_ids, completion_mask = batch
        tokens_seen += (prompt_ids.numel() + completion_ids.numel()) * world
        _, ended, accuracy, think = judge_replies(tokenizer, *batch[2:], answers)

        # ---------------------------------------------------------- rewards, GAE (detail 2, 3, 4)
        process = scores.dim() == 2  # detail 3: a process reward model's step rewards (B, N)
        step_rewards, scores = (scores, scores.sum(dim=1)) if process else (None, scores)
        penalized_scores = (0 if process else scores) - args.missing_eos_penalty * (~ended).float()
        rewards = ppo_rewards(old_logp, ref_logp, penalized_scores, completion_mask, kl_coef,
                              step_rewards)
        advantages, returns = gae(rewards, old_values, completion_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, completion_mask)
        kl = mean_over_ranks((old_logp - ref_logp).sum(dim=1).mean(), ddp)          # sequence KL

        # ---------------------------------------------------------- PPO updates (detail 5, 6)
        model.train()
        critic.train()
        update_sums, updates = {}, 0
        for rows in minibatches(len(prompts), minibatch_size, args.ppo_epochs, args.device):
            minibatch, mask = [x[rows] for x in batch], completion_mask[rows]
            with autocast:
                logp, entropy = completion_logprobs(model, *minibatch, return_entropy=True,
                                                    temperature=args.temperature)
                values = completion_values(critic, *minibatch)
                policy_loss, clipped = ppo_policy_loss(logp, old_logp[rows], advantages[rows],
                                                       mask, args.clip)
                value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask,
                                            args.vf_clip)
                loss = policy_loss + args.vf_coef * value_loss
            loss.backward()  # DDP averages the gradients over ranks
            for trained, trained_optimizer in ((model, optimizer), (critic, value_optimizer)):
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trained.parameters(), args.grad_clip)
                trained_optimizer.step()
                trained_optimizer.zero_grad(set_to_none=True)
            updates += 1
            # detail 6: averaged over ranks, so that every rank stops at the same update
            approx_kl = mean_over_ranks(approximate_kl(logp.detach(), old_logp[rows], mask), ddp)
            update = {"loss": loss.detach(), "clip": masked_mean(clipped.float(), mask),
                      "approx_kl": approx_kl, "value_loss": value_loss.detach(),
                      "entropy": masked_mean(entropy.detach(), mask)}
            update_sums = {name: update_sums.get(name, 0) + value for name, value in update.items()}
            if args.target_kl > 0 and approx_kl.item() > args.target_kl:
                break
        if args.adaptive_kl:  # detail 3
            kl_coef = adaptive_kl_coef(kl_coef, kl.item(), args.kl_target, args.kl_horizon,
                                       args.prompts_per_step)
        step += 1

        # ---------------------------------------------------------- metrics (detail 7)
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

    policy = gathered(policy) if args.fsdp else policy  # all ranks gather
    if master:
        after = heldout_accuracy(policy, tokenizer, eval_records, args.max_new_tokens, score=reward)
        save_checkpoint(args.out, policy, tokenizer, "ppo", parent=args.init, step=step,
                        args=dataclasses.asdict(args), metrics={"before": before, "after": after})
        print(f"ppo | done in {format_time(time.time() - start_time)}")
        print(f"ppo | before: {format_accuracy(before)} | score {before['score']:.3f}")
        print(f"ppo | after:  {format_accuracy(after)} | score {after['score']:.3f} | "
              f"wrote {args.out}")
        if args.save_samples:  # detail 9
            count = save_samples(args.save_samples, policy, tokenizer, data, args.sample_prompts,
                                 args.max_new_tokens, args.temperature, sampler, args.seed)
            print(f"ppo | wrote 4 replies to each of {count} prompts to {args.save_samples}")
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
