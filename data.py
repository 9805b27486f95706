"""
data.py: the built-in "tiny world", deterministic procedurally generated datasets for every stage.

    python data.py                  # writes data/ at the default size (a few seconds)
    python data.py --scale 0.02     # a tiny world for tests (well under a second)
    python data.py --help           # every option with its default

Nothing is downloaded. For a given --seed and --scale every file is byte-identical on every run.

Files written (sizes at --scale 1; the eval files do not depend on --scale)
  pretrain.txt      ~4 MB of documents separated by a blank line: ~85 % skill lines in plain form
                    ("37 + 48 = 85"), ~15 % stories and facts from a small grammar; never the chat markup
  pretrain_val.txt  ~200 KB more documents of the same kind, for a validation loss
  sft.jsonl         20k {"messages", "family", "level"}: one task per conversation and the assistant
                    reply is exactly the answer; ~10 % open with a system message, ~5 % have a second
                    user turn, ~4 % are family "chat" (greetings, short stories) so the chat model talks
  prefs.jsonl       8k {"prompt", "chosen", "rejected", "family", "level", "kind"}
  prompts.jsonl     4k {"prompt", "answer", "family", "level"} for RL (PPO, GRPO)
  eval.jsonl        100 held-out problems per family, {"prompt", "answer", "family", "level"}
  prefs_eval.jsonl  one preference pair per eval problem, for held-out reward / DPO accuracy

Task families (FAMILIES), each at level 1 (easy) to 3 (hard), levels drawn uniformly:
  add      "What is 37 + 48?"                -> "85"     2+1 digits without a carry / with one / 2+2
  sub      "Compute 85 - 48."                -> "37"     2-1 digits without a borrow / with one / 2-2
  mul      "Multiply 7 by 36."               -> "252"    2..9 x 0..9 / 2..9 x 10..19 / 2..19 x 10..99
  reverse  "Write c a t backwards."          -> "t a c"  3 / 4 / 5 letters (a word or random letters)
  sort     "Sort these digits: 5 2 9"        -> "2 5 9"  3 / 4 / 5 digits, ascending
  count    "How many a are in b a n a n a?"  -> "3"      3-4 / 5-6 / 7-8 letters
Each family has four phrasings of the prompt and two plain forms for pretraining. A reply is
correct iff `reply.strip() == answer.strip()` (check_answer). With a 1k byte-level BPE that keeps
digits single: a task prompt is ~12 tokens (at most ~30), an answer ~4 (at most 13, + <|im_end|>),
a rejected reply at most ~80, a whole sft conversation at most ~100 before the chat template, and
pretrain.txt is ~1.5M tokens.

Implementation details
1. Letters and digits of the non-arithmetic tasks are written with spaces ("c a t"): a BPE tokenizer
   would merge "cat" into one token and hide its letters from the model.
2. Numbers are written plainly, most significant digit first. A small transformer learns addition
   faster with reversed digits (the carry then flows in reading order), but "85" is the answer a user
   expects. The price, measured with the CPU defaults (a 0.9M-parameter model, ~2M pretraining
   tokens): the letter and digit families are learned (after SFT: sort 59 %, count 30 %, reverse
   26 %, each falling with the level, e.g. reverse 73 / 6 / 0 %) while arithmetic stays at 1-2 %; a
   larger model or more steps (the GPU presets) is what arithmetic needs.
3. The held-out split: every problem has a canonical key, the same for trivially equal problems
   ("add:37:48" for 37 + 48 and 48 + 37; "sort:259" for every order of 2, 5, 9; "reverse:cat" for
   c a t and t a c). A key is held out iff sha256(key) falls in the first --held-out fraction (8 %)
   of the hash range, so the split is a fixed slice of each family's problem space whatever the
   seed. Eval files draw only held-out keys; every training generator (pretraining lines included)
   redraws them. A few level spaces are small (80 times-table facts, 220 sets of 3 digits), so eval
   has only a few problems there; the shortfall is drawn from the harder levels. (A held-out
   times-table fact is one the model has never seen: mul is the family that stays hard.)
4. Rejected replies are plausible failures (REJECT_KINDS): "format" (right answer with extra text),
   "rambling" (the answer buried in filler), "empty" (no answer), "wrong" (same shape, wrong value:
   one digit changed, letters not reversed, digits not sorted) and "off_by_one" (a number +-1, two
   neighbouring letters or digits swapped). 70 % can be told from the reply alone (a judge that
   never reads the prompt and flips a coin on the rest scores ~85 %); the other 30 % (wrong,
   off_by_one) needs the skill itself, which is what DPO and the reward model have to learn. With
   the CPU defaults the reward model judges those well only where the SFT model has the skill
   (sort ~90 %, arithmetic at chance), which caps it near 86 %, short of 90 %.
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
import sys
import time
from dataclasses import dataclass


@dataclass
class Args:
    out: str = "data"
    """directory the files are written to"""
    scale: float = 1.0
    """multiplies every training-set size (0.02 is a tiny world for tests); eval sizes do not scale"""
    seed: int = 0
    """seed of the generators (the held-out split does not depend on it)"""
    pretrain_bytes: int = 4_000_000
    """size of pretrain.txt in bytes at --scale 1 (pretrain_val.txt gets a twentieth of it)"""
    sft: int = 20_000
    """conversations in sft.jsonl at --scale 1"""
    prefs: int = 8_000
    """preference pairs in prefs.jsonl at --scale 1"""
    prompts: int = 4_000
    """RL prompts in prompts.jsonl at --scale 1"""
    eval_per_family: int = 100
    """held-out problems per family in eval.jsonl (and pairs in prefs_eval.jsonl)"""
    held_out: float = 0.08
    """fraction of every family's problem space kept out of training, for evaluation"""


def check_answer(reply: str, answer: str) -> bool:
    """The one correctness rule of every stage."""
    return reply.strip() == answer.strip()


def is_held_out(key: str, fraction: float) -> bool:
    # sha256, not hash(): Python salts string hashes per process, and the split must never move
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


# ----------------------------------------------------------------------------------------------
# TASK FAMILIES: one generator per family, (rng, level) -> Problem

@dataclass
class Problem:
    family: str
    level: int
    key: str      # canonical: the same for every trivially equal problem (detail 3)
    fields: dict  # what the prompt and plain-form templates fill in
    answer: str


ALPHABET = "abcdefghijklmnopqrstuvwxyz"
spaced = " ".join  # "cat" -> "c a t" (detail 1)


def number(rng, digits):
    """A number with exactly `digits` digits (one digit includes 0)."""
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def two_and_one_digits(rng, level, carry):
    """Level 1: a 2-digit and a 1-digit number whose ones digits do not carry (or borrow); level 2:
    the same shape with a carry (borrow); level 3: two 2-digit numbers."""
    if level == 3:
        return number(rng, 2), number(rng, 2)
    while True:
        a, b = number(rng, 2), number(rng, 1)
        if carry(a % 10, b) == (level == 2):
            return a, b


def make_add(rng, level):
    a, b = two_and_one_digits(rng, level, lambda x, y: x + y >= 10)
    a, b = rng.choice([(a, b), (b, a)])
    return Problem("add", level, f"add:{min(a, b)}:{max(a, b)}", {"a": a, "b": b}, str(a + b))


def make_sub(rng, level):
    a, b = two_and_one_digits(rng, level, lambda x, y: x < y)
    a, b = max(a, b), min(a, b)  # a >= b: results are never negative
    return Problem("sub", level, f"sub:{a}:{b}", {"a": a, "b": b}, str(a - b))


def make_mul(rng, level):
    a = rng.randrange(2, 20 if level == 3 else 10)
    b = [rng.randrange(10), rng.randrange(10, 20), number(rng, 2)][level - 1]
    a, b = rng.choice([(a, b), (b, a)])
    return Problem("mul", level, f"mul:{min(a, b)}:{max(a, b)}", {"a": a, "b": b}, str(a * b))


def letters_word(rng, length, real_word_prob):
    words = WORDS_BY_LENGTH.get(length)
    if words and rng.random() < real_word_prob:
        return rng.choice(words)
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def make_reverse(rng, level):
    word = letters_word(rng, level + 2, 0.5)
    key = f"reverse:{min(word, word[::-1])}"  # reversing "tac" is the same problem as reversing "cat"
    return Problem("reverse", level, key, {"letters": spaced(word)}, spaced(word[::-1]))


def make_sort(rng, level):
    digits = [str(rng.randrange(10)) for _ in range(level + 2)]
    key = "sort:" + "".join(sorted(digits))  # every order of the same digits has the same answer
    return Problem("sort", level, key, {"digits": spaced(digits)}, spaced(sorted(digits)))


def make_count(rng, level):
    length = rng.randint(*[(3, 4), (5, 6), (7, 8)][level - 1])
    if rng.random() < 0.3:
        word = letters_word(rng, length, 1.0)
    else:  # few distinct letters, so counts above 1 are common
        pool = rng.sample(ALPHABET, rng.randint(2, 4))
        word = "".join(rng.choice(pool) for _ in range(length))
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice(ALPHABET)  # sometimes 0
    fields = {"letter": letter, "letters": spaced(word)}
    return Problem("count", level, f"count:{letter}:{word}", fields, str(word.count(letter)))


GENERATORS = {"add": make_add, "sub": make_sub, "mul": make_mul,
              "reverse": make_reverse, "sort": make_sort, "count": make_count}
FAMILIES = list(GENERATORS)

# prompts never contain a one-letter word, so the letters of a task are easy to find in them
PROMPTS = {
    "add": ["What is {a} + {b}?", "{a} + {b} =", "Compute {a} + {b}.", "Add {a} and {b}."],
    "sub": ["What is {a} - {b}?", "{a} - {b} =", "Compute {a} - {b}.", "What is {a} minus {b}?"],
    "mul": ["What is {a} x {b}?", "{a} x {b} =", "Compute {a} times {b}.", "Multiply {a} by {b}."],
    "reverse": ["Reverse the letters: {letters}", "Write {letters} backwards.",
                "What is {letters} reversed?", "Spell {letters} in reverse order."],
    "sort": ["Sort these digits: {digits}", "Put {digits} in order, smallest first.",
             "Sort {digits} from smallest to largest.", "Arrange the digits {digits} in increasing order."],
    "count": ["How many {letter} are in {letters}?", "Count the letter {letter} in {letters}.",
              "How many times does {letter} appear in {letters}?", "Count how often {letter} occurs in {letters}."],
}
PLAIN = {  # the pretraining form: the skill without the chat format
    "add": ["{a} + {b} = {answer}", "{a} plus {b} equals {answer}"],
    "sub": ["{a} - {b} = {answer}", "{a} minus {b} equals {answer}"],
    "mul": ["{a} x {b} = {answer}", "{a} times {b} equals {answer}"],
    "reverse": ["the reverse of {letters} is {answer}", "{letters} backwards is {answer}"],
    "sort": ["{digits} sorted is {answer}", "in order, {digits} becomes {answer}"],
    "count": ["in {letters} the letter {letter} appears {answer} times", "{letters} has {letter} {answer} times"],
}


def render_prompt(rng, p):
    return rng.choice(PROMPTS[p.family]).format(**p.fields)


def render_plain(rng, p):
    return rng.choice(PLAIN[p.family]).format(**p.fields, answer=p.answer)


def sample_problem(rng, family, fraction):
    """A training problem of a random level: held-out keys are redrawn (detail 3)."""
    while True:
        p = GENERATORS[family](rng, rng.randint(1, 3))
        if not is_held_out(p.key, fraction):
            return p


def training_problems(rng, count, fraction):
    return [sample_problem(rng, rng.choice(FAMILIES), fraction) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# REJECTED REPLIES: plausible failures for the preference pairs (detail 4)

REJECT_KINDS = {"format": 0.3, "rambling": 0.2, "empty": 0.2, "wrong": 0.17, "off_by_one": 0.13}
FORMAT_REPLIES = ["The answer is {answer}.", "Answer: {answer}", "Sure! It is {answer}.",
                  "{answer}. Let me know if you need more help!", "It is {answer}, I think."]
FILLERS = ["let me think", "good question", "I must be careful", "step by step", "hmm"]
EMPTY_REPLIES = ["I don't know.", "?", "Hmm.", "I am not sure.", "I cannot answer that."]


def change_one(rng, answer):
    """Replace one digit or letter by another of the same kind (the first digit stays nonzero)."""
    i = rng.choice([i for i, c in enumerate(answer) if c != " "])
    pool = ALPHABET if answer[i].isalpha() else "123456789" if i == 0 and len(answer) > 1 else "0123456789"
    return answer[:i] + rng.choice(pool.replace(answer[i], "")) + answer[i + 1:]


def wrong_answer(rng, p):
    if p.family == "reverse" and p.fields["letters"] != p.answer:
        return p.fields["letters"]  # forgot to reverse
    if p.family == "sort" and p.fields["digits"] != p.answer:
        return p.fields["digits"]  # forgot to sort
    return change_one(rng, p.answer)


def off_by_one(rng, p):
    if p.answer.isdigit():
        return "1" if p.answer == "0" else str(int(p.answer) + rng.choice([-1, 1]))
    items = p.answer.split(" ")
    swaps = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not swaps:  # all the same ("7 7 7"): nothing to swap
        return change_one(rng, p.answer)
    i = rng.choice(swaps)
    items[i], items[i + 1] = items[i + 1], items[i]
    return " ".join(items)


def rejected_reply(rng, p):
    kind = rng.choices(list(REJECT_KINDS), weights=list(REJECT_KINDS.values()))[0]
    if kind == "format":
        return kind, rng.choice(FORMAT_REPLIES).format(answer=p.answer)
    if kind == "rambling":
        filler = rng.choice(FILLERS)
        return kind, f"Well, {filler}. " * rng.randint(1, 2) + f"Maybe it is {p.answer}, or maybe not, {filler}."
    if kind == "empty":
        return kind, rng.choice(EMPTY_REPLIES)
    return kind, (wrong_answer if kind == "wrong" else off_by_one)(rng, p)


# ----------------------------------------------------------------------------------------------
# PROSE: a small generative grammar, so a base model's samples read as language (no digits in it)

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
    "add": "{name} practices addition: add the two numbers and write the sum.",
    "sub": "{name} practices subtraction: take the second number away from the first.",
    "mul": "{name} practices multiplication: multiply the two numbers.",
    "reverse": "{name} practices spelling backwards: write the letters in reverse order.",
    "sort": "{name} practices sorting: put the digits in order, from smallest to largest.",
    "count": "{name} practices counting: how many times does the letter appear?"}
WORDS_BY_LENGTH = {}  # the prose words, reused as the words of the reverse and count tasks
for _word in sorted({*ANIMALS, *ADJECTIVES, *THINGS, *PLACES, *FEELINGS, *COLORS, "banana", "yellow"}):
    WORDS_BY_LENGTH.setdefault(len(_word), []).append(_word)


def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(rng, animal=None):
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
        f"{name} and {friend} {rng.choice(ACTIONS)} until the {rng.choice(['sun', 'moon'])} came up.",
    ]
    picked = [middle[i] for i in sorted(rng.sample(range(len(middle)), rng.randint(3, 5)))]
    return " ".join([f"Once upon a time, there was {a(adj)} {animal} named {name}.",
                     f"{name} lived near the {place}.", *picked,
                     f"In the end, {name} was {rng.choice(FEELINGS)} and went home."])


def facts(rng):
    def fact():
        kind = rng.randrange(5)
        if kind == 4:  # the words of the chat roles, so the tokenizer learns them as tokens
            return rng.choice(["The user asks and the assistant answers.", "The system tells the assistant what to do.",
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
    lines = [render_plain(rng, sample_problem(rng, family, fraction)) for _ in range(rng.randint(4, 16))]
    if rng.random() < 0.5:
        return "\n".join(lines)
    name = rng.choice(NAMES)
    return "\n".join([LESSONS[family].format(name=name), *lines, f"{name} checked every answer."])


def pretrain_text(rng, n_bytes, fraction):
    documents, size = [], 0
    while size < n_bytes:
        r = rng.random()
        document = story(rng) if r < 0.1 else facts(rng) if r < 0.15 else skill_document(rng, fraction)
        documents.append(document)
        size += len(document) + 2
    return "\n\n".join(documents) + "\n"  # documents are separated by a blank line


# ----------------------------------------------------------------------------------------------
# CONVERSATIONS AND RECORDS

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a careful assistant. Reply with the answer only.",
                  "Answer with just the result."]
GREETINGS = ["Hello!", "Hi.", "Good morning!", "Hey there."]
GREETING_REPLIES = ["Hello! How can I help you?", "Hi! Ask me a question.", "Hello! What shall we do today?"]
ABILITIES = ("I can add, subtract and multiply numbers, reverse letters, sort digits, count letters "
             "and tell short stories.")


def chat_conversation(rng):
    r = rng.random()
    if r < 0.3:
        user, reply = rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)
    elif r < 0.4:
        user, reply = rng.choice(["What can you do?", "How can you help me?"]), ABILITIES
    else:
        animal = rng.choice(list(ANIMALS))
        user = rng.choice(["Tell me a story.", f"Tell me a story about {a(animal)}.", "Write a short story."])
        reply = story(rng, animal)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def sft_records(rng, n, fraction):
    records = []
    for _ in range(n):
        if rng.random() < 0.04:
            records.append({"messages": chat_conversation(rng), "family": "chat"})
            continue
        family, messages, levels = rng.choice(FAMILIES), [], []
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(2 if rng.random() < 0.05 else 1):  # a second user turn, same family
            p = sample_problem(rng, family, fraction)
            messages += [{"role": "user", "content": render_prompt(rng, p)},
                         {"role": "assistant", "content": p.answer}]
            levels.append(p.level)
        records.append({"messages": messages, "family": family, "level": max(levels)})
    return records


def prompt_record(rng, p):
    return {"prompt": render_prompt(rng, p), "answer": p.answer, "family": p.family, "level": p.level}


def preference_record(rng, p):
    kind, rejected = rejected_reply(rng, p)
    return {"prompt": render_prompt(rng, p), "chosen": p.answer, "rejected": rejected,
            "family": p.family, "level": p.level, "kind": kind}


def held_out_problems(rng, per_family, fraction):
    """`per_family` distinct held-out problems per family, spread over the levels (detail 3)."""
    problems = []
    for family in FAMILIES:
        chosen = {}
        for level in (1, 2, 3):
            quota, found = (per_family - len(chosen)) // (4 - level), 0
            for _ in range(100 * quota):  # level 1 runs out of held-out keys: harder levels take the rest
                if found == quota:
                    break
                p = GENERATORS[family](rng, level)
                if is_held_out(p.key, fraction) and p.key not in chosen:
                    chosen[p.key], found = p, found + 1
        problems += chosen.values()
    return problems


def write_file(path, text):
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(args: Args):
    t0 = time.time()
    if not 0 < args.held_out < 1:
        raise ValueError(f"--held-out must be between 0 and 1, got {args.held_out}")
    os.makedirs(args.out, exist_ok=True)
    frac = args.held_out

    def rng(name):  # one generator per file: a file does not change when another file's size does
        return random.Random(f"{args.seed}:{name}")

    def n(count):
        return max(1, round(count * args.scale))

    prefs_rng, prompts_rng, eval_rng, prefs_eval_rng = rng("prefs"), rng("prompts"), rng("eval"), rng("prefs_eval")
    evals = held_out_problems(eval_rng, args.eval_per_family, frac)
    files = {
        "pretrain.txt": pretrain_text(rng("pretrain"), n(args.pretrain_bytes), frac),
        "pretrain_val.txt": pretrain_text(rng("pretrain_val"), n(args.pretrain_bytes * 0.05), frac),
        "sft.jsonl": jsonl(sft_records(rng("sft"), n(args.sft), frac)),
        "prefs.jsonl": jsonl(preference_record(prefs_rng, p) for p in training_problems(prefs_rng, n(args.prefs), frac)),
        "prompts.jsonl": jsonl(prompt_record(prompts_rng, p) for p in training_problems(prompts_rng, n(args.prompts), frac)),
        "eval.jsonl": jsonl(prompt_record(eval_rng, p) for p in evals),
        "prefs_eval.jsonl": jsonl(preference_record(prefs_eval_rng, p) for p in evals),
    }
    for name, text in files.items():
        path = os.path.join(args.out, name)
        write_file(path, text)
        count = f"{text.count(chr(10)):>7,} lines" if name.endswith(".jsonl") else f"{text.count(chr(10) * 2) + 1:>7,} docs "
        print(f"{path:<28} {count} {len(text.encode()) / 1e6:8.3f} MB")
    levels = collections.Counter((p.family, p.level) for p in evals)
    print("eval problems per family, levels 1/2/3: " + ", ".join(
        f"{f} {levels[f, 1]}/{levels[f, 2]}/{levels[f, 3]}" for f in FAMILIES))
    print(f"done in {time.time() - t0:.1f}s")


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


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
