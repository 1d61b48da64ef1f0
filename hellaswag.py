"""
hellaswag.py: HellaSwag evaluation that agrees with lm-evaluation-harness, for our checkpoints and
any Hugging Face causal LM.

HellaSwag (Zellers et al., 2019) gives a context and four endings; the model should find the right
one most likely. Two scorings are in use, and their numbers differ (GPT-2 124M: 0.311 vs 0.2955), so
every result names its scoring:

  harness  (default) lm-evaluation-harness's `hellaswag` task: query = "<activity_label>: <ctx_a>
           <Ctx_b>" with WikiHow's bracketed artefacts removed; each ending is scored as the
           continuation " " + ending; acc = argmax of the summed log-likelihood, acc_norm = argmax of
           the log-likelihood divided by the ending's length in characters.
  nanogpt  build-nanogpt's hellaswag.py: raw `ctx`, ending " " + ending, acc_norm = argmin of the
           average per-token loss of the ending (acc = argmin of the summed loss).

Run it:
    python prepare_data.py hellaswag                       # fetch hellaswag_val.jsonl (10,042 items)
    python hellaswag.py --init_from gpt2                   # harness scoring, OpenAI's GPT-2 124M
    python hellaswag.py --init_from gpt2 --scoring nanogpt
    python hellaswag.py --init_from out/ckpt/model --limit 1000 --per_item items.jsonl
    python hellaswag.py --init_from path/to/any_hf_causal_lm --json result.json
    torchrun --nproc_per_node=8 hellaswag.py --init_from gpt2-medium    # shards the items
    python hellaswag.py --bench                            # batched vs one ending per forward pass
    python hellaswag.py --help

Use it (train_gpt2.py does, in its eval step):
    from hellaswag import load_examples, evaluate
    examples = load_examples("data/hellaswag/hellaswag_val.jsonl")
    r = evaluate(model, tokenizer, examples, scoring="harness")   # r["acc_norm"], r["acc"], ...

Reading order: 1. data (download, load_examples), 2. turning an item into four (context tokens,
continuation tokens) requests, 3. scoring requests in batches, 4. evaluate (sharding, metrics),
5. loading models, 6. benchmark, 7. the CLI.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, load_tokenizer

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "data" / "hellaswag"
SCORINGS = ("harness", "nanogpt")

# -----------------------------------------------------------------------------------------------
# 1. Data


def download(cache_dir=DEFAULT_CACHE_DIR, url: str = HELLASWAG_VAL_URL) -> Path:
    """Fetch the HellaSwag validation set into cache_dir (skipped when already there) and return
    its path. Written to a temporary name and renamed, so an interrupted download never leaves a
    truncated file that later runs would take for the whole set."""
    import requests

    cache_dir = Path(cache_dir)
    dest = cache_dir / Path(url).name
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with requests.get(url, stream=True, timeout=60) as r:
                r.raise_for_status()
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        os.replace(tmp, dest)
    except requests.RequestException as e:
        raise RuntimeError(f"could not download {url} ({type(e).__name__}: {e}). Offline? Fetch it on a "
                           f"machine with internet and put it at {dest}, or pass --data_file.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def load_examples(path) -> list[dict]:
    """Read HellaSwag items from a .jsonl file (the public hellaswag_*.jsonl, or rows of HF
    `datasets`' Rowan/hellaswag written with to_json, where label is a string) or a .parquet file
    (the hub's Rowan/hellaswag files). Each item comes back with label as an int and ctx filled in.
    Bad input raises ValueError naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (fetch it with `python prepare_data.py hellaswag`, "
                                f"or pass --data_file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}: row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rows.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return [_check_example(row, where) for where, row in rows]


def _check_example(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("activity_label", "ctx_a", "ctx_b", "endings", "label"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r} (HellaSwag items need activity_label, "
                             f"ctx_a, ctx_b, endings, label)")
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
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
# 2. From an item to four (context tokens, continuation tokens) requests


def preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag preprocessing (lm_eval/tasks/hellaswag/utils.py): the
    brackets are artefacts of the WikiHow part of HellaSwag ("[title]", "[header]", "[step]")."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def harness_query(ex: dict) -> str:
    """The harness's doc_to_text: activity label, then the context with ctx_b capitalised."""
    return preprocess(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())


def harness_choices(ex: dict) -> list[str]:
    return [preprocess(e) for e in ex["endings"]]


def _encoder(tokenizer):
    """encode_batch(list[str]) -> list[list[int]] for our TextTokenizer or a transformers tokenizer
    (without special tokens: the harness adds no BOS for causal models unless asked)."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch
    return lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def build_requests(examples: list[dict], tokenizer, scoring: str = "harness", bos_id: int | None = None):
    """For each item, four requests (context_ids, continuation_ids, norm_length).

    harness: context = the query, continuation = " " + ending (the harness's default target
    delimiter). Like the harness (TemplateLM._encode_pair), trailing spaces of the context move to
    the continuation, then the whole string is encoded and split at the context's token count:
    BPE merges across the boundary, so encode(context) + encode(continuation) would be a different
    (and less likely) tokenization than the one the model saw in training. norm_length = the
    preprocessed ending's length in characters: acc_norm divides by characters, not tokens, so that
    the normalisation does not depend on the tokenizer and different models stay comparable.
    nanogpt: context = encode(ctx), continuation = encode(" " + ending), norm_length = its number of
    tokens (average per-token log-likelihood), as build-nanogpt does.
    bos_id: optionally put this token before every context (harness add_bos_token=True)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}: expected one of {SCORINGS}")
    encode_batch = _encoder(tokenizer)
    bos = [] if bos_id is None else [bos_id]
    out = []
    if scoring == "harness":
        texts, pairs = [], []
        for ex in examples:
            query, choices = harness_query(ex), harness_choices(ex)
            for choice in choices:
                context, continuation = query, " " + choice
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
                texts += [context + continuation, context]
                pairs.append(len(choice))
        enc = encode_batch(texts)
        for k, n_chars in enumerate(pairs):
            whole, ctx = enc[2 * k], enc[2 * k + 1]
            out.append((bos + ctx, whole[len(ctx):], float(n_chars)))
    else:
        enc = encode_batch([t for ex in examples for t in [ex["ctx"]] + [" " + e for e in ex["endings"]]])
        for i in range(len(examples)):
            ctx = enc[5 * i]
            for cont in enc[5 * i + 1: 5 * i + 5]:
                out.append((bos + ctx, cont, float(len(cont))))
    for ctx, cont, _ in out:
        if not ctx or not cont:
            raise ValueError("an item tokenized to an empty context or ending; is the tokenizer right?")
    return out


# -----------------------------------------------------------------------------------------------
# 3. Scoring requests in batches


def _unwrap(model):
    """The plain module under DDP (.module) or torch.compile (._orig_mod): evaluation needs no
    gradient sync, and variable batch shapes would make a compiled model recompile."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def context_length(model) -> int:
    """How many positions the model can attend over (GPT: block_size; HF: n_positions & co)."""
    if isinstance(model, GPT):
        return model.config.block_size
    c = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(c, name, None):
            return int(getattr(c, name))
    return 2048  # the harness's default when the config says nothing


def _select_logits(model, idx, rows, cols):
    """Logits (N, vocab) at positions (rows[k], cols[k]) of the batch idx (B, T), in float32.
    Our GPT: run the transformer, then the output layer only where a continuation token is
    predicted: at ~70% context tokens that skips most of the biggest matmul and log-softmax.
    HF: the model's own forward (no attention mask is needed: the padding is on the right and
    attention is causal, so no real position ever sees a padded one)."""
    if isinstance(model, GPT):
        h = model.hidden_states(idx)
        return _at_least_fp32(model.logits_from_hidden(h[rows, cols]))
    kwargs = {}
    keep = idx.size(1) - int(cols.min())
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep  # only the last `keep` positions: saves a (B, T, vocab) tensor
    logits = model(input_ids=idx, **kwargs).logits
    return _at_least_fp32(logits[rows, cols - (idx.size(1) - logits.size(1))])


def _at_least_fp32(x):
    # a log-softmax over tens of thousands of classes needs float32; float64 models stay float64
    return x if x.dtype == torch.float64 else x.float()


def _logprobs(logits, targets):
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def score_requests(model, requests, batch_size: int = 64, device=None, progress=None,
                   share_context: bool = True) -> list[float]:
    """Summed log-likelihood of each request's continuation given its context.

    batch_size requests (sequences) run per forward pass: one big matmul per layer instead of many
    small ones keeps the hardware busy. With our GPT and share_context, requests with the same
    context (the four endings of an item) are scored by running the context once into a KV cache
    and then only the four continuations on top of it (see _score_shared): the context is most of
    the tokens, so this does about 2-3x less work. Everything else (HF models, items longer than the
    model's context) goes through _score_rows. progress(indices) is called as requests finish."""
    model = _unwrap(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = context_length(model)
    scores = [0.0] * len(requests)
    groups, rest = [], list(range(len(requests)))
    if share_context and isinstance(model, GPT) and batch_size >= 4:
        groups, rest = _context_groups(requests, max_len)
        _score_shared(model, requests, groups, batch_size, max_len, device, scores, progress)
    _score_rows(model, requests, rest, batch_size, max_len, device, scores, progress)
    return scores


def _score_rows(model, requests, which, batch_size, max_len, device, scores, progress):
    """One row per request. Inputs follow the harness: (context + continuation)[-(max_len + 1):][:-1],
    so over-long items lose their oldest context tokens. Rows are sorted by length (longest first,
    so an out-of-memory shows at once; and similar lengths keep the padding small) and
    right-padded."""
    inputs, n_cont = {}, {}
    for i in which:
        ctx, cont, _ = requests[i]
        inputs[i] = (ctx + cont)[-(max_len + 1):][:-1]
        n_cont[i] = min(len(cont), len(inputs[i]))
    order = sorted(which, key=lambda i: -len(inputs[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        idx = torch.zeros(len(chunk), len(inputs[chunk[0]]), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, i in enumerate(chunk):
            inp = inputs[i]
            idx[b, :len(inp)] = torch.tensor(inp)
            # position p predicts token p+1: the continuation's tokens are predicted by the last
            # n_cont input positions (the final token is never fed in, it is only a target)
            rows += [b] * n_cont[i]
            cols += range(len(inp) - n_cont[i], len(inp))
            targets += requests[i][1][-n_cont[i]:]
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        logp = _logprobs(_select_logits(model, idx.to(device), rows_t, cols_t), torch.tensor(targets, device=device))
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rows_t, logp.double())
        for i, v in zip(chunk, sums.tolist()):
            scores[i] = v
        if progress is not None:
            progress(chunk)


def _context_groups(requests, max_len):
    """Runs of consecutive requests with the same context whose every context + continuation fits
    the model; the requests left over are scored row by row."""
    groups, rest, i = [], [], 0
    while i < len(requests):
        j = i + 1
        while j < len(requests) and requests[j][0] == requests[i][0]:
            j += 1
        g = list(range(i, j))
        fits = all(len(requests[r][0]) + len(requests[r][1]) <= max_len for r in g)
        (groups.append(g) if fits else rest.extend(g))
        i = j
    return groups, rest


def _score_shared(model: GPT, requests, groups, batch_size, max_len, device, scores, progress):
    """Contexts once, continuations on top. Per batch: the groups' contexts, LEFT-padded (what
    model.py's attention_mask supports), fill a KV cache; the cache rows are repeated once per
    continuation; the continuations, right-padded, run with the cache. Continuation token 0 is
    predicted by the context's last position, token j > 0 by continuation position j - 1."""
    order = sorted(groups, key=lambda g: -len(requests[g[0]][0]))
    c = model.config
    w = model.transformer.wte.weight
    dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
    k = 0
    while k < len(order):
        chunk, n_rows, Lc, Le = [], 0, len(requests[order[k][0]][0]), 0
        while k < len(order):
            g = order[k]
            le = max(Le, max(len(requests[r][1]) for r in g))
            if chunk and (n_rows + len(g) > batch_size or Lc + le > max_len):
                break
            chunk.append(g)
            n_rows, Le, k = n_rows + len(g), le, k + 1
        G, R = len(chunk), n_rows
        ctx_idx = torch.zeros(G, Lc, dtype=torch.long)
        ctx_mask = torch.zeros(G, Lc, dtype=torch.long)
        for b, g in enumerate(chunk):
            ctx = requests[g[0]][0]
            ctx_idx[b, Lc - len(ctx):] = torch.tensor(ctx)
            ctx_mask[b, Lc - len(ctx):] = 1
        owner = torch.tensor([b for b, g in enumerate(chunk) for _ in g])
        flat = [r for g in chunk for r in g]
        cont_idx = torch.zeros(R, Le, dtype=torch.long)
        cont_mask = torch.zeros(R, Le, dtype=torch.long)
        for row, r in enumerate(flat):
            cont = requests[r][1]
            cont_idx[row, :len(cont)] = torch.tensor(cont)
            cont_mask[row, :len(cont)] = 1
        ctx_idx, ctx_mask, cont_idx, cont_mask, owner = (t.to(device) for t in
                                                         (ctx_idx, ctx_mask, cont_idx, cont_mask, owner))
        cache = KVCache(c, G, Lc + Le, device, dtype)
        h_ctx = model.hidden_states(ctx_idx, ctx_mask, cache)[:, -1]  # (G, C); left padding: -1 is real
        cache.reorder(owner)  # now one cache row per continuation
        h_cont = model.hidden_states(cont_idx, torch.cat([ctx_mask[owner], cont_mask], 1), cache)  # (R, Le, C)
        h = torch.cat([h_ctx[owner][:, None], h_cont[:, :-1]], 1)  # h[r, j] predicts continuation token j
        rows, cols = cont_mask.nonzero(as_tuple=True)
        logits = _at_least_fp32(model.logits_from_hidden(h[rows, cols]))
        logp = _logprobs(logits, cont_idx[rows, cols])
        sums = torch.zeros(R, dtype=torch.float64, device=device).index_add_(0, rows, logp.double())
        for r, v in zip(flat, sums.tolist()):
            scores[r] = v
        if progress is not None:
            progress(flat)


# -----------------------------------------------------------------------------------------------
# 4. evaluate: items -> acc, acc_norm, their standard errors


def _argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # the first of equal maxima, like np.argmax


def _mean_stderr(k: float, n: float) -> float:
    """Standard error of a mean of n 0/1 outcomes with k ones: sample std / sqrt(n), the harness's
    mean_stderr. For 0/1 values the sample variance is n p (1-p) / (n-1), so sums are enough
    (which is what lets sharded runs reduce three numbers instead of gathering every outcome)."""
    if n < 2:
        return float("nan")
    p = k / n
    return math.sqrt(p * (1 - p) / (n - 1))


def default_batch_size(device) -> int:
    """Sequences per forward pass when none is given. A GPU needs many rows to be busy. A CPU is
    compute-bound already at one sequence, and there big batches only add padding and intermediate
    tensors that fall out of the cache: 8 rows (two items) measured ~1.3x faster than 64 on the
    2-core development CPU (GPT-2 124M shape)."""
    return 8 if torch.device(device).type == "cpu" else 64


def evaluate(model, tokenizer, examples: list[dict], scoring: str = "harness", batch_size: int | None = None,
             device=None, rank: int = 0, world_size: int = 1, progress: bool = False,
             return_items: bool = False, bos_id: int | None = None, share_context: bool = True) -> dict:
    """Score HellaSwag items with `model` (our GPT, or any transformers causal LM; DDP- or
    compile-wrapped is fine) and `tokenizer` (model.load_tokenizer's TextTokenizer, or a
    transformers tokenizer). batch_size: sequences (item x ending) per forward pass (default:
    default_batch_size(device)). share_context:
    with our GPT, run each item's context once for its four endings (a KV cache; same scores).

    With world_size > 1 and torch.distributed initialised, this rank scores examples[rank::world_size]
    and the counts are all-reduced, so every rank returns the same totals (and, with return_items,
    every item). Returns {acc, acc_norm, acc_stderr, acc_norm_stderr, n, scoring, seconds} (+ items:
    per item idx, label, ll (summed log-likelihoods), norm (lengths acc_norm divides by), pred,
    pred_norm)."""
    t0 = time.time()
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size={world_size} but torch.distributed is not initialised "
                         f"(run under torchrun, or call init_process_group first)")
    inner = _unwrap(model)
    if batch_size is None:
        batch_size = default_batch_size(device if device is not None else next(inner.parameters()).device)
    was_training = inner.training
    inner.eval()
    mine = list(range(rank, len(examples), world_size))
    requests = build_requests([examples[i] for i in mine], tokenizer, scoring, bos_id)
    vocab = inner.config.vocab_size
    top = max((t for ctx, cont, _ in requests for t in ctx + cont), default=-1)
    if top >= vocab:
        raise ValueError(f"the tokenizer ({getattr(tokenizer, 'name', type(tokenizer).__name__)}) gives token id "
                         f"{top} but the model's vocabulary has {vocab} ids: wrong tokenizer for this model?")

    bar, tick = None, None
    if progress and rank == 0:
        from tqdm import tqdm

        # an item is done when all four of its endings are (rows finish out of order: length-sorted)
        left = [4] * len(mine)
        bar = tqdm(total=len(mine), unit="item", desc=f"hellaswag {scoring}", file=sys.stderr)

        def tick(chunk):
            done = 0
            for r in chunk:
                left[r // 4] -= 1
                done += left[r // 4] == 0
            bar.update(done)
    try:
        lls = score_requests(inner, requests, batch_size, device, tick, share_context)
    finally:
        if bar is not None:
            bar.close()
        inner.train(was_training)

    items = []
    for j, i in enumerate(mine):
        ll = lls[4 * j: 4 * j + 4]
        norm = [r[2] for r in requests[4 * j: 4 * j + 4]]
        items.append(dict(idx=i, label=examples[i]["label"], ll=ll, norm=norm, pred=_argmax(ll),
                          pred_norm=_argmax([a / b for a, b in zip(ll, norm)])))
    counts = [len(items), sum(it["pred"] == it["label"] for it in items),
              sum(it["pred_norm"] == it["label"] for it in items)]
    if world_size > 1:
        dist = torch.distributed
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        where = next(inner.parameters()).device if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(counts, dtype=torch.float64, device=where)
        dist.all_reduce(t)
        counts = [int(round(x)) for x in t.tolist()]
        if return_items:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, items)
            items = sorted((it for part in gathered for it in part), key=lambda it: it["idx"])
    n, k, k_norm = counts
    result = dict(acc=k / max(n, 1), acc_norm=k_norm / max(n, 1), acc_stderr=_mean_stderr(k, n),
                  acc_norm_stderr=_mean_stderr(k_norm, n), n=n, scoring=scoring,
                  seconds=round(time.time() - t0, 3))
    if return_items:
        result["items"] = items
    return result


def summary_line(r: dict) -> str:
    rate = r["n"] / r["seconds"] if r.get("seconds") else float("nan")
    return (f"hellaswag scoring={r['scoring']} n={r['n']} acc={r['acc']:.4f} ± {r['acc_stderr']:.4f} "
            f"acc_norm={r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f} seconds={r['seconds']:.1f} "
            f"({rate:.1f} items/s)")


# -----------------------------------------------------------------------------------------------
# 5. Loading a model and its tokenizer


def load_model(init_from: str, tokenizer: str | None = None, backend: str = "auto", device="cpu",
               dtype=torch.float32):
    """(model, tokenizer) for a GPT-2 name, a hub id, a local HF directory or our checkpoint dir.
    backend auto: our GPT (model.py) for our format and for HF model types gpt2/llama, else
    transformers' AutoModelForCausalLM; "ours" / "hf" force one. The tokenizer: --tokenizer if
    given, else the model directory's own (dir or dir/tokenizer/), else GPT-2's."""
    if backend not in ("auto", "ours", "hf"):
        raise ValueError(f"backend={backend!r}: expected auto, ours or hf")
    path = Path(init_from).expanduser()
    local = path.is_dir()
    use_hf = backend == "hf"
    if backend == "auto" and local and not (path / "gpt_config.json").exists() and (path / "config.json").exists():
        use_hf = json.loads((path / "config.json").read_text()).get("model_type") not in ("gpt2", "llama")
    if use_hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path) if local else init_from, dtype=dtype)
        model = model.to(device).eval()
    else:
        try:
            model = GPT.from_pretrained(str(path) if local else init_from, dtype=dtype, device=device)
        except ValueError as e:  # a hub id of a type model.py does not implement
            if backend == "ours" or local or "is not supported" not in str(e):
                raise
            return load_model(init_from, tokenizer, "hf", device, dtype)
    if tokenizer is None and not local and not init_from.startswith("gpt2"):
        from transformers import AutoTokenizer  # a hub model: its own tokenizer

        return model, AutoTokenizer.from_pretrained(init_from)
    return model, load_tokenizer(tokenizer, str(path) if local else None)


def bos_token_id(tokenizer, *dirs) -> int | None:
    """What the harness's add_bos_token=True puts first: the HF tokenizer's BOS when the tokenizer
    (or a tokenizer directory among dirs) has one (LLaMA's <s>), else end-of-text (GPT-2 uses
    <|endoftext|> as its BOS too)."""
    if getattr(tokenizer, "bos_token_id", None) is not None:
        return tokenizer.bos_token_id
    for d in dirs:
        for cand in ((Path(d), Path(d) / "tokenizer") if d and Path(d).is_dir() else ()):
            if (cand / "tokenizer_config.json").exists():
                from transformers import AutoTokenizer

                bos = AutoTokenizer.from_pretrained(str(cand)).bos_token_id
                if bos is not None:
                    return bos
    return getattr(tokenizer, "eot_id", None)


# -----------------------------------------------------------------------------------------------
# 6. Benchmark: batched scoring vs one ending per forward pass


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """Items with HellaSwag's shape and roughly its lengths (contexts of 15-90 words, endings of
    8-30), for timing when the real file is not at hand. Scores on them mean nothing."""
    rng = random.Random(seed)
    words = ("the a man woman is are then he she they it with on in into of to and holds runs takes "
             "water ball rope kitchen paint brush camera hair dog car table floor wall shows puts "
             "continues starts begins while after slowly quickly several people outside inside").split()
    say = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    return [_check_example(dict(activity_label=say(1, 3).title(), ctx_a=say(15, 80) + ".", ctx_b=say(0, 10),
                                endings=[say(8, 30) + "." for _ in range(4)], label=rng.randrange(4)),
                           f"synthetic {i}") for i in range(n)]


@torch.no_grad()
def _naive_predictions(model, tokenizer, examples, scoring, device=None):
    """The straightforward loop the benchmark compares with: for each ending, one forward pass of
    context + ending, log-softmax over every position, sum over the ending's tokens."""
    model = _unwrap(model)
    device = device or next(model.parameters()).device
    requests = build_requests(examples, tokenizer, scoring)
    lls = []
    for ctx, cont, _ in requests:
        idx = torch.tensor([ctx + cont], device=device)
        logits = model(idx)[0] if isinstance(model, GPT) else model(input_ids=idx).logits
        logp = F.log_softmax(_at_least_fp32(logits[0, :-1]), dim=-1)
        tgt = idx[0, 1:]
        lls.append(float(logp.gather(1, tgt[:, None])[-len(cont):].sum()))
    out = []
    for i in range(len(examples)):
        ll = lls[4 * i:4 * i + 4]
        norm = [requests[4 * i + j][2] for j in range(4)]
        out.append((_argmax(ll), _argmax([a / b for a, b in zip(ll, norm)])))
    return out


def work_ratios(model: GPT, requests) -> dict:
    """Multiply-adds of each benchmark variant relative to the shipped one, from token counts alone:
    every weight of the blocks is used once per token that runs through them, and the output layer's
    once per position whose logits are computed (attention scores and padding left out). On hardware
    that is compute-bound already at one sequence (a CPU), these ratios bound the possible speed-ups;
    batching can add more only where one short sequence leaves the device idle (a GPU)."""
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    head = model.lm_head.weight.numel()
    ctx = sum(len(requests[i][0]) for i in range(0, len(requests), 4))
    cont = sum(len(r[1]) for r in requests)
    every = sum(len(r[0]) + len(r[1]) for r in requests)
    shared = ctx * blocks + cont * (blocks + head)  # contexts once, logits only for ending tokens
    return {"naive": every * (blocks + head) / shared,  # every position through blocks and output layer
            "one ending per forward": (every * blocks + cont * head) / shared}


def bench(model, tokenizer, examples, batch_size: int, repeats: int, scoring: str, device=None):
    """Items/s of evaluate() as shipped (batched, each context run once), batched without sharing
    the context, and one ending per forward pass; interleaved (A B C A B C ...) so that a change in
    machine load hits all alike; medians and ratios to the one-ending-per-forward baseline."""
    batch_size = batch_size or default_batch_size(device or next(_unwrap(model).parameters()).device)
    variants = {f"batched, shared context (batch_size={batch_size})": dict(batch_size=batch_size),
                f"batched rows (batch_size={batch_size}, share_context=False)":
                    dict(batch_size=batch_size, share_context=False),
                "one ending per forward (batch_size=1)": dict(batch_size=1, share_context=False)}
    naive = "naive: one ending per forward, logits at every position"
    evaluate(model, tokenizer, examples[:4], scoring, batch_size, device)  # warm-up (allocator, kernels)
    rates = {name: [] for name in list(variants) + [naive]}
    results = {}
    for rep in range(repeats):
        for name, kw in variants.items():
            r = evaluate(model, tokenizer, examples, scoring, device=device, **kw)
            rates[name].append(r["n"] / r["seconds"])
            results[name] = (r["acc"], r["acc_norm"])
            print(f"  rep {rep + 1}/{repeats} {name}: {rates[name][-1]:.2f} items/s", flush=True)
        t0 = time.perf_counter()
        preds = _naive_predictions(model, tokenizer, examples, scoring, device)
        rates[naive].append(len(examples) / (time.perf_counter() - t0))
        print(f"  rep {rep + 1}/{repeats} {naive}: {rates[naive][-1]:.2f} items/s", flush=True)
    base_preds = evaluate(model, tokenizer, examples, scoring, device=device, return_items=True)["items"]
    agree = preds == [(it["pred"], it["pred_norm"]) for it in base_preds]
    med = {name: sorted(v)[len(v) // 2] for name, v in rates.items()}
    for name, m in med.items():
        print(f"median {m:8.2f} items/s  {m / med[naive]:5.2f}x  {name}")
    print(f"(ratios to the naive loop: a plain model(ctx + ending) per ending, full logits, log-softmax "
          f"everywhere; its predictions equal evaluate()'s: {agree})")
    base = med["one ending per forward (batch_size=1)"]
    for name, m in med.items():
        print(f"median {m:8.2f} items/s  {m / base:5.2f}x  {name}  (vs one ending per forward, logits where needed)")
    print(f"same acc/acc_norm in every variant: {len(set(results.values())) == 1} {next(iter(results.values()))}")
    if isinstance(_unwrap(model), GPT):
        w = work_ratios(_unwrap(model), build_requests(examples, tokenizer, scoring))
        print(f"arithmetic bound (multiply-adds relative to the shipped evaluation, see work_ratios): naive "
              f"{w['naive']:.2f}x, one ending per forward {w['one ending per forward']:.2f}x: on a device that "
              f"is compute-bound at one sequence, no batching beats these")
    return med


# -----------------------------------------------------------------------------------------------
# 7. CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="HellaSwag evaluation (lm-evaluation-harness or build-nanogpt "
                                             "scoring) of our checkpoints and Hugging Face causal LMs.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init_from", default="gpt2",
                    help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF hub id, a local HF model directory, or "
                         "our checkpoint directory (gpt_config.json + model.safetensors, e.g. out/ckpt/model)")
    ap.add_argument("--data_file", default=None,
                    help="HellaSwag items (.jsonl in the public or HF Rowan/hellaswag schema, or .parquet); "
                         "default: hellaswag_val.jsonl in --cache_dir, downloaded if missing")
    ap.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="where the download goes")
    ap.add_argument("--scoring", default="harness", choices=SCORINGS,
                    help="harness: lm-evaluation-harness's hellaswag (acc_norm divides by characters); "
                         "nanogpt: build-nanogpt's (acc_norm = lowest average per-token loss)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N items")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="sequences (item x ending, 4 per item) per forward pass (default: 64 on a GPU, 8 on "
                         "a CPU, see default_batch_size)")
    ap.add_argument("--tokenizer", default=None,
                    help="'gpt2', a .tiktoken rank file, a bpe.py or HF tokenizer directory (default: the "
                         "model directory's own tokenizer, else GPT-2's)")
    ap.add_argument("--backend", default="auto", choices=["auto", "ours", "hf"],
                    help="auto: model.py for our format and HF gpt2/llama, transformers for other types")
    ap.add_argument("--add_bos", action="store_true",
                    help="put the tokenizer's BOS token (else end-of-text) before every context, like the "
                         "harness's add_bos_token=True (off by default, as the harness does for causal LMs)")
    ap.add_argument("--device", default=None, help="cpu|cuda|mps (default: cuda if available; cuda:LOCAL_RANK "
                                                   "under torchrun)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weight dtype; auto = bfloat16 on a GPU that has it, else float32 (log-softmax is "
                         "always float32)")
    ap.add_argument("--json", default=None, help="write the result dict to this file")
    ap.add_argument("--per_item", default=None,
                    help="write one jsonl line per item (idx, label, ll, norm, pred, pred_norm)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--seed", type=int, default=0, help="seed (only the benchmark's random model uses it)")
    ap.add_argument("--bench", action="store_true",
                    help="time batched scoring vs one ending per forward pass (interleaved, medians) and exit")
    ap.add_argument("--bench_preset", default=None,
                    help="--bench on a randomly initialised GPTConfig preset (e.g. gpt2, small-cpu) instead "
                         "of --init_from, with GPT-2's tokenizer")
    ap.add_argument("--bench_items", type=int, default=32,
                    help="--bench: items per run (synthetic HellaSwag-shaped ones unless --data_file)")
    ap.add_argument("--bench_repeats", type=int, default=3, help="--bench: runs of each variant")
    args = ap.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if world_size > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, dtype)
    torch.manual_seed(args.seed)

    if args.bench and args.bench_preset:
        tokenizer = load_tokenizer(args.tokenizer or "gpt2")
        config = GPTConfig.preset(args.bench_preset, vocab_size=tokenizer.n_vocab)
        model = GPT(config).to(device=device, dtype=dtype).eval()
    else:
        model, tokenizer = load_model(args.init_from, args.tokenizer, args.backend, device, dtype)
    bos_id = None
    if args.add_bos:
        bos_id = bos_token_id(tokenizer, args.tokenizer, args.init_from)
        if bos_id is None:
            raise ValueError("--add_bos: this tokenizer has no BOS / end-of-text token")

    if args.bench:
        examples = (load_examples(args.data_file) if args.data_file else synthetic_examples(args.bench_items))
        examples = examples[:args.bench_items]
        print(f"bench: {len(examples)} items, scoring={args.scoring}, device={device}, dtype={dtype}, "
              f"threads={torch.get_num_threads()}, model={args.bench_preset or args.init_from}")
        bench(model, tokenizer, examples, args.batch_size, args.bench_repeats, args.scoring, device)
        return

    if args.data_file:
        data_file = Path(args.data_file)
    elif rank == 0:
        data_file = download(args.cache_dir)
    else:
        data_file = Path(args.cache_dir) / Path(HELLASWAG_VAL_URL).name
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 may have been downloading
    examples = load_examples(data_file)
    if args.limit is not None:
        examples = examples[:args.limit]

    result = evaluate(model, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                      progress=not args.no_progress, return_items=bool(args.per_item), bos_id=bos_id)
    items = result.pop("items", None)
    if rank == 0:
        print(summary_line(result) + f" model={args.init_from} data={data_file}")
        if args.json:
            Path(args.json).write_text(json.dumps({**result, "model": args.init_from, "data_file": str(data_file)},
                                                  indent=2) + "\n")
        if args.per_item:
            with open(args.per_item, "w") as f:
                for it in items:
                    f.write(json.dumps(it) + "\n")
    if world_size > 1:
        # every rank waits for rank 0's writing: a rank that tears down its gloo group while another
        # still talks to it can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
