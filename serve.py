"""
serve.py: talk to a checkpoint: an OpenAI-compatible HTTP server with a chat page, or the terminal.

    python serve.py out/grpo.pt                 # http://127.0.0.1:8000: the chat page, and the API
    python serve.py out/grpo.pt --port 8001 --device cuda --max-batch-size 64
    python serve.py sample out/pretrain.pt --prompt "Once upon a time"   # continue a text
    echo "What is 2+3?" | python serve.py chat out/sft.pt                # ChatML chat on stdin

    from openai import OpenAI   # the model's name is the checkpoint's file name, without .pt
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="grpo", messages=[{"role": "user", "content": "2 + 3 ="}])

Routes: GET / (serve.html), GET /v1/models, POST /v1/chat/completions with messages, max_tokens
(or max_completion_tokens), temperature, top_p, stop, n, seed, stream (+ stream_options).

Implementation details (tagged `# detail N` in the code):
1. Batching: HTTP threads queue their requests; one worker thread takes every request waiting and
   decodes them as one batch, one row per choice. Requests that arrive meanwhile wait for the next
   batch (static batching, as engine.generate: left-padded prompts, one prefill, one KV cache).
2. Each row samples with its own temperature, top_p and generator (seeded with `seed` + choice), so
   its reply does not depend on its batch (to float rounding); a lone request with n = 1 takes
   engine.generate's exact steps, so its reply is generate's, greedy or seeded.
3. A row ends at <|im_end|> or a stop string (finish_reason "stop"; the stop string is cut), at
   max_tokens ("length"), or when its client hangs up; the batch ends when every row has ended.
4. A row's text is decoded whole after each token; a stream sends only what can no longer change:
   not a character whose UTF-8 bytes are still coming, nor what may begin a stop string or a tag.
5. The <think>...</think> part of a reply is `reasoning_content`, the rest `content`, as DeepSeek's
   and Qwen's APIs. Assistant messages in the history are encoded with their content only.
6. Errors have OpenAI's shape {"error": {message, type, param, code}}: 400 for bad JSON, a bad
   field or a prompt that does not fit the context (with the numbers), 404 for an unknown model.
"""
import argparse
import http.server
import ipaddress
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch

from engine import generate, left_pad, sample_token
from model import KVCache, load_checkpoint
from tokenizer import final_answer, thinks

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
MAX_BODY = 1 << 20  # bytes of a request body


class ApiError(Exception):
    """An error as OpenAI's API answers it (detail 6): an HTTP status and {"error": {...}}."""

    def __init__(self, status: int, message: str, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A checked chat request, and how its reply comes back from the worker thread."""
    prompt: list  # token ids: the messages in the chat template, then the assistant header
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    # the worker puts (choice, text, finish_reason or None, completion tokens), or an ApiError
    updates: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client is gone


# ------------------------------------------------------------------------------ the protocol

def parse_messages(messages) -> list[dict]:
    """OpenAI messages -> the chat template's {role, content}: text parts joined, "developer" is
    the system role, an assistant message's reasoning_content dropped (detail 5)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       "messages")
    parsed = []
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(
            message, dict) else (None, None)
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str)
                                             for part in content):
            content = "".join(part["text"] for part in content)
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must have a role (system, user or assistant) "
                           "and a text content", f"messages[{i}]")
        parsed.append({"role": role, "content": content})
    return parsed


def parse_request(body: bytes, model_name: str, tokenizer, context: int, max_n: int) -> Request:
    """The body of POST /v1/chat/completions -> a Request, or an ApiError (detail 6)."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")

    def get(name, kind, default, valid=lambda value: True, rule=""):
        value = request.get(name)
        if value is None:  # absent or null: the default, as OpenAI
            return default
        typed = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not (typed and valid(value)):
            raise ApiError(400, f"{name} must be {rule}, got {json.dumps(value)}", name)
        return value

    model = get("model", str, None, rule="a string")
    if model is None:
        raise ApiError(400, "model is missing: GET /v1/models lists the models", "model")
    if model != model_name:
        raise ApiError(404, f"the model `{model}` does not exist: this server serves "
                       f"`{model_name}`", "model", "model_not_found")
    messages = parse_messages(request.get("messages"))
    stop = get("stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them, got "
                       f"{json.dumps(request['stop'])}", "stop")
    options = get("stream_options", dict, {}, lambda v: type(v.get("include_usage", False))
                  is bool, "an object such as {\"include_usage\": true}")
    max_tokens = get("max_completion_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = get("max_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    try:
        prompt = tokenizer.encode_prompt(messages)
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" is no UTF-8 text
        raise ApiError(400, f"messages: {e}", "messages") from None
    parsed = Request(
        prompt=prompt, max_tokens=max_tokens,
        temperature=get("temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"),
        top_p=get("top_p", (int, float), 1.0, lambda v: 0 <= v <= 1, "in [0, 1]"),
        n=get("n", int, 1, lambda v: 1 <= v <= max_n, f"an integer in [1, {max_n}]"),
        seed=get("seed", int, None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
        stop=stop,
        stream=get("stream", bool, False, rule="true or false"),
        include_usage=options.get("include_usage", False))
    room = context - len(parsed.prompt)  # max_tokens defaults to the rest of the context
    if room < 1 or (max_tokens or 0) > room:
        asked = len(parsed.prompt) + (max_tokens or 1)
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but "
                       f"{asked} were requested ({len(parsed.prompt)} in the messages, "
                       f"{max_tokens or 1} in the completion): shorten the messages or lower "
                       "max_tokens", "messages", "context_length_exceeded")
    parsed.max_tokens = max_tokens or room
    return parsed


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A reply -> (reasoning_content, content) (detail 5): the steps of its think block and the
    text after it; (None, text) for a reply that does not think."""
    if not thinks(text):
        return None, text
    reasoning, _, content = text.lstrip()[len("<think>"):].partition("</think>")
    return reasoning, content


def sendable_length(text: str, stops: list, finished: bool) -> int:
    """How much of a reply decoded so far a stream can send without taking it back (detail 4)."""
    if finished:
        return len(text)
    if "<think>".startswith(text.lstrip()):  # it may still open a think block
        return 0
    markers = stops + (["</think>"] if thinks(text) and "</think>" not in text else [])
    end = len(text.rstrip("\ufffd"))  # U+FFFD: a character whose bytes are not all there yet
    for start in range(max(0, end - max(map(len, markers), default=1) + 1), end):
        if any(marker.startswith(text[start:end]) for marker in markers):
            return start  # text[start:end] may be the start of a marker: hold it back
    return end


def reply_delta(sent: tuple[str, str], text: str) -> tuple[dict, tuple[str, str]]:
    """A stream's delta for a reply grown to `text`, given the (reasoning, content) sent so far
    -> (delta, what has been sent with it)."""
    reasoning, content = split_reasoning(text)
    delta = {}
    if reasoning and len(reasoning) > len(sent[0]):
        delta["reasoning_content"] = reasoning[len(sent[0]):]
    if len(content) > len(sent[1]):
        delta["content"] = content[len(sent[1]):]
    return delta, (reasoning or "", content)


def completion_body(head: dict, replies: list, usage: dict) -> dict:
    """A whole chat completion; replies: (text, finish_reason) for each choice."""
    choices = []
    for index, (text, finish_reason) in enumerate(replies):
        reasoning, content = split_reasoning(text)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        choices.append({"index": index, "message": message, "logprobs": None,
                        "finish_reason": finish_reason})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def host_warning(host: str) -> str | None:
    """A warning unless the server listens on loopback only: it has no authentication."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else (f"--host {host}: anyone who can reach this machine can use the "
                                  "model (no authentication)")


# ------------------------------------------------------------------- the worker (details 1-4)

class Row:
    """One choice of one request in a batch: its generator, tokens and text."""

    def __init__(self, request: Request, choice: int, device):
        self.request, self.choice, self.tokens, self.text = request, choice, [], ""
        self.sent, self.finish = 0, None
        self.generator = torch.Generator(device)  # detail 2: each row its own
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed + choice)

    def add(self, token: int, tokenizer):
        """Take the row's next token, end it if it ends (detail 3), tell the request what's new."""
        request = self.request
        self.tokens.append(token)
        if token == tokenizer.im_end_id:
            self.finish = "stop"
        elif len(self.tokens) == request.max_tokens:
            self.finish = "length"
        if not (self.finish or request.stream or request.stop):
            return  # nobody needs the text before the end
        self.text = tokenizer.decode(self.tokens[:-1] if self.finish == "stop" else self.tokens)
        cut = min((i for i in map(self.text.find, request.stop) if i >= 0), default=None)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        ready = sendable_length(self.text, request.stop, self.finish is not None)
        if self.finish or (request.stream and ready > self.sent):  # detail 4
            self.sent = ready
            request.updates.put((self.choice, self.text[:ready], self.finish, len(self.tokens)))


@torch.no_grad()
def decode_batch(model, tokenizer, requests: list[Request], stats: Counter, closing=None):
    """Every choice of `requests` as one batch (detail 1): engine.generate's steps, with each
    row's own sampling settings (detail 2) and end (detail 3). `closing` set: it stops."""
    device = next(model.parameters()).device
    rows = [Row(request, choice, device) for request in requests for choice in range(request.n)]
    ids, mask = left_pad([row.request.prompt for row in rows], tokenizer.pad_id, device)  # (B, P)
    B, P = ids.shape
    steps = max(row.request.max_tokens for row in rows)
    cache = KVCache(model.config, B, P + steps, device)
    logits, _ = model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)  # (B, 1, V)
    for _ in range(steps):
        if closing is not None and closing.is_set():
            raise RuntimeError("the server is shutting down")
        was_done = torch.tensor([row.finish is not None for row in rows], device=device)  # (B,)
        tokens = [tokenizer.pad_id] * B
        for i, row in enumerate(rows):
            if row.finish is None and row.request.cancelled.is_set():
                row.finish = "cancelled"
                stats["cancelled"] += 1
            if row.finish is None:
                request = row.request
                token, _ = sample_token(logits[i:i + 1, -1].float(), request.temperature, 0,
                                        request.top_p, row.generator)
                tokens[i] = int(token)
                row.add(tokens[i], tokenizer)
        if all(row.finish is not None for row in rows):
            break
        logits, _ = model(torch.tensor(tokens, device=device)[:, None],
                          attention_mask=~was_done[:, None], kv_cache=cache, logits_to_keep=1)
    tokens = sum(len(row.tokens) for row in rows)
    stats.update(batches=1, rows=B, tokens=tokens)  # Counter.update adds
    stats["max_rows"] = max(stats["max_rows"], B)
    return tokens


def run_batches(model, tokenizer, waiting: queue.Queue, max_rows: int, stats: Counter, log: bool,
                closing: threading.Event):
    """The worker thread: forever, every request waiting (up to about max_rows rows) as one batch
    (detail 1). `closing` set and None on the queue stop it."""
    while True:
        requests = [waiting.get()]  # detail 1: wait for one, then take all that wait with it
        while (requests[-1] is not None and not waiting.empty()
               and sum(request.n for request in requests) < max_rows):
            requests.append(waiting.get())
        if None in requests:
            return
        requests = [request for request in requests if not request.cancelled.is_set()]
        if not requests:
            continue
        start = time.time()
        try:
            tokens = decode_batch(model, tokenizer, requests, stats, closing)
        except Exception as e:  # a failed batch fails its requests, not the server
            for request in requests:
                request.updates.put(ApiError(500, f"generation failed: {type(e).__name__}: {e}"))
            continue
        if log:
            seconds = time.time() - start
            print(f"serve | batch {stats['batches']} | {len(requests)} requests, "
                  f"{sum(r.n for r in requests)} rows | {tokens} tokens in {seconds:.2f}s, "
                  f"{tokens / seconds:.0f} tok/s | {waiting.qsize()} waiting", file=sys.stderr)


# ----------------------------------------------------------------------------- the HTTP side

class ChatServer(http.server.ThreadingHTTPServer):
    """A thread per connection for HTTP, and the one worker thread that runs the model."""
    daemon_threads = True  # a connection left open never holds up the exit
    request_queue_size = 128  # connections waiting to be accepted (5 by default: some are reset)

    def __init__(self, address, model, tokenizer, model_name: str, max_batch_size=32, log=True):
        super().__init__(address, Handler)
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.context, self.max_rows = model.config.max_position_embeddings, max_batch_size
        self.created, self.waiting, self.stats = int(time.time()), queue.Queue(), Counter()
        self.closing = threading.Event()
        self.worker = threading.Thread(target=run_batches, args=(
            model, tokenizer, self.waiting, max_batch_size, self.stats, log, self.closing))
        self.worker.start()

    def server_close(self):
        super().server_close()
        self.closing.set()  # the batch running stops at its next step
        self.waiting.put(None)
        self.worker.join()  # torch must not be running while Python exits


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections are kept alive; a stream is sent chunked
    timeout = 120  # seconds a connection may stay silent before it is closed
    disable_nagle_algorithm = True  # send each write at once: no 40 ms wait for the client's ACK

    def log_message(self, *args):  # the worker logs each batch instead
        pass

    def send_body(self, status: int, data: bytes, content_type: str, close=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if close:  # the request's body was not read: the connection can't go on
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, body: dict, close=False):
        self.send_body(status, json.dumps(body).encode(), "application/json", close)

    def send_event(self, data):
        """One server-sent event, as one chunk of the chunked response."""
        event = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(b"%X\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client has closed the connection (what it may have sent since stays)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self):
        path, name = urlsplit(self.path).path, self.server.model_name
        model = {"id": name, "object": "model", "created": self.server.created,
                 "owned_by": "llm-stages"}
        if path in ("/", "/index.html") and os.path.exists(PAGE):
            with open(PAGE, "rb") as f:
                self.send_body(200, f.read(), "text/html; charset=utf-8")
        elif path in ("/v1/models", f"/v1/models/{name}"):
            self.send_json(200, {"object": "list", "data": [model]} if path == "/v1/models"
                           else model)
        else:
            self.send_json(404, ApiError(404, f"no route GET {path}", code="not_found").body())

    def do_POST(self):
        if urlsplit(self.path).path != "/v1/chat/completions":
            error = ApiError(404, f"no route POST {self.path}", code="not_found")
            return self.send_json(404, error.body(), close=True)
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            status = 411 if not length.isdigit() else 413
            error = ApiError(status, f"a JSON body with a Content-Length of at most {MAX_BODY}")
            return self.send_json(status, error.body(), close=True)
        server = self.server
        try:
            request = parse_request(self.rfile.read(int(length)), server.model_name,
                                    server.tokenizer, server.context, server.max_rows)
        except ApiError as e:
            return self.send_json(e.status, e.body())
        server.waiting.put(request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": server.model_name}
        try:
            (self.stream if request.stream else self.complete)(request, head)
        except ApiError as e:
            self.send_json(e.status, e.body())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            request.cancelled.set()  # nothing more to generate for this request (detail 3)

    def updates(self, request: Request):
        """The worker's updates of `request` until every choice has ended; a client that hangs up
        cancels it (detail 3)."""
        ended = 0
        while ended < request.n:
            try:
                update = request.updates.get(timeout=1.0)
            except queue.Empty:
                update = None
            if self.client_gone():
                raise ConnectionResetError("the client hung up")
            if isinstance(update, ApiError):
                raise update
            if update is not None:
                ended += update[2] is not None
                yield update

    def complete(self, request: Request, head: dict):
        replies, tokens = [None] * request.n, 0
        for choice, text, finish_reason, count in self.updates(request):
            replies[choice], tokens = (text, finish_reason), tokens + count
        self.send_json(200, completion_body(head, replies, usage_body(len(request.prompt), tokens)))

    def stream(self, request: Request, head: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = {**head, "object": "chat.completion.chunk"}
        self.send_event({**chunk, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(request.n)]})
        sent, tokens = [("", "")] * request.n, 0
        try:
            for choice, text, finish_reason, count in self.updates(request):
                delta, sent[choice] = reply_delta(sent[choice], text)
                tokens += count if finish_reason else 0
                if delta or finish_reason:
                    self.send_event({**chunk, "choices": [
                        {"index": choice, "delta": delta, "finish_reason": finish_reason}]})
            if request.include_usage:
                usage = usage_body(len(request.prompt), tokens)
                self.send_event({**chunk, "choices": [], "usage": usage})
        except ApiError as e:  # the status is sent already: the error goes in the stream
            self.send_event(e.body())
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


# ----------------------------------------------------------------------------- command line

def show_reply(reply: str) -> str:
    """A reply as the chat shows it: the steps of a think block on a line of their own, then the
    final answer."""
    reasoning, _ = split_reasoning(reply)
    if reasoning is None:
        return reply
    answer = final_answer(reply)
    return f"[thinking] {reasoning.strip()}\n" + (answer if answer is not None
                                                  else "[no answer: the think block never closed]")


def parse_args(argv):
    """`serve.py CKPT` serves; `serve.py sample|chat CKPT` are the terminal commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in ("serve", "sample", "chat", "-h", "--help"):
        argv = ["serve", *argv]
    parser = argparse.ArgumentParser(
        description="Serve, sample from or chat with an llm-stages checkpoint "
                    "(`serve.py CKPT` is `serve.py serve CKPT`).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "an OpenAI-compatible server and a chat page (the default)"),
                       ("sample", "continue a text prompt"),
                       ("chat", "ChatML chat on stdin; /quit or EOF ends")):
        p = commands.add_parser(name, help=text, description=text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("checkpoint", help="e.g. out/pretrain.pt or out/sft.pt")
        p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (not loopback: a warning, no authentication)")
            p.add_argument("--port", type=int, default=8000, help="0 = any free port")
            p.add_argument("--model-name", default="",
                           help="the model's name in the API; empty: the checkpoint's file name")
            p.add_argument("--max-batch-size", type=int, default=32,
                           help="rows (choices) decoded together at most")
            continue
        p.add_argument("--max-new-tokens", type=int, default=200,
                       help="tokens to generate per reply")
        p.add_argument("--temperature", type=float, default=0.8 if name == "sample" else 0.0,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=50,
                       help="sample among the k most likely tokens (0 = all)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        if name == "sample":
            p.add_argument("--prompt", default="", help="text to continue")
            p.add_argument("--num-samples", type=int, default=1,
                           help="completions to draw, as one batch")
        else:
            p.add_argument("--system", default="", help="an optional system message")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available()
                       else "mps" if torch.backends.mps.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here "
                         "(--device auto picks what there is)")
    if args.command == "serve" and not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port}: a port is in [0, 65535] (0 = any free one)")
    if args.command == "serve" and args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size {args.max_batch_size}: at least 1")
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, head="lm")
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} holds no tokenizer: it can't read or write text")
    model.eval()

    if args.command == "serve":
        if host_warning(args.host):
            print(f"warning: {host_warning(args.host)}", file=sys.stderr)
        name = args.model_name or os.path.splitext(os.path.basename(args.checkpoint))[0]
        server = ChatServer((args.host, args.port), model, tokenizer, name, args.max_batch_size)
        host, port = server.server_address[:2]

        def stop(signum, frame):  # Ctrl-C, and kill's / docker stop's SIGTERM: a clean exit, even
            raise KeyboardInterrupt  # when started in the background (SIGINT ignored there)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)
        try:  # announced once a signal can stop it cleanly: a kill right after the line exits 0
            print(f"serving {name} at http://{host}:{port}/ (the chat page) and "
                  f"http://{host}:{port}/v1 (the API); Ctrl-C stops", flush=True)
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return

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
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
