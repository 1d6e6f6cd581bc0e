"""The shared base: one optimizer and scheduler per network, stepped also under manual optimisation."""

from functools import partial

import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from lit_finetune.modules.base import Network, TransferModule
from lit_finetune.transfer import module_group


class TwoNetworks(TransferModule):
    """A GAN-shaped module: two networks, manual optimisation, a step scheduler for one, an epoch one for the other."""

    def __init__(self):
        super().__init__(num_classes=None, in_channels=4)
        self.automatic_optimization = False
        self.g = nn.Linear(4, 4)
        self.d = nn.Linear(4, 1)
        self.frozen_copy = nn.Linear(4, 4).requires_grad_(False)  # e.g. an EMA copy: in no optimizer

    def networks(self):
        sgd = partial(torch.optim.SGD, lr=1.0)
        return [
            Network("g", [module_group(self.g, "g")], sgd, partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "step"),
            Network("d", [module_group(self.d, "d")], sgd, partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1), "epoch"),
        ]

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        for opt, loss_fn in ((opt_d, lambda: self.d(batch[0]).mean()), (opt_g, lambda: self.d(self.g(batch[0])).mean())):
            opt.zero_grad()
            self.manual_backward(loss_fn())
            opt.step()
        self.step_schedulers("step")  # after the updates, where Lightning steps them under automatic optimisation

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=4)


def test_each_network_gets_its_optimizer_and_scheduler_stepped_at_its_interval(tmp_path):
    model = TwoNetworks()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model)
    opt_g, opt_d = trainer.optimizers
    assert [g["name"] for g in opt_g.param_groups] == ["g"] and [g["name"] for g in opt_d.param_groups] == ["d"]
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.5**6)  # 6 batches, stepped every batch
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.1**2)  # 2 epochs, stepped every epoch
    assert [c.name for c in trainer.lr_scheduler_configs] == ["g", "d"]


def test_a_trainable_parameter_outside_every_network_is_refused():
    model = TwoNetworks()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Parameters in no optimizer group.*extra"):
        model.configure_optimizers()
