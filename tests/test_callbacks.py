import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import LayerFreezing, LRWarmup
from lit_finetune.transfer import effective_lr, install_lr_factor_hooks, set_lr_factor


class Recorder(L.Callback):
    """Records, per training step, each group's LR as used by the optimizer step."""

    def __init__(self):
        self.lrs: list[dict[str, float]] = []
        self.bn_modes: list[bool] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, trainer, pl_module):
        def pre(opt, args, kwargs):
            self.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})

        # registered after the LR-factor hook, so it sees the scaled LR the step uses
        trainer.optimizers[0].register_step_pre_hook(pre)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bn_modes.append(pl_module.backbone.bn1.training)

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_lr_factor_hooks_scale_only_during_step():
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}])
    install_lr_factor_hooks(opt)
    install_lr_factor_hooks(opt)  # idempotent
    set_lr_factor(opt.param_groups[0], "a", 0.5)
    set_lr_factor(opt.param_groups[0], "b", 0.2)
    assert effective_lr(opt.param_groups[0]) == pytest.approx(0.1)
    p.grad = torch.ones(1)
    opt.step()
    assert p.item() == pytest.approx(0.9)  # stepped with 1.0 * 0.5 * 0.2
    assert opt.param_groups[0]["lr"] == 1.0  # the scheduler's value is back


def test_freeze_then_unfreeze_keeps_bn_frozen_and_groups_named(tmp_path, tiny_target):
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    freezing = LayerFreezing(["backbone"], unfreeze_at_epoch=2, train_bn=False)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[freezing, rec], limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_target)
    epoch0, epoch1, epoch2 = rec.snapshots[0], rec.snapshots[1], rec.snapshots[2]
    # frozen phase: backbone weights AND BatchNorm running statistics unchanged, head trained
    for key in initial:
        if key.startswith("backbone."):
            assert torch.equal(epoch1[key], initial[key]), key
    assert not torch.equal(epoch0["head.weight"], initial["head.weight"])
    # frozen BN stays in eval mode during the frozen phase, trains after unfreezing
    steps_per_epoch = len(rec.bn_modes) // 3
    assert not any(rec.bn_modes[: 2 * steps_per_epoch]) and all(rec.bn_modes[2 * steps_per_epoch :])
    assert not torch.equal(epoch2["backbone.layer1.0.conv1.weight"], initial["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(epoch2["backbone.bn1.running_mean"], initial["backbone.bn1.running_mean"])
    # one named group per block from the first step (no groups added later)
    assert len({tuple(sorted(step)) for step in rec.lrs}) == 1
    assert "backbone.layer4" in rec.lrs[0]


def test_train_bn_true_updates_bn_while_frozen(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5)
    initial_mean = model.backbone.bn1.running_mean.clone()
    initial_conv = model.backbone.conv1.weight.clone()
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[LayerFreezing(["backbone"], None, train_bn=True)], limit_val_batches=1
    )
    trainer.fit(model, datamodule=tiny_target)
    assert not torch.equal(model.backbone.bn1.running_mean, initial_mean)
    assert torch.equal(model.backbone.conv1.weight, initial_conv)


def test_gradual_unfreezing_and_lr_scale(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5)
    rec = Recorder()
    freezing = LayerFreezing(["backbone.layer4", "backbone.layer3"], unfreeze_at_epoch=[1, 2], unfreeze_lr_scale=0.5)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[freezing, rec], limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_target)
    s0, s1 = rec.snapshots[0], rec.snapshots[1]
    init_l3 = s0["backbone.layer3.0.conv1.weight"]
    assert torch.equal(s1["backbone.layer3.0.conv1.weight"], init_l3)  # still frozen in epoch 1
    assert not torch.equal(s1["backbone.layer4.0.conv1.weight"], s0["backbone.layer4.0.conv1.weight"])
    last = rec.lrs[-1]
    assert last["backbone.layer4"] == pytest.approx(0.5 * last["head"])
    with pytest.raises(ValueError, match="one per module"):
        LayerFreezing(["a", "b"], unfreeze_at_epoch=[1, 2, 3])


def test_unknown_module_name_is_clear(tmp_path, tiny_target):
    trainer = quiet_trainer(tmp_path, callbacks=[LayerFreezing(["backbone.layer9"])])
    with pytest.raises(ValueError, match="backbone.layer9.*not found"):
        trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target)


def test_warmup_composes_with_scheduler_and_restarts_for_unfrozen_groups(tmp_path, tiny_target):
    from functools import partial

    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = ImageClassifier(num_classes=5, optimizer=partial(torch.optim.SGD, lr=0.1), lr_scheduler=sched, scheduler_interval="step")
    rec = Recorder()
    warmup = LRWarmup(warmup_steps=4, start_factor=0.0)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=1), warmup, rec],
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=tiny_target)
    steps_per_epoch = len(rec.lrs) // 2
    for step, lrs in enumerate(rec.lrs):
        scheduled = 0.1 * 0.5**step
        assert lrs["head"] == pytest.approx(scheduled * warmup.factor(step))
    # the backbone's warm-up starts when it is unfrozen, on top of the decayed schedule
    first = steps_per_epoch
    for k in range(min(3, steps_per_epoch)):
        step = first + k
        assert rec.lrs[step]["backbone.layer1"] == pytest.approx(0.1 * 0.5**step * warmup.factor(k))
    assert warmup.factor(0) == 0 and warmup.factor(4) == 1 and math.isclose(warmup.factor(2), 0.5)
