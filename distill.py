"""
distill.py: knowledge distillation of a teacher into a student a quarter its size.
The student learns the teacher's own replies to the training prompts, by default the right ones.

    out/grpo.pt (the teacher) + out/student.pt (its start) + data/prompts.jsonl  ->  out/distill.pt

Run after grpo.py and the student's pretraining (pretrain.py --hidden-size 64 --num-layers 4 --out
out/student.pt). Its baseline is sft.py on out/student.pt with the same budget (pipeline.sh).

    python distill.py                                     # CPU defaults
    python distill.py --alpha 0.5 --temperature 2         # + Hinton's soft targets
    python distill.py --alpha 1 --beta 0.5 --on-policy 0.5    # GKD: JSD, half the steps on-policy
    python distill.py --device cuda --steps 4000          # one GPU
    torchrun --nproc_per_node 8 distill.py --batch-size 256       # many GPUs, no code change

Implementation details:
1. Sequence-level KD (Kim & Rush 2016): the teacher answers every prompt greedily and the student
   is fine-tuned on those conversations, the loss on the reply tokens. --keep-correct keeps only
   the right replies (rejection sampling, as for DeepSeek-R1's distilled models); a prompt without
   an answer keeps its reply. --chat-data adds conversations as written (small talk, stories), as
   R1's students learned what is not reasoning from the base model's SFT data: the student talks.
2. Token-level KD (Hinton et al. 2015), --alpha > 0: L = (1 - alpha) CE + alpha T^2 D(p_t^T, p_s^T)
   with p^T = softmax(logits / T): the soft targets' gradient shrinks as 1 / T^2, the T^2 undoes it.
3. --beta (GKD, Agarwal et al. 2024): D = JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M),
   M = beta P_t + (1 - beta) P_s; beta 0 is KL(P_t || P_s), beta 1 KL(P_s || P_t), as in TRL.
4. --on-policy (GKD): that share of the steps, drawn from (seed, step), trains on replies the
   student samples, every token scored by the teacher, with the divergence alone (alpha = 1).
5. The teacher runs in eval mode without gradients, only when its logits count (alpha > 0).
   Batches (the micro-batches by length), schedule, optimizer, clipping, DDP (or --fsdp), the loss's
   constant denominator: sft's.
6. Teacher and student: greedy held-out accuracy and think rate on --eval-data.
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import (batch_indices, by_length, format_accuracy, generate, heldout_accuracy,
                    right_pad)
from model import load_checkpoint, save_checkpoint
from tokenizer import Tokenizer, final_answer


@dataclass
class Args:
    teacher: str = "out/grpo.pt"
    """checkpoint of the teacher (any lm checkpoint; the default is grpo.py's policy)"""
    init: str = "out/student.pt"
    """the student's starting weights (any lm checkpoint with the teacher's tokenizer)"""
    data: str = "data/prompts.jsonl"
    """training prompts the teacher answers, one {"prompt", "answer"} per line"""
    chat_data: str = ""
    """conversations {"messages"} trained on as written, no teacher (data/chat.jsonl: small talk)"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers, for the accuracy of teacher and student"""
    out: str = "out/distill.pt"
    """checkpoint to write (the metrics go to the same path with .jsonl)"""
    keep_correct: bool = True
    """keep only the teacher's replies whose final answer is right (rejection sampling)"""
    alpha: float = 0.0
    """weight of the token-level soft (teacher logit) term; 1 - alpha goes to the hard labels"""
    temperature: float = 1.0
    """softmax temperature T of both models in the soft term"""
    beta: float = 0.0
    """generalized JSD: 0 = forward KL (Hinton), 1 = reverse KL, in between JSD(beta)"""
    on_policy: float = 0.0
    """share of the steps trained on the student's own sampled replies, scored by the teacher"""
    steps: int = 400
    """optimizer steps"""
    batch_size: int = 32
    """conversations per optimizer step, summed over ranks and accumulation steps"""
    grad_accum: int = 2
    """micro-batches per optimizer step (per rank), the step's rows sorted by length (sft's)"""
    lr: float = 3e-3
    """peak learning rate"""
    warmup: int = 30
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0 = off)"""
    max_new_tokens: int = 48
    """reply length limit of the teacher's replies, on-policy samples and the evaluation"""
    log_every: int = 50
    """print a progress line every N steps"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """bfloat16, float32 or auto (bfloat16 where supported, else float32)"""
    compile: bool = False
    """torch.compile the student"""
    grad_checkpoint: bool = False
    """recompute each block's activations in the backward pass: less memory, more compute"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and optimizer state over the ranks (fsdp.py)"""
    seed: int = 0
    """random seed (data order, on-policy steps and samples)"""


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


# detail 3: KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)); M = beta P_t + (1 - beta) P_s,
# JSD(beta) = beta KL(P_t || M) + (1 - beta) KL(P_s || M) (GKD, section 3.1)
def generalized_jsd(student_logits, teacher_logits, beta: float = 0.0) -> torch.Tensor:
    """Divergence per position (...) between the softmax of logits (..., V) (detail 3)."""
    def kl(p_logp, q_logp):  # KL(P || Q) from log-probabilities (..., V)
        return (p_logp.exp() * (p_logp - q_logp)).sum(dim=-1)
    student_logp = student_logits.float().log_softmax(dim=-1)
    teacher_logp = teacher_logits.float().log_softmax(dim=-1)
    if beta in (0, 1):
        return kl(teacher_logp, student_logp) if beta == 0 else kl(student_logp, teacher_logp)
    mixture_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                                student_logp + math.log(1 - beta)]), dim=0)
    return beta * kl(teacher_logp, mixture_logp) + (1 - beta) * kl(student_logp, mixture_logp)


# detail 2: L = (1 - alpha) CE(y, p_s) + alpha T^2 D(p_t^T, p_s^T), p^T = softmax(logits / T)
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
            targets: torch.Tensor, alpha: float, temperature: float, beta: float = 0.0) -> tuple:
    """(loss, ce, kd), means over the counted tokens: logits (B, T, V), targets (B, T) -100 where
    a token does not count; ce is the hard-label term, kd the divergence at T (without T^2)."""
    counts = targets != -100                                                   # (B, T)
    student_logits = student_logits[counts].float()                            # (N, V)
    ce = F.cross_entropy(student_logits, targets[counts])
    if teacher_logits is None:  # alpha 0: plain fine-tuning, no teacher pass (details 1, 5)
        return ce, ce, torch.zeros((), device=ce.device)
    teacher_logits = teacher_logits[counts].float()                            # (N, V)
    kd = generalized_jsd(student_logits / temperature, teacher_logits / temperature, beta).mean()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd, ce, kd


# detail 1: the tokens that count are the reply's; the prompt is what on-policy steps answer
def distill_example(tokenizer: Tokenizer, record: dict, context: int) -> tuple:
    """(inputs, targets, prompt, truncated) of {"messages": [..., reply]}: targets are the next
    tokens where they are the assistant's, else -100; prompt is the messages before the reply."""
    ids, mask = tokenizer.encode_chat(record["messages"])
    prompt = tokenizer.encode_prompt(record["messages"][:-1])
    targets = [token if keep else -100 for token, keep in zip(ids[1:], mask[1:])]
    return ids[:-1][:context], targets[:context], prompt, len(ids) > context + 1


# detail 4: the student writes the replies; the tokens of its replies are the ones that count
def student_rollouts(student, tokenizer: Tokenizer, rows: list, max_new_tokens: int, generator):
    """(inputs, targets, prompt) of each row's prompt + a reply the student samples."""
    context = student.config.max_position_embeddings
    prompts = [prompt[-(context - max_new_tokens):] for _, _, prompt in rows]
    student.eval()  # sample from the model itself (no dropout), then train on
    completions, _, mask = generate(student, prompts, max_new_tokens, eos_id=tokenizer.im_end_id,
                                    pad_id=tokenizer.pad_id, generator=generator)  # temperature 1
    student.train()
    replies = [c[:n] for c, n in zip(completions.tolist(), mask.sum(dim=1).long().tolist())]
    return [((p + r)[:-1], [-100] * (len(p) - 1) + r, p) for p, r in zip(prompts, replies)]


# detail 1: the teacher answers every training prompt; keep_correct keeps its right replies only
def teacher_replies(teacher, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int,
                    keep_correct: bool, batch_size: int = 512) -> tuple[list[dict], int]:
    """({"messages": prompt + the teacher's greedy reply} per kept record, how many were right).
    Without keep_correct every reply is kept, one cut at max_new_tokens as if it ended there."""
    conversations, right = [], 0
    texts = heldout_accuracy(teacher, tokenizer, records, max_new_tokens, batch_size)["replies"]
    for record, text in zip(records, texts):
        answer = record.get("answer")
        correct = answer is not None and final_answer(text) == str(answer).strip()
        right += correct
        if correct or answer is None or not keep_correct:  # no answer: nothing to check
            prompt = record["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            conversations.append({"messages": [*prompt, {"role": "assistant", "content": text}]})
    return conversations, right


def main(args: Args):
    if not (0 <= args.alpha <= 1 and 0 <= args.beta <= 1 and 0 <= args.on_policy <= 1
            and args.temperature > 0):
        raise ValueError("--alpha, --beta and --on-policy must be in [0, 1] and --temperature > 0")
    ddp, rank, world, device_type, autocast = setup(args)
    master = rank == 0
    torch.manual_seed(args.seed)
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by ranks x "
                         f"--grad-accum = {world * args.grad_accum}")
    # -------------------------------------------------------------- teacher and student
    teacher, tokenizer, _ = load_checkpoint(args.teacher, args.device, head="lm")
    teacher.eval().requires_grad_(False)  # detail 5
    if not os.path.exists(args.init):
        raise FileNotFoundError(f"{args.init} not found: pretrain the student first (pipeline.sh)")
    student, student_tokenizer, _ = load_checkpoint(args.init, args.device, head="lm")
    if student_tokenizer is None or student_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{args.init} has another tokenizer than the teacher {args.teacher}")
    raw_student, context = student, student.config.max_position_embeddings
    # -------------------------------------------------------------- the data: the teacher's replies
    records = read_jsonl(args.data, ("prompt", "answer") if args.keep_correct else ("prompt",))
    chats = read_jsonl(args.chat_data, ("messages",)) if args.chat_data else []
    for line_no, chat in enumerate(chats, 1):  # as sft.py's conversations
        if not isinstance(chat["messages"], list) or not any(
                isinstance(m, dict) and m.get("role") == "assistant" for m in chat["messages"]):
            raise ValueError(f"{args.chat_data}:{line_no}: a conversation needs at least one "
                             f"assistant turn")
    conversations, right = teacher_replies(teacher, tokenizer, records, args.max_new_tokens,
                                           args.keep_correct)
    examples = [distill_example(tokenizer, c, context) for c in conversations + chats]
    truncated = sum(cut for *_, cut in examples)
    examples = [example[:3] for example in examples if any(t != -100 for t in example[1])]
    if len(examples) < args.batch_size:
        raise ValueError(f"{args.teacher}'s replies: {len(examples)} usable, fewer than "
                         f"--batch-size {args.batch_size}")
    n_targets_per_step = args.batch_size * sum(t != -100 for _, targets, _ in examples
                                               for t in targets) / len(examples)  # detail 5
    eval_records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    if master:
        print(f"distill | {right} of {len(records)} teacher replies right, {len(conversations)} "
              f"kept, {len(chats)} chats as written, {truncated} cut at the context; {world} "
              f"process(es) on {args.device}")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        log_file = open(os.path.splitext(args.out)[0] + ".jsonl", "w")
    optimizer = student.configure_optimizer(args.lr, args.weight_decay, device_type=device_type)
    student.grad_checkpoint = args.grad_checkpoint  # model.py detail 12
    student = torch.compile(student) if args.compile else student
    device_ids = [torch.device(args.device).index] if device_type == "cuda" else None
    student = DDP(student, device_ids=device_ids) if ddp and not args.fsdp else student
    sampler = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + rank)
    if args.fsdp:  # weights, gradients and optimizer state split over the ranks (fsdp.py), not DDP
        from fsdp import gathered, shard
        shard(raw_student, optimizer, bf16=args.dtype == "bfloat16")
    # -------------------------------------------------------------- the training loop
    start_time, last_time, tokens_seen, step = time.time(), time.time(), 0, 0
    sums, steps_since_log = {}, 0
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batch_indices(len(examples), args.batch_size, args.seed, step)
        rows = [examples[i] for i in indices][rank::world]
        coin = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # detail 4: all ranks
        on_policy = torch.rand((), generator=coin).item() < args.on_policy
        n_targets, alpha = n_targets_per_step, args.alpha
        if on_policy:  # detail 4: the divergence alone (no labels on the student's replies)
            rows = student_rollouts(raw_student, tokenizer, rows, args.max_new_tokens, sampler)
            count = torch.tensor(sum(t != -100 for row in rows for t in row[1]), device=args.device)
            if ddp:
                dist.all_reduce(count)
            n_targets, alpha = count.item(), 1.0
        step_sums = torch.zeros(3, device=args.device)  # loss, ce, kd
        for micro, part in enumerate(by_length(rows, args.grad_accum, lambda row: len(row[0]))):
            inputs, _ = right_pad([row[0] for row in part], tokenizer.pad_id, args.device)  # (B, T)
            targets, _ = right_pad([row[1] for row in part], -100, args.device)            # (B, T)
            share = (targets != -100).sum() / n_targets  # detail 5: its share of the step's loss
            tokens_seen += inputs.numel() * world
            # gradients are synchronised on the last micro-step only
            no_sync = student.no_sync if ddp and micro < args.grad_accum - 1 else nullcontext
            with no_sync(), autocast:
                student_logits, _ = student(inputs)                            # (B, T, V)
                with torch.no_grad():  # detail 5: the teacher only where its logits count
                    teacher_logits = teacher(inputs)[0] if alpha > 0 else None  # (B, T, V)
                loss, ce, kd = kd_loss(student_logits, teacher_logits, targets, alpha,
                                       args.temperature, args.beta)
            with no_sync():
                (loss * share * world).backward()  # DDP averages gradients; undo the 1/world
            step_sums += torch.stack([loss, ce, kd]).detach() * share
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss, ce, kd = (step_sums * world).tolist()  # this rank's share, as a whole-batch value
        metrics = {"loss": loss, "ce": ce, "kd": kd, "on_policy": float(on_policy)}
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
        steps_since_log += 1
        if step % args.log_every == 0 or step == args.steps:
            logged = mean_metrics(sums, steps_since_log, ddp, args.device)
            sums, steps_since_log = {}, 0
            if master:
                now = time.time()
                logged.update(lr=lr, tok_per_s=tokens_seen / (now - last_time))
                tokens_seen, last_time = 0, now
                print(progress_line("distill", step, args.steps, logged, now - start_time))
                log_file.write(json.dumps({"step": step, **logged}) + "\n")
                log_file.flush()

    raw_student = gathered(raw_student) if args.fsdp else raw_student  # all ranks gather
    if master:  # detail 6
        print(f"distill | done in {format_time(time.time() - start_time)}")
        results = {"teacher_right": right, "prompts": len(records), "kept": len(conversations),
                   "chats": len(chats)}
        for name, model in (("teacher", teacher), ("student", raw_student)):
            result = heldout_accuracy(model.eval(), tokenizer, eval_records, args.max_new_tokens)
            result.pop("replies")
            results[name] = {**result, "params": model.num_params(False)}
            print(f"distill | {name + ':':9s} {format_accuracy(result)} | "
                  f"{model.num_params(False) / 1e6:.2f}M params")
        save_checkpoint(args.out, raw_student, tokenizer, "distill", parent=args.teacher,
                        step=step, args=dataclasses.asdict(args), metrics=results)
        print(f"distill | wrote {args.out}")
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
