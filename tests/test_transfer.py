import pickle

import pytest
import torch

from lit_finetune import ImageClassifier
from lit_finetune.nets import build_resnet
from lit_finetune.transfer import L2SP, PretrainedLoadError, block_groups, load_pretrained


def test_backbones_any_channels_and_unknown_name():
    for name in ("resnet_small", "resnet10", "resnet18", "resnet34", "resnet50"):
        net, features = build_resnet(name, in_channels=2, small_input=True)
        assert net(torch.randn(2, 2, 28, 28)).shape == (2, features)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet7'.*resnet18"):
        build_resnet("resnet7")


def test_lightning_checkpoint_loads_with_head_of_other_size(tmp_path):
    import lightning as L

    src = ImageClassifier(num_classes=10)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(src)
    trainer.save_checkpoint(tmp_path / "src.ckpt")
    dst = ImageClassifier(num_classes=5)
    report = load_pretrained(dst, tmp_path / "src.ckpt")
    assert torch.equal(dst.backbone.layer1[0].conv1.weight, src.backbone.layer1[0].conv1.weight)
    assert any(k.startswith("head.weight") for k in report.reshaped)  # reported, not silently dropped
    assert not report.missing  # the head is reported once, as skipped
    assert "2 skipped, shape differs (kept fresh init): head.weight (10, 128)->(5, 128)" in str(report)


def test_torchvision_layout_state_dict_maps_fc_to_head_and_adapts_channels(tmp_path):
    net, _ = build_resnet("resnet18", in_channels=3, small_input=False)
    state = {k: v for k, v in net.state_dict().items()}
    state["fc.weight"] = torch.randn(5, 512)
    state["fc.bias"] = torch.randn(5)
    torch.save(state, tmp_path / "tv.pt")
    model = ImageClassifier(num_classes=5, backbone="resnet18", in_channels=1, image_size=224, load_head=True)
    report = load_pretrained(model, tmp_path / "tv.pt", key_map={"": "backbone.", "fc.": "head."})
    assert "backbone.conv1.weight" in report.adapted
    assert torch.allclose(model.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.head.weight, state["fc.weight"])
    assert not report.unexpected


def test_not_a_checkpoint_and_malicious_pickle_are_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(PretrainedLoadError, match="not a readable PyTorch checkpoint"):
        load_pretrained(ImageClassifier(num_classes=2), tmp_path / "junk.ckpt")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"state_dict": {"x": Exploit()}}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(PretrainedLoadError, match="Refused"):
        load_pretrained(ImageClassifier(num_classes=2), tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(PretrainedLoadError, match="does not exist"):
        ImageClassifier(num_classes=2, pretrained=str(tmp_path / "missing.ckpt"))


def test_torchvision_weight_name_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision.models._api as api

    def no_network(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(PretrainedLoadError, match="hub/checkpoints"):
        ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, pretrained="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="torchvision backbone"):
        ImageClassifier(num_classes=3, backbone="resnet_small", pretrained="IMAGENET1K_V1")


def test_torchvision_weight_name_loads_from_local_cache(monkeypatch):
    """The real code path for users with weights: get_state_dict is faked to return resnet18 tensors."""
    import torchvision.models._api as api

    reference = build_resnet("resnet18", 3, small_input=False)[0]
    full = {**reference.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", lambda self, *a, **k: full)
    model = ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, image_size=224, pretrained="IMAGENET1K_V1")
    assert model.load_report.loaded and "backbone.layer4.1.conv2.weight" in model.load_report.loaded
    assert model.input_mean is not None  # ImageNet statistics for ImageNet weights


def test_l2sp_is_half_squared_distance_and_zero_disables():
    net = torch.nn.Linear(3, 2)
    reg = L2SP(net, alpha=0.5)
    assert reg().item() == 0
    with torch.no_grad():
        net.weight.add_(1.0)
    assert reg().item() == pytest.approx(0.5 * 0.5 * 6)
    reg().backward()
    assert torch.allclose(net.weight.grad, 0.5 * torch.ones(2, 3))
    assert L2SP(net, alpha=0.0)().item() == 0


def test_discriminative_lr_and_layer_decay_groups():
    model = ImageClassifier(num_classes=3, backbone_lr_ratio=0.1, layer_decay=0.5)
    opt = model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == pytest.approx(1e-3)
    assert lrs["backbone.layer4"] == pytest.approx(1e-4)
    assert lrs["backbone.layer3"] == pytest.approx(0.5e-4)
    assert lrs["backbone.conv1"] == pytest.approx(1e-4 * 0.5**5)
    names = [g["name"] for g in block_groups(model.backbone, "backbone")]
    assert names[:2] == ["backbone.conv1", "backbone.bn1"]
