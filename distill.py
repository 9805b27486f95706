"""
distill.py: knowledge distillation of a teacher into a smaller student trained from scratch.
The same student trained without the teacher, side by side, is the baseline.

    out/grpo.pt (the teacher) + data/sft.jsonl  ->  out/distill.pt

Run:

    python distill.py                                     # CPU defaults, ~1 minute on 2 cores
    python distill.py --teacher out/sft.pt --alpha 0.9 --temperature 2        # any checkpoint teaches
    python distill.py --beta 0.5 --on-policy 0.5          # GKD: generalized JSD, half the steps on student replies
    python distill.py --device cuda --hidden-size 256 --num-layers 6 --steps 4000         # one GPU
    torchrun --nproc_per_node 8 distill.py --batch-size 256                  # many GPUs, no code change

Implementation details:
1. The student is the teacher's architecture at about half the width and depth (`--hidden-size`,
   `--num-layers` override it), with the same tokenizer and context and the same head size, and
   starts from random weights: whatever it knows at the end came from the data and the teacher.
2. The baseline is a copy of the student's initial weights trained in the same loop, on the same
   batches, for the same steps, on the hard labels only (alpha = 0): the with-teacher and the
   without-teacher numbers are measured side by side. `--no-baseline` skips it.
3. Hinton et al. (2015): L = (1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(student / T)),
   averaged over the tokens that count: the assistant tokens (and their <|im_end|>) of a
   {"messages"} record, every token of a {"text"} record. Soft targets at T > 1 carry the teacher's
   "dark knowledge" (how wrong each wrong token is); their gradient shrinks as 1 / T^2, so the
   T^2 factor keeps the two terms' balance independent of T. Defaults alpha 0.5, T 1 (a task has
   one right answer, so the wrong-token probabilities a high T brings out are mostly noise; try
   T 2-4 where wrong answers carry information). On the built-in data the from-scratch student
   does not beat its baseline: held-out loss 1.813 vs 1.790 with grpo.pt as teacher, 1.870 vs
   1.790 with sft.pt (README, "Read this table honestly").
4. `--beta` (GKD, Agarwal et al. 2024): the generalized Jensen-Shannon divergence
   JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s.
   beta = 0 is defined as the forward KL(P_t || P_s) (Hinton's, mode covering) and beta = 1 as
   the reverse KL(P_s || P_t) (mode seeking): the KLs it tends to, up to a factor, at the two ends
   (as TRL's GKDTrainer). JSD(0.5) is the symmetric JSD, at most log 2.
5. `--on-policy` (GKD): that share of the steps trains on replies the student samples itself
   (temperature 1), every token scored by the teacher, so the student learns on the states it
   reaches at inference, its own mistakes included. Those replies have no hard labels, so those
   steps use the divergence alone (alpha = 1). Which steps are on-policy depends only on (seed, step).
6. The teacher runs under no_grad in eval mode. Full (B, T, V) logits of both models are held:
   fine at a 1k vocab; at a 150k vocab one would compute the divergence in chunks of positions.
7. Batches, schedule, optimizer, gradient clipping, DDP and the global-batch token average are
   sft.py's. No --resume: the stage is short.
8. Evaluation after training, for teacher, student and baseline: greedy accuracy on the held-out
   prompts of data/eval.jsonl, and the held-out loss, the cross-entropy of the reference answers
   of the same prompts (rendered as conversations, never trained on), with the KL to the teacher
   there.
"""

import argparse
import ast
import copy
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

from model import (ModelConfig, Transformer, batch_indices, format_accuracy, generate, heldout_accuracy, load_checkpoint,
                   save_checkpoint)
from tokenizer import Tokenizer


@dataclass
class Args:
    teacher: str = "out/grpo.pt"
    """checkpoint of the teacher (any lm checkpoint; the default is grpo.py's policy)"""
    data: str = "data/sft.jsonl"
    """training records, one per line: {"messages": [...]} (assistant tokens count) or {"text": ...} (all count)"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for accuracy and held-out loss"""
    out: str = "out/distill.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    hidden_size: int = 0
    """student width (0 = half the teacher's)"""
    num_layers: int = 0
    """student depth (0 = half the teacher's)"""
    alpha: float = 0.5
    """weight of the soft (teacher) term; 1 - alpha goes to the hard labels; 0 = no teacher"""
    temperature: float = 1.0
    """softmax temperature T of both models in the soft term"""
    beta: float = 0.0
    """generalized JSD: 0 = forward KL (Hinton), 1 = reverse KL, in between JSD(beta)"""
    on_policy: float = 0.0
    """share of the steps trained on the student's own sampled replies, scored by the teacher (GKD)"""
    baseline: bool = True
    """also train the same student without the teacher (alpha 0) on the same batches, for comparison"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 32
    """records per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 1
    """micro-batches per optimizer step (per rank)"""
    lr: float = 3e-3
    """peak learning rate"""
    warmup: int = 30
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    max_new_tokens: int = 32
    """reply length limit for on-policy samples and the held-out evaluation"""
    log_every: int = 50
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the student"""
    seed: int = 0
    """random seed (student weights, data order, on-policy steps and samples)"""


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


# D = sum_v P(v) (log P(v) - log Q(v)) = KL(P || Q); JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M),
# M = beta P_t + (1 - beta) P_s; the ends are the KLs JSD(beta) tends to up to a factor (GKD, section 3.1)
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Divergence per position (...) between softmax(teacher_logits) and softmax(student_logits) (..., V):
    beta 0 = KL(teacher || student), beta 1 = KL(student || teacher), in between JSD(beta) (detail 4)."""
    student_logp = student_logits.float().log_softmax(dim=-1)
    teacher_logp = teacher_logits.float().log_softmax(dim=-1)
    if beta == 0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
    if beta == 1:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(dim=-1)
    mixture_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0)
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mixture_logp)).sum(dim=-1)
    kl_student = (student_logp.exp() * (student_logp - mixture_logp)).sum(dim=-1)
    return beta * kl_teacher + (1 - beta) * kl_student


# detail 3: L = (1 - alpha) CE(y, p_s) + alpha T^2 D(p_t^T, p_s^T), p^T = softmax(logits / T), mean over counted tokens
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
            temperature: float, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd): logits (B, T, V) of the student and the teacher, targets (B, T) with -100 where a
    token does not count; ce is the hard-label term, kd the divergence at temperature T (without T^2)."""
    counts = targets != -100                                                   # (B, T)
    student_logits, teacher_logits = student_logits[counts].float(), teacher_logits[counts].float()  # (N, V)
    ce = F.cross_entropy(student_logits, targets[counts])
    kd = generalized_jsd(student_logits / temperature, teacher_logits / temperature, beta).mean()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd, ce, kd


# detail 1: the teacher's architecture at about half the width and depth, the same head size
def student_config(teacher: ModelConfig, hidden_size: int = 0, num_layers: int = 0) -> ModelConfig:
    head_dim = teacher.hidden_size // teacher.num_attention_heads
    hidden_size = hidden_size or max(head_dim, teacher.hidden_size // 2 // head_dim * head_dim)
    if hidden_size % head_dim:
        raise ValueError(f"--hidden-size {hidden_size} must be a multiple of the teacher's head size {head_dim}")
    heads = hidden_size // head_dim
    kv_heads = max(1, heads * teacher.num_key_value_heads // teacher.num_attention_heads)
    while heads % kv_heads:
        kv_heads -= 1
    return dataclasses.replace(
        teacher, hidden_size=hidden_size, num_hidden_layers=num_layers or max(1, teacher.num_hidden_layers // 2),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=teacher.intermediate_size * hidden_size // teacher.hidden_size,
        moe_intermediate_size=teacher.moe_intermediate_size * hidden_size // teacher.hidden_size,
        shared_expert_intermediate_size=teacher.shared_expert_intermediate_size * hidden_size // teacher.hidden_size)


# detail 3: which tokens count; the prompt is what the student answers on on-policy steps (detail 5)
def distill_example(tokenizer: Tokenizer, record: dict, context: int) -> tuple[list[int], list[int], list[int] | None, bool]:
    """(inputs, targets, prompt, truncated): targets are the next token where it counts, -100 elsewhere;
    prompt is the conversation up to its last assistant turn (None for text)."""
    if not isinstance(record, dict):
        raise ValueError('expected {"messages": [...]} or {"text": "..."}')
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise ValueError("a conversation needs at least one assistant turn")
        ids, mask = tokenizer.encode_chat(messages)
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        prompt = tokenizer.encode_prompt(messages[:last])
    elif isinstance(record.get("text"), str):
        ids = [tokenizer.eot_id] + tokenizer.encode(record["text"]) + [tokenizer.eot_id]
        mask, prompt = [1] * len(ids), None
    else:
        raise ValueError('expected {"messages": [...]} or {"text": "..."}')
    truncated = len(ids) > context + 1
    ids, mask = ids[: context + 1], mask[: context + 1]
    targets = [token if keep else -100 for token, keep in zip(ids[1:], mask[1:])]
    return ids[:-1], targets, prompt, truncated


def pad_batch(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])  # (B, T)


# detail 5: the student writes the replies; the tokens of its replies are the ones that count
def student_rollouts(student, tokenizer: Tokenizer, rows: list[tuple], max_new_tokens: int, generator) -> list[tuple]:
    """(inputs, targets) of prompt + a sampled reply for each row (inputs, targets, prompt)."""
    context = student.config.max_position_embeddings
    prompts = [prompt[-(context - max_new_tokens):] for _, _, prompt in rows]
    student.eval()  # sample from the model itself (no dropout), then train on
    completions, _, completion_mask = generate(student, prompts, max_new_tokens, temperature=1.0,
                                               eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id, generator=generator)
    student.train()
    rollouts = []
    for prompt, completion, n in zip(prompts, completions.tolist(), completion_mask.sum(dim=1).long().tolist()):
        ids = prompt + completion[:n]
        rollouts.append((ids[:-1], [-100] * (len(prompt) - 1) + completion[:n], prompt))
    return rollouts


# detail 8: cross-entropy of the held-out answers, and the forward KL to the teacher on them
@torch.no_grad()
def heldout_loss(model, teacher, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    ce_sum = kl_sum = count = 0.0
    for inputs, targets in batches:
        counts = targets != -100
        logits, teacher_logits = model(inputs)[0][counts], teacher(inputs)[0][counts]   # (N, V)
        ce_sum += F.cross_entropy(logits, targets[counts], reduction="sum").item()
        kl_sum += generalized_jsd(logits, teacher_logits, beta=0.0).sum().item()
        count += counts.sum().item()
    return {"loss": ce_sum / count, "kl_to_teacher": kl_sum / count}


def format_time(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


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
    if not 0 <= args.alpha <= 1 or not 0 <= args.beta <= 1 or not 0 <= args.on_policy <= 1 or args.temperature <= 0:
        raise ValueError("--alpha, --beta and --on-policy must be in [0, 1] and --temperature > 0")
    if args.alpha == 0 and args.on_policy > 0:  # on-policy steps have no labels: they learn from the teacher alone
        raise ValueError("--on-policy needs the teacher (--alpha > 0): alpha 0 trains on the hard labels only")

    # -------------------------------------------------------------- data, teacher and students
    teacher, tokenizer, teacher_checkpoint = load_checkpoint(args.teacher, device=args.device, head="lm")
    teacher.eval().requires_grad_(False)  # detail 6
    context = teacher.config.max_position_embeddings
    examples, truncated = [], 0
    for line_no, record in enumerate(read_jsonl(args.data, required=()), 1):
        try:
            inputs, targets, prompt, cut = distill_example(tokenizer, record, context)
        except ValueError as e:
            raise ValueError(f"{args.data}:{line_no}: {e}") from None
        truncated += cut
        if any(t != -100 for t in targets):
            examples.append((inputs, targets, prompt))
    if len(examples) < args.batch_size:
        raise ValueError(f"{args.data}: {len(examples)} usable records, fewer than --batch-size {args.batch_size}")
    if args.on_policy > 0 and any(prompt is None for _, _, prompt in examples):
        raise ValueError(f"--on-policy needs conversations: {args.data} has {{\"text\"}} records")
    if truncated and master:
        print(f"distill | warning: {truncated} of {len(examples)} records were longer than the context ({context}) and were cut")
    lengths = [len(inputs) for inputs, _, _ in examples]
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    eval_examples = []  # detail 8: the held-out prompts with their reference answers, as conversations
    for record in eval_records:
        messages = [{"role": "user", "content": record["prompt"]}] if isinstance(record["prompt"], str) else list(record["prompt"])
        eval_examples.append(distill_example(tokenizer, {"messages": messages + [{"role": "assistant", "content": str(record["answer"])}]}, context))
    eval_batches = [(pad_batch([e[0] for e in eval_examples[i:i + 128]], tokenizer.pad_id).to(args.device),
                     pad_batch([e[1] for e in eval_examples[i:i + 128]], -100).to(args.device))
                    for i in range(0, len(eval_examples), 128)]

    config = student_config(teacher.config, args.hidden_size, args.num_layers)
    student = Transformer(config).to(args.device)  # detail 1: from scratch, seeded by --seed
    baseline = copy.deepcopy(student) if args.baseline and args.alpha > 0 else None  # detail 2: the same init
    optimizer = student.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    baseline_optimizer = baseline.configure_optimizer(args.lr, args.weight_decay, device_type=device_type) if baseline else None
    raw_student, raw_baseline = student, baseline
    if args.compile:
        student = torch.compile(student)
        baseline = baseline and torch.compile(baseline)
    if ddp:
        device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
        student = DDP(student, device_ids=device_ids)
        baseline = baseline and DDP(baseline, device_ids=device_ids)
    sample_generator = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + rank)

    # -------------------------------------------------------------- the training loop
    if master:
        print(f"distill | teacher {args.teacher} ({teacher_checkpoint.get('stage')}): {teacher.num_params(False) / 1e6:.2f}M params, "
              f"{teacher.config.num_hidden_layers} layers x {teacher.config.hidden_size} | student: "
              f"{raw_student.num_params(False) / 1e6:.2f}M params, {config.num_hidden_layers} layers x {config.hidden_size}, from scratch")
        print(f"distill | {len(examples)} records, alpha {args.alpha}, T {args.temperature}, beta {args.beta}, "
              f"on-policy {args.on_policy}, baseline {'on' if baseline else 'off'}, {world} process(es) on {args.device} in {args.dtype}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    student.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups + (baseline_optimizer.param_groups if baseline else []):
            group["lr"] = lr
        labelled = [examples[i] for i in batch_indices(lengths, args.batch_size, args.seed, step)]
        n_labelled = sum(t != -100 for _, targets, _ in labelled for t in targets)  # of the global batch
        labelled = labelled[rank::world]
        # detail 5: the same on every rank, from (seed, step)
        on_policy = torch.rand((), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step)).item() < args.on_policy
        rows, n_targets, alpha = labelled, n_labelled, args.alpha
        if on_policy:
            rows = student_rollouts(raw_student, tokenizer, labelled, args.max_new_tokens, sample_generator)
            n_targets = torch.tensor(sum(t != -100 for _, targets, _ in rows for t in targets), device=args.device)
            if ddp:
                dist.all_reduce(n_targets)
            n_targets, alpha = n_targets.item(), 1.0  # no hard labels on the student's own replies
        sums = torch.zeros(4, device=args.device)  # loss, ce, kd, baseline loss: global-batch token averages
        for micro in range(args.grad_accum):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            inputs = pad_batch([inputs for inputs, _, _ in rows[part]], tokenizer.pad_id).to(args.device)
            targets = pad_batch([targets for _, targets, _ in rows[part]], -100).to(args.device)
            share = (targets != -100).sum() / n_targets  # detail 7: this micro-batch's share of the global mean
            tokens_seen += inputs.numel() * world
            no_sync = student.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext  # sync on the last micro-step
            with torch.no_grad(), autocast:
                teacher_logits, _ = teacher(inputs)                            # (B, T, V)
            with no_sync(), autocast:
                student_logits, _ = student(inputs)                            # (B, T, V)
                loss, ce, kd = kd_loss(student_logits, teacher_logits, targets, alpha, args.temperature, args.beta)
            with no_sync():
                (loss * share * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            sums[:3] += torch.stack([loss, ce, kd]).detach() * share
            if baseline:  # detail 2: the hard labels of the same rows, the same share of the global mean
                inputs = pad_batch([inputs for inputs, _, _ in labelled[part]], tokenizer.pad_id).to(args.device)
                targets = pad_batch([targets for _, targets, _ in labelled[part]], -100).to(args.device)
                share = (targets != -100).sum() / n_labelled
                no_sync = baseline.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext  # sync on the last micro-step
                with no_sync(), autocast:
                    _, baseline_loss = baseline(inputs, targets)
                with no_sync():
                    (baseline_loss * share * world).backward()
                sums[3] += baseline_loss.detach() * share
        for model, opt in ((student, optimizer), (baseline, baseline_optimizer)):
            if model is None:
                continue
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            if ddp:
                dist.all_reduce(sums)
            if master:
                now = time.time()
                elapsed, rate = now - start_time, step / (now - start_time)
                tok_per_s, tokens_seen, last_time = tokens_seen / (now - last_time), 0, now
                loss, ce, kd, baseline_loss = sums.tolist()
                print(f"distill | step {step}/{args.steps} | loss {loss:.4f} | ce {ce:.4f} | kd {kd:.4f} | "
                      + (f"baseline loss {baseline_loss:.4f} | " if baseline else "")
                      + f"lr {lr:.1e} | {tok_per_s / 1e3:.1f}k tok/s | {format_time(elapsed)} elapsed, {format_time((args.steps - step) / rate)} left")
                log_file.write(json.dumps({"step": step, "loss": loss, "ce": ce, "kd": kd, "on_policy": on_policy,
                                           **({"baseline_loss": baseline_loss} if baseline else {}),
                                           "lr": lr, "tok_per_s": tok_per_s}) + "\n")
                log_file.flush()

    if master:  # detail 8
        results = {}
        for name, model in (("teacher", teacher), ("student", raw_student), ("baseline", raw_baseline)):
            if model is not None:
                results[name] = {**heldout_accuracy(model.eval(), tokenizer, eval_records, args.max_new_tokens),
                                 **heldout_loss(model, teacher, eval_batches), "params": model.num_params(False)}
        save_checkpoint(args.out, raw_student, tokenizer, "distill", parent=args.teacher, step=step,
                        args=dataclasses.asdict(args), metrics=results)
        print(f"distill | done in {format_time(time.time() - start_time)}")
        for name, result in results.items():
            print(f"distill | {name + ':':9s} {format_accuracy(result)} | held-out loss {result['loss']:.4f} "
                  f"| KL to teacher {result['kl_to_teacher']:.4f} | {result['params'] / 1e6:.2f}M params")
        if "baseline" in results:
            print(f"distill | the same student without -> with the teacher: accuracy {results['baseline']['accuracy']:.1%} -> "
                  f"{results['student']['accuracy']:.1%}, held-out loss {results['baseline']['loss']:.4f} -> "
                  f"{results['student']['loss']:.4f} | wrote {args.out}")
        else:
            print(f"distill | wrote {args.out}")
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
