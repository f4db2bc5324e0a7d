"""Code execution with judge-style feedback: run the completion's program against its tests.

A row's ``tests`` column holds the cases, each one of::

    {"stdin": "2 3\\n", "stdout": "5\\n"}             # output compared, whitespace normalized
    {"call": "solve(2, 3)", "expected": "5"}          # compared as Python literals
    {..., "hidden": true}                              # never shown in feedback

What feedback may reveal of a hidden test: its verdict (wrong answer, timeout, output limit, a
runtime error with a built-in exception's name, a kill by a resource limit), never its input,
expected output, the program's output or traceback, or the exit status: nothing the program can
fill with what it read. (A program can still signal a few bits by which verdict it provokes.)

How a run cannot fake a pass: one sandboxed process (:mod:`sdpo.sandbox`) runs a trusted harness,
which compiles the program and runs each case in a child process of its own. The program never sees
an expected value: a child reports only what it printed or the ``repr`` of what the call returned,
and the comparison happens here, in the parent. The children lose the harness's channel (its stdout)
before any of the program's code runs, the harness is not dumpable (no reading its memory or fds
through ``/proc``), and it reads the run's random nonce only after the last child is dead, then
writes one record carrying it. Anything else (no record, a malformed one, a wrong nonce, an early
``sys.exit(0)`` or ``os._exit(0)``) counts as failure.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import math
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from sdpo.reward_model import Prompt, RewardModel, RewardOutput, _column, _text, extract_code
from sdpo.sandbox import SandboxConfig, detect_isolation, run_many, sandbox_program

# Runs inside the sandbox as the program's judge. Reads <16-digit length><spec JSON> from stdin;
# the nonce that follows stays unread until every case is over.
HARNESS = sandbox_program("code_harness.py")

_NO_CODE = "No code block found. Put the complete solution in one ```python ... ``` block."
_VERDICTS = {
    "timeout": "timeout",
    "output_limit": "output_limit",
    "signal": "killed",
    "error": "runtime_error",
    "exit": "exited",
    "no_report": "exited",
    "not_run": "not_run",
}
_SIGNALS = {
    "SIGSEGV": "a segmentation fault (often a stack overflow from very deep recursion)",
    "SIGKILL": "SIGKILL (often memory exhaustion)",
    "SIGXCPU": "the CPU-time limit",
    "SIGXFSZ": "the file-size limit (the program wrote too large a file)",
    "SIGABRT": "an abort (often memory exhaustion)",
}


# Exception names that feedback on a hidden test may show (a program can name its own classes).
_BUILTIN_ERRORS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


def normalize_output(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed, outer blank lines dropped: how stdout is compared."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def _literal(text: Any) -> tuple[bool, Any]:
    """(parsed, value): ``text`` as a Python literal when it is one."""
    if not isinstance(text, str):
        return True, text  # already a value (a JSON number or list in the tests column)
    try:
        return True, ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, text.strip()


def literal_equal(a: Any, b: Any) -> bool:
    """``a == b`` for literals, with floats compared at relative tolerance 1e-6."""
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and (isinstance(a, float) or isinstance(b, float))
    ):
        try:
            return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        except OverflowError:  # an int too large for a float
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(literal_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(literal_equal(a[k], b[k]) for k in a)
    return a == b


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how much was cut."""
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


@dataclasses.dataclass
class _Case:
    """One test case, validated."""

    index: int
    hidden: bool
    stdin: str | None = None  # stdin/stdout style
    stdout: str | None = None
    call: str | None = None  # call style
    expected: Any = None

    @property
    def shown_input(self) -> str:
        return self.call if self.call is not None else self.stdin or ""

    @property
    def shown_expected(self) -> str:
        return self.stdout if self.call is None else str(self.expected)

    def verdict(self, record: dict[str, Any]) -> str:
        """Judge what the run produced against the expected value (here, never inside the sandbox).

        One of passed, wrong_answer, runtime_error, timeout, output_limit, killed, exited, not_run,
        judge_error.
        """
        status = record.get("status")
        finished = status == "ok" or (
            self.call is None and status in ("no_report", "exit") and record.get("exit_code") == 0
        )
        if not finished:
            return _VERDICTS.get(status, "judge_error")
        if self.call is None:
            same = normalize_output(record.get("stdout", "")) == normalize_output(self.stdout)
        elif not isinstance(record.get("repr"), str):
            same = False
        else:
            (ok_a, actual), (ok_e, expected) = _literal(record["repr"]), _literal(self.expected)
            same = (
                literal_equal(actual, expected)
                if ok_a and ok_e
                else actual == str(expected).strip()
            )
        return "passed" if same else "wrong_answer"


def _parse_cases(tests: Any, row: int) -> list[_Case]:
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as exc:
            raise ValueError(
                f"Row {row}: the tests column is a string but not JSON ({exc}): {tests!r:.200}. "
                "Give a list of cases, or a JSON string of one."
            ) from None
    if not isinstance(tests, list) or not tests:
        raise ValueError(
            f"Row {row}: the tests column must be a non-empty list of cases, got {tests!r:.200}."
        )
    cases = []
    for i, t in enumerate(tests):
        hidden = bool(t.get("hidden", False)) if isinstance(t, dict) else False
        if isinstance(t, dict) and "stdin" in t and "stdout" in t:
            cases.append(_Case(i, hidden, stdin=str(t["stdin"]), stdout=str(t["stdout"])))
        elif isinstance(t, dict) and "call" in t and "expected" in t:
            cases.append(_Case(i, hidden, call=str(t["call"]), expected=t["expected"]))
        else:
            raise ValueError(
                f"Row {row}, test {i}: a case needs 'stdin' and 'stdout', or 'call' and 'expected'; got {t!r:.200}."
            )
    # visible cases first: they give the feedback, and a timeout stops the rest
    return sorted(cases, key=lambda c: c.hidden)


class CodeExecutionRewardModel(RewardModel):
    """Runs the completion's code against the row's tests in the sandbox; judge-style feedback.

    Args:
        tests_column: column with each row's test cases (a list, or its JSON text).
        score: ``binary`` (1.0 only when every case passes) or ``fraction`` (share passed).
        feedback_max_chars: cap of the feedback text (longer fields are cut with a marker).
        code_extractor: completion text -> code, or None when there is none (default: the longest
            fenced Python block).
        sandbox_config: limits per test case (``wall_time_s`` and ``cpu_time_s`` apply to each
            case; ``max_output_bytes`` to each case's stdout); default 4 s, 512 MiB, 64 KiB.
        max_workers: programs run in parallel (default: the CPU count).

    After a case times out, the remaining cases are not run and count as failed (as on a judge),
    so an endless loop costs one time limit, not one per case.
    """

    name = "code_execution"

    def __init__(
        self,
        tests_column: str = "tests",
        score: str = "binary",
        feedback_max_chars: int = 2000,
        code_extractor: Callable[[str], str | None] = extract_code,
        sandbox_config: SandboxConfig | None = None,
        max_workers: int | None = None,
    ) -> None:
        if score not in ("binary", "fraction"):
            raise ValueError(f"score must be 'binary' or 'fraction', got {score!r}.")
        self.tests_column = tests_column
        self.score = score
        self.feedback_max_chars = feedback_max_chars
        self.code_extractor = code_extractor
        self.sandbox_config = sandbox_config or SandboxConfig(
            wall_time_s=4.0, cpu_time_s=4.0, max_output_bytes=64 << 10
        )
        self.max_workers = max_workers

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        n = len(completions)
        tests = _column(type(self).__name__, columns, [self.tests_column], n)
        cases = [_parse_cases(t, i) for i, t in enumerate(tests)]
        codes = [self.code_extractor(_text(c)) for c in completions]
        runs = self._run([(codes[i], cases[i]) for i in range(n) if codes[i] is not None])
        outputs = []
        for code, row_cases in zip(codes, cases, strict=True):
            if code is None:
                info = {
                    "code_found": False,
                    "num_tests": len(row_cases),
                    "num_passed": 0,
                    "cases": [],
                }
                outputs.append(RewardOutput(0.0, _NO_CODE, info))
            else:
                outputs.append(self._grade(row_cases, *next(runs)))
        return outputs

    def _run(self, programs: list[tuple[str, list[_Case]]]) -> Iterator[tuple[dict | None, str]]:
        """Run each (code, cases) through the harness, in parallel: (trusted record or None, isolation)."""
        if not programs:
            return iter(())
        config = self._run_config(max(len(cases) for _, cases in programs))
        contained = detect_isolation(config).contained
        nonces = [secrets.token_hex(32) for _ in programs]
        stdins = [
            self._harness_input(code, cases, contained, nonce)
            for (code, cases), nonce in zip(programs, nonces, strict=True)
        ]
        results = run_many([HARNESS] * len(programs), stdins, config, max_workers=self.max_workers)
        return (
            (_read_record(r.stdout, nonce, len(cases), r.output_truncated), r.isolation)
            for (_, cases), nonce, r in zip(programs, nonces, results, strict=True)
        )

    def _run_config(self, num_cases: int) -> SandboxConfig:
        """The harness run's limits: the per-case limits hold inside it (enforced by the harness)."""
        cfg = self.sandbox_config
        return dataclasses.replace(
            cfg,
            wall_time_s=num_cases * (cfg.wall_time_s + 0.5) + 10.0,  # a backstop only
            max_processes=cfg.max_processes + 1,  # the harness itself
            max_output_bytes=16 * num_cases * (cfg.max_output_bytes + 16384) + (1 << 20),  # JSON
        )

    def _harness_input(self, code: str, cases: list[_Case], kill_all: bool, nonce: str) -> bytes:
        spec = {
            "code": code,
            "cases": [{"stdin": c.stdin} if c.call is None else {"call": c.call} for c in cases],
            "case_wall_s": self.sandbox_config.wall_time_s,
            "max_output_bytes": self.sandbox_config.max_output_bytes,
            "kill_all": kill_all,
            "stop_after_timeout": True,
        }
        data = json.dumps(spec).encode()
        return f"{len(data):016d}".encode() + data + nonce.encode()

    def _grade(
        self, cases: list[_Case], record: dict[str, Any] | None, isolation: str
    ) -> RewardOutput:
        info: dict[str, Any] = {"code_found": True, "num_tests": len(cases), "isolation": isolation}
        if record is None:
            records = [{"status": "judge_error", "duration_s": 0.0}] * len(cases)
        elif "compile_error" in record:
            info.update(num_passed=0, cases=[], compile_error=True)
            return RewardOutput(
                0.0, self._cap("Syntax error:\n" + str(record["compile_error"])), info
            )
        else:
            records = record["cases"]
        verdicts = [case.verdict(rec) for case, rec in zip(cases, records, strict=True)]
        info["num_passed"] = sum(v == "passed" for v in verdicts)
        info["cases"] = [
            {
                "index": c.index,
                "hidden": c.hidden,
                "passed": v == "passed",
                "verdict": v,
                "timed_out": v == "timeout",
                "error_type": r.get("error_type") or r.get("signal"),
                "duration_s": r.get("duration_s", 0.0),
            }
            for c, r, v in zip(cases, records, verdicts, strict=True)
        ]
        info["cases"].sort(key=lambda d: d["index"])
        frac = info["num_passed"] / len(cases)
        score = frac if self.score == "fraction" else float(frac == 1.0)
        if frac == 1.0:
            return RewardOutput(score, None, info)
        if record is None:
            feedback = (
                "The judge's test runner was terminated before it could report (did the program "
                "kill its parent process, or exhaust the process or memory limit?). No test passed."
            )
            return RewardOutput(score, feedback, info)
        return RewardOutput(score, self._feedback(cases, records, verdicts), info)

    def _feedback(
        self, cases: list[_Case], records: list[dict[str, Any]], verdicts: list[str]
    ) -> str:
        field_cap = max(100, self.feedback_max_chars // 5)
        for case, rec, verdict in zip(cases, records, verdicts, strict=True):
            if verdict in ("passed", "wrong_answer", "not_run"):
                continue
            where = "a hidden test" if case.hidden else f"test {case.index + 1}"
            shown = "" if case.hidden else f"Input:\n{_clip(case.shown_input, field_cap)}\n"
            if verdict == "timeout":
                head = (
                    f"Time limit exceeded on {where} (limit {self.sandbox_config.wall_time_s:g} s)."
                )
                return self._cap(f"{head}\n{shown}")
            if verdict == "output_limit":
                return self._cap(
                    f"Output limit exceeded on {where}: more than {self.sandbox_config.max_output_bytes} bytes.\n{shown}"
                )
            if verdict == "killed":
                default = "a signal" if case.hidden else f"signal {rec.get('signal')}"
                why = _SIGNALS.get(rec.get("signal", ""), default)
                return self._cap(
                    f"Runtime error on {where}: the program was killed by {why}.\n{shown}"
                )
            if case.hidden and verdict in ("runtime_error", "exited"):
                # Nothing the program chose (message, traceback, exit status, exception name)
                # may carry a hidden test's input back into the feedback.
                name = rec.get("error_type")
                kind = name if verdict == "runtime_error" and name in _BUILTIN_ERRORS else None
                what = (
                    f"an uncaught {kind}"
                    if kind
                    else (
                        "an uncaught exception" if verdict == "runtime_error" else "a non-zero exit"
                    )
                )
                return self._cap(
                    f"Runtime error on {where}: {what} (details of hidden tests are not shown)."
                )
            if verdict == "runtime_error":
                tb = _clip(rec.get("traceback", rec.get("error_type", "")), 2 * field_cap)
                return self._cap(f"Runtime error on {where}:\n{shown}{tb}")
            if verdict == "exited" and case.call is not None:
                call = "the function" if case.hidden else f"`{_clip(case.call, field_cap)}`"
                return self._cap(
                    f"The program exited (exit status {rec.get('exit_code')}) before {call} returned "
                    f"on {where}: define the function without exiting."
                )
            if verdict == "exited":
                return self._cap(
                    f"Runtime error on {where}: exit status {rec.get('exit_code')}.\n{shown}"
                )
            return self._cap(f"The judge could not run {where}.")
        # only wrong answers: the two shortest failing visible cases, the hidden ones only counted
        failing = [
            (c, r) for c, r, v in zip(cases, records, verdicts, strict=True) if v == "wrong_answer"
        ]
        visible = sorted(
            (cr for cr in failing if not cr[0].hidden),
            key=lambda cr: len(cr[0].shown_input) + len(cr[0].shown_expected),
        )
        hidden = sum(c.hidden for c, _ in failing)
        parts = []
        for case, rec in sorted(visible[:2], key=lambda cr: cr[0].index):
            output = rec.get("stdout", "") if case.call is None else rec.get("repr", "")
            parts.append(
                f"Wrong answer on test {case.index + 1}:\nInput:\n{_clip(case.shown_input, field_cap)}\n"
                f"Output:\n{_clip(output, field_cap)}\nExpected:\n{_clip(case.shown_expected, field_cap)}"
            )
        if hidden:
            total = sum(c.hidden for c in cases)
            parts.append(f"Wrong answer on {hidden} of {total} hidden tests.")
        return self._cap("\n\n".join(parts))

    def _cap(self, text: str) -> str:
        text = text.rstrip()
        if len(text) <= self.feedback_max_chars:
            return text
        marker = "\n... [feedback truncated]"
        return text[: self.feedback_max_chars - len(marker)] + marker


def _read_record(stdout: str, nonce: str, n_cases: int, truncated: bool) -> dict[str, Any] | None:
    """The harness's record, if it is complete, well formed and carries this run's nonce."""
    lines = stdout.split("\n")
    if truncated or len(lines) != 2 or lines[1]:
        return None
    try:
        record = json.loads(lines[0])
    except ValueError:
        return None
    if not isinstance(record, dict) or not secrets.compare_digest(str(record.get("nonce")), nonce):
        return None
    if "compile_error" in record:
        return record
    cases = record.get("cases")
    if not isinstance(cases, list) or len(cases) != n_cases:
        return None
    if not all(isinstance(c, dict) and isinstance(c.get("status"), str) for c in cases):
        return None
    return record
