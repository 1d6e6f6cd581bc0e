"""Weight transfer does exactly what its report says: input convolutions only are adapted, label
channels start at zero, other shape changes are errors, and the loaded share of parameters is stated
and enforced."""

from __future__ import annotations

import pytest
import torch

from conftest import save_lightning_checkpoint
from lit_finetune import DCGAN, VAE, ImageClassifier
from lit_finetune.transfer import PretrainedLoadError, load_pretrained

TINY_GAN = dict(latent_dim=16, generator_width=8, discriminator_width=8)


# (projection with spectral_norm=True is left out: a spectrally normalised embedding cannot be zero,
# so that D starts as the source plus a projection term; the DCGAN docstring says so)
@pytest.mark.parametrize(("conditioning", "spectral_norm"), [("concat", False), ("concat", True), ("projection", False)])
def test_conditional_dcgan_starts_as_its_unconditional_source(tmp_path, conditioning, spectral_norm):
    torch.manual_seed(0)
    source = DCGAN(**TINY_GAN, spectral_norm=spectral_norm)
    path = save_lightning_checkpoint(source, tmp_path / "source.ckpt")
    model = DCGAN(**TINY_GAN, num_classes=5, conditional=True, conditioning=conditioning, spectral_norm=spectral_norm)
    report = model.read_pretrained(path)
    source.eval(), model.eval()
    x, z = torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 16)
    with torch.no_grad():
        for label in range(5):
            y = torch.full((6,), label)
            assert torch.allclose(model.discriminator(x, y), source.discriminator(x), atol=1e-6)
            assert torch.allclose(model.generator(z, y), source.generator(z), atol=1e-6)
    if conditioning == "concat":
        assert any(a.startswith("discriminator.blocks.0.conv.") and "(label channels zero)" in a for a in report.adapted)
    assert report.loaded_share == 1.0  # the label embeddings are new: not counted


def test_input_channel_rule_is_for_input_convolutions_only(tmp_path):
    torch.manual_seed(0)
    vae_path = save_lightning_checkpoint(VAE(), tmp_path / "vae1.ckpt")
    rgb = VAE(in_channels=3)
    # the decoder's output layer is no input: a 1-channel source does not fit a 3-channel decoder
    with pytest.raises(PretrainedLoadError, match=r"decoder\.to_image\.weight \(32, 1, 4, 4\)->\(32, 3, 4, 4\)"):
        load_pretrained(rgb, vae_path)
    report = load_pretrained(rgb, vae_path, skip_mismatched=["decoder.to_image."])
    assert report.adapted == ["encoder.blocks.0.conv.weight"]  # the encoder's input conv: adapted
    assert report.reshaped == ["decoder.to_image.weight (32, 1, 4, 4)->(32, 3, 4, 4)", "decoder.to_image.bias (1,)->(3,)"]
    # a transposed convolution's dimension 1 is its output channels: never "adapted"
    gan_path = save_lightning_checkpoint(DCGAN(latent_dim=16, generator_width=16), tmp_path / "g16.ckpt")
    with pytest.raises(PretrainedLoadError, match=r"generator\.project\.conv\.weight \(16, 32, 7, 7\)->\(16, 64, 7, 7\)"):
        load_pretrained(DCGAN(latent_dim=16, generator_width=32), gan_path)


def test_classifier_input_conv_adapts_to_three_channels(tmp_path):
    torch.manual_seed(0)
    path = save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path / "gray.ckpt")
    report = ImageClassifier(num_classes=5, in_channels=3, pretrained=path).load_pretrained_weights()
    assert sorted(report.adapted) == ["backbone.conv1.weight", "input_mean (per channel)", "input_std (per channel)"]
    assert report.loaded_share == 1.0


def test_a_source_of_other_sizes_is_refused_not_loaded_silently(tmp_path):
    path = save_lightning_checkpoint(DCGAN(), tmp_path / "default.ckpt")
    with pytest.raises(PretrainedLoadError, match="does not fit the model"):
        DCGAN(latent_dim=64, generator_width=32, pretrained=path).load_pretrained_weights()
    # tensors that happen to fit (BatchNorm counters, 1-element biases) are no transfer: the share says so
    source = DCGAN(**TINY_GAN).state_dict()
    only_small = {k: v for k, v in source.items() if v.numel() <= 1 or k.endswith("bias")}
    with pytest.raises(PretrainedLoadError, match=r"Only \d+\.\d+ % of the model's parameters load"):
        load_pretrained(DCGAN(**TINY_GAN), only_small, exclude=["generator_ema."])
    report = load_pretrained(DCGAN(**TINY_GAN), only_small, exclude=["generator_ema."], min_loaded_share=0.0)
    assert 0 < report.loaded_share < 0.01


def test_every_report_states_the_loaded_share(tmp_path):
    path = save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path / "ten.ckpt")
    report = ImageClassifier(num_classes=5, pretrained=path).load_pretrained_weights()
    assert "% of the model's parameters" in str(report)
    head = sum(p.numel() for n, p in ImageClassifier(num_classes=5).named_parameters() if n.startswith("head."))
    assert report.loaded_share == 1.0 and "head." not in "".join(report.loaded)  # the new head is excluded, not counted
    assert report.counted_params == sum(p.numel() for p in ImageClassifier(num_classes=5).parameters()) - head
