"""Named source models: ``zoo:NAME`` wherever a checkpoint path is accepted.

A name stands for a checkpoint built from one of the shipped configs, e.g.
``--model.init_args.pretrained zoo:fashion-mnist-0-4/classifier`` or
``feature_extractor: zoo:fashion-mnist/feature-extractor``. :func:`resolve_source` is the one place
that turns a name into a file; it is called where a path is read today: ``read_state_dict``
(``pretrained`` of every module), ``load_module_checkpoint`` (``generator``, ``teacher``,
``lit-finetune-sample``) and ``FeatureExtractor.from_checkpoint`` (``feature_extractor``).
Anything that is not a ``zoo:`` string passes through unchanged.

Names: ``<data>/<model>[@v<k>]``; ``<data>`` says what the model saw (``fashion-mnist-0-4``: Fashion-MNIST
classes 0-4, all their training images; ``fashion-mnist-5-9-50shot``: classes 5-9, 50 images per class).
Without ``@v<k>`` the latest version is used. A version is a recipe (config + overrides + seed); a new
recipe gets a new version, so a name with a version always means the same training.

The cache (``$LIT_FINETUNE_HOME``, default ``~/.cache/lit_finetune``)::

    zoo/<name>/v<k>/model.ckpt       the checkpoint (the config's best, else its last)
    zoo/<name>/v<k>/manifest.json    sha256 and size of model.ckpt, the config text, overrides, seed,
                                     package version, git commit, dependencies' sha256, build time
    zoo/<name>/v<k>.lock             fcntl.flock: one builder per entry, across processes and DDP ranks
    zoo/.builds/<name>@v<k>.<pid>.*  a build's working folder (deleted when done; a killed build's is
                                     deleted by the next build of that entry)

An entry is valid only when its manifest exists, its recipe matches, and ``model.ckpt`` has the
manifest's sha256 (checked on every use, cached per process by size and mtime). Anything else is
rebuilt under the lock, never loaded. Publishing is ordered so a kill at any point leaves no half
entry: the old manifest is removed, the new checkpoint moved in with ``os.replace``, then the new
manifest written to a temporary file and moved in with ``os.replace``.

A missing entry is built on first use: one line says what is trained, why, roughly how long and
where it goes; then ``python -m lit_finetune.cli fit --config <shipped config> --seed_everything <seed>``
runs in a subprocess (its own Lightning progress bar; the caller's random state, threads and
distributed environment untouched; killed with the caller on Linux). ``zoo:`` names inside that
config are resolved first, recursively (a cycle is an error). An entry with a ``url`` is downloaded
instead with ``torch.hub.load_state_dict_from_url(url, check_hash=True, weights_only=True)`` (the
file name carries the sha256 prefix); offline (``LIT_FINETUNE_ZOO_OFFLINE=1`` or a failed download)
it is built.

Environment: ``LIT_FINETUNE_HOME`` (cache root), ``LIT_FINETUNE_ZOO_OFFLINE=1`` (never download),
``LIT_FINETUNE_ZOO_SMOKE=1`` (tiny builds, for tests: one epoch of 2 batches; such entries record
their overrides, so they are never taken for real ones), ``LIT_FINETUNE_CONFIGS`` (the folder of
shipped configs, default ``configs/`` beside the package).

Under DDP, run ``lit-finetune-zoo build NAME`` first: ranks that find an entry missing wait on the lock
while one builds, which can outlast a collective's timeout. The lock (``fcntl.flock``) needs a POSIX system
and a local file system.

Command line: ``lit-finetune-zoo list | build NAME [--force] | path NAME | verify``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "zoo:"
HOME_ENV = "LIT_FINETUNE_HOME"
OFFLINE_ENV = "LIT_FINETUNE_ZOO_OFFLINE"
SMOKE_ENV = "LIT_FINETUNE_ZOO_SMOKE"
CONFIGS_ENV = "LIT_FINETUNE_CONFIGS"
_CHAIN_ENV = "LIT_FINETUNE_ZOO_CHAIN"  # entries being built by this process's ancestors (cycle check)
FILE = "model.ckpt"
MANIFEST = "manifest.json"
#: added to every build under LIT_FINETUNE_ZOO_SMOKE=1: one epoch of 2 batches, validated (so "best" exists)
SMOKE_OVERRIDES = (
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
    "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
)  # fmt: skip
#: launcher / cluster variables a build must not inherit (it is one process on one device)
_DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # fmt: skip
_DIST_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "LSB_", "JSM_")


class ZooError(RuntimeError):
    """A zoo name is unknown, or its entry could not be built or fetched; the message names the fix."""


@dataclass(frozen=True)
class ZooEntry:
    """One named, versioned source model and the recipe that makes it."""

    name: str
    version: int
    config: str  # relative to the configs folder
    what: str  # what is trained (the build line)
    why: str  # what it is the source of
    minutes: float  # rough build time on a 2-core CPU
    overrides: tuple[str, ...] = ()
    seed: int = 0
    url: str | None = None  # published weights; the file name holds a sha256 prefix (torch.hub's check_hash)

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"


def _pin(key: str, *names: str) -> tuple[str, ...]:
    """Overrides that name a dependency's version: ``key`` is the config key (``--model.init_args.pretrained``)."""
    return tuple(x for name in names for x in (key, f"{PREFIX}{name}"))


#: "-quick" entries: the same configs on shorter schedules (overrides), so that the tour (benchmarks/tour.py) builds
#: every source it needs in about 4 CPU minutes; the classifiers' cosine LR steps per batch over that one epoch.
#: Separate names, not new versions: a name without @v<k> (what the shipped configs use) keeps its full recipe.
_ONE_EPOCH = ("--trainer.max_epochs", "1", "--model.init_args.scheduler_interval", "step")

REGISTRY: tuple[ZooEntry, ...] = (
    ZooEntry(
        "fashion-mnist/feature-extractor", 1, "metrics/feature_extractor.yaml",
        "a ResNet classifier on all ten Fashion-MNIST classes (best validation epoch)",
        "the feature space of FID / KID (feature_extractor of the DCGAN configs)", 10,
    ),
    ZooEntry(
        "fashion-mnist/feature-extractor-quick", 1, "metrics/feature_extractor.yaml",
        "a ResNet classifier on all ten Fashion-MNIST classes (one epoch, cosine LR per step)",
        "the feature space of FID / KID (feature_extractor of the DCGAN configs)", 1.7,
        overrides=(*_ONE_EPOCH, "--model.init_args.lr_scheduler.init_args.T_max", "430"),  # 430 batches
    ),
    ZooEntry(
        "fashion-mnist-0-4/classifier", 1, "classifier/pretrain_source.yaml",
        "the source ResNet classifier on Fashion-MNIST classes 0-4 (best validation epoch)",
        "the pretrained source of configs/classifier/finetune_target.yaml, digits_target.yaml and "
        "augmented/classifier.yaml", 8,
    ),
    ZooEntry(
        "fashion-mnist-0-4/classifier-reptile", 1, "classifier/meta_pretrain_source.yaml",
        "the source ResNet meta-pretrained with Reptile on 5-way 5-shot episodes of Fashion-MNIST classes 0-4 "
        "(best meta-validation accuracy)",
        "a meta-learned source for any classifier config (--model.init_args.pretrained "
        "zoo:fashion-mnist-0-4/classifier-reptile); the 'meta-learned source' arm of benchmarks/transfer_sweep.py", 6,
    ),
    ZooEntry(
        "fashion-mnist-0-4/classifier-quick", 1, "classifier/pretrain_source.yaml",
        "the source ResNet classifier on Fashion-MNIST classes 0-4 (one epoch, cosine LR per step)",
        "the pretrained source of configs/classifier/finetune_target.yaml, digits_target.yaml and "
        "augmented/classifier.yaml", 0.9,
        overrides=(*_ONE_EPOCH, "--model.init_args.lr_scheduler.init_args.T_max", "211"),  # 211 batches
    ),
    ZooEntry(
        "fashion-mnist-0-4/dcgan", 1, "dcgan/pretrain.yaml",
        "the source DCGAN on Fashion-MNIST classes 0-4 (last epoch)",
        "the pretrained source of configs/dcgan/finetune*.yaml and augmented/cdcgan_target.yaml", 5,
    ),
    ZooEntry(
        "fashion-mnist-0-4/dcgan-quick", 1, "dcgan/pretrain.yaml",
        "the source DCGAN on Fashion-MNIST classes 0-4 (3 epochs, last)",
        "the pretrained source of configs/dcgan/finetune*.yaml and augmented/cdcgan_target.yaml", 1.4,
        overrides=("--trainer.max_epochs", "3"),
    ),
    ZooEntry(
        "fashion-mnist-0-4/vae", 1, "vae/pretrain.yaml",
        "the source VAE on Fashion-MNIST classes 0-4 (best validation ELBO)",
        "the pretrained source of configs/vae/transfer*.yaml", 1,
    ),
    ZooEntry(
        "fashion-mnist-0-4/vae-quick", 1, "vae/pretrain.yaml",
        "the source VAE on Fashion-MNIST classes 0-4 (2 epochs, best validation ELBO)",
        "the pretrained source of configs/vae/transfer*.yaml", 0.6,
        overrides=("--trainer.max_epochs", "2", "--model.init_args.kl_warmup_steps", "200"),
    ),
    ZooEntry(
        "fashion-mnist-5-9-50shot/cdcgan", 1, "augmented/cdcgan_target.yaml",
        "a conditional DCGAN G(z, y) on 50 images per class of Fashion-MNIST 5-9, from the source DCGAN "
        "(lowest validation FID)",
        "the generator of configs/augmented/classifier.yaml", 3,
        overrides=(*_pin("--model.init_args.pretrained", "fashion-mnist-0-4/dcgan@v1"),
                   *_pin("--model.init_args.feature_extractor", "fashion-mnist/feature-extractor@v1")),
    ),
    ZooEntry(
        "fashion-mnist-5-9-50shot/classifier", 1, "classifier/finetune_target.yaml",
        "the source classifier fine-tuned on the same 50 images per class (best validation epoch)",
        "the teacher of configs/augmented/classifier.yaml's confidence filter (--model.teacher)", 3,
        overrides=("--data.init_args.samples_per_class", "50", "--data.init_args.seed", "0",
                   *_pin("--model.init_args.pretrained", "fashion-mnist-0-4/classifier@v1")),
    ),
)  # fmt: skip

T = TypeVar("T")


# -- names --------------------------------------------------------------------------------------------
def is_zoo_name(source: object) -> bool:
    """True for ``"zoo:<name>[@v<k>]"`` strings."""
    return isinstance(source, str) and source.startswith(PREFIX)


def known_names() -> list[str]:
    return sorted({e.name for e in REGISTRY})


def lookup(spec: str) -> ZooEntry:
    """The entry of ``"[zoo:]<name>[@v<k>]"`` (the latest version without ``@v<k>``)."""
    spec = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    name, _, version = spec.partition("@")
    versions = sorted((e for e in REGISTRY if e.name == name), key=lambda e: e.version)
    if not versions:
        raise ZooError(f"Unknown zoo name {name!r}. Known names: {', '.join(known_names())} (lit-finetune-zoo list).")
    if not version:
        return versions[-1]
    match = re.fullmatch(r"v(\d+)", version)
    found = [e for e in versions if match and e.version == int(match.group(1))]
    if not found:
        have = ", ".join(e.key for e in versions)
        raise ZooError(f"Unknown version {version!r} of zoo name {name!r}; known: {have} (or no @v<k> for the latest).")
    return found[0]


def resolve_source(source: T, role: str = "") -> T | str:
    """The file behind a ``zoo:`` name (built or fetched first if needed); any other source unchanged.

    Args:
        source: a path, a torchvision weight name, ``None``, or ``"zoo:<name>[@v<k>]"``.
        role: what the file is for, shown when it has to be built (e.g. ``"pretrained"``).
    """
    if not is_zoo_name(source):
        return source
    return str(ensure(lookup(source), reason=f"requested as {role or 'a source'}"))


# -- places ----------------------------------------------------------------------------------------------
def home() -> Path:
    """The cache root: ``$LIT_FINETUNE_HOME``, default ``~/.cache/lit_finetune``; absolute (builds run in
    another working folder, and a relative home would be another cache there)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "lit_finetune").expanduser().absolute()


def configs_dir() -> Path:
    """The shipped configs: ``$LIT_FINETUNE_CONFIGS``, default ``configs/`` beside the package; absolute."""
    folder = Path(os.environ.get(CONFIGS_ENV) or Path(__file__).resolve().parents[2] / "configs")
    folder = folder.expanduser().absolute()
    if not folder.is_dir():
        raise ZooError(
            f"The shipped configs are not in {str(folder)!r}, so zoo entries cannot be built. Install lit_finetune "
            f"from its repository (pip install -e .) or set {CONFIGS_ENV} to the repository's configs/ folder."
        )
    return folder


def entry_dir(entry: ZooEntry) -> Path:
    return home() / "zoo" / entry.name / f"v{entry.version}"


def entry_path(entry: ZooEntry) -> Path:
    """Where the entry's checkpoint lives (whether or not it is built)."""
    return entry_dir(entry) / FILE


# -- recipes and manifests ------------------------------------------------------------------------------
def smoke() -> bool:
    return os.environ.get(SMOKE_ENV, "") not in ("", "0", "false")


def build_overrides(entry: ZooEntry) -> list[str]:
    return [*entry.overrides, *(SMOKE_OVERRIDES if smoke() else ())]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipes(entry: ZooEntry) -> dict[str, str]:
    """Fingerprints of the ways an entry may have been made: ``{"build": ..., "url": ...}``.

    The build's covers the parsed config (comments do not count), the overrides and the seed.
    """
    import yaml

    config = yaml.safe_load((configs_dir() / entry.config).read_text())
    recipe = {"config": config, "overrides": build_overrides(entry), "seed": entry.seed}
    found = {"build": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()}
    if entry.url:
        found["url"] = hashlib.sha256(entry.url.encode()).hexdigest()
    return found


def read_manifest(entry: ZooEntry) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry_dir(entry) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def status(entry: ZooEntry) -> tuple[str, str]:
    """``("ok" | "missing" | "corrupt" | "stale", detail)`` of an entry in the cache."""
    folder = entry_dir(entry)
    if not (folder / MANIFEST).exists():
        return "missing", "not built yet"
    manifest = read_manifest(entry)
    if manifest is None or not isinstance(manifest.get("sha256"), str):
        return "corrupt", f"unreadable {MANIFEST}"
    path = folder / FILE
    try:
        stat = path.stat()
    except OSError:
        return "corrupt", f"{FILE} is missing"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _VERIFIED.get(key) or _sha256(path)
    if digest != manifest["sha256"] or stat.st_size != manifest.get("size"):
        return "corrupt", f"{FILE} has sha256 {digest[:12]}..., size {stat.st_size}; the manifest says " \
            f"{manifest['sha256'][:12]}..., size {manifest.get('size')}"  # fmt: skip
    _VERIFIED[key] = digest
    if manifest.get("recipe") not in recipes(entry).values():
        if bool(manifest.get("smoke")) != smoke():
            return "stale", f"a {'smoke' if manifest.get('smoke') else 'full'} build ({SMOKE_ENV}={int(smoke())} now)"
        return "stale", "built from another recipe (its config, overrides or seed changed)"
    return "ok", f"sha256 {digest[:12]}..."


# -- locking and publishing ------------------------------------------------------------------------------
@contextmanager
def _locked(entry: ZooEntry) -> Iterator[None]:
    """Hold the entry's exclusive ``flock`` (released by the kernel if this process dies)."""
    import fcntl

    lock = home() / "zoo" / entry.name / f"v{entry.version}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"zoo: waiting for another process building {entry.key} (lock {lock})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    from lit_finetune.checkpoint_io import atomic_write  # (imports Lightning: not at the zoo's import)

    atomic_write(path, lambda f: f.write(text.encode()))


def _publish(entry: ZooEntry, checkpoint: Path, manifest: dict[str, Any]) -> Path:
    """Move a finished checkpoint into the entry, manifest last: no step leaves a loadable half entry."""
    folder = entry_dir(entry)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # from here until the end the entry reads as missing
    manifest = {**manifest, "file": FILE, "sha256": _sha256(checkpoint), "size": checkpoint.stat().st_size}
    os.replace(checkpoint, folder / FILE)  # same file system: the build folder is under home()
    _write_manifest(folder / MANIFEST, manifest)
    return folder / FILE


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# -- building and fetching ------------------------------------------------------------------------------
def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_BUILDING: list[str] = []  # entries this process is building (their dependencies are being resolved)


def _chain() -> list[str]:
    """Entries being built by this process and its ancestors, outermost first."""
    return [*(k for k in os.environ.get(_CHAIN_ENV, "").split(",") if k), *_BUILDING]


def ensure(entry: ZooEntry, reason: str = "", force: bool = False) -> Path:
    """The entry's verified checkpoint: from the cache, else downloaded or built (under the entry's lock)."""
    if not force and status(entry)[0] == "ok":
        return entry_path(entry)
    if entry.key in _chain():
        raise ZooError(f"zoo entries depend on each other in a cycle: {' -> '.join([*_chain(), entry.key])}")
    _BUILDING.append(entry.key)
    try:
        return _ensure_locked(entry, reason, force)
    finally:
        _BUILDING.pop()


def _ensure_locked(entry: ZooEntry, reason: str, force: bool) -> Path:
    """:func:`ensure` once the entry is known to be needed: its dependencies first, then it, under its lock."""
    dependencies = {dep.key: ensure(dep, reason=f"needed to build {entry.key}") for dep in _dependencies(entry)}
    with _locked(entry):
        state, detail = status(entry)
        if state == "ok" and not force:  # another process built it while this one waited
            return entry_path(entry)
        work_root = home() / "zoo" / ".builds"
        work_root.mkdir(parents=True, exist_ok=True)
        slug = entry.key.replace("/", "--")
        for stale in work_root.glob(f"{slug}.*"):  # left by a killed build: this process holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=work_root, prefix=f"{slug}.{os.getpid()}."))
        why = "rebuild requested" if force else {"missing": "not in the cache"}.get(state, f"{state}: {detail}")
        try:
            checkpoint, manifest = None, None
            if entry.url and not os.environ.get(OFFLINE_ENV):
                checkpoint, manifest = _download(entry, work, why, reason)
            if checkpoint is None:
                checkpoint, manifest = _build(entry, work, why, reason, dependencies)
            return _publish(entry, checkpoint, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def effective_config(entry: ZooEntry) -> dict[str, Any]:
    """The entry's config with its ``--a.b value`` overrides applied (values parsed as YAML, as the CLI does).

    What the build trains, as far as the zoo needs to know it: which ``zoo:`` names it reads.
    """
    import yaml

    config = yaml.safe_load((configs_dir() / entry.config).read_text()) or {}
    args = list(build_overrides(entry))
    if len(args) % 2 or not all(k.startswith("--") for k in args[::2]):
        raise ZooError(f"{entry.key}: overrides must be '--key value' pairs, got {args}")
    for key, value in zip(args[::2], args[1::2]):
        *parents, leaf = key[2:].split(".")
        node = config
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return config


def _dependencies(entry: ZooEntry) -> list[ZooEntry]:
    """Entries named (``zoo:...``) in the entry's config values after its overrides, in order of appearance."""
    found: list[ZooEntry] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif is_zoo_name(value) and lookup(value) not in found:
            found.append(lookup(value))

    walk(effective_config(entry))
    return found


def _provenance() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {}
    for package in ("lit_finetune", "torch", "lightning"):
        try:
            found[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            found[f"{package}_version"] = None
    try:
        repo = configs_dir().parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "configs", "lit_finetune"], cwd=repo,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        found["git_commit"] = head.stdout.strip() or None if head.returncode == 0 else None
        found["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = found["git_dirty"] = None
    return found


def _checkpoint_written(config: dict[str, Any], work: Path) -> tuple[Path, str]:
    """The file the config's ModelCheckpoint callbacks wrote: the monitored one (best) if any, else last."""
    callbacks = [c for c in (config.get("trainer") or {}).get("callbacks") or [] if isinstance(c, dict)]
    candidates = []
    for callback in callbacks:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            args = callback.get("init_args") or {}
            if args.get("dirpath") and args.get("filename"):
                kind = "best" if args.get("monitor") else "last"
                candidates.append((kind != "best", work / args["dirpath"] / f"{args['filename']}.ckpt", kind))
    for _, path, kind in sorted(candidates, key=lambda c: c[0]):
        if path.is_file():
            return path, kind
    raise ZooError(
        f"The build finished but wrote none of {[str(c[1].relative_to(work)) for c in candidates]}; a zoo config "
        "needs a ModelCheckpoint with dirpath and filename."
    )


def _child_env(entry: ZooEntry) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith(_DIST_PREFIXES)}
    package_root = str(Path(__file__).resolve().parents[2])  # the child runs this very package
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    env[_CHAIN_ENV] = ",".join(_chain())  # includes entry.key: the child must not build it again
    env[HOME_ENV] = str(home())  # absolute: the child runs in the build folder, where a relative path means another
    if env.get(CONFIGS_ENV):
        env[CONFIGS_ENV] = str(configs_dir())
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _build(
    entry: ZooEntry, work: Path, why: str, reason: str, dependencies: dict[str, Path]
) -> tuple[Path, dict[str, Any]]:
    """Run the entry's config through the CLI in ``work``; the checkpoint it chose and the manifest."""
    import yaml

    config_file = configs_dir() / entry.config
    config_text = config_file.read_text()
    overrides = build_overrides(entry)
    command = [sys.executable, "-m", "lit_finetune.cli", "fit", "--config", str(config_file),
               "--seed_everything", str(entry.seed), *overrides]  # fmt: skip
    how_long = "a few seconds (smoke build)" if smoke() else f"about {entry.minutes:g} min on a 2-core CPU, once"
    because = "; ".join(filter(None, [why, reason]))
    extra = f" {' '.join(overrides)}" if overrides else ""
    _say(
        f"zoo: building {entry.key} ({because}): {entry.what}; it is {entry.why}. Trains configs/{entry.config} "
        f"--seed_everything {entry.seed}{extra}, {how_long} -> {entry_path(entry)}"
    )
    start = time.time()
    out = _stderr_fd()  # stdout stays clean for `lit-finetune-zoo path NAME`
    proc = subprocess.run(command, cwd=work, env=_child_env(entry), stdout=out, stderr=out,
                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise ZooError(
            f"Building {entry.key} failed (exit code {proc.returncode}; its output is above). The command was, "
            f"in an empty folder:\n    {' '.join(command)}\nFix what it reports and ask for {PREFIX}{entry.key} again."
        )
    checkpoint, kind = _checkpoint_written(yaml.safe_load(config_text), work)
    manifest = {
        "name": entry.name, "version": entry.version, "source": "build", "recipe": recipes(entry)["build"],
        "config_file": f"configs/{entry.config}", "config_text": config_text, "overrides": overrides,
        "seed": entry.seed, "smoke": smoke(), "command": command[1:], "checkpoint": kind,
        "dependencies": {key: _sha256(path) for key, path in dependencies.items()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.time() - start, 1),
        **_provenance(),
    }  # fmt: skip
    _say(f"zoo: built {entry.key} in {time.time() - start:.0f} s ({kind} checkpoint) -> {entry_path(entry)}")
    return checkpoint, manifest


def _stderr_fd() -> int:
    """The file descriptor behind ``sys.stderr`` (a child writes there directly), else the process's fd 2."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _download(entry: ZooEntry, work: Path, why: str, reason: str) -> tuple[Path | None, dict[str, Any] | None]:
    """Fetch the entry's published file (hash and ``weights_only`` checked by torch.hub); ``(None, None)`` if
    that fails, so the caller builds it instead."""
    from urllib.parse import urlparse

    import torch

    assert entry.url is not None
    because = "; ".join(filter(None, [why, reason]))
    _say(f"zoo: downloading {entry.key} ({because}): {entry.what} -> {entry_path(entry)}")
    try:
        torch.hub.load_state_dict_from_url(
            entry.url, model_dir=str(work), map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as err:  # offline, refused by weights_only, or a hash mismatch: never keep the file
        _say(f"zoo: could not download {entry.url} ({type(err).__name__}: {err}); building it from its config instead")
        for leftover in work.iterdir():
            leftover.unlink(missing_ok=True)
        return None, None
    checkpoint = work / Path(urlparse(entry.url).path).name
    manifest = {
        "name": entry.name, "version": entry.version, "source": entry.url, "recipe": recipes(entry)["url"],
        "checkpoint": "published", "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_provenance(),
    }  # fmt: skip
    return checkpoint, manifest


# -- command line ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``lit-finetune-zoo list | build NAME [--force] | path NAME | verify``."""
    parser = argparse.ArgumentParser(prog="lit-finetune-zoo", description="Named source models (zoo:NAME).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every name, its versions and whether it is in the cache")
    build = sub.add_parser("build", help="build (or download) NAME now, unless it is in the cache")
    build.add_argument("name")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds a valid entry")
    path = sub.add_parser("path", help="print NAME's checkpoint path (building it first if needed)")
    path.add_argument("name")
    sub.add_parser("verify", help="check every cached entry's sha256 and recipe; exit 1 if any is corrupt or stale")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(f"cache: {home() / 'zoo'}")
            for entry in sorted(REGISTRY, key=lambda e: (e.name, e.version)):
                state = status(entry)[0]
                print(f"  zoo:{entry.key:<42} {state:<8} {entry.what}")
        elif args.command == "build":
            print(ensure(lookup(args.name), reason="lit-finetune-zoo build", force=args.force))
        elif args.command == "path":
            print(ensure(lookup(args.name), reason="lit-finetune-zoo path"))
        else:
            bad = 0
            for entry in sorted(REGISTRY, key=lambda e: (e.name, e.version)):
                state, detail = status(entry)
                bad += state in ("corrupt", "stale")
                print(f"  zoo:{entry.key:<42} {state:<8} {detail}")
            if bad:
                entries = "entry" if bad == 1 else "entries"
                print(f"{bad} {entries} will be rebuilt on next use (or now: lit-finetune-zoo build NAME).")
            return 1 if bad else 0
    except ZooError as err:
        print(f"lit-finetune-zoo: error: {err}", file=sys.stderr)
        return 2
    return 0
