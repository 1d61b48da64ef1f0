"""
prepare_data.py: text corpora -> token shards that train_gpt2.py reads.

Every sub-command writes to data/<name>/ (change with --out_dir and --name):

    python prepare_data.py builtin                   # no network: stdlib docstrings, own 4096-token BPE
    python prepare_data.py shakespeare               # tiny Shakespeare (1 MB, downloaded with requests)
    python prepare_data.py text --input "books/*.txt" --name books     # your own corpus
    python prepare_data.py fineweb                   # FineWeb-Edu sample-10BT: ~100 shards of 100M tokens
    python prepare_data.py fineweb --remote_name sample-100BT --name fineweb_edu100B
    python prepare_data.py hellaswag                 # HellaSwag validation set (via hellaswag.py)
    python prepare_data.py alpaca --n_samples 200 --max_response_chars 512   # Alpaca jsonl for finetune.py
    python prepare_data.py hh --split train                                    # HH-RLHF dialogues for finetune.py
    python prepare_data.py hh_pairs --split train                              # HH-RLHF pairs for dpo.py
    python prepare_data.py SUBCOMMAND --help         # every flag, documented

Shards. A shard is a 1024-byte header followed by the token ids as little-endian uint16 (uint32 if
the vocabulary has more than 65536 ids). The header is an 8-byte magic, a version, the token count
and a JSON object (tokenizer name, vocab size, end-of-text id, split, where the stream stood when the
shard was finished), so a reader can check that a file is ours, whole, and made with the tokenizer
it expects. Shard 0 is the validation split (<name>_val_000000.bin), shards 1, 2, ... are the
training split (<name>_train_000001.bin, ...). Every document is preceded by <|endoftext|>, so the
model learns where documents start; a document may run across a shard boundary.

Tokenizer: GPT-2's (tiktoken) by default, or --tokenizer DIR for one trained with bpe.py (it is
copied to data/<name>/tokenizer/ so that the trainer decodes with the same one). Tokenizing runs in
--num_workers processes.

Resuming: a shard is written to a temporary name and renamed when complete, so a killed run never
leaves a partial shard that looks whole. Each shard's header records how many documents were consumed
when it was closed; running the same command again skips the finished shards (and those documents)
and goes on from there. The last shard is marked final: a finished folder is not rewritten.

The built-in corpus (`builtin`) is what `python train_gpt2.py` trains on when nothing else was
prepared: it is made, with no network, from text every Python installation carries: the docstrings
of the standard library's modules, classes and functions (read with `ast` from the source files,
never imported) plus the language reference topics in `pydoc_data`, about 2.3 MB of English on
Python 3.11. `--packages numpy torch` adds the docstrings of installed packages. One module is one
document; a module goes to the validation split when the CRC32 of its path is 0 mod 10 (about 10%
of modules, held out whole); the training modules are shuffled with a fixed seed. The tokenizer
is a 4096-token BPE that bpe.py trains on the training split (a small vocabulary suits small CPU
models), cached in data/builtin/tokenizer/. The corpus depends on the Python version, and is the
same on every run of the same installation.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import random
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
    """Write one shard atomically: to path.tmp, then rename (a kill never leaves a partial shard)."""
    meta = dict(meta, dtype=np.dtype(token_dtype(meta["vocab_size"])).name)
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    if _FIXED.size + len(blob) > HEADER_BYTES:
        raise ValueError(f"shard header metadata too long ({len(blob)} bytes): {meta}")
    header = _FIXED.pack(MAGIC, VERSION, len(tokens)) + blob
    header += b"\0" * (HEADER_BYTES - len(header))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(np.asarray(tokens).astype(np.dtype(token_dtype(meta["vocab_size"])).newbyteorder("<")).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        vocab_size, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
        meta["tokenizer"]
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
    """The tokens of a shard, memory-mapped (read lazily; nothing is loaded until sliced)."""
    meta = read_header(path)
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r",
                     offset=HEADER_BYTES, shape=(meta["n_tokens"],))


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
    """model.load_tokenizer with a clear error when GPT-2's vocabulary cannot be had offline."""
    from model import load_tokenizer

    try:
        return load_tokenizer(spec)
    except ValueError as e:
        if spec == "gpt2":
            raise SystemExit(
                f"error: GPT-2's tokenizer is not available ({e}).\ntiktoken downloads it on first use: "
                f"run once with network access (it is then cached in TIKTOKEN_CACHE_DIR or the temp "
                f"directory), or put GPT-2's rank file at ../shared/data/gpt2.tiktoken beside the "
                f"checkout, or train your own with `python bpe.py train --input FILES --vocab_size "
                f"8192 --out tok/` and pass --tokenizer tok/ (the `builtin` corpus does this for you)."
            ) from None
        raise


_worker_tok = None


def _init_worker(spec):
    global _worker_tok
    _worker_tok = load_text_tokenizer(spec)


def _encode_docs(texts: list[str]) -> list[np.ndarray]:
    """Worker: each document -> [<|endoftext|>] + its tokens. The end-of-text token *before* every
    document (GPT-2's convention) tells the model that what follows starts afresh."""
    dtype = token_dtype(_worker_tok.n_vocab)
    out = []
    for ids in _worker_tok.encode_batch(texts):
        out.append(np.array([_worker_tok.eot_id] + ids, dtype=dtype))
    return out


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
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
            raise SystemExit(f"error: {shard_path(out_dir, name, index)} was made with tokenizer "
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

    def skipped(it):
        for i, d in enumerate(it):
            if i >= skip_docs:
                yield d

    encoded: Iterable[list[np.ndarray]]
    batches = _batched(skipped(docs), docs_per_task)
    pool = None
    if num_workers > 0:
        pool = Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,))
        encoded = pool.imap(_encode_docs, batches)
    else:
        _init_worker(tokenizer)
        encoded = map(_encode_docs, batches)

    capacity = val_tokens if index == 0 else shard_tokens
    buf = np.empty(capacity, dtype=token_dtype(vocab))
    fill = 0
    doc_i = skip_docs  # index of the document being consumed
    first = True
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
                         f"(val_tokens={val_tokens:,}); lower --val_tokens / --val_fraction or add text")
    # the last, shorter shard; marked final so that a re-run knows the folder is complete
    write_shard(shard_path(out_dir, name, index), buf[:fill],
                dict(base_meta, split="train", shard=index, next_doc=doc_i, next_doc_offset=0, final=True))
    index += 1
    dt = time.time() - t0
    print(f"{chr(10) if last_print else ''}{name}: {index} shards, {n_written:,} tokens in {dt:.1f}s "
          f"({n_written / max(dt, 1e-9) / 1e6:.2f}M tokens/s) -> {out_dir}", file=sys.stderr)
    return {"shards": index, "resumed": bool(skip_docs), "written": n_written}


# -----------------------------------------------------------------------------------------------
# 4. Sources

def read_text_file(path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in sorted order; a pattern matching nothing is an error."""
    files = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise ValueError(f"--input {pat!r}: no such file (nothing matches)")
        files.extend(Path(h) for h in hits)
    return files


def estimate_val_tokens(files: list[Path], tokenizer: str, val_fraction: float) -> int:
    """About val_fraction of the corpus's tokens, from its size in bytes and the bytes per token of
    a 1 MB sample (so the corpus is read only once)."""
    total = sum(f.stat().st_size for f in files)
    with open(files[0], "rb") as f:
        sample = f.read(1 << 20).decode("utf-8", errors="ignore")
    n = len(load_text_tokenizer(tokenizer).encode(sample)) if sample else 0
    if not n:
        raise ValueError(f"{files[0]}: empty file")
    return max(1, int(val_fraction * total * n / len(sample.encode("utf-8"))))


def stdlib_documents(packages: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(path, text) per module: the docstrings of the standard library's modules, classes and
    functions (and of `packages`), read with ast (nothing is imported), plus pydoc_data's topics.
    Sorted by path, so the corpus is deterministic for a given installation."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in packages:
        import importlib.util

        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.origin:
            raise ValueError(f"--packages: {pkg!r} is not installed")
        origin = Path(spec.origin)
        roots.append((pkg, origin.parent if origin.name == "__init__.py" else origin))
    docs = []
    for label, root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            rel = f.relative_to(root.parent if root.is_file() else root)
            if label == "stdlib" and ("site-packages" in rel.parts or "dist-packages" in rel.parts):
                continue
            if any(p in ("test", "tests", "idle_test") for p in rel.parts):
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (lib2to3 test data, ...)
            parts = [ast.get_docstring(n) for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(p for p in parts if p and p.strip())
            if text:
                docs.append((f"{label}/{rel.as_posix()}", text))
    try:
        from pydoc_data.topics import topics  # the language reference, as `help()` shows it
        for key in sorted(topics):
            docs.append((f"pydoc_data/{key}", topics[key]))
    except ImportError:
        pass
    return sorted(docs)


def is_val_document(path: str) -> bool:
    return zlib.crc32(path.encode("utf-8")) % 10 == 0


def prepare_builtin(out_dir="data/builtin", vocab_size: int = 4096, packages=(), num_workers: int = 0,
                    tokenizer: str | None = None) -> Path:
    """Build the built-in corpus (see the module docstring) into out_dir; returns out_dir. Cached:
    a finished folder is kept as it is."""
    out_dir = Path(out_dir)
    name = out_dir.name
    if (out_dir / "corpus.json").exists() and list_shards(out_dir, "train"):
        last = list_shards(out_dir, "train")[-1]
        if read_header(last).get("final"):
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
            from bpe import Tokenizer

            t0 = time.time()
            bpe_tok = Tokenizer.train("\n\n".join(train), vocab_size, pattern="gpt4",
                                      special_tokens=["<|endoftext|>"])
            tmp = out_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            bpe_tok.save(tmp)
            os.replace(tmp, tok_dir)
            print(f"trained a {vocab_size}-token BPE on the training split in {time.time() - t0:.1f}s "
                  f"-> {tok_dir}", file=sys.stderr)
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


def fineweb_documents(remote_name: str, dataset: str = "HuggingFaceFW/fineweb-edu") -> Iterator[str]:
    """Stream the documents' text from the Hugging Face hub (nothing stored but the shards)."""
    from datasets import load_dataset

    ds = load_dataset(dataset, name=remote_name, split="train", streaming=True)
    for row in ds:
        yield row["text"]


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(url: str, dest: Path) -> Path:
    """Download url to dest (atomically); kept if already there."""
    import requests

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    r = requests.get(url, timeout=60)
    r.raise_for_status()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(r.content)
    os.replace(tmp, dest)
    return dest


# -----------------------------------------------------------------------------------------------
# 5. The command line

def cmd_builtin(args):
    prepare_builtin(Path(args.out_dir) / (args.name or "builtin"), args.vocab_size, args.packages,
                    args.num_workers, args.tokenizer)


def cmd_text(args):
    files = expand_inputs(args.input)
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(f"empty input file(s): {', '.join(empty)}")
    val_tokens = args.val_tokens or estimate_val_tokens(files, args.tokenizer, args.val_fraction)
    docs = (read_text_file(f) for f in files)  # one file = one document
    write_shards(docs, Path(args.out_dir) / args.name, args.name, args.tokenizer, args.shard_tokens,
                 val_tokens, args.num_workers, docs_per_task=1, extra_meta={"source": "text"})


def cmd_shakespeare(args):
    out = Path(args.out_dir) / (args.name or "shakespeare")
    path = Path(args.input) if args.input else download(args.url, out / "input.txt")
    text = read_text_file(path)
    n_val = len(load_text_tokenizer(args.tokenizer).encode(text)) * args.val_fraction
    write_shards([text], out, out.name, args.tokenizer, 10 ** 8, max(1, int(n_val)), 0,
                 extra_meta={"source": "shakespeare"})


def cmd_fineweb(args):
    out = Path(args.out_dir) / args.name
    write_shards(fineweb_documents(args.remote_name, args.dataset), out, args.name, args.tokenizer,
                 args.shard_tokens, args.val_tokens or args.shard_tokens, args.num_workers,
                 extra_meta={"source": f"{args.dataset}:{args.remote_name}"})


def cmd_hellaswag(args):
    try:
        import hellaswag
    except ImportError as e:
        raise SystemExit(f"error: hellaswag.py is needed for this sub-command ({e})") from None
    print(hellaswag.download(Path(args.out_dir) / (args.name or "hellaswag")))


def cmd_alpaca(args):
    """Alpaca (tatsu-lab/alpaca through `datasets`, or --data_file), filtered as finetune.py would, as
    one jsonl file that `finetune.py --data_file` reads; the loading rules live in finetune.py."""
    try:
        import finetune
    except ImportError as e:
        raise SystemExit(f"error: finetune.py is needed for this sub-command ({e})") from None
    examples = finetune.load_alpaca(args.data_file, args.max_response_chars, args.n_samples)
    out = Path(args.out_dir) / (args.name or "alpaca") / "alpaca.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({k: ex.get(k, "") for k in ("instruction", "input", "output")},
                                      ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
    os.replace(tmp, out)
    print(f"{len(examples)} examples -> {out}")


def cmd_hh(args):
    """HH-RLHF conversations (the `chosen` side) as jsonl for `finetune.py --task dialogue`; the
    parsing rules live in finetune.py (every record is checked here)."""
    try:
        import finetune
    except ImportError as e:
        raise SystemExit(f"error: finetune.py is needed for this sub-command ({e})") from None
    examples = finetune.load_dialogues(args.data_file, args.n_samples, split=args.split)
    out = Path(args.out_dir) / (args.name or "hh") / f"{args.split}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"chosen": e["text"]}, ensure_ascii=False) + "\n" for e in examples),
                   encoding="utf-8")
    os.replace(tmp, out)
    print(f"{len(examples)} conversations -> {out}")


def cmd_hh_pairs(args):
    """HH-RLHF preference pairs (Anthropic/hh-rlhf through `datasets`, or a local jsonl with its
    chosen/rejected conversations) as jsonl of {prompt, chosen, rejected} for `dpo.py --data_file`;
    the splitting rules live in dpo.py."""
    try:
        import dpo
    except ImportError as e:
        raise SystemExit(f"error: dpo.py is needed for this sub-command ({e})") from None
    pairs = dpo.load_pairs(args.data_file, split=args.split)
    pairs = pairs[: args.n_samples] if args.n_samples else pairs
    out = Path(args.out_dir) / (args.name or "hh_pairs") / f"{args.split}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    os.replace(tmp, out)
    print(f"{len(pairs)} pairs -> {out}")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def common(p, name, tokenizer=True):
        p.add_argument("--out_dir", default="data", help="parent folder; shards go to OUT_DIR/NAME/")
        p.add_argument("--name", default=name, help="dataset name: the folder and the shards' file prefix")
        if tokenizer:
            p.add_argument("--tokenizer", default="gpt2",
                           help="'gpt2' (tiktoken) or a directory written by bpe.py")
            p.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                           help="tokenizer processes (0 = tokenize in this process)")

    p = sub.add_parser("builtin", help="no-network corpus: stdlib docstrings + pydoc topics, own BPE",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "builtin")
    for action in p._actions:  # builtin trains its own tokenizer unless told otherwise
        if action.dest == "tokenizer":
            action.default, action.help = None, "default: train a BPE of --vocab_size on the corpus; or a bpe.py dir"
    p.set_defaults(num_workers=0)
    p.add_argument("--vocab_size", type=int, default=4096, help="size of the BPE trained on the corpus")
    p.add_argument("--packages", nargs="*", default=[], help="installed packages whose docstrings to add")
    p.set_defaults(fn=cmd_builtin)

    p = sub.add_parser("text", help="local text files or globs (one file = one document)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "text")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote globs)")
    p.add_argument("--shard_tokens", type=int, default=10 ** 8, help="tokens per training shard")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of the tokens (from the start of the corpus) held out as validation")
    p.add_argument("--val_tokens", type=int, default=0, help="exact validation size (overrides val_fraction)")
    p.set_defaults(fn=cmd_text)

    p = sub.add_parser("shakespeare", help="tiny Shakespeare (downloaded with requests)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "shakespeare")
    p.add_argument("--url", default=SHAKESPEARE_URL, help="where to download it from")
    p.add_argument("--input", default=None, help="use this local copy instead of downloading")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens held out (the start)")
    p.set_defaults(fn=cmd_shakespeare)

    p = sub.add_parser("fineweb", help="FineWeb-Edu through `datasets` (streaming)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "fineweb_edu")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset id")
    p.add_argument("--remote_name", default="sample-10BT", help="dataset configuration (sample-10BT, sample-100BT, ...)")
    p.add_argument("--shard_tokens", type=int, default=10 ** 8, help="tokens per shard")
    p.add_argument("--val_tokens", type=int, default=0, help="validation shard size (0 = shard_tokens)")
    p.set_defaults(fn=cmd_fineweb)

    p = sub.add_parser("hellaswag", help="HellaSwag validation set (hellaswag.py downloads it)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "hellaswag", tokenizer=False)
    p.set_defaults(fn=cmd_hellaswag)

    p = sub.add_parser("alpaca", help="Alpaca instructions as jsonl for finetune.py (rules in finetune.py)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(p, "alpaca", tokenizer=False)
    p.add_argument("--data_file", default=None, help="local .json/.jsonl instead of tatsu-lab/alpaca from the hub")
    p.add_argument("--max_response_chars", type=int, default=0, help="drop examples with longer outputs (0 = keep all)")
    p.add_argument("--n_samples", type=int, default=0, help="then keep the first N (0 = all)")
    p.set_defaults(fn=cmd_alpaca)

    for name, what, fn in (("hh", "HH-RLHF conversations as jsonl for finetune.py --task dialogue", cmd_hh),
                           ("hh_pairs", "HH-RLHF preference pairs as {prompt, chosen, rejected} jsonl for dpo.py",
                            cmd_hh_pairs)):
        p = sub.add_parser(name, help=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        common(p, name, tokenizer=False)
        p.add_argument("--data_file", default=None, help="local HH-RLHF-style jsonl instead of Anthropic/hh-rlhf")
        p.add_argument("--split", default="train", help="train|test (hub) and the output file's name")
        p.add_argument("--n_samples", type=int, default=0, help="keep the first N (0 = all)")
        p.set_defaults(fn=fn)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
