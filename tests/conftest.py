"""Shared fixtures. Real data only: Debian's Fashion-MNIST files and scikit-learn's digits."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
#: the pytest-xdist worker running this process ("gw0", ...), or None in a plain run
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER is not None:
    # two workers on a 2-core machine: one thread each (and in their subprocesses), not two each
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The real Fashion-MNIST IDX files; a missing dataset fails loudly (CI installs it)."""
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST not found in {FASHION_ROOT}: run `apt-get install dataset-fashion-mnist`.")
    return FASHION_ROOT


@pytest.fixture(scope="session", autouse=True)
def zoo_home(tmp_path_factory) -> Path:
    """Every test sees its own empty zoo cache ($LIT_FINETUNE_HOME) with smoke-sized builds, never
    ~/.cache/lit_finetune: a config that names ``zoo:...`` builds that entry once per test run, in seconds.
    Under pytest-xdist the workers share one home (the run's base folder), so each entry is still built once:
    the zoo's own build lock makes a second worker wait for the first one's build."""
    if XDIST_WORKER is None:
        home = tmp_path_factory.mktemp("zoo_home")
    else:
        home = tmp_path_factory.getbasetemp().parent / "zoo_home"
        home.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("LIT_FINETUNE_HOME", str(home))
    patch.setenv("LIT_FINETUNE_ZOO_SMOKE", "1")
    patch.setenv("LIT_FINETUNE_ZOO_OFFLINE", "1")
    yield home
    patch.undo()


#: seconds the session's zoo builds took (reported by the zoo tests)
ZOO_BUILD_SECONDS: list[float] = []


@pytest.fixture(scope="session")
def zoo_built(zoo_home, fashion_root) -> Path:
    """The latest version of every zoo name the configs may read built once, with the versions it depends on
    (smoke-sized, subprocess builds as a user gets them) into the session's home."""
    from lit_finetune.zoo import ensure, known_names, lookup

    start = time.perf_counter()
    for name in known_names():
        if not name.endswith("-quick"):  # the tour's short recipes: its own test builds them
            ensure(lookup(name), reason="the test session")
    ZOO_BUILD_SECONDS.append(time.perf_counter() - start)
    return zoo_home


def copy_zoo_home(source: Path, target: Path, monkeypatch) -> Path:
    """A private copy of a built zoo home, made the current one (for tests that damage entries)."""
    shutil.copytree(source, target)
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(target))
    return target


def fit_with_step_checkpoints(model, datamodule, tmp_path: Path, max_steps: int, ckpt_path: str | None = None):
    """Fit ``model`` for ``max_steps`` optimizer steps, writing ``tmp_path/steps/step=K.ckpt`` every 2 steps
    (mid-epoch resume points, atomically); validation off. Returns the trainer."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_finetune.checkpoint_io import AtomicCheckpointIO

    steps = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path, max_steps=max_steps, max_epochs=-1, deterministic=True, callbacks=[steps], limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def assert_same_training_state(full, full_trainer, resumed, resumed_trainer) -> None:
    """A resumed fit ended where the uninterrupted one did: every tensor of the module's state (networks, EMA,
    buffers), each optimizer's LRs and state, and each scheduler's state."""
    import torch

    a, b = full.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for opt_a, opt_b in zip(full_trainer.optimizers, resumed_trainer.optimizers, strict=True):
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for ca, cb in zip(full_trainer.lr_scheduler_configs, resumed_trainer.lr_scheduler_configs, strict=True):
        assert ca.scheduler.state_dict() == cb.scheduler.state_dict()


@pytest.fixture
def tiny_target(fashion_root):
    """Target-domain datamodule small enough for a few-second fit."""
    from lit_finetune.data import FashionMNISTDataModule

    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=20
    )


def quiet_trainer(tmp_path: Path, **kwargs):
    """A CPU Trainer without progress bar or summary, logging CSV into ``tmp_path``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def save_lightning_checkpoint(module, path) -> str:
    """Write ``module`` as a Lightning checkpoint (hyper-parameters included) without fitting it."""
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return str(path)


def assert_provenance(results_md, script: str, inputs: dict | None = None) -> dict:
    """``results_md`` ends with a complete provenance block from ``benchmarks/<script>`` and a JSON beside it;
    ``inputs`` (name -> file) are recorded with their sha256. Returns the block."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(REPO / "benchmarks"))
    import provenance

    results_md = Path(results_md)
    text = results_md.read_text()
    assert provenance.missing(text) == [], provenance.read(text)
    record = provenance.read(text)
    assert record["command"].startswith(f"python benchmarks/{script}")
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert record["torch_threads"] >= 1 and record["duration_s"] >= 0 and record["machine"]["cores"] >= 1
    for name, path in (inputs or {}).items():
        assert record["inputs"][name]["sha256"] == provenance.sha256(path), name
    assert json.loads(results_md.with_suffix(".json").read_text())["provenance"] == record
    return record


def shift_generator(generator, by: float) -> None:
    """Move every weight and BatchNorm running mean of a generator by ``by`` (an update the EMA must follow)."""
    import torch

    with torch.no_grad():
        for p in generator.parameters():
            p.add_(by)
        for m in generator.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(by)
