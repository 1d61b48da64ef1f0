"""
rl.py: reinforcement learning from rewards, the stage after fine-tuning: GRPO (DeepSeekMath, Shao et al.
2024) with DAPO's token-level loss, on answers a program can check (exact match, GSM8K's last number) or
scored by a reward model (RLHF), fully or with LoRA (on a 4-bit base with --quantize nf4), on a CPU, one
GPU, or several with torchrun (DDP, or FSDP2 with --fsdp).

Run it:
    python rl.py                                              # the laptop: small sums, from out-finetune/
    python rl.py --init_from out-finetune --data_file data/gsm8k/train.jsonl --reward number \\
        --val_file data/gsm8k/test.jsonl --max_new_tokens 256
    python rl.py --init_from gpt2 --data_file prompts.jsonl --reward model --reward_model models/reward
    torchrun --nproc_per_node=8 rl.py --init_from path/to/instruct-model --lora_rank 16 --precision bf16 ...
    python rl.py --help

The idea. Fine-tuning copies reference answers; DPO prefers one fixed answer over another. Neither ever
sees the model's own answers. RL does: it samples answers, scores them, and makes the better ones more
likely. One step, written out in the loop below:

1. Sample. For each of --batch_size prompts, G = --group_size answers (the group), at temperature 1 (the
   model's own distribution: the policy gradient below is an expectation under it), all B x G at once
   with the KV cache (model.generate), each until its end-of-text token or --max_new_tokens.
2. Reward. Each answer gets a number r: --reward exact (1 if it equals the reference, outer spaces aside),
   number (1 if its last number equals the reference's, as GSM8K's `#### 42` is scored), or model (a
   Hugging Face reward model's score). A reward function only compares text: it never runs code from the
   data or the answers.
3. Advantage. A_i = r_i - mean(r of its group): the group is its own baseline, so no value network is
   needed (PPO's critic, as big as the policy). An answer better than its siblings is pushed up, a worse
   one down, and the average moves nothing. --scale_rewards also divides by the group's standard
   deviation (the GRPO paper; off by default, as in Dr. GRPO: it weighs questions that are nearly always
   right or wrong as much as the ones in between). A group whose rewards are all equal (every answer
   right, or every one wrong) has A = 0 for every answer: it teaches nothing, however many tokens it
   cost. The share of such groups is logged (equal_groups): near 1, the task is too easy or too hard
   for the model, and sampling is wasted.
4. Loss. With logp_t = log pi(token t | earlier tokens) under the policy being trained,

       loss = -(1/N) sum over the batch's answers i, over their tokens t of  A_i * logp_t

   N = the number of answer tokens in the whole batch (every rank, every micro-batch): DAPO's token-level
   normalisation. Its gradient is REINFORCE's, -(1/N) sum_i A_i grad log pi(answer_i), with every token
   counted the same. The GRPO paper averages each answer's tokens first and then the answers: a long
   answer's tokens then count less each, so a long wrong answer is punished less per token than a short
   one, and wrong answers drift longer (and a long right one is rewarded less per token).
   Answer tokens are those up to and including the end-of-text token; padding after it is masked out.
5. Update: backward, clipping, the optimizer step, as in finetune.py.

Options, each with its reason:
- --updates_per_batch K > 1: several optimizer steps on one batch of samples, which cost far more than an
  update. After the first, the policy is no longer the one that sampled (pi_old), so PPO's clipped ratio
  keeps each step near it: with ratio_t = pi(t) / pi_old(t),
      per-token loss = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)           (--clip_eps eps)
  At the first update ratio = 1 exactly and this is the loss of step 4; the clip only stops a token's
  probability from moving more than eps once its advantage has been acted on.
- --kl_beta beta > 0: adds beta * KL(pi || pi_ref) per token, to the starting model pi_ref, estimated with
  k3 = exp(q) - q - 1, q = log pi_ref(t) - log pi(t) (Schulman's estimator: unbiased, always >= 0, low
  variance). It keeps the policy near what fine-tuning taught. Off by default, as in DAPO and nanochat:
  with a checkable reward there is no reward model to exploit, and the KL only slows learning.
- --oversample K > 1: DAPO's dynamic sampling. A group with equal rewards teaches nothing (step 3), and on a
  task the model gets right now and then most groups are all wrong: their answers cost an update's forward
  and backward and add only zeros. So K x --batch_size prompts are sampled, and the update trains on
  --batch_size of their groups, those whose rewards differ first (keep_groups). Sampling short answers
  costs far less than updating on them, so each update carries several times the signal for a little
  more time. (DAPO samples again until the batch is full; a fixed K keeps each step's cost known.)
- --lora_rank, --quantize nf4: as in finetune.py (pi_ref is then the policy with its adapters off).
- --fsdp, under torchrun: the weights, gradients and optimizer state sharded over the ranks (FSDP2), as
  in finetune.py, for a policy too big for one device; sampling then runs every answer to --max_new_tokens
  (see sample), and the KL's reference must be the LoRA policy's own base.

A "step" is one batch of samples and its --updates_per_batch optimizer steps (one, by default).

Data: --data_file, a jsonl of {instruction, input, output} (finetune.py's format): the prompt as
fine-tuning formats it, output the reference. Held out: --val_file, else a --val_frac share. Built in
(offline, --init_from auto on finetune.py's model): small sums (`What is 23 + 45?` -> ` 68`,
prepare_data.sum_questions), a rule fine-tuning teaches the 2.6M-parameter model only in part.

out_dir gets:
- config.json: the flags of the run;
- log.jsonl: a row per step (loss, reward, equal_groups, kl, entropy, length, sample_s, update_s, lr,
  grad_norm, ms) and per evaluation (val_exact_match: greedy answers right; val_pass_at_k: prompts with a
  right answer among G samples; val_reward, val_length: the samples' mean reward and tokens);
- loss.png: the reward, training and held out, and the loss;
- model/: the tuned model (merged, with LoRA); adapter/: the LoRA adapter alone (PEFT format);
- summary.json: {"before": {...}, "after": {...}} of those held-out figures;
- ckpt/: the state --resume continues from (weights, optimizer, data order, the sampling seeds' generator).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import random
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
import torch.distributed as dist

from bpe import TEMPLATE_CHOICES, TEMPLATE_HELP, instruction_messages, load_tokenizer, pick_template, reply_stops
from housekeeping import (DEVICE_HELP, GracefulStop, RunLog, StepClock, all_ranks, atomic_write, auto_init_from,
                          autocast_and_scaler, before_after, check_finite, close_run, distribute, end_distributed,
                          finite_figures, fit_to_context, fits_in_memory, flag, grad_sync, init_distributed,
                          load_reward_model, load_train_state, open_run, parse_config, pick_device, pick_precision,
                          plot_log, resolve_init_from, resolve_warmup, resumed_config, reward_scores, rewrite_log,
                          rng_state, run_main, save_train_state, seed_everything, set_rng_state, write_run_config)
from lora import adapters_off, apply_lora, load_base, save_policy
from model import GPT, OPTIMIZER_STATES, Block, lr_schedule, make_optimizer
from prepare_data import builtin_tasks, format_prompt, load_alpaca

REWARDS = ("exact", "number", "model")

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class RLConfig:
    init_from: str = flag("auto", "starting (fine-tuned) model: gpt2 name, HF model dir, our checkpoint dir or a run "
                                 "directory; auto: finetune.py's out-finetune/best_model if there is one (then, with "
                                 "no --data_file, on the built-in sums: the offline life cycle), else gpt2")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model's)")
    template: str = flag("auto", TEMPLATE_HELP + " (ours: Alpaca's template, as finetune.py wrote the prompts; "
                                 "chat: each prompt one user message, a reply ending at its end-of-turn token)",
                         choices=TEMPLATE_CHOICES)
    data_file: str | None = flag(None, "jsonl of {instruction, input, output}: the prompts, output the reference; "
                                      "default: the built-in sums when --init_from auto finds out-finetune/")
    val_file: str | None = flag(None, "held-out prompts (the --data_file format), instead of a --val_frac split")
    max_examples: int = flag(0, "use only the first N prompts (0 = all)", min=0, aliases=("--n_samples",))
    val_frac: float = flag(0.1, "fraction of prompts held out for evaluation", min=0.0, max=0.9)
    out_dir: str = flag("out-rl", "where logs, plots and weights go")
    overwrite: bool = flag(False, "replace a run already in out_dir (otherwise a fresh run there stops)")
    resume: bool = flag(False, "continue the run in out_dir from its last state (out_dir/ckpt/); flags given now "
                              "override its config.json, except the model and what is trained")
    ckpt_interval: int = flag(50, "also write that resumable state every N steps (it is always written at the end, "
                                 "and on Ctrl-C / SIGTERM; 0 = only then)", min=0)
    stop_at_step: int = flag(0, "end after this many steps as if killed there (no final state or outputs): for "
                               "testing --resume; 0 = off", min=0)
    quantize: str = flag("none", "nf4: keep the frozen base in 4 bits (QLoRA; needs --lora_rank > 0)",
                        choices=["none", "nf4"])
    fsdp: bool = flag(False, "under torchrun: shard parameters, gradients and optimizer state over the ranks "
                            "(FSDP2, per transformer block) instead of a whole copy each (DDP); answers are then "
                            "always sampled to --max_new_tokens (see sample)")
    # the reward
    reward: str = flag("exact", "exact: the answer equals the reference (outer spaces aside); number: its last "
                               "number equals the reference's (GSM8K's `#### 42`); model: --reward_model's score",
                      choices=list(REWARDS))
    reward_model: str | None = flag(None, "--reward model: a Hugging Face sequence classifier (hub id or dir) scoring "
                                         "(prompt, answer) by its logit 0")
    # the algorithm
    group_size: int = flag(8, "G: answers sampled per prompt (the group whose mean reward is the baseline)", min=2)
    temperature: float = flag(1.0, "sampling temperature of the answers trained on", min=1e-3)
    scale_rewards: bool = flag(False, "divide each advantage by its group's reward standard deviation (GRPO); off: "
                                     "Dr. GRPO's plain difference from the group mean")
    clip_eps: float = flag(0.2, "PPO's clip: the ratio pi/pi_old is held in [1 - eps, 1 + eps] (matters only with "
                               "--updates_per_batch > 1; 0 = no clipping)", min=0.0, max=1.0)
    updates_per_batch: int = flag(1, "optimizer steps on each batch of samples (PPO's epochs)", min=1)
    kl_beta: float = flag(0.0, "weight of the k3 KL penalty to the starting model (0 = off, as in DAPO)", min=0.0)
    max_new_tokens: int = flag(64, "longest answer in tokens", min=1)
    max_prompt_length: int = flag(256, "prompts are cut from the left to this many tokens", min=1)
    # the policy: LoRA or full, as in finetune.py
    lora_rank: int = flag(16, "LoRA rank; 0 = full fine-tuning", min=0)
    lora_alpha: float = flag(32.0, "LoRA scaling numerator", min=0.0)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch input", min=0.0, max=1.0)
    lora_targets: str = flag("q,v", "LoRA targets (see lora.py)")
    batch_size: int = flag(4, "prompts per micro-batch (x --group_size answers)", min=1)
    oversample: int = flag(1, "DAPO's dynamic sampling: sample K x --batch_size prompts' groups and train on "
                              "--batch_size of them, those whose rewards differ first (1 = off)", min=1)
    grad_accum: int = flag(1, "micro-batches per step", min=1)
    precision: str = flag("auto", "auto: bf16 on GPUs with bf16 tensor cores, fp16 on older GPUs, fp32 on a CPU",
                         choices=["auto", "fp32", "fp16", "bf16"])
    device: str = flag("auto", DEVICE_HELP)
    optimizer: str = flag("adamw", "the optimizer", choices=list(OPTIMIZER_STATES))
    lr: float = flag(0.0, "peak learning rate (0 = 1e-4 with LoRA, 1e-6 full)", min=0.0)
    min_lr_ratio: float = flag(0.0, "the learning rate's floor at the end of the cosine decay, as a fraction of the "
                                   "peak", min=0.0, max=1.0)
    warmup_steps: int = flag(0, "linear warmup steps, then cosine decay to --min_lr_ratio of the peak (-1 = 5% of "
                                "the run; more than half the run is cut to a tenth)", min=-1)
    weight_decay: float = flag(0.0, "decoupled weight decay on 2-D weights", min=0.0)
    grad_clip: float = flag(1.0, "clip the global gradient norm (0 = off)", min=0.0)
    max_steps: int = flag(100, "steps (batches of samples)", min=1)
    eval_interval: int = flag(50, "evaluate the held-out prompts every N steps (and at 0 and the end)", min=1)
    eval_prompts: int = flag(200, "held-out prompts per evaluation (0 = all)", min=0)
    num_samples: int = flag(3, "held-out answers shown before and after (in the log)", min=0,
                            aliases=("--n_generate",))
    log_interval: int = flag(10, "print metrics every N steps", min=1)
    seed: int = flag(1337, "seed for split, order, sampling and init")


# fixed once a run exists: the model, what is trained, the optimizer, the reward, the prompts and their split
FIXED = ("init_from", "tokenizer", "lora_rank", "lora_alpha", "lora_targets", "optimizer", "quantize", "reward",
         "reward_model", "template", "data_file", "val_file", "val_frac", "max_examples", "seed")
SFT_MODELS = ("out-finetune/best_model", "out-finetune/model")  # what `python finetune.py` leaves, best first
# The offline life cycle's defaults (the flags given win), measured with finetune.py's 2.6M-parameter model
# on the built-in sums (BENCHMARKS.md, RL on the laptop; seeds 1, 2, 3, on 200 held-out sums, from 0.065):
# - dynamic sampling (--oversample 4) at lr 2e-4, 200 steps: greedy exact match 0.190, 0.190, 0.195. At 150
#   steps 0.170, 0.160, 0.185. Without it (every group trained on, 85% of them all wrong), lr 1e-4, 150
#   steps: 0.100, 0.130, 0.145, and 300 steps no better (0.130 to 0.145); with it at lr 1e-4, 0.150 and
#   0.160 (seeds 1, 1337). lr 3e-4 and GRPO's std scaling were behind at step 50 (0.090, 0.095 against
#   0.135; seed 2). The samples sharpen: the entropy falls from about 1.0 to 0.3 nats a token, and
#   held-out pass@8 falls a little (0.28 -> 0.24) while the mean reward of the samples quadruples.
# - full RL (the model is small); 8 prompts x 8 answers a step: 4 x 16 was no better for the same samples.
# - answers are a space, up to three digits and the end-of-text token: 8 new tokens are plenty.
LAPTOP = dict(lora_rank=0, lr=2e-4, batch_size=8, group_size=8, oversample=4, max_new_tokens=8, max_steps=200,
              eval_interval=50, eval_prompts=0)


def parse_args(argv=None) -> RLConfig:
    cfg, given = parse_config(RLConfig, argv, __doc__.split("\n\n")[0].strip(),
                              alt_defaults={"offline life cycle": LAPTOP})
    if cfg.resume:
        cfg = resumed_config(RLConfig, cfg, given, cfg.out_dir, FIXED)
    if cfg.init_from == "auto":
        cfg.init_from = auto_init_from(SFT_MODELS, "python finetune.py")
        if cfg.init_from in SFT_MODELS and cfg.data_file is None:
            cfg.data_file = str(builtin_tasks()["sums"])
            if cfg.val_file is None:  # sums never in any training file
                cfg.val_file = str(builtin_tasks()["sums_test"])
            for name, value in LAPTOP.items():
                setattr(cfg, name, given.get(name, value))
            print(f"offline default: {cfg.init_from} (from finetune.py) on the built-in sums {cfg.data_file}; the "
                  f"real recipe names them: --data_file (instruction/input/output jsonl) --reward exact|number")
    if cfg.data_file is None:
        raise ValueError("--data_file: a jsonl of {instruction, input, output} is needed (the built-in sums are the "
                         "default only from finetune.py's model, --init_from auto)")
    if cfg.fsdp and cfg.kl_beta > 0 and cfg.lora_rank == 0:
        raise ValueError("--fsdp with --kl_beta > 0 needs a LoRA policy (--lora_rank > 0, whose reference is itself "
                         "with its adapters off): a frozen copy of a sharded model is not kept")
    if cfg.reward == "model" and not cfg.reward_model:
        raise ValueError("--reward model needs --reward_model (a Hugging Face sequence classifier)")
    cfg.init_from = resolve_init_from(cfg.init_from)  # a run directory: its best or final model
    # sizes beyond the machine fail here, before a file is written (lower bounds, as in finetune.py)
    fits_in_memory(16 * cfg.batch_size * cfg.group_size * cfg.grad_accum,
                   f"--batch_size {cfg.batch_size} x --group_size {cfg.group_size} x --grad_accum {cfg.grad_accum}")
    fits_in_memory(8 * cfg.max_new_tokens, f"--max_new_tokens {cfg.max_new_tokens}")
    fits_in_memory(8 * cfg.lora_rank, f"--lora_rank {cfg.lora_rank}")
    return cfg


# -----------------------------------------------------------------------------------------------
# 2. Rewards: text against the reference; never code from the data


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Decimal | None:
    """The last number written in text (thousands commas allowed, `1,234.50`), as a Decimal so that `42`,
    `42.0` and `42.00` are one value; None if there is none. GSM8K's references end `#### 42`: the
    number after the last `####` is theirs."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def reward_exact(answer: str, reference: str) -> float:
    """1 if the answer equals the reference, outer spaces aside (the built-in tasks' check), else 0."""
    return float(answer.strip() == reference.strip())


def reward_number(answer: str, reference: str) -> float:
    """1 if the answer's last number equals the reference's (GSM8K's scoring), else 0 (no number: 0)."""
    mine = last_number(answer)
    return float(mine is not None and mine == last_number(reference))


def score_answers(reward, prompts: list[str], answers: list[str], references: list[str]) -> list[float]:
    """Each answer's reward: reward is "exact", "number" or a reward model's scoring function (prompts,
    answers) -> scores (housekeeping.reward_scores with the model's name)."""
    if reward == "exact":
        return [reward_exact(a, r) for a, r in zip(answers, references, strict=True)]
    if reward == "number":
        return [reward_number(a, r) for a, r in zip(answers, references, strict=True)]
    return reward(prompts, answers)


# -----------------------------------------------------------------------------------------------
# 3. The algorithm: advantages, the rollout's tensors, the per-token loss


def group_advantages(rewards: torch.Tensor, scale: bool = False, eps: float = 1e-4):
    """rewards (P, G): P prompts' groups of G. Returns (advantages (P, G), equal (P,) bool): each reward
    minus its group's mean (divided by the group's standard deviation + eps when scale), and which groups
    had rewards all equal (advantage 0 everywhere: nothing to learn)."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:  # torch's std: the unbiased one (n - 1), as GRPO's implementations use it
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    equal = (rewards == rewards[:, :1]).all(dim=1)
    return advantages, equal


def keep_groups(equal: torch.Tensor, n: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO's dynamic sampling: (the indices of n of the groups, the rows of their answers in the sampled
    batch, where group g holds rows g * group_size ...). Those whose rewards differ come first (in the order
    drawn), then equal ones if too few differ. A group with equal rewards has advantage 0 and adds nothing
    to the policy gradient; sampling K x the prompts and training on the n groups that do teach fills the
    update with signal, for K x the sampling (cheap next to the update when answers are short)."""
    groups = torch.argsort(equal.int(), stable=True)[:n]  # False (rewards differ) before True, in draw order
    rows = groups[:, None] * group_size + torch.arange(group_size, device=equal.device)
    return groups, rows.flatten()


def answer_mask(answers: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """answers (N, L), the sampled tokens after the prompt: 1.0 on each answer's tokens up to and including
    its first end-of-text token, 0.0 after it (generate fills a finished row with eos ids: padding). eos_id:
    one id, or a chat template's stop ids (its end-of-turn token and the end-of-text token)."""
    is_eos = torch.isin(answers, torch.tensor(eos_id, device=answers.device)).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # end-of-text tokens strictly before each position
    return (eos_before == 0).float()


def rollout_tensors(seqs: torch.Tensor, prompt_mask: torch.Tensor | None, prompt_len: int, eos_id: int):
    """The training batch of sampled sequences, as generate returned them: prompts left-padded to
    prompt_len (prompt_mask 0 on the padding; None: none), then the answers. Returns (idx, targets,
    attention_mask, mask): position t of idx predicts targets[t]; targets are -100 except on answer tokens;
    mask (N, L) marks the answer tokens (answer_mask) in answer order, aligned with targets[:, prompt_len - 1:]."""
    N, total = seqs.shape
    answers = seqs[:, prompt_len:]
    mask = answer_mask(answers, eos_id)
    full_mask = torch.ones_like(seqs)
    if prompt_mask is not None:
        full_mask[:, :prompt_len] = prompt_mask
    targets = torch.full((N, total - 1), -100, dtype=torch.long, device=seqs.device)
    answer_targets = torch.where(mask.bool(), answers, torch.full_like(answers, -100))
    targets[:, prompt_len - 1:] = answer_targets
    return seqs[:, :-1], targets, full_mask[:, :-1], mask


def answer_logps(model, idx, targets, attention_mask, prompt_len: int, autocast=contextlib.nullcontext):
    """(log-probs (N, L) of the answer tokens under model, the logits at those positions): one forward;
    each token's log p is minus its cross-entropy, computed by the model in fp32 (ChunkedCrossEntropy)."""
    with autocast():
        logits, nll = model(idx, targets, attention_mask=attention_mask, reduction="none")
    return -nll[:, prompt_len - 1:].float(), logits[:, prompt_len - 1:]


def grpo_token_loss(logps, old_logps, advantages, clip_eps: float = 0.2, ref_logps=None, kl_beta: float = 0.0):
    """The per-token loss (N, L) of the module docstring, and the per-token k3 KL (None without ref_logps):
        ratio = exp(logps - old_logps)
        loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)   (clip_eps 0: -ratio * A)
              + kl_beta * (exp(q) - q - 1),  q = ref_logps - logps
    advantages (N,) are each answer's, the same for all its tokens. At ratio 1 (old = logps, detached) the
    gradient is -A grad logps: REINFORCE's."""
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    if clip_eps > 0:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    else:
        per_token = -ratio * A
    kl = None
    if ref_logps is not None:
        q = ref_logps - logps
        kl = torch.exp(q) - q - 1  # k3: >= 0, unbiased for KL(pi || pi_ref) under samples of pi
        per_token = per_token + kl_beta * kl
    return per_token, kl


def token_entropy(logits, mask) -> torch.Tensor:
    """The summed entropy (nats) of the policy's next-token distribution over the masked positions, without
    a graph: how much sampling still explores (it falls as RL sharpens the policy)."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy * mask).sum()


# -----------------------------------------------------------------------------------------------
# 4. Sampling and evaluation


def prompt_batch(prompts: list[list[int]], repeat: int, pad_id: int | list[int], device):
    """Each prompt repeated `repeat` times (a group), left-padded to the longest: (ids (N, T), mask or None
    when no row is padded). Left padding puts every answer's first token in one column."""
    rows = [p for p in prompts for _ in range(repeat)]
    if not isinstance(pad_id, int):  # stop ids: the last is the end-of-text token, the usual padding
        pad_id = pad_id[-1]
    T = max(len(p) for p in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(policy, prompts: list[list[int]], repeat: int, max_new_tokens: int, eos_id: int | list[int],
           temperature: float, generator=None, autocast=contextlib.nullcontext, stop_early: bool = True):
    """All prompts x repeat answers in one batched generation with the KV cache. Returns (seqs (N, T + L),
    prompt mask or None, T). temperature 0: greedy.

    stop_early False (FSDP): every answer runs to max_new_tokens, even when all have ended. Under FSDP each
    forward pass gathers the weight shards from every rank (a collective), so every rank must run as many
    as the others, whatever its own answers did. The tokens up to each answer's end are the same either
    way (one draw per row and step); those after it are masked out (answer_mask) and never decoded."""
    ids, mask = prompt_batch(prompts, repeat, eos_id, policy.lm_head.weight.device)
    with autocast():
        seqs = policy.generate(ids, max_new_tokens, temperature=temperature, attention_mask=mask,
                               eos_token_id=eos_id if stop_early else None, generator=generator)
    return seqs, mask, ids.size(1)


def decode_answers(tok, answers: torch.Tensor, eos_id: int | list[int]) -> list[str]:
    """The text of each row's answer tokens, up to (without) its first stop token (eos_id: one, or several)."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out = []
    for row in answers.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(tok.decode(row[:end]))
    return out


@torch.no_grad()
def evaluate(policy, tok, prompts, texts, references, reward, cfg: RLConfig, autocast, batch_size: int = 16):
    """The held-out figures: exact_match (greedy answers with reward 1: pass@1), pass_at_k (prompts with a
    reward-1 answer among G samples at --temperature), reward and length (the samples' mean reward and
    answer tokens), and the first --num_samples greedy answers. The samples come from a generator seeded
    the same at every evaluation: before and after see the same random draws."""
    eos = reply_stops(tok, pick_template(cfg.template, tok, cfg.init_from))
    G = cfg.group_size
    generator = torch.Generator(device=policy.lm_head.weight.device).manual_seed(cfg.seed + 2)
    greedy, sampled, lengths = [], [], []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        seqs, _, T = sample(policy, chunk, 1, cfg.max_new_tokens, eos, 0.0, autocast=autocast,
                            stop_early=not cfg.fsdp)
        greedy += decode_answers(tok, seqs[:, T:], eos)
        seqs, _, T = sample(policy, chunk, G, cfg.max_new_tokens, eos, cfg.temperature, generator, autocast,
                            stop_early=not cfg.fsdp)
        sampled += decode_answers(tok, seqs[:, T:], eos)
        lengths += answer_mask(seqs[:, T:], eos).sum(1).tolist()
    n = len(prompts)
    greedy_r = score_answers(reward, texts, greedy, references)
    sampled_r = score_answers(reward, [t for t in texts for _ in range(G)], sampled,
                              [r for r in references for _ in range(G)])
    metrics = dict(val_reward=sum(sampled_r) / len(sampled_r), val_length=sum(lengths) / len(lengths))
    if reward in ("exact", "number"):  # a right answer exists: reward 1
        metrics["val_exact_match"] = sum(r == 1 for r in greedy_r) / n
        metrics["val_pass_at_k"] = sum(any(r == 1 for r in sampled_r[i * G:(i + 1) * G]) for i in range(n)) / n
    else:
        metrics["val_greedy_reward"] = sum(greedy_r) / n
    return finite_figures("rl.py: the held-out prompts' metrics", metrics), greedy[: cfg.num_samples]


# -----------------------------------------------------------------------------------------------
# 5. The run


def load_prompts(path, tok, max_prompt_length: int, max_examples: int = 0, chat_template=None):
    """(token ids of each prompt, its text, its reference) from an instruction/input/output file; a prompt
    longer than max_prompt_length keeps its end (right before the answer). Each prompt as fine-tuning wrote
    it: Alpaca's template, or with the model's chat template (one user message, the assistant's header)."""
    examples = load_alpaca(path, max_examples=max_examples)
    if chat_template is None:
        texts = [format_prompt(e) for e in examples]
        ids = [tok.encode(t) or [tok.eot_id] for t in texts]
    else:
        texts = [chat_template.render(instruction_messages(e), add_generation_prompt=True) for e in examples]
        ids = [chat_template.prompt_ids(instruction_messages(e)) for e in examples]
    return [p[-max_prompt_length:] for p in ids], texts, [e["output"] for e in examples]


def split_prompts(cfg: RLConfig, tok, chat_template=None):
    """(training, held-out) prompts, each (ids, texts, references): --val_file, else a --val_frac share of the
    shuffled --data_file (the same split on every rank and at every --resume)."""
    ids, texts, refs = load_prompts(cfg.data_file, tok, cfg.max_prompt_length, cfg.max_examples, chat_template)
    order = list(range(len(ids)))
    random.Random(cfg.seed).shuffle(order)
    if cfg.val_file:
        val = load_prompts(cfg.val_file, tok, cfg.max_prompt_length, chat_template=chat_template)
        n_val = 0
    else:
        n_val = max(1, round(len(ids) * cfg.val_frac)) if cfg.val_frac > 0 else 0
        val = tuple([x[i] for i in order[:n_val]] for x in (ids, texts, refs))
    train = tuple([x[i] for i in order[n_val:]] for x in (ids, texts, refs))
    if not train[0]:
        raise ValueError(f"{cfg.data_file}: no training prompts left after the held-out split")
    keep = cfg.eval_prompts or None
    return train, tuple(x[:keep] for x in val)


def lora_policy(gpt, cfg: RLConfig):
    if cfg.lora_rank > 0:
        apply_lora(gpt, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return gpt


def save_weights(policy, cfg: RLConfig, tok, where: Path, master: bool, merged: bool = False):
    """LoRA: the PEFT adapter (merged: the model with W + scaling B A; the policy loses its adapters);
    full: the model. Under FSDP every rank gathers into an empty policy of the same shape, rank 0 writes."""
    save_policy(policy, lambda: lora_policy(GPT(policy.config), cfg), where, master, cfg.init_from, tok.source,
                merged)


def save_state(out: Path, policy, optimizer, step: int, data_rng, order, seed_rng, device, log: RunLog):
    """out/ckpt/: the weights, the optimizer, the step, the prompt order and the generator of the sampling
    seeds (so a resumed run samples the very answers the uninterrupted one would), every rank's RNGs."""
    extra = dict(shuffle=data_rng.getstate(), order=order, sampling=seed_rng.getstate(),
                 rng=all_ranks(rng_state(device)))
    save_train_state(out, policy, optimizer, step, extra, log.master)
    log.say(f"resumable state: step {step} in {out / 'ckpt'}")


def all_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    """values summed over the ranks (one process: unchanged)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def write_outputs(out: Path, rows: list[dict], summary: dict):
    """Rank 0's files at the end: the plot and the summary."""
    plot_log(rows, out / "loss.png", [["reward", "val_reward", "val_exact_match", "val_pass_at_k"], ["loss"]],
             titles=["reward (training samples; held out)", "loss"])
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))


def summarize(rows: list[dict]) -> dict:
    """before -> after: the first and last evaluation's held-out figures (val_ prefix dropped)."""
    evals = [r for r in rows if "val_reward" in r]
    summary = {"before": {}, "after": {}}
    if evals:
        for when, row in (("before", evals[0]), ("after", evals[-1])):
            summary[when] = {k[4:]: v for k, v in row.items() if k.startswith("val_") and k != "val_answers"}
    return summary


def train(cfg: RLConfig) -> dict:
    """Set-up (device, policy, prompts, reward, optimizer, the run's files), the loop, then the end
    (weights, summary)."""
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    precision = pick_precision(cfg.precision, device)
    rank, _, world = init_distributed(device)  # torchrun: one process per device; plain python: 1 of 1
    master = rank == 0  # only rank 0 prints, logs and writes files
    torch.manual_seed(cfg.seed)
    out = open_run(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # every rank: rank 0 decides
    lora = cfg.lora_rank > 0
    lr = cfg.lr or (1e-4 if lora else 1e-6)  # the peak; LoRA's few fresh weights take far larger steps
    warmup, warmup_note = resolve_warmup(cfg.warmup_steps, cfg.max_steps)

    # the policy, its prompts and the reward; the model before its tokenizer: a wrong --init_from is the error
    policy = load_base(cfg.init_from, precision, lora, cfg.quantize, device, cfg.fsdp)
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no end-of-text token; answers must end with one")
    chat_template = pick_template(cfg.template, tok, cfg.init_from)  # the model's own chat template, or ours
    eos = reply_stops(tok, chat_template)  # with a chat template, a reply ends at its end-of-turn token too
    (train_ids, train_texts, train_refs), (val_ids, val_texts, val_refs) = split_prompts(cfg, tok, chat_template)
    # the longest prompt + answer within the model's context: fewer new tokens, or prompts cut from the left
    [_], n_new = fit_to_context([max(train_ids + val_ids, key=len)], cfg.max_new_tokens, policy.config.block_size)
    cfg.max_new_tokens = n_new
    keep = policy.config.block_size - n_new
    train_ids = [p[-keep:] for p in train_ids]
    val_ids = [p[-keep:] for p in val_ids]
    reward = cfg.reward
    if cfg.reward == "model":  # loaded now: a wrong name stops here, before anything is sampled
        load_reward_model(cfg.reward_model, device)
        reward = functools.partial(reward_scores, cfg.reward_model, device=device)
    autocast, scaler = autocast_and_scaler(precision, device_type)
    if master:
        print(f"{len(train_ids)} training prompts, {len(val_ids)} held out; reward {cfg.reward}", flush=True)

    # the trained policy (LoRA or whole), the KL's reference (only with --kl_beta), then DDP
    lora_policy(policy, cfg)
    ref_model = None
    if cfg.kl_beta > 0 and not lora:  # a frozen copy; with LoRA the policy with its adapters off is the reference
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    train_module = distribute(policy, device, cfg.fsdp, precision, block_type=Block)  # DDP wraps; FSDP shards in place
    if cfg.fsdp and world > 1:  # FSDP2 sets itself up at the whole model's first forward; sampling runs the blocks
        with torch.no_grad():  # alone (model.generate), so one forward first; then the weights back in shards,
            train_module(torch.zeros((1, 1), dtype=torch.long, device=device))  # those the optimizer must hold
        train_module.reshard()
    seed_everything(cfg.seed + rank)  # the same init on every rank above; from here each rank its own dropout
    policy.train()
    optimizer = make_optimizer(policy, cfg.optimizer, lr, cfg.weight_decay, fused=device_type == "cuda")

    # the run exists from here on (a run that failed while loading leaves nothing behind)
    if master:
        write_run_config(out, cfg)  # the flags, and the identity of the starting weights
    data_rng = random.Random(cfg.seed)  # the prompt order, the same on every rank: each takes its share
    seed_rng = random.Random(cfg.seed + 1)  # each micro-batch's sampling seed, drawn the same on every rank
    order = []  # the rest of this pass's prompt indices, taken from the end
    start = 0
    rows = []
    if cfg.resume:  # the weights, optimizer, prompt order, sampling seeds and RNGs of the last saved step
        start, extra = load_train_state(out, policy, optimizer)
        data_rng.setstate(extra["shuffle"])
        order = extra["order"]
        seed_rng.setstate(extra["sampling"])
        set_rng_state(extra["rng"][rank if len(extra["rng"]) == world else 0], device)
        if master:  # what the killed run logged after that step is about to be redone
            rows = rewrite_log(out / "log.jsonl", lambda r: r["step"] <= start if "loss" in r else r["step"] < start)
            print(f"resuming at step {start}", flush=True)
    log = RunLog(out, master, rows)
    clock = StepClock(cfg.max_steps)
    if master:
        print(f"precision {precision}, {cfg.max_steps} steps of {cfg.batch_size} prompts x {cfg.group_size} answers "
              f"x {cfg.grad_accum} x {world} rank(s) on {device}{' (DDP)' if world > 1 else ''}, lr {lr:g}",
              flush=True)
        if warmup_note:
            print(f"note: {warmup_note}", flush=True)
    run_start = time.time()

    stop = GracefulStop()  # Ctrl-C / SIGTERM: the state at the next step boundary, then exit
    for step in range(start, cfg.max_steps + 1):
        last_step = step == cfg.max_steps

        # checkpoints and stops come first, before this step's evaluation: a resumed run evaluates `step` again
        if cfg.ckpt_interval and step > start and step % cfg.ckpt_interval == 0 and not last_step:
            save_state(out, policy, optimizer, step, data_rng, order, seed_rng, device, log)
        if cfg.stop_at_step and step == cfg.stop_at_step:
            log.say(f"stopping at step {step} (--stop_at_step), as if killed")
            end_distributed()
            return dict(log=log.rows)
        if stop.requested(device) and not last_step:
            save_state(out, policy, optimizer, step, data_rng, order, seed_rng, device, log)
            log.close()
            if master:
                close_run(out)
            stop.exit(step, out / "ckpt")

        # evaluate the held-out prompts at 0 (the model it starts from), every --eval_interval steps and at
        # the end: greedy exact match, pass@G of samples, their mean reward and length
        if val_ids and (step % cfg.eval_interval == 0 or last_step):
            metrics, shown = evaluate(policy, tok, val_ids, val_texts, val_refs, reward, cfg, autocast)
            log.record(dict(step=step, **metrics, val_answers=shown))
            log.say(f"step {step}: held out " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in metrics.items()))
        if last_step:
            break

        # 1. this step's prompts: every rank draws the whole step's (batch_size x grad_accum x world) from the
        # one shared order, and a sampling seed for each micro-batch, and keeps its own micro-batches: two
        # ranks then sample exactly what one process with twice the accumulation would
        step_start = time.perf_counter()
        mine = []
        for k in range(cfg.grad_accum * world):
            picked = []
            for _ in range(cfg.batch_size * cfg.oversample):
                if not order:  # a new pass: the prompts in a new order
                    order = list(range(len(train_ids)))
                    data_rng.shuffle(order)
                picked.append(order.pop())
            micro_seed = seed_rng.getrandbits(62)
            if k // cfg.grad_accum == rank:
                mine.append((picked, micro_seed))

        # 2. sample G answers per prompt (temperature 1, the KV cache), 3. score them, 4. the advantages
        rollouts = []
        stats = torch.zeros(4, device=device)  # reward sum, answers, equal groups, groups
        for picked, micro_seed in mine:
            generator = torch.Generator(device=device).manual_seed(micro_seed)
            seqs, prompt_mask, T = sample(policy, [train_ids[i] for i in picked], cfg.group_size, cfg.max_new_tokens,
                                          eos, cfg.temperature, generator, autocast, stop_early=not cfg.fsdp)
            texts = decode_answers(tok, seqs[:, T:], eos)
            prompts = [train_texts[i] for i in picked for _ in range(cfg.group_size)]
            refs = [train_refs[i] for i in picked for _ in range(cfg.group_size)]
            rewards = torch.tensor(score_answers(reward, prompts, texts, refs), device=device)
            advantages, equal = group_advantages(rewards.view(len(picked), cfg.group_size), cfg.scale_rewards)
            stats += torch.stack([rewards.sum(), torch.tensor(float(len(texts)), device=device),
                                  equal.float().sum(), torch.tensor(float(len(picked)), device=device)])
            if cfg.oversample > 1:  # dynamic sampling: keep --batch_size groups, those with something to teach first
                kept, rows = keep_groups(equal, cfg.batch_size, cfg.group_size)
                seqs, advantages = seqs[rows], advantages[kept]
                prompt_mask = prompt_mask[rows] if prompt_mask is not None else None
            idx, targets, attention_mask, mask = rollout_tensors(seqs, prompt_mask, T, eos)
            rollouts.append(dict(idx=idx, targets=targets, attention_mask=attention_mask, mask=mask, T=T,
                                 advantages=advantages.flatten()))
        # N: the answer tokens of the whole step, every rank's; the loss is a sum over tokens divided by it
        my_tokens = sum(r["mask"].sum() for r in rollouts)
        my_answers = torch.tensor(float(sum(r["mask"].size(0) for r in rollouts)), device=device)  # trained on
        n_tokens = all_ranks_sum(my_tokens)
        sample_s = time.perf_counter() - step_start

        # the learning rate: the schedule as a multiplier of the peak (--warmup_steps, then a cosine decay to
        # --min_lr_ratio of it); one value for every update of this step
        lr_scale = lr_schedule(step, cfg.max_steps, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr_scale * lr

        # 5. the updates: --updates_per_batch optimizer steps on these samples, a micro-batch at a time
        update_start = time.perf_counter()
        sums = torch.zeros(3, device=device)  # loss, KL sum, entropy sum (over answer tokens)
        for update in range(cfg.updates_per_batch):
            for micro_step, r in enumerate(rollouts):
                # DDP averages the ranks' gradients in the last micro-batch's backward only
                with grad_sync(train_module, micro_step == len(rollouts) - 1):
                    logps, logits = answer_logps(train_module, r["idx"], r["targets"], r["attention_mask"], r["T"],
                                                 autocast)
                    if update == 0:  # pi_old: the policy that sampled, which the first update starts from
                        r["old"] = logps.detach()
                        r["ref"] = None
                        if cfg.kl_beta > 0:  # the starting model's log-probs of these answers, once
                            r["ref"] = reference_logps(ref_model, policy, r, autocast)
                    per_token, kl = grpo_token_loss(logps, r["old"], r["advantages"], cfg.clip_eps, r["ref"],
                                                    cfg.kl_beta)
                    # summed over this micro-batch's answer tokens, divided by N, the step's: the micro-batches
                    # (and ranks) add up to the token-level mean. DDP averages over the ranks, so x world.
                    loss = (per_token * r["mask"]).sum() / n_tokens
                    if scaler is not None:  # fp16: scaled up, so that small gradients do not underflow to 0
                        scaler.scale(loss * world).backward()
                    else:
                        (loss * world).backward()
                if update == 0:
                    kl_sum = (kl * r["mask"]).sum().detach() if kl is not None else torch.zeros((), device=device)
                    sums += torch.stack([loss.detach(), kl_sum, token_entropy(logits, r["mask"])])

            # fp16: the gradients carry the loss scale; unscale them first, so that clipping sees the true norm
            if scaler is not None:
                scaler.unscale_(optimizer)
            # clip the global norm: a batch with a huge gradient moves the weights a bounded distance
            params = [p for p in policy.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if scaler is not None:
                scaler.step(optimizer)  # skipped if a gradient overflowed (inf/NaN); the scale then shrinks
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # the next update's backward adds into fresh gradients

        # the step's numbers, summed over the ranks and read to the host at once, logged as step + 1
        totals = all_ranks_sum(torch.cat([sums, stats, my_tokens.float()[None], my_answers[None]]))
        loss_v, kl_v, entropy_v, reward_v, n_answers, n_equal, n_groups, n_tok, n_trained = totals.tolist()
        grad_norm = float(grad_norm)
        step_s = time.perf_counter() - step_start
        clock.add(step_s)
        check_finite(step + 1, scaler, loss=loss_v, grad_norm=grad_norm)
        row = dict(step=step + 1, loss=loss_v, reward=reward_v / n_answers, equal_groups=n_equal / n_groups,
                   entropy=entropy_v / n_tok, length=n_tok / n_trained, sample_s=sample_s,
                   update_s=time.perf_counter() - update_start, lr=lr_scale * lr, grad_norm=grad_norm, ms=1000 * step_s)
        if cfg.kl_beta > 0:
            row["kl"] = kl_v / n_tok
        log.record(row)
        if (step + 1) % cfg.log_interval == 0 or step == start:
            log.say(f"step {step + 1}/{cfg.max_steps}: reward {row['reward']:.3f}, equal groups "
                    f"{row['equal_groups']:.2f}, loss {loss_v:.4f}, entropy {row['entropy']:.3f}, length "
                    f"{row['length']:.1f}, sampling {sample_s:.2f} s / updating {row['update_s']:.2f} s | "
                    f"{clock.left(step + 1)}")
        if len(clock.seconds) == 5:  # once: how long the whole run takes
            log.say(f"the whole run: {clock.estimate()}")
    stop.restore()

    # the end: the state (--resume with a larger --max_steps continues from here), the weights, the summary
    log.close()
    save_state(out, policy, optimizer, cfg.max_steps, data_rng, order, seed_rng, device, log)
    summary = summarize(log.rows)
    save_weights(policy, cfg, tok, out / ("adapter" if lora else "model"), master)
    if lora:  # the merged model too, for the stages after (hellaswag.py, chat.py) and any HF tool
        save_weights(policy, cfg, tok, out / "model", master, merged=True)
    if master:
        write_outputs(out, log.rows, summary)
        close_run(out)
    log.say(f"done in {time.time() - run_start:.0f} s: training {sum(clock.seconds):.0f} s")
    evals = [r for r in log.rows if "val_answers" in r]
    if evals and evals[0]["val_answers"]:
        log.say(f"a held-out answer: {val_texts[0].split('### Instruction:')[-1].split('### Response:')[0].strip()!r}"
                f" -> before {evals[0]['val_answers'][0]!r}, after {evals[-1]['val_answers'][0]!r} (reference "
                f"{val_refs[0]!r})")
    log.say(before_after(summary, f"{len(val_ids)} held-out prompts, {cfg.group_size} samples each"))
    written = ("summary.json", "log.jsonl", "loss.png", "adapter", "model")
    log.say("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    chain = "" if out == Path(RLConfig.out_dir) else f" --init_from {out}"
    log.say(f"next: python dpo.py{chain} (preference-tune it: the life cycle's last tuning stage), python "
            f"hellaswag.py{chain} (evaluate it beside the earlier stages), or python chat.py{chain} "
            f"(talk to it)")
    end_distributed()
    return dict(log=log.rows, summary=summary)


@torch.no_grad()
def reference_logps(ref_model, policy, r: dict, autocast):
    """The starting model's log-probs of a rollout's answer tokens: the frozen copy, or (LoRA) the policy
    with its adapters off."""
    if ref_model is not None:
        return answer_logps(ref_model, r["idx"], r["targets"], r["attention_mask"], r["T"], autocast)[0]
    with adapters_off(policy):
        return answer_logps(policy, r["idx"], r["targets"], r["attention_mask"], r["T"], autocast)[0]


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
