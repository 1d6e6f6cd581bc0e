"""Every shipped config survives what users type to try it: a few steps, no logger, fast_dev_run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, save_lightning_checkpoint
from lit_finetune.cli import cli_main

CONFIG_ROOT = REPO / "configs"
CONFIGS = CONFIG_ROOT / "classifier"
#: every config a user fits with (logger/ and trainer/ pieces and the predict add-on go on top of these)
FIT_CONFIGS = sorted(
    str(p.relative_to(CONFIG_ROOT))
    for p in CONFIG_ROOT.glob("*/*.yaml")
    if p.parent.name not in ("logger", "trainer") and p.name != "predict_folder.yaml"
)
SMOKE = {
    "max_steps": ["--trainer.max_steps", "3"],
    "no_logger": ["--trainer.max_steps", "3", "--trainer.logger", "false"],
    "fast_dev_run": ["--trainer.fast_dev_run", "true"],
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What no config can name for the user: a folder of their own images (ImageFolder)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 3)):
        for cls in ("ant", "bee"):
            (root / "images" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / split / cls / f"{i}.png")
    return {"images": root / "images"}


def _user_args(config: str, inputs, fashion_root) -> list[str]:
    """Only the data: sources (pretrained, generator, feature_extractor) are the configs' own zoo names."""
    import yaml

    shipped = yaml.safe_load((CONFIG_ROOT / config).read_text())
    args = []
    config = config.split("/")[-1]
    if config == "imagefolder_target.yaml":
        # the user's own images; the config's resnet18 would take ImageNet weights, here it starts from scratch
        args += ["--data.init_args.root", str(inputs["images"]), "--data.init_args.val_split", "4",
                 "--model.init_args.backbone", "resnet_small"]  # fmt: skip
    elif shipped["data"]["class_path"].endswith("FashionMNISTDataModule"):
        args += ["--data.init_args.root", str(fashion_root)]
    elif shipped["data"]["class_path"].endswith("EpisodicDataModule"):  # episodes from a wrapped datamodule
        args += ["--data.init_args.dataset.init_args.root", str(fashion_root)]
    return args


def test_every_fit_config_is_covered():
    names = {"pretrain_source", "finetune_target", "scratch_target", "digits_target", "imagefolder_target",
             "meta_pretrain_source"}
    assert {f"classifier/{n}.yaml" for n in names} | {"dcgan/pretrain.yaml", "dcgan/finetune.yaml"} <= set(FIT_CONFIGS)
    assert {"vae/pretrain.yaml", "vae/transfer.yaml", "vae/transfer_frozen_encoder.yaml"} <= set(FIT_CONFIGS)
    assert {"augmented/cdcgan_target.yaml", "augmented/classifier.yaml"} <= set(FIT_CONFIGS)


@pytest.mark.parametrize("mode", list(SMOKE))
@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_shipped_config_smoke_run(config, mode, inputs, fashion_root, tmp_path, monkeypatch, zoo_built):
    """Each config alone in an empty folder: nothing run before it, its sources come from the zoo."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIG_ROOT / config), *_user_args(config, inputs, fashion_root), *SMOKE[mode], *QUIET])
    assert cli.trainer.global_step >= 1
    if mode == "no_logger":
        assert cli.trainer.logger is None
        if "AppliedLRMonitor" in (CONFIG_ROOT / config).read_text():
            assert any(k.startswith("lr/") and v > 0 for k, v in cli.trainer.callback_metrics.items())  # LR monitor, no logger


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_shipped_config_tests_alone(config, inputs, fashion_root, tmp_path, monkeypatch, zoo_built):
    """``lit-finetune test --config X`` in an empty folder: tests the model the config builds (its zoo source
    loaded, or fresh weights), as a user does before fitting."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["test", "--config", str(CONFIG_ROOT / config), *_user_args(config, inputs, fashion_root),
                    "--trainer.limit_test_batches", "1", "--trainer.logger", "false", *QUIET])  # fmt: skip
    assert any(k.startswith("test/") for k in cli.trainer.callback_metrics)
    pretrained = cli.model.pretrained
    assert (cli.model.load_report is not None) == bool(pretrained)  # the zoo source was read


def test_predict_folder_config_smoke_run(inputs, fashion_root, tmp_path, monkeypatch):
    from lit_finetune import ImageClassifier

    monkeypatch.chdir(tmp_path)
    ckpt = save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path / "model.ckpt")
    cli_main(["predict", "--config", str(CONFIGS / "finetune_target.yaml"), "--config", str(CONFIGS / "predict_folder.yaml"),
              "--data.init_args.root", str(fashion_root), "--data.init_args.predict_dir", str(inputs["images"] / "test"),
              "--ckpt_path", str(ckpt), "--trainer.fast_dev_run", "true", *QUIET])  # fmt: skip
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("index,file,label") and len(rows) > 1


def test_digits_config_reaches_every_unfreeze_step(tmp_path, monkeypatch):
    """digits_target.yaml unfreezes layer4 at epoch 3 ... conv1 at epoch 12: run past all of them (1 batch/epoch)."""
    import csv

    import yaml

    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((CONFIGS / "digits_target.yaml").read_text())
    freezing = next(c for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("LayerFreezing"))["init_args"]
    schedule = dict(zip(freezing["modules"], freezing["unfreeze_at_epoch"]))
    # the same config with early stopping's patience beyond the run, so 1-batch epochs cannot stop it early
    early = next(c for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping"))
    early["init_args"]["patience"] = 1000
    config = tmp_path / "digits_target.yaml"
    config.write_text(yaml.safe_dump(shipped))
    cli = cli_main(["fit", "--config", str(config), "--model.init_args.pretrained", "null",
                    "--trainer.max_epochs", str(max(schedule.values()) + 1), "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", *QUIET])  # fmt: skip
    assert cli.trainer.current_epoch == max(schedule.values()) + 1  # early stopping did not cut the schedule short
    metrics = next((tmp_path / "runs/classifier/digits_target").rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("lr/head")]
    assert len(rows) == max(schedule.values()) + 1  # one step per epoch
    for module, epoch in schedule.items():
        key = f"lr/{module}" if f"lr/{module}" in rows[0] else f"lr/{module}.no_decay"  # bn1: norm weights only
        applied = [float(r[key]) for r in rows]
        assert all(lr == 0 for lr in applied[:epoch]), module  # frozen before its epoch
        assert all(lr > 0 for lr in applied[epoch:]), module  # trains from its epoch on


def test_dcgan_on_a_flat_folder_of_unlabelled_images(tmp_path, monkeypatch):
    """The README's own-images command for a GAN: the shipped config with the data swapped for a flat folder."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "my_images" / f"{i}.png")
    cli = cli_main(["fit", "--config", str(CONFIG_ROOT / "dcgan/pretrain.yaml"), "--data", "lit_finetune.data.ImageFolderDataModule",
                    "--data.root", "my_images/", "--data.classes", "null", "--data.val_split", "0.1", "--data.channels", "1",
                    "--data.image_size", "28", "--trainer.max_steps", "4", *QUIET])  # fmt: skip
    assert cli.datamodule.num_classes == 1 and len(cli.datamodule.train_set) == 27
    # global_step counts optimizer steps: one D and one G step per batch
    assert cli.trainer.global_step == 4 and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2


def test_generator_and_discriminator_optimizers_and_schedulers_from_yaml(tmp_path):
    extra = tmp_path / "opt.yaml"
    extra.write_text(
        "model:\n  init_args:\n"
        "    generator_optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}\n"
        "    discriminator_optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.0001}}\n"
        "    discriminator_lr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 3}}\n"
    )
    cli = cli_main(["--config", str(CONFIG_ROOT / "dcgan/pretrain.yaml"), "--config", str(extra)], run=False)
    configs = cli.model.configure_optimizers()
    opt_g, opt_d = configs[0]["optimizer"], configs[1]["optimizer"]
    assert isinstance(opt_g, torch.optim.SGD) and opt_g.defaults["lr"] == 0.05 and opt_g.defaults["momentum"] == 0.9
    assert isinstance(opt_d, torch.optim.AdamW) and opt_d.defaults["lr"] == 0.0001
    assert "lr_scheduler" not in configs[0] and configs[1]["lr_scheduler"]["scheduler"].step_size == 3
