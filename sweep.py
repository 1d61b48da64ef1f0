"""
sweep.py: compare fine-tuning configurations, LoRA ranks against full fine-tuning above all. Each
configuration is one finetune.py run in a fresh process (one run's memory peak or crash cannot touch
the next); the rows end up in one table and one plot.

    python sweep.py                          # offline: lora_rank=0,2,8 on train_gpt2.py's CPU checkpoint
    python sweep.py --set lora_rank=0,4,16 --set lora_alpha=16,32 --max_steps 200 --out_dir sweeps/mine
    python sweep.py --resume --out_dir sweeps/mine      # after a kill or a failure: done rows are kept

Each --set NAME=V1,V2,... is a finetune.py flag and its values; several --set form every combination.
Every other flag goes to every run unchanged (model, data, seed: every row trains on the same split),
then the row's values and --out_dir OUT/runs/<name> --overwrite; a run is named by its values, e.g.
lora_rank=4,lora_alpha=16. With --score_every_eval --reward_model X (or --judge_url U), passed on,
each row also gets the last evaluation's reward_mean / judge_mean.

The two studies. (1) GPT-2 on Alpaca, LoRA ranks 1-32 against full fine-tuning:
    python sweep.py --init_from gpt2 --set lora_rank=0,1,2,4,8,16,32 --grad_accum 8 --max_examples 200 \\
        --max_response_chars 512 --out_dir sweeps/gpt2-alpaca
(2) GPT-2 medium, LoRA against full fine-tuning on instruction tuning and three classification tasks,
varying rank, alpha, the trained blocks and the optimizer, one axis a sweep:
    python sweep.py --init_from gpt2-medium --set lora_rank=0,4,16,64 --set lora_alpha=16,32 --grad_accum 8 \\
        --max_examples 200 --max_response_chars 512 --out_dir sweeps/medium-alpaca
    C="--init_from gpt2-medium --task classify --dataset sst2 --balance --max_examples 4000 --max_steps 300"
    python sweep.py $C --set lora_rank=0,4,16,64 --out_dir sweeps/medium-sst2-rank
    python sweep.py $C --lora_rank 16 --set lora_alpha=8,16,32,64 --out_dir sweeps/medium-sst2-alpha
    python sweep.py $C --set lora_rank=0,16 --set train_last_n_blocks=0,6,12 --out_dir sweeps/medium-sst2-layers
    python sweep.py $C --set lora_rank=0,16 --set optimizer=adamw,sgd_momentum --out_dir sweeps/medium-sst2-optim
and the same four with --dataset sms_spam, and with --dataset mnli --num_classes 3.

OUT gets results.jsonl (a row per configuration: config, best val loss and perplexity, test metrics,
trainable parameters, peak memory, seconds, tokens/s, status ok or failed with a reason), results.md
(the table, best row marked), results.png (val loss, or test accuracy with --task classify, and peak
memory against trainable parameters), config.json (the sweep), runs/<name>/ and runs/<name>.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from housekeeping import ArgumentParser, atomic_write, finite_figures, open_run, run_main, write_jsonl

FINETUNE = Path(__file__).resolve().with_name("finetune.py")
DEFAULT_SET = "lora_rank=0,2,8"  # full fine-tuning against two small ranks: minutes on a laptop CPU
OWN = ("out_dir", "overwrite", "resume", "task")  # the sweep's flags: a --set cannot vary them
SUMMARY = ("best_step", "val_loss", "val_ppl", "test_loss", "test_ppl", "test_accuracy", "test_macro_f1",
           "trainable", "peak_memory_mb", "seconds", "tokens_per_s")
SCORES = ("reward_mean", "judge_mean")
SIGNALS = {s.value: s.name for s in signal.Signals}


def parse_args(argv=None):
    """(the sweep's own flags, every other flag: passed to finetune.py as given)."""
    ap = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False,
                        epilog="Every other flag is passed to each finetune.py run (python finetune.py "
                               "--help lists them).")  # no abbreviations: --out must reach finetune.py
    ap.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2,...",
                    help="a finetune.py flag (no dashes) and its values, comma-separated, or semicolon-separated "
                         "when a value holds commas ('lora_targets=q,v;all'); true/false give --NAME/--no-NAME. "
                         f"Several --set: every combination (default: {DEFAULT_SET})")
    ap.add_argument("--out_dir", default="out-sweep", help="where results and runs go (default: out-sweep)")
    ap.add_argument("--task", default="instruction", choices=("instruction", "dialogue", "classify"),
                    help="finetune.py's --task, passed on; classify: rows ranked and plotted by test accuracy "
                         "(default: instruction)")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                    help="continue the sweep in out_dir: rows already done (status ok, same flags) are kept, the "
                         "rest (failed ones too) run; alone, it repeats the saved sweep (default: off)")
    ap.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                    help="replace a sweep already in out_dir (default: off)")
    return ap.parse_known_args(argv)


# -----------------------------------------------------------------------------------------------
# The grid


def grid(specs: list[str]) -> list[dict]:
    """Every combination of the --set values, in the order given (the last flag varies fastest)."""
    axes = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        if not eq or not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or not values.strip(" ,;"):
            raise ValueError(f"--set {spec!r}: expected NAME=V1,V2,... with NAME a finetune.py flag without dashes")
        if name in axes:
            raise ValueError(f"--set {name}: given twice; list all its values in one --set")
        if name in OWN:
            raise ValueError(f"--set {name}: the sweep's own flag, the same for every run")
        values = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
        axes[name] = list(dict.fromkeys(values))  # a value given twice runs once
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def check_finite_values(configs: list[dict], passed: list[str]):
    """NaN or +-inf given to any flag (in --set or passed on) is refused here, before anything is
    written, naming the flag: finetune.py refuses them too, but only after the sweep has begun."""
    given = [(f"--set {k}", v) for config in configs for k, v in config.items()]
    for i, arg in enumerate(passed):
        flag, eq, value = arg.partition("=")
        if eq:
            given.append((flag, value))
        elif arg.startswith("--") and i + 1 < len(passed):
            given.append((arg, passed[i + 1]))
    for flag, value in given:
        try:
            bad = not math.isfinite(float(value))
        except ValueError:  # not a number: finetune.py checks it
            bad = False
        if bad:
            raise ValueError(f"{flag}: expected a finite number, got {value}")


def run_name(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


def as_flags(config: dict) -> list[str]:
    # --k=v, not --k v: a value such as -1 would read as a flag
    bools = {"true": "--{}", "false": "--no-{}"}
    return [bools[v.lower()].format(k) if v.lower() in bools else f"--{k}={v}" for k, v in config.items()]


def dir_name(config: dict) -> str:
    return re.sub(r"[^\w.,=+-]", "_", run_name(config))  # a path in a value (init_from=a/b) is one folder


# -----------------------------------------------------------------------------------------------
# One run: finetune.py in a fresh process, its summary (or the reason it failed) as a row


def failure_reason(returncode: int, stderr: str) -> str:
    """What stopped a run: the kernel's OOM killer leaves no message, only the signal; otherwise the
    `error: ...` line of run_main, else the last line (a traceback's exception, argparse's complaint)."""
    if returncode == -9:  # SIGKILL: what the kernel's OOM killer sends
        return "out of memory (killed by SIGKILL)"
    if returncode < 0:
        return f"killed by {SIGNALS.get(-returncode, f'signal {-returncode}')}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit status {returncode}"])[-1][:300]


def collect(run_dir: Path) -> dict:
    """The row's numbers from summary.json, its lora_rank from the run's config.json (0 = full), and
    the last evaluation's reward/judge means from log.jsonl when the run was scored."""
    s = json.loads((run_dir / "summary.json").read_text())
    row = {k: s[k] for k in SUMMARY if k in s}
    row["lora_rank"] = json.loads((run_dir / "config.json").read_text())["lora_rank"]
    evals = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    row.update({k: evals[-1][k] for k in SCORES if evals and k in evals[-1]})
    return row


def run_one(config: dict, flags: list[str], runs: Path) -> dict:
    run_dir = runs / dir_name(config)
    cmd = [sys.executable, str(FINETUNE), *flags, "--out_dir", str(run_dir), "--overwrite"]
    row = dict(name=run_name(config), config=config, flags=flags)
    # the console output goes beside the run dir: finetune.py --overwrite empties the run dir itself
    with open(runs / f"{dir_name(config)}.log", "w") as log:
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # so that `tail -f` on the log follows the run
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
        log.write(p.stderr)
    if p.returncode != 0:
        return dict(row, status="failed", reason=failure_reason(p.returncode, p.stderr))
    try:  # a row of NaNs is no result: the run is listed as failed, with the metrics that were not numbers
        figures = finite_figures(f"{run_dir / 'summary.json'}", collect(run_dir))
    except ValueError as e:
        return dict(row, status="failed", reason=str(e))
    return dict(row, status="ok", **figures)


# -----------------------------------------------------------------------------------------------
# The results: table, plot


def best_row(rows: list[dict], classify: bool) -> dict | None:
    metric = "test_accuracy" if classify else "val_loss"
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None and not math.isnan(r[metric])]
    return min(ok, key=lambda r: -r[metric] if classify else r[metric], default=None)


FORMATS = dict(best_step="{:,d}", trainable="{:,d}", val_ppl="{:.4g}", test_ppl="{:.4g}", peak_memory_mb="{:,.0f}",
               seconds="{:.1f}", tokens_per_s="{:,.0f}")  # the rest: {:.4f}


def _cell(row: dict, key: str) -> str:
    return "" if row.get(key) is None else FORMATS.get(key, "{:.4f}").format(row[key])


def results_table(rows: list[dict], classify: bool, flags: list[str]) -> str:
    tests = ["test_accuracy", "test_macro_f1"] if classify else ["test_loss", "test_ppl"]
    cols = (["best_step", "val_loss", "val_ppl"] + tests + [k for k in SCORES if any(k in r for r in rows)]
            + ["trainable", "peak_memory_mb", "seconds", "tokens_per_s"])
    best = best_row(rows, classify)
    heads = [k.replace("_mb", " (MB)").replace("_per_s", "/s").replace("_", " ") for k in cols]
    legend = (f"★ = {'highest test accuracy' if classify else 'lowest val loss'}; lora_rank=0 is full fine-tuning; "
              "peak memory: CUDA max allocated, or the process's peak RSS on a CPU")
    md = [f"# Sweep: finetune.py {' '.join(flags)}\n", legend + "\n",
          "| | run | " + " | ".join(heads) + " | status |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        status = "ok" if r["status"] == "ok" else "failed: " + r["reason"].replace("|", "\\|")
        md.append(f"| {'★' if r is best else ''} | {r['name']} | "
                  + " | ".join(_cell(r, k) for k in cols) + f" | {status} |")
    return "\n".join(md) + "\n"


def plot(rows: list[dict], path: Path, classify: bool) -> int:
    """Quality and peak memory against trainable parameters (log x); full fine-tuning as a star.
    Returns the number of points per panel (one per ok row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "test_accuracy" if classify else "val_loss"
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None]
    if not ok:
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((metric, "test accuracy" if classify else "best val loss"), ("peak_memory_mb", "peak memory (MB)"))
    for ax, (key, label) in zip(axes, panels):
        for full, style in ((False, dict(marker="o", s=40, color="C0", label="LoRA")),
                            (True, dict(marker="*", s=200, color="C3", label="full fine-tuning"))):
            pts = [r for r in ok if (r.get("lora_rank") == 0) == full]
            if pts:
                ax.scatter([r["trainable"] for r in pts], [r[key] for r in pts], **style)
        for r in ok:
            ax.annotate(r["name"], (r["trainable"], r[key]), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=label)
        ax.margins(0.15)  # room for the names
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return len(ok)


def report(rows: list[dict], out: Path, classify: bool, shared: list[str]):
    write_jsonl(out / "results.jsonl", rows)
    table = results_table(rows, classify, shared)
    atomic_write(out / "results.md", lambda p: Path(p).write_text(table))
    n = plot(rows, out / "results.png", classify)
    print(f"\n{table}\nwritten: {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'results.png'} ({n} points)")


# -----------------------------------------------------------------------------------------------
# The sweep


def main(argv=None) -> list[dict]:
    args, passed = parse_args(argv)
    out = Path(args.out_dir)
    saved = out / "config.json"
    if args.resume and not saved.exists():
        raise ValueError(f"--resume: {out} holds no sweep to continue (no {saved.name})")
    if args.resume and not args.set and not passed:  # `--resume --out_dir D` alone: the saved sweep
        saved_sweep = json.loads(saved.read_text())
        args.set = saved_sweep["set"]
        passed = saved_sweep["flags"]
        args.task = saved_sweep["task"]
    if not args.set:
        args.set = [DEFAULT_SET]
        print(f"no --set: the default sweep {DEFAULT_SET} (full fine-tuning against LoRA ranks 2 and 8), on "
              f"finetune.py's defaults unless flags say otherwise")
    configs = grid(args.set)
    shared = ["--task", args.task, *passed]
    check_finite_values(configs, passed)  # before anything is written: finetune.py would refuse each run
    open_run(out, resume=args.resume, overwrite=args.overwrite)  # the lock; refuses to mix two sweeps
    results = out / "results.jsonl"
    before = [json.loads(x) for x in results.read_text().splitlines()] if args.resume and results.exists() else []
    ok_before = {json.dumps(r["flags"]): r for r in before if r["status"] == "ok"}  # failed rows run again
    atomic_write(saved, lambda p: Path(p).write_text(json.dumps(dict(set=args.set, flags=passed, task=args.task))))
    (out / "runs").mkdir(exist_ok=True)
    keys = [json.dumps(shared + as_flags(config)) for config in configs]
    done = {k: ok_before[k] for k in keys if k in ok_before}  # in every write below: a second kill loses none of them
    for i, (config, key) in enumerate(zip(configs, keys), 1):
        head = f"[{i}/{len(configs)}] {run_name(config)}"
        if key in done:
            print(f"{head}: done before, kept")
            continue
        print(f"{head}: running (progress: {out / 'runs' / dir_name(config)}.log)", flush=True)
        row = run_one(config, json.loads(key), out / "runs")
        done[key] = row
        if row["status"] == "ok":
            print(f"{head}: val loss {row.get('val_loss', math.nan):.4f}, {row['trainable']:,d} trainable, "
                  f"{row['seconds']:.0f} s", flush=True)
        else:
            print(f"{head}: failed: {row['reason']}", flush=True)
        write_jsonl(results, [done[k] for k in keys if k in done])
    rows = [done[k] for k in keys]
    report(rows, out, args.task == "classify", shared)
    if not any(r["status"] == "ok" for r in rows):
        raise ValueError(f"every configuration failed; the first: {rows[0]['reason']}")
    return rows


if __name__ == "__main__":
    run_main(main)
