"""Untrusted module checkpoints: the loader and the CLI import only lit_finetune modules and call no
instantiator a checkpoint names; every refusal is one line naming the file."""

from __future__ import annotations

import sys
import tomllib

import lightning
import pytest
import torch
from conftest import REPO, save_lightning_checkpoint
from packaging.requirements import Requirement

from lit_finetune import DCGAN
from lit_finetune.cli import cli_main, main
from lit_finetune.modules.loading import CheckpointLoadError, load_module_checkpoint


def _dcgan_checkpoint(tmp_path, **hparams) -> str:
    """A small conditional DCGAN checkpoint whose hyper-parameters are updated with ``hparams``."""
    path = save_lightning_checkpoint(
        DCGAN(latent_dim=8, num_classes=5, conditional=True, generator_width=8, discriminator_width=8),
        tmp_path / "g.ckpt",
    )
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    torch.save(checkpoint, path)
    return path


def _planted_module(tmp_path, monkeypatch, name: str) -> None:
    """An importable module ``name`` that records its import and every call of its ``build``."""
    (tmp_path / f"{name}.py").write_text(
        "CALLS = []\n"
        "open(__file__ + '.imported', 'w').close()\n"
        "def build(cls, kwargs):\n"
        "    CALLS.append(cls)\n"
        "    return cls(**kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_foreign_instantiator_is_refused_before_it_runs(tmp_path, monkeypatch):
    """Lightning before 2.6.6 imports and calls any ``_instantiator``; the loader must not depend on that."""
    import lightning.pytorch.core.saving as saving

    _planted_module(tmp_path, monkeypatch, "planted_instantiator")
    # make the installed Lightning behave like 2.5.x, which trusts every instantiator
    allowed = {*saving._ALLOWED_INSTANTIATORS, "planted_instantiator.build"}
    monkeypatch.setattr(saving, "_ALLOWED_INSTANTIATORS", allowed)
    path = _dcgan_checkpoint(tmp_path, _class_path="lit_finetune.DCGAN", _instantiator="planted_instantiator.build")
    with pytest.raises(CheckpointLoadError, match="instantiator 'planted_instantiator.build'.*refused") as err:
        load_module_checkpoint(path, role="generator (--model.generator)")
    assert "\n" not in str(err.value) and "g.ckpt" in str(err.value)
    assert not (tmp_path / "planted_instantiator.py.imported").exists()
    assert "planted_instantiator" not in sys.modules
    for value in (["a"], {"x": 1}, 3):  # not even a string
        path = _dcgan_checkpoint(tmp_path, _instantiator=value)
        with pytest.raises(CheckpointLoadError, match="instantiator"):
            load_module_checkpoint(path)


def test_lightning_clis_instantiator_is_accepted_and_no_instantiator_is_called(tmp_path, monkeypatch):
    """A LightningCLI checkpoint names Lightning's own instantiator: it loads, built by the class's constructor."""
    import lightning.pytorch.cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint's instantiator was called")

    monkeypatch.setattr(lightning.pytorch.cli, "instantiate_module", must_not_run)
    path = _dcgan_checkpoint(
        tmp_path, _class_path="lit_finetune.DCGAN", _instantiator="lightning.pytorch.cli.instantiate_module"
    )
    module = load_module_checkpoint(path)
    assert isinstance(module, DCGAN) and module.hparams.latent_dim == 8 and not module.training


def test_lightning_floor_is_the_first_release_that_refuses_foreign_instantiators(tmp_path):
    """pyproject allows no Lightning that calls a checkpoint's ``_instantiator`` unchecked (2.6.5 and older
    do; checked in their wheels' saving.py), and the installed Lightning's own loader refuses one."""
    from lit_finetune import ImageClassifier

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (lightning_req,) = [Requirement(d) for d in dependencies if Requirement(d).name == "lightning"]
    assert not lightning_req.specifier.contains("2.6.5") and not lightning_req.specifier.contains("2.5.6")
    assert lightning_req.specifier.contains("2.6.6") and lightning_req.specifier.contains(lightning.__version__)
    path = save_lightning_checkpoint(ImageClassifier(5, backbone="resnet10"), tmp_path / "c.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_instantiator"] = "builtins.print"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="allowlist"):  # Lightning's own check, on the oldest allowed release too
        ImageClassifier.load_from_checkpoint(path, weights_only=True)


@pytest.mark.parametrize(
    "class_path, message",
    [
        ("lit_finetune.no_such_module.Model", "not a lit_finetune module.*ModuleNotFoundError"),
        ("lit_finetune.modules.base.TransferModule", "not a lit_finetune module"),  # the base: no network
        ("lit_finetune.modules.base.Network", "not a lit_finetune module"),
        ("lit_finetune.ImageClassifier", "names 'lit_finetune.ImageClassifier' but does not rebuild as one"),
        ("os.system", "does not name a lit_finetune module"),
    ],
)
def test_bad_class_paths_are_one_line_checkpoint_errors(tmp_path, class_path, message):
    path = _dcgan_checkpoint(tmp_path, _class_path=class_path)
    with pytest.raises(CheckpointLoadError, match=message) as err:
        load_module_checkpoint(path)
    assert "\n" not in str(err.value) and "g.ckpt" in str(err.value)


@pytest.mark.parametrize(
    "hparams",
    [
        {"generator_optimizer": "planted_model.Opt"},  # a callable-typed argument: jsonargparse imports a string
        {"optimizer": {"class_path": "planted_model.Opt", "init_args": {"lr": 0.1}}},
        {"pretrained": [{"class_path": "planted_model.Opt"}]},  # a class spec at any depth
    ],
)
def test_hyperparameters_the_cli_would_import_are_refused(tmp_path, monkeypatch, hparams):
    """Beyond ``_class_path``: LightningCLI parses ``--ckpt_path``'s hyper-parameters against the constructor, and
    jsonargparse imports the class of a callable-typed argument or of a nested ``class_path``."""
    _planted_module(tmp_path, monkeypatch, "planted_model")
    path = _dcgan_checkpoint(tmp_path, _class_path="lit_finetune.DCGAN", **hparams)
    key = next(iter(hparams))
    with pytest.raises(CheckpointLoadError, match=rf"sets \['{key}'\] in its hyper-parameters.*refused"):
        cli_main(["test", "--config", str(REPO / "configs/dcgan/finetune.yaml"), "--ckpt_path", path])
    with pytest.raises(CheckpointLoadError, match=key):
        load_module_checkpoint(path)
    assert not (tmp_path / "planted_model.py.imported").exists() and "planted_model" not in sys.modules


def test_cli_checks_the_class_path_of_ckpt_path_before_importing_it(tmp_path, monkeypatch, capsys):
    """LightningCLI imports the ``_class_path`` of ``--ckpt_path`` to rebuild the model; a crafted file must
    not make it import another module."""
    _planted_module(tmp_path, monkeypatch, "planted_model")
    path = _dcgan_checkpoint(tmp_path, _class_path="planted_model.Model")
    args = ["test", "--config", str(REPO / "configs/classifier/digits_target.yaml"), "--ckpt_path", path]
    with pytest.raises(CheckpointLoadError, match=r"checkpoint \(--ckpt_path\).*does not name a lit_finetune module"):
        cli_main(args)
    assert not (tmp_path / "planted_model.py.imported").exists() and "planted_model" not in sys.modules
    missing = _dcgan_checkpoint(tmp_path, _class_path="lit_finetune.no_such_module.Model")
    with pytest.raises(CheckpointLoadError, match="ModuleNotFoundError"):
        cli_main([*args[:-1], missing])
    monkeypatch.setattr(sys, "argv", ["lit-finetune", *args[:-1], path])
    with pytest.raises(SystemExit) as exit_info:  # the shell entry point: one line, no traceback
        main()
    assert exit_info.value.code == 2
    assert "lit-finetune: error: The checkpoint (--ckpt_path)" in capsys.readouterr().err
