"""VAE pretraining and transfer, measured in nats."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_finetune.modules.base import NoiseStream, TransferModule
from lit_finetune.nets.vae import ConvDecoder, ConvEncoder
from lit_finetune.transfer.l2sp import L2SP
from lit_finetune.transfer.param_groups import block_groups, weight_decay_groups
from lit_finetune.transfer.pretrained import LoadReport, load_pretrained


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images -> {0, 1} pixels (intensity above one half), the data the likelihood models."""
    return (x > 0).to(x.dtype)


class VAE(TransferModule):
    """A convolutional VAE with a Gaussian posterior, a standard-normal prior and a Bernoulli likelihood.

    **Likelihood, so the nats mean something:** every pixel's intensity in ``[0, 1]`` is binarised
    at one half (``x > 0`` on the package's ``[-1, 1]`` images), and the decoder gives a Bernoulli
    probability per pixel. ``-log p(x)`` is then a proper discrete negative log-likelihood of the
    binarised image, in nats per image; bits per dimension divide it by ``C*H*W*ln 2``. For scale,
    one-layer VAEs on (stochastically) binarised MNIST score about 85-87 nats (Burda et al. 2015);
    this is Fashion-MNIST binarised by a fixed threshold, so the figures are comparable only in kind.

    Logged: ``elbo`` (= ``-(rec + kl)``, nats, higher is better), ``rec`` (``-log p(x|z)``) and
    ``kl`` (``KL(q(z|x) || p(z))``) for train / val / test; at test also ``nll_iwae``, the
    importance-weighted bound on ``-log p(x)`` with ``iw_samples`` samples (Burda et al.; it
    equals ``-elbo`` in expectation for one sample and tightens as the count grows),
    ``bits_per_dim`` from it, and ``recon_mse`` (mean squared error of the reconstruction's mean
    image against the input, in ``[-1, 1]``).

    **Training steps are logged where they are read.** ``train/rec``, ``train/kl``, ``train/elbo``
    and ``train/beta`` (the KL weight) are logged, with that step's values, on the steps Lightning
    writes to the loggers (every ``Trainer(log_every_n_steps=...)`` steps, 50 by default, and a step
    where the fit is stopped), on the last batch of every epoch and on the last step of
    ``max_steps``; not on the other steps, whose values Lightning would not write
    (:meth:`~lit_finetune.modules.base.TransferModule.log_train_step`). The loggers therefore record
    the same values at the same steps as logging every step would; ``trainer.callback_metrics`` holds
    the last logged step's values in between (for a callback that reads ``train/*`` at every step,
    set ``log_every_n_steps=1``). Each ``self.log`` key costs Lightning about 0.3 ms per step on a
    CPU, which four keys made about 3% of a ``configs/vae/pretrain.yaml`` step (``benchmarks/speed.py``).

    Transfer strategies: full transfer (``pretrained=``), frozen encoder or decoder
    (``LayerFreezing(["encoder"] | ["decoder"], unfreeze_at_epoch=None)``), L2-SP toward the
    pretrained weights (``l2sp_alpha``), scratch (no ``pretrained``).

    Args:
        latent_dim: size of ``z``.
        in_channels, image_size: image shape (linked from the datamodule by the CLI).
        num_classes: unused (the CLI links it; the VAE is unconditional).
        encoder_width, decoder_width: channel widths of the nets.
        beta: weight of the KL term once warmed up (1 is the ELBO).
        kl_warmup_steps: the KL weight ramps linearly from 0 to ``beta`` over these optimizer steps.
        iw_samples: samples of the importance-weighted bound at test.
        pretrained: a VAE checkpoint (or state dict) to transfer from; read at fit start.
        l2sp_alpha: L2-SP coefficient toward the pretrained encoder and decoder.
        num_sample_images: images in the reconstruction and prior-sample grids.
        optimizer, lr_scheduler, scheduler_interval, scheduler_monitor, compile_mode: see :class:`TransferModule`.
    """

    runtime_options = ("iw_samples", "compile_mode")  # the test bound's samples; how the networks run
    compiled_networks = ("encoder", "decoder")

    def __init__(
        self,
        latent_dim: int = 16,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,
        encoder_width: int = 32,
        decoder_width: int = 32,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        iw_samples: int = 64,
        pretrained: str | None = None,
        l2sp_alpha: float = 0.0,
        num_sample_images: int = 32,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        compile_mode: str | None = None,
    ) -> None:
        if beta < 0 or kl_warmup_steps < 0 or iw_samples < 1:
            raise ValueError(
                f"need beta >= 0, kl_warmup_steps >= 0, iw_samples >= 1; got {beta}, {kl_warmup_steps}, {iw_samples}"
            )
        super().__init__(
            None, in_channels, image_size, optimizer, lr_scheduler, scheduler_interval, scheduler_monitor, pretrained,
            compile_mode,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.encoder = ConvEncoder(image_size, in_channels, latent_dim, encoder_width)
        self.decoder = ConvDecoder(image_size, in_channels, latent_dim, decoder_width)
        both = nn.ModuleList([self.encoder, self.decoder])
        self.l2sp = L2SP(both, l2sp_alpha) if l2sp_alpha > 0 else None
        fixed = torch.Generator().manual_seed(0)
        self.register_buffer("fixed_z", torch.randn(num_sample_images, latent_dim, generator=fixed))
        self._grid_inputs: torch.Tensor | None = None  # the first training images seen, for reconstructions
        self.noise_stream = NoiseStream()  # the reparameterisation noise of training: each DDP rank draws its own

    # -- networks --------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        groups = [
            *block_groups(self.encoder, "encoder", expand=["blocks"]),
            *block_groups(self.decoder, "decoder", expand=["blocks"]),
        ]
        return weight_decay_groups(groups, anchored=["encoder", "decoder"] if self.l2sp is not None else [])

    def read_pretrained(self, source: str) -> LoadReport:
        """Load the encoder and decoder; the L2-SP anchor is re-taken from them."""
        report = load_pretrained(self, source, exclude=["l2sp.", "fixed_z"])
        if self.l2sp is not None:
            self.l2sp.reset_anchor(report.parameters_from_source(self))
        return report

    # -- the model -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior ``q(z|x)``'s mean and log-variance for ``[-1, 1]`` images."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image for ``z``, in ``[-1, 1]``."""
        return self.decoder(z).sigmoid() * 2 - 1

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` images from the prior (mean images, in ``[-1, 1]``); ``labels`` is ignored (unconditional)."""
        self.warn_if_source_unread()
        return self.decode(torch.randn(n, self.hparams.latent_dim, device=self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(mu(x))``: the reconstruction's mean image, in ``[-1, 1]``."""
        self.warn_if_source_unread()
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    def terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image ``rec`` (-log p(x|z), one z from q, drawn with ``generator``, default the global RNG)
        and ``kl``, in nats."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        rec = F.binary_cross_entropy_with_logits(self.decoder(z), binarize(x), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return {"rec": rec, "kl": kl}

    @torch.no_grad()
    def iwae_nll(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Per-image importance-weighted bound on ``-log p(x)`` with ``k`` samples, in nats."""
        mu, logvar = self.encode(x)
        std, target = (0.5 * logvar).exp(), binarize(x)
        log_w = []
        for _ in range(k):
            eps = torch.randn_like(mu)
            z = mu + eps * std
            log_px_z = -F.binary_cross_entropy_with_logits(self.decoder(z), target, reduction="none").flatten(1).sum(1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
            log_qz = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(1)
            log_w.append(log_px_z + log_pz - log_qz)
        return -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k))

    def kl_weight(self) -> float:
        """β of the current step: linear warm-up from 0 over ``kl_warmup_steps``, then ``beta``."""
        warmup = self.hparams.kl_warmup_steps
        return self.hparams.beta * (1.0 if warmup == 0 else min(1.0, self.global_step / warmup))

    # -- steps -----------------------------------------------------------------------------------
    def _log_terms(self, prefix: str, terms: dict[str, torch.Tensor], n: int) -> None:
        rec, kl = terms["rec"].mean(), terms["kl"].mean()
        values = {f"{prefix}/rec": rec, f"{prefix}/kl": kl, f"{prefix}/elbo": -(rec + kl)}
        self.log_dict(values, prog_bar=prefix == "val", sync_dist=prefix != "train", batch_size=n)

    @staticmethod
    def _train_values(rec: torch.Tensor, kl: torch.Tensor, beta: float) -> dict[str, Any]:
        rec, kl = rec.mean(), kl.mean()
        return {"train/rec": rec, "train/kl": kl, "train/elbo": -(rec + kl), "train/beta": beta}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        if self._grid_inputs is None:
            self._grid_inputs = x[: self.hparams.num_sample_images].detach().clone()
        terms = self.terms(x, self.noise_generator())
        beta = self.kl_weight()
        loss = (terms["rec"] + beta * terms["kl"]).mean()
        if self.l2sp is not None:
            loss = loss + self.l2sp()
        rec, kl = terms["rec"].detach(), terms["kl"].detach()
        self.log_train_step(lambda: self._train_values(rec, kl, beta), batch_idx, batch_size=len(x))  # where read
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_terms("val", self.terms(batch[0]), len(batch[0]))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x = batch[0]
        self._log_terms("test", self.terms(x), len(x))
        nll = self.iwae_nll(x, self.hparams.iw_samples).mean()
        dims = x[0].numel()
        self.log_dict(
            {
                "test/nll_iwae": nll,
                "test/bits_per_dim": nll / (dims * math.log(2)),
                "test/recon_mse": (self.reconstruct(x) - x).pow(2).mean(),
            },
            sync_dist=True,
            batch_size=len(x),
        )

    def image_samples(self) -> dict[str, torch.Tensor]:
        """Prior samples on fixed noise and, once a batch was seen, inputs beside their reconstructions."""
        out = {"prior_samples": self.decode(self.fixed_z)}
        if self._grid_inputs is not None:
            x = self._grid_inputs.to(self.device)
            out["reconstructions"] = torch.stack([x, self.reconstruct(x)], dim=1).flatten(0, 1)  # input, output, ...
        return out
