"""Experiment trackers: ``run.report_to`` through Accelerate's tracker classes.

``jsonl`` (``metrics.jsonl`` / ``samples.jsonl`` in the run directory) is always written by the
trainer; the others are Accelerate's :mod:`accelerate.tracking` classes, each needing its package
(``pip install 'sdpo[tensorboard]'``, ``[wandb]``, ``[mlflow]``, ``[trackio]``):

- ``tensorboard``: event files under ``RUN_DIR/tensorboard`` (scalars, config, samples as text);
- ``wandb``: ``wandb.init(dir=RUN_DIR)``; ``WANDB_MODE=offline`` writes the run under
  ``RUN_DIR/wandb`` without an account; the samples go in as a table;
- ``mlflow``: to ``MLFLOW_TRACKING_URI`` when set, else to the local directory ``RUN_DIR/mlruns``;
- ``trackio``: trackio's local store (``trackio show`` opens it).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "trackio")
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "feedback", "teacher_prompt")


class MissingTrackerError(ImportError):
    """A tracker in ``run.report_to`` whose package is not installed."""


def check_trackers(names: list[str]) -> list[str]:
    """The external trackers of ``names`` (without ``jsonl``); raise when one is unknown or missing."""
    external = []
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"run.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}."
            )
        if name == "jsonl" or name in external:
            continue
        if importlib.util.find_spec(name) is None:
            raise MissingTrackerError(
                f"run.report_to includes {name!r} but the {name} package is not installed; "
                f"install it with: pip install 'sdpo[{name}]' (or drop {name!r} from run.report_to)."
            )
        external.append(name)
    return external


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}``; values other than bool/int/float/str become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class ExperimentTracker:
    """The run's external trackers: config at start, scalars every log, sample tables, finish.

    Args:
        names: ``run.report_to`` (``jsonl`` is skipped here: the trainer writes it).
        run_dir: the run directory (TensorBoard events, W&B offline files, MLflow's local store).
        project: project / experiment name (W&B, MLflow, trackio).
        run_name: the run's name in the tracker.
        config: the run's config as a nested dict (logged as flat dotted hyperparameters).
    """

    def __init__(
        self,
        names: list[str],
        run_dir: str | Path,
        project: str,
        run_name: str,
        config: dict[str, Any],
    ) -> None:
        self.run_dir = Path(run_dir)
        self.trackers = [
            self._start(name, project, run_name) for name in check_trackers(list(names))
        ]
        flat = flatten_config(config)
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                _tensorboard_hparams(tracker.writer, flat)
            else:
                tracker.store_init_configuration(flat)

    def _start(self, name: str, project: str, run_name: str) -> Any:
        from accelerate import tracking

        if name == "tensorboard":
            tracker = tracking.TensorBoardTracker("tensorboard", self.run_dir)
        elif name == "wandb":
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tracker = tracking.WandBTracker(project, name=run_name, dir=str(self.run_dir))
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
            tracker = tracking.MLflowTracker(experiment_name=project, run_name=run_name)
        else:
            tracker = tracking.TrackioTracker(project, name=run_name)
        tracker.start()
        return tracker

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Finite numeric metrics at ``step`` to every tracker."""
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        """The sample table (prompt, completion, reward, feedback, teacher prompt) where supported:
        a W&B table, TensorBoard text (a markdown table)."""
        rows = [[_cell(r.get(c)) for c in SAMPLE_COLUMNS] for r in records]
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log_table("samples", columns=list(SAMPLE_COLUMNS), data=rows, step=step)
            elif tracker.name == "tensorboard":
                tracker.writer.add_text("samples", _markdown_table(rows), global_step=step)
                tracker.writer.flush()

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)


def _markdown_table(rows: list[list[Any]]) -> str:
    def esc(v: Any) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _tensorboard_hparams(writer: Any, flat: dict[str, Any]) -> None:
    """The config as TensorBoard hyperparameters, written into the run's own event file.

    ``SummaryWriter.add_hparams`` (what accelerate's tracker calls) opens a second writer in a
    new timestamped sub-directory, so each start showed up as an extra run; writing the three
    hparams summaries to the run's writer keeps one TensorBoard run per run directory."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}
    experiment, start, end = hparams(values, metric_dict={})
    file_writer = writer._get_file_writer()
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)
    writer.flush()
