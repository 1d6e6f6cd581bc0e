"""Copy the measured tables in ``benchmarks/results/*.md`` into the docs, between markers.

``docs/results.md`` (and README.md) hold ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``
blocks; this replaces each block's body with ``benchmarks/results/NAME.md`` so that no figure in the
docs is typed by hand. The README's ``<!-- results:headline -->`` block is built, not copied: one row per
benchmark, computed from the data each script saves beside its table (``NAME.json``), with a paired
test where arms share seeds, and a link to the full section in ``docs/results.md``. Run it after the
benchmarks:

    python benchmarks/transfer_vs_scratch.py && python benchmarks/speed.py && python benchmarks/update_readme.py

A results file must end with the provenance block that ``benchmarks/provenance.py`` writes (command,
commit, threads, load, machine, versions, duration, input hashes). Files without it, such as those
written before the block existed, are refused: nothing is copied, and the error names each file, the
fields it lacks and the script to rerun. The README is left as it was.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance
import stats

REPO = Path(__file__).resolve().parents[1]
#: the documents whose result blocks this fills (the README has only the headline block)
DOCUMENTS = (REPO / "README.md", REPO / "docs" / "results.md")
HEADLINE = "headline"
#: a results file's own title (``#`` or ``##``), dropped when it is copied under a section heading
TITLE = re.compile(r"\A#{1,2} [^\n]*\n+")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
# which script writes each results file (to say what to rerun)
SCRIPTS = {
    "transfer_vs_scratch": "benchmarks/transfer_vs_scratch.py",
    "finetune_recipe_val": "benchmarks/finetune_recipe_val.py",
    "transfer_sweep": "benchmarks/transfer_sweep.py",
    "compression": "benchmarks/compression.py",
    "gan_finetune": "benchmarks/gan_finetune.py",
    "gan_fewshot": "benchmarks/gan_finetune.py --fewshot --extractor E.ckpt --source S.ckpt",
    "gan_fewshot_cdc_ablation": "benchmarks/gan_finetune.py --fewshot --name gan_fewshot_cdc_ablation --arms ...",
    "vae_transfer": "benchmarks/vae_transfer.py",
    "gan_augmented": "benchmarks/gan_augmented.py",
    "fashion_mnist_full": "benchmarks/full_dataset.py",
    "fashion_mnist_full_gpu": "benchmarks/gpu_session.py (one device call; its docstring says how)",
    "fashion_mnist_full_recipe_val": "benchmarks/full_dataset.py --search",
    "gpu_check": "benchmarks/gpu_session.py (one device call; its docstring says how)",
    "speed": "benchmarks/speed.py",
    "overhead": "benchmarks/speed.py --models overhead --output benchmarks/results/overhead.md",
    "overhead_profile": "benchmarks/speed.py --models overhead --output benchmarks/results/overhead.md "
    "--overhead-profile benchmarks/results/overhead_profile.md",
    "ema_variants": "benchmarks/ema_variants.py --extractor <FID extractor checkpoint>",
}


class MissingProvenance(ValueError):
    """Results files without a complete provenance block."""


def problems_of(sources: list[Path]) -> dict[Path, str]:
    """Each file in ``sources`` whose provenance is incomplete, with what it lacks and the script to rerun."""
    problems = {}
    for source in sources:
        text = source.read_text()
        absent = provenance.missing(text)
        if absent:
            script = SCRIPTS.get(source.stem, f"the script that writes {source.name}")
            what = "no provenance block" if provenance.read(text) is None else "provenance lacks"
            problems[source] = f"  {source}: {what} ({', '.join(absent)}); rerun: python {script}"
    return problems


def update(readme: Path = REPO / "README.md", results: Path = REPO / "benchmarks" / "results") -> list[str]:
    """Rewrite the result blocks of ``readme`` whose results files carry complete provenance; return their names.

    A results file without it is refused: its block is left as it was, and :class:`MissingProvenance`
    (raised after the others were written) names each refused file and the script to rerun. A
    ``headline`` block is filled with :func:`headline_table`.
    """
    text = readme.read_text()
    names = [m["name"] for m in BLOCK.finditer(text) if m["name"] != HEADLINE]
    problems = problems_of([results / f"{name}.md" for name in names if (results / f"{name}.md").is_file()])
    updated: list[str] = []

    def fill(match: re.Match) -> str:
        if match["name"] == HEADLINE:
            updated.append(HEADLINE)
            return match.group(1) + headline_table(results) + "\n" + match.group(4)
        source = results / f"{match['name']}.md"
        if not source.is_file() or source in problems:
            return match.group(0)
        updated.append(match["name"])
        body = TITLE.sub("", source.read_text().rstrip())  # the document's section heading stands for the file's title
        return match.group(1) + body + "\n" + match.group(4)

    readme.write_text(BLOCK.sub(fill, text))
    if problems:
        raise MissingProvenance(
            f"updated: {', '.join(updated) or 'nothing'}; refused results without provenance (their blocks "
            f"in {readme.name} were left as they were):\n" + "\n".join(problems.values())
        )
    return updated


def update_all(documents: tuple[Path, ...] = DOCUMENTS, results: Path = REPO / "benchmarks" / "results") -> list[str]:
    """:func:`update` every document; one :class:`MissingProvenance` at the end lists every refusal."""
    updated, refusals = [], []
    for document in documents:
        try:
            updated += [f"{document.name}:{name}" for name in update(document, results)]
        except MissingProvenance as error:
            refusals.append(str(error))
    if refusals:
        raise MissingProvenance(f"updated: {', '.join(updated) or 'nothing'}\n" + "\n".join(refusals))
    return updated


# -- the README's headline table -----------------------------------------------------------------------
#: a row of the headline table: (question, answer, seeds, link) from a benchmark's saved data
Row = tuple[str, str, str, str]


def _paired(a: list[float], b: list[float], scale: float = 1.0, unit: str = "", lower_is_better: bool = False) -> str:
    """``a - b`` paired by seed: mean, the seed least favourable to ``a`` and the paired t-test's p."""
    test = stats.paired_t_test(a, b)
    worst = test.least_favourable(lower_is_better)
    return f"{scale * test.mean:+.1f}{unit} paired (worst seed {scale * worst:+.1f}, {stats.format_p(test.p)})"


def _transfer_vs_scratch(data: dict[str, Any]) -> Row:
    tuned, scratch = data["test_accuracy"]["fine-tuned"], data["test_accuracy"]["scratch"]
    answer = (f"fine-tuned {100 * statistics.fmean(tuned):.1f} % vs scratch {100 * statistics.fmean(scratch):.1f} %; "
              + _paired(tuned, scratch, 100, " points"))
    return ("Does a source help a classifier with 20 labels per class?", answer, str(len(tuned)), "transfer-vs-scratch")


def _transfer_sweep(data: dict[str, Any]) -> Row:
    n = "5" if "5" in data["results"]["fashion"] else min(data["results"]["fashion"], key=int)
    runs = data["results"]["fashion"][n]["runs"]
    acc = {arm: [r["test_acc"]["small"] for r in seeds] for arm, seeds in runs.items()}
    tuned = acc["finetune"]
    parts = [f"at {n} labels per class (Fashion-MNIST 5-9), full fine-tune {100 * statistics.fmean(tuned):.1f} % vs "
             f"scratch {100 * statistics.fmean(acc['scratch']):.1f} %, {_paired(tuned, acc['scratch'], 100, ' points')}"]
    for arm, label in (("meta", "meta-learned source"), ("lora", "LoRA r=4"), ("bn_only", "BN-only")):
        if arm in acc:  # arms fixed in advance, not the best on test
            parts.append(f"{label} vs full fine-tune {_paired(acc[arm], tuned, 100, ' points')}")
    return ("Which way of transferring a classifier works with few labels?", "; ".join(parts) + " (uncorrected p; "
            "Holm over all cells, the other arms, N and the digits target in the details)", str(len(tuned)),
            "the-full-transfer-benchmark-eleven-arms-n-labelled-images-per-class-two-targets")


def _gan_finetune(data: dict[str, Any]) -> Row:
    runs = data["results"]
    tuned = [r["fid"] for r in runs["TransferGAN + DiffAugment"]]
    scratch = [r["fid"] for r in runs["scratch + DiffAugment"]]
    answer = (f"FID {statistics.fmean(tuned):.1f} fine-tuned (TransferGAN + DiffAugment) vs {statistics.fmean(scratch):.1f} "
              f"from scratch (lower is better); " + _paired(tuned, scratch, lower_is_better=True)
              + " (uncorrected p; Holm over the 9 comparisons in the details)")
    return ("Does a source GAN help on 100 target images?", answer, str(len(tuned)),
            "gan-fine-tuning-scratch-vs-transfergan-vs-freezed-with-and-without-diffaugment")


def _gan_fewshot(data: dict[str, Any]) -> Row:
    n = str(min(int(k) for k in data["results"]))
    cell = data["results"][n]
    base = "FreezeD + DiffAugment"
    fid = {arm: [r["fid"] for r in runs] for arm, runs in cell.items()}
    parts = [f"at {n} target images, FID {base.split()[0]} {statistics.fmean(fid[base]):.1f}"]
    for arm in ("CDC + DiffAugment", "EWC + DiffAugment"):
        if arm in fid:
            parts.append(f"{arm.split()[0]} {statistics.fmean(fid[arm]):.1f}, "
                         f"{_paired(fid[arm], fid[base], lower_is_better=True)}")
    return ("Do few-shot GAN regularisers (CDC, EWC) beat FreezeD?", "; ".join(parts) + " (lower is better; "
            "uncorrected p; Holm and the diversity measure in the details)", str(len(fid[base])),
            "few-shot-gan-regularisers-cdc-and-ewc-against-transfergan-and-freezed")


def _vae_transfer(data: dict[str, Any]) -> Row:
    n = str(min(int(k) for k in data["results"]))
    cell = data["results"][n]
    tuned = [r["best"]["nll_iwae"] for r in cell["full transfer"]]
    scratch = [r["best"]["nll_iwae"] for r in cell["scratch"]]
    import vae_transfer  # its comparison family, fixed in advance: the row's Holm p is the details table's

    family = stats.comparison_family({(key,): arms for key, arms in data["results"].items()},
                                     vae_transfer.COMPARISONS, lambda r: r["best"]["nll_iwae"])  # fmt: skip
    holm_p = stats.holm([stats.paired_t_test(a, b).p for _, a, b in family])
    adjusted = holm_p[[label for label, _, _ in family].index((n, "full transfer − scratch"))]
    answer = (f"at {n} images per class, {statistics.fmean(tuned):.1f} vs {statistics.fmean(scratch):.1f} nats "
              f"(transfer vs scratch, best-on-validation, lower is better); "
              + _paired(tuned, scratch, unit=" nats", lower_is_better=True)
              + f" uncorrected, Holm-adjusted over the table's {len(family)} comparisons "
              + stats.format_p(adjusted).replace("p ", "p_Holm ", 1))
    return ("Does a source VAE help at few images?", answer, str(len(tuned)),
            "vae-transfer-scratch-vs-full-transfer-vs-frozen-encoder-vs-frozen-decoder-in-nats")


def _gan_augmented(data: dict[str, Any]) -> Row:
    n = str(min(int(k) for k in data["results"]))
    cell = data["results"][n]["finetuned"]
    real = [r["test_acc"] for r in cell["real"]]
    parts = [f"at {n} images per class, real only {100 * statistics.fmean(real):.1f} %"]
    for arm, budget in (("r1@steps", "equal steps"), ("r1@epochs", "equal real epochs")):
        if arm in cell:
            augmented = [r["test_acc"] for r in cell[arm]]
            parts.append(f"real + G (ratio 1, {budget}) {_paired(augmented, real, 100, ' points')}")
    return ("Do samples of a conditional GAN help a few-shot classifier?", "; ".join(parts) + " (uncorrected p; "
            "Holm over all cells in the details)", str(len(real)),
            "gan-augmented-classification-does-adding-gz-y-samples-help-a-low-data-classifier")


def _compression(data: dict[str, Any]) -> Row:
    runs = data["results"]["runs"]
    dense = runs["0.0"]
    fp32 = [r["test_acc"]["fp32"] for r in dense]
    int8 = [r["test_acc"]["int8"] for r in dense]
    size = statistics.fmean(r["size"]["fp32.ts"] / r["size"]["int8.ts"] for r in dense)
    speed = statistics.median(r["latency_ms"]["fp32 .ts"]["b64"] / r["latency_ms"]["int8 .ts"]["b64"] for r in dense)
    sparse = max((k for k in runs if k != "0.0"), key=float, default=None)
    parts = [f"int8 vs fp32: {_paired(int8, fp32, 100, ' points')}, file {size:.1f}x smaller, {speed:.1f}x faster per "
             "image at batch 64 (TorchScript, 1 CPU thread)"]
    for level in sorted((k for k in runs if k != "0.0"), key=float):
        pruned = [r["test_acc"]["fp32"] for r in runs[level]]
        if level in ("0.9", sparse):
            parts.append(f"{100 * float(level):.0f} % of the backbone pruned: {_paired(pruned, fp32, 100, ' points')}")
    return ("What does compressing the fine-tuned classifier cost?", "; ".join(parts) + " (uncorrected p; Holm over "
            "the table in the details)", str(len(fp32)),
            "compressing-the-fine-tuned-classifier-pruning-int8-export")


def _speed(data: dict[str, Any]) -> Row:
    ratios = data["runs"][-1]["ratios"]
    answer = "; ".join(f"{name} {r['cpu_ratio']:.2f} (range {r['cpu_range'][0]:.2f}-{r['cpu_range'][1]:.2f})"
                       for name, r in ratios.items() if "cpu_ratio" in r)
    return ("Does the Trainer cost speed? (Trainer / hand-written loop, steps per CPU second; 1 = same)", answer,
            f"{len(data['runs'])} run(s)", "speed-trainer-vs-a-hand-written-loop-classifier-dcgan-vae-and-the-data-path")


#: benchmark -> the function that turns its saved data into a headline row (add one per new benchmark)
HEADLINES: dict[str, Callable[[dict[str, Any]], Row]] = {
    "transfer_vs_scratch": _transfer_vs_scratch,
    "transfer_sweep": _transfer_sweep,
    "gan_finetune": _gan_finetune,
    "gan_fewshot": _gan_fewshot,
    "vae_transfer": _vae_transfer,
    "gan_augmented": _gan_augmented,
    "compression": _compression,
    "speed": _speed,
}


def headline_table(results: Path = REPO / "benchmarks" / "results", link_to: str = "docs/results.md") -> str:
    """One row per benchmark in :data:`HEADLINES` whose results carry provenance, computed from its ``.json``."""
    lines = ["| question | answer (mean over seeds; paired difference, worst seed, two-sided paired t-test) | seeds "
             "| measured on | details |", "|---|---|---|---|---|"]
    absent = []
    for name, row_of in HEADLINES.items():
        table, saved = results / f"{name}.md", results / f"{name}.json"
        if not (table.is_file() and saved.is_file()) or provenance.missing(table.read_text()):
            absent.append(name)
            continue
        piece = json.loads(saved.read_text())
        question, answer, seeds, anchor = row_of(piece["data"])
        machine = piece["provenance"]["machine"]
        where = machine.get("gpu") or f"{machine['cpu']}, {machine['cores']} cores, CPU only"
        if piece["provenance"].get("dirty"):  # said where it is read, not only in the collapsed provenance block
            where += f"; code with uncommitted changes at {piece['provenance']['commit'][:10]}"
        lines.append(f"| {question} | {answer} | {seeds} | {where} | [{name}]({link_to}#{anchor}) |")
    if absent:
        lines.append("")
        lines.append("Not in this table until rerun with provenance: " + ", ".join(
            f"`python {SCRIPTS.get(name, name)}`" for name in absent) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        print("updated:", ", ".join(update_all()) or "nothing")
    except MissingProvenance as error:
        sys.exit(str(error))
