"""
bpe.py: a byte-level BPE (byte pair encoding) tokenizer, as used by GPT-2 and its successors.

Read it top to bottom:
  1. pre-splitting: a regex cuts text into chunks (words, numbers, punctuation, spaces); no token crosses a chunk.
  2. training: from the 256 byte values, repeatedly merge the most frequent adjacent pair of tokens into a new
     token, until the vocabulary has the requested size.
  3. encoding: inside each chunk, repeatedly join the adjacent pair that makes the earliest learned token
     (lowest rank); decoding concatenates the bytes of the tokens.
  4. the Tokenizer: GPT-2 compatibility, a fast path through tiktoken, save/load, HF export;
  5. load_tokenizer: one interface for ours, GPT-2's and Hugging Face's; 6. a small CLI.

Training is the textbook algorithm, made fast without hiding it: each distinct chunk is counted once, pair
counts are updated only in the chunks a merge touches, and a heap finds the next pair.

Usage:
  python bpe.py train   --input book.txt --vocab_size 4096 --out tok/
  python bpe.py encode  --tokenizer tok/ --text "Hello world"
  python bpe.py decode  --tokenizer gpt2 --ids "15496 995"
  python bpe.py show    --tokenizer gpt2 --text "SolidGoldMagikarp 12345"
Every sub-command documents its flags in `python bpe.py SUBCOMMAND --help`. Token counts against
GPT-2's and the speed benchmarks: bench_speed.py.

From Python:
  from bpe import Tokenizer, load_tokenizer
  tok = Tokenizer.train(text, vocab_size=1024)          # or a list of file paths
  ids = tok.encode("hello world"); tok.decode(ids)
  tok.save("tok/"); tok = Tokenizer.load("tok/")
  enc = tok.to_tiktoken()                                # same ids, tiktoken's speed
  files = tok.hf_files()                                 # tokenizer.json for transformers.AutoTokenizer
  t = load_tokenizer("tok/")                             # ours, GPT-2's or a HF one, behind one interface

Dependencies: the standard library, `regex` (for \\p{L}-style classes in the split patterns), `tiktoken` (the
fast path) and `tokenizers` (only for the Hugging Face export).
"""

import argparse
import base64
import codecs
import heapq
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex

from housekeeping import atomic_write

# -----------------------------------------------------------------------------------------------
# 1. Pre-splitting patterns (copied from tiktoken, so that both split text identically), and how tokens are printed

# GPT-2: contractions, optional space + letters, optional space + digits, optional space +
# punctuation, then whitespace. The original release wrote this as
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ; this is equivalent.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (cl100k_base): case-insensitive contractions, digits in groups of up to 3, newlines apart from the next word.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# No pre-split: the whole text (between special tokens) is one chunk, as in minbpe's BasicTokenizer (slow on big texts).
NO_SPLIT_PATTERN = r"""[\s\S]+"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, None: NO_SPLIT_PATTERN}

GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}
GPT2_RANKS_URL = "https://raw.githubusercontent.com/openai/whisper/main/whisper/assets/gpt2.tiktoken"  # fetched once


def resolve_pattern(pattern):
    """'gpt2', 'gpt4', None (no split) or a regex string -> the regex string."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str) or regex.fullmatch(r"\w+", pattern):  # a typo, like 'gpt5'
        raise ValueError(f"pattern must be 'gpt2', 'gpt4', None or a regex string, got {pattern!r}")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
    return pattern


def special_regex(specials):
    """A regex matching any of the given special-token strings (longest first, so that a special
    token that is a prefix of another one never wins)."""
    return regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))))


def render(token):
    """A printable, unambiguous form of a token's bytes, in double quotes: UTF-8 text as is,
    bytes that are not valid UTF-8 as \\xNN, backslash, quote and invisible characters escaped."""
    out = []
    for ch in token.decode("utf-8", errors="surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, smuggled by surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch in '\\"':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


# -----------------------------------------------------------------------------------------------
# 2. The core of encoding: merge the bytes of one chunk by rank

def bpe_merge(piece, ranks, max_rank=None):
    """Split `piece` (bytes) into tokens: from single bytes, keep joining the adjacent pair whose concatenation
    is the lowest-ranked (earliest learned) token, leftmost on ties, until no pair forms a token. Ranks >=
    `max_rank` are ignored (to find which two tokens a token was built from). Exactly tiktoken's algorithm, so
    both encoders agree on every input. Near-linear: pairs wait in a heap by (rank, position), parts form a
    linked list, stale entries are skipped (lazy deletion)."""
    n, limit = len(piece), float("inf") if max_rank is None else max_rank
    parts, nxt, prev = [piece[i:i + 1] for i in range(n)], list(range(1, n + 1)), list(range(-1, n))

    def rank(i):  # rank of the token that joining part i and the next would make (limit: none)
        return min(ranks.get(parts[i] + parts[nxt[i]], limit), limit) if 0 <= i and nxt[i] < n else limit

    heap = [(r, i) for i in range(n - 1) if (r := rank(i)) < limit]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        if parts[i] is None or rank(i) != r:  # stale: part i or its neighbour changed since
            continue
        j = nxt[i]
        parts[i], parts[j], nxt[i] = parts[i] + parts[j], None, nxt[j]
        prev[nxt[i]] = i
        for k in (prev[i], i):  # only the pairs around the new token changed
            if (rk := rank(k)) < limit:
                heapq.heappush(heap, (rk, k))
    return [p for p in parts if p is not None]


# -----------------------------------------------------------------------------------------------
# 3. Training. First count the distinct chunks of the training text (streaming files), then learn
#    merges on (chunk, count) pairs.

BLOCK_SIZE = 1 << 20  # characters read at a time when streaming a training file

# Places where GPT-2's and GPT-4's patterns always cut, whatever follows: after a newline that
# sits between two non-space characters, and before a space that sits between two ASCII letters.
# Cutting a long file there gives exactly the chunks of the whole file. (?r) searches backwards.
_SAFE_CUT = regex.compile(r"(?r)(?<=\S\n)(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


def _safe_cut(text, specials):
    """The last position of `text` where it can be cut without changing its chunks, or 0."""
    end = len(text)
    while True:
        m = _SAFE_CUT.search(text, 0, end)
        if m is None:
            return 0
        p = m.start()
        # a special token must not be cut in two either
        if not any(s in text[max(0, p - len(s) + 1):p + len(s) - 1] for s in specials):
            return p
        end = p - 1


def _read_blocks(path, pattern, specials):
    """Yield the text of a UTF-8 file in blocks of about BLOCK_SIZE characters, cut only at safe
    places (for GPT-2's and GPT-4's patterns; files with other patterns are read whole)."""
    path = Path(path)
    can_cut = pattern in (GPT2_PATTERN, GPT4_PATTERN)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, nbytes, nlines = "", 0, 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such training file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected a text file") from None
    with f:
        while True:
            raw = f.read(BLOCK_SIZE)
            held = decoder.getstate()[0]  # bytes of a character split by the previous read
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                data = held + raw
                line = nlines + data[:e.start].count(b"\n") + 1
                offset = nbytes - len(held) + e.start
                raise ValueError(f"{path}, line {line} (byte {offset}): not valid UTF-8 "
                                 f"({e.reason}); expected a UTF-8 text file") from None
            nbytes += len(raw)
            nlines += raw.count(b"\n")
            if not raw:
                break
            if can_cut and len(pending) >= BLOCK_SIZE:
                cut = _safe_cut(pending, specials)
                if cut > 0:
                    yield pending[:cut]
                    pending = pending[cut:]
    if pending:
        yield pending


def _as_sources(text_or_paths):
    """A str is training text; a path, or a list/tuple of paths (str or Path), are files."""
    if isinstance(text_or_paths, str):
        if len(text_or_paths) < 256 and "\n" not in text_or_paths and Path(text_or_paths).is_file():
            print(f"warning: training on the text {text_or_paths!r}, which is also a file name; "
                  f"to train on the file, pass [{text_or_paths!r}] or a Path", file=sys.stderr)
        return [text_or_paths], []
    if isinstance(text_or_paths, os.PathLike):
        return [], [Path(text_or_paths)]
    if isinstance(text_or_paths, (list, tuple)):
        if not text_or_paths:
            raise ValueError("no training files given")
        for p in text_or_paths:
            if not isinstance(p, (str, os.PathLike)):
                raise ValueError(f"expected file paths in the list, got {type(p).__name__}")
        return [], [Path(p) for p in text_or_paths]
    raise ValueError(f"expected a str (the text) or file path(s), got {type(text_or_paths).__name__}")


def count_chunks(text_or_paths, pattern="gpt4", special_tokens=(), verbose=False):
    """Counter {chunk: occurrences} of the pre-split chunks of a text or of files. Special tokens
    are cut out first: they mark boundaries and are never learned as merges."""
    pattern = resolve_pattern(pattern)
    splitter = regex.compile(pattern)
    specials = list(special_tokens)
    cutter = special_regex(specials) if specials else None
    texts, paths = _as_sources(text_or_paths)
    for p in paths:  # fail before a long run, not in the middle of it
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such training file")
    blocks = (b for src in texts + paths
              for b in ([src] if isinstance(src, str) else _read_blocks(src, pattern, specials)))
    counts, n_chars, start, last_report = Counter(), 0, time.time(), time.time()
    for block in blocks:
        for piece in (cutter.split(block) if cutter else [block]):
            counts.update(splitter.findall(piece))
        n_chars += len(block)
        if verbose and time.time() - last_report > 2:
            last_report = time.time()
            print(f"  read {n_chars / 1e6:,.0f}M characters, {len(counts):,} distinct chunks "
                  f"[{time.time() - start:.1f}s]", file=sys.stderr)
    return counts


def _merge_pair(word, a, b, new_id):
    """Replace every non-overlapping occurrence of the pair (a, b) in `word`, left to right."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(chunk_counts, n_tokens, verbose=False):
    """Byte-level BPE on {chunk: count}. Returns (vocab, merges): vocab[id] is the token's bytes (ids 0-255 are the
    bytes themselves), merges is [(left_id, right_id, new_id), ...] in order.

    Each step merges the most frequent adjacent pair; ties go to the smallest pair of ids (left id first), so training
    is deterministic. Training stops at `n_tokens` tokens or when no pair is left (every chunk is a single token).
    """
    vocab = [bytes([b]) for b in range(256)]
    token_ids = set(vocab)
    # Every distinct chunk is a "word": its token ids, and how often it occurs. Work is done per
    # distinct chunk, never per occurrence.
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts = defaultdict(int)  # (a, b) -> occurrences in the whole corpus
    where = defaultdict(set)        # (a, b) -> indices of the words that contain it (maybe stale)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)

    # Max-heap by count (heapq is a min-heap, so counts are negated); equal counts pop the
    # smallest pair first. Entries are not removed when a count drops: a popped entry whose
    # count is out of date is pushed back with the current count ("lazy deletion").
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    merges, start, last_report = [], time.time(), time.time()
    n_goal = n_tokens - len(vocab)
    while len(vocab) < n_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        new_id, token = len(vocab), vocab[a] + vocab[b]
        # A merge never spells an existing token: the bytes of a token's span evolve the same way
        # wherever they occur, so any copy of these bytes was already merged into that token.
        assert token not in token_ids, f"merge {render(token)} repeats a token"
        vocab.append(token)
        token_ids.add(token)
        merges.append((a, b, new_id))

        # Rewrite only the words that contain the pair, and collect how pair counts change:
        # the old word's pairs go away, the new word's pairs come in.
        delta = defaultdict(int)
        for i in where.pop(pair):
            old = words[i]
            new = _merge_pair(old, a, b, new_id)
            if len(new) == len(old):  # stale index: an earlier merge removed the pair here
                continue
            words[i] = new
            f = freqs[i]
            for p in zip(old, old[1:]):
                delta[p] -= f
            for p in zip(new, new[1:]):
                delta[p] += f
                where[p].add(i)
        for p, d in delta.items():
            if d == 0:
                continue
            n = pair_counts[p] + d
            if n > 0:
                pair_counts[p] = n
            else:
                del pair_counts[p]
            if d > 0:  # counts that grew need a fresh heap entry; shrunk ones are fixed lazily
                heapq.heappush(heap, (-n, p))

        if verbose and (time.time() - last_report > 2 or len(vocab) == n_tokens):
            last_report = time.time()
            done = len(vocab) - 256
            print(f"  merge {done}/{n_goal}: {render(vocab[a])} + {render(vocab[b])} -> "
                  f"{render(token)} (count {count:,}) [{time.time() - start:.1f}s]", file=sys.stderr)
    if len(vocab) < n_tokens:
        print(f"warning: the training text ran out of pairs to merge; the vocabulary has "
              f"{len(vocab)} ordinary tokens instead of {n_tokens}", file=sys.stderr)
    return vocab, merges


# -----------------------------------------------------------------------------------------------
# 4. The tokenizer

class Tokenizer:
    """A byte-level BPE tokenizer: `ranks` maps each ordinary token (bytes) to its id, which is also
    its merge priority; `special_tokens` maps strings such as "<|endoftext|>" to ids."""

    def __init__(self, ranks, pattern="gpt4", special_tokens=None, merges=None, name="bpe"):
        self.pattern = resolve_pattern(pattern)
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._merges = merges  # [(left, right, new_id)]; rebuilt from the ranks when needed
        n = len(self.ranks)
        if sorted(self.ranks.values()) != list(range(n)):
            raise ValueError("token ids (ranks) must be 0, 1, ..., n-1 without gaps or repeats")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"not a byte-level vocabulary: {len(missing)} single bytes are missing "
                             f"(first: {missing[0]})")
        for s, i in self.special_tokens.items():
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r}: expected a non-empty string")
            if not isinstance(i, int) or i < n:
                raise ValueError(f"special token {s!r} has id {i!r}; expected an int >= {n} "
                                 f"(ids below are ordinary tokens)")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ValueError("two special tokens have the same id")
        self.vocab = {i: t for t, i in self.ranks.items()}  # id -> bytes, for decoding
        self.vocab.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._split = regex.compile(self.pattern)
        self._cache = {}       # chunk -> ids, as in GPT-2's original encoder.py
        self._tiktoken = None  # built on first use by to_tiktoken()

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.pattern_name!r}, "
                f"special_tokens={self.special_tokens})")

    @property
    def vocab_size(self):
        return len(self.ranks) + len(self.special_tokens)

    @property
    def pattern_name(self):
        names = {v: k for k, v in PATTERNS.items()}
        return names.get(self.pattern, self.pattern)

    # ---- training

    @classmethod
    def train(cls, text_or_paths, vocab_size, pattern="gpt4", special_tokens=None, verbose=False):
        """Learn a tokenizer from a text (str) or from files (a path or a list of paths; streamed).
        `vocab_size` counts the 256 bytes, the merges and the special tokens; special tokens are a
        list of strings (or a dict, whose ids are ignored) and get the ids after the merges."""
        specials = list(special_tokens or [])
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens are repeated: {specials}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be at least 256 (the "
                             f"byte values) + {len(specials)} (the special tokens)")
        pattern = resolve_pattern(pattern)
        t0 = time.time()
        chunk_counts = count_chunks(text_or_paths, pattern, specials, verbose)
        if verbose:
            print(f"counted {sum(chunk_counts.values()):,} chunks ({len(chunk_counts):,} distinct) "
                  f"in {time.time() - t0:.1f}s; learning merges", file=sys.stderr)
        vocab, merges = learn_merges(chunk_counts, vocab_size - len(specials), verbose)
        ranks = {t: i for i, t in enumerate(vocab)}
        special_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
        return cls(ranks, pattern, special_ids, merges)

    @property
    def merges(self):
        """[(left_id, right_id, new_id)]: how each token above the bytes is built. Kept from
        training; for loaded vocabularies, recovered by running BPE on each token with only the
        tokens of lower rank, which must leave exactly two parts."""
        if self._merges is None:
            merges = []
            for t, r in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                if len(t) == 1:
                    continue
                parts = bpe_merge(t, self.ranks, max_rank=r)
                if len(parts) != 2:
                    raise ValueError(f"token {r} {render(t)} is not the merge of two tokens of lower "
                                     f"rank: this is not a BPE vocabulary")
                merges.append((self.ranks[parts[0]], self.ranks[parts[1]], r))
            self._merges = merges
        return self._merges

    # ---- encoding and decoding (the readable pure-Python path)

    def encode_ordinary(self, text):
        """Encode text, treating special-token strings as ordinary text."""
        ids = []
        for chunk in self._split.findall(text):
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                piece = chunk.encode("utf-8")
                if piece in self.ranks:  # the whole chunk is a token (tiktoken's shortcut too)
                    chunk_ids = [self.ranks[piece]]
                else:
                    chunk_ids = [self.ranks[p] for p in bpe_merge(piece, self.ranks)]
                if len(self._cache) > 200_000:
                    self._cache.clear()
                self._cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Encode text to ids, special tokens as tiktoken does: `allowed_special` ("all" or a set) become their
        id; finding one of `disallowed_special` ("all" = every one not allowed, or a set) is an error (user text
        must not smuggle in control tokens); others are ordinary text. Lone surrogates become U+FFFD."""
        all_specials = set(self.special_tokens)
        allowed = all_specials if allowed_special == "all" else set(allowed_special)
        unknown = allowed - all_specials
        if unknown:
            raise ValueError(f"allowed_special has strings that are not special tokens of this "
                             f"tokenizer: {sorted(unknown)}")
        disallowed = all_specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            m = special_regex(disallowed).search(text)
            if m:
                raise ValueError(
                    f"the text contains the special token {m.group()!r} at character {m.start()}, "
                    f"which is disallowed. To encode it as the special token, pass "
                    f"allowed_special={{{m.group()!r}}} (or 'all'); to encode it as ordinary text, "
                    f"pass disallowed_special=().")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for m in special_regex(allowed).finditer(text):
            ids.extend(self.encode_ordinary(text[start:m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    def decode_bytes(self, ids):
        """The bytes that the ids stand for (a list of ints, or a numpy array / torch tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            return b"".join(self.vocab[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            raise ValueError(f"token id {bad!r} is not in this tokenizer's vocabulary "
                             f"({self.vocab_size} tokens)") from None

    def decode(self, ids):
        """Decode ids to text. Any sequence of valid ids decodes: a cut through a multi-byte
        character (invalid UTF-8) becomes U+FFFD, the replacement character, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- the fast path

    def to_tiktoken(self):
        """This tokenizer as a `tiktoken.Encoding` (same pattern, ranks and special tokens, hence
        the same ids as `encode`), for fast bulk encoding in Rust. Built once, then cached."""
        if self._tiktoken is None:
            import tiktoken
            self._tiktoken = tiktoken.Encoding(name=self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                               special_tokens=self.special_tokens)
        return self._tiktoken

    def encode_batch(self, texts, num_threads=8, allowed_special=frozenset(), disallowed_special="all"):
        """Encode many texts with tiktoken, in parallel threads."""
        return self.to_tiktoken().encode_batch(list(texts), num_threads=num_threads, allowed_special=allowed_special,
                                               disallowed_special=disallowed_special)

    # ---- Hugging Face's format

    def hf_files(self, model_max_length=None) -> dict:
        """{"tokenizer.json": ..., "tokenizer_config.json": ...}: this tokenizer in Hugging Face's
        format, so that transformers.AutoTokenizer gives the same ids as encode_ordinary. A
        special-token string written in text stays ordinary text there too (split_special_tokens)."""
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        b2c = gpt2_byte_to_char()  # GPT-2's printable spelling of bytes, as in its vocab.json
        spell = lambda t: "".join(b2c[b] for b in t)  # noqa: E731
        # merge k makes token 256 + k, so merge order is rank order (tiktoken's priority); ignore_merges:
        # a chunk that is itself a token is that token, without merging (tiktoken's shortcut too)
        merges = [(spell(self.vocab[a]), spell(self.vocab[b])) for a, b, _ in sorted(self.merges, key=lambda m: m[2])]
        hf = HFTokenizer(models.BPE({spell(t): i for t, i in self.ranks.items()}, merges, ignore_merges=True))
        # HF's regex engine (Oniguruma) reads X{1,3}+ as (X{1,3})+, not as a possessive interval, so
        # GPT-4's \p{N}{1,3}+ would keep "12345678" whole: an atomic group means the same
        pattern = regex.sub(r"(\\p\{\w+\}|\\.|\[[^\]]*\]|[^\\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", self.pattern)
        # no normalizer; split with our regex, then spell each chunk's bytes (use_regex=False: no 2nd split)
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()  # alphabet -> bytes -> UTF-8, bad bytes as U+FFFD, like decode()
        for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            hf.add_special_tokens([AddedToken(s, special=True, normalized=False)])  # takes the next id
            if hf.token_to_id(s) != i:
                raise ValueError(f"special token {s!r} has id {i}; Hugging Face needs ids right after the ranks")
        eos = "<|endoftext|>" if "<|endoftext|>" in self.special_tokens else None
        # <|endoftext|> separates documents: the EOS, and (as in GPT-2) BOS; nothing is added around ids
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": eos,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "split_special_tokens": True, **({"model_max_length": model_max_length} if model_max_length else {})}
        return {"tokenizer.json": hf.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

    # ---- saving and loading

    def save(self, path):
        """Save to `path`. A directory (an existing one, or a new name without a suffix, created) gets both formats
        (tokenizer.bpe and tokenizer.tiktoken); a name ending in .tiktoken gets tiktoken's rank format (ranks only: no
        pattern, no special tokens); any other name gets the readable format. Files are written atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            self.save(path / "tokenizer.bpe")
            self.save(path / "tokenizer.tiktoken")
        elif path.suffix == ".tiktoken":
            lines = [f"{base64.b64encode(t).decode('ascii')} {i}"
                     for t, i in sorted(self.ranks.items(), key=lambda kv: kv[1])]
            _write_atomically(path, "\n".join(lines) + "\n")
        else:
            _write_atomically(path, self._readable())

    def _readable(self):
        lines = [FORMAT_HEADER, f"pattern {json.dumps(self.pattern)}",
                 "# one token per line: id, then 'byte VALUE', 'merge LEFT RIGHT' or 'special', then",
                 "# the token in quotes (\\xNN = a byte that is not UTF-8 on its own). load() rebuilds",
                 "# every token from the first columns and checks it against the quoted text."]
        recipe = {new_id: (left, right) for left, right, new_id in self.merges}
        for i in range(len(self.ranks)):
            t = self.vocab[i]
            how = f"byte {t[0]}" if len(t) == 1 else "merge {} {}".format(*recipe[i])
            lines.append(f"{i} {how} {render(t)}")
        for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            lines.append(f"{i} special {json.dumps(s)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path, trust_pattern=False):
        """Load the readable format of save() (a file, or a directory with tokenizer.bpe), checking every line.
        The pattern must be built in (gpt2, gpt4, none) unless trust_pattern: a regex can take exponential time."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.bpe"
        if path.suffix == ".tiktoken":
            raise ValueError(f"{path}: a tiktoken rank file has no pattern or special tokens; "
                             f"use Tokenizer.from_tiktoken_file(path, pattern, special_tokens)")
        lines = _read_text(path).split("\n")

        def fail(lineno, msg):
            raise ValueError(f"{path}, line {lineno}: {msg}")

        if lines[0] != FORMAT_HEADER:
            fail(1, f"expected the header {FORMAT_HEADER!r}; is this a tokenizer saved by bpe.py?")
        if len(lines) < 2 or not lines[1].startswith("pattern "):
            fail(2, "expected 'pattern \"<regex as a JSON string>\"'")
        try:
            pattern = resolve_pattern(json.loads(lines[1][len("pattern "):]))
        except (ValueError, json.JSONDecodeError) as e:
            fail(2, f"bad pattern: {e}")
        if pattern not in PATTERNS.values() and not trust_pattern:
            fail(2, "the split pattern is not a built-in one (gpt2, gpt4, none); if you wrote it, load with "
                    "trust_pattern=True (bpe.py: --trust_pattern)")
        vocab, merges, specials = [], [], {}
        for lineno, line in enumerate(lines[2:], start=3):
            if not line or line.startswith("#"):
                continue
            fields = line.split(" ", 2)
            if len(fields) < 3 or not fields[0].isdigit():
                fail(lineno, f"expected '<id> byte|merge|special ...', got {line!r}")
            i, kind, rest = int(fields[0]), fields[1], fields[2]
            if kind == "special":
                try:
                    s = json.loads(rest)
                except json.JSONDecodeError:
                    s = None
                if not isinstance(s, str):
                    fail(lineno, f"expected '<id> special \"<token as a JSON string>\"', got {line!r}")
                specials[s] = i
                continue
            if specials:
                fail(lineno, "ordinary tokens must come before the special tokens")
            if i != len(vocab):
                fail(lineno, f"expected token id {len(vocab)} (ids count up from 0), got {i}")
            if kind == "byte":
                value, _, shown = rest.partition(" ")
                if not value.isdigit() or int(value) > 255:
                    fail(lineno, f"expected '{i} byte <0..255> \"<token>\"', got {line!r}")
                token = bytes([int(value)])
            elif kind == "merge":
                parts = rest.split(" ", 2)
                if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                    fail(lineno, f"expected '{i} merge <left id> <right id> \"<token>\"', got {line!r}")
                left, right, shown = int(parts[0]), int(parts[1]), parts[2]
                if left >= i or right >= i:
                    fail(lineno, f"merge {left} {right}: a token can only be built from earlier ids")
                token = vocab[left] + vocab[right]
                merges.append((left, right, i))
            else:
                fail(lineno, f"expected 'byte', 'merge' or 'special' after the id, got {kind!r}")
            if shown != render(token):
                fail(lineno, f"the token text {shown} does not match what the line builds, "
                             f"{render(token)}: the file is corrupted")
            vocab.append(token)
        ranks = {t: i for i, t in enumerate(vocab)}
        if len(ranks) != len(vocab):
            raise ValueError(f"{path}: the same token appears on two lines")
        try:
            return cls(ranks, pattern, specials, merges, name=path.stem)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_tiktoken_file(cls, path, pattern="gpt2", special_tokens=GPT2_SPECIAL_TOKENS, name=None):
        """Load a tiktoken rank file: one 'base64(token bytes) rank' per line. The defaults give
        GPT-2 (whose rank file does not hold the pattern or <|endoftext|>)."""
        path = Path(path)
        ranks = {}
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line:
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: expected '<base64 token> <rank>', "
                                 f"got {line[:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}, line {lineno}: token {render(token)} appears twice")
            ranks[token] = rank
        try:
            return cls(ranks, pattern, special_tokens, name=name or path.stem)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, special_tokens=GPT2_SPECIAL_TOKENS):
        """Load GPT-2's original release files: encoder.json (token -> id) and vocab.bpe (the
        merges, in order). Both spell bytes as printable characters (see gpt2_byte_to_char)."""
        char_to_byte = {c: b for b, c in gpt2_byte_to_char().items()}
        try:
            encoder = json.loads(_read_text(encoder_json))
        except json.JSONDecodeError as e:
            raise ValueError(f"{encoder_json}: not valid JSON ({e})") from None
        if not isinstance(encoder, dict):
            raise ValueError(f"{encoder_json}: expected a JSON object {{token: id}}")
        ranks = {}
        for s, i in encoder.items():
            if s in special_tokens:
                if i != special_tokens[s]:
                    raise ValueError(f"{encoder_json}: {s!r} has id {i}, expected {special_tokens[s]}")
                continue
            try:
                ranks[bytes(char_to_byte[c] for c in s)] = i
            except KeyError:
                raise ValueError(f"{encoder_json}: token {s!r} has a character outside GPT-2's byte "
                                 f"alphabet (a special token? pass it in special_tokens)") from None
        lines = _read_text(vocab_bpe).split("\n")
        if not lines[0].startswith("#version"):
            raise ValueError(f"{vocab_bpe}, line 1: expected '#version: ...'")
        merges = []
        for lineno, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{vocab_bpe}, line {lineno}: expected two tokens separated by one "
                                 f"space, got {line!r}")
            try:
                left, right = (bytes(char_to_byte[c] for c in p) for p in parts)
            except KeyError:
                raise ValueError(f"{vocab_bpe}, line {lineno}: character outside GPT-2's byte "
                                 f"alphabet in {line!r}") from None
            expected = 256 + len(merges)
            got = ranks.get(left + right)
            if got != expected or left not in ranks or right not in ranks:
                raise ValueError(f"{vocab_bpe}, line {lineno}: merge {line!r} should make token id "
                                 f"{expected}, but encoder.json has {got} for it")
            merges.append((ranks[left], ranks[right], expected))
        if len(merges) + 256 != len(ranks):
            raise ValueError(f"{vocab_bpe}: {len(merges)} merges, but encoder.json has "
                             f"{len(ranks) - 256} tokens above the bytes")
        return cls(ranks, "gpt2", special_tokens, merges, name="gpt2")


FORMAT_HEADER = "bpe.py tokenizer v1"


def gpt2_byte_to_char():
    """GPT-2's files spell each byte as a printable character: printable bytes as themselves,
    the others (controls, space, ...) as the characters from U+0100 on, in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return mapping


def _read_text(path):
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 ({e.reason})") from None


def _write_atomically(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def load_bpe(spec, pattern="gpt2", trust_pattern=False):
    """A Tokenizer from 'gpt2' (the rank file $GPT2_TIKTOKEN, else data/gpt2.tiktoken here, else tiktoken's
    download), a directory or .bpe file saved by bpe.py, GPT-2's encoder.json directory, or a .tiktoken file."""
    if spec == "gpt2":
        local = Path(os.environ.get("GPT2_TIKTOKEN") or Path(__file__).resolve().parent / "data" / "gpt2.tiktoken")
        if local.is_file():
            return Tokenizer.from_tiktoken_file(local)
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception:
            raise ValueError(f"GPT-2's tokenizer is not on this machine ({local}) and tiktoken could not download "
                             f"it; fetch it once: curl -L --create-dirs -o {local} {GPT2_RANKS_URL}") from None
        return Tokenizer(enc._mergeable_ranks, "gpt2", enc._special_tokens, name="gpt2")
    path = Path(spec)
    if path.is_dir() and (path / "encoder.json").is_file():
        return Tokenizer.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken_file(path, pattern=pattern)
    return Tokenizer.load(path, trust_pattern)

# -----------------------------------------------------------------------------------------------
# 5. One interface for every tokenizer the scripts meet: ours, GPT-2's, or a Hugging Face one

TOKENIZER_FILES = ("tokenizer.bpe", "tokenizer.json", "tokenizer.model", "vocab.json", "encoder.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json")


def tokenizer_dir(model_dir) -> str | None:
    """Where a model directory keeps its tokenizer: the directory itself or its tokenizer/ folder."""
    d = Path(model_dir)
    return next((str(c) for c in (d / "tokenizer", d) if any((c / f).exists() for f in TOKENIZER_FILES)), None)


def _is_hf_dir(p: Path) -> bool:  # a Hugging Face tokenizer directory, not one of ours or GPT-2's originals
    return p.is_dir() and not (p / "tokenizer.bpe").exists() and not (p / "encoder.json").exists()


def tokenizer_files(spec) -> tuple[dict, int | None, int | None]:
    """({file name: contents}, EOS id, BOS id): the files that put a tokenizer beside a saved model.
    Our BPE (a Tokenizer, or what load_bpe reads) gets its own tokenizer.bpe and Hugging Face's
    tokenizer.json + tokenizer_config.json; a Hugging Face tokenizer directory is copied."""
    if not isinstance(spec, Tokenizer):
        d = Path(spec)
        if _is_hf_dir(d):
            t = load_tokenizer(str(d))
            return {f: (d / f).read_bytes() for f in HF_TOKENIZER_FILES if (d / f).is_file()}, t.eot_id, t.bos_id
        spec = load_bpe(str(spec))
    return {"tokenizer.bpe": spec._readable(), **spec.hf_files()}, spec.special_tokens.get("<|endoftext|>"), None


class TextTokenizer:
    """What the scripts need from any tokenizer (made by load_tokenizer): encode (ordinary text: a written
    "<|endoftext|>" stays characters; only the code inserts the control token), encode_batch, decode, eot_id,
    bos_id (what LLaMA-style tokenizers put first, None for GPT-2's; encode never adds it) and n_vocab."""

    def __init__(self, name, encode, decode, eot_id, n_vocab, encode_batch=None, bos_id=None, source=None):
        self.name, self._encode, self._decode, self.eot_id, self.n_vocab = name, encode, decode, eot_id, n_vocab
        self._encode_batch, self.bos_id, self.source = encode_batch, bos_id, source

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts) -> list[list[int]]:
        if self._encode_batch is not None:
            return self._encode_batch(list(texts))
        return [self._encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def load_tokenizer(spec=None, model_dir=None) -> TextTokenizer:
    """spec: "gpt2" (tiktoken's), a *.tiktoken rank file (GPT-2's pattern), a directory saved by bpe.py or one
    with a Hugging Face tokenizer. None: model_dir's own tokenizer (itself or its tokenizer/), else GPT-2's.
    `source` is our Tokenizer (or the HF tokenizer's directory), for export."""
    if spec is None and model_dir is not None and Path(model_dir).is_dir():
        spec = tokenizer_dir(model_dir)
    spec = str(spec or "gpt2")
    p = Path(spec)
    if _is_hf_dir(p):
        # its split regexes run in a backtracking engine: one that backtracks exponentially hangs on some
        # text, then panics. Each is tried first where that shows: on long runs of one kind of character
        f = p / "tokenizer.json"
        for pattern in map(json.loads, regex.findall(r'"Regex"\s*:\s*("(?:[^"\\]|\\.)*")',
                                                     _read_text(f) if f.is_file() else "")):
            try:
                for c in ("a", " ", "1", "\n", "!", "é", "😀", "a "):
                    regex.compile(pattern).findall(c * 3000 + "\x00", timeout=0.5)
            except regex.error as e:
                raise ValueError(f"{f}: the regex {pattern[:80]!r} is not valid ({e})") from None
            except TimeoutError:
                raise ValueError(f"{f}: the regex {pattern[:80]!r} backtracks (over 0.5 s on 3,000 characters): "
                                 f"it would hang on some text") from None
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:
            raise ValueError(f"{p}: not a tokenizer directory ({type(e).__name__}: {e})") from None
        return TextTokenizer(str(p), lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True),
                             hf.decode, hf.eos_token_id, len(hf), bos_id=hf.bos_token_id, source=p)
    tok = load_bpe(spec)
    enc = tok.to_tiktoken()  # the same ids as tok.encode, at Rust speed
    return TextTokenizer(tok.name, enc.encode_ordinary, tok.decode, tok.special_tokens.get("<|endoftext|>"),
                         tok.vocab_size, enc.encode_ordinary_batch, source=tok)


# -----------------------------------------------------------------------------------------------
# 6. Command line

def _read_input_text(args):
    if args.text is not None:
        return args.text
    return sys.stdin.read() if args.input is None else _read_text(args.input)


def cmd_train(args):
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    tok = Tokenizer.train([Path(p) for p in args.input], args.vocab_size, pattern=args.pattern,
                          special_tokens=args.special, verbose=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"saved {tok} to {out}/tokenizer.bpe and {out}/tokenizer.tiktoken", file=sys.stderr)


def cmd_encode(args):
    tok = load_bpe(args.tokenizer, args.pattern, args.trust_pattern)
    allowed = "all" if args.allow_special else set()
    text = _read_input_text(args)
    try:
        ids = tok.to_tiktoken().encode(text, allowed_special=allowed) if args.fast else \
            tok.encode(text, allowed_special=allowed)
    except ValueError as e:
        raise ValueError(f"{e} On the command line: --allow_special.") from None
    print(" ".join(map(str, ids)))


def cmd_decode(args):
    tok = load_bpe(args.tokenizer, args.pattern, args.trust_pattern)
    raw = args.ids if args.ids is not None else (_read_text(args.input) if args.input else sys.stdin.read())
    try:
        ids = [int(x) for x in raw.split()]
    except ValueError:
        raise ValueError("expected token ids: integers separated by spaces") from None
    sys.stdout.write(tok.decode(ids) + ("\n" if args.ids is not None else ""))


def cmd_show(args):
    tok = load_bpe(args.tokenizer, args.pattern, args.trust_pattern)
    text = _read_input_text(args)
    ids = tok.encode(text, allowed_special="all")
    if args.ids:
        for i in ids:
            print(f"{i:>7} {render(tok.vocab[i])}")
    else:
        print(args.sep.join(tok.vocab[i].decode("utf-8", errors="backslashreplace") for i in ids))
    nbytes = len(text.encode("utf-8"))
    print(f"-- {len(ids)} tokens, {nbytes} bytes, {nbytes / max(1, len(ids)):.2f} bytes/token", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     epilog="Usage:" + __doc__.split("Usage:")[1].split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tok_help = ("'gpt2', a directory or .bpe file saved by `train`, a directory with GPT-2's "
                "encoder.json + vocab.bpe, or a .tiktoken rank file")

    p = sub.add_parser("train", help="learn a tokenizer from text files")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files (streamed)")
    p.add_argument("--vocab_size", type=int, required=True, help="tokens in all: 256 bytes + merges + special tokens")
    p.add_argument("--out", required=True, help="directory for tokenizer.bpe and tokenizer.tiktoken")
    p.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4", "none"],
                   help="pre-split regex (default: gpt4; none = no split)")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"],
                   help="special tokens, given the ids after the merges (default: <|endoftext|>)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_train)

    for name, helptext, func in [("encode", "print the token ids of a text", cmd_encode),
                                 ("show", "show a text with its token boundaries marked", cmd_show),
                                 ("decode", "print the text of token ids", cmd_decode)]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--tokenizer", default="gpt2", help=tok_help + " (default: gpt2)")
        if name == "decode":
            p.add_argument("--ids", help="ids separated by spaces (default: --input, else standard input)")
            p.add_argument("--input", help="a file of ids separated by whitespace")
        else:
            p.add_argument("--text", help="the text (default: --input, else standard input)")
            p.add_argument("--input", help="a UTF-8 text file")
        p.add_argument("--pattern", default="gpt2", help="split pattern for a .tiktoken file (default gpt2)")
        p.add_argument("--trust_pattern", action="store_true", help="accept a tokenizer file's custom split regex")
        if name == "encode":
            p.add_argument("--allow_special", action="store_true",
                           help="encode special-token strings as special tokens (default: error)")
            p.add_argument("--fast", action="store_true", help="encode with the tiktoken export")
        elif name == "show":
            p.add_argument("--sep", default="|", help="boundary marker (default: |)")
            p.add_argument("--ids", action="store_true", help="list one token per line with its id")
        p.set_defaults(func=func)

    args = parser.parse_args(argv)
    if getattr(args, "pattern", None) == "none":
        args.pattern = None
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
