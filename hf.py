"""
hf.py: Hugging Face interop. Export any llm-stages checkpoint to a `transformers` model directory,
and import a local Qwen2 / Llama directory as a checkpoint that every stage starts from unchanged.

    python hf.py export out/sft.pt hf/sft               # config.json, model.safetensors, tokenizer
    python hf.py import ~/models/Qwen2.5-0.5B-Instruct --out out/qwen.pt
    python sft.py --init out/qwen.pt                    # then every later stage, as usual
    python hf.py export-adapter out/sft.pt hf/sft-lora  # after `sft.py --lora-rank 8`: PEFT adapter

The exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, serves with `vllm serve dir`, and converts with llama.cpp's
`convert_hf_to_gguf.py` (which may ask for the hash of a new pre-tokenizer: our vocabulary is not
one it knows). Only numpy and torch are needed: the `safetensors` package is used when installed,
else the small reader/writer below.

Implementation details (tagged `# detail N` in the code):
 1. Weights: our parameter names are Hugging Face's, so conversion is a key-for-key copy; a tied
    lm_head is left out (HF ties it again) and MoE experts, 3-D tensors here, are written one
    expert at a time (`mlp.experts.E.gate_proj.weight`), the Hub format every tool reads.
 2. Architecture: Qwen2ForCausalLM when the q/k/v projections have a bias, LlamaForCausalLM when
    not, Qwen2MoeForCausalLM for a mixture of experts with a shared expert (zero q/k/v biases if
    we have none); a score head (reward model, PPO critic) -> *ForSequenceClassification, 1 label.
    Dual Chunk Attention (model.py detail 11) goes under Qwen2.5-1M's `dual_chunk_attention_config`
    both ways: vLLM runs it, transformers ignores it (full attention: the same within a chunk).
 3. Tokenizer: byte-level BPE as GPT-2 spells it (byte b is the char bytes_to_unicode()[b]) with
    our ids. tiktoken's rule (tokenizer.py's) is every split of a token as a merge, ranked by the
    token's id, plus `ignore_merges` (as Llama 3's); the same regex, no normalizer (ours has none).
 4. Chat: a ChatML Jinja template that renders exactly `Tokenizer.render_chat`; EOS is <|im_end|>
    after any chat stage and <|endoftext|> for a pretrain checkpoint; padding is <|endoftext|>.
 5. Import reads config.json (`rope_theta` / `rope_scaling` or transformers 5's `rope_parameters`),
    the safetensors (one file, or the shards model.safetensors.index.json lists) and tokenizer.json.
    Whatever our model cannot reproduce exactly is a one-line error.
 6. Import rebuilds our merges from HF's: a token gets our next id at the first merge that makes it
    from tokens we have. tiktoken's rule then gives HF's tokens for vocabularies made with it
    (Qwen2, Llama 3); GPT-2-style merge lists may differ on rare words.
 7. HF ids follow no layout of ours (Qwen2's id 0 is "!"), so the embedding and lm_head rows are
    permuted into our order; rows no token reaches (the vocab padding of Qwen2) go at the end.
 8. Every added token of tokenizer.json becomes a special token of ours; <|endoftext|>,
    <|im_start|>, <|im_end|> are added where missing (Llama 3), with the mean embedding as their
    rows. Not reproduced: NFC normalization and the BOS token Llama 3 prepends.
 9. Safetensors: 8 bytes of little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian tensor bytes.
10. Nothing is half-written: the files are prepared in a temporary directory next to the output
    and moved in at the end; the imported checkpoint is written atomically by save_checkpoint.
11. `export-adapter`: a stage's LoRA adapter as PEFT writes one (adapter_config.json; A and B under
    PEFT's names, `base_model.model.` in front), for `PeftModel.from_pretrained(base, dir)` on the
    exported parent checkpoint, the model the run started from.
"""
import argparse
import json
import os
import re
import sys
import tempfile

import torch

from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

try:
    import safetensors.torch as safetensors_torch  # optional: memory-mapped reads
except ImportError:
    safetensors_torch = None

# Pre-tokenizer regexes as tokenizer.json holds them (`regex` / Oniguruma syntax) -> stdlib `re`
# for tokenizer.py. Qwen2's is tokenizer.py's SPLIT_PATTERN; Llama 3's cuts numbers in runs of 1-3.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
HF_TO_RE = {QWEN2_REGEX: SPLIT_PATTERN,  # the digit class of SPLIT_PATTERN, `|[\d...]|`, gets {1,3}
            LLAMA3_REGEX: re.sub(r"\|(\[\\d[^]]*\])\|", lambda m: f"|{m[1]}{{1,3}}|", SPLIT_PATTERN,
                                 count=1)}
RE_TO_HF = {v: k for k, v in HF_TO_RE.items()}

CHAT_TEMPLATE = (  # ChatML, exactly as Tokenizer.render_chat (detail 4)
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "LlamaForCausalLM")
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


def bytes_to_unicode():
    """GPT-2's byte -> char table: printable Latin-1 bytes are themselves, the other 68 are
    chr(256 + n), so every token is a printable string (a space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


# ------------------------------------------------------------------------- safetensors (detail 9)

def read_safetensors(path):
    """{name: tensor} of one .safetensors file."""
    if safetensors_torch is not None:
        return safetensors_torch.load_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            (begin, end), dtype = info["data_offsets"], DTYPES[info["dtype"]]
            flat = (torch.frombuffer(data, dtype=dtype, offset=begin,
                                     count=(end - begin) // dtype.itemsize)
                    if end > begin else torch.empty(0, dtype=dtype))
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(tensors, path):
    if safetensors_torch is not None:
        return safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    names = {dtype: name for name, dtype in DTYPES.items()}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        blob = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.writelines(blobs)


# ------------------------------------------------------------------------------------- export

def hf_tokenizer_json(tokenizer):
    """tokenizer.json of a byte-level BPE with our ids and our encoding rule (detail 3)."""
    char = bytes_to_unicode()
    strings = [char[b] for b in range(256)]
    for a, b in tokenizer.merges:
        strings.append(strings[a] + strings[b])
    vocab = {s: i for i, s in enumerate(strings)}
    # tiktoken's rule, which tokenizer.py follows: any two adjacent parts that spell a token merge,
    # the lowest token id first, and a piece that is a token is never split. In HF terms: every
    # split of a token is a merge, ranked by the token's id, and ignore_merges (as Llama 3's).
    merges = [f"{s[:i]} {s[i:]}" for s in strings[256:] for i in range(1, len(s))
              if s[:i] in vocab and s[i:] in vocab]
    if tokenizer.pattern not in RE_TO_HF:
        raise ValueError("the tokenizer splits text with a regex that has no Hugging Face "
                         "equivalent here")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": RE_TO_HF[tokenizer.pattern]},
             "behavior": "Isolated", "invert": False}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in tokenizer.special_tokens.items()]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                      "byte_fallback": False, "ignore_merges": True, "vocab": vocab,
                      "merges": merges}}


def hf_config(config, tokenizer, eos_id, dtype):
    """config.json for transformers, vLLM and llama.cpp (detail 2)."""
    moe, score = config.num_experts > 0, config.head == "score"
    if moe and config.shared_expert_intermediate_size == 0:
        raise ValueError("a mixture of experts without a shared expert has no Qwen2-MoE "
                         "equivalent: export needs shared_expert_intermediate_size > 0")
    family = "Qwen2Moe" if moe else "Qwen2" if config.attention_bias else "Llama"
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rope_theta",
            "rope_scaling", "rms_norm_eps")
    hf = {"architectures": [family + ("ForSequenceClassification" if score else "ForCausalLM")],
          "model_type": {"Qwen2Moe": "qwen2_moe", "Qwen2": "qwen2", "Llama": "llama"}[family],
          **{k: getattr(config, k) for k in keys},
          "tie_word_embeddings": config.tie_word_embeddings and not score, "hidden_act": "silu",
          "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
          "use_cache": True,
          "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_id,
          "torch_dtype": str(dtype).removeprefix("torch.")}
    if family == "Llama":
        hf.update(attention_bias=False, mlp_bias=False,
                  head_dim=config.hidden_size // config.num_attention_heads)
    if moe:
        hf.update({k: getattr(config, k) for k in MOE_KEYS}, decoder_sparse_step=1,
                  mlp_only_layers=[])
    if score:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if config.dual_chunk_attention_config:
        hf.update(dual_chunk_attention_config=config.dual_chunk_attention_config)
    return hf


def hf_weights(state, config):
    """Our state_dict -> the tensors of model.safetensors (detail 1)."""
    weights = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith(".experts.gate_up_proj"):        # (E, 2I, C) -> gate, up (I, C) per expert
            for e, expert in enumerate(tensor):
                gate, up = expert.chunk(2, dim=0)
                weights[f"{name.removesuffix('gate_up_proj')}{e}.gate_proj.weight"] = gate.clone()
                weights[f"{name.removesuffix('gate_up_proj')}{e}.up_proj.weight"] = up.clone()
        elif name.endswith(".experts.down_proj"):         # (E, C, I) -> (C, I) per expert
            for e, expert in enumerate(tensor):
                weights[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = expert.clone()
        else:
            weights[name] = tensor
        if (config.num_experts and not config.attention_bias
                and re.search(r"[qkv]_proj\.weight$", name)):  # Qwen2-MoE has q/k/v biases
            weights[name.removesuffix("weight") + "bias"] = tensor.new_zeros(len(tensor))
    return weights


def write_directory(out_dir, files, weights, weights_file="model.safetensors"):
    """Prepare every file in a temporary directory, then move them into out_dir (detail 10)."""
    names = [*files, weights_file]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file: export writes a directory")
    others = sorted(set(os.listdir(out_dir)) - set(names)) if os.path.isdir(out_dir) else []
    if others:
        raise ValueError(f"{out_dir} already holds other files ({', '.join(others[:3])}): "
                         "export into a new directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".hf-export-") as tmp:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        write_safetensors(weights, os.path.join(tmp, weights_file))
        os.makedirs(out_dir, exist_ok=True)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def export_hf(checkpoint_path, out_dir):
    """A transformers directory for a checkpoint: config, safetensors, tokenizer, chat template."""
    model, tokenizer, checkpoint = load_checkpoint(checkpoint_path)
    if tokenizer is None:
        raise ValueError(f"{checkpoint_path} holds no tokenizer: export needs a checkpoint "
                         "written by a stage")
    config, state = model.config, checkpoint["model"]
    del model
    chat = checkpoint.get("stage") != "pretrain"  # detail 4
    eos_id = tokenizer.im_end_id if chat else tokenizer.eot_id
    eos = "<|im_end|>" if chat else "<|endoftext|>"
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for s, i in tokenizer.special_tokens.items()}
    files = {
        "config.json": hf_config(config, tokenizer, eos_id,
                                 state["model.embed_tokens.weight"].dtype),
        "generation_config.json": {"bos_token_id": None, "eos_token_id": eos_id,
                                   "pad_token_id": tokenizer.pad_id},
        "tokenizer.json": hf_tokenizer_json(tokenizer),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "bos_token": None, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": None,
            "chat_template": CHAT_TEMPLATE, "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": False, "split_special_tokens": False,
            "add_prefix_space": False},
    }
    write_directory(out_dir, files, hf_weights(state, config))
    print(f"exported {checkpoint_path} ({files['config.json']['architectures'][0]}) to {out_dir}")


# detail 11: a PEFT LoRA adapter directory
def export_adapter(checkpoint_path, out_dir):
    """Write the LoRA adapter of a checkpoint as adapter_config.json + adapter_model.safetensors."""
    _, _, checkpoint = load_checkpoint(checkpoint_path)
    lora = checkpoint.get("lora")
    if not lora:
        raise ValueError(f"{checkpoint_path} holds no LoRA adapter: it comes from a run without "
                         "--lora-rank")
    if checkpoint["config"].get("head") != "lm":
        raise ValueError(f"{checkpoint_path} has a score head: export-adapter writes causal-LM "
                         "adapters only")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": None,  # ours is a .pt file
              "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
              "target_modules": lora["targets"], "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "use_rslora": False, "use_dora": False}
    weights = {"base_model.model." + name: tensor.contiguous()
               for name, tensor in lora["weights"].items()}
    write_directory(out_dir, {"adapter_config.json": config}, weights, "adapter_model.safetensors")
    parent = checkpoint.get("parent")
    print(f"exported the rank-{lora['rank']} LoRA adapter of {checkpoint_path} "
          f"({', '.join(lora['targets'])}) to {out_dir}; "
          f"its base is {parent} (`python hf.py export {parent} DIR`)")


# ------------------------------------------------------------------------------------- import

def read_json(model_dir, name):
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: import reads a Hugging Face model directory "
                                "(config.json, *.safetensors, tokenizer.json)")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None


def config_from_hf(hf, model_dir):
    """config.json -> ModelConfig, or a one-line error naming what we can't reproduce (detail 5)."""
    arch = (hf.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{model_dir}: architecture {arch} is not supported: import reads "
                         f"{', '.join(ARCHITECTURES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{model_dir}/config.json lacks {', '.join(missing)}")
    heads, context = hf["num_attention_heads"], hf.get("max_position_embeddings", 2048)
    # transformers 5 spells it rope_parameters
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_parameters") or {})}
    if hf.get("rope_scaling"):                                 # the older spelling
        rope = {"rope_theta": rope["rope_theta"], **hf["rope_scaling"]}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    original = rope.get("original_max_position_embeddings", context)  # YaRN's pretraining context
    head_dim = hf["hidden_size"] // heads
    yarn_defaults = (("beta_fast", 32), ("beta_slow", 1), ("attention_factor", None),
                     ("truncate", True), ("mscale", None), ("mscale_all_dim", None))
    problems = {f"hidden_act {hf.get('hidden_act')}": hf.get("hidden_act", "silu") != "silu",
                f"head_dim {hf.get('head_dim')} != hidden_size / heads":
                    hf.get("head_dim", head_dim) != head_dim,
                "sliding-window attention": hf.get("use_sliding_window"),
                "MLP biases": hf.get("mlp_bias"),
                f"rope type {rope_type}": rope_type not in ("default", "yarn"),
                "YaRN beta_fast / beta_slow / attention_factor / truncate / mscale": any(
                    rope.get(k, v) != v for k, v in yarn_defaults),
                "dense layers between MoE layers":
                    hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")}
    for problem, present in problems.items():
        if present:
            raise ValueError(f"{model_dir}: {arch} with {problem} is not supported by model.py")
    moe = ({"norm_topk_prob": False, **{k: hf[k] for k in MOE_KEYS if k in hf}}
           if arch == "Qwen2MoeForCausalLM" else {})
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads", heads),
        max_position_embeddings=context, rope_theta=float(rope["rope_theta"]),
        rope_scaling=({"type": "yarn", "factor": rope.get("factor") or context / original,
                       "original_max_position_embeddings": original}
                      if rope_type == "yarn" else None),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        dual_chunk_attention_config=hf.get("dual_chunk_attention_config"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias={"Qwen2ForCausalLM": True, "Qwen2MoeForCausalLM": hf.get("qkv_bias", True),
                        "LlamaForCausalLM": hf.get("attention_bias", False)}[arch],
        **moe)


def tokenizer_from_hf(tj, path):
    """tokenizer.json -> (our Tokenizer, the HF id of each of our ids, None for a new token)
    (details 6, 8)."""
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError(f"{path} is not a byte-level BPE tokenizer ({model.get('type')} model): "
                         "import reads byte-level BPE (Qwen2, Llama 3), not SentencePiece")
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    regex = regexes[0] if regexes else None
    if regex not in HF_TO_RE or byte_level[0].get("add_prefix_space") or len(regexes) > 1:
        raise ValueError(f"{path}: the pre-tokenizer ({regex or 'ByteLevel'}) is not one "
                         "tokenizer.py reproduces (Qwen2 or Llama 3 regex, no prefix space)")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: the {normalizer} normalizer is not one tokenizer.py reproduces")
    vocab = model.get("vocab") or {}
    hf_merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    byte_char = bytes_to_unicode()
    char_byte = {c: b for b, c in byte_char.items()}
    to_bytes = {s: bytes(char_byte[c] for c in s) for s in vocab if all(c in char_byte for c in s)}
    sources = [vocab.get(byte_char[b]) for b in range(256)]    # our ids 0..255 = bytes 0..255
    if None in sources:
        raise ValueError(f"{path}: the vocab lacks a single-byte token, every byte-level BPE "
                         "has all 256")
    ids = {bytes([b]): b for b in range(256)}                  # token bytes -> our id
    merges = []
    for a, b in hf_merges:                                     # detail 6
        if (a + b in to_bytes and to_bytes[a + b] not in ids and to_bytes.get(a) in ids
                and to_bytes.get(b) in ids):
            ids[to_bytes[a + b]] = 256 + len(merges)
            merges.append((ids[to_bytes[a]], ids[to_bytes[b]]))
            sources.append(vocab[a + b])
    specials, used = [], set(sources)
    for token in sorted(tj.get("added_tokens", []), key=lambda t: t["id"]):
        if token["content"] not in specials and token["id"] not in used:
            specials.append(token["content"])
            sources.append(token["id"])
    for name in SPECIAL_TOKENS:                       # the chat format needs these (detail 8)
        if name not in specials:
            specials.append(name)
            sources.append(None)
    unreachable = len(vocab) - 256 - len(merges) - sum(s in vocab for s in specials)
    if unreachable:
        print(f"note: {unreachable} tokens of {path} are made by no merge and never produced",
              file=sys.stderr)
    return Tokenizer(merges, special_tokens=tuple(specials), pattern=HF_TO_RE[regex]), sources


def read_weights(model_dir):
    """All tensors of the safetensors file(s), experts fused into 3-D tensors as in model.py."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        shards = ["model.safetensors"]
    elif os.path.isfile(index):
        weight_map = read_json(model_dir, "model.safetensors.index.json")["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        raise FileNotFoundError(f"{model_dir} has no model.safetensors or "
                                "model.safetensors.index.json (.bin weights are not read: save the "
                                "model with safe_serialization)")
    weights = {}
    for shard in shards:
        if not os.path.isfile(os.path.join(model_dir, shard)):
            raise FileNotFoundError(f"{os.path.join(model_dir, shard)} not found: the index "
                                    "lists it")
        weights.update(read_safetensors(os.path.join(model_dir, shard)))
    experts = {}                                               # detail 1, in reverse
    for name in list(weights):
        if match := re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name):
            experts.setdefault(match[1], {})[int(match[2]), match[3]] = weights.pop(name)
    for prefix, parts in experts.items():           # {(expert, "gate" | "up" | "down"): tensor}
        count = 1 + max(e for e, _ in parts)
        if len(parts) != 3 * count:
            raise ValueError(f"{model_dir}: some of the {count} experts of {prefix} lack a weight")
        weights[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(count)])  # (E, 2I, C)
        weights[f"{prefix}.down_proj"] = torch.stack(
            [parts[e, "down"] for e in range(count)])                                # (E, C, I)
    return {n: t for n, t in weights.items() if not n.endswith("rotary_emb.inv_freq")}


def reorder_rows(weight, sources):
    """Rows in our id order (detail 7); a new token gets the mean row (detail 8); unused rows go
    last."""
    used = set(sources)
    order = ([-1 if s is None else s for s in sources]
             + [r for r in range(len(weight)) if r not in used])
    if order == list(range(len(weight))):
        return weight
    index = torch.tensor(order)
    rows = weight[index.clamp(min=0)]
    rows[index < 0] = weight.float().mean(dim=0).to(weight.dtype)
    return rows


def import_hf(model_dir, out_path):
    """Read a local Qwen2 / Llama directory into a checkpoint any stage takes as --init."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a directory: import reads a Hugging Face "
                                "model directory")
    config = config_from_hf(read_json(model_dir, "config.json"), model_dir)
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    tokenizer, sources = tokenizer_from_hf(read_json(model_dir, "tokenizer.json"), tokenizer_path)
    weights = read_weights(model_dir)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    with torch.device("meta"):                                 # shapes only, no memory
        expected = {n: t.shape for n, t in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    for name in sorted(expected.keys() | weights.keys()):
        if name not in weights:
            raise ValueError(f"{model_dir}: the safetensors lack {name}, which config.json implies")
        if name not in expected:
            raise ValueError(f"{model_dir}: unexpected tensor {name} for this config.json")
        if weights[name].shape != expected[name]:
            raise ValueError(f"{model_dir}: {name} has shape {tuple(weights[name].shape)} but "
                             f"config.json implies {tuple(expected[name])}")
    top = max(s for s in sources if s is not None)
    if top >= config.vocab_size:
        raise ValueError(f"{tokenizer_path} has ids up to {top} but the embedding has "
                         f"{config.vocab_size} rows")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = reorder_rows(weights[name], sources)
    config.vocab_size = len(weights["model.embed_tokens.weight"])
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(weights, assign=True)
    save_checkpoint(out_path, model, tokenizer, stage="import", parent=os.path.abspath(model_dir),
                    args={"model_dir": model_dir})
    print(f"imported {model_dir} ({config.num_hidden_layers} layers of {config.hidden_size}, "
          f"{tokenizer.vocab_size} tokens) to {out_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to a Hugging Face directory, or import one.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="checkpoint -> transformers directory")
    p.add_argument("checkpoint", help="e.g. out/sft.pt")
    p.add_argument("out_dir",
                   help="directory to write (config.json, model.safetensors, tokenizer.json, ...)")
    p = commands.add_parser("export-adapter",
                            help="the LoRA adapter of a checkpoint -> PEFT directory")
    p.add_argument("checkpoint",
                   help="a checkpoint written by a stage run with --lora-rank, e.g. out/sft.pt")
    p.add_argument("out_dir",
                   help="directory to write (adapter_config.json, adapter_model.safetensors)")
    p = commands.add_parser("import", help="local Qwen2 / Llama directory -> checkpoint")
    p.add_argument("model_dir",
                   help="a directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. out/qwen.pt")
    args = parser.parse_args(argv)
    if args.command == "export":
        export_hf(args.checkpoint, args.out_dir)
    elif args.command == "export-adapter":
        export_adapter(args.checkpoint, args.out_dir)
    else:
        import_hf(args.model_dir, args.out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
