"""
Byte-level BPE tokenizer (the GPT-2 / Qwen2 kind): train, encode, decode, chat template.
Special tokens, the pretraining text format; numpy and the standard library only.

    python tokenizer.py --data data/pretrain.txt --vocab-size 4096 --out out/tokenizer.json

    tok = Tokenizer.load("out/tokenizer.json")
    ids = tok.encode("Hello world!")     # list[int]; tok.decode(ids) == "Hello world!"
    arr = tok.encode_array(documents)    # np.uint16 array, documents joined by <|endoftext|>
    ids, mask = tok.encode_chat(messages)  # mask: 1 on the tokens of the assistant's replies
    corpus = tok.encode_array(documents, tok.text_tokens)  # a pretraining text with conversations

Ids 0..255 are the raw bytes, id 256+i is made by merges[i], then come the special tokens
<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>. `out/tokenizer.json` (and `to_dict()`,
stored in every checkpoint) holds the pattern, the special tokens and the merges in order.

Implementation details:
1. Pre-tokenization: Qwen2's pattern (no token crosses a word / space / punctuation boundary, one
   digit a piece) in stdlib `re`: a letter is `[^\\W\\d_]` minus the other numbers, which we list.
2. Training (Sennrich et al. 2016) counts the unique pieces once; a merge updates pair counts only
   in the words that contain the pair; the best pair comes from a lazy max-heap.
3. Tie rule: the highest count, then the smallest pair in Hugging Face's ByteLevel id order (bytes
   by their printable GPT-2 character, then merges in order), so the merges are the ones HF learns.
4. A pair that spells an existing token (two paths to one string) gives the words that token and
   records no merge, as Hugging Face does: tokens have distinct bytes.
5. Special tokens never take part in merges: training text is cut at them; `encode` treats text
   that looks like one as plain text unless `allowed_special` allows it.
6. Encoding merges, inside each piece, the pair whose merged bytes have the lowest id (tiktoken's
   rule); ids are cached per piece and per chunk; a piece over 256 bytes merges with a heap.
7. Decoding uses errors="replace": ids that cut a UTF-8 character give "\\ufffd", never an error.
   decode(encode(s)) == s for every str that UTF-8 can encode.
8. Chat template: ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n`, parts encoded apart so the
   mask is exact: 1 on assistant contents and their <|im_end|>; <think> </think> are special there.
9. `final_answer`, the one rule every stage scores with: a reply that starts with <think> answers
   with the text after the first </think> (None if it never closes), else the whole reply; stripped.
10. `read_documents`, the one pretraining reader: .txt files, documents separated by a blank line
   (the tokenizer trains on each file whole), or .jsonl files, one {"text": ...} per line. A
   pretraining text may hold conversations in the chat template: `text_tokens` (the template's and
   the think tokens) are special in it; <|endoftext|> is not (it joins the documents).
"""
import argparse
import ast
import dataclasses
import heapq
import inspect
import json
import multiprocessing
import os
import re
import sys
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # every tokenizer has these
THINK_TOKENS = ("<think>", "</think>")  # and, when trained here, these (an imported one may not)
CHAT_ROLES = ("system", "user", "assistant")

# detail 1: Qwen2's pattern for stdlib `re`:
# (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|
# \s+(?!\S)|\s+    (here the rare numbers outside the BMP count as letters)
_OTHER_NUMBERS = "".join(c for c in filter(str.isnumeric, map(chr, range(0x10000)))
                         if not c.isdecimal() and not c.isalpha())  # ²³ ½ Ⅻ ①... (BMP)
_SPACE = r"\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # but \r\n
_WS = _SPACE + r"\r\n"
_LETTER = rf"[^\W\d_{_OTHER_NUMBERS}]"
SPLIT_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",            # English contractions
    rf"[^\r\n\w]?{_LETTER}+|_{_LETTER}+",       # a word, after one space or mark ("_" is a mark)
    rf"[\d{_OTHER_NUMBERS}]",                   # one digit
    rf" ?(?:_|[^\w{_WS}])+[\r\n]*",             # punctuation, with the newlines after it
    rf"[{_WS}]*[\r\n]+",                        # newlines, with the spaces before them
    rf"[{_WS}]+(?![^{_WS}])",                   # spaces, leaving the last one to the next word
    rf"[{_WS}]+",
])
# detail 6: a chunk is [spaces] non-spaces [whitespace to its last newline]. No branch above runs
# on from a non-space into spaces (whitespace but \r \n), or from a newline into spaces and then a
# non-space, and none looks behind: text cut into chunks splits chunk by chunk into the same pieces.
_CHUNK_PATTERN = rf"[{_SPACE}]*[^{_WS}]+(?:[{_WS}]*[\r\n])?|[{_WS}]*[\r\n]|[{_WS}]+"

# detail 3: GPT-2's printable stand-ins for bytes; Hugging Face's ByteLevel alphabet is sorted so
_PRINTABLE_BYTES = [*range(33, 127), *range(161, 173), *range(174, 256)]
_HF_BYTE_ORDER = _PRINTABLE_BYTES + [b for b in range(256) if b not in _PRINTABLE_BYTES]
_BYTE_SORT_KEY = [_HF_BYTE_ORDER.index(b) for b in range(256)]
_BYTES = [bytes([b]) for b in range(256)]


class _Cache(dict):
    """A dict that computes a missing value with `fn`; hits stay C lookups in map(getitem)."""

    def __init__(self, fn, max_size=1 << 19):
        super().__init__()
        self.fn, self.max_size = fn, max_size

    def __missing__(self, key):
        if len(key) > 1024:  # a long chunk rarely repeats: computing it again is cheaper
            return self.fn(key)
        if len(self) >= self.max_size:  # bound the memory: at most max_size x 1 KB keys
            self.clear()
        value = self[key] = self.fn(key)
        return value


class Tokenizer:
    def __init__(self, merges, special_tokens=SPECIAL_TOKENS + THINK_TOKENS, pattern=SPLIT_PATTERN):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.vocab = list(_BYTES)  # id -> bytes
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} ({a}, {b}) uses an id that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id, the BPE rank
        if len(self.ranks) != len(self.vocab):
            raise ValueError("two merges make the same token, which training never does")
        if (not set(SPECIAL_TOKENS) <= set(special_tokens) or "" in special_tokens
                or len(set(special_tokens)) != len(special_tokens)):
            raise ValueError(f"special tokens must be distinct, non-empty and include "
                             f"{SPECIAL_TOKENS}, got {special_tokens}")
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(special_tokens)}
        self.vocab += [s.encode("utf-8") for s in special_tokens]
        self.vocab_size = len(self.vocab)
        self.eot_id, self.im_start_id, self.im_end_id = map(self.special_tokens.get, SPECIAL_TOKENS)
        # special in assistant text; think_id is None when the tokenizer has no think tokens
        self.think_tokens = tuple(s for s in THINK_TOKENS if s in self.special_tokens)
        # special in a pretraining text (detail 10): the chat template's and the think tokens
        self.text_tokens = ("<|im_start|>", "<|im_end|>", *self.think_tokens)
        self.think_id = self.special_tokens.get("<think>")
        self.pad_id = self.eot_id  # padding is always masked out, any id will do
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"bad split pattern: {e}") from None
        if compiled.groups:  # findall would return the groups, not the pieces
            raise ValueError("the split pattern must have no capturing groups: use (?:...)")
        self._split = compiled.findall
        # the chunk cut points hold for SPLIT_PATTERN only; another pattern splits the whole text
        self._chunks = re.compile(_CHUNK_PATTERN).findall if pattern == SPLIT_PATTERN else None
        self.dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)
        self._typecode = "H" if self.dtype == np.uint16 else "i"  # array module code of self.dtype
        self._piece_ids = _Cache(self._bpe)  # piece -> packed ids
        self._chunk_ids = _Cache(self._encode_chunk)  # chunk -> packed ids

    # ---------------------------------------------------------------------------------- encoding
    def _bpe(self, piece: str) -> bytes:
        """detail 6: merge the adjacent pair whose merged token has the lowest id, while any is."""
        data = piece.encode("utf-8")
        if data in self.ranks:  # frequent pieces are one token
            return self._pack([self.ranks[data]])
        if len(data) > 256:  # a long run of letters or marks (DNA, "=====..."): quadratic here
            return self._pack(self._bpe_long(data))
        ranks, none = self.ranks, 1 << 30
        parts = list(map(_BYTES.__getitem__, data))
        # pair_ranks[i]: the rank of parts[i] + parts[i + 1]
        pair_ranks = [ranks.get(a + b, none) for a, b in zip(parts, parts[1:])] + [none]
        while (best := min(pair_ranks)) != none:
            i = pair_ranks.index(best)  # the leftmost of equal ranks, as tiktoken
            parts[i] += parts.pop(i + 1)
            del pair_ranks[i]  # only the pairs around the merge change
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
            if i + 1 < len(parts):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
        return self._pack(map(ranks.__getitem__, parts))

    def _bpe_long(self, data: bytes) -> list:
        """The same merges in O(n log n): a heap of (rank, left part start, right part start) over
        a linked list of byte ranges; an entry whose parts have changed since is skipped."""
        ranks, n = self.ranks, len(data)
        # per part start: where it ends, the next part's start, the previous part's start
        end, after, before = list(range(1, n + 1)), list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(ranks[data[i:i + 2]], i, i + 1) for i in range(n - 1) if data[i:i + 2] in ranks]
        heapq.heapify(heap)  # (rank, left) order: the lowest rank, then the leftmost, as in _bpe
        while heap:
            rank, left, right = heapq.heappop(heap)
            if end[left] < 0 or after[left] != right or ranks.get(data[left:end[right]]) != rank:
                continue  # stale: one of the two parts was merged into something else meanwhile
            end[left], after[left], end[right] = end[right], after[right], -1  # right is dead
            if after[left] < n:
                before[after[left]] = left
            for a, b in ((before[left], left), (left, after[left])):  # the two new neighbour pairs
                if a >= 0 and b < n and (merged := ranks.get(data[a:end[b]])) is not None:
                    heapq.heappush(heap, (merged, a, b))
        parts, i = [], 0
        while i < n:
            parts.append(ranks[data[i:end[i]]])
            i = after[i]
        return parts

    def _pack(self, ids) -> bytes:
        return array(self._typecode, ids).tobytes()

    def _encode_chunk(self, text: str) -> bytes:
        pieces = self._split(text)
        if self._chunks is None and sum(map(len, pieces)) != len(text):  # another pattern: check
            raise ValueError(f"the split pattern {self.pattern!r} skips characters of "
                             f"{text[:40]!r}: text would be lost")
        return b"".join(map(self._piece_ids.__getitem__, pieces))

    def _encode_ordinary(self, text: str) -> bytes:
        """Packed ids of `text`, with no special tokens."""
        if self._chunks is None:
            return self._encode_chunk(text)
        return b"".join(map(self._chunk_ids.__getitem__, self._chunks(text)))

    def encode(self, text: str, allowed_special=()) -> list:
        """Ids of `text`; special tokens only where `allowed_special` ("all" or a set) allows."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if allowed - set(self.special_tokens):
            raise ValueError(f"unknown special tokens {sorted(allowed - set(self.special_tokens))}")
        parts = re.split(_special_regex(allowed), text) if allowed else [text]  # text, special, ...
        packed = [self._pack([self.special_tokens[p]]) if i % 2 else self._encode_ordinary(p)
                  for i, p in enumerate(parts)]
        return array(self._typecode, b"".join(packed)).tolist()

    def encode_array(self, text, allowed_special=()) -> np.ndarray:
        """Fast path for corpora: a str, or a list of documents joined by <|endoftext|>."""
        documents = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(doc, str) for doc in documents):
            raise ValueError("encode_array takes a str or a list of str")
        packed = bytearray(self._pack([self.eot_id])).join(
            self._pack(self.encode(doc, allowed_special)) if allowed_special
            else self._encode_ordinary(doc) for doc in documents)
        return np.frombuffer(packed, dtype=self.dtype)  # a writable array over the bytearray

    def decode(self, ids) -> str:
        """Text of `ids`; ids that cut a UTF-8 character decode to U+FFFD (detail 7)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), "
                             f"got {min(ids)}..{max(ids)}")
        return b"".join([self.vocab[i] for i in ids]).decode("utf-8", errors="replace")

    def count_bytes(self, ids) -> int:
        """UTF-8 bytes of the text that `ids` encode, the denominator of bits per byte; special
        tokens stand for no text and count 0 (<|endoftext|> is a boundary, not 13 bytes)."""
        ordinary = 256 + len(self.merges)
        return sum(len(self.vocab[i]) for i in np.asarray(ids).tolist() if i < ordinary)

    # ------------------------------------------------------------------------------------- chat
    def render_chat(self, messages, add_generation_prompt=False) -> str:
        """ChatML text of `messages` (detail 8)."""
        return render_chat(messages, add_generation_prompt)

    def encode_chat(self, messages, add_generation_prompt=False) -> tuple:
        """(ids, mask) of `messages`: mask is 1 on the assistant contents and their <|im_end|>."""
        ids, mask = [], []
        newline = self.encode("\n")
        for m in _check_messages(messages):
            header = [self.im_start_id] + self.encode(m["role"] + "\n")
            assistant = m["role"] == "assistant"
            body = (self.encode_reply(m["content"]) if assistant
                    else self.encode(m["content"]) + [self.im_end_id])
            ids += header + body + newline
            mask += [0] * len(header) + [int(assistant)] * len(body) + [0] * len(newline)
        if add_generation_prompt:
            header = [self.im_start_id] + self.encode("assistant\n")
            ids, mask = ids + header, mask + [0] * len(header)
        return ids, mask

    def encode_reply(self, content: str) -> list:
        """An assistant's reply as the model writes it (detail 8), then <|im_end|>."""
        return self.encode(content, self.think_tokens) + [self.im_end_id]

    def encode_prompt(self, prompt) -> list:
        """A prompt (a str is one user message), then `<|im_start|>assistant\\n`."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return self.encode_chat(prompt, add_generation_prompt=True)[0]

    # ---------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        return {"type": "byte-level-bpe", "pattern": self.pattern,
                "special_tokens": list(self.special_tokens),
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d) -> "Tokenizer":
        if not (isinstance(d, dict) and d.get("type") == "byte-level-bpe"
                and isinstance(d.get("pattern"), str) and isinstance(d.get("special_tokens"), list)
                and all(isinstance(s, str) for s in d["special_tokens"])
                and isinstance(d.get("merges"), list)
                and all(isinstance(m, list) and len(m) == 2 and all(type(i) is int for i in m)
                        for m in d["merges"])):
            raise ValueError("not a tokenizer: expected "
                             "{type: byte-level-bpe, pattern, special_tokens, merges}")
        return cls(d["merges"], tuple(d["special_tokens"]), d["pattern"])

    def save(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: run `python tokenizer.py --out {path}` first")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None

    # --------------------------------------------------------------------------------- training
    @classmethod
    def train(cls, text, vocab_size: int, special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
              processes: int = 1, verbose: bool = False) -> "Tokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from a str or a list of documents."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab size {vocab_size} is below 256 bytes + "
                             f"{len(special_tokens)} special tokens")
        cut = re.compile(_special_regex(special_tokens))  # detail 5: special tokens never merge
        documents = [part for doc in ([text] if isinstance(text, str) else text)
                     for part in cut.split(doc)[::2] if part]
        if not documents:
            raise ValueError("empty corpus: no text to train on")
        t0 = time.time()
        groups = [documents[i::processes] for i in range(min(processes, len(documents)))]
        if len(groups) > 1:  # counts are sums over documents: any split of them is exact
            with multiprocessing.Pool(len(groups)) as pool:
                word_counts = sum(pool.map(_count_pieces, groups), Counter())
        else:
            word_counts = _count_pieces(documents)
        if verbose:
            print(f"pre-tokenized: {len(word_counts):,} unique pieces in {time.time() - t0:.1f}s")
        word_counts = {w.encode("utf-8"): n for w, n in word_counts.items()}
        merges = _learn_merges(word_counts, n_merges, verbose)
        return cls(merges, special_tokens)


def render_chat(messages, add_generation_prompt=False) -> str:
    """ChatML text of `messages` (detail 8): what encode_chat encodes, and a pretraining text's
    conversations (detail 10)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in _check_messages(messages))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def final_answer(reply: str) -> str | None:
    """detail 9: the text after </think> if the reply starts with <think> (None if never closed),
    else the whole reply; stripped."""
    if not reply.lstrip().startswith("<think>"):
        return reply.strip()
    _, closed, answer = reply.partition("</think>")
    return answer.strip() if closed else None


def thinks(reply: str) -> bool:
    """Whether a reply thinks first (starts with <think>)."""
    return reply.lstrip().startswith("<think>")


def _special_regex(specials) -> str:
    """`(a|b|c)`, longest first so that a special token that starts another one can't cut it."""
    return "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"


def _check_messages(messages) -> list:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{role, content}} dicts, "
                         f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else m
        if not isinstance(m, dict) or role not in CHAT_ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a str, "
                             f"got {type(m.get('content')).__name__}")
    return messages


def _count_pieces(documents) -> Counter:
    """Counts of the pre-tokenized pieces; each unique chunk (detail 6) is split once."""
    chunk_counts = Counter(chunk for doc in documents for chunk in re.findall(_CHUNK_PATTERN, doc))
    split, piece_counts = re.compile(SPLIT_PATTERN).findall, defaultdict(int)
    for chunk, n in chunk_counts.items():
        for piece in split(chunk):
            piece_counts[piece] += n
    return Counter(piece_counts)


def _learn_merges(word_counts: dict, n_merges: int, verbose=False) -> list:
    """detail 2: the incremental BPE trainer; word_counts: {bytes: count} of the unique pieces."""
    words = [list(w) for w in word_counts]  # each word as a list of token ids, merged in place
    counts = list(word_counts.values())
    pair_counts = defaultdict(int)  # (left, right) -> occurrences, weighted by word counts
    where = defaultdict(set)  # (left, right) -> indices of the words that contain (or contained) it
    for i, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
            where[pair].add(i)
    sort_key = list(_BYTE_SORT_KEY)  # detail 3: the tie order of ids; each merged id appends itself
    heap = [(-n, sort_key[a], sort_key[b], a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    tokens, merges = list(_BYTES), []
    token_id = {t: i for i, t in enumerate(tokens)}
    while len(merges) < n_merges and heap:
        count, _, _, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if -count != current:  # stale: the pair lost occurrences since this entry was pushed
            if current > 0:
                heapq.heappush(heap, (-current, sort_key[a], sort_key[b], a, b))
            continue
        new = token_id.get(tokens[a] + tokens[b])  # detail 4: these bytes may already be a token
        if new is None:
            new = len(tokens)
            tokens.append(tokens[a] + tokens[b])
            token_id[tokens[new]] = new
            sort_key.append(new)
            merges.append((a, b))
        grown = set()
        for i in where.pop((a, b)):
            if a in words[i] and b in words[i]:  # C-speed skip of most words where the pair is gone
                _merge_word(words[i], a, b, new, counts[i], i, pair_counts, where, grown)
        del pair_counts[a, b]
        for left, right in grown:  # only pairs with the new token gain; stale ones are fixed on pop
            if pair_counts[left, right] > 0:
                heapq.heappush(heap, (-pair_counts[left, right], sort_key[left], sort_key[right],
                                      left, right))
        if verbose and new == len(tokens) - 1 and len(merges) % 1000 == 0:
            print(f"merge {len(merges)}/{n_merges}: {tokens[a]!r} + {tokens[b]!r} "
                  f"(count {-count:,})")
    return merges


def _merge_word(word, a, b, new, n, i, pair_counts, where, grown):
    """Replace each (a, b) in word i (count n), left to right, by `new`; update its neighbours."""
    j = 0
    while j < len(word) - 1:
        if word[j] == a and word[j + 1] == b:
            if j > 0:  # (left, a) becomes (left, new)
                left = word[j - 1]
                pair_counts[left, a] -= n
                pair_counts[left, new] += n
                where[left, new].add(i)
                grown.add((left, new))
            if j + 2 < len(word):  # (b, right) becomes (new, right)
                right = word[j + 2]
                pair_counts[b, right] -= n
                pair_counts[new, right] += n
                where[new, right].add(i)
                grown.add((new, right))
            word[j:j + 2] = [new]
        j += 1


def read_documents(paths, whole_files: bool = False) -> list[str]:
    """detail 10: the documents of .txt files (whole_files: a file is one document) and .jsonl
    files. Blank documents are dropped; a bad file or line is an error naming it."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    documents = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found or not a file: run `python data.py` first, "
                                    "or pass the path")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not path.endswith(".jsonl"):
            documents += [text] if whole_files else [d.strip("\n") for d in text.split("\n\n")]
            continue
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is text
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{line_no}: expected an object with a string "text"')
            documents.append(record["text"])
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"{', '.join(paths)}: the corpus is empty")
    return documents


# ------------------------------------------------------------------------------------------- CLI
@dataclass
class Args:
    data: list = dataclasses.field(default_factory=lambda: ["data/pretrain.txt"])
    """training text: .txt files (each trained on whole) or .jsonl files ({"text": ...} per line)"""
    vocab_size: int = 4096
    """vocab size: 256 bytes + merges + 5 special tokens (the chat three and <think>, </think>)"""
    out: str = "out/tokenizer.json"
    """where to write the tokenizer"""
    processes: int = 1
    """processes for pre-tokenization (documents are shared out between them)"""
    verbose: bool = False
    """print training progress"""


def parse_args(cls):
    """argparse from a dataclass: an option per field, the docstring its help, a list repeatable."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        flag, help = "--" + field.name.replace("_", "-"), docs.get(field.name)
        if field.type is list:  # no default here, where "extend" would add to it
            parser.add_argument(flag, nargs="+", action="extend", default=argparse.SUPPRESS,
                                help=f"{help} (default: {field.default_factory()})")
        else:
            kind = ({"action": argparse.BooleanOptionalAction} if field.type is bool else
                    {"type": field.type})
            parser.add_argument(flag, default=field.default, help=help, **kind)
    return cls(**vars(parser.parse_args()))


def main(args: Args):
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        raise ValueError(f"--out {args.out} is a directory: give a file name, e.g. "
                         f"{os.path.join(args.out, 'tokenizer.json')}")
    documents = read_documents(args.data, whole_files=True)
    start_time = time.time()
    tok = Tokenizer.train(documents, args.vocab_size, processes=args.processes,
                          verbose=args.verbose)
    train_time = time.time() - start_time
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    n_tokens = len(tok.encode_array(documents, tok.text_tokens)) - (len(documents) - 1)  # no EOTs
    tok.save(args.out)
    print(f"trained in {train_time:.1f}s | vocab {tok.vocab_size} ({len(tok.merges)} merges) | "
          f"{n_bytes / max(n_tokens, 1):.2f} bytes/token on {n_bytes / 1e6:.2f} MB | "
          f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main(parse_args(Args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
