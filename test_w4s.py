"""Tests for W4S: one property per test, real parts over mocks (the real sandbox, real subprocesses, a real local
HTTP server speaking the OpenAI chat-completions protocol, the tiny real SmolLM2 model). Slow end-to-end tests are
marked `slow`; `pytest -m "not slow"` runs the fast suite only."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import w4s

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


# ------------------------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server on 127.0.0.1: the executor "solves" `Compute A + B.` correctly only when the
# prompt asks it to work "carefully"; the meta-agent returns scripted replies in turn. Faults can be injected.

GOOD_WORKFLOW = '''def solver(agent, task):
    return agent.call_llm(task + " Work carefully.")
'''
META_REPLIES = [
    "The seeds are sloppy; asking for care should help.\n```python\n" + GOOD_WORKFLOW + "```\n",
    "No code here, just words.",
    "Copying the seed.\n```python\n" + w4s.SEED_WORKFLOWS["cot"] + "```\n",
]


def executor_reply(text):
    m = re.search(r"Compute (\d+) \+ (\d+)", text)
    if not m:
        return "I don't know."
    a, b = int(m.group(1)), int(m.group(2))
    right = "carefully" in text or a % 2 == 0
    return f"The sum is \\boxed{{{a + b if right else a + b + 1}}}."


class StubOpenAI(http.server.ThreadingHTTPServer):
    """Speaks POST /v1/chat/completions. `faults` is a list of per-request actions consumed in order."""
    daemon_threads = True

    def __init__(self, meta_replies=META_REPLIES, delay=0.0, faults=()):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.meta_replies, self.delay, self.faults = list(meta_replies), delay, list(faults)
        self.log, self.lock, self.meta_count = [], threading.Lock(), 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body):
        messages = body["messages"]
        with self.lock:
            self.log.append(body)
            if messages[0]["content"] == w4s.META_SYSTEM:
                reply = self.meta_replies[self.meta_count % len(self.meta_replies)]
                self.meta_count += 1
                return reply
        return executor_reply(messages[-1]["content"])


class StubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):  # /v1/models: the client's up-front check
        self.send_json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            fault = self.server.faults.pop(0) if self.server.faults else None
        time.sleep(self.server.delay)
        if fault == "429":
            return self.send_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})
        if fault == "500":
            return self.send_json(500, {"error": {"message": "boom"}})
        text = self.server.answer(body)
        self.send_json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    def send_json(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    s = StubOpenAI()
    yield s
    s.shutdown()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own call cache; the converted embedded models are shared (read-only) to stay fast."""
    monkeypatch.setattr(w4s, "CACHE_ROOT", str(tmp_path / "cache"))
    models = os.path.join(os.path.expanduser("~/.cache/w4s/models"))
    os.makedirs(tmp_path / "cache", exist_ok=True)
    if os.path.isdir(models):
        os.symlink(models, tmp_path / "cache" / "models")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def sums_task(tmp_path):
    """A custom JSONL task: 12 additions, split reproducibly into validation and test by benchmarks."""
    path = tmp_path / "sums.jsonl"
    rows = [{"id": f"s{i}", "question": f"Compute {10 + i} + {i * 3}.", "answer": str(10 + i + i * 3)}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stub_run(server, sums_task, out, *extra):
    args = ["--task", sums_task, "--scorer", "numeric", "--description", "Add two numbers.",
            "--meta-agent", server.url + ":meta", "--executor", server.url + ":exec", "--iterations", "2",
            "--samples", "3", "--val-size", "4", "--test-size", "4", "--out", str(out), "--timeout", "20", *extra]
    return w4s.main(args)


# ------------------------------------------------------------------------------------------------------------------
# The MDP pieces

@pytest.mark.parametrize("acc,best,prev,expected", [
    (0.8, 0.6, 0.5, 1.0),    # beats the best so far
    (0.55, 0.6, 0.5, 0.5),   # beats only the previous turn
    (0.5, 0.6, 0.5, 0.0),    # ties the previous turn
    (0.2, 0.6, 0.5, -0.1),   # below 0.3: penalty
    (0.25, 0.1, 0.05, 0.9),  # beats the best but still below 0.3
])
def test_discrete_reward(acc, best, prev, expected):
    assert w4s.reward(acc, best, prev) == pytest.approx(expected)


def test_continuous_reward_is_relative_gain_over_best():
    assert w4s.reward(0.6, 0.5, 0.4, "continuous") == pytest.approx(0.2)


def test_extract_takes_first_block_defining_solver():
    reply = ("Analysis.\n```python\ndef helper():\n    pass\n```\n```python\ndef solver(agent, task):\n    return 1\n```"
             "\nUsage:\n```python\ndef solver(agent, task):\n    return 2\nprint(solver(None, 'x'))\n```")
    code, err = w4s.extract_workflow(reply)
    assert err is None and "return 1" in code


def test_extract_reports_missing_block():
    assert w4s.extract_workflow("just prose")[1] == "no ```python block in the reply"


def test_extract_reports_missing_solver():
    assert "solver" in w4s.extract_workflow("```python\ndef solve(x):\n    return x\n```")[1]


def test_extract_reports_wrong_signature():
    assert "two arguments" in w4s.extract_workflow("```python\ndef solver(task):\n    return 1\n```")[1]


def test_extract_accepts_unclosed_block_cut_by_stop_string():
    code, err = w4s.extract_workflow("ok\n```python\ndef solver(agent, task):\n    return task")
    assert err is None and code.strip().endswith("return task")


def test_near_copy_ignores_comments_and_whitespace():
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    copy = "# my great idea\n" + w4s.SEED_WORKFLOWS["cot"].replace("    return", "\n    return")
    assert w4s.near_copy(copy, archive) == "cot"


def test_near_copy_lets_real_edits_through():
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    assert w4s.near_copy(w4s.SEED_WORKFLOWS["self_refine"], archive) is None


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = w4s.bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1], seed=0)
    assert lo < 5 / 8 < hi


def test_repetition_loop_is_detected():
    assert w4s.repeats_itself([1, 2] * 8 + [7, 8, 9] * 32)


def test_varied_text_is_not_a_repetition_loop():
    assert not w4s.repeats_itself(list(range(128)))


# ------------------------------------------------------------------------------------------------------------------
# The loop, through the real openai SDK against the local server

def read_trajectory(out):
    return [json.loads(line) for line in open(os.path.join(out, "trajectory.jsonl"))]


def test_openai_path_runs_a_full_optimization(server, sums_task, tmp_path):
    assert stub_run(server, sums_task, tmp_path / "run") == 0
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["status"] == "finished" and report["best"]["test"]["accuracy"] == 1.0


def test_every_action_is_logged_with_its_reward(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run")
    rows = read_trajectory(tmp_path / "run")
    assert [(r["iteration"], r["sample"]) for r in rows] == [(i, j) for i in (1, 2) for j in range(3)]


def test_near_copies_are_rejected_before_any_executor_call(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run")
    rejected = [r for r in read_trajectory(tmp_path / "run") if r["status"] == "rejected"]
    assert rejected and all(r["reward"] == 0 and "near-copy" in r["reason"] for r in rejected)


def test_best_of_m_continues(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run")
    for it in (1, 2):
        ok = [r for r in read_trajectory(tmp_path / "run") if r["iteration"] == it and r["status"] == "ok"]
        chosen = [r for r in ok if r["chosen"]]
        assert len(chosen) == (1 if ok else 0)
        assert not ok or chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in ok)


def test_no_test_question_ever_reaches_the_meta_agent(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run")
    report = json.load(open(tmp_path / "run" / "report.json"))
    questions = {json.loads(line)["id"]: json.loads(line)["question"] for line in open(sums_task)}
    meta_text = json.dumps([b["messages"] for b in server.log if b["messages"][0]["content"] == w4s.META_SYSTEM])
    assert report["splits"]["test"] and all(questions[i] not in meta_text for i in report["splits"]["test"])


def test_a_rerun_pays_for_nothing(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "a")
    paid = len(server.log)
    stub_run(server, sums_task, tmp_path / "b")
    assert paid > 0 and len(server.log) == paid


def test_sampled_calls_are_distinct_cache_entries(server, tmp_path):
    cache = w4s.Cache(str(tmp_path / "c.sqlite"))
    llm = w4s.LLM(server.url + ":exec", "executor", w4s.Ledger(), cache)
    msgs = [{"role": "user", "content": "Compute 1 + 2."}]
    llm.chat(msgs, 0.7, sample=0), llm.chat(msgs, 0.7, sample=1), llm.chat(msgs, 0.7, sample=0)
    assert len(server.log) == 2


def test_self_debug_sends_the_workflows_own_line_numbers(sums_task, tmp_path):
    broken = "```python\ndef solver(agent, task):\n    x = 1\n    return x / 0\n```\n"
    s = StubOpenAI(meta_replies=[broken, "```python\n" + GOOD_WORKFLOW + "```\n"])
    stub_run(s, sums_task, tmp_path / "run", "--iterations", "1", "--samples", "1")
    fix_request = [b for b in s.log if b["messages"][0]["content"] == w4s.META_SYSTEM][1]
    s.shutdown()
    assert 'File "workflow.py", line 3' in fix_request["messages"][-1]["content"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "w4s.py"), *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


def test_unknown_task_is_one_clear_line():
    assert_one_line_error(run_cli("--task", "nosuch", "--evaluate", "cot"), "unknown task")


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_clear_line(sums_task):
    url = f"http://127.0.0.1:{closed_port()}/v1:model"
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", url, "--evaluate", "cot")
    assert_one_line_error(proc, "cannot reach")


def test_openai_model_without_key_is_one_clear_line(sums_task):
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", "gpt-4o-mini", "--evaluate", "cot",
                   env={"OPENAI_API_KEY": ""})
    assert_one_line_error(proc, "OPENAI_API_KEY")


def test_evaluate_prints_one_json_line(server, sums_task):
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", server.url + ":exec",
                   "--evaluate", "cot", "--split", "test", "--limit", "3")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["n"], out["failed"]) == (3, 0) and 0 <= out["accuracy"] <= 1
