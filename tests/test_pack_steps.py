"""`PackSteps` (what the throughput benchmark times for a pack) takes each member's single-run step."""

import pytest
import torch
from test_benchmark import load_benchmark
from test_train import tiny_config

from har.engine.step import build_step_loss
from har.run.assembly import build_loss, build_model, build_optimizer, build_scheduler


@pytest.mark.parametrize("executor", ["fused", "serial"])
def test_pack_steps_move_each_member_as_its_single_run_steps_in_float64(tiny_data, executor, monkeypatch):
    PackSteps = load_benchmark(monkeypatch).PackSteps
    torch.set_default_dtype(torch.float64)  # "equal" is then within rounding of another kernel, never a float tie
    try:
        cfgs = [tiny_config(train={"seed": seed, "pack_executor": executor}, loss={"reweight": "none"})
                for seed in (0, 1)]
        pack = PackSteps(cfgs, tiny_data, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        batches = [[(torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 3, (16,), generator=generator))
                    for _ in range(2)] for _ in cfgs]
        for step in range(2):
            pack([own[step] for own in batches])
        pack.group.store()
        for cfg, member, own in zip(cfgs, pack.members, batches, strict=True):
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg, tiny_data.num_classes)
            har_loss = build_loss(cfg, tiny_data.class_counts)
            optimizer = build_optimizer(cfg, model)
            build_scheduler(cfg, optimizer)  # epoch 0's warm-up learning rate, as the pack's members have it
            step_loss = build_step_loss(model, har_loss, model.num_exits, cfg, amp=False)
            step_loss.train()
            for images, labels in own:
                out = step_loss(images, labels, None)
                optimizer.zero_grad(set_to_none=True)
                (out.loss_sum / out.normaliser).backward()
                optimizer.step()
            assert member.progress.seen == 32 and member.progress.step == 2
            packed = member.model.state_dict()
            for name, value in model.state_dict().items():
                tol = 0.0 if executor == "serial" else 1e-9  # serial: the single run's own kernels
                torch.testing.assert_close(packed[name], value, rtol=tol, atol=tol, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)
