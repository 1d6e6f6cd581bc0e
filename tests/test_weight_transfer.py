"""Weight transfer across a channel change: the classifier's input statistics follow its input conv,
and every report states the loaded share of parameters (the rules themselves: tests/test_transfer.py)."""

from __future__ import annotations

import torch

from conftest import save_lightning_checkpoint
from lit_finetune import ImageClassifier


def test_classifier_input_conv_and_statistics_adapt_to_three_channels(tmp_path):
    torch.manual_seed(0)
    gray = ImageClassifier(num_classes=5).eval()
    with torch.no_grad():
        gray.input_mean.fill_(0.3), gray.input_std.fill_(0.4)
    path = save_lightning_checkpoint(gray, tmp_path / "gray.ckpt")
    rgb = ImageClassifier(num_classes=5, in_channels=3, pretrained=path, load_head=True)
    report = rgb.load_pretrained_weights()
    assert sorted(report.adapted) == [
        "backbone.conv1.weight (input channels)", "input_mean (per channel)", "input_std (per channel)"
    ]
    # a gray image repeated over three channels gets the source's logits
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(rgb.eval()(x.expand(-1, 3, -1, -1)), gray(x), atol=1e-4)


def test_every_report_states_the_loaded_share(tmp_path):
    path = save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path / "ten.ckpt")
    report = ImageClassifier(num_classes=5, pretrained=path).load_pretrained_weights()
    assert "% of the model's parameters" in str(report).splitlines()[0]
    head = sum(p.numel() for n, p in ImageClassifier(num_classes=5).named_parameters() if n.startswith("head."))
    assert report.loaded_share == 1.0 and not any(k.startswith("head.") for k in report.loaded)
    assert report.total_params == sum(p.numel() for p in ImageClassifier(num_classes=5).parameters()) - head
