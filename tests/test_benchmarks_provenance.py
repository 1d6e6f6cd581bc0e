"""``benchmarks/provenance.py``: the block every results file ends with, and the check that pieces can merge.

Also the tiny runs of the two scripts without a test file of their own (``transfer_vs_scratch.py``,
``finetune_recipe_val.py``): their results files carry the block.
"""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_provenance, save_lightning_checkpoint

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402


def test_git_state_sees_a_dirty_tree(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    commit, dirty = provenance.git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "f.txt").write_text("b")
    assert provenance.git_state(tmp_path) == (commit, True)
    assert provenance.git_state(tmp_path / "nowhere") == ("unknown", None)


def test_without_git_history_the_commit_comes_from_the_bundle(tmp_path, monkeypatch):
    """A device machine gets the files, not the history: the commit written into the GPU bundle is recorded."""
    monkeypatch.setenv("LIT_FINETUNE_COMMIT", "a" * 40 + "-dirty")
    assert provenance.git_state(tmp_path / "nowhere") == ("a" * 40, True)
    monkeypatch.setenv("LIT_FINETUNE_COMMIT", "b" * 40)
    assert provenance.git_state(tmp_path / "nowhere") == ("b" * 40, False)
    assert provenance.git_state(REPO)[0] != "b" * 40  # a checkout's own commit wins


def test_write_and_read_back(tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 10)
    run = provenance.Run.start(REPO / "benchmarks" / "speed.py", ["--a", "b c"])
    record = run.write(tmp_path / "r.md", "table", {"source": source, "absent": None}, data={"p": tmp_path}, config={"k": 1})
    assert record["command"] == "python benchmarks/speed.py --a 'b c'"  # quoted: can be pasted into a shell
    assert record["inputs"] == {"source": {"path": str(source), "sha256": provenance.sha256(source)}}
    assert provenance.read((tmp_path / "r.md").read_text()) == record
    assert json.loads((tmp_path / "r.json").read_text())["data"] == {"p": str(tmp_path)}
    assert provenance.missing("a table and no block") == list(provenance.REQUIRED)


def _piece(tmp_path, name: str, config: dict) -> str:
    run = provenance.Run.start(REPO / "benchmarks" / "speed.py", [name])
    run.write(tmp_path / name / "x.md", "t", data={"name": name}, config=config)
    return str(tmp_path / name / "x.json")


def test_merge_pieces_checks_configuration_and_names_where_each_ran(tmp_path):
    a, b = _piece(tmp_path, "a", {"steps": 3}), _piece(tmp_path, "b", {"steps": 3})
    data, summary = provenance.merge_pieces([a, b])
    assert data == [{"name": "a"}, {"name": "b"}]
    assert [p["file"] for p in summary["pieces"]] == [a, b]
    assert all(p["machine"]["cores"] >= 1 and p["command"].endswith(n) for p, n in zip(summary["pieces"], "ab"))
    c = _piece(tmp_path, "c", {"steps": 4})
    with pytest.raises(provenance.PieceMismatch, match="different configurations"):
        provenance.merge_pieces([a, c])


def test_a_merge_records_the_commit_its_pieces_ran_at(tmp_path, monkeypatch):
    """The merged figures are the pieces': their commit (and dirty if any piece was) is recorded, the merge's own
    commit beside it."""
    a, b = _piece(tmp_path, "a", {"steps": 3}), _piece(tmp_path, "b", {"steps": 3})
    for path, dirty in ((a, False), (b, True)):
        piece = json.loads(Path(path).read_text())
        piece["provenance"].update(commit="c" * 40, dirty=dirty)
        Path(path).write_text(json.dumps(piece))
    run = provenance.Run.start(REPO / "benchmarks" / "speed.py", ["--merge", a, b])
    _, summary = provenance.merge_pieces([a, b], run=run)
    record = run.record()
    assert (record["commit"], record["dirty"]) == ("c" * 40, True) == (summary["commit"], summary["dirty"])
    assert record["merged_at"]["commit"] == provenance.git_state()[0] != "c" * 40


def test_transfer_vs_scratch_tiny_run_records_provenance(tmp_path, fashion_root, monkeypatch):
    import transfer_vs_scratch as script

    real = script.run_cli
    limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches",
              "1", "--data.init_args.root", str(fashion_root)]  # fmt: skip
    monkeypatch.setattr(script, "run_cli", lambda args: real([*args, *limits]))
    argv = ["--seeds", "0", "1", "--pretrain-epochs", "1", "--target-epochs", "1", "--workdir", str(tmp_path / "w"),
            "--results", str(tmp_path / "out")]  # fmt: skip
    script.main(argv)
    checkpoint = tmp_path / "w" / "source/runs/classifier/pretrain_source/checkpoints/best.ckpt"
    record = assert_provenance(tmp_path / "out" / "transfer_vs_scratch.md", "transfer_vs_scratch.py",
                               {"source checkpoint": checkpoint})  # fmt: skip
    assert record["command"].endswith(" ".join(argv))
    # two seeds: the paired difference with its test and worst seed is in the table
    assert "fine-tuned − scratch, paired by seed" in (tmp_path / "out" / "transfer_vs_scratch.md").read_text()
    assert "paired t-test p = " in (tmp_path / "out" / "transfer_vs_scratch.md").read_text()


def test_finetune_recipe_val_tiny_run_records_provenance(tmp_path, fashion_root, monkeypatch):
    import finetune_recipe_val as script
    from lit_finetune import ImageClassifier

    monkeypatch.setattr(script, "GRID", script.GRID[-1:])  # one recipe
    torch.manual_seed(0)
    source = save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path / "source.ckpt")
    argv = ["--pretrained", source, "--seeds", "0", "--epochs", "1", "--root", str(fashion_root),
            "--output", str(tmp_path / "val.md")]  # fmt: skip
    script.main(argv)
    assert_provenance(tmp_path / "val.md", "finetune_recipe_val.py", {"source checkpoint": source})
