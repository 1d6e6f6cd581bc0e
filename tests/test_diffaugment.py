"""DiffAugment: identity, per-op behaviour against the official formulas, gradients, reproducibility, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_finetune.transfer.diffaugment import DiffAugment


def images(n: int = 8, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """Reference translation by slicing: out[i, j] = x[i + dy, j + dx], ``fill`` outside."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    out[..., max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = x[
        ..., max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


@pytest.mark.parametrize("policy", ["", [], " "])
def test_empty_policy_is_identity(policy):
    x = images()
    assert torch.equal(DiffAugment(policy)(x, seeded()), x)


def test_unknown_policy_and_bad_ratios_raise():
    expected = r"unknown policy \['colour'\]; choose from \['color', 'cutout', 'translation'\]"
    with pytest.raises(ValueError, match=expected):
        DiffAugment("colour,translation")
    with pytest.raises(ValueError, match="ratios must lie in"):
        DiffAugment(cutout_ratio=1.5)
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\)"):
        DiffAugment()(torch.zeros(28, 28))


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_op_changes_images_and_keeps_shape_and_dtype(policy, dtype):
    x = images(channels=3).to(dtype)
    out = DiffAugment(policy)(x, seeded())
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    changed = (out != x).flatten(1).any(1)
    assert changed.float().mean() >= 0.75  # (a translation may draw a zero shift for an image)


def test_color_matches_the_official_formulas_on_grayscale():
    """One channel: saturation is a no-op, so out = c * (x - mean) + mean + b, per image."""
    x = images(n=32)
    out = DiffAugment("color")(x, seeded())
    mean_x, mean_out = x.mean((1, 2, 3)), out.mean((1, 2, 3))
    brightness = mean_out - mean_x
    centred_x, centred_out = x - mean_x[:, None, None, None], out - mean_out[:, None, None, None]
    contrast = centred_out.flatten(1).norm(dim=1) / centred_x.flatten(1).norm(dim=1)
    rebuilt = contrast[:, None, None, None] * centred_x + mean_out[:, None, None, None]
    torch.testing.assert_close(out, rebuilt, atol=1e-5, rtol=1e-5)
    assert brightness.abs().max() <= 0.5 and brightness.std() > 0.1  # U(-0.5, 0.5), drawn per image
    assert contrast.min() >= 0.5 and contrast.max() <= 1.5 and contrast.std() > 0.1  # U(0.5, 1.5)


def test_color_changes_saturation_of_rgb():
    x = images(n=32, channels=3)
    out = DiffAugment("color")(x, seeded())
    # brightness moves the image mean by U(-0.5, 0.5); saturation and contrast keep it
    shift = out.mean((1, 2, 3)) - x.mean((1, 2, 3))
    assert shift.abs().max() <= 0.5 + 1e-6
    # saturation scales each pixel's deviation from its channel mean by U(0, 2) (times contrast)
    dev_x = x - x.mean(1, keepdim=True)
    dev_out = out - out.mean(1, keepdim=True)
    ratio = dev_out.flatten(1).norm(dim=1) / dev_x.flatten(1).norm(dim=1)
    assert ratio.max() <= 2 * 1.5 + 1e-4 and ratio.std() > 0.2


def test_translation_shifts_each_image_by_its_own_offset():
    x = images(n=32, size=28)
    fill = -1.0
    out = DiffAugment("translation", translation_ratio=0.125, fill=fill)(x, seeded())
    max_shift = 4  # round(28 * 0.125)
    offsets = []
    for xi, oi in zip(x, out):
        matches = [
            (dy, dx)
            for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1)
            if torch.equal(oi, shifted(xi, dy, dx, fill))
        ]
        assert len(matches) == 1, "each output must be its input shifted by one offset within the ratio"
        offsets.append(matches[0])
    assert len(set(offsets)) > 8  # per image, not one shift for the whole batch
    for axis in (0, 1):  # both directions, across most of the range
        values = {o[axis] for o in offsets}
        assert min(values) < 0 < max(values) and len(values) >= 6


def test_translation_fill_value():
    x = torch.ones(16, 1, 8, 8)
    out = DiffAugment("translation", translation_ratio=0.25, fill=0.0)(x, seeded())
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_cutout_blanks_one_square_of_the_expected_size_per_image():
    x = torch.ones(64, 3, 28, 28)
    out = DiffAugment("cutout", cutout_ratio=0.5)(x, seeded())
    size = 14  # round(28 * 0.5)
    blank = out == -1.0
    assert torch.equal(blank.all(1), blank.any(1))  # all channels blanked together
    corners, full = set(), 0
    for mask in blank[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        h, w = bottom - top + 1, right - left + 1
        assert mask.sum() == h * w  # a filled rectangle
        assert h <= size and w <= size
        assert h == size or top == 0 or bottom == 27  # only the border clips the square
        assert w == size or left == 0 or right == 27
        full += h * w == size * size
        corners.add((top, left))
    assert full >= 10  # many squares lie fully inside: area ratio**2 of the image
    assert len(corners) > 20  # placed per image
    assert (out[~blank] == 1.0).all()  # the rest is untouched


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradients_flow_to_the_input(policy):
    x = images(channels=3).requires_grad_(True)
    weights = torch.randn(x.shape, generator=seeded(1))
    (DiffAugment(policy)(x, seeded()) * weights).sum().backward()
    per_image = x.grad.flatten(1).abs().sum(1)
    assert (per_image > 0).all()


def test_gradients_flow_to_a_generator_under_bf16_autocast():
    """G -> DiffAugment -> D, as in the G step; bf16 autocast on the CPU."""
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(8, 3 * 16 * 16), torch.nn.Unflatten(1, (3, 16, 16)), torch.nn.Tanh())
    d = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = g(torch.randn(4, 8))
        aug = DiffAugment()(fake, seeded())
        loss = F.softplus(-d(aug)).mean()
    assert aug.dtype == fake.dtype == torch.bfloat16
    loss.backward()
    assert g[0].weight.grad.abs().sum() > 0


def test_reproducible_with_a_seeded_generator():
    x = images(channels=3)
    aug = DiffAugment()
    state = torch.get_rng_state()
    first, again = aug(x, seeded(7)), aug(x, seeded(7))
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert not torch.equal(first, aug(x, seeded(8)))
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    assert torch.equal(a, aug(x))  # without a generator: the global RNG


def test_ops_follow_the_policy_order():
    x = images(channels=3)
    assert not torch.equal(DiffAugment("color,cutout")(x, seeded()), DiffAugment("cutout,color")(x, seeded()))
    assert DiffAugment(["translation", "cutout"]).policy == ("translation", "cutout")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_with_cpu_or_cuda_generator():
    x = images(channels=3).cuda().requires_grad_(True)
    aug = DiffAugment()
    cpu, cuda = aug(x, seeded(5)), aug(x, torch.Generator("cuda").manual_seed(5))
    assert cpu.device == cuda.device == x.device
    assert torch.equal(aug(x, seeded(5)), cpu)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = aug(x.to(torch.bfloat16), seeded(5))
    assert out.dtype == torch.bfloat16
    cpu.sum().backward()
    assert x.grad.abs().sum() > 0
