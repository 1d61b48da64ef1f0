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

out_dir gets:
- config.json: the flags of the run;
- log.jsonl: a row per optimizer step (loss, reward_accuracy, reward_margin, chosen/rejected rewards,
  policy log-probs, lr, grad_norm, ms) and per evaluation the same with a val_ prefix (val_loss, ...);
- loss.png: the loss and the reward accuracy, training and held out;
- model/: the tuned model (merged, with LoRA); adapter/: the LoRA adapter alone (PEFT format);
- ref_logps.json: the cached reference log-probs (precomputed mode);
- samples.md: held-out prompts answered before and after;
- summary.json: {"before": {...}, "after": {...}}: held-out reward_accuracy and chosen_rate (the share
  of answers equal to the chosen one);
- ckpt/: the state --resume continues from.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bpe import (TEMPLATE_CHOICES, TEMPLATE_HELP, dialogue_messages, load_tokenizer, pick_template,
                 reply_stops)
from housekeeping import (DEVICE_HELP, GracefulStop, RunLog, StepClock, all_ranks, atomic_write, auto_init_from,
                          autocast_and_scaler, before_after, check_finite, close_run, distribute, end_distributed,
                          finite_figures, fit_to_context, fits_in_memory, flag, grad_sync, init_distributed,
                          load_train_state, open_run, parse_config, pick_device, pick_precision, plot_log, read_json,
                          resolve_init_from, resolve_warmup, resumed_config, rewrite_log, rng_state, run_main,
                          save_train_state, seed_everything, set_rng_state, write_run_config)
from lora import adapters_off, apply_lora, load_base, save_policy
from model import GPT, OPTIMIZER_STATES, Block, lr_schedule, make_optimizer
from prepare_data import builtin_tasks, exact_match, load_pairs, parse_dialogue

LOSS_TYPES = ("sigmoid", "ipo")

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class DPOConfig:
    init_from: str = flag("auto", "starting (SFT) model: gpt2 name, HF model dir (gpt2/llama), or our checkpoint dir; "
                                 "auto: the life cycle's model before DPO, rl.py's out-rl/model or finetune.py's "
                                 "out-finetune/best_model, if there is one (then, with no --data_file, on the built-in "
                                 "preference pairs: the offline life cycle), else gpt2")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model's)")
    data_file: str | None = flag(None, "jsonl of {prompt, chosen, rejected} or HH-RLHF {chosen, rejected}; default: "
                                      "the built-in preference pairs (offline) when --init_from auto finds "
                                      "out-rl/model or out-finetune/best_model, else Anthropic/hh-rlhf from the hub")
    split: str = flag("train", "datasets split when no --data_file")
    template: str = flag("auto", TEMPLATE_HELP + " (ours: the pairs' text as written; chat: an HH-RLHF prompt's "
                                 "turns, or the prompt as one user message, each response one assistant turn)",
                         choices=TEMPLATE_CHOICES)
    val_file: str | None = flag(None, "held-out pairs (the --data_file format) for evaluation and the answers before "
                                     "and after, instead of a --val_frac split of the data")
    max_examples: int = flag(0, "use only the first N pairs (0 = all)", min=0, aliases=("--n_samples",))
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
    min_lr_ratio: float = flag(0.0, "the learning rate's floor at the end of the cosine decay, as a fraction of the "
                                   "peak (0 = decay to 0)", min=0.0, max=1.0)
    warmup_steps: int = flag(10, "linear warmup steps, then cosine decay to --min_lr_ratio of the peak (-1 = 5% of "
                                 "the run; more than half the run is cut to a tenth)", min=-1)
    weight_decay: float = flag(0.0, "decoupled weight decay on 2-D weights", min=0.0)
    grad_clip: float = flag(1.0, "clip the global gradient norm (0 = off)", min=0.0)
    max_steps: int = flag(100, "optimizer steps", min=1)
    eval_interval: int = flag(25, "evaluate every N steps (and at 0 and the end)", min=1)
    eval_pairs: int = flag(200, "held-out pairs per evaluation (0 = all)", min=0)
    save_interval: int = flag(0, "also keep weights every N steps (0 = end only)", min=0)
    num_samples: int = flag(3, "held-out prompts answered before and after", min=0, aliases=("--n_generate",))
    max_new_tokens: int = flag(64, "longest sample answer", min=1)
    log_interval: int = flag(10, "print metrics every N steps", min=1)
    seed: int = flag(1337, "seed for split, order and init")


# fixed once a run exists: the model, its reference, what is trained, the optimizer, the data and its split
FIXED = ("init_from", "tokenizer", "template", "lora_rank", "lora_alpha", "lora_targets", "reference", "optimizer",
         "quantize", "data_file", "split", "val_file", "val_frac", "seed")
# The life cycle's models DPO continues, latest first, and the stage that left each: rl.py's (DPO comes last,
# after RL: RL on the sums cost the copying questions 0.655 -> 0.530, and DPO brings them back to 0.650 while
# the sums stay; BENCHMARKS.md, where DPO goes), else finetune.py's, best first.
EARLIER_MODELS = {"out-rl/model": "rl.py", "out-finetune/best_model": "finetune.py",
                  "out-finetune/model": "finetune.py"}
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
LAPTOP = dict(lr=3e-4, rpo_alpha=1.0, beta=0.5, lora_targets="all", max_steps=200, eval_interval=100,
              num_samples=200, max_new_tokens=24)


def parse_args(argv=None) -> DPOConfig:
    cfg, given = parse_config(DPOConfig, argv, __doc__.split("\n\n")[0].strip(),
                              alt_defaults={"offline life cycle": LAPTOP})
    if cfg.resume:
        cfg = resumed_config(DPOConfig, cfg, given, cfg.out_dir, FIXED)
    if cfg.init_from == "auto":
        cfg.init_from = auto_init_from(tuple(EARLIER_MODELS), "python finetune.py")
        if cfg.init_from in EARLIER_MODELS and cfg.data_file is None:
            cfg.data_file = str(builtin_tasks()["pairs"])
            if cfg.val_file is None:  # pairs about held-out modules
                cfg.val_file = str(builtin_tasks()["pairs_test"])
            for name, value in LAPTOP.items():
                setattr(cfg, name, given.get(name, value))
            print(f"offline default: {cfg.init_from} (from {EARLIER_MODELS[cfg.init_from]}) on the built-in "
                  f"preference pairs {cfg.data_file}; the real recipe names them: --init_from gpt2 (HH-RLHF from the "
                  f"hub)")
    cfg.init_from = resolve_init_from(cfg.init_from)  # a run directory: its best or final model
    check_not_an_adapter(cfg.init_from)
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"--max_prompt_length {cfg.max_prompt_length} must be < --max_length {cfg.max_length}")
    if cfg.reference == "adapter_off" and cfg.lora_rank == 0:
        if "reference" in given:
            raise ValueError("--reference adapter_off needs a LoRA policy (--lora_rank > 0); use copy or precomputed")
        if cfg.fsdp:
            raise ValueError("--fsdp with --lora_rank 0 (full fine-tuning): use --reference precomputed")
        print("note: with --lora_rank 0 (full fine-tuning) the reference is a frozen copy (--reference copy)")
        cfg.reference = "copy"
    if cfg.fsdp and cfg.reference == "copy":
        raise ValueError("--fsdp: use --reference adapter_off (LoRA) or precomputed; a frozen copy would need a "
                         "second sharded model")
    # sizes beyond the machine fail here, before a file is written (lower bounds, as in finetune.py)
    fits_in_memory(32 * cfg.batch_size * cfg.grad_accum,
                   f"--batch_size {cfg.batch_size} x --grad_accum {cfg.grad_accum}")
    fits_in_memory(8 * cfg.max_new_tokens, f"--max_new_tokens {cfg.max_new_tokens}")
    fits_in_memory(8 * cfg.lora_rank, f"--lora_rank {cfg.lora_rank}")
    return cfg


def check_not_an_adapter(init_from: str):
    """A LoRA adapter directory (PEFT's adapter_config.json, no model of its own) is no starting model:
    say so, and how to make one of it, instead of "not a model directory"."""
    path = Path(init_from).expanduser()
    has_model = (path / "config.json").is_file() or (path / "gpt_config.json").is_file()
    if not (path / "adapter_config.json").is_file() or has_model:
        return
    base = read_json(path / "adapter_config.json").get("base_model_name_or_path") or "<its base model>"
    raise ValueError(f"--init_from {init_from} is a LoRA adapter, not a model: dpo.py starts from a whole model. "
                     f"Merge the adapter into its base first: python lora.py merge --base {base} --adapter "
                     f"{init_from} --out_dir merged, then --init_from merged (a run directory of finetune.py also "
                     f"holds the merged model, best_model/, unless --no-save_merged)")


# -----------------------------------------------------------------------------------------------
# 2. Data: tokenization, batches


def prompt_messages(prompt: str) -> list[dict]:
    """A pair's prompt as a chat: HH-RLHF's turns (the last, empty "Assistant:" is the one answered), else
    the prompt as one user message."""
    if prompt.startswith("\n\nHuman:"):
        turns = parse_dialogue(prompt)
        if turns[-1][0] == "Assistant" and not turns[-1][1].strip():
            turns = turns[:-1]  # HH-RLHF's empty "Assistant:": the turn the pair answers, not a message
        return dialogue_messages(turns)
    return [{"role": "user", "content": prompt}]


def tokenize_pairs(pairs: list[dict], tok, eos_id: int, max_length: int, max_prompt_length: int,
                   chat_template=None) -> list[dict]:
    """Token ids of each pair, EOS after each response. A pair longer than max_length loses prompt
    tokens from the LEFT first (down to max_prompt_length: the end of the prompt, right before the
    answer, matters most), then response tokens from the end. Pairs whose responses are identical
    carry no preference signal (their loss gradient is zero): they are dropped and counted. An empty
    prompt is read as the end-of-text token alone, so that the first response token has a context.
    With the model's chat template (`chat_template`, a bpe.ChatTemplate): the prompt is the chat rendered with the
    assistant's header, and each response the tokens its assistant turn adds, up to its end-of-turn token."""
    out = []
    n_same = 0
    n_cut = 0
    for pair in pairs:
        if pair["chosen"] == pair["rejected"]:
            n_same += 1
            continue
        if chat_template is None:
            prompt = tok.encode(pair["prompt"]) or [eos_id]
            chosen = tok.encode(pair["chosen"]) + [eos_id]
            rejected = tok.encode(pair["rejected"]) + [eos_id]
        else:
            messages = prompt_messages(pair["prompt"])
            prompt = chat_template.prompt_ids(messages)
            chosen = chat_template.reply_ids(messages, pair["chosen"].strip())
            rejected = chat_template.reply_ids(messages, pair["rejected"].strip())
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            n_cut += 1
            prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
            chosen = chosen[: max_length - len(prompt)]
            rejected = rejected[: max_length - len(prompt)]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
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


class Reference:
    """reference.logps(idx, labels, keys) -> (chosen, rejected) log-probs under the starting model."""

    def __init__(self, mode: str, policy, autocast=contextlib.nullcontext, copy_dtype=None, copy_device=None):
        self.mode = mode
        self.policy = policy
        self.autocast = autocast
        self.cache = {}  # precomputed: pair key -> (chosen, rejected) log-probs
        self.model = None
        if mode == "copy":  # a frozen twin; a cheaper dtype or another device are the usual savings
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            if copy_dtype is not None or copy_device is not None:
                self.model.to(device=copy_device, dtype=copy_dtype)

    @torch.no_grad()
    def compute(self, idx, labels):
        if self.model is not None:
            dev = next(self.model.parameters()).device
            chosen_logps, rejected_logps = concatenated_logps(self.model, idx.to(dev), labels.to(dev), self.autocast)
            return chosen_logps.to(idx.device), rejected_logps.to(idx.device)
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
    path = Path(name_or_dir).expanduser()
    if path.is_file():
        files = [path]
    elif path.exists():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        files = []
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
        chosen_logps, rejected_logps = ref.compute(idx, labels)
        for i, chosen, rejected in zip(chunk, chosen_logps.tolist(), rejected_logps.tolist()):
            ref.cache[keys[i]] = (chosen, rejected)
        if n % 20 == 19:
            write()
    write()
    return len(todo)


# -----------------------------------------------------------------------------------------------
# 5. Training


def micro_batch_loss(policy, ref: Reference, idx, labels, keys, cfg: DPOConfig, autocast=contextlib.nullcontext):
    """The DPO loss of one micro-batch of pairs (the mean over its pairs, plus the RPO term), and its
    metrics (pair_metrics: device tensors, read once per step). The forward runs under autocast (in
    concatenated_logps); the reference's log-probs come first, without a graph."""
    ref_chosen, ref_rejected = ref.logps(idx, labels, keys)
    policy_chosen, policy_rejected = concatenated_logps(policy, idx, labels, autocast)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                        cfg.beta, cfg.loss, cfg.label_smoothing)
    loss = losses.mean()
    if cfg.rpo_alpha:  # RPO (Pang et al. 2024): DPO alone may lower both responses' likelihood, the chosen
        # one less; the mean NLL of the chosen tokens keeps the policy writing them
        n_chosen_tokens = (labels[: len(policy_chosen)] != -100).sum().clamp(min=1)
        loss = loss + cfg.rpo_alpha * -policy_chosen.sum() / n_chosen_tokens
    metrics = pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    return loss, metrics


@torch.no_grad()
def evaluate_pairs(policy, ref: Reference, tokenized, keys, pad_id, device, batch_size, autocast,
                   loss_args=()) -> dict:
    """The metrics of training (loss_args: beta, loss type, label smoothing, as in training) on held-out
    pairs, under the names val_loss, val_reward_accuracy, ..."""
    sums = {}
    n = 0
    was_training = policy.training
    policy.eval()
    for s in range(0, len(tokenized), batch_size):
        idx, labels = collate_pairs(tokenized[s: s + batch_size], pad_id, device)
        ref_chosen, ref_rejected = ref.logps(idx, labels, keys[s: s + batch_size])
        policy_chosen, policy_rejected = concatenated_logps(policy, idx, labels, autocast)
        losses_and_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *loss_args)
        b = idx.size(0) // 2
        for k, v in pair_metrics(*losses_and_rewards, policy_chosen, policy_rejected).items():
            sums[k] = sums.get(k, 0) + v * b
        n += b
    policy.train(was_training)
    return finite_figures("dpo.py: the held-out pairs' metrics", {f"val_{k}": (v / n).item() for k, v in sums.items()})


def _samples(model, tok, prompts, max_new_tokens, eos_id, chat_template=None) -> list[str]:
    """Greedy answers, one prompt at a time; a progress line every 10 s. With the model's chat template
    (`chat_template`): each prompt in it, and an answer ends at its end-of-turn token."""
    stops = [eos_id] if chat_template is None else reply_stops(tok, chat_template)  # end of turn, and the EOS
    out = []
    shown = time.time()
    for i, p in enumerate(prompts):
        if time.time() - shown > 10:
            print(f"generating: {i}/{len(prompts)} answers", flush=True)
            shown = time.time()
        ids = tok.encode(p) if chat_template is None else chat_template.prompt_ids(prompt_messages(p))
        [ids], n_new = fit_to_context([ids or [eos_id]], max_new_tokens, model.config.block_size)
        gen = model.generate(torch.tensor([ids], device=model.lm_head.weight.device), n_new,
                             temperature=0, eos_token_id=stops)[0, len(ids):].tolist()
        out.append(tok.decode([t for t in gen if t not in stops]))
    return out


def split_pairs(cfg: DPOConfig, tok, max_length: int, chat_template=None) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pairs, held-out pairs, tokenized; the held-out pairs as text, for the answers before and
    after): --val_file, else a --val_frac share of the shuffled --data_file; --eval_pairs of them evaluated."""
    pairs = load_pairs(cfg.data_file, cfg.split)
    if cfg.max_examples:
        pairs = pairs[: cfg.max_examples]
    random.Random(cfg.seed).shuffle(pairs)
    if cfg.val_file:
        n_val = 0
        val_pairs = load_pairs(cfg.val_file)
    else:
        n_val = max(1, round(len(pairs) * cfg.val_frac)) if cfg.val_frac > 0 else 0
        val_pairs = pairs[:n_val]
    max_prompt_length = min(cfg.max_prompt_length, max_length - 1)
    train_t = tokenize_pairs(pairs[n_val:], tok, tok.eot_id, max_length, max_prompt_length, chat_template)
    val_t = tokenize_pairs(val_pairs, tok, tok.eot_id, max_length, max_prompt_length, chat_template)
    val_t = val_t[: cfg.eval_pairs or None]
    if not train_t:
        raise ValueError("no training pairs left")
    return train_t, val_t, val_pairs


def lora_policy(gpt: GPT, cfg: DPOConfig) -> GPT:
    """The policy around a GPT: its LoRA adapters (none with --lora_rank 0). Also used on an empty GPT,
    to gather FSDP's shards into."""
    if cfg.lora_rank > 0:
        apply_lora(gpt, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return gpt


def save_weights(policy, cfg: DPOConfig, tok, where: Path, master: bool, merged: bool = False):
    """LoRA: the PEFT adapter (merged: the model with W + scaling B A; the policy loses its adapters);
    full: the model. Under FSDP every rank gathers into an empty policy of the same shape, rank 0 writes."""
    save_policy(policy, lambda: lora_policy(GPT(policy.config), cfg), where, master, cfg.init_from, tok.source,
                merged)


def save_state(out: Path, policy, optimizer, step: int, data_rng: random.Random, order: list[int], device: str,
               log: RunLog):
    """out/ckpt/: what --resume needs to continue exactly as if never stopped: the trained weights, the
    optimizer, the step, the data order (its generator and the rest of this epoch) and every rank's RNGs."""
    extra = dict(shuffle=data_rng.getstate(), order=order, rng=all_ranks(rng_state(device)))
    save_train_state(out, policy, optimizer, step, extra, log.master)
    log.say(f"resumable state: step {step} in {out / 'ckpt'}")


def all_ranks_mean(metrics: dict) -> dict:
    """The step's metrics averaged over the ranks (each saw its share of the pairs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.stack(list(metrics.values()))
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        metrics = dict(zip(metrics, t))
    return metrics


ESTIMATE_AFTER = 5  # steps timed before the run's length is estimated (the first warms up)


def evaluation_note(answers_s: float, pairs_s: float, training_s: float, cfg: DPOConfig) -> str:
    """'' or a note when evaluating costs more than training: the answers before and after (greedy
    generation, a token at a time: the slow part of a short run) and the held-out pairs' evaluations.
    Nothing is cut on its own; the note names the flags that shrink them."""
    if answers_s + pairs_s <= training_s:
        return ""
    return (f"note: evaluation takes about {answers_s + pairs_s:.0f} s of this run ({answers_s:.0f} s answering "
            f"{cfg.num_samples} held-out prompts before and after, {pairs_s:.0f} s evaluating the held-out pairs), "
            f"more than training ({training_s:.0f} s): --num_samples N and --eval_pairs N (or a larger "
            f"--eval_interval) make it smaller")


def summarize(rows: list[dict], prompts: list[str], before: list[str], after: list[str], val_pairs) -> dict:
    """before -> after on the held-out pairs: reward accuracy (0 before: policy = reference, every
    reward 0, a tie counts as wrong; 0.5 is chance), and chosen_rate, the share of greedy answers that
    pass the task's check (equal to the chosen answer: the built-in tasks' exact match)."""
    summary = {"before": {}, "after": {}}
    evals = [r for r in rows if "val_reward_accuracy" in r]
    if evals:
        for when, row in (("before", evals[0]), ("after", evals[-1])):
            summary[when].update(reward_accuracy=row["val_reward_accuracy"], reward_margin=row["val_reward_margin"])
    if prompts:
        chosen = [p["chosen"] for p in val_pairs[: len(prompts)]]
        summary["before"]["chosen_rate"] = exact_match(before, chosen)
        summary["after"]["chosen_rate"] = exact_match(after, chosen)
    return summary


def write_outputs(out: Path, rows: list[dict], summary: dict, prompts, before, after):
    """Rank 0's files at the end: the plot, the answers before and after, the summary."""
    plot_log(rows, out / "loss.png", [["loss", "val_loss"], ["reward_accuracy", "val_reward_accuracy"]],
             titles=["loss", "reward accuracy"])
    md = ["# Samples before and after DPO\n"]
    for prompt, answer_before, answer_after in zip(prompts, before, after):
        md += [f"## Prompt\n```\n{prompt[-500:]}\n```\n", f"**Before:** {answer_before}\n",
               f"**After:** {answer_after}\n"]
    atomic_write(out / "samples.md", lambda p: Path(p).write_text("\n".join(md)))
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))


def train(cfg: DPOConfig) -> dict:
    """Set-up (device, policy, pairs, answers before, reference, optimizer, the run's files), the loop,
    then the end (weights, answers after, summary)."""
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    precision = pick_precision(cfg.precision, device)
    rank, _, world = init_distributed(device)  # torchrun: one process per device; plain python: 1 of 1
    master = rank == 0  # only rank 0 prints, logs and writes files
    torch.manual_seed(cfg.seed)
    out = open_run(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # every rank: rank 0 decides
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (5e-4 if lora else 1e-6)  # the peak; LoRA's few fresh weights take far larger steps
    warmup, warmup_note = resolve_warmup(cfg.warmup_steps, cfg.max_steps)

    # the policy and the pairs; the model before its tokenizer: a wrong --init_from is then the error
    policy = load_base(cfg.init_from, precision, lora, cfg.quantize, device, cfg.fsdp)
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; responses must end with one")
    chat_template = pick_template(cfg.template, tok, cfg.init_from)  # the model's own chat template, or the pairs' text
    if chat_template is not None and master:
        print(f"prompt format: the model's chat template ({tok.name}); replies end at token {chat_template.stop_ids}")
    train_t, val_t, val_pairs = split_pairs(cfg, tok, min(cfg.max_length, policy.config.block_size), chat_template)
    train_k = [pair_key(t) for t in train_t]
    val_k = [pair_key(t) for t in val_t]
    if master:
        print(f"{len(train_t)} training pairs, {len(val_t)} held out", flush=True)

    # the answers before training (timed: evaluation_note compares them with the training)
    autocast, scaler = autocast_and_scaler(precision, device_type)
    prompts = [p["prompt"] for p in val_pairs[: cfg.num_samples]]
    answers_start = time.perf_counter()
    before = _samples(policy, tok, prompts, cfg.max_new_tokens, tok.eot_id, chat_template)
    answers_s = time.perf_counter() - answers_start

    # the trained policy (LoRA or whole), the reference it is measured against, then DDP or FSDP
    lora_policy(policy, cfg)
    policy.grad_checkpointing = cfg.grad_checkpointing
    dtypes = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    ref_device = None if cfg.ref_device == "same" else cfg.ref_device
    ref = Reference(cfg.reference, policy, autocast, dtypes[cfg.ref_dtype], ref_device)
    train_module = distribute(policy, device, cfg.fsdp, precision, block_type=Block)  # DDP wraps; FSDP shards in place
    seed_everything(cfg.seed + rank)  # the same init on every rank above; from here each rank its own dropout
    if cfg.reference == "precomputed":  # every rank computes every pair (under FSDP each forward needs them all)
        # the cache holds for these weights (each file's size and mtime: a new save changes them), in this
        # precision and quantization, on these pairs as tokenized: anything else is recomputed
        tag = hashlib.sha1(json.dumps([cfg.init_from, weights_fingerprint(cfg.init_from), precision, cfg.quantize,
                                       train_k, val_k]).encode()).hexdigest()
        cache = out / "ref_logps.json" if master else None
        n = precompute_reference(ref, train_t + val_t, train_k + val_k, tok.eot_id, device, cfg.batch_size, cache, tag)
        if master:
            print(f"reference log-probs: {n} computed, {len(train_t) + len(val_t) - n} from {cache}", flush=True)
    policy.train()
    optimizer = make_optimizer(policy, cfg.optimizer, lr, cfg.weight_decay, fused=device_type == "cuda")
    if master:
        how = ""
        if world > 1:
            how = " (FSDP)" if cfg.fsdp else " (DDP)"
        print(f"precision {precision}, {cfg.max_steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {world} "
              f"rank(s) = {cfg.batch_size * cfg.grad_accum * world} pairs on {device}{how}", flush=True)
        if warmup_note:
            print(f"note: {warmup_note}", flush=True)

    # the run exists from here on (a run that failed while loading leaves nothing behind)
    if master:
        write_run_config(out, cfg)  # the flags, and the identity of the starting weights
    data_rng = random.Random(cfg.seed)  # the same order on every rank: each takes its share
    order = []  # the rest of this epoch's pair indices, taken from the end
    start = 0
    rows = []
    if cfg.resume:  # the weights, optimizer, data order and RNG of the last saved step
        start, extra = load_train_state(out, policy, optimizer)
        data_rng.setstate(extra["shuffle"])
        order = extra["order"]
        set_rng_state(extra["rng"][rank if len(extra["rng"]) == world else 0], device)
        if master:  # what the killed run logged after that step is about to be redone
            rows = rewrite_log(out / "log.jsonl", lambda r: r["step"] <= start if "loss" in r else r["step"] < start)
            print(f"resuming at step {start}", flush=True)
    log = RunLog(out, master, rows)
    clock = StepClock(cfg.max_steps)
    eval_seconds = []  # each evaluation of the held-out pairs in this process
    n_evals = sum(1 for s in range(start, cfg.max_steps + 1) if s % cfg.eval_interval == 0 or s == cfg.max_steps)
    run_start = time.time()

    stop = GracefulStop()  # Ctrl-C / SIGTERM: the state at the next step boundary, then exit
    for step in range(start, cfg.max_steps + 1):
        last_step = step == cfg.max_steps

        # checkpoints and stops come first, before this step's evaluation: a resumed run evaluates `step` again
        if cfg.ckpt_interval and step > start and step % cfg.ckpt_interval == 0 and not last_step:
            save_state(out, policy, optimizer, step, data_rng, order, device, log)
        if cfg.save_interval and step > start and step % cfg.save_interval == 0:
            save_weights(policy, cfg, tok, out / f"ckpt_step{step}", master)
        if cfg.stop_at_step and step == cfg.stop_at_step:
            log.say(f"stopping at step {step} (--stop_at_step), as if killed")
            end_distributed()
            return dict(log=log.rows)
        if stop.requested(device) and not last_step:
            save_state(out, policy, optimizer, step, data_rng, order, device, log)
            log.close()
            if master:
                close_run(out)
            stop.exit(step, out / "ckpt")

        # evaluate on the held-out pairs at 0, every --eval_interval steps and at the end: the training
        # metrics without updates (the row at step 0 is the model before training: policy = reference)
        if val_t and (step % cfg.eval_interval == 0 or last_step):
            eval_start = time.perf_counter()
            metrics = evaluate_pairs(policy, ref, val_t, val_k, tok.eot_id, device, cfg.batch_size, autocast,
                                     (cfg.beta, cfg.loss, cfg.label_smoothing))
            eval_seconds.append(time.perf_counter() - eval_start)
            log.record(dict(step=step, **metrics))
            log.say(f"step {step}: val loss {metrics['val_loss']:.4f}, reward accuracy "
                    f"{metrics['val_reward_accuracy']:.3f}, margin {metrics['val_reward_margin']:.4f}")
        if last_step:
            break

        # this step's pairs: every rank draws the whole global batch (batch_size x grad_accum x world) from
        # the one shared order, so that no two ranks take the same pair, and keeps its own micro-batches
        step_start = time.perf_counter()
        micro = []
        for k in range(cfg.grad_accum * world):
            picked = []
            for _ in range(cfg.batch_size):
                if not order:  # a new epoch: the pairs in a new order
                    order = list(range(len(train_t)))
                    data_rng.shuffle(order)
                picked.append(order.pop())
            if k // cfg.grad_accum == rank:
                idx, labels = collate_pairs([train_t[i] for i in picked], tok.eot_id, device)
                micro.append((idx, labels, [train_k[i] for i in picked]))

        # the learning rate: a linear warmup (Adam's moments start empty), then a cosine decay to
        # --min_lr_ratio of the peak; every group's peak is --lr
        lr_scale = lr_schedule(step, cfg.max_steps, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr_scale * lr

        # forward and backward, a micro-batch at a time: each one's loss is divided by their number, so
        # that the gradients add up to the gradient of the step's mean loss over all its pairs
        step_metrics = {}
        for micro_step, (idx, labels, keys) in enumerate(micro):
            # DDP/FSDP: the ranks average their gradients in the last micro-batch's backward only
            with grad_sync(train_module, micro_step == len(micro) - 1):
                loss, metrics = micro_batch_loss(train_module, ref, idx, labels, keys, cfg, autocast)
                loss = loss / len(micro)
                if scaler is not None:  # fp16: scaled up, so that small gradients do not underflow to 0
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0) + value / len(micro)

        # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
        if scaler is not None:
            scaler.unscale_(optimizer)
        # clip the global norm: a rare batch with a huge gradient (a loss spike) then moves the weights a
        # bounded distance instead of wrecking them; the norm before clipping is what gets logged
        params = [p for p in policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shard
            grad_norm = grad_norm.full_tensor()
        if scaler is not None:
            scaler.step(optimizer)  # skipped if a gradient overflowed (inf/NaN); the scale then shrinks
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the next step's backward adds into fresh gradients

        # the step's numbers, averaged over the ranks and read to the host at once (the step's one sync),
        # then logged as step + 1: the model after step + 1 optimizer steps
        step_metrics = all_ranks_mean(step_metrics)
        *values, grad_norm = torch.stack([v.float() for v in (*step_metrics.values(), grad_norm)]).tolist()
        metrics = dict(zip(step_metrics, values))
        step_s = time.perf_counter() - step_start
        clock.add(step_s)
        check_finite(step + 1, scaler, loss=metrics["loss"], grad_norm=grad_norm)
        log.record(dict(step=step + 1, lr=lr_scale * lr, grad_norm=grad_norm, ms=1000 * step_s, **metrics))
        if (step + 1) % cfg.log_interval == 0 or step == start:
            log.say(f"step {step + 1}/{cfg.max_steps}: loss {metrics['loss']:.4f}, reward accuracy "
                    f"{metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.4f}, lr "
                    f"{lr_scale * lr:.2e} | {clock.left(step + 1)}")
        if len(clock.seconds) == ESTIMATE_AFTER:  # once: how long the whole run takes, and its evaluation
            log.say(f"the whole run: {clock.estimate()}")
            per_eval = sum(eval_seconds) / len(eval_seconds) if eval_seconds else 0.0
            note = evaluation_note(2 * answers_s, n_evals * per_eval, clock.per_step() * (cfg.max_steps - start), cfg)
            if note:
                log.say(note)
    stop.restore()

    # the end: the state (--resume with a larger --max_steps continues from here), the weights, the answers
    # after (before the merge, which takes the adapters out of the policy), the merged model, the summary
    log.close()
    save_state(out, policy, optimizer, cfg.max_steps, data_rng, order, device, log)
    save_weights(policy, cfg, tok, out / ("adapter" if lora else "model"), master)
    answers_start = time.perf_counter()
    after = _samples(policy, tok, prompts, cfg.max_new_tokens, tok.eot_id, chat_template)
    answers_s += time.perf_counter() - answers_start
    summary = summarize(log.rows, prompts, before, after, val_pairs)
    if lora:  # the merged model too, for the stages after (hellaswag.py, chat.py) and any HF tool
        save_weights(policy, cfg, tok, out / "model", master, merged=True)
    if master:
        write_outputs(out, log.rows, summary, prompts, before, after)
        close_run(out)
    training_s = sum(clock.seconds)
    pairs_s = sum(eval_seconds)
    log.say(f"done in {time.time() - run_start:.0f} s: training {training_s:.0f} s, answers before and after "
            f"{answers_s:.0f} s, held-out pairs {pairs_s:.0f} s")
    if len(clock.seconds) < ESTIMATE_AFTER:  # too short for the estimate's note: the measured one
        note = evaluation_note(answers_s, pairs_s, training_s, cfg)
        if note:
            log.say(note)
    if prompts:
        question = prompts[0].rsplit("### Instruction:", 1)[-1].split("### Response:")[0].strip()[-150:]
        log.say(f"a held-out answer: {question!r} -> before {before[0].strip()!r}, after "
                f"{after[0].strip()!r} (chosen {val_pairs[0]['chosen']!r}, rejected {val_pairs[0]['rejected']!r})")
    log.say(before_after(summary, f"{len(val_t)} held-out pairs, {len(prompts)} answers; reward_accuracy chance 0.5"))
    written = ("summary.json", "log.jsonl", "loss.png", "samples.md", "adapter", "model")
    log.say("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    chain = "" if out == Path(DPOConfig.out_dir) else f" --init_from {out}"
    log.say(f"next: python hellaswag.py{chain} (evaluate it beside the earlier stages), or python chat.py{chain} "
            f"(talk to it)")
    end_distributed()
    return dict(log=log.rows)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
