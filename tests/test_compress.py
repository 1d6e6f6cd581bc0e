"""Compression: pruning while fine-tuning, int8 quantisation, export, and running exported files."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import REPO, quiet_trainer, save_lightning_checkpoint
from lit_finetune import ImageClassifier
from lit_finetune.compress import (
    ExportedClassifier,
    ExportError,
    MagnitudePruning,
    QuantizationError,
    export_model,
    has_pruning_masks,
    load_exported,
    prunable_parameters,
    prune,
    quantize_int8,
    sparsity,
)

CONFIGS = REPO / "configs" / "classifier"


def _zeros(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Positions of the zero weights of every prunable backbone layer, by parameter name."""
    return {
        name: (param.detach() == 0).clone()
        for name, param in model.named_parameters()
        if name.startswith("backbone") and param.ndim > 1
    }


class RecordAfterPruning(Callback):
    """The backbone's zeros and logged sparsity at the start of each epoch, right after MagnitudePruning ran."""

    def __init__(self) -> None:
        self.zeros: dict[int, dict[str, torch.Tensor]] = {}
        self.sparsity: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.zeros[trainer.current_epoch] = {
            layer_name: (layer.weight == 0).clone()
            for layer_name, layer in pl_module.backbone.named_modules()
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))
        }
        self.sparsity[trainer.current_epoch] = sparsity(pl_module, ["backbone"])


def _model(**kwargs) -> ImageClassifier:
    from functools import partial

    # a large LR so a weight that were not masked would surely move off zero
    return ImageClassifier(num_classes=5, optimizer=partial(torch.optim.AdamW, lr=0.01), **kwargs)


def test_pruning_reaches_sparsity_and_pruned_weights_stay_zero(tmp_path, tiny_target):
    L.seed_everything(0)
    model = _model()
    record = RecordAfterPruning()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruning = MagnitudePruning(sparsity=0.6, modules=["backbone"], start_epoch=0, end_epoch=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None)
    trainer = quiet_trainer(tmp_path, max_epochs=5, callbacks=[pruning, record, ckpt], limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_target)

    # the cubic schedule: rising at the starts of epochs 0-2, at the target from epoch 2 on
    shares = [record.sparsity[e] for e in range(5)]
    expected = [pruning.target_at(e) for e in range(5)]
    assert shares == pytest.approx(expected, abs=1e-4) and expected[2:] == [0.6] * 3 and 0 < expected[0] < expected[1] < 0.6
    # every weight pruned at the last pruning step is still zero at the end, and the rest trained
    final = dict(model.backbone.named_modules())
    moved = 0
    for layer_name, zero in record.zeros[2].items():
        weight = final[layer_name].weight.detach()
        assert torch.all(weight[zero] == 0), layer_name
        moved += int((weight[~zero] != start[f"backbone.{layer_name}.weight"][~zero]).sum())
    assert moved > 0
    assert sparsity(model, ["backbone"]) == pytest.approx(0.6, abs=1e-4)
    # the head was not pruned; the fitted model and its checkpoint have plain keys and no masks
    assert not bool((model.head.weight == 0).any())
    assert not has_pruning_masks(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in saved)
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert sparsity(reloaded, ["backbone"]) == pytest.approx(0.6, abs=1e-4)


@pytest.mark.parametrize("select_at_target", [True, False])
def test_best_checkpoint_is_chosen_at_the_target_sparsity(tmp_path, tiny_target, select_at_target):
    """A monitored checkpoint whose best would come before the target (lowest sparsity: epoch 0) is
    chosen among epochs at the target instead; without ``select_at_target`` it is not."""
    L.seed_everything(0)
    pruning = MagnitudePruning(sparsity=0.5, start_epoch=0, end_epoch=1, select_at_target=select_at_target)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="pruning/sparsity", mode="min")
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[pruning, best], limit_train_batches=1, limit_val_batches=1)
    trainer.fit(_model(), datamodule=tiny_target)
    chosen = ImageClassifier.load_from_checkpoint(best.best_model_path, weights_only=True)
    assert (sparsity(chosen, ["backbone"]) == pytest.approx(0.5, abs=1e-4)) == select_at_target
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt"]  # no file left from the forgotten best


def test_resumed_fit_keeps_the_pruned_weights_zero(tmp_path, tiny_target):
    """A checkpoint has plain weights; a resumed fit turns their zeros back into masks."""
    L.seed_everything(0)
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[MagnitudePruning(sparsity=0.5), last], limit_val_batches=0)
    trainer.fit(_model(), datamodule=tiny_target)
    zeros = _zeros(ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True))

    model = _model()
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[MagnitudePruning(sparsity=0.5)], limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_target, ckpt_path=tmp_path / "last.ckpt")
    after = dict(model.named_parameters())
    for name, zero in zeros.items():
        assert torch.all(after[name].detach()[zero] == 0), name
    assert sparsity(model, ["backbone"]) == pytest.approx(0.5, abs=1e-4)


def test_one_shot_prune_and_bad_arguments():
    model = ImageClassifier(num_classes=5)
    assert prune(model, 0.3, ["backbone.layer4"]) == pytest.approx(0.3, abs=1e-4)
    assert sparsity(model, ["backbone.layer1"]) == 0 and not has_pruning_masks(model)
    assert prune(model, 0.5, ["backbone.layer4"]) == pytest.approx(0.5, abs=1e-4)  # from 30% on, not 30% + 50%
    with pytest.raises(ValueError, match=r"No submodule \['encoder'\].*'backbone'"):
        prunable_parameters(model, ["encoder"])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        MagnitudePruning(sparsity=1.0)
    with pytest.raises(ValueError, match="start_epoch <= end_epoch"):
        MagnitudePruning(sparsity=0.5, start_epoch=3, end_epoch=1)


# -- int8 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_root):
    """A classifier trained briefly on the target classes, and real images of them (train for calibration)."""
    from lit_finetune.data import FashionMNISTDataModule

    L.seed_everything(0)
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=40, val_split=50, batch_size=50)
    model = _model()
    tmp = tmp_path_factory.mktemp("trained")
    quiet_trainer(tmp, max_epochs=6, limit_val_batches=0).fit(model, datamodule=dm)
    dm.setup("test")
    test_x, test_y = dm.test_set.__getitems__(range(0, 5000, 25))  # 200 images, every class
    return model.eval(), dm.train_dataloader(), test_x, test_y


def test_int8_is_close_to_fp32_and_smaller(trained, tmp_path):
    model, calib, x, y = trained
    int8 = quantize_int8(model, calib)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    acc_fp32 = (ref.argmax(1) == y).float().mean().item()
    acc_int8 = (out.argmax(1) == y).float().mean().item()
    assert acc_fp32 > 0.5  # the model learnt something, so the comparison means something
    assert abs(acc_int8 - acc_fp32) <= 0.03
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    assert model.training is False and any(p.dtype == torch.float32 for p in model.parameters())  # left unchanged
    fp32_file = export_model(model, tmp_path / "fp32.ts")
    int8_file = export_model(int8, tmp_path / "int8.ts")
    assert int8_file.stat().st_size < 0.4 * fp32_file.stat().st_size


def test_quantize_errors(trained):
    model, calib, x, _ = trained
    with pytest.raises(QuantizationError, match=r"'arm64' is not available.*'x86'.*qnnpack"):
        quantize_int8(model, calib, backend="arm64")
    with pytest.raises(QuantizationError, match="at least one calibration batch"):
        quantize_int8(model, [])
    with pytest.raises(QuantizationError, match=r"images \(B, C, H, W\)"):
        quantize_int8(model, [x[0]])


# -- export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt2", ".ts"])
def test_exported_outputs_equal_eager(trained, tmp_path, suffix):
    model, _, x, _ = trained
    path = export_model(model, tmp_path / f"model{suffix}")
    loaded = load_exported(path)
    assert loaded.meta["num_classes"] == 5 and loaded.meta["in_channels"] == 1 and loaded.meta["dtype"] == "float32"
    with torch.no_grad():
        for batch in (x[:1], x[:7], x):
            ref, out = model(batch), loaded(batch)
            if suffix == ".pt2":
                assert torch.equal(out, ref)  # the same graph, the same kernels
            else:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # frozen: BatchNorm folded into convs
    with pytest.raises(ValueError, match=r"takes images \(B, 1, H, W\); got \(2, 3, 28, 28\)"):
        loaded(torch.zeros(2, 3, 28, 28))


def test_exported_int8_equals_the_quantised_model(trained, tmp_path):
    model, calib, x, _ = trained
    int8 = quantize_int8(model, calib, num_batches=1)
    loaded = load_exported(export_model(int8, tmp_path / "int8.ts"))
    assert loaded.meta["dtype"] == "int8" and loaded.meta["quant_backend"] == "x86"
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))
    with pytest.raises(ExportError, match=r"TorchScript only \(name it \.ts\)"):
        export_model(int8, tmp_path / "int8.pt2")


def test_export_and_load_errors(tmp_path):
    model = ImageClassifier(num_classes=3)
    with pytest.raises(ExportError, match=r"name the file \.pt2 .* or \.ts"):
        export_model(model, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="No exported model at"):
        load_exported(tmp_path / "missing.pt2")
    with pytest.raises(ExportError, match="pass example_input"):
        export_model(torch.nn.Linear(3, 2), tmp_path / "linear.pt2")
    foreign = tmp_path / "foreign.ts"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(3, 2), torch.zeros(1, 3)), str(foreign))
    with pytest.raises(ExportError, match="has no lit_finetune.json record"):
        load_exported(foreign)


# -- running exported files: ExportedClassifier, lit-finetune predict, lit-finetune-export -----------
def test_export_cli_then_predict_and_test_through_lit_finetune(trained, tmp_path, monkeypatch, fashion_root):
    from lit_finetune.cli import cli_main
    from lit_finetune.compress.cli import main as export_main

    model, _, x, y = trained
    monkeypatch.chdir(tmp_path)
    ckpt = save_lightning_checkpoint(model, tmp_path / "model.ckpt")
    data = ["--data.init_args.root", str(fashion_root)]
    assert export_main([ckpt, "int8.ts", "--int8", "--config", str(CONFIGS / "finetune_target.yaml"),
                        "--calibration-batches", "2", "--", *data]) == 0  # fmt: skip
    assert export_main([ckpt, "fp32.pt2"]) == 0
    assert load_exported("int8.ts").meta["dtype"] == "int8"

    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false"]
    exported = ["--model", "lit_finetune.compress.ExportedClassifier", "--model.path", "fp32.pt2"]
    cli = cli_main(["test", "--config", str(CONFIGS / "finetune_target.yaml"), *exported, *data,
                    "--trainer.limit_test_batches", "4", *quiet])  # fmt: skip
    ref = cli_main(["test", "--config", str(CONFIGS / "finetune_target.yaml"), "--ckpt_path", ckpt, *data,
                    "--trainer.limit_test_batches", "4", *quiet])  # fmt: skip
    assert cli.trainer.callback_metrics["test/acc"] == ref.trainer.callback_metrics["test/acc"]

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(((x[i, 0] + 1) * 127.5).round().byte().numpy()).save(images / f"{i}.png")
    cli_main(["predict", "--config", str(CONFIGS / "finetune_target.yaml"), "--config", str(CONFIGS / "predict_folder.yaml"),
              "--model", "lit_finetune.compress.ExportedClassifier", "--model.path", "int8.ts", *data,
              "--data.init_args.predict_dir", str(images), *quiet[:4]])  # fmt: skip
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,file,label,class_name,confidence" and len(rows) == 5
    with torch.no_grad():
        expected = load_exported("int8.ts")(x[:4]).argmax(1).tolist()  # the PNGs hold the same uint8 pixels
    assert [int(row.split(",")[2]) for row in rows[1:]] == expected


def test_exported_classifier_refuses_fit_and_mismatched_data(trained, tmp_path):
    model, _, _, _ = trained
    path = str(export_model(model, tmp_path / "m.pt2"))
    with pytest.raises(ValueError, match="made for num_classes=5, the data gives 10"):
        ExportedClassifier(path, num_classes=10)
    with pytest.raises(RuntimeError, match="validates, tests and predicts"):
        ExportedClassifier(path, num_classes=5).configure_optimizers()
    assert json.loads(json.dumps(load_exported(path).meta))["image_size"] == 28


@pytest.mark.parametrize("peft", ["lora", "adapters"])
def test_export_and_int8_keep_the_peft_updates(tmp_path, peft):
    """Adapters and LoRA factors live beside the backbone's weights: the plain copy must fold them in."""
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=5, peft=peft).eval()
    with torch.no_grad():  # as if trained: the added factors move away from their zero start
        for p in model.peft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        loaded = load_exported(export_model(model, tmp_path / "model.pt2"))
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
        int8 = quantize_int8(model, [x])
        assert (int8(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.8  # int8 rounds; the updates stay
    assert not model.peft.merged  # the model itself is left as it was
