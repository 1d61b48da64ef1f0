"""
bench_speed.py: how fast is model.py? Measured side by side with the references, on this machine.

    python bench_speed.py gen      # generation tokens/s: KV cache vs none, ours vs HF generate
    python bench_speed.py train    # training tokens/s: ours vs HF GPT2LMHeadModel (vs nanoGPT's model.py)
    python bench_speed.py peak     # this machine's matmul peak FLOP/s (fp32, bf16), for MFU on CPU
    python bench_speed.py load --preset llama2-7b --dir /tmp/fake-llama2-7b
                                   # host RAM while loading a 7B checkpoint in bf16 (writes a fake
                                   # all-zero HF checkpoint of that shape first, 13.5 GB of disk)
    python bench_speed.py all --nanogpt path/to/nanoGPT/model.py

How it measures: every compared variant runs in the same process on the same weights and inputs,
interleaved (A B C A B C ...) so that load from elsewhere on a shared machine hits all of them
alike; the figures are medians over the rounds, and the ratios are of the medians. nanoGPT's
model.py is not part of this project: clone karpathy/nanoGPT and pass its model.py with --nanogpt.
"""

import argparse
import importlib.util
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig


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
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
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
    import json
    import threading
    from pathlib import Path

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

    def status_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def anon_kb():
        return status_kb("RssAnon")

    base, peak, stop = anon_kb(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon_kb())
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
          f"{(peak[0] - base) / 2**20:.2f} GiB ({(peak[0] - base) / 2**20 / size:.2f}x the weights); peak resident "
          f"set of the whole process (VmHWM, with file pages mapped from the checkpoint) "
          f"{status_kb('VmHWM') / 2**20:.2f} GiB")


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

            def step(name=name, m=m, opt=opt):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["gen", "train", "peak", "load", "all"], help="which benchmark")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (medians over these)")
    ap.add_argument("--prompt_len", type=int, default=16, help="gen: prompt tokens")
    ap.add_argument("--new_tokens", type=int, default=256, help="gen: tokens to generate")
    ap.add_argument("--n_layer", type=int, default=6, help="train: layers")
    ap.add_argument("--n_head", type=int, default=6, help="train: heads")
    ap.add_argument("--n_embd", type=int, default=384, help="train: width")
    ap.add_argument("--seq_len", type=int, default=256, help="train: tokens per sequence")
    ap.add_argument("--batch_size", type=int, default=8, help="train: sequences per step")
    ap.add_argument("--precision", default="fp32,bf16", help="train: comma list of fp32,bf16 (CPU autocast)")
    ap.add_argument("--nanogpt", default=None, help="train: path to nanoGPT's model.py, to include it")
    ap.add_argument("--preset", default="llama2-7b", help="load: model preset whose shape the checkpoint has")
    ap.add_argument("--dir", default="/tmp/fake-llama2-7b", help="load: checkpoint directory (made if absent)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for what in (["peak", "gen", "train"] if args.what == "all" else [args.what]):
        {"peak": bench_peak, "gen": bench_gen, "train": bench_train, "load": bench_load}[what](args)


if __name__ == "__main__":
    main()
