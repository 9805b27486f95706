"""
fsdp.py: the stages' --fsdp: each rank holds 1/N of the weights, gradients and optimizer state
(FSDP2, PyTorch's `fully_shard`), and the checkpoints stay model.py's full files. Imported by a
stage only when `--fsdp` is set, under torchrun (as lora.py with --lora-rank): else none needs it.

    torchrun --nproc_per_node 8 sft.py --fsdp --grad-accum 1

    from fsdp import gathered, shard
    shard(model, optimizer, bf16=True)     # in place, once the optimizer is made (and resumed)
    full = gathered(model)                 # on every rank: a plain copy with every weight

Implementation details:
1. `fully_shard` on each Transformer block, then on the root (embeddings, final norm, head): a
   block's weights are all-gathered just before it runs (forward and backward) and freed after;
   gradients are reduce-scattered, averaged over the ranks as DDP's. bf16: bf16 compute, fp32
   weights and fp32 reductions (MixedPrecisionPolicy).
2. The optimizer is made before sharding, as under DDP; `shard` puts the shards in its place of each
   parameter and cuts a resumed run's state (the checkpoint's full tensors) to this rank's slice.
3. Micro-batches: the sharded model gets DDP's `no_sync` as a no-op, so every micro-batch's
   gradients are reduce-scattered into the shards and no full gradient is held between them.
4. LoRA: the frozen base and the adapters are sharded alike, in the same units (FSDP2 shards each
   parameter on its own, so frozen and trained ones mix); only the adapters get gradients.
5. Checkpoints (model.save_checkpoint calls `gathered` for a sharded model): every rank takes part
   in gathering each tensor in turn; rank 0 keeps it on its CPU and writes the full file, and the
   optimizer state full too (`full_tensors`): the format of a one-process run, read by everything.
6. Generation (engine.rollout, engine.generate): a sharded model would all-gather every block at
   every decoded token, and a rank whose replies end first would stop calling it while the others
   wait; `gathered` makes a plain copy once (one all-gather of the weights, 4 bytes per parameter).
7. Muon (model.py detail 10): Newton-Schulz mixes every row of a matrix, so each rank all-gathers
   each matrix's update, orthogonalises the whole of it and keeps its rows (model.orthogonalised):
   the momentum stays sharded; the Newton-Schulz compute is repeated on every rank, not split.
"""
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model import Transformer, unwrap


def shard(model, optimizer, bf16=False):
    """Split `model` over the ranks in place (detail 1) and give `optimizer` the shards (detail 2).
    Every rank must hold the same full weights before (the same seed or checkpoint). Without
    torchrun (one process, no process group) there is nothing to split: the model stays whole."""
    if not dist.is_initialized():
        return model
    names = {p: name for name, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.no_sync = nullcontext  # detail 3
    shards = dict(model.named_parameters())  # the same names, DTensors now
    for group in optimizer.param_groups:
        group["params"] = [shards[names[p]] for p in group["params"]]
    optimizer.state = defaultdict(dict, {
        shards[names[p]]: {key: slice_like(value, shards[names[p]]) for key, value in state.items()}
        for p, state in optimizer.state.items()})
    return model


def slice_like(value, param):
    """This rank's slice of a full optimizer-state tensor shaped as `param` (exp_avg, exp_avg_sq,
    Muon's momentum_buffer); anything else (the step count) as it is. No communication: every rank
    holds the full tensor."""
    if not torch.is_tensor(value) or value.dim() == 0 or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def full_tensors(tree, device=None, rank0_only=False):
    """`tree` (dicts, lists, tensors) with each sharded tensor gathered whole, in turn, to `device`
    (a collective: every rank calls it). rank0_only: the other ranks drop each one (None)."""
    keep = not rank0_only or dist.get_rank() == 0
    if isinstance(tree, dict):
        return {key: full_tensors(value, device, rank0_only) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_tensors(value, device, rank0_only) for value in tree)
    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.to(device or full.device) if keep else None
    return tree


@torch.no_grad()
def gathered(model, device=None, rank0_only=False):
    """A plain copy of a sharded model with every weight, on `device` (the shards' by default), in
    eval or train mode as `model`, no gradients. A collective: every rank calls it; rank0_only: the
    others get None (what save_checkpoint needs). A model that is not sharded: itself."""
    model = unwrap(model)
    if not isinstance(model, FSDPModule):
        return model
    state = full_tensors(model.state_dict(), device, rank0_only)
    if rank0_only and dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # the structure without memory; the weights come from `state`
        copy = Transformer(model.config)
        if any(".lora_A." in name for name in state):  # detail 4: the same adapters
            add_same_lora(copy, model)
    copy.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # not in the state dict (RoPE's inv_freq)
        module, _, attribute = name.rpartition(".")
        setattr(copy.get_submodule(module), attribute, buffer.to(device or buffer.device))
    if model.config.head == "lm" and model.config.tie_word_embeddings:
        copy.lm_head.weight = copy.model.embed_tokens.weight  # tied again, as Transformer does
    return copy.requires_grad_(False).train(model.training)


def add_same_lora(copy, model):
    """Give `copy` the adapters of `model`: the same rank, alpha, dropout and target layers."""
    from lora import LoRALinear, add_lora
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    first = next(iter(layers.values()))
    targets = ",".join(sorted({name.rsplit(".", 1)[-1] for name in layers}))
    add_lora(copy, first.rank, first.alpha, first.lora_dropout.p, targets)
