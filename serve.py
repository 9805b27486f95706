"""
serve.py: talk to a checkpoint: continue a text, or chat in the ChatML template on stdin.

    python serve.py sample out/pretrain.pt --prompt "Once upon a time"   # continue a text
    python serve.py sample out/sft.pt --prompt "hi" --temperature 0      # greedy
    echo "What is 2+3?" | python serve.py chat out/sft.pt                # ChatML chat, reads stdin
"""
import argparse
import sys
import time

import torch

from engine import generate
from model import load_checkpoint
from tokenizer import final_answer, thinks


def show_reply(reply: str) -> str:
    """A reply as the chat shows it: the steps of a think block on a line of their own, then the
    final answer."""
    if not thinks(reply):
        return reply
    steps = reply.lstrip()[len("<think>"):].partition("</think>")[0]
    answer = final_answer(reply)
    return f"[thinking] {steps.strip()}\n" + (answer if answer is not None
                                              else "[no answer: the think block never closed]")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Sample from or chat with an llm-stages checkpoint.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("sample", "continue a text prompt"),
                       ("chat", "ChatML chat on stdin; /quit or EOF ends")):
        p = commands.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", help="e.g. out/pretrain.pt or out/sft.pt")
        p.add_argument("--max-new-tokens", type=int, default=200,
                       help="tokens to generate per reply")
        p.add_argument("--temperature", type=float, default=0.8 if name == "sample" else 0.0,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=50,
                       help="sample among the k most likely tokens (0 = all)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
        if name == "sample":
            p.add_argument("--prompt", default="", help="text to continue")
            p.add_argument("--num-samples", type=int, default=1,
                           help="completions to draw, as one batch")
        else:
            p.add_argument("--system", default="", help="an optional system message")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here "
                         "(--device auto picks what there is)")
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, head="lm")
    model.eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    context = model.config.max_position_embeddings
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    pad_id=tokenizer.pad_id, generator=generator)

    if args.command == "sample":
        # a document starts after <|endoftext|>; too long a prompt: generate says so
        prompt = [tokenizer.eot_id] + tokenizer.encode(args.prompt)
        max_new = max(1, min(args.max_new_tokens, context - len(prompt)))
        t0 = time.time()
        completions, _, mask = generate(model, [prompt] * args.num_samples, max_new, **settings)
        seconds = time.time() - t0
        for row, row_mask in zip(completions, mask):
            print(args.prompt + tokenizer.decode(row[row_mask.bool()].tolist()))
            print("-" * 40)
        print(f"{int(mask.sum())} tokens in {seconds:.2f}s: "
              f"{mask.sum().item() / seconds:.1f} tokens/s", file=sys.stderr)
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
        # forget the oldest exchange (kept: the system message) until the prompt + 16 tokens fit
        while len(prompt) + 16 > context and len(messages) > 2:
            del messages[bool(args.system):bool(args.system) + 2]
            prompt = tokenizer.encode_prompt(messages)
        max_new = max(1, min(args.max_new_tokens, context - len(prompt)))
        completion, _, mask = generate(model, [prompt], max_new, eos_id=tokenizer.im_end_id,
                                       **settings)
        reply = [t for t in completion[0][mask[0].bool()].tolist() if t != tokenizer.im_end_id]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        print(show_reply(messages[-1]["content"]), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
