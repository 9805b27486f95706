"""
test_all.py: the test suite of llm-stages (pytest), in pipeline order.

    python -m pytest -q -m "not e2e" test_all.py   # the fast lane while editing: unit tests only
    python -m pytest -q test_all.py                # everything
    python -m pytest -q test_all.py -k dpo         # one area

Tests check numbers: hand-computed losses, invariants, parity with Hugging Face transformers, TRL,
PEFT and tiktoken (skipped with a reason when they are not installed), and tiny end-to-end runs of
every stage (single process and torchrun with 2 CPU ranks). The end-to-end runs, and every test
that starts a subprocess or calls a stage's main, are marked e2e.

Sections: data, tokenizer, model, engine, lora, pretrain, sft, reward, ppo, grpo, dpo, distill,
eval, hf, serve, pipeline.
"""
from collections import Counter, defaultdict
import contextlib
import dataclasses
import http
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the modules tested

import data
import distill
from distill import generalized_jsd, kd_loss
import dpo
from dpo import LOSS_TYPES, dpo_loss
import engine
from engine import (batch_indices, by_length, completion_logprobs, completion_values,
                    format_accuracy, generate, heldout_accuracy, judge_replies, left_pad,
                    pair_logps, pair_scores as pair_rewards, preference_pairs, reply_texts,
                    right_pad, sample_token, sequence_scores, shared_prompt_logprobs)
import eval as evaluate
from eval import bits_per_byte, sampled_replies
import grpo
from grpo import aggregate_loss, grpo_advantages, grpo_token_loss, k3_kl
import hf
from lora import LORA_TARGETS, LoRALinear, add_lora, lora_disabled
import model as model_module
from model import (KVCache, ModelConfig, Transformer, chunked_cross_entropy, load_balancing_loss,
                   load_checkpoint, save_checkpoint)
import ppo
import pretrain
import reward
from ppo import adaptive_kl_coef, gae, masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss
from pretrain import lr_at
from reward import pairwise_accuracy, process_loss, reward_loss, reward_model_from, with_replay
import serve
from serve import show_reply
import sft
from sft import lr_at as sft_lr_at, micro_batches, sft_example, sft_examples
from tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, THINK_TOKENS, Tokenizer, _CHUNK_PATTERN,
                       final_answer, read_documents, thinks)


ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
# 1 thread: tests run side by side
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

SAMPLE = """\
The quick brown fox doesn't jump; it's 12345 steps away, isn't it? We'LL see: 3.14 + 2 = 5.14
    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text if c.isalnum()]  # __init__, _private, x_1
Grüße aus München! Die Straße ist schön, Mädchen und Jungen lächeln.
À l'été, où ça? Ça coûte 10 € — c'est très élevé… «Bien sûr».
你好，世界。日本語のテキストを書きます。한국어 문장도 있습니다.
Emoji: 😀👍🏽👨‍👩‍👧 🎉🚀 ✅, numbers ²³ ½ Ⅻ ① ٣٤٥ ۱۲, fullwidth １２３.
Combining: e\u0301 a\u0308 n\u0303; tabs\tand   spaces   \n\n\n  trailing   \r\nwindows\r\n
"""

HF_SAMPLE = ("The quick brown fox jumps over the lazy dog. It's 2024, isn't it? Prices: $3.50, "
             "1,000,000 units.\n"
             "Größere Bäume wachsen langsam; façade, naïve café. Ελληνικά κείμενα. Русский текст "
             "тоже.\n"
             "日本語のテキストと中文文本，还有한국어. عربي وعبرית. emoji 🙂🚀 and   "
             "spaces\ttabs\n\n"
             "def f(x):\n    return x ** 2  # code\r\n")

TRL_MISSING = "trl is not installed (pip install -r requirements-dev.txt)"
# what the tiny model learns
SERVE_REPLIES = {"think": "<think>one and one</think>two", "say": "hello there"}


# ==================================================================================================
# the tiny model: one config, one factory
# ==================================================================================================

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # random norms and biases, so a parity test also checks where they go
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()


# ==================================================================================================
# fixtures: the tiny world, built once per session
# ==================================================================================================


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus(), vocab_size=256 + 5 + 500)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    data.main(data.Args(out=str(out), scale=0.02))
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny built-in world: data, a tokenizer, a tiny pretrained model."""
    d = tmp_path_factory.mktemp("world")
    run_ok(os.path.join(ROOT, "data.py"), "--out", str(d / "data"), "--scale", "0.02")
    run_ok(os.path.join(ROOT, "tokenizer.py"), "--data", str(d / "data" / "pretrain.txt"),
           "--vocab-size", "400", "--out", str(d / "out" / "tokenizer.json"))
    run_ok(os.path.join(ROOT, "pretrain.py"), *TINY_PRETRAIN(d), "--steps", "30", "--out",
           str(d / "out" / "pretrain.pt"))
    return d


@pytest.fixture(scope="session")
def tiny_sft(world):
    """out/sft.pt of the tiny world: the starting point of every post-training stage's tests."""
    run_ok(os.path.join(ROOT, "sft.py"), *TINY_SFT(world), "--steps", "20", "--log-every", "10",
           "--out", str(world / "out" / "sft.pt"))
    return world / "out" / "sft.pt"


@pytest.fixture(scope="session")
def tiny_reward(world, tiny_sft):
    """A reward model for the tiny world: the tiny SFT trunk with a fresh score head."""
    _, tokenizer, checkpoint = load_checkpoint(str(tiny_sft))
    torch.manual_seed(0)
    reward_model = Transformer(ModelConfig(**{**checkpoint["config"], "head": "score"}))
    reward_model.load_state_dict({k: v for k, v in checkpoint["model"].items()
                                  if not k.startswith("lm_head")}, strict=False)
    path = world / "out" / "reward_rl.pt"
    save_checkpoint(str(path), reward_model, tokenizer, "reward", parent=str(tiny_sft),
                    metrics={"reward_mean": 0.1, "reward_std": 2.0})
    return path


@pytest.fixture(scope="session")
def tiny_prm(world, tiny_sft):
    """A process reward model for the tiny world: a language model of stage "prm" (reward.py
    --process writes one), the tiny SFT model itself."""
    model, tokenizer, _ = load_checkpoint(str(tiny_sft))
    path = world / "out" / "prm_rl.pt"
    save_checkpoint(str(path), model, tokenizer, "prm", parent=str(tiny_sft),
                    metrics={"step_offset": 4.0})
    return path


@pytest.fixture(scope="module")
def hf_tok():
    return Tokenizer.train(HF_SAMPLE * 3, vocab_size=400)


@pytest.fixture(scope="session")
def serve_tiny():
    """A byte-level tokenizer and a tiny model overfit to SERVE_REPLIES (one reply thinks): replies
    to know."""
    tokenizer = Tokenizer(merges=[])
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128).train()
    chats = [tokenizer.encode_chat([{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}])
             for q, a in SERVE_REPLIES.items()]
    ids, _ = right_pad([c[0] for c in chats], tokenizer.pad_id)
    mask, _ = right_pad([c[1] for c in chats], 0)
    targets = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100),
                         torch.full_like(ids[:, :1], -100)], 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        _, loss = model(ids, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for question, reply in SERVE_REPLIES.items():  # the replies the tests expect
        assert serve_generate(model, tokenizer, question) == (reply, "stop")
    return model, tokenizer


# ==================================================================================================
# helpers shared by several sections
# ==================================================================================================


def corpus():
    with open(os.path.join(ROOT, "tokenizer.py"), encoding="utf-8") as f:
        return [SAMPLE * 4, f.read()[:20000], SAMPLE.upper()]


def grouped_batch(group_size=3):
    """Rows in groups sharing a left-padded prompt (GRPO's layout), right-padded replies of mixed
    lengths."""
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
    replies = [[15, 16, 17], [18], [19, 20], [21, 22, 23, 24], [25], [26, 27], [28], [29, 30, 31],
               [32]]
    p_ids, p_mask = left_pad([p for p in prompts for _ in range(group_size)], 0)
    c_ids, c_mask = right_pad(replies[:len(prompts) * group_size], 0)
    return p_ids, p_mask, c_ids, c_mask.float()


def run_ok(*argv, cwd=None, timeout=300):
    result = subprocess.run([PY, *argv], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{argv[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def run_error(*argv, cwd=None):
    """A script that must refuse its input: exit 2 with one `error:` line on stderr."""
    result = subprocess.run([PY, *argv], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, f"{argv} exited {result.returncode}:\n{result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def losses(jsonl_path: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(jsonl_path)) if "loss" in r}


def TINY_PRETRAIN(d):
    return ["--data", str(d / "data" / "pretrain.txt"), "--tokenizer",
            str(d / "out" / "tokenizer.json"), "--hidden-size", "32", "--num-layers", "2",
            "--context", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup", "5", "--log-every",
            "1", "--eval-every", "1000", "--eval-batches", "2", "--device", "cpu"]


def TINY_PHASE2(d):
    """Phase 2 (pretrain.py detail 8) of the tiny world's pretrain.pt: twice its context, a raised
    RoPE base, its shape."""
    args = TINY_PRETRAIN(d)
    for flag in ("--hidden-size", "--num-layers", "--context"):
        del args[args.index(flag):args.index(flag) + 2]
    return [*args, "--init", str(d / "out" / "pretrain.pt"), "--context", "128",
            "--rope-theta", "1e5"]


def TINY_SFT(d):
    return ["--init", str(d / "out" / "pretrain.pt"), "--data", str(d / "data" / "sft.jsonl"),
            "--eval-data", str(d / "data" / "eval.jsonl"), "--batch-size", "8", "--log-every", "1",
            "--max-new-tokens", "4", "--device", "cpu", "--ptx-data",
            str(d / "data" / "pretrain.txt")]


def head(path, n):
    """The first n lines of a data file, written next to it (small held-out sets keep the runs
    fast)."""
    small = f"{path}.head{n}.jsonl"
    if not os.path.exists(small):
        with open(path) as f, open(small, "w") as out:
            out.writelines(line for _, line in zip(range(n), f))
    return small


def TINY_REWARD(d):
    return ["--init", str(d / "out" / "sft.pt"), "--data", str(d / "data" / "prefs.jsonl"),
            "--eval-pairs", head(d / "data" / "prefs_eval.jsonl", 60), "--batch-size", "8",
            "--log-every", "1", "--stats-pairs", "16", "--device", "cpu"]


def TINY_DPO(d):
    return ["--init", str(d / "out" / "sft.pt"), "--data", str(d / "data" / "prefs.jsonl"),
            "--eval-pairs", head(d / "data" / "prefs_eval.jsonl", 60), "--eval-data",
            head(d / "data" / "eval.jsonl", 30), "--batch-size", "8", "--log-every", "1",
            "--max-new-tokens", "4", "--device", "cpu"]


def logged(jsonl_path, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, open(jsonl_path))}


def run_ddp(script, *argv):
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", os.path.join(ROOT, script), *argv],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def pair(prompt, chosen, rejected, kind="x"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": 0.0, "kind": kind}


def TINY_RL(world, tiny_sft):
    # every 10th held-out prompt: the before/after numbers in a second
    small_eval = world / "data" / "eval_rl.jsonl"
    if not small_eval.exists():
        small_eval.write_text("".join(open(world / "data" / "eval.jsonl").readlines()[::10]))
    return ["--init", str(tiny_sft), "--data", str(world / "data" / "prompts.jsonl"), "--eval-data",
            str(small_eval), "--steps", "2", "--max-new-tokens", "6", "--log-every", "1",
            "--device", "cpu"]


def read_log(path):
    return [json.loads(line) for line in open(path)]


def hf_randomize(model, seed=0):
    """Random weights everywhere, norms and biases included, so parity checks where each tensor
    goes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.1 * torch.randn_like(p))
    return model.eval()


def hf_checkpoint(tmp_path, tok, stage="sft", name="ckpt.pt", **overrides):
    model = hf_randomize(tiny_model(vocab_size=tok.vocab_size, **overrides))
    path = str(tmp_path / name)
    save_checkpoint(path, model, tok, stage=stage)
    return path, model


def hf_logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def hf_save_model(tmp_path, tok, cls_name, tokenizer_json=None, **config):
    """A tiny random model saved by transformers, with a tokenizer.json (ours, unless given)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, cls_name)
    kwargs = {**TINY, "vocab_size": tok.vocab_size + 6, **config}  # our tiny shapes
    torch.manual_seed(0)
    model = hf_randomize(cls(cls.config_class(**kwargs)))
    out = tmp_path / cls_name
    model.save_pretrained(str(out))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json or hf.hf_tokenizer_json(tok)),
                                        encoding="utf-8")
    return str(out), model


# Each test feeds the same random inputs (float64 where both sides allow) to one of our loss
# functions and to TRL's own code, called through the smallest stand-in for the trainer it lives
# in (a types.SimpleNamespace passed as `self`, with only the attributes the method reads), not
# TRL's lines re-typed. Written against TRL 1.16; skipped when trl is not installed. Where we
# differ from TRL by design (dpo.py detail 4, ppo.py detail 3) the tests say so.
def trl_stand_in(**attributes):
    """What every trainer method below reads: a model in train mode, a one-process accelerator, a
    metrics dict."""
    identity = lambda x: x  # noqa: E731
    accelerator = types.SimpleNamespace(device="cpu", num_processes=1, process_index=0,
                                        gather=identity, gather_for_metrics=identity,
                                        reduce=lambda x, reduction: x)
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        accelerator=accelerator,
        aux_loss_enabled=False,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
        **attributes,
    )


def serve_generate(model, tokenizer, messages, max_tokens=None, temperature=0.0, seed=None):
    """engine.generate's reply to `messages` as the server must give it: (text, finish_reason)."""
    prompt = tokenizer.encode_prompt(messages)
    max_tokens = max_tokens or model.config.max_position_embeddings - len(prompt)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids, _, mask = generate(
        model,
        [prompt],
        max_tokens,
        temperature=temperature,
        eos_id=tokenizer.im_end_id,
        pad_id=tokenizer.pad_id,
        generator=generator,
    )
    tokens = ids[0][mask[0].bool()].tolist()
    if tokens[-1] == tokenizer.im_end_id:
        return tokenizer.decode(tokens[:-1]), "stop"
    return tokenizer.decode(tokens), "length"


# ==================================================================================================
# 1. data.py: the built-in tiny world
# ==================================================================================================

DATA_FILES = ["pretrain.txt", "pretrain_val.txt", "sft.jsonl", "prefs.jsonl", "prompts.jsonl",
              "chat.jsonl", "eval.jsonl", "prefs_eval.jsonl", "chat_eval.jsonl", "steps.jsonl",
              "steps_eval.jsonl"]

DATA_FAMILIES = ["add", "sub"]

DATA_TINY = ["--scale", "0.02"]

# the forms of a pretraining skill line: regex -> (family, prompt-like text, answer)
DATA_PLAIN = [
    (r"(\d+) (?:\+|plus) (\d+) (?:=|equals) (\d+)", lambda m: ("add", f"{m[1]} + {m[2]}", m[3])),
    (r"(\d+) (?:-|minus) (\d+) (?:=|equals) (\d+)", lambda m: ("sub", f"{m[1]} - {m[2]}", m[3])),
]


# The answers and keys below are recomputed from the prompt text alone, independently of data.py,
# so a generator bug cannot hide behind its own helpers.
def data_solve(family, prompt):
    """(canonical key, answer) of a task prompt, from its text alone."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    assert family in ("add", "sub") and len(numbers) == 2, (family, prompt)
    a, b = numbers
    assert max(a, b) >= 100 and max(a, b) <= 999, prompt  # a three-digit number and a smaller one
    if family == "sub":
        assert a >= b, prompt
        return f"sub:{a}:{b}", str(a - b)
    return f"add:{min(a, b)}:{max(a, b)}", str(a + b)


def data_check_reply(family, prompt, reply):
    """Checks a thinking reply step by step, independently of data.py: the operands restated and
    zero-padded, each column's step "x+y+c=s" / "x-y-c=d" (a negative d then "+10=d+10") right
    with the carry / borrow of the column before, and the answer the steps spell the true answer.
    Returns the answer."""
    a, b = map(int, re.findall(r"\d+", prompt))
    sign = {"add": "+", "sub": "-"}[family]
    m = re.fullmatch(r"<think>(\d{3})([+-])(\d{3}): (.+)</think>(\d+)", reply)
    assert m, reply
    assert (int(m[1]), m[2], int(m[3])) == (a, sign, b), reply
    steps, carry, digits = m[4].split(" "), 0, []
    assert len(steps) == 3, reply
    for column, step in enumerate(steps):
        x, y = int(m[1][2 - column]), int(m[3][2 - column])
        if family == "add":
            expected = f"{x}+{y}+{carry}={x + y + carry}"
            digits.append(x + y + carry)
            carry = digits[-1] // 10
        else:
            d = x - y - carry
            expected = f"{x}-{y}-{carry}={d}" + (f"+10={d + 10}" if d < 0 else "")
            carry = int(d < 0)
            digits.append(d % 10)
        assert step == expected, (reply, step, expected)
    spelled = str(int(str(digits[-1]) + "".join(str(d % 10) for d in digits[-2::-1])))
    true_answer = str(a + b if family == "add" else a - b)
    assert spelled == true_answer == m[5], reply
    return m[5]


DATA_TURN = r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>(?:\n|$)"


def data_transcript_problems(document):
    """(family, key) of every task in a document of conversations in the chat template; fails on
    anything else in it, a wrong answer or trace, or a chat reply with a digit or a think block."""
    turns = re.findall(DATA_TURN, document, flags=re.S)
    written = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)
    assert written.rstrip("\n") == document.rstrip("\n")  # (a file's last document ends in \n)
    problems, asked = [], None
    for role, content in turns:
        if role == "user":
            assert asked is None, document
            asked = content
        elif role == "assistant":
            assert asked is not None, document
            if re.search(r"\d", asked):  # a task: the family from the prompt's operator
                family = "add" if re.search(r"\+|Add ", asked) else "sub"
                key, answer = data_solve(family, asked)
                if content.startswith("<think>"):
                    assert data_check_reply(family, asked, content) == answer, content
                else:
                    assert content == answer, content
                problems.append((family, key))
            else:
                assert not re.search(r"\d|<think>", content), content
            asked = None
    assert asked is None and turns[-1][0] == "assistant", document
    return problems


def data_pretrain_problems(text):
    """(family, key) of every skill line and every task of a conversation; fails on a line that
    looks like a skill but is not one, and on a thinking line whose trace is wrong."""
    problems = []
    lines = []
    for document in text.split("\n\n"):
        if document.startswith("<|im_start|>"):
            problems += data_transcript_problems(document)
        else:
            lines += document.splitlines()
    for line in lines:
        if not re.search(r"\d", line):
            continue  # prose
        copy = re.fullmatch(r"(?:Repeat|Copy|Say) (.+): (.+)", line)
        if copy:  # a copy drill: the text after the colon is the text before it
            assert copy[1] == copy[2], line
            continue
        if "<think>" in line:
            question, reply = line.split(" <think>")
            family = "add" if re.search(r"\+|Add ", question) else "sub"
            key, answer = data_solve(family, question)
            assert data_check_reply(family, question, "<think>" + reply) == answer, line
            problems.append((family, key))
            continue
        for pattern, parse in DATA_PLAIN:
            m = re.fullmatch(pattern, line)
            if m:
                family, prompt, answer = parse(m)
                key, expected = data_solve(family, prompt)
                assert answer == expected, f"wrong pretraining line: {line!r}"
                problems.append((family, key))
                break
        else:
            raise AssertionError(f"unrecognized pretraining line: {line!r}")
    return problems


def data_read(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        if name.endswith(".txt"):
            return f.read()
        return [json.loads(line) for line in f]


def test_data_records_have_fields_and_correct_answers_and_traces(tiny_data):
    for name in ("prompts.jsonl", "eval.jsonl"):
        for r in data_read(tiny_data, name):
            assert set(r) == {"prompt", "answer", "family", "level"} and r["level"] in (1, 2, 3), r
            assert data_solve(r["family"], r["prompt"])[1] == r["answer"], r
    sft = data_read(tiny_data, "sft.jsonl")
    assert {r["family"] for r in sft} == {*DATA_FAMILIES, "chat"}
    assert any(m["role"] == "system" for r in sft for m in r["messages"]), "no system prompt at all"
    assert any(len(r["messages"]) >= 4 for r in sft), "no multi-turn conversation at all"
    tasks = [r for r in sft if r["family"] != "chat"]
    # a minority of the demos think (15 %; ~270 demos here: within about 3 standard deviations)
    assert 0.08 < sum(r["thinks"] for r in tasks) / len(tasks) < 0.22
    for r in sft:
        messages = r["messages"][1:] if r["messages"][0]["role"] == "system" else r["messages"]
        assert messages and [m["role"] for m in messages] == ["user", "assistant"] * (
            len(messages) // 2
        ), r
        for user, assistant in zip(messages[::2], messages[1::2]):
            assert (assistant["content"].strip()
                    and "<|" not in user["content"] + assistant["content"])
            if r["family"] == "chat":
                assert "<think>" not in assistant["content"]
            elif r["thinks"]:  # every trace is right step by step and ends in the answer
                assert (data_check_reply(r["family"], user["content"], assistant["content"])
                        == data_solve(r["family"], user["content"])[1])
            else:
                assert data_solve(r["family"], user["content"])[1] == assistant["content"], r


def test_data_preference_pairs_are_labelled_by_the_labeler(tiny_data):
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        kinds = Counter()
        for r in data_read(tiny_data, name):
            assert set(r) == {"prompt", "chosen", "rejected", "family", "level", "kind"}, r
            assert r["kind"] in data.REJECT_KINDS, r
            kinds[r["kind"]] += 1
            # the labeler prefers the chosen reply
            assert data.prefer(r, r["chosen"], r["rejected"]) == 1.0, r
            answer = data_solve(r["family"], r["prompt"])[1]
            # the right worked reply against a failure
            assert data_check_reply(r["family"], r["prompt"], r["chosen"]) == answer, r
            assert r["rejected"] != r["chosen"], r
            if r["kind"] == "bare_right":
                assert r["rejected"] == answer, r
            elif r["kind"] == "bare_wrong":
                assert r["rejected"] != answer and r["rejected"].isdigit(), r
            elif r["kind"] == "cut_off":
                assert (
                    r["chosen"].startswith(r["rejected"]) and final_answer(r["rejected"]) is None
                ), r
            else:  # wrong_step: the same shape, one step result changed
                assert (r["rejected"].startswith(r["chosen"].split(":")[0] + ":")
                        and "</think>" in r["rejected"]), r
                with pytest.raises(AssertionError):
                    data_check_reply(r["family"], r["prompt"], r["rejected"])
        assert set(kinds) == set(data.REJECT_KINDS), kinds


def test_data_labeler():
    record = {"prompt": "What is 385 + 48?", "answer": "433", "family": "add"}
    right = "<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4</think>433"
    wrong_step = "<think>385+048: 5+8+0=13 8+4+1=12 3+0+1=4</think>423"
    right_answer_wrong_step = "<think>385+048: 5+8+0=13 8+4+1=12 3+0+1=4</think>433"
    cut_off = "<think>385+048: 5+8+0=13 8+4+1=13"
    prefer = data.prefer
    # a right answer beats a wrong one, whatever the work
    assert prefer(record, "433", wrong_step) == 1.0 and prefer(record, "433", "434") == 1.0
    # between right answers: right work > no work > a think block with a wrong step
    assert (prefer(record, right, "433") == 1.0
            and prefer(record, "433", right_answer_wrong_step) == 1.0)
    assert prefer(record, right, right_answer_wrong_step) == 1.0
    # between wrong answers: a reply with an answer beats one cut off inside its think block;
    # else a tie
    assert prefer(record, "434", cut_off) == 1.0 and prefer(record, wrong_step, cut_off) == 1.0
    assert prefer(record, wrong_step, "434") == 0.5
    # ties: the same rank (text around the answer makes it a wrong answer, not a tie)
    assert prefer(record, "433", " 433\n") == 0.5 and prefer(record, right, right) == 0.5
    assert prefer(record, "434", "432") == 0.5 and prefer(record, "433 is it", "434") == 0.5
    # antisymmetric on every pair of these replies
    replies = [right, wrong_step, right_answer_wrong_step, cut_off, "433", "434", "",
               "<think></think>433"]
    for a in replies:
        for b in replies:
            assert prefer(record, a, b) + prefer(record, b, a) == 1.0, (a, b)
    # the win rate on fixed replies, by hand: win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    records = [record] * 4
    assert (data.win_rate(records, [right, "434", "433", "433"], ["433", "433", " 433", cut_off])
            == 2.5 / 4)
    # the operands come from a messages prompt too
    assert prefer({**record, "prompt": [{"role": "user", "content": "What is 385 + 48?"}]}, right,
                  "433") == 1.0


def test_data_sampled_replies_become_pairs_by_the_labeler():
    """Iterative RL: every two distinct replies the labeler does not tie, the preferred one
    chosen; the labeler's worked reply joins them (so a task every reply gets wrong gives pairs)."""
    record = {"prompt": "What is 385 + 48?", "family": "add", "answer": "433"}
    right = "<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4</think>433"
    wrong = "<think>385+048: 5+8+0=14 8+4+1=13 3+0+1=4</think>434"
    cut_off = "<think>385+048: 5+8+0=13"
    assert data.worked_reply(record) == right
    pairs = data.sampled_pairs(record, [right, "433", right, wrong, "434", cut_off, " "],
                               worked=False)
    found = {(p["chosen"], p["rejected"], p["kind"]) for p in pairs}
    assert found == {(right, "433", "worse_work"), (right, wrong, "wrong_answer"),
                     (right, "434", "wrong_answer"), (right, cut_off, "no_answer"),
                     ("433", wrong, "wrong_answer"), ("433", "434", "wrong_answer"),
                     ("433", cut_off, "no_answer"), (wrong, cut_off, "no_answer"),
                     ("434", cut_off, "no_answer")}  # wrong and 434 tie; the duplicate is one
    assert len(pairs) == 9 and all(p["prompt"] == record["prompt"] for p in pairs)
    assert all(data.prefer(record, p["chosen"], p["rejected"]) == 1.0 for p in pairs)
    assert data.sampled_pairs(record, [wrong, wrong], worked=False) == []
    assert [(p["chosen"], p["rejected"]) for p in data.sampled_pairs(record, [wrong, wrong])] == [
        (right, wrong)]


def test_data_label_command_splits_and_refuses_malformed_samples(tmp_path, capsys):
    record = {"prompt": "Compute 305 - 148.", "family": "sub", "answer": "157"}
    samples = [{**record, "replies": ["157", "158"]} for _ in range(10)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    args = data.LabelArgs(samples=str(path), out=str(tmp_path / "pairs.jsonl"),
                          eval_out=str(tmp_path / "pairs_eval.jsonl"))
    data.label(args)
    train, held_out = (read_log(tmp_path / name) for name in ("pairs.jsonl", "pairs_eval.jsonl"))
    worked = data.worked_reply(record)  # 9 prompts: worked > 157 > 158 (3 pairs); the tenth: 1
    assert len(train) == 27 and len(held_out) == 1 and held_out[0]["chosen"] == "157"
    assert {(p["chosen"], p["rejected"]) for p in train} == {(worked, "157"), (worked, "158"),
                                                             ("157", "158")}
    assert "label | 10 prompts, 20 replies, 50.0% right" in capsys.readouterr().out
    for line in ['{"prompt": "Compute 305 - 148.", "family": "sub", "replies": "157"}',
                 '{"prompt": "Compute 305 - 148.", "replies": ["157"]}',
                 '{"prompt": "Say hi.", "family": "sub", "replies": ["157"]}', "not json"]:
        path.write_text(json.dumps(samples[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match="samples.jsonl:2: not a task record"):
            data.label(args)


def test_data_label_steps_judges_every_step_of_the_samples(tmp_path, capsys):
    """`data.py label --steps`: each distinct reply in a trace's form (and the worked one, but for
    the held-out prompts), cut into steps, each judged by the labeler; other text is left out."""
    record = {"prompt": "What is 385 + 48?", "family": "add", "answer": "433"}
    right = "<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4</think>433"
    slip = "<think>385+048: 5+8+0=14 8+4+1=13 3+0+1=4</think>434"
    replies = [right, slip, right, "433", "a story", " ", "4 +3", "<think>385+048: 5+8+0=1x"]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({**record, "replies": replies}) + "\n" for _ in range(10)))
    data.label(data.LabelArgs(samples=str(path), out=str(tmp_path / "steps.jsonl"),
                              eval_out=str(tmp_path / "steps_eval.jsonl"), steps=True))
    train, held_out = (read_log(tmp_path / n) for n in ("steps.jsonl", "steps_eval.jsonl"))
    assert data.worked_reply(record) == right  # 3 distinct replies of sums per prompt
    assert len(train) == 27 and len(held_out) == 3
    assert [(r["completions"], r["labels"]) for r in held_out] == [
        (data.reply_steps(right), [True] * 5), (data.reply_steps(slip), [True, False] + [True] * 3),
        (["433"], [True])]
    assert "label | 27 replies (0 wrong 18, 1 wrong 9)" in capsys.readouterr().out


def test_data_step_labels_by_hand():
    """The labeler judges each step given the steps before it: one mistake, one wrong step."""
    T, F = True, False
    record = {"prompt": "What is 385 + 48?", "family": "add"}
    right = "<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4</think>433"
    steps = data.reply_steps(right)
    assert steps == ["<think>385+048:", " 5+8+0=13", " 8+4+1=13", " 3+0+1=4", "</think>433"]

    def judged(reply, record=record):
        steps = data.reply_steps(reply)
        assert "".join(steps) == reply
        return data.judge_steps(record, steps)
    assert judged(right) == [T] * 5
    # a slipped digit: that column; the carry and the answer follow what was written
    assert judged("<think>385+048: 5+8+0=14 8+4+1=13 3+0+1=4</think>434") == [T, F, T, T, T]
    assert judged("<think>385+048: 5+8+0=3 8+4+0=12 3+0+1=4</think>423") == [T, F, T, T, T]
    # a dropped carry; with it an answer that is not what the columns spell: two wrong steps
    assert judged("<think>385+048: 5+8+0=13 8+4+0=12 3+0+1=4</think>423") == [T, T, F, T, T]
    assert judged("<think>385+048: 5+8+0=13 8+4+0=12 3+0+1=4</think>433") == [T, T, F, T, F]
    # a mis-copied operand, in the head (the columns follow the head) or in a column
    assert judged("<think>385+058: 5+8+0=13 8+5+1=14 3+0+1=4</think>443") == [F, T, T, T, T]
    assert judged("<think>385+048: 5+9+0=14 8+4+1=13 3+0+1=4</think>434") == [T, F, T, T, T]
    # a fourth column, a step after the answer, a trace cut off, bare replies
    assert (judged("<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4 0+0+0=0</think>433")
            == [T, T, T, T, F, T])
    assert judged(right + " sure") == [T] * 5 + [F]
    assert judged("<think>385+048: 5+8+0=13") == [T, T]
    assert judged("433") == [T] and judged("434") == [F]
    # subtraction: a borrow is decided by the difference written; a dropped borrow
    sub = {"prompt": "Compute 305 - 148.", "family": "sub"}
    assert judged("<think>305-148: 5-8-0=-3+10=7 0-4-1=-5+10=5 3-1-1=1</think>157", sub) == [T] * 5
    assert (judged("<think>305-148: 5-8-0=-3+10=7 0-4-0=-4+10=6 3-1-1=1</think>167", sub)
            == [T, T, F, T, T])
    assert (judged("<think>305-148: 5-8-0=-3+10=8 0-4-1=-5+10=5 3-1-1=1</think>158", sub)
            == [T, F, T, T, T])
    # the smaller digit from the larger, no borrow: the next column borrows nothing, as written
    assert (judged("<think>305-148: 5-8-0=3 0-4-0=-4+10=6 3-1-1=1</think>163", sub)
            == [T, F, T, T, T])


def data_judge_steps(family, prompt, steps):
    """Each step's label recomputed from the prompt alone, independently of data.py: the head
    restates the operands; a column "x+y+c=r" (or "x-y-c=d", "+10=d+10" when d < 0) takes its
    digits from the head, its carry (borrow) from the column written before, and computes right;
    the answer is what the three columns spell; a bare reply is right iff it is the answer."""
    a, b = map(int, re.findall(r"\d+", prompt))
    truth = a + b if family == "add" else a - b
    if len(steps) == 1:
        return [steps[0] == str(truth)]
    head = re.fullmatch(r"<think>(\d{3})([+-])(\d{3}):", steps[0])
    labels = [(int(head[1]), head[2], int(head[3])) == (a, "+-"[family == "sub"], b)]
    carry, results = 0, []
    for column, step in enumerate(steps[1:-1]):
        left, *right = step[1:].split("=")
        x, y, c = map(int, re.split(r"[+-]", left))
        value = x + y + c if family == "add" else x - y - c
        written = int(re.match(r"-?\d+", right[0])[0])
        ok = (x, y, c) == (int(head[1][2 - column]), int(head[3][2 - column]), carry)
        ok = ok and written == value and right[1:] == ([str(value + 10)] if value < 0 else [])
        labels.append(ok and (right[0] == str(value) + ("+10" if value < 0 else "")))
        results.append(int(right[-1]))
        carry = written // 10 if family == "add" else int(written < 0)
    assert steps[-1].startswith("</think>") and len(results) == 3, steps
    digits = [results[2], results[1] % 10, results[0] % 10]
    return labels + [steps[-1][len("</think>"):] == str(int("".join(map(str, digits))))]


def test_data_step_labels_checked_by_an_independent_solver(tiny_data):
    eval_keys = {data_solve(r["family"], r["prompt"])[0]
                 for r in data_read(tiny_data, "eval.jsonl")}
    for name in ("steps.jsonl", "steps_eval.jsonl"):
        wrong = Counter()
        for r in data_read(tiny_data, name):
            assert set(r) == {"prompt", "completions", "labels", "family", "level"}, r
            steps, labels = r["completions"], r["labels"]
            assert data.reply_steps("".join(steps)) == steps and len(labels) == len(steps), r
            assert labels == data_judge_steps(r["family"], r["prompt"], steps), r
            key, answer = data_solve(r["family"], r["prompt"])
            assert (key in eval_keys) == (name == "steps_eval.jsonl"), r  # held out, or never
            if len(steps) == 1:  # a bare answer, right or slipped
                wrong["bare"] += 1
                continue
            wrong[labels.count(False)] += 1  # 0-2 mistakes, each its own wrong step
            assert all(labels) == (final_answer("".join(steps)) == answer
                                   and data.prefer(r, "".join(steps), answer) == 1.0), r
        assert set(wrong) == {0, 1, 2, "bare"}, (name, wrong)
    assert len(data_read(tiny_data, "steps_eval.jsonl")) == len(eval_keys)


def test_data_pretraining_text(tiny_data):
    for name in ("pretrain.txt", "pretrain_val.txt"):
        text = data_read(tiny_data, name)
        assert "<|endoftext|>" not in text, name  # it joins the documents
        documents = text.split("\n\n")
        assert all(document.strip() for document in documents)
        # chat markup only in the conversations, each turn whole (data_transcript_problems)
        for document in documents:
            if not document.startswith("<|im_start|>"):
                assert "<|im_" not in document, document
        problems = data_pretrain_problems(text)  # also checks every skill line and every trace
        if name == "pretrain.txt":
            assert {family for family, _key in problems} == set(DATA_FAMILIES)
            assert any(document.startswith("Once upon a time") for document in documents)
            lines = [line for d in documents if not d.startswith("<|im_start|>")
                     for line in d.splitlines() if re.search(r"\d", line)
                     and not line.startswith(("Copy", "Say", "Repeat"))]
            thinking = sum("<think>" in line for line in lines)
            assert 0.7 < thinking / len(lines) < 0.9  # four fifths of the skill lines think
            assert any(document.startswith(("Copy", "Say", "Repeat")) for document in documents)
            # detail 10: a fifth of the documents are conversations, half of their tasks thinking
            transcripts = [d for d in documents if d.startswith("<|im_start|>")]
            assert 0.15 < len(transcripts) / len(documents) < 0.25
            replies = re.findall(DATA_TURN, "\n".join(transcripts), flags=re.S)
            tasks = [c for r, c in replies if r == "assistant" and re.search(r"\d", c)]
            assert 0.4 < sum(c.startswith("<think>") for c in tasks) / len(tasks) < 0.6
            assert any(r == "assistant" and c.startswith("Here is a story") for r, c in replies)


def test_data_held_out_split_is_disjoint(tiny_data):
    evals = data_read(tiny_data, "eval.jsonl")
    eval_prompts = {r["prompt"] for r in evals}
    eval_keys = {data_solve(r["family"], r["prompt"])[0] for r in evals}
    train_files = ("prefs.jsonl", "prompts.jsonl", "steps.jsonl")
    train_prompts = {r["prompt"] for name in train_files for r in data_read(tiny_data, name)}
    train_keys = {data_solve(r["family"], r["prompt"])[0]
                  for name in train_files for r in data_read(tiny_data, name)}
    for r in data_read(tiny_data, "sft.jsonl"):
        for m in r["messages"]:
            if m["role"] == "user":
                train_prompts.add(m["content"])
                if r["family"] != "chat":
                    train_keys.add(data_solve(r["family"], m["content"])[0])
    for name in ("pretrain.txt", "pretrain_val.txt"):
        train_keys |= {key for _family, key in data_pretrain_problems(data_read(tiny_data, name))}
    assert not eval_prompts & train_prompts
    assert not eval_keys & train_keys, sorted(eval_keys & train_keys)[:5]
    # and no eval sum or difference appears in the pretraining text, in any form
    text = data_read(tiny_data, "pretrain.txt") + data_read(tiny_data, "pretrain_val.txt")
    seen = {(op, int(a), int(b))
            for a, op, b in re.findall(r"(?<!\d)(\d+) ?(\+|plus|-|minus) ?(\d+)", text)}
    seen |= {(op, int(a), int(b))
             for op, a, b in re.findall(r"(Add|minus) (\d+) (?:and )?(\d+)", text)}
    for r in evals:
        a, b = map(int, re.findall(r"\d+", r["prompt"]))
        ops = ("+", "plus", "Add") if r["family"] == "add" else ("-", "minus")
        orders = [(a, b)] if r["family"] == "sub" else [(a, b), (b, a)]
        assert not any((op, x, y) in seen for op in ops for x, y in orders), r["prompt"]
    # prefs_eval is built from eval problems only
    for r in data_read(tiny_data, "prefs_eval.jsonl"):
        assert data_solve(r["family"], r["prompt"])[0] in eval_keys


def test_data_eval_covers_every_family_and_level(tiny_data):
    evals = data_read(tiny_data, "eval.jsonl")
    assert data.FAMILIES == DATA_FAMILIES
    assert len(data_read(tiny_data, "prefs_eval.jsonl")) == len(evals)
    for family in DATA_FAMILIES:
        rows = [r for r in evals if r["family"] == family]
        assert len(rows) == 150, family
        assert len({data_solve(family, r["prompt"])[0] for r in rows}) == 150, (
            f"{family}: repeated problems"
        )
        assert Counter(r["level"] for r in rows) == {1: 50, 2: 50, 3: 50}, family


def test_data_levels_are_what_the_docstring_says():
    # a three-digit number and one of `level` digits
    rng = random.Random(0)
    for _ in range(300):
        for level in (1, 2, 3):
            for family in ("add", "sub"):
                p = data.GENERATORS[family](rng, level)
                large, small = sorted((p.a, p.b), reverse=True)
                assert 100 <= large <= 999 and (
                    small < 10 if level == 1 else 10 ** (level - 1) <= small < 10**level
                ), p
                assert p.answer == str(p.a + p.b if family == "add" else p.a - p.b)
                assert data_check_reply(family, f"{p.a} {data.SIGN[family]} {p.b}",
                                        data.thinking_reply(p)) == p.answer


def test_data_split_rule():
    # the split is a fixed ~8 % slice of a problem space, by sha256 of the key
    keys = [f"add:{a}:{b}" for a in range(100) for b in range(a, 100)]
    share = sum(data.is_held_out(k, 0.08) for k in keys) / len(keys)
    assert 0.06 < share < 0.10, share
    # pinned: the held-out problems must never move between versions (a salted hash() would
    # move them)
    keys = [f"add:{a}:{b}" for a in range(10, 14) for b in range(a, a + 40)]
    assert [k for k in keys if data.is_held_out(k, 0.08)] == ["add:10:10", "add:10:18", "add:10:44",
                                                              "add:11:11", "add:12:15", "add:12:32",
                                                              "add:12:51", "add:13:22", "add:13:46"]


def test_data_chat_judge_on_hand_written_replies():
    greeting = {"prompt": "Hello! How are you?", "family": "chat", "kind": "greeting"}
    cat_story = {"prompt": "Tell me a story about a cat.", "family": "chat", "kind": "story",
                 "animal": "cat"}
    any_story = {"prompt": "Tell me a story.", "family": "chat", "kind": "story"}
    abilities = {"prompt": "What can you do?", "family": "chat", "kind": "abilities"}
    cat = "Once upon a time, there was a big cat named Tom. Tom lived near the park."
    # the wrong animal: the cat comes after the first sentence, as a friend
    dog = "Once upon a time, there was an old dog named Ben. Ben played with Mia the cat."
    in_kind = data.chat_in_kind
    # in kind: a greeting back (a greeting word first, any case, or an offer of help)
    assert all(in_kind(greeting, reply) for reply in [*data.GREETING_REPLIES, " hi there",
                                                      "Good morning!", "How can I help?"])
    # in kind: a story naming the animal asked for in its first sentence; any animal if none
    assert in_kind(cat_story, cat) and in_kind(any_story, cat) and in_kind(any_story, dog)
    assert in_kind(abilities, data.ABILITIES)
    # a story may open by restating the request, as the training replies do; a title is no story
    assert in_kind(cat_story, f"Here is a story about a cat. {cat}")
    assert not in_kind(cat_story, f"Here is a story about a dog. {cat}")
    assert not in_kind(cat_story, "Here is a story about a cat.")
    # the wrong animal, the wrong kind, off topic, a word that only starts like "hi"
    assert not in_kind(cat_story, dog) and not in_kind(cat_story, "Tell me a story about a cat.")
    assert not in_kind(greeting, cat) and not in_kind(cat_story, "Hello! How can I help you?")
    assert not in_kind(abilities, "Hello! How can I help you?")
    assert not any(in_kind(greeting, reply) for reply in ["History is fun.", "The sky is blue.",
                                                          ""])
    # a sum, a think block, a bare number: never in kind, whatever the kind
    for reply in ["385 + 48 = 433", "Hello! 2 + 2 = 4", "<think>385+048: 5+8+0=13</think>433",
                  "<think>Hello</think>Hello!", "433", cat.replace("big", "3")]:
        assert not any(in_kind(r, reply) for r in (greeting, cat_story, any_story, abilities))
    with pytest.raises(ValueError, match="unknown chat kind 'joke'"):
        in_kind({"prompt": "Tell me a joke.", "kind": "joke"}, "Hello!")


def test_data_chat_prompts_are_held_out_of_every_training_file(tiny_data):
    chat_eval = data_read(tiny_data, "chat_eval.jsonl")
    held_out = {r["prompt"] for r in chat_eval}
    assert len(held_out) == len(chat_eval) == 44
    assert Counter(r["kind"] for r in chat_eval) == {"greeting": 16, "abilities": 2, "story": 26}
    for r in chat_eval:
        assert r["family"] == "chat" and set(r) <= {"prompt", "family", "kind", "animal"}, r
        assert ("animal" in r) == (r["kind"] == "story" and " about " in r["prompt"]), r
        assert r.get("animal", "") in r["prompt"], r
    # every animal asked about twice; every phrasing of a greeting or a story request in both halves
    animals = Counter(r["animal"] for r in chat_eval if "animal" in r)
    assert animals == dict.fromkeys(data.ANIMALS, 2)
    trained = {(kind, prompt) for kind in data.CHAT_KINDS
               for prompt, _animal, out in data.chat_prompts(kind) if not out}
    for greeting in data.GREETINGS:
        assert any(p.startswith(greeting) for _kind, p in trained)
        assert any(p.startswith(greeting) for p in held_out)
    for animal in data.ANIMALS:
        assert any(p.endswith(f" {animal}.") or p.endswith(f" {animal}?") for _, p in trained)
    # no held-out prompt in any training file: never a user message of sft.jsonl, nowhere in the
    # text of the others; every chat conversation asks a trained prompt and is answered in kind
    for name in ("pretrain.txt", "pretrain_val.txt", "prompts.jsonl", "prefs.jsonl",
                 "prefs_eval.jsonl", "eval.jsonl"):
        text = (tiny_data / name).read_text(encoding="utf-8")
        turns = re.findall(DATA_TURN, text, flags=re.S)  # the pretraining text's conversations
        assert not held_out & {content for role, content in turns if role == "user"}, name
        text = re.sub(DATA_TURN, "", text, flags=re.S)  # ("Hello there." in a trained greeting)
        assert not [p for p in held_out if p in text], name
    # every chat conversation (sft.jsonl's, and chat.jsonl's for distillation) asks a trained
    # prompt, or (chat.jsonl's alone) a story about a thing, and is answered in kind; chat.jsonl
    # has every kind
    records = {prompt: {"kind": kind, **({"animal": animal} if animal else {})}
               for kind in data.CHAT_KINDS for prompt, animal, _ in data.chat_prompts(kind)}
    for name in ("sft.jsonl", "chat.jsonl"):
        in_kind, things = 0, 0
        for r in data_read(tiny_data, name):
            assert not held_out & {m["content"] for m in r["messages"] if m["role"] == "user"}, r
            if r["family"] == "chat":
                user, assistant = (m["content"] for m in r["messages"])
                if "thing" in r:  # any phrasing: no animal, so never a held-out prompt
                    assert r["thing"] in data.THINGS and user not in records, r
                    assert data.chat_in_kind({"kind": "story", "animal": r["thing"]}, assistant)
                    things += 1
                    continue
                assert (records[user]["kind"], user) in trained, user
                assert {"kind": r["kind"], **({"animal": r["animal"]} if "animal" in r else {})} \
                    == records[user], r
                assert data.chat_in_kind(records[user], assistant), r
                in_kind += 1
        assert in_kind > 0 and (things > 0) == (name == "chat.jsonl"), (name, things)
    chats, sft_records = data_read(tiny_data, "chat.jsonl"), data_read(tiny_data, "sft.jsonl")
    assert {r["kind"] for r in chats} == set(data.CHAT_KINDS)
    assert len(chats) == round(data.CHAT_SHARE * len(sft_records))  # as many as SFT's


# --------------------------------------------------------------------------------- end to end (e2e)


def data_generate(out_dir, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--out", str(out_dir),
                             *flags],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.e2e
def test_data_is_deterministic(tiny_data, tmp_path):
    # a second process (string hashing salted differently) and an in-process run:
    # byte-identical files
    data_generate(tmp_path / "again", *DATA_TINY)
    data.main(data.Args(out=str(tmp_path / "inproc"), scale=0.02))
    for name in DATA_FILES:
        first = (tiny_data / name).read_bytes()
        assert len(first) > 0
        assert first == (tmp_path / "again" / name).read_bytes(), name
        assert first == (tmp_path / "inproc" / name).read_bytes(), name
    # another seed gives other training data, the same eval files, and never leaks the held-out keys
    data_generate(tmp_path / "seed1", *DATA_TINY, "--seed", "1")
    assert (tmp_path / "seed1" / "sft.jsonl").read_bytes() != (tiny_data / "sft.jsonl").read_bytes()
    for name in ("eval.jsonl", "prefs_eval.jsonl", "chat_eval.jsonl", "steps_eval.jsonl"):
        assert (tmp_path / "seed1" / name).read_bytes() == (tiny_data / name).read_bytes(), name
    eval_keys = {data_solve(r["family"], r["prompt"])[0]
                 for r in data_read(tiny_data, "eval.jsonl")}
    assert not eval_keys & {data_solve(r["family"], r["prompt"])[0]
                            for r in data_read(tmp_path / "seed1", "prompts.jsonl")}


def retrieval_solve(document):
    """The asked box, and the code its one note gives, read from a retrieval prompt alone (a
    training document's earlier questions: answered by their notes too)."""
    body, *answered, question = document.split("\n")
    for line in answered:
        box, code = re.fullmatch(r"What is the code of box (\d+)\? The code of box \1 is (\d+)\.",
                                 line).groups()
        assert f"The code of box {box} is {code}." in body
    box = re.fullmatch(r"What is the code of box (\d+)\? The code of box \1 is", question)[1]
    notes = re.findall(r"The code of box (\d+) is (\d+)\.", body)
    [code] = [code for b, code in notes if b == box]  # exactly one note on the asked box
    assert len({b for b, _ in notes}) == len(notes) >= 2
    return box, code, notes


def test_data_retrieval_answers_lengths_and_held_out_split(tiny_data, tmp_path):
    """detail 9: --retrieval leaves every default file as it was; each answer is the code of the
    asked box's note; eval prompts have their length's pieces; training documents ask about every
    note; no asked (box, code) trains."""
    for seed in (0, 1):
        data.main(data.Args(out=str(tmp_path / str(seed)), scale=0.02, seed=seed, retrieval=64,
                            retrieval_eval=8))
    for name in DATA_FILES:
        assert (tmp_path / "0" / name).read_bytes() == (tiny_data / name).read_bytes(), name
    evals = data_read(tmp_path / "0", "retrieval_eval.jsonl")
    assert evals == data_read(tmp_path / "1", "retrieval_eval.jsonl")  # whatever the seed
    assert Counter(r["length"] for r in evals) == {1: 8, 2: 8, 4: 8, 8: 8, 16: 8}
    asked = set()
    for r in evals:
        box, code, _ = retrieval_solve(r["prompt"])
        assert code == r["answer"] and data.is_held_out(f"box:{box}:{code}", 0.08)
        n_pieces = len(re.findall(SPLIT_PATTERN, f"{r['prompt']} {code}."))
        assert 64 * r["length"] - 20 < n_pieces <= 64 * r["length"]
        asked.add((box, code))
    assert 0.3 < np.mean([r["depth"] for r in evals]) < 0.7
    for seed in (0, 1):
        for name in ("retrieval.txt", "retrieval_long.txt"):
            documents = data_read(tmp_path / str(seed), name).strip().split("\n\n")
            assert len(documents) > 20
            for document in documents:
                prompt, answer = document.rsplit(" ", 1)
                box, code, notes = retrieval_solve(prompt)
                assert f"{code}." == answer
                assert prompt.count("\nWhat is the code of box") == len(notes)  # every note asked
                assert not any(data.is_held_out(f"box:{b}:{c}", 0.08) for b, c in notes)
                assert not asked & set(notes)


# ==================================================================================================
# 2. tokenizer.py: byte-level BPE and the chat format
# ==================================================================================================

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def random_text(rng, n):
    pools = ["abcxyzABCXYZ", "0123456789", " ", "  \t", "\n", "\r\n", "\r\x0b\x0c",
             "\u3000\xa0\u2003", ".,;:!?'\"()[]{}<>|-_=+*/\\#@$%^&~`", "'s'S'll'LL're",
             "你好世界日本語한국어", "😀👍🏽👨‍👩‍👧🎉", "e\u0301a\u0308\u0303\u20dd", "²³½Ⅻ①٣۱１𝟘𐄇",
             "\x00\x1c\x1f\x7f\x85\u2028", "ſK", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    parts = []
    for _ in range(n):
        if rng.random() < 0.1:  # any code point UTF-8 can encode (no lone surrogates)
            c = rng.randrange(0x110000)
            parts.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        else:
            pool = rng.choice(pools)
            parts.append(pool if pool.startswith("<|")
                         else "".join(rng.choice(pool) for _ in range(rng.randint(1, 4))))
    return "".join(parts)


def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & set(tok.special_tokens.values())  # special-looking text stays text
        assert tok.encode_array(text).tolist() == ids
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_chunked_pretokenization_equals_plain(tok):
    # tokenizer detail 6: cutting the text into chunks first gives the same pieces, and the same ids
    # same pattern, no chunk cache
    unchunked = Tokenizer(tok.merges, pattern=f"(?:{SPLIT_PATTERN})")
    rng = random.Random(1)
    for _ in range(500):
        text = random_text(rng, rng.randint(0, 30))
        chunked = [p for chunk in re.findall(_CHUNK_PATTERN, text)
                   for p in re.findall(SPLIT_PATTERN, chunk)]
        assert chunked == re.findall(SPLIT_PATTERN, text)
        assert "".join(chunked) == text
        assert tok.encode(text) == unchunked.encode(text)


def naive_encode(tok, text):
    """Reference encoder, piece by piece: merge the leftmost pair whose bytes are the lowest-id
    token (tiktoken)."""
    ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
    ids = []
    for piece in re.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            rank, i = min(
                (ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
            )
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_encoder_equals_naive_encoder(tok):
    # tokenizer detail 6: the chunk and piece caches change nothing, cold or warm
    rng = random.Random(2)
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(100)]
    fresh = Tokenizer(tok.merges)
    assert fresh.encode("".join(texts)) == naive_encode(tok, "".join(texts))  # one cold pass
    for text in texts:  # then mostly warm, a few new chunks at a time
        assert fresh.encode(text) == naive_encode(tok, text)
    # pieces > 256 bytes
    for text in ["ab" * 300, "=" * 500 + "\n", " " * 400 + "x", "tokenizer" * 60, "é" * 300]:
        assert fresh.encode(text) == naive_encode(tok, text)  # take the heap path (_bpe_long)
    # a pair whose right part grows before it is popped must be skipped: here b+c merges
    # first, and a+bc must wait for z+a (rank 258 < 259), giving za bc, not z abc
    tricky = Tokenizer([(98, 99), (97, 98), (122, 97), (97, 256)])
    assert tricky.encode("zabc" * 80) == naive_encode(tricky, "zabc" * 80) == [258, 256] * 80


def gpt2_chars():
    """GPT-2's bytes_to_unicode: byte -> the printable character that stands for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char = {b: chr(b) for b in printable}
    char.update({b: chr(256 + n)
                 for n, b in enumerate(b for b in range(256) if b not in printable)})
    return char


def hf_byte_order():
    """Bytes sorted by their GPT-2 character: Hugging Face's ByteLevel alphabet (id) order."""
    return sorted(range(256), key=gpt2_chars().get)


def naive_train(documents, n_merges):
    """Reference trainer: recount every pair after every merge; max count, ties -> smallest pair in
    HF order."""
    specials = "|".join(map(re.escape, SPECIAL_TOKENS + THINK_TOKENS))  # never trained on
    words = Counter(tuple(p.encode()) for doc in documents for part in re.split(specials, doc)
                    for p in re.findall(SPLIT_PATTERN, part))
    tokens = [bytes([b]) for b in range(256)]
    order = {b: i for i, b in enumerate(hf_byte_order())}
    key = lambda t: order[t] if t < 256 else t  # noqa: E731
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], -key(p[0]), -key(p[1])))
        if tokens[a] + tokens[b] in tokens:  # same bytes from another pair: reuse the token
            new = tokens.index(tokens[a] + tokens[b])
        else:
            new, _ = len(tokens), tokens.append(tokens[a] + tokens[b])
            merges.append((a, b))
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def test_merges_match_naive_trainer():
    documents = [SAMPLE, SAMPLE.lower(), corpus()[1][:3000]]
    fast = Tokenizer.train(documents, vocab_size=256 + 5 + 150)
    assert fast.merges == naive_train(documents, 150)


def test_merges_match_huggingface():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    # Hugging Face trains on special-token text too; we cut it out, so give both the cut documents
    documents = [part for doc in corpus()
                 for part in re.split("|".join(map(re.escape, SPECIAL_TOKENS + THINK_TOKENS)), doc)]
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=256 + 5 + 300, special_tokens=list(SPECIAL_TOKENS + THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ours = Tokenizer.train(documents, vocab_size=256 + 5 + 300)
    hf_merges = json.loads(hf.to_str())["model"]["merges"]
    hf_merges = [m.split(" ") if isinstance(m, str) else m for m in hf_merges]
    byte_of = {c: b for b, c in gpt2_chars().items()}
    as_bytes = [(bytes(map(byte_of.get, a)), bytes(map(byte_of.get, b))) for a, b in hf_merges]
    assert [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges] == as_bytes


def test_tiktoken_parity_with_original_pattern(tok):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
    enc = tiktoken.Encoding("ours", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=tok.special_tokens)
    for text in [SAMPLE, *SAMPLE.splitlines(keepends=True), corpus()[1]]:
        assert tok.encode(text) == enc.encode_ordinary(text)
    text = SAMPLE + "<|im_end|>"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_special_tokens(tok):
    for s, i in tok.special_tokens.items():
        assert tok.encode(s, allowed_special={s}) == [i]
        assert tok.encode(s, allowed_special="all") == [i]
        plain = tok.encode(s)
        assert len(plain) > 1 and i not in plain and tok.decode(plain) == s
        assert tok.decode([i]) == s
    text = "a<|endoftext|>b<|im_start|>c"
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == tok.encode("a") + [tok.eot_id] + tok.encode("b<|im_start|>c")
    assert tok.vocab_size == 256 + len(tok.merges) + 5 and tok.pad_id == tok.eot_id
    assert [tok.eot_id, tok.im_start_id, tok.im_end_id, tok.think_id,
            tok.special_tokens["</think>"]] == \
        list(range(tok.vocab_size - 5, tok.vocab_size))
    with pytest.raises(ValueError):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_encode_array(tok):
    docs = ["first doc", "second <|endoftext|> doc", "третий"]
    arr = tok.encode_array(docs)
    assert arr.dtype == np.uint16 and arr.flags.writeable
    assert (arr.tolist() == tok.encode(docs[0]) + [tok.eot_id] + tok.encode(docs[1]) + [tok.eot_id]
            + tok.encode(docs[2]))


def test_chat_mask(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And <|im_end|> 10*10?"},
                {"role": "assistant", "content": "100, as\nasked."}]
    ids, mask = tok.encode_chat(messages)
    assert len(ids) == len(mask) and tok.decode(ids) == tok.render_chat(messages)
    assert ids.count(tok.im_end_id) == 5  # the "<|im_end|>" inside a content stays plain text
    runs = [(i, j) for i, j in _runs(mask)]
    assert [tok.decode(ids[i:j]) for i, j in runs] == ["5<|im_end|>", "100, as\nasked.<|im_end|>"]
    for i, j in runs:
        assert (tok.decode(ids[:i]).endswith("<|im_start|>assistant\n")
                and ids[j - 1] == tok.im_end_id)
        assert tok.decode(ids[j:j + 1]) == "\n" and mask[j] == 0
    ids2, mask2 = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert tok.decode(ids2).endswith("<|im_end|>\n<|im_start|>assistant\n") and sum(mask2) == 0
    assert tok.encode_prompt(messages[:2]) == ids2
    assert (tok.encode_prompt("2+3?")
            == tok.encode_chat([{"role": "user", "content": "2+3?"}], True)[0])
    assert tok.render_chat(messages[:1], add_generation_prompt=True) == \
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>assistant\n"


def test_think_tokens_are_special_in_replies_only(tok):
    think, end = tok.special_tokens["<think>"], tok.special_tokens["</think>"]
    assert tok.think_tokens == THINK_TOKENS and tok.think_id == think
    messages = [{"role": "system", "content": "Say <think> if you like."},
                {"role": "user", "content": "What is <think>1+1</think>?"},
                {"role": "assistant", "content": "<think>1+1=2</think>2"}]
    ids, mask = tok.encode_chat(messages)
    # the system's and the user's lookalikes stay text
    assert ids.count(think) == 1 and ids.count(end) == 1
    reply = [i for i, m in zip(ids, mask) if m]
    assert reply == [think] + tok.encode("1+1=2") + [end] + tok.encode("2") + [tok.im_end_id]
    # round trip: the special ids decode to their text
    assert tok.decode(ids) == tok.render_chat(messages)
    # a corpus: think tokens only where the caller allows them (pretrain.py does)
    doc = "Q? <think>1+1=2</think>2"
    assert think not in tok.encode_array([doc]).tolist()
    assert (tok.encode_array([doc, "x"], THINK_TOKENS).tolist() == tok.encode(doc, THINK_TOKENS)
            + [tok.eot_id] + tok.encode("x"))
    assert tok.encode(doc, THINK_TOKENS).count(think) == 1
    # a tokenizer without them (an imported one) has none, and replies stay plain text
    old = Tokenizer(tok.merges, special_tokens=SPECIAL_TOKENS)
    assert old.think_tokens == () and old.think_id is None
    assert (old.think_tokens == ()
            and old.decode(old.encode_chat(messages)[0]) == tok.render_chat(messages))


def test_pretraining_conversations_encode_as_sft_encodes_them(tok, tiny_data):
    # tokenizer.py detail 10: a conversation in a pretraining text is the token sequence that SFT
    # trains on (encode_chat), so the base model has seen the template's tokens where SFT puts them
    documents = [d.strip("\n") for d in data_read(tiny_data, "pretrain.txt").split("\n\n")
                 if d.startswith("<|im_start|>")]  # as tokenizer.read_documents reads them
    assert documents
    for document in documents[:200]:
        messages = [{"role": role, "content": content}
                    for role, content in re.findall(DATA_TURN, document, flags=re.S)]
        ids, _ = tok.encode_chat(messages)
        assert tok.encode(document, tok.text_tokens) == ids[: -len(tok.encode("\n"))]
        assert tok.render_chat(messages).rstrip("\n") == document
    # <|endoftext|> stays text in a corpus: it is the boundary encode_array puts between documents
    assert tok.eot_id not in tok.encode("a<|endoftext|>b", tok.text_tokens)
    assert tok.encode_array(["a", "b"], tok.text_tokens).tolist().count(tok.eot_id) == 1


def test_final_answer_rule():
    # no think block: the whole reply
    assert final_answer("85") == "85" and final_answer(" 85\n") == "85"
    # thinks: the text after </think>
    assert final_answer("<think>7+8=15</think>85") == "85"
    assert final_answer("<think>7+8=15</think> 85 ") == "85"
    # never closed: no answer
    assert final_answer("<think>7+8=15") is None and final_answer("<think>") is None
    # text after the answer stays
    assert final_answer("<think>a</think>85 and more") == "85 and more"
    # the first </think> closes
    assert final_answer("<think>a</think>85</think>9") == "85</think>9"
    # thinks only when it starts so
    assert final_answer("85<think>a</think>9") == "85<think>a</think>9"
    assert final_answer("</think>85") == "</think>85" and final_answer("") == ""
    assert (thinks("<think>x</think>1") and thinks(" <think>") and not thinks("1<think>")
            and not thinks(""))


def _runs(mask):
    start = None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            yield start, i
            start = None


@pytest.mark.parametrize("messages", [[{"role": "bot", "content": "hi"}], [{"role": "user"}],
                                      [{"role": "user", "content": 3}], [("user", "hi")],
                                      {"role": "user"}])
def test_bad_messages(tok, messages):
    with pytest.raises(ValueError) as e:
        tok.encode_chat(messages)
    assert "\n" not in str(e.value)


def test_save_load_identity(tok, tmp_path):
    path = str(tmp_path / "sub" / "tok.json")
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.to_dict() == tok.to_dict()
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    d = tok.to_dict()
    assert json.loads(json.dumps(d)) == d and Tokenizer.from_dict(d).vocab == tok.vocab
    assert not os.path.exists(path + ".tmp")


def test_decode_cut_utf8(tok):
    ids = list("é😀你".encode())  # byte tokens
    for k in range(len(ids) + 1):
        tok.decode(ids[:k])
        tok.decode(ids[k:])
    assert tok.decode([0xF0]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="below"):
        Tokenizer.train("some text", vocab_size=258)
    for empty in ["", [], ["", "<|endoftext|>"]]:
        with pytest.raises(ValueError, match="empty"):
            Tokenizer.train(empty, vocab_size=300)
    good = {"type": "byte-level-bpe", "pattern": SPLIT_PATTERN,
            "special_tokens": list(SPECIAL_TOKENS), "merges": []}
    for content in ["{not json", "[1, 2]", json.dumps({**good, "special_tokens": []}),
                    json.dumps({**good, "merges": [[300, 1]]}),
                    json.dumps({**good, "merges": [[1, 2, 3]]}),
                    json.dumps({**good, "pattern": "("}),
                    json.dumps({**good, "pattern": r"(\w+)|\s+"}),
                    json.dumps({**good, "special_tokens": [*SPECIAL_TOKENS, ""]})]:
        path = tmp_path / "bad.json"
        path.write_text(content)
        with pytest.raises(ValueError) as e:
            Tokenizer.load(str(path))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing.json"))
    # a pattern that drops text is refused, not obeyed
    with pytest.raises(ValueError, match="skips characters"):
        Tokenizer([], pattern=r"[a-z]+").encode("Hi there!")


def test_training_with_processes_is_exact():
    documents = [SAMPLE, corpus()[1][:5000], SAMPLE.upper(), "x <|im_start|> y"]
    one = Tokenizer.train(documents, vocab_size=400)
    assert Tokenizer.train(documents, vocab_size=400, processes=2).merges == one.merges
    # special tokens never merged
    assert all(b"<|" not in t for t in one.vocab[:256 + len(one.merges)])


def test_read_documents(tmp_path):
    """The one reader of pretraining text (pretrain.py, eval.py, tokenizer.py): .txt documents split
    at blank lines (whole files for the tokenizer), .jsonl {"text"} lines, a bad line named
    file:line."""
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n\n\nfour\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x\u2028y"}) + "\n\n"
                                      + json.dumps({"text": " "}) + "\n")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    # blank documents dropped
    assert read_documents(paths) == ["one\ntwo", "three", "four", "x\u2028y"]
    assert (read_documents(paths, whole_files=True)
            == ["one\ntwo\n\nthree\n\n\n\nfour\n", "x\u2028y"])
    assert read_documents(paths[0]) == read_documents(paths[:1])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: expected"):
        read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n \n")
    with pytest.raises(ValueError, match="empty"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="not found or not a file"):
        read_documents(str(tmp_path))


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_cli(tmp_path):
    out = tmp_path / "tok.json"
    cmd = [sys.executable, os.path.join(ROOT, "tokenizer.py"), "--out", str(out), "--vocab-size",
           "300"]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "a.txt").write_text(SAMPLE)
    for bad, says in [
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--data", str(tmp_path)], "not a file"),
        (["--data", str(tmp_path / "latin1.txt")], "latin1.txt: not UTF-8"),
        (["--data", str(tmp_path / "a.txt"), "--out", str(tmp_path)], "is a directory"),
    ]:
        r = subprocess.run(cmd + bad, capture_output=True, text=True)
        assert (r.returncode == 2 and r.stderr.startswith("error:")
                and len(r.stderr.strip().splitlines()) == 1)
        assert says in r.stderr
    assert not out.exists() and not os.path.exists(str(tmp_path) + ".tmp")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello world\u2028two"}) + "\n")
    r = subprocess.run(
        cmd + ["--data", str(tmp_path / "a.txt"), "--data", str(tmp_path / "b.jsonl")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "bytes/token" in r.stdout
    assert Tokenizer.load(str(out)).vocab_size == 300


# ==================================================================================================
# 3. model.py: the network, the chunked loss, checkpoints
# ==================================================================================================


def hf_kwargs(cfg):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling["factor"],
            "original_max_position_embeddings": cfg.rope_scaling[
                "original_max_position_embeddings"
            ],
        }
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope,
                attn_implementation="eager", pad_token_id=0)


def copy_into(hf, ours):
    result = hf.load_state_dict(ours.state_dict(), strict=True)  # key for key, same shapes
    assert not result.missing_keys and not result.unexpected_keys
    return hf.eval()


def shifted(ids):  # HF labels -> our next-token targets
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


# ----------------------------------------------------- the network: parity with transformers, sizes


@pytest.mark.parametrize("overrides", [
    dict(),                                                                 # GQA, QKV bias, tied
    dict(tie_word_embeddings=False, num_key_value_heads=4),                 # untied, MHA
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
], ids=["gqa-bias-tied", "untied-mha", "yarn"])
def test_qwen2_logits_and_loss_match_transformers(overrides):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(**overrides)
    hf = copy_into(
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_kwargs(ours.config))), ours
    )
    ids = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        logits, _ = ours(ids)
        out = hf(ids, labels=ids)
        _, loss = ours(ids, shifted(ids))
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)


def test_no_qkv_bias_matches_llama():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(attention_bias=False)
    hf = copy_into(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs(ours.config))), ours
    )
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_qwen2_moe(norm_topk_prob):
    transformers = pytest.importorskip("transformers")
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
               shared_expert_intermediate_size=48, norm_topk_prob=norm_topk_prob,
               router_aux_loss_coef=0.1)
    ours = tiny_model(**moe)
    kwargs = {**hf_kwargs(ours.config), **moe, "output_router_logits": True}
    hf = copy_into(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**kwargs)), ours)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        torch.testing.assert_close(ours(ids)[0], out.logits, atol=1e-4, rtol=0)
        # CE + 0.1 * aux
        torch.testing.assert_close(ours(ids, shifted(ids))[1], out.loss, atol=1e-5, rtol=0)


def test_moe_without_shared_expert_matches_mixtral():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      attention_bias=False)
    kwargs = {**hf_kwargs(ours.config), "num_local_experts": 4, "num_experts_per_tok": 2,
              "intermediate_size": 24}
    hf = copy_into(transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)), ours)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


def test_load_balancing_loss_by_hand():
    # uniform router: P_e = 1/4; top-2 of tied probs picks experts 0 and 1: f = (1, 1, 0, 0);
    # aux = 4 * 0.5 = 2
    assert load_balancing_loss([torch.zeros(6, 4)], top_k=2).item() == pytest.approx(2.0)
    # padding rows (mask 0) do not count
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 9.0]])
    assert load_balancing_loss([logits], 1, torch.tensor([1, 0])).item() == pytest.approx(
        4 * torch.softmax(logits[0], -1)[0].item())


def test_padded_batch_matches_transformers_and_unpadded():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model()
    hf = copy_into(
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_kwargs(ours.config))), ours
    )
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in (12, 5, 9)]
    ids, mask = left_pad(seqs, pad_id=0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, _ = ours(ids, attention_mask=mask)
        hf_logits = hf(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        torch.testing.assert_close(logits[real], hf_logits[real], atol=1e-4, rtol=0)
        assert torch.isfinite(logits).all()  # rows of pure padding stay finite
        for row, seq in enumerate(seqs):
            alone, _ = ours(torch.tensor([seq]))
            torch.testing.assert_close(logits[row, -len(seq):], alone[0], atol=1e-5, rtol=0)


def test_score_head_matches_sequence_classification():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(head="score", tie_word_embeddings=False)
    hf = copy_into(transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(**hf_kwargs(ours.config), num_labels=1)), ours)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    completion_ids, completion_mask = right_pad([[11, 12], [13, 14, 15]], pad_id=0)
    ids, mask = (
        torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([prompt_mask, completion_mask], 1),
    )
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        values, _ = ours(ids, attention_mask=mask)
        hidden = hf.model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        hf_values = hf.score(hidden).squeeze(-1)
        real = mask.bool()
        torch.testing.assert_close(values[real], hf_values[real], atol=1e-4, rtol=0)
        # HF pools at the last non-pad token: the reward of the whole sequence
        pooled = hf(ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1)
        scores = sequence_scores(ours, prompt_ids, prompt_mask, completion_ids, completion_mask)
        torch.testing.assert_close(scores, pooled, atol=1e-4, rtol=0)
        per_token = completion_values(ours, prompt_ids, prompt_mask, completion_ids,
                                      completion_mask)
        # predicts the last completion token
        torch.testing.assert_close(per_token[1, 2], values[1, -2])
        assert per_token[0, 2] == 0                                 # padding


def test_param_count_flops_and_optimizer_groups():
    # per layer: q 32*32+32, k and v 32*16+16 each, o 32*32, mlp 3*32*64, two norms 32 each = 9344
    per_layer = 1056 + 528 + 528 + 1024 + 6144 + 64
    tied, untied = tiny_model(), tiny_model(tie_word_embeddings=False)
    assert tied.num_params() == tied.num_params(non_embedding=False) == 2 * per_layer + 32 + 97 * 32
    assert untied.num_params(non_embedding=False) == 2 * per_layer + 32 + 2 * 97 * 32
    # the lm head counts, the lookup does not
    assert untied.num_params() == 2 * per_layer + 32 + 97 * 32
    assert tied.flops_per_token(64) == 6 * tied.num_params() + 12 * 2 * 32 * 64
    assert tied.estimate_mfu(1000.0, 1e12) == pytest.approx(tied.flops_per_token(64) * 1000 / 1e12)
    moe = tiny_model(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8)
    routed = 2 * 4 * 3 * 32 * 8
    assert moe.flops_per_token(0) == 6 * (moe.num_params() - routed * 3 / 4)
    decay, no_decay = untied.configure_optimizer(1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # + lm_head
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7 + 1
    assert any(p is untied.model.embed_tokens.weight for p in no_decay["params"])


def test_weight_decay_groups():
    model = tiny_model(vocab_size=300, max_position_embeddings=32)
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0
             for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert ("model.layers.0.self_attn.q_proj.weight" in decay
            and "model.layers.1.mlp.down_proj.weight" in decay)
    assert "model.embed_tokens.weight" in no_decay
    assert all(n.endswith(".bias") or "norm" in n or "embed" in n for n in no_decay)
    assert all(n.endswith(".weight") and "norm" not in n and "embed" not in n for n in decay)


def quintic_newton_schulz_by_hand(G, steps=5):
    """X <- a X + b (X X^T) X + c (X X^T)^2 X from X = G / ||G||_F, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 5, 7)])
def test_newton_schulz_maps_singular_values_by_the_quintic(shape):
    """X = U p(p(p(p(p(S / ||G||)))) V^T for G = U S V^T, p(s) = a s + b s^3 + c s^5: the iteration
    keeps G's singular vectors and drives every singular value of a well-conditioned G into
    [0.68, 1.21] (the band p keeps once s >= 0.05)."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = model_module.newton_schulz(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / (G.norm(dim=(-2, -1), keepdim=True)[..., 0] + 1e-7)  # the 1e-7 guards G = 0
    assert s.min() >= 0.05  # the precondition of the band
    for _ in range(5):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    torch.testing.assert_close(X, U @ torch.diag_embed(s) @ Vh, atol=1e-10, rtol=0)
    singular = torch.linalg.svdvals(X)
    assert singular.min() > 0.68 and singular.max() < 1.21
    if len(shape) == 2:
        np.testing.assert_allclose(X.numpy(), quintic_newton_schulz_by_hand(G.numpy()), atol=1e-12)


def test_orthogonalised_batches_each_shape_as_one():
    """The updates of one shape orthogonalised as one batch: each as newton_schulz alone, in its
    place among updates of other shapes."""
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(*shape, generator=generator, dtype=torch.float64)
               for shape in ((6, 4), (4, 6), (6, 4), (3, 3), (4, 6), (6, 4))]
    for update, alone in zip(model_module.orthogonalised(updates), updates):
        torch.testing.assert_close(update, model_module.newton_schulz(alone), rtol=0, atol=1e-12)


def test_muon_steps_by_hand_and_adamw_keeps_the_rest():
    """Two steps of a tall matrix in float64: m <- mu m + (1 - mu) g, u = (1 - mu) g + mu m,
    W <- (1 - lr wd) W - lr sqrt(rows / cols) NS(u); a vector in an AdamW group steps as
    torch.optim.AdamW does."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias_copy = bias.detach().clone().requires_grad_()
    lr, wd, mu = 0.05, 0.1, 0.95
    optimizer = model_module.Muon([{"params": [bias], "weight_decay": 0.0},
                                   {"params": [W], "lr": lr, "weight_decay": wd, "muon": True,
                                    "momentum": mu}], lr=1e-2)
    reference = torch.optim.AdamW([bias_copy], lr=1e-2, weight_decay=0.0)
    expected, momentum = W.detach().numpy().copy(), np.zeros((6, 4))
    for _ in range(2):
        g = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        g_bias = torch.randn(4, generator=generator, dtype=torch.float64)
        W.grad, bias.grad, bias_copy.grad = g.clone(), g_bias.clone(), g_bias.clone()
        optimizer.step()
        reference.step()
        momentum = mu * momentum + (1 - mu) * g.numpy()
        update = quintic_newton_schulz_by_hand((1 - mu) * g.numpy() + mu * momentum)
        expected = (1 - lr * wd) * expected - lr * (6 / 4) ** 0.5 * update
        np.testing.assert_allclose(W.detach().numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(optimizer.state[W]["momentum_buffer"].numpy(), momentum,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(bias, bias_copy, rtol=0, atol=1e-12)
    assert "exp_avg" not in optimizer.state[W]  # AdamW never touched the Muon matrix


@pytest.mark.parametrize("tied", [True, False])
def test_muon_groups_take_the_block_matrices_only(tied):
    model = tiny_model(tie_word_embeddings=tied)
    optimizer = model.configure_optimizer(1e-3, 0.1, muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    adamw = [names[id(p)] for g in optimizer.param_groups if not g.get("muon")
             for p in g["params"]]
    assert muon == {n for n, p in model.named_parameters() if n.startswith("model.layers.")
                    and p.dim() == 2} and len(muon) == 2 * 7  # q, k, v, o, gate, up, down
    assert sorted([*muon, *adamw]) == sorted(names.values())  # each parameter once
    assert ("lm_head.weight" in adamw) == (not tied) and "model.embed_tokens.weight" in adamw
    assert type(model.configure_optimizer(1e-3, 0.1)) is torch.optim.AdamW  # muon_lr 0: AdamW


# --------------------------------------------------------------------------------- the chunked loss


def test_chunked_cross_entropy_equals_naive(monkeypatch):
    # 7 rows a chunk: many chunks, a ragged last one
    monkeypatch.setattr(model_module, "CHUNK_LOGITS", 97 * 7)
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    targets[::3] = -100
    loss = chunked_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(3 * loss, (hidden, weight))
    naive = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    naive_grads = torch.autograd.grad(3 * naive, (hidden, weight))
    torch.testing.assert_close(loss, naive)
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n)
    with torch.no_grad():  # no grad mode: loss only
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets), naive)


def test_model_init_std_is_one_over_sqrt_width():
    """detail 5: weights and embeddings N(0, 1/width); o_proj and down_proj also / sqrt(2 layers).
    65k samples per matrix: the sample std is within 1 % of the true one (its relative standard
    error is 1/sqrt(2n) = 0.3 %)."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         vocab_size=512)
    model = Transformer(config)
    layer = model.model.layers[0]
    std = {name: p.std().item() for name, p in model.named_parameters()}
    assert std["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(256 ** -0.5, rel=0.01)
    assert std["model.embed_tokens.weight"] == pytest.approx(256 ** -0.5, rel=0.01)
    residual = 256 ** -0.5 / math.sqrt(2 * 2)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual, rel=0.01)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.01)


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_gradients_equal_naive(monkeypatch, tied):
    monkeypatch.setattr(model_module, "CHUNK_LOGITS", 97 * 16)
    model = tiny_model(tie_word_embeddings=tied).train()
    ids, targets = torch.randint(0, 97, (3, 30)), torch.randint(0, 97, (3, 30))
    targets[:, :7] = -100
    _, loss = model(ids, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits, _ = model(ids)
    naive = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    naive_grads = torch.autograd.grad(naive, list(model.parameters()))
    torch.testing.assert_close(loss, naive)
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model, tokenizer = tiny_model(tie_word_embeddings=False), Tokenizer(merges=[])

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, module, name):
            super().__init__()
            setattr(self, name, module)
    path = str(tmp_path / "out" / "sft.pt")
    wrapped = Wrapper(Wrapper(model, "_orig_mod"), "module")  # DDP around a compiled model
    save_checkpoint(path, wrapped, tokenizer, "sft", parent="out/pretrain.pt", step=7,
                    args={"lr": 1e-3}, metrics={"loss": 1.5}, optimizer={"state": {}})
    assert not os.path.exists(path + ".tmp")
    loaded, loaded_tokenizer, checkpoint = load_checkpoint(path, head="lm")
    assert loaded.config == model.config and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert checkpoint["stage"] == "sft" and checkpoint["step"] == 7 and "optimizer" in checkpoint
    assert list(checkpoint["model"]) == list(model.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this would create a file


def test_malicious_checkpoint_is_refused(tmp_path):
    target = str(tmp_path / "pwned")
    for i, write in enumerate(
        (torch.save, lambda obj, f: pickle.dump(obj, open(f, "wb"), protocol=2))
    ):
        path = str(tmp_path / f"evil{i}.pt")
        write({"model": Evil(target), "config": {}}, path)
        with pytest.raises(ValueError, match="not a model.py checkpoint"):
            load_checkpoint(path)
        assert not os.path.exists(target)
    pickle.load(open(path, "rb"))  # the payload is real: plain unpickling creates the file
    assert os.path.exists(target)


def test_checkpoint_errors_are_one_line(tmp_path):
    def error(path, **kw):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_checkpoint(str(path), **kw)
        assert "\n" not in str(info.value)
        return str(info.value)
    assert "run `python sft.py` first" in error(tmp_path / "out" / "sft.pt")
    (tmp_path / "notes.pt").write_text("hello")
    assert "not a model.py checkpoint" in error(tmp_path / "notes.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert "not a model.py checkpoint" in error(tmp_path / "other.pt")
    save_checkpoint(str(tmp_path / "reward.pt"), tiny_model(head="score"), Tokenizer(merges=[]),
                    "reward")
    assert "'score' head, expected a 'lm' head" in error(tmp_path / "reward.pt", head="lm")
    checkpoint = torch.load(tmp_path / "reward.pt", weights_only=True)
    checkpoint["config"]["hidden_size"] = 48
    torch.save(checkpoint, tmp_path / "bad.pt")
    assert "do not match its config" in error(tmp_path / "bad.pt")


# ==================================================================================================
# 4. engine.py: generation, log-probs, scores, held-out accuracy, batch order
# ==================================================================================================


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_and_padded_batch_equals_one_by_one():
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    batch, _, _ = generate(model, prompts, 12, temperature=0)
    for row, prompt in enumerate(prompts):
        alone, _, _ = generate(model, [prompt], 12, temperature=0)
        assert alone[0].tolist() == greedy_without_cache(model, prompt, 12)
        assert batch[row].tolist() == alone[0].tolist()


def test_moe_cached_greedy_equals_uncached():
    model = tiny_model(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32)
    completion, _, _ = generate(model, [[1, 2, 3]], 8, temperature=0)
    assert completion[0].tolist() == greedy_without_cache(model, [1, 2, 3], 8)


DCA = {"chunk_size": 8, "local_size": 3}  # chunks of 5 positions


def naive_dual_chunk_forward(self, x, rope, mask, kv_cache):
    """Attention.forward by DCA's definition (An et al. 2024), unpadded, no cache: the remapped
    position of every query-key pair in a matrix, each query rotated once per key, every score."""
    B, T, _ = x.shape
    c, s = DCA["chunk_size"], DCA["chunk_size"] - DCA["local_size"]
    H, D = self.num_heads, self.head_dim
    q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k, v = (proj(x).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // self.num_kv_heads, 1)
            for proj in (self.k_proj, self.v_proj))                              # (B, H, T, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    behind = i // s - j // s
    query_position = torch.where(behind == 0, i % s,
                                 torch.where(behind == 1, (i % s + s).clamp(max=c), c))  # (T, T)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)

    def rotated(x, position):  # x (..., D) turned by position * inv_freq, in HF's two halves
        angle = position[..., None].float() * inv_freq
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()],
                         dim=-1)

    scores = (rotated(q[:, :, :, None], query_position) * rotated(k, j[0] % s)[:, :, None]).sum(-1)
    scores = (scores / math.sqrt(D)).masked_fill(j > i, float("-inf"))          # (B, H, T, T)
    return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("length", [5, 9, 37])  # 1, 2 and 8 chunks
def test_dual_chunk_attention_equals_naive_with_and_without_cache(monkeypatch, length):
    monkeypatch.setattr(model_module, "DCA_QUERIES", 4)  # several blocks of queries
    dca, plain = tiny_model(dual_chunk_attention_config=DCA), tiny_model()
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    logits = dca(ids)[0]
    # the cache: a prompt, then one token, then the rest at once; row 1 left-padded by 3
    cache, mask = KVCache(dca.config, 2, length + 3), torch.ones(2, length + 3, dtype=torch.long)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    padded[0], mask[1, :3] = torch.cat([ids[0], torch.zeros(3, dtype=torch.long)]), 0
    mask[0, length:] = 0  # row 0: its pads at the end, after every real token
    cut = [0, min(4, length), min(5, length), length + 3]
    cached = torch.cat([dca(padded[:, a:b], attention_mask=mask[:, a:b], kv_cache=cache)[0]
                        for a, b in zip(cut, cut[1:]) if b > a], dim=1)
    prompt = ids[0].tolist()  # generate's cache, across chunks, as its uncached greedy
    assert generate(dca, [prompt], 6, temperature=0)[0][0].tolist() == greedy_without_cache(
        dca, prompt, 6)
    monkeypatch.setattr(model_module.Attention, "forward", naive_dual_chunk_forward)
    naive = plain(ids)[0]
    assert (logits - naive).abs().max() < 1e-5
    assert (cached[0, :length] - naive[0]).abs().max() < 1e-5
    assert (cached[1, 3:] - naive[1]).abs().max() < 1e-5


def test_dual_chunk_attention_is_ordinary_attention_within_one_chunk():
    dca, plain = tiny_model(dual_chunk_attention_config=DCA), tiny_model()
    ids = torch.randint(0, 97, (3, 5))  # 5 positions: one chunk
    assert (dca(ids)[0] - plain(ids)[0]).abs().max() < 1e-5
    assert torch.equal(generate(dca, [[1, 2], [3]], 3, temperature=0)[0],
                       generate(plain, [[1, 2], [3]], 3, temperature=0)[0])
    with pytest.raises(ValueError, match="local_size < chunk_size"):
        tiny_model(dual_chunk_attention_config={"chunk_size": 4, "local_size": 4})


@pytest.mark.parametrize("path", ["loss", "shared_prompt"])
def test_grad_checkpoint_gives_the_same_gradients_and_keeps_less(path):
    """detail 12, with dropout (the recomputation replays its random masks) and through the grown
    KV cache of the shared-prompt log-probs (GRPO, DPO): the same gradients, and the tensors saved
    for the backward outside the checkpointed blocks are a fraction of all of them."""
    model = tiny_model(dropout=0.1).train()
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    grads, saved = {}, {}
    for on in (False, True):
        model.grad_checkpoint, numel = on, [0]
        torch.manual_seed(1)

        def pack(tensor):
            numel[0] += tensor.numel()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if path == "loss":
                loss = model(ids, ids)[1]
            else:  # two replies per prompt, the prompts run once through a grown cache
                prompt_mask = torch.ones(4, 10, dtype=torch.long)
                prompt_mask[2:, :3] = 0
                prompts = ids[::2, :10].repeat_interleave(2, dim=0)
                loss = completion_logprobs(model, prompts, prompt_mask, ids[:, 10:],
                                           torch.ones(4, 14), group_size=2).sum()
        grads[on] = torch.autograd.grad(loss, list(model.parameters()))
        saved[on] = numel[0]
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert saved[True] < 0.5 * saved[False]


def test_sampling_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 10, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, 10, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(1))
    c = generate(model, prompts, 10, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    greedy, _, _ = generate(model, prompts, 10, temperature=0)
    top1, logp, _ = generate(
        model, prompts, 10, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(greedy, top1)
    assert torch.allclose(logp, torch.zeros_like(logp))  # a one-token distribution


def test_sample_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for top_k, top_p, allowed in [
        (2, 1.0, {0, 1}),
        (0, 0.7, {0, 1}),
        (0, 0.45, {0}),
        (0, 0.85, {0, 1, 2}),
        (0, 0.0, {0}),
    ]:
        g = torch.Generator().manual_seed(0)
        seen = {int(sample_token(logits, 1.0, top_k, top_p, g)[0]) for _ in range(200)}
        assert seen == allowed
    _, logp = sample_token(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    # renormalised over the 2
    assert logp.exp().item() in (pytest.approx(0.5 / 0.8), pytest.approx(0.3 / 0.8))
    for temperature, top_p in [(-1.0, 1.0), (1.0, 1.5), (1.0, -0.1)]:
        with pytest.raises(ValueError, match="temperature must be >= 0 and top_p in"):
            sample_token(logits, temperature, 0, top_p)


def test_generate_logprobs_equal_completion_logprobs_and_eos_handling():
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    eos = 2
    completions, logp, mask = generate(model, prompts, 30, eos_id=eos, pad_id=0,
                                       generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    with torch.no_grad():
        again = completion_logprobs(model, prompt_ids, prompt_mask, completions, mask)
    torch.testing.assert_close(logp, again, atol=1e-5, rtol=0)
    for row in range(len(prompts)):  # 1 up to and including the first EOS, pad after it
        tokens = completions[row].tolist()
        n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert mask[row].tolist() == [1.0] * n + [0.0] * (len(tokens) - n)
        assert all(t == 0 for t in tokens[n:])
    # generation stops once every row has hit EOS: zero final-norm weights give all-zero
    # logits, argmax 0
    with torch.no_grad():
        model.model.norm.weight.zero_()
    completions, _, mask = generate(model, prompts, 30, temperature=0, eos_id=0, pad_id=1)
    assert completions.tolist() == [[0]] * 3 and mask.tolist() == [[1.0]] * 3


def test_rows_that_end_early_leave_the_others_unchanged():
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]
    free, _, _ = generate(model, prompts, 8, temperature=0)  # no EOS: 8 greedy tokens per row
    free = free.tolist()
    # an EOS that one row emits mid-reply while another row never emits it
    eos = next(t for row in free for t in row[1:-1]
               if any(t not in other for other in free) and any(t in other[:-1] for other in free))
    ids, logp, mask = generate(model, prompts, 8, temperature=0, eos_id=eos, pad_id=0)
    ends = [row.index(eos) + 1 if eos in row else 8 for row in free]
    assert ids.shape[1] == max(ends) and min(ends) < max(ends)
    for row, end in enumerate(ends):  # each row as on its own up to its EOS, then padding
        assert ids[row].tolist() == free[row][:end] + [0] * (ids.shape[1] - end)
        assert mask[row].tolist() == [1.0] * end + [0.0] * (ids.shape[1] - end)
        assert (logp[row, end:] == 0).all()


def test_completion_logprobs_invariant_to_padding_and_entropy():
    model = tiny_model()
    prompts, completions = [[3, 4, 5], [6, 7, 8, 9, 10]], [[11, 12, 13], [14]]
    p_ids, p_mask = left_pad(prompts, 0)
    c_ids, c_mask = right_pad(completions, 0)
    zeros = torch.zeros(2, 2, dtype=torch.long)
    # 2 more pads on the left
    padded_p = torch.cat([zeros, p_ids], 1), torch.cat([zeros, p_mask], 1)
    # 2 more on the right
    padded_c = torch.cat([c_ids, zeros], 1), torch.cat([c_mask, zeros], 1)
    with torch.no_grad():
        logp, entropy = completion_logprobs(
            model, p_ids, p_mask, c_ids, c_mask, return_entropy=True
        )
        padded = completion_logprobs(model, *padded_p, *padded_c)
        torch.testing.assert_close(padded[:, :3], logp, atol=1e-5, rtol=0)
        assert (padded[:, 3:] == 0).all() and logp[1, 1:].eq(0).all()
        # by hand for row 0: full forward on the unpadded sequence, temperature 2
        logits, _ = model(torch.tensor([prompts[0] + completions[0]]))
        by_hand = (
            (logits[0, 2:5] / 2)
            .log_softmax(-1)
            .gather(1, torch.tensor([[11], [12], [13]]))
            .squeeze(1)
        )
        hot = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=2.0)
        torch.testing.assert_close(hot[0], by_hand, atol=1e-5, rtol=0)
        probs = logits[0, 2:5].softmax(-1)
        torch.testing.assert_close(entropy[0], -(probs * probs.log()).sum(-1), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="temperature 0"):  # logits / 0 would be NaN
            completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=0.0)


def test_grouped_completion_logprobs_equal_the_joined_forward():
    model = tiny_model().train()
    batch = grouped_batch()

    def run(group_size):
        model.zero_grad()
        logp, entropy = completion_logprobs(
            model, *batch, temperature=0.7, return_entropy=True, group_size=group_size
        )
        # a loss that weighs each position
        ((logp * torch.arange(1.0, 5.0)).sum() + entropy.sum()).backward()
        return logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]
    logp, entropy, grads = run(1)
    shared_logp, shared_entropy, shared_grads = run(3)
    torch.testing.assert_close(shared_logp, logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(shared_entropy, entropy, atol=1e-6, rtol=0)
    # the gradient reaches the prompt's keys through the cache
    for g, shared in zip(grads, shared_grads):
        torch.testing.assert_close(shared, g, atol=1e-5, rtol=1e-4)
    assert (shared_logp[batch[3] == 0] == 0).all()
    # no grad (old and reference log-probs) gives the loss's numbers exactly, so the first
    # ratio is 1
    with torch.no_grad():
        assert torch.equal(completion_logprobs(model, *batch, temperature=0.7, group_size=3),
                           shared_logp)
    # a frozen copy (requires_grad False, as the reference) gives the policy's numbers
    # exactly: KL 0 at the start (prompts of 16-33 tokens: at some shapes a strided lm-head
    # input took another matmul path)
    frozen = tiny_model().train().requires_grad_(False)
    long = left_pad([list(range(s, s + n)) for s, n in [(1, 29), (5, 33), (9, 16), (3, 29)]
                     for _ in range(3)], 0)
    long = (*long, *right_pad([[10, 11, 12, 5, 1, 2]] * 12, 0))
    with torch.no_grad():
        assert torch.equal(completion_logprobs(frozen, *long, group_size=3),
                           completion_logprobs(model, *long, group_size=3))
    # one-token replies: the prompt pass alone
    one = (*batch[:2], batch[2][:, :1], batch[3][:, :1])
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, *one, group_size=3),
                                   completion_logprobs(model, *one), atol=1e-6, rtol=0)
    # each prompt runs once: 3 prompts (the longest 6 tokens), then the 9 replies without
    # their last token
    shapes = []
    hook = model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    completion_logprobs(model, *batch, group_size=3)
    hook.remove()
    assert shapes == [(3, 6), (9, 3)]
    # groups of 3 read as groups of 2 mix prompts
    with pytest.raises(ValueError, match="must share one prompt"):
        completion_logprobs(model, *(t[:8] for t in batch), group_size=2)
    with pytest.raises(ValueError, match="must share one prompt"):  # 9 rows are not groups of 2
        completion_logprobs(model, *batch, group_size=2)


def test_shared_prompt_logprobs_equal_one_forward_per_completion_set():
    """DPO's chosen and rejected replies on one prompt pass: the log-probs and gradients of two
    joined forwards."""
    model = tiny_model().train()
    p_ids, p_mask = left_pad([[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]], 0)
    sets = [right_pad(r, 0)
            for r in ([[15, 16], [17], [18, 19, 20]], [[21, 22, 23, 24, 25], [26], [27]])]

    def run(shared):
        model.zero_grad()
        if shared:
            logps = shared_prompt_logprobs(model, p_ids, p_mask, sets, temperature=0.7)
        else:
            logps = [completion_logprobs(model, p_ids, p_mask, ids, mask, temperature=0.7)
                     for ids, mask in sets]
        sum(logp.sum() * (i + 1) for i, logp in enumerate(logps)).backward()
        return [logp.detach() for logp in logps], [p.grad.clone() for p in model.parameters()]
    (chosen, rejected), grads = run(False)
    (shared_chosen, shared_rejected), shared_grads = run(True)
    torch.testing.assert_close(shared_chosen, chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(shared_rejected, rejected, atol=1e-6, rtol=0)
    for g, shared in zip(grads, shared_grads):
        torch.testing.assert_close(shared, g, atol=1e-5, rtol=1e-4)
    shapes = []  # the 3 prompts once, then each reply set without its last token
    hook = model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    shared_prompt_logprobs(model, p_ids, p_mask, sets)
    hook.remove()
    assert shapes == [(3, 5), (3, 2), (3, 4)]
    # it would overwrite the prompt
    with pytest.raises(ValueError, match="only a grow=True cache can branch"):
        KVCache(model.config, 3, 16).branch()


def test_generate_with_groups_prefills_each_prompt_once():
    model = tiny_model()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
    rows = [p for p in prompts for _ in range(3)]
    plain = generate(model, rows, 6, temperature=0)
    grouped = generate(model, rows, 6, temperature=0, group_size=3)
    assert torch.equal(grouped[0], plain[0]) and torch.equal(grouped[2], plain[2])
    torch.testing.assert_close(grouped[1], plain[1], atol=1e-5, rtol=0)
    # sampled: the rows of a group differ, and their log-probs are the model's (as
    # completion_logprobs)
    tokens, logps, mask = generate(
        model, rows, 6, temperature=1.0, generator=torch.Generator().manual_seed(0), group_size=3
    )
    assert len({tuple(t) for t in tokens[:3].tolist()}) > 1
    p_ids, p_mask = left_pad(rows, 0)
    torch.testing.assert_close(
        logps,
        completion_logprobs(model, p_ids, p_mask, tokens, mask, group_size=3),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="must share one prompt"):
        generate(model, rows[1:] + rows[:1], 6, group_size=3)
    # the prefill runs 3 prompts, not 9 rows, then one token per step for the 9 rows
    shapes = []
    hook = model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    generate(model, rows, 2, temperature=0, group_size=3)
    hook.remove()
    assert shapes == [(3, 6), (9, 1)]


def test_grouped_completion_logprobs_under_ddp(tmp_path):
    """Two forward calls (prompts, then replies) before one backward: DDP's gradient hooks fire once
    per parameter and the gradients are the plain model's (one process, gloo)."""
    model = tiny_model().train()
    batch = grouped_batch()
    completion_logprobs(model, *batch, group_size=3).sum().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    ddp_model = None
    try:
        ddp_model = DDP(tiny_model().train())
        for _ in range(2):  # a second step: the reducer was left ready for the next backward
            ddp_model.zero_grad()
            completion_logprobs(ddp_model, *batch, group_size=3).sum().backward()
        grads = [q.grad for q in ddp_model.module.parameters()]
    finally:
        # the DDP reducer holds the process group: freed after the group, its destructor can hang
        del ddp_model
        dist.destroy_process_group()
    for p, grad in zip(model.parameters(), grads):
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-5)


def test_heldout_accuracy_by_hand():
    model, tokenizer = tiny_model(vocab_size=261, max_position_embeddings=128), Tokenizer(merges=[])
    records = [{"prompt": "a", "answer": "x", "family": "add"},
               {"prompt": "bb", "answer": "y", "family": "add"},
               {"prompt": "c", "answer": "z", "family": "sub"}]
    replies = [generate(model, [tokenizer.encode_prompt(r["prompt"])], 6, temperature=0,
                        eos_id=tokenizer.im_end_id)[0]
               for r in records]
    texts = [tokenizer.decode([t for t in reply[0].tolist() if t != tokenizer.im_end_id])
             for reply in replies]
    records[1]["answer"] = " " + texts[1] + "\n"  # the second reply is right, up to whitespace
    result = heldout_accuracy(model.train(), tokenizer, records, max_new_tokens=6, batch_size=2)
    assert model.training  # restored
    closed = sum(tokenizer.im_end_id in reply[0].tolist() for reply in replies) / 3
    expected = {
        "accuracy": sum(final_answer(t) == r["answer"].strip() for t, r in zip(texts, records)) / 3,
        "think_rate": sum(map(thinks, texts)) / 3,
        "well_formed": closed,
        "accuracy/add": (final_answer(texts[0]) == "x") / 2 + 0.5,
        "accuracy/sub": float(final_answer(texts[2]) == "z"),
    }
    assert result.pop("replies") == texts
    assert result == pytest.approx(expected)
    assert format_accuracy({"accuracy": 0.5, "think_rate": 0.25, "well_formed": 1.0,
                            "accuracy/add": 0.25}) == \
        "accuracy 50.0% (add 25%) | think 25.0% | well-formed 100.0%"


def test_heldout_accuracy_on_fixed_replies(monkeypatch):
    tokenizer = Tokenizer(merges=[])
    think, end = tokenizer.think_id, tokenizer.special_tokens["</think>"]
    replies = [
        tokenizer.encode("12") + [tokenizer.im_end_id],  # closed and right
        tokenizer.encode(" 7 ") + [tokenizer.im_end_id],  # closed, wrong (7 is not 8)
        # right, but never closed: counts as right, not as well formed
        tokenizer.encode("12"),
        # thinks, right
        [think]
        + tokenizer.encode("6+6=12")
        + [end]
        + tokenizer.encode("12")
        + [tokenizer.im_end_id],
        # thinks, never closes the block: no answer
        [think] + tokenizer.encode("6+6=12 12") + [tokenizer.im_end_id],
        # a lookalike decodes the same: thinks, right
        tokenizer.encode("<think>1</think>8") + [tokenizer.im_end_id],
    ]
    n = max(map(len, replies))

    def fixed_generate(model, prompts, max_new_tokens, **kwargs):
        assert (kwargs["temperature"] == 0 and kwargs["eos_id"] == tokenizer.im_end_id
                and len(prompts) == 6)
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in replies])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in replies])
        return ids, torch.zeros(6, n), mask

    monkeypatch.setattr(engine, "generate", fixed_generate)
    records = [{"prompt": "a", "answer": "12", "family": "add"},
               {"prompt": "b", "answer": "8", "family": "add"},
               {"prompt": "c", "answer": " 12", "family": "sub"},
               {"prompt": "d", "answer": "12", "family": "sub"},
               {"prompt": "e", "answer": "12", "family": "sub"},
               {"prompt": "f", "answer": "8", "family": "add"}]
    result = heldout_accuracy(tiny_model(vocab_size=261), tokenizer, records, max_new_tokens=n)
    assert result.pop("replies")[3] == "<think>6+6=12</think>12"
    assert result == pytest.approx({"accuracy": 4 / 6, "think_rate": 3 / 6, "well_formed": 5 / 6,
                                    "accuracy/add": 2 / 3, "accuracy/sub": 2 / 3})


def test_heldout_accuracy_forced_think_scores_by_the_same_rule(monkeypatch):
    """force_think: each prompt ends with <think>, a reply is '<think>' + what follows, scored by
    the one answer rule within the same max_new_tokens."""
    tokenizer = Tokenizer(merges=[])
    end = tokenizer.special_tokens["</think>"]
    replies = [tokenizer.encode("6+6=12") + [end] + tokenizer.encode("12") + [tokenizer.im_end_id],
               tokenizer.encode("6+6=12 12") + [tokenizer.im_end_id],  # forced: never closes
               tokenizer.encode("12") + [tokenizer.im_end_id]]  # forced: never closes either
    n, seen = max(map(len, replies)), {}

    def fixed_generate(model, prompts, max_new_tokens, **kwargs):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens)
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in replies])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in replies])
        return ids, torch.zeros(3, n), mask

    monkeypatch.setattr(engine, "generate", fixed_generate)
    records = [{"prompt": prompt, "answer": "12"} for prompt in "abc"]
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    forced = heldout_accuracy(model, tokenizer, records, max_new_tokens=10, force_think=True)
    assert seen["prompts"] == [tokenizer.encode_prompt(r["prompt"]) + [tokenizer.think_id]
                               for r in records] and seen["max_new_tokens"] == 9
    assert forced["accuracy"] == pytest.approx(1 / 3) and forced["think_rate"] == 1.0
    assert forced["replies"][0] == "<think>6+6=12</think>12"
    plain = heldout_accuracy(model, tokenizer, records, max_new_tokens=10)
    assert seen["max_new_tokens"] == 10 and seen["prompts"][0][-1] != tokenizer.think_id
    # the same tokens unforced: only the bare "12" is right, and nothing thinks
    assert plain["accuracy"] == pytest.approx(1 / 3) and plain["think_rate"] == 0.0
    assert "forced think 33.3%" in format_accuracy({**plain, "forced_think_accuracy": 1 / 3})


def test_heldout_accuracy_forced_too_makes_again_only_the_replies_that_did_not_think(monkeypatch):
    """forced_too: a greedy reply whose first token is <think> is its own forced reply; only the
    others are made again, from prompt + <think>, and forced_think_accuracy is over every record."""
    tokenizer = Tokenizer(merges=[])
    think, end = tokenizer.think_id, tokenizer.special_tokens["</think>"]
    worked = {a: tokenizer.encode(f"6+6={a}") + [end] + tokenizer.encode(a) for a in ("12", "13")}
    greedy = [[think] + worked["12"], [think] + worked["13"],  # thought: right, wrong
              tokenizer.encode("13"), tokenizer.encode("11")]  # straight away: both wrong
    forced = [worked["12"], worked["13"]]  # records 2 and 3 made to think: right, wrong
    records = [{"prompt": prompt, "answer": "12"} for prompt in "abcd"]
    calls = []

    def fixed_generate(model, prompts, max_new_tokens, **kwargs):
        calls.append((prompts, max_new_tokens))
        rows = [r + [tokenizer.im_end_id] for r in (greedy if len(calls) == 1 else forced)]
        n = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in rows])
        return ids, torch.zeros(len(rows), n), mask

    monkeypatch.setattr(engine, "generate", fixed_generate)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    result = heldout_accuracy(model, tokenizer, records, max_new_tokens=20, forced_too=True)
    assert len(calls) == 2 and calls[1] == ([tokenizer.encode_prompt(r["prompt"]) + [think]
                                             for r in records[2:]], 19)
    assert result["accuracy"] == pytest.approx(1 / 4) and result["think_rate"] == 0.5
    assert result["forced_think_accuracy"] == pytest.approx(2 / 4)  # records 0 and 2
    calls.clear()
    greedy, records = greedy[:2], records[:2]  # every reply thought: nothing is made again
    result = heldout_accuracy(model, tokenizer, records, max_new_tokens=20, forced_too=True)
    assert len(calls) == 1 and result["forced_think_accuracy"] == result["accuracy"] == 0.5


def test_majority_answer_ties_and_replies_without_an_answer():
    assert engine.majority_answer(["<think>1+1=2</think>2", " 3", "3 "]) == "3"
    # a tie goes to the answer given first; a think block never closed casts no vote
    assert engine.majority_answer(["<think>5", "5", "<think>1</think> 6", "6", "5"]) == "5"
    assert engine.majority_answer(["6", "5", "5", "6", "<think>6"]) == "6"
    assert engine.majority_answer(["<think>7", "<think>8</think"]) is None
    assert engine.majority_answer([]) is None


def test_vote_accuracy_on_fixed_replies(monkeypatch):
    """n = 4 replies a problem; vote@k is the mean over the 4 // k disjoint sets of k."""
    tokenizer, seen = Tokenizer(merges=[]), {}
    replies = ["12", "<think>6+6</think>12", "7", "<think>6+6=12", "8", "9", "9", "8"]
    encoded = [tokenizer.encode(r, allowed_special="all") + [tokenizer.im_end_id] for r in replies]
    n = max(map(len, encoded))

    def fixed_generate(model, prompts, max_new_tokens, temperature, **kwargs):
        seen.update(temperature=temperature, group_size=kwargs["group_size"], rows=len(prompts))
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in encoded])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in encoded])
        return ids, torch.zeros(len(encoded), n), mask

    monkeypatch.setattr(engine, "generate", fixed_generate)
    records = [{"prompt": "a", "answer": "12"}, {"prompt": "b", "answer": " 8"}]
    result = engine.vote_accuracy(tiny_model(vocab_size=261), tokenizer, records, [1, 2, 4],
                                  temperature=0.7, max_new_tokens=n)
    # a: 12 12 7 none -> k=1 2/4, k=2 (12 12) right (7 none) wrong, k=4 12; b: 8 9 9 8 -> k=1
    # 2/4, k=2 (8 9) 8 by the tie (9 8) 9, k=4 a tie of 8 and 9, 8 given first
    assert result == pytest.approx({1: 0.5, 2: 0.5, 4: 1.0})
    assert seen == {"temperature": 0.7, "group_size": 4, "rows": 8}


def test_vote_of_one_greedy_reply_is_the_greedy_accuracy():
    model, tokenizer = tiny_model(vocab_size=261, max_position_embeddings=128), Tokenizer(merges=[])
    records = [{"prompt": p, "answer": "x"} for p in ["a", "bb", "c", "dd", "e"]]
    greedy = heldout_accuracy(model, tokenizer, records, max_new_tokens=6, batch_size=2)
    for record, reply in list(zip(records, greedy["replies"]))[::2]:
        record["answer"] = final_answer(reply) or "x"  # three replies right
    accuracy = heldout_accuracy(model, tokenizer, records, max_new_tokens=6, batch_size=2)
    assert accuracy["accuracy"] >= 0.4
    votes = engine.vote_accuracy(model.train(), tokenizer, records, [1, 3], temperature=0,
                                 max_new_tokens=6, batch_size=2)
    assert votes == {1: accuracy["accuracy"], 3: accuracy["accuracy"]} and model.training


def test_prompt_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="longer than the context"):
        generate(tiny_model(), [[1] * 60], 10)


def test_batches_cover_every_example_and_are_random():
    # 4 left over each epoch
    epochs = [[batch_indices(100, 8, 0, e * 12 + b) for b in range(12)] for e in range(8)]
    for batches in epochs:
        seen = [i for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 96  # an epoch sees each example at most once
    # the remainder too
    assert set(i for batches in epochs for batch in batches for i in batch) == set(range(100))
    # a fresh order per epoch and seed
    assert epochs[0] != epochs[1] and batch_indices(100, 8, 1, 0) != epochs[0][0]
    assert batch_indices(100, 8, 0, 30) == epochs[2][6]  # a function of (seed, step) only
    # not sorted by length: with 30 % long examples (thinking replies), batches mix them as
    # the data does
    long = set(range(0, 1000, 10)) | set(range(3, 1000, 10)) | set(range(7, 1000, 10))
    shares = [sum(i in long for i in batch_indices(1000, 32, 0, step)) / 32 for step in range(31)]
    assert min(shares) > 0.05 and max(shares) < 0.65 and abs(sum(shares) / len(shares) - 0.3) < 0.05


def test_micro_batches_by_length_hold_the_steps_rows():
    rows = [[0] * n for n in (5, 1, 9, 3, 3, 7, 2)]
    parts = by_length(rows, 3)
    assert [len(part) for part in parts] == [2, 2, 3]  # near-equal sizes, every row once
    assert [len(row) for part in parts for row in part] == [1, 2, 3, 3, 5, 7, 9]
    assert by_length(rows, 1) == [sorted(rows, key=len)]
    pairs = [{"prompt": [1] * p, "chosen": [2] * c} for p, c in ((4, 1), (1, 1), (2, 5))]
    assert by_length(pairs, 2, lambda p: len(p["prompt"]) + len(p["chosen"])) == [
        [pairs[1]], [pairs[0], pairs[2]]]


def test_preference_pairs_skip_and_count(tmp_path):
    tokenizer = Tokenizer(merges=[])
    records = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "kind": "wrong"},
               {"prompt": "2+2?", "chosen": "4", "rejected": " 4 "},               # identical
               {"prompt": "2+2?", "chosen": "4", "rejected": "  "},                # an empty side
               {"prompt": "2+2?", "chosen": "", "rejected": "5"},                  # an empty side
               # fills the context
               {"prompt": "x" * 200, "chosen": "4", "rejected": "5"},
               {"prompt": "2+2?", "chosen": "4", "rejected": "?", "margin": 2}]
    pairs, skipped = preference_pairs(tokenizer, records, context=64, path="p.jsonl")
    assert skipped == {"identical": 1, "empty side": 2, "longer than the context": 1}
    assert len(pairs) == 2 and pairs[1]["margin"] == 2.0 and pairs[0]["kind"] == "wrong"
    # a reply ends with <|im_end|>
    assert pairs[0]["chosen"] == tokenizer.encode("4") + [tokenizer.im_end_id]
    assert pairs[0]["prompt"] == tokenizer.encode_prompt("2+2?")
    with pytest.raises(ValueError, match=r"p.jsonl: no usable preference pairs \(1 identical, 2 "
                                         r"empty side, 1 longer"):
        preference_pairs(tokenizer, records[1:5], 64, "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'chosen' and 'rejected' must be strings"):
        preference_pairs(tokenizer, [records[0], {"prompt": "a", "chosen": 3, "rejected": "b"}], 64,
                         "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'margin' must be a number"):
        preference_pairs(tokenizer,
                         [{"prompt": "a", "chosen": "a", "rejected": "b", "margin": "1"}], 64,
                         "p.jsonl")


def test_dpo_logps_by_hand_and_invariant_to_padding():
    policy = tiny_model()
    pairs = [pair([5, 6, 7], [8, 9, 3], [10]),
             pair([1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16], [12])]
    alone_chosen, alone_rejected = pair_logps(policy, pairs[:1], pad_id=0, device="cpu")
    chosen, rejected = pair_logps(policy, pairs, pad_id=0, device="cpu")
    other_chosen, other_rejected = pair_logps(policy, pairs, pad_id=96, device="cpu")
    assert (torch.allclose(alone_chosen, chosen[:1], atol=1e-5)
            and torch.allclose(alone_rejected, rejected[:1], atol=1e-5))
    assert (torch.allclose(chosen, other_chosen, atol=1e-5)
            and torch.allclose(rejected, other_rejected, atol=1e-5))
    # by hand: sum over the reply tokens of log softmax(logits of the previous position)[token]
    logits, _ = policy(torch.tensor([[5, 6, 7, 8, 9, 3]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    assert chosen[0].item() == pytest.approx(
        sum(logp[t - 1, tok].item() for t, tok in ((3, 8), (4, 9), (5, 3))), abs=1e-4
    )


def test_reply_texts_cut_at_eos():
    """RL stages read replies through model.reply_texts: text before <|im_end|>, and whether it
    ended."""
    tokenizer = Tokenizer(merges=[])
    ids = tokenizer.encode("12") + [tokenizer.im_end_id, tokenizer.pad_id]
    completion_ids = torch.tensor([ids, tokenizer.encode("abcd")])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    texts, ended = reply_texts(tokenizer, completion_ids, completion_mask)
    assert texts == ["12", "abcd"] and ended.tolist() == [True, False]


def test_step_end_mask_marks_the_last_token_of_each_step():
    """engine detail 5: a step ends before a space, </think> or <|im_end|>: the last token of each
    of data.reply_steps' steps, tokenized one by one (TRL's way), padded or cut off alike."""
    tokenizer = Tokenizer(merges=[])
    replies = ["<think>305-148: 5-8-0=-3+10=7 0-4-1=-5+10=5 3-1-1=1</think>157", "157",
               "<think>385+048: 5+8+0=13 8+4"]  # the last one cut off: no <|im_end|>
    rows, expected = [], []
    for reply in replies:
        pieces = [tokenizer.encode(step, tokenizer.think_tokens)
                  for step in data.reply_steps(reply)]
        ends = [sum(map(len, pieces[: i + 1])) - 1 for i in range(len(pieces))]
        rows.append(sum(pieces, []) + ([] if reply.endswith("8+4") else [tokenizer.im_end_id]))
        assert rows[-1] == tokenizer.encode_reply(reply)[: len(rows[-1])]  # the same ids
        expected.append(ends)
    ids, mask = right_pad(rows, tokenizer.pad_id)
    step_mask = engine.step_end_mask(tokenizer, ids, mask)
    assert [row.nonzero().flatten().tolist() for row in step_mask] == expected
    assert [len(e) for e in expected] == [5, 1, 3]


def test_process_advantages_by_hand():
    """DeepSeekMath 4.1.3: each step's reward normalised over the group's steps, a token's
    advantage the sum of those of the steps ending at or after it."""
    # group 1: steps end at t = 1 (reward 1) and t = 3 (0) of reply 0, t = 2 (0) of reply 1;
    # mean 1/3, unbiased std sqrt(1/3): normalised 2/sqrt(3) and -1/sqrt(3) (twice)
    rewards = torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 9], [0.5, 0, 0, 0], [0, 0.5, 0, 0]])
    steps = torch.tensor([[0, 1.0, 0, 1], [0, 0, 1, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    advantages = engine.process_advantages(rewards, steps, group_size=2)
    high, low = 2 / math.sqrt(3), -1 / math.sqrt(3)
    assert torch.allclose(advantages[:2], torch.tensor(
        [[high + low, high + low, low, low], [low, low, low, 0.0]]), rtol=1e-3)
    # the first tokens' advantages (each reply's whole sum) add up to 0 over a group; equal
    # step rewards give no advantage at all
    assert abs(advantages[:2, 0].sum()) < 1e-6 and advantages[2:].abs().max() == 0


def test_step_minima_by_hand_and_the_critic_of_a_process_reward_model(tmp_path):
    """engine detail 5: at each step's last token, the least log-prob of its tokens and of the
    token after it; PPO's critic from a process reward model: its weights, a score head at 0."""
    logp = torch.tensor([[-0.1, -2.0, -0.3, -0.2, -4.0, -0.5, 0.0],
                         [-0.7, -0.1, -0.2, 0.0, 0.0, 0.0, 0.0]])  # 0 past a reply's end
    steps = torch.tensor([[0, 1.0, 0, 1, 0, 1, 0], [1.0, 0, 1, 0, 0, 0, 0]])
    minima = engine.step_minima(logp, steps)
    # row 0: steps 0-1 (+ token 2), 2-3 (+ token 4: the one after decides it), 4-5 (+ 6: none)
    assert torch.allclose(minima, torch.tensor([[0, -2.0, 0, -4.0, 0, -4.0, 0],
                                                [-0.7, 0, -0.2, 0, 0, 0, 0]]))
    model = tiny_model()
    path = tmp_path / "prm.pt"
    save_checkpoint(str(path), model, None, "prm", metrics={"step_offset": 4.0})
    critic = engine.load_value_model(str(path), "cpu")
    assert critic.config.head == "score" and critic.score.weight.abs().max() == 0
    assert torch.equal(critic.model.layers[0].mlp.up_proj.weight,
                       model.model.layers[0].mlp.up_proj.weight)


# ==================================================================================================
# 5. lora.py: adapters, and --lora-rank in the stages
# ==================================================================================================

ALL_TARGETS = ",".join(LORA_TARGETS)


def lora_on(model, rank=4, targets=ALL_TARGETS, seed=1):
    """model with adapters whose B is random (a trained adapter), not zero (a fresh one)."""
    add_lora(model, rank, alpha=8.0, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def test_lora_fresh_adapter_gives_exactly_the_base_logits_and_peft_names():
    base, model = tiny_model(), tiny_model()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, 4, targets=ALL_TARGETS)
    ids = torch.randint(0, TINY["vocab_size"], (3, 20))
    assert torch.equal(model(ids)[0], base(ids)[0])  # B = 0: the update is exactly zero
    names = set(model.state_dict())
    assert set(state_before) <= names  # the base keeps its Hugging Face names
    layers = ([f"self_attn.{x}_proj" for x in "qkvo"]
              + [f"mlp.{x}_proj" for x in ("gate", "up", "down")])
    assert names - set(state_before) == {
        f"model.layers.{i}.{layer}.lora_{x}.weight"
        for i in range(2)
        for layer in layers
        for x in "AB"
    }
    for layer in lora_layers(model):
        fan_in = layer.lora_A.weight.shape[1]
        # Kaiming-uniform, a = sqrt(5): bound 1/sqrt(in)
        assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(fan_in)
        assert layer.lora_A.weight.std() > 0.3 / math.sqrt(fan_in) and not layer.lora_B.weight.any()
        assert layer.scaling == 16.0 / 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    default = tiny_model()
    add_lora(default, 2)
    assert ({n.split(".")[-3] for n, p in default.named_parameters() if p.requires_grad}
            == {"q_proj", "k_proj", "v_proj", "o_proj"})


def test_lora_merged_equals_unmerged_and_the_checkpoint_holds_the_merged_weights(tmp_path):
    model, plain = lora_on(tiny_model()), tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (3, 20))
    with torch.no_grad():
        unmerged = model(ids)[0]
        assert (unmerged - plain(ids)[0]).abs().max() > 1e-3  # the adapter does something
        for layer in lora_layers(model):
            layer.merge()
        assert torch.allclose(model(ids)[0], unmerged, atol=1e-5)
        for layer in lora_layers(model):
            layer.unmerge()
        assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6)
                   for k, v in plain.state_dict().items())
        # the checkpoint: merged weights under "model" (a plain model loads them), the
        # adapter under "lora"
        save_checkpoint(str(tmp_path / "lora.pt"), model, None, "sft", parent="base.pt")
        loaded, _, checkpoint = load_checkpoint(str(tmp_path / "lora.pt"))
        assert set(checkpoint["model"]) == set(plain.state_dict()) and not lora_layers(loaded)
        assert torch.allclose(loaded(ids)[0], unmerged, atol=1e-5)
        lora = checkpoint["lora"]
        assert ((lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
                == (4, 8.0, 0.0, list(LORA_TARGETS)))
        assert set(lora["weights"]) == {k for k in model.state_dict() if ".lora_" in k}


def test_lora_only_the_adapter_gets_gradients_and_changes():
    model = lora_on(tiny_model())
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapter = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    optimizer = model.configure_optimizer(lr=1e-2, weight_decay=0.1)
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (4, 16))
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        assert all((p.grad is not None) == (".lora_" in n) for n, p in model.named_parameters())
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())            # the base is untouched
    assert all(not torch.equal(state[k], v) for k, v in adapter.items())     # every A and B moved
    # AdamW moments for the adapter only
    assert len(optimizer.state) == len(adapter)


def test_lora_disabled_reference_equals_a_frozen_copy_of_the_base():
    """DPO's, GRPO's and PPO's reference with --lora-rank: the policy with its adapter off."""
    policy, frozen = lora_on(tiny_model()).train(), tiny_model().eval()
    prompt_ids, prompt_mask, completion_ids, completion_mask = grouped_batch(group_size=1)
    with torch.no_grad():
        with lora_disabled(policy):
            assert not policy.training
            reference = completion_logprobs(policy, prompt_ids, prompt_mask, completion_ids,
                                            completion_mask)
        assert policy.training and all(layer.enabled for layer in lora_layers(policy))
        assert torch.equal(
            reference,
            completion_logprobs(frozen, prompt_ids, prompt_mask, completion_ids, completion_mask),
        )
        assert not torch.equal(
            reference,
            completion_logprobs(policy, prompt_ids, prompt_mask, completion_ids, completion_mask),
        )
        with lora_disabled(frozen), lora_disabled(None):  # no adapters: nothing changes
            assert not frozen.training


@pytest.mark.parametrize("overrides",
                         [dict(), dict(attention_bias=False, tie_word_embeddings=False)],
                         ids=["qwen2", "llama"])
def test_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path, hf_tok, overrides):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft",
                               reason="peft is not installed (pip install -r requirements-dev.txt)")
    base_path, _ = hf_checkpoint(tmp_path, hf_tok, stage="sft", name="base.pt", **overrides)
    model, tokenizer, _ = load_checkpoint(base_path)
    lora_on(model, targets="q_proj,v_proj,o_proj,up_proj,down_proj")
    save_checkpoint(str(tmp_path / "lora.pt"), model, tokenizer, "sft", parent=base_path)
    hf.export_hf(base_path, str(tmp_path / "hf_base"))
    hf.main(["export-adapter", str(tmp_path / "lora.pt"), str(tmp_path / "adapter")])
    assert (sorted(os.listdir(tmp_path / "adapter"))
            == ["adapter_config.json", "adapter_model.safetensors"])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base"))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    config = theirs.peft_config["default"]
    assert ((config.r, config.lora_alpha, set(config.target_modules))
            == (4, 8.0, {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}))
    ids = hf_tok.encode(HF_SAMPLE)[:60]
    with torch.no_grad():
        peft_logits = theirs(torch.tensor([ids])).logits[0]
        ours = hf_logits_of(model, ids)
    assert (peft_logits - ours).abs().max() < 1e-5
    assert (peft_logits - hf_logits_of(load_checkpoint(str(tmp_path / "lora.pt"))[0],
                                       ids)).abs().max() < 1e-4  # merged
    line = None
    try:
        hf.export_adapter(base_path, str(tmp_path / "none"))
    except ValueError as e:
        line = str(e)
    assert "holds no LoRA adapter" in line and not (tmp_path / "none").exists()


def test_lora_adapter_of_an_imported_model_fits_the_original_directory(tmp_path, hf_tok):
    """README's LoRA recipe: import a Hugging Face directory, train an adapter, load it with PEFT on
    the original."""
    peft = pytest.importorskip("peft",
                               reason="peft is not installed (pip install -r requirements-dev.txt)")
    directory, original = hf_save_model(
        tmp_path, hf_tok, "Qwen2ForCausalLM", tie_word_embeddings=True
    )
    hf.import_hf(directory, str(tmp_path / "imported.pt"))
    model, tokenizer, _ = load_checkpoint(str(tmp_path / "imported.pt"))
    lora_on(model)
    save_checkpoint(str(tmp_path / "lora.pt"), model, tokenizer, "sft",
                    parent=str(tmp_path / "imported.pt"))
    hf.export_adapter(str(tmp_path / "lora.pt"), str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
    ids = hf_tok.encode(HF_SAMPLE)[:60]
    with torch.no_grad():
        peft_logits = theirs(torch.tensor([ids])).logits[0]
    with torch.no_grad(), theirs.disable_adapter():
        base_logits = theirs(torch.tensor([ids])).logits[0]
    assert (peft_logits - hf_logits_of(model.eval(), ids)).abs().max() < 1e-5
    assert (peft_logits - base_logits).abs().max() > 1e-2  # and the adapter is not a no-op


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_lora_sft_lowers_the_loss_keeps_the_base_and_ddp_equals_single_process(world, tmp_path):
    # the loss on the worked task conversations alone: no text rows, no stories, no bare answers
    # (in a batch of 8, more or fewer of the long stories or of the answers a 30-step model cannot
    # compute moves the step loss more than 40 steps of learning the trace format do)
    tasks = [line for line in (world / "data" / "sft.jsonl").read_text().splitlines()
             if json.loads(line).get("thinks")]
    (tmp_path / "tasks.jsonl").write_text("\n".join(tasks) + "\n")
    args = [*TINY_SFT(world), "--data", str(tmp_path / "tasks.jsonl"), "--lora-rank", "4",
            "--lora-targets", ALL_TARGETS, "--lr", "1e-2", "--warmup", "2", "--ptx-share", "0"]
    out = run_ok("sft.py", *args, "--steps", "40", "--out", str(tmp_path / "lora.pt"))
    assert "sft | after:" in out
    loss = losses(tmp_path / "lora.jsonl")  # the last 5 steps' loss 10 % below the first 5's
    assert sum(loss[s] for s in range(36, 41)) < 0.9 * sum(loss[s] for s in range(1, 6))
    checkpoint = torch.load(tmp_path / "lora.pt", weights_only=True)
    init = torch.load(world / "out" / "pretrain.pt", weights_only=True)["model"]
    # merged: every later stage reads it as any checkpoint
    assert set(checkpoint["model"]) == set(init)
    adapted = {k.removesuffix(".lora_A.weight") for k in checkpoint["lora"]["weights"]
               if k.endswith("lora_A.weight")}
    scale = checkpoint["lora"]["alpha"] / checkpoint["lora"]["rank"]
    for name, tensor in init.items():
        layer = name.removesuffix(".weight")
        if layer in adapted:  # W + (alpha / r) B A
            a, b = (checkpoint["lora"]["weights"][f"{layer}.lora_{x}.weight"] for x in "AB")
            assert (torch.allclose(checkpoint["model"][name], tensor + scale * b @ a, atol=1e-6)
                    and b.abs().max() > 0)
        else:
            # embeddings, norms, biases: frozen
            assert torch.equal(checkpoint["model"][name], tensor), name
    short = [*args, "--steps", "3", "--save-every", "1000"]
    run_ok("sft.py", *short, "--out", str(tmp_path / "single.pt"))
    run_ddp("sft.py", *short, "--grad-accum", "2", "--out", str(tmp_path / "ddp.pt"))
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    assert all(abs(single[step] - ddp[step]) < 1e-5 for step in single), (single, ddp)


@pytest.mark.e2e
def test_lora_reward_dpo_grpo_ppo(world, tiny_sft, tiny_reward, tmp_path):
    """With --lora-rank the reference is the policy with its adapter off: after the first update the
    implicit rewards (DPO) and the KL (GRPO, PPO) are no longer 0, as they would stay if the
    reference were the policy. The reward model trains an adapter on its trunk and its new score
    head in full."""
    lora = ["--lora-rank", "4", "--lora-targets", ALL_TARGETS]
    run_ok("reward.py", *TINY_REWARD(world), *lora, "--steps", "3", "--lr", "1e-2", "--out",
           str(tmp_path / "reward.pt"))
    checkpoint, sft = (
        torch.load(tmp_path / "reward.pt", weights_only=True),
        torch.load(tiny_sft, weights_only=True)["model"],
    )
    start = reward_model_from(load_checkpoint(str(tiny_sft))[0], seed=0).state_dict()
    # the head: trained in full
    assert not torch.equal(checkpoint["model"]["score.weight"], start["score.weight"])
    assert checkpoint["lora"]["rank"] == 4 and all(
        torch.equal(checkpoint["model"][k], sft[k])
        for k in sft
        if "norm" in k or "embed" in k or k.endswith("bias")
    )  # frozen
    # the adapter trained
    assert all(b.abs().max() > 0 for k, b in checkpoint["lora"]["weights"].items() if "lora_B" in k)
    assert "score head" in run_error("hf.py", "export-adapter", str(tmp_path / "reward.pt"),
                                     str(tmp_path / "adapter"))
    out = run_ok("dpo.py", *TINY_DPO(world), *lora, "--steps", "3", "--lr", "1e-2", "--out",
                 str(tmp_path / "dpo.pt"))
    assert "reference the policy, adapter off" in out
    # the policy starts as the base
    assert logged(tmp_path / "dpo.jsonl")[1] == pytest.approx(math.log(2), abs=1e-6)
    assert (logged(tmp_path / "dpo.jsonl", "rewards/margin")[1] == 0
            != logged(tmp_path / "dpo.jsonl", "rewards/margin")[3])
    rl = [*TINY_RL(world, tiny_sft), *lora, "--reward-model", str(tiny_reward), "--lr", "1e-2"]
    out = run_ok("grpo.py", *rl, "--prompts-per-step", "4", "--group-size", "3", "--out",
                 str(tmp_path / "grpo.pt"))
    assert "reference the policy, adapter off" in out
    assert "reference the policy, adapter off" in run_ok("ppo.py", *rl, "--prompts-per-step", "8",
                                                         "--out", str(tmp_path / "ppo.pt"))
    for stage in ("dpo", "grpo", "ppo"):
        checkpoint = torch.load(tmp_path / f"{stage}.pt", weights_only=True)
        assert checkpoint["stage"] == stage and checkpoint["lora"]["rank"] == 4
    for stage in ("grpo", "ppo"):
        log = read_log(tmp_path / f"{stage}.jsonl")
        assert abs(log[0]["kl"]) < 1e-6 and abs(log[1]["kl"]) > 1e-6, (stage, log)


@pytest.mark.e2e
def test_grad_checkpoint_in_every_stage_trains_the_same_weights(world, tiny_sft, tiny_reward,
                                                                tmp_path):
    """--grad-checkpoint (model.py detail 12) in every training stage: two steps with it move the
    weights as two steps without do, to rounding (GRPO, DPO: through the shared-prompt cache)."""
    rl = [*TINY_RL(world, tiny_sft), "--reward-model", str(tiny_reward)]
    runs = {"pretrain": TINY_PRETRAIN(world), "sft": TINY_SFT(world),
            "reward": TINY_REWARD(world), "dpo": TINY_DPO(world),
            "grpo": [*rl, "--prompts-per-step", "4", "--group-size", "3"],
            "ppo": [*rl, "--prompts-per-step", "8"], "distill": TINY_DISTILL(world, tiny_sft)}
    for stage, args in runs.items():
        weights = []
        for flag in ([], ["--grad-checkpoint"]):
            out = tmp_path / f"{stage}{len(flag)}.pt"
            run_ok(f"{stage}.py", *args, "--steps", "2", *flag, "--out", str(out))
            weights.append(torch.load(out, weights_only=True)["model"])
        plain, checkpointed = weights
        assert all(torch.allclose(plain[k], v, atol=1e-5) for k, v in checkpointed.items()), stage


@pytest.mark.e2e
def test_lora_bad_flags_are_one_line_errors(world, tiny_sft, tmp_path):
    out = tmp_path / "x.pt"
    for flags, expected in ((["--lora-rank", "-1"], "--lora-rank -1"),
                            (["--lora-rank", "4", "--lora-targets", "q_proj,wq"],
                             "unknown layer 'wq'"),
                            (["--lora-rank", "4", "--lora-alpha", "0"],
                             "--lora-alpha 0.0 must be > 0"),
                            (["--lora-rank", "4", "--lora-dropout", "1"],
                             "--lora-dropout 1.0 in [0, 1)")):
        assert expected in run_error("sft.py", *TINY_SFT(world), *flags, "--out", str(out))
    assert "--lora-rank -2" in run_error("dpo.py", *TINY_DPO(world), "--lora-rank", "-2", "--out",
                                         str(out))
    assert "unknown layer 'lm_head'" in run_error("grpo.py", *TINY_RL(world, tiny_sft),
                                                  "--lora-rank", "2", "--lora-targets", "lm_head",
                                                  "--out", str(out))
    for stage in ("grpo.py", "ppo.py"):  # sampling and training must be one network
        assert "--lora-dropout 0.1: " in run_error(stage, *TINY_RL(world, tiny_sft), "--lora-rank",
                                                   "2", "--lora-dropout", "0.1", "--out", str(out))
    moe = tiny_model(num_experts=4, moe_intermediate_size=16)
    # routed experts are fused 3-D tensors, not linear layers
    for targets in ("gate_proj", "q_proj,gate_proj"):
        with pytest.raises(ValueError, match="no linear layer named 'gate_proj'"):
            add_lora(moe, 2, targets=targets)
    # refused whole: nothing changed
    assert not lora_layers(moe) and all(p.requires_grad for p in moe.parameters())
    line = run_error("hf.py", "export-adapter", str(tiny_sft), str(tmp_path / "adapter"))
    assert "holds no LoRA adapter" in line
    assert not out.exists() and not (tmp_path / "adapter").exists()


# ==================================================================================================
# 5b. fsdp.py: --fsdp, each stage sharded over 2 gloo ranks
# ==================================================================================================


def fsdp_args(world, tiny_sft, tiny_reward, stage):
    """(script, arguments, optimizer updates) of a stage's tiny run; one process and 2 ranks x 2
    micro-steps see the same global batch."""
    lora = ["--lora-rank", "4", "--lora-targets", ALL_TARGETS] if "lora" in stage else []
    rl = [*TINY_RL(world, tiny_sft), "--reward-model", str(tiny_reward), "--lr", "1e-3"]
    script = stage.split("-")[0]
    args = {"pretrain": [*TINY_PRETRAIN(world), "--save-every", "2", "--grad-accum", "2"],
            "sft": [*TINY_SFT(world), "--save-every", "2", "--grad-accum", "2"],
            "reward": [*TINY_REWARD(world), "--grad-accum", "2"],
            "dpo": [*TINY_DPO(world), "--grad-accum", "2"],
            "distill": [*TINY_DISTILL(world, tiny_sft), "--grad-accum", "2"],
            "grpo": [*rl, "--prompts-per-step", "4", "--group-size", "3"],  # 2 iterations
            "ppo": [*rl, "--prompts-per-step", "8"]}[script]  # 2 epochs x 2 minibatches
    args += ["--on-policy", "1"] if stage == "distill-on-policy" else []
    updates = {"grpo": 2 * 3, "ppo": 4 * 3}.get(script, 3)
    return script + ".py", [*lora, *args, "--steps", "3", "--warmup", "2"], updates


def assert_close_weights(a_path, b_path, lr, updates):
    """The same weights to float rounding: the ranks add gradients in another order (relative
    error ~1e-6) and an AdamW update moves a weight by at most ~lr in a direction that such
    rounding barely turns, so they may differ by a small part (1 %) of lr per update."""
    a, b = (torch.load(path, weights_only=True)["model"] for path in (a_path, b_path))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 0.01 * lr * updates, name


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft-lora", "reward", "dpo", "distill",
                                   "distill-on-policy", "grpo", "grpo-lora", "ppo"])
def test_fsdp_equals_unsharded(world, tiny_sft, tiny_reward, tmp_path, stage):
    """2 sharded ranks give the losses (to rounding) and the final weights of one process with the
    same global batch, in a plain checkpoint. Where the model samples (RL, on-policy distillation):
    of DDP, whose ranks sample with the same seeds, so the replies of the sharded model (gathered
    once per rollout) must be the same."""
    script, args, updates = fsdp_args(world, tiny_sft, tiny_reward, stage)
    lr = 1e-3 if script in ("grpo.py", "ppo.py") else 3e-3
    samples = script in ("grpo.py", "ppo.py") or stage == "distill-on-policy"
    if samples:
        run_ddp(script, *args, "--lr", str(lr), "--out", str(tmp_path / "unsharded.pt"))
    else:
        run_ok(script, *args, "--lr", str(lr), "--out", str(tmp_path / "unsharded.pt"))
    stdout = run_ddp(script, *args, "--lr", str(lr), "--fsdp", "--out", str(tmp_path / "fsdp.pt"))
    assert stdout.count(f"{script[:-3]} | step 3/3") == 1  # only rank 0 prints
    unsharded, fsdp = read_log(tmp_path / "unsharded.jsonl"), read_log(tmp_path / "fsdp.jsonl")
    assert [r["step"] for r in unsharded] == [r["step"] for r in fsdp]
    for a, b in zip(unsharded, fsdp):  # every metric (RL's reply lengths and rewards too), but
        assert a.keys() == b.keys(), (a, b)  # pretrain's validation, in batches of a micro-batch
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a if k not in ("tok_per_s", "val_loss",
                                                                   "val_bpb")), (a, b)
    checkpoint = load_checkpoint(str(tmp_path / "fsdp.pt"))[2]  # loads as any checkpoint
    assert checkpoint["step"] == 3 and "optimizer" not in checkpoint
    assert ("lora" in checkpoint) == ("lora" in stage)
    assert_close_weights(tmp_path / "unsharded.pt", tmp_path / "fsdp.pt", lr, updates)


@pytest.mark.e2e
def test_fsdp_resume_after_kill_reproduces_the_run(world, tmp_path):
    """kill -9 a sharded run mid-way, --resume it sharded: the losses and final weights of the
    uninterrupted run, exactly (the checkpoint's full Muon and AdamW state is cut back into the
    shards). Its resumable checkpoint is a plain one: its optimizer state loads unsharded."""
    args = [*TINY_PRETRAIN(world), "--steps", "40", "--save-every", "4", "--fsdp"]
    command = [os.path.join(ROOT, "pretrain.py"), *args]
    run_ddp(*command, "--out", str(tmp_path / "full.pt"))
    with socket.socket() as s:  # the two ranks started by hand (as torchrun does), to kill them
        s.bind(("127.0.0.1", 0))
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1]),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([PY, *command, "--out", str(tmp_path / "killed.pt")], cwd=ROOT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for rank in (0, 1)]
    log = tmp_path / "killed.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 9):
        time.sleep(0.005)
    for process in ranks:
        process.send_signal(signal.SIGKILL)
        process.wait()
    checkpoint = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert "optimizer" in checkpoint and 8 <= checkpoint["step"] < 40
    model = load_checkpoint(str(tmp_path / "killed.pt"))[0]
    optimizer = model.configure_optimizer(3e-3, 0.1, muon_lr=0.02)  # pretrain's default, Muon
    optimizer.load_state_dict(checkpoint["optimizer"])  # a one-process optimizer's state dict
    assert all(optimizer.state[p] for p in model.parameters())  # momenta of full shapes:
    assert all(v.shape == p.shape for p in model.parameters() for v in optimizer.state[p].values()
               if v.dim())
    run_ddp(*command, "--out", str(tmp_path / "killed.pt"), "--resume")
    full, resumed = losses(tmp_path / "full.jsonl"), losses(log)
    assert sorted(full) == sorted(resumed) == list(range(1, 41)) and full == resumed
    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True)["model"]
            for name in ("full", "killed"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_fsdp_without_torchrun_leaves_the_model_whole():
    """One process, no process group: --fsdp has nothing to split over (as DDP without torchrun)."""
    from fsdp import gathered, shard
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-3, 0.1)
    params = list(model.parameters())
    assert shard(model, optimizer) is model and gathered(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and not hasattr(model, "unshard")


# ==================================================================================================
# 6. pretrain.py
# ==================================================================================================


def test_lr_schedule_key_steps():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)  # first warmup step
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)  # end of warmup: the peak
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)  # cosine starts at the peak
    # half way: the mean of peak and floor
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)  # the floor, 10 % of the peak
    assert lr_at(500, 1.0, 10, 110) == pytest.approx(0.1)  # stays there
    assert ([sft_lr_at(s, 3e-4, 7, 50) for s in range(60)]
            == [lr_at(s, 3e-4, 7, 50) for s in range(60)])



def test_two_pretrainings_at_once_share_the_token_cache(tok, tmp_path, monkeypatch):
    """Two pretrainings of one corpus at once (say the default model's and the student's, started
    by hand): both processes tokenize it and write the cache (each waits for the other before its
    atomic rename); both end with the tokens and one cache file, no temporary left behind."""
    import multiprocessing
    path = tmp_path / "pretrain.txt"
    path.write_text("Tom has a red ball.\n\nWhat is 12 + 30? 42\n\nHello there.\n")
    context = multiprocessing.get_context("fork")
    both_written, rename = context.Barrier(2, timeout=30), os.replace

    def rename_when_both_wrote(source, target):
        both_written.wait()
        rename(source, target)
    monkeypatch.setattr(os, "replace", rename_when_both_wrote)
    runs = [context.Process(target=pretrain.load_tokens, args=(str(path), tok)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    monkeypatch.undo()
    assert [run.exitcode for run in runs] == [0, 0]
    [cache] = [name for name in os.listdir(tmp_path) if name != "pretrain.txt"]
    assert cache.endswith(".bin")
    tokens = tok.encode_array(read_documents(str(path)), tok.text_tokens)
    assert pretrain.load_tokens(str(path), tok).tolist() == list(tokens)

# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_pretrain_ddp_equals_single_process(world, tmp_path, optimizer):
    """2 ranks x 2 micro-steps with the same global batch give the losses of one process (to float
    rounding)."""
    args = [*TINY_PRETRAIN(world), "--steps", "4", "--save-every", "1000", "--optimizer", optimizer]
    run_ok(os.path.join(ROOT, "pretrain.py"), *args, "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", os.path.join(ROOT, "pretrain.py"), *args, "--grad-accum", "2",
                             "--out", str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])
    assert result.stdout.count("pretrain | step 4/4") == 1  # only rank 0 prints


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["pretrain", "pretrain-muon", "pretrain-phase2", "sft",
                                   "sft-lora"])
def test_resume_after_kill_reproduces_the_loss_curve(world, tmp_path, stage):
    """kill -9 mid-run, --resume, and the loss curve is the uninterrupted one, exactly (a LoRA run:
    its frozen base from --init, its adapter and the adapter's optimizer state from the checkpoint).
    """
    script = os.path.join(ROOT, f"{stage.split('-')[0]}.py")
    args = [*(TINY_PHASE2(world) if stage == "pretrain-phase2" else TINY_PRETRAIN(world)
              if stage.startswith("pretrain") else TINY_SFT(world)),
            "--steps", "120", "--save-every", "4",
            *(["--lora-rank", "4"] if stage == "sft-lora" else []),
            *(["--optimizer", "muon"] if stage == "pretrain-muon" else [])]
    run_ok(script, *args, "--out", str(tmp_path / "full.pt"))
    process = subprocess.Popen([PY, script, *args, "--out", str(tmp_path / "killed.pt")], cwd=ROOT,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 11):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(tmp_path / "killed.pt", weights_only=True)
    # killed mid-run, after a save
    assert "optimizer" in checkpoint and 8 <= checkpoint["step"] < 120
    line = run_error(script, *args, "--batch-size", "4", "--out", str(tmp_path / "killed.pt"),
                     "--resume")
    # not another run
    assert "ran with other settings (--batch-size 8 -> 4): resume with the same ones" in line
    run_ok(script, *args, "--out", str(tmp_path / "killed.pt"), "--resume")
    full, resumed = losses(tmp_path / "full.jsonl"), losses(log)
    assert sorted(full) == sorted(resumed) == list(range(1, 121))
    assert full == resumed  # exact: same batches, same weights, same optimizer state
    final = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert "optimizer" not in final and final["step"] == 120
    assert all(torch.equal(final["model"][k], v)
               for k, v in torch.load(tmp_path / "full.pt", weights_only=True)["model"].items())
    if stage == "pretrain-phase2":  # phase 1's weights went on; only its context and base changed
        phase1 = torch.load(world / "out" / "pretrain.pt", weights_only=True)
        assert {name for name, value in final["config"].items()
                if phase1["config"][name] != value} == {"max_position_embeddings", "rope_theta"}
        assert final["config"]["rope_theta"] == 1e5 and final["parent"].endswith("pretrain.pt")
        assert full[1] < losses(world / "out" / "pretrain.jsonl")[1] - 0.5


@pytest.mark.e2e
def test_pretrain_bad_input(world, tmp_path):
    out = tmp_path / "p.pt"
    line = run_error("pretrain.py", *TINY_PRETRAIN(world), "--tokenizer",
                     str(tmp_path / "none.json"), "--out", str(out))
    assert "tokenizer.py" in line
    (tmp_path / "empty.txt").write_text("\n\n\n")
    assert "empty" in run_error("pretrain.py", *TINY_PRETRAIN(world), "--data",
                                str(tmp_path / "empty.txt"), "--out", str(out))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    assert "bad.jsonl:2" in run_error("pretrain.py", *TINY_PRETRAIN(world), "--data",
                                      str(tmp_path / "bad.jsonl"), "--out", str(out))
    assert "--steps 0: at least 1" in run_error("pretrain.py", *TINY_PRETRAIN(world), "--steps",
                                                "0", "--out", str(out))
    # fp16 would have run in fp32, saying float16
    assert "--muon-lr 0.0: must be > 0" in run_error("pretrain.py", *TINY_PRETRAIN(world),
                                                     "--muon-lr", "0", "--out", str(out))
    for flag, value in (("--dtype", "float16"), ("--preset", "7b"), ("--optimizer", "sgd")):
        result = subprocess.run([PY, "pretrain.py", *TINY_PRETRAIN(world), flag, value, "--out",
                                 str(out)], cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert (result.returncode == 2
                and f"argument {flag}: invalid choice: '{value}'" in result.stderr)
    assert not out.exists()


# ==================================================================================================
# 7. sft.py
# ==================================================================================================


def test_sft_example_keeps_the_head_and_aligns_targets():
    tokenizer = Tokenizer(merges=[])
    messages = [{"role": "user", "content": "x" * 10}, {"role": "assistant", "content": "y" * 50}]
    ids, mask = tokenizer.encode_chat(messages)
    n = len(ids)
    # n tokens fill a context of n - 1 exactly
    for context, cut in ((n - 1, False), (n - 2, True), (40, True)):
        inputs, targets, truncated = sft_example(tokenizer, messages, context)
        assert truncated == cut and inputs == ids[:min(n, context + 1) - 1]
        assert (targets
                == [t if m else -100 for t, m in zip(ids[1:context + 1], mask[1:context + 1])])
    assert 0 < sum(t != -100 for t in targets) < 50  # context 40 cuts inside the assistant turn


def test_sft_reads_several_files_as_one(tmp_path):
    """--data a,b: a's conversations then b's, as each alone; an error names the file and line."""
    tokenizer = Tokenizer(merges=[])

    def turns(question, answer):
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]}
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(turns(f"{i}?", str(i))) + "\n"
                                              for i in range(3)))
    (tmp_path / "b.jsonl").write_text(json.dumps(turns("Hi.", "Hello!")) + "\n")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    both, truncated = sft_examples(tokenizer, f"{a},{b}", 40)
    assert truncated == 0 and len(both) == 4
    assert both == sft_examples(tokenizer, a, 40)[0] + sft_examples(tokenizer, b, 40)[0]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(ValueError, match=r"c\.jsonl:1: a conversation needs"):
        sft_examples(tokenizer, f"{a},{tmp_path / 'c.jsonl'}", 40)


def test_sft_ptx_mixture_rows():
    """--ptx-share s: round(s x batch) rows of a step are text windows (every token a target), the
    conversations are sft_example's rows unchanged, share 0 is the plain batch, ranks split it
    into as many micro-batches each (a rank short of windows gets one row without targets)."""
    tokenizer, context, batch, accum = Tokenizer(merges=[]), 24, 8, 2
    examples = [sft_example(tokenizer, [{"role": "user", "content": f"{i} + 1?"},
                                        {"role": "assistant", "content": str(i + 1)}], context)[:2]
                for i in range(40)]
    text = np.arange(500)  # a window starting at s is s, s + 1, ...
    for step in range(6):  # share 0: the step's conversations by length, cut in --grad-accum
        rows = sorted([examples[i] for i in batch_indices(40, batch, 0, step)],
                      key=lambda e: len(e[0]))
        assert micro_batches(examples, [], 0, context, batch, 0, step, grad_accum=accum) == [
            rows[:4], rows[4:]]
    for share in (0.1, 0.25, 0.5):
        n_text = round(share * batch)  # what sft.py's main passes
        micros = micro_batches(examples, text, n_text, context, batch, 3, 5, grad_accum=accum)
        chat, windows = sum(micros[:accum], []), sum(micros[accum:], [])
        assert len(chat) == batch - n_text and len(windows) == n_text and len(micros[2]) <= 4
        assert all(any(row is e for e in examples) for row in chat)  # the masks as without text
        for inputs, targets in windows:  # context tokens of the text, every next one a target
            assert inputs == list(range(inputs[0], inputs[0] + context))
            assert targets == [t + 1 for t in inputs] and targets[-1] < len(text)
        assert micros == micro_batches(examples, text, n_text, context, batch, 3, 5,
                                       grad_accum=accum)  # a function of (seed, step)
        assert micros != micro_batches(examples, text, n_text, context, batch, 3, 6,
                                       grad_accum=accum)
        ranks = [micro_batches(examples, text, n_text, context, batch, 3, 5, r, 2, 1)
                 for r in range(2)]  # two ranks take the one process's rows
        assert len(ranks[0]) == len(ranks[1])  # as many passes: --fsdp's collectives match
        blank = [row for micros in ranks for row in sum(micros[1:], [])  # text rows, loss 0
                 if set(row[1]) == {-100}]
        assert len(blank) == n_text % 2 and all(row == ([0], [-100]) for row in blank)
        assert (sorted(map(str, sum(sum(ranks, []), [])))
                == sorted(map(str, chat + windows + blank)))


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_assistant_only_loss_by_hand(world):
    model, tokenizer, _ = load_checkpoint(str(world / "out" / "pretrain.pt"))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]
    inputs, targets, truncated = sft_example(tokenizer, messages, context=200)
    assert not truncated
    ids, mask = tokenizer.encode_chat(messages)
    # the targets are exactly the assistant tokens: "5", <|im_end|>, "8", <|im_end|>
    kept = [t for t in targets if t != -100]
    assert (kept == [i for i, m in zip(ids, mask) if m]
            and tokenizer.decode(kept) == "5<|im_end|>8<|im_end|>")
    x, y = torch.tensor([inputs]), torch.tensor([targets])
    _, loss = model(x, y)
    logits, _ = model(x)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    by_hand = -sum(logp[t, y[0, t]] for t in range(len(targets)) if targets[t] != -100) / len(kept)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.e2e
def test_sft_ddp_equals_single_process(world, tmp_path):
    args = [*TINY_SFT(world), "--steps", "3", "--save-every", "1000"]
    run_ok(os.path.join(ROOT, "sft.py"), *args, "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", os.path.join(ROOT, "sft.py"), *args, "--grad-accum", "2", "--out",
                             str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])


@pytest.mark.e2e
def test_sft_bad_input(world, tmp_path):
    out = tmp_path / "s.pt"
    assert "pretrain.py" in run_error("sft.py", *TINY_SFT(world), "--init",
                                      str(tmp_path / "pretrain.pt"), "--out", str(out))
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                           '{"role": "assistant", "content": "yo"}]}\n{"messages": '
                                           '[\n')
    assert "broken.jsonl:2" in run_error("sft.py", *TINY_SFT(world), "--data",
                                         str(tmp_path / "broken.jsonl"), "--out", str(out))
    (tmp_path / "noassistant.jsonl").write_text('{"messages": [{"role": "user", "content": '
                                                '"hi"}]}\n')
    line = run_error("sft.py", *TINY_SFT(world), "--data", str(tmp_path / "noassistant.jsonl"),
                     "--out", str(out))
    assert "noassistant.jsonl:1" in line and "assistant" in line
    assert not out.exists() and not (tmp_path / "s.jsonl").exists()


@pytest.mark.e2e
def test_sft_ptx_mixture_end_to_end_ddp_and_bad_values(world, tmp_path):
    out = tmp_path / "s.pt"
    for share in ("1", "-0.1", "0.9"):  # 0.9 of 8 rows leaves 1 conversation for 4 micro-batches
        line = run_error("sft.py", *TINY_SFT(world), "--ptx-share", share, "--grad-accum", "4",
                         "--out", str(out))
        assert f"--ptx-share {float(share)}: not in [0, 1)" in line
    none = ["--ptx-data", str(tmp_path / "none.txt"), "--out", str(out)]
    assert "none.txt not found" in run_error("sft.py", *TINY_SFT(world), *none)
    assert not out.exists()
    run_ok("sft.py", *TINY_SFT(world), "--steps", "1", "--ptx-share", "0", *none)  # not read
    args = [*TINY_SFT(world), "--steps", "3", "--ptx-share", "0.25"]
    run_ok("sft.py", *args, "--out", str(tmp_path / "single.pt"))
    run_ddp("sft.py", *args, "--grad-accum", "2", "--out", str(tmp_path / "ddp.pt"))
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    assert all(abs(single[step] - ddp[step]) < 1e-5 for step in single), (single, ddp)
    assert torch.load(tmp_path / "single.pt", weights_only=True)["args"]["ptx_share"] == 0.25


# ==================================================================================================
# 8. reward.py: a reward model from preference pairs
# ==================================================================================================


def test_bradley_terry_loss_by_hand():
    equal = torch.tensor([0.3, -2.0, 5.0])
    assert torch.allclose(reward_loss(equal, equal), torch.full((3,), math.log(2)))  # σ(0) = 1/2
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0])
    # -log σ(1.5) = log(1 + e^-1.5), -log σ(-1) = log(1 + e^1)
    assert torch.allclose(reward_loss(chosen, rejected),
                          torch.tensor([math.log(1 + math.exp(-1.5)), math.log(1 + math.e)]))
    # margin 1: -log σ(2 - 0.5 - 1) = log(1 + e^-0.5); centering 0.1 adds 0.1 (2 + 0.5)^2 = 0.625
    margin = torch.tensor([1.0, 0.0])
    assert (reward_loss(chosen, rejected, margin)[0].item()
            == pytest.approx(math.log(1 + math.exp(-0.5))))
    assert (reward_loss(chosen, rejected, margin, center_coef=0.1)[0].item()
            == pytest.approx(math.log(1 + math.exp(-0.5)) + 0.625))


def test_bradley_terry_shift_invariance_and_centering():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(16), torch.randn(16)
    assert torch.allclose(reward_loss(chosen + 7.5, rejected + 7.5), reward_loss(chosen, rejected))
    # the centering term is what pins the offset: it grows when every reward moves away from 0
    assert (reward_loss(chosen + 7.5, rejected + 7.5, center_coef=0.01).mean()
            > reward_loss(chosen, rejected, center_coef=0.01).mean())


def test_pairwise_accuracy_by_hand_and_swap():
    chosen, rejected = torch.tensor([3.0, 1.0, 2.0, -1.0]), torch.tensor([1.0, 2.0, 0.0, -3.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(0.75)
    torch.manual_seed(0)
    chosen, rejected = torch.randn(101), torch.randn(101)
    p = pairwise_accuracy(chosen, rejected)
    assert 0 < p < 1 and pairwise_accuracy(rejected, chosen) == pytest.approx(1 - p)
    assert pairwise_accuracy(chosen, chosen) == 0.0  # a tie is not a correct ranking


def test_replay_adds_old_pairs_as_a_share_of_the_whole():
    new, old = list("abcdefghi"), list(range(10))
    mixed = with_replay(new, old, 0.1, seed=0)  # 9 new: 1 old is a tenth of 10
    assert mixed[:9] == new and len(mixed) == 10 and mixed[9] in old
    assert with_replay(new, old, 0.1, seed=0) == mixed  # drawn by the seed
    half = with_replay(new, old, 0.5, seed=1)
    assert half[:9] == new and len(set(half[9:])) == 9 and set(half[9:]) <= set(old)
    assert with_replay(new, old, 0.0, seed=0) == new
    assert sorted(with_replay(new, old, 0.9, seed=0)[9:]) == old  # 81 wanted: all 10 there are


def test_reward_model_copies_the_body_and_reads_the_last_real_token():
    lm = tiny_model()
    reward_model = reward_model_from(lm, seed=0).eval()
    assert reward_model.config.head == "score" and not hasattr(reward_model, "lm_head")
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    assert all(torch.equal(reward_model.state_dict()[k], v) for k, v in body.items())
    assert reward_model.score.weight.std().item() == pytest.approx(1 / math.sqrt(33), rel=0.3)
    # the reward of a pair does not depend on the other pairs of its batch (padding) nor on
    # the pad id
    pairs = [pair([5, 6, 7], [8, 9], [10]),
             pair([5, 6, 7, 1, 2, 3, 4], [8, 9, 11, 12, 13], [10, 1, 2, 3, 4, 5, 6])]
    alone = pair_rewards(reward_model, pairs[:1], 0, "cpu")
    batched = pair_rewards(reward_model, pairs, 0, "cpu")
    other_pad = pair_rewards(reward_model, pairs, 3, "cpu")
    for a, b, c in zip(alone, batched, other_pad):
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(b, c, atol=1e-5)
    # it is the score at the last real token of prompt + reply, by hand on the unpadded sequence
    values, _ = reward_model(torch.tensor([[5, 6, 7, 10]]))
    assert alone[1].item() == pytest.approx(values[0, -1].item(), abs=1e-5)


def trl_reward_loss(chosen_rewards, rejected_rewards, margin, center_coef):
    ("""TRL's RewardTrainer.compute_loss (loss, metrics) for a model whose scores are these """
     """rewards.""")
    from trl import RewardTrainer

    stand_in = trl_stand_in(args=types.SimpleNamespace(center_rewards_coefficient=center_coef))
    # (2B, 1), the batch is [chosen; rejected]
    logits = torch.cat([chosen_rewards, rejected_rewards])[:, None]
    inputs = {"attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stand_in,
                                      lambda **kwargs: types.SimpleNamespace(logits=logits), inputs)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_trl_reward_loss_parity(with_margin, center_coef):
    pytest.importorskip("trl", reason=TRL_MISSING)
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randn(9, generator=generator, dtype=torch.float64) for _ in range(2))
    margin = torch.rand(9, generator=generator, dtype=torch.float64) if with_margin else None
    leaves = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    trl_leaves = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_()]
    trl_loss, metrics = trl_reward_loss(*trl_leaves, margin, center_coef or None)
    # reward.py detail 6: the mean over the pairs
    loss = reward_loss(*leaves, margin, center_coef).mean()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    for ours, theirs in zip(
        torch.autograd.grad(loss, leaves), torch.autograd.grad(trl_loss, trl_leaves)
    ):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    # TRL's mean is float32
    assert metrics["accuracy"] == pytest.approx(pairwise_accuracy(chosen, rejected), rel=1e-6)
    assert metrics["margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-12)


def test_process_loss_reads_exactly_the_step_ends(tmp_path):
    """reward.py detail 9: the binary cross-entropy of the score at the last token of each step,
    nowhere else; on tokenized stepwise records, the scores of the unpadded prompt + reply."""
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.5, 0.1, -0.4, 9.0]], requires_grad=True)
    labels = torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    step_mask = torch.tensor([[0, 1.0, 0, 1.0], [1.0, 0, 1.0, 0]])
    losses = process_loss(scores, labels, step_mask)
    s = scores.detach()
    by_hand = [-F.logsigmoid(s[0, 1]) - F.logsigmoid(-s[0, 3]),
               -F.logsigmoid(-s[1, 0]) - F.logsigmoid(s[1, 2])]
    assert torch.allclose(losses, torch.stack(by_hand))
    # the gradient is sigma(s) - y at the step ends, 0 elsewhere
    [grad] = torch.autograd.grad(losses.sum(), scores)
    assert torch.allclose(grad, (torch.sigmoid(s) - labels) * step_mask) and (grad[step_mask == 0]
                                                                             == 0).all()
    # tokenized records: a step's logit is the least log-prob of its tokens and the one after it
    # (of the unpadded prompt + reply) + the offset, and the loss is the loss there, by hand
    tokenizer = Tokenizer(merges=[])
    records = [{"prompt": "What is 2 + 3?", "completions": ["<think>002+003:", " 2+3+0=5",
                " 0+0+0=0", " 0+0+0=0", "</think>5"], "labels": [True, True, True, True, True]},
               {"prompt": "What is 9 + 9?", "completions": ["17"], "labels": [False]}]
    examples, _ = engine.step_examples(tokenizer, records, 128, "x.jsonl")
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    logits, labels, step_mask = engine.step_scores(model, examples, tokenizer.pad_id, "cpu", 4.0)
    for row, (example, record) in enumerate(zip(examples, records)):
        P = len(example["prompt"])
        lm_logits, _ = model(torch.tensor([example["prompt"] + example["reply"]]))
        logp = torch.log_softmax(lm_logits[0, P - 1:-1], -1).gather(
            1, torch.tensor(example["reply"])[:, None])[:, 0]  # (N,) of each reply token
        starts = [0] + [end + 1 for end in example["ends"][:-1]]
        by_hand = torch.stack([logp[start: end + 2].min() + 4.0
                               for start, end in zip(starts, example["ends"])])
        assert torch.allclose(logits[row][step_mask[row] == 1], by_hand, atol=1e-5)
        assert labels[row][step_mask[row] == 1].tolist() == record["labels"]
        expected = F.binary_cross_entropy_with_logits(by_hand, labels[row][step_mask[row] == 1],
                                                      reduction="sum")
        assert process_loss(logits, labels, step_mask)[row].item() == pytest.approx(
            expected.item(), abs=1e-5)
    assert step_mask.sum(dim=1).tolist() == [5, 1] and (logits[step_mask == 0] == 0).all()
    # malformed stepwise records: a one-line error naming the record
    for bad in ({"labels": [True, False]}, {"completions": ["17", " 1"]}, {"labels": ["yes"]},
                {"completions": ["1", "7"], "labels": [True, True]}):
        with pytest.raises(ValueError, match=r"x\.jsonl:1: "):
            engine.step_examples(tokenizer, [{**records[1], **bad}], 128, "x.jsonl")


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_reward_end_to_end_and_ddp_equals_single_process(tiny_sft, tmp_path):
    world = tiny_sft.parent.parent
    args = [*TINY_REWARD(world), "--steps", "3"]  # one batch against 2 x 2 sorted by length
    out = run_ok("reward.py", *args, "--grad-accum", "1", "--out", str(tmp_path / "single.pt"))
    assert "longer than the context skipped" in out and "reward | after:  pairwise accuracy" in out
    # a standard checkpoint
    model, _, checkpoint = load_checkpoint(str(tmp_path / "single.pt"), head="score")
    assert (checkpoint["stage"] == "reward" and checkpoint["parent"] == str(tiny_sft)
            and checkpoint["step"] == 3)
    metrics = checkpoint["metrics"]
    assert metrics["reward_std"] > 0 and math.isfinite(metrics["reward_mean"])
    assert 0 <= metrics["before"]["accuracy"] <= 1 and "accuracy/cut_off" in metrics["after"]
    # 2 ranks x 2 micro-steps
    stdout = run_ddp("reward.py", *args, "--grad-accum", "2", "--out", str(tmp_path / "ddp.pt"))
    assert stdout.count("reward | step 3/3") == 1  # only rank 0 prints
    single, ddp = logged(tmp_path / "single.jsonl"), logged(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])


@pytest.mark.e2e
def test_reward_model_trained_further_with_replay(world, tiny_reward, tmp_path, capsys):
    """--init a reward model (detail 11): its own head goes on training (at lr 0, the same weights
    and the same held-out accuracy before as its own); --replay-data adds a share of old pairs."""
    _, tokenizer, checkpoint = load_checkpoint(str(tiny_reward))
    rows = [json.loads(line) for line in open(world / "data" / "prefs.jsonl")]
    context = checkpoint["config"]["max_position_embeddings"]
    rows = [r for r in rows if len(tokenizer.encode_prompt(r["prompt"])) + max(  # ones that fit
        len(tokenizer.encode_reply(r[side])) for side in ("chosen", "rejected")) <= context]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
    args = reward.Args(init=str(tiny_reward), data=str(tmp_path / "new.jsonl"),
                       eval_pairs=head(world / "data" / "prefs_eval.jsonl", 60), steps=1, lr=0.0,
                       batch_size=8, stats_pairs=16, device="cpu", out=str(tmp_path / "r1.pt"),
                       replay_data=str(world / "data" / "prefs.jsonl"), replay_share=0.25)
    reward.main(args)
    assert "reward | 24 pairs" in capsys.readouterr().out  # 18 new and 6 old
    before, after = (torch.load(p, weights_only=True) for p in (tiny_reward, tmp_path / "r1.pt"))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    reward.main(dataclasses.replace(args, init=str(tmp_path / "r1.pt"),
                                    out=str(tmp_path / "r2.pt")))
    again = torch.load(tmp_path / "r2.pt", weights_only=True)["metrics"]
    assert again["before"] == after["metrics"]["before"] == after["metrics"]["after"]
    with pytest.raises(ValueError, match="--replay-share 1"):
        reward.main(dataclasses.replace(args, replay_share=1.0))


@pytest.mark.e2e
def test_reward_process_end_to_end_ddp_and_bad_records(tiny_sft, tmp_path):
    """reward.py --process (details 9, 10): a checkpoint of stage "prm" whose reward is 2 P(step
    right) - 1 at each step's last token; the mean over the global batch's steps under DDP too."""
    world = tiny_sft.parent.parent
    steps = world / "data" / "steps.jsonl"
    args = [*TINY_REWARD(world), "--process", "--step-data", str(steps), "--eval-steps",
            head(world / "data" / "steps_eval.jsonl", 60), "--steps", "3"]
    out = run_ok("reward.py", *args, "--out", str(tmp_path / "prm.pt"))
    assert "after:  step accuracy" in out and "first wrong step" in out and "wrong_step" in out
    _, tokenizer, checkpoint = load_checkpoint(str(tmp_path / "prm.pt"), head="lm")
    assert checkpoint["stage"] == "prm" and checkpoint["step"] == 3
    assert checkpoint["metrics"]["step_offset"] == 4.0
    assert {"accuracy", "first_wrong", "pairs/accuracy/wrong_step"} <= checkpoint["metrics"][
        "after"].keys()
    reward = engine.load_reward(str(tmp_path / "prm.pt"), tokenizer, "cpu")
    prompt_ids, prompt_mask = left_pad([tokenizer.encode_prompt("What is 2 + 3?")] * 2, 0)
    ids, mask = right_pad([tokenizer.encode_reply("<think>002+003: 2+3+0=5</think>5"),
                           tokenizer.encode_reply("5")], tokenizer.pad_id)
    step_rewards = reward((prompt_ids, prompt_mask, ids, mask))
    ends = engine.step_end_mask(tokenizer, ids, mask)
    assert ends.sum(dim=1).tolist() == [3, 1] and (step_rewards[ends == 0] == 0).all()
    prm = load_checkpoint(str(tmp_path / "prm.pt"))[0].eval()
    logits = engine.process_logits(prm, prompt_ids, prompt_mask, ids, mask.float(), ends, 4.0)
    assert torch.allclose(step_rewards, (2 * torch.sigmoid(logits) - 1) * ends, atol=1e-6)
    with pytest.raises(ValueError, match="pass it as --process-reward"):
        engine.load_reward(str(tmp_path / "prm.pt"), tokenizer, "cpu", process=False)
    stdout = run_ddp("reward.py", *args, "--grad-accum", "2", "--out", str(tmp_path / "ddp.pt"))
    assert stdout.count("reward | step 3/3") == 1
    single, ddp = logged(tmp_path / "prm.jsonl"), logged(tmp_path / "ddp.jsonl")
    assert all(abs(single[step] - ddp[step]) < 1e-5 for step in (1, 2, 3)), (single, ddp)
    # a malformed record: one line naming file:line, nothing written
    bad = tmp_path / "steps.jsonl"
    bad.write_text(open(steps).readline() + '{"prompt": "1 + 1 =", "completions": ["2"], '
                   '"labels": [1]}\n')
    line = run_error("reward.py", *args, "--step-data", str(bad), "--out", str(tmp_path / "x.pt"))
    assert "steps.jsonl:2" in line and "booleans" in line and not (tmp_path / "x.pt").exists()


# ==================================================================================================
# 9. ppo.py
# ==================================================================================================


def test_gae_with_gamma_lambda_one_is_reward_to_go():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 9.0], [1.0, -1.0, 9.0, 9.0]])  # 9 = junk on padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[0.9, 0.8, 1.0, 0.0], [2.5, 2.0, 0.0, 0.0]])
    assert torch.allclose(returns, reward_to_go, atol=1e-6)
    assert torch.allclose(advantages, (reward_to_go - values) * mask, atol=1e-6)
    # lambda 0.95 by hand, rewards (0, 1), values (0.5, 0.2): delta = (0 + 0.2 - 0.5, 1 - 0.2)
    # = (-0.3, 0.8)
    advantages, returns = gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.95
    )
    assert advantages[0].tolist() == pytest.approx([-0.3 + 0.95 * 0.8, 0.8])
    assert returns[0].tolist() == pytest.approx([-0.3 + 0.95 * 0.8 + 0.5, 1.0])


def test_whitened_advantages_mean_zero_std_one_over_the_mask():
    torch.manual_seed(0)
    x = 3 + 5 * torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 3:] = mask[2, 1:] = 0
    x[mask == 0] = 1e3  # padding must not leak into the statistics
    white = masked_whiten(x, mask)
    kept = white[mask.bool()]
    assert kept.mean().abs() < 1e-5 and kept.std().item() == pytest.approx(1.0, abs=1e-5)
    assert white[mask == 0].abs().max() == 0


def test_value_loss_and_adaptive_kl_by_hand():
    one = torch.ones(1, 1)
    # V = 1, V_old = 0.5, R = 2: unclipped (1 - 2)^2 = 1, clipped V = 0.7: (0.7 - 2)^2 = 1.69;
    # 0.5 * max = 0.845
    assert ppo_value_loss(one * 1.0, one * 0.5, one * 2.0, one, 0.2).item() == pytest.approx(0.845)
    # V = 1, V_old = 0.5, R = 0: unclipped 1, clipped 0.49; 0.5 * max = 0.5
    assert ppo_value_loss(one * 1.0, one * 0.5, one * 0.0, one, 0.2).item() == pytest.approx(0.5)
    values = torch.tensor([[1.0, 5.0]])
    assert ppo_value_loss(values, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                          torch.tensor([[1.0, 0.0]]), 0.2) == 0
    assert adaptive_kl_coef(0.05, 1.0, 1.0, 10000, 64) == pytest.approx(0.05)
    assert (adaptive_kl_coef(0.05, 10.0, 1.0, 10000, 64)
            == pytest.approx(0.05 * (1 + 0.2 * 64 / 10000)))
    assert (adaptive_kl_coef(0.05, 0.0, 1.0, 10000, 64)
            == pytest.approx(0.05 * (1 - 0.2 * 64 / 10000)))


def test_ppo_padded_reply_score_on_last_real_token_unlike_trl():
    """ppo.py detail 3, by hand: the score sits on a reply's last real token and nothing past it is
    trained (TRL's former PPOTrainer put the score one token after the EOS and trained a value
    there). TRL no longer ships PPO."""
    junk = 9.0  # padding: whatever a model returns there must change nothing
    # a reply that ended (<|im_end|> at t = 1), one cut at 4 tokens
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    logp = torch.tensor([[-1.0, -0.5, junk, junk], [-0.3, -0.2, -0.1, -0.4]])
    ref_logp = torch.tensor([[-1.2, -0.5, junk, junk], [-0.3, -0.2, -0.1, -0.4]])
    values = torch.tensor([[0.4, 0.9, junk, junk], [0.1, 0.2, 0.3, 0.4]])
    scores = torch.tensor([1.5, -0.5])

    def losses(pad):
        """rewards, advantages, returns, d policy loss / d logp, d value loss / d values, with `pad`
        more padding columns."""
        widen = lambda x, value: torch.cat([x, torch.full((2, pad), value)], dim=1)  # noqa: E731
        m, lp, vals = (
            widen(mask, 0.0),
            widen(logp, junk).requires_grad_(),
            widen(values, junk).requires_grad_(),
        )
        rewards = ppo_rewards(lp.detach(), widen(ref_logp, junk), scores, m, kl_coef=0.1)
        advantages, returns = gae(rewards, vals.detach(), m, gamma=1.0, lam=0.95)
        policy_loss, _ = ppo_policy_loss(lp, lp.detach(), masked_whiten(advantages, m), m, clip=0.2)
        value_loss = ppo_value_loss(vals, vals.detach(), returns, m, vf_clip=0.2)
        return (
            rewards,
            advantages,
            returns,
            torch.autograd.grad(policy_loss, lp)[0],
            torch.autograd.grad(value_loss, vals)[0],
        )

    rewards, advantages, returns, logp_grad, value_grad = losses(pad=0)
    # KL reward -0.1 (-1.0 + 1.2) = -0.02 at t = 0; each score once, on the last real token,
    # nothing past it
    assert rewards.tolist() == [pytest.approx(r) for r in ([-0.02, 1.5, 0, 0], [0, 0, 0, -0.5])]
    # GAE, gamma 1, lambda 0.95: deltas (-0.02 + 0.9 - 0.4, 1.5 - 0.9) = (0.48, 0.6) and (0.1,
    # 0.1, 0.1, -0.9)
    expected = [[0.48 + 0.95 * 0.6, 0.6, 0, 0], [-0.4863875, -0.61725, -0.755, -0.9]]
    assert advantages.tolist() == [pytest.approx(a) for a in expected]
    # the value target of the last real token is its score: no bootstrap from a position past it
    assert returns.tolist() == [
        pytest.approx(r) for r in ([1.45, 1.5, 0, 0], [-0.3863875, -0.41725, -0.455, -0.5])
    ]
    # nothing past the last real token is trained: no gradient reaches the padding
    assert (torch.equal(logp_grad[mask == 0], torch.zeros(2))
            and torch.equal(value_grad[mask == 0], torch.zeros(2)))
    # on the 6 real tokens, at ratio 1: d/dlogp = -A_white / 6; d/dV = (V - R) / 6 = -A / 6
    assert torch.allclose(logp_grad, -masked_whiten(advantages, mask) / 6, atol=1e-7)
    assert torch.allclose(value_grad, -advantages / 6, atol=1e-7)
    # and more padding changes nothing
    for ours, wider in zip((rewards, advantages, returns, logp_grad, value_grad), losses(pad=3)):
        assert (torch.allclose(wider[:, :4], ours, atol=1e-7)
                and torch.equal(wider[:, 4:], torch.zeros(2, 3)))


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_kl_reward_is_zero_when_policy_equals_reference_and_score_lands_once(tiny_sft):
    policy, tokenizer, _ = load_checkpoint(str(tiny_sft))
    reference, _, _ = load_checkpoint(str(tiny_sft))
    prompts = [tokenizer.encode_prompt(p)
               for p in ("What is 2 + 3?", "Sort these digits: 5 2 9", "hi")]
    completion_ids, _, completion_mask = generate(policy, prompts, 8, temperature=1.0,
                                                  eos_id=tokenizer.im_end_id,
                                                  pad_id=tokenizer.pad_id,
                                                  generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id)
    rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp, ref_logp = completion_logprobs(policy, *rollout), completion_logprobs(reference, *rollout)
    scores = torch.tensor([0.7, -1.3, 2.0])
    rewards = ppo_rewards(logp, ref_logp, scores, completion_mask, kl_coef=0.05)
    last = completion_mask.sum(dim=1).long() - 1
    expected = torch.zeros_like(rewards)
    expected[torch.arange(3), last] = scores
    # no KL reward at all, and the score once, at the last real token
    assert torch.equal(rewards, expected)

    # by hand, with a KL term and replies of length 1, 3 and 4 (the full width)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    logp, ref_logp = -torch.rand(3, 4) * mask, -torch.rand(3, 4) * mask
    rewards = ppo_rewards(logp, ref_logp, scores, mask, kl_coef=0.1)
    kl_part = -0.1 * (logp - ref_logp) * mask
    assert torch.allclose(rewards - kl_part,
                          torch.tensor([[0.7, 0, 0, 0], [0, 0, -1.3, 0], [0, 0, 0, 2.0]]),
                          atol=1e-6)
    assert torch.equal(rewards[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_ppo_process_rewards_land_at_the_step_ends_with_the_kl():
    """ppo.py detail 3 with a process reward model: r_t = -kl_coef (logp - ref) + its step reward
    at each step's last token; the outcome score (here the EOS penalty) at the last real token."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(merges=[])
    replies = [tokenizer.encode_reply("<think>002+003: 2+3+0=5</think>5"),
               tokenizer.encode("<think>002+003: 2+3")]  # never ended
    ids, mask = right_pad(replies, tokenizer.pad_id)
    mask = mask.float()
    steps = engine.step_end_mask(tokenizer, ids, mask)
    step_rewards = torch.log(torch.rand(ids.shape)) * steps  # what load_reward's PRM gives
    logp, ref_logp = -torch.rand(ids.shape) * mask, -torch.rand(ids.shape) * mask
    eos_penalty = torch.tensor([0.0, -1.0])
    rewards = ppo_rewards(logp, ref_logp, eos_penalty, mask, 0.1, step_rewards)
    expected = -0.1 * (logp - ref_logp) * mask + step_rewards
    expected[1, len(replies[1]) - 1] -= 1.0
    assert torch.allclose(rewards, expected) and steps.sum(dim=1).tolist() == [3, 2]
    assert torch.allclose(rewards, ppo_rewards(logp, ref_logp, eos_penalty, mask, 0.1)
                          + step_rewards)


@pytest.mark.e2e
def test_ppo_end_to_end_and_under_torchrun(world, tiny_sft, tiny_reward, tmp_path):
    args = [*TINY_RL(world, tiny_sft), "--reward-model", str(tiny_reward), "--prompts-per-step",
            "8", "--ppo-epochs", "3", "--minibatches", "2"]
    out = run_ok("ppo.py", *args, "--adaptive-kl", "--out", str(tmp_path / "ppo.pt"))
    assert "ppo | step 2/2" in out and "score" in out.splitlines()[-1]
    checkpoint = torch.load(tmp_path / "ppo.pt", weights_only=True)
    assert checkpoint["stage"] == "ppo" and "score" in checkpoint["metrics"]["after"]
    log = read_log(tmp_path / "ppo.jsonl")
    assert all({"score", "kl", "clip", "approx_kl", "value_loss", "explained_var", "entropy",
                "length"} <= r.keys() for r in log)
    # KL 0 < target: it falls from the default (0.4)
    assert log[0]["kl"] == 0 and log[0]["updates"] == 3 * 2 and log[0]["kl_coef"] < 0.4
    # 2 ranks with a KL limit nothing passes: the first update of a step sees the rollout
    # policy itself (approx KL 0), the second does not, so every rank stops after 2 of the 6
    # updates (a rank that went on alone would wait forever for the other in DDP's gradient
    # all-reduce)
    out = run_ddp("ppo.py", *args, "--target-kl", "1e-12", "--out", str(tmp_path / "ddp.pt"))
    assert out.count("ppo | step 2/2") == 1
    assert [r["updates"] for r in read_log(tmp_path / "ddp.jsonl")] == [2, 2]


# ==================================================================================================
# 10. grpo.py
# ==================================================================================================


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # two groups of 4
    advantages = grpo_advantages(rewards, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: mean 0.25, std sqrt((3 *
    # 0.0625 + 0.5625) / 3) = 0.5
    s1, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.25 / s2, -0.25 / s2, -0.25 / s2,
                0.75 / s2]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert advantages.view(2, 4).sum(dim=1).abs().max() < 1e-6  # zero mean per group
    batch = grpo_advantages(rewards, 4, scale="batch")
    centred = [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    assert (batch.tolist()
            == pytest.approx([c / (rewards.std().item() + 1e-4) for c in centred], rel=1e-6))
    assert grpo_advantages(rewards, 4, scale="none").tolist() == pytest.approx(centred)
    # equal rewards: no advantage at all
    assert grpo_advantages(torch.full((4,), 0.7), 4).abs().max() == 0
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 4, scale="bogus")


def test_grpo_equal_rewards_give_zero_policy_gradient():
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # group 1 all equal, group 2 not
    advantages = grpo_advantages(rewards, 3)
    old_logp = -torch.rand(6, 5)
    logp = (old_logp + 0.1 * torch.randn(6, 5)).requires_grad_()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        token_loss, _ = grpo_token_loss(logp, old_logp, advantages, 0.2, 0.2)
        logp.grad = None
        aggregate_loss(token_loss, torch.ones(6, 5), loss_type, 5).backward()
        assert logp.grad[:3].abs().max() == 0  # the all-equal group teaches nothing
        assert logp.grad[3:].abs().min() > 0


def test_grpo_token_loss_takes_per_token_advantages():
    """grpo.py detail 11: process supervision's advantages (B, N), one per token; a reply's one
    advantage (B,) is the same as it repeated at every token."""
    torch.manual_seed(0)
    old_logp = -torch.rand(4, 5)
    logp, ref_logp = old_logp + 0.3 * torch.randn(4, 5), old_logp + 0.1 * torch.randn(4, 5)
    per_reply = torch.randn(4)
    loss, clipped = grpo_token_loss(logp, old_logp, per_reply, 0.2, 0.28, ref_logp, 0.04)
    repeated = grpo_token_loss(logp, old_logp, per_reply[:, None].expand(4, 5), 0.2, 0.28,
                               ref_logp, 0.04)
    assert torch.equal(loss, repeated[0]) and torch.equal(clipped, repeated[1])
    per_token = torch.randn(4, 5)
    ratio = torch.exp(logp - old_logp)
    by_hand = -torch.min(ratio * per_token, ratio.clamp(0.8, 1.28) * per_token)
    assert torch.allclose(grpo_token_loss(logp, old_logp, per_token, 0.2, 0.28)[0], by_hand)


def test_k3_kl():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    assert k3_kl(logp, logp).abs().max() == 0
    ref_logp = torch.log(torch.tensor([0.25, 0.4, 0.1]))
    # r = ref / pi; k3 = r - log r - 1
    expected = [r - math.log(r) - 1 for r in (0.5, 2.0, 0.1 / 0.9)]
    assert k3_kl(logp, ref_logp).tolist() == pytest.approx(expected, rel=1e-5)
    assert (k3_kl(logp, ref_logp) > 0).all()
    # 0.19315
    assert k3_kl(logp, ref_logp)[0].item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-5)


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clip_removes_the_gradient_exactly_where_it_should(eps_low, eps_high):
    ratios = torch.tensor([0.5, 0.79, 0.9, 1.0, 1.1, 1.19, 1.25, 1.5])
    for sign in (1.0, -1.0):
        old_logp = torch.full((1, 8), -1.0)
        logp = (old_logp + ratios.log()).requires_grad_()
        advantages = torch.tensor([sign])
        token_loss, clipped = grpo_token_loss(logp, old_logp, advantages, eps_low, eps_high)
        token_loss.sum().backward()
        # d(-ratio A)/dlogp = -ratio A where the surrogate is not clipped, 0 where it is
        should_clip = (ratios > 1 + eps_high) if sign > 0 else (ratios < 1 - eps_low)
        expected = torch.where(should_clip, torch.zeros(8), -ratios * sign)
        assert torch.allclose(logp.grad[0], expected, atol=1e-6), (sign, logp.grad)
        assert clipped[0].tolist() == should_clip.tolist()
        if eps_low == eps_high:  # ppo.py's loss is the same surrogate, with a token mean
            logp.grad = None
            loss, clipped_ppo = ppo_policy_loss(
                logp, old_logp, torch.full((1, 8), sign), torch.ones(1, 8), eps_low
            )
            loss.backward()
            assert (torch.allclose(logp.grad[0], expected / 8, atol=1e-6)
                    and torch.equal(clipped_ppo, clipped))


def test_loss_aggregations_by_hand_and_padding():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99 = after EOS / padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # 3.0
    assert aggregate_loss(token_loss, mask, "grpo", 4).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(token_loss, mask, "dapo", 4).item() == pytest.approx(10 / 4)  # 2.5
    # 1.25
    assert aggregate_loss(token_loss, mask, "dr_grpo", 4).item() == pytest.approx(10 / (2 * 4))
    # extra padding columns (a batch whose longest reply is longer) change nothing, dr_grpo included
    padded_loss = torch.cat([token_loss, torch.full((2, 3), 7.0)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3)], dim=1)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        assert (aggregate_loss(padded_loss, padded_mask, loss_type, 4)
                == aggregate_loss(token_loss, mask, loss_type, 4))
    # with equal lengths grpo and dapo agree; they differ only when lengths differ
    full = torch.ones(2, 3)
    assert (aggregate_loss(token_loss, full, "grpo", 4)
            == pytest.approx(aggregate_loss(token_loss, full, "dapo", 4).item()))


def test_post_eos_and_padding_tokens_contribute_nothing():
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    old_logp, ref_logp = -torch.rand(2, 4), -torch.rand(2, 4)
    logp = (old_logp + 0.3 * torch.randn(2, 4)).requires_grad_()
    advantages = torch.tensor([1.0, -1.0])
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        logp.grad = None
        token_loss, _ = grpo_token_loss(logp, old_logp, advantages, 0.2, 0.2, ref_logp, beta=0.04)
        loss = aggregate_loss(token_loss, mask, loss_type, 4)
        loss.backward()
        assert logp.grad[1, 2:].abs().max() == 0 and logp.grad[1, :2].abs().min() > 0
        changed = logp.detach().clone()
        changed[1, 2:] = -50.0  # whatever sits after EOS
        token_loss, _ = grpo_token_loss(
            changed, old_logp, advantages, 0.2, 0.2, ref_logp, beta=0.04
        )
        assert (aggregate_loss(token_loss, mask, loss_type, 4).item()
                == pytest.approx(loss.item(), rel=1e-6))
    assert k3_kl(logp, ref_logp).min() >= 0


def trl_grpo_advantages(rewards, group_size, scale):
    """The advantages TRL's GRPOTrainer._generate_and_score_completions computes from these rewards
    (one reward function), with generation and reward calls stubbed out."""
    from trl import GRPOTrainer

    n = len(rewards)
    stand_in = trl_stand_in(
        environment_factories=None,
        tools=None,
        environments=None,
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        _generate=lambda prompts: (
            [[1]] * n,
            [[2, 3]] * n,
            None,
            ["reply"] * n,
            None,
            {},
            None,
            None,
        ),
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        log_multimodal=False,
        args=types.SimpleNamespace(
            per_device_train_batch_size=n,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        _calculate_rewards=lambda *args: rewards[:, None],
        num_generations=group_size,
        scale_rewards=scale,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1, dtype=rewards.dtype),
        reward_func_names=["answer"],
        _pending_extra_logs={},
        _pending_metrics={},
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": defaultdict(list)},
    )
    return GRPOTrainer._generate_and_score_completions(stand_in,
                                                       [{"prompt": "p"}] * n)["advantages"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_grpo_advantages_parity(scale):
    pytest.importorskip("trl", reason=TRL_MISSING)
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rewards[4:8] = 1.0   # a group whose rewards are all equal: advantage 0
    rewards[8:12] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ours, theirs = grpo_advantages(rewards, 4, scale), trl_grpo_advantages(rewards, 4, scale)
    assert (torch.equal(ours[4:8], torch.zeros(4, dtype=torch.float64))
            and torch.equal(theirs[4:8], ours[4:8]))
    # TRL's nanstd computes Bessel's factor count / (count - 1) in float32: equal to ~1e-8,
    # not 1e-15
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def trl_grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask, loss_type, beta, eps_low,
                  eps_high, max_new_tokens):
    """TRL's GRPOTrainer._compute_loss (loss, metrics) with the policy's per-token log-probs (B, N)
    given."""
    from trl import GRPOTrainer

    stand_in = trl_stand_in(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            logp,
            torch.zeros_like(logp),
            None,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        max_completion_length=max_new_tokens,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=1
        ),
    )
    rows, width = logp.shape
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long),
              "completion_mask": completion_mask, "advantages": advantages,
              "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
              "num_items_in_batch": completion_mask.sum()}
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(
    "ours,theirs", [("grpo", "grpo"), ("dapo", "bnpo"), ("dapo", "dapo"), ("dr_grpo", "dr_grpo")]
)
def test_trl_grpo_loss_clip_fraction_and_kl_parity(ours, theirs, beta):
    """Our dapo (sum over all tokens / their count) is TRL's bnpo, and on one process TRL's dapo
    too."""
    pytest.importorskip("trl", reason=TRL_MISSING)
    generator = torch.Generator().manual_seed(0)
    rows, width, max_new_tokens = 8, 7, 10
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    # (B, N)
    completion_mask = (torch.arange(width) < lengths[:, None]).long()
    old_logp = -2 * torch.rand(rows, width, generator=generator, dtype=torch.float64)
    # ratios off 1: clipping acts
    logp = old_logp + 0.3 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    ref_logp = old_logp + 0.2 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    ours_leaf, trl_leaf = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    trl_loss, metrics = trl_grpo_loss(
        trl_leaf,
        old_logp,
        ref_logp,
        advantages,
        completion_mask,
        theirs,
        beta,
        0.2,
        0.28,
        max_new_tokens,
    )
    token_loss, clipped = grpo_token_loss(
        ours_leaf, old_logp, advantages, 0.2, 0.28, ref_logp, beta
    )
    loss = aggregate_loss(token_loss, completion_mask, ours, max_new_tokens)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, ours_leaf)[0],
                          torch.autograd.grad(trl_loss, trl_leaf)[0], rtol=1e-10, atol=1e-14)
    # as grpo.py logs it
    clip_fraction = ((clipped * completion_mask).sum() / completion_mask.sum()).item()
    assert (0 < clip_fraction
            and metrics["clip_ratio/region_mean"] == pytest.approx(clip_fraction, rel=1e-12))
    if beta > 0:
        kl = ((k3_kl(logp, ref_logp) * completion_mask).sum() / completion_mask.sum()).item()
        assert metrics["kl"] == pytest.approx(kl, rel=1e-12)


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_grpo_end_to_end_and_under_torchrun(world, tiny_sft, tiny_reward, tmp_path):
    args = [*TINY_RL(world, tiny_sft), "--prompts-per-step", "4", "--group-size", "3"]
    out = run_ok("grpo.py", *args, "--reward-model", str(tiny_reward), "--out",
                 str(tmp_path / "grpo.pt"))
    assert ("grpo | step 2/2" in out and "grpo | before: accuracy" in out
            and "grpo | after:  accuracy" in out)
    checkpoint = torch.load(tmp_path / "grpo.pt", weights_only=True)
    assert checkpoint["stage"] == "grpo" and {"before", "after"} <= checkpoint["metrics"].keys()
    log = read_log(tmp_path / "grpo.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    assert all({"reward", "accuracy", "kl", "clip", "entropy", "length", "equal"} <= r.keys()
               for r in log)
    # the policy starts at the reference; a learned reward varies
    assert log[0]["kl"] == 0 and log[0]["equal"] < 1
    out = run_ddp("grpo.py", *args, "--beta", "0", "--loss-type", "dapo", "--out",
                  str(tmp_path / "ddp.pt"))
    assert (out.count("grpo | step 2/2") == 1
            and torch.load(tmp_path / "ddp.pt", weights_only=True)["stage"] == "grpo")


@pytest.mark.e2e
def test_grpo_and_ppo_with_a_process_reward_model(world, tiny_sft, tiny_reward, tiny_prm,
                                                  tmp_path):
    """grpo.py --process-reward (detail 11) needs no answer key; ppo.py takes a process reward
    model as its --reward-model (detail 3); each flag refuses the other kind of reward model."""
    no_answers = tmp_path / "prompts.jsonl"
    no_answers.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                  for r in data_read(world / "data", "prompts.jsonl")[:40]))
    args = [*TINY_RL(world, tiny_sft), "--data", str(no_answers), "--prompts-per-step", "4",
            "--group-size", "3", "--max-new-tokens", "12"]
    out = run_ok("grpo.py", *args, "--process-reward", str(tiny_prm), "--out",
                 str(tmp_path / "grpo.pt"))
    assert "grpo | step 2/2" in out
    assert all("process" in r for r in read_log(tmp_path / "grpo.jsonl"))
    line = run_error("grpo.py", *args, "--process-reward", str(tiny_prm), "--process-outcome",
                     "--out", str(tmp_path / "x.pt"))
    assert "prompts.jsonl:1" in line and "answer" in line  # the outcome on top needs the answers
    line = run_error("grpo.py", *args, "--process-reward", str(tiny_reward), "--out",
                     str(tmp_path / "x.pt"))
    assert "an outcome reward model" in line and "--reward-model" in line
    line = run_error("grpo.py", *args, "--reward-model", str(tiny_prm), "--out",
                     str(tmp_path / "x.pt"))
    assert "a process reward model" in line and "--process-reward" in line
    out = run_ok("ppo.py", *args[:-4], "--reward-model", str(tiny_prm), "--prompts-per-step", "4",
                 "--out", str(tmp_path / "ppo.pt"))
    assert "ppo | step 2/2" in out and "score" in out.splitlines()[-1]
    # a reply's score: the sum of its steps' 2 P - 1, at most one step per token of 12
    assert all(abs(r["score"]) <= 12 for r in read_log(tmp_path / "ppo.jsonl"))


@pytest.mark.e2e
def test_rl_bad_input(world, tiny_sft, tiny_reward, tmp_path, capsys):
    out = tmp_path / "x.pt"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n'
    )
    line = run_error("grpo.py", *TINY_RL(world, tiny_sft), "--data", str(prompts), "--out",
                     str(out))
    assert "prompts.jsonl:2" in line and "answer" in line  # the verifiable reward needs it
    # the same checks in-process (no interpreter start-up): one-line errors, raised before any
    # training
    common = dict(init=str(tiny_sft), eval_data=TINY_RL(world, tiny_sft)[5], steps=1,
                  max_new_tokens=6, device="cpu", out=str(out))
    with pytest.raises(ValueError, match="group-size 1"):
        grpo.main(grpo.Args(**common, group_size=1))
    # the log-probs would divide by it: NaN
    with pytest.raises(ValueError, match="--temperature 0"):
        grpo.main(grpo.Args(**common, temperature=0.0))
    if not torch.cuda.is_available():  # a one-line error, not a traceback from deep inside torch
        with pytest.raises(ValueError, match="no CUDA device here"):
            grpo.main(grpo.Args(**{**common, "device": "cuda"}))
    with pytest.raises(ValueError, match="--temperature 0"):
        ppo.main(ppo.Args(**common, data=str(world / "data" / "prompts.jsonl"),
                          reward_model=str(tiny_reward), temperature=0.0))
    with pytest.raises(FileNotFoundError, match="reward.py"):
        ppo.main(ppo.Args(**common, data=str(world / "data" / "prompts.jsonl"),
                          reward_model=str(tmp_path / "reward.pt")))
    with pytest.raises(ValueError, match="'lm' head"):
        ppo.main(ppo.Args(**common, data=str(world / "data" / "prompts.jsonl"),
                          reward_model=str(tiny_sft)))
    assert not out.exists()
    # a prompt that fills the context (64 tokens) is skipped and counted; one without an
    # answer is fine with a learned reward
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    rows += [{"prompt": "x " * 80, "answer": "1"}, {"prompt": "What is 9 + 9?"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo.main(grpo.Args(**common, data=str(prompts), prompts_per_step=4, group_size=2,
                        reward_model=str(tiny_reward)))
    assert "(1 too long for the context)" in capsys.readouterr().out and out.exists()
    # a reply whose think block never closes has no final answer: it never matches a missing answer
    tokenizer = load_checkpoint(str(tiny_sft))[1]
    unclosed = tokenizer.encode("<think>1 + 1", allowed_special="all") + [tokenizer.im_end_id]
    correct, _, accuracy, _ = judge_replies(
        tokenizer, torch.tensor([unclosed] * 2), torch.ones(2, len(unclosed)), [None, "2"]
    )
    assert correct.tolist() == [0.0, 0.0] and accuracy == 0.0


@pytest.mark.e2e
def test_rl_save_samples_for_the_labeler(world, tiny_sft, tiny_reward, tmp_path):
    """--save-samples: after training, 4 replies of the trained policy to each of --sample-prompts
    prompts of --data (drawn by --seed), each with its record; `data.py label` makes them pairs."""
    prompts = world / "data" / "prompts.jsonl"
    common = dict(init=str(tiny_sft), data=str(prompts), eval_data=TINY_RL(world, tiny_sft)[5],
                  steps=1, max_new_tokens=6, device="cpu", sample_prompts=5)
    grpo.main(grpo.Args(**common, prompts_per_step=2, group_size=2, out=str(tmp_path / "grpo.pt"),
                        save_samples=str(tmp_path / "grpo_samples.jsonl")))
    ppo.main(ppo.Args(**common, prompts_per_step=4, reward_model=str(tiny_reward),
                      out=str(tmp_path / "ppo.pt"),
                      save_samples=str(tmp_path / "ppo_samples.jsonl")))
    records = read_log(prompts)
    for name in ("grpo", "ppo"):
        samples = read_log(tmp_path / f"{name}_samples.jsonl")
        assert len(samples) == 5 and len({s["prompt"] for s in samples}) == 5
        assert all({k: v for k, v in s.items() if k != "replies"} in records for s in samples)
        assert all(len(s["replies"]) == 4 and all(isinstance(r, str) for r in s["replies"])
                   for s in samples)
    out = run_ok("data.py", "label", "--samples", str(tmp_path / "ppo_samples.jsonl"), "--out",
                 str(tmp_path / "pairs.jsonl"))
    assert "label | 5 prompts, 20 replies" in out and read_log(tmp_path / "pairs.jsonl")


# ==================================================================================================
# 11. dpo.py
# ==================================================================================================


def test_dpo_loss_is_log2_when_policy_is_the_reference():
    logp_chosen, logp_rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-7.0, -1.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logp_chosen, logp_rejected, logp_chosen, logp_rejected
    )
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen_rewards - rejected_rewards, torch.zeros(2))  # margin 0
    assert (chosen_rewards > rejected_rewards).float().mean() == 0  # accuracy 0
    # ipo: (0 - 1/(2·0.1))²
    for loss_type, at_zero in zip(LOSS_TYPES, (math.log(2), math.log(2), 1.0, 25.0)):
        losses, _, _ = dpo_loss(
            logp_chosen, logp_rejected, logp_chosen, logp_rejected, 0.1, loss_type, 0.1
        )
        assert torch.allclose(losses, torch.full((2,), at_zero)), loss_type


def test_dpo_loss_types_by_hand():
    # h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)) = (-1 + 2) - (-3 + 2) = 2
    numbers = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    def softplus(x):  # -log σ(x) = softplus(-x)
        return math.log(1 + math.exp(x))

    expected = {("sigmoid", 0.5, 0.0): softplus(-1.0),
                ("sigmoid", 0.5, 0.2): 0.8 * softplus(-1.0) + 0.2 * softplus(1.0),
                ("robust", 0.5, 0.2): (0.8 * softplus(-1.0) - 0.2 * softplus(1.0)) / 0.6,
                ("hinge", 0.25, 0.0): 0.5,          # max(0, 1 - 0.25 · 2)
                ("hinge", 0.5, 0.0): 0.0,           # max(0, 1 - 0.5 · 2)
                ("ipo", 0.5, 0.0): 1.0,             # (2 - 1/(2 · 0.5))²
                ("ipo", 0.1, 0.0): 9.0}             # (2 - 5)²
    for (loss_type, beta, eps), value in expected.items():
        losses, chosen_rewards, rejected_rewards = dpo_loss(*numbers, beta, loss_type, eps)
        assert losses.item() == pytest.approx(value, rel=1e-6), (loss_type, beta, eps)
        assert (chosen_rewards.item() == pytest.approx(beta)
                and rejected_rewards.item() == pytest.approx(-beta))
    with pytest.raises(ValueError, match="loss-type"):
        dpo_loss(*numbers, 0.1, "kto")


def test_robust_with_eps_zero_equals_sigmoid():
    torch.manual_seed(0)
    numbers = [torch.randn(32) * 5 for _ in range(4)]
    sigmoid, _, _ = dpo_loss(*numbers, 0.3, "sigmoid", 0.0)
    robust, _, _ = dpo_loss(*numbers, 0.3, "robust", 0.0)
    assert torch.allclose(sigmoid, robust)
    assert not torch.allclose(dpo_loss(*numbers, 0.3, "robust", 0.1)[0], sigmoid)


def test_dpo_gradient_is_zero_on_prompt_and_padding_positions():
    """The loss sees only the log-probs of reply tokens: the prompts run once and only their last
    position (which predicts a reply's first token) gets logits; d loss / d logits is 0 at every
    reply position that predicts a pad, and not 0 where it predicts a reply token."""
    pairs = [pair([5, 6, 7], [8, 9], [10]), pair([1, 2, 3, 4, 5], [11], [12, 13, 14])]
    V = 17
    # the prompt pass: the last position only
    prompt_logits = torch.randn(2, 1, V, requires_grad=True)
    # chosen replies (2 tokens at most), minus the last
    chosen_logits = torch.randn(2, 1, V, requires_grad=True)
    # rejected replies (3 tokens at most), minus the last
    rejected_logits = torch.randn(2, 2, V, requires_grad=True)

    class FakeModel:  # the logits of a model, as leaves
        config = ModelConfig(**TINY)

        def __call__(self, ids, attention_mask=None, kv_cache=None, logits_to_keep=0):
            if kv_cache.length == 0:
                kv_cache.length = ids.shape[1]
                assert logits_to_keep == 1
                return prompt_logits, None
            return (chosen_logits if ids.shape[1] == 1 else rejected_logits), None

    logp_chosen, logp_rejected = pair_logps(FakeModel(), pairs, pad_id=0, device="cpu")
    losses, _, _ = dpo_loss(logp_chosen, logp_rejected, torch.zeros(2), torch.zeros(2))
    losses.sum().backward()
    # both prompts predict their replies' first tokens
    assert (prompt_logits.grad.abs().sum(-1) > 0).all()
    # lengths 2, 1
    assert torch.equal(chosen_logits.grad.abs().sum(-1) > 0, torch.tensor([[True], [False]]))
    assert torch.equal(rejected_logits.grad.abs().sum(-1) > 0,
                       torch.tensor([[False, False], [True, True]]))  # 1, 3


def trl_dpo_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, loss_type, beta,
                 label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss (mean loss, metrics) on the rows [chosen; rejected]:
    per_token_logps (2B, T - 1), 0 off the completion, as the model's fused head returns them;
    completion_mask (2B, T); precomputed ref sums (B,)."""
    from trl import DPOTrainer

    stand_in = trl_stand_in(ld_alpha=None, precompute_ref_logps=True,
                            f_divergence_type="reverse_kl", loss_types=[loss_type],
                            loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                            use_weighting=False)
    zeros = torch.zeros_like(per_token_logps)
    outputs = types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                                    is_top1=zeros.bool())
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, False)
    return loss, {
        k: v[0] for k, v in stand_in._metrics["train"].items() if k.startswith("rewards/")
    }


def random_dpo_batch(pairs=6, width=9, seed=0):
    """Per-token log-probs (2B, width - 1) of chosen then rejected replies of 1..width-3 tokens
    after a 2-token prompt, their completion mask (2B, width) and reference sums (2B,), float64."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width - 2, (2 * pairs,), generator=generator)
    # (2B, width)
    completion_mask = (torch.arange(width) >= 2) & (torch.arange(width) < 2 + lengths[:, None])
    per_token = -3 * torch.rand(2 * pairs, width - 1, generator=generator,
                                dtype=torch.float64) * completion_mask[:, 1:]
    ref = -3 * torch.rand(2 * pairs, generator=generator, dtype=torch.float64) * lengths
    return per_token, completion_mask.long(), ref, lengths


@pytest.mark.parametrize("loss_type,label_smoothing",
                         [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0)])
def test_trl_dpo_loss_parity(loss_type, label_smoothing):
    pytest.importorskip("trl", reason=TRL_MISSING)
    per_token, completion_mask, ref, _ = random_dpo_batch()
    pairs = len(ref) // 2
    ours_leaf, trl_leaf = per_token.clone().requires_grad_(), per_token.clone().requires_grad_()
    trl_loss, metrics = trl_dpo_loss(
        trl_leaf, completion_mask, ref[:pairs], ref[pairs:], loss_type, 0.3, label_smoothing
    )
    logps = ours_leaf.sum(dim=1)  # dpo.py detail 2: the summed log-probs of each reply
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], 0.3, loss_type, label_smoothing
    )
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-12)
    # per-pair: d loss / d log-prob of every reply token
    assert torch.allclose(torch.autograd.grad(losses.mean(), ours_leaf)[0],
                          torch.autograd.grad(trl_loss, trl_leaf)[0], rtol=1e-10, atol=1e-14)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-12)
    assert (metrics["rewards/margins"]
            == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-12))
    assert (metrics["rewards/accuracies"]
            == (chosen_rewards > rejected_rewards).double().mean().item())


def test_trl_dpo_sigmoid_label_smoothing_differs_by_design():
    """dpo.py detail 4: e > 0 smooths our sigmoid loss (cDPO, as TRL up to 0.28); TRL 1.x's sigmoid
    ignores it."""
    pytest.importorskip("trl", reason=TRL_MISSING)
    per_token, completion_mask, ref, _ = random_dpo_batch(seed=1)
    pairs, logps = len(ref) // 2, per_token.sum(dim=1)
    trl_loss, _ = trl_dpo_loss(
        per_token, completion_mask, ref[:pairs], ref[pairs:], "sigmoid", 0.3, 0.2
    )
    plain, _, _ = dpo_loss(
        logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], 0.3, "sigmoid", 0.0
    )
    smoothed, _, _ = dpo_loss(
        logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], 0.3, "sigmoid", 0.2
    )
    assert plain.mean().item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert smoothed.mean().item() != pytest.approx(trl_loss.item(), rel=1e-3)


def test_trl_dpo_ipo_length_normalized_parity_and_summed_form_by_hand():
    """dpo.py detail 4: with the replies' token counts (--ipo-length-normalized) our IPO is TRL's,
    whose log-ratios are per token; without them it is IPO on summed log-probs, so the same beta
    asks for another margin."""
    pytest.importorskip("trl", reason=TRL_MISSING)
    per_token, completion_mask, ref, lengths = random_dpo_batch(seed=2)
    pairs = len(ref) // 2
    ours_leaf, trl_leaf = per_token.clone().requires_grad_(), per_token.clone().requires_grad_()
    trl_loss, _ = trl_dpo_loss(trl_leaf, completion_mask, ref[:pairs], ref[pairs:], "ipo", 0.5)
    logps = ours_leaf.sum(dim=1)
    losses, _, _ = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], 0.5, "ipo",
                            chosen_tokens=lengths[:pairs], rejected_tokens=lengths[pairs:])
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(losses.mean(), ours_leaf)[0],
                          torch.autograd.grad(trl_loss, trl_leaf)[0], rtol=1e-10, atol=1e-14)
    summed, _, _ = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], 0.5, "ipo")
    assert summed.mean().item() != pytest.approx(trl_loss.item(), rel=1e-3)
    # by hand: log-ratios 2 (chosen, 4 tokens) and -2 (rejected, 2 tokens), beta 0.5, target
    # 1/(2 beta) = 1
    numbers = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), torch.tensor([-1.0])
    # h = 4
    assert dpo_loss(*numbers, 0.5, "ipo")[0].item() == pytest.approx((2 + 2 - 1) ** 2)
    per_token_loss = dpo_loss(*numbers, 0.5, "ipo", chosen_tokens=torch.tensor([4]),
                              rejected_tokens=torch.tensor([2]))[0]
    # h = 1.5
    assert per_token_loss.item() == pytest.approx((2 / 4 + 2 / 2 - 1) ** 2)


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_dpo_end_to_end_ddp_with_precomputed_reference_equals_single_process_with_reference_model(
    tiny_sft, tmp_path
):
    """One process holding a reference model and two ranks with precomputed reference log-probs give
    the same losses: the precomputation is exact and DDP splits the batch without changing it."""
    world = tiny_sft.parent.parent
    args = [*TINY_DPO(world), "--steps", "3"]
    out = run_ok("dpo.py", *args, "--out", str(tmp_path / "model.pt"))
    assert "dpo | after:  task accuracy" in out and "dpo | after:  preference accuracy" in out
    with_model = logged(tmp_path / "model.jsonl")
    # step 1: the policy is the reference
    assert with_model[1] == pytest.approx(math.log(2), abs=1e-5)
    assert logged(tmp_path / "model.jsonl", "rewards/accuracy")[1] == 0.0
    assert logged(tmp_path / "model.jsonl", "rewards/margin")[1] == pytest.approx(0.0, abs=1e-6)
    stdout = run_ddp("dpo.py", *args, "--precompute-ref", "--grad-accum", "2", "--out",
                     str(tmp_path / "ddp.pt"))
    assert stdout.count("dpo | step 3/3") == 1 and "reference precomputed" in stdout
    ddp = logged(tmp_path / "ddp.jsonl")
    assert sorted(ddp) == sorted(with_model) == [1, 2, 3]
    for step in with_model:
        assert abs(with_model[step] - ddp[step]) < 1e-5, (step, with_model[step], ddp[step])
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert (checkpoint["stage"] == "dpo" and checkpoint["step"] == 3
            and set(checkpoint["metrics"]["after"]) == {"pairs", "task"})
    assert checkpoint["metrics"]["before"]["pairs"]["implicit_accuracy"] == 0.0


@pytest.mark.e2e
def test_reward_and_dpo_bad_input(tiny_sft, tmp_path):
    """Unusable pairs are skipped and counted; nothing usable left is one error line and no file.
    (Malformed lines, file:line, are checked on preference_pairs above.)"""
    world = tiny_sft.parent.parent
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "a"}\n{"prompt": "hi", "chosen": '
                   '"a", "rejected": ""}\n'
                   '{"prompt": "' + "long " * 100 + '", "chosen": "a", "rejected": "b"}\n')
    for script, args in (("reward.py", TINY_REWARD(world)), ("dpo.py", TINY_DPO(world))):
        line = run_error(script, *args, "--data", str(bad), "--out", str(tmp_path / "x.pt"))
        assert (
            "no usable preference pairs (1 identical, 1 empty side, 1 longer than the context)"
            in line
        )
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.jsonl").exists()
    assert "--beta must be > 0" in run_error("dpo.py", *TINY_DPO(world), "--beta", "0", "--out",
                                             str(tmp_path / "x.pt"))


# ==================================================================================================
# 12. distill.py
# ==================================================================================================


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_distill_student_data_are_the_teachers_replies(monkeypatch):
    """Sequence-level KD: the student's conversations are the prompts with the teacher's own
    replies; with keep_correct (rejection sampling) only those whose final answer is right."""
    tokenizer = Tokenizer(merges=[])
    think, end = tokenizer.think_id, tokenizer.special_tokens["</think>"]
    replies = {
        "What is 1 + 2?": [think]
        + tokenizer.encode("1+2=3")
        + [end]
        + tokenizer.encode("3")
        + [tokenizer.im_end_id],
        "What is 5 - 1?": tokenizer.encode("5") + [tokenizer.im_end_id],  # wrong
        # cut off in its think block
        "What is 2 + 2?": [think] + tokenizer.encode("2+2=4"),
        # right, cut off after the answer
        "What is 3 + 3?": tokenizer.encode("6"),
    }
    calls = []

    def fixed_generate(model, prompts, max_new_tokens, **kwargs):
        assert kwargs["temperature"] == 0 and not model.training  # greedy, in eval mode
        texts = [tokenizer.decode(p) for p in prompts]
        rows = [next(r for q, r in replies.items() if q in text) for text in texts]
        calls.append(len(rows))
        n = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in rows])
        return ids, torch.zeros_like(mask), mask

    # the teacher answers through model.heldout_accuracy
    monkeypatch.setattr(engine, "generate", fixed_generate)
    records = [{"prompt": "What is 1 + 2?", "answer": "3"},
               {"prompt": "What is 5 - 1?", "answer": "4"},
               {"prompt": "What is 2 + 2?", "answer": "4"},
               {"prompt": [{"role": "user", "content": "What is 3 + 3?"}], "answer": "6"}]
    teacher = tiny_model(vocab_size=261).eval()
    kept, right = distill.teacher_replies(
        teacher, tokenizer, records, 16, keep_correct=True, batch_size=3
    )
    assert right == 2 and calls == [3, 1]
    assert kept == [
        {
            "messages": [
                {"role": "user", "content": "What is 1 + 2?"},
                {"role": "assistant", "content": "<think>1+2=3</think>3"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What is 3 + 3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
    ]
    kept, right = distill.teacher_replies(teacher, tokenizer, records, 16, keep_correct=False)
    assert (right == 2
            and [k["messages"][-1]["content"] for k in kept]
            == ["<think>1+2=3</think>3", "5", "<think>2+2=4", "6"])
    # a prompt without an answer has nothing to check: its reply is kept, not right
    replies["Hello!"] = tokenizer.encode("Hi! Ask me a question.") + [tokenizer.im_end_id]
    chat, right = distill.teacher_replies(teacher, tokenizer, [{"prompt": "Hello!"}, records[1]],
                                          16, keep_correct=True)
    assert right == 0 and [k["messages"] for k in chat] == [
        [{"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "Hi! Ask me a question."}]]
    # what the student is taught from a kept conversation: the teacher's reply tokens (think
    # tokens special) and the end
    inputs, targets, prompt, _ = distill.distill_example(tokenizer, kept[0], 64)
    taught = [t for t in targets if t != -100]
    assert (taught == [think] + tokenizer.encode("1+2=3") + [end] + tokenizer.encode("3")
            + [tokenizer.im_end_id])
    assert prompt == tokenizer.encode_prompt("What is 1 + 2?")


def test_kd_term_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100  # tokens that do not count
    loss, ce, kd = kd_loss(logits, logits.clone(), targets, alpha=0.7, temperature=2.0)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.3 * ce.item(), rel=1e-6)
    for beta in (0.5, 1.0):
        assert (kd_loss(logits, logits, targets, 0.7, 2.0, beta)[2].item()
                == pytest.approx(0.0, abs=1e-6))


def test_kd_loss_by_hand_with_temperature_squared():
    # T = 2: teacher logits (2 ln 3, 0) / T -> p_t = (3/4, 1/4); student logits (0, 0) -> p_s
    # = (1/2, 1/2)
    teacher = torch.tensor([[[2 * math.log(3), 0.0]]])
    student = torch.zeros(1, 1, 2)
    targets = torch.tensor([[0]])
    kl = kl_by_hand([0.75, 0.25], [0.5, 0.5])  # 0.1308...
    loss, ce, kd = kd_loss(student, teacher, targets, alpha=0.5, temperature=2.0)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert kd.item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * 2.0 ** 2 * kl, rel=1e-6)
    # alpha 0 is plain cross-entropy; only counted tokens enter the mean
    targets = torch.tensor([[0, -100]])
    student2, teacher2 = (
        torch.cat([student, torch.randn(1, 1, 2)], 1),
        torch.cat([teacher, torch.randn(1, 1, 2)], 1),
    )
    assert (kd_loss(student2, teacher2, targets, 0.0, 2.0)[0].item()
            == pytest.approx(math.log(2), rel=1e-6))
    assert kd_loss(student2, teacher2, targets, 0.5, 2.0)[2].item() == pytest.approx(kl, rel=1e-6)


def test_temperature_squared_keeps_the_gradient_scale():
    """d(T^2 KL)/d z_s = T (p_s - p_t) -> (z_s - z_t - mean) / V for large T (Hinton et al. section
    2.1): without the T^2 the soft-target gradient would shrink as 1 / T^2."""
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 1, 7), torch.randn(1, 1, 7)
    targets = torch.zeros(1, 1, dtype=torch.long)
    grads = {}
    for temperature in (10.0, 100.0):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, targets, alpha=1.0, temperature=temperature)[0].backward()
        grads[temperature] = z.grad.flatten()
    diff = (student - teacher).flatten()
    limit = (diff - diff.mean()) / 7
    assert torch.allclose(grads[100.0], limit, atol=2e-3)  # O(1 / T) away from the limit
    # without T^2 it would be 100
    assert grads[10.0].norm() / grads[100.0].norm() == pytest.approx(1.0, abs=0.1)
    # and by hand at T = 2: T^2 * (1/T) * (p_s - p_t) = T (p_s - p_t)
    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, targets, alpha=1.0, temperature=2.0)[0].backward()
    by_hand = 2.0 * ((student / 2).softmax(-1) - (teacher / 2).softmax(-1)).flatten()
    assert torch.allclose(z.grad.flatten(), by_hand, atol=1e-6)


def test_generalized_jsd_endpoints_and_bound():
    p_t, p_s = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
    teacher, student = torch.tensor(p_t).log(), torch.tensor(p_s).log()
    assert (generalized_jsd(student, teacher, 0.0).item()
            == pytest.approx(kl_by_hand(p_t, p_s), rel=1e-5))  # forward
    assert (generalized_jsd(student, teacher, 1.0).item()
            == pytest.approx(kl_by_hand(p_s, p_t), rel=1e-5))  # reverse
    m = [(a + b) / 2 for a, b in zip(p_t, p_s)]
    jsd = 0.5 * kl_by_hand(p_t, m) + 0.5 * kl_by_hand(p_s, m)
    assert generalized_jsd(student, teacher, 0.5).item() == pytest.approx(jsd, rel=1e-5)
    # symmetric at 0.5
    assert generalized_jsd(teacher, student, 0.5).item() == pytest.approx(jsd, rel=1e-5)
    # the endpoints are the limits up to a factor: JSD(b) / b -> KL(t || s), JSD(b) / (1 - b)
    # -> KL(s || t)
    b = 1e-3
    assert (generalized_jsd(student, teacher, b).item() / b
            == pytest.approx(kl_by_hand(p_t, p_s), rel=1e-2))
    assert (generalized_jsd(student, teacher, 1 - b).item() / b
            == pytest.approx(kl_by_hand(p_s, p_t), rel=1e-2))
    # JSD(0.5) <= log 2, reached by distributions with disjoint support
    torch.manual_seed(0)
    values = generalized_jsd(torch.randn(1000, 5) * 10, torch.randn(1000, 5) * 10, 0.5)
    assert (values >= -1e-6).all() and (values <= math.log(2) + 1e-6).all()
    far = generalized_jsd(torch.tensor([50.0, -50.0]), torch.tensor([-50.0, 50.0]), 0.5)
    assert far.item() == pytest.approx(math.log(2), rel=1e-5)


def random_distill_batch(seed=0):
    """Student and teacher logits (B, T, V), float64, and targets (B, T) with -100 where a token
    does not count."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher = (
        2 * torch.randn(3, 5, 11, generator=generator, dtype=torch.float64) for _ in range(2)
    )
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    targets[0, :2] = targets[2, 3:] = -100
    return student, teacher, targets


def gkd_trainer():
    with warnings.catch_warnings():  # "You are importing from 'trl.experimental'"
        warnings.simplefilter("ignore")
        return pytest.importorskip("trl.experimental.gkd", reason="no trl, or a trl without "
                                                                  "trl.experimental.gkd").GKDTrainer


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_trl_generalized_jsd_parity(beta):
    """Against GKDTrainer.generalized_jsd_loss and the divergence of TRL's DistillationTrainer (its
    chunked kernel, fed the logits as hidden states through an identity lm_head; it computes in
    float32)."""
    pytest.importorskip("trl", reason=TRL_MISSING)
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    student, teacher, targets = random_distill_batch()
    counts = targets != -100
    ours_leaf, trl_leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
    # distill.py computes in float32
    ours = generalized_jsd(ours_leaf, teacher, beta)[counts].mean()
    gkd = gkd_trainer().generalized_jsd_loss(trl_leaf, teacher, labels=targets, beta=beta)
    assert ours.item() == pytest.approx(gkd.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(ours, ours_leaf)[0].double(),
                          torch.autograd.grad(gkd, trl_leaf)[0], rtol=1e-5, atol=1e-7)
    identity = torch.eye(student.shape[-1], dtype=torch.float64)
    chunked, _, _ = _chunked_divergence_loss(
        student, teacher, identity, identity, counts.long(), beta
    )
    assert ours.item() == pytest.approx(chunked.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_trl_kd_loss_at_temperature_2_parity(beta):
    """kd_loss's divergence at T = 2 is GKD's at temperature 2; the loss adds Hinton's T^2
    (distill.py detail 3), which TRL's GKD loss has not."""
    pytest.importorskip("trl", reason=TRL_MISSING)
    student, teacher, targets = random_distill_batch(seed=1)
    loss, ce, kd = kd_loss(student, teacher, targets, alpha=0.7, temperature=2.0, beta=beta)
    gkd = gkd_trainer().generalized_jsd_loss(student, teacher, labels=targets, beta=beta,
                                             temperature=2.0)
    assert kd.item() == pytest.approx(gkd.item(), rel=1e-6)
    counts = targets != -100
    hard = F.cross_entropy(student[counts], targets[counts])
    assert loss.item() == pytest.approx(0.3 * hard.item() + 0.7 * 4 * gkd.item(), rel=1e-6)


# --------------------------------------------------------------------------------- end to end (e2e)


def TINY_DISTILL(world, sft):
    # 10 prompts per family keep the three evaluations short
    small_eval = world / "data" / "eval_small.jsonl"
    if not small_eval.exists():
        records = [json.loads(line) for line in open(world / "data" / "eval.jsonl")]
        small_eval.write_text("".join(json.dumps(r) + "\n"
                                      for f in sorted({r["family"] for r in records})
                                      for r in [r for r in records if r["family"] == f][:10]))
    # the tiny teacher is rarely right: every one of its replies is kept (--no-keep-correct)
    return ["--teacher", str(sft), "--init", str(world / "out" / "pretrain.pt"), "--data",
            str(world / "data" / "prompts.jsonl"), "--eval-data", str(small_eval),
            "--no-keep-correct", "--batch-size", "8", "--warmup", "2", "--log-every", "1",
            "--max-new-tokens", "4", "--device", "cpu"]


@pytest.mark.e2e
def test_distill_end_to_end_with_gkd_options(world, tiny_sft, tmp_path):
    out = tmp_path / "distill.pt"
    stdout = run_ok("distill.py", *TINY_DISTILL(world, tiny_sft), "--steps", "4", "--alpha", "0.5",
                    "--beta", "0.5", "--on-policy", "0.5", "--out", str(out))
    assert "distill | student:" in stdout and "wrote" in stdout
    checkpoint = torch.load(out, weights_only=True)
    start = torch.load(world / "out" / "pretrain.pt", weights_only=True)
    assert checkpoint["stage"] == "distill" and checkpoint["parent"] == str(tiny_sft)
    assert checkpoint["config"] == start["config"]  # the student is the --init model
    assert {"teacher", "student"} <= checkpoint["metrics"].keys()
    prompts = sum(1 for _ in open(world / "data" / "prompts.jsonl"))
    # --no-keep-correct keeps all
    assert checkpoint["metrics"]["prompts"] == checkpoint["metrics"]["kept"] == prompts
    log = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert ([r["step"] for r in log] == [1, 2, 3, 4] and any(r["on_policy"] for r in log)
            and not all(r["on_policy"] for r in log))
    # alpha 0 (the default): plain fine-tuning on the teacher's replies, no soft term; the chat
    # conversations (--chat-data) are trained on as written, beside every kept reply
    chats = world / "data" / "chat.jsonl"
    stdout = run_ok("distill.py", *TINY_DISTILL(world, tiny_sft), "--steps", "2", "--chat-data",
                    str(chats), "--out", str(out))
    n_chats = sum(1 for _ in open(chats))
    metrics = torch.load(out, weights_only=True)["metrics"]
    assert metrics["kept"] == prompts and metrics["chats"] == n_chats > 0
    assert f"{prompts} kept, {n_chats} chats as written" in stdout
    assert all(r["kd"] == 0 and r["ce"] == r["loss"]
               for r in map(json.loads, open(tmp_path / "distill.jsonl")))


@pytest.mark.e2e
def test_distill_ddp_equals_single_process(world, tiny_sft, tmp_path):
    """The student's losses of 2 ranks x 2 micro-steps (sorted by length) equal those of one
    process with one batch."""
    args = [*TINY_DISTILL(world, tiny_sft), "--steps", "3"]
    run_ok("distill.py", *args, "--grad-accum", "1", "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", os.path.join(ROOT, "distill.py"), *args, "--grad-accum", "2",
                             "--out", str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = [json.loads(line) for line in open(tmp_path / "single.jsonl")]
    ddp = [json.loads(line) for line in open(tmp_path / "ddp.jsonl")]
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for key in ("loss", "ce", "kd"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert result.stdout.count("distill | step 3/3") == 1  # only rank 0 prints


@pytest.mark.e2e
def test_distill_bad_input(world, tiny_sft, tmp_path):
    out = tmp_path / "d.pt"
    args = TINY_DISTILL(world, tiny_sft)
    assert "grpo.py" in run_error("distill.py", *args, "--teacher", str(tmp_path / "grpo.pt"),
                                  "--out", str(out))
    assert "pretrain the student first" in run_error("distill.py", *args, "--init",
                                                     str(tmp_path / "student.pt"), "--out",
                                                     str(out))
    (tmp_path / "no_answer.jsonl").write_text('{"prompt": "What is 1 + 2?"}\n')
    assert "no_answer.jsonl:1: missing 'answer'" in run_error(
        "distill.py",
        *[a for a in args if a != "--no-keep-correct"],
        "--data",
        str(tmp_path / "no_answer.jsonl"),
        "--out",
        str(out),
    )
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert "chat.jsonl:1: a conversation needs at least one assistant turn" in run_error(
        "distill.py", *args, "--chat-data", str(tmp_path / "chat.jsonl"), "--out", str(out))
    assert not out.exists()


# ==================================================================================================
# 13. eval.py
# ==================================================================================================


def test_bits_per_byte_by_hand():
    tokenizer = Tokenizer(merges=[])
    # 6 + 1 + 9 tokens
    ids = tokenizer.encode("héllo") + [tokenizer.eot_id] + tokenizer.encode("wörld ab")
    assert tokenizer.count_bytes(ids) == 6 + 9  # <|endoftext|> is no text
    # an MoE
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=4, num_experts=4)
    tokens = torch.tensor(ids)  # 16 tokens: 3 windows of 4 scored targets, the last token left over
    inputs, targets = tokens[:12].view(3, 4), tokens[1:13].view(3, 4)
    with torch.no_grad():
        logits, _ = model(inputs)
        bits = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                               reduction="sum").item() / math.log(2)
        with_router_loss = model(inputs, targets)[1].item() * 12 / math.log(2)
    n_bytes = tokenizer.count_bytes(targets.flatten())
    # targets: tokens 1..12, the eot at 0 bytes
    assert n_bytes == len("éllo".encode()) + len("wörld".encode())
    assert (bits_per_byte(model, tokenizer, tokens, batch_size=2)
            == pytest.approx(bits / n_bytes, rel=1e-5))
    assert abs(with_router_loss - bits) > 1e-3  # the MoE's load-balancing loss is not counted


def test_eval_kl_to_sft_by_hand():
    tokenizer = Tokenizer(merges=[])
    policy = tiny_model(seed=1, vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        # peaked next-token distributions, far from the reference's
        policy.model.norm.weight.mul_(30)
    reference = tiny_model(seed=2, vocab_size=tokenizer.vocab_size)
    records = [{"prompt": p} for p in ("ab", "c d e", "fgh", "i")]
    result = sampled_replies(policy, tokenizer, records, 6, batch_size=2, seed=0,
                             reference=reference)
    # by hand: the same samples (same seed, same batches), each model's log-probs from a full
    # forward
    generator, kl, tokens = torch.Generator().manual_seed(0), 0.0, 0.0
    for batch in (records[:2], records[2:]):
        prompts = [tokenizer.encode_prompt(r["prompt"]) for r in batch]
        ids, _, mask = generate(policy, prompts, 6, temperature=1.0, eos_id=tokenizer.im_end_id,
                                pad_id=tokenizer.pad_id, generator=generator)
        prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id)
        logp = completion_logprobs(policy, prompt_ids, prompt_mask, ids, mask)
        ref_logp = completion_logprobs(reference, prompt_ids, prompt_mask, ids, mask)
        kl, tokens = kl + ((logp - ref_logp) * mask).sum().item(), tokens + mask.sum().item()
    assert result["kl_to_sft"] == pytest.approx(kl / tokens, rel=1e-4) and result["kl_to_sft"] > 0.1
    assert result["reply_length"] == tokens / len(records)
    assert (sampled_replies(policy, tokenizer, records, 6, 2, 0, reference=policy)["kl_to_sft"]
            == pytest.approx(0, abs=1e-5))


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_eval_skips_replies_where_the_context_is_too_short(tmp_path, capsys):
    tokenizer = Tokenizer(merges=[])
    for name, context in (("short.pt", 16), ("long.pt", 128)):  # the prompt is ~30 byte tokens
        model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=context)
        save_checkpoint(str(tmp_path / name), model, tokenizer, "sft")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2",
                                                     "family": "add"}) + "\n")
    evaluate.main(evaluate.Args(checkpoints=f"{tmp_path}/*.pt",
                                eval_data=str(tmp_path / "eval.jsonl"),
                                val_data=str(tmp_path / "none.txt"),
                                reference=str(tmp_path / "none.pt"),
                                reward_model=str(tmp_path / "none.pt"),
                                out=str(tmp_path / "eval.json"), max_new_tokens=4, device="cpu"))
    rows = {os.path.basename(r["checkpoint"]): r for r in json.load(open(tmp_path / "eval.json"))}
    # one row each, no crash
    assert rows["short.pt"]["accuracy"] is None and rows["long.pt"]["accuracy"] is not None
    assert "short.pt: context 16 < the longest prompt" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_chat_rate_judges_greedy_chat_replies(tmp_path, monkeypatch, capsys):
    """chat_rate: greedy replies to --chat-data (within the context) judged by data.chat_in_kind,
    in the table and out/eval.json; blank with a one-line note when the file is missing."""
    tokenizer = Tokenizer(merges=[])
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    save_checkpoint(str(tmp_path / "sft.pt"), model, tokenizer, "sft")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2",
                                                     "family": "add"}) + "\n")
    chats = [{"prompt": "Hi!", "family": "chat", "kind": "greeting"},
             {"prompt": "A story about a cat?", "family": "chat", "kind": "story", "animal": "cat"},
             {"prompt": "Hey.", "family": "chat", "kind": "greeting"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    replies = {"What is 1 + 1?": "2", "Hi!": "Hello! How can I help you?",  # in kind
               "A story about a cat?": "Once upon a time, there was a dog named Tom.",  # a dog
               "Hey.": "<think>1+1=2</think>2"}  # a sum
    by_ids = {tuple(tokenizer.encode_prompt(p)): p for p in replies}
    lengths = {}

    def fixed_generate(model, prompts, max_new_tokens, **kwargs):
        assert kwargs["temperature"] == 0
        forced = prompts[0][-1] == tokenizer.think_id  # the forced-think column's call
        asked = [by_ids[tuple(p[:-1] if forced else p)] for p in prompts]
        lengths.update({} if forced else dict.fromkeys(asked, max_new_tokens))
        rows = [tokenizer.encode(replies[prompt]) + [tokenizer.im_end_id] for prompt in asked]
        n = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_id] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (n - len(r)) for r in rows])
        return ids, torch.zeros(len(rows), n), mask

    monkeypatch.setattr(engine, "generate", fixed_generate)
    args = evaluate.Args(checkpoints=str(tmp_path / "sft.pt"),
                         eval_data=str(tmp_path / "eval.jsonl"),
                         chat_data=str(tmp_path / "chat.jsonl"), val_data=str(tmp_path / "none"),
                         reference=str(tmp_path / "none.pt"), reward_model=str(tmp_path / "none"),
                         out=str(tmp_path / "eval.json"), max_new_tokens=4, device="cpu")
    evaluate.main(args)
    [row] = json.load(open(tmp_path / "eval.json"))
    assert row["chat_rate"] == pytest.approx(1 / 3) and row["accuracy"] == 1.0
    table = capsys.readouterr().out
    assert "| chat |" in table and "| 33.3% |" in table
    # the chat replies get --chat-tokens, the context permitting; the task replies --max-new-tokens
    longest = len(tokenizer.encode_prompt("A story about a cat?"))
    assert lengths == {"What is 1 + 1?": 4, **dict.fromkeys(("Hi!", "Hey.", "A story about a cat?"),
                                                           min(96, 128 - longest))}
    evaluate.main(dataclasses.replace(args, chat_data=str(tmp_path / "none.jsonl")))
    assert json.load(open(tmp_path / "eval.json"))[0]["chat_rate"] is None
    assert "none.jsonl not found: no chat column" in capsys.readouterr().out
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "Joke?", "kind": "joke"}) + "\n")
    with pytest.raises(ValueError, match="a chat kind is not one of"):
        evaluate.main(args)


@pytest.mark.e2e
def test_eval_vote_columns_and_bad_flags(tmp_path, capsys):
    """--vote "1 4": a vote@K column each ("accuracy/vote@K" in eval.json); at temperature 0 every
    vote is the greedy reply's."""
    tokenizer = Tokenizer(merges=[])
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    save_checkpoint(str(tmp_path / "sft.pt"), model, tokenizer, "sft")
    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    greedy = heldout_accuracy(model, tokenizer, records, max_new_tokens=4)["replies"]
    records[1]["answer"] = final_answer(greedy[1]) or "?"  # one right
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    none = str(tmp_path / "none")
    args = evaluate.Args(checkpoints=str(tmp_path / "sft.pt"),
                         eval_data=str(tmp_path / "eval.jsonl"), chat_data=none, val_data=none,
                         reference=none, reward_model=none,
                         out=str(tmp_path / "eval.json"), max_new_tokens=4, device="cpu",
                         vote="4 1", vote_temperature=0.0)
    evaluate.main(args)
    [row] = json.load(open(tmp_path / "eval.json"))
    assert row["accuracy/vote@1"] == row["accuracy/vote@4"] == row["accuracy"] >= 1 / 3
    assert "| vote@1 | vote@4 |" in capsys.readouterr().out
    for vote, temperature in (("0", 1.0), ("4 x", 1.0), ("4", -1.0)):
        with pytest.raises(ValueError, match="--vote"):
            evaluate.main(dataclasses.replace(args, vote=vote, vote_temperature=temperature))


# ==================================================================================================
# 14. hf.py: export to and import from Hugging Face
# ==================================================================================================

HF_CHAT = [{"role": "system", "content": "You are terse."},
           {"role": "user", "content": "What is 2+3? Größe 🙂"},
           {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 7*6?\nThanks"}]


# ---------------------------------------------------------------------------------- building blocks


def test_bytes_to_unicode_is_gpt2s_alphabet():
    table = hf.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    tokenizers = pytest.importorskip("tokenizers")
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_safetensors_fallback_reads_and_writes_the_format(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6).view(2, 3), "d": torch.tensor([True, False, True]),
               "e": torch.randn(2, 2).half(), "empty": torch.zeros(0, 4)}
    package = hf.safetensors_torch
    monkeypatch.setattr(hf, "safetensors_torch", None)  # the numpy/torch-only path
    hf.write_safetensors(tensors, str(tmp_path / "ours.safetensors"))
    back = hf.read_safetensors(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys() and all(
        torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items()
    )
    if package is not None:  # and the real package agrees both ways
        theirs = package.load_file(str(tmp_path / "ours.safetensors"))
        assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
        package.save_file(tensors, str(tmp_path / "theirs.safetensors"))
        back = hf.read_safetensors(str(tmp_path / "theirs.safetensors"))
        assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_tokenizer_json_gives_our_ids(hf_tok):
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_str(json.dumps(hf.hf_tokenizer_json(hf_tok)))
    assert theirs.get_vocab_size() == hf_tok.vocab_size
    for text in HF_SAMPLE.splitlines(keepends=True) + [
        HF_SAMPLE,
        "",
        " ",
        "\n\n\n",
        "a  b",
        "x\r\n\r\ny",
    ]:
        assert theirs.encode(text, add_special_tokens=False).ids == hf_tok.encode(text), text
    ids = hf_tok.encode("<|im_start|>hi<|im_end|>", allowed_special="all")
    assert theirs.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids == ids
    assert theirs.decode(hf_tok.encode(HF_SAMPLE), skip_special_tokens=False) == HF_SAMPLE


def test_tokenizer_json_follows_our_merge_rule_where_the_merge_list_would_not():
    """merges bc, ab, ab+c: "abc" encodes a + bc, then a + bc spells the token abc, which our rule
    (tiktoken's) merges though no merge (a, bc) was recorded. tokenizer.json must hold every split.
    """
    tokenizers = pytest.importorskip("tokenizers")
    a, b, c = b"abc"
    tok = Tokenizer([(b, c), (a, b), (257, c)])
    theirs = tokenizers.Tokenizer.from_str(json.dumps(hf.hf_tokenizer_json(tok)))
    for text in ["abc", "zabc", "abcabc", "zabcz abc"]:
        assert theirs.encode(text, add_special_tokens=False).ids == tok.encode(text), text
    assert tok.encode("zabc") == [ord("z"), 258]


def test_import_rebuilds_the_tokenizer_from_a_tiktoken_style_vocab():
    """Llama 3 style: every split of a token is a merge, ignore_merges; ids permuted. Same tokens as
    HF."""
    tokenizers = pytest.importorskip("tokenizers")
    rng = random.Random(0)  # words made of shared syllables: many tokens have several splits
    syllables = ["ka", "ri", "to", "ne", "sa", "mi", "lo", "pu"]
    words = " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                     for _ in range(3000))
    tok = Tokenizer.train(HF_SAMPLE + words, vocab_size=500)
    tj = hf.hf_tokenizer_json(tok)
    vocab = tj["model"]["vocab"]
    merges = []
    # all splits, ordered by the rank of the token they make
    for token in sorted(vocab, key=vocab.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab
                  and token[i:] in vocab]
        merges += sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    assert len(merges) > len(vocab) - 256  # several merges per token
    order = sorted(vocab, key=lambda s: (len(s), s))[::-1]  # a layout unlike ours
    permuted = {s: i for i, s in enumerate(order)}
    specials = [{**t, "id": len(order) + i} for i, t in enumerate(tj["added_tokens"])]
    tj["model"].update(vocab=permuted, merges=[" ".join(m) for m in merges], ignore_merges=True)
    tj["added_tokens"] = specials
    # digits in runs of 1-3
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = hf.LLAMA3_REGEX
    ours, sources = hf.tokenizer_from_hf(tj, "tokenizer.json")
    assert re.findall(ours.pattern, "x 12345") == ["x", " ", "123", "45"]
    theirs = tokenizers.Tokenizer.from_str(json.dumps(tj))
    for text in HF_SAMPLE.splitlines(keepends=True) + [
        HF_SAMPLE,
        words[:2000],
        "1 22 333 4444 55555 ½²",
    ]:
        assert ([sources[i] for i in ours.encode(text)]
                == theirs.encode(text, add_special_tokens=False).ids), text
    assert (ours.vocab_size == tok.vocab_size
            and sources[ours.im_end_id] == theirs.token_to_id("<|im_end|>"))


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("architecture,overrides", [
    ("Qwen2ForCausalLM", dict()),                                               # tied embeddings
    # no q/k/v bias, YaRN
    ("LlamaForCausalLM", dict(attention_bias=False, tie_word_embeddings=False,
                              rope_scaling={"type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 16})),
    ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24)),
], ids=["qwen2", "llama-yarn", "qwen2-moe"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, hf_tok, architecture,
                                                           overrides):
    transformers = pytest.importorskip("transformers")
    path, model = hf_checkpoint(tmp_path, hf_tok, **overrides)
    hf.export_hf(path, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == architecture
    ids = hf_tok.encode(HF_SAMPLE)[:60]
    with torch.no_grad():
        hf_logits = theirs(torch.tensor([ids])).logits[0]
    assert (hf_logits - hf_logits_of(model, ids)).abs().max() < 1e-4
    prompt = hf_tok.encode("The quick brown")
    ours, _, _ = generate(model, [prompt], 12, temperature=0.0)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None)
    assert out[0, len(prompt):].tolist() == ours[0].tolist()


def test_export_keeps_a_raised_rope_base_and_the_dual_chunk_config(tmp_path, hf_tok):
    """A phase-2 model (pretrain.py detail 8) exports with its rope_theta; DCA, which transformers
    does not run, goes to config.json under Qwen's key and comes back on import. Within one chunk
    (where DCA is full attention) transformers gives our logits."""
    dca = {"chunk_size": 48, "local_size": 8}
    path, model = hf_checkpoint(tmp_path, hf_tok, rope_theta=1e6, dual_chunk_attention_config=dca)
    hf.export_hf(path, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and config["dual_chunk_attention_config"] == dca
    hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "back.pt"))
    back = load_checkpoint(str(tmp_path / "back.pt"))[2]["config"]
    assert back["rope_theta"] == 1e6 and back["dual_chunk_attention_config"] == dca
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = hf_tok.encode(HF_SAMPLE)[:40]  # chunks of 40 positions
    with torch.no_grad():
        assert (theirs(torch.tensor([ids])).logits[0] - hf_logits_of(model, ids)).abs().max() < 1e-4


def test_export_tokenizer_chat_template_and_eos(tmp_path, hf_tok):
    transformers = pytest.importorskip("transformers")
    path, _ = hf_checkpoint(tmp_path, hf_tok, stage="sft")
    out = str(tmp_path / "hf")
    hf.export_hf(path, out)
    assert sorted(os.listdir(out)) == sorted(hf.FILES)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.is_fast
    for text in [HF_SAMPLE, *HF_SAMPLE.splitlines()]:
        assert theirs.encode(text, add_special_tokens=False) == hf_tok.encode(text)
    assert theirs.decode(hf_tok.encode(HF_SAMPLE)) == HF_SAMPLE
    assert theirs.eos_token == "<|im_end|>" and theirs.pad_token == "<|endoftext|>"
    assert theirs.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [hf_tok.eot_id, hf_tok.im_start_id, hf_tok.im_end_id]
    for messages, gen in ((HF_CHAT, False), (HF_CHAT[:2], True)):
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
            hf_tok.render_chat(messages, add_generation_prompt=gen)
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == hf_tok.encode_chat(messages, add_generation_prompt=gen)[0]
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == hf_tok.im_end_id and generation.pad_token_id == hf_tok.eot_id
    # a pretrain checkpoint is a base model: it stops at <|endoftext|>
    path, _ = hf_checkpoint(tmp_path, hf_tok, stage="pretrain", name="pretrain.pt")
    hf.export_hf(path, out)  # over the previous export: our own files are replaced
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == hf_tok.eot_id
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_export_score_head_as_sequence_classification(tmp_path, hf_tok):
    transformers = pytest.importorskip("transformers")
    path, model = hf_checkpoint(tmp_path, hf_tok, stage="reward", head="score")
    hf.export_hf(path, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "hf")
    ).eval()
    assert (type(theirs).__name__ == "Qwen2ForSequenceClassification"
            and theirs.config.num_labels == 1)
    ids = hf_tok.encode("a reward for this reply")
    with torch.no_grad():
        score = theirs(torch.tensor([ids])).logits[0, 0]
        ours = model(torch.tensor([ids]))[0][0, -1]
    assert abs(score - ours) < 1e-4


# ------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("cls_name,config", [
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=5e4, factor=4.0, original_max_position_embeddings=16))),
    ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, norm_topk_prob=True)),
], ids=["qwen2", "qwen2-yarn-untied", "llama", "qwen2-moe"])
def test_import_gives_the_same_logits_and_export_gives_back_the_weights(
    tmp_path, hf_tok, cls_name, config
):
    directory, theirs = hf_save_model(tmp_path, hf_tok, cls_name, **config)
    out = str(tmp_path / "imported.pt")
    hf.import_hf(directory, out)
    model, ours_tok, ckpt = load_checkpoint(out, head="lm")
    assert ckpt["stage"] == "import" and ours_tok.to_dict() == hf_tok.to_dict()
    ids = hf_tok.encode(HF_SAMPLE)[:60]
    with torch.no_grad():
        assert (
            theirs(torch.tensor([ids])).logits[0] - hf_logits_of(model.eval(), ids)
        ).abs().max() < 1e-4
    hf.export_hf(out, str(tmp_path / "again"))
    before = hf.read_safetensors(os.path.join(directory, "model.safetensors"))
    after = hf.read_safetensors(str(tmp_path / "again" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_import_permutes_rows_of_a_foreign_layout_and_adds_chat_tokens(tmp_path, hf_tok):
    """HF ids in another order (as Qwen2's), Llama-3-like special tokens without ChatML: rows follow
    the ids."""
    tokenizers = pytest.importorskip("tokenizers")
    tj = hf.hf_tokenizer_json(hf_tok)
    vocab = tj["model"]["vocab"]
    # letters last, bytes not first
    order = sorted(vocab, key=lambda s: (len(s) == 1 and s.isalpha(), s))
    tj["model"]["vocab"] = {s: i for i, s in enumerate(order)}
    tj["added_tokens"] = [{**tj["added_tokens"][0], "id": len(order) + i, "content": c}
                          for i, c in enumerate(["<|begin_of_text|>", "<|end_of_text|>"])]
    directory, theirs = hf_save_model(tmp_path, hf_tok, "LlamaForCausalLM", tokenizer_json=tj,
                                      tie_word_embeddings=False)
    out = str(tmp_path / "imported.pt")
    hf.import_hf(directory, out)
    model, ours, _ = load_checkpoint(out)
    fast = tokenizers.Tokenizer.from_str(json.dumps(tj))
    hf_ids = fast.encode(HF_SAMPLE, add_special_tokens=False).ids[:60]
    our_ids = ours.encode(HF_SAMPLE)[:60]
    embed, their_embed = model.model.embed_tokens.weight, theirs.model.embed_tokens.weight
    sources = [int(torch.where((their_embed == row).all(dim=1))[0][0])
               for row in embed[:ours.vocab_size - 3]]
    assert [sources[i] for i in our_ids] == hf_ids
    # the same text, the same logits: ours are theirs with the columns in our order
    with torch.no_grad():
        their_logits = theirs(torch.tensor([hf_ids])).logits[0]
    assert ((hf_logits_of(model,
                          our_ids)[:, :len(sources)] - their_logits[:, sources]).abs().max() < 1e-4)
    assert list(ours.special_tokens)[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert torch.allclose(embed[ours.im_end_id], their_embed.mean(dim=0))
    assert model.config.vocab_size == their_embed.shape[0] + 3  # 6 padding rows kept at the end


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_bad_input_is_a_one_line_error(tmp_path, hf_tok):
    pytest.importorskip("transformers")
    directory, _ = hf_save_model(tmp_path, hf_tok, "Qwen2ForCausalLM")

    def copy(config=None, remove=None, tokenizer_json=None):
        bad = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        bad.mkdir()
        for name in os.listdir(directory):
            (bad / name).write_bytes(open(os.path.join(directory, name), "rb").read())
        if config:
            (bad / "config.json").write_text(json.dumps({**json.load(open(bad / "config.json")),
                                                         **config}))
        if tokenizer_json:
            (bad / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        if remove:
            os.remove(bad / remove)
        return str(bad)

    unigram = {**hf.hf_tokenizer_json(hf_tok), "model": {"type": "Unigram", "vocab": [["a", 0.0]]}}
    for bad, error, match in [
        (copy(config={"architectures": ["GPT2LMHeadModel"]}), ValueError,
         r"architecture GPT2LMHeadModel is not supported"),
        (copy(config={"intermediate_size": 48}), ValueError,
         r"layers.0.mlp.down_proj.weight has shape \(32, 64\) but config.json implies \(32, 48\)"),
        (copy(config={"hidden_act": "gelu"}), ValueError, "with hidden_act gelu is not supported"),
        (copy(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), ValueError,
         "rope type llama3"),
        (copy(config={"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 16, "mscale": 1.0,
                                       "mscale_all_dim": 0.5}}), ValueError, "YaRN .* mscale"),
        (copy(tokenizer_json=unigram), ValueError, "is not a byte-level BPE tokenizer"),
        (copy(remove="tokenizer.json"), FileNotFoundError, "tokenizer.json not found"),
        (copy(remove="config.json"), FileNotFoundError, "config.json not found"),
        (copy(remove="model.safetensors"), FileNotFoundError, "has no model.safetensors"),
        (str(tmp_path / "nowhere"), FileNotFoundError, "is not a directory"),
    ]:
        with pytest.raises(error, match=match) as e:
            hf.import_hf(bad, str(tmp_path / "x.pt"))
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "x.pt")
    # export: a missing checkpoint names the stage to run; a directory of other files is left alone
    with pytest.raises(FileNotFoundError, match=r"run `python sft.py` first"):
        hf.export_hf(str(tmp_path / "sft.pt"), str(tmp_path / "out"))
    path, _ = hf_checkpoint(tmp_path, hf_tok)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine already holds other files \(notes.txt\)"):
        hf.export_hf(path, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    # the CLI prints one line and exits 2
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hf.py"), "import",
                             str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")],
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (result.returncode == 2 and result.stderr.startswith("error: ")
            and result.stderr.count("\n") == 1)


@pytest.mark.e2e
def test_sft_runs_on_an_imported_checkpoint(tmp_path, hf_tok):
    directory, _ = hf_save_model(tmp_path, hf_tok, "Qwen2ForCausalLM", tie_word_embeddings=True)
    hf.import_hf(directory, str(tmp_path / "imported.pt"))
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                             {"role": "assistant", "content": str(i + 1)}]}) + "\n")
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "1+2?", "answer": "3"}) + "\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--init",
                             str(tmp_path / "imported.pt"), "--data", str(tmp_path / "chats.jsonl"),
                             "--eval-data", str(tmp_path / "eval.jsonl"), "--out",
                             str(tmp_path / "sft.pt"), "--steps", "2", "--batch-size", "4",
                             "--warmup", "1", "--max-new-tokens", "4"],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    model, _, checkpoint = load_checkpoint(str(tmp_path / "sft.pt"))
    assert checkpoint["parent"] == str(tmp_path / "imported.pt")


@pytest.mark.e2e
def test_hf_cli_export_then_import_round_trips(tmp_path, hf_tok):
    ("""`python hf.py export` / `import` are the interop entry points: the weights come back """
     """exactly.""")
    path, model = hf_checkpoint(tmp_path, hf_tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (
        ["export", path, str(tmp_path / "hf")],
        ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")],
    ):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "hf.py"), *argv],
                                capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr
    back, tokenizer, _ = load_checkpoint(str(tmp_path / "back.pt"))
    assert tokenizer.merges == hf_tok.merges
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hf.py"), "import",
                             str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt")],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert (result.returncode == 2 and result.stderr.startswith("error: ")
            and not (tmp_path / "x.pt").exists())


# ==================================================================================================
# 15. serve.py: the sample and chat command line
# ==================================================================================================


def test_chat_shows_the_thinking_then_the_final_answer():
    assert show_reply("433") == "433" and show_reply("1<think>x") == "1<think>x"
    assert show_reply("<think>385+048: 5+8=13</think>433") == "[thinking] 385+048: 5+8=13\n433"
    assert (show_reply("<think>385+048: 5+8")
            == "[thinking] 385+048: 5+8\n[no answer: the think block never closed]")


@contextlib.contextmanager
def serving(model, tokenizer, **kwargs):
    """serve.ChatServer on a free port of 127.0.0.1, in this process: (server, port)."""
    server = serve.ChatServer(("127.0.0.1", 0), model, tokenizer, "tiny", log=False, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def http_request(port, method, path, body=None, connection=None):
    """One request -> (status, the JSON body, or the text of a stream)."""
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    if response.getheader("Content-Type") == "text/event-stream":
        return response.status, text
    return response.status, json.loads(text) if response.getheader(
        "Content-Type"
    ) == "application/json" else text


def stream_events(text):
    """The JSON events of a stream's text; it must end with data: [DONE]."""
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and all(e != "[DONE]" for e in events[:-1])
    return [json.loads(e) for e in events[:-1]]


def openai_client(port):
    openai = pytest.importorskip("openai", reason="openai is not installed (pip install -r "
                                                  "requirements-dev.txt)")
    return openai, openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
    )


def user(text):
    return [{"role": "user", "content": text}]


def test_serve_reasoning_split_and_stream_deltas():
    split = serve.split_reasoning
    assert split("<think>a b</think>c") == ("a b", "c")
    assert split(" <think>x</think> y") == ("x", " y")
    assert split("<think>never closed") == ("never closed", "")  # final_answer: None, so no content
    assert split("plain") == (None, "plain") and split("") == (None, "")
    # what a stream may send of a reply decoded so far (serve detail 4)
    sendable = serve.sendable_length
    # may still open a think block
    assert sendable("", [], False) == 0 and sendable("  <thi", [], False) == 0
    assert (sendable("hello", [], False) == 5 and sendable("hello", ["lo!"], False) == 3
            and sendable("hello", ["lo!"], True) == 5)
    assert sendable("ab\ufffd", [], False) == 2  # a character cut in its UTF-8 bytes waits
    assert (sendable("<think>abc</th", [], False) == len("<think>abc")
            and sendable("<think>a</think>b<", [], False) == 18)
    # token by token, a stream's deltas add up to the whole reply's split, with stop strings
    # held back
    tokenizer = Tokenizer(merges=[])
    for reply, stops in ((SERVE_REPLIES["think"], []), (SERVE_REPLIES["say"], ["there!"]),
                         ("<think>é ü 😀</think>ß ok", ["ok?"]), ("naïve <thin", [])):
        ids = tokenizer.encode(reply, ("<think>", "</think>"))
        sent, streamed = ("", ""), {"reasoning_content": "", "content": ""}
        for t in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:t])
            delta, sent = serve.reply_delta(sent, text[:sendable(text, stops, t == len(ids))])
            for key, value in delta.items():
                streamed[key] += value
        reasoning, content = split(reply)
        assert streamed == {"reasoning_content": reasoning or "", "content": content}, reply


def test_serve_parse_request_fields_and_errors():
    tokenizer = Tokenizer(merges=[])

    def parse(body, raw=False):
        return serve.parse_request(body if raw else json.dumps(body).encode(), "tiny", tokenizer,
                                   128, 8)

    good = {"model": "tiny", "messages": user("hi")}
    request = parse({**good, "stop": "x", "seed": 3, "temperature": 0, "max_tokens": 5,
                     "max_completion_tokens": 7})
    assert (request.prompt == tokenizer.encode_prompt(user("hi")) and request.stop == ["x"]
            and request.seed == 3)
    assert (request.max_tokens == 7 and request.temperature == 0 and request.n == 1
            and not request.stream)
    assert parse(good).max_tokens == 128 - len(request.prompt)  # default: the rest of the context
    parts = parse(
        {
            **good,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}],
                },
                {"role": "assistant", "content": "yo", "reasoning_content": "dropped"},
            ],
        }
    )
    assert parts.prompt == tokenizer.encode_prompt(
        [
            {"role": "system", "content": "be brief"},
            *user("hi"),
            {"role": "assistant", "content": "yo"},
        ]
    )
    assert parse({**good, "stream": True, "stream_options": {"include_usage": True}}).include_usage
    for body, status, param in (
        (b"{not json", 400, None),
        (b"[1]", 400, None),
        (b"\xff", 400, None),
        ({"messages": user("hi")}, 400, "model"),
        ({**good, "model": 7}, 400, "model"),
        ({**good, "model": "gpt-4o"}, 404, "model"),
        ({"model": "tiny"}, 400, "messages"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "messages": "hi"}, 400, "messages"),
        ({**good, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
        ({**good, "messages": [*user("a"), {"role": "user", "content": 5}]}, 400, "messages[1]"),
        ({**good, "temperature": -0.1}, 400, "temperature"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "temperature": True}, 400, "temperature"),
        ({**good, "top_p": 1.5}, 400, "top_p"),
        ({**good, "n": 0}, 400, "n"),
        ({**good, "n": 9}, 400, "n"),
        ({**good, "n": 2.0}, 400, "n"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 1.5}, 400, "max_tokens"),
        ({**good, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
        ({**good, "stop": [""]}, 400, "stop"),
        ({**good, "stop": ["a"] * 5}, 400, "stop"),
        ({**good, "stop": 1}, 400, "stop"),
        ({**good, "stream": "yes"}, 400, "stream"),
        ({**good, "seed": "a"}, 400, "seed"),
        ({**good, "seed": -1}, 400, "seed"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "messages",
        ),  # no UTF-8
        ({**good, "stream_options": {"include_usage": 1}}, 400, "stream_options"),
    ):
        with pytest.raises(serve.ApiError) as info:
            parse(body, raw=isinstance(body, bytes))
        assert (info.value.status, info.value.param) == (status, param), body
        error = info.value.body()["error"]
        assert (set(error) == {"message", "type", "param", "code"}
                and error["type"] == "invalid_request_error")
    # a prompt that does not fit: the numbers, as OpenAI gives them
    prompt_tokens = len(tokenizer.encode_prompt(user("x" * 100)))
    with pytest.raises(serve.ApiError) as info:
        parse({**good, "messages": user("x" * 100), "max_tokens": 30})
    assert info.value.code == "context_length_exceeded" and info.value.status == 400
    assert (f"128 tokens, but {prompt_tokens + 30} were requested ({prompt_tokens} in the "
            f"messages, 30 in" in str(info.value))
    with pytest.raises(serve.ApiError, match="maximum context length is 128"):
        parse({**good, "messages": user("x" * 200)})  # no room left at all


def test_serve_command_line_and_host_warning():
    assert serve.parse_args(["out/grpo.pt"]).command == "serve"
    args = serve.parse_args(["out/grpo.pt", "--port", "0"])
    assert (args.checkpoint, args.host, args.port) == ("out/grpo.pt", "127.0.0.1", 0)
    assert serve.parse_args(["--port", "9", "x.pt"]).port == 9
    assert (serve.parse_args(["chat", "x.pt"]).command == "chat"
            and serve.parse_args(["sample", "x.pt"]).command == "sample")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert serve.host_warning(host) is None, host
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        assert "no authentication" in serve.host_warning(host), host


@pytest.mark.e2e
def test_serve_openai_client_replies_as_generate(serve_tiny):
    model, tokenizer = serve_tiny
    with serving(model, tokenizer) as (server, port):
        openai, client = openai_client(port)
        assert ([m.id for m in client.models.list()] == ["tiny"]
                and client.models.retrieve("tiny").id == "tiny")
        reply = client.chat.completions.create(model="tiny", messages=user("think"), temperature=0)
        message = reply.choices[0].message
        assert ((message.reasoning_content, message.content, reply.choices[0].finish_reason)
                == ("one and one", "two", "stop"))
        prompt = tokenizer.encode_prompt(user("think"))
        assert (reply.usage.prompt_tokens == len(prompt)
                and reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens)
        # <|im_end|> included
        assert reply.usage.completion_tokens == len(tokenizer.encode_reply(SERVE_REPLIES["think"]))
        plain = client.chat.completions.create(model="tiny", messages=user("say"),
                                               temperature=0).choices[0].message
        assert plain.content == "hello there" and getattr(plain, "reasoning_content", None) is None
        # the same replies as engine.generate: greedy, seeded, cut at max_tokens, multi-turn
        turns = [*user("say"), {"role": "assistant", "content": "hello there"}, *user("what now?")]
        for messages, settings in ((user("what?"), dict(temperature=0)),
                                   (user("what?"), dict(temperature=1.0, seed=7)),
                                   (user("think"), dict(temperature=0.7, seed=1, max_tokens=6)),
                                   (turns, dict(max_tokens=20, seed=2))):
            text, finish = serve_generate(model, tokenizer, messages, settings.get("max_tokens"),
                                          settings.get("temperature", 1.0), settings.get("seed"))
            choice = client.chat.completions.create(model="tiny", messages=messages,
                                                    **settings).choices[0]
            reasoning, content = serve.split_reasoning(text)
            assert (getattr(choice.message, "reasoning_content", None), choice.message.content,
                    choice.finish_reason) == (
                reasoning, content, finish), settings
        # streamed: the deltas add up to the same reply, the usage comes last, then [DONE]
        chunks = list(client.chat.completions.create(model="tiny", messages=user("think"),
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "one and one"
        assert "".join(d.content or "" for d in deltas) == "two"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert (chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
                and not chunks[-1].choices)
        # n > 1: one row per choice, each with the generator seed + index; the same
        # request again, the same replies
        settings = dict(model="tiny", messages=user("what?"), n=3, temperature=1.0, seed=5,
                        max_tokens=12)
        many = client.chat.completions.create(**settings)
        assert [c.index for c in many.choices] == [0, 1, 2]
        replies = [(getattr(c.message, "reasoning_content", None), c.message.content)
                   for c in many.choices]
        assert replies == [
            serve.split_reasoning(
                serve_generate(model, tokenizer, user("what?"), 12, 1.0, 5 + i)[0]
            )
            for i in range(3)
        ]
        again = client.chat.completions.create(**settings).choices
        assert ([(getattr(c.message, "reasoning_content", None), c.message.content)
                 for c in again] == replies)
        assert 3 <= many.usage.completion_tokens <= 36 and len(set(replies)) > 1
        streamed = [["", ""] for _ in range(3)]
        for chunk in client.chat.completions.create(**settings, stream=True):
            for c in chunk.choices:
                streamed[c.index][0] += getattr(c.delta, "reasoning_content", None) or ""
                streamed[c.index][1] += c.delta.content or ""
        assert streamed == [[reasoning or "", content] for reasoning, content in replies]
        # stop strings: cut before the stop, finish_reason stop; also inside the
        # reasoning, and streamed
        for question, stop, expected in (("say", "ll", (None, "he")),
                                         ("say", ["zz", " t"], (None, "hello")),
                                         ("think", "and", ("one ", "")),
                                         ("think", "</think>", ("one and one", ""))):
            choice = client.chat.completions.create(model="tiny", messages=user(question),
                                                    temperature=0, stop=stop).choices[0]
            assert ((getattr(choice.message, "reasoning_content", None), choice.message.content)
                    == expected)
            assert choice.finish_reason == "stop"
            deltas = [c.choices[0].delta for c in client.chat.completions.create(
                model="tiny", messages=user(question), temperature=0, stop=stop, stream=True)
                      if c.choices]
            assert "".join(d.content or "" for d in deltas) == expected[1]
        length = client.chat.completions.create(model="tiny", messages=user("say"), temperature=0,
                                                max_tokens=3)
        assert ((length.choices[0].message.content, length.choices[0].finish_reason)
                == ("hel", "length"))
        assert length.usage.completion_tokens == 3
        # concurrent requests share a batch and get the replies they get alone
        # slow steps: the requests meet
        hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
        try:
            replies = {}

            def ask(question):
                replies[question] = client.chat.completions.create(
                    model="tiny", messages=user(question), temperature=0
                )
            threads = [threading.Thread(target=ask, args=(q,)) for q in [*SERVE_REPLIES] * 2]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            hook.remove()
        assert (replies["say"].choices[0].message.content == "hello there"
                and replies["think"].choices[0].message.content == "two")
        assert server.stats["max_rows"] >= 2
        # errors come through the client as its exceptions
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=user("hi"))
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model="tiny", messages=user("x" * 200))


@pytest.mark.e2e
def test_serve_bad_requests_get_their_status_and_the_server_goes_on(serve_tiny):
    model, tokenizer = serve_tiny
    good = {"model": "tiny", "messages": user("say"), "temperature": 0}
    with serving(model, tokenizer) as (server, port):
        # kept alive across the errors
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for method, path, body, status in (
            ("POST", "/v1/chat/completions", b"{oops", 400),
            ("POST", "/v1/chat/completions", {**good, "n": "2"}, 400),
            ("POST", "/v1/chat/completions", {**good, "model": "nope"}, 404),
            ("POST", "/v1/chat/completions", {**good, "messages": user("x" * 200)}, 400),
            ("POST", "/v1/chat/completions", {**good, "max_tokens": 1000}, 400),
            ("POST", "/v1/chat/completions", {**good, "messages": [{"role": "user"}]}, 400),
            ("GET", "/v1/chat/completions", None, 404),
            ("POST", "/v1/completions", good, 404),
            ("GET", "/v1/models/nope", None, 404),
        ):
            got, answer = http_request(port, method, path, body, connection)
            assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}, (
                path,
                body,
                answer,
            )
            got, answer = http_request(port, "POST", "/v1/chat/completions", good, connection)
            assert got == 200 and answer["choices"][0]["message"]["content"] == "hello there"
        got, answer = http_request(
            port, "POST", "/v1/chat/completions", {**good, "max_tokens": 1000}
        )
        prompt_tokens = len(tokenizer.encode_prompt(good["messages"]))
        assert (f"128 tokens, but {prompt_tokens + 1000} were requested ({prompt_tokens} in the "
                f"messages, 1000 in the "
                "completion)") in answer["error"]["message"]
        got, page = http_request(port, "GET", "/?q=hi")
        assert (got == 200 and "<textarea" in page and "http://" not in page
                and "https://" not in page)  # nothing from elsewhere
        # a batch that fails answers 500 to its requests, and the next batch runs
        hook = model.register_forward_pre_hook(lambda *_: 1 / 0)
        try:
            got, answer = http_request(port, "POST", "/v1/chat/completions", good)
            assert got == 500 and "ZeroDivisionError" in answer["error"]["message"]
            got, text = http_request(port, "POST", "/v1/chat/completions", {**good, "stream": True})
            assert got == 200 and "ZeroDivisionError" in stream_events(text)[-1]["error"]["message"]
        finally:
            hook.remove()
        assert http_request(port, "POST", "/v1/chat/completions", good)[0] == 200


@pytest.mark.e2e
def test_serve_client_hanging_up_stops_its_generation(serve_tiny):
    _, tokenizer = serve_tiny
    # untrained: long replies
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    text, finish = serve_generate(model, tokenizer, user("go"), 100)
    assert finish == "length"  # greedy, it runs the whole 100 tokens
    body = json.dumps({"model": "tiny", "messages": user("go"), "temperature": 0, "max_tokens": 100,
                       "stream": True})
    hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.03))  # 100 tokens would take 3 s
    try:
        with serving(model, tokenizer) as (server, port):
            for stream in (True, False):
                tokens = server.stats["tokens"]
                with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                    data = body if stream else body.replace('"stream": true', '"stream": false')
                    client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: "
                                   f"x\r\nContent-Type: application/json\r\n"
                                   f"Content-Length: {len(data)}\r\n\r\n{data}".encode())
                    if stream:  # read the headers and the first event, then hang up
                        received = b""
                        while b"data: " not in received:
                            received += client.recv(4096)
                        assert received.startswith(b"HTTP/1.1 200")
                cancelled = server.stats["cancelled"]
                deadline = time.time() + 10
                while server.stats["cancelled"] == cancelled and time.time() < deadline:
                    time.sleep(0.05)
                # the batch's end
                while server.stats["tokens"] == tokens and time.time() < deadline:
                    time.sleep(0.05)
                assert (server.stats["cancelled"] == cancelled + 1
                        and server.stats["tokens"] - tokens < 60), stream
                got, answer = http_request(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    {**json.loads(body), "stream": False, "max_tokens": 5},
                )
                assert got == 200 and answer["choices"][0]["finish_reason"] == "length"
    finally:
        hook.remove()


@pytest.mark.e2e
def test_serve_load_400_requests_from_16_clients(serve_tiny):
    _, tokenizer = serve_tiny
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    results, errors, rss = [], [], []  # rss: (requests answered, MB) after each request

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def client(index):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for k in range(25):
            i = index * 25 + k
            body = {"model": "tiny", "messages": user(f"request {i}"), "max_tokens": 1 + i % 8,
                    "temperature": 0.0 if i % 2 else 1.0, "seed": i, "n": 1 + (i % 5 == 0),
                    "stream": i % 3 == 0}
            try:
                status, answer = http_request(
                    port, "POST", "/v1/chat/completions", body, connection
                )
                if status != 200:
                    raise AssertionError(f"{status}: {answer}")
                if body["stream"]:
                    chunks = stream_events(answer)
                    ended = [c["choices"][0]["finish_reason"] for c in chunks[1:]
                             if c["choices"][0]["finish_reason"]]
                else:
                    ended = [c["finish_reason"] for c in answer["choices"]]
                    assert answer["usage"]["completion_tokens"] <= body["max_tokens"] * body["n"]
                assert len(ended) == body["n"] and set(ended) <= {"stop", "length"}
                results.append(i)
            except Exception as e:  # counted, never raised in a thread
                errors.append(f"{i}: {type(e).__name__}: {e}")
            rss.append((len(results), rss_mb()))

    start = time.time()
    with serving(model, tokenizer) as (server, port):
        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        stats = dict(server.stats)
    seconds = time.time() - start
    assert not errors, errors[:5]
    assert sorted(results) == list(range(400))  # every request answered, none lost
    assert stats["rows"] == 400 + 80 and stats["max_rows"] > 1  # n=2 every 5th; batched
    growth = rss_mb() - next(mb for answered, mb in rss if answered >= 100)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"serve load: 400 requests, 16 clients, {seconds:.1f}s, {stats['batches']} batches of up "
          f"to "
          f"{stats['max_rows']} rows; RSS +{growth:.1f} MB after the first 100; peak RSS "
          f"{peak:.0f} MB")
    assert growth < 50


# --------------------------------------------------------------------------------- end to end (e2e)


@pytest.mark.e2e
def test_cli_sample_chat_and_errors(tmp_path):
    tokenizer = Tokenizer(merges=[])
    save_checkpoint(
        str(tmp_path / "sft.pt"),
        tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128),
        tokenizer,
        "sft",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one interpreter for all three commands: starting python + torch is the slow part
    script = "\n".join([
        "import sys, serve",
        "serve.main(['sample', sys.argv[1], '--prompt', 'hi', '--max-new-tokens', '5', "
        "'--temperature', '0'])",
        "serve.main(['chat', sys.argv[1], '--max-new-tokens', '5'])",
    ])
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sft.pt")], cwd=ROOT,
                         env=env, input="hello\nsecond turn\n/quit\nnever read\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr
    # what the CLI must print: the greedy sample after "hi", then one greedy reply per line
    # until /quit
    model, _, _ = load_checkpoint(str(tmp_path / "sft.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess, so that the float sums are the same
    try:
        ids, _, mask = generate(
            model, [[tokenizer.eot_id] + tokenizer.encode("hi")], 5, temperature=0
        )
        expected = ["hi" + tokenizer.decode(ids[0][mask[0].bool()].tolist()), "-" * 40]
        messages = []
        for line in ("hello", "second turn"):
            messages.append({"role": "user", "content": line})
            ids, _, mask = generate(model, [tokenizer.encode_prompt(messages)], 5, temperature=0,
                                    eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id)
            reply = [t for t in ids[0][mask[0].bool()].tolist() if t != tokenizer.im_end_id]
            messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
            expected.append(messages[-1]["content"])
    finally:
        torch.set_num_threads(threads)
    assert run.stdout == "\n".join(expected) + "\n"  # and "never read", after /quit, got no reply
    run = subprocess.run([sys.executable, "serve.py", "sample",
                          str(tmp_path / "missing" / "sft.pt")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert (run.returncode == 2 and run.stderr.strip().startswith("error:")
            and "python sft.py" in run.stderr)
    with pytest.raises(SystemExit) as info:
        serve.main(["--help"])
    assert info.value.code == 0


@pytest.mark.e2e
@pytest.mark.e2e
def test_serve_command_serves_a_checkpoint(tmp_path):
    tokenizer = Tokenizer(merges=[])
    save_checkpoint(str(tmp_path / "grpo.pt"),
                    tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=128),
                    tokenizer, "grpo")
    process = subprocess.Popen([PY, "serve.py", str(tmp_path / "grpo.pt"), "--port", "0"], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # serving grpo at http://127.0.0.1:PORT/ ...
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        assert http_request(port, "GET", "/v1/models")[1]["data"][0]["id"] == "grpo"
        status, answer = http_request(port, "POST", "/v1/chat/completions",
                                      {"model": "grpo", "messages": user("hi"), "max_tokens": 4})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 4
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "serve | batch 1 | 1 requests, 1 rows" in stderr
    # SIGTERM (kill, docker stop) stops it as cleanly, and so does SIGINT in a server started with
    # SIGINT ignored (a shell's background job)
    for stop in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen(
            [PY, "serve.py", str(tmp_path / "grpo.pt"), "--port", "0"], cwd=ROOT, env=ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert "serving grpo" in process.stdout.readline()
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
    assert run_error("serve.py", str(tmp_path / "missing.pt")).startswith("error: ")


# ==================================================================================================
# 16. pipeline.sh: the whole pipeline, end to end
# ==================================================================================================


@pytest.mark.parametrize("module", [pretrain, sft, reward, ppo, grpo, dpo, distill])
def test_no_stage_writes_its_metrics_over_an_input(module, tmp_path):
    """--out data/sft.pt would put its metrics in data/sft.jsonl: with that file an input, every
    stage stops first with a one-line error, and the input is untouched."""
    (tmp_path / "sft.jsonl").write_text("kept\n")
    args = module.Args(out=str(tmp_path / "sft.pt"), data=str(tmp_path / "sft.jsonl"), device="cpu")
    with pytest.raises(ValueError, match=r"would write its metrics over --data .*sft\.jsonl"):
        module.main(args)
    assert (tmp_path / "sft.jsonl").read_text() == "kept\n" and not (tmp_path / "sft.pt").exists()


@pytest.mark.parametrize("module", [data, pretrain, sft, reward, ppo, grpo, dpo, distill,
                                    evaluate])
def test_every_stage_prints_its_help(module, monkeypatch, capsys):
    """--help prints every option with its docstring (a '%' in a docstring breaks argparse)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(module.Args)
    assert exit_info.value.code == 0 and "--seed" in capsys.readouterr().out


def recorded_pipeline(tmp_path, *flags, env=None):
    """pipeline.sh with a python that records each command line (OMP_NUM_THREADS first) as it
    starts, takes a moment (pretraining longer), records "done" and its --out, and writes nothing:
    the calls, as lists of words, and every line in the order written."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS $@" >> {tmp_path}/calls\n'
                    'case "$1" in pretrain.py) sleep 0.6 ;; *) sleep 0.2 ;; esac\n'
                    f'echo "done $(echo "$@" | sed "s/.*--out \\([^ ]*\\).*/\\1/")" '
                    f'>> {tmp_path}/calls\n')
    fake.chmod(0o755)
    (tmp_path / "calls").unlink(missing_ok=True)
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), *flags, "--data",
                             str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                            env={**(env or ENV), "PYTHON": str(fake)}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "calls").read_text().splitlines()
    return [line.split() for line in lines if not line.startswith("done ")], lines


def call_writing(calls, name):
    """The one call whose --out is `name` (sft.pt, student.pt, ...), OMP_NUM_THREADS dropped."""
    [call] = [c[1:] for c in calls if "--out" in c and c[c.index("--out") + 1].endswith(name)]
    return call


@pytest.mark.e2e
def test_distill_baseline_shares_the_students_start(tmp_path):
    """pipeline.sh's baseline (sft.py on the student) has distill's start and budget: the same
    --init, and the same steps, batch, schedule, optimizer and seed once each stage's defaults fill
    in, in both sizes."""
    budget = ["init", "steps", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
              "grad_clip", "seed"]

    def settings(call, args_class):  # the stage's defaults, then the flags of its command line
        values = dataclasses.asdict(args_class())
        for flag, value in zip(call[1:], call[2:]):
            name = flag[2:].replace("-", "_")
            if flag.startswith("--") and name in values and not value.startswith("--"):
                values[name] = type(values[name])(value)
        return {name: values[name] for name in budget}
    for quick in ([], ["--quick"]):
        calls, _ = recorded_pipeline(tmp_path, *quick, "--seed", "2")
        distilled = call_writing(calls, "/distill.pt")
        baseline = call_writing(calls, "/distill_baseline.pt")
        assert distilled[0] == "distill.py" and baseline[0] == "sft.py"
        assert settings(distilled, distill.Args) == settings(baseline, sft.Args), quick
        assert settings(baseline, sft.Args)["init"] == str(tmp_path / "out" / "student.pt")


@pytest.mark.e2e
def test_pipeline_seed_reaches_data_and_every_stage(tmp_path):
    """bash pipeline.sh --seed 3: a python that records its command lines sees --seed 3 in every one
    but the tokenizer's; --one-at-a-time runs them in the order of the docs."""
    calls, _ = recorded_pipeline(tmp_path, "--seed", "3", "--one-at-a-time")
    assert [call[1] for call in calls] == [
        "data.py",
        "tokenizer.py",
        "pretrain.py",
        "sft.py",
        "grpo.py",
        "pretrain.py",
        "distill.py",
        "reward.py",
        "ppo.py",
        "dpo.py",
        "sft.py",
        "eval.py",
    ]
    for call in calls:
        assert ("--seed 3" in " ".join(call)) == (call[1] != "tokenizer.py"), call
    for bad in ("x", "-1", ""):
        result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--seed", bad],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "--seed needs a whole number" in result.stderr


@pytest.mark.e2e
def test_pipeline_runs_stages_side_by_side_after_sft(tmp_path):
    """After SFT, stages run in two lanes with OMP_NUM_THREADS at half the cores (of 4 here), the
    others alone with all of them; no stage starts before each stage whose file it reads is done
    (the baseline waits for the student's pretraining in the other lane)."""
    calls, lines = recorded_pipeline(tmp_path, env={**ENV, "OMP_NUM_THREADS": "4"})
    threads = {call[call.index("--out") + 1].split("/")[-1]: call[0] for call in calls}
    assert threads == {"data": "4", "tokenizer.json": "4", "pretrain.pt": "4", "sft.pt": "4",
                       "student.pt": "2", "grpo.pt": "2", "reward.pt": "2", "distill.pt": "2",
                       "dpo.pt": "2", "distill_baseline.pt": "2", "ppo.pt": "2", "eval.json": "4"}
    started, done = {}, {}  # the line on which the stage writing a file started, and finished
    for i, words in enumerate(line.split() for line in lines):
        if words[0] == "done":
            done[words[1].split("/")[-1]] = i
        else:
            started[words[words.index("--out") + 1].split("/")[-1]] = i
    reads = {"pretrain.pt": ["tokenizer.json"], "sft.pt": ["pretrain.pt"], "grpo.pt": ["sft.pt"],
             "reward.pt": ["sft.pt"], "ppo.pt": ["sft.pt", "reward.pt"], "dpo.pt": ["sft.pt"],
             "student.pt": ["tokenizer.json"], "distill.pt": ["grpo.pt", "student.pt"],
             "distill_baseline.pt": ["student.pt"],
             "eval.json": ["sft.pt", "reward.pt", "ppo.pt", "grpo.pt", "dpo.pt", "student.pt",
                           "distill.pt", "distill_baseline.pt"]}
    for then, firsts in reads.items():
        for first in firsts:
            assert done[first] < started[then], (first, then)


@pytest.mark.e2e
def test_pipeline_stops_at_the_first_failing_stage(tmp_path):
    """A python that fails on tokenizer.py: the pipeline names the stage, its exit code, and goes no
    further."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1" in tokenizer.py) echo "tokenizer broke" >&2; exit 3 ;; '
                    'esac\nexit 0\n')
    fake.chmod(0o755)
    result = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "pipeline.sh"),
            "--quick",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
        ],
        env={**ENV, "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "pipeline: stage tokenizer failed (exit 3)" in result.stderr
    assert "tokenizer broke" in (tmp_path / "out" / "logs" / "tokenizer.log").read_text()
    assert "pipeline | pretrain" not in result.stdout
    # a stage in a lane (the reward model, first in the second): named, its exit code, and no
    # stage after it starts (GRPO in the other lane runs to its end)
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncase "$1" in reward.py) '
                    'echo "reward broke" >&2; exit 4 ;; esac\nsleep 0.3\n')
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--data",
                             str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                            env={**ENV, "PYTHON": str(fake)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 4
    assert "pipeline: stage reward failed (exit 4)" in result.stderr
    assert "reward broke" in (tmp_path / "out" / "logs" / "reward.log").read_text()
    scripts = [call.split()[0] for call in (tmp_path / "calls").read_text().splitlines()]
    assert sorted(scripts) == sorted(["data.py", "tokenizer.py", "pretrain.py", "sft.py",
                                      "grpo.py", "reward.py"])


@pytest.mark.e2e
def test_pipeline_quick_end_to_end(tmp_path):
    """bash pipeline.sh --quick: every stage runs, every checkpoint loads with weights_only=True,
    eval has a row for each."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--quick", "--data",
                             str(tmp_path / "data"), "--out", str(out)],
                            env={**ENV, "PYTHON": PY}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = ["pretrain", "sft", "reward", "ppo", "grpo", "dpo", "distill"]
    for stage in stages:
        checkpoint = torch.load(out / f"{stage}.pt", weights_only=True)
        # finished, not mid-run
        assert checkpoint["stage"] == stage and "optimizer" not in checkpoint
    for stage in ["data", "tokenizer", *stages, "student", "baseline", "eval"]:
        assert f"pipeline | {stage} took " in result.stdout
    # the student's start (a small pretrain) and the baseline
    files = [*stages, "student", "distill_baseline"]
    baseline = torch.load(out / "distill_baseline.pt", weights_only=True)  # sft.py on the student
    assert (baseline["stage"] == "sft" and baseline["parent"] == str(out / "student.pt")
            and "optimizer" not in baseline)
    assert torch.load(out / "student.pt", weights_only=True)["stage"] == "pretrain"
    table = [line for line in result.stdout.splitlines() if line.startswith(f"| {out}/")]
    assert (sorted(line.split(" | ")[0][2:] for line in table)
            == sorted(f"{out}/{s}.pt" for s in files))
    rows = {os.path.basename(r["checkpoint"]): r for r in json.load(open(out / "eval.json"))}
    assert rows["distill_baseline.pt"]["stage"] == "sft"
    # DESIGN.md's keys; the win rate is against sft's replies (sft against itself: 50 %)
    for name, row in rows.items():
        assert {"checkpoint", "stage", "accuracy", "think_rate", "win_rate"} <= row.keys(), name
    assert rows["sft.pt"]["win_rate"] == 0.5 and 0 <= rows["grpo.pt"]["win_rate"] <= 1
    # the reference against itself
    assert rows["sft.pt"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    for bad, says in [
        (["--out"], "--out needs a directory"),
        (["--out", "a b"], "must not contain spaces"),
    ]:
        result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), *bad],
                                capture_output=True, text=True)
        assert (result.returncode == 2 and says in result.stderr
                and not os.path.exists(os.path.join(ROOT, "a b")))
    # the score head's row
    assert rows["reward.pt"]["accuracy"] is not None and rows["reward.pt"]["val_bpb"] is None
    assert all(rows[f"{s}.pt"]["val_bpb"] > 0 and rows[f"{s}.pt"]["reward"] is not None
               for s in stages if s != "reward")


@pytest.mark.e2e
def test_iterate_two_rounds_with_the_labeler_in_the_loop(world, tiny_sft, tiny_reward, tiny_prm,
                                                         tmp_path):
    """iterate.sh: round 2 starts from round 1's policy (its reference too) and trains against the
    reward model retrained on round 1's labelled samples; eval.py puts sft and both rounds side by
    side."""
    out = tmp_path / "iter"
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "iterate.sh"), "--quick", "--rounds", "2", "--seed", "3",
         "--data", str(world / "data"), "--init", str(tiny_sft), "--reward-model",
         str(tiny_reward), "--out", str(out), "--", "--kl-coef", "0.05"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = (torch.load(out / f"ppo_r{r}.pt", weights_only=True) for r in (1, 2))
    assert (first["parent"], first["args"]["reward_model"]) == (str(tiny_sft), str(tiny_reward))
    assert (second["parent"], second["args"]["reward_model"]) == (str(out / "ppo_r1.pt"),
                                                                  str(out / "reward_r1.pt"))
    assert (first["args"]["seed"], second["args"]["seed"], second["args"]["kl_coef"]) == (3, 1003,
                                                                                         0.05)
    retrained = torch.load(out / "reward_r1.pt", weights_only=True)
    assert retrained["parent"] == str(tiny_reward) and retrained["args"]["replay_share"] == 0.1
    assert not (out / "reward_r2.pt").exists()  # the last round's policy needs none
    rows = json.load(open(out / "eval.json"))
    assert [row["checkpoint"] for row in rows] == [str(tiny_sft), str(out / "ppo_r1.pt"),
                                                   str(out / "ppo_r2.pt")]
    assert "round 2: ppo | after:" in result.stdout and "round 1: reward | after:" in result.stdout
    # --process: the policy trains against a process reward model, which trains further on the
    # labeller's judgement of every step of the policy's samples, replaying D/steps.jsonl
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "iterate.sh"), "--quick", "--process", "--rounds", "2",
         "--data", str(world / "data"), "--init", str(tiny_sft), "--reward-model", str(tiny_prm),
         "--out", str(tmp_path / "prm")], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    retrained = torch.load(tmp_path / "prm" / "reward_r1.pt", weights_only=True)
    assert retrained["stage"] == "prm" and retrained["parent"] == str(tiny_prm)
    assert retrained["args"]["step_data"] == str(tmp_path / "prm" / "steps_r1.jsonl")
    assert retrained["args"]["replay_data"] == str(world / "data" / "steps.jsonl")
    second = torch.load(tmp_path / "prm" / "ppo_r2.pt", weights_only=True)
    assert second["args"]["reward_model"] == str(tmp_path / "prm" / "reward_r1.pt")
    bad = subprocess.run(["bash", os.path.join(ROOT, "iterate.sh"), "--stage", "dpo"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--stage is ppo or grpo" in bad.stderr


# --------------------------------------------------------------------------------- bench/scaling.py


def test_scaling_law_fit_recovers_a_known_law_and_its_compute_optimum():
    import importlib.util
    spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "bench",
                                                                          "scaling.py"))
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    true = {"E": 0.6, "A": 40.0, "B": 300.0, "alpha": 0.45, "beta": 0.5}
    params, tokens = (grid.ravel() for grid in np.meshgrid(np.geomspace(5e4, 2e6, 6),
                                                           np.geomspace(3e5, 3e6, 4)))
    losses = scaling.predicted_loss(true, params, tokens)
    losses[5] *= 1.1  # one bad run: the Huber loss on log L all but ignores it
    fit = scaling.fit_scaling_law(params, tokens, losses, starts=4)
    for name, value in true.items():  # A = e^a and B = e^b move most
        assert fit[name] == pytest.approx(value, rel=5e-2 if name in "AB" else 1e-2), name
    # the closed form (Hoffmann et al. eq. 4) is the least loss on the iso-FLOP line C = 6ND
    flops = 1e13
    best_params, best_tokens = scaling.compute_optimal(true, flops)
    assert 6 * best_params * best_tokens == pytest.approx(flops)
    line = np.geomspace(1e4, 1e8, 100_001)
    brute_force = line[np.argmin(scaling.predicted_loss(true, line, flops / 6 / line))]
    assert best_params == pytest.approx(brute_force, rel=1e-3)
