"""No stale result: a stage two is tied to the stage one it started from, and the pipeline retrains a run folder
whose config or stage one changed (moving the old folder aside) or that was deleted by hand."""

import pytest
from test_methods import plain_config, stage_two_config

from har.engine.checkpoint import RunError
from har.engine.trainer import train
from har.evaluation.evaluate import evaluate_run
from har.methods import decoupled


def test_stage_two_of_a_retrained_stage_one_is_refused(tmp_path, tiny_data):
    """cRT records its stage one when it starts; resuming or evaluating it after stage one was trained again
    (another seed here: other weights) is refused with both folders named and the fix."""
    first, second = tmp_path / "stage1", tmp_path / "crt"
    train(plain_config(), first, data=tiny_data)
    cfg = stage_two_config(first, "crt", train={"epochs": 1})
    train(cfg, second, data=tiny_data)
    assert decoupled.recorded_stage_one(second) == decoupled.stage_one_identity(first)
    train(cfg, second, data=tiny_data)  # the same stage one: resuming a finished run is allowed
    evaluate_run(second, data=tiny_data)

    for name in ("config.yaml", "config.sha256", "metrics.jsonl", "last.pt", "prev.pt"):
        (first / name).unlink(missing_ok=True)
    train(plain_config(train={"seed": 1}), first, data=tiny_data)
    assert decoupled.stage_one_change(cfg, second)
    for action in (lambda: train(cfg, second, data=tiny_data), lambda: evaluate_run(second, data=tiny_data)):
        with pytest.raises(RunError, match="stage two of an earlier training of its stage one") as caught:
            action()
        assert str(first) in str(caught.value) and f"delete {second}" in str(caught.value)
