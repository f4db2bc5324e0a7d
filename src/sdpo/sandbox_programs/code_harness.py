
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
