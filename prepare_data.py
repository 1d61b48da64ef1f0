"""
prepare_data.py: every data set the other scripts read, downloaded or derived, checked, normalised
and written to data/<name>/ (change with --out_dir and --name).

    python prepare_data.py builtin          # no network: stdlib docstrings -> token shards, own BPE
    python prepare_data.py shakespeare      # tiny Shakespeare (1 MB, downloaded with requests)
    python prepare_data.py text --input "books/*.txt" --name books     # your own corpus, own BPE
    python prepare_data.py fineweb          # FineWeb-Edu sample-10BT: ~100 shards of 100M tokens
    python prepare_data.py builtin_tasks    # no network: instructions, pairs, classes, multiple choice
    python prepare_data.py hellaswag        # HellaSwag validation set, for hellaswag.py
    python prepare_data.py alpaca --max_examples 200 --max_response_chars 512   # jsonl for finetune.py
    python prepare_data.py hh --split train          # HH-RLHF dialogues for finetune.py --task dialogue
    python prepare_data.py hh_pairs --split train    # HH-RLHF preference pairs for dpo.py
    python prepare_data.py gsm8k --split train       # GSM8K maths problems for rl.py --reward number
    python prepare_data.py SUBCOMMAND --help         # every flag, documented

Shards (what train_gpt2.py reads). A shard is a 1024-byte header, then the token ids as little-endian
uint16 (uint32 above 65536 ids). The header holds a magic, a version, the token count and a JSON
object (tokenizer name, vocab size, end-of-text id, split, where the stream stood when the shard was
closed), so a reader can check that a file is ours, whole, and made with the tokenizer it expects.
Shard 0 is the validation split (<name>_val_000000.bin), shards 1, 2, ... the training split. Every
document is preceded by <|endoftext|>, so the model learns where documents start. Shards are written
to a temporary name and renamed; a re-run skips the finished ones and goes on from the document
where the last one stopped.

Tokenizer (--tokenizer): `builtin` and `text` train a BPE of their own on their corpus by default
(bpe.py, no network: cached in data/<name>/tokenizer/); `shakespeare` and `fineweb`, which download
anyway, use GPT-2's (tiktoken). Any of them takes 'gpt2' or a directory written by bpe.py, which is
copied to data/<name>/tokenizer/ so that the trainer decodes with the same one.

The built-in corpus (`builtin`), what `python train_gpt2.py` trains on when nothing else was
prepared, comes from text every Python installation carries: the docstrings of the standard
library's modules, classes and functions (read with `ast`, never imported) plus the language
reference topics in `pydoc_data`, about 2.3 MB of English. One module is one document; a module is
held out for validation when the CRC32 of its path is 0 mod 10. The tokenizer is a 4096-token BPE
that bpe.py trains on the training split, cached in data/builtin/tokenizer/.

Records (what finetune.py, dpo.py and hellaswag.py read): Alpaca instructions, HH-RLHF dialogues and
preference pairs, classification sets and HellaSwag items, each checked record by record.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import struct
import sys
import sysconfig
import time
import zlib
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bpe import Tokenizer, load_tokenizer
from housekeeping import ArgumentParser, DefaultsHelp, atomic_write, bounded, run_main, write_jsonl

# -----------------------------------------------------------------------------------------------
# 1. The shard format

MAGIC = b"NLLMTOK\x00"
VERSION = 1
HEADER_BYTES = 1024  # magic (8) + version (uint32) + token count (uint64) + JSON meta, zero-padded
_FIXED = struct.Struct("<8sIQ")


def shard_path(out_dir: Path, name: str, index: int) -> Path:
    split = "val" if index == 0 else "train"
    return Path(out_dir) / f"{name}_{split}_{index:06d}.bin"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def write_shard(path: Path, tokens: np.ndarray, meta: dict):
    """Write one shard atomically (a kill never leaves a partial shard that looks whole)."""
    meta = dict(meta, dtype=np.dtype(token_dtype(meta["vocab_size"])).name)
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    if _FIXED.size + len(blob) > HEADER_BYTES:
        raise ValueError(f"shard header metadata too long ({len(blob)} bytes): {meta}")
    header = _FIXED.pack(MAGIC, VERSION, len(tokens)) + blob
    header += b"\0" * (HEADER_BYTES - len(header))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(np.asarray(tokens).astype(np.dtype(token_dtype(meta["vocab_size"])).newbyteorder("<")).tobytes())
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def read_header(path) -> dict:
    """The shard's metadata (with n_tokens), after checking the magic, version and file size.
    Raises ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ValueError(f"{path}: cannot read token shard: {e}") from None
    if len(head) < HEADER_BYTES:
        raise ValueError(f"{path}: not a token shard: {len(head)} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header (truncated, or not made by prepare_data.py)")
    magic, version, n_tokens = _FIXED.unpack_from(head)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a token shard made by prepare_data.py: magic {magic!r}, expected "
                         f"{MAGIC!r} (re-run prepare_data.py to rebuild it)")
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, this code reads version {VERSION} "
                         f"(re-run prepare_data.py)")
    try:
        meta = json.loads(head[_FIXED.size:].rstrip(b"\0").decode("utf-8"))
        vocab_size = int(meta["vocab_size"])
        dtype = np.dtype(meta["dtype"])
        meta["tokenizer"]  # present, or a KeyError: every reader checks the tokenizer
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt shard header metadata ({type(e).__name__}: {e}); expected JSON "
                         f"with tokenizer, vocab_size and dtype") from None
    if dtype != np.dtype(token_dtype(vocab_size)):
        raise ValueError(f"{path}: dtype {dtype} does not fit vocab_size {vocab_size}")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: file is {size:,} bytes but its header announces {n_tokens:,} tokens "
                         f"({expected:,} bytes): truncated or corrupt, re-run prepare_data.py")
    meta["n_tokens"] = int(n_tokens)
    return meta


def load_shard(path) -> np.ndarray:
    """The tokens of a shard, memory-mapped. Every id is checked against the header's vocab_size
    first (one vectorised max, about a second per GB): an id out of range would otherwise surface
    as an indexing error deep in the model, or a device-side assert on a GPU, naming no file."""
    meta = read_header(path)
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r",
                       offset=HEADER_BYTES, shape=(meta["n_tokens"],))
    top = int(tokens.max())
    if top >= meta["vocab_size"]:
        raise ValueError(f"{path}: token id {top} at position {int(np.argmax(tokens >= meta['vocab_size']))} is not "
                         f"below the vocab_size {meta['vocab_size']} of its header: corrupt shard, "
                         "re-run prepare_data.py")
    return tokens


def list_shards(data_dir, split: str) -> list[Path]:
    """The shards of one split ('train' or 'val') in data_dir, in order."""
    return sorted(Path(data_dir).glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))


# -----------------------------------------------------------------------------------------------
# 2. Tokenizers: GPT-2's by default, or a directory written by bpe.py

def tokenizer_name(spec: str) -> str:
    """A name that identifies the tokenizer, stored in every shard and checked by the trainer:
    'gpt2', or 'bpe<vocab>-<first 10 hex digits of sha256 of tokenizer.bpe>' for a bpe.py directory,
    so two different BPE vocabularies of the same size are told apart."""
    if spec == "gpt2" or Path(spec).name == "gpt2.tiktoken":
        return "gpt2"
    p = Path(spec)
    if p.is_dir() and (p / "tokenizer.bpe").is_file():
        digest = hashlib.sha256((p / "tokenizer.bpe").read_bytes()).hexdigest()[:10]
        return f"bpe-{digest}"
    raise ValueError(f"--tokenizer {spec!r}: expected 'gpt2' or a directory written by bpe.py "
                     f"(holding tokenizer.bpe)")


def load_text_tokenizer(spec: str):
    """bpe.load_tokenizer, with what to do when GPT-2's vocabulary cannot be had offline."""
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        if spec != "gpt2":
            raise
        raise ValueError(f"GPT-2's tokenizer is not available ({e}). tiktoken downloads it on first use: run once "
                         f"with network access (it is cached in TIKTOKEN_CACHE_DIR), or train your own with "
                         f"`python bpe.py train --input FILES --vocab_size 8192 --out_dir tok/` and pass --tokenizer "
                         f"tok/ (builtin and text do this for you when --tokenizer is left out)") from None


_worker_tok = None


def _init_worker(spec):
    global _worker_tok
    _worker_tok = load_text_tokenizer(spec)


def _encode_docs(texts: list[str]) -> list[np.ndarray]:
    """Worker: each document -> [<|endoftext|>] + its tokens. The end-of-text token *before* every
    document (GPT-2's convention) tells the model that what follows starts afresh."""
    dtype = token_dtype(_worker_tok.n_vocab)
    return [np.array([_worker_tok.eot_id] + ids, dtype=dtype) for ids in _worker_tok.encode_batch(texts)]


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    """The documents in lists of n (the last may be shorter): one task for a tokenizer process."""
    it = iter(docs)
    while batch := list(itertools.islice(it, n)):  # islice takes the next n, or fewer at the end
        yield batch


# -----------------------------------------------------------------------------------------------
# 3. The writer: a stream of documents -> fixed-size shards, resumable

def _resume_point(out_dir: Path, name: str, tok_name: str):
    """Scan the finished shards: (next shard index, documents consumed, tokens of the next document
    already written, final?). Stops at the first missing shard (nothing after it is trusted)."""
    index, next_doc, offset, final = 0, 0, 0, False
    while shard_path(out_dir, name, index).exists():
        meta = read_header(shard_path(out_dir, name, index))
        if meta["tokenizer"] != tok_name:
            raise ValueError(f"{shard_path(out_dir, name, index)} was made with tokenizer "
                             f"{meta['tokenizer']!r}, not {tok_name!r}: delete {out_dir} or pick another --name")
        index, next_doc, offset, final = index + 1, meta["next_doc"], meta["next_doc_offset"], meta["final"]
    return index, next_doc, offset, final


def write_shards(docs: Iterable[str], out_dir, name: str, tokenizer: str = "gpt2", shard_tokens: int = 10 ** 8,
                 val_tokens: int = 10 ** 8, num_workers: int = 0, docs_per_task: int = 64,
                 extra_meta: dict | None = None) -> dict:
    """Tokenize documents and write them as shards: the first `val_tokens` tokens are the validation
    shard (index 0), the rest train shards of `shard_tokens` tokens (the last may be shorter).
    num_workers > 0 tokenizes in that many processes (order is kept). Returns a summary dict.
    Resumable: finished shards are kept and their documents skipped (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_tokens <= 0 or val_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens} and val_tokens={val_tokens} must be positive")
    tok = load_text_tokenizer(tokenizer)
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {tokenizer!r} has no <|endoftext|> token; bpe.py tokenizers need "
                         f"special_tokens=['<|endoftext|>']")
    tok_name = tokenizer_name(tokenizer)
    if Path(tokenizer).is_dir():  # the trainer decodes (and HellaSwag encodes) with the same tokenizer
        dst = out_dir / "tokenizer"
        if not (dst / "tokenizer.bpe").exists() or tokenizer_name(str(dst)) != tok_name:
            shutil.copytree(tokenizer, dst, dirs_exist_ok=True)
    index, skip_docs, skip_tokens, final = _resume_point(out_dir, name, tok_name)
    vocab = tok.n_vocab
    base_meta = dict(extra_meta or {}, tokenizer=tok_name, vocab_size=vocab, eot_id=tok.eot_id)
    if final:
        print(f"{out_dir}: complete already ({index} shards); nothing to do", file=sys.stderr)
        return {"shards": index, "resumed": True, "written": 0}
    if index:
        print(f"{out_dir}: {index} finished shard(s) kept; resuming at document {skip_docs:,}", file=sys.stderr)

    encoded: Iterable[list[np.ndarray]]
    # the documents from skip_docs on (the ones before are in finished shards), in tasks of docs_per_task
    batches = _batched(itertools.islice(docs, skip_docs, None), docs_per_task)
    pool = None
    if num_workers > 0:
        pool = Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,))
        encoded = pool.imap(_encode_docs, batches)
    else:
        _init_worker(tokenizer)
        encoded = map(_encode_docs, batches)

    capacity = val_tokens if index == 0 else shard_tokens
    buf = np.empty(capacity, dtype=token_dtype(vocab))
    fill, doc_i, first = 0, skip_docs, True  # doc_i: the index of the document being consumed
    n_written, t0, last_print = 0, time.time(), 0.0
    try:
        for batch in encoded:
            for ids in batch:
                done_in_doc = 0
                if first:  # drop the part of this document already in a finished shard
                    ids, done_in_doc, first = ids[skip_tokens:], skip_tokens, False
                if ids.size and int(ids.max()) >= vocab:
                    raise ValueError(f"token id {int(ids.max())} >= vocab_size {vocab}")
                while ids.size:
                    take = min(capacity - fill, ids.size)
                    buf[fill:fill + take] = ids[:take]
                    fill, ids, done_in_doc = fill + take, ids[take:], done_in_doc + take
                    if fill == capacity:  # shard full: record where the stream stands, then write it
                        at_doc, at_off = (doc_i, done_in_doc) if ids.size else (doc_i + 1, 0)
                        write_shard(shard_path(out_dir, name, index), buf[:fill],
                                    dict(base_meta, split="val" if index == 0 else "train", shard=index,
                                         next_doc=at_doc, next_doc_offset=at_off, final=False))
                        index, fill, capacity = index + 1, 0, shard_tokens
                        buf = np.empty(capacity, dtype=token_dtype(vocab))
                    n_written += take
                doc_i += 1
            now = time.time()
            if now - last_print > 0.5:
                last_print = now
                print(f"\r{name}: shard {index} | {n_written / 1e6:8.2f}M tokens | "
                      f"{n_written / max(now - t0, 1e-9) / 1e6:6.2f}M tokens/s", end="", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()
    if index == 0 and fill == 0:
        raise ValueError(f"{name}: no text: the input produced no documents")
    if index == 0:
        raise ValueError(f"{name}: the corpus has only {fill:,} tokens, all taken by the validation split "
                         f"(val_tokens={val_tokens:,}); lower --val_tokens / --val_frac or add text")
    # the last, shorter shard; marked final so that a re-run knows the folder is complete
    write_shard(shard_path(out_dir, name, index), buf[:fill],
                dict(base_meta, split="train", shard=index, next_doc=doc_i, next_doc_offset=0, final=True))
    index += 1
    dt = time.time() - t0
    if last_print:  # end the progress line that \r kept rewriting
        print(file=sys.stderr)
    print(f"{name}: {index} shards, {n_written:,} tokens in {dt:.1f}s "
          f"({n_written / max(dt, 1e-9) / 1e6:.2f}M tokens/s) -> {out_dir}", file=sys.stderr)
    return {"shards": index, "resumed": bool(skip_docs), "written": n_written}


# -----------------------------------------------------------------------------------------------
# 4. Sources

def read_text_file(path) -> str:
    """The text of a UTF-8 file; bytes that are not UTF-8 are an error naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in sorted order; a pattern matching nothing is an error."""
    files = []
    for pat in patterns:
        hits = [h for h in sorted(glob.glob(os.path.expanduser(pat), recursive=True)) if os.path.isfile(h)]
        if not hits:
            raise ValueError(f"--input {pat!r}: no such file (nothing matches)")
        files.extend(Path(h) for h in hits)
    return files


def estimate_val_tokens(files: list[Path], tokenizer: str, val_frac: float) -> int:
    """About val_frac of the corpus's tokens, from its size in bytes and the bytes per token of
    a 1 MB sample (so the corpus is read only once)."""
    total = sum(f.stat().st_size for f in files)
    with open(files[0], "rb") as f:
        sample = f.read(1 << 20).decode("utf-8", errors="ignore")
    n = len(load_text_tokenizer(tokenizer).encode(sample)) if sample else 0
    if not n:
        raise ValueError(f"{files[0]}: empty file")
    return max(1, int(val_frac * total * n / len(sample.encode("utf-8"))))


def _source_trees(packages: Iterable[str] = ()):
    """(label/relative path, ast tree) of every parsable .py file of the standard library (and of
    `packages`), tests left out, in sorted order. Nothing is imported."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.origin:
            raise ValueError(f"--packages: {pkg!r} is not installed")
        origin = Path(spec.origin)
        roots.append((pkg, origin.parent if origin.name == "__init__.py" else origin))
    for label, root in roots:
        for f in [root] if root.is_file() else sorted(root.rglob("*.py")):
            rel = f.relative_to(root.parent if root.is_file() else root)
            skip = {"test", "tests", "idle_test"} | ({"site-packages", "dist-packages"} if label == "stdlib" else set())
            if skip & set(rel.parts):
                continue
            try:
                yield f"{label}/{rel.as_posix()}", ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (lib2to3 test data, ...)


def stdlib_documents(packages: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(path, text) per module: the docstrings of the standard library's modules, classes and
    functions (and of `packages`), plus pydoc_data's topics. Sorted by path, so the corpus is
    deterministic for a given installation."""
    docs = []
    for path, tree in _source_trees(packages):
        parts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p and p.strip())
        if text:
            docs.append((path, text))
    try:
        from pydoc_data.topics import topics  # the language reference, as `help()` shows it
        docs += [(f"pydoc_data/{key}", topics[key]) for key in sorted(topics)]
    except ImportError:
        pass
    return sorted(docs)


def is_val_document(path: str) -> bool:
    return zlib.crc32(path.encode("utf-8")) % 10 == 0


def train_corpus_bpe(text_or_paths, vocab_size: int, out_dir: Path, what: str) -> Path:
    """A BPE of vocab_size tokens (GPT-4's split pattern, <|endoftext|> last) trained on a text or on
    files (streamed), saved in out_dir/tokenizer/; returns that folder. Written to a temporary name
    and renamed: an interrupted training leaves no half tokenizer. what: the text, for the message."""
    tok_dir = Path(out_dir) / "tokenizer"
    t0 = time.time()
    bpe_tok = Tokenizer.train(text_or_paths, vocab_size, pattern="gpt4", special_tokens=["<|endoftext|>"])
    tmp = Path(out_dir) / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bpe_tok.save(tmp)
    os.replace(tmp, tok_dir)
    print(f"trained a {vocab_size}-token BPE on {what} in {time.time() - t0:.1f}s -> {tok_dir}", file=sys.stderr)
    return tok_dir


def builtin_ready(out_dir) -> bool:
    """Is the built-in corpus in out_dir complete (its summary written, its last shard final)?"""
    out_dir = Path(out_dir)
    if not (out_dir / "corpus.json").exists() or not list_shards(out_dir, "train"):
        return False
    return bool(read_header(list_shards(out_dir, "train")[-1]).get("final"))


def prepare_builtin(out_dir="data/builtin", vocab_size: int = 4096, packages=(), num_workers: int = 0,
                    tokenizer: str | None = None) -> Path:
    """Build the built-in corpus (see the module docstring) into out_dir; returns out_dir. Cached:
    a finished folder is kept as it is."""
    out_dir = Path(out_dir)
    name = out_dir.name
    if builtin_ready(out_dir):
        return out_dir
    docs = stdlib_documents(packages)
    val = [t for p, t in docs if is_val_document(p)]
    train = [t for p, t in docs if not is_val_document(p)]
    # sorted by path, neighbouring modules are alike (email/*, encodings/*, ...): shuffled (with a
    # fixed seed), consecutive batches are closer to independent samples of the whole corpus
    random.Random(0).shuffle(train)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:  # train our own small BPE on the training split (held-out modules unseen)
        tok_dir = out_dir / "tokenizer"
        if not (tok_dir / "tokenizer.bpe").exists():
            train_corpus_bpe("\n\n".join(train), vocab_size, out_dir, "the training split")
        tokenizer = str(tok_dir)
    # the validation split is the held-out modules, so val_tokens is their exact token count
    tok = load_text_tokenizer(tokenizer)
    val_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(val))
    write_shards(val + train, out_dir, name, tokenizer, shard_tokens=10 ** 8, val_tokens=val_tokens,
                 num_workers=num_workers, extra_meta={"source": "builtin"})
    summary = {"source": "builtin", "python": sys.version.split()[0], "documents": len(docs),
               "val_documents": len(val), "characters": sum(len(t) for _, t in docs),
               "tokenizer": tokenizer_name(tokenizer), "packages": list(packages)}
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


TASK_QUESTIONS = {"module": "Which module in: from {m} import {n}", "name": "Which name in: from {m} import {n}",
                  "import": "Write the import statement for {n} of module {m}.",
                  "kind": "Is {n} of module {m} a class or a function?"}


def exact_match(answers: list[str], references: list[str]) -> float:
    """The built-in tasks' check: the share of answers equal to their reference (outer spaces aside)."""
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / max(len(answers), 1)


def near_miss(name: str, longer: bool = False) -> str:
    """A wrong copy of a name, as a half-trained model writes it:
      - its last part dropped: of a dotted, snake_case or CamelCase name (xml.sax.saxutils -> xml.sax,
        TimerHandle -> Timer), else its first half kept (timezone -> time);
      - or, longer, that last part repeated (TimerHandleHandle, timezonezone)."""
    short = name
    for sep in ".", "_":
        if sep in name.strip(sep):  # a separator inside the name, not only at its ends
            short = name.rsplit(sep, 1)[0]
            break
    else:
        parts = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)  # CamelCase words (an acronym is one)
        if len(parts) > 1:
            short = name[: len(name) - len(parts[-1])]
        else:
            short = name[: len(name) // 2]
    if longer:
        return name + name[len(short):]
    return short or name * 2  # a one-letter name has no shorter copy: a doubled one is as wrong


def _first_sentence(node) -> str:
    """The first sentence of a definition's docstring, on one line, when it has 24 to 160 characters and
    ends with a period (the multiple-choice items are made of these); else ""."""
    first = re.split(r"(?<=\.)\s|\n\s*\n", (ast.get_docstring(node) or "").strip(), maxsplit=1)[0]
    if 24 <= len(first) <= 160 and first.endswith("."):
        return " ".join(first.split())
    return ""


BUILTIN_TASK_FILES = ("instructions", "instructions_test", "dialogues", "pairs", "pairs_test", "classes", "hellaswag",
                      "sums", "sums_test")
SUM_QUESTION = "What is {a} + {b}?"


def sum_questions(seed: int = 0, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    """(training, held-out) Alpaca records of small sums, a number below 100 plus a digit, `What is 37 + 5?`
    -> ` 42`: reinforcement learning's built-in task (rl.py). A rule a 2.6M-parameter model learns only in
    part from fine-tuning (the tens digit is copied, the units digit is a table of 100 sums, the carry is
    the hard part), so that sampling finds the right answer sometimes: a group of answers then has rewards
    that differ, which is what RL learns from. The life cycle's fine-tuned model answers 0.065 of the
    held-out sums right (greedy), and 8 samples at temperature 1 hold a right answer for 0.22 to 0.31 of
    them (BENCHMARKS.md). (Two numbers below 50 were too
    hard: after 1200 of fine-tuning's 1800 steps, greedy exact match 0.000 on held-out sums, and a right
    answer among 8 samples for 0.108 of them.) Every pair (a, b) occurs once; n_test pairs are
    held out, never in any training file. A generator of its own, so that the other tasks' draws stay
    what they were."""
    srng = random.Random(seed + 3)
    pairs = [(a, b) for a in range(100) for b in range(10)]
    srng.shuffle(pairs)
    rows = [{"instruction": SUM_QUESTION.format(a=a, b=b), "input": "", "output": f" {a + b}"} for a, b in pairs]
    return rows[n_test:], rows[:n_test]


def builtin_tasks(out_dir="data/builtin_tasks", n_max: int = 30000, seed: int = 0) -> dict[str, Path]:
    """The offline life cycle's task data: TASK_QUESTIONS about the stdlib's names (read with `ast`).

    Each answer follows from its question by a rule (copying, a name's case) that a 2.6M-parameter
    model learns in minutes (reciting docs it cannot); an answer starts with a space, as its names do
    in the question, so that it copies their very tokens. Whole modules are held out (is_val_document,
    as in pretraining): no held-out record occurs in training. Writes once, into out_dir:
      - instructions.jsonl, instructions_test.jsonl: Alpaca records (the test one on held-out modules);
      - dialogues.jsonl: the training instructions as HH-RLHF turns;
      - pairs.jsonl, pairs_test.jsonl: the right answer over a wrong one (see pair); the training
        pairs ask about made-up names (see made_up), the test pairs about held-out modules;
      - classes.jsonl: a class's qualified name labelled 1, a function's 0;
      - hellaswag.jsonl (held out): a docstring sentence's start; its rest against its words reordered;
      - sums.jsonl, sums_test.jsonl: small sums (sum_questions), the training ones also among the
        instructions (after the copying questions), the test ones held out: rl.py's task.
    Returns {name: path} of these files."""
    names = BUILTIN_TASK_FILES
    files = {k: Path(out_dir) / f"{k}.jsonl" for k in names}
    if all(f.exists() for f in files.values()):
        return files
    rng = random.Random(seed)  # which records, in which order; the multiple-choice endings
    # pair's and made_up's draws come from generators of their own, so that rng's stay what they were
    prng = random.Random(seed + 1)
    mrng = random.Random(seed + 2)
    found = {False: [], True: []}  # held out? -> [(module, name, {task: answer}, first docstring sentence)]
    constants = []  # training only: module-level names, more to copy (their kind is neither class nor function)
    # made_up's material: the pieces of the training modules' names and of their classes' and functions' names
    parts = {"module": [], " class": [], " function": []}
    modules = set(sys.stdlib_module_names)  # and every module found: a made-up name is never a real one
    for path, tree in _source_trees():
        m = path[len("stdlib/"):-len(".py")].replace("/", ".").removesuffix(".__init__")  # stdlib/a/b.py -> a.b
        held = is_val_document(path)
        modules.add(m)
        if not held:
            parts["module"] += [w for w in re.split(r"[._]", m) if w.isidentifier()]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                n = node.name
                kind = " function" if isinstance(node, ast.FunctionDef) else " class"
                tasks = {"module": f" {m}", "name": f" {n}", "import": f" from {m} import {n}", "kind": kind}
                found[held].append((m, n, tasks, _first_sentence(node)))
                if not held:  # a class's name in its CamelCase words, a function's at its underscores
                    split_at = r"_|(?<=[a-z0-9])(?=[A-Z])" if kind == " class" else "_"
                    parts[kind] += [w for w in re.split(split_at, n) if w]
            elif isinstance(node, ast.Assign) and not held:
                for target in node.targets:
                    if isinstance(target, ast.Name) and not target.id.startswith("_"):
                        const = target.id
                        tasks = {"module": f" {m}", "name": f" {const}", "import": f" from {m} import {const}"}
                        constants.append((m, const, tasks, ""))

    def pair(question, task, tasks):
        """A preference pair: chosen, the right answer; rejected, an error a small model makes:
          - half the time the answer to another question about the same name (the wrong format);
          - else a near miss in the right format: a name cut short or overrun (near_miss), or for
            "kind" the other kind."""
        if prng.random() < 0.5:
            wrong = prng.choice([v for v in tasks.values() if v != tasks[task]])
        else:
            m, n = tasks["module"][1:], tasks["name"][1:]  # without their leading space
            longer = prng.random() < 0.5  # overrun, else cut short
            cut_module = prng.random() < 0.5  # the import statement: its module's name is wrong, else the name
            wrong_m, wrong_n = near_miss(m, longer), near_miss(n, longer)
            if task == "module":
                wrong = f" {wrong_m}"
            elif task == "name":
                wrong = f" {wrong_n}"
            elif task == "import":
                wrong = f" from {wrong_m} import {n}" if cut_module else f" from {m} import {wrong_n}"
            else:
                wrong = " class" if tasks[task] == " function" else " function"
        return dict(prompt=format_prompt({"instruction": question}), chosen=tasks[task], rejected=wrong)

    def pick(kind, counts):
        """A made-up name's pieces: mrng.choice(counts) random pieces of that kind."""
        how_many = mrng.choice(counts)
        return [mrng.choice(parts[kind]) for _ in range(how_many)]

    def made_up_module():
        """A dotted name of one or two parts (one more often), each of one or two pieces."""
        n_parts = mrng.choice([1, 1, 2])
        return ".".join("".join(pick("module", [1, 1, 2])) for _ in range(n_parts))

    def made_up():
        """A question about a made-up name of the training names' pieces: (question, task, tasks)."""
        m = made_up_module()
        while m in modules:  # never a real module's name
            m = made_up_module()
        kind = mrng.choice([" class", " function"])
        n = ("" if kind == " class" else "_").join(pick(kind, [1, 2, 2, 3]))  # CamelCase, snake_case
        tasks = {"module": f" {m}", "name": f" {n}", "import": f" from {m} import {n}", "kind": kind}
        task = mrng.choice(list(tasks))
        return TASK_QUESTIONS[task].format(m=m, n=n), task, tasks

    rows = {"hellaswag": []}
    questions = {}  # "" (training) or "_test" (held out) -> [(question, task, {task: answer})]
    for key, held in (("", False), ("_test", True)):  # one question per (name, task), shuffled
        if held:  # at most 40 names a top-level package: encodings' 100 codecs would crowd out the rest
            package = {}
            for r in found[True]:
                package.setdefault(r[0].split(".")[0], []).append(r)
            pool = [r for rs in package.values() for r in rng.sample(rs, min(len(rs), 40))]
        else:  # every name: copying is learned from many names (from a few thousand, recalling them is easier)
            pool = found[False] + constants
        recs = [(TASK_QUESTIONS[t].format(m=m, n=n), t, ts) for m, n, ts, _ in pool for t in ts]
        questions[key] = rng.sample(recs, min(len(recs), 500 if held else n_max))
        rows["instructions" + key] = [{"instruction": qn, "input": "", "output": ts[t]}
                                      for qn, t, ts in questions[key]]
    rows["pairs_test"] = [pair(qn, t, ts) for qn, t, ts in questions["_test"]]
    # DPO's pairs ask about made-up names. Fine-tuning learns to copy the names that pretraining read, and
    # copies the held-out modules' names, new to the model, worse; made-up names are new in the same way
    rows["pairs"] = [pair(*made_up()) for _ in range(min(n_max, 5000))]
    rows["dialogues"] = [{"chosen": format_dialogue([("Human", " " + r["instruction"]),
                                                     ("Assistant", r["output"])])} for r in rows["instructions"]]
    rows["classes"] = [{"text": f"{m}.{n}", "label": int(ts["kind"] == " class")} for m, n, ts, _ in found[False]]
    # multiple choice on the held-out modules: a docstring sentence's first half is the context, and
    # its true second half is one of four endings; the other three are the same words reordered
    sentences = []
    for m, n, _, first in found[True]:
        words = first.split()
        rest = words[len(words) // 2:]
        if len(set(rest)) > 2:  # enough different words for three other orders
            sentences.append((m, n, words[: len(words) // 2], rest))
    for i, (m, n, context, rest) in enumerate(sentences[:500]):
        true_ending = " ".join(rest)
        reordered = {" ".join(rng.sample(rest, len(rest))) for _ in range(50)} - {true_ending}
        endings = rng.sample(sorted(reordered), 3)
        label = rng.randrange(4)  # where the true ending goes
        endings.insert(label, true_ending)
        rows["hellaswag"].append({"activity_label": m, "ctx_a": " ".join(context), "ctx_b": "", "endings": endings,
                                  "label": label, "ind": i, "split": "val", "source_id": f"{m}.{n}"})
    # last, so that the dialogues are the copying questions alone, as before
    rows["sums"], rows["sums_test"] = sum_questions(seed)
    rows["instructions"] += rows["sums"]  # fine-tuning learns the sums in part; rl.py takes it from there
    for key in names:
        _write_jsonl(files[key], rows[key], quiet=True)
    print(f"built-in tasks -> {out_dir}: " + ", ".join(f"{len(rows[k])} {k}" for k in names), file=sys.stderr)
    return files


def fineweb_documents(remote_name: str, dataset: str = "HuggingFaceFW/fineweb-edu") -> Iterator[str]:
    """Stream the documents' text from the Hugging Face hub (nothing stored but the shards)."""
    from datasets import load_dataset

    ds = load_dataset(dataset, name=remote_name, split="train", streaming=True)
    for row in ds:
        yield row["text"]


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(url: str, dest: Path, flag: str | None = "--input") -> Path:
    """Download url to dest (skipped when already there); written to a temporary name and renamed,
    so an interrupted download never leaves a truncated file that later runs take for the whole.
    flag: the caller's flag for a local copy instead, named when the download fails."""
    import requests

    dest = Path(dest)
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = requests.get(url, timeout=60)
        r.raise_for_status()
    except requests.RequestException as e:
        local_copy = f", or pass its path with {flag}" if flag else ""
        raise ValueError(f"could not download {url} ({type(e).__name__}). Offline? Fetch it on a machine with "
                         f"internet and put it at {dest}{local_copy}.") from None
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(r.content))
    return dest


# -----------------------------------------------------------------------------------------------
# 5. Records for fine-tuning and evaluation: Alpaca instructions, HH-RLHF dialogues and preference
#    pairs, classification sets, HellaSwag items. Every record is checked; a bad one is named by
#    file and line. Hub versions come through `datasets` (or requests), with a one-line error
#    saying what to do when the hub cannot be reached.


def read_jsonl(path) -> list[tuple[str, object]]:
    """[("file:line", record), ...] of a .jsonl file; blank lines skipped, bad JSON named by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except ValueError as e:  # valid JSON that Python will not convert: a 5,000-digit integer
                raise ValueError(f"{path}:{lineno}: not a record ({e})") from None
            except RecursionError:  # Python's parser recurses once per level: [[[[...]]]] ends here
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
    return rows


def hub_rows(name: str, config=None, split: str = "train", offline_hint: str = "") -> list[tuple[str, dict]]:
    """[("name split row i", row), ...] of a hub dataset, or a one-line error when it cannot be had."""
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception as e:
        raise ValueError(f"could not load {name} from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}). {offline_hint}") from None
    return [(f"{name} {split} row {i}", r) for i, r in enumerate(ds)]


def _offline_hint(sub: str, flag: str = "--data_file") -> str:
    return (f"Offline? Run `python prepare_data.py {sub}` on a machine with internet, copy data/{sub}/ here "
            f"and pass {flag} data/{sub}/...")


def string_fields(rec, where: str, required, optional=()) -> dict:
    """The record's string fields (optional ones default to ""), or an error naming the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with {', '.join(required)}, got {type(rec).__name__}")
    for key in required:
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{where}: missing field {key!r}" if rec.get(key) is None else
                             f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    for key in optional:
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return {k: rec.get(k) or "" for k in (*required, *optional)}


# ---- Alpaca. The Stanford Alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca,
# train.py PROMPT_DICT); the response follows "### Response:" directly, as in Stanford's targets.
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


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for an example: the with-input template when `input` is non-empty. A
    dialogue example carries its own prompt (the conversation up to its last "Assistant:")."""
    if "prompt" in example:
        return example["prompt"]
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def load_alpaca(data_file=None, max_response_chars: int = 0, max_examples: int = 0) -> list[dict]:
    """Alpaca examples {instruction, input, output} from a .json file (a list) or a .jsonl file, or
    tatsu-lab/alpaca from the hub. Filters as in the reports: drop outputs longer than
    max_response_chars, then keep the first max_examples (0 = no limit)."""
    if data_file is None:
        rows = hub_rows("tatsu-lab/alpaca", offline_hint=_offline_hint("alpaca"))
    elif Path(data_file).suffix == ".jsonl" or not Path(data_file).is_file():
        rows = read_jsonl(data_file)
    else:
        try:
            data = json.loads(read_text_file(data_file))
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_file}: not valid JSON ({e.msg} at line {e.lineno}); a .jsonl file needs "
                             f"that suffix") from None
        except ValueError as e:  # valid JSON that Python will not convert: a 5,000-digit integer
            raise ValueError(f"{data_file}: not a list of records ({e})") from None
        except RecursionError:
            raise ValueError(f"{data_file}: JSON nested too deeply to be a list of records") from None
        if not isinstance(data, list):
            raise ValueError(f"{data_file}: expected a JSON list of objects with instruction/input/output")
        rows = [(f"{data_file}: example {i}", r) for i, r in enumerate(data)]
    if not rows:
        raise ValueError(f"{data_file}: the data file is empty")
    examples = [string_fields(r, where, ("instruction", "output"), ("input",)) for where, r in rows]
    if max_response_chars:
        examples = [e for e in examples if len(e["output"]) <= max_response_chars]
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise ValueError("no examples left after filtering (--max_response_chars / --max_examples)")
    return examples


# ---- HH-RLHF: "\n\nHuman: ...\n\nAssistant: ...", repeated. A marker counts only with its two
# newlines, so "Human:" quoted inside an answer stays part of that answer.
DIALOGUE_MARKERS = {"\n\nHuman:": "Human", "\n\nAssistant:": "Assistant"}
ASSISTANT = "\n\nAssistant:"


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
    """The inverse of parse_dialogue; with add_assistant_prompt, ends with "\\n\\nAssistant:" for the
    model to answer (a chat prompt)."""
    return "".join(f"\n\n{role}:{t}" for role, t in turns) + (ASSISTANT if add_assistant_prompt else "")


def dialogue_example(text: str, where: str) -> dict:
    """A dialogue as an example: the whole text for training, and for generation the prompt up to
    the last assistant turn and that turn's answer as the reference."""
    turns = parse_dialogue(text, where)
    last = max(i for i, (role, _) in enumerate(turns) if role == "Assistant")
    prompt = format_dialogue(turns[:last], add_assistant_prompt=True)
    return {"text": text, "prompt": prompt, "instruction": prompt.strip(), "input": "",
            "output": turns[last][1].strip()}


def load_dialogues(data_file=None, max_examples: int = 0, split: str = "train") -> list[dict]:
    """HH-RLHF conversations (the `chosen` one of each pair) from a jsonl file or Anthropic/hh-rlhf; the
    first max_examples (0 = all)."""
    rows = (read_jsonl(data_file) if data_file is not None else
            hub_rows("Anthropic/hh-rlhf", split=split, offline_hint=_offline_hint("hh")))
    out = []
    for where, rec in rows[:max_examples or None]:
        out.append(dialogue_example(string_fields(rec, where, ("chosen",))["chosen"], where))
    if not out:
        raise ValueError(f"{data_file or 'Anthropic/hh-rlhf'}: no conversations")
    return out


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


def load_pairs(data_file=None, split: str = "train") -> list[dict]:
    """Preference pairs [{prompt, chosen, rejected}] from a jsonl file (generic, or HH-RLHF's whole
    chosen/rejected conversations, split here) or Anthropic/hh-rlhf."""
    rows = (read_jsonl(data_file) if data_file is not None else
            hub_rows("Anthropic/hh-rlhf", split=split, offline_hint=_offline_hint("hh_pairs")))
    pairs = []
    for where, rec in rows:
        has_prompt = isinstance(rec, dict) and "prompt" in rec
        r = string_fields(rec, where, ("chosen", "rejected") + (("prompt",) if has_prompt else ()))
        if not has_prompt:
            try:
                r["prompt"], r["chosen"], r["rejected"] = split_hh_pair(r["chosen"], r["rejected"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    if not pairs:
        raise ValueError(f"{data_file}: no pairs in the file")
    return pairs


# ---- classification: --dataset names (hub id, config, text field, pair field). Only the train
# split is read and then split into train/val/test like every other task (GLUE hides its test labels).
HUB_CLASSIFICATION = {
    "sst2": ("nyu-mll/glue", "sst2", "sentence", None),
    "sms_spam": ("ucirvine/sms_spam", None, "sms", None),
    "mnli": ("nyu-mll/glue", "mnli", "premise", "hypothesis"),
}


def load_classification(data_file=None, dataset=None, num_classes: int = 2, max_examples: int = 0,
                        balance: bool = False, seed: int = 1337) -> list[dict]:
    """[{text, text_pair, label}] from a .jsonl/.csv file (fields text, text_pair?, label) or a hub
    dataset; every label is checked against num_classes; the first max_examples (0 = all)."""
    import csv

    fields_ = ("text", "text_pair")
    if data_file is not None and Path(data_file).suffix == ".csv" and Path(data_file).is_file():
        with open(data_file, newline="", encoding="utf-8") as f:
            rows = [(f"{data_file}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
    elif data_file is not None:
        rows = read_jsonl(data_file)
    elif dataset in HUB_CLASSIFICATION:
        hub, name, *fields_ = HUB_CLASSIFICATION[dataset]
        rows = hub_rows(hub, name, offline_hint="Offline? Pass --data_file with a local .jsonl/.csv copy.")
    else:
        raise ValueError(f"--dataset {dataset!r}: expected one of {', '.join(HUB_CLASSIFICATION)} "
                         "(or give --data_file)")
    out = []
    for where, r in rows:
        text = string_fields(r, where, (fields_[0],))[fields_[0]]
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
    if max_examples:
        out = out[:max_examples]
    if not out:
        raise ValueError("no classification examples")
    return out


# ---- HellaSwag (Zellers et al. 2019): a context and four endings, one of them right.
HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def download_hellaswag(cache_dir="data/hellaswag", url: str = HELLASWAG_VAL_URL, flag: str | None = None) -> Path:
    return download(url, Path(cache_dir) / Path(url).name, flag)


def load_hellaswag(path) -> list[dict]:
    """HellaSwag items from a .jsonl file (the public hellaswag_*.jsonl, or rows of HF `datasets`'
    Rowan/hellaswag, whose labels are strings) or a .parquet file (the hub's files), each with label
    as an int and ctx filled in."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (fetch it with `python prepare_data.py hellaswag`, "
                                f"or pass --data_file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}: row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return [hellaswag_item(row, where) for where, row in rows]


def hellaswag_item(row, where: str) -> dict:
    missing = [k for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label") if not isinstance(row, dict)
               or k not in row]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r} (HellaSwag items need activity_label, ctx_a, "
                         f"ctx_b, endings, label)")
    string_fields(row, where, ("activity_label",), ("ctx_a", "ctx_b"))
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        n = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise ValueError(f"{where}: field 'endings' must be a list of 4 strings, got {n}")
    label = row["label"]
    # the public jsonl has int labels, HF datasets' Rowan/hellaswag strings ("0".."3"; "" in its test split)
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise ValueError(f"{where}: field 'label' must be 0, 1, 2 or 3, got {row['label']!r}"
                         + (" (the test split has no labels)" if row["label"] == "" else ""))
    ctx = row.get("ctx")
    if not isinstance(ctx, str):  # the dataset defines ctx as ctx_a, a space, then ctx_b (when not empty)
        ctx = row["ctx_a"] + (" " + row["ctx_b"] if row["ctx_b"] else "")
    return {**row, "ctx": ctx, "label": label}


# -----------------------------------------------------------------------------------------------
# 6. The command line: one subcommand per data set, each run by its cmd_ function

def cmd_builtin(args):
    out = Path(args.out_dir) / (args.name or "builtin")
    if builtin_ready(out):  # a re-run: say so, rather than print nothing
        n_shards = len(list_shards(out, "val")) + len(list_shards(out, "train"))
        print(f"{out}: the built-in corpus is already there ({n_shards} shards, summary in {out / 'corpus.json'}); "
              f"nothing to do (delete the folder to build it again)", file=sys.stderr)
        return
    prepare_builtin(out, args.vocab_size, args.packages, args.num_workers, args.tokenizer)


def cmd_builtin_tasks(args):
    out = Path(args.out_dir) / args.name
    files = [out / f"{name}.jsonl" for name in BUILTIN_TASK_FILES]
    if all(f.exists() for f in files):  # a re-run: builtin_tasks keeps the files as they are
        print(f"{out}: the built-in task data is already there ({len(files)} files: "
              f"{', '.join(f.name for f in files)}); nothing to do (delete the folder to build it again)",
              file=sys.stderr)
        return
    builtin_tasks(out)


def cmd_text(args):
    files = expand_inputs(args.input)
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(f"empty input file(s): {', '.join(empty)}")
    out = Path(args.out_dir) / args.name
    tokenizer = args.tokenizer
    if tokenizer is None:  # no network needed: a BPE of the corpus's own, as builtin trains (cached)
        tok_dir = out / "tokenizer"
        if (tok_dir / "tokenizer.bpe").exists():
            print(f"using the BPE trained before, in {tok_dir} (delete it to train another)", file=sys.stderr)
        else:
            train_corpus_bpe([str(f) for f in files], args.vocab_size, out, "the input files")
        tokenizer = str(tok_dir)
    val_tokens = args.val_tokens or estimate_val_tokens(files, tokenizer, args.val_frac)
    docs = (read_text_file(f) for f in files)  # one file = one document
    write_shards(docs, out, args.name, tokenizer, args.shard_tokens, val_tokens, args.num_workers,
                 docs_per_task=1, extra_meta={"source": "text"})


def cmd_shakespeare(args):
    out = Path(args.out_dir) / (args.name or "shakespeare")
    path = Path(args.input) if args.input else download(args.url, out / "input.txt")
    text = read_text_file(path)
    n_val = len(load_text_tokenizer(args.tokenizer).encode(text)) * args.val_frac
    write_shards([text], out, out.name, args.tokenizer, 10 ** 8, max(1, int(n_val)), 0,
                 extra_meta={"source": "shakespeare"})


def cmd_fineweb(args):
    out = Path(args.out_dir) / args.name
    write_shards(fineweb_documents(args.remote_name, args.dataset), out, args.name, args.tokenizer,
                 args.shard_tokens, args.val_tokens or args.shard_tokens, args.num_workers,
                 extra_meta={"source": f"{args.dataset}:{args.remote_name}"})


def cmd_hellaswag(args):
    print(download_hellaswag(Path(args.out_dir) / args.name))


def _write_jsonl(path: Path, rows: list[dict], quiet: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows, ensure_ascii=False)
    if not quiet:
        print(f"{len(rows)} records -> {path}")


def cmd_alpaca(args):
    """Alpaca (tatsu-lab/alpaca, or --data_file) filtered as finetune.py would, as one jsonl file."""
    examples = load_alpaca(args.data_file, args.max_response_chars, args.max_examples)
    _write_jsonl(Path(args.out_dir) / (args.name or "alpaca") / "alpaca.jsonl", examples)


def cmd_hh(args):
    """HH-RLHF conversations (the `chosen` side) as jsonl for `finetune.py --task dialogue`."""
    examples = load_dialogues(args.data_file, args.max_examples, split=args.split)
    _write_jsonl(Path(args.out_dir) / (args.name or "hh") / f"{args.split}.jsonl",
                 [{"chosen": e["text"]} for e in examples])


def cmd_hh_pairs(args):
    """HH-RLHF preference pairs as jsonl of {prompt, chosen, rejected} for `dpo.py --data_file`."""
    pairs = load_pairs(args.data_file, split=args.split)
    _write_jsonl(Path(args.out_dir) / (args.name or "hh_pairs") / f"{args.split}.jsonl",
                 pairs[: args.max_examples or None])


def load_gsm8k(data_file=None, split: str = "train", max_examples: int = 0) -> list[dict]:
    """GSM8K's grade-school maths problems (openai/gsm8k, config main, from the hub, cached; or a local jsonl
    of {question, answer}) as Alpaca records: the question the instruction, the worked answer the output.
    The answer ends `#### 42`: rl.py --reward number scores a sampled answer by its last number against
    that one."""
    if data_file is None:
        rows = hub_rows("openai/gsm8k", "main", split, offline_hint=_offline_hint("gsm8k"))
    else:
        rows = read_jsonl(data_file)
    if not rows:
        raise ValueError(f"{data_file}: the data file is empty")
    examples = []
    for where, r in rows:
        rec = string_fields(r, where, ("question", "answer"))
        examples.append({"instruction": rec["question"], "input": "", "output": rec["answer"]})
    return examples[: max_examples or None]


def cmd_gsm8k(args):
    """GSM8K as jsonl of {instruction, input, output} for `rl.py --data_file ... --reward number`."""
    examples = load_gsm8k(args.data_file, args.split, args.max_examples)
    _write_jsonl(Path(args.out_dir) / args.name / f"{args.split}.jsonl", examples)


GPT2_OR_DIR = "'gpt2' (tiktoken) or a directory written by bpe.py"
OWN_BPE = "default: train a BPE of --vocab_size on the corpus, cached in OUT_DIR/NAME/tokenizer/; or " + GPT2_OR_DIR


def build_parser():
    ap = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=DefaultsHelp)
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def command(name, help, fn, shards=True, tokenizer="gpt2", tokenizer_help=GPT2_OR_DIR, num_workers=None,
                out_name=None):
        """A subcommand run by fn, with the flags every one has: --out_dir and --name; and for those that
        write token shards, --tokenizer (default: `tokenizer`) and --num_workers."""
        p = sub.add_parser(name, help=help, formatter_class=DefaultsHelp)
        p.set_defaults(fn=fn)
        p.add_argument("--out_dir", default="data",
                       help="parent folder; the output (shards or .jsonl) goes to OUT_DIR/NAME/")
        p.add_argument("--name", default=out_name or name,
                       help="dataset name: the folder, and the prefix of the files in it")
        if shards:
            p.add_argument("--tokenizer", default=tokenizer, help=tokenizer_help)
            if num_workers is None:
                num_workers = max(1, (os.cpu_count() or 2) - 1)
            p.add_argument("--num_workers", type=bounded(int, 0), default=num_workers,
                           help="tokenizer processes (0 = tokenize in this process)")
        return p

    # builtin trains its own tokenizer unless told otherwise, and tokenizes in this process
    p = command("builtin", "no-network corpus: stdlib docstrings + pydoc topics, own BPE", cmd_builtin,
                tokenizer=None, tokenizer_help=OWN_BPE, num_workers=0)
    p.add_argument("--vocab_size", type=bounded(int, 257), default=4096, help="size of the BPE trained on the corpus")
    p.add_argument("--packages", nargs="*", default=[], help="installed packages whose docstrings to add")

    command("builtin_tasks", "no-network task data from the stdlib's documentation: instructions, preference pairs, "
            "classification, multiple choice (HellaSwag schema)", cmd_builtin_tasks, shards=False)

    p = command("text", "local text files or globs (one file = one document), own BPE", cmd_text,
                tokenizer=None, tokenizer_help=OWN_BPE)
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote globs)")
    p.add_argument("--vocab_size", type=bounded(int, 257), default=4096,
                   help="size of the BPE trained on the input files (without --tokenizer)")
    p.add_argument("--shard_tokens", type=bounded(int, 1), default=10 ** 8, help="tokens per training shard")
    p.add_argument("--val_frac", "--val_fraction", type=bounded(float, 0.0, 0.9), default=0.1,
                   help="share of the tokens (from the start of the corpus) held out as validation")
    p.add_argument("--val_tokens", type=bounded(int, 0), default=0,
                   help="exact validation size (overrides val_frac)")

    p = command("shakespeare", "tiny Shakespeare (downloaded with requests)", cmd_shakespeare)
    p.add_argument("--url", default=SHAKESPEARE_URL, help="where to download it from")
    p.add_argument("--input", default=None, help="use this local copy instead of downloading")
    p.add_argument("--val_frac", "--val_fraction", type=bounded(float, 0.0, 0.9), default=0.1,
                   help="share of tokens held out (the start)")

    p = command("fineweb", "FineWeb-Edu through `datasets` (streaming)", cmd_fineweb, out_name="fineweb_edu")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset id")
    p.add_argument("--remote_name", default="sample-10BT",
                   help="dataset configuration (sample-10BT, sample-100BT, ...)")
    p.add_argument("--shard_tokens", type=bounded(int, 1), default=10 ** 8, help="tokens per shard")
    p.add_argument("--val_tokens", type=bounded(int, 0), default=0, help="validation shard size (0 = shard_tokens)")

    command("hellaswag", "HellaSwag validation set (downloaded with requests)", cmd_hellaswag, shards=False)

    p = command("alpaca", "Alpaca instructions as jsonl for finetune.py", cmd_alpaca, shards=False)
    p.add_argument("--data_file", default=None, help="local .json/.jsonl instead of tatsu-lab/alpaca from the hub")
    p.add_argument("--max_response_chars", type=bounded(int, 0), default=0,
                   help="drop examples with longer outputs (0 = keep all)")
    p.add_argument("--max_examples", "--n_samples", type=bounded(int, 0), default=0,
                   help="then keep the first N (0 = all)")

    p = command("hh", "HH-RLHF conversations as jsonl for finetune.py --task dialogue", cmd_hh, shards=False)
    add_hh_flags(p)
    p = command("hh_pairs", "HH-RLHF preference pairs as {prompt, chosen, rejected} jsonl for dpo.py", cmd_hh_pairs,
                shards=False)
    add_hh_flags(p)
    p = command("gsm8k", "GSM8K maths problems as {instruction, input, output} jsonl for rl.py --reward number",
                cmd_gsm8k, shards=False)
    p.add_argument("--data_file", default=None, help="local jsonl of {question, answer} instead of openai/gsm8k")
    p.add_argument("--split", default="train", help="train|test (hub) and the output file's name")
    p.add_argument("--max_examples", type=bounded(int, 0), default=0, help="keep the first N (0 = all)")
    return ap


def add_hh_flags(p):
    """The flags hh and hh_pairs share."""
    p.add_argument("--data_file", default=None, help="local HH-RLHF-style jsonl instead of Anthropic/hh-rlhf")
    p.add_argument("--split", default="train", help="train|test (hub) and the output file's name")
    p.add_argument("--max_examples", "--n_samples", type=bounded(int, 0), default=0,
                   help="keep the first N (0 = all)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    run_main(main)
