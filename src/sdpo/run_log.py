"""The run's log: ``metrics.jsonl``, ``samples.jsonl``, the external trackers of ``run.report_to``
and the console (messages, progress bars).

Only the main process (rank 0) writes or prints; on the others every call is a no-op, so callers
need no rank check. Records are strict JSON lines (NaN and inf are written as ``null``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from sdpo.config import SDPOConfig
from sdpo.policy_model import RolloutBatch
from sdpo.progress import Progress
from sdpo.reprompting import TeacherContext
from sdpo.run_dir import RunDirectory
from sdpo.tracking import ExperimentTracker, check_trackers


class RunLog:
    """Writes one run's records into ``run_dir`` (and its trackers), on the main process only."""

    def __init__(self, config: SDPOConfig, run_dir: RunDirectory) -> None:
        self.config = config
        self.run_dir = run_dir
        check_trackers(config.run.report_to)  # a missing tracker package fails here, early
        self.tracker: ExperimentTracker | None = None
        self.bar: Progress | None = None  # the open progress display, which messages go through

    def start(self) -> None:
        """Open the trackers (once; a resumed or repeated ``train()`` reuses them)."""
        run = self.config.run
        if self.tracker is None and self.run_dir.main:
            self.tracker = ExperimentTracker(
                run.report_to,
                self.run_dir.path,
                project=run.tracker_project,
                run_name=self.run_dir.path.name,
                config=self.config.to_dict(),
            )

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

    def metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """One record of ``metrics.jsonl``, and the same scalars to the trackers."""
        self.write_jsonl("metrics.jsonl", {"step": step, **metrics})
        if self.tracker is not None:
            self.tracker.log(metrics, step)

    def samples(
        self, step: int, rollouts: RolloutBatch, contexts: list[TeacherContext | None]
    ) -> None:
        """One ``samples.jsonl`` record per rollout: prompt, completion, reward, feedback and the
        teacher's prompt; the same records to the trackers' sample tables."""
        if not self.run_dir.main:
            return
        records = []
        for i in range(len(rollouts)):
            ctx = contexts[i]
            record = {
                "step": step,
                "group": int(rollouts.group_ids[i]),
                "prompt": rollouts.prompts[i],
                "completion": rollouts.completions[i],
                "reward": float(rollouts.rewards[i]),
                "feedback": rollouts.feedback[i],
                "teacher_prompt": None if ctx is None else ctx.prompt,
                "demonstration_index": None if ctx is None else ctx.demonstration_index,
                **(
                    {"extra": {k: v[i] for k, v in rollouts.reward_extra.items()}}
                    if rollouts.reward_extra
                    else {}
                ),
            }
            self.write_jsonl("samples.jsonl", record)
            records.append(record)
        if self.tracker is not None:
            self.tracker.log_samples(records, step)

    def write_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append a strict-JSON line (NaN and inf are written as null)."""
        if not self.run_dir.main:
            return
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.append_jsonl(name, record)

    def config_file(self, comment: str | None = None) -> None:
        """``config.yaml``: the run's full config (written when training starts); ``comment``
        lines go first as ``# ...`` (what the run resolved, e.g. model.dtype=auto's choice)."""
        if self.run_dir.main:
            self.config.to_yaml(self.run_dir.path / "config.yaml", comment=comment)

    # ----- the console ------------------------------------------------------------------------

    def say(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` (default to stderr) on the main process, through the open progress bar
        when there is one (a tqdm bar stays intact)."""
        if not self.run_dir.main:
            return
        stream = stream if stream is not None else sys.stderr
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream)

    def progress(
        self, total: int, desc: str, *, initial: int = 0, unit: str = "it"
    ) -> Progress | None:
        """A progress display on the main process when ``run.progress_bar`` is on, else None."""
        if not (self.config.run.progress_bar and self.run_dir.main):
            return None
        return Progress(total, desc, initial=initial, unit=unit)

    @contextmanager
    def step_bar(self, initial: int) -> Iterator[Progress | None]:
        """The training loop's progress display (steps), which :meth:`say` writes through while
        it is open; closed on the way out."""
        self.bar = self.progress(self.config.run.max_steps, "sdpo", initial=initial, unit="steps")
        try:
            yield self.bar
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None
