"""
score.py: rate a model's answers, to compare checkpoints and pick the best one. The greedy answers to
a prompt set are scored by one or more of:
  - exact match against the prompts' reference answers: the offline default, on the built-in tasks'
    held-out questions (prepare_data.builtin_tasks, the check finetune.py reports);
  - a reward model: a Hugging Face sequence classifier, e.g. OpenAssistant's DeBERTa;
  - an LLM judge: any OpenAI-compatible chat-completions API.

Run it:
    python score.py                        # offline: the last stage's run on this machine, by exact match
    python score.py --init_from out-finetune --reward_model OpenAssistant/reward-model-deberta-v3-large-v2
    python score.py --init_from out-finetune --reward_model none --judge_url https://api.openai.com/v1
    python score.py --init_from out-finetune/best_adapter --base gpt2 --prompts my_prompts.jsonl
    python score.py --help

What is scored (--init_from):
  - one model (our format or HF's), or one LoRA adapter (on --base: by default the base its
    adapter_config.json names);
  - or a run directory: its ckpt_step*/, best_model/ and best_adapter/ in turn (else its final model);
  - auto (default): the run of the last stage on this machine (out-dpo, out-rl, out-finetune, out/cpu).
The prompt set: --prompts; else, with a reward model or a judge, 40 built-in everyday questions; else
the built-in tasks' held-out questions. The reward model is loaded before any answer is generated: a
name that cannot be loaded stops the run at once.

For each checkpoint: the mean ± standard error of each score over the prompts; the best checkpoint is
named. Results go to scores.jsonl (one row per checkpoint: answers, scores, means, stderrs, unjudged
items) and scores.md in that directory. finetune.py --score_every_eval runs this script at every
evaluation.

The judge is asked, per answer, for an integer 0-100 given the instruction and a reference answer
(the rubric below).
  - Requests are retried on timeouts, 429 and 5xx with exponential backoff.
  - Every judged item goes to judge_cache.jsonl at once: a re-run never pays twice, and a failure
    midway loses nothing.
  - A reply that is not a bare integer 0-100 leaves the item unjudged (reported).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bpe import TEMPLATE_CHOICES, TEMPLATE_HELP, instruction_messages, load_tokenizer, pick_template, reply_stops
from lora import load_adapter
from model import GPT
from housekeeping import (DEVICE_HELP, atomic_write, auto_init_from, fit_to_context, flag, load_reward_model,
                          mean_stderr, parse_config, pick_device, resolve_init_from, reward_scores, run_main,
                          write_jsonl)
from prepare_data import (builtin_tasks, exact_match, format_dialogue, format_prompt, read_jsonl, read_text_file,
                          string_fields)

# The life cycle's models, latest stage first, and the run directory each belongs to: --init_from auto
# scores the run of the first one on this machine (a fine-tuning run: its checkpoints and its best model).
STAGE_RUNS = {"out-dpo/model": "out-dpo",
              "out-rl/model": "out-rl",
              "out-finetune/best_model": "out-finetune",
              "out-finetune/model": "out-finetune",
              "out/cpu/model": "out/cpu",
              "out/cpu/ckpt/model": "out/cpu"}  # ckpt/model: where train_gpt2.py's older runs left their model


@dataclass
class ScoreConfig:
    init_from: str = flag("auto", "a run dir (its ckpt_step*/, best_model/, best_adapter/), a model dir, or an "
                                 "adapter dir; auto: the last stage's run on this machine (out-dpo, out-rl, "
                                 "out-finetune, out/cpu)")
    base: str = flag("auto", "the base model of adapter checkpoints (gpt2 name, HF dir or our dir); auto: the one "
                             "the adapter's adapter_config.json names")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model dir's own, else GPT-2's)")
    task: str = flag("instruction", "prompt format: instruction (Alpaca template) or dialogue (HH-RLHF turns)",
                    choices=["instruction", "dialogue"])
    template: str = flag("auto", TEMPLATE_HELP + " (ours: --task's format; chat: each prompt one user message)",
                         choices=TEMPLATE_CHOICES)
    prompts: str | None = flag(None, "jsonl of {instruction, input?, output? (reference)} or text, one prompt a line "
                                    "(default: with --reward_model or --judge_url, the 40 built-in everyday "
                                    "questions; else the built-in tasks' held-out questions, by exact match)")
    max_examples: int = flag(0, "score the answers to the first N prompts only (0: all)", min=0)
    reward_model: str = flag("none", "HF sequence-classification reward model (hub id or dir), e.g. "
                                     "OpenAssistant/reward-model-deberta-v3-large-v2, or none")
    judge_url: str | None = flag(None, "OpenAI-compatible API base URL; POSTs {url}/chat/completions")
    judge_model: str = flag("gpt-4o-mini", "the judge's model name")
    judge_key_env: str = flag("OPENAI_API_KEY", "environment variable holding the judge's API key (none sent if unset)")
    judge_timeout: float = flag(60.0, "seconds per judge request", min=0.001)
    judge_retries: int = flag(4, "retries on timeouts, 429 and 5xx", min=0)
    max_new_tokens: int | None = flag(None, "longest answer (default: 128; 24 on the offline default's built-in "
                                            "tasks, whose answers are a few tokens)", min=1)
    device: str = flag("auto", DEVICE_HELP)


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


def load_prompts(path=None, task: str = "instruction") -> list[dict]:
    """The prompt set, in the task's format (a dialogue prompt ends with "\\n\\nAssistant:")."""
    if path is None:
        prompts = [{"instruction": q, "input": "", "output": ""} for q in DEFAULT_PROMPTS]
    elif Path(path).suffix == ".jsonl":
        prompts = [string_fields(rec, where, ("instruction",), ("input", "output")) for where, rec in read_jsonl(path)]
    else:
        prompts = [{"instruction": line.strip(), "input": "", "output": ""}
                   for line in read_text_file(path).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if task == "dialogue":
        prompts = [dict(p, prompt=format_dialogue([("Human", " " + p["instruction"])], True)) for p in prompts]
    return prompts


@torch.no_grad()
def answer(model, tok, prompts: list[dict], max_new_tokens: int, batch_size: int = 8, chat_template=None) -> list[str]:
    """Greedy answers (stopping at EOS) to the prompts, in their template; with the model's chat template
    (`chat_template`, a bpe.ChatTemplate) each prompt is one user message, and an answer ends at its end-of-turn
    token."""
    out = []
    stops = reply_stops(tok, chat_template)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        if chat_template is None:
            ids = [tok.encode(format_prompt(p)) for p in batch]
        else:
            ids = [chat_template.prompt_ids(instruction_messages(p)) for p in batch]
        ids, n_new = fit_to_context(ids, max_new_tokens, model.config.block_size)
        seqs = model.generate(ids, n_new, temperature=0, eos_token_id=stops).tolist()
        T = max(len(x) for x in ids)
        for s in seqs:
            new = s[T:]
            end = next((k for k, t in enumerate(new) if t in stops), len(new))  # the stop token is not shown
            out.append(tok.decode(new[:end]).strip())
    return out


class JudgeError(ValueError):
    pass


def parse_judge_score(text) -> int | None:
    """Strict: the whole reply must be one integer 0-100 (whitespace aside); anything else is None."""
    if isinstance(text, str) and re.fullmatch(r"\s*\d{1,3}\s*", text) and 0 <= int(text) <= 100:
        return int(text)
    return None


class Judge:
    """An OpenAI-compatible chat-completions endpoint scoring answers 0-100, with retries and a cache."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, cache_path=None):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.key = os.environ.get(key_env)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache = {}
        if self.cache_path and self.cache_path.exists():
            for where, row in read_jsonl(self.cache_path):
                if isinstance(row, dict) and "key" in row:
                    self.cache[row["key"]] = row["score"]

    def score(self, instruction: str, reference: str, answer: str) -> tuple[int | None, str]:
        """(score or None, "cached" | "judged" | the reason it could not be judged)."""
        import requests

        messages = [{"role": "user", "content": JUDGE_RUBRIC.format(instruction=instruction, reference=reference,
                                                                     answer=answer)}]
        # keyed by everything the score depends on: the judge (its endpoint and model) and the whole prompt
        # (rubric, instruction, reference, answer); another judge never reuses these scores
        key = hashlib.sha256(json.dumps([self.url, self.model, messages]).encode()).hexdigest()
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


def exact_matches(prompts: list[dict], answers: list[str]) -> list[float]:
    """1.0 where an answer equals its prompt's reference answer (outer spaces aside), else 0.0: the
    built-in tasks' check (prepare_data.exact_match), one answer at a time."""
    return [exact_match([a], [p["output"]]) for p, a in zip(prompts, answers, strict=True)]


def _stats(name: str, xs: list[float]) -> dict:
    m, se = mean_stderr(sum(xs), sum(x * x for x in xs), len(xs), what=f"score.py: the {name} scores")
    return {f"{name}_mean": m, f"{name}_stderr": se}


SCORES = ("reward", "judge", "exact_match")  # the kinds of score, in the order that picks the best checkpoint


def checkpoints(path: Path) -> list[tuple[str, Path]]:
    """(name, dir) of the model or adapter checkpoints in a run dir, or the dir itself."""
    if any((path / f).exists() for f in ("gpt_config.json", "config.json", "adapter_config.json")) and not (
            path / "log.jsonl").exists():
        return [(path.name, path)]
    found = sorted(path.glob("ckpt_step*"), key=lambda p: int(p.name[len("ckpt_step"):]))
    found += [p for p in (path / "best_model", path / "best_adapter") if p.is_dir()]
    if not found:  # a run of dpo.py or train_gpt2.py: its final model or last checkpoint
        picked = Path(resolve_init_from(str(path)))
        if picked != path:
            found = [picked]
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (a model dir, or a run dir with ckpt_step*/ or best_model/)")
    return [(p.name, p) for p in found]


def scored_dir(init_from: str) -> Path:
    """The directory to score: --init_from, or for auto the run of the last stage on this machine."""
    if init_from != "auto":
        root = Path(init_from)
        if not root.is_dir():
            raise FileNotFoundError(f"--init_from {root}: no such directory")
        return root
    found = auto_init_from(tuple(STAGE_RUNS), run_first="python train_gpt2.py")
    if found not in STAGE_RUNS:  # GPT-2 from the hub: score.py scores what a run left on this machine
        raise ValueError(f"--init_from auto: no stage's model on this machine yet ({', '.join(STAGE_RUNS)}): run "
                         f"`python train_gpt2.py` (then `python finetune.py`) first, or pass --init_from a model "
                         f"or run directory")
    root = Path(STAGE_RUNS[found])
    print(f"--init_from auto: the run in {root} (the last stage's on this machine)")
    return root


def adapter_base(base: str, adapter_dir: Path) -> str:
    """--base, or for auto the base model an adapter names (finetune.py writes its --init_from there)."""
    if base != "auto":
        return base
    named = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not named:
        raise ValueError(f"{adapter_dir}: its adapter_config.json names no base model; pass --base")
    return named


def load_checkpoint(cfg: ScoreConfig, ckpt: Path, device):
    """(model in eval mode, tokenizer) of a model dir, or of a LoRA adapter on its base model."""
    if (ckpt / "adapter_config.json").exists():
        base = adapter_base(cfg.base, ckpt)
        model = load_adapter(GPT.from_pretrained(base, device=device), ckpt)
        return model.eval(), load_tokenizer(cfg.tokenizer, base)
    model = GPT.from_pretrained(str(ckpt), device=device)
    return model.eval(), load_tokenizer(cfg.tokenizer, str(ckpt))


def _cell(row: dict, key: str) -> str:
    """A scores.md cell: mean ± stderr, or a dash where that score was not taken."""
    if key not in row:
        return "–"
    return f"{row[key]:.3f} ± {row[key[:-len('_mean')] + '_stderr']:.3f}"


def score(cfg: ScoreConfig) -> list[dict]:
    reward_model = None if cfg.reward_model.lower() == "none" else cfg.reward_model
    device = pick_device(cfg.device)
    root = scored_dir(cfg.init_from)

    # the prompt set, and which scores it can take
    prompts_file = cfg.prompts
    if prompts_file is None and not (reward_model or cfg.judge_url):  # the offline default
        prompts_file = str(builtin_tasks()["instructions_test"])
        print(f"offline default: the built-in tasks' held-out questions ({prompts_file}), each answer scored by "
              f"exact match against its reference; a reward model or an LLM judge: --reward_model, --judge_url")
    prompts = load_prompts(prompts_file, cfg.task)[: cfg.max_examples or None]
    with_references = all(p["output"] for p in prompts)
    if not (reward_model or cfg.judge_url or with_references):
        raise ValueError(f"scoring needs --reward_model, --judge_url, or prompts with a reference answer each "
                         f"(output); {cfg.prompts} has none")
    max_new_tokens = cfg.max_new_tokens or (24 if cfg.prompts is None and with_references else 128)

    # load the reward model now: a name that cannot be loaded stops here, before any answer is generated
    if reward_model:
        load_reward_model(reward_model, device)  # a wrong name stops here, before any answer is generated
    judge = None
    if cfg.judge_url:
        judge = Judge(cfg.judge_url, cfg.judge_model, cfg.judge_key_env, cfg.judge_timeout, cfg.judge_retries,
                      cache_path=root / "judge_cache.jsonl")

    rows = []
    for name, ckpt in checkpoints(root):
        model, tok = load_checkpoint(cfg, ckpt, device)
        chat_template = pick_template(cfg.template, tok, ckpt)  # the model's own chat template, or our formats
        answers = answer(model, tok, prompts, max_new_tokens, chat_template=chat_template)
        step = int(name[len("ckpt_step"):]) if name.startswith("ckpt_step") else None
        row = {"checkpoint": name, "step": step, "answers": answers}
        if reward_model:
            row["reward"] = reward_scores(reward_model, [p["instruction"] for p in prompts], answers, device=device)
            row.update(_stats("reward", row["reward"]))
        if judge is not None:
            row["judge"], row["unjudged"] = judge_answers(judge, prompts, answers)
            row.update(_stats("judge", [x for x in row["judge"] if x is not None]))
            if row["unjudged"]:
                print(f"{name}: {len(row['unjudged'])} item(s) not judged: {row['unjudged'][:5]}")
        if with_references:
            row["exact_match"] = exact_matches(prompts, answers)
            row.update(_stats("exact_match", row["exact_match"]))
        rows.append(row)
        write_jsonl(root / "scores.jsonl", rows)  # after each checkpoint: nothing scored is lost
        print(f"{name}: " + ", ".join(f"{k} {_cell(row, k + '_mean')}" for k in SCORES if k + "_mean" in row))

    # the table, and the best checkpoint by the first score taken (reward, else judge, else exact match)
    taken = [k for k in SCORES if k + "_mean" in rows[0]]
    metric = taken[0] + "_mean"
    best = max(rows, key=lambda r: -math.inf if math.isnan(r[metric]) else r[metric])  # NaN: nothing judged
    md = [f"# Scores of {root} ({len(prompts)} prompts)\n", "| checkpoint | " + " | ".join(taken) + " |",
          "| --- |" + " --- |" * len(taken)]
    md += [f"| {r['checkpoint']} | " + " | ".join(_cell(r, k + "_mean") for k in taken) + " |" for r in rows]
    md.append(f"\nbest by {taken[0]}: **{best['checkpoint']}**")
    atomic_write(root / "scores.md", lambda p: Path(p).write_text("\n".join(md) + "\n"))
    print(f"best by {taken[0]}: {best['checkpoint']}; scores in {root / 'scores.md'}")
    return rows


def main(argv=None):
    cfg = parse_config(ScoreConfig, argv, __doc__.split("\n\n")[0].strip())[0]
    return score(cfg)


if __name__ == "__main__":
    run_main(main)
