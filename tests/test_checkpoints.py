"""A checkpoint carries everything it needs: its pretrained source can be moved or deleted."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch

from conftest import REPO
from lit_finetune import ImageClassifier
from lit_finetune.cli import cli_main

CONFIGS = REPO / "configs" / "classifier"
TINY = [
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _anchor(model: ImageClassifier) -> list[torch.Tensor]:
    return [getattr(model.l2sp, f"anchor_{i}").clone() for i in range(len(model.l2sp._names))]


def test_fine_tuned_checkpoint_outlives_its_source(tmp_path, monkeypatch, fashion_root):
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.root", str(fashion_root)]
    cli_main(["fit", "--config", str(CONFIGS / "pretrain_source.yaml"), *TINY, *data, "--trainer.max_epochs", "1"])
    source = tmp_path / "source.ckpt"
    shutil.move(tmp_path / "runs/classifier/pretrain_source/checkpoints/last.ckpt", source)
    source_backbone = {k: v for k, v in torch.load(source, weights_only=True)["state_dict"].items() if k.startswith("backbone.")}

    finetune = ["fit", "--config", str(CONFIGS / "finetune_target.yaml"), *TINY, *data, "--model.init_args.pretrained",
                str(source), "--model.init_args.l2sp_alpha", "0.01"]  # fmt: skip
    first = cli_main([*finetune, "--trainer.max_epochs", "1"])
    anchor = _anchor(first.model)
    for (name, _), value in zip(first.model.backbone.named_parameters(), anchor):
        assert torch.equal(value, source_backbone[f"backbone.{name}"])  # anchored at the pretrained weights
    ckpt_dir = tmp_path / "runs/classifier/finetune_target/checkpoints"
    moved = tmp_path / "elsewhere"
    shutil.copytree(ckpt_dir, moved)
    source.unlink()  # the source is gone from here on

    # load from Python: weights, anchor and input statistics come from the checkpoint
    loaded = ImageClassifier.load_from_checkpoint(moved / "last.ckpt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(_anchor(loaded), anchor))
    assert loaded.load_report is None  # the source was never read
    # test and predict through the CLI, from the copied checkpoint
    test = cli_main(["test", "--config", str(CONFIGS / "finetune_target.yaml"), *TINY, *data,
                     "--ckpt_path", str(moved / "last.ckpt")])  # fmt: skip
    assert "test/acc" in test.trainer.callback_metrics
    cli_main(["predict", "--config", str(CONFIGS / "finetune_target.yaml"), "--config", str(CONFIGS / "predict_folder.yaml"),
              *data, "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false",
              "--ckpt_path", str(moved / "last.ckpt")])  # fmt: skip
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) > 1
    # resume: continues with the same anchor, bit for bit
    resumed = cli_main([*finetune, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.current_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(_anchor(resumed.model), anchor))
    # ... also when the config no longer names any source
    no_source = cli_main([*finetune, "--model.init_args.pretrained", "null", "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert all(torch.equal(a, b) for a, b in zip(_anchor(no_source.model), anchor))


def test_missing_source_fails_at_fit_start_naming_the_file(tmp_path, tiny_target):
    from lit_finetune.transfer import PretrainedLoadError

    model = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "typo.ckpt"))  # building never reads it
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=1, enable_progress_bar=False)
    with pytest.raises(PretrainedLoadError, match="typo.ckpt.*does not exist"):
        trainer.fit(model, datamodule=tiny_target)


def test_input_normalisation_travels_to_the_next_fine_tune(tmp_path, monkeypatch):
    """Stage 1 from ImageNet weights normalises inputs; stage 2, fine-tuned from stage 1, must too."""
    from test_transfer import _resnet18_cache_file

    from lit_finetune.nets import build_resnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.save(build_resnet("resnet18", 3, small_input=False)[0].state_dict(), _resnet18_cache_file(tmp_path))
    stage1 = ImageClassifier(num_classes=4, backbone="resnet18", in_channels=3, pretrained="IMAGENET1K_V1")
    stage1.load_pretrained_weights()
    imagenet_mean = stage1.input_mean.clone()
    assert imagenet_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    torch.save({"state_dict": stage1.state_dict()}, tmp_path / "stage1.ckpt")

    stage2 = ImageClassifier(num_classes=2, backbone="resnet18", in_channels=3, pretrained=str(tmp_path / "stage1.ckpt"))
    report = stage2.load_pretrained_weights()
    assert "input_mean" in report.loaded and torch.equal(stage2.input_mean, imagenet_mean)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    stage1.eval(), stage2.eval()
    assert torch.equal(stage1.backbone(stage1.normalize_input(x)), stage2.backbone(stage2.normalize_input(x)))
    # explicit settings win over the source's statistics
    plain = ImageClassifier(num_classes=2, backbone="resnet18", in_channels=3, pretrained=str(tmp_path / "stage1.ckpt"),
                            input_normalization="none")  # fmt: skip
    plain.load_pretrained_weights()
    assert plain.input_mean.flatten().tolist() == [0.5, 0.5, 0.5]
