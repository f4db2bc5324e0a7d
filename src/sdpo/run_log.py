"""The run's log: ``metrics.jsonl``, ``samples.jsonl`` and the external trackers of ``run.report_to``.

Only the main process (rank 0) writes; on the others every call is a no-op, so callers need no
rank check. Records are strict JSON lines (NaN and inf are written as ``null``).
"""

from __future__ import annotations

from typing import Any

from sdpo.config import SDPOConfig
from sdpo.policy_model import RolloutBatch
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
