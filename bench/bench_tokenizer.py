"""
Benchmark tokenizer.py against Hugging Face `tokenizers` and `tiktoken` on ~5 MB of real text and
code (Python's own standard library: .rst/.txt files and every 6th .py file in sorted order, built
at run time).

    python bench/bench_tokenizer.py            # about a minute on 2 cores

Prints, side by side: training time at vocab 4096 and 16384 (ours vs HF ByteLevel BPE with the same
split pattern and one thread; wall clock, and the ratio in CPU time, which other processes on the
machine disturb less), whether the merges are identical, bytes per token of both, and encoding speed
per CPU second (ours from an empty cache, tiktoken loaded with our merges, HF on one string; then
ours on the same text again, every chunk cached: an upper bound, not a comparison).
"""
import json
import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before importing tokenizers: one thread, as ours
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402

from tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_corpus(target_bytes=5_000_000):
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        paths += [os.path.join(folder, f) for f in files if f.endswith((".py", ".rst", ".txt"))]
    paths.sort()
    texts = ([p for p in paths if not p.endswith(".py")]
             + [p for p in paths if p.endswith(".py")][::6])
    documents, size = [], 0
    for path in texts:
        try:
            with open(path, encoding="utf-8") as f:
                documents.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
        size += len(documents[-1].encode("utf-8"))
        if size >= target_bytes:
            break
    return documents, root


def hf_train(documents, vocab_size):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok


def hf_merges_as_bytes(hf_tok):
    """HF merges are pairs of GPT-2 printable strings; map them back to bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char = {b: chr(b) for b in printable}
    char.update({b: chr(256 + n)
                 for n, b in enumerate(b for b in range(256) if b not in printable)})
    byte_of = {c: b for b, c in char.items()}
    merges = json.loads(hf_tok.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return [(bytes(map(byte_of.get, a)), bytes(map(byte_of.get, b))) for a, b in merges]


def timed(fn):
    """fn's result, wall-clock seconds and CPU seconds (less noisy when others share the
    machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main():
    documents, root = build_corpus()
    text = "\n".join(documents)
    n_bytes = len(text.encode("utf-8"))
    mb = n_bytes / 1e6
    print(f"load average {os.getloadavg()[0]:.1f} | corpus: {mb:.2f} MB, {len(documents)} files "
          f"of {root} | Python {sys.version.split()[0]}, tokenizers {tokenizers.__version__}, "
          f"tiktoken {tiktoken.__version__}, {os.cpu_count()} cpus")
    rows = []
    for vocab_size in (4096, 16384):
        runs = {"ours": [], "hf": []}
        for side in ("ours", "hf", "hf", "ours"):  # interleaved, each side first once; best of 2
            runs[side].append(timed(lambda: Tokenizer.train(documents, vocab_size)
                                    if side == "ours" else hf_train(documents, vocab_size)))
        (ours, ours_time, ours_cpu), (hf, hf_time, hf_cpu) = (
            min(runs[s], key=lambda r: r[1]) for s in ("ours", "hf"))
        same = [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges] == hf_merges_as_bytes(hf)
        ranks = {ours.vocab[i]: i for i in range(256 + len(ours.merges))}
        tik = tiktoken.Encoding("ours", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                                special_tokens=ours.special_tokens)
        fresh = Tokenizer.from_dict(ours.to_dict())  # empty caches
        # encoding speeds use CPU time: all four run on one thread, and CPU time is what the code
        # costs; ours and tiktoken both return a numpy array of the ids
        ids, _, cold = timed(lambda: fresh.encode_array(text))
        _, _, warm = timed(lambda: fresh.encode_array(text))
        tik_ids, _, tik_time = timed(lambda: tik.encode_to_numpy(text, disallowed_special=()))
        hf_enc, _, hf_enc_time = timed(lambda: hf.encode(text))
        rows.append(dict(vocab=vocab_size, ours_time=ours_time, hf_time=hf_time, same=same,
                         cpu_ratio=ours_cpu / hf_cpu,
                         ours_bpt=n_bytes / len(ids), hf_bpt=n_bytes / len(hf_enc.ids),
                         cold=mb / cold, warm=mb / warm, tik=mb / tik_time, hf_enc=mb / hf_enc_time,
                         same_ids=ids.tolist() == tik_ids.tolist()))

    print("\ntraining, 1 process      ours      HF        ours/HF (goal <= 1.5x)   in CPU time   "
          "merges identical to HF")
    for r in rows:
        print(f"  vocab {r['vocab']:<6}         {r['ours_time']:6.2f} s  {r['hf_time']:6.2f} s  "
              f"{r['ours_time'] / r['hf_time']:5.2f}x"
              f"                  {r['cpu_ratio']:5.2f}x        {'yes' if r['same'] else 'NO'}")
    print("\nbytes per token          ours      HF        difference (goal within 2 %)")
    for r in rows:
        print(f"  vocab {r['vocab']:<6}         {r['ours_bpt']:6.3f}    {r['hf_bpt']:6.3f}    "
              f"{100 * (r['ours_bpt'] / r['hf_bpt'] - 1):+.2f} %")
    print("\nencoding, MB/s (of CPU time), 1 process   vocab 4096   vocab 16384")
    for name, key in [("ours, empty cache (one pass)", "cold"), ("tiktoken with our merges", "tik"),
                      ("HF tokenizers, one string (+ offsets)", "hf_enc"),
                      ("ours, the same text again (all cached)", "warm")]:
        print(f"  {name:<40} {rows[0][key]:6.1f}       {rows[1][key]:6.1f}")
    same_ids = ", ".join("yes" if r["same_ids"] else "NO" for r in rows)
    print(f"  ids identical to tiktoken: {same_ids}")


if __name__ == "__main__":
    main()
