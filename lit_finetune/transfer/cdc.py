"""Cross-domain distance consistency (CDC, Ojha et al. 2021, "Few-shot Image Generation via
Cross-domain Correspondence"): keep the adapted generator's pairwise similarity structure that of
the source generator, so few target images do not collapse it onto themselves.

Two parts, used by :class:`~lit_finetune.DCGAN` (``cdc_weight``, ``cdc_patch_block``):

* :func:`distance_consistency_loss` / :class:`DistanceConsistency`: the loss on the generator's
  intermediate features, against a frozen copy of the source generator;
* :func:`anchor_noise`: ``z`` drawn near a few fixed anchors, the region where the image-level
  discriminator is applied (elsewhere a patch-level one, see
  :meth:`~lit_finetune.nets.dcgan.DCGANDiscriminator.patch_logits`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_similarity_logits(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of every sample to every *other* sample: ``(B, C, ...)`` -> ``(B, B - 1)``
    (row ``i`` holds ``sim(f_i, f_j)`` for ``j != i``, in order of ``j``)."""
    flat = F.normalize(features.flatten(1).float(), dim=1, eps=1e-8)
    sim = flat @ flat.T
    b = sim.shape[0]
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=sim.device)
    return sim[off_diagonal].view(b, b - 1)


def distance_consistency_loss(
    adapted: Sequence[torch.Tensor], source: Sequence[torch.Tensor], layer: torch.Tensor | None = None
) -> torch.Tensor:
    """CDC's distance consistency loss between the adapted and the source generator's features.

    With ``sim`` the cosine similarity and ``G^l`` a generator's ``l``-th intermediate feature map,
    for a batch ``z_1 .. z_B`` (Ojha et al. 2021, Eqs. 1-3)::

        y_i^{s,l}   = softmax_j( sim(G_s^l(z_i),   G_s^l(z_j))   ),  j != i
        y_i^{s→t,l} = softmax_j( sim(G_s→t^l(z_i), G_s→t^l(z_j)) ),  j != i
        L_dist      = E_z sum_{l,i} D_KL( y_i^{s→t,l} || y_i^{s,l} )          (Eq. 3)

    This follows the authors' code (``train.py`` of utkarshojha/few-shot-gan-adaptation) where it
    differs from the equation: each anchor ``i`` uses *one* layer ``l_i`` drawn at random
    (``feat_ind``), and the loss is ``nn.KLDivLoss()(log y^{s→t}, y^s)``, i.e.
    ``D_KL(y^s || y^{s→t})`` averaged over the ``B (B - 1)`` entries (``reduction="mean"``),
    which the caller multiplies by ``kl_wt`` (1000 there). ``log_softmax`` replaces the code's
    ``log(softmax(.))`` (the same value, without the underflow).

    Args:
        adapted: the adapted generator's feature maps, one ``(B, C, H, W)`` tensor per layer (with grad).
        source: the source generator's maps for the same ``z`` (and labels), same layers.
        layer: ``(B,)`` layer index per anchor ``i`` (``None``: every anchor uses layer 0; with
            one layer that is the whole of it).

    Returns the scalar loss; 0 when the two generators agree.
    """
    if len(adapted) != len(source) or not adapted:
        raise ValueError(f"need the same, non-zero number of layers; got {len(adapted)} and {len(source)}")
    b = adapted[0].shape[0]
    if b < 3:
        raise ValueError(f"distance consistency needs a batch of at least 3 samples (2 others per anchor), got {b}")
    if layer is None:
        layer = torch.zeros(b, dtype=torch.long, device=adapted[0].device)
    rows = torch.arange(b, device=layer.device)
    # (L, B, B-1) similarities, then row i from layer l_i
    adapted_sim = torch.stack([pairwise_similarity_logits(f) for f in adapted])[layer, rows]
    with torch.no_grad():
        source_sim = torch.stack([pairwise_similarity_logits(f) for f in source])[layer, rows]
    # reduction="mean" of nn.KLDivLoss (the reference's), written out: torch warns that "mean" is not batchmean
    kl = F.kl_div(F.log_softmax(adapted_sim, dim=1), F.softmax(source_sim, dim=1), reduction="sum")
    return kl / adapted_sim.numel()


class DistanceConsistency(nn.Module):
    """A frozen copy of the source generator and CDC's distance consistency loss against it.

    The copy is a submodule, so a checkpoint carries it (resume and test need no source file),
    but its parameters never require gradients: they are in no optimizer group and get no
    gradient. Its BatchNorm layers keep no running statistics (the buffers are removed), so they
    always normalise with the statistics of the batch they see, as the adapted generator does in
    training, in train and eval mode alike: fed the same batch, an adapted generator equal to the
    source gives a loss of exactly 0.

    Call :meth:`reset_source` right after loading the source weights into the live generator.

    Args:
        generator: the generator being adapted; it must accept ``return_features=True``
            (:class:`~lit_finetune.nets.dcgan.DCGANGenerator` does).
        weight: the loss weight (the reference code's ``kl_wt``, 1000).
    """

    def __init__(self, generator: nn.Module, weight: float) -> None:
        super().__init__()
        self.weight = float(weight)
        self.source = copy.deepcopy(generator).requires_grad_(False)
        for module in self.source.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = module.running_var = module.num_batches_tracked = None

    @torch.no_grad()
    def reset_source(self, generator: nn.Module) -> None:
        """Take ``generator``'s current weights as the source (its BatchNorm running statistics are not used)."""
        state = {k: v for k, v in generator.state_dict().items() if k in self.source.state_dict()}
        self.source.load_state_dict(state)

    def forward(
        self,
        adapted_features: Sequence[torch.Tensor],
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        layer: torch.Tensor | None = None,
        rows: slice = slice(None),
    ) -> torch.Tensor:
        """``weight * L_dist``: the source generator runs on ``(z, y)`` (the whole batch the adapted one
        saw, so BatchNorm normalises alike); ``rows`` selects the CDC samples of that batch."""
        with torch.no_grad():
            _, source_features = self.source(z, y, return_features=True)
        adapted = [f[rows] for f in adapted_features]
        source = [f[rows] for f in source_features]
        return self.weight * distance_consistency_loss(adapted, source, layer)


def anchor_noise(anchors: torch.Tensor, n: int, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` latents from CDC's anchor regions: ``z = a_k + std * N(0, I)`` with ``a_k`` a random anchor
    (the reference code's ``get_subspace``, ``subspace_std`` 0.1 there)."""
    index = torch.randint(len(anchors), (n,), device=anchors.device, generator=generator)
    noise = torch.randn(n, anchors.shape[1], device=anchors.device, generator=generator)
    return anchors[index] + std * noise
