"""lit_finetune.zoo: names resolve everywhere a path is read; the cache survives a killed build, a corrupt
file and two concurrent builders. Builds are smoke-sized (conftest's zoo_home) and run once per session."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, ZOO_BUILD_SECONDS, copy_zoo_home
from lit_finetune import zoo
from lit_finetune.zoo import REGISTRY, ZooEntry, ZooError, ensure, entry_dir, lookup, resolve_source, status

ZOO_CLI = [sys.executable, "-m", "lit_finetune.zoo"]
VAE = "fashion-mnist-0-4/vae"  # the cheapest entry to build again
VAE_KEY = lookup(VAE).key  # its latest version
#: the latest version of every name: what unversioned names (the shipped configs) read, and what zoo_built builds
#: what the session's zoo_built fixture builds: every name but the tour's short recipes
LATEST = [lookup(name) for name in zoo.known_names() if not name.endswith("-quick")]


def _zoo_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    pipe = subprocess.PIPE
    return subprocess.Popen([*ZOO_CLI, *args], env=env, stdout=pipe, stderr=pipe, text=True, **kwargs)


# -- names --------------------------------------------------------------------------------------------
def test_names_versions_and_errors_that_list_the_known_names():
    latest = lookup("zoo:fashion-mnist-0-4/dcgan")
    assert latest == lookup("fashion-mnist-0-4/dcgan@v1") and latest.key == "fashion-mnist-0-4/dcgan@v1"
    # the tour's short recipes are other names, so a name without @v<k> keeps its full recipe
    assert lookup("fashion-mnist-0-4/dcgan-quick").config == latest.config != ()
    assert lookup("fashion-mnist-0-4/dcgan-quick").overrides and not latest.overrides
    with pytest.raises(ZooError, match="Known names: .*fashion-mnist-0-4/classifier.*fashion-mnist/feature-extractor"):
        lookup("zoo:fashion-mnist-0-4/gan")
    with pytest.raises(ZooError, match=r"known: fashion-mnist-0-4/vae@v1"):
        lookup("zoo:fashion-mnist-0-4/vae@v9")
    for source in (None, "IMAGENET1K_V1", "runs/x/best.ckpt", Path("a.ckpt")):
        assert resolve_source(source) is source  # everything that is not a zoo name passes through
    assert len({e.key for e in REGISTRY}) == len(REGISTRY)


def test_shipped_configs_name_known_entries_not_runs_paths():
    """No shipped config reads a file an earlier run must have written; every zoo name it uses exists."""
    names = set()
    for config in sorted((REPO / "configs").glob("*/*.yaml")):
        init_args = (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}
        for key in ("pretrained", "feature_extractor", "generator", "teacher"):
            value = init_args.get(key)
            assert value is None or zoo.is_zoo_name(value), f"{config.name}: {key}: {value}"
            if value:
                names.add(lookup(value).name)
    # a teacher, a meta source, and the tour's short recipes
    opt_in = {"fashion-mnist-5-9-50shot/classifier", "fashion-mnist-0-4/classifier-reptile",
              *(e.name for e in REGISTRY if e.name.endswith("-quick"))}
    assert names == {e.name for e in REGISTRY} - opt_in
    assert (REPO / "configs" / lookup("fashion-mnist-5-9-50shot/classifier").config).is_file()


# -- building ------------------------------------------------------------------------------------------
def test_dependencies_are_pinned_to_a_version():
    """An entry's recipe names the versions of the entries it is built from (in its overrides), so a new
    version of a source never changes what an older name means."""
    for entry in REGISTRY:
        names = [v for v in _values(zoo.effective_config(entry)) if zoo.is_zoo_name(v)]
        assert all(re.search(r"@v\d+$", name) for name in names), (entry.key, names)
    assert [d.key for d in zoo._dependencies(lookup("fashion-mnist-5-9-50shot/cdcgan@v1"))] == [
        "fashion-mnist-0-4/dcgan@v1", "fashion-mnist/feature-extractor@v1"]  # fmt: skip
    recipes = {e.key: zoo.recipes(e)["build"] for e in REGISTRY}
    assert len(set(recipes.values())) == len(REGISTRY)  # a version is a recipe: no two are the same


def _values(node: object) -> list:
    if isinstance(node, dict):
        return [v for value in node.values() for v in _values(value)]
    if isinstance(node, list):
        return [v for value in node for v in _values(value)]
    return [node]


def test_every_entry_builds_once_with_a_manifest(zoo_built):
    print(f"zoo fixture: {len(LATEST)} smoke builds took {ZOO_BUILD_SECONDS[0]:.0f} s")
    for entry in LATEST:
        assert status(entry) == ("ok", status(entry)[1]), entry.key
        manifest = json.loads((entry_dir(entry) / "manifest.json").read_text())
        config = REPO / "configs" / entry.config
        assert manifest["config_text"] == config.read_text() and manifest["seed"] == entry.seed
        assert manifest["overrides"][: len(entry.overrides)] == list(entry.overrides) and manifest["smoke"] is True
        assert manifest["sha256"] == zoo._sha256(entry_dir(entry) / "model.ckpt")
        assert manifest["lit_finetune_version"] and manifest["recipe"] == zoo.recipes(entry)["build"]
        # the config's monitored checkpoint when it writes one, else its last
        assert manifest["checkpoint"] == ("best" if "monitor: val/" in config.read_text() else "last"), entry.key
    cdcgan = json.loads((entry_dir(lookup("fashion-mnist-5-9-50shot/cdcgan")) / "manifest.json").read_text())
    needs = ("fashion-mnist-0-4/dcgan@v1", "fashion-mnist/feature-extractor@v1")
    assert cdcgan["dependencies"] == {key: zoo._sha256(zoo.entry_path(lookup(key))) for key in needs}
    before = {e.key: zoo.entry_path(e).stat().st_mtime_ns for e in LATEST}
    assert resolve_source("zoo:" + VAE) == str(zoo.entry_path(lookup(VAE)))
    assert before == {e.key: zoo.entry_path(e).stat().st_mtime_ns for e in LATEST}  # cached: nothing rebuilt


def test_every_reader_of_a_path_takes_a_name(zoo_built):
    from lit_finetune.metrics import FeatureExtractor
    from lit_finetune.modules.augmented import load_generator, load_teacher
    from lit_finetune.transfer import read_state_dict

    assert any(k.startswith("encoder.") for k in read_state_dict("zoo:fashion-mnist-0-4/vae"))  # pretrained
    generator = load_generator("zoo:fashion-mnist-5-9-50shot/cdcgan")
    assert generator.num_classes == 5  # generator: the conditional G(z, y) of the 5 target classes
    assert load_teacher("zoo:fashion-mnist-5-9-50shot/classifier").num_classes == 5  # teacher
    assert FeatureExtractor.from_checkpoint("zoo:fashion-mnist/feature-extractor").num_classes == 10


# -- the cache survives ------------------------------------------------------------------------------------
def test_a_corrupt_entry_is_rebuilt_never_loaded(zoo_built, tmp_path, monkeypatch, capfd):
    copy_zoo_home(zoo_built, tmp_path / "home", monkeypatch)
    entry = lookup(VAE)
    path = zoo.entry_path(entry)
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: torch.load might not notice, the hash does
    path.write_bytes(bytes(data))
    assert status(entry)[0] == "corrupt"
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(Path(f).read_bytes()) or real_load(f, *a, **k))
    from lit_finetune.transfer import read_state_dict

    state = read_state_dict("zoo:" + VAE)
    assert f"zoo: building {VAE_KEY} (corrupt: model.ckpt has sha256" in capfd.readouterr().err
    assert loads and bytes(data) not in loads  # only the rebuilt file was read
    assert status(entry)[0] == "ok" and state and path.read_bytes() != bytes(data)
    # an unreadable manifest also reads as corrupt, and verify says so
    (entry_dir(entry) / "manifest.json").write_text("{")
    assert status(entry)[0] == "corrupt"
    assert zoo.main(["verify"]) == 1


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and PR_SET_PDEATHSIG")
def test_a_killed_build_leaves_no_half_entry(zoo_built, tmp_path, monkeypatch):
    """SIGKILL the builder mid-training: its training process dies with it, the entry reads as missing,
    and the next build cleans the leftovers and succeeds."""
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(tmp_path / "home"))
    entry = lookup(VAE)
    proc = _zoo_cli("build", VAE)
    builds = tmp_path / "home/zoo/.builds"
    deadline = time.time() + 120
    while not (builds.is_dir() and any(builds.iterdir()) and _children(proc.pid)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    child = _children(proc.pid)[0]
    time.sleep(1.0)  # the training subprocess is running
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 30
    while _alive(child):
        assert time.time() < deadline, "the training subprocess outlived its killed builder"
        time.sleep(0.1)
    assert status(entry)[0] == "missing" and not zoo.entry_path(entry).exists()
    assert any(builds.iterdir())  # the killed build's folder is left behind ...

    # a crash between moving the checkpoint in and writing the manifest leaves no loadable entry either
    monkeypatch.setattr(zoo, "_build", _fake_build(zoo_built))
    write_manifest = zoo._write_manifest
    monkeypatch.setattr(zoo, "_write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ensure(entry)
    assert not any(builds.iterdir())  # ... and removed by the next build (which held the lock)
    assert zoo.entry_path(entry).exists() and status(entry)[0] == "missing"
    monkeypatch.setattr(zoo, "_write_manifest", write_manifest)
    assert ensure(entry) == zoo.entry_path(entry) and status(entry)[0] == "ok"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _fake_build(built_home: Path):
    """A stand-in for ``zoo._build`` that copies the session's checkpoint instead of training."""

    def build(entry: ZooEntry, work: Path, why: str, reason: str, dependencies) -> tuple[Path, dict]:
        target = work / "model.ckpt"
        shutil.copy(built_home / "zoo" / entry.name / f"v{entry.version}" / "model.ckpt", target)
        return target, {"name": entry.name, "recipe": zoo.recipes(entry)["build"], "source": "build"}

    return build


def test_two_concurrent_builders_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(tmp_path / "home"))
    procs = [_zoo_cli("build", VAE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    path = str(zoo.entry_path(lookup(VAE)))
    assert [out.strip() for out, _ in outputs] == [path, path]  # stdout: the path only
    errs = [err for _, err in outputs]
    assert sum(err.count(f"zoo: building {VAE_KEY}") for err in errs) == 1, errs
    assert status(lookup(VAE))[0] == "ok"


# -- downloads -------------------------------------------------------------------------------------------
def test_a_name_with_a_url_is_downloaded_with_its_hash_checked(zoo_built, tmp_path, monkeypatch, capfd):
    """With a network a name maps to published weights (torch.hub, check_hash, weights_only); a file URL
    stands in for it here. A bad hash falls back to the build, and so does offline mode."""
    source = zoo.entry_path(lookup(VAE))  # in the session's built home, before the switch to an empty one
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LIT_FINETUNE_ZOO_OFFLINE", raising=False)
    digest = zoo._sha256(source)
    published = tmp_path / "published" / f"vae-{digest[:10]}.ckpt"
    published.parent.mkdir()
    shutil.copy(source, published)
    entry = ZooEntry("test/vae", 1, "vae/pretrain.yaml", "a VAE", "a test", 0.1, url=published.as_uri())
    monkeypatch.setattr(zoo, "REGISTRY", (*REGISTRY, entry))
    built = []
    fake = _fake_build(zoo_built)
    monkeypatch.setattr(zoo, "_build", lambda entry, *a: built.append(entry.key) or fake(lookup(VAE), *a))

    path = Path(resolve_source("zoo:test/vae"))
    assert not built and path.read_bytes() == published.read_bytes() and status(entry)[0] == "ok"
    assert json.loads((path.parent / "manifest.json").read_text())["source"] == published.as_uri()

    bad = ZooEntry("test/bad", 1, "vae/pretrain.yaml", "a VAE", "a test", 0.1,
                   url=published.with_name("vae-0123456789.ckpt").as_uri())  # fmt: skip
    shutil.copy(published, published.with_name("vae-0123456789.ckpt"))  # the name's hash prefix is wrong
    monkeypatch.setattr(zoo, "REGISTRY", (*REGISTRY, entry, bad))
    resolve_source("zoo:test/bad")
    assert built == ["test/bad@v1"] and "invalid hash value" in capfd.readouterr().err
    monkeypatch.setenv("LIT_FINETUNE_ZOO_OFFLINE", "1")
    ensure(entry, force=True)
    assert built == ["test/bad@v1", "test/vae@v1"]


def test_cycles_and_failed_builds_are_errors_that_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LIT_FINETUNE_ZOO_CHAIN", VAE_KEY)
    with pytest.raises(ZooError, match=f"cycle: {VAE_KEY} -> {VAE_KEY}"):
        ensure(lookup(VAE))
    monkeypatch.delenv("LIT_FINETUNE_ZOO_CHAIN")
    monkeypatch.setattr(zoo, "_dependencies", lambda e: [lookup("fashion-mnist-0-4/dcgan" if e.name == VAE else VAE)])
    dcgan_key = lookup("fashion-mnist-0-4/dcgan").key
    with pytest.raises(ZooError, match=f"cycle: {VAE_KEY} -> {dcgan_key} -> {VAE_KEY}"):
        ensure(lookup(VAE))  # in one process too: A needs B needs A
    assert zoo._BUILDING == []
    monkeypatch.undo()
    monkeypatch.setenv("LIT_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(zoo, "SMOKE_OVERRIDES", ("--trainer.max_epochs", "not-a-number"))
    with pytest.raises(ZooError, match=rf"(?s)Building {VAE_KEY} failed.*lit_finetune.cli fit --config"):
        ensure(lookup(VAE))
    assert status(lookup(VAE))[0] == "missing" and not any((tmp_path / "home/zoo/.builds").iterdir())


def test_relative_home_and_configs_reach_the_build_as_absolute_paths(tmp_path, monkeypatch):
    """A build runs in its own folder: relative $LIT_FINETUNE_HOME / $LIT_FINETUNE_CONFIGS must mean there what they
    mean where they were set (else the child misses the configs or reads another cache)."""
    shutil.copytree(REPO / "configs", tmp_path / "my_configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIT_FINETUNE_HOME", "cache")
    monkeypatch.setenv("LIT_FINETUNE_CONFIGS", "my_configs")
    assert zoo.home() == tmp_path / "cache" and zoo.configs_dir() == tmp_path / "my_configs"
    env = zoo._child_env(lookup(VAE))
    assert env["LIT_FINETUNE_HOME"] == str(tmp_path / "cache")
    assert env["LIT_FINETUNE_CONFIGS"] == str(tmp_path / "my_configs")


def test_cli_list_path_verify(zoo_built, capsys):
    assert zoo.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"zoo:{re.escape(e.key)}\s+ok", out) for e in LATEST), out
    assert zoo.main(["path", VAE]) == 0 and capsys.readouterr().out.strip() == str(zoo.entry_path(lookup(VAE)))
    assert zoo.main(["verify"]) == 0
    assert zoo.main(["path", "nope"]) == 2 and "Known names" in capsys.readouterr().err
