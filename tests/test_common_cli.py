"""Command lines that explain themselves: ``--help`` built from the config dataclasses (each field's
comment, default and choices), and user errors reported as one line ``error: <file or flag>: ...``
with exit status 2 and no traceback (``PATHMONO_TRACEBACK=1`` keeps it).

Every script runs in-process through ``runpy`` (its real ``__main__`` block, milliseconds once its
imports are loaded); a representative few run as real processes, and one ``--hosts`` launch shows
that an error inside spawned workers ends the same way."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import dist
from common.config import BaseConfig, build_parser, field_choices, field_comments
from common.errors import TRACEBACK_ENV, UserError, describe, exit_on_user_error
from common_testutils import REPO_ROOT, child_env, free_port, run_workers

TASKS = ("camelyon", "nuclick", "spleen", "pretrain", "segpanda")
MISSING = "/nonexistent/pathmono"


def _main_block(path: Path) -> ast.If | None:
    blocks = [node for node in ast.parse(path.read_text()).body
              if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
    return blocks[0] if blocks else None


def _scripts() -> list[str]:
    """Every file with a ``__main__`` block: the tasks' scripts and the training template."""
    found = [p for task in TASKS for p in sorted((REPO_ROOT / task).glob("*.py")) if _main_block(p)]
    return [str(p.relative_to(REPO_ROOT)) for p in found] + ["tests/tiny_train.py"]


SCRIPTS = _scripts()


def _config_class(script: str) -> type | None:
    """The config dataclass the script's ``__main__`` block parses (None for argparse scripts)."""
    found = re.search(r"parse_config\((\w+)", ast.unparse(_main_block(REPO_ROOT / script)))
    if not found:
        return None
    return runpy.run_path(str(REPO_ROOT / script), run_name="cli_test")[found.group(1)]


def run_script(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the script's ``__main__`` block in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        status = 0
    except SystemExit as exited:
        status = exited.code if isinstance(exited.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, fragment: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err


def help_entries(out: str) -> dict[str, str]:
    """``{first flag: its description}`` from argparse's help: a description follows the flag and
    its metavar after two or more spaces, or on the next lines, indented."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        start = re.match(r"^  (-\S+)", line)
        if start:
            current = start.group(1).rstrip(",")
            entries[current] = re.split(r"\S  +", line.strip(), maxsplit=1)[1:]
        elif current and re.match(r"^ {6,}\S", line):
            entries[current].append(line.strip())
        else:
            current = None
    return {flag: " ".join(parts) for flag, parts in entries.items()}


def flat(text: str) -> str:
    """Text with argparse's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder for in-process runs (relative default outputs land here), no downloads,
    and inputs that are not what their names say."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PATHMONO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "random.tif").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "short_rows.csv").write_text("slide,1,2\n")  # a patch list needs 12 columns
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "white.png")  # no tissue: not a stain target
    Image.new("L", (32, 32), 120).save(tmp_path / "grey.png")  # one channel: not a stain target
    return tmp_path


# ============================================================================= the pieces
def test_every_script_reports_user_errors_from_its_main_block():
    assert len(SCRIPTS) >= 25
    for script in SCRIPTS:
        body = _main_block(REPO_ROOT / script).body
        assert len(body) == 1 and isinstance(body[0], ast.With), script
        assert ast.unparse(body[0].items[0].context_expr) == "exit_on_user_error()", script


def _config_classes() -> list[type]:
    for task in TASKS:
        for module in pkgutil.iter_modules([str(REPO_ROOT / task)]):
            importlib.import_module(f"{task}.{module.name}")
    classes, todo = [], [BaseConfig]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in TASKS and sub not in classes:
                classes.append(sub)
    return classes


def test_every_config_field_has_a_help_comment_and_valid_defaults():
    classes = _config_classes()
    assert len(classes) >= 20
    missing = {f"{cls.__module__}.{cls.__qualname__}": [f.name for f in dataclasses.fields(cls)
                                                        if f.name not in field_comments(cls)] for cls in classes}
    missing = {name: fields for name, fields in missing.items() if fields}
    assert not missing, "fields without a comment (it is their --help line): " + "; ".join(
        f"{name}: {', '.join(fields)}" for name, fields in missing.items())
    for cls in classes:
        cls()  # the defaults lie within the declared choices
        build_parser(cls)


def test_choices_are_declared_once_in_the_dataclasses():
    from camelyon.config import EvalConfig as CamelyonEval, InferConfig as CamelyonInfer
    from nuclick.config import AXIS_ORDERS, InferConfig as NuclickInfer, TrainConfig as NuclickTrain
    from pretrain.config import DEMO_DEFAULTS, METHOD_DEFAULTS, PretrainConfig
    from pretrain.methods import METHODS
    from spleen.config import TrainConfig as SpleenTrain

    assert field_choices(CamelyonInfer)["mode"] == ("dense", "patch")
    assert field_choices(CamelyonInfer)["export"] == ("geojson", "asap")
    assert field_choices(CamelyonEval)["protocol"] == ("official", "bundle")
    assert field_choices(SpleenTrain)["sw_mode"] == ("constant", "gaussian")
    assert field_choices(NuclickTrain)["axis_order"] == AXIS_ORDERS
    assert field_choices(NuclickInfer)["axis_order"] == ("", *AXIS_ORDERS)
    assert set(field_choices(PretrainConfig)["method"]) == set(METHOD_DEFAULTS) == set(DEMO_DEFAULTS) == set(METHODS)
    assert field_choices(PretrainConfig)["optimizer"] == ("lars", "sgd", "adamw")


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    for err, line in [(UserError("a.tif: two\nlines"), "error: a.tif: two; lines"),
                      (FileNotFoundError(2, "No such file or directory", "/x/y.pt"),
                       "error: /x/y.pt: No such file or directory"),
                      (IsADirectoryError("/x: is a folder"), "error: /x: is a folder")]:
        with pytest.raises(SystemExit) as exited:
            with exit_on_user_error():
                raise err
        assert exited.value.code == 2 and capsys.readouterr().err == line + "\n"
    with pytest.raises(ValueError):  # not a user error: a bug keeps its traceback
        with exit_on_user_error():
            raise ValueError("bug")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(UserError):  # the switch for bug reports
        with exit_on_user_error():
            raise UserError("a.tif: broken")
    assert capsys.readouterr().err == ""


def test_describe_keeps_the_project_message():
    assert describe(UserError("--mode must be dense or patch, got 'x'")) == "--mode must be dense or patch, got 'x'"
    assert describe(PermissionError(13, "Permission denied", "/root/x")) == "/root/x: Permission denied"


# ============================================================================= --help of every script
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_every_flag_with_default_and_choices(script, sandbox, monkeypatch, capsys):
    status, out, err = run_script(script, ["--help"], monkeypatch, capsys)
    assert status == 0 and err == "", err
    entries = {flag: text for flag, text in help_entries(out).items() if flag not in ("-h", "--config")}
    assert entries, out
    undocumented = [flag for flag, text in entries.items() if not text.split("(default: ")[0].strip()]
    assert not undocumented, f"{script}: flags without a description: {undocumented}"
    no_default = [flag for flag, text in entries.items() if "(default: " not in text]
    assert not no_default, f"{script}: flags without their default: {no_default}"
    cls = _config_class(script)
    if cls is None:  # an argparse script: checked above
        return
    choices, text = field_choices(cls), flat(out)
    for name, comment in field_comments(cls).items():
        flag = f"--{name.replace('_', '-')}"
        assert entries[flag].startswith(f"{flat(comment)} (default: "), f"{script}: {flag} lacks its comment"
        if name in choices:
            shown = "{" + ",".join(str(c) or "''" for c in choices[name]) + "}"
            assert f"{flag} {shown}" in text or f"{flag} [{shown} ...]" in text, f"{script}: {flag} lacks its choices"


# ============================================================================= bad arguments, in process
# script -> (arguments, what the one error line says): a mistyped flag, a value outside the
# choices, a missing, corrupt or unreadable input
NOT_A_CHECKPOINT = "random.pt: not a readable PyTorch checkpoint"
NOT_A_SLIDE = "random.tif: OpenSlide cannot read this file"
NO_STAIN_TARGET = "needs --stain-target FILE [FILE ...]"
WHITE_TARGET = "white.png: no tissue to fit stain statistics on"
GREY_TARGET = "grey.png: 1 channel(s) of grey (mode L)"
BAD_ARGUMENTS = {
    "camelyon/bench.py": [(["--slide", f"{MISSING}.tif"], f"{MISSING}.tif: slide not found"),
                          (["--slide", "random.tif"], NOT_A_SLIDE)],
    "camelyon/bench_mil.py": [(["--bag", "many"], "--bag: invalid int value: 'many'")],
    "camelyon/features.py": [(["--backbone", "vit9000"], "--backbone vit9000: unknown; one of camelyon"),
                             (["--backbone", "uni"], "--backbone uni: needs --weights"),
                             (["--backbone", "camelyon", "--weights", "random.pt"], NOT_A_CHECKPOINT),
                             (["--min-tissue", "0"], "--min-tissue must be in (0, 1], got 0")],
    "camelyon/mil.py": [(["--model", "transmil"], "--model must be abmil or clam_sb, got 'transmil'"),
                        (["--features", MISSING], f"{MISSING}: no such features folder"),
                        (["--folds", "1"], "--folds must be >= 2, got 1")],
    "camelyon/demo.py": [(["--size", "10"], "--size: expected 2 arguments"),
                         (["--sizes", "1", "2"], "--sizes 1 2: unknown argument")],
    "camelyon/eval.py": [(["--protocol", "monai"], "--protocol must be official or bundle, got 'monai'"),
                         (["--patch-list", MISSING, "--stain-normalize", "macenko", "--stain-target", f"{MISSING}.png"],
                          f"{MISSING}.png: image not found"),
                         (["--detections", MISSING, "--ground-truth", MISSING],
                          f"{MISSING}: detections folder not found"),
                         (["--detections", MISSING, "--ground-truth", MISSING, "--stain-normalize", "macenko"],
                          "--stain-normalize macenko: FROC mode scores maps, not images; pass it to camelyon/infer.py"),
                         (["--detections", MISSING, "--ground-truth", MISSING, "--stain-target", "ref.png"],
                          "--stain-target ref.png: FROC mode scores maps, not images; pass it to camelyon/infer.py")],
    "camelyon/infer.py": [(["--mode", "tiled"], "--mode must be dense or patch, got 'tiled'"),
                          (["--export", "xml"], "--export must be geojson or asap, got 'xml'"),
                          (["--slides", MISSING, "--checkpoint", f"{MISSING}.pt"], f"{MISSING}: no slide or folder"),
                          (["--slides", "random.tif", "--checkpoint", "random.pt"], NOT_A_CHECKPOINT),
                          (["--slides", MISSING, "--checkpoint", "random.pt", "--stain-normalize", "reinhard",
                            "--stain-target", "grey.png"], GREY_TARGET),
                          (["--slides", MISSING, "--checkpoint", "random.pt", "--stain-target", "white.png"],
                           "--stain-target white.png: needs --stain-normalize macenko or reinhard"),
                          (["--stain-fit", "region"], "--stain-fit must be tile or slide, got 'region'")],
    "camelyon/large_slide.py": [(["--root"], "--root: expected one argument"),
                                (["--sizes", "1", "2"], "--sizes 1 2: unknown argument")],
    "camelyon/prepare.py": [(["tissue-mask"], "tissue-mask: unknown command; expected tissue-masks or patch-list"),
                            (["tissue-masks", "--slides", "random.tif"], NOT_A_SLIDE),
                            (["patch-list", "--coords", MISSING], "--coords, --image-dir: patch-list needs")],
    "camelyon/train.py": [(["--bach-size", "3"], "--bach-size: unknown flag; did you mean --batch-size"),
                          (["--batch-size", "three"], "--batch-size: invalid int value: 'three'"),
                          (["--data-root", MISSING, "--pretrained", "none"],
                           f"{MISSING}/training.csv: patch list not found"),
                          (["--config", f"{MISSING}.json"], f"{MISSING}.json: config file not found"),
                          (["--train-list", "short_rows.csv", "--pretrained", "none"],
                           "short_rows.csv:1: expected 12 columns (slide,x,y,9 labels), got 3"),
                          (["--stain-augment", "hsv"], "--stain-augment must be none or hed, got 'hsv'"),
                          (["--stain-normalize", "macenko"], f"--stain-normalize macenko: {NO_STAIN_TARGET}"),
                          (["--stain-normalize", "macenko", "--stain-target", "white.png"], WHITE_TARGET)],
    "nuclick/bench.py": [(["--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'")],
    "nuclick/eval.py": [(["--split", "test"], "--split must be training or validation, got 'test'"),
                        (["--checkpoint", "random.pt"], NOT_A_CHECKPOINT),
                        (["--checkpoint", "random.pt", "--stain-normalize", "macenko", "--stain-target", "white.png"],
                         WHITE_TARGET)],
    "nuclick/export.py": [(["--formats", "tflite"], "--formats must be torchscript or onnx, got 'tflite'"),
                          (["--checkpoint", f"{MISSING}.pt"], f"{MISSING}.pt: checkpoint not found")],
    "nuclick/infer.py": [(["--axis-order", "xy"], "--axis-order must be '', hw or wh, got 'xy'"),
                         (["--image", f"{MISSING}.png", "--clicks", f"{MISSING}.csv", "--checkpoint", "random.pt"],
                          f"{MISSING}.png: image not found"),
                         (["--image", f"{MISSING}.png", "--clicks", f"{MISSING}.csv", "--checkpoint", "random.pt",
                           "--stain-normalize", "macenko", "--stain-target", "white.png"], WHITE_TARGET),
                         (["--image", f"{MISSING}.png", "--clicks", f"{MISSING}.csv", "--checkpoint", "random.pt",
                           "--stain-target", "grey.png"],
                          "--stain-target grey.png: needs --stain-normalize macenko or reinhard")],
    "nuclick/prepare.py": [(["--splits", "Valid"], "--splits must be Train or Test, got 'Valid'"),
                           (["--input", MISSING, "--output", "out"], f"{MISSING}: input folder not found")],
    "nuclick/train.py": [(["--axis-order", "xy"], "--axis-order must be hw or wh, got 'xy'"),
                         (["--data-root", MISSING], f"{MISSING}/dataset.json: data list not found"),
                         (["--stain-normalize", "reinhard"], f"--stain-normalize reinhard: {NO_STAIN_TARGET}"),
                         (["--stain-normalize", "reinhard", "--stain-target", "white.png"], WHITE_TARGET)],
    "pretrain/bench.py": [(["--methods", "swav"], "--methods must be simclr, moco, byol, dino or mae, got 'swav'")],
    "pretrain/convert.py": [(["random.pt", "--out", "x.pt"], NOT_A_CHECKPOINT),
                            (["--out", "x.pt"], "checkpoint: required, missing")],
    "pretrain/demo.py": [(["--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'")],
    "pretrain/eval.py": [(["--checkpoint", f"{MISSING}.pt"], f"{MISSING}.pt: checkpoint not found"),
                         (["--checkpoint", "random.pt", "--stain-normalize", "macenko", "--stain-target", "grey.png"],
                          GREY_TARGET)],
    "pretrain/export.py": [([MISSING, "--out", "x.pt"], f"{MISSING}: no checkpoint")],
    "pretrain/finetune.py": [(["--dataset", "pcam"], "--dataset must be pcam200, pcam_h5 or ptcga200, got 'pcam'"),
                             (["--data-root", MISSING], f"{MISSING}/train: PCam200 split folder not found"),
                             (["--stain-normalize", "macenko"], f"--stain-normalize macenko: {NO_STAIN_TARGET}"),
                             (["--stain-normalize", "macenko", "--stain-target", "white.png"], WHITE_TARGET)],
    "pretrain/pack.py": [([MISSING, "--out", "packed"], f"{MISSING}: PTCGA200 folder not found"),
                         ([MISSING, "--out", "packed", "--layout", "png"], "--layout must be ptcga200, pcam200")],
    "pretrain/ssl_demo.py": [(["--per-class", "3"], "--root: required, missing")],
    "pretrain/train.py": [(["--method", "swav"], "--method must be simclr, moco, byol, dino or mae, got 'swav'"),
                          (["--data-root", MISSING], f"{MISSING}: data_root is neither a pack root")],
    "segpanda/bench.py": [(["--models", "deeplabv3"], "--models: expected MODEL:BACKBONE, got 'deeplabv3'"),
                          (["--models", "deeplabv3:vit_small_patch16_224"], "does not fit model 'deeplabv3'")],
    "segpanda/eval.py": [(["--split", "valid"], "--split must be train, val or test, got 'valid'"),
                         (["--checkpoint", "random.pt"], NOT_A_CHECKPOINT),
                         (["--checkpoint", "random.pt", "--stain-normalize", "macenko", "--stain-target", "white.png"],
                          WHITE_TARGET)],
    "segpanda/train.py": [(["--model", "unet"], "--model must be deeplabv3, vit_upernet or vit_progressive"),
                          (["--data-root", MISSING, "--pretrained", "none"],
                           f"{MISSING}/train: split folder not found"),
                          (["--stain-normalize", "macenko"], f"--stain-normalize macenko: {NO_STAIN_TARGET}"),
                          (["--stain-normalize", "macenko", "--stain-target", "grey.png"], GREY_TARGET)],
    "spleen/bench.py": [(["--sw-mode", "linear"], "--sw-mode must be constant or gaussian, got 'linear'")],
    "spleen/eval.py": [(["--predictions", MISSING, "--labels", MISSING], f"{MISSING}: folder not found")],
    "spleen/infer.py": [(["--images", f"{MISSING}.nii.gz", "--checkpoint", "random.pt"],
                         f"{MISSING}.nii.gz: file not found"),
                        (["--images", "random.tif", "--checkpoint", "random.pt"], NOT_A_CHECKPOINT)],
    "spleen/train.py": [(["--sw-overlap", "1.5"], "--sw-overlap must be in [0, 1), got 1.5"),
                        (["--data-root", MISSING], f"{MISSING}/imagesTr: folder not found")],
    "tests/tiny_train.py": [(["--checkpoint-evry", "3"],
                             "--checkpoint-evry: unknown flag; did you mean --checkpoint-every")],
}
BAD_CASES = [(script, argv, fragment) for script, cases in BAD_ARGUMENTS.items() for argv, fragment in cases]


def test_every_script_has_bad_argument_cases():
    assert sorted(BAD_ARGUMENTS) == sorted(SCRIPTS)


@pytest.mark.parametrize("script, argv, fragment", BAD_CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_CASES])
def test_bad_argument_is_one_line_and_exit_status_2(script, argv, fragment, sandbox, monkeypatch, capsys):
    status, _, err = run_script(script, argv, monkeypatch, capsys)
    assert_one_line_error(status, err, fragment)


# ============================================================================= real processes
SUBPROCESS_CASES = [  # camelyon/train.py: tests/test_camelyon_init.py
    ("camelyon/infer.py", ["--mode", "tiled"], "--mode must be dense or patch"),
    ("spleen/infer.py", ["--images", f"{MISSING}.nii.gz", "--checkpoint", "x.pt"], f"{MISSING}.nii.gz: file not found"),
    ("nuclick/eval.py", ["--checkpoint", "random.pt"], NOT_A_CHECKPOINT),
]


def _run(script: str, argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = child_env(TORCH_HOME=str(cwd / "torch"), PATHMONO_CACHE=str(cwd / "cache"), **env)
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script, argv, fragment", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_process_prints_one_line_and_exits_2(script, argv, fragment, sandbox):
    proc = _run(script, argv, sandbox)
    assert_one_line_error(proc.returncode, proc.stderr, fragment)


def test_traceback_switch_keeps_the_traceback_for_bug_reports(sandbox):
    proc = _run("nuclick/eval.py", ["--checkpoint", "random.pt"], sandbox, **{TRACEBACK_ENV: "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert f"CheckpointError: {NOT_A_CHECKPOINT}" in proc.stderr


def _slide_error_on_main(ctx, out_dir):
    from common.wsi import open_slide

    try:
        dist.run_on_main(open_slide, f"{MISSING}.svs")
    except UserError as err:
        torch.save({"type": type(err).__name__, "msg": str(err)}, f"{out_dir}/err{ctx.rank}.pt")


def test_run_on_main_gives_every_process_the_same_user_error(tmp_path):
    run_workers(_slide_error_on_main, 2, str(tmp_path), timeout=90)
    errors = [torch.load(tmp_path / f"err{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert errors == [{"type": "SlideError", "msg": f"{MISSING}.svs: slide not found"},
                      {"type": "UserError", "msg": f"{MISSING}.svs: slide not found"}]


def test_error_in_spawned_workers_ends_with_one_line_and_status_2(tmp_path):
    """``--hosts`` launch: both workers find last.pt unreadable; the parent reports it once."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(bytes(range(256)) * 20)
    proc = _run("tests/tiny_train.py", ["--output-dir", str(run), "--hosts", socket.gethostname(), "--gpus-per-node",
                                        "2", "--master-port", str(free_port()), "--epochs", "1"], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, f"{run / 'last.pt'}: not a readable PyTorch checkpoint")
