import pickle
from functools import partial

import pytest
import torch

from conftest import save_lightning_checkpoint
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
    src = ImageClassifier(num_classes=10)
    save_lightning_checkpoint(src, tmp_path / "src.ckpt")
    dst = ImageClassifier(num_classes=5)
    with pytest.raises(PretrainedLoadError, match=r"head.weight \(10, 128\)->\(5, 128\)"):
        load_pretrained(dst, tmp_path / "src.ckpt")  # a shape change is an error unless asked to skip it
    report = load_pretrained(dst, tmp_path / "src.ckpt", skip_mismatched=["head."])
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
    assert "backbone.conv1.weight (input channels)" in report.adapted
    assert torch.allclose(model.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.head.weight, state["fc.weight"])
    assert not report.unexpected


def test_l2sp_leaves_the_new_small_input_stem_free(tmp_path):
    """A torchvision-layout source has a 7x7 stem; at 28x28 the model's 3x3 stem is new (kept fresh): L2-SP pulls
    back the backbone weights the source gave, not that stem's random start."""
    net, _ = build_resnet("resnet18", in_channels=3, small_input=False)
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    model = ImageClassifier(num_classes=5, backbone="resnet18", pretrained=str(tmp_path / "tv.pt"), l2sp_alpha=1.0)
    report = model.load_pretrained_weights()
    assert [k.split(" ")[0] for k in report.reshaped] == ["backbone.conv1.weight"]
    assert "conv1.weight" not in model.l2sp.pulled_names and "layer1.0.conv1.weight" in model.l2sp.pulled_names
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    assert model.l2sp_penalty().item() == 0
    with torch.no_grad():
        model.backbone.layer1[0].conv1.weight.add_(0.1)
    assert model.l2sp_penalty().item() > 0


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
    with pytest.raises(PretrainedLoadError, match="missing.ckpt.*does not exist"):
        ImageClassifier(num_classes=2, pretrained=str(tmp_path / "missing.ckpt")).load_pretrained_weights()


def _resnet18_cache_file(torch_home):
    """Where torch.hub looks for torchvision's ResNet-18 ImageNet weights under ``torch_home`` (a Path)."""
    from pathlib import Path
    from urllib.parse import urlparse

    from torchvision.models import ResNet18_Weights

    name = Path(urlparse(ResNet18_Weights.IMAGENET1K_V1.url).path).name
    folder = Path(torch_home) / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_torchvision_weight_name_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, pretrained="IMAGENET1K_V1")
    with pytest.raises(PretrainedLoadError, match="hub/checkpoints"):
        model.load_pretrained_weights()
    with pytest.raises(ValueError, match="torchvision backbone"):
        ImageClassifier(num_classes=3, backbone="resnet_small", pretrained="IMAGENET1K_V1")


def test_torchvision_weight_name_loads_from_local_cache(monkeypatch, tmp_path):
    """The real torch.hub path, fed from a file in $TORCH_HOME/hub/checkpoints (no network needed)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = build_resnet("resnet18", 3, small_input=False)[0]
    full = {**reference.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    torch.save(full, _resnet18_cache_file(tmp_path))
    model = ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, image_size=224, pretrained="IMAGENET1K_V1")
    report = model.load_pretrained_weights()
    assert "backbone.layer4.1.conv2.weight" in report.loaded and report.clean
    assert torch.equal(model.backbone.layer4[1].conv2.weight, full["layer4.1.conv2.weight"])
    assert model.input_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # ImageNet statistics


def test_freezing_the_backbone_keeps_the_new_stem_training(monkeypatch, tmp_path, fashion_root):
    """Under torchvision weights at 32 px the 3x3 stem is new (no source fills it): LayerFreezing(["backbone"])
    trains it with the head, instead of feeding the frozen pretrained layers from a frozen random stem."""
    from conftest import quiet_trainer
    from lit_finetune.callbacks import LayerFreezing
    from lit_finetune.data import FashionMNISTDataModule

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.save(build_resnet("resnet18", 3, small_input=False)[0].state_dict(), _resnet18_cache_file(tmp_path))
    model = ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, image_size=32, pretrained="IMAGENET1K_V1")
    assert model.new_parameters() == list(model.backbone.conv1.parameters())
    data = FashionMNISTDataModule(root=str(fashion_root), classes=[0, 1, 2], samples_per_class=4, val_split=3,
                                  image_size=32, channels=3, batch_size=12)  # fmt: skip
    model.load_pretrained_weights()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=None)])  # fmt: skip
    trainer.fit(model, datamodule=data)
    after = model.backbone.state_dict()
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # the new stem trained
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])  # the rest stayed frozen
    assert not ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, image_size=224,
                               pretrained="IMAGENET1K_V1").new_parameters()  # torchvision's own stem: loaded


def test_planted_torchvision_cache_file_cannot_run_code(monkeypatch, tmp_path):
    """A pickle that runs code, placed where the offline error tells users to put weights, is refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": Exploit()}, _resnet18_cache_file(tmp_path))
    model = ImageClassifier(num_classes=3, backbone="resnet18", in_channels=3, pretrained="IMAGENET1K_V1")
    with pytest.raises(PretrainedLoadError, match="Refused to load the cached torchvision weights"):
        model.load_pretrained_weights()
    assert not marker.exists()


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


def _applied_lrs(model, steps: int = 6) -> list[dict[str, float]]:
    """Step ``model``'s configured optimizer (and scheduler) on fake gradients; the LRs each step used."""
    config = model.configure_optimizers()
    opt = config["optimizer"] if isinstance(config, dict) else config
    sched = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    used = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        used.append({g["name"]: g["applied_lr"] for g in opt.param_groups})
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a flat metric: the plateau scheduler decays the LR after `patience` steps
        elif sched is not None:
            sched.step()
    return used


@pytest.mark.parametrize(
    "scheduler",
    [
        None,
        partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=6),
        partial(torch.optim.lr_scheduler.CyclicLR, base_lr=1e-4, max_lr=1e-2, step_size_up=2),
        partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6),
        partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5),
    ],
    ids=["none", "onecycle", "cyclic", "cosine", "plateau"],
)
def test_discriminative_lr_and_layer_decay_hold_under_every_scheduler(scheduler):
    model = ImageClassifier(
        num_classes=3, backbone_lr_ratio=0.1, layer_decay=0.5, optimizer=partial(torch.optim.SGD, lr=1e-3),
        lr_scheduler=scheduler,
    )  # fmt: skip
    used = _applied_lrs(model)
    assert len({round(step["head"], 12) for step in used}) > 1 or scheduler is None  # the schedule moved
    for step in used:
        assert step["backbone.layer4"] == pytest.approx(0.1 * step["head"])
        assert step["backbone.layer3"] == pytest.approx(0.05 * step["head"])
        assert step["backbone.conv1"] == pytest.approx(0.1 * 0.5**5 * step["head"])
        assert step["backbone.layer1.no_decay"] == pytest.approx(step["backbone.layer1"])
    names = [g["name"] for g in block_groups(model.backbone, "backbone")]
    assert names[:2] == ["backbone.conv1", "backbone.bn1"]


def test_weight_decay_spares_norms_biases_and_l2sp_anchored_weights():
    def decay_of(model) -> dict[str, float]:
        opt = model.configure_optimizers()
        return {n: g["weight_decay"] for g in opt.param_groups for n in _names(model, g["params"])}

    def _names(model, params):
        ids = {id(p) for p in params}
        return [n for n, p in model.named_parameters() if id(p) in ids]

    adamw = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    plain = decay_of(ImageClassifier(num_classes=3, optimizer=adamw))
    assert plain["head.weight"] == 0.05 and plain["backbone.layer1.0.conv1.weight"] == 0.05
    assert plain["head.bias"] == 0 and plain["backbone.bn1.weight"] == 0 and plain["backbone.bn1.bias"] == 0
    anchored = decay_of(ImageClassifier(num_classes=3, optimizer=adamw, l2sp_alpha=0.01))
    assert anchored["head.weight"] == 0.05  # the new head keeps plain weight decay
    assert all(v == 0 for k, v in anchored.items() if k.startswith("backbone."))  # L2-SP replaces decay

    # and the optimizer really honours it: an anchored weight at its anchor with zero gradient does not move
    model = ImageClassifier(num_classes=3, optimizer=adamw, l2sp_alpha=0.01)
    opt = model.configure_optimizers()
    before = model.backbone.layer1[0].conv1.weight.detach().clone()
    head_before = model.head.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model.backbone.layer1[0].conv1.weight, before)
    assert not torch.equal(model.head.weight, head_before)  # decayed toward 0


def test_only_declared_input_convs_adapt_other_shapes_are_errors(tmp_path):
    """1 -> 3 channels: the VAE encoder's input conv adapts; the decoder's output layer is no input (an error
    naming it, unless skipped); a transposed conv's dimension 1 (its output channels) is never "adapted"."""
    from lit_finetune import DCGAN, VAE

    torch.manual_seed(0)
    gray = VAE(latent_dim=4, encoder_width=8, decoder_width=8)
    torch.save(gray.state_dict(), tmp_path / "vae.pt")
    rgb = VAE(latent_dim=4, encoder_width=8, decoder_width=8, in_channels=3)
    with pytest.raises(PretrainedLoadError, match=r"decoder.to_image.weight \(8, 1, 4, 4\)->\(8, 3, 4, 4\)"):
        load_pretrained(rgb, tmp_path / "vae.pt")
    report = load_pretrained(rgb, tmp_path / "vae.pt", skip_mismatched=["decoder.to_image."])
    assert report.adapted == ["encoder.blocks.0.conv.weight (input channels)"]
    assert report.reshaped == ["decoder.to_image.weight (8, 1, 4, 4)->(8, 3, 4, 4)", "decoder.to_image.bias (1,)->(3,)"]
    rgb_image = torch.rand(2, 1, 28, 28).repeat(1, 3, 1, 1)  # a gray image as RGB: the adapted encoder sees the same
    assert torch.allclose(rgb.encoder(rgb_image)[0], gray.encoder(rgb_image[:, :1])[0], atol=1e-5)

    torch.save(DCGAN(latent_dim=16, generator_width=16, discriminator_width=8).state_dict(), tmp_path / "g16.pt")
    with pytest.raises(PretrainedLoadError, match=r"generator.project.conv.weight \(16, 32, 7, 7\)->\(16, 64, 7, 7\)"):
        load_pretrained(DCGAN(latent_dim=16, generator_width=32, discriminator_width=8), tmp_path / "g16.pt")


def test_a_source_of_other_sizes_fails_on_the_loaded_share_of_parameters(tmp_path):
    """Skipping every mismatch leaves BatchNorm counters and 1-element biases: a tiny share of the parameters."""
    from lit_finetune import DCGAN

    sizes = dict(latent_dim=64, generator_width=32, discriminator_width=32)
    torch.save(DCGAN().state_dict(), tmp_path / "default.pt")
    with pytest.raises(PretrainedLoadError, match="does not fit the model"):  # the module's own load refuses it
        DCGAN(**sizes, pretrained=str(tmp_path / "default.pt")).load_pretrained_weights()
    model = DCGAN(latent_dim=64, generator_width=32, discriminator_width=32)
    with pytest.raises(PretrainedLoadError, match=r"Only 0.000\d+% of the model's parameters"):
        load_pretrained(model, tmp_path / "default.pt", skip_mismatched=True, exclude=["generator_ema.", "fixed_"])

    same = DCGAN(latent_dim=64, generator_width=32, discriminator_width=32)
    torch.save(same.state_dict(), tmp_path / "same.pt")
    report = DCGAN(**sizes, pretrained=str(tmp_path / "same.pt")).load_pretrained_weights()
    assert report.loaded_share == 1.0 and "100% of the model's parameters" in str(report)
    classifier = ImageClassifier(num_classes=3)
    torch.save(ImageClassifier(num_classes=3).state_dict(), tmp_path / "clf.pt")
    report = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "clf.pt")).load_pretrained_weights()
    assert report.loaded_share == 1.0  # the new head is declared new (excluded), not counted
    assert report.total_params == sum(p.numel() for p in classifier.backbone.parameters())
