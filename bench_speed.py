"""
bench_speed.py: how fast is this project's code? Measured side by side with the references, on
this machine.

    python bench_speed.py gen      # generation tokens/s: KV cache vs none, ours vs HF generate
    python bench_speed.py train    # training tokens/s: ours vs HF GPT2LMHeadModel (vs nanoGPT's model.py)
    python bench_speed.py peak     # this machine's matmul peak FLOP/s (fp32, bf16), for MFU on CPU
    python bench_speed.py load --preset llama2-7b --dir /tmp/fake-llama2-7b
                                   # host RAM while loading a 7B checkpoint in bf16 (writes a fake
                                   # all-zero HF checkpoint of that shape first, 13.5 GB of disk)
    python bench_speed.py bpe --input ../shared/data/english_pd.txt
                                   # bpe.py: training vs HF tokenizers and the naive algorithm,
                                   # encoding (tiktoken export) vs tiktoken's GPT-2
    python bench_speed.py tokens --tokenizer tok/
                                   # bpe.py: token counts of a tokenizer against GPT-2's, learned tokens,
                                   # on --files (default: ../shared/data/english_pd.txt, else the
                                   # language reference that ships with Python, pydoc_data's topics)
    python bench_speed.py hellaswag --bench_preset gpt2
                                   # hellaswag.py: batched scoring vs one ending per forward pass
    python bench_speed.py nf4      # lora.py's 4-bit NF4 base (QLoRA) vs the 16-bit one: per-token loss
                                   # on held-out text (data/builtin val) and LoRA training-step time
    python bench_speed.py pretrain # train_gpt2.py's cpu recipe: AdamW vs Muon vs Muon + the modern block
                                   # (vs + wsd): LR sweeps, 3 seeds each, val bits per byte, the steps
                                   # and seconds to AdamW's final bpb; resumable (--out_dir)
    python bench_speed.py all --nanogpt path/to/nanoGPT/model.py     # peak, gen and train

How it measures: every compared variant runs in the same process on the same weights and inputs,
interleaved (A B C A B C ...) so that load from elsewhere on a shared machine hits all of them
alike; the figures are medians over the rounds, and the ratios are of the medians (bpe training
runs each variant in a fresh process, for its own peak memory). nanoGPT's model.py is not part of
this project: clone karpathy/nanoGPT and pass its model.py with --nanogpt.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import regex
import torch
import torch.nn.functional as F

import bpe
import hellaswag as hs
from bpe import load_tokenizer
from lora import apply_lora, quantize_nf4
from model import GPT, GPTConfig, make_optimizer
from housekeeping import (ArgumentParser, DefaultsHelp, bounded, peak_memory_mb, previous_stage, process_memory_mb,
                          run_main)
from prepare_data import hellaswag_item, list_shards, load_hellaswag, load_shard

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # the project's test data, beside a checkout
BUILTIN_TOKENIZER = "data/builtin/tokenizer"  # the BPE that prepare_data.py builtin trains


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: dict, rounds: int) -> dict:
    """Run each variant once per round, in turn; return name -> list of seconds."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def matmul_peak(dtype, n=2048, reps=10) -> float:
    """Best FLOP/s of an n x n matmul: the practical ceiling for the model's matmuls."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: the first call pays for thread start-up and allocation
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def bench_peak(args):
    for dtype in (torch.float32, torch.bfloat16):
        print(f"matmul peak {str(dtype):15s} {matmul_peak(dtype) / 1e9:8.1f} GFLOP/s "
              f"({torch.get_num_threads()} threads)")


def bench_gen(args):
    """GPT-2-small-shaped model (random weights: speed does not depend on them), greedy decoding."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt2", vocab_pad_multiple=1)
    ours = GPT(cfg).eval()
    d = tempfile.mkdtemp()
    ours.save_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    fast = GPT.from_pretrained(d).eval().decode_layout_()  # the same weights, input-major (see decode_layout_)
    hf.generation_config.eos_token_id = None  # run the full length, as ours does without eos_token_id
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    outs = {}

    def run(name, fn):
        def go():
            outs[name] = fn()
        return go

    variants = {
        "ours, KV cache": run("cache", lambda: ours.generate(prompt, n, temperature=0)),
        "ours, decode layout": run("fast", lambda: fast.generate(prompt, n, temperature=0)),
        "HF generate, cache": run("hf", lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False,
                                                              pad_token_id=0)),
    }
    with torch.no_grad():
        times = interleaved(variants, args.rounds)
        times.update(interleaved({"ours, no cache": run("nocache", lambda: ours.generate(
            prompt, n, temperature=0, use_cache=False))}, max(1, args.rounds // 3)))
    same = (torch.equal(outs["cache"], outs["nocache"]) and torch.equal(outs["cache"], outs["fast"])
            and torch.equal(outs["cache"], outs["hf"][:, : outs["cache"].size(1)]))
    print(f"generation: GPT-2 small shape (124M), batch 1, prompt {args.prompt_len}, {n} new tokens, greedy, "
          f"{torch.get_num_threads()} threads; outputs identical across variants: {same}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:20s} {n / med[k]:8.1f} tok/s  (median of {len(v)}: {med[k]:.2f} s)")
    print(f"  KV cache speed-up over no cache: {med['ours, no cache'] / med['ours, KV cache']:.1f}x")
    print(f"  ours vs HF generate (cache):     {med['HF generate, cache'] / med['ours, KV cache']:.2f}x "
          f"(default nn.Linear layout), {med['HF generate, cache'] / med['ours, decode layout']:.2f}x "
          f"(model.decode_layout_(), the layout HF's GPT-2 Conv1D weights have)")


def bench_load(args):
    """Host RAM while GPT.from_pretrained reads a bf16 checkpoint: the weights should be held once.
    Peak anonymous RAM is sampled from /proc/self/status every 20 ms in a thread; VmHWM is the
    process's peak resident set (interpreter, libraries and any memory-mapped file pages included)."""
    import threading

    from safetensors.torch import save_file

    d = Path(args.dir)
    with torch.device("meta"):
        ref = GPT(GPTConfig.preset(args.preset))
    if not (d / "config.json").exists():
        print(f"writing a fake all-zero {args.preset} checkpoint (HF llama format, bf16, one shard per layer) to {d}")
        d.mkdir(parents=True, exist_ok=True)
        from model import hf_config_for, ours_to_hf  # the same name mapping save_pretrained uses
        hf_type, cfg = hf_config_for(ref.config)
        shapes = {k: v.shape for k, v in ref.state_dict().items()}
        meta_sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        hf_shapes = {k: v.shape for k, v in ours_to_hf(meta_sd, ref.config, hf_type).items()}
        groups = {}
        for k in hf_shapes:
            layer = k.split(".")[2] if k.startswith("model.layers.") else "other"
            groups.setdefault(layer, []).append(k)
        weight_map = {}
        for i, (g, keys) in enumerate(sorted(groups.items())):
            fname = f"model-{i:05d}.safetensors"
            save_file({k: torch.zeros(hf_shapes[k], dtype=torch.bfloat16) for k in keys}, str(d / fname))
            weight_map.update({k: fname for k in keys})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(cfg))

    base = process_memory_mb("RssAnon")
    peak = [0.0]  # the sampling thread's result
    stop = threading.Event()

    def sample():  # anonymous memory only: the checkpoint's mapped file pages are not ours to count
        while not stop.is_set():
            peak[0] = max(peak[0], process_memory_mb("RssAnon"))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model = GPT.from_pretrained(str(d), dtype=torch.bfloat16)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"load {args.preset} bf16: {dt:.1f} s; weights {size:.2f} GiB; peak anonymous RAM above start "
          f"{(peak[0] - base) / 2**10:.2f} GiB ({(peak[0] - base) / 2**10 / size:.2f}x the weights); peak resident "
          f"set of the whole process (VmHWM, with file pages mapped from the checkpoint) "
          f"{peak_memory_mb() / 2**10:.2f} GiB")


def load_nanogpt(path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_train(args):
    """One AdamW training step per call, same config for all models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    L, H, C, T, B, V = args.n_layer, args.n_head, args.n_embd, args.seq_len, args.batch_size, 50257
    models = {"ours": GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=V,
                                    vocab_pad_multiple=64))}
    hf = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=T, vocab_size=V, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0))
    models["HF GPT2LMHeadModel"] = hf
    if args.nanogpt:
        ng = load_nanogpt(args.nanogpt)
        models["nanoGPT model.py"] = ng.GPT(ng.GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T,
                                                        vocab_size=50304, dropout=0.0, bias=True))
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))

    def loss_of(name, m):
        if name.startswith("HF"):  # the same loss as the others: every position, no shift inside
            logits = m(input_ids=x).logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        return m(x, y)[1]

    results = {}
    for precision in args.precision.split(","):
        use_bf16 = precision == "bf16"
        steps = {}
        for name, m in models.items():
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

            def step(name=name, m=m, opt=opt, use_bf16=use_bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_of(name, m)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()  # warm-up
            steps[name] = step
        times = interleaved(steps, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"training step, {precision}{' autocast' if use_bf16 else ''} eager: {L} layers, {H} heads, {C} wide, "
              f"T={T}, B={B}, AdamW, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
        peak = matmul_peak(torch.bfloat16 if use_bf16 else torch.float32)
        fpt = models["ours"].flops_per_token(T)
        for k in times:
            tps = B * T / med[k]
            print(f"  {k:20s} {tps:8.0f} tok/s  ({med[k] * 1000:.0f} ms/step)")
        tps = B * T / med["ours"]
        print(f"  ours vs HF: {med['HF GPT2LMHeadModel'] / med['ours']:.2f}x"
              + (f"   ours vs nanoGPT: {med['nanoGPT model.py'] / med['ours']:.2f}x" if args.nanogpt else ""))
        print(f"  ours achieved {fpt * tps / 1e9:.1f} GFLOP/s = {100 * fpt * tps / peak:.0f}% of this CPU's "
              f"measured {precision} matmul peak ({peak / 1e9:.0f} GFLOP/s; {fpt / 1e6:.1f} MFLOP per token)")
        results[precision] = med
    return results


# -----------------------------------------------------------------------------------------------
# bpe.py: our trainer vs HF tokenizers vs the naive algorithm; tiktoken export vs tiktoken


def naive_merge_step(seqs, new_id):
    """One step of the naive algorithm (minbpe's): count every pair in every chunk occurrence,
    then merge the top pair everywhere. Only used by the benchmark, to extrapolate its cost."""
    counts = Counter()
    for s in seqs:
        counts.update(zip(s, s[1:]))
    (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], (-kv[0][0], -kv[0][1])))
    return [bpe._merge_pair(s, a, b, new_id) for s in seqs]


def _bench_train_ours(path, vocab_size, pattern):
    t = time.perf_counter()
    tok = bpe.Tokenizer.train([path], vocab_size, pattern=pattern)
    return time.perf_counter() - t, peak_memory_mb(), tok.vocab_size


def _bench_train_hf(path, vocab_size):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers, decoders
    t = time.perf_counter()
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train([str(path)], trainer)
    return time.perf_counter() - t, peak_memory_mb(), hf.get_vocab_size()


def _in_fresh_process(fn, *args):
    """Run fn(*args) in a new Python process, so that peak memory is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def bench_bpe(args):
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    size_mb = path.stat().st_size / 1e6
    print(f"# bpe.py on {path} ({size_mb:.1f} MB), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    trained = {}
    print("\n## training (each run in a fresh process; time includes reading and pre-splitting)")
    print("| vocab | ours s | ours peak MB | HF tokenizers s | HF peak MB | ours/HF |")
    print("|---|---|---|---|---|---|")
    for v in args.vocab_sizes:
        ours, hf = [], []
        for _ in range(args.repeats):  # interleaved, so that machine load hits both alike
            ours.append(_in_fresh_process(_bench_train_ours, path, v, args.pattern))
            if not args.skip_hf:
                hf.append(_in_fresh_process(_bench_train_hf, path, v))
        t_ours = statistics.median([r[0] for r in ours])
        trained[v] = t_ours
        m_ours = max(r[1] for r in ours)
        if hf:
            t_hf, m_hf = statistics.median([r[0] for r in hf]), max(r[1] for r in hf)
            print(f"| {v} | {t_ours:.2f} | {m_ours:.0f} | {t_hf:.2f} | {m_hf:.0f} | {t_ours / t_hf:.2f}x |")
        else:
            print(f"| {v} | {t_ours:.2f} | {m_ours:.0f} | - | - | - |")

    if args.naive_merges > 0:
        # The naive cost per merge is proportional to the total length of the chunk sequences,
        # which shrinks as merges go on: time it at the start and at the end state of each run
        # (the chunks encoded with our trained vocabulary) and take the average.
        text = path.read_text(encoding="utf-8")
        chunks = regex.findall(bpe.resolve_pattern(args.pattern), text)
        del text

        def naive_seconds_per_merge(seqs, first_id):
            t = time.perf_counter()
            for k in range(args.naive_merges):
                seqs = naive_merge_step(seqs, first_id + k)
            return (time.perf_counter() - t) / args.naive_merges

        start = naive_seconds_per_merge([list(c.encode("utf-8")) for c in chunks], 256)
        print(f"\n## naive algorithm (minbpe: recount all pairs over all {len(chunks):,} chunk "
              f"occurrences each merge), timed over {args.naive_merges} merges")
        print("| vocab | naive s/merge at start, at end | naive, extrapolated | ours | speed-up |")
        print("|---|---|---|---|---|")
        for v, t_ours in trained.items():
            tok = bpe.Tokenizer.train([path], v, pattern=args.pattern)
            ids = {c: tok.encode_ordinary(c) for c in set(chunks)}
            end = naive_seconds_per_merge([ids[c] for c in chunks], v)
            t_naive = (start + end) / 2 * (v - 256)
            print(f"| {v} | {start:.2f}, {end:.2f} | {t_naive / 3600:.1f} h | {t_ours:.1f} s | "
                  f"{t_naive / t_ours:,.0f}x |")
        del chunks, ids

    if args.gpt2 and Path(args.gpt2).is_file():
        import tiktoken
        import tiktoken.load
        text = path.read_text(encoding="utf-8")
        docs = text.split("\n\n")
        ref = tiktoken.Encoding(name="gpt2", pat_str=bpe.GPT2_PATTERN,
                                mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(args.gpt2)),
                                special_tokens=dict(bpe.GPT2_SPECIAL_TOKENS))
        ours = bpe.Tokenizer.from_tiktoken_file(args.gpt2).to_tiktoken()
        if ours.encode_ordinary(text) != ref.encode_ordinary(text):
            raise AssertionError("the export and tiktoken's GPT-2 disagree")
        print(f"\n## encoding throughput, GPT-2 vocabulary, MB/s (median of {args.repeats}, interleaved)")
        print("| how | bpe.py to_tiktoken() | tiktoken gpt2 | ratio |")
        print("|---|---|---|---|")
        for label, run in [("encode_ordinary(whole file), 1 thread", lambda e: e.encode_ordinary(text)),
                           (f"encode_ordinary_batch({len(docs):,} paragraphs), {args.threads} threads",
                            lambda e: e.encode_ordinary_batch(docs, num_threads=args.threads))]:
            times = {"ours": [], "ref": []}
            for r in range(args.repeats):  # interleaved, alternating which goes first
                for key, enc in [("ours", ours), ("ref", ref)][::1 if r % 2 else -1]:
                    t = time.perf_counter()
                    run(enc)
                    times[key].append(time.perf_counter() - t)
            mbps = {k: size_mb / statistics.median(v) for k, v in times.items()}
            print(f"| {label} | {mbps['ours']:.1f} | {mbps['ref']:.1f} | {mbps['ours'] / mbps['ref']:.2f}x |")
        sample = text[:1_000_000]
        py = bpe.Tokenizer.from_tiktoken_file(args.gpt2)
        t = time.perf_counter()
        py.encode_ordinary(sample)
        mbps = len(sample.encode()) / 1e6 / (time.perf_counter() - t)
        print(f"\nfor scale: the pure-Python encode() does {mbps:.2f} MB/s on the first 1 MB "
              f"(with its per-chunk cache)")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def token_count_texts(files) -> list[tuple[str, str]]:
    """(label, text) of each text to count: the --files, or by default a text at hand offline:
    ../shared/data/english_pd.txt beside a checkout, else the language reference that every Python
    installation carries (pydoc_data's topics, the text of help('TOPIC'))."""
    if files:
        return [(str(p), bpe._read_text(p)) for p in files]
    if (SHARED_DATA / "english_pd.txt").is_file():
        return [(str(SHARED_DATA / "english_pd.txt"), bpe._read_text(SHARED_DATA / "english_pd.txt"))]
    from pydoc_data.topics import topics

    return [("pydoc_data topics", "\n\n".join(topics[key] for key in sorted(topics)))]


def bench_tokens(args):
    """Token counts of a tokenizer against GPT-2's on texts (fewer tokens = more text per context),
    and the first and last tokens it learned."""
    spec = args.tokenizer
    if spec is None:
        if not (Path(BUILTIN_TOKENIZER) / "tokenizer.bpe").is_file():
            raise ValueError(f"tokens needs --tokenizer (a bpe.py tokenizer directory); the default, "
                             f"{BUILTIN_TOKENIZER}, is made by python prepare_data.py builtin")
        spec = BUILTIN_TOKENIZER
    tok = bpe.load_bpe(spec, args.pattern)
    gpt2 = bpe.load_bpe(args.gpt2 if Path(args.gpt2).is_file() else "gpt2")  # else $GPT2_TIKTOKEN, data/, ...
    rows = [("file", "chars", "bytes", f"ours ({tok.vocab_size})", f"GPT-2 ({gpt2.vocab_size})",
             "ours/GPT-2")]
    for label, text in token_count_texts(args.files):
        n_ours = len(tok.to_tiktoken().encode(text, disallowed_special=()))
        n_gpt2 = len(gpt2.to_tiktoken().encode(text, disallowed_special=()))
        rows.append((label, f"{len(text):,}", f"{len(text.encode()):,}", f"{n_ours:,}", f"{n_gpt2:,}",
                     f"{n_ours / max(1, n_gpt2):.2f}"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:  # the first column left-aligned, the numbers right-aligned
        cells = [c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))
    learned = [tok.vocab[i] for i in sorted(tok.vocab) if i >= 256 and i < len(tok.ranks)]
    n = args.show_tokens
    print(f"\nfirst {n} learned tokens: " + " ".join(bpe.render(t) for t in learned[:n]))
    print(f"last {n} learned tokens:  " + " ".join(bpe.render(t) for t in learned[-n:]))


# -----------------------------------------------------------------------------------------------
# hellaswag.py: batched scoring vs one ending per forward pass


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """Items with HellaSwag's shape and roughly its lengths (contexts of 15-90 words, endings of
    8-30), for timing when the real file is not at hand. Scores on them mean nothing."""
    rng = random.Random(seed)
    words = ("the a man woman is are then he she they it with on in into of to and holds runs takes "
             "water ball rope kitchen paint brush camera hair dog car table floor wall shows puts "
             "continues starts begins while after slowly quickly several people outside inside").split()

    def say(lo: int, hi: int) -> str:  # lo to hi random words
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    items = []
    for i in range(n):  # the fields drawn in this order: label, context, endings, answer
        row = dict(activity_label=say(1, 3).title(), ctx_a=say(15, 80) + ".", ctx_b=say(0, 10),
                   endings=[say(8, 30) + "." for _ in range(4)], label=rng.randrange(4))
        items.append(hellaswag_item(row, f"synthetic {i}"))
    return items


@torch.no_grad()
def _naive_predictions(model, tokenizer, examples, scoring, device=None):
    """The straightforward loop the benchmark compares with: for each ending, one forward pass of
    context + ending, log-softmax over every position, sum over the ending's tokens."""
    model = hs._unwrap(model)
    device = device or next(model.parameters()).device
    requests = hs.build_requests(examples, tokenizer, scoring)
    lls = []
    for ctx, cont, _ in requests:
        idx = torch.tensor([ctx + cont], device=device)
        logits = model(idx)[0] if isinstance(model, GPT) else model(input_ids=idx).logits
        logp = F.log_softmax(hs._at_least_fp32(logits[0, :-1]), dim=-1)
        tgt = idx[0, 1:]
        lls.append(float(logp.gather(1, tgt[:, None])[-len(cont):].sum()))
    out = []
    for i in range(len(examples)):
        ll = lls[4 * i:4 * i + 4]
        norm = [requests[4 * i + j][2] for j in range(4)]
        out.append((hs._argmax(ll), hs._argmax([a / b for a, b in zip(ll, norm)])))
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


def hellaswag_variants(model, tokenizer, examples, batch_size: int, repeats: int, scoring: str, device=None):
    """Items/s of hellaswag.evaluate() as shipped (batched, each context run once), batched without sharing
    the context, and one ending per forward pass; interleaved (A B C A B C ...) so that a change in
    machine load hits all alike; medians and ratios to the one-ending-per-forward baseline."""
    batch_size = batch_size or hs.default_batch_size(device or next(hs._unwrap(model).parameters()).device)
    variants = {f"batched, shared context (batch_size={batch_size})": dict(batch_size=batch_size),
                f"batched rows (batch_size={batch_size}, share_context=False)":
                    dict(batch_size=batch_size, share_context=False),
                "one ending per forward (batch_size=1)": dict(batch_size=1, share_context=False)}
    naive = "naive: one ending per forward, logits at every position"
    hs.evaluate(model, tokenizer, examples[:4], scoring, batch_size, device)  # warm-up (allocator, kernels)
    rates = {name: [] for name in list(variants) + [naive]}
    results = {}
    for rep in range(repeats):
        for name, kw in variants.items():
            r = hs.evaluate(model, tokenizer, examples, scoring, device=device, **kw)
            rates[name].append(r["n"] / r["seconds"])
            results[name] = (r["acc"], r["acc_norm"])
            print(f"  rep {rep + 1}/{repeats} {name}: {rates[name][-1]:.2f} items/s", flush=True)
        t0 = time.perf_counter()
        preds = _naive_predictions(model, tokenizer, examples, scoring, device)
        rates[naive].append(len(examples) / (time.perf_counter() - t0))
        print(f"  rep {rep + 1}/{repeats} {naive}: {rates[naive][-1]:.2f} items/s", flush=True)
    base_preds = hs.evaluate(model, tokenizer, examples, scoring, device=device, return_items=True)["items"]
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
    if isinstance(hs._unwrap(model), GPT):
        w = work_ratios(hs._unwrap(model), hs.build_requests(examples, tokenizer, scoring))
        print(f"arithmetic bound (multiply-adds relative to the shipped evaluation, see work_ratios): naive "
              f"{w['naive']:.2f}x, one ending per forward {w['one ending per forward']:.2f}x: on a device that "
              f"is compute-bound at one sequence, no batching beats these")
    return med


def bench_hellaswag(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.bench_preset:
        tokenizer = load_tokenizer(args.tokenizer or "gpt2")
        model = GPT(GPTConfig.preset(args.bench_preset, vocab_size=tokenizer.n_vocab)).to(device).eval()
    else:
        model, tokenizer = hs.load_model(args.init_from, args.tokenizer, "auto", device)
    if args.data_file:
        examples = load_hellaswag(args.data_file)[: args.limit]
    else:
        examples = synthetic_examples(args.limit)
    print(f"hellaswag: {len(examples)} items, scoring={args.scoring}, device={device}, threads="
          f"{torch.get_num_threads()}, model={args.bench_preset or args.init_from}")
    hellaswag_variants(model, tokenizer, examples, args.batch_size, args.rounds, args.scoring, device)


# -----------------------------------------------------------------------------------------------
# lora.py's 4-bit base (QLoRA): what NF4 costs in quality and in time


def held_out_tokens(data_dir: str, n: int) -> torch.Tensor:
    files = list_shards(data_dir, "val")
    if not files:
        raise ValueError(f"--data_dir {data_dir}: no *_val_*.bin shards; run python prepare_data.py builtin")
    return torch.cat([torch.from_numpy(load_shard(f).astype("int64")) for f in files])[: n + 1]


def per_token_loss(model: GPT, tokens: torch.Tensor, block: int, autocast: bool, batch: int = 8) -> float:
    """Mean next-token cross-entropy over the tokens, in windows of `block` (no overlap)."""
    n = (len(tokens) - 1) // block
    x, y = tokens[: n * block].view(n, block), tokens[1: n * block + 1].view(n, block)
    total = 0.0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for i in range(0, n, batch):
            total += model(x[i: i + batch], y[i: i + batch])[1].item() * y[i: i + batch].numel()
    return total / y.numel()


def bench_nf4(args):
    """Quality: the same trained model with its block linears in fp32, bf16 and NF4 (quantised from
    the bf16 weights, as QLoRA does). Time: one LoRA (r=16 on q,v) AdamW step on each base, interleaved;
    in bf16 (QLoRA's compute dtype) and in fp32 (the fast dtype of a CPU without bf16 units)."""
    import copy

    path = args.init_from if args.init_from != "gpt2" else previous_stage("out/cpu/ckpt/model")
    if path is None:
        raise ValueError("nf4: no trained model: run python train_gpt2.py (offline) or pass --init_from")
    ref = GPT.from_pretrained(path).eval()
    block = min(ref.config.block_size, args.seq_len)
    tokens = held_out_tokens(args.data_dir, args.nf4_tokens)
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    nf4 = quantize_nf4(copy.deepcopy(bf16))
    print(f"nf4: {path} ({ref.get_num_params() / 1e6:.1f}M parameters), {len(tokens) - 1} held-out tokens of "
          f"{args.data_dir} in windows of {block}, {torch.get_num_threads()} threads")
    losses = {"fp32": per_token_loss(ref, tokens, block, False), "bf16": per_token_loss(bf16, tokens, block, False),
              "NF4 (bf16 compute)": per_token_loss(nf4, tokens, block, False)}
    for k, v in losses.items():
        print(f"  per-token loss {k:20s} {v:.4f}   (vs fp32 {v - losses['fp32']:+.4f}, vs bf16 "
              f"{v - losses['bf16']:+.4f}; perplexity {math.exp(v):.2f})")
    x = tokens[: args.batch_size * block].view(args.batch_size, block)
    y = tokens[1: args.batch_size * block + 1].view(args.batch_size, block)
    for dtype in (torch.bfloat16, torch.float32):
        steps = {}
        base = bf16 if dtype == torch.bfloat16 else ref
        for name, quant in ((f"{str(dtype)[6:]} base", False), ("NF4 base", True)):
            m = copy.deepcopy(nf4).to(dtype) if quant else copy.deepcopy(base)  # NF4 (from bf16) keeps its codes
            apply_lora(m, 16, 32, 0.0, "q,v")
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

            def step(m=m, opt=opt):
                m(x, y)[1].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()  # warm-up
            steps[name] = step
        times = interleaved(steps, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        a, b = med.values()
        print(f"LoRA r=16 q,v training step, {str(dtype)[6:]} compute, B={args.batch_size} T={block}, median of "
              f"{args.rounds} interleaved rounds:")
        for k, v in times.items():
            print(f"  {k:12s} {med[k] * 1000:8.1f} ms/step  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
        print(f"  NF4 / {str(dtype)[6:]}: {b / a:.2f}x the time")
    return losses


# -----------------------------------------------------------------------------------------------
# train_gpt2.py's recipes: how many steps and seconds to reach the same val bits per byte

# arm -> (flags on top of train_gpt2.py --recipe cpu, the swept learning-rate flag, its values)
_CPU_ADAMW = ["--optimizer", "adamw", "--model", "small-cpu", "--schedule", "cosine", "--min_lr_ratio", "0.1"]
_MUON_LRS = [0.005, 0.01, 0.02, 0.04]
PRETRAIN_ARMS = {
    "adamw": (_CPU_ADAMW, "lr", [1e-3, 2e-3, 4e-3, 8e-3]),
    "muon": (["--optimizer", "muon", "--model", "small-cpu", "--schedule", "cosine", "--min_lr_ratio", "0.1"],
             "matrix_lr", _MUON_LRS),
    "muon+block": (["--optimizer", "muon", "--model", "small-cpu-modern", "--schedule", "cosine", "--min_lr_ratio",
                    "0.1"], "matrix_lr", _MUON_LRS),
    "muon+block+wsd": (["--optimizer", "muon", "--model", "small-cpu-modern", "--schedule", "wsd", "--min_lr_ratio",
                        "0.0"], "matrix_lr", _MUON_LRS),
}
REPORT_SEEDS = (1, 2, 3)


def _pretrain_run(args, arm: str, lr: float, seed: int, tune: bool, adamw_lr: float | None) -> dict:
    """One train_gpt2.py run in its own process (1 thread), then its log reduced to a row.
    tune: evaluated only at the end, on the val tokens after the reported slice (LR selection);
    else every --eval_every steps on the reported slice (the curves and the steps-to-target)."""
    import subprocess
    import sys

    import train_gpt2

    flags, lr_flag, _ = PRETRAIN_ARMS[arm]
    cpu = train_gpt2.RECIPES["cpu"]
    key = f"{arm} {lr_flag}={lr:g} seed={seed} {'tune' if tune else 'report'}"
    out = Path(args.out_dir) / "runs" / key.replace(" ", "_").replace("=", "")
    cmd = [sys.executable, str(Path(__file__).with_name("train_gpt2.py")), "--recipe", "cpu", *flags,
           f"--{lr_flag}", str(lr), *(["--lr", str(adamw_lr)] if lr_flag != "lr" else []),
           "--max_steps", "300", "--data_dir", args.data_dir, "--out_dir", str(out), "--overwrite", "--seed", str(seed),
           "--num_samples", "0", "--hellaswag_file", "", "--ckpt_interval", "0", "--device", "cpu",
           "--val_offset", str(cpu["val_tokens"] if tune else 0),
           "--eval_interval", str(0 if tune else args.eval_every)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{key}: train_gpt2.py failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [[r["step"], r["val_loss"], r["val_bpb"]] for r in rows if r["type"] == "eval"]
    ms = statistics.median(r["ms"] for r in rows if r["type"] == "train")
    for weights in ("ckpt", "model"):  # the weights are not needed, the log is kept
        shutil.rmtree(out / weights, ignore_errors=True)
    return dict(key=key, arm=arm, lr_flag=lr_flag, lr=lr, adamw_lr=adamw_lr, seed=seed, tune=tune, evals=evals,
                median_step_ms=ms, wall_s=time.time() - t0)


def steps_to_reach(evals, target: float) -> float | None:
    """The first step at which the val bpb curve reaches target, linear between evaluations."""
    if evals[0][2] <= target:
        return evals[0][0]
    for (s0, _, b0), (s1, _, b1) in zip(evals, evals[1:]):
        if b1 <= target:
            return s1 if b0 == b1 else s0 + (s1 - s0) * (b0 - target) / (b0 - b1)
    return None


def _pretrain_step_times(args) -> dict:
    """Seconds per optimizer step of each arm's recipe, interleaved (A B C D A B C D ...), medians."""
    import train_gpt2

    train, _, meta = train_gpt2.open_data(args.data_dir)
    steps = {}
    for arm, (flags, _, _) in PRETRAIN_ARMS.items():
        c, _ = train_gpt2.parse_args(["--recipe", "cpu", *flags])
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(c.model, vocab_size=meta["vocab_size"], n_layer=c.n_layer, n_head=c.n_head,
                                     n_embd=c.n_embd, block_size=c.block_size)).train()
        opt = make_optimizer(model, c.optimizer, c.lr, c.weight_decay, (c.beta1, c.beta2), matrix_lr=c.matrix_lr)
        loader = train_gpt2.DataLoader(train, c.batch_size, c.seq_len, 0, 1, c.total_batch_size)

        def step(model=model, opt=opt, loader=loader, c=c):
            for _ in range(loader.micro_steps):
                x, y = loader.next_batch()
                (model(x, y)[1] / loader.micro_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up (allocator, optimizer state)
        steps[arm] = step
    times = interleaved(steps, args.rounds * 10)
    return {arm: statistics.median(t) for arm, t in times.items()}


def bench_pretrain(args):
    """Each arm: the LR sweep (tuning slice), then REPORT_SEEDS at its best LR (reported slice). Runs
    already in out/results.jsonl are kept (a rerun resumes); then the report and out/pretrain.png."""
    from concurrent.futures import ThreadPoolExecutor

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {}  # key -> row of every run finished, in this session or an earlier one
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row

    def run_all(jobs):
        todo = [j for j in jobs if _job_key(*j) not in done]
        with ThreadPoolExecutor(args.workers) as pool:
            for row in pool.map(lambda j: _pretrain_run(args, *j), todo):
                done[row["key"]] = row
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {row['key']}: final val bpb {row['evals'][-1][2]:.4f} ({row['wall_s']:.0f}s)", flush=True)
        return [done[_job_key(*j)] for j in jobs]

    def best(rows):
        return min(rows, key=lambda r: r["evals"][-1][2])["lr"]

    print(f"pretrain: {len(PRETRAIN_ARMS)} arms, train_gpt2.py --recipe cpu budget; {args.workers} runs at a "
          f"time, 1 thread each; results in {results_path}", flush=True)
    sweeps = {"adamw": run_all([("adamw", lr, 1337, True, None) for lr in PRETRAIN_ARMS["adamw"][2]])}
    adamw_lr = best(sweeps["adamw"])
    jobs = [(arm, lr, 1337, True, adamw_lr) for arm, (_, _, lrs) in PRETRAIN_ARMS.items() if arm != "adamw"
            for lr in lrs] + [("adamw", adamw_lr, s, False, None) for s in REPORT_SEEDS]
    rows = run_all(jobs)
    for arm in PRETRAIN_ARMS:
        if arm != "adamw":
            sweeps[arm] = [r for r in rows if r["arm"] == arm and r["tune"]]
    best_lr = {arm: best(r) for arm, r in sweeps.items()}
    runs = {arm: run_all([(arm, best_lr[arm], s, False, None if arm == "adamw" else adamw_lr)
                          for s in REPORT_SEEDS]) for arm in PRETRAIN_ARMS}
    print("interleaved step timing (2 threads unless --threads), medians ...", flush=True)
    sec = _pretrain_step_times(args)
    report = _pretrain_report(sweeps, best_lr, runs, sec, adamw_lr)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _pretrain_plot(sweeps, runs, sec, report["target_bpb"], out / "pretrain.png")
    print(f"plot: {out / 'pretrain.png'}; summary: {out / 'report.json'}")
    return report


def _job_key(arm, lr, seed, tune, adamw_lr):
    return f"{arm} {PRETRAIN_ARMS[arm][1]}={lr:g} seed={seed} {'tune' if tune else 'report'}"


def _steps(x: float | None) -> str:
    """A steps-to-target figure: a whole number, or never."""
    return "never" if x is None else f"{x:.0f}"


def _pretrain_report(sweeps, best_lr, runs, sec, adamw_lr) -> dict:
    mean = statistics.mean
    print(f"\nLR sweep: final val bpb on the tuning slice (val tokens 16384..32767), seed 1337; Muon arms' AdamW "
          f"groups at the AdamW arm's best --lr {adamw_lr:g}")
    for arm, rows in sweeps.items():
        print(f"  {arm:15s} " + "  ".join(f"{r['lr_flag']} {r['lr']:g}: {r['evals'][-1][2]:.4f}" for r in rows)
              + f"  -> best {best_lr[arm]:g}")
    target = mean(r["evals"][-1][2] for r in runs["adamw"])
    base_steps = runs["adamw"][0]["evals"][-1][0]
    print(f"\nreported slice (val tokens 0..16383), seeds {REPORT_SEEDS}; target = the AdamW arm's mean final val "
          f"bpb {target:.4f}; s/step: interleaved timing, medians")
    report = {"target_bpb": target, "adamw_lr": adamw_lr, "best_lr": best_lr, "s_per_step": sec, "arms": {}}
    for arm, rows in runs.items():
        reach = [steps_to_reach(r["evals"], target) for r in rows]
        finals = [r["evals"][-1][2] for r in rows]
        m = mean(reach) if all(x is not None for x in reach) else None
        step_ratio = m / base_steps if m is not None else None
        wall_ratio = m * sec[arm] / (base_steps * sec["adamw"]) if m is not None else None
        report["arms"][arm] = dict(final_bpb=finals, steps_to_target=reach, mean_steps=m, step_ratio=step_ratio,
                                   wall_ratio=wall_ratio, seconds_to_target=m * sec[arm] if m is not None else None)
        print(f"  {arm:15s} final bpb {mean(finals):.4f} ({', '.join(f'{b:.4f}' for b in finals)}) | steps to target "
              f"{_steps(m)} ({', '.join(_steps(x) for x in reach)}) | {sec[arm] * 1000:.0f} ms/step"
              + (f" | {step_ratio:.2f}x the steps, {wall_ratio:.2f}x the time of AdamW's {base_steps}"
                 if m is not None else ""))
    print("\nval bpb at each evaluation (mean of seeds)")
    steps = [e[0] for e in runs["adamw"][0]["evals"]]
    print("  step            " + " ".join(f"{s:6d}" for s in steps))
    for arm, rows in runs.items():
        print(f"  {arm:15s} " + " ".join(f"{mean(r['evals'][i][2] for r in rows):6.3f}" for i in range(len(steps))))
    return report


def _pretrain_plot(sweeps, runs, sec, target, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(18, 4.8))
    for arm, rows in runs.items():
        steps = [e[0] for e in rows[0]["evals"]]
        bpb = [statistics.mean(r["evals"][i][2] for r in rows) for i in range(len(steps))]
        ax[0].plot(steps, bpb, label=arm)
        ax[1].plot([s * sec[arm] for s in steps], bpb, label=arm)
        ax[2].plot([r["lr"] for r in sweeps[arm]], [r["evals"][-1][2] for r in sweeps[arm]], "o-",
                   label=f"{arm} ({sweeps[arm][0]['lr_flag']})")
    for a, xlabel in zip(ax, ("step", "seconds (steps x interleaved s/step)", "peak learning rate")):
        a.set_xlabel(xlabel)
        a.set_ylabel("val bits per byte")
        a.grid(alpha=0.3)
    for a in ax[:2]:
        a.axhline(target, ls="--", color="gray", label=f"AdamW final {target:.3f}")
        a.set_ylim(top=min(a.get_ylim()[1], target + 0.8))
    ax[2].set_xscale("log")
    ax[2].set_title("LR sweep (tuning slice, final)")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BENCHMARKS = {"gen": bench_gen, "train": bench_train, "peak": bench_peak, "load": bench_load, "bpe": bench_bpe,
              "tokens": bench_tokens, "hellaswag": bench_hellaswag, "nf4": bench_nf4, "pretrain": bench_pretrain}


def build_parser():
    ap = ArgumentParser(description=__doc__, formatter_class=DefaultsHelp)
    ap.add_argument("what", choices=[*BENCHMARKS, "all"], help="which benchmark (all: peak, gen and train)")
    ap.add_argument("--threads", type=bounded(int, 1), default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=bounded(int, 1), default=5,
                    help="interleaved rounds per variant (medians over these)")
    ap.add_argument("--prompt_len", type=bounded(int, 1), default=16, help="gen: prompt tokens")
    ap.add_argument("--new_tokens", type=bounded(int, 1), default=256, help="gen: tokens to generate")
    ap.add_argument("--n_layer", type=bounded(int, 1), default=6, help="train: layers")
    ap.add_argument("--n_head", type=bounded(int, 1), default=6, help="train: heads")
    ap.add_argument("--n_embd", type=bounded(int, 1), default=384, help="train: width")
    ap.add_argument("--seq_len", type=bounded(int, 1), default=256, help="train, nf4: tokens per sequence")
    ap.add_argument("--batch_size", type=bounded(int, 1), default=8, help="train, nf4: sequences per step")
    ap.add_argument("--precision", default="fp32,bf16", help="train: comma list of fp32,bf16 (CPU autocast)")
    ap.add_argument("--nanogpt", default=None, help="train: path to nanoGPT's model.py, to include it")
    ap.add_argument("--preset", default="llama2-7b", help="load: model preset whose shape the checkpoint has")
    ap.add_argument("--dir", default="/tmp/fake-llama2-7b", help="load: checkpoint directory (made if absent)")
    ap.add_argument("--input", default=str(SHARED_DATA / "english_pd.txt"),
                    help="bpe: a UTF-8 text file to train and encode")
    ap.add_argument("--vocab_sizes", type=bounded(int, 257), nargs="+", default=[4096, 32768],
                    help="bpe: vocabularies to train")
    ap.add_argument("--pattern", default="gpt2", choices=["gpt2", "gpt4"],
                    help="bpe: our split pattern (gpt2 is the closest to HF's ByteLevel)")
    ap.add_argument("--repeats", type=bounded(int, 1), default=5, help="bpe: runs per variant; medians are reported")
    ap.add_argument("--naive_merges", type=bounded(int, 0), default=2,
                    help="bpe: merges of the naive algorithm to time and extrapolate (0 = skip)")
    ap.add_argument("--skip_hf", action=argparse.BooleanOptionalAction, default=False,
                    help="bpe: do not run HF tokenizers")
    ap.add_argument("--gpt2", default=str(SHARED_DATA / "gpt2.tiktoken"),
                    help="GPT-2 rank file: bpe: for the encoding part; tokens: when absent, GPT-2's tokenizer as "
                         "bpe.py finds it ($GPT2_TIKTOKEN, data/gpt2.tiktoken)")
    ap.add_argument("--files", nargs="+", default=None, help="tokens: UTF-8 text files to count (default: "
                    f"{SHARED_DATA / 'english_pd.txt'} when present, else pydoc_data's topics, the language "
                    "reference that ships with Python)")
    ap.add_argument("--show_tokens", type=bounded(int, 0), default=10, help="tokens: learned tokens to list")
    ap.add_argument("--init_from", default="gpt2", help="hellaswag: the model (as hellaswag.py takes it); nf4: our "
                    "checkpoint dir (default: out/cpu/ckpt/model, train_gpt2.py's offline run)")
    ap.add_argument("--data_dir", default="data/builtin", help="nf4: token shards whose val split is the held-out "
                    "text; pretrain: the corpus (train_gpt2.py's cpu recipe's)")
    ap.add_argument("--out_dir", "--out", default="out/bench_pretrain",
                    help="pretrain: runs, results.jsonl (a rerun skips the runs it holds), report.json, pretrain.png")
    ap.add_argument("--workers", type=bounded(int, 1), default=2,
                    help="pretrain: training runs at a time (1 thread each)")
    ap.add_argument("--eval_every", type=bounded(int, 1), default=20, help="pretrain: steps between evaluations")
    ap.add_argument("--nf4_tokens", type=bounded(int, 2), default=32768, help="nf4: held-out tokens to score")
    ap.add_argument("--bench_preset", default=None,
                    help="hellaswag: a randomly initialised GPTConfig preset (e.g. gpt2) instead of --init_from")
    ap.add_argument("--tokenizer", default=None,
                    help=f"tokens: the tokenizer to count with (default: {BUILTIN_TOKENIZER}, made by prepare_data.py "
                         "builtin); hellaswag: tokenizer spec (default: the model's)")
    ap.add_argument("--data_file", default=None, help="hellaswag: real items (default: synthetic ones of its shape)")
    ap.add_argument("--limit", "--items", type=bounded(int, 1), default=32,
                    help="hellaswag: evaluate only the first N items per run")
    ap.add_argument("--scoring", default="harness", choices=hs.SCORINGS, help="hellaswag: the scoring")
    ap.add_argument("--hs_batch_size", dest="batch_size_hs", type=bounded(int, 1), default=None,
                    help="hellaswag: rows per forward pass (default: hellaswag.default_batch_size)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not set(args.precision.split(",")) <= {"fp32", "bf16"}:
        ap.error(f"argument --precision: expected a comma list of fp32,bf16, got {args.precision!r}")
    torch.set_num_threads(args.threads)
    if args.what == "hellaswag":
        args.batch_size = args.batch_size_hs
    if args.what == "all":
        bench_peak(args)
        bench_gen(args)
        return bench_train(args)
    return BENCHMARKS[args.what](args)


if __name__ == "__main__":
    run_main(main)
