"""FID / KID / class statistics in the feature space of an in-project classifier (lit_finetune.metrics).

The extractor here is a tiny one: ``ImageClassifier(num_classes=10)`` fit for 30 steps on real
Fashion-MNIST (about 40 % test accuracy, far above the 10 % of chance), saved as a Lightning
checkpoint and read back through ``FeatureExtractor.from_checkpoint``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from conftest import REPO, save_lightning_checkpoint
from lit_finetune import ImageClassifier
from lit_finetune.cli import cli_main
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.metrics import (
    DEFAULT_EXTRACTOR_PATH,
    EXTRACTOR_COMMAND,
    ExtractorNotFoundError,
    FeatureExtractor,
    GenerativeMetrics,
)

CONFIG = REPO / "configs" / "metrics" / "feature_extractor.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
N = 300  # images per set: enough for stable FID/KID orderings, small enough for a few seconds on a CPU


@pytest.fixture(scope="module")
def extractor_ckpt(tmp_path_factory, fashion_root) -> Path:
    torch.manual_seed(0)
    data = FashionMNISTDataModule(root=str(fashion_root), val_split=500, batch_size=64)
    model = ImageClassifier(num_classes=10)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=30, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("extractor") / "extractor.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def extractor(extractor_ckpt) -> FeatureExtractor:
    return FeatureExtractor.from_checkpoint(extractor_ckpt)


@pytest.fixture(scope="module")
def test_images(fashion_root) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 3 * N Fashion-MNIST test images in [-1, 1] and their labels."""
    images, labels = FashionMNISTDataModule(root=str(fashion_root)).read_split("test")
    return images[: 3 * N].float() / 127.5 - 1, labels[: 3 * N]


def _scores(extractor, real, fake, **kwargs) -> dict[str, float]:
    metrics = GenerativeMetrics(extractor, **kwargs)
    metrics.update(real=real, fake=fake)
    return {k: float(v) for k, v in metrics.compute().items()}


# -- the extractor ----------------------------------------------------------------------------------
def test_missing_extractor_error_names_the_command(tmp_path):
    assert EXTRACTOR_COMMAND == "lit-finetune fit --config configs/metrics/feature_extractor.yaml"
    assert (REPO / EXTRACTOR_COMMAND.split("--config ")[1]).is_file()
    missing = tmp_path / "nowhere" / "best.ckpt"
    for build in (lambda: FeatureExtractor.from_checkpoint(missing), lambda: GenerativeMetrics(str(missing))):
        with pytest.raises(FileNotFoundError) as err:
            build()
        assert isinstance(err.value, ExtractorNotFoundError)
        assert EXTRACTOR_COMMAND in str(err.value) and str(missing) in str(err.value)


def test_extractor_reads_the_classifier(extractor, extractor_ckpt, test_images):
    classifier = ImageClassifier.load_from_checkpoint(extractor_ckpt, weights_only=True).eval()
    x = test_images[0][:16]
    with torch.no_grad():
        expected = classifier.backbone(classifier.normalize_input(x))
        torch.testing.assert_close(extractor(x), expected)
        torch.testing.assert_close(extractor.classify(x), classifier(x))
    assert (extractor.num_features, extractor.num_classes) == (classifier.head.in_features, 10)
    assert extractor(x).shape == (16, extractor.num_features)


def test_extractor_is_frozen_and_stays_in_eval(extractor, test_images):
    parent = nn.Module()
    parent.extractor = extractor
    parent.train()  # what Lightning does to a module before every training epoch
    assert not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    bn_before = {k: v.clone() for k, v in extractor.state_dict().items() if "running" in k}
    x = test_images[0][:8].clone().requires_grad_(True)
    features = extractor(x)
    assert not features.requires_grad  # no graph: the metric never backpropagates into G through it
    assert all(torch.equal(v, extractor.state_dict()[k]) for k, v in bn_before.items())  # BN statistics untouched


def test_extractor_converts_channels_and_size(extractor, test_images):
    gray = test_images[0][:8]
    # grayscale repeated to RGB converts back (torchvision's ITU-R 601 weights sum to 0.9999, hence the atol)
    torch.testing.assert_close(extractor.prepare(gray.expand(-1, 3, -1, -1)), gray, atol=2e-4, rtol=0)
    torch.testing.assert_close(extractor(gray.expand(-1, 3, -1, -1)), extractor(gray), atol=1e-2, rtol=1e-2)
    assert extractor(torch.rand(4, 3, 32, 32) * 2 - 1).shape == (4, extractor.num_features)
    upsampled = torch.nn.functional.interpolate(gray, size=56, mode="nearest")
    close = torch.nn.functional.cosine_similarity(extractor(upsampled), extractor(gray)).min()
    assert close > 0.9  # resized back to 28 px: nearly the same features
    with pytest.raises(ValueError, match="C in"):
        extractor(torch.zeros(2, 2, 28, 28))


def test_extractor_meets_the_torchmetrics_feature_contract(extractor, test_images):
    """FrechetInceptionDistance(feature=extractor) takes the extractor as it is ([-1, 1] floats in,
    no dummy forward because it has ``num_features``) and agrees with GenerativeMetrics, which
    extracts once and hands torchmetrics the features."""
    x = test_images[0]
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(x[:N], real=True)
    fid.update(x[N : 2 * N], real=False)
    direct = fid.compute().item()
    assert direct == pytest.approx(_scores(extractor, x[:N], x[N : 2 * N])["fid"], rel=1e-5)


# -- FID and KID ------------------------------------------------------------------------------------
def test_fid_and_kid_self_heldout_noise(extractor, test_images):
    x = test_images[0]
    real, heldout = x[:N], x[N : 2 * N]
    noise = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same, other, rand = (_scores(extractor, real, fake) for fake in (real, heldout, noise))
    # FID(X, X): equal means and covariances, so 0 up to the float64 eigenvalue round-off of sqrtm(S S)
    assert abs(same["fid"]) < 1e-3
    assert same["fid"] < other["fid"] < rand["fid"] / 10  # a held-out real set is close, noise is far
    assert rand["fid"] > 10
    # KID(X, X) is not exactly 0: with the same images on both sides the unbiased MMD estimator becomes
    # -2 / (m - 1) * (mean kernel diagonal - mean kernel), O(1/m); at m = 300 it is a few percent of noise's
    assert abs(same["kid_mean"]) < 0.05 * rand["kid_mean"]
    assert abs(other["kid_mean"]) < 0.05 * rand["kid_mean"]
    assert rand["kid_mean"] > 0.5


def test_kid_subset_size_adapts_to_small_counts(extractor, test_images):
    x = test_images[0]
    metrics = GenerativeMetrics(extractor, kid_subset_size=1000, kid_subsets=10)
    metrics.update(real=x[:12], fake=x[12:19])
    scores = metrics.compute()
    assert metrics.kid.subset_size == 7  # min(1000, 12 real, 7 fake)
    assert torch.isfinite(scores["kid_mean"]) and torch.isfinite(scores["fid"])
    metrics.reset()
    metrics.update(real=x[:5], fake=x[5:6])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.compute()


def test_kid_is_reproducible_and_leaves_the_global_rng_alone(extractor, test_images):
    x = test_images[0]
    metrics = GenerativeMetrics(extractor, kid_subset_size=50, kid_subsets=20)
    metrics.update(real=x[:N], fake=x[N : 2 * N])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = metrics.compute()
    assert torch.equal(torch.get_rng_state(), state)
    metrics.kid._computed = None  # force a second draw of the subsets
    assert metrics.compute()["kid_mean"] == first["kid_mean"]
    assert first["kid_std"] > 0  # subsets of 50 out of 300 differ


def test_autocast_changes_nothing(extractor, test_images):
    """Lightning runs steps under autocast with bf16-mixed: features stay float32 and KID's kernel
    sums are not computed in bf16 (where they round to 0)."""
    x = test_images[0]
    plain = _scores(extractor, x[:N], x[N : 2 * N], kid_subset_size=100, kid_subsets=10)
    metrics = GenerativeMetrics(extractor, kid_subset_size=100, kid_subsets=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert extractor(x[:4]).dtype == torch.float32
        metrics.update(real=x[:N], fake=x[N : 2 * N])
        scores = metrics.compute()
    assert all(v.dtype == torch.float32 for v in scores.values())
    assert {k: float(v) for k, v in scores.items()} == pytest.approx(plain, rel=1e-5)


def test_chunked_updates_match_one_update(extractor, test_images):
    x = test_images[0]
    whole = _scores(extractor, x[:N], x[N : 2 * N])
    chunked = GenerativeMetrics(extractor, chunk_size=64)
    for i in range(0, N, 100):  # as in validation_step: batch by batch, chunked inside
        chunked.update(real=x[i : i + 100], fake=x[N + i : N + i + 100])
    assert {k: float(v) for k, v in chunked.compute().items()} == pytest.approx(whole, rel=1e-4, abs=1e-6)


# -- class statistics -------------------------------------------------------------------------------
def test_class_counts_and_label_agreement(extractor, test_images):
    x, y = test_images[0][: 2 * N], test_images[1][: 2 * N]
    metrics = GenerativeMetrics(extractor)
    pred = extractor.classify(x).argmax(dim=1)
    counts = metrics.class_counts(x)
    assert counts.shape == (10,) and counts.sum() == len(x)
    assert torch.equal(counts, torch.bincount(pred, minlength=10))
    assert metrics.label_agreement(x, pred) == 1.0  # labelled with its own predictions
    accuracy = metrics.label_agreement(x, y)
    assert accuracy == pytest.approx((pred == y).double().mean().item())
    assert accuracy > 0.3  # the tiny extractor has learned something
    # shuffled (about balanced) labels: chance, 0.1, whatever the predictions (binomial std at n=600: 0.012)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert metrics.label_agreement(x, shuffled) == pytest.approx(0.1, abs=0.04)


def test_labels_map_through_classes(extractor, test_images):
    """A target datamodule relabels classes 5-9 as 0-4; ``classes`` maps them back to extractor ids."""
    x, y = test_images
    keep = y >= 5
    target = GenerativeMetrics(extractor, classes=[5, 6, 7, 8, 9])
    plain = GenerativeMetrics(extractor)
    assert target.label_agreement(x[keep], y[keep] - 5) == plain.label_agreement(x[keep], y[keep])
    with pytest.raises(ValueError, match="labels must lie"):
        target.label_agreement(x[:2], torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="classes must be"):
        GenerativeMetrics(extractor, classes=[5, 10])


def test_update_accumulates_counts_and_agreement(extractor, test_images):
    x, y = test_images
    n = N // 2
    metrics = GenerativeMetrics(extractor)
    metrics.update(real=x[:n])
    for i in range(0, 2 * n, n):  # fakes in two batches, with the labels they were "generated" for
        metrics.update(fake=x[i : i + n], fake_labels=y[i : i + n])
    scores = metrics.compute()
    assert float(scores["label_agreement"]) == pytest.approx(metrics.label_agreement(x[: 2 * n], y[: 2 * n]))
    assert torch.equal(metrics.compute_class_counts(), metrics.class_counts(x[: 2 * n]))
    metrics.reset()
    with pytest.raises(ValueError, match="at least 2"):  # reset forgets the real images too
        metrics.compute()
    metrics.update(real=x[:n], fake=x[n : 2 * n])  # no labels: no agreement key
    assert set(metrics.compute()) == {"fid", "kid_mean", "kid_std"}
    with pytest.raises(ValueError, match="one label per image"):
        metrics.update(fake=x[:4], fake_labels=y[:3])


def test_metrics_add_nothing_to_a_parent_module(extractor, test_images):
    """The extractor is read from its file: no parameters for optimizers or DDP, no checkpoint keys,
    unaffected by the parent's ``train()`` and dtype casts, moved by its ``.to()``."""
    parent = nn.Module()
    parent.gen_metrics = GenerativeMetrics(extractor)
    assert list(parent.parameters()) == [] and list(parent.state_dict()) == []
    parent.train()
    assert not parent.gen_metrics.extractor.training
    parent.to(torch.float64)  # e.g. a bf16-true / double run casting the whole LightningModule
    assert all(p.dtype == torch.float32 for p in parent.gen_metrics.extractor.parameters())
    x = test_images[0]
    parent.gen_metrics.update(real=x[:50], fake=x[50:100])
    assert torch.isfinite(parent.gen_metrics.compute()["fid"])


# -- processes --------------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, ckpt: str, images: torch.Tensor, labels: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not enter OpenMP regions of the parent's thread pool (libgomp hangs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = GenerativeMetrics(FeatureExtractor.from_checkpoint(ckpt), kid_subset_size=100, kid_subsets=10)
        half = slice(rank * N // 2, (rank + 1) * N // 2)
        metrics.update(real=images[:N][half], fake=images[N:][half], fake_labels=labels[N:][half])
        scores = metrics.compute()
        scores["counts"] = metrics.compute_class_counts()
        torch.save(scores, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(extractor, extractor_ckpt, test_images, tmp_path, monkeypatch):
    """Each rank adds half of the images; compute() returns, on both ranks, what one process gets for all."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, y = test_images[0][: 2 * N], test_images[1][: 2 * N]
    # fork: the workers need nothing re-imported (spawn would re-import Lightning, tens of seconds on a busy CPU)
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(port, str(extractor_ckpt), x, y, str(tmp_path)), nprocs=2, start_method="fork"
    )
    single = GenerativeMetrics(extractor, kid_subset_size=100, kid_subsets=10)
    single.update(real=x[: N // 2], fake=x[N : N + N // 2], fake_labels=y[N : N + N // 2])
    single.update(real=x[N // 2 : N], fake=x[N + N // 2 :], fake_labels=y[N + N // 2 :])
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got.pop("counts"), single.compute_class_counts())
        for key, value in expected.items():
            assert float(got[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-7), key


# -- the config that trains the extractor ---------------------------------------------------------------
def test_extractor_config_writes_the_default_path(fashion_root, tmp_path, monkeypatch):
    config = yaml.safe_load(CONFIG.read_text())
    assert config["data"]["init_args"]["classes"] is None  # all ten classes
    assert config["model"]["init_args"]["backbone"] == "resnet_small"
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "--config", str(CONFIG), "--data.init_args.root", str(fashion_root), "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", *QUIET]
    )  # fmt: skip
    assert cli.trainer.global_step == 3
    assert (tmp_path / DEFAULT_EXTRACTOR_PATH).is_file()
    assert (tmp_path / DEFAULT_EXTRACTOR_PATH).with_name("last.ckpt").is_file()
    extractor = FeatureExtractor.from_checkpoint()  # the default path, relative to the working directory
    assert (extractor.num_classes, extractor.in_channels, extractor.image_size) == (10, 1, 28)


def test_extractor_loads_a_net_not_the_lightning_module(tmp_path):
    """metrics/ imports no LightningModule (modules/dcgan.py imports metrics); the rebuilt net
    gives the classifier's own features and logits."""
    import ast

    from conftest import REPO, save_lightning_checkpoint
    from lit_finetune import ImageClassifier
    from lit_finetune.metrics import FeatureExtractor

    for path in (REPO / "lit_finetune/metrics").glob("*.py"):
        imported = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert not any(m and m.startswith("lit_finetune.modules") for m in imported), path
    torch.manual_seed(0)
    classifier = ImageClassifier(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        classifier.input_mean.fill_(0.3), classifier.input_std.fill_(0.4)
    path = save_lightning_checkpoint(classifier, tmp_path / "c.ckpt")
    extractor, direct = FeatureExtractor.from_checkpoint(path), FeatureExtractor(classifier)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.allclose(extractor(x), direct(x), atol=1e-6)
    assert torch.allclose(extractor.classify(x), classifier(x), atol=1e-5)



def test_extractor_from_a_peft_checkpoint_keeps_its_updates(tmp_path):
    from lit_finetune.metrics import FeatureExtractor

    torch.manual_seed(0)
    classifier = ImageClassifier(num_classes=10, peft="lora").eval()
    with torch.no_grad():
        for p in classifier.peft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    extractor = FeatureExtractor.from_checkpoint(save_lightning_checkpoint(classifier, tmp_path / "lora.ckpt"))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(extractor.classify(x), classifier(x), rtol=1e-5, atol=1e-5)
