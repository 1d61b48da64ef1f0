"""
lora.py: LoRA (low-rank adaptation, Hu et al. 2021) for this project's GPT and for Hugging Face
GPT-2 / LLaMA models (and the families on LLaMA's block: Llama 3.x, Mistral, Qwen2.5, Qwen3, whose
modules have LLaMA's names), with adapters in PEFT's file format.

LoRA freezes a pretrained weight W (out x in) and learns a low-rank update instead:
    y = x W^T + (alpha / r) * dropout(x) A^T B^T,     A: (r x in), B: (out x r), r << in, out
so a 7B model trains ~0.1% of its parameters: no gradients, no optimizer states for the rest.
B starts at zero, so a fresh adapter changes nothing (training starts from the pretrained model)
while A starts random, so B's first gradient (which depends on A x) is not zero. After training,
W + (alpha/r) B A can be merged into W: no extra inference latency.

Read it top to bottom:
  1. LoRALinear: the wrapper around an nn.Linear (or transformers' Conv1D), including the
     "sliced" form for fused projections (our c_attn holds q|k|v; LoRA on q,v adapts only those rows).
  2. Targets: names such as q,v / attn / mlp / all / lm_head -> modules (and slices) of each model kind.
  3. apply_lora, freezing, lora_state_dict / load_lora, merge / unmerge / unload, the trainable line.
  4. PEFT's format: save_adapter / load_adapter (adapter_config.json + adapter_model.safetensors).
  5. QLoRA's 4-bit frozen base: the NF4 codebook, block-wise quantisation (double quantisation of
     the scales too), NF4Linear, quantize_nf4 / dequantize_nf4, and load_base (what finetune.py
     and dpo.py start from).
  6. A small CLI: merge an adapter into a model.

Target names and how they map (our GPT fuses projections; see README "lora.py"):
  q, k, v   attention query/key/value. Ours: rows of the fused attn.c_attn, each with its OWN A and B
            (exactly PEFT's LoRA on LLaMA's separate q_proj/k_proj/v_proj). HF GPT-2: rows of its Conv1D c_attn.
  c_attn    the whole fused q|k|v projection with ONE A and B (exactly PEFT's LoRA on HF GPT-2's c_attn).
  o         attention output projection (attn.c_proj / o_proj)
  gate, up  SwiGLU input projections (rows of our fused mlp.c_fc / gate_proj, up_proj); for a GELU MLP
            "up" is the whole mlp.c_fc. c_fc: the whole mlp.c_fc with one A and B.
  down      MLP output projection (mlp.c_proj / down_proj)
  lm_head   the output layer. Groups: attn = q,k,v,o; mlp = gate,up,down; all = attn + mlp.
  HF names are accepted too: q_proj ... down_proj, and c_proj (= o and down, as PEFT's suffix match does).

Use it:
    from lora import apply_lora, merge_lora, save_adapter, load_adapter
    model = GPT.from_pretrained("gpt2")
    apply_lora(model, rank=16, alpha=32, dropout=0.05, targets=("q", "v"))   # freezes the rest
    ... train ...
    save_adapter(model, "out/adapter")     # peft.PeftModel.from_pretrained(hf_gpt2, "out/adapter") loads it
    merge_lora(model)                      # W += (alpha/r) B A, computed in fp32

Run it:
    python lora.py merge --base gpt2 --adapter out/adapter --out_dir out/merged
(LoRA against full fine-tuning, in memory and time: bench_memory.py.)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from housekeeping import (ArgumentParser, DefaultsHelp, atomic_write, check_weight, gathered, load_safetensors,
                          load_torch_weights, run_main, save_safetensors)
from model import GPT, LLAMA_FAMILIES, hf_config_for

# -----------------------------------------------------------------------------------------------
# 1. The layer


def _is_conv1d(module) -> bool:
    """transformers' Conv1D (HF GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


class LoRALinear(nn.Module):
    """y = base(x) + scaling * dropout(x) A^T B^T, with base frozen and A, B trained.

    A fused projection, whose output is [q | k | v] (or [gate | up]), can be adapted in parts:
      - `segments` lists (name, size) of its output blocks, `adapted` the names that get LoRA;
      - each adapted block j has its own A_j (r x in) and B_j (size_j x r), stored stacked:
        lora_A = [A_1; A_2; ...] (S*r x in), lora_B = [B_1; B_2; ...] (sum of sizes x r);
      - the update is x A^T B_full^T, where B_full (out x S*r) puts B_j in block j's rows and in
        columns j*r..(j+1)*r, zeros elsewhere: a rank-S*r LoRA over the whole output whose
        un-adapted rows stay exactly zero;
      - that block form is also how a q,v adapter is written for HF GPT-2's fused c_attn in
        PEFT's format.
    With adapted=None the whole output is one block (plain LoRA)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 segments: list[tuple[str, int]] | None = None, adapted: list[str] | None = None,
                 rslora: bool = False):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.base = base
        self.conv1d = _is_conv1d(base)
        if isinstance(base, NF4Linear):  # a 4-bit frozen base (QLoRA): no float weight to look at
            self.in_features, self.out_features, device = base.in_features, base.out_features, base.codes.device
        else:
            w = base.weight
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
            device = w.device
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's scale stable as r grows
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.segments, self.adapted = None, None
        n_blocks, b_rows = 1, self.out_features
        if adapted is not None:
            names = [n for n, _ in segments]
            if sum(s for _, s in segments) != self.out_features:
                raise ValueError(f"segments {segments} do not add up to the layer's {self.out_features} outputs")
            self.segments = list(segments)
            self.adapted = [n for n in names if n in adapted]  # in output order
            n_blocks, b_rows = len(self.adapted), sum(s for n, s in segments if n in self.adapted)
        # LoRA weights are fp32 whatever the base dtype: they are the only weights that train, so
        # they are the optimizer's master weights (and fp16's GradScaler refuses fp16 gradients)
        kw = dict(device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(n_blocks * rank, self.in_features, **kw))
        # B = 0: the adapted model starts exactly equal to the base model
        self.lora_B = nn.Parameter(torch.zeros(b_rows, rank, **kw))
        # A like nn.Linear's default init (Kaiming-uniform, a=sqrt(5): bound 1/sqrt(in)), as PEFT does
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout = dropout
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    def full_B(self) -> torch.Tensor:
        """B over the whole output (out x n_blocks*r): each adapted block's B_j in its own rows and
        rank columns, zeros in the rows of un-adapted blocks."""
        if self.adapted is None:
            return self.lora_B
        r, S = self.rank, len(self.adapted)
        sizes = dict(self.segments)
        blocks = dict(zip(self.adapted, self.lora_B.split([sizes[n] for n in self.adapted], 0)))
        rows = []
        for name, size in self.segments:
            if name in blocks:
                j = self.adapted.index(name)
                rows.append(F.pad(blocks[name], (j * r, (S - 1 - j) * r)))
            else:
                rows.append(self.lora_B.new_zeros(size, S * r))
        return torch.cat(rows, 0)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, shaped like an nn.Linear weight (out x in)."""
        return self.scaling * (self.full_B().float() @ self.lora_A.float())

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)  # no autocast: LoRA's small matmuls run in fp32
        delta = F.linear(F.linear(h, self.lora_A), self.full_B()) * self.scaling
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W += scaling * B A. Done in fp32 and rounded once: adding a small update directly to a
        bf16 weight would round it away, and merge-then-unmerge would drift further."""
        if self.merged:
            return
        if isinstance(self.base, NF4Linear):
            raise ValueError("a LoRA on a 4-bit base is merged into the dequantised base, on its own: python "
                             "lora.py merge --nf4 --base <base model> --adapter <adapter dir> --out_dir <dir> (add "
                             "--precision bf16 after a --precision bf16 run)")
        w, d = self.base.weight, self.delta_weight()
        w.copy_((w.float() + (d.t() if self.conv1d else d)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scaling * B A (exact in fp32; within one rounding of the original in bf16/fp16)."""
        if not self.merged:
            return
        w, d = self.base.weight, self.delta_weight()
        w.copy_((w.float() - (d.t() if self.conv1d else d)).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        what = f"adapted={self.adapted}" if self.adapted else "whole output"
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
                f"{what}, merged={self.merged}")


# -----------------------------------------------------------------------------------------------
# 2. Targets: names -> (module, slice) for each kind of model

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "c_attn", "c_fc", "lm_head")
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
          "all": ("q", "k", "v", "o", "gate", "up", "down")}
ALIASES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
           "up_proj": ("up",), "down_proj": ("down",), "c_proj": ("o", "down")}


def _arch(model) -> tuple[str, object]:
    """("ours", GPTConfig), ("hf-gpt2", HF config) or ("hf-llama", HF config)."""
    if isinstance(model, GPT):
        return "ours", model.config
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gpt2":
        return "hf-gpt2", cfg
    if model_type in LLAMA_FAMILIES:  # the same module names (q_proj, ..., down_proj) in every one of them
        return "hf-llama", cfg
    raise ValueError(f"LoRA here supports this project's GPT and Hugging Face GPT-2 / LLaMA-family models; got "
                     f"{type(model).__name__} (model_type={model_type!r})")


def _blocks(model) -> tuple[str, int]:
    """Name prefix of the transformer blocks and their number."""
    kind, cfg = _arch(model)
    if kind == "hf-llama":
        return "model.layers", cfg.num_hidden_layers
    return "transformer.h", cfg.n_layer


def _role_module(model, role: str, i: int) -> tuple[str, list | None, str | None]:
    """Where role lives in block i: (module name, segments of its output or None, segment or None).
    Raises for a role the architecture does not have."""
    kind, c = _arch(model)
    if role == "lm_head":
        return "lm_head", None, None
    if kind == "hf-llama":
        if role in ("c_attn", "c_fc"):
            raise ValueError(f"LoRA target {role!r}: LLaMA has no fused {role}; use q,k,v (attention) or gate,up")
        sub = "self_attn" if role in ("q", "k", "v", "o") else "mlp"
        return f"model.layers.{i}.{sub}.{role}_proj", None, None
    p = f"transformer.h.{i}."
    if kind == "hf-gpt2":
        n = c.n_embd
        attn_segments = [("q", n), ("k", n), ("v", n)]
        swiglu = False
    else:
        qd, kvd = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        attn_segments = [("q", qd), ("k", kvd), ("v", kvd)]
        swiglu = c.mlp == "swiglu"
    if role in ("q", "k", "v"):
        return p + "attn.c_attn", attn_segments, role
    if role == "c_attn":
        return p + "attn.c_attn", None, None
    if role == "o":
        return p + "attn.c_proj", None, None
    if role == "down":
        return p + "mlp.c_proj", None, None
    if role == "c_fc" or (role == "up" and not swiglu):
        return p + "mlp.c_fc", None, None
    if role == "gate" and not swiglu:
        raise ValueError("LoRA target 'gate': this model's MLP is GELU (no gate projection); use up, down or c_fc")
    f = c.ffn_hidden
    return p + "mlp.c_fc", [("gate", f), ("up", f)], role


def _parse_targets(targets) -> tuple[list[str], set[str]]:
    """(roles, roles that came only from a group: skipped where the model lacks them, e.g. gate in GELU)."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    roles, named = [], set()
    for t in targets:
        named.update(ALIASES.get(t, (t,)))
        if t in GROUPS:
            roles += GROUPS[t]
        elif t in ALIASES:
            roles += ALIASES[t]
        elif t in ROLES:
            roles.append(t)
        else:
            raise ValueError(f"unknown LoRA target {t!r}; expected a comma-separated list of "
                             f"{', '.join(ROLES)}, the groups {', '.join(GROUPS)}, or {', '.join(ALIASES)}")
    if not roles:
        raise ValueError("no LoRA targets given")
    return list(dict.fromkeys(roles)), set(roles) - named


def _layer_indices(n_layer: int, layers) -> list[int]:
    """None: every block; an int N: the last N blocks; a list: those block indices."""
    if layers is None:
        return list(range(n_layer))
    if isinstance(layers, int):
        if not 1 <= layers <= n_layer:
            raise ValueError(f"layers={layers}: the number of last blocks to adapt must be in 1..{n_layer}")
        return list(range(n_layer - layers, n_layer))
    idx = sorted(set(int(i) for i in layers))
    bad = [i for i in idx if not 0 <= i < n_layer]
    if bad or not idx:
        raise ValueError(f"layers={list(layers)}: block indices must be in 0..{n_layer - 1}")
    return idx


def resolve_targets(model, targets, layers=None) -> dict[str, tuple[list | None, list[str] | None]]:
    """{module name: (its output segments, the adapted segment names)}; (None, None) = the whole
    module. Everything is checked before anything is wrapped."""
    roles, from_groups = _parse_targets(targets)
    _, n_layer = _blocks(model)
    plan: dict[str, tuple[list | None, list | None]] = {}
    for role in roles:
        for i in ([0] if role == "lm_head" else _layer_indices(n_layer, layers)):
            try:
                name, segments, seg = _role_module(model, role, i)
            except ValueError:
                if role in from_groups:
                    continue  # "mlp" / "all" on a GELU MLP: there is no gate
                raise
            old_segments, old = plan.get(name, (None, "new"))
            if seg is None:
                if old not in ("new", None):
                    raise ValueError(f"LoRA targets overlap on {name}: {role!r} adapts the whole module and "
                                     f"{old} adapt parts of it; give one or the other")
                plan[name] = (None, None)
            else:
                if old is None:
                    raise ValueError(f"LoRA targets overlap on {name}: {seg!r} is part of a module that is "
                                     f"also adapted whole; give one or the other")
                plan[name] = (segments, ([] if old == "new" else old) + [seg])
    return plan


# -----------------------------------------------------------------------------------------------
# 3. Applying, freezing, saving, merging


def weight_dtype(precision: str, lora: bool) -> torch.dtype:
    """dtype to load the weights in. Full fine-tuning keeps fp32 weights (the optimizer's master
    copy: bf16/fp16 weights would round small updates away) and lets autocast run the matmuls in
    half precision. With LoRA the base weights never change, so they can be stored in half
    precision (half the memory); the LoRA weights themselves stay fp32 (see lora.py)."""
    if lora and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _input_embedding_weight(model):
    if isinstance(model, GPT):
        return model.transformer.wte.weight
    return model.get_input_embeddings().weight


def _wrap(model, name: str, rank: int, alpha: float, dropout: float, segments, adapted, rslora: bool):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already has a LoRA adapter")
    if not (isinstance(base, (nn.Linear, NF4Linear)) or _is_conv1d(base)):
        raise ValueError(f"{name} is a {type(base).__name__}; LoRA here wraps nn.Linear, NF4Linear or Conv1D")
    layer = LoRALinear(base, rank, alpha, dropout, segments, adapted, rslora)
    setattr(parent, child, layer)
    return layer


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets=("q", "v"), layers=None,
               rslora: bool = False, freeze: bool = True):
    """Wrap the target projections of `model` (our GPT, or a HF GPT-2 / LLaMA model) with LoRA and,
    by default, freeze everything else: embeddings, norms, biases and lm_head stay fixed, only the
    lora_A / lora_B tensors train. targets: names or a comma-separated string (see the module
    docstring); layers: None = all blocks, N = the last N blocks, or a list of block indices.
    Returns the model (changed in place)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1 (rank 0 means full fine-tuning: do not "
                         f"call apply_lora), got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    plan = resolve_targets(model, targets, layers)
    for name, (segments, adapted) in plan.items():
        _wrap(model, name, rank, alpha, dropout, segments, adapted, rslora)
    if freeze:
        freeze_non_lora(model)
    return model


def freeze_non_lora(model):
    """requires_grad only on LoRA tensors: frozen weights get no gradient, so no gradient memory,
    no optimizer state, and backward skips their weight-gradient matmuls."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Just the LoRA tensors, under the model's own names (a few MB for a 7B model)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora(model, state_dict: dict):
    """Load lora_state_dict() output into a model that apply_lora gave the same targets/rank."""
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: given {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"LoRA state dict does not match the model's adapters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {shapes[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state_dict[k])
    return model


def _check_mergeable(model):
    emb = _input_embedding_weight(model)
    for name, layer in lora_layers(model).items():
        if isinstance(layer.base, NF4Linear):
            return  # merge() says what to do instead; no need to dequantise every layer to look
        if layer.base.weight is emb:
            raise ValueError(f"{name} shares its weight with the input embeddings (tied); merging its LoRA "
                             f"would change the embeddings too. Keep it as an adapter (save_adapter).")


def merge_lora(model):
    """Fold every adapter into its base weight (fp32 arithmetic, see LoRALinear.merge): the model
    then runs at the base model's speed; unmerge_lora undoes it."""
    _check_mergeable(model)
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model):
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model, merge: bool = True):
    """Replace every LoRALinear by its base layer, merged first by default: a plain model again,
    which save_pretrained writes like any other."""
    if merge:
        merge_lora(model)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The LoRA policy with its adapters switched off is exactly the model it started from (W + 0): the
    reference of DPO's loss and of RL's KL penalty, at no memory cost. Setting each adapter's scaling to 0
    switches it off; eval mode switches dropout off, so the reference is deterministic. (A model without
    adapters: eval mode only.)"""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s
        model.train(was_training)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all); tied tensors counted once, as PEFT does."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_report(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# -----------------------------------------------------------------------------------------------
# 4. PEFT's format: adapter_config.json + adapter_model.safetensors
#
# Keys are "base_model.model.<HF module name>.lora_A.weight" (r x in) and ".lora_B.weight" (out x r),
# named after the HF model the adapter applies to: our GPT-2-style models export under HF GPT-2's
# names (same as ours), LLaMA-style ones under LLaMA's (q_proj, ..., down_proj), which Llama 3, Mistral,
# Qwen2.5 and Qwen3 share. Ranks that differ between modules (a q,v adapter on GPT-2's fused c_attn is
# written as one rank-2r LoRA, see LoRALinear) go in PEFT's rank_pattern / alpha_pattern.

_LLAMA_OURS = {"q": ("attn.c_attn", "q"), "k": ("attn.c_attn", "k"), "v": ("attn.c_attn", "v"),
               "o": ("attn.c_proj", None), "gate": ("mlp.c_fc", "gate"), "up": ("mlp.c_fc", "up"),
               "down": ("mlp.c_proj", None)}


def _hf_type(model) -> str:
    kind, cfg = _arch(model)
    if kind != "ours":
        return kind[3:]
    return hf_config_for(cfg)[0]  # raises, naming the reason, for configs HF cannot express


def _export_modules(model) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """[(HF module name, A, B, scaling)] for every adapter of the model."""
    kind, cfg = _arch(model)
    hf_type = _hf_type(model)
    out = []
    for name, layer in lora_layers(model).items():
        if kind == "ours" and hf_type != "gpt2" and name != "lm_head":
            i = int(name.split(".")[2])
            sub = name.split(".", 3)[3]
            if layer.adapted is None and sub in ("attn.c_attn", "mlp.c_fc"):
                raise ValueError(f"{name}: a LoRA over the whole fused {sub} has no PEFT equivalent on LLaMA "
                                 f"(q/k/v and gate/up are separate modules there); use targets q,k,v or gate,up")
            if layer.adapted is None:
                role = {"attn.c_proj": "o", "mlp.c_proj": "down"}[sub]
                out.append((_llama_name(i, role), layer.lora_A, layer.lora_B, layer.scaling))
                continue
            sizes = dict(layer.segments)
            Bs = layer.lora_B.split([sizes[n] for n in layer.adapted], 0)
            As = layer.lora_A.split(layer.rank, 0)
            for role, A, B in zip(layer.adapted, As, Bs):
                out.append((_llama_name(i, role), A, B, layer.scaling))
            continue
        B = layer.full_B()  # GPT-2's fused c_attn: block form (rank S*r); else plain B
        if name == "lm_head" and kind == "ours":
            B = B[: cfg.vocab_size]  # padded vocabulary rows do not exist in the HF model
        out.append((name, layer.lora_A, B, layer.scaling))
    if not out:
        raise ValueError("the model has no LoRA adapters to save (call apply_lora or load_adapter first)")
    return out


def _llama_name(i: int, role: str) -> str:
    sub = "self_attn" if role in ("q", "k", "v", "o") else "mlp"
    return f"model.layers.{i}.{sub}.{role}_proj"


def save_adapter(model, out_dir, base_model_name_or_path: str | None = None):
    """Write the adapters as PEFT does, so peft.PeftModel.from_pretrained(hf_model, out_dir) loads
    them onto the matching transformers model (and load_adapter back onto ours)."""
    mods = _export_modules(model)
    layers = list(lora_layers(model).values())
    rslora = layers[0].rslora
    ranks = {name: A.shape[0] for name, A, _, _ in mods}
    # PEFT: scaling = lora_alpha / r (or / sqrt(r) with use_rslora), so alpha = scaling * r
    alphas = {name: s * (math.sqrt(ranks[name]) if rslora else ranks[name]) for name, _, _, s in mods}
    # GPT-2's q,v at rank r are one module here, HF's fused c_attn, of rank 2r (A's stacked, B block-diagonal)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": _num(alpha), "lora_dropout": layers[0].dropout, "use_rslora": rslora,
        "target_modules": sorted(ranks), "bias": "none", "fan_in_fan_out": _hf_type(model) == "gpt2",
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): _num(a) for n, a in alphas.items() if a != alpha},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }
    tensors = {}
    for name, A, B, _ in mods:
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return out


def _num(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): a key matches when name ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_policy(policy, skeleton_fn, where, master: bool, base_model: str, tokenizer_source,
                merged: bool = False):
    """A tuning stage's weights (dpo.py, rl.py): with LoRA layers the PEFT adapter, or with merged=True the
    model with W + scaling B A (the policy itself then loses its adapters); without them the model. Under
    FSDP every rank helps gather the shards into skeleton_fn() (the policy's shape, built on meta) and
    rank 0 writes; the other ranks return having written nothing."""
    model = gathered(policy, skeleton_fn, master)
    if model is None:  # another rank under FSDP: it helped gather, rank 0 writes
        return
    lora = bool(lora_layers(model))
    if lora and merged:
        unload_lora(model, merge=True)
    if lora and not merged:
        save_adapter(model, where, base_model)
    else:
        model.save_pretrained(where, "native", tokenizer_source)


def load_adapter(model, adapter_dir):
    """Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, or .bin) into
    `model` (our GPT or a HF GPT-2 / LLaMA model without adapters); freezes everything else."""
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as e:  # not JSON, too deep, or a number too long to convert
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = [k for k, ok in (("use_dora", False), ("lora_bias", False), ("modules_to_save", None),
                                   ("layer_replication", None), ("trainable_token_indices", None))
                   if cfg.get(k, ok) not in (ok, [], {})]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"{cfg_path}: unsupported PEFT option(s): {unsupported}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ValueError(f"{cfg_path}: field {key!r} must be a number, got {cfg.get(key)!r}")
    fpath = d / "adapter_model.safetensors"
    if fpath.is_file():
        tensors = load_safetensors(fpath)
    elif (d / "adapter_model.bin").is_file():
        fpath = d / "adapter_model.bin"
        tensors = load_torch_weights(fpath)
    else:
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors (or adapter_model.bin)")

    # group the tensors by HF module: {name: {"A": ..., "B": ...}}, each checked as the model's weights are
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{fpath}: unexpected tensor {key!r}; expected "
                             f"base_model.model.<module>.lora_A.weight / lora_B.weight")
        check_weight(fpath, key, t)
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise ValueError(f"{fpath}: no LoRA tensors (base_model.model.<module>.lora_A.weight / lora_B.weight)")
    missing = [f"base_model.model.{n}.lora_{'B' if 'A' in p else 'A'}.weight" for n, p in pairs.items() if len(p) != 2]
    if missing:
        raise ValueError(f"{fpath}: tensor(s) missing: {', '.join(missing[:5])} (each module needs lora_A and lora_B)")

    kind, mcfg = _arch(model)
    hf_type = _hf_type(model)
    rslora = bool(cfg.get("use_rslora", False))
    # our module -> {segment or None: (A, B, rank, scaling)}
    grouped: dict[str, dict] = {}
    for hf_name, p in pairs.items():
        rank = p["A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, hf_name, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        ours, seg = hf_name, None
        if kind == "ours" and hf_type != "gpt2" and hf_name != "lm_head":
            m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj", hf_name)
            if m is None:
                raise ValueError(f"{d}: adapter module {hf_name!r} has no counterpart in this LLaMA-style model")
            sub, seg = _LLAMA_OURS[m.group(2)]
            ours = f"transformer.h.{m.group(1)}.{sub}"
        grouped.setdefault(ours, {})[seg] = (p["A"], p["B"], rank, scaling)

    names = dict(model.named_modules())
    for ours, parts in grouped.items():
        if ours not in names:
            raise ValueError(f"{d}: adapter module {ours!r} is not in the model")
        ranks = {v[2] for v in parts.values()}
        scalings = {round(v[3], 9) for v in parts.values()}
        if len(ranks) > 1 or len(scalings) > 1:
            raise ValueError(f"{d}: the adapters fused into {ours} have different ranks/alphas {ranks}/{scalings}; "
                             f"not supported")
        rank, scaling = next(iter(parts.values()))[2:]
        segments = None
        adapted = None if None in parts else list(parts)
        if adapted is not None:
            segments = _role_module(model, "q" if "attn" in ours else "up", int(ours.split(".")[2]))[1]
        alpha = scaling * (math.sqrt(rank) if rslora else rank)
        layer = _wrap(model, ours, rank, alpha, float(cfg.get("lora_dropout") or 0.0), segments, adapted, rslora)
        order = layer.adapted or [None]
        A = torch.cat([parts[s][0] for s in order], 0)
        B = torch.cat([parts[s][1] for s in order], 0)
        if ours == "lm_head" and kind == "ours" and B.shape[0] < layer.lora_B.shape[0]:
            B = torch.cat([B, B.new_zeros(layer.lora_B.shape[0] - B.shape[0], B.shape[1])])  # padded vocab
        for what, src, dst in (("lora_A", A, layer.lora_A), ("lora_B", B, layer.lora_B)):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{d}: {ours}.{what} has shape {tuple(src.shape)}, the model needs "
                                 f"{tuple(dst.shape)} (adapter made for another model size?)")
            with torch.no_grad():
                dst.copy_(src)
    freeze_non_lora(model)
    return model


# -----------------------------------------------------------------------------------------------
# 5. A 4-bit frozen base (QLoRA, Dettmers et al. 2023): NormalFloat (NF4) weights
#
# LoRA trains a few million parameters, but the frozen base still takes 2 bytes per weight in bf16
# (13.5 GB for LLaMA-2-7B). QLoRA stores it in 4 bits: each block of 64 consecutive weights keeps its
# absmax (one float) and, per weight, a 4-bit index into a table of 16 "normal" values in [-1, 1]:
#     w ~= NF4_CODEBOOK[code] * absmax_of_its_block
# That is 4 + 32/64 = 4.5 bits per weight; double quantisation stores the absmaxes in 8 bits too
# (blocks of 256): ~4.13 bits. The LoRA adapters stay fp32 and train as usual on top; the adapter
# saves in PEFT's format, and merges into the dequantised 4-bit base (lora.py merge --nf4).


def _normal_float_codebook(offset: float = 0.9677083) -> torch.Tensor:
    # Pretrained weights are roughly normal, so put the 16 values at quantiles of N(0, 1): each code
    # is then used about equally often. Asymmetric so that 0 is exact (zero weights, padding): 8 positive
    # quantiles ndtri(p) for p in 8 steps from `offset` down to 0.5 (excl.), 7 negative ones, and 0; then
    # divide by the largest so the table spans [-1, 1]. offset < 1 as ndtri(1) = inf; 0.9677083 is
    # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True), numerically
    # ((1 - 1/30) + (1 - 1/32)) / 2: the outermost quantile centre 1 - 1/(2k) of 15 and 16 levels, averaged.
    # linspace in fp32, ndtri in fp64, division in fp32 (as bitsandbytes did): its table bit for bit.
    positive = _normal_quantiles(offset, 9)  # 8 values: linspace's last point, 0.5, is left out
    negative = -_normal_quantiles(offset, 8)  # 7 values
    v = torch.cat([positive, negative, torch.zeros(1)]).sort().values
    return v / v.max()


def _normal_quantiles(offset: float, k: int) -> torch.Tensor:
    """ndtri(p), N(0, 1)'s quantile function, at k - 1 points p from `offset` down to 0.5 (excluded)."""
    return torch.special.ndtri(torch.linspace(offset, 0.5, k)[:-1].double()).float()


NF4_CODEBOOK = _normal_float_codebook()
# nearest table entry = which interval between neighbouring midpoints a value falls into
_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
_NF4_PAIRS = torch.stack([NF4_CODEBOOK.repeat_interleave(16), NF4_CODEBOOK.repeat(16)], dim=1)  # byte -> 2 values


@functools.cache
def _nf4_pairs_on(device: torch.device) -> torch.Tensor:  # copied to a GPU once, not at every forward
    return _NF4_PAIRS.to(device)


@dataclass
class NF4Tensor:
    codes: torch.Tensor                         # uint8, two 4-bit codes per byte (first value: high nibble)
    absmax: torch.Tensor                        # fp32 per block; int8 codes with double quantisation
    shape: torch.Size
    dtype: torch.dtype                          # the original dtype (dequantise's default)
    block_size: int = 64
    absmax_scale: torch.Tensor | None = None    # double quant: fp32 scale per 256 absmax codes
    absmax_offset: torch.Tensor | None = None   # double quant: the mean absmax, subtracted first


def _nf4_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: (n_blocks, block_size). numel need not divide by
    block_size; zeros never change a block's absmax, and callers cut the padding off again."""
    x, pad = x.reshape(-1), -x.numel() % block_size
    return (F.pad(x, (0, pad)) if pad else x).view(-1, block_size)  # F.pad would copy even with pad 0


@torch.no_grad()
def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    assert block_size % 2 == 0, "two codes per byte: block_size must be even"
    n = weight.numel()
    blocks = _nf4_blocks(weight.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)   # into [-1, 1]; an all-zero block -> 0.0
    # bucketize returns i with mid[i-1] < x <= mid[i]: a value exactly halfway goes to the lower entry,
    # the same tie rule as bitsandbytes (whose quantize_4bit does this very lookup)
    codes = torch.bucketize(scaled, _MIDPOINTS.to(weight.device)).to(torch.uint8)
    codes = codes.view(-1)[: n + n % 2]         # drop the padding (keep one code 0.0 if n is odd)
    q = NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, weight.shape, weight.dtype, block_size)
    if double_quant:
        # fp32 absmax costs 32/64 = 0.5 bit/weight; int8 in blocks of 256 costs 8/64 + 32/(64*256) = 0.127.
        # Absmaxes are all positive and alike: subtracting their mean lets the symmetric int8 range
        # cover just their spread (~0.1% error). bitsandbytes uses its 8-bit "dynamic" table instead.
        q.absmax_offset = absmax.mean()
        centred = _nf4_blocks(absmax - q.absmax_offset, 256)
        q.absmax_scale = centred.abs().amax(dim=1) / 127
        q8 = torch.round(centred / q.absmax_scale.clamp(min=1e-38).unsqueeze(1)).to(torch.int8)
        q.absmax = q8.view(-1)[: absmax.numel()]
    return q


def _absmax(q: NF4Tensor) -> torch.Tensor:
    if q.absmax_scale is None:
        return q.absmax
    scaled = _nf4_blocks(q.absmax.float(), 256) * q.absmax_scale.unsqueeze(1)   # undo the double quantisation
    return scaled.view(-1)[: q.absmax.numel()] + q.absmax_offset


NF4_SLICE = 2 ** 22  # weights dequantised at a time: bounds the fp32 and index temporaries


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back in `dtype` (default: its original one). Computed slice by slice into the result, so
    that the only full-size tensor is the result itself (2 bytes per weight in bf16), not the index and
    fp32 temporaries (12 bytes per weight): for LLaMA-2-7B's largest layer, 90M weights, that is 1 GB."""
    n = math.prod(q.shape)
    out = torch.empty(n, dtype=dtype or q.dtype, device=q.codes.device)
    absmax, pairs = _absmax(q), _nf4_pairs_on(q.codes.device)
    step = NF4_SLICE // q.block_size * q.block_size  # whole blocks (and whole bytes: block_size is even)
    for start in range(0, n, step):
        stop = min(start + step, n)
        # one lookup per byte, both of its codes at once (high nibble first): the index tensor is 2 bytes
        # per weight instead of the 8 of one int64 index per code
        values = pairs[q.codes[start // 2: (stop + 1) // 2].int()].view(-1)[: stop - start]
        # multiply in fp32 and round once to the target dtype, like bitsandbytes
        first, end = start // q.block_size, -(-stop // q.block_size)  # this slice's blocks
        blocks = _nf4_blocks(values, q.block_size).mul_(absmax[first:end].unsqueeze(1))  # values: fresh, ours
        out[start:stop] = blocks.view(-1)[: stop - start]
    return out.view(q.shape)


def nf4_nbytes(q: NF4Tensor) -> int:
    """Storage bytes: packed codes + absmax (+ double-quant scales and offset)."""
    parts = (q.codes, q.absmax, q.absmax_scale, q.absmax_offset)   # the last two are None without double quant
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


class _DequantLinear(torch.autograd.Function):
    """F.linear(x, W, bias) that dequantises W again in backward rather than saving it: plain autograd would keep
    every layer's 16-bit W alive from its forward until its backward, undoing the memory saving."""

    @staticmethod
    def forward(ctx, x, q, bias):
        ctx.q = q
        return F.linear(x, nf4_dequantize(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # dL/dx = dL/dy W; the frozen W and bias get no gradient
        return grad_y @ nf4_dequantize(ctx.q, grad_y.dtype), None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 and dequantised at every forward, in the compute dtype
    (autocast's if on, else the input's).
      - Why: only the layer running now has a 16-bit copy of its weight (and, while rebuilding it,
        int32/fp32 temporaries of one NF4_SLICE), so stored weights take ~0.52 byte/param instead of 2
        (QLoRA: 65B in 48 GB).
      - Cost: a dequantisation (unpack, table lookup, multiply per weight) every forward and again in
        backward: slower than a bf16 nn.Linear.
      - Gradients: the weight gets none; the input does, so LoRA trains."""

    _STATS = ("absmax", "absmax_scale", "absmax_offset")

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size, self.dtype = q.block_size, q.dtype
        # buffers: .to(device) moves them, state_dict saves them, and no float weight exists to save
        self.register_buffer("codes", q.codes)
        for name in self._STATS:
            self.register_buffer(name, getattr(q, name))    # None (double quant off): not saved
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True):
        bias = None if linear.bias is None else linear.bias.detach().clone()   # frozen too, kept in its dtype
        return cls(nf4_quantize(linear.weight, block_size, double_quant), bias)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.codes, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.dtype, self.block_size, self.absmax_scale, self.absmax_offset)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out x in): a fresh tensor, so writing into it changes nothing."""
        return nf4_dequantize(self.quantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _DequantLinear.apply(x.to(dtype), self.quantized(), None if self.bias is None else self.bias.to(dtype))

    def _apply(self, fn, recurse=True):
        # Module.to(bf16) / .half() casts every float buffer, which would round the fp32 absmax
        # statistics to 16 bits. Keep those fp32 (only move them); the new dtype becomes the weight's.
        probe = fn(torch.zeros(0, dtype=self.dtype, device=self.codes.device))
        stats = {name: self._buffers[name] for name in self._STATS}
        super()._apply(fn, recurse)
        for name, t in stats.items():
            self._buffers[name] = t if t is None else t.to(probe.device)
        self.dtype = probe.dtype
        return self

    def extra_repr(self):
        dq = self.absmax_scale is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"dq={dq}")


def quantize_nf4(model: GPT, block_size: int = 64, double_quant: bool = True) -> GPT:
    """Store every linear layer of the transformer blocks in NF4 (in place): the frozen base of QLoRA.
    Embeddings and the output layer stay as they are (QLoRA keeps them in 16 bits). Call it before
    apply_lora, which then wraps the NF4 layers."""
    for block in model.transformer.h:
        for module in list(block.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, name, NF4Linear.from_linear(child, block_size, double_quant))
    return model


def dequantize_nf4(model: GPT) -> GPT:
    """Every NF4Linear back to an nn.Linear holding its dequantised weight (in place). The adapter of a
    QLoRA run learned its update on top of these weights, not on top of the original ones: merging into
    dequantize_nf4(quantize_nf4(base)) gives exactly the model that was trained (lora.py merge --nf4)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")  # no random init to throw away
                linear.weight = nn.Parameter(child.weight)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias)
                setattr(module, name, linear.requires_grad_(False))
    return model


def load_base(init_from: str, precision: str, lora: bool, quantize: str, device: str, fsdp: bool = False) -> GPT:
    """The model a fine-tuning stage starts from, in the dtype weight_dtype picks; with quantize="nf4"
    (QLoRA) its block linears in 4 bits, quantised on the CPU so that the 16-bit weights never reach the
    device. finetune.py and dpo.py both start here."""
    if quantize == "nf4" and (not lora or fsdp):
        raise ValueError("--quantize nf4 is QLoRA: it needs --lora_rank > 0, and works without --fsdp")
    nf4 = quantize == "nf4"
    model = GPT.from_pretrained(init_from, dtype=weight_dtype(precision, lora), device="cpu" if nf4 else device)
    return quantize_nf4(model).to(device) if nf4 else model


# -----------------------------------------------------------------------------------------------
# 6. CLI: merge an adapter into a model


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # what the former --dtype took


def precision_name(text: str) -> str:
    """--precision's value: fp32, bf16 or fp16, or the torch dtype name that --dtype took (float32, ...)."""
    return DTYPE_NAMES.get(text, text)


def cmd_merge(args):
    model = GPT.from_pretrained(args.base, dtype=PRECISION_DTYPES[args.precision])
    if args.nf4:  # the base as the QLoRA run saw it: rounded to 4 bits
        dequantize_nf4(quantize_nf4(model))
    load_adapter(model, args.adapter)
    unload_lora(model, merge=True)
    model.save_pretrained(args.out_dir, format=args.format)
    print(f"merged {args.adapter} into {args.base} -> {args.out_dir} ({args.format} format)")


def build_parser():
    ap = ArgumentParser(description="LoRA tools: merge an adapter into a model.",
                        formatter_class=DefaultsHelp)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge a PEFT-format adapter into a model and save it",
                       formatter_class=DefaultsHelp)
    m.add_argument("--base", required=True, help="gpt2 name, HF model dir (gpt2/llama) or our checkpoint dir")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    m.add_argument("--out_dir", "--out", required=True, help="output model directory")
    m.add_argument("--format", default="native", choices=["native", "hf"], help="output format")
    m.add_argument("--nf4", action=argparse.BooleanOptionalAction, default=False,
                   help="the adapter was trained on a 4-bit base (--quantize nf4): merge into that base, "
                        "dequantised, which is the model the run trained")
    m.add_argument("--precision", "--dtype", type=precision_name, default="fp32", choices=list(PRECISION_DTYPES),
                   help="load the base in this precision (--dtype's float32, bfloat16, float16 are taken too): "
                        "with --nf4 give the one the run quantised from (bf16 for a --precision bf16 run), so "
                        "that the 4-bit base is the same")
    m.set_defaults(fn=cmd_merge)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    run_main(main)
