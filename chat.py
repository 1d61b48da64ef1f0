"""
chat.py: talk to a model, or let it continue a prompt.

    python chat.py --init_from out-finetune/best_model                  # Alpaca format, one question at a time
    python chat.py --init_from out-dialogue/best_model --template dialogue     # multi-turn (HH-RLHF format)
    python chat.py --init_from gpt2 --prompt "Hello, I'm a language model," --num_samples 3
    python chat.py --init_from gpt2 --prompt "The meaning of life is" --num_beams 4 --temperature 0
    python chat.py --help

Interactive (no --prompt): each line you type is a message; the reply streams as it is generated.
In the dialogue template the whole conversation so far is the prompt (the oldest tokens are dropped
when it outgrows the context), and a reply ends at the end-of-text token or where the model starts
a new "Human:" turn. The Alpaca template answers each message alone, as Alpaca was trained.
/reset clears the history, /quit ends.

With --prompt: sampling from the prompt as it is (no template), as nanoGPT's sample.py does:
temperature, top-k, top-p (nucleus), beam search, with or without the KV cache (--no-cache).
A reply or sample never runs past the model's context: --max_new_tokens is capped at what the
prompt leaves (model.fit_to_context), and a note says so once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from bpe import load_tokenizer
from model import GPT
from housekeeping import (DEVICE_HELP, flag, fit_to_context, fits_in_memory, parse_config, pick_device, previous_stage,
                          resolve_init_from, run_main)
from prepare_data import TASK_QUESTIONS, format_dialogue, format_prompt


@dataclass
class ChatConfig:
    init_from: str = flag("auto", "gpt2|gpt2-medium|..., a HF hub id, a model directory (HF format or ours) or a "
                                 "run directory (its best or final model); "
                                 "auto: the last stage's model on this machine (out-dpo/model, "
                                 "out-finetune/best_model, out/cpu/ckpt/model), else gpt2")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model dir's own tokenizer, else GPT-2's)")
    template: str = flag("instruction", "interactive prompt format: instruction (Alpaca), dialogue (HH-RLHF "
                                       "turns, multi-turn) or none (plain continuation)",
                        choices=["instruction", "dialogue", "none"])
    prompt: str | None = flag(None, "continue this text and exit (no template) instead of chatting")
    num_samples: int = flag(1, "--prompt: how many continuations", min=1)
    max_new_tokens: int = flag(128, "tokens to generate per reply or sample (capped at what the model's context "
                                   "leaves after the prompt)", min=1)
    temperature: float = flag(0.7, "0 = greedy; higher = more random", min=0.0)
    top_k: int = flag(50, "sample only among the k most likely tokens (0 = all)", min=0)
    top_p: float = flag(0.95, "nucleus sampling threshold (1.0 = off)", min=0.0, max=1.0)
    num_beams: int = flag(1, "--prompt: >1 = beam search instead of sampling", min=1)
    length_penalty: float = flag(1.0, "--prompt with --num_beams: beam search length exponent")
    cache: bool = flag(True, "keep the keys and values of the prefix (the KV cache); --no-cache recomputes the "
                            "whole prefix at every step")
    stop_at_eos: bool = flag(True, "--prompt: end a sample at the end-of-text token")
    seed: int = flag(1337, "random seed for reproducible samples")
    device: str = flag("auto", DEVICE_HELP)
    dtype: str = flag("float32", "weight dtype", choices=["float32", "bfloat16", "float16"])


STAGE_MODELS = ("out-dpo/model", "out-finetune/best_model", "out/cpu/ckpt/model")  # the life cycle's, latest first


def load(c: ChatConfig):
    if c.init_from == "auto":
        c.init_from = previous_stage(*STAGE_MODELS) or "gpt2"
    c.init_from = resolve_init_from(c.init_from)  # a run directory: its best or final model
    device = pick_device(c.device)
    model = GPT.from_pretrained(c.init_from, dtype=getattr(torch, c.dtype), device=device).eval()
    if device == "cpu":
        model.decode_layout_()  # inference only: the faster weight layout for one-token steps (model.py)
    return model, load_tokenizer(c.tokenizer, c.init_from), device


def sample(c: ChatConfig, out=None) -> list[str]:
    """--prompt: num_samples continuations of the prompt, printed and returned."""
    out = out or sys.stdout
    model, tok, device = load(c)
    ids = tok.encode(c.prompt) or [tok.eot_id]  # an empty prompt: start from the document boundary
    [ids], n_new = fit_to_context([ids], c.max_new_tokens, model.config.block_size)
    seqs = model.generate(torch.tensor([ids] * c.num_samples, device=device), n_new,
                          temperature=c.temperature, top_k=c.top_k or None, top_p=c.top_p, num_beams=c.num_beams,
                          length_penalty=c.length_penalty, use_cache=c.cache, seed=c.seed,
                          eos_token_id=tok.eot_id if c.stop_at_eos else None)
    texts = []
    for row in seqs.tolist():
        new = row[len(ids):]
        if c.stop_at_eos and tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        texts.append(c.prompt + tok.decode(new))
        out.write(texts[-1] + "\n" + "-" * 60 + "\n")
    return texts


class _StopReply(Exception):
    pass


def chat(c: ChatConfig, stdin=None, stdout=None) -> list[str]:
    """Read messages line by line, stream the model's replies. Returns the prompts used."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tok, device = load(c)
    turns, prompts = [], []
    stdout.write(f"chatting with {c.init_from} ({c.template} format); /reset clears the history, /quit ends\n")
    if c.init_from in STAGE_MODELS[:2] and c.template == "instruction":  # tuned on the built-in tasks
        examples = (TASK_QUESTIONS["module"].format(m="pickle", n="PickleError"),
                    TASK_QUESTIONS["kind"].format(m="enum", n="IntFlag"))
        stdout.write(f"(tuned on questions about the standard library's names; modules it never saw, e.g.: "
                     f"{' / '.join(examples)})\n")
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
        if c.template == "dialogue":
            turns.append(("Human", " " + msg))
            prompt = format_dialogue(turns, add_assistant_prompt=True)
        else:
            prompt = msg if c.template == "none" else format_prompt({"instruction": msg, "input": ""})
        prompts.append(prompt)
        [ids], n_new = fit_to_context([tok.encode(prompt)], c.max_new_tokens, model.config.block_size)
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
            model.generate(torch.tensor([ids], device=device), n_new, temperature=c.temperature,
                           top_k=c.top_k or None, top_p=c.top_p, seed=c.seed + n, stream=stream, use_cache=c.cache)
        except _StopReply:
            pass
        stdout.write("\n")
        if c.template == "dialogue":
            turns.append(("Assistant", " " + shown.strip()))
    return prompts


def parse_args(argv=None) -> ChatConfig:
    c = parse_config(ChatConfig, argv, __doc__.split("\n\n")[0].strip())[0]
    # the sequences generated at once (8 bytes a token id, at least): a size beyond the machine fails here
    fits_in_memory(8 * c.num_samples * c.num_beams * c.max_new_tokens,
                   f"--num_samples {c.num_samples} x --num_beams {c.num_beams} x --max_new_tokens {c.max_new_tokens}")
    return c


def main(argv=None):
    c = parse_args(argv)
    return sample(c) if c.prompt is not None else chat(c)


if __name__ == "__main__":
    run_main(main)
