# ---------------------------------------------------------------------------------------------
# grpo.py and ppo.py
# ---------------------------------------------------------------------------------------------
import json
import math
import subprocess

import pytest
import torch

from tests_parts.test_train import ENV, PY, ROOT, run_error, run_ok, tiny_sft, world  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------- GRPO math

def test_grpo_advantages_by_hand():
    from grpo import grpo_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # two groups of 4
    advantages = grpo_advantages(rewards, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: mean 0.25, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    s1, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.25 / s2, -0.25 / s2, -0.25 / s2, 0.75 / s2]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert advantages.view(2, 4).sum(dim=1).abs().max() < 1e-6  # zero mean per group
    batch = grpo_advantages(rewards, 4, scale="batch")
    centred = [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    assert batch.tolist() == pytest.approx([c / (rewards.std().item() + 1e-4) for c in centred], rel=1e-6)
    assert grpo_advantages(rewards, 4, scale="none").tolist() == pytest.approx(centred)
    assert grpo_advantages(torch.full((4,), 0.7), 4).abs().max() == 0  # equal rewards: no advantage at all
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 4, scale="bogus")


def test_grpo_equal_rewards_give_zero_policy_gradient():
    from grpo import aggregate_loss, grpo_advantages, grpo_token_loss

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


def test_k3_kl():
    from grpo import k3_kl

    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    assert k3_kl(logp, logp).abs().max() == 0
    ref_logp = torch.log(torch.tensor([0.25, 0.4, 0.1]))
    # r = ref / pi; k3 = r - log r - 1
    expected = [r - math.log(r) - 1 for r in (0.5, 2.0, 0.1 / 0.9)]
    assert k3_kl(logp, ref_logp).tolist() == pytest.approx(expected, rel=1e-5)
    assert (k3_kl(logp, ref_logp) > 0).all()
    assert k3_kl(logp, ref_logp)[0].item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-5)  # 0.19315


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clip_removes_the_gradient_exactly_where_it_should(eps_low, eps_high):
    from grpo import grpo_token_loss
    from ppo import ppo_policy_loss

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
            loss, clipped_ppo = ppo_policy_loss(logp, old_logp, torch.full((1, 8), sign), torch.ones(1, 8), eps_low)
            loss.backward()
            assert torch.allclose(logp.grad[0], expected / 8, atol=1e-6) and torch.equal(clipped_ppo, clipped)


def test_loss_aggregations_by_hand_and_padding():
    from grpo import aggregate_loss

    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99 = after EOS / padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(token_loss, mask, "grpo", 4).item() == pytest.approx((2.0 + 4.0) / 2)  # 3.0
    assert aggregate_loss(token_loss, mask, "dapo", 4).item() == pytest.approx(10 / 4)  # 2.5
    assert aggregate_loss(token_loss, mask, "dr_grpo", 4).item() == pytest.approx(10 / (2 * 4))  # 1.25
    # extra padding columns (a batch whose longest reply is longer) change nothing, dr_grpo included
    padded_loss = torch.cat([token_loss, torch.full((2, 3), 7.0)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3)], dim=1)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        assert aggregate_loss(padded_loss, padded_mask, loss_type, 4) == aggregate_loss(token_loss, mask, loss_type, 4)
    # with equal lengths grpo and dapo agree; they differ only when lengths differ
    full = torch.ones(2, 3)
    assert aggregate_loss(token_loss, full, "grpo", 4) == pytest.approx(aggregate_loss(token_loss, full, "dapo", 4).item())


def test_post_eos_and_padding_tokens_contribute_nothing():
    from grpo import aggregate_loss, grpo_token_loss, k3_kl

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
        token_loss, _ = grpo_token_loss(changed, old_logp, advantages, 0.2, 0.2, ref_logp, beta=0.04)
        assert aggregate_loss(token_loss, mask, loss_type, 4).item() == pytest.approx(loss.item(), rel=1e-6)
    assert k3_kl(logp, ref_logp).min() >= 0


# ----------------------------------------------------------------------------- PPO math

def test_gae_with_gamma_lambda_one_is_reward_to_go():
    from ppo import gae

    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 9.0], [1.0, -1.0, 9.0, 9.0]])  # 9 = junk on padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[0.9, 0.8, 1.0, 0.0], [2.5, 2.0, 0.0, 0.0]])
    assert torch.allclose(returns, reward_to_go, atol=1e-6)
    assert torch.allclose(advantages, (reward_to_go - values) * mask, atol=1e-6)
    # lambda 0.95 by hand, rewards (0, 1), values (0.5, 0.2): delta = (0 + 0.2 - 0.5, 1 - 0.2) = (-0.3, 0.8)
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.95)
    assert advantages[0].tolist() == pytest.approx([-0.3 + 0.95 * 0.8, 0.8])
    assert returns[0].tolist() == pytest.approx([-0.3 + 0.95 * 0.8 + 0.5, 1.0])


def test_whitened_advantages_mean_zero_std_one_over_the_mask():
    from ppo import masked_whiten

    torch.manual_seed(0)
    x = 3 + 5 * torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[1, 3:] = mask[2, 1:] = 0
    x[mask == 0] = 1e3  # padding must not leak into the statistics
    white = masked_whiten(x, mask)
    kept = white[mask.bool()]
    assert kept.mean().abs() < 1e-5 and kept.std().item() == pytest.approx(1.0, abs=1e-5)
    assert white[mask == 0].abs().max() == 0


def test_kl_reward_is_zero_when_policy_equals_reference_and_score_lands_once(tiny_sft):
    from model import completion_logprobs, generate, left_pad, load_checkpoint
    from ppo import ppo_rewards

    policy, tokenizer, _ = load_checkpoint(str(tiny_sft))
    reference, _, _ = load_checkpoint(str(tiny_sft))
    prompts = [tokenizer.encode_prompt(p) for p in ("What is 2 + 3?", "Sort these digits: 5 2 9", "hi")]
    completion_ids, _, completion_mask = generate(policy, prompts, 8, temperature=1.0, eos_id=tokenizer.im_end_id,
                                                  pad_id=tokenizer.pad_id, generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id)
    rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp, ref_logp = completion_logprobs(policy, *rollout), completion_logprobs(reference, *rollout)
    scores = torch.tensor([0.7, -1.3, 2.0])
    rewards = ppo_rewards(logp, ref_logp, scores, completion_mask, kl_coef=0.05)
    last = completion_mask.sum(dim=1).long() - 1
    expected = torch.zeros_like(rewards)
    expected[torch.arange(3), last] = scores
    assert torch.equal(rewards, expected)  # no KL reward at all, and the score once, at the last real token

    # by hand, with a KL term and replies of length 1, 3 and 4 (the full width)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    logp, ref_logp = -torch.rand(3, 4) * mask, -torch.rand(3, 4) * mask
    rewards = ppo_rewards(logp, ref_logp, scores, mask, kl_coef=0.1)
    kl_part = -0.1 * (logp - ref_logp) * mask
    assert torch.allclose(rewards - kl_part, torch.tensor([[0.7, 0, 0, 0], [0, 0, -1.3, 0], [0, 0, 0, 2.0]]), atol=1e-6)
    assert torch.equal(rewards[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_value_loss_and_adaptive_kl_by_hand():
    from ppo import adaptive_kl_coef, ppo_value_loss

    one = torch.ones(1, 1)
    # V = 1, V_old = 0.5, R = 2: unclipped (1 - 2)^2 = 1, clipped V = 0.7: (0.7 - 2)^2 = 1.69; 0.5 * max = 0.845
    assert ppo_value_loss(one * 1.0, one * 0.5, one * 2.0, one, 0.2).item() == pytest.approx(0.845)
    # V = 1, V_old = 0.5, R = 0: unclipped 1, clipped 0.49; 0.5 * max = 0.5
    assert ppo_value_loss(one * 1.0, one * 0.5, one * 0.0, one, 0.2).item() == pytest.approx(0.5)
    values = torch.tensor([[1.0, 5.0]])
    assert ppo_value_loss(values, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 0.2) == 0
    assert adaptive_kl_coef(0.05, 1.0, 1.0, 10000, 64) == pytest.approx(0.05)
    assert adaptive_kl_coef(0.05, 10.0, 1.0, 10000, 64) == pytest.approx(0.05 * (1 + 0.2 * 64 / 10000))
    assert adaptive_kl_coef(0.05, 0.0, 1.0, 10000, 64) == pytest.approx(0.05 * (1 - 0.2 * 64 / 10000))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="session")
def tiny_reward(world, tiny_sft):
    """A reward model for the tiny world: the tiny SFT trunk with a fresh score head."""
    from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint

    _, tokenizer, checkpoint = load_checkpoint(str(tiny_sft))
    torch.manual_seed(0)
    reward_model = Transformer(ModelConfig(**{**checkpoint["config"], "head": "score"}))
    reward_model.load_state_dict({k: v for k, v in checkpoint["model"].items() if not k.startswith("lm_head")}, strict=False)
    path = world / "out" / "reward_rl.pt"
    save_checkpoint(str(path), reward_model, tokenizer, "reward", parent=str(tiny_sft), metrics={"reward_mean": 0.1, "reward_std": 2.0})
    return path


def TINY_RL(world, tiny_sft):
    small_eval = world / "data" / "eval_rl.jsonl"  # every 10th held-out prompt: the before/after numbers in a second
    if not small_eval.exists():
        small_eval.write_text("".join(open(world / "data" / "eval.jsonl").readlines()[::10]))
    return ["--init", str(tiny_sft), "--data", str(world / "data" / "prompts.jsonl"), "--eval-data", str(small_eval),
            "--steps", "2", "--max-new-tokens", "6", "--log-every", "1", "--device", "cpu"]


def read_log(path):
    return [json.loads(line) for line in open(path)]


def run_ddp(*argv):
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_grpo_end_to_end_and_under_torchrun(world, tiny_sft, tiny_reward, tmp_path):
    args = [*TINY_RL(world, tiny_sft), "--prompts-per-step", "4", "--group-size", "3"]
    out = run_ok("grpo.py", *args, "--reward-model", str(tiny_reward), "--out", str(tmp_path / "grpo.pt"))
    assert "grpo | step 2/2" in out and "grpo | before: accuracy" in out and "grpo | after:  accuracy" in out
    checkpoint = torch.load(tmp_path / "grpo.pt", weights_only=True)
    assert checkpoint["stage"] == "grpo" and {"before", "after"} <= checkpoint["metrics"].keys()
    log = read_log(tmp_path / "grpo.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    assert all({"reward", "accuracy", "kl", "clip", "entropy", "length", "equal"} <= r.keys() for r in log)
    assert log[0]["kl"] == 0 and log[0]["equal"] < 1  # the policy starts at the reference; a learned reward varies
    out = run_ddp("grpo.py", *args, "--beta", "0", "--loss-type", "dapo", "--out", str(tmp_path / "ddp.pt"))
    assert out.count("grpo | step 2/2") == 1 and torch.load(tmp_path / "ddp.pt", weights_only=True)["stage"] == "grpo"


def test_ppo_end_to_end_and_under_torchrun(world, tiny_sft, tiny_reward, tmp_path):
    args = [*TINY_RL(world, tiny_sft), "--reward-model", str(tiny_reward), "--prompts-per-step", "8", "--ppo-epochs", "3", "--minibatches", "2"]
    out = run_ok("ppo.py", *args, "--adaptive-kl", "--out", str(tmp_path / "ppo.pt"))
    assert "ppo | step 2/2" in out and "score" in out.splitlines()[-1]
    checkpoint = torch.load(tmp_path / "ppo.pt", weights_only=True)
    assert checkpoint["stage"] == "ppo" and "score" in checkpoint["metrics"]["after"]
    log = read_log(tmp_path / "ppo.jsonl")
    assert all({"score", "kl", "clip", "approx_kl", "value_loss", "explained_var", "entropy", "length"} <= r.keys() for r in log)
    assert log[0]["kl"] == 0 and log[0]["updates"] == 3 * 2 and log[1]["kl_coef"] != 0.05
    # 2 ranks with a KL limit nothing passes: the first update of a step sees the rollout policy itself
    # (approx KL 0), the second does not, so every rank stops after 2 of the 6 updates (a rank that went
    # on alone would wait forever for the other in DDP's gradient all-reduce)
    out = run_ddp("ppo.py", *args, "--target-kl", "1e-12", "--out", str(tmp_path / "ddp.pt"))
    assert out.count("ppo | step 2/2") == 1
    assert [r["updates"] for r in read_log(tmp_path / "ddp.jsonl")] == [2, 2]


def test_rl_bad_input(world, tiny_sft, tiny_reward, tmp_path, capsys):
    import grpo
    import ppo

    out = tmp_path / "x.pt"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    line = run_error("grpo.py", *TINY_RL(world, tiny_sft), "--data", str(prompts), "--out", str(out))
    assert "prompts.jsonl:2" in line and "answer" in line  # the verifiable reward needs it
    # the same checks in-process (no interpreter start-up): one-line errors, raised before any training
    common = dict(init=str(tiny_sft), eval_data=TINY_RL(world, tiny_sft)[5], steps=1, max_new_tokens=6, device="cpu", out=str(out))
    with pytest.raises(ValueError, match="group-size 1"):
        grpo.main(grpo.Args(**common, group_size=1))
    with pytest.raises(FileNotFoundError, match="reward.py"):
        ppo.main(ppo.Args(**common, data=str(world / "data" / "prompts.jsonl"), reward_model=str(tmp_path / "reward.pt")))
    with pytest.raises(ValueError, match="'lm' head"):
        ppo.main(ppo.Args(**common, data=str(world / "data" / "prompts.jsonl"), reward_model=str(tiny_sft)))
    assert not out.exists()
    # a prompt that fills the context (64 tokens) is skipped and counted; one without an answer is fine
    # with a learned reward
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    rows += [{"prompt": "x " * 80, "answer": "1"}, {"prompt": "What is 9 + 9?"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo.main(grpo.Args(**common, data=str(prompts), prompts_per_step=4, group_size=2, reward_model=str(tiny_reward)))
    assert "skipped 1 prompts" in capsys.readouterr().out and out.exists()
