"""
bench_memory.py: what gradient accumulation, gradient checkpointing, mixed precision, LoRA, a 4-bit
base (QLoRA) and the optimizer each cost and save, measured exactly on finetune.py's training step
(written out here, training_step); and the same on paper (--estimate) for models too big for this machine.

    python bench_memory.py                           # a quick grid on a small model: minutes on a CPU
    python bench_memory.py --full                    # GPT-2 small (124M): the whole grid, all tables
    python bench_memory.py --model llama-135m --axes lora --check_estimate    # estimate vs exact
    python bench_memory.py --model llama2-7b --estimate --gpu_memory_gb 40   # on paper, with FSDP per GPU
    python bench_memory.py --model llama2-7b --estimate --axes quant --gc_only --batch_size 4 --max_examples 4 \
        --max_length 512 --full_length                # QLoRA: LLaMA-2-7B in under 10 GB
    (--model llama3.1-8b, qwen2.5-7b, mistral-7b, qwen3-8b, ...: today's families, by the shapes of their
    config.json; model.PRESETS lists them)
    python bench_memory.py dpo                       # dpo.py's three reference modes (dpo --estimate: 7B)
    python bench_memory.py --help

What it measures. Every configuration runs in a fresh process, --repeats times, the configurations
interleaved (A B C A B C ...) so that a change in machine load hits all alike; times are medians, and
a time arrow is shown only when two medians differ by more than the spread (max - min) of either.
In each process one training step (after a warm-up step, so that the optimizer state exists) runs
under a MemoryTracker, which follows every tensor storage the step creates or frees:
  parameters   the model's weights (and buffers: RoPE tables, 4-bit NF4 codes), tied ones counted once
  gradients    the storages that are some parameter's .grad
  optimizer    every tensor in optimizer.state (AdamW: two moments, and a step counter per tensor)
  activations  what autograd holds for backward right now (saved by an op of the step)
  temporaries  everything else alive: inputs, logits not saved, the intermediate results of backward
Each column is that category's peak during the step; "peak" is the peak of their sum. These are live
tensor bytes, exact and the same on every run, on a CPU and a GPU alike. Beside them, "process peak":
on a GPU max_memory_allocated, on a CPU the process's resident-set high-water mark (VmHWM) above the
empty process; the allocator's caching, the interpreter and the libraries make it larger and noisier.

The table of what each technique does comes from the exact columns only: ↑/↓ when a column moves by
more than 5% and 0.5 MB against the baseline (fp32, full fine-tuning, no accumulation or checkpointing).

--estimate fills the same tables from finetune.estimate_memory (arithmetic on a meta-device model:
nothing runs), with a column for FSDP over --fsdp_gpus GPUs; --check_estimate measures and estimates
each configuration and prints both. Outputs go to out/bench/ (--out_dir): markdown tables, one JSON
object per configuration (.jsonl: config, key, status, peak_mb, params_mb, grads_mb, optimizer_mb,
activations_mb, temporaries_mb, process_peak_mb, seconds, seconds_spread, tokens_per_s, trainable)
and a bar chart (.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

import dpo
from bpe import load_tokenizer
from finetune import collate, estimate_memory, tokenize_examples
from housekeeping import (ArgumentParser, DefaultsHelp, atomic_write, autocast_and_scaler, bounded, peak_memory_mb,
                          run_main, write_jsonl)
from housekeeping import process_memory_mb as _rss_mb
from lora import NF4Linear, apply_lora, quantize_nf4, weight_dtype
from model import GPT, GPTConfig, make_optimizer
from prepare_data import load_alpaca

BASE = dict(ga=1, mp="fp32", lora=0, gc=False, optimizer="adamw", quant="none")
AXES = ("ga", "mp", "lora", "gc", "optimizer", "rank", "quant")
MB = 2 ** 20
# the two grids' defaults: the quick one (minutes on a CPU) and --full (GPT-2 small, an hour and more)
QUICK = dict(model="tiny-gpt2", overrides="n_layer=2,n_embd=128,vocab_size=2048", max_examples=16, batch_size=8,
             max_length=128, axes="ga,mp,lora,gc")
FULL = dict(model="gpt2", overrides="", max_examples=16, batch_size=4, max_length=256,
            axes="ga,mp,lora,gc,optimizer,rank")
OUT_NAME = "bench_memory.md"  # in --out_dir, with bench_memory.jsonl and bench_memory.png beside it

# -----------------------------------------------------------------------------------------------
# 1. Exact accounting of live tensor bytes


CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "activations", "temporaries")


def _storage(t):
    """The untyped storage holding a real dense tensor's bytes, or None (not a tensor, meta, sparse).
    A DTensor (FSDP's sharded parameter) counts its local shard: the bytes this rank holds."""
    if isinstance(t, DTensor):
        t = t.to_local()
    if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta:
        return t.untyped_storage()
    return None


class _Saved:
    """What autograd keeps for one saved tensor while our hooks are active: the tensor itself."""
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor):
        self.tensor = tensor


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes by category, exact, while the `with` block runs:

        with MemoryTracker(model, optimizer) as mt:
            loss = model(x, y)[1]
            loss.backward()
            optimizer.step()
        print(mt.report())        # or mt.peaks / mt.at_total_peak: bytes per category

    How: as a TorchDispatchMode it sees every aten op with its outputs, and records each new storage
    (views share one) with a weakref finalizer that drops it when freed. Saved-tensor hooks count how
    many autograd slots hold each storage: those bytes are activations. After every op the live
    storages are summed by role (parameter, buffer, .grad, optimizer state, saved, else temporary)
    and each category's peak kept."""

    def __init__(self, model, optimizer=None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.live = {}   # id(storage) -> [nbytes, its finalizer], for every tracked live storage
        self.saved = Counter()  # id(storage) -> number of autograd saved slots holding it now
        self.lock = threading.RLock()  # CUDA runs backward on another thread; frees come from both
        zero = dict.fromkeys(CATEGORIES + ("total",), 0)
        self.peaks, self.at_total_peak, self.at_end = dict(zero), dict(zero), dict(zero)
        self.peak_where = None  # the aten op (or event) right after which the total peaked
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # --- storages come and go ---------------------------------------------------------------------
    def _track(self, t):
        """Record t's storage (once; views share it) and return its key, None if it has no storage."""
        st = _storage(t)
        if st is None:
            return None
        key = id(st)  # stable while the storage lives; the finalizer drops the key before it dies
        with self.lock:
            if key in self.live:
                self.live[key][0] = st.nbytes()  # resize_ changes a storage's size in place
            else:
                self.live[key] = [st.nbytes(), weakref.finalize(st, self._free, key)]
        return key

    def _free(self, key):
        with self.lock:
            self.live.pop(key, None)

    def _pack(self, t):  # autograd saves t for backward
        key, box = self._track(t), _Saved(t)
        if key is not None:
            with self.lock:
                self.saved[key] += 1
            weakref.finalize(box, self._unsave, key)  # runs when backward (or gc) frees the slot
        self._sample("saved for backward")
        return box

    @staticmethod
    def _unpack(box):  # backward asks for the saved tensor
        return box.tensor

    def _unsave(self, key):
        with self.lock:
            self.saved[key] -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_iter(out):
            self._track(t)
        self._sample(func)  # inputs and outputs are both alive here: the moment memory peaks
        return out

    # --- classify and keep the peaks --------------------------------------------------------------
    def _classify(self):
        roles = dict(self._model_roles)  # id(storage) -> category; parameters and buffers first
        owned = [("gradients", p.grad) for p in self._params if p.grad is not None]
        if self.optimizer is not None:
            owned += [("optimizer", v) for state in self.optimizer.state.values()
                      for v in state.values() if isinstance(v, torch.Tensor)]
        for cat, t in owned:
            st = _storage(t)
            if st is not None:
                if id(st) not in self.live:
                    self._track(t)  # made before the block, or by no op we saw
                roles.setdefault(id(st), cat)
        now = dict.fromkeys(CATEGORIES, 0)
        with self.lock:
            for key, (nbytes, _) in list(self.live.items()):
                now[roles.get(key) or ("activations" if self.saved[key] > 0 else "temporaries")] += nbytes
        now["total"] = sum(now.values())
        return now

    def _sample(self, where):
        now = self._classify()
        with self.lock:
            if now["total"] > self.at_total_peak["total"]:
                self.at_total_peak, self.peak_where = now, str(where)
            for cat, nbytes in now.items():
                self.peaks[cat] = max(self.peaks[cat], nbytes)
        return now

    @property
    def current(self):
        """Bytes of each category now (only meaningful inside the `with` block)."""
        return self._classify()

    # --- context manager --------------------------------------------------------------------------
    def __enter__(self):
        self._params = list(self.model.parameters())
        self._model_roles = {}  # the weights stay put during a step: classify them once
        for cat, tensors in (("parameters", self._params), ("buffers", self.model.buffers())):
            for t in tensors:
                key = self._track(t)
                if key is not None:
                    self._model_roles.setdefault(key, cat)
        super().__enter__()
        self._hooks.__enter__()
        self._sample("start")  # snapshot: weights, grads and optimizer state made before the block
        return self

    def __exit__(self, *exc):
        self.at_end = self._sample("end")
        self._hooks.__exit__(*exc)
        super().__exit__(*exc)
        with self.lock:  # stop watching: no callbacks into this tracker once it is done
            for _, fin in self.live.values():
                fin.detach()
            self.live.clear()

    def report(self, unit=2 ** 20, name="MiB"):
        """A small text table: peak of each category, and each category at the total's peak."""
        rows = [f"{'category':<12} {'peak':>10} {'at total peak':>14}  ({name})"]
        for cat in CATEGORIES + ("total",):
            rows.append(f"{cat:<12} {self.peaks[cat] / unit:>10.3f} {self.at_total_peak[cat] / unit:>14.3f}")
        return "\n".join(rows + [f"total peaked right after: {self.peak_where}"])


def _grid_defaults(name: str) -> str:
    """The help's note on a flag whose default depends on the grid."""
    return f"(default {QUICK[name]}; --full: {FULL[name]})"


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=DefaultsHelp,
                        epilog="bench_memory.py dpo [...]: peak memory of dpo.py's reference modes "
                               "(see bench_memory.py dpo --help)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=False,
                    help="the GPT-2-small grid of every table (an hour and more on a CPU) instead of the quick one")
    ap.add_argument("--model", default=None, help=f"GPTConfig preset with random weights (default {QUICK['model']}, "
                                                  f"--full: {FULL['model']})")
    ap.add_argument("--overrides", default=None, help=f"GPTConfig fields changed in the preset (default "
                                                      f"{QUICK['overrides']} with the default model, else none)")
    ap.add_argument("--init_from", default=None, help="load real weights instead (gpt2 name, HF or our dir)")
    ap.add_argument("--max_examples", "--samples", type=bounded(int, 1), default=None,
                    help="training examples per configuration " + _grid_defaults("max_examples"))
    ap.add_argument("--batch_size", type=bounded(int, 1), default=None,
                    help="sequences per optimizer step " + _grid_defaults("batch_size"))
    ap.add_argument("--max_length", type=bounded(int, 1), default=None,
                    help="longest sequence in tokens " + _grid_defaults("max_length"))
    ap.add_argument("--data_file", default=None, help="Alpaca .json/.jsonl (default: synthetic Alpaca-like lengths)")
    ap.add_argument("--full_length", action=argparse.BooleanOptionalAction, default=False,
                    help="synthetic sequences all --max_length tokens long (the worst case; else 40 to 290 "
                         "tokens, as Alpaca's)")
    ap.add_argument("--axes", default=None, help="tables: ga,mp,lora,gc form the grid; optimizer; rank; quant "
                                                 "(LoRA on a bf16 against a 4-bit NF4 base) (default ga,mp,lora,gc; "
                                                 "--full: ga,mp,lora,gc,optimizer,rank)")
    ap.add_argument("--ga", default="1,4", help="gradient accumulation values of the grid")
    ap.add_argument("--lora_rank", type=bounded(int, 1), default=16, help="LoRA rank of the grid (targets q,v)")
    ap.add_argument("--ranks", default="1,2,4,8,16", help="LoRA ranks of the rank table")
    ap.add_argument("--optimizers", default="adamw,adam,sgd_nesterov,sgd_momentum,sgd", help="optimizer table")
    ap.add_argument("--gc_only", action=argparse.BooleanOptionalAction, default=False,
                    help="quant table: with gradient checkpointing")
    ap.add_argument("--repeats", type=bounded(int, 1), default=3, help="runs of each configuration, interleaved")
    ap.add_argument("--device", default="auto", help="cpu|cuda|auto")
    ap.add_argument("--threads", type=bounded(int, 1), default=2, help="torch CPU threads")
    ap.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=False,
                    help="arithmetic only, nothing is run")
    ap.add_argument("--check_estimate", action=argparse.BooleanOptionalAction, default=False,
                    help="measure, and print each estimate beside it")
    ap.add_argument("--gpu_memory_gb", type=bounded(float, 0.0), default=0.0,
                    help="--estimate: mark configurations above this as x")
    ap.add_argument("--fsdp_gpus", type=bounded(int, 1), default=8, help="--estimate: the FSDP column's GPU count")
    ap.add_argument("--timeout", type=bounded(int, 1), default=3600, help="seconds before a configuration is given up")
    ap.add_argument("--out_dir", "--out", default="out/bench",
                    help=f"folder of the outputs: {OUT_NAME}, its .jsonl and .png (a path ending in .md names the "
                         f"markdown file itself, the others beside it, as the former --out did)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is not None and args.overrides is None:
        args.overrides = ""  # the quick grid's overrides shrink only its own model
    for k, v in (FULL if args.full else QUICK).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.axes = [a for a in args.axes.split(",") if a]
    bad = [a for a in args.axes if a not in AXES]
    if bad:
        ap.error(f"--axes: unknown {bad}; expected some of {','.join(AXES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def configs(args) -> dict[str, list[dict]]:
    """Which configurations each table needs (a configuration shared by tables runs once)."""
    out = {}
    grid_axes = [a for a in ("ga", "mp", "lora", "gc") if a in args.axes]
    if grid_axes:  # fp16 (with loss scaling) where the device runs it in hardware
        half = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
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
    if "quant" in args.axes:  # QLoRA against LoRA on a bf16 base (bf16 compute; slow on CPUs without bf16 units)
        out["quant"] = [dict(BASE, mp="bf16", lora=args.lora_rank, gc=args.gc_only, quant=q) for q in ("none", "nf4")]
    return out


def key(c: dict) -> str:
    return (f"ga={c['ga']} {c['mp']} {'lora r=' + str(c['lora']) if c['lora'] else 'full'}"
            f"{' nf4' if c.get('quant') == 'nf4' else ''} {'gc' if c['gc'] else 'no-gc'} {c['optimizer']}")


# -----------------------------------------------------------------------------------------------
# 2. One configuration, in a fresh process


def synthetic_examples(n: int, vocab: int, max_length: int, full_length: bool = False, seed: int = 0) -> list[dict]:
    """Token ids with Alpaca-like lengths (or all max_length); the prompt part has labels -100 (finetune.py's
    format)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(30, 90), rng.randint(10, 200)
        if full_length:
            p, r = min(p, max_length // 2), max_length
        ids = [rng.randrange(vocab) for _ in range(min(p + r, max_length + 1))]
        n_p = min(p, len(ids) - 1)
        out.append(dict(input_ids=ids[:-1], labels=[-100] * (n_p - 1) + ids[n_p:]))
    return out


def load_examples(args, model) -> list[dict]:
    if args.data_file is None:
        return synthetic_examples(args.max_examples, model.config.vocab_size, args.max_length, args.full_length)
    tok = load_tokenizer(None, args.init_from)
    examples = load_alpaca(args.data_file, max_examples=args.max_examples)
    return tokenize_examples(examples, tok, tok.eot_id, args.max_length)


def model_config(args) -> GPTConfig:
    kw = dict(block_size=max(args.max_length, 64))
    for item in filter(None, args.overrides.split(",")):
        k, _, v = item.partition("=")
        if k.strip() not in GPTConfig.__dataclass_fields__:
            raise ValueError(f"--overrides {item}: {k.strip()!r} is not a GPTConfig field")
        if "." in v:  # a number with a point is a float, one without an int, anything else a string
            kw[k.strip()] = float(v)
        elif v.lstrip("-").isdigit():
            kw[k.strip()] = int(v)
        else:
            kw[k.strip()] = v
    return GPTConfig.preset(args.model, **kw)


def build(c: dict, args, device):
    """The model of a configuration: its weights (random, or --init_from), a 4-bit base, LoRA."""
    dtype = weight_dtype(c["mp"], c["lora"] > 0)
    if args.init_from:
        model = GPT.from_pretrained(args.init_from, dtype=dtype, device=device)
    else:
        with torch.device(device):
            model = GPT(model_config(args)).to(dtype)
    if c.get("quant") == "nf4":
        quantize_nf4(model)
    if c["lora"]:
        apply_lora(model, c["lora"], 2 * c["lora"], 0.0, "q,v")
    model.grad_checkpointing = c["gc"]
    return model.train()


def micro_batches(examples: list[dict], micro: int, device) -> list:
    """One optimizer step's examples as its micro-batches [(idx, targets), ...] of `micro` examples each."""
    return [collate(examples[j: j + micro], 0, device) for j in range(0, len(examples), micro)]


def training_step(model, optimizer, micro, scaler, autocast, grad_clip: float = 1.0) -> torch.Tensor:
    """One optimizer step of finetune.py's loop, written out here as every loop writes its own: the step
    whose memory and time the tables report (the same tensors, in the same order, on one process).
    Returns the step's mean loss, on the device (not read: reading it would wait for the device)."""
    # the accumulated batch's loss is the mean over ALL its trained tokens (labels != -100): each
    # micro-batch's mean is weighted by its share n_i / N of them (finetune.py explains why)
    counts = [(targets != -100).sum() for _, targets in micro]
    n_total = torch.stack(counts).sum()
    total = torch.zeros((), device=n_total.device)  # the step's mean loss, summed over the micro-batches
    for (idx, targets), n in zip(micro, counts):
        # forward under autocast (bf16/fp16 matmuls, or nothing in fp32), the loss weighted for accumulation;
        # a micro-batch without trained tokens has a 0/0 = NaN mean: it contributes exactly nothing
        with autocast():
            _, loss = model(idx, targets)
        loss = torch.where(n > 0, loss, 0.0) * (n / n_total.clamp(min=1))
        # backward adds this micro-batch's gradients into .grad; fp16 scales the loss so they do not underflow
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        total += loss.detach().float()
    if int(n_total) == 0:
        raise ValueError("no trained tokens in this batch (every label is -100)")
    # fp16: unscale the gradients first, so that clipping sees their true norm
    if scaler is not None:
        scaler.unscale_(optimizer)
    # clip the global norm: a rare batch with a huge gradient moves the weights a bounded distance
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    # the optimizer step (fp16's scaler skips it when a gradient overflowed, and then lowers the scale)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # the gradients are freed: the next step's backward adds into fresh ones
    optimizer.zero_grad(set_to_none=True)
    return total


def run_config(c: dict, args) -> dict:
    """Time the steps of one configuration, then follow one more step with the MemoryTracker."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev, cuda = args.device, args.device.startswith("cuda")
    warm = torch.nn.Linear(64, 64)  # the empty process: torch's thread pools and autograd engine started
    warm(torch.randn(8, 64)).sum().backward()
    base = 0.0 if cuda else _rss_mb()
    model = build(c, args, dev)
    examples = load_examples(args, model)
    autocast, scaler = autocast_and_scaler(c["mp"], "cuda" if cuda else "cpu")
    opt = make_optimizer(model, c["optimizer"], lr=1e-5)
    if args.batch_size % c["ga"]:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by ga={c['ga']}")
    micro = args.batch_size // c["ga"]
    batches = [examples[s: s + args.batch_size] for s in range(0, len(examples), args.batch_size)]
    n_tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        training_step(model, opt, micro_batches(batch, micro, dev), scaler, autocast)
        if cuda:
            torch.cuda.synchronize()
        if i > 0 or len(batches) == 1:  # the first step pays one-time kernel and allocator set-up
            seconds += time.perf_counter() - t0
            n_tokens += sum(len(e["input_ids"]) for e in batch)
    longest = max(batches, key=lambda b: max(len(e["input_ids"]) for e in b))
    with MemoryTracker(model, opt) as mt:  # exact: the step with the longest micro-batches
        training_step(model, opt, micro_batches(longest, micro, dev), scaler, autocast)
    peaks = {k: v / MB for k, v in mt.peaks.items()}
    process_peak = "CUDA max_memory_allocated" if cuda else "RSS high-water mark (VmHWM) above the empty process"
    method = f"exact live tensor bytes (MemoryTracker); process peak: {process_peak}"
    return dict(config=c, key=key(c), status="ok", peak_mb=peaks["total"],
                params_mb=peaks["parameters"] + peaks["buffers"], grads_mb=peaks["gradients"],
                optimizer_mb=peaks["optimizer"], activations_mb=peaks["activations"],
                temporaries_mb=peaks["temporaries"], at_peak={k: v / MB for k, v in mt.at_total_peak.items()},
                process_peak_mb=peak_memory_mb(dev) - base, seconds=seconds, tokens_per_s=n_tokens / seconds,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), method=method)


def run_in_subprocess(c: dict, args) -> dict:
    shared = ("model", "overrides", "max_examples", "batch_size", "max_length", "device", "threads")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(c)]
    cmd += [f"--{k}={getattr(args, k)}" for k in shared]
    cmd += [f"--init_from={args.init_from}"] if args.init_from else []
    cmd += [f"--data_file={args.data_file}"] if args.data_file else []
    cmd += ["--full_length"] if args.full_length else []
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


def measure(unique: dict, args, jsonl: Path) -> dict:
    """Every configuration --repeats times, interleaved; memory from the first run (exact: the same every
    run), time the median of the runs, and its spread."""
    runs = {k: [] for k in unique}
    total, t0 = len(unique) * args.repeats, time.time()
    for rep in range(args.repeats):
        for i, (k, c) in enumerate(unique.items()):
            r = run_in_subprocess(c, args)
            runs[k].append(r)
            done = rep * len(unique) + i + 1
            eta = (time.time() - t0) / done * (total - done)
            print(f"[{done}/{total}, ETA {eta / 60:.1f} min] {k}: " + (f"× {r['reason']}" if r["status"] == "failed"
                  else f"peak {r['peak_mb']:.1f} MB, activations {r['activations_mb']:.1f} MB, {r['seconds']:.2f} s"),
                  flush=True)
    results = {}
    with open(jsonl, "w") as f:
        for k, rs in runs.items():
            ok = [r for r in rs if r["status"] == "ok"]
            r = dict(ok[0] if ok else rs[0])
            if ok:
                secs = [x["seconds"] for x in ok]
                r.update(seconds=statistics.median(secs), seconds_spread=max(secs) - min(secs), reps=len(ok),
                         tokens_per_s=statistics.median(x["tokens_per_s"] for x in ok),
                         process_peak_mb=statistics.median(x["process_peak_mb"] for x in ok))
            results[k] = r
            f.write(json.dumps(r) + "\n")
    return results


# -----------------------------------------------------------------------------------------------
# 3. Estimates: the same numbers from arithmetic


def estimate_config(c: dict, args) -> dict:
    with torch.device("meta"):
        model = build(c, argparse.Namespace(**{**vars(args), "init_from": None}), "meta")
    lens = [len(e["input_ids"]) for e in synthetic_examples(args.max_examples, model.config.vocab_size, args.max_length,
                                                             args.full_length)]
    micro = max(1, args.batch_size // c["ga"])
    tokens = (micro * args.max_length if args.data_file else
              max(len(lens[i: i + micro]) * max(lens[i: i + micro]) for i in range(0, len(lens), micro)))
    e = estimate_memory(model, c["mp"], c["optimizer"], c["gc"], tokens, c["ga"])
    n = sum(p.numel() for p in model.parameters()) + sum(m.out_features * m.in_features for m in model.modules()
                                                          if isinstance(m, NF4Linear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # forward 2 FLOPs per weight and token; backward 2 more for input gradients and, for trainable
    # weights, 2 more for weight gradients; checkpointing repeats the forward
    flops = (2 * n + 2 * n + 2 * trainable + (2 * n if c["gc"] else 0)) * sum(lens)
    # one rank of FSDP over --fsdp_gpus (finetune.py runs a 4-bit base without FSDP)
    fsdp = None if c.get("quant") == "nf4" else estimate_memory(
        model, c["mp"], c["optimizer"], c["gc"], tokens, c["ga"], shards=args.fsdp_gpus)["peak"]
    r = dict(config=c, key=key(c), status="estimate", peak_mb=e["peak"] / MB, params_mb=e["weights"] / MB,
             grads_mb=e["gradients"] / MB, optimizer_mb=e["optimizer"] / MB, activations_mb=e["activations"] / MB,
             fsdp_mb=fsdp and fsdp / MB, seconds=None, tflop=flops / 1e12, trainable=trainable,
             method="estimate (arithmetic)")
    if args.gpu_memory_gb and e["peak"] > args.gpu_memory_gb * 2 ** 30:
        r.update(status="failed", reason=f"estimated {e['peak'] / 2 ** 30:.1f} GiB > {args.gpu_memory_gb:g} GB")
    return r


# -----------------------------------------------------------------------------------------------
# 4. Tables


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def direction(new: float, old: float, tol: float = 0.05, floor: float = 0.5) -> str:
    """↑ / ↓ beyond ±tol relative and beyond `floor` MB absolute, else –."""
    if abs(new - old) <= max(tol * abs(old), floor):
        return "–"
    return "↑" if new > old else "↓"


def time_direction(new: dict, old: dict) -> str:
    """↑ / ↓ only when the medians differ by more than the larger spread of the two."""
    if new.get("seconds") is None or old.get("seconds") is None:
        return direction(new.get("tflop", 0), old.get("tflop", 0))
    if min(new.get("reps", 1), old.get("reps", 1)) < 3:
        return "?"  # fewer than 3 runs: no spread to judge a difference by
    spread = max(new.get("seconds_spread", 0), old.get("seconds_spread", 0))
    if abs(new["seconds"] - old["seconds"]) <= spread:
        return "–"
    return "↑" if new["seconds"] > old["seconds"] else "↓"


COLUMNS = ("peak_mb", "params_mb", "grads_mb", "optimizer_mb", "activations_mb")


def tables(results: dict, tabs: dict, args) -> str:
    est = args.estimate
    what = "ESTIMATES (arithmetic, nothing measured)" if est else f"measured on {args.device}, {args.repeats} runs each"
    md = [f"# Memory and time of the efficiency techniques: {args.init_from or args.model} "
          f"{args.overrides or ''}, {args.max_examples} examples, batch {args.batch_size}, "
          f"max_length {args.max_length} "
          f"({what})\n",
          "MB of live tensors: each column its category's peak during a training step, peak = the peak of their "
          "sum" + ("" if est else "; process peak: what the allocator and the process held (see the docstring)")
          + ".\n"]
    cols = "| peak | params | grads | optimizer | activations | " + (
        f"FSDP/{args.fsdp_gpus} GPUs | compute |" if est else "temporaries | process peak | seconds | tokens/s |")
    n_cols = 7 if est else 9

    def row(r):
        if r["status"] == "failed" and r.get("params_mb") is not None:  # an estimate that does not fit
            return (f"× {r['peak_mb']:.0f} ({r['reason']}) | " + " | ".join(_f(r[k], "{:.0f}") for k in COLUMNS[1:])
                    + f" | {_f(r['fsdp_mb'], '{:.0f}')} | ~{r['tflop']:.1f} TFLOP |")
        if r["status"] == "failed":
            return f"× ({r['reason']}) |" + " × |" * (n_cols - 1)
        vals = [_f(r[k]) for k in COLUMNS]
        vals += ([_f(r["fsdp_mb"], "{:.0f}"), f"~{r['tflop']:.1f} TFLOP"] if est else
                 [_f(r["temporaries_mb"]), _f(r["process_peak_mb"], "{:.0f}"),
                  f"{r['seconds']:.2f} ± {r.get('seconds_spread', 0) / 2:.2f}", _f(r["tokens_per_s"], "{:.0f}")])
        return " | ".join(vals) + " |"

    if "grid" in tabs:
        md += ["## Gradient accumulation × precision × LoRA × gradient checkpointing\n",
               "| GA | precision | LoRA | checkpointing " + cols, "|" + " --- |" * (4 + n_cols)]
        for c in tabs["grid"]:
            md.append(f"| {c['ga']} | {c['mp']} | {c['lora'] or 'full'} | {'on' if c['gc'] else 'off'} | "
                      + row(results[key(c)]))
        md += ["", "## What each technique does (from the columns above: ↑/↓ = more/less than without it by over 5% "
                   "and 0.5 MB, – = within; time: ↑/↓ only beyond the runs' spread, ? with fewer than 3 runs)\n",
               "| technique (vs fp32, full, GA 1, no checkpointing) | parameters | activations | gradients | "
               "optimizer state | compute time |", "| --- | --- | --- | --- | --- | --- |"]
        for name, r, b in derived(results, tabs, args):
            md.append(f"| {name} | " + " | ".join(direction(r[k], b[k]) for k in (
                "params_mb", "activations_mb", "grads_mb", "optimizer_mb")) + f" | {time_direction(r, b)} |")
    for name, title, first in (("optimizer", "Optimizers (fp32, full fine-tuning)", "optimizer"),
                               ("rank", "LoRA rank vs full fine-tuning (fp32, targets q,v)", "LoRA rank"),
                               ("quant", "LoRA on a 16-bit base vs on a 4-bit NF4 base (QLoRA)", "base")):
        if name in tabs:
            md += ["", f"## {title}\n", f"| {first} | trainable " + cols, "|" + " --- |" * (2 + n_cols)]
            for c in tabs[name]:
                label = {"optimizer": c["optimizer"], "rank": c["lora"] or "full",
                         "quant": "NF4" if c["quant"] == "nf4" else c["mp"]}[name]
                md.append(f"| {label} | {results[key(c)].get('trainable', 0):,} | " + row(results[key(c)]))
    return "\n".join(md) + "\n"


def derived(results: dict, tabs: dict, args) -> list:
    """(technique, its row, the baseline row) for each technique the grid shows."""
    base, out = results.get(key(BASE)), []
    changes = [("gradient accumulation", dict(ga=max(c["ga"] for c in tabs["grid"]))),
               ("mixed precision (bf16)", dict(mp="bf16")), ("LoRA", dict(lora=args.lora_rank)),
               ("gradient checkpointing", dict(gc=True))]
    for name, ch in changes:
        r = results.get(key(dict(BASE, **ch)))
        if base and r and base.get("params_mb") is not None and r.get("params_mb") is not None and r is not base:
            out.append((name, r, base))
    return out


def bar_chart(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results.values() if r.get("params_mb") is not None]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rs)), 5))
    bottom = [0.0] * len(rs)
    for part in ("params_mb", "grads_mb", "optimizer_mb", "activations_mb", "temporaries_mb"):
        vals = [r.get(part) or 0.0 for r in rs]
        ax.bar(range(len(rs)), vals, bottom=bottom, label=part.replace("_mb", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(range(len(rs)), [r["peak_mb"] for r in rs], "k_", markersize=20, label="peak (of the sum)")
    ax.set_xticks(range(len(rs)), [r["key"] for r in rs], rotation=75, fontsize=7)
    ax.set_ylabel("MB (each category's peak, stacked)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# 5. DPO: the memory of the three reference modes (dpo.py --reference copy | adapter_off | precomputed)


def _dpo_child(mode: str, args) -> dict:
    """GPT-2-small-shaped LoRA policy (random weights), the reference set up the given way, two
    training steps. 'weights + reference' = RSS after the reference exists minus RSS before the
    model was built; for precomputed it includes the cached log-probs (and the pass computing them)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = _rss_mb()
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
    for s in range(2):  # dpo.py's step, one micro-batch, written out: reference, policy, loss, backward, update
        idx, labels = dpo.collate_pairs(data[s * args.batch_size: (s + 1) * args.batch_size], 0)
        ref_chosen, ref_rejected = ref.logps(idx, labels, keys[s * args.batch_size: (s + 1) * args.batch_size])
        policy_chosen, policy_rejected = dpo.concatenated_logps(policy, idx, labels)
        losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
        losses.mean().backward()
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
    ap = ArgumentParser(prog="bench_memory.py dpo", description="peak memory of --reference copy | "
                                 "adapter_off | precomputed, each in a fresh process (CPU), or --estimate",
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=False,
                    help="print the paper arithmetic for 16/40 GB GPUs")
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
    out = Path(args.out_dir)
    if out.suffix != ".md":  # a folder: the markdown file in it (a .md path is that file itself)
        out = out / OUT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    if args.estimate:
        results = {k: estimate_config(c, args) for k, c in unique.items()}
        write_jsonl(jsonl, results.values())
    else:
        print(f"{len(unique)} configurations x {args.repeats} runs, each in a fresh process", flush=True)
        results = measure(unique, args, jsonl)
        if args.check_estimate:
            for k, c in unique.items():
                e, r = estimate_config(c, args), results[k]
                if r["status"] == "ok":
                    print(f"{k}: measured / estimated MB: " + ", ".join(
                        f"{col[:-3]} {r[col]:.1f} / {e[col]:.1f}" for col in COLUMNS))
    md = tables(results, tabs, args)
    atomic_write(out, lambda p: Path(p).write_text(md))
    bar_chart(results, out.with_suffix(".png"))
    print("\n" + md)
    print(f"written: {out}, {jsonl}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    run_main(main)
