"""
score.py: rate a model's answers, to compare checkpoints and pick the best one: a reward model (a
Hugging Face sequence classifier, e.g. OpenAssistant's DeBERTa) and/or an LLM judge (any
OpenAI-compatible chat-completions API) score the greedy answers to a prompt set.

Run it:
    python score.py --init_from out-finetune --reward_model OpenAssistant/reward-model-deberta-v3-large-v2
    python score.py --init_from out-finetune --reward_model none --judge_url https://api.openai.com/v1
    python score.py --init_from out-finetune/best_adapter --base gpt2 --prompts my_prompts.jsonl
    python score.py --help

--init_from is one model (our or HF format), one LoRA adapter (on --base), or a run directory,
whose ckpt_step*/, best_model/ and best_adapter/ are scored in turn. For each: the mean ± standard
error of each score over the prompts; the best checkpoint is named. Results go to scores.jsonl (one
row per checkpoint: answers, scores, means, stderrs, unjudged items) and scores.md in that directory.
finetune.py --score_every_eval runs this script at every evaluation.

The judge is asked, per answer, for an integer 0-100 given the instruction and a reference answer
(the rubric below). Requests are retried on timeouts, 429 and 5xx with exponential backoff; every
judged item goes to judge_cache.jsonl at once, so a re-run never pays twice and a failure midway
loses nothing. A reply that is not a bare integer 0-100 leaves the item unjudged (reported).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bpe import load_tokenizer

from housekeeping import atomic_write
from lora import load_adapter
from model import GPT
from housekeeping import (DEVICE_HELP, flag, fit_to_context, mean_stderr, parse_config, pick_device, resolve_init_from,
                          run_main, write_jsonl)
from prepare_data import format_dialogue, format_prompt, read_jsonl, read_text_file, string_fields


@dataclass
class ScoreConfig:
    init_from: str = flag("out-finetune", "a run dir (its ckpt_step*/, best_model/, best_adapter/), a model dir, or "
                                         "an adapter dir")
    base: str = flag("gpt2", "the base model of adapter checkpoints (gpt2 name, HF dir or our dir)")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model dir's own, else GPT-2's)")
    task: str = flag("instruction", "prompt format: instruction (Alpaca template) or dialogue (HH-RLHF turns)",
                    choices=["instruction", "dialogue"])
    prompts: str | None = flag(None, "jsonl of {instruction, input?, output? (reference)} or text, one prompt a line "
                                    "(default: the 40 built-in everyday questions)")
    reward_model: str = flag("OpenAssistant/reward-model-deberta-v3-large-v2", "HF sequence-classification reward "
                                                                            "model (hub id or dir), or none")
    judge_url: str | None = flag(None, "OpenAI-compatible API base URL; POSTs {url}/chat/completions")
    judge_model: str = flag("gpt-4o-mini", "the judge's model name")
    judge_key_env: str = flag("OPENAI_API_KEY", "environment variable holding the judge's API key (none sent if unset)")
    judge_timeout: float = flag(60.0, "seconds per judge request", min=0.001)
    judge_retries: int = flag(4, "retries on timeouts, 429 and 5xx", min=0)
    max_new_tokens: int = flag(128, "longest answer", min=1)
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
def answer(model, tok, prompts: list[dict], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers (stopping at EOS) to the prompts, in their template."""
    out, eos = [], tok.eot_id
    for i in range(0, len(prompts), batch_size):
        ids, n_new = fit_to_context([tok.encode(format_prompt(p)) for p in prompts[i:i + batch_size]],
                                    max_new_tokens, model.config.block_size)
        seqs = model.generate(ids, n_new, temperature=0, eos_token_id=eos).tolist()
        T = max(len(x) for x in ids)
        for s in seqs:
            new = s[T:]
            out.append(tok.decode(new[: new.index(eos)] if eos in new else new).strip())
    return out


@functools.lru_cache(maxsize=1)  # loaded once for all the checkpoints of a run
def _reward_model(name: str, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(name),
                AutoModelForSequenceClassification.from_pretrained(name).to(device).eval())
    except pickle.UnpicklingError:  # transformers reads a .bin with weights_only: it refused a payload
        bins = sorted(str(p) for p in Path(name).glob("*.bin")) or [name]
        raise ValueError(f"{', '.join(bins)}: refused: this pickle holds more than tensors, and unpickling it "
                         f"could run code; nothing of it was run. Use the model's .safetensors") from None
    except OSError as e:
        raise ValueError(f"--reward_model {name}: cannot be loaded ({str(e).splitlines()[0][:160]}). "
                         f"Offline? `hf download {name} --local-dir models/reward` where there is "
                         f"internet, then pass --reward_model models/reward") from None


@torch.no_grad()
def reward_scores(reward_model: str, questions: list[str], answers: list[str], batch_size: int = 8,
                  device="cpu") -> list[float]:
    """A reward model's score of each (question, answer): the pair encoded together, logit 0, as the
    OpenAssistant reward models' cards do."""
    tok, rm = _reward_model(reward_model, device)
    out = []
    for i in range(0, len(questions), batch_size):
        enc = tok(questions[i:i + batch_size], answers[i:i + batch_size], return_tensors="pt", padding=True,
                  truncation=True).to(device)
        out += rm(**enc).logits[:, 0].float().tolist()
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
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
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


def _stats(name: str, xs: list[float]) -> dict:
    m, se = mean_stderr(sum(xs), sum(x * x for x in xs), len(xs))
    return {f"{name}_mean": m, f"{name}_stderr": se}


def checkpoints(path: Path) -> list[tuple[str, Path]]:
    """(name, dir) of the model or adapter checkpoints in a run dir, or the dir itself."""
    if any((path / f).exists() for f in ("gpt_config.json", "config.json", "adapter_config.json")) and not (
            path / "log.jsonl").exists():
        return [(path.name, path)]
    found = sorted(path.glob("ckpt_step*"), key=lambda p: int(p.name[len("ckpt_step"):]))
    found += [p for p in (path / "best_model", path / "best_adapter") if p.is_dir()]
    if not found:  # a run of dpo.py or train_gpt2.py: its final model or last checkpoint
        picked = Path(resolve_init_from(str(path)))
        found = [picked] if picked != path else []
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (a model dir, or a run dir with ckpt_step*/ or best_model/)")
    return [(p.name, p) for p in found]


def score(c: ScoreConfig) -> list[dict]:
    reward_model = None if c.reward_model.lower() == "none" else c.reward_model
    if not (reward_model or c.judge_url):
        raise ValueError("scoring needs --reward_model and/or --judge_url")
    device = pick_device(c.device)
    root = Path(c.init_from)
    if not root.is_dir():
        raise FileNotFoundError(f"--init_from {root}: no such directory")
    prompts = load_prompts(c.prompts, c.task)
    judge = Judge(c.judge_url, c.judge_model, c.judge_key_env, c.judge_timeout, c.judge_retries,
                  cache_path=root / "judge_cache.jsonl") if c.judge_url else None
    rows = []
    for name, ckpt in checkpoints(root):
        if (ckpt / "adapter_config.json").exists():  # a LoRA adapter: on top of --base
            model = load_adapter(GPT.from_pretrained(c.base, device=device), ckpt)
            tok = load_tokenizer(c.tokenizer, c.base)
        else:
            model = GPT.from_pretrained(str(ckpt), device=device)
            tok = load_tokenizer(c.tokenizer, str(ckpt))
        answers = answer(model.eval(), tok, prompts, c.max_new_tokens)
        row = {"checkpoint": name, "step": int(name[9:]) if name.startswith("ckpt_step") else None, "answers": answers}
        if reward_model:
            row["reward"] = reward_scores(reward_model, [p["instruction"] for p in prompts], answers, device=device)
            row.update(_stats("reward", row["reward"]))
        if judge is not None:
            row["judge"], row["unjudged"] = judge_answers(judge, prompts, answers)
            row.update(_stats("judge", [x for x in row["judge"] if x is not None]))
            if row["unjudged"]:
                print(f"{name}: {len(row['unjudged'])} item(s) not judged: {row['unjudged'][:5]}")
        rows.append(row)
        # after each checkpoint: nothing scored is lost
        write_jsonl(root / "scores.jsonl", rows)
        print(f"{name}: " + ", ".join(f"{k[:-5]} {row[k]:.3f} ± {row[k[:-5] + '_stderr']:.3f}"
                                      for k in ("reward_mean", "judge_mean") if k in row))
    metric = "reward_mean" if reward_model else "judge_mean"
    best = max(rows, key=lambda r: r[metric] if r[metric] == r[metric] else -math.inf)
    md = [f"# Scores of {root} ({len(prompts)} prompts)\n", "| checkpoint | reward | judge |", "| --- | --- | --- |"]
    fmt = lambda r, k: f"{r[k]:.3f} ± {r[k[:-5] + '_stderr']:.3f}" if k in r else "–"  # noqa: E731
    md += [f"| {r['checkpoint']} | {fmt(r, 'reward_mean')} | {fmt(r, 'judge_mean')} |" for r in rows]
    md.append(f"\nbest by {metric[:-5]}: **{best['checkpoint']}**")
    atomic_write(root / "scores.md", lambda p: Path(p).write_text("\n".join(md) + "\n"))
    print(f"best by {metric[:-5]}: {best['checkpoint']}; scores in {root / 'scores.md'}")
    return rows


def main(argv=None):
    return score(parse_config(ScoreConfig, argv, __doc__.split("\n\n")[0].strip())[0])


if __name__ == "__main__":
    run_main(main)
