# ---------------------------------------------------------------------------------------------
# distill.py, eval.py, pipeline.sh
# ---------------------------------------------------------------------------------------------
import json
import math
import os
import subprocess

import pytest
import torch

from tests_parts.test_train import ENV, PY, ROOT, run_error, run_ok, tiny_sft, world  # noqa: F401 (fixtures)


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_term_is_zero_when_student_equals_teacher():
    from distill import kd_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100  # tokens that do not count
    loss, ce, kd = kd_loss(logits, logits.clone(), targets, alpha=0.7, temperature=2.0)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.3 * ce.item(), rel=1e-6)
    for beta in (0.5, 1.0):
        assert kd_loss(logits, logits, targets, 0.7, 2.0, beta)[2].item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_by_hand_with_temperature_squared():
    from distill import kd_loss

    # T = 2: teacher logits (2 ln 3, 0) / T -> p_t = (3/4, 1/4); student logits (0, 0) -> p_s = (1/2, 1/2)
    teacher = torch.tensor([[[2 * math.log(3), 0.0]]])
    student = torch.zeros(1, 1, 2)
    targets = torch.tensor([[0]])
    kl = kl_by_hand([0.75, 0.25], [0.5, 0.5])  # 0.1308...
    loss, ce, kd = kd_loss(student, teacher, targets, alpha=0.5, temperature=2.0)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert kd.item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * 2.0 ** 2 * kl, rel=1e-6)
    # alpha 0 is plain cross-entropy; only counted tokens enter the mean
    targets = torch.tensor([[0, -100]])
    student2, teacher2 = torch.cat([student, torch.randn(1, 1, 2)], 1), torch.cat([teacher, torch.randn(1, 1, 2)], 1)
    assert kd_loss(student2, teacher2, targets, 0.0, 2.0)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert kd_loss(student2, teacher2, targets, 0.5, 2.0)[2].item() == pytest.approx(kl, rel=1e-6)


def test_temperature_squared_keeps_the_gradient_scale():
    """d(T^2 KL)/d z_s = T (p_s - p_t) -> (z_s - z_t - mean) / V for large T (Hinton et al. section 2.1):
    without the T^2 the soft-target gradient would shrink as 1 / T^2."""
    from distill import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(1, 1, 7), torch.randn(1, 1, 7)
    targets = torch.zeros(1, 1, dtype=torch.long)
    grads = {}
    for temperature in (10.0, 100.0):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, targets, alpha=1.0, temperature=temperature)[0].backward()
        grads[temperature] = z.grad.flatten()
    diff = (student - teacher).flatten()
    limit = (diff - diff.mean()) / 7
    assert torch.allclose(grads[100.0], limit, atol=2e-3)  # O(1 / T) away from the limit
    assert grads[10.0].norm() / grads[100.0].norm() == pytest.approx(1.0, abs=0.1)  # without T^2 it would be 100
    # and by hand at T = 2: T^2 * (1/T) * (p_s - p_t) = T (p_s - p_t)
    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, targets, alpha=1.0, temperature=2.0)[0].backward()
    by_hand = 2.0 * ((student / 2).softmax(-1) - (teacher / 2).softmax(-1)).flatten()
    assert torch.allclose(z.grad.flatten(), by_hand, atol=1e-6)


def test_generalized_jsd_endpoints_and_bound():
    from distill import generalized_jsd

    p_t, p_s = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
    teacher, student = torch.tensor(p_t).log(), torch.tensor(p_s).log()
    assert generalized_jsd(student, teacher, 0.0).item() == pytest.approx(kl_by_hand(p_t, p_s), rel=1e-5)  # forward
    assert generalized_jsd(student, teacher, 1.0).item() == pytest.approx(kl_by_hand(p_s, p_t), rel=1e-5)  # reverse
    m = [(a + b) / 2 for a, b in zip(p_t, p_s)]
    jsd = 0.5 * kl_by_hand(p_t, m) + 0.5 * kl_by_hand(p_s, m)
    assert generalized_jsd(student, teacher, 0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert generalized_jsd(teacher, student, 0.5).item() == pytest.approx(jsd, rel=1e-5)  # symmetric at 0.5
    # the endpoints are the limits up to a factor: JSD(b) / b -> KL(t || s), JSD(b) / (1 - b) -> KL(s || t)
    b = 1e-3
    assert generalized_jsd(student, teacher, b).item() / b == pytest.approx(kl_by_hand(p_t, p_s), rel=1e-2)
    assert generalized_jsd(student, teacher, 1 - b).item() / b == pytest.approx(kl_by_hand(p_s, p_t), rel=1e-2)
    # JSD(0.5) <= log 2, reached by distributions with disjoint support
    torch.manual_seed(0)
    values = generalized_jsd(torch.randn(1000, 5) * 10, torch.randn(1000, 5) * 10, 0.5)
    assert (values >= -1e-6).all() and (values <= math.log(2) + 1e-6).all()
    far = generalized_jsd(torch.tensor([50.0, -50.0]), torch.tensor([-50.0, 50.0]), 0.5)
    assert far.item() == pytest.approx(math.log(2), rel=1e-5)


def test_student_is_half_the_teacher():
    from distill import student_config
    from model import ModelConfig

    teacher = ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    student = student_config(teacher)
    assert (student.hidden_size, student.num_hidden_layers, student.intermediate_size) == (64, 2, 192)
    assert (student.num_attention_heads, student.num_key_value_heads) == (2, 1)  # same head size, same GQA ratio
    assert student.vocab_size == teacher.vocab_size and student.max_position_embeddings == teacher.max_position_embeddings
    assert student_config(teacher, hidden_size=96, num_layers=3).num_attention_heads == 3
    with pytest.raises(ValueError):
        student_config(teacher, hidden_size=100)


def TINY_DISTILL(world, sft):
    small_eval = world / "data" / "eval_small.jsonl"  # 10 prompts per family keep the three evaluations short
    if not small_eval.exists():
        records = [json.loads(line) for line in open(world / "data" / "eval.jsonl")]
        small_eval.write_text("".join(json.dumps(r) + "\n" for f in sorted({r["family"] for r in records})
                                      for r in [r for r in records if r["family"] == f][:10]))
    return ["--teacher", str(sft), "--data", str(world / "data" / "sft.jsonl"), "--eval-data", str(small_eval),
            "--batch-size", "8", "--warmup", "2", "--log-every", "1", "--max-new-tokens", "4", "--device", "cpu"]


def test_distill_end_to_end_with_gkd_options(world, tiny_sft, tmp_path):
    out = tmp_path / "distill.pt"
    stdout = run_ok("distill.py", *TINY_DISTILL(world, tiny_sft), "--steps", "4", "--beta", "0.5", "--on-policy", "0.5",
                    "--out", str(out))
    assert "distill | student:" in stdout and "distill | baseline:" in stdout and "wrote" in stdout
    checkpoint = torch.load(out, weights_only=True)
    teacher = torch.load(tiny_sft, weights_only=True)
    assert checkpoint["stage"] == "distill" and checkpoint["parent"] == str(tiny_sft)
    assert checkpoint["config"]["num_hidden_layers"] == teacher["config"]["num_hidden_layers"] // 2
    assert checkpoint["config"]["hidden_size"] == teacher["config"]["hidden_size"] // 2
    assert {"teacher", "student", "baseline"} <= checkpoint["metrics"].keys()
    assert checkpoint["metrics"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    log = [json.loads(line) for line in open(tmp_path / "distill.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and any(r["on_policy"] for r in log) and not all(r["on_policy"] for r in log)
    # --alpha 0 is the baseline itself: no second student
    run_ok("distill.py", *TINY_DISTILL(world, tiny_sft), "--steps", "2", "--alpha", "0", "--out", str(out))
    assert "baseline" not in torch.load(out, weights_only=True)["metrics"]


def test_distill_ddp_equals_single_process(world, tiny_sft, tmp_path):
    """Student and baseline losses of 2 ranks equal one process's (the global-batch token average)."""
    args = [*TINY_DISTILL(world, tiny_sft), "--steps", "3"]
    run_ok("distill.py", *args, "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "distill.py"), *args, "--out", str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = [json.loads(line) for line in open(tmp_path / "single.jsonl")]
    ddp = [json.loads(line) for line in open(tmp_path / "ddp.jsonl")]
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for key in ("loss", "ce", "kd", "baseline_loss"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert result.stdout.count("distill | step 3/3") == 1  # only rank 0 prints


def test_distill_bad_input(world, tiny_sft, tmp_path):
    out = tmp_path / "d.pt"
    args = TINY_DISTILL(world, tiny_sft)
    assert "grpo.py" in run_error("distill.py", *args, "--teacher", str(tmp_path / "grpo.pt"), "--out", str(out))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"messages": 3}\n')
    line = run_error("distill.py", *args, "--data", str(tmp_path / "bad.jsonl"), "--out", str(out))
    assert "bad.jsonl:2" in line
    (tmp_path / "text.jsonl").write_text('{"text": "some plain text"}\n' * 8)
    assert "on-policy" in run_error("distill.py", *args, "--data", str(tmp_path / "text.jsonl"), "--on-policy", "0.5", "--out", str(out))
    assert not out.exists()


def test_pipeline_stops_at_the_first_failing_stage(tmp_path):
    """A python that fails on tokenizer.py: the pipeline names the stage, its exit code, and goes no further."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1" in tokenizer.py) echo "tokenizer broke" >&2; exit 3 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--quick", "--data", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out")], env={**ENV, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "pipeline: stage tokenizer failed (exit 3)" in result.stderr
    assert "tokenizer broke" in (tmp_path / "out" / "logs" / "tokenizer.log").read_text()
    assert "pipeline | pretrain" not in result.stdout


def test_pipeline_quick_end_to_end(tmp_path):
    """bash pipeline.sh --quick: every stage runs, every checkpoint loads with weights_only=True, eval has a row for each."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--quick", "--data", str(tmp_path / "data"),
                             "--out", str(out)], env={**ENV, "PYTHON": PY}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = ["pretrain", "sft", "reward", "ppo", "grpo", "dpo", "distill"]
    for stage in stages:
        checkpoint = torch.load(out / f"{stage}.pt", weights_only=True)
        assert checkpoint["stage"] == stage and "optimizer" not in checkpoint  # finished, not mid-run
    for stage in ["data", "tokenizer", *stages, "eval"]:
        assert f"pipeline | {stage} took " in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith(f"| {out}/")]
    assert sorted(line.split(" | ")[0][2:] for line in table) == sorted(f"{out}/{s}.pt" for s in stages)
    rows = {os.path.basename(r["checkpoint"]): r for r in json.load(open(out / "eval.json"))}
    assert rows["sft.pt"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)  # the reference against itself
    assert rows["reward.pt"]["accuracy"] is not None and rows["reward.pt"]["val_bpb"] is None  # the score head's row
    assert all(rows[f"{s}.pt"]["val_bpb"] > 0 and rows[f"{s}.pt"]["reward"] is not None for s in stages if s != "reward")
