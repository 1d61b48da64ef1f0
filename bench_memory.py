"""
bench_memory.py: what gradient accumulation, gradient checkpointing, mixed precision, LoRA and the
optimizer each cost and save, measured on finetune.py's own training step.

    python bench_memory.py --model gpt2 --samples 64 --max_length 256 --out mem.md      # measured, any device
    python bench_memory.py --model llama2-7b --samples 200 --out mem.md                 # on a big GPU
    python bench_memory.py --model llama2-7b --samples 200 --estimate --gpu_memory_gb 40 --out est.md
    python bench_memory.py --init_from out-finetune/best_model --axes optimizer,rank --out mem.md
    python bench_memory.py --help

Every configuration runs in a fresh Python process, so that one run's peak cannot leak into the
next; the first configuration runs once more beforehand, discarded (the first process of a run
measured slower: cold file cache and clocks). A configuration that fails (out of memory, a bad
flag, a crash) is shown as × with its reason while the rest of the grid goes on. Per configuration
it measures:

  loaded      memory once the model (and LoRA) is in place, before the first step
  peak        the training high-water mark: CUDA max_memory_allocated() on a GPU; on a CPU the
              kernel's RSS high-water mark of the process (VmHWM; not ru_maxrss, which
              survives an exec and can report the parent's peak), minus the RSS of the empty
              process (torch imported) measured at its start. glibc is told to return every freed
              tensor to the kernel (MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors.
  parameters, gradients, optimizer state: the tensors' own sizes (numel x element size) of the
              weights, of the trainable weights' gradients, and of every tensor in optimizer.state
  activations = peak - loaded - gradients - optimizer state: what the forward pass keeps for
              backward (plus the loss's temporaries), measured by difference (clamped at 0)
  seconds     wall time of the training steps over the samples, the first step (one-time set-up)
              left out; tokens/s counts the non-padding tokens of the timed steps

The data are `--samples` Alpaca examples (--data_file) or, by default, synthetic token sequences with
Alpaca-like lengths (prompt 30-90 tokens, response 10-200, masked prompt), so that a random-weight
preset of any vocabulary runs offline. The effective batch is --batch_size sequences per optimizer
step whatever the accumulation: GA = 4 means micro-batches of batch_size / 4.

Output: markdown tables to stdout and --out (the GA x precision x LoRA (x checkpointing) grid, the
up/down table derived from the measurements, the optimizer table, the LoRA-rank table), one JSON
object per configuration to the .jsonl beside it, and a bar chart (.png). --estimate fills the same
tables from arithmetic alone (finetune.estimate_memory on a meta-device model): for models too big
for this machine, and labelled as estimates.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

import dpo
from bpe import atomic_write, load_tokenizer
from finetune import collate, estimate_memory, tokenize_examples, train_step
from lora import apply_lora, weight_dtype
from model import GPT, GPTConfig, autocast_and_scaler, bounded, make_optimizer, peak_memory_mb, run_main
from model import process_memory_mb as _rss_mb
from prepare_data import load_alpaca

BASE = dict(ga=1, mp="fp32", lora=0, gc=False, optimizer="adamw")
AXES = ("ga", "mp", "lora", "gc", "optimizer", "rank")
MB = 2 ** 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="GPTConfig preset with random weights (gpt2, gpt2-medium, "
                                                    "llama2-7b, tiny-gpt2, ...)")
    ap.add_argument("--overrides", default="", help="GPTConfig fields changed in the preset, e.g. "
                                                     "n_layer=4,n_embd=256,vocab_size=512")
    ap.add_argument("--init_from", default=None, help="load real weights instead (gpt2 name, HF or our dir)")
    ap.add_argument("--samples", type=bounded(int, 1), default=64, help="training examples per configuration")
    ap.add_argument("--batch_size", type=bounded(int, 1), default=4, help="sequences per optimizer step (effective batch)")
    ap.add_argument("--max_length", type=bounded(int, 1), default=256, help="longest sequence in tokens")
    ap.add_argument("--data_file", default=None, help="Alpaca .json/.jsonl (default: synthetic lengths)")
    ap.add_argument("--axes", default="ga,mp,lora,gc,optimizer,rank",
                    help="tables to produce: ga,mp,lora,gc form the grid; optimizer; rank")
    ap.add_argument("--ga", default="1,4", help="gradient accumulation values of the grid")
    ap.add_argument("--lora_rank", type=bounded(int, 1), default=16, help="LoRA rank of the grid (targets q,v)")
    ap.add_argument("--ranks", default="1,2,4,8,16", help="LoRA ranks of the rank table")
    ap.add_argument("--optimizers", default="adamw,adam,sgd_nesterov,sgd_momentum,sgd", help="optimizer table")
    ap.add_argument("--device", default="auto", help="cpu|cuda|auto")
    ap.add_argument("--threads", type=bounded(int, 1), default=2, help="torch CPU threads")
    ap.add_argument("--estimate", action="store_true", help="arithmetic only, nothing is run")
    ap.add_argument("--gpu_memory_gb", type=bounded(float, 0.0), default=0.0, help="--estimate: mark configs above this as x")
    ap.add_argument("--timeout", type=bounded(int, 1), default=3600, help="seconds before a configuration is given up")
    ap.add_argument("--out", default="bench_memory.md", help="markdown output; .jsonl and .png beside it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.axes = [a for a in args.axes.split(",") if a]
    bad = [a for a in args.axes if a not in AXES]
    if bad:
        ap.error(f"--axes: unknown {bad}; expected some of {','.join(AXES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def configs(args) -> dict[str, list[dict]]:
    """Which configurations each table needs (a configuration shared by tables runs once)."""
    half = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    out = {}
    grid_axes = [a for a in ("ga", "mp", "lora", "gc") if a in args.axes]
    if grid_axes:
        values = dict(ga=[int(g) for g in args.ga.split(",")] if "ga" in grid_axes else [1],
                      mp=half if "mp" in grid_axes else ["fp32"],
                      lora=[0, args.lora_rank] if "lora" in grid_axes else [0],
                      gc=[False, True] if "gc" in grid_axes else [False])
        out["grid"] = [dict(BASE, ga=g, mp=m, lora=r, gc=c) for g, m, r, c in
                       itertools.product(values["ga"], values["mp"], values["lora"], values["gc"])]
    if "optimizer" in args.axes:
        out["optimizer"] = [dict(BASE, optimizer=o) for o in args.optimizers.split(",")]
    if "rank" in args.axes:
        out["rank"] = [dict(BASE)] + [dict(BASE, lora=int(r)) for r in args.ranks.split(",")]
    return out


def key(c: dict) -> str:
    return (f"ga={c['ga']} {c['mp']} {'lora r=' + str(c['lora']) if c['lora'] else 'full'} "
            f"{'gc' if c['gc'] else 'no-gc'} {c['optimizer']}")


# -----------------------------------------------------------------------------------------------
# 1. One configuration, in a fresh process


def synthetic_examples(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Token ids with Alpaca-like lengths; the prompt part has labels -100 (finetune.py's format)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(30, 90), rng.randint(10, 200)
        ids = [rng.randrange(vocab) for _ in range(min(p + r, max_length + 1))]
        n_p = min(p, len(ids) - 1)
        out.append(dict(input_ids=ids[:-1], labels=[-100] * (n_p - 1) + ids[n_p:]))
    return out


def load_examples(args, model) -> list[dict]:
    if args.data_file is None:
        return synthetic_examples(args.samples, model.config.vocab_size, args.max_length)
    tok = load_tokenizer(None, args.init_from)
    return tokenize_examples(load_alpaca(args.data_file, n_samples=args.samples), tok, tok.eot_id, args.max_length)


def _peak_mb(device: str) -> float:
    return peak_memory_mb(device)


def model_config(args) -> GPTConfig:
    kw = dict(block_size=max(args.max_length, 64))
    for item in filter(None, args.overrides.split(",")):
        k, _, v = item.partition("=")
        kw[k.strip()] = float(v) if "." in v else int(v) if v.lstrip("-").isdigit() else v
    return GPTConfig.preset(args.model, **kw)


def run_config(c: dict, args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    # the empty process: python + torch with its thread pools and autograd engine started (a tiny
    # forward/backward first), so that "loaded" and "peak" are about the model and its training
    w = torch.nn.Linear(64, 64)
    w(torch.randn(8, 64)).sum().backward()
    base = 0.0 if cuda else _rss_mb()
    dtype = weight_dtype(c["mp"], c["lora"] > 0)
    if args.init_from:
        model = GPT.from_pretrained(args.init_from, dtype=dtype, device=dev)
    else:
        with torch.device(dev):
            model = GPT(model_config(args)).to(dtype)
    if c["lora"]:
        apply_lora(model, c["lora"], 2 * c["lora"], 0.0, "q,v")
    model.grad_checkpointing = c["gc"]
    model.train()
    examples = load_examples(args, model)
    autocast, scaler = autocast_and_scaler(c["mp"], "cuda" if cuda else "cpu")
    opt = make_optimizer(model, c["optimizer"], lr=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params_b = sum(p.numel() * p.element_size() for p in model.parameters())
    grads_b = sum(p.numel() * p.element_size() for p in trainable)  # a gradient has its weight's size
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / MB
    else:
        loaded = _rss_mb() - base
    if args.batch_size % c["ga"]:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by ga={c['ga']}")
    micro = args.batch_size // c["ga"]
    n_tokens, seconds = 0, 0.0
    steps = list(range(0, len(examples), args.batch_size))
    for i, s in enumerate(steps):
        step = examples[s: s + args.batch_size]
        batches = [collate(step[j: j + micro], 0, dev) for j in range(0, len(step), micro)]
        t0 = time.perf_counter()
        train_step(model, opt, batches, scaler, autocast, grad_clip=1.0)
        if cuda:
            torch.cuda.synchronize()
        if i > 0 or len(steps) == 1:  # the first step pays one-time kernel and allocator set-up
            seconds += time.perf_counter() - t0
            n_tokens += sum(len(e["input_ids"]) for e in step)
    opt_b = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)  # step counters (0-dim) are not state memory
    peak = _peak_mb(dev) - base
    acts = peak - loaded - (grads_b + opt_b) / MB
    return dict(config=c, key=key(c), status="ok", peak_mb=peak, loaded_mb=loaded, params_mb=params_b / MB,
                # the peak without the process's own growth at load beyond the weights (comparable to estimates)
                tensor_peak_mb=peak - max(0.0, loaded - params_b / MB),
                grads_mb=grads_b / MB, optimizer_mb=opt_b / MB, activations_mb=max(0.0, acts),
                seconds=seconds, tokens_per_s=n_tokens / seconds, trainable=sum(p.numel() for p in trainable),
                method="CUDA max_memory_allocated" if cuda else "RSS high-water mark (VmHWM) above the empty process")


def run_in_subprocess(c: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(c)] + [
        f"--{k}={getattr(args, k)}" for k in ("model", "overrides", "samples", "batch_size", "max_length", "device",
                                              "threads")]
    cmd += [f"--init_from={args.init_from}"] if args.init_from else []
    cmd += [f"--data_file={args.data_file}"] if args.data_file else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors leave RSS at once
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(config=c, key=key(c), status="failed", reason=f"timeout after {args.timeout} s",
                    peak_mb=None, seconds=None)
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
    if p.returncode < 0:
        err = f"killed by signal {-p.returncode} (out of memory?)"
    elif "OutOfMemoryError" in p.stderr or "MemoryError" in p.stderr:
        err = "out of memory: " + err
    return dict(config=c, key=key(c), status="failed", reason=err[:300], peak_mb=None, seconds=None)


# -----------------------------------------------------------------------------------------------
# 2. Estimates: the same numbers from arithmetic


def longest_micro_batch(args, ga: int, vocab: int) -> int:
    """Tokens of the largest padded micro-batch of the synthetic samples (what the activations of a
    measured run peak at), or batch x max_length with --data_file (not tokenized here)."""
    micro = max(1, args.batch_size // ga)
    if args.data_file:
        return micro * args.max_length
    lens = [len(e["input_ids"]) for e in synthetic_examples(args.samples, vocab, args.max_length)]
    return max(len(lens[i: i + micro]) * max(lens[i: i + micro]) for i in range(0, len(lens), micro))


def estimate_config(c: dict, args) -> dict:
    with torch.device("meta"):
        model = GPT(model_config(args)).to(weight_dtype(c["mp"], c["lora"] > 0))
        if c["lora"]:
            apply_lora(model, c["lora"], 2 * c["lora"], 0.0, "q,v")
    micro_tokens = longest_micro_batch(args, c["ga"], model.config.vocab_size)
    e = estimate_memory(model, c["mp"], c["optimizer"], c["gc"], micro_tokens)
    n = sum(p.numel() for p in model.parameters())
    # forward 2 FLOPs per weight and token; backward 2 more for input gradients and, for trainable
    # weights, 2 more for weight gradients; checkpointing repeats the forward
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = sum(len(e["input_ids"]) for e in synthetic_examples(args.samples, model.config.vocab_size,
                                                                  args.max_length))
    flops = (2 * n + 2 * n + 2 * trainable + (2 * n if c["gc"] else 0)) * tokens
    peak = (e["weights"] + e["gradients"] + e["optimizer"] + e["activations"]) / MB
    r = dict(config=c, key=key(c), status="estimate", peak_mb=peak, loaded_mb=e["weights"] / MB,
             params_mb=e["weights"] / MB, grads_mb=e["gradients"] / MB, optimizer_mb=e["optimizer"] / MB,
             activations_mb=e["activations"] / MB, seconds=None, tflop=flops / 1e12, trainable=trainable,
             method="estimate (arithmetic)")
    if args.gpu_memory_gb and peak * MB > args.gpu_memory_gb * 2 ** 30:
        r.update(status="failed", reason=f"estimated {peak / 1024:.1f} GiB > {args.gpu_memory_gb:g} GB")
    return r


# -----------------------------------------------------------------------------------------------
# 3. Tables


def _f(x, fmt="{:.0f}"):
    return "–" if x is None else fmt.format(x)


def _cell(r, what):
    if r["status"] == "failed":
        return f"× ({r['reason']})" if what == "peak_mb" else "×"
    if what == "seconds" and r.get("seconds") is None:
        return f"~{r['tflop']:.1f} TFLOP"
    return _f(r[what], "{:.1f}" if what == "seconds" else "{:.0f}")


def direction(new: float, old: float, tol: float = 0.05, floor: float = 0.0) -> str:
    """↑ / ↓ beyond ±tol relative (and beyond `floor` absolute), else –."""
    if abs(new - old) <= max(tol * abs(old), floor):
        return "–"
    return "↑" if new > old else "↓"


def tables(results: dict, tabs: dict, args) -> str:
    est = args.estimate
    head = "ESTIMATES (arithmetic, nothing measured)" if est else f"measured on {args.device}"
    method = next((r["method"] for r in results.values() if r["status"] != "failed"), "")
    md = [f"# Memory and time of the efficiency techniques: {args.init_from or args.model}, {args.samples} samples, "
          f"batch {args.batch_size}, max_length {args.max_length} ({head})\n",
          f"Peak: {method}. Breakdown: parameters, gradients and optimizer state from the tensors' sizes; "
          f"activations = peak − loaded − gradients − optimizer state.\n"]
    cols = "| peak MB | loaded MB | params MB | grads MB | optimizer MB | activations MB | " + (
        "compute |" if est else "seconds | tokens/s |")

    def row(r):
        if r["status"] == "failed" and r.get("params_mb") is not None:  # an estimate that does not fit
            return f"× {r['peak_mb']:.0f} ({r['reason']}) | " + " | ".join(
                _f(r[k]) for k in ("loaded_mb", "params_mb", "grads_mb", "optimizer_mb", "activations_mb")) + (
                f" | ~{r['tflop']:.1f} TFLOP |")
        if r["status"] == "failed":
            return f"× ({r['reason']}) |" + " × |" * (6 if est else 7)
        vals = [_cell(r, k) for k in ("peak_mb", "loaded_mb", "params_mb", "grads_mb", "optimizer_mb",
                                      "activations_mb", "seconds")]
        if not est:
            vals.append(_f(r["tokens_per_s"]))
        return " | ".join(vals) + " |"

    if "grid" in tabs:
        md += ["## Gradient accumulation × precision × LoRA (× gradient checkpointing)\n",
               "| GA | precision | LoRA | checkpointing " + cols, "|" + " --- |" * (11 if est else 12)]
        for c in tabs["grid"]:
            r = results[key(c)]
            md.append(f"| {c['ga']} | {c['mp']} | {c['lora'] or 'full'} | {'on' if c['gc'] else 'off'} | " + row(r))
        md += ["", "## What each technique does (derived from the rows above: ↑/↓ = more/less than "
                   "without it by over 5% (and 1 MB), – = within)\n",
               "| technique (vs fp32, full, GA 1, no checkpointing) | parameters | activations | gradients | "
               "optimizer state | compute time |", "| --- | --- | --- | --- | --- | --- |"]
        base = results.get(key(BASE))
        changes = [("gradient accumulation", dict(ga=max(c["ga"] for c in tabs["grid"]))),
                   ("mixed precision (bf16)", dict(mp="bf16")), ("LoRA", dict(lora=args.lora_rank)),
                   ("gradient checkpointing", dict(gc=True))]
        for name, ch in changes:
            r = results.get(key(dict(BASE, **ch)))
            if not base or not r or base.get("params_mb") is None or r.get("params_mb") is None or r == base:
                continue
            t_new = r["seconds"] if r["seconds"] is not None else r["tflop"]
            t_old = base["seconds"] if base["seconds"] is not None else base["tflop"]
            md.append(f"| {name} | " + " | ".join(direction(r[k], base[k], floor=1.0) for k in (
                "params_mb", "activations_mb", "grads_mb", "optimizer_mb")) + f" | {direction(t_new, t_old)} |")
    if "optimizer" in tabs:
        md += ["", "## Optimizers (fp32, full fine-tuning)\n", "| optimizer " + cols,
               "|" + " --- |" * (8 if est else 9)]
        md += [f"| {c['optimizer']} | " + row(results[key(c)]) for c in tabs["optimizer"]]
    if "rank" in tabs:
        md += ["", "## LoRA rank vs full fine-tuning (fp32, targets q,v)\n", "| LoRA rank | trainable params " + cols,
               "|" + " --- |" * (9 if est else 10)]
        for c in tabs["rank"]:
            r = results[key(c)]
            md.append(f"| {c['lora'] or 'full'} | {r.get('trainable', 0):,} | " + row(r))
    return "\n".join(md) + "\n"


def bar_chart(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results.values() if r["status"] != "failed"]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rs)), 5))
    bottom = [0.0] * len(rs)
    for part in ("params_mb", "grads_mb", "optimizer_mb", "activations_mb"):
        vals = [r[part] for r in rs]
        ax.bar(range(len(rs)), vals, bottom=bottom, label=part.replace("_mb", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rs)), [r["key"] for r in rs], rotation=75, fontsize=7)
    ax.set_ylabel("MB")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# 4. DPO: the memory of the three reference modes (dpo.py --reference copy | adapter_off | precomputed)


def _dpo_child(mode: str, args) -> dict:
    """GPT-2-small-shaped LoRA policy (random weights), the reference set up the given way, two
    training steps. 'weights + reference' = RSS after the reference exists minus RSS before the
    model was built; for precomputed it includes the cached log-probs (and the pass computing them)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = _rss_mb()
    cfg = dpo.DPOConfig(reference=mode, lora_rank=16, lora_alpha=32, beta=0.1)
    policy = GPT(GPTConfig.preset("gpt2", vocab_pad_multiple=1, block_size=args.seq_len))
    apply_lora(policy, 16, 32, 0.0, "q,v")
    g = torch.Generator().manual_seed(1)
    data = [{"prompt": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist(),
             "chosen": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist(),
             "rejected": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist()} for _ in range(8)]
    keys = [dpo.pair_key(t) for t in data]
    ref = dpo.Reference(mode, policy)
    if mode == "precomputed":
        dpo.precompute_reference(ref, data, keys, 0, "cpu", args.batch_size, None, "bench")
    ref_mb = _rss_mb() - base
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()
    for s in range(2):
        b = data[s * args.batch_size: (s + 1) * args.batch_size]
        idx, labels = dpo.collate_pairs(b, 0)
        dpo.dpo_step(policy, ref, [(idx, labels, keys[s * args.batch_size: (s + 1) * args.batch_size])], cfg,
                 contextlib.nullcontext, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _rss_mb("VmHWM")
    return dict(mode=mode, weights_plus_reference_mb=ref_mb, peak_mb=peak - base)


def dpo_estimate(gpus=(16, 40)) -> str:
    """Paper arithmetic, bf16 weights, LoRA r=16 on q,v (fp32 adapters + AdamW), or full fine-tuning
    (fp32 master weights + grads + AdamW's two moments). Activations are not included: with
    gradient checkpointing and a micro-batch of one pair they are small next to these."""
    rows = ["| model | policy | reference | weights + reference | + gradients & optimizer | " +
            " | ".join(f"fits {g} GB" for g in gpus) + " |", "|" + " --- |" * (5 + len(gpus))]
    for preset in ("gpt2-medium", "llama2-7b"):
        with torch.device("meta"):
            m = GPT(GPTConfig.preset(preset))
        n = sum(p.numel() for p in m.parameters())
        with torch.device("meta"):
            apply_lora(m, 16, 32, 0.0, "q,v")
        n_lora = sum(p.numel() for p in m.parameters() if p.requires_grad)
        for policy, wbytes, train_bytes in (("LoRA r=16", 2 * n, 16 * n_lora), ("full", 4 * n, 12 * n)):
            for mode in ("copy", "adapter_off", "precomputed"):
                if mode == "adapter_off" and policy == "full":
                    continue
                ref = 2 * n if mode == "copy" else 0  # bf16 frozen copy
                total = (wbytes + ref + train_bytes) / 1e9
                fits = " | ".join("yes" if total < g else "no" for g in gpus)  # before activations
                rows.append(f"| {preset} ({n / 1e9:.2f}B) | {policy} | {mode} | {(wbytes + ref) / 1e9:.1f} GB | "
                            f"{total:.1f} GB | {fits} |")
    return "\n".join(rows)


def cmd_dpo(argv):
    import statistics

    ap = argparse.ArgumentParser(prog="bench_memory.py dpo", description="peak memory of --reference copy | "
                                 "adapter_off | precomputed, each in a fresh process (CPU), or --estimate",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--estimate", action="store_true", help="print the paper arithmetic for 16/40 GB GPUs")
    ap.add_argument("--seq_len", type=bounded(int, 1), default=256, help="tokens per sequence (prompt + response)")
    ap.add_argument("--batch_size", type=bounded(int, 1), default=2, help="pairs per step")
    ap.add_argument("--repeats", type=bounded(int, 1), default=2, help="runs per mode, interleaved")
    ap.add_argument("--threads", type=bounded(int, 1), default=2, help="torch CPU threads")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.estimate:
        print("ESTIMATE (arithmetic, not measured): bf16 weights, fp32 trainable tensors with AdamW\n")
        print(dpo_estimate())
        return
    if args.child:
        print(json.dumps(_dpo_child(args.child, args)))
        return
    res = {m: [] for m in ("copy", "adapter_off", "precomputed")}
    for rep in range(args.repeats):
        for mode in res:
            cmd = [sys.executable, __file__, "dpo", "--child", mode, f"--seq_len={args.seq_len}",
                   f"--batch_size={args.batch_size}", f"--threads={args.threads}"]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors leave RSS at once
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                           .stdout.strip().splitlines()[-1])
            res[mode].append(r)
            print(f"rep {rep} {mode:12s}: weights + reference {r['weights_plus_reference_mb']:.0f} MB, "
                  f"training peak {r['peak_mb']:.0f} MB (RSS above the empty process)", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("weights_plus_reference_mb", "peak_mb")}
           for m, rs in res.items()}
    for m, v in med.items():
        print(f"{m:12s} weights + reference {v['weights_plus_reference_mb']:6.0f} MB "
              f"({v['weights_plus_reference_mb'] / med['copy']['weights_plus_reference_mb']:.2f}x copy), "
              f"training peak {v['peak_mb']:6.0f} MB ({v['peak_mb'] / med['copy']['peak_mb']:.2f}x copy)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dpo"]:
        return cmd_dpo(argv[1:])
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_config(json.loads(args.child), args)))
        return
    tabs = configs(args)
    unique = {key(c): c for cs in tabs.values() for c in cs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    results = {}
    if not args.estimate:  # measured, not kept: the first process of a run pays one-time costs (cold
        run_in_subprocess(next(iter(unique.values())), args)  # file cache, clocks) the others do not
    with open(jsonl, "w") as f:
        for i, (k, c) in enumerate(unique.items()):
            r = estimate_config(c, args) if args.estimate else run_in_subprocess(c, args)
            results[k] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"[{i + 1}/{len(unique)}] {k}: " + (f"× {r['reason']}" if r["status"] == "failed" else
                  f"peak {r['peak_mb']:.0f} MB" + (f", {r['seconds']:.1f} s" if r["seconds"] else "")), flush=True)
    md = tables(results, tabs, args)
    atomic_write(out, lambda p: Path(p).write_text(md))
    bar_chart(results, out.with_suffix(".png"))
    print("\n" + md)
    print(f"written: {out}, {jsonl}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    run_main(main)
