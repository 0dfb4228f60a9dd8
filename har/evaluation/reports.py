"""What an evaluation reports after the forward pass, as a function of the cached outputs alone.

A split's report is fixed by its cache (`eval/<split>.npz`: every exit's logits and the labels), the run's config,
the architecture's MACs table (`flops_table` of a model built from the config; no weights) and the split's class
counts and shot groups. `har evaluate` computes it after its forward pass; `evaluate_from_cache` recomputes it
from the cache alone, so a run evaluated under older rules is reported under the current ones without its data or
weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from har.config import RunConfig, config_hash
from har.evaluation import selection
from har.evaluation.dynamic import ExitCosts, default_exit_thresholds, exit_outcomes, softmax, sweep_results
from har.evaluation.metrics import classification_summary, confusion_matrix

SPLITS = ("val", "test")  # val first: under the val protocol it chooses s for the test split


@dataclass(frozen=True)
class SplitOutputs:
    """One split's cache: logits [exits, examples, classes], labels [examples] and, for a tau-norm run whose test
    logits were cross-fitted, the record of that choice (`tau_selection`)."""

    logits: np.ndarray
    labels: np.ndarray
    tau_selection: dict | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """What `eval/<split>.npz` holds (the tau record as a JSON string)."""
        arrays = {"logits": self.logits, "labels": self.labels}
        if self.tau_selection is not None:
            arrays["tau_selection"] = np.array(json.dumps(self.tau_selection))
        return arrays


def confidence_histograms(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[list[list[int]]]:
    """Per exit, per class: histogram of the true-class probability over [0, 1] (the paper's Fig. 3)."""
    num_exits, _, num_classes = probs.shape
    true_prob = probs[:, np.arange(len(labels)), labels]
    edges = np.linspace(0.0, 1.0, bins + 1)
    return [[np.histogram(true_prob[k, labels == c], bins=edges)[0].tolist() for c in range(num_classes)]
            for k in range(num_exits)]


def split_report(probs: np.ndarray, labels: np.ndarray, groups: Mapping[str, Sequence[int]], table: dict,
                 exit_thresholds: Sequence[float], bins: int) -> dict:
    """Static, per-exit and dynamic-sweep metrics of one split from its softmax probabilities."""
    costs = ExitCosts.from_table(table)
    num_classes = probs.shape[2]
    static_pred = probs[-1].argmax(1)
    static = classification_summary(labels, static_pred, num_classes, groups)
    static.update(macs=table["backbone_macs"], confusion=confusion_matrix(labels, static_pred, num_classes).tolist())
    exits = [dict(classification_summary(labels, probs[k].argmax(1), num_classes, groups), macs_to_here=macs)
             for k, macs in enumerate(costs.with_heads)]
    confidence, predictions = exit_outcomes(probs)
    sweep = sweep_results(confidence, predictions, labels, num_classes, exit_thresholds, costs, groups)
    return {"num_examples": int(len(labels)), "static": static, "exits": exits, "dynamic_sweep": sweep,
            "confidence_histograms": confidence_histograms(probs, labels, bins), "histogram_bins": bins}


def split_reports(cfg: RunConfig, outputs: Mapping[str, SplitOutputs], table: dict, class_counts: Sequence[int],
                  groups: Mapping[str, Sequence[int]], target_savings: Sequence[float]) -> dict[str, dict]:
    """The validation and test reports of a run from its cached outputs (`har.evaluation.selection` says on which
    images each s is chosen); the caller adds where they came from (`run`, provenance, machines)."""
    costs = ExitCosts.from_table(table)
    num_classes = outputs["test"].logits.shape[2]
    thresholds = cfg.eval.exit_thresholds or default_exit_thresholds(num_classes, cfg.classifier)
    test_protocol = selection.protocol(cfg.data.dataset)
    reports: dict[str, dict] = {}
    chosen_on_val: dict[str, selection.Choice] = {}
    for split in SPLITS:
        cached = outputs[split]
        labels = cached.labels
        probs = softmax(cached.logits)
        halves = selection.stratified_halves(labels, cfg.data.seed)
        report = split_report(probs, labels, groups, table, thresholds, cfg.eval.histogram_bins)
        if cached.tau_selection is not None:
            report["tau_selection"] = cached.tau_selection
        if split == "val":
            chosen_on_val = selection.choose_all(exit_outcomes(probs)[0], report["dynamic_sweep"], costs,
                                                 target_savings)
        if split == "test" and test_protocol == selection.VAL:
            selected = selection.chosen_elsewhere_selected(probs, labels, chosen_on_val, costs, groups)
        else:  # the validation report is cross-fitted on its own halves, for comparison
            name = selection.CROSSFIT if split == "test" else f"crossfit-{split}-halves"
            selected = selection.crossfit_selected(probs, labels, halves, thresholds, target_savings, costs, groups,
                                                   name)
        static_pred = probs[-1].argmax(1)
        report["dynamic_selected"] = selected
        report.update(split=split, config_sha256=config_hash(cfg),
                      selection_protocol=next(iter(selected.values()))["protocol"],
                      exit_thresholds_chosen={name: r["exit_thresholds"] for name, r in selected.items()},
                      halves={"seed": cfg.data.seed, "sizes": [len(h) for h in halves],
                              "static_top1": [float((static_pred[h] == labels[h]).mean()) for h in halves]},
                      flops=table, class_counts=list(class_counts), groups=dict(groups))
        reports[split] = report
    return reports
