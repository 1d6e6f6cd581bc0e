"""Parameter-efficient transfer: BN-only, BitFit, parallel adapters, LoRA (lit_finetune.transfer.peft)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from torch import nn

from conftest import quiet_trainer, save_lightning_checkpoint
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.transfer import PEFT, merge_into_state, trainable_parameter_count

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
    model = ImageClassifier(num_classes=5, pretrained=path, peft="lora", l2sp_alpha=0.01)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    delta = model.save_delta(tmp_path / "delta.pt")
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert delta.stat().st_size < 0.5 * (tmp_path / "full.ckpt").stat().st_size
    rebuilt = ImageClassifier.from_delta(delta).eval()
    model.eval()
    assert torch.equal(rebuilt(_images()), model(_images()))
    assert rebuilt.class_names == model.class_names == data.class_names  # "Sandal", ..., not "0", ...
    assert torch.load(delta, weights_only=True)["hyper_parameters"]["pretrained"] == str(Path(path).resolve())
    assert "l2sp." not in "".join(torch.load(delta, weights_only=True)["state_dict"])
    # the source moved: say where it is now
    moved = tmp_path / "moved.ckpt"
    (tmp_path / "source.ckpt").rename(moved)
    assert torch.equal(ImageClassifier.from_delta(delta, source=str(moved)).eval()(_images()), model(_images()))
    with pytest.raises(ValueError, match="not a delta checkpoint"):
        ImageClassifier.from_delta(tmp_path / "full.ckpt")
    with pytest.raises(FileNotFoundError, match="save_delta"):
        ImageClassifier.from_delta(tmp_path / "nope.pt")
    # a merged model's delta holds the updates unmerged: rebuilt on the source's weights it adds them
    unmerged = model(_images())
    model.peft.merge()
    rebuilt = ImageClassifier.from_delta(model.save_delta(tmp_path / "merged.pt"), source=str(moved)).eval()
    assert not rebuilt.peft.merged
    assert torch.allclose(rebuilt(_images()), unmerged, atol=1e-5)


def test_full_checkpoint_of_a_peft_model_loads_without_its_source(source, data, tmp_path):
    path, _ = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft="adapters")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "source.ckpt").unlink()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True).eval()
    assert torch.equal(restored(_images()), model.eval()(_images()))


class _EpochSnapshots(Callback):
    """The model's parameters at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize(
    "method, modules, train_bn", [("bn_only", ["backbone"], False), ("lora", ["backbone", "peft"], True)]
)
def test_layer_freezing_composes_with_peft(method, modules, train_bn, source, data, tmp_path):
    """Head alone first, then the PEFT selection, never more (train_bn does not wake a fixed norm layer)."""
    path, _ = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft=method)
    expected = _expected_trainable(model, method)
    count = model.trainable_parameters
    snapshots = _EpochSnapshots()
    freezing = LayerFreezing(modules, unfreeze_at_epoch=1, train_bn=train_bn)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[freezing, snapshots])
    model.load_pretrained_weights()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(model, datamodule=data)
    first, second = snapshots.states
    assert {n for n in start if not torch.equal(first[n], start[n])} == {n for n in expected if n.startswith("head.")}
    assert {n for n in start if not torch.equal(second[n], start[n])} == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in expected}  # no group was added
    assert model.trainable_parameters == count  # the selection's size, whatever the phase


def test_other_finetuning_callbacks_are_refused_with_peft(data, tmp_path):
    model = ImageClassifier(num_classes=5, peft="bn_only")
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    with pytest.raises(ValueError, match="use lit_finetune.callbacks.LayerFreezing"):
        trainer.fit(model, datamodule=data)


def test_l2sp_covers_the_updates_of_adapters_and_lora():
    """The penalty is L2-SP of the effective (merged) weights: the update of an added module counts."""
    torch.manual_seed(2)
    model = ImageClassifier(num_classes=5, peft="lora", l2sp_alpha=0.1)
    assert float(model.l2sp_penalty()) == 0.0  # LoRA starts at zero
    assert not model.l2sp._names  # nothing of the backbone trains under LoRA: nothing to anchor
    for parameter in model.peft.parameters():
        nn.init.normal_(parameter, std=0.05)
    source = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    penalty = model.l2sp_penalty()
    model.peft.merge()
    merged = sum((p - source[n]).pow(2).sum() for n, p in model.backbone.named_parameters())
    assert float(merged) > 0
    assert torch.allclose(penalty, 0.5 * 0.1 * merged, rtol=1e-4)
    groups = {g["name"]: g for g in model.param_groups()}
    assert groups["peft"]["weight_decay"] == 0.0  # L2-SP replaces weight decay on what it anchors

    bn = ImageClassifier(num_classes=5, peft="bn_only", l2sp_alpha=0.1)
    anchored = {id(p) for p in bn.l2sp._params.values()}
    assert anchored == {id(p) for p in bn.backbone.parameters() if p.requires_grad}  # only what can move


@pytest.mark.parametrize("method", ["adapters", "lora"])
@pytest.mark.parametrize("merge", [False, True])
def test_a_peft_checkpoint_is_a_source_with_its_updates(method, merge, source, tmp_path):
    """Its output is the next stage's input: loaded as ``pretrained``, it computes what the PEFT model did."""
    path, _ = source
    model = ImageClassifier(num_classes=5, pretrained=path, peft=method, load_head=True)
    model.load_pretrained_weights()
    for parameter in model.peft.parameters():
        nn.init.normal_(parameter, std=0.05)
    if merge:
        model.peft.merge()
    model.eval()
    stage = save_lightning_checkpoint(model, tmp_path / "stage.ckpt")
    for peft in (None, method):  # plain fine-tuning next, or PEFT again (fresh, zero updates on top)
        following = ImageClassifier(num_classes=5, pretrained=stage, peft=peft, load_head=True)
        following.load_pretrained_weights()
        assert not following.load_report.missing
        assert torch.allclose(following.eval()(_images()), model(_images()), atol=1e-5)


def test_lora_on_linear_and_convolutions_of_any_padding_mode():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip
    x = torch.randn(5, 2, 8, 8)
    source = net(x).detach()
    peft = PEFT(net, "lora", rank=2, alpha=4.0)
    assert len(peft.added) == 3 and not any(p.requires_grad for p in net.parameters())
    assert torch.equal(net(x), source)  # zero at init
    for parameter in peft.parameters():
        nn.init.normal_(parameter, std=0.1)
    unmerged = net(x).detach()
    assert not torch.allclose(unmerged, source, atol=1e-3)
    peft.merge()
    assert torch.allclose(net(x), unmerged, atol=1e-5)


def test_a_lora_state_dict_without_its_scale_still_loads():
    """State dicts written before LoRA stored its scale: loaded with the scale the model was built with."""
    model = ImageClassifier(num_classes=5, peft="lora", peft_rank=2, peft_alpha=6.0)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".scaling")}
    copy = ImageClassifier(num_classes=5, peft="lora", peft_rank=2, peft_alpha=6.0)
    copy.load_state_dict(state)
    assert all(added._scale == 3.0 for added in copy.peft.added.values())
    with pytest.raises(ValueError, match="stored without its scale"):
        merge_into_state(state)


def test_peft_with_freezing_and_l2sp_resumes_exactly(source, data, tmp_path):
    path, _ = source

    def run(root, max_epochs, ckpt_path=None):
        L.seed_everything(0)
        model = ImageClassifier(num_classes=5, pretrained=path, peft="lora", l2sp_alpha=0.01)
        trainer = quiet_trainer(
            root, max_epochs=max_epochs, limit_val_batches=0, deterministic=True,
            callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
                       LayerFreezing(["backbone", "peft"], unfreeze_at_epoch=1)],
        )  # fmt: skip
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    assert list(full.state_dict()) == list(resumed.state_dict())
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_method_and_rank_are_named():
    with pytest.raises(ValueError, match="peft must be one of bn_only, bitfit, adapters, lora"):
        ImageClassifier(num_classes=5, peft="prefix")
    with pytest.raises(ValueError, match="peft_rank must be >= 1"):
        PEFT(nn.Conv2d(1, 2, 3), "lora", rank=0)
    with pytest.raises(ValueError, match="found no layer to adapt"):
        PEFT(nn.Sequential(nn.Linear(2, 2)), "adapters")


def test_the_hooks_compile_into_one_graph():
    """The hooks read a Python flag, not the merged_flag tensor: no graph break (nor a GPU wait) per layer."""
    model = ImageClassifier(num_classes=5, peft="lora").eval()
    explained = torch._dynamo.explain(model.backbone)(_images(2))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
