"""The paper's comparisons from your own runs: tables, training curves and layer responses.

    python -m raysnet.report experiment=plain-vs-residual-cifar            # -> report/report.md + PNGs
    python -m raysnet.report experiment=shortcuts-imagenet out=reports/t3 tracking.uri=http://127.0.0.1:5000

Reads the runs back from MLflow: the children of the experiment's latest sweep (parent) run, or
every run with `runs=all`; only FINISHED runs enter the tables and Fig. 7. Writes report.md,
report.json and the figures into `out`, and logs them as artifacts of the sweep's parent run.

- Tables 2, 3, 6 (as the paper's): each run's final val_err / val_err_top5 beside the paper's
  number for the same (arch, shortcut) and the difference; blank where either is missing. A
  table appears only when some run belongs in it. Parameters are counted on `build_model`.
- Fig. 4 (ImageNet nets) / Fig. 6 (CIFAR nets): training error (thin) and validation error
  (bold) against iterations, plain and residual side by side, one colour per depth. Iterations
  = (epoch + 1) x the run's `steps_per_epoch` param (what its workers ran); epochs on the axis
  for runs recorded without it.
- Fig. 7: the std of each 3x3 layer's response (raysnet.analyze) of each run's final checkpoint,
  in layer order and sorted by magnitude.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING

from raysnet import cli as _cli
from raysnet import tracking
from raysnet.errors import UsageError
from raysnet.tables import fmt, markdown_table

CURVES = ("train_err", "val_err")


@dataclass
class _Uri:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db (training's default)


@dataclass
class _Root:
    root: str = ""  # empty: each run's own data.root


@dataclass
class ReportArgs:
    experiment: str = MISSING
    out: str = "report"
    overwrite: bool = False
    runs: Literal["sweep", "all"] = "sweep"  # sweep: the latest sweep's trials; all: every run
    parent: str = ""  # a sweep's parent run id, instead of the latest
    responses: bool = True  # Fig. 7 (needs each run's checkpoint and validation data)
    batch: int = 128
    batches: int = 4  # validation batches per model for Fig. 7
    tracking: _Uri = field(default_factory=_Uri)
    data: _Root = field(default_factory=_Root)


@dataclass
class RunInfo:
    """What the report needs of one MLflow run."""

    run_id: str
    name: str
    status: str
    arch: str
    depth: int
    family: str
    residual: bool
    shortcut: str  # the tag: A/B/C, "none" for plain nets
    variant: str | None
    dataset: str
    params: dict[str, str]
    history: dict[str, list[tuple[int, float]]]  # metric -> [(epoch, value)]
    steps_per_epoch: int | None
    classes: int | None
    checkpoint: Path | None = None

    def final(self, key: str) -> float | None:
        values = self.history.get(key) or []
        return values[-1][1] if values and math.isfinite(values[-1][1]) else None


# --- reading runs ------------------------------------------------------------------------------

def _meta(root: str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(root).expanduser() / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _run_info(mlflow, run, data_root: str) -> RunInfo:
    from raysnet.models import get_arch

    tags, params = run.data.tags, run.data.params
    arch = get_arch(params.get("arch") or tags["arch"])
    history = tracking.history(mlflow, run.info.run_id, [k for k in tracking.METRICS if k in run.data.metrics])
    meta = _meta(data_root or params.get("data.root", ""))
    steps = int(params[tracking.STEPS_PARAM]) if tracking.STEPS_PARAM in params else None
    shortcut = tags.get("shortcut") or ((params.get("model.shortcut") or arch.default_shortcut)
                                        if arch.residual else "none")
    variant = params.get("model.variant")
    return RunInfo(run_id=run.info.run_id, name=run.info.run_name, status=run.info.status,
                   arch=params.get("arch") or tags["arch"], depth=arch.depth, family=arch.family,
                   residual=arch.residual, shortcut=shortcut, variant=None if variant in (None, "None") else variant,
                   dataset=tags.get("dataset") or params.get("data.name", "?"), params=dict(params),
                   history=history, steps_per_epoch=steps, classes=len(meta["classes"]) if meta else None)


def select_runs(mlflow, experiment: str, runs: str = "sweep", parent: str = "") -> tuple[list, str | None]:
    """(the MLflow runs to report, the parent run id or None)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise UsageError(f"no MLflow experiment '{experiment}' at this tracking URI (experiments there: {names}). "
                         "Pass experiment=NAME, and tracking.uri=... if the runs are elsewhere.")
    everything = tracking.all_runs(mlflow, exp.experiment_id)
    parents = [r for r in everything if tracking.SWEEP_TAG in r.data.tags]
    if parent or (runs == "sweep" and parents):
        parent = parent or max(parents, key=lambda r: r.info.start_time).info.run_id
        return [r for r in everything if r.data.tags.get(tracking.PARENT_TAG) == parent], parent
    return [r for r in everything if tracking.SWEEP_TAG not in r.data.tags], None


def find_checkpoint(mlflow, info: RunInfo, download_to: Path) -> Path | None:
    """The run's final checkpoint: in its run.storage if still there, else MLflow's artifact."""
    from raysnet import checkpoint

    storage, name = info.params.get("run.storage", ""), info.params.get("run.name", "")
    if storage and name and "://" not in storage:
        try:
            return checkpoint.find(Path(storage) / name)
        except UsageError:
            pass  # moved or deleted: MLflow keeps a copy
    try:
        path = mlflow.download_artifacts(info.run_id, f"checkpoint/{checkpoint.CHECKPOINT_FILE}", str(download_to))
        return Path(path)
    except Exception:  # noqa: BLE001 - no artifact (still running, or log failed): no Fig. 7 for this run
        return None


def count_parameters(info: RunInfo) -> int:
    from raysnet.models import build_model

    model = build_model(info.arch, num_classes=info.classes, shortcut=None if info.shortcut == "none"
                        else info.shortcut, variant=info.variant)
    return sum(p.numel() for p in model.parameters())


# --- tables ------------------------------------------------------------------------------------

TABLE_TITLES = {
    "2": "Table 2: plain vs residual, ImageNet, top-1 error (%); the paper's 10-crop numbers",
    "3": "Table 3: shortcut options and depth, ImageNet, top-1 / top-5 error (%); the paper's 10-crop numbers",
    "6": "Table 6: CIFAR-10 nets, error (%); the paper's test error on CIFAR-10",
}


def table_of(info: RunInfo) -> list[str]:
    """Which of the paper's tables a run belongs in."""
    if info.family == "cifar":
        return ["6"]
    out = []
    if info.depth in (18, 34) and info.shortcut in ("none", "A"):
        out.append("2")
    if not (info.depth == 18 and info.shortcut in ("none", "A")):
        out.append("3")
    return out


def table_rows(infos: list[RunInfo], table: str, params: dict[str, int]) -> list[dict[str, Any]]:
    from raysnet.paper import reported

    rows = []
    for info in sorted((i for i in infos if table in table_of(i)), key=lambda i: (i.residual, i.depth, i.shortcut)):
        paper = reported(table, info.arch, info.shortcut)
        top1, top5 = info.final("val_err"), info.final("val_err_top5")
        p1, p5 = (paper.top1, paper.top5) if paper else (None, None)
        rows.append({"run": info.name, "arch": info.arch, "layers": info.depth, "shortcut": info.shortcut,
                     "params": params[info.run_id], "dataset": info.dataset, "top1": top1, "top5": top5,
                     "paper_top1": p1, "paper_top5": p5,
                     "diff_top1": top1 - p1 if top1 is not None and p1 is not None else None,
                     "diff_top5": top5 - p5 if top5 is not None and p5 is not None else None,
                     "note": paper.note if paper else ""})
    return rows


# ../shared's CIFAR-10 (data=cifar10-jpg) is not CIFAR-10 as the paper used it, and a number measured on
# it could pass for one on the original; so this is said beside every such number. The cost is
# ../shared/README.md's measurement with published option-A weights.
JPEG_CIFAR = "cifar10-jpg"
JPEG_CIFAR_NOTE = ("cifar10-jpg is CIFAR-10 JPEG-encoded at quality 75 with 4:2:0 chroma subsampling, not the "
                   "original images: a model trained on the originals loses about 10 points of accuracy on it "
                   "(published option-A weights: ResNet-20 8.27% -> 18.97% error). Numbers trained and tested on "
                   "it are not the paper's numbers until the same recipe has run on the original CIFAR-10 "
                   "(python -m raysnet.prepare source=cifar10, then data=cifar10).")


def render_table(table: str, rows: list[dict[str, Any]]) -> str:
    body = [[r["run"], r["arch"], str(r["layers"]), r["shortcut"], f"{r['params'] / 1e6:.2f}M", fmt(r["top1"]),
             fmt(r["paper_top1"]), fmt(r["diff_top1"], True), fmt(r["top5"]), fmt(r["paper_top5"]),
             fmt(r["diff_top5"], True)] for r in rows]
    datasets = sorted({r["dataset"] for r in rows})
    paper_data = "CIFAR-10" if table == "6" else "ImageNet"
    note = "" if datasets in (["cifar10"], ["imagenet"]) else \
        f"\n\nMeasured on {', '.join(datasets)}; the paper's numbers are {paper_data}'s, so the difference " \
        "compares different datasets."
    note += f"\n\n{JPEG_CIFAR_NOTE}" if JPEG_CIFAR in datasets else ""
    notes = "".join(f"\n\n{r['arch']}: the paper's number is the {r['note']}." for r in rows if r["note"])
    return f"### {TABLE_TITLES[table]}\n\n" + markdown_table(
        ["run", "arch", "layers", "shortcut", "params", "top-1 err", "paper top-1", "Δ top-1", "top-5 err",
         "paper top-5", "Δ top-5"], body) + note + notes


# --- figures -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(infos: list[RunInfo], family: str, path: Path) -> Path:
    """Fig. 4 / Fig. 6: error against iterations, plain (left) and residual (right)."""
    plt = _pyplot()
    runs = [i for i in infos if i.family == family and i.history.get("train_err")]
    depths = sorted({i.depth for i in runs})
    colours = {d: plt.get_cmap("tab10")(k % 10) for k, d in enumerate(depths)}
    by_iterations = all(i.steps_per_epoch for i in runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, residual in zip(axes, (False, True)):
        for info in sorted((i for i in runs if i.residual == residual), key=lambda i: i.depth):
            scale = info.steps_per_epoch if by_iterations else 1
            label = f"{'ResNet' if residual else 'plain'}-{info.depth}"
            for key, width, style in (("train_err", 0.9, "--"), ("val_err", 2.4, "-")):
                pts = [(e, v) for e, v in info.history.get(key, []) if math.isfinite(v)]
                if pts:
                    ax.plot([(e + 1) * scale for e, _ in pts], [v for _, v in pts], style, lw=width, marker=".",
                            ms=2 * width + 2, color=colours[info.depth], label=label if key == "val_err" else None)
        ax.set_title(f"{'residual' if residual else 'plain'} nets ({family})")
        ax.set_xlabel("iterations" if by_iterations else "epochs")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="bold: val error, dashed: train error", fontsize=8, title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_responses(responses: list[dict[str, Any]], path: Path) -> Path:
    """Fig. 7: std of layer responses, in layer order (top) and sorted by magnitude (bottom)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    for r in sorted(responses, key=lambda r: (r["residual"], r["depth"])):
        label = f"{'ResNet' if r['residual'] else 'plain'}-{r['depth']}"
        xs = range(1, len(r["std"]) + 1)
        axes[0].plot(xs, r["std"], "-" if r["residual"] else "--", label=label)
        axes[1].plot(xs, sorted(r["std"], reverse=True), "-" if r["residual"] else "--", label=label)
    axes[0].set_xlabel("layer index (original)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the report --------------------------------------------------------------------------------

def read_runs(args: ReportArgs, uri: str) -> tuple[Any, list[RunInfo], str | None, int]:
    """-> (the MLflow client, the FINISHED runs to report, their sweep's parent run or None, how
    many other runs were left out)"""
    mlflow = tracking.client(uri)
    runs, parent = select_runs(mlflow, args.experiment, args.runs, args.parent)
    infos = [_run_info(mlflow, r, args.data.root) for r in runs if r.info.status == "FINISHED"]
    others = len(runs) - len(infos)
    if not infos:
        raise UsageError(f"no FINISHED runs to report in experiment '{args.experiment}'"
                         f"{f' under parent run {parent}' if parent else ''} ({others} not finished).")
    return mlflow, infos, parent, others


def curve_sections(infos: list[RunInfo], out: Path) -> tuple[list[Path], list[str]]:
    """Fig. 4 (ImageNet nets) and Fig. 6 (CIFAR nets), where such runs exist. -> (figures, sections)"""
    figures, sections = [], []
    for family, fig in (("imagenet", "4"), ("cifar", "6")):
        if any(i.family == family for i in infos):
            figures.append(plot_curves(infos, family, out / f"fig{fig}-{family}-curves.png"))
            axis = "iterations" if all(i.steps_per_epoch for i in infos if i.family == family) else "epochs"
            jpeg = f" {JPEG_CIFAR_NOTE}" if any(i.family == family and i.dataset == JPEG_CIFAR for i in infos) else ""
            sections.append(f"### Fig. {fig}: training (dashed) and validation (bold) error, {family} nets\n\n"
                            f"![Fig. {fig}]({figures[-1].name})\n\nx axis: {axis}.{jpeg}\n")
    return figures, sections


def response_sections(mlflow, infos: list[RunInfo], args: ReportArgs,
                      out: Path) -> tuple[list[dict[str, Any]], list[Path], list[str]]:
    """Fig. 7 from each run's final checkpoint. -> (responses, figures, sections)"""
    from raysnet.analyze import analyze

    responses, sections = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for info in infos:
            ckpt = find_checkpoint(mlflow, info, Path(tmp) / info.run_id)
            if ckpt is None:
                continue
            try:
                responses.append({"run": info.name, **analyze(ckpt, args.data.root, args.batch, args.batches)})
            except UsageError as e:  # the validation data is not reachable here
                sections.append(f"Fig. 7: {info.name} left out: {e}\n")
    if not responses:
        return responses, [], sections
    figure = plot_responses(responses, out / "fig7-responses.png")
    sections.append(f"### Fig. 7: std of the 3x3 layers' responses (after BN, before ReLU/addition)\n\n"
                    f"![Fig. 7]({figure.name})\n\nOver {responses[0]['images']} validation images "
                    "per model; std over every element of each layer's response.\n")
    return responses, [figure], sections


def make_report(args: ReportArgs) -> tuple[Path, str | None]:
    """Write the report into `args.out` -> (the path of report.md, the parent run it was logged to)."""
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={out} is a file; expected a directory for report.md and its figures (created when "
                         "missing). Nothing was changed.")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"out={out} exists and is not empty; choose another out=DIR or pass overwrite=true.")
    uri = tracking.resolve_uri(args.tracking.uri, "outputs")  # training's default store when none is named
    tracking.check_readable(uri)
    mlflow, infos, parent, others = read_runs(args, uri)
    out.mkdir(parents=True, exist_ok=True)
    params = {i.run_id: count_parameters(i) for i in infos}
    header = (f"{len(infos)} finished run(s){f' of sweep parent run {parent}' if parent else ''}"
              f"{f'; {others} not finished, left out' if others else ''}. Tracking: {uri}. "
              f"Written {time.strftime('%Y-%m-%d %H:%M')}.\n")
    tables = {t: table_rows(infos, t, params) for t in ("2", "3", "6")}
    tables = {t: rows for t, rows in tables.items() if rows}
    figures, curves = curve_sections(infos, out)
    responses, more, fig7 = response_sections(mlflow, infos, args, out) if args.responses else ([], [], [])
    sections = [f"# raysnet report: {args.experiment}\n", header,
                *(render_table(t, rows) + "\n" for t, rows in tables.items()), *curves, *fig7]
    (out / "report.md").write_text("\n".join(sections))
    (out / "report.json").write_text(json.dumps(
        {"experiment": args.experiment, "parent_run_id": parent, "tracking_uri": uri, "tables": tables,
         "responses": responses, "figures": [f.name for f in figures + more]}, indent=1, default=str))
    if parent:
        mlflow.log_artifacts(parent, str(out), "report")
    return out / "report.md", parent


def run(args: list[str]) -> int:
    a = _cli.parse_args(ReportArgs, args, "raysnet.report")
    path, parent = make_report(a)
    print(f"raysnet: report written to {path} (figures beside it)"
          + (f"; logged as artifacts report/ of the sweep's parent run {parent}" if parent else ""))
    return 0


def cli() -> None:
    _cli.main(run, sigterm=True)


if __name__ == "__main__":
    cli()
