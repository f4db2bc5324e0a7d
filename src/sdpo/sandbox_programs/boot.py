
import os, resource, signal, sys
spec = eval(sys.argv[1], {"__builtins__": {}})  # literals written by sandbox.py (no json: faster)
with open("/proc/self/status") as f:
    nnp = "NoNewPrivs:\t1" in f.read()  # bubblewrap sets it
if True:  # prctl (the parent-death signal) is needed at every level
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception as exc:
        sys.stderr.write(f"sandbox: ctypes is unavailable ({exc}); cannot isolate\n")
        os._exit(126)


def fail(what):
    sys.stderr.write(f"sandbox: {what}: {os.strerror(ctypes.get_errno())}\n")
    os._exit(126)


def private_root(fs, main):
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE, REC = 1, 2, 4, 8, 32, 4096, 8192, 16384
    PRIVATE = 1 << 18
    kept = {1024: 1024, 2048: 2048, 4096: 1 << 21, NOEXEC: NOEXEC}  # statvfs -> mount flags

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda v: None if v is None else v.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
            fail(f"mount {dst}")

    def bind(src, dst, readonly=True):
        if os.path.isdir(src):
            os.makedirs(dst, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            open(dst, "a").close()
        mount(src, dst, None, BIND)
        if readonly:  # flags a user namespace may not clear (noexec, atime) are kept
            have = os.statvfs(dst).f_flag
            extra = sum(flag for st, flag in kept.items() if have & st)
            mount(None, dst, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | extra)

    mount(None, "/", None, REC | PRIVATE)
    top = fs["workdir"]  # the host's empty working directory: covered here by a private tmpfs
    mount("tmpfs", top, "tmpfs", NOSUID | NODEV, f"size={fs['size']},mode=0755")
    root = top + "/root"
    os.mkdir(root, 0o755)
    mount(root, root, None, BIND)  # a mount point, so that it can be moved to / below
    for target, link in fs["symlinks"]:
        os.symlink(target, root + link)
    for path in fs["dirs"]:
        os.makedirs(root + path, 0o755, exist_ok=True)
    for path in fs["binds"]:
        bind(path, root + path)
    for path in fs["hide"]:
        mount("tmpfs", root + path, "tmpfs", RDONLY | NOSUID | NODEV, "size=4k,mode=0555")
    os.makedirs(root + "/dev", 0o755)
    for dev in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists("/dev/" + dev):
            bind("/dev/" + dev, root + "/dev/" + dev, readonly=False)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", root + "/dev/fd")
    os.mkdir(root + "/proc", 0o755)
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    for inside in ("/sandbox", "/tmp", "/var/tmp", "/dev/shm"):  # writable: one capped tmpfs
        scratch = top + "/w" + inside.replace("/", "_")
        os.makedirs(scratch)
        os.chmod(scratch, 0o1777)
        os.makedirs(root + inside, 0o755, exist_ok=True)
        bind(scratch, root + inside, readonly=False)
    if main is not None:
        with open(top + "/w_sandbox/main.py", "wb") as f:
            f.write(main)
        os.chmod(top + "/w_sandbox/main.py", 0o444)
    mount(None, root, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    os.chdir(root)
    mount(root, "/", None, MOVE)
    os.chroot(".")
    os.chdir("/sandbox")


os.umask(0o022)
if spec["fs"]:
    main = None
    if spec["tail"][0] == "code":
        with open("main.py", "rb") as f:
            main = f.read()
    private_root(spec["fs"], main)
R = resource
cpu = spec["cpu"]
if cpu > 0:
    R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
R.setrlimit(R.RLIMIT_AS, (spec["mem"], spec["mem"]))
R.setrlimit(R.RLIMIT_FSIZE, (spec["fsize"], spec["fsize"]))
R.setrlimit(R.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
R.setrlimit(R.RLIMIT_CORE, (0, 0))
R.setrlimit(R.RLIMIT_NOFILE, (spec["nofile"], spec["nofile"]))
uid = spec["uid"]
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid,) * 4:
        os._exit(125)
elif spec["drop_caps"]:  # root of a user namespace: keep the uid, lose every capability
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            fail("dropping capabilities")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        fail("capset")
if not nnp and libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs")
# Die with the trainer, whatever kills it (SIGKILL included). The trainer holds the write end of
# a pipe whose read end is spec["death_fd"]: end of file means the trainer is gone. Then, as PID 1
# of a namespace, leaving takes every process of the run with it; without a PID namespace, with a
# uid of its own, kill(-1) reaches every process of that uid (daemonized ones included). The
# parent-death signal is a second line (the uid drop above cleared the one bwrap/unshare set; a
# parent without CAP_KILL, like bwrap as root, cannot deliver it across uids, hence the pipe).
def leave_with_everything(code):
    if os.getpid() != 1 and uid >= 0:
        os.kill(-1, signal.SIGKILL)  # not this process itself (Linux)
    elif os.getpid() != 1:
        os.killpg(0, signal.SIGKILL)
    os._exit(code)


death_fd = spec["death_fd"]
if os.getpid() != 1 and uid >= 0:  # no namespace to take down: SIGKILL would skip the kill(-1)
    signal.signal(signal.SIGHUP, lambda *a: leave_with_everything(137))
    libc.prctl(1, signal.SIGHUP, 0, 0, 0)  # PR_SET_PDEATHSIG
else:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *a: None)  # wakes select() below through wake_w
namespace_init = os.getpid() == 1
child = os.fork()
if child == 0:  # the program: none of the supervisor's descriptors, default signals
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    for fd in (wake_r, wake_w, death_fd):
        os.close(fd)
    # Not with a uid of its own and no PID namespace: there the judge's harness kill(-1)s its
    # own leftovers, the supervisor included, and must survive that; the supervisor's kill(-1)
    # (or, if the program killed the supervisor, the next start's clean-up) reaches it instead.
    if namespace_init or uid < 0:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
if child:
    import select
    # The supervisor: resumes the program when something stops it, reaps orphans (as PID 1), and
    # leaves (taking a PID namespace down) with the program, reporting a signal as 128 + number.
    while True:
        ready = select.select([death_fd, wake_r], [], [])[0]
        if death_fd in ready and not os.read(death_fd, 1):
            leave_with_everything(137)
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WUNTRACED | os.WNOHANG)
            except ChildProcessError:
                os._exit(125)
            if pid == 0:
                break
            if pid != child:
                continue
            if os.WIFSTOPPED(status):
                os.kill(child, signal.SIGCONT)
                continue
            if os.WIFEXITED(status):
                os._exit(os.WEXITSTATUS(status))
            sig = os.WTERMSIG(status)
            if sig == signal.SIGKILL and cpu > 0 and usage.ru_utime + usage.ru_stime >= cpu - 0.05:
                sig = signal.SIGXCPU  # the hard CPU limit: SIGXCPU was ignored
            os._exit(128 + sig)
tail = spec["tail"]
if tail[0] == "exec":
    try:
        os.execvp(tail[1], tail[1:])
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot execute {tail[1]!r}: {e}\n")
        os._exit(127)
import builtins
with open("main.py", "rb") as f:
    code = compile(f.read(), "main.py", "exec")
del os, resource, R, cpu, uid, f, spec, tail, child, nnp, signal, death_fd, wake_r, wake_w
del namespace_init
del leave_with_everything
libc = ctypes = None
sys.argv = ["main.py"]
g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
try:
    exec(code, g)
except SystemExit:
    raise
except BaseException as e:
    e.__traceback__ = e.__traceback__.tb_next  # hide this boot frame
    sys.excepthook(type(e), e, e.__traceback__)
    sys.exit(1)
