"""The training step's forward + loss + statistics (`StepLoss`) under torch.compile.

Compiling with inductor on these 2 CPU cores takes minutes, so the graph is checked with the `aot_eager` backend:
it traces the step exactly as inductor would receive it (Dynamo + AOTAutograd) and then runs the same aten
operations eagerly, so its values must equal the eager step's.
"""

import pytest
import torch
from test_train import tiny_config
from torch._dynamo.utils import counters

from har.engine import trainer
from har.engine.step import StepLoss
from har.losses import build_exit_loss
from har.methods.mixup import draw_mixing
from har.run import assembly


@pytest.mark.parametrize("mixup", ["off", "input"])
def test_compiled_step_is_one_graph_that_equals_the_eager_step(tiny_data, mixup):
    """fullgraph=True fails on any graph break; the compiles stay few though lam, and the DRW weights, change."""
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config(train={"mixup": mixup})
    torch.manual_seed(0)
    model = assembly.build_model(cfg, tiny_data.num_classes)
    har_loss = assembly.build_loss(cfg, tiny_data.class_counts)
    eager = StepLoss(model, har_loss, model.num_exits, mixup)
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    params = list(model.parameters())
    for step in range(5):
        if step >= 2:  # DRW switches on, then the schedule hands over a new weight tensor every epoch
            har_loss.exit_loss.set_weight(torch.rand(tiny_data.num_classes) + 0.5)
        images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, tiny_data.num_classes, (16,))
        mixing = None if mixup == "off" else draw_mixing(1.0, 0, 0, step, 16, torch.device("cpu"))
        want = eager(images, labels, mixing)
        want_grads = torch.autograd.grad(want.loss_sum, params)
        got = compiled(images, labels, mixing)
        got_grads = torch.autograd.grad(got.loss_sum, params)
        for name, a, b in zip(want._fields, want, got):
            torch.testing.assert_close(b, a, msg=f"{name} at step {step}")
        for a, b in zip(want_grads, got_grads):
            torch.testing.assert_close(b, a)
    assert got.exit_counts.sum() == 16
    # one graph per phase: no weights / weights (and, with mixup, static then dynamic lam)
    assert counters["stats"]["unique_graphs"] <= (2 if mixup == "off" else 3)


def test_train_compiles_the_whole_step_in_one_process(tmp_path, tiny_data, monkeypatch):
    """`train.compile` reaches torch.compile with the StepLoss (forward, loss and statistics), not the bare model."""
    calls = []

    def record(module, mode):
        calls.append((type(module), mode))
        return module

    monkeypatch.setattr(trainer.torch, "compile", record)
    history = trainer.train(tiny_config(train={"compile": "reduce-overhead", "epochs": 1, "lr_milestones": []}),
                            tmp_path / "run", data=tiny_data)
    assert calls == [(StepLoss, "reduce-overhead")]
    assert len(history) == 1 and not history[0]["reweighted"]


@pytest.mark.parametrize("name", ["ce", "focal", "ldam"])
def test_unit_class_weights_give_the_values_of_no_weights(name):
    """Why a compiled run trains with unit weights before DRW: the same values, and one graph for the whole run."""
    torch.manual_seed(0)
    logits, target = 3 * torch.randn(64, 10), torch.randint(0, 10, (64,))
    loss = build_exit_loss(name, [100 - 9 * i for i in range(10)])
    plain = loss.per_example(logits, target), loss.normaliser(target)
    loss.set_weight(torch.ones(10))
    assert torch.equal(loss.per_example(logits, target), plain[0])
    assert torch.equal(loss.normaliser(target), plain[1])
