"""
model.py: the model. One GPT class for the GPT-2 and LLaMA families, readable top to bottom:
  1. Configuration: GPTConfig, whose switches (norm, positions, attention heads, MLP, bias, tying) cover
     GPT-2 and LLaMA-2 with one class; the switches of the families built on LLaMA's block (Llama 3.x's
     RoPE scaling, Qwen2.5's q/k/v biases, Qwen3's learned QK-norm, Mistral's sliding window); named
     presets; a modern block's switches (QK-norm, ReLU², zero-initialised projections, logit
     soft-capping), off in every preset that loads HF weights.
  2. Modules: norms, rotary embeddings, the KV cache, causal self-attention (SDPA, or a manual path for
     learning), the MLP (GELU, SwiGLU or ReLU²), the transformer block, a memory-lean cross-entropy.
  3. GPT: forward and loss, GPT-2's initialisation, FLOPs per token.
  4. Generation with the KV cache (GPT.generate, at the end of the class, and its helpers below it):
     greedy, sampling, beam search, stop tokens, ragged batches, streaming.
  5. The optimizers a model is trained with (as nanoGPT keeps configure_optimizers beside its model):
     the parameter groups, AdamW, Muon, and the learning-rate schedule.
  6. Appendix: Hugging Face weights in and out (reading, name mapping, checking, writing). Plumbing,
     not the model: skip it on first read.
What no lesson is about (flags, devices, torchrun, run directories, logs) is in housekeeping.py.

Use it:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("gpt2"))               # random init, for pretraining
    model = GPT.from_pretrained("gpt2")                  # OpenAI's weights via the HF hub cache
    logits, loss = model(idx, targets)                   # logits: (B, T, vocab_size)
    out = model.generate(idx, 50, temperature=0.8, top_k=200)
    model.save_pretrained("out/hf")                      # loads in transformers.AutoModelForCausalLM
(chat.py samples from a model on the command line.)

Parameter names follow HF's GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, `lm_head`, ...).
LLaMA checkpoints map onto the same names, q/k/v fused into `c_attn` (rows [q | k | v]) and SwiGLU's
gate/up into `mlp.c_fc` (rows [gate | up]): one matmul does the work of three (or two).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import tokenizer_dir, tokenizer_files
from housekeeping import (LazyTensor, atomic_write, check_model_size, check_weight, read_json, read_weights,
                          resolve_model_dir, save_safetensors)

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context) the model handles
    vocab_size: int = 50257  # real vocabulary size (GPT-2: 50,000 merges + 256 bytes + <|endoftext|>)
    vocab_pad_multiple: int = 1  # embedding rows rounded up to this multiple (64 -> 50304), see GPT
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query; 1 = multi-query
    n_embd: int = 768
    head_dim: int | None = None  # None = n_embd // n_head
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos_emb: str = "learned"  # learned (GPT-2) | rope (LLaMA)
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # gelu (GPT-2, tanh approximation) | swiglu (LLaMA) | relu2 (relu(x)², modded-nanogpt)
    ffn_hidden: int | None = None  # None: 4*n_embd for gelu, 2/3 of that (rounded up to 64) for swiglu
    bias: bool = True  # biases in linear layers and LayerNorm (GPT-2: True, LLaMA: False)
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # sdpa (fused/flash kernels) | manual (explicit softmax(QK^T)V, for learning)
    # the families built on LLaMA's block (Llama 3.x, Qwen2.5, Qwen3, Mistral): all off is LLaMA-2 exactly
    rope_scaling: dict | None = None  # RoPE run beyond its trained context: {"rope_type": "linear" | "llama3", ...}
    qkv_bias: bool = False  # Qwen2.5: biases on q, k and v only (none on the output projection or the MLP)
    qk_norm_learned: bool = False  # Qwen3: q and k through an RMSNorm per head, with a learned gain over head_dim
    sliding_window: int | None = None  # Mistral v0.1: a token attends to the last sliding_window positions only
    # the modern block's switches (modded-nanogpt, nanochat): all off reproduces GPT-2 / LLaMA exactly
    qk_norm: bool = False  # RMS-normalise each head's q and k: attention logits cannot blow up
    zero_init_proj: bool = False  # residual projections (and an untied lm_head) start at 0: each block is the identity
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), bounded by ±cap (0 = off)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:  # swiglu: 2/3 keeps the parameter count of a 4x GELU MLP with 3 matrices
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd
        for name, allowed in dict(norm=("layernorm", "rmsnorm"), pos_emb=("learned", "rope"), attn_impl=("sdpa",
                                  "manual"), mlp=("gelu", "swiglu", "relu2")).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap={self.logit_softcap}: expected 0 (off) or a positive cap")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            need = ROPE_SCALING_FIELDS.get(kind)
            if need is None or not set(need) <= set(self.rope_scaling):
                raise ValueError(f"GPTConfig.rope_scaling={self.rope_scaling!r}: expected rope_type 'linear' with "
                                 f"{ROPE_SCALING_FIELDS['linear']} or 'llama3' with {ROPE_SCALING_FIELDS['llama3']}")
        if self.qk_norm and self.qk_norm_learned:
            raise ValueError("qk_norm and qk_norm_learned are two forms of one QK-norm: switch on one of them")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: expected None (off) or a window of >= 1 tokens")

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return m * math.ceil(self.vocab_size / m)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# what each kind of RoPE scaling needs (the names of Hugging Face's rope_parameters, so config.json maps 1:1)
ROPE_SCALING_FIELDS = {"linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

_GPT2 = dict(vocab_size=50257, block_size=1024)
_MODERN = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, vocab_size=50257, block_size=1024)
_BLOCK = dict(qk_norm=True, mlp="relu2", tie_embeddings=False, zero_init_proj=True, logit_softcap=15.0)
_LLAMA2 = dict(vocab_size=32000, block_size=4096, norm="rmsnorm", pos_emb="rope", mlp="swiglu",
               bias=False, tie_embeddings=False)
_LLAMA3 = dict(_LLAMA2, vocab_size=128256, block_size=131072, rope_theta=500000.0)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_QWEN = dict(_LLAMA2, block_size=32768, rope_theta=1e6, norm_eps=1e-6)
PRESETS: dict[str, dict] = {
    # OpenAI GPT-2 (vocab padded to 50304 for training from scratch: a multiple of 64 is faster on GPUs)
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, vocab_pad_multiple=64),  # 124M
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, vocab_pad_multiple=64),  # 350M
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280, vocab_pad_multiple=64),  # 774M
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600, vocab_pad_multiple=64),  # 1558M
    # GPT-2 sizes with the LLaMA recipe: RoPE, GQA (2 query heads per kv head), SwiGLU at 2/3, RMSNorm
    "modern-124m": dict(_MODERN, n_layer=12, n_head=12, n_kv_head=6, n_embd=768, vocab_pad_multiple=64),
    "modern-350m": dict(_MODERN, n_layer=24, n_head=16, n_kv_head=8, n_embd=1024, vocab_pad_multiple=64),
    "llama2-7b": dict(_LLAMA2, n_layer=32, n_head=32, n_embd=4096, ffn_hidden=11008),
    # a 135M LLaMA-family shape (SmolLM-135M's: GQA 3:1, tied, 49k vocabulary), small enough for a CPU
    "llama-135m": dict(_LLAMA2, vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                       ffn_hidden=1536, tie_embeddings=True),
    "llama2-13b": dict(_LLAMA2, n_layer=40, n_head=40, n_embd=5120, ffn_hidden=13824),
    # today's open families: the shapes of their config.json (GQA everywhere; Llama 3's 128k context by RoPE scaling)
    "llama3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, ffn_hidden=8192, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336,
                        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "qwen2.5-0.5b": dict(_QWEN, vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_hidden=4864,
                         tie_embeddings=True, qkv_bias=True),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, ffn_hidden=18944,
                       qkv_bias=True),
    "qwen3-0.6b": dict(_QWEN, block_size=40960, vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                       head_dim=128, ffn_hidden=3072, tie_embeddings=True, qk_norm_learned=True),
    "qwen3-8b": dict(_QWEN, block_size=40960, vocab_size=151936, n_layer=36, n_head=32, n_kv_head=8, n_embd=4096,
                     head_dim=128, ffn_hidden=12288, qk_norm_learned=True),
    "mistral-7b": dict(_LLAMA2, vocab_size=32768, block_size=32768, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                       ffn_hidden=14336, rope_theta=1e6),  # v0.3: no sliding window
    # tiny models for tests and CPU experiments
    "tiny-gpt2": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(_LLAMA2, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       ffn_hidden=176),
    "small-cpu": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),  # ~11M, CPU runs
    "small-cpu-llama": dict(_MODERN, vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),  # tied
    # GPT-2 shapes with the modern block's switches (bench_speed.py pretrain; train_gpt2.py --recipe gpt2-124m-muon)
    "small-cpu-modern": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384, **_BLOCK),
    "gpt2-modern": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, vocab_pad_multiple=64, **_BLOCK),
}

# -----------------------------------------------------------------------------------------------
# 2. Modules


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1's `bias` argument)."""

    def __init__(self, dim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias, cheaper and as good (LLaMA).
    Computed in fp32 and cast back, as LLaMA does, so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, config.bias, config.norm_eps)


def rope_cos_sin(head_dim: int, max_len: int, theta: float, device=None, scaling: dict | None = None):
    """Rotary position embedding tables. Each pair of channels (i, i + head_dim/2) of q and k is
    rotated by the angle pos * theta^(-2i/head_dim): the dot product q.k then depends only on the
    distance between the two positions, and no position parameters are learned."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = rope_scaled(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim): the "rotate half" layout of LLaMA/HF
    return angles.cos(), angles.sin()


def rope_scaled(inv_freq, scaling: dict):
    """RoPE frequency scaling: a model pretrained at a context of L positions, then run (after a little
    training) at a longer one. Beyond L, the slowly turning channel pairs would reach angles never seen
    in training; slowing them down keeps their angles within the trained range.
    - linear (position interpolation, Chen et al. 2023): every frequency / factor, so position p looks
      like p / factor. Also blurs the fast channels that tell neighbouring tokens apart.
    - llama3 (Llama 3.1 and 3.2): by wavelength (2 pi / frequency, positions per full turn), against
      L = original_max_position_embeddings:
        - longer than L / low_freq_factor: divided by factor (they never turned once within L);
        - shorter than L / high_freq_factor: kept (they turned many times: local order, already seen);
        - in between: a linear blend of the two, by where L / wavelength lies between the factors."""
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    L = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((L / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: divided by factor; 1: kept
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (B or 1, 1, T, hd). Rotation written as x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that generating token t+1
    runs the model on that one token instead of the whole prefix: O(T) work per new token
    instead of O(T^2). Pre-allocated to `max_len`; `pos` is how many slots are filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k, v):
        """Store this step's k, v (B, Hkv, T, hd) at the next free slots; return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.k.size(3):
            raise ValueError(f"KV cache is full: {t1} positions needed, {self.k.size(3)} allocated")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def reorder(self, index):
        """Beam search: beam i continues from beam index[i], so its cached past must come along."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # q, k and v for all heads in one matmul: rows [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True  # marked for the scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_impl = config.attn_impl
        self.qk_norm = config.qk_norm
        self.qk_norm_learned = config.qk_norm_learned
        if config.qk_norm_learned:
            # Qwen3's QK-norm: each head's q and k through an RMSNorm of head_dim channels, eps norm_eps. It bounds
            # the attention logits as qk_norm does, but learns a gain per channel (shared by the heads: in effect an
            # attention temperature per channel). The gains are weights of the checkpoint, which qk_norm (no gain,
            # eps of the dtype) could not hold: hence a switch of its own
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x, rope=None, mask=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # unit-RMS q and k per head: q.k / sqrt(hd) stays within ±sqrt(hd), no logit growth
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if self.qk_norm_learned:  # the same bound on the attention logits, scaled by a learned gain
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            v = v.contiguous()  # q, k are new tensors: a copy of v lets the fused q|k|v output be freed
        if kv_cache is not None:  # keys are cached after RoPE, so cached positions never change
            k, v = kv_cache.update(layer, k, v)
        # grouped-query attention: each kv head serves n_head/n_kv_head consecutive query heads (a KV cache that
        # many times smaller). SDPA shares them itself (enable_gqa) without a mask; else k, v are repeated
        gqa = self.n_kv_head != self.n_head
        fused_gqa = gqa and self.attn_impl == "sdpa" and mask is None
        if gqa and not fused_gqa:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        # mask None: plain causal attention, or (one new token after a cache) attend to everything
        causal = mask is None and T == k.size(2)
        if self.attn_impl == "sdpa":
            # fused kernel (flash attention on GPU): never materialises the (T, T) attention matrix
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                               **({"enable_gqa": True} if fused_gqa else {}))
        else:
            # the same computation spelled out: softmax(q k^T / sqrt(hd)) v with future positions masked
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), dropout_p, self.training)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, q_dim)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU needs two input projections (gate and up); they are fused into one: rows [gate | up]
        n_out = 2 * config.ffn_hidden if self.swiglu else config.ffn_hidden
        self.c_fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":  # ReLU squared (Primer, So et al. 2021): as cheap as ReLU, smooth at 0
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU ("gelu_new")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). The residual stream
    carries x unchanged from input to output, which is what lets deep stacks train."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits (N, V) against targets (N,), ignoring `ignore_index`: the mean over the counted
    rows ("mean"), or each row's loss, 0 where ignored ("none": DPO's log-probabilities). F.cross_entropy's
    values and gradients in much less memory. Why: with a 50k vocabulary the logits are the step's largest
    tensor (B*T*V floats); F.cross_entropy under autocast copies them to fp32, keeps a full fp32 log-softmax
    for backward and makes another full fp32 gradient. Here the forward reads the logits once, chunk by chunk
    in fp32, keeping one log-sum-exp per row; backward writes softmax - onehot(target) into the gradient."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int = -100, reduction: str = "mean"):
        N, V = logits.shape
        # CPU: small chunks (~8 MB of fp32) stay in the caches; GPU: 8 large chunks (a chunk costs launches)
        chunk = -(-N // 8) if logits.is_cuda else max(1, 2 ** 21 // V)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, chunk):
            lse[i:i + chunk] = torch.logsumexp(logits[i:i + chunk].float(), dim=-1)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        per_row = (lse - target_logit) * valid  # -log softmax(target); 0 where ignored
        n_valid = valid.sum() if reduction == "mean" else torch.ones((), device=logits.device)
        ctx.save_for_backward(logits, safe_targets, valid, lse, n_valid)
        ctx.chunk = chunk
        return per_row.sum() / n_valid if reduction == "mean" else per_row

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, valid, lse, n_valid = ctx.saved_tensors
        grad = torch.empty_like(logits)
        weight = valid.float() * (grad_loss / n_valid)  # d loss / d (per-row loss)
        for i in range(0, logits.size(0), ctx.chunk):
            j = min(i + ctx.chunk, logits.size(0))
            g = logits[i:j].to(torch.float32, copy=True).sub_(lse[i:j, None]).exp_()  # softmax, recomputed
            g[torch.arange(j - i, device=g.device), targets[i:j]] -= 1.0  # minus one-hot(target)
            grad[i:j] = g.mul_(weight[i:j, None])
        return grad, None, None, None


# -----------------------------------------------------------------------------------------------
# 3. The model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        check_model_size(config)  # a size beyond the machine: one error line, before any allocation
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, config.n_embd), drop=nn.Dropout(config.dropout),
                                              h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                                              ln_f=make_norm(config)))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            # one matrix for input and output embeddings: fewer parameters, and the two roles help each other
            # (token -> vector, vector -> token scores; Press & Wolf, 2017)
            self.lm_head.weight = self.transformer.wte.weight
        self.grad_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self._init_buffers()
        self.apply(self._init_weights)

    def after_meta_load(self):
        """Weights were assigned to a model built on the meta device: re-tie lm_head, compute the tables."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._init_buffers()

    def _init_buffers(self):
        """Constant tables, computed rather than stored in checkpoints (persistent=False)."""
        c, V = self.config, self.config.padded_vocab_size
        device = self.transformer.wte.weight.device
        device = "cpu" if device.type == "meta" else device  # from_pretrained builds on meta first
        # Vocab padding: 50257 -> 50304 rows makes the biggest matmul a multiple of 64 (faster kernels). A
        # constant -inf bias (fused into the matmul: free) gives the padded ids probability 0 in the loss, and
        # logits are returned cut to vocab_size, so they are never sampled either.
        pad_bias = None
        if V > c.vocab_size:
            pad_bias = torch.zeros(V, device=device)
            pad_bias[c.vocab_size:] = float("-inf")
        self.register_buffer("vocab_pad_bias", pad_bias, persistent=False)
        if c.pos_emb == "rope":
            cos, sin = rope_cos_sin(c.head_dim, c.block_size, c.rope_theta, device, c.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02). The residual stream sums 2 * n_layer branch outputs (attention + MLP per
        # block): the projections writing into it get std / sqrt(2 * n_layer), so its variance stays about
        # constant with depth. zero_init_proj (modded-nanogpt, nanochat): they, and an untied lm_head, start
        # at 0 instead: every block begins as the identity and the first logits are uniform (loss ln V)
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std /= math.sqrt(2 * self.config.n_layer)
            head = module is self.lm_head and not self.config.tie_embeddings  # tied, it is the embedding
            if self.config.zero_init_proj and (getattr(module, "RESIDUAL_PROJ", False) or head):
                torch.nn.init.zeros_(module.weight)
            else:
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out position embeddings (nanoGPT's: tied, wte is lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---- forward --------------------------------------------------------------------------------

    def _positions(self, B, T, attention_mask, past: int, device):
        if attention_mask is None:
            return torch.arange(past, past + T, device=device).unsqueeze(0)  # (1, T)
        # left-padded batch: a sequence's first real token is position 0, whatever padding precedes it
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, past:past + T]  # (B, T)

    def _attention_mask(self, attention_mask, T: int, past: int, device):
        """Boolean mask (B|1, 1, T, past+T), True = may attend; None = plain causal (SDPA's fastest kernel)."""
        window = self.config.sliding_window
        windowed = window is not None and past + T > window  # only then does the window exclude anything
        if attention_mask is None and (past == 0 or T == 1) and not windowed:
            return None  # causal from scratch, or one new token that may see everything cached
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        mask = torch.arange(S, device=device)[None, :] <= q_pos  # causal (T, S)
        if windowed:
            # Mistral's sliding window: the last `window` positions only (itself included). Information from further
            # back still flows, layer by layer, through the tokens in between. Counted in cache slots, as transformers
            # does: with left padding that is the same as counting positions, since all the padding comes first
            mask = mask & (torch.arange(S, device=device)[None, :] > q_pos - window)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
            # a padding query sees itself: with no key at all softmax gives NaN (pad outputs are never used)
            mask = mask | (torch.arange(S, device=device)[None, :] == q_pos)[None, None]
        return mask

    def hidden_states(self, idx, attention_mask=None, kv_cache: KVCache | None = None):
        """Final normalised hidden states (B, T, n_embd) for token ids idx (B, T)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} positions exceeds the model's context "
                             f"block_size={self.config.block_size}")
        pos = self._positions(B, T, attention_mask, past, idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (B|1, 1, T, hd)
        x = self.transformer.drop(x)
        mask = self._attention_mask(attention_mask, T, past, idx.device)
        for i, block in enumerate(self.transformer.h):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: works when the block's inputs need no grad (frozen embeddings, LoRA)
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def padded_logits(self, h):
        """Output layer over the padded vocabulary; padded ids get -inf (see _init_buffers)."""
        cap = self.config.logit_softcap
        if self.vocab_pad_bias is not None and type(self.lm_head) is nn.Linear and not cap:  # fused into the matmul
            return F.linear(h, self.lm_head.weight, self.vocab_pad_bias.to(h.dtype))
        logits = self.lm_head(h)  # a wrapped lm_head (e.g. LoRA), or a cap: add the bias afterwards
        if cap:
            # soft-capping (Gemma 2, modded-nanogpt): a smooth clamp to ±cap, so no logit grows without bound
            # and dominates the softmax early on; before the pad bias, which must stay -inf
            logits = cap * torch.tanh(logits / cap)
        return logits if self.vocab_pad_bias is None else logits + self.vocab_pad_bias.to(logits.dtype)

    def logits_from_hidden(self, h):
        """Logits of the real vocabulary, (..., vocab_size): a view that cuts the padded ids off."""
        return self.padded_logits(h)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, attention_mask=None, kv_cache: KVCache | None = None, reduction: str = "mean"):
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -100 where no loss is wanted. Returns
        (logits (B, T, vocab_size), loss or None): the mean over counted tokens, or ("none") each token's."""
        logits = self.padded_logits(self.hidden_states(idx, attention_mask, kv_cache))
        loss = None
        if targets is not None:
            # on the padded logits (no copy; padded ids are -inf), in fp32 chunk by chunk (ChunkedCrossEntropy).
            # Under torch.compile plain F.cross_entropy: the compiler fuses it, and would unroll a chunk loop
            flat = logits.view(-1, logits.size(-1))
            if torch.compiler.is_compiling():
                loss = F.cross_entropy(flat.float(), targets.reshape(-1), ignore_index=-100, reduction=reduction)
            else:
                loss = ChunkedCrossEntropy.apply(flat, targets.reshape(-1), -100, reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss
        return logits[..., : self.config.vocab_size], loss

    # ---- FLOPs --------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6 per matmul parameter, plus 12 * n_layer * n_head *
        head_dim * T for attention. An untied input embedding (LLaMA) is a lookup, not a matmul: left out."""
        c = self.config
        n = self.get_num_params() - (0 if c.tie_embeddings else self.transformer.wte.weight.numel())
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # ---- 4. Generation (its helpers follow the class) ---------------------------------------

    @torch.no_grad()
    def decode_layout_(self) -> "GPT":
        """Re-store every nn.Linear weight input-major, in place: same shape (out, in) and values, transposed
        strides (as HF's GPT-2 Conv1D). Why: a decoding step multiplies ONE row x by each weight, a memory-bound
        vector-matrix product, which on CPU (MKL) runs faster in this order (bench_speed.py gen). Same results,
        no memory added, saves stay contiguous. For inference only (training's optimizer would see strides change)."""
        for m in self.modules():
            if type(m) is nn.Linear and m.weight.is_contiguous():
                m.weight.data = m.weight.data.t().contiguous().t()
        return self  # a tied wte is the same Parameter as lm_head.weight, so it follows

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, num_beams: int = 1, use_cache: bool = True,
                 eos_token_id: int | Iterable[int] | None = None, attention_mask=None,
                 pad_token_id: int | None = None, seed: int | None = None, generator=None,
                 length_penalty: float = 1.0, early_stopping: bool = False,
                 stream: Callable[[torch.Tensor], None] | None = None):
        """Continue each sequence of idx by up to max_new_tokens tokens; returns prompt + new tokens.
        idx: (B, T) LongTensor (attention_mask: 0 on left padding), or token-id lists of any lengths.
        temperature: 0 = greedy; else sample logits / temperature among the top_k tokens and/or the
            smallest set whose probability >= top_p.
        num_beams > 1: beam search, with length_penalty (score = sum log p / length ** length_penalty)
            and early_stopping as transformers has them.
        eos_token_id: int or ids that end a sequence; finished ones are filled with pad_token_id (default:
            the first eos id, else 0); generation stops when all are done.
        seed / generator: reproducible sampling. stream(tokens (B,)) gets each step's new tokens.
        use_cache=False recomputes the whole prefix each step (the KV cache removed): same tokens.
        Prompt + max_new_tokens must fit in block_size: an error, not a silent sliding window."""
        was_training = self.training
        self.eval()
        device = self.transformer.wte.weight.device
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        idx, attention_mask = _as_batch(idx, attention_mask, pad_token_id, device)
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {T + max_new_tokens} "
                             f"exceeds the model's context block_size={self.config.block_size}; "
                             f"shorten the prompt or ask for fewer tokens")
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        if hasattr(self, "unshard"):  # FSDP2: gather the root's own weights (the blocks gather theirs)
            self.unshard()
        try:
            if num_beams > 1:
                return self._beam_search(idx, attention_mask, max_new_tokens, num_beams, eos, pad_token_id,
                                         length_penalty, early_stopping, use_cache)
            return self._sample(idx, attention_mask, max_new_tokens, temperature, top_k, top_p, eos,
                                pad_token_id, generator, use_cache, stream)
        finally:
            self.train(was_training)
            if hasattr(self, "reshard"):
                self.reshard()

    def _step_logits(self, seq, mask, cache, n_new: int):
        """Next-token logits (B, vocab) in fp32. With a cache only the n_new newest tokens are run."""
        h = self.hidden_states(seq[:, -n_new:], mask, cache) if cache is not None else self.hidden_states(seq, mask)
        return self.logits_from_hidden(h[:, -1]).float()

    def _sample(self, idx, mask, max_new_tokens, temperature, top_k, top_p, eos, pad_id, generator, use_cache, stream):
        B, T = idx.shape
        cache = self._new_cache(B, T + max_new_tokens) if use_cache else None
        eos_t = torch.tensor(eos, device=idx.device, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seq, n_new = idx, T
        for _ in range(max_new_tokens):
            logits = self._step_logits(seq, mask, cache, n_new)
            if temperature == 0:
                next_tok = logits.argmax(dim=-1)
            else:
                logits = filter_logits(logits / temperature, top_k, top_p)
                next_tok = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)
            seq = torch.cat([seq, next_tok[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            n_new = 1
            if stream is not None:
                stream(next_tok)
            finished |= torch.isin(next_tok, eos_t)
            if finished.all():
                break
        return seq

    def _new_cache(self, batch_size, max_len):
        w = self.transformer.wte.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        return KVCache(self.config, batch_size, max_len, w.device, dtype)

    def _beam_search(self, idx, mask, max_new_tokens, num_beams, eos, pad_id, length_penalty, early_stopping,
                     use_cache):
        """Beam search as transformers does it. Each step extends every live beam by every token and keeps
        the best 2 * num_beams candidates (by summed log-probability), so num_beams stay live even if some
        end. An ending candidate (EOS, length limit) ranked within the top num_beams is a finished
        hypothesis, scored sum_logprob / length**length_penalty. Stops once no live beam can beat the worst
        of num_beams finished ones (early_stopping=False: a live beam's best hope is its current score),
        when num_beams are finished (early_stopping=True), or at the limit. Returns the best finished one."""
        B, T = idx.shape
        V, nb, dev = self.config.vocab_size, num_beams, idx.device
        K = max(2, 1 + len(eos)) * nb
        L = T + max_new_tokens
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
        running = torch.full((B, nb, L), pad_id, dtype=torch.long, device=dev)
        running[:, :, :T] = idx[:, None]
        running_scores = torch.zeros(B, nb, device=dev)
        running_scores[:, 1:] = -1e9  # all beams start identical: only beam 0 may expand at step 1
        finished = running.clone()
        finished_scores = torch.full((B, nb), -1e9, device=dev)
        finished_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
        is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
        can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
        flat_mask = None if mask is None else mask.repeat_interleave(nb, dim=0)
        cache = self._new_cache(B * nb, L) if use_cache else None
        n_new = T
        arange_b = torch.arange(B, device=dev)[:, None]
        for step in range(max_new_tokens):
            cur = T + step  # tokens so far
            seq = running[:, :, :cur].reshape(B * nb, cur)
            logp = F.log_softmax(self._step_logits(seq, flat_mask, cache, n_new), dim=-1)
            total = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
            top_scores, top_idx = torch.topk(total, K)  # (B, K)
            top_beam, top_tok = top_idx // V, top_idx % V
            cand = running[arange_b, top_beam].clone()  # (B, K, L)
            cand[:, :, cur] = top_tok
            ends = torch.isin(top_tok, eos_t) | (step + 1 == max_new_tokens)
            # live beams for the next step: the best nb candidates that did not end
            live_scores = top_scores + ends.float() * -1e9
            keep = torch.topk(live_scores, nb).indices
            running = cand[arange_b, keep]
            running_scores = live_scores.gather(1, keep)
            parent = top_beam.gather(1, keep)
            # finished hypotheses: merge the ended top-nb candidates with the kept ones, keep the best nb
            gen_len = step + 1
            new_scores = top_scores / gen_len ** length_penalty
            admitted = ends & (torch.arange(K, device=dev) < nb)[None]
            admitted &= can_improve & ~(is_finished.all(1, keepdim=True) & early_stopping)
            new_scores = torch.where(admitted, new_scores, torch.full_like(new_scores, -1e9))
            all_seqs = torch.cat([finished, cand], 1)
            all_scores = torch.cat([finished_scores, new_scores], 1)
            all_len = torch.cat([finished_len, torch.full_like(top_tok, gen_len)], 1)
            all_fin = torch.cat([is_finished, admitted], 1)
            best = torch.topk(all_scores, nb).indices
            finished, finished_scores = all_seqs[arange_b, best], all_scores.gather(1, best)
            finished_len, is_finished = all_len.gather(1, best), all_fin.gather(1, best)
            if cache is not None:
                cache.reorder((parent + arange_b * nb).view(-1))
            if flat_mask is not None:
                flat_mask = torch.cat([flat_mask, torch.ones_like(flat_mask[:, :1])], dim=1)
            n_new = 1
            # can a live beam still beat the worst finished one? (once not, never again)
            best_live = running_scores[:, :1] / gen_len ** length_penalty
            worst_done = torch.where(is_finished, finished_scores.min(1, keepdim=True).values,
                                     torch.full_like(finished_scores, -1e9))
            can_improve &= (best_live > worst_done).any(1, keepdim=True)
            if not can_improve.any() or bool(ends.all()) or (early_stopping and bool(is_finished.all())):
                break
        n_out = int(finished_len[:, 0].max())
        return finished[:, 0, : T + n_out]

    # ---- Hugging Face weights in and out: the appendix (section 6) does the work ------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dtype=None, device=None) -> "GPT":
        """Load OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", via the HF hub cache), a hub
        id, or a directory: HF's format (config.json of model_type gpt2, llama, mistral, qwen2 or qwen3 +
        model.safetensors, shards with an index, or pytorch_model.bin) or ours (gpt_config.json,
        save_pretrained(format="native")), in dtype (float32) on device (cpu). Built on the meta device, each
        tensor assigned as read: held once."""
        return load_model_dir(cls, name_or_dir, dtype, device)

    def save_pretrained(self, out_dir: str, format: str = "hf", tokenizer=None):
        """Write `out_dir` as a model stock transformers loads with no custom code: config.json (model_type
        gpt2, or for rmsnorm + rope + swiglu the family of its switches: llama, qwen2, qwen3 or mistral) +
        model.safetensors, the tokenizer (tokenizer.json +
        tokenizer_config.json: AutoTokenizer and lm-evaluation-harness need it beside the weights) and
        generation_config.json (the end-of-text id, where HF generate stops). format="native": our own
        gpt_config.json, for any config. tokenizer: a bpe.Tokenizer or a directory (None: the model's own, if
        any). Every file is written to a temporary name and renamed."""
        write_model_dir(self, out_dir, format, tokenizer)


# -----------------------------------------------------------------------------------------------
# 4. Generation, continued: the helpers GPT.generate uses


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """-inf on every logit outside the sampling set: top_k keeps the k largest; top_p (nucleus) the smallest
    set of most likely tokens reaching probability top_p (with the one that crosses it: never empty)."""
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above this one
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _as_batch(idx, attention_mask, pad_id, device):
    """A (B, T) tensor passes through; token lists are left-padded (new tokens share a column), with a mask."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 1:
            idx = idx[None]
        idx = idx.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if attention_mask.shape != idx.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != idx shape {tuple(idx.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None
        return idx, attention_mask
    seqs = [list(s) for s in idx]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("generate needs at least one non-empty prompt")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


# -----------------------------------------------------------------------------------------------
# 5. The optimizers: parameter groups, AdamW, Muon, and the learning-rate schedule


OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "rmsprop": 1, "sgd_momentum": 1, "sgd_nesterov": 1, "sgd": 0}


def make_optimizer(model, name: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), fused: bool = False, matrix_lr: float = 0.02):
    """The optimizer over the trainable parameters. Weight decay only on 2-D tensors (matmuls, embeddings,
    LoRA's A and B): shrinking biases and norm gains only hurts. AdamW decays the weights (decoupled), Adam
    adds it to the gradient. fused: one CUDA kernel for all. "muon": MuonAdamW, matrix_lr for Muon's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if name == "muon":
        return MuonAdamW(model, params, lr, matrix_lr, weight_decay, betas, fused)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name in ("adamw", "adam"):
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr, betas=betas,
                                                                            fused=fused or None)
    if name == "rmsprop":  # what the DPO paper's reference implementation used
        return torch.optim.RMSprop(groups, lr=lr)
    if name in ("sgd", "sgd_momentum", "sgd_nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=0.0 if name == "sgd" else 0.9, nesterov=name == "sgd_nesterov")
    raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZER_STATES)} or muon")


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz, K. Jordan 2024): SGD momentum whose matrix M = U S V^T
    is replaced by about U V^T (a few Newton-Schulz iterations: matmuls, no SVD) before each update. A
    transformer's gradients are nearly low-rank, and elementwise Adam moves mostly along the few dominant
    directions; with every singular value 1, the rare directions move as fast as the common ones. A step
    has a fixed size (lr, x sqrt(rows/cols) if tall): Muon's lr is far above AdamW's. torch.optim.Muon's
    update and state (Nesterov, no weight decay); the iterations in bf16 on a GPU, fp32 on a CPU (faster)."""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):  # closure: torch's checkpointing calls it so (a zero-gradient step)
        for group in self.param_groups:
            for p in [p for p in group["params"] if p.grad is not None]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]).to(torch.bfloat16 if p.is_cuda else torch.float32)
                X = (g.T if p.size(0) > p.size(1) else g) / g.norm().clamp(min=1e-7)  # wide; singular values <= 1
                for _ in range(5):  # X <- a X + (b A + c A^2) X, A = X X^T: a quintic steepest at 0 (a, b, c)
                    A = X @ X.T
                    X = torch.addmm(X, torch.addmm(A, A, A, beta=-4.775, alpha=2.0315), X, beta=3.4445)
                X = X.T if p.size(0) > p.size(1) else X
                p.add_(X.to(p.dtype), alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


class MuonAdamW:
    """Muon for the 2-D matrices inside the blocks (group["muon"] = True), AdamW for the rest: the embeddings
    (a row is looked up, not multiplied), the output layer (a row is one token's scores), norms, biases; one
    optimizer to the loop. Fused q|k|v and gate|up are orthogonalised whole. DDP: every rank computes the same
    update. FSDP: refused (the orthogonalised shard of a matrix is not a shard of the orthogonalised matrix)."""

    def __init__(self, model, params, lr: float, matrix_lr: float, weight_decay: float, betas, fused: bool):
        if any(hasattr(p, "full_tensor") for p in params):
            raise ValueError("--optimizer muon needs whole matrices, but FSDP gives each rank a shard; use DDP "
                             "(every rank then computes the same Muon update) or --optimizer adamw")
        in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
        matrices = [p for p in params if p.dim() == 2 and id(p) in in_blocks]
        rest = [p for p in params if id(p) not in {id(q) for q in matrices}]
        self.muon = Muon([{"params": matrices, "muon": True}], lr=matrix_lr)
        self.adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                                        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                       lr=lr, betas=betas, fused=fused or None)

    @property
    def torch_optimizers(self) -> list:
        """The two torch optimizers, for torch's checkpointing (which knows no wrapper)."""
        return [self.muon, self.adamw]

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the saved optimizer state is not Muon + AdamW's (trained with --optimizer adamw?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def lr_schedule(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0, schedule: str = "cosine",
                warmdown_frac: float = 0.2) -> float:
    """The learning rate at `step` as a multiplier of each parameter group's peak (its own: AdamW's lr,
    Muon's matrix_lr), so that one schedule serves every group. The loop sets
    group["lr"] = peak * lr_schedule(step, ...) before each optimizer step.
    - Warmup: linear from 1/warmup_steps to 1. At first Adam's moments are empty and the gradients
      large and erratic; a full-size step could throw the weights off for good.
    - cosine: from 1 down to min_lr_ratio at max_steps, then flat. Big steps far from a minimum,
      smaller ones to settle into it.
    - wsd (warmup-stable-decay, nanochat): 1 until the last warmdown_frac of the run, then linear down
      to min_lr_ratio: full speed for most of the run, and a run can be extended before its decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - round(warmdown_frac * max_steps))
        progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 + (min_lr_ratio - 1.0) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + 0.5 * (1.0 - min_lr_ratio) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------------------------
# 6. Appendix: Hugging Face weights in and out. Plumbing, not the model: mapping the names of each family's
#    checkpoints onto ours, checking every tensor, writing them back. Reading and writing the weight FILES
#    (safetensors, shards, torch pickles refused; the hub download) is generic: housekeeping.py, section 9


def _gpt2_config_from_hf(h: dict, path: Path) -> GPTConfig:
    act = h.get("activation_function", "gelu_new")
    problems = []
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        problems.append(f"activation_function={act!r} (only the tanh GELU of GPT-2 is implemented)")
    if h.get("scale_attn_by_inverse_layer_idx") or h.get("reorder_and_upcast_attn"):
        problems.append("scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn")
    if h.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights=false")
    if problems:
        raise ValueError(f"{path / 'config.json'}: unsupported GPT-2 option(s): {', '.join(problems)}")
    return GPTConfig(block_size=h["n_positions"], vocab_size=h["vocab_size"], n_layer=h["n_layer"],
                     n_head=h["n_head"], n_embd=h["n_embd"], ffn_hidden=h.get("n_inner") or 4 * h["n_embd"],
                     norm_eps=h.get("layer_norm_epsilon", 1e-5), bias=True,
                     tie_embeddings=h.get("tie_word_embeddings", True), vocab_pad_multiple=64)


# The families built on LLaMA's block: one reader, their differences as GPTConfig switches; their HF classes
LLAMA_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def _llama_config_from_hf(h: dict, path: Path) -> GPTConfig:
    family = h["model_type"]
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    rope_scaling = None
    if rope_type in ROPE_SCALING_FIELDS:
        missing = [k for k in ROPE_SCALING_FIELDS[rope_type] if k not in rope]
        if missing:
            problems.append(f"rope type {rope_type!r} without {', '.join(missing)}")
        rope_scaling = {"rope_type": rope_type, **{k: rope[k] for k in ROPE_SCALING_FIELDS[rope_type] if k in rope}}
    elif rope_type != "default":
        problems.append(f"rope type {rope_type!r} (implemented: default, linear, llama3)")
    if h.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={h['hidden_act']!r}")
    if bool(h.get("attention_bias", False)) != bool(h.get("mlp_bias", False)):
        problems.append("attention_bias != mlp_bias (one bias switch covers both)")
    # Qwen's sliding window is per layer (layer_types, max_window_layers): only Mistral's, on every layer, is here
    per_layer = h.get("use_sliding_window") or any(t != "full_attention" for t in h.get("layer_types") or [])
    if family in ("qwen2", "qwen3") and per_layer:
        problems.append("use_sliding_window / layer_types (a sliding window on some layers)")
    n_head = h["num_attention_heads"]
    head_dim = h.get("head_dim") or h["hidden_size"] // n_head
    if problems:
        raise ValueError(f"{path / 'config.json'}: unsupported {family} option(s): {', '.join(problems)}")
    return GPTConfig(block_size=h.get("max_position_embeddings", 2048), vocab_size=h["vocab_size"],
                     n_layer=h["num_hidden_layers"], n_head=n_head,
                     n_kv_head=h.get("num_key_value_heads") or n_head, n_embd=h["hidden_size"], head_dim=head_dim,
                     norm="rmsnorm", norm_eps=h.get("rms_norm_eps", 1e-6), pos_emb="rope",
                     rope_theta=rope.get("rope_theta", h.get("rope_theta", 10000.0)), mlp="swiglu",
                     ffn_hidden=h["intermediate_size"], bias=bool(h.get("attention_bias", False)),
                     tie_embeddings=bool(h.get("tie_word_embeddings", False)), vocab_pad_multiple=64,
                     rope_scaling=rope_scaling, qkv_bias=family == "qwen2", qk_norm_learned=family == "qwen3",
                     sliding_window=h.get("sliding_window") if family == "mistral" else None)


class _Derived:
    """A tensor computed from others at load time (a transpose, a concatenation). Each part is checked as the
    file holds it, under the file's name: torch.cat would promote a damaged part stored as integers to float."""

    def __init__(self, fn, parts, shape, names):
        self.fn, self.parts, self.shape, self.names = fn, parts, shape, names

    def load(self):
        parts = [p.load() for p in self.parts]
        for part, name, w in zip(self.parts, self.names, parts):
            check_weight(part.file, name, w)
        return self.fn(*parts)


def _transposed(t: LazyTensor, name: str):
    return _Derived(lambda w: w.t(), [t], t.shape[::-1], [name])


def _concat(ts: list, names: list):
    if any(len(t.shape) != len(ts[0].shape) for t in ts):
        return _Derived(lambda *w: torch.cat(w, 0), ts, (-1,), names)  # mismatch is reported by the shape check
    return _Derived(lambda *w: torch.cat(w, 0), ts, (sum(t.shape[0] for t in ts),) + tuple(ts[0].shape[1:]), names)


def _llama_names(c: GPTConfig):
    """(our name, its HF names) of every tensor of the LLaMA families; a fused tensor stacks its HF tensors' rows."""
    yield "transformer.wte.weight", ["model.embed_tokens.weight"]
    yield "transformer.ln_f.weight", ["model.norm.weight"]
    if not c.tie_embeddings:
        yield "lm_head.weight", ["lm_head.weight"]
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        yield q + "ln_1.weight", [p + "input_layernorm.weight"]
        yield q + "ln_2.weight", [p + "post_attention_layernorm.weight"]
        for s in ["weight"] + (["bias"] if c.bias else []):
            yield q + f"attn.c_attn.{s}", [p + f"self_attn.{n}_proj.{s}" for n in "qkv"]
            yield q + f"attn.c_proj.{s}", [p + f"self_attn.o_proj.{s}"]
            yield q + f"mlp.c_fc.{s}", [p + f"mlp.{n}_proj.{s}" for n in ("gate", "up")]
            yield q + f"mlp.c_proj.{s}", [p + f"mlp.down_proj.{s}"]
        if c.qkv_bias and not c.bias:  # Qwen2.5: the q, k, v biases alone
            yield q + "attn.c_attn.bias", [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if c.qk_norm_learned:  # Qwen3
            yield q + "attn.q_norm.weight", [p + "self_attn.q_norm.weight"]
            yield q + "attn.k_norm.weight", [p + "self_attn.k_norm.weight"]


def _hf_to_ours(tensors: dict, config: GPTConfig, hf_type: str) -> dict:
    """HF tensors renamed (transposed, fused) to ours, lazily; unknown names kept: reported as unexpected."""
    out, used = {}, set()

    def take(name):
        used.add(name)
        return tensors.get(name)

    if hf_type == "gpt2":
        # OpenAI's checkpoint stores h.0... at top level, newer saves prefix "transformer."
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                   for k, v in tensors.items()}
        for k, v in tensors.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                used.add(k)  # causal-mask buffers of old HF versions, not weights
            elif k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                out[k] = _transposed(v, k)  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                used.add(k)
        for k, v in tensors.items():
            if k not in used:
                out[k] = v
                used.add(k)
        if config.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    # llama
    for k in list(tensors):
        if k.endswith("rotary_emb.inv_freq"):
            used.add(k)
    if config.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store it anyway
    for ours, names in _llama_names(config):
        parts = [take(n) for n in names]
        if None not in parts:
            out[ours] = parts[0] if len(parts) == 1 else _concat(parts, names)
    for k, v in tensors.items():
        if k not in used:
            out[k] = v  # unknown: reported as unexpected
    return out


def _check_and_collect(tensors: dict, expected: dict, path: Path, dtype, device, config: GPTConfig,
                       file_names: dict) -> dict:
    """Compare the checkpoint's tensors with the model's, report every problem at once, then read, cast and
    move one tensor at a time. A 50257-row vocabulary gets zero rows up to the model's padded size.
    file_names: {our name: the file's names} where they differ, so that an error names what the file holds (or
    lacks)."""
    exp, V = dict(expected), config.vocab_size
    tied = config.tie_embeddings and "lm_head.weight" not in tensors

    def named(k):
        return f"{k} (the file's {' + '.join(file_names[k])})" if k in file_names else k

    def padded(k):  # a vocabulary-sized embedding of a model whose rows are padded up (filled with zeros below)
        return k in ("transformer.wte.weight", "lm_head.weight") and tuple(tensors[k].shape) == (V, exp[k].shape[1])

    missing = [named(k) for k in exp if k not in tensors and not (k == "lm_head.weight" and tied)]
    unexpected = [k for k in tensors if k not in exp]
    bad_shape = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(exp[k].shape)}" for k in exp
                 if k in tensors and tuple(tensors[k].shape) != tuple(exp[k].shape) and not padded(k)]
    if missing or unexpected or bad_shape:
        problems = [f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
                    if items]
        raise ValueError(f"{path}: checkpoint does not match the model built from its config: " + "; ".join(problems))
    state = {}
    for k in exp:
        src = tensors["transformer.wte.weight" if (k == "lm_head.weight" and tied) else k]
        t = src.load()
        if not isinstance(src, _Derived):  # (a derived tensor checked its parts): a float weight stored as integers
            check_weight(src.file, named(k), t, exp[k].is_floating_point())
        if t.shape[0] < exp[k].shape[0]:
            t = torch.cat([t, t.new_zeros(exp[k].shape[0] - t.shape[0], *t.shape[1:])])
        state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
        if k == "lm_head.weight" and tied:
            state[k] = state["transformer.wte.weight"]
    return state


def hf_config_for(c: GPTConfig, source_family: str | None = None) -> tuple[str, dict]:
    """The HF config (model_type, config.json dict) that expresses our config, or a clear error. source_family:
    the model_type the model was loaded from, kept where the config allows it (see _llama_family)."""
    gpt2_like = c.norm == "layernorm" and c.pos_emb == "learned" and c.mlp == "gelu" and c.n_kv_head == c.n_head
    gpt2_like = gpt2_like and not c.qk_norm_learned and c.sliding_window is None  # HF GPT-2 has neither
    llama_like = c.norm == "rmsnorm" and c.pos_emb == "rope" and c.mlp == "swiglu"
    if gpt2_like and c.head_dim * c.n_head == c.n_embd:
        # HF GPT-2 always has biases: a bias-free model is written with zero biases (exactly equivalent)
        return "gpt2", dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_positions=c.block_size,
            n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ffn_hidden,
            activation_function="gelu_new", layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=c.vocab_size - 1,
            eos_token_id=c.vocab_size - 1, torch_dtype="float32")
    if llama_like:
        family = _llama_family(c, source_family)
        rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
        d = dict(
            model_type=family, architectures=[LLAMA_FAMILIES[family]], vocab_size=c.vocab_size,
            max_position_embeddings=c.block_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
            head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            rope_parameters=rope, rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_embeddings,
            attention_dropout=c.dropout, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
        if family == "llama":
            d.update(attention_bias=c.bias, mlp_bias=c.bias)
        elif family == "mistral":
            d.update(sliding_window=c.sliding_window)
        else:  # Qwen's config classes have a default window (off by use_sliding_window): off, written out
            d.update(sliding_window=None, use_sliding_window=False)
        return family, d
    raise ValueError(
        f"this config cannot be expressed as a Hugging Face model: GPT-2 needs layernorm + learned positions + gelu "
        f"+ n_kv_head == n_head (and neither qk_norm_learned nor sliding_window), LLaMA needs rmsnorm + rope + "
        f"swiglu; got norm={c.norm}, pos_emb={c.pos_emb}, mlp={c.mlp}, n_kv_head={c.n_kv_head}/{c.n_head}, "
        f"qk_norm_learned={c.qk_norm_learned}, sliding_window={c.sliding_window}. Use "
        f"save_pretrained(dir, format='native') instead.")


def _llama_family(c: GPTConfig, source_family: str | None = None) -> str:
    """The family whose HF class computes what this LLaMA-like config does (each switch is one family's), or a
    clear error where none does. A Mistral without a window (v0.2 on) is LLaMA's architecture: it stays a
    mistral when it was loaded as one, and a llama otherwise."""
    family = "llama"
    if c.qk_norm_learned:
        family = "qwen3"
    elif c.qkv_bias:
        family = "qwen2"
    elif c.sliding_window is not None or (source_family == "mistral" and not c.bias):
        family = "mistral"
    conflicts = []
    if family != "llama" and c.bias:
        conflicts.append("bias=True (biases on every linear layer: LLaMA's attention_bias + mlp_bias)")
    if family == "qwen3" and c.qkv_bias:
        conflicts.append("qkv_bias with qk_norm_learned")
    if family in ("qwen2", "qwen3") and c.sliding_window is not None:
        conflicts.append("a sliding window with Qwen's switches")
    if conflicts:
        raise ValueError(f"this config cannot be expressed as a Hugging Face {family} model: {'; '.join(conflicts)}. "
                         f"Use save_pretrained(dir, format='native') instead.")
    return family


def ours_to_hf(sd: dict, c: GPTConfig, hf_type: str) -> dict:
    V = c.vocab_size  # padded rows are never used: they are cut off
    out = {}
    if hf_type == "gpt2":
        for k, v in sd.items():
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:V]
            if k == "lm_head.weight" and c.tie_embeddings:
                continue
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                v = v.t()
            out[k] = v
            if not c.bias and k.endswith(".weight") and not k.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
                n_out = v.shape[1] if v.dim() == 2 else v.shape[0]
                out[k[: -len("weight")] + "bias"] = torch.zeros(n_out, dtype=v.dtype)
        return out
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    for ours, names in _llama_names(c):
        v = sd[ours][:V] if ours in ("transformer.wte.weight", "lm_head.weight") else sd[ours]
        if len(names) == 1:
            out[names[0]] = v
        else:  # fused rows [q | k | v] or [gate | up]
            out.update(zip(names, v.split([q_dim, kv_dim, kv_dim] if len(names) == 3 else v.shape[0] // 2, dim=0)))
    return out


def load_model_dir(cls, name_or_dir: str, dtype=None, device=None):
    """GPT.from_pretrained: the model in a directory or on the hub, built on meta, each tensor assigned as read."""
    path = resolve_model_dir(name_or_dir)
    dtype = dtype or torch.float32
    if (path / "gpt_config.json").exists():
        config = GPTConfig.from_dict(read_json(path / "gpt_config.json"))
        hf_type = None
    elif (path / "config.json").exists():
        hf_config = read_json(path / "config.json")
        hf_type = hf_config.get("model_type")
        read = _gpt2_config_from_hf if hf_type == "gpt2" else _llama_config_from_hf
        if hf_type != "gpt2" and str(hf_type) not in LLAMA_FAMILIES:
            raise ValueError(f"{path / 'config.json'}: model_type={hf_type!r} is not supported; expected gpt2, "
                             f"{', '.join(LLAMA_FAMILIES)} (use transformers for other architectures)")
        config = read(hf_config, path)
    else:
        raise FileNotFoundError(f"{path}: not a model directory: expected config.json (Hugging Face "
                                f"format) or gpt_config.json (this project's format)")
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    tensors = read_weights(path)  # name -> lazily loaded tensor
    file_names = {}
    if hf_type is not None:
        if hf_type != "gpt2":  # our name -> the file's names (of a fused tensor that is missing: the absent parts)
            file_names = {ours: [n for n in names if n not in tensors] or names for ours, names in _llama_names(config)}
        tensors = _hf_to_ours(tensors, config, hf_type)
    state = _check_and_collect(tensors, expected, path, dtype, device or "cpu", config, file_names)
    model.load_state_dict(state, strict=True, assign=True)
    model.after_meta_load()
    if device is not None:
        model.to(device)
    model.source_dir = path  # where its tokenizer is, for save_pretrained
    model.source_family = hf_type  # the model_type it came as (None: ours), which save_pretrained keeps
    return model.eval()


def write_model_dir(model, out_dir: str, format: str = "hf", tokenizer=None):
    """GPT.save_pretrained: config, weights, tokenizer and generation config, each file written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    src = tokenizer if tokenizer is not None else tokenizer_dir(getattr(model, "source_dir", None) or out)
    tok_files, stops, bos = tokenizer_files(src) if src is not None else ({}, [], None)
    eos = stops[-1] if stops else None  # the end-of-text token (a chat template's end of turn comes before it)
    bos = eos if bos is None else bos  # GPT-2 begins and ends a document with the same token
    # HF's generate stops at any of a list: an instruct model at the end of its turn as well as of its text
    eos_ids = stops if len(stops) > 1 else eos
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "native":
        if c.tie_embeddings:
            sd.pop("lm_head.weight")  # safetensors refuses shared storage; re-tied on load
        config_json, weights, config_name = asdict(c), sd, "gpt_config.json"
    elif format == "hf":
        modern = [f"{k}={getattr(c, k)!r}" for k in ("qk_norm", "logit_softcap") if getattr(c, k)]
        if modern:  # HF's GPT-2 and LLaMA have no such switch: the weights would load but compute otherwise
            raise ValueError(f"{out_dir}: {', '.join(modern)} cannot be expressed as a Hugging Face GPT-2 or "
                             f"LLaMA model; save with format='native' (this project's own format) instead")
        hf_type, config_json = hf_config_for(c, getattr(model, "source_family", None))
        weights, config_name = ours_to_hf(sd, c, hf_type), "config.json"
        if eos is not None:  # the tokenizer's ids, so that HF pipelines know where text ends
            config_json.update(bos_token_id=bos, eos_token_id=eos_ids)
    else:
        raise ValueError(f"format={format!r}: expected 'hf' or 'native'")
    weights = {k: v.contiguous().cpu() for k, v in weights.items()}
    save_safetensors(weights, out / "model.safetensors", {"format": "pt"})
    files = {config_name: json.dumps(config_json, indent=2), **tok_files}
    if eos is not None:
        files["generation_config.json"] = json.dumps(dict(bos_token_id=bos, eos_token_id=eos_ids, pad_token_id=eos),
                                                     indent=2)
    for name, data in files.items():
        atomic_write(out / name, lambda p, d=data: Path(p).write_bytes(d if isinstance(d, bytes) else d.encode()))
    # files of an earlier save in another format must not linger beside these weights
    for stale in ("config.json" if config_name == "gpt_config.json" else "gpt_config.json",
                  "model.safetensors.index.json", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
