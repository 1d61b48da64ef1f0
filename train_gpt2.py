"""
train_gpt2.py: the pretraining loop, from one CPU to many GPUs, readable top to bottom.

    python train_gpt2.py                                   # no GPU, no data: a small model on the
                                                           # built-in corpus, a few minutes on a laptop
    python prepare_data.py fineweb                         # then, on an 8-GPU node, GPT-2 124M:
    torchrun --standalone --nproc_per_node=8 train_gpt2.py
    python train_gpt2.py --batch_size 16                   # the same recipe on one GPU (more accumulation)
    python train_gpt2.py --resume                          # continue the run in --out_dir after a kill
    python train_gpt2.py --help                            # every flag

Recipes. Every flag has a default from a recipe (--recipe): `gpt2-124m` is the GPT-3-small recipe
of GPT-2 124M on FineWeb-Edu 10B tokens (0.5M-token batches, 6e-4 peak LR, 715 warmup steps, 19073
steps = one pass over 10B tokens); `cpu` trains a 2.6M-parameter model on the built-in corpus
(prepared automatically, see prepare_data.py) for a few minutes. `auto` picks gpt2-124m when a CUDA
GPU and FineWeb shards are present, else cpu. Flags given on the command line win over the recipe.

What happens, in reading order of this file:
  1. configuration (TrainConfig; flags generated from its fields, each with its help);
  2. data: token shards (prepare_data.py) read as one stream, rank-strided for DDP;
  3. the learning-rate schedule (linear warmup, cosine decay to min_lr);
  4. checkpoints (atomic; model + optimizer + step + data position + every RNG) and resume;
  5. evaluation: validation loss, HellaSwag (hellaswag.py, when its data is there), samples;
  6. logging: one line per step, out_dir/log.jsonl, out_dir/loss.png;
  7. the loop: DDP setup, model, optimizer, torch.compile, gradient accumulation, clipping.

The log (out_dir/log.jsonl) has one JSON object per line: {"type": "train", "step", "loss", "lr",
"grad_norm", "ms", "tokens_per_s", "mfu"} per optimizer step (step = its 0-based index), and
{"type": "eval", "step", "val_loss", "hellaswag", ...} per evaluation (step = the number of optimizer
steps done before it: step 0 is the untrained model, step max_steps the final one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import prepare_data
from model import GPT, GPTConfig, load_tokenizer

# -----------------------------------------------------------------------------------------------
# 1. Configuration


def _f(default, help, type=None, choices=None):
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class TrainConfig:
    recipe: str = _f("auto", "where the other flags' defaults come from (auto: gpt2-124m on a CUDA GPU with "
                             "FineWeb shards, else cpu)", choices=["auto", "gpt2-124m", "cpu"])
    # data and output
    data_dir: str = _f("data/fineweb_edu", "folder of token shards written by prepare_data.py")
    out_dir: str = _f("out", "checkpoints (out_dir/ckpt/), log.jsonl and loss.png go here")
    # model
    model: str = _f("gpt2", "architecture preset from model.py: gpt2, gpt2-medium, modern-124m, small-cpu, ...")
    init_from: str = _f("", "start from these weights instead of random init: gpt2 (OpenAI's, via the HF hub) "
                            "or a model directory")
    n_layer: int = _f(None, "override the preset's number of blocks", int)
    n_head: int = _f(None, "override the preset's number of attention heads", int)
    n_embd: int = _f(None, "override the preset's width", int)
    block_size: int = _f(None, "override the preset's context length (at least seq_len)", int)
    dropout: float = _f(0.0, "dropout probability (0 for pretraining on this much data)")
    # batch
    batch_size: int = _f(64, "micro-batch: sequences per forward/backward on each device")
    seq_len: int = _f(1024, "tokens per sequence")
    total_batch_size: int = _f(524288, "tokens per optimizer step, over all devices and accumulation steps; "
                                       "must be a multiple of batch_size * seq_len * world_size")
    # optimizer and schedule
    max_lr: float = _f(6e-4, "peak learning rate (after warmup)")
    min_lr_ratio: float = _f(0.1, "the cosine decays to max_lr * min_lr_ratio")
    warmup_steps: int = _f(715, "steps of linear warmup from max_lr/warmup_steps to max_lr")
    max_steps: int = _f(19073, "optimizer steps in the run (19073 * 524288 tokens = 10B)")
    weight_decay: float = _f(0.1, "AdamW weight decay, on 2-D weights only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    # evaluation, sampling, checkpoints
    eval_interval: int = _f(250, "evaluate every this many steps (and at the end); 0 = only at the end")
    val_tokens: int = _f(10_485_760, "size of the fixed validation slice, from the start of the val split")
    hellaswag_file: str = _f("data/hellaswag/hellaswag_val.jsonl",
                             "HellaSwag examples; evaluated when the file and hellaswag.py exist")
    hellaswag_limit: int = _f(0, "evaluate only the first N HellaSwag examples (0 = all)")
    num_samples: int = _f(4, "continuations sampled at each evaluation (0 = none)")
    sample_len: int = _f(32, "tokens per sampled continuation")
    sample_prompt: str = _f("Hello, I'm a language model,", "prompt of the samples")
    ckpt_interval: int = _f(1000, "checkpoint every this many steps (and at the end); 0 = only at the end")
    resume: bool = _f(False, "continue the run in out_dir from its checkpoint (flags given now override)")
    stop_at_step: int = _f(0, "end after this many steps as if killed there (no final eval/checkpoint): "
                              "for testing --resume; 0 = off")
    # system
    device: str = _f("auto", "where to train (under torchrun each rank takes cuda:LOCAL_RANK)",
                     choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = _f("auto", "autocast dtype (auto: bfloat16 on CUDA, else float32)",
                    choices=["auto", "bfloat16", "float32"])
    compile: str = _f("auto", "torch.compile the training module (auto: on for CUDA; --compile alone = on)",
                      choices=["auto", "on", "off"])
    seed: int = _f(1337, "random seed (model init, dropout, sampling)")


# The recipes: overrides of the defaults above (which are the gpt2-124m recipe).
RECIPES = {
    "gpt2-124m": {},
    # ~2.6M parameters, 128-token context, 2048-token batches: about 3 minutes on 2 CPU cores
    "cpu": dict(data_dir="data/builtin", out_dir="out/cpu", model="small-cpu", n_layer=4, n_head=6, n_embd=192,
                block_size=128, batch_size=16, seq_len=128, total_batch_size=2048, max_lr=2e-3, warmup_steps=30,
                max_steps=300, eval_interval=50, val_tokens=16384, hellaswag_limit=200, num_samples=2,
                sample_len=48, sample_prompt="Return the", ckpt_interval=0, compile="off"),
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field. Defaults are None here, so that we can tell which flags were
    given (they win over the recipe and over a resumed run's saved config)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Defaults: the gpt2-124m recipe; the cpu recipe's differ where shown.")
    for f in fields(TrainConfig):
        cpu = RECIPES["cpu"].get(f.name)
        help = f.metadata["help"] + f" (default: {f.default!r}" + (f"; cpu: {cpu!r})" if cpu is not None else ")")
        if isinstance(f.default, bool):
            ap.add_argument(f"--{f.name}", action="store_const", const=True, default=None, help=help)
        else:
            ap.add_argument(f"--{f.name}", type=f.metadata["type"] or type(f.default), default=None, help=help,
                            choices=f.metadata["choices"], **({"nargs": "?", "const": "on"} if f.name == "compile" else {}))
    return ap


def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """The config from recipe defaults + flags; also returns the flags that were given."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    recipe = given.get("recipe", "auto")
    if recipe == "auto":
        data = given.get("data_dir", TrainConfig.data_dir)
        recipe = "gpt2-124m" if torch.cuda.is_available() and prepare_data.list_shards(data, "train") else "cpu"
    if recipe not in RECIPES:
        raise SystemExit(f"error: --recipe {recipe!r}: expected auto or one of {', '.join(RECIPES)}")
    cfg = TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe})
    return cfg, given


# -----------------------------------------------------------------------------------------------
# 2. Data


class TokenStream:
    """The shards of one split, memory-mapped and read as one long stream of tokens."""

    def __init__(self, files):
        self.files = list(files)
        self.shards = [prepare_data.load_shard(f) for f in self.files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self):
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, across shard boundaries if need be."""
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:
            off = start - self.starts[i]
            part = self.shards[i][off:off + n]
            out.append(part)
            n, start, i = n - len(part), start + len(part), i + 1
        return np.concatenate(out).astype(np.int64)


class DataLoader:
    """Micro-batches (x, y) of B sequences of T tokens, y = x shifted by one token.

    Rank-strided: one optimizer step consumes the next total_batch_size tokens of the stream, cut in
    chunks of B*T; micro-step m of rank r takes chunk m * world_size + r. So no two ranks see the same
    tokens, and the tokens of a step do not depend on how it is split into ranks x accumulation steps
    (1 process x 8 accumulation steps reads what 8 ranks x 1 step read). An epoch ends when the stream
    has fewer than total_batch_size + 1 tokens left (the rest is skipped); then it starts again.
    The position (pos, epoch) is at a step boundary between steps, which is what checkpoints store."""

    def __init__(self, stream: TokenStream, B: int, T: int, rank: int, world_size: int, total_batch_size: int,
                 pos: int = 0, epoch: int = 0):
        self.stream, self.B, self.T, self.rank, self.world = stream, B, T, rank, world_size
        self.step_tokens = total_batch_size
        self.micro_steps = total_batch_size // (B * T * world_size)  # per rank
        if len(stream) < total_batch_size + 1:
            raise ValueError(f"{len(stream):,} tokens in {stream.files[0].parent}: fewer than one batch "
                             f"(total_batch_size={total_batch_size:,} + 1); lower --total_batch_size")
        self.pos, self.epoch, self.micro = pos, epoch, 0

    def next_batch(self):
        if self.micro == 0 and self.pos + self.step_tokens + 1 > len(self.stream):
            self.pos, self.epoch = 0, self.epoch + 1  # not enough left for a whole step: new epoch
        chunk = self.B * self.T
        start = self.pos + (self.micro * self.world + self.rank) * chunk
        buf = torch.from_numpy(self.stream.read(start, chunk + 1))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        self.micro += 1
        if self.micro == self.micro_steps:
            self.micro, self.pos = 0, self.pos + self.step_tokens
        return x, y


def open_data(data_dir) -> tuple[TokenStream, TokenStream, dict]:
    """Train and val streams of data_dir, after checking that every shard is whole and that all were
    made with the same tokenizer and vocabulary. Returns (train, val, meta of the first shard)."""
    data_dir = Path(data_dir)
    train, val = prepare_data.list_shards(data_dir, "train"), prepare_data.list_shards(data_dir, "val")
    if not train or not val:
        raise ValueError(f"{data_dir}: no {'training' if not train else 'validation'} shards "
                         f"(*_train_NNNNNN.bin / *_val_NNNNNN.bin); run prepare_data.py first")
    first = prepare_data.read_header(val[0])
    for f in val + train:
        meta = prepare_data.read_header(f)
        for key in ("tokenizer", "vocab_size"):
            if meta[key] != first[key]:
                raise ValueError(f"{f}: {key} {meta[key]!r} differs from {val[0]}'s {first[key]!r}: "
                                 f"shards of one data_dir must come from the same tokenizer")
    return TokenStream(train), TokenStream(val), first


def data_tokenizer(data_dir, meta):
    """The tokenizer the shards were made with: data_dir/tokenizer/ (a bpe.py one) or GPT-2's.
    None when it cannot be loaded (GPT-2's offline): training works, samples are skipped."""
    tok_dir = Path(data_dir) / "tokenizer"
    if (tok_dir / "tokenizer.bpe").exists():
        name = prepare_data.tokenizer_name(str(tok_dir))
        if name != meta["tokenizer"]:
            raise ValueError(f"{tok_dir} is tokenizer {name!r} but the shards were made with "
                             f"{meta['tokenizer']!r}: re-run prepare_data.py")
        return load_tokenizer(str(tok_dir))
    if meta["tokenizer"] != "gpt2":
        raise ValueError(f"the shards in {data_dir} were made with tokenizer {meta['tokenizer']!r} "
                         f"but {tok_dir} is missing")
    try:
        return load_tokenizer("gpt2")
    except ValueError as e:
        print(f"note: GPT-2's tokenizer is not available ({e}); no samples or HellaSwag", file=sys.stderr)
        return None


def unigram_entropy(stream: TokenStream, vocab_size: int, max_tokens: int = 10 ** 7) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context.
    A language model has learned something about context once its loss is well below it."""
    counts = np.bincount(stream.read(0, min(len(stream), max_tokens)), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------
# 3. Learning-rate schedule


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr, then flat. Warmup: at step 0 Adam's moment
    estimates are empty and the random network's gradients are large and erratic; a full-size first
    step can throw the weights somewhere they never recover from. Cosine: big steps while far from a
    minimum, small ones at the end to settle into it."""
    max_lr, min_lr = cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------------------------
# 4. Checkpoints: out_dir/ckpt/model/ (GPT.from_pretrained loads it; a bpe.py tokenizer is copied
#    into model/tokenizer/) and out_dir/ckpt/state.pt (torch.load(..., weights_only=True)).


def rng_state() -> dict:
    """Every RNG as plain tensors, lists and numbers (weights_only-loadable, nothing pickled)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
            "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss}}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_checkpoint(out_dir: Path, raw_model, optimizer, step: int, loader: DataLoader, cfg: TrainConfig,
                    tokenizer_name: str, data_dir, world_size: int):
    """Write everything to out_dir/ckpt.tmp/, then swap it in with renames: a kill at any moment
    leaves either the previous checkpoint or the new one, never a half-written one that looks whole
    (state.pt is written last; a directory without it is never read)."""
    tmp, final, old = out_dir / "ckpt.tmp", out_dir / "ckpt", out_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    raw_model.save_pretrained(tmp / "model", format="native")
    if (Path(data_dir) / "tokenizer" / "tokenizer.bpe").exists():
        shutil.copytree(Path(data_dir) / "tokenizer", tmp / "model" / "tokenizer")
    state = {"step": step, "optimizer": optimizer.state_dict(),
             "data": {"pos": loader.pos, "epoch": loader.epoch, "total_batch_size": loader.step_tokens},
             "rng": rng_state(), "config": asdict(cfg), "tokenizer": tokenizer_name, "world_size": world_size}
    torch.save(state, tmp / "state.pt.tmp")
    os.replace(tmp / "state.pt.tmp", tmp / "state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path) -> Path:
    """out_dir/ckpt, or ckpt.old when a kill came between the two renames of save_checkpoint."""
    for d in (out_dir / "ckpt", out_dir / "ckpt.old"):
        if (d / "state.pt").exists() and (d / "model" / "gpt_config.json").exists():
            return d
    raise SystemExit(f"error: --resume: no checkpoint in {out_dir} (expected {out_dir / 'ckpt'}/state.pt)")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------------------------
# 5. Evaluation (on the uncompiled model: compile never breaks eval or sampling)


@torch.no_grad()
def val_loss(model, stream: TokenStream, cfg: TrainConfig, device, autocast, rank: int, world: int) -> float:
    """Mean loss over a fixed slice: the first val_tokens tokens of the val split, as sequences of
    seq_len; rank r takes sequences r, r + world, ... and the sums are all-reduced, so the result does
    not depend on the number of ranks."""
    model.eval()
    T = cfg.seq_len
    n_seq = (min(cfg.val_tokens, len(stream) - 1)) // T
    mine = list(range(rank, n_seq, world))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for i in range(0, len(mine), cfg.batch_size):
        rows = [stream.read(s * T, T + 1) for s in mine[i:i + cfg.batch_size]]
        buf = torch.from_numpy(np.stack(rows)).to(device)
        with autocast:
            _, loss = model(buf[:, :-1], buf[:, 1:])
        total += torch.stack([loss.double() * buf[:, 1:].numel(), torch.tensor(buf[:, 1:].numel(), device=device,
                                                                               dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample(model, tok, cfg: TrainConfig, step: int, device) -> list[str]:
    model.eval()
    ids = tok.encode(cfg.sample_prompt)[-(model.config.block_size - 1):] or [tok.eot_id]
    n = min(cfg.sample_len, model.config.block_size - len(ids))
    out = model.generate(torch.tensor([ids] * cfg.num_samples, device=device), n, temperature=1.0, top_k=50,
                         seed=cfg.seed + step)
    model.train()
    return [tok.decode(row) for row in out.tolist()]


def load_hellaswag(cfg: TrainConfig, master: bool):
    """(module, examples), or (None, None) when hellaswag.py or its data is absent."""
    if not cfg.hellaswag_file or not Path(cfg.hellaswag_file).exists():
        return None, None
    try:
        import hellaswag
    except ImportError:
        if master:
            print("note: hellaswag.py not found; HellaSwag is skipped", file=sys.stderr)
        return None, None
    examples = hellaswag.load_examples(cfg.hellaswag_file)
    return hellaswag, examples[:cfg.hellaswag_limit] if cfg.hellaswag_limit else examples


# -----------------------------------------------------------------------------------------------
# 6. Logging


def log_line(out_dir: Path, record: dict):
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out_dir: Path, step: int):
    """On resume: drop what the killed run logged from `step` on (it is about to be redone)."""
    path = out_dir / "log.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
        tmp = path.with_name("log.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def plot(out_dir: Path, baseline: float | None = None):
    """loss.png: train and val loss against steps, HellaSwag accuracy beside them when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in recs if r["type"] == "eval"]
    hs = [(r["step"], r["hellaswag"]) for r in recs if r["type"] == "eval" and r.get("hellaswag") is not None]
    fig, axes = plt.subplots(1, 2 if hs else 1, figsize=(12 if hs else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    if baseline:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    if hs:
        axes[0][1].plot(*zip(*hs), "o-", color="C2", label="HellaSwag acc_norm")
        axes[0][1].axhline(0.25, ls="--", color="gray", label="chance")
        axes[0][1].set_xlabel("step")
        axes[0][1].legend()
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_dir / "loss.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / "loss.png")


# -----------------------------------------------------------------------------------------------
# 7. The training loop


def pick_device(cfg: TrainConfig, ddp: bool, local_rank: int) -> str:
    if cfg.device != "auto":
        dev = cfg.device
    elif torch.cuda.is_available():
        dev = "cuda"
    elif torch.backends.mps.is_available():
        dev = "mps"
    else:
        dev = "cpu"
    if dev == "cuda" and ddp:
        dev = f"cuda:{local_rank}"
    return dev


def train(cfg: TrainConfig, given: dict | None = None):
    given = given or {}
    # ---- distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python is rank 0 of 1
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                               int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    device = pick_device(cfg, ddp, local_rank)
    device_type = device.split(":")[0]
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    master = rank == 0  # only rank 0 logs and writes files
    out_dir = Path(cfg.out_dir)

    def say(*a):
        if master:
            print(*a, flush=True)

    # ---- resume: the saved config, with the flags given now on top (e.g. a longer --max_steps)
    state = None
    if cfg.resume:
        ckpt = find_checkpoint(out_dir)
        state = load_state(ckpt)
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(TrainConfig)}}
        saved["stop_at_step"] = 0  # a one-off of the run that wrote the checkpoint
        cfg = TrainConfig(**{**saved, **given, "resume": True})
        say(f"resuming from {ckpt} at step {state['step']}")

    # ---- data: built-in corpus prepared on first use; shard headers checked against each other
    if master and cfg.data_dir == RECIPES["cpu"]["data_dir"] and not prepare_data.list_shards(cfg.data_dir, "train"):
        say(f"preparing the built-in corpus in {cfg.data_dir} (once; see prepare_data.py builtin)")
        prepare_data.prepare_builtin(cfg.data_dir)
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0's data
    try:
        train_stream, val_stream, meta = open_data(cfg.data_dir)
        tok = data_tokenizer(cfg.data_dir, meta)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    vocab_size = meta["vocab_size"]
    if len(val_stream) < cfg.seq_len + 1:
        raise SystemExit(f"error: the val split of {cfg.data_dir} has {len(val_stream)} tokens, fewer than one "
                         f"sequence of seq_len + 1 = {cfg.seq_len + 1}")

    # ---- batch arithmetic: the batch is set in tokens; accumulation makes up what memory can't hold
    B, T = cfg.batch_size, cfg.seq_len
    per_micro = B * T * world
    if cfg.total_batch_size % per_micro:
        raise SystemExit(f"error: --total_batch_size {cfg.total_batch_size} is not a multiple of "
                         f"batch_size * seq_len * world_size = {B} * {T} * {world} = {per_micro}")
    grad_accum = cfg.total_batch_size // per_micro

    # ---- numerics: TF32 = fp32 matmuls on tensor cores with a 10-bit mantissa (~8x faster, and the
    # loss does not notice); bf16 autocast runs matmuls in bfloat16 while keeping fp32 weights
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device_type == "cuda")
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # ---- model: same seed on every rank, so they start identical (DDP also broadcasts rank 0's)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if state is not None:
        raw_model = GPT.from_pretrained(str(find_checkpoint(out_dir) / "model"), device=device)
    elif cfg.init_from:
        raw_model = GPT.from_pretrained(cfg.init_from, device=device)
    else:
        over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
        raw_model = GPT(GPTConfig.preset(cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, **over)).to(device)
    mc = raw_model.config
    if mc.vocab_size != vocab_size:
        raise SystemExit(f"error: the model's vocab_size is {mc.vocab_size} but the shards in {cfg.data_dir} "
                         f"have vocab_size {vocab_size} (tokenizer {meta['tokenizer']!r}); prepare the data "
                         f"with the model's tokenizer")
    if T > mc.block_size:
        raise SystemExit(f"error: --seq_len {T} exceeds the model's block_size {mc.block_size}")
    raw_model.train()

    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), device_type)
    train_loader = DataLoader(train_stream, B, T, rank, world, cfg.total_batch_size)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        train_loader.pos, train_loader.epoch = state["data"]["pos"], state["data"]["epoch"]
        start_step = state["step"]
        set_rng_state(state["rng"])
        if state["world_size"] != world:
            # the data position is global and a step still takes total_batch_size tokens, so the run
            # reads exactly the tokens it would have; only how they are split (ranks x accumulation)
            # changes, hence the float summation order: losses agree to ~1e-6, not bit for bit
            say(f"note: checkpoint written with world_size {state['world_size']}, resuming with {world}: "
                f"same tokens per step, grad_accum now {grad_accum}")
        if state["data"]["total_batch_size"] != cfg.total_batch_size:
            say(f"note: total_batch_size changed from {state['data']['total_batch_size']} to "
                f"{cfg.total_batch_size}: the data stream continues from the same token")
        if master:
            truncate_log(out_dir, start_step)

    # ---- the training module: DDP (gradients averaged across ranks in backward), then compile.
    # Eval and sampling use raw_model, the same weights uncompiled: their shapes change from call to
    # call (generation grows one token at a time), which would trigger recompiles or graph breaks.
    train_module = raw_model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
    ddp_module = train_module
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")
    if use_compile:
        train_module = torch.compile(train_module)

    hellaswag, hs_examples = load_hellaswag(cfg, master) if tok is not None else (None, None)
    baseline = unigram_entropy(train_stream, vocab_size)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        say(f"recipe {cfg.recipe} | device {device} x {world} | data {cfg.data_dir}: {len(train_stream):,} train / "
            f"{len(val_stream):,} val tokens, tokenizer {meta['tokenizer']} | model {raw_model.get_num_params():,} "
            f"params | {cfg.total_batch_size:,} tokens/step = {B} x {T} x {world} ranks x {grad_accum} accumulation "
            f"| bf16 {use_bf16} | compile {use_compile} | unigram entropy {baseline:.3f} nats")

    # ---- the loop. At the top of iteration `step`, `step` optimizer steps are done.
    step = start_step
    for step in range(start_step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        if cfg.stop_at_step and step == cfg.stop_at_step and not last:
            say(f"stopping at step {step} (--stop_at_step), as if killed")
            break
        if master and step > start_step and (last or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0)):
            save_checkpoint(out_dir, raw_model, optimizer, step, train_loader, cfg, meta["tokenizer"],
                            cfg.data_dir, world)
        if last or (cfg.eval_interval and step % cfg.eval_interval == 0):
            t0 = time.time()
            rec = {"type": "eval", "step": step,
                   "val_loss": val_loss(raw_model, val_stream, cfg, device, autocast, rank, world)}
            if hellaswag is not None:
                with autocast:
                    res = hellaswag.evaluate(raw_model, tok, hs_examples, device=device, rank=rank,
                                             world_size=world, batch_size=cfg.batch_size)
                raw_model.train()
                rec.update(hellaswag=res["acc_norm"], hellaswag_acc=res["acc"], hellaswag_n=res["n"])
            if master:
                hs = f" | hellaswag {rec['hellaswag']:.4f}" if "hellaswag" in rec else ""
                say(f"eval step {step:5d} | val loss {rec['val_loss']:.4f} (unigram {baseline:.3f}){hs} "
                    f"| {time.time() - t0:.1f}s")
                if tok is not None and cfg.num_samples:
                    for text in sample(raw_model, tok, cfg, step, device):
                        say(f"  sample: {text!r}")
                log_line(out_dir, rec)
                plot(out_dir, baseline)
        if last:
            break

        # ---- one optimizer step
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces gradients in every backward; during accumulation only the last one's
            # result is needed, so no_sync skips the communication of the others
            sync = not ddp or micro == grad_accum - 1
            with (nullcontext() if sync else ddp_module.no_sync()):
                with autocast:
                    _, loss = train_module(x, y)
                # backward *adds* into .grad: the sum of grad_accum mean-losses would be grad_accum
                # times too big; dividing makes it the gradient of the mean over the whole batch
                loss = loss / grad_accum
                loss_accum += loss.detach()
                loss.backward()
        if ddp:
            dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # the logged loss is the global mean
        # clipping the global gradient norm bounds the update when a rare batch gives a huge gradient
        # (a loss spike) instead of letting it wreck the weights Adam has built up
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()  # wait for the GPU, or the timing measures only the kernel launches
        dt = time.time() - t0
        tps = cfg.total_batch_size / dt
        mfu = raw_model.estimate_mfu(tps / world, T) if device_type == "cuda" else None
        if master:
            loss_v, norm_v = loss_accum.item(), norm.item()
            mfu_s = f" | mfu {100 * mfu:4.1f}%" if mfu is not None else ""
            say(f"step {step:5d}/{cfg.max_steps} | loss {loss_v:.4f} | lr {lr:.4e} | norm {norm_v:.4f} | "
                f"{1000 * dt:7.1f} ms | {tps:10,.0f} tok/s{mfu_s}")
            log_line(out_dir, {"type": "train", "step": step, "loss": loss_v, "lr": lr, "grad_norm": norm_v,
                               "ms": 1000 * dt, "tokens_per_s": tps, "mfu": mfu, "epoch": train_loader.epoch})
    if ddp:
        # tear down together: a rank whose gloo group goes away while another still talks to it can
        # abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return out_dir


def main(argv=None):
    cfg, given = parse_args(argv)
    train(cfg, given)


if __name__ == "__main__":
    main()
