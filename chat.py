"""
chat.py: talk to a model, or let it continue a prompt.

    python chat.py                                                      # the last stage's model on this machine
    python chat.py --init_from out-finetune/best_model                  # Alpaca format, one question at a time
    python chat.py --init_from out-dialogue/best_model --template dialogue     # multi-turn (HH-RLHF format)
    python chat.py --init_from Qwen/Qwen2.5-0.5B-Instruct               # an instruct model: its own chat template
    python chat.py --init_from Qwen/Qwen2.5-0.5B-Instruct --prompt "What is the capital of France?" --show_prompt
    python chat.py --init_from gpt2 --prompt "Hello, I'm a language model," --num_samples 3
    python chat.py --init_from gpt2 --prompt "The meaning of life is" --num_beams 4 --temperature 0
    echo "Which module in: from pickle import PickleError" | python chat.py      # piped: one reply a line
    python chat.py --help

The prompt format (--template):
  - chat: the model's own chat template, where it ships one (an instruct model: its tokenizer_config.json's
    "chat_template" or chat_template.jinja), rendered by transformers (bpe.ChatTemplate); multi-turn, and a
    reply ends at the template's end-of-turn token (<|im_end|>, <|eot_id|>, ...), never shown;
  - instruction: Alpaca's template (our fine-tuned models); dialogue: HH-RLHF's "Human:/Assistant:" turns;
    none: the text as it is;
  - auto (default): chat where the model ships a template; else instruction, or with --prompt none.

Interactive (no --prompt): each line you type is a message; the reply streams as it is generated.
In the chat and dialogue templates the whole conversation so far is the prompt (the oldest tokens are
dropped when it outgrows the context), and a reply ends at the end-of-text token, the template's
end-of-turn token, or (dialogue) where the model starts a new "Human:" turn. The Alpaca template
answers each message alone, as Alpaca was trained. /reset clears the history, /quit ends. Piped (stdin
not a terminal), each message is echoed after "> ", so that the transcript shows whose turn is whose.

With --prompt: sampling from the prompt, as nanoGPT's sample.py does: temperature, top-k, top-p
(nucleus), beam search, with or without the KV cache (--no-cache). The prompt is one message in the
template (then the reply alone is printed), or with none (GPT-2, our pretrained model) continued as it is.
A reply or sample never runs past the model's context: --max_new_tokens is capped at what the
prompt leaves (housekeeping.fit_to_context), and a note says so once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from bpe import load_tokenizer, pick_template, reply_stops
from model import GPT
from housekeeping import (DEVICE_HELP, auto_init_from, fit_to_context, fits_in_memory, flag, parse_config, pick_device,
                          pick_precision, resolve_init_from, run_main)
from prepare_data import TASK_QUESTIONS, format_dialogue, format_prompt

# The life cycle's models, latest stage first: --init_from auto takes the first one on this machine.
TUNED_MODELS = ("out-dpo/model", "out-rl/model", "out-finetune/best_model", "out-finetune/model")
PRETRAINED_MODELS = ("out/cpu/model", "out/cpu/ckpt/model")  # train_gpt2.py's final model; older runs: its checkpoint
STAGE_MODELS = TUNED_MODELS + PRETRAINED_MODELS

# --precision: the weights' dtype. The old --dtype spellings are still accepted.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OLD_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class ChatConfig:
    init_from: str = flag("auto", "gpt2|gpt2-medium|..., a HF hub id, a model directory (HF format or ours) or a "
                                 "run directory (its best or final model); auto: the last stage's model on this "
                                 "machine (out-dpo/model, out-rl/model, out-finetune/best_model, out/cpu/model), "
                                 "else GPT-2 if the hub or its cache has it")
    tokenizer: str | None = flag(None, "tokenizer spec (default: the model dir's own tokenizer, else GPT-2's)")
    template: str = flag("auto", "prompt format: chat (the model's own chat template, multi-turn), instruction "
                                 "(Alpaca), dialogue (HH-RLHF turns, multi-turn), none (plain continuation); auto: "
                                 "chat where the model ships a template, else instruction (--prompt: none). "
                                 "instruction, dialogue and none are the stages' --template ours",
                         choices=["auto", "chat", "instruction", "dialogue", "none"])
    prompt: str | None = flag(None, "answer (in --template's format) or continue (none) this text and exit, "
                                    "instead of chatting")
    show_prompt: bool = flag(False, "print the prompt as the model reads it (the template applied) before each reply")
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
    precision: str = flag("auto", "the weights' dtype: fp32, bf16, fp16, or auto (bf16 on a GPU with bf16 tensor "
                                  "cores, else fp32); --dtype is its old name (float32|bfloat16|float16 accepted)",
                          choices=["auto", *PRECISION_DTYPES, *OLD_DTYPE_NAMES], aliases=("--dtype",))


def weights_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype the weights are loaded in. Inference keeps no fp32 master copy: auto is bf16 where the GPU
    computes it natively, else fp32 (fp16 weights can overflow without the loss scaling training has)."""
    if precision == "auto":
        precision = "bf16" if pick_precision("auto", device) == "bf16" else "fp32"
    return PRECISION_DTYPES[precision]


def load(cfg: ChatConfig):
    """(model, tokenizer, device, chat template or None) of cfg.init_from; `auto` becomes the model it stands for,
    and --template auto the format it stands for."""
    device = pick_device(cfg.device)  # a bad --device is the error, before any search for a model
    if cfg.init_from == "auto":
        cfg.init_from = auto_init_from(STAGE_MODELS, run_first="python train_gpt2.py")
    cfg.init_from = resolve_init_from(cfg.init_from)  # a run directory: its best or final model
    model = GPT.from_pretrained(cfg.init_from, dtype=weights_dtype(cfg.precision, device), device=device).eval()
    if device == "cpu":
        model.decode_layout_()  # inference only: the faster weight layout for one-token steps (model.py)
    tok = load_tokenizer(cfg.tokenizer, cfg.init_from)
    chat_template = pick_template(cfg.template, tok, cfg.init_from)  # "chat" on a model without one: an error line
    if cfg.template == "auto" and chat_template is not None:
        cfg.template = "chat"
    elif cfg.template == "auto" and cfg.prompt is not None:  # GPT-2, our pretrained model: a text to continue
        cfg.template = "none"
    elif cfg.template == "auto":  # our fine-tuned models: Alpaca's template
        cfg.template = "instruction"
    return model, tok, device, chat_template


def build_prompt(cfg: ChatConfig, tok, chat_template, turns: list[tuple[str, str]]) -> tuple[list[int], str]:
    """(the prompt's tokens, its text) for the conversation so far, turns = [(role, text)] with role "user" or
    "assistant", ending with the user's message, in cfg.template's format (instruction and none: the message
    alone). chat renders role/content messages with the model's template and the assistant's header."""
    if cfg.template == "chat":
        messages = [{"role": role, "content": text} for role, text in turns]
        return chat_template.prompt_ids(messages), chat_template.render(messages, add_generation_prompt=True)
    if cfg.template == "dialogue":
        roles = {"user": "Human", "assistant": "Assistant"}
        prompt = format_dialogue([(roles[role], " " + text) for role, text in turns], add_assistant_prompt=True)
    elif cfg.template == "instruction":
        prompt = format_prompt({"instruction": turns[-1][1], "input": ""})
    else:
        prompt = turns[-1][1]
    return tok.encode(prompt), prompt


def sample(cfg: ChatConfig, out=None) -> list[str]:
    """--prompt: num_samples continuations of the prompt, printed and returned."""
    out = out or sys.stdout
    model, tok, device, chat_template = load(cfg)
    ids = build_prompt(cfg, tok, chat_template, [("user", cfg.prompt)])[0]
    ids = ids or [tok.eot_id]  # an empty prompt: start from the document boundary
    [ids], n_new = fit_to_context([ids], cfg.max_new_tokens, model.config.block_size)
    if cfg.show_prompt:  # what the model reads: after the cut to its context
        out.write(f"prompt ({cfg.template}, {len(ids)} tokens):\n{tok.decode(ids)}\n" + "-" * 60 + "\n")
    stops = reply_stops(tok, chat_template)  # a chat reply ends at its template's end-of-turn token too
    eos_token_id = stops if cfg.stop_at_eos else None
    seqs = model.generate(torch.tensor([ids] * cfg.num_samples, device=device), n_new,
                          temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                          num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, use_cache=cfg.cache,
                          seed=cfg.seed, eos_token_id=eos_token_id)
    texts = []
    shown = cfg.prompt if cfg.template == "none" else ""  # a continuation follows its prompt; a reply stands alone
    for row in seqs.tolist():
        new = row[len(ids):]
        if cfg.stop_at_eos:
            new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]  # the stop token not shown
        texts.append(shown + tok.decode(new))
        out.write(texts[-1] + "\n" + "-" * 60 + "\n")
    return texts


class _StopReply(Exception):
    """Raised from inside generate() when the model has finished its turn."""


class StreamedReply:
    """generate()'s stream callback for one reply: it collects the new tokens and writes the text as it
    grows. A token can be part of a character (BPE works on bytes), so the whole reply is decoded each
    time and only what is new is written. The reply ends at a stop token (the end-of-text token; in a
    chat template also its end-of-turn token), or where the model starts the user's next turn
    (`stop_text`, "\\n\\nHuman:" in our formats), which is then not shown."""

    def __init__(self, tok, stdout, stop_ids=None, stop_text="\n\nHuman:"):
        self.tok = tok
        self.stdout = stdout
        self.stop_ids = [tok.eot_id] if stop_ids is None else stop_ids
        self.stop_text = stop_text
        self.ids: list[int] = []
        self.shown = ""  # the text written so far

    def __call__(self, tokens):
        self.ids.append(int(tokens[0]))
        text = self.tok.decode([i for i in self.ids if i not in self.stop_ids])
        ended = self.ids[-1] in self.stop_ids
        if ended or (self.stop_text is not None and self.stop_text in text):
            raise _StopReply
        self.stdout.write(text[len(self.shown):])
        self.stdout.flush()
        self.shown = text


def chat(cfg: ChatConfig, stdin=None, stdout=None) -> list[str]:
    """Read messages line by line, stream the model's replies. Returns the prompts used."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    # piped input is not shown on the screen as typed input is: echo it, marked, so the turns read apart
    echo = not stdin.isatty()
    model, tok, device, chat_template = load(cfg)
    turns, prompts = [], []  # turns: [(role, text)], "user" or "assistant", the conversation so far
    what = "its chat template" if cfg.template == "chat" else f"{cfg.template} format"
    stdout.write(f"chatting with {cfg.init_from} ({what}); /reset clears the history, /quit ends\n")
    if cfg.init_from in TUNED_MODELS and cfg.template == "instruction":  # tuned on the built-in tasks
        examples = (TASK_QUESTIONS["module"].format(m="pickle", n="PickleError"),
                    TASK_QUESTIONS["kind"].format(m="enum", n="IntFlag"))
        stdout.write(f"(tuned on questions about the standard library's names; modules it never saw, e.g.: "
                     f"{' / '.join(examples)})\n")
    for n, line in enumerate(stdin):
        msg = line.strip()
        if echo and msg:
            stdout.write(f"> {msg}\n")
        if msg == "/quit":
            break
        if msg == "/reset":
            turns = []
            stdout.write("(history cleared)\n")
            continue
        if not msg:
            continue

        # the prompt: the conversation so far (chat, dialogue), the message in Alpaca's template, or as it is
        turns.append(("user", msg))
        ids, prompt = build_prompt(cfg, tok, chat_template, turns)
        prompts.append(prompt)
        [ids], n_new = fit_to_context([ids], cfg.max_new_tokens, model.config.block_size)
        if cfg.show_prompt:  # what the model reads: after the cut to its context
            stdout.write(f"prompt ({cfg.template}, {len(ids)} tokens):\n{tok.decode(ids)}\n")

        # the reply, streamed token by token until the model ends its turn
        if chat_template is None:
            reply = StreamedReply(tok, stdout)
        else:  # the template's end-of-turn token ends it; its turns are marked by special tokens, not by text
            reply = StreamedReply(tok, stdout, reply_stops(tok, chat_template), stop_text=None)
        stdout.write("Assistant:")
        try:
            model.generate(torch.tensor([ids], device=device), n_new, temperature=cfg.temperature,
                           top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + n, stream=reply,
                           use_cache=cfg.cache)
        except _StopReply:
            pass
        stdout.write("\n")
        if cfg.template in ("chat", "dialogue"):
            turns.append(("assistant", reply.shown.strip()))
        else:  # instruction, none: each message is answered alone
            turns = []
    return prompts


def parse_args(argv=None) -> ChatConfig:
    cfg = parse_config(ChatConfig, argv, __doc__.split("\n\n")[0].strip())[0]
    cfg.precision = OLD_DTYPE_NAMES.get(cfg.precision, cfg.precision)  # --dtype float32 -> fp32
    # the sequences generated at once (8 bytes a token id, at least): a size beyond the machine fails here
    fits_in_memory(8 * cfg.num_samples * cfg.num_beams * cfg.max_new_tokens,
                   f"--num_samples {cfg.num_samples} x --num_beams {cfg.num_beams} x --max_new_tokens "
                   f"{cfg.max_new_tokens}")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.prompt is not None:
        return sample(cfg)
    return chat(cfg)


if __name__ == "__main__":
    run_main(main)
