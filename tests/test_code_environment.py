"""CodeExecutionRewardModel: judging both test styles, judge-style feedback without label leaks,
programs that try to fake a pass, hostile programs scored as failures, and the built-in code task."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from sdpo.environments import CodeExecutionRewardModel
from sdpo.environments.code import literal_equal, normalize_output
from sdpo.reward_model import RewardModel, RewardOutput
from sdpo.sandbox import SandboxConfig, SandboxUnavailableError, detect_isolation
from sdpo.tasks import code as code_task

CALL_TESTS = [
    {"call": "solve(2, 3)", "expected": "5"},
    {"call": "solve(-1, 1)", "expected": "0"},
    {"call": "solve(400, 587)", "expected": "987", "hidden": True},
]
STDIN_TESTS = [
    {"stdin": "2 3\n", "stdout": "5\n"},
    {"stdin": "10 20\n", "stdout": "30"},
    {"stdin": "400 587\n", "stdout": "987\n", "hidden": True},
]
SOLVE = "def solve(a, b):\n    return a + b\n"
MAIN = "a, b = map(int, input().split())\nprint(a + b)\n"


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\n"


@pytest.fixture(scope="module")
def isolation():
    try:
        return detect_isolation(SandboxConfig())
    except SandboxUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def judge(isolation) -> CodeExecutionRewardModel:
    return CodeExecutionRewardModel(sandbox_config=SandboxConfig(wall_time_s=2.0, cpu_time_s=2.0))


def score(judge: CodeExecutionRewardModel, code: str | None, tests=CALL_TESTS) -> RewardOutput:
    completion = "no code here" if code is None else fenced(code)
    return judge([""], [completion], tests=[tests])[0]


def verdicts(out: RewardOutput) -> list[str]:
    return [c["verdict"] for c in out.info["cases"]]


# ----- ordinary programs -------------------------------------------------------------------------


def test_correct_programs_pass_both_test_styles(judge, isolation):
    outs = judge(["", ""], [fenced(SOLVE), fenced(MAIN)], tests=[CALL_TESTS, STDIN_TESTS])
    for out in outs:
        assert (out.score, out.feedback) == (1.0, None)
        assert verdicts(out) == ["passed"] * 3
        assert out.info["isolation"] == str(isolation) and out.info["num_passed"] == 3
        case = out.info["cases"][0]
        assert set(case) >= {"passed", "timed_out", "error_type", "duration_s", "hidden"}


def test_wrong_answers_show_the_two_shortest_visible_cases_and_never_a_hidden_expected(judge):
    out = score(judge, "def solve(a, b):\n    return a * b\n")
    assert out.score == 0.0 and verdicts(out) == ["wrong_answer"] * 3
    assert "Wrong answer on test 1" in out.feedback and "Expected:\n5" in out.feedback
    assert "Output:\n6" in out.feedback
    assert (
        "987" not in out.feedback and "400" not in out.feedback
    )  # hidden: neither expected nor input
    assert "1 of 1 hidden tests" in out.feedback


def test_stdout_comparison_normalizes_whitespace(judge):
    out = score(
        judge, "a, b = map(int, input().split())\nprint('  ', a + b, '   ')\nprint()\n", STDIN_TESTS
    )
    assert out.score == 1.0
    out = score(judge, "print(input())\n", STDIN_TESTS)
    assert out.score == 0.0 and "Input:\n2 3\nOutput:\n2 3\nExpected:\n5" in out.feedback


def test_fraction_score(isolation):
    judge = CodeExecutionRewardModel(score="fraction")
    out = judge(
        [""],
        [fenced("def solve(a, b):\n    return 5 if a == 2 else a + b + 1\n")],
        tests=[CALL_TESTS],
    )[0]
    assert out.score == pytest.approx(1 / 3)
    assert [c["passed"] for c in out.info["cases"]] == [True, False, False]


def test_tests_column_may_be_json_text_and_completions_chat_messages(judge):
    completion = [{"role": "assistant", "content": fenced(SOLVE)}]
    out = judge([""], [completion], tests=[json.dumps(CALL_TESTS)])[0]
    assert out.score == 1.0


def test_literal_comparison():
    assert literal_equal([1, (2, 3.0000001)], [1, (2, 3)])
    assert not literal_equal([1, 2], (1, 2)) and not literal_equal({"a": 1}, {"a": 2})
    assert normalize_output("  1   2 \n\n") == normalize_output("1 2")


def test_call_results_compare_as_literals(judge):
    tests = [{"call": "f()", "expected": "[1, (2, 'x')]"}, {"call": "g()", "expected": "0.3"}]
    out = score(
        judge, "def f():\n    return [1, (2, 'x')]\ndef g():\n    return 0.1 + 0.2\n", tests
    )
    assert out.score == 1.0


# ----- feedback ----------------------------------------------------------------------------------


def test_no_code_block_gives_a_format_message(judge):
    out = score(judge, None)
    assert out.score == 0.0 and "```python" in out.feedback and out.info["code_found"] is False


def test_syntax_error_comes_first(judge):
    out = score(judge, "def solve(a, b)\n    return a + b\n")
    assert out.score == 0.0 and out.feedback.startswith("Syntax error")
    assert "line 1" in out.feedback and "SyntaxError" in out.feedback


def test_runtime_error_traceback_is_trimmed_to_the_programs_lines(judge):
    out = score(
        judge, "def helper(x):\n    return 1 // x\ndef solve(a, b):\n    return helper(b - b)\n"
    )
    assert out.score == 0.0 and out.feedback.startswith("Runtime error on test 1")
    assert 'File "<solution>", line 2, in helper' in out.feedback
    assert "ZeroDivisionError" in out.feedback
    for foreign in ("main.py", "<test>", "harness", "sandbox", '.py"'):
        assert foreign not in out.feedback
    assert out.info["cases"][0]["error_type"] == "ZeroDivisionError"


def test_timeout_stops_the_remaining_cases(judge):
    out = score(judge, "def solve(a, b):\n    while True:\n        pass\n")
    assert out.feedback.startswith("Time limit exceeded on test 1")
    assert verdicts(out) == ["timeout", "not_run", "not_run"] and out.info["cases"][0]["timed_out"]


def test_cpu_time_limit_is_reported_as_a_time_limit(isolation):
    # The CPU-time limit fires long before the wall clock: still a timeout, not a "runtime error".
    judge = CodeExecutionRewardModel(sandbox_config=SandboxConfig(wall_time_s=8.0, cpu_time_s=1.0))
    out = score(judge, "def solve(a, b):\n    while True:\n        pass\n")
    assert out.feedback.startswith("Time limit exceeded on test 1"), out.feedback
    assert verdicts(out) == ["timeout", "not_run", "not_run"] and out.info["cases"][0]["timed_out"]


def test_ignoring_the_cpu_limit_signal_is_still_a_time_limit(isolation):
    # SIGXCPU ignored: the hard limit's SIGKILL one second later is a timeout too.
    judge = CodeExecutionRewardModel(sandbox_config=SandboxConfig(wall_time_s=8.0, cpu_time_s=1.0))
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
    out = score(judge, code)
    assert out.feedback.startswith("Time limit exceeded on test 1"), out.feedback
    assert verdicts(out)[0] == "timeout"


def test_feedback_is_capped_with_a_marker(isolation):
    judge = CodeExecutionRewardModel(feedback_max_chars=300)
    out = judge([""], [fenced("def solve(a, b):\n    return 'x' * 5000\n")], tests=[CALL_TESTS])[0]
    assert len(out.feedback) <= 300 and "more characters]" in out.feedback


def test_runtime_error_on_a_hidden_case_does_not_show_its_input(judge):
    out = score(
        judge,
        "def solve(a, b):\n    if a == 400:\n        raise KeyError('boom')\n    return a + b\n",
    )
    assert out.feedback.startswith("Runtime error on a hidden test") and "400" not in out.feedback
    assert "987" not in out.feedback


# ----- programs that try to fake a pass ----------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n" + SOLVE.replace("a + b", "0"),
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
    ],
    ids=["sys.exit", "os._exit", "SystemExit"],
)
def test_exiting_before_the_tests_run_is_a_failure(judge, code):
    out = score(judge, code)
    assert out.score == 0.0 and set(verdicts(out)) == {"exited"}
    assert "exited" in out.feedback


def test_exit_before_printing_fails_stdin_cases(judge):
    out = score(judge, "import sys\nsys.exit(0)\n", STDIN_TESTS)
    assert out.score == 0.0 and set(verdicts(out)) == {"wrong_answer"}


def test_an_object_equal_to_everything_does_not_pass(judge):
    code = (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
    )
    code += "def solve(a, b):\n    return Anything()\n"
    assert score(judge, code).score == 0.0


def test_forged_records_on_every_descriptor_and_stdout_do_not_count(judge):
    forged = json.dumps({"cases": [{"status": "ok", "repr": "5"}] * 3, "nonce": "0" * 64})
    code = f"""
import os, sys
forged = {forged!r}
print(forged)
for fd in range(0, 64):
    try:
        os.write(fd, (forged + "\\n").encode())
    except OSError:
        pass
for path in (f'/proc/{{os.getppid()}}/fd/0', f'/proc/{{os.getppid()}}/fd/1', f'/proc/{{os.getppid()}}/mem'):
    try:
        open(path, 'rb').read(100)
        print('read', path, file=sys.stderr)
    except OSError:
        pass
open('main.py', 'w').write('print(1)')  # the harness's own source, long since compiled
def solve(a, b):
    return 0
"""
    out = score(judge, code)
    assert out.score == 0.0 and not any(c["passed"] for c in out.info["cases"])


def test_tampering_with_the_judges_tools_inside_the_program_does_not_matter(judge):
    code = """
import builtins, json, ast
json.dumps = lambda *a, **k: '{"status": "ok", "repr": "5"}'
ast.literal_eval = lambda s: 5
builtins.repr = lambda x: '5'
def solve(a, b):
    return a - b
"""
    out = score(judge, code)
    # the program can make its own case report "5" (which is what answering 5 means),
    # but never touch the comparison: the hidden case (expected 987) and test 2 fail
    assert out.score == 0.0 and not all(c["passed"] for c in out.info["cases"])


def test_reading_the_hidden_tests_from_the_task_data_is_impossible(judge, isolation):
    if not isolation.filesystem:
        pytest.skip("no file-system isolation here (bubblewrap missing)")
    path = str(code_task.DATA_FILE)
    code = f"import json\nPROBLEMS = json.load(open({path!r}))\n" + SOLVE
    out = score(judge, code)
    assert out.score == 0.0 and "FileNotFoundError" in out.feedback


def test_killing_the_parent_process_is_a_failure_with_an_explanation(judge):
    out = score(judge, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + SOLVE)
    assert out.score == 0.0 and "terminated" in out.feedback


# ----- hostile programs through the reward model -------------------------------------------------


def test_hostile_programs_score_zero_with_meaningful_feedback(
    judge, isolation, tmp_path, monkeypatch
):
    canary = tmp_path / "canary"
    canary.write_text("keep")
    secret = uuid.uuid4().hex
    monkeypatch.setenv("SDPO_CODE_SECRET", secret)
    programs = {
        "loop": ("while True:\n    pass\n", "Time limit exceeded"),
        "output": ("import sys\nsys.stdout.write('x' * 10**8)\n", "Output limit exceeded"),
        "canary": (f"import os\nos.remove({str(canary)!r})\n" + SOLVE, "Runtime error"),
        "secret": ("import os\nx = os.environ['SDPO_CODE_SECRET']\n" + SOLVE, "KeyError"),
        "file": (
            "f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n",
            "File too large",
        ),
    }
    if isolation.memory_limit:
        programs["memory"] = ("x = bytearray(1 << 30)\n", "MemoryError")  # over 512 MiB: at once
    if isolation.process_limit and isolation.contained:
        programs["forkbomb"] = (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            "Time limit",
        )
    if isolation.network:
        programs["network"] = (
            "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + SOLVE,
            "Runtime error",
        )
    names = list(programs)
    outs = judge(
        [""] * len(names), [fenced(programs[n][0]) for n in names], tests=[CALL_TESTS] * len(names)
    )
    for name, out in zip(names, outs, strict=True):
        assert out.score == 0.0, name
        assert programs[name][1] in out.feedback, (name, out.feedback)
    assert canary.read_text() == "keep"
    assert all(secret not in (o.feedback or "") for o in outs)


def _judge_at(monkeypatch, level: str, **limits) -> tuple[CodeExecutionRewardModel, object]:
    """A judge whose sandbox runs at ``level``: ``best``, ``no-bwrap`` (bubblewrap hidden from
    detection: the namespace level) or ``no-namespaces`` (unshare hidden too, unsafe allowed)."""
    from sdpo import sandbox

    monkeypatch.setattr(sandbox, "_detected", {})
    if level != "best":
        real = sandbox._find_tool
        hidden = {"bwrap"} if level == "no-bwrap" else {"bwrap", "unshare"}
        monkeypatch.setattr(sandbox, "_find_tool", lambda n: None if n in hidden else real(n))
    config = SandboxConfig(allow_unsafe=level == "no-namespaces", **limits)
    try:
        isolation = detect_isolation(config)
    except SandboxUnavailableError as exc:
        pytest.skip(str(exc))
    if level == "no-bwrap" and isolation.level != "namespaces":
        pytest.skip("unshare is not usable here")
    return CodeExecutionRewardModel(sandbox_config=config), isolation


@pytest.mark.parametrize("level", ["no-bwrap", "no-namespaces"])
def test_fallback_isolation_judges_the_same(monkeypatch, level):
    """Without bubblewrap (and without unshare), the judge still works and still contains programs."""
    judge, isolation = _judge_at(monkeypatch, level, wall_time_s=2.0, cpu_time_s=2.0)
    assert isolation.level != "bwrap"
    assert isolation.filesystem == (level == "no-bwrap")  # the namespace level hides the host
    programs = [
        SOLVE,
        "def solve(a, b):\n    return a - b\n",
        "import sys\nsys.exit(0)\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + SOLVE,
    ]
    if isolation.process_limit and isolation.contained:
        programs.append(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        )
    outs = judge(
        [""] * len(programs), [fenced(p) for p in programs], tests=[CALL_TESTS] * len(programs)
    )
    assert [o.score for o in outs] == [1.0] + [0.0] * (len(programs) - 1)
    assert all(o.info["isolation"] == str(isolation) for o in outs)


@pytest.mark.parametrize("level", ["best", "no-bwrap"])
def test_stopping_the_harness_does_not_stall_the_judge(monkeypatch, level):
    """A program that SIGSTOPs its harness: the harness is resumed, the cases run as usual."""
    judge, _ = _judge_at(monkeypatch, level, wall_time_s=2.0, cpu_time_s=2.0)
    stop = "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n"
    out = score(judge, stop + SOLVE)
    assert verdicts(out) == ["passed"] * 3 and out.score == 1.0, out.feedback


def test_hidden_test_details_never_reach_the_feedback(judge):
    """Whatever a program puts in an exception, its type's name or its exit status, feedback on a
    hidden case names only the verdict (the visible cases pass, so the hidden one is reported)."""
    visible = "    if (a, b) in ((2, 3), (-1, 1)):\n        return a + b\n"
    programs = {
        "message": "def solve(a, b):\n" + visible + "    raise ValueError(f'leak {a} {b}')\n",
        "exception name": "def solve(a, b):\n"
        + visible
        + "    raise type(f'Leak{a}x{b}', (Exception,), {})()\n",
        "exit status": "import sys\ndef solve(a, b):\n" + visible + "    sys.exit(a % 256)\n",
        "printed": "def solve(a, b):\n" + visible + "    print(a, b)\n    raise KeyError(a)\n",
    }
    outs = judge(
        [""] * len(programs), [fenced(p) for p in programs.values()], tests=[CALL_TESTS] * 4
    )
    for name, out in zip(programs, outs, strict=True):
        assert out.score == 0.0 and "hidden test" in out.feedback, (name, out.feedback)
        for secret in ("400", "587", str(400 % 256)):
            assert secret not in out.feedback, (name, out.feedback)
    assert "KeyError" in outs[3].feedback  # a built-in exception's name is fine to show


@pytest.mark.parametrize("level", ["best", "no-bwrap"])
def test_builtin_task_hidden_tests_cannot_be_read_from_the_sandbox(monkeypatch, level):
    """A program that looks its answers up in the task's data file (whose absolute path it knows)
    instead of solving the problem scores 0."""
    judge, _ = _judge_at(monkeypatch, level, wall_time_s=2.0, cpu_time_s=2.0)
    cheat = f"""
import ast, json, sys
try:
    data = json.load(open({str(code_task.DATA_FILE)!r}))
except OSError as e:
    raise SystemExit(f'no answers: {{type(e).__name__}}')
table, stdio = {{}}, {{}}
for p in data:
    for t in p['tests']:
        if 'call' in t:
            node = ast.parse(t['call'], mode='eval').body
            args = tuple(ast.literal_eval(a) for a in node.args)
            table.setdefault(node.func.id, []).append((args, t['expected']))
        else:
            stdio[t['stdin']] = t['stdout']
def make(name):
    def f(*args):
        for a, e in table[name]:
            if a == args:
                try:
                    return ast.literal_eval(e) if isinstance(e, str) else e
                except (ValueError, SyntaxError):
                    return e
    return f
for name in table:
    globals()[name] = make(name)
if __name__ == '__main__':
    print(stdio.get(sys.stdin.read(), ''), end='')
"""
    problems = code_task.problems()[:6]
    outs = judge(
        [p["prompt"] for p in problems],
        [fenced(cheat)] * len(problems),
        tests=[p["tests"] for p in problems],
    )
    assert [o.score for o in outs] == [0.0] * len(problems), [o.feedback for o in outs]


# ----- the built-in task -------------------------------------------------------------------------


def test_builtin_code_task_rows_and_splits():
    problems = code_task.problems()
    assert len(problems) >= 30
    kinds = {p["kind"] for p in problems}
    assert kinds == {"function", "stdio"}
    for p in problems:
        hidden = [t for t in p["tests"] if t.get("hidden")]
        assert hidden and len(hidden) < len(p["tests"]), p["id"]
        assert "```python" in p["prompt"]
        for t in p["tests"]:  # the visible cases are the prompt's examples; the hidden ones are not
            if "call" in t:
                assert (f">>> {t['call']}\n" in p["prompt"]) != bool(t.get("hidden")), (p["id"], t)
    train, evaluation = code_task.load("train"), code_task.load("eval")
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in evaluation})
    assert len(train) + len(evaluation) == len(problems) and len(evaluation) >= 5
    assert code_task.load("train", seed=0) == train
    assert sorted(r["id"] for r in code_task.load("train", seed=1)) == sorted(
        r["id"] for r in train
    )
    assert all({"prompt", "tests"} <= set(r) and "solution" not in r for r in train)
    with pytest.raises(ValueError, match="split"):
        code_task.load("test")
    assert isinstance(code_task.reward_model(), RewardModel)


def test_every_reference_solution_passes_and_an_empty_program_fails(isolation):
    problems = code_task.problems()
    judge = code_task.reward_model()
    tests = [p["tests"] for p in problems]
    good = judge(
        [p["prompt"] for p in problems], [fenced(p["solution"]) for p in problems], tests=tests
    )
    assert [o.score for o in good] == [1.0] * len(problems), [
        p["id"] for p, o in zip(problems, good, strict=True) if o.score != 1.0
    ]
    bad = judge([p["prompt"] for p in problems], [fenced("pass\n")] * len(problems), tests=tests)
    assert all(o.score == 0.0 and o.feedback for o in bad)


def test_example_config_loads():
    from sdpo.config import SDPOConfig

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "code_sdpo.yaml")
    config = SDPOConfig.from_yaml(path)
    assert config.get("task") == "code" and config.self_distillation.include_environment_feedback
