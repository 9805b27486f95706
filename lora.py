"""
lora.py: LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen model with a trainable low-rank update
on chosen linear layers, y = W x + b + (alpha / r) B A dropout(x). Imported by a stage only when
`--lora-rank` is set.

    from lora import add_lora, lora_disabled
    add_lora(model, rank=8)                 # freezes the model, adapts q/k/v/o_proj
    with lora_disabled(model):              # the frozen base: DPO's, GRPO's and PPO's reference
        ref_logp = completion_logprobs(model, ...)

Implementation details:
1. A (r, in) is Kaiming-uniform as PEFT, B (out, r) zero, so a fresh adapter changes nothing; only
   A and B train, and the names are PEFT's (`...q_proj.lora_A.weight`); W and b keep theirs.
2. `lora_disabled` switches the adapters off: the reference model without a second copy (as TRL
   does with a PEFT model).
3. A checkpoint holds the merged weights W + (alpha / r) B A under "model", so every later stage
   reads it as any other, and the adapter under "lora" (hf.py export-adapter writes it for PEFT).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update:
    y = W x + b + (alpha / r) B A dropout(x)."""
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base layer's own tensors, not copies
        kwargs = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kwargs)   # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, **kwargs)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init of A
        nn.init.zeros_(self.lora_B.weight)                            # B = 0: starts as a no-op
        self.lora_dropout = nn.Dropout(dropout)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.merged, self.enabled = False, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self):
        """The update as a matrix (out, in): (alpha / r) B A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self):  # W <- W + (alpha / r) B A: one matmul per layer, as fast as the base model
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def add_lora(model, rank, alpha=16.0, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj"):
    """Freeze `model` and put a LoRA adapter on every linear layer named in `targets`
    (comma-separated), in place."""
    names = [name.strip() for name in targets.split(",") if name.strip()]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: the rank of a LoRA update is at least 1 "
                         "(0 = no LoRA)")
    if alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"--lora-alpha {alpha} must be > 0 and --lora-dropout {dropout} in [0, 1)")
    if unknown or not names:
        raise ValueError(f"--lora-targets {targets!r}: "
                         f"{'unknown layer ' + repr(unknown[0]) if unknown else 'empty'} "
                         f"(choose among {', '.join(LORA_TARGETS)})")
    # for each target name, every (parent module, linear layer) pair with that name
    found = {name: [(parent, child) for parent in model.modules()
                    for child_name, child in parent.named_children()
                    if child_name == name and isinstance(child, nn.Linear)]
             for name in names}
    missing = [name for name, layers in found.items() if not layers]
    # the routed experts of a mixture are fused 3-D tensors, not linear layers (a shared expert is)
    if missing:
        raise ValueError(f"--lora-targets {targets!r}: this model has no linear layer named "
                         f"{missing[0]!r}")
    model.requires_grad_(False)
    for name, layers in found.items():
        for parent, child in layers:
            setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return model


@contextmanager
def lora_disabled(model):
    """Run `model` as its frozen base (a reference model): adapters off, eval mode. A no-op for a
    model without adapters, or None."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)] if model is not None else []
    if any(layer.merged for layer in layers):
        raise ValueError("lora_disabled needs the adapters unmerged")
    training = model is not None and model.training
    for layer in layers:
        layer.enabled = False
    if layers:
        model.eval()
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        if layers:
            model.train(training)


@torch.no_grad()
def merged_state_dict(model):
    """(state_dict with every adapter merged into its weight, the adapter {"rank", "alpha",
    "dropout", "targets", "weights"} or None if none): what save_checkpoint writes (detail 3)."""
    state = model.state_dict()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return state, None
    weights = {key: state.pop(key) for key in list(state) if ".lora_" in key}
    for name, layer in layers.items():
        if not layer.merged:
            state[name + ".weight"] = layer.weight + layer.delta().to(layer.weight.dtype)
    first = next(iter(layers.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers}, key=LORA_TARGETS.index)
    return state, {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p,
                   "targets": targets, "weights": weights}
