"""DCGAN: the EMA generator (decay warm-up, BatchNorm statistics), where it and step schedulers are
updated (exact mid-epoch resume), clipping after unscaling and after frozen gradients are dropped,
gradient accumulation, and the Trainer options the DCGAN cannot take."""

from __future__ import annotations

import warnings
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.amp import GradScaler

from conftest import (
    assert_same_training_state,
    fit_with_step_checkpoints,
    quiet_trainer,
    shift_generator,
)
from lit_finetune import DCGAN
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.data import FashionMNISTDataModule

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)
SGD = partial(torch.optim.SGD, lr=1.0)


@pytest.fixture
def gan_data(fashion_root):
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=10, augment=False
    )


def _bn_buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k}


# -- the moving average ------------------------------------------------------------------------
def test_ema_decay_warms_up_and_reaches_the_configured_decay():
    model = DCGAN(**TINY, ema_decay=0.99)  # (1 + t) / (10 + t) reaches 0.99 at t = 891
    decays = []
    for _ in range(1000):
        decays.append(model.ema_decay_now())
        model.update_ema()
    assert decays[0] == pytest.approx(0.1) and decays[10] == pytest.approx(11 / 20)
    assert all(a <= b for a, b in zip(decays, decays[1:])) and decays[-1] == 0.99
    assert DCGAN(**TINY, ema_decay=0.999, ema_warmup=False).ema_decay_now() == 0.999


def test_first_ema_update_weighs_the_trained_generator_by_0_9():
    model = DCGAN(**TINY, ema_batchnorm="average")
    start = {k: v.clone() for k, v in model.generator_ema.state_dict().items()}
    shift_generator(model.generator, 1.0)
    model.update_ema()
    after, raw = model.generator_ema.state_dict(), model.generator.state_dict()
    for k, v in after.items():
        if v.is_floating_point():  # weights and running statistics, averaged alike
            assert torch.allclose(v, 0.1 * start[k] + 0.9 * raw[k], atol=1e-6), k
    assert int(model.ema_updates) == 1


def test_recomputed_batchnorm_statistics_belong_to_the_ema_weights():
    torch.manual_seed(0)
    model = DCGAN(**TINY)  # ema_batchnorm="recompute" by default
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.update_ema()
    raw_stats = _bn_buffers(model.generator)
    rng_before = torch.get_rng_state()
    net = model.generator_network(ema=True)
    assert not net.training and torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    stats = _bn_buffers(net)
    # the statistics of the EMA weights on noise: recomputed by hand, BatchNorm layer by layer
    check = DCGAN(**TINY)
    check.generator.load_state_dict(net.state_dict())
    rng = torch.Generator().manual_seed(0)
    zs = torch.cat([torch.randn(64, TINY["latent_dim"], generator=rng) for _ in range(model.hparams.ema_bn_batches)])
    first_bn = next(m for m in check.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    features = []
    first_bn.register_forward_hook(lambda m, inp, out: features.append(inp[0]))
    check.generator.train()(zs)
    expected_mean = features[0].mean(dim=(0, 2, 3))
    name = next(k for k in stats if k.endswith("running_mean"))
    assert torch.allclose(stats[name], expected_mean, atol=1e-5)
    assert not torch.allclose(stats[name], raw_stats[name], atol=1e-3)  # not the raw generator's
    # a function of the weights: asking again changes nothing, and neither does sampling
    assert all(torch.equal(stats[k], v) for k, v in _bn_buffers(model.generator_network(ema=True)).items())


def test_default_sampler_is_no_worse_than_the_raw_generator(tmp_path, fashion_root):
    """A short source run: the EMA sampler's per-pixel spread is at least as close to the real
    images' as the raw generator's (the old EMA, without warm-up and with copied BatchNorm
    statistics, drew washed-out, low-diversity images)."""
    data = FashionMNISTDataModule(
        root=str(fashion_root), classes=[0, 1, 2, 3, 4], samples_per_class=600, val_split=50, batch_size=50,
        augment=False,
    )  # fmt: skip
    L.seed_everything(0)
    model = DCGAN(latent_dim=32, generator_width=16, discriminator_width=16)  # ema_decay 0.999, warmed up
    quiet_trainer(tmp_path, max_epochs=10, limit_val_batches=0, logger=False, enable_checkpointing=False).fit(
        model, datamodule=data
    )  # 600 G updates
    data.setup("fit")
    real = torch.cat([x for x, _ in data.train_dataloader()])
    torch.manual_seed(1)
    ema, raw = model.sample(500), model.sample(500, ema=False)

    def gap(images: torch.Tensor) -> float:  # per-pixel std across images, against the real images'
        return float((images.std(dim=0) - real.std(dim=0)).abs().mean())

    assert gap(ema) <= gap(raw) + 0.02, (gap(ema), gap(raw))
    assert abs(float(ema.std()) - float(real.std())) <= abs(float(raw.std()) - float(real.std())) + 0.02


def test_ema_eval_mode_warning_is_silenced_for_the_ema_copy_only(tmp_path, gan_data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(DCGAN(**TINY), datamodule=gan_data)
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    model = DCGAN(**TINY)
    model.discriminator.head.eval()  # a module in eval mode the user did not mean: still warned about
    with pytest.warns(UserWarning, match="in eval mode"):
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=gan_data)


# -- exact mid-epoch resume ----------------------------------------------------------------------
def _step_run(tmp_path, gan_data, max_steps, ckpt_path=None, ema_batchnorm="recompute"):
    L.seed_everything(0)
    model = DCGAN(
        **TINY, diffaugment="translation", ema_decay=0.9, ema_batchnorm=ema_batchnorm, scheduler_interval="step",
        generator_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.9),
        discriminator_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.8),
    )  # fmt: skip
    return model, fit_with_step_checkpoints(model, gan_data, tmp_path, max_steps, ckpt_path)


@pytest.mark.parametrize("ema_batchnorm", ["recompute", "average"])
def test_mid_epoch_resume_is_exact_for_g_d_ema_optimizers_and_step_schedulers(tmp_path, gan_data, ema_batchnorm):
    # 4 batches per epoch, 2 optimizer steps per batch: step=6 is inside the second epoch
    full, full_trainer = _step_run(tmp_path / "full", gan_data, 14, ema_batchnorm=ema_batchnorm)
    mid = tmp_path / "full/steps/step=6.ckpt"
    saved = torch.load(mid, weights_only=True)
    assert int(saved["state_dict"]["ema_updates"]) == 3  # the EMA of the step it saves, not the one before
    resumed, resumed_trainer = _step_run(tmp_path / "part", gan_data, 14, str(mid), ema_batchnorm)
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)
    assert full_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 7  # stepped once per G update


# -- clipping, accumulation, Trainer options -------------------------------------------------------
class _DUpdateNorms(Callback):
    """Norm of each discriminator update (post-hook: only steps that ran)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.updates: list[list[torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        opt = trainer.optimizers[1]
        params = [p for g in opt.param_groups for p in g["params"]]

        def before(optimizer, args, kwargs):
            self._before = [p.detach().clone() for p in params]

        def after(optimizer, args, kwargs):
            deltas = [p.detach() - b for p, b in zip(params, self._before)]
            self.updates.append(deltas)
            self.norms.append(float(torch.sqrt(sum((d**2).sum() for d in deltas))))

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_clipping_bounds_the_true_gradient_norm_in_every_precision(tmp_path, gan_data, precision):
    L.seed_everything(0)
    model = DCGAN(**TINY, gradient_clip_val=1e-3, generator_optimizer=SGD, discriminator_optimizer=SGD)
    norms = _DUpdateNorms()
    plugins = []
    if precision == "16-mixed":  # a GradScaler: gradients are scaled by 1024 until unscaled in the step
        plugins = [MixedPrecision("16-mixed", "cpu", GradScaler("cpu", init_scale=1024.0))]
    elif precision == "bf16-mixed":
        plugins = [MixedPrecision("bf16-mixed", "cpu")]
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, plugins=plugins, callbacks=[norms]).fit(
        model, datamodule=gan_data
    )
    assert norms.norms and all(n == pytest.approx(1e-3, rel=1e-3) for n in norms.norms), norms.norms


class _FreezingAsUnderDDP(LayerFreezing):
    """LayerFreezing's DDP path on one process: requires_grad stays on, frozen gradients are dropped."""

    _distributed = property(lambda self: True, lambda self, value: None)


def test_frozen_blocks_do_not_count_toward_the_clip_norm_under_ddp(tmp_path, gan_data):
    """Under DDP the clip must see the same gradients as on one process."""

    def first_d_update(freezing_class: type) -> list[torch.Tensor]:
        L.seed_everything(0)
        model = DCGAN(**TINY, gradient_clip_val=1e-2, generator_optimizer=SGD, discriminator_optimizer=SGD)
        freezing = freezing_class(["discriminator.blocks.0"], unfreeze_at_epoch=None)
        norms = _DUpdateNorms()
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[freezing, norms]).fit(
            model, datamodule=gan_data
        )
        return norms.updates[0]

    one, ddp = first_d_update(LayerFreezing), first_d_update(_FreezingAsUnderDDP)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(one, ddp))


def test_trainer_clipping_and_accumulation_name_the_module_argument(tmp_path, gan_data):
    with pytest.raises(ValueError, match=r"DCGAN\(gradient_clip_val=\.\.\.\)"):
        quiet_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0).fit(DCGAN(**TINY), datamodule=gan_data)
    with pytest.raises(ValueError, match=r"DCGAN\(accumulate_grad_batches=\.\.\.\)"):
        quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(DCGAN(**TINY), datamodule=gan_data)
    with pytest.raises(ValueError, match="needs n_critic=1"):
        DCGAN(**TINY, n_critic=2, accumulate_grad_batches=2)


def test_accumulation_updates_once_per_k_batches_with_the_mean_gradient(tmp_path, gan_data):
    L.seed_everything(0)
    model = DCGAN(**TINY, accumulate_grad_batches=2, generator_optimizer=SGD, discriminator_optimizer=SGD)
    grads: list[torch.Tensor] = []
    backward = model.manual_backward

    def spy(loss, *args, **kwargs):
        grads.append(loss.detach())
        return backward(loss, *args, **kwargs)

    model.manual_backward = spy
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=gan_data)  # 4 batches: 2 D and 2 G updates
    opt_g, opt_d = trainer.optimizers
    assert opt_d.param_groups[0]["steps_trained"] == 2 and opt_g.param_groups[0]["steps_trained"] == 2
    assert trainer.global_step == 4 and int(model.ema_updates) == 2
    assert len(grads) == 8  # every batch's losses were backpropagated (each divided by k)
