"""Episodic meta-pretraining: N-way K-shot episodes from the source training split, Reptile's and first-order
MAML's outer updates to the arithmetic, BatchNorm's running statistics, the checkpoint as an ordinary source,
and resuming."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from lit_finetune import ImageClassifier, MetaPretrainer
from lit_finetune.checkpoint_io import AtomicCheckpointIO
from lit_finetune.data import EpisodeDataset, EpisodicDataModule, FashionMNISTDataModule
from lit_finetune.data.tensor_dataset import to_signed_float
from lit_finetune.transfer.meta import adapt, batch_statistics, query_step, reptile_direction, trainable_weights


def _episodic(fashion_root, augment: bool = False, **kwargs) -> EpisodicDataModule:
    source = FashionMNISTDataModule(root=str(fashion_root), classes=[0, 1, 2, 3, 4], val_split=0.1, augment=augment)
    return EpisodicDataModule(source, **kwargs)


# -- episodes ---------------------------------------------------------------------------------------------
def test_episodes_are_n_way_k_shot_from_the_source_training_split(fashion_root):
    dm = _episodic(fashion_root, ways=3, shots=2, queries=4, episodes_per_epoch=6, meta_batch_size=3, val_episodes=4)
    dm.setup("fit")
    assert (dm.num_classes, dm.channels, dm.image_size) == (3, 1, 28)  # what the CLI links into the model
    source = dm.dataset.train_set
    assert set(dm.dataset.train_set.labels.unique().tolist()) == {0, 1, 2, 3, 4}  # the source classes only
    sx, sy, qx, qy = next(iter(dm.train_dataloader()))
    assert sx.shape == (3, 6, 1, 28, 28) and qx.shape == (3, 12, 1, 28, 28)
    assert sy.tolist() == [[0, 0, 1, 1, 2, 2]] * 3 and qy.tolist() == [[0] * 4 + [1] * 4 + [2] * 4] * 3

    episodes = dm.train_set
    orders = []
    for index in range(6):
        support, query, classes = episodes.episode_indices(index, epoch=0)
        assert len(set(classes)) == 3 and set(classes) <= {0, 1, 2, 3, 4}
        orders.append(classes)
        assert not set(support.tolist()) & set(query.tolist())  # no image twice in an episode
        # relabelled 0..N-1: episode label j is datamodule class classes[j], for support and query alike
        assert source.labels[support].tolist() == [c for c in classes for _ in range(2)]
        assert source.labels[query].tolist() == [c for c in classes for _ in range(4)]
    assert any(o != sorted(o) for o in orders)  # the label order is random, not the class order
    # the images are the training split's (augmentation off here), nothing from validation or test
    support, query, _ = episodes.episode_indices(0, epoch=0)
    first = episodes.__getitems__([0])
    assert torch.equal(first[0][0], to_signed_float(source.images[support]))
    assert torch.equal(first[2][0], to_signed_float(source.images[query]))
    assert episodes.images is dm.dataset.train_set and dm.val_set.images is dm.dataset.val_set

    # the same episode for the same (seed, epoch, index); new ones every epoch; validation fixed across epochs
    assert torch.equal(episodes.episode_indices(2, 0)[0], episodes.episode_indices(2, 0)[0])
    assert not torch.equal(episodes.episode_indices(2, 0)[0], episodes.episode_indices(2, 1)[0])
    assert torch.equal(dm.val_set.episode_indices(1, 0)[0], dm.val_set.episode_indices(1, 5)[0])


def test_episode_sizes_are_checked(fashion_root):
    dm = _episodic(fashion_root, ways=6)
    with pytest.raises(ValueError, match="6-way episodes need 6 classes, the split has 5"):
        dm.setup("fit")
    images = FashionMNISTDataModule(root=str(fashion_root), classes=[0, 1], samples_per_class=3, val_split=2)
    images.setup("fit")
    with pytest.raises(ValueError, match="shots \\+ queries = 4 images per class"):
        EpisodeDataset(images.train_set, ways=2, shots=2, queries=2, episodes=1)
    with pytest.raises(ValueError, match="inner_steps .* >= 2"):
        MetaPretrainer(num_classes=5, inner_steps=1)


# -- the outer updates, to the arithmetic ---------------------------------------------------------------
def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _sgd_copy(net: nn.Module, x, y, steps: int, lr: float) -> nn.Module:
    """The reference inner loop: a deep copy trained by torch.optim.SGD in training mode."""
    net = copy.deepcopy(net).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net


def test_inner_loop_is_sgd_and_reptile_moves_toward_it_by_the_meta_step_size():
    net = _tiny_net()
    x, y = torch.randn(9, 1, 8, 8), torch.arange(3).repeat(3)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    reference = _sgd_copy(net, x, y, steps=3, lr=0.2)
    running = net[1].running_mean.clone()

    adapted = adapt(net, x, y, trainable_weights(net), steps=3, lr=0.2)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(adapted[name], p.detach(), rtol=0, atol=1e-6)
    assert torch.equal(net[1].running_mean, running)  # adapted forwards write a throw-away copy
    assert all(torch.equal(p, theta[n]) for n, p in net.named_parameters())  # the module is untouched

    # the outer step: SGD(lr=eps) on theta - phi is theta + eps * (phi - theta)
    eps = 0.25
    outer = torch.optim.SGD(net.parameters(), lr=eps)
    for name, d in reptile_direction(trainable_weights(net), adapted).items():
        dict(net.named_parameters())[name].grad = d
    outer.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] + eps * (adapted[name] - theta[name]), rtol=0, atol=1e-7)

    # with update_running_stats the first forward (at the start weights), and only it, writes the module's
    # running statistics: as one training-mode forward of the meta weights would
    expected = copy.deepcopy(net).train()
    with torch.no_grad():
        expected(x)
    adapt(net, x, y, trainable_weights(net), steps=3, lr=0.2, update_running_stats=True)
    for (name, b), ref in zip(net.named_buffers(), expected.buffers()):
        torch.testing.assert_close(b, ref, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(net[1].running_mean, running)


def test_fomaml_direction_is_the_query_gradient_at_the_adapted_weights():
    net = _tiny_net()
    x, y = torch.randn(9, 1, 8, 8), torch.arange(3).repeat(3)
    qx, qy = torch.randn(6, 1, 8, 8), torch.arange(3).repeat(2)
    adapted = adapt(net, x, y, trainable_weights(net), steps=2, lr=0.1)
    loss, logits, grads = query_step(net, adapted, qx, qy, grad=True)

    reference = _sgd_copy(net, x, y, steps=2, lr=0.1)
    reference.zero_grad()
    query_loss = F.cross_entropy(reference(qx), qy)
    query_loss.backward()
    torch.testing.assert_close(loss, query_loss.detach(), rtol=0, atol=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6)


def _episode_loader(episodes: tuple[torch.Tensor, ...]) -> DataLoader:
    return DataLoader([episodes], batch_size=None)  # one training batch: the stacked episodes as they are


def _random_episodes(num: int = 2, ways: int = 3, shots: int = 2, queries: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    sx = torch.rand(num, ways * shots, 1, 28, 28, generator=generator) * 2 - 1
    qx = torch.rand(num, ways * queries, 1, 28, 28, generator=generator) * 2 - 1
    label = lambda k: torch.arange(ways).repeat_interleave(k).expand(num, -1).clone()  # noqa: E731
    return sx, label(shots), qx, label(queries)


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_one_outer_step_of_the_module(algorithm, tmp_path):
    """Through Lightning: one batch of two episodes, SGD(lr) as the outer optimizer. Reptile ends at
    theta + lr * mean(phi - theta), FOMAML at theta - lr * mean(query gradient at phi); the head (zeroed in
    every episode) stays zero; BatchNorm running statistics are those of the meta weights on both supports."""
    L.seed_everything(0)
    lr, steps, inner_lr = 0.5, 3, 0.1
    model = MetaPretrainer(num_classes=3, algorithm=algorithm, inner_steps=steps, inner_lr=inner_lr,
                           optimizer=partial(torch.optim.SGD, lr=lr))  # fmt: skip
    before = copy.deepcopy(model)
    episodes = _random_episodes()
    expected = {n: p.detach().clone() for n, p in before.named_parameters()}
    bn_reference = copy.deepcopy(before).train()
    moves = []
    for e in range(2):
        start = copy.deepcopy(before)
        with torch.no_grad():
            start.head.weight.zero_()
            start.head.bias.zero_()
        adapted = _sgd_copy(start, episodes[0][e], episodes[1][e], steps, inner_lr)
        if algorithm == "reptile":
            moves.append({n: p.detach() - expected[n] for n, p in adapted.named_parameters()})
        else:
            adapted.zero_grad()
            F.cross_entropy(adapted(episodes[2][e]), episodes[3][e]).backward()
            moves.append({n: -p.grad for n, p in adapted.named_parameters()})
        with torch.no_grad():
            bn_reference(episodes[0][e])  # one forward at the meta weights per episode

    trainer = quiet_trainer(tmp_path, max_steps=1, logger=False, enable_checkpointing=False, deterministic=True)
    trainer.fit(model, train_dataloaders=_episode_loader(episodes))
    for name, p in model.named_parameters():
        if name.startswith("head."):
            assert torch.equal(p, torch.zeros_like(p)), name
            continue
        target = expected[name] + lr * (moves[0][name] + moves[1][name]) / 2
        torch.testing.assert_close(p.detach(), target, rtol=0, atol=2e-6, msg=name)
    for (name, b), ref in zip(model.named_buffers(), bn_reference.buffers()):
        torch.testing.assert_close(b, ref, rtol=0, atol=1e-6, msg=name)
    assert model.cost["episodes"] == 2 and model.cost["images"] == 2 * (6 + 6)


def test_validation_adapts_on_batch_statistics_and_changes_nothing(fashion_root, tmp_path):
    dm = _episodic(fashion_root, ways=3, shots=2, queries=2, val_episodes=2, meta_batch_size=2)
    model = MetaPretrainer(num_classes=3, inner_steps=2)
    state = copy.deepcopy(model.state_dict())
    metrics = quiet_trainer(tmp_path, logger=False).validate(model, datamodule=dm, verbose=False)[0]
    assert 0 <= metrics["val/acc"] <= 1 and metrics["val/loss"] > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name  # weights and running statistics untouched
    with batch_statistics(model.eval()):
        assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# -- the checkpoint is an ordinary source; resuming --------------------------------------------------------
def _fit(tmp_path, fashion_root, max_epochs=2, max_steps=-1, ckpt_path=None, algorithm="reptile"):
    L.seed_everything(0)
    model = MetaPretrainer(
        num_classes=5, algorithm=algorithm, inner_steps=2,
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.5),
        lr_scheduler=partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.5, total_iters=6),
        scheduler_interval="step",
    )  # fmt: skip
    dm = _episodic(fashion_root, augment=True, ways=5, shots=1, queries=1, episodes_per_epoch=6, meta_batch_size=2,
                   val_episodes=2)  # fmt: skip
    trainer = quiet_trainer(
        tmp_path, max_epochs=max_epochs, max_steps=max_steps, deterministic=True, plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", filename="best"),
                   # last.ckpt after every step, so a run stopped mid-epoch (max_steps) leaves its resume point
                   ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=1,
                                   enable_version_counter=False)],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_checkpoint_loads_as_a_normal_source(fashion_root, tmp_path):
    meta = _fit(tmp_path, fashion_root, max_epochs=1, algorithm="fomaml")
    best = tmp_path / "ckpt" / "best.ckpt"
    assert set(meta.state_dict()) == set(ImageClassifier(num_classes=5).state_dict())  # the same keys

    target = ImageClassifier(num_classes=5, pretrained=str(best))
    report = target.load_pretrained_weights()
    assert report.clean and report.loaded_share == 1.0, report
    assert set(report.excluded) == {"head.weight", "head.bias"}  # a new task gets a new head, as from any source
    saved = torch.load(best, weights_only=True)
    for name, value in target.backbone.state_dict().items():
        assert torch.equal(value, saved["state_dict"][f"backbone.{name}"]), name
    assert saved["lit_finetune_meta_cost"]["episodes"] == 6  # the cost travels beside, not in, the state dict
    with_head = ImageClassifier(num_classes=5, pretrained=str(best), load_head=True)
    assert with_head.load_pretrained_weights().clean and torch.equal(with_head.head.weight, torch.zeros(5, 128))
    # and a whole module comes back from it (lit-finetune test --ckpt_path)
    restored = MetaPretrainer.load_from_checkpoint(best, weights_only=True)
    assert restored.hparams.algorithm == "fomaml" and restored.cost["episodes"] == 6


def test_resume_matches_uninterrupted(fashion_root, tmp_path):
    full = _fit(tmp_path / "full", fashion_root, max_epochs=2)
    _fit(tmp_path / "part", fashion_root, max_epochs=2, max_steps=4)  # stopped mid-epoch 2 (3 steps per epoch)
    assert torch.load(tmp_path / "part/ckpt/last.ckpt", weights_only=True)["global_step"] == 4
    resumed = _fit(tmp_path / "part", fashion_root, max_epochs=2, ckpt_path=str(tmp_path / "part/ckpt/last.ckpt"))
    assert full.cost["episodes"] == resumed.cost["episodes"] == 12
    assert full.cost["images"] == resumed.cost["images"] == 12 * 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
