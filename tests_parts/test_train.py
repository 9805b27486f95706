# ---------------------------------------------------------------------------------------------
# pretrain.py and sft.py
# ---------------------------------------------------------------------------------------------
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # MERGE: test_all.py is at the root
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_ok(*argv, cwd=None, timeout=300):
    result = subprocess.run([PY, *argv], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def run_error(*argv, cwd=None):
    """A script that must refuse its input: exit 2 with one `error:` line on stderr."""
    result = subprocess.run([PY, *argv], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, f"{argv} exited {result.returncode}:\n{result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def losses(jsonl_path: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(jsonl_path)) if "loss" in r}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny built-in world: data, a tokenizer, a tiny pretrained model."""
    d = tmp_path_factory.mktemp("world")
    run_ok(os.path.join(ROOT, "data.py"), "--out", str(d / "data"), "--scale", "0.02")
    run_ok(os.path.join(ROOT, "tokenizer.py"), "--data", str(d / "data" / "pretrain.txt"), "--vocab-size", "400",
           "--out", str(d / "out" / "tokenizer.json"))
    run_ok(os.path.join(ROOT, "pretrain.py"), *TINY_PRETRAIN(d), "--steps", "30", "--out", str(d / "out" / "pretrain.pt"))
    return d


@pytest.fixture(scope="session")
def tiny_sft(world):
    """out/sft.pt of the tiny world: the starting point of every post-training stage's tests."""
    run_ok(os.path.join(ROOT, "sft.py"), *TINY_SFT(world), "--steps", "20", "--log-every", "10",
           "--out", str(world / "out" / "sft.pt"))
    return world / "out" / "sft.pt"


def TINY_PRETRAIN(d):
    return ["--data", str(d / "data" / "pretrain.txt"), "--tokenizer", str(d / "out" / "tokenizer.json"),
            "--hidden-size", "32", "--num-layers", "2", "--context", "64", "--batch-size", "8", "--lr", "3e-3",
            "--warmup", "5", "--log-every", "1", "--eval-every", "1000", "--eval-batches", "2", "--device", "cpu"]


def TINY_SFT(d):
    return ["--init", str(d / "out" / "pretrain.pt"), "--data", str(d / "data" / "sft.jsonl"),
            "--eval-data", str(d / "data" / "eval.jsonl"), "--batch-size", "8", "--log-every", "1",
            "--max-new-tokens", "4", "--device", "cpu"]


def test_lr_schedule_key_steps():
    from pretrain import lr_at

    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)  # first warmup step
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)  # end of warmup: the peak
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of peak and floor
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)  # the floor, 10 % of the peak
    assert lr_at(500, 1.0, 10, 110) == pytest.approx(0.1)  # stays there
    from sft import lr_at as sft_lr_at

    assert [sft_lr_at(s, 3e-4, 7, 50) for s in range(60)] == [lr_at(s, 3e-4, 7, 50) for s in range(60)]


def test_weight_decay_groups():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay and "model.layers.1.mlp.down_proj.weight" in decay
    assert "model.embed_tokens.weight" in no_decay
    assert all(n.endswith(".bias") or "norm" in n or "embed" in n for n in no_decay)
    assert all(n.endswith(".weight") and "norm" not in n and "embed" not in n for n in decay)


def test_assistant_only_loss_by_hand(world):
    from model import load_checkpoint
    from sft import sft_example

    model, tokenizer, _ = load_checkpoint(str(world / "out" / "pretrain.pt"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]
    inputs, targets, truncated = sft_example(tokenizer, messages, context=200)
    assert not truncated
    ids, mask = tokenizer.encode_chat(messages)
    # the targets are exactly the assistant tokens: "5", <|im_end|>, "8", <|im_end|>
    kept = [t for t in targets if t != -100]
    assert kept == [i for i, m in zip(ids, mask) if m] and tokenizer.decode(kept) == "5<|im_end|>8<|im_end|>"
    x, y = torch.tensor([inputs]), torch.tensor([targets])
    _, loss = model(x, y)
    logits, _ = model(x)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    by_hand = -sum(logp[t, y[0, t]] for t in range(len(targets)) if targets[t] != -100) / len(kept)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_sft_truncates_and_counts():
    from sft import sft_example
    from tokenizer import Tokenizer

    tokenizer = Tokenizer(merges=[])
    inputs, targets, truncated = sft_example(tokenizer, [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}], 40)
    assert truncated and len(inputs) == len(targets) == 40


def test_pretrain_ddp_equals_single_process(world, tmp_path):
    """2 ranks with the same global batch give the losses of one process (to float rounding)."""
    args = [*TINY_PRETRAIN(world), "--steps", "4", "--save-every", "1000"]
    run_ok(os.path.join(ROOT, "pretrain.py"), *args, "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "pretrain.py"), *args, "--out", str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])
    assert result.stdout.count("pretrain | step 4/4") == 1  # only rank 0 prints


def test_sft_ddp_equals_single_process(world, tmp_path):
    args = [*TINY_SFT(world), "--steps", "3", "--save-every", "1000"]
    run_ok(os.path.join(ROOT, "sft.py"), *args, "--out", str(tmp_path / "single.pt"))
    result = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "sft.py"), *args, "--out", str(tmp_path / "ddp.pt")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = losses(tmp_path / "single.jsonl"), losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == [1, 2, 3]
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_after_kill_reproduces_the_loss_curve(world, tmp_path, stage):
    """kill -9 mid-run, --resume, and the loss curve is the uninterrupted one, exactly."""
    script = os.path.join(ROOT, f"{stage}.py")
    args = [*(TINY_PRETRAIN(world) if stage == "pretrain" else TINY_SFT(world)), "--steps", "120", "--save-every", "4"]
    run_ok(script, *args, "--out", str(tmp_path / "full.pt"))
    process = subprocess.Popen([PY, script, *args, "--out", str(tmp_path / "killed.pt")], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 11):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert "optimizer" in checkpoint and 8 <= checkpoint["step"] < 120  # killed mid-run, after a save
    run_ok(script, *args, "--out", str(tmp_path / "killed.pt"), "--resume")
    full, resumed = losses(tmp_path / "full.jsonl"), losses(log)
    assert sorted(full) == sorted(resumed) == list(range(1, 121))
    assert full == resumed  # exact: same batches, same weights, same optimizer state
    final = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert "optimizer" not in final and final["step"] == 120
    assert all(torch.equal(final["model"][k], v) for k, v in torch.load(tmp_path / "full.pt", weights_only=True)["model"].items())


def test_pretrain_bad_input(world, tmp_path):
    out = tmp_path / "p.pt"
    line = run_error("pretrain.py", *TINY_PRETRAIN(world), "--tokenizer", str(tmp_path / "none.json"), "--out", str(out))
    assert "tokenizer.py" in line
    (tmp_path / "empty.txt").write_text("\n\n\n")
    assert "empty" in run_error("pretrain.py", *TINY_PRETRAIN(world), "--data", str(tmp_path / "empty.txt"), "--out", str(out))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    assert "bad.jsonl:2" in run_error("pretrain.py", *TINY_PRETRAIN(world), "--data", str(tmp_path / "bad.jsonl"), "--out", str(out))
    assert not out.exists()


def test_sft_bad_input(world, tmp_path):
    out = tmp_path / "s.pt"
    assert "pretrain.py" in run_error("sft.py", *TINY_SFT(world), "--init", str(tmp_path / "pretrain.pt"), "--out", str(out))
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    assert "broken.jsonl:2" in run_error("sft.py", *TINY_SFT(world), "--data", str(tmp_path / "broken.jsonl"), "--out", str(out))
    (tmp_path / "noassistant.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    line = run_error("sft.py", *TINY_SFT(world), "--data", str(tmp_path / "noassistant.jsonl"), "--out", str(out))
    assert "noassistant.jsonl:1" in line and "assistant" in line
    assert not out.exists() and not (tmp_path / "s.jsonl").exists()
