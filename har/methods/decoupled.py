"""Stage two of the decoupled methods of Kang et al. (ICLR 2020, "Decoupling Representation and Classifier for
Long-Tailed Recognition"), on a finished stage-one run of this package (Table III), as their classifier-balancing
code runs it (docs/method.md, "Baselines as their sources run them").

- cRT: the final classifier is re-initialised as a new layer of its kind (nn.Linear's own init) and re-trained
  with class-aware sampling; the backbone's weights stay, its batch-norm statistics are re-estimated (train mode).
- LWS: the classifier's weights and bias stay, a learned scale per class (initialised to 1) multiplies its logits,
  trained like cRT.
- tau-norm: no training; each class's weights are divided by the weight norm ** tau and the bias is dropped at
  every tau (Kang et al.'s ``tau_norm.py``), with tau chosen by validation top-1 (``decouple.taus``); the
  checkpoint keeps stage one's weight (``STAGE_ONE_WEIGHT``) so that the evaluation can choose tau again by
  cross-fitting on the test halves (``har.evaluation.selection.crossfit_tau``).

Only the final exit's classifier changes; intermediate exits (if stage one had any) are left as they are. Stage
one's folder, its record and the loading of its weights are the run layer's (`har.run.stage_one`), which stands on
this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from har.config import RunConfig
from har.errors import RunError
from har.models import MultiExitNet
from har.models.exits import make_classifier

# Kang et al.'s ClassAwareSampler (num_samples_cls: 4 in every stage-two config): examples drawn per class visit.
EXAMPLES_PER_CLASS_VISIT = 4

# In a tau-norm checkpoint: stage one's untouched final classifier weight (the saved layer holds W / ||W||^tau).
STAGE_ONE_WEIGHT = "stage_one_classifier_weight"


class LearnedScales(nn.Module):
    """LWS: a classifier whose logits are multiplied by a learned scale per class (initialised to 1)."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x) * self.scales


def attach(cfg: RunConfig, model: MultiExitNet) -> MultiExitNet:
    """Give the model the structure stage two trains and saves (LWS wraps the final classifier)."""
    if cfg.decouple.method == "lws":
        model.backbone.classifier = LearnedScales(model.backbone.classifier, model.num_classes)
    return model


def trainable_parameters(cfg: RunConfig, model: MultiExitNet) -> list[nn.Parameter]:
    """Freeze everything but what the method trains (cRT: the re-initialised classifier; LWS: the scales).

    cRT's new classifier takes the init of a freshly built layer (nn.Linear's default), as Kang et al.'s stage two
    builds a new ``nn.Linear`` and skips loading its stage-one weights.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = model.backbone.classifier
    if cfg.decouple.method == "crt":
        fresh = make_classifier(model.backbone.classifier_kind, model.backbone.channels[-1], model.num_classes)
        classifier.load_state_dict(fresh.state_dict())
        params = list(classifier.parameters())
    elif cfg.decouple.method == "lws":
        params = [classifier.scales]
    else:
        params = []
    for p in params:
        p.requires_grad_(True)
    return params


def train_mode(model: MultiExitNet) -> None:
    """Stage two trains with the backbone in train mode, as Kang et al.'s ``run_networks.py`` calls ``train()`` on
    every network: its frozen batch norms re-estimate their running statistics on the class-aware batches. Exit
    heads stay in eval mode, so intermediate exits are left as they are."""
    model.eval()
    model.backbone.train()


def class_balanced_order(labels: Tensor, generator: torch.Generator,
                         per_visit: int = EXAMPLES_PER_CLASS_VISIT) -> Tensor:
    """An epoch of ``len(labels)`` draws in Kang et al.'s class-aware order.

    Classes are visited in shuffled rounds (every present class once per round, a fresh shuffle each round); a
    visit draws the next ``per_visit`` examples of its class, which cycles through its examples in a shuffled
    order, reshuffled at each wrap. Every class is drawn equally often (up to one visit), rare examples repeat
    and frequent ones are partly left out. Unlike their sampler, whose cycles carry over between epochs, each
    epoch starts fresh cycles from its own generator, so a resumed run draws the same order.
    """
    n, dev = len(labels), labels.device
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).squeeze(1)
    visits = -(-n // per_visit)
    rounds = -(-visits // len(present))
    shuffles = torch.argsort(torch.rand(rounds, len(present), generator=generator, device=dev), dim=1)
    visited = present[shuffles].flatten()[:visits]
    sorted_idx = torch.argsort(labels, stable=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    slots = torch.argsort(visited, stable=True)  # the visits of each class, class by class, in visiting order
    order = torch.empty(visits, per_visit, dtype=torch.long, device=dev)
    done = 0
    for c, k in zip(present.tolist(), torch.bincount(visited, minlength=len(counts))[present].tolist(), strict=True):
        size, need = int(counts[c]), k * per_visit
        if need == 0:
            continue
        cycles = torch.argsort(torch.rand(-(-need // size), size, generator=generator, device=dev), dim=1)
        order[slots[done:done + k]] = sorted_idx[starts[c] + cycles.flatten()[:need]].view(k, per_visit)
        done += k
    return order.flatten()[:n]


@torch.no_grad()
def tau_normalize(classifier: nn.Linear, tau: float) -> None:
    """Divide each class's weights by its weight norm ** tau and zero the bias, in place.

    Kang et al.'s ``tau_norm.py`` computes the logits as features . (W / ||W||^tau)^T with no bias at every tau,
    tau = 0 included; a zero bias keeps the layer (and the checkpoint's keys) that the evaluation loads.
    """
    if not isinstance(classifier, nn.Linear):
        raise RunError(f"tau-norm needs a linear final classifier, got {type(classifier).__name__}; train stage one "
                       f"with model.classifier: linear")
    classifier.weight.copy_(tau_normalized_weight(classifier.weight, tau))
    if classifier.bias is not None:
        classifier.bias.zero_()


def tau_normalized_weight(weight: Tensor, tau: float) -> Tensor:
    """W / ||W||^tau, row by row (one class per row): the one formula of tau-norm."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


@torch.no_grad()
def pooled_features(model: MultiExitNet, batches: Iterable[Tensor]) -> Tensor:
    """The backbone's pooled features of every batch (float32), the input tau-norm's candidate logits share."""
    model.eval()
    return torch.cat([model.pooled_features(x).float() for x in batches])


@torch.no_grad()
def tau_logits(features: Tensor, weight: Tensor, tau: float) -> Tensor:
    """tau-norm's logits at one tau: features @ (W / ||W||^tau).T, no bias."""
    return features @ tau_normalized_weight(weight, tau).T


@torch.no_grad()
def tau_predictions(features: Tensor, weight: Tensor, taus: Sequence[float]) -> Tensor:
    """Each candidate tau's predictions [taus, examples], one tau's logits at a time (iNaturalist's are large)."""
    return torch.stack([tau_logits(features, weight, tau).argmax(1) for tau in taus])


def best_tau(top1_by_tau: Mapping[float, float]) -> float:
    """The tau of highest top-1; ties go to the smallest tau (the least change to the classifier). Stage two chooses
    tau on validation with it, and the evaluation when it cross-fits tau on the test halves."""
    return max(sorted(top1_by_tau), key=lambda tau: top1_by_tau[tau])


@torch.no_grad()
def choose_tau(features: Tensor, labels: Tensor, classifier: nn.Linear, taus: tuple[float, ...]) -> dict:
    """Top-1 of every candidate tau on pooled features (bias dropped); the best tau (ties: the smallest)."""
    top1 = (tau_predictions(features, classifier.weight, taus) == labels).float().mean(1).tolist()
    scores = dict(zip((float(t) for t in taus), top1, strict=True))
    return {"tau": best_tau(scores), "val_top1_by_tau": {f"{t:g}": scores[t] for t in sorted(scores)}}


def stage_one_weight(ckpt: dict, where: Path) -> Tensor:
    """The stage-one classifier weight a tau-norm checkpoint keeps (`STAGE_ONE_WEIGHT`).

    Raises:
        RunError: the checkpoint predates the key (an older har); names the fix.
    """
    if STAGE_ONE_WEIGHT not in ckpt:
        raise RunError(f"{where} holds no {STAGE_ONE_WEIGHT} (written by an older har): cross-fitting tau on the "
                       f"test halves needs stage one's classifier; delete {where.parent} and run har train again "
                       f"(tau-norm trains nothing)")
    return ckpt[STAGE_ONE_WEIGHT]
