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
    python finetune.py --init_from gpt2 --data_file alpaca.json --max_examples 200 --max_response_chars 512
    python finetune.py --init_from gpt2-medium --task dialogue --batch_size 1 --grad_accum 8     # HH-RLHF
    python finetune.py --task classify --dataset sst2 --num_classes 2 --lora_rank 16           # sentiment
    python finetune.py --init_from Qwen/Qwen2.5-0.5B-Instruct --data_file alpaca.json --template chat  # its template
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
  3. Weighting and measuring: each micro-batch's loss weighted by its trained tokens, evaluation,
     and the memory estimate printed at the start.
  4. The model: LoRA or full fine-tuning; for classification, a head on the last real token.
  5. The run: the set-up, then one loop for every task that writes its optimizer step out
     (accumulation, clipping, the schedule), with evaluation, early stopping, the best checkpoint
     and responses before and after tuning.

out_dir gets: config.json, log.jsonl (one JSON object per optimizer step: step, loss, lr, ms, ...; one
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bpe import (TEMPLATE_CHOICES, TEMPLATE_HELP, dialogue_messages, instruction_messages, load_tokenizer,
                 pick_template, reply_stops)
from housekeeping import (DEVICE_HELP, GracefulStop, RunLog, StepClock, all_ranks, atomic_write, auto_init_from,
                          autocast_and_scaler, before_after, check_finite, check_weight, close_run, distribute,
                          end_distributed, finite_figures, fit_to_context, fits_in_memory, flag, gathered, grad_sync,
                          init_distributed, load_train_state, open_run, parse_config, peak_memory_mb, pick_device,
                          pick_precision, plot_log, resolve_init_from, resolve_warmup, resumed_config, rewrite_log,
                          rng_state, run_main, save_safetensors, save_train_state, seed_everything, set_rng_state,
                          write_jsonl, write_run_config)
from lora import NF4_SLICE, LoRALinear, NF4Linear, apply_lora, load_base, save_adapter, trainable_report, unload_lora
from model import GPT, OPTIMIZER_STATES, Block, RMSNorm, lr_schedule, make_optimizer
from prepare_data import (builtin_tasks, exact_match, format_prompt, load_alpaca, load_classification, load_dialogues,
                          parse_dialogue)

TASKS = ("instruction", "dialogue", "classify")

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class FinetuneConfig:
    # model and data
    init_from: str = flag("auto", "gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF model dir (gpt2 or llama), or our "
                                 "checkpoint dir; auto: train_gpt2.py's CPU model (out/cpu/model, else "
                                 "out/cpu/ckpt/model) if there is one (then, with no data flag, on the built-in task "
                                 "set: the offline life cycle), else gpt2 where the hub or its cache has it, else an "
                                 "error naming the stage to run first")
    tokenizer: str | None = flag(None, "tokenizer spec for bpe.load_tokenizer (default: the model dir's own, "
                                      "else GPT-2's)")
    task: str = flag("instruction", "instruction: Alpaca records; dialogue: HH-RLHF conversations, loss on the "
                                   "assistant turns; classify: a class per text, a linear head on the last token "
                                   "replacing the LM head", choices=TASKS)
    data_file: str | None = flag(None, "instruction: Alpaca .json (a list) or .jsonl with instruction/input/output; "
                                      "dialogue: .jsonl with `chosen` conversations; classify: .jsonl/.csv with text, "
                                      "text_pair?, label; default: the task's built-in set (offline) when --init_from "
                                      "auto finds train_gpt2.py's CPU model, else from the hub tatsu-lab/alpaca, "
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
    max_examples: int = flag(0, "use only the first N examples after filtering (0 = all)", min=0,
                             aliases=("--n_samples",))
    max_response_chars: int = flag(0, "drop examples whose output is longer than this (0 = keep all)", min=0)
    test_file: str | None = flag(None, "held-out records (the --data_file format) to answer before and after tuning "
                                      "and for the test metrics, instead of a --test_frac split of the data")
    val_frac: float = flag(0.05, "fraction of examples for validation", min=0.0, max=0.9)
    test_frac: float = flag(0.10, "fraction held out for generation (classify: for test metrics)", min=0.0, max=0.9)
    max_length: int = flag(0, "longest training sequence in tokens (0 = the model's block_size); longer examples "
                             "are truncated from the end of the response", min=0)
    mask_prompt: bool = flag(True, "loss only on response tokens + EOS (--no-mask_prompt: on every token)")
    template: str = flag("auto", TEMPLATE_HELP + " (ours: --task's format; chat: the loss on the assistant turns, "
                                 "each up to its end-of-turn token)", choices=TEMPLATE_CHOICES)
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
    min_lr_ratio: float = flag(0.0, "the cosine decay ends at lr * min_lr_ratio (matrix_lr * min_lr_ratio)",
                               min=0.0, max=1.0)
    warmup_steps: int = flag(-1, "steps of linear warmup (-1 = 5% of the steps; more than half the run is cut to a "
                                 "tenth of it)", min=-1)
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
    num_samples: int = flag(20, "test prompts to answer before and after tuning", min=0, aliases=("--n_generate",))
    max_new_tokens: int = flag(128, "longest generated response", min=1)
    log_interval: int = flag(10, "print the training loss every N steps", min=1)
    # answers scored at every evaluation, by score.py in a fresh process
    score_every_eval: bool = flag(False, "rate answers to score.py's prompt set at every evaluation (reward_mean / "
                                        "judge_mean in the log and the plot); needs --reward_model or --judge_url")
    reward_model: str = flag("none", "--score_every_eval: HF reward model (hub id or dir), or none")
    judge_url: str | None = flag(None, "--score_every_eval: OpenAI-compatible API base URL of an LLM judge")
    judge_model: str = flag("gpt-4o-mini", "--score_every_eval: the judge's model name")
    prompts: str | None = flag(None, "--score_every_eval: the prompt set (default: score.py's built-in one)")


# what a resumed run may not change: the model, what is trained, the optimizer, the data and its split
FIXED = ("init_from", "tokenizer", "task", "template", "num_classes", "lora_rank", "lora_alpha", "lora_targets",
         "rslora", "train_last_n_blocks", "optimizer", "quantize", "data_file", "dataset", "test_file", "val_frac",
         "test_frac", "seed")


# what `python train_gpt2.py` leaves on a laptop: its final model (model/), or, from an older run, the
# checkpoint's (ckpt/model/)
PRETRAINED = ("out/cpu/model", "out/cpu/ckpt/model")
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
              eval_interval=600, num_samples=200, max_new_tokens=24)


def parse_args(argv=None) -> FinetuneConfig:
    cfg, given = parse_config(FinetuneConfig, argv, __doc__.split("\n\n")[0].strip(),
                              alt_defaults={"offline life cycle": LAPTOP})
    if cfg.resume:
        cfg = resumed_config(FinetuneConfig, cfg, given, cfg.out_dir, FIXED)
    if cfg.val_frac + cfg.test_frac >= 1:
        raise ValueError(f"--val_frac {cfg.val_frac} + --test_frac {cfg.test_frac} must be below 1")
    if cfg.template == "chat" and cfg.task == "classify":
        raise ValueError("--template chat formats prompts and answers: not with --task classify")
    if cfg.score_every_eval and cfg.task == "classify":
        raise ValueError("--score_every_eval rates generated answers: not with --task classify")
    if cfg.score_every_eval and cfg.reward_model == "none" and not cfg.judge_url:
        raise ValueError("--score_every_eval needs --reward_model or --judge_url")
    # sizes beyond the machine fail here, before a file is written: a step's token ids (input and label,
    # 8 bytes each, one token an example at least), an answer, LoRA's A and B and the head (at width 1)
    for need, what in ((16 * cfg.batch_size * cfg.grad_accum,
                        f"--batch_size {cfg.batch_size} x --grad_accum {cfg.grad_accum}"),
                       (8 * cfg.max_new_tokens, f"--max_new_tokens {cfg.max_new_tokens}"),
                       (8 * cfg.lora_rank, f"--lora_rank {cfg.lora_rank}"),
                       (4 * cfg.num_classes, f"--num_classes {cfg.num_classes}")):
        fits_in_memory(need, what)
    if cfg.init_from == "auto":
        # train_gpt2.py's model on this machine, else GPT-2 (cached, or a reachable hub), else one error line
        # naming the stage to run first
        cfg.init_from = auto_init_from(PRETRAINED, "python train_gpt2.py")
        if cfg.init_from in PRETRAINED and cfg.data_file is None and cfg.dataset is None:
            cfg.data_file = str(builtin_tasks()[BUILTIN[cfg.task]])
            for k, v in LAPTOP.items():
                setattr(cfg, k, given.get(k, v))
            if cfg.lora_rank and "optimizer" not in given:  # LoRA's thin A and B: AdamW (Muon is for whole matrices)
                cfg.optimizer = "adamw"
            # the laptop run's budget is its examples, as train_gpt2.py's is its tokens: a bigger step
            # (--grad_accum 8, --batch_size 64) takes as many more examples, so the run takes fewer steps
            # (and evaluates as often per example): the same work, not 8 times it
            budget = LAPTOP["batch_size"] * LAPTOP["grad_accum"] * LAPTOP["max_steps"]
            per_step = cfg.batch_size * cfg.grad_accum
            if "max_steps" not in given and per_step != LAPTOP["batch_size"] * LAPTOP["grad_accum"]:
                cfg.max_steps = max(1, budget // per_step)
                if "eval_interval" not in given:
                    cfg.eval_interval = max(1, cfg.max_steps * LAPTOP["eval_interval"] // LAPTOP["max_steps"])
                print(f"note: {per_step} examples a step (--batch_size {cfg.batch_size} x --grad_accum "
                      f"{cfg.grad_accum}): the laptop run keeps its {budget:,} examples in {cfg.max_steps} steps "
                      f"(--max_steps sets it)")
            if cfg.task == "instruction":  # the answers before and after: questions about held-out modules
                cfg.test_file = cfg.test_file or str(builtin_tasks()["instructions_test"])
            print(f"offline default: {cfg.init_from} (from train_gpt2.py) on the built-in {cfg.task} set "
                  f"{cfg.data_file}; the real recipe names them: --init_from gpt2 (Alpaca, HH-RLHF or GLUE from "
                  f"the hub)")
    cfg.init_from = resolve_init_from(cfg.init_from)  # a run directory: its best or final model
    return cfg


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
    test = [examples[i] for i in order[:n_test]]
    val = [examples[i] for i in order[n_test:n_test + n_val]]
    train = [examples[i] for i in order[n_test + n_val:]]
    return train, val, test


def tokenize_example(example: dict, tok, eos_id: int, max_length: int, mask_prompt: bool = True,
                     chat_template=None) -> dict:
    """Token ids of prompt + response + EOS as (input_ids, labels) shifted by one for next-token
    prediction; labels are -100 where the next token is part of the prompt (when mask_prompt), so
    the model learns to answer, not to reproduce instructions. Prompt and response are tokenized
    separately so the boundary is exact (no BPE token straddles it). Sequences longer than
    max_length + 1 are cut from the end of the response (the EOS goes first). With the model's chat template
    (`chat_template`, a bpe.ChatTemplate): tokenize_chat."""
    if chat_template is not None:
        return tokenize_chat(chat_messages(example), chat_template, max_length, mask_prompt)
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


def chat_messages(example: dict) -> list[dict]:
    """An example as a chat (role/content messages): a dialogue's turns, or an Alpaca record's question and answer."""
    if "text" in example:
        return dialogue_messages(parse_dialogue(example["text"]))
    return [*instruction_messages(example), {"role": "assistant", "content": example["output"]}]


def tokenize_chat(messages: list[dict], chat_template, max_length: int, mask_prompt: bool = True) -> dict:
    """A conversation in the model's own chat template, as (input_ids, labels): the template renders it, and
    with mask_prompt only the assistant turns' tokens (each up to its end-of-turn token, which teaches the
    model where its turn ends) are trained (bpe.ChatTemplate.conversation). Cut from the end, as above."""
    ids, train = chat_template.conversation(messages)
    if not mask_prompt:
        train = [True] * len(ids)
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
                      name: str = "train", task: str = "instruction", chat_template=None) -> list[dict]:
    """Tokenize every example. Truncations are counted and printed; an example whose response was
    cut off entirely (the prompt alone fills the context) would train on nothing, so it is left out
    and reported, never dropped silently."""
    out, n_truncated, empty = [], 0, []
    for i, ex in enumerate(examples):
        t = (tokenize_classification(ex, tok, eos_id, max_length) if task == "classify" else
             tokenize_example(ex, tok, eos_id, max_length, mask_prompt, chat_template))
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
# 3. Weighting and measuring: the token-weighted loss, evaluation, the memory estimate


def token_weighted(loss, n_trained, n_total):
    """One micro-batch's mean loss over its own n_trained tokens, as its share of the mean over the n_total
    trained tokens of the whole optimizer step: loss * n_trained / n_total (the loop says why). A
    micro-batch without trained tokens has a 0/0 = NaN mean: it contributes exactly nothing (where, not
    nan_to_num: a NaN of a diverged model must stay NaN and stop the run)."""
    return torch.where(n_trained > 0, loss, 0.0) * (n_trained / n_total.clamp(min=1))


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
    loss = (total / n_total.clamp(min=1)).item()
    finite_figures("finetune.py: the held-out examples' loss", {"val_loss": loss})
    return loss


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
    mc, blk = gpt.config, gpt.transformer.h[0]
    C, F = mc.n_embd, mc.ffn_hidden
    n = (mc.n_head * 2 + 2 * mc.n_kv_head) * mc.head_dim
    n += C * (_trains(blk.attn.c_attn) + _trains(blk.mlp.c_fc))
    n += (3 * F if mc.mlp == "swiglu" else F) + F * _trains(blk.mlp.c_proj)
    n += sum(m.lora_A.shape[0] for m in blk.modules() if isinstance(m, LoRALinear))
    norms = norm_values(blk.ln_1, C) + norm_values(blk.ln_2, C)
    if mc.qk_norm_learned:  # Qwen3's RMSNorm on each head's q and k: its input (and normalised copy), in fp32
        norms += norm_values(blk.attn.q_norm, mc.n_head * mc.head_dim) + norm_values(blk.attn.k_norm,
                                                                                      mc.n_kv_head * mc.head_dim)
    return n * ab + norms * 4


def norm_values(norm, width: int) -> int:
    """Values a norm keeps for backward per token: its input; an RMSNorm whose gain learns also its
    normalised input."""
    if isinstance(norm, RMSNorm) and norm.weight.requires_grad:
        return 2 * width
    return width


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
    mc = gpt.config
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
    top = mc.n_embd * 4 + (mc.n_embd * _trains(gpt.lm_head) + mc.padded_vocab_size) * ab
    # checkpointing keeps each block's input (the residual stream, in the embeddings' dtype); one block's
    # activations exist again while it is recomputed, in backward, when the logits are gone already
    residual = gpt.transformer.wte.weight.element_size()
    if grad_checkpointing:
        kept = mc.n_layer * mc.n_embd * residual + max(top, per_block)
    else:
        kept = mc.n_layer * per_block + top
    # autocast's 16-bit copies of the fp32 weights that train: cached until the forward ends, and kept
    # for backward too (so: activations) unless checkpointing discards what the forward saved
    copies = 0
    if ab == 2 and trainable and shards == 1 and not any(isinstance(m, LoRALinear) for m in model.modules()):
        copies = sum(p.numel() for p in trainable if p.dim() == 2) * 2
    acts = tokens * kept + (0 if grad_checkpointing else copies)
    logits_grad = tokens * mc.padded_vocab_size * ab
    head_grad = head.numel() * 4 if head.requires_grad else 0
    tied = 2 * head.numel() * 4 if mc.tie_embeddings and head.requires_grad else 0
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


def gib(n_bytes) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def format_memory(est: dict, tokens: int) -> str:
    copies = f", autocast's weight copies {gib(est['autocast_copies'])}" if est["autocast_copies"] else ""
    return (f"memory estimate: weights {gib(est['weights'])}, gradients {gib(est['gradients'])}, optimizer states "
            f"{gib(est['optimizer'])}, activations {est['activations_per_token'] / 2**10:.0f} KiB/token x {tokens} "
            f"tokens{copies}; peak ~{gib(est['peak'])}")


# -----------------------------------------------------------------------------------------------
# 4. The model: LoRA or full fine-tuning; a classification head


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
    for k in range(num_classes):
        tp = sum(p == k and g == k for p, g in zip(pred, gold))
        fp = sum(p == k and g != k for p, g in zip(pred, gold))
        fn = sum(p != k and g == k for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return dict(accuracy=sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold)), macro_f1=sum(f1s) / num_classes)


@torch.no_grad()
def generate_responses(model, tok, examples: list[dict], eos_id: int, max_new_tokens: int,
                       autocast=contextlib.nullcontext, batch_size: int = 8,
                       chat_template=None) -> tuple[list[str], list[bool]]:
    """Greedy responses to the prompts of examples (stopping at EOS), and whether each ended with the
    EOS (rather than at the length limit). A progress line every 10 s: on a CPU this takes a while.
    With the model's chat template (`chat_template`): the prompt is the chat up to the last answer, rendered with the
    assistant's header, and a response ends at the template's end-of-turn token (or the EOS)."""
    stops = [eos_id] if chat_template is None else reply_stops(tok, chat_template)  # end of turn, and the EOS
    out, ended, shown = [], [], time.time()
    for i in range(0, len(examples), batch_size):
        if time.time() - shown > 10:
            print(f"generating: {i}/{len(examples)} answers", flush=True)
            shown = time.time()
        batch = [example_prompt_ids(e, tok, chat_template) for e in examples[i:i + batch_size]]
        prompts, n_new = fit_to_context(batch, max_new_tokens, model.config.block_size)
        with autocast():
            seqs = model.generate(prompts, n_new, temperature=0, eos_token_id=stops).tolist()
        T = max(len(p) for p in prompts)
        for row in seqs:
            new = row[T:]
            end = next((k for k, t in enumerate(new) if t in stops), len(new))  # the stop token is not shown
            out.append(tok.decode(new[:end]).strip())
            ended.append(end < len(new))
    return out, ended


def example_prompt_ids(example: dict, tok, chat_template=None) -> list[int]:
    """The tokens a response is generated from: the example's prompt in our format, or in the model's chat
    template the chat up to its last answer, with the assistant's header."""
    if chat_template is None:
        return tok.encode(format_prompt(example))
    messages = chat_messages(example)
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return chat_template.prompt_ids(messages[:last])


def answer_metrics(answers: list[str], ended: list[bool], examples: list[dict]) -> dict:
    """exact_match: the share of answers equal to the reference (the built-in tasks' check);
    eos_rate: the share that ended with the end-of-text token before the length limit (a tuned model
    knows when its answer is complete)."""
    return dict(exact_match=exact_match(answers, [e["output"] for e in examples]),
                eos_rate=sum(ended) / max(len(ended), 1))


# -----------------------------------------------------------------------------------------------
# 5. The run


def load_data(cfg: FinetuneConfig, tok, block_size: int, chat_template=None):
    """(train, val, test) tokenized examples and the raw test examples (prompts for generation); chat: the
    model's chat template, where --template chooses it."""
    if cfg.task == "classify":
        examples = load_classification(cfg.data_file, cfg.dataset, cfg.num_classes, cfg.max_examples, cfg.balance,
                                       cfg.seed)
    elif cfg.task == "dialogue":
        examples = load_dialogues(cfg.data_file, cfg.max_examples)
    else:
        examples = load_alpaca(cfg.data_file, cfg.max_response_chars, cfg.max_examples)
    train_ex, val_ex, test_ex = split_examples(examples, cfg.val_frac, 0 if cfg.test_file else cfg.test_frac, cfg.seed)
    # a --test_file is disjoint from the training data by construction (the built-in tasks: other modules)
    if cfg.test_file and cfg.task == "classify":
        test_ex = load_classification(cfg.test_file, None, cfg.num_classes)
    elif cfg.test_file and cfg.task == "dialogue":
        test_ex = load_dialogues(cfg.test_file)
    elif cfg.test_file:
        test_ex = load_alpaca(cfg.test_file)
    max_length = min(cfg.max_length or block_size, block_size)
    fmt = (tok, tok.eot_id, max_length, cfg.mask_prompt)  # every split is tokenized alike
    train_t = tokenize_examples(train_ex, *fmt, "train", cfg.task, chat_template)
    val_t = tokenize_examples(val_ex, *fmt, "val", cfg.task, chat_template)
    test_t = tokenize_examples(test_ex, *fmt, "test", cfg.task, chat_template)
    if not train_t:
        raise ValueError("no training examples left after tokenization")
    print(f"{len(examples)} examples: {len(train_t)} train, {len(val_t)} val, {len(test_ex)} test")
    if cfg.task == "classify":
        counts = [sum(e["label"] == k for e in train_ex) for k in range(cfg.num_classes)]
        print(f"train classes {counts}; majority-class accuracy {max(counts) / len(train_ex):.3f}")
    return train_t, val_t[: cfg.eval_examples or None], test_t, test_ex


def score_answers(cfg: FinetuneConfig, tok, step: int, out: Path) -> dict:
    """--score_every_eval: the weights as they are now (saved to out/scoring/), rated by score.py in a
    fresh process (its command line is the interface, so the scoring code lives in one place)."""
    d = out / "scoring"
    cmd = [sys.executable, str(Path(__file__).with_name("score.py")), "--init_from", str(d), "--base", cfg.init_from,
           "--task", cfg.task, "--template", cfg.template, "--reward_model", cfg.reward_model,
           "--judge_model", cfg.judge_model, "--max_new_tokens", str(cfg.max_new_tokens),
           "--device", pick_device(cfg.device)]
    for name, value in (("--tokenizer", cfg.tokenizer), ("--judge_url", cfg.judge_url), ("--prompts", cfg.prompts)):
        cmd += [name, value] if value else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"score.py failed at step {step}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    row = json.loads((d / "scores.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in row.items() if k.endswith(("_mean", "_stderr"))}


class DataOrder:
    """Which training example comes next: each one once per pass over the set, in a fresh seeded shuffle
    every pass. Every rank holds the same order and takes its own share of each step. The shuffle's
    RNG and what is left of this pass go into the resumable state: a resumed run sees the same examples."""

    def __init__(self, n_examples: int, seed: int):
        self.n_examples = n_examples
        self.rng = random.Random(seed)
        self.left = []  # this pass's indices still to come, taken from the end

    def next(self) -> int:
        if not self.left:
            self.left = list(range(self.n_examples))
            self.rng.shuffle(self.left)
        return self.left.pop()


def build_model(gpt: GPT, cfg: FinetuneConfig) -> torch.nn.Module:
    """The model to train around a GPT: LoRA or full fine-tuning (prepare_model), and for classify a head
    on top, made after LoRA froze the body (so the head trains). Also builds the empty copy that FSDP's
    shards are gathered into to be saved."""
    prepare_model(gpt, cfg)
    if cfg.task == "classify":
        return Classifier(gpt, cfg.num_classes)
    return gpt


def save_weights(model, where: Path, cfg: FinetuneConfig, tok, master: bool, merged: bool = False):
    """The weights as the next stage loads them:
    - LoRA: the PEFT adapter; merged: the model with W + scaling B A (a plain model again);
    - full fine-tuning: the model;
    - classify: also the head, beside them (classifier_head.safetensors).
    Under FSDP every rank helps gather the shards; rank 0 writes."""
    m = gathered(model, lambda: build_model(GPT(model.config), cfg), master)
    if m is None:  # FSDP, a rank other than 0: its part is done
        return
    classify = cfg.task == "classify"
    gpt = m.gpt if classify else m
    lora = cfg.lora_rank > 0
    if lora and merged:
        unload_lora(gpt, merge=True)  # W + (alpha/r) B A, in fp32
    if lora and not merged:
        save_adapter(gpt, where, cfg.init_from)
    else:
        gpt.save_pretrained(where, "native", tok.source)
    if classify:
        head = {k: v.detach().contiguous().cpu() for k, v in m.head.state_dict().items()}
        save_safetensors(head, where / "classifier_head.safetensors")


def load_best_weights(model, best_dir: Path, classify: bool):
    """A full fine-tuning's best weights back from best_model/ (and the head), into every rank's model
    (under FSDP: each rank its shard)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    best = load_file(str(best_dir / "model.safetensors"))
    if classify:
        best = {f"gpt.{k}": v for k, v in best.items()}
        best.update({f"head.{k}": v for k, v in load_file(str(best_dir / "classifier_head.safetensors")).items()})
    for name, t in best.items():  # written by this run, but read back as every weight is read: checked
        check_weight(best_dir / ("classifier_head.safetensors" if name.startswith("head.") else "model.safetensors"),
                     name, t)
    set_model_state_dict(model, best, options=StateDictOptions(full_state_dict=True, strict=False))


def finetune(cfg: FinetuneConfig) -> dict:
    # ---- set-up: the device(s), the model and its tokenizer, the data, the optimizer
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    precision = pick_precision(cfg.precision, device)
    rank, _, world = init_distributed(device)  # torchrun: one process per device; plain python: 1 of 1
    master = rank == 0  # only rank 0 prints, logs and writes files
    torch.manual_seed(cfg.seed)
    out = open_run(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # every rank: rank 0 decides
    lora = cfg.lora_rank > 0
    classify = cfg.task == "classify"
    lr = cfg.lr or (3e-4 if lora else 1e-5)
    # the model before its tokenizer: a wrong --init_from is then the error, not a tokenizer it lacks
    gpt = load_base(cfg.init_from, precision, lora, cfg.quantize, device, cfg.fsdp)
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    if tok.n_vocab > gpt.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model only {gpt.config.vocab_size}")
    # the prompt format: the model's own chat template, or ours (--template; classify formats no prompt)
    chat_template = None if classify else pick_template(cfg.template, tok, cfg.init_from)
    if chat_template is not None and master:
        print(f"prompt format: the model's chat template ({tok.name}); replies end at token {chat_template.stop_ids}")
    train_t, val_t, test_t, test_ex = load_data(cfg, tok, gpt.config.block_size, chat_template)
    autocast, scaler = autocast_and_scaler(precision, device_type)
    gen_ex = [] if classify else test_ex[: cfg.num_samples]  # the held-out answers, before tuning and after
    answers_start = time.perf_counter()  # timed: on a short run, answering can cost more than training
    before, before_eos = generate_responses(gpt, tok, gen_ex, tok.eot_id, cfg.max_new_tokens, autocast,
                                            chat_template=chat_template)
    answers_s = time.perf_counter() - answers_start
    model = build_model(gpt, cfg)
    gpt.grad_checkpointing = cfg.grad_checkpointing  # non-reentrant: works with frozen embeddings + LoRA
    model.train()
    trainable = trainable_report(model)
    tokens = cfg.batch_size * max(len(t["input_ids"]) for t in train_t)  # the longest micro-batch
    memory = format_memory(estimate_memory(gpt, precision, cfg.optimizer, cfg.grad_checkpointing, tokens), tokens)
    train_module = distribute(model, device, cfg.fsdp, precision, block_type=Block)  # DDP wraps; FSDP shards in place
    seed_everything(cfg.seed + rank)  # the same init on every rank above; from here each rank its own dropout
    optimizer = make_optimizer(model, cfg.optimizer, lr, cfg.weight_decay, fused=device_type == "cuda",
                               matrix_lr=cfg.matrix_lr)
    examples_per_step = cfg.batch_size * cfg.grad_accum * world
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(train_t) / examples_per_step)
    warmup, warmup_note = resolve_warmup(cfg.warmup_steps, total_steps)

    # the run exists from here on (a run that failed while loading leaves nothing behind)
    if master:
        write_run_config(out, cfg)  # the flags, and the identity of the starting weights
    order = DataOrder(len(train_t), cfg.seed)
    best_dir = out / ("best_adapter" if lora else "best_model")
    best_val, best_step, bad_evals, best_state = float("inf"), -1, 0, None
    evaluated = -1  # the last step evaluated: a resumed run must not evaluate (and count) that step again
    n_real_tokens, train_time, start_step, rows = 0, 0.0, 0, []
    if cfg.resume:  # the weights, optimizer, data order, RNG and best-so-far of the last saved step
        start_step, extra = load_train_state(out, model, optimizer)
        order.rng.setstate(extra["shuffle"])
        order.left = extra["order"]
        n_real_tokens, train_time = extra["tokens"], extra["seconds"]
        best_val, best_step, bad_evals = extra["best"]
        best_state = extra["best_state"]
        evaluated = start_step if extra.get("evaluated") else -1
        set_rng_state(extra["rng"][rank if len(extra["rng"]) == world else 0], device)
        if master:  # what the killed run logged after that step is redone: its train rows up to that step
            last_eval_kept = start_step if evaluated == start_step else start_step - 1  # and the saved evaluations
            rows = rewrite_log(out / "log.jsonl",
                               lambda row: row["step"] <= (start_step if "loss" in row else last_eval_kept))
    if start_step > total_steps:
        raise ValueError(f"--resume: the run is at step {start_step}, past --max_steps {total_steps}")
    log = RunLog(out, master, rows)  # log.jsonl, and say(): both rank 0 only
    log.say(trainable)
    log.say(memory + " (longest micro-batch, one device)")
    parallel = ""
    if world > 1:
        parallel = " (FSDP)" if cfg.fsdp else " (DDP)"
    mean_length = sum(len(t["input_ids"]) for t in train_t) / len(train_t)
    log.say(f"precision {precision}, {cfg.optimizer} lr {lr:g}, warmup {warmup} steps, on {device}{parallel}")
    log.say(f"the run: {total_steps} steps x {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} rank(s) = "
            f"{total_steps * examples_per_step:,} examples ({total_steps * examples_per_step / len(train_t):.2f} "
            f"passes over {len(train_t):,}), about {total_steps * examples_per_step * mean_length:,.0f} tokens")
    if warmup_note:
        log.say(warmup_note)
    if cfg.resume:
        log.say(f"resuming at step {start_step}")

    # ---- the loop. At the top of iteration `step`, `step` optimizer steps are done. Every rank evaluates
    # (the whole set: under FSDP each forward needs every rank) and takes part in each step with its share
    # of the global batch; rank 0 alone logs and writes.
    clock = StepClock(total_steps)
    stop = GracefulStop()  # Ctrl-C / SIGTERM: the state at the next step boundary, then exit
    for step in range(start_step, total_steps + 1):
        last_step = step == total_steps
        # a Ctrl-C / SIGTERM asked to stop: the state of this step is saved below, then the run exits
        stopping = not last_step and stop.requested(device)
        # evaluate at 0 (the model before tuning), every eval_interval steps and at the end: the val loss
        # decides the best weights and early stopping
        early_stop = False
        if (step % cfg.eval_interval == 0 or last_step) and step != evaluated and not stopping:
            evaluated = step
            val = evaluate(model, val_t, cfg.batch_size, device, autocast, tok.eot_id) if val_t else float("nan")
            row = dict(step=step, val_loss=val, val_ppl=math.exp(min(val, 50)))
            for name, examples in (("val", val_t), ("test", test_t)):
                if classify and examples:
                    metrics = classification_metrics(model, examples, cfg.batch_size, device, tok.eot_id,
                                                      cfg.num_classes, autocast)
                    row.update({f"{name}_{k}": v for k, v in metrics.items()})
            if cfg.score_every_eval:  # answers rated by score.py, from the weights saved to scoring/
                save_weights(model, out / "scoring", cfg, tok, master)
                if master:
                    row.update(score_answers(cfg, tok, step, out))
            log.record(row)
            log.say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
            if val < best_val or not val_t:  # without a val set, the latest weights are kept
                best_val, best_step, bad_evals = val, step, 0
                if lora:  # small: kept in memory too (a full model's best is read back from disk)
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                save_weights(model, best_dir, cfg, tok, master)
            else:
                bad_evals += 1
                early_stop = cfg.patience > 0 and bad_evals >= cfg.patience
                if early_stop:
                    log.say(f"early stop: no better val loss in {bad_evals} evaluations")
        # the resumable state (weights, optimizer, data order, RNG, best so far): every ckpt_interval steps,
        # at the end (--resume with a larger --max_steps continues from there) and before a stop
        periodic = cfg.ckpt_interval and step > start_step and step % cfg.ckpt_interval == 0
        if periodic or last_step or early_stop or stopping:
            extra = dict(shuffle=order.rng.getstate(), order=order.left, tokens=n_real_tokens, seconds=train_time,
                         best=[best_val, best_step, bad_evals], best_state=best_state,
                         rng=all_ranks(rng_state(device)), evaluated=evaluated == step)
            save_train_state(out, model, optimizer, step, extra, master)
            log.say(f"resumable state: step {step} in {out / 'ckpt'}")
        if cfg.save_interval and step > start_step and step % cfg.save_interval == 0:
            save_weights(model, out / f"ckpt_step{step}", cfg, tok, master)  # kept, unlike ckpt/
        if stopping:
            log.close()
            if master:
                close_run(out)
            stop.exit(step, out / "ckpt")
        if step == cfg.stop_at_step and step > start_step:  # for the tests of --resume: as if killed here
            log.say(f"stopping at step {step} (--stop_at_step), as if killed")
            log.close()
            end_distributed()
            return dict(log=log.rows)
        if last_step or early_stop:
            break

        # ---- one optimizer step. The global batch: drawn in the same order on every rank, which each
        # takes its own grad_accum micro-batches of
        t0 = time.perf_counter()
        picked = [[train_t[order.next()] for _ in range(cfg.batch_size)] for _ in range(cfg.grad_accum * world)]
        mine = picked[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
        # N, the tokens this step trains on, over every rank's micro-batches: counted on the host, from the
        # labels, so that no rank waits for the device or for the others to know it
        n_trained = sum(label != -100 for batch in picked for ex in batch for label in ex["labels"])
        n_real_tokens += sum(len(ex["input_ids"]) for batch in picked for ex in batch)  # padding not counted
        n_total = torch.tensor(n_trained, device=device)
        loss_accum = torch.zeros((), device=device)
        for micro, batch in enumerate(mine):
            idx, targets = collate(batch, tok.eot_id, device)
            n = (targets != -100).sum()  # this micro-batch's trained tokens, n_i
            # DDP all-reduces gradients in every backward; during accumulation only the last one's result
            # is needed, so the communication of the others is skipped
            with grad_sync(train_module, micro == len(mine) - 1):
                with autocast():
                    _, loss = train_module(idx, targets)
                # The model returns the mean loss over this micro-batch's own n_i trained tokens. Weighted
                # by n_i / N, the backward passes add up to the gradient of the mean over all N tokens of
                # the step: batch 4 x accumulation 1 and batch 1 x accumulation 4 take the same step, and
                # every response token counts the same (a plain mean of the micro-batches' means would
                # over-weight the tokens of short responses). Under torchrun N counts every rank's tokens,
                # and the loss is multiplied by the number of ranks: DDP and FSDP average the ranks'
                # gradients, and the sum of the shares is wanted.
                loss = token_weighted(loss, n, n_total)
                # backward; fp16's GradScaler multiplies the loss first, so that small gradients do not
                # underflow to zero in 16 bits (unscaled again before clipping)
                if scaler is not None:
                    scaler.scale(loss * world).backward()
                else:
                    (loss * world).backward()
            loss_accum += loss.detach().float()  # a tensor: reading it now would make the host wait
        if world > 1:
            dist.all_reduce(loss_accum)  # each rank holds its share of the mean: the sum is the step's loss
        # the schedule as a multiplier of each group's peak: Muon's matrices have their own (--matrix_lr)
        scale = lr_schedule(step, total_steps, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = scale * (cfg.matrix_lr if group.get("muon") else lr)
        # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
        if scaler is not None:
            scaler.unscale_(optimizer)
        # clip the global norm: a rare batch with a huge gradient (a loss spike) then moves the weights a
        # bounded distance instead of wrecking them; the norm before clipping is what gets logged
        params = [p for p in train_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shard
            norm = norm.full_tensor()
        if scaler is not None:
            scaler.step(optimizer)  # skipped if a gradient overflowed (inf/NaN); the scale then shrinks
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the next step's backward adds into fresh gradients
        # the loss and the norm read from the device once, at the end of the step: the step's time is real
        loss, grad_norm = torch.stack([loss_accum.float(), norm.float()]).tolist()
        seconds = time.perf_counter() - t0
        train_time += seconds
        clock.add(seconds)
        # the row of the step just taken: "after step + 1 optimizer steps"; a NaN stops the run here, before
        # anything of this step is saved
        check_finite(step + 1, scaler, loss=loss, grad_norm=grad_norm)
        log.record(dict(step=step + 1, loss=loss, lr=scale * lr, n_tokens=n_trained, grad_norm=grad_norm,
                        ms=1000 * seconds))
        if (step + 1) % cfg.log_interval == 0 or step == 0:
            log.say(f"step {step + 1}/{total_steps}: loss {loss:.4f}, lr {scale * lr:.2e}, {clock.left(step + 1)}")
        if len(clock.seconds) == 5:  # a few steps timed: what the whole run takes
            log.say(f"the whole run: {clock.estimate()}")
            training_left = clock.per_step() * (total_steps - step - 1)
            # generation goes a token at a time: the slow part of a short run
            if gen_ex and 2 * answers_s > training_left:
                log.say(f"note: answering the {len(gen_ex)} held-out prompts before and after takes about "
                        f"{2 * answers_s:.0f} s, more than the training left ({training_left:.0f} s): "
                        f"--num_samples N makes it smaller")
    stop.restore()
    log.close()

    # ---- the end: the best weights back in the model, the test metrics and the answers after tuning, the
    # merged model, the plot and the summary
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    elif best_step >= 0 and best_step != step:
        load_best_weights(model, best_dir, classify)
    summary = dict(best_step=best_step, val_loss=best_val, val_ppl=math.exp(min(best_val, 50)),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if test_t and not classify:
        summary["test_loss"] = evaluate(model, test_t, cfg.batch_size, device, autocast, tok.eot_id)
        summary["test_ppl"] = math.exp(min(summary["test_loss"], 50))
    elif test_t:
        metrics = classification_metrics(model, test_t, cfg.batch_size, device, tok.eot_id, cfg.num_classes, autocast)
        summary.update({f"test_{k}": v for k, v in metrics.items()})
    after, after_eos = generate_responses(gpt, tok, gen_ex, tok.eot_id, cfg.max_new_tokens, autocast,
                                          chat_template=chat_template)
    if gen_ex and master:
        write_responses(out, cfg, gen_ex, before, after, best_step)
    # before -> after, under the same names, so that a script can compare runs: the held-out answers'
    # metrics (instruction, dialogue) or the test accuracy (classify; "before" is the untrained head's)
    first = next((r for r in log.rows if "val_loss" in r), {})
    summary["before"] = {"val_loss": first.get("val_loss")}
    summary["after"] = {"val_loss": best_val}
    if gen_ex:
        summary["before"].update(answer_metrics(before, before_eos, gen_ex))
        summary["after"].update(answer_metrics(after, after_eos, gen_ex))
    if classify and "test_accuracy" in first:
        summary["before"]["test_accuracy"] = first["test_accuracy"]
        summary["after"]["test_accuracy"] = summary["test_accuracy"]
    if lora and not classify and cfg.save_merged and best_state is not None:
        try:
            save_weights(model, out / "best_model", cfg, tok, master, merged=True)
        except ValueError as e:  # e.g. a LoRA on a tied lm_head cannot be merged
            log.say(f"merged model not written: {e}")
    tps = n_real_tokens / train_time if train_time else float("nan")
    if master:
        panels = [["loss", "val_loss"]] + [[k for k in ("val_accuracy", "test_accuracy", "reward_mean", "judge_mean")
                                            if any(k in r for r in log.rows)]]
        plot_log(log.rows, out / "loss.png", [p for p in panels if p])
        summary.update(peak_memory_mb=peak_memory_mb(device), seconds=train_time, tokens_per_s=tps)
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
        close_run(out)
    peak_kind = "max allocated" if device_type == "cuda" else "process peak RSS"
    log.say(f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f}) at step {best_step}; "
            f"peak memory {peak_memory_mb(device) / 1024:.2f} GiB ({peak_kind}){' on rank 0' if world > 1 else ''}; "
            f"{tps:.0f} tokens/s (non-padding, training steps only)")
    if gen_ex:
        log.say(f"a held-out answer: {gen_ex[0]['instruction']!r} -> before {before[0]!r}, after {after[0]!r} "
                f"(reference {gen_ex[0]['output']!r})")
    log.say(before_after(summary, f"{len(gen_ex)} held-out answers" if gen_ex else f"{len(test_t)} test examples"))
    written = ("summary.json", "log.jsonl", "loss.png", "responses.md", "best_adapter", "best_model", "ckpt")
    log.say("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    chain = "" if out == Path(FinetuneConfig.out_dir) else f" --init_from {out}"
    log.say(f"next: python rl.py{chain} (reinforcement learning from rewards), python dpo.py{chain} (preference-tune "
            f"it), or python chat.py{chain} (talk to it)")
    end_distributed()
    return dict(summary, best_val=best_val, log=log.rows, model=model)


def write_responses(out: Path, cfg: FinetuneConfig, examples, before, after, best_step: int):
    rows = [dict(ex, response_before=b, response_after=a) for ex, b, a in zip(examples, before, after)]
    write_jsonl(out / "responses.jsonl", rows)
    md = [f"# Responses before and after tuning ({cfg.init_from}, best step {best_step})\n"]
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
