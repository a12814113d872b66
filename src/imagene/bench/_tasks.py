"""The tasks of the benchmark as objects: each defines its folds and its scoring; the runner does the rest.

A task says which folds it is scored on (:meth:`Task.folds`: a training mask and the test parts
scored on one fit), which ``obs`` columns methods never see, what each test part needs, and how
a fitted method is scored on a part (:meth:`Task.score`). The runner (:func:`imagene.bench.run`)
crosses tasks with methods and folds, and applies the same guards to all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._utils import warn
from imagene.bench._methods import FoldContext, Method
from imagene.metrics import ari, gene_pearson, mean_pearson, mse, nmi, recall_at_k

SPLITS = ("section", "patient", "spot")
#: Recall@k % cut-offs of the retrieval task
RECALL_PERCENTS = (5, 10, 15)


@dataclass(frozen=True)
class RunSpec:
    """The validated settings of one run, shared by its tasks (see :func:`imagene.bench.run`)."""

    library_key: str
    split: str
    patient_key: str
    label_key: str
    ignore_labels: tuple[str, ...]
    n_spot_folds: int
    test_sections: Sequence[str] | None
    clustering_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fold:
    """One fit: the training spots and the test parts scored on it (each part is its own result fold)."""

    name: str
    train: np.ndarray
    parts: list[tuple[str, np.ndarray]]


@dataclass
class TestPart:
    """One scored test part of a fold, as the tasks see it."""

    name: str
    mask: np.ndarray
    blind: AnnData  # held-out spots without expression (image features only)
    full: AnnData  # the same spots with their counts (gene side of retrieval, clustering)
    y: np.ndarray  # measured log1p CP10k on the fold's training genes
    truth: np.ndarray | None = None  # reference labels of the kept spots (clustering)
    keep: np.ndarray | None = None  # spots whose label is scored (clustering)
    n_clusters: int | None = None


class Task:
    """A benchmark task: its folds and its scoring.

    Attributes
    ----------
    name
        Name of the task in the results.
    fold_kind
        Tasks of the same kind share their folds, so one fit of each method serves them all.
    default_seeds
        Seeds when the run passes none.
    hide_labels_in_training
        Whether the reference labels (``RunSpec.label_key``) are hidden from the training spots too
        (they are always hidden from the test spots).
    disjoint
        Whether training and test spots are disjoint (then a method fitted on a test spot is an error).
    """

    name: str = ""
    fold_kind: str = ""
    default_seeds: tuple[int, ...] = (0,)
    hide_labels_in_training: bool = False
    disjoint: bool = True

    def check(self, adata: AnnData, spec: RunSpec) -> None:
        """Refuse settings the task cannot be scored with (before any data is copied)."""

    def folds(self, adata: AnnData, spec: RunSpec, seed: int) -> list[Fold]:
        """The folds of the task."""
        raise NotImplementedError

    def part(self, adata: AnnData, mask: np.ndarray, spec: RunSpec, part: TestPart) -> TestPart:
        """Add what the task's scoring needs to a test part (labels, number of classes)."""
        return part

    def score(self, method: Method, ctx: FoldContext, part: TestPart, spec: RunSpec) -> list[tuple[str, str, float]]:
        """``(result name, metric, value)`` rows of a fitted method on a test part."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ------------------------------------------------------------------------------------------
# supervised folds: leave one section / patient out, k-fold over the spots of one section, a fixed test set
# ------------------------------------------------------------------------------------------
def check_split(adata: AnnData, split: str, library_key: str) -> None:
    """``split`` is known, and ``'spot'`` is asked for one section only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}.")
    if split == "spot":
        names = list(pd.Categorical(adata.obs[library_key].astype(str)).categories)
        if len(names) > 1:
            raise ValueError(
                f"split='spot' on {len(names)} sections {names} would put neighbouring spots of one section on both "
                "sides of the split (they share tissue and signal), which inflates every score. Use split='section' "
                "(leave one section out) or split='patient' (leave one patient out)."
            )


def split_folds(
    adata: AnnData, *, split: str, library_key: str, patient_key: str, n_spot_folds: int, seed: int
) -> list[tuple[str, np.ndarray]]:
    """``(fold name, boolean test mask)`` for every fold of ``split`` (checked by :func:`check_split`)."""
    check_split(adata, split, library_key)
    sections = adata.obs[library_key].astype(str).to_numpy()
    names = list(dict.fromkeys(pd.Categorical(sections).categories))
    if split == "spot":
        warn(
            "split='spot' on a single section: spots of the test folds neighbour training spots, so scores are "
            "optimistic. Prefer several sections and split='section'."
        )
        from sklearn.model_selection import KFold

        kf = KFold(n_splits=n_spot_folds, shuffle=True, random_state=seed)
        out = []
        for i, (_, test_idx) in enumerate(kf.split(np.arange(adata.n_obs))):
            mask = np.zeros(adata.n_obs, bool)
            mask[test_idx] = True
            out.append((f"spots{i}", mask))
        return out
    if split == "section":
        if len(names) < 2:
            raise ValueError(
                f"Leave-one-section-out needs at least 2 sections in adata.obs[{library_key!r}]; got {names}. "
                "Add sections, or pass split='spot' for a (optimistic) spot-level split of a single section."
            )
        return [(s, sections == s) for s in names]
    if patient_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{patient_key!r}] not found; split='patient' needs the patient of each spot. Add that column "
            "or pass `patient_key=`."
        )
    patients = adata.obs[patient_key].astype(str).to_numpy()
    per_section = pd.Series(patients).groupby(sections).nunique()
    if (per_section > 1).any():
        raise ValueError(
            f"Sections {per_section[per_section > 1].index.tolist()} have spots of several patients in "
            f"adata.obs[{patient_key!r}]; each section must belong to one patient."
        )
    pnames = list(dict.fromkeys(pd.Categorical(patients).categories))
    if len(pnames) < 2:
        raise ValueError(f"Leave-one-patient-out needs at least 2 patients; got {pnames}. Use split='section'.")
    return [(f"patient {p}", patients == p) for p in pnames]


def fixed_test_folds(adata: AnnData, *, library_key: str, split: str, test_sections: Sequence[str]) -> list[Fold]:
    """One fit on every section not in ``test_sections``, scored on each test section in turn."""
    if split != "section":
        raise ValueError(
            f"test_sections fixes the held-out sections, so it replaces split={split!r}; pass split='section' "
            "(the default) with test_sections, or drop test_sections to leave one patient out."
        )
    tests = [test_sections] if isinstance(test_sections, str) else [str(s) for s in test_sections]
    sections = adata.obs[library_key].astype(str).to_numpy()
    names = list(pd.Categorical(sections).categories)
    unknown = [s for s in tests if s not in names]
    if not tests or unknown or len(set(tests)) != len(tests):
        raise ValueError(
            f"test_sections must name distinct sections of adata.obs[{library_key!r}] ({names}); got {tests}."
        )
    train = ~np.isin(sections, tests)
    if not train.any():
        raise ValueError(f"test_sections {tests} leaves no training section; keep at least one section out of it.")
    return [Fold("test " + "+".join(tests), train, [(s, sections == s) for s in tests])]


class _HeldOut(Task):
    """Tasks scored on held-out spots: the folds of ``split`` (or the fixed test set), fitted on the other spots."""

    fold_kind = "held_out"

    def folds(self, adata: AnnData, spec: RunSpec, seed: int) -> list[Fold]:
        if spec.test_sections is not None:
            return fixed_test_folds(
                adata, library_key=spec.library_key, split=spec.split, test_sections=spec.test_sections
            )
        parts = split_folds(
            adata, split=spec.split, library_key=spec.library_key, patient_key=spec.patient_key,
            n_spot_folds=spec.n_spot_folds, seed=seed,
        )
        return [Fold(name, ~mask, [(name, mask)]) for name, mask in parts]


class ExpressionTask(_HeldOut):
    """Expression of held-out spots from their image features.

    Metrics ``pcc_<set>`` (:func:`imagene.metrics.mean_pearson`: mean per-gene Pearson r over
    defined genes), ``mse_<set>`` and ``undefined_<set>`` (genes whose r is undefined) for the
    fold's HVG and HEG sets. A method may return several predictions of one fit as
    ``{key: array}``, scored as ``'name[key]'``.
    """

    name = "expression"

    def score(self, method, ctx, part, spec):  # noqa: ARG002
        out = method.predict_expression(part.blind.copy())
        preds = {f"{method.name}[{k}]": v for k, v in out.items()} if isinstance(out, dict) else {method.name: out}
        rows = []
        for name, pred in preds.items():
            pred = np.asarray(pred, dtype=np.float64)
            if pred.shape != part.y.shape:
                raise ValueError(
                    f"Method {name!r} returned predictions of shape {pred.shape}; expected {part.y.shape} "
                    "(held-out spots x ctx.genes, in that order)."
                )
            if not np.isfinite(pred).all():
                raise ValueError(f"Method {name!r} returned NaN or inf predictions.")
            rows += [(name, m, v) for m, v in expression_rows(part.y, pred, ctx)]
        return rows


def expression_rows(y_true: np.ndarray, pred: np.ndarray, ctx: FoldContext) -> list[tuple[str, float]]:
    """``(metric, value)`` of a prediction on the fold's HVG and HEG sets."""
    rows = []
    for set_name, idx in ((f"hvg{len(ctx.hvg)}", ctx.hvg), (f"heg{len(ctx.heg)}", ctx.heg)):
        t, p = y_true[:, idx], pred[:, idx]
        rows.append((f"pcc_{set_name}", mean_pearson(t, p)))
        rows.append((f"mse_{set_name}", mse(t, p)))
        rows.append((f"undefined_{set_name}", float((~np.isfinite(gene_pearson(t, p))).sum())))
    return rows


class RetrievalTask(_HeldOut):
    """Image ↔ gene retrieval among a fold's held-out spots: ``recall{5,10,15}_i2g`` / ``_g2i`` and their mean."""

    name = "retrieval"

    def score(self, method, ctx, part, spec):  # noqa: ARG002
        zi = np.asarray(method.embed(part.blind.copy(), "image"))
        zg = np.asarray(method.embed(part.full.copy(), "gene"))
        rows = []
        for k in RECALL_PERCENTS:
            i2g = recall_at_k(zi, zg, k_percent=k)
            g2i = recall_at_k(zg, zi, k_percent=k)
            rows += [(f"recall{k}_i2g", i2g), (f"recall{k}_g2i", g2i), (f"recall{k}", 0.5 * (i2g + g2i))]
        return [(method.name, m, v) for m, v in rows]


class ClusteringTask(Task):
    """Unsupervised clustering of each labelled section against its reference labels (leiden and k-means).

    Each section with at least 2 reference classes is its own fold: methods are fitted on its
    spots WITHOUT the labels and their embeddings clustered into as many clusters as classes;
    ``ari_leiden``, ``nmi_leiden``, ``ari_kmeans``, ``nmi_kmeans`` on spots whose label is kept.
    """

    name = "clustering"
    fold_kind = "labelled_sections"
    default_seeds = (0, 1, 2)
    hide_labels_in_training = True
    disjoint = False

    def check(self, adata, spec):
        if spec.test_sections is not None:
            raise ValueError(
                "test_sections applies to the expression and retrieval tasks; the clustering task is unsupervised and "
                "scores each labelled section on its own. Drop test_sections for clustering."
            )

    def folds(self, adata, spec, seed):  # noqa: ARG002
        label_key, ignore = spec.label_key, list(spec.ignore_labels)
        if label_key not in adata.obs:
            raise KeyError(
                f"adata.obs[{label_key!r}] not found: the clustering task scores clusters against reference labels "
                "(e.g. pathologist regions). Add them, or pass the obs column as `label_key=`."
            )
        sections = adata.obs[spec.library_key].astype(str)
        labels = adata.obs[label_key]
        usable = labels.notna() & ~labels.astype(str).isin(ignore)
        out = []
        for s in pd.Categorical(sections).categories:
            mask = (sections == s).to_numpy()
            if labels[mask & usable.to_numpy()].astype(str).nunique() >= 2:
                out.append(Fold(str(s), mask, [(str(s), mask)]))
        if not out:
            raise ValueError(
                f"No section has at least 2 reference classes in adata.obs[{label_key!r}] (ignoring {ignore}); "
                "the clustering task needs labelled sections."
            )
        return out

    def part(self, adata, mask, spec, part):
        truth = adata.obs[spec.label_key][mask]
        keep = truth.notna().to_numpy() & ~truth.astype(str).isin(list(spec.ignore_labels)).to_numpy()
        part.keep = keep
        part.truth = truth.astype(str).to_numpy()[keep]
        part.n_clusters = int(truth[keep].astype(str).nunique())
        return part

    def score(self, method, ctx, part, spec):
        rows = []
        modalities = method.clustering_modalities
        for modality in modalities:
            name = method.name if len(modalities) == 1 else f"{method.name}[{modality}]"
            z = np.asarray(method.embed(part.full.copy(), modality))
            for algo, fn in (("leiden", leiden), ("kmeans", kmeans)):
                pred = np.asarray(fn(z, ctx.n_clusters, ctx.seed, **spec.clustering_kwargs))[part.keep]
                rows += [(name, f"ari_{algo}", ari(part.truth, pred)), (name, f"nmi_{algo}", nmi(part.truth, pred))]
        return rows


def leiden(z: np.ndarray, n_clusters: int, seed: int, n_neighbors: int = 15, method: str = "umap") -> np.ndarray:
    """Leiden on scanpy's kNN graph of ``z``; resolution bisected to give ``n_clusters`` clusters (else the closest)."""
    import scanpy as sc

    a = AnnData(X=np.asarray(z, dtype=np.float32))
    k = int(min(n_neighbors, a.n_obs - 1))
    sc.pp.neighbors(a, use_rep="X", n_neighbors=k, method=method, random_state=seed)
    lo, hi = 0.01, 5.0
    best, best_gap = None, math.inf
    for _ in range(30):
        res = 0.5 * (lo + hi)
        sc.tl.leiden(a, resolution=res, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        labels = a.obs["leiden"].astype(str).to_numpy()
        m = len(set(labels))
        if abs(m - n_clusters) < best_gap:
            best, best_gap = labels, abs(m - n_clusters)
        if m == n_clusters:
            break
        lo, hi = (res, hi) if m < n_clusters else (lo, res)
    return best


def kmeans(z: np.ndarray, n_clusters: int, seed: int, **_: Any) -> np.ndarray:
    """k-means (10 initialisations) of ``z`` into ``n_clusters`` clusters."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(np.asarray(z, dtype=np.float64))


class ZeroShotGenesTask(Task):
    """Expression of genes never seen in training (the ALIGN-ST protocol), on leave-one-section-out folds.

    Per fold, on the TRAINING sections only, the ``n_unseen`` most expressed genes (mean
    ``log1p`` CP10k, among genes with a description) are held out as unseen and the next
    ``n_seen`` are the seen genes (:meth:`choose_genes`); scores on the held-out section's unseen
    genes (:meth:`scores`): PCC@M (:func:`imagene.metrics.mean_pearson`), PCC@H (mean of the
    ``n_top`` best-predicted genes) and MSE. :func:`imagene.bench.zero_shot` runs it.
    """

    name = "zero_shot_genes"
    fold_kind = "held_out"

    def __init__(self, n_unseen: int = 250, n_seen: int = 256, n_top: int = 50) -> None:
        self.n_unseen, self.n_seen, self.n_top = int(n_unseen), int(n_seen), int(n_top)

    def folds(self, adata, spec, seed):
        parts = split_folds(adata, split="section", library_key=spec.library_key, patient_key=spec.patient_key,
                            n_spot_folds=spec.n_spot_folds, seed=seed)
        if spec.test_sections is not None:  # each of these sections is left out in turn
            names = [f for f, _ in parts]
            missing = set(spec.test_sections) - set(names)
            if missing:
                raise ValueError(
                    f"test_sections {sorted(missing)} not in adata.obs[{spec.library_key!r}] ({names})."
                )
            parts = [(f, m) for f, m in parts if f in set(spec.test_sections)]
        return [Fold(name, ~mask, [(name, mask)]) for name, mask in parts]

    def choose_genes(self, y_train: np.ndarray, has_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the unseen and the seen genes, chosen on the training spots' expression."""
        from imagene.metrics import top_expressed_genes

        cand = np.flatnonzero(has_text)
        order = cand[top_expressed_genes(y_train[:, cand], n=self.n_unseen + self.n_seen)]
        return order[: self.n_unseen], order[self.n_unseen :]

    def scores(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        """PCC@M, PCC@H, MSE, the number of genes and of genes with an undefined r."""
        r = gene_pearson(y, pred)
        ok = np.sort(r[np.isfinite(r)])[::-1]
        return {
            "pcc_m": mean_pearson(y, pred),
            "pcc_h": float(ok[: self.n_top].mean()) if ok.size else float("nan"),
            "mse": mse(y, pred),
            "n_genes": int(y.shape[1]),
            "n_undefined": int((~np.isfinite(r)).sum()),
        }


#: the tasks of :func:`imagene.bench.run`, by name
TASK_TYPES: dict[str, type[Task]] = {"expression": ExpressionTask, "retrieval": RetrievalTask,
                                     "clustering": ClusteringTask}
