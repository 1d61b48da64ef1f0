"""
finetune.py: instruction tuning (Alpaca) of a GPT-2 or LLaMA model, fully or with LoRA, with the
memory-saving techniques that take it from GPT-2 on a laptop CPU to LLaMA-2-7B on one 40 GB GPU:
gradient accumulation, gradient checkpointing, mixed precision (bf16, or fp16 with loss scaling)
and LoRA.

Run it:
    python finetune.py --init_from gpt2 --lora_rank 16 --grad_accum 8                 # LoRA on q,v
    python finetune.py --init_from gpt2-medium --lora_rank 0 --lr 1e-5                # full fine-tuning
    python finetune.py --init_from gpt2 --data_file alpaca.json --n_samples 200 --max_response_chars 512
    python finetune.py --init_from path/to/llama-2-7b-hf --lora_rank 16 --precision bf16 \\
        --grad_checkpointing --batch_size 1 --grad_accum 8
    python finetune.py --help

Read it top to bottom:
  1. Config: one dataclass, every field a command-line flag.
  2. Data: Alpaca records, the Stanford Alpaca prompt templates, tokenization with the prompt
     masked out of the loss, truncation, the train/val/test split, padding into batches.
  3. Training machinery (importable, reused by other scripts): precision setup, optimizer, the
     accumulated training step, evaluation, the learning-rate schedule, the memory estimate.
  4. The run: load, adapt, train with evaluation/early stopping/best checkpoint, generate
     responses before and after, write everything to out_dir.

out_dir gets: config.json, log.jsonl (one JSON object per optimizer step: step, loss, lr, ...; one
per evaluation: step, val_loss), loss.png, best_adapter/ (LoRA, PEFT format), best_model/ (merged
full model, this project's native format), responses.jsonl and responses.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from lora import apply_lora, load_lora, lora_state_dict, save_adapter, trainable_report, unload_lora
from model import GPT, atomic_write, load_tokenizer

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class FinetuneConfig:
    # model and data
    init_from: str = field(default="gpt2", metadata=dict(
        help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF model dir (gpt2 or llama), or our checkpoint dir"))
    tokenizer: str | None = field(default=None, metadata=dict(
        help="tokenizer spec for load_tokenizer (default: the model dir's own tokenizer, else GPT-2's)"))
    data_file: str | None = field(default=None, metadata=dict(
        help="Alpaca-format .json (a list) or .jsonl (one object a line) with instruction/input/output; "
             "default: tatsu-lab/alpaca through the datasets library"))
    out_dir: str = field(default="out-finetune", metadata=dict(help="where logs, checkpoints and responses go"))
    n_samples: int = field(default=0, metadata=dict(help="use only the first N examples after filtering (0 = all)"))
    max_response_chars: int = field(default=0, metadata=dict(
        help="drop examples whose output is longer than this many characters (0 = keep all)"))
    val_frac: float = field(default=0.05, metadata=dict(help="fraction of examples for validation"))
    test_frac: float = field(default=0.10, metadata=dict(help="fraction of examples held out for generation"))
    max_length: int = field(default=0, metadata=dict(
        help="longest training sequence in tokens (0 = the model's block_size); longer examples are "
             "truncated from the end of the response"))
    mask_prompt: bool = field(default=True, metadata=dict(
        help="compute the loss only on response tokens + EOS (--no-mask_prompt: on every token)"))
    seed: int = field(default=1337, metadata=dict(help="seed for the split, shuffling, dropout and init"))
    # LoRA or full fine-tuning
    lora_rank: int = field(default=16, metadata=dict(help="LoRA rank; 0 = full fine-tuning"))
    lora_alpha: float = field(default=32.0, metadata=dict(help="LoRA scaling numerator (scaling = alpha / rank)"))
    lora_dropout: float = field(default=0.05, metadata=dict(help="dropout on the LoRA branch's input"))
    lora_targets: str = field(default="q,v", metadata=dict(
        help="comma-separated: q,k,v,o,gate,up,down,c_attn,c_fc,lm_head or attn,mlp,all (see lora.py)"))
    rslora: bool = field(default=False, metadata=dict(help="rank-stabilised LoRA: scaling = alpha / sqrt(rank)"))
    train_last_n_blocks: int = field(default=0, metadata=dict(
        help="LoRA: adapt only the last N blocks; full fine-tuning: train only the last N blocks and the "
             "final norm (0 = all)"))
    # batch and memory
    batch_size: int = field(default=1, metadata=dict(help="examples per micro-batch"))
    grad_accum: int = field(default=8, metadata=dict(help="micro-batches accumulated per optimizer step"))
    grad_checkpointing: bool = field(default=False, metadata=dict(
        help="recompute each block's activations in backward (less memory, ~1/3 more compute)"))
    precision: str = field(default="auto", metadata=dict(
        help="fp32|fp16|bf16|auto (auto: bf16 on a GPU that has it, else fp32)"))
    device: str = field(default="auto", metadata=dict(help="cpu|cuda|mps|auto"))
    # optimization
    optimizer: str = field(default="adamw", metadata=dict(help="adamw|adam|sgd|sgd_momentum|sgd_nesterov"))
    lr: float = field(default=0.0, metadata=dict(help="peak learning rate (0 = 3e-4 with LoRA, 1e-5 full)"))
    min_lr: float = field(default=0.0, metadata=dict(help="learning rate at the end of the cosine decay"))
    warmup_ratio: float = field(default=0.05, metadata=dict(help="fraction of steps with linear warmup"))
    weight_decay: float = field(default=0.0, metadata=dict(help="decoupled weight decay on 2-D weights"))
    grad_clip: float = field(default=1.0, metadata=dict(help="clip the global gradient norm (0 = off)"))
    epochs: int = field(default=1, metadata=dict(help="passes over the training set (unless --max_steps)"))
    max_steps: int = field(default=0, metadata=dict(help="optimizer steps (0 = from --epochs)"))
    # evaluation, early stopping, outputs
    eval_interval: int = field(default=50, metadata=dict(help="evaluate every N optimizer steps (and at 0 and the end)"))
    eval_examples: int = field(default=200, metadata=dict(help="validation examples per evaluation (0 = all)"))
    patience: int = field(default=0, metadata=dict(
        help="stop after this many evaluations without a better val loss (0 = never stop early)"))
    save_merged: bool = field(default=True, metadata=dict(
        help="LoRA: also write the merged full model to best_model/ (the adapter always goes to best_adapter/)"))
    n_generate: int = field(default=20, metadata=dict(help="test prompts to answer before and after tuning"))
    max_new_tokens: int = field(default=128, metadata=dict(help="longest generated response"))
    log_interval: int = field(default=10, metadata=dict(help="print the training loss every N steps"))


def parse_args(argv=None) -> FinetuneConfig:
    ap = argparse.ArgumentParser(description="Instruction-tune a GPT-2 / LLaMA model on Alpaca-format data, "
                                             "fully or with LoRA.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(FinetuneConfig):
        kw = dict(default=f.default, help=f.metadata["help"])
        if f.type == "bool":
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            ap.add_argument(f"--{f.name}", **kw)
    cfg = FinetuneConfig(**vars(ap.parse_args(argv)))
    checks = [
        (cfg.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}"),
        (cfg.batch_size >= 1 and cfg.grad_accum >= 1, "--batch_size and --grad_accum must be >= 1"),
        (cfg.precision in ("auto", "fp32", "fp16", "bf16"), f"--precision {cfg.precision!r}: expected fp32|fp16|bf16|auto"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r}: expected one of {'|'.join(OPTIMIZERS)}"),
        (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1,
         "--val_frac and --test_frac must be in [0, 1) and sum to less than 1"),
        (cfg.epochs >= 1 or cfg.max_steps >= 1, "give --epochs >= 1 or --max_steps >= 1"),
        (cfg.eval_interval >= 1, "--eval_interval must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            ap.error(message)
    return cfg


# -----------------------------------------------------------------------------------------------
# 2. Data

# The Stanford Alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
# The response follows "### Response:" directly, as in Stanford's training targets.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for an example: the with-input template when `input` is non-empty."""
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with instruction/input/output, got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r} (an Alpaca record needs instruction, output and "
                             f"optionally input)")
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}


def read_examples(path) -> list[dict]:
    """Alpaca records from a .json file (a list of objects) or a .jsonl file (one object a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the data file is empty")
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            out.append(_check_record(rec, f"{path}:{lineno}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .jsonl file needs that suffix") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects with instruction/input/output")
    if not data:
        raise ValueError(f"{path}: the list of examples is empty")
    return [_check_record(rec, f"{path}: example {i}") for i, rec in enumerate(data)]


def load_alpaca(data_file=None, max_response_chars: int = 0, n_samples: int = 0) -> list[dict]:
    """Alpaca examples {instruction, input, output}: from data_file, or tatsu-lab/alpaca through the
    datasets library. Filters as in the reports: drop outputs longer than max_response_chars, then
    keep the first n_samples (0 = no limit)."""
    if data_file is not None:
        examples = read_examples(data_file)
    else:
        try:
            from datasets import load_dataset

            ds = load_dataset("tatsu-lab/alpaca", split="train")
        except Exception as e:
            raise RuntimeError(f"could not load tatsu-lab/alpaca ({type(e).__name__}: {e}); pass --data_file "
                               f"with a local copy (alpaca_data.json from the Stanford Alpaca repository)") from None
        examples = [_check_record(rec, f"tatsu-lab/alpaca example {i}") for i, rec in enumerate(ds)]
    if max_response_chars:
        examples = [e for e in examples if len(e["output"]) <= max_response_chars]
    if n_samples:
        examples = examples[:n_samples]
    if not examples:
        raise ValueError("no examples left after filtering (--max_response_chars / --n_samples)")
    return examples


def split_examples(examples: list, val_frac: float = 0.05, test_frac: float = 0.10, seed: int = 1337):
    """Deterministic (train, val, test) split: a seeded shuffle, then test, val and train in turn.
    Each non-zero fraction gets at least one example."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_frac)) if test_frac > 0 else 0
    n_val = max(1, round(len(order) * val_frac)) if val_frac > 0 else 0
    if n_test + n_val >= len(order):
        raise ValueError(f"{len(order)} examples are too few for a train/val/test split ({n_val} val, {n_test} test)")
    pick = lambda ids: [examples[i] for i in ids]  # noqa: E731
    return pick(order[n_test + n_val:]), pick(order[n_test:n_test + n_val]), pick(order[:n_test])


def tokenize_example(example: dict, tok, eos_id: int, max_length: int, mask_prompt: bool = True) -> dict:
    """Token ids of prompt + response + EOS as (input_ids, labels) shifted by one for next-token
    prediction; labels are -100 where the next token is part of the prompt (when mask_prompt), so
    the model learns to answer, not to reproduce instructions. Prompt and response are tokenized
    separately so the boundary is exact (no BPE token straddles it). Sequences longer than
    max_length + 1 are cut from the end of the response (the EOS goes first)."""
    prompt = tok.encode(format_prompt(example))
    full = prompt + tok.encode(example["output"]) + [eos_id]
    truncated = len(full) > max_length + 1
    full = full[: max_length + 1]
    n_prompt = min(len(prompt), len(full))
    labels = full[1:]
    if mask_prompt:
        labels = [-100] * (n_prompt - 1) + labels[n_prompt - 1:]
    return dict(input_ids=full[:-1], labels=labels, truncated=truncated, n_response=len(full) - n_prompt)


def tokenize_examples(examples: list, tok, eos_id: int, max_length: int, mask_prompt: bool = True,
                      name: str = "train") -> list[dict]:
    """tokenize_example for every example. Truncations are counted and printed; an example whose
    response was cut off entirely (the prompt alone fills the context) would train on nothing, so it
    is left out and reported, never dropped silently."""
    out, n_truncated, empty = [], 0, []
    for i, ex in enumerate(examples):
        t = tokenize_example(ex, tok, eos_id, max_length, mask_prompt)
        n_truncated += t["truncated"]
        if t["n_response"] <= 0:
            empty.append(i)
            continue
        out.append(t)
    if n_truncated:
        print(f"{name}: {n_truncated} of {len(examples)} examples longer than {max_length + 1} tokens were "
              f"truncated from the end of the response")
    if empty:
        print(f"{name}: {len(empty)} example(s) left out because the prompt alone fills the context "
              f"(no response token left to train on): indices {empty[:20]}{' ...' if len(empty) > 20 else ''}")
    return out


def collate(batch: list[dict], pad_id: int = 0, device="cpu"):
    """Right-pad a list of tokenized examples into (idx, targets) tensors: pad inputs with pad_id
    (never attended to by real tokens: attention is causal) and pad labels with -100 (no loss)."""
    T = max(len(b["input_ids"]) for b in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        idx[i, :n] = torch.tensor(b["input_ids"])
        targets[i, :n] = torch.tensor(b["labels"])
    return idx.to(device), targets.to(device)


# -----------------------------------------------------------------------------------------------
# 3. Training machinery

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum", "sgd_nesterov")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "sgd_nesterov": 1}  # fp32 tensors per weight


def resolve_precision(precision: str, device_type: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def weight_dtype(precision: str, lora: bool) -> torch.dtype:
    """dtype to load the weights in. Full fine-tuning keeps fp32 weights (the optimizer's master
    copy: bf16/fp16 weights would round small updates away) and lets autocast run the matmuls in
    half precision. With LoRA the base weights never change, so they can be stored in half
    precision (half the memory); the LoRA weights themselves stay fp32 (see lora.py)."""
    if lora and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def setup_precision(precision: str, device_type: str):
    """(autocast context factory, GradScaler or None). bf16 has fp32's exponent range: autocast is
    all it needs. fp16 has a 5-bit exponent: small gradients underflow to zero, so the loss is
    multiplied by a large factor before backward and the gradients divided by it before the step
    (GradScaler, which also skips steps whose gradients overflowed); it needs fp32 trainable
    weights, since it refuses to unscale fp16 gradients."""
    if precision == "fp32":
        return contextlib.nullcontext, None
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast():
        return torch.autocast(device_type, dtype=dtype)

    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    return autocast, scaler


def make_optimizer(model, name: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    """Optimizer over the trainable parameters; weight decay only on 2-D tensors (matmul weights,
    LoRA's A and B), never on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "adam":  # L2 penalty added to the gradient (coupled), unlike AdamW
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    if name in ("sgd", "sgd_momentum", "sgd_nesterov"):
        momentum = 0.0 if name == "sgd" else 0.9
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "sgd_nesterov")
    raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def accumulate_gradients(model, micro_batches, scaler=None, autocast=contextlib.nullcontext) -> tuple[float, int]:
    """Forward + backward over the micro-batches [(idx, targets), ...] of one optimizer step.
    Returns (mean loss per trained token, number of trained tokens).

    Why each micro-batch's loss is weighted by n_i / N (N = trained tokens in ALL micro-batches):
    the model returns the mean over its own n_i tokens, so summing the backward passes of
    mean_i * n_i / N gives the gradient of the mean over all N tokens of the accumulated batch.
    Batch 4 x accumulation 1 and batch 1 x accumulation 4 then take the same step, and every
    response token counts the same (a plain mean of micro-batch means would over-weight the
    tokens of short responses)."""
    counts = [int((t != -100).sum()) for _, t in micro_batches]
    n_total = sum(counts)
    if n_total == 0:
        raise ValueError("no trained tokens in this batch (every label is -100)")
    total = 0.0
    for (idx, targets), n in zip(micro_batches, counts):
        if n == 0:
            continue  # nothing to learn; its 0/0 mean would be NaN
        with autocast():
            _, loss = model(idx, targets)
        scaled = loss * (n / n_total)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item() * n
    return total / n_total, n_total


def optimizer_step(model, optimizer, scaler=None, grad_clip: float = 0.0) -> float | None:
    """Clip, step, zero the gradients. Returns the gradient norm (before clipping) if clipping."""
    norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if scaler is not None:
        scaler.step(optimizer)  # skipped if the gradients contain inf/NaN
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(model, optimizer, micro_batches, scaler=None, autocast=contextlib.nullcontext,
               grad_clip: float = 0.0) -> dict:
    """One optimizer step over accumulated micro-batches: {loss, n_tokens, grad_norm}."""
    loss, n = accumulate_gradients(model, micro_batches, scaler, autocast)
    norm = optimizer_step(model, optimizer, scaler, grad_clip)
    return dict(loss=loss, n_tokens=n, grad_norm=norm)


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, device, autocast=contextlib.nullcontext,
             pad_id: int = 0) -> float:
    """Mean loss per trained token over the examples (the same weighting as training)."""
    was_training = model.training
    model.eval()
    total, n_total = 0.0, 0
    for i in range(0, len(examples), batch_size):
        idx, targets = collate(examples[i:i + batch_size], pad_id, device)
        n = int((targets != -100).sum())
        with autocast():
            _, loss = model(idx, targets)
        total += loss.item() * n
        n_total += n
    model.train(was_training)
    return total / max(n_total, 1)


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def activation_values_per_token(config) -> int:
    """Values one token keeps for backward in one block (no checkpointing, SDPA attention): the
    inputs of both norms and of every matmul, q/k/v, the attention output, the MLP hidden
    pre/post activation. An estimate (kernels may keep a little more); dropout masks excluded."""
    c = config
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    attn = 2 * c.n_embd + qkv + c.n_head * c.head_dim  # norm in, c_attn in, q|k|v, c_proj in
    mlp = 2 * c.n_embd + (4 * c.ffn_hidden if c.mlp == "swiglu" else 2 * c.ffn_hidden)
    return attn + mlp


def estimate_memory(model, precision: str, optimizer: str, grad_checkpointing: bool, tokens: int) -> dict:
    """Bytes for weights, gradients, optimizer states and activations of one micro-batch of
    `tokens` tokens. Trainable tensors are fp32 (their gradients and optimizer states too)."""
    c = model.config
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    per_block = activation_values_per_token(c)
    if grad_checkpointing:  # each block's input is kept, and one block's activations during its recompute
        act_per_token = (c.n_layer * c.n_embd + per_block) * act_bytes
    else:
        act_per_token = c.n_layer * per_block * act_bytes
    logits_per_token = c.padded_vocab_size * act_bytes * 2  # the logits (kept for the loss) and their gradient
    return dict(weights=weights, gradients=trainable * 4, optimizer=trainable * 4 * OPTIMIZER_STATES[optimizer],
                activations_per_token=act_per_token + logits_per_token,
                activations=(act_per_token + logits_per_token) * tokens)


def format_memory(est: dict, tokens: int) -> str:
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    total = est["weights"] + est["gradients"] + est["optimizer"] + est["activations"]
    return (f"memory estimate: weights {gb(est['weights'])}, gradients {gb(est['gradients'])}, optimizer states "
            f"{gb(est['optimizer'])}, activations {est['activations_per_token'] / 2**10:.0f} KiB/token x {tokens} "
            f"tokens = {gb(est['activations'])}; total ~{gb(total)}")


# -----------------------------------------------------------------------------------------------
# 4. The run


def load_model(cfg: FinetuneConfig, device: str, precision: str) -> GPT:
    dtype = weight_dtype(precision, cfg.lora_rank > 0)
    return GPT.from_pretrained(cfg.init_from, dtype=dtype, device=device)


def prepare_model(model: GPT, cfg: FinetuneConfig) -> GPT:
    """LoRA (rank > 0): adapters on the targets, everything else frozen. Full fine-tuning: every
    weight trains, or only the last N blocks and the final norm."""
    n_last = cfg.train_last_n_blocks or None
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, layers=n_last,
                   rslora=cfg.rslora)
    elif n_last:
        if not 1 <= n_last <= model.config.n_layer:
            raise ValueError(f"--train_last_n_blocks {n_last}: expected 1..{model.config.n_layer}")
        for p in model.parameters():
            p.requires_grad_(False)
        for m in list(model.transformer.h)[-n_last:] + [model.transformer.ln_f]:
            for p in m.parameters():
                p.requires_grad_(True)
    return model


@torch.no_grad()
def generate_responses(model, tok, examples: list[dict], eos_id: int, max_new_tokens: int,
                       autocast=contextlib.nullcontext, batch_size: int = 8) -> list[str]:
    """Greedy responses to the Alpaca prompts of examples (stopping at EOS)."""
    out = []
    block = model.config.block_size
    for i in range(0, len(examples), batch_size):
        prompts = [tok.encode(format_prompt(e)) for e in examples[i:i + batch_size]]
        fits = [p for p in prompts if len(p) < block]
        if not fits:
            out += ["(prompt longer than the context)"] * len(prompts)
            continue
        n_new = min(max_new_tokens, block - max(len(p) for p in fits))
        with autocast():
            seqs = model.generate(fits, n_new, temperature=0, eos_token_id=eos_id) if n_new > 0 else None
        rows = iter(seqs.tolist() if seqs is not None else [])
        T = max(len(p) for p in fits)
        for p in prompts:
            if len(p) >= block:
                out.append("(prompt longer than the context)")
                continue
            new = next(rows)[T:] if seqs is not None else []
            if eos_id in new:
                new = new[: new.index(eos_id)]
            out.append(tok.decode(new).strip())
    return out


def _write_jsonl(path: Path, rows: list[dict]):
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def plot_losses(log: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per response token")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _copy_tokenizer(cfg: FinetuneConfig, dst: Path):
    """Put the tokenizer beside a saved model (as tokenizer/), so the model dir is self-contained."""
    src = Path(cfg.tokenizer) if cfg.tokenizer and Path(cfg.tokenizer).is_dir() else None
    init = Path(cfg.init_from)
    if src is None and init.is_dir():
        src = init / "tokenizer" if (init / "tokenizer").is_dir() else None
        if src is None and any((init / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            src = init
    if src is None:
        return
    (dst / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or src.name == "tokenizer"):
            shutil.copy2(f, dst / "tokenizer" / f.name)


def peak_memory_gb(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS high-water mark (KiB on Linux)


def finetune(cfg: FinetuneConfig) -> dict:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else device
    precision = resolve_precision(cfg.precision, device_type)
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (3e-4 if lora else 1e-5)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))

    # data
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    model = load_model(cfg, device, precision)
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}")
    examples = load_alpaca(cfg.data_file, cfg.max_response_chars, cfg.n_samples)
    train_ex, val_ex, test_ex = split_examples(examples, cfg.val_frac, cfg.test_frac, cfg.seed)
    print(f"{len(examples)} examples: {len(train_ex)} train, {len(val_ex)} val, {len(test_ex)} test")
    max_length = min(cfg.max_length or model.config.block_size, model.config.block_size)
    pad = tok.eot_id
    train_t = tokenize_examples(train_ex, tok, tok.eot_id, max_length, cfg.mask_prompt, "train")
    val_t = tokenize_examples(val_ex, tok, tok.eot_id, max_length, cfg.mask_prompt, "val")
    if cfg.eval_examples:
        val_t = val_t[: cfg.eval_examples]
    if not train_t:
        raise ValueError("no training examples left after tokenization")

    # model, precision, optimizer
    autocast, scaler = setup_precision(precision, device_type)
    gen_ex = test_ex[: cfg.n_generate]
    before = generate_responses(model, tok, gen_ex, tok.eot_id, cfg.max_new_tokens, autocast) if gen_ex else []
    prepare_model(model, cfg)
    model.grad_checkpointing = cfg.grad_checkpointing  # non-reentrant: works with frozen embeddings + LoRA
    model.train()
    print(trainable_report(model))
    mean_len = sum(len(t["input_ids"]) for t in train_t) / len(train_t)
    tokens = int(cfg.batch_size * min(max_length, max(len(t["input_ids"]) for t in train_t)))
    print(format_memory(estimate_memory(model, precision, cfg.optimizer, cfg.grad_checkpointing, tokens), tokens)
          + f" (longest micro-batch; mean example {mean_len:.0f} tokens)")
    optimizer = make_optimizer(model, cfg.optimizer, lr, cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(train_t) / per_step)
    warmup = int(cfg.warmup_ratio * total_steps)
    print(f"precision {precision}, {cfg.optimizer} lr {lr:g}, {total_steps} steps of {cfg.batch_size} x "
          f"{cfg.grad_accum} examples on {device}")

    # training loop
    rng = random.Random(cfg.seed)
    order: list[int] = []
    log: list[dict] = []
    log_f = open(out / "log.jsonl", "w")

    def record(row):
        log.append(row)
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()

    def next_example():
        nonlocal order
        if not order:
            order = list(range(len(train_t)))
            rng.shuffle(order)
        return train_t[order.pop()]

    best_val, best_step, bad_evals, best_lora = float("inf"), -1, 0, None
    n_real_tokens, train_time = 0, 0.0
    step = 0
    while True:
        if step % cfg.eval_interval == 0 or step == total_steps:
            val = evaluate(model, val_t, cfg.batch_size, device, autocast, pad) if val_t else float("nan")
            record(dict(step=step, val_loss=val))
            print(f"step {step}: val loss {val:.4f}")
            if val < best_val or not val_t:  # without a val set, the latest weights are kept
                best_val, best_step, bad_evals = val, step, 0
                if lora:
                    best_lora = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
                    save_adapter(model, out / "best_adapter", cfg.init_from)
                else:
                    model.save_pretrained(out / "best_model", format="native")
            else:
                bad_evals += 1
                if cfg.patience and bad_evals >= cfg.patience:
                    print(f"early stop: no better val loss in {bad_evals} evaluations")
                    break
        if step == total_steps:
            break
        t0 = time.perf_counter()
        picked = [[next_example() for _ in range(cfg.batch_size)] for _ in range(cfg.grad_accum)]
        micro = [collate(b, pad, device) for b in picked]
        n_real_tokens += sum(len(e["input_ids"]) for b in picked for e in b)  # padding not counted
        this_lr = lr_at(step, total_steps, lr, cfg.min_lr, warmup)
        for g in optimizer.param_groups:
            g["lr"] = this_lr
        r = train_step(model, optimizer, micro, scaler, autocast, cfg.grad_clip)
        if device_type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        step += 1
        record(dict(step=step, loss=r["loss"], lr=this_lr, n_tokens=r["n_tokens"], grad_norm=r["grad_norm"]))
        if step % cfg.log_interval == 0 or step == 1:
            print(f"step {step}/{total_steps}: loss {r['loss']:.4f}, lr {this_lr:.2e}")
    log_f.close()

    # the best checkpoint back in the model; responses after tuning; merged model; plot and summary
    if lora and best_lora is not None:
        load_lora(model, best_lora)
    elif not lora and best_step >= 0 and best_step != step:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / "best_model" / "model.safetensors"), device=str(device)), strict=False)
    if not lora and best_step >= 0:
        _copy_tokenizer(cfg, out / "best_model")
    after = generate_responses(model, tok, gen_ex, tok.eot_id, cfg.max_new_tokens, autocast) if gen_ex else []
    rows = [dict(ex, response_before=b, response_after=a) for ex, b, a in zip(gen_ex, before, after)]
    _write_jsonl(out / "responses.jsonl", rows)
    md = [f"# Responses before and after tuning ({cfg.init_from}, best step {best_step})\n"]
    for i, r in enumerate(rows):
        md.append(f"## {i + 1}. {r['instruction']}\n")
        if r["input"]:
            md.append(f"**Input:** {r['input']}\n")
        md += [f"**Reference:** {r['output']}\n", f"**Before:** {r['response_before']}\n",
               f"**After:** {r['response_after']}\n"]
    atomic_write(out / "responses.md", lambda p: Path(p).write_text("\n".join(md)))
    if lora and cfg.save_merged and best_lora is not None:
        try:
            unload_lora(model, merge=True)  # W + (alpha/r) B A, in fp32: a plain model again
            model.save_pretrained(out / "best_model", format="native")
            _copy_tokenizer(cfg, out / "best_model")
        except ValueError as e:  # e.g. a LoRA on a tied lm_head cannot be merged
            print(f"merged model not written: {e}")
    plot_losses(log, out / "loss.png")
    tps = n_real_tokens / train_time if train_time else float("nan")
    print(f"best val loss {best_val:.4f} at step {best_step}; peak memory {peak_memory_gb(device_type):.2f} GiB "
          f"({'max allocated' if device_type == 'cuda' else 'process max RSS'}); {tps:.0f} tokens/s "
          f"(non-padding, training steps only); outputs in {out}")
    return dict(best_val=best_val, best_step=best_step, log=log, tokens_per_s=tps)


def main(argv=None):
    finetune(parse_args(argv))


if __name__ == "__main__":
    main()
