"""Fine-tuning under 2-process CPU DDP: freezing holds, unfreezing syncs, ranks agree.

``ddp_spawn`` (not ``ddp``, which would re-launch pytest) with the gloo backend on loopback.
Each rank writes what it saw into ``tmp_path``; the test process compares the files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lit_finetune import GANAugmentedClassifier, ImageClassifier
from lit_finetune.callbacks import LayerFreezing, LRWarmup
from lit_finetune.data import FashionMNISTDataModule

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]


@pytest.fixture
def loopback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gloo on loopback: works where the hostname does not resolve and keeps the test off the network."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    # a fresh free port per test; set (not deleted) so monkeypatch restores it after Lightning
    # writes its own value into os.environ
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)


def _backbone_state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in pl_module.backbone.state_dict().items()}


class RankRecorder(Callback):
    """Write per-rank snapshots: backbone at fit start and after epoch 0, final state dict, metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _path(self, trainer: L.Trainer, name: str) -> Path:
        return self.out_dir / f"rank{trainer.global_rank}_{name}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the module's on_fit_start, which reads the pretrained weights
        torch.save(_backbone_state(pl_module), self._path(trainer, "start.pt"))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # LayerFreezing (an earlier callback) has already applied this epoch's phase
        freezing = next(c for c in trainer.callbacks if isinstance(c, LayerFreezing))
        info = {
            "world_size": trainer.world_size,
            "frozen": freezing.is_frozen("backbone"),
            "frozen_groups": [g["name"] for g in trainer.optimizers[0].param_groups if g.get("frozen")],
        }
        self._path(trainer, f"epoch{trainer.current_epoch}_start.json").write_text(json.dumps(info))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after this epoch's validation, before the next epoch's unfreeze
        torch.save(_backbone_state(pl_module), self._path(trainer, f"epoch{trainer.current_epoch}_end.pt"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._path(trainer, f"epoch{trainer.current_epoch}_metrics.json").write_text(json.dumps(metrics))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, self._path(trainer, "end.pt"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self._path(trainer, "metrics.json").write_text(json.dumps(metrics))


def _tiny_datamodule(root: Path, batch_size: int = 8) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        root=str(root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=40, batch_size=batch_size, seed=0
    )


def _two_process_trainer(tmp_path: Path, callbacks: list[Callback], strategy: str = "ddp_spawn") -> L.Trainer:
    """2 CPU processes, 2 epochs of 2 batches, one validation batch, nothing written but what callbacks write."""
    return L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip


def _make_pretrained(path: Path) -> dict[str, torch.Tensor]:
    """A stand-in for the source-pretrained checkpoint: a state dict with non-default BN statistics."""
    torch.manual_seed(123)
    source = ImageClassifier(num_classes=5)
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    torch.save(source.state_dict(), path)
    return {k[len("backbone.") :]: v.clone() for k, v in source.state_dict().items() if k.startswith("backbone.")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]}"


def test_ddp_freeze_then_unfreeze_stays_in_sync(tmp_path: Path, fashion_root: Path, loopback_env: None) -> None:
    pretrained = _make_pretrained(tmp_path / "pretrained.pt")
    out = tmp_path / "ranks"
    out.mkdir()
    L.seed_everything(0, workers=True)
    model = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "pretrained.pt"), backbone_lr_ratio=0.1)
    assert model.load_report is None  # read when the fit starts, on every rank
    head_init = model.head.weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            LayerFreezing(["backbone"], unfreeze_at_epoch=1),
            LRWarmup(warmup_steps=2),
            RankRecorder(str(out)),
        ],
    )
    trainer.fit(model, datamodule=_tiny_datamodule(fashion_root))
    assert trainer.state.finished, trainer.state.status

    ranks = (0, 1)
    for r in ranks:
        for name in ("start.pt", "epoch0_end.pt", "epoch1_end.pt", "end.pt", "metrics.json"):
            assert (out / f"rank{r}_{name}").is_file(), f"rank {r} did not write {name}"

    for r in ranks:
        e0 = json.loads((out / f"rank{r}_epoch0_start.json").read_text())
        e1 = json.loads((out / f"rank{r}_epoch1_start.json").read_text())
        assert e0["world_size"] == 2
        assert e0["frozen"] and not e1["frozen"]
        assert e0["frozen_groups"] and all(n.startswith("backbone") for n in e0["frozen_groups"])
        assert e1["frozen_groups"] == []

        # the backbone starts from the pretrained weights (BN statistics included) ...
        start = torch.load(out / f"rank{r}_start.pt", weights_only=True)
        _assert_same(start, pretrained, f"rank {r}: backbone at fit start is not the pretrained one")
        # ... and the frozen phase leaves it untouched: weights and BN running statistics
        _assert_same(
            torch.load(out / f"rank{r}_epoch0_end.pt", weights_only=True),
            pretrained,
            f"rank {r}: frozen backbone changed during epoch 0",
        )

    end = [torch.load(out / f"rank{r}_end.pt", weights_only=True) for r in ranks]
    # after unfreezing, the backbone trained ...
    changed = [k for k, v in pretrained.items() if not torch.equal(end[0][f"backbone.{k}"], v)]
    assert any(k.endswith("weight") and "conv" in k for k in changed), "backbone did not train after unfreezing"
    # ... and both ranks hold the very same weights (DDP synced the unfrozen parameters)
    _assert_same(end[0], end[1], "ranks disagree after unfreezing")
    # the head trained (it is never frozen), and ddp_spawn handed rank 0's weights back to this process
    assert not torch.equal(end[0]["head.weight"], head_init)
    _assert_same(
        {k: v.detach() for k, v in model.state_dict().items()}, end[0], "model in the main process is not rank 0's"
    )

    # validation metrics (torchmetrics sync + sync_dist) agree across ranks in every epoch
    for epoch in (0, 1):
        m0, m1 = (json.loads((out / f"rank{r}_epoch{epoch}_metrics.json").read_text()) for r in ranks)
        assert {"val/loss", "val/acc", "val/f1_macro"} <= m0.keys()
        assert m0 == pytest.approx(m1, abs=1e-6), f"epoch {epoch}: {m0} vs {m1}"


@pytest.mark.parametrize(
    "launch",
    [
        ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"],
        ["--config", str(REPO / "configs/trainer/ddp_cpu.yaml")],  # as shipped: strategy ddp, re-launches the CLI
    ],
    ids=["ddp_spawn", "shipped_ddp_cpu_yaml"],
)
def test_cli_fit_ddp(launch: list[str], tmp_path: Path, fashion_root: Path, loopback_env: None) -> None:
    """``lit-finetune fit`` with the shipped fine-tune config on 2 CPU processes.

    Run from ``tmp_path`` so the config's relative run directories land there, with the
    source checkpoint where ``pretrain_source.yaml`` would have written it: the chain
    pretrain -> fine-tune as shipped, only shortened.
    """
    shipped = yaml.safe_load((REPO / "configs/classifier/finetune_target.yaml").read_text())
    pretrained = tmp_path / "runs/classifier/pretrain_source/checkpoints/best.ckpt"  # not the config's zoo name
    pretrained.parent.mkdir(parents=True)
    torch.manual_seed(7)
    source = ImageClassifier(num_classes=5)
    torch.save({"state_dict": source.state_dict(), "epoch": 0}, pretrained)  # a Lightning-style checkpoint

    # the shipped config unfreezes at epoch 1 and rewrites last.ckpt every epoch
    assert next(c for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("LayerFreezing"))[
        "init_args"
    ]["unfreeze_at_epoch"] == 1

    args = [
        sys.executable, "-m", "lit_finetune.cli", "fit",
        "--config", str(REPO / "configs/classifier/finetune_target.yaml"),
        *launch,
        "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.init_args.pretrained", str(pretrained),
        "--data.root", str(fashion_root),
        "--data.samples_per_class", "8",
        "--data.val_split", "40",
        "--data.batch_size", "8",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run_dir = tmp_path / shipped["trainer"]["default_root_dir"]
    checkpoints = run_dir / "checkpoints"
    assert {p.name for p in checkpoints.glob("*.ckpt")} == {"best.ckpt", "last.ckpt"}
    source_state = source.state_dict()
    backbone_keys = [k for k in source_state if k.startswith("backbone.")]
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 4
    trained = [k for k in backbone_keys if not torch.equal(saved["state_dict"][k], source_state[k])]
    assert any(k.endswith("conv1.weight") for k in trained), "backbone did not train after unfreezing"
    # CSVLogger: one versioned dir with the metrics and, beside them, the resolved config
    versions = list((run_dir / "lightning_logs").glob("version_*"))
    assert len(versions) == 1, versions
    assert "val/acc" in (versions[0] / "metrics.csv").read_text().splitlines()[0]
    resolved = yaml.safe_load((versions[0] / "config.yaml").read_text())
    strategy = "ddp_spawn" if "ddp_spawn" in launch else "ddp"
    assert resolved["trainer"]["strategy"] == strategy and str(resolved["trainer"]["devices"]) == "2"


class RankStateWriter(Callback):
    """Each rank writes its full state dict at the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}
        if hasattr(pl_module, "cost"):  # MetaPretrainer: what meta-training cost, as this rank counted it
            state.update({f"cost.{k}": torch.tensor(v) for k, v in pl_module.cost.items()})
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_end.pt")


class NoiseRecorder(Callback):
    """Each rank writes the noise of its training forwards: the first z rows its DCGAN generator trained on,
    or (``vae=True``) the first reparameterisation noise ``eps = (z - mu) / std`` of each VAE training step."""

    def __init__(self, out_dir: str, vae: bool = False) -> None:
        self.out_dir, self.vae, self.drawn = Path(out_dir), vae, []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.vae:  # the raw generator trains on z (the EMA generator samples)
            pl_module.generator.register_forward_pre_hook(
                lambda module, args: self.drawn.append(args[0][0, :3].detach().clone()) if module.training else None
            )
            return
        encode, posterior = pl_module.encode, {}

        def recording_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior["mu"], posterior["logvar"] = encode(x)
            return posterior["mu"], posterior["logvar"]

        def record_eps(module: torch.nn.Module, args: tuple) -> None:
            if module.training:
                eps = (args[0] - posterior["mu"]) / (0.5 * posterior["logvar"]).exp()
                self.drawn.append(eps[0, :3].detach().clone())

        pl_module.encode = recording_encode
        pl_module.decoder.register_forward_pre_hook(record_eps)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(torch.stack(self.drawn), self.out_dir / f"rank{trainer.global_rank}_noise.pt")


def _assert_noise_differs_per_rank(out: Path) -> None:
    noise = [torch.load(out / f"rank{r}_noise.pt", weights_only=True) for r in (0, 1)]
    assert len(noise[0]) == len(noise[1]) >= 4
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(noise[0], noise[1]))  # each rank its own noise
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(noise[0], noise[0][1:]))  # new noise every draw


def test_dcgan_freezed_fine_tune_on_two_processes_stays_in_sync(tmp_path: Path, fashion_root: Path, loopback_env: None) -> None:
    """FreezeD fine-tuning under 2-process DDP: frozen D block unchanged, G, D and the EMA equal on both ranks."""
    from lit_finetune import DCGAN

    tiny = dict(latent_dim=16, generator_width=8, discriminator_width=8, diffaugment="translation")
    torch.manual_seed(5)
    source = DCGAN(**tiny)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    out = tmp_path / "ranks"
    out.mkdir()
    L.seed_everything(0)
    model = DCGAN(**tiny, pretrained=str(tmp_path / "source.ckpt"))
    trainer = _two_process_trainer(
        tmp_path,
        [
            LayerFreezing(["discriminator.blocks.0"], unfreeze_at_epoch=None),
            RankStateWriter(str(out)),
            NoiseRecorder(str(out)),
        ],
        strategy="ddp_spawn_find_unused_parameters_true",
    )
    trainer.fit(model, datamodule=_tiny_datamodule(fashion_root))
    end = [torch.load(out / f"rank{r}_end.pt", weights_only=True) for r in (0, 1)]
    _assert_same(end[0], end[1], "ranks disagree after DCGAN fine-tuning")
    _assert_noise_differs_per_rank(out)  # the weights agree although each rank drew its own z
    src = source.state_dict()
    frozen = [k for k in src if k.startswith("discriminator.blocks.0.")]
    assert frozen and all(torch.equal(end[0][k], src[k]) for k in frozen)  # FreezeD held under DDP
    assert any(not torch.equal(end[0][k], src[k]) for k in src if k.startswith("generator."))
    assert any(not torch.equal(end[0][k], src[k]) for k in src if k.startswith("discriminator.head."))


def test_vae_transfer_on_two_processes_stays_in_sync(tmp_path: Path, fashion_root: Path, loopback_env: None) -> None:
    """The VAE transfer under 2-process DDP with a frozen encoder: ranks agree, the encoder stays the source's."""
    from lit_finetune import VAE

    tiny = dict(latent_dim=4, encoder_width=4, decoder_width=4)
    torch.manual_seed(5)
    source = VAE(**tiny)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    out = tmp_path / "ranks"
    out.mkdir()
    L.seed_everything(0)
    model = VAE(**tiny, pretrained=str(tmp_path / "source.ckpt"))
    trainer = _two_process_trainer(
        tmp_path,
        [
            LayerFreezing(["encoder"], unfreeze_at_epoch=None),
            RankStateWriter(str(out)),
            NoiseRecorder(str(out), vae=True),
        ],
    )
    trainer.fit(model, datamodule=_tiny_datamodule(fashion_root))
    end = [torch.load(out / f"rank{r}_end.pt", weights_only=True) for r in (0, 1)]
    _assert_same(end[0], end[1], "ranks disagree after VAE transfer")
    _assert_noise_differs_per_rank(out)
    src = source.state_dict()
    assert all(torch.equal(end[0][k], src[k]) for k in src if k.startswith("encoder."))
    assert any(not torch.equal(end[0][k], src[k]) for k in src if k.startswith("decoder."))


class SyntheticRecordingClassifier(GANAugmentedClassifier):
    """Keeps a fingerprint (the image sum) of every synthetic batch it draws."""

    def draw_synthetic(self, n: int):
        x, y, stats = super().draw_synthetic(n)
        self.drawn = [*getattr(self, "drawn", []), float(x.double().sum())]
        return x, y, stats


class DrawnWriter(Callback):
    """Each rank writes its state dict and the fingerprints of the synthetic batches it drew."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "drawn": pl_module.drawn}, self.out_dir / f"rank{trainer.global_rank}_end.pt")


def test_gan_augmented_fit_on_two_processes_draws_different_samples_per_rank(
    tmp_path: Path, fashion_root: Path, loopback_env: None
) -> None:
    """GAN-augmented classification under 2-process DDP: it completes, the ranks' classifiers agree, and each
    rank trains on its own synthetic images (the generator is read from its checkpoint on each rank)."""
    from conftest import save_lightning_checkpoint

    from lit_finetune import DCGAN

    generator = DCGAN(latent_dim=16, generator_width=8, discriminator_width=8, num_classes=5, conditional=True)
    ckpt = save_lightning_checkpoint(generator, tmp_path / "cdcgan.ckpt")
    out = tmp_path / "ranks"
    out.mkdir()
    L.seed_everything(0)
    model = SyntheticRecordingClassifier(5, generator=ckpt, synthetic_ratio=1.0)
    trainer = _two_process_trainer(tmp_path, [DrawnWriter(str(out))])
    trainer.fit(model, datamodule=_tiny_datamodule(fashion_root))
    end = [torch.load(out / f"rank{r}_end.pt", weights_only=True) for r in (0, 1)]
    _assert_same(end[0]["state"], end[1]["state"], "ranks disagree after GAN-augmented training")
    assert len(end[0]["drawn"]) == len(end[1]["drawn"]) == 4  # one synthetic batch per training batch
    assert all(a != b for a, b in zip(end[0]["drawn"], end[1]["drawn"]))  # each rank drew its own samples
    assert len(set(end[0]["drawn"])) == 4  # and new ones every batch


class FirstBatchRecorder(Callback):
    """Write each rank's first training batch (its episodes)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = self.out_dir / f"rank{trainer.global_rank}_batch.pt"
        if not path.exists():
            torch.save([t.clone() for t in batch], path)


def test_meta_pretraining_on_two_processes_averages_the_outer_update(
    tmp_path: Path, fashion_root: Path, loopback_env: None
) -> None:
    """Reptile under 2-process DDP: each rank draws its own episodes, the outer direction is averaged over ranks
    (the manual update bypasses DDP's gradient hooks), so the meta weights stay equal on both ranks."""
    from lit_finetune import MetaPretrainer
    from lit_finetune.data import EpisodicDataModule

    out = tmp_path / "ranks"
    out.mkdir()
    L.seed_everything(0)
    model = MetaPretrainer(num_classes=3, inner_steps=2)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    images = FashionMNISTDataModule(root=str(fashion_root), classes=[0, 1, 2, 3], val_split=40, seed=0)
    dm = EpisodicDataModule(images, ways=3, shots=1, queries=1, episodes_per_epoch=4, meta_batch_size=1, val_episodes=2)
    trainer = _two_process_trainer(tmp_path, [RankStateWriter(str(out)), FirstBatchRecorder(str(out))])
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished, trainer.state.status
    first = [torch.load(out / f"rank{r}_batch.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(first[0][0], first[1][0])  # different episodes per rank
    end = [torch.load(out / f"rank{r}_end.pt", weights_only=True) for r in (0, 1)]
    params = [{k: e[k] for k in init} for e in end]
    _assert_same(params[0], params[1], "ranks disagree after meta-training")
    assert any(not torch.equal(params[0][k], v) for k, v in init.items() if k.startswith("backbone."))
    # the cost counts every rank's episodes: 2 ranks x 2 epochs x 2 batches x 1 episode (support 3 + query 3)
    assert [int(e["cost.episodes"]) for e in end] == [8, 8] and [int(e["cost.images"]) for e in end] == [48, 48]
