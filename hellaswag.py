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
    python hellaswag.py                                    # offline: each stage's model on this machine
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

import argparse
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bpe import load_tokenizer
from model import GPT, LLAMA_FAMILIES, KVCache
from housekeeping import (DEVICE_HELP, ArgumentParser, DefaultsHelp, atomic_write, auto_init_from, bounded,
                          end_distributed, init_distributed, mean_stderr, pick_device, pick_precision, previous_stage,
                          resolve_init_from, run_main, write_jsonl)
from prepare_data import HELLASWAG_VAL_URL, builtin_tasks, download_hellaswag, load_hellaswag

SCORINGS = ("harness", "nanogpt")

# The life cycle's stages, in their order, and where each leaves its model (the first path found stands for
# the stage). --init_from auto scores the last stage's model and, beside it, each earlier stage's.
STAGES = {"pretrained": ("out/cpu/model", "out/cpu/ckpt/model"),  # ckpt/model: train_gpt2.py's older runs
          "instruction-tuned": ("out-finetune/best_model", "out-finetune/model"),
          "RL-tuned": ("out-rl/model",),
          "DPO-tuned": ("out-dpo/model",)}
STAGE_MODELS = tuple(m for paths in reversed(STAGES.values()) for m in paths)  # latest stage first
DEFAULT_JSON = "out-hellaswag/summary.json"  # the offline life cycle's result

# --precision: the weights' dtype. The old --dtype spellings are still accepted.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OLD_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

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
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
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
        if all(len(requests[r][0]) + len(requests[r][1]) <= max_len for r in g):
            groups.append(g)
        else:
            rest.extend(g)
        i = j
    return groups, rest


def _score_shared(model: GPT, requests, groups, batch_size, max_len, device, scores, progress):
    """Contexts once, continuations on top. Per batch: the groups' contexts, LEFT-padded (what
    model.py's attention_mask supports), fill a KV cache; the cache rows are repeated once per
    continuation; the continuations, right-padded, run with the cache. Continuation token 0 is
    predicted by the context's last position, token j > 0 by continuation position j - 1."""
    order = sorted(groups, key=lambda g: -len(requests[g[0]][0]))
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
        ctx_idx = ctx_idx.to(device)
        ctx_mask = ctx_mask.to(device)
        cont_idx = cont_idx.to(device)
        cont_mask = cont_mask.to(device)
        owner = owner.to(device)
        cache = KVCache(model.config, G, Lc + Le, device, dtype)
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


def _stderr(k: int, n: int) -> float | None:
    """The standard error of a share k/n of 0/1 outcomes, from sums (for 0/1 outcomes the sum of squares
    is the sum): the harness's mean_stderr; sharded runs reduce three numbers instead of gathering every
    outcome. None for one item: no spread."""
    return mean_stderr(k, k, n)[1] if n > 1 else None


def _argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # the first of equal maxima, like np.argmax


def default_batch_size(device) -> int:
    """Sequences per forward pass when none is given. A GPU needs many rows to be busy. A CPU is
    compute-bound already at one sequence, and there big batches only add padding and intermediate
    tensors that fall out of the cache: 8 rows (two items) measured ~1.3x faster than 64 on the
    2-core development CPU (GPT-2 124M shape)."""
    return 8 if torch.device(device).type == "cpu" else 64


class ItemProgress:
    """score_requests' progress callback, shown as a bar of items on stderr. An item is done when all
    four of its endings are: requests finish out of order (they are sorted by length)."""

    def __init__(self, n_items: int, desc: str):
        from tqdm import tqdm

        self.left = [4] * n_items  # endings not yet scored, per item
        self.bar = tqdm(total=n_items, unit="item", desc=desc, file=sys.stderr)

    def __call__(self, finished_requests):
        done = 0
        for r in finished_requests:
            self.left[r // 4] -= 1
            done += self.left[r // 4] == 0
        self.bar.update(done)

    def close(self):
        self.bar.close()


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

    bar = ItemProgress(len(mine), f"hellaswag {scoring}") if progress and rank == 0 else None
    try:
        lls = score_requests(inner, requests, batch_size, device, bar, share_context)
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
    # a NaN never compares larger, so argmax would pick an ending anyway: a model whose outputs are not
    # numbers would score as if it chose. Counted with the rest (every rank learns of it), then refused below
    non_finite = sum(not math.isfinite(x) for x in lls)
    counts = [len(items), sum(it["pred"] == it["label"] for it in items),
              sum(it["pred_norm"] == it["label"] for it in items), non_finite]
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
    n, k, k_norm, non_finite = counts
    if non_finite:
        raise ValueError(f"hellaswag: {non_finite} of the {4 * n} endings' log-likelihoods are not finite (NaN "
                         f"or inf): the model's outputs are not numbers, so no accuracy is computed")
    result = dict(acc=k / max(n, 1), acc_norm=k_norm / max(n, 1), acc_stderr=_stderr(k, n),
                  acc_norm_stderr=_stderr(k_norm, n), n=n, scoring=scoring, seconds=round(time.time() - t0, 3))
    if return_items:
        result["items"] = items
    return result


def _format_stderr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_line(r: dict) -> str:
    rate = r["n"] / r["seconds"] if r.get("seconds") else float("nan")
    return (f"hellaswag scoring={r['scoring']} n={r['n']} acc={r['acc']:.4f} ± {_format_stderr(r['acc_stderr'])} "
            f"acc_norm={r['acc_norm']:.4f} ± {_format_stderr(r['acc_norm_stderr'])} seconds={r['seconds']:.1f} "
            f"({rate:.1f} items/s)")


def stage_of(model_path: str) -> str | None:
    """The life-cycle stage whose model this is ("pretrained", ...), or None for any other model."""
    for stage, paths in STAGES.items():
        if model_path in paths:
            return stage
    return None


def headline(by_stage: dict, n: int, chance: float, random_acc_norm: float | None) -> list[str]:
    """The lines to read first: acc_norm of each model scored (the earliest stage first), next to chance
    and a random model of the same shape; and, when tuning lowered the score, why."""
    named = [f"{stage_of(m)} ({m}) {a:.3f}" if stage_of(m) else f"{m} {a:.3f}" for m, a in by_stage.items()]
    against = f"chance {chance:.3f}" + ("" if random_acc_norm is None else f", a random model {random_acc_norm:.3f}")
    lines = [f"acc_norm{' by stage' if len(by_stage) > 1 else ''}, {n} items ({against}): {', '.join(named)}"]
    pretrained = [a for m, a in by_stage.items() if stage_of(m) == "pretrained"]
    tuned = [a for m, a in by_stage.items() if stage_of(m) not in (None, "pretrained")]
    if pretrained and tuned and min(tuned) < pretrained[0]:
        lines.append("(tuning lowers this score, as expected: HellaSwag asks which continuation of a text is most "
                     "likely, and the tuned models were taught to answer questions; they no longer continue text)")
    return lines


def keep_earlier_result(path: Path) -> Path | None:
    """The offline default's result file is the same on every run: an earlier result there is renamed
    (summary.<when it was written>.json, beside it), never overwritten. Returns the new name, if any."""
    if not path.exists():
        return None
    when = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}.{when}{path.suffix}")
    n = 1
    while kept.exists():  # two runs within one second
        n += 1
        kept = path.with_name(f"{path.stem}.{when}-{n}{path.suffix}")
    path.rename(kept)
    return kept


# -----------------------------------------------------------------------------------------------
# 4. Loading a model and its tokenizer


def load_model(init_from: str, tokenizer: str | None = None, backend: str = "auto", device="cpu",
               dtype=torch.float32):
    """(model, tokenizer) for a GPT-2 name, a hub id, a local HF directory or our checkpoint dir.
    backend auto: our GPT (model.py) for our format and for the HF model types it implements (gpt2, and
    the LLaMA families: llama, mistral, qwen2, qwen3), else
    transformers' AutoModelForCausalLM; "ours" / "hf" force one. The tokenizer: --tokenizer if
    given, else the model directory's own (dir or dir/tokenizer/), else GPT-2's."""
    if backend not in ("auto", "ours", "hf"):
        raise ValueError(f"backend={backend!r}: expected auto, ours or hf")
    path = Path(init_from).expanduser()
    local = path.is_dir()
    use_hf = backend == "hf"
    if backend == "auto" and local and not (path / "gpt_config.json").exists() and (path / "config.json").exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        use_hf = model_type != "gpt2" and model_type not in LLAMA_FAMILIES
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


def precision_name(text: str) -> str:
    """--precision's type: the old --dtype spellings (float32, bfloat16, float16) as fp32, bf16, fp16."""
    return OLD_DTYPE_NAMES.get(text, text)


def weights_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype the weights are loaded in. auto: bf16 on a GPU with bf16 tensor cores, else fp32 (an
    evaluation keeps no fp32 master copy, and fp16 weights can overflow without loss scaling)."""
    if precision == "auto":
        precision = "bf16" if pick_precision("auto", device) == "bf16" else "fp32"
    return PRECISION_DTYPES[precision]


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description="HellaSwag evaluation (lm-evaluation-harness or build-nanogpt "
                                    "scoring) of our checkpoints and Hugging Face causal LMs.",
                        formatter_class=DefaultsHelp)
    ap.add_argument("--init_from", default="auto",
                    help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF hub id, a local HF model directory, our "
                         "checkpoint directory (e.g. out/ckpt/model), or a run directory (its best or final model); "
                         "auto: the last stage's model on this machine (out-dpo/model, out-rl/model, "
                         "out-finetune/best_model, out/cpu/model), each earlier stage's scored beside it, else GPT-2 "
                         "if the hub or its cache has it")
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
    ap.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=False,
                    help="put the tokenizer's BOS token (else end-of-text) before every context, like the "
                         "harness's add_bos_token=True (off by default, as the harness does for causal LMs)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--precision", "--dtype", default="auto", type=precision_name, choices=["auto", *PRECISION_DTYPES],
                    help="the weights' dtype; auto = bf16 on a GPU with bf16 tensor cores, else fp32 (log-softmax "
                         "is always fp32). --dtype is its old name, and float32|bfloat16|float16 its old values")
    ap.add_argument("--json", default=None,
                    help=f"write the result dict to this file (default: none; the offline life cycle: {DEFAULT_JSON}, "
                         f"where an earlier result is renamed summary.<its date>.json, never overwritten)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="also score a randomly initialised model of the same shape: the 'before' of --json, chance "
                         "made visible (default: on for a model on this machine with no --data_file, the offline "
                         "life cycle; else off)")
    ap.add_argument("--per_item", default=None,
                    help="write one jsonl line per item (idx, label, ll, norm, pred, pred_norm)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a progress bar on stderr (--no_progress: the old spelling of --no-progress)")
    ap.add_argument("--no_progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    rank, _, world_size = init_distributed(device)

    # which model: --init_from auto is the last stage's; each earlier stage's model is scored beside it
    stages = []
    if args.init_from == "auto":
        args.init_from = auto_init_from(STAGE_MODELS, run_first="python train_gpt2.py")
        found = [previous_stage(*paths) for paths in STAGES.values()]
        stages = [m for m in found if m is not None and m != args.init_from]
    args.init_from = resolve_init_from(args.init_from)  # a run directory: its best or final model
    local = Path(args.init_from).expanduser().is_dir()
    if local and args.data_file is None:  # a model on this machine: offline, with the random baseline
        args.data_file = str(builtin_tasks()["hellaswag"]) if rank == 0 else "data/builtin_tasks/hellaswag.jsonl"
        if rank == 0:
            print(f"offline default: {args.init_from} on the built-in multiple-choice set {args.data_file} "
                  f"(HellaSwag's schema); the real benchmark: `python prepare_data.py hellaswag`, then "
                  f"--data_file data/hellaswag/hellaswag_val.jsonl")
        if args.baseline is None:
            args.baseline = True
        args.json = args.json or DEFAULT_JSON
    dtype = weights_dtype(args.precision, device)
    model, tokenizer = load_model(args.init_from, args.tokenizer, args.backend, device, dtype)
    bos_id = None
    if args.add_bos:
        bos_id = bos_token_id(tokenizer, args.tokenizer, args.init_from)
        if bos_id is None:
            raise ValueError("--add_bos: this tokenizer has no BOS / end-of-text token")

    # the items
    if args.data_file:
        data_file = Path(args.data_file)
    elif rank == 0:
        data_file = download_hellaswag(args.cache_dir, flag="--data_file")
    else:
        data_file = Path(args.cache_dir) / Path(HELLASWAG_VAL_URL).name
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 may have been downloading
    examples = load_hellaswag(data_file)[: args.limit]

    # the scores: a random model of the same shape (chance made visible), the model, the earlier stages'
    before = None
    if args.baseline:
        if not isinstance(model, GPT):
            raise ValueError("--baseline needs a model of model.py's GPT (--backend ours)")
        torch.manual_seed(0)
        random_model = GPT(model.config).to(device=device, dtype=next(model.parameters()).dtype)
        before = evaluate(random_model, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                          progress=args.progress, bos_id=bos_id)
    result = evaluate(model, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                      progress=args.progress, return_items=bool(args.per_item), bos_id=bos_id)
    items = result.pop("items", None)
    by_stage = {}  # model -> acc_norm, the earliest stage first
    for m in stages:
        other, _ = load_model(m, args.tokenizer, args.backend, device, dtype)
        by_stage[m] = evaluate(other, tokenizer, examples, args.scoring, args.batch_size, device, rank, world_size,
                               progress=args.progress, bos_id=bos_id)["acc_norm"]
    by_stage[args.init_from] = result["acc_norm"]

    if rank == 0:
        # chance: one over the number of endings, averaged over the items (0.25 with HellaSwag's four)
        chance = sum(1 / len(ex["endings"]) for ex in examples) / max(len(examples), 1)
        random_acc_norm = before["acc_norm"] if before else None
        for line in headline(by_stage, result["n"], chance, random_acc_norm):
            print(line)
        if before:
            print(summary_line(before) + " model=(randomly initialised, the same shape)")
        print(summary_line(result) + f" model={args.init_from} data={data_file}")
        if args.json:
            write_result(Path(args.json), result, before, by_stage, chance, args.init_from, data_file)
        if args.per_item:
            write_jsonl(args.per_item, items)
    end_distributed()  # every rank waits for rank 0's writing


def _metrics(r: dict) -> dict:
    return {k: r[k] for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}


def write_result(path: Path, result: dict, before: dict | None, by_stage: dict, chance: float, model: str,
                 data_file: Path):
    """The result dict as JSON: the metrics, chance, and with a baseline {"before": the random model's,
    "after": the model's}, with more than one model by_stage {model: acc_norm}. The offline default's
    file keeps an earlier run's result under another name (keep_earlier_result)."""
    summary = {**result, "chance": chance}
    if before:
        summary["before"] = _metrics(before)
        summary["after"] = _metrics(result)
    if len(by_stage) > 1:
        summary["by_stage"] = by_stage
    summary["model"] = model
    summary["data_file"] = str(data_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = keep_earlier_result(path) if str(path) == DEFAULT_JSON else None
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
    print(f"written: {path}" + (f" (the earlier result kept as {kept})" if kept else ""))
    print("next: python chat.py (talk to the last stage's model)")


if __name__ == "__main__":
    run_main(main)
