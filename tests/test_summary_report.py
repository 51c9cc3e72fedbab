"""results/summary/ (wsiomics.summary): pooled metrics with a seeded patient-level bootstrap CI, checked against
computations by hand; paired comparisons; groups; the Markdown table; methods of all three tasks."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from wsiomics.summary import METRIC_COLUMNS, SummaryParams, main, summarize
from wsiomics.train.evaluate import (
    classification_metrics,
    retrieval_metrics,
    segmentation_metrics,
    weighted_classification_metrics,
)

CLASSES = ["A", "B"]


def _fold(root, method, fold, metrics):
    d = root / method / f"fold{fold}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"method": method, "fold": fold, **metrics}))
    return d


def write_classify(root, method, fold, rows, classes=CLASSES, **extra):
    """rows: (patient_id, label, probabilities); metrics.json as the classify task writes it."""
    table = pd.DataFrame([{"patient_id": p, "fold": fold, "role": "test", "label": y,
                           "predicted": classes[int(np.argmax(pr))],
                           **{f"prob_{c}": v for c, v in zip(classes, pr, strict=True)}} for p, y, pr in rows])
    found = classification_metrics(table["label"].tolist(), table[[f"prob_{c}" for c in classes]].to_numpy(), classes)
    d = _fold(root, method, fold, {**found, "classes": classes, **extra})
    table.to_csv(d / "predictions.tsv", sep="\t", index=False)
    return str(d / "metrics.json")


def write_survival(root, method, fold, rows):
    """rows: (patient_id, risk, time, event)."""
    d = _fold(root, method, fold, {"c_index": 0.5})
    pd.DataFrame([{"patient_id": p, "role": "test", "risk": r, "time": t, "event": e} for p, r, t, e in rows]
                 + [{"patient_id": "trainee", "role": "train", "risk": 9.0, "time": 1.0, "event": 1}]
                 ).to_csv(d / "risks.tsv", sep="\t", index=False)
    return str(d / "metrics.json")


def write_segment(root, method, fold, slides):
    """slides: slide_id -> (patient_id, predicted mask, true mask); metrics.json as the segment task writes it."""
    found = segmentation_metrics({s: (np.asarray(p, float), np.asarray(t, float)) for s, (_, p, t) in slides.items()})
    d = _fold(root, method, fold, {**found, "slide_patients": {s: v[0] for s, v in slides.items()}})
    return str(d / "metrics.json")


def hand_draws(strata_of_sorted_patients, b, seed):
    """The documented resampling, by hand: default_rng(seed), then per stratum (sorted) integers(0, n, (B, n))."""
    rng = np.random.default_rng(seed)
    labels = np.array(strata_of_sorted_patients, dtype=object)
    parts = []
    for s in sorted(set(strata_of_sorted_patients)):
        members = np.flatnonzero(labels == s)
        parts.append(members[rng.integers(0, len(members), size=(b, len(members)))])
    return np.concatenate(parts, axis=1)


def row(table, method, metric):
    return table[(table["method"] == method) & (table["metric"] == metric)].iloc[0]


# 8 test patients over two folds: two wrong (p3, p6), AUC below 1
FOLDS = {0: [("p1", "A", (0.9, 0.1)), ("p2", "A", (0.7, 0.3)), ("p3", "B", (0.6, 0.4)), ("p4", "B", (0.2, 0.8))],
         1: [("p5", "A", (0.8, 0.2)), ("p6", "A", (0.45, 0.55)), ("p7", "B", (0.3, 0.7)), ("p8", "B", (0.1, 0.9))]}


def test_pooled_classification_ci_equals_a_hand_computation(tmp_path):
    paths = [write_classify(tmp_path, "linear", k, rows) for k, rows in FOLDS.items()]
    b, seed = 400, 7
    table, _, _ = summarize(paths, SummaryParams(bootstrap=b, seed=seed))
    everyone = sorted((p for rows in FOLDS.values() for p in rows), key=lambda r: r[0])  # patients sorted by id
    y = np.array([CLASSES.index(lab) for _, lab, _ in everyone])
    score = np.array([pr[1] for _, _, pr in everyone])
    pred = (score > 0.5).astype(int)
    # pooled by hand: 6 of 8 right; per class 3/4 and 3/4
    assert row(table, "linear", "accuracy")["pooled"] == pytest.approx(6 / 8)
    assert row(table, "linear", "balanced_accuracy")["pooled"] == pytest.approx(0.75)
    assert row(table, "linear", "auc_macro")["pooled"] == pytest.approx(skm.roc_auc_score(y, score))
    assert row(table, "linear", "accuracy")["n_patients"] == 8
    draws = hand_draws([lab for _, lab, _ in everyone], b, seed)  # stratified by label
    acc = [(pred[d] == y[d]).mean() for d in draws]
    auc = [skm.roc_auc_score(y[d], score[d]) for d in draws]
    f1 = [skm.f1_score(y[d], pred[d], average="macro") for d in draws]
    for metric, values in (("accuracy", acc), ("auc_macro", auc), ("f1_macro", f1)):
        r = row(table, "linear", metric)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5]))), metric
    # mean and std over folds (population std, as results/models/summary.tsv)
    folds = [classification_metrics([lab for _, lab, _ in rows], np.array([pr for *_, pr in rows]), CLASSES)["f1_macro"]
             for rows in FOLDS.values()]
    assert row(table, "linear", "f1_macro")[["mean", "std"]].tolist() == pytest.approx([np.mean(folds), np.std(folds)])


def test_accuracy_ci_matches_the_exact_bootstrap_distribution(tmp_path):
    """Independent of the resampling code: resampled within labels, the number right is a sum of binomials."""
    right = {"A": (20, 16), "B": (20, 11)}  # (patients, right)
    rows = [(f"{lab}{i:02d}", lab, (0.9, 0.1) if (lab == "A") == (i < k) else (0.1, 0.9))
            for lab, (n, k) in right.items() for i in range(n)]
    table, _, _ = summarize([write_classify(tmp_path, "linear", 0, rows)], SummaryParams(bootstrap=20000, seed=1))
    pmf = np.convolve(stats.binom.pmf(np.arange(21), 20, 16 / 20), stats.binom.pmf(np.arange(21), 20, 11 / 20))
    cdf = np.cumsum(pmf)
    exact = (np.searchsorted(cdf, 0.025) / 40, np.searchsorted(cdf, 0.975) / 40)
    r = row(table, "linear", "accuracy")
    assert r["pooled"] == pytest.approx(27 / 40)
    assert r["ci_low"] == pytest.approx(exact[0], abs=1 / 40) and r["ci_high"] == pytest.approx(exact[1], abs=1 / 40)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_bootstrap_fast_path_equals_the_metrics_on_each_resample():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 1, 0, 2, 1])  # class d never a label: AUC over the present classes
    probs = rng.dirichlet(np.ones(4), size=len(y))
    probs[3] = probs[4]  # tied scores
    draws = rng.integers(0, len(y), size=(60, len(y)))
    weights = np.zeros((60, len(y)))
    np.add.at(weights, (np.arange(60)[:, None], draws), 1)
    fast = weighted_classification_metrics(y, probs, weights)
    for i, d in enumerate(draws):
        slow = classification_metrics([classes[v] for v in y[d]], probs[d], classes)
        for metric, values in fast.items():
            expected = np.nan if slow[metric] is None else slow[metric]
            assert values[i] == pytest.approx(expected, nan_ok=True), (metric, i)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_embedding_fast_paths_equal_the_statistic_on_each_resample():
    from wsiomics.train.tasks import get_task

    rng = np.random.default_rng(2)
    n = 9
    task = get_task("classify")
    retrieval = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "recall_i2g@1": rng.integers(0, 2, n),
                              "recall_g2i@5": rng.uniform(size=n)})
    probe = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "label": list("AAABBBCCC"),
                          "predicted": list("ABABBCCDA")})  # D: predicted, never a label
    draws = rng.integers(0, n, size=(40, n))
    weights = np.zeros((40, n))
    np.add.at(weights, (np.arange(40)[:, None], draws), 1)
    for kind, records in (("retrieval", retrieval), ("linear_probe", probe)):
        fast = task.bootstrap_statistic(kind, records, weights)
        for i, d in enumerate(draws):
            for metric, value in task.pooled_statistic(kind, records.iloc[d]).items():
                assert fast[metric][i] == pytest.approx(value), (kind, metric, i)


def test_survival_c_index_pools_pairs_within_folds_by_hand(tmp_path):
    folds = {0: [("s1", 2.0, 100, 1), ("s2", 1.0, 300, 1), ("s3", 0.5, 200, 0), ("s4", 1.5, 50, 1)],
             1: [("s5", 10.0, 80, 1), ("s6", 20.0, 400, 0), ("s7", 5.0, 150, 1)]}  # another scale: never compared
    paths = [write_survival(tmp_path, "coxph", k, rows) for k, rows in folds.items()]
    b, seed = 300, 3
    table, _, _ = summarize(paths, SummaryParams(bootstrap=b, seed=seed))

    def harrell(rows):  # (fold, risk, time, event): pairs of the same fold, the earlier one had the event
        conc = comp = 0.0
        for (fa, ra, ta, ea), (fb, rb, tb, eb) in combinations(rows, 2):
            if fa != fb:
                continue
            (r1, t1, e1), (r2, t2, _) = sorted([(ra, ta, ea), (rb, tb, eb)], key=lambda x: x[1])
            if t1 < t2 and e1:
                comp += 1
                conc += 1.0 if r1 > r2 else 0.5 if r1 == r2 else 0.0
        return conc / comp if comp else np.nan

    everyone = sorted(((p, k, r, t, e) for k, rows in folds.items() for p, r, t, e in rows))
    records = [x[1:] for x in everyone]  # (fold, risk, time, event), patients sorted
    r = row(table, "coxph", "c_index")
    assert r["pooled"] == pytest.approx(harrell(records))  # fold 0: 4 of 5 pairs; fold 1: 2 of 2 -> 6/7
    assert r["pooled"] == pytest.approx(5 / 8)  # fold 0: 4 of 5 pairs concordant; fold 1: 1 of 3
    assert harrell([(0, *x[1:]) for x in records]) != pytest.approx(5 / 8)  # pairs across folds would change it
    draws = np.random.default_rng(seed).integers(0, len(records), size=(b, len(records)))  # no strata
    values = np.array([harrell([records[j] for j in d]) for d in draws])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.percentile(values[np.isfinite(values)], [2.5, 97.5])))
    assert r["n_patients"] == 7
    # the other survival metrics: folds only
    assert row(table, "coxph", "c_index")["mean"] == pytest.approx(0.5)


def test_segmentation_pools_tiles_and_resamples_a_patients_slides_together(tmp_path):
    slides = {"s1": ("pa", [1, 1, 0, 0], [1, 0, 0, 0]), "s2": ("pa", [1, 1, 1, 1], [1, 1, 1, 0]),
              "s3": ("pb", [0, 0, 1, 0], [0, 1, 1, 0]), "s4": ("pc", [0, 0, 0, 0], [0, 0, 0, 1])}
    path = write_segment(tmp_path, "image_seg", 0, slides)
    b, seed = 200, 5
    table, _, _ = summarize([path], SummaryParams(bootstrap=b, seed=seed))
    dice = {s: 2 * np.sum(np.logical_and(p, t)) / (np.sum(p) + np.sum(t)) for s, (_, p, t) in slides.items()}
    inter = {s: np.sum(np.logical_and(p, t)) for s, (_, p, t) in slides.items()}
    size = {s: np.sum(p) + np.sum(t) for s, (_, p, t) in slides.items()}
    pooled = row(table, "image_seg", "dice_pooled")["pooled"]
    assert pooled == pytest.approx(2 * sum(inter.values()) / sum(size.values()))
    assert row(table, "image_seg", "dice_mean")["pooled"] == pytest.approx(np.mean(list(dice.values())))
    assert row(table, "image_seg", "dice_pooled")["n_patients"] == 3
    of = {"pa": ["s1", "s2"], "pb": ["s3"], "pc": ["s4"]}
    patients = sorted(of)
    means, pooled = [], []
    for d in np.random.default_rng(seed).integers(0, 3, size=(b, 3)):
        taken = [s for j in d for s in of[patients[j]]]
        means.append(np.mean([dice[s] for s in taken]))
        pooled.append(2 * sum(inter[s] for s in taken) / sum(size[s] for s in taken))
    for metric, values in (("dice_mean", means), ("dice_pooled", pooled)):
        r = row(table, "image_seg", metric)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5]))), metric


def test_retrieval_pools_each_querys_hits_without_reranking_across_folds(tmp_path):
    rng = np.random.default_rng(0)
    paths, fold_values = [], []
    for k, n in ((0, 4), (1, 6)):
        img = rng.normal(size=(n, 3))
        found = retrieval_metrics(img, img + rng.normal(scale=0.8, size=(n, 3)), patient_ids=[f"f{k}p{i}" for i in
                                                                                             range(n)])
        fold_values.append((n, found["recall_i2g@1"], found["recall_chance@1"]))
        rows = [(f"f{k}p{i}", CLASSES[i % 2], (0.6, 0.4)) for i in range(n)]
        paths.append(write_classify(tmp_path, "mgi", k, rows, pretrain=found))  # the evaluation under "pretrain"
    table, _, _ = summarize(paths, SummaryParams(bootstrap=50))
    n = sum(v[0] for v in fold_values)
    # recall is a mean over queries: pooled = the folds' recalls weighted by their queries
    assert row(table, "mgi", "recall_i2g@1")["pooled"] == pytest.approx(sum(m * r for m, r, _ in fold_values) / n)
    assert row(table, "mgi", "recall_chance@1")["pooled"] == pytest.approx(sum(m * c for m, _, c in fold_values) / n)
    assert row(table, "mgi", "recall_i2g@1")["n_patients"] == 10


def test_comparisons_are_paired_on_the_patients_both_have(tmp_path):
    # gimp right on p1..p6 but p3; linear wrong on p2 and p5; gimp_no_pretrain lacks p6
    labels = {"p1": "A", "p2": "A", "p3": "A", "p4": "B", "p5": "B", "p6": "B"}
    wrong = {"gimp": {"p3"}, "linear": {"p2", "p5"}, "gimp_no_pretrain": {"p1", "p4"}, "late_fusion": set()}
    worse = {"late_fusion": {"p1", "p2", "p4", "p5"}}  # the weaker baseline

    def prob(method, p):
        right = p not in wrong[method] and p not in worse.get(method, set())
        return (0.8, 0.2) if (labels[p] == "A") == right else (0.2, 0.8)

    paths = []
    for method in wrong:
        patients = [p for p in labels if not (method == "gimp_no_pretrain" and p == "p6")]
        paths.append(write_classify(tmp_path, method, 0, [(p, labels[p], prob(method, p)) for p in patients]))
    b, seed = 300, 11
    table, comparisons, text = summarize(paths, SummaryParams(bootstrap=b, seed=seed))
    assert set(comparisons.columns) >= {"method", "versus", "relation", "metric", "difference", "ci_low", "ci_high",
                                        "n_patients"}
    assert set(comparisons["method"]) == {"gimp"}  # only pretrained methods are compared
    acc = comparisons[comparisons["metric"] == "accuracy"].set_index("relation")
    assert acc.loc["ablation", "versus"] == "gimp_no_pretrain"
    assert acc.loc["best_baseline", "versus"] == "linear"  # 4/6 beats late_fusion's 2/6
    # ablation: on p1..p5 only; gimp 4/5 right, gimp_no_pretrain 3/5
    assert acc.loc["ablation", "n_patients"] == 5
    assert acc.loc["ablation", "difference"] == pytest.approx(4 / 5 - 3 / 5)
    common = ["p1", "p2", "p3", "p4", "p5"]
    right_a = np.array([p not in wrong["gimp"] for p in common], float)
    right_b = np.array([p not in wrong["gimp_no_pretrain"] for p in common], float)
    draws = hand_draws([labels[p] for p in common], b, seed)  # the same resamples for both methods
    diff = [right_a[d].mean() - right_b[d].mean() for d in draws]
    assert (acc.loc["ablation", "ci_low"], acc.loc["ablation", "ci_high"]) == pytest.approx(
        tuple(np.percentile(diff, [2.5, 97.5])))
    assert acc.loc["best_baseline", "n_patients"] == 6
    assert acc.loc["best_baseline", "difference"] == pytest.approx(5 / 6 - 4 / 6)
    assert "## Paired comparisons" in text


def test_groups_markdown_and_all_three_tasks_through_the_command_line(tmp_path):
    paths = []
    for method in ("gimp", "linear", "mgi", "mgi_no_pretrain"):
        for k, rows in FOLDS.items():
            probe = {"patient_id": [p for p, *_ in rows], "label": [lab for _, lab, _ in rows],
                     "predicted": ["A"] * len(rows)}
            paths.append(write_classify(tmp_path, method, k, rows, pretrain={"linear_probe_per_patient": probe},
                                        linear_probe_balanced_accuracy=0.5))
    paths.append(write_segment(tmp_path, "mgi_seg", 0, {"s1": ("p1", [1, 0], [1, 1]), "s2": ("p2", [0, 1], [0, 1])}))
    paths.append(write_segment(tmp_path, "image_seg", 0, {"s1": ("p1", [1, 1], [1, 1]), "s2": ("p2", [0, 1], [0, 1])}))
    paths.append(write_survival(tmp_path, "coxph", 0, [("p1", 1.0, 10, 1), ("p2", 0.0, 20, 1), ("p3", 2.0, 5, 0)]))
    out = tmp_path / "summary"
    assert main(["--out-dir", str(out), "--bootstrap", "50", *paths]) == 0
    table = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(table.columns) == METRIC_COLUMNS
    groups = table.drop_duplicates("method").set_index("method")["group"]
    assert groups.to_dict() == {"linear": "baselines", "gimp": "GiMP", "mgi": "MGI", "mgi_no_pretrain": "MGI",
                                "mgi_seg": "segmentation", "image_seg": "segmentation", "coxph": "survival"}
    assert list(groups.index) == ["linear", "gimp", "mgi", "mgi_no_pretrain", "mgi_seg", "image_seg", "coxph"]
    # the linear probe pooled from each test patient's probe prediction: always "A", half right -> 0.5
    assert row(table, "mgi", "linear_probe_balanced_accuracy")["pooled"] == pytest.approx(0.5)
    comparisons = pd.read_csv(out / "comparisons.tsv", sep="\t")
    pairs = set(zip(comparisons["method"], comparisons["versus"], comparisons["relation"], strict=True))
    assert pairs == {("gimp", "linear", "best_baseline"), ("mgi", "mgi_no_pretrain", "ablation"),
                     ("mgi", "linear", "best_baseline"), ("mgi_seg", "image_seg", "best_baseline")}
    text = (out / "metrics.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Classification", "## Segmentation", "## Survival", "## Paired comparisons"]
    lines = text.splitlines()
    header = lines.index("## Classification") + 2
    assert lines[header].startswith("| Method | n | Balanced acc. | Accuracy | AUC (macro) | F1 (macro) |")
    body = lines[header + 2:lines.index("## Segmentation")]
    assert [b.split("|")[1].strip() for b in body if b.startswith("|")] == [
        "*baselines*", "linear", "*GiMP*", "gimp", "*MGI*", "mgi", "mgi_no_pretrain"]
    linear = next(b for b in body if b.startswith("| linear |"))
    r = row(table, "linear", "balanced_accuracy")
    assert f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]; {r['mean']:.3f} ± {r['std']:.3f}" in linear


def test_a_method_of_unknown_name_is_summarised_from_its_files(tmp_path):
    path = write_classify(tmp_path, "my_new_method", 0, FOLDS[0])
    table, comparisons, _ = summarize([path], SummaryParams(bootstrap=20))
    assert set(table["group"]) == {"other"} and row(table, "my_new_method", "accuracy")["pooled"] == 0.75
    assert comparisons.empty


def test_a_new_task_joins_the_summary_through_its_records_and_statistic(tmp_path, monkeypatch):
    """No edit of the summary: a task registered from outside, with records and a statistic of its own."""
    from wsiomics.train.methods import METHODS, Method
    from wsiomics.train.tasks.base import TASKS, Task

    class Score(Task):
        name = "toy_score"
        summary_metrics = ("score",)

        def patient_records(self, fold_dir, metrics):
            return {"score": pd.read_csv(fold_dir / "scores.tsv", sep="\t", dtype={"patient_id": str})}

        def pooled_statistic(self, kind, records):
            return {"score": float(records["value"].mean())}

    monkeypatch.setitem(TASKS, "toy_score", Score())
    monkeypatch.setitem(METHODS, "toy", Method("toy", "sklearn_toy", task="toy_score"))
    values = {0: [1.0, 2.0], 1: [3.0, 6.0, 9.0]}
    paths = []
    for k, v in values.items():
        d = _fold(tmp_path, "toy", k, {"score": float(np.mean(v))})
        pd.DataFrame({"patient_id": [f"{k}-{i}" for i in range(len(v))], "value": v}).to_csv(
            d / "scores.tsv", sep="\t", index=False)
        paths.append(str(d / "metrics.json"))
    table, _, text = summarize(paths, SummaryParams(bootstrap=30))
    r = row(table, "toy", "score")
    assert r["group"] == "other" and r["pooled"] == pytest.approx(21 / 5) and r["n_patients"] == 5
    assert r["mean"] == pytest.approx((1.5 + 6.0) / 2)
    assert "## toy_score" in text


def test_metrics_md_counts_the_unlabelled_patients_that_pretrained(tmp_path):
    """A line per pretraining pool with the mean train and unlabelled patients per fold (the fold's
    pretraining record, as train.stages.pretrain writes it), metrics.tsv unchanged by it."""
    def record(pool, unlabelled):
        return {"pretrain": {"training": {"pool": pool, "train_patients": 10, "unlabelled_patients": unlabelled}}}

    paths = [write_classify(tmp_path, "gimp", 0, FOLDS[0], **record("all", 6)),
             write_classify(tmp_path, "gimp", 1, FOLDS[1], **record("all", 8)),
             write_classify(tmp_path, "mgi", 0, FOLDS[0], **record("labelled", 7)),
             write_classify(tmp_path, "gimp_no_mpm", 0, FOLDS[0], **record("all", 8)),
             write_classify(tmp_path, "gimp_no_mpm", 1, FOLDS[1], **{**record("all", 8), "pretrain": {
                 "training": {"pool": "all", "train_patients": 9, "unlabelled_patients": 8}}}),
             write_classify(tmp_path, "linear", 0, FOLDS[0])]
    table, _, text = summarize(paths, SummaryParams(bootstrap=10))
    assert "Pretraining (train.pretrain.pool: all): 10 train patients per fold + 7 unlabelled" in text
    assert "(train.pretrain.pool: labelled): 10 train patients per fold (7 unlabelled left out)" in text
    assert "9.5 train patients per fold + 8 unlabelled" in text  # means over folds, not 9.50000
    assert text.count("Pretraining (") == 3 and list(table.columns) == METRIC_COLUMNS


def test_bad_metrics_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "m" / "fold0" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{}")
    assert main(["--out-dir", str(tmp_path / "out"), str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err


def test_evaluations_keep_the_per_patient_records():
    """What the summary pools is what the folds reported: per-query hits average to recall@k and per-slide tile
    counts add up to the pooled Dice."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(7, 4))
    found = retrieval_metrics(img, img + rng.normal(size=(7, 4)), patient_ids=list("abcdefg"))
    hits = found["retrieval_per_patient"]
    assert hits["patient_id"] == list("abcdefg")
    for key in ("recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5"):
        assert np.mean(hits[key]) == pytest.approx(found[key])
    seg = segmentation_metrics({"x": (np.array([0.9, 0.2, 0.7]), np.array([1.0, 1.0, 0.0])),
                                "y": (np.array([0.6, 0.1]), np.array([1.0, 0.0]))})
    counts = np.array(list(seg["tiles_per_slide"].values())).sum(0)
    assert 2 * counts[0] / (counts[1] + counts[2]) == pytest.approx(seg["dice_pooled"])
