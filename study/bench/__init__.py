"""`make bench` / `study bench`: how fast the study's stages run on the bundled model, and how close to what
the machine can do, written to results/bench/.

    study bench [--only roofline,bf16,train,kl,regression,persona,compare] [--protocol protocols/default.yaml]
                [--steps 6] [--lm-eval-limit 20] [--items 16] [--run results/default] [--adapters N]
                [--skip-plain] [--quick]

Parts (`--only`, default all, run in this order):

roofline    -> roofline.json / roofline.md. The best forward tokens/s of the model over batch x length, fp32
            and bf16 autocast, prefill (teacher-forced) and decode (KV-cached generation) apart
            (study.bench.roofline); then generation, teacher-forced scoring, newtask, KL, lm-eval and persona
            run at bench size (`--items`, `--lm-eval-limit`) in both modes with the tokens they push through
            the model counted, each as a fraction of the matching roofline; training from train.json.
bf16        -> bf16.json / bf16.md. The same stage runs compared, fp32 against bf16: the largest difference
            per stage and a verdict against stated tolerances (study.bench.bf16); it decides
            study.pipeline.BF16_STAGES. roofline and bf16 share one set of stage runs.

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
from pathlib import Path

from study import io
from study.bench.common import BENCH, environment
from study.config import load_protocol
from study.paths import RunPaths

PARTS = ("roofline", "bf16", "train", "kl", "regression", "persona", "compare")


def parse_parts(text: str) -> list[str]:
    """`train,kl` -> the known parts named, in PARTS order."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(names - set(PARTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {unknown or repr(text)}: choose from {','.join(PARTS)}"
        )
    return [p for p in PARTS if p in names]


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="study bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only",
        type=parse_parts,
        default=list(PARTS),
        help=f"comma-separated parts to run (default {','.join(PARTS)})",
    )
    ap.add_argument("--protocol", type=Path, default=Path("protocols/default.yaml"))
    ap.add_argument("--steps", type=_positive, default=6, help="train: optimizer steps per method")
    ap.add_argument(
        "--lm-eval-limit",
        type=_positive,
        default=20,
        help="regression (and compare with --quick): items per suite, HumanEval a quarter",
    )
    ap.add_argument(
        "--items",
        type=_positive,
        default=16,
        help="roofline, bf16: new-task items (KL prompts and general passages: half of it)",
    )
    ap.add_argument(
        "--run",
        type=Path,
        default=None,
        help="compare: the run folder (default: the protocol's, e.g. results/default)",
    )
    ap.add_argument(
        "--adapters",
        type=_positive,
        default=None,
        help="compare: the first N adapters in cell-name order (default all)",
    )
    ap.add_argument("--skip-plain", action="store_true", help="compare: time the harness only")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="compare: the --lm-eval-limit limits instead of the protocol's (smoke check)",
    )
    ap.add_argument("--harness-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.harness_worker:
        from study.bench.compare import harness_worker

        harness_worker(a.harness_worker)
        return
    if "train" in a.only:  # first: the roofline part reads train.json
        from study.bench.train import bench_training

        io.write_json(BENCH / "train.json", bench_training(a.protocol, a.steps))
        print(f"wrote {BENCH / 'train.json'}")
    if {"roofline", "bf16"} & set(a.only):
        from study.bench.run import run

        run(a.protocol, a.only, a.lm_eval_limit, a.items)
    if not set(a.only) & {"kl", "regression", "persona", "compare"}:
        return
    from study.bench.compare import bench_compare
    from study.bench.measure import bench_kl, bench_persona, bench_regression, fresh_adapter_model
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
            measure["regression"] = {
                "env": env,
                "protocol": str(a.protocol),
                **bench_regression(proto, model, tok, a.lm_eval_limit),
            }
            io.write_json(path, measure)
        del model
    if "persona" in a.only:
        run_root = a.run or RunPaths.for_protocol(a.protocol, proto.results_dir).root
        measure["persona"] = {
            "env": environment(runtime),
            "protocol": str(a.protocol),
            **bench_persona(proto, runtime, run_root),
        }
        io.write_json(path, measure)
    if "compare" in a.only:
        run_root = a.run or RunPaths.for_protocol(a.protocol, proto.results_dir).root
        measure["harness_vs_plain"] = bench_compare(
            a.protocol, run_root, a.adapters, a.skip_plain, a.lm_eval_limit if a.quick else None
        )
        io.write_json(path, measure)
    print(f"wrote {path}")
