"""The shell path: lit-finetune fit -> fit --model.pretrained -> test -> predict, plus its errors."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from lit_finetune.cli import cli_main

CONFIGS = REPO / "configs" / "classifier"
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def test_pretrain_finetune_test_predict_chain(tmp_path, monkeypatch, fashion_root):
    monkeypatch.chdir(tmp_path)
    data_root = ["--data.init_args.root", str(fashion_root)]
    cli_main(["fit", "--config", str(CONFIGS / "pretrain_source.yaml"), *TINY, *data_root])
    source_ckpt = tmp_path / "runs/classifier/pretrain_source/checkpoints/last.ckpt"
    assert source_ckpt.is_file()
    assert list((tmp_path / "runs/classifier/pretrain_source").rglob("config.yaml"))

    cli = cli_main(
        ["fit", "--config", str(CONFIGS / "finetune_target.yaml"), *TINY, *data_root,
         "--model.init_args.pretrained", str(source_ckpt)]
    )  # fmt: skip
    report = cli.model.load_report
    assert report is not None and report.loaded and not report.reshaped
    assert report.excluded == ["head.weight", "head.bias"]  # a new task gets a new head
    target_ckpt = tmp_path / "runs/classifier/finetune_target/checkpoints/best.ckpt"
    assert target_ckpt.is_file()

    cli = cli_main(
        ["test", "--config", str(CONFIGS / "finetune_target.yaml"), *TINY, *data_root,
         "--trainer.limit_test_batches", "2", "--ckpt_path", str(target_ckpt)]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    # 2 batches of 50 images: the logged accuracy is a whole number of correct images out of 100
    assert round(float(metrics["test/acc"]) * 100, 4) == int(round(float(metrics["test/acc"]) * 100))
    assert metrics["test/loss"] > 0 and {"test/f1_macro", "test/acc_class/Sandal"} <= metrics.keys()

    from PIL import Image

    images = tmp_path / "to_label"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 30, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.jpg")
    cli_main(
        ["predict", "--config", str(CONFIGS / "finetune_target.yaml"), "--config", str(CONFIGS / "predict_folder.yaml"),
         *data_root, "--data.init_args.predict_dir", str(images), "--ckpt_path", str(target_ckpt),
         "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[1].endswith("0.jpg")


def test_cross_domain_digits_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIGS / "digits_target.yaml"), *TINY, "--model.init_args.pretrained", "null"])
    assert cli.model.num_classes == 10 and cli.datamodule.num_classes == 10


def test_links_num_classes_channels_image_size():
    cli = cli_main(
        ["--config", str(CONFIGS / "scratch_target.yaml"), "--data.init_args.channels", "3", "--data.init_args.image_size", "32"],
        run=False,
    )
    assert (cli.model.num_classes, cli.model.in_channels, cli.model.image_size) == (5, 3, 32)


def _shell(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_finetune.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_help_print_config_and_unknown_key():
    out = _shell("fit", "--help")
    assert out.returncode == 0
    for name in ("ImageClassifier", "FashionMNISTDataModule", "DigitsDataModule", "ImageFolderDataModule", "LayerFreezing", "LRWarmup"):
        assert name in out.stdout, name
    out = _shell("fit", "--config", "configs/classifier/finetune_target.yaml", "--print_config")
    assert out.returncode == 0 and "class_path: lit_finetune.ImageClassifier" in out.stdout
    out = _shell("fit", "--config", "configs/classifier/finetune_target.yaml", "--model.init_args.lerning_rate", "1")
    assert out.returncode != 0 and "lerning_rate" in out.stderr


def test_unknown_config_key_in_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    sample_per_class: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "finetune_target.yaml"), "--config", str(bad)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "sample_per_class" in err and "not accepted" in err  # the user is told which key is wrong


def test_resume_with_ckpt_path_last(tmp_path, monkeypatch, fashion_root):
    """`--ckpt_path last` resumes from the latest epoch (a monitor-free checkpoint writes last.ckpt every epoch)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "scratch_target.yaml"), *TINY, "--data.init_args.root", str(fashion_root)]
    first = cli_main([*args, "--trainer.max_epochs", "2"])
    last = tmp_path / "runs/classifier/scratch_target/checkpoints/last.ckpt"
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == first.trainer.global_step == 4  # 100 images, batch 50
    resumed = cli_main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 6 and resumed.trainer.current_epoch == 3


def test_imagefolder_config_fits_a_users_folder(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ant", "bee", "wasp"):
        (tmp_path / "imgs/train" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs/train" / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "--config", str(CONFIGS / "imagefolder_target.yaml"), *TINY, "--data.init_args.root", "imgs",
         "--data.init_args.val_split", "3", "--model.init_args.backbone", "resnet_small"]
    )  # fmt: skip
    assert cli.model.num_classes == 3 and cli.model.in_channels == 3 and cli.model.image_size == 32
    assert (tmp_path / "runs/classifier/imagefolder_target/checkpoints/last.ckpt").is_file()


def test_imagefolder_mistyped_root_names_the_path_before_training(tmp_path, monkeypatch, capsys):
    """A mistyped ``--data.init_args.root`` stops while the CLI builds its classes, naming the path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images/train/cat").mkdir(parents=True)  # the folder the user meant
    from lit_finetune.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError) as err_info:  # its own error, not jsonargparse's namespace dump
        cli_main(["fit", "--config", str(CONFIGS / "imagefolder_target.yaml"), "--data.init_args.root", "imgaes"])
    seen = str(err_info.value) + capsys.readouterr().err
    assert "imgaes" in seen and "does not exist" in seen, seen
    assert "num_classes" not in seen and "Union" not in seen  # not the old, misleading symptoms

    chain, cause = [], err_info.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    if not isinstance(err_info.value, SystemExit):  # ...the error keeps its type for Python callers
        assert any(isinstance(e, DatasetNotFoundError) and "imgaes" in str(e) for e in chain)
    assert not (tmp_path / "runs").exists()  # failed at construction: no trainer ran, nothing written


def test_shell_user_errors_name_the_fix_without_traceback(tmp_path):
    """What a user typing `lit-finetune` sees for a mistyped data root or pretrained path."""
    out = _shell("fit", "--config", "configs/classifier/imagefolder_target.yaml", "--data.init_args.root", str(tmp_path / "imgaes"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "lit-finetune: error: ImageFolderDataModule root" in out.stderr and "imgaes" in out.stderr
    out = _shell("fit", "--config", "configs/classifier/digits_target.yaml", "--model.init_args.pretrained",
                 str(tmp_path / "sorce.ckpt"), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sorce.ckpt" in out.stderr and "does not exist" in out.stderr


def test_ckpt_path_keeps_given_runtime_options_and_names_overrides(tmp_path, monkeypatch, fashion_root, capsys):
    """`test --ckpt_path` rebuilds the model from the checkpoint's hyper-parameters, but a feature extractor
    given on the command line wins (it changes no network), and the options the checkpoint overrode are named."""
    import torch

    from conftest import save_lightning_checkpoint
    from lit_finetune import DCGAN, ImageClassifier

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ckpt = save_lightning_checkpoint(
        DCGAN(latent_dim=16, generator_width=8, discriminator_width=8, evaluate_ema=False), tmp_path / "ft.ckpt"
    )
    extractor = save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path / "extractor.ckpt")
    cli = cli_main(
        ["test", "--config", str(REPO / "configs/dcgan/finetune.yaml"), "--ckpt_path", ckpt,
         "--data.init_args.root", str(fashion_root), "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--model.init_args.feature_extractor", extractor]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert cli.model.hparams.feature_extractor == extractor and "test/fid" in cli.trainer.callback_metrics
    assert f"feature_extractor='{extractor}' as given (the checkpoint has None)" in err
    # architecture from the checkpoint, said out loud; options nobody gave keep the checkpoint's value
    assert (cli.model.hparams.latent_dim, cli.model.hparams.evaluate_ema) == (16, False)
    assert "latent_dim=16 from the checkpoint overrides the given 64" in err


def test_dcgan_test_without_feature_extractor_says_fid_kid_were_skipped(tmp_path, monkeypatch, fashion_root):
    import torch

    from conftest import save_lightning_checkpoint
    from lit_finetune import DCGAN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    generator = DCGAN(latent_dim=16, generator_width=8, discriminator_width=8)
    ckpt = save_lightning_checkpoint(generator, tmp_path / "g.ckpt")
    skipped = r"FID/KID skipped at test: no feature_extractor.*--model.init_args.feature_extractor"
    with pytest.warns(UserWarning, match=skipped):
        cli = cli_main(
            ["test", "--config", str(REPO / "configs/dcgan/pretrain.yaml"), "--ckpt_path", ckpt,
             "--data.init_args.root", str(fashion_root), "--trainer.limit_test_batches", "1",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        )  # fmt: skip
    assert set(cli.trainer.callback_metrics) == {"test/d_loss"}
