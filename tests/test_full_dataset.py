"""The full-dataset sanity check: its config, its benchmark script and the ChannelsLast callback."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import ModuleType

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO, assert_provenance, quiet_trainer
from lit_finetune import ImageClassifier
from lit_finetune.callbacks.channels_last import ChannelsLast
from lit_finetune.cli import cli_main

CONFIG = REPO / "configs" / "classifier" / "fashion_mnist_full.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CL = torch.channels_last


def load_script() -> ModuleType:
    """``benchmarks/full_dataset.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("full_dataset_benchmark", REPO / "benchmarks" / "full_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# -- ChannelsLast ---------------------------------------------------------------------------------
def rgb_loader(n: int = 8) -> DataLoader:
    """3-channel images: with one channel, NCHW and NHWC strides coincide and nothing could fail."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 3, 28, 28, generator=g) * 2 - 1, torch.arange(n) % 3), batch_size=4)


class InputFormats(L.Callback):
    """Record, per step, whether the first conv saw a channels_last input."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.backbone.conv1.register_forward_pre_hook(
            lambda m, args: self.seen.append(nhwc(args[0]))
        )


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights of the 3x3 convolutions (a 1x1 kernel is contiguous in both formats)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_channels_last_converts_weights_and_inputs_and_fits(tmp_path):
    model = ImageClassifier(num_classes=3, in_channels=3)
    assert conv_weights(model) and not any(nhwc(w) for w in conv_weights(model))
    before = [w.detach().clone() for w in conv_weights(model)]
    formats = InputFormats()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ChannelsLast(), formats], logger=False)
    trainer.fit(model, train_dataloaders=rgb_loader())

    assert trainer.global_step == 2
    weights = conv_weights(model)
    assert all(nhwc(w) for w in weights)
    assert all(not torch.equal(w, b) for w, b in zip(weights, before))  # the steps trained the converted weights
    assert formats.seen and all(formats.seen)  # every batch reached the net in channels_last
    # the input hook is gone after teardown: a plain forward sees the tensor it was given
    formats.seen.clear()
    model(torch.zeros(1, 3, 28, 28))
    assert formats.seen == [False]


def test_channels_last_at_test_start(tmp_path):
    model = ImageClassifier(num_classes=3, in_channels=3)
    formats = InputFormats()
    quiet_trainer(tmp_path, callbacks=[ChannelsLast(), formats], logger=False).test(model, rgb_loader(), verbose=False)
    assert all(nhwc(w) for w in conv_weights(model))
    assert formats.seen and all(formats.seen)


# -- the config through the CLI -------------------------------------------------------------------
def test_full_config_smoke_fit_and_test(tmp_path, monkeypatch, fashion_root):
    shipped = yaml.safe_load(CONFIG.read_text())
    assert shipped["trainer"]["deterministic"] is True and shipped["data"]["init_args"]["classes"] is None
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.root", str(fashion_root), "--data.init_args.samples_per_class", "20"]
    # total_steps of OneCycleLR must cover max_epochs * batches (else the scheduler raises)
    tiny = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    cli = cli_main(["fit", "--config", str(CONFIG), *tiny, *data, *QUIET,
                    "--model.init_args.lr_scheduler.init_args.total_steps", "4"])  # fmt: skip
    assert cli.model.num_classes == 10 and cli.datamodule.num_classes == 10
    assert cli.datamodule.classes is None and len(cli.datamodule.val_set) == 5000
    assert cli.trainer.global_step == 4
    assert nhwc(cli.model.backbone.layer1[0].conv1.weight)
    ckpts = tmp_path / "runs/classifier/fashion_mnist_full/checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()

    cli = cli_main(["test", "--config", str(CONFIG), *data, *QUIET, "--trainer.limit_test_batches", "2",
                    "--ckpt_path", str(ckpts / "best.ckpt")])  # fmt: skip
    assert set(cli.trainer.callback_metrics) >= {"test/acc", "test/f1_macro"}


def test_full_config_survives_max_steps_smoke(tmp_path, monkeypatch, fashion_root):
    """What users type to try a config: a few steps, no validation reached."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2",
                    "--data.init_args.root", str(fashion_root), *QUIET])  # fmt: skip
    assert cli.trainer.global_step == 3


# -- benchmarks/full_dataset.py -------------------------------------------------------------------
def test_schedule_steps_follow_batch_size_and_epochs(fashion_root):
    script = load_script()
    base = ["--config", str(CONFIG), "--data.init_args.root", str(fashion_root), "--trainer.max_epochs", "3"]
    args, total = script.with_schedule(base)
    assert total == 3 * 430  # ceil(55,000 / 128) batches per epoch
    assert args[-2:] == ["--model.init_args.lr_scheduler.init_args.total_steps", str(total)]
    _, total = script.with_schedule([*base, "--data.init_args.batch_size", "256"])
    assert total == 3 * 215


def read_row(text: str, figure: str) -> str:
    match = re.search(rf"^\| {re.escape(figure)}[^|]* \| (.+?) \|$", text, re.M)
    assert match, f"row {figure!r} missing from:\n{text}"
    return match.group(1)


@torch.no_grad()
def accuracy_of(ckpt: str, fashion_root, batches: int, batch_size: int) -> float:
    """Test accuracy of ``ckpt`` on the first test batches, computed here without the Trainer."""
    from lit_finetune.data import FashionMNISTDataModule

    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    data = FashionMNISTDataModule(root=str(fashion_root), classes=None, batch_size=batch_size)
    data.setup("test")
    correct = total = 0
    for i, (x, y) in enumerate(data.test_dataloader()):
        if i == batches:
            break
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def test_script_writes_result_of_the_best_checkpoint(tmp_path, fashion_root, monkeypatch):
    script = load_script()
    captured = {}
    real = script.fit_and_test

    def spy(*args, **kwargs):
        captured.update(real(*args, **kwargs))
        return captured

    monkeypatch.setattr(script, "fit_and_test", spy)
    extra = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
             "--trainer.limit_test_batches", "2", "--data.init_args.samples_per_class", "20"]  # fmt: skip
    path = script.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w"),
                        "--data-root", str(fashion_root), "--", *extra])  # fmt: skip
    assert path == tmp_path / "out" / "fashion_mnist_full.md"
    text = path.read_text()
    ckpt = tmp_path / "w" / "runs/classifier/fashion_mnist_full/checkpoints/best.ckpt"
    assert ckpt.is_file()
    expected = accuracy_of(str(ckpt), fashion_root, batches=2, batch_size=128)
    assert read_row(text, "test accuracy") == f"{100 * expected:.2f} %"
    assert read_row(text, "met") == ("yes" if expected >= 0.94 else "no")
    assert read_row(text, "epochs run / planned").startswith("2 / 2 (4 optimizer steps)")
    reported_val = float(read_row(text, "best validation").split()[0])
    assert 100 * captured["best_val_acc"] == pytest.approx(reported_val, abs=0.01)
    assert "Profile `cpu`" in text and "torch threads 1" in text and "--trainer.limit_test_batches 2" in text
    record = assert_provenance(path, "full_dataset.py")
    assert record["torch_threads"] == 1 and record["command"].endswith("--trainer.limit_test_batches 2 "
                                                                        "--data.init_args.samples_per_class 20")


def test_script_gpu_profile_parses_and_writes_its_own_file(tmp_path, fashion_root):
    """The GPU profile's arguments (bf16-mixed, resnet18, deterministic warn, max_time), run on the CPU."""
    script = load_script()
    extra = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
             "--data.init_args.batch_size", "8", "--data.init_args.samples_per_class", "2"]  # fmt: skip
    path = script.main(["--profile", "gpu", "--out", str(tmp_path), "--workdir", str(tmp_path / "w"),
                        "--data-root", str(fashion_root), "--", *extra])  # fmt: skip
    assert path == tmp_path / "fashion_mnist_full_gpu.md"
    assert not (tmp_path / "fashion_mnist_full.md").exists()
    assert "Profile `gpu`" in path.read_text()


def test_script_rejects_missing_data_root(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--data-root", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_bundle_holds_data_and_cli_dependencies(tmp_path, fashion_root):
    """What the GPU machine lacks (dataset, jsonargparse & co.) is importable from the bundle alone."""
    import subprocess

    from lit_finetune.data import FashionMNISTDataModule

    script = load_script()
    assert script.main(["--bundle", str(tmp_path), "--data-root", str(fashion_root)]) == tmp_path
    data = FashionMNISTDataModule(root=str(tmp_path / "fashion-mnist"), classes=None)
    data.setup("test")
    assert len(data.test_set) == 10_000
    probe = (
        "import importlib.metadata as m, jsonargparse, docstring_parser, typeshed_client as t\n"
        "from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as ok\n"
        "print(bool(ok)); print(t.__file__)\n"
        "for n in ('jsonargparse', 'docstring_parser', 'typeshed_client'): print(m.distribution(n)._path)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "True"
    assert all(line.startswith(str(tmp_path / "site")) for line in lines[1:]) and len(lines) == 5
