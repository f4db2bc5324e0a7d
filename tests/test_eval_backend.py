"""Evaluation samples through the run's generation backend (vLLM included), not always through
the HF sampler: what is evaluated is what training samples."""

from __future__ import annotations

from conftest import ROWS, make_trainer

from sdpo.evaluation import evaluate_policy
from sdpo.generation import HFBackend


class RecordingBackend(HFBackend):
    """The HF sampler, recording each call: a real backend other than the policy's default."""

    def __init__(self, policy, generation) -> None:
        super().__init__(policy, generation)
        self.calls: list[tuple[int, int, bool]] = []

    def generate(self, prompt_ids, num_samples, *, greedy=False):
        self.calls.append((len(prompt_ids), num_samples, greedy))
        return super().generate(prompt_ids, num_samples, greedy=greedy)


def test_trainer_evaluation_samples_with_the_runs_backend(tmp_path):
    trainer = make_trainer(tmp_path / "run", eval_rows=ROWS[:4], run__eval_num_samples=2)
    trainer.generator = RecordingBackend(trainer.policy, trainer.config.generation)
    metrics = trainer.evaluate()
    assert {greedy for _, _, greedy in trainer.generator.calls} == {True, False}
    assert sum(n * g for n, g, greedy in trainer.generator.calls if not greedy) == 4 * 2
    # The HF backend samples exactly as the policy's own sampler did: same seed, same numbers.
    cfg = trainer.config
    direct = evaluate_policy(
        trainer.policy,
        trainer.reward_model,
        trainer.eval_rows,
        generation=cfg.generation,
        num_samples=cfg.run.eval_num_samples,
        success_threshold=cfg.self_distillation.success_reward_threshold,
        seed=cfg.run.seed + 7919,
        batch_size=cfg.optimization.prompts_per_step * cfg.num_samples_per_prompt,
        max_prompt_length=cfg.model.max_prompt_length,
    )
    assert metrics == {f"eval/{k}": v for k, v in direct.metrics.items()}
