"""Reliability (issue 8): kill -9 and resume, API faults, hard budgets, hostile meta-agent output, bad user input,
reproducibility. Real processes and the real local HTTP server of test_w4s (StubOpenAI), no mocks.
Merged into test_w4s.py later; the fixtures come from there."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import benchmarks
import w4s
from test_w4s import (GOOD_WORKFLOW, HERE, StubOpenAI, assert_one_line_error, closed_port, isolated_cache,  # noqa: F401
                      offline_data, run_cli, server, stub_run, sums_task)

CHECKED_WORKFLOW = '''def solver(agent, task):
    draft = agent.call_llm(task + " Work carefully.")
    review = agent.call_llm("Check this answer to: " + task + "\\n" + draft)
    return draft
'''
BROKEN_WORKFLOW = '''def solver(agent, task):
    reply = agent.call_llm(task)
    return reply / 0
'''


def scripted_meta(body):
    """Meta-agent replies as a function of the request alone, so that concurrent, killed and resumed runs all get the
    same reply for the same request: a broken workflow first (self-debug repairs it), then a self-checking one."""
    last = body["messages"][-1]["content"]
    if "Your workflow failed" in last:
        return "Fixed.\n```python\n" + GOOD_WORKFLOW + "```\n"
    if "## iteration1" in last:
        return "Add a review.\n```python\n" + CHECKED_WORKFLOW + "```\n"
    return "Try this.\n```python\n" + BROKEN_WORKFLOW + "```\n"


def run_args(server, task, *extra):
    return ["--task", task, "--scorer", "numeric", "--description", "Add two numbers.",
            "--meta-agent", server.url + ":meta", "--executor", server.url + ":exec", "--iterations", "2",
            "--samples", "1", "--val-size", "4", "--test-size", "2", "--timeout", "20", *extra]


def start(args, cwd, cache):
    err = open(os.path.join(cwd, "stderr.txt"), "a")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "w4s.py"), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=err, env=dict(os.environ, W4S_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1"))


def cache_rows(cache):
    path = os.path.join(cache, "calls.sqlite")
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(path, timeout=30) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def whole_lines(path):
    if not os.path.exists(path):
        return []
    return [line for line in open(path, "rb").read().splitlines(keepends=True) if line.endswith(b"\n")]


def comparable(report):
    """report.json minus `invocation`: the one field holding timestamps, wall time and what this process paid."""
    return {k: v for k, v in report.items() if k != "invocation"}


def is_meta(body):
    return body["messages"][0]["content"] == w4s.META_SYSTEM


# ------------------------------------------------------------------------------------------------------------------
# 1. Crash and resume

def test_kill_9_at_six_points_then_resume_matches_an_uninterrupted_run(sums_task, tmp_path):
    """SIGKILL at 6 points (seed evaluation, meta-agent generation, self-debug, candidate evaluation, right after the
    trajectory write of iteration 1 with a torn line added, test scoring), each time resuming the previous resume.
    The kill is exact: the server stops answering at answered reply N and the test kills the client once everything
    answered is in its cache, so "answered before the kill" = replies sent and stored; the requests held unanswered
    at the kill are legitimately sent again (they were never answered) and are not counted as repeats."""
    ref_dir, ref_cache = tmp_path / "ref", tmp_path / "ref-cache"
    ref_dir.mkdir()
    srv = StubOpenAI(meta_replies=scripted_meta)  # one server for both runs: the same URLs in both reports
    proc = start(run_args(srv, sums_task, "--out", "run"), ref_dir, ref_cache)
    assert proc.wait(timeout=120) == 0, open(ref_dir / "stderr.txt").read()[-3000:]
    order, total = srv.answered, len(srv.answered)
    metas = [i for i, b in enumerate(order) if is_meta(b)]
    srv.answered, srv.requests = [], []
    assert len(metas) >= 3 and len(whole_lines(ref_dir / "run" / "trajectory.jsonl")) == 2
    kill_points = {"seed evaluation": metas[0] // 2, "meta-agent generation": metas[0],
                   "self-debug repair": metas[1], "candidate evaluation": metas[1] + 2,
                   "after iteration 1's trajectory write (+ torn line)": metas[2],
                   "test scoring": (metas[-1] + total) // 2}
    assert sorted(kill_points.values()) == list(kill_points.values()) and len(set(kill_points.values())) == 6

    run_dir, cache = tmp_path / "chain", tmp_path / "chain-cache"
    run_dir.mkdir()
    state = {}

    def kill_when_stored():
        deadline = time.time() + 5
        while cache_rows(cache) < len(srv.answered) and time.time() < deadline:
            time.sleep(0.02)
        state["unstored"] = len(srv.answered) - cache_rows(cache)
        os.kill(state["proc"].pid, signal.SIGKILL)

    srv.on_halt = kill_when_stored
    traj = run_dir / "run" / "trajectory.jsonl"
    kills, seen_lines = [], []
    for label, n in kill_points.items():
        srv.halt_after, srv.halted = n, False
        srv.released.clear()
        args = run_args(srv, sums_task, "--out", "run") if not kills else ["--resume", "run"]
        state["proc"] = start(args, run_dir, cache)
        rc = state["proc"].wait(timeout=120)
        srv.release()
        assert rc == -signal.SIGKILL, (label, rc, open(run_dir / "stderr.txt").read()[-3000:])
        lines = whole_lines(traj)
        seen_lines.append(lines)
        kills.append(dict(point=label, answered=len(srv.answered), unstored=state["unstored"], lines=len(lines)))
        if "torn" in label:  # a kill in the middle of a line: the resume must drop it, not crash
            with open(traj, "ab") as f:
                f.write(b'{"run": "run", "iteration": 2, "action": "cut mid-wri')
    srv.halt_after = None
    proc = start(["--resume", "run"], run_dir, cache)
    assert proc.wait(timeout=120) == 0, open(run_dir / "stderr.txt").read()[-3000:]
    srv.shutdown()

    assert "dropped a torn line" in open(run_dir / "stderr.txt").read()
    final = whole_lines(traj)
    lost = sum(line not in final[:len(lines)] for lines in seen_lines for line in lines)
    unstored = sum(k["unstored"] for k in kills)
    repeated = len(srv.answered) - total - unstored  # replies sent twice although stored before a kill
    print(f"\n{len(kills)} kill points, {repeated} repeated paid calls, {lost} lost trajectory lines "
          f"({unstored} answered-but-unstored at a kill; {len(srv.requests) - len(srv.answered)} held requests "
          f"re-sent after the kills); kills: {kills}")
    assert len(kills) == 6 and all(k["unstored"] == 0 for k in kills)
    assert repeated == 0 and lost == 0 and len(srv.answered) == total == cache_rows(cache)
    assert open(traj, "rb").read() == open(ref_dir / "run" / "trajectory.jsonl", "rb").read()
    got, want = (json.load(open(d / "run" / "report.json")) for d in (run_dir, ref_dir))
    assert got["status"] == "finished" and comparable(got) == comparable(want)


def test_resume_drops_a_torn_last_line_and_keeps_the_whole_ones(tmp_path):
    path = tmp_path / "trajectory.jsonl"
    path.write_bytes(b'{"sample": 0}\n{"sample": 1}\n{"sample": 2, "act')
    logs = []
    t = w4s.Trajectory(str(path), resume=True, log=logs.append)
    t.write({"sample": 0})
    t.write({"sample": 1})
    assert path.read_bytes() == b'{"sample": 0}\n{"sample": 1}\n' and "torn line 3" in logs[0]
    t.write({"sample": 2})
    t.finish()
    assert path.read_bytes().splitlines() == [b'{"sample": 0}', b'{"sample": 1}', b'{"sample": 2}']


def test_resume_that_diverges_replaces_the_rest_of_the_trajectory(tmp_path):
    path = tmp_path / "trajectory.jsonl"
    path.write_bytes(b'{"sample": 0}\n{"sample": 1}\n{"sample": 2}\n')
    t = w4s.Trajectory(str(path), resume=True)
    t.write({"sample": 0})
    t.write({"sample": 9})
    t.finish()
    assert path.read_bytes() == b'{"sample": 0}\n{"sample": 9}\n'


# ------------------------------------------------------------------------------------------------------------------
# 2. API faults

@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("W4S_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("W4S_API_TIMEOUT", "0.5")


def executor_llm(srv, tmp_path, model="exec", ledger=None):
    return w4s.LLM(f"{srv.url}:{model}", "executor", ledger or w4s.Ledger(), w4s.Cache(str(tmp_path / "c.sqlite")))


ASK = [{"role": "user", "content": "Compute 4 + 3."}]


@pytest.mark.parametrize("fault", ["429", "429-no-retry-after", "500", "503", "reset", "timeout", "empty", "null",
                                   "truncated"])
def test_a_transient_fault_is_retried_and_the_answer_cached(fault, fast_retries, tmp_path):
    srv = StubOpenAI(faults=[fault], fault_sleep=1.5)
    llm = executor_llm(srv, tmp_path)
    assert llm.chat(ASK) == "The sum is \\boxed{7}."
    assert llm.chat(ASK) == "The sum is \\boxed{7}."  # from the cache
    srv.shutdown()
    assert len(srv.requests) == 2


def test_a_reply_cut_by_length_is_kept_and_cached(fast_retries, tmp_path):
    srv = StubOpenAI(faults=["length"])
    llm = executor_llm(srv, tmp_path)
    assert llm.chat(ASK) == "The sum is \\boxed{7}."[:len("The sum is \\boxed{7}.") // 2]
    llm.chat(ASK)
    srv.shutdown()
    assert len(srv.requests) == 1


def test_retries_are_bounded_back_off_with_jitter_and_nothing_is_cached(monkeypatch, tmp_path):
    waits = []
    monkeypatch.setattr(w4s.time, "sleep", lambda s: waits.append(s))
    srv = StubOpenAI(faults=["500"] * 12)
    llm = executor_llm(srv, tmp_path)
    with pytest.raises(RuntimeError, match=r"gave up after 6 attempts \(InternalServerError"):
        llm.chat(ASK)
    retry_waits = [w for w in waits if w > 0]
    assert len(srv.requests) == 6 and len(retry_waits) == 5
    assert all(0.25 * 2 ** k <= w <= 0.75 * 2 ** k for k, w in enumerate(retry_waits))  # base 0.5 s, jitter x0.5-1.5
    assert retry_waits != [0.5 * 2 ** k for k in range(5)]
    with pytest.raises(RuntimeError):
        llm.chat(ASK)  # the failure was not cached: the next call asks the server again
    srv.shutdown()
    assert len(srv.requests) == 12


def test_retry_after_pauses_the_whole_pool(monkeypatch, tmp_path):
    waits = []
    monkeypatch.setattr(w4s.time, "sleep", lambda s: waits.append(s))
    srv = StubOpenAI(faults=["429"])
    llm = executor_llm(srv, tmp_path)
    llm.chat(ASK)
    srv.shutdown()
    assert 0.2 in waits and llm.not_before > 0


def test_empty_content_is_retried_once_then_fails_and_is_paid_for(fast_retries, tmp_path):
    srv = StubOpenAI(faults=["null", "empty"])
    ledger = w4s.Ledger()
    llm = executor_llm(srv, tmp_path, model="gpt-4o-mini", ledger=ledger)
    with pytest.raises(RuntimeError, match="empty reply"):
        llm.chat(ASK)
    srv.shutdown()
    paid = ledger.summary(paid=True)
    assert len(srv.requests) == 2 and paid["executor"]["calls"] == 2 and paid["total_usd"] == pytest.approx(9e-6)
    assert ledger.summary()["total_usd"] == 0  # nothing usable was answered


def test_every_fault_kind_in_one_run_changes_nothing_in_the_report(sums_task, fast_retries, tmp_path):
    """Every other request gets a fault (empty and null far apart: two empty replies to one call fail that call)."""
    faults = ["empty", "429", "500", "503", "reset", "timeout", "429-no-retry-after", "truncated", "null"]
    args = ("--iterations", "1", "--samples", "1", "--concurrency", "1")
    noisy = StubOpenAI(meta_replies=scripted_meta, faults=[x for f in faults for x in (f, None)], fault_sleep=1.0)
    assert stub_run(noisy, sums_task, tmp_path / "noisy" / "run", *args) == 0
    noisy.shutdown()
    w4s.CACHE_ROOT = str(tmp_path / "clean-cache")  # isolated_cache restores it after the test
    clean = StubOpenAI(meta_replies=scripted_meta)
    assert stub_run(clean, sums_task, tmp_path / "clean" / "run", *args) == 0
    clean.shutdown()
    got, want = (json.load(open(tmp_path / d / "run" / "report.json")) for d in ("noisy", "clean"))
    assert not noisy.faults and got["status"] == "finished"
    for r in (got, want):
        r["config"]["out"] = r["config"]["meta_agent"] = r["config"]["executor"] = None
        r["meta_agent"] = r["executor"] = None
    assert comparable(got) == comparable(want)


def test_a_call_that_finally_fails_is_that_samples_failure_with_its_reason(sums_task, monkeypatch, tmp_path):
    monkeypatch.setenv("W4S_API_ATTEMPTS", "2")
    monkeypatch.setenv("W4S_RETRY_BASE_S", "0.01")
    task = benchmarks.get_task(sums_task, "numeric")
    val = random.Random(0).sample(task.load("val"), min(4, len(task.load("val"))))
    victim = val[1]["question"]  # not val[0]: that one is the self-check sample, which would block every candidate
    srv = StubOpenAI(meta_replies=scripted_meta)
    real_answer = srv.answer

    def answer(body):  # every executor request about one validation question fails (the connection drops)
        if not is_meta(body) and victim in body["messages"][-1]["content"]:
            raise ConnectionError("dropped on purpose")
        return real_answer(body)
    srv.answer = answer
    assert stub_run(srv, sums_task, tmp_path / "run", "--iterations", "1", "--samples", "1") == 0
    srv.shutdown()
    report = json.load(open(tmp_path / "run" / "report.json"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "trajectory.jsonl")]
    failed = [f for r in rows for f in r["failures"] if f["question"] == victim]
    assert report["status"] == "finished" and failed
    assert all("gave up after 2 attempts" in f["error"] for f in failed)
    asked = [b for b in srv.requests if b["messages"][-1]["content"] == victim + " Work carefully."]
    assert len(asked) == 2  # the candidate's one call on it: 2 attempts, then the sample failed


# ------------------------------------------------------------------------------------------------------------------
# 3. Budget

PER_CALL_USD = (10 * 0.15 + 5 * 0.60) / 1e6  # the stub's usage (10 prompt + 5 completion tokens) at gpt-4o-mini prices


def test_budget_usd_stops_cleanly_and_says_exactly_what_was_spent(server, sums_task, tmp_path):
    budget, concurrency = 40 * PER_CALL_USD, 4
    rc = w4s.main(["--task", sums_task, "--scorer", "numeric", "--description", "Add two numbers.",
                   "--meta-agent", server.url + ":meta", "--executor", server.url + ":gpt-4o-mini",
                   "--iterations", "5", "--samples", "3", "--val-size", "4", "--test-size", "4", "--concurrency",
                   str(concurrency), "--out", str(tmp_path / "run"), "--budget-usd", str(budget)])
    report = json.load(open(tmp_path / "run" / "report.json"))
    paid = len([b for b in server.log if not is_meta(b)]) * PER_CALL_USD
    used = report["usage"]["total_usd"]  # the run's calls at list price, repeats answered by the cache included
    assert rc == 0 and report["status"] == "stopped: budget"
    assert report["invocation"]["paid"]["total_usd"] == pytest.approx(paid, abs=1e-12)  # exactly what was paid
    assert budget <= used and paid <= budget + concurrency * PER_CALL_USD  # paid: at most one in-flight batch over
    assert os.path.exists(tmp_path / "run" / "best_workflow.py") and os.path.exists(tmp_path / "run" / "trajectory.jsonl")


def test_max_calls_stops_cleanly_within_one_in_flight_batch(server, sums_task, tmp_path):
    rc = stub_run(server, sums_task, tmp_path / "run", "--max-calls", "30", "--concurrency", "4")
    report = json.load(open(tmp_path / "run" / "report.json"))
    paid = report["invocation"]["paid"]
    assert rc == 0 and report["status"] == "stopped: budget"
    used = sum(u["calls"] for k, u in report["usage"].items() if k != "total_usd")  # cache hits included
    assert sum(u["calls"] for k, u in paid.items() if k != "total_usd") == len(server.log) <= used
    assert 30 <= used and len(server.log) <= 30 + 4 + 3  # paid: one executor batch + the m meta samples in flight


def test_a_resume_does_not_get_a_fresh_budget(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run", "--max-calls", "30", "--concurrency", "4")
    paid = len(server.log)
    assert w4s.main(["--resume", str(tmp_path / "run")]) == 0
    assert json.load(open(tmp_path / "run" / "report.json"))["status"] == "stopped: budget"
    assert len(server.log) == paid
    assert w4s.main(["--resume", str(tmp_path / "run"), "--max-calls", "100000"]) == 0  # a larger budget goes on
    assert json.load(open(tmp_path / "run" / "report.json"))["status"] == "finished"


# ------------------------------------------------------------------------------------------------------------------
# 4. Hostile or broken meta-agent output: each is one failed action with a clear error; the run goes on

def block(code):
    return "Here it is.\n```python\n" + code + "```\n"


HOSTILE = {  # action -> what the feedback to the meta-agent must say
    "Just words, no code.": "no ```python block",
    block("def solver(agent, task)\n    return task\n"): "SyntaxError",
    block("def solve(agent, task):\n    return task\n"): "no block defines solver",
    block("def solver(task):\n    return task\n"): "exactly two arguments",
    block("def solver(agent, task):\n    return None\n"): "solver returned NoneType",
    block("def solver(agent, task):\n    return [task]\n"): "solver returned list",
    block("def solver(agent, task):\n    return 'x' * 5_000_000\n"): "too large",
    block("import sys\n\ndef solver(agent, task):\n    for _ in range(100):\n        sys.stdout.write('x' * 2**20)\n"
          "    return '0'\n"): "validation accuracy 0.00",
    block("import time\n\ndef solver(agent, task):\n    time.sleep(10**6)\n"): "timeout",
    block("def solver(agent, task):\n    for _ in range(10000):\n        agent.call_llm(task)\n    return ''\n"):
        "too many rpc calls (cap 50)",
}


def test_hostile_meta_agent_output_fails_one_action_each_and_the_run_goes_on(sums_task, tmp_path):
    queue, feedback = list(HOSTILE), []

    def meta(body):
        last = body["messages"][-1]["content"]
        if "Your workflow failed" in last:
            feedback.append(last)
            return "Sorry, I have no fix."
        return queue.pop(0)
    srv = StubOpenAI(meta_replies=meta)
    t = time.time()
    assert stub_run(srv, sums_task, tmp_path / "run", "--iterations", "1", "--samples", str(len(HOSTILE)),
                    "--timeout", "3") == 0
    srv.shutdown()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "trajectory.jsonl")]
    assert sorted(r["action"] for r in rows) == sorted(HOSTILE) and time.time() - t < 60
    for r in rows:
        first_error = r["debug"][0]["error"] if r["debug"] else r["reason"]
        assert r["status"] in ("error", "discarded") and r["reward"] <= 0, r
        assert HOSTILE[r["action"]] in first_error, (r["action"], first_error)
        assert len(json.dumps(r)) < 100_000  # the 100 MB print never reaches the trajectory
    for needle in [n for a, n in HOSTILE.items() if "```" in a and "accuracy" not in n]:
        assert any(needle in f for f in feedback), needle  # the meta-agent was told what went wrong
    assert json.load(open(tmp_path / "run" / "report.json"))["status"] == "finished"


# ------------------------------------------------------------------------------------------------------------------
# 5. Bad user input: one clear line, non-zero exit, no traceback

def test_malformed_custom_jsonl_names_the_line_on_the_command_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", answer: 2}\n')
    assert_one_line_error(run_cli("--task", str(path), "--evaluate", "cot"), "line 2")


def test_missing_data_offline_is_one_clear_line(tmp_path):
    proxy = f"http://127.0.0.1:{closed_port()}"  # any download attempt fails at once, on this machine
    env = {"W4S_DATA_DIR": str(tmp_path), "HOME": str(tmp_path), "http_proxy": proxy, "https_proxy": proxy,
           "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "no_proxy": ""}
    assert_one_line_error(run_cli("--task", "drop", "--evaluate", "cot", env=env), "W4S_DATA_DIR")


def test_bad_api_key_is_one_clear_line(sums_task):
    srv = StubOpenAI(api_key="right-key")
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", srv.url + ":exec", "--evaluate", "cot",
                   env={"OPENAI_API_KEY": "wrong-key"})
    srv.shutdown()
    assert_one_line_error(proc, "API key was rejected")


def write_config(tmp_path, **changes):
    run = tmp_path / "old"
    run.mkdir()
    config = dict(vars(w4s.parse_args([])), task="math", version=w4s.VERSION, out=str(run))
    config.update(changes)
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_resume_of_a_run_from_another_version_is_one_clear_line(tmp_path):
    run = write_config(tmp_path, version=w4s.VERSION - 1)
    assert_one_line_error(run_cli("--resume", str(run)), "format version")


def test_resume_with_another_task_is_one_clear_line(tmp_path, sums_task):
    run = write_config(tmp_path)
    assert_one_line_error(run_cli("--resume", str(run), "--task", sums_task), "that run has task='math'")


def test_resume_of_a_torn_config_is_one_clear_line(tmp_path):
    run = write_config(tmp_path)
    (run / "config.json").write_text('{"task": "ma')
    assert_one_line_error(run_cli("--resume", str(run)), "config.json is unreadable")


def test_ctrl_c_saves_and_exits_130_with_how_to_resume(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=scripted_meta, halt_after=10, on_halt=lambda: None)  # the run hangs at reply 10
    proc = start(run_args(srv, sums_task, "--out", "run"), tmp_path, tmp_path / "cache")
    while not srv.halted:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    srv.release()
    srv.shutdown()
    err = open(tmp_path / "stderr.txt").read()
    assert rc == 130 and "Traceback" not in err
    assert "resume with: python w4s.py --resume run" in err.strip().splitlines()[-1]
    assert json.load(open(tmp_path / "run" / "report.json"))["status"] == "interrupted"


# ------------------------------------------------------------------------------------------------------------------
# 6. Reproducibility

def test_a_cached_replay_is_byte_identical_apart_from_the_invocation_field(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=scripted_meta)
    out = tmp_path / "run"
    assert stub_run(srv, sums_task, out) == 0
    paid = len(srv.requests)
    traj, report = (out / "trajectory.jsonl").read_bytes(), json.load(open(out / "report.json"))
    (out / "trajectory.jsonl").write_bytes(b"")  # the replay must rebuild it, not keep it
    assert w4s.main(["--resume", str(out)]) == 0
    srv.shutdown()
    again = json.load(open(out / "report.json"))
    assert len(srv.requests) == paid and (out / "trajectory.jsonl").read_bytes() == traj
    assert comparable(again) == comparable(report) and again["invocation"]["paid"]["total_usd"] == 0
    assert set(report["invocation"]) == {"started_at", "finished_at", "wall_seconds", "resumed", "paid"}
    assert (json.dumps(comparable(again), indent=1) == json.dumps(comparable(report), indent=1))
