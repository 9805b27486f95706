"""
distill.py: distillation of a teacher into a student a quarter its size. The student learns the
teacher's own replies to the training prompts (sequence-level KD), by default only the right ones;
the same student trained on the original SFT demos, from the same weights for the same steps, is
the baseline.

    out/grpo.pt (teacher) + out/student.pt (the student's start) + data/prompts.jsonl + data/sft.jsonl
        ->  out/distill.pt, out/distill_baseline.pt

Run (after `python grpo.py`, and a student pretrained at a quarter of the size, as pipeline.sh does):

    python pretrain.py --hidden-size 64 --num-layers 4 --out out/student.pt    # the student's start
    python distill.py                                     # CPU defaults, ~1 minute on 2 cores
    python distill.py --no-keep-correct                   # every teacher reply, right or wrong
    python distill.py --alpha 0.5 --temperature 2         # + Hinton's soft targets on the teacher's replies
    python distill.py --alpha 1 --beta 0.5 --on-policy 0.5          # GKD: JSD, half the steps on student replies
    python distill.py --device cuda --steps 4000          # one GPU
    torchrun --nproc_per_node 8 distill.py --batch-size 256                  # many GPUs, no code change

Implementation details:
1. Sequence-level distillation (Kim & Rush 2016): the teacher answers every training prompt of
   --data greedily (eval mode, KV cache), and the student is fine-tuned on those conversations, the
   loss on the reply tokens as in sft.py. With --keep-correct (the default) only replies whose final
   answer is right are kept (rejection sampling, as the data of DeepSeek-R1's distilled models):
   the student is not taught the teacher's mistakes (README, Results: the student against the baseline).
2. The student starts from --init, any lm checkpoint with the teacher's tokenizer; pipeline.sh
   pretrains one at 64 wide x 4 layers (a quarter of the teacher's parameters) on the same text.
3. The baseline: a copy of the student's starting weights trained in the same loop, for the same
   steps, on the original demos (--baseline-data) with the hard labels only: what the student learns
   without the teacher. Saved next to --out as *_baseline.pt, stage "distill-baseline".
4. Token-level KD, optional (--alpha > 0; Hinton et al. 2015): L = (1 - alpha) CE + alpha T^2
   KL(softmax(teacher / T) || softmax(student / T)) on the teacher's replies: soft targets carry how
   likely the teacher finds every other token; their gradient shrinks as 1 / T^2, so the T^2 factor
   keeps the two terms' balance independent of T.
5. --beta (GKD, Agarwal et al. 2024): the generalized Jensen-Shannon divergence
   JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s.
   beta = 0 is defined as the forward KL(P_t || P_s) (Hinton's, mode covering) and beta = 1 as
   the reverse KL(P_s || P_t) (mode seeking): the KLs it tends to, up to a factor, at the two ends
   (as TRL's GKDTrainer). JSD(0.5) is the symmetric JSD, at most log 2.
6. --on-policy (GKD): that share of the steps trains on replies the student samples itself
   (temperature 1) to the same prompts, every token scored by the teacher, so the student learns on
   the states it reaches at inference, its own mistakes included. Those replies have no labels, so
   those steps use the divergence alone (alpha = 1). Which steps are on-policy depends only on (seed, step).
7. The teacher runs under no_grad in eval mode, and only when a step needs its logits (alpha > 0).
   Batches, schedule, optimizer, clipping, DDP and the loss divided by batch x the mean reply tokens
   of the data set are sft.py's. No --resume: the stage is short.
8. Evaluation, for teacher, student and baseline: greedy held-out accuracy and think rate on
   data/eval.jsonl (model.heldout_accuracy). No held-out loss on the reference answers: those are
   bare answers, and a student taught to think first rightly finds them unlikely.
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

from engine import batch_indices, format_accuracy, generate, heldout_accuracy
from model import load_checkpoint, save_checkpoint
from tokenizer import Tokenizer, final_answer


@dataclass
class Args:
    teacher: str = "out/grpo.pt"
    """checkpoint of the teacher (any lm checkpoint; the default is grpo.py's policy)"""
    init: str = "out/student.pt"
    """the student's starting weights (any lm checkpoint with the teacher's tokenizer)"""
    data: str = "data/prompts.jsonl"
    """training prompts the teacher answers, one {"prompt", "answer"} per line (answer: for --keep-correct)"""
    baseline_data: str = "data/sft.jsonl"
    """what the baseline learns instead: {"messages": [...]} (assistant tokens count) or {"text": ...} (all count)"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the accuracy of teacher, student and baseline"""
    out: str = "out/distill.pt"
    """checkpoint to write; the baseline goes to the same path with _baseline.pt, the metrics with .jsonl"""
    keep_correct: bool = True
    """keep only the teacher's replies whose final answer is right (rejection sampling)"""
    alpha: float = 0.0
    """weight of the token-level soft (teacher logit) term; 1 - alpha goes to the teacher's reply tokens"""
    temperature: float = 1.0
    """softmax temperature T of both models in the soft term"""
    beta: float = 0.0
    """generalized JSD: 0 = forward KL (Hinton), 1 = reverse KL, in between JSD(beta)"""
    on_policy: float = 0.0
    """share of the steps trained on the student's own sampled replies, scored by the teacher (GKD)"""
    baseline: bool = True
    """also train the same student on --baseline-data without the teacher, for comparison"""
    steps: int = 200
    """optimizer steps"""
    batch_size: int = 32
    """conversations per optimizer step, summed over ranks and accumulation steps"""
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
    max_new_tokens: int = 48
    """reply length limit of the teacher's replies, on-policy samples and the held-out evaluation"""
    log_every: int = 50
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the student"""
    seed: int = 0
    """random seed (data order, on-policy steps and samples)"""


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
    beta 0 = KL(teacher || student), beta 1 = KL(student || teacher), in between JSD(beta) (detail 5)."""
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


# detail 4: L = (1 - alpha) CE(y, p_s) + alpha T^2 D(p_t^T, p_s^T), p^T = softmax(logits / T), mean over counted tokens
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
            temperature: float, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd): logits (B, T, V) of the student and the teacher, targets (B, T) with -100 where a
    token does not count; ce is the hard-label term, kd the divergence at temperature T (without T^2)."""
    counts = targets != -100                                                   # (B, T)
    student_logits, teacher_logits = student_logits[counts].float(), teacher_logits[counts].float()  # (N, V)
    ce = F.cross_entropy(student_logits, targets[counts])
    kd = generalized_jsd(student_logits / temperature, teacher_logits / temperature, beta).mean()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd, ce, kd


# which tokens count; the prompt is what the student answers on on-policy steps (detail 6)
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


# detail 6: the student writes the replies; the tokens of its replies are the ones that count
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


# detail 1: the teacher answers every training prompt; with keep_correct only its right replies are kept
@torch.no_grad()
def teacher_replies(teacher, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int, keep_correct: bool,
                    batch_size: int = 128) -> tuple[list[dict], int]:
    """({"messages": prompt + the teacher's greedy reply} per kept record, replies that were right). Without
    keep_correct every reply is kept, one cut off at max_new_tokens as if it ended there."""
    conversations, right = [], 0
    texts = heldout_accuracy(teacher, tokenizer, records, max_new_tokens, batch_size)["replies"]  # greedy, eval mode
    for record, text in zip(records, texts):
        correct = record.get("answer") is not None and final_answer(text) == str(record["answer"]).strip()
        right += correct
        if correct or not keep_correct:
            messages = [{"role": "user", "content": record["prompt"]}] if isinstance(record["prompt"], str) else list(record["prompt"])
            conversations.append({"messages": messages + [{"role": "assistant", "content": text}]})
    return conversations, right


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

    # -------------------------------------------------------------- teacher, student, baseline
    teacher, tokenizer, teacher_checkpoint = load_checkpoint(args.teacher, device=args.device, head="lm")
    teacher.eval().requires_grad_(False)  # detail 7
    if not os.path.exists(args.init):
        raise FileNotFoundError(f"{args.init} not found: pretrain the student first, e.g. `python pretrain.py "
                                f"--hidden-size 64 --num-layers 4 --out {args.init}` (pipeline.sh does)")
    student, student_tokenizer, _ = load_checkpoint(args.init, device=args.device, head="lm")  # detail 2
    if student_tokenizer is None or student_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{args.init} has another tokenizer than the teacher {args.teacher}: the student must share it")
    baseline = copy.deepcopy(student) if args.baseline else None  # detail 3: the same starting weights
    context = student.config.max_position_embeddings

    # -------------------------------------------------------------- the student's data: the teacher's replies (detail 1)
    records = read_jsonl(args.data, required=("prompt", "answer") if args.keep_correct else ("prompt",))
    if master:
        print(f"distill | the teacher {args.teacher} ({teacher_checkpoint.get('stage')}, {teacher.num_params(False) / 1e6:.2f}M params) "
              f"answers {len(records)} prompts of {args.data}")
    t0 = time.time()
    conversations, right = teacher_replies(teacher, tokenizer, records, args.max_new_tokens, args.keep_correct)
    if master:
        print(f"distill | {right} of {len(records)} replies right ({right / len(records):.1%}), kept {len(conversations)} "
              f"({'right ones only' if args.keep_correct else 'every finished reply'}) in {time.time() - t0:.0f}s")

    def make_examples(conversations, path):
        examples, truncated = [], 0
        for line_no, record in enumerate(conversations, 1):
            try:
                inputs, targets, prompt, cut = distill_example(tokenizer, record, context)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
            truncated += cut
            if any(t != -100 for t in targets):
                examples.append((inputs, targets, prompt))
        if len(examples) < args.batch_size:
            raise ValueError(f"{path}: {len(examples)} usable records, fewer than --batch-size {args.batch_size}")
        if truncated and master:
            print(f"distill | warning: {truncated} of {len(examples)} records of {path} were longer than the context ({context}) and were cut")
        # detail 7: the loss of a step is divided by batch x the mean counted tokens per example (sft.py detail 5)
        return examples, args.batch_size * sum(t != -100 for _, targets, _ in examples for t in targets) / len(examples)

    examples, n_targets_per_step = make_examples(conversations, f"{args.teacher}'s replies")
    if baseline:
        baseline_examples, baseline_n_targets = make_examples(read_jsonl(args.baseline_data, required=()), args.baseline_data)
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))

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
        print(f"distill | student {args.init}: {raw_student.num_params(False) / 1e6:.2f}M params, "
              f"{raw_student.config.num_hidden_layers} layers x {raw_student.config.hidden_size}; {len(examples)} teacher conversations, alpha {args.alpha}, T {args.temperature}, "
              f"beta {args.beta}, on-policy {args.on_policy}; baseline {'on ' + args.baseline_data if baseline else 'off'}; "
              f"{world} process(es) on {args.device} in {args.dtype}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    student.train()
    if baseline:
        baseline.train()
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups + (baseline_optimizer.param_groups if baseline else []):
            group["lr"] = lr
        rows = [examples[i] for i in batch_indices(len(examples), args.batch_size, args.seed, step)][rank::world]
        # detail 6: the same on every rank, from (seed, step)
        on_policy = torch.rand((), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step)).item() < args.on_policy
        n_targets, alpha = n_targets_per_step, args.alpha
        if on_policy:
            rows = student_rollouts(raw_student, tokenizer, rows, args.max_new_tokens, sample_generator)
            n_targets = torch.tensor(sum(t != -100 for _, targets, _ in rows for t in targets), device=args.device)
            if ddp:
                dist.all_reduce(n_targets)
            n_targets, alpha = n_targets.item(), 1.0  # no labels on the student's own replies
        sums = torch.zeros(4, device=args.device)  # loss, ce, kd, baseline loss
        for micro in range(args.grad_accum):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            inputs = pad_batch([inputs for inputs, _, _ in rows[part]], tokenizer.pad_id).to(args.device)
            targets = pad_batch([targets for _, targets, _ in rows[part]], -100).to(args.device)
            share = (targets != -100).sum() / n_targets  # detail 7: this micro-batch's share of the step's loss
            tokens_seen += inputs.numel() * world
            no_sync = student.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext  # sync on the last micro-step
            with no_sync(), autocast:
                student_logits, _ = student(inputs)                            # (B, T, V)
                if alpha > 0:
                    with torch.no_grad():
                        teacher_logits, _ = teacher(inputs)                    # (B, T, V)
                    loss, ce, kd = kd_loss(student_logits, teacher_logits, targets, alpha, args.temperature, args.beta)
                else:  # detail 1: plain fine-tuning on the teacher's replies
                    counts = targets != -100
                    loss = ce = F.cross_entropy(student_logits[counts].float(), targets[counts])
                    kd = torch.zeros((), device=args.device)
            with no_sync():
                (loss * share * world).backward()  # DDP averages gradients over ranks; undo the 1/world
            sums[:3] += torch.stack([loss, ce, kd]).detach() * share
        if baseline:  # detail 3: the original demos, hard labels, the same steps
            baseline_rows = [baseline_examples[i] for i in batch_indices(len(baseline_examples), args.batch_size, args.seed, step)][rank::world]
            for micro in range(args.grad_accum):
                part = slice(micro * micro_batch, (micro + 1) * micro_batch)
                inputs = pad_batch([inputs for inputs, _, _ in baseline_rows[part]], tokenizer.pad_id).to(args.device)
                targets = pad_batch([targets for _, targets, _ in baseline_rows[part]], -100).to(args.device)
                share = (targets != -100).sum() / baseline_n_targets
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
                                 "params": model.num_params(False)}
                results[name].pop("replies")
        data_metrics = {"teacher_right": right, "prompts": len(records), "kept": len(conversations)}
        save_checkpoint(args.out, raw_student, tokenizer, "distill", parent=args.teacher, step=step,
                        args=dataclasses.asdict(args), metrics={**results, **data_metrics})
        baseline_path = os.path.splitext(args.out)[0] + "_baseline.pt"
        if raw_baseline is not None:
            save_checkpoint(baseline_path, raw_baseline, tokenizer, "distill-baseline", parent=args.init, step=step,
                            args=dataclasses.asdict(args), metrics={"baseline": results["baseline"]})
        print(f"distill | done in {format_time(time.time() - start_time)}")
        for name, result in results.items():
            print(f"distill | {name + ':':9s} {format_accuracy(result)} | {result['params'] / 1e6:.2f}M params")
        if "baseline" in results:
            print(f"distill | the same student without -> with the teacher: accuracy {results['baseline']['accuracy']:.1%} -> "
                  f"{results['student']['accuracy']:.1%}, think {results['baseline']['think_rate']:.1%} -> "
                  f"{results['student']['think_rate']:.1%} | wrote {args.out} and {baseline_path}")
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
