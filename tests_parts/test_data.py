# ---------------------------------------------------------------------------------------------
# data.py: the built-in tiny world
# ---------------------------------------------------------------------------------------------
# The answers and keys below are recomputed from the prompt text alone, independently of data.py,
# so a generator bug cannot hide behind its own helpers.
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # MERGE: test_all.py is at the root
sys.path.insert(0, ROOT)
import data  # noqa: E402

DATA_FILES = ["pretrain.txt", "pretrain_val.txt", "sft.jsonl", "prefs.jsonl", "prompts.jsonl",
              "eval.jsonl", "prefs_eval.jsonl"]
DATA_FAMILIES = ["add", "sub", "mul", "reverse", "sort", "count"]
DATA_TINY = ["--scale", "0.02"]


def data_generate(out_dir, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--out", str(out_dir), *flags],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def data_solve(family, prompt):
    """(canonical key, answer) of a task prompt, from its text alone."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    letters = [w for w in re.findall(r"[A-Za-z]+", prompt) if len(w) == 1]  # prompts have no one-letter words
    if family in ("add", "sub", "mul"):
        assert len(numbers) == 2, prompt
        a, b = numbers
        if family == "sub":
            assert a >= b, prompt
            return f"sub:{a}:{b}", str(a - b)
        return f"{family}:{min(a, b)}:{max(a, b)}", str(a + b if family == "add" else a * b)
    if family == "reverse":
        word = "".join(letters)
        assert 3 <= len(word) <= 7 and not numbers, prompt
        return f"reverse:{min(word, word[::-1])}", " ".join(reversed(letters))
    if family == "sort":
        digits = re.findall(r"\d", prompt)
        assert 3 <= len(digits) <= 7 and all(len(x) == 1 for x in re.findall(r"\d+", prompt)), prompt
        return "sort:" + "".join(sorted(digits)), " ".join(sorted(digits))
    if family == "count":
        target, word = letters[0], "".join(letters[1:])
        assert 3 <= len(word) <= 12 and not numbers, prompt
        return f"count:{target}:{word}", str(word.count(target))
    raise AssertionError(f"unknown family {family}")


# the plain forms of pretrain.txt: regex -> (family, inputs, answer) from the match groups
DATA_PLAIN = [
    (r"(\d+) (?:\+|plus) (\d+) (?:=|equals) (\d+)", lambda m: ("add", f"What is {m[1]} + {m[2]}?", m[3])),
    (r"(\d+) (?:-|minus) (\d+) (?:=|equals) (\d+)", lambda m: ("sub", f"What is {m[1]} - {m[2]}?", m[3])),
    (r"(\d+) (?:x|times) (\d+) (?:=|equals) (\d+)", lambda m: ("mul", f"What is {m[1]} x {m[2]}?", m[3])),
    (r"(?:the reverse of )?((?:[a-z] )+[a-z])(?: backwards)? is ((?:[a-z] )+[a-z])",
     lambda m: ("reverse", f"Reverse {m[1]}", m[2])),
    (r"(?:in order, )?((?:\d )+\d) (?:sorted is|becomes) ((?:\d )+\d)", lambda m: ("sort", f"Sort {m[1]}", m[2])),
    (r"the letter ([a-z]) appears (\d+) times in ((?:[a-z] )+[a-z])",
     lambda m: ("count", f"Count {m[1]} in {m[3]}", m[2])),
    (r"((?:[a-z] )+[a-z]) has (\d+) of the letter ([a-z])", lambda m: ("count", f"Count {m[3]} in {m[1]}", m[2])),
]


def data_pretrain_problems(text):
    """(family, key) of every skill line; fails on a line that looks like a skill but is not one."""
    problems = []
    for line in text.splitlines():
        if not re.search(r"\d|\b[a-z] [a-z]\b", line):
            continue  # prose
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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    data_generate(out, *DATA_TINY)
    return out


def test_data_is_deterministic(tiny_data, tmp_path):
    # a second process (string hashing salted differently) and an in-process run: byte-identical files
    data_generate(tmp_path / "again", *DATA_TINY)
    data.main(data.Args(out=str(tmp_path / "inproc"), scale=0.02))
    for name in DATA_FILES:
        first = (tiny_data / name).read_bytes()
        assert len(first) > 0
        assert first == (tmp_path / "again" / name).read_bytes(), name
        assert first == (tmp_path / "inproc" / name).read_bytes(), name
    # another seed gives other training data but never leaks the (seed-independent) held-out keys
    data_generate(tmp_path / "seed1", *DATA_TINY, "--seed", "1")
    assert (tmp_path / "seed1" / "sft.jsonl").read_bytes() != (tiny_data / "sft.jsonl").read_bytes()
    eval_keys = {data_solve(r["family"], r["prompt"])[0] for r in data_read(tiny_data, "eval.jsonl")}
    assert not eval_keys & {data_solve(r["family"], r["prompt"])[0] for r in data_read(tmp_path / "seed1", "prompts.jsonl")}


def test_data_records_have_fields_and_correct_answers(tiny_data):
    for name in ("prompts.jsonl", "eval.jsonl"):
        for r in data_read(tiny_data, name):
            assert set(r) == {"prompt", "answer", "family", "level"} and r["level"] in (1, 2, 3), r
            assert data_solve(r["family"], r["prompt"])[1] == r["answer"], r
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        for r in data_read(tiny_data, name):
            assert set(r) == {"prompt", "chosen", "rejected", "family", "level", "kind"}, r
            assert r["kind"] in data.REJECT_KINDS, r
            assert data_solve(r["family"], r["prompt"])[1] == r["chosen"], r
            assert r["rejected"].strip() != r["chosen"].strip() and r["rejected"].strip(), r
            assert not data.check_answer(r["rejected"], r["chosen"])
    sft = data_read(tiny_data, "sft.jsonl")
    assert {r["family"] for r in sft} == {*DATA_FAMILIES, "chat"}
    assert any(m["role"] == "system" for r in sft for m in r["messages"]), "no system prompt at all"
    assert any(len(r["messages"]) >= 4 for r in sft), "no multi-turn conversation at all"
    for r in sft:
        messages = r["messages"][1:] if r["messages"][0]["role"] == "system" else r["messages"]
        assert messages and [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), r
        for user, assistant in zip(messages[::2], messages[1::2]):
            assert assistant["content"].strip() and "<|" not in user["content"] + assistant["content"]
            if r["family"] != "chat":
                assert data_solve(r["family"], user["content"])[1] == assistant["content"], r


def test_data_pretraining_text(tiny_data):
    for name in ("pretrain.txt", "pretrain_val.txt"):
        text = data_read(tiny_data, name)
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            assert token not in text, f"chat markup {token!r} in {name}"
        documents = text.split("\n\n")
        assert all(document.strip() for document in documents)
        families = {family for family, _key in data_pretrain_problems(text)}  # also checks every skill line
        if name == "pretrain.txt":
            assert families == set(DATA_FAMILIES)
            assert any(document.startswith("Once upon a time") for document in documents)


def test_data_held_out_split_is_disjoint(tiny_data):
    evals = data_read(tiny_data, "eval.jsonl")
    eval_prompts = {r["prompt"] for r in evals}
    eval_keys = {data_solve(r["family"], r["prompt"])[0] for r in evals}
    train_prompts = {r["prompt"] for name in ("prefs.jsonl", "prompts.jsonl") for r in data_read(tiny_data, name)}
    train_keys = {data_solve(r["family"], r["prompt"])[0]
                  for name in ("prefs.jsonl", "prompts.jsonl") for r in data_read(tiny_data, name)}
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
    # and the plain rendering of an eval sum, difference or product appears nowhere in the pretraining text
    text = data_read(tiny_data, "pretrain.txt") + data_read(tiny_data, "pretrain_val.txt")
    operator = {"+": "add", "plus": "add", "-": "sub", "minus": "sub", "x": "mul", "times": "mul"}
    seen = {(operator[op], int(a), int(b))
            for a, op, b in re.findall(r"(?<!\d)(\d+) (\+|plus|-|minus|x|times) (\d+) (?:=|equals)", text)}
    for r in evals:
        if r["family"] in ("add", "sub", "mul"):
            a, b = map(int, re.findall(r"\d+", r["prompt"]))
            orders = [(a, b)] if r["family"] == "sub" else [(a, b), (b, a)]
            assert not any((r["family"], x, y) in seen for x, y in orders), r["prompt"]
    # prefs_eval is built from eval problems only
    for r in data_read(tiny_data, "prefs_eval.jsonl"):
        assert data_solve(r["family"], r["prompt"])[0] in eval_keys


def test_data_eval_covers_every_family_and_level(tiny_data):
    evals = data_read(tiny_data, "eval.jsonl")
    assert data.FAMILIES == DATA_FAMILIES
    assert len(data_read(tiny_data, "prefs_eval.jsonl")) == len(evals)
    for family in DATA_FAMILIES:
        rows = [r for r in evals if r["family"] == family]
        assert len(rows) == 100, family
        assert len({data_solve(family, r["prompt"])[0] for r in rows}) == 100, f"{family}: repeated problems"
        assert {r["level"] for r in rows} == {1, 2, 3}, family


def test_data_split_rule_and_check_answer():
    assert data.check_answer(" 85\n", "85") and not data.check_answer("85.", "85")
    # the split is a fixed ~8 % slice of a problem space, by sha256 of the key
    keys = [f"add:{a}:{b}" for a in range(100) for b in range(a, 100)]
    share = sum(data.is_held_out(k, 0.08) for k in keys) / len(keys)
    assert 0.06 < share < 0.10, share
    assert data.is_held_out("add:37:48", 0.08) == data.is_held_out("add:37:48", 0.08)
