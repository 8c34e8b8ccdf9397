"""common.config: dataclass -> command-line flags, JSON overrides, and clear errors for bad keys."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from common.config import (BaseConfig, ConfigError, build_parser, config_from_dict, field_comments, parse_config,
                           save_config)


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


def test_mistyped_key_names_it_and_suggests_the_right_one_on_one_line():
    with pytest.raises(ConfigError) as err:
        parse_config(DemoConfig, ["--bach-size", "8"])
    assert str(err.value) == ("--bach-size: unknown flag; did you mean --batch-size instead of --bach-size?; "
                              "--help lists the valid flags")


def test_abbreviations_are_not_silently_expanded():
    with pytest.raises(ConfigError, match="--batch"):
        parse_config(DemoConfig, ["--batch", "8"])


def test_bad_value_is_a_one_line_config_error_naming_the_flag(capsys):
    with pytest.raises(ConfigError, match=r"^--batch-size: invalid int value: 'eight'$"):
        parse_config(DemoConfig, ["--batch-size", "eight"])
    with pytest.raises(ConfigError, match=r"^--use-ema: expected a boolean \(true/false\), got 'maybe'$"):
        parse_config(DemoConfig, ["--use-ema", "maybe"])
    with pytest.raises(ConfigError, match=r"^--lr: expected one argument$"):
        parse_config(DemoConfig, ["--lr"])
    assert capsys.readouterr().err == ""  # no usage text: the caller prints one line


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
    assert str(err.value).startswith(f"{path}: unknown config key(s) learning_rate; ")
    assert "valid keys: batch_size, crop_sizes," in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: config file not found"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "nope.json")])
    (tmp_path / "broken.json").write_text("{batch_size: 3")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "broken.json")])


def test_config_from_dict_rejects_unknown_and_keeps_base():
    base = DemoConfig(batch_size=7)
    cfg = config_from_dict(DemoConfig, {"lr": 0.3}, base=base)
    assert (cfg.batch_size, cfg.lr) == (7, 0.3)
    with pytest.raises(ConfigError, match="^checkpoint: unknown config key.* btach_size"):
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


@dataclass
class ChoiceConfig(BaseConfig):
    """Choices and help text read from the dataclass."""

    mode: Literal["dense", "patch"] = "dense"  # how the slide is cut into tiles
    exports: list[Literal["geojson", "asap"]] = field(default_factory=list)  # annotation formats written
    optimizer: Optional[Literal["sgd", "adamw"]] = None  # none: the method's own
    axis: Literal["", "hw", "wh"] = ""  # empty: read it from the checkpoint
    seed: int = 7
    keep: float = 0.5  # share of tiles kept (50% by default)

    def validate(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"--keep must be in (0, 1], got {self.keep}")


def test_choices_are_parsed_and_none_is_allowed_where_optional():
    cfg = parse_config(ChoiceConfig, ["--mode", "patch", "--exports", "asap", "geojson", "--optimizer", "adamw"])
    assert (cfg.mode, cfg.exports, cfg.optimizer) == ("patch", ["asap", "geojson"], "adamw")
    assert parse_config(ChoiceConfig, ["--optimizer", "none"]).optimizer is None


@pytest.mark.parametrize("argv, message", [
    (["--mode", "tiled"], "--mode must be dense or patch, got 'tiled'"),
    (["--exports", "asap", "xml"], "--exports must be geojson or asap, got 'xml'"),
    (["--optimizer", "lars"], "--optimizer must be sgd or adamw, got 'lars'"),
    (["--axis", "xy"], "--axis must be '', hw or wh, got 'xy'"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'"),
])
def test_a_value_outside_the_choices_is_refused(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(ChoiceConfig, argv)
    assert str(err.value) == message


def test_choices_are_checked_on_every_construction(tmp_path):
    """JSON overrides, checkpoint configs and direct construction go through the same check."""
    path = tmp_path / "over.json"
    path.write_text(json.dumps({"mode": "tiled"}))
    with pytest.raises(ConfigError, match="--mode must be dense or patch, got 'tiled'"):
        parse_config(ChoiceConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match="--precision must be auto, fp32, fp16 or bf16, got 'fp8'"):
        ChoiceConfig(precision="fp8")


def test_a_value_error_of_validate_becomes_a_config_error():
    with pytest.raises(ConfigError, match=r"^--keep must be in \(0, 1\], got 2.0$"):
        parse_config(ChoiceConfig, ["--keep", "2"])


def test_help_comes_from_the_field_comments_with_defaults_and_choices():
    text = " ".join(build_parser(ChoiceConfig).format_help().split())  # undo argparse's wrapping
    assert "Choices and help text read from the dataclass." in text
    assert "--mode {dense,patch} how the slide is cut into tiles (default: dense)" in text
    assert "--exports [{geojson,asap} ...] annotation formats written (default: empty)" in text
    assert "--optimizer {sgd,adamw} none: the method's own (default: none)" in text
    assert "--axis {'',hw,wh} empty: read it from the checkpoint (default: empty)" in text
    assert "share of tiles kept (50% by default) (default: 0.5)" in text
    # inherited fields keep the comment of the class that declares them, also when redeclared
    assert "--device {auto,cpu,cuda} auto: CUDA when available, else CPU (default: auto)" in text
    assert "each process seeds with seed + rank (default: 7)" in text
    assert "--resume [{true,false}]" in text


def test_field_comments_follow_the_inheritance():
    comments = field_comments(ChoiceConfig)
    assert comments["mode"] == "how the slide is cut into tiles"
    assert comments["seed"] == "each process seeds with seed + rank"  # BaseConfig's, not redeclared here
    assert set(comments) <= {f for f in ChoiceConfig.__dataclass_fields__}
