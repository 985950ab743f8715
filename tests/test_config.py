import pytest

from dmdd.config import Config, load_config, save_config
from dmdd.errors import ConfigError


def test_yaml_round_trip_and_numeric_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_pretrained: 1e-4\n  epochs: 3\nmodel:\n  backbone: resnet18\n")
    cfg = load_config(path)
    assert cfg.train.lr_pretrained == 1e-4 and isinstance(cfg.train.lr_pretrained, float)  # YAML reads 1e-4 as str
    assert cfg.train.epochs == 3 and cfg.model.backbone == "resnet18"
    save_config(cfg, tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml") == cfg


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be a whole number"),
        ({"model": {"msn": "yes"}}, "model.msn must be true or false"),
        ({"model": {"image_size": 100}}, "multiple of 32"),
        ({"train": {"nope": 1}}, "unknown option"),
        ({"extra": {}}, "unknown config section"),
        ({"synthesis": {"foreground": "maybe"}}, "auto|object|texture"),
    ],
)
def test_invalid_options_name_the_option(raw, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(raw)


def test_replace_changes_only_the_given_fields():
    cfg = Config().replace(train={"epochs": 7})
    assert cfg.train.epochs == 7 and cfg.train.lr == Config().train.lr


def test_unquoted_on_and_off_in_yaml_mean_the_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  regional_score: on\n  global_score: off\n")
    cfg = load_config(path)
    assert cfg.model.regional_score == "on" and cfg.model.global_score == "off"
