"""
data.py: the built-in "thinking world", deterministic procedural datasets for every stage.

    python data.py                  # writes data/ at the default size
    python data.py --scale 0.02     # a tiny world for tests
    python data.py --seed 1         # other training data of the same kind; the same eval files
    python data.py label --samples out/ppo_samples.jsonl --out out/prefs_r1.jsonl  # iterative RL
    python data.py label --steps --samples out/ppo_samples.jsonl --out out/steps_r1.jsonl  # (PRM)

Nothing is downloaded. For a given --seed and --scale every file is byte-identical on every run.

The story, stage by stage: a small model can add and subtract three-digit numbers when it works
column by column, but rarely gets them right answering straight away. Pretraining shows both ways,
in text and in conversations in the chat template; SFT teaches the assistant's habits from demos of
which a minority think first; RL and DPO teach the model to think where that gets problems right, as
the labeler prefers; distillation hands that on.

Files written (sizes at --scale 1; the eval files depend on neither --scale nor --seed)
  pretrain.txt      ~4 MB of documents separated by a blank line: of the documents ~57 % skill
                    lines, ~20 % conversations in the chat template (detail 10), ~10 % copy
                    drills, ~13 % prose (stories, requested stories, facts)
  pretrain_val.txt  ~200 KB more documents of the same kind, for a validation loss
  sft.jsonl         20k {"messages", "family", "level", "thinks"}: ~70 % tasks, one per conversation
                    mostly (15 % of the replies think first); ~30 % family "chat" (greetings,
                    what it can do, stories)
  prompts.jsonl     4k {"prompt", "answer", "family", "level"} for RL (PPO, GRPO) and distillation
  chat.jsonl        6k chat conversations on training prompts (as many as sft.jsonl's), with
                    "kind" and "animal"? (half the stories "thing"?: about a kite, say):
                    SFT, distillation and its baseline train on them as written
  prefs.jsonl       8k {"prompt", "chosen", "rejected", "family", "level", "kind"}, by `prefer`
  eval.jsonl        150 held-out problems per family, {"prompt", "answer", "family", "level"}
  prefs_eval.jsonl  one preference pair per eval problem, for the held-out reward / DPO accuracy
  chat_eval.jsonl   44 held-out chat prompts, {"prompt", "family": "chat", "kind", "animal" if
                    a story asks for one}, judged by `chat_in_kind`
  steps.jsonl       8k {"prompt", "completions": [step, ...], "labels": [bool, ...], "family",
                    "level"}: replies with 0-2 wrong steps (a tenth bare), each step by the labeler
  steps_eval.jsonl  one such reply per eval problem, for a process reward model's held-out accuracy
With --retrieval L (the long-context task, detail 9; nothing above changes):
  retrieval.txt     ~1.5M pieces of documents of L/4 to L pieces (phase-1 pretraining)
  retrieval_long.txt  the same, of L/4 to 4L pieces (phase 2 at a 4x context)
  retrieval_eval.jsonl  --retrieval-eval held-out questions at each of 1, 2, 4, 8, 16 x L pieces,
                    {"prompt", "answer", "length": the multiple of L, "depth": of the asked note}

Task families (FAMILIES), each at level 1 (easy) to 3 (hard), levels drawn uniformly:
  add  "What is 385 + 48?"   "433" or "<think>385+048: 5+8+0=13 8+4+1=13 3+0+1=4</think>433"
  sub  "Compute 305 - 148."  "157" or
       "<think>305-148: 5-8-0=-3+10=7 0-4-1=-5+10=5 3-1-1=1</think>157"
A three-digit number and one of 1, 2 or 3 digits (the level). A reply is correct iff its final
answer (tokenizer.final_answer), stripped, is the answer.

Implementation details
1. Traces a tiny model can execute: the operands restated, zero-padded to three digits ("385+048:"),
   then one column per step, ones first: the two digits and the carry (borrow) in, then the result;
   a negative difference borrows after it is written ("5-8-0=-3+10=7"), never decided ahead.
2. Two skills (add, sub): what a 2-core CPU budget trains to where thinking beats answering.
3. Pretraining has four fifths of its skill lines in the think form ("What is 385 + 48? <think>
   ...</think>433"), a fifth plain ("385 + 48 = 433"), and copy drills ("Copy 4 + 763: 4 + 763"):
   restating the operands is copying, learned late without them. <think>, </think>: think tokens.
4. The held-out split: a problem's canonical key ("add:48:385" for 385 + 48 and 48 + 385) is held
   out iff sha256(key) falls in the first --held-out fraction of the hash range, whatever the seed.
   Eval files draw only held-out keys; every training generator redraws them.
5. The labeler `prefer(record, reply_a, reply_b)` (the careful human) ranks a reply by: a right
   final answer; between right answers, right steps (2) > no think block (1) > a wrong step (0);
   having a final answer. Equal ranks tie (half a win): two wrong answers tie unless one is cut off.
6. Each preference pair is the right worked reply against a plausible failure (REJECT_KINDS): the
   bare answer, right or wrong by a slip; a trace cut off before </think>; a trace with one wrong
   step. Two bare answers, one right and one wrong, are not asked (no model here can tell).
7. Chat prompts are the cells of a grid (a phrasing by a follow-up or an animal); a cell is held out
   iff (row + column) % 3 == 0, so every phrasing and every animal is also trained. A requested
   story restates the request ("Here is a story about a frog.") as a trace restates its operands:
   copying the animal is what a tiny model learns. Pretraining has requested stories and drills of
   request and opening; three in ten sft.jsonl conversations chat. chat.jsonl, which SFT and the
   small student train on too, asks half its stories about a thing in any phrasing, which no
   animal remembered for a phrasing answers. `chat_in_kind` judges a reply: a greeting back,
   "I can ...", a story naming the animal; no <think>, no digit.
8. Step labels (TRL's stepwise format): a step starts at each space and at </think>, so the steps
   concatenate to the reply; the labeler's `judge_steps` marks each right iff a careful solver
   writes it there given the steps before it, so a mistake makes one wrong step, not all after it.
9. Retrieval: notes on 2-6 boxes ("The code of box 17 is 482.") among sentences of prose, then
   "What is the code of box 17? The code of box 17 is" 482 (passkey retrieval's form); a training
   document asks about every note, an eval prompt about one. Lengths count pre-tokenizer pieces (a
   token each once BPE merged the words); a (box, code) pair is held out as in detail 4, and only
   eval asks about a held-out one.
10. Transcripts: a fifth of the pretraining documents are conversations of sft.jsonl's kind in the
   chat template (ChatML, tokenizer.render_chat), half of the tasks' replies thinking. The base
   model learns the template's tokens and to work its traces inside it (nanochat's midtraining
   mixes conversations in the same way), so SFT only has the assistant's habits to teach.
"""

import argparse
import ast
import collections
import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

from tokenizer import SPLIT_PATTERN, final_answer, render_chat, thinks


@dataclass
class Args:
    out: str = "data"
    """directory the files are written to"""
    scale: float = 1.0
    """multiplies every training-set size (0.02 is a tiny world for tests), not the eval sizes"""
    seed: int = 0
    """seed of the generators (the held-out split does not depend on it)"""
    pretrain_bytes: int = 4_000_000
    """size of pretrain.txt in bytes at --scale 1 (pretrain_val.txt gets a twentieth of it)"""
    sft: int = 20_000
    """conversations in sft.jsonl at --scale 1"""
    think_share: float = 0.15
    """share of the sft task replies that think first"""
    prefs: int = 8_000
    """preference pairs in prefs.jsonl at --scale 1"""
    prompts: int = 4_000
    """RL prompts in prompts.jsonl at --scale 1"""
    step_traces: int = 8_000
    """step-labelled replies in steps.jsonl at --scale 1 (for a process reward model)"""
    eval_per_family: int = 150
    """held-out problems per family in eval.jsonl (and pairs in prefs_eval.jsonl)"""
    held_out: float = 0.08
    """fraction of every family's problem space kept out of training, for evaluation"""
    retrieval: int = 0
    """also write the retrieval task (detail 9) for a phase-1 context of this many pieces (0: no)"""
    retrieval_eval: int = 100
    """held-out retrieval questions at each length (1, 2, 4, 8 and 16 times --retrieval)"""


def is_held_out(key: str, fraction: float) -> bool:
    # sha256, not hash(): Python salts string hashes per process, and the split must never move
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


# ---- TASK FAMILIES: one generator per family, (rng, level) -> Problem, and its worked steps

@dataclass
class Problem:
    family: str
    level: int
    key: str      # canonical: the same for every trivially equal problem (detail 4)
    a: int
    b: int
    answer: str


def number(rng, digits):
    """A number with exactly `digits` digits (one digit includes 0)."""
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def make_add(rng, level):
    a, b = number(rng, 3), number(rng, level)  # level = digits of the smaller number
    a, b = rng.choice([(a, b), (b, a)])
    return Problem("add", level, f"add:{min(a, b)}:{max(a, b)}", a, b, str(a + b))


def make_sub(rng, level):
    a, b = number(rng, 3), number(rng, level)
    a, b = max(a, b), min(a, b)  # a >= b: results are never negative
    return Problem("sub", level, f"sub:{a}:{b}", a, b, str(a - b))


GENERATORS = {"add": make_add, "sub": make_sub}
FAMILIES = list(GENERATORS)
SIGN = {"add": "+", "sub": "-"}


def column_step(family: str, x: int, y: int, carry: int) -> tuple[str, int, int]:
    """One column of a trace: its text ("8+4+1=13"), its result (13) and the carry out (1). carry:
    the carry (add) or the borrow (sub) into the column."""
    if family == "add":
        return f"{x}+{y}+{carry}={x + y + carry}", x + y + carry, (x + y + carry) // 10
    d = x - y - carry  # a negative difference borrows: "2-5-0=-3+10=7"
    if d >= 0:
        return f"{x}-{y}-{carry}={d}", d, 0
    return f"{x}-{y}-{carry}={d}+10={d + 10}", d + 10, 1


def trace(family: str, a: int, b: int) -> str:
    """detail 1: the worked steps, trace("add", 385, 48) == "385+048: 5+8+0=13 8+4+1=13 3+0+1=4"."""
    top, bottom = f"{a:03d}", f"{b:03d}"
    steps, carry = [], 0
    for x, y in zip(map(int, reversed(top)), map(int, reversed(bottom))):
        text, _, carry = column_step(family, x, y, carry)
        steps.append(text)
    return f"{top}{SIGN[family]}{bottom}: " + " ".join(steps)


def answer_from_steps(results: list[int]) -> str:
    """The answer the step results spell: the last result whole, then the others' last digits."""
    return str(int(str(results[-1]) + "".join(str(r % 10) for r in reversed(results[:-1]))))


def thinking_reply(p: Problem) -> str:
    return f"<think>{trace(p.family, p.a, p.b)}</think>{p.answer}"


# prompts never contain another number, so the labeler finds the operands in them
PROMPTS = {
    "add": ["What is {a} + {b}?", "{a} + {b} =", "Compute {a} + {b}.", "Add {a} and {b}."],
    "sub": ["What is {a} - {b}?", "{a} - {b} =", "Compute {a} - {b}.", "What is {a} minus {b}?"],
}
PLAIN = {  # the pretraining form without thinking: the skill without the chat format
    "add": ["{a} + {b} = {answer}", "{a} plus {b} equals {answer}"],
    "sub": ["{a} - {b} = {answer}", "{a} minus {b} equals {answer}"],
}


def render_prompt(rng, p):
    return rng.choice(PROMPTS[p.family]).format(a=p.a, b=p.b)


def skill_line(rng, p):
    """detail 3: most lines think ("What is 37 + 48? <think>...</think>85"), a fifth are plain."""
    if rng.random() < 0.8:
        return f"{render_prompt(rng, p)} {thinking_reply(p)}"
    return rng.choice(PLAIN[p.family]).format(a=p.a, b=p.b, answer=p.answer)


def sample_problem(rng, family, fraction):
    """A training problem of a random level: held-out keys are redrawn (detail 4)."""
    while True:
        p = GENERATORS[family](rng, rng.randint(1, 3))
        if not is_held_out(p.key, fraction):
            return p


def training_problems(rng, count, fraction):
    return [sample_problem(rng, rng.choice(FAMILIES), fraction) for _ in range(count)]


# ---- THE LABELER (detail 5)

def operands(record) -> tuple[str, int, int]:
    """(family, a, b) of a task record, read from its prompt."""
    prompt = record["prompt"]
    if not isinstance(prompt, str):  # messages: the last one asks
        prompt = prompt[-1]["content"]
    a, b = map(int, re.findall(r"\d+", prompt))
    return record["family"], a, b


def rank(record, reply: str) -> tuple[int, int, int]:
    """What the labeler looks at, most important first: (right final answer, work, has an answer).
    The labeler solves the task itself, from the prompt: a record needs "prompt" and "family"."""
    family, a, b = operands(record)
    answer = final_answer(reply)
    right = int(answer == str(a + b if family == "add" else a - b))
    work = 0  # the work counts between right answers only: two wrong answers are equally wrong
    if right:
        right_steps = reply.strip().startswith(f"<think>{trace(family, a, b)}</think>")
        work = 1 if not thinks(reply) else 2 if right_steps else 0
    return right, work, int(answer is not None)


def prefer(record, reply_a: str, reply_b: str) -> float:
    """1.0 if reply_a is the better reply to `record`'s task, 0.0 if reply_b is, 0.5 for a tie."""
    rank_a, rank_b = rank(record, reply_a), rank(record, reply_b)
    return 0.5 if rank_a == rank_b else float(rank_a > rank_b)


def win_rate(records, replies, reference_replies) -> float:
    """Mean of prefer(record, reply, reference reply) over the records: ties count half."""
    judged = [prefer(r, a, b) for r, a, b in zip(records, replies, reference_replies)]
    return sum(judged) / max(len(judged), 1)


def reply_steps(reply: str) -> list[str]:
    """detail 8: a reply cut into the steps a process reward model judges, which concatenate to
    it: a step starts at each space and at </think> ("<think>385+048:", " 5+8+0=13", ...,
    "</think>433")."""
    return [step for step in re.split(r"(?= |</think>)", reply) if step]


def judge_steps(record, steps: list[str]) -> list[bool]:
    """The labeler on each step of a reply (detail 8): right iff it is what a careful solver writes
    there, given the steps before it. The head ("<think>385+048:") restates the operands; a column
    takes its digits from the head and its carry (borrow) from the column before, as written, and
    computes right; the answer ("</think>433") is what the three columns spell. A reply that does
    not think is right iff it is the answer. Anything else (a fourth column, a step after the
    answer, text that is no step) is wrong."""
    family, a, b = operands(record)
    if not steps or not steps[0].startswith("<think>"):
        right = final_answer("".join(steps)) == str(a + b if family == "add" else a - b)
        return [right] * len(steps)
    sign = SIGN[family]
    head = re.fullmatch(rf"<think>(\d{{3}})\{sign}(\d{{3}}):", steps[0])
    top, bottom = head.groups() if head else (f"{a:03d}", f"{b:03d}")
    labels, carry, results, answered = [steps[0] == f"<think>{a:03d}{sign}{b:03d}:"], 0, [], False
    for step in steps[1:]:
        if step.startswith("</think>"):  # the answer: what the written columns spell
            right = not answered and len(results) == 3 and step[8:] == answer_from_steps(results)
            labels.append(right)
            answered = True
            continue
        written = re.fullmatch(rf" \d\{sign}\d\{sign}\d=(-?\d+)(?:\+10=(\d+))?", step)
        if answered or len(results) == 3 or not written:
            labels.append(False)
            continue
        column = len(results)
        expected, _, _ = column_step(family, int(top[2 - column]), int(bottom[2 - column]), carry)
        labels.append(step == " " + expected)
        first = int(written[1])  # what the next column's carry (borrow) follows from, as written
        results.append(int(written[2]) if written[2] else first)
        carry = first // 10 if family == "add" else int(first < 0)
    return labels


# ---- PREFERENCE PAIRS (detail 6): the right worked reply against a plausible failure, by prefer
REJECT_KINDS = {"bare_right": 0.4, "bare_wrong": 0.3, "cut_off": 0.2, "wrong_step": 0.1}


def slip(rng, value: int) -> int:
    """A plausible wrong result: off by 1, 2 or 10, never negative."""
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong >= 0 and wrong != value else value + 1


def wrong_step_reply(rng, p: Problem) -> str:
    """A trace with one wrong step result, and the answer the steps then spell."""
    head, *steps = trace(p.family, p.a, p.b).split(" ")  # "385+048:", "5+8+0=13", ...
    results = [int(step.rsplit("=", 1)[1]) for step in steps]
    column = rng.randrange(len(steps))
    results[column] = slip(rng, results[column])
    steps[column] = steps[column].rsplit("=", 1)[0] + f"={results[column]}"
    return f"<think>{' '.join([head, *steps])}</think>{answer_from_steps(results)}"


def candidate_pair(rng, p: Problem) -> tuple[str, str, str]:
    kind = rng.choices(list(REJECT_KINDS), weights=list(REJECT_KINDS.values()))[0]
    good = thinking_reply(p)
    if kind == "bare_right":
        return kind, good, p.answer
    if kind == "bare_wrong":
        return kind, good, str(slip(rng, int(p.answer)))
    if kind == "wrong_step":
        return kind, good, wrong_step_reply(rng, p)
    steps = good.split(" ")  # cut_off
    return kind, good, " ".join(steps[: rng.randint(1, len(steps) - 1)])


def preference_record(rng, p):
    record = prompt_record(rng, p)
    kind, a, b = candidate_pair(rng, p)
    if rng.random() < 0.5:
        a, b = b, a
    label = prefer(record, a, b)
    if label == 0.5:  # never: every kind is a strict preference (a test checks it)
        raise AssertionError(f"a tie in a preference pair: {a!r} vs {b!r}")
    chosen, rejected = (a, b) if label == 1.0 else (b, a)
    return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
            "family": p.family, "level": p.level, "kind": kind}


# ---- STEP LABELS (detail 8): a trace's steps, each judged by the labeler, TRL's stepwise format
STEP_KINDS = {0: 0.35, 1: 0.3, 2: 0.25, "bare": 0.1}  # wrong steps in a worked reply, or bare


def flawed_reply(rng, p: Problem, n_wrong: int) -> str:
    """A worked reply with n_wrong mistakes, each in its own step, as a model makes them: a
    mis-copied operand (in the head or a column), a dropped carry, a slipped digit (in a column's
    result or the answer), the smaller digit taken from the larger where a borrow is due (Brown and
    Burton's commonest bug); every other step carries on from what was written."""
    where = rng.sample(range(5), n_wrong)  # 0: the head, 1-3: the columns, 4: the answer
    top, bottom = f"{p.a:03d}", f"{p.b:03d}"
    if 0 in where:  # one digit of one operand mis-copied
        written, which, i = [top, bottom], rng.randrange(2), rng.randrange(3)
        digit = rng.choice([d for d in "0123456789" if d != written[which][i]])
        written[which] = written[which][:i] + digit + written[which][i + 1:]
        top, bottom = written
    steps, carry, results = [f"<think>{top}{SIGN[p.family]}{bottom}:"], 0, []
    for column in range(3):
        x, y = int(top[2 - column]), int(bottom[2 - column])
        borrows = p.family == "sub" and x - y - carry < 0
        mistake = (rng.choice(["copy", "slip"] + ["carry"] * carry + ["reverse"] * 2 * borrows)
                   if column + 1 in where else None)
        if mistake == "copy":  # a digit that is not the head's
            x = rng.choice([d for d in range(10) if d != x])
        text, result, next_carry = column_step(p.family, x, y, 0 if mistake == "carry" else carry)
        if mistake == "reverse":  # "1-3-0=2": the smaller from the larger, and no borrow
            result, next_carry = abs(x - y - carry), 0
            text = f"{x}-{y}-{carry}={result}"
        if mistake == "slip":  # the result off by 1 or 2; the carry follows the written result
            result = rng.choice([r for r in (result - 2, result - 1, result + 1, result + 2)
                                 if r >= 0])
            text = text.rsplit("=", 1)[0] + f"={result}"
            next_carry = result // 10 if p.family == "add" else next_carry
        steps.append(f" {text}")
        results.append(result)
        carry = next_carry
    answer = answer_from_steps(results)
    if 4 in where:
        answer = str(slip(rng, int(answer)))
    return "".join(steps) + f"</think>{answer}"


def step_record(rng, p: Problem) -> dict:
    """A reply to p with 0-2 wrong steps (or a bare answer, right or slipped), cut into its steps,
    each labelled by the labeler `judge_steps`."""
    record = prompt_record(rng, p)
    kind = rng.choices(list(STEP_KINDS), weights=list(STEP_KINDS.values()))[0]
    if kind == "bare":
        reply = p.answer if rng.random() < 0.5 else str(slip(rng, int(p.answer)))
    else:
        reply = flawed_reply(rng, p, kind)
    steps = reply_steps(reply)
    return {"prompt": record["prompt"], "completions": steps, "labels": judge_steps(record, steps),
            "family": p.family, "level": p.level}


# ---- PROSE: a small generative grammar, so a base model's samples read as language (no digits)
NAMES = "Tom Lily Sam Mia Ben Anna Max Zoe Leo Ella Jack Lucy".split()
ANIMALS = {"cat": "climb trees", "dog": "bark", "bird": "fly", "fox": "run fast", "rabbit": "hop",
           "frog": "jump", "duck": "swim", "horse": "run", "bear": "climb", "owl": "see at night",
           "cow": "eat grass", "goat": "climb hills"}
ADJECTIVES = "big small happy red green little old kind brave quiet funny sleepy shiny soft".split()
THINGS = "ball box apple hat book cake kite cup stone flower boat key drum shoe".split()
PLACES = "park garden forest house river town school farm hill beach".split()
FEELINGS = "happy sad tired proud scared hungry glad".split()
ACTIONS = "ran jumped played sang danced walked laughed swam".split()
TIMES = ["One day", "In the morning", "After lunch", "That night", "Later", "The next day"]
COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "night": "dark",
          "sea": "blue", "leaf": "green", "fire": "hot", "ice": "cold", "milk": "white"}
LESSONS = {  # the words of the task prompts, in prose, so the base model has seen them
    "add": "{name} practices addition: add the two numbers, ones first, then tens with the carry.",
    "sub": "{name} practices subtraction: take the second number away, ones first, then tens with "
           "the borrow."}


def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(rng, animal=None, title=False):
    animal = animal or rng.choice(list(ANIMALS))
    name, friend = rng.sample(NAMES, 2)
    thing, place, other_place = rng.choice(THINGS), *rng.sample(PLACES, 2)
    adj, feeling = rng.choice(ADJECTIVES), rng.choice(FEELINGS)
    middle = [
        f"{rng.choice(TIMES)}, {name} found {a(adj)} {thing} near the {place}.",
        f"{name} {rng.choice(ACTIONS)} with {friend} the {rng.choice(list(ANIMALS))}.",
        f"{friend} said, \"I like your {thing}!\"",
        f"The {thing} was {rng.choice(ADJECTIVES)}, and {name} felt {feeling}.",
        f"Then {name} lost the {thing} and was {rng.choice(FEELINGS)}.",
        f"{friend} helped {name} look for it in the {other_place}.",
        f"{name} and {friend} {rng.choice(ACTIONS)} until the {rng.choice(['sun', 'moon'])} "
        "came up.",
    ]
    picked = [middle[i] for i in sorted(rng.sample(range(len(middle)), rng.randint(3, 5)))]
    return " ".join([*([f"Here is a story about {a(animal)}."] if title else []),
                     f"Once upon a time, there was {a(animal)} named {name}.",
                     f"{name} lived near the {place}.", *picked,
                     f"In the end, {name} was {rng.choice(FEELINGS)} and went home."])


def facts(rng):
    def fact():
        kind = rng.randrange(5)
        if kind == 4:  # the words of the chat roles, so the tokenizer learns them as tokens
            return rng.choice(["The user asks and the assistant answers.",
                               "The system tells the assistant what to do.",
                               "An assistant helps a user."])
        if kind == 0:
            animal = rng.choice(list(ANIMALS))
            return f"{a(animal).capitalize()} can {ANIMALS[animal]}."
        if kind == 1:
            thing = rng.choice(list(COLORS))
            return f"The {thing} is {COLORS[thing]}."
        if kind == 2:
            return f"{rng.choice(NAMES)} has {a(rng.choice(ADJECTIVES))} {rng.choice(THINGS)}."
        return f"{rng.choice(NAMES)} likes to go to the {rng.choice(PLACES)}."
    return " ".join(fact() for _ in range(rng.randint(3, 6)))


def skill_document(rng, fraction):
    """A drill (skill lines only) or a lesson (a sentence of prose around skill lines)."""
    family = rng.choice(FAMILIES)
    lines = [skill_line(rng, sample_problem(rng, family, fraction))
             for _ in range(rng.randint(4, 16))]
    if rng.random() < 0.5:
        return "\n".join(lines)
    name = rng.choice(NAMES)
    return "\n".join([LESSONS[family].format(name=name), *lines, f"{name} checked every answer."])


def copy_document(rng, fraction):
    """detail 3: copy drills, "Copy 4 minus 7634: 4 minus 7634" (no held-out pair of operands)."""
    def numbers():
        while True:
            a, b = (number(rng, rng.randint(1, 4)) for _ in range(2))
            keys = [f"add:{min(a, b)}:{max(a, b)}", f"sub:{max(a, b)}:{min(a, b)}"]
            if not any(is_held_out(key, fraction) for key in keys):
                sign = rng.choice([" + ", " - ", " and ", " minus ", " plus "])
                return f"{a}{sign}{b}"
    return "\n".join(f"{rng.choice(['Repeat', 'Copy', 'Say'])} {x}: {x}"
                     for x in (numbers() for _ in range(rng.randint(4, 12))))


def requested_story(rng):
    """detail 7: a trained story request, then its story: "Tell me a story about a frog." names the
    animal that the story's first sentence copies."""
    prompt, animal, _ = rng.choice([cell for cell in chat_prompts("story") if not cell[2]])
    return f"{prompt}\n{story(rng, animal, title=True)}"


def story_openings(rng):
    """detail 7: drills of trained story requests, each followed by a story's first sentences."""
    lines = []
    for _ in range(rng.randint(3, 8)):
        prompt, animal, _ = rng.choice([cell for cell in chat_prompts("story") if not cell[2]])
        animal = animal or rng.choice(list(ANIMALS))
        lines.append(f"{prompt} Here is a story about {a(animal)}. Once upon a time, there was "
                     f"{a(animal)} named {rng.choice(NAMES)}.")
    return "\n".join(lines)


def transcript(rng, fraction):
    """detail 10: two to five conversations of sft.jsonl's kind in the chat template, half of the
    tasks' replies thinking."""
    records = sft_records(rng, rng.randint(2, 5), fraction, think_share=0.5)
    return "".join(render_chat(record["messages"]) for record in records).rstrip("\n")


def pretrain_text(rng, n_bytes, fraction):
    documents, size = [], 0
    while size < n_bytes:
        r = rng.random()
        document = (story(rng) if r < 0.03 else requested_story(rng) if r < 0.06
                    else story_openings(rng) if r < 0.1 else facts(rng) if r < 0.13
                    else copy_document(rng, fraction) if r < 0.23
                    else transcript(rng, fraction) if r < 0.43
                    else skill_document(rng, fraction))
        documents.append(document)
        size += len(document) + 2
    return "\n\n".join(documents) + "\n"  # documents are separated by a blank line


# ---- CHAT (detail 7): small talk and stories, a held-out split of their prompts, and the judge
# a chat prompt is a cell of a grid: a phrasing (row) by a follow-up or an animal (column)
GREETINGS = ["Hello!", "Hi.", "Good morning!", "Hey there.", "Hi there!", "Hello there.",
             "Good evening!", "Hey!"]
GREETING_TAILS = [" How are you?", "", " Nice to meet you.", " How are you today?",
                  " Can you help me?", " Are you there?"]
ABILITY_QUESTIONS = ["What can you do?", "How can you help me?", "What are you good at?",
                     "What can you help me with?", "What do you know how to do?",
                     "How can you help?"]
STORY_REQUESTS = ["Tell me a story{about}.", "Write a short story{about}.",
                  "Can you tell me a story{about}?", "Tell me a short story{about}.",
                  "I would like a story{about}.", "Please tell me a story{about}."]
GREETING_REPLIES = ["Hello! How can I help you?", "Hi! Ask me a question.",
                    "Hello! What shall we do today?"]
ABILITIES = "I can add and subtract numbers, step by step if you like, and tell short stories."
CHAT_KINDS = {"greeting": 0.3, "abilities": 0.1, "story": 0.6}  # shares of the chat in sft.jsonl
CHAT_SHARE = 0.3  # of the conversations of sft.jsonl; chat.jsonl has as many
GREETING_WORDS = r"(hello|hi|hey|good (morning|afternoon|evening|day)|greetings)\b"


def chat_prompts(kind: str) -> list[tuple[str, str | None, bool]]:
    """Every prompt of a kind of chat: (prompt, the animal asked for or None, held out). A cell is
    held out iff (row + column) % 3 == 0: a diagonal, so each row and column is in both halves."""
    if kind == "greeting":
        grid = [[(greeting + tail, None) for tail in GREETING_TAILS] for greeting in GREETINGS]
    elif kind == "abilities":
        grid = [[(question, None)] for question in ABILITY_QUESTIONS]
    else:
        grid = [[(request.format(about=f" about {a(animal)}" if animal else ""), animal)
                 for animal in [None, *ANIMALS]] for request in STORY_REQUESTS]
    return [(prompt, animal, (row + column) % 3 == 0)
            for row, cells in enumerate(grid) for column, (prompt, animal) in enumerate(cells)]


def chat_prompt_record(rng) -> dict:
    """A training chat prompt of a random kind (CHAT_KINDS): held-out ones are never drawn."""
    kind = rng.choices(list(CHAT_KINDS), weights=list(CHAT_KINDS.values()))[0]
    prompt, animal, _ = rng.choice([cell for cell in chat_prompts(kind) if not cell[2]])
    return {"prompt": prompt, "family": "chat", "kind": kind,
            **({"animal": animal} if animal else {})}


def chat_conversation(rng, thing_share=0.0) -> dict:
    """A conversation on a training chat prompt, answered in kind: {"messages", "family": "chat",
    "kind", "animal" or "thing"?}. A `thing_share` of the story requests ask, in any phrasing, for a
    story about a thing ("Tell me a story about a kite."): never a held-out prompt, and answered by
    no animal remembered for the phrasing, only by copying the noun."""
    record = chat_prompt_record(rng)
    if thing_share and record["kind"] == "story" and rng.random() < thing_share:
        thing = rng.choice(THINGS)
        record = {"prompt": rng.choice(STORY_REQUESTS).format(about=f" about {a(thing)}"),
                  "family": "chat", "kind": "story", "thing": thing}
    kind, prompt = record["kind"], record["prompt"]
    if kind == "greeting":
        reply = rng.choice(GREETING_REPLIES)
    elif kind == "abilities":
        reply = ABILITIES
    else:  # no animal or thing asked for: any animal
        reply = story(rng, record.get("animal") or record.get("thing"), title=True)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": reply}],
            **{key: value for key, value in record.items() if key != "prompt"}}


def chat_eval_records() -> list[dict]:
    """The held-out chat prompts, kind by kind: no generator, so the same at every seed."""
    records = []
    for kind in CHAT_KINDS:
        for prompt, animal, held_out in chat_prompts(kind):
            if held_out:
                animal_field = {"animal": animal} if animal else {}
                records.append({"prompt": prompt, "family": "chat", "kind": kind, **animal_field})
    return records


def chat_in_kind(record, reply: str) -> bool:
    """Whether `reply` answers a chat record ({"kind", "animal" if a story asks for one}) in kind:
    a greeting back (it opens with a greeting word or offers help), what the assistant can do
    ("I can ..."), a story ("Here is a story about a frog. Once upon a time, ..." or the story
    alone), its first sentence naming the animal asked for.
    Never a reply with a think block or a digit: a sum or a bare number is no chat."""
    text = reply.strip()
    if "<think>" in text or re.search(r"\d", text):
        return False
    if record["kind"] == "greeting":
        return bool(re.match(GREETING_WORDS, text, re.IGNORECASE)
                    or re.search(r"\bhelp\b", text, re.IGNORECASE))
    if record["kind"] == "abilities":
        return bool(re.search(r"\bI can\b", text))
    if record["kind"] == "story":
        first_sentence = text.split(".")[0].lower()
        animal = record.get("animal")
        return (text.startswith(("Here is a story", "Once upon a time")) and "Once upon" in text
                and (animal is None or animal in re.findall(r"[a-z]+", first_sentence)))
    raise ValueError(f"unknown chat kind {record['kind']!r}: expected one of {list(CHAT_KINDS)}")


# ---- CONVERSATIONS AND RECORDS
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a careful assistant.",
                  "Answer the question."]


def sft_records(rng, n, fraction, think_share):
    records = []
    for _ in range(n):
        if rng.random() < CHAT_SHARE:
            records.append(chat_conversation(rng))
            continue
        family, messages, levels = rng.choice(FAMILIES), [], []
        thinks = rng.random() < think_share  # a minority of demos think first
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(2 if rng.random() < 0.05 else 1):  # a second turn: same family, style
            p = sample_problem(rng, family, fraction)
            messages += [{"role": "user", "content": render_prompt(rng, p)},
                         {"role": "assistant",
                          "content": thinking_reply(p) if thinks else p.answer}]
            levels.append(p.level)
        records.append({"messages": messages, "family": family, "level": max(levels),
                        "thinks": thinks})
    return records


def prompt_record(rng, p):
    return {"prompt": render_prompt(rng, p), "answer": p.answer, "family": p.family,
            "level": p.level}


def held_out_problems(rng, per_family, fraction):
    """`per_family` distinct held-out problems per family, spread over the levels (detail 4)."""
    problems = []
    for family in FAMILIES:
        chosen = {}
        for level in (1, 2, 3):
            quota, found = (per_family - len(chosen)) // (4 - level), 0
            # levels 1 and 2 run out of held-out keys: level 3 takes the rest
            for _ in range(100 * quota):
                if found == quota:
                    break
                p = GENERATORS[family](rng, level)
                if is_held_out(p.key, fraction) and p.key not in chosen:
                    chosen[p.key], found = p, found + 1
        problems += chosen.values()
    return problems


# ---- RETRIEVAL (detail 9): the code of one box among notes and prose, asked for at the end
RETRIEVAL_LENGTHS = (1, 2, 4, 8, 16)  # of the eval prompts, in phase-1 contexts
PHASE2_LENGTH = 4                     # the longest document of retrieval_long.txt, likewise
RETRIEVAL_PIECES = 1_500_000          # in each retrieval training file at --scale 1


def pieces(text: str) -> int:
    """The pre-tokenizer's pieces (tokenizer.py detail 1): a digit is one, a word with its space
    one, so a tokenizer trained on this text makes about a token of each."""
    return len(re.findall(SPLIT_PATTERN, text))


def box_code(rng, fraction, held_out=False):
    """A (box, code) pair on the given side of the held-out split (its key: "box:17:482")."""
    while True:
        box, code = rng.randrange(10, 100), rng.randrange(100, 1000)
        if is_held_out(f"box:{box}:{code}", fraction) == held_out:
            return box, code


def retrieval_document(rng, n_pieces, fraction, asked=None, questions=1):
    """Notes on 2-6 boxes among sentences of prose, then `questions` of them asked, a line each,
    about n_pieces pieces in all -> (the text up to the last answer, that answer, the depth of its
    note in the prose). asked: the (box, code) asked last (held out at evaluation)."""
    # as many notes and questions as fit: a note is 13 pieces, a question and its answer 24
    notes = [asked or box_code(rng, fraction)]
    count = max(2, min(rng.randint(2, 6), (n_pieces - 24 * questions) // 13))
    while len(notes) < count:
        box, code = box_code(rng, fraction)
        if box not in (b for b, _ in notes):
            notes.append((box, code))
    texts = [f"The code of box {box} is {code}." for box, code in notes]
    asks = [f"\nWhat is the code of box {box}? The code of box {box} is" for box, _ in notes]
    questions = min(questions, count)
    question = "".join(f"{ask} {code}." for ask, (_, code) in zip(asks[1:questions], notes[1:]))
    question += asks[0]  # the asked note's question last
    budget, prose = n_pieces - pieces(question) - sum(map(pieces, texts)), []
    while budget > 0:
        text = story(rng) if rng.random() < 0.5 else facts(rng)
        for sentence in re.findall(r'[^.!?]+[.!?]"?', text):
            budget -= pieces(sentence)
            if budget < 0:
                break
            prose.append(sentence.strip())
    for text in texts[1:] + texts[:1]:  # the asked note last: the others do not move it
        prose.insert(rng.randint(0, len(prose)), text)
    body = " ".join(prose)
    depth = pieces(body[:body.index(texts[0])]) / pieces(body)
    return body + question, str(notes[0][1]), depth


def retrieval_text(rng, count, shortest, longest, fraction):
    """Documents of shortest to longest pieces (answer included), ~count pieces in all. Every note
    is asked (as many notes as fit beside six questions: two in a short document), so that a good
    share of the loss is on looking codes up."""
    documents = []
    while count > 0:
        prompt, answer, _ = retrieval_document(rng, rng.randint(shortest, longest) - 5, fraction,
                                               questions=6)
        documents.append(f"{prompt} {answer}.")
        count -= pieces(documents[-1])
    return "\n\n".join(documents) + "\n"


def retrieval_eval(rng, context, per_length, fraction):
    """per_length held-out questions at each of RETRIEVAL_LENGTHS x context pieces (with answer)."""
    records = []
    for length in RETRIEVAL_LENGTHS:
        for _ in range(per_length):
            prompt, answer, depth = retrieval_document(rng, length * context - 5, fraction,
                                                       box_code(rng, fraction, held_out=True))
            records.append({"prompt": prompt, "answer": answer, "length": length,
                            "depth": round(depth, 3)})
    return records


def write_file(path, text):
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(args: Args):
    t0 = time.time()
    if args.retrieval and args.retrieval < 64:
        raise ValueError(f"--retrieval {args.retrieval}: at least 64 pieces (or 0 = none)")
    if not 0 < args.held_out < 1 or not 0 <= args.think_share <= 1:
        raise ValueError(f"--held-out must be between 0 and 1 (got {args.held_out}), "
                         f"--think-share in [0, 1] (got {args.think_share})")
    os.makedirs(args.out, exist_ok=True)
    frac = args.held_out

    def rng(name):  # one generator per file: a file does not change when another file's size does
        return random.Random(f"{args.seed}:{name}")

    def n(count):
        return max(1, round(count * args.scale))

    prefs_rng, prompts_rng, chat_rng = rng("prefs"), rng("prompts"), rng("chat")
    eval_rng, prefs_eval_rng = random.Random("eval"), random.Random("prefs_eval")  # at every seed
    steps_rng, steps_eval_rng = rng("steps"), random.Random("steps_eval")
    evals = held_out_problems(eval_rng, args.eval_per_family, frac)
    n_chats = round(CHAT_SHARE * n(args.sft))  # as many as sft.jsonl has, for distillation
    files = {
        "pretrain.txt": pretrain_text(rng("pretrain"), n(args.pretrain_bytes), frac),
        "pretrain_val.txt": pretrain_text(rng("pretrain_val"), n(args.pretrain_bytes * 0.05), frac),
        "sft.jsonl": jsonl(sft_records(rng("sft"), n(args.sft), frac, args.think_share)),
        "prefs.jsonl": jsonl(preference_record(prefs_rng, p)
                             for p in training_problems(prefs_rng, n(args.prefs), frac)),
        "prompts.jsonl": jsonl(prompt_record(prompts_rng, p)
                               for p in training_problems(prompts_rng, n(args.prompts), frac)),
        "chat.jsonl": jsonl(chat_conversation(chat_rng, thing_share=0.5) for _ in range(n_chats)),
        "eval.jsonl": jsonl(prompt_record(eval_rng, p) for p in evals),
        "prefs_eval.jsonl": jsonl(preference_record(prefs_eval_rng, p) for p in evals),
        "chat_eval.jsonl": jsonl(chat_eval_records()),
        "steps.jsonl": jsonl(step_record(steps_rng, p)
                             for p in training_problems(steps_rng, n(args.step_traces), frac)),
        "steps_eval.jsonl": jsonl(step_record(steps_eval_rng, p) for p in evals),
    }
    if args.retrieval:  # detail 9
        L, size = args.retrieval, n(RETRIEVAL_PIECES)
        files["retrieval.txt"] = retrieval_text(rng("retrieval"), size, L // 4, L, frac)
        files["retrieval_long.txt"] = retrieval_text(rng("retrieval_long"), size, L // 4,
                                                     PHASE2_LENGTH * L, frac)
        files["retrieval_eval.jsonl"] = jsonl(retrieval_eval(
            random.Random("retrieval_eval"), L, args.retrieval_eval, frac))
    for name, text in files.items():
        path = os.path.join(args.out, name)
        write_file(path, text)
        count = (f"{text.count(chr(10)):>7,} lines" if name.endswith(".jsonl")
                 else f"{text.count(chr(10) * 2) + 1:>7,} docs ")
        print(f"{path:<28} {count} {len(text.encode()) / 1e6:8.3f} MB")
    levels = collections.Counter((p.family, p.level) for p in evals)
    print("eval problems per family, levels 1/2/3: " + ", ".join(
        f"{f} {levels[f, 1]}/{levels[f, 2]}/{levels[f, 3]}" for f in FAMILIES))
    print(f"done in {time.time() - t0:.1f}s")


# ---- THE LABELER IN THE LOOP (iterative RL): the policy's own replies, judged by `prefer`

def worked_reply(record) -> str:
    """The labeler's own worked reply to a task record (the chosen side of prefs.jsonl)."""
    family, a, b = operands(record)
    return f"<think>{trace(family, a, b)}</think>{a + b if family == 'add' else a - b}"


def sampled_pairs(record, replies: list[str], worked: bool = True) -> list[dict]:
    """Preference pairs among the replies a policy sampled to `record`'s task (ppo.py / grpo.py
    --save-samples), with worked=True the labeler's worked_reply among them (so that a task every
    reply gets wrong gives pairs too): every two distinct non-empty replies the labeler does not
    tie, its preferred one chosen; "kind" says what is wrong with the rejected one."""
    replies = [worked_reply(record), *replies] if worked else replies
    distinct, pairs = list(dict.fromkeys(reply for reply in replies if reply.strip())), []
    for i, reply_a in enumerate(distinct):
        for reply_b in distinct[i + 1:]:
            label = prefer(record, reply_a, reply_b)
            if label == 0.5:
                continue
            chosen, rejected = (reply_a, reply_b) if label == 1.0 else (reply_b, reply_a)
            right, _, answered = rank(record, rejected)
            kind = "worse_work" if right else "wrong_answer" if answered else "no_answer"
            pairs.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
                          "family": record["family"], "kind": kind})
    return pairs


# a step as a trace writes it: a head, a bare answer, a column, the answer after </think>
STEP_FORM = re.compile(r"<think>[\d+\-:]*|-?\d+| \d[\d+\-=]*|</think>-?\d*")


def sampled_steps(record, replies: list[str], worked: bool = True) -> list[dict]:
    """Stepwise records of the replies a policy sampled to `record`'s task (with worked=True the
    labeler's worked_reply among them), each step judged by the labeler `judge_steps` (for
    reward.py --process): every distinct reply whose steps have a trace's form (STEP_FORM; other
    text, " +7" say, would not cut into steps at token boundaries)."""
    records = []
    for reply in dict.fromkeys([worked_reply(record), *replies] if worked else replies):
        steps = reply_steps(reply)
        if steps and all(STEP_FORM.fullmatch(step) for step in steps):
            records.append({"prompt": record["prompt"], "completions": steps,
                            "labels": judge_steps(record, steps), "family": record["family"]})
    return records


@dataclass
class LabelArgs:
    samples: str = "out/ppo_samples.jsonl"
    """sampled replies, {"prompt", "family", "replies": [str, ...]} a line (--save-samples)"""
    out: str = "out/prefs_sampled.jsonl"
    """the preference pairs, by `prefer` (for reward.py --data)"""
    eval_out: str = ""
    """if set, the pairs of every tenth prompt go here instead, held out (reward.py --eval-pairs):
    among the policy's own replies only"""
    steps: bool = False
    """write stepwise records (each step of each reply, and of the worked reply, judged) instead of
    pairs, for reward.py --process"""


def label(args: LabelArgs):
    """`python data.py label`: the labeler judges a policy's own replies, as pairs."""
    if not os.path.exists(args.samples):
        raise FileNotFoundError(f"{args.samples} not found: run ppo.py or grpo.py --save-samples")
    records = []
    with open(args.samples, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                operands(record)  # the labeler's reading of the task: "prompt" and "family"
                replies = record["replies"]
            except (ValueError, KeyError, TypeError, IndexError):
                replies = None
            if not (isinstance(replies, list) and all(isinstance(r, str) for r in replies)
                    and record["family"] in FAMILIES):
                raise ValueError(f"{args.samples}:{line_no}: not a task record with its replies, "
                                 "{\"prompt\", \"family\", \"replies\": [str, ...]}")
            records.append(record)
    split = {args.out: [], args.eval_out: []}
    for i, record in enumerate(records):
        held_out = bool(args.eval_out) and i % 10 == 9
        split[args.eval_out if held_out else args.out] += (
            sampled_steps(record, record["replies"], worked=not held_out) if args.steps
            else sampled_pairs(record, record["replies"], worked=not held_out))
    if not split[args.out]:
        raise ValueError(f"{args.samples}: no " + ("replies made of steps" if args.steps else
                                                   "pairs (every prompt's replies tie)"))
    replies = [(record, reply) for record in records for reply in record["replies"]]
    right = sum(rank(record, reply)[0] for record, reply in replies) / max(len(replies), 1)
    for path, pairs in split.items():
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_file(path, jsonl(pairs))
            kinds = collections.Counter(
                f"{sum(not x for x in pair['labels'])} wrong" if args.steps else pair["kind"]
                for pair in pairs)
            print(f"label | {len(pairs)} {'replies' if args.steps else 'pairs'} "
                  f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}) -> {path}")
    print(f"label | {len(records)} prompts, {len(replies)} replies, {right:.1%} right")


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


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["label"]:  # python data.py label --samples ... --out ...
            del sys.argv[1]
            label(parse_args(LabelArgs))
        else:
            main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
