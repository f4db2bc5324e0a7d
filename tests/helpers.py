"""Data shared by several test modules (a test module never imports another one)."""

# completion, gold, default (last \\boxed{} only), lenient (old fallbacks)
MATH_CASES = [
    ("\\boxed{4}", "4", 1.0, 1.0),
    ("The answer is \\boxed{4} apples.", "4", 1.0, 1.0),
    ("The answer is 4.", "4", 0.0, 1.0),
    ("2 + 2 makes 4", "4", 0.0, 1.0),
    ("**Answer:** 4", "4", 0.0, 1.0),
    ("$4$", "4", 0.0, 1.0),
    ("first \\boxed{3}, no: \\boxed{4}", "4", 1.0, 1.0),
    ("first \\boxed{4}, no: \\boxed{3}", "4", 0.0, 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("\\boxed{2.0}", "2", 1.0, 1.0),
    ("\\fbox{4}", "4", 1.0, 1.0),
    ("\\boxed{5}", "4", 0.0, 0.0),
    ("", "4", 0.0, 0.0),
]


# The checkpoint tests' runs: small (G = 2, 4 tokens), a checkpoint after every step.
CHECKPOINT_ROWS = [
    {"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 13) for b in range(3)
]
CHECKPOINT_DEFAULTS = dict(
    num_samples_per_prompt=2,
    generation__max_new_tokens=4,
    optimization__prompts_per_step=2,
    optimization__learning_rate=1e-3,
    run__max_steps=2,
    run__save_steps=1,
    run__save_total_limit=3,
    run__progress_bar=False,
)


def checkpoint_trainer(run_dir, reward=None, policy=None, **overrides):
    """conftest.make_trainer with the checkpoint tests' rows and defaults."""
    from conftest import make_trainer, parity_reward

    return make_trainer(
        run_dir,
        reward=reward or parity_reward,
        rows=CHECKPOINT_ROWS,
        policy=policy,
        defaults=CHECKPOINT_DEFAULTS,
        **overrides,
    )
