"""
engine.py: what the stages after pretraining do with a model: batched KV-cache generation, per-token
log-probs of replies (with one pass per shared prompt), reward-model scores, reply texts, held-out
accuracy (greedy, or by a vote of samples), the order of training batches, and RL's pieces (policy
and reference, normalised reward, rollouts, the policy's samples for the labeler). model.py is the
network; this is its engine, as nanochat's engine.py beside gpt.py.

    from engine import generate, heldout_accuracy
    completions, logps, mask = generate(model, [prompt_ids], max_new_tokens=32, temperature=0)

Implementation details (tagged `# detail N` in the code):
1. Generation: prompts left-padded, one prefill, then one token per step into a KV cache allocated
   once; a row that emitted EOS keeps emitting pad (masked) until all rows are done. With
   `group_size` G (GRPO's G replies to a prompt) each prompt is prefilled once for its G rows.
2. generate's log-probs are those of the distribution sampled from (after temperature, top-k,
   top-p); without top-k/top-p they equal `completion_logprobs` at the same temperature.
3. `completion_logprobs`: one forward over prompt + completion, log p = logit[token] - logsumexp,
   logits kept for the completion only. Replies that share a prompt run on one prompt pass whose
   KV cache keeps gradients (`group_size`, `shared_prompt_logprobs`): same numbers to rounding.
4. Batches depend only on (seed, step): each epoch a fresh permutation cut into whole batches, so
   resume and DDP are exact. Not length-bucketed: what goes with length (a task family, say) would
   come in runs of batches and be learned in alternation. Within a step, `by_length` sorts the rows
   into the micro-batches, so each pads to a near length: on 2 cores, ~0.6x the time of one batch.
5. Process supervision: a step of a reply ends before a space, </think> or <|im_end|>
   (`step_end_mask`). A process reward model is a language model: P(step right) = σ(m + offset), m
   the least log-prob it gives the step's tokens and the one after; a step's reward is 2 P - 1,
   +1 for a surely right step, -1 for a wrong one: the sign, not the count of steps, pays.
"""
import json
import os
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist

from model import KVCache, ModelConfig, Transformer, load_checkpoint, unwrap
from tokenizer import final_answer, thinks


def unsharded(model):
    """The plain model inside DDP and torch.compile (model.unwrap); of one sharded by --fsdp, a copy
    with every weight (fsdp.gathered): a collective, every rank calls it (fsdp.py detail 6)."""
    model = unwrap(model)
    if not hasattr(model, "unshard"):  # FSDP2's method: a sharded model
        return model
    from fsdp import gathered  # imported only here: a stage copied without --fsdp needs no fsdp.py
    return gathered(model)


# detail 4: every example once an epoch, in a fresh order
def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in the global batch of `step`, a function of (seed, step) only: each
    epoch is a fresh permutation cut into whole batches (a random remainder waits for the next)."""
    epoch, index = divmod(step, n_examples // batch_size)
    order = torch.randperm(n_examples,
                           generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def by_length(rows: list, parts: int, length=len) -> list[list]:
    """rows sorted by length and cut into `parts` micro-batches of near-equal size, each to be
    padded to its own longest row: a step pads little, and its rows, so its gradient, are the
    same (the losses are sums over the step's tokens or pairs, engine.py detail 4)."""
    rows = sorted(rows, key=length)
    return [rows[len(rows) * m // parts : len(rows) * (m + 1) // parts] for m in range(parts)]


def minibatches(n_rows: int, size: int, epochs: int, device=None):
    """Row indices of `epochs` passes over n_rows rows, each a fresh permutation cut into
    minibatches of `size`; drawn lazily, so a pass an early stop never reaches draws nothing."""
    for _ in range(epochs):
        order = torch.randperm(n_rows, device=device)
        for start in range(0, n_rows, size):
            yield order[start : start + size]


def left_pad(seqs, pad_id, device=None):
    """Token lists -> ids (B, T) padded on the left with pad_id, mask (B, T) 1 on real tokens."""
    seqs = [s.tolist() if torch.is_tensor(s) else list(s) for s in seqs]
    T = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs],
                        dtype=torch.long, device=device)
    return ids, mask


def right_pad(seqs, pad_id, device=None):
    """Token lists -> ids (B, T) padded on the right with pad_id, mask (B, T) 1 on real tokens."""
    seqs = [s.tolist() if torch.is_tensor(s) else list(s) for s in seqs]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs],
                        dtype=torch.long, device=device)
    return ids, mask


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> the next token (B,) and its log-prob (B,) under the distribution sampled
    from (detail 2). Temperature 0 = greedy, with the log-prob under the untempered model."""
    if temperature < 0 or not 0 <= top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in [0, 1], "
                         f"got {temperature} and {top_p}")
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
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it already reaches top_p
        drop[:, 0] = False  # the most likely token always stays (top_p 0 is greedy, as HF)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    logp = logits.log_softmax(dim=-1)                                            # (B, V)
    token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None,
             pad_id=0, generator=None, group_size=1):
    """Sample completions of a batch of token lists (detail 1) -> completions (B, N) right-padded
    with pad_id, log-probs of the sampled tokens (B, N), completion_mask (B, N): 1.0 up to and
    including each row's EOS. N <= max_new_tokens: it stops when every row has hit EOS.
    group_size=G: the prompts come in runs of G equal ones (GRPO), and each is prefilled once."""
    model = unsharded(model)  # no gradient sync or compilation needed to sample
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate needs at least one prompt and no empty prompt "
                         "(start it with <|endoftext|>)")
    ids, mask = left_pad(prompts, pad_id, device)                               # (B, P)
    B, P = ids.shape
    check_groups(ids, mask, group_size)
    if max_new_tokens < 1 or P + max_new_tokens > context:
        raise ValueError(f"a prompt of {P} tokens + {max_new_tokens} new tokens is longer than "
                         f"the context ({context}): shorten the prompt or lower max_new_tokens")
    cache = KVCache(model.config, B // group_size, P + max_new_tokens, device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # prefill: each distinct prompt once, its next-token logits only (B / G, 1, V)
    logits, _ = model(ids[::group_size], attention_mask=mask[::group_size], kv_cache=cache,
                      logits_to_keep=1)
    if group_size > 1:  # each prompt's keys, values and next-token logits, once per reply
        cache.repeat_rows(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)                     # (B, 1, V)
    for step in range(max_new_tokens):
        token, logp = sample_token(logits[:, -1].float(), temperature, top_k, top_p, generator)
        tokens[:, step] = token.masked_fill(done, pad_id)
        logps[:, step] = logp.masked_fill(done, 0.0)
        was_done = done  # this step's token is real (EOS included) unless the row ended before
        if eos_id is not None:
            done = done | (token == eos_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits, _ = model(tokens[:, step:step + 1], attention_mask=~was_done[:, None],
                          kv_cache=cache, logits_to_keep=1)
    n = step + 1
    completion_mask = torch.ones(B, n, device=device)
    if eos_id is not None:  # 1 up to and including the first EOS
        is_eos = (tokens[:, :n] == eos_id).long()
        completion_mask = ((is_eos.cumsum(dim=1) - is_eos) == 0).float()
    return tokens[:, :n], logps[:, :n], completion_mask


def join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Left-padded prompts + right-padded completions -> ids, mask (B, P + N), no pad in between."""
    return (torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask.long(), completion_mask.long()], dim=1))


def check_groups(prompt_ids, prompt_mask, group_size):
    """One-line error unless the rows come in runs of group_size equal (left-padded) prompts."""
    B, P = prompt_ids.shape
    if group_size < 1 or B % group_size or (group_size > 1 and (
            (prompt_ids.reshape(-1, group_size, P) != prompt_ids[::group_size, None]).any()
            or (prompt_mask.reshape(-1, group_size, P) != prompt_mask[::group_size, None]).any())):
        raise ValueError(f"group_size {group_size}: every {group_size} adjacent rows "
                         "must share one prompt")


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=1.0, return_entropy=False, group_size=1):
    """log pi(completion token t | prompt, completion[:t]) (B, N) with logits / temperature, 0 where
    the mask is 0 (detail 3). Prompts left-padded, completions right-padded. Optionally the entropy
    (B, N) too. group_size=G: rows come in groups of G adjacent rows with the same prompt (GRPO),
    and each prompt runs through the model once instead of G times."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: log-probs need a temperature > 0 "
                         "(greedy has none)")
    G, N = group_size, completion_ids.shape[1]
    check_groups(prompt_ids, prompt_mask, G)
    if G > 1:
        [logits] = shared_prompt_logits(model, prompt_ids[::G], prompt_mask[::G],
                                        [(completion_ids, completion_mask)], G)  # (B, N, V)
    else:
        ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
        logits = model(ids, attention_mask=mask, logits_to_keep=N + 1)[0][:, :-1]   # (B, N, V)
    return token_logprobs(logits, completion_ids, completion_mask, temperature, return_entropy)


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, completions, temperature=1.0):
    """completion_logprobs of several completion sets [(ids (B, N_i), mask (B, N_i)), ...] of the
    same prompts (DPO's chosen and rejected replies), each prompt run once: [(B, N_i), ...]."""
    logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completions)
    return [token_logprobs(set_logits, ids, mask, temperature)
            for set_logits, (ids, mask) in zip(logits, completions)]


def token_logprobs(logits, completion_ids, completion_mask, temperature=1.0, return_entropy=False):
    """logits (B, N, V) at the positions that predict completion tokens -> log-probs (B, N), and
    the entropy (B, N) too with return_entropy."""
    if logits.dim() != 3:
        raise ValueError("log-probs need a model with the lm head, not the score head")
    logits = logits.float() / temperature  # (B, N, V): position t predicts completion token t
    lse = logits.logsumexp(dim=-1)         # (B, N)
    logp = (logits.gather(2, completion_ids[..., None]).squeeze(2) - lse) * completion_mask
    if not return_entropy:
        return logp
    # H = logsumexp(z) - sum_v softmax(z)_v z_v
    entropy = (lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)) * completion_mask
    return logp, entropy


# detail 3: each prompt once, then every completion attends to that prompt's keys and values
def shared_prompt_logits(model, prompt_ids, prompt_mask, completions, group_size=1):
    """For each (completion_ids, completion_mask) of `completions`, rows i*G .. i*G+G-1 completing
    prompt i (G = group_size): the logits (B * G, N, V) at the positions that predict its tokens,
    as one joined forward of prompt + completion gives them."""
    B, P = prompt_ids.shape
    longest = max(ids.shape[1] for ids, _ in completions)
    cache = KVCache(unwrap(model).config, B, P + longest, prompt_ids.device, grow=True)
    # (B, 1, V): the last prompt position predicts completion token 0
    first, _ = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache, logits_to_keep=1)
    if group_size > 1:
        first = first.repeat_interleave(group_size, dim=0)                       # (B * G, 1, V)
        cache.repeat_rows(group_size)
    out = []
    for ids, mask in completions:
        if ids.shape[1] == 1:
            out.append(first)
            continue
        # (B * G, N - 1, V): token t predicts token t + 1; the last token predicts nothing needed
        rest, _ = model(ids[:, :-1], attention_mask=mask[:, :-1], kv_cache=cache.branch())
        out.append(torch.cat([first, rest], dim=1))
    return out


def completion_values(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Score-head output V(s_t) (B, N) at the position that predicts completion token t; 0 where
    the mask is 0."""
    ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    values, _ = model(ids, attention_mask=mask, logits_to_keep=completion_ids.shape[1] + 1)
    return values[:, :-1] * completion_mask


def sequence_scores(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Score-head output (B,) at the last real token of prompt + completion (a reward)."""
    ids, mask = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    values, _ = model(ids, attention_mask=mask)                                  # (B, T)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1)


# pairs of replies to one prompt (reward.py, dpo.py): {"prompt", "chosen", "rejected"} token ids
def pair_scores(model, pairs: list[dict], pad_id: int, device, score=sequence_scores):
    """Score-head rewards (B,), (B,) of the chosen and the rejected replies, as two batches (score:
    how a reply's reward is read, the last real token's by default)."""
    prompt_ids, prompt_mask = left_pad([p["prompt"] for p in pairs], pad_id, device)  # (B, P)
    return tuple(score(model, prompt_ids, prompt_mask,
                       *right_pad([p[side] for p in pairs], pad_id, device))  # (B, N)
                 for side in ("chosen", "rejected"))


def pair_logps(model, pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(reply | prompt) (B,), (B,) of the chosen and the rejected replies: the sum over the
    reply's tokens and its <|im_end|>; each prompt runs once for both (detail 3)."""
    prompt_ids, prompt_mask = left_pad([p["prompt"] for p in pairs], pad_id, device)  # (B, P)
    replies = [right_pad([p[side] for p in pairs], pad_id, device)                    # (B, N)
               for side in ("chosen", "rejected")]
    chosen, rejected = shared_prompt_logprobs(model, prompt_ids, prompt_mask, replies)
    return chosen.sum(dim=1), rejected.sum(dim=1)


@torch.no_grad()
def all_pairs(pair_fn, model, pairs: list[dict], pad_id: int, device, batch_size: int, autocast):
    """pair_fn (pair_scores or pair_logps) over many pairs, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    with autocast:
        batches = [pair_fn(model, pairs[i: i + batch_size], pad_id, device)
                   for i in range(0, len(pairs), batch_size)]
    model.train(was_training)
    return tuple(torch.cat([batch[side].float() for batch in batches]) for side in (0, 1))


def reply_texts(tokenizer, completion_ids, completion_mask):
    """The text of each reply (before its <|im_end|>, or all of it if it never ended) and whether
    it ended (B,)."""
    lengths = completion_mask.sum(dim=1).long()  # (B,) tokens up to and including EOS
    ended = (completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
             == tokenizer.im_end_id)  # (B,) the last real token is <|im_end|>
    texts = [tokenizer.decode(row[: n - int(end)])
             for row, n, end in zip(completion_ids.tolist(), lengths.tolist(), ended.tolist())]
    return texts, ended


def heldout_accuracy(model, tokenizer, records, max_new_tokens=32, batch_size=128, score=None,
                     force_think=False, forced_too=False):
    """Greedy replies to held-out {"prompt", "answer", "family"} records, the way every stage
    scores them: "accuracy" (final_answer(reply) == answer.strip(), tokenizer.py's one rule),
    "think_rate" (the reply starts with <think>), "well_formed" (it closed with <|im_end|> within
    max_new_tokens), "accuracy/<family>" per task family; "replies": the texts (for a win rate);
    with `score` (load_reward's), "score": the mean reward of the replies. force_think: every reply
    is made to start with <think> (appended to the prompt, counted in max_new_tokens): how well the
    model executes its traces, the ceiling of what RL can teach it by making it think. forced_too:
    also "forced_think_accuracy", force_think's accuracy, in fewer replies: a greedy reply that
    begins with the <think> token is its own forced reply, so only the others are made again."""
    if (force_think or forced_too) and tokenizer.think_id is None:
        raise ValueError("force_think: this tokenizer has no <think> token")
    forced = [tokenizer.think_id] if force_think else []
    was_training = model.training
    model.eval()
    replies, correct, closed, families, started, total_score = [], [], [], [], [], 0.0
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts = [tokenizer.encode_prompt(record["prompt"]) + forced for record in batch]
        completions, _, mask = generate(model, prompts, max_new_tokens - len(forced),
                                        temperature=0, eos_id=tokenizer.im_end_id,
                                        pad_id=tokenizer.pad_id)
        if score is not None:
            with torch.no_grad():
                prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, completions.device)
                total_score += score((prompt_ids, prompt_mask, completions, mask)).sum().item()
        texts, ended = reply_texts(tokenizer, completions, mask)
        texts = ["<think>" + text for text in texts] if force_think else texts
        for record, text in zip(batch, texts):
            replies.append(text)
            correct.append(final_answer(text) == str(record.get("answer", "")).strip())
            families.append(record.get("family"))
        closed += ended.tolist()
        started += (completions[:, 0] == tokenizer.think_id).tolist()
    model.train(was_training)
    n = max(len(correct), 1)
    result = {"accuracy": sum(correct) / n, "think_rate": sum(map(thinks, replies)) / n,
              "well_formed": sum(closed) / n}
    for family in sorted({f for f in families if f is not None}):
        hits = [c for c, f in zip(correct, families) if f == family]
        result[f"accuracy/{family}"] = sum(hits) / len(hits)
    result["replies"] = replies
    if score is not None:
        result["score"] = total_score / len(records)
    if forced_too:  # greedy decoding from prompt + <think> goes on as the reply that chose <think>
        again = [record for record, began in zip(records, started) if not began]
        forced = heldout_accuracy(model, tokenizer, again, max_new_tokens, batch_size,
                                  force_think=True)["accuracy"] if again else 0.0
        kept = sum(right for right, began in zip(correct, started) if began)
        result["forced_think_accuracy"] = (kept + round(forced * len(again))) / n
    return result


def format_accuracy(result):
    """heldout_accuracy's dict as one line, e.g.
    accuracy 41.7% (add 80%, sub 25%) | think 30.0% | well-formed 97.5%"""
    families = ", ".join(f"{key.split('/', 1)[1]} {value:.0%}" for key, value in result.items()
                         if key.startswith("accuracy/"))
    return (f"accuracy {result['accuracy']:.1%}" + (f" ({families})" if families else "")
            + f" | think {result['think_rate']:.1%} | well-formed {result['well_formed']:.1%}"
            + (f" | forced think {result['forced_think_accuracy']:.1%}"
               if "forced_think_accuracy" in result else ""))


# self-consistency (Wang et al. 2022, arXiv:2203.11171): the answer most replies give
def majority_answer(replies: list[str]) -> str | None:
    """The final answer (tokenizer.final_answer) given by most of the replies, the one given first
    among equally many; None if no reply has an answer (a think block never closed)."""
    answers = Counter(answer for answer in map(final_answer, replies) if answer is not None)
    return answers.most_common(1)[0][0] if answers else None


@torch.no_grad()
def vote_accuracy(model, tokenizer, records, ks, temperature=1.0, max_new_tokens=32,
                  batch_size=128, seed=0) -> dict:
    """Self-consistency on held-out {"prompt", "answer"} records: n = max(ks) replies sampled to
    each (batch_size prompts at a time); for each k, the share of problems whose majority_answer of
    k replies is the answer, averaged over the n // k disjoint sets of k -> {k: accuracy}.
    Temperature 0 is greedy: every reply, and k = 1, is heldout_accuracy's."""
    n, device = max(ks), next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    hits = dict.fromkeys(ks, 0.0)
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts = [tokenizer.encode_prompt(record["prompt"]) for record in batch for _ in range(n)]
        completions, _, mask = generate(model, prompts, max_new_tokens, temperature,
                                        eos_id=tokenizer.im_end_id, pad_id=tokenizer.pad_id,
                                        generator=generator, group_size=n)
        texts, _ = reply_texts(tokenizer, completions, mask)
        for j, record in enumerate(batch):
            replies, answer = texts[j * n:(j + 1) * n], str(record["answer"]).strip()
            for k in ks:  # the n // k disjoint sets of k replies
                sets = [replies[s:s + k] for s in range(0, n - k + 1, k)]
                hits[k] += sum(majority_answer(r) == answer for r in sets) / len(sets)
    model.train(was_training)
    return {k: hits[k] / len(records) for k in ks}


# ---- reinforcement learning (grpo.py, ppo.py; load_policy also dpo.py): the policy and its
#      reference, the reward model, the prompts, rollouts and the judged replies

def load_policy(path, device, lora=None, with_reference=True):
    """The policy to train, its tokenizer, the frozen reference (None without with_reference) and
    the context the reference runs in: a second copy under nullcontext or, with lora = (rank,
    alpha, dropout, targets), rank != 0, the policy under lora_disabled (as TRL with PEFT)."""
    policy, tokenizer, _ = load_checkpoint(path, device=device, head="lm")
    if lora and lora[0]:  # add_lora rejects a negative rank
        # imported only here: a stage copied without LoRA needs no lora.py
        from lora import add_lora, lora_disabled
        add_lora(policy, *lora)
        return policy, tokenizer, policy if with_reference else None, lora_disabled
    reference = None
    if with_reference:
        reference = load_checkpoint(path, device=device, head="lm")[0].eval().requires_grad_(False)
    return policy, tokenizer, reference, nullcontext


def load_reward(path, tokenizer, device, process=None):
    """A reward model (reward.py) as a function of a batch (prompt_ids, prompt_mask, completion_ids,
    completion_mask) -> (B,): the score at the last real token, normalised with the mean and std
    that reward.py stored, so that a reward weight or KL coefficient is independent of its scale.
    A process reward model (reward.py --process, a language model) gives (B, N) instead: 2 P(step
    right) - 1 at each step's last token (detail 5), 0 elsewhere. process=True/False: that kind or
    a one-line error."""
    model, reward_tokenizer, checkpoint = load_checkpoint(path, device=device)
    is_process, head = checkpoint.get("stage") == "prm", model.config.head
    if process is not None and process != is_process:
        raise ValueError(f"{path} is {'an outcome' if process else 'a process'} reward model: "
                         f"pass it as {'--reward-model' if process else '--process-reward'}")
    if head != ("lm" if is_process else "score"):  # as load_checkpoint(head=...) says it
        raise ValueError(f"{path} is a {checkpoint.get('stage')!r} checkpoint with a {head!r} "
                         f"head, expected a {'lm' if is_process else 'score'!r} head: check the "
                         "checkpoint path")
    if reward_tokenizer is None or reward_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{path} was trained with another tokenizer than the policy")
    model.eval().requires_grad_(False)
    stats = checkpoint["metrics"]
    if is_process:
        def step_rewards(batch):
            steps = step_end_mask(tokenizer, *batch[2:])
            logits = process_logits(model, *batch, steps, stats["step_offset"])
            return (2 * torch.sigmoid(logits) - 1) * steps  # detail 5
        return step_rewards
    mean, std = stats.get("reward_mean", 0.0), stats.get("reward_std", 1.0)
    return lambda batch: (sequence_scores(model, *batch) - mean) / std


def load_value_model(path, device):
    """PPO's critic: the reward model's weights; from a process reward model (a language model),
    its weights under a score head that starts at 0."""
    model, _, checkpoint = load_checkpoint(path, device=device)
    if model.config.head == "score":
        return model
    critic = Transformer(ModelConfig(**{**checkpoint["config"], "head": "score"}))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    critic.load_state_dict(weights, strict=False)
    torch.nn.init.zeros_(critic.score.weight)
    return critic.to(device)


def encode_prompts(tokenizer, records, max_new_tokens, context, path, needed=1):
    """[(prompt ids, stripped answer or None)] of the {"prompt"} records that leave room for
    max_new_tokens in the context (at least `needed` of them), and how many do not."""
    prompts, too_long = [], 0
    for line_no, record in enumerate(records, 1):
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{line_no}: not a prompt ({e})") from None
        if len(prompt) + max_new_tokens > context:
            too_long += 1
            continue
        answer = record.get("answer")
        prompts.append((prompt, None if answer is None else str(answer).strip()))
    if len(prompts) < needed:
        raise ValueError(f"{path}: {len(prompts)} usable prompts, fewer than {needed} a step")
    return prompts, too_long


@torch.no_grad()
def rollout(policy, tokenizer, prompts, max_new_tokens, temperature, generator=None, reference=None,
            as_reference=nullcontext, group_size=1, old_logp=True):
    """A reply sampled to each prompt (group_size: runs of equal prompts, each prefilled once):
    batch = (prompt_ids, prompt_mask) (B, P) left-padded + (completion_ids, completion_mask) (B, N)
    up to and with <|im_end|>, and the replies' log-probs (B, N) at `temperature` under the policy
    (None without old_logp) and under the reference, run in as_reference (None without one).
    A policy sharded by --fsdp is gathered first, on every rank (unsharded): one all-gather of its
    weights per rollout, where decoding with the shards would all-gather every block per token."""
    full = unsharded(policy)
    reference, policy = full if reference is policy else reference, full  # LoRA: the same copy
    completion_ids, _, completion_mask = generate(
        policy, prompts, max_new_tokens, temperature, eos_id=tokenizer.im_end_id,
        pad_id=tokenizer.pad_id, generator=generator, group_size=group_size)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_id, completion_ids.device)
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp = ref_logp = None
    if old_logp:
        logp = completion_logprobs(policy, *batch, temperature=temperature, group_size=group_size)
    if reference is not None:
        with as_reference(reference):
            ref_logp = completion_logprobs(reference, *batch, temperature=temperature,
                                           group_size=group_size)
    return batch, logp, ref_logp


def judge_replies(tokenizer, completion_ids, completion_mask, answers):
    """heldout_accuracy's rule on sampled replies: correct (B,) 1.0 where the final answer is the
    answer (a reply whose think block never closes has none), ended (B,), the accuracy over the
    replies that have an answer, and the share of replies that think."""
    texts, ended = reply_texts(tokenizer, completion_ids, completion_mask)
    correct = torch.tensor([float(answer is not None and final_answer(text) == answer)
                            for text, answer in zip(texts, answers)], device=completion_ids.device)
    accuracy = (correct.sum() / max(1, sum(answer is not None for answer in answers))).item()
    return correct, ended, accuracy, sum(map(thinks, texts)) / len(texts)


@torch.no_grad()
def save_samples(path, policy, tokenizer, records, n_prompts, max_new_tokens, temperature,
                 generator=None, seed=0, replies=4, batch_size=64) -> int:
    """The policy's own replies for the labeler (`python data.py label`, iterative RL): `replies`
    sampled to each of n_prompts records drawn by seed (those with room for max_new_tokens),
    written to `path` as JSONL, each record with its "replies" added. -> the prompts written."""
    context = unwrap(policy).config.max_position_embeddings
    chosen = []
    for i in torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist():
        prompt = tokenizer.encode_prompt(records[i]["prompt"])
        if len(prompt) + max_new_tokens <= context and len(chosen) < n_prompts:
            chosen.append((records[i], prompt))
    was_training = policy.training
    policy.eval()
    lines = []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start:start + batch_size]
        completions, _, mask = generate(policy, [p for _, p in batch for _ in range(replies)],
                                        max_new_tokens, temperature, eos_id=tokenizer.im_end_id,
                                        pad_id=tokenizer.pad_id, generator=generator,
                                        group_size=replies)
        texts, _ = reply_texts(tokenizer, completions, mask)
        lines += [json.dumps({**record, "replies": texts[j * replies:(j + 1) * replies]},
                             ensure_ascii=False) + "\n" for j, (record, _) in enumerate(batch)]
    policy.train(was_training)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(lines))
    os.replace(path + ".tmp", path)  # atomic, as the checkpoints
    return len(lines)


def masked_mean(x, mask):
    """The mean of x over the positions where mask is 1 (the real tokens); 0 if there are none."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# approximate KL(old || new) = token mean of (ratio - 1) - log ratio (k3, as CleanRL's PPO)
def approximate_kl(logp, old_logp, mask):
    log_ratio = logp - old_logp
    return masked_mean(log_ratio.exp() - 1 - log_ratio, mask)


# explained variance of a critic: 1 - Var(R - V) / Var(R) over the real tokens
def explained_variance(returns, values, mask):
    residual = returns - values
    residual_var = ((residual - masked_mean(residual, mask)) ** 2 * mask).sum()
    returns_var = ((returns - masked_mean(returns, mask)) ** 2 * mask).sum().clamp(min=1e-8)
    return 1 - residual_var / returns_var


# (x - mean) / sqrt(var + eps) over the mask, var unbiased (TRL's masked_whiten)
def masked_whiten(x, mask, eps=1e-8):
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def mean_over_ranks(x, ddp):
    """x averaged over every DDP rank, in place (x itself without DDP)."""
    if ddp:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_gathered(tensor):
    """The tensors of every DDP rank, concatenated in rank order: the global batch."""
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def preference_pairs(tokenizer, records: list[dict], context: int, path: str):
    """Tokenized {"prompt", "chosen", "rejected", "margin", "kind"} pairs of preference records, and
    the count of pairs skipped per reason (identical or empty sides, longer than the context)."""
    pairs, skipped = [], {"identical": 0, "empty side": 0, "longer than the context": 0}
    for line_no, record in enumerate(records, 1):
        chosen, rejected, margin = record["chosen"], record["rejected"], record.get("margin", 0.0)
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{path}:{line_no}: 'chosen' and 'rejected' must be strings")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"{path}:{line_no}: 'margin' must be a number")
        if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            skipped["identical" if chosen.strip() and rejected.strip() else "empty side"] += 1
            continue
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{line_no}: bad prompt ({e})") from None
        chosen_ids, rejected_ids = tokenizer.encode_reply(chosen), tokenizer.encode_reply(rejected)
        if len(prompt) + max(len(chosen_ids), len(rejected_ids)) > context:
            skipped["longer than the context"] += 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen_ids, "rejected": rejected_ids,
                      "margin": float(margin), "kind": str(record.get("kind", "all"))})
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({format_skipped(skipped)})")
    return pairs, skipped


def format_skipped(skipped: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in skipped.items())


def check_resumable(path, checkpoint, args, same):
    """--resume continues a run exactly only from a mid-run checkpoint and with the settings
    `same` it ran with (data, schedule, batch, seed...); anything else is a one-line error, not a
    different run."""
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} is a finished run (step {checkpoint['step']}): nothing to resume")
    saved = checkpoint.get("args", {})
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in same
               if saved.get(k, getattr(args, k)) != getattr(args, k)]
    if changed:
        raise ValueError(f"{path} ran with other settings ({', '.join(changed)}): "
                         "resume with the same ones")


# ---- process supervision (reward.py --process, grpo.py --process-reward, ppo.py with a process
#      reward model): a language model's judgement of every step of a reply (detail 5)

def step_end_mask(tokenizer, completion_ids, completion_mask):
    """(B, N) 1.0 at the last token of each step of a reply, where a process reward model reads its
    score: a real token, not a space or <|im_end|>, followed by a space, </think>, <|im_end|> or the
    reply's end (data.reply_steps' cut in tokens: a space between steps is a token of its own)."""
    [space] = tokenizer.encode(" ")
    think_end = tokenizer.special_tokens.get("</think>", space)
    real = completion_mask.bool()
    next_ids = torch.cat([completion_ids[:, 1:], completion_ids[:, -1:]], dim=1)        # (B, N)
    next_real = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)
    before_cut = ((next_ids == space) | (next_ids == think_end) | (next_ids == tokenizer.im_end_id)
                  | ~next_real)
    can_end = (completion_ids != space) & (completion_ids != tokenizer.im_end_id)
    return (real & can_end & before_cut).float()


# detail 5: m_k = min of log π(y_t | y_<t) over step k's tokens and the token after it
def step_minima(logp, step_mask):
    """logp (B, N) of the reply tokens (0 past the end), step_mask (B, N) -> (B, N): at each step's
    last token the least log-prob of the step's tokens and of the token after it (a step that stops
    too early or runs on shows there), 0 elsewhere."""
    after = torch.cat([logp[:, 1:], torch.zeros_like(logp[:, :1])], dim=1)
    running, minima = torch.zeros_like(logp[:, 0]), []  # 0: above every log-prob
    for t in range(logp.shape[1]):
        running = torch.minimum(running, logp[:, t])
        minima.append(torch.minimum(running, after[:, t]) * step_mask[:, t])
        running = torch.where(step_mask[:, t] > 0, torch.zeros_like(running), running)  # next step
    return torch.stack(minima, dim=1)


def process_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, step_mask,
                   offset):
    """A process reward model's logit of "step right" (B, N) at each step's last token (step_mask
    1 there), 0 elsewhere: the least log-prob it gives the step's tokens, + offset (detail 5)."""
    logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return (step_minima(logp, step_mask) + offset) * step_mask


def least_step_scores(model, prompt_ids, prompt_mask, completion_ids, completion_mask, tokenizer,
                      offset):
    """A process reward model's score of whole replies (B,): the least of its steps' logits (the
    min aggregate of Math-Shepherd, Wang et al. 2023); +inf for a reply without a step."""
    steps = step_end_mask(tokenizer, completion_ids, completion_mask)
    logits = process_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, steps,
                            offset)
    return logits.masked_fill(steps == 0, float("inf")).min(dim=1).values


def step_examples(tokenizer, records: list[dict], context: int, path: str):
    """Tokenized {"prompt", "reply", "ends", "labels"} of stepwise records ({"prompt",
    "completions": [step, ...], "labels": [bool, ...]}, TRL's; the reply is the steps concatenated,
    "ends" the positions of their last tokens), and the count skipped as longer than the context."""
    examples, skipped = [], {"longer than the context": 0}
    for line_no, record in enumerate(records, 1):
        steps, labels = record["completions"], record["labels"]
        if (not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps)
                or not isinstance(labels, list) or len(labels) != len(steps)
                or not all(isinstance(label, bool) for label in labels)):
            raise ValueError(f"{path}:{line_no}: 'completions' must be a list of strings and "
                             "'labels' a list of as many booleans")
        try:
            prompt = tokenizer.encode_prompt(record["prompt"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{line_no}: bad prompt ({e})") from None
        reply = tokenizer.encode_reply("".join(steps))
        ids, ones = torch.tensor([reply]), torch.ones(1, len(reply))
        ends = step_end_mask(tokenizer, ids, ones)[0].nonzero().flatten().tolist()
        if len(ends) != len(steps):
            raise ValueError(f"{path}:{line_no}: {len(steps)} steps whose text cuts into "
                             f"{len(ends)} (a step starts at a space or </think>, none is blank)")
        if len(prompt) + len(reply) > context:
            skipped["longer than the context"] += 1
            continue
        examples.append({"prompt": prompt, "reply": reply, "ends": ends,
                         "labels": [float(label) for label in labels]})
    if not examples:
        raise ValueError(f"{path}: no usable stepwise records ({format_skipped(skipped)})")
    return examples, skipped


def step_scores(model, examples: list[dict], pad_id: int, device, offset):
    """A process reward model on step_examples: its logits (B, N) at the steps' last tokens, the
    labels (B, N) there and the step-end mask (B, N), 1 at the last token of each step."""
    prompt_ids, prompt_mask = left_pad([e["prompt"] for e in examples], pad_id, device)
    completion_ids, completion_mask = right_pad([e["reply"] for e in examples], pad_id, device)
    labels, step_mask = (torch.zeros(completion_ids.shape, device=device) for _ in range(2))
    for row, example in enumerate(examples):
        step_mask[row, example["ends"]] = 1.0
        labels[row, example["ends"]] = torch.tensor(example["labels"], device=device)
    logits = process_logits(model, prompt_ids, prompt_mask, completion_ids,
                            completion_mask.float(), step_mask, offset)
    return logits, labels, step_mask


@torch.no_grad()
def step_accuracy(model, examples: list[dict], pad_id: int, device, offset, batch_size=128) -> dict:
    """A process reward model on held-out step_examples: "accuracy", the share of steps it judges
    as the labeler did (right iff the logit > 0), and "first_wrong", the share of replies whose
    first step it judges wrong is the labeler's first wrong step (or where it finds none, as he)."""
    was_training = model.training
    model.eval()
    right = first_right = steps = 0
    for i in range(0, len(examples), batch_size):
        logits, labels, step_mask = step_scores(model, examples[i: i + batch_size], pad_id, device,
                                                offset)
        judged = (logits > 0).float()
        right += ((judged == labels).float() * step_mask).sum().item()
        steps += step_mask.sum().item()
        position = torch.arange(logits.shape[1], device=logits.device).float()
        first_wrong = [torch.where((y == 0) & (step_mask == 1), position, torch.inf).amin(dim=1)
                       for y in (labels, judged)]  # (B,) each; inf: no wrong step
        first_right += (first_wrong[0] == first_wrong[1]).sum().item()
    model.train(was_training)
    return {"accuracy": right / max(steps, 1), "first_wrong": first_right / max(len(examples), 1)}


# DeepSeekMath 4.1.3: r~ = (r - mean(R)) / std(R), R every step reward of the group's replies;
#                     A_t = sum of r~ over the steps that end at or after token t
def process_advantages(step_rewards, step_mask, group_size, eps=1e-4):
    """step_rewards (B, N), each step's reward at its last token (step_mask (B, N) 1 there), the G
    replies of a prompt in adjacent rows -> per-token advantages (B, N); unbiased std, as GRPO's."""
    B, N = step_rewards.shape
    rewards = step_rewards.reshape(-1, group_size * N)                        # (prompts, G * N)
    mask = step_mask.reshape(-1, group_size * N)
    count = mask.sum(dim=1, keepdim=True)
    mean = (rewards * mask).sum(dim=1, keepdim=True) / count.clamp(min=1)
    variance = ((rewards - mean) ** 2 * mask).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    normalized = ((rewards - mean) / (variance.sqrt() + eps) * mask).view(B, N)
    return normalized.flip(1).cumsum(dim=1).flip(1)  # the sum over the steps at or after t
