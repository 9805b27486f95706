"""
eval.py: every checkpoint side by side on the same held-out data, as one markdown table.

    out/*.pt + data/eval.jsonl, chat_eval.jsonl, pretrain_val.txt  ->  a table and out/eval.json

Run:

    python eval.py                                        # every out/*.pt
    python eval.py --checkpoints "out/sft.pt out/grpo.pt" # some checkpoints (paths or globs)
    python eval.py --plot                    # also out/eval.png: accuracy and think rate, RL curves
    python eval.py --device cuda                          # one GPU

Columns (one row per checkpoint):
1. stage and parameters (all of them, embeddings included).
2. held-out accuracy: greedy replies to the prompts of --eval-data, the reply's final answer
   (tokenizer.final_answer) against the answer, overall and per task family
   (engine.heldout_accuracy, the numbers every stage prints); think = the share of replies that
   start with <think>; forced think = the accuracy when every reply is made to start with <think>
   (how well the model executes its traces); well-formed = the share that end with <|im_end|>.
   win vs sft: the greedy reply against the reference's (sft.pt) to each prompt, judged by
   data.py's labeler `prefer`, ties half: 50 % is "as good as sft".
3. reward: the reward model's score of the replies, normalised with the mean and std of the
   rewards of its training replies that reward.py stores (0 is an average training reply).
4. KL to sft: mean over reply tokens of log pi(token) - log pi_sft(token), on replies SAMPLED
   from the checkpoint (temperature 1, fixed seed) for `--samples` prompts spread over the
   families: an unbiased estimate of the per-token KL(pi || pi_sft). The reward and the reply
   length use the same samples. (ppo.py and grpo.py log the KL of a whole reply.)
5. val bpb: bits per byte on --val-data (tokenizer.read_documents), the summed cross-entropy of
   the scored tokens in bits over the UTF-8 bytes they encode (<|endoftext|>: 0 bytes), in
   windows of the model's context: what post-training costs the language model.
6. chat: the share of the held-out chat prompts of --chat-data (greetings, stories) whose greedy
   reply (up to --chat-tokens) answers in kind by data.py's `chat_in_kind`: a greeting back, a
   story naming the animal asked for, never a think block or a number. Blank without the file.
7. The reward model (a score head) has no replies: its row holds its held-out pairwise accuracy
   (from its checkpoint's metrics) in the accuracy column, blanks elsewhere; a process reward
   model (reward.py --process) its held-out step accuracy.
8. vote@K (`--vote "1 4 16"`, "accuracy/vote@K" in eval.json): self-consistency (Wang et al. 2022),
   the accuracy of the majority final answer of K replies at --vote-temperature (vote_accuracy).
A cell is blank when it does not apply or its input is missing (no reward.pt, no sft.pt, a
different tokenizer). Rows are in pipeline order.
"""

import argparse
import ast
import dataclasses
import glob
import inspect
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from data import CHAT_KINDS, chat_in_kind, win_rate
from engine import (completion_logprobs, generate, heldout_accuracy, left_pad, sequence_scores,
                    vote_accuracy)
from model import STAGES, load_checkpoint
from tokenizer import read_documents


@dataclass
class Args:
    checkpoints: str = "out/*.pt"
    """checkpoints to evaluate: paths or globs, separated by spaces"""
    eval_data: str = "data/eval.jsonl"
    """held-out prompts with answers"""
    chat_data: str = "data/chat_eval.jsonl"
    """held-out chat prompts {"prompt", "kind", "animal"}, judged by data.chat_in_kind (the chat
    column is blank without the file)"""
    chat_tokens: int = 96
    """reply length limit for the chat prompts, enough for a story's first sentences (less where
    the model's context is shorter)"""
    val_data: str = "data/pretrain_val.txt"
    """held-out text for bits per byte: .txt (documents separated by a blank line) or .jsonl"""
    reference: str = "out/sft.pt"
    """the model the KL is measured against (the column is blank without it)"""
    reward_model: str = "out/reward.pt"
    """score-head checkpoint for the reward column (blank without it)"""
    out: str = "out/eval.json"
    """where the table is written as JSON (the plot goes next to it)"""
    max_new_tokens: int = 48
    """reply length limit"""
    samples: int = 100
    """prompts (evenly spread over --eval-data) whose sampled replies give the reward, KL and
    length columns (0 = all)"""
    vote: str = ""
    """self-consistency: sample sizes K separated by spaces, e.g. "1 4 16", a vote@K column each"""
    vote_temperature: float = 1.0
    """sampling temperature of the --vote replies (0: greedy)"""
    val_tokens: int = 8192
    """tokens of --val-data used for bits per byte"""
    batch_size: int = 128
    """prompts or windows per forward pass"""
    plot: bool = False
    """also plot accuracy and think rate per checkpoint and the RL curves to eval.png
    (needs matplotlib)"""
    device: str = "auto"
    """cuda, mps, cpu or auto (the first available)"""
    seed: int = 0
    """sampling seed"""


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


# column 4: KL(pi || pi_ref) per token ~ mean over sampled reply tokens of log pi - log pi_ref
@torch.no_grad()
def sampled_replies(model, tokenizer, records, max_new_tokens, batch_size, seed, reference=None,
                    reward_model=None):
    """Sample a reply to each prompt; -> mean reply length (tokens), KL to the reference per
    token, mean reward."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    device = next(model.parameters()).device
    lengths, kl_sum, scores = [], 0.0, []
    for start in range(0, len(records), batch_size):
        prompts = [tokenizer.encode_prompt(r["prompt"]) for r in records[start:start + batch_size]]
        # at temperature 1 with no top-k / top-p, the log-probs of the samples are the model's own
        completion_ids, logp, completion_mask = generate(
            model, prompts, max_new_tokens, temperature=1.0, eos_id=tokenizer.im_end_id,
            pad_id=tokenizer.pad_id, generator=generator)
        prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, device)
        lengths += completion_mask.sum(dim=1).tolist()
        if reference is not None:
            ref_logp = completion_logprobs(reference, prompt_ids, prompt_mask, completion_ids,
                                           completion_mask)  # (B, N)
            kl_sum += ((logp - ref_logp) * completion_mask).sum().item()
        if reward_model is not None:
            scores += sequence_scores(reward_model, prompt_ids, prompt_mask, completion_ids,
                                      completion_mask).tolist()
    return {"reply_length": sum(lengths) / len(lengths),
            "kl_to_sft": kl_sum / sum(lengths) if reference is not None else None,
            "reward": sum(scores) / len(scores) if reward_model is not None else None}


# column 5: bits per byte = summed loss in bits / bytes of the scored tokens (tokenizer-free)
@torch.no_grad()
def bits_per_byte(model, tokenizer, tokens: torch.Tensor, batch_size: int) -> float | None:
    context = model.config.max_position_embeddings
    windows = tokens[: (len(tokens) - 1) // context * context + 1]
    if len(windows) < context + 1:
        return None
    inputs, targets = windows[:-1].view(-1, context), windows[1:].view(-1, context)  # (W, T)
    device = next(model.parameters()).device
    loss_sum = 0.0
    for start in range(0, len(inputs), batch_size):  # the cross-entropy alone (no router loss)
        logits, _ = model(inputs[start:start + batch_size].to(device))
        batch_targets = targets[start:start + batch_size].flatten().to(device)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), batch_targets, reduction="sum").item()
    return loss_sum / math.log(2) / tokenizer.count_bytes(targets.flatten())


# column 6: chat rate = share of the held-out chat prompts whose greedy reply is in kind
def chat_rate(model, tokenizer, records, max_new_tokens, batch_size) -> float | None:
    """Greedy replies to the chat prompts (the context permitting, up to max_new_tokens), judged
    by data.chat_in_kind; None if the context leaves no room for a reply."""
    longest = max(len(tokenizer.encode_prompt(r["prompt"])) for r in records)
    room = min(max_new_tokens, model.config.max_position_embeddings - longest)
    if room < 1:
        return None
    replies = heldout_accuracy(model, tokenizer, records, room, batch_size)["replies"]
    return sum(map(chat_in_kind, records, replies)) / len(records)


def markdown_table(rows: list[dict], families: list[str]) -> str:
    header = ["checkpoint", "stage", "params", "accuracy", *families, "think", "forced think",
              "win vs sft", "chat", "well-formed", "reward", "KL to sft", "reply len", "val bpb"]
    formats = {"%": "{:.1%}", "M": "{:.2f}M", "2": "{:.2f}", "3": "{:.3f}", "1": "{:.1f}"}

    def cell(value, kind):
        if value is None:
            return ""
        return formats[kind].format(value / 1e6 if kind == "M" else value)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        per_family = [cell(row.get(f"accuracy/{f}"), "%") for f in families]
        values = [row["checkpoint"], row["stage"], cell(row["params"], "M"),
                  cell(row["accuracy"], "%"), *per_family,
                  cell(row["think_rate"], "%"), cell(row["forced_think_accuracy"], "%"),
                  cell(row["win_rate"], "%"), cell(row["chat_rate"], "%"),
                  cell(row["well_formed"], "%"), cell(row["reward"], "2"),
                  cell(row["kl_to_sft"], "3"), cell(row["reply_length"], "1"),
                  cell(row["val_bpb"], "3")]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], log_paths: list[str], path: str):
    """Left: held-out accuracy and think rate of every checkpoint. Right: the RL stages' training
    curves from their .jsonl logs (reward / score, accuracy, think rate, KL against step)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval | --plot needs matplotlib: pip install matplotlib")
        return
    figure, (bars, curves, kls) = plt.subplots(1, 3, figsize=(17, 4.5),
                                               gridspec_kw={"width_ratios": [1.4, 1, 1]})
    rows = [r for r in rows if r["think_rate"] is not None]
    names = [os.path.splitext(os.path.basename(r["checkpoint"]))[0] for r in rows]
    x = range(len(rows))
    bars.bar([i - 0.2 for i in x], [100 * r["accuracy"] for r in rows], 0.4,
             label="held-out accuracy")
    bars.bar([i + 0.2 for i in x], [100 * r["think_rate"] for r in rows], 0.4, label="think rate")
    bars.set_xticks(list(x), names, rotation=30, ha="right")
    bars.set_ylabel("%")
    bars.set_ylim(0, 100)
    bars.set_title("every checkpoint on the held-out problems (greedy)")
    bars.legend(fontsize=8)
    # the keys the stages log: ppo's reward is its reward-model "score"
    for log_path in log_paths:
        stage = os.path.splitext(os.path.basename(log_path))[0]
        if stage not in ("ppo", "grpo"):
            continue
        records = [json.loads(line) for line in open(log_path) if line.strip()]
        for key, style in (("reward", "-"), ("score", "-"), ("think", ":")):
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                curves.plot(*zip(*points), style, label=f"{stage} {key}")
        points = [(r["step"], r["kl"]) for r in records if isinstance(r.get("kl"), (int, float))]
        if points:
            kls.plot(*zip(*points), label=f"{stage} KL to sft (per reply)")
    curves.set_title("RL training: reward and think rate of the samples")
    kls.set_title("RL training: KL to the reference")
    for ax in (curves, kls):
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    print(f"eval | wrote {path}")


def main(args: Args):
    if args.chat_tokens < 1:
        raise ValueError(f"--chat-tokens must be at least 1 (got {args.chat_tokens})")
    votes = sorted({int(k) for k in args.vote.split() if k.isdigit() and int(k) > 0})
    if len(votes) < len(set(args.vote.split())) or args.vote_temperature < 0:
        raise ValueError(f"--vote {args.vote!r}: whole numbers > 0; --vote-temperature: >= 0")
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (--device auto picks one)")
    start_time = time.time()
    paths = sorted({p for pattern in args.checkpoints.split()
                    for p in (glob.glob(pattern) if glob.has_magic(pattern) else [pattern])})
    if not paths:
        raise FileNotFoundError(f"no checkpoint matches {args.checkpoints!r}: "
                                "run `bash pipeline.sh` first")
    records = read_jsonl(args.eval_data, required=("prompt", "answer"))
    n = min(args.samples, len(records)) if args.samples else len(records)
    sample_records = [records[i * len(records) // n] for i in range(n)]  # spread over the file
    loaded = [load_checkpoint(path, device=args.device) for path in paths]

    def pipeline_order(i):  # by stage; distill_baseline.pt (an sft.py run) beside distill.pt
        name = os.path.basename(paths[i]).split(".")[0].split("_")[0]
        stage = name if name in STAGES else loaded[i][2].get("stage")
        return STAGES.index(stage) if stage in STAGES else len(STAGES), paths[i]
    indices = sorted(range(len(paths)), key=pipeline_order)

    def optional(path, head):  # the reference and the reward model, in eval mode: None if absent
        if not os.path.exists(path):
            return None, None, None
        model, tokenizer, checkpoint = load_checkpoint(path, device=args.device, head=head)
        return model.eval(), tokenizer, checkpoint
    reference, reference_tokenizer, reference_checkpoint = optional(args.reference, "lm")
    reward_model, _, reward_checkpoint = optional(args.reward_model, "score")

    def same_tokens(checkpoint, other):  # same token ids: the KL and the reward apply
        return other is not None and other["tokenizer"] == checkpoint["tokenizer"]
    reference_replies = None
    if reference is not None:
        longest = max(len(reference_tokenizer.encode_prompt(r["prompt"])) for r in records)
        if longest + args.max_new_tokens <= reference.config.max_position_embeddings:
            reference_replies = heldout_accuracy(reference, reference_tokenizer, records,
                                                 args.max_new_tokens, args.batch_size)["replies"]
    if reward_model is not None:
        reward_mean = reward_checkpoint["metrics"].get("reward_mean", 0.0)
        reward_std = reward_checkpoint["metrics"].get("reward_std", 1.0)
    chat_records = None
    if os.path.exists(args.chat_data):
        chat_records = read_jsonl(args.chat_data, required=("prompt", "kind"))
        if {r["kind"] for r in chat_records} - set(CHAT_KINDS):
            raise ValueError(f"{args.chat_data}: a chat kind is not one of {list(CHAT_KINDS)}")
    else:
        print(f"eval | {args.chat_data} not found: no chat column")
    val_documents = None
    if os.path.exists(args.val_data):
        val_documents = read_documents(args.val_data)
    else:
        print(f"eval | {args.val_data} not found: no bits per byte")

    rows, families, val_cache = [], [], {}
    for i in indices:
        model, tokenizer, checkpoint = loaded[i]
        model.eval()
        row = {"checkpoint": paths[i], "stage": checkpoint.get("stage", "?"),
               "params": model.num_params(non_embedding=False), "accuracy": None,
               "think_rate": None, "forced_think_accuracy": None, "win_rate": None,
               "chat_rate": None, "well_formed": None, "reward": None,
               "kl_to_sft": None, "reply_length": None, "val_bpb": None}
        if model.config.head == "score" or checkpoint.get("stage") == "prm":  # column 7
            row["accuracy"] = checkpoint.get("metrics", {}).get("after", {}).get("accuracy")
            rows.append(row)
            continue
        longest = max(len(tokenizer.encode_prompt(r["prompt"])) for r in records)
        context = model.config.max_position_embeddings
        if longest + args.max_new_tokens > context:  # no room to reply: no reply columns
            print(f"eval | {paths[i]}: context {context} < the longest prompt ({longest}) "
                  f"+ --max-new-tokens {args.max_new_tokens}: no replies", file=sys.stderr)
        else:
            row.update(heldout_accuracy(model, tokenizer, records, args.max_new_tokens,  # and
                                        args.batch_size,  # made to think: forced_think_accuracy
                                        forced_too=tokenizer.think_id is not None))
            replies = row.pop("replies")
            if votes:  # column 8, beside the families' accuracies
                row.update({f"accuracy/vote@{k}": accuracy for k, accuracy in vote_accuracy(
                    model, tokenizer, records, votes, args.vote_temperature, args.max_new_tokens,
                    args.batch_size, args.seed).items()})
            if reference_replies is not None:  # column 2: judged by the labeler against sft's
                row["win_rate"] = win_rate(records, replies, reference_replies)
            families += [k.split("/", 1)[1] for k in row
                         if k.startswith("accuracy/") and k.split("/", 1)[1] not in families]
            row.update(sampled_replies(
                model, tokenizer, sample_records, args.max_new_tokens, args.batch_size, args.seed,
                reference if same_tokens(checkpoint, reference_checkpoint) else None,
                reward_model if same_tokens(checkpoint, reward_checkpoint) else None))
            if row["reward"] is not None:
                row["reward"] = (row["reward"] - reward_mean) / reward_std
        if chat_records is not None:  # column 6
            row["chat_rate"] = chat_rate(model, tokenizer, chat_records, args.chat_tokens,
                                         args.batch_size)
        if val_documents is not None:
            key = json.dumps(checkpoint["tokenizer"], sort_keys=True)
            if key not in val_cache:  # tokenize once per tokenizer
                tokens = tokenizer.encode_array(val_documents, tokenizer.text_tokens)
                val_cache[key] = torch.tensor(tokens[: args.val_tokens + 1].astype("int64"))
            row["val_bpb"] = bits_per_byte(model, tokenizer, val_cache[key], args.batch_size)
        rows.append(row)
        print(f"eval | {paths[i]} done ({time.time() - start_time:.0f}s)", file=sys.stderr)

    print(markdown_table(rows, families))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"eval | {len(rows)} checkpoints in {time.time() - start_time:.0f}s | wrote {args.out}")
    if args.plot:
        logs = [os.path.splitext(paths[i])[0] + ".jsonl" for i in indices]
        plot(rows, [log for log in logs if os.path.exists(log)],
             os.path.join(os.path.dirname(args.out), "eval.png"))


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
