"""DCGAN generator and discriminator: shapes, conditioning, named blocks, errors, init, a training sanity check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_finetune.nets import DCGANDiscriminator, DCGANGenerator, dcgan_init_

WIDTH = 8  # tiny nets: every test runs in well under a second on one CPU thread


def labels(n: int, num_classes: int | None, seed: int = 0) -> torch.Tensor | None:
    if num_classes is None:
        return None
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 5])
def test_shapes_and_ranges(image_size, channels, num_classes):
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, image_size=image_size, channels=channels, width=WIDTH, num_classes=num_classes)
    d = DCGANDiscriminator(image_size=image_size, channels=channels, width=WIDTH, num_classes=num_classes)
    y = labels(6, num_classes)
    x = g(torch.randn(6, 16), y)
    assert x.shape == (6, channels, image_size, image_size)
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 1e-3  # not a constant image
    logits = d(x, y)
    assert logits.shape == (6,)
    assert torch.isfinite(logits).all()
    assert d.features(x, y).shape == (6, d.num_features)


def test_generator_output_is_bounded_for_any_weights():
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, width=WIDTH)
    with torch.no_grad():
        g.to_image.conv.weight.mul_(1e3)  # pre-activations far outside [-1, 1]
        x = g(torch.randn(4, 16))
    assert x.min() >= -1 and x.max() <= 1
    assert x.abs().amax() > 0.99  # saturated: the bound comes from tanh, not from small weights


@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_discriminator_is_differentiable(conditioning):
    torch.manual_seed(0)
    d = DCGANDiscriminator(width=WIDTH, num_classes=3, conditioning=conditioning)
    x = torch.rand(4, 1, 28, 28, requires_grad=True) * 2 - 1
    x.retain_grad()
    loss = F.softplus(-d(x, torch.tensor([0, 1, 2, 0]))).mean()
    loss.backward()
    assert x.grad.abs().sum() > 0
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_generator_conditioning_changes_images():
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, width=WIDTH, num_classes=4).eval()
    z = torch.randn(4, 16)
    same = torch.tensor([0, 1, 2, 3])
    assert torch.equal(g(z, same), g(z, same.clone()))  # deterministic, so the difference below is the label
    diff = (g(z, same) - g(z, torch.tensor([1, 2, 3, 0]))).flatten(1).abs().amax(1)
    assert (diff > 1e-4).all()


@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_discriminator_conditioning_changes_logits(conditioning):
    torch.manual_seed(0)
    d = DCGANDiscriminator(width=WIDTH, num_classes=4, conditioning=conditioning).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    same = torch.tensor([0, 1, 2, 3])
    assert torch.equal(d(x, same), d(x, same.clone()))
    diff = (d(x, same) - d(x, torch.tensor([1, 2, 3, 0]))).abs()
    assert (diff > 1e-6).all()
    if conditioning == "concat":
        assert d.blocks[0].conv.in_channels == 1 + 4  # one-hot maps are part of the input
        assert d.embed is None
    else:
        assert d.blocks[0].conv.in_channels == 1
        assert d.embed.weight.shape == (4, d.num_features)


def test_unconditional_nets_ignore_conditioning_argument():
    d = DCGANDiscriminator(width=WIDTH, conditioning="concat")
    assert d.conditioning is None and d.blocks[0].conv.in_channels == 1


def test_named_blocks():
    g = DCGANGenerator(width=WIDTH, num_classes=3)
    assert [n for n, _ in g.named_children()] == ["embed", "project", "blocks", "to_image"]
    assert [n for n, _ in DCGANGenerator(width=WIDTH).named_children()] == ["project", "blocks", "to_image"]
    for size, n_blocks in [(28, 2), (32, 3), (64, 4)]:
        d = DCGANDiscriminator(image_size=size, width=WIDTH, num_classes=3)
        assert [n for n, _ in d.named_children()] == ["blocks", "embed", "head"]
        assert len(d.blocks) == n_blocks
        names = {n for n, _ in d.named_modules()}
        assert {f"blocks.{i}" for i in range(n_blocks)} <= names
        # widths double from the input side up
        assert [d.get_submodule(f"blocks.{i}.conv").out_channels for i in range(n_blocks)] == [
            WIDTH * 2**i for i in range(n_blocks)
        ]
        # DCGAN paper: no BatchNorm in the first D block, BatchNorm in the others, LeakyReLU(0.2)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in d.blocks[0].modules())
        assert all(isinstance(b.bn, nn.BatchNorm2d) for b in d.blocks[1:])
        assert all(b.act.negative_slope == 0.2 for b in d.blocks)
        g = DCGANGenerator(image_size=size, width=WIDTH)
        assert len(g.blocks) == n_blocks - 1  # plus `project` and `to_image`
        assert all(isinstance(m, nn.BatchNorm2d) for m in (g.project.bn, *(b.bn for b in g.blocks)))
        # the widest map (next to the image) has `width` channels in both nets
        assert g.to_image.conv.in_channels == WIDTH


def test_freezing_by_name_selects_the_lowest_blocks():
    d = DCGANDiscriminator(image_size=32, width=WIDTH)
    frozen = [d.get_submodule(name) for name in ("blocks.0", "blocks.1")]
    for m in frozen:
        m.requires_grad_(False)
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.2.conv.weight", "blocks.2.bn.weight", "blocks.2.bn.bias", "head.weight", "head.bias"}


def test_spectral_norm():
    torch.manual_seed(0)
    d = DCGANDiscriminator(width=WIDTH, num_classes=3, spectral_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    for name in ("blocks.0.conv", "blocks.1.conv", "head", "embed"):
        m = d.get_submodule(name)
        assert hasattr(m, "parametrizations") and "weight" in m.parametrizations, name
    # the effective weights have spectral norm ~1, whatever the raw weights
    assert torch.linalg.matrix_norm(d.head.weight.detach(), ord=2) == pytest.approx(1.0, abs=0.05)
    w = d.blocks[1].conv.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, abs=0.05)
    assert d(torch.zeros(2, 1, 28, 28), torch.tensor([0, 2])).shape == (2,)


def test_dcgan_init():
    torch.manual_seed(0)
    g = DCGANGenerator(width=32)
    w = g.blocks[0].conv.weight.detach()
    assert w.mean().abs() < 0.002 and w.std().item() == pytest.approx(0.02, rel=0.05)
    bn = g.project.bn.weight.detach()
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.3)
    assert (g.project.bn.bias == 0).all() and (g.to_image.conv.bias == 0).all()
    conv = nn.Conv2d(8, 8, 3)
    assert dcgan_init_(conv) is conv and conv.weight.std().item() < 0.03  # default init has std ~0.07


def test_generator_errors():
    g = DCGANGenerator(latent_dim=16, width=WIDTH, num_classes=3)
    z = torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\)"):
        g(z)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got values in \[0, 3\]"):
        g(z, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        g(z, torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="int64 or int32 tensor of shape \\(2,\\), got dtype torch.float32"):
        g(z, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\), got dtype torch.int64 and shape \(3,\)"):
        g(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 16\), got \(2, 100\)"):
        g(torch.randn(2, 100), torch.tensor([0, 1]))
    assert g(z, torch.tensor([0, 2], dtype=torch.int32)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=None\) but got labels"):
        DCGANGenerator(latent_dim=16, width=WIDTH)(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"image_size must be one of \[28, 32, 64\], got 48"):
        DCGANGenerator(image_size=48)


def test_discriminator_errors():
    d = DCGANDiscriminator(width=WIDTH, channels=1)
    with pytest.raises(ValueError, match=r"expected 1 input channel\(s\), got 3"):
        d(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="expected 28x28 images, got 32x32"):
        d(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\)"):
        d(torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match="unconditional"):
        d(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    dc = DCGANDiscriminator(width=WIDTH, num_classes=2, conditioning="concat")
    with pytest.raises(ValueError, match="class-conditional"):
        dc.features(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        dc(torch.zeros(2, 1, 28, 28), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="conditioning must be one of"):
        DCGANDiscriminator(num_classes=2, conditioning="film")
    with pytest.raises(ValueError, match="image_size must be one of"):
        DCGANDiscriminator(image_size=16)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_bf16_autocast_logit_loss(num_classes):
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, width=WIDTH, num_classes=num_classes)
    d = DCGANDiscriminator(width=WIDTH, num_classes=num_classes)
    y = labels(4, num_classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = d(g(torch.randn(4, 16), y), y)
        loss = F.softplus(-logits).mean()  # the non-saturating G loss in logit form
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert g.project.conv.weight.grad.abs().sum() > 0


def _blobs(n: int, seed: int) -> torch.Tensor:
    """'Real' images: a bright square on a black background at a random place, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 28, 28)
    for i, (r, c) in enumerate(torch.randint(2, 16, (n, 2), generator=gen).tolist()):
        x[i, :, r : r + 10, c : c + 10] = 1.0
    return x


def test_adam_steps_reduce_the_nonsaturating_losses():
    """A few Adam steps lower D's loss on a fixed batch, then G's loss against that D."""
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, width=WIDTH)
    d = DCGANDiscriminator(width=WIDTH)
    real, z = _blobs(16, seed=1), torch.randn(16, 16)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def d_loss() -> torch.Tensor:
        return F.softplus(-d(real)).mean() + F.softplus(d(g(z).detach())).mean()

    first = d_loss().item()
    assert first == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=0.5)  # small logits at init
    for _ in range(25):
        opt_d.zero_grad()
        d_loss().backward()
        opt_d.step()
    with torch.no_grad():
        last = d_loss().item()
    assert last < 0.6 * first

    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d.requires_grad_(False)

    def g_loss() -> torch.Tensor:
        return F.softplus(-d(g(z))).mean()

    before = g_loss().item()
    for _ in range(15):
        opt_g.zero_grad()
        g_loss().backward()
        opt_g.step()
    with torch.no_grad():
        assert g_loss().item() < 0.8 * before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_cuda_bf16_autocast_and_label_check(conditioning):
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=16, image_size=32, channels=3, width=WIDTH, num_classes=4).cuda()
    d = DCGANDiscriminator(
        image_size=32, channels=3, width=WIDTH, num_classes=4, conditioning=conditioning, spectral_norm=True
    ).cuda()
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = d(g(torch.randn(4, 16, device="cuda"), y), y)
        loss = F.softplus(-logits).mean()
    assert logits.shape == (4,) and torch.isfinite(loss)
    loss.backward()
    assert g.project.conv.weight.grad.abs().sum() > 0
    # a clear error, not a device-side assert that poisons the CUDA context
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        g(torch.randn(2, 16, device="cuda"), torch.tensor([0, 4], device="cuda"))
    assert torch.isfinite(d(torch.zeros(2, 3, 32, 32, device="cuda"), y[:2])).all()
