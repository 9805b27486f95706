"""
bench/bench_serve.py: serve.py under load on loopback: throughput and latency (p50, p95) with 1, 4
and 16 concurrent clients sending the same requests, against the same requests one at a time.

    python bench/bench_serve.py out/grpo.pt                     # ~30 s on 2 CPU cores
    python bench/bench_serve.py out/grpo.pt --requests 64 --clients 1,16
    python bench/bench_serve.py out/grpo.pt --screenshot docs/serve.png  # the page, in Chromium

The server runs in its own process (`python serve.py CKPT --port 0`); each client is a thread with
one kept-alive connection that sends its next request when the last one is answered. Every level
sends the same requests (built-in sums, greedy, `--max-tokens` at most) and stops at `--time-limit`.
Printed: requests/s, completion tokens/s, the latency percentiles, and the throughput over one at
a time (1 client); then the server's peak RSS. `--screenshot` drives headless Chromium (Debian's
`chromium` package) through the DevTools protocol: load the page, send two messages, wait for the
streamed replies, save a screenshot.
"""
import argparse
import base64
import http.client
import json
import os
import queue
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import quote, urlsplit

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(checkpoint, max_batch_size):
    """serve.py in a subprocess on a free port -> (process, port, model name)."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), checkpoint,
                                "--port", "0", "--max-batch-size", str(max_batch_size)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()  # serving NAME at http://127.0.0.1:PORT/ ...
    found = re.search(r"serving (\S+) at http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        process.kill()
        raise SystemExit(f"error: serve.py did not start: {line.strip() or 'no output'}")
    return process, int(found.group(2)), found.group(1)


def requests_of(count, model, max_tokens, seed=0):
    """`count` chat requests: sums as the built-in world asks them (data.py), greedy."""
    rng = random.Random(seed)
    forms = ["What is {} + {}?", "Compute {} - {}.", "Add {} and {}.", "{} + {} ="]
    return [{"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [
        {"role": "user", "content": rng.choice(forms).format(rng.randint(1, 999),
                                                             rng.randint(1, 999))}]}
            for _ in range(count)]


def run_level(port, bodies, clients, time_limit):
    """`clients` threads send `bodies` (each once) -> latencies (s), completion tokens, seconds."""
    todo, latencies, tokens, errors = queue.Queue(), [], [], []
    for body in bodies:
        todo.put(body)
    deadline = time.time() + time_limit

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=time_limit + 60)
        while time.time() < deadline:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/chat/completions", json.dumps(body),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
            except (OSError, http.client.HTTPException) as e:  # counted: no request goes missing
                errors.append(f"{type(e).__name__}: {e}")
                connection.close()
                continue
            if response.status != 200:
                errors.append(answer)
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(answer["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # (a level cut by the time limit shows fewer requests)
        raise SystemExit(f"error: {len(errors)} of {len(bodies)} requests failed, e.g. {errors[0]}")
    return latencies, tokens, time.perf_counter() - start


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


# ---------------------------------------------------------- the chat page in headless Chromium

class DevTools:
    """The Chrome DevTools protocol over a WebSocket (RFC 6455), with the standard library only."""

    def __init__(self, url):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += self.sock.recv(1)
        if b" 101 " not in reply.split(b"\r\n")[0]:
            raise SystemExit(f"error: DevTools refused the WebSocket: {reply[:100]!r}")
        self.calls = 0

    def read(self, n):
        data = b""
        while len(data) < n:
            data += self.sock.recv(n - len(data))
        return data

    def call(self, method, **params):
        """Send a command (a masked text frame); read frames until its answer."""
        self.calls += 1
        data, mask = json.dumps({"id": self.calls, "method": method, "params": params}).encode(), \
            os.urandom(4)
        size = (bytes([0x80 | len(data)]) if len(data) < 126
                else bytes([0x80 | 126]) + len(data).to_bytes(2, "big"))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x81]) + size + mask + masked)
        while True:
            message, final = b"", False
            while not final:  # a message may come in several frames
                first, second = self.read(2)
                final, size = first & 0x80, second & 0x7F
                if size >= 126:
                    size = int.from_bytes(self.read(2 if size == 126 else 8), "big")
                message += self.read(size)
            answer = json.loads(message)
            if answer.get("id") == self.calls:
                if "error" in answer:
                    raise SystemExit(f"error: {method}: {answer['error']}")
                return answer["result"]


def screenshot(port, path, questions, size=(900, 720)):
    """Chromium loads the page with the questions in ?q=, waits for the streamed replies, opens the
    first reasoning, and saves a screenshot."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                "about:blank"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        active = os.path.join(profile, "DevToolsActivePort")
        for _ in range(300):  # Chromium writes its port there once it listens
            if os.path.exists(active) and open(active).read().count("\n"):
                break
            time.sleep(0.1)
        debug_port = int(open(active).read().split()[0])
        connection = http.client.HTTPConnection("127.0.0.1", debug_port, timeout=30)
        connection.request("GET", "/json/list")
        pages = json.loads(connection.getresponse().read())
        tab = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        query = "&".join(f"q={quote(q)}" for q in questions)
        tab.call("Page.navigate", url=f"http://127.0.0.1:{port}/?{query}")
        for _ in range(300):
            state = tab.call("Runtime.evaluate", expression="document.readyState + typeof chatDone")
            if state["result"]["value"] == "completeobject":
                break
            time.sleep(0.1)
        tab.call("Runtime.evaluate", expression="chatDone", awaitPromise=True)
        tab.call("Runtime.evaluate", expression="document.querySelector('details').open = true")
        png = tab.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"wrote {path}")
    finally:
        browser.kill()
        browser.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="e.g. out/grpo.pt")
    parser.add_argument("--requests", type=int, default=256, help="requests sent at each level")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--max-batch-size", type=int, default=32, help="serve.py's option")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per level at most")
    parser.add_argument("--screenshot", default="", help="only save the chat page's screenshot")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    process, port, model = start_server(args.checkpoint, args.max_batch_size)
    try:
        if args.screenshot:
            return screenshot(port, args.screenshot, ["What is 2 + 646?", "Compute 941 - 643."])
        run_level(port, requests_of(8, model, args.max_tokens, seed=1), 4, args.time_limit)  # warm
        bodies = requests_of(args.requests, model, args.max_tokens)
        print(f"{model}: {args.requests} requests per level, greedy, max_tokens "
              f"{args.max_tokens}, {os.cpu_count()} CPUs, torch threads: "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
        print("| clients | requests | seconds | requests/s | tokens/s | p50 latency, s "
              "| p95 latency, s | throughput / one at a time |\n" + "|---:" * 8 + "|")
        baseline = None
        for clients in levels:
            latencies, tokens, seconds = run_level(port, bodies, clients, args.time_limit)
            throughput = sum(tokens) / seconds
            baseline = baseline or (throughput if clients == 1 else None)
            p50, p95 = np.percentile(latencies, [50, 95])
            ratio = f"{throughput / baseline:.1f}x" if baseline else "-"
            print(f"| {clients} | {len(latencies)} | {seconds:.1f} "
                  f"| {len(latencies) / seconds:.1f} | {throughput:.0f} | {p50:.2f} | {p95:.2f} "
                  f"| {ratio} |", flush=True)
        print(f"server peak RSS: {peak_rss_mb(process.pid):.0f} MB")
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
