"""
housekeeping.py: what no lesson is about. Skip it on first read: model.py is the model, and each stage
script (train_gpt2.py, finetune.py, dpo.py, ...) writes its own training step out. This file holds the
scaffolding around them, the same in every script:
  1. files written atomically (a kill never leaves half a file), JSON lines, logs;
  2. flags from a config dataclass, and run_main: a user error is one line `error: ...` and exit 2;
  3. devices, precision (autocast and fp16's loss scaling), memory guards;
  4. torchrun: the process group, DDP and FSDP wrapping, values gathered from every rank;
  5. run directories (never overwritten, locked), Ctrl-C and SIGTERM, random-number state;
  6. resumable training state (finetune.py, dpo.py);
  7. plots, before -> after lines, means with their standard error;
  8. a run's shared state: its log (RunLog) and its clock (StepClock);
  9. weight files: safetensors and torch pickles read (each tensor held once, lazily) and written;
 10. a Hugging Face reward model's scores (score.py, rl.py).
It imports none of this project's files; every script may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------------------------
# 1. Files: written atomically, never half; JSON and JSON lines

def atomic_write(path, write):
    """Call write(tmp_name) on a temporary file beside `path`, then rename it over `path`: readers
    never see a half-written file, and a kill mid-write leaves the old file whole. The file gets the
    usual mode (0666 less the umask; mkstemp alone would make it private to its owner)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # after writing: a writer may have made the file anew
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    # JSONDecodeError is a ValueError, as is an integer too long to convert; the parser recurses once per level
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_jsonl(path, rows, ensure_ascii: bool = True):
    """rows as JSON lines, written to a temp name and renamed: a kill never leaves half a file."""
    text = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows)
    atomic_write(Path(path), lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_log(path) -> list[dict]:
    """The rows of a log.jsonl; a damaged line (a kill, a full disk) is skipped and reported, not fatal."""
    rows, bad = [], []
    if Path(path).exists():
        for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):  # not JSON (a kill mid-line), or a number too long
                row = None
                bad.append(n)
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
            elif row is not None:
                bad.append(n)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))}"
              f"{' ...' if len(bad) > 5 else ''})", file=sys.stderr)
    return rows


def rewrite_log(path, keep) -> list[dict]:
    """Keep (and return) the rows of a log.jsonl where keep(row): a resume drops what comes again."""
    rows = [r for r in read_log(path) if keep(r)]
    write_jsonl(path, rows)
    return rows


# -----------------------------------------------------------------------------------------------
# 2. Flags: one --flag per field of a config dataclass; a user error is one line

def flag(default, help: str, choices=None, min=None, max=None, aliases=()):
    """A config dataclass field: default, --help text, accepted values (choices, or min/max checked when
    parsed), and aliases: other spellings of its flag (an earlier name kept working: "--max_lr" for --lr)."""
    return field(default=default, metadata=dict(help=help, choices=choices, min=min, max=max, aliases=aliases))


def bounded(kind=int, lo=None, hi=None):
    """An argparse type that also checks the range: a bad value is an error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):  # NaN passes every range check (nan < lo is False), inf is no setting
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                bounds = f">= {lo}"
            elif lo is None:
                bounds = f"<= {hi}"
            else:
                bounds = f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but:
    - a bad flag is one line `error: ...` and exit status 2, like every user error;
    - no abbreviations (`--max` is not taken for `--max_steps`);
    - a misspelt flag gets a suggestion: `--max-steps` -> did you mean --max_steps?"""

    def __init__(self, *args, **kwargs):
        self.flag_names = []  # every --flag and alias, for the suggestions (argparse adds --help first)
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def add_argument(self, *names, **kwargs):
        self.flag_names += [n for n in names if n.startswith("--")]
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}{self.suggestion(message)} (see {self.prog} --help)\n")

    def suggestion(self, message: str) -> str:
        """'; did you mean --max_steps?' for the first unrecognized flag close to a real one, else ''."""
        if "unrecognized arguments:" not in message:
            return ""
        for word in message.split("unrecognized arguments:", 1)[1].split():
            given = word.split("=", 1)[0]
            if not given.startswith("--"):
                continue
            spelt = "--" + given[2:].replace("-", "_")  # --max-steps: the flags are spelt with underscores
            candidates = [spelt] if spelt in self.flag_names else difflib.get_close_matches(given, self.flag_names, 1)
            if candidates:
                return f"; did you mean {candidates[0]}?"
        return ""


class DefaultsHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless it is required or its help says what the default is."""
    def _get_help_string(self, action):
        said = action.required or "default" in (action.help or "")
        return action.help if said else super()._get_help_string(action)


def config_parser(cls, description: str, alt_defaults: dict | None = None) -> argparse.ArgumentParser:
    """One --flag per field of `cls`, with its help, type, choices and range. Every default is None here, so
    that parse_config can tell the flags given. alt_defaults {label: {field: value}} show in the help too."""
    ap = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        m = f.metadata
        alts = "".join(f"; {label}: {d[f.name]!r}" for label, d in (alt_defaults or {}).items() if f.name in d)
        shown = "" if f.default is None and "default" in m["help"] and not alts else f" (default: {f.default!r}{alts})"
        kw = dict(default=None, help=f"{m['help']}{shown}".replace("%", "%%"))
        kind = {"int": int, "float": float, "bool": bool}.get(str(f.type).split("|")[0].strip(), str)
        names = [f"--{f.name}", *m.get("aliases", ())]
        if kind is bool:
            ap.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument(*names, dest=f.name, choices=m.get("choices"), **kw,
                            type=bounded(kind, m.get("min"), m.get("max")) if kind is not str else str)
    return ap


def parse_config(cls, argv, description: str, defaults: dict | None = None, alt_defaults=None):
    """(config, the flags given): the dataclass's defaults, then `defaults`, then the flags."""
    given = {k: v for k, v in vars(config_parser(cls, description, alt_defaults).parse_args(argv)).items()
             if v is not None}
    return cls(**{**(defaults or {}), **given}), given


def one_line(e: Exception) -> str:
    """A user error as its `error:` line says it: an OSError by its file and reason, else its message."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def run_main(main, argv=None):
    """Run a script's main: a user error (bad file, value or flag, missing data, no hub, full disk) is one
    line `error: ...` (rank 0's) and exit status 2, no traceback. Anything else is a bug: its traceback.
    Under torchrun the line also goes to torchrun's error file, so that its failure summary names it."""
    try:
        return main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, preparing data): nothing to save
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as e:
        msg = one_line(e)
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {msg}", file=sys.stderr)
            _torchrun_error_file(msg)
        raise SystemExit(2) from None
    finally:  # a rank leaving early: its gloo group goes now, not at interpreter exit, where gloo can abort
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()


def _torchrun_error_file(msg: str):
    """torchrun names each child's error file in $TORCHELASTIC_ERROR_FILE and prints its message in its
    failure summary (else `error_file: <N/A>`). The format is torch.distributed.elastic's: the message,
    and a "call stack" that is here the one error line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"error: {msg}",
                        "extraInfo": {"py_callstack": f"error: {msg}", "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data))


def rank0_decides(decide, *args, **kwargs):
    """decide(*args, **kwargs) on rank 0 alone, its result (or its one-line refusal) sent to every rank.
    Under torchrun, a check that only rank 0 can make (a run directory's lock, what it holds) must reach
    the others before any collective: else they wait at the next one until rank 0's exit breaks it, and
    each prints a traceback. Here every rank raises the same ValueError, and exits 2 with one line.
    Without a process group: decide(...) itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return decide(*args, **kwargs)
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", decide(*args, **kwargs))]
        except (ValueError, OSError) as e:
            outcome = [("refused", one_line(e))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "refused":
        raise ValueError(value)
    return value


# -----------------------------------------------------------------------------------------------
# 3. Devices, precision and memory guards

DEVICE_HELP = "auto|cpu|cuda|cuda:N|mps (auto: a CUDA GPU, else mps, else the CPU)"  # every --device, pick_device's

def pick_device(name: str = "auto") -> str:
    """'auto': a CUDA GPU, else Apple's MPS, else the CPU. Under torchrun 'cuda' is cuda:LOCAL_RANK (else
    every rank would use GPU 0)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this machine's PyTorch has no {kind} device")
    return name


def pick_precision(name: str, device: str) -> str:
    """'auto': bf16 on GPUs with bf16 tensor cores (capability >= 8.0), fp16 with loss scaling on older ones
    (V100, T4: is_bf16_supported() says True, but emulates it slowly), fp32 elsewhere."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.get_device_capability(torch.device(device))[0] >= 8 else "fp16"
    return "fp32"


def autocast_and_scaler(precision: str, device_type: str):
    """(autocast context factory, GradScaler or None). Mixed precision: fp32 master weights, 16-bit matmuls.
    bf16 has fp32's exponent range: autocast suffices. fp16's 5-bit exponent underflows small gradients to 0:
    loss scaling multiplies the loss before backward and divides the gradients before the step (GradScaler,
    which also skips steps whose gradients overflowed)."""
    if precision == "fp32":
        return contextlib.nullcontext, None
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    return functools.partial(torch.autocast, device_type, dtype=dtype), scaler


def fits_in_memory(need_bytes: float, what: str):
    """Refuse a size beyond the machine before allocating (not killed later, or deep in torch). need_bytes
    is a lower bound, the limit all RAM and GPU memory: a refusal is never a false alarm."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        limit += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    if need_bytes > limit:
        raise ValueError(f"{what} needs at least {need_bytes / 2 ** 30:.3g} GiB of memory; this machine holds "
                         f"{limit / 2 ** 30:.3g} GiB (RAM and GPUs)")


def check_model_size(c, tokens: int = 0, batch: str = ""):
    """GPT(c) refused before it is built if its weights cannot fit at 4 bits a parameter (NF4, our least) plus
    a few KB a block; with `tokens` (a batch, `batch` in words), their ids and one 16-bit activation each."""
    kv, hd = c.n_kv_head or c.n_head, c.head_dim or max(1, c.n_embd // max(1, c.n_head))
    per_block = c.n_embd * hd * 2 * (c.n_head + kv) + (3 if c.mlp == "swiglu" else 2) * c.n_embd * (c.ffn_hidden or 0)
    n = c.n_layer * per_block + c.padded_vocab_size * c.n_embd + c.block_size * (c.n_embd + hd)
    fits_in_memory(n / 2 + 10_000 * c.n_layer + tokens * (16 + 2 * c.n_embd),
                   f"a model of n_layer {c.n_layer}, n_embd {c.n_embd}, block_size {c.block_size}, vocab_size "
                   f"{c.vocab_size}" + (f", with a batch of {batch}" if batch else ""))


def peak_memory_mb(device: str = "cpu") -> float:
    """The memory high-water mark: CUDA's max_memory_allocated, else the resident-set peak VmHWM (not
    ru_maxrss, which an exec carries over: a child of a big parent would report the parent's peak)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20
    return process_memory_mb("VmHWM")


def process_memory_mb(which: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(which + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def fit_to_context(prompts: list[list[int]], max_new_tokens: int, block_size: int, flag: str = "--max_new_tokens"):
    """(prompts, n_new) that fit a block_size context: n_new is max_new_tokens capped at what the longest
    prompt leaves, but at least half the context (longer prompts keep their last tokens); noted once a flag."""
    longest = max((len(p) for p in prompts), default=0)
    n_new = min(max_new_tokens, max(block_size - longest, block_size // 2))
    keep = block_size - n_new
    if n_new < max_new_tokens and flag not in _capped_flags:
        _capped_flags.add(flag)
        cut = f"; prompts keep their last {keep} tokens" if longest > keep else ""
        print(f"note: {flag} {max_new_tokens} capped at {n_new}: the model's context is {block_size} tokens"
              f"{cut}", file=sys.stderr, flush=True)
    return [p[-keep:] if keep else [] for p in prompts], n_new


_capped_flags: set[str] = set()  # the flags whose cap has been noted, so a chat loop says it once

# -----------------------------------------------------------------------------------------------
# 4. torchrun: the process group, DDP and FSDP, values from every rank

def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Under torchrun, joins the process group (NCCL on GPUs, else gloo)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return rank, local, world


def distribute(model, device: str, fsdp: bool = False, precision: str = "fp32", block_type=None):
    """The module to train when torchrun started several processes (else `model`). DDP: every rank holds
    the whole model and optimizer state; backward averages the gradients. FSDP2 (fully_shard): parameters,
    gradients and optimizer state split 1/N a rank; a block's weights are gathered just before it runs and
    freed after, so a model N times one device fits (block_type: the class of a block, each
    block sharded on its own). GPU bf16: bf16 gathers and reductions (half the traffic)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    cuda = device.startswith("cuda")
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # GPT.forward's logits cut to vocab_size are a view: harmless, the loss is used
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cuda else None
        mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=half)
        for m in [m for m in model.modules() if isinstance(m, block_type)]:
            fully_shard(m, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # the buffers are constants, the same on every rank: no re-sending them (torch >= 2.13: forward_sync_buffers)
    sync_off = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
    return DDP(model, device_ids=[torch.device(device).index] if cuda else None, **sync_off)


def grad_sync(module, sync: bool):
    """Gradient accumulation averages across ranks only in the last micro-step: DDP's no_sync skips the
    others' all-reduce, FSDP2 keeps unsharded gradients until then. A context manager (plain module: no-op)."""
    if hasattr(module, "no_sync"):
        return contextlib.nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def gathered(model, skeleton_fn, master: bool):
    """The model to save from. FSDP: every rank helps gather the weights; rank 0 gets a CPU copy (skeleton_fn
    built on meta, given the tensors), the others None. Without FSDP: the model itself."""
    if not hasattr(model, "reshard"):  # not an FSDP2 module
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return None
    with torch.device("meta"):
        copy = skeleton_fn()
    copy.load_state_dict(sd, strict=False, assign=True)
    for m in copy.modules():
        if hasattr(m, "after_meta_load"):  # model.GPT: re-tie the embeddings, compute the constant tables
            m.after_meta_load()
    return copy


def all_ranks(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]: every rank's value, on every rank (one rank: [obj])."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def end_distributed():
    """Leave the process group together: gloo going away under a rank still talking can abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------
# 5. Run directories: never overwritten, locked, resumed; Ctrl-C and SIGTERM; random-number state

RUN_FILES = ("log.jsonl", "config.json", "ckpt")  # what marks an out_dir as holding a run
# what our runs write in an out_dir (*.tmp: a killed atomic write): --overwrite removes these, nothing else

RUN_OUTPUTS = ("run.lock", "config.json", "log.jsonl", "loss.png", "ckpt", "ckpt.tmp", "ckpt.old", "ckpt_step*",
               "summary.*", "best_adapter", "best_model", "responses.jsonl", "responses.md", "scoring", "adapter",
               "model", "ref_logps.json", "dpo.png", "samples.md", "results.*", "runs", "scores.*",
               "judge_cache.jsonl", "*.tmp")

RUN_MODELS = {"best_model": "its best model", "model": "its final model", "ckpt/model": "its last checkpoint"}

_held_locks = {}  # out_dir -> the open, locked run.lock of this process

def open_run(out_dir, resume: bool = False, overwrite: bool = False) -> Path:
    """Make out_dir ready for a run (see claim_run_dir). Every rank calls it: under torchrun rank 0 decides
    and the others learn its answer before any collective, so that a refusal is one line and every rank
    exits 2."""
    return rank0_decides(claim_run_dir, out_dir, resume, overwrite)


def claim_run_dir(out_dir, resume: bool = False, overwrite: bool = False) -> Path:
    """Make out_dir ready for a run, before any work; nothing already written is lost.
    - run.lock (holding the pid, which shows the directory writable) is locked first: a second live run on
      it stops here. The kernel releases the lock when the process ends, even by SIGKILL.
    - An out_dir holding a run needs --resume (continue it) or --overwrite.
    - --overwrite removes only a run of ours: a directory whose every entry is something our runs write
      (RUN_OUTPUTS) and which holds a run's own record (RUN_FILES: its log, config or checkpoint), or a
      run.lock. A finished run (its run.lock removed at the end) is ours by that record. Anything else
      stops it, named, untouched.
    - A refusal leaves nothing behind: no lone run.lock."""
    out = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    key = str(out.resolve())
    if key in _held_locks:  # an earlier run of this same process (tests, notebooks): not a rival
        os.close(_held_locks.pop(key))
    marked = (out / "run.lock").exists() or any((out / f).exists() for f in RUN_FILES)
    if overwrite and out.is_dir():
        present = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != "run.lock")
        foreign = [n for n in present if not any(fnmatch.fnmatch(n.rstrip("/"), pat) for pat in RUN_OUTPUTS)]
        if present and (foreign or not marked):
            raise ValueError(f"--overwrite: {out} holds {', '.join((foreign or present)[:5])}, " + (
                "which no run of ours wrote" if foreign else "but no run of ours (no log, config or checkpoint)")
                + "; nothing was removed: move that away or choose another --out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out_dir {out}: cannot write there ({e.strerror})") from None
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"--out_dir {out}: another run (pid {holder}) is using it; wait for it to end or "
                         f"choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = fd  # kept open (and locked) until this process exits
    # a link where the run writes (ckpt/ on a bigger disk, say): each save renames the checkpoint, which
    # would replace the link itself, and a link is never removed through (what it points to is not ours)
    links = sorted(p.name for p in out.iterdir() if p.is_symlink())
    if links and not overwrite:
        close_run(out)
        raise ValueError(f"--out_dir {out}: {', '.join(links)} is a link (to {os.readlink(out / links[0])}); a run "
                         f"replaces its files by renaming, which would break it: point --out_dir itself at the other "
                         f"disk instead")
    held = [f for f in RUN_FILES if (out / f).exists() or (out / f).is_symlink()]
    if held and not resume and not overwrite:
        close_run(out)  # refused: the lock goes with this process's claim
        raise ValueError(f"--out_dir {out} holds a run ({', '.join(held)}); pass --resume to continue it or "
                         f"--overwrite to replace it")
    if overwrite:
        for p in out.iterdir():
            if p.name != "run.lock":
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()  # a file, or a link (never followed: what it points to is not ours)
    return out


def close_run(out_dir):
    """The run in out_dir is over: run.lock is removed while still held, then released (an exit leaves it)."""
    fd = _held_locks.pop(str(Path(out_dir).resolve()), None)
    if fd is not None:
        Path(out_dir, "run.lock").unlink(missing_ok=True)
        os.close(fd)


def previous_stage(*dirs) -> str | None:
    """The first directory holding a saved model: the earlier stage a stage without --init_from continues."""
    return next((str(d) for d in dirs if any((Path(d) / f).exists() for f in ("gpt_config.json", "config.json"))), None)


def auto_init_from(dirs, run_first: str) -> str:
    """--init_from auto: the first of `dirs` holding a saved model (the earlier stage), else GPT-2 if the
    Hugging Face cache already holds it. Else one error line: which stage to run first on this machine,
    and the --init_from of the real recipe where there is internet."""
    found = previous_stage(*dirs)
    if found:
        return found
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache("openai-community/gpt2", "config.json"), str)
    except Exception:  # no huggingface_hub, an unreadable cache: as if empty
        cached = False
    if cached:
        return "gpt2"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    if not offline and _hub_reachable():
        return "gpt2"
    raise ValueError(f"no earlier stage's model on this machine yet ({', '.join(map(str, dirs))}): run "
                     f"`{run_first}` first, or pass --init_from gpt2 where there is internet")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers at all (a HEAD request, a few seconds at most)."""
    try:
        import requests

        requests.head("https://huggingface.co", timeout=timeout)
        return True
    except Exception:
        return False


def _is_model_dir(p: Path) -> bool:  # ours, or Hugging Face's (a run's config.json of flags has no model_type)
    return (p / "gpt_config.json").is_file() or (p / "config.json").is_file() and "model_type" in read_json(
        p / "config.json")


def resolve_init_from(name_or_dir: str, say: bool = True) -> str:
    """A run directory stands for its best_model/, else model/, else ckpt/model/, named in one line."""
    path = Path(name_or_dir).expanduser()
    if not path.is_dir() or _is_model_dir(path):
        return name_or_dir
    for sub, what in RUN_MODELS.items():
        if _is_model_dir(path / sub):
            if say and os.environ.get("RANK", "0") == "0":
                print(f"--init_from {name_or_dir}: a run directory; using {path / sub}, {what}", file=sys.stderr)
            return str(path / sub)
    if any((path / f).exists() for f in RUN_FILES):
        raise FileNotFoundError(f"--init_from {name_or_dir}: a run directory without a saved model "
                                f"({'/, '.join(RUN_MODELS)}/)")
    return name_or_dir


class GracefulStop:
    """Ctrl-C or SIGTERM (`kill`, preemption) while training: the step finishes, the script saves its state,
    exit() says where and leaves with 128 + the signal (130, 143), no traceback; a second Ctrl-C stops at once.
    requested() agrees over torchrun's ranks (saving is collective)."""

    def __init__(self):
        self.signum, self._old = 0, {}
        with contextlib.suppress(ValueError):  # ValueError: not the main thread, where signals cannot be taken
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum:  # the second signal: at once, with that signal's status (130 for SIGINT, 143 for SIGTERM)
            self.restore()
            print(f"\n{signal.Signals(signum).name} again: stopping at once, without a checkpoint", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again: "
                  f"at once, without)", file=sys.stderr, flush=True)

    def requested(self, device="cpu") -> bool:
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([self.signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item())
        return bool(self.signum)

    def exit(self, step: int, where):
        self.restore()
        if os.environ.get("RANK", "0") == "0":
            print(f"{signal.Signals(self.signum).name}: stopped at step {step}; resumable state in {where}; "
                  f"continue with --resume", file=sys.stderr, flush=True)
        end_distributed()
        raise SystemExit(128 + self.signum)

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def seed_everything(seed: int):
    """torch's, numpy's and Python's generators from one seed (the scripts: the same init on every rank,
    then seed + rank, so that each rank draws its own dropout masks)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state(device: str = "cpu") -> dict:
    """This process's random generators as plain tensors, lists and numbers (weights_only-loadable); each
    rank has its own streams, so a checkpoint keeps one per rank."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None,
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(s: dict, device: str = "cpu"):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(s["cuda"], device)
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def check_finite(step: int, scaler=None, **values):
    """A non-finite loss or gradient norm stops the run before this step is saved: the last checkpoint stays
    good. Under fp16's GradScaler an overflowing gradient is routine (the step is skipped): only the loss counts."""
    if scaler is not None:
        values.pop("grad_norm", None)
    bad = [f"{k} {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise ValueError(f"step {step}: {', '.join(bad)}: the training diverged and stops here; nothing of this "
                         f"step was saved (the last checkpoint is the last good state). Try a lower learning rate")


# -----------------------------------------------------------------------------------------------
# 6. Resumable training state: what is trained, where a run left off

def weights_identity(name_or_dir) -> dict | None:
    """What identifies a model's weights without reading them whole: each weight and config file's size
    and the SHA-1 of its first and last MiB (a new save, another model, a damaged copy all change it; a
    move or a copy does not). A run directory stands for its model. None for a name that is no local
    directory (a hub id)."""
    path = Path(resolve_init_from(str(name_or_dir), say=False)).expanduser()
    if not path.is_dir():
        return None
    identity = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            digest = hashlib.sha1()
            with open(f, "rb") as fh:
                digest.update(fh.read(2 ** 20))
                fh.seek(max(0, f.stat().st_size - 2 ** 20))
                digest.update(fh.read())
            identity[f.name] = [f.stat().st_size, digest.hexdigest()]
    return identity


def write_run_config(out_dir, cfg):
    """out_dir/config.json: the run's flags, and the identity of the weights it starts from (init_from),
    so that --resume can tell the same run from one whose starting weights were replaced since."""
    record = {**asdict(cfg), "init_weights": weights_identity(cfg.init_from)}
    atomic_write(Path(out_dir) / "config.json", functools.partial(_write_json, record))


def _write_json(record: dict, path):
    Path(path).write_text(json.dumps(record, indent=2))


def resumed_config(cls, c, given: dict, out_dir, fixed=()):
    """--resume: the run's config.json with the flags given now on top (a longer --max_steps). A run is its
    inputs, so a resume is refused, in one line, when one of them differs:
    - a `fixed` flag given now (the model, what is trained, the optimizer), paths compared resolved;
    - the starting weights, whose identity config.json recorded when the run began."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {out_dir} holds no run to continue (no config.json)")
    record = read_json(path)
    saved = {k: v for k, v in record.items() if k in {f.name for f in fields(cls)}}
    saved.pop("stop_at_step", None)  # a one-off of the run that stopped
    saved.pop("overwrite", None)  # how that run began, not what it is: resuming it never replaces it
    changed = [f"--{k} {given[k]!r} (the run: {saved.get(k)!r})"
               for k in fixed if k in given and not same_setting(given[k], saved.get(k))]
    if changed:
        raise ValueError(f"--resume continues the run in {out_dir}; these flags differ from it: {', '.join(changed)}")
    resumed = cls(**{**saved, **given, "resume": True})
    recorded = record.get("init_weights")
    if recorded is not None and weights_identity(resumed.init_from) != recorded:
        raise ValueError(f"--resume: the starting weights in {resumed.init_from} are not those the run in {out_dir} "
                         f"began from (their files changed since); a resumed run must start from the same weights: "
                         f"start a new run (--overwrite, or another --out_dir)")
    return resumed


def same_setting(given, saved) -> bool:
    """Whether a flag given on --resume names what the run was started with. Paths are compared resolved
    with resolved: a run directory and the model it stands for (`base` and `base/ckpt/model`), a relative
    and an absolute spelling, a link and its target, are the same setting."""
    if given == saved:
        return True
    if not (isinstance(given, str) and isinstance(saved, str)):
        return False
    try:
        a = Path(resolve_init_from(given, say=False)).expanduser()
        b = Path(resolve_init_from(saved, say=False)).expanduser()
    except OSError:
        return False
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def save_train_state(out_dir, model, optimizer, step: int, extra: dict, master: bool = True):
    """out_dir/ckpt/state.pt, to continue a fine-tuning run exactly: the trainable weights (frozen ones come
    back from --init_from), optimizer state, step and `extra` (data order, RNG states, best so far).
    Gathered whole under DDP/FSDP: every rank calls this, rank 0 writes (temp name, renamed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, _parts(optimizer), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if master:
        path = Path(out_dir) / "ckpt" / "state.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(model=model_sd, optimizer=optim_sd, step=step, extra=extra)
        try:
            atomic_write(path, lambda p: torch.save(state, p))
        except RuntimeError as e:  # torch.save reports a full disk as a RuntimeError
            raise OSError(f"{path}: writing the training state failed ({str(e).splitlines()[0][:160]}); is the "
                          f"disk full? The previous state is kept") from None


def _parts(optimizer):
    """What torch's checkpointing sees: Muon + AdamW (model.MuonAdamW) are two torch optimizers to it."""
    return getattr(optimizer, "torch_optimizers", optimizer)


def load_train_state(out_dir, model, optimizer) -> tuple[int, dict]:
    """(step, extra) of out_dir/ckpt/state.pt, loaded into model and optimizer (FSDP: each rank its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(out_dir) / "ckpt" / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {out_dir} holds a run but no resumable state ({path} is missing: "
                                f"the run stopped before its first checkpoint). --resume continues from the last "
                                f"checkpoint; with none, start the run again with --overwrite")
    try:  # weights_only: a pickle can run arbitrary code; this only rebuilds tensors and plain data
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); it may be truncated") from None
    set_state_dict(model, _parts(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    return state["step"], state["extra"]


# -----------------------------------------------------------------------------------------------
# 7. Summaries: plots, before -> after lines, means with their standard error

def plot_log(rows: list[dict], path, panels: list[list[str]], titles=None, hlines=()):
    """A PNG, a subplot per panel of log keys against "step"; hlines: (panel index, y, label) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for i, (ax, keys) in enumerate(zip(axes[0], panels)):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-" if len(pts) <= 50 else "-", lw=1, alpha=0.8, label=key)
        for j, y, label in hlines:
            if j == i:
                ax.axhline(y, ls="--", color="gray", label=label)
        ax.set_xlabel("step")
        ax.set_title(titles[i] if titles else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def _figure(x) -> str:
    """A metric as a summary line shows it: 3 decimals, 'n/a' where there was none."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def before_after(summary: dict, what: str = "") -> str:
    """A stage's closing line from its summary.json: each metric before -> after (what: on which data)."""
    b, a = summary["before"], summary["after"]
    return f"before -> after{f' ({what})' if what else ''}: " + ", ".join(
        f"{k} {_figure(b.get(k))} -> {_figure(v)}" for k, v in a.items())


def finite_figures(what: str, figures: dict) -> dict:
    """The rule of every reported metric: no figure from non-finite numbers. A NaN or inf (the model's outputs
    were not numbers) is one error naming each such metric and `what` was measured, never a figure in a
    before -> after line or a table. Values that are not floats (counts, None for "not measured") pass."""
    bad = [f"{k} {v}" for k, v in figures.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: {', '.join(bad)}: not finite (a NaN or inf among the model's outputs); "
                         f"no figure is reported")
    return figures


def mean_stderr(total: float, total_sq: float, n: int, what: str = "a score") -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) from sums (shards reduce 3 numbers); NaN if undefined
    (no value, or one). Sums that are not finite (a NaN or inf among the values) are an error naming
    `what`, never a figure."""
    if not (math.isfinite(total) and math.isfinite(total_sq)):
        raise ValueError(f"{what}: {n} value(s) whose sum is {total}: a NaN or inf among them (the model's "
                         f"outputs are not numbers); no mean is given")
    if n == 0:
        return float("nan"), float("nan")
    mean = total / n
    if n < 2:
        return mean, float("nan")
    var = max(0.0, (total_sq - total * total / n) / (n - 1))
    return mean, math.sqrt(var / n)


# -----------------------------------------------------------------------------------------------
# 8. A run's shared state: its log and its clock


class RunLog:
    """A run's log.jsonl, appended a row at a time and flushed (a kill loses at most the row being
    written), with the rows kept for the plot and the summary. Only rank 0 writes or prints: on the
    other ranks every call is a no-op, so a loop needs no `if master` around its logging."""

    def __init__(self, out_dir, master: bool, rows: list[dict] | None = None):
        self.path = Path(out_dir) / "log.jsonl"
        self.master = master
        self.rows = list(rows or [])
        self.file = open(self.path, "a", encoding="utf-8") if master else None

    def say(self, *parts):
        if self.master:
            print(*parts, flush=True)

    def record(self, row: dict):
        if self.master:
            self.rows.append(row)
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _duration(seconds: float) -> str:
    """3 s, 4m05s, 1h02m: the coarsest unit that still says something."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepClock:
    """Seconds per training step and the time left, from the last steps timed in this process (the first
    `skip` steps left out: they warm up the allocator, compile, fill caches). A resumed run counts from its
    own first step. Evaluations between steps are not in it: the time left is the training's."""

    def __init__(self, max_steps: int, skip: int = 1):
        self.max_steps = max_steps
        self.skip = skip
        self.seconds = []

    def add(self, seconds: float):
        self.seconds.append(seconds)

    def per_step(self) -> float | None:
        """The mean of the last 50 timed steps: recent, so that the first slow steps fade out."""
        # a slice of the last 50 alone: no copy of the whole run's list at every step
        timed = self.seconds[max(self.skip, len(self.seconds) - 50):] or self.seconds
        return sum(timed) / len(timed) if timed else None

    def left(self, step: int) -> str:
        """'0.42 s/step, 3m10s left' after `step` of max_steps steps ('' before any step was timed)."""
        per = self.per_step()
        if per is None:
            return ""
        return f"{per:.3g} s/step, {_duration(per * max(0, self.max_steps - step))} left"

    def estimate(self) -> str:
        """The start line's promise once a few steps ran: 'about 4m10s for 600 steps at 0.42 s/step'."""
        per = self.per_step()
        return f"about {_duration(per * self.max_steps)} for {self.max_steps} steps at {per:.3g} s/step"


def resolve_warmup(warmup_steps: int, max_steps: int) -> tuple[int, str]:
    """(the warmup the run uses, a note saying why it differs from --warmup_steps, or ''). The same rule in
    every training script: -1 is 5% of the run; a warmup longer than half the run (a short trial run of a
    long recipe) is cut to a tenth of it, so that the run still spends most of its steps at the peak."""
    if warmup_steps < 0:
        warmup = int(0.05 * max_steps)
        return warmup, f"--warmup_steps -1: {warmup} steps, 5% of the {max_steps}"
    if warmup_steps > max_steps // 2:
        warmup = max(1, max_steps // 10)
        return warmup, f"--warmup_steps {warmup_steps} cut to {warmup}, a tenth of the {max_steps} steps"
    return warmup_steps, ""


# -----------------------------------------------------------------------------------------------
# 9. Weight files: reading them (safetensors, shards, torch pickles refused) and writing them, each tensor
#    held once. Generic file I/O: which tensor means what (name mapping, checks) is model.py's appendix


def is_hub_id(name: str) -> bool:
    """"org/name" that is no local path: a Hugging Face hub id."""
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model_dir(name_or_dir: str) -> Path:
    """The directory of a model: a local one (a run's model, via resolve_init_from), else a snapshot from the
    Hugging Face hub of the files a model needs (config, safetensors weights, tokenizer), or one error line."""
    path = Path(resolve_init_from(name_or_dir)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a model directory, got a file")
    hub_id = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}.get(name_or_dir)
    if hub_id is None and not is_hub_id(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir}: no such directory, and not a GPT-2 name (gpt2, gpt2-medium, "
                                f"gpt2-large, gpt2-xl) or a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(hub_id or name_or_dir, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
            "tokenizer*", "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt"]))
    except Exception as e:  # offline, unknown repo, ...
        repo = hub_id or name_or_dir
        local = "models/" + repo.split("/")[-1]
        raise FileNotFoundError(f"could not get {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}). "
                                f"Offline? Where there is internet, run `hf download {repo} --local-dir {local}`, "
                                f"copy {local}/ here and pass it instead of {name_or_dir!r}") from None


class LazyTensor:
    """A tensor in a weights file (`file`: its path), read only when asked for (so a 7B model never sits twice
    in RAM)."""

    def __init__(self, load, shape, file):
        self.load, self.shape, self.file = load, tuple(shape), file


# safetensors: 8 bytes (header length), a JSON header (each tensor's dtype, shape, byte range), the raw bytes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(fpath: Path) -> tuple[dict, int]:
    """(header, where the data starts). The safetensors library checks the header against the file first
    (fields, byte ranges tiling the file, shapes): a lying header is refused before anything is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(fpath), framework="pt"):
            pass
        with open(fpath, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except Exception as e:  # SafetensorError, OSError, ...: the file, not our code
        why = str(e).splitlines()[0][:200] + ("; is it truncated?" if "not fully covered" in str(e) else "")
        raise ValueError(f"{fpath}: not a readable safetensors file ({why})") from None
    header.pop("__metadata__", None)
    unknown = sorted({info["dtype"] for info in header.values()} - set(_SAFETENSORS_DTYPES))
    if unknown:
        raise ValueError(f"{fpath}: tensor dtype(s) {', '.join(unknown)} not supported; expected "
                         f"{', '.join(_SAFETENSORS_DTYPES)}")
    return header, 8 + n


def _read_safetensor(fpath: Path, info: dict, data_start: int):
    """One tensor, by plain reads into a fresh tensor: no memory map, so each tensor is held once."""
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


def load_safetensors(fpath) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, its header checked against the file first."""
    header, data_start = _safetensors_header(Path(fpath))
    return {k: _read_safetensor(Path(fpath), info, data_start) for k, info in header.items()}


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Write a .safetensors file atomically: a failed write (a full disk) leaves the old file and one error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        atomic_write(Path(path), lambda p: save_file(tensors, p, metadata=metadata))
    except (OSError, SafetensorError) as e:
        raise OSError(f"{path}: writing failed ({str(e).splitlines()[0][:160]}); is the disk full? Nothing "
                      f"was replaced") from None


def load_torch_weights(path) -> dict:
    """A pytorch_model.bin / adapter_model.bin with weights_only: tensors only (a pickle can run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: this pickle holds more than tensors, and unpickling it could run "
                         f"code; nothing of it was run. Convert it to .safetensors where you trust it") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None


def check_weight(where, name: str, t: torch.Tensor, float_weight: bool = True):
    """Every weight checked once, as it is read, by every loader (a model directory, an adapter): a float
    weight stored as integers (a damaged header: the same width, another type) or holding NaN/inf would
    load, then fail far away or score as if it were a model. One line naming the file and the tensor."""
    if float_weight and not t.is_floating_point():
        raise ValueError(f"{where}: tensor {name} is stored as {t.dtype}, but it is a float weight of the model; "
                         f"the file is damaged or not a model")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or inf): these weights "
                         f"diverged or the file is damaged; nothing was loaded")


def read_weights(path: Path) -> dict[str, LazyTensor]:
    """{name: LazyTensor} of a model directory's weights: model.safetensors, shards named by an index, or a
    pytorch_model.bin (weights_only). Headers are read and checked now; the tensors when asked for."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").exists():
        sd = load_torch_weights(path / "pytorch_model.bin")
        # clone: the loaded tensors are views of the memory-mapped file
        return {k: LazyTensor(lambda t=t: t.clone(), t.shape, path / "pytorch_model.bin") for k, t in sd.items()}
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
            out[k] = LazyTensor(lambda p=fpath, i=info, s=data_start: _read_safetensor(p, i, s), info["shape"], fpath)
    return out


# -----------------------------------------------------------------------------------------------
# 10. A Hugging Face reward model: (question, answer) -> a score (score.py, rl.py)


@functools.lru_cache(maxsize=1)  # loaded once for all the checkpoints of a run
def load_reward_model(name: str, device="cpu"):
    """(tokenizer, model) of a Hugging Face sequence classifier used as a reward model (hub id or directory),
    or one error line; a pickle with more than tensors is refused, never run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(name),
                AutoModelForSequenceClassification.from_pretrained(name).to(device).eval())
    except pickle.UnpicklingError:  # transformers reads a .bin with weights_only: it refused a payload
        bins = sorted(str(p) for p in Path(name).glob("*.bin")) or [name]
        raise ValueError(f"{', '.join(bins)}: refused: this pickle holds more than tensors, and unpickling it "
                         f"could run code; nothing of it was run. Use the model's .safetensors") from None
    except OSError as e:
        raise ValueError(f"--reward_model {name}: cannot be loaded ({str(e).splitlines()[0][:160]}). "
                         f"Offline? `hf download {name} --local-dir models/reward` where there is "
                         f"internet, then pass --reward_model models/reward") from None


@torch.no_grad()
def reward_scores(reward_model: str, questions: list[str], answers: list[str], batch_size: int = 8,
                  device="cpu") -> list[float]:
    """A reward model's score of each (question, answer): the pair encoded together, logit 0, as the
    OpenAssistant reward models' cards do (score.py's judge, rl.py's RLHF reward)."""
    tok, rm = load_reward_model(reward_model, device)
    out = []
    for i in range(0, len(questions), batch_size):
        enc = tok(questions[i:i + batch_size], answers[i:i + batch_size], return_tensors="pt", padding=True,
                  truncation=True).to(device)
        out += rm(**enc).logits[:, 0].float().tolist()
    return out
