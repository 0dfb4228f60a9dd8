"""Config loading: defaults are the paper's, bad values are refused with the key, the value and the fix."""

from pathlib import Path

import pytest

from har import config
from har.config import config_diff, config_hash, dump_config, from_dict, load_config, to_dict
from har.errors import ConfigError
from har.run.schedule import lr_factor


def test_defaults_are_the_papers_cifar_settings():
    cfg = load_config(None)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.momentum) == (200, 128, 0.1, 0.9)
    assert cfg.train.weight_decay == 2e-4 and cfg.train.lr_milestones == (160, 180)
    assert (cfg.loss.drw_epoch, cfg.loss.cb_beta, cfg.loss.focal_gamma) == (160, 0.9999, 0.5)
    assert (cfg.loss.ldam_max_margin, cfg.loss.ldam_scale) == (0.5, 30.0)
    assert cfg.data.seed == 0 and cfg.data.ratio == 100


def test_cosine_classifier_follows_the_loss():
    assert from_dict({"loss": {"name": "ldam", "train_threshold": 0.2}}).classifier == "cosine"
    assert from_dict({"loss": {"name": "ce"}}).classifier == "linear"
    assert from_dict({"loss": {"name": "ce", "har": False}, "model": {"classifier": "cosine"}}).classifier == "cosine"


@pytest.mark.parametrize("values, message", [
    ({"loss": {"name": "hinge"}}, "loss.name: 'hinge' is not allowed; choose one of ['ce', 'focal', 'ldam']"),
    ({"data": {"dataset": "mnist"}}, "data.dataset: 'mnist' is not allowed"),
    ({"model": {"name": "vgg"}}, "model.name: Unknown model 'vgg'; choose one of ["),
    ({"model": {"layout": "CEBBEE"}}, "model.layout: Layout 'CEBBEE' has 2 'B's"),
    ({"train": {"epochs": "ten"}}, "train.epochs: 'ten' (str) is not a valid int"),
    ({"train": {"epochs": -1}}, "train.epochs: -1 is out of range; it must be >= 1"),
    ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; it must be >= 1"),
    ({"data": {"seed": -1}}, "data.seed: -1 is out of range; it must be in [0, 2**32)"),
    ({"data": {"seed": 2**32}}, "data.seed: 4294967296 is out of range"),
    ({"train": {"seed": 2**63}}, "train.seed: 9223372036854775808 is out of range; it must be in [0, 2**32)"),
    ({"train": {"lr_batch": 0}}, "train.lr_batch: 0 is out of range; it must be >= 1 or null"),
    ({"model": {"exit_channels": 0}}, "model.exit_channels: 0 is out of range; it must be >= 1 or null"),
    ({"data": {"ratio": float("inf")}}, "data.ratio: inf is not a finite number"),
    ({"train": {"lr": float("nan")}}, "train.lr: nan is not a finite number"),
    ({"train": {"weight_decay": float("inf")}}, "train.weight_decay: inf is not a finite number"),
    ({"loss": {"focal_gamma": float("-inf")}}, "loss.focal_gamma: -inf is not a finite number"),
    ({"data": {"mean": [0.5, float("nan"), 0.5]}}, "data.mean[1]: nan is not a finite number"),
    ({"train": {"lr": 10**400}}, "train.lr: 1000"),
    ({"train": {"compile": True}}, "train.compile: on is not a mode; choose default or reduce-overhead"),
    ({"train": {"mixup": True}}, "train.mixup: on is not a mode; choose input or manifold"),
    ({"data": {"name": "x", "seed": "1e3"}}, "data.name: unknown field"),
    ({"data": {"ratio": 0.5}}, "data.ratio: 0.5 is out of range; it must be >= 1"),
    ({"loss": {"train_threshold": 1.5}}, "loss.train_threshold: 1.5 is out of range; it must be in (0, 1)"),
    ({"loss": {"train_threshold": 0}}, "loss.train_threshold: 0.0 is out of range"),
    ({"loss": {"reweight": "DRW"}}, "loss.reweight: 'DRW' is not allowed"),
    ({"train": {"lr_milestones": [180, 160]}}, "train.lr_milestones: (180, 160) is out of range"),
    ({"train": {"epochs": 3, "keep_epochs": [0]}}, "train.keep_epochs: (0,) is out of range; it must be epochs counted "
                                                   "from 1, each at most train.epochs"),
    ({"train": {"epochs": 3, "keep_epochs": [2, 4]}}, "train.keep_epochs: (2, 4) is out of range"),
    ({"data": {"ratoi": 10}}, "data.ratoi: unknown field (did you mean data.ratio?)"),
    ({"optim": {}}, "optim: unknown field"),
    ({"data": {"mean": [0.5, 0.5]}}, "data.mean: expected a list of 3 values, got 2"),
    ({"train": {"device": "tpu"}}, "train.device: 'tpu' is not allowed"),
    ({"data": 3}, "data: expected a mapping of fields"),
])
def test_bad_values_name_key_value_and_allowed(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(values)
    assert message in str(err.value)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\nloss:\n  name: focal\n")
    cfg = load_config(path, ["train.epochs=3", "data.ratio=10"])
    assert (cfg.train.epochs, cfg.loss.name, cfg.data.ratio) == (3, "focal", 10.0)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.epochs"])


def test_a_bare_off_in_yaml_means_the_choice_off(tmp_path):
    """YAML 1.1 (PyYAML, Snakemake) reads an unquoted off as false; in a field that offers "off" it means that."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixup: off\n")
    cfg = load_config(path, ["train.compile=off"])
    assert (cfg.train.mixup, cfg.train.compile) == ("off", "off")
    with pytest.raises(ConfigError, match="loss.name: False is not allowed"):  # no "off" among its choices
        load_config(None, ["loss.name=off"])


def test_a_field_added_at_its_default_leaves_the_hash_unchanged(monkeypatch):
    """Run folders of an older version stay resumable when a new field keeps the old behaviour by default."""
    cfg = from_dict({"loss": {"name": "ldam", "har": False}, "train": {"epochs": 3}})
    before = config_hash(cfg)
    real = config.to_dict

    def with_new_field(value):  # as if TrainConfig had gained `new_knob: int = 1`
        def to_dict(c):
            values = real(c)
            values["train"]["new_knob"] = value if c is cfg else 1
            return values
        return to_dict

    monkeypatch.setattr(config, "to_dict", with_new_field(1))
    assert config_hash(cfg) == before
    monkeypatch.setattr(config, "to_dict", with_new_field(2))
    assert config_hash(cfg) != before


def test_resolved_config_round_trips_and_hash_ignores_runtime_fields():
    import yaml

    cfg = from_dict({"train": {"epochs": 3}, "loss": {"name": "ldam", "har": False}})
    again = from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    moved = from_dict({"train": {"epochs": 3, "device": "cpu", "keep_epochs": [2]},
                       "loss": {"name": "ldam", "har": False}, "data": {"root": "/x"}, "eval": {"batch_size": 7}})
    assert config_hash(moved) == config_hash(cfg)
    other = from_dict({"train": {"epochs": 4}, "loss": {"name": "ldam", "har": False}})
    assert config_hash(other) != config_hash(cfg)
    assert config_diff(to_dict(cfg), to_dict(other)) == ["train.epochs: 3 -> 4"]


def test_lr_schedule_matches_ldam_drw():
    # LDAM-DRW's adjust_learning_rate: epoch+1 <= 5 -> lr*(epoch+1)/5; > 180 -> lr*1e-4; > 160 -> lr*1e-2.
    def reference(epoch):
        e = epoch + 1
        return e / 5 if e <= 5 else 1e-4 if e > 180 else 1e-2 if e > 160 else 1.0

    for epoch in range(200):
        assert lr_factor(epoch, 5, (160, 180), 0.01) == pytest.approx(reference(epoch)), epoch


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "config" / "runs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1 and cfg.model.name in ("resnet32", "resnet50")


def test_lr_scales_linearly_with_the_global_batch_and_cosine_decays_to_zero():
    cfg = from_dict({"train": {"lr": 0.1, "lr_batch": 256, "batch_size": 1024}})
    assert cfg.train.scaled_lr == pytest.approx(0.4)
    assert from_dict({}).train.scaled_lr == 0.1
    factors = [lr_factor(e, 0, (), 1.0, "cosine", 10) for e in range(10)]
    assert factors[0] == 1.0 and factors == sorted(factors, reverse=True) and factors[-1] < 0.03


def test_list_datasets_default_to_imagenet_normalisation():
    assert from_dict({"data": {"dataset": "imagenet_lt"}}).data.normalization()[0] == (0.485, 0.456, 0.406)
    assert from_dict({}).data.normalization()[0] == pytest.approx((0.4914, 0.4822, 0.4465))
    with pytest.raises(ConfigError, match="data.bundle"):
        from_dict({"data": {"dataset": "inat2018", "bundle": "x.npz"}})


def test_floats_written_with_an_exponent_are_numbers_in_float_fields_only(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; a float field takes it as the number it means."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\nloss:\n  ldam_scale: +3e+1\n")
    cfg = load_config(path, ["train.lr_decay=2e-2"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.loss.ldam_scale, cfg.train.lr_decay) == (1e-3, 5e-4, 30.0, 0.02)
    assert load_config(None, ["data.root=1e3"]).data.root == "1e3"  # a str field keeps the text
    with pytest.raises(ConfigError, match="train.epochs: '1e3' \\(str\\) is not a valid int"):
        load_config(None, ["train.epochs=1e3"])
    with pytest.raises(ConfigError, match="train.lr: '1e-3x' \\(str\\) is not a valid float"):
        load_config(None, ["train.lr=1e-3x"])
    with pytest.raises(ConfigError, match="train.momentum: -2000.0 is out of range"):
        load_config(None, ["train.momentum=-2e+3"])
    with pytest.raises(ConfigError, match="train.lr: inf is not a finite number"):
        load_config(None, ["train.lr=1e999"])


def test_an_empty_section_override_is_refused_but_an_empty_field_is_null():
    with pytest.raises(ConfigError, match=r"train: empty value; name a field, e.g. train.epochs=2"):
        load_config(None, ["train="])
    with pytest.raises(ConfigError, match=r"data: empty value"):
        load_config(None, ["data= "])
    assert load_config(None, ["data.bundle=x.npz", "data.bundle="]).data.bundle is None


def test_drw_that_never_switches_on_warns(caplog):
    with caplog.at_level("WARNING", logger="har.config"):
        from_dict({"loss": {"reweight": "drw", "drw_epoch": 3}, "train": {"epochs": 4}})
    assert not caplog.records
    with caplog.at_level("WARNING", logger="har.config"):
        from_dict({"loss": {"reweight": "drw", "drw_epoch": 4}, "train": {"epochs": 4}})
    assert "loss.drw_epoch 4 is not below train.epochs 4: DRW never switches its weights on" in caplog.text


def test_a_binary_or_folder_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  epochs: \xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError, match=r"run.yaml is not UTF-8 text .*give a YAML run config"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"is a folder; give the path of a YAML run config"):
        load_config(tmp_path)


def test_path_fields_of_the_wrong_kind_are_named(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"data.bundle: {tmp_path} is a folder, not a file"):
        from_dict({"data": {"bundle": str(tmp_path)}})
    for key in ("lists", "images", "root"):
        with pytest.raises(ConfigError, match=rf"data.{key}: {a_file} is a file, not a folder"):
            from_dict({"data": {"dataset": "imagenet_lt", key: str(a_file)}})
    missing = tmp_path / "not-yet"  # written later (a pipeline bundle): checked where the data are read
    assert from_dict({"data": {"bundle": str(missing)}}).data.bundle == str(missing)


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100), ("imagenet_lt", 1000)])
def test_a_har_threshold_above_the_cosine_ceiling_is_refused(dataset, classes):
    from har.facts import confidence_ceiling

    ceiling = confidence_ceiling(classes, "cosine")
    ldam = {"data": {"dataset": dataset}, "loss": {"name": "ldam", "har": True}}
    assert from_dict({**ldam, "loss": {**ldam["loss"], "train_threshold": 2.0 / classes}}).classifier == "cosine"
    with pytest.raises(ConfigError) as err:
        from_dict({**ldam, "loss": {**ldam["loss"], "train_threshold": ceiling * 1.01}})
    assert f"never exceeds {ceiling:.4g}" in str(err.value) and f"2.0/C = {2.0 / classes:.4g}" in str(err.value)
    with pytest.raises(ConfigError, match="loss.train_threshold: 0.9 can never be exceeded"):
        from_dict(ldam)  # the default t is the linear classifier's
    # not HAR, or a placeholder the t line search replaces: nothing to check
    assert from_dict({**ldam, "loss": {"name": "ldam", "har": False}}).loss.train_threshold == 0.9
    assert from_dict(ldam, t_pending=True).loss.train_threshold == 0.9


def test_an_exit_threshold_grid_beyond_the_ceiling_is_refused():
    ldam = {"loss": {"name": "ldam", "har": False}}
    ok = from_dict({**ldam, "eval": {"exit_thresholds": [0.2, 0.4, 1.01]}})  # 1.01: no early exit, on purpose
    assert ok.eval.exit_thresholds == (0.2, 0.4, 1.01)
    with pytest.raises(ConfigError, match=r"eval.exit_thresholds: none of \[0.5, 0.9\] can be exceeded: a cosine "
                                          r"classifier's softmax on 10 classes \(cifar10\) never exceeds 0.4509"):
        from_dict({**ldam, "eval": {"exit_thresholds": [0.5, 0.9]}})
    with pytest.raises(ConfigError, match="never exceeds 1;"):
        from_dict({"eval": {"exit_thresholds": [1.0, 1.01]}})


def test_confidence_ceiling_matches_the_softmax_of_extreme_cosines():
    import numpy as np

    from har.facts import confidence_ceiling

    for classes in (10, 100, 1000):
        cosines = np.full(classes, -1.0)
        cosines[0] = 1.0
        probs = np.exp(cosines) / np.exp(cosines).sum()
        assert confidence_ceiling(classes, "cosine") == pytest.approx(probs[0], rel=1e-12)
    assert confidence_ceiling(10, "linear") == 1.0
    with pytest.raises(ValueError, match="unknown classifier"):
        confidence_ceiling(10, "auto")
