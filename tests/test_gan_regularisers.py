"""Few-shot GAN regularisers beyond FreezeD: EWC on G (Li et al. 2020) and CDC (Ojha et al. 2021) with its
anchor-based patch discriminator, in the DCGAN; self-contained checkpoints and exact mid-epoch resume."""

from __future__ import annotations

import shutil
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import (
    assert_same_training_state,
    fit_with_step_checkpoints,
    quiet_trainer,
    save_lightning_checkpoint,
)
from lit_finetune import DCGAN
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from lit_finetune.transfer.cdc import anchor_noise, distance_consistency_loss
from lit_finetune.transfer.ewc import EWC, generator_fisher

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)
COND = dict(TINY, num_classes=5, conditional=True)


@pytest.fixture
def gan_data(fashion_root):
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=10, augment=False
    )


@pytest.fixture
def source(tmp_path):
    """A (randomly initialised) conditional source DCGAN checkpoint."""
    torch.manual_seed(1)
    return save_lightning_checkpoint(DCGAN(**COND), tmp_path / "source.ckpt")


# -- EWC --------------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_source_and_grows_quadratically(source):
    model = DCGAN(**COND, pretrained=source, ewc_generator=1e6, ewc_fisher_samples=32)
    model.load_pretrained_weights()
    assert float(model.ewc_g().detach()) == 0.0
    start = {k: v.clone() for k, v in model.generator.state_dict().items()}
    direction = {n: torch.randn_like(p) for n, p in model.generator.named_parameters()}

    def penalty_at(t: float) -> float:
        with torch.no_grad():
            for n, p in model.generator.named_parameters():
                p.copy_(start[n] + t * direction[n])
        return float(model.ewc_g().detach())

    p1, p2, p3 = penalty_at(1e-2), penalty_at(2e-2), penalty_at(-3e-2)
    assert p1 > 0 and p2 == pytest.approx(4 * p1, rel=1e-4) and p3 == pytest.approx(9 * p1, rel=1e-4)
    # exactly lambda * sum F (theta - theta_src)^2
    fisher = model.ewc_g.fisher()
    by_hand = 1e6 * sum((fisher[n] * (-3e-2 * direction[n]) ** 2).sum() for n in fisher)
    assert p3 == pytest.approx(float(by_hand), rel=1e-4)


def test_fisher_is_the_mean_squared_per_sample_gradient_of_log_d_g_z():
    torch.manual_seed(0)
    generator, discriminator = DCGANGenerator(16, 28, 1, 8, 5), DCGANDiscriminator(28, 1, 8, 5)
    rng_state = torch.get_rng_state()
    fisher = generator_fisher(generator, discriminator, 16, num_samples=12, num_classes=5, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert generator.training and discriminator.training  # modes restored
    assert all(p.requires_grad for p in discriminator.parameters())
    assert set(fisher) == {n for n, _ in generator.named_parameters()}
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    # by hand: one backward per sample of log sigmoid D(G(z)), both nets in eval mode
    z = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    y = torch.arange(12) % 5
    generator.eval(), discriminator.eval()
    expected = {n: torch.zeros_like(p) for n, p in generator.named_parameters()}
    for i in range(12):
        generator.zero_grad()
        nn.functional.logsigmoid(discriminator(generator(z[i : i + 1], y[i : i + 1]), y[i : i + 1])).sum().backward()
        for n, p in generator.named_parameters():
            expected[n] += p.grad**2 / 12
    for n in expected:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-14), n
    generator.train(), discriminator.train()
    with torch.inference_mode():  # where Lightning tests and validates (a module reading its source at test start)
        again = generator_fisher(generator, discriminator, 16, num_samples=12, num_classes=5, seed=3)
    assert all(torch.equal(again[n], fisher[n]) for n in fisher)


def test_ewc_refuses_to_run_without_a_fisher():
    ewc = EWC(nn.Linear(3, 2), 1.0)
    with pytest.raises(RuntimeError, match="Fisher information was never estimated"):
        ewc()
    with pytest.raises(ValueError, match="non-negative"):
        ewc.set_fisher({"weight": -torch.ones(2, 3), "bias": torch.ones(2)}, 1)


def test_fisher_and_anchors_live_in_the_checkpoint_and_resume_without_the_source(tmp_path, gan_data, source):
    from lit_finetune.sample import load_module

    model = DCGAN(**COND, pretrained=source, ewc_generator=1e6, ewc_fisher_samples=16, cdc_weight=1000.0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, enable_version_counter=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[ckpt], limit_val_batches=0).fit(model, datamodule=gan_data)
    fisher = {k: v.clone() for k, v in model.ewc_g.fisher().items()}
    source_copy = {k: v.clone() for k, v in model.cdc.source.state_dict().items()}
    assert int(model.ewc_g.fisher_samples) == 16 and all((f >= 0).all() for f in fisher.values())
    moved = tmp_path / "moved.ckpt"
    shutil.copy(tmp_path / "ckpt/last.ckpt", moved)
    torch.save({"gone": True}, source)  # the source file no longer holds a DCGAN: any read of it would fail

    loaded = load_module(moved)
    assert all(torch.equal(loaded.ewc_g.fisher()[k], v) for k, v in fisher.items())
    assert all(torch.equal(loaded.cdc.source.state_dict()[k], v) for k, v in source_copy.items())
    assert float(loaded.ewc_g().detach()) > 0  # the weights moved away from the stored source
    again = DCGAN(**COND, pretrained=source, ewc_generator=1e6, ewc_fisher_samples=16, cdc_weight=1000.0)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[ckpt], limit_val_batches=0, limit_test_batches=1)
    trainer.fit(again, datamodule=gan_data, ckpt_path=str(moved))
    assert all(torch.equal(again.ewc_g.fisher()[k], v) for k, v in fisher.items())
    assert {"train/ewc", "train/cdc"} <= trainer.callback_metrics.keys()
    trainer.test(again, datamodule=gan_data, verbose=False)


# -- CDC --------------------------------------------------------------------------------------------
def _reference_cdc(adapted: list[torch.Tensor], source: list[torch.Tensor], layer: list[int]) -> torch.Tensor:
    """The loop of utkarshojha/few-shot-gan-adaptation train.py (kl_wt left out), transcribed."""
    sfm, kl_loss, sim = nn.Softmax(dim=1), nn.KLDivLoss(), nn.CosineSimilarity()
    b = adapted[0].shape[0]
    dist_source, dist_target = torch.zeros(b, b - 1), torch.zeros(b, b - 1)
    for pair1 in range(b):
        tmpc = 0
        for pair2 in range(b):
            if pair1 != pair2:
                a, c = source[layer[pair1]][pair1].reshape(1, -1), source[layer[pair1]][pair2].reshape(1, -1)
                dist_source[pair1, tmpc] = sim(a, c)
                a, c = adapted[layer[pair1]][pair1].reshape(1, -1), adapted[layer[pair1]][pair2].reshape(1, -1)
                dist_target[pair1, tmpc] = sim(a, c)
                tmpc += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that KLDivLoss's "mean" is not "batchmean": the reference's choice
        return kl_loss(torch.log(sfm(dist_target)), sfm(dist_source))


def test_distance_consistency_loss_is_the_reference_code_loss():
    torch.manual_seed(0)
    adapted = [torch.randn(5, 4, 7, 7), torch.relu(torch.randn(5, 2, 14, 14))]
    source = [a + 0.5 * torch.randn_like(a) for a in adapted]
    layer = torch.tensor([0, 1, 1, 0, 1])
    ours = distance_consistency_loss(adapted, source, layer)
    assert float(ours) > 0
    assert float(ours) == pytest.approx(float(_reference_cdc(adapted, source, layer.tolist())), rel=1e-4)
    assert float(distance_consistency_loss(adapted, adapted, layer)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 3"):
        distance_consistency_loss([a[:2] for a in adapted], [s[:2] for s in source])


def test_cdc_loss_is_zero_when_the_adapted_generator_is_the_source_and_grows_when_it_moves(source):
    model = DCGAN(**COND, pretrained=source, cdc_weight=1000.0, cdc_batch=6)
    model.load_pretrained_weights()
    model.train()
    z, y = torch.randn(16, 16), torch.arange(16) % 5
    layer = torch.randint(2, (6,))
    _, features = model.generator(z, y, return_features=True)

    def loss() -> float:
        return float(model.cdc(features, z, y, layer, rows=slice(10, None)).detach())

    # 0 up to rounding: BatchNorm's kernels with and without running statistics sum in another order
    assert loss() < 1e-4  # the weight is 1000: a KL divergence below 1e-7
    model.eval()  # the copy normalises with batch statistics in either mode: still the same function
    assert loss() < 1e-4
    model.train()
    with torch.no_grad():
        model.generator.project.conv.weight.add_(0.2 * torch.randn_like(model.generator.project.conv.weight))
    _, features = model.generator(z, y, return_features=True)
    assert loss() > 1e-2


def test_cdc_source_copy_gets_no_gradient_and_is_in_no_optimizer(tmp_path, gan_data, source):
    model = DCGAN(**COND, pretrained=source, cdc_weight=1000.0, cdc_patch_block=-1)
    trainer = quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(model, datamodule=gan_data)
    copy_params = list(model.cdc.source.parameters())
    assert copy_params and all(not p.requires_grad and p.grad is None for p in copy_params)
    in_optimizers = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not in_optimizers & {id(p) for p in copy_params}
    loaded = torch.load(source, weights_only=True)["state_dict"]
    # still exactly the source's generator, while the adapted one moved
    assert all(torch.equal(v, loaded[f"generator.{k}"]) for k, v in model.cdc.source.state_dict().items())
    assert not torch.equal(model.generator.project.conv.weight, loaded["generator.project.conv.weight"])
    assert "train/cdc" in trainer.callback_metrics and float(trainer.callback_metrics["train/cdc"]) > 0


@pytest.mark.parametrize(
    "image_size, patch_block, side", [(28, -1, 7), (28, 0, 14), (32, -1, 4), (32, 1, 8), (64, -2, 8)]
)
@pytest.mark.parametrize("conditioning", ["projection", "concat", None])
def test_patch_discriminator_gives_one_logit_per_position(image_size, patch_block, side, conditioning):
    classes = 3 if conditioning else None
    d = DCGANDiscriminator(image_size, 1, 8, classes, conditioning or "projection", patch_block=patch_block)
    x, y = torch.randn(4, 1, image_size, image_size), (torch.arange(4) % 3 if classes else None)
    assert d.patch_logits(x, y).shape == (4, side, side)
    assert d(x, y).shape == (4,)  # the image-level D is unchanged
    assert (d.patch_embed is not None) == (conditioning == "projection")


def test_patch_discriminator_refuses_bad_blocks():
    with pytest.raises(ValueError, match="patch_block must index one of the 2"):
        DCGANDiscriminator(28, patch_block=2)
    with pytest.raises(ValueError, match="no patch head"):
        DCGANDiscriminator(28).patch_logits(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="pretrained is None"):
        DCGAN(**TINY, cdc_weight=1.0)
    with pytest.raises(ValueError, match="pretrained is None"):
        DCGAN(**TINY, ewc_generator=1.0)
    with pytest.raises(ValueError, match="cdc_batch must be >= 3"):
        DCGAN(**TINY, cdc_batch=2)
    with pytest.raises(ValueError, match="cdc_anchor_every >= 2"):
        DCGAN(**TINY, cdc_patch_block=-1, cdc_anchor_every=1)


def test_anchor_batches_use_the_image_level_d_near_the_anchors(tmp_path, gan_data):
    """Batches 1, 5, 9 (every 4th) draw z near the anchors and use the image-level D; the others the patch level."""
    model = DCGAN(**TINY, cdc_patch_block=-1, cdc_anchor_every=4, cdc_anchors=3, cdc_anchor_std=0.01)
    calls: list[str] = []
    d = model.discriminator
    d_forward, d_patch, g_forward = d.forward, d.patch_logits, model.generator.forward
    d.forward = lambda *a, **k: calls.append("image") or d_forward(*a, **k)
    d.patch_logits = lambda *a, **k: calls.append("patch") or d_patch(*a, **k)
    latents: list[torch.Tensor] = []
    model.generator.forward = lambda z, *a, **k: latents.append(z.detach()) or g_forward(z, *a, **k)
    quiet_trainer(tmp_path, max_steps=2 * 9, max_epochs=-1, limit_val_batches=0).fit(model, datamodule=gan_data)
    per_batch = [calls[i : i + 3] for i in range(0, len(calls), 3)]  # real, fake (D step), fake (G step)
    assert len(per_batch) == 9
    assert [b[0] for b in per_batch] == ["image" if i % 4 == 0 else "patch" for i in range(9)]
    assert all(len(set(b)) == 1 for b in per_batch)
    anchors = model.cdc_anchor_z
    for i, z in enumerate(latents[::2]):  # the D step's latents of each batch
        nearest = torch.cdist(z, anchors).min(dim=1).values
        assert (nearest < 0.1).all() == (i % 4 == 0), i
    near = anchor_noise(anchors, 100, 0.01, torch.Generator().manual_seed(0))
    assert torch.cdist(near, anchors).min(dim=1).values.max() < 0.1


def test_cdc_anchors_are_a_function_of_the_noise_seed_in_every_process(tmp_path, gan_data):
    """A resume in a new process redraws the anchors from the checkpointed noise seed: no salted string hash."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from lit_finetune.modules.dcgan import cdc_anchors_for

    code = "from lit_finetune.modules.dcgan import cdc_anchors_for as f; print(f(7, 3, 4).sum().item())"
    sums = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        sums.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(sums) == 1 and float(sums.pop()) == pytest.approx(float(cdc_anchors_for(7, 3, 4).sum()))
    model = DCGAN(**TINY, cdc_patch_block=-1, cdc_anchors=3)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=gan_data)
    assert torch.equal(model.cdc_anchor_z, cdc_anchors_for(model.noise_stream.state["seed"], 3, 16))


# -- exact mid-epoch resume ------------------------------------------------------------------------
def _step_run(tmp_path, gan_data, source, max_steps, ckpt_path=None):
    L.seed_everything(0)
    model = DCGAN(
        **COND, pretrained=source, diffaugment="translation", ema_decay=0.9, cdc_weight=1000.0, cdc_patch_block=-1,
        cdc_anchor_every=2, ewc_generator=1e6, ewc_fisher_samples=16,
    )  # fmt: skip
    return model, fit_with_step_checkpoints(model, gan_data, tmp_path, max_steps, ckpt_path)


def test_mid_epoch_resume_is_exact_with_cdc_patch_d_and_ewc(tmp_path, gan_data, source):
    # 4 batches per epoch, 2 optimizer steps per batch: step=6 is inside the first epoch, on an odd batch
    full, full_trainer = _step_run(tmp_path / "full", gan_data, source, 12)
    mid = tmp_path / "full/steps/step=6.ckpt"
    resumed, resumed_trainer = _step_run(tmp_path / "part", gan_data, source, 12, str(mid))
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)
