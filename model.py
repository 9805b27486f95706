"""
model.py: the Transformer every stage trains, and the one checkpoint format. A Qwen2 / Llama decoder
(RMSNorm, RoPE/YaRN, GQA, SwiGLU, optional mixture of experts) with Hugging Face parameter names, so
a state_dict copies key for key into `Qwen2ForCausalLM` (the tests check that the logits match).
What the stages do with a model (generation, log-probs, scores) is in engine.py; LoRA in lora.py.

    from model import ModelConfig, Transformer, load_checkpoint
    model, tokenizer, checkpoint = load_checkpoint("out/sft.pt")

Implementation details (tagged `# detail N` in the code):
1. RMSNorm is computed in float32 and cast back, as Hugging Face does, so bf16 runs stay stable.
2. RoPE rotates the two halves of each head (`rotate_half`, HF layout); YaRN (arXiv:2309.00071)
   blends interpolated and original frequencies per dimension and scales cos/sin.
3. Padding: a query sees causal keys that are real tokens, and always itself (no empty softmax
   row); positions count real tokens only, so left padding does not shift them. Without padding or
   cache, no mask: SDPA's is_causal path.
4. GQA: SDPA's `enable_gqa` shares each key/value head across its query heads without a copy.
5. Init N(0, 1/hidden_size) (std 1/sqrt(width), LeCun's fan-in rule; GPT-2's fixed 0.02 is that
   at width 2500, and at width 128 it leaves attention near uniform and copying unlearned for
   long); the projections into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * layers).
6. MoE: softmax router, top-k experts, weights renormalised over the k (Mixtral); the Switch
   Transformer load-balancing loss, averaged over layers as in HF.
7. Memory-lean loss (Liger's fused linear cross-entropy): the lm head and cross-entropy run in
   chunks of rows, gradients computed in the forward, so one chunk of logits exists at a time.
8. KV cache: allocated once per generation and written in place; `grow=True` concatenates instead,
   so gradients flow through it (engine.py's shared-prompt log-probs).
9. Checkpoints are plain dicts read with `torch.load(weights_only=True)` (no code runs on load) and
   written atomically (`path.tmp`, then `os.replace`). A LoRA model is saved merged (lora.py).
10. Muon (configure_optimizer's muon_lr): the blocks' matrices step along their Nesterov momentum
   orthogonalised by a quintic Newton-Schulz iteration (Jordan et al. 2024, as modded-nanogpt and
   nanochat); AdamW keeps embeddings, the head, norms and biases.
11. Dual Chunk Attention (An et al. 2024, arXiv:2402.17463; Qwen's `dual_chunk_attention_config`),
   at inference past the trained context: every query-key distance is remapped into [0, chunk_size]
   (dual_chunk_positions), the three kinds of scores are merged exactly, in one softmax.
12. `model.grad_checkpoint = True`: each block's activations are recomputed in the backward pass
   (torch.utils.checkpoint), so one block's activations exist at a time, not every block's.
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tokenizer import Tokenizer

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "distill")  # for "run X first" hints
CHUNK_LOGITS = 2 ** 23  # logits held at once by the chunked loss (32 MB in float32)
DCA_QUERIES = 256  # queries whose scores Dual Chunk Attention holds at once (detail 11)


@dataclass
class ModelConfig:
    """Field names as in HF's Qwen2Config / Qwen2MoeConfig. The default is a tiny CPU model."""
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2              # < num_attention_heads = grouped-query attention
    max_position_embeddings: int = 256        # the context length
    rope_theta: float = 10000.0
    # YaRN (detail 2): {"type": "yarn", "factor": f, "original_max_position_embeddings": n}
    rope_scaling: dict | None = None
    # Dual Chunk Attention (detail 11): {"chunk_size": c, "local_size": w}, Qwen's keys (others,
    # such as its "original_max_position_embeddings", are kept and unused)
    dual_chunk_attention_config: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True               # bias on q/k/v projections (Qwen2)
    tie_word_embeddings: bool = True          # lm_head shares the embedding matrix
    num_experts: int = 0                      # 0 = dense SwiGLU MLP; > 0 = mixture of experts
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 0  # > 0: an always-on, sigmoid-gated expert (Qwen2-MoE)
    norm_topk_prob: bool = True               # renormalise the top-k router weights to sum to 1
    router_aux_loss_coef: float = 0.001       # load-balancing loss weight (Qwen2-MoE's default)
    head: str = "lm"                          # "lm": next-token logits; "score": a scalar per token
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
    """Inverse frequencies (head_dim/2,) and the cos/sin scale; YaRN as HF has it (detail 2)."""
    dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if not config.rope_scaling:
        return inv_freq, 1.0
    if config.rope_scaling.get("type", config.rope_scaling.get("rope_type")) != "yarn":
        raise ValueError(f"rope_scaling {config.rope_scaling} is not supported: only YaRN")
    factor, original = (config.rope_scaling["factor"],
                        config.rope_scaling["original_max_position_embeddings"])
    # frequency i, theta^(-2i/dim), is kept if it turns over 32 times in the original context,
    # divided by factor if under once, a linear ramp between; dim_of(r): the i that turns r times
    def dim_of(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))
                / (2 * math.log(config.rope_theta)))
    low, high = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # rotate (x1, x2) by angle pos * freq: x * cos + rotate_half(x) * sin (detail 2)
    return x * cos + rotate_half(x) * sin


# detail 11: chunks of s = chunk_size - local_size positions; a key at position j sits at j mod s, a
# query at i at i mod s for the keys of its own chunk (intra), at min(i mod s + s, chunk_size) for
# the chunk before (successive), at chunk_size for earlier ones (inter). Every distance is then
# in [0, chunk_size], those up to local_size exact (An et al. 2024; vLLM's Qwen2.5-1M).
def dual_chunk_positions(positions, chunk_size, local_size):
    """positions (B, T) -> (intra = key positions, successive positions, chunk index), (B, T)."""
    s = chunk_size - local_size
    within = positions % s
    return within, (within + s).clamp(max=chunk_size), positions.div(s, rounding_mode="floor")


# detail 11: score(i, j) = q_i^r . k_j / sqrt(D), r by how many chunks j is behind i: 0 intra,
# 1 successive, more inter; one softmax over every key i may see, so the merge is exact
def dual_chunk_attention(queries, k, v, query_chunk, key_chunk, mask):
    """queries (intra, successive, inter), (B, H, T, D) each; k, v (B, KV, S, D); query_chunk
    (B, T), key_chunk (B, S); mask (B, 1, T, S): True = may attend, None = causal -> (B, H, T, D)"""
    B, H, T, D = queries[0].shape
    KV, S = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]
    k, v = k[:, :, None], v[:, :, None]  # (B, KV, 1, S, D): one key head for its group of queries
    out = []
    for i in range(0, T, DCA_QUERIES):  # a block of b queries: its scores (B, KV, H/KV, b, S)
        rows = slice(i, i + DCA_QUERIES)
        q = [x[:, :, rows].unflatten(1, (KV, H // KV)) for x in queries]
        behind = (query_chunk[:, rows, None] - key_chunk[:, None, :])[:, None, None]
        scores = torch.where(behind == 0, q[0] @ k.mT,
                             torch.where(behind == 1, q[1] @ k.mT, q[2] @ k.mT)) * D ** -0.5
        scores = scores.float().masked_fill(~mask[:, :, None, rows], float("-inf"))
        out.append(scores.softmax(dim=-1).to(v.dtype) @ v)  # (B, KV, H/KV, b, D)
    return torch.cat(out, dim=3).flatten(1, 2)


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

    def forward(self, x, rope, mask, kv_cache):
        """rope: (cos, sin) (B, 1, T, D), plus with DCA (detail 11) the successive and inter (cos,
        sin) of the queries and the chunk index of the queries (B, T) and of every key (B, S)."""
        B, T, _ = x.shape
        # q (B, H, T, D); k, v (B, KV, T, D): H query heads, KV key/value heads (KV divides H)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        (cos, sin), *dual = rope
        k = apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, D), S = positions so far
        if dual:  # detail 11: the queries at their three positions
            successive, inter, (query_chunk, key_chunk) = dual
            queries = [apply_rope(q, *rotation) for rotation in ((cos, sin), successive, inter)]
            y = dual_chunk_attention(queries, k, v, query_chunk, key_chunk, mask)
        else:  # y (B, H, T, D); enable_gqa: a key/value head serves its query heads (detail 4)
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


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
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # gate, then up rows
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, experts, weights):  # x (N, C); experts, weights (N, k)
        y = torch.zeros_like(x)
        for e in experts.unique().tolist():  # only the experts some token chose
            # the tokens routed to e, and which of their k picks (slot) is e
            token, slot = torch.where(experts == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, self.down_proj[e])
            y.index_add_(0, token, out * weights[token, slot, None])
        return y


class SparseMoeBlock(nn.Module):
    """Top-k routed experts + an optional shared expert, as Qwen2-MoE (Mixtral: none) (detail 6)."""
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
    """Switch Transformer eq. 4-6, pooled over layers as HF's load_balancing_loss_func (detail 6):
    aux = E * sum_e f_e * P_e; f_e = share of the top-k picks to e, P_e = mean router prob of e."""
    probs = torch.cat(router_logits).softmax(dim=-1, dtype=torch.float)  # (L * N, E), L layers
    # picked[i, e] = 1 if e is among row i's top-k picks, (L * N, E)
    picked = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
    weight = (probs.new_ones(probs.shape[0]) if mask is None      # (L * N,), 1 = real token
              else mask.reshape(-1).float().repeat(len(router_logits)))
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
        self.mlp = (SparseMoeBlock(config) if self.is_moe
                    else MLP(config.hidden_size, config.intermediate_size))
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, kv_cache):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, kv_cache))
        if self.is_moe:
            y, router_logits = self.mlp(self.post_attention_layernorm(x))
        else:
            y, router_logits = self.mlp(self.post_attention_layernorm(x)), None
        return x + self.resid_dropout(y), router_logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T over targets != -100, in row chunks (detail 7)."""
    @staticmethod
    def forward(ctx, hidden, weight, targets, needs_grad):
        # hidden (N, C), weight (V, C), targets (N,); needs_grad: grad mode at the call (off here)
        count = (targets != -100).sum().clamp(min=1)   # an all-ignored batch gives 0, not NaN
        loss = torch.zeros((), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad and ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros_like(weight, dtype=torch.float)  # summed over chunks in float32
                       if needs_grad and ctx.needs_input_grad[1] else None)
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
        grad_weight = (None if grad_weight is None
                       else (grad_weight * grad_loss).to(ctx.weight_dtype))
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden, weight, targets):
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100) without storing the logits."""
    return ChunkedCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled())


class KVCache:
    """Keys and values of every layer, allocated once for B rows and max_len positions (detail 8).
    grow=True keeps them as tensors that each update concatenates to instead: slower to decode with,
    but no write in place, so gradients flow through the cache (detail 8)."""
    def __init__(self, config, batch_size, max_len, device=None, grow=False):
        self.shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                      config.hidden_size // config.num_attention_heads)  # (L, B, KV, max_len, D)
        self.keys = self.values = None   # allocated by the first update, in the dtype of the keys
        self.grown = [None] * config.num_hidden_layers if grow else None  # per layer (keys, values)
        # (B, max_len): True where the slot holds a real token, False for padding and empty slots
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0                  # slots filled so far

    def update(self, layer, k, v):  # k, v (B, KV, T, D) -> all keys and values so far (B, KV, S, D)
        # the model counted these T slots in before its blocks ran: a block recomputed by
        # checkpointing (detail 12) in the backward pass writes the same slots again
        start, end = self.length - k.shape[2], self.length
        if self.grown is not None:
            past = self.grown[layer]
            self.grown[layer] = ((k, v) if start == 0 else
                                 (torch.cat([past[0][:, :, :start], k], 2),
                                  torch.cat([past[1][:, :, :start], v], 2)))
            return self.grown[layer]
        if self.keys is None:
            self.keys = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def branch(self):
        """A cache that goes on from this one's state and leaves it unchanged (grow=True only: the
        tensors so far are shared, never written): several replies to the same prompts in turn."""
        if self.grown is None:
            raise ValueError("only a grow=True cache can branch: "
                             "a preallocated one is written in place")
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__, grown=list(self.grown), mask=self.mask.clone())
        return other

    def repeat_rows(self, n):
        """Each row n times over (row i -> rows i*n .. i*n+n-1): a prompt's cache for n replies."""
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.shape = (self.shape[0], self.shape[1] * n, *self.shape[2:])
        if self.grown is not None:
            self.grown = [None if kv is None
                          else (kv[0].repeat_interleave(n, 0), kv[1].repeat_interleave(n, 0))
                          for kv in self.grown]
        elif self.keys is not None:
            self.keys, self.values = (self.keys.repeat_interleave(n, dim=1),
                                      self.values.repeat_interleave(n, dim=1))


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
            # one scalar per position, named as in Qwen2ForSequenceClassification
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            raise ValueError(f"head must be 'lm' or 'score', got {config.head!r}")
        inv_freq, self.rope_scale = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        dca = config.dual_chunk_attention_config
        if dca and not 0 < dca["local_size"] < dca["chunk_size"]:
            raise ValueError(f"dual_chunk_attention_config {dca}: 0 < local_size < chunk_size")
        self.grad_checkpoint = False  # detail 12: set by the stages' --grad-checkpoint
        self.init_std = config.hidden_size ** -0.5  # detail 5
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # detail 5: residual projections, depth-scaled
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=self.init_std / math.sqrt(2 * config.num_hidden_layers))
        if config.head == "lm" and config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, std=self.init_std)

    def forward(self, input_ids, targets=None, attention_mask=None, position_ids=None,
                kv_cache=None, logits_to_keep=0):
        """input_ids (B, T); targets (B, T), -100 = ignore; attention_mask (B, T), 1 = real token;
        kv_cache: a KVCache that this call's keys and values go on (detail 8). Head "lm" returns
        (logits (B, T, V), None), or (None, loss) given targets; head "score" (values (B, T), None).
        logits_to_keep=n computes the head only for the last n positions (0 = all, as HF)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)                                   # (B, T, C)
        mask, key_positions = None, None  # detail 3: None = the is_causal fast path
        if attention_mask is not None or kv_cache is not None:
            start = kv_cache.length if kv_cache is not None else 0
            real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.bool())                                  # (B, T)
            if kv_cache is not None:
                kv_cache.mask[:, start:start + T] = real
                real = kv_cache.mask[:, :start + T]                              # (B, S): all keys
                kv_cache.length += T  # before the blocks (KVCache.update)
            key_positions = (real.cumsum(-1) - 1).clamp(min=0)                   # (B, S)
            if position_ids is None:
                position_ids = key_positions[:, start:]                          # (B, T)
            query = torch.arange(start, start + T, device=x.device)[:, None]
            key = torch.arange(start + T, device=x.device)[None, :]
            mask = ((key <= query) & real[:, None, None, :]) | (key == query)   # (B, 1, T, S)
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None, :]
        dca = self.config.dual_chunk_attention_config
        if dca:  # detail 11: keys and intra-chunk queries at i mod s, two more query rotations
            within, successive, chunk = dual_chunk_positions(position_ids, dca["chunk_size"],
                                                             dca["local_size"])
            key_chunk = (chunk if key_positions is None else dual_chunk_positions(
                key_positions, dca["chunk_size"], dca["local_size"])[2])
            rope = (self.rotation(within, x.dtype), self.rotation(successive, x.dtype),
                    self.rotation(torch.full_like(within, dca["chunk_size"]), x.dtype),
                    (chunk, key_chunk))
        else:
            rope = (self.rotation(position_ids, x.dtype),)
        router_logits = []
        for block in self.model.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():  # detail 12
                x, logits = checkpoint(block, x, rope, mask, kv_cache, use_reentrant=False)
            else:
                x, logits = block(x, rope, mask, kv_cache)
            if logits is not None:
                router_logits.append(logits)
        x = self.model.norm(x)
        if self.config.head == "score":
            if targets is not None:
                raise ValueError("a score-head model has no next-token loss: "
                                 "call it without targets")
            return self.score(x[:, -logits_to_keep:]).squeeze(-1).float(), None  # (B, T)
        if targets is None:
            # contiguous: matmul folds a strided slice one way when the weight requires grad and
            # another when not (a frozen reference): logits off from the policy's in the last bit
            return self.lm_head(x[:, -logits_to_keep:].contiguous()).float(), None  # (B, T, V)
        loss = chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if router_logits:
            aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                      attention_mask)
            loss = loss + self.config.router_aux_loss_coef * aux
        return None, loss

    def rotation(self, positions, dtype):
        """RoPE's (cos, sin) (B, 1, T, D) at positions (B, T), times YaRN's scale (detail 2)."""
        freqs = positions[..., None].float() * self.inv_freq                     # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]                      # (B, 1, T, D)
        return ((angles.cos() * self.rope_scale).to(dtype),
                (angles.sin() * self.rope_scale).to(dtype))

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops the input embedding (a lookup, no FLOPs) unless it
        is also the lm head (tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not (self.config.tie_word_embeddings and self.config.head == "lm"):
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6 per active weight, plus
        12 * L * C * T for attention (L layers, C hidden size, T = seq_len)."""
        cfg, active = self.config, self.num_params(non_embedding=True)
        if cfg.num_experts:  # a token runs only k of the E routed experts
            routed = sum(block.mlp.experts.gate_up_proj.numel()
                         + block.mlp.experts.down_proj.numel() for block in self.model.layers)
            active -= routed * (1 - cfg.num_experts_per_tok / cfg.num_experts)
        return 6 * active + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: training FLOP/s achieved at the full context length over the
        hardware's peak (e.g. 989e12 for an H100 in bf16)."""
        return (self.flops_per_token(self.config.max_position_embeddings) * tokens_per_second
                / peak_flops)

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu",
                            muon_lr=0.0):
        """AdamW; weight decay on the weight matrices only (2-D, and the 3-D expert tensors), not on
        norms, biases or the input embedding. With muon_lr > 0, the blocks' matrices go to a Muon
        group at that learning rate (detail 10) and AdamW keeps the rest."""
        embedding = self.model.embed_tokens.weight
        matrices = [p for p in self.model.layers.parameters() if p.requires_grad and p.dim() >= 2]
        matrices = matrices if muon_lr > 0 else []
        in_muon = {id(p) for p in matrices}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in in_muon]
        decay = [p for p in params if p.dim() >= 2 and p is not embedding]
        no_decay = [p for p in params if p.dim() < 2 or p is embedding]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")
        if not matrices:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
        groups.append({"params": matrices, "lr": muon_lr, "weight_decay": weight_decay,
                       "muon": True, "momentum": 0.95})  # Jordan et al.'s momentum
        return Muon(groups, lr=lr, betas=betas, fused=fused)


# detail 10: X <- a X + b (X X^T) X + c (X X^T)^2 X, from X = G / ||G||_F (so every singular value
# is <= 1), (a, b, c) = (3.4445, -4.7750, 2.0315) (Jordan et al. 2024): G = U S V^T -> U S' V^T;
# after 5 steps S' is within [0.68, 1.21] where S >= 0.05 ||G||_F (near enough to U V^T, and cheap)
def newton_schulz(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # rows <= cols: X X^T is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def orthogonalised(updates: list) -> list:
    """newton_schulz of each update, those of one shape as one batch (fewer, larger products: on a
    CPU, half the optimizer's time of a hidden-64 model); of a matrix sharded by --fsdp (a DTensor
    of this rank's rows, fsdp.py detail 7): the whole matrix gathered, orthogonalised on every
    rank, this rank's rows kept."""
    if not hasattr(updates[0], "full_tensor"):
        shapes = {}
        for i, update in enumerate(updates):
            shapes.setdefault(update.shape, []).append(i)
        result = [None] * len(updates)
        for same in shapes.values():
            for i, update in zip(same, newton_schulz(torch.stack([updates[i] for i in same]))):
                result[i] = update
        return result
    return [sharded_orthogonalised(update) for update in updates]


def sharded_orthogonalised(update):
    from torch.distributed.tensor import distribute_tensor  # only a sharded run gets here
    return distribute_tensor(newton_schulz(update.full_tensor()), update.device_mesh,
                             update.placements, src_data_rank=None)  # no copy sent: all hold it


class Muon(torch.optim.AdamW):
    """AdamW, except the param groups marked "muon" (Jordan et al. 2024, github.com/KellerJordan/
    Muon): m <- mu m + (1 - mu) g, the Nesterov step u = (1 - mu) g + mu m orthogonalised, and
    p <- (1 - lr wd) p - lr sqrt(max(1, rows / cols)) newton_schulz(u) (detail 10)."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            mu = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            nesterov = []
            for p in params:
                state = self.state[p]
                if not state:  # a step count too: AdamW's load_state_dict expects one in a state
                    state.update(step=torch.tensor(0.0), momentum_buffer=torch.zeros_like(p))
                state["step"] += 1
                momentum = state["momentum_buffer"]
                momentum.lerp_(p.grad, 1 - mu)
                nesterov.append(p.grad.lerp(momentum, mu))
            for p, update in zip(params, orthogonalised(nesterov) if params else []):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)
                p.grad = None  # done: AdamW's step below skips a parameter without a gradient
        super().step()


def unwrap(model):
    """The Transformer inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# --------------------------------------------------------------------- checkpoints (detail 9)

def save_checkpoint(path, model, tokenizer, stage, parent=None, step=0, args=None, metrics=None,
                    **extra):
    """Write the DESIGN.md checkpoint dict; extra keys (optimizer, rng) make it resumable. A LoRA
    model is written merged, with its adapter under "lora" (lora.py). A model sharded by --fsdp is
    gathered whole to rank 0's CPU, which writes (fsdp.py): every rank must call it then."""
    model = unwrap(model)
    if hasattr(model, "unshard"):  # FSDP2's method: a sharded model; fsdp.py only where it is one
        from fsdp import full_tensors, gathered
        model, extra = gathered(model, "cpu", True), full_tensors(extra, "cpu", True)
        if model is None:  # not rank 0: its part was the gathering
            return
    state, lora = model.state_dict(), None
    if any(".lora_A." in name for name in state):  # only a LoRA run needs lora.py
        from lora import merged_state_dict
        state, lora = merged_state_dict(model)
    checkpoint = {"model": state, "config": asdict(model.config),
                  "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
                  "stage": stage, "parent": parent, "step": step, "args": args or {},
                  "metrics": metrics or {}, **({"lora": lora} if lora else {}), **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu", head=None, **changes):
    """-> (model, tokenizer, checkpoint dict). head="lm"/"score" checks the kind of model; changes
    replace fields of its config, e.g. dual_chunk_attention_config (detail 11) at inference."""
    if not os.path.exists(path):
        stage = os.path.splitext(os.path.basename(path))[0]
        raise FileNotFoundError(f"{path} not found"
                                + (f": run `python {stage}.py` first" if stage in STAGES else ""))
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses all but tensors and plain data
        raise ValueError(f"{path} is not a model.py checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a model.py checkpoint (no 'model' and 'config' entries)")
    try:
        config = ModelConfig(**{**checkpoint["config"], **changes})
    except TypeError as e:
        raise ValueError(f"{path} has a config this model.py does not know: {e}")
    if head is not None and config.head != head:
        raise ValueError(f"{path} is a {checkpoint.get('stage')!r} checkpoint with a "
                         f"{config.head!r} head, expected a {head!r} head: "
                         "check the checkpoint path")
    model = Transformer(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not match its config: "
                         f"{' '.join(str(e).split())[:300]}")
    tokenizer = (Tokenizer.from_dict(checkpoint["tokenizer"]) if checkpoint.get("tokenizer")
                 else None)
    return model.to(device), tokenizer, checkpoint

