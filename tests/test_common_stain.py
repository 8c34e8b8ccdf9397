"""common.stain: colour deconvolution against skimage and Macenko / Reinhard against torchstain on
real patches, self-normalisation, HED augmentation (reproducible, per channel, background kept),
fallback on tiles without tissue, StainTarget state and bad targets."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import torch
from PIL import Image
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from common.augment import make_generator
from common.errors import DataError
from common.image import read_image
from common.stain import (BACKGROUND_OD, HEDAugment, HEDParams, StainTarget, apply_hed,
                          background_mask, hed_to_rgb, macenko_stats, normalize_stain, reinhard_stats, rgb_to_hed,
                          rgb_to_od, sample_hed)

pytestmark = pytest.mark.usefixtures("one_thread")  # light on a shared 2-core machine

PATCHES = ("kather/kather1.tif", "kather/kather2.tif", "tiatoolbox/source_image.png")


@pytest.fixture
def patches(fixtures_dir) -> dict[str, torch.Tensor]:
    """The real H&E fixture patches as uint8 (3, H, W), by file name."""
    root = fixtures_dir / "patches"
    return {Path(p).name: torch.from_numpy(read_image(root / p)).permute(2, 0, 1) for p in PATCHES}


def crop(img: torch.Tensor, size: int) -> torch.Tensor:
    return img[:, :size, :size]


def tissue_of(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) bool: the channels of the non-background pixels."""
    return (~background_mask(x)).expand_as(x)


def torchstain_macenko(target: torch.Tensor):
    normalizer = TorchMacenkoNormalizer()
    normalizer.fit(target)
    return normalizer


# ----------------------------------------------------------------------------- colour deconvolution
def test_od_and_background_threshold_by_hand():
    x = torch.tensor([255.0, 255 * math.exp(-1), 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(rgb_to_od(x).flatten(), torch.tensor([0.0, 1.0, -math.log(1e-6)]), atol=1e-5)
    # 0.15 OD in every channel <=> every channel > 255 exp(-0.15) = 219.47
    pixels = torch.tensor([[220.0, 250, 230], [219.0, 250, 250], [255, 255, 255]]).T.reshape(1, 3, 1, 3)
    assert background_mask(pixels).flatten().tolist() == [True, False, True]
    assert background_mask(pixels / 255, bound=1.0).flatten().tolist() == [True, False, True]
    assert BACKGROUND_OD == 0.15


def test_hed_round_trip_on_fixture_patches(patches):
    for name, img in patches.items():
        x = img[None].float() / 255  # [0, 1] images, bound 1
        back = hed_to_rgb(rgb_to_hed(x, bound=1.0), bound=1.0)
        assert (back - x).abs().max() <= 1 / 255, name
        back255 = hed_to_rgb(rgb_to_hed(img[None]))
        assert (back255 - img).abs().max() <= 1, name


def test_hed_matches_skimage_on_fixture_patches(patches):
    for name, img in patches.items():
        expected = skimage.color.rgb2hed(img.permute(1, 2, 0).numpy())  # clipped at 0 by skimage
        ours = rgb_to_hed(img[None].double())[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.maximum(ours, 0), expected, atol=1e-7, err_msg=name)
        # and back: skimage's hed2rgb of its own HED
        rgb = hed_to_rgb(torch.from_numpy(expected).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(rgb, skimage.color.hed2rgb(expected) * 255, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- Macenko vs torchstain
def test_macenko_per_tile_fit_in_a_batch_matches_torchstain(patches):
    tiles = torch.stack([crop(img, 224) for img in patches.values()])  # (3, 3, 224, 224)
    he, max_conc, ok = macenko_stats(tiles)
    assert ok.all()
    for i, name in enumerate(patches):
        ref = torchstain_macenko(tiles[i])
        torch.testing.assert_close(he[i], ref.HERef, atol=2e-3, rtol=0, msg=name)
        torch.testing.assert_close(max_conc[i], ref.maxCRef, atol=0, rtol=2e-3, msg=name)


def test_macenko_normalised_tiles_match_torchstain(patches):
    k1, k2, tia = (crop(img, 224) for img in patches.values())
    target = StainTarget.fit(k1)
    torch.testing.assert_close(target.stain_matrix, torchstain_macenko(k1).HERef, atol=2e-3, rtol=0)
    x = torch.stack([k2, tia]).float()
    out = normalize_stain(x, target)  # per-tile fit, batched
    for i, img in enumerate((k2, tia)):
        expected, _, _ = torchstain_macenko(k1).normalize(img, stains=False)  # (H, W, 3) int, truncated
        diff = (out[i].permute(1, 2, 0) - expected.float())[tissue_of(x[i:i + 1])[0].permute(1, 2, 0)]
        # ours recomposes Io exp(-OD) - 1 (the exact inverse of Macenko's OD = -ln((I + 1) / Io)),
        # torchstain Io exp(-OD) truncated to an integer: ours - torchstain in (-1, 0] up to the fit
        assert -1.05 < diff.min() and diff.max() < 0.05, (diff.min(), diff.max())
        assert diff.abs().mean() < 0.7
    bg = ~tissue_of(x)
    assert torch.equal(out[bg], x[bg])


def test_fit_over_several_files_is_the_fit_of_their_pixels_together(fixtures_dir, patches):
    files = [fixtures_dir / "patches" / p for p in PATCHES[:2]]
    together = StainTarget.from_files(files)
    ref = torchstain_macenko(torch.cat([patches["kather1.tif"], patches["kather2.tif"]], dim=2))  # side by side
    torch.testing.assert_close(together.stain_matrix, ref.HERef, atol=2e-3, rtol=0)
    torch.testing.assert_close(together.max_conc, ref.maxCRef, atol=0, rtol=2e-3)
    one = StainTarget.from_files(files[0])
    assert torch.equal(one.stain_matrix, StainTarget.fit(patches["kather1.tif"]).stain_matrix)
    assert not torch.allclose(one.stain_matrix, together.stain_matrix, atol=1e-3)
    assert str(files[0]) in together.source and str(files[1]) in together.source


def test_reinhard_statistics_match_torchstain_on_the_tissue(patches):
    for name, img in patches.items():
        x = img[None].float()
        mean, std, ok = reinhard_stats(x)
        tissue = ~background_mask(x)[0, 0].flatten()
        ref = TorchReinhardNormalizer()
        ref.fit(img.reshape(3, -1)[:, tissue].reshape(3, 1, -1))  # torchstain has no mask: give it the tissue
        assert ok.all()
        torch.testing.assert_close(mean[0], ref.target_means, atol=2e-2, rtol=0, msg=name)
        torch.testing.assert_close(std[0], ref.target_stds, atol=2e-2, rtol=0, msg=name)


# ----------------------------------------------------------------------------- self-normalisation
def test_reinhard_to_own_statistics_is_the_identity(patches):
    for name, img in patches.items():
        x = img[None].float()
        out = normalize_stain(x, StainTarget.fit(img, "reinhard"))
        assert (out - x).abs().max() < 0.01, name


def test_macenko_to_own_statistics_keeps_an_image_of_two_stains():
    """An image made of two stains only (its OD lies in their plane, with pure-stain pixels dark
    enough to pass Macenko's beta in every channel) gives back those stains and itself."""
    gen = torch.Generator().manual_seed(0)
    he = TorchMacenkoNormalizer().HERef  # (3, 2) Macenko's reference H and E OD unit vectors
    conc = 0.3 + 1.2 * torch.rand(2, 48 * 48, generator=gen)
    conc[1, :500] = 0  # pure H and pure E pixels: the extreme angles are the stains' own
    conc[0, 500:1000] = 0
    x = (240 * torch.exp(-(he @ conc)) - 1).view(1, 3, 48, 48)  # Macenko's Io = 240
    target = StainTarget.fit(x)
    torch.testing.assert_close(target.stain_matrix, he, atol=2e-3, rtol=0)
    out = normalize_stain(x, target)
    assert (out - x).abs().max() < 0.05


def test_macenko_to_own_statistics_changes_real_patches_little(patches):
    """On real patches Macenko keeps only the OD in the H&E plane: a few levels of 255 change, as
    with torchstain (whose self-normalisation changes these patches by 1.9-4.9 levels on average)."""
    for name, img in patches.items():
        x = img[None].float()
        out = normalize_stain(x, StainTarget.fit(img))
        change = (out - x).abs()[tissue_of(x)]
        assert change.mean() < 5.5, (name, change.mean())


def test_per_slide_source_is_the_per_tile_fit_for_one_tile(patches):
    x = crop(patches["kather2.tif"], 96)[None].float()
    for method in ("macenko", "reinhard"):
        target = StainTarget.fit(patches["kather1.tif"], method)
        once = normalize_stain(x, target, source=target.fit_source(x))
        torch.testing.assert_close(once, normalize_stain(x, target), atol=1e-2, rtol=0)
    other = StainTarget.fit(x, "macenko", beta=0.2)
    with pytest.raises(ValueError, match="fit_source"):
        normalize_stain(x, StainTarget.fit(x), source=other)


def test_bound_and_dtype_conventions(patches):
    """[0, 1] images with bound 1 give the [0, 255] results / 255; uint8 and half give float32."""
    img = crop(patches["kather2.tif"], 32)[None]
    params = sample_hed(1, make_generator(0), sigma=0.2, bias=0.1)
    torch.testing.assert_close(apply_hed(img.float() / 255, params, bound=1.0), apply_hed(img.float(), params) / 255)
    assert apply_hed(img, params).dtype == torch.float32
    for method in ("macenko", "reinhard"):
        target = StainTarget.fit(patches["kather1.tif"], method)
        ref = normalize_stain(img.float(), target)
        torch.testing.assert_close(normalize_stain(img.float() / 255, target, bound=1.0), ref / 255,
                                   atol=1e-4, rtol=0)
        assert torch.equal(normalize_stain(img, target), ref)
        assert normalize_stain(img.half(), target).dtype == torch.float32


# ----------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_tiles_without_tissue_warn_once_per_batch_and_keep_the_others(patches, method):
    tissue = crop(patches["kather2.tif"], 64).float()
    white = torch.full((3, 64, 64), 255.0)
    speck = white.clone()
    speck[:, :4, :4] = tissue[:, :4, :4]  # 16 tissue pixels: too few to fit on
    x = torch.stack([white, tissue, white - 10, speck, white])
    target = StainTarget.fit(patches["kather1.tif"], method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = normalize_stain(x, target)
    assert len(caught) == 1 and "too little tissue" in str(caught[0].message)
    assert out.isfinite().all()
    for i in (0, 2, 4):
        assert torch.equal(out[i], x[i])  # all background
    torch.testing.assert_close(out[1], normalize_stain(x[1:2], target)[0])  # fitted on its own pixels only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        normalize_stain(x[1:2], target)
    assert not caught


# ----------------------------------------------------------------------------- HED augmentation
def test_sample_hed_ranges_and_replay():
    params = sample_hed(2000, make_generator(1, 0, 5), sigma=0.2, bias=0.1)
    assert params.alpha.shape == params.beta.shape == (2000, 3)
    assert params.alpha.min() >= 0.8 and params.alpha.max() <= 1.2 and params.alpha.std() > 0.1
    assert params.beta.min() >= -0.1 and params.beta.max() <= 0.1 and params.beta.std() > 0.05
    again = sample_hed(2000, make_generator(1, 0, 5), sigma=0.2, bias=0.1)
    assert torch.equal(params.alpha, again.alpha) and torch.equal(params.beta, again.beta)
    off = sample_hed(50, make_generator(0), p=0.0)
    assert off.alpha.eq(1).all() and off.beta.eq(0).all()


def test_hed_augment_same_keys_same_output_other_step_differs(patches):
    x = torch.stack([crop(img, 32) for img in patches.values()]).float()
    hed = HEDAugment(p=1.0)
    a, b = hed(x, make_generator(7, 1, 30)), hed(x, make_generator(7, 1, 30))
    assert torch.equal(a, b)
    c = hed(x, make_generator(7, 1, 31))
    assert not torch.allclose(a, c, atol=0.5)
    assert not torch.allclose(a, x, atol=0.5)


def test_hed_augment_zero_strength_and_off_default_are_the_identity(patches):
    x = torch.stack([crop(img, 32) for img in patches.values()]).float()
    zero = sample_hed(len(x), make_generator(0), sigma=0.0, bias=0.0)
    assert torch.equal(apply_hed(x, zero), x)
    gen = make_generator(3)
    state = gen.get_state()
    off = HEDAugment()
    assert not off.enabled and off(x, gen) is x
    assert torch.equal(gen.get_state(), state)  # nothing drawn: the rest of a recipe is unchanged
    assert torch.equal(HEDAugment(p=1.0, sigma=0.0, bias=0.0)(x, gen), x)


def test_hed_augment_leaves_background_pixels_unchanged(patches):
    x = crop(patches["kather2.tif"], 32)[None].float().repeat(2, 1, 1, 1)
    x[:, :, :, :12] = torch.linspace(221, 255, 12)  # near-white columns
    out = HEDAugment(p=1.0, sigma=0.3, bias=0.2)(x, make_generator(0))
    bg = background_mask(x).expand_as(x)
    assert bg[:, :, :, :12].all() and not bg[:, :, :, 12:].all()
    assert torch.equal(out[bg], x[bg])
    assert (out - x)[~bg].abs().mean() > 2


def test_hed_augment_acts_on_the_chosen_stain_channel_of_each_sample(patches):
    """Sample 0: H scaled by 1.3; sample 1: E shifted by 0.03. The HED of the output differs from the
    input's only there (pixels clipped to [0, 255] in the output excepted)."""
    x = crop(patches["kather2.tif"], 48)[None].float().repeat(2, 1, 1, 1)
    params = HEDParams(alpha=torch.tensor([[1.3, 1, 1], [1, 1, 1]], dtype=torch.float64),
                       beta=torch.tensor([[0, 0, 0], [0, 0.03, 0]], dtype=torch.float64))
    out = apply_hed(x, params)
    hed_in, hed_out = rgb_to_hed(x.double()), rgb_to_hed(out.double())
    inside = ((out > 0) & (out < 255)).all(1) & ~background_mask(x)[:, 0]  # (2, H, W)
    assert inside.float().mean() > 0.8
    expected = hed_in * params.alpha.view(2, 3, 1, 1) + params.beta.view(2, 3, 1, 1)
    for b in range(2):
        for c in range(3):
            err = (hed_out[b, c] - expected[b, c])[inside[b]].abs().max()
            assert err < 1e-4, (b, c, float(err))
    assert (hed_out[0, 0] - hed_in[0, 0])[inside[0]].abs().mean() > 0.01  # H of sample 0 did change


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_target_state_round_trip_with_weights_only(tmp_path, patches, method):
    target = StainTarget.fit(patches["kather1.tif"], method, beta=0.2, source="kather1")
    torch.save({"stain": target.to_state()}, tmp_path / "ckpt.pt")
    loaded = StainTarget.from_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["stain"])
    for key, value in target.to_state().items():
        got = getattr(loaded, key)
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key
    x = crop(patches["kather2.tif"], 32)[None].float()
    assert torch.equal(normalize_stain(x, loaded), normalize_stain(x, target))


def test_stain_target_bad_states_are_data_errors(patches):
    state = StainTarget.fit(patches["kather1.tif"]).to_state()
    for bad in ({**state, "stain_matrix": torch.zeros(3, 3)}, {**state, "method": "vahadane"},
                {**state, "colour": 1.0}, {k: v for k, v in state.items() if k != "max_conc"}):
        with pytest.raises(DataError, match="stain target state"):
            StainTarget.from_state(bad)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_bad_target_files_name_the_file_and_the_problem(tmp_path, patches, method):
    rgb = patches["kather1.tif"].permute(1, 2, 0).numpy()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    only_alpha = np.dstack([np.zeros_like(rgb), 255 - grey])  # RGB all black, the picture in alpha
    cases = {
        _save(tmp_path / "white.png", np.full((64, 64, 3), 250, np.uint8)): (DataError, "no tissue"),
        _save(tmp_path / "grey.png", grey): (DataError, "1 channel"),
        _save(tmp_path / "grey_rgb.png", np.dstack([grey] * 3)): (DataError, "no colour"),
        _save(tmp_path / "only_alpha.png", only_alpha, "RGBA"): (DataError, "alpha"),
        tmp_path / "missing.png": (FileNotFoundError, "not found"),
    }
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    cases[tmp_path / "garbage.png"] = (OSError, "not a readable image")
    good = _save(tmp_path / "good.png", rgb)
    for path, (error, problem) in cases.items():
        with pytest.raises(error) as info:
            StainTarget.from_files([good, path], method)
        assert str(path) in str(info.value) and problem in str(info.value), str(info.value)
    assert StainTarget.from_files(good, method).source == str(good)


def test_bad_target_tensors():
    with pytest.raises(DataError, match="no tissue"):
        StainTarget.fit(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8), source="white tiles")
    with pytest.raises(ValueError, match="RGB"):
        StainTarget.fit(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="method"):
        StainTarget.fit(torch.zeros(1, 3, 8, 8), "vahadane")
