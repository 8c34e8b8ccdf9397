"""common.config: dataclass -> command-line flags, JSON overrides, and clear errors for bad keys."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from common.config import BaseConfig, ConfigError, config_from_dict, parse_config, save_config


@dataclass
class DemoConfig(BaseConfig):
    batch_size: int = 4
    lr: float = 1e-3
    weights: Optional[str] = None
    crop_sizes: list[int] = field(default_factory=lambda: [224, 224])
    use_ema: bool = False

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")


def test_defaults_are_the_recipe():
    cfg = parse_config(DemoConfig, [])
    assert cfg == DemoConfig()
    assert (cfg.batch_size, cfg.lr, cfg.weights, cfg.crop_sizes, cfg.hosts) == (4, 1e-3, None, [224, 224], [])


def test_dash_and_underscore_flags_and_types():
    cfg = parse_config(DemoConfig, ["--batch-size", "16", "--lr=0.25", "--output_dir", "runs/x",
                                    "--crop-sizes", "96", "128", "--hosts", "node-a", "node-b", "--seed", "-3"])
    assert cfg.batch_size == 16 and isinstance(cfg.batch_size, int)
    assert cfg.lr == 0.25 and isinstance(cfg.lr, float)
    assert cfg.output_dir == "runs/x"
    assert cfg.crop_sizes == [96, 128]
    assert cfg.hosts == ["node-a", "node-b"]
    assert cfg.seed == -3


@pytest.mark.parametrize("argv, expected", [
    (["--use-ema"], True), (["--use-ema", "true"], True), (["--use-ema=yes"], True), (["--use-ema", "1"], True),
    (["--use-ema", "false"], False), (["--use-ema=off"], False), (["--use-ema", "0"], False), ([], False)])
def test_boolean_flags(argv, expected):
    assert parse_config(DemoConfig, argv).use_ema is expected


def test_resume_can_be_switched_off():
    assert parse_config(DemoConfig, ["--resume", "false"]).resume is False
    assert parse_config(DemoConfig, []).resume is True


def test_optional_accepts_none():
    assert parse_config(DemoConfig, ["--weights", "a.pt"]).weights == "a.pt"
    assert parse_config(DemoConfig, ["--weights", "none"]).weights is None


def test_mistyped_key_names_it_suggests_the_right_one_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_config(DemoConfig, ["--bach-size", "8"])
    msg = str(err.value)
    assert "unknown config key(s) in command line: --bach-size" in msg
    assert "did you mean --batch-size" in msg
    assert "valid keys:" in msg and "batch_size" in msg and "crop_sizes" in msg


def test_abbreviations_are_not_silently_expanded():
    with pytest.raises(ConfigError, match="--batch"):
        parse_config(DemoConfig, ["--batch", "8"])


def test_bad_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--batch-size", "eight"])
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--use-ema", "maybe"])
    assert "expected a boolean" in capsys.readouterr().err


def test_validate_hook_runs():
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        parse_config(DemoConfig, ["--batch-size", "0"])


def test_json_file_then_flags_win(tmp_path):
    path = tmp_path / "over.json"
    path.write_text(json.dumps({"batch_size": 32, "lr": 0.5, "crop_sizes": [64, 64]}))
    cfg = parse_config(DemoConfig, ["--config", str(path), "--lr", "0.125"])
    assert (cfg.batch_size, cfg.lr, cfg.crop_sizes) == (32, 0.125, [64, 64])


def test_mistyped_key_in_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ConfigError) as err:
        parse_config(DemoConfig, ["--config", str(path)])
    assert str(path) in str(err.value) and "learning_rate" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "nope.json")])


def test_config_from_dict_rejects_unknown_and_keeps_base():
    base = DemoConfig(batch_size=7)
    cfg = config_from_dict(DemoConfig, {"lr": 0.3}, base=base)
    assert (cfg.batch_size, cfg.lr) == (7, 0.3)
    with pytest.raises(ConfigError, match="unknown config key.*in checkpoint: btach_size"):
        config_from_dict(DemoConfig, {"btach_size": 3}, source="checkpoint")


def test_save_config_round_trip(tmp_path):
    cfg = parse_config(DemoConfig, ["--batch-size", "12", "--hosts", "h1", "--use-ema", "--weights", "w.pt"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.json"
    assert json.loads(path.read_text())["batch_size"] == 12
    again = parse_config(DemoConfig, ["--config", str(path)])
    assert again == cfg


def test_unsupported_field_type_is_reported():
    @dataclass
    class Weird(BaseConfig):
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="unsupported config field type"):
        parse_config(Weird, [])


def test_training_script_config_rejects_a_mistyped_key():
    from tiny_train import TinyConfig

    with pytest.raises(ConfigError, match="did you mean --checkpoint-every instead of --checkpoint-evry"):
        parse_config(TinyConfig, ["--checkpoint-evry", "5"])
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        parse_config(TinyConfig, ["--checkpoint-every", "-1"])
    cfg = parse_config(TinyConfig, ["--batch-size", "2", "--use-dropout"])
    assert (cfg.batch_size, cfg.use_dropout, cfg.num_workers) == (2, True, 0)
