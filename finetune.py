"""
finetune.py: supervised fine-tuning of a GPT-2 or LLaMA model, fully or with LoRA: instruction
tuning (Alpaca), dialogue (HH-RLHF) and classification (a linear head on the last token). With the
memory-saving techniques that take it from GPT-2 on a laptop CPU to LLaMA-2-7B on one 40 GB GPU:
gradient accumulation, gradient checkpointing, mixed precision (bf16, or fp16 with loss scaling),
LoRA and a 4-bit frozen base (QLoRA, --quantize nf4); and past one GPU with torchrun (DDP, or FSDP2
with --fsdp).

Run it:
    python finetune.py --init_from gpt2 --lora_rank 16 --grad_accum 8                 # LoRA on q,v
    python finetune.py --init_from gpt2-medium --lora_rank 0 --lr 1e-5                # full fine-tuning
    python finetune.py --init_from gpt2 --data_file alpaca.json --n_samples 200 --max_response_chars 512
    python finetune.py --init_from gpt2-medium --task dialogue --batch_size 1 --grad_accum 8     # HH-RLHF
    python finetune.py --task classify --dataset sst2 --num_classes 2 --lora_rank 16           # sentiment
    python finetune.py --init_from path/to/llama-2-7b-hf --lora_rank 16 --precision bf16 \\
        --grad_checkpointing --batch_size 1 --grad_accum 8
    python finetune.py --init_from path/to/llama-2-7b-hf --lora_rank 16 --quantize nf4 --precision bf16 \\
        --grad_checkpointing --batch_size 4                                       # QLoRA: < 10 GB
    torchrun --nproc_per_node=8 finetune.py --init_from path/to/llama-2-7b-hf --lora_rank 0 --fsdp \\
        --precision bf16 --grad_checkpointing --batch_size 1 --grad_accum 4      # full 7B, sharded
    python finetune.py --help

Read it top to bottom:
  1. Config: one dataclass, every field a command-line flag.
  2. Data: tokenization with the prompt masked out of the loss, truncation, the train/val/test
     split, padding into batches. (The records themselves come from prepare_data.py.)
  3. The training step: gradient accumulation weighted by tokens, clipping, evaluation, and the
     memory estimate printed at the start.
  4. The model: LoRA or full fine-tuning; for classification, a head on the last real token.
  5. The run: one loop for every task, with evaluation, early stopping, the best checkpoint and
     responses before and after tuning.

out_dir gets: config.json, log.jsonl (one JSON object per optimizer step: step, loss, lr, ...; one
per evaluation: step, val_loss, val_ppl, ...), loss.png, best_adapter/ (LoRA, PEFT format),
best_model/ (merged full model), responses.jsonl and responses.md (instruction and dialogue),
classifier_head.safetensors beside the best weights (classify), summary.json (the best
step, val/test loss and perplexity or accuracy, trainable parameters, peak memory, time, and
{"before": {...}, "after": {...}}: val loss, the held-out answers' exact_match and eos_rate); ckpt/ (the
resumable state, --ckpt_interval), ckpt_step<N>/ (--save_interval), scoring/ (--score_every_eval).
Answers can then be scored with score.py, and the model talked to with chat.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bpe import load_tokenizer

from housekeeping import atomic_write
from lora import NF4_SLICE, LoRALinear, NF4Linear, apply_lora, load_base, save_adapter, trainable_report, unload_lora
from housekeeping import load_train_state, resumed_config, save_train_state
from model import GPT, OPTIMIZER_STATES, Block, RMSNorm, lr_schedule, make_optimizer, save_safetensors
from housekeeping import (DEVICE_HELP, GracefulStop, all_ranks, autocast_and_scaler, before_after, flag, check_finite,
                          close_run, distribute, end_distributed, fit_to_context, fits_in_memory, gathered, grad_sync,
                          init_distributed, open_run, parse_config, peak_memory_mb, pick_device, pick_precision,
                          plot_log, previous_stage, resolve_init_from, rewrite_log, rng_state, run_main,
                          seed_everything, set_rng_state, write_jsonl)
from prepare_data import (builtin_tasks, exact_match, format_prompt, load_alpaca, load_classification, load_dialogues,
                          parse_dialogue)

TASKS = ("instruction", "dialogue", "classify")

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class FinetuneConfig:
    # model and data
    init_from: str = flag("auto", "gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF model dir (gpt2 or llama), or our "
                                 "checkpoint dir; auto: train_gpt2.py's CPU checkpoint if there is one (then, with no "
                                 "data flag, on the built-in task set: the offline life cycle), else gpt2")
    tokenizer: str | None = flag(None, "tokenizer spec for bpe.load_tokenizer (default: the model dir's own, "
                                      "else GPT-2's)")
    task: str = flag("instruction", "instruction: Alpaca records; dialogue: HH-RLHF conversations, loss on the "
                                   "assistant turns; classify: a class per text, a linear head on the last token "
                                   "replacing the LM head", choices=TASKS)
    data_file: str | None = flag(None, "instruction: Alpaca .json (a list) or .jsonl with instruction/input/output; "
                                      "dialogue: .jsonl with `chosen` conversations; classify: .jsonl/.csv with text, "
                                      "text_pair?, label; default: the task's built-in set (offline) when --init_from "
                                      "auto finds train_gpt2.py's CPU checkpoint, else from the hub tatsu-lab/alpaca, "
                                      "Anthropic/hh-rlhf or --dataset")
    dataset: str | None = flag(None, "classify without --data_file: sst2 (sentiment) | sms_spam | mnli (entailment)")
    num_classes: int = flag(2, "classify: number of classes (labels 0..N-1)", min=2)
    balance: bool = flag(False, "classify: downsample every class to the size of the smallest")
    out_dir: str = flag("out-finetune", "where logs, checkpoints and responses go")
    overwrite: bool = flag(False, "replace a run already in out_dir (otherwise a fresh run there stops)")
    resume: bool = flag(False, "continue the run in out_dir from its last state (out_dir/ckpt/); flags given now "
                              "override its config.json, except the model and what is trained")
    ckpt_interval: int = flag(100, "also write that resumable state every N steps (it is always written at the end, "
                                  "and on Ctrl-C / SIGTERM; 0 = only then)", min=0)
    stop_at_step: int = flag(0, "end after this many steps as if killed there (no final state or outputs): for "
                               "testing --resume; 0 = off", min=0)
    quantize: str = flag("none", "nf4: keep the frozen base in 4 bits (QLoRA; needs --lora_rank > 0): about a quarter "
                                "of bf16's memory, at the cost of dequantising each weight when it is used",
                        choices=["none", "nf4"])
    fsdp: bool = flag(False, "under torchrun: shard parameters, gradients and optimizer state over the ranks "
                            "(FSDP2, per transformer block), for models whose training state fits no single device; "
                            "without it each rank holds a whole copy (DDP)")
    n_samples: int = flag(0, "use only the first N examples after filtering (0 = all)", min=0)
    max_response_chars: int = flag(0, "drop examples whose output is longer than this (0 = keep all)", min=0)
    test_file: str | None = flag(None, "held-out records (the --data_file format) to answer before and after tuning "
                                      "and for the test metrics, instead of a --test_frac split of the data")
    val_frac: float = flag(0.05, "fraction of examples for validation", min=0.0, max=0.9)
    test_frac: float = flag(0.10, "fraction held out for generation (classify: for test metrics)", min=0.0, max=0.9)
    max_length: int = flag(0, "longest training sequence in tokens (0 = the model's block_size); longer examples "
                             "are truncated from the end of the response", min=0)
    mask_prompt: bool = flag(True, "loss only on response tokens + EOS (--no-mask_prompt: on every token)")
    seed: int = flag(1337, "seed for the split, shuffling, dropout and init")
    # LoRA or full fine-tuning
    lora_rank: int = flag(16, "LoRA rank; 0 = full fine-tuning", min=0)
    lora_alpha: float = flag(32.0, "LoRA scaling numerator (scaling = alpha / rank)", min=0.0)
    lora_dropout: float = flag(0.05, "dropout on the LoRA branch's input", min=0.0, max=1.0)
    lora_targets: str = flag("q,v", "comma-separated: q,k,v,o,gate,up,down,c_attn,c_fc,lm_head or attn,mlp,all "
                                   "(see lora.py)")
    rslora: bool = flag(False, "rank-stabilised LoRA: scaling = alpha / sqrt(rank)")
    train_last_n_blocks: int = flag(0, "LoRA: adapt only the last N blocks; full: train only the last N blocks and "
                                      "the final norm (0 = all)", min=0)
    # batch and memory
    batch_size: int = flag(1, "examples per micro-batch", min=1)
    grad_accum: int = flag(8, "micro-batches accumulated per optimizer step", min=1)
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward (less memory, ~1/3 "
                                          "more compute)")
    precision: str = flag("auto", "auto: bf16 on GPUs with bf16 tensor cores, fp16 on older GPUs, fp32 on a CPU",
                         choices=["auto", "fp32", "fp16", "bf16"])
    device: str = flag("auto", DEVICE_HELP)
    # optimization
    optimizer: str = flag("adamw", "the optimizer; muon: Muon for the blocks' matrices, AdamW (--lr) for the rest",
                         choices=[o for o in OPTIMIZER_STATES if o != "rmsprop"] + ["muon"])
    lr: float = flag(0.0, "peak learning rate (0 = 3e-4 with LoRA, 1e-5 full)", min=0.0)
    matrix_lr: float = flag(0.005, "--optimizer muon: peak learning rate of Muon's matrices", min=0.0)
    min_lr: float = flag(0.0, "learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = flag(-1, "steps of linear warmup (-1 = 5% of the steps)", min=-1)
    weight_decay: float = flag(0.0, "decoupled weight decay on 2-D weights", min=0.0)
    grad_clip: float = flag(1.0, "clip the global gradient norm (0 = off)", min=0.0)
    epochs: int = flag(1, "passes over the training set (unless --max_steps)", min=1)
    max_steps: int = flag(0, "optimizer steps (0 = from --epochs)", min=0)
    # evaluation, early stopping, outputs
    eval_interval: int = flag(50, "evaluate every N optimizer steps (and at 0 and the end)", min=1)
    eval_examples: int = flag(200, "validation examples per evaluation (0 = all)", min=0)
    patience: int = flag(0, "stop after this many evaluations without a better val loss (0 = never)", min=0)
    save_merged: bool = flag(True, "LoRA: also write the merged full model to best_model/")
    save_interval: int = flag(0, "also keep the weights every N steps in out_dir/ckpt_step<N>/ (0 = only the best)",
                             min=0)
    n_generate: int = flag(20, "test prompts to answer before and after tuning", min=0)
    max_new_tokens: int = flag(128, "longest generated response", min=1)
    log_interval: int = flag(10, "print the training loss every N steps", min=1)
    # answers scored at every evaluation, by score.py in a fresh process
    score_every_eval: bool = flag(False, "rate answers to score.py's prompt set at every evaluation (reward_mean / "
                                        "judge_mean in the log and the plot); needs --reward_model or --judge_url")
    reward_model: str = flag("none", "--score_every_eval: HF reward model (hub id or dir), or none")
    judge_url: str | None = flag(None, "--score_every_eval: OpenAI-compatible API base URL of an LLM judge")
    judge_model: str = flag("gpt-4o-mini", "--score_every_eval: the judge's model name")
    prompts: str | None = flag(None, "--score_every_eval: the prompt set (default: score.py's built-in one)")


FIXED = ("init_from", "tokenizer", "task", "num_classes", "lora_rank", "lora_alpha", "lora_targets", "rslora",
         "train_last_n_blocks")  # what a resumed run may not change


PRETRAINED = "out/cpu/ckpt/model"  # what `python train_gpt2.py` leaves on a laptop
BUILTIN = {"instruction": "instructions", "dialogue": "dialogues", "classify": "classes"}
# The offline life cycle's defaults (the flags given win), measured with train_gpt2.py's 2.6M-parameter
# model on the built-in tasks (the figures: BENCHMARKS.md, the life cycle):
# - full fine-tuning, not LoRA: at the same 100 steps of 8, LoRA rank 16 on every projection at lr 1e-2
#   reached a val loss of 6.53, full fine-tuning at lr 3e-3 5.06 (from 8.07); a model this small costs
#   little to train whole.
# - Muon for the blocks' matrices (--matrix_lr 0.005, half pretraining's peak), AdamW at lr 2e-3 for the
#   rest: held-out exact_match 0.710 against 0.565 with AdamW alone, same steps. A tiny model takes large
#   steps (the general default, 1e-5 for full fine-tuning, is for models 50 to 3000 times larger).
# - 16 examples per forward, no accumulation: on a CPU one matmul of 16 rows beats 16 of one.
# - 1800 steps, 1.3 passes over the ~22,000 questions: the copying questions are learned slowly. Answers
#   are a few tokens (24 new ones are plenty), and 200 held-out answers measure exact_match to +-0.035.
LAPTOP = dict(lora_rank=0, optimizer="muon", matrix_lr=5e-3, lr=2e-3, batch_size=16, grad_accum=1, max_steps=1800,
              eval_interval=600, n_generate=200, max_new_tokens=24)


def parse_args(argv=None) -> FinetuneConfig:
    c, given = parse_config(FinetuneConfig, argv, __doc__.split("\n\n")[0].strip(),
                            alt_defaults={"offline life cycle": LAPTOP})
    if c.resume:
        c = resumed_config(FinetuneConfig, c, given, c.out_dir, FIXED)
    if c.init_from == "auto":
        c.init_from = previous_stage(PRETRAINED) or "gpt2"
        if c.init_from == PRETRAINED and c.data_file is None and c.dataset is None:
            c.data_file = str(builtin_tasks()[BUILTIN[c.task]])
            for k, v in LAPTOP.items():
                setattr(c, k, given.get(k, v))
            if c.lora_rank and "optimizer" not in given:  # LoRA's thin A and B: AdamW (Muon is for whole matrices)
                c.optimizer = "adamw"
            if c.task == "instruction":  # the answers before and after: questions about held-out modules
                c.test_file = c.test_file or str(builtin_tasks()["instructions_test"])
            print(f"offline default: {PRETRAINED} (from train_gpt2.py) on the built-in {c.task} set {c.data_file}; "
                  f"the real recipe names them: --init_from gpt2 (Alpaca, HH-RLHF or GLUE from the hub)")
    c.init_from = resolve_init_from(c.init_from)  # a run directory: its best or final model
    if c.val_frac + c.test_frac >= 1:
        raise ValueError(f"--val_frac {c.val_frac} + --test_frac {c.test_frac} must be below 1")
    if c.score_every_eval and c.task == "classify":
        raise ValueError("--score_every_eval rates generated answers: not with --task classify")
    if c.score_every_eval and c.reward_model == "none" and not c.judge_url:
        raise ValueError("--score_every_eval needs --reward_model or --judge_url")
    # sizes beyond the machine fail here, before a file is written: a step's token ids (input and label,
    # 8 bytes each, one token an example at least), an answer, LoRA's A and B and the head (at width 1)
    for need, what in ((16 * c.batch_size * c.grad_accum, f"--batch_size {c.batch_size} x --grad_accum {c.grad_accum}"),
                       (8 * c.max_new_tokens, f"--max_new_tokens {c.max_new_tokens}"),
                       (8 * c.lora_rank, f"--lora_rank {c.lora_rank}"),
                       (4 * c.num_classes, f"--num_classes {c.num_classes}")):
        fits_in_memory(need, what)
    return c


# -----------------------------------------------------------------------------------------------
# 2. Data: tokenization, masking, splitting, batching


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
    if "text" in example:
        return tokenize_dialogue(example["text"], tok, eos_id, max_length, mask_prompt)
    prompt = tok.encode(format_prompt(example))
    full = prompt + tok.encode(example["output"]) + [eos_id]
    truncated = len(full) > max_length + 1
    full = full[: max_length + 1]
    n_prompt = min(len(prompt), len(full))
    labels = full[1:]
    if mask_prompt:
        labels = [-100] * (n_prompt - 1) + labels[n_prompt - 1:]
    return dict(input_ids=full[:-1], labels=labels, truncated=truncated, n_response=len(full) - n_prompt)


def tokenize_dialogue(text: str, tok, eos_id: int, max_length: int, mask_prompt: bool = True) -> dict:
    """A conversation as (input_ids, labels): each turn is tokenized on its own, so the boundaries
    are exact; with mask_prompt only the assistant answers (and the EOS after the last) are
    trained: the model learns to answer, not to write the human's lines or the markers. Longer
    than max_length + 1: cut from the end."""
    ids, train = [], []
    for role, t in parse_dialogue(text):
        marker = tok.encode(f"\n\n{role}:")
        body = tok.encode(t)
        ids += marker + body
        train += [False] * len(marker) + [role == "Assistant" or not mask_prompt] * len(body)
    ids.append(eos_id)
    train.append(True)
    truncated = len(ids) > max_length + 1
    ids, train = ids[: max_length + 1], train[: max_length + 1]
    labels = [t if ok else -100 for t, ok in zip(ids[1:], train[1:])]  # position p predicts token p + 1
    return dict(input_ids=ids[:-1], labels=labels, truncated=truncated, n_response=sum(train[1:]))


def tokenize_classification(ex: dict, tok, eos_id: int, max_length: int) -> dict:
    """Text (+ pair, after a newline) + EOS; the class is the label of the LAST token, every other
    label -100: collate, the training step and evaluate then work unchanged, and the last real token
    of a right-padded row is exactly where its label sits. The text is cut from the left."""
    ids = tok.encode(ex["text"] + ("\n" + ex["text_pair"] if ex.get("text_pair") else ""))
    ids = ids[-(max_length - 1):] + [eos_id]
    return dict(input_ids=ids, labels=[-100] * (len(ids) - 1) + [ex["label"]], truncated=False, n_response=1)


def tokenize_examples(examples: list, tok, eos_id: int, max_length: int, mask_prompt: bool = True,
                      name: str = "train", task: str = "instruction") -> list[dict]:
    """Tokenize every example. Truncations are counted and printed; an example whose response was
    cut off entirely (the prompt alone fills the context) would train on nothing, so it is left out
    and reported, never dropped silently."""
    out, n_truncated, empty = [], 0, []
    for i, ex in enumerate(examples):
        t = (tokenize_classification(ex, tok, eos_id, max_length) if task == "classify" else
             tokenize_example(ex, tok, eos_id, max_length, mask_prompt))
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
    (never attended to by real tokens: attention is causal) and pad labels with -100 (no loss).
    Built in pinned memory on a GPU host, so the copy to the device can overlap with compute."""
    T = max(len(b["input_ids"]) for b in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        idx[i, :n] = torch.tensor(b["input_ids"])
        targets[i, :n] = torch.tensor(b["labels"])
    if str(device).startswith("cuda"):
        return idx.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
    return idx.to(device), targets.to(device)


# -----------------------------------------------------------------------------------------------
# 3. The training step


def accumulate_gradients(model, micro_batches, scaler=None, autocast=contextlib.nullcontext, n_total=None):
    """Forward + backward over the micro-batches [(idx, targets), ...] of one optimizer step.
    Returns (mean loss per trained token, number of trained tokens), both tensors on the device:
    reading them (.item()) would make the host wait for the device at every micro-step.

    Why each micro-batch's loss is weighted by n_i / N (N = trained tokens in ALL micro-batches):
    the model returns the mean over its own n_i tokens, so summing the backward passes of
    mean_i * n_i / N gives the gradient of the mean over all N tokens of the accumulated batch.
    Batch 4 x accumulation 1 and batch 1 x accumulation 4 then take the same step, and every
    response token counts the same (a plain mean of micro-batch means would over-weight the
    tokens of short responses). Under torchrun N counts every rank's micro-batches (n_total), and
    the weights are multiplied by the number of ranks: DDP and FSDP average the ranks' gradients."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    counts = [(t != -100).sum() for _, t in micro_batches]
    n_total = torch.stack(counts).sum() if n_total is None else torch.tensor(n_total, device=counts[0].device)
    total = torch.zeros((), device=n_total.device)
    for k, ((idx, targets), n) in enumerate(zip(micro_batches, counts)):
        with grad_sync(model, k == len(micro_batches) - 1):
            with autocast():
                _, loss = model(idx, targets)
            # a micro-batch without trained tokens has a 0/0 = NaN mean: it contributes exactly nothing
            # (where, not nan_to_num: a NaN of a diverged model must stay NaN and stop the run)
            loss = torch.where(n > 0, loss, 0.0) * (n / n_total.clamp(min=1))
            (scaler.scale(loss * world) if scaler is not None else loss * world).backward()
        total += loss.detach().float()
    if world > 1:
        dist.all_reduce(total)  # this rank's share of the mean: the sum is the step's mean loss
    return total, n_total


def train_step(model, optimizer, micro_batches, scaler=None, autocast=contextlib.nullcontext,
               grad_clip: float = 0.0, n_total=None) -> dict:
    """One optimizer step over accumulated micro-batches: {loss, n_tokens, grad_norm}, read from the
    device once, at the end of the step."""
    loss, n = accumulate_gradients(model, micro_batches, scaler, autocast, n_total)
    n_tokens = n_total if n_total is not None else int(n)  # finetune.py counts on the host: no wait here
    if n_tokens == 0:
        raise ValueError("no trained tokens in this batch (every label is -100)")
    # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
    if scaler is not None:
        scaler.unscale_(optimizer)
    # clip the global norm: a rare batch with a huge gradient (a loss spike) then moves the weights a
    # bounded distance instead of wrecking them; the norm before clipping is what gets logged
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shard
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)  # skipped if a gradient overflowed (inf/NaN); the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the next step's backward adds into fresh gradients
    loss, norm = torch.stack([loss.float(), norm.float()]).tolist()
    return dict(loss=loss, n_tokens=n_tokens, grad_norm=norm)


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, device, autocast=contextlib.nullcontext,
             pad_id: int = 0) -> float:
    """Mean loss per trained token over the examples (the same weighting as training)."""
    was_training = model.training
    model.eval()
    total, n_total = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(examples), batch_size):
        idx, targets = collate(examples[i:i + batch_size], pad_id, device)
        n = (targets != -100).sum()
        with autocast():
            _, loss = model(idx, targets)
        total += torch.where(n > 0, loss.float(), 0.0) * n  # an empty batch's 0/0: nothing
        n_total += n
    model.train(was_training)
    return (total / n_total.clamp(min=1)).item()


def _trains(module) -> bool:
    """Does this projection need its input in backward? Only if its weight learns (dW = dY^T X) or a
    LoRA adapter on it does: a frozen layer needs just its weight to pass the gradient on."""
    return isinstance(module, LoRALinear) or any(p.requires_grad for p in module.parameters(recurse=False))


def activation_bytes_per_token(gpt: GPT, ab: int) -> int:
    """Bytes one token leaves saved for backward in one block (SDPA attention, no checkpointing), ab
    bytes a value (4 in fp32, 2 under 16-bit autocast), counted the way autograd keeps them; the
    block's first layer decides what trains:
      norms: LayerNorm its input; RMSNorm its input, and its normalised input if the gain learns;
        in fp32 always (RMSNorm computes in fp32, autocast runs layer_norm in fp32)
      q, k, v and the attention output, kept by the attention kernel (H + 2 Hkv + H heads of hd)
      the inputs of the projections that learn (c_attn, c_proj: its input is the attention output,
      already kept; c_fc, and mlp.c_proj: the MLP's hidden values)
      the MLP: GELU keeps its input (F values); SwiGLU its gate|up output (2F) and silu(gate) (F)
      LoRA: the rank-r product A x of each adapted block."""
    c, blk = gpt.config, gpt.transformer.h[0]
    C, F = c.n_embd, c.ffn_hidden
    norm = lambda n: C + (C if isinstance(n, RMSNorm) and n.weight.requires_grad else 0)  # noqa: E731
    n = (c.n_head * 2 + 2 * c.n_kv_head) * c.head_dim
    n += C * (_trains(blk.attn.c_attn) + _trains(blk.mlp.c_fc))
    n += (3 * F if c.mlp == "swiglu" else F) + F * _trains(blk.mlp.c_proj)
    n += sum(m.lora_A.shape[0] for m in blk.modules() if isinstance(m, LoRALinear))
    return n * ab + (norm(blk.ln_1) + norm(blk.ln_2)) * 4


def estimate_memory(model, precision: str, optimizer: str, grad_checkpointing: bool, tokens: int,
                    grad_accum: int = 1, shards: int = 1) -> dict:
    """The training step's memory on paper, in bytes: weights, gradients and optimizer state (the
    tensors' sizes), activations (what autograd keeps for backward: activation_bytes_per_token for
    each block, the logits the loss keeps), and the peak, the larger of two moments of backward: its
    start, when every activation is still kept and the logits' gradient is made; and its end, when
    every gradient exists (with tied embeddings: also the shared matrix's two gradients, summed).
    With accumulation, a later micro-step runs its forward while the gradients exist already.
    shards > 1: one rank of FSDP over that many. It keeps 1/shards of the weights, gradients and optimizer
    state, all of its own micro-batch's activations, and two whole blocks (the one running and the next,
    prefetched) with one block's unreduced gradients; in 16 bits under mixed precision, so no autocast copies."""
    gpt = model.gpt if hasattr(model, "gpt") else model
    c = gpt.config
    params = list(model.parameters())
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]  # a 4-bit base: its codes are buffers
    weights = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for m in nf4 for b in m.buffers(recurse=False))
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    n_states = OPTIMIZER_STATES.get(optimizer, 2)  # muon: one state (momentum) on the matrices, two on the rest
    opt = n_states * sum(p.numel() * 4 for p in trainable) + (4 * len(trainable) if n_states == 2 else 0)  # + steps
    ab = 2 if precision in ("bf16", "fp16") else 4
    per_block = activation_bytes_per_token(gpt, ab)
    head = gpt.lm_head.weight
    # the final norm's input (fp32), the output layer's if it learns, and the logits, kept by the loss
    top = c.n_embd * 4 + (c.n_embd * _trains(gpt.lm_head) + c.padded_vocab_size) * ab
    # checkpointing keeps each block's input (the residual stream, in the embeddings' dtype); one block's
    # activations exist again while it is recomputed, in backward, when the logits are gone already
    residual = gpt.transformer.wte.weight.element_size()
    kept = c.n_layer * c.n_embd * residual + max(top, per_block) if grad_checkpointing else c.n_layer * per_block + top
    # autocast's 16-bit copies of the fp32 weights that train: cached until the forward ends, and kept
    # for backward too (so: activations) unless checkpointing discards what the forward saved
    copies = 0
    if ab == 2 and trainable and shards == 1 and not any(isinstance(m, LoRALinear) for m in model.modules()):
        copies = sum(p.numel() for p in trainable if p.dim() == 2) * 2
    acts = tokens * kept + (0 if grad_checkpointing else copies)
    logits_grad = tokens * c.padded_vocab_size * ab
    head_grad = head.numel() * 4 if head.requires_grad else 0
    tied = 2 * head.numel() * 4 if c.tie_embeddings and head.requires_grad else 0
    if shards > 1:  # FSDP gathers 16-bit weights under mixed precision: no autocast copies (above)
        block = sum(p.numel() for p in gpt.transformer.h[0].parameters()) * (ab if ab == 2 else 4)
        weights, opt = weights / shards + 2 * block, opt / shards
        grads, head_grad, tied = grads / shards + block, head_grad / shards, tied / shards
    accumulated = grads if grad_accum > 1 else 0  # a later micro-step: the gradients exist already
    forward_end = weights + opt + acts + accumulated + (copies if grad_checkpointing else 0)
    start = weights + opt + acts + logits_grad + (accumulated or head_grad)
    end = weights + opt + grads + tied
    # a 4-bit layer in use: its weight dequantised in the compute dtype, plus one slice's temporaries
    n = max((m.in_features * m.out_features for m in nf4), default=0)
    dequant = weights + opt + acts + n * ab + 16 * min(n, NF4_SLICE) if nf4 else 0
    return dict(weights=weights, gradients=grads, optimizer=opt, activations=acts, autocast_copies=copies,
                activations_per_token=kept, peak=max(forward_end, start, end, dequant))


def format_memory(est: dict, tokens: int) -> str:
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    copies = f", autocast's weight copies {gb(est['autocast_copies'])}" if est["autocast_copies"] else ""
    return (f"memory estimate: weights {gb(est['weights'])}, gradients {gb(est['gradients'])}, optimizer states "
            f"{gb(est['optimizer'])}, activations {est['activations_per_token'] / 2**10:.0f} KiB/token x {tokens} "
            f"tokens{copies}; peak ~{gb(est['peak'])}")


# -----------------------------------------------------------------------------------------------
# 4. The model: LoRA or full fine-tuning; a classification head


def prepare_model(model: GPT, c: FinetuneConfig) -> GPT:
    """LoRA (rank > 0): adapters on the targets, everything else frozen. Full fine-tuning: every
    weight trains, or only the last N blocks and the final norm."""
    n_last = c.train_last_n_blocks or None
    if c.lora_rank > 0:
        apply_lora(model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets, layers=n_last, rslora=c.rslora)
    elif n_last:
        if not 1 <= n_last <= model.config.n_layer:
            raise ValueError(f"--train_last_n_blocks {n_last}: expected 1..{model.config.n_layer}")
        model.requires_grad_(False)
        for m in list(model.transformer.h)[-n_last:] + [model.transformer.ln_f]:
            m.requires_grad_(True)
    return model


def last_real_index(attention_mask, T: int, B: int, device):
    """Index of each row's last real token: T - 1 with no mask or left padding, the last 1 otherwise."""
    if attention_mask is None:
        return torch.full((B,), T - 1, device=device)
    return T - 1 - attention_mask.flip(1).argmax(1)


class Classifier(torch.nn.Module):
    """A GPT body with a linear head on the final hidden state of the last real token: with causal
    attention that is the only position that has read the whole text."""

    def __init__(self, gpt: GPT, num_classes: int):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.head = torch.nn.Linear(gpt.config.n_embd, num_classes).to(gpt.lm_head.weight.device)

    def forward(self, idx, targets=None, attention_mask=None):
        h = self.gpt.hidden_states(idx, attention_mask)
        if targets is not None:  # the label sits at the last real token of each row (see tokenize_classification)
            last = (targets != -100).float().argmax(1)  # each row has exactly one label: no boolean indexing
            logits = self.head(h[torch.arange(idx.size(0), device=idx.device), last].float())
            return logits, F.cross_entropy(logits, targets.gather(1, last[:, None])[:, 0])
        last = last_real_index(attention_mask, idx.size(1), idx.size(0), idx.device)
        return self.head(h[torch.arange(idx.size(0), device=idx.device), last].float()), None


@torch.no_grad()
def classification_metrics(clf: Classifier, examples: list[dict], batch_size: int, device, pad_id: int,
                           num_classes: int, autocast=contextlib.nullcontext) -> dict:
    """Accuracy and macro-F1 (the mean over classes of 2PR / (P + R); a class never predicted nor
    present counts 0)."""
    was = clf.training
    clf.eval()
    pred, gold = [], []
    for i in range(0, len(examples), batch_size):
        idx, targets = collate(examples[i:i + batch_size], pad_id, device)
        with autocast():
            logits, _ = clf(idx, targets)
        pred += logits.argmax(-1).tolist()
        gold += [e["labels"][-1] for e in examples[i:i + batch_size]]
    clf.train(was)
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return dict(accuracy=sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold)), macro_f1=sum(f1s) / num_classes)


@torch.no_grad()
def generate_responses(model, tok, examples: list[dict], eos_id: int, max_new_tokens: int,
                       autocast=contextlib.nullcontext, batch_size: int = 8) -> tuple[list[str], list[bool]]:
    """Greedy responses to the prompts of examples (stopping at EOS), and whether each ended with the
    EOS (rather than at the length limit). A progress line every 10 s: on a CPU this takes a while."""
    out, ended, shown = [], [], time.time()
    for i in range(0, len(examples), batch_size):
        if time.time() - shown > 10:
            print(f"generating: {i}/{len(examples)} answers", flush=True)
            shown = time.time()
        prompts, n_new = fit_to_context([tok.encode(format_prompt(e)) for e in examples[i:i + batch_size]],
                                        max_new_tokens, model.config.block_size)
        with autocast():
            seqs = model.generate(prompts, n_new, temperature=0, eos_token_id=eos_id).tolist()
        T = max(len(p) for p in prompts)
        for row in seqs:
            new = row[T:]
            out.append(tok.decode(new[: new.index(eos_id)] if eos_id in new else new).strip())
            ended.append(eos_id in new)
    return out, ended


def answer_metrics(answers: list[str], ended: list[bool], examples: list[dict]) -> dict:
    """exact_match: the share of answers equal to the reference (the built-in tasks' check);
    eos_rate: the share that ended with the end-of-text token before the length limit (a tuned model
    knows when its answer is complete)."""
    return dict(exact_match=exact_match(answers, [e["output"] for e in examples]),
                eos_rate=sum(ended) / max(len(ended), 1))


# -----------------------------------------------------------------------------------------------
# 5. The run


def load_data(c: FinetuneConfig, tok, block_size: int):
    """(train, val, test) tokenized examples and the raw test examples (prompts for generation)."""
    if c.task == "classify":
        examples = load_classification(c.data_file, c.dataset, c.num_classes, c.n_samples, c.balance, c.seed)
    elif c.task == "dialogue":
        examples = load_dialogues(c.data_file, c.n_samples)
    else:
        examples = load_alpaca(c.data_file, c.max_response_chars, c.n_samples)
    train_ex, val_ex, test_ex = split_examples(examples, c.val_frac, 0 if c.test_file else c.test_frac, c.seed)
    if c.test_file:  # disjoint from the training data by construction (the built-in tasks: other modules)
        test_ex = (load_classification(c.test_file, None, c.num_classes) if c.task == "classify" else
                   load_dialogues(c.test_file) if c.task == "dialogue" else load_alpaca(c.test_file))
    max_length = min(c.max_length or block_size, block_size)
    tk = lambda xs, name: tokenize_examples(xs, tok, tok.eot_id, max_length, c.mask_prompt, name, c.task)  # noqa: E731
    train_t, val_t, test_t = tk(train_ex, "train"), tk(val_ex, "val"), tk(test_ex, "test")
    if not train_t:
        raise ValueError("no training examples left after tokenization")
    print(f"{len(examples)} examples: {len(train_t)} train, {len(val_t)} val, {len(test_ex)} test")
    if c.task == "classify":
        counts = [sum(e["label"] == k for e in train_ex) for k in range(c.num_classes)]
        print(f"train classes {counts}; majority-class accuracy {max(counts) / len(train_ex):.3f}")
    return train_t, val_t[: c.eval_examples or None], test_t, test_ex


def score_answers(c: FinetuneConfig, tok, step: int, out: Path) -> dict:
    """--score_every_eval: the weights as they are now (saved to out/scoring/), rated by score.py in a
    fresh process (its command line is the interface, so the scoring code lives in one place)."""
    d = out / "scoring"
    cmd = [sys.executable, str(Path(__file__).with_name("score.py")), "--init_from", str(d), "--base", c.init_from,
           "--task", c.task, "--reward_model", c.reward_model, "--judge_model", c.judge_model,
           "--max_new_tokens", str(c.max_new_tokens), "--device", pick_device(c.device)]
    for name, value in (("--tokenizer", c.tokenizer), ("--judge_url", c.judge_url), ("--prompts", c.prompts)):
        cmd += [name, value] if value else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"score.py failed at step {step}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    row = json.loads((d / "scores.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in row.items() if k.endswith(("_mean", "_stderr"))}


def finetune(c: FinetuneConfig) -> dict:
    device = pick_device(c.device)
    device_type = device.split(":")[0]
    precision = pick_precision(c.precision, device)
    rank, _, world = init_distributed(device)  # torchrun: one process per device; plain python: 1 of 1
    master = rank == 0  # only rank 0 prints, logs and writes files

    def say(*a):
        if master:
            print(*a, flush=True)

    torch.manual_seed(c.seed)
    out = open_run(c.out_dir, resume=c.resume, overwrite=c.overwrite) if master else Path(c.out_dir)
    lora, classify = c.lora_rank > 0, c.task == "classify"
    lr = c.lr or (3e-4 if lora else 1e-5)
    # the model before its tokenizer: a wrong --init_from is then the error, not a tokenizer it lacks
    gpt = load_base(c.init_from, precision, lora, c.quantize, device, c.fsdp)
    tok = load_tokenizer(c.tokenizer, c.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    if tok.n_vocab > gpt.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model only {gpt.config.vocab_size}")
    train_t, val_t, test_t, test_ex = load_data(c, tok, gpt.config.block_size)
    autocast, scaler = autocast_and_scaler(precision, device_type)
    gen_ex = [] if classify else test_ex[: c.n_generate]
    before, before_eos = generate_responses(gpt, tok, gen_ex, tok.eot_id, c.max_new_tokens, autocast)

    def build(g: GPT):  # the model to train around a GPT (also around an empty one, to gather FSDP shards into)
        prepare_model(g, c)
        return Classifier(g, c.num_classes) if classify else g  # the head is made after LoRA froze the body

    model = build(gpt)
    gpt.grad_checkpointing = c.grad_checkpointing  # non-reentrant: works with frozen embeddings + LoRA
    model.train()
    say(trainable_report(model))
    tokens = c.batch_size * max(len(t["input_ids"]) for t in train_t)
    say(format_memory(estimate_memory(gpt, precision, c.optimizer, c.grad_checkpointing, tokens), tokens)
        + " (longest micro-batch, one device)")
    train_module = distribute(model, device, c.fsdp, precision, block_type=Block)  # DDP wraps `model`; FSDP shards it in place
    seed_everything(c.seed + rank)  # the same init on every rank above; from here each rank its own dropout
    optimizer = make_optimizer(model, c.optimizer, lr, c.weight_decay, fused=device_type == "cuda",
                               matrix_lr=c.matrix_lr)
    total_steps = c.max_steps or c.epochs * math.ceil(len(train_t) / (c.batch_size * c.grad_accum * world))
    warmup = c.warmup_steps if c.warmup_steps >= 0 else int(0.05 * total_steps)
    say(f"precision {precision}, {c.optimizer} lr {lr:g}, {total_steps} steps of {c.batch_size} x {c.grad_accum} x "
        f"{world} rank(s) = {c.batch_size * c.grad_accum * world} examples on {device}"
        + (" (FSDP)" if c.fsdp and world > 1 else " (DDP)" if world > 1 else ""))

    # the run exists from here on (a run that failed while loading leaves nothing behind)
    if master:
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(asdict(c), indent=2)))
    rng, order, log = random.Random(c.seed), [], []  # the same order on every rank: each takes its share
    best_dir = out / ("best_adapter" if lora else "best_model")
    best_val, best_step, bad_evals, best_state = float("inf"), -1, 0, None
    evaluated = -1  # the last step evaluated: a resumed run must not evaluate (and count) that step again
    n_real_tokens, train_time, step = 0, 0.0, 0
    if c.resume:  # the weights, optimizer, data order, RNG and best-so-far of the last saved step
        step, extra = load_train_state(out, model, optimizer)
        rng.setstate(extra["shuffle"])
        order, n_real_tokens, train_time = extra["order"], extra["tokens"], extra["seconds"]
        best_val, best_step, bad_evals, best_state = extra["best"] + [extra["best_state"]]
        evaluated = step if extra.get("evaluated") else -1
        set_rng_state(extra["rng"][rank if len(extra["rng"]) == world else 0], device)
        if master:  # what the killed run logged after that step is about to be redone
            log = rewrite_log(out / "log.jsonl", lambda r: r["step"] <= step if "loss" in r or evaluated == step
                              else r["step"] < step)
        say(f"resuming at step {step}")
    log_f = open(out / "log.jsonl", "a") if master else None

    def save_state():
        extra = dict(shuffle=rng.getstate(), order=order, tokens=n_real_tokens, seconds=train_time,
                     best=[best_val, best_step, bad_evals], best_state=best_state, rng=all_ranks(rng_state(device)),
                     evaluated=evaluated == step)
        save_train_state(out, model, optimizer, step, extra, master)
        say(f"resumable state: step {step} in {out / 'ckpt'}")

    def record(row):
        if master:
            log.append(row)
            log_f.write(json.dumps(row) + "\n")
            log_f.flush()

    def next_example():
        nonlocal order
        if not order:
            order = list(range(len(train_t)))
            rng.shuffle(order)
        return train_t[order.pop()]

    def save(where: Path, merged: bool = False):
        """LoRA: the PEFT adapter (merged: the model, W + scaling B A); full: the model; classify: also
        the head. Under FSDP every rank gathers, rank 0 writes."""
        m = gathered(model, lambda: build(GPT(gpt.config)), master)
        if m is None:
            return
        g = m.gpt if classify else m
        if lora and merged:
            unload_lora(g, merge=True)  # W + (alpha/r) B A, in fp32: a plain model again
        save_adapter(g, where, c.init_from) if lora and not merged else g.save_pretrained(where, "native", tok.source)
        if classify:
            head = {k: v.detach().contiguous().cpu() for k, v in m.head.state_dict().items()}
            save_safetensors(head, where / "classifier_head.safetensors")

    # every rank evaluates (the whole set: under FSDP each forward needs every rank) and takes part in
    # each step with its share of the global batch; rank 0 records
    stop = GracefulStop()  # Ctrl-C / SIGTERM: the state at the next step boundary, then exit
    while True:
        if (step % c.eval_interval == 0 or step == total_steps) and evaluated != step:
            evaluated = step
            val = evaluate(model, val_t, c.batch_size, device, autocast, tok.eot_id) if val_t else float("nan")
            check_finite(step, val_loss=val if val_t else None)  # a NaN is never a score, nor the best
            row = dict(step=step, val_loss=val, val_ppl=math.exp(min(val, 50)))
            if classify:
                for name, xs in (("val", val_t), ("test", test_t)):
                    if xs:
                        m = classification_metrics(model, xs, c.batch_size, device, tok.eot_id, c.num_classes, autocast)
                        row.update({f"{name}_{k}": v for k, v in m.items()})
            if c.score_every_eval:
                save(out / "scoring")
                if master:
                    row.update(score_answers(c, tok, step, out))
            record(row)
            say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
            if val < best_val or not val_t:  # without a val set, the latest weights are kept
                best_val, best_step, bad_evals = val, step, 0
                if lora:  # small: kept in memory too (a full model's best is read back from disk)
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                save(best_dir)
            else:
                bad_evals += 1
                if c.patience and bad_evals >= c.patience:
                    say(f"early stop: no better val loss in {bad_evals} evaluations")
                    break
        if step == total_steps:
            break
        t0 = time.perf_counter()
        picked = [[next_example() for _ in range(c.batch_size)] for _ in range(c.grad_accum * world)]
        mine = picked[rank * c.grad_accum:(rank + 1) * c.grad_accum]
        n_trained = sum(lab != -100 for b in picked for e in b for lab in e["labels"])  # over every rank's share
        n_real_tokens += sum(len(e["input_ids"]) for b in picked for e in b)  # padding not counted
        scale = lr_schedule(step, total_steps, warmup, c.min_lr / lr)
        for g in optimizer.param_groups:  # Muon's matrices on the same schedule, scaled to their own peak
            g["lr"] = scale * (c.matrix_lr if g.get("muon") else lr)
        this_lr = scale * lr
        r = train_step(train_module, optimizer, [collate(b, tok.eot_id, device) for b in mine], scaler, autocast,
                       c.grad_clip, n_trained)
        train_time += time.perf_counter() - t0
        step += 1
        check_finite(step, scaler, loss=r["loss"], grad_norm=r["grad_norm"])
        record(dict(step=step, loss=r["loss"], lr=this_lr, n_tokens=r["n_tokens"], grad_norm=r["grad_norm"]))
        if step % c.log_interval == 0 or step == 1:
            say(f"step {step}/{total_steps}: loss {r['loss']:.4f}, lr {this_lr:.2e}")
        if c.save_interval and step % c.save_interval == 0:
            save(out / f"ckpt_step{step}")
        if c.ckpt_interval and step % c.ckpt_interval == 0 and step < total_steps:
            save_state()
        if step == c.stop_at_step:
            say(f"stopping at step {step} (--stop_at_step), as if killed")
            end_distributed()
            return dict(log=log)
        if stop.requested(device) and step < total_steps:
            save_state()
            if master:
                log_f.close()
                close_run(out)
            stop.exit(step, out / "ckpt")
    stop.restore()
    if log_f:
        log_f.close()
    save_state()  # the end, too: --resume with a larger --max_steps continues from here

    # the best weights back in the model; responses after tuning; the merged model; plot and summary
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    elif 0 <= best_step != step:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        best = {k: v for k, v in load_file(str(best_dir / "model.safetensors")).items()}
        if classify:
            best = {f"gpt.{k}": v for k, v in best.items()}
            best.update({f"head.{k}": v for k, v in load_file(str(best_dir / "classifier_head.safetensors")).items()})
        set_model_state_dict(model, best, options=StateDictOptions(full_state_dict=True, strict=False))
    summary = dict(best_step=best_step, val_loss=best_val, val_ppl=math.exp(min(best_val, 50)),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if test_t and not classify:
        summary["test_loss"] = evaluate(model, test_t, c.batch_size, device, autocast, tok.eot_id)
        summary["test_ppl"] = math.exp(min(summary["test_loss"], 50))
    elif test_t:
        summary.update({f"test_{k}": v for k, v in classification_metrics(
            model, test_t, c.batch_size, device, tok.eot_id, c.num_classes, autocast).items()})
    after, after_eos = generate_responses(gpt, tok, gen_ex, tok.eot_id, c.max_new_tokens, autocast)
    if gen_ex and master:
        write_responses(out, c, gen_ex, before, after, best_step)
    # before -> after, under the same names, so that a script can compare runs: the held-out answers'
    # metrics (instruction, dialogue) or the test accuracy (classify; "before" is the untrained head's)
    first = next((r for r in log if "val_loss" in r), {})
    summary["before"], summary["after"] = {"val_loss": first.get("val_loss")}, {"val_loss": best_val}
    if gen_ex:
        summary["before"].update(answer_metrics(before, before_eos, gen_ex))
        summary["after"].update(answer_metrics(after, after_eos, gen_ex))
    if classify and "test_accuracy" in first:
        summary["before"]["test_accuracy"], summary["after"]["test_accuracy"] = first["test_accuracy"], summary[
            "test_accuracy"]
    if lora and not classify and c.save_merged and best_state is not None:
        try:
            save(out / "best_model", merged=True)
        except ValueError as e:  # e.g. a LoRA on a tied lm_head cannot be merged
            say(f"merged model not written: {e}")
    tps = n_real_tokens / train_time if train_time else float("nan")
    if master:
        panels = [["loss", "val_loss"]] + [[k for k in ("val_accuracy", "test_accuracy", "reward_mean", "judge_mean")
                                            if any(k in r for r in log)]]
        plot_log(log, out / "loss.png", [p for p in panels if p])
        summary.update(peak_memory_mb=peak_memory_mb(device), seconds=train_time, tokens_per_s=tps)
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
        close_run(out)
    say(f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f}) at step {best_step}; "
        f"peak memory {peak_memory_mb(device) / 1024:.2f} GiB "
        f"({'max allocated' if device_type == 'cuda' else 'process peak RSS'}){' on rank 0' if world > 1 else ''}; "
        f"{tps:.0f} tokens/s (non-padding, training steps only)")
    if gen_ex:
        say(f"a held-out answer: {gen_ex[0]['instruction']!r} -> before {before[0]!r}, after {after[0]!r} "
            f"(reference {gen_ex[0]['output']!r})")
    say(before_after(summary, f"{len(gen_ex)} held-out answers" if gen_ex else f"{len(test_t)} test examples"))
    written = ("summary.json", "log.jsonl", "loss.png", "responses.md", "best_adapter", "best_model", "ckpt")
    say("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    end_distributed()
    return dict(summary, best_val=best_val, log=log, model=model)


def write_responses(out: Path, c: FinetuneConfig, examples, before, after, best_step: int):
    rows = [dict(ex, response_before=b, response_after=a) for ex, b, a in zip(examples, before, after)]
    write_jsonl(out / "responses.jsonl", rows)
    md = [f"# Responses before and after tuning ({c.init_from}, best step {best_step})\n"]
    for i, r in enumerate(rows):
        md.append(f"## {i + 1}. {r['instruction']}\n")
        if r["input"]:
            md.append(f"**Input:** {r['input']}\n")
        md += [f"**Reference:** {r['output']}\n", f"**Before:** {r['response_before']}\n",
               f"**After:** {r['response_after']}\n"]
    atomic_write(out / "responses.md", lambda p: Path(p).write_text("\n".join(md)))


def main(argv=None):
    return finetune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
