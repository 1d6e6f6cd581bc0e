"""Parameter-efficient transfer: BN-only, BitFit, parallel adapters, LoRA (lit_finetune.transfer.peft)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import quiet_trainer, save_lightning_checkpoint
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.transfer import PEFT, trainable_parameter_count

NORMS = (nn.BatchNorm2d,)


@pytest.fixture
def data(fashion_root):
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=4, val_split=20, batch_size=10
    )


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=5)
    model.backbone.apply(lambda m: _randomise_norm(m))  # norm layers unlike their init: a change would show
    return save_lightning_checkpoint(model, tmp_path / "source.ckpt"), model


def _randomise_norm(module: nn.Module) -> None:
    if isinstance(module, NORMS):
        nn.init.uniform_(module.weight, 0.5, 1.5)
        nn.init.uniform_(module.bias, -0.2, 0.2)
        module.running_mean.uniform_(-0.1, 0.1)


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _expected_trainable(model: ImageClassifier, method: str) -> set[str]:
    names = set()
    for module_name, module in model.backbone.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            full = f"backbone.{module_name}.{leaf}" if module_name else f"backbone.{leaf}"
            if method in ("bn_only", "adapters") and isinstance(module, NORMS):
                names.add(full)
            if method == "bitfit" and leaf == "bias":
                names.add(full)
    names |= {f"head.{n}" for n, _ in model.head.named_parameters()}
    names |= {f"peft.{n}" for n, _ in model.peft.named_parameters()}
    return names


@pytest.mark.parametrize("method", ["bn_only", "bitfit", "adapters", "lora"])
def test_each_method_trains_exactly_its_parameters_and_starts_as_the_source(method, source, data, tmp_path):
    path, reference = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft=method, load_head=True)
    model.load_pretrained_weights()
    assert not model.load_report.missing  # PEFT's modules are new by design, not missing source keys
    reference.eval(), model.eval()
    assert torch.allclose(model(_images()), reference(_images()), atol=1e-6)  # adapters and LoRA start at zero

    expected = _expected_trainable(model, method)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert model.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, datamodule=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # every trained parameter moved (LoRA's down-projection too, once its zero up-projection has moved)...
    assert changed == expected
    # ...and the optimizer holds only them
    held = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in expected}


def test_bitfit_on_a_resnet_is_the_norm_shifts():
    """torchvision ResNets have no convolution biases: BitFit trains the norm layers' beta and the head."""
    model = ImageClassifier(num_classes=5, peft="bitfit")
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".bias") for n in trained)


@pytest.mark.parametrize("method", ["adapters", "lora"])
def test_merged_equals_unmerged_and_unmerge_restores(method):
    torch.manual_seed(1)
    model = ImageClassifier(num_classes=5, peft=method).eval()
    for parameter in model.peft.parameters():
        nn.init.normal_(parameter, std=0.05)
    weights = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    unmerged = model(_images())
    model.peft.merge()
    assert model.peft.merged
    assert torch.allclose(model(_images()), unmerged, atol=1e-5)
    model.peft.merge()  # a second merge does nothing
    assert torch.allclose(model(_images()), unmerged, atol=1e-5)
    model.peft.unmerge()
    assert torch.allclose(model(_images()), unmerged, atol=1e-5)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.backbone.named_parameters())


def test_merged_flag_travels_in_the_state_dict():
    model = ImageClassifier(num_classes=5, peft="lora").eval()
    for parameter in model.peft.parameters():
        nn.init.normal_(parameter, std=0.05)
    model.peft.merge()
    copy = ImageClassifier(num_classes=5, peft="lora").eval()
    copy.load_state_dict(model.state_dict())
    assert copy.peft.merged  # a merged checkpoint is not merged again by its hooks
    assert torch.allclose(copy(_images()), model(_images()), atol=1e-6)


def test_lora_parameter_count_is_rank_times_fan_in_plus_fan_out():
    model = ImageClassifier(num_classes=5, peft="lora", peft_rank=2)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    lora = sum(2 * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels) for c in convs)
    head = sum(p.numel() for p in model.head.parameters())
    assert model.trainable_parameters == lora + head == trainable_parameter_count(model)
    adapters = ImageClassifier(num_classes=5, peft="adapters")
    three_by_three = [m for m in adapters.backbone.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(adapters.peft.added) == len(three_by_three)  # the 1x1 downsampling convolutions get none


def test_delta_checkpoint_round_trip_is_small_and_exact(source, data, tmp_path):
    path, _ = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft="lora")
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    delta = model.save_delta(tmp_path / "delta.pt")
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert delta.stat().st_size < 0.5 * (tmp_path / "full.ckpt").stat().st_size
    rebuilt = ImageClassifier.from_delta(delta).eval()
    model.eval()
    assert torch.equal(rebuilt(_images()), model(_images()))
    # the source moved: say where it is now
    moved = tmp_path / "moved.ckpt"
    (tmp_path / "source.ckpt").rename(moved)
    assert torch.equal(ImageClassifier.from_delta(delta, source=str(moved)).eval()(_images()), model(_images()))
    with pytest.raises(ValueError, match="not a delta checkpoint"):
        ImageClassifier.from_delta(tmp_path / "full.ckpt")
    with pytest.raises(FileNotFoundError, match="save_delta"):
        ImageClassifier.from_delta(tmp_path / "nope.pt")


def test_full_checkpoint_of_a_peft_model_loads_without_its_source(source, data, tmp_path):
    path, _ = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft="adapters")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "source.ckpt").unlink()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True).eval()
    assert torch.equal(restored(_images()), model.eval()(_images()))


def test_layer_freezing_of_the_backbone_is_refused_with_peft(data, tmp_path):
    model = ImageClassifier(num_classes=5, peft="bn_only")
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=1)])
    with pytest.raises(ValueError, match="remove the LayerFreezing"):
        trainer.fit(model, datamodule=data)


def test_bad_method_and_rank_are_named():
    with pytest.raises(ValueError, match="peft must be one of bn_only, bitfit, adapters, lora"):
        ImageClassifier(num_classes=5, peft="prefix")
    with pytest.raises(ValueError, match="peft_rank must be >= 1"):
        PEFT(nn.Conv2d(1, 2, 3), "lora", rank=0)
    with pytest.raises(ValueError, match="found no layer to adapt"):
        PEFT(nn.Sequential(nn.Linear(2, 2)), "adapters")
