"""
model.py: the Transformer every stage trains, batched KV-cache generation, per-token log-probs of
completions, and the one checkpoint format. A Qwen2 / Llama decoder (RMSNorm, RoPE, GQA, SwiGLU,
optional mixture of experts) with Hugging Face parameter names, so a state_dict copies key for key
into `Qwen2ForCausalLM` (tests check the logits match).

    python model.py sample out/pretrain.pt --prompt "Once upon a time"   # continue a text
    python model.py sample out/sft.pt --prompt "hi" --temperature 0      # greedy
    echo "What is 2+3?" | python model.py chat out/sft.pt                # ChatML chat, reads stdin
    python model.py export out/sft.pt hf/sft                             # to transformers (hf.py)

Implementation details (tagged `# detail N` in the code):
 1. RMSNorm is computed in float32 and cast back, as Hugging Face does, so bf16 runs stay stable.
 2. RoPE rotates the two halves of each head (`rotate_half`, HF layout, not interleaved pairs);
    YaRN scaling blends interpolated and original frequencies per dimension and scales cos/sin.
 3. Padding: attention is causal AND the key is a real token; a query always sees itself, so rows
    of pure padding stay finite. Positions count real tokens (cumsum of the mask - 1), so a
    left-padded prompt gets the same positions as the unpadded one. No mask and no cache takes the
    `is_causal=True` fast path of `F.scaled_dot_product_attention`.
 4. GQA: SDPA's `enable_gqa` shares each key/value head across its query heads without a copy.
 5. Init: N(0, 0.02), with the projections that write into the residual stream (o_proj,
    down_proj) scaled by 1/sqrt(2 * layers), as GPT-2 / nanoGPT.
 6. MoE: softmax router, top-k experts per token, weights renormalised over the chosen k
    (Mixtral); Switch-Transformer load-balancing loss, averaged over layers as in HF.
 7. Memory-lean loss (the idea behind StreamBP / Liger's fused linear cross-entropy): the lm head
    and cross-entropy run in chunks of rows and the gradients wrt hidden states and head weight
    are computed right there in the forward, so only one chunk of logits ever exists.
 8. Generation: prompts left-padded, one prefill, then one token per step into a KV cache
    allocated once; a row that emitted EOS keeps emitting pad (masked) until all rows are done.
    With `group_size` G (GRPO's G replies to a prompt), each prompt is prefilled once and its cache
    repeated for its G rows.
 9. generate's log-probs are those of the distribution actually sampled from (after temperature,
    top-k, top-p; greedy gives the model's own); without top-k/top-p they equal `completion_logprobs`
    at the same temperature, which is what the RL stages recompute with gradients.
10. `completion_logprobs`: one forward over prompt + completion, logits kept only for the
    completion, log p = logit[token] - logsumexp(logits), so one (B, N, V) tensor is held. Where
    several replies share a prompt (GRPO's G replies: `group_size`; DPO's chosen and rejected:
    `shared_prompt_logprobs`), each prompt runs once into a KV cache that keeps gradients (grown by
    concatenation, never written in place), repeated per reply or branched per reply set, and the
    replies run on top of it: the same log-probs and gradients to rounding, the prompt's cost paid
    once (with dropout > 0 the replies of a prompt would share its dropout mask; the default is 0).
11. Checkpoints are plain dicts read with `torch.load(weights_only=True)` (no code runs on load)
    and written atomically (`path.tmp`, then `os.replace`).
12. LoRA (Hu et al. 2021, arXiv:2106.09685): `add_lora` freezes the model and gives each chosen
    linear layer a trainable update, y = W x + b + (alpha / r) B A dropout(x), A (r, in) initialised
    as PEFT does (Kaiming-uniform), B (out, r) at zero, so a fresh adapter changes nothing. Only A
    and B train: AdamW holds two moments for them alone. The names are PEFT's
    (`...q_proj.lora_A.weight`), W and b keep theirs. `lora_disabled` switches the adapters off,
    which gives the frozen base model (DPO's, GRPO's and PPO's reference) without a second copy.
    A checkpoint of a LoRA model holds the merged weights W + (alpha / r) B A under "model", so every
    later stage reads it as any other, and the adapter under "lora" (hf.py export-adapter writes it
    for PEFT).
"""
import argparse
import functools
import math
from contextlib import contextmanager
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer, final_answer, thinks

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "distill")  # for "run X first" hints
CHUNK_LOGITS = 2 ** 23  # logits held at once by the chunked loss (32 MB in float32)


@dataclass
class ModelConfig:
    """Field names as Hugging Face's Qwen2Config / Qwen2MoeConfig. The default is a tiny CPU model."""
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2              # < num_attention_heads = grouped-query attention
    max_position_embeddings: int = 256        # the context length
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # {"type": "yarn", "factor": f, "original_max_position_embeddings": n}
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True               # bias on q/k/v projections (Qwen2)
    tie_word_embeddings: bool = True          # lm_head shares the embedding matrix
    num_experts: int = 0                      # 0 = dense SwiGLU MLP; > 0 = mixture of experts
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 0  # > 0 adds an always-on expert with a sigmoid gate (Qwen2-MoE)
    norm_topk_prob: bool = True               # renormalise the top-k router weights to sum to 1
    router_aux_loss_coef: float = 0.001       # weight of the load-balancing loss (Qwen2-MoE default)
    head: str = "lm"                          # "lm": next-token logits; "score": a scalar per position
    dropout: float = 0.0


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # y = w * x / sqrt(mean(x^2) + eps), in float32 (detail 1)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(config):
    """Inverse frequencies (head_dim/2,) and cos/sin scale; YaRN per arXiv:2309.00071, as HF (detail 2)."""
    dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if not config.rope_scaling:
        return inv_freq, 1.0
    if config.rope_scaling.get("type", config.rope_scaling.get("rope_type")) != "yarn":
        raise ValueError(f"rope_scaling {config.rope_scaling} is not supported: only YaRN")
    factor, original = config.rope_scaling["factor"], config.rope_scaling["original_max_position_embeddings"]
    # dimensions that turn more than 32 times over the original context keep their frequency, those
    # that turn less than once are interpolated (divided by factor), a linear ramp in between
    def dim_of(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))
    low, high = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.dropout = layer_idx, config.dropout
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        # rotate (x1, x2) by angle pos * freq: x * cos + rotate_half(x) * sin (detail 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                                  # (B, KV, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # detail 4
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                           # (B, T, C)


class MLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        # SwiGLU: down(silu(gate(x)) * up(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts as 3-D tensors, stored as transformers 5.x stores Qwen2-MoE experts."""
    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, experts, weights):  # x (N, C); experts, weights (N, k)
        y = torch.zeros_like(x)
        for e in experts.unique().tolist():  # only the experts some token chose
            token, slot = torch.where(experts == e)  # tokens routed to e, and which of their k picks it is
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, self.down_proj[e])
            y.index_add_(0, token, out * weights[token, slot, None])
        return y


class SparseMoeBlock(nn.Module):
    """Top-k routed experts plus an optional shared expert (Qwen2-MoE; Mixtral without it) (detail 6)."""
    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                                   # (N, C)
        router_logits = self.gate(x)                                              # (N, E)
        probs = router_logits.softmax(dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)                         # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        y = self.experts(x, experts, weights.to(x.dtype))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(B, T, C), router_logits


def load_balancing_loss(router_logits, top_k, mask=None):
    """Switch Transformer eq. 4-6, pooled over layers as HF's load_balancing_loss_func (detail 6).
    aux = E * sum_e f_e * P_e; f_e = share of top-k picks that go to e, P_e = mean router prob of e."""
    probs = torch.cat(router_logits).softmax(dim=-1, dtype=torch.float)       # (layers * N, E)
    picked = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()  # (layers * N, E)
    weight = probs.new_ones(probs.shape[0]) if mask is None else mask.reshape(-1).float().repeat(len(router_logits))
    f = (picked * weight[:, None]).sum(0) / weight.sum()
    P = (probs * weight[:, None]).sum(0) / weight.sum()
    return probs.shape[-1] * (f * P).sum()


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.num_experts > 0
        self.mlp = SparseMoeBlock(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        if self.is_moe:
            y, router_logits = self.mlp(self.post_attention_layernorm(x))
        else:
            y, router_logits = self.mlp(self.post_attention_layernorm(x)), None
        return x + self.resid_dropout(y), router_logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T) over targets != -100, one chunk of rows at a time (detail 7)."""
    @staticmethod
    def forward(ctx, hidden, weight, targets, needs_grad):  # hidden (N, C), weight (V, C), targets (N,)
        count = (targets != -100).sum().clamp(min=1)   # an all-ignored batch gives 0, not NaN
        loss = torch.zeros((), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float) if needs_grad and ctx.needs_input_grad[1] else None
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        for i in range(0, hidden.shape[0], rows):
            h, t = hidden[i:i + rows], targets[i:i + rows]
            valid, t = t != -100, t.clamp(min=0)
            logp = (h @ weight.T).float().log_softmax(dim=-1)  # (n, V): the only logits alive
            loss -= (logp.gather(1, t[:, None]).squeeze(1) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # dloss/dlogits = (softmax(logits) - onehot(t)) / count, zero on ignored rows
            grad = logp.exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad = grad.mul_((valid / count)[:, None]).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[i:i + rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden, weight, targets):
    """= F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100), without storing the logits."""
    return ChunkedCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled())


class KVCache:
    """Keys and values of every layer, allocated once for B rows and max_len positions (detail 8).
    grow=True keeps them as tensors that each update concatenates to instead: slower to decode with,
    but no write in place, so gradients flow through the cache (detail 10)."""
    def __init__(self, config, batch_size, max_len, device=None, grow=False):
        self.shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                      config.hidden_size // config.num_attention_heads)
        self.keys = self.values = None   # allocated by the first update, in the dtype of the keys
        self.grown = [None] * config.num_hidden_layers if grow else None  # per layer (keys, values) so far
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.length = 0                  # slots filled so far

    def update(self, layer, k, v):  # k, v (B, KV, T, D) -> all keys and values so far (B, KV, S, D)
        if self.grown is not None:
            past = self.grown[layer]
            self.grown[layer] = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
            return self.grown[layer]
        if self.keys is None:
            self.keys = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def branch(self):
        """A cache that goes on from this one's state and leaves it as it is (grow=True only: the tensors so
        far are shared, never written): several completions of the same prompts, one after the other."""
        if self.grown is None:
            raise ValueError("only a grow=True cache can branch: a preallocated one is written in place")
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__, grown=list(self.grown), mask=self.mask.clone())
        return other

    def repeat_rows(self, n):
        """Each row n times in a row (row i -> rows i*n .. i*n+n-1): one prompt's cache for its n replies."""
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.shape = (self.shape[0], self.shape[1] * n, *self.shape[2:])
        if self.grown is not None:
            self.grown = [None if kv is None else (kv[0].repeat_interleave(n, 0), kv[1].repeat_interleave(n, 0))
                          for kv in self.grown]
        elif self.keys is not None:
            self.keys, self.values = self.keys.repeat_interleave(n, dim=1), self.values.repeat_interleave(n, dim=1)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        if config.head == "lm":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        elif config.head == "score":
            self.score = nn.Linear(config.hidden_size, 1, bias=False)  # as Qwen2ForSequenceClassification
        else:
            raise ValueError(f"head must be 'lm' or 'score', got {config.head!r}")
        inv_freq, self.rope_scale = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # detail 5: residual projections scaled down with depth
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.num_hidden_layers))
        if config.head == "lm" and config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, std=0.02)

    def forward(self, input_ids, targets=None, attention_mask=None, position_ids=None, kv_cache=None,
                logits_to_keep=0):
        """input_ids (B, T); targets (B, T) with -100 = ignore; attention_mask (B, T) 1 = real token.
        head "lm": (logits (B, T, V), None), or (None, loss) with targets; head "score": (values (B, T), None).
        logits_to_keep=n computes the head only for the last n positions (as HF)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)                                   # (B, T, C)
        mask = None  # detail 3: None = the is_causal fast path
        if attention_mask is not None or kv_cache is not None:
            start = kv_cache.length if kv_cache is not None else 0
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if kv_cache is not None:
                kv_cache.mask[:, start:start + T] = real
                real = kv_cache.mask[:, :start + T]                              # (B, S) every key so far
            if position_ids is None:
                position_ids = (real.cumsum(-1)[:, start:] - 1).clamp(min=0)     # (B, T)
            query = torch.arange(start, start + T, device=x.device)[:, None]
            key = torch.arange(start + T, device=x.device)[None, :]
            mask = ((key <= query) & real[:, None, None, :]) | (key == query)   # (B, 1, T, S)
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None, :]
        freqs = position_ids[..., None].float() * self.inv_freq                  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]                      # (B, 1, T, D)
        cos, sin = (angles.cos() * self.rope_scale).to(x.dtype), (angles.sin() * self.rope_scale).to(x.dtype)
        router_logits = []
        for block in self.model.layers:
            x, logits = block(x, cos, sin, mask, kv_cache)
            if logits is not None:
                router_logits.append(logits)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.length += T
        if self.config.head == "score":
            if targets is not None:
                raise ValueError("a score-head model has no next-token loss: call it without targets")
            return self.score(x[:, -logits_to_keep:]).squeeze(-1).float(), None  # (B, T)
        if targets is None:
            # contiguous: matmul folds a strided slice one way when the weight requires grad and another when
            # not (a frozen reference), which would differ from the policy's logits in the last bit
            return self.lm_head(x[:, -logits_to_keep:].contiguous()).float(), None  # (B, T, V)
        loss = chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if router_logits:
            aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask)
            loss = loss + self.config.router_aux_loss_coef * aux
        return None, loss

    def num_params(self, non_embedding=True):
        """Parameters; non_embedding drops the input embedding (a lookup, no FLOPs) unless it is also the lm head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not (self.config.tie_word_embeddings and self.config.head == "lm"):
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6 per active weight + 12 * L * C * T (attention)."""
        cfg, active = self.config, self.num_params(non_embedding=True)
        if cfg.num_experts:  # a token runs only k of the E routed experts
            routed = sum(block.mlp.experts.gate_up_proj.numel() + block.mlp.experts.down_proj.numel()
                         for block in self.model.layers)
            active -= routed * (1 - cfg.num_experts_per_tok / cfg.num_experts)
        return 6 * active + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (e.g. 989e12 for H100 bf16)."""
        return self.flops_per_token(self.config.max_position_embeddings) * tokens_per_second / peak_flops

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW; weight decay on the 2-D (and 3-D expert) weight matrices only, not on norms, biases, embeddings."""
        embedding = self.model.embed_tokens.weight
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and p is not embedding]
        no_decay = [p for p in params if p.dim() < 2 or p is embedding]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


# ----------------------------------------------------------------------------- LoRA (detail 12)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + (alpha / r) B A dropout(x)."""
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base layer's own tensors, not copies
        kwargs = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kwargs)   # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, **kwargs)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init of A
        nn.init.zeros_(self.lora_B.weight)                            # B = 0: the update starts at zero
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
    def merge(self):  # W <- W + (alpha / r) B A: one matmul per layer again, as fast as the base model
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def add_lora(model, rank, alpha=16.0, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj"):
    """Freeze `model` and put a LoRA adapter on every linear layer named in `targets` (comma-separated), in place."""
    names = [name.strip() for name in targets.split(",") if name.strip()]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: the rank of a LoRA update is at least 1 (0 = no LoRA)")
    if alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"--lora-alpha {alpha} must be > 0 and --lora-dropout {dropout} in [0, 1)")
    if unknown or not names:
        raise ValueError(f"--lora-targets {targets!r}: {'unknown layer ' + repr(unknown[0]) if unknown else 'empty'} "
                         f"(choose among {', '.join(LORA_TARGETS)})")
    found = {name: [(parent, child) for parent in model.modules() for child_name, child in parent.named_children()
                    if child_name == name and isinstance(child, nn.Linear)] for name in names}
    missing = [name for name, layers in found.items() if not layers]
    if missing:  # the routed experts of a mixture are fused 3-D tensors, not linear layers (a shared expert is one)
        raise ValueError(f"--lora-targets {targets!r}: this model has no linear layer named {missing[0]!r}")
    model.requires_grad_(False)
    for name, layers in found.items():
        for parent, child in layers:
            setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return model


@contextmanager
def lora_disabled(model):
    """Run `model` as its frozen base (a reference model): adapters off, eval mode. No-op without adapters."""
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
    """(state_dict with every adapter merged into its weight, the adapter {"rank", "alpha", "dropout", "targets",
    "weights"} or None without one): what save_checkpoint writes (detail 12)."""
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
    return state, {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p, "targets": targets,
                   "weights": weights}


# ----------------------------------------------------------------------------- batches and generation

def unwrap(model):
    """The Transformer inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# random batches (sft.py, reward.py, dpo.py, distill.py): every example once an epoch, in a fresh order
def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples (conversations, pairs...) in the global batch of `step`, a function of (seed, step)
    only: each epoch is a fresh permutation cut into whole batches (a random remainder waits for the next).
    Not length-bucketed: batches sorted by length are all-short or all-long, so whatever goes with a
    reply's length is taught in alternation; SFT demos that think first (long) then lost to bare answers
    (short), and the model chose <think> with probability ~0.05 where 30 % of the demos think."""
    epoch, index = divmod(step, n_examples // batch_size)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def left_pad(seqs, pad_id, device=None):
    """Token lists -> ids (B, T) padded on the left with pad_id, mask (B, T) 1 on real tokens."""
    seqs = [s.tolist() if torch.is_tensor(s) else list(s) for s in seqs]
    T = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def right_pad(seqs, pad_id, device=None):
    """Token lists -> ids (B, T) padded on the right with pad_id, mask (B, T) 1 on real tokens."""
    seqs = [s.tolist() if torch.is_tensor(s) else list(s) for s in seqs]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next token (B,) and its log-prob under the distribution sampled from (B,) (detail 9).
    temperature 0 = greedy, with the log-prob under the untempered model."""
    if temperature < 0 or not 0 <= top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in [0, 1], got {temperature} and {top_p}")
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return token, logits.log_softmax(dim=-1).gather(1, token[:, None]).squeeze(1)
    logits = logits / temperature
    if top_k > 0:  # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop[:, 0] = False  # the most likely token always stays (top_p 0 is greedy, as HF)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    logp = logits.log_softmax(dim=-1)                                            # (B, V)
    token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, pad_id=0,
             generator=None, group_size=1):
    """Sample completions of a batch of token lists (detail 8). Returns completions (B, N) right-padded
    with pad_id, log-probs of the sampled tokens (B, N) and completion_mask (B, N), 1.0 up to and
    including each row's EOS. N <= max_new_tokens: it stops when every row has hit EOS.
    group_size=G: the prompts come in runs of G equal ones (GRPO), and each is prefilled once."""
    model = unwrap(model)  # no gradient sync or compilation needed to sample
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate needs at least one prompt and no empty prompt (start it with <|endoftext|>)")
    ids, mask = left_pad(prompts, pad_id, device)                               # (B, P)
    B, P = ids.shape
    check_groups(ids, mask, group_size)
    if max_new_tokens < 1 or P + max_new_tokens > context:
        raise ValueError(f"a prompt of {P} tokens + {max_new_tokens} new tokens is longer than the context "
                         f"({context}): shorten the prompt or lower max_new_tokens")
    cache = KVCache(model.config, B // group_size, P + max_new_tokens, device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits, _ = model(ids[::group_size], attention_mask=mask[::group_size], kv_cache=cache, logits_to_keep=1)  # prefill
    if group_size > 1:  # each prompt's keys, values and next-token logits, once per reply
        cache.repeat_rows(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)                     # (B, 1, V)
    for step in range(max_new_tokens):
        token, logp = sample_token(logits[:, -1].float(), temperature, top_k, top_p, generator)
        tokens[:, step] = token.masked_fill(done, pad_id)
        logps[:, step] = logp.masked_fill(done, 0.0)
        was_done = done
        if eos_id is not None:
            done = done | (token == eos_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits, _ = model(tokens[:, step:step + 1], attention_mask=~was_done[:, None], kv_cache=cache,
                          logits_to_keep=1)
    n = step + 1
    completion_mask = torch.ones(B, n, device=device)
    if eos_id is not None:  # 1 up to and including the first EOS
        is_eos = (tokens[:, :n] == eos_id).long()
        completion_mask = ((is_eos.cumsum(dim=1) - is_eos) == 0).float()
    return tokens[:, :n], logps[:, :n], completion_mask


def join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Left-padded prompts + right-padded completions -> ids, mask (B, P + N): pads only at the two ends."""
    return (torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask.long(), completion_mask.long()], dim=1))


def check_groups(prompt_ids, prompt_mask, group_size):
    """One-line error unless the rows come in runs of group_size equal (left-padded) prompts."""
    B, P = prompt_ids.shape
    if group_size < 1 or B % group_size or (group_size > 1 and (
            (prompt_ids.reshape(-1, group_size, P) != prompt_ids[::group_size, None]).any()
            or (prompt_mask.reshape(-1, group_size, P) != prompt_mask[::group_size, None]).any())):
        raise ValueError(f"group_size {group_size}: every {group_size} adjacent rows must share one prompt")


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                        return_entropy=False, group_size=1):
    """log pi(completion token t | prompt, completion[:t]) (B, N) with logits / temperature, 0 where the mask
    is 0 (detail 10). Prompts left-padded, completions right-padded. Optionally the entropy (B, N) too.
    group_size=G: rows come in groups of G adjacent rows with the same prompt (GRPO), and each prompt
    runs through the model once instead of G times."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: log-probs need a temperature > 0 (greedy has none)")
    G, N = group_size, completion_ids.shape[1]
    check_groups(prompt_ids, prompt_mask, G)
    if G > 1:
        [logits] = shared_prompt_logits(model, prompt_ids[::G], prompt_mask[::G], [(completion_ids, completion_mask)], G)
    else:
        ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
        logits = model(ids, attention_mask=mask, logits_to_keep=N + 1)[0][:, :-1]   # (B, N, V)
    return token_logprobs(logits, completion_ids, completion_mask, temperature, return_entropy)


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, completions, temperature=1.0):
    """completion_logprobs of several completion sets [(ids (B, N_i), mask (B, N_i)), ...] of the same
    prompts (DPO's chosen and rejected replies), each prompt run once: [(B, N_i), ...]."""
    logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completions)
    return [token_logprobs(set_logits, ids, mask, temperature) for set_logits, (ids, mask) in zip(logits, completions)]


def token_logprobs(logits, completion_ids, completion_mask, temperature=1.0, return_entropy=False):
    """logits (B, N, V) at the positions that predict completion tokens -> log-probs (B, N) [, entropy]."""
    if logits.dim() != 3:
        raise ValueError("log-probs need a model with the lm head, not the score head")
    logits = logits.float() / temperature                            # (B, N, V): position t predicts token t
    lse = logits.logsumexp(dim=-1)                                               # (B, N)
    logp = (logits.gather(2, completion_ids[..., None]).squeeze(2) - lse) * completion_mask
    if not return_entropy:
        return logp
    # H = logsumexp(z) - sum_v softmax(z)_v z_v
    entropy = (lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)) * completion_mask
    return logp, entropy


# detail 10: each prompt once, then every completion attends to that prompt's keys and values
def shared_prompt_logits(model, prompt_ids, prompt_mask, completions, group_size=1):
    """For each (completion_ids, completion_mask) of `completions`, rows i*G .. i*G+G-1 (G = group_size)
    completing prompt i: the logits (B * G, N, V) at the positions that predict its tokens, as one
    joined forward of prompt + completion gives them."""
    B, P = prompt_ids.shape
    longest = max(ids.shape[1] for ids, _ in completions)
    cache = KVCache(unwrap(model).config, B, P + longest, prompt_ids.device, grow=True)
    first, _ = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache, logits_to_keep=1)  # (B, 1, V)
    if group_size > 1:
        first = first.repeat_interleave(group_size, dim=0)                       # predicts completion token 0
        cache.repeat_rows(group_size)
    out = []
    for ids, mask in completions:
        if ids.shape[1] == 1:
            out.append(first)
            continue
        rest, _ = model(ids[:, :-1], attention_mask=mask[:, :-1], kv_cache=cache.branch())  # (B * G, N - 1, V)
        out.append(torch.cat([first, rest], dim=1))
    return out


def completion_values(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Score-head output V(s_t) (B, N) at the position that predicts completion token t; 0 where the mask is 0."""
    ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    values, _ = model(ids, attention_mask=mask, logits_to_keep=completion_ids.shape[1] + 1)
    return values[:, :-1] * completion_mask


def sequence_scores(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Score-head output (B,) at the last real token of prompt + completion (a reward)."""
    ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    values, _ = model(ids, attention_mask=mask)                                  # (B, T)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1)


def reply_texts(tokenizer, completion_ids, completion_mask):
    """The text of each reply (before its <|im_end|>, or all of it if it never ended) and whether it ended (B,)."""
    lengths = completion_mask.sum(dim=1).long()  # (B,) tokens up to and including EOS
    ended = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1) == tokenizer.im_end_id
    texts = [tokenizer.decode(row[: n - int(end)]) for row, n, end in zip(completion_ids.tolist(), lengths.tolist(), ended.tolist())]
    return texts, ended


def heldout_accuracy(model, tokenizer, records, max_new_tokens=32, batch_size=128):
    """Greedy replies to held-out {"prompt", "answer", "family"} records, the way every stage scores them:
    "accuracy" (final_answer(reply) == answer.strip(), tokenizer.py's one rule), "think_rate" (the reply
    starts with <think>), "well_formed" (it closed with <|im_end|> within max_new_tokens) and
    "accuracy/<family>" for each task family; "replies" holds the reply texts (for a win rate)."""
    was_training = model.training
    model.eval()
    replies, correct, closed, families = [], [], [], []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts = [tokenizer.encode_prompt(record["prompt"]) for record in batch]
        completions, _, mask = generate(model, prompts, max_new_tokens, temperature=0, eos_id=tokenizer.im_end_id,
                                        pad_id=tokenizer.pad_id)
        texts, ended = reply_texts(tokenizer, completions, mask)
        for record, text in zip(batch, texts):
            replies.append(text)
            correct.append(final_answer(text) == str(record.get("answer", "")).strip())
            families.append(record.get("family"))
        closed += ended.tolist()
    model.train(was_training)
    n = max(len(correct), 1)
    result = {"accuracy": sum(correct) / n, "think_rate": sum(map(thinks, replies)) / n, "well_formed": sum(closed) / n}
    for family in sorted({f for f in families if f is not None}):
        hits = [c for c, f in zip(correct, families) if f == family]
        result[f"accuracy/{family}"] = sum(hits) / len(hits)
    result["replies"] = replies
    return result


def format_accuracy(result):
    """heldout_accuracy's dict as one line: accuracy 41.7% (add 80%, sub 25%) | think 30.0% | well-formed 97.5%."""
    families = ", ".join(f"{key.split('/', 1)[1]} {value:.0%}" for key, value in result.items()
                         if key.startswith("accuracy/"))
    return (f"accuracy {result['accuracy']:.1%}" + (f" ({families})" if families else "")
            + f" | think {result['think_rate']:.1%} | well-formed {result['well_formed']:.1%}")


# ----------------------------------------------------------------------------- checkpoints (detail 11)

def save_checkpoint(path, model, tokenizer, stage, parent=None, step=0, args=None, metrics=None, **extra):
    """Write the DESIGN.md checkpoint dict; extra keys (optimizer, rng) make it resumable. A LoRA model is
    written merged, with its adapter under "lora" (detail 12)."""
    model = unwrap(model)
    state, lora = merged_state_dict(model)
    checkpoint = {"model": state, "config": asdict(model.config),
                  "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
                  "stage": stage, "parent": parent, "step": step, "args": args or {}, "metrics": metrics or {},
                  **({"lora": lora} if lora else {}), **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu", head=None):
    """-> (model, tokenizer, checkpoint dict). head="lm"/"score" checks the kind of model."""
    if not os.path.exists(path):
        stage = os.path.splitext(os.path.basename(path))[0]
        raise FileNotFoundError(f"{path} not found" + (f": run `python {stage}.py` first" if stage in STAGES else ""))
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything that is not tensors and plain data
        raise ValueError(f"{path} is not a model.py checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a model.py checkpoint (no 'model' and 'config' entries)")
    try:
        config = ModelConfig(**checkpoint["config"])
    except TypeError as e:
        raise ValueError(f"{path} has a config this model.py does not know: {e}")
    if head is not None and config.head != head:
        raise ValueError(f"{path} is a {checkpoint.get('stage')!r} checkpoint with a {config.head!r} head, "
                         f"expected a {head!r} head: check the checkpoint path")
    model = Transformer(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not match its config: {' '.join(str(e).split())[:300]}")
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"]) if checkpoint.get("tokenizer") else None
    return model.to(device), tokenizer, checkpoint


def check_resumable(path, checkpoint, args, same):
    """--resume continues a run exactly only from a mid-run checkpoint and with the settings `same` it
    ran with (data, schedule, batch, seed...); anything else is a one-line error, not a different run."""
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} is a finished run (step {checkpoint['step']}): nothing to resume")
    saved = checkpoint.get("args", {})
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in same if saved.get(k, getattr(args, k)) != getattr(args, k)]
    if changed:
        raise ValueError(f"{path} ran with other settings ({', '.join(changed)}): resume with the same ones")


# ----------------------------------------------------------------------------- command line

def show_reply(reply: str) -> str:
    """A reply as the chat shows it: the steps of a think block on a line of their own, then the final answer."""
    if not thinks(reply):
        return reply
    steps = reply.lstrip()[len("<think>"):].partition("</think>")[0]
    answer = final_answer(reply)
    return f"[thinking] {steps.strip()}\n" + (answer if answer is not None else "[no answer: the think block never closed]")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sample from, chat with, export or import llm-stages checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("sample", "continue a text prompt"), ("chat", "ChatML chat on stdin; /quit or EOF ends")):
        p = commands.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", help="e.g. out/pretrain.pt or out/sft.pt")
        p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per reply")
        p.add_argument("--temperature", type=float, default=0.8 if name == "sample" else 0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
        if name == "sample":
            p.add_argument("--prompt", default="", help="text to continue")
            p.add_argument("--num-samples", type=int, default=1, help="completions to draw, as one batch")
        else:
            p.add_argument("--system", default="", help="an optional system message")
    p = commands.add_parser("export", help="checkpoint -> Hugging Face directory (hf.py)")
    p.add_argument("checkpoint", help="any llm-stages checkpoint")
    p.add_argument("out_dir", help="directory to write config.json, model.safetensors, tokenizer files into")
    p = commands.add_parser("import", help="local Qwen2 / Llama directory -> checkpoint (hf.py)")
    p.add_argument("model_dir", help="a directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. out/qwen.pt")
    args = parser.parse_args(argv)
    if args.command in ("export", "import"):  # interop lives in hf.py, which only its users need
        import hf
        if args.command == "export":
            return hf.export_hf(args.checkpoint, args.out_dir)
        return hf.import_hf(args.model_dir, args.out)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (--device auto picks what there is)")
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, head="lm")
    model.eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    context = model.config.max_position_embeddings
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, pad_id=tokenizer.pad_id,
                    generator=generator)

    if args.command == "sample":
        prompt = [tokenizer.eot_id] + tokenizer.encode(args.prompt)  # documents start after <|endoftext|>
        max_new = max(1, min(args.max_new_tokens, context - len(prompt)))  # too long a prompt: generate says so
        t0 = time.time()
        completions, _, mask = generate(model, [prompt] * args.num_samples, max_new, **settings)
        seconds = time.time() - t0
        for row, row_mask in zip(completions, mask):
            print(args.prompt + tokenizer.decode(row[row_mask.bool()].tolist()))
            print("-" * 40)
        print(f"{int(mask.sum())} tokens in {seconds:.2f}s: {mask.sum().item() / seconds:.1f} tokens/s",
              file=sys.stderr)
        return

    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tokenizer.encode_prompt(messages)
        while len(prompt) + 16 > context and len(messages) > 2:  # forget the oldest exchange to fit the context
            del messages[bool(args.system):bool(args.system) + 2]
            prompt = tokenizer.encode_prompt(messages)
        max_new = max(1, min(args.max_new_tokens, context - len(prompt)))
        completion, _, mask = generate(model, [prompt], max_new, eos_id=tokenizer.im_end_id, **settings)
        reply = [t for t in completion[0][mask[0].bool()].tolist() if t != tokenizer.im_end_id]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        print(show_reply(messages[-1]["content"]), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
