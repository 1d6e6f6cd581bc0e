"""``compile_mode``: every module's networks compiled in place (one mechanism, ``TransferModule.compile_networks``).

A compiled step must compute what the eager one does (inductor on the CPU here: same losses within float
tolerance), and compiling must change nothing else: state-dict keys (no ``_orig_mod.``), checkpoints that load
into an eager module, pretrained loading, freezing by module name, the DCGAN's EMA. The compiling fits take a
minute or more on a cold inductor cache (gcc builds the kernels), hence ``slow``; they still run in CI.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_finetune import DCGAN, VAE, GANAugmentedClassifier, ImageClassifier
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.modules.base import COMPILE_MODES

STEPS = 4


class Losses(L.Callback):
    """Every back-propagated loss (a GAN's D and G losses too)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(loss.item())


@pytest.fixture(scope="module")
def data(fashion_root):
    """Two classes, 8 images each, batches of 4 (so 4 batches an epoch, all the same shape)."""
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6], samples_per_class=8, val_split=10, batch_size=4
    )


def fit(make, compile_mode, data, tmp_path, callbacks=(), **trainer_kwargs):
    torch.manual_seed(0)
    model, losses = make(compile_mode), Losses()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[losses, *callbacks], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return model, losses.losses, trainer


def check_alike(eager, compiled, eager_losses, compiled_losses, trainer, tmp_path, make):
    """Same losses and weights within tolerance, same keys, and a compiled fit's checkpoint loads into eager."""
    assert len(compiled_losses) == len(eager_losses) > 0
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert list(compiled_state) == list(eager_state)
    assert not any("_orig_mod" in key for key in compiled_state)
    for key, value in eager_state.items():  # as a whole (Adam moves a near-zero-gradient element by ~lr either way)
        if value.is_floating_point():
            assert (compiled_state[key] - value).norm() <= 1e-3 * value.norm() + 1e-4, key
        else:
            assert torch.equal(compiled_state[key], value), key
    for name in compiled.compiled_networks:  # the networks did run compiled
        assert compiled.get_submodule(name)._compiled_call_impl is not None
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    fresh = make(None)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: every key known to an eager module


@pytest.mark.slow
def test_compiled_vae_steps_match_eager(tmp_path, data):
    def make(mode):
        return VAE(latent_dim=4, encoder_width=4, decoder_width=4, kl_warmup_steps=2, compile_mode=mode)

    eager, eager_losses, _ = fit(make, None, data, tmp_path / "e", max_steps=STEPS)
    compiled, compiled_losses, trainer = fit(make, "default", data, tmp_path / "c", max_steps=STEPS)
    check_alike(eager, compiled, eager_losses, compiled_losses, trainer, tmp_path, make)


@pytest.mark.slow
def test_compiled_dcgan_steps_match_eager_with_the_ema(tmp_path, data):
    """Manual optimisation (a D and a G step per batch, toggled requires_grad), and the EMA of the compiled G."""

    def make(mode):
        return DCGAN(latent_dim=8, generator_width=4, discriminator_width=4, compile_mode=mode)

    eager, eager_losses, _ = fit(make, None, data, tmp_path / "e", max_steps=2 * STEPS)
    compiled, compiled_losses, trainer = fit(make, "default", data, tmp_path / "c", max_steps=2 * STEPS)
    assert len(eager_losses) == 2 * STEPS and int(compiled.ema_updates) == STEPS
    assert not torch.equal(compiled.generator_ema.project.conv.weight, compiled.generator.project.conv.weight)
    check_alike(eager, compiled, eager_losses, compiled_losses, trainer, tmp_path, make)


@pytest.mark.slow
def test_compiled_classifier_matches_eager_through_pretrained_loading_and_unfreezing(tmp_path, data):
    """From a pretrained checkpoint, backbone frozen for the first epoch then trained: the compiled networks
    recompile at the phase change and still compute the eager losses."""
    from conftest import save_lightning_checkpoint

    torch.manual_seed(1)
    source = save_lightning_checkpoint(ImageClassifier(num_classes=2), tmp_path / "source.ckpt")

    def make(mode):
        return ImageClassifier(num_classes=2, pretrained=source, compile_mode=mode)

    kwargs = dict(max_epochs=2, limit_train_batches=2)
    eager, eager_losses, _ = fit(make, None, data, tmp_path / "e", [LayerFreezing(["backbone"], 1)], **kwargs)
    compiled, compiled_losses, trainer = fit(make, "default", data, tmp_path / "c", [LayerFreezing(["backbone"], 1)],
                                       **kwargs)  # fmt: skip
    assert compiled.load_report is not None and compiled.load_report.loaded  # the source was read
    assert len(compiled_losses) == 4
    check_alike(eager, compiled, eager_losses, compiled_losses, trainer, tmp_path, make)


@pytest.mark.parametrize("cls", [ImageClassifier, GANAugmentedClassifier, DCGAN, VAE])
def test_every_module_compiles_its_networks_in_place(cls):
    """One mechanism for all: the switch is a constructor argument (a runtime option, so a checkpoint's value
    yields to the command line), and compiling keeps the networks, their names and their state-dict keys."""
    kwargs = {"num_classes": 2} if issubclass(cls, ImageClassifier) else {}
    model = cls(**kwargs, compile_mode="reduce-overhead")
    keys = list(model.state_dict())
    networks = [model.get_submodule(name) for name in model.compiled_networks]
    assert networks and "compile_mode" in cls.runtime_options and model.hparams.compile_mode == "reduce-overhead"
    model.configure_model()  # what Lightning calls at the start of a fit (compiling itself waits for the first call)
    model.configure_model()  # once
    assert [model.get_submodule(name) for name in model.compiled_networks] == networks
    assert all(net._compiled_call_impl is not None for net in networks) and list(model.state_dict()) == keys
    eager = cls(**kwargs)
    eager.configure_model()
    assert all(eager.get_submodule(name)._compiled_call_impl is None for name in eager.compiled_networks)


def test_an_unknown_compile_mode_names_the_choices():
    with pytest.raises(ValueError, match="reduce-overhead"):
        ImageClassifier(num_classes=2, compile_mode="fast")
    assert "default" in COMPILE_MODES
