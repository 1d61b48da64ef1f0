"""
finetune.py: instruction tuning (Alpaca), dialogue tuning (HH-RLHF) and classification of a GPT-2 or
LLaMA model, fully or with LoRA, plus scoring of generated answers and a chat; with the
memory-saving techniques that take it from GPT-2 on a laptop CPU to LLaMA-2-7B on one 40 GB GPU:
gradient accumulation, gradient checkpointing, mixed precision (bf16, or fp16 with loss scaling)
and LoRA.

Run it:
    python finetune.py --init_from gpt2 --lora_rank 16 --grad_accum 8                 # LoRA on q,v
    python finetune.py --init_from gpt2-medium --lora_rank 0 --lr 1e-5                # full fine-tuning
    python finetune.py --init_from gpt2 --data_file alpaca.json --n_samples 200 --max_response_chars 512
    python finetune.py --init_from gpt2-medium --task dialogue --batch_size 1 --grad_accum 8     # HH-RLHF
    python finetune.py --task classify --dataset sst2 --num_classes 2 --lora_rank 16           # sentiment
    python finetune.py --score out-finetune --reward_model OpenAssistant/reward-model-deberta-v3-large-v2
    python finetune.py --chat out-finetune/best_model --task dialogue
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
  5. Classification (--task classify): a linear head on the last real token instead of the LM head.
  6. Scoring answers (--score, --score_every_eval): a reward model, an LLM judge, 40 built-in prompts.
  7. Chat (--chat DIR): multi-turn (dialogue) or single-turn (Alpaca), streamed.

out_dir gets: config.json, log.jsonl (one JSON object per optimizer step: step, loss, lr, ...; one
per evaluation: step, val_loss), loss.png, best_adapter/ (LoRA, PEFT format), best_model/ (merged
full model, this project's native format), responses.jsonl and responses.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
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
        help="instruction: Alpaca-format .json (a list) or .jsonl (one object a line) with instruction/input/"
             "output, default tatsu-lab/alpaca through datasets; dialogue: .jsonl with `chosen` conversations, "
             "default Anthropic/hh-rlhf"))
    task: str = field(default="instruction", metadata=dict(
        help="instruction: Alpaca records; dialogue: HH-RLHF conversations (jsonl with `chosen`, or "
             "Anthropic/hh-rlhf), loss on the assistant turns; classify: a class per text (jsonl/csv with "
             "text, optional text_pair, label), a linear head on the last token replacing the LM head"))
    num_classes: int = field(default=2, metadata=dict(help="classify: number of classes (labels 0..N-1)"))
    dataset: str | None = field(default=None, metadata=dict(
        help="classify without --data_file: sst2 (sentiment) | sms_spam | mnli (entailment: premise + hypothesis)"))
    balance: bool = field(default=False, metadata=dict(
        help="classify: downsample every class to the size of the smallest (e.g. spam vs ham)"))
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
    score: str | None = field(default=None, metadata=dict(
        help="score instead of training: a run dir (its ckpt_step*/ and best_model/) or one model dir: answer "
             "the prompt set, rate the answers with --reward_model and/or --judge_url, report mean ± stderr "
             "per checkpoint and the best; writes scores.jsonl/scores.md there"))
    score_every_eval: bool = field(default=False, metadata=dict(
        help="training: also rate answers to the prompt set with --reward_model/--judge_url at every "
             "evaluation (logged as reward_mean / judge_mean, plotted beside the losses)"))
    prompts: str | None = field(default=None, metadata=dict(
        help="--score: jsonl of {instruction, input?, output? (reference)} or text, one prompt a line "
             "(default: the 40 built-in everyday questions)"))
    reward_model: str = field(default="OpenAssistant/reward-model-deberta-v3-large-v2", metadata=dict(
        help="--score / --score_every_eval: HF sequence-classification reward model (hub id or dir); "
             "'none' = judge only"))
    judge_url: str | None = field(default=None, metadata=dict(
        help="--score: OpenAI-compatible API base URL; POSTs {url}/chat/completions"))
    judge_model: str = field(default="gpt-4o-mini", metadata=dict(help="--score: the judge's model name"))
    judge_key_env: str = field(default="OPENAI_API_KEY", metadata=dict(
        help="--score: environment variable holding the judge's API key (none sent if unset)"))
    judge_timeout: float = field(default=60.0, metadata=dict(help="--score: seconds per judge request"))
    judge_retries: int = field(default=4, metadata=dict(help="--score: retries on timeouts, 429 and 5xx"))
    chat: str | None = field(default=None, metadata=dict(
        help="talk to this model dir instead of training: --task dialogue keeps a multi-turn HH-RLHF "
             "history, instruction answers each message alone in the Alpaca template; /reset, /quit"))
    temperature: float = field(default=0.7, metadata=dict(help="--chat: sampling temperature (0 = greedy)"))
    top_k: int = field(default=50, metadata=dict(help="--chat: sample among the k likeliest tokens (0 = all)"))
    top_p: float = field(default=0.95, metadata=dict(help="--chat: nucleus threshold (1.0 = off)"))
    save_interval: int = field(default=0, metadata=dict(
        help="also keep the weights every N steps in out_dir/ckpt_step<N>/ (adapter with LoRA, else the model), "
             "to pick a checkpoint later (0 = only the best)"))


def add_config_flags(ap: argparse.ArgumentParser, config_cls):
    """One --flag per field of a config dataclass, its help from the field's metadata (dpo.py too)."""
    for f in fields(config_cls):
        kw = dict(default=f.default, help=f.metadata["help"])
        if f.type == "bool":
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            ap.add_argument(f"--{f.name}", **kw)
    return ap


def parse_args(argv=None) -> FinetuneConfig:
    ap = argparse.ArgumentParser(description="Instruction-tune a GPT-2 / LLaMA model on Alpaca-format data, "
                                             "fully or with LoRA.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(ap, FinetuneConfig)
    cfg = FinetuneConfig(**vars(ap.parse_args(argv)))
    if str(cfg.reward_model).lower() == "none":
        cfg.reward_model = None
    checks = [
        (cfg.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}"),
        (cfg.batch_size >= 1 and cfg.grad_accum >= 1, "--batch_size and --grad_accum must be >= 1"),
        (cfg.precision in ("auto", "fp32", "fp16", "bf16"), f"--precision {cfg.precision!r}: expected fp32|fp16|bf16|auto"),
        (cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r}: expected one of {'|'.join(OPTIMIZERS)}"),
        (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1,
         "--val_frac and --test_frac must be in [0, 1) and sum to less than 1"),
        (cfg.epochs >= 1 or cfg.max_steps >= 1, "give --epochs >= 1 or --max_steps >= 1"),
        (cfg.eval_interval >= 1, "--eval_interval must be >= 1"),
        (cfg.task in TASKS, f"--task {cfg.task!r}: expected one of {'|'.join(TASKS)}"),
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


TASKS = ("instruction", "dialogue", "classify")


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for an example: the with-input template when `input` is non-empty. A
    dialogue example carries its own prompt (the conversation up to its last "Assistant:")."""
    if "prompt" in example:
        return example["prompt"]
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


def read_jsonl(path) -> list[tuple[str, object]]:
    """[("file:line", record), ...] of a .jsonl file; blank lines skipped, bad JSON named by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


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


# HH-RLHF dialogue: "\n\nHuman: ...\n\nAssistant: ...", repeated. A marker counts only with its two
# newlines, so "Human:" quoted inside an answer stays part of that answer.
DIALOGUE_MARKERS = {"\n\nHuman:": "Human", "\n\nAssistant:": "Assistant"}


def parse_dialogue(text: str, where: str = "dialogue") -> list[tuple[str, str]]:
    """[(role, text), ...] in order; each text is what follows its marker (leading space kept)."""
    parts = re.split("(" + "|".join(map(re.escape, DIALOGUE_MARKERS)) + ")", text)
    if parts[0].strip():
        raise ValueError(f"{where}: text before the first '\\n\\nHuman:' marker: {parts[0][:40]!r}")
    turns = [(DIALOGUE_MARKERS[m], t) for m, t in zip(parts[1::2], parts[2::2])]
    if not any(role == "Assistant" for role, _ in turns):
        raise ValueError(f"{where}: no '\\n\\nAssistant:' turn in the conversation")
    return turns


def format_dialogue(turns: list[tuple[str, str]], add_assistant_prompt: bool = False) -> str:
    """The inverse of parse_dialogue; with add_assistant_prompt, ends with "\n\nAssistant:" for the
    model to answer (a chat prompt)."""
    return "".join(f"\n\n{role}:{t}" for role, t in turns) + ("\n\nAssistant:" if add_assistant_prompt else "")


def dialogue_example(text: str, where: str) -> dict:
    """A dialogue as an example: the whole text for training, and for generation the prompt up to
    the last assistant turn and that turn's answer as the reference."""
    turns = parse_dialogue(text, where)
    last = max(i for i, (role, _) in enumerate(turns) if role == "Assistant")
    prompt = format_dialogue(turns[:last], add_assistant_prompt=True)
    return {"text": text, "prompt": prompt, "instruction": prompt.strip(), "input": "",
            "output": turns[last][1].strip()}


def load_dialogues(data_file=None, n_samples: int = 0, split: str = "train") -> list[dict]:
    """HH-RLHF conversations (the `chosen` one of each pair) from a jsonl file or Anthropic/hh-rlhf."""
    if data_file is None:
        try:
            from datasets import load_dataset

            rows = [(f"Anthropic/hh-rlhf {split} row {i}", r) for i, r in
                    enumerate(load_dataset("Anthropic/hh-rlhf", split=split))]
        except Exception as e:
            raise RuntimeError(f"could not load Anthropic/hh-rlhf ({type(e).__name__}: {e}); pass --data_file "
                               f"with a local jsonl whose records have a `chosen` conversation") from None
    else:
        rows = read_jsonl(data_file)
    out = []
    for where, rec in rows:
        if not isinstance(rec, dict) or not isinstance(rec.get("chosen"), str):
            raise ValueError(f"{where}: missing field 'chosen' (a string holding the whole conversation)")
        out.append(dialogue_example(rec["chosen"], where))
        if n_samples and len(out) >= n_samples:
            break
    if not out:
        raise ValueError(f"{data_file or 'Anthropic/hh-rlhf'}: no conversations")
    return out


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
    ax.legend(loc="upper left")
    scores = [(k, [(r["step"], r[k]) for r in log if k in r]) for k in ("reward_mean", "judge_mean")]
    scores = [(k, pts) for k, pts in scores if pts]
    if scores:  # answer scores at each evaluation, on their own axis
        ax2 = ax.twinx()
        for k, pts in scores:
            ax2.plot(*zip(*pts), "s--", label=k.replace("_mean", " score"))
        ax2.set_ylabel("score")
        ax2.legend(loc="upper right")
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


def start_run(cfg):
    """The opening of a training run (finetune.py, dpo.py): device, precision, seed, out_dir with
    config.json, and the tokenizer, which must have an end-of-text token to end responses with."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else device
    precision = resolve_precision(cfg.precision, device_type)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    return device, device_type, precision, out, tok


def finetune(cfg: FinetuneConfig) -> dict:
    device, device_type, precision, out, tok = start_run(cfg)
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (3e-4 if lora else 1e-5)
    model = load_model(cfg, device, precision)
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}")
    if cfg.task == "dialogue":
        examples = load_dialogues(cfg.data_file, cfg.n_samples)
    else:
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

    if cfg.score_every_eval and not (cfg.reward_model or cfg.judge_url):
        raise ValueError("--score_every_eval needs --reward_model and/or --judge_url")
    score_set, judge = (score_prompts(cfg), make_judge(cfg, out)) if cfg.score_every_eval else ([], None)
    best_val, best_step, bad_evals, best_lora = float("inf"), -1, 0, None
    n_real_tokens, train_time = 0, 0.0
    step = 0
    while True:
        if step % cfg.eval_interval == 0 or step == total_steps:
            val = evaluate(model, val_t, cfg.batch_size, device, autocast, pad) if val_t else float("nan")
            row = dict(step=step, val_loss=val)
            if cfg.score_every_eval:
                sc = score_model(model, tok, score_set, cfg, judge, device, autocast)
                row.update({k: v for k, v in sc.items() if k.endswith(("_mean", "_stderr"))})
                model.train()
            record(row)
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
        if cfg.save_interval and step % cfg.save_interval == 0:
            if lora:
                save_adapter(model, out / f"ckpt_step{step}", cfg.init_from)
            else:
                model.save_pretrained(out / f"ckpt_step{step}", format="native")
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


# -----------------------------------------------------------------------------------------------
# 5. Classification: the LM head replaced by a linear head on the last real token

# --dataset: (hub id, config, text field, pair field). Only the train split is read and then split
# into train/val/test like every other task (GLUE's own test labels are hidden).
HUB_CLASSIFICATION = {
    "sst2": ("nyu-mll/glue", "sst2", "sentence", None),
    "sms_spam": ("ucirvine/sms_spam", None, "sms", None),
    "mnli": ("nyu-mll/glue", "mnli", "premise", "hypothesis"),
}


def load_classification(data_file=None, dataset=None, num_classes: int = 2, n_samples: int = 0,
                        balance: bool = False, seed: int = 1337) -> list[dict]:
    """[{text, text_pair, label}] from a .jsonl/.csv file or a hub dataset; every label is checked."""
    import csv

    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
        else:
            rows = read_jsonl(path)
        fields_ = ("text", "text_pair")
    else:
        if dataset not in HUB_CLASSIFICATION:
            raise ValueError(f"--dataset {dataset!r}: expected one of {', '.join(HUB_CLASSIFICATION)} "
                             f"(or give --data_file)")
        hub, name, tf, pf = HUB_CLASSIFICATION[dataset]
        try:
            from datasets import load_dataset

            rows = [(f"{hub} row {i}", r) for i, r in enumerate(load_dataset(hub, name, split="train"))]
        except Exception as e:
            raise RuntimeError(f"could not load {hub} ({type(e).__name__}: {e}); pass --data_file") from None
        fields_ = (tf, pf)
    out = []
    for where, r in rows:
        text = r.get(fields_[0]) if isinstance(r, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: missing field {fields_[0]!r} (a string)")
        try:
            label = int(r.get("label"))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: field 'label' must be an integer, got {r.get('label')!r}") from None
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: label {label} is outside 0..{num_classes - 1} (--num_classes {num_classes})")
        out.append(dict(text=text, text_pair=(r.get(fields_[1]) or "") if fields_[1] else "", label=label))
    if balance:  # the same number of examples of every class, so accuracy cannot be won by the majority
        by = {}
        for ex in out:
            by.setdefault(ex["label"], []).append(ex)
        n = min(len(v) for v in by.values())
        rng = random.Random(seed)
        out = [ex for v in by.values() for ex in rng.sample(v, n)]
        rng.shuffle(out)
    if n_samples:
        out = out[:n_samples]
    if not out:
        raise ValueError("no classification examples")
    return out


def tokenize_classification(ex: dict, tok, eos_id: int, max_length: int) -> dict:
    """Text (+ pair, after a newline) + EOS; the class is the label of the LAST token, every other
    label -100: collate, accumulate_gradients and evaluate then work unchanged, and the last real
    token of a right-padded row is exactly where its label sits. The text is cut from the left."""
    ids = tok.encode(ex["text"] + ("\n" + ex["text_pair"] if ex.get("text_pair") else ""))
    ids = ids[-(max_length - 1):] + [eos_id]
    return dict(input_ids=ids, labels=[-100] * (len(ids) - 1) + [ex["label"]], truncated=False, n_response=1)


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
        self.gpt = gpt
        self.head = torch.nn.Linear(gpt.config.n_embd, num_classes)
        self.head.to(gpt.lm_head.weight.device)

    def forward(self, idx, targets=None, attention_mask=None):
        h = self.gpt.hidden_states(idx, attention_mask)
        if targets is not None:  # labels at the last real token of each row (tokenize_classification)
            sel = targets != -100
            logits = self.head(h[sel].float())
            return logits, torch.nn.functional.cross_entropy(logits, targets[sel])
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
        gold += targets[targets != -100].tolist()
    clf.train(was)
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return dict(accuracy=sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold)), macro_f1=sum(f1s) / num_classes)


def finetune_classifier(cfg: FinetuneConfig) -> dict:
    """The classification run: the same precision, LoRA, accumulation and schedule as instruction
    tuning; LoRA adapts the body while the new head trains fully."""
    device, device_type, precision, out, tok = start_run(cfg)
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (3e-4 if lora else 1e-5)
    gpt = load_model(cfg, device, precision)
    examples = load_classification(cfg.data_file, cfg.dataset, cfg.num_classes, cfg.n_samples, cfg.balance, cfg.seed)
    train_ex, val_ex, test_ex = split_examples(examples, cfg.val_frac, cfg.test_frac, cfg.seed)
    max_length = min(cfg.max_length or gpt.config.block_size, gpt.config.block_size)
    tk = lambda xs: [tokenize_classification(e, tok, tok.eot_id, max_length) for e in xs]  # noqa: E731
    train_t, val_t, test_t = tk(train_ex), tk(val_ex), tk(test_ex)
    prepare_model(gpt, cfg)
    clf = Classifier(gpt, cfg.num_classes)  # created after LoRA froze the body: the head stays trainable
    gpt.grad_checkpointing = cfg.grad_checkpointing
    clf.train()
    autocast, scaler = setup_precision(precision, device_type)
    optimizer = make_optimizer(clf, cfg.optimizer, lr, cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or cfg.epochs * math.ceil(len(train_t) / per_step)
    counts = [sum(e["label"] == c for e in train_ex) for c in range(cfg.num_classes)]
    print(f"{len(train_t)} train / {len(val_t)} val / {len(test_t)} test examples; train classes {counts}; "
          f"majority-class accuracy {max(counts) / len(train_ex):.3f}")
    rng, order, log = random.Random(cfg.seed), [], []
    metrics = lambda xs: classification_metrics(clf, xs, cfg.batch_size, device, tok.eot_id,  # noqa: E731
                                                cfg.num_classes, autocast) if xs else {}
    for step in range(total + 1):
        if step % cfg.eval_interval == 0 or step == total:
            row = dict(step=step, val_loss=evaluate(clf, val_t, cfg.batch_size, device, autocast, tok.eot_id)
                       if val_t else float("nan"))
            row.update({f"val_{k}": v for k, v in metrics(val_t).items()})
            row.update({f"test_{k}": v for k, v in metrics(test_t).items()})
            log.append(row)
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
        if step == total:
            break
        micro = []
        for _ in range(cfg.grad_accum):
            batch = []
            for _ in range(cfg.batch_size):
                if not order:
                    order = list(range(len(train_t)))
                    rng.shuffle(order)
                batch.append(train_t[order.pop()])
            micro.append(collate(batch, tok.eot_id, device))
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, lr, cfg.min_lr, int(cfg.warmup_ratio * total))
        r = train_step(clf, optimizer, micro, scaler, autocast, cfg.grad_clip)
        log.append(dict(step=step + 1, loss=r["loss"]))
    _write_jsonl(out / "log.jsonl", log)
    plot_losses(log, out / "loss.png")
    from safetensors.torch import save_file

    if lora:
        save_adapter(gpt, out / "adapter", cfg.init_from)
    else:
        gpt.save_pretrained(out / "model", format="native")
    head = {k: v.detach().contiguous().cpu() for k, v in clf.head.state_dict().items()}
    atomic_write(out / "classifier_head.safetensors", lambda p: save_file(head, p))
    return dict(log=log, classifier=clf)


# -----------------------------------------------------------------------------------------------
# 6. Scoring generated answers: a reward model, an LLM judge

DEFAULT_PROMPTS = [  # everyday questions across science, history, economics and social topics
    "Why is the sky blue?", "How do vaccines train the immune system?", "What causes the seasons on Earth?",
    "Why does ice float on water?", "How does a rainbow form?", "What is photosynthesis?",
    "Why do we need sleep?", "How do airplanes stay in the air?", "What is the difference between weather and climate?",
    "How does a refrigerator keep food cold?", "What was the Industrial Revolution?",
    "Why did the Roman Empire decline?", "What was the significance of the printing press?",
    "Who were the Vikings?", "What caused the First World War?", "Why were the pyramids of Egypt built?",
    "What was the Silk Road?", "How did the Black Death change Europe?", "What is inflation?",
    "Why do countries trade with each other?", "What does a central bank do?", "What is a recession?",
    "How do interest rates affect borrowing?", "What is the difference between a stock and a bond?",
    "Why do prices rise when supply falls?", "What is opportunity cost?", "How can I save money on groceries?",
    "What makes a good friend?", "How can I prepare for a job interview?", "Why is voting important?",
    "How can neighbours resolve a noise dispute?", "What are good ways to deal with stress?",
    "How should I explain a difficult decision to my team?", "Why do people volunteer?",
    "How can I learn a new language as an adult?", "What is the best way to give feedback?",
    "How do I write a polite complaint letter?", "Why is it hard to change habits?",
    "How can cities reduce traffic congestion?", "What should I consider before adopting a dog?",
]

JUDGE_RUBRIC = ("Given the input `{instruction}` and correct output `{reference}`, score the model response "
                "`{answer}` on a scale from 0 to 100, where 100 is the best score. Respond with the integer "
                "number only.")


def load_prompts(path=None) -> list[dict]:
    """The prompt set: --prompts (jsonl {instruction, input?, output?} or plain lines) or the built-in one."""
    if path is None:
        return [{"instruction": q, "input": "", "output": ""} for q in DEFAULT_PROMPTS]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
                raise ValueError(f"{path}:{lineno}: missing field 'instruction'")
            out.append({"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec.get("output") or ""})
        else:
            out.append({"instruction": line.strip(), "input": "", "output": ""})
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan"))


@torch.no_grad()
def reward_scores(reward_model: str, questions: list[str], answers: list[str], batch_size: int = 8,
                  device="cpu") -> list[float]:
    """A reward model's score of each (question, answer): the pair encoded together, logit 0, as the
    OpenAssistant reward models' cards do."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).to(device).eval()
    out = []
    for i in range(0, len(questions), batch_size):
        enc = tok(questions[i:i + batch_size], answers[i:i + batch_size], return_tensors="pt", padding=True,
                  truncation=True).to(device)
        out += rm(**enc).logits[:, 0].float().tolist()
    return out


class JudgeError(RuntimeError):
    pass


def parse_judge_score(text) -> int | None:
    """Strict: the whole reply must be one integer 0-100 (whitespace aside); anything else is None."""
    if isinstance(text, str) and re.fullmatch(r"\s*\d{1,3}\s*", text) and 0 <= int(text) <= 100:
        return int(text)
    return None


class Judge:
    """An OpenAI-compatible chat-completions endpoint scoring answers 0-100. Retries timeouts,
    connection errors, 429 and 5xx with exponential backoff (Retry-After honoured); every judged
    item goes to a jsonl cache at once, so a re-run never pays twice and a failure midway loses
    nothing. A reply that is not a bare integer 0-100 leaves the item unjudged (reported)."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, cache_path=None):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.key = os.environ.get(key_env)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache = {}
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.cache[row["key"]] = row["score"]

    def score(self, instruction: str, reference: str, answer: str) -> tuple[int | None, str]:
        """(score or None, "cached" | "judged" | the reason it could not be judged)."""
        import hashlib

        import requests

        messages = [{"role": "user", "content": JUDGE_RUBRIC.format(instruction=instruction, reference=reference,
                                                                     answer=answer)}]
        key = hashlib.sha256(json.dumps([self.model, messages]).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key], "cached"
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                r = requests.post(self.url, json={"model": self.model, "messages": messages, "temperature": 0},
                                  headers=headers, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = f"{type(e).__name__}"
            else:
                if r.status_code == 200:
                    try:
                        text = r.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        return None, "malformed response body"
                    score = parse_judge_score(text)
                    if score is None:
                        return None, f"reply is not an integer 0-100: {str(text)[:60]!r}"
                    self.cache[key] = score
                    if self.cache_path:
                        with open(self.cache_path, "a") as f:
                            f.write(json.dumps({"key": key, "score": score}) + "\n")
                    return score, "judged"
                last = f"HTTP {r.status_code}"
                if r.status_code != 429 and r.status_code < 500:
                    raise JudgeError(f"judge at {self.url} refused the request: {last} {r.text[:200]}")
                if r.headers.get("Retry-After", "").isdigit():
                    wait = float(r.headers["Retry-After"])
            if attempt < self.retries:
                time.sleep(wait)
        raise JudgeError(f"judge at {self.url} failed after {self.retries + 1} attempts ({last}); the items "
                         f"judged so far are kept in {self.cache_path or 'memory'}")


def judge_answers(judge: Judge, prompts: list[dict], answers: list[str]) -> tuple[list, list]:
    """Scores (None where unjudged) and the report of unjudged items."""
    scores, unjudged = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        instruction = p["instruction"] + (f"\n\n{p['input']}" if p.get("input") else "")
        s, how = judge.score(instruction, p.get("output", ""), a)
        scores.append(s)
        if s is None:
            unjudged.append({"item": i, "reason": how})
    return scores, unjudged


def score_prompts(cfg) -> list[dict]:
    """The prompt set, in the task's format (a dialogue prompt ends with "\n\nAssistant:")."""
    prompts = load_prompts(cfg.prompts)
    if cfg.task == "dialogue":
        prompts = [dict(p, prompt=format_dialogue([("Human", " " + p["instruction"])], True)) for p in prompts]
    return prompts


def score_model(model, tok, prompts: list[dict], cfg, judge: "Judge | None", device,
                autocast=contextlib.nullcontext) -> dict:
    """Greedy answers to the prompts, rated by the reward model and/or the judge: the answers, the
    scores, and their means ± standard errors (used by --score and, with --score_every_eval, at
    every evaluation of a training run)."""
    answers = generate_responses(model, tok, prompts, tok.eot_id, cfg.max_new_tokens, autocast)
    row = {"answers": answers}
    if cfg.reward_model:
        r = reward_scores(cfg.reward_model, [p["instruction"] for p in prompts], answers, device=device)
        row.update(reward=r, reward_mean=mean_stderr(r)[0], reward_stderr=mean_stderr(r)[1])
    if judge is not None:
        sc, unjudged = judge_answers(judge, prompts, answers)
        ok = [x for x in sc if x is not None]
        row.update(judge=sc, judge_mean=mean_stderr(ok)[0], judge_stderr=mean_stderr(ok)[1], unjudged=unjudged)
    return row


def make_judge(cfg, out_dir: Path) -> "Judge | None":
    return Judge(cfg.judge_url, cfg.judge_model, cfg.judge_key_env, cfg.judge_timeout, cfg.judge_retries,
                 cache_path=Path(out_dir) / "judge_cache.jsonl") if cfg.judge_url else None


def _checkpoints(path: Path) -> list[tuple[str, Path]]:
    """(name, dir) of the model or adapter checkpoints in a run dir, or the dir itself."""
    if any((path / f).exists() for f in ("gpt_config.json", "config.json", "adapter_config.json")):
        return [(path.name, path)]
    found = sorted(path.glob("ckpt_step*"), key=lambda p: int(p.name[len("ckpt_step"):]))
    found += [p for p in (path / "best_model", path / "best_adapter") if p.is_dir()]
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (a model dir, or a run dir with ckpt_step*/ or best_model/)")
    return [(p.name, p) for p in found]


def score_run(cfg: FinetuneConfig) -> list[dict]:
    """--score: answer the prompt set with each checkpoint and rate the answers."""
    from lora import load_adapter

    if not (cfg.reward_model or cfg.judge_url):
        raise ValueError("--score needs --reward_model and/or --judge_url")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(cfg.score)
    out_dir = root if root.is_dir() else root.parent
    prompts = score_prompts(cfg)
    judge = make_judge(cfg, out_dir)
    rows = []
    for name, ckpt in _checkpoints(root):
        if (ckpt / "adapter_config.json").exists():  # a LoRA adapter: on top of --init_from
            model = GPT.from_pretrained(cfg.init_from, device=device)
            load_adapter(model, ckpt)
            tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
        else:
            model = GPT.from_pretrained(str(ckpt), device=device)
            tok = load_tokenizer(cfg.tokenizer, str(ckpt))
        row = {"checkpoint": name, "step": int(name[9:]) if name.startswith("ckpt_step") else None}
        row.update(score_model(model.eval(), tok, prompts, cfg, judge, device))
        if row.get("unjudged"):
            print(f"{name}: {len(row['unjudged'])} item(s) not judged: {row['unjudged'][:5]}")
        rows.append(row)
        _write_jsonl(out_dir / "scores.jsonl", rows)  # after each checkpoint: nothing scored is lost
        print(f"{name}: " + ", ".join(f"{k[:-5]} {row[k]:.3f} ± {row[k[:-5] + '_stderr']:.3f}"
                                      for k in ("reward_mean", "judge_mean") if k in row))
    metric = "reward_mean" if cfg.reward_model else "judge_mean"
    best = max(rows, key=lambda r: r[metric] if r[metric] == r[metric] else -math.inf)
    md = [f"# Scores of {root} ({len(prompts)} prompts)\n", "| checkpoint | reward | judge |", "| --- | --- | --- |"]
    fmt = lambda r, k: f"{r[k]:.3f} ± {r[k[:-5] + '_stderr']:.3f}" if k in r else "–"  # noqa: E731
    md += [f"| {r['checkpoint']} | {fmt(r, 'reward_mean')} | {fmt(r, 'judge_mean')} |" for r in rows]
    md.append(f"\nbest by {metric[:-5]}: **{best['checkpoint']}**")
    atomic_write(out_dir / "scores.md", lambda p: Path(p).write_text("\n".join(md) + "\n"))
    print(f"best by {metric[:-5]}: {best['checkpoint']}; scores in {out_dir / 'scores.md'}")
    return rows


# -----------------------------------------------------------------------------------------------
# 7. Chat


class _StopReply(Exception):
    pass


def chat(cfg: FinetuneConfig, stdin=None, stdout=None) -> list[str]:
    """Read messages line by line, stream the model's replies. In the dialogue format the whole
    conversation so far is the prompt (oldest tokens dropped when it outgrows the context); a reply
    ends at EOS or where the model starts a new "\n\nHuman:" turn. Returns the prompts used."""
    import sys

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT.from_pretrained(cfg.chat, device=device).eval()
    if device == "cpu":
        model.decode_layout_()  # inference only: the faster layout for one-token steps (model.py)
    tok = load_tokenizer(cfg.tokenizer, cfg.chat)
    room = model.config.block_size - cfg.max_new_tokens
    if room <= 0:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room in the context")
    turns, prompts = [], []
    stdout.write(f"chatting with {cfg.chat} ({cfg.task} format); /reset clears the history, /quit ends\n")
    for n, line in enumerate(stdin):
        msg = line.strip()
        if msg == "/quit":
            break
        if msg == "/reset":
            turns = []
            stdout.write("(history cleared)\n")
            continue
        if not msg:
            continue
        if cfg.task == "dialogue":
            turns.append(("Human", " " + msg))
            prompt = format_dialogue(turns, add_assistant_prompt=True)
        else:
            prompt = format_prompt({"instruction": msg, "input": ""})
        prompts.append(prompt)
        ids = tok.encode(prompt)[-room:]
        new: list[int] = []
        shown = ""

        def stream(t):
            nonlocal shown
            new.append(int(t[0]))
            text = tok.decode([i for i in new if i != tok.eot_id])
            if "\n\nHuman:" in text or (tok.eot_id is not None and new[-1] == tok.eot_id):
                raise _StopReply  # the model has finished its turn
            stdout.write(text[len(shown):])
            stdout.flush()
            shown = text

        stdout.write("Assistant:")
        try:
            model.generate(torch.tensor([ids], device=device), cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + n, stream=stream)
        except _StopReply:
            pass
        stdout.write("\n")
        if cfg.task == "dialogue":
            turns.append(("Assistant", " " + shown.strip()))
    return prompts


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.chat:
        chat(cfg)
        return
    if cfg.score:
        try:
            score_run(cfg)
        except JudgeError as e:
            raise SystemExit(f"error: {e}") from None
        return
    finetune_classifier(cfg) if cfg.task == "classify" else finetune(cfg)


if __name__ == "__main__":
    main()
