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
    python hellaswag.py                                    # offline: the life cycle's models, each stage's
    python hellaswag.py --init_from out/cpu                # a model here, offline: the built-in items
    python hellaswag.py --init_from out/ckpt/model --data_file data/hellaswag/hellaswag_val.jsonl --limit 1000
    python hellaswag.py --init_from path/to/any_hf_causal_lm --data_file data/hellaswag/hellaswag_val.jsonl
    torchrun --nproc_per_node=8 hellaswag.py --init_from gpt2-medium    # shards the items
    python hellaswag.py --help
(Speed, batched against one ending per forward pass: `python bench_speed.py hellaswag`.)

Use it (train_gpt2.py does, in its eval step):
    from prepare_data import load_hellaswag
    from hellaswag import evaluate
    examples = load_hellaswag("data/hellaswag/hellaswag_val.jsonl")
    r = evaluate(model, tokenizer, examples, scoring="harness")   # r["acc_norm"], r["acc"], ...

Reading order: 1. turning an item into four (context tokens, continuation tokens) requests,
2. scoring requests in batches, 3. evaluate (sharding, metrics), 4. loading models, 5. the CLI.
(The items themselves are read and checked by prepare_data.py.)
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bpe import load_tokenizer

from housekeeping import atomic_write
from model import GPT, KVCache
from housekeeping import (DEVICE_HELP, ArgumentParser, DefaultsHelp, bounded, end_distributed, init_distributed,
                          mean_stderr, pick_device, pick_precision, previous_stage, resolve_init_from, run_main,
                          write_jsonl)
from prepare_data import HELLASWAG_VAL_URL, builtin_tasks, download_hellaswag, load_hellaswag
SCORINGS = ("harness", "nanogpt")
STAGE_MODELS = ("out-dpo/model", "out-finetune/best_model", "out/cpu/ckpt/model")  # the life cycle's, latest first

# -----------------------------------------------------------------------------------------------
# 1. From an item to four (context tokens, continuation tokens) requests


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
            # an empty ending has 0 characters: divided by 1 instead (the harness would divide by zero)
            out.append((bos + ctx, whole[len(ctx):], float(max(n_chars, 1))))
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
# 2. Scoring requests in batches


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
# 3. evaluate: items -> acc, acc_norm, their standard errors


def _argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # the first of equal maxima, like np.argmax


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
    compile-wrapped is fine) and `tokenizer` (bpe.load_tokenizer's TextTokenizer, or a
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
    # standard errors from sums (for 0/1 outcomes the sum of squares is the sum): the harness's
    # mean_stderr, and sharded runs reduce three numbers instead of gathering every outcome
    se = lambda k: mean_stderr(k, k, n)[1] if n > 1 else None  # noqa: E731  (no spread from one item)
    result = dict(acc=k / max(n, 1), acc_norm=k_norm / max(n, 1), acc_stderr=se(k), acc_norm_stderr=se(k_norm), n=n,
                  scoring=scoring,
                  seconds=round(time.time() - t0, 3))
    if return_items:
        result["items"] = items
    return result


def summary_line(r: dict) -> str:
    rate = r["n"] / r["seconds"] if r.get("seconds") else float("nan")
    se = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return (f"hellaswag scoring={r['scoring']} n={r['n']} acc={r['acc']:.4f} ± {se(r['acc_stderr'])} "
            f"acc_norm={r['acc_norm']:.4f} ± {se(r['acc_norm_stderr'])} seconds={r['seconds']:.1f} "
            f"({rate:.1f} items/s)")


# -----------------------------------------------------------------------------------------------
# 4. Loading a model and its tokenizer


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
# 5. CLI


def main(argv=None):
    ap = ArgumentParser(description="HellaSwag evaluation (lm-evaluation-harness or build-nanogpt "
                                    "scoring) of our checkpoints and Hugging Face causal LMs.",
                        formatter_class=DefaultsHelp)
    ap.add_argument("--init_from", default="auto",
                    help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF hub id, a local HF model directory, our "
                         "checkpoint directory (e.g. out/ckpt/model), or a run directory (its best or final model); "
                         "auto: the last stage's model on this machine (out-dpo/model, out-finetune/best_model, "
                         "out/cpu/ckpt/model), the earlier stages' scored beside it, else gpt2")
    ap.add_argument("--data_file", default=None,
                    help="HellaSwag items (.jsonl in the public or HF Rowan/hellaswag schema, or .parquet); "
                         "default: for a model on this machine, the built-in multiple-choice set (offline); for a "
                         "hub model, hellaswag_val.jsonl in --cache_dir, downloaded if missing")
    ap.add_argument("--cache_dir", default="data/hellaswag", help="where the download goes")
    ap.add_argument("--scoring", default="harness", choices=SCORINGS,
                    help="harness: lm-evaluation-harness's hellaswag (acc_norm divides by characters); "
                         "nanogpt: build-nanogpt's (acc_norm = lowest average per-token loss)")
    ap.add_argument("--limit", type=bounded(int, 1), default=None, help="only the first N items")
    ap.add_argument("--batch_size", type=bounded(int, 1), default=None,
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
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weight dtype; auto = bfloat16 on a GPU with bf16 tensor cores, else float32 "
                         "(log-softmax is always float32)")
    ap.add_argument("--json", default=None, help="write the result dict to this file (offline life cycle: "
                                                 "out-hellaswag/summary.json)")
    ap.add_argument("--baseline", action="store_true",
                    help="also score a randomly initialised model of the same shape: the 'before' of --json, chance "
                         "made visible (on in the offline life cycle)")
    ap.add_argument("--per_item", default=None,
                    help="write one jsonl line per item (idx, label, ll, norm, pred, pred_norm)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    rank, _, world_size = init_distributed(device)
    stages = []  # the life cycle's other models, scored beside the one evaluated: what each stage did to it
    if args.init_from == "auto":
        args.init_from = previous_stage(*STAGE_MODELS) or "gpt2"
        stages = [m for m in reversed(STAGE_MODELS) if m != args.init_from and previous_stage(m)]
    args.init_from = resolve_init_from(args.init_from)  # a run directory: its best or final model
    if Path(args.init_from).expanduser().is_dir() and args.data_file is None:  # a model on this machine: offline
        args.data_file = str(builtin_tasks()["hellaswag"]) if rank == 0 else "data/builtin_tasks/hellaswag.jsonl"
        if rank == 0:
            print(f"offline default: {args.init_from} on the built-in multiple-choice set {args.data_file} "
                  f"(HellaSwag's schema); the real benchmark: `python prepare_data.py hellaswag`, then "
                  f"--data_file data/hellaswag/hellaswag_val.jsonl")
        args.baseline, args.json = True, args.json or "out-hellaswag/summary.json"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if pick_precision("auto", device) == "bf16" else "float32"
    model, tokenizer = load_model(args.init_from, args.tokenizer, args.backend, device, getattr(torch, dtype))
    bos_id = None
    if args.add_bos:
        bos_id = bos_token_id(tokenizer, args.tokenizer, args.init_from)
        if bos_id is None:
            raise ValueError("--add_bos: this tokenizer has no BOS / end-of-text token")
    if args.data_file:
        data_file = Path(args.data_file)
    elif rank == 0:
        data_file = download_hellaswag(args.cache_dir, flag="--data_file")
    else:
        data_file = Path(args.cache_dir) / Path(HELLASWAG_VAL_URL).name
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 may have been downloading
    examples = load_hellaswag(data_file)[: args.limit]

    before = None
    if args.baseline:  # the same shape, never trained: what the scoring gives by chance
        if not isinstance(model, GPT):
            raise ValueError("--baseline needs a model of model.py's GPT (--backend ours)")
        torch.manual_seed(0)
        before = evaluate(GPT(model.config).to(device=device, dtype=next(model.parameters()).dtype), tokenizer,
                          examples, args.scoring, args.batch_size, device, rank, world_size,
                          progress=not args.no_progress, bos_id=bos_id)
    result = evaluate(model, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                      progress=not args.no_progress, return_items=bool(args.per_item), bos_id=bos_id)
    items = result.pop("items", None)
    by_stage = {}
    for m in stages if Path(args.init_from).expanduser().is_dir() else []:
        other, _ = load_model(m, args.tokenizer, args.backend, device, getattr(torch, dtype))
        by_stage[m] = evaluate(other, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                               progress=not args.no_progress, bos_id=bos_id)["acc_norm"]
    by_stage[args.init_from] = result["acc_norm"]
    if rank == 0:
        # chance: one over the number of endings, averaged over the items (0.25 with HellaSwag's four)
        chance = sum(1 / len(ex["endings"]) for ex in examples) / max(len(examples), 1)
        if before:
            print(summary_line(before) + " model=(randomly initialised, the same shape)")
        print(summary_line(result) + f" model={args.init_from} data={data_file}")
        if before:
            print(f"before -> after (a random model -> {args.init_from}, {result['n']} items): acc_norm "
                  f"{before['acc_norm']:.3f} -> {result['acc_norm']:.3f} (chance {chance:.3f})")
        if len(by_stage) > 1:
            print("acc_norm by stage: " + ", ".join(f"{m} {a:.3f}" for m, a in by_stage.items()))
        if args.json:
            metrics = lambda r: {k: r[k] for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}  # noqa: E731
            extra = {"before": metrics(before), "after": metrics(result)} if before else {}
            extra.update({"by_stage": by_stage} if len(by_stage) > 1 else {})
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(args.json), lambda p: Path(p).write_text(json.dumps(
                {**result, "chance": chance, **extra, "model": args.init_from, "data_file": str(data_file)},
                indent=2) + "\n"))
            print(f"written: {args.json}")
        if args.per_item:
            write_jsonl(args.per_item, items)
    end_distributed()  # every rank waits for rank 0's writing


if __name__ == "__main__":
    run_main(main)
