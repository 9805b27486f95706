"""Tests of hf.py: export to / import from Hugging Face transformers directories. Tiny sizes: the whole
file runs in well under a minute on 2 CPU cores. Parity tests need transformers (skipped without it)."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf  # noqa: E402
from model import ModelConfig, Transformer, generate, load_checkpoint, save_checkpoint  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

HF_SAMPLE = ("The quick brown fox jumps over the lazy dog. It's 2024, isn't it? Prices: $3.50, 1,000,000 units.\n"
             "Größere Bäume wachsen langsam; façade, naïve café. Ελληνικά κείμενα. Русский текст тоже.\n"
             "日本語のテキストと中文文本，还有한국어. عربي وعبرית. emoji 🙂🚀 and   spaces\ttabs\n\n"
             "def f(x):\n    return x ** 2  # code\r\n")
HF_CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+3? Größe 🙂"},
           {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 7*6?\nThanks"}]
HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_tok():
    return Tokenizer.train(HF_SAMPLE * 3, vocab_size=400)


def hf_randomize(model, seed=0):
    """Random weights everywhere, norms and biases included, so parity checks where each tensor goes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def hf_checkpoint(tmp_path, tok, stage="sft", name="ckpt.pt", **overrides):
    config = ModelConfig(**{**HF_TINY, "vocab_size": tok.vocab_size, **overrides})
    model = hf_randomize(Transformer(config))
    path = str(tmp_path / name)
    save_checkpoint(path, model, tok, stage=stage)
    return path, model


def hf_logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


# ----------------------------------------------------------------------------- building blocks

def test_bytes_to_unicode_is_gpt2s_alphabet():
    table = hf.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    tokenizers = pytest.importorskip("tokenizers")
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_safetensors_fallback_reads_and_writes_the_format(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.tensor([True, False, True]), "e": torch.randn(2, 2).half(), "empty": torch.zeros(0, 4)}
    package = hf.safetensors_torch
    monkeypatch.setattr(hf, "safetensors_torch", None)  # the numpy/torch-only path
    hf.write_safetensors(tensors, str(tmp_path / "ours.safetensors"))
    back = hf.read_safetensors(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                                 for k, v in tensors.items())
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
    for text in HF_SAMPLE.splitlines(keepends=True) + [HF_SAMPLE, "", " ", "\n\n\n", "a  b", "x\r\n\r\ny"]:
        assert theirs.encode(text, add_special_tokens=False).ids == hf_tok.encode(text), text
    ids = hf_tok.encode("<|im_start|>hi<|im_end|>", allowed_special="all")
    assert theirs.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids == ids
    assert theirs.decode(hf_tok.encode(HF_SAMPLE), skip_special_tokens=False) == HF_SAMPLE


def test_tokenizer_json_follows_our_merge_rule_where_the_merge_list_would_not():
    """merges bc, ab, ab+c: "abc" encodes a + bc, then a + bc spells the token abc, which our rule
    (tiktoken's) merges though no merge (a, bc) was recorded. tokenizer.json must hold every split."""
    tokenizers = pytest.importorskip("tokenizers")
    a, b, c = b"abc"
    tok = Tokenizer([(b, c), (a, b), (257, c)])
    theirs = tokenizers.Tokenizer.from_str(json.dumps(hf.hf_tokenizer_json(tok)))
    for text in ["abc", "zabc", "abcabc", "zabcz abc"]:
        assert theirs.encode(text, add_special_tokens=False).ids == tok.encode(text), text
    assert tok.encode("zabc") == [ord("z"), 258]


def test_import_rebuilds_the_tokenizer_from_a_tiktoken_style_vocab():
    """Llama 3 style: every split of a token is a merge, ignore_merges; ids permuted. Same tokens as HF."""
    tokenizers = pytest.importorskip("tokenizers")
    rng = random.Random(0)  # words made of shared syllables: many tokens have several splits
    syllables = ["ka", "ri", "to", "ne", "sa", "mi", "lo", "pu"]
    words = " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000))
    tok = Tokenizer.train(HF_SAMPLE + words, vocab_size=500)
    tj = hf.hf_tokenizer_json(tok)
    vocab = tj["model"]["vocab"]
    merges = []
    for token in sorted(vocab, key=vocab.get):  # all splits, ordered by the rank of the token they make
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    assert len(merges) > len(vocab) - 256  # several merges per token
    order = sorted(vocab, key=lambda s: (len(s), s))[::-1]  # a layout unlike ours
    permuted = {s: i for i, s in enumerate(order)}
    specials = [{**t, "id": len(order) + i} for i, t in enumerate(tj["added_tokens"])]
    tj["model"].update(vocab=permuted, merges=[" ".join(m) for m in merges], ignore_merges=True)
    tj["added_tokens"] = specials
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = hf.LLAMA3_REGEX  # digits in runs of 1-3
    ours, sources = hf.tokenizer_from_hf(tj, "tokenizer.json")
    assert re.findall(ours.pattern, "x 12345") == ["x", " ", "123", "45"]
    theirs = tokenizers.Tokenizer.from_str(json.dumps(tj))
    for text in HF_SAMPLE.splitlines(keepends=True) + [HF_SAMPLE, words[:2000], "1 22 333 4444 55555 ½²"]:
        assert [sources[i] for i in ours.encode(text)] == theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.vocab_size == tok.vocab_size and sources[ours.im_end_id] == theirs.token_to_id("<|im_end|>")


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("architecture,overrides", [
    ("Qwen2ForCausalLM", dict()),                                               # tied embeddings
    ("LlamaForCausalLM", dict(attention_bias=False, tie_word_embeddings=False,  # no q/k/v bias, YaRN
                              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24)),
], ids=["qwen2", "llama-yarn", "qwen2-moe"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, hf_tok, architecture, overrides):
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
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == ours[0].tolist()


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
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == "Qwen2ForSequenceClassification" and theirs.config.num_labels == 1
    ids = hf_tok.encode("a reward for this reply")
    with torch.no_grad():
        score = theirs(torch.tensor([ids])).logits[0, 0]
        ours = model(torch.tensor([ids]))[0][0, -1]
    assert abs(score - ours) < 1e-4


# ----------------------------------------------------------------------------- import

def hf_save_model(tmp_path, tok, cls_name, tokenizer_json=None, **config):
    """A tiny random model saved by transformers, with a tokenizer.json (ours, unless given)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, cls_name)
    kwargs = dict(vocab_size=tok.vocab_size + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    torch.manual_seed(0)
    model = hf_randomize(cls(cls.config_class(**kwargs)))
    out = tmp_path / cls_name
    model.save_pretrained(str(out))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json or hf.hf_tokenizer_json(tok)), encoding="utf-8")
    return str(out), model


@pytest.mark.parametrize("cls_name,config", [
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=5e4, factor=4.0, original_max_position_embeddings=16))),
    ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, norm_topk_prob=True)),
], ids=["qwen2", "qwen2-yarn-untied", "llama", "qwen2-moe"])
def test_import_gives_the_same_logits_and_export_gives_back_the_weights(tmp_path, hf_tok, cls_name, config):
    directory, theirs = hf_save_model(tmp_path, hf_tok, cls_name, **config)
    out = str(tmp_path / "imported.pt")
    hf.import_hf(directory, out)
    model, ours_tok, ckpt = load_checkpoint(out, head="lm")
    assert ckpt["stage"] == "import" and ours_tok.to_dict() == hf_tok.to_dict()
    ids = hf_tok.encode(HF_SAMPLE)[:60]
    with torch.no_grad():
        assert (theirs(torch.tensor([ids])).logits[0] - hf_logits_of(model.eval(), ids)).abs().max() < 1e-4
    hf.export_hf(out, str(tmp_path / "again"))
    before = hf.read_safetensors(os.path.join(directory, "model.safetensors"))
    after = hf.read_safetensors(str(tmp_path / "again" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_import_permutes_rows_of_a_foreign_layout_and_adds_chat_tokens(tmp_path, hf_tok):
    """HF ids in another order (as Qwen2's), Llama-3-like special tokens without ChatML: rows follow the ids."""
    tokenizers = pytest.importorskip("tokenizers")
    tj = hf.hf_tokenizer_json(hf_tok)
    vocab = tj["model"]["vocab"]
    order = sorted(vocab, key=lambda s: (len(s) == 1 and s.isalpha(), s))  # letters last, bytes not first
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
    sources = [int(torch.where((their_embed == row).all(dim=1))[0][0]) for row in embed[:ours.vocab_size - 3]]
    assert [sources[i] for i in our_ids] == hf_ids
    with torch.no_grad():  # the same text, the same logits: ours are theirs with the columns in our order
        their_logits = theirs(torch.tensor([hf_ids])).logits[0]
    assert (hf_logits_of(model, our_ids)[:, :len(sources)] - their_logits[:, sources]).abs().max() < 1e-4
    assert list(ours.special_tokens)[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert torch.allclose(embed[ours.im_end_id], their_embed.mean(dim=0))
    assert model.config.vocab_size == their_embed.shape[0] + 3  # 6 padding rows kept at the end


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_a_one_line_error(tmp_path, hf_tok):
    pytest.importorskip("transformers")
    directory, _ = hf_save_model(tmp_path, hf_tok, "Qwen2ForCausalLM")

    def copy(config=None, remove=None, tokenizer_json=None):
        bad = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        bad.mkdir()
        for name in os.listdir(directory):
            (bad / name).write_bytes(open(os.path.join(directory, name), "rb").read())
        if config:
            (bad / "config.json").write_text(json.dumps({**json.load(open(bad / "config.json")), **config}))
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
        (copy(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), ValueError, "rope type llama3"),
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
    result = subprocess.run([sys.executable, os.path.join(ROOT, "hf.py"), "import", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "x.pt")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_sft_runs_on_an_imported_checkpoint(tmp_path, hf_tok):
    directory, _ = hf_save_model(tmp_path, hf_tok, "Qwen2ForCausalLM", tie_word_embeddings=True)
    hf.import_hf(directory, str(tmp_path / "imported.pt"))
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                             {"role": "assistant", "content": str(i + 1)}]}) + "\n")
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "1+2?", "answer": "3"}) + "\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--init", str(tmp_path / "imported.pt"),
                             "--data", str(tmp_path / "sft.jsonl"), "--eval-data", str(tmp_path / "eval.jsonl"),
                             "--out", str(tmp_path / "sft.pt"), "--steps", "2", "--batch-size", "4", "--warmup", "1",
                             "--max-new-tokens", "4"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    model, _, checkpoint = load_checkpoint(str(tmp_path / "sft.pt"))
    assert checkpoint["parent"] == str(tmp_path / "imported.pt")


def test_model_cli_export_then_import_round_trips(tmp_path, hf_tok):
    """`python model.py export` / `import` are the interop entry points: the weights come back exactly."""
    path, model = hf_checkpoint(tmp_path, hf_tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["export", path, str(tmp_path / "hf")], ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), *argv], capture_output=True, text=True,
                                cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr
    back, tokenizer, _ = load_checkpoint(str(tmp_path / "back.pt"))
    assert tokenizer.merges == hf_tok.merges
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "import", str(tmp_path / "nothing"), "--out",
                             str(tmp_path / "x.pt")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and not (tmp_path / "x.pt").exists()
