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


def test_factors_loaded_into_a_fresh_optimizer_warn_until_installed():
    """Plain PyTorch resuming a run: ``load_state_dict`` brings the groups' factors but not the step wrapper."""
    import warnings

    p = nn.Parameter(torch.zeros(1))
    trained = install_lr_factor_hooks(torch.optim.SGD([{"params": [p], "lr": 1.0, "name": "backbone"}]))
    set_lr_factor(trained.param_groups[0], "lr_scale", 0.1)
    p.grad = torch.ones(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.step()  # its factors apply: no warning
    fresh = torch.optim.SGD([{"params": [p], "lr": 1.0}])
    fresh.load_state_dict(trained.state_dict())
    with pytest.warns(UserWarning, match=r"\['backbone'\] carry lit_finetune lr_factors.*install_lr_factor_hooks"):
        fresh.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.step()  # once per optimizer
        installed = torch.optim.SGD([{"params": [p], "lr": 1.0}])
        installed.load_state_dict(trained.state_dict())
        install_lr_factor_hooks(installed)
        before = p.item()
        installed.step()
    assert before - p.item() == pytest.approx(0.1)  # the loaded lr_scale applies again


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
    # a module inside another would get two schedules, and the outer one's frozen gradients would win silently
    with pytest.raises(ValueError, match="'backbone' contains 'backbone.layer4'; list modules that do not contain"):
        LayerFreezing(["backbone.layer4", "backbone"], unfreeze_at_epoch=[1, 2])
    with pytest.raises(ValueError, match="'backbone' contains 'backbone'"):
        LayerFreezing(["backbone", "backbone"])
    LayerFreezing(["backbone.layer4", "backbone.layer3"])  # siblings are fine, as are names sharing a prefix:
    LayerFreezing(["backbone.layer1", "backbone.layer10"])


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


def test_closure_exception_restores_the_scheduled_lr():
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}])
    install_lr_factor_hooks(opt)
    set_lr_factor(opt.param_groups[0], "warmup", 0.5)

    def failing_closure():
        raise RuntimeError("nan in loss")

    with pytest.raises(RuntimeError, match="nan in loss"):
        opt.step(failing_closure)
    assert opt.param_groups[0]["lr"] == 1.0  # not left at 0.5
    p.grad = torch.ones(1)
    opt.step()
    assert p.item() == pytest.approx(0.5)  # scaled once (0.5), not twice (0.25)
    assert opt.param_groups[0]["applied_lr"] == 0.5 and opt.param_groups[0]["steps_trained"] == 1


def test_applied_lr_monitor_logs_what_steps_used_and_zero_when_frozen(tmp_path, tiny_target):
    from functools import partial

    from lit_finetune.callbacks import AppliedLRMonitor

    model = ImageClassifier(num_classes=5, optimizer=partial(torch.optim.SGD, lr=0.1), backbone_lr_ratio=0.5)
    rec = Recorder()
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, log_every_n_steps=1, limit_val_batches=1,
        callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=1, unfreeze_lr_scale=0.2), LRWarmup(4), AppliedLRMonitor(), rec],
    )  # fmt: skip
    trainer.fit(model, datamodule=tiny_target)
    import csv

    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("lr/head")]
    assert len(rows) == len(rec.lrs)
    steps_per_epoch = len(rows) // 2
    for step, (row, used) in enumerate(zip(rows, rec.lrs)):
        assert float(row["lr/head"]) == pytest.approx(used["head"])  # what the optimizer step used
        if step < steps_per_epoch:
            assert float(row["lr/backbone.layer1"]) == 0.0  # frozen: no update at all
        else:
            assert float(row["lr/backbone.layer1"]) == pytest.approx(used["backbone.layer1"])
            assert used["backbone.layer1"] > 0
    assert float(rows[0]["lr/head"]) == pytest.approx(0.1 * 0.01)  # warm-up's first step, not the scheduler's 0.1
    after = rows[steps_per_epoch]  # the backbone's first step: its own warm-up x unfreeze scale x ratio
    assert float(after["lr/backbone.layer1"]) == pytest.approx(0.1 * 0.01 * 0.2 * 0.5)


def test_applied_lr_monitor_without_logger(tmp_path, tiny_target):
    from lit_finetune.callbacks import AppliedLRMonitor

    trainer = quiet_trainer(tmp_path, logger=False, max_steps=2, callbacks=[AppliedLRMonitor()])
    trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target)
    assert trainer.callback_metrics["lr/head"] > 0


class FilteredOptimizerModule(L.LightningModule):
    """A user's own module whose optimizer holds only trainable parameters (Lightning's docs pattern)."""

    def __init__(self, scheduler: bool = False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_freezing_adds_missing_params_at_unfreeze_or_refuses_at_fit_start(tmp_path):
    model = FilteredOptimizerModule()
    before = model.backbone[0].weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=1)])
    trainer.fit(model)
    assert not torch.equal(model.backbone[0].weight, before)  # trained after unfreezing
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    assert names[-1] == "backbone"

    with pytest.raises(ValueError, match="not in the optimizer.*filter.*scheduler"):
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=1)]).fit(
            FilteredOptimizerModule(scheduler=True)
        )


def test_freezing_acts_only_when_fitting(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5)
    trainer = quiet_trainer(tmp_path, callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=None)], limit_test_batches=1)
    trainer.test(model, datamodule=tiny_target)
    trainer.validate(model, datamodule=tiny_target)
    assert all(p.requires_grad for p in model.parameters())


def test_train_bn_true_trains_bn_affine_of_frozen_module(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5)
    gamma, conv = model.backbone.bn1.weight.detach().clone(), model.backbone.conv1.weight.detach().clone()
    quiet_trainer(tmp_path, max_steps=3, callbacks=[LayerFreezing(["backbone"], None, train_bn=True)]).fit(
        model, datamodule=tiny_target
    )
    assert not torch.equal(model.backbone.bn1.weight, gamma)  # BN affine trains...
    assert torch.equal(model.backbone.conv1.weight, conv)  # ...the frozen convolution does not


class TwoOptimizerModule(L.LightningModule):
    """Manual optimisation with two optimizers and 3 steps of the second per batch (a GAN's shape)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Linear(4, 4)
        self.d = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        for _ in range(3):
            loss_d = self.d(batch[0]).pow(2).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
        loss_g = self.d(self.g(batch[0])).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD([{"name": "g", "params": self.g.parameters()}], lr=0.1),
            torch.optim.SGD([{"name": "d", "params": self.d.parameters()}], lr=0.2),
        )

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 4)), batch_size=4)


def test_warmup_counts_each_optimizers_own_steps_with_grad_scaler(tmp_path):
    """Two optimizers, 3 D steps per G step, under a GradScaler (fp16 AMP's path; CPU-enabled here)."""
    model = TwoOptimizerModule()
    used: dict[str, list[float]] = {"g": [], "d": []}

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            for opt in trainer.optimizers:
                opt.register_step_post_hook(lambda o, a, k: used[o.param_groups[0]["name"]].append(o.param_groups[0]["lr"]))

    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    warmup = LRWarmup(warmup_steps=5, start_factor=0.0)
    quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[warmup, Spy()], plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    ).fit(model)
    assert len(used["g"]) == 5 and len(used["d"]) == 15
    assert used["g"] == pytest.approx([0.1 * warmup.factor(k) for k in range(5)])
    assert used["d"] == pytest.approx([0.2 * warmup.factor(k) for k in range(15)])
    assert model.trainer.optimizers[1].param_groups[0]["lr"] == 0.2  # scheduler value restored after each step


def test_applied_lr_monitor_logs_on_the_steps_lightning_writes(tmp_path, tiny_target):
    import csv

    from lit_finetune.callbacks import AppliedLRMonitor

    trainer = quiet_trainer(tmp_path, max_epochs=3, log_every_n_steps=2, limit_val_batches=0, callbacks=[AppliedLRMonitor()])
    trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target)
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("lr/head")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # every 2nd step, none lost to the throttle
