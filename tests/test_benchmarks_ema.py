"""benchmarks/ema_variants.py at its smoke size: every variant scored, the table, the floor row, the grids."""

from __future__ import annotations

import sys

import torch

from conftest import REPO, save_lightning_checkpoint, shift_generator

sys.path.insert(0, str(REPO / "benchmarks"))
import ema_variants as bench  # noqa: E402


def test_ema_variants_smoke_writes_every_variant_and_the_floor(tmp_path, fashion_root):
    from lit_finetune import ImageClassifier

    torch.manual_seed(0)
    extractor = save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path / "extractor.ckpt")
    bench.main(["--profile", "smoke", "--extractor", extractor, "--threads", "1",
                "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])  # fmt: skip
    text = (tmp_path / "out/ema_variants.md").read_text()
    table = text.split("<details><summary>Provenance")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:-1]] == list(bench.VARIANTS)
    assert rows[-1].startswith("| *real vs real floor")
    import provenance

    record = provenance.read(text)
    assert provenance.missing(text) == [] and record["torch_threads"] == 1 and "FID extractor" in record["inputs"]
    assert (tmp_path / "out/ema_variants.png").stat().st_size > 1000


def test_shadows_follow_the_module_decay_and_the_constant_one():
    from lit_finetune import DCGAN

    model = DCGAN(latent_dim=8, generator_width=8, discriminator_width=8, ema_batchnorm="average")
    shadows = bench.EMAShadows()
    shadows.on_train_start(None, model)
    for _ in range(5):
        shift_generator(model.generator, 0.1)
        model.update_ema()
        shadows.on_train_batch_end(None, model, None, None, 0)
    # the averaged-buffer shadow is exactly what the module's own "average" mode computed
    for shadow, buffer in zip(shadows.averaged_buffers, model.generator_ema.buffers()):
        assert torch.allclose(shadow, buffer.float(), atol=1e-6) if shadow.is_floating_point() else torch.equal(shadow, buffer)
    # the constant-decay shadow barely moved (decay 0.999), the warmed-up EMA moved a lot
    first = next(model.generator.parameters())
    moved_ema = (next(model.generator_ema.parameters()) - (first - 0.5)).abs().mean()
    moved_no_warmup = (shadows.no_warmup[0] - (first - 0.5)).abs().mean()
    assert moved_no_warmup < 0.01 < moved_ema
