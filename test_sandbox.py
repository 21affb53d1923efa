"""Adversarial suite for sandbox.py: one hostile (or normal) behaviour per test, run against the real sandbox in every
isolation mode that claims to contain it. Network traffic goes to 127.0.0.1 only."""
import json, os, resource, signal, socket, statistics, subprocess, sys, textwrap, threading, time, uuid
import pytest
import sandbox

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="per-task uids (kill by uid, NPROC, unreadable files) need root")


@pytest.fixture(params=sandbox.MODES)
def mode(request, monkeypatch):
    if not sandbox._available(request.param):
        pytest.skip(f"{request.param} is not available on this machine")
    monkeypatch.setenv("W4S_SANDBOX", request.param)
    return request.param


def run(code, arg=None, entry="f", **kw):
    return sandbox.run_once(textwrap.dedent(code), entry, arg, **{"timeout": 3.0, **kw})


def processes_of(uid, wait=1.0):
    """Host pids whose real uid is `uid` (the sandbox gives every task its own), after giving the zygote `wait`
    seconds to reap the ones it has already SIGKILLed."""
    deadline = time.monotonic() + wait
    while True:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                continue
            if int(status.split("Uid:")[1].split()[0]) == uid:
                pids.append(int(pid))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.02)


# -- normal behaviour ---------------------------------------------------------------------------------------------
def test_returns_value(mode):
    out = run("def f(x):\n    print('hi')\n    return {'twice': x * 2}", 21)
    assert out.ok and out.value == {"twice": 42} and out.error == "" and out.stdout == "hi\n"


def test_rpc_round_trip(mode):
    out = run("def f(x):\n    return rpc('add', {'a': x, 'b': 2})", 40, rpc=lambda m, p: p["a"] + p["b"])
    assert out.ok and out.value == 42


def test_rpc_handler_error_is_runtime_error_in_workflow(mode):
    def handler(method, params):
        raise ValueError("budget exhausted")
    out = run("def f(x):\n    try:\n        rpc('llm', {})\n    except RuntimeError as e:\n        return str(e)",
              rpc=handler)
    assert out.ok and out.value == "budget exhausted"


def test_traceback_shows_only_workflow_lines(mode):
    out = sandbox.run_once("x = 1\n\ndef g():\n    return 1 / 0\n\ndef f(a):\n    return g()\n", "f", None,
                           prelude="def helper():\n    pass\n", timeout=3)
    assert not out.ok and out.error.startswith("ZeroDivisionError: division by zero")
    assert 'File "workflow.py", line 7, in f' in out.error and 'File "workflow.py", line 4, in g' in out.error
    assert "sandbox" not in out.error and "<string>" not in out.error


def test_syntax_error_names_the_line(mode):
    out = run("def f(x):\n    return (\n")
    assert not out.ok and out.error.startswith("SyntaxError") and 'workflow.py", line 2' in out.error


def test_many_threads_at_once(mode):
    with sandbox.Sandbox("import time\ndef f(x):\n    time.sleep(0.05)\n    return rpc('id', {'x': x})") as box:
        results = [None] * 32
        def one(i):
            results[i] = box.run("f", i, rpc=lambda m, p: p["x"], timeout=10)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [r.value for r in results] == list(range(32)), [r.error for r in results if not r.ok]


# -- time ---------------------------------------------------------------------------------------------------------
def test_infinite_loop_times_out(mode):
    out = run("def f(x):\n    while True:\n        pass", timeout=1)
    assert not out.ok and out.error == "timeout after 1s" and out.seconds < 1 + sandbox.CLEANUP_GRACE


def test_sigterm_ignored_loop_times_out(mode):
    out = run("import signal\ndef f(x):\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    while True:\n"
              "        pass", timeout=1)
    assert not out.ok and out.error.startswith("timeout") and out.seconds < 1 + sandbox.CLEANUP_GRACE


def test_sleep_past_deadline(mode):
    out = run("import time\ndef f(x):\n    time.sleep(60)", timeout=1)
    assert not out.ok and out.error.startswith("timeout") and out.seconds < 1 + sandbox.CLEANUP_GRACE


# -- processes ----------------------------------------------------------------------------------------------------
@needs_root
def test_fork_bomb_is_capped_and_killed(mode):
    out = run("""
        import os
        def f(x):
            print(os.getuid(), flush=True)
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """, timeout=2)
    assert not out.ok and out.error.startswith("timeout")
    uid = int(out.stdout.split()[0])
    assert processes_of(uid) == []


@needs_root
def test_detached_grandchild_dies_with_task(mode):
    out = run("""
        import os, time
        def f(x):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    open('alive', 'w').close()
                    time.sleep(600)
                os._exit(0)
            while not os.path.exists('alive'):
                time.sleep(0.01)
            return os.getuid()
        """)
    assert out.ok and processes_of(out.value) == []


def test_threads_die_after_return(mode):
    out = run("""
        import os, threading, time
        def spin():
            while True:
                time.sleep(0.01)
        def f(x):
            threading.Thread(target=spin).start()
            return os.getuid()
        """)
    assert out.ok and out.seconds < 2
    if ROOT:
        assert processes_of(out.value) == []


@needs_root  # without root, in rlimits mode a task shares our uid and could really kill us
def test_kill_parent_fails(mode):
    out = run("""
        import os, signal
        def f(parent):
            killed = 0
            for pid in (os.getppid(), parent):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
            return killed
        """, os.getpid())
    assert out.ok and out.value == 0  # and this process is still here to check it


# -- memory, disk, output -----------------------------------------------------------------------------------------
def test_50gb_allocation_fails(mode):
    out = run("def f(x):\n    return len(bytearray(50 * 2**30))")
    assert not out.ok and out.error.startswith("MemoryError")


def test_10gb_file_fails(mode):
    out = run("""
        def f(x):
            with open('big', 'wb') as fh:
                for _ in range(10 * 1024):
                    fh.write(b'x' * 2**20)
        """)
    assert not out.ok and "File too large" in out.error


def test_print_flood_keeps_parent_memory_flat(mode):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run("import sys\ndef f(x):\n    for _ in range(1024):\n        sys.stdout.write('x' * 2**20)\n"
              "    return 'done'", timeout=3)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 64 * 1024 and len(out.stdout) < sandbox.OUTPUT_CAP + 100


# -- the channel --------------------------------------------------------------------------------------------------
def test_forged_result_on_stdout_is_ignored(mode):
    out = run("def f(x):\n    print('{\"result\": \"forged\"}')\n    print('garbage \\x00 {')\n    return 'real'")
    assert out.ok and out.value == "real"


def test_garbage_on_rpc_fd_fails_the_task(mode):
    out = run("import os\ndef f(x):\n    os.write(3, b'garbage\\n')\n    return 'real'")
    assert not out.ok and out.error.startswith("protocol error")


def test_forged_result_on_rpc_fd_fails_the_task(mode):
    out = run("import os\ndef f(x):\n    os.write(3, b'{\"result\": \"forged\"}\\n')\n    return 'real'")
    assert not out.ok and out.error.startswith("protocol error")


def test_malformed_rpc_request_fails_the_task(mode):
    out = run("import os\ndef f(x):\n    os.write(3, b'{\"rpc\": 1, \"params\": []}\\n')\n    return 1", rpc=print)
    assert not out.ok and out.error.startswith("protocol error")


def test_endless_line_on_rpc_fd_fails_the_task(mode):
    out = run("import os\ndef f(x):\n    os.write(3, b'x' * (3 << 20))\n    return 1")
    assert not out.ok and "message over" in out.error


def test_rpc_call_cap(mode):
    out = run("def f(x):\n    for i in range(10000):\n        rpc('llm', {'i': i})", rpc=lambda m, p: "ok",
              max_calls=100)
    assert not out.ok and out.error == "too many rpc calls (cap 100)"


# -- secrets, network, files --------------------------------------------------------------------------------------
def test_planted_key_is_invisible(mode):
    hunt = textwrap.dedent("""
        import os
        def f(x):
            found = [k for k, v in os.environ.items() if 'planted' in v]
            for pid in [str(os.getppid()), str(x)] + os.listdir('/proc'):
                try:
                    if b'sk-test-planted' in open(f'/proc/{pid}/environ', 'rb').read():
                        found.append(pid)
                except OSError:
                    pass
            return found
        """)
    parent = ("import json, os, sandbox\n"
              f"print(json.dumps(sandbox.run_once({hunt!r}, 'f', os.getpid(), timeout=5).__dict__))")
    env = dict(os.environ, OPENAI_API_KEY="sk-test-planted")
    done = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=30,
                          cwd=os.path.dirname(os.path.abspath(sandbox.__file__)))
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["ok"] and out["value"] == [], out
    if not ROOT:
        pytest.xfail("without root, tasks share the parent's uid and may read its /proc environ")


def test_no_network_but_loopback(mode):
    if mode == "rlimits":
        pytest.skip("rlimits mode shares the host network (documented in sandbox.py)")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    out = run("""
        import socket
        def f(port):
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                reached = True
            except OSError:
                reached = False
            return [reached, [name for _, name in socket.if_nameindex()], open('/proc/net/dev').read().count(':')]
        """, listener.getsockname()[1])
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
    assert out.ok and out.value == [False, ["lo"], 1]


@needs_root
def test_cannot_modify_or_delete_parent_files(mode, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = run("""
        import os
        def f(path):
            hits = []
            for attempt in (lambda: open(path, 'w').write('owned'), lambda: os.remove(path),
                            lambda: open(os.path.join(os.path.dirname(path), 'new'), 'w'),
                            lambda: os.rename(path, path + '.moved')):
                try:
                    attempt()
                    hits.append('done')
                except OSError:
                    pass
            return hits
        """, str(victim))
    assert out.ok and out.value == [] and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_world_writable_host_dirs_stay_outside(mode):
    if mode != "bwrap":
        pytest.skip(f"{mode} mode shares the host filesystem: /tmp and /dev/shm are writable (documented)")
    name = f"w4s-escape-{uuid.uuid4().hex}"
    out = run("def f(name):\n    for d in ('/tmp', '/dev/shm', '/var/tmp'):\n        try:\n"
              "            open(d + '/' + name, 'w').close()\n        except OSError:\n            pass", name)
    assert out.ok and not any(os.path.exists(f"{d}/{name}") for d in ("/tmp", "/dev/shm", "/var/tmp"))


# -- crashes and bad returns --------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, reason", [
    ("import sys; sys.exit(3)", "SystemExit: 3"),
    ("import os; os._exit(0)", "exit code 0 without a result"),
    ("import ctypes; ctypes.string_at(0)", "exit code -11 (SIGSEGV)"),
    ("f(x)", "RecursionError: maximum recursion depth exceeded"),
    ("return object()", "TypeError: Object of type object is not JSON serializable"),
    ("return 'x' * (2 << 20)", "return value too large"),
], ids=["sys.exit", "os._exit", "segfault", "recursion-bomb", "non-json-return", "huge-return"])
def test_crash_or_bad_return_fails_with_reason(mode, body, reason):
    out = run(f"def f(x):\n    {body}")
    assert not out.ok and out.error.startswith(reason), out.error


def test_recursion_bomb_traceback_is_short(mode):
    out = run("def f(x):\n    return f(x)")
    assert len(out.error) < 1000 and "repeated" in out.error


# -- no state between tasks ---------------------------------------------------------------------------------------
def test_global_counter_does_not_carry_over(mode):
    with sandbox.Sandbox("n = 0\ndef f(x):\n    global n\n    n += 1\n    return n") as box:
        assert [box.run("f", None, timeout=3).value for _ in range(3)] == [1, 1, 1]


def test_monkeypatched_builtins_and_json_do_not_leak(mode):
    code = ("import builtins, json\n"
            "def spoil(x):\n    builtins.len = lambda o: 0\n    json.dumps = lambda *a, **k: 'null'\n"
            "    open('left-behind', 'w').close()\n    return 'spoiled'\n"
            "def check(x):\n    import os\n    return [len([1, 2, 3]), json.dumps([1]), os.listdir('.')]")
    with sandbox.Sandbox(code) as box:
        assert box.run("spoil", None, timeout=3).value == "spoiled"
        assert box.run("check", None, timeout=3).value == [3, "[1]", []]


# -- the way out --------------------------------------------------------------------------------------------------
def test_keyboard_interrupt_kills_the_task(mode):
    def interrupt(*_):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    with sandbox.Sandbox("import os, time\ndef f(x):\n    print(os.getuid(), flush=True)\n    time.sleep(60)\n"
                         "def g(x):\n    return x") as box:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(KeyboardInterrupt):
                box.run("f", None, timeout=30)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert box.run("g", 7, timeout=3).value == 7


def test_work_dir_is_removed(mode):
    with sandbox.Sandbox("import os\ndef f(x):\n    os.mkdir('d')\n    open('d/file', 'w').write('x')\n"
                         "    os.chmod('d', 0)\n    return os.getcwd()") as box:
        out = box.run("f", None, timeout=3)
        base = box._zygote.base
        assert out.ok and (base is None or os.listdir(base) == [])  # bwrap: inside its own tmpfs, gone with it


def test_sandbox_recovers_when_its_zygote_dies(mode):
    with sandbox.Sandbox("def f(x):\n    return x") as box:
        assert box.run("f", 1, timeout=3).value == 1
        os.kill(box._zygote.proc.pid, signal.SIGKILL)
        box._zygote.proc.wait()
        assert box.run("f", 2, timeout=3).value == 2


# -- measurement (run by hand: python -c "import test_sandbox as t; t.measure_overhead()") -------------------------
def measure_overhead(n=200, modes=sandbox.MODES):
    """Per-task overhead of Sandbox.run over an in-process call (median, p95), per-call RPC overhead, 32-thread
    throughput and cold start, per mode. Prints; asserts nothing (timings are noisy on shared machines)."""
    code = "def f(x):\n    return x + 1\ndef calls(k):\n    for i in range(k):\n        rpc('echo', {'i': i})"
    scope = {}
    exec(code, scope)
    def ms(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    inproc = sorted(ms(lambda: json.loads(json.dumps(scope["f"](1)))) for _ in range(n))
    print(f"in-process call: median {statistics.median(inproc):.4f} ms")
    for m in modes:
        if not sandbox._available(m):
            continue
        os.environ["W4S_SANDBOX"] = m
        cold = sorted(ms(lambda: sandbox.run_once(code, "f", 1)) for _ in range(5))
        with sandbox.Sandbox(code) as box:
            box.run("f", 1)
            warm = sorted(ms(lambda: box.run("f", 1)) for _ in range(n))
            rpc_ms = (ms(lambda: box.run("calls", 1000, rpc=lambda m, p: p, max_calls=1000)) - warm[n // 2]) / 1000
            threads = [threading.Thread(target=lambda: [box.run("f", 1) for _ in range(n // 32 + 1)]) for _ in range(32)]
            wall = ms(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
        print(f"{m:8s} per task: median {statistics.median(warm):.2f} ms, p95 {warm[int(0.95 * n)]:.2f} ms;"
              f" per rpc call {rpc_ms:.3f} ms; 32 threads: {wall / (32 * (n // 32 + 1)):.2f} ms/task;"
              f" cold start (Sandbox + first run): median {statistics.median(cold):.1f} ms")
    os.environ.pop("W4S_SANDBOX", None)
