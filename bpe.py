"""
bpe.py: a byte-level BPE (byte pair encoding) tokenizer, as used by GPT-2 and its successors.

Read it top to bottom:
  1. pre-splitting: a regex cuts text into chunks (words, numbers, punctuation, spaces); no token crosses a chunk.
  2. the algorithm, the naive way, with a worked example:
     - training: from the 256 byte values, count every adjacent pair of tokens in every chunk, merge the most
       frequent pair into a new token, and repeat until the vocabulary has the requested size;
     - encoding: inside each chunk, repeatedly join the adjacent pair that makes the earliest learned token
       (lowest rank); decoding concatenates the bytes of the tokens.
  3. training, the same merges, faster: each distinct chunk is counted once, pair counts are updated only in
     the chunks a merge touches, and a heap finds the next pair.
  4. encoding, the same ids, faster: a heap of pairs over a linked list of parts.
  5. the Tokenizer: train, encode, decode, special tokens, the tiktoken fast path.
  6. file formats (skip on a first read): our readable .bpe, tiktoken's rank file, GPT-2's encoder.json +
     vocab.bpe, Hugging Face's tokenizer.json; load_bpe.
  7. load_tokenizer: one interface (TextTokenizer) for ours, GPT-2's and Hugging Face's;
  8. chat templates: an instruct model's own conversation format (prompt, loss mask, end of turn); 9. a small CLI.

Usage:
  python bpe.py train   --input book.txt --vocab_size 4096 --out_dir tok/
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
  vocab, merges = train_naive(text, 512)                 # section 2: the textbook algorithm, same merges

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
from functools import cached_property
from pathlib import Path

import regex

from housekeeping import atomic_write, is_hub_id, resolve_model_dir

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
# 2. The algorithm, the naive way (as in minbpe): a few dozen lines, slow, easy to check by hand
#
# A worked example, train_naive("low lower lowest", 262) (␠ is a space). GPT-4's pattern cuts the text into
# the chunks "low", "␠lower", "␠lowest" (a space goes with the word after it), and every chunk starts as
# its bytes, ids 0-255 ("l" is 108, "o" 111, "w" 119, "␠" 32). Each merge counts the adjacent pairs in all
# chunks, and the most frequent pair becomes the next token:
#   merge 1: l+o and o+w both occur 3 times, a tie. Ties go to the smallest pair of ids,
#            (108, 111) < (111, 119): l+o -> token 256 "lo"       chunks: lo|w  ␠|lo|w|e|r  ␠|lo|w|e|s|t
#   merge 2: lo+w, 3 times -> 257 "low"                          chunks: low  ␠|low|e|r  ␠|low|e|s|t
#   merge 3: ␠+low and low+e, 2 times each; (32, 257) < (257, 101): -> 258 "␠low"
#                                                                chunks: low  ␠low|e|r  ␠low|e|s|t
#   merge 4: ␠low+e, 2 times -> 259 "␠lowe"                      chunks: low  ␠lowe|r  ␠lowe|s|t
#   merge 5: each pair is left once; the smallest, (115, 116), is s+t -> 260 "st"
#   merge 6: (259, 114) < (259, 260): ␠lowe+r -> 261 "␠lower"    chunks: low  ␠lower  ␠lowe|st
# A token's id is its rank: the order it was learned in. Encoding "␠lowest" replays that order: from the
# bytes, join each time the adjacent pair that makes the lowest-ranked token:
#   ␠|l|o|w|e|s|t    tokens among the pairs: l+o 256, s+t 260: join l+o
#   ␠|lo|w|e|s|t     lo+w 257, s+t 260
#   ␠|low|e|s|t      ␠+low 258, s+t 260
#   ␠low|e|s|t       ␠low+e 259, s+t 260
#   ␠lowe|s|t        s+t 260
#   ␠lowe|st         ␠lowe+st is no token: done, ids [259, 260]. Decoding joins their bytes: "␠lowest".
# (minbpe looks each pair up in its table of merges; looking the joined bytes up among the tokens gives the
# same answer for a vocabulary that BPE learned, and needs only the tokens and their ranks, which is all
# that GPT-2's rank file holds.)

def get_stats(ids, counts=None):
    """{(a, b): occurrences} of the adjacent pairs in the list `ids`, added into `counts` if given.
    Example: get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    if counts is None:
        counts = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """`ids` with every occurrence of `pair` replaced by `new_id`, left to right, never overlapping:
    merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2] (the third 1 has no partner left)."""
    a, b = pair
    out = []
    i = 0
    n = len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_pair(word, a, b, new_id):
    """merge(word, (a, b), new_id), under the name bench_speed.py uses."""
    return merge(word, (a, b), new_id)


def train_naive(text, n_tokens, pattern="gpt4"):
    """Byte-level BPE the textbook way. Returns (vocab, merges) as learn_merges (section 3) does, and the same
    ones: vocab[id] is the token's bytes (ids 0-255 the bytes themselves), merges is [(left_id, right_id,
    new_id), ...] in order. `n_tokens` counts the 256 bytes and the merges (no special tokens here).

    Each merge costs a pass over every chunk of the text: fine for a few KB, hours for a book (bench_speed.py
    bpe measures it)."""
    chunks = regex.findall(resolve_pattern(pattern), text)
    ids = [list(chunk.encode("utf-8")) for chunk in chunks]  # one list of token ids per chunk
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < n_tokens:
        stats = {}
        for chunk_ids in ids:  # pairs never cross a chunk boundary
            get_stats(chunk_ids, stats)
        if not stats:  # every chunk is a single token
            break
        # the most frequent pair; on a tie, the smallest pair of ids (left id first), as learn_merges does
        pair = min(stats, key=lambda p: (-stats[p], p))
        new_id = len(vocab)
        ids = [merge(chunk_ids, pair, new_id) for chunk_ids in ids]
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append((pair[0], pair[1], new_id))
    return vocab, merges


def encode_chunk_naive(piece, ranks):
    """The tokens (bytes) of one chunk `piece` (bytes): from single bytes, repeatedly join the adjacent pair
    whose concatenation is the lowest-ranked token (ranks: {token bytes: id}, the id being the order the
    token was learned), the leftmost one on a tie, until no adjacent pair forms a token. Each join rescans
    every pair: quadratic in the chunk's length."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                      if parts[i] + parts[i + 1] in ranks]
        if not candidates:
            return parts
        _, i = min(candidates)  # the lowest rank; on a tie, the leftmost position
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def encode_naive(text, ranks, pattern="gpt4"):
    """The ids of `text`: its chunks encoded one by one (special-token strings are ordinary text here)."""
    ids = []
    for chunk in regex.findall(resolve_pattern(pattern), text):
        ids.extend(ranks[token] for token in encode_chunk_naive(chunk.encode("utf-8"), ranks))
    return ids


# -----------------------------------------------------------------------------------------------
# 3. Training: the same merges as train_naive, faster. train_naive reads every chunk of the text again at
#    every merge; a book has millions of chunks, and we want thousands of merges. Three changes, none of
#    which changes the result:
#    - count first: a text repeats its chunks (" the" thousands of times), so each distinct chunk is kept
#      once with its count, and a pair inside it counts that many times (count_chunks; files are streamed);
#    - update, don't recount: a merge changes only the chunks that contain its pair, so pair counts are
#      corrected there alone (learn_merges' `where` remembers which chunks hold each pair);
#    - a heap finds the most frequent pair, instead of a scan of all pairs; it is ordered by (-count, pair),
#      so equal counts go to the smallest pair of ids, as in train_naive.

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
    pending = ""  # decoded text not yet handed out
    nbytes = 0    # bytes read so far, and the newlines among them, to say where a bad byte is
    nlines = 0
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
    counts = Counter()
    n_chars = 0
    start = time.time()
    last_report = start
    for block in blocks:
        for piece in (cutter.split(block) if cutter else [block]):
            counts.update(splitter.findall(piece))
        n_chars += len(block)
        if verbose and time.time() - last_report > 2:
            last_report = time.time()
            print(f"  read {n_chars / 1e6:,.0f}M characters, {len(counts):,} distinct chunks "
                  f"[{time.time() - start:.1f}s]", file=sys.stderr)
    return counts


def learn_merges(chunk_counts, n_tokens, verbose=False):
    """Byte-level BPE on {chunk: count}, with the result of train_naive. Returns (vocab, merges): vocab[id] is the
    token's bytes (ids 0-255 are the bytes themselves), merges is [(left_id, right_id, new_id), ...] in order.

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

    merges = []
    start = time.time()
    last_report = start
    n_goal = n_tokens - len(vocab)
    while len(vocab) < n_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        new_id = len(vocab)
        token = vocab[a] + vocab[b]
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
            new = merge(old, pair, new_id)
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
# 4. Encoding: the same tokens as encode_chunk_naive, faster. The naive encoder rescans every pair of a
#    chunk after every join: quadratic in the chunk's length (a run of 100,000 "a"s takes minutes). Here the
#    candidate pairs wait in a heap ordered by (rank, position), which pops the lowest rank, leftmost on a
#    tie: exactly the naive choice. The parts form a linked list, so a join only changes the two pairs
#    around it, which are pushed anew: about n log n. (The Tokenizer also caches the ids of each chunk.)

def bpe_merge(piece, ranks, max_rank=None):
    """Split `piece` (bytes) into tokens as encode_chunk_naive does: from single bytes, keep joining the
    adjacent pair whose concatenation is the lowest-ranked (earliest learned) token, leftmost on ties, until
    no pair forms a token. Ranks >= `max_rank` are ignored (to find which two tokens a token was built from).
    Exactly tiktoken's algorithm, so both encoders agree on every input. Stale heap entries (a pair whose
    part has changed since it was pushed) are skipped when popped: lazy deletion."""
    n = len(piece)
    if max_rank is None:
        limit = float("inf")
    else:
        limit = max_rank
    # The part starting at byte i is parts[i] (None once joined into the part before it); the parts
    # before and after it start at prev[i] and nxt[i] (-1 and n: none).
    parts = [piece[i:i + 1] for i in range(n)]
    nxt = list(range(1, n + 1))
    prev = list(range(-1, n))

    def rank(i):
        """The rank of the token that joining part i and the next one would make (limit: none)."""
        if i < 0 or nxt[i] >= n:
            return limit
        return min(ranks.get(parts[i] + parts[nxt[i]], limit), limit)

    heap = [(r, i) for i in range(n - 1) if (r := rank(i)) < limit]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        if parts[i] is None or rank(i) != r:  # stale: part i or its neighbour changed since
            continue
        j = nxt[i]  # part i absorbs part j, and j leaves the list
        parts[i] = parts[i] + parts[j]
        parts[j] = None
        nxt[i] = nxt[j]
        prev[nxt[i]] = i
        for k in (prev[i], i):  # only the pairs around the new token changed
            rk = rank(k)
            if rk < limit:
                heapq.heappush(heap, (rk, k))
    return [p for p in parts if p is not None]


# -----------------------------------------------------------------------------------------------
# 5. The Tokenizer: the fast trainer and encoder behind one object, with special tokens, decoding and
#    tiktoken's Rust encoder as a fast path (the same ids)

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
        """Learn a tokenizer from a text (str) or from files (a path or a list of paths; streamed): the
        merges of train_naive, by count_chunks + learn_merges.
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

    # ---- encoding and decoding (the pure-Python path: bpe_merge on each chunk)

    def encode_ordinary(self, text):
        """Encode text, treating special-token strings as ordinary text. The same ids as encode_naive."""
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
        """Encode text to ids, treating special-token strings as tiktoken does:
        - those in `allowed_special` ("all", or a set of strings) become their special token's id;
        - finding one of those in `disallowed_special` is an error, so that user text cannot smuggle in
          control tokens; "all" (the default) means every special token that is not allowed;
        - any other special-token string (disallowed_special=() for all of them) is ordinary text.
        Lone surrogates (not encodable as UTF-8) become U+FFFD, the replacement character."""
        all_specials = set(self.special_tokens)
        if allowed_special == "all":
            allowed = all_specials
        else:
            allowed = set(allowed_special)
        unknown = allowed - all_specials
        if unknown:
            raise ValueError(f"allowed_special has strings that are not special tokens of this "
                             f"tokenizer: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed = all_specials - allowed
        else:
            disallowed = set(disallowed_special)
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
        ids = []
        start = 0  # where the ordinary text after the last special token begins
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

    # ---- files: each format is read and written in section 6, apart from the algorithm

    def save(self, path):
        """Save to `path`: a directory gets both tokenizer.bpe and tokenizer.tiktoken (see save_tokenizer)."""
        save_tokenizer(self, path)

    @classmethod
    def load(cls, path, trust_pattern=False):
        """A tokenizer saved by save(): a .bpe file, or a directory with tokenizer.bpe (see read_bpe_file)."""
        return read_bpe_file(path, trust_pattern)

    @classmethod
    def from_tiktoken_file(cls, path, pattern="gpt2", special_tokens=GPT2_SPECIAL_TOKENS, name=None):
        """A tiktoken rank file; the defaults give GPT-2 (see read_tiktoken_file)."""
        return read_tiktoken_file(path, pattern, special_tokens, name)

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, special_tokens=GPT2_SPECIAL_TOKENS):
        """GPT-2's original release files, encoder.json and vocab.bpe (see read_gpt2_files)."""
        return read_gpt2_files(encoder_json, vocab_bpe, special_tokens)

    def hf_files(self, model_max_length=None) -> dict:
        """{"tokenizer.json": ..., "tokenizer_config.json": ...}: this tokenizer in Hugging Face's format
        (see hf_tokenizer_files)."""
        return hf_tokenizer_files(self, model_max_length)


# -----------------------------------------------------------------------------------------------
# 6. File formats (skip on a first read): how a tokenizer is saved and read back. Nothing here is part of
#    the algorithm: our readable .bpe (every merge spelled out), tiktoken's rank file, GPT-2's original
#    encoder.json + vocab.bpe, Hugging Face's tokenizer.json; load_bpe picks the reader.

def _read_text(path):
    """The text of a UTF-8 file; a missing file or a byte that is not UTF-8 is one error naming the file
    (and the line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected a file") from None
    return _decode_utf8(data, path)


def _decode_utf8(data, where):
    """`data` (bytes) decoded as UTF-8, or one error naming `where` it came from and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{where}, line {line}: not valid UTF-8 ({e.reason})") from None


def _write_atomically(path, text):
    """Write `text` as UTF-8 with \\n line ends, via a temporary file renamed into place: a reader never
    sees half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


# Our readable format, tokenizer.bpe: a header, the pattern, then one line per token saying how it is built,
#   0 byte 0 "\u0000"   ...   256 merge 32 116 " t"   ...   4095 special "<|endoftext|>"
# so that the file is the merge list itself, and can be read (and checked) without this code.
FORMAT_HEADER = "bpe.py tokenizer v1"


def bpe_file_text(tok):
    """The text of tok's tokenizer.bpe (the format above)."""
    lines = [FORMAT_HEADER, f"pattern {json.dumps(tok.pattern)}",
             "# one token per line: id, then 'byte VALUE', 'merge LEFT RIGHT' or 'special', then",
             "# the token in quotes (\\xNN = a byte that is not UTF-8 on its own). load() rebuilds",
             "# every token from the first columns and checks it against the quoted text."]
    recipe = {new_id: (left, right) for left, right, new_id in tok.merges}
    for i in range(len(tok.ranks)):
        t = tok.vocab[i]
        how = f"byte {t[0]}" if len(t) == 1 else "merge {} {}".format(*recipe[i])
        lines.append(f"{i} {how} {render(t)}")
    for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        lines.append(f"{i} special {json.dumps(s)}")
    return "\n".join(lines) + "\n"


def save_tokenizer(tok, path):
    """Save to `path`. A directory (an existing one, or a new name without a suffix, created) gets both formats
    (tokenizer.bpe and tokenizer.tiktoken); a name ending in .tiktoken gets tiktoken's rank format (ranks only: no
    pattern, no special tokens); any other name gets the readable format. Files are written atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, path / "tokenizer.bpe")
        save_tokenizer(tok, path / "tokenizer.tiktoken")
    elif path.suffix == ".tiktoken":
        lines = [f"{base64.b64encode(t).decode('ascii')} {i}"
                 for t, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
        _write_atomically(path, "\n".join(lines) + "\n")
    else:
        _write_atomically(path, bpe_file_text(tok))


def read_bpe_file(path, trust_pattern=False):
    """Read the readable format of save() (a file, or a directory with tokenizer.bpe), checking every line.
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
    vocab = []
    merges = []
    specials = {}
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
            except (ValueError, RecursionError):  # not JSON, or a number too long to convert
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
        return Tokenizer(ranks, pattern, specials, merges, name=path.stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_tiktoken_file(path, pattern="gpt2", special_tokens=GPT2_SPECIAL_TOKENS, name=None):
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
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except ValueError:
            raise ValueError(f"{path}, line {lineno}: expected '<base64 token> <rank>', "
                             f"got {line[:80]!r}") from None
        if token in ranks:
            raise ValueError(f"{path}, line {lineno}: token {render(token)} appears twice")
        ranks[token] = rank
    try:
        return Tokenizer(ranks, pattern, special_tokens, name=name or path.stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def gpt2_byte_to_char():
    """GPT-2's files spell each byte as a printable character: printable bytes as themselves,
    the others (controls, space, ...) as the characters from U+0100 on, in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return mapping


def read_gpt2_files(encoder_json, vocab_bpe, special_tokens=GPT2_SPECIAL_TOKENS):
    """Load GPT-2's original release files: encoder.json (token -> id) and vocab.bpe (the
    merges, in order). Both spell bytes as printable characters (see gpt2_byte_to_char)."""
    char_to_byte = {c: b for b, c in gpt2_byte_to_char().items()}
    try:
        encoder = json.loads(_read_text(encoder_json))
    except (ValueError, RecursionError) as e:  # not JSON, too deep, or a number too long to convert
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
    return Tokenizer(ranks, "gpt2", special_tokens, merges, name="gpt2")


def hf_tokenizer_files(tok, model_max_length=None) -> dict:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...}: this tokenizer in Hugging Face's
    format, so that transformers.AutoTokenizer gives the same ids as encode_ordinary. A
    special-token string written in text stays ordinary text there too (split_special_tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    b2c = gpt2_byte_to_char()  # GPT-2's printable spelling of bytes, as in its vocab.json

    def spell(token):
        return "".join(b2c[b] for b in token)

    # merge k makes token 256 + k, so merge order is rank order (tiktoken's priority); ignore_merges:
    # a chunk that is itself a token is that token, without merging (tiktoken's shortcut too)
    merges = [(spell(tok.vocab[a]), spell(tok.vocab[b])) for a, b, _ in sorted(tok.merges, key=lambda m: m[2])]
    hf = HFTokenizer(models.BPE({spell(t): i for t, i in tok.ranks.items()}, merges, ignore_merges=True))
    # HF's regex engine (Oniguruma) reads X{1,3}+ as (X{1,3})+, not as a possessive interval, so
    # GPT-4's \p{N}{1,3}+ would keep "12345678" whole: an atomic group means the same
    pattern = regex.sub(r"(\\p\{\w+\}|\\.|\[[^\]]*\]|[^\\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", tok.pattern)
    # no normalizer; split with our regex, then spell each chunk's bytes (use_regex=False: no 2nd split)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()  # alphabet -> bytes -> UTF-8, bad bytes as U+FFFD, like decode()
    for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False)])  # takes the next id
        if hf.token_to_id(s) != i:
            raise ValueError(f"special token {s!r} has id {i}; Hugging Face needs ids right after the ranks")
    eos = "<|endoftext|>" if "<|endoftext|>" in tok.special_tokens else None
    # <|endoftext|> separates documents: the EOS, and (as in GPT-2) BOS; nothing is added around ids
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": eos,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True, **({"model_max_length": model_max_length} if model_max_length else {})}
    return {"tokenizer.json": hf.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def gpt2_rank_files():
    """Where 'gpt2' is looked for, in order: $GPT2_TIKTOKEN if set (then only there), else data/gpt2.tiktoken
    in this checkout, then ../shared/data/gpt2.tiktoken beside it (the project's test data)."""
    if os.environ.get("GPT2_TIKTOKEN"):
        return [Path(os.environ["GPT2_TIKTOKEN"])]
    here = Path(__file__).resolve().parent
    return [here / "data" / "gpt2.tiktoken", here.parent / "shared" / "data" / "gpt2.tiktoken"]


def load_bpe(spec, pattern="gpt2", trust_pattern=False):
    """A Tokenizer from:
    - 'gpt2': GPT-2's rank file where gpt2_rank_files() says, else tiktoken's download;
    - a directory or .bpe file saved by bpe.py;
    - a directory with GPT-2's encoder.json + vocab.bpe;
    - a .tiktoken rank file (split with `pattern`)."""
    if spec == "gpt2":
        candidates = gpt2_rank_files()
        for local in candidates:
            if local.is_file():
                return read_tiktoken_file(local)
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception:
            looked = ", ".join(str(c) for c in candidates)
            raise ValueError(f"GPT-2's tokenizer is not on this machine ({looked}) and tiktoken could not download "
                             f"it; fetch it once: curl -L --create-dirs -o {candidates[0]} {GPT2_RANKS_URL}") from None
        # the same tokens, through tiktoken's public interface: each id's bytes, and the special tokens' ids
        specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        special_ids = set(specials.values())
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special_ids}
        return Tokenizer(ranks, "gpt2", specials, name="gpt2")
    path = Path(spec)
    if path.is_dir() and (path / "encoder.json").is_file():
        return read_gpt2_files(path / "encoder.json", path / "vocab.bpe")
    if path.suffix == ".tiktoken":
        return read_tiktoken_file(path, pattern=pattern)
    return read_bpe_file(path, trust_pattern)


# -----------------------------------------------------------------------------------------------
# 7. One interface for every tokenizer the scripts meet: ours, GPT-2's, or a Hugging Face one

TOKENIZER_FILES = ("tokenizer.bpe", "tokenizer.json", "tokenizer.model", "vocab.json", "encoder.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def tokenizer_dir(model_dir) -> str | None:
    """Where a model directory keeps its tokenizer: the directory itself or its tokenizer/ folder."""
    d = Path(model_dir)
    return next((str(c) for c in (d / "tokenizer", d) if any((c / f).exists() for f in TOKENIZER_FILES)), None)


def _is_hf_dir(p: Path) -> bool:  # a Hugging Face tokenizer directory, not one of ours or GPT-2's originals
    return p.is_dir() and not (p / "tokenizer.bpe").exists() and not (p / "encoder.json").exists()


def tokenizer_files(spec) -> tuple[dict, list[int], int | None]:
    """({file name: contents}, stop ids, BOS id): the files that put a tokenizer beside a saved model, and
    the ids generation stops at: the end-of-text token, preceded by a chat template's end-of-turn token
    where the tokenizer ships one (an instruct model's reply ends there). Our BPE (a Tokenizer, or what
    load_bpe reads) gets its own tokenizer.bpe and Hugging Face's tokenizer.json + tokenizer_config.json;
    a Hugging Face tokenizer directory is copied."""
    if isinstance(spec, Tokenizer):
        tok = spec
    elif _is_hf_dir(Path(spec)):
        d = Path(spec)
        t = load_tokenizer(str(d))
        files = {f: (d / f).read_bytes() for f in HF_TOKENIZER_FILES if (d / f).is_file()}
        stops = [] if t.eot_id is None else [t.eot_id]
        if t.chat_template is not None:
            stops = t.chat_template.stop_ids
        return files, stops, t.bos_id
    else:
        tok = load_bpe(str(spec))
    files = {"tokenizer.bpe": bpe_file_text(tok), **hf_tokenizer_files(tok)}
    eot = tok.special_tokens.get("<|endoftext|>")
    return files, [] if eot is None else [eot], None


class TextTokenizer:
    """What the scripts need from any tokenizer (made by load_tokenizer):
    - encode(text): ids of ordinary text: a written "<|endoftext|>" stays characters; only the code inserts
      the control token; encode_batch(texts): the same for many texts;
    - decode(ids): the text;
    - eot_id: the end-of-text token's id; bos_id: what LLaMA-style tokenizers put first (None for GPT-2's;
      encode never adds it); n_vocab: the number of ids;
    - name, and source: our Tokenizer (or the HF tokenizer's directory), for export;
    - chat_template: the model's ChatTemplate (section 8) where its tokenizer ships one, else None."""

    def __init__(self, name, encode, decode, eot_id, n_vocab, encode_batch=None, bos_id=None, source=None,
                 chat_template=None):
        self.name = name
        self._encode = encode
        self._decode = decode
        self.eot_id = eot_id
        self.n_vocab = n_vocab
        self._encode_batch = encode_batch
        self.bos_id = bos_id
        self.source = source
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts) -> list[list[int]]:
        if self._encode_batch is not None:
            return self._encode_batch(list(texts))
        return [self._encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def _backtracking_probes(pattern: str):
    """Texts on which a regex that backtracks exponentially shows it: a long run of one unit, then a character
    that makes the match fail at the very end. The units are a few kinds of character (letters, spaces,
    digits, newlines, punctuation, accents, emoji) and the pattern's own literal characters and pairs of
    them, so that `(x+)+$` meets x's and `(y|yy)+$` meets y's. A run is 10,000 characters: a regex that
    backtracks only quadratically, as `(\\w|\\p{L})*\\d` does in this engine, takes about 0.5 s on 3,000 (a
    coin toss against the bound) and over 5 s on 10,000, while real tokenizers' regexes take a few ms."""
    literals = regex.sub(r"\\[pPxuUN]\{[^}]*\}|\\.", "", pattern)  # escapes (\p{L}, \d, \n) are no literals
    chars = [c for c in dict.fromkeys(literals) if c.isprintable() and c not in "()[]{}|*+?^$."]
    pairs = [a + b for a, b in zip(literals, literals[1:]) if a in chars and b in chars]
    units = ["a", " ", "1", "\n", "!", "é", "😀", "a "] + chars + pairs
    for unit in dict.fromkeys(units):
        for fail in ("\x00", "!", "a"):
            yield unit * (10000 // len(unit)) + fail


def check_backtracking(pattern: str, where) -> None:
    """A pre-tokenizer regex from a file runs in a backtracking engine: one that backtracks exponentially
    hangs on some text, then panics. Each is tried first, under a time bound, on the texts where that
    shows (_backtracking_probes): a bad one is one error line naming the file."""
    try:
        compiled = regex.compile(pattern)
        for text in _backtracking_probes(pattern):
            compiled.findall(text, timeout=0.5)
    except regex.error as e:
        raise ValueError(f"{where}: the regex {pattern[:80]!r} is not valid ({e})") from None
    except TimeoutError:
        raise ValueError(f"{where}: the regex {pattern[:80]!r} backtracks (over 0.5 s on {text[:4]!r}... of "
                         f"{len(text):,} characters): it would hang on some text") from None


def load_tokenizer(spec=None, model_dir=None) -> TextTokenizer:
    """spec: "gpt2" (tiktoken's), a *.tiktoken rank file (GPT-2's pattern), a directory saved by bpe.py or one
    with a Hugging Face tokenizer. None: model_dir's own tokenizer (itself or its tokenizer/), else GPT-2's.
    `source` is our Tokenizer (or the HF tokenizer's directory), for export. A hub id as model_dir (org/name, as
    GPT.from_pretrained took it) is its downloaded snapshot: an instruct model's tokenizer and chat template."""
    if spec is None and model_dir is not None and is_hub_id(str(model_dir)):
        model_dir = resolve_model_dir(str(model_dir))  # already in the hub cache: the model was loaded from it
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
            check_backtracking(pattern, f)
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:
            raise ValueError(f"{p}: not a tokenizer directory ({type(e).__name__}: {e})") from None
        template = ChatTemplate(hf, p) if hf.chat_template else None  # read by transformers, from either file
        return TextTokenizer(str(p), lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True),
                             hf.decode, hf.eos_token_id, len(hf), bos_id=hf.bos_token_id, source=p,
                             chat_template=template)
    tok = load_bpe(spec)
    enc = tok.to_tiktoken()  # the same ids as tok.encode, at Rust speed
    return TextTokenizer(tok.name, enc.encode_ordinary, tok.decode, tok.special_tokens.get("<|endoftext|>"),
                         tok.vocab_size, enc.encode_ordinary_batch, source=tok)


# -----------------------------------------------------------------------------------------------
# 8. Chat templates: how an instruct model expects a conversation to be written
#
# An instruct model (Qwen2.5-Instruct, Llama-3.x-Instruct, ...) was tuned on conversations written in ONE
# format, with special tokens around each turn, e.g. Qwen's ChatML:
#     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n
# The format ships beside the weights as a Jinja template (tokenizer_config.json's "chat_template", or
# chat_template.jinja). transformers' tokenizer renders it (apply_chat_template): we never reimplement Jinja.
# Three things follow from it, and every stage needs them (ChatTemplate):
#   - the prompt: the conversation so far, then the "generation prompt" (the header of the assistant's turn);
#   - the loss mask: only the tokens each assistant turn adds are trained (found by rendering the conversation
#     prefix by prefix, below);
#   - where a reply ends: the template's end-of-turn token (<|im_end|>, <|eot_id|>), which is often not the
#     tokenizer's end-of-text token: a model that is not stopped there writes the user's next turn itself.
# This project's own models have no template: they keep their text formats (Alpaca's template for instructions,
# "\n\nHuman: ...\n\nAssistant: ..." turns for dialogues: prepare_data.py), chosen by each stage's --template.

TEMPLATE_CHOICES = ("auto", "chat", "ours")
TEMPLATE_HELP = ("prompt format: chat = the model's own chat template (its tokenizer_config.json's chat_template or "
                 "chat_template.jinja), ours = this project's text formats (Alpaca's template for instructions, "
                 "Human:/Assistant: turns for dialogues), auto = chat where the model ships a template, else ours")
DIALOGUE_ROLES = {"Human": "user", "Assistant": "assistant"}  # prepare_data.parse_dialogue's roles -> chat roles
_PROBE_REPLY = "PROBE-REPLY-7f3a"  # an assistant text no template writes itself: what follows it ends the turn


class ChatTemplate:
    """A model's chat template, rendered by its transformers tokenizer (`hf`):
    - render(messages, add_generation_prompt): the text; messages are [{"role": ..., "content": ...}];
    - prompt_ids(messages): the tokens of the conversation and the assistant's header: what generation starts from;
    - reply_ids(messages, reply): the tokens the assistant's turn `reply` adds after prompt_ids(messages), up to
      and including the end-of-turn token: what a preference or RL stage scores;
    - conversation(messages): (ids, train): the whole conversation and, per token, whether it is trained (the
      assistant turns' tokens);
    - stop_ids: the tokens that end a reply (the end-of-turn token, and the end-of-text token).
    Rendered text is tokenized with its special tokens read as such (the template writes them as text)."""

    def __init__(self, hf, where):
        self.hf = hf
        self.where = where  # the tokenizer directory, for error lines

    # found when first asked for, not when the tokenizer is loaded: a stage that never speaks in the template
    # (pretraining, HellaSwag) never runs it
    @cached_property
    def end_of_turn(self) -> int | None:
        """The first special token the template writes after an assistant's text: its end-of-turn token (None if
        it writes none: then a reply ends at the end-of-text token alone)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
        text = self.render(probe)
        if _PROBE_REPLY not in text:
            raise ValueError(f"{self.where}: its chat template does not write the assistant's text as given")
        after = text[text.rindex(_PROBE_REPLY) + len(_PROBE_REPLY):]
        special = set(self.hf.all_special_ids)
        special.update(i for i, t in self.hf.added_tokens_decoder.items() if t.special)
        return next((i for i in self.encode(after) if i in special), None)

    @cached_property
    def stop_ids(self) -> list[int]:
        return list(dict.fromkeys(i for i in (self.end_of_turn, self.hf.eos_token_id) if i is not None))

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template itself raises, e.g. on roles that do not alternate
            raise ValueError(f"{self.where}: its chat template refused the conversation ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: no BOS added (a template writes its own), special tokens recognised."""
        return self.hf.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def _prefix_length(self, ids: list[int], messages, add_generation_prompt: bool) -> int:
        """How many of `ids` (a longer conversation's tokens) the rendering of `messages` is. The rendering must
        be a prefix of ids: a template that rewrites earlier turns once later ones follow (Qwen3's drops the
        reasoning of earlier answers) has no fixed token span per turn, and is refused."""
        prefix = self.encode(self.render(messages, add_generation_prompt)) if messages else []
        if ids[:len(prefix)] != prefix:
            raise ValueError(f"{self.where}: its chat template is not prefix-stable (the tokens of the conversation "
                             f"up to message {len(messages)} are not the start of the whole conversation's), so "
                             f"the assistant's tokens cannot be found; use --template ours, or single-turn data")
        return len(prefix)

    def _turn_end(self, ids: list[int], start: int, end: int) -> int:
        """An assistant span [start, end) ends with its end-of-turn token: what the template writes after that
        (ChatML's newline) is part of no reply, and is not trained. A template that writes no end-of-turn token
        is refused for training: a model trained on its replies would never learn where a reply stops."""
        if self.end_of_turn is None:
            raise ValueError(f"{self.where}: its chat template writes no special token after a reply, so a model "
                             f"trained in it would not learn to stop; use --template ours")
        if self.end_of_turn in ids[start:end]:
            return ids.index(self.end_of_turn, start, end) + 1
        return end

    def reply_ids(self, messages, reply: str) -> list[int]:
        conversation = [*messages, {"role": "assistant", "content": reply}]
        ids = self.encode(self.render(conversation))
        start = self._prefix_length(ids, messages, add_generation_prompt=True)
        return ids[start:self._turn_end(ids, start, len(ids))]

    def conversation(self, messages) -> tuple[list[int], list[bool]]:
        """The conversation's ids, and train[p]: whether token p belongs to an assistant turn. Each assistant turn
        is the span between the conversation before it with the assistant's header (add_generation_prompt) and
        the conversation up to it, both rendered by the template and checked to be prefixes of the whole."""
        ids = self.encode(self.render(messages))
        train = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_length(ids, messages[:i], add_generation_prompt=True)
                end = self._turn_end(ids, start, self._prefix_length(ids, messages[:i + 1], False))
                train[start:end] = [True] * (end - start)
        return ids, train


def pick_template(choice: str, tok: TextTokenizer, model_name) -> ChatTemplate | None:
    """--template (TEMPLATE_CHOICES, and chat.py's own formats): the model's ChatTemplate for "chat", and for "auto"
    where the model ships one; None for this project's formats. "chat" on a model without one is an error line."""
    if choice == "chat" and tok.chat_template is None:
        raise ValueError(f"--template chat: {model_name} ships no chat template (no \"chat_template\" in its "
                         f"tokenizer_config.json, no chat_template.jinja); use --template ours")
    if choice in ("chat", "auto"):
        return tok.chat_template
    return None


def reply_stops(tok: TextTokenizer, chat: ChatTemplate | None = None) -> list[int]:
    """The tokens that end a generated reply: the template's (end of turn, end of text), else the end-of-text
    token, if the tokenizer has one. Pass it as generate(eos_token_id=...), and cut each reply before the first."""
    if chat is not None:
        return chat.stop_ids
    return [] if tok.eot_id is None else [tok.eot_id]


def instruction_messages(example: dict) -> list[dict]:
    """An Alpaca record {instruction, input} as a chat: one user message (the input, if any, after a blank line)."""
    content = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    return [{"role": "user", "content": content}]


def dialogue_messages(turns) -> list[dict]:
    """prepare_data.parse_dialogue's [(role, text)] (each text after its marker, leading space kept) as a chat."""
    return [{"role": DIALOGUE_ROLES[role], "content": text.strip()} for role, text in turns]


# -----------------------------------------------------------------------------------------------
# 9. Command line

def _read_input_text(args):
    """The text to encode or show: --text, else the file --input, else standard input. Text that is not
    valid UTF-8 is one error naming where it came from and the line, before anything is printed."""
    if args.text is None and args.input is not None:
        return _read_text(args.input)
    if args.text is None:
        return _decode_utf8(sys.stdin.buffer.read(), "standard input")
    try:  # bytes of the command line that are not UTF-8 reach us as lone surrogates
        args.text.encode("utf-8")
    except UnicodeEncodeError as e:
        line = args.text.count("\n", 0, e.start) + 1
        raise ValueError(f"--text, line {line}: not valid UTF-8 (character {e.start + 1})") from None
    return args.text


def cmd_train(args):
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir {out}: exists and is not a directory")
    tok = Tokenizer.train([Path(p) for p in args.input], args.vocab_size, pattern=args.pattern,
                          special_tokens=args.special, verbose=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"saved {tok} to {out}/tokenizer.bpe and {out}/tokenizer.tiktoken", file=sys.stderr)


def cmd_encode(args):
    tok = load_bpe(args.tokenizer, args.pattern, args.trust_pattern)
    if args.allow_special:
        allowed = "all"
    else:
        allowed = set()
    text = _read_input_text(args)
    try:
        if args.fast:
            ids = tok.to_tiktoken().encode(text, allowed_special=allowed)
        else:
            ids = tok.encode(text, allowed_special=allowed)
    except ValueError as e:
        raise ValueError(f"{e} On the command line: --allow_special.") from None
    print(" ".join(map(str, ids)))


def cmd_decode(args):
    tok = load_bpe(args.tokenizer, args.pattern, args.trust_pattern)
    if args.ids is not None:
        raw = args.ids
    elif args.input is not None:
        raw = _read_text(args.input)
    else:
        raw = _decode_utf8(sys.stdin.buffer.read(), "standard input")
    try:
        ids = [int(x) for x in raw.split()]
    except ValueError:
        raise ValueError("expected token ids: integers separated by spaces") from None
    text = tok.decode(ids)
    if args.ids is not None:  # ids typed on the command line: end the line; from a file: the text exactly
        text += "\n"
    sys.stdout.write(text)


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
    p.add_argument("--out_dir", "--out", required=True, help="directory for tokenizer.bpe and tokenizer.tiktoken")
    p.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4", "none"],
                   help="pre-split regex (default: gpt4; none = no split)")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"],
                   help="special tokens, given the ids after the merges (default: <|endoftext|>)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress messages")
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
        p.add_argument("--trust_pattern", action=argparse.BooleanOptionalAction, default=False,
                       help="accept a tokenizer file's custom split regex")
        if name == "encode":
            p.add_argument("--allow_special", action=argparse.BooleanOptionalAction, default=False,
                           help="encode special-token strings as special tokens (default: error)")
            p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                           help="encode with the tiktoken export")
        elif name == "show":
            p.add_argument("--sep", default="|", help="boundary marker (default: |)")
            p.add_argument("--ids", action=argparse.BooleanOptionalAction, default=False,
                           help="list one token per line with its id")
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
