"""spleen inference beyond the bundle's sliding window: the whole-volume mode (exact when one window
covers the volume, blocks with a receptive-field halo equal one pass, agreement with the sliding
window on the real CT fixture), the inference-time model (folded BatchNorm, channels-last), and a
folder run that is killed and restarted without redoing finished volumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from common.checkpoint import save_training_state
from spleen.config import InferConfig
from spleen.infer import run
from spleen.model import RECEPTIVE_RADIUS, UNet, build_model, predict_logits, prepare_for_inference
from spleen.transforms import preprocess_image, preprocess_label, read_volume

CT = ("ct", "totalsegmentator")
# Measured with the fitted network below (200 steps, 2 threads): Dice with the spleen mask 0.32,
# voxel agreement whole volume vs sliding window 0.992, Dice between their masks 0.857.
AGREEMENT_STEPS, MIN_FIT_DICE, MIN_VOXEL_AGREEMENT, MIN_MASK_DICE = 200, 0.25, 0.98, 0.8


def _bundle_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    model = build_model()
    for m in model.modules():  # non-trivial statistics, so folding them is a real test
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_whole_volume_equals_the_sliding_window_when_one_window_covers_the_volume():
    model = _bundle_unet(0)
    x = torch.rand(1, 1, 90, 70, 41)
    with torch.no_grad():
        windowed = predict_logits(model, x, (96, 96, 96), sw_batch_size=4, overlap=0.5)
        whole = predict_logits(model, x, (96, 96, 96), prediction="whole_volume")
    assert torch.equal(whole, windowed)


def test_blocks_with_a_receptive_field_halo_equal_one_pass():
    model = _bundle_unet(1)
    x = torch.rand(1, 1, 256, 48, 32)
    with torch.no_grad():
        one_pass = predict_logits(model, x, (96, 96, 96), prediction="whole_volume")
        blocks = predict_logits(model, x, (96, 96, 96), prediction="whole_volume", block_size=[64, 0, 0],
                                halo=RECEPTIVE_RADIUS)
        thin = predict_logits(model, x, (96, 96, 96), prediction="whole_volume", block_size=[64, 0, 0], halo=0)
    torch.testing.assert_close(blocks, one_pass, rtol=0, atol=1e-5)
    assert (thin - one_pass).abs().max() > 1e-3  # without the halo the block borders show


def test_folded_batchnorm_and_channels_last_change_logits_only_by_rounding():
    model = _bundle_unet(2)
    fast = prepare_for_inference(model, channels_last=True, fold_batchnorm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())  # the original is untouched
    x = torch.rand(2, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), model(x),
                                   rtol=1e-4, atol=1e-5)


def _fit_to_fixture(x: torch.Tensor, y: torch.Tensor, steps: int) -> UNet:
    """A small UNet fitted for a few steps to the real CT and its spleen mask (crops of 32^3, 3 of 4
    centred on spleen): a network whose logits are shaped by real anatomy, unlike random weights."""
    from spleen.model import DiceCELoss

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = UNet(channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    opt, loss_fn, r = torch.optim.Adam(model.parameters(), 1e-2), DiceCELoss(), 32
    spleen = torch.nonzero(y > 0)
    for _ in range(steps):
        xs, ys = [], []
        for i in range(4):
            centre = (spleen[torch.randint(len(spleen), (1,), generator=gen)][0] if i % 4 != 3 else
                      torch.tensor([int(torch.randint(s, (1,), generator=gen)) for s in x.shape]))
            box = tuple(slice(a, a + r) for a in (min(max(int(c) - r // 2, 0), s - r) for c, s in zip(centre, x.shape)))
            xs.append(x[box])
            ys.append(y[box])
        loss = loss_fn(model(torch.stack(xs)[:, None]), torch.stack(ys)[:, None].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_whole_volume_agrees_with_the_sliding_window_on_the_real_ct(fixtures_dir):
    data, affine, _ = read_volume(fixtures_dir.joinpath(*CT, "example_ct_sm.nii.gz"))
    seg, _, _ = read_volume(fixtures_dir.joinpath(*CT, "example_seg.nii.gz"))
    x, _ = preprocess_image(data, affine)  # (243, 201, 44) at the bundle's spacing
    y, _ = preprocess_label((seg == 1).astype(np.uint8), affine)
    model = _fit_to_fixture(x, y, steps=AGREEMENT_STEPS)
    with torch.no_grad():
        windowed = predict_logits(model, x[None, None], (48, 48, 48), sw_batch_size=4, overlap=0.5)[0].argmax(0)
        whole = predict_logits(model, x[None, None], (48, 48, 48), prediction="whole_volume")[0].argmax(0)
    assert _dice(windowed == 1, y > 0) > MIN_FIT_DICE  # the network did learn the spleen
    assert float((windowed == whole).float().mean()) > MIN_VOXEL_AGREEMENT
    assert _dice(windowed == 1, whole == 1) > MIN_MASK_DICE


# ----------------------------------------------------------------------------- restartable folder runs
@pytest.fixture
def folder_run(tmp_path, fixtures_dir):
    """Three small real CT volumes, a tiny checkpoint, and an infer config over them."""
    import nibabel as nib

    img = nib.load(str(fixtures_dir.joinpath(*CT, "example_ct_sm.nii.gz")))
    data = np.asarray(img.dataobj)
    (tmp_path / "in").mkdir()
    for k, (lo, hi) in enumerate([(0, 40), (30, 70), (60, 100)]):
        nib.save(nib.Nifti1Image(data[lo:hi, 20:60, 10:26], img.affine), str(tmp_path / "in" / f"case_{k}.nii.gz"))
    torch.manual_seed(0)
    model = UNet(channels=[2, 4, 8], strides=[2, 2], num_res_units=1)
    save_training_state(tmp_path / "tiny.pt", model=model, epoch=1, step=1,
                        config=dict(channels=[2, 4, 8], strides=[2, 2], num_res_units=1))
    cfg = InferConfig(images=str(tmp_path / "in"), checkpoint=str(tmp_path / "tiny.pt"), device="cpu",
                      output_dir=str(tmp_path / "out"), roi_size=[32, 32, 32], preview=False)
    return cfg


def _computed(cfg: InferConfig, monkeypatch) -> list[str]:
    """Run inference; return the names of the volumes it actually segmented."""
    import spleen.infer as infer

    done, segment = [], infer.segment

    def counting(model, data, affine, cfg_, device, amp=None, desc=""):
        done.append(desc)
        return segment(model, data, affine, cfg_, device, amp, desc=desc)

    monkeypatch.setattr(infer, "segment", counting)
    results = run(cfg)
    assert sorted(r["name"] for r in results) == ["case_0", "case_1", "case_2"]
    return done


def test_a_killed_folder_run_restarts_without_redoing_finished_volumes(folder_run, tmp_path, monkeypatch):
    # a real SIGKILL while the second volume is being segmented
    (tmp_path / "cfg.json").write_text(json.dumps(folder_run.to_dict()))
    script = textwrap.dedent(f"""
        import json, os, signal
        import spleen.infer as infer
        from spleen.config import InferConfig
        calls, segment = [], infer.segment
        def killing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return segment(*args, **kwargs)
        infer.segment = killing
        infer.run(InferConfig(**json.loads(open({str(tmp_path / "cfg.json")!r}).read())))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / ".finished").iterdir()) == ["case_0.json"]
    first = (out / "case_0_seg.nii.gz").stat().st_mtime_ns
    assert not (out / "case_1_seg.nii.gz").exists()  # the volume in progress left no output
    assert _computed(folder_run, monkeypatch) == ["case_1", "case_2"]
    assert (out / "case_0_seg.nii.gz").stat().st_mtime_ns == first
    summary = json.loads((out / "inference.json").read_text())
    assert [s.get("skipped", False) for s in summary] == [True, False, False]
    assert _computed(folder_run, monkeypatch) == []  # everything finished: nothing to do


def test_changed_settings_checkpoint_input_or_outputs_redo_the_volumes(folder_run, tmp_path, monkeypatch):
    assert len(_computed(folder_run, monkeypatch)) == 3
    folder_run.sw_overlap = 0.25  # an output-shaping setting
    assert len(_computed(folder_run, monkeypatch)) == 3
    folder_run.sw_batch_size = 2  # not output-shaping: nothing redone
    assert _computed(folder_run, monkeypatch) == []
    (tmp_path / "out" / "case_1_seg.nii.gz").unlink()  # a lost output
    assert _computed(folder_run, monkeypatch) == ["case_1"]
    torch.manual_seed(1)  # another checkpoint under the same name
    save_training_state(tmp_path / "tiny.pt", model=UNet(channels=[2, 4, 8], strides=[2, 2], num_res_units=1),
                        epoch=1, step=1, config=dict(channels=[2, 4, 8], strides=[2, 2], num_res_units=1))
    assert len(_computed(folder_run, monkeypatch)) == 3
    folder_run.overwrite = True
    assert len(_computed(folder_run, monkeypatch)) == 3
