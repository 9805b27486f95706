"""
bench/scaling.py: a scaling law on a laptop. Trains a grid of model sizes x token budgets with
pretrain.py on the built-in world, fits L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al.
2022, "Chinchilla", approach 3) and says how to split a compute budget between N and D.

    python data.py && python tokenizer.py     # the data and tokenizer pretrain.py reads
    python bench/scaling.py                   # 18 runs, <= 20 minutes on 2 CPU cores
    python bench/scaling.py --quick           # 9 tiny runs, about a minute: a check that it works

Writes docs/scaling.json (every run, the fit, the allocation) and docs/scaling.png (matplotlib).

1. Each run is `python pretrain.py` (from a copy of the .py files taken at the start: an edit
   meanwhile does not split the grid) with --hidden-size / --num-layers / --steps, one thread each,
   --workers at a time; every other option at pretrain.py's default, warmup scaled with the steps.
2. The grid is SIZES x TOKENS less the runs with C = 6ND above --max-flops (its costliest corner).
   The largest budget passes over pretrain.txt 1.4 times (Muennighoff et al. 2023: up to ~4 passes
   cost little against new data).
3. L = the final model's loss in nats/token on pretrain_val.txt (up to --val-tokens tokens, in
   windows of the context): documents the run never saw, the same for every run.
4. N counts every parameter, the embedding included (as Chinchilla): it is tied to the lm head,
   whose matmul is 2 * vocab * hidden FLOPs per token, so 6ND is the compute with it counted.
5. Fit (approach 3): log L_hat = LSE(a - alpha log N, b - beta log D, e), A = e^a, B = e^b,
   E = e^e; minimise sum Huber_1e-3(log L_hat - log L) by L-BFGS from the best starts of the paper's
   grid of initialisations, keeping the best minimum.
6. With C = 6ND, the loss is least at N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6) / N_opt,
   G = (alpha A / (beta B))^(1/(alpha+beta)) (the paper's eq. 4); the script prints it at the
   compute of pretrain.py's default run, and the closest shape of the same family.
"""
import argparse
import dataclasses
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import Transformer, load_checkpoint  # noqa: E402
from pretrain import Args, load_tokens, model_config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# (hidden, layers): pretrain.py's shape family (4 heads, 4 key/value heads, MLP 3x hidden)
SIZES = [(32, 2), (48, 3), (64, 4), (96, 4), (128, 4), (160, 5)]
TOKENS = [500_000, 1_000_000, 2_000_000, 4_000_000]  # the default pretrain.txt holds ~2.9M
QUICK_SIZES, QUICK_TOKENS = [(32, 2), (48, 2), (64, 2)], [100_000, 200_000, 400_000]
HUBER_DELTA = 1e-3  # the paper's


# detail 5: log L_hat = LSE(a - alpha log N, b - beta log D, e); theta = (a, b, e, alpha, beta)
def log_predicted_loss(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor):
    a, b, e, alpha, beta = theta.unbind(-1)  # each (K,) or ()
    terms = torch.stack([a[..., None] - alpha[..., None] * log_n,
                         b[..., None] - beta[..., None] * log_d,
                         e[..., None].expand(*e.shape, len(log_n))])
    return torch.logsumexp(terms, 0)  # (K, runs) or (runs,)


# detail 5: sum_i Huber_delta(log L_hat_i - log L_i) / delta (the 1/delta keeps gradients ~1)
def huber_objective(theta, log_n, log_d, log_l, delta=HUBER_DELTA):
    residual = log_predicted_loss(theta, log_n, log_d) - log_l
    return F.huber_loss(residual, torch.zeros_like(residual), delta=delta,
                        reduction="none").sum(-1) / delta


def fit_scaling_law(params, tokens, losses, starts: int = 16) -> dict:
    """Fit L = E + A / N^alpha + B / D^beta to runs (N, D, L): approach 3 of Hoffmann et al."""
    log_n, log_d, log_l = (torch.tensor(np.log(np.asarray(x, dtype=np.float64)))
                           for x in (params, tokens, losses))
    # the paper's grid: a, b in {0, 5, .., 25}, e in {-1, -.5, .., 1}, alpha, beta in {0, .5, .., 2}
    grid = torch.tensor(list(itertools.product(range(0, 30, 5), range(0, 30, 5),
                                               np.arange(-1, 1.01, 0.5), np.arange(0, 2.01, 0.5),
                                               np.arange(0, 2.01, 0.5))), dtype=torch.float64)
    order = huber_objective(grid, log_n, log_d, log_l).argsort()
    best, best_value = None, float("inf")
    for start in grid[order[:starts]]:  # L-BFGS from the best points of the grid
        theta = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-10,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = huber_objective(theta, log_n, log_d, log_l)
            value.backward()
            return value
        optimizer.step(closure)
        value = huber_objective(theta.detach(), log_n, log_d, log_l).item()
        if np.isfinite(value) and value < best_value:
            best, best_value = theta.detach(), value
    if best is None:
        raise ValueError("the scaling-law fit found no finite minimum")
    a, b, e, alpha, beta = best.tolist()
    with np.errstate(over="ignore"):  # a degenerate fit's A or B can overflow: the caller checks
        E, A, B = (float(np.exp(x)) for x in (e, a, b))
    return {"E": E, "A": A, "B": B,
            "alpha": alpha, "beta": beta, "huber_loss": best_value * HUBER_DELTA}


def predicted_loss(fit: dict, params, tokens):
    """L(N, D) = E + A / N^alpha + B / D^beta (inf or nan where a degenerate fit overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
            return (fit["E"] + fit["A"] / np.asarray(params, dtype=np.float64) ** fit["alpha"]
                + fit["B"] / np.asarray(tokens, dtype=np.float64) ** fit["beta"])


# detail 6: N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))
def compute_optimal(fit: dict, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt): the split of C = 6ND with the least predicted loss."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    params = g * (flops / 6) ** (beta / (alpha + beta))
    return params, flops / 6 / params


def shape_params(hidden: int, layers: int, vocab_size: int) -> tuple[int, int, int]:
    """(all parameters, the embedding's, context) of pretrain.py's model at this shape: N counts
    all (detail 4)."""
    config = model_config(Args(hidden_size=hidden, num_layers=layers), vocab_size)
    model = Transformer(config)
    return (model.num_params(non_embedding=False), model.model.embed_tokens.weight.numel(),
            config.max_position_embeddings)


# detail 3: nats/token over the validation text, in windows of the model's context
@torch.no_grad()
def validation_loss(model, val_tokens: np.ndarray, batch_size: int = 32) -> float:
    context = model.config.max_position_embeddings
    usable = (len(val_tokens) - 1) // context * context
    stream = torch.from_numpy(val_tokens[: usable + 1].astype(np.int64))
    inputs, targets = stream[:-1].view(-1, context), stream[1:].view(-1, context)  # (W, T)
    loss_sum = 0.0
    for start in range(0, len(inputs), batch_size):
        logits, _ = model(inputs[start:start + batch_size])  # (B, T, V)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets[start:start + batch_size]
                                    .flatten(), reduction="sum").item()
    return loss_sum / targets.numel()


# detail 1: one run is pretrain.py itself, on one thread
def train_run(hidden, layers, steps, args, val_tokens, workdir) -> dict:
    defaults = Args()
    out = os.path.join(workdir, f"h{hidden}_l{layers}_s{steps}.pt")
    warmup = max(1, round(steps * defaults.warmup / defaults.steps))
    command = [sys.executable, os.path.join(workdir, "code", "pretrain.py"), "--data", args.data,
               "--tokenizer", args.tokenizer, "--out", out, "--hidden-size", str(hidden),
               "--num-layers", str(layers), "--steps", str(steps), "--warmup", str(warmup),
               "--eval-every", str(steps), "--eval-batches", "1", "--save-every", str(steps + 1),
               "--log-every", str(steps), "--seed", str(args.seed), "--device", "cpu"]
    start = time.time()
    with open(out + ".log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(process.pid, 0)  # the run's own CPU time, whatever else runs
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{open(out + '.log').read()[-2000:]}")
    seconds, cpu_seconds = time.time() - start, usage.ru_utime + usage.ru_stime
    model, _, checkpoint = load_checkpoint(out, device="cpu")
    run_args = checkpoint["args"]
    return {"hidden": hidden, "layers": layers, "steps": steps,
            "params": model.num_params(non_embedding=False),
            "embedding": model.model.embed_tokens.weight.numel(),
            "tokens": steps * run_args["batch_size"] * model.config.max_position_embeddings,
            "val_loss": validation_loss(model.eval(), val_tokens), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1)}


def nearest_shape(params: float, layers: int, vocab_size: int) -> tuple[int, int]:
    """The hidden size (a multiple of 8) at `layers` layers whose model is closest to `params`."""
    sizes = {hidden: shape_params(hidden, layers, vocab_size)[0] for hidden in range(16, 513, 8)}
    hidden = min(sizes, key=lambda h: abs(np.log(sizes[h] / params)))
    return hidden, sizes[hidden]


def allocation(fit: dict, default: dict, layers: int, tokens_per_step: int, vocab_size: int):
    """Print and return the compute-optimal split at the compute of pretrain.py's default run."""
    alpha, beta, flops = fit["alpha"], fit["beta"], default["flops"]
    default["predicted_loss"] = float(predicted_loss(fit, default["params"], default["tokens"]))
    best_params, best_tokens = compute_optimal(fit, flops)
    hidden, shape_n = nearest_shape(best_params, layers, vocab_size)
    optimal = {"params": best_params, "tokens": best_tokens,
               "tokens_per_param": best_tokens / best_params,
               "predicted_loss": float(predicted_loss(fit, best_params, best_tokens)),
               "hidden_size": hidden, "layers": layers, "shape_params": shape_n,
               "steps": round(flops / 6 / shape_n / tokens_per_step)}
    print(f"scaling | compute-optimal: N_opt ~ C^{beta / (alpha + beta):.3f}, "
          f"D_opt ~ C^{alpha / (alpha + beta):.3f}")
    print(f"scaling | pretrain.py's default: N {default['params'] / 1e6:.3f}M, D "
          f"{default['tokens'] / 1e6:.2f}M ({default['tokens'] / default['params']:.1f} "
          f"tokens/param), C = 6ND = {flops:.3g} FLOPs, fitted L {default['predicted_loss']:.4f}")
    print(f"scaling | optimum at that C: N {best_params / 1e6:.3f}M, D {best_tokens / 1e6:.2f}M "
          f"({optimal['tokens_per_param']:.1f} tokens/param), fitted L "
          f"{optimal['predicted_loss']:.4f}; closest shape: --hidden-size {hidden} "
          f"({shape_n / 1e6:.3f}M, {layers} layers) --steps {optimal['steps']}")
    return optimal


def plot(runs: list[dict], fit: dict, default: dict, path: str):
    """Left: val loss against tokens per model size, the fit as lines. Right: the fitted loss
    along three iso-FLOP lines, N_opt marked, and pretrain.py's default run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling | the plot needs matplotlib: pip install matplotlib")
        return
    figure, (by_tokens, iso) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted({r["params"] for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    tokens = np.geomspace(min(r["tokens"] for r in runs) / 1.5, max(r["tokens"] for r in runs) * 3)
    for params, color in zip(sizes, colors):
        points = sorted((r["tokens"], r["val_loss"]) for r in runs if r["params"] == params)
        by_tokens.plot(*zip(*points), "o", color=color, label=f"N = {params / 1e6:.3f}M")
        by_tokens.plot(tokens, predicted_loss(fit, params, tokens), "-", color=color, lw=1)
    by_tokens.set(xscale="log", xlabel="tokens D", ylabel="val loss (nats/token)",
                  title=f"L = {fit['E']:.2f} + {fit['A']:.3g} / N^{fit['alpha']:.2f}"
                        f" + {fit['B']:.3g} / D^{fit['beta']:.2f}")
    by_tokens.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    by_tokens.legend(fontsize=8)
    scales = (0.25, 1, 4)
    bests = [compute_optimal(fit, scale * default["flops"])[0] for scale in scales]
    params = np.geomspace(min(sizes[0], *bests) / 2, max(sizes[-1], *bests) * 4)
    for scale, best, style in zip(scales, bests, (":", "-", "--")):
        flops = scale * default["flops"]
        iso.plot(params, predicted_loss(fit, params, flops / 6 / params), style, color="C0",
                 label=f"C = {flops:.2g} FLOPs")
        iso.plot(best, predicted_loss(fit, best, flops / 6 / best), "o", color="C1")
    iso.set_ylim(0.97 * fit["E"], max(r["val_loss"] for r in runs))
    iso.plot(default["params"], default["predicted_loss"], "*", color="C3", markersize=12,
             label="pretrain.py's default")
    iso.set(xscale="log", xlabel="parameters N (C = 6ND)", ylabel="fitted loss (nats/token)",
            title="iso-FLOP lines, compute-optimal N (dots)")
    iso.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"scaling | wrote {path}")


def main(args):
    if args.workers < 1 or args.val_tokens < 1024:
        raise ValueError("--workers must be >= 1 and --val-tokens >= 1024")
    torch.set_num_threads(1)
    sizes, budgets = (QUICK_SIZES, QUICK_TOKENS) if args.quick else (SIZES, TOKENS)
    tokenizer = Tokenizer.load(args.tokenizer)
    val_path = os.path.join(os.path.dirname(args.data), "pretrain_val.txt")
    val_tokens = np.asarray(load_tokens(val_path, tokenizer)[: args.val_tokens + 1])
    load_tokens(args.data, tokenizer)  # written once here, not by every run at once
    defaults = Args()
    default_params, _, context = shape_params(0, 0, tokenizer.vocab_size)
    tokens_per_step = defaults.batch_size * context
    default_tokens = defaults.steps * tokens_per_step
    grid = []
    for (hidden, layers), budget in itertools.product(sizes, budgets):
        params = shape_params(hidden, layers, tokenizer.vocab_size)[0]
        steps = max(1, round(budget / tokens_per_step))
        if 6 * params * steps * tokens_per_step <= args.max_flops:  # detail 2
            grid.append((6 * params * steps, hidden, layers, steps))
    grid.sort(reverse=True)  # the longest runs first: the workers finish together
    print(f"scaling | {len(grid)} runs of pretrain.py, {args.workers} at a time, "
          f"{tokens_per_step} tokens per step, loss on {len(val_tokens) - 1} tokens of {val_path}")
    runs, start = [], time.time()
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.workers) as pool:
        os.makedirs(os.path.join(workdir, "code"))  # detail 1: the code as it is now
        for path in glob.glob(os.path.join(ROOT, "*.py")):
            shutil.copy(path, os.path.join(workdir, "code"))
        futures = [pool.submit(train_run, hidden, layers, steps, args, val_tokens, workdir)
                   for _, hidden, layers, steps in grid]
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            print(f"scaling | run {len(runs)}/{len(grid)} | N {run['params'] / 1e6:.3f}M "
                  f"(hidden {run['hidden']}, {run['layers']} layers) | D {run['tokens'] / 1e6:.2f}M"
                  f" | val loss {run['val_loss']:.4f} | {run['seconds']:.0f} s "
                  f"({run['cpu_seconds']:.0f} s CPU) | {time.time() - start:.0f} s elapsed",
                  flush=True)
    runs.sort(key=lambda r: (r["params"], r["tokens"]))
    cpu = sum(r["cpu_seconds"] for r in runs)
    print(f"scaling | {time.time() - start:.0f} s for the runs; their CPU time {cpu:.0f} s "
          f"(/ {args.workers} workers = {cpu / args.workers:.0f} s on a machine to itself)")

    fit = fit_scaling_law([r["params"] for r in runs], [r["tokens"] for r in runs],
                          [r["val_loss"] for r in runs])
    residuals = [np.log(predicted_loss(fit, r["params"], r["tokens"]) / r["val_loss"])
                 for r in runs]
    print(f"scaling | fit: L = {fit['E']:.4f} + {fit['A']:.4g} / N^{fit['alpha']:.4f} + "
          f"{fit['B']:.4g} / D^{fit['beta']:.4f} | rms log residual "
          f"{np.sqrt(np.mean(np.square(residuals))):.4f} over {len(runs)} runs")
    flops = 6 * default_params * default_tokens
    default, optimal = {"params": default_params, "tokens": default_tokens, "flops": flops}, None
    alpha, beta = fit["alpha"], fit["beta"]
    if np.isfinite([fit["A"], fit["B"]]).all() and 0 < alpha < 5 and 0 < beta < 5:
        layers = model_config(defaults, tokenizer.vocab_size).num_hidden_layers
        optimal = allocation(fit, default, layers, tokens_per_step, tokenizer.vocab_size)
    else:
        print("scaling | the fit is degenerate (an exponent outside (0, 5) or a coefficient out of "
              "range): runs this short do not follow a power law; no allocation, no plot")
    out = args.out or os.path.join(ROOT, "out/scaling_quick" if args.quick else "docs/scaling")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"command": " ".join(sys.argv), "torch": torch.__version__,
                   "cpus": os.cpu_count(), "vocab_size": tokenizer.vocab_size,
                   "pretrain_defaults": dataclasses.asdict(defaults), "runs": runs,
                   "fit": fit, "default": default, "optimal": optimal}, f, indent=1)
    print(f"scaling | wrote {out}.json")
    if optimal:
        plot(runs, fit, default, out + ".png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 3 x 3 grid of tiny runs")
    parser.add_argument("--data", default="data/pretrain.txt", help="pretrain.py's --data; "
                        "pretrain_val.txt next to it gives the loss")
    parser.add_argument("--tokenizer", default="out/tokenizer.json")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--max-flops", type=float, default=8e12,
                        help="skip the runs with 6ND above this")
    parser.add_argument("--val-tokens", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0, help="pretrain.py's --seed")
    parser.add_argument("--out", help="path prefix of the .json and .png (default docs/scaling, "
                        "or out/scaling_quick with --quick)")
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
