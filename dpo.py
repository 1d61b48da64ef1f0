"""
dpo.py: Direct Preference Optimization (Rafailov et al. 2023) of a GPT-2 / LLaMA model on preference
pairs (a prompt, a chosen and a rejected response), fully or with LoRA, on one GPU or a CPU.

Run it:
    python dpo.py --init_from out-finetune/best_model --data_file hh_pairs.jsonl --lora_rank 16
    python dpo.py --init_from gpt2-medium --reference adapter_off --beta 0.1 --max_steps 1000
    python dpo.py --init_from gpt2 --lora_rank 0 --reference precomputed --loss ipo     # full, no 2nd copy
    python dpo.py bench                 # peak memory of the three reference modes (CPU, GPT-2-small shape)
    python dpo.py bench --estimate      # the same question on paper for GPT-2 medium / LLaMA-2-7B, 16/40 GB
    python dpo.py --help

The idea. RLHF fits a reward model to preferences, then maximises reward with a KL penalty that keeps
the policy pi near a reference model pi_ref. DPO notices that the optimum of that problem is
pi(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), so the reward is implicitly r = beta * log(pi / pi_ref),
and fits the preferences directly with that reward:

    logits = (log pi(y_c|x) - log pi(y_r|x)) - (log pi_ref(y_c|x) - log pi_ref(y_r|x))
    sigmoid (DPO):   loss = -log sigmoid(beta * logits)
    conservative:    loss = -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits)
    IPO:             loss = (logits - 1 / (2 beta))^2

log pi(y|x) is the SUM of the response tokens' log-probabilities (prompt and padding masked out).

The reference model is what makes DPO hard to fit on one GPU. --reference chooses:
    copy         a frozen second copy of the starting model (optionally --ref_dtype bf16 / --ref_device)
    adapter_off  LoRA only: the policy itself with its adapters switched off IS the starting model,
                 so no second copy exists at all
    precomputed  the reference log-probs of every pair computed once before training and cached in
                 out_dir (resumable); training then needs no reference model in memory

Data: HH-RLHF (Anthropic/hh-rlhf via `datasets`, or a local jsonl with its chosen/rejected full
conversations, split here at the last shared "\\n\\nAssistant:"), or a generic jsonl of
{prompt, chosen, rejected}. `python prepare_data.py hh_pairs` writes the latter.

out_dir gets: config.json, log.jsonl (per step: loss, reward_accuracy, reward_margin, chosen/rejected
rewards, policy log-probs, lr; per eval the same with an eval_ prefix), dpo.png, adapter/ (LoRA, PEFT
format) or model/ (full), ref_logps.json (precomputed mode), samples.md (before / after).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune import add_config_flags, read_jsonl  # finetune.py's training machinery is reused, not copied
from lora import LoRALinear, _rss_mb, apply_lora, save_adapter
from model import GPT, GPTConfig, atomic_write

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class DPOConfig:
    init_from: str = field(default="gpt2", metadata=dict(
        help="starting (SFT) model: gpt2 name, HF model dir (gpt2/llama), or our checkpoint dir"))
    tokenizer: str | None = field(default=None, metadata=dict(help="tokenizer spec (default: the model's)"))
    data_file: str | None = field(default=None, metadata=dict(
        help="jsonl of {prompt, chosen, rejected} or HH-RLHF {chosen, rejected}; default Anthropic/hh-rlhf"))
    split: str = field(default="train", metadata=dict(help="datasets split when no --data_file"))
    n_samples: int = field(default=0, metadata=dict(help="use only the first N pairs (0 = all)"))
    val_frac: float = field(default=0.1, metadata=dict(help="fraction of pairs held out for evaluation"))
    out_dir: str = field(default="out-dpo", metadata=dict(help="where logs, plots and weights go"))
    max_length: int = field(default=512, metadata=dict(help="longest prompt + response in tokens"))
    max_prompt_length: int = field(default=256, metadata=dict(
        help="prompts are cut from the left to this many tokens when a pair is too long"))
    # the loss
    beta: float = field(default=0.1, metadata=dict(help="strength of the implicit KL penalty"))
    loss: str = field(default="sigmoid", metadata=dict(help="sigmoid (DPO) | ipo"))
    label_smoothing: float = field(default=0.0, metadata=dict(
        help="conservative DPO: assumed probability that a preference label is flipped"))
    reference: str = field(default="adapter_off", metadata=dict(
        help="copy | adapter_off (LoRA only) | precomputed; with --lora_rank 0, adapter_off becomes copy"))
    ref_dtype: str = field(default="same", metadata=dict(help="copy: same|fp32|bf16|fp16 for the frozen copy"))
    ref_device: str = field(default="same", metadata=dict(help="copy: device of the frozen copy (e.g. cuda:1)"))
    # policy: LoRA or full, as in finetune.py
    lora_rank: int = field(default=16, metadata=dict(help="LoRA rank; 0 = full fine-tuning"))
    lora_alpha: float = field(default=32.0, metadata=dict(help="LoRA scaling numerator"))
    lora_dropout: float = field(default=0.0, metadata=dict(help="dropout on the LoRA branch input"))
    lora_targets: str = field(default="q,v", metadata=dict(help="LoRA targets (see lora.py)"))
    batch_size: int = field(default=2, metadata=dict(help="pairs per micro-batch"))
    grad_accum: int = field(default=4, metadata=dict(help="micro-batches per optimizer step"))
    grad_checkpointing: bool = field(default=False, metadata=dict(help="recompute activations in backward"))
    precision: str = field(default="auto", metadata=dict(help="fp32|fp16|bf16|auto"))
    device: str = field(default="auto", metadata=dict(help="cpu|cuda|mps|auto"))
    optimizer: str = field(default="adamw", metadata=dict(help="adamw|adam|rmsprop|sgd|sgd_momentum|sgd_nesterov"))
    lr: float = field(default=0.0, metadata=dict(help="peak learning rate (0 = 5e-4 with LoRA, 1e-6 full)"))
    warmup_steps: int = field(default=10, metadata=dict(help="linear warmup steps, then cosine decay to 0"))
    weight_decay: float = field(default=0.0, metadata=dict(help="decoupled weight decay on 2-D weights"))
    grad_clip: float = field(default=1.0, metadata=dict(help="clip the global gradient norm (0 = off)"))
    max_steps: int = field(default=100, metadata=dict(help="optimizer steps"))
    eval_interval: int = field(default=25, metadata=dict(help="evaluate every N steps (and at 0 and the end)"))
    eval_pairs: int = field(default=200, metadata=dict(help="held-out pairs per evaluation (0 = all)"))
    save_interval: int = field(default=0, metadata=dict(help="also keep weights every N steps (0 = end only)"))
    n_generate: int = field(default=3, metadata=dict(help="held-out prompts answered before and after"))
    max_new_tokens: int = field(default=64, metadata=dict(help="longest sample answer"))
    log_interval: int = field(default=10, metadata=dict(help="print metrics every N steps"))
    seed: int = field(default=1337, metadata=dict(help="seed for split, order and init"))


def parse_args(argv=None) -> DPOConfig:
    ap = argparse.ArgumentParser(description="Direct Preference Optimization of a GPT-2 / LLaMA model "
                                             "(sub-command `bench`: memory of the reference modes).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(ap, DPOConfig)
    cfg = DPOConfig(**vars(ap.parse_args(argv)))
    checks = [
        (cfg.loss in LOSS_TYPES, f"--loss {cfg.loss!r}: expected one of {'|'.join(LOSS_TYPES)}"),
        (cfg.reference in ("copy", "adapter_off", "precomputed"),
         f"--reference {cfg.reference!r}: expected copy|adapter_off|precomputed"),
        (cfg.beta > 0, "--beta must be > 0"),
        (0 <= cfg.label_smoothing < 0.5, "--label_smoothing must be in [0, 0.5)"),
        (cfg.max_prompt_length < cfg.max_length, "--max_prompt_length must be < --max_length"),
        (cfg.batch_size >= 1 and cfg.grad_accum >= 1 and cfg.max_steps >= 1, "batch, accumulation, steps >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            ap.error(message)
    if cfg.reference == "adapter_off" and cfg.lora_rank == 0:
        print("note: --reference adapter_off needs LoRA; with --lora_rank 0 a frozen copy is used")
        cfg.reference = "copy"
    return cfg


# -----------------------------------------------------------------------------------------------
# 2. Data: pairs, tokenization, batches

ASSISTANT = "\n\nAssistant:"


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF stores two whole conversations that share every turn but the last answer. The prompt
    is their longest common prefix that ends with "\\n\\nAssistant:"; the responses are the rest."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the marker must lie inside the shared part
    if cut < 0:
        raise ValueError("the two conversations share no prefix ending in '\\n\\nAssistant:'")
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair_from_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("chosen", "rejected"):
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{where}: missing or non-string field {key!r} (a pair needs chosen and rejected, "
                             f"plus prompt unless they are HH-RLHF conversations)")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: field 'prompt' must be a string")
        return {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
    try:
        p, c, r = split_hh_pair(rec["chosen"], rec["rejected"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {"prompt": p, "chosen": c, "rejected": r}


def load_pairs(data_file=None, split: str = "train") -> list[dict]:
    """[{prompt, chosen, rejected}] from a jsonl file (generic or HH-RLHF), or Anthropic/hh-rlhf."""
    if data_file is None:
        try:
            from datasets import load_dataset

            ds = load_dataset("Anthropic/hh-rlhf", split=split)
        except Exception as e:
            raise RuntimeError(f"could not load Anthropic/hh-rlhf ({type(e).__name__}: {e}); pass --data_file "
                               f"with a local jsonl") from None
        return [_pair_from_record(rec, f"Anthropic/hh-rlhf {split} row {i}") for i, rec in enumerate(ds)]
    pairs = [_pair_from_record(rec, where) for where, rec in read_jsonl(data_file)]
    if not pairs:
        raise ValueError(f"{data_file}: no pairs in the file")
    return pairs


def tokenize_pairs(pairs: list[dict], tok, eos_id: int, max_length: int, max_prompt_length: int) -> list[dict]:
    """Token ids of each pair, EOS after each response. A pair longer than max_length loses prompt
    tokens from the LEFT first (down to max_prompt_length: the end of the prompt, right before the
    answer, matters most), then response tokens from the end. Pairs whose responses are identical
    carry no preference signal (their loss gradient is zero): they are dropped and counted."""
    out, n_same, n_cut = [], 0, 0
    for pair in pairs:
        if pair["chosen"] == pair["rejected"]:
            n_same += 1
            continue
        p = tok.encode(pair["prompt"])
        c = tok.encode(pair["chosen"]) + [eos_id]
        r = tok.encode(pair["rejected"]) + [eos_id]
        if len(p) + max(len(c), len(r)) > max_length:
            n_cut += 1
            p = p[-max_prompt_length:] if len(p) > max_prompt_length else p
            c, r = c[: max_length - len(p)], r[: max_length - len(p)]
        out.append({"prompt": p, "chosen": c, "rejected": r})
    if n_same:
        print(f"warning: {n_same} pair(s) with identical chosen and rejected responses were skipped")
    if n_cut:
        print(f"{n_cut} of {len(pairs)} pairs were longer than {max_length} tokens and were truncated "
              f"(prompt from the left to {max_prompt_length}, then responses)")
    return out


def collate_pairs(batch: list[dict], pad_id: int, device="cpu"):
    """One batch of 2B rows, the B chosen sequences first, then the B rejected ones, so that both go
    through the model in ONE forward pass. labels are the next tokens, -100 on prompt and padding."""
    seqs = [(b["prompt"], b["chosen"]) for b in batch] + [(b["prompt"], b["rejected"]) for b in batch]
    T = max(len(p) + len(r) for p, r in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        full = torch.tensor(p + r)
        idx[i, : len(full) - 1] = full[:-1]
        labels[i, len(p) - 1: len(full) - 1] = full[len(p):]  # position t predicts token t + 1
    return idx.to(device), labels.to(device)


# -----------------------------------------------------------------------------------------------
# 3. Log-probabilities and the loss


def sequence_logps(logits, labels):
    """Sum over each row of log p(label) where label != -100, in fp32 (a log-softmax over the
    vocabulary in bf16 would lose the small differences DPO lives on)."""
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def concatenated_logps(model, idx, labels, autocast=contextlib.nullcontext):
    """(chosen, rejected) summed log-probs of a collate_pairs batch, from one forward pass."""
    with autocast():
        logits, _ = model(idx)
    logps = sequence_logps(logits, labels)
    B = idx.size(0) // 2
    return logps[:B], logps[B:]


LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-example losses and the implicit rewards beta * (log pi - log pi_ref) of each response."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2  # regresses the margin to 1/(2 beta): cannot overfit to infinity
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """Reward accuracy counts a pair only when chosen's reward is strictly higher (a tie is 0)."""
    return dict(loss=losses.mean().item(),
                reward_accuracy=(chosen_rewards > rejected_rewards).float().mean().item(),
                reward_margin=(chosen_rewards - rejected_rewards).mean().item(),
                chosen_reward=chosen_rewards.mean().item(), rejected_reward=rejected_rewards.mean().item(),
                policy_chosen_logps=policy_chosen.detach().mean().item(),
                policy_rejected_logps=policy_rejected.detach().mean().item())


# -----------------------------------------------------------------------------------------------
# 4. The reference model, three ways


@contextlib.contextmanager
def adapters_off(model):
    """The LoRA policy with its adapters switched off is exactly the model it started from (W + 0):
    a reference that costs no memory. Setting each adapter's scaling to 0 switches it off; eval mode
    switches dropout off, so the reference is deterministic."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("--reference adapter_off needs a LoRA policy (--lora_rank > 0)")
    saved = [m.scaling for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s
        model.train(was_training)


class Reference:
    """reference.logps(idx, labels, keys) -> (chosen, rejected) log-probs under the starting model."""

    def __init__(self, mode: str, policy, autocast=contextlib.nullcontext, copy_dtype=None, copy_device=None):
        self.mode, self.policy, self.autocast, self.cache = mode, policy, autocast, {}
        self.model = None
        if mode == "copy":  # a frozen twin; a cheaper dtype or another device are the usual savings
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            if copy_dtype is not None or copy_device is not None:
                self.model.to(device=copy_device, dtype=copy_dtype)

    @torch.no_grad()
    def compute(self, idx, labels):
        if self.model is not None:
            dev = next(self.model.parameters()).device
            c, r = concatenated_logps(self.model, idx.to(dev), labels.to(dev), self.autocast)
            return c.to(idx.device), r.to(idx.device)
        with adapters_off(self.policy):
            return concatenated_logps(self.policy, idx, labels, self.autocast)

    def logps(self, idx, labels, keys):
        if self.mode != "precomputed":
            return self.compute(idx, labels)
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise KeyError(f"pairs {missing[:5]} have no precomputed reference log-probs")
        v = torch.tensor([self.cache[k] for k in keys], dtype=torch.float32, device=idx.device)
        return v[:, 0], v[:, 1]


def precompute_reference(ref: Reference, tokenized: list[dict], keys: list[str], pad_id: int, device,
                         batch_size: int, path: Path | None, tag: str):
    """Fill ref.cache for every pair, in one pass before any update (the policy still IS the
    reference then; with LoRA the adapters are switched off anyway). The cache file is keyed by
    `tag` (model + tokenization); it is written as it grows, so an interrupted run resumes."""
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("tag") == tag:
            ref.cache.update(saved["logps"])
    todo = [i for i, k in enumerate(keys) if k not in ref.cache]

    def write():
        if path is not None:
            atomic_write(path, lambda p: Path(p).write_text(json.dumps({"tag": tag, "logps": ref.cache})))

    for n, s in enumerate(range(0, len(todo), batch_size)):
        chunk = todo[s: s + batch_size]
        idx, labels = collate_pairs([tokenized[i] for i in chunk], pad_id, device)
        with torch.no_grad(), (adapters_off(ref.policy) if _has_lora(ref.policy) else _eval(ref.policy)):
            c, r = concatenated_logps(ref.policy, idx, labels, ref.autocast)
        for i, a, b in zip(chunk, c.tolist(), r.tolist()):
            ref.cache[keys[i]] = (a, b)
        if n % 20 == 19:
            write()
    write()
    return len(todo)


def _has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def pair_key(t: dict) -> str:
    return hashlib.sha1(json.dumps([t["prompt"], t["chosen"], t["rejected"]]).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------------------------
# 5. Training


def make_dpo_optimizer(model, name: str, lr: float, weight_decay: float):
    if name == "rmsprop":  # used by the DPO paper's reference implementation
        return torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=lr,
                                   weight_decay=weight_decay)
    from finetune import make_optimizer

    return make_optimizer(model, name, lr, weight_decay)


def dpo_step(policy, ref: Reference, micro, cfg: DPOConfig, autocast, scaler):
    """Forward + backward over the micro-batches [(idx, labels, keys)] of one optimizer step. Each
    micro-batch's mean loss is divided by the number of micro-batches, so the accumulated gradient
    is the gradient of the mean over all pairs of the step."""
    rows = []
    for idx, labels, keys in micro:
        ref_c, ref_r = ref.logps(idx, labels, keys)  # no grad: computed before the policy's graph
        pol_c, pol_r = concatenated_logps(policy, idx, labels, autocast)
        losses, cr, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss, cfg.label_smoothing)
        loss = losses.mean() / len(micro)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        rows.append(pair_metrics(losses, cr, rr, pol_c, pol_r))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


@torch.no_grad()
def evaluate_pairs(policy, ref: Reference, tokenized, keys, pad_id, device, batch_size, autocast) -> dict:
    sums, n = {}, 0
    with _eval(policy):
        for s in range(0, len(tokenized), batch_size):
            idx, labels = collate_pairs(tokenized[s: s + batch_size], pad_id, device)
            ref_c, ref_r = ref.logps(idx, labels, keys[s: s + batch_size])
            pol_c, pol_r = concatenated_logps(policy, idx, labels, autocast)
            m = pair_metrics(*dpo_loss(pol_c, pol_r, ref_c, ref_r), pol_c, pol_r)
            b = idx.size(0) // 2
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
    return {f"eval_{k}": v / n for k, v in sums.items()}


def plot_dpo(log: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "reward_accuracy")):
        tr = [(r["step"], r[key]) for r in log if key in r]
        ev = [(r["step"], r["eval_" + key]) for r in log if "eval_" + key in r]
        if tr:
            ax.plot(*zip(*tr), alpha=0.6, label="train")
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _samples(model, tok, prompts, max_new_tokens, eos_id) -> list[str]:
    out = []
    room = model.config.block_size - max_new_tokens
    for p in prompts:
        ids = tok.encode(p)[-room:]
        gen = model.generate(torch.tensor([ids], device=model.lm_head.weight.device), max_new_tokens,
                             temperature=0, eos_token_id=eos_id)[0, len(ids):].tolist()
        out.append(tok.decode([t for t in gen if t != eos_id]))
    return out


def train(cfg: DPOConfig) -> dict:
    from finetune import lr_at, optimizer_step, setup_precision, start_run, weight_dtype

    device, device_type, precision, out, tok = start_run(cfg)
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (5e-4 if lora else 1e-6)
    policy = GPT.from_pretrained(cfg.init_from, dtype=weight_dtype(precision, lora), device=device)
    max_length = min(cfg.max_length, policy.config.block_size)
    pairs = load_pairs(cfg.data_file, cfg.split)
    if cfg.n_samples:
        pairs = pairs[: cfg.n_samples]
    random.Random(cfg.seed).shuffle(pairs)
    n_val = max(1, round(len(pairs) * cfg.val_frac)) if cfg.val_frac > 0 else 0
    val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    train_t = tokenize_pairs(train_pairs, tok, tok.eot_id, max_length, min(cfg.max_prompt_length, max_length - 1))
    val_t = tokenize_pairs(val_pairs, tok, tok.eot_id, max_length, min(cfg.max_prompt_length, max_length - 1))
    if cfg.eval_pairs:
        val_t = val_t[: cfg.eval_pairs]
    if not train_t:
        raise ValueError("no training pairs left")
    train_k, val_k = [pair_key(t) for t in train_t], [pair_key(t) for t in val_t]
    print(f"{len(train_t)} training pairs, {len(val_t)} held out")

    autocast, scaler = setup_precision(precision, device_type)
    prompts = [p["prompt"] for p in val_pairs[: cfg.n_generate]]
    before = _samples(policy, tok, prompts, cfg.max_new_tokens, tok.eot_id) if prompts else []
    if lora:
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    policy.grad_checkpointing = cfg.grad_checkpointing
    dtypes = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    ref = Reference(cfg.reference, policy, autocast, dtypes[cfg.ref_dtype],
                    None if cfg.ref_device == "same" else cfg.ref_device)
    if cfg.reference == "precomputed":
        tag = hashlib.sha1(json.dumps([cfg.init_from, str(Path(cfg.init_from).resolve()), precision,
                                       train_k, val_k]).encode()).hexdigest()
        n = precompute_reference(ref, train_t + val_t, train_k + val_k, tok.eot_id, device, cfg.batch_size,
                                 out / "ref_logps.json", tag)
        print(f"reference log-probs: {n} computed, {len(train_t) + len(val_t) - n} from {out / 'ref_logps.json'}")
    policy.train()
    optimizer = make_dpo_optimizer(policy, cfg.optimizer, lr, cfg.weight_decay)

    rng = random.Random(cfg.seed)
    order: list[int] = []
    log: list[dict] = []
    log_f = open(out / "log.jsonl", "w")

    def record(row):
        log.append(row)
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()

    def save(where: Path):
        if lora:
            save_adapter(policy, where, cfg.init_from)
        else:
            policy.save_pretrained(where, format="native")

    t0 = time.time()
    for step in range(cfg.max_steps + 1):
        if val_t and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            ev = evaluate_pairs(policy, ref, val_t, val_k, tok.eot_id, device, cfg.batch_size, autocast)
            record(dict(step=step, **ev))
            print(f"step {step}: eval loss {ev['eval_loss']:.4f}, reward accuracy {ev['eval_reward_accuracy']:.3f}, "
                  f"margin {ev['eval_reward_margin']:.4f}")
        if step == cfg.max_steps:
            break
        micro = []
        for _ in range(cfg.grad_accum):
            picked = []
            for _ in range(cfg.batch_size):
                if not order:
                    order = list(range(len(train_t)))
                    rng.shuffle(order)
                picked.append(order.pop())
            idx, labels = collate_pairs([train_t[i] for i in picked], tok.eot_id, device)
            micro.append((idx, labels, [train_k[i] for i in picked]))
        this_lr = lr_at(step, cfg.max_steps, lr, 0.0, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = this_lr
        m = dpo_step(policy, ref, micro, cfg, autocast, scaler)
        gnorm = optimizer_step(policy, optimizer, scaler, cfg.grad_clip)
        record(dict(step=step + 1, lr=this_lr, grad_norm=gnorm, **m))
        if (step + 1) % cfg.log_interval == 0 or step == 0:
            print(f"step {step + 1}/{cfg.max_steps}: loss {m['loss']:.4f}, reward accuracy "
                  f"{m['reward_accuracy']:.3f}, margin {m['reward_margin']:.4f}, lr {this_lr:.2e}")
        if cfg.save_interval and (step + 1) % cfg.save_interval == 0:
            save(out / f"ckpt_step{step + 1}")
    log_f.close()
    save(out / ("adapter" if lora else "model"))
    plot_dpo(log, out / "dpo.png")
    after = _samples(policy, tok, prompts, cfg.max_new_tokens, tok.eot_id) if prompts else []
    md = ["# Samples before and after DPO\n"]
    for p, b, a in zip(prompts, before, after):
        md += [f"## Prompt\n```\n{p[-500:]}\n```\n", f"**Before:** {b}\n", f"**After:** {a}\n"]
    atomic_write(out / "samples.md", lambda p: Path(p).write_text("\n".join(md)))
    print(f"done in {time.time() - t0:.0f} s; outputs in {out}")
    return dict(log=log)


# -----------------------------------------------------------------------------------------------
# 6. Benchmark: memory of the three reference modes


def _bench_child(mode: str, args) -> dict:
    """GPT-2-small-shaped LoRA policy (random weights), the reference set up the given way, two
    training steps. 'weights + reference' = RSS after the reference exists minus RSS before the
    model was built; for precomputed it includes the cached log-probs (and the pass computing them)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = _rss_mb()
    cfg = DPOConfig(reference=mode, lora_rank=16, lora_alpha=32, beta=0.1)
    policy = GPT(GPTConfig.preset("gpt2", vocab_pad_multiple=1, block_size=args.seq_len))
    apply_lora(policy, 16, 32, 0.0, "q,v")
    g = torch.Generator().manual_seed(1)
    data = [{"prompt": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist(),
             "chosen": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist(),
             "rejected": torch.randint(0, 50257, (args.seq_len // 2,), generator=g).tolist()} for _ in range(8)]
    keys = [pair_key(t) for t in data]
    ref = Reference(mode, policy)
    if mode == "precomputed":
        precompute_reference(ref, data, keys, 0, "cpu", args.batch_size, None, "bench")
    ref_mb = _rss_mb() - base
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()
    for s in range(2):
        b = data[s * args.batch_size: (s + 1) * args.batch_size]
        idx, labels = collate_pairs(b, 0)
        dpo_step(policy, ref, [(idx, labels, keys[s * args.batch_size: (s + 1) * args.batch_size])], cfg,
                 contextlib.nullcontext, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _rss_mb("VmHWM")
    return dict(mode=mode, weights_plus_reference_mb=ref_mb, peak_mb=peak - base)


def estimate(gpus=(16, 40)) -> str:
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


def cmd_bench(argv):
    import statistics
    import subprocess

    ap = argparse.ArgumentParser(prog="dpo.py bench", description="peak memory of --reference copy | "
                                 "adapter_off | precomputed, each in a fresh process (CPU), or --estimate",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--estimate", action="store_true", help="print the paper arithmetic for 16/40 GB GPUs")
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (prompt + response)")
    ap.add_argument("--batch_size", type=int, default=2, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.estimate:
        print("ESTIMATE (arithmetic, not measured): bf16 weights, fp32 trainable tensors with AdamW\n")
        print(estimate())
        return
    if args.child:
        print(json.dumps(_bench_child(args.child, args)))
        return
    res = {m: [] for m in ("copy", "adapter_off", "precomputed")}
    for rep in range(args.repeats):
        for mode in res:
            cmd = [sys.executable, __file__, "bench", "--child", mode, f"--seq_len={args.seq_len}",
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    train(parse_args(argv))


if __name__ == "__main__":
    main()
