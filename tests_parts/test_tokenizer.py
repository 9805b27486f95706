"""Tests of tokenizer.py (merged into test_all.py later)."""
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

SAMPLE = """The quick brown fox doesn't jump; it's 12345 steps away, isn't it? We'LL see: 3.14 + 2 = 5.14
    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text if c.isalnum()]  # __init__, _private, x_1
Grüße aus München! Die Straße ist schön, Mädchen und Jungen lächeln.
À l'été, où ça? Ça coûte 10 € — c'est très élevé… «Bien sûr».
你好，世界。日本語のテキストを書きます。한국어 문장도 있습니다.
Emoji: 😀👍🏽👨‍👩‍👧 🎉🚀 ✅, numbers ²³ ½ Ⅻ ① ٣٤٥ ۱۲, fullwidth １２３.
Combining: e\u0301 a\u0308 n\u0303; tabs\tand   spaces   \n\n\n  trailing   \r\nwindows\r\n
"""


def corpus():
    with open(os.path.join(ROOT, "tokenizer.py"), encoding="utf-8") as f:
        return [SAMPLE * 4, f.read()[:20000], SAMPLE.upper()]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus(), vocab_size=256 + 3 + 500)


def random_text(rng, n):
    pools = ["abcxyzABCXYZ", "0123456789", " ", "  \t", "\n", "\r\n", "\r\x0b\x0c", "\u3000\xa0\u2003",
             ".,;:!?'\"()[]{}<>|-_=+*/\\#@$%^&~`", "'s'S'll'LL're", "你好世界日本語한국어", "😀👍🏽👨‍👩‍👧🎉",
             "e\u0301a\u0308\u0303\u20dd", "²³½Ⅻ①٣۱１𝟘𐄇", "\x00\x1c\x1f\x7f\x85\u2028", "ſK",
             "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    parts = []
    for _ in range(n):
        if rng.random() < 0.1:  # any code point UTF-8 can encode (no lone surrogates)
            c = rng.randrange(0x110000)
            parts.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        else:
            pool = rng.choice(pools)
            parts.append(pool if pool.startswith("<|") else "".join(rng.choice(pool) for _ in range(rng.randint(1, 4))))
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
    from tokenizer import _CHUNK_PATTERN
    unchunked = Tokenizer(tok.merges, pattern=f"(?:{SPLIT_PATTERN})")  # same pattern, no chunk cache
    rng = random.Random(1)
    for _ in range(500):
        text = random_text(rng, rng.randint(0, 30))
        chunked = [p for chunk in re.findall(_CHUNK_PATTERN, text) for p in re.findall(SPLIT_PATTERN, chunk)]
        assert chunked == re.findall(SPLIT_PATTERN, text)
        assert "".join(chunked) == text
        assert tok.encode(text) == unchunked.encode(text)


def gpt2_chars():
    """GPT-2's bytes_to_unicode: byte -> the printable character that stands for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char = {b: chr(b) for b in printable}
    char.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    return char


def hf_byte_order():
    """Bytes sorted by their GPT-2 character: Hugging Face's ByteLevel alphabet (id) order."""
    return sorted(range(256), key=gpt2_chars().get)


def naive_train(documents, n_merges):
    """Reference trainer: recount every pair after every merge; max count, ties -> smallest pair in HF order."""
    specials = "|".join(map(re.escape, SPECIAL_TOKENS))  # never trained on
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
    fast = Tokenizer.train(documents, vocab_size=256 + 3 + 150)
    assert fast.merges == naive_train(documents, 150)


def test_merges_match_huggingface():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    # Hugging Face trains on special-token text too; we cut it out, so give both the cut documents
    documents = [part for doc in corpus() for part in re.split("|".join(map(re.escape, SPECIAL_TOKENS)), doc)]
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=256 + 3 + 300, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ours = Tokenizer.train(documents, vocab_size=256 + 3 + 300)
    hf_merges = json.loads(hf.to_str())["model"]["merges"]
    hf_merges = [m.split(" ") if isinstance(m, str) else m for m in hf_merges]
    byte_of = {c: b for b, c in gpt2_chars().items()}
    as_bytes = [(bytes(map(byte_of.get, a)), bytes(map(byte_of.get, b))) for a, b in hf_merges]
    assert [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges] == as_bytes


def test_tiktoken_parity_with_original_pattern(tok):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
    enc = tiktoken.Encoding("ours", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
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
    assert tok.vocab_size == 256 + len(tok.merges) + 3 and tok.pad_id == tok.eot_id
    assert [tok.eot_id, tok.im_start_id, tok.im_end_id] == list(range(tok.vocab_size - 3, tok.vocab_size))
    with pytest.raises(ValueError):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_encode_array(tok):
    docs = ["first doc", "second <|endoftext|> doc", "третий"]
    arr = tok.encode_array(docs)
    assert arr.dtype == np.uint16 and arr.flags.writeable
    assert arr.tolist() == tok.encode(docs[0]) + [tok.eot_id] + tok.encode(docs[1]) + [tok.eot_id] + tok.encode(docs[2])


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
        assert tok.decode(ids[:i]).endswith("<|im_start|>assistant\n") and ids[j - 1] == tok.im_end_id
        assert tok.decode(ids[j:j + 1]) == "\n" and mask[j] == 0
    ids2, mask2 = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert tok.decode(ids2).endswith("<|im_end|>\n<|im_start|>assistant\n") and sum(mask2) == 0
    assert tok.encode_prompt(messages[:2]) == ids2
    assert tok.encode_prompt("2+3?") == tok.encode_chat([{"role": "user", "content": "2+3?"}], True)[0]
    assert tok.render_chat(messages[:1], add_generation_prompt=True) == \
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>assistant\n"


def _runs(mask):
    start = None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            yield start, i
            start = None


@pytest.mark.parametrize("messages", [[{"role": "bot", "content": "hi"}], [{"role": "user"}],
                                      [{"role": "user", "content": 3}], [("user", "hi")], {"role": "user"}])
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
    good = {"type": "byte-level-bpe", "pattern": SPLIT_PATTERN, "special_tokens": list(SPECIAL_TOKENS), "merges": []}
    for content in ["{not json", "[1, 2]", json.dumps({**good, "special_tokens": []}),
                    json.dumps({**good, "merges": [[300, 1]]}), json.dumps({**good, "merges": [[1, 2, 3]]}),
                    json.dumps({**good, "pattern": "("})]:
        path = tmp_path / "bad.json"
        path.write_text(content)
        with pytest.raises(ValueError) as e:
            Tokenizer.load(str(path))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing.json"))


def test_training_with_processes_is_exact():
    documents = [SAMPLE, corpus()[1][:5000], SAMPLE.upper(), "x <|im_start|> y"]
    one = Tokenizer.train(documents, vocab_size=400)
    assert Tokenizer.train(documents, vocab_size=400, processes=2).merges == one.merges
    assert all(b"<|" not in t for t in one.vocab[:256 + len(one.merges)])  # special tokens never merged


def test_cli(tmp_path):
    out = tmp_path / "tok.json"
    cmd = [sys.executable, os.path.join(ROOT, "tokenizer.py"), "--out", str(out), "--vocab-size", "300"]
    r = subprocess.run(cmd + ["--data", str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    (tmp_path / "a.txt").write_text(SAMPLE)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    r = subprocess.run(cmd + ["--data", str(tmp_path / "a.txt"), "--data", str(tmp_path / "b.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "bytes/token" in r.stdout
    assert Tokenizer.load(str(out)).vocab_size == 300
