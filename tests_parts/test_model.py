"""Tests of model.py: parity with Hugging Face transformers, generation invariants, the chunked loss,
checkpoints and the CLI. Tiny sizes: the whole file runs in well under a minute on 2 CPU cores."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = HERE if os.path.exists(os.path.join(HERE, "model.py")) else os.path.dirname(HERE)  # tests_parts/ or merged
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
from model import (ModelConfig, Transformer, completion_logprobs, completion_values, format_accuracy,  # noqa: E402
                   generate, heldout_accuracy, left_pad, load_checkpoint, right_pad, save_checkpoint, sequence_scores)
from tokenizer import Tokenizer  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # random norms and biases, so a parity test also checks where they go
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def hf_kwargs(cfg):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling["factor"],
                "original_max_position_embeddings": cfg.rope_scaling["original_max_position_embeddings"]}
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope,
                attn_implementation="eager", pad_token_id=0)


def copy_into(hf, ours):
    result = hf.load_state_dict(ours.state_dict(), strict=True)  # key for key, same shapes
    assert not result.missing_keys and not result.unexpected_keys
    return hf.eval()


def shifted(ids):  # HF labels -> our next-token targets
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("overrides", [
    dict(),                                                                 # GQA, QKV bias, tied
    dict(tie_word_embeddings=False, num_key_value_heads=4),                 # untied, MHA
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
], ids=["gqa-bias-tied", "untied-mha", "yarn"])
def test_qwen2_logits_and_loss_match_transformers(overrides):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(**overrides)
    hf = copy_into(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_kwargs(ours.config))), ours)
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
    hf = copy_into(transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs(ours.config))), ours)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_qwen2_moe(norm_topk_prob):
    transformers = pytest.importorskip("transformers")
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48,
               norm_topk_prob=norm_topk_prob, router_aux_loss_coef=0.1)
    ours = tiny_model(**moe)
    kwargs = {**hf_kwargs(ours.config), **moe, "output_router_logits": True}
    hf = copy_into(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**kwargs)), ours)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        torch.testing.assert_close(ours(ids)[0], out.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids, shifted(ids))[1], out.loss, atol=1e-5, rtol=0)  # CE + 0.1 * aux


def test_moe_without_shared_expert_matches_mixtral():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, attention_bias=False)
    kwargs = {**hf_kwargs(ours.config), "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 24}
    hf = copy_into(transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)), ours)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


def test_load_balancing_loss_by_hand():
    # uniform router: P_e = 1/4; top-2 of tied probs picks experts 0 and 1: f = (1, 1, 0, 0); aux = 4 * 0.5 = 2
    assert M.load_balancing_loss([torch.zeros(6, 4)], top_k=2).item() == pytest.approx(2.0)
    # padding rows (mask 0) do not count
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 9.0]])
    assert M.load_balancing_loss([logits], 1, torch.tensor([1, 0])).item() == pytest.approx(
        4 * torch.softmax(logits[0], -1)[0].item())


def test_padded_batch_matches_transformers_and_unpadded():
    transformers = pytest.importorskip("transformers")
    ours = tiny_model()
    hf = copy_into(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_kwargs(ours.config))), ours)
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
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
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
        per_token = completion_values(ours, prompt_ids, prompt_mask, completion_ids, completion_mask)
        torch.testing.assert_close(per_token[1, 2], values[1, -2])   # predicts the last completion token
        assert per_token[0, 2] == 0                                 # padding


def test_param_count_flops_and_optimizer_groups():
    # per layer: q 32*32+32, k and v 32*16+16 each, o 32*32, mlp 3*32*64, two norms 32 each = 9344
    per_layer = 1056 + 528 + 528 + 1024 + 6144 + 64
    tied, untied = tiny_model(), tiny_model(tie_word_embeddings=False)
    assert tied.num_params() == tied.num_params(non_embedding=False) == 2 * per_layer + 32 + 97 * 32
    assert untied.num_params(non_embedding=False) == 2 * per_layer + 32 + 2 * 97 * 32
    assert untied.num_params() == 2 * per_layer + 32 + 97 * 32  # the lm head counts, the lookup does not
    assert tied.flops_per_token(64) == 6 * tied.num_params() + 12 * 2 * 32 * 64
    assert tied.estimate_mfu(1000.0, 1e12) == pytest.approx(tied.flops_per_token(64) * 1000 / 1e12)
    moe = tiny_model(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8)
    routed = 2 * 4 * 3 * 32 * 8
    assert moe.flops_per_token(0) == 6 * (moe.num_params() - routed * 3 / 4)
    decay, no_decay = untied.configure_optimizer(1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7 + 1  # + lm_head
    assert any(p is untied.model.embed_tokens.weight for p in no_decay["params"])


# ----------------------------------------------------------------------------- the chunked loss

def test_chunked_cross_entropy_equals_naive(monkeypatch):
    monkeypatch.setattr(M, "CHUNK_LOGITS", 97 * 7)  # 7 rows a chunk: many chunks, a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    targets[::3] = -100
    loss = M.chunked_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(3 * loss, (hidden, weight))
    naive = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    naive_grads = torch.autograd.grad(3 * naive, (hidden, weight))
    torch.testing.assert_close(loss, naive)
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n)
    with torch.no_grad():  # no grad mode: loss only
        torch.testing.assert_close(M.chunked_cross_entropy(hidden, weight, targets), naive)


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_gradients_equal_naive(monkeypatch, tied):
    monkeypatch.setattr(M, "CHUNK_LOGITS", 97 * 16)
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


# ----------------------------------------------------------------------------- generation

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


def test_sampling_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 10, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, 10, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompts, 10, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    greedy, _, _ = generate(model, prompts, 10, temperature=0)
    top1, logp, _ = generate(model, prompts, 10, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, top1)
    assert torch.allclose(logp, torch.zeros_like(logp))  # a one-token distribution


def test_sample_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for top_k, top_p, allowed in [(2, 1.0, {0, 1}), (0, 0.7, {0, 1}), (0, 0.45, {0}), (0, 0.85, {0, 1, 2})]:
        g = torch.Generator().manual_seed(0)
        seen = {int(M.sample_token(logits, 1.0, top_k, top_p, g)[0]) for _ in range(200)}
        assert seen == allowed
    _, logp = M.sample_token(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert logp.exp().item() in (pytest.approx(0.5 / 0.8), pytest.approx(0.3 / 0.8))  # renormalised over the 2


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
    # generation stops once every row has hit EOS: zero final-norm weights give all-zero logits, argmax 0
    with torch.no_grad():
        model.model.norm.weight.zero_()
    completions, _, mask = generate(model, prompts, 30, temperature=0, eos_id=0, pad_id=1)
    assert completions.tolist() == [[0]] * 3 and mask.tolist() == [[1.0]] * 3


def test_completion_logprobs_invariant_to_padding_and_entropy():
    model = tiny_model()
    prompts, completions = [[3, 4, 5], [6, 7, 8, 9, 10]], [[11, 12, 13], [14]]
    p_ids, p_mask = left_pad(prompts, 0)
    c_ids, c_mask = right_pad(completions, 0)
    zeros = torch.zeros(2, 2, dtype=torch.long)
    padded_p = torch.cat([zeros, p_ids], 1), torch.cat([zeros, p_mask], 1)           # 2 more pads on the left
    padded_c = torch.cat([c_ids, zeros], 1), torch.cat([c_mask, zeros], 1)           # 2 more on the right
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, return_entropy=True)
        padded = completion_logprobs(model, *padded_p, *padded_c)
        torch.testing.assert_close(padded[:, :3], logp, atol=1e-5, rtol=0)
        assert (padded[:, 3:] == 0).all() and logp[1, 1:].eq(0).all()
        # by hand for row 0: full forward on the unpadded sequence, temperature 2
        logits, _ = model(torch.tensor([prompts[0] + completions[0]]))
        by_hand = (logits[0, 2:5] / 2).log_softmax(-1).gather(1, torch.tensor([[11], [12], [13]])).squeeze(1)
        hot = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=2.0)
        torch.testing.assert_close(hot[0], by_hand, atol=1e-5, rtol=0)
        probs = logits[0, 2:5].softmax(-1)
        torch.testing.assert_close(entropy[0], -(probs * probs.log()).sum(-1), atol=1e-5, rtol=0)


def test_heldout_accuracy_by_hand():
    model, tokenizer = tiny_model(vocab_size=259, max_position_embeddings=128), Tokenizer(merges=[])
    records = [{"prompt": "a", "answer": "x", "family": "add"}, {"prompt": "bb", "answer": "y", "family": "add"},
               {"prompt": "c", "answer": "z", "family": "sub"}]
    replies = [generate(model, [tokenizer.encode_prompt(r["prompt"])], 6, temperature=0, eos_id=tokenizer.im_end_id)[0]
               for r in records]
    texts = [tokenizer.decode([t for t in reply[0].tolist() if t != tokenizer.im_end_id]) for reply in replies]
    records[1]["answer"] = " " + texts[1] + "\n"  # the second reply is right, up to whitespace
    result = heldout_accuracy(model.train(), tokenizer, records, max_new_tokens=6, batch_size=2)
    assert model.training  # restored
    closed = sum(tokenizer.im_end_id in reply[0].tolist() for reply in replies) / 3
    expected = {"accuracy": sum(t.strip() == r["answer"].strip() for t, r in zip(texts, records)) / 3,
                "well_formed": closed, "accuracy/add": (texts[0].strip() == "x") / 2 + 0.5,
                "accuracy/sub": float(texts[2].strip() == "z")}
    assert result == pytest.approx(expected)
    assert format_accuracy({"accuracy": 0.5, "well_formed": 1.0, "accuracy/add": 0.25}) == \
        "accuracy 50.0% (add 25%) | well-formed 100.0%"


def test_prompt_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="longer than the context"):
        generate(tiny_model(), [[1] * 60], 10)


# ----------------------------------------------------------------------------- checkpoints and CLI

def test_checkpoint_round_trip(tmp_path):
    model, tokenizer = tiny_model(tie_word_embeddings=False), Tokenizer(merges=[])

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, module):
            super().__init__()
            self.module = module
    path = str(tmp_path / "out" / "sft.pt")
    save_checkpoint(path, Wrapper(model), tokenizer, "sft", parent="out/pretrain.pt", step=7, args={"lr": 1e-3},
                    metrics={"loss": 1.5}, optimizer={"state": {}})
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
    for i, write in enumerate((torch.save, lambda obj, f: pickle.dump(obj, open(f, "wb"), protocol=2))):
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
    save_checkpoint(str(tmp_path / "reward.pt"), tiny_model(head="score"), Tokenizer(merges=[]), "reward")
    assert "'score' head, expected a 'lm' head" in error(tmp_path / "reward.pt", head="lm")
    checkpoint = torch.load(tmp_path / "reward.pt", weights_only=True)
    checkpoint["config"]["hidden_size"] = 48
    torch.save(checkpoint, tmp_path / "bad.pt")
    assert "do not match its config" in error(tmp_path / "bad.pt")


def test_cli_sample_chat_and_errors(tmp_path):
    tokenizer = Tokenizer(merges=[])
    save_checkpoint(str(tmp_path / "sft.pt"), tiny_model(vocab_size=tokenizer.vocab_size,
                                                          max_position_embeddings=128), tokenizer, "sft")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = "\n".join([  # one interpreter for all three commands: starting python + torch is the slow part
        "import sys, model",
        "model.main(['sample', sys.argv[1], '--prompt', 'hi', '--max-new-tokens', '5', '--temperature', '0'])",
        "model.main(['chat', sys.argv[1], '--max-new-tokens', '5'])",
    ])
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sft.pt")], cwd=ROOT, env=env,
                         input="hello\nsecond turn\n/quit\nnever read\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("hi") and "tokens/s" in run.stderr
    assert run.stdout.count("-" * 40) == 1  # one sample; the chat replies (any text) follow it
    run = subprocess.run([sys.executable, "model.py", "sample", str(tmp_path / "missing" / "sft.pt")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().startswith("error:") and "python sft.py" in run.stderr
    with pytest.raises(SystemExit) as info:
        M.main(["--help"])
    assert info.value.code == 0
