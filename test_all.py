"""
The test suite: `python -m pytest -q test_all.py` (what CI runs; see README).

Every test compares against a reference that could disagree: transformers' own models and
generate(), peft, tiktoken, a formula, or a straightforward re-implementation kept here. Tiny random
models are made by the tests with save_pretrained, so nothing is downloaded. Data the CEO provides
lives in ../shared/data/ beside the checkout; tests that need it skip with the reason when it is absent.

The sections follow the README's reading order: shared helpers and fixtures, then one section per
file (bpe.py, model.py, prepare_data.py, train_gpt2.py, hellaswag.py, lora.py, finetune.py, dpo.py,
score.py, chat.py, sweep.py, the benchmarks), then sections that cut across files, named by behaviour:
past one device (torchrun on gloo), GPU paths checked on a CPU, nothing lost (run directories, bad
input, one-line errors), the first hour (the README's commands as printed), the life cycle on a
laptop, and the layout rules (who may import whom, how much code a file may hold).
"""

import base64
import contextlib
import dataclasses
import functools
import http.server
import io
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

import bench_speed
import bpe
import chat
import dpo
import finetune
import hellaswag
import lora
import housekeeping
import model as model_py
import prepare_data
import rl
import score
import sweep
import train_gpt2
from bpe import Tokenizer, load_tokenizer
from lora import apply_lora, load_adapter, lora_state_dict, merge_lora, save_adapter, unmerge_lora
from model import GPT, GPTConfig, KVCache, filter_logits

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
if (SHARED / "gpt2.tiktoken").is_file():  # GPT-2's tokenizer offline, as the README says to fetch it once
    os.environ.setdefault("GPT2_TIKTOKEN", str(SHARED / "gpt2.tiktoken"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


# -----------------------------------------------------------------------------------------------
# shared helpers: tiny random models, tokenizers anyone can check by hand, a small corpus


def _randomize(model, std=0.3, seed=0):
    """HF inits small weights (logits nearly uniform); larger random weights make comparisons bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hf_gpt2(tmp_path, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=96, eos_token_id=96)
    cfg.update(kw)
    torch.manual_seed(0)
    model = _randomize(GPT2LMHeadModel(GPT2Config(**cfg)).eval())
    d = tmp_path / "hf_gpt2"
    model.save_pretrained(d)
    return model, d


def hf_llama(tmp_path, name="hf_llama", save_kw=None, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=97, max_position_embeddings=64, bos_token_id=None,
               eos_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    model = _randomize(LlamaForCausalLM(LlamaConfig(**cfg)).eval(), std=0.2)
    d = tmp_path / name
    model.save_pretrained(d, **(save_kw or {}))
    return model, d


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


IDX = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


def _lora_hf_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=96, eos_token_id=96)
    model = _randomize(GPT2LMHeadModel(cfg).eval())
    model.save_pretrained(tmp_path / "hf_gpt2")
    return model, tmp_path / "hf_gpt2"


def _lora_hf_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, bos_token_id=None,
                      eos_token_id=None)
    model = _randomize(LlamaForCausalLM(cfg).eval(), std=0.2)
    model.save_pretrained(tmp_path / "hf_llama")
    return model, tmp_path / "hf_llama"


def _lora_hf(kind, tmp_path):
    return _lora_hf_gpt2(tmp_path) if kind == "gpt2" else _lora_hf_llama(tmp_path)


def _lora_randomize_adapters(model, seed=1, std=0.2):
    """A trained-looking adapter: B != 0 (fresh ones are exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


_LORA_IDX = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, idx=_LORA_IDX):
    with torch.no_grad():
        return model(idx).logits


def _our_logits(model, idx=_LORA_IDX):
    with torch.no_grad():
        return model.eval()(idx)[0]


class _CharTok:
    """A tokenizer whose ids anyone can compute by hand: one id per character (ASCII)."""
    eot_id, n_vocab, name = 127, 128, "chars"

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != self.eot_id)


def _train_documents():
    """~150 KB of English-ish text that every Python carries: a few stdlib modules' sources, cut at
    blank-line pairs into documents."""
    import argparse
    import json as json_mod
    import textwrap
    import typing
    docs = []
    for mod in (argparse, textwrap, json_mod.decoder, typing):
        docs += [d for d in Path(mod.__file__).read_text().split("\n\n\n") if d.strip()]
    return docs


@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory):
    """(docs, tokenizer dir, data dir, bpe Tokenizer): shards with a 4096-token val split and
    20000-token train shards (several, so that reads cross shard boundaries)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _train_documents()
    tok = Tokenizer.train("\n".join(docs[:200]), 512, pattern="gpt4", special_tokens=["<|endoftext|>"])
    tok.save(root / "tok")
    prepare_data.write_shards(docs, root / "data", "tiny", str(root / "tok"), shard_tokens=20000, val_tokens=4096)
    return docs, root / "tok", root / "data", tok


TINY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--block_size", "64", "--seq_len", "64",
        "--batch_size", "4", "--total_batch_size", "512", "--max_lr", "3e-3", "--warmup_steps", "5",
        "--val_tokens", "2048", "--num_samples", "1", "--sample_len", "8", "--compile", "off", "--device", "cpu",
        "--hellaswag_file", ""]


def _train(data_dir, out_dir, *extra):
    train_gpt2.main(["--data_dir", str(data_dir), "--out_dir", str(out_dir), *TINY, *map(str, extra)])
    return _log(out_dir)


def _log(out_dir):
    recs = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return ([r for r in recs if r["type"] == "train"], [r for r in recs if r["type"] == "eval"])


HH_TEXT = ("\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And the word Human: here?"
           "\n\nAssistant: Quoting Human: is fine.\nHuman: still me, the assistant.")


class _HHCharTok:
    """One token per character: every label can be checked against the text by hand."""
    eot_id = 0

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(map(chr, ids))


def _tiny_reward_model(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] why is the sky blue a b c cat dog red it because light".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(d)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        num_labels=1, max_position_embeddings=64)).save_pretrained(d)
    return d


# -----------------------------------------------------------------------------------------------
# bpe.py


BPE_DATA = SHARED


BPE_SCRIPT = ROOT / "bpe.py"


BPE_SPECIALS = ["<|endoftext|>", "<|pad|>"]


BPE_ENGLISH = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. "My dear Mr. Bennet," said his lady to him one day, "have you
heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. I'm sure it's
true; they'd said we'll see, you've heard, they're 1,234 steps away in 2024... DON'T SHOUT.
"""


BPE_CHINESE = """分词是每一门从零开始的课程的第一章。学生在一本以中文为主的手册上训练一个字节级的
BPE 分词器，词表大小为 1024，然后检查编码再解码能否完整地重建文件。接着，他们比较自己的分词器和
GPT-2 的分词器在英文和中文文本上的词元数量，并解释其中的差别：GPT-2 的词表主要来自英文网页，
所以一个汉字常常要用两到三个词元来表示。"""


BPE_CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


for i in range(10):\r\n    print(f"{i:>3} {fib(i)}")  # 0 1 1 2 3 5 8 ...
\tx = {"a": [1, 2.5e-3, None], 'b': 0xFF}  \n
'''


BPE_EMOJI = "👋🏽 hello 🌍! 👨‍👩‍👧‍👦 family, 🇫🇷 flag, ❤️‍🔥, ✨✨✨ 🤖🤖 Ω≈ç√∫˜µ≤≥÷ «ça va?» naïve café ŝ"


BPE_SMALL_CORPUS = "\n\n".join([BPE_ENGLISH, BPE_CHINESE, BPE_CODE, BPE_EMOJI]) * 2


BPE_VARIED = [
    "Hello world", "", " ", "a", BPE_ENGLISH, BPE_CHINESE, BPE_CODE, BPE_EMOJI,
    " " * 3000, "x" + " " * 1000 + "y", "\n" * 300, "\t \n \r\n  \u3000 \xa0end  ",
    "1" * 3000, "3.14159265358979323846 and 1,000,000 and ９８７ and ٣٤٥",
    "SolidGoldMagikarp  davidjl TheNitromeFan ÃÂÃÂ", "I'll've it'S DON'T y'all 'tis",
    "<|endoftext|> is ordinary text here", "line1\nline2\n\n\nline3   \n   indented",
    "Привет, мир! Γειά σου Κόσμε! こんにちは世界 안녕하세요 مرحبا بالعالم שלום עולם",
    "\x00\x01\x1f\x7f\x85\u200b\u200d\ufeff\U0010ffff", "emoji🙂" * 50,
]


def _bpe_data_file(name):
    path = BPE_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared test data beside the checkout, see ../shared/data)")
    return path


def _bpe_tiktoken_gpt2(path):
    """GPT-2 as tiktoken's own `gpt2` constructor builds it, from the local rank file."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(path)),
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def _bpe_naive_train(text, vocab_size, pattern, specials=()):
    """The straightforward algorithm (as in minbpe): split into chunks, then for every merge count
    all pairs in all chunks from scratch, merge the most frequent (ties: smallest pair of ids)
    everywhere. Returns the merges [(left, right, new id)]."""
    pieces = regex.split("|".join(regex.escape(s) for s in specials), text) if specials else [text]
    chunks = [c for p in pieces for c in (regex.findall(pattern, p) if pattern else ([p] if p else []))]
    seqs = [list(c.encode("utf-8")) for c in chunks]
    merges = []
    while 256 + len(merges) < vocab_size - len(specials):
        stats = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                stats[pair] = stats.get(pair, 0) + 1
        if not stats:
            break
        a, b = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new = 256 + len(merges)
        merges.append((a, b, new))
        out = []
        for s in seqs:
            m, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    m.append(new)
                    i += 2
                else:
                    m.append(s[i])
                    i += 1
            out.append(m)
        seqs = out
    return merges


def _bpe_split_with_lowest_ranks(token, ranks, max_rank):
    """Reference for GPT-2's merges: the two parts BPE leaves when only lower ranks may be used."""
    parts = [bytes([b]) for b in token]
    while True:
        cands = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        r, i = min(cands)
        if r >= max_rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture(scope="module")
def bpe_gpt2_ref():
    return _bpe_tiktoken_gpt2(_bpe_data_file("gpt2.tiktoken"))


@pytest.fixture(scope="module")
def bpe_gpt2_ours():
    return Tokenizer.from_tiktoken_file(_bpe_data_file("gpt2.tiktoken"))


@pytest.fixture(scope="module")
def bpe_trained():
    """Small tokenizers trained on the built-in corpus, one per pattern, with special tokens."""
    return {p: Tokenizer.train(BPE_SMALL_CORPUS, 600, pattern=p, special_tokens=BPE_SPECIALS)
            for p in ("gpt2", "gpt4", None)}


@pytest.fixture(scope="module")
def bpe_gpt2_files(tmp_path_factory):
    """GPT-2's original files (encoder.json + vocab.bpe), written from the rank file by test code
    and checked with tiktoken's own reader of that format."""
    import tiktoken.load
    ranks_path = _bpe_data_file("gpt2.tiktoken")
    ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_path))
    # GPT-2's byte -> printable character table, as in its encoder.py (bytes_to_unicode)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = dict(zip(bs, map(chr, cs)))

    def spell(token):  # GPT-2's files spell each byte as a printable character
        return "".join(byte_to_char[b] for b in token)

    d = tmp_path_factory.mktemp("gpt2files")
    encoder = {spell(t): r for t, r in ranks.items()}
    encoder["<|endoftext|>"] = 50256
    (d / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"]
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if r >= 256:
            left, right = _bpe_split_with_lowest_ranks(t, ranks, r)
            lines.append(f"{spell(left)} {spell(right)}")
    (d / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_files = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    assert from_files == ranks
    return d


def test_bpe_patterns_are_tiktokens(monkeypatch):
    from tiktoken_ext import openai_public
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    assert bpe.GPT2_PATTERN == openai_public.r50k_pat_str
    assert bpe.GPT4_PATTERN == openai_public.cl100k_base()["pat_str"]


def test_bpe_gpt2_known_ids(bpe_gpt2_ours, bpe_gpt2_ref):
    assert bpe_gpt2_ref.encode("Hello world") == [15496, 995]  # from the data README
    assert bpe_gpt2_ours.encode("Hello world") == [15496, 995]
    assert bpe_gpt2_ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert bpe_gpt2_ours.vocab_size == 50257


def test_bpe_gpt2_exact_on_varied_corpus(bpe_gpt2_ours, bpe_gpt2_ref):
    for text in BPE_VARIED:
        assert bpe_gpt2_ours.encode(text, disallowed_special=()) == \
            bpe_gpt2_ref.encode(text, disallowed_special=()), text[:60]
    english = _bpe_data_file("english_pd.txt").read_text(encoding="utf-8")
    ids = bpe_gpt2_ours.encode(english)  # the whole 8.3 MB, pure Python (cached per chunk)
    assert ids == bpe_gpt2_ref.encode_ordinary(english)
    assert bpe_gpt2_ours.decode(ids) == english


def test_bpe_gpt2_exact_on_random_text(bpe_gpt2_ours, bpe_gpt2_ref):
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.text() | st.binary().map(lambda b: b.decode("latin-1")))
    def check(s):
        assert bpe_gpt2_ours.encode(s, disallowed_special=()) == bpe_gpt2_ref.encode(s, disallowed_special=())
    check()


def test_bpe_gpt2_from_original_files(bpe_gpt2_files, bpe_gpt2_ref):
    tok = Tokenizer.from_gpt2_files(bpe_gpt2_files / "encoder.json", bpe_gpt2_files / "vocab.bpe")
    for text in BPE_VARIED:
        assert tok.encode(text, allowed_special="all") == bpe_gpt2_ref.encode(text, allowed_special="all")
    assert tok.to_tiktoken().encode(BPE_CODE) == bpe_gpt2_ref.encode(BPE_CODE)


def test_bpe_gpt2_files_corrupted(bpe_gpt2_files, tmp_path):
    merges = (bpe_gpt2_files / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    swapped = merges[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]  # merges out of rank order
    (tmp_path / "vocab.bpe").write_text("\n".join(swapped), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 3: merge .* should make token id 257"):
        Tokenizer.from_gpt2_files(bpe_gpt2_files / "encoder.json", tmp_path / "vocab.bpe")
    (tmp_path / "bad.bpe").write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.bpe, line 3: expected two tokens"):
        Tokenizer.from_gpt2_files(bpe_gpt2_files / "encoder.json", tmp_path / "bad.bpe")
    (tmp_path / "encoder.json").write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json: not valid JSON"):
        Tokenizer.from_gpt2_files(tmp_path / "encoder.json", bpe_gpt2_files / "vocab.bpe")


def test_bpe_gpt2_saved_readable_and_reloaded(bpe_gpt2_ours, bpe_gpt2_ref, tmp_path):
    bpe_gpt2_ours.save(tmp_path / "gpt2.bpe")  # needs the merges recovered from the ranks
    tok = Tokenizer.load(tmp_path / "gpt2.bpe")
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    for text in BPE_VARIED:
        assert tok.encode(text, allowed_special="all") == bpe_gpt2_ref.encode(text, allowed_special="all")
    lines = (tmp_path / "gpt2.bpe").read_text(encoding="utf-8").split("\n")
    assert '256 merge 220 83 " t"' in lines  # GPT-2's first merge, "Ġ t", printable


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_bpe_train_matches_naive_reference(pattern):
    text = BPE_SMALL_CORPUS + "<|endoftext|>" + BPE_ENGLISH.upper() + "<|pad|>" + BPE_CHINESE[::-1]
    tok = Tokenizer.train(text, 256 + 300 + 2, pattern=pattern, special_tokens=BPE_SPECIALS)
    ref = _bpe_naive_train(text, 256 + 300 + 2, bpe.PATTERNS[pattern] if pattern else None, BPE_SPECIALS)
    assert tok.merges == ref
    assert tok.special_tokens == {"<|endoftext|>": 556, "<|pad|>": 557}
    assert [tok.vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]


def test_bpe_train_matches_naive_on_real_text():
    english = _bpe_data_file("english_pd.txt").read_text(encoding="utf-8")[:12_000]
    tok = Tokenizer.train(english, 256 + 250, pattern="gpt4")
    assert tok.merges == _bpe_naive_train(english, 256 + 250, bpe.GPT4_PATTERN)


def test_bpe_train_matches_naive_on_random_texts():
    """Tiny alphabets give many ties, overlapping pairs ("aaaa") and tokens spelled two ways."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=80, deadline=None)
    @given(st.text(alphabet="aab b\n1中é", max_size=120), st.integers(257, 300),
           st.sampled_from(["gpt2", "gpt4", None]))
    def check(text, vocab_size, pattern):
        tok = Tokenizer.train(text, vocab_size, pattern=pattern)
        assert tok.merges == _bpe_naive_train(text, vocab_size, bpe.PATTERNS[pattern] if pattern else None)
        assert tok.decode(tok.encode(text)) == text
    check()


BPE_TRICKY = ("aaaa aaa aa a aaaaaaa bbbb abab ab ba baba aaabdaaabac abcabcabc\n\n\n   \t\t x  xx  xxx "
              "1111 11 111111 1,1.1 é é éé ééé 中中中 中 👍👍 'll'll '' \r\n\r\n zzzz") * 3


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_bpe_naive_and_fast_give_the_same_merges_and_ids(pattern):
    """bpe.py's two algorithms: train_naive (recount everything each merge) and the fast trainer give the
    same merges, ties included; encode_naive and the fast encoders give the same ids."""
    english = _bpe_data_file("english_pd.txt").read_text(encoding="utf-8")
    for text, n_tokens in [(english[:4000], 256 + 200), (BPE_TRICKY, 256 + 120), (BPE_TRICKY, 1000)]:
        vocab, merges = bpe.train_naive(text, n_tokens, pattern)
        tok = Tokenizer.train(text, n_tokens, pattern=pattern)  # runs out of pairs at 1000: both stop there
        assert tok.merges == merges and [tok.vocab[i] for i in range(len(vocab))] == vocab
        assert (vocab, merges) == bpe.learn_merges(bpe.count_chunks(text, pattern), n_tokens)
        ranks = {t: i for i, t in enumerate(vocab)}
        for sample in (text, english[4000:6000], BPE_TRICKY[::-1], BPE_CODE, BPE_EMOJI):
            ids = bpe.encode_naive(sample, ranks, pattern)
            assert ids == tok.encode_ordinary(sample) == tok.to_tiktoken().encode_ordinary(sample)
            assert tok.decode(ids) == sample


def test_bpe_naive_worked_example():
    """The worked example in bpe.py's section 2, as written there."""
    vocab, merges = bpe.train_naive("low lower lowest", 262)
    assert merges == [(108, 111, 256), (256, 119, 257), (32, 257, 258), (258, 101, 259), (115, 116, 260),
                      (259, 114, 261)]
    assert vocab[256:] == [b"lo", b"low", b" low", b" lowe", b"st", b" lower"]
    ranks = {t: i for i, t in enumerate(vocab)}
    assert bpe.encode_chunk_naive(b" lowest", ranks) == [b" lowe", b"st"] == bpe.bpe_merge(b" lowest", ranks)
    assert bpe.encode_naive(" lowest", ranks) == [259, 260]
    assert bpe.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]


def test_bpe_naive_encoder_matches_tiktoken_gpt2(bpe_gpt2_ref):
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(str(_bpe_data_file("gpt2.tiktoken")))
    english = _bpe_data_file("english_pd.txt").read_text(encoding="utf-8")
    sample = english[10_000:14_000] + BPE_CODE + BPE_EMOJI + BPE_CHINESE + BPE_TRICKY
    assert bpe.encode_naive(sample, ranks, "gpt2") == bpe_gpt2_ref.encode_ordinary(sample)
    assert bpe.encode_naive("Hello world", ranks, "gpt2") == [15496, 995]


def test_bpe_train_streams_files_like_one_text(tmp_path, monkeypatch):
    """Training files are read in blocks cut at safe places; the chunks (and so the merges) must be
    those of the whole text, split by the plain regex."""
    path = BPE_DATA / "english_pd.txt"
    english = path.read_text(encoding="utf-8")[:150_000] if path.is_file() else BPE_ENGLISH * 300
    tricky = ("word\r\nword \r\n\r\nx  \n  y\n\nz.\nA 12\n34 " + BPE_CHINESE + BPE_CODE + BPE_EMOJI +
              "a<|endoftext|>b\n<|endoftext|>\n c") * 30
    text = english + tricky + english.replace("\n", "\r\n")[:50_000]
    path = tmp_path / "train.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(bpe, "BLOCK_SIZE", 997)
    for pattern in ("gpt2", "gpt4"):
        pat = bpe.PATTERNS[pattern]
        blocks = list(bpe._read_blocks(path, pat, ["<|endoftext|>"]))
        assert len(blocks) > 100 and "".join(blocks) == text
        expected = Counter(c for piece in text.split("<|endoftext|>") for c in regex.findall(pat, piece))
        assert bpe.count_chunks([path], pattern, ["<|endoftext|>"]) == expected
    tok_file = Tokenizer.train([path], 800, pattern="gpt4", special_tokens=["<|endoftext|>"])
    tok_text = Tokenizer.train(text, 800, pattern="gpt4", special_tokens=["<|endoftext|>"])
    assert tok_file.merges == tok_text.merges


def test_bpe_train_runs_out_of_pairs():
    tok = Tokenizer.train("ab ab", 1000, pattern="gpt2", special_tokens=["<|endoftext|>"])
    assert [tok.vocab[i] for i in range(256, tok.vocab_size)] == [b"ab", b" ab", b"<|endoftext|>"]
    assert tok.to_tiktoken().encode("ab ab<|endoftext|>", allowed_special="all") == [256, 257, 258]


def test_bpe_train_bad_input(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train([tmp_path / "nope.txt"], 300)
    with pytest.raises(ValueError, match="vocab_size=255 is too small"):
        Tokenizer.train("hello", 255)
    with pytest.raises(ValueError, match=r"at least 256 .* \+ 2 \(the special tokens\)"):
        Tokenizer.train("hello", 257, special_tokens=BPE_SPECIALS)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("ok line\n" * 500 + "café\n").encode("utf-8") + "crème\n".encode("latin-1"))
    monkeypatch.setattr(bpe, "BLOCK_SIZE", 1000)  # the bad byte is in a later block
    with pytest.raises(ValueError, match=r"latin1\.txt, line 502 \(byte 4008\): not valid UTF-8"):
        Tokenizer.train([bad], 300)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.train("hello", 300, pattern="gpt5")


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_bpe_roundtrip_and_export_on_random_strings(bpe_trained, pattern):
    from hypothesis import given, settings, strategies as st
    tok = bpe_trained[pattern]
    enc = tok.to_tiktoken()
    pieces = st.text() | st.binary().map(lambda b: b.decode("latin-1")) | st.sampled_from(BPE_SPECIALS)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(pieces, max_size=5).map("".join))
    def check(s):
        ids = tok.encode(s, allowed_special="all")
        assert tok.decode(ids) == s
        assert ids == enc.encode(s, allowed_special="all")
        plain = tok.encode(s, disallowed_special=())
        assert tok.decode(plain) == s and plain == enc.encode(s, disallowed_special=())
    check()


def test_bpe_python_encoder_matches_export_on_big_corpus(tmp_path):
    """Trained on 8.3 MB of English plus a Chinese file; then the whole English file and mixed
    text encoded by the pure-Python path and by the tiktoken export."""
    english_path = _bpe_data_file("english_pd.txt")
    chinese_path = tmp_path / "chinese.txt"
    chinese_path.write_text(BPE_CHINESE * 20, encoding="utf-8")
    tok = Tokenizer.train([english_path, chinese_path], 2048, pattern="gpt4",
                          special_tokens=["<|endoftext|>"])
    enc = tok.to_tiktoken()
    english = english_path.read_text(encoding="utf-8")
    assert tok.encode(english) == enc.encode(english)
    mixed = "<|endoftext|>".join(BPE_VARIED) * 3
    assert tok.encode(mixed, allowed_special="all") == enc.encode(mixed, allowed_special="all")
    assert tok.decode(tok.encode(mixed, allowed_special="all")) == mixed
    assert tok.encode_batch(BPE_VARIED, disallowed_special=()) == \
        [tok.encode(t, disallowed_special=()) for t in BPE_VARIED]


def test_bpe_special_tokens_like_tiktoken(bpe_gpt2_ours, bpe_gpt2_ref, bpe_trained):
    text = "hi <|endoftext|> there<|endoftext|>"
    for ours, ref in [(bpe_gpt2_ours, bpe_gpt2_ref), (bpe_trained["gpt4"], bpe_trained["gpt4"].to_tiktoken())]:
        with pytest.raises(ValueError, match="disallowed"):
            ref.encode(text)
        with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at character 3"):
            ours.encode(text)
        for kw in [dict(allowed_special="all"), dict(allowed_special={"<|endoftext|>"}),
                   dict(disallowed_special=())]:
            assert ours.encode(text, **kw) == ref.encode(text, **kw), kw
    tok = bpe_trained["gpt4"]
    pad = tok.special_tokens["<|pad|>"]
    ids = tok.encode("a<|pad|>b<|endoftext|>", allowed_special={"<|pad|>"}, disallowed_special=())
    assert ids.count(pad) == 1 and tok.special_tokens["<|endoftext|>"] not in ids
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_bpe_decode_any_ids(bpe_gpt2_ours, bpe_gpt2_ref):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(50257) for _ in range(rng.randrange(20))]
        assert bpe_gpt2_ours.decode(ids) == bpe_gpt2_ref.decode(ids)
    ids = bpe_gpt2_ours.encode("龘")  # one character, two tokens
    assert len(ids) == 2 and bpe_gpt2_ours.decode(ids[:1]) == "\ufffd"
    assert bpe_gpt2_ours.decode_bytes(ids) == "龘".encode()
    with pytest.raises(ValueError, match="token id 50257 is not in"):
        bpe_gpt2_ours.decode([1, 50257])
    with pytest.raises(ValueError, match="token id -1 is not in"):
        bpe_gpt2_ours.decode([-1])


def test_bpe_surrogates_like_tiktoken(bpe_gpt2_ours, bpe_gpt2_ref):
    for s in ["a\ud800b", "\ud83d\ude00 pair", "x\udfff"]:
        assert bpe_gpt2_ours.encode(s) == bpe_gpt2_ref.encode(s)


def test_bpe_save_load_both_formats(bpe_trained, tmp_path):
    import tiktoken.load
    for pattern, tok in bpe_trained.items():
        d = tmp_path / str(pattern)
        d.mkdir()
        tok.save(d)
        again = Tokenizer.load(d)
        assert again.pattern == tok.pattern and again.special_tokens == tok.special_tokens
        assert again.ranks == tok.ranks
        assert tiktoken.load.load_tiktoken_bpe(str(d / "tokenizer.tiktoken")) == tok.ranks
        ranked = Tokenizer.from_tiktoken_file(d / "tokenizer.tiktoken", pattern=pattern,
                                              special_tokens=tok.special_tokens)
        for text in BPE_VARIED:
            want = tok.to_tiktoken().encode(text, allowed_special="all")
            assert again.encode(text, allowed_special="all") == want
            assert ranked.encode(text, allowed_special="all") == want
    lines = (tmp_path / "gpt4" / "tokenizer.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "bpe.py tokenizer v1" and '32 byte 32 " "' in lines
    assert any(line.startswith("256 merge ") for line in lines)
    assert '598 special "<|endoftext|>"' in lines and '599 special "<|pad|>"' in lines
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def _bpe_corrupt(lines, kind):
    lines = lines[:]
    i = next(k for k, line in enumerate(lines) if line.startswith("300 merge "))
    if kind == "token text":
        lines[i] = lines[i].rsplit(" ", 1)[0] + ' "zz"'
    elif kind == "forward reference":
        lines[i] = "300 merge 301 " + lines[i].split(" ", 3)[3]
    elif kind == "missing line":
        del lines[i]
    elif kind == "garbage":
        lines[i] = "300 merge x"
    elif kind == "header":
        lines[0] = "something else"
    return "\n".join(lines)


@pytest.mark.parametrize("kind,message", [
    ("token text", r"line 306: the token text \"zz\" does not match"),
    ("forward reference", r"line 306: merge 301 .* only be built from earlier ids"),
    ("missing line", r"line 306: expected token id 300 .* got 301"),
    ("garbage", r"line 306: expected '300 merge <left id> <right id>"),
    ("header", r"line 1: expected the header"),
])
def test_bpe_load_rejects_corrupted_readable_file(bpe_trained, tmp_path, kind, message):
    bpe_trained["gpt4"].save(tmp_path / "tok.bpe")
    lines = (tmp_path / "tok.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[305].startswith("300 merge ")  # 5 header lines, then ids 0, 1, ...
    (tmp_path / "bad.bpe").write_text(_bpe_corrupt(lines, kind), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.bpe, " + message):
        Tokenizer.load(tmp_path / "bad.bpe")


def test_bpe_load_rejects_bad_files(bpe_trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bpe"):
        Tokenizer.load(tmp_path / "missing.bpe")
    (tmp_path / "bin.bpe").write_bytes(b"bpe.py tokenizer v1\n\xff\xfe")
    with pytest.raises(ValueError, match=r"bin\.bpe, line 2: not valid UTF-8"):
        Tokenizer.load(tmp_path / "bin.bpe")
    good = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    ab = f"{base64.b64encode(b'ab').decode()} 0"
    for lines, message in [(good[:10] + ["!!notbase64 10"] + good[11:], r"line 11: expected '<base64 token> <rank>'"),
                           (good + [good[5].split()[0] + " 256"], r"line 257: token .* appears twice"),
                           (good[:100] + good[101:], r"ranks\) must be 0, 1, \.\.\., n-1"),
                           ([ab] + good[1:], r"single bytes are missing")]:
        (tmp_path / "bad.tiktoken").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"bad\.tiktoken.*" + message):
            Tokenizer.from_tiktoken_file(tmp_path / "bad.tiktoken", special_tokens={})


def _bpe_cli(*args, cwd):
    return subprocess.run([sys.executable, str(BPE_SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_bpe_cli(tmp_path):
    (tmp_path / "en.txt").write_text(BPE_ENGLISH * 5, encoding="utf-8")
    (tmp_path / "zh.txt").write_text(BPE_CHINESE * 5, encoding="utf-8")
    r = _bpe_cli("train", "--input", "en.txt", "zh.txt", "--vocab_size", 400, "--out_dir", "tok",
                 "--pattern", "gpt2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.bpe").is_file()
    assert (tmp_path / "tok" / "tokenizer.tiktoken").is_file()
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 400 and tok.special_tokens == {"<|endoftext|>": 399}

    text = "Mr. Bennet 分词器 <|endoftext|>"
    r = _bpe_cli("encode", "--tokenizer", "tok", "--text", text, "--allow_special", cwd=tmp_path)
    ids = [int(x) for x in r.stdout.split()]
    assert r.returncode == 0 and ids == tok.to_tiktoken().encode(text, allowed_special="all")
    r = _bpe_cli("decode", "--tokenizer", "tok", "--ids", " ".join(map(str, ids)), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == text + "\n"
    r = _bpe_cli("show", "--tokenizer", "tok", "--text", "Mr. Bennet said", cwd=tmp_path)
    pieces = [tok.decode([i]) for i in tok.encode("Mr. Bennet said")]
    assert r.returncode == 0 and r.stdout.rstrip("\n") == "|".join(pieces) and "tokens" in r.stderr
    if (BPE_DATA / "gpt2.tiktoken").is_file():
        r = subprocess.run([sys.executable, str(ROOT / "bench_speed.py"), "tokens", "--tokenizer", "tok", "--files",
                            "en.txt", "zh.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        gpt2 = _bpe_tiktoken_gpt2(BPE_DATA / "gpt2.tiktoken")
        zh_row = next(line for line in r.stdout.split("\n") if line.startswith("zh.txt"))
        assert f"{len(gpt2.encode(BPE_CHINESE * 5)):,}" in zh_row.split()
        assert f"{len(tok.encode(BPE_CHINESE * 5)):,}" in zh_row.split()
        assert "first 10 learned tokens" in r.stdout and "last 10 learned tokens" in r.stdout

    r = _bpe_cli("train", "--input", "en.txt", "--vocab_size", 300, "--out", "t3", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "t3" / "tokenizer.bpe").is_file(), r.stderr  # the old --out
    for args, message in [(["train", "--input", "nope.txt", "--vocab_size", 300, "--out_dir", "t2"], "nope.txt"),
                          (["train", "--input", "en.txt", "--vocab_size", 100, "--out_dir", "t2"], "too small"),
                          (["train", "--input", "en.txt", "--vocab_size", 300, "--out_dir", "en.txt"],
                           "--out_dir en.txt: exists and is not a directory"),
                          (["encode", "--tokenizer", "en.txt", "--text", "x"], "en.txt, line 1: expected"),
                          (["decode", "--tokenizer", "tok", "--ids", "1 two"], "expected token ids")]:
        r = _bpe_cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the benchmark lives in bench_speed.py
    r = subprocess.run([sys.executable, str(ROOT / "bench_speed.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--vocab_sizes" in r.stdout and "--naive_merges" in r.stdout


def test_bpe_cli_invalid_utf8_is_one_error_line(tmp_path):
    """`show` (and `encode`) of text that is not UTF-8: one `error:` line naming where, nothing printed before."""
    Tokenizer.train(BPE_ENGLISH, 300).save(tmp_path / "tok")
    (tmp_path / "bad.txt").write_bytes(b"fine\nhello \xff world\n")
    for command, how, stdin, message in [
            ("show", ["--input", "bad.txt"], None, "bad.txt, line 2: not valid UTF-8"),
            ("show", [], b"fine\nhello \xff world\n", "standard input, line 2: not valid UTF-8"),
            ("show", ["--text", "ok\nab\udcffc"], None, "--text, line 2: not valid UTF-8"),  # argv bytes, not UTF-8
            ("encode", [], b"\xff", "standard input, line 1: not valid UTF-8")]:
        r = subprocess.run([sys.executable, str(BPE_SCRIPT), command, "--tokenizer", "tok", *how], cwd=tmp_path,
                           input=stdin, capture_output=True, timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"", (command, how, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (command, how, err)


def test_bpe_load_bpe_gpt2_looks_beside_the_checkout(monkeypatch, tmp_path):
    """'gpt2': $GPT2_TIKTOKEN if set, else data/gpt2.tiktoken, then ../shared/data/gpt2.tiktoken; else tiktoken's
    own (here a stand-in, as there is no network), converted through its public interface."""
    import tiktoken
    monkeypatch.delenv("GPT2_TIKTOKEN", raising=False)
    assert bpe.gpt2_rank_files() == [ROOT / "data" / "gpt2.tiktoken", SHARED / "gpt2.tiktoken"]
    rank_file = _bpe_data_file("gpt2.tiktoken")
    if not (ROOT / "data" / "gpt2.tiktoken").is_file():  # then it is found beside the checkout
        assert bpe.load_bpe("gpt2").encode("Hello world") == [15496, 995]
    monkeypatch.setenv("GPT2_TIKTOKEN", str(tmp_path / "absent.tiktoken"))
    assert bpe.gpt2_rank_files() == [tmp_path / "absent.tiktoken"]
    ref = _bpe_tiktoken_gpt2(rank_file)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: ref)
    tok = bpe.load_bpe("gpt2")
    assert tok.ranks == Tokenizer.from_tiktoken_file(rank_file).ranks and tok.special_tokens == {"<|endoftext|>": 50256}

    def offline(name):
        raise OSError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match="absent.tiktoken.*could not download"):
        bpe.load_bpe("gpt2")


def test_bpe_import_has_no_side_effects():
    r = subprocess.run([sys.executable, "-c", "import bpe"], cwd=BPE_SCRIPT.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_bpe_load_tokenizer_kinds(tmp_path):
    tok = Tokenizer.train(BPE_SMALL_CORPUS, 300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "m" / "tokenizer")
    t = load_tokenizer(None, str(tmp_path / "m"))  # a checkpoint dir's own tokenizer/ folder
    text = "hello tokens<|endoftext|>world"
    # text is ordinary text: a "<|endoftext|>" written in it stays characters, never the control token
    assert t.encode(text) == tok.encode(text, disallowed_special=()) and t.eot_id not in t.encode(text)
    assert t.encode_batch([text, "hello"]) == [t.encode(text), t.encode("hello")]
    assert t.eot_id == tok.special_tokens["<|endoftext|>"] and t.n_vocab == 300
    assert t.decode(t.encode(text)) == text
    rank_file = SHARED / "gpt2.tiktoken"
    if not rank_file.exists():
        pytest.skip(f"{rank_file} absent: GPT-2 part of the tokenizer test skipped")
    g = load_tokenizer(str(rank_file))
    assert g.encode("Hello world") == [15496, 995] and g.eot_id == 50256 and 50256 not in g.encode("<|endoftext|>")


BACKTRACKING = [r"(a+)+$", r"(x+)+$", r"(y|yy)+$", r"(\d+)*$", r"([a-z]+)*\d", r"(\s*)*$",
                r"(b|bb)*$", r"((z)+)+!$", r"(\p{L}+)+$", r"(\w|\p{L})*\d"]


@pytest.mark.parametrize("pattern", BACKTRACKING)
def test_bpe_a_backtracking_regex_is_refused_whatever_its_characters(pattern):
    """Why: the check probed one string shape: `(a+)+$` was refused, `(x+)+$` and `(y|yy)+$` got through
    and the tokenizer panicked. Each regex is now probed with runs of its own literal characters (and a
    few kinds of character), then a character that fails the match, under a time bound."""
    with pytest.raises(ValueError, match=r"tokenizer\.json: the regex .* backtracks"):
        bpe.check_backtracking(pattern, "tok/tokenizer.json")


def test_bpe_the_regexes_of_real_tokenizers_pass_the_backtracking_probe():
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's and Qwen2's pre-tokenizer
    for pattern in (bpe.PATTERNS["gpt2"], bpe.PATTERNS["gpt4"], llama3):
        bpe.check_backtracking(pattern, "tokenizer.json")


# -----------------------------------------------------------------------------------------------
# model.py


LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "untied_rope_theta": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0),
}


def test_model_gpt2_logits_match_transformers(tmp_path):
    hf, d = hf_gpt2(tmp_path)
    ours = GPT.from_pretrained(str(d))
    with torch.no_grad():
        ref = hf(IDX).logits
        logits, _ = ours(IDX)
    assert logits.shape == ref.shape == (2, 24, 97)
    assert ref.std() > 0.2  # a meaningful comparison, not two near-constant outputs
    assert max_diff(logits, ref) <= 1e-4


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_model_llama_logits_match_transformers(tmp_path, case):
    hf, d = hf_llama(tmp_path, **LLAMA_CASES[case])
    ours = GPT.from_pretrained(str(d))
    c = ours.config
    assert c.n_kv_head == LLAMA_CASES[case]["num_key_value_heads"]
    assert c.tie_embeddings == LLAMA_CASES[case].get("tie_word_embeddings", False)
    assert c.rope_theta == LLAMA_CASES[case].get("rope_theta", 10000.0)
    with torch.no_grad():
        ref = hf(IDX).logits
        logits, _ = ours(IDX)
    assert ref.std() > 0.2
    assert max_diff(logits, ref) <= 1e-4


def test_model_sharded_safetensors_and_bin_load(tmp_path):
    hf, d = hf_llama(tmp_path, "sharded", save_kw=dict(max_shard_size="20KB"), num_key_value_heads=2)
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("*.safetensors"))) > 1
    ours = GPT.from_pretrained(str(d))
    with torch.no_grad():
        assert max_diff(ours(IDX)[0], hf(IDX).logits) <= 1e-4
    # pytorch_model.bin, read with weights_only=True; OpenAI-style names without "transformer."
    hf2, d2 = hf_gpt2(tmp_path)
    (d2 / "model.safetensors").unlink()
    sd = {k.removeprefix("transformer."): v for k, v in hf2.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # old HF causal-mask buffer: must be ignored
    torch.save(sd, d2 / "pytorch_model.bin")
    ours2 = GPT.from_pretrained(str(d2))
    with torch.no_grad():
        assert max_diff(ours2(IDX)[0], hf2(IDX).logits) <= 1e-4


def test_model_from_pretrained_dtype_and_meta_free(tmp_path):
    _, d = hf_llama(tmp_path, num_key_value_heads=2)
    m = GPT.from_pretrained(str(d), dtype=torch.bfloat16)
    tensors = list(m.parameters()) + list(m.buffers())
    assert all(t.device.type == "cpu" for t in tensors)  # nothing left on the meta device
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    m(IDX)  # runs


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-gpt2", dict(vocab_size=97, vocab_pad_multiple=64)),  # padded rows are cut off on export
    ("tiny-gpt2", dict(vocab_size=97, bias=False, tie_embeddings=False)),  # zero biases for HF
    ("tiny-llama", dict(vocab_size=97)),
    ("tiny-llama", dict(vocab_size=97, tie_embeddings=True, rope_theta=1e5, n_kv_head=1)),
])
def test_model_save_pretrained_loads_in_transformers(tmp_path, preset, overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset(preset, **overrides)).eval()
    _randomize(ours, std=0.2)
    ours.save_pretrained(tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ref = hf(IDX).logits
        logits, _ = ours(IDX)
    assert ref.shape == logits.shape == (2, 24, 97)
    assert max_diff(logits, ref) <= 1e-4
    back = GPT.from_pretrained(str(tmp_path / "out"))  # and back into ours
    with torch.no_grad():
        assert max_diff(back(IDX)[0], logits) <= 1e-5


# today's families on LLaMA's block, each from a tiny random checkpoint made by transformers' own config class:
# Llama 3.2 (llama3 RoPE scaling over an original context of 16, tied), Qwen2.5 (q/k/v biases), Qwen3 (learned
# QK-norm, head_dim 16 != 32/4), Mistral (a sliding window of 8). IDX has 24 positions: beyond both.
FAMILIES = {
    "llama3": ("LlamaConfig", "llama", dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2.5": ("Qwen2Config", "qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "mistral", dict(sliding_window=8, tie_word_embeddings=False)),
}
# the switch each family adds, and what it is without it (the test then shows that the switch matters)
FAMILY_SWITCH = {"llama3": ("rope_scaling", None), "qwen2.5": ("qkv_bias", False),
                 "qwen3": ("qk_norm_learned", False), "mistral": ("sliding_window", None)}


def hf_family(tmp_path, family):
    import transformers

    config_class, _, kw = FAMILIES[family]
    cfg = getattr(transformers, config_class)(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(cfg).eval(), std=0.2)
    d = tmp_path / f"hf_{family}"
    model.save_pretrained(d)
    return model, d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families_logits_match_transformers_beyond_the_original_context(tmp_path, family):
    hf, d = hf_family(tmp_path, family)
    ours = GPT.from_pretrained(str(d))
    switch, off = FAMILY_SWITCH[family]
    assert getattr(ours.config, switch) not in (None, False)
    assert ours.config.tie_embeddings == FAMILIES[family][2]["tie_word_embeddings"]
    with torch.no_grad():
        ref = hf(IDX).logits
        logits, _ = ours(IDX)
    assert ref.std() > 0.15
    assert max_diff(logits, ref) <= 1e-4
    # the switch matters: the same weights without it compute something else
    state = ours.state_dict()
    plain = GPT(dataclasses.replace(ours.config, **{switch: off})).eval()
    plain.load_state_dict({k: v for k, v in state.items() if ".q_norm." not in k and ".k_norm." not in k
                           and not (family == "qwen2.5" and k.endswith("c_attn.bias"))})
    with torch.no_grad():
        assert max_diff(plain(IDX)[0], ref) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families_greedy_tokens_match_hf_generate_with_the_kv_cache(tmp_path, family):
    hf, d = hf_family(tmp_path, family)
    hf.generation_config.eos_token_id = None
    ours = GPT.from_pretrained(str(d))
    prompt = IDX[:, :6]
    ref = _hf_generate(hf, prompt, max_new_tokens=20)  # 26 positions: past the window and the original context
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref)
    assert torch.equal(ours.generate(prompt, 20, temperature=0, use_cache=False), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_families_save_pretrained_loads_in_transformers_as_the_family(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf, d = hf_family(tmp_path, family)
    ours = GPT.from_pretrained(str(d))
    ours.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == FAMILIES[family][1]
    assert written["architectures"] == [type(hf).__name__]
    if ours.config.rope_scaling:  # under transformers 4.x's key as well as 5's: 4.x reads only rope_scaling
        assert written["rope_scaling"] == ours.config.rope_scaling
        assert written["rope_parameters"]["rope_type"] == ours.config.rope_scaling["rope_type"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    ours.save_pretrained(tmp_path / "native", format="native")  # and our own format keeps every switch
    native = GPT.from_pretrained(str(tmp_path / "native"))
    assert native.config == ours.config
    with torch.no_grad():
        assert max_diff(back(IDX).logits, hf(IDX).logits) <= 1e-4
        assert max_diff(back(IDX).logits, ours(IDX)[0]) <= 1e-4
        assert torch.equal(native(IDX)[0], ours(IDX)[0])


def test_model_families_presets_and_refusals(tmp_path):
    """The presets have their published sizes; what is not implemented is one line naming it."""
    with torch.device("meta"):
        for name, billions in (("llama3.2-1b", 1.236), ("llama3.1-8b", 8.030), ("qwen2.5-0.5b", 0.494),
                               ("qwen2.5-7b", 7.616), ("qwen3-0.6b", 0.596), ("mistral-7b", 7.248)):
            assert abs(GPT(GPTConfig.preset(name)).get_num_params() / 1e9 - billions) < 0.002, name
    _, d = hf_family(tmp_path, "qwen2.5")
    cfg = json.loads((d / "config.json").read_text())
    for change, message in ((dict(use_sliding_window=True), "unsupported qwen2 option.*use_sliding_window"),
                            (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)),
                             "unsupported qwen2 option.*rope type 'yarn'"),
                            (dict(rope_parameters=dict(rope_type="llama3", factor=4.0, rope_theta=1e4)),
                             "rope type 'llama3' without low_freq_factor"),
                            (dict(model_type="gemma3"), "model_type='gemma3' is not supported")):
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message) as e:
            GPT.from_pretrained(str(d))
        assert "config.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot be expressed as a Hugging Face qwen2 model: bias=True"):
        GPT(GPTConfig.preset("tiny-llama", qkv_bias=True, bias=True)).save_pretrained(tmp_path / "x")
    # a Mistral without a window (v0.2 on) is LLaMA's architecture, and stays a Mistral when it came as one
    _, d = hf_family(tmp_path, "mistral")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    GPT.from_pretrained(str(d)).save_pretrained(tmp_path / "mistral")
    assert json.loads((tmp_path / "mistral" / "config.json").read_text())["model_type"] == "mistral"
    GPT(GPTConfig.preset("tiny-llama")).save_pretrained(tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"


def _eos_first(model: GPT, prompt: list[int], eos: int):
    """Make greedy decoding's first new token the end-of-text id: its output row points along the
    prompt's last hidden state, far beyond every other logit."""
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([prompt]))[0, -1]
        model.lm_head.weight[eos] = 100 * h / h.norm() ** 2  # its logit: 100


def _hf_tokenizer_dir(d, words):
    """A LLaMA-style HF tokenizer (word-level, <s> as BOS, </s> as EOS), as its own model dir would hold."""
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tk = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)


@pytest.mark.parametrize("kind", ["ours", "gpt2", "llama"])
def test_model_save_pretrained_writes_tokenizer_and_generation_config(tmp_path, kind):
    """The export is complete: AutoTokenizer on it gives our ids, config.json and generation_config.json
    name the end-of-text id, and HF generate stops there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["Hello world, it is 12345678 o'clock.\n\n  Spaces  and\ttabs", "caf\u00e9 \u4e2d\u6587 <|endoftext|> ok",
             "def f(x):\n    return x ** 2  # comment"]
    torch.manual_seed(0)
    if kind == "ours":  # a tokenizer trained with bpe.py, saved by hand beside the model
        tok = Tokenizer.train(BPE_SMALL_CORPUS + "\n".join(texts), 400, special_tokens=["<|endoftext|>"])
        model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=400)).eval()
        model.save_pretrained(tmp_path / "src", format="native", tokenizer=tok)
        ours = load_tokenizer(None, str(tmp_path / "src"))
    elif kind == "gpt2":  # GPT-2's own vocabulary (the rank file) on a GPT-2-shaped checkpoint
        if not (SHARED / "gpt2.tiktoken").exists():
            pytest.skip("../shared/data/gpt2.tiktoken absent: GPT-2's tokenizer is needed")
        model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=50257)).eval()
        model.save_pretrained(tmp_path / "src", tokenizer=bpe.load_bpe(str(SHARED / "gpt2.tiktoken")))
        ours = load_tokenizer(str(SHARED / "gpt2.tiktoken"))
    else:  # a HF LLaMA checkpoint with its own tokenizer: copied along when we re-save it
        words = sorted(set(" ".join(texts).split()))
        _, d = hf_llama(tmp_path, vocab_size=3 + len(words))
        _hf_tokenizer_dir(d, words)
        model = GPT.from_pretrained(str(d))
        model.save_pretrained(tmp_path / "src")
        ours = load_tokenizer(None, str(d))
    model = GPT.from_pretrained(str(tmp_path / "src"))  # the tokenizer travels on: saved again below
    model.save_pretrained(tmp_path / "export")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
    eos = ours.eot_id
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    gen = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert config["eos_token_id"] == gen["eos_token_id"] == hf_tok.eos_token_id == eos
    if kind == "llama":
        assert config["bos_token_id"] == hf_tok.bos_token_id == 1
    # HF generate stops at the end-of-text token of generation_config.json
    prompt = ours.encode(texts[0])[:6]
    _eos_first(model, prompt, eos)
    model.save_pretrained(tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == prompt + [eos]


def test_model_unexpressible_config_says_so_and_native_format_works(tmp_path):
    cfg = GPTConfig.preset("tiny-gpt2", norm="rmsnorm")  # layernorm-free GPT-2: no HF class has it
    m = GPT(cfg).eval()
    with pytest.raises(ValueError, match="cannot be expressed as a Hugging Face model"):
        m.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()
    m.save_pretrained(tmp_path / "x", format="native")
    back = GPT.from_pretrained(str(tmp_path / "x"))
    assert back.config == cfg
    with torch.no_grad():
        assert max_diff(back(IDX)[0], m(IDX)[0]) == 0.0


def test_model_loss_ignores_minus_100_and_padded_vocab_never_predicted():
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=100, vocab_pad_multiple=64))
    assert m.lm_head.weight.shape[0] == 128
    with torch.no_grad():
        m.lm_head.weight[100:] = 10.0  # make the padded rows as tempting as possible
    x = torch.randint(0, 100, (2, 16))
    y = torch.randint(0, 100, (2, 16))
    y[0, :5] = -100
    logits, loss = m(x, y)
    assert logits.shape == (2, 16, 100)
    ref = F.cross_entropy(logits.reshape(-1, 100), y.reshape(-1), ignore_index=-100)  # real vocab only
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    assert m.lm_head.weight.grad[100:].abs().max() == 0  # padded rows get no signal
    out = m.generate(torch.zeros(64, 1, dtype=torch.long), 8, temperature=2.0, seed=0)
    assert out.max() < 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_chunked_cross_entropy_equals_f_cross_entropy(dtype):
    from model import ChunkedCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 5000, generator=g) * 3).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    t = torch.randint(0, 5000, (300,), generator=g)
    t[::7] = -100
    loss = ChunkedCrossEntropy.apply(x, t, -100)
    (loss * 2.5).backward()  # a non-unit upstream gradient
    ref = F.cross_entropy(x_ref.float(), t, ignore_index=-100)
    (ref * 2.5).backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert x.grad.dtype == dtype
    assert (x.grad.float() - x_ref.grad.float()).abs().max() < (1e-7 if dtype == torch.float32 else 1e-4)


def test_model_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, vocab_size=256, block_size=32))
    std_resid = torch.cat([m.transformer.h[i].attn.c_proj.weight.flatten() for i in range(8)]).std().item()
    std_other = torch.cat([m.transformer.h[i].attn.c_attn.weight.flatten() for i in range(8)]).std().item()
    assert abs(std_other - 0.02) < 0.001
    assert abs(std_resid - 0.02 / math.sqrt(2 * 8)) < 0.0005


def test_model_manual_attention_equals_sdpa_and_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny-llama", vocab_size=97)
    a = _randomize(GPT(cfg), std=0.2)
    b = GPT(GPTConfig.preset("tiny-llama", vocab_size=97, attn_impl="manual"))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert max_diff(a(IDX)[0], b(IDX)[0]) < 1e-4
    a.train()
    _, loss = a(IDX, IDX)
    loss.backward()
    g = {n: p.grad.clone() for n, p in a.named_parameters()}
    a.zero_grad()
    a.grad_checkpointing = True
    _, loss2 = a(IDX, IDX)
    loss2.backward()
    assert abs(loss.item() - loss2.item()) < 1e-6
    assert all(torch.allclose(g[n], p.grad, atol=1e-6) for n, p in a.named_parameters())


def test_model_optimizer_groups_mfu_and_presets():
    m = GPT(GPTConfig.preset("tiny-gpt2"))
    opt = model_py.make_optimizer(m, "adamw", 1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n
    # MFU: 6N + 12 L H hd T FLOPs per token, over a given peak
    c = m.config
    expected = (6 * m.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * 128) * 1000 / 1e12
    assert abs(train_gpt2.estimate_mfu(m, 1000, 128, peak_flops=1e12) - expected) < 1e-12
    # preset sizes (on the meta device: no memory) against the published parameter counts
    with torch.device("meta"):
        assert abs(GPT(GPTConfig.preset("gpt2", vocab_pad_multiple=1)).get_num_params(False) / 1e6 - 124.4) < 0.1
        assert abs(GPT(GPTConfig.preset("llama2-7b")).get_num_params() / 1e9 - 6.74) < 0.01
        modern = GPT(GPTConfig.preset("modern-124m"))
    assert modern.config.ffn_hidden == 2048 and modern.config.n_kv_head == 6


def _hf_generate(hf, idx, pad_token_id=0, **kw):
    with torch.no_grad():
        return hf.generate(idx, do_sample=False, pad_token_id=pad_token_id, **kw)


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
def test_model_greedy_and_beam_match_hf_generate(tmp_path, kind):
    hf, d = hf_gpt2(tmp_path) if kind == "gpt2" else hf_llama(tmp_path, num_key_value_heads=2)
    hf.generation_config.eos_token_id = None
    ours = GPT.from_pretrained(str(d))
    prompt = IDX[:, :6]
    ref = _hf_generate(hf, prompt, max_new_tokens=12)
    assert torch.equal(ours.generate(prompt, 12, temperature=0), ref)
    assert torch.equal(ours.generate(prompt, 12, temperature=0, use_cache=False), ref)
    for nb, lp in ((3, 1.0), (4, 0.5)):
        ref = _hf_generate(hf, prompt, max_new_tokens=10, num_beams=nb, length_penalty=lp)
        assert torch.equal(ours.generate(prompt, 10, num_beams=nb, length_penalty=lp), ref)
        assert torch.equal(ours.generate(prompt, 10, num_beams=nb, length_penalty=lp, use_cache=False), ref)
    # with stop tokens that really occur: finished hypotheses of different lengths
    free = ours.generate(prompt, 10, num_beams=3)
    eos = [int(free[0, 8]), int(free[1, 10])]
    for early in (False, True):
        # (a non-zero pad id: HF replaces pad_token_id=0 by the first eos id when filling)
        ref = _hf_generate(hf, prompt, max_new_tokens=10, num_beams=3, eos_token_id=eos, early_stopping=early,
                           pad_token_id=3)
        got = ours.generate(prompt, 10, num_beams=3, eos_token_id=eos, pad_token_id=3, early_stopping=early)
        assert torch.equal(got, ref)
    ref = _hf_generate(hf, prompt, max_new_tokens=10, eos_token_id=eos, pad_token_id=3)
    assert torch.equal(ours.generate(prompt, 10, temperature=0, eos_token_id=eos, pad_token_id=3), ref)
    # decode_layout_: input-major weights (transposed strides), same tokens, same saved files
    logits = ours(prompt)[0]
    ours.decode_layout_()
    assert not ours.lm_head.weight.is_contiguous() and ours.lm_head.weight.t().is_contiguous()
    w = ours.transformer.h[0].mlp.c_fc.weight
    assert w.stride() == (1, w.size(0))
    assert torch.allclose(ours(prompt)[0], logits, atol=1e-5)
    assert torch.equal(ours.generate(prompt, 10, temperature=0, eos_token_id=eos, pad_token_id=3), ref)
    ours.save_pretrained(tmp_path / "relaid")
    assert torch.equal(GPT.from_pretrained(str(tmp_path / "relaid")).generate(prompt, 10, temperature=0,
                                                                               eos_token_id=eos, pad_token_id=3), ref)


def test_model_batched_prompts_of_different_lengths(tmp_path):
    hf, d = hf_llama(tmp_path, num_key_value_heads=2)
    ours = GPT.from_pretrained(str(d))
    prompts = [IDX[0, :3].tolist(), IDX[1, :9].tolist(), IDX[0, 5:11].tolist()]
    out = ours.generate(prompts, 8, temperature=0)
    assert out.shape == (3, 9 + 8)
    for i, p in enumerate(prompts):  # each row equals generating that prompt alone
        alone = ours.generate(torch.tensor([p]), 8, temperature=0)
        assert out[i, -8:].tolist() == alone[0, -8:].tolist()
    # and equals HF generate with the same left padding and attention mask
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = torch.tensor(p), 1
    ref = _hf_generate(hf, ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(out, ref)
    assert torch.equal(ours.generate(ids, 8, temperature=0, attention_mask=mask, use_cache=False), ref)
    assert torch.equal(ours.generate(ids, 6, num_beams=2, attention_mask=mask),
                       _hf_generate(hf, ids, attention_mask=mask, max_new_tokens=6, num_beams=2))


def test_model_sampling_seed_cache_stream_and_context_limit(tmp_path):
    _, d = hf_llama(tmp_path)
    m = GPT.from_pretrained(str(d))
    a = m.generate(IDX[:, :4], 20, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    b = m.generate(IDX[:, :4], 20, temperature=1.0, top_k=50, top_p=0.95, seed=7, use_cache=False)
    c = m.generate(IDX[:, :4], 20, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    streamed = []
    out = m.generate(IDX[:, :4], 10, temperature=0, stream=lambda t: streamed.append(t.clone()))
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:])
    with pytest.raises(ValueError, match="exceeds the model's context block_size=64"):
        m.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="exceeds the model's context block_size=64"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_model_top_k_top_p_sample_only_inside_their_set():
    probs = torch.tensor([0.05, 0.40, 0.02, 0.25, 0.15, 0.08, 0.05])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_k=3)).nonzero().flatten().tolist() == [1, 3, 4]
    # nucleus: sorted 0.40, 0.25, 0.15 (cum 0.80), 0.08 (cum 0.88), ... smallest set reaching p
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).nonzero().flatten().tolist() == [1, 3, 4]
    assert torch.isfinite(filter_logits(logits, top_p=0.65)).nonzero().flatten().tolist() == [1, 3]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).nonzero().flatten().tolist() == [1]
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.99)).nonzero().flatten().tolist() == [1, 3]
    # through generate, with the model's output replaced by the crafted distribution
    m = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=7))
    m.logits_from_hidden = lambda h: logits.expand(*h.shape[:-1], 7)
    for kw, allowed in ((dict(top_k=3), {1, 3, 4}), (dict(top_p=0.65), {1, 3}), (dict(top_p=0.7), {1, 3, 4})):
        out = m.generate(torch.zeros(2000, 1, dtype=torch.long), 1, temperature=1.0, seed=0, **kw)[:, 1]
        assert set(out.tolist()) == allowed  # never outside, and every member does occur
        if kw == dict(top_k=3):  # renormalised frequencies: 0.40/0.80, 0.25/0.80, 0.15/0.80
            freq = torch.bincount(out, minlength=7).float() / 2000
            assert abs(freq[1] - 0.5) < 0.05 and abs(freq[4] - 0.1875) < 0.05


def test_model_kv_cache_reorder():
    cfg = GPTConfig.preset("tiny-llama")
    cache = KVCache(cfg, 3, 8, "cpu", torch.float32)
    k = torch.arange(3.0)[:, None, None, None].expand(3, cfg.n_kv_head, 2, cfg.head_dim)
    cache.update(0, k, k)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[0, :, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]


def test_model_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        GPT.from_pretrained(str(tmp_path / "empty"))
    _, d = hf_gpt2(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    # unknown model_type
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert' is not supported"):
        GPT.from_pretrained(str(d))
    # shape mismatch: config says wider than the weights
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(ValueError,
                       match=r"wrong shape.*transformer\.wte\.weight: checkpoint \(97, 32\) vs model \(128, 64\)"):
        GPT.from_pretrained(str(d))
    # a layer more than the weights have: the missing tensors are named
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \(12\): transformer\.h\.2\.ln_1\.weight"):
        GPT.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        GPT.from_pretrained(str(d))
    # corrupted weights file
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        GPT.from_pretrained(str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        GPT.from_pretrained(str(d))


# -----------------------------------------------------------------------------------------------
# prepare_data.py


def test_data_shards_hold_exactly_the_encoded_documents(train_corpus):
    docs, tok_dir, data_dir, tok = train_corpus
    val = prepare_data.list_shards(data_dir, "val")
    train = prepare_data.list_shards(data_dir, "train")
    assert [p.name for p in val] == ["tiny_val_000000.bin"] and len(train) >= 3
    assert train[0].name == "tiny_train_000001.bin"
    # reference: bpe.py's pure-Python encoder, <|endoftext|> before every document
    eot = tok.special_tokens["<|endoftext|>"]
    expected = [t for d in docs for t in [eot] + tok.encode(d)]
    got = np.concatenate([prepare_data.load_shard(p) for p in val + train]).tolist()
    assert got == expected
    sizes = [prepare_data.read_header(p)["n_tokens"] for p in val + train]
    assert sizes[0] == 4096 and all(s == 20000 for s in sizes[1:-1]) and 0 < sizes[-1] <= 20000
    head = prepare_data.read_header(train[-1])
    assert head["vocab_size"] == 512 and head["eot_id"] == eot and head["final"] and head["dtype"] == "uint16"
    assert head["tokenizer"] == prepare_data.tokenizer_name(str(tok_dir)) and head["tokenizer"].startswith("bpe-")
    assert (data_dir / "tokenizer" / "tokenizer.bpe").read_text() == (tok_dir / "tokenizer.bpe").read_text()


def test_data_resume_keeps_finished_shards_and_equals_a_clean_run(train_corpus, tmp_path):
    docs, tok_dir, clean_dir, _ = train_corpus

    def crashing(n):
        for i, d in enumerate(docs):
            if i == n:
                raise KeyboardInterrupt("killed")
            yield d

    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        prepare_data.write_shards(crashing(len(docs) * 2 // 3), out, "tiny", str(tok_dir), 20000, 4096)
    done = prepare_data.list_shards(out, "val") + prepare_data.list_shards(out, "train")
    assert 2 <= len(done) < len(prepare_data.list_shards(clean_dir, "train")) + 1  # partial: some shards
    assert not prepare_data.read_header(done[-1])["final"]
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    prepare_data.write_shards(iter(docs), out, "tiny", str(tok_dir), 20000, 4096)
    for p in done:
        assert p.stat().st_mtime_ns == stamps[p.name], f"{p.name} was rewritten"
    for a, b in zip(sorted(clean_dir.glob("*.bin")), sorted(out.glob("*.bin")), strict=True):
        assert a.read_bytes() == b.read_bytes(), b.name
    assert not list(out.glob("*.tmp"))
    # a complete folder is left alone
    again = prepare_data.write_shards(iter(docs), out, "tiny", str(tok_dir), 20000, 4096)
    assert again["written"] == 0


def test_data_bad_shards_and_inputs_give_clear_errors(train_corpus, tmp_path):
    _, tok_dir, data_dir, _ = train_corpus
    good = prepare_data.list_shards(data_dir, "train")[0]
    bad = tmp_path / "x_train_000001.bin"
    bad.write_bytes(b"GARBAGE!" + good.read_bytes()[8:])
    with pytest.raises(ValueError, match=r"x_train_000001.bin: not a token shard.*magic"):
        prepare_data.read_header(bad)
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"x_train_000001.bin: file is .* truncated"):
        prepare_data.load_shard(bad)
    bad.write_bytes(b"NLLM")
    with pytest.raises(ValueError, match="shorter than the 1024-byte header"):
        prepare_data.read_header(bad)
    # shards of one folder from different vocabularies
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    import shutil
    shutil.copytree(data_dir / "tokenizer", mixed / "tokenizer")
    for p in prepare_data.list_shards(data_dir, "val") + [good]:
        (mixed / p.name).write_bytes(p.read_bytes())
    toks = np.arange(300, dtype=np.uint16)
    prepare_data.write_shard(mixed / "tiny_train_000002.bin", toks,
                             {"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256})
    with pytest.raises(ValueError, match=r"tiny_train_000002.bin: tokenizer 'gpt2' differs"):
        train_gpt2.open_data(mixed)
    # a model whose vocabulary is not the data's
    (mixed / "tiny_train_000002.bin").unlink()
    other = tmp_path / "other_model"
    GPT(train_gpt2.GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(other, format="native")
    with pytest.raises(ValueError, match=r"vocab_size is 300 but the shards in .* have vocab_size 512"):
        _train(mixed, tmp_path / "o", "--init_from", other, "--max_steps", 1)
    # inputs
    with pytest.raises(ValueError, match="no such file"):
        prepare_data.main(["text", "--input", str(tmp_path / "nothing*.txt"), "--tokenizer", str(tok_dir)])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty input file"):
        prepare_data.main(["text", "--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir)])
    with pytest.raises(ValueError, match="only .* tokens, all taken by the validation split"):
        prepare_data.write_shards(["tiny"], tmp_path / "small", "s", str(tok_dir), 100, 4096)


def test_data_text_command_end_to_end(train_corpus, tmp_path):
    docs, tok_dir, _, tok = train_corpus
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("\n\n\n".join(docs[i::3]))
    prepare_data.main(["text", "--input", str(tmp_path / "part*.txt"), "--tokenizer", str(tok_dir),
                       "--out_dir", str(tmp_path / "d"), "--name", "mine", "--num_workers", "2"])
    d = tmp_path / "d" / "mine"
    eot = tok.special_tokens["<|endoftext|>"]
    texts = [(tmp_path / f"part{i}.txt").read_text() for i in range(3)]
    expected = [t for s in texts for t in [eot] + tok.encode(s)]
    shards = prepare_data.list_shards(d, "val") + prepare_data.list_shards(d, "train")
    got = np.concatenate([prepare_data.load_shard(p) for p in shards]).tolist()
    assert got == expected
    n_val = prepare_data.read_header(shards[0])["n_tokens"]
    assert 0.07 < n_val / len(expected) < 0.13  # --val_frac 0.1, estimated from a sample


def test_data_text_command_trains_its_own_bpe_offline(train_corpus, tmp_path, monkeypatch, capsys):
    """Without --tokenizer, `text` needs no network: it trains a BPE on the input files (cached in
    OUT_DIR/NAME/tokenizer/, as builtin does), and GPT-2's tokenizer is never asked for."""
    docs, _, _, _ = train_corpus
    for i in range(2):
        (tmp_path / f"book{i}.txt").write_text("\n\n".join(docs[i::2]))
    monkeypatch.setenv("GPT2_TIKTOKEN", str(tmp_path / "no-such-gpt2.tiktoken"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    argv = ["text", "--input", str(tmp_path / "book*.txt"), "--out_dir", str(tmp_path / "d"), "--name", "books",
            "--vocab_size", "400", "--val_fraction", "0.2", "--num_workers", "0"]  # the former flag: an alias
    prepare_data.main(argv)
    d = tmp_path / "d" / "books"
    tok = load_tokenizer(str(d / "tokenizer"))
    assert tok.n_vocab == 400 and "trained a 400-token BPE on the input files" in capsys.readouterr().err
    shards = prepare_data.list_shards(d, "val") + prepare_data.list_shards(d, "train")
    assert prepare_data.read_header(shards[0])["tokenizer"] == prepare_data.tokenizer_name(str(d / "tokenizer"))
    got = np.concatenate([prepare_data.load_shard(p) for p in shards]).tolist()
    texts = [(tmp_path / f"book{i}.txt").read_text() for i in range(2)]
    assert tok.decode(got) == "".join("<|endoftext|>" + t for t in texts)
    n_val = prepare_data.read_header(shards[0])["n_tokens"]
    assert 0.15 < n_val / len(got) < 0.25  # --val_fraction 0.2
    prepare_data.main(argv[:-4] + ["--val_frac", "0.2", "--num_workers", "0"])  # a re-run: nothing to do
    err = capsys.readouterr().err
    assert "using the BPE trained before" in err and "complete already" in err


def test_data_builtin_corpus_is_stdlib_docstrings_with_held_out_modules(tmp_path, monkeypatch, capsys):
    docs = prepare_data.stdlib_documents()
    paths = [p for p, _ in docs]
    assert paths == sorted(paths) and len(docs) > 300
    assert not any("/test/" in p or "site-packages" in p for p in paths)
    import textwrap
    text = dict(docs)["stdlib/textwrap.py"]
    assert textwrap.dedent.__doc__.strip().splitlines()[0] in text
    assert 1.5e6 < sum(len(t) for _, t in docs) < 2e7  # "a few MB"
    val = [p for p in paths if prepare_data.is_val_document(p)]
    assert 0.05 < len(val) / len(docs) < 0.15
    monkeypatch.setattr(prepare_data, "stdlib_documents", lambda packages=(): docs)  # parsed once is enough
    out = prepare_data.prepare_builtin(tmp_path / "builtin", vocab_size=600)
    tok = load_tokenizer(str(out / "tokenizer"))
    assert tok.n_vocab == 600
    val_text = tok.decode(prepare_data.load_shard(prepare_data.list_shards(out, "val")[0]))
    assert val_text == "".join("<|endoftext|>" + t for p, t in docs if prepare_data.is_val_document(p))
    # a re-run says that the data is already there, and where
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    capsys.readouterr()
    prepare_data.main(["builtin", "--out_dir", str(tmp_path)])
    assert f"{out}: the built-in corpus is already there" in capsys.readouterr().err
    assert before == {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}


def test_data_builtin_tasks_rerun_says_the_data_is_there(tmp_path, capsys):
    out = tmp_path / "builtin_tasks"
    out.mkdir()
    names = prepare_data.BUILTIN_TASK_FILES
    for name in names:
        (out / f"{name}.jsonl").write_text("{}\n")
    prepare_data.main(["builtin_tasks", "--out_dir", str(tmp_path)])
    assert f"{out}: the built-in task data is already there" in capsys.readouterr().err
    assert all((out / f"{name}.jsonl").read_text() == "{}\n" for name in names)  # kept as they are


def test_data_flag_aliases_keep_the_former_names():
    parser = prepare_data.build_parser()
    for new, old, value in (("--val_frac", "--val_fraction", "0.2"), ("--max_examples", "--n_samples", "7")):
        subcommands = ("text", "shakespeare") if new == "--val_frac" else ("alpaca", "hh", "hh_pairs")
        for sub in subcommands:
            extra = ["--input", "x.txt"] if sub == "text" else []
            a = parser.parse_args([sub, new, value] + extra)
            b = parser.parse_args([sub, old, value] + extra)
            assert vars(a) == vars(b) and str(getattr(a, new[2:])) == value, (sub, new)


def test_data_fineweb_and_hellaswag_commands_with_stand_ins(train_corpus, tmp_path, monkeypatch):
    """The hub is out of reach in tests: stand-ins for `datasets` and `hellaswag` check what the
    sub-commands ask of them and what they make of the answer."""
    import types
    docs, tok_dir, _, tok = train_corpus
    asked = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        asked.update(path=path, name=name, split=split, streaming=streaming)
        return iter([{"text": d, "id": i} for i, d in enumerate(docs)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare_data.main(["fineweb", "--out_dir", str(tmp_path), "--tokenizer", str(tok_dir), "--shard_tokens", "30000",
                       "--num_workers", "1"])
    assert asked == {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "streaming": True}
    out = tmp_path / "fineweb_edu"
    shards = prepare_data.list_shards(out, "val") + prepare_data.list_shards(out, "train")
    assert [prepare_data.read_header(p)["n_tokens"] for p in shards[:-1]] == [30000] * (len(shards) - 1)
    eot = tok.special_tokens["<|endoftext|>"]
    assert np.concatenate([prepare_data.load_shard(p) for p in shards]).tolist() == \
        [t for d in docs for t in [eot] + tok.encode(d)]
    got = []
    monkeypatch.setattr(prepare_data, "download",
                        lambda url, dest, flag=None: got.append((url, Path(dest))) or Path(dest))
    prepare_data.main(["hellaswag", "--out_dir", str(tmp_path)])
    assert got == [(prepare_data.HELLASWAG_VAL_URL, tmp_path / "hellaswag" / "hellaswag_val.jsonl")]


def test_data_alpaca_subcommand_writes_filtered_jsonl(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "ctx", "output": "x" * (10 * i + 1)}
            for i in range(6)]
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(rows))
    prepare_data.main(["alpaca", "--data_file", str(src), "--out_dir", str(tmp_path / "data"),
                       "--max_response_chars", "35", "--max_examples", "3"])
    out = [json.loads(line) for line in (tmp_path / "data" / "alpaca" / "alpaca.jsonl").read_text().splitlines()]
    assert out == [r for r in rows if len(r["output"]) <= 35][:3]
    assert prepare_data.load_alpaca(tmp_path / "data" / "alpaca" / "alpaca.jsonl") == out


def test_data_hellaswag_items_schemas_and_errors(tmp_path):
    good = HS_ITEMS[0]
    # the HF datasets schema (Rowan/hellaswag: label a string, extra fields) and parquet
    hf_rows = [dict(good, label="3", ind=24, source_id="activitynet~x", split="val", split_type="indomain")]
    assert prepare_data.load_hellaswag(_hs_write_jsonl(tmp_path / "hf.jsonl", hf_rows))[0]["label"] == 3
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(hf_rows * 2), tmp_path / "v.parquet")
    ex = prepare_data.load_hellaswag(tmp_path / "v.parquet")
    assert len(ex) == 2 and ex[1]["label"] == 3 and ex[1]["ctx"] == "A man is sitting on a roof. he STARTS"

    def error(rows_or_text, name="bad.jsonl"):
        p = tmp_path / name
        p.write_text(rows_or_text if isinstance(rows_or_text, str) else
                     "".join(json.dumps(r) + "\n" for r in rows_or_text))
        with pytest.raises(ValueError) as e:
            prepare_data.load_hellaswag(p)
        return str(e.value)

    no_label = {k: v for k, v in good.items() if k != "label"}
    msg = error([good, no_label])
    assert "bad.jsonl:2" in msg and "'label'" in msg
    msg = error([good, good, {k: v for k, v in good.items() if k != "ctx_b"}])
    assert "bad.jsonl:3" in msg and "'ctx_b'" in msg
    msg = error([dict(good, label=4)])
    assert "bad.jsonl:1" in msg and "label" in msg and "4" in msg
    assert "bad.jsonl:1" in error([dict(good, label=-1)])
    assert "test split has no labels" in error([dict(good, label="")])
    msg = error([dict(good, endings=good["endings"][:3])])
    assert "bad.jsonl:1" in msg and "endings" in msg and "3" in msg
    assert "bad.jsonl:2" in error(json.dumps(good) + "\n{not json\n")
    msg = error("", "empty.jsonl")
    assert "empty.jsonl" in msg and "empty" in msg
    with pytest.raises(FileNotFoundError, match="prepare_data.py hellaswag"):
        prepare_data.load_hellaswag(tmp_path / "missing.jsonl")


def test_data_hellaswag_download_atomic_skip_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    _hs_write_jsonl(served / "hellaswag_val.jsonl", HS_ITEMS)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    try:
        path = prepare_data.download_hellaswag(tmp_path / "cache", url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "cache" / "hellaswag_val.jsonl"
    assert path.read_bytes() == (served / "hellaswag_val.jsonl").read_bytes()
    assert list((tmp_path / "cache").iterdir()) == [path]  # no temporary file left behind
    assert prepare_data.download_hellaswag(tmp_path / "cache", url=url) == path  # present: no request (server is down)
    # offline: a clear error naming the URL and what to do, and nothing half-written
    with pytest.raises(ValueError, match="could not download .*--data_file"):
        prepare_data.download_hellaswag(tmp_path / "cache2", url=url, flag="--data_file")  # hellaswag.py's flag
    assert list((tmp_path / "cache2").iterdir()) == []


# -----------------------------------------------------------------------------------------------
# train_gpt2.py


def test_train_lr_schedule_matches_formula():
    cfg = train_gpt2.TrainConfig()  # GPT-3 small: 6e-4, 715 warmup, 19073 steps, floor 10%

    def lr(step):  # the schedule is a multiplier of each group's peak
        return cfg.lr * model_py.lr_schedule(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)

    assert lr(0) == pytest.approx(6e-4 / 715)
    assert lr(99) == pytest.approx(6e-4 * 100 / 715)
    assert lr(714) == pytest.approx(6e-4)
    assert lr(715) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert lr(mid) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * (mid - 715) / (19073 - 715))) * 5.4e-4)
    assert lr(mid) == pytest.approx(3.3e-4, rel=1e-3)  # halfway down the cosine: (max + min) / 2
    assert lr(19073) == pytest.approx(6e-5) and lr(30000) == pytest.approx(6e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(715, 19073, 97))


def test_train_a_named_preset_keeps_its_shape_under_a_recipe(capsys):
    """--model gpt2-large under the cpu recipe built a 2.6M-parameter model: the recipe's n_layer, n_head,
    n_embd and block_size silently replaced the preset's. A preset the user names keeps its own shape
    (said in a note); the recipe's own family keeps the recipe's shape; a shape flag given still wins."""
    cfg, _ = train_gpt2.parse_args(["--recipe", "cpu", "--model", "gpt2-large"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (None, None, None, None)
    built = GPTConfig.preset(cfg.model)
    assert (built.n_layer, built.n_head, built.n_embd, built.block_size) == (36, 20, 1280, 1024)
    assert "--model gpt2-large keeps its own shape" in capsys.readouterr().err
    cfg, _ = train_gpt2.parse_args(["--recipe", "cpu", "--model", "small-cpu"])  # the recipe's family: its shape
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 6, 192, 128)
    cfg, _ = train_gpt2.parse_args(["--recipe", "cpu", "--model", "gpt2-large", "--n_layer", "2"])
    assert cfg.n_layer == 2 and cfg.n_embd is None


def test_train_refuses_shards_whose_vocabulary_differs_from_their_tokenizer(train_corpus):
    """Why: shard headers saying vocab_size 8192 beside the 4096-token tokenizer of the same name trained
    to the end over an 8192-way softmax, and saved a model its tokenizer could not speak for. The data is
    checked against its tokenizer by vocabulary size as well as by name."""
    _, _, data, _ = train_corpus
    _, _, meta = train_gpt2.open_data(data)
    assert train_gpt2.data_tokenizer(data, meta).n_vocab == meta["vocab_size"] == 512
    with pytest.raises(ValueError, match=r"say vocab_size 8192, but their tokenizer .* has 512 tokens"):
        train_gpt2.data_tokenizer(data, dict(meta, vocab_size=8192))


class _ArangeStream:
    """A stream whose token at position i is i: batches then name the positions they read."""
    def __init__(self, n):
        self.n, self.files = n, [Path("fake/x")]

    def __len__(self):
        return self.n

    def read(self, start, n):
        assert start + n <= self.n
        return np.arange(start, start + n, dtype=np.int64)


@pytest.mark.parametrize("world,accum", [(1, 6), (2, 3), (3, 2)])
def test_train_loader_rank_striding_covers_every_token_once_per_epoch(world, accum):
    B, T = 2, 5
    total = B * T * world * accum
    steps = 4
    stream = _ArangeStream(steps * total + 1 + 7)  # 7 tokens too few for a 5th step: skipped
    loaders = [train_gpt2.DataLoader(stream, B, T, r, world, total) for r in range(world)]
    seen, per_step = Counter(), []
    for _ in range(steps):
        step_pos = set()
        for ld in loaders:
            for _ in range(accum):
                x, y = ld.next_batch()
                assert torch.equal(y, x + 1)  # targets are the next tokens
                step_pos.update(x.flatten().tolist())
                seen.update(x.flatten().tolist())
        per_step.append(step_pos)
    assert set(seen) == set(range(steps * total)) and set(seen.values()) == {1}
    # the tokens of step k do not depend on the split into ranks x accumulation
    assert per_step == [set(range(k * total, (k + 1) * total)) for k in range(steps)]
    x, _ = loaders[0].next_batch()  # a new epoch starts from the beginning
    assert x[0, 0].item() == 0 and loaders[0].epoch == 1


def test_train_ddp_two_processes_equal_one_process_with_twice_the_accumulation(train_corpus, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) x 2 accumulation vs 1 process x 4: the same tokens per step,
    so the same losses up to float summation order (tolerance 1e-4; observed ~1e-6)."""
    _, _, data_dir, _ = train_corpus
    args = ["--max_steps", "6", "--eval_interval", "3", "--ckpt_interval", "0", "--total_batch_size", "1024"]
    single_train, single_eval = _train(data_dir, tmp_path / "one", *args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt2.py"), "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "two"), *TINY, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks x 2 accumulation" in r.stdout and "1 ranks x 4 accumulation" not in r.stdout
    ddp_train, ddp_eval = _log(tmp_path / "two")
    assert [e["step"] for e in ddp_train] == list(range(1, 7))  # a train row: after `step` optimizer steps
    for a, b in zip(single_train, ddp_train, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["lr"] == b["lr"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    for a, b in zip(single_eval, ddp_eval, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
    # both checkpoints continue on one process, the DDP one on a different world size: the same tokens
    # per step (grad_accum 2 -> 4 for it), hence the same losses
    for out in ("one", "two"):
        train_gpt2.main(["--out_dir", str(tmp_path / out), "--resume", "--max_steps", "8"])
    more_one, more_two = _log(tmp_path / "one")[0][6:], _log(tmp_path / "two")[0][6:]
    assert [r["step"] for r in more_two] == [7, 8]
    for a, b in zip(more_one, more_two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4


def test_train_stop_and_resume_equals_uninterrupted_run(train_corpus, tmp_path, capsys):
    _, _, data_dir, _ = train_corpus
    common = ["--max_steps", "8", "--eval_interval", "4", "--dropout", "0.1"]  # dropout: RNG state matters
    full_train, full_eval = _train(data_dir, tmp_path / "full", *common, "--ckpt_interval", "0")
    # every step line says the time per step and the time left; after 5 timed steps, the whole run's
    out = capsys.readouterr().out
    assert regex.search(r"step     8/8 \| loss .* \| [\d.]+ s/step, \d+ s left", out), out
    assert out.count("the whole run: about ") == 1
    # run 1 checkpoints at step 3 and "dies" at step 5; run 2 resumes from step 3
    _train(data_dir, tmp_path / "cut", *common, "--ckpt_interval", "3", "--stop_at_step", "5")
    state = torch.load(tmp_path / "cut" / "ckpt" / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["data"]["pos"] == 3 * 512
    assert not (tmp_path / "cut" / "model").exists()  # the final model comes when the run completes
    train_gpt2.main(["--out_dir", str(tmp_path / "cut"), "--resume", "--ckpt_interval", "0"])
    cut_train, cut_eval = _log(tmp_path / "cut")
    assert [r["step"] for r in cut_train] == list(range(1, 9))  # steps 4, 5 logged once, by the resumed run
    assert [r["step"] for r in cut_eval] == [0, 4, 8]
    assert [r["loss"] for r in cut_train] == [r["loss"] for r in full_train]  # bit for bit on CPU
    assert [r["val_loss"] for r in cut_eval] == [r["val_loss"] for r in full_eval]
    # the final checkpoints hold the same weights; the model loads on its own with its tokenizer
    a = GPT.from_pretrained(str(tmp_path / "full" / "ckpt" / "model"))
    b = GPT.from_pretrained(str(tmp_path / "cut" / "ckpt" / "model"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # the final model/, as every stage leaves it: the last checkpoint's weights, with the tokenizer
    final = GPT.from_pretrained(str(tmp_path / "cut" / "model"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), final.state_dict().values()))
    assert f"final model: {tmp_path / 'cut' / 'model'}" in capsys.readouterr().out
    tok = load_tokenizer(None, str(tmp_path / "cut" / "model"))
    assert tok.n_vocab == 512 and (tmp_path / "full" / "loss.png").stat().st_size > 1000


def _kill_after(cmd, log: Path, marker: str, n: int):
    """Run cmd and SIGKILL it once its log has n lines holding marker (a real kill, at an arbitrary moment
    between two writes). The child sums in as many threads as this process does: the same floats."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count(marker) >= n:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _sigkilled_run(data_dir, tmp_path, *common):
    """An uninterrupted 24-step run, and the same run killed by a real SIGKILL at an arbitrary moment
    after its first checkpoint: (full run's train and eval log, the killed run's dir, its state)."""
    full_train, full_eval = _train(data_dir, tmp_path / "full", "--max_steps", "24", *common, "--ckpt_interval", "0")
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), "--data_dir", str(data_dir), "--out_dir", str(out),
           *TINY, "--max_steps", "24", *common, "--ckpt_interval", "2"]
    _kill_after(cmd, out / "log.jsonl", '"train"', 5)
    state = torch.load(train_gpt2.find_checkpoint(out) / "state.pt", weights_only=True)
    if state["step"] >= 24:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    return full_train, full_eval, out, state


def test_train_sigkill_then_resume_equals_uninterrupted_run(train_corpus, tmp_path):
    """A real SIGKILL of a training process at an arbitrary moment after its first checkpoint."""
    _, _, data_dir, _ = train_corpus
    full_train, _, out, _ = _sigkilled_run(data_dir, tmp_path, "--eval_interval", "0", "--num_samples", "0")
    train_gpt2.main(["--out_dir", str(out), "--resume"])
    killed_train, _ = _log(out)
    assert [r["loss"] for r in killed_train] == [r["loss"] for r in full_train]


def test_train_interrupted_checkpoint_save_keeps_the_previous_one(train_corpus, tmp_path, monkeypatch):
    _, _, data_dir, _ = train_corpus
    out = tmp_path / "o"
    _train(data_dir, out, "--max_steps", "2", "--eval_interval", "0", "--num_samples", "0")
    before = (out / "ckpt" / "state.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, path, *a, **k):  # the process "dies" while writing the state file
        real_save(obj, path, *a, **k)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_gpt2.main(["--out_dir", str(out), "--resume", "--max_steps", "4"])
    monkeypatch.undo()
    assert (out / "ckpt" / "state.pt").read_bytes() == before  # untouched, still the valid one
    assert not (out / "ckpt.tmp" / "state.pt").exists()  # the half-made one never looks complete
    # a kill between the two renames of the directory swap: only ckpt.old is left, and it is used
    os.replace(out / "ckpt", out / "ckpt.old")
    assert train_gpt2.find_checkpoint(out) == out / "ckpt.old"


def test_train_short_run_beats_unigram_entropy(train_corpus, tmp_path):
    _, _, data_dir, _ = train_corpus
    train_stream = train_gpt2.TokenStream(prepare_data.list_shards(data_dir, "train"))
    counts = Counter(train_stream.read(0, len(train_stream)).tolist())
    n = sum(counts.values())
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())  # nats, the no-context baseline
    _, evals = _train(data_dir, tmp_path / "o", "--max_steps", "200", "--eval_interval", "200",
                      "--batch_size", "8", "--num_samples", "0")
    assert evals[0]["val_loss"] > unigram  # the untrained model is worse than unigram (~ln 512)
    assert evals[-1]["val_loss"] < unigram - 0.1, (evals, unigram)  # observed: 5.09 vs 5.34


def test_train_hellaswag_in_the_loop_uses_the_uncompiled_model_sharded(train_corpus, tmp_path, monkeypatch):
    """A stand-in for hellaswag.py: checks what the loop hands it and what it logs."""
    import types
    _, _, data_dir, _ = train_corpus
    calls = []
    fake = types.ModuleType("hellaswag")
    monkeypatch.setattr(prepare_data, "load_hellaswag", lambda path: [{"i": i} for i in range(10)])

    def evaluate(model, tokenizer, examples, scoring="harness", batch_size=8, device=None, rank=0, world_size=1):
        calls.append((type(model).__name__, len(examples), rank, world_size, tokenizer.n_vocab))
        return {"acc": 0.3, "acc_norm": 0.35, "acc_stderr": 0.1, "acc_norm_stderr": 0.1, "n": len(examples),
                "scoring": scoring}

    fake.evaluate = evaluate
    monkeypatch.setitem(sys.modules, "hellaswag", fake)
    hs = tmp_path / "hs.jsonl"
    hs.write_text("{}\n")
    train_gpt2.main(["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "o"), *TINY, "--max_steps", "2",
                     "--eval_interval", "1", "--hellaswag_file", str(hs), "--hellaswag_limit", "4"])
    assert calls == [("GPT", 4, 0, 1, 512)] * 3
    _, evals = _log(tmp_path / "o")
    assert [e["hellaswag"] for e in evals] == [0.35] * 3


def test_train_help_documents_every_flag_and_bad_batch_is_explained(train_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_gpt2.main(["--help"])
    help_text = capsys.readouterr().out
    for name in ("out_dir", "max_steps", "resume", "model", "init_from", "data_dir", "batch_size", "seq_len",
                 "total_batch_size", "eval_interval", "ckpt_interval", "compile", "seed"):
        assert f"--{name}" in help_text
    for f in train_gpt2.fields(train_gpt2.TrainConfig):
        assert len(f.metadata["help"]) > 10, f.name
    _, _, data_dir, _ = train_corpus
    with pytest.raises(ValueError, match=r"--total_batch_size 1000 is not a multiple of seq_len \* world_size = "
                                         r"64 \* 1; try --total_batch_size 960"):
        _train(data_dir, tmp_path / "o", "--total_batch_size", "1000")
    # a --batch_size given by hand that does not divide the step: the message names one that does
    with pytest.raises(ValueError, match=r"--total_batch_size 320 is not a multiple of .* 4 \* 64 \* 1; --batch_size 1 "
                                         r"divides it"):
        _train(data_dir, tmp_path / "o", "--total_batch_size", "320")


def test_train_cpu_recipe_checkpoints_every_50_steps_and_caps_a_long_warmup(train_corpus, tmp_path, capsys):
    cfg, _ = train_gpt2.parse_args(["--recipe", "cpu"])
    assert cfg.ckpt_interval == 50 and cfg.max_steps == 600  # a kill at step 185 keeps step 150
    _, _, data_dir, _ = train_corpus
    train, _ = _train(data_dir, tmp_path / "o", "--max_steps", 4, "--warmup_steps", 715)
    assert "warmup 1 (--warmup_steps 715 cut to 1, a tenth of the 4 steps)" in capsys.readouterr().out
    assert train[0]["lr"] == pytest.approx(3e-3)  # the peak at once: a 1-step warmup
    assert train_gpt2.parse_args(["--recipe", "cpu", "--warmup_steps", "-1"])[0].warmup_steps == -1  # 5% of the run


# --- Muon, the modern block's switches, warmup-stable-decay, bits per byte -----------------------

_BLOCK_MATRIX = regex.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def test_muon_steps_as_torch_optim_muon_and_loads_its_state():
    """Ours runs Newton-Schulz in fp32 on a CPU, torch's in bf16: the same update to bf16's precision, the
    same momentum exactly, and a state torch's Muon saved continues in ours."""
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96), (48, 48)]:  # tall, wide, square
        ours, ref = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
        ref.data.copy_(ours.data)
        start = ours.detach().clone()
        o1, o2 = model_py.Muon([ours], lr=0.02), torch.optim.Muon([ref], lr=0.02, weight_decay=0.0)
        for _ in range(3):
            ours.grad, ref.grad = (g := torch.randn(shape)), g.clone()
            o1.step(), o2.step()
        assert (ours - ref).abs().max() < 2e-3 and (ours - start).abs().max() > 0.01  # it moved
        assert torch.equal(o1.state[ours]["momentum_buffer"], o2.state[ref]["momentum_buffer"])
        o3 = model_py.Muon([ref], lr=0.02)
        o3.load_state_dict(o2.state_dict())
        assert torch.equal(o3.state[ref]["momentum_buffer"], o2.state[ref]["momentum_buffer"])


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "small-cpu-modern"])
def test_pretrain_muon_takes_every_block_matrix_and_adamw_the_rest_once(preset):
    torch.manual_seed(0)
    # (zero_init_proj off: a zero c_proj gives the block's other matrices no gradient at the first step)
    m = GPT(GPTConfig.preset(preset, n_layer=2, n_head=4, n_embd=64, vocab_size=97, zero_init_proj=False))
    opt = model_py.make_optimizer(m, "muon", lr=1e-3, weight_decay=0.1, matrix_lr=0.02)
    name = {id(p): n for n, p in m.named_parameters()}  # a tied lm_head is wte: named once
    muon = [name[id(p)] for g in opt.param_groups if g.get("muon") for p in g["params"]]
    adamw = [name[id(p)] for g in opt.param_groups if not g.get("muon") for p in g["params"]]
    assert sorted(muon) == sorted(n for n in name.values() if _BLOCK_MATRIX.fullmatch(n)) and len(muon) == 8
    assert sorted(muon + adamw) == sorted(name.values())  # every parameter once, in one optimizer
    assert {n for n in adamw if n.startswith(("transformer.wte", "lm_head"))}  # embeddings and head: AdamW
    assert all(g["lr"] == 0.02 for g in opt.muon.param_groups) and all(g["lr"] == 1e-3 for g in opt.adamw.param_groups)
    # Muon's first step is -lr * sqrt(max(1, rows/cols)) * (the gradient orthogonalised): compare with the
    # SVD's U V^T (Newton-Schulz is an approximation: singular values in about [0.7, 1.2], not exactly 1)
    x = torch.randint(0, 97, (4, 32))
    m(x, x)[1].backward()
    w = m.transformer.h[0].mlp.c_fc.weight
    before, g = w.detach().clone(), w.grad.clone()
    opt.step()
    step = (before - w.detach()) / (0.02 * math.sqrt(max(1, w.shape[0] / w.shape[1])))
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    assert F.cosine_similarity(step.flatten(), (U @ Vh).flatten(), dim=0) > 0.95
    sv = torch.linalg.svdvals(step)
    assert (sv > 0.6).float().mean() > 0.9 and sv.max() < 1.25  # (almost) every direction at about the same rate
    sg = torch.linalg.svdvals(g)
    assert (sg / sg[0] > 0.6).float().mean() < 0.2  # where the gradient's directions had very different sizes
    # fp16's loss scaling: GradScaler unscales both optimizers' gradients and skips the whole step on an overflow
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(m(x, x)[1]).backward()
    m.transformer.wte.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in m.parameters()]
    scaler.unscale_(opt)  # the loop's fp16 step: unscale, clip, step (skipped on inf), update the scale
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and scaler.get_scale() == 2.0 ** 9
    scaler.scale(m(x, x)[1]).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(w, before[[id(p) for p in m.parameters()].index(id(w))])  # a finite step is taken


def test_pretrain_wsd_and_cosine_schedules_match_their_formulas():
    def lr(step, schedule):  # peak 2e-3, floor 2e-4, 300 steps, 30 of warmup, the last 20% the warmdown
        return 2e-3 * model_py.lr_schedule(step, 300, 30, 0.1, schedule, 0.2)

    for s in (0, 14, 29):
        assert lr(s, "wsd") == lr(s, "cosine") == pytest.approx(2e-3 * (s + 1) / 30)  # the same warmup
    assert [lr(s, "wsd") for s in (30, 100, 239, 240)] == [2e-3] * 4  # stable until the last 20% (60 steps)
    for s in (250, 270, 299, 300, 400):
        assert lr(s, "wsd") == pytest.approx(2e-3 + (2e-4 - 2e-3) * min(1, (s - 240) / 60))
    assert lr(150, "cosine") == pytest.approx(2e-4 + 0.9e-3 * (1 + math.cos(math.pi * 120 / 270)))
    cfg, given = train_gpt2.parse_args(["--recipe", "cpu", "--max_lr", "1e-3", "--schedule", "wsd"])
    assert cfg.lr == 1e-3 and given["lr"] == 1e-3 and cfg.schedule == "wsd"  # --max_lr: the old name of --lr


class _ListStream:
    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self):
        return len(self.ids)

    def read(self, start, n):
        return self.ids[start:start + n]


def test_pretrain_bits_per_byte_equals_a_direct_computation(train_corpus):
    _, tok_dir, _, _ = train_corpus
    tok = load_tokenizer(str(tok_dir))
    docs = ["Grüße aus Köln: 3 € für ein Stück Käse.", "def f(x):\n    return x ** 2  # 平方", "naïve café"] * 8
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eot_id]
    stream = _ListStream(ids)
    cfg = train_gpt2.TrainConfig(seq_len=16, val_tokens=160, val_offset=7, batch_size=3)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=512, block_size=16))
    loss = train_gpt2.val_loss(model, stream, cfg, "cpu", contextlib.nullcontext, 0, 1)
    start, n_seq = train_gpt2.val_slice(stream, cfg)
    bpb = train_gpt2.bits_per_byte(loss, n_seq * 16, train_gpt2.val_bytes(tok, stream, cfg))
    # directly: the summed nats of the 10 sequences of 16 tokens from token 7, over the UTF-8 bytes of
    # the text their predicted tokens decode to (an end-of-text marker is no text)
    rows = torch.tensor(ids[7:7 + 161]).unfold(0, 17, 16)
    assert (start, n_seq, rows.shape) == (7, 10, (10, 17))
    with torch.no_grad():
        nats = F.cross_entropy(model(rows[:, :-1])[0].flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
    assert torch.equal(rows[:, 1:].flatten(), torch.tensor(ids[8:168]))  # the predicted tokens: one run of text
    text = tok.decode(ids[8:168])
    assert "\ufffd" not in text and "€" in text  # whole characters: the byte count is the text's
    n_bytes = len(text.replace("<|endoftext|>", "").encode("utf-8"))
    assert bpb == pytest.approx(nats.item() / math.log(2) / n_bytes, rel=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pretrain_switches_off_keep_transformers_parity(tmp_path, kind):
    """Every switch of the modern block written out at its off value: the logits are HF's."""
    hf, d = hf_gpt2(tmp_path) if kind == "gpt2" else hf_llama(tmp_path)
    ours = GPT.from_pretrained(str(d))
    assert (ours.config.qk_norm, ours.config.zero_init_proj, ours.config.logit_softcap) == (False, False, 0.0)
    off = GPT(dataclasses.replace(ours.config, qk_norm=False, zero_init_proj=False, logit_softcap=0.0))
    off.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = hf(IDX).logits
        assert max_diff(off(IDX)[0], ref) <= 1e-4 and ref.std() > 0.2
    for name in ("gpt2", "llama2-7b", "tiny-gpt2", "tiny-llama", "small-cpu", "modern-124m"):
        c = GPTConfig.preset(name)
        assert (c.qk_norm, c.zero_init_proj, c.logit_softcap, c.mlp in ("gelu", "swiglu")) == (False, False, 0.0, True)


def _copy_with(m, **switches):
    other = GPT(dataclasses.replace(m.config, **switches)).eval()
    other.load_state_dict(m.state_dict())
    return other


def test_pretrain_each_switch_on_does_what_its_formula_says(tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97, vocab_pad_multiple=64)).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(4)  # large logits, so that the cap matters
        logits = base(IDX)[0]
        # soft-capping: cap * tanh(logits / cap), bounded by the cap; padded ids still never predicted
        capped = _copy_with(base, logit_softcap=3.0)
        assert logits.abs().max() > 6 and max_diff(capped(IDX)[0], 3.0 * torch.tanh(logits / 3.0)) < 1e-5
        assert capped.padded_logits(capped.hidden_states(IDX))[..., 97:].max() == float("-inf")
        # QK-norm: q and k of each head are RMS-normalised, so scaling them changes nothing; without it, it does
        qk = _copy_with(base, qk_norm=True)
        out = qk(IDX)[0]
        for m in (qk, base):  # the q and k outputs (rows [q | k | v], 64 each) times 3
            m.transformer.h[0].attn.c_attn.weight[:128].mul_(3.0)
            m.transformer.h[0].attn.c_attn.bias[:128].mul_(3.0)
        assert max_diff(qk(IDX)[0], out) < 1e-4 and max_diff(base(IDX)[0], logits) > 1e-2
        # ReLU²: c_proj(relu(c_fc(x))²)
        mlp = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97, mlp="relu2")).transformer.h[0].mlp
        x = torch.randn(2, 5, 64)
        assert max_diff(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)) < 1e-6
    # zero-initialised projections (and untied head): every block starts as the identity, the loss at ln V
    z = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97, zero_init_proj=True, tie_embeddings=False))
    zeroed = [n for n, p in z.named_parameters() if p.dim() == 2 and not p.any()]
    assert sorted(zeroed) == sorted([f"transformer.h.{i}.{k}.c_proj.weight" for i in (0, 1) for k in ("attn", "mlp")]
                                    + ["lm_head.weight"])
    assert z.lm_head.weight is not z.transformer.wte.weight
    assert z(IDX, IDX)[1].item() == pytest.approx(math.log(97), abs=1e-6)
    tied = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97, zero_init_proj=True))
    assert tied.lm_head.weight.std() > 0.01  # tied, the head is the embedding: not zeroed


@pytest.mark.parametrize("switch", [dict(qk_norm=True), dict(logit_softcap=15.0), dict(mlp="relu2")])
def test_pretrain_hf_save_refuses_a_switch_hf_cannot_express_native_keeps_it(tmp_path, switch, capsys):
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97, **switch)).eval()
    with pytest.raises(ValueError, match="cannot be expressed as a Hugging Face") as e:
        m.save_pretrained(tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf" / "model.safetensors").exists()
    m.save_pretrained(tmp_path / "native", format="native")
    back = GPT.from_pretrained(str(tmp_path / "native"))
    assert back.config == m.config
    with torch.no_grad():
        assert max_diff(back(IDX)[0], m(IDX)[0]) == 0.0
    # through run_main: one line, exit status 2
    with pytest.raises(SystemExit) as e:
        housekeeping.run_main(lambda argv: m.save_pretrained(tmp_path / "hf2"))
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_pretrain_muon_sigkill_then_resume_equals_uninterrupted_run(train_corpus, tmp_path):
    """The AdamW test's twin: Muon + the modern block, a real SIGKILL, both optimizers' state resumed."""
    _, _, data_dir, _ = train_corpus
    full_train, full_eval, out, state = _sigkilled_run(
        data_dir, tmp_path, "--eval_interval", "0", "--num_samples", "0", "--optimizer", "muon",
        "--model", "small-cpu-modern", "--matrix_lr", "0.02", "--schedule", "wsd")
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["optimizer"]["muon"]["state"]
    train_gpt2.main(["--out_dir", str(out), "--resume"])
    killed_train, killed_eval = _log(out)
    assert [r["loss"] for r in killed_train] == [r["loss"] for r in full_train]
    assert full_train[-1]["loss"] < full_train[0]["loss"] - 0.5  # it learns
    # the summary the later stages read: before (step 0) and after, loss and bpb
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"] == {k: full_eval[0][k] for k in ("step", "val_loss", "val_bpb")}
    assert summary["after"]["step"] == 24 and summary["after"]["val_bpb"] == killed_eval[-1]["val_bpb"]
    assert summary["after"]["val_loss"] == full_eval[-1]["val_loss"]
    assert {"log.jsonl", "loss.png", "ckpt", "summary.json"} <= set(summary["files"])
    # the optimizer is fixed once a run exists; a checkpoint from before --max_lr became --lr resumes
    with pytest.raises(ValueError, match="--optimizer 'adamw'"):
        train_gpt2.main(["--out_dir", str(out), "--resume", "--optimizer", "adamw"])
    state["config"]["max_lr"] = state["config"].pop("lr")
    torch.save(state, train_gpt2.find_checkpoint(out) / "state.pt")
    train_gpt2.main(["--out_dir", str(out), "--resume", "--max_steps", "25"])
    assert _log(out)[0][-1]["lr"] == pytest.approx(3e-3 * model_py.lr_schedule(24, 25, 5, 0.1, "wsd", 0.2))  # TINY's --max_lr


# -----------------------------------------------------------------------------------------------
# hellaswag.py


HS_ROOT = ROOT


HS_SHARED = SHARED


# Items in the public schema, crafted to hit the harness's rules: WikiHow brackets ([title], [header],
# [step], nested), double and triple spaces, a context that ends in a bracket (so the query ends in a
# space, which the harness moves onto the continuation), ctx_b to capitalise (and lower-case), empty
# ctx_b, a HF-schema string label, and one item longer than the tiny models' 64 positions.
HS_ITEMS = [
    dict(ind=0, activity_label="Roof shingle removal", ctx_a="A man is sitting on a roof.", ctx_b="he STARTS",
         endings=["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                  "is holding a rubik's cube.", "pulling up roofing on a roof."], label=3),
    dict(ind=1, activity_label="Home and Garden",
         ctx_a="[header] How to paint a wall [title] Buy the  paint. [step] Pick a color you like.",
         ctx_b="", endings=["[substeps] Mix it  well.", "Paint the   dog.", "[title] Open the can.",
                            "Wait for it to dry [step] then paint again."], label="0"),
    dict(ind=2, activity_label="Cooking", ctx_a="She puts the pan on the stove. [step]", ctx_b="",
         endings=["She cracks two eggs.", " [header] The eggs sizzle.", "A dog barks loudly.",
                  "They play the [a [b] c] piano."], label=1),
    dict(ind=3, activity_label="Running a marathon", ctx_a="People run along a road.", ctx_b="a woman",
         endings=["waves to the camera.", "drinks water from a cup.", "paints a wall.", "falls asleep."],
         label=2),
    dict(ind=4, activity_label="Sharpening knives",
         ctx_a=" ".join(["A man sharpens a knife on a stone, slowly and carefully, while he talks."] * 4),
         ctx_b="then he", endings=["cuts a tomato in half.", "throws the knife away.", "sings a song.",
                                   "washes the stone with water and dries it."], label=0),
    dict(ind=5, activity_label="Playing guitar", ctx_a="A boy holds a guitar.", ctx_b="The boy",
         endings=["plays a song.", "eats the guitar.", "[title] tunes the strings.", "sleeps."], label=0),
]


def _hs_write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@functools.lru_cache(maxsize=None)
def _hs_tokenizer_json(style="gpt2") -> str:
    """A byte-level BPE trained on the items' text. style "gpt2": GPT-2's pre-tokenizer (words split
    before spaces, so encode(a + b) == encode(a) + encode(b) at a space). style "merge": no
    pre-splitting, so merges span the context/continuation boundary (as SentencePiece's "▁word"
    pieces do) and splitting the whole string at the context's token count really matters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    tok.decoder = decoders.ByteLevel()
    texts = [t for it in HS_ITEMS for t in [it["activity_label"], it["ctx_a"], it["ctx_b"], *it["endings"]]]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 3, trainer)
    return tok.to_str()


def _hs_save_tokenizer(d, style="gpt2"):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_hs_tokenizer_json(style)),
                                  eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    return tok


def _hs_hf_model(kind, vocab_size, d, std=0.3, positions=64):
    """A tiny random HF causal LM of `positions` positions, float64, with its weights saved to d (float32)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size,
                                             n_positions=positions))
    elif kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                               max_position_embeddings=positions, bos_token_id=None, eos_token_id=None))
    else:  # a model type model.py does not implement: must go through transformers
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=vocab_size,
                                                   max_position_embeddings=positions))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF's small init gives near-uniform logits; larger weights make comparisons bite
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    m.eval().save_pretrained(d)
    return m.double()


def _hs_ref_preprocess(text):  # lm_eval/tasks/hellaswag/utils.py, verbatim
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    import re

    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hs_ref_doc(doc):  # utils.process_docs
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": _hs_ref_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hs_ref_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _hs_ref_loglikelihood(model, encode, context, continuation, max_length):
    # TemplateLM._encode_pair: trailing spaces of the context go to the continuation; the whole
    # string is encoded and split at the context's token count
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = encode(context + continuation)
    context_enc = encode(context)
    continuation_enc = whole_enc[len(context_enc):]
    # HFLM._loglikelihood_tokens: left-truncate to max_length + 1, drop the last token
    inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([inp])).logits[0], dim=-1)
    cont = torch.tensor(continuation_enc)
    picked = logp[len(inp) - len(cont):len(inp)].gather(1, cont[:, None])
    return picked.sum().item()


def _hs_ref_harness(model, encode, items, max_length=64):
    """Per item: (lls, acc, acc_norm), the harness's process_results for multiple_choice."""
    out = []
    for it in items:
        doc = _hs_ref_doc(it)
        lls = [_hs_ref_loglikelihood(model, encode, doc["query"], " " + c, max_length) for c in doc["choices"]]
        lens = [float(len(c)) for c in doc["choices"]]
        pred = max(range(4), key=lambda i: lls[i])
        pred_norm = max(range(4), key=lambda i: lls[i] / lens[i])
        out.append((lls, float(pred == doc["gold"]), float(pred_norm == doc["gold"]), lens))
    return out


def _hs_check_against_ref(result, ref, tol=1e-5):
    items = result["items"]
    assert len(items) == len(ref) == result["n"]
    for it, (lls, acc, acc_norm, lens) in zip(items, ref):
        assert max(abs(a - b) for a, b in zip(it["ll"], lls)) <= tol, (it["ll"], lls)
        assert it["norm"] == lens  # acc_norm divides by the preprocessed ending's characters
        assert (it["pred"] == it["label"], it["pred_norm"] == it["label"]) == (acc == 1, acc_norm == 1)
    n = len(ref)
    assert result["acc"] == pytest.approx(sum(r[1] for r in ref) / n, abs=1e-12)
    assert result["acc_norm"] == pytest.approx(sum(r[2] for r in ref) / n, abs=1e-12)
    # the harness's mean_stderr: sample standard deviation / sqrt(n)
    assert result["acc_stderr"] == pytest.approx(statistics.stdev([r[1] for r in ref]) / math.sqrt(n))
    assert result["acc_norm_stderr"] == pytest.approx(statistics.stdev([r[2] for r in ref]) / math.sqrt(n))


def test_hellaswag_preprocess_matches_harness_rules():
    P = hellaswag.preprocess
    # [title] becomes ". ", other brackets vanish, then one pass of "  " -> " "
    assert P("  Cake: [title] How to bake. [step] Mix  the flour.  ") == "Cake:. How to bake. Mix the flour."
    assert P("a   b") == "a  b"  # a single left-to-right pass: three spaces leave two
    assert P("[header] Step one") == " Step one"  # strip happens before the brackets go
    assert P("Done. [step]") == "Done. "  # ... so a trailing bracket leaves a trailing space
    assert P("x [a [b] c] y") == "x c] y"  # non-greedy: from the first "[" to the first "]"
    assert P("[title]Tight") == "Tight"  # " [title]" needs its space; otherwise it is just a bracket
    q = hellaswag.harness_query
    assert q(HS_ITEMS[0]) == "Roof shingle removal: A man is sitting on a roof. He starts"  # capitalize()
    assert q(HS_ITEMS[1]) == ("Home and Garden: How to paint a wall. Buy the paint. Pick a color you like.")
    assert q(HS_ITEMS[2]) == "Cooking: She puts the pan on the stove. "
    # a leading bracket leaves a leading space (the continuation then starts with two spaces)
    assert hellaswag.harness_choices(HS_ITEMS[1]) == [" Mix it well.", "Paint the  dog.", " Open the can.",
                                                     "Wait for it to dry then paint again."]
    # and the transcribed harness code agrees on every field of every item
    for it in HS_ITEMS:
        assert q(it) == _hs_ref_doc(it)["query"]
        assert hellaswag.harness_choices(it) == _hs_ref_doc(it)["choices"]


@pytest.mark.parametrize("kind,style", [("gpt2", "gpt2"), ("gpt2", "merge"), ("llama", "merge"),
                                        ("gpt_neox", "gpt2")])
def test_hellaswag_harness_scores_match_transformers_reference(tmp_path, kind, style):
    from transformers import AutoTokenizer

    d = tmp_path / kind
    hf_tok = _hs_save_tokenizer(d, style)
    hf = _hs_hf_model(kind, len(hf_tok), d)
    ref_tok = AutoTokenizer.from_pretrained(d)
    encode = functools.partial(ref_tok.encode, add_special_tokens=False)
    ref = _hs_ref_harness(hf, encode, HS_ITEMS)
    assert len({tuple(r[0]) for r in ref}) == len(HS_ITEMS)  # scores differ between items: a real test
    if style == "merge":  # the case that makes the harness's split matter does occur here
        q = [hellaswag.harness_query(it) for it in HS_ITEMS]
        assert any(encode(q[i] + " " + e)[:len(encode(q[i]))] != encode(q[i])
                   for i, it in enumerate(HS_ITEMS) for e in hellaswag.harness_choices(it))
    data = prepare_data.load_hellaswag(_hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS))

    # the transformers model object, batches of 5 sequences (items split across forward passes)
    r_hf = hellaswag.evaluate(hf, load_tokenizer(None, str(d)), data, batch_size=5, return_items=True)
    assert r_hf["scoring"] == "harness"
    _hs_check_against_ref(r_hf, ref)
    # the CLI's loader: model.py for gpt2/llama, transformers for gpt_neox
    model, tok = hellaswag.load_model(str(d), dtype=torch.float64)
    assert isinstance(model, GPT) == (kind != "gpt_neox")
    _hs_check_against_ref(hellaswag.evaluate(model, tok, data, batch_size=7, return_items=True), ref)
    if kind == "llama":  # add_bos_token=True: the tokenizer puts BOS before context and whole string alike
        ref_bos = _hs_ref_harness(hf, lambda s: [0] + encode(s), HS_ITEMS)
        _hs_check_against_ref(hellaswag.evaluate(model, tok, data, return_items=True, bos_id=0), ref_bos)
    if kind != "gpt_neox":
        # our native checkpoint format (tokenizer in a tokenizer/ subfolder, as train_gpt2.py writes)
        native = tmp_path / "native"
        model.save_pretrained(str(native), format="native")
        _hs_save_tokenizer(native / "tokenizer", style)
        model2, tok2 = hellaswag.load_model(str(native), dtype=torch.float64)
        _hs_check_against_ref(hellaswag.evaluate(model2, tok2, data, batch_size=64, return_items=True), ref)


def test_hellaswag_gpt2_tokenizer_from_rank_file(tmp_path):
    """GPT-2's real tokenizer: our path (model.load_tokenizer -> bpe.py -> tiktoken) against tiktoken
    built directly from the rank file, through the harness reference."""
    rank_file = HS_SHARED / "gpt2.tiktoken"
    if not rank_file.exists():
        pytest.skip(f"GPT-2 rank file not found at {rank_file}")
    import tiktoken

    ranks = {base64.b64decode(tok): int(r) for tok, r in (l.split() for l in rank_file.read_text().splitlines() if l)}
    enc = tiktoken.Encoding("gpt2_ref", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256},
                            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    hf = _hs_hf_model("gpt2", 50257, tmp_path / "m", std=0.2)
    ref = _hs_ref_harness(hf, enc.encode_ordinary, HS_ITEMS)
    model = GPT.from_pretrained(str(tmp_path / "m"), dtype=torch.float64)
    r = hellaswag.evaluate(model, load_tokenizer(str(rank_file)), prepare_data.load_hellaswag(
        _hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS)), batch_size=8, return_items=True)
    _hs_check_against_ref(r, ref)


def test_hellaswag_nanogpt_scoring_matches_build_nanogpt(tmp_path):
    """build-nanogpt's render_example + masked per-token cross-entropy, one item (4 rows) at a time."""
    from transformers import AutoTokenizer

    d = tmp_path / "m"
    _hs_save_tokenizer(d)
    hf = _hs_hf_model("gpt2", len(AutoTokenizer.from_pretrained(d)), d, positions=256)
    ref_tok = AutoTokenizer.from_pretrained(d)
    items = HS_ITEMS
    data = prepare_data.load_hellaswag(_hs_write_jsonl(tmp_path / "hs.jsonl", items))
    correct, correct_norm, ref_avg = 0, 0, []
    for ex in data:
        ctx = ref_tok.encode(ex["ctx"], add_special_tokens=False)
        ends = [ref_tok.encode(" " + e, add_special_tokens=False) for e in ex["endings"]]
        T = max(len(ctx) + len(e) for e in ends)
        tokens, mask = torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T)
        for i, e in enumerate(ends):
            tokens[i, :len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[i, len(ctx):len(ctx) + len(e)] = 1
        with torch.no_grad():
            logits = hf(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1) * mask[:, 1:]
        sum_loss, avg_loss = losses.sum(1), losses.sum(1) / mask[:, 1:].sum(1)
        correct += int(sum_loss.argmin()) == ex["label"]
        correct_norm += int(avg_loss.argmin()) == ex["label"]
        ref_avg.append(avg_loss.tolist())
    model, tok = hellaswag.load_model(str(d), dtype=torch.float64)
    r = hellaswag.evaluate(model, tok, data, scoring="nanogpt", batch_size=6, return_items=True)
    assert r["scoring"] == "nanogpt" and r["n"] == len(items)
    assert r["acc"] == correct / len(items) and r["acc_norm"] == correct_norm / len(items)
    for it, avg in zip(r["items"], ref_avg):
        assert max(abs(-ll / n - a) for ll, n, a in zip(it["ll"], it["norm"], avg)) <= 1e-6


def test_hellaswag_torchrun_two_processes_match_one(tmp_path):
    d = tmp_path / "m"
    _hs_save_tokenizer(d)
    from transformers import AutoTokenizer

    _hs_hf_model("gpt2", len(AutoTokenizer.from_pretrained(d)), d)
    data_file = _hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS + HS_ITEMS[:3])  # 9 items: uneven shards
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HS_ROOT))
    common = [str(HS_ROOT / "hellaswag.py"), "--init_from", str(d), "--data_file", str(data_file),
              "--device", "cpu", "--no-progress", "--batch_size", "6"]
    runs = {}
    for name, launcher in [("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"])]:
        out = tmp_path / name
        p = subprocess.run(launcher + common + ["--json", f"{out}.json", "--per_item", f"{out}.jsonl"],
                           env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("hellaswag scoring=harness n=9 ") == 1, (p.stdout, p.stderr[-3000:])  # rank 0 only
        runs[name] = (json.loads(Path(f"{out}.json").read_text()),
                      [json.loads(l) for l in Path(f"{out}.jsonl").read_text().splitlines()])
    (one, one_items), (two, two_items) = runs["one"], runs["two"]
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "scoring"):
        assert one[key] == two[key], key
    assert [it["idx"] for it in two_items] == list(range(9))
    for a, b in zip(one_items, two_items):
        assert (a["pred"], a["pred_norm"], a["label"]) == (b["pred"], b["pred_norm"], b["label"])
        assert max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) <= 1e-4


def test_hellaswag_cli_help_documents_every_flag():
    p = subprocess.run([sys.executable, str(HS_ROOT / "hellaswag.py"), "--help"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(HS_ROOT)))
    assert p.returncode == 0
    for flag in ("--init_from", "--data_file", "--scoring", "--limit", "--json", "--tokenizer", "--batch_size",
                 "--device", "--precision", "--dtype", "--per_item", "--backend", "--add_bos", "--no-progress"):
        assert flag in p.stdout, flag


def test_hellaswag_flag_aliases_precision_and_progress():
    parse = hellaswag.build_parser().parse_args
    assert parse([]).precision == "auto" and parse([]).progress is True
    for old, new in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        assert parse(["--dtype", old]).precision == new == parse(["--precision", new]).precision
    assert parse(["--no_progress"]).progress is False and parse(["--no-progress"]).progress is False
    assert hellaswag.weights_dtype("fp32", "cpu") == torch.float32 and hellaswag.weights_dtype("auto", "cpu") == torch.float32
    with pytest.raises(SystemExit):
        parse(["--precision", "float64"])


def test_hellaswag_headline_puts_the_stages_first_and_says_why_tuning_lowers_it():
    by_stage = {"out/cpu/model": 0.479, "out-finetune/best_model": 0.3, "out-dpo/model": 0.232}
    lines = hellaswag.headline(by_stage, 211, 0.25, 0.246)
    assert lines[0] == ("acc_norm by stage, 211 items (chance 0.250, a random model 0.246): pretrained (out/cpu/model) "
                        "0.479, instruction-tuned (out-finetune/best_model) 0.300, DPO-tuned (out-dpo/model) 0.232")
    assert len(lines) == 2 and "no longer continue text" in lines[1]
    assert hellaswag.headline({"some/model": 0.5}, 8, 0.25, None) == ["acc_norm, 8 items (chance 0.250): some/model 0.500"]


def test_hellaswag_default_result_file_keeps_an_earlier_result(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = dict(acc=0.5, acc_norm=0.5, acc_stderr=None, acc_norm_stderr=None, n=2, scoring="harness", seconds=1.0)
    path = Path(hellaswag.DEFAULT_JSON)
    hellaswag.write_result(path, r, None, {"m": 0.5}, 0.25, "m", Path("d.jsonl"))
    first = path.read_text()
    hellaswag.write_result(path, dict(r, acc_norm=1.0), None, {"m": 1.0}, 0.25, "m", Path("d.jsonl"))
    kept = [p for p in path.parent.iterdir() if p != path]
    assert len(kept) == 1 and kept[0].read_text() == first and kept[0].name.startswith("summary.")
    assert json.loads(path.read_text())["acc_norm"] == 1.0
    assert all(housekeeping.fnmatch.fnmatch(p.name, "summary.*") for p in path.parent.iterdir())  # RUN_OUTPUTS'


def test_hellaswag_evaluate_restores_training_mode_and_unwraps(tmp_path):
    """train_gpt2.py calls evaluate mid-training on a (possibly wrapped) model in train mode."""
    from model import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=400, dropout=0.5)).train()
    _hs_save_tokenizer(tmp_path)
    tok = load_tokenizer(None, str(tmp_path))

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module)
        def __init__(self, m):
            super().__init__()
            self.module = m

    data = prepare_data.load_hellaswag(_hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS[:4]))
    r1 = hellaswag.evaluate(Wrapper(model), tok, data, return_items=True)
    assert model.training  # restored
    r2 = hellaswag.evaluate(model, tok, data, return_items=True, batch_size=1)
    # dropout off in both (eval mode inside): same scores, batched or not
    for a, b in zip(r1["items"], r2["items"]):
        assert max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) <= 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hellaswag_refuses_to_score_a_model_whose_outputs_are_not_numbers(tmp_path, bad):
    """Why: a model whose weights were all NaN scored above chance (acc_norm 0.300 of 40: argmax over NaN
    still picks an ending). Weights are now checked at load; a model that computes non-finite
    log-likelihoods anyway (an overflow) is one error, never a figure."""
    d = tmp_path / "hf"
    hf_tok = _hs_save_tokenizer(d)
    _hs_hf_model("gpt2", len(hf_tok), d)
    data = prepare_data.load_hellaswag(_hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS))
    model, tok = hellaswag.load_model(str(d), dtype=torch.float32)
    hellaswag.evaluate(model, tok, data, batch_size=7)  # finite: scored
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(bad)
    with pytest.raises(ValueError, match=r"hellaswag: \d+ of the \d+ endings' log-likelihoods are not finite"):
        hellaswag.evaluate(model, tok, data, batch_size=7)


# -----------------------------------------------------------------------------------------------
# lora.py


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_fresh_adapter_gives_exactly_the_base_logits(tmp_path, kind):
    hf, d = _lora_hf(kind, tmp_path)
    ours = GPT.from_pretrained(d)
    base = _our_logits(ours)
    apply_lora(ours, rank=4, alpha=8, targets="all,lm_head")
    assert torch.equal(_our_logits(ours), base)  # B = 0: not close, equal
    hf_base = _hf_logits(hf)
    apply_lora(hf, rank=4, alpha=8, targets="all")  # the same on the transformers model itself
    assert torch.equal(_hf_logits(hf), hf_base)
    assert _lora_diff(hf_base, base) < 1e-4


def test_lora_merge_equals_formula_and_unmerged_logits(tmp_path):
    _, d = _lora_hf_llama(tmp_path)  # GQA: q and v slices have different sizes
    model = GPT.from_pretrained(d)
    W0 = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, targets="q,v,o,gate,down")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):  # train a little, so B != 0
        _, loss = model(_LORA_IDX[:, :-1], _LORA_IDX[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    unmerged = _our_logits(model)
    merge_lora(model)
    assert _lora_diff(_our_logits(model), unmerged) <= 1e-5
    # the merged weight is W + (alpha/r) B A on the q and v rows only (formula, block by block)
    layer = model.transformer.h[1].attn.c_attn
    c = model.config
    qd, kvd = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    W = W0["transformer.h.1.attn.c_attn.weight"]
    want = W.clone()
    want[:qd] += 2.0 * B[:qd] @ A[:4]
    want[qd + kvd:] += 2.0 * B[qd:] @ A[4:]
    assert _lora_diff(layer.base.weight, want) < 1e-6
    assert torch.equal(layer.base.weight[qd:qd + kvd], W[qd:qd + kvd])  # k rows untouched
    unmerge_lora(model)
    assert _lora_diff(_our_logits(model), unmerged) <= 1e-5
    assert _lora_diff(layer.base.weight, W) < 1e-6


def test_lora_optimizer_step_changes_only_lora_tensors(tmp_path):
    _, d = _lora_hf_gpt2(tmp_path)
    model = GPT.from_pretrained(d)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets="q,v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    # embeddings, lm_head (tied) and norms are frozen: only lora_A / lora_B train
    opt = model_py.make_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    model.train()
    model(_LORA_IDX[:, :-1], _LORA_IDX[:, 1:])[1].backward()
    opt.step()
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_lora_grad_checkpointing_gives_the_same_lora_gradients(tmp_path):
    _, d = _lora_hf_llama(tmp_path)
    grads = []
    for ckpt in (False, True):
        model = GPT.from_pretrained(d)
        apply_lora(model, rank=4, alpha=8, dropout=0.1, targets="q,v,down")  # dropout: RNG replayed in recompute
        _lora_randomize_adapters(model)  # B != 0, so lora_A gets a gradient too
        model.grad_checkpointing = ckpt
        model.train()
        torch.manual_seed(3)
        _, loss = model(_LORA_IDX[:, :-1], _LORA_IDX[:, 1:])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 8  # A, B of c_attn (q|v) and c_proj, 2 blocks
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        assert _lora_diff(grads[0][n], grads[1][n]) < 1e-6, n


@pytest.mark.parametrize("preset,peft_targets,our_targets", [
    ("gpt2-medium", ["c_attn"], "c_attn"),
    ("gpt2-medium", ["c_attn", "c_proj", "c_fc"], "c_attn,c_proj,c_fc"),
    ("llama2-7b", ["q_proj", "v_proj"], "q,v"),
    ("llama2-7b", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "all"),
])
def test_lora_trainable_counts_equal_peft_on_meta_models(preset, peft_targets, our_targets):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        ours = GPT(GPTConfig.preset(preset, vocab_pad_multiple=1))
        if preset.startswith("gpt2"):
            hf = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
        else:
            hf = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
        hf_ours = GPT2LMHeadModel(hf.config) if preset.startswith("gpt2") else LlamaForCausalLM(hf.config)
        peft_model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=peft_targets))
        apply_lora(ours, rank=16, alpha=32, targets=our_targets)
        apply_lora(hf_ours, rank=16, alpha=32, targets=our_targets)
    want = peft_model.get_nb_trainable_parameters()
    assert lora.count_parameters(ours) == want
    assert lora.count_parameters(hf_ours) == want
    if our_targets == "q,v":  # and the formula: 32 layers x r x (in + out) for q and for v
        assert want[0] == 32 * 16 * 2 * (4096 + 4096) == 8_388_608
    assert lora.trainable_report(ours) == (f"trainable params: {want[0]:,d} || all params: {want[1]:,d} || "
                                           f"trainable%: {100 * want[0] / want[1]:.4f}")


@pytest.mark.parametrize("preset", ["llama3.1-8b", "qwen2.5-7b", "qwen3-0.6b", "mistral-7b"])
def test_lora_family_presets_count_as_peft_on_transformers_own_model_of_their_config(preset):
    """The presets' shapes (what bench_memory.py --estimate prices) are the HF models' own: transformers builds
    the model from the config.json that save_pretrained would write, and PEFT counts the same parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    c = GPTConfig.preset(preset)
    family, config_json = model_py.hf_config_for(c)
    with torch.device("meta"):
        ours = GPT(c)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_json))
        peft_model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        apply_lora(ours, rank=16, alpha=32, targets="q,v")
    assert type(hf).__name__ == model_py.LLAMA_FAMILIES[family]
    assert lora.count_parameters(ours) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind,targets", [("gpt2", "q,v,o,up,down"), ("llama", "all,lm_head")])
def test_lora_adapter_loads_in_peft_with_equal_logits(tmp_path, kind, targets):
    from peft import PeftModel

    hf, d = _lora_hf(kind, tmp_path)
    ours = GPT.from_pretrained(d)
    apply_lora(ours, rank=4, alpha=8, targets=targets, layers=[1] if kind == "llama" else None)
    _lora_randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", str(d))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert _lora_diff(_hf_logits(peft_model), _our_logits(ours)) <= 1e-5
    # and back: the PEFT-format adapter read into a fresh model of ours
    fresh = GPT.from_pretrained(d)
    load_adapter(fresh, tmp_path / "adapter")
    assert _lora_diff(_our_logits(fresh), _our_logits(ours)) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_families_adapter_loads_in_peft_and_merged_export_in_transformers(tmp_path, family):
    """Every family's q_proj ... down_proj are the PEFT names of our fused rows: our adapter is PEFT's, and our
    merged export is the family's HF model with PEFT's merged weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, d = hf_family(tmp_path, family)
    ours = GPT.from_pretrained(d)
    apply_lora(ours, rank=4, alpha=8, targets="all")
    _lora_randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", str(d))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.{sub}.{role}_proj" for i in range(2) for sub, roles in
                                           (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for role in roles)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    want = _hf_logits(peft_model)
    assert _lora_diff(want, _our_logits(ours)) <= 1e-5
    fresh = GPT.from_pretrained(d)  # and back into ours
    load_adapter(fresh, tmp_path / "adapter")
    assert _lora_diff(_our_logits(fresh), want) <= 1e-5
    lora.unload_lora(ours, merge=True)
    ours.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(hf)
    assert _lora_diff(_hf_logits(merged), _hf_logits(peft_model.merge_and_unload())) <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_peft_adapter_loads_into_our_model_with_equal_logits(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    hf, d = _lora_hf(kind, tmp_path)
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True,
                        rank_pattern={"down_proj": 2} if kind == "llama" else {})
    peft_model = get_peft_model(hf, config)
    _lora_randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ours = GPT.from_pretrained(d)
    load_adapter(ours, tmp_path / "peft_adapter")
    assert _lora_diff(_our_logits(ours), _hf_logits(peft_model.eval())) <= 1e-5
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(lora_state_dict(ours))


def test_lora_on_transformers_gpt2_conv1d_slices_roundtrips_through_peft(tmp_path):
    from peft import PeftModel

    hf, d = _lora_hf_gpt2(tmp_path)
    apply_lora(hf, rank=4, alpha=8, targets="q,v")  # rows of HF's Conv1D c_attn
    _lora_randomize_adapters(hf)
    save_adapter(hf, tmp_path / "a")
    hf2 = _lora_hf_gpt2(tmp_path / "second")[0]
    peft_model = PeftModel.from_pretrained(hf2, tmp_path / "a").eval()
    assert _lora_diff(_hf_logits(peft_model), _hf_logits(hf)) <= 1e-5
    merged = _hf_logits(merge_lora(hf))  # Conv1D stores W transposed: merge must transpose the update
    assert _lora_diff(merged, _hf_logits(peft_model)) <= 1e-5


def test_lora_bad_input_gives_clear_errors(tmp_path):
    _, d = _lora_hf_gpt2(tmp_path)
    model = GPT.from_pretrained(d)
    with pytest.raises(ValueError, match="unknown LoRA target 'qq'"):
        apply_lora(model, 4, 8, targets="q,qq")
    for rank in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            apply_lora(model, rank, 8)
    with pytest.raises(ValueError, match="GELU"):
        apply_lora(model, 4, 8, targets="gate")
    with pytest.raises(ValueError, match="overlap"):
        apply_lora(model, 4, 8, targets="c_attn,q")
    with pytest.raises(ValueError, match="last blocks"):
        apply_lora(model, 4, 8, layers=5)
    assert not lora.lora_layers(model)  # nothing half-applied
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    _, dl = _lora_hf_llama(tmp_path)
    llama = GPT.from_pretrained(dl)
    apply_lora(llama, 4, 8, targets="c_attn")
    with pytest.raises(ValueError, match="no PEFT equivalent on LLaMA"):
        save_adapter(llama, tmp_path / "y")
    # tied lm_head: merging would change the input embeddings too
    apply_lora(model, 4, 8, targets="lm_head")
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)


# NF4 (QLoRA's 4-bit base), against bitsandbytes' CPU implementation

from lora import NF4_CODEBOOK, NF4Linear, _absmax, _normal_float_codebook, nf4_dequantize, nf4_nbytes, nf4_quantize

# QLoRA / bitsandbytes' published NF4 table
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes' CPU NF4 kernels: the reference our plain-PyTorch NF4 must equal (test-only)."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (requirements-dev.txt) not installed")


def bnb_roundtrip(bnb_f, w, blocksize=64, compress_statistics=False):
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=compress_statistics)
    return packed, state, bnb_f.dequantize_4bit(packed, state)


# the codebook

def test_nf4_codebook_matches_published_table_and_bitsandbytes(bnb):
    """The table computed from its formula (lora._normal_float_codebook), against the published one."""
    assert NF4_CODEBOOK.dtype == torch.float32 and NF4_CODEBOOK.shape == (16,)
    torch.testing.assert_close(NF4_CODEBOOK, torch.tensor(PUBLISHED), rtol=0, atol=1e-6)
    # computed from the formula, it is even bit-identical to the table bitsandbytes ships
    assert torch.equal(NF4_CODEBOOK, bnb.get_4bit_type("nf4", device="cpu"))


def test_nf4_codebook_structure():
    c = NF4_CODEBOOK
    assert c[0] == -1 and c[-1] == 1 and c[7] == 0          # [-1, 1], exact zero
    assert (c[:7] < 0).all() and (c[8:] > 0).all()           # 7 negative, 8 positive
    assert (c[1:] > c[:-1]).all()                            # sorted
    # a different offset gives a different (still normalised) table: the offset really is used
    other = _normal_float_codebook(0.99)
    assert other[0] == -1 and other[-1] == 1 and not torch.allclose(other, c)


# quantise / dequantise vs bitsandbytes

CASES = [((256, 192), torch.float32), ((256, 192), torch.bfloat16), ((128, 96), torch.float16),
         ((33, 37), torch.float32),    # 1221 values: last block partial (5 of 64) and an odd count
         ((3, 100), torch.bfloat16)]   # 300 values: 4 full blocks + 44


def _nf4_exact(codes, absmax, shape, dtype, block_size=64):
    """Dequantisation by its definition, independent of both implementations: each code's table
    value times its block's absmax, in fp32, rounded once to the weight's dtype."""
    idx = torch.stack([codes >> 4, codes & 15], 1).view(-1)[: math.prod(shape)].long()
    blocks = torch.arange(idx.numel()) // block_size
    return (NF4_CODEBOOK[idx] * absmax.float()[blocks]).to(dtype).view(shape)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_nf4_roundtrip_matches_bitsandbytes(shape, dtype, bnb):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    q = nf4_quantize(w, block_size=64)
    packed, state, ref = bnb_roundtrip(bnb, w)
    # same packing: two codes per byte, the first value in the high nibble; same number of bytes
    assert torch.equal(q.codes, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    out = nf4_dequantize(q)
    assert out.shape == w.shape and out.dtype == dtype == ref.dtype
    assert torch.equal(out, _nf4_exact(packed.view(-1), state.absmax, shape, dtype))
    # and bitsandbytes' dequantisation, where it is right on every CPU. Its native CPU kernel, which
    # bitsandbytes 0.50 uses where torch reports AVX-512 (bitsandbytes/backends/cpu/ops.py), scales
    # values by the wrong block's absmax when a row is a multiple of 32 values but not of the block
    # (rows of 32, 96 or 160: off by up to 0.04 in the 128 x 96 case, every dtype; rows of 100, 37 or
    # 192 are right); elsewhere its pure-PyTorch path computes the definition. Its codes and absmax
    # (checked above) are right on every CPU.
    if shape[-1] % 64 == 0 or shape[-1] % 32 or torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert torch.equal(out, ref)
    # and the reconstruction error is what 4 bits give: ~|w|/10 on average
    assert (out.float() - w.float()).abs().mean() < 0.15 * w.float().abs().mean()


@pytest.mark.parametrize("block_size", [32, 128, 256])
def test_nf4_other_block_sizes_match_bitsandbytes(block_size, bnb):
    torch.manual_seed(1)
    w = torch.randn(64, 200)
    q = nf4_quantize(w, block_size=block_size)
    packed, _, ref = bnb_roundtrip(bnb, w, blocksize=block_size)
    assert torch.equal(q.codes, packed.view(-1))
    assert torch.equal(nf4_dequantize(q), ref)


def test_nf4_ties_and_special_values_match_bitsandbytes(bnb):
    # values exactly halfway between two table entries (after scaling by absmax = 1) go to the lower one
    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 31),   # block 1: ties
                   torch.zeros(64),                                          # block 2: all zero
                   torch.full((64,), -3.0)])                                 # block 3: constant
    q = nf4_quantize(w)
    packed, _, ref = bnb_roundtrip(bnb, w)
    assert torch.equal(q.codes, packed.view(-1))
    out = nf4_dequantize(q)
    assert torch.equal(out, ref.view(-1))                # (bitsandbytes' CPU kernel returns a 1-D input as 1 x n)
    assert (out[64:128] == 0).all() and (out[128:] == -3).all()
    codes = torch.stack([q.codes >> 4, q.codes & 15], 1).view(-1)
    assert torch.equal(codes[1:16].long(), torch.arange(15))               # mid i -> entry i (the lower)


def test_nf4_dequantize_to_other_dtype():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    q = nf4_quantize(w)
    assert nf4_dequantize(q, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(nf4_dequantize(q, torch.bfloat16), nf4_dequantize(q).bfloat16())


# double quantisation

@pytest.mark.parametrize("shape", [(256, 192), (1024, 1024), (33, 37)])
def test_nf4_double_quant_error(shape, bnb):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    plain, dq = nf4_quantize(w), nf4_quantize(w, double_quant=True)
    assert dq.absmax.dtype == torch.int8 and dq.absmax.numel() == plain.absmax.numel()
    assert torch.equal(dq.codes, plain.codes)           # the 4-bit codes use the exact absmax
    err_plain = (nf4_dequantize(plain) - w).abs().mean()
    err_dq = (nf4_dequantize(dq) - w).abs().mean()
    assert err_dq / err_plain - 1 < 0.01                 # < 1% more mean abs error
    # the 8-bit absmax: every block's scale within 1%, ~0.1% on average
    rel = (_absmax(dq) - plain.absmax).abs() / plain.absmax
    assert rel.max() < 0.01 and rel.mean() < 0.003
    # bitsandbytes' compress_statistics=True (8-bit "dynamic" table instead of linear int8)
    packed, _, ref = bnb_roundtrip(bnb, w, compress_statistics=True)
    assert torch.equal(dq.codes, packed.view(-1))
    err_bnb = (ref - w).abs().mean()
    assert err_bnb / err_plain - 1 < 0.01
    assert (err_dq - err_bnb).abs() < 0.002 * err_plain  # same error to within 0.2% (its table is not linear)
    assert (nf4_dequantize(dq) - ref).abs().max() < 0.01 * w.abs().max()


def test_nf4_double_quant_constant_absmax():
    w = torch.ones(4, 128)                               # every absmax is 1: zero spread, no 0/0
    assert torch.equal(nf4_dequantize(nf4_quantize(w, double_quant=True)), w)


# NF4Linear: the frozen 4-bit base layer

def make_layer(double_quant=True, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    return lin, NF4Linear.from_linear(lin, block_size=64, double_quant=double_quant)


@pytest.mark.parametrize("double_quant,bias", [(True, True), (False, False)])
def test_nf4_linear_forward_equals_dequantized_linear(double_quant, bias):
    lin, layer = make_layer(double_quant, bias)
    assert (layer.in_features, layer.out_features) == (96, 40)
    w = layer.weight
    assert w.shape == lin.weight.shape and w.dtype == lin.weight.dtype and w.device == lin.weight.device
    assert torch.equal(w, nf4_dequantize(nf4_quantize(lin.weight, 64, double_quant)))
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, w, lin.bias))
    y_full = lin(x)                                      # 4-bit weights: output within ~10% rms
    assert (y - y_full).pow(2).mean().sqrt() < 0.15 * y_full.pow(2).mean().sqrt()
    y.sum().backward()                                   # the input gets a gradient
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 5, 96))


def test_nf4_linear_autocast_bf16():
    lin, layer = make_layer()
    x = torch.randn(3, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    w16 = nf4_dequantize(layer.quantized(), torch.bfloat16)
    assert torch.equal(y, F.linear(x.bfloat16(), w16, lin.bias.bfloat16()))
    y.backward(torch.ones_like(y))                       # backward in bf16 too, gradient back in fp32
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (torch.ones(3, 40, dtype=torch.bfloat16) @ w16).float())
    # a bf16 input without autocast computes in bf16 as well
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_nf4_linear_saves_no_dequantized_weight_for_backward():
    """Autograd must not keep the 16/32-bit weight from forward to backward (it is rebuilt in backward)."""
    _, layer = make_layer()
    x = torch.randn(4, 96, requires_grad=True)

    def saved_shapes(f):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            f()
        return shapes

    assert (96, 40) in saved_shapes(lambda: F.linear(x, layer.weight))   # plain F.linear keeps W^T
    assert saved_shapes(lambda: layer(x)) == []


def test_nf4_linear_buffers_state_dict_and_to():
    _, layer = make_layer()
    assert list(layer.parameters()) == []                # frozen: nothing for an optimizer
    sd = layer.state_dict()
    assert set(sd) == {"codes", "absmax", "absmax_scale", "absmax_offset", "bias"}
    assert sd["codes"].dtype == torch.uint8 and sd["absmax"].dtype == torch.int8
    assert "weight" not in sd
    assert set(make_layer(double_quant=False)[1].state_dict()) == {"codes", "absmax", "bias"}
    # load into a layer made from another weight of the same shape
    other = NF4Linear.from_linear(torch.nn.Linear(96, 40))
    other.load_state_dict(sd)
    assert torch.equal(other.weight, layer.weight)
    # .to(bf16) casts the weight's (and bias') dtype but keeps the fp32 statistics exact
    w = layer.weight
    layer.to(torch.bfloat16)
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, w.bfloat16())
    layer.float()
    assert torch.equal(layer.weight, w)


def test_nf4_linear_under_lora_wrapper():
    """The project's LoRALinear reads base.weight.shape/device/dtype: it must wrap an NF4Linear."""
    _, layer = make_layer()
    wrapped = lora.LoRALinear(layer, rank=4, alpha=8)
    assert (wrapped.in_features, wrapped.out_features) == (96, 40)
    x = torch.randn(2, 96)
    assert torch.equal(wrapped(x), layer(x))            # B = 0: starts equal to the base
    wrapped(x).sum().backward()
    assert wrapped.lora_B.grad is not None and wrapped.lora_B.grad.abs().sum() > 0


# memory

def test_nf4_storage_bytes_4096():
    n = 4096 * 4096
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    plain = nf4_nbytes(nf4_quantize(w)) / n
    dq = nf4_nbytes(nf4_quantize(w, double_quant=True)) / n
    assert plain == 0.5 + 4 / 64                                   # 0.5625 byte/param
    assert dq == 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / n             # ~0.5159 byte/param
    assert dq / 2 <= 0.3 and plain / 2 <= 0.3                      # vs bf16's 2 bytes/param
    assert nf4_nbytes(NF4Linear(nf4_quantize(w, double_quant=True)).quantized()) / n == dq


def test_nf4_base_of_a_135m_model_is_under_0_3x_its_bf16_bytes():
    """QLoRA's memory claim on a model of over 100M parameters, from the tensors themselves: the frozen
    linear weights as NF4 (codes, 8-bit scales, their fp32 statistics) against the same weights in bf16."""
    from bench_memory import MemoryTracker

    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("llama-135m", block_size=32)).to(torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) > 100e6
    linears = [mod for mod in m.transformer.h.modules() if type(mod) is torch.nn.Linear]
    bf16 = sum(mod.weight.numel() * 2 for mod in linears)
    lora.quantize_nf4(m)
    nf4 = [mod for mod in m.transformer.h.modules() if isinstance(mod, NF4Linear)]
    assert len(nf4) == len(linears) and not any(type(mod) is torch.nn.Linear for mod in m.transformer.h.modules())
    four_bit = sum(b.numel() * b.element_size() for mod in nf4 for name, b in mod.named_buffers() if name != "bias")
    assert four_bit <= 0.3 * bf16  # 0.516 byte per weight with double quantisation: 0.258x
    apply_lora(m, 8, 16, 0.0, "q,v")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    with MemoryTracker(m, opt) as mt:  # a LoRA step: the model's own bytes stay the embeddings + 4-bit base
        with torch.autocast("cpu", torch.bfloat16):
            loss = m(torch.randint(0, 1000, (1, 16)), torch.randint(0, 1000, (1, 16)))[1]
        loss.backward()
        opt.step()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(m.parameters()) + list(m.buffers())}  # tied and viewed tensors counted once
    assert mt.peaks["parameters"] + mt.peaks["buffers"] == sum(storages.values())
    assert m.transformer.wte.weight.dtype == torch.bfloat16  # embeddings (tied head) stay 16-bit


def test_nf4_merge_into_the_dequantised_base_gives_the_trained_model(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=400)).save_pretrained(tmp_path / "base", format="native")
    m = lora.quantize_nf4(GPT.from_pretrained(tmp_path / "base"))
    apply_lora(m, 4, 8, 0.0, "q,v,down")
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)  # a trained adapter: B no longer zero
    save_adapter(m, tmp_path / "adapter", str(tmp_path / "base"))
    with pytest.raises(ValueError, match="merge --nf4"):
        merge_lora(m)
    x = torch.randint(0, 400, (2, 12))
    trained = m(x)[0]
    for flags in (["--nf4", "--out_dir", str(tmp_path / "merged"), "--precision", "fp32"],
                  ["--out", str(tmp_path / "merged16"), "--dtype", "float32"]):  # the former flags, aliases
        lora.main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")] + flags)
    nf4_merge, plain_merge = (GPT.from_pretrained(tmp_path / d)(x)[0] for d in ("merged", "merged16"))
    torch.testing.assert_close(nf4_merge, trained, atol=1e-5, rtol=1e-5)
    assert (plain_merge - trained).abs().max() > 100 * (nf4_merge - trained).abs().max()


def test_lora_merge_flags_and_their_former_names():
    parse = lora.build_parser().parse_args
    given = ["merge", "--base", "b", "--adapter", "a"]
    for new, old in ((["--out_dir", "o"], ["--out", "o"]), (["--precision", "bf16"], ["--dtype", "bfloat16"]),
                     (["--precision", "fp16"], ["--dtype", "float16"]), (["--precision", "fp32"], ["--dtype", "fp32"])):
        rest = [] if new[0] == "--out_dir" else ["--out_dir", "o"]
        assert vars(parse(given + new + rest)) == vars(parse(given + old + rest))
    assert parse(given + ["--out_dir", "o"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parse(given + ["--out_dir", "o", "--precision", "float64"])


# -----------------------------------------------------------------------------------------------
# finetune.py


def test_finetune_alpaca_templates_are_stanfords():
    # github.com/tatsu-lab/stanford_alpaca/blob/main/train.py, PROMPT_DICT
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nSay hi.\n\n### Response:")
    example = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert prepare_data.format_prompt(example) == with_input
    assert prepare_data.format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"}) == no_input


def test_finetune_loss_masking_eos_and_truncation(capsys):
    tok = _CharTok()
    ex = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    prompt = tok.encode(prepare_data.format_prompt(ex))
    full = prompt + tok.encode("hi there") + [tok.eot_id]
    t = finetune.tokenize_example(ex, tok, tok.eot_id, max_length=1000)
    assert t["input_ids"] == full[:-1]
    assert t["labels"] == [-100] * (len(prompt) - 1) + tok.encode("hi there") + [tok.eot_id]  # EOS is trained
    assert not t["truncated"] and t["n_response"] == 9
    t = finetune.tokenize_example(ex, tok, tok.eot_id, max_length=1000, mask_prompt=False)
    assert t["labels"] == full[1:]
    # too long: cut from the response end (EOS first), prompt labels still masked
    t = finetune.tokenize_example(ex, tok, tok.eot_id, max_length=len(prompt) + 3)
    assert t["truncated"] and t["input_ids"] == full[:len(prompt) + 3]
    assert t["labels"] == [-100] * (len(prompt) - 1) + tok.encode("hi th")[:4]
    # a prompt that fills the context leaves no response: reported, not trained on
    long = {"instruction": "x" * 300, "input": "", "output": "y"}
    kept = finetune.tokenize_examples([ex, long, ex], tok, tok.eot_id, max_length=200, name="train")
    assert len(kept) == 2
    out = capsys.readouterr().out
    assert "1 of 3 examples longer than 201 tokens were truncated" in out
    assert "1 example(s) left out because the prompt alone fills the context" in out and "[1]" in out


def test_finetune_grad_accumulation_4x1_equals_1x4_and_per_token_mean():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=128, block_size=256))
    model.train()
    tok = _CharTok()
    exs = [{"instruction": "Echo.", "input": "a" * k, "output": "b" * (3 * k + 1)} for k in (1, 4, 9, 2)]
    data = [finetune.tokenize_example(e, tok, tok.eot_id, 256) for e in exs]
    assert not any(d["truncated"] for d in data)

    def grads(micro):  # finetune's micro-steps: each micro-batch's mean loss, token_weighted, backward
        model.zero_grad()
        n_total = sum((t != -100).sum() for _, t in micro)
        loss = torch.zeros(())
        for idx, targets in micro:
            weighted = finetune.token_weighted(model(idx, targets)[1], (targets != -100).sum(), n_total)
            weighted.backward()
            loss += weighted.detach()
        return loss, n_total, {k: p.grad.clone() for k, p in model.named_parameters()}

    l4, n4, g4 = grads([finetune.collate(data, pad_id=0)])
    l1, n1, g1 = grads([finetune.collate([d], pad_id=0) for d in data])
    # reference: sum of every response token's cross-entropy / number of response tokens
    model.zero_grad()
    total = sum(F.cross_entropy(model(torch.tensor([d["input_ids"]]))[0][0], torch.tensor(d["labels"]),
                                ignore_index=-100, reduction="sum") for d in data)
    n_ref = sum(sum(x != -100 for x in d["labels"]) for d in data)
    (total / n_ref).backward()
    assert n4 == n1 == n_ref
    assert abs(l4 - l1) < 1e-5 and abs(l4 - total.item() / n_ref) < 1e-5
    for k, p in model.named_parameters():  # fp32; tolerance covers summation order only
        assert torch.allclose(g4[k], g1[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(g1[k], p.grad, rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("precision,lora_rank", [("fp16", 4), ("bf16", 4), ("fp16", 0)])
def test_finetune_half_precision_steps_on_cpu(tmp_path, precision, lora_rank):
    torch.manual_seed(0)
    dtype = lora.weight_dtype(precision, lora_rank > 0)
    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=128)).to(dtype)
    if lora_rank:
        assert dtype in (torch.float16, torch.bfloat16)  # frozen base in half precision
        apply_lora(model, lora_rank, 8, targets="all")
    else:
        assert dtype == torch.float32  # full fine-tuning keeps fp32 master weights
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # what GradScaler needs
    autocast, scaler = housekeeping.autocast_and_scaler(precision, "cpu")
    assert (scaler is not None) == (precision == "fp16")
    # finetune's own loop under autocast (and fp16's loss scaling): finite losses, and the steps change the model
    data = _ft_setup(tmp_path)
    finetune.main(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file",
                   str(data), "--out_dir", str(tmp_path / "out"), "--precision", precision, "--device", "cpu",
                   "--lora_rank", str(lora_rank), "--lora_targets", "all", "--lr", "1e-2", "--max_steps", "2",
                   "--eval_interval", "2", "--batch_size", "2", "--grad_accum", "2", "--num_samples", "0",
                   "--eval_examples", "4", "--no-save_merged"])
    rows = housekeeping.read_log(tmp_path / "out" / "log.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and r["n_tokens"] > 0 for r in steps)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 2 and evals[1] != evals[0], "the steps updated nothing (skipped by the scaler?)"


def _tiny_instruction_run(tmp_path, name: str, recs: list[dict], vocab_size: int) -> Path:
    """recs as an Alpaca jsonl (tmp_path/name), a bpe.py tokenizer trained on them (tmp_path/tok) and a tiny
    native GPT-2-style model of its vocabulary (tmp_path/model). Returns the jsonl's path."""
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = "\n".join(prepare_data.format_prompt(r) + r["output"] for r in recs)
    bpe.Tokenizer.train(text, vocab_size, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=vocab_size)).save_pretrained(tmp_path / "model", format="native")
    return data


def _ft_setup(tmp_path):
    """A tiny native GPT-2-style model, a bpe.py tokenizer trained on the data, an Alpaca jsonl."""
    rnd = random.Random(0)
    words = "red blue green cat dog sun tree big small fast".split()
    recs = []
    for i in range(48):
        a, b = rnd.sample(words, 2)
        recs.append({"instruction": f"Repeat {a} {b}.", "input": "" if i % 2 else "twice",
                     "output": f"{a} {b} {a} {b}"})
    return _tiny_instruction_run(tmp_path, "alpaca.jsonl", recs, 400)


@pytest.mark.parametrize("lora_args", [["--lora_rank", "0", "--lr", "3e-3"],
                                       ["--lora_rank", "8", "--lora_alpha", "16", "--lora_targets", "all",
                                        "--lr", "1e-2", "--grad_checkpointing"]])
def test_finetune_tiny_runs_reduce_val_loss(tmp_path, lora_args):
    data = _ft_setup(tmp_path)
    out = tmp_path / "out"
    finetune.main(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
                   "--data_file", str(data), "--out_dir", str(out), "--max_steps", "12", "--eval_interval", "6",
                   "--batch_size", "4", "--grad_accum", "2", "--val_frac", "0.15", "--num_samples", "2",
                   "--max_new_tokens", "6", "--lora_dropout", "0.0"] + lora_args)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and all("lr" in r for r in steps)
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert min(r["val_loss"] for r in evals[1:]) < evals[0]["val_loss"] - 0.05
    for f in ("config.json", "loss.png", "responses.jsonl", "responses.md", "best_model/gpt_config.json",
              "best_model/tokenizer.bpe", "best_model/tokenizer.json"):
        assert (out / f).exists(), f
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2 and {"response_before", "response_after", "output"} <= set(responses[0])
    best = GPT.from_pretrained(out / "best_model")  # merged (LoRA) or full weights, loadable as any model
    assert sum(p.numel() for p in best.parameters()) == sum(
        p.numel() for p in GPT.from_pretrained(tmp_path / "model").parameters())
    if lora_args[1] != "0":
        assert (out / "best_adapter" / "adapter_config.json").exists()


def test_finetune_says_the_time_left_and_when_answering_costs_more_than_training(tmp_path, capsys):
    """Every step line has the time per step and the time left; after 5 steps, the whole run's estimate; on
    a run whose answers before and after cost more than its training (5 steps: none left to train), a note
    names --num_samples. Without answers, no note."""
    data = _ft_setup(tmp_path)
    common = ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file",
              str(data), "--max_steps", "5", "--batch_size", "2", "--grad_accum", "1", "--log_interval", "1",
              "--max_new_tokens", "4", "--lora_rank", "4", "--no-save_merged"]
    finetune.main(common + ["--out_dir", str(tmp_path / "a"), "--num_samples", "3"])
    out = capsys.readouterr().out
    assert regex.search(r"step 5/5: loss [\d.]+, lr .*, [\d.]+ s/step, \d+ s left", out), out
    assert out.count("the whole run: about ") == 1
    assert regex.search(r"note: answering the 3 held-out prompts before and after takes about \d+ s, more than "
                        r"the training left \(0 s\): --num_samples N makes it smaller", out), out
    finetune.main(common + ["--out_dir", str(tmp_path / "b"), "--num_samples", "0"])
    assert "note: answering" not in capsys.readouterr().out


def test_finetune_lora_on_an_nf4_base_lowers_val_loss_like_on_the_full_base(tmp_path, capsys):
    data = _ft_setup(tmp_path)
    evals = {}
    for q in ("none", "nf4"):
        finetune.main(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
                       "--data_file", str(data), "--out_dir", str(tmp_path / q), "--max_steps", "12",
                       "--eval_interval", "6", "--batch_size", "4", "--grad_accum", "2", "--val_frac", "0.15",
                       "--num_samples", "0", "--lora_rank", "8", "--lora_alpha", "16", "--lora_targets", "all",
                       "--lr", "1e-2", "--lora_dropout", "0.0", "--quantize", q])
        rows = [json.loads(line) for line in (tmp_path / q / "log.jsonl").read_text().splitlines()]
        evals[q] = [r["val_loss"] for r in rows if "val_loss" in r]
    for q, v in evals.items():
        assert min(v[1:]) < v[0] - 0.05, (q, v)
    assert evals["nf4"][0] == pytest.approx(evals["none"][0], rel=0.02)  # the 4-bit base: nearly the same model
    assert (tmp_path / "nf4" / "best_adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "nf4" / "best_model").exists() and "merge --nf4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--quantize nf4 is QLoRA"):
        finetune.finetune(finetune.FinetuneConfig(init_from=str(tmp_path / "model"), data_file=str(data),
                                                  tokenizer=str(tmp_path / "tok"), out_dir=str(tmp_path / "x"),
                                                  quantize="nf4", lora_rank=0))


def test_finetune_bad_data_and_flags_give_clear_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field 'output'"):
        prepare_data.load_alpaca(f)
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        prepare_data.load_alpaca(f)
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        prepare_data.load_alpaca(f)
    g = tmp_path / "d.json"
    g.write_text(json.dumps([{"instruction": "a", "output": 3}]))
    with pytest.raises(ValueError, match=r"example 0: field 'output' must be a string"):
        prepare_data.load_alpaca(g)
    g.write_text(json.dumps([{"instruction": "a", "output": "x" * 10}]))
    with pytest.raises(ValueError, match="no examples left"):
        prepare_data.load_alpaca(g, max_response_chars=5)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--lora_rank", "-1"])
    with pytest.raises(ValueError, match="unknown LoRA target"):
        finetune.prepare_model(GPT(GPTConfig.preset("tiny-gpt2")),
                               finetune.parse_args(["--init_from", "gpt2", "--lora_targets", "q,w"]))


def test_finetune_split_is_deterministic_and_filters_apply(tmp_path):
    g = tmp_path / "d.json"
    g.write_text(json.dumps([{"instruction": str(i), "input": "", "output": "y" * (i % 7)} for i in range(100)]))
    ex = prepare_data.load_alpaca(g, max_response_chars=5, max_examples=40)
    assert len(ex) == 40 and all(len(e["output"]) <= 5 for e in ex)
    assert [e["instruction"] for e in ex[:3]] == ["0", "1", "2"]  # the first N after filtering
    a = finetune.split_examples(ex, 0.1, 0.2, seed=7)
    assert a == finetune.split_examples(ex, 0.1, 0.2, seed=7) and [len(s) for s in a] == [28, 4, 8]
    assert sorted(e["instruction"] for s in a for e in s) == sorted(e["instruction"] for e in ex)


def test_finetune_help_lists_every_flag_and_imports_have_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import lora, finetune; finetune.main(['--help'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:")  # importing printed nothing
    assert list(tmp_path.iterdir()) == []  # and wrote nothing
    for flag in ("--init_from", "--data_file", "--lora_rank", "--lora_alpha", "--lora_dropout", "--lora_targets",
                 "--batch_size", "--grad_accum", "--grad_checkpointing", "--precision", "--optimizer", "--lr",
                 "--max_steps", "--eval_interval", "--out_dir", "--patience", "--train_last_n_blocks"):
        assert flag in r.stdout, flag


def test_finetune_dialogue_masks_train_only_assistant_turns():
    turns = prepare_data.parse_dialogue(HH_TEXT)
    assert [r for r, _ in turns] == ["Human", "Assistant", "Human", "Assistant"]
    assert turns[3][1] == " Quoting Human: is fine.\nHuman: still me, the assistant."  # no "\n\n": not a turn
    assert prepare_data.format_dialogue(turns) == HH_TEXT
    t = finetune.tokenize_dialogue(HH_TEXT, _HHCharTok(), 0, max_length=1000)
    trained = "".join(chr(x) if x else "<eos>" for x in t["labels"] if x != -100)
    assert trained == " It is 4." + " Quoting Human: is fine.\nHuman: still me, the assistant." + "<eos>"
    # the labels are the next tokens: input position p carries token p + 1
    full = [ord(c) for c in HH_TEXT] + [0]
    assert t["input_ids"] == full[:-1]
    assert all(lab in (-100, full[p + 1]) for p, lab in enumerate(t["labels"]))
    whole = finetune.tokenize_dialogue(HH_TEXT, _HHCharTok(), 0, max_length=1000, mask_prompt=False)
    assert sum(x != -100 for x in whole["labels"]) > sum(x != -100 for x in t["labels"])
    ex = prepare_data.dialogue_example(HH_TEXT, "x")
    assert prepare_data.format_prompt(ex) == "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And the word " \
                                         "Human: here?\n\nAssistant:"
    assert ex["output"].startswith("Quoting Human:")
    with pytest.raises(ValueError, match="no '.*Assistant:' turn"):
        prepare_data.parse_dialogue("\n\nHuman: only me")
    with pytest.raises(ValueError, match="text before the first"):
        prepare_data.parse_dialogue("hello\n\nHuman: x\n\nAssistant: y")


def test_finetune_dialogue_bad_input_and_cli(tmp_path, capsys):
    import bpe

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": HH_TEXT}) + "\n" + json.dumps({"rejected": HH_TEXT}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'chosen'"):
        prepare_data.load_dialogues(bad)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "poetry"])
    assert "argument --task: invalid choice: 'poetry'" in capsys.readouterr().err
    rnd = random.Random(0)
    words = "red blue green cat dog sun tree big small fast".split()
    rows = [{"chosen": f"\n\nHuman: repeat {a}\n\nAssistant: {a} {a}\n\nHuman: again\n\nAssistant: {a}"}
            for a in (rnd.choice(words) for _ in range(40))]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_data.main(["hh", "--data_file", str(data), "--out_dir", str(tmp_path / "d")])
    assert (tmp_path / "d" / "hh" / "train.jsonl").read_text() == data.read_text()
    tok = bpe.Tokenizer.train("".join(r["chosen"] for r in rows), 300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("why is the sky blue\ncat\n")
    finetune.main(["--task", "dialogue", "--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
                   "--data_file", str(data), "--out_dir", str(out), "--max_steps", "10", "--eval_interval", "5",
                   "--batch_size", "4", "--grad_accum", "1", "--lora_rank", "0", "--lr", "3e-3", "--num_samples", "2",
                   "--max_new_tokens", "4", "--val_frac", "0.2", "--save_interval", "4", "--score_every_eval",
                   "--reward_model", str(_tiny_reward_model(tmp_path / "rm")), "--prompts", str(prompts)])
    assert sorted(p.name for p in out.glob("ckpt_step*")) == ["ckpt_step4", "ckpt_step8"]
    assert GPT.from_pretrained(out / "ckpt_step8").config.n_layer == 2
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05
    assert all(math.isfinite(r["reward_mean"]) and "reward_stderr" in r for r in evals)  # scored every eval
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert responses[0]["prompt"].endswith("\n\nHuman: again\n\nAssistant:")


def test_finetune_classifier_last_token_pooling_left_and_right_padding():
    torch.manual_seed(0)
    clf = finetune.Classifier(GPT(GPTConfig.preset("tiny-llama", vocab_size=64)), 3).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11]
    alone = torch.cat([clf(torch.tensor([a]))[0], clf(torch.tensor([b]))[0]])
    right = torch.tensor([a, b + [0, 0, 0]])
    mask_r = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    left = torch.tensor([a, [0, 0, 0] + b])
    mask_l = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    assert torch.allclose(clf(right, attention_mask=mask_r)[0], alone, atol=1e-5)
    assert torch.allclose(clf(left, attention_mask=mask_l)[0], alone, atol=1e-5)
    # the training path: the label sits at the last real token of a right-padded collate batch
    ex = [dict(input_ids=a, labels=[-100] * 4 + [2]), dict(input_ids=b, labels=[-100, 1])]
    idx, targets = finetune.collate(ex, 0)
    logits, loss = clf(idx, targets)
    assert torch.allclose(logits, alone, atol=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(alone, torch.tensor([2, 1])).item(), abs=1e-5)


def test_finetune_classifier_learns_and_bad_labels(tmp_path, capsys):
    import bpe

    rnd = random.Random(0)
    words = "red blue green cat dog sun tree big small fast slow old new".split()
    rows = []
    for _ in range(240):  # the class: does the text mention "dog"? (about 1 in 3 do)
        ws = [rnd.choice(words) for _ in range(6)]
        if rnd.random() < 0.35:
            ws[rnd.randrange(6)] = "dog"
        else:
            ws = [w if w != "dog" else "cat" for w in ws]
        rows.append({"text": " ".join(ws), "label": int("dog" in ws)})
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bpe.Tokenizer.train(" ".join(words) * 20, 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    cfg = finetune.parse_args(["--task", "classify", "--init_from", str(tmp_path / "model"), "--tokenizer",
                               str(tmp_path / "tok"), "--data_file", str(data), "--out_dir", str(tmp_path / "out"),
                               "--num_classes", "2", "--lora_rank", "8", "--lora_targets", "all", "--lr", "1e-2",
                               "--max_steps", "60", "--eval_interval", "30", "--batch_size", "8", "--grad_accum", "1",
                               "--val_frac", "0.15", "--test_frac", "0.25", "--lora_dropout", "0.0"])
    res = finetune.finetune(cfg)
    last = [r for r in res["log"] if "test_accuracy" in r][-1]
    test = finetune.split_examples(prepare_data.load_classification(data), 0.15, 0.25, cfg.seed)[2]
    majority = max(sum(e["label"] == c for e in test) for c in (0, 1)) / len(test)
    assert last["test_accuracy"] >= majority + 0.15 and last["test_macro_f1"] > 0.7
    for f in ("best_adapter/adapter_config.json", "best_adapter/classifier_head.safetensors", "loss.png", "log.jsonl",
              "summary.json"):
        assert (tmp_path / "out" / f).exists(), f
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,1\nbroken,3\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: label 3 is outside 0..1"):
        prepare_data.load_classification(bad, num_classes=2)
    balanced = prepare_data.load_classification(data, balance=True)
    assert sum(e["label"] for e in balanced) * 2 == len(balanced)


def test_finetune_laptop_run_keeps_its_examples_when_the_step_grows(tmp_path, monkeypatch, capsys):
    """The design card's `python finetune.py --lora_rank 16 --grad_accum 8` on a laptop: with the offline
    defaults a step of 8 micro-batches kept the 1,800 steps, 8 times the work (an hour). The laptop run's
    budget is its examples, as pretraining's is its tokens: 8 times the examples a step, 1/8 the steps."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "cpu" / "model").mkdir(parents=True)
    (tmp_path / "out" / "cpu" / "model" / "gpt_config.json").write_text("{}")  # train_gpt2.py's model is here
    monkeypatch.setattr(finetune, "builtin_tasks", lambda: {"instructions": "i.jsonl", "instructions_test": "t.jsonl",
                                                          "dialogues": "d.jsonl", "classes": "c.jsonl"})
    laptop = finetune.LAPTOP
    cfg = finetune.parse_args([])
    assert (cfg.max_steps, cfg.batch_size, cfg.grad_accum) == (laptop["max_steps"], 16, 1)
    cfg = finetune.parse_args(["--lora_rank", "16", "--grad_accum", "8"])
    assert cfg.max_steps == laptop["max_steps"] // 8 and cfg.eval_interval == laptop["eval_interval"] // 8
    assert cfg.batch_size * cfg.grad_accum * cfg.max_steps == 16 * laptop["max_steps"]
    assert "keeps its 28,800 examples in 225 steps" in capsys.readouterr().out
    assert finetune.parse_args(["--grad_accum", "8", "--max_steps", "50"]).max_steps == 50  # given: kept


# -----------------------------------------------------------------------------------------------
# dpo.py


def test_dpo_loss_hand_computed_values():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    z = torch.tensor([(-1 + 3) - (-1.5 + 2), (-2 + 1.5) - (-2 + 2)])  # [1.5, -0.5]
    beta = 0.5
    losses, cr, rw = dpo.dpo_loss(pc, pr, rc, rr, beta=beta)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    assert torch.allclose(losses, torch.tensor([-math.log(sig(beta * v)) for v in z.tolist()]), atol=1e-6)
    assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rw, beta * (pr - rr))
    ls = 0.2
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    want = [-(1 - ls) * math.log(sig(beta * v)) - ls * math.log(sig(-beta * v)) for v in z.tolist()]
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6)
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert torch.allclose(losses, torch.tensor([(v - 1 / (2 * beta)) ** 2 for v in z.tolist()]), atol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_dpo_policy_equal_reference_is_ln2_and_ties_are_not_correct():
    c, r = torch.tensor([-4.0, -2.0, -7.0]), torch.tensor([-3.0, -9.0, -1.0])
    losses, cr, rr = dpo.dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    m = dpo.pair_metrics(losses, cr, rr, c, r)
    assert m["reward_accuracy"].item() == 0.0 and m["reward_margin"].item() == 0.0  # ties count as not correct
    m = dpo.pair_metrics(losses, torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]), c, r)
    assert m["reward_accuracy"].item() == pytest.approx(1 / 3)


def test_dpo_split_hh_pair_and_load_pairs_errors(tmp_path, capsys):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say Human: x\n\nAssistant: Sure, Human: x."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say Human: x\n\nAssistant: No."
    p, c, r = prepare_data.split_hh_pair(chosen, rejected)
    assert p == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say Human: x\n\nAssistant:"
    assert (c, r) == (" Sure, Human: x.", " No.")
    # responses sharing their first words: the prompt still ends at the last shared Assistant marker
    pair = prepare_data.split_hh_pair("\n\nHuman: a\n\nAssistant: The cat", "\n\nHuman: a\n\nAssistant: The dog")
    assert pair[1] == " The cat"
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n"
                 + json.dumps({"prompt": "Q:", "chosen": " a", "rejected": " b"}) + "\n\n"
                 + json.dumps({"prompt": "Q:", "chosen": " a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: missing field 'rejected'"):
        prepare_data.load_pairs(f)
    f.write_text(json.dumps({"prompt": "Q:", "chosen": " a", "rejected": " b"}) + "\n{bad\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not valid JSON"):
        prepare_data.load_pairs(f)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        prepare_data.load_pairs(tmp_path / "nope.jsonl")
    tok = load_tokenizer("gpt2") if (SHARED / "gpt2.tiktoken").exists() else None
    if tok is None:
        pytest.skip("../shared/data/gpt2.tiktoken absent: truncation checks need GPT-2's tokenizer")
    pairs = [{"prompt": "Q:", "chosen": " same", "rejected": " same"},
             {"prompt": "word " * 50, "chosen": " yes " * 20, "rejected": " no"}]
    out = dpo.tokenize_pairs(pairs, tok, tok.eot_id, max_length=30, max_prompt_length=10)
    assert "1 pair(s) with identical" in capsys.readouterr().out
    assert len(out) == 1 and len(out[0]["prompt"]) == 10 and tok.decode(out[0]["prompt"]).endswith("word ")
    assert len(out[0]["prompt"]) + len(out[0]["chosen"]) == 30 and out[0]["rejected"][-1] == tok.eot_id


def test_dpo_masking_only_response_tokens_count():
    batch = [{"prompt": [5, 6, 7], "chosen": [8, 9, 1], "rejected": [10, 1]},
             {"prompt": [4], "chosen": [3, 1], "rejected": [2, 2, 2, 1]}]
    idx, labels = dpo.collate_pairs(batch, pad_id=0)
    assert idx.shape == (4, 5)
    assert labels[0].tolist() == [-100, -100, 8, 9, 1] and labels[2].tolist() == [-100, -100, 10, 1, -100]
    assert labels[3].tolist() == [2, 2, 2, 1, -100]
    # each token's log p, as DPO gets it from the model (ChunkedCrossEntropy, reduction "none"), equals a
    # direct log-softmax; prompt and padding positions count 0 whatever their logits
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 12)

    def logp(lg):  # each row's summed log-probability of its labels, through the chunked cross-entropy
        return -model_py.ChunkedCrossEntropy.apply(lg.reshape(20, 12), labels.reshape(-1), -100, "none").view(4, 5).sum(-1)

    ref = torch.stack([F.log_softmax(logits[i], -1)[labels[i] != -100].gather(
        1, labels[i][labels[i] != -100][:, None]).sum() for i in range(4)])
    assert torch.allclose(logp(logits), ref)
    noisy = logits.clone()
    noisy[labels == -100] += 100 * torch.randn_like(noisy[labels == -100])  # prompt and padding positions
    assert torch.allclose(logp(noisy), ref)


def _dpo_tiny_policy(lora=True):
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=64, dropout=0.0))
    if lora:
        apply_lora(m, 4, 8, 0.0, "q,v")
        for name, p in m.named_parameters():  # non-zero B: the policy differs from its reference
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return m


def _dpo_tiny_pairs(n, seed):
    """A learnable preference: the chosen response repeats the prompt's last token, the rejected
    one does not."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        p = [g.randrange(2, 64) for _ in range(6)]
        other = g.choice([t for t in range(2, 64) if t != p[-1]])
        out.append({"prompt": p, "chosen": [p[-1], p[-1], 1], "rejected": [other, other, 1]})
    return out


def _dpo_backward(policy, ref, micro, cfg):
    """dpo.train's micro-batch loop: each micro-batch's loss divided by their number, backward; the
    step's metrics (device tensors)."""
    sums = {}
    for idx, labels, keys in micro:
        loss, metrics = dpo.micro_batch_loss(policy, ref, idx, labels, keys, cfg)
        (loss / len(micro)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v / len(micro)
    return sums


def test_dpo_three_reference_modes_same_loss_and_gradients():
    pairs = _dpo_tiny_pairs(4, 0)
    keys = [dpo.pair_key(t) for t in pairs]
    idx, labels = dpo.collate_pairs(pairs, 0)
    cfg = dpo.DPOConfig(beta=0.1)
    results = {}
    for mode in ("copy", "adapter_off", "precomputed"):
        policy = _dpo_tiny_policy()  # LoRA with B != 0: as after some training
        ref = dpo.Reference(mode, policy)
        if mode == "copy":
            for m in ref.model.modules():  # the copy stands for the starting model: adapters contribute 0
                if isinstance(m, lora.LoRALinear):
                    m.scaling = 0.0
        if mode == "precomputed":
            dpo.precompute_reference(ref, pairs, keys, 0, "cpu", 2, None, "t")
        policy.train()
        m = _dpo_backward(policy, ref, [(idx, labels, keys)], cfg)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results[mode] = (m["loss"].item(), grads)
    loss0, g0 = results["copy"]
    assert loss0 != pytest.approx(math.log(2), abs=1e-4)  # the policy really differs from the reference
    for mode in ("adapter_off", "precomputed"):  # same to 1e-6 (fp32; only summation order may differ)
        loss, g = results[mode]
        assert loss == pytest.approx(loss0, abs=1e-6)
        assert g.keys() == g0.keys() and all(torch.allclose(g[k], g0[k], atol=1e-6) for k in g)


def test_dpo_rpo_alpha_adds_the_chosen_tokens_mean_nll():
    """--rpo_alpha a: the gradient of DPO + a x the mean NLL over all chosen response tokens (computed
    here with F.cross_entropy on the chosen rows alone); responses of different lengths."""
    pairs = _dpo_tiny_pairs(4, 1)
    pairs[0]["chosen"], pairs[1]["rejected"] = pairs[0]["chosen"][1:], pairs[1]["rejected"] + [5, 1]
    keys = [dpo.pair_key(t) for t in pairs]
    idx, labels = dpo.collate_pairs(pairs, 0)
    def grads(alpha, by_hand=0.0):
        policy = _dpo_tiny_policy()
        ref = dpo.Reference("copy", _dpo_tiny_policy(lora=False))
        policy.train()
        _dpo_backward(policy, ref, [(idx, labels, keys)], dpo.DPOConfig(beta=0.1, rpo_alpha=alpha))
        if by_hand:  # the SFT term by hand: token-mean cross-entropy of the chosen rows
            logits, _ = policy(idx[:4], labels[:4])
            (by_hand * F.cross_entropy(logits.flatten(0, 1), labels[:4].flatten(), ignore_index=-100)).backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    with_rpo, by_hand, plain = grads(0.7), grads(0.0, by_hand=0.7), grads(0.0)
    assert with_rpo.keys() == by_hand.keys()
    assert all(torch.allclose(with_rpo[k], by_hand[k], atol=1e-6) for k in with_rpo)
    assert not all(torch.allclose(with_rpo[k], plain[k], atol=1e-4) for k in with_rpo)


def test_dpo_learns_a_preference_rule_on_held_out_pairs():
    torch.manual_seed(0)
    policy = _dpo_tiny_policy(lora=False)
    train_p, test_p = _dpo_tiny_pairs(256, 1), _dpo_tiny_pairs(64, 2)
    tk = [dpo.pair_key(t) for t in train_p]
    vk = [dpo.pair_key(t) for t in test_p]
    ref = dpo.Reference("copy", policy)
    null = __import__("contextlib").nullcontext
    before = dpo.evaluate_pairs(policy, ref, test_p, vk, 0, "cpu", 32, null)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    cfg = dpo.DPOConfig(beta=0.5)
    policy.train()
    for step in range(60):
        s = (step * 16) % 256
        idx, labels = dpo.collate_pairs(train_p[s:s + 16], 0)
        _dpo_backward(policy, ref, [(idx, labels, tk[s:s + 16])], cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = dpo.evaluate_pairs(policy, ref, test_p, vk, 0, "cpu", 32, null)
    assert before["val_reward_accuracy"] == 0.0  # policy == reference: all ties
    assert after["val_reward_accuracy"] >= 0.85 and after["val_loss"] < math.log(2) - 0.1


def test_dpo_cli_end_to_end_with_precomputed_cache(tmp_path, capsys):
    import bpe

    rnd = random.Random(0)
    words = "red blue green cat dog sun tree big small fast".split()
    rows = []
    for i in range(24):
        a, b = rnd.sample(words, 2)
        rows.append({"chosen": f"\n\nHuman: say {a}\n\nAssistant: {a} {a}",
                     "rejected": f"\n\nHuman: say {a}\n\nAssistant: {b} {b}"})
    rows.append({"prompt": "x", "chosen": " same", "rejected": " same"})
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bpe.Tokenizer.train("".join(r["chosen"] + r["rejected"] for r in rows), 300,
                        special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    args = ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
            "--out_dir", str(tmp_path / "out"), "--reference", "precomputed", "--lora_rank", "4",
            "--max_steps", "4", "--eval_interval", "2", "--batch_size", "2", "--grad_accum", "2",
            "--num_samples", "1", "--max_new_tokens", "4", "--val_frac", "0.2", "--warmup_steps", "1"]
    dpo.main(args)
    out = capsys.readouterr().out
    assert "identical chosen and rejected" in out and "reference log-probs: 25 computed" not in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "reward_accuracy", "reward_margin"} <= set(r) for r in steps)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy == reference
    for f in ("loss.png", "samples.md", "adapter/adapter_config.json", "ref_logps.json"):
        assert (tmp_path / "out" / f).exists(), f
    prepare_data.main(["hh_pairs", "--data_file", str(data), "--out_dir", str(tmp_path / "d")])
    written = prepare_data.load_pairs(tmp_path / "d" / "hh_pairs" / "train.jsonl")
    assert len(written) == 25 and written[0]["prompt"].endswith("\n\nAssistant:")
    assert written[0]["chosen"].startswith(" ") and "Human" not in written[0]["chosen"]
    with pytest.raises(ValueError, match="holds a run .* --resume .* --overwrite"):
        dpo.main(args)  # a fresh run never overwrites another
    dpo.main(args + ["--resume"])  # a resumed run reuses the cached reference log-probs
    assert "0 computed, 24 from" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dpo.main(args + ["--reference", "twin"])
    assert "argument --reference: invalid choice: 'twin'" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------
# rl.py


def _rl_tiny_policy(vocab=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny-gpt2", vocab_size=vocab))


def _rl_logp_by_hand(policy, prompt, answer):
    """log pi(answer | prompt), one unpadded sequence, from the whole log-softmax: the sum over the answer's
    tokens of log p(token | everything before it)."""
    seq = torch.tensor([prompt + answer])
    logits, _ = policy(seq)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(answer))


def test_rl_advantages_masks_and_loss_against_a_computation_by_hand():
    """A hand-made batch: 2 prompts of different lengths (left padding) x G = 3 answers, EOS (id 1) mid-answer
    in some (what follows it is padding), one group with equal rewards. The advantages, the answer mask and
    the loss match a computation by hand, and the loss's gradient is REINFORCE's: -(1/N) sum_i A_i grad log
    pi(answer_i), each log pi computed on the unpadded sequence alone."""
    eos = 1
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, equal = rl.group_advantages(rewards)
    assert advantages.flatten().tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    assert equal.tolist() == [False, True]  # all right: nothing to learn from this group
    scaled, _ = rl.group_advantages(rewards, scale=True)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # the unbiased (n - 1) standard deviation
    assert scaled[0].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)] + [
        (-1 / 3) / (std + 1e-4)])
    assert scaled[1].tolist() == [0.0, 0.0, 0.0]

    prompts = [[5, 6, 7], [8, 9]]
    answers = [[10, 11, eos, eos], [12, eos, eos, eos], [13, 14, 15, 16],  # the last: cut at the limit
               [17, 18, 19, eos], [eos, eos, eos, eos], [20, eos, eos, eos]]  # an empty answer: its EOS alone
    ids, prompt_mask = rl.prompt_batch(prompts, 3, eos, "cpu")
    assert ids[3:, 0].tolist() == [eos] * 3 and prompt_mask[3:, 0].tolist() == [0] * 3  # left padding
    seqs = torch.cat([ids, torch.tensor(answers)], dim=1)
    idx, targets, attention_mask, mask = rl.rollout_tensors(seqs, prompt_mask, 3, eos)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert targets[0].tolist() == [-100, -100, 10, 11, eos, -100] and targets[4].tolist() == [-100] * 2 + [eos] + [
        -100] * 3
    assert attention_mask[3].tolist() == [0, 1, 1, 1, 1, 1]

    policy = _rl_tiny_policy()
    A = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.5, -0.25, -0.25])  # non-zero in both groups: every row counts
    logps, _ = rl.answer_logps(policy, idx, targets, attention_mask, 3)
    per_token, kl = rl.grpo_token_loss(logps, logps.detach(), A, clip_eps=0.2)
    N = mask.sum()
    loss = (per_token * mask).sum() / N
    lengths = mask.sum(1)
    assert N == 16 and kl is None
    assert loss.item() == pytest.approx(-(A * lengths).sum().item() / 16, abs=1e-6)  # ratio 1: the loss is -A
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    reinforce = 0
    for i in range(6):
        answer = answers[i][: int(lengths[i])]
        reinforce = reinforce - A[i] * _rl_logp_by_hand(policy, prompts[i // 3], answer) / 16
    reinforce.backward()
    for name, p in policy.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name
    # the answers' log-probs themselves, batched and padded, equal the unpadded ones
    for i in range(6):
        answer = answers[i][: int(lengths[i])]
        assert logps[i, : len(answer)].sum().item() == pytest.approx(
            _rl_logp_by_hand(policy, prompts[i // 3], answer).item(), abs=1e-5)


def test_rl_clipped_ratio_and_k3_kl_against_their_formulas():
    torch.manual_seed(0)
    logps, old, ref = (torch.randn(4, 5) - 2 for _ in range(3))
    A = torch.tensor([1.0, -1.0, 0.5, 0.0])
    eps, beta = 0.2, 0.1
    per_token, kl = rl.grpo_token_loss(logps, old, A, eps, ref, beta)
    for i in range(4):
        for t in range(5):
            ratio = math.exp(logps[i, t].item() - old[i, t].item())
            a = A[i].item()
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            q = ref[i, t].item() - logps[i, t].item()
            k3 = math.exp(q) - q - 1
            assert kl[i, t].item() == pytest.approx(k3, rel=1e-5)
            assert per_token[i, t].item() == pytest.approx(-min(ratio * a, clipped * a) + beta * k3,
                                                           rel=1e-5, abs=1e-6)
    no_clip, _ = rl.grpo_token_loss(logps, old, A, 0.0)
    assert torch.allclose(no_clip, -torch.exp(logps - old) * A[:, None])
    # k3's mean over tokens sampled from pi estimates KL(pi || pi_ref), and is never negative
    p = torch.softmax(torch.randn(6), 0)
    p_ref = torch.softmax(torch.randn(6), 0)
    tokens = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(0))
    _, k3 = rl.grpo_token_loss(p.log()[tokens][None], p.log()[tokens][None], torch.zeros(1), 0.2,
                               p_ref.log()[tokens][None], 1.0)
    assert (k3 >= 0).all() and k3.mean().item() == pytest.approx((p * (p / p_ref).log()).sum().item(), rel=0.02)


def test_rl_loss_equals_trl_grpo_dapo_loss(tmp_path):
    """One batch, scored by TRL's GRPOTrainer (loss_type "dapo": token-level normalisation, clipped ratio,
    k3 KL with beta) on a tiny HF GPT-2, and by rl.py on the same weights read as our GPT: the same loss.
    Prompts of one length (HF's GPT-2 numbers positions from 0 whatever the mask says); answers padded
    after an EOS mid-answer."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(30)]
    tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                               eos_token_id=1, pad_token_id=0)).save_pretrained(tmp_path / "hf")
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type="dapo", beta=0.05, epsilon=0.2, num_generations=2,
                      per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False)
    trainer = GRPOTrainer(model=str(tmp_path / "hf"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "w1 w2"}] * 4),
                          processing_class=PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf"))
    trainer.model.eval()  # no dropout; TRL's eval mode: the loss over this batch alone
    eos = 1
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 32, (4, 3), generator=g)
    answers = torch.randint(2, 32, (4, 5), generator=g)
    answers[1, 2] = eos
    answers[1, 3:] = eos  # ours: generate fills a finished row with EOS; TRL's: with pad, masked out
    advantages = torch.tensor([0.5, -0.5, 1.0, -1.0])
    ref_logps = torch.randn(4, 5, generator=g) - 3
    seqs = torch.cat([prompts, answers], dim=1)
    idx, targets, attention_mask, mask = rl.rollout_tensors(seqs, None, 3, eos)
    trl_answers = answers.masked_fill(mask == 0, 0)
    inputs = dict(prompt_ids=prompts, prompt_mask=torch.ones_like(prompts), completion_ids=trl_answers,
                  completion_mask=mask.long(), advantages=advantages, old_per_token_logps=None,
                  ref_per_token_logps=ref_logps, num_items_in_batch=mask.sum())
    expected = trainer.compute_loss(trainer.model, inputs)
    policy = GPT.from_pretrained(tmp_path / "hf").eval()
    logps, _ = rl.answer_logps(policy, idx, targets, attention_mask, 3)
    per_token, _ = rl.grpo_token_loss(logps, logps.detach(), advantages, 0.2, ref_logps * mask, 0.05)
    loss = (per_token * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_rl_dynamic_sampling_trains_on_the_groups_whose_rewards_differ_first():
    """DAPO's dynamic sampling picks, of the groups drawn, those whose rewards differ (advantage != 0) in the
    order drawn, then groups with equal rewards only if too few differ."""
    rewards = torch.tensor([[1.0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1]])
    _, equal = rl.group_advantages(rewards)
    assert equal.tolist() == [True, False, True, False, True, False]
    groups, rows = rl.keep_groups(equal, 2, 3)
    assert groups.tolist() == [1, 3] and rows.tolist() == [3, 4, 5, 9, 10, 11]  # group g: rows 3g, 3g + 1, 3g + 2
    assert rewards.flatten()[rows].tolist() == [0, 1, 0, 1, 0, 0]  # the kept groups' own answers
    groups, _ = rl.keep_groups(equal, 4, 3)
    assert groups.tolist() == [1, 3, 5, 0]  # three differ: the first equal one fills
    assert rl.keep_groups(torch.ones(3, dtype=torch.bool), 2, 3)[0].tolist() == [0, 1]


def test_rl_tiny_model_learns_to_emit_the_rewarded_token():
    """A random 16-token model, one prompt token, one answer token: reward 1 for token 7 (1/16 of the
    draws at first). Sampling, advantages, the loss and AdamW as rl.py runs them reach a mean reward of
    0.9 in a few dozen steps."""
    policy = _rl_tiny_policy(vocab=16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    rewards_seen = []
    for step in range(80):
        seqs, prompt_mask, T = rl.sample(policy, [[3], [4]], 16, 1, 0, 1.0, generator)
        rewards = (seqs[:, T] == 7).float()
        rewards_seen.append(rewards.mean().item())
        if rewards_seen[-1] >= 0.9:
            break
        advantages, _ = rl.group_advantages(rewards.view(2, 16))
        idx, targets, attention_mask, mask = rl.rollout_tensors(seqs, prompt_mask, T, 0)
        logps, _ = rl.answer_logps(policy, idx, targets, attention_mask, T)
        per_token, _ = rl.grpo_token_loss(logps, logps.detach(), advantages.flatten())
        ((per_token * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert rewards_seen[0] < 0.3 and rewards_seen[-1] >= 0.9, rewards_seen


def test_rl_rewards_on_hand_made_answers(tmp_path):
    assert rl.reward_exact(" email.utils ", " email.utils") == 1.0
    assert rl.reward_exact(" email.util", " email.utils") == 0.0
    gsm = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    assert rl.reward_number("48 + 24 = 72, so the answer is 72.", gsm) == 1.0
    assert rl.reward_number("The answer is 72 clips, not 48.", gsm) == 0.0  # the LAST number counts
    assert rl.reward_number("She sold seventy-two.", gsm) == 0.0  # no number: no reward
    assert rl.reward_number("about 1,234.50 dollars", "#### 1234.5") == 1.0
    assert rl.reward_number("it is -3", "#### -3") == 1.0 and rl.reward_number("it is 3", "#### -3") == 0.0
    assert rl.reward_number("72.0", "#### 72") == 1.0
    assert rl.last_number("#### 12 apples and 7 pears") == 7  # after the last ####, its last number
    assert rl.score_answers("exact", ["p", "p"], [" 5", "5 "], [" 5", " 6"]) == [1.0, 0.0]
    # a reward model: its scores are transformers' own, the (prompt, answer) pair encoded together, logit 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = _tiny_reward_model(tmp_path / "rm")
    prompts = ["why is the sky blue", "why is it red"]
    answers = ["because light", "a cat b dog"]
    tok = AutoTokenizer.from_pretrained(d)
    clf = AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.no_grad():
        expected = [clf(**tok(p, a, return_tensors="pt")).logits[0, 0].item() for p, a in zip(prompts, answers)]
    got = rl.score_answers(functools.partial(housekeeping.reward_scores, str(d)), prompts, answers, ["", ""])
    assert got == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="--reward_model .*cannot be loaded"):
        housekeeping.load_reward_model(str(tmp_path / "missing"))
    # prepare_data.py gsm8k on a local file: {question, answer} -> {instruction, input, output}, scored by number
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "Natalia sold clips?", "answer": gsm}) + "\n")
    prepare_data.main(["gsm8k", "--data_file", str(tmp_path / "gsm.jsonl"), "--out_dir", str(tmp_path / "d")])
    [row] = prepare_data.load_alpaca(tmp_path / "d" / "gsm8k" / "train.jsonl")
    assert row == {"instruction": "Natalia sold clips?", "input": "", "output": gsm}
    assert rl.reward_number("so 72", row["output"]) == 1.0


def _rl_setup(tmp_path):
    """A tiny native model, a tokenizer, sums of one digit and a tiny reward model (whose scores differ
    from answer to answer, where a random model's answers are never exactly right): rl.py's flags."""
    recs = [{"instruction": f"What is {a} + {b}?", "input": "", "output": f" {a + b}"} for a in range(6)
            for b in range(6)]
    data = _tiny_instruction_run(tmp_path, "sums.jsonl", recs, 300)
    return ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
            "--batch_size", "2", "--group_size", "4", "--max_new_tokens", "3", "--lora_rank", "4", "--lr", "5e-2",
            "--val_frac", "0.1", "--num_samples", "1", "--reward", "model",
            "--reward_model", str(_tiny_reward_model(tmp_path / "rm"))]


def test_rl_cli_writes_the_run_and_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    """The stage end to end (log keys, summary before -> after, plot, model, the closing lines), with PPO's
    updates and the KL on; then a real SIGKILL at an arbitrary moment after the first checkpoint, and
    --resume: the uninterrupted run's losses and rewards (the sampling seeds' generator is in the state)."""
    args = _rl_setup(tmp_path) + ["--max_steps", "10", "--eval_interval", "10", "--updates_per_batch", "2",
                                  "--kl_beta", "0.1"]
    rl.main(args + ["--out_dir", str(tmp_path / "whole")])
    out = capsys.readouterr().out
    whole = housekeeping.read_log(tmp_path / "whole" / "log.jsonl")
    steps = [r for r in whole if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert {"loss", "reward", "equal_groups", "kl", "entropy", "length", "sample_s", "update_s", "lr", "grad_norm",
            "ms"} <= set(steps[0])
    assert [r["step"] for r in whole if "val_reward" in r] == [0, 10]
    assert len({r["loss"] for r in steps}) > 1 and all(r["kl"] >= 0 for r in steps)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert set(summary["before"]) == {"reward", "length", "greedy_reward"}
    for f in ("loss.png", "adapter/adapter_config.json", "model/gpt_config.json", "ckpt/state.pt"):
        assert (tmp_path / "whole" / f).exists(), f
    assert "before -> after (4 held-out prompts, 4 samples each): reward" in out
    assert out.strip().splitlines()[-1].startswith(f"next: python dpo.py --init_from {tmp_path / 'whole'}")

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "rl.py"), *args, "--out_dir", str(killed), "--ckpt_interval", "2"]
    _kill_after(cmd, killed / "log.jsonl", '"loss"', 3)
    state = torch.load(killed / "ckpt" / "state.pt", weights_only=True)
    if state["step"] >= 10:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    rl.main(["--out_dir", str(killed), "--resume"])
    resumed = housekeeping.read_log(killed / "log.jsonl")
    keys = ("step", "loss", "reward", "kl", "val_reward")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in whole]


def test_rl_torchrun_two_ranks_ddp_and_fsdp_equal_one_process(tmp_path):
    """2 ranks x 1 micro-batch sample, score and train on what 1 process x 2 micro-batches does (each rank
    its own prompts, the gradients averaged; with dynamic sampling, each picks among its own groups): the
    same losses and rewards, under DDP and under FSDP (whose answers all run to --max_new_tokens: the same
    tokens up to each answer's end), and the FSDP run's saved model gives the one process's logits."""
    args = _rl_setup(tmp_path) + ["--max_steps", "4", "--eval_interval", "4", "--lora_rank", "0", "--lr", "1e-3",
                                  "--oversample", "2"]
    rl.main(args + ["--out_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        _torchrun(2, "rl.py", *args, "--out_dir", tmp_path / name, *extra)
        for key in ("loss", "reward", "entropy", "val_reward"):
            assert _losses(tmp_path / name, key) == pytest.approx(_losses(tmp_path / "one", key), rel=1e-5,
                                                                  abs=1e-7), (name, key)
    assert len(set(_losses(tmp_path / "one", "loss"))) > 1
    one, fsdp = (GPT.from_pretrained(tmp_path / d / "model") for d in ("one", "fsdp"))
    with torch.no_grad():
        assert max_diff(fsdp(IDX % 300)[0], one(IDX % 300)[0]) < 1e-5


# -----------------------------------------------------------------------------------------------
# score.py


def test_dpo_resume_after_a_stop_is_exact_and_lr_keeps_its_floor(tmp_path):
    """A run stopped after step 3 (state saved at 2) and resumed logs the whole run's losses, bit for bit;
    --min_lr_ratio 0.5 keeps the cosine at half the peak or above."""
    args = _dpo_tiny_args(tmp_path) + ["--max_steps", "4", "--lr", "1e-2", "--min_lr_ratio", "0.5",
                                      "--eval_interval", "2"]
    dpo.main(args + ["--out_dir", str(tmp_path / "whole")])
    dpo.main(args + ["--out_dir", str(tmp_path / "cut"), "--ckpt_interval", "2", "--stop_at_step", "3"])
    assert [r["step"] for r in housekeeping.read_log(tmp_path / "cut" / "log.jsonl") if "loss" in r] == [1, 2, 3]
    dpo.main(args + ["--out_dir", str(tmp_path / "cut"), "--resume"])
    whole, cut = (housekeeping.read_log(tmp_path / d / "log.jsonl") for d in ("whole", "cut"))
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in cut] == [
        (r["step"], r.get("loss"), r.get("val_loss")) for r in whole]
    lrs = [r["lr"] for r in whole if "lr" in r]
    assert lrs[0] == 1e-2 and all(lr >= 0.5e-2 for lr in lrs) and lrs[-1] < lrs[0]
    assert all(r["ms"] > 0 for r in whole if "loss" in r)


def test_dpo_flags_renamed_keep_their_old_spelling_and_an_adapter_is_named(tmp_path):
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    cfg = dpo.parse_args(["--init_from", str(tmp_path / "model"), "--n_generate", "2", "--n_samples", "5"])
    assert (cfg.num_samples, cfg.max_examples) == (2, 5)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "gpt2", "r": 4}))
    with pytest.raises(ValueError, match="is a LoRA adapter, not a model.*python lora.py merge --base gpt2 --adapter"):
        dpo.parse_args(["--init_from", str(adapter)])


def test_dpo_evaluation_note_names_the_flags_when_evaluating_costs_more_than_training():
    cfg = dpo.DPOConfig()
    assert dpo.evaluation_note(1.0, 2.0, 10.0, cfg) == ""
    note = dpo.evaluation_note(30.0, 2.0, 10.0, cfg)
    assert note.startswith("note: evaluation takes about 32 s") and "--num_samples" in note and "--eval_pairs" in note


def test_score_reward_model_equals_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = _tiny_reward_model(tmp_path / "rm")
    qs = ["why is the sky blue", "a b c", "cat"]
    ans = ["because light", "dog red cat it is the a", "unknownword"]
    ours = housekeeping.reward_scores(str(d), qs, ans, batch_size=2)
    tok, rm = AutoTokenizer.from_pretrained(d), AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.no_grad():
        ref = [rm(**tok(q, a, return_tensors="pt")).logits[0, 0].item() for q, a in zip(qs, ans)]
    assert ours == pytest.approx(ref, abs=1e-5)  # batched with padding = one at a time
    m, se = housekeeping.mean_stderr(7.0, 21.0, 3)  # from the sum and the sum of squares
    assert m == pytest.approx(7 / 3) and se == pytest.approx(statistics.stdev([1, 2, 4]) / math.sqrt(3))
    # a NaN or inf among the scores is an error naming them, never a mean (a NaN reward model scored as one)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="score.py: the reward scores: 3 value"):
            score._stats("reward", [1.0, bad, 4.0])


class _JudgeServer:
    """A local chat-completions endpoint that answers from a script of (status, body, delay)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status, reply, delay = outer.script.pop(0) if outer.script else (200, "50", 0)
                time.sleep(delay)
                data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_score_llm_judge_retries_cache_and_failures(tmp_path):
    prompts = [{"instruction": f"q{i}", "input": "", "output": f"ref{i}"} for i in range(3)]
    answers = ["a0", "a1", "a2"]
    srv = _JudgeServer([(200, "87", 0), (429, "", 0), (200, " 12\n", 0), (200, "Score: 90", 0)])
    try:
        judge = score.Judge(srv.url, "m", timeout=2, retries=2, backoff=0.01, cache_path=tmp_path / "c.jsonl")
        scores, unjudged = score.judge_answers(judge, prompts, answers)
        assert scores == [87, 12, None] and unjudged == [{"item": 2, "reason": "reply is not an integer 0-100: "
                                                                              "'Score: 90'"}]
        sent = srv.requests[0]["messages"][0]["content"]
        assert "`q0`" in sent and "`ref0`" in sent
        assert len(srv.requests) == 4  # the 429 was retried
        n = len(srv.requests)
        again = score.Judge(srv.url, "m", timeout=2, retries=2, backoff=0.01, cache_path=tmp_path / "c.jsonl")
        assert again.score("q0", "ref0", "a0") == (87, "cached") and again.score("q1", "ref1", "a1")[0] == 12
        assert len(srv.requests) == n  # cache hits: nothing paid twice
        # a timeout, then a 500, then success
        srv.script = [(200, "5", 0.5), (500, "", 0), (200, "7", 0)]
        j = score.Judge(srv.url, "m", timeout=0.2, retries=3, backoff=0.01)
        assert j.score("x", "y", "z") == (7, "judged")
        # failing midway: the first item is judged and cached, the second exhausts the retries
        srv.script = [(200, "40", 0)] + [(503, "", 0)] * 3
        j = score.Judge(srv.url, "m2", timeout=2, retries=2, backoff=0.01, cache_path=tmp_path / "mid.jsonl")
        with pytest.raises(score.JudgeError, match="failed after 3 attempts .HTTP 503"):
            score.judge_answers(j, prompts[:2], answers[:2])
        assert [json.loads(line)["score"] for line in (tmp_path / "mid.jsonl").read_text().splitlines()] == [40]
        assert score.parse_judge_score("100") == 100 and score.parse_judge_score("101") is None
        assert score.parse_judge_score("7.5") is None
    finally:
        srv.close()
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = score.Judge(f"http://127.0.0.1:{port}", "m", timeout=0.5, retries=1, backoff=0.01)
    with pytest.raises(score.JudgeError, match="failed after 2 attempts .ConnectionError"):
        j.score("a", "b", "c")


def test_score_run_over_checkpoints(tmp_path, capsys):
    import bpe

    d = _tiny_reward_model(tmp_path / "rm")
    bpe.Tokenizer.train(HH_TEXT * 5, 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    run = tmp_path / "run"
    for i, step in enumerate((10, 20)):
        torch.manual_seed(i)
        GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(run / f"ckpt_step{step}", format="native")
    (tmp_path / "p.txt").write_text("why is the sky blue\ncat\n")
    srv = _JudgeServer([(200, "30", 0), (200, "60", 0), (200, "80", 0), (200, "90", 0)])
    try:
        score.main(["--init_from", str(run), "--tokenizer", str(tmp_path / "tok"), "--reward_model", str(d),
                       "--judge_url", srv.url, "--prompts", str(tmp_path / "p.txt"), "--max_new_tokens", "3",
                       "--task", "dialogue"])
    finally:
        srv.close()
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["ckpt_step10", "ckpt_step20"] and rows[1]["step"] == 20
    # the judge is asked once per distinct (prompt, answer); a repeated answer is a cache hit
    replies, seen, want = iter([30, 60, 80, 90]), {}, []
    for r in rows:
        want.append([seen.setdefault((i, a), next(replies)) for i, a in enumerate(r["answers"])])
    assert [r["judge"] for r in rows] == want and rows[1]["judge_mean"] == sum(want[1]) / 2
    ref = housekeeping.reward_scores(str(d), ["why is the sky blue", "cat"], rows[0]["answers"])
    assert rows[0]["reward"] == pytest.approx(ref, abs=1e-6)
    assert "best by reward" in (run / "scores.md").read_text()
    with pytest.raises(ValueError, match="needs --reward_model, --judge_url, or prompts with a reference"):
        score.main(["--init_from", str(run), "--reward_model", "none", "--prompts", str(tmp_path / "p.txt")])


def test_score_offline_default_is_exact_match_on_the_builtin_tasks(tmp_path, monkeypatch, capsys):
    import bpe

    bpe.Tokenizer.train(HH_TEXT * 5, 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "m", format="native")
    questions = [{"instruction": f"Which module in: from m{i} import n", "input": "", "output": f" m{i}"}
                 for i in range(4)]
    tasks = tmp_path / "instructions_test.jsonl"
    tasks.write_text("".join(json.dumps(q) + "\n" for q in questions))
    monkeypatch.setattr(score, "builtin_tasks", lambda: {"instructions_test": tasks})
    cfg = score.ScoreConfig()
    assert (cfg.init_from, cfg.base, cfg.reward_model) == ("auto", "auto", "none")
    argv = ["--init_from", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"), "--max_new_tokens", "3"]
    [row] = score.main(argv + ["--max_examples", "3"])
    assert "offline default: the built-in tasks' held-out questions" in capsys.readouterr().out
    assert len(row["answers"]) == 3 and row["exact_match"] == [0.0, 0.0, 0.0] and row["exact_match_mean"] == 0.0
    assert "best by exact_match" in (tmp_path / "m" / "scores.md").read_text()
    # references equal to the answers: every answer matches (outer spaces aside)
    tasks.write_text("".join(json.dumps(dict(q, output=f" {a} ")) + "\n" for q, a in zip(questions, row["answers"])))
    [row] = score.main(argv + ["--max_examples", "3"])
    assert row["exact_match"] == [1.0, 1.0, 1.0] and row["exact_match_mean"] == 1.0


def test_score_checks_the_reward_model_before_generating(tmp_path, monkeypatch):
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "m", format="native")
    monkeypatch.setattr(score, "answer", lambda *a, **k: pytest.fail("answers generated before the check"))
    with pytest.raises(ValueError, match="--reward_model .*absent: cannot be loaded"):
        score.main(["--init_from", str(tmp_path / "m"), "--reward_model", str(tmp_path / "absent")])


# -----------------------------------------------------------------------------------------------
# chat.py


def test_chat_samples_a_prompt_from_a_local_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "chat.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--top_p" in r.stdout and "--num_beams" in r.stdout
    rank_file = SHARED / "gpt2.tiktoken"
    if not rank_file.exists():
        pytest.skip(f"{rank_file} absent: the CLI sampling part needs GPT-2's rank file")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=50257)).save_pretrained(tmp_path / "m")
    r = subprocess.run([sys.executable, "chat.py", "--init_from", str(tmp_path / "m"), "--tokenizer",
                        str(rank_file), "--prompt", "Hello world", "--num_samples", "2", "--max_new_tokens", "5"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello world") == 2
    r = subprocess.run([sys.executable, "chat.py", "--init_from", str(tmp_path / "m"), "--tokenizer", str(rank_file),
                        "--prompt", "", "--max_new_tokens", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # an empty prompt starts from the end-of-text token


def test_chat_two_turns_reset_quit(tmp_path):
    import io

    import bpe

    bpe.Tokenizer.train(HH_TEXT * 5, 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    cfg = chat.parse_args(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
                           "--template", "dialogue", "--max_new_tokens", "5", "--temperature", "0"])
    out = io.StringIO()
    prompts = chat.chat(cfg, io.StringIO("hello there\nand again\n/reset\nfresh start\n/quit\nnever read\n"), out)
    assert len(prompts) == 3
    assert prompts[0] == "\n\nHuman: hello there\n\nAssistant:"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("\n\nHuman: and again\n\nAssistant:")
    assert prompts[2] == "\n\nHuman: fresh start\n\nAssistant:"  # /reset: no history
    text = out.getvalue()
    assert text.count("Assistant:") == 3 and "(history cleared)" in text and "never read" not in text
    # piped (not a terminal): each message is echoed after "> ", the reply on the next line
    assert text.split("\n")[1] == "> hello there" and "> /reset\n(history cleared)" in text
    # the streamed reply is what greedy generation gives for the first prompt
    tok = load_tokenizer(str(tmp_path / "tok"))
    m = GPT.from_pretrained(tmp_path / "model")
    ids = tok.encode(prompts[0])
    first = tok.decode([t for t in m.generate(torch.tensor([ids]), 5, temperature=0)[0, len(ids):].tolist()
                        if t != tok.eot_id])
    first = first.split("\n\nHuman:")[0]
    assert text.split("\n")[2].startswith("Assistant:" + first[:3])


def test_chat_precision_flag_and_its_old_dtype_spelling():
    assert chat.parse_args([]).precision == "auto" and chat.parse_args([]).init_from == "auto"
    for old, new in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        assert chat.parse_args(["--dtype", old]).precision == new == chat.parse_args(["--precision", new]).precision
    assert chat.weights_dtype("bf16", "cpu") == torch.bfloat16 and chat.weights_dtype("auto", "cpu") == torch.float32


def test_chat_echoes_nothing_from_a_terminal(tmp_path):
    import bpe

    class Tty(io.StringIO):
        def isatty(self):
            return True

    bpe.Tokenizer.train(HH_TEXT * 5, 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    cfg = chat.parse_args(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
                           "--max_new_tokens", "2", "--temperature", "0"])
    out = io.StringIO()
    chat.chat(cfg, Tty("hello\n/quit\n"), out)
    assert "> " not in out.getvalue() and "Assistant:" in out.getvalue()


# -----------------------------------------------------------------------------------------------
# chat templates (bpe.ChatTemplate): an instruct model spoken to, trained and scored in its own format

CHATML_TEMPLATE = (  # Qwen2.5's ChatML (without tools), its default system message included. {% generation %}
    # marks what the assistant writes: transformers then finds the assistant tokens itself
    # (return_assistant_tokens_mask), the reference the loss mask is compared with; it renders nothing
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "I am fine, thank you."}]


def _chatml_model_dir(path, template=CHATML_TEMPLATE, eot_bias=True):
    """A tiny Hugging Face model dir, offline: a byte-level BPE tokenizer with ChatML's special tokens and
    chat template (Qwen's layout: <|endoftext|> is the EOS, <|im_end|> ends a turn), and a random
    transformers LLaMA of its vocabulary. eot_bias: the LM head is set so that sampling picks "<|im_end|>" or
    the first token of "Paris" at even odds, and nothing else: replies of a few tokens, then the end of turn.
    Returns the transformers tokenizer (the reference)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    text = ["You are a helpful assistant.", "system user assistant", "What is the capital of France? Paris.",
            "Hello there, how are you today? I am fine, thank you."] * 20
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=None)
    m = LlamaForCausalLM(config)
    if eot_bias:
        with torch.no_grad():
            # dimension 0 of every embedding is large: it survives the two small blocks, and the final RMSNorm
            # (weight 1 there, 0 elsewhere) leaves a positive h[0]; only two rows of the head read it
            m.model.embed_tokens.weight[:, 0] = 10.0
            m.model.norm.weight.zero_()
            m.model.norm.weight[0] = 1.0
            m.lm_head.weight.zero_()
            m.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>"), 0] = 1.0
            m.lm_head.weight[tok.encode("Paris", add_special_tokens=False)[0], 0] = 1.0
    m.save_pretrained(path)
    return tok


def test_chat_template_renders_as_transformers_and_trains_only_the_assistant_turns(tmp_path, monkeypatch):
    ref = _chatml_model_dir(tmp_path / "m")
    tok = load_tokenizer(None, tmp_path / "m")  # the model dir's tokenizer, its chat template with it
    # a hub id (as GPT.from_pretrained takes it): the tokenizer of its snapshot, not GPT-2's
    monkeypatch.setattr(bpe, "resolve_model_dir", lambda name: tmp_path / "m" if name == "org/instruct" else None)
    assert load_tokenizer(None, "org/instruct").chat_template is not None
    chat_t = tok.chat_template
    im_end = ref.convert_tokens_to_ids("<|im_end|>")
    assert chat_t.end_of_turn == im_end and chat_t.stop_ids == [im_end, ref.eos_token_id] and im_end != tok.eot_id
    # the rendered conversation and prompts: transformers' apply_chat_template, text and tokens
    assert chat_t.render(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)
    for n in (2, 4):  # the prompt after one and after two user messages, with the assistant's header
        expected = ref.apply_chat_template(CHAT[:n], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert chat_t.prompt_ids(CHAT[:n]) == expected
    assert chat_t.prompt_ids(CHAT[1:2]) == ref.apply_chat_template(CHAT[1:2], add_generation_prompt=True,
                                                                   return_dict=True)["input_ids"]  # default system
    # the loss mask: exactly the tokens transformers marks as the assistant's (content + <|im_end|>)
    expected = ref.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    ids, train = chat_t.conversation(CHAT)
    assert ids == expected["input_ids"] and train == [bool(x) for x in expected["assistant_masks"]]
    assert ref.decode([i for i, t in zip(ids, train) if t]) == "Paris.<|im_end|>I am fine, thank you.<|im_end|>"
    assert chat_t.reply_ids(CHAT[:2], "Paris.") == ref.encode("Paris.<|im_end|>", add_special_tokens=False)
    # finetune.py trains what the mask says: an Alpaca record and an HH-RLHF dialogue, in the template
    t = finetune.tokenize_chat(CHAT, chat_t, max_length=200)
    assert t["input_ids"] == ids[:-1] and t["labels"] == [i if m else -100 for i, m in zip(ids[1:], train[1:])]
    record = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
    t = finetune.tokenize_example(record, tok, tok.eot_id, 200, chat_template=chat_t)
    ids, train = chat_t.conversation([CHAT[1], CHAT[2]])
    assert t["labels"] == [i if m else -100 for i, m in zip(ids[1:], train[1:])] and t["n_response"] == sum(train)
    dialogue = prepare_data.dialogue_example("\n\nHuman: Hello there\n\nAssistant: I am fine.", "d")
    t = finetune.tokenize_example(dialogue, tok, tok.eot_id, 200, chat_template=chat_t)
    assert ref.decode([i for i in t["labels"] if i != -100]) == "I am fine.<|im_end|>"
    assert finetune.example_prompt_ids(dialogue, tok, chat_t) == chat_t.prompt_ids([{"role": "user", "content": "Hello there"}])
    # dpo.py: the prompt with the assistant's header; each response its turn, up to <|im_end|>
    pair = {"prompt": "\n\nHuman: Hello there\n\nAssistant:", "chosen": " I am fine.", "rejected": " Paris."}
    [t] = dpo.tokenize_pairs([pair], tok, tok.eot_id, 200, 100, chat_template=chat_t)
    assert t["prompt"] == chat_t.prompt_ids([CHAT[3]])
    assert t["chosen"] == ref.encode("I am fine.<|im_end|>", add_special_tokens=False)
    assert t["rejected"] == ref.encode("Paris.<|im_end|>", add_special_tokens=False)


def test_rl_in_the_models_chat_template_prompts_as_transformers_and_stops_at_the_end_of_turn(tmp_path, capsys):
    """rl.py --template chat: each prompt is one user message rendered by the model's template (transformers'
    apply_chat_template, the assistant's header last); an answer ends at the end-of-turn token, which the
    loss mask keeps and nothing after it; the stage runs end to end in the template."""
    ref = _chatml_model_dir(tmp_path / "m")
    tok = load_tokenizer(None, tmp_path / "m")
    records = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."}] * 6
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids, texts, refs = rl.load_prompts(data, tok, 256, chat_template=tok.chat_template)
    message = [{"role": "user", "content": "What is the capital of France?"}]
    assert ids[0] == ref.apply_chat_template(message, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert texts[0] == ref.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    im_end, eos = ref.convert_tokens_to_ids("<|im_end|>"), ref.eos_token_id
    stops = bpe.reply_stops(tok, tok.chat_template)
    assert stops == [im_end, eos]
    answers = torch.tensor([[5, im_end, eos, eos], [5, 6, 7, 8]])
    assert rl.answer_mask(answers, stops).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rl.decode_answers(tok, answers[:1], stops) == [tok.decode([5])]
    rl.main(["--init_from", str(tmp_path / "m"), "--template", "chat", "--data_file", str(data), "--max_steps", "2",
             "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "4", "--val_frac", "0.34",
             "--eval_interval", "2", "--num_samples", "1", "--out_dir", str(tmp_path / "out")])
    assert "before -> after" in capsys.readouterr().out


def test_chat_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template that renders an answer differently once later turns follow (as Qwen3's drops the reasoning of
    earlier answers) has no fixed span per turn: one error line, not a wrong mask. One answer is fine."""
    rewrites = CHATML_TEMPLATE.replace("message['content'] + '<|im_end|>'",
                                       "(message['content'] if loop.last else 'earlier') + '<|im_end|>'")
    _chatml_model_dir(tmp_path / "m", template=rewrites, eot_bias=False)
    chat_t = load_tokenizer(None, tmp_path / "m").chat_template
    ids, train = chat_t.conversation(CHAT[:3])
    assert sum(train) == len(chat_t.reply_ids(CHAT[:2], "Paris."))
    with pytest.raises(ValueError, match="not prefix-stable") as e:
        chat_t.conversation(CHAT)
    assert "\n" not in str(e.value) and str(tmp_path / "m") in str(e.value)


def test_chat_template_with_no_end_of_turn_token_is_refused_for_training(tmp_path):
    """A template that writes nothing special after a reply: a model trained in it would never learn to stop."""
    no_end = CHATML_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content']")
    _chatml_model_dir(tmp_path / "m", template=no_end, eot_bias=False)
    chat_t = load_tokenizer(None, tmp_path / "m").chat_template
    assert chat_t.end_of_turn is None
    with pytest.raises(ValueError, match="writes no special token after a reply"):
        chat_t.conversation(CHAT)
    with pytest.raises(ValueError, match="writes no special token after a reply"):
        chat_t.reply_ids(CHAT[:2], "Paris.")


def test_a_saved_instruct_model_stops_hf_generate_at_its_end_of_turn(tmp_path):
    """save_pretrained writes the template's stop ids (end of turn, then end of text) as HF's eos_token_id, so
    that transformers' generate, pipelines and lm-eval stop an instruct model where its turn ends."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    ref = _chatml_model_dir(tmp_path / "m")
    GPT.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "out")
    stops = [ref.convert_tokens_to_ids("<|im_end|>"), ref.eos_token_id]
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == stops
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prompt = torch.tensor([ref.apply_chat_template(CHAT[1:2], add_generation_prompt=True, return_dict=True)["input_ids"]])
    out = hf.generate(prompt, max_new_tokens=40, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert out[-1] in stops and len(out) < 40, out  # greedy: the biased head ends the turn


def test_dpo_chat_prompt_keeps_every_turn_and_drops_only_the_empty_assistant_marker():
    """An HH-RLHF prompt ends with an empty "Assistant:" (the turn the pair answers); one written without it
    keeps its last user message."""
    hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?"
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}]
    assert dpo.prompt_messages(hh + "\n\nAssistant:") == expected
    assert dpo.prompt_messages(hh) == expected
    assert dpo.prompt_messages("Say hi.") == [{"role": "user", "content": "Say hi."}]


def test_template_chat_on_a_model_without_one_is_one_error_line(tmp_path):
    _chatml_model_dir(tmp_path / "m", template=None, eot_bias=False)
    for script in ("chat.py", "score.py"):
        r = subprocess.run([sys.executable, script, "--init_from", str(tmp_path / "m"), "--template", "chat",
                            "--prompt" if script == "chat.py" else "--max_new_tokens", "2"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (script, r.stderr)
        assert r.stderr.splitlines()[-1] == (f"error: --template chat: {tmp_path / 'm'} ships no chat template (no "
                                             f"\"chat_template\" in its tokenizer_config.json, no "
                                             f"chat_template.jinja); use --template ours"), script
    # auto: our formats where the model ships no template (GPT-2, our own models)
    tok = load_tokenizer(None, tmp_path / "m")
    assert tok.chat_template is None and bpe.pick_template("auto", tok, "m") is None
    with pytest.raises(ValueError, match="not with --task classify"):
        finetune.parse_args(["--task", "classify", "--template", "chat"])


def test_chat_speaks_in_the_models_template_by_default_and_stops_at_its_end_of_turn(tmp_path):
    ref = _chatml_model_dir(tmp_path / "m")
    out = io.StringIO()
    cfg = chat.parse_args(["--init_from", str(tmp_path / "m"), "--prompt", "What is the capital of France?",
                           "--show_prompt", "--num_samples", "4", "--max_new_tokens", "40"])
    replies = chat.sample(cfg, out)
    assert cfg.template == "chat"  # auto: the model ships a template
    prompt = ref.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert out.getvalue().startswith(f"prompt (chat, {len(ref.encode(prompt, add_special_tokens=False))} tokens):\n"
                                     f"{prompt}\n")
    # the model writes "Pa" or <|im_end|>, even odds: each reply stops at the first <|im_end|>, never shown
    assert all(set(r.split("Pa")) == {""} and len(r) < 2 * 40 for r in replies) and any(replies)
    # in plain continuation (--template none) only the EOS stops it: the end-of-turn tokens run on, shown
    cfg = chat.parse_args(["--init_from", str(tmp_path / "m"), "--prompt", "Hi", "--template", "none",
                           "--max_new_tokens", "40"])
    [text] = chat.sample(cfg, io.StringIO())
    assert text.startswith("Hi") and "<|im_end|>" in text
    # interactive: the conversation so far in the template, each reply added as the assistant's turn
    cfg = chat.parse_args(["--init_from", str(tmp_path / "m"), "--max_new_tokens", "40"])
    out = io.StringIO()
    prompts = chat.chat(cfg, io.StringIO("hello\nagain\n/quit\n"), out)
    reply = out.getvalue().split("Assistant:")[1].split("\n")[0]
    assert "<|im_end|>" not in out.getvalue() and set(reply.split("Pa")) == {""}
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "again"}]
    assert prompts == [ref.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True),
                       ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)]
    # score.py: answers in the template, cut at <|im_end|>
    model = GPT.from_pretrained(tmp_path / "m")
    tok = load_tokenizer(None, tmp_path / "m")
    answers = score.answer(model, tok, [{"instruction": "Hi", "input": ""}], 40, chat_template=tok.chat_template)
    assert "<|im_end|>" not in answers[0] and set(answers[0].split("Pa")) == {""}


def test_finetune_template_chat_trains_a_tiny_hf_model_on_its_template(tmp_path, capsys):
    _chatml_model_dir(tmp_path / "m", eot_bias=False)
    data = tmp_path / "alpaca.jsonl"
    records = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."}
               for a in range(6) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    finetune.main(["--init_from", str(tmp_path / "m"), "--template", "chat", "--data_file", str(data),
                   "--out_dir", str(out), "--max_steps", "8", "--eval_interval", "8", "--batch_size", "4",
                   "--lora_rank", "0", "--lr", "3e-3", "--num_samples", "2", "--max_new_tokens", "4"])
    assert "prompt format: the model's chat template" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0]
    assert json.loads((out / "config.json").read_text())["template"] == "chat"
    # the trained model keeps its tokenizer and template: chat.py speaks to it in the template
    assert load_tokenizer(None, out / "best_model").chat_template is not None


def test_dpo_template_chat_runs_on_a_tiny_hf_model(tmp_path, capsys):
    _chatml_model_dir(tmp_path / "m", eot_bias=False)
    rows = [{"chosen": f"\n\nHuman: Hello {i}\n\nAssistant: I am fine.",
             "rejected": f"\n\nHuman: Hello {i}\n\nAssistant: Paris."} for i in range(12)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo.main(["--init_from", str(tmp_path / "m"), "--template", "chat", "--data_file", str(data),
              "--out_dir", str(tmp_path / "out"), "--lora_rank", "4", "--max_steps", "2", "--eval_interval", "2",
              "--batch_size", "2", "--num_samples", "1", "--max_new_tokens", "4", "--warmup_steps", "0"])
    assert "prompt format: the model's chat template" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


# -----------------------------------------------------------------------------------------------
# sweep.py


def _sweep_flags(tmp_path, data):
    return ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
            "--max_steps", "4", "--eval_interval", "2", "--batch_size", "4", "--grad_accum", "1",
            "--val_frac", "0.15", "--num_samples", "0", "--lora_dropout", "0.0", "--lr", "3e-3"]


def _sweep(argv):
    """sweep.py through its command line, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *argv], capture_output=True, text=True)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_sweep_rows_match_direct_finetune_runs(tmp_path):
    data = _ft_setup(tmp_path)
    flags = _sweep_flags(tmp_path, data)
    out = tmp_path / "sw"
    r = _sweep(["--set", "lora_rank=0,2,4", "--out_dir", str(out)] + flags)
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert [row["name"] for row in rows] == ["lora_rank=0", "lora_rank=2", "lora_rank=4"]
    assert [row["config"] for row in rows] == [{"lora_rank": "0"}, {"lora_rank": "2"}, {"lora_rank": "4"}]
    for row in rows:
        rank = int(row["config"]["lora_rank"])
        assert row["status"] == "ok" and row["lora_rank"] == rank
        # the same flags run directly: the same val loss (same seed, same split, same steps)
        direct = finetune.main(flags + ["--lora_rank", str(rank), "--out_dir", str(tmp_path / f"direct{rank}")])
        assert row["val_loss"] == pytest.approx(direct["best_val"], abs=1e-6)
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-9)
        assert row["test_loss"] == pytest.approx(direct["test_loss"], abs=1e-6)
        assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]), rel=1e-9)
        # trainable parameters as lora.py counts them on the same model
        m = GPT.from_pretrained(tmp_path / "model")
        if rank:
            lora.apply_lora(m, rank, 32.0, 0.0, "q,v")
        trainable, total = lora.count_parameters(m)
        assert row["trainable"] == (trainable if rank else total)
        assert f"trainable params: {row['trainable']:,d}" in lora.trainable_report(m)
        assert row["peak_memory_mb"] > 0 and row["seconds"] > 0 and row["tokens_per_s"] > 0
        assert (out / "runs" / f"lora_rank={rank}" / "summary.json").exists()
        assert (out / "runs" / f"lora_rank={rank}.log").exists()
    assert rows[0]["trainable"] > rows[2]["trainable"] > rows[1]["trainable"]
    # the table marks the lowest val loss; the plot exists (a PNG) with one point per ok row
    md = (out / "results.md").read_text()
    best = min(rows, key=lambda row: row["val_loss"])
    assert [line for line in md.splitlines() if "★ |" in line][0].startswith(f"| ★ | {best['name']} |")
    assert md.count("| ok |") == 3
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(3 points)" in r.stdout
    # a fresh sweep on a directory that holds one stops with one error line
    again = _sweep(["--set", "lora_rank=0", "--out_dir", str(out)] + flags)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--resume" in again.stderr


def test_sweep_failed_row_has_reason_and_resume_reruns_only_it(tmp_path):
    data = _ft_setup(tmp_path)
    flags = _sweep_flags(tmp_path, data) + ["--lora_rank", "2"]
    out = tmp_path / "sw"
    argv = ["--set", "lora_targets=q,v;nonsense", "--set", "lora_alpha=8,16", "--out_dir", str(out)] + flags
    r = _sweep(argv)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in _rows(out)}
    assert list(rows) == ["lora_targets=q,v,lora_alpha=8", "lora_targets=q,v,lora_alpha=16",
                          "lora_targets=nonsense,lora_alpha=8", "lora_targets=nonsense,lora_alpha=16"]
    bad = rows["lora_targets=nonsense,lora_alpha=8"]
    assert bad["status"] == "failed" and bad["reason"].startswith("error: unknown LoRA target 'nonsense'")
    assert [row["status"] for row in rows.values()] == ["ok", "ok", "failed", "failed"]
    assert rows["lora_targets=q,v,lora_alpha=8"]["val_loss"] != rows["lora_targets=q,v,lora_alpha=16"]["val_loss"]
    md = (out / "results.md").read_text()
    assert "failed: error: unknown LoRA target 'nonsense'" in md
    # --resume: the ok rows are kept (their runs untouched), the failed ones run again
    runs = out / "runs"
    ok_files = [runs / f"lora_targets=q,v,lora_alpha={a}" / "summary.json" for a in (8, 16)]
    logs = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.log")}
    stamps = [p.stat().st_mtime_ns for p in ok_files]
    for p in runs.glob("*.log"):
        os.utime(p, ns=(1, 1))  # so that a rewrite shows, however coarse the clock
    r = _sweep(["--resume", "--out_dir", str(out)])  # alone: the saved sweep again
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done before, kept") == 2 and r.stdout.count(": running") == 2
    assert [p.stat().st_mtime_ns for p in ok_files] == stamps
    rerun = sorted(p.name for p in runs.glob("*.log") if p.stat().st_mtime_ns != 1)
    assert rerun == ["lora_targets=nonsense,lora_alpha=16.log", "lora_targets=nonsense,lora_alpha=8.log"]
    assert set(logs) == {p.name for p in runs.glob("*.log")}
    again = {row["name"]: row for row in _rows(out)}
    assert list(again) == list(rows) and [row["status"] for row in again.values()] == ["ok", "ok", "failed", "failed"]
    assert again["lora_targets=q,v,lora_alpha=8"] == rows["lora_targets=q,v,lora_alpha=8"]


def test_sweep_boolean_flags_have_no_forms():
    args, passed = sweep.parse_args(["--resume", "--no-resume", "--overwrite", "--max_examples", "8"])
    assert args.resume is False and args.overwrite is True and passed == ["--max_examples", "8"]
    args, _ = sweep.parse_args(["--no-overwrite"])
    assert args.overwrite is False and args.resume is False and args.out_dir == "out-sweep"


def test_sweep_grid_names_and_reasons():
    grid = sweep.grid(["lora_rank=0,4,4", "lora_targets=q,v;all", "grad_checkpointing=true,false"])
    assert len(grid) == 2 * 2 * 2
    assert sweep.run_name(grid[1]) == "lora_rank=0,lora_targets=q,v,grad_checkpointing=false"
    assert sweep.as_flags(grid[1]) == ["--lora_rank=0", "--lora_targets=q,v", "--no-grad_checkpointing"]
    assert sweep.dir_name({"init_from": "a/b c"}) == "init_from=a_b_c"
    for bad in (["lora_rank"], ["lora-rank=1"], ["lora_rank="], ["out_dir=a,b"], ["lora_rank=1", "lora_rank=2"]):
        with pytest.raises(ValueError):
            sweep.grid(bad)
    assert sweep.failure_reason(-9, "") == "out of memory (killed by SIGKILL)"
    assert sweep.failure_reason(2, "warning: x\nerror: bad flag\nmore\n") == "error: bad flag"
    assert sweep.failure_reason(1, "Traceback ...\nRuntimeError: boom\n") == "RuntimeError: boom"
    assert sweep.failure_reason(1, "") == "exit status 1"


def test_sweep_plot_one_point_per_ok_row_and_classify_ranking(tmp_path):
    rows = [dict(name="lora_rank=0", status="ok", lora_rank=0, trainable=10_000, val_loss=2.0, test_accuracy=0.7,
                 peak_memory_mb=300.0),
            dict(name="lora_rank=4", status="ok", lora_rank=4, trainable=100, val_loss=2.5, test_accuracy=0.9,
                 peak_memory_mb=200.0, reward_mean=0.5),
            dict(name="lora_rank=8", status="failed", reason="out of memory (killed by SIGKILL)")]
    assert sweep.plot(rows, tmp_path / "a.png", classify=False) == 2
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep.plot(rows[2:], tmp_path / "b.png", classify=False) == 0 and not (tmp_path / "b.png").exists()
    assert sweep.best_row(rows, classify=False)["name"] == "lora_rank=0"
    assert sweep.best_row(rows, classify=True)["name"] == "lora_rank=4"
    md = sweep.results_table(rows, True, ["--task", "classify"])
    assert "| ★ | lora_rank=4 |" in md and "| reward mean |" in md and "| test accuracy |" in md
    assert "test loss" not in md and "| 0.9000 | " in md
    assert "failed: out of memory (killed by SIGKILL)" in md


def test_sweep_default_grid_and_every_row_failed(tmp_path):
    # no --set: the offline default grid, said in one line; a model that is not there fails every row
    r = _sweep(["--out_dir", str(tmp_path / "sw"), "--init_from", str(tmp_path / "missing"), "--max_steps", "1"])
    assert "no --set: the default sweep lora_rank=0,2,8" in r.stdout
    assert r.returncode == 2 and r.stderr.startswith("error: every configuration failed; the first: error:")
    rows = _rows(tmp_path / "sw")
    assert [row["name"] for row in rows] == ["lora_rank=0", "lora_rank=2", "lora_rank=8"]
    assert all(row["status"] == "failed" and str(tmp_path / "missing") in row["reason"] for row in rows)
    assert not (tmp_path / "sw" / "results.png").exists()
    assert "failed: error:" in (tmp_path / "sw" / "results.md").read_text()


# -----------------------------------------------------------------------------------------------
# bench_speed.py and bench_memory.py


def test_bench_speed_hellaswag_work_ratios_formula():
    """The benchmark's arithmetic bound, against the count done by hand for one item."""
    from model import GPTConfig

    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=400))
    P = sum(p.numel() for p in model.transformer.h.parameters())
    H = 400 * model.config.n_embd
    ctx = list(range(10))
    requests = [(ctx, list(range(n)), n) for n in (2, 3, 4, 5)]  # 14 ending tokens
    shared = 10 * P + 14 * (P + H)
    w = bench_speed.work_ratios(model, requests)
    assert w["naive"] == pytest.approx((40 + 14) * (P + H) / shared)
    assert w["one ending per forward"] == pytest.approx(((40 + 14) * P + 14 * H) / shared)


def test_bench_speed_nf4_loss_and_step_time_on_a_trained_model(train_corpus, tmp_path, capsys):
    _, _, data, _ = train_corpus
    _train(data, tmp_path / "o", "--max_steps", "30")
    losses = bench_speed.main(["nf4", "--init_from", str(tmp_path / "o" / "ckpt" / "model"), "--data_dir", str(data),
                               "--nf4_tokens", "2048", "--rounds", "1", "--batch_size", "2", "--seq_len", "64"])
    assert losses["fp32"] < math.log(512) - 0.5  # a trained model: the held-out loss is below uniform's
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 and abs(losses["NF4 (bf16 compute)"] - losses["fp32"]) < 0.3
    out = capsys.readouterr().out
    assert "NF4 / bfloat16:" in out and "NF4 / float32:" in out


def _mlp(frozen=()):
    """Linear(A,B) GELU Linear(B,C) GELU Linear(C,D), the stack of the hand-counted tests below."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 12), torch.nn.GELU(),
                            torch.nn.Linear(12, 4))
    for i in frozen:
        m[i].requires_grad_(False)
    return m


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}])
def test_memory_tracker_parameters_gradients_adamw_state_by_hand(impl):
    from bench_memory import MemoryTracker

    model = _mlp(frozen=[0])  # a frozen layer: no gradient, no optimizer state
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, **impl)
    with MemoryTracker(model, opt) as mt:
        for _ in range(2):  # gradient accumulation: the second backward adds into the same .grad
            model(torch.randn(32, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    params, grads = _nbytes(model.parameters()), _nbytes(trainable)
    assert mt.peaks["parameters"] == params == 4 * (8 * 16 + 16 + 16 * 12 + 12 + 12 * 4 + 4)
    assert mt.peaks["gradients"] == grads and mt.at_end["gradients"] == 0  # zero_grad frees them
    # AdamW: exp_avg and exp_avg_sq (fp32) per trainable tensor, and a 0-dim fp32 step counter each
    assert mt.peaks["optimizer"] == mt.at_end["optimizer"] == 2 * grads + 4 * len(trainable)


@pytest.mark.parametrize("frozen, saved", [
    # trainable: Linear1 saves x (N*A) to give its weight a gradient, GELU1 its input h1 (N*B), Linear2
    # gelu(h1) (N*B), GELU2 h2 (N*C), Linear3 gelu(h2) (N*C); the weights they use are parameters
    ((), 8 + 2 * 16 + 2 * 12),
    # Linear2 and Linear3 frozen (what LoRA does to the base): a frozen linear needs no input for its
    # weight's gradient, and the input's gradient needs only the weight: gelu(h1), gelu(h2) not saved
    ((2, 4), 8 + 16 + 12)])
def test_memory_tracker_activations_of_linear_gelu_stack_by_hand(frozen, saved):
    from bench_memory import CATEGORIES, MemoryTracker

    model = _mlp(frozen)
    with MemoryTracker(model) as mt:
        loss = model(torch.randn(32, 8)).sum()
        assert mt.current["activations"] == 4 * 32 * saved  # fp32, N = 32
        loss.backward()
        assert mt.current["activations"] == 0  # backward freed the graph: the frees are seen
    assert mt.peaks["activations"] == 4 * 32 * saved
    assert mt.peaks["total"] == sum(mt.at_total_peak[c] for c in CATEGORIES)


def test_memory_tracker_total_equals_pytorch_memtracker():
    """An independent implementation (PyTorch's MemTracker) sees the same total at the step's peak."""
    from bench_memory import MemoryTracker

    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    totals = []
    for theirs in (False, True):
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters())
        tracker = mem_tracker.MemTracker() if theirs else MemoryTracker(model, opt)
        if theirs:
            tracker.track_external(model, opt)
        with tracker:
            model(torch.randn(32, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        totals.append(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] if theirs
                      else tracker.peaks["total"])
    assert totals[0] == totals[1]


BM_ARGS = ["--model", "tiny-gpt2", "--overrides", "n_layer=2,n_embd=128,vocab_size=2048", "--max_examples", "8",
           "--max_length", "128", "--batch_size", "8", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench_memory_rows(tmp_path_factory):
    import bench_memory

    out_dir = tmp_path_factory.mktemp("bm")
    bench_memory.main(BM_ARGS + ["--axes", "ga,mp,lora,gc,optimizer", "--optimizers", "adam,sgd_momentum,sgd,bogus",
                                 "--out_dir", str(out_dir)])
    out = out_dir / "bench_memory.md"
    rows = {r["key"]: r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines())}
    return out, rows


def test_bench_memory_derived_table_from_exact_columns(bench_memory_rows):
    out, rows = bench_memory_rows
    fields = {"config", "key", "status", "peak_mb", "params_mb", "grads_mb", "optimizer_mb", "activations_mb",
              "temporaries_mb", "process_peak_mb", "seconds", "seconds_spread", "tokens_per_s", "trainable"}
    assert all(fields <= set(r) for r in rows.values() if r["status"] == "ok")
    base = rows["ga=1 fp32 full no-gc adamw"]
    assert base["process_peak_mb"] > 0 and base["method"].startswith("exact live tensor bytes")
    n = sum(p.numel() for p in GPT(GPTConfig.preset("tiny-gpt2", n_layer=2, n_embd=128, vocab_size=2048,
                                                    block_size=128)).parameters())
    assert base["params_mb"] == pytest.approx(4 * n / 2 ** 20, abs=0.2)  # + the causal-mask buffer at most
    assert base["grads_mb"] == pytest.approx(4 * n / 2 ** 20)
    assert base["optimizer_mb"] == pytest.approx(8 * n / 2 ** 20, abs=0.01)
    sgd, mom, adam = (rows[f"ga=1 fp32 full no-gc {o}"]["optimizer_mb"] for o in ("sgd", "sgd_momentum", "adam"))
    assert sgd == 0 and mom == pytest.approx(4 * n / 2 ** 20) and adam == pytest.approx(8 * n / 2 ** 20, abs=0.01)
    bad = rows["ga=1 fp32 full no-gc bogus"]
    assert bad["status"] == "failed" and "optimizer 'bogus'" in bad["reason"]
    md = out.read_text()
    assert "× (error: optimizer 'bogus'" in md
    arrows = {line.split(" | ")[0][2:]: line.split(" | ")[1:5] for line in md.splitlines()
              if line.startswith(("| gradient acc", "| mixed", "| LoRA |", "| gradient check"))}
    # parameters, activations, gradients, optimizer state. LoRA lowers activations: the frozen linears
    # keep no inputs (the hand-counted test above), and the q,v adapters' saved tensors are small.
    assert arrows == {"gradient accumulation": ["–", "↓", "–", "–"], "mixed precision (bf16)": ["–", "↓", "–", "–"],
                      "LoRA": ["–", "↓", "↓", "↓"], "gradient checkpointing": ["–", "↓", "–", "–"]}
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("lora_rank, quant", [(0, "none"), (16, "none"), (16, "nf4")])
def test_bench_memory_estimate_within_10_percent_on_llama_135m(lora_rank, quant):
    """finetune.estimate_memory against the exact tracker, on a LLaMA-shaped model the CPU can train:
    full fine-tuning, LoRA, and LoRA on a 4-bit base (fp32 compute: this CPU's fast dtype)."""
    import bench_memory

    args = bench_memory.parse_args(["--model", "llama-135m", "--max_examples", "2", "--batch_size", "2",
                                    "--max_length", "128"])
    c = dict(bench_memory.BASE, lora=lora_rank, quant=quant)
    measured, est = bench_memory.run_config(c, args), bench_memory.estimate_config(c, args)
    for col in ("peak_mb", "params_mb", "grads_mb", "optimizer_mb", "activations_mb"):
        assert est[col] == pytest.approx(measured[col], rel=0.10), col


def test_bench_memory_flags_and_their_former_names():
    import bench_memory

    for new, old in ((["--max_examples", "3"], ["--samples", "3"]), (["--out_dir", "x.md"], ["--out", "x.md"])):
        assert vars(bench_memory.parse_args(new)) == vars(bench_memory.parse_args(old))
    assert bench_memory.parse_args([]).out_dir == "out/bench"  # a folder: bench_memory.md, .jsonl, .png in it


def test_bench_speed_flags_and_their_former_names():
    parse = bench_speed.build_parser().parse_args
    for new, old in ((["--limit", "3"], ["--items", "3"]), (["--out_dir", "x"], ["--out", "x"])):
        assert vars(parse(["hellaswag"] + new)) == vars(parse(["hellaswag"] + old))


def test_bench_speed_tokens_counts_a_text_at_hand_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_speed, "SHARED_DATA", tmp_path / "absent")
    [(label, text)] = bench_speed.token_count_texts(None)  # no test data beside the checkout: Python's own docs
    assert label == "pydoc_data topics" and len(text) > 100_000
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "english_pd.txt").write_text("Some English.")
    assert bench_speed.token_count_texts(None) == [(str(tmp_path / "absent" / "english_pd.txt"), "Some English.")]
    (tmp_path / "mine.txt").write_text("mine")
    assert bench_speed.token_count_texts([str(tmp_path / "mine.txt")]) == [(str(tmp_path / "mine.txt"), "mine")]


def test_bench_memory_estimate_llama2_7b_full_40gb_and_qlora_under_10gb(tmp_path):
    import bench_memory

    big = tmp_path / "7b.md"
    bench_memory.main(["--model", "llama2-7b", "--samples", "8", "--axes", "lora", "--estimate",
                       "--gpu_memory_gb", "40", "--out", str(big)])
    r7 = {r["key"]: r for r in map(json.loads, big.with_suffix(".jsonl").read_text().splitlines())}
    full = r7["ga=1 fp32 full no-gc adamw"]
    assert full["status"] == "failed" and "> 40 GB" in full["reason"]  # fp32 AdamW: 7B x 16 bytes
    assert full["peak_mb"] > 6.7e9 * 16 / 2 ** 20 and full["fsdp_mb"] < 40 * 1024  # FSDP/8 fits
    assert r7["ga=1 fp32 lora r=16 no-gc adamw"]["status"] == "estimate"
    # QLoRA: LoRA r=16 on q,v, batch 4 x 512 tokens, checkpointing, NF4 base
    q = tmp_path / "q.md"
    bench_memory.main(["--model", "llama2-7b", "--estimate", "--axes", "quant", "--gc_only", "--batch_size", "4",
                       "--samples", "4", "--max_length", "512", "--full_length", "--out", str(q)])
    rq = {r["config"]["quant"]: r for r in map(json.loads, q.with_suffix(".jsonl").read_text().splitlines())}
    assert rq["nf4"]["peak_mb"] < 10 * 1024 < rq["none"]["peak_mb"]
    assert rq["nf4"]["params_mb"] < 0.3 * rq["none"]["params_mb"] + 1024  # embeddings and head stay 16-bit


# -----------------------------------------------------------------------------------------------
# past one device: finetune.py and dpo.py under torchrun (DDP, FSDP2), on gloo CPU processes


def _torchrun(n, script, *args, cwd=None):
    r = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={n}", str(ROOT / script), *map(str, args)],
                       cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out, key="loss"):
    return [r[key] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_distributed_finetune_ddp_and_fsdp_equal_one_process(tmp_path, lora_rank):
    """2 ranks x 2 accumulation steps see the same 8 examples per step as 1 process x 4: the same
    losses (fp32), and an FSDP run's saved model and adapter load in one process with its logits."""
    data = _ft_setup(tmp_path)
    flags = ["--init_from", tmp_path / "model", "--tokenizer", tmp_path / "tok", "--data_file", data, "--max_steps", 4,
             "--eval_interval", 2, "--batch_size", 2, "--val_frac", 0.15, "--num_samples", 1, "--max_new_tokens", 4,
             "--lora_dropout", 0, "--lr", 1e-2 if lora_rank else 1e-3, "--lora_rank", lora_rank]
    finetune.main(list(map(str, flags + ["--out_dir", tmp_path / "one", "--grad_accum", 4])))
    runs = {"fsdp": ["--fsdp"]} if lora_rank == 0 else {"ddp": [], "fsdp": ["--fsdp"]}
    for name, extra in runs.items():
        _torchrun(2, "finetune.py", *flags, "--out_dir", tmp_path / name, "--grad_accum", 2, *extra)
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5), name
        assert _losses(tmp_path / name, "val_loss") == pytest.approx(_losses(tmp_path / "one", "val_loss"), rel=1e-5)
    one, fsdp = (GPT.from_pretrained(tmp_path / d / "best_model") for d in ("one", "fsdp"))
    with torch.no_grad():
        ref = one(IDX % 400)[0]
        assert max_diff(fsdp(IDX % 400)[0], ref) < 1e-5
        if lora_rank:  # the adapter saved under FSDP, on the base in one process
            base = load_adapter(GPT.from_pretrained(tmp_path / "model"), tmp_path / "fsdp" / "best_adapter")
            assert max_diff(base(IDX % 400)[0], ref) < 1e-5


def test_distributed_fsdp_holds_half_the_training_state_per_rank_and_resumes(tmp_path):
    """FSDP2 on 2 ranks: each holds about half of the parameter, gradient and optimizer-state bytes (counted
    by bench_memory's exact tracker); a run stopped at step 2 and resumed under FSDP continues with the
    uninterrupted losses."""
    script = tmp_path / "shards.py"
    script.write_text(f"""import sys, torch, json
sys.path.insert(0, {str(ROOT)!r})
from bench_memory import MemoryTracker
from model import GPT, GPTConfig, Block, make_optimizer
from housekeeping import distribute, end_distributed, init_distributed
rank, _, world = init_distributed("cpu")
torch.manual_seed(0)
m = GPT(GPTConfig.preset("tiny-llama", vocab_size=256))
full = sum(p.numel() * p.element_size() for p in m.parameters())
distribute(m, "cpu", fsdp=True, block_type=Block)
opt = make_optimizer(m, "adamw", 1e-3)
x = torch.randint(0, 256, (2, 16))
with MemoryTracker(m, opt) as mt:
    m(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
sys.stdout.write(json.dumps(dict(rank=rank, full=full, **mt.peaks)) + "\\n")  # one write: the ranks share a pipe
end_distributed()
""")
    r = _torchrun(2, script)
    for row in map(json.loads, r.stdout.strip().splitlines()):
        # fp32 on CPU: gradients are as large as the weights, AdamW's two moments twice as large
        for k, full in (("parameters", row["full"]), ("gradients", row["full"]), ("optimizer", 2 * row["full"])):
            assert row[k] == pytest.approx(full / 2, rel=0.05), (row["rank"], k)
    data = _ft_setup(tmp_path)
    flags = ["--init_from", tmp_path / "model", "--tokenizer", tmp_path / "tok", "--data_file", data, "--max_steps", 4,
             "--eval_interval", 2, "--batch_size", 2, "--grad_accum", 2, "--val_frac", 0.15, "--num_samples", 0,
             "--lora_rank", 4, "--lora_dropout", 0.1, "--lr", 1e-2, "--fsdp", "--ckpt_interval", 2]
    _torchrun(2, "finetune.py", *flags, "--out_dir", tmp_path / "whole")
    _torchrun(2, "finetune.py", *flags, "--out_dir", tmp_path / "cut", "--stop_at_step", 3)
    _torchrun(2, "finetune.py", "--out_dir", tmp_path / "cut", "--resume")
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)


def test_distributed_ranks_draw_their_own_dropout_and_resume_exactly(train_corpus, tmp_path):
    script = tmp_path / "masks.py"
    script.write_text(f"""import sys, json, torch
sys.path.insert(0, {str(ROOT)!r})
from housekeeping import all_ranks, end_distributed, init_distributed, seed_everything
rank, _, _ = init_distributed("cpu")
seed_everything(1337 + rank)  # what the scripts do once the model is built
masks = all_ranks(torch.nn.functional.dropout(torch.ones(64), 0.5).tolist())
sys.stdout.write(json.dumps(masks[0] != masks[1]) + "\\n")  # one write: the ranks share a pipe
end_distributed()
""")
    assert _torchrun(2, script).stdout.split() == ["true", "true"]
    # with dropout on, a 2-rank run killed after its step-2 checkpoint and resumed gives the uninterrupted
    # losses: every rank restores its own random streams
    _, _, data_dir, _ = train_corpus
    args = ["--data_dir", data_dir, *TINY, "--max_steps", 4, "--ckpt_interval", 2, "--dropout", 0.1,
            "--total_batch_size", 1024, "--eval_interval", 0, "--num_samples", 0]
    _torchrun(2, "train_gpt2.py", *args, "--out_dir", tmp_path / "whole")
    _torchrun(2, "train_gpt2.py", *args, "--out_dir", tmp_path / "cut", "--stop_at_step", 3)
    _torchrun(2, "train_gpt2.py", "--out_dir", tmp_path / "cut", "--resume")
    whole, cut = _log(tmp_path / "whole")[0], _log(tmp_path / "cut")[0]
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and [r["loss"] for r in cut] == [r["loss"] for r in whole]


def test_distributed_dpo_equal_one_process(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rnd = random.Random(0)
    words = "red blue green cat dog sun tree big small fast".split()
    data.write_text("".join(json.dumps({"prompt": f"Say {a}:", "chosen": f" {a} {a}", "rejected": f" {b} {b}"}) + "\n"
                            for a, b in (rnd.sample(words, 2) for _ in range(40))))
    _ft_setup(tmp_path)
    for ref, mode in (("adapter_off", "--fsdp"), ("precomputed", None)):
        flags = ["--init_from", tmp_path / "model", "--tokenizer", tmp_path / "tok", "--data_file", data,
                 "--max_steps", 3,
                 "--eval_interval", 3, "--batch_size", 2, "--num_samples", 1, "--max_new_tokens", 4, "--lr", 5e-2,
                 "--reference", ref, "--warmup_steps", 1, "--lora_rank", 4]
        dpo.main(list(map(str, flags + ["--out_dir", tmp_path / f"one-{ref}", "--grad_accum", 4])))
        _torchrun(2, "dpo.py", *flags, "--out_dir", tmp_path / f"two-{ref}", "--grad_accum", 2,
                  *([mode] if mode else []))
        one, two = _losses(tmp_path / f"one-{ref}"), _losses(tmp_path / f"two-{ref}")
        assert two == pytest.approx(one, rel=1e-5) and one[-1] < one[0], ref
        assert (tmp_path / f"two-{ref}" / "model" / "gpt_config.json").exists()
def test_torchrun_a_refusal_on_rank_0_is_one_line_and_every_rank_exits_2(tmp_path):
    """A 2-rank run on a directory that holds a run: rank 0 refuses (no --resume or --overwrite) and tells
    the other rank before any collective. The `error:` line is printed once, no rank prints a traceback
    (torchrun's own summary follows, and names the error through its error file), and every rank exits 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
    r = _run(tmp_path, "torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "train_gpt2.py"),
             "--out_dir", out, "--device", "cpu", timeout=300)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    ours = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "holds a run (log.jsonl)" in ours[0], text[-3000:]
    assert "train_gpt2.py\", line" not in text and "housekeeping.py\", line" not in text, text[-3000:]  # no rank's traceback
    # every rank exits 2 (torchrun may stop the second one first, once the first has ended: SIGTERM)
    codes = regex.findall(r"exitcode\s*: (-?\d+)", text)
    assert "2" in codes and set(codes) <= {"2", "-15"}, text[-3000:]
    assert f"traceback : {ours[0]}" in text, text[-3000:]  # torchrun's summary names the error
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]  # nothing written, no lone run.lock


# -----------------------------------------------------------------------------------------------
# GPU paths, checked on a CPU: compile graphs, precision and device pickers, host syncs, GQA, peaks


def test_gpu_compiled_loss_graph_does_not_grow_with_the_batch():
    """Under torch.compile the loss is F.cross_entropy: the traced graph is the same size at 4 x 64 and
    at 64 x 1024 tokens (a chunk loop would be unrolled), and its loss and gradients equal eager's."""
    sizes = []

    def backend(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        return gm.forward

    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=256, block_size=1024, n_layer=1))
    compiled = torch.compile(m, backend=backend, dynamic=False)
    for B, T in ((4, 64), (64, 1024)):
        torch._dynamo.reset()
        x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(B))
        m.zero_grad()
        loss = compiled(x, x)[1]
        loss.backward()
        got = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        logits = m(x)[0]
        ref = F.cross_entropy(logits.reshape(-1, 256), x.reshape(-1))
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert all(torch.allclose(got[n], p.grad, atol=1e-6) for n, p in m.named_parameters())
    assert len(sizes) == 2 and abs(sizes[0] - sizes[1]) <= 3, sizes


def test_gpu_precision_and_device_pickers(monkeypatch):
    for capability, want in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert housekeeping.pick_precision("auto", "cuda:0") == want  # T4/V100 run bf16 only emulated
    assert housekeeping.pick_precision("auto", "cpu") == "fp32" and housekeeping.pick_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="--device nosuch: expected"):
        housekeeping.pick_device("nosuch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine's PyTorch has no cuda device"):
        housekeeping.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the picker asks
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert housekeeping.pick_device("cuda") == "cuda:3" and housekeeping.pick_device("cpu") == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert housekeeping.pick_device("cuda") == "cuda"
    assert train_gpt2.gpu_peak_flops("NVIDIA L40") == 181e12 and train_gpt2.gpu_peak_flops("NVIDIA L4") == 121e12
    assert train_gpt2.gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert train_gpt2.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and train_gpt2.gpu_peak_flops("Some GPU") is None


class _ScalarReads(__import__("torch.utils._python_dispatch", fromlist=["x"]).TorchDispatchMode):
    """Counts aten._local_scalar_dense: what .item(), int(t) and bool(t) call, each a host-device sync."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_gpu_no_host_sync_inside_a_micro_step():
    torch.manual_seed(0)
    m = apply_lora(GPT(GPTConfig.preset("tiny-gpt2", vocab_size=128, block_size=256)), 4, 8, targets="all")
    tok = _CharTok()
    data = [finetune.tokenize_example({"instruction": "Echo.", "input": "a" * k, "output": "b" * k}, tok, 127, 255)
            for k in (3, 5, 7, 9)]
    micro = [finetune.collate(data[:2]), finetune.collate(data[2:])]
    opt = model_py.make_optimizer(m, "adamw", 1e-3, fused=True)  # as on a GPU: no per-tensor step reads
    n_total = torch.tensor(sum(label != -100 for d in data for label in d["labels"]))  # finetune counts on the host
    loss_accum = torch.zeros(())
    with _ScalarReads() as reads:  # finetune's micro-steps: forward, token_weighted, backward
        for idx, targets in micro:
            loss = finetune.token_weighted(m(idx, targets)[1], (targets != -100).sum(), n_total)
            loss.backward()
            loss_accum += loss.detach().float()
    assert reads.n == 0
    with _ScalarReads() as reads:  # the rest of finetune's step: clip, step, zero_grad, one read of loss and norm
        norm = torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.stack([loss_accum.float(), norm.float()]).tolist()
    assert reads.n <= 4
    pairs = _dpo_tiny_pairs(4, 0)
    policy = _dpo_tiny_policy()
    ref = dpo.Reference("adapter_off", policy)
    idx, labels = dpo.collate_pairs(pairs, 0)
    with _ScalarReads() as reads:
        _dpo_backward(policy, ref, [(idx, labels, ["a", "b", "c", "d"])] * 2, dpo.DPOConfig())
    assert reads.n == 0


def test_gpu_gqa_saves_no_copy_of_k_and_v_and_dpo_logps_are_chunked():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny-llama", vocab_size=128, n_head=4, n_kv_head=2)
    m = GPT(cfg)
    x = torch.randint(0, 128, (2, 24))
    manual = GPT(dataclasses.replace(cfg, attn_impl="manual"))  # repeats k and v, the textbook way
    manual.load_state_dict(m.state_dict())
    assert max_diff(m(x)[0], manual(x)[0]) < 1e-5
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        m(x, x)[1].backward()
    full = (2, cfg.n_head, 24, cfg.head_dim)
    assert shapes.count(full) == 2 * cfg.n_layer  # q and the output: no k or v repeated to n_head heads
    assert shapes.count((2, cfg.n_kv_head, 24, cfg.head_dim)) >= 2 * cfg.n_layer
    # DPO: log-probs of the labelled tokens, as a direct log-softmax gives them, without any fp32 copy
    # of the whole logits (what the log-probs add is chunk-sized)
    pairs = _dpo_tiny_pairs(3, 1)
    torch.manual_seed(0)
    policy = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=65536, n_embd=16))  # logits dominate; 32-row chunks
    idx, labels = dpo.collate_pairs(pairs, 0)
    logits = policy(idx)[0]
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = (ref * (labels != -100)).sum(-1)
    new = {}  # storage -> bytes, of every tensor an op makes (views share their base's storage)

    class Sizes(__import__("torch.utils._python_dispatch", fromlist=["x"]).TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    new.setdefault(t.untyped_storage().data_ptr(), (func, t.untyped_storage().nbytes()))
            return out

    with Sizes():
        c, r = dpo.concatenated_logps(policy, idx, labels)
        c.sum().backward()
    assert torch.allclose(torch.cat([c, r]), ref, atol=1e-5)
    big = [str(f) for f, n in new.values() if n >= logits.numel() * 4]
    # the output layer's matmul and its gradient are logits-sized; no log-softmax copy besides them
    assert all("mm" in f or "empty" in f for f in big) and len(big) <= 2, big


# -----------------------------------------------------------------------------------------------
# nothing lost, nothing silent: run directories, bad input, one-line errors


def _hashes(d) -> dict:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file() and p.name != "run.lock"}


def _cli(script, *args, cwd=None, stdin=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _user_error(r, *needles):
    """Exit status 2, no traceback, and the last line an error naming what is wrong."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "error:" in last and all(n in last for n in needles), last
    return last


def test_robust_a_fresh_run_never_overwrites_a_run(train_corpus, tmp_path):
    _, _, data_dir, _ = train_corpus
    out = tmp_path / "o"
    _train(data_dir, out, "--max_steps", 4, "--ckpt_interval", 2)
    before = _hashes(out)
    r = _cli("train_gpt2.py", "--data_dir", data_dir, "--out_dir", out, *TINY, "--max_steps", 2)
    _user_error(r, str(out), "--resume", "--overwrite")
    assert _hashes(out) == before  # nothing touched
    train, evals = _train(data_dir, out, "--max_steps", 2, "--overwrite")  # --overwrite: the old run is gone
    assert [r["step"] for r in train] == [1, 2] and [e["step"] for e in evals] == [0, 2]
    assert torch.load(out / "ckpt" / "state.pt", weights_only=True)["step"] == 2


def test_robust_a_second_live_run_on_one_out_dir_stops_naming_the_holder(train_corpus, tmp_path):
    _, _, data_dir, _ = train_corpus
    out = tmp_path / "busy"
    housekeeping.open_run(out)  # this process holds the run now
    r = _cli("train_gpt2.py", "--data_dir", data_dir, "--out_dir", out, *TINY, "--max_steps", 2)
    _user_error(r, str(out), f"pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_robust_endoftext_written_in_text_stays_text(tmp_path, train_corpus):
    _ft_setup(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    eot = tok.eot_id
    t = finetune.tokenize_example({"instruction": "Say <|endoftext|>.", "input": "", "output": "a <|endoftext|> b"},
                                  tok, eot, 200)
    assert t["input_ids"].count(eot) == 0 and t["labels"].count(eot) == 1 and t["labels"][-1] == eot
    pairs = dpo.tokenize_pairs([{"prompt": "Q <|endoftext|>", "chosen": " yes <|endoftext|>", "rejected": " no"}],
                               tok, eot, 100, 50)
    assert [pairs[0][k].count(eot) for k in ("prompt", "chosen", "rejected")] == [0, 1, 1]
    assert pairs[0]["chosen"][-1] == eot  # only the one the code appends
    docs, tok_dir, _, bpe_tok = train_corpus
    prepare_data.write_shards(["one <|endoftext|> two", "three"] * 40, tmp_path / "s", "s", str(tok_dir), 100, 50)
    shards = prepare_data.list_shards(tmp_path / "s", "val") + prepare_data.list_shards(tmp_path / "s", "train")
    ids = np.concatenate([prepare_data.load_shard(p) for p in shards])
    assert (ids == bpe_tok.special_tokens["<|endoftext|>"]).sum() == 80  # one before each document, no more


def test_robust_a_token_id_out_of_range_in_a_shard_names_the_file(train_corpus, tmp_path):
    _, _, data_dir, _ = train_corpus
    d = tmp_path / "bad"
    shutil.copytree(data_dir, d)
    meta = {"tokenizer": prepare_data.read_header(prepare_data.list_shards(d, "val")[0])["tokenizer"],
            "vocab_size": 512, "eot_id": 511}
    prepare_data.write_shard(d / "tiny_train_000001.bin", np.array([5, 7, 600, 3], dtype=np.uint16), meta)
    with pytest.raises(ValueError, match=r"tiny_train_000001.bin: token id 600 at position 2 is not below the "
                                         r"vocab_size 512"):
        train_gpt2.open_data(d)


def test_robust_a_damaged_log_line_does_not_block_resume(train_corpus, tmp_path, capsys):
    _, _, data_dir, _ = train_corpus
    out = tmp_path / "o"
    _train(data_dir, out, "--max_steps", 4, "--ckpt_interval", 2, "--stop_at_step", 3)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "lo')  # killed while writing
    train, evals = _train(data_dir, out, "--resume")
    assert "log.jsonl: skipped 1 damaged line(s)" in capsys.readouterr().err
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [0, 4]
    assert (out / "loss.png").stat().st_size > 0


def test_robust_bad_flag_values_are_refused_when_parsed(capsys, train_corpus, tmp_path):
    cases = [(finetune.parse_args, ["--max_steps", "-3"], "--max_steps: must be >= 0"),
             (finetune.parse_args, ["--max_length", "-1"], "--max_length: must be >= 0"),
             (finetune.parse_args, ["--n_samples", "-1"], "--n_samples: must be >= 0"),
             (finetune.parse_args, ["--warmup_steps", "-2"], "--warmup_steps: must be >= -1"),
             (train_gpt2.parse_args, ["--total_batch_size", "0"], "--total_batch_size: must be >= 1"),
             (train_gpt2.parse_args, ["--max_steps", "-5"], "--max_steps: must be >= 1"),
             (train_gpt2.parse_args, ["--batch_size", "0"], "--batch_size: must be >= 1"),
             (train_gpt2.parse_args, ["--seq_len", "0"], "--seq_len: must be >= 1"),
             (dpo.parse_args, ["--lora_rank", "-2", "--reference", "copy"], "--lora_rank: must be >= 0"),
             (dpo.parse_args, ["--eval_interval", "0"], "--eval_interval: must be >= 1"),
             (dpo.parse_args, ["--max_length", "-1"], "--max_length: must be >= 2")]
    for parse, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, argv  # one line, no usage block
    # values only the run can check: still one line each
    _user_error(_cli("chat.py", "--device", "nosuch", "--prompt", "hi"), "--device nosuch: expected")
    _user_error(_cli("bench_memory.py", "--estimate", "--overrides", "foo=1", "--out", tmp_path / "b.md"),
                "'foo' is not a GPTConfig field")
    _user_error(_cli("sweep.py", "--resume", "--out_dir", tmp_path / "sw"), "holds no sweep to continue")
    _user_error(_cli("bench_speed.py", "train", "--precision", "fp64"), "--precision")
    _, _, data_dir, _ = train_corpus
    _train(data_dir, tmp_path / "o", "--max_steps", 2)
    before = _hashes(tmp_path / "o")
    with pytest.raises(ValueError, match=r"--resume continues the architecture, optimizer and data .* --n_embd 96 "
                                         r"\(checkpoint: 64\)"):
        _train(data_dir, tmp_path / "o", "--resume", "--n_embd", 96)
    # every flag that defines the run, changed on --resume: one line naming it
    for name, value in {"model": "tiny-llama", "init_from": str(tmp_path / "o"), "n_layer": 3, "n_head": 2,
                        "block_size": 32, "optimizer": "adamw"}.items():
        with pytest.raises(ValueError, match=f"these flags differ: --{name} "):
            _train(data_dir, tmp_path / "o", "--resume", f"--{name}", value)
    # the data is part of the run: other shards are refused, the same shards spelt otherwise are not
    other = tmp_path / "other_data"
    shutil.copytree(data_dir, other)
    with pytest.raises(ValueError, match=r"these flags differ: --data_dir"):
        _train(other, tmp_path / "o", "--resume")
    assert _hashes(tmp_path / "o") == before
    _train(Path(os.path.relpath(data_dir)), tmp_path / "o", "--resume", "--max_steps", 3)


def test_robust_odd_but_valid_input(tmp_path, capsys):
    # DPO: an empty prompt reads as the end-of-text token; the step runs
    tok = _CharTok()
    pairs = dpo.tokenize_pairs([{"prompt": "", "chosen": "ab", "rejected": "c"}], tok, tok.eot_id, 50, 20)
    assert pairs[0]["prompt"] == [tok.eot_id]
    torch.manual_seed(0)
    policy = apply_lora(GPT(GPTConfig.preset("tiny-gpt2", vocab_size=128)), 4, 8)
    idx, labels = dpo.collate_pairs(pairs, 0)
    ref = dpo.Reference("adapter_off", policy)
    m = _dpo_backward(policy, ref, [(idx, labels, ["k"])], dpo.DPOConfig())
    assert math.isfinite(m["loss"].item())
    # HellaSwag: four empty endings, and a single item (no standard error from one outcome)
    d = tmp_path / "m"
    _hs_hf_model("gpt2", len(_hs_save_tokenizer(d)), d)
    model, hs_tok = hellaswag.load_model(str(d), None, "ours")
    empty = prepare_data.hellaswag_item(dict(HS_ITEMS[0], endings=["", "", "", ""]), "x")
    r = hellaswag.evaluate(model, hs_tok, [empty])
    assert r["n"] == 1 and r["acc_stderr"] is None and "± n/a" in hellaswag.summary_line(r)
    # a truncated reference cache is rebuilt, with a warning
    cache = tmp_path / "ref.json"
    cache.write_text('{"tag": "t", "logps": {"a": [1.0, ')
    ref = dpo.Reference("adapter_off", policy)
    assert dpo.precompute_reference(ref, pairs, ["k"], 0, "cpu", 1, cache, "t") == 1
    assert "ref.json is damaged" in capsys.readouterr().out and json.loads(cache.read_text())["tag"] == "t"


def test_robust_user_errors_are_one_line_without_traceback(train_corpus, tmp_path, monkeypatch):
    data = _ft_setup(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data.read_bytes() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    before = _hashes(tmp_path)
    for script, extra in (("finetune.py", ["--tokenizer", tmp_path / "tok", "--data_file", bad]),
                          ("dpo.py", ["--tokenizer", tmp_path / "tok", "--data_file", bad])):
        r = _cli(script, "--init_from", tmp_path / "model", *extra, "--out_dir", tmp_path / f"out-{script}")
        _user_error(r, "bad.jsonl:49: not UTF-8 text")
    r = _cli("hellaswag.py", "--init_from", tmp_path / "model", "--tokenizer", tmp_path / "tok", "--data_file", bad)
    _user_error(r, "bad.jsonl:49: not UTF-8 text")
    assert _hashes(tmp_path) == {**before, **{k: v for k, v in _hashes(tmp_path).items() if k.startswith("out-")}}
    # truncated weights and a truncated training state name their file
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "model", cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:5000])
    _user_error(_cli("chat.py", "--init_from", cut, "--tokenizer", tmp_path / "tok", "--prompt", "hi"),
                "model.safetensors", "truncated")
    _, _, data_dir, _ = train_corpus
    run = tmp_path / "run"
    _train(data_dir, run, "--max_steps", 2)
    (run / "ckpt" / "state.pt").write_bytes((run / "ckpt" / "state.pt").read_bytes()[:3000])
    _user_error(_cli("train_gpt2.py", "--out_dir", run, "--resume"), "state.pt", "truncated")
    # an out_dir that cannot be written is found before any work
    _user_error(_cli("train_gpt2.py", "--data_dir", data_dir, "--out_dir", "/proc/nano-llm-test", *TINY),
                "--out_dir /proc/nano-llm-test: cannot write there")
    # a full disk while checkpointing: the temporary files go, the previous checkpoint stays, the cause is named
    run = tmp_path / "run2"
    _train(data_dir, run, "--max_steps", 2)
    keep = _hashes(run / "ckpt")

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(train_gpt2.torch, "save", full)
    monkeypatch.setattr(train_gpt2.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError, match="writing the step-4 checkpoint failed .the disk is full.; the previous"):
        _train(data_dir, run, "--resume", "--max_steps", 4)
    assert not (run / "ckpt.tmp").exists() and _hashes(run / "ckpt") == keep


def test_robust_a_tokenizer_file_with_a_custom_regex_needs_trust(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    Tokenizer(ranks, pattern="(a|aa)+$").save(tmp_path / "slow.bpe")  # exponential on "a" * 41 + "b"
    with pytest.raises(ValueError, match=r"slow.bpe, line 2: the split pattern is not a built-in one"):
        Tokenizer.load(tmp_path / "slow.bpe")
    assert Tokenizer.load(tmp_path / "slow.bpe", trust_pattern=True).pattern == "(a|aa)+$"
    r = _bpe_cli("encode", "--tokenizer", tmp_path / "slow.bpe", "--text", "a", cwd=tmp_path)
    assert r.returncode == 2 and "--trust_pattern" in r.stderr and "Traceback" not in r.stderr


def test_robust_checkpoints_and_exports_get_the_usual_file_mode(train_corpus, tmp_path):
    old = os.umask(0o022)
    try:
        _, _, data_dir, _ = train_corpus
        _train(data_dir, tmp_path / "o", "--max_steps", 2)
        m = GPT.from_pretrained(tmp_path / "o" / "ckpt" / "model")
        m.save_pretrained(tmp_path / "export")
        apply_lora(m, 2, 4)
        save_adapter(m, tmp_path / "adapter")
        files = [p for d in ("o/ckpt", "export", "adapter") for p in (tmp_path / d).rglob("*") if p.is_file()]
        assert files and {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    finally:
        os.umask(old)


# -----------------------------------------------------------------------------------------------
# nothing lost: --overwrite removes only our runs, NaN is never a value, stale caches are refused,
# sizes beyond the machine and hostile files are one error line


def _one_error_line(capsys, *needles) -> str:
    """The captured stderr holds exactly one `error:` line, naming every needle."""
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


def _refused(capsys, fn, argv, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        housekeeping.run_main(fn, argv)
    assert e.value.code == 2
    return _one_error_line(capsys, *needles)


def test_overwrite_removes_only_what_our_runs_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    (d / "notes").mkdir(parents=True)
    (d / "thesis.txt").write_text("x")
    # the reported command: not a run of ours, so nothing is removed
    _refused(capsys, train_gpt2.main, ["--overwrite", "--max_steps", "1", "--out_dir", str(d), "--recipe", "cpu"],
             "--overwrite", "notes/", "thesis.txt", "no run of ours")
    assert (d / "thesis.txt").read_text() == "x" and (d / "notes").is_dir() and not (d / "run.lock").exists()
    # a run of ours with a foreign file beside it: refused, naming only that file
    run = tmp_path / "run"
    housekeeping.open_run(run)
    (run / "ckpt").mkdir()
    (run / "log.jsonl").write_text("{}\n")
    (run / "best_adapter.abc123.tmp").write_text("")  # a killed atomic write: ours
    (run / "thesis.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds thesis\.txt, which no run of ours wrote; nothing was removed"):
        housekeeping.open_run(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["best_adapter.abc123.tmp", "ckpt", "log.jsonl", "run.lock",
                                                     "thesis.txt"]
    (run / "thesis.txt").unlink()
    housekeeping.open_run(run, overwrite=True)  # only our files: cleared
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    housekeeping.close_run(run)
    # a run that stopped before its first checkpoint: --resume says both ways out
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(finetune.FinetuneConfig())))
    with pytest.raises(FileNotFoundError, match="no resumable state .* --resume continues from the last checkpoint"
                                                ".* --overwrite"):
        housekeeping.load_train_state(run, None, None)


# every numeric flag of each script, given NaN, +-inf, 0, a negative and 10^13. A value is refused
# (exit 2, one error line naming the flag, nothing written) when it is not finite, outside the
# flag's range, or a size beyond any machine; else it is a valid setting and parsing succeeds.
_SIZE_FLAGS = {"train_gpt2": {"n_layer", "n_head", "n_embd", "block_size", "batch_size", "seq_len", "num_samples",
                             "sample_len"},
              "finetune": {"batch_size", "grad_accum", "lora_rank", "max_new_tokens", "num_classes"},
              "dpo": {"batch_size", "grad_accum", "lora_rank", "max_new_tokens", "max_prompt_length"},
              "rl": {"batch_size", "group_size", "grad_accum", "lora_rank", "max_new_tokens"},
              "chat": {"num_samples", "num_beams", "max_new_tokens"}}


def test_every_numeric_flag_refuses_nan_inf_and_sizes_beyond_the_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # parsing must write nothing here
    scripts = {"train_gpt2": (train_gpt2.TrainConfig, lambda a: train_gpt2.parse_args(a)),
               # --init_from auto needs an earlier stage's model: none in this empty folder
               "finetune": (finetune.FinetuneConfig, lambda a: finetune.parse_args(["--init_from", "gpt2"] + a)),
               "dpo": (dpo.DPOConfig, lambda a: dpo.parse_args(["--init_from", "gpt2"] + a)),
               "rl": (rl.RLConfig, lambda a: rl.parse_args(["--init_from", "gpt2", "--data_file", "sums.jsonl"] + a)),
               "chat": (chat.ChatConfig, chat.parse_args)}
    checked = 0
    for script, (cls, parse) in scripts.items():
        for f in dataclasses.fields(cls):
            kind = str(f.type).split("|")[0].strip()
            if kind not in ("int", "float"):
                continue
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            for text in ("nan", "inf", "-inf", "0", "-1", "10000000000000" if kind == "int" else "1e13"):
                value = float(text)
                valid = (math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
                         and not (value == 1e13 and f.name in _SIZE_FLAGS[script]))
                argv = [f"--{f.name}", text]
                if valid:
                    housekeeping.run_main(parse, argv)
                    capsys.readouterr()
                else:
                    _refused(capsys, parse, argv, f.name)
                checked += 1
    assert checked > 300 and list(tmp_path.iterdir()) == []
    # the messages, as a user reads them
    _refused(capsys, train_gpt2.parse_args, ["--max_lr", "inf"],
             "argument --lr/--max_lr: expected a finite number, got inf")
    _refused(capsys, train_gpt2.parse_args, ["--grad_clip", "nan"], "argument --grad_clip: expected a finite number")
    _refused(capsys, finetune.parse_args, ["--lr", "inf"], "argument --lr: expected a finite number")
    _refused(capsys, dpo.parse_args, ["--beta", "nan"], "argument --beta: expected a finite number")
    _refused(capsys, finetune.parse_args, ["--lora_rank", str(10 ** 13)], "--lora_rank 10000000000000 needs at least",
             "GiB of memory; this machine holds")
    _refused(capsys, train_gpt2.parse_args, ["--n_layer", str(10 ** 13)], "a model of n_layer 10000000000000",
             "needs at least", "this machine holds")
    # sweep.py: its flags are finetune.py's, checked for finite numbers before the sweep writes anything
    for argv, flag in ((["--set", "lr=1e-3,nan"], "--set lr"), (["--lr=inf"], "--lr"),
                       (["--min_lr", "-inf"], "--min_lr")):
        _refused(capsys, sweep.main, argv + ["--out_dir", str(tmp_path / "sw")], flag, "expected a finite number")
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_loss_stops_finetune_and_nan_is_never_best(tmp_path, capsys, monkeypatch):
    """Why: NaN weights gave val_loss 0.0 (nan_to_num), kept as best_adapter. Now a NaN is
    never a score, and a NaN step stops the run with one error line; the best adapter and the last
    state stay the good ones."""
    from safetensors.torch import load_file

    data = _ft_setup(tmp_path)
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def poisoned_clip(params, *a, **k):  # the 3rd step's gradients are NaN (a diverged backward)
        calls.append(1)
        params = list(params)
        if len(calls) == 3:
            for p in params:
                p.grad.fill_(float("nan"))
        return real(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    out = tmp_path / "out"
    argv = ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
            "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "2", "--ckpt_interval", "2",
            "--batch_size", "2", "--grad_accum", "1", "--lora_rank", "4", "--num_samples", "0", "--lr", "1e-2"]
    _refused(capsys, finetune.main, argv, "error: step 3: grad_norm nan", "nothing of this step was saved")
    best = load_file(str(out / "best_adapter" / "adapter_model.safetensors"))
    assert best and all(torch.isfinite(t).all() for t in best.values())
    assert torch.load(out / "ckpt" / "state.pt", weights_only=True)["step"] == 2  # the last good state
    assert not (out / "summary.json").exists()
    rows = housekeeping.read_log(out / "log.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    # NaN weights evaluate to no figure at all, not to a perfect 0.0 (every metric's rule: finite_figures)
    m = GPT(GPTConfig.preset("tiny-gpt2"))
    with torch.no_grad():
        m.lm_head.weight.fill_(float("nan"))
    ex = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}]
    with pytest.raises(ValueError, match=r"the held-out examples' loss: val_loss nan: not finite"):
        finetune.evaluate(m, ex, 1, "cpu")
    # a NaN loss or gradient norm of a training step stops it too, naming the step
    with pytest.raises(ValueError, match=r"^step 7: loss nan, grad_norm inf: the training diverged"):
        housekeeping.check_finite(7, loss=float("nan"), grad_norm=float("inf"))
    housekeeping.check_finite(7, torch.amp.GradScaler("cpu", enabled=False), loss=1.0, grad_norm=float("inf"))  # fp16
    # a micro-batch without trained tokens still contributes exactly nothing (0/0 is not a divergence)
    m = GPT(GPTConfig.preset("tiny-gpt2"))
    idx = torch.randint(0, 512, (1, 8))
    empty, full = m(idx, torch.full((1, 8), -100))[1], m(idx, idx)[1]
    assert math.isnan(empty.item())  # the mean over no token: 0/0
    n_total = torch.tensor(8)
    loss = finetune.token_weighted(empty, torch.tensor(0), n_total) + finetune.token_weighted(full, n_total, n_total)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_train_gpt2_stops_at_a_non_finite_step_keeping_the_last_checkpoint(train_corpus, tmp_path, capsys,
                                                                               monkeypatch):
    _, _, data_dir, _ = train_corpus
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_at_step_3(*a, **k):  # the loop's clipping: the 3rd optimizer step's gradient norm is NaN
        calls.append(1)
        norm = real(*a, **k)
        return norm * float("nan") if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_step_3)
    out = tmp_path / "o"
    _refused(capsys, train_gpt2.main, ["--data_dir", str(data_dir), "--out_dir", str(out), *TINY, "--max_steps", "5",
                                       "--ckpt_interval", "2", "--eval_interval", "0"], "error: step 3: grad_norm nan")
    assert torch.load(out / "ckpt" / "state.pt", weights_only=True)["step"] == 2
    train, _ = _log(out)
    assert [r["step"] for r in train] == [1, 2]


def test_finetune_resume_after_a_finished_run_decides_as_an_uninterrupted_run(tmp_path, capsys):
    """Why: resuming a finished run with a larger --max_steps repeated its last evaluation,
    counted it against --patience and stopped at once. Now the log equals an uninterrupted run's."""
    data = _ft_setup(tmp_path)
    flags = ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
             "--eval_interval", "2", "--patience", "1", "--batch_size", "2", "--grad_accum", "1", "--lora_rank", "4",
             "--num_samples", "0", "--eval_examples", "4",
             "--lr", "5e-3", "--min_lr_ratio", "1", "--warmup_steps", "0", "--no-save_merged"]  # a constant LR
    finetune.main(flags + ["--out_dir", str(tmp_path / "cut"), "--max_steps", "4"])
    finetune.main(flags + ["--out_dir", str(tmp_path / "cut"), "--max_steps", "6", "--resume"])
    finetune.main(flags + ["--out_dir", str(tmp_path / "whole"), "--max_steps", "6"])
    cut, whole = (housekeeping.read_log(tmp_path / d / "log.jsonl") for d in ("cut", "whole"))
    assert [r["step"] for r in cut] == [r["step"] for r in whole]
    assert max(r["step"] for r in cut) > 4  # it trained on
    for a, b in zip(cut, whole):
        assert a.keys() == b.keys()
        for k in ("loss", "val_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4)


def _dpo_tiny_args(tmp_path) -> list[str]:
    """A tiny native model, a tokenizer and 8 preference pairs: dpo.py's flags for them."""
    import bpe

    words = "red blue green cat dog sun tree big".split()
    rows = [{"chosen": f"\n\nHuman: say {a}\n\nAssistant: {a} {a}", "rejected": f"\n\nHuman: say {a}\n\nAssistant: {b}"}
            for a, b in zip(words, words[3:] + words[:3])]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bpe.Tokenizer.train("".join(r["chosen"] + r["rejected"] for r in rows), 300,
                        special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    return ["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file", str(data),
            "--reference", "precomputed", "--lora_rank", "4", "--max_steps", "1", "--batch_size", "2",
            "--grad_accum", "1", "--num_samples", "0", "--val_frac", "0.25", "--warmup_steps", "0"]


def test_dpo_reference_cache_of_other_weights_is_recomputed(tmp_path, capsys):
    """Why: a fresh run reused a killed run's ref_logps.json although --init_from now held
    other weights. The cache is keyed by the weight files' size and mtime: the values are recomputed."""
    args = _dpo_tiny_args(tmp_path)
    dpo.main(args + ["--out_dir", str(tmp_path / "a")])
    assert "reference log-probs: 8 computed, 0 from" in capsys.readouterr().out
    fresh = tmp_path / "b"  # what a run killed while precomputing leaves: the cache alone
    fresh.mkdir()
    shutil.copy(tmp_path / "a" / "ref_logps.json", fresh / "ref_logps.json")
    torch.manual_seed(1)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    dpo.main(args + ["--out_dir", str(fresh)])
    out = capsys.readouterr().out
    assert "was computed for other weights" in out and "reference log-probs: 8 computed, 0 from" in out
    old, new = (json.loads((d / "ref_logps.json").read_text())["logps"] for d in (tmp_path / "a", fresh))
    assert old.keys() == new.keys() and all(old[k] != new[k] for k in old)


def test_dpo_stops_at_a_non_finite_step(tmp_path, capsys, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        norm = real(*a, **k)
        return norm * float("nan") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_step_2)
    out = tmp_path / "o"
    _refused(capsys, dpo.main, _dpo_tiny_args(tmp_path) + ["--out_dir", str(out), "--max_steps", "3",
                                                          "--ckpt_interval", "1"], "error: step 2: grad_norm nan")
    assert torch.load(out / "ckpt" / "state.pt", weights_only=True)["step"] == 1
    assert [r["step"] for r in housekeeping.read_log(out / "log.jsonl") if "loss" in r] == [1]


def test_judge_cache_is_keyed_by_the_judge(tmp_path, monkeypatch):
    """The judge cache was keyed by model name and prompt only: another endpoint serving a model
    of the same name reused its scores. Now the endpoint is part of the key."""
    import requests

    class Reply:
        status_code, headers, text = 200, {}, ""

        def __init__(self, score):
            self.score = score

        def json(self):
            return {"choices": [{"message": {"content": str(self.score)}}]}

    monkeypatch.setattr(requests, "post", lambda url, **k: Reply(77 if "judge-a" in url else 12))
    cache = tmp_path / "judge_cache.jsonl"
    a = score.Judge("http://judge-a/v1", "m", cache_path=cache)
    assert a.score("q", "r", "ans") == (77, "judged") and a.score("q", "r", "ans") == (77, "cached")
    assert score.Judge("http://judge-a/v1", "m", cache_path=cache).score("q", "r", "ans") == (77, "cached")
    assert score.Judge("http://judge-b/v1", "m", cache_path=cache).score("q", "r", "ans") == (12, "judged")


def test_bpe_encode_is_near_linear_on_long_runs_and_exact(tmp_path, capsys):
    """100,000 x "a" plus a paragraph: the old encoder scanned every pair at every merge (20,000 x
    "a" took 17.5 s); the heap takes well under a second. The ids equal the tiktoken export's."""
    para = ("Byte pair encoding joins the most frequent pairs first. It was described by Gage in 1994, "
            "and GPT-2 applied it to bytes: 12345 tokens, café, naïve, 😀!\n")
    text = "a" * 100_000 + " " + para
    runs = "".join(c * n for c in "ab " for n in (1, 2, 3, 5, 8, 13, 21, 64, 200))
    toks = [Tokenizer.train(runs * 20 + para * 5, 400, special_tokens=["<|endoftext|>"])]
    if (SHARED / "gpt2.tiktoken").exists():
        toks.append(bpe.load_bpe("gpt2"))
    for tok in toks:
        t0 = time.perf_counter()
        ids = tok.encode(text)
        took = time.perf_counter() - t0
        assert ids == tok.to_tiktoken().encode_ordinary(text)
        assert took < 5.0, took  # a generous bound (about 0.7 s with GPT-2's ranks on one loaded core)
        tok._cache.clear()
        for s in ("", "a", "ab" * 5000, " " * 3000 + "x", runs, para * 3):  # merges stay rank-ordered and exact
            assert tok.encode(s) == tok.to_tiktoken().encode_ordinary(s)
    # the CLI: `bpe.py encode` of that text
    (tmp_path / "in.txt").write_text(text)
    toks[0].save(tmp_path / "tok")
    t0 = time.perf_counter()
    bpe.main(["encode", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "in.txt")])
    assert time.perf_counter() - t0 < 5.0
    assert list(map(int, capsys.readouterr().out.split())) == toks[0].to_tiktoken().encode_ordinary(text)


def test_hostile_files_are_one_line_naming_the_file(tmp_path, capsys):

    # deeply nested JSON in data files and model configs
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text('{"instruction": "a", "output": "b"}\n' + deep + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        prepare_data.read_jsonl(tmp_path / "deep.jsonl")
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ValueError, match=r"deep\.json: JSON nested too deeply"):
        prepare_data.load_alpaca(str(tmp_path / "deep.json"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "gpt_config.json").write_text(deep)
    with pytest.raises(ValueError, match=r"gpt_config\.json: not valid JSON \(maximum recursion depth exceeded"):
        GPT.from_pretrained(tmp_path / "m")
    # pickle .bin: an adapter for lora.py merge, a model for score.py; the payload never runs
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT(GPTConfig.preset("tiny-gpt2")).save_pretrained(base, format="native")
    ad = tmp_path / "adapter"
    save_adapter(apply_lora(GPT.from_pretrained(base), 2, 4, 0.0, "q,v"), ad)
    sd = {k: v for k, v in lora_state_dict_file(ad).items()}
    (ad / "adapter_model.safetensors").unlink()
    torch.save({**sd, "x": Payload()}, ad / "adapter_model.bin")
    _refused(capsys, lora.main, ["merge", "--base", str(base), "--adapter", str(ad), "--out", str(tmp_path / "o")],
             str(ad / "adapter_model.bin"), "refused: this pickle holds more than tensors")
    pkl = tmp_path / "pkl"
    shutil.copytree(base, pkl)
    (pkl / "model.safetensors").unlink()
    torch.save({"x": Payload()}, pkl / "pytorch_model.bin")
    _refused(capsys, score.main, ["--init_from", str(pkl), "--reward_model", "none", "--judge_url", "http://x"],
             str(pkl / "pytorch_model.bin"), "refused")
    rm = tmp_path / "rm"
    _tiny_reward_model(rm)
    (rm / "model.safetensors").unlink()
    torch.save({"x": Payload()}, rm / "pytorch_model.bin")
    housekeeping.load_reward_model.cache_clear()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused: this pickle holds more than tensors"):
        housekeeping.reward_scores(str(rm), ["q"], ["a"])
    assert not marker.exists()
    # lying safetensors headers: missing fields, unknown dtypes, ranges that disagree with the file
    for info, why in (({"dtype": "F32", "shape": [4]}, "missing field `data_offsets`"),
                      ({"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}, "unknown variant `Q9`"),
                      ({"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}, "invalid shape, data type, or offset"),
                      ({"dtype": "U16", "shape": [8], "data_offsets": [0, 16]}, "dtype(s) U16 not supported")):
        head = json.dumps({"lm_head.weight": info}).encode()
        (pkl / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + bytes(16))
        with pytest.raises(ValueError, match=f"model.safetensors: .*{regex.escape(why)}"):
            GPT.from_pretrained(pkl)


def lora_state_dict_file(d) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "adapter_model.safetensors"))


# The size, regex and disk-full cases under a memory cap and a time limit, in one child process:
# each must end in one error line (a ValueError or OSError naming what was wrong), not an allocation.
_LIMITS_CHILD = r"""
import json, os, resource, signal, sys, time
sys.path.insert(0, sys.argv[1])
tmp = sys.argv[2]
import torch, bpe, model, finetune, train_gpt2
resource.setrlimit(resource.RLIMIT_AS, (6 * 2 ** 30, 6 * 2 ** 30))
def case(name, fn):
    t0 = time.time()
    try:
        fn()
        r = "no error"
    except (ValueError, OSError) as e:
        r = str(e)
    print(json.dumps([name, r, time.time() - t0]), flush=True)
os.makedirs(f"{tmp}/big", exist_ok=True)
tiny = model.asdict(model.GPTConfig.preset("tiny-gpt2"))
json.dump(dict(tiny, n_layer=10 ** 9), open(f"{tmp}/big/gpt_config.json", "w"))
case("n_layer 1e9 config", lambda: model.GPT.from_pretrained(f"{tmp}/big"))
os.makedirs(f"{tmp}/lying", exist_ok=True)
json.dump(tiny, open(f"{tmp}/lying/gpt_config.json", "w"))
head = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [10 ** 11], "data_offsets": [0, 4 * 10 ** 11]}}).encode()
open(f"{tmp}/lying/model.safetensors", "wb").write(len(head).to_bytes(8, "little") + head + bytes(64))
case("400 GB header", lambda: model.GPT.from_pretrained(f"{tmp}/lying"))
for flag in ("n_layer", "block_size", "batch_size"):
    case(f"train_gpt2 --{flag}", lambda: train_gpt2.parse_args([f"--{flag}", str(10 ** 13)]))
for flag in ("lora_rank", "batch_size", "grad_accum"):
    case(f"finetune --{flag}", lambda: finetune.parse_args([f"--{flag}", str(10 ** 13)]))
os.makedirs(f"{tmp}/hf", exist_ok=True)
for name, rx in (("backtracking regex", "(a+)+$"), ("bad regex", "(a+")):
    json.dump({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": rx}}}, open(f"{tmp}/hf/tokenizer.json", "w"))
    case(name, lambda: bpe.load_tokenizer(f"{tmp}/hf"))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the size limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
case("disk full", lambda: model.GPT(model.GPTConfig.preset("tiny-gpt2")).save_pretrained(f"{tmp}/full", "native"))
"""


def test_sizes_regexes_and_a_full_disk_fail_fast_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", _LIMITS_CHILD, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {name: (msg, took) for name, msg, took in map(json.loads, r.stdout.splitlines())}
    expect = {"n_layer 1e9 config": "a model of n_layer 1000000000",
              "400 GB header": "model.safetensors: not a readable safetensors file",
              "train_gpt2 --n_layer": "n_layer 10000000000000", "train_gpt2 --block_size": "block_size 10000000000000",
              "train_gpt2 --batch_size": "batch_size 10000000000000", "finetune --lora_rank": "--lora_rank 1000000",
              "finetune --batch_size": "--batch_size 10000000000000", "finetune --grad_accum": "--grad_accum 1000",
              "backtracking regex": "tokenizer.json: the regex '(a+)+$' backtracks",
              "bad regex": "tokenizer.json: the regex '(a+' is not valid",
              "disk full": "model.safetensors: writing failed"}
    assert got.keys() == expect.keys()
    for name, needle in expect.items():
        msg, took = got[name]
        assert needle in msg and "\n" not in msg and took < 10, (name, msg, took)
    assert [p.name for p in (tmp_path / "full").iterdir() if ".tmp" in p.name] == []  # the temp file is gone
def test_overwrite_replaces_a_finished_run_of_ours_and_a_refusal_leaves_no_lock(tmp_path):
    """A run that ended normally has no run.lock (a clean exit removes it): it is ours by its own record
    (its log, config or checkpoint, and nothing foreign beside them), so --overwrite replaces it. A
    refused start leaves nothing behind: no lone run.lock."""
    run = tmp_path / "run"
    housekeeping.open_run(run)
    for name in ("log.jsonl", "config.json", "summary.json", "loss.png"):
        (run / name).write_text("x")
    (run / "ckpt").mkdir()
    housekeeping.close_run(run)
    assert not (run / "run.lock").exists()
    with pytest.raises(ValueError, match="holds a run .*--resume .*--overwrite"):
        housekeeping.open_run(run)
    assert not (run / "run.lock").exists()
    housekeeping.open_run(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    housekeeping.close_run(run)
    # names our runs use, but no run's record among them: not a run of ours, nothing removed
    d = tmp_path / "d"
    d.mkdir()
    (d / "loss.png").write_text("x")
    with pytest.raises(ValueError, match="no run of ours"):
        housekeeping.open_run(d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["loss.png"]


WEIGHT_LOADERS = ("hf-gpt2", "hf-llama", "hf-qwen3", "native", "qlora-base", "adapter")
WEIGHT_FAULTS = {"nan": "non-finite value", "int32": r"stored as torch\.int32, but it is a float weight",
                 "missing": "missing", "truncated": "not a readable safetensors file .*truncated"}


def _load_weights_with(loader: str, path, base_dir):
    """Read `path` as `loader` does: a model directory, a QLoRA run's 4-bit base, or an adapter onto its base."""
    if loader == "qlora-base":
        return lora.load_base(str(path), "fp32", lora=True, quantize="nf4", device="cpu")
    if loader == "adapter":
        return load_adapter(GPT.from_pretrained(base_dir), path)
    return GPT.from_pretrained(path)


@pytest.mark.parametrize("fault", list(WEIGHT_FAULTS))
@pytest.mark.parametrize("loader", WEIGHT_LOADERS)
def test_every_loader_refuses_damaged_weights_naming_file_and_tensor(tmp_path, loader, fault):
    """Every weight a loader reads is checked once, at load: a NaN, a float weight stored with an integer dtype of
    the same width (a damaged header: safetensors F32 -> I32), a tensor missing, a truncated file. Each is one
    error naming the file and the tensor (the truncated file has none to name), never a model that scores or
    samples. Loaders: GPT.from_pretrained in each format it reads (HF GPT-2, LLaMA and its families, ours), the
    4-bit base of a QLoRA run (lora.load_base), and an adapter (lora.load_adapter)."""
    from safetensors.torch import load_file, save_file

    base_dir = None
    if loader == "native":
        d = tmp_path / "native"
        GPT(GPTConfig.preset("tiny-llama", vocab_size=97)).save_pretrained(d, "native")
    elif loader == "hf-qwen3":
        _, d = hf_family(tmp_path, "qwen3")
    elif loader == "hf-gpt2":
        _, d = _lora_hf("gpt2", tmp_path)
    else:
        _, d = _lora_hf("llama", tmp_path)
    fname = "model.safetensors"
    if loader == "adapter":
        base_dir = d
        ours = apply_lora(GPT.from_pretrained(d), rank=4, alpha=8, targets="q,v")
        _lora_randomize_adapters(ours)
        d = save_adapter(ours, tmp_path / "adapter")
        fname = "adapter_model.safetensors"
    _load_weights_with(loader, d, base_dir)  # the files as written load
    weights = load_file(d / fname)
    name = min(k for k, v in weights.items() if v.dim() == 2 and ("q_proj" in k or "c_attn" in k))  # fused in ours
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    if fault == "truncated":
        data = (d / fname).read_bytes()
        (broken / fname).write_bytes(data[:-100])
    else:
        if fault == "nan":
            weights[name] = weights[name].clone()
            weights[name][0, 0] = float("nan")
        elif fault == "int32":
            weights[name] = weights[name].view(torch.int32)  # the same bytes, read as integers
        else:
            del weights[name]
        save_file(weights, broken / fname, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=WEIGHT_FAULTS[fault]) as e:
        _load_weights_with(loader, broken, base_dir)
    message = str(e.value)
    named_file = broken / fname if loader == "adapter" or fault == "truncated" else broken  # (a model: its dir)
    assert str(named_file) in message
    if fault != "truncated":
        assert name.removeprefix("transformer.") in message, message
    assert "\n" not in message
    if (loader, fault) == ("hf-gpt2", "nan"):  # the command line says it in one line, exit 2
        r = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--init_from", str(broken), "--prompt", "hi",
                            "--tokenizer", "gpt2"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "non-finite" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _without(args: list[str], *names: str) -> list[str]:
    """args less each named flag and its value."""
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            out.append(a)
    return out


def _changed_on_resume(main, flags, out, extra, capsys) -> str:
    """The one error line of `--resume` with `extra` flags on top of the run's own, or '' if it resumed."""
    try:
        main(flags + ["--out_dir", str(out), "--resume", "--max_steps", "3", *extra])
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("script", ["finetune", "dpo", "rl"])
def test_resume_refuses_a_changed_input_and_takes_the_same_input_spelt_otherwise(tmp_path, capsys, script):
    """A run is its inputs. --resume of a stopped run refuses, in one line naming it, each flag that defines
    the run given with another value (the optimizer gave a KeyError or an AssertionError deep in torch);
    takes --init_from spelt as the run directory it stands for (which was refused: the resolved path was
    compared with the given one); and refuses once the starting weights were replaced since the run began
    (dpo silently took the new weights as its reference)."""
    if script == "finetune":
        data = _ft_setup(tmp_path)
        main = finetune.main
        flags = ["--tokenizer", str(tmp_path / "tok"), "--data_file", str(data), "--batch_size", "2",
                 "--grad_accum", "1", "--lora_rank", "4", "--num_samples", "0", "--eval_examples", "4",
                 "--warmup_steps", "0", "--optimizer", "adamw", "--no-save_merged"]
        changes = {"optimizer": "sgd", "lora_rank": "8", "lora_alpha": "3", "lora_targets": "all",
                   "train_last_n_blocks": "1", "quantize": "nf4", "task": "dialogue", "test_frac": "0.2",
                   "dataset": "sst2", "test_file": str(data)}
    elif script == "dpo":
        args = _dpo_tiny_args(tmp_path)
        main = dpo.main
        flags = _without(args, "--init_from", "--max_steps") + ["--optimizer", "adamw"]
        changes = {"optimizer": "sgd", "lora_rank": "8", "lora_alpha": "3", "lora_targets": "all",
                   "reference": "copy", "quantize": "nf4", "split": "test", "val_file": str(tmp_path / "pairs.jsonl")}
    else:
        main = rl.main
        flags = _without(_rl_setup(tmp_path), "--init_from") + ["--optimizer", "adamw", "--eval_prompts", "2"]
        changes = {"optimizer": "sgd", "lora_rank": "8", "lora_alpha": "3", "lora_targets": "all", "quantize": "nf4",
                   "reward": "exact", "reward_model": str(tmp_path / "other_rm"), "template": "chat",
                   "val_file": flags[flags.index("--data_file") + 1], "max_examples": "10"}
    # what every stage's run is: the tokenizer, the data and its split (the seed shuffles it)
    other_data = tmp_path / "other_data.jsonl"
    shutil.copy(flags[flags.index("--data_file") + 1], other_data)
    changes.update(tokenizer=str(tmp_path / "other_tok"), data_file=str(other_data), val_frac="0.3", seed="7")
    # the starting model, as a run directory holds it (the run directory stands for its checkpoint's model)
    base = tmp_path / "base"
    shutil.copytree(tmp_path / "model", base / "ckpt" / "model")
    (base / "log.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
    flags = flags + ["--init_from", str(base)]
    out = tmp_path / "run"
    main(flags + ["--out_dir", str(out), "--max_steps", "3", "--ckpt_interval", "1", "--stop_at_step", "1"])
    for name, value in changes.items():
        said = _changed_on_resume(main, flags, out, [f"--{name}", value], capsys)
        assert said.startswith(f"--resume continues the run in {out}; these flags differ") and f"--{name}" in said, \
            (name, said)
    # the same weights replaced by others of the same shape: no longer the same run
    torch.manual_seed(1)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=GPT.from_pretrained(tmp_path / "model").config.vocab_size)
        ).save_pretrained(base / "ckpt" / "model", format="native")
    said = _changed_on_resume(main, flags, out, [], capsys)
    assert "the starting weights in" in said and "are not those the run" in said, said
    # put back: the exact command that started the run resumes it
    shutil.rmtree(base / "ckpt" / "model")
    shutil.copytree(tmp_path / "model", base / "ckpt" / "model")
    assert _changed_on_resume(main, flags, out, [], capsys) == ""
    assert max(r["step"] for r in housekeeping.read_log(out / "log.jsonl")) == 3


def _outputs_not_numbers(model, bad: float):
    """A model whose outputs are `bad` (NaN, or inf that the softmax turns into NaN): its final norm's gain."""
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(bad)
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("metric", ["finetune val_loss", "dpo held-out pairs", "train_gpt2 val_loss and bpb",
                                    "sweep table", "score mean"])
def test_no_metric_gives_a_figure_from_non_finite_numbers(tmp_path, monkeypatch, request, metric, bad):
    """The rule of every reported figure: a metric computed from NaN or inf is one error naming it, never
    a number (DPO's held-out accuracies, the sweep's table, val loss and bpb each gave a figure). HellaSwag's
    accuracy has its own test beside its evaluation."""
    torch.manual_seed(0)
    if metric == "finetune val_loss":
        model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=64))
        examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 3, 4, 5]}]
        assert math.isfinite(finetune.evaluate(model, examples, 2, "cpu"))
        with pytest.raises(ValueError, match=r"finetune.py: the held-out examples' loss: val_loss (nan|inf).*not finite"):
            finetune.evaluate(_outputs_not_numbers(model, bad), examples, 2, "cpu")
    elif metric == "dpo held-out pairs":
        tok = _CharTok()
        pairs = dpo.tokenize_pairs([{"prompt": "q", "chosen": "ab", "rejected": "c"}] * 2, tok, tok.eot_id, 50, 20)
        policy = apply_lora(GPT(GPTConfig.preset("tiny-gpt2", vocab_size=128)), 4, 8)
        ref = dpo.Reference("adapter_off", policy)
        args = (ref, pairs, ["a", "b"], tok.eot_id, "cpu", 2, contextlib.nullcontext, (0.1, "sigmoid", 0.0))
        assert all(math.isfinite(v) for v in dpo.evaluate_pairs(policy, *args).values())
        with pytest.raises(ValueError, match=r"dpo.py: the held-out pairs' metrics: val_loss (nan|inf).*not finite"):
            dpo.evaluate_pairs(_outputs_not_numbers(policy, bad), *args)
    elif metric == "train_gpt2 val_loss and bpb":
        monkeypatch.setattr(train_gpt2, "val_loss", lambda *args: bad)
        _, _, data_dir, _ = request.getfixturevalue("train_corpus")
        with pytest.raises(ValueError, match=r"the evaluation at step 0: val_loss (nan|inf), val_bpb (nan|inf): not finite"):
            _train(data_dir, tmp_path / "o", "--max_steps", 1)
    elif metric == "sweep table":
        run_dir = tmp_path / "runs" / "lora_rank=2"
        (tmp_path / "runs").mkdir()

        def finished_run(cmd, **kwargs):  # what finetune.py leaves when its model's outputs were not numbers
            run_dir.mkdir()
            (run_dir / "summary.json").write_text(json.dumps({"best_step": 3, "val_loss": bad, "val_ppl": bad}))
            (run_dir / "config.json").write_text(json.dumps({"lora_rank": 2}))
            (run_dir / "log.jsonl").write_text("")
            return subprocess.CompletedProcess(cmd, 0, "", "")

        monkeypatch.setattr(sweep.subprocess, "run", finished_run)
        row = sweep.run_one({"lora_rank": "2"}, [], tmp_path / "runs")
        assert row["status"] == "failed" and "val_loss" not in row, row
        assert regex.search(r"summary.json: val_loss (nan|inf), val_ppl (nan|inf): not finite", row["reason"]), row
    else:
        with pytest.raises(ValueError, match=r"score.py: the reward scores: 3 value\(s\) whose sum is (nan|inf)"):
            score._stats("reward", [1.0, bad, 2.0])


def test_a_second_signal_stops_at_once_with_that_signals_status(capsys):
    """Why: two quick SIGTERMs exited 130, Ctrl-C's status (the second raised KeyboardInterrupt). The first
    signal asks for a stop after the step; a second stops at once with its own status: 143 for SIGTERM."""
    stop = housekeeping.GracefulStop()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread, between two bytecodes
        assert stop.requested()
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert e.value.code == 143
        assert "SIGTERM again: stopping at once" in capsys.readouterr().err
    finally:
        stop.restore()


def test_a_link_where_a_run_writes_is_refused_at_the_start_and_never_followed(tmp_path):
    """Why: a ckpt/ that was a link (to a bigger disk) left --resume stuck for good: a save renamed the link,
    and every later one failed. A link in a run directory is refused at the start, in one line; --overwrite
    removes the link itself, never what it points to."""
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "disk" / "ckpt"
    elsewhere.mkdir(parents=True)
    (elsewhere / "state.pt").write_text("x")
    (run / "ckpt").symlink_to(elsewhere)
    (run / "log.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"ckpt is a link .*point --out_dir itself at the other disk"):
            housekeeping.open_run(run, resume=resume)
    assert (run / "ckpt").is_symlink() and not (run / "run.lock").exists()
    housekeeping.open_run(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"] and (elsewhere / "state.pt").read_text() == "x"
    housekeeping.close_run(run)


def test_train_summary_lists_the_runs_files_but_not_a_killed_writes_temp_file(tmp_path):
    """Why: the `done:` line listed a stale *.tmp (a write a kill interrupted) among the run's outputs."""
    (tmp_path / "log.jsonl").write_text('{"type": "eval", "step": 0, "val_loss": 2.0}\n'
                                        '{"type": "eval", "step": 5, "val_loss": 1.0}\n')
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "loss.png.a1b2.tmp").write_text("")
    (tmp_path / "run.lock").write_text("1\n")
    summary = train_gpt2.write_summary(tmp_path, [])
    assert summary["files"] == ["ckpt", "log.jsonl", "summary.json"]
    assert summary["before"]["val_loss"] == 2.0 and summary["after"]["val_loss"] == 1.0


def test_every_json_reader_names_the_file_for_a_number_python_will_not_convert(tmp_path, capsys):
    """Why: a 5000-digit integer in a data file gave Python's own message, naming no file or line (it is
    valid JSON, but Python refuses to convert it: a ValueError that is not a JSONDecodeError). Every JSON
    reader now names the file (and the line of a .jsonl)."""
    big = "9" * 5000
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n{"n": %s}\n' % big)
    with pytest.raises(ValueError, match=regex.escape(f"{data}:2: not a record")):
        prepare_data.read_jsonl(data)
    config = tmp_path / "c.json"
    config.write_text('{"n": %s}' % big)
    with pytest.raises(ValueError, match=regex.escape(f"{config}: not valid JSON")):
        housekeeping.read_json(config)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "gpt2", "n_embd": %s}' % big)
    with pytest.raises(ValueError, match=regex.escape(f"{model_dir / 'config.json'}: not valid JSON")):
        GPT.from_pretrained(model_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": %s}' % big)
    with pytest.raises(ValueError, match=regex.escape(f"{adapter / 'adapter_config.json'}: not valid JSON")):
        load_adapter(GPT(GPTConfig.preset("tiny-gpt2", vocab_size=97)), adapter)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": %s}\n' % big)
    assert housekeeping.read_log(log) == [{"step": 1, "loss": 1.0}]
    assert "skipped 1 damaged line(s) (line 2)" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------
# the first hour: the README's offline commands run as printed; Ctrl-C keeps the work; run
# directories as --init_from; generation capped at the context; one flag spelling


def readme_offline_commands(text: str) -> list[list[str]]:
    """The commands of the README's code blocks marked `bash offline`, each as argv (comments and
    line continuations handled as the shell does)."""
    cmds = []
    for block in regex.findall(r"^```bash offline\n(.*?)^```", text, regex.S | regex.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                cmds.append(argv)
    return cmds


def _readme_small(argv: list[str]) -> list[str]:
    """Flags appended to a README command (the last of a repeated flag wins) so that it runs in seconds."""
    script = argv[1]
    if script == "train_gpt2.py":
        return ["--max_steps", "6" if "--resume" in argv else "4", "--eval_interval", "2", "--val_tokens", "1024",
                "--hellaswag_limit", "8", "--num_samples", "1", "--sample_len", "8"]
    return {"finetune.py": ["--max_steps", "2", "--eval_interval", "2", "--max_examples", "64", "--num_samples", "1",
                            "--max_new_tokens", "8"],
            "dpo.py": ["--max_steps", "2", "--eval_interval", "2", "--max_examples", "64", "--num_samples", "1",
                       "--max_new_tokens", "8"],
            "rl.py": ["--max_steps", "2", "--eval_interval", "2", "--max_examples", "32", "--eval_prompts", "8",
                      "--num_samples", "1", "--max_new_tokens", "4"],
            "hellaswag.py": ["--limit", "8", "--no-progress"],
            "sweep.py": ["--max_steps", "1", "--eval_interval", "1", "--max_examples", "32", "--num_samples", "0"],
            }.get(script, [])


def test_readme_offline_commands_parse_as_the_shell_does():
    text = ('x\n```bash offline\npython a.py --t "b c"   # note\npython d.py \\\n    --e 1\n```\n'
            '```bash\npython online.py\n```\n')
    assert readme_offline_commands(text) == [["python", "a.py", "--t", "b c"], ["python", "d.py", "--e", "1"]]


def _fresh_folder(tmp_path) -> tuple[Path, dict]:
    """A folder with the project's files and nothing beside it (no ../shared), and an offline environment."""
    d = tmp_path / "nano-llm"
    d.mkdir()
    for f in [*ROOT.glob("*.py"), ROOT / "README.md"]:
        (d / f.name).write_text(f.read_text())
    return d, dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="", OMP_NUM_THREADS="1")


def test_readme_python_snippets_run_as_printed(tmp_path):
    """Every ```python block of the README, as printed, each in its own process, in a fresh folder, offline."""
    snippets = regex.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), regex.S | regex.M)
    assert len(snippets) >= 3
    d, env = _fresh_folder(tmp_path)
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (code, r.stderr[-3000:])


def test_readme_offline_commands_run_as_printed(tmp_path):
    """Every command of the README's `bash offline` blocks, in order, in a fresh folder with the
    project's files (no ../shared beside it), no network; small budgets only. chat.py keeps its
    defaults: the life cycle's last step must answer as printed."""
    cmds = readme_offline_commands((ROOT / "README.md").read_text())
    assert ["python", "chat.py"] in cmds and ["python", "train_gpt2.py"] in cmds and len(cmds) >= 10
    d, env = _fresh_folder(tmp_path)
    gpt2_ranks = env.get("GPT2_TIKTOKEN")  # the fetched-once rank file (../shared/data's in the tests)
    ran = []
    for argv in cmds:
        assert argv[0] == "python" and (d / argv[1]).is_file(), argv
        if "gpt2" in argv and argv[1] == "bpe.py" and not (gpt2_ranks and Path(gpt2_ranks).is_file()):
            continue  # needs GPT-2's tokenizer fetched once (README, Set up); absent without ../shared/data
        stdin = "What does len() return?\n/quit\n" if argv == ["python", "chat.py"] else ""
        r = subprocess.run([sys.executable, *argv[1:], *_readme_small(argv)], cwd=d, input=stdin, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stdout[-2000:], r.stderr[-3000:])
        ran.append((argv, r))
    out = {" ".join(a[1:]): r.stdout for a, r in ran}
    reply = out["chat.py"].split("Assistant:", 1)[1].strip()
    assert reply, out["chat.py"]  # the CPU model's answer, however clumsy
    assert "hellaswag scoring=harness n=8" in out["hellaswag.py --init_from out/cpu"]
    headline = out["hellaswag.py"].split("\n", 2)[1]  # after the line naming the offline default
    assert regex.fullmatch(r"acc_norm by stage, 8 items \(chance 0.250, a random model [\d.]+\): pretrained "
                           r"\(out/cpu/(ckpt/)?model\) [\d.]+, instruction-tuned \(out-finetune/best_model\) [\d.]+, "
                           r"RL-tuned \(out-rl/model\) [\d.]+, DPO-tuned \(out-dpo/model\) [\d.]+", headline), \
        out["hellaswag.py"]
    assert "resuming from out/cpu/ckpt at step 4" in out["train_gpt2.py --resume --max_steps 700"]
    if gpt2_ranks:
        shown = out["bpe.py show --tokenizer gpt2 --text SolidGoldMagikarp 12345"]
        assert shown.startswith("Solid|GoldMagikarp| 123|45")


def _interrupted_run(cmd, sig, after: str, cwd, env=None):
    """Start cmd, send sig once a stdout line contains `after`, wait: (return code, stdout, stderr)."""
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    out = []
    for line in p.stdout:
        out.append(line)
        if after in line:
            p.send_signal(sig)
            break
    rest, err = p.communicate(timeout=300)
    return p.returncode, "".join(out) + rest, err


def test_sigint_checkpoints_at_the_next_step_and_resume_gives_the_uninterrupted_losses(train_corpus, tmp_path):
    """Ctrl-C mid-run: the step finishes, a checkpoint is written and named, exit 130 without a
    traceback; --resume then gives the losses of a run never interrupted, bit for bit."""
    _, _, data_dir, _ = train_corpus
    args = [sys.executable, str(ROOT / "train_gpt2.py"), "--data_dir", str(data_dir), *TINY, "--max_steps", "40",
            "--eval_interval", "0", "--num_samples", "0", "--dropout", "0.1", "--ckpt_interval", "0"]
    whole = subprocess.run(args + ["--out_dir", str(tmp_path / "whole")], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    code, out, err = _interrupted_run(args + ["--out_dir", str(tmp_path / "cut")], signal.SIGINT, "step     3/40",
                                      tmp_path)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    stopped = int(regex.search(r"SIGINT: stopped at step (\d+); resumable state in (\S+)", err)[1])
    assert 3 <= stopped < 40 and f"resumable state in {tmp_path / 'cut' / 'ckpt'}" in err
    assert torch.load(tmp_path / "cut" / "ckpt" / "state.pt", weights_only=True)["step"] == stopped
    assert not (tmp_path / "cut" / "run.lock").exists() and not (tmp_path / "whole" / "run.lock").exists()
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), "--out_dir", str(tmp_path / "cut"), "--resume"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0 and f"resuming from {tmp_path / 'cut' / 'ckpt'} at step {stopped}" in r.stdout
    assert [x["loss"] for x in _log(tmp_path / "cut")[0]] == [x["loss"] for x in _log(tmp_path / "whole")[0]]


@pytest.mark.parametrize("how", [["--lora_rank", "4", "--lora_dropout", "0.1"],  # LoRA, AdamW
                                 ["--lora_rank", "0", "--optimizer", "muon", "--matrix_lr", "0.01"]])  # full, Muon
def test_sigterm_in_finetune_keeps_the_state_and_resume_gives_the_uninterrupted_losses(tmp_path, how):
    data = _ft_setup(tmp_path)
    args = [sys.executable, str(ROOT / "finetune.py"), "--init_from", str(tmp_path / "model"), "--tokenizer",
            str(tmp_path / "tok"), "--data_file", str(data), "--max_steps", "40", "--eval_interval", "20",
            "--batch_size", "2", "--grad_accum", "1", "--num_samples", "0", *how,
            "--lr", "1e-2", "--log_interval", "1", "--device", "cpu"]
    whole = subprocess.run(args + ["--out_dir", str(tmp_path / "whole")], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "resumable state: step 40 in" in whole.stdout  # the end's save, said in one line
    code, out, err = _interrupted_run(args + ["--out_dir", str(tmp_path / "cut")], signal.SIGTERM, "step 3/40",
                                      tmp_path)
    assert code == 143 and "Traceback" not in err, err[-2000:]
    stopped = int(regex.search(r"SIGTERM: stopped at step (\d+); resumable state in", err)[1])
    assert 3 <= stopped < 40 and f"resumable state: step {stopped} in" in out
    r = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--out_dir", str(tmp_path / "cut"), "--resume"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0 and f"resuming at step {stopped}" in r.stdout, r.stderr[-2000:]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    assert _losses(tmp_path / "cut", "val_loss") == _losses(tmp_path / "whole", "val_loss")


def test_training_scripts_checkpoint_periodically_by_default():
    assert train_gpt2.RECIPES["cpu"]["ckpt_interval"] > 0 and train_gpt2.TrainConfig().ckpt_interval > 0
    assert finetune.FinetuneConfig().ckpt_interval > 0 and dpo.DPOConfig().ckpt_interval > 0


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Run directories as the training scripts leave them: a fine-tuning run (best_model/ and a
    config.json of flags, no model at its top), a DPO run (model/), a pretraining run (ckpt/model/)."""
    root = tmp_path_factory.mktemp("runs")
    _hs_save_tokenizer(root / "tok")
    vocab = load_tokenizer(None, str(root / "tok")).n_vocab
    dirs = {}
    for i, (name, sub) in enumerate([("out-finetune", "best_model"), ("out-dpo", "model"), ("out", "ckpt/model")]):
        torch.manual_seed(i)
        GPT(GPTConfig.preset("tiny-gpt2", vocab_size=vocab)).save_pretrained(
            root / name / sub, format="native", tokenizer=str(root / "tok"))
        (root / name / "config.json").write_text(json.dumps({"init_from": "gpt2", "lora_rank": 16}))
        (root / name / "log.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
        dirs[name] = (root / name, root / name / sub)
    (root / "empty-run").mkdir()
    (root / "empty-run" / "log.jsonl").write_text("")
    dirs["empty-run"] = (root / "empty-run", None)
    return dirs


def test_a_run_directory_resolves_to_its_best_or_final_model_and_says_which(run_dirs, capsys):
    for name, (run, model_dir) in run_dirs.items():
        if model_dir is None:
            with pytest.raises(FileNotFoundError, match="a run directory without a saved model"):
                housekeeping.resolve_init_from(str(run))
            continue
        assert housekeeping.resolve_init_from(str(run)) == str(model_dir)
        assert f"a run directory; using {model_dir}" in capsys.readouterr().err
        assert housekeeping.resolve_init_from(str(model_dir)) == str(model_dir)  # a model dir stays itself
        assert capsys.readouterr().err == ""
        # from_pretrained takes the run directory too: the same weights as its model directory
        a, b = GPT.from_pretrained(str(run)), GPT.from_pretrained(str(model_dir))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert housekeeping.resolve_init_from("gpt2") == "gpt2"


def test_init_from_a_run_directory_in_hellaswag_chat_dpo_and_score(run_dirs, tmp_path, capsys):
    run, best = run_dirs["out-finetune"]
    # hellaswag: the model on this machine is scored on the built-in items, offline
    items = _hs_write_jsonl(tmp_path / "hs.jsonl", HS_ITEMS)
    r = subprocess.run([sys.executable, str(ROOT / "hellaswag.py"), "--init_from", str(run), "--data_file", str(items),
                        "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0 and f"model={best} " in r.stdout and f"using {best}" in r.stderr, r.stderr[-2000:]
    # chat: the run's own tokenizer comes with its model
    texts = chat.sample(chat.parse_args(["--init_from", str(run), "--prompt", "the", "--max_new_tokens", "5",
                                         "--temperature", "0", "--device", "cpu"]), out=io.StringIO())
    m = GPT.from_pretrained(str(best))
    tok = load_tokenizer(None, str(best))
    ids = tok.encode("the")
    assert texts == ["the" + tok.decode(m.generate(torch.tensor([ids]), 5, temperature=0)[0, len(ids):].tolist())]
    # dpo: the flag is resolved when parsed, so the run's config.json names the model it took
    assert dpo.parse_args(["--init_from", str(run)]).init_from == str(best)
    assert finetune.parse_args(["--init_from", str(run)]).init_from == str(best)
    # score: a DPO run (model/) and a pretraining run (ckpt/model/) are one checkpoint each
    for name in ("out-dpo", "out"):
        assert score.checkpoints(run_dirs[name][0]) == [(run_dirs[name][1].name, run_dirs[name][1])]


def test_dpo_runs_from_a_run_directory(run_dirs, tmp_path):
    run, best = run_dirs["out-finetune"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i} ", "chosen": "yes it is", "rejected": "no"}) + "\n"
                             for i in range(8)))
    dpo.main(["--init_from", str(run), "--data_file", str(pairs), "--max_steps", "2", "--eval_interval", "2",
              "--num_samples", "1", "--max_new_tokens", "4", "--out_dir", str(tmp_path / "o"), "--device", "cpu",
              "--batch_size", "2", "--grad_accum", "1"])
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["init_from"] == str(best) and (tmp_path / "o" / "model" / "gpt_config.json").exists()
    assert not (tmp_path / "o" / "run.lock").exists()  # a clean exit leaves no lock behind


def test_fit_to_context_caps_generation_with_one_note(capsys):
    housekeeping._capped_flags.clear()
    fit = housekeeping.fit_to_context
    assert fit([[1] * 10], 20, 128) == ([[1] * 10], 20) and capsys.readouterr().err == ""
    assert fit([[1] * 30], 128, 128, "--x") == ([[1] * 30], 98)  # the room the prompt leaves
    assert capsys.readouterr().err == "note: --x 128 capped at 98: the model's context is 128 tokens\n"
    assert fit([[1] * 40], 128, 128, "--x") == ([[1] * 40], 88) and capsys.readouterr().err == ""  # said once
    prompts, n = fit([list(range(100)), [7]], 128, 128, "--y")  # a long prompt: half the context each
    assert n == 64 and prompts == [list(range(36, 100)), [7]]
    assert capsys.readouterr().err.endswith("context is 128 tokens; prompts keep their last 64 tokens\n")
    assert fit([[1] * 500], 5, 128, "--z") == ([[1] * 123], 5)  # the length asked for fits: no note


def test_chat_defaults_answer_on_a_small_context_model(run_dirs, capsys):
    """The default --max_new_tokens (128) equals the CPU model's context: capped, never an error."""
    run, _ = run_dirs["out-finetune"]
    assert chat.ChatConfig().max_new_tokens >= 128
    out = io.StringIO()
    chat.chat(chat.parse_args(["--init_from", str(run)]), stdin=io.StringIO("what is len?\n/quit\n"), stdout=out)
    reply = out.getvalue().split("Assistant:", 1)[1]
    assert reply.strip() and "capped at" in capsys.readouterr().err


def test_flags_are_spelled_alike_and_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--max_step", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --max_step 3" in capsys.readouterr().err
    helps = {}
    for script in ("train_gpt2", "finetune", "dpo", "rl", "hellaswag", "chat", "score"):
        r = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, COLUMNS="400"))
        helps[script] = r.stdout
        device = regex.search(r"--device DEVICE\s+(.*)", r.stdout)[1]
        assert device.startswith(housekeeping.DEVICE_HELP), (script, device)
        assert "--no-no" not in r.stdout, script
    assert "--no-cache" in helps["chat"] and "--warmup_steps" in helps["finetune"] and "--warmup_steps" in helps["dpo"]


def test_gpt2_tokenizer_offline_from_the_env_or_one_line_saying_how_to_fetch_it(tmp_path):
    code = "import bpe; print(bpe.load_tokenizer('gpt2').encode('Hello world'))"
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPT2_TIKTOKEN=str(tmp_path / "absent.tiktoken"))
    blocked = dict(env, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                   TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"))  # no network, no cached copy
    r = subprocess.run([sys.executable, str(ROOT / "bpe.py"), "show", "--tokenizer", "gpt2", "--text", "hi"],
                       capture_output=True, text=True, env=blocked, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "fetch it once: curl -L" in lines[0], r.stderr
    assert bpe.GPT2_RANKS_URL in lines[0] and str(tmp_path / "absent.tiktoken") in lines[0]
    if not (SHARED / "gpt2.tiktoken").is_file():
        pytest.skip("../shared/data/gpt2.tiktoken absent: the offline success case needs it")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(blocked, GPT2_TIKTOKEN=str(SHARED / "gpt2.tiktoken")))
    assert r.stdout.strip() == "[15496, 995]", r.stderr  # tiktoken's GPT-2 ids (see ../shared/data/README.md)


def test_adapter_config_rank_is_that_of_the_hf_module(tmp_path):
    """--lora_rank 16 on q,v: LLaMA's q_proj and v_proj get r = 16; GPT-2's q and v live in one HF
    module (c_attn), which PEFT sees as one adapter of rank 32 (A's stacked, B block-diagonal), with
    lora_alpha doubled so that alpha / r, the scaling, stays 32 / 16."""
    for preset, r in (("tiny-gpt2", 32), ("tiny-llama", 16)):
        m = GPT(GPTConfig.preset(preset))
        apply_lora(m, 16, 32, targets=("q", "v"))
        save_adapter(m, tmp_path / preset)
        c = json.loads((tmp_path / preset / "adapter_config.json").read_text())
        assert (c["r"], c["lora_alpha"] / c["r"], c["rank_pattern"]) == (r, 2.0, {}), preset


# -----------------------------------------------------------------------------------------------
# the whole life cycle on a laptop, offline (README "The whole life cycle on a laptop")


def _run(cwd, *cmd, stdin=None, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    return subprocess.run([sys.executable, *map(str, cmd)] if cmd[0] != "torchrun" else list(map(str, cmd)), cwd=cwd,
                          input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The project's scripts in an empty folder, no ../shared beside it: what a new user has."""
    d = tmp_path_factory.mktemp("clone") / "nano-llm"
    d.mkdir()
    for f in ROOT.glob("*.py"):
        (d / f.name).write_text(f.read_text())
    return d


def test_life_cycle_runs_offline_each_stage_from_the_one_before(fresh_clone):
    d = fresh_clone
    steps = [("train_gpt2.py", "--max_steps", 6, "--eval_interval", 3, "--num_samples", 0),
             ("finetune.py", "--lora_rank", 16, "--grad_accum", 8, "--max_steps", 3, "--eval_interval", 3,
              "--num_samples", 2, "--max_new_tokens", 6, "--eval_examples", 16),
             ("rl.py", "--max_steps", 2, "--eval_interval", 2, "--max_examples", 32, "--eval_prompts", 8,
              "--num_samples", 1, "--max_new_tokens", 4),
             ("dpo.py", "--max_steps", 2, "--eval_interval", 2, "--num_samples", 1, "--max_new_tokens", 4,
              "--eval_pairs", 8),
             ("hellaswag.py", "--limit", 20, "--no-progress")]
    leaves = ["out/cpu/model/gpt_config.json", "out-finetune/best_model/gpt_config.json",
              "out-rl/model/gpt_config.json", "out-dpo/model/gpt_config.json",
              None]
    said = {}
    for cmd, left in zip(steps, leaves):
        r = _run(d, *cmd)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        assert left is None or (d / left).exists(), (cmd, left)
        said[cmd[0]] = r.stdout
    assert "offline default: out-finetune/best_model (from finetune.py) on the built-in sums" in said["rl.py"]
    assert "offline default: out-rl/model (from rl.py) on the built-in preference pairs" in said["dpo.py"]
    assert "out/cpu/model (from train_gpt2.py) on the built-in instruction set" in _run(
        d, "finetune.py", "--max_steps", 1, "--out_dir", "o2", "--num_samples", 0, "--eval_examples", 4).stdout
    assert "hellaswag scoring=harness n=20" in r.stdout and "out-dpo/model" in r.stdout
    r = _run(d, "chat.py", "--max_new_tokens", 5, stdin="what does len do?\n/quit\n")
    assert r.returncode == 0 and "chatting with out-dpo/model" in r.stdout and "Assistant:" in r.stdout


@pytest.mark.parametrize("world", [2, 8])
def test_life_cycle_torchrun_default_recipe_on_cpu(fresh_clone, world):
    """The default CPU recipe under torchrun: the micro-batch adapts so that the step divides."""
    d = fresh_clone
    if not (d / "data" / "builtin" / "corpus.json").exists():
        pytest.skip("needs the built-in corpus of the life-cycle test")
    r = _run(d, "torchrun", "--standalone", f"--nproc_per_node={world}", "train_gpt2.py", "--max_steps", 3,
             "--out_dir", f"out/torchrun{world}", "--num_samples", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    b = {2: 8, 8: 2}[world]  # 2048 tokens = b x 128 x world
    assert f"{b} x 128 x {world} ranks x 1 accumulation (batch_size 16 lowered to {b}" in r.stdout
    assert r.stdout.count("step     2/3") == 1  # rank 0 alone logs


def test_a_stage_run_too_early_names_the_stage_to_run_first(tmp_path, fresh_clone):
    """chat.py, hellaswag.py and score.py on a fresh clone (no stage's model, no GPT-2 in the cache, no
    hub): one line naming the stage to run first, not a Hugging Face hub error."""
    for f in fresh_clone.glob("*.py"):  # the scripts alone (the life-cycle test runs its stages in fresh_clone)
        (tmp_path / f.name).write_text(f.read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"), PYTHONPATH="")
    for cmd in (["chat.py"], ["chat.py", "--prompt", "hi"], ["hellaswag.py"], ["score.py"]):
        r = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (cmd, r.stderr[-2000:])
        assert lines[0].startswith("error: ") and "run `python train_gpt2.py`" in lines[0], (cmd, lines[0])
        assert "huggingface" not in lines[0].lower(), lines[0]


def test_life_cycle_hub_unreachable_or_bad_batch_is_one_error_line(tmp_path, fresh_clone):
    """No checkpoint of an earlier stage and no hub: each stage says what to do in one line."""
    for f in fresh_clone.glob("*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    for cmd in (["finetune.py", "--lora_rank", 16, "--grad_accum", 8], ["dpo.py"], ["hellaswag.py"],
                ["chat.py", "--prompt", "hi"], ["finetune.py", "--init_from", "gpt2", "--tokenizer", "gpt2"]):
        r = _run(tmp_path, *cmd, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (cmd, r.stderr[-2000:])
        # with no earlier stage here, each stage names the one to run first; with one, the hub's fix
        told = ("hf download", "tiktoken", "`python finetune.py` first", "`python train_gpt2.py` first")
        assert any(t in lines[0] for t in told), lines[0]
    r = _run(tmp_path, "torchrun", "--standalone", "--nproc_per_node=2", "train_gpt2.py", "--batch_size", 16,
             "--total_batch_size", 3072, "--max_steps", 1)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and ours == ["error: --total_batch_size 3072 is not a multiple of batch_size * seq_len * "
                                          "world_size = 16 * 128 * 2; --batch_size 12 divides it"]


# -----------------------------------------------------------------------------------------------
# the life cycle visibly learns: built-in tasks with held-out modules, before -> after metrics


@pytest.fixture(scope="module")
def builtin_task_rows(tmp_path_factory):
    files = prepare_data.builtin_tasks(tmp_path_factory.mktemp("tasks"))
    return {k: [json.loads(line) for line in f.read_text().splitlines()] for k, f in files.items()}


TASK_RULES = {  # the built-in tasks' questions and, by a plain rule, their answers (module m, name n)
    r"Which module in: from (\S+) import (\S+)$": lambda m, n: [f" {m}"],
    r"Which name in: from (\S+) import (\S+)$": lambda m, n: [f" {n}"],
    r"Write the import statement for (\S+) of module (\S+)\.$": lambda n, m: [f" from {m} import {n}"],
    r"Is (\S+) of module (\S+) a class or a function\?$": lambda n, m: [" class", " function"]}


def _task_module(instruction: str) -> tuple[str, list[str]]:
    """(the module asked about, the allowed answers) of a built-in task's question."""
    for pattern, answers in TASK_RULES.items():
        if found := regex.match(pattern, instruction):
            x, y = found.groups()
            return (x if "module in" in pattern or "name in" in pattern else y), answers(x, y)
    raise AssertionError(f"not a built-in task question: {instruction!r}")


def _instruction(pair: dict) -> str:
    return regex.fullmatch(r"(?s).*### Instruction:\n(.*)\n\n### Response:", pair["prompt"]).group(1)


def _copying(rows):
    """The copying questions among the instructions (the sums, rl.py's task, have no module)."""
    return [r for r in rows if not regex.match(r"What is \d+ \+ \d\?$", r["instruction"])]


def test_builtin_tasks_held_out_modules_never_occur_in_training(builtin_task_rows):
    t = builtin_task_rows
    train_m = {_task_module(r["instruction"])[0] for r in _copying(t["instructions"])}
    test_m = {_task_module(r["instruction"])[0] for r in t["instructions_test"]}
    assert len(train_m) > 100 and len(test_m) > 20 and not train_m & test_m  # whole modules held out
    pairs_m = {_task_module(_instruction(p))[0] for p in t["pairs"]}  # made-up modules: none is real
    assert len(pairs_m) > 1000 and not pairs_m & (train_m | test_m | set(sys.stdlib_module_names))
    assert not {it["source_id"].rsplit(".", 1)[0] for it in t["hellaswag"]} & train_m

    def as_set(rows, keys):
        return {tuple(r[k] for k in keys) for r in rows}

    assert not as_set(t["instructions"], ("instruction",)) & as_set(t["instructions_test"], ("instruction",))
    assert not as_set(t["pairs"], ("prompt",)) & as_set(t["pairs_test"], ("prompt",))
    assert len(t["hellaswag"]) >= 100 and len(t["instructions_test"]) == len(t["pairs_test"]) == 500


def test_builtin_tasks_answers_follow_from_the_question(builtin_task_rows):
    """Each answer, re-derived from its question by a plain rule (the exact-match reference), and each
    preference pair: the instruction's answer preferred to a different one."""
    for r in _copying(builtin_task_rows["instructions"]):
        assert r["output"] in _task_module(r["instruction"])[1], r
    for r, p in zip(builtin_task_rows["instructions_test"], builtin_task_rows["pairs_test"], strict=True):
        assert r["output"] in _task_module(r["instruction"])[1], r
        assert p["prompt"] == prepare_data.format_prompt(r) and p["chosen"] == r["output"] != p["rejected"]
    for p in builtin_task_rows["pairs"]:  # DPO's, about made-up names
        assert p["chosen"] in _task_module(_instruction(p))[1] and p["chosen"] != p["rejected"], p
    kinds = [r["output"] for r in builtin_task_rows["instructions"] if r["instruction"].startswith("Is ")]
    assert 0.1 < kinds.count(" class") / len(kinds) < 0.9


def test_builtin_sums_are_right_held_out_and_part_of_fine_tuning(builtin_task_rows):
    """rl.py's task: every sum's answer is its value; the held-out sums never occur in any training file;
    the training sums are the fine-tuning instructions' last records, after the copying questions, which
    stay what they were (the dialogues are made of those alone)."""
    t = builtin_task_rows
    for r in t["sums"] + t["sums_test"]:
        a, b = map(int, regex.fullmatch(r"What is (\d+) \+ (\d)\?", r["instruction"]).groups())
        assert r["output"] == f" {a + b}" and r["input"] == "" and a < 100
    train = {r["instruction"] for r in t["sums"]}
    held = {r["instruction"] for r in t["sums_test"]}
    assert len(train) == 800 and len(held) == 200 and not train & held
    assert t["instructions"][-800:] == t["sums"] and not held & {r["instruction"] for r in t["instructions"]}
    assert len(_copying(t["instructions"])) == len(t["dialogues"])


def test_exact_match_and_eos_rate_by_hand():
    ex = [{"output": "a.b"}, {"output": "from a import b"}, {"output": "class"}, {"output": "x"}]
    m = finetune.answer_metrics([" a.b\n", "from a import  b", "class", "y"], [True, True, False, False], ex)
    assert m == {"exact_match": 0.5, "eos_rate": 0.5}
    assert prepare_data.exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        prepare_data.exact_match(["a"], ["a", "b"])


def test_generate_responses_says_which_answers_ended_with_eos():
    """A stand-in model whose continuations are known: one stops with EOS, one runs to the limit."""
    eos = 0

    class Model:
        config = type("C", (), {"block_size": 512})

        def generate(self, prompts, n, temperature, eos_token_id):
            T = max(len(p) for p in prompts)
            tails = [[ord("o"), ord("k"), eos, eos], [ord("n"), ord("o"), ord("p"), ord("e")]]
            return torch.tensor([[1] * T + tails[i % 2][:n] for i in range(len(prompts))])

    class Tok:
        encode = staticmethod(lambda s: [ord(ch) for ch in s])
        decode = staticmethod(lambda ids: "".join(map(chr, ids)))

    ex = [{"instruction": "a", "input": "", "output": "ok"}, {"instruction": "bb", "input": "", "output": "ok"}]
    answers, ended = finetune.generate_responses(Model(), Tok(), ex, eos, 4)
    assert answers == ["ok", "nope"] and ended == [True, False]
    assert finetune.answer_metrics(answers, ended, ex) == {"exact_match": 0.5, "eos_rate": 0.5}


def test_dpo_summary_reward_accuracy_and_chosen_rate(tmp_path, monkeypatch, capsys):
    """dpo.py's summary.json: reward_accuracy of the held-out pairs (0 at step 0: policy = reference,
    ties count as wrong) and chosen_rate, the share of answers equal to the chosen one, before and after."""
    import bpe

    pairs = [{"prompt": f"say {w}:", "chosen": f" {w}", "rejected": f" {v}"}
             for w, v in [("red", "blue"), ("cat", "dog"), ("sun", "tree"), ("big", "small")] * 3]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:8]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[8:]))
    bpe.Tokenizer.train(" ".join(p["prompt"] + p["chosen"] + p["rejected"] for p in pairs), 300,
                        special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "model", format="native")
    answers = iter([[" red", "cat", " no", "big "], [" red", " cat", " sun", "x"]])  # before: 3 of 4; after: 3 of 4
    monkeypatch.setattr(dpo, "_samples", lambda *a: next(answers))
    dpo.main(["--init_from", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--data_file",
              str(tmp_path / "train.jsonl"), "--val_file", str(tmp_path / "val.jsonl"), "--out_dir",
              str(tmp_path / "out"), "--lora_rank", "4", "--max_steps", "2", "--eval_interval", "2",
              "--num_samples", "4", "--warmup_steps", "0"])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_reward_accuracy" in r]
    assert s["before"]["reward_accuracy"] == 0.0 and s["after"]["reward_accuracy"] == evals[-1]["val_reward_accuracy"]
    assert s["before"]["chosen_rate"] == 0.75 and s["after"]["chosen_rate"] == 0.75
    out = capsys.readouterr().out
    assert "4 held-out pairs" in out and "chosen_rate 0.750 -> 0.750" in out
    written, next_stage = out.splitlines()[-2:]  # the files, then the stage to run next
    assert "summary.json" in written and next_stage.startswith("next: python hellaswag.py --init_from ")


def test_hellaswag_baseline_summary_acc_norm_next_to_chance(tmp_path, capsys):
    """--baseline --json: "before" is a randomly initialised model of the same shape (scored here
    directly), "after" the model given; acc_norm from the per-item scores by hand; chance 1/4."""
    import bpe

    words = "alpha beta gamma delta red green blue cat dog sun".split()
    rnd = random.Random(0)
    items = [{"activity_label": "x", "ctx_a": " ".join(rnd.sample(words, 3)), "ctx_b": "",
              "endings": [" ".join(rnd.sample(words, rnd.randint(1, 3))) for _ in range(4)], "label": i % 4}
             for i in range(12)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    tok = bpe.Tokenizer.train(" ".join(words) * 3, 300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(1)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=300)).save_pretrained(tmp_path / "m", "native")
    tok.save(tmp_path / "m")
    hellaswag.main(["--init_from", str(tmp_path / "m"), "--data_file", str(tmp_path / "items.jsonl"), "--baseline",
                    "--json", str(tmp_path / "r" / "summary.json"), "--per_item", str(tmp_path / "items_out.jsonl"),
                    "--no-progress", "--device", "cpu"])
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    per = [json.loads(line) for line in (tmp_path / "items_out.jsonl").read_text().splitlines()]
    by_hand = sum(max(range(4), key=lambda j: p["ll"][j] / p["norm"][j]) == p["label"] for p in per) / 12
    assert s["chance"] == 0.25 and s["after"]["acc_norm"] == pytest.approx(by_hand)
    model, t = hellaswag.load_model(str(tmp_path / "m"))
    torch.manual_seed(0)
    random_model = GPT(model.config)
    want = hellaswag.evaluate(random_model, t, prepare_data.load_hellaswag(tmp_path / "items.jsonl"), device="cpu")
    assert s["before"]["acc_norm"] == pytest.approx(want["acc_norm"])
    assert "(chance 0.250, a random model " in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------
# the layout: who may import whom, and how long a file may be


# what each shared file may import of ours; a stage script may import all five (train_gpt2.py also
# hellaswag.py, for its in-loop evaluation), and never another stage script
LIBRARIES = {"housekeeping": set(), "bpe": {"housekeeping"}, "model": {"bpe", "housekeeping"},
             "lora": {"bpe", "model", "housekeeping"}, "prepare_data": {"bpe", "model", "housekeeping"}}


FREE = {"bench_speed", "bench_memory", "test_all"}  # measurements and tests may import anything


def import_violations(root: Path) -> list[str]:
    """Every import of one of our files, at any depth (inside functions too), that breaks the rules:
    housekeeping.py imports none of ours; bpe.py only housekeeping.py; model.py only bpe.py and
    housekeeping.py; lora.py and prepare_data.py only those three; a stage script only the five shared
    files (train_gpt2.py also hellaswag.py); bench_*.py and test_all.py anything."""
    import ast

    ours = {p.stem for p in root.glob("*.py") if not p.stem.startswith("test_scratch")}
    bad = []
    for path in sorted(root.glob("*.py")):
        name = path.stem
        if name in FREE or name not in ours:
            continue
        allowed = LIBRARIES.get(name)
        if allowed is None:
            allowed = set(LIBRARIES) | ({"hellaswag"} if name == "train_gpt2" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module]
            else:
                mods = []
            for mod in mods:
                top = mod.split(".")[0]
                if top in ours and top != name and top not in allowed:
                    bad.append(f"{path.name}:{node.lineno}: imports {top}")
    return bad


def code_lines(text: str) -> int:
    """Lines of code: blank lines, comment lines and docstring lines are not counted (explanations are
    free; only code counts against a file's size)."""
    import ast

    prose = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:  # a string that is a whole statement: a docstring (or a block of prose)
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(
                        stmt.value.value, str):
                    prose.update(range(stmt.lineno, stmt.end_lineno + 1))
    n = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and number not in prose:
            n += 1
    return n


def test_layout_imports_follow_the_rules(tmp_path):
    assert import_violations(ROOT) == []
    # the check bites: a stage script importing another stage script, even inside a function; a shared
    # file importing a stage or a later shared file; housekeeping importing anything of ours
    for f in ROOT.glob("*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    dpo_lines = len((ROOT / "dpo.py").read_text().splitlines())
    (tmp_path / "dpo.py").write_text((ROOT / "dpo.py").read_text() + "\n\ndef _x():\n    import finetune\n")
    (tmp_path / "model.py").write_text("from lora import apply_lora\n" + (ROOT / "model.py").read_text())
    (tmp_path / "housekeeping.py").write_text("import bpe\n" + (ROOT / "housekeeping.py").read_text())
    assert sorted(import_violations(tmp_path)) == [f"dpo.py:{dpo_lines + 4}: imports finetune",
                                                   "housekeeping.py:1: imports bpe", "model.py:1: imports lora"]


def test_layout_no_file_over_1000_lines_of_code_and_prose_is_free():
    """No file over 1,000 lines of code, test_all.py aside (model.py is no exception): blank, comment and
    docstring lines do not count, so that an explanation is never the thing cut to fit."""
    assert code_lines('"""A docstring\n\nof three lines."""\n\n# a comment\nx = 1  # code\n\n\ndef f():\n'
                      '    """Its docstring."""\n    return """a string that is code"""\n') == 3
    sizes = {f.stem: code_lines(f.read_text()) for f in ROOT.glob("*.py") if not f.stem.startswith("test_")}
    assert {name: n for name, n in sizes.items() if n > 1000} == {}
    assert "model" in sizes and "housekeeping" in sizes


def test_layout_model_py_is_the_model_and_housekeeping_says_skip_it():
    """A learner who opens model.py meets the network first: no import of flags, signals, locks or run
    directories; generation ends before about line 850 (the families' switches took 50 lines); the Hugging Face
    plumbing is an appendix at the end. housekeeping.py says in its docstring that it can be skipped on first read."""
    import ast

    text = (ROOT / "model.py").read_text()
    tree = ast.parse(text)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"argparse", "signal", "fcntl", "shutil", "fnmatch", "random", "matplotlib"}
    lines = text.splitlines()
    end_of_generation = next(i for i, line in enumerate(lines, 1) if line.startswith("# 5. "))
    appendix = next(i for i, line in enumerate(lines, 1) if line.startswith("# 6. Appendix"))
    assert end_of_generation < 850 < appendix
    assert "skip it on first read" in ast.get_docstring(ast.parse((ROOT / "housekeeping.py").read_text())).lower()

