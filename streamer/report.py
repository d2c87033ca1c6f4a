"""The ``report`` command: learning-curve plots (sliding-window HR@10 and MRR@10) from an ``evaluate --json`` summary.

matplotlib is an optional extra, imported only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from drnn_core.errors import DrnnError
from streamer.settings import Settings, add_arguments

logger = logging.getLogger(__name__)

PLOT_EXTRA = "pip install 'drnn-stream[plot]'"
CURVE_METRICS = {"hr_at_10": "HR@10", "mrr_at_10": "MRR@10"}
SYSTEM_LABELS = {"model": "recurrent BPR (model)", "pop": "Pop", "markov1": "Markov-1"}


class ReportError(DrnnError):
    """A summary file cannot be read, or a plot cannot be drawn or written."""


def require_matplotlib() -> None:
    """Check that matplotlib can be imported.

    Raises
    ------
    ReportError
        Naming the install command of the plot extra, when matplotlib is missing.
    """
    _figure_class()


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"Plotting needs matplotlib, which is not installed ({exc}). Install it with: {PLOT_EXTRA}") from None
    return Figure


def plot_curve(curves: dict, metric: str, path: str | Path, *, title: str) -> Path:
    """Draw one metric's sliding-window curve of every system into a PNG file.

    Parameters
    ----------
    curves : dict
        The ``curves`` section of an evaluate summary: ``event`` (x values),
        ``window``, and per metric a dict of system name to y values.
    metric : str
        "hr_at_10" or "mrr_at_10".
    path : str or Path
        The PNG file to write.
    title : str

    Raises
    ------
    ReportError
        If matplotlib is missing or the file cannot be written.
    """
    figure_class = _figure_class()
    path = Path(path)
    figure = figure_class(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, values in curves[metric].items():
        axes.plot(curves["event"], values, label=SYSTEM_LABELS.get(name, name), linewidth=1.2)
    axes.set_xlabel("events replayed")
    axes.set_ylabel(f"{CURVE_METRICS.get(metric, metric)} over the last {curves['window']:,} events")
    axes.set_title(title)
    axes.set_ylim(bottom=0.0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise ReportError(f"Failed to write the plot {path}: {exc}. Check that its directory exists.") from None
    logger.info("Wrote %s", path)
    return path


def load_summary(path: str | Path) -> dict:
    """Read an ``evaluate --json`` summary and check that it has learning curves.

    Raises
    ------
    ReportError
        If the file is missing, is not JSON, or lacks the curves of HR@10 and MRR@10.
    """
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"Summary file {path} not found. Write one with: drnn-stream evaluate ... --json {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"Failed to read the summary {path}: {exc}. Expected the JSON file of evaluate --json.") from None

    curves = summary.get("curves") if isinstance(summary, dict) else None
    if not isinstance(curves, dict):
        raise ReportError(f"{path} has no 'curves' section: expected the JSON file of drnn-stream evaluate --json")
    missing = [key for key in ("event", "window", *CURVE_METRICS) if key not in curves]
    if missing:
        raise ReportError(f"{path}: the 'curves' section lacks {', '.join(missing)}; write it again with evaluate --json")
    for metric in CURVE_METRICS:
        for name, values in curves[metric].items():
            if len(values) != len(curves["event"]):
                raise ReportError(
                    f"{path}: curve {metric} of {name} has {len(values)} points but 'event' has "
                    f"{len(curves['event'])}; the file is damaged"
                )
    return summary


def write_report(summary: dict, out_dir: str | Path) -> list[Path]:
    """Draw the HR@10 and MRR@10 learning curves of a summary as PNG files in ``out_dir``.

    The directory is created when missing. Returns the paths written.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"Failed to create the output directory {out_dir}: {exc}") from None

    dataset = summary.get("dataset", "dataset")
    paths = []
    for metric, label in CURVE_METRICS.items():
        title = f"{Path(str(dataset)).name}: prequential {label}, {summary.get('events', 0):,} events"
        paths.append(plot_curve(summary["curves"], metric, out_dir / f"{metric}.png", title=title))
    return paths


def add_report_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to the sub-parsers of the drnn-stream parser and return it."""
    parser = commands.add_parser(
        "report",
        help="Draw learning curves (HR@10, MRR@10) from an evaluate --json file as PNG files.",
    )
    parser.add_argument("summary", metavar="SUMMARY.json", help="JSON file written by drnn-stream evaluate --json.")
    parser.add_argument("--out", dest="out_dir", metavar="DIR", required=True, help="Directory of the PNG files.")
    add_arguments(parser, ("log_level",))
    parser.set_defaults(run=run_report)
    return parser


def run_report(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``drnn-stream report``: draw the curves and print the path of each file."""
    require_matplotlib()
    summary = load_summary(args.summary)
    for path in write_report(summary, args.out_dir):
        print(path)
    return 0
