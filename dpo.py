"""
dpo.py: Direct Preference Optimization (Rafailov et al. 2023) of a GPT-2 / LLaMA model on preference
pairs (a prompt, a chosen and a rejected response), fully or with LoRA (on a 4-bit base with
--quantize nf4), on a CPU, one GPU, or several with torchrun (DDP, or FSDP2 with --fsdp).

Run it:
    python dpo.py --init_from out-finetune/best_model --data_file hh_pairs.jsonl --lora_rank 16
    python dpo.py --init_from gpt2-medium --reference adapter_off --beta 0.1 --max_steps 1000
    python dpo.py --init_from gpt2 --lora_rank 0 --reference precomputed --loss ipo     # full, no 2nd copy
    torchrun --nproc_per_node=8 dpo.py --init_from path/to/llama-2-7b-hf --lora_rank 0 --fsdp \\
        --reference precomputed --precision bf16 --grad_checkpointing
    python dpo.py --help
(The memory of the three reference modes is measured by `python bench_memory.py dpo`.)

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

Data (prepare_data.load_pairs): HH-RLHF (Anthropic/hh-rlhf via `datasets`, or a local jsonl with its
chosen/rejected whole conversations) or a generic jsonl of {prompt, chosen, rejected}.

out_dir gets: config.json, log.jsonl (per step: loss, reward_accuracy, reward_margin, chosen/rejected
rewards, policy log-probs, lr; per eval the same with an eval_ prefix), dpo.png, model/ (the tuned
model; merged, with LoRA) and adapter/ (LoRA, PEFT format), ref_logps.json (precomputed mode),
samples.md (before / after), summary.json ({"before": {...}, "after": {...}}: held-out reward_accuracy and
chosen_rate, the share of answers equal to the chosen one), ckpt/ (the state --resume continues from).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bpe import load_tokenizer

from housekeeping import atomic_write
from lora import LoRALinear, apply_lora, load_base, save_adapter, unload_lora
from housekeeping import load_train_state, resumed_config, save_train_state
from model import GPT, OPTIMIZER_STATES, Block, lr_schedule, make_optimizer
from housekeeping import (DEVICE_HELP, GracefulStop, all_ranks, autocast_and_scaler, before_after, flag, check_finite,
                          close_run, distribute, end_distributed, fit_to_context, fits_in_memory, gathered, grad_sync,
                          init_distributed, open_run, parse_config, pick_device, pick_precision, plot_log,
                          previous_stage, resolve_init_from, rewrite_log, rng_state, run_main, seed_everything,
                          set_rng_state)
from prepare_data import builtin_tasks, exact_match, load_pairs

LOSS_TYPES = ("sigmoid", "ipo")

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class DPOConfig:
    init_from: str = flag("auto", "starting (SFT) model: gpt2 name, HF model dir (gpt2/llama), or our checkpoint dir; "
                                 "auto: finetune.py's out-finetune/best_model if there is one (then, with no "
                                 "--data_file, on the built-in preference pairs: the offline life cycle), else gpt2")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model's)")
    data_file: str | None = flag(None, "jsonl of {prompt, chosen, rejected} or HH-RLHF {chosen, rejected}; default: "
                                      "the built-in preference pairs (offline) when --init_from auto finds "
                                      "out-finetune/best_model, else Anthropic/hh-rlhf from the hub")
    split: str = flag("train", "datasets split when no --data_file")
    val_file: str | None = flag(None, "held-out pairs (the --data_file format) for evaluation and the answers before "
                                     "and after, instead of a --val_frac split of the data")
    n_samples: int = flag(0, "use only the first N pairs (0 = all)", min=0)
    val_frac: float = flag(0.1, "fraction of pairs held out for evaluation", min=0.0, max=0.9)
    out_dir: str = flag("out-dpo", "where logs, plots and weights go")
    overwrite: bool = flag(False, "replace a run already in out_dir (otherwise a fresh run there stops)")
    resume: bool = flag(False, "continue the run in out_dir from its last state (out_dir/ckpt/), reusing its cached "
                              "reference log-probs; flags given now override its config.json, except the model and "
                              "what is trained")
    ckpt_interval: int = flag(50, "also write that resumable state every N steps (it is always written at the end, "
                                 "and on Ctrl-C / SIGTERM; 0 = only then)", min=0)
    stop_at_step: int = flag(0, "end after this many steps as if killed there (no final state or outputs): for "
                               "testing --resume; 0 = off", min=0)
    quantize: str = flag("none", "nf4: keep the frozen base in 4 bits (QLoRA; needs --lora_rank > 0): about a quarter "
                                "of bf16's memory, at the cost of dequantising each weight when it is used",
                        choices=["none", "nf4"])
    fsdp: bool = flag(False, "under torchrun: shard the policy over the ranks (FSDP2) instead of a whole copy "
                            "per rank (DDP); needs --reference adapter_off or precomputed")
    max_length: int = flag(512, "longest prompt + response in tokens", min=2)
    max_prompt_length: int = flag(256, "prompts are cut from the left to this many tokens when a pair is too long",
                                 min=1)
    # the loss
    beta: float = flag(0.1, "strength of the implicit KL penalty", min=1e-6)
    loss: str = flag("sigmoid", "sigmoid (DPO) | ipo", choices=LOSS_TYPES)
    label_smoothing: float = flag(0.0, "conservative DPO: assumed probability that a preference label is flipped",
                                 min=0.0, max=0.49)
    rpo_alpha: float = flag(0.0, "RPO: add this times the chosen responses' mean token NLL (an SFT term) to the "
                                "loss, so their likelihood cannot fall while the margin grows (0 = plain DPO)",
                           min=0.0)
    reference: str = flag("adapter_off", "copy | adapter_off (LoRA only; with --lora_rank 0 copy is used) | "
                                        "precomputed",
                         choices=["copy", "adapter_off", "precomputed"])
    ref_dtype: str = flag("same", "copy: dtype of the frozen copy", choices=["same", "fp32", "bf16", "fp16"])
    ref_device: str = flag("same", "copy: device of the frozen copy (e.g. cuda:1)")
    # the policy: LoRA or full, as in finetune.py
    lora_rank: int = flag(16, "LoRA rank; 0 = full fine-tuning", min=0)
    lora_alpha: float = flag(32.0, "LoRA scaling numerator", min=0.0)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch input", min=0.0, max=1.0)
    lora_targets: str = flag("q,v", "LoRA targets (see lora.py)")
    batch_size: int = flag(2, "pairs per micro-batch", min=1)
    grad_accum: int = flag(4, "micro-batches per optimizer step", min=1)
    grad_checkpointing: bool = flag(False, "recompute activations in backward")
    precision: str = flag("auto", "auto: bf16 on GPUs with bf16 tensor cores, fp16 on older GPUs, fp32 on a CPU",
                         choices=["auto", "fp32", "fp16", "bf16"])
    device: str = flag("auto", DEVICE_HELP)
    optimizer: str = flag("adamw", "the optimizer (rmsprop: the DPO paper's)", choices=list(OPTIMIZER_STATES))
    lr: float = flag(0.0, "peak learning rate (0 = 5e-4 with LoRA, 1e-6 full)", min=0.0)
    warmup_steps: int = flag(10, "linear warmup steps, then cosine decay to 0", min=0)
    weight_decay: float = flag(0.0, "decoupled weight decay on 2-D weights", min=0.0)
    grad_clip: float = flag(1.0, "clip the global gradient norm (0 = off)", min=0.0)
    max_steps: int = flag(100, "optimizer steps", min=1)
    eval_interval: int = flag(25, "evaluate every N steps (and at 0 and the end)", min=1)
    eval_pairs: int = flag(200, "held-out pairs per evaluation (0 = all)", min=0)
    save_interval: int = flag(0, "also keep weights every N steps (0 = end only)", min=0)
    n_generate: int = flag(3, "held-out prompts answered before and after", min=0)
    max_new_tokens: int = flag(64, "longest sample answer", min=1)
    log_interval: int = flag(10, "print metrics every N steps", min=1)
    seed: int = flag(1337, "seed for split, order and init")


FIXED = ("init_from", "tokenizer", "lora_rank", "lora_alpha", "lora_targets", "reference")  # fixed once a run exists
SFT_MODEL = "out-finetune/best_model"  # what `python finetune.py` leaves
# The offline life cycle's defaults (the flags given win), measured with finetune.py's 2.6M-parameter
# model on the built-in pairs (BENCHMARKS.md, the life cycle): LoRA (rank 16) on every projection, beta
# 0.5 (at 0.1 the answers lost their end-of-text token), lr 3e-4 and RPO (--rpo_alpha 1: the chosen
# answers' NLL added, which keeps their likelihood up), 200 steps (at 100, held-out reward accuracy was
# 0.840, at 200 0.915). The pairs ask about made-up names: fine-tuning copies the names it read in
# pretraining and copies new ones (the held-out modules') worse, and made-up names are new in the same
# way. Pairs about the fine-tuning questions themselves taught the ranking (0.905) but lowered the share
# of right answers (chosen_rate 0.665 -> 0.645); made-up names raise it (0.665 -> 0.700). Faster is
# worse: lr 2e-3 left it at 0.665. Answers are a few tokens: 24 new ones are plenty, and 200 held-out
# answers measure chosen_rate to +-0.035.
LAPTOP = dict(lr=3e-4, rpo_alpha=1.0, beta=0.5, lora_targets="all", max_steps=200, eval_interval=100, n_generate=200,
              max_new_tokens=24)


def parse_args(argv=None) -> DPOConfig:
    c, given = parse_config(DPOConfig, argv, __doc__.split("\n\n")[0].strip(),
                            alt_defaults={"offline life cycle": LAPTOP})
    if c.resume:
        c = resumed_config(DPOConfig, c, given, c.out_dir, FIXED)
    if c.init_from == "auto":
        c.init_from = previous_stage(SFT_MODEL) or "gpt2"
        if c.init_from == SFT_MODEL and c.data_file is None:
            c.data_file = str(builtin_tasks()["pairs"])
            c.val_file = c.val_file or str(builtin_tasks()["pairs_test"])  # pairs about held-out modules
            for k, v in LAPTOP.items():
                setattr(c, k, given.get(k, v))
            print(f"offline default: {SFT_MODEL} (from finetune.py) on the built-in preference pairs {c.data_file}; "
                  f"the real recipe names them: --init_from gpt2 (HH-RLHF from the hub)")
    c.init_from = resolve_init_from(c.init_from)  # a run directory: its best or final model
    if c.max_prompt_length >= c.max_length:
        raise ValueError(f"--max_prompt_length {c.max_prompt_length} must be < --max_length {c.max_length}")
    if c.reference == "adapter_off" and c.lora_rank == 0:
        if "reference" in given:
            raise ValueError("--reference adapter_off needs a LoRA policy (--lora_rank > 0); use copy or precomputed")
        if c.fsdp:
            raise ValueError("--fsdp with --lora_rank 0 (full fine-tuning): use --reference precomputed")
        print("note: with --lora_rank 0 (full fine-tuning) the reference is a frozen copy (--reference copy)")
        c.reference = "copy"
    if c.fsdp and c.reference == "copy":
        raise ValueError("--fsdp: use --reference adapter_off (LoRA) or precomputed; a frozen copy would need a "
                         "second sharded model")
    # sizes beyond the machine fail here, before a file is written (lower bounds, as in finetune.py)
    for need, what in ((32 * c.batch_size * c.grad_accum, f"--batch_size {c.batch_size} x --grad_accum {c.grad_accum}"),
                       (8 * c.max_new_tokens, f"--max_new_tokens {c.max_new_tokens}"),
                       (8 * c.lora_rank, f"--lora_rank {c.lora_rank}")):
        fits_in_memory(need, what)
    return c


# -----------------------------------------------------------------------------------------------
# 2. Data: tokenization, batches


def tokenize_pairs(pairs: list[dict], tok, eos_id: int, max_length: int, max_prompt_length: int) -> list[dict]:
    """Token ids of each pair, EOS after each response. A pair longer than max_length loses prompt
    tokens from the LEFT first (down to max_prompt_length: the end of the prompt, right before the
    answer, matters most), then response tokens from the end. Pairs whose responses are identical
    carry no preference signal (their loss gradient is zero): they are dropped and counted. An empty
    prompt is read as the end-of-text token alone, so that the first response token has a context."""
    out, n_same, n_cut = [], 0, 0
    for pair in pairs:
        if pair["chosen"] == pair["rejected"]:
            n_same += 1
            continue
        p = tok.encode(pair["prompt"]) or [eos_id]
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


def pair_key(t: dict) -> str:
    return hashlib.sha1(json.dumps([t["prompt"], t["chosen"], t["rejected"]]).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------------------------
# 3. Log-probabilities and the loss


def concatenated_logps(model, idx, labels, autocast=contextlib.nullcontext):
    """(chosen, rejected) summed log-probs of a collate_pairs batch, from one forward pass. Each
    token's log p is minus its cross-entropy, which the model computes itself (reduction="none")
    with ChunkedCrossEntropy: in fp32, a chunk of rows at a time, on the padded vocabulary (its
    extra ids have probability 0). A log-softmax over the vocabulary in bf16 would lose the small
    differences DPO lives on, and a full fp32 one would be the biggest tensor of the step
    (2B x T x V). Going through forward (not its parts) lets DDP and FSDP do their work."""
    with autocast():
        _, nll = model(idx, labels, reduction="none")
    logps = -nll.float().sum(-1)
    B = idx.size(0) // 2
    return logps[:B], logps[B:]


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


METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "policy_chosen_logps",
           "policy_rejected_logps")


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """Means over the pairs, as device tensors (read once per step). Reward accuracy counts a pair
    only when chosen's reward is strictly higher (a tie is 0)."""
    values = (losses.detach(), (chosen_rewards > rejected_rewards).float(), chosen_rewards - rejected_rewards,
              chosen_rewards, rejected_rewards, policy_chosen.detach(), policy_rejected.detach())
    return {k: v.float().mean() for k, v in zip(METRICS, values)}


# -----------------------------------------------------------------------------------------------
# 4. The reference model, three ways


@contextlib.contextmanager
def adapters_off(model):
    """The LoRA policy with its adapters switched off is exactly the model it started from (W + 0):
    a reference that costs no memory. Setting each adapter's scaling to 0 switches it off; eval mode
    switches dropout off, so the reference is deterministic. (A model without adapters: eval mode only.)"""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
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
        with adapters_off(self.policy):  # precomputed with full fine-tuning: before any update, as it is
            return concatenated_logps(self.policy, idx, labels, self.autocast)

    def logps(self, idx, labels, keys):
        if self.mode != "precomputed":
            return self.compute(idx, labels)
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise KeyError(f"pairs {missing[:5]} have no precomputed reference log-probs")
        v = torch.tensor([self.cache[k] for k in keys], dtype=torch.float32)
        v = v.pin_memory().to(idx.device, non_blocking=True) if idx.is_cuda else v  # no wait for the GPU
        return v[:, 0], v[:, 1]


def weights_fingerprint(name_or_dir) -> list:
    """What a cache of a model's outputs depends on, cheaply: the path and each file's name, size and
    mtime (a new save changes them); a name that is no local path (a hub id) stands for itself."""
    p = Path(name_or_dir).expanduser()
    files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) if p.exists() else []
    return [str(name_or_dir)] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def precompute_reference(ref: Reference, tokenized: list[dict], keys: list[str], pad_id: int, device,
                         batch_size: int, path: Path | None, tag: str):
    """Fill ref.cache for every pair, in one pass before any update (the policy still IS the
    reference then; with LoRA the adapters are switched off anyway). The cache file is keyed by
    `tag` (model + tokenization); it is written as it grows, so an interrupted run resumes. A
    damaged cache (a kill mid-write, a full disk) is rebuilt, with a warning."""
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("tag") == tag:
                ref.cache.update(saved["logps"])
            else:  # stale: other weights (or their files were saved again), data or settings
                print(f"note: {path} was computed for other weights, pairs or settings; recomputing it")
        except (ValueError, KeyError, AttributeError, RecursionError) as e:
            print(f"warning: {path} is damaged ({type(e).__name__}); recomputing the reference log-probs")
    todo = [i for i, k in enumerate(keys) if k not in ref.cache]

    def write():
        if path is not None:
            atomic_write(path, lambda p: Path(p).write_text(json.dumps({"tag": tag, "logps": ref.cache})))

    for n, s in enumerate(range(0, len(todo), batch_size)):
        chunk = todo[s: s + batch_size]
        idx, labels = collate_pairs([tokenized[i] for i in chunk], pad_id, device)
        c, r = ref.compute(idx, labels)
        for i, a, b in zip(chunk, c.tolist(), r.tolist()):
            ref.cache[keys[i]] = (a, b)
        if n % 20 == 19:
            write()
    write()
    return len(todo)


# -----------------------------------------------------------------------------------------------
# 5. Training


def dpo_step(policy, ref: Reference, micro, c: DPOConfig, autocast, scaler) -> dict:
    """Forward + backward over the micro-batches [(idx, labels, keys)] of one optimizer step. Each
    micro-batch's mean loss is divided by the number of micro-batches, so the accumulated gradient
    is the gradient of the mean over all pairs of the step. Metrics stay on the device."""
    sums = {}
    for k, (idx, labels, keys) in enumerate(micro):
        ref_c, ref_r = ref.logps(idx, labels, keys)  # no grad: computed before the policy's graph
        with grad_sync(policy, k == len(micro) - 1):  # ranks average their gradients after the last one
            pol_c, pol_r = concatenated_logps(policy, idx, labels, autocast)
            losses, cr, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, c.beta, c.loss, c.label_smoothing)
            loss = losses.mean()
            if c.rpo_alpha:  # RPO (Pang et al. 2024): DPO alone may lower both responses' likelihood, the
                # chosen one less; the NLL of the chosen tokens keeps the policy writing them
                loss = loss + c.rpo_alpha * -pol_c.sum() / (labels[: len(pol_c)] != -100).sum().clamp(min=1)
            loss = loss / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in pair_metrics(losses, cr, rr, pol_c, pol_r).items():
            sums[k] = sums.get(k, 0) + v / len(micro)
    return sums


@torch.no_grad()
def evaluate_pairs(policy, ref: Reference, tokenized, keys, pad_id, device, batch_size, autocast,
                   loss_args=()) -> dict:
    """The metrics of training (loss_args: beta, loss type, label smoothing, as in training) on held-out pairs."""
    sums, n = {}, 0
    was = policy.training
    policy.eval()
    for s in range(0, len(tokenized), batch_size):
        idx, labels = collate_pairs(tokenized[s: s + batch_size], pad_id, device)
        ref_c, ref_r = ref.logps(idx, labels, keys[s: s + batch_size])
        pol_c, pol_r = concatenated_logps(policy, idx, labels, autocast)
        b = idx.size(0) // 2
        for k, v in pair_metrics(*dpo_loss(pol_c, pol_r, ref_c, ref_r, *loss_args), pol_c, pol_r).items():
            sums[k] = sums.get(k, 0) + v * b
        n += b
    policy.train(was)
    return {f"eval_{k}": (v / n).item() for k, v in sums.items()}


def _samples(model, tok, prompts, max_new_tokens, eos_id) -> list[str]:
    """Greedy answers, one prompt at a time; a progress line every 10 s."""
    out, shown = [], time.time()
    for i, p in enumerate(prompts):
        if time.time() - shown > 10:
            print(f"generating: {i}/{len(prompts)} answers", flush=True)
            shown = time.time()
        [ids], n_new = fit_to_context([tok.encode(p) or [eos_id]], max_new_tokens, model.config.block_size)
        gen = model.generate(torch.tensor([ids], device=model.lm_head.weight.device), n_new,
                             temperature=0, eos_token_id=eos_id)[0, len(ids):].tolist()
        out.append(tok.decode([t for t in gen if t != eos_id]))
    return out


def train(c: DPOConfig) -> dict:
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
    lora = c.lora_rank > 0
    lr = c.lr or (5e-4 if lora else 1e-6)
    # the model before its tokenizer: a wrong --init_from is then the error, not a tokenizer it lacks
    policy = load_base(c.init_from, precision, lora, c.quantize, device, c.fsdp)
    tok = load_tokenizer(c.tokenizer, c.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    max_length = min(c.max_length, policy.config.block_size)
    pairs = load_pairs(c.data_file, c.split)
    pairs = pairs[: c.n_samples] if c.n_samples else pairs
    random.Random(c.seed).shuffle(pairs)
    n_val = 0 if c.val_file else max(1, round(len(pairs) * c.val_frac)) if c.val_frac > 0 else 0
    val_pairs, train_pairs = load_pairs(c.val_file) if c.val_file else pairs[:n_val], pairs[n_val:]
    tk = lambda ps: tokenize_pairs(ps, tok, tok.eot_id, max_length, min(c.max_prompt_length, max_length - 1))  # noqa
    train_t, val_t = tk(train_pairs), tk(val_pairs)[: c.eval_pairs or None]
    if not train_t:
        raise ValueError("no training pairs left")
    train_k, val_k = [pair_key(t) for t in train_t], [pair_key(t) for t in val_t]
    say(f"{len(train_t)} training pairs, {len(val_t)} held out")

    autocast, scaler = autocast_and_scaler(precision, device_type)
    prompts = [p["prompt"] for p in val_pairs[: c.n_generate]]
    before = _samples(policy, tok, prompts, c.max_new_tokens, tok.eot_id)

    def build(g: GPT):  # the policy around a GPT (also around an empty one, to gather FSDP shards into)
        return apply_lora(g, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets) if lora else g

    build(policy)
    policy.grad_checkpointing = c.grad_checkpointing
    dtypes = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    ref = Reference(c.reference, policy, autocast, dtypes[c.ref_dtype],
                    None if c.ref_device == "same" else c.ref_device)
    train_module = distribute(policy, device, c.fsdp, precision, block_type=Block)  # DDP wraps the policy; FSDP shards it in place
    seed_everything(c.seed + rank)  # the same init on every rank above; from here each rank its own dropout
    if c.reference == "precomputed":  # every rank computes every pair (under FSDP each forward needs them all)
        # the cache holds for these weights (each file's size and mtime: a new save changes them), in this
        # precision and quantization, on these pairs as tokenized: anything else is recomputed
        tag = hashlib.sha1(json.dumps([c.init_from, weights_fingerprint(c.init_from), precision, c.quantize,
                                       train_k, val_k]).encode()).hexdigest()
        n = precompute_reference(ref, train_t + val_t, train_k + val_k, tok.eot_id, device, c.batch_size,
                                 out / "ref_logps.json" if master else None, tag)
        say(f"reference log-probs: {n} computed, {len(train_t) + len(val_t) - n} from {out / 'ref_logps.json'}")
    policy.train()
    optimizer = make_optimizer(policy, c.optimizer, lr, c.weight_decay, fused=device_type == "cuda")
    say(f"precision {precision}, {c.max_steps} steps of {c.batch_size} x {c.grad_accum} x {world} rank(s) = "
        f"{c.batch_size * c.grad_accum * world} pairs on {device}"
        + (" (FSDP)" if c.fsdp and world > 1 else " (DDP)" if world > 1 else ""))

    # the run exists from here on (a run that failed while loading leaves nothing behind)
    if master:
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(asdict(c), indent=2)))
    rng, order, log, start = random.Random(c.seed), [], [], 0  # the same order on every rank: each takes its share
    if c.resume:  # the weights, optimizer, data order and RNG of the last saved step
        start, extra = load_train_state(out, policy, optimizer)
        rng.setstate(extra["shuffle"])
        order = extra["order"]
        set_rng_state(extra["rng"][rank if len(extra["rng"]) == world else 0], device)
        if master:
            log = rewrite_log(out / "log.jsonl", lambda r: r["step"] <= start if "loss" in r else r["step"] < start)
        say(f"resuming at step {start}")
    log_f = open(out / "log.jsonl", "a") if master else None

    def save_state(step: int):
        extra = dict(shuffle=rng.getstate(), order=order, rng=all_ranks(rng_state(device)))
        save_train_state(out, policy, optimizer, step, extra, master)
        say(f"resumable state: step {step} in {out / 'ckpt'}")

    def record(row):
        if master:
            log.append(row)
            log_f.write(json.dumps(row) + "\n")
            log_f.flush()

    def save(where: Path, merged: bool = False):
        """LoRA: the PEFT adapter (merged: the model, W + scaling B A); full: the model. Under FSDP every
        rank gathers, rank 0 writes."""
        m = gathered(policy, lambda: build(GPT(policy.config)), master)
        if m is not None and lora and merged:
            unload_lora(m, merge=True)
        if m is not None:
            if lora and not merged:
                save_adapter(m, where, c.init_from)
            else:
                m.save_pretrained(where, "native", tok.source)

    t0 = time.time()
    stop = GracefulStop()  # Ctrl-C / SIGTERM: the state at the next step boundary, then exit
    for step in range(start, c.max_steps + 1):
        if val_t and (step % c.eval_interval == 0 or step == c.max_steps):
            ev = evaluate_pairs(policy, ref, val_t, val_k, tok.eot_id, device, c.batch_size, autocast,
                                (c.beta, c.loss, c.label_smoothing))
            check_finite(step, eval_loss=ev["eval_loss"])
            record(dict(step=step, **ev))
            say(f"step {step}: eval loss {ev['eval_loss']:.4f}, reward accuracy {ev['eval_reward_accuracy']:.3f}, "
                f"margin {ev['eval_reward_margin']:.4f}")
        if step == c.max_steps:
            break
        micro = []
        for k in range(c.grad_accum * world):  # every rank draws the global batch and keeps its share
            picked = []
            for _ in range(c.batch_size):
                if not order:
                    order = list(range(len(train_t)))
                    rng.shuffle(order)
                picked.append(order.pop())
            if k // c.grad_accum == rank:
                idx, labels = collate_pairs([train_t[i] for i in picked], tok.eot_id, device)
                micro.append((idx, labels, [train_k[i] for i in picked]))
        this_lr = lr * lr_schedule(step, c.max_steps, c.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = this_lr
        m = dpo_step(train_module, ref, micro, c, autocast, scaler)
        # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
        if scaler is not None:
            scaler.unscale_(optimizer)
        # clip the global norm: a rare batch with a huge gradient (a loss spike) then moves the weights a
        # bounded distance instead of wrecking them; the norm before clipping is what gets logged
        params = [p for p in policy.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP: the norm over every rank's shard
            gnorm = gnorm.full_tensor()
        if scaler is not None:
            scaler.step(optimizer)  # skipped if a gradient overflowed (inf/NaN); the scale then shrinks
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the next step's backward adds into fresh gradients
        mean = all_ranks_mean(m)
        *vals, gnorm = torch.stack([v.float() for v in (*mean.values(), gnorm)]).tolist()  # the step's one read
        m = dict(zip(mean, vals))
        check_finite(step + 1, scaler, loss=m["loss"], grad_norm=gnorm)
        record(dict(step=step + 1, lr=this_lr, grad_norm=gnorm, **m))
        if (step + 1) % c.log_interval == 0 or step == 0:
            say(f"step {step + 1}/{c.max_steps}: loss {m['loss']:.4f}, reward accuracy "
                f"{m['reward_accuracy']:.3f}, margin {m['reward_margin']:.4f}, lr {this_lr:.2e}")
        if c.save_interval and (step + 1) % c.save_interval == 0:
            save(out / f"ckpt_step{step + 1}")
        if c.ckpt_interval and (step + 1) % c.ckpt_interval == 0 and step + 1 < c.max_steps:
            save_state(step + 1)
        if step + 1 == c.stop_at_step:
            say(f"stopping at step {step + 1} (--stop_at_step), as if killed")
            end_distributed()
            return dict(log=log)
        if stop.requested(device) and step + 1 < c.max_steps:
            save_state(step + 1)
            if master:
                log_f.close()
                close_run(out)
            stop.exit(step + 1, out / "ckpt")
    stop.restore()
    if log_f:
        log_f.close()
    save_state(c.max_steps)  # the end, too: --resume with a larger --max_steps continues from here
    save(out / ("adapter" if lora else "model"))
    after = _samples(policy, tok, prompts, c.max_new_tokens, tok.eot_id)
    # before -> after on the held-out pairs: reward accuracy (0 before: policy = reference, every reward 0,
    # a tie counts as wrong; 0.5 is chance), and chosen_rate, the share of greedy answers that pass the
    # task's check (equal to the chosen answer: the built-in tasks' exact match)
    evals = [r for r in log if "eval_reward_accuracy" in r]
    summary = {"before": {}, "after": {}}
    if evals:
        for k, r in (("before", evals[0]), ("after", evals[-1])):
            summary[k].update(reward_accuracy=r["eval_reward_accuracy"], reward_margin=r["eval_reward_margin"])
    if prompts:
        chosen = [p["chosen"] for p in val_pairs[: len(prompts)]]
        summary["before"]["chosen_rate"], summary["after"]["chosen_rate"] = (
            exact_match(before, chosen), exact_match(after, chosen))
    if lora:  # the merged model too, for the stages after (hellaswag.py, chat.py) and any HF tool
        save(out / "model", merged=True)
    if master:
        plot_log(log, out / "dpo.png", [["loss", "eval_loss"], ["reward_accuracy", "eval_reward_accuracy"]],
                 titles=["loss", "reward accuracy"])
        md = ["# Samples before and after DPO\n"]
        for p, b, a in zip(prompts, before, after):
            md += [f"## Prompt\n```\n{p[-500:]}\n```\n", f"**Before:** {b}\n", f"**After:** {a}\n"]
        atomic_write(out / "samples.md", lambda p: Path(p).write_text("\n".join(md)))
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
        close_run(out)
    say(f"done in {time.time() - t0:.0f} s")
    if prompts:
        question = prompts[0].rsplit("### Instruction:", 1)[-1].split("### Response:")[0].strip()[-150:]
        say(f"a held-out answer: {question!r} -> before {before[0].strip()!r}, after "
            f"{after[0].strip()!r} (chosen {val_pairs[0]['chosen']!r}, rejected {val_pairs[0]['rejected']!r})")
    say(before_after(summary, f"{len(val_t)} held-out pairs, {len(prompts)} answers; reward_accuracy chance 0.5"))
    written = ("summary.json", "log.jsonl", "dpo.png", "samples.md", "adapter", "model")
    say("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    end_distributed()
    return dict(log=log)


def all_ranks_mean(metrics: dict) -> dict:
    """The step's metrics averaged over the ranks (each saw its share of the pairs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.stack(list(metrics.values()))
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        metrics = dict(zip(metrics, t))
    return metrics


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
