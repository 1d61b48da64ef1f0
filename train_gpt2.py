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
of GPT-2 124M on FineWeb-Edu 10B tokens (AdamW, 0.5M-token batches, 6e-4 peak LR, 715 warmup steps,
cosine, 19073 steps = one pass over 10B tokens); `gpt2-124m-muon` is the same model with Muon, the
modern block and warmup-stable-decay, on a third of the tokens (arithmetic, not yet measured on a
GPU); `cpu` trains a 2.6M-parameter LLaMA-shaped model with Muon on the built-in corpus (prepared
automatically, see prepare_data.py) for a few minutes. `auto` picks gpt2-124m when a CUDA GPU and
FineWeb shards are present, else cpu. Flags given on the command line win over the recipe.
The cpu recipe with AdamW for every parameter, to compare; with the GPT-2 block (learned positions);
and with the modern block (whose QK-norm, ReLU² and soft-cap Hugging Face cannot express: its
checkpoints and LoRA adapters stay in this project's format):
    python train_gpt2.py --optimizer adamw --out_dir out/cpu-adamw
    python train_gpt2.py --model small-cpu --out_dir out/cpu-gpt2
    python train_gpt2.py --model small-cpu-modern --out_dir out/cpu-modern

How fast it learns: Muon (--optimizer muon) trains the blocks' weight matrices, AdamW the rest
(model.MuonAdamW), each with its own peak learning rate (--matrix_lr, --lr) under one schedule
(--schedule cosine, or wsd: warmup, constant, linear warmdown over --warmdown_frac); the modern
block's switches are model.GPTConfig's (qk_norm, mlp=relu2, tie_embeddings, zero_init_proj,
logit_softcap). Progress is measured in val loss (nats per token) and in val bits per byte, which
do not depend on the tokenizer. bench_speed.py pretrain compares them (BENCHMARKS.md).

What happens, in reading order of this file:
  1. configuration (TrainConfig; flags generated from its fields, each with its help);
  2. data: token shards (prepare_data.py) read as one stream, rank-strided for DDP;
  3. checkpoints (atomic; model + optimizer + step + data position + every rank's RNG) and resume;
  4. evaluation: validation loss, HellaSwag (hellaswag.py, when its data is there), samples;
  5. training: setup() (torchrun, the run directory, the batch arithmetic, data, precision, model,
     optimizer, resume, DDP and torch.compile), then train(), the loop: at the top of each iteration
     the checkpoint, stop and evaluation of the model so far; then one optimizer step written out
     (forward under autocast, backward with gradient accumulation, unscale, clipping, the learning
     rate of each parameter group, the update), logged to out_dir/log.jsonl and drawn in loss.png.

Outputs in out_dir: model/ (the final model, written when the run completes; GPT.from_pretrained and
the later stages load it), ckpt/ (the resumable checkpoint: ckpt/model/ + ckpt/state.pt), log.jsonl,
loss.png and summary.json.

The log (out_dir/log.jsonl) has one JSON object per line; "step" is always the number of optimizer
steps done (step 0: the untrained model, step max_steps: the final one):
  - {"type": "train", "step", "loss", "lr" (AdamW's; Muon's is matrix_lr/lr times it), "grad_norm",
    "ms", "tokens_per_s", "mfu", "epoch"} after each optimizer step (steps 1 .. max_steps);
  - {"type": "eval", "step", "val_loss", "val_bpb", "hellaswag", ...} per evaluation (of the model
    after `step` steps).
At the end, out_dir/summary.json: {"before": {"step", "val_loss", "val_bpb"}, "after": {...},
"samples": [...], "files": [...]}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import prepare_data
from bpe import load_tokenizer
from model import GPT, GPTConfig, lr_schedule, make_optimizer
from housekeeping import (DEVICE_HELP, GracefulStop, RunLog, StepClock, all_ranks, atomic_write, autocast_and_scaler,
                          check_finite, check_model_size, close_run, distribute, end_distributed, finite_figures,
                          fit_to_context, fits_in_memory, flag, grad_sync, init_distributed, open_run, parse_config,
                          pick_device, pick_precision, plot_log, read_log, resolve_warmup, rewrite_log, rng_state,
                          run_main, same_setting, seed_everything, set_rng_state)

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class TrainConfig:
    recipe: str = flag("auto", "where the other flags' defaults come from (auto: gpt2-124m on a CUDA GPU with "
                              "FineWeb shards, else cpu)", choices=["auto", "gpt2-124m", "gpt2-124m-muon", "cpu"])
    # data and output
    data_dir: str = flag("data/fineweb_edu", "folder of token shards written by prepare_data.py")
    out_dir: str = flag("out", "the final model (out_dir/model/), the resumable checkpoint (out_dir/ckpt/), "
                              "log.jsonl, loss.png and summary.json go here")
    resume: bool = flag(False, "continue the run in out_dir from its checkpoint (flags given now override)")
    overwrite: bool = flag(False, "replace a run already in out_dir (otherwise a fresh run there stops)")
    # model
    model: str = flag("gpt2", "architecture preset from model.py: gpt2, gpt2-medium, modern-124m, small-cpu, ...")
    init_from: str = flag("", "start from these weights instead of random init: gpt2 (OpenAI's, via the HF hub) "
                             "or a model directory")
    n_layer: int | None = flag(None, "override the preset's number of blocks", min=1)
    n_head: int | None = flag(None, "override the preset's number of attention heads", min=1)
    n_embd: int | None = flag(None, "override the preset's width", min=1)
    block_size: int | None = flag(None, "override the preset's context length (at least seq_len)", min=1)
    dropout: float = flag(0.0, "dropout probability (0 for pretraining on this much data)", min=0.0, max=1.0)
    # batch
    batch_size: int = flag(64, "micro-batch: sequences per forward/backward on each device (when the flag is not "
                              "given, lowered if need be so that total_batch_size divides)", min=1)
    seq_len: int = flag(1024, "tokens per sequence", min=1)
    total_batch_size: int = flag(524288, "tokens per optimizer step, over all devices and accumulation steps; a "
                                        "multiple of batch_size * seq_len * world_size", min=1)
    # optimizer and schedule
    optimizer: str = flag("adamw", "adamw: AdamW for every parameter; muon: Muon for the 2-D matrices inside the "
                                  "blocks (--matrix_lr), AdamW for embeddings, head, norms and biases (--lr)",
                         choices=["adamw", "muon"])
    lr: float = flag(6e-4, "peak learning rate (after warmup) of AdamW's parameters", min=0.0, aliases=("--max_lr",))
    matrix_lr: float = flag(0.02, "--optimizer muon: peak learning rate of Muon's matrices", min=0.0)
    schedule: str = flag("cosine", "after warmup, cosine: cosine decay to lr * min_lr_ratio; wsd: constant, then a "
                                  "linear warmdown to lr * min_lr_ratio over the last warmdown_frac of the run",
                        choices=["cosine", "wsd"])
    warmdown_frac: float = flag(0.2, "--schedule wsd: the fraction of the steps spent in the warmdown", min=0.0, max=1.0)
    min_lr_ratio: float = flag(0.1, "the schedule ends at lr * min_lr_ratio (matrix_lr * min_lr_ratio)", min=0.0,
                              max=1.0)
    warmup_steps: int = flag(715, "steps of linear warmup from lr/warmup_steps to lr (-1: 5% of the run; more "
                                 "than half of the run is cut to a tenth of it)", min=-1)
    max_steps: int = flag(19073, "optimizer steps in the run (19073 * 524288 tokens = 10B)", min=1)
    weight_decay: float = flag(0.1, "AdamW weight decay, on 2-D weights only", min=0.0)
    beta1: float = flag(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = flag(0.95, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    # evaluation, sampling, checkpoints
    eval_interval: int = flag(250, "evaluate every this many steps (and before the first and after the last); 0 = "
                                  "only before and after", min=0)
    val_tokens: int = flag(10_485_760, "size of the fixed validation slice, from val_offset in the val split", min=1)
    val_offset: int = flag(0, "where the validation slice starts in the val split (bench_speed.py pretrain tunes "
                             "learning rates on a slice held apart from the reported one)", min=0)
    hellaswag_file: str = flag("data/hellaswag/hellaswag_val.jsonl",
                              "HellaSwag examples; evaluated when the file and hellaswag.py exist")
    hellaswag_limit: int = flag(0, "evaluate only the first N HellaSwag examples (0 = all)", min=0)
    num_samples: int = flag(4, "continuations sampled at each evaluation (0 = none)", min=0)
    sample_len: int = flag(32, "tokens per sampled continuation", min=1)
    sample_prompt: str = flag("Hello, I'm a language model,", "prompt of the samples")
    ckpt_interval: int = flag(1000, "checkpoint every this many steps (and at the end); 0 = only at the end", min=0)
    stop_at_step: int = flag(0, "end after this many steps as if killed there (no final eval/checkpoint): "
                               "for testing --resume; 0 = off", min=0)
    # system
    device: str = flag("auto", DEVICE_HELP)
    precision: str = flag("auto", "auto: bf16 on GPUs with bf16 tensor cores, fp16 with loss scaling on older "
                                 "GPUs, fp32 on a CPU", choices=["auto", "fp32", "bf16", "fp16"])
    compile: str = flag("auto", "torch.compile the training module (auto: on for CUDA)", choices=["auto", "on", "off"])
    seed: int = flag(1337, "random seed (model init; dropout and sampling get seed + rank)")


# The recipes: overrides of the defaults above (which are the gpt2-124m recipe).
RECIPES = {
    "gpt2-124m": {},
    # GPT-2 124M with Muon, the modern block and wsd. UNMEASURED: arithmetic only, until a GPU run. Muon
    # is credited with ~1.5x the tokens' worth and the block with more (modded-nanogpt): 1/3 of the
    # 10B-token budget; matrix_lr is Muon's usual 0.02, lr the AdamW recipe's.
    "gpt2-124m-muon": dict(model="gpt2-modern", optimizer="muon", matrix_lr=0.02, schedule="wsd", min_lr_ratio=0.0,
                           warmup_steps=250, max_steps=6358),
    # ~2.6M parameters, 128-token context, 2048-token batches, 600 steps: a few minutes on 2 CPU cores.
    # Both learning rates are the best of `bench_speed.py pretrain`'s sweeps with the GPT-2 block (AdamW's
    # --lr over 1e-3..8e-3, Muon's --matrix_lr over 0.005..0.04); the modern block measured worse here.
    # The block is LLaMA's (RMSNorm, SwiGLU, RoPE; tied embeddings): RoPE lets attention find "the token
    # after the one I just wrote" at any position, which the fine-tuning tasks' copying needs (held-out
    # exact match, BENCHMARKS.md, the life cycle), and Hugging Face loads it as LlamaForCausalLM.
    # The GPT-2 block at 300 steps, the recipe bench_speed.py measured: --model small-cpu --max_steps 300.
    "cpu": dict(data_dir="data/builtin", out_dir="out/cpu", model="small-cpu-llama", n_layer=4, n_head=6,
                n_embd=192, block_size=128, batch_size=16, seq_len=128, total_batch_size=2048, optimizer="muon",
                lr=2e-3, matrix_lr=0.01, schedule="cosine", min_lr_ratio=0.1, warmup_steps=30, max_steps=600,
                eval_interval=50, val_tokens=16384, hellaswag_limit=200, num_samples=2, sample_len=48,
                sample_prompt="Return the", ckpt_interval=50, compile="off"),
}
# fixed once a run exists: the model, the optimizer (a checkpoint holds its state) and the data it reads
FIXED = ("model", "init_from", "n_layer", "n_head", "n_embd", "block_size", "optimizer", "data_dir")


SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")  # a recipe may set them for its own model


def _preset_shape(name: str) -> tuple:
    preset = GPTConfig.preset(name)
    return tuple(getattr(preset, k) for k in SHAPE_FLAGS)


def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """The config from recipe defaults + flags; also returns the flags that were given."""
    description = __doc__.split("\n\n")[0].strip()
    _, given = parse_config(TrainConfig, argv, description, alt_defaults={"cpu": RECIPES["cpu"]})
    recipe = given.get("recipe", "auto")
    if recipe == "auto":
        data = given.get("data_dir", TrainConfig.data_dir)
        recipe = "gpt2-124m" if torch.cuda.is_available() and prepare_data.list_shards(data, "train") else "cpu"
    defaults = dict(RECIPES[recipe])
    # a preset named on the command line is never resized by the recipe: the recipe's shape is for its
    # own model's family (the cpu recipe's 2.6M-parameter small-cpu models), not for --model gpt2-large
    named = given.get("model")
    shape = [k for k in SHAPE_FLAGS if k in defaults and k not in given]
    if named and shape and "model" in defaults and _preset_shape(named) != _preset_shape(defaults["model"]):
        for k in shape:
            del defaults[k]
        print(f"note: --model {named} keeps its own shape; the {recipe} recipe's "
              f"{', '.join(f'{k} {RECIPES[recipe][k]}' for k in shape)} are for its {defaults['model']} model",
              file=sys.stderr)
    c = TrainConfig(**{**defaults, **given, "recipe": recipe})
    if not c.init_from:  # a size beyond the machine fails here, before a file is written
        over = {k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(c, k)}
        check_model_size(GPTConfig.preset(c.model, **over), c.batch_size * c.seq_len,
                         f"batch_size {c.batch_size} x seq_len {c.seq_len}")
    fits_in_memory(8 * c.num_samples * c.sample_len, f"--num_samples {c.num_samples} x --sample_len {c.sample_len}")
    return c, given


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
    """The tokenizer the shards were made with: data_dir/tokenizer/ (a bpe.py one) or GPT-2's, checked
    against the shards' header by name and by vocabulary size (the model's softmax is as wide as the
    header says: a mismatch would train, then save a model its tokenizer cannot speak for).
    None when it cannot be loaded (GPT-2's offline): training works, samples are skipped."""
    tok_dir = Path(data_dir) / "tokenizer"
    if (tok_dir / "tokenizer.bpe").exists():
        name = prepare_data.tokenizer_name(str(tok_dir))
        if name != meta["tokenizer"]:
            raise ValueError(f"{tok_dir} is tokenizer {name!r} but the shards were made with "
                             f"{meta['tokenizer']!r}: re-run prepare_data.py")
        tok = load_tokenizer(str(tok_dir))
    elif meta["tokenizer"] != "gpt2":
        raise ValueError(f"the shards in {data_dir} were made with tokenizer {meta['tokenizer']!r} "
                         f"but {tok_dir} is missing")
    else:
        try:
            tok = load_tokenizer("gpt2")
        except ValueError as e:
            print(f"note: GPT-2's tokenizer is not available ({e}); no samples or HellaSwag", file=sys.stderr)
            return None
    if tok.n_vocab != meta["vocab_size"]:
        raise ValueError(f"the shards in {data_dir} say vocab_size {meta['vocab_size']}, but their tokenizer "
                         f"{meta['tokenizer']!r} has {tok.n_vocab} tokens: re-run prepare_data.py")
    return tok


def unigram_entropy(stream: TokenStream, vocab_size: int, max_tokens: int = 10 ** 7) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context.
    A language model has learned something about context once its loss is well below it."""
    counts = np.bincount(stream.read(0, min(len(stream), max_tokens)), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------
# 3. Checkpoints: out_dir/ckpt/model/ (GPT.from_pretrained loads it; the data's tokenizer is saved
#    beside the weights, in our format and Hugging Face's) and out_dir/ckpt/state.pt
#    (torch.load(..., weights_only=True)): the optimizer, the step, the data position and every
#    rank's RNG states (model.rng_state).


def save_checkpoint(out_dir: Path, raw_model, optimizer, step: int, loader: DataLoader, cfg: TrainConfig,
                    tokenizer_name: str, tokenizer, rngs: list[dict]):
    """Write everything to out_dir/ckpt.tmp/, then swap it in with renames: a kill at any moment
    leaves either the previous checkpoint or the new one, never a half-written one that looks whole
    (state.pt is written last; a directory without it is never read). A failed write (a full disk)
    removes its temporary files, keeps the previous checkpoint and says why."""
    tmp, final, old = out_dir / "ckpt.tmp", out_dir / "ckpt", out_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        raw_model.save_pretrained(tmp / "model", format="native", tokenizer=tokenizer)
        state = {"step": step, "optimizer": optimizer.state_dict(),
                 "data": {"pos": loader.pos, "epoch": loader.epoch, "total_batch_size": loader.step_tokens},
                 "rng": rngs, "config": asdict(cfg), "tokenizer": tokenizer_name, "world_size": len(rngs)}
        torch.save(state, tmp / "state.pt.tmp")
        os.chmod(tmp / "state.pt.tmp", 0o644)
        os.replace(tmp / "state.pt.tmp", tmp / "state.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free
        cause = "the disk is full" if free < 64 * 2 ** 20 else str(e).splitlines()[0][:200]
        raise OSError(f"{out_dir}: writing the step-{step} checkpoint failed ({cause}); the previous checkpoint "
                      f"is kept") from None
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
    raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (expected {out_dir / 'ckpt'}/state.pt)")


def load_state(ckpt: Path) -> dict:
    try:  # weights_only: a pickle can run arbitrary code; this only rebuilds tensors and plain data
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt / 'state.pt'}: not a readable checkpoint state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); it may be truncated") from None


# -----------------------------------------------------------------------------------------------
# 4. Evaluation (on the uncompiled model: compile never breaks eval or sampling)


def val_slice(stream: TokenStream, cfg: TrainConfig) -> tuple[int, int]:
    """(first token, number of seq_len sequences) of the fixed validation slice: val_tokens tokens
    from val_offset in the val split (fewer if the split is shorter)."""
    start = min(cfg.val_offset, len(stream) - cfg.seq_len - 1)
    return start, min(cfg.val_tokens, len(stream) - 1 - start) // cfg.seq_len


def val_bytes(tok, stream: TokenStream, cfg: TrainConfig) -> int | None:
    """The UTF-8 bytes of text that the validation slice's predicted tokens (each sequence's tokens
    1..seq_len) decode to, for bits per byte; None without the tokenizer. A special token such as
    <|endoftext|> marks where a document ends and stands for no text: 0 bytes. Each token's bytes are
    counted (not the decoded string's), so a character split over two tokens is counted once."""
    if tok is None:
        return None
    src, T = tok.source, cfg.seq_len  # data_tokenizer only returns bpe.py tokenizers
    lengths = np.array([len(src.vocab.get(i, b"")) for i in range(max(src.vocab) + 1)], dtype=np.int64)
    lengths[list(src.special_tokens.values())] = 0
    start, n_seq = val_slice(stream, cfg)
    return int(sum(lengths[stream.read(start + s * T + 1, T)].sum() for s in range(n_seq)))


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int | None) -> float | None:
    """Bits per byte: the val loss's nats summed over its tokens, in bits (/ ln 2), per byte of the
    text they decode to. Unlike nats per token it does not depend on the tokenizer: a vocabulary
    with longer tokens has fewer, harder tokens per byte; bpb compares them on the same text."""
    return loss * n_tokens / math.log(2) / n_bytes if n_bytes else None


@torch.no_grad()
def val_loss(model, stream: TokenStream, cfg: TrainConfig, device, autocast, rank: int, world: int) -> float:
    """Mean loss over a fixed slice (val_slice), as sequences of seq_len; rank r takes sequences r,
    r + world, ... and the sums are all-reduced, so the result does not depend on the number of ranks."""
    model.eval()
    T = cfg.seq_len
    start, n_seq = val_slice(stream, cfg)
    mine = list(range(rank, n_seq, world))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for i in range(0, len(mine), cfg.batch_size):
        rows = [stream.read(start + s * T, T + 1) for s in mine[i:i + cfg.batch_size]]
        buf = torch.from_numpy(np.stack(rows)).to(device)
        with autocast():
            _, loss = model(buf[:, :-1], buf[:, 1:])
        total += torch.stack([loss.double() * buf[:, 1:].numel(), torch.tensor(buf[:, 1:].numel(), device=device,
                                                                               dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample(model, tok, cfg: TrainConfig, step: int, device) -> list[str]:
    model.eval()
    [ids], n = fit_to_context([tok.encode(cfg.sample_prompt) or [tok.eot_id]], cfg.sample_len,
                              model.config.block_size, "--sample_len")
    out = model.generate(torch.tensor([ids] * cfg.num_samples, device=device), n, temperature=1.0, top_k=50,
                         seed=cfg.seed + step)
    model.train()
    return [tok.decode(row) for row in out.tolist()]


def hellaswag_examples(cfg: TrainConfig, master: bool):
    """(module, examples), or (None, None) when hellaswag.py or its data is absent."""
    if not cfg.hellaswag_file or not Path(cfg.hellaswag_file).exists():
        return None, None
    try:
        import hellaswag
    except ImportError:
        if master:
            print("note: hellaswag.py not found; HellaSwag is skipped", file=sys.stderr)
        return None, None
    return hellaswag, prepare_data.load_hellaswag(cfg.hellaswag_file)[: cfg.hellaswag_limit or None]


# -----------------------------------------------------------------------------------------------
# 5. The training loop


# Dense bf16 (else fp16) tensor-core peak FLOP/s, for MFU, by torch.cuda.get_device_name()'s exact name:
# by substring an "L40" would get the "L4"'s peak and an "H100 NVL" the SXM's.
GPU_PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12, "NVIDIA A10": 125e12, "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA GeForce RTX 3090": 71e12,
    "Tesla V100-SXM2-16GB": 125e12, "Tesla V100-SXM2-32GB": 125e12, "Tesla V100-PCIE-16GB": 112e12,
    "Tesla T4": 65e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    return GPU_PEAK_FLOPS.get(device_name.strip())


def estimate_mfu(model, tokens_per_sec: float, seq_len: int, device=None, peak_flops: float | None = None):
    """Model FLOPs utilisation: training FLOP/s (model.flops_per_token) over the GPU's peak (default: the
    table above); None if unknown."""
    if peak_flops is None and torch.cuda.is_available():
        peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device))
    if not peak_flops:
        return None
    return model.flops_per_token(seq_len) * tokens_per_sec / peak_flops


def plot(out_dir: Path, baseline: float | None = None):
    """loss.png: train and val loss against steps, val bits per byte and HellaSwag accuracy beside
    them when measured."""
    rows = read_log(out_dir / "log.jsonl")
    train = [dict(step=r["step"], train_loss=r["loss"]) for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    extra = [(k, title) for k, title in (("val_bpb", "val bits per byte"), ("hellaswag", "HellaSwag acc_norm"))
             if any(r.get(k) is not None for r in evals)]
    hlines = [(0, baseline, f"unigram entropy {baseline:.2f}")] + [(1 + i, 0.25, "chance") for i, (k, _) in
                                                                  enumerate(extra) if k == "hellaswag"]
    plot_log(train + evals, out_dir / "loss.png", [["train_loss", "val_loss"]] + [[k] for k, _ in extra],
             ["loss (nats/token)"] + [t for _, t in extra], hlines)


def write_summary(out_dir: Path, samples: list[str]) -> dict:
    """out_dir/summary.json: the val loss and bpb before training and after it (the first and last
    evaluations in the log), the last samples and the run's files; what the life cycle's later
    stages and its report read."""
    evals = [r for r in read_log(out_dir / "log.jsonl") if r.get("type") == "eval"]
    before, after = ({"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r.get("val_bpb")}
                     for r in (evals[0], evals[-1]))
    # what the run wrote: not its lock, nor the temporary file of a write a kill interrupted (*.tmp)
    files = sorted({p.name for p in out_dir.iterdir() if p.name != "run.lock" and not p.name.endswith(".tmp")}
                   | {"summary.json"})
    summary = {"before": before, "after": after, "samples": samples, "files": files}
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return summary


def batch_plan(cfg: TrainConfig, given: dict, world: int) -> tuple[int, int, str]:
    """(micro-batch per rank, accumulation steps, a note). The batch is set in tokens: one optimizer
    step sees total_batch_size tokens however many devices there are; accumulation makes up what
    memory (or the number of ranks) does not hold at once. When --batch_size was not given, it is
    lowered until the step divides into ranks x accumulation."""
    T, B = cfg.seq_len, cfg.batch_size
    if cfg.total_batch_size % (T * world):
        raise ValueError(f"--total_batch_size {cfg.total_batch_size} is not a multiple of seq_len * world_size = "
                         f"{T} * {world}; try --total_batch_size "
                         f"{T * world * max(1, cfg.total_batch_size // (T * world))}")
    fits = [b for b in range(min(B, cfg.total_batch_size // (T * world)), 0, -1)
            if cfg.total_batch_size % (b * T * world) == 0]
    if cfg.total_batch_size % (B * T * world) == 0:
        return B, cfg.total_batch_size // (B * T * world), ""
    if "batch_size" in given:
        raise ValueError(f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * seq_len * "
                         f"world_size = {B} * {T} * {world}; --batch_size {fits[0]} divides it")
    return fits[0], cfg.total_batch_size // (fits[0] * T * world), f" (batch_size {B} lowered to {fits[0]} so that " \
        f"{world} rank(s) divide the step)"


@dataclass
class Run:
    """What setup() makes and the loop uses. One model in three wrappings: raw_model holds the weights
    (evaluation, sampling and checkpoints use it), ddp_module is DDP around it under torchrun (else
    raw_model itself: its gradient sync is what accumulation switches off), train_module is ddp_module
    compiled when --compile says so (what the training step runs)."""
    cfg: TrainConfig          # on --resume: the checkpoint's config with the flags given now on top
    out_dir: Path
    device: str               # "cuda:0", "cpu", ...
    device_type: str          # "cuda", "cpu", "mps": what autocast and pinned memory ask about
    rank: int                 # this process among the torchrun processes (0 without torchrun)
    world: int                # how many processes train together (1 without torchrun)
    master: bool              # rank 0: the one that writes files and prints
    grad_accum: int           # micro-batches per optimizer step on each rank
    warmup: int               # the warmup the run uses (housekeeping.resolve_warmup)
    start_step: int           # optimizer steps already done: 0, or the checkpoint's on --resume
    raw_model: GPT
    ddp_module: torch.nn.Module
    train_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object          # a context manager factory: the precision of forward passes
    scaler: object            # fp16's torch.amp.GradScaler, else None
    train_loader: DataLoader
    val_stream: TokenStream
    tok: object               # the data's tokenizer; None when GPT-2's is unavailable offline (no samples)
    tokenizer_name: str       # as the shards name it, stored in checkpoints
    hellaswag: object         # the hellaswag module, or None when it or its data is absent
    hellaswag_items: list | None
    baseline: float           # the unigram entropy of the training data, nats: the no-context loss
    n_val_tokens: int         # the validation slice's predicted tokens and their bytes, for bits per byte
    n_val_bytes: int | None
    log: RunLog               # out_dir/log.jsonl and the printed lines (rank 0 only)


def setup(cfg: TrainConfig, given: dict) -> Run:
    """Everything before the first step, in this order: torchrun, the run directory (and the checkpoint's
    config on --resume), the batch arithmetic, the data, the precision, the model, the optimizer, the
    checkpoint's state, DDP and compile, what evaluation needs; then the start line. Every check that
    can fail comes before anything is written to out_dir but its run.lock."""
    # ---- distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python is rank 0 of 1
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    rank, local_rank, world = init_distributed(device)
    master = rank == 0  # only rank 0 prints and writes files
    out_dir = Path(cfg.out_dir)

    # ---- the run directory: a fresh run never overwrites another; resume: the saved config, with the
    # flags given now on top (e.g. a longer --max_steps), but never a different architecture
    # every rank calls it: rank 0 decides, and a refusal reaches the others before any collective
    open_run(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    state = None
    if cfg.resume:
        ckpt = find_checkpoint(out_dir)
        state = load_state(ckpt)
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(TrainConfig)}}
        if "max_lr" in state["config"]:  # a checkpoint from before --max_lr became --lr (and Muon came): AdamW
            saved.setdefault("lr", state["config"]["max_lr"])
            saved.setdefault("optimizer", "adamw")
        changed = [f"--{k} {given[k]!r} (checkpoint: {saved.get(k)!r})" for k in FIXED
                   if k in given and not same_setting(given[k], saved.get(k))]
        if changed:
            raise ValueError(f"--resume continues the architecture, optimizer and data in {ckpt}; these flags differ: "
                             f"{', '.join(changed)}")
        saved["stop_at_step"] = 0  # a one-off of the run that wrote the checkpoint
        cfg = TrainConfig(**{**saved, **given, "resume": True, "overwrite": False})
        if state["step"] > cfg.max_steps:
            raise ValueError(f"--max_steps {cfg.max_steps}: the checkpoint in {ckpt} is at step {state['step']} "
                             f"already; give a larger --max_steps to continue")
        if master:
            print(f"resuming from {ckpt} at step {state['step']}", flush=True)

    B, grad_accum, batch_note = batch_plan(cfg, given, world)  # before any work: a bad batch fails at once

    # ---- data: built-in corpus prepared on first use; shard headers checked against each other
    if master and cfg.data_dir == RECIPES["cpu"]["data_dir"] and not prepare_data.list_shards(cfg.data_dir, "train"):
        print(f"preparing the built-in corpus in {cfg.data_dir} (once; see prepare_data.py builtin)", flush=True)
        prepare_data.prepare_builtin(cfg.data_dir)
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's data
    train_stream, val_stream, meta = open_data(cfg.data_dir)
    tok = data_tokenizer(cfg.data_dir, meta)
    vocab_size = meta["vocab_size"]
    if len(val_stream) < cfg.seq_len + 1:
        raise ValueError(f"the val split of {cfg.data_dir} has {len(val_stream)} tokens, fewer than one sequence "
                         f"of seq_len + 1 = {cfg.seq_len + 1}")
    T = cfg.seq_len
    warmup, warmup_note = resolve_warmup(cfg.warmup_steps, cfg.max_steps)

    # ---- numerics: TF32 = fp32 matmuls on tensor cores with a 10-bit mantissa (~8x faster, and the loss
    # does not notice); mixed precision runs the matmuls in 16 bits while keeping fp32 master weights
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    precision = pick_precision(cfg.precision, device)
    autocast, scaler = autocast_and_scaler(precision, device_type)

    # ---- model: the same seed on every rank, so they start identical (DDP also broadcasts rank 0's)
    torch.manual_seed(cfg.seed)
    if state is not None:
        raw_model = GPT.from_pretrained(str(find_checkpoint(out_dir) / "model"), device=device)
    elif cfg.init_from:
        raw_model = GPT.from_pretrained(cfg.init_from, device=device)
    else:
        over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
        raw_model = GPT(GPTConfig.preset(cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, **over)).to(device)
    model_config = raw_model.config
    if model_config.vocab_size != vocab_size:
        raise ValueError(f"the model's vocab_size is {model_config.vocab_size} but the shards in {cfg.data_dir} "
                         f"have vocab_size {vocab_size} (tokenizer {meta['tokenizer']!r}); prepare the data with "
                         f"the model's tokenizer")
    if T > model_config.block_size:
        raise ValueError(f"--seq_len {T} exceeds the model's block_size {model_config.block_size}")
    raw_model.train()
    seed_everything(cfg.seed + rank)  # each rank its own random streams from here on: its own dropout masks

    # ---- optimizer and data position; on --resume both continue from the checkpoint
    optimizer = make_optimizer(raw_model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                               fused=device_type == "cuda", matrix_lr=cfg.matrix_lr)
    train_loader = DataLoader(train_stream, B, T, rank, world, cfg.total_batch_size)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        train_loader.pos = state["data"]["pos"]
        train_loader.epoch = state["data"]["epoch"]
        start_step = state["step"]
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == world:
            set_rng_state(rngs[rank], device)
        elif master:
            # the data position is global and a step still takes total_batch_size tokens, so the run reads
            # exactly the tokens it would have; only how they are split (ranks x accumulation) changes, hence
            # the float summation order: losses agree to ~1e-6, not bit for bit (and dropout streams restart)
            print(f"note: checkpoint written with world_size {len(rngs)}, resuming with {world}: same tokens per "
                  f"step, grad_accum now {grad_accum}", flush=True)
        if master and state["data"]["total_batch_size"] != cfg.total_batch_size:
            print(f"note: total_batch_size changed from {state['data']['total_batch_size']} to "
                  f"{cfg.total_batch_size}: the data stream continues from the same token", flush=True)
        if master:
            # drop what the killed run logged after its checkpoint, as it is about to be redone: the train
            # rows after start_step, and the evaluation at start_step (the resumed loop begins with it)
            rewrite_log(out_dir / "log.jsonl",
                        lambda row: row["step"] < start_step or (row["type"] == "train" and row["step"] == start_step))

    # ---- the training module: DDP (gradients averaged across ranks in backward), then compile. Eval and
    # sampling use raw_model, the same weights uncompiled: their shapes change from call to call
    # (generation grows one token at a time), which would trigger recompiles or graph breaks.
    ddp_module = distribute(raw_model, device)  # DDP under torchrun, else raw_model itself
    train_module = ddp_module
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")
    if use_compile:
        train_module = torch.compile(ddp_module)

    # ---- what evaluation needs, computed once: the val slice is fixed, so its tokens and bytes are
    hellaswag = None
    hellaswag_items = None
    if tok is not None:
        hellaswag, hellaswag_items = hellaswag_examples(cfg, master)
    baseline = unigram_entropy(train_stream, vocab_size)
    n_val_tokens = val_slice(val_stream, cfg)[1] * T
    n_val_bytes = val_bytes(tok, val_stream, cfg)

    log = RunLog(out_dir, master)  # from here on, rank 0 appends to out_dir/log.jsonl
    warmup_text = f"{warmup} ({warmup_note})" if warmup_note else f"{warmup}"
    log.say(f"recipe {cfg.recipe} | device {device} x {world} | data {cfg.data_dir}: {len(train_stream):,} train / "
            f"{len(val_stream):,} val tokens, tokenizer {meta['tokenizer']} | model {raw_model.get_num_params():,} "
            f"params | {cfg.total_batch_size:,} tokens/step = {B} x {T} x {world} ranks x {grad_accum} accumulation"
            f"{batch_note} | warmup {warmup_text} | {precision} | compile {use_compile} | checkpoint every "
            f"{cfg.ckpt_interval or cfg.max_steps} steps | unigram entropy {baseline:.3f} nats")
    return Run(cfg=cfg, out_dir=out_dir, device=device, device_type=device_type, rank=rank, world=world,
               master=master, grad_accum=grad_accum, warmup=warmup, start_step=start_step, raw_model=raw_model,
               ddp_module=ddp_module, train_module=train_module, optimizer=optimizer, autocast=autocast,
               scaler=scaler, train_loader=train_loader, val_stream=val_stream, tok=tok,
               tokenizer_name=meta["tokenizer"], hellaswag=hellaswag, hellaswag_items=hellaswag_items,
               baseline=baseline, n_val_tokens=n_val_tokens, n_val_bytes=n_val_bytes, log=log)


def checkpoint(run: Run, step: int):
    """out_dir/ckpt/ after `step` optimizer steps. Every rank takes part: each one's random streams are
    gathered, for an exact resume; rank 0 writes."""
    rngs = all_ranks(rng_state(run.device))
    if run.master:
        source = run.tok.source if run.tok is not None else None
        save_checkpoint(run.out_dir, run.raw_model, run.optimizer, step, run.train_loader, run.cfg,
                        run.tokenizer_name, source, rngs)
        run.log.say(f"checkpoint: step {step} in {run.out_dir / 'ckpt'}")


def evaluate(run: Run, step: int) -> list[str]:
    """The model after `step` optimizer steps: val loss and bits per byte, HellaSwag when its data is
    there (every rank takes a share of both), samples; one eval row in the log, the plot redrawn.
    Returns the samples (rank 0's; [] on the others)."""
    cfg = run.cfg
    t0 = time.time()
    loss = val_loss(run.raw_model, run.val_stream, cfg, run.device, run.autocast, run.rank, run.world)
    row = {"type": "eval", "step": step, "val_loss": loss,
           "val_bpb": bits_per_byte(loss, run.n_val_tokens, run.n_val_bytes)}
    finite_figures(f"train_gpt2.py: the evaluation at step {step}", row)
    if run.hellaswag is not None:
        with run.autocast():
            result = run.hellaswag.evaluate(run.raw_model, run.tok, run.hellaswag_items, device=run.device,
                                            rank=run.rank, world_size=run.world, batch_size=cfg.batch_size)
        run.raw_model.train()
        row.update(hellaswag=result["acc_norm"], hellaswag_acc=result["acc"], hellaswag_n=result["n"])
    if not run.master:
        return []
    hellaswag_text = f" | hellaswag {row['hellaswag']:.4f}" if "hellaswag" in row else ""
    bpb_text = f" | val bpb {row['val_bpb']:.4f}" if row["val_bpb"] is not None else ""
    run.log.say(f"eval step {step:5d} | val loss {row['val_loss']:.4f} (unigram {run.baseline:.3f}){bpb_text}"
                f"{hellaswag_text} | {time.time() - t0:.1f}s")
    samples = []
    if run.tok is not None and cfg.num_samples:
        samples = sample(run.raw_model, run.tok, cfg, step, run.device)
    for text in samples:
        run.log.say(f"  sample: {text!r}")
    run.log.record(row)
    plot(run.out_dir, run.baseline)
    return samples


def shown(value: float | None) -> str:
    """A loss or bpb as the done line shows it: 4 decimals, n/a where there was none."""
    if value is None:
        return "n/a"
    return f"{value:.4f}"


def finish(run: Run, samples: list[str]):
    """The end of a completed run (rank 0): the final model in out_dir/model/ (what every stage leaves
    there; ckpt/ stays the resumable checkpoint, with the same weights), summary.json, the done line."""
    out_dir = run.out_dir
    source = run.tok.source if run.tok is not None else None
    run.raw_model.save_pretrained(out_dir / "model", format="native", tokenizer=source)
    summary = write_summary(out_dir, samples)
    before = summary["before"]
    after = summary["after"]
    run.log.say(f"done: val loss {shown(before['val_loss'])} -> {shown(after['val_loss'])} nats/token, val bpb "
                f"{shown(before['val_bpb'])} -> {shown(after['val_bpb'])} bits per byte (step {before['step']} -> "
                f"{after['step']}) | final model: {out_dir / 'model'} | written: {', '.join(summary['files'])} "
                f"in {out_dir}")
    chain = "" if out_dir == Path(RECIPES["cpu"]["out_dir"]) else f" --init_from {out_dir}"
    run.log.say(f"next: python finetune.py{chain} (instruction-tune it), or python chat.py{chain} --prompt "
                f"'...' (sample from it)")


ESTIMATE_AFTER = 5  # timed steps before the one-time estimate of the whole run is printed


def train(cfg: TrainConfig, given: dict | None = None) -> Path:
    run = setup(cfg, given or {})
    cfg = run.cfg  # on --resume: the checkpoint's config with the flags given now on top
    model = run.train_module  # DDP and/or compiled around run.raw_model: what the step runs
    optimizer = run.optimizer
    scaler = run.scaler
    log = run.log
    clock = StepClock(cfg.max_steps)  # seconds per step, time left
    stop = GracefulStop()  # Ctrl-C / SIGTERM: a checkpoint at the next step boundary, then exit
    samples = []

    # `step` counts the optimizer steps done: at the top of an iteration the model is the one after `step`
    # steps, which is what gets checkpointed and evaluated; the last iteration only does that
    for step in range(run.start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps

        # ---- stop checks: --stop_at_step is a kill for testing (nothing saved); a signal is a polite stop
        if cfg.stop_at_step and step == cfg.stop_at_step and not last_step:
            log.say(f"stopping at step {step} (--stop_at_step), as if killed")
            break
        stopping = stop.requested(run.device) and not last_step

        # ---- checkpoint every ckpt_interval steps, at the end, and on a signal (not where the run began:
        # that state is on disk already)
        interval_due = cfg.ckpt_interval and step % cfg.ckpt_interval == 0
        if stopping or (step > run.start_step and (last_step or interval_due)):
            checkpoint(run, step)
        if stopping:
            log.close()
            close_run(run.out_dir)
            stop.exit(step, run.out_dir / "ckpt")

        # ---- evaluate before training (step 0), every eval_interval steps and at the end
        if last_step or step == 0 or (cfg.eval_interval and step % cfg.eval_interval == 0):
            samples = evaluate(run, step)
        if last_step:
            break

        # ---- one optimizer step: total_batch_size tokens, as grad_accum micro-batches on each rank
        t0 = time.time()
        loss_accum = torch.zeros((), device=run.device)  # the step's mean loss, for the log
        for micro_step in range(run.grad_accum):
            x, y = run.train_loader.next_batch()
            if run.device_type == "cuda":  # from pinned memory, the copy overlaps with the GPU's work
                x = x.pin_memory().to(run.device, non_blocking=True)
                y = y.pin_memory().to(run.device, non_blocking=True)
            else:
                x = x.to(run.device)
                y = y.to(run.device)
            # DDP all-reduces gradients in every backward; during accumulation only the last one's
            # result is needed, so the communication of the others is skipped
            with grad_sync(run.ddp_module, micro_step == run.grad_accum - 1):
                # forward under autocast: the matmuls in bf16/fp16 when --precision says so, weights in fp32
                with run.autocast():
                    _, loss = model(x, y)
                # the loss divided for accumulation: backward *adds* into .grad, so the sum of grad_accum
                # mean-losses would be grad_accum times too big; divided, it is the gradient of the mean
                # over the whole batch
                loss = loss / run.grad_accum
                loss_accum += loss.detach()
                # backward; fp16's GradScaler multiplies the loss first, so that small gradients do not
                # underflow to zero in 16 bits (unscaled again before clipping)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
        if run.world > 1:
            dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # the logged loss is the mean over all ranks

        # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
        if scaler is not None:
            scaler.unscale_(optimizer)
        # clip the global norm: a rare batch with a huge gradient (a loss spike) then moves the weights a
        # bounded distance instead of wrecking them; the norm before clipping is what gets logged
        params = [p for p in run.raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shard
            norm = norm.full_tensor()

        # the learning rate of this step: the schedule (warmup, then cosine or wsd decay) is a multiplier
        # of each group's own peak: --matrix_lr for Muon's matrices, --lr for AdamW's parameters
        scale = lr_schedule(step, cfg.max_steps, run.warmup, cfg.min_lr_ratio, cfg.schedule, cfg.warmdown_frac)
        for group in optimizer.param_groups:
            peak = cfg.matrix_lr if group.get("muon") else cfg.lr
            group["lr"] = scale * peak

        # the update; fp16: skipped if a gradient overflowed (inf/NaN), and the loss scale then shrinks
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # backward adds into .grad: the next step starts from none (set_to_none frees the memory too)
        optimizer.zero_grad(set_to_none=True)

        # ---- log the step: the model is now the one after step + 1 optimizer steps
        loss_value = loss_accum.item()  # .item() waits for the device: the step's time below is real
        norm_value = norm.item()
        check_finite(step + 1, scaler, loss=loss_value, grad_norm=norm_value)
        dt = time.time() - t0
        clock.add(dt)
        tokens_per_s = cfg.total_batch_size / dt
        mfu = None
        if run.device_type == "cuda":  # the share of the GPU's peak FLOP/s that the step used
            mfu = estimate_mfu(run.raw_model, tokens_per_s / run.world, cfg.seq_len, run.device)
        lr = scale * cfg.lr  # AdamW's (Muon's is matrix_lr / lr times it)
        mfu_text = f" | mfu {100 * mfu:4.1f}%" if mfu is not None else ""
        log.say(f"step {step + 1:5d}/{cfg.max_steps} | loss {loss_value:.4f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                f"{1000 * dt:7.1f} ms | {tokens_per_s:10,.0f} tok/s{mfu_text} | {clock.left(step + 1)}")
        log.record({"type": "train", "step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                    "ms": 1000 * dt, "tokens_per_s": tokens_per_s, "mfu": mfu, "epoch": run.train_loader.epoch})
        if len(clock.seconds) == clock.skip + ESTIMATE_AFTER:
            log.say(f"the whole run: {clock.estimate()}")

    stop.restore()
    if run.master and last_step:
        finish(run, samples)
    log.close()
    close_run(run.out_dir)
    end_distributed()  # tear down together
    return run.out_dir


def main(argv=None):
    cfg, given = parse_args(argv)
    return train(cfg, given)


if __name__ == "__main__":
    run_main(main)
