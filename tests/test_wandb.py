"""W&B through the CLI, offline: what the run directory holds after ``fit`` and ``test``.

W&B runs offline here (no account, no network). In offline mode (wandb 0.31, wandb-core) the
run directory gets the media files and our ``lit_finetune_config.yaml`` under ``files/``, but
no ``wandb-summary.json`` and no ``config.yaml``: metrics, summary and config live only in the
``run-<id>.wandb`` transaction log until ``wandb sync``. Recent wandb releases no longer ship a
Python reader for that log, so :func:`read_wandb_records` parses it (LevelDB log framing around
protobuf ``Record`` messages) to read back exactly what would be uploaded.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wandb
import yaml
from wandb.proto import wandb_internal_pb2

from lit_finetune.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
FINETUNE = str(REPO / "configs/classifier/finetune_target.yaml")
WANDB_LOGGER = str(REPO / "configs/logger/wandb.yaml")

# -- reading an offline run ------------------------------------------------------------------------
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[Any]:
    """All ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, checksums verified.

    Layout: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks,
    each with a 7-byte header (CRC32 of the data seeded with the CRC32 of the type byte, length, type);
    a record is one FULL chunk or FIRST, MIDDLE..., LAST; block tails under 7 bytes are padding.
    """
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        assert len(chunk) == length, f"{path}: truncated record"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum"
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload = pending + chunk
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline W&B run wrote: its directory, history, merged summary and config."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        (log,) = run_dir.glob("run-*.wandb")
        self.records = read_wandb_records(log)
        kinds = [r.WhichOneof("record_type") for r in self.records]
        self.kinds = set(kinds)
        self.run = next(r.run for r in self.records if r.HasField("run"))
        self.history = [
            {_key(i): json.loads(i.value_json) for i in r.history.item} for r in self.records if r.HasField("history")
        ]
        self.summary: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.files: list[str] = []
        for r in self.records:
            if r.HasField("summary"):
                self.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            elif r.HasField("config"):
                self.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif r.HasField("files"):
                self.files += [f.path for f in r.files.files]
        self.exit_code = next((r.exit.exit_code for r in self.records if r.HasField("exit")), None)

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def offline_runs(save_dir: Path, timeout: float = 30.0) -> list[OfflineRun]:
    """The finished offline runs under ``save_dir``.

    ``wandb.finish()`` can return before wandb-core has written the transaction log (seen: a
    7-byte file right after it, the whole log a moment later), so wait for every run's exit record.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((save_dir / "wandb").glob("offline-run-*"))
        try:
            runs = [OfflineRun(d) for d in dirs]
            if all(run.exit_code is not None for run in runs):
                return runs
        except (StopIteration, ValueError):  # no run record or log file yet
            pass
        if time.monotonic() > deadline:
            return [OfflineRun(d) for d in dirs]
        time.sleep(0.2)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Offline W&B with every W&B directory in tmp_path; runs from tmp_path so the config's
    relative run directories land there too. Finishes any run a failing test left open."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        sub = var.lower()
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-finetune"])  # args come from cli_main(args), not pytest's argv
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()


def _tiny(save_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--config", FINETUNE,
        "--config", WANDB_LOGGER,
        "--data.root", str(data_root),  # after the configs, which set the data class
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.pretrained", "null",
        "--data.samples_per_class", "8",
        "--data.val_split", "40",
        "--data.batch_size", "8",
        *extra,
    ]  # fmt: skip


_FIT = ("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0")


# -- tests -----------------------------------------------------------------------------------------
def test_wandb_offline_fit_then_test_through_cli(wandb_offline: Path, fashion_root: Path) -> None:
    save_dir = wandb_offline / "wandb_runs"

    fit = cli_main(["fit", *_tiny(save_dir, fashion_root, "--trainer.max_epochs", "2", *_FIT)])
    fit_metrics = {k: float(v) for k, v in fit.trainer.callback_metrics.items()}
    best = fit.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    fit_run_dir = Path(fit.trainer.logger.experiment.dir).parent
    wandb.finish()  # flush and close the run, as the end of a `lit-finetune fit` process would

    test = cli_main(["test", *_tiny(save_dir, fashion_root, "--trainer.limit_test_batches", "2", "--ckpt_path", best)])
    test_metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    test_run_dir = Path(test.trainer.logger.experiment.dir).parent
    wandb.finish()

    runs = {r.dir: r for r in offline_runs(save_dir)}
    assert set(runs) == {fit_run_dir, test_run_dir}, list(runs)
    fit_run, test_run = runs[fit_run_dir], runs[test_run_dir]
    for run in (fit_run, test_run):
        assert run.exit_code == 0, f"{run.dir}: run did not finish cleanly"
        assert run.run.project == "lit-finetune"
    # offline, wandb-core leaves summary and config in the transaction log only
    assert not (fit_run.dir / "files" / "wandb-summary.json").exists()

    # metrics: one val point per epoch, the same numbers the trainer saw
    assert len(fit_run.values("val/acc")) == 2
    assert fit_run.values("epoch")[-1] == 1
    for key in ("val/acc", "val/loss", "val/f1_macro", "train/loss"):
        assert fit_run.summary[key] == pytest.approx(fit_metrics[key], rel=1e-6), key
    assert {"lr/head", "lr/backbone.layer4"} <= fit_run.summary.keys()  # applied LR per named group
    for key in ("test/acc", "test/loss", "test/f1_macro", "test/acc_class/Sandal", "test/acc_class/Ankle_boot"):
        assert test_run.summary[key] == pytest.approx(test_metrics[key], rel=1e-6), key

    # config: the resolved CLI config pushed under "cli", and the same text in the run's files
    for run, subcommand_args in ((fit_run, {"max_epochs": 2, "limit_train_batches": 2}), (test_run, {})):
        cli_config = run.config["cli"]
        assert cli_config["model"]["class_path"] == "lit_finetune.ImageClassifier"
        assert cli_config["data"]["class_path"] == "lit_finetune.data.FashionMNISTDataModule"
        assert cli_config["data"]["init_args"]["samples_per_class"] == 8
        assert cli_config["data"]["init_args"]["classes"] == [5, 6, 7, 8, 9]
        assert cli_config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
        for key, value in subcommand_args.items():
            assert cli_config["trainer"][key] == value
        saved = yaml.safe_load((run.dir / "files" / "lit_finetune_config.yaml").read_text())
        assert saved["trainer"]["max_epochs"] == cli_config["trainer"]["max_epochs"]
        # the same config in both places; link targets (num_classes, in_channels, image_size) are
        # derived from the datamodule, so neither holds them (not even at a misleading default)
        assert saved == cli_config
        assert not {"num_classes", "in_channels", "image_size"} & cli_config["model"]["init_args"].keys()
        # the module's hyperparameters, logged once by Lightning, sit beside it (flat, no duplicate tree)
        assert run.config["num_classes"] == 5 and run.config["backbone"] == "resnet_small"
    assert test_run.config["cli"]["ckpt_path"] == best

    # the confusion matrix: a PNG in the test run's media, the same pixels as the copy beside the checkpoints
    from PIL import Image

    (image_file,) = test_run.values("test/confusion_matrix/filenames")[0]
    assert image_file in test_run.files and image_file.startswith("media/images/test/confusion_matrix")
    with Image.open(test_run.dir / "files" / image_file) as img:
        logged = np.asarray(img.convert("RGB"))
    size = (test_run.summary["test/confusion_matrix/height"], test_run.summary["test/confusion_matrix/width"])
    assert logged.shape[:2] == size
    assert logged.std() > 0  # not a blank image
    (local,) = (Path(best).parent.parent / "images").glob("test_confusion_matrix_step*.png")
    with Image.open(local) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), logged)
    assert not list((fit_run.dir / "files").glob("media/images/**/*.png"))  # fit logs no images


def test_wandb_second_run_in_same_save_dir(wandb_offline: Path, fashion_root: Path) -> None:
    """Lightning's SaveConfigCallback would refuse the second run (config.yaml exists in the
    shared save_dir); here each run gets its own config, in its own run directory."""
    save_dir = wandb_offline / "wandb_runs"
    one_epoch = ("--trainer.max_epochs", "1", *_FIT)
    run_dirs = []
    for seed in (0, 1):
        cli = cli_main(["fit", *_tiny(save_dir, fashion_root, "--seed_everything", str(seed), *one_epoch)])
        assert cli.trainer.state.finished
        run_dirs.append(Path(cli.trainer.logger.experiment.dir).parent)
        wandb.finish()
    assert run_dirs[0] != run_dirs[1]

    runs = {r.dir: r for r in offline_runs(save_dir)}
    assert set(runs) == set(run_dirs)
    for seed, run_dir in enumerate(run_dirs):
        run = runs[run_dir]
        assert run.exit_code == 0
        assert run.config["cli"]["seed_everything"] == seed
        assert yaml.safe_load((run_dir / "files" / "lit_finetune_config.yaml").read_text())["seed_everything"] == seed
        assert "val/acc" in run.summary
    # the shared, unversioned copy in save_dir is overwritten (the last run's), not an error
    assert yaml.safe_load((save_dir / "config.yaml").read_text())["seed_everything"] == 1
