"""Intra-cluster diversity (an intra-LPIPS-like measure in the extractor's feature space): the function, the
torchmetrics Metric, its place in GenerativeMetrics, and the DCGAN logging it at validation and test."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import quiet_trainer, save_lightning_checkpoint
from lit_finetune import DCGAN, ImageClassifier
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.metrics import GenerativeMetrics, IntraClusterDiversity, intra_cluster_distance

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)


def test_intra_cluster_distance_by_hand():
    e = torch.eye(4)
    anchors = e[:3]  # three clusters, one left empty
    features = torch.stack([e[0], 3 * e[0], e[1], e[1] + e[3]])  # a copy (scaled: same direction) and a variation
    distance, sizes = intra_cluster_distance(features, anchors)
    assert sizes.tolist() == [2, 2, 0]
    # cluster 0: distance 0; cluster 1: ||e1 - (e1 + e3)/sqrt(2)||; the mean over the two clusters of >= 2 members
    expected = (0.0 + float(torch.linalg.norm(e[1] - (e[1] + e[3]) / math.sqrt(2)))) / 2
    assert distance == pytest.approx(expected, rel=1e-6)
    assert math.isnan(intra_cluster_distance(e[:2], e[:2])[0])  # no cluster with two members
    with pytest.raises(ValueError, match="same D"):
        intra_cluster_distance(torch.zeros(3, 4), torch.zeros(2, 5))


def test_copies_of_the_training_images_score_zero_and_variations_score_more():
    torch.manual_seed(0)
    anchors = torch.randn(10, 32)
    copies = anchors.repeat(20, 1)
    near = copies + 0.05 * torch.randn_like(copies)
    far = copies + 0.5 * torch.randn_like(copies)
    scores = [intra_cluster_distance(f, anchors)[0] for f in (copies, near, far)]
    assert scores[0] == pytest.approx(0.0, abs=1e-7) and 0 < scores[1] < scores[2]
    # chunking changes nothing
    assert intra_cluster_distance(far, anchors, chunk_size=7)[0] == pytest.approx(scores[2], rel=1e-9)


def test_metric_accumulates_and_reports_real_twins():
    torch.manual_seed(0)
    anchors, fake, real = torch.randn(5, 8), torch.randn(60, 8), torch.randn(40, 8)
    metric = IntraClusterDiversity()
    with pytest.raises(ValueError, match="set_anchors"):
        metric.compute()
    metric.set_anchors(anchors)
    for chunk in fake.split(25):
        metric.update(chunk)
    metric.update(real, real=True)
    out = metric.compute()
    assert float(out["intra_cluster_distance"]) == pytest.approx(intra_cluster_distance(fake, anchors)[0], rel=1e-6)
    expected_real = intra_cluster_distance(real, anchors)[0]
    assert float(out["intra_cluster_distance_real"]) == pytest.approx(expected_real, rel=1e-6)
    sizes = intra_cluster_distance(fake[:3], anchors)[1]
    metric.reset()  # forgets the samples, keeps the anchors
    metric.update(fake[:3])
    assert set(metric.compute()) == {"intra_cluster_distance", "clusters_occupied"}
    assert float(metric.compute()["clusters_occupied"]) == pytest.approx(float((sizes > 0).float().mean()))


@pytest.fixture(scope="module")
def extractor_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path_factory.mktemp("ext") / "e.ckpt")


def test_generative_metrics_measure_memorisation_around_the_training_images(extractor_ckpt, fashion_root):
    images, _ = FashionMNISTDataModule(root=str(fashion_root)).read_split("test")
    images = images[:120].float() / 127.5 - 1
    train, held_out = images[:10], images[10:]
    metrics = GenerativeMetrics(extractor_ckpt, kid_subset_size=20, kid_subsets=5)
    metrics.update(real=held_out, fake=train.repeat(5, 1, 1, 1))
    assert "intra_cluster_distance" not in metrics.compute()  # no training images given: not measured
    metrics.set_training_images(train)
    metrics.reset()
    metrics.update(real=held_out, fake=train.repeat(5, 1, 1, 1))  # a generator that only copies
    out = metrics.compute()
    assert float(out["intra_cluster_distance"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["clusters_occupied"]) == 1.0
    assert float(out["intra_cluster_distance_real"]) > 0.01  # real held-out images vary around them
    assert list(metrics.state_dict()) == []  # nothing for a parent's checkpoint


def test_dcgan_logs_diversity_at_validation_and_test(tmp_path, fashion_root, extractor_ckpt):
    def data():
        return FashionMNISTDataModule(
            root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=4, val_split=50, batch_size=10,
        )  # fmt: skip

    keys = {"intra_cluster_distance", "clusters_occupied", "intra_cluster_distance_real", "clusters_occupied_real"}
    model = DCGAN(**TINY, feature_extractor=extractor_ckpt)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=data())
    assert {f"val/{k}" for k in keys} <= trainer.callback_metrics.keys()
    # a test run on a fresh datamodule (no training split read yet): its clusters are the same 20 images
    tested = quiet_trainer(tmp_path, limit_test_batches=2).test(model, datamodule=data(), verbose=False)[0]
    assert {f"test/{k}" for k in keys} <= tested.keys()
    assert 0 < tested["test/clusters_occupied_real"] <= 1 and tested["test/intra_cluster_distance_real"] > 0
    assert len(model.generative_metrics.diversity.anchors) == 20
