"""
The test suite: `python -m pytest -q test_all.py` (what CI runs; see README).

Every test compares against a reference that could disagree: transformers' own models and
generate(), a formula, or a straightforward re-implementation kept here. Tiny random models are
made by the tests with save_pretrained, so nothing is downloaded. Data the CEO provides lives in
../shared/data/ beside the checkout; tests that need it skip with the reason when it is absent.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, filter_logits

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


# -----------------------------------------------------------------------------------------------
# helpers: tiny random Hugging Face models written with save_pretrained


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


# -----------------------------------------------------------------------------------------------
# model.py: HF weights in


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


# -----------------------------------------------------------------------------------------------
# model.py: HF weights out


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


# -----------------------------------------------------------------------------------------------
# model.py: forward, init, training helpers


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
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n
    # MFU: 6N + 12 L H hd T FLOPs per token, over a given peak
    c = m.config
    expected = (6 * m.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * 128) * 1000 / 1e12
    assert abs(m.estimate_mfu(1000, 128, peak_flops=1e12) - expected) < 1e-12
    # preset sizes (on the meta device: no memory) against the published parameter counts
    with torch.device("meta"):
        assert abs(GPT(GPTConfig.preset("gpt2", vocab_pad_multiple=1)).get_num_params(False) / 1e6 - 124.4) < 0.1
        assert abs(GPT(GPTConfig.preset("llama2-7b")).get_num_params() / 1e9 - 6.74) < 0.01
        modern = GPT(GPTConfig.preset("modern-124m"))
    assert modern.config.ffn_hidden == 2048 and modern.config.n_kv_head == 6


# -----------------------------------------------------------------------------------------------
# model.py: generation


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


# -----------------------------------------------------------------------------------------------
# model.py: bad input


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
    with pytest.raises(ValueError, match=r"wrong shape.*transformer\.wte\.weight: checkpoint \(97, 32\) vs model \(97, 64\)"):
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


def test_model_cli_samples_from_a_local_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "model.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--top_p" in r.stdout and "--num_beams" in r.stdout
    rank_file = SHARED / "gpt2.tiktoken"
    if not rank_file.exists():
        pytest.skip(f"{rank_file} absent: the CLI sampling part needs GPT-2's rank file")
    torch.manual_seed(0)
    GPT(GPTConfig.preset("tiny-gpt2", vocab_size=50257)).save_pretrained(tmp_path / "m")
    r = subprocess.run([sys.executable, "model.py", "--init_from", str(tmp_path / "m"), "--tokenizer",
                        str(rank_file), "--prompt", "Hello world", "--num_samples", "2", "--max_new_tokens", "5"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello world") == 2
