# ---------------------------------------------------------------------------------------------
# reward.py and dpo.py: learning from preference pairs
# ---------------------------------------------------------------------------------------------
import json
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # MERGE: drop in test_all.py
from tests_parts.test_train import ENV, PY, ROOT, run_error, run_ok, tiny_sft, world  # noqa: E402,F401

TINY_MODEL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def head(path, n):
    """The first n lines of a data file, written next to it (small held-out sets keep the runs fast)."""
    small = f"{path}.head{n}.jsonl"
    if not os.path.exists(small):
        with open(path) as f, open(small, "w") as out:
            out.writelines(line for _, line in zip(range(n), f))
    return small


def TINY_REWARD(d):
    return ["--init", str(d / "out" / "sft.pt"), "--data", str(d / "data" / "prefs.jsonl"),
            "--eval-data", head(d / "data" / "prefs_eval.jsonl", 60), "--batch-size", "8", "--log-every", "1",
            "--stats-pairs", "16", "--device", "cpu"]


def TINY_DPO(d):
    return ["--init", str(d / "out" / "sft.pt"), "--data", str(d / "data" / "prefs.jsonl"),
            "--eval-data", head(d / "data" / "prefs_eval.jsonl", 60), "--task-data", head(d / "data" / "eval.jsonl", 30),
            "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4", "--device", "cpu"]


def logged(jsonl_path, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, open(jsonl_path))}


def run_ddp(script, *argv):
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, script), *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def tiny_lm(seed=0):
    from model import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY_MODEL)).eval()


def pair(prompt, chosen, rejected, kind="x"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": 0.0, "kind": kind}


# ----------------------------------------------------------------------------- reward.py: the math

def test_bradley_terry_loss_by_hand():
    from reward import reward_loss

    equal = torch.tensor([0.3, -2.0, 5.0])
    assert torch.allclose(reward_loss(equal, equal), torch.full((3,), math.log(2)))  # σ(0) = 1/2
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0])
    # -log σ(1.5) = log(1 + e^-1.5), -log σ(-1) = log(1 + e^1)
    assert torch.allclose(reward_loss(chosen, rejected), torch.tensor([math.log(1 + math.exp(-1.5)), math.log(1 + math.e)]))
    # margin 1: -log σ(2 - 0.5 - 1) = log(1 + e^-0.5); centering 0.1 adds 0.1 (2 + 0.5)^2 = 0.625
    margin = torch.tensor([1.0, 0.0])
    assert reward_loss(chosen, rejected, margin)[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert reward_loss(chosen, rejected, margin, center_coef=0.1)[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)) + 0.625)


def test_bradley_terry_shift_invariance_and_centering():
    from reward import reward_loss

    torch.manual_seed(0)
    chosen, rejected = torch.randn(16), torch.randn(16)
    assert torch.allclose(reward_loss(chosen + 7.5, rejected + 7.5), reward_loss(chosen, rejected))
    # the centering term is what pins the offset: it grows when every reward moves away from 0
    assert (reward_loss(chosen + 7.5, rejected + 7.5, center_coef=0.01).mean() > reward_loss(chosen, rejected, center_coef=0.01).mean())


def test_pairwise_accuracy_by_hand_and_swap():
    from reward import pairwise_accuracy

    chosen, rejected = torch.tensor([3.0, 1.0, 2.0, -1.0]), torch.tensor([1.0, 2.0, 0.0, -3.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(0.75)
    torch.manual_seed(0)
    chosen, rejected = torch.randn(101), torch.randn(101)
    p = pairwise_accuracy(chosen, rejected)
    assert 0 < p < 1 and pairwise_accuracy(rejected, chosen) == pytest.approx(1 - p)
    assert pairwise_accuracy(chosen, chosen) == 0.0  # a tie is not a correct ranking


def test_reward_model_copies_the_body_and_reads_the_last_real_token():
    from model import sequence_scores, left_pad, right_pad
    from reward import pair_rewards, reward_model_from

    lm = tiny_lm()
    reward_model = reward_model_from(lm, seed=0).eval()
    assert reward_model.config.head == "score" and not hasattr(reward_model, "lm_head")
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    assert all(torch.equal(reward_model.state_dict()[k], v) for k, v in body.items())
    assert reward_model.score.weight.std().item() == pytest.approx(1 / math.sqrt(33), rel=0.3)
    # the reward of a pair does not depend on the other pairs of its batch (padding) nor on the pad id
    pairs = [pair([5, 6, 7], [8, 9], [10]), pair([5, 6, 7, 1, 2, 3, 4], [8, 9, 11, 12, 13], [10, 1, 2, 3, 4, 5, 6])]
    alone = pair_rewards(reward_model, pairs[:1], 0, "cpu")
    batched = pair_rewards(reward_model, pairs, 0, "cpu")
    other_pad = pair_rewards(reward_model, pairs, 3, "cpu")
    for a, b, c in zip(alone, batched, other_pad):
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(b, c, atol=1e-5)
    # it is the score at the last real token of prompt + reply, by hand on the unpadded sequence
    values, _ = reward_model(torch.tensor([[5, 6, 7, 10]]))
    assert alone[1].item() == pytest.approx(values[0, -1].item(), abs=1e-5)


def test_preference_pairs_skip_and_count(tmp_path):
    from reward import preference_pairs
    from tokenizer import Tokenizer

    tokenizer = Tokenizer(merges=[])
    records = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "kind": "wrong"},
               {"prompt": "2+2?", "chosen": "4", "rejected": " 4 "},               # identical
               {"prompt": "2+2?", "chosen": "4", "rejected": "  "},                # an empty side
               {"prompt": "2+2?", "chosen": "", "rejected": "5"},                  # an empty side
               {"prompt": "x" * 200, "chosen": "4", "rejected": "5"},              # fills the context
               {"prompt": "2+2?", "chosen": "4", "rejected": "?", "margin": 2}]
    pairs, skipped = preference_pairs(tokenizer, records, context=64, path="p.jsonl")
    assert skipped == {"identical": 1, "empty side": 2, "longer than the context": 1}
    assert len(pairs) == 2 and pairs[1]["margin"] == 2.0 and pairs[0]["kind"] == "wrong"
    assert pairs[0]["chosen"] == tokenizer.encode("4") + [tokenizer.im_end_id]  # a reply ends with <|im_end|>
    assert pairs[0]["prompt"] == tokenizer.encode_prompt("2+2?")
    with pytest.raises(ValueError, match=r"p.jsonl: no usable preference pairs \(1 identical, 2 empty side, 1 longer"):
        preference_pairs(tokenizer, records[1:5], 64, "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'chosen' and 'rejected' must be strings"):
        preference_pairs(tokenizer, [records[0], {"prompt": "a", "chosen": 3, "rejected": "b"}], 64, "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'margin' must be a number"):
        preference_pairs(tokenizer, [{"prompt": "a", "chosen": "a", "rejected": "b", "margin": "1"}], 64, "p.jsonl")


# ----------------------------------------------------------------------------- dpo.py: the math

def test_dpo_loss_is_log2_when_policy_is_the_reference():
    from dpo import LOSS_TYPES, dpo_loss

    logp_chosen, logp_rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-7.0, -1.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logp_chosen, logp_rejected, logp_chosen, logp_rejected)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen_rewards - rejected_rewards, torch.zeros(2))  # margin 0
    assert (chosen_rewards > rejected_rewards).float().mean() == 0  # accuracy 0
    for loss_type, at_zero in zip(LOSS_TYPES, (math.log(2), math.log(2), 1.0, 25.0)):  # ipo: (0 - 1/(2·0.1))²
        losses, _, _ = dpo_loss(logp_chosen, logp_rejected, logp_chosen, logp_rejected, 0.1, loss_type, 0.1)
        assert torch.allclose(losses, torch.full((2,), at_zero)), loss_type


def test_dpo_loss_types_by_hand():
    from dpo import dpo_loss

    # h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)) = (-1 + 2) - (-3 + 2) = 2
    numbers = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    softplus = lambda x: math.log(1 + math.exp(x))  # -log σ(x) = softplus(-x)
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
        assert chosen_rewards.item() == pytest.approx(beta) and rejected_rewards.item() == pytest.approx(-beta)
    with pytest.raises(ValueError, match="loss-type"):
        dpo_loss(*numbers, 0.1, "kto")


def test_robust_with_eps_zero_equals_sigmoid():
    from dpo import dpo_loss

    torch.manual_seed(0)
    numbers = [torch.randn(32) * 5 for _ in range(4)]
    sigmoid, _, _ = dpo_loss(*numbers, 0.3, "sigmoid", 0.0)
    robust, _, _ = dpo_loss(*numbers, 0.3, "robust", 0.0)
    assert torch.allclose(sigmoid, robust)
    assert not torch.allclose(dpo_loss(*numbers, 0.3, "robust", 0.1)[0], sigmoid)


def test_dpo_gradient_is_zero_on_prompt_and_padding_positions():
    """The loss sees only the log-probs of reply tokens: d loss / d logits is 0 at every position that
    predicts a prompt token or a pad, and not 0 where it predicts a reply token."""
    from dpo import dpo_loss, pair_logps

    pairs = [pair([5, 6, 7], [8, 9], [10]), pair([1, 2, 3, 4, 5], [11], [12, 13, 14])]
    P, Nc, Nr, V = 5, 2, 3, 17
    chosen_logits = torch.randn(2, P + Nc, V, requires_grad=True)
    rejected_logits = torch.randn(2, P + Nr, V, requires_grad=True)

    def fake_model(ids, attention_mask=None, logits_to_keep=0):  # the logits of a model, as leaves
        logits = chosen_logits if ids.shape[1] == P + Nc else rejected_logits
        return logits[:, -logits_to_keep:], None

    logp_chosen, logp_rejected = pair_logps(fake_model, pairs, pad_id=0, device="cpu")
    losses, _, _ = dpo_loss(logp_chosen, logp_rejected, torch.zeros(2), torch.zeros(2))
    losses.sum().backward()
    for logits, reply_lengths in ((chosen_logits, (2, 1)), (rejected_logits, (1, 3))):
        nonzero = logits.grad.abs().sum(-1) > 0                                   # (B, T)
        for row, n in enumerate(reply_lengths):
            # position t predicts token t+1; the reply starts at column P (prompts are left-padded)
            expected = torch.zeros(logits.shape[1], dtype=torch.bool)
            expected[P - 1 : P - 1 + n] = True
            assert torch.equal(nonzero[row], expected), (row, nonzero[row])


def test_dpo_logps_by_hand_and_invariant_to_padding():
    from dpo import pair_logps

    policy = tiny_lm()
    pairs = [pair([5, 6, 7], [8, 9, 3], [10]), pair([1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16], [12])]
    alone_chosen, alone_rejected = pair_logps(policy, pairs[:1], pad_id=0, device="cpu")
    chosen, rejected = pair_logps(policy, pairs, pad_id=0, device="cpu")
    other_chosen, other_rejected = pair_logps(policy, pairs, pad_id=96, device="cpu")
    assert torch.allclose(alone_chosen, chosen[:1], atol=1e-5) and torch.allclose(alone_rejected, rejected[:1], atol=1e-5)
    assert torch.allclose(chosen, other_chosen, atol=1e-5) and torch.allclose(rejected, other_rejected, atol=1e-5)
    # by hand: sum over the reply tokens of log softmax(logits of the previous position)[token]
    logits, _ = policy(torch.tensor([[5, 6, 7, 8, 9, 3]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    assert chosen[0].item() == pytest.approx(sum(logp[t - 1, tok].item() for t, tok in ((3, 8), (4, 9), (5, 3))), abs=1e-4)


# ----------------------------------------------------------------------------- end to end

def test_reward_end_to_end_and_ddp_equals_single_process(tiny_sft, tmp_path):
    from model import load_checkpoint

    world = tiny_sft.parent.parent
    args = [*TINY_REWARD(world), "--steps", "3"]
    out = run_ok("reward.py", *args, "--out", str(tmp_path / "single.pt"))
    assert "longer than the context skipped" in out and "reward | after:  pairwise accuracy" in out
    model, _, checkpoint = load_checkpoint(str(tmp_path / "single.pt"), head="score")  # a standard checkpoint
    assert checkpoint["stage"] == "reward" and checkpoint["parent"] == str(tiny_sft) and checkpoint["step"] == 3
    metrics = checkpoint["metrics"]
    assert metrics["reward_std"] > 0 and math.isfinite(metrics["reward_mean"])
    assert 0 <= metrics["before"]["accuracy"] <= 1 and "accuracy/wrong" in metrics["after"]
    stdout = run_ddp("reward.py", *args, "--out", str(tmp_path / "ddp.pt"))
    assert stdout.count("reward | step 3/3") == 1  # only rank 0 prints
    single, ddp = logged(tmp_path / "single.jsonl"), logged(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])


def test_dpo_end_to_end_ddp_with_precomputed_reference_equals_single_process_with_reference_model(tiny_sft, tmp_path):
    """One process holding a reference model and two ranks with precomputed reference log-probs
    give the same losses: the precomputation is exact and DDP splits the batch without changing it."""
    world = tiny_sft.parent.parent
    args = [*TINY_DPO(world), "--steps", "3"]
    out = run_ok("dpo.py", *args, "--out", str(tmp_path / "model.pt"))
    assert "dpo | after:  task accuracy" in out and "dpo | after:  preference accuracy" in out
    with_model = logged(tmp_path / "model.jsonl")
    assert with_model[1] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is the reference
    assert logged(tmp_path / "model.jsonl", "rewards/accuracy")[1] == 0.0
    assert logged(tmp_path / "model.jsonl", "rewards/margin")[1] == pytest.approx(0.0, abs=1e-6)
    stdout = run_ddp("dpo.py", *args, "--precompute-ref", "--out", str(tmp_path / "ddp.pt"))
    assert stdout.count("dpo | step 3/3") == 1 and "reference precomputed" in stdout
    ddp = logged(tmp_path / "ddp.jsonl")
    assert sorted(ddp) == sorted(with_model) == [1, 2, 3]
    for step in with_model:
        assert abs(with_model[step] - ddp[step]) < 1e-5, (step, with_model[step], ddp[step])
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["stage"] == "dpo" and checkpoint["step"] == 3 and set(checkpoint["metrics"]["after"]) == {"pairs", "task"}
    assert checkpoint["metrics"]["before"]["pairs"]["implicit_accuracy"] == 0.0


def test_reward_and_dpo_bad_input(tiny_sft, tmp_path):
    """Unusable pairs are skipped and counted; nothing usable left is one error line and no file.
    (Malformed lines, file:line, are checked on preference_pairs above.)"""
    world = tiny_sft.parent.parent
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "a"}\n{"prompt": "hi", "chosen": "a", "rejected": ""}\n'
                   '{"prompt": "' + "long " * 100 + '", "chosen": "a", "rejected": "b"}\n')
    for script, args in (("reward.py", TINY_REWARD(world)), ("dpo.py", TINY_DPO(world))):
        line = run_error(script, *args, "--data", str(bad), "--out", str(tmp_path / "x.pt"))
        assert "no usable preference pairs (1 identical, 1 empty side, 1 longer than the context)" in line
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.jsonl").exists()
