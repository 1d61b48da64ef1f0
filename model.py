"""
model.py: one GPT class for the GPT-2 and LLaMA families, readable top to bottom.

What is in here, in reading order:
  1. GPTConfig: one dataclass whose switches (norm, positions, attention heads, MLP, bias, tying)
     cover GPT-2 and LLaMA-2 without a second model class, plus named presets.
  2. The modules: norms, rotary embeddings, causal self-attention (SDPA or a manual path kept
     for learning), MLP (GELU or SwiGLU), the transformer block.
  3. GPT: forward + loss, GPT-2 initialisation, optimizer groups, MFU.
  4. Hugging Face weights in (`GPT.from_pretrained`) and out (`model.save_pretrained`).
  5. Generation with a KV cache: greedy, temperature, top-k, top-p, beam search, stop tokens,
     batched prompts of different lengths, streaming.
  6. A tokenizer helper and a small sampling CLI.

Run it:
    python model.py --init_from gpt2 --prompt "Hello, I'm a language model,"
    python model.py --init_from path/to/hf_or_our_checkpoint_dir --prompt "..." --top_p 0.9
    python model.py --help

Use it:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("gpt2"))               # random init, for pretraining
    model = GPT.from_pretrained("gpt2")                  # OpenAI's weights via the HF hub cache
    logits, loss = model(idx, targets)                   # logits: (B, T, vocab_size)
    out = model.generate(idx, 50, temperature=0.8, top_k=200)
    model.save_pretrained("out/hf")                      # loads in transformers.AutoModelForCausalLM

Parameter names follow Hugging Face's GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`,
`lm_head`, ...). LLaMA checkpoints are mapped onto the same names: q/k/v projections are fused into
`c_attn` (rows [q | k | v]) and the SwiGLU gate/up projections into `mlp.c_fc` (rows [gate | up]),
so one matmul does the work of three (or two).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    mlp: str = "gelu"  # gelu (GPT-2, tanh approximation) | swiglu (LLaMA)
    ffn_hidden: int | None = None  # None: 4*n_embd for gelu, 2/3 of that (rounded up to 64) for swiglu
    bias: bool = True  # biases in linear layers and LayerNorm (GPT-2: True, LLaMA: False)
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # sdpa (fused/flash kernels) | manual (explicit softmax(QK^T)V, for learning)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":  # 2/3 keeps the parameter count of a 4x GELU MLP with 3 matrices
                self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.ffn_hidden = 4 * self.n_embd
        for name, value, allowed in (
            ("norm", self.norm, ("layernorm", "rmsnorm")),
            ("pos_emb", self.pos_emb, ("learned", "rope")),
            ("mlp", self.mlp, ("gelu", "swiglu")),
            ("attn_impl", self.attn_impl, ("sdpa", "manual")),
        ):
            if value not in allowed:
                raise ValueError(f"GPTConfig.{name}={value!r}: expected one of {allowed}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")

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


_GPT2 = dict(vocab_size=50257, block_size=1024)
_MODERN = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, vocab_size=50257, block_size=1024)
_LLAMA2 = dict(vocab_size=32000, block_size=4096, norm="rmsnorm", pos_emb="rope", mlp="swiglu",
               bias=False, tie_embeddings=False)
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
    "llama2-13b": dict(_LLAMA2, n_layer=40, n_head=40, n_embd=5120, ffn_hidden=13824),
    # tiny models for tests and CPU experiments
    "tiny-gpt2": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(_LLAMA2, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       ffn_hidden=176),
    "small-cpu": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),  # ~11M, CPU runs
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


def rope_cos_sin(head_dim: int, max_len: int, theta: float, device=None):
    """Rotary position embedding tables. Each pair of channels (i, i + head_dim/2) of q and k is
    rotated by the angle pos * theta^(-2i/head_dim): the dot product q.k then depends only on the
    distance between the two positions, and no position parameters are learned."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim): the "rotate half" layout of LLaMA/HF
    return angles.cos(), angles.sin()


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
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True  # marked for the scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_impl = config.attn_impl

    def forward(self, x, rope=None, mask=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # keys are cached after RoPE, so cached positions never change
            k, v = kv_cache.update(layer, k, v)
        if self.n_kv_head != self.n_head:
            # grouped-query attention: each kv head serves n_head/n_kv_head consecutive query heads.
            # Fewer kv heads = a smaller KV cache; the copy here costs compute, not cached memory.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        # mask None: plain causal attention, or (one new token after a cache) attend to everything
        causal = mask is None and T == k.size(2)
        if self.attn_impl == "sdpa":
            # fused kernel (flash attention on GPU): never materialises the (T, T) attention matrix
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
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
        x = x + self.mlp(self.ln_2(x))
        return x


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), ignoring `ignore_index`; the same
    value and gradient as F.cross_entropy, with much less memory traffic.

    Why: with a 50k vocabulary the logits are the largest tensor of the whole step (B*T*V floats,
    more than all the activations of a small model). F.cross_entropy under autocast first copies
    them to fp32, then writes a full fp32 log-softmax and keeps it for backward, whose gradient is
    another full fp32 tensor cast back to bf16. Here the forward reads the logits once, a chunk of
    rows at a time (upcast to fp32 only chunk by chunk), and keeps just one log-sum-exp per row;
    backward rebuilds softmax(logits) - onehot(target) chunk by chunk straight into the gradient."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int = -100):
        N, V = logits.shape
        chunk = max(1, 2 ** 21 // V)  # ~8 MB of fp32 per chunk
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, chunk):
            lse[i:i + chunk] = torch.logsumexp(logits[i:i + chunk].float(), dim=-1)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        n_valid = valid.sum()
        loss = ((lse - target_logit) * valid).sum() / n_valid  # -log softmax(target), averaged
        ctx.save_for_backward(logits, safe_targets, valid, lse, n_valid)
        ctx.chunk = chunk
        return loss

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
        return grad, None, None


# -----------------------------------------------------------------------------------------------
# 3. The model

# Dense bf16 tensor-core peak FLOP/s, for MFU (model FLOPs utilisation). Matched against the CUDA
# device name, most specific first.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16
    "T4": 65e12,  # fp16
}


def gpu_peak_flops(device_name: str) -> float | None:
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            # input and output embeddings share one matrix: fewer parameters, and the two roles
            # (token -> vector, vector -> token scores) reinforce each other (Press & Wolf, 2017)
            self.lm_head.weight = self.transformer.wte.weight
        self.grad_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self._init_buffers()
        self.apply(self._init_weights)

    def _init_buffers(self):
        """Constant tables, computed rather than stored in checkpoints (persistent=False)."""
        c, V = self.config, self.config.padded_vocab_size
        device = self.transformer.wte.weight.device
        device = "cpu" if device.type == "meta" else device  # from_pretrained builds on meta first
        # Vocab padding: 50257 -> 50304 rows makes the biggest matmul a multiple of 64 (faster kernels).
        # The padded ids must never be predicted: a constant -inf bias on their logits gives them
        # probability 0 in the loss (at no extra cost: it is fused into the matmul), and logits are
        # returned cut to vocab_size, so they can never be sampled either.
        pad_bias = None
        if V > c.vocab_size:
            pad_bias = torch.zeros(V, device=device)
            pad_bias[c.vocab_size:] = float("-inf")
        self.register_buffer("vocab_pad_bias", pad_bias, persistent=False)
        if c.pos_emb == "rope":
            cos, sin = rope_cos_sin(c.head_dim, c.block_size, c.rope_theta, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02) everywhere. The residual stream is a sum of 2 * n_layer branch
        # outputs (attention + MLP per block); scaling the init of the projections that write into it
        # by 1/sqrt(2 * n_layer) keeps its variance about constant with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. With non_embedding, position embeddings are left out (as in nanoGPT):
        token embeddings are kept because, tied, they are also the output layer's weights."""
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
        """Boolean mask (B|1, 1, T, past+T), True = may attend. None means plain causal attention,
        which lets SDPA use its fastest (is_causal) kernel."""
        if attention_mask is None and (past == 0 or T == 1):
            return None  # causal from scratch, or one new token that may see everything cached
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        mask = torch.arange(S, device=device)[None, :] <= q_pos  # causal (T, S)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
            # a padding query would otherwise see no key at all and softmax would give NaN;
            # letting every query see itself keeps pad outputs finite (and they are never used)
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
                # non-reentrant checkpointing also works when the block's inputs need no grad
                # (frozen embeddings under LoRA), which the old reentrant variant silently broke
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def padded_logits(self, h):
        """Output layer over the padded vocabulary; padded ids get -inf (see _init_buffers)."""
        if self.vocab_pad_bias is None:
            return self.lm_head(h)
        if type(self.lm_head) is nn.Linear:  # fused into the matmul
            return F.linear(h, self.lm_head.weight, self.vocab_pad_bias.to(h.dtype))
        logits = self.lm_head(h)  # a wrapped lm_head (e.g. LoRA): add the bias afterwards
        return logits + self.vocab_pad_bias.to(logits.dtype)

    def logits_from_hidden(self, h):
        """Logits of the real vocabulary, (..., vocab_size): a view that cuts the padded ids off."""
        return self.padded_logits(h)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, attention_mask=None, kv_cache: KVCache | None = None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.
        Returns (logits (B, T, vocab_size), mean cross-entropy loss or None)."""
        logits = self.padded_logits(self.hidden_states(idx, attention_mask, kv_cache))
        loss = None
        if targets is not None:
            # on the padded logits (contiguous, no copy; padded ids are -inf = probability 0), in fp32
            # (a log-softmax over 50k classes needs it) but chunk by chunk, see ChunkedCrossEntropy
            loss = ChunkedCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets.reshape(-1), -100)
        return logits[..., : self.config.vocab_size], loss

    # ---- training helpers ----------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu", eps: float = 1e-8):
        """AdamW with weight decay on 2-D tensors only (matmul weights and embeddings); biases and
        norm gains are not decayed: shrinking them towards 0 only hurts."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"  # one kernel for all parameters instead of one per tensor
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, PaLM appendix B): 6 per parameter for the
        matmuls, plus 12 * n_layer * n_head * head_dim * T for attention's scores and mixing."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def estimate_mfu(self, tokens_per_sec: float, seq_len: int, peak_flops: float | None = None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak. peak_flops
        defaults to the table above for the current CUDA device; None when it is unknown."""
        if peak_flops is None and torch.cuda.is_available():
            peak_flops = gpu_peak_flops(torch.cuda.get_device_name())
        if not peak_flops:
            return None
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    # ---- 4. Hugging Face weights in and out -----------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dtype=None, device=None) -> "GPT":
        """Load OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", through the HF hub
        cache), any HF hub id, or a local directory: HF format (config.json of model_type gpt2 or
        llama + model.safetensors / sharded *.safetensors with an index / pytorch_model.bin) or ours
        (gpt_config.json + model.safetensors, see save_pretrained(format="native")).
        dtype: torch dtype of the weights (default float32); device: where they live (default cpu).
        The model is built on the meta device and each tensor is assigned as it is read, so the
        weights are held once (a bf16 LLaMA-2-7B loads at 12.9 GiB peak RSS, not twice that)."""
        path = _resolve_model_dir(name_or_dir)
        dtype = dtype or torch.float32
        if (path / "gpt_config.json").exists():
            config = GPTConfig.from_dict(_read_json(path / "gpt_config.json"))
            hf_type = None
        elif (path / "config.json").exists():
            hf_config = _read_json(path / "config.json")
            hf_type = hf_config.get("model_type")
            if hf_type == "gpt2":
                config = _gpt2_config_from_hf(hf_config, path)
            elif hf_type == "llama":
                config = _llama_config_from_hf(hf_config, path)
            else:
                raise ValueError(f"{path / 'config.json'}: model_type={hf_type!r} is not supported; "
                                 f"expected 'gpt2' or 'llama' (use transformers for other architectures)")
        else:
            raise FileNotFoundError(f"{path}: not a model directory: expected config.json (Hugging Face "
                                    f"format) or gpt_config.json (this project's format)")
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        tensors = _read_weights(path)  # name -> lazily loaded tensor
        if hf_type is not None:
            tensors = _hf_to_ours(tensors, config, hf_type)
        state = _check_and_collect(tensors, expected, path, dtype, device or "cpu", config.tie_embeddings)
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        model._init_buffers()  # the constant tables were built on the meta device
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, out_dir: str, format: str = "hf"):
        """Write `out_dir` as a Hugging Face model (config.json + model.safetensors) that stock
        `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with no custom code:
        GPT-2-style configs as model_type gpt2, LLaMA-style configs (rmsnorm + rope + swiglu) as
        llama. format="native" writes our own gpt_config.json + model.safetensors instead, which any
        config can use and GPT.from_pretrained reads back. Files are written to a temporary name
        and renamed, so an interrupted save never leaves a half-written model that looks whole."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        c = self.config
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if format == "native":
            if c.tie_embeddings:
                sd.pop("lm_head.weight")  # safetensors refuses shared storage; re-tied on load
            config_json = asdict(c)
            weights = sd
            config_name = "gpt_config.json"
        elif format == "hf":
            hf_type, config_json = hf_config_for(c)
            weights = ours_to_hf(sd, c, hf_type)
            config_name = "config.json"
        else:
            raise ValueError(f"format={format!r}: expected 'hf' or 'native'")
        weights = {k: v.contiguous().cpu() for k, v in weights.items()}
        atomic_write(out / "model.safetensors", lambda p: save_file(weights, p, metadata={"format": "pt"}))
        atomic_write(out / config_name, lambda p: Path(p).write_text(json.dumps(config_json, indent=2)))
        # files of an earlier save in another format must not linger beside these weights
        for stale in ("config.json" if config_name == "gpt_config.json" else "gpt_config.json",
                      "model.safetensors.index.json", "pytorch_model.bin"):
            if (out / stale).exists():
                (out / stale).unlink()

    # ---- 5. Generation --------------------------------------------------------------------------

    @torch.no_grad()
    def decode_layout_(self) -> "GPT":
        """Re-store every nn.Linear weight input-major, in place: same shape (out, in), same values,
        transposed strides (HF's GPT-2 Conv1D keeps its weights this way). Why: a decoding step
        multiplies ONE row x by each weight, a memory-bound vector-matrix product, and on CPU (MKL)
        x @ W with W's rows laid out along `in` runs ~20% faster than the dot-product-per-output
        order of nn.Linear's layout (measured in bench_speed.py gen). Results are identical and no
        memory is added; saving still writes contiguous tensors. Meant for models used only for
        inference: call it once after loading (a training run would see its parameters' strides
        change under the optimizer and torch.compile, so train_gpt2.py and finetune.py never do)."""
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

        idx: (B, T) LongTensor, or a list of token-id lists of different lengths (left-padded here).
        attention_mask: (B, T), 0 on left padding, for a padded idx tensor.
        temperature: 0 means greedy (argmax); otherwise logits / temperature are sampled from,
            after keeping only the top_k tokens and/or the smallest set whose probability >= top_p.
        num_beams > 1: beam search (deterministic, no sampling) with length_penalty (score =
            sum log p / generated_length ** length_penalty) and early_stopping, as transformers does.
        eos_token_id: int or ids that end a sequence; finished sequences are then filled with
            pad_token_id (default: the first eos id, else 0), and generation stops when all are done.
        seed / generator: make sampling reproducible. stream(tokens (B,)) is called with each step's
            new tokens, for printing a chat reply as it is produced.
        use_cache=False recomputes the whole prefix at every step (the classic exercise of removing
            the KV cache): same tokens, many times the work for long outputs.
        The prompt plus max_new_tokens must fit in block_size; a longer request is an error rather
        than a silent sliding window (a learned position table has nothing past block_size)."""
        was_training = self.training
        self.eval()
        device = self.transformer.wte.weight.device
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
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
        try:
            if num_beams > 1:
                return self._beam_search(idx, attention_mask, max_new_tokens, num_beams, eos, pad_token_id,
                                         length_penalty, early_stopping, use_cache)
            return self._sample(idx, attention_mask, max_new_tokens, temperature, top_k, top_p, eos,
                                pad_token_id, generator, use_cache, stream)
        finally:
            self.train(was_training)

    def _step_logits(self, seq, mask, cache, n_new: int):
        """Next-token logits (B, vocab) in fp32. With a cache only the n_new newest tokens are run."""
        if cache is not None:
            h = self.hidden_states(seq[:, -n_new:], mask, cache)
        else:
            h = self.hidden_states(seq, mask)
        return self.logits_from_hidden(h[:, -1]).float()

    def _sample(self, idx, mask, max_new_tokens, temperature, top_k, top_p, eos, pad_id, generator,
                use_cache, stream):
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
        """Beam search as transformers does it. Each step, every live beam is extended by every token;
        of the num_beams * vocab candidates, the best 2 * num_beams (by summed log-probability) are
        kept so that num_beams live beams remain even if some just ended. A candidate that ends (EOS,
        or the length limit) is a finished hypothesis, scored by sum_logprob / length**length_penalty,
        and only if it ranks within the top num_beams. The search stops once no live beam can beat
        the worst of num_beams finished hypotheses (early_stopping=False's heuristic: a live beam's
        best hope is its current normalised score), or as soon as num_beams are finished
        (early_stopping=True), or at the length limit. The best finished hypothesis is returned."""
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


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the sampling set. top_k keeps the k largest; top_p (nucleus)
    keeps the smallest set of most-likely tokens whose total probability reaches top_p (the token
    that crosses the threshold is included, so at least one token always survives)."""
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
    """A (B, T) tensor passes through; a list of token lists is left-padded (the new tokens of every
    sequence are then appended in the same column) and given an attention mask."""
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
# 4b. Weight-format plumbing: reading, name mapping, checking


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _resolve_model_dir(name_or_dir: str) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a model directory, got a file")
    hub_id = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}.get(name_or_dir)
    if hub_id is None and (name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{name_or_dir}: no such directory, and not a GPT-2 name (gpt2, gpt2-medium, "
                                f"gpt2-large, gpt2-xl) or a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(hub_id or name_or_dir, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json"]))
    except Exception as e:  # offline, unknown repo, ...
        raise FileNotFoundError(f"could not get {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}: "
                                f"{e}). Download it on a machine with internet (huggingface-cli download "
                                f"{hub_id or name_or_dir}) or pass a local directory.") from None


class _LazyTensor:
    """A tensor in a weights file, read only when asked for (so a 7B model never sits twice in RAM)."""

    def __init__(self, load, shape, file):
        self.load, self.shape, self.file = load, tuple(shape), file


# safetensors format: 8 bytes (little-endian header length), a JSON header giving each tensor's
# dtype, shape and byte range, then the raw little-endian bytes of the tensors
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(fpath: Path) -> tuple[dict, int]:
    try:
        with open(fpath, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(100_000_000, fpath.stat().st_size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for k, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {k}: dtype {info['dtype']} is not supported")
    except Exception as e:
        raise ValueError(f"{fpath}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return header, 8 + n


def _read_safetensor(fpath: Path, info: dict, data_start: int):
    """Read one tensor with plain file reads into a fresh tensor: no memory map, so the process
    holds each tensor once, and nothing of the file stays mapped afterwards."""
    t = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    buf = t.reshape(-1).view(torch.uint8).numpy()
    if end - begin != buf.size:
        raise ValueError(f"{fpath}: tensor byte range {begin}..{end} does not match shape {info['shape']}")
    with open(fpath, "rb") as f:
        f.seek(data_start + begin)
        if f.readinto(memoryview(buf)) != buf.size:
            raise ValueError(f"{fpath}: file is truncated")
    return t


def _read_weights(path: Path) -> dict[str, _LazyTensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").exists():
        try:  # weights_only: a pickle can run arbitrary code; this only rebuilds tensors
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{path / 'pytorch_model.bin'}: cannot be read as a PyTorch state dict ({e})") from None
        # clone: the loaded tensors are views of the memory-mapped file
        return {k: _LazyTensor(lambda t=t: t.clone(), t.shape, "pytorch_model.bin") for k, t in sd.items()}
    else:
        raise FileNotFoundError(f"{path}: no weights: expected model.safetensors, model.safetensors.index.json "
                                f"with shards, or pytorch_model.bin")
    out = {}
    for fname in files:
        fpath = path / fname
        if not fpath.exists():
            raise FileNotFoundError(f"{fpath}: weight shard named in the index is missing")
        header, data_start = _safetensors_header(fpath)
        for k, info in header.items():
            out[k] = _LazyTensor(lambda p=fpath, i=info, s=data_start: _read_safetensor(p, i, s), info["shape"], fname)
    return out


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
                     tie_embeddings=h.get("tie_word_embeddings", True))


def _llama_config_from_hf(h: dict, path: Path) -> GPTConfig:
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE is implemented)")
    if h.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={h['hidden_act']!r}")
    if bool(h.get("attention_bias", False)) != bool(h.get("mlp_bias", False)):
        problems.append("attention_bias != mlp_bias (one bias switch covers both)")
    n_head = h["num_attention_heads"]
    head_dim = h.get("head_dim") or h["hidden_size"] // n_head
    if problems:
        raise ValueError(f"{path / 'config.json'}: unsupported LLaMA option(s): {', '.join(problems)}")
    return GPTConfig(block_size=h.get("max_position_embeddings", 2048), vocab_size=h["vocab_size"],
                     n_layer=h["num_hidden_layers"], n_head=n_head,
                     n_kv_head=h.get("num_key_value_heads") or n_head, n_embd=h["hidden_size"], head_dim=head_dim,
                     norm="rmsnorm", norm_eps=h.get("rms_norm_eps", 1e-6), pos_emb="rope",
                     rope_theta=rope.get("rope_theta", h.get("rope_theta", 10000.0)), mlp="swiglu",
                     ffn_hidden=h["intermediate_size"], bias=bool(h.get("attention_bias", False)),
                     tie_embeddings=bool(h.get("tie_word_embeddings", False)))


class _Derived:
    """A tensor computed from others at load time (a transpose, a concatenation)."""

    def __init__(self, fn, parts, shape):
        self.fn, self.parts, self.shape = fn, parts, shape

    def load(self):
        return self.fn(*[p.load() for p in self.parts])


def _transposed(t: _LazyTensor):
    return _Derived(lambda w: w.t(), [t], t.shape[::-1])


def _concat(ts: list):
    if any(len(t.shape) != len(ts[0].shape) for t in ts):
        return _Derived(lambda *w: torch.cat(w, 0), ts, (-1,))  # mismatch is reported by the shape check
    return _Derived(lambda *w: torch.cat(w, 0), ts, (sum(t.shape[0] for t in ts),) + tuple(ts[0].shape[1:]))


def _hf_to_ours(tensors: dict, config: GPTConfig, hf_type: str) -> dict:
    """Rename (and transpose / fuse) HF tensors to our names. Returns name -> lazy tensor; names we
    do not know are kept as they are, so the check reports them as unexpected."""
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
                out[k] = _transposed(v)  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
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
    out["transformer.wte.weight"] = take("model.embed_tokens.weight")
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")  # some tied checkpoints store it anyway
    suffixes = ["weight"] + (["bias"] if config.bias else [])
    for i in range(config.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = take(p + "input_layernorm.weight")
        out[q + "ln_2.weight"] = take(p + "post_attention_layernorm.weight")
        for s in suffixes:
            parts = [take(p + f"self_attn.{n}_proj.{s}") for n in "qkv"]
            out[q + f"attn.c_attn.{s}"] = None if None in parts else _concat(parts)
            out[q + f"attn.c_proj.{s}"] = take(p + f"self_attn.o_proj.{s}")
            parts = [take(p + f"mlp.{n}_proj.{s}") for n in ("gate", "up")]
            out[q + f"mlp.c_fc.{s}"] = None if None in parts else _concat(parts)
            out[q + f"mlp.c_proj.{s}"] = take(p + f"mlp.down_proj.{s}")
    out = {k: v for k, v in out.items() if v is not None}
    for k, v in tensors.items():
        if k not in used:
            out[k] = v  # unknown: reported as unexpected
    return out


def _check_and_collect(tensors: dict, expected: dict, path: Path, dtype, device, tie: bool) -> dict:
    """Compare the checkpoint's tensors with the model's, report every problem at once, then read
    each tensor, cast it and move it, one at a time."""
    exp = dict(expected)
    tied = tie and "lm_head.weight" not in tensors
    missing = [k for k in exp if k not in tensors and not (k == "lm_head.weight" and tied)]
    unexpected = [k for k in tensors if k not in exp]
    bad_shape = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(exp[k].shape)}"
                 for k in exp if k in tensors and tuple(tensors[k].shape) != tuple(exp[k].shape)]
    if missing or unexpected or bad_shape:
        lines = [f"{path}: checkpoint does not match the model built from its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))
    state = {}
    for k in exp:
        src = tensors["transformer.wte.weight" if (k == "lm_head.weight" and tied) else k]
        t = src.load()
        state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
        if k == "lm_head.weight" and tied:
            state[k] = state["transformer.wte.weight"]
    return state


def hf_config_for(c: GPTConfig) -> tuple[str, dict]:
    """The HF config (model_type, config.json dict) that expresses our config, or a clear error."""
    gpt2_like = c.norm == "layernorm" and c.pos_emb == "learned" and c.mlp == "gelu" and c.n_kv_head == c.n_head
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
        return "llama", dict(
            model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
            max_position_embeddings=c.block_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
            num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
            head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            attention_bias=c.bias, mlp_bias=c.bias, tie_word_embeddings=c.tie_embeddings,
            attention_dropout=c.dropout, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    raise ValueError(
        f"this config cannot be expressed as a Hugging Face model: GPT-2 needs layernorm + learned positions "
        f"+ gelu + n_kv_head == n_head, LLaMA needs rmsnorm + rope + swiglu; got norm={c.norm}, "
        f"pos_emb={c.pos_emb}, mlp={c.mlp}, n_kv_head={c.n_kv_head}/{c.n_head}. "
        f"Use save_pretrained(dir, format='native') for this project's own format.")


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
    out["model.embed_tokens.weight"] = sd["transformer.wte.weight"][:V]
    out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(c.n_layer):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "ln_1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "ln_2.weight"]
        for s in ["weight"] + (["bias"] if c.bias else []):
            qq, kk, vv = sd[q + f"attn.c_attn.{s}"].split([q_dim, kv_dim, kv_dim], dim=0)
            out[p + f"self_attn.q_proj.{s}"], out[p + f"self_attn.k_proj.{s}"] = qq, kk
            out[p + f"self_attn.v_proj.{s}"] = vv
            out[p + f"self_attn.o_proj.{s}"] = sd[q + f"attn.c_proj.{s}"]
            gate, up = sd[q + f"mlp.c_fc.{s}"].chunk(2, dim=0)
            out[p + f"mlp.gate_proj.{s}"], out[p + f"mlp.up_proj.{s}"] = gate, up
            out[p + f"mlp.down_proj.{s}"] = sd[q + f"mlp.c_proj.{s}"]
    return out


def atomic_write(path: Path, write: Callable[[str], None]):
    """Call write(tmp_name) on a temporary file beside path, then rename it over path: readers
    never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------------------------
# 6. Tokenizers and the CLI


class TextTokenizer:
    """What the scripts need from a tokenizer, whatever its kind: encode, encode_batch (fast bulk
    encoding), decode, the end-of-text id (eot_id, None if it has none), the begin-of-sequence id
    that LLaMA-style tokenizers put first (bos_id, None for GPT-2-style ones; encode never adds it)
    and the vocabulary size (n_vocab). Made by load_tokenizer."""

    def __init__(self, name, encode, decode, eot_id, n_vocab, encode_batch=None, bos_id=None):
        self.name, self._encode, self._decode, self.eot_id, self.n_vocab = name, encode, decode, eot_id, n_vocab
        self._encode_batch, self.bos_id = encode_batch, bos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text (e.g. <|endoftext|>) are encoded
        as themselves."""
        return self._encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._encode_batch is not None:
            return self._encode_batch(list(texts))
        return [self._encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def load_tokenizer(spec: str | None = None, model_dir: str | None = None) -> TextTokenizer:
    """spec: "gpt2" (GPT-2's, as tiktoken has it), a *.tiktoken rank file (GPT-2's pattern), a
    directory saved by bpe.py, or a directory with a Hugging Face tokenizer (tokenizer.json, ...).
    With spec None: model_dir's own tokenizer (the directory itself or its tokenizer/ folder) if it
    has one, else GPT-2's. bpe.py and tiktoken do the work; tiktoken encodes in bulk."""
    if spec is None and model_dir is not None and Path(model_dir).is_dir():
        d = Path(model_dir)
        for cand in (d / "tokenizer", d):
            if any((cand / f).exists() for f in ("tokenizer.bpe", "tokenizer.json", "tokenizer.model",
                                                  "vocab.json", "encoder.json")):
                spec = str(cand)
                break
    spec = spec or "gpt2"
    p = Path(spec)
    if p.is_dir() and not (p / "tokenizer.bpe").exists() and not (p / "encoder.json").exists():
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(p))
        return TextTokenizer(str(p), lambda s: hf.encode(s, add_special_tokens=False), hf.decode,
                             hf.eos_token_id, len(hf), bos_id=hf.bos_token_id)
    import bpe

    tok = bpe.load_tokenizer(spec)  # gpt2, .tiktoken rank file, bpe.py directory, encoder.json dir
    enc = tok.to_tiktoken()
    return TextTokenizer(tok.name, lambda s: enc.encode(s, allowed_special="all"), tok.decode,
                         tok.special_tokens.get("<|endoftext|>"), tok.vocab_size,
                         lambda texts: enc.encode_batch(texts, allowed_special="all"))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample text from a GPT-2 / LLaMA-family model.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init_from", default="gpt2",
                    help="gpt2|gpt2-medium|gpt2-large|gpt2-xl, a HF hub id, or a local model directory "
                         "(HF format or ours)")
    ap.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    ap.add_argument("--tokenizer", default=None,
                    help="'gpt2', a .tiktoken rank file, or a tokenizer directory (default: the model "
                         "directory's own tokenizer, else GPT-2's)")
    ap.add_argument("--num_samples", type=int, default=3, help="how many continuations")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per sample")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    ap.add_argument("--top_k", type=int, default=200, help="sample only among the k most likely tokens (0 = off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    ap.add_argument("--num_beams", type=int, default=1, help=">1: beam search instead of sampling")
    ap.add_argument("--length_penalty", type=float, default=1.0, help="beam search length exponent")
    ap.add_argument("--no_cache", action="store_true", help="recompute the whole prefix at every step")
    ap.add_argument("--stop_at_eos", action="store_true", help="end a sample at the end-of-text token")
    ap.add_argument("--seed", type=int, default=1337, help="random seed for reproducible samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu|cuda|mps")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weight dtype")
    args = ap.parse_args(argv)

    model = GPT.from_pretrained(args.init_from, dtype=getattr(torch, args.dtype), device=args.device)
    if args.device == "cpu":
        model.decode_layout_()  # inference only: the faster weight layout for 1-token steps on CPU
    tok = load_tokenizer(args.tokenizer, args.init_from)
    ids = tok.encode(args.prompt)
    batch = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    out = model.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
                         use_cache=not args.no_cache, seed=args.seed,
                         eos_token_id=tok.eot_id if args.stop_at_eos else None)
    for row in out.tolist():
        new = row[len(ids):]
        if args.stop_at_eos and tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        print(args.prompt + tok.decode(new))
        print("-" * 60)


if __name__ == "__main__":
    main()
