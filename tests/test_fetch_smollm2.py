"""scripts/fetch_smollm2.py's data: held-out split, correct answers, chat format, determinism.

The functions are imported from the script; nothing is installed or converted here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fetch():
    spec = importlib.util.spec_from_file_location(
        "fetch_smollm2", ROOT / "scripts/fetch_smollm2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _solve(question: str) -> int:
    """An independent reading of the question (not the generator's code)."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if "more" in question:
        return numbers[0] + numbers[1]
    if "gives away" in question:
        return numbers[0] - numbers[1]
    if "bags with" in question:
        return numbers[0] * numbers[1]
    assert "shares" in question and numbers[0] % numbers[1] == 0, question
    return numbers[0] // numbers[1]


def test_splits_are_disjoint_correct_chat_prompts_and_deterministic(fetch, tmp_path):
    fetch.write_data(tmp_path / "a", n_train=300, n_eval=60)
    train, held_out = _rows(tmp_path / "a/train.jsonl"), _rows(tmp_path / "a/eval.jsonl")
    assert (len(train), len(held_out)) == (300, 60)
    questions = {}
    for split, rows in (("train", train), ("eval", held_out)):
        for row in rows:
            assert set(row) == {"prompt", "answer"}
            example_user, example_answer, user = row["prompt"]
            assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
            assert "\\boxed{5}" in example_answer["content"]
            assert example_user["content"].endswith("Put the final answer in \\boxed{}.")
            assert user["content"].endswith(" Put the final answer in \\boxed{}.")
            question = user["content"].removesuffix(" Put the final answer in \\boxed{}.")
            assert question != fetch.EXAMPLE_QUESTION
            assert row["answer"] == str(_solve(question)), question
            assert question not in questions, f"{question!r} is in {questions.get(question)} too"
            questions[question] = split
            assert fetch.is_eval(question) == (split == "eval")  # a function of the text alone
    assert {_solve(q) >= 0 for q in questions} == {True}
    assert len({q.split()[3] for q in questions}) > 1  # more than one kind of item
    fetch.write_data(tmp_path / "b", n_train=300, n_eval=60)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the first rows do not depend on how many are asked for
    fetch.write_data(tmp_path / "c", n_train=100, n_eval=10)
    assert _rows(tmp_path / "c/eval.jsonl") == held_out[:10]


def test_rows_load_as_chat_prompts_and_score_with_the_math_reward(fetch, tmp_path):
    from sdpo.data import check_columns, load_rows
    from sdpo.reward_model import MathRewardModel

    fetch.write_data(tmp_path, n_train=8, n_eval=4)
    rows = load_rows(str(tmp_path / "eval.jsonl"))
    check_columns(rows)
    reward = MathRewardModel()
    right = reward.score_one(f"so \\boxed{{{rows[0]['answer']}}}", rows[0]["answer"])
    wrong = reward.score_one(f"The final answer is {rows[0]['answer']}.", rows[0]["answer"])
    assert (right.score, wrong.score) == (1.0, 0.0)  # the strict reward needs the box


def test_installed_packages_are_pinned_exactly_and_match_constraints(fetch):
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    for requirement in (fetch.WHEEL, fetch.GGUF):
        name, version = requirement.split("==")
        assert pins[name] == version, f"{requirement} vs constraints.txt {name}=={pins.get(name)}"


def test_the_example_config_reads_the_files_the_script_writes(fetch):
    from sdpo.config import SDPOConfig

    config = SDPOConfig.from_yaml(ROOT / "examples/smollm2_math.yaml")
    assert config.data.task is None and config.data.reward == "math"
    parser_defaults = {"model": "models/smollm2-135m-instruct", "data": "data/word_problems"}
    assert config.model_name == parser_defaults["model"]
    assert config.data.train_file == f"{parser_defaults['data']}/train.jsonl"
    assert config.data.eval_file == f"{parser_defaults['data']}/eval.jsonl"
    source = (ROOT / "scripts/fetch_smollm2.py").read_text()
    assert all(f'ROOT / "{path}"' in source for path in parser_defaults.values())
