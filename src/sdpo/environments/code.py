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
from sdpo.sandbox import SandboxConfig, detect_isolation, run_many

# Runs inside the sandbox as the program's judge. Reads <16-digit length><spec JSON> from stdin;
# the nonce that follows stays unread until every case is over.
HARNESS = r"""
import builtins, json, linecache, os, resource, select, signal, sys, time, traceback


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


spec = json.loads(read_exact(int(read_exact(16))))
try:
    import ctypes
    libc = ctypes.CDLL(None)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no reading this process through /proc
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans are reaped here
except Exception:
    pass
CAP = spec["max_output_bytes"]
SOURCE = spec["code"]
linecache.cache["<solution>"] = (len(SOURCE), None, SOURCE.splitlines(True), "<solution>")


def clip(text, limit):
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def user_traceback(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<solution>"]
    head = ["Traceback (most recent call last):\n"] + traceback.format_list(frames) if frames else []
    return clip("".join(head + traceback.format_exception_only(type(exc), exc)), 8000)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def finish(record):
    record["nonce"] = read_exact(64).decode()
    write_all(1, (json.dumps(record) + "\n").encode())
    os._exit(0)


def child(case, code, inp, out_w, err_w, rep_w):
    os.setpgid(0, 0)
    for src, dst in ((inp, 0), (out_w, 1), (err_w, 2), (rep_w, 3)):
        os.dup2(src, dst)
    os.closerange(4, 1 << 16)  # the harness's own channel was fd 1, replaced above
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.argv = ["solution.py"]
    namespace = {"__name__": "__main__" if "stdin" in case else "solution", "__builtins__": builtins}
    report = {"status": "ok"}
    try:
        exec(code, namespace)
        if "call" in case:
            value = repr(eval(compile(case["call"], "<test>", "eval"), namespace))
            report["repr"] = value[:CAP]
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        report = {"status": "exit", "exit_code": status}
    except BaseException as exc:
        try:
            report = {"status": "error", "error_type": type(exc).__name__, "traceback": user_traceback(exc)}
        except BaseException:
            report = {"status": "error", "error_type": "MemoryError", "traceback": "MemoryError"}
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        write_all(3, json.dumps(report).encode())
    except BaseException:
        pass


def spawn(case, code):
    try:
        inp = os.memfd_create("stdin")
    except (AttributeError, OSError):
        inp = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)
    write_all(inp, case.get("stdin", "").encode())
    os.lseek(inp, 0, 0)
    pipes = [os.pipe() for _ in range(3)]
    for attempt in range(200):  # the previous case's processes may still hold the process limit
        try:
            pid = os.fork()
            break
        except BlockingIOError:
            time.sleep(0.01)
    else:
        raise OSError("fork failed")
    if pid == 0:
        try:
            child(case, code, inp, *(w for _, w in pipes))
        finally:
            os._exit(0)
    os.close(inp)
    for _, w in pipes:
        os.close(w)
    return pid, [r for r, _ in pipes]


def run_case(case, code):
    start = time.monotonic()
    deadline = start + spec["case_wall_s"]
    pid, (out_r, err_r, rep_r) = spawn(case, code)
    caps = {out_r: CAP, err_r: 16384, rep_r: CAP + 65536}
    bufs = {fd: bytearray() for fd in caps}
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    open_fds = set(bufs)
    status, exited_at, over, timed_out = None, None, False, False
    while True:
        now = time.monotonic()
        if status is None:
            done, st, usage = os.wait4(pid, os.WNOHANG)
            if done:
                status, exited_at = st, now
        if status is not None and (not open_fds or now - exited_at > 0.05):
            break  # finished (or something it left behind holds the pipes; killed below)
        if over:
            break
        if now >= deadline:
            timed_out = True
            break
        watch = list(open_fds)
        if pidfd is not None and status is None:
            watch.append(pidfd)  # readable once the child exits
        wait = deadline - now if pidfd is not None and status is None else min(deadline - now, 0.01)
        if not watch:
            time.sleep(wait)
            continue
        for fd in select.select(watch, [], [], wait)[0]:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                continue
            room = caps[fd] - len(bufs[fd])
            bufs[fd] += chunk[: max(room, 0)]
            over = over or (fd == out_r and len(chunk) > room)
    duration = time.monotonic() - start
    try:
        if spec["kill_all"]:
            os.kill(-1, signal.SIGKILL)  # every other process of this sandbox (not this one, not init)
        else:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # nothing left to kill
    if status is None:
        _, status, usage = os.wait4(pid, 0)
    while True:  # reap what the case left behind (this process is their subreaper)
        try:
            if os.waitpid(-1, 0 if spec["kill_all"] else os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    for fd in [out_r, err_r, rep_r] + ([pidfd] if pidfd is not None else []):
        os.close(fd)
    out = bytes(bufs[out_r]).decode("utf-8", "replace")
    record = {"duration_s": round(duration, 4), "stdout": out, "output_truncated": over,
              "stderr": clip(bytes(bufs[err_r]).decode("utf-8", "replace"), 4000)}
    try:
        report = json.loads(bytes(bufs[rep_r]))
        if not isinstance(report, dict):
            report = {}
    except ValueError:
        report = {}
    # The CPU-time limit: SIGXCPU at the soft limit, SIGKILL at the hard one (SIGXCPU ignored).
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    soft = resource.getrlimit(resource.RLIMIT_CPU)[0]
    cpu_used = usage.ru_utime + usage.ru_stime
    cpu_limit = sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and soft != resource.RLIM_INFINITY and cpu_used >= soft - 0.05
    )
    if timed_out or cpu_limit:  # the wall-clock deadline or the CPU-time limit, whichever came first
        record["status"] = "timeout"
    elif over:
        record["status"] = "output_limit"
    elif os.WIFSIGNALED(status):
        record["status"] = "signal"
        record["signal"] = signal.Signals(os.WTERMSIG(status)).name
    elif report.get("status") in ("ok", "exit", "error"):
        record["status"] = report["status"]
        for key in ("repr", "error_type", "traceback"):
            if isinstance(report.get(key), str):
                record[key] = report[key]
        if isinstance(report.get("exit_code"), int):
            record["exit_code"] = report["exit_code"]
    else:
        record["status"] = "no_report"
        record["exit_code"] = os.waitstatus_to_exitcode(status)
    return record


try:
    solution = compile(SOURCE, "<solution>", "exec")
except BaseException as exc:
    finish({"compile_error": clip("".join(traceback.format_exception_only(type(exc), exc)), 4000)})
results = []
for case in spec["cases"]:
    if spec["stop_after_timeout"] and any(r["status"] == "timeout" for r in results):
        results.append({"status": "not_run", "duration_s": 0.0})
        continue
    results.append(run_case(case, solution))
finish({"cases": results})
"""

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
