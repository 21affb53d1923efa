"""W4S (Weak-for-Strong): a weak meta-agent writes Python workflows that drive a strong executor LLM.

The paper's MDP (arXiv 2504.04785, Sec. 3), top-down in this file:
  1. The loop           `optimize`: the seed workflows are evaluated first (`evaluate_seeds`); each turn (`play_turn`)
                        draws m actions (`draw_samples`), completes and repairs them (`complete_code`,
                        `screen_and_repair`), evaluates those that pass (`transition`) and rewards them; best-of-m
                        continues the conversation (`continue_episode`); every `context_window` turns a new episode
                        starts from the seeds + the latest generated workflow (`new_episode`, official main.py); at
                        the end the best workflow and the best seed meet the held-out test split once.
  2. State s_t          `build_state`: a conversation: the initial state (interface, principles with a technique
                        catalogue, task, archive of workflows with scores and validation cases, output format), then
                        each earlier turn's chosen action and the feedback on it (accuracy, CI, trend, cases with the
                        answer the scorer compared); shortened to fit the meta-agent's context (`fit_state`).
  3. Action a_t         the meta-agent's reply; `extract_workflow` takes the ```python block that defines `solver`. A
                        local meta-agent's reply that stopped after its analysis is continued from the code's opening.
                        `prescreen`, free: extractable, not a near-copy, two dry runs against canned executors that
                        answer differently (it must call the executor and answer differently); a failure gets up to 3
                        repairs in a short context (`repair`, the authors' loop), each pre-screened again.
  4. Transition         `transition`: sandboxed evaluation on the fixed validation split, whose first sample is the
                        self-check (on its error: a repair, evaluate again, <= 3 times); discarded at accuracy <= 0.05.
  5. Reward             `reward`: discrete (paper) or continuous; "best" is fixed at the episode's start.
  6. Workflow interface `agent.call_llm` / `agent.execute_code` inside the sandbox, proxied to `agent_rpc` here.
  7. Seed workflows     CoT, CoT self-consistency, program-of-thought, self-refine.
  8. Near-copy check    `near_copy`: the pre-screen's plumbing.
  9. Run records        trajectory rows, report.json, the log line of a turn.
Every model call, the meta-agent's and the executor's, goes through `llm.LLM.chat` (disk cache, ledger, budget).
Outputs in --out: trajectory.jsonl (RLAO's training data), best_workflow.py, report.json, curve.png and
report.html (written by report.py).

Left out on purpose: the paper's time-seeded extra validation samples (our validation set is fixed per run),
any leakage of test scores into feedback or selection, and training (that is rlao.py; this file never imports it).
"""
from __future__ import annotations

import argparse
import ast
import builtins
import collections
from collections import Counter  # the cot_sc seed's
import concurrent.futures as cf
import contextlib
import dataclasses
import difflib
import inspect
import json
import os
import random
import re
import sys
import threading
import time

import benchmarks
import llm
import report as report_html
import sandbox
from llm import (LLM, PRICES, APIFailure, BudgetExhausted, Cache, ContextExceeded, Ledger, UserError,
                 is_local_spec)


# --------------------------------------------------------------------------------------------------------------------
# Config: one argparse block. Embedded-model defaults are smaller so `python w4s.py --task math` ends in ~20 min
# on a 2-core CPU; an API executor gets the paper's defaults (m=5, 30 iterations).

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # defaults that depend on the backend are spelled out in the help itself
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="W4S: a weak meta-agent writes workflows for a strong executor, guided by validation feedback.",
        formatter_class=HelpFormatter)
    p.add_argument("--task", default="math", help="built-in task name or a custom FILE.jsonl (question/answer lines)")
    p.add_argument("--scorer", default=None, help="scorer for a custom JSONL task: exact|numeric|math|choice|f1|code")
    p.add_argument("--description", default=None, help="task description for a custom JSONL task")
    p.add_argument("--meta-agent", default=None, help="model spec of the weak meta-agent: OpenAI name, "
                   "http://HOST:PORT/v1:MODEL, hf:PATH_OR_ID or embedded:NAME; a local one + @int8 runs int8 linear "
                   "layers on a CPU, faster, answers differ (README) (default: embedded:qwen2.5-coder-0.5b)")
    p.add_argument("--executor", default=None, help="model spec of the strong executor, as for --meta-agent (default: "
                   "gpt-4o-mini when OPENAI_API_KEY is set, else embedded:qwen2.5-coder-1.5b)")
    p.add_argument("--iterations", type=int, default=None, help="meta-agent turns after the seeds (default 30 with an "
                   "API executor, 3 with embedded models)")
    p.add_argument("--samples", type=int, default=None, help="m: meta-agent candidates evaluated per turn (samples "
                   "that "
                   "fail the free pre-screen are redrawn, up to 3m); the best one continues (default 5 with an API "
                   "executor, 3 with embedded models)")
    p.add_argument("--context-window", type=int, default=2, help="turns per episode: then the conversation restarts "
                   "from the seeds plus the latest generated workflow (as the official code does)")
    p.add_argument("--val-size", type=int, default=None, help="validation examples the meta-agent is scored on "
                   "(default 50 with an API executor, 8 with embedded models)")
    p.add_argument("--test-size", type=int, default=None, help="held-out test examples scored once at the end; 0 skips "
                   "test scoring (default 200 with an API executor, 8 with embedded models)")
    p.add_argument("--test-all-seeds", action="store_true", help="score every seed on the test split, not only the "
                   "best seed (on validation) beside the best workflow found")
    p.add_argument("--concurrency", type=int, default=16, help="max executor calls (and workflow samples) in flight "
                   "across all workflows")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock seconds per validation sample in the "
                   "sandbox "
                   "(default 120 with an API executor, 1800 with embedded models)")
    p.add_argument("--max-tokens", type=int, default=None, help="executor reply budget per call (default 2048 with an "
                   "API executor, 512 with embedded models, so that the offline demo ends in ~30 min on 2 CPU cores)")
    p.add_argument("--meta-max-tokens", type=int, default=1024, help="meta-agent reply budget (analysis + workflow; "
                   "the 0.5B meta-agent ran past 700 tokens in 5 of 8 replies)")
    p.add_argument("--meta-context", type=int, default=32768, help="the meta-agent's context in tokens: the state is "
                   "shortened to fit it with the reply (fewer cases, shorter texts, older turns dropped); a server "
                   "that refuses a request for its length lowers it (llama.cpp and older Ollama default to 2048)")
    p.add_argument("--budget-usd", type=float, default=None, help="stop cleanly once this many dollars are spent")
    p.add_argument("--price", action="append", default=None, metavar="MODEL=IN,OUT", help="dollars per million prompt "
                   "and completion tokens of a model the built-in table lacks (any http:// server), e.g. "
                   "--price Qwen/Qwen2.5-7B-Instruct=0.2,0.2; --budget-usd refuses to start without one")
    p.add_argument("--max-calls", type=int, default=None, help="stop cleanly after this many LLM calls in the run "
                   "(cached ones count too, so a resume cannot go past it)")
    p.add_argument("--reward", choices=["discrete", "continuous"], default="discrete",
                   help="discrete: 1 beats best, 0.5 beats previous, -0.1 below 0.3; continuous: (acc - best) / best")
    p.add_argument("--seed", type=int, default=0, help="seed for splits and sampling")
    p.add_argument("--out", default=None, help="run directory (default runs/<task>-<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="finish an interrupted run; cached calls are free")
    p.add_argument("--evaluate", default=None, metavar="FILE_OR_SEED", help="score one workflow file (or a seed name: "
                   "cot, cot_sc, pot, self_refine) and print one JSON line, instead of optimising")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR", help="(re)write report.html for these runs and, for "
                   "several, a comparison page (compare.html beside the first), instead of optimising")
    p.add_argument("--split", choices=["val", "test"], default="val", help="split used by --evaluate")
    p.add_argument("--limit", type=int, default=None, help="with --evaluate: score only the first N examples")
    return p.parse_args(argv)


def apply_defaults(args):
    """Fill the defaults that depend on whether the models are local (slow CPU) or an API (fast, paid)."""
    has_key = bool(os.environ.get("OPENAI_API_KEY"))
    args.meta_agent = args.meta_agent or "embedded:qwen2.5-coder-0.5b"
    args.executor = args.executor or ("gpt-4o-mini" if has_key else "embedded:qwen2.5-coder-1.5b")
    local = is_local_spec(args.executor)
    for name, api, offline in [("iterations", 30, 3), ("samples", 5, 3), ("val_size", 50, 8),
                               ("test_size", 200, 8), ("timeout", 120.0, 1800.0), ("max_tokens", 2048, 512)]:
        if getattr(args, name) is None:
            setattr(args, name, offline if local else api)
    return args


# --------------------------------------------------------------------------------------------------------------------
# 1. The loop (the paper's Algorithm): seeds, then turns of m evaluated candidates; best-of-m continues the
#    conversation; every `context_window` turns a new episode starts; the test split is scored once at the end.

STATUSES = {  # what became of one meta-agent sample (Candidate.status)
    None: "drawn; or passed the pre-screen and waits for evaluation",
    "unextractable": "no ```python block defines solver(agent, task), even after its repairs",
    "near-copy": "the same program as a workflow the episode has seen or an earlier sample of the turn, after repairs",
    "broken": "failed a free dry run against the canned executors, even after its repairs",
    "spare": "passed the pre-screen after m others had: not evaluated",
    "error": "raised on the first validation sample (the self-check), even after its repairs",
    "discarded": "evaluated at validation accuracy <= 0.05: no reward, not trained on (paper)",
    "ok": "evaluated and kept: rewarded, and best-of-m picks among these",
}
EVALUATED = ("ok", "discarded", "error")  # statuses of a sample that reached the validation split


@dataclasses.dataclass
class Candidate:
    """One meta-agent sample of a turn, from its draw to its reward."""
    sample: int  # index within the turn
    seed: int  # sampling seed of the draw; its completion and repairs derive theirs from it
    messages: list  # the state s_t it was drawn in
    action: str  # what RLAO trains on: the reply, continued where it had no code, or its analysis + repaired code
    first_action: str  # the meta-agent's own reply, as drawn
    prefilled: str = ""  # the code opening the reply was continued from, if it was
    code: str | None = None  # the workflow extracted from the action
    status: str | None = None  # see STATUSES
    reason: str = ""  # why it has that status
    debug: list = dataclasses.field(default_factory=list)  # repair rounds: the code shown, what failed, the reply
    ev: Evaluation | None = None  # its validation results, once evaluated
    cases: list = dataclasses.field(default_factory=list)  # the validation cases its feedback shows
    reward: float | None = None  # only a kept ("ok") candidate is rewarded

    @property
    def acc(self):
        return self.ev.accuracy if self.ev else None


@dataclasses.dataclass
class Episode:
    """The conversation of `context_window` turns from one reset, and what its reward compares against."""
    archive: list  # the workflows the initial state shows: the seeds + the latest generated one
    known: list  # every workflow the episode has seen (archive + kept actions): a near-copy of one is rejected
    focus: str  # the workflow the episode refines first (it shows the most cases)
    parent: dict  # the archive entry the next action refines
    best: float  # the reward's "best", fixed at the episode's start
    prev: float  # the previous turn's accuracy
    turns: list = dataclasses.field(default_factory=list)  # the chosen actions and their feedback, in order


def optimize(run, executor, meta, log):
    """The W4S loop as a generator: it yields the evaluated seed archive, then one record per turn (every sample
    drawn, the chosen one, the best so far). The caller persists them; nothing here writes a file."""
    seed_archive = evaluate_seeds(run, executor, log)
    best, latest = max(seed_archive, key=lambda w: w["val_accuracy"]), None
    yield dict(seeds=seed_archive, best=best)
    for it in range(1, run.args.iterations + 1):
        n_episode, turn = divmod(it - 1, run.args.context_window)
        if turn == 0:
            episode = new_episode(seed_archive, latest)
        parent = episode.parent["name"]
        cands, chosen = play_turn(episode, meta, executor, run, it)
        latest = continue_episode(episode, chosen, f"iteration{it}", run.args.seed) or latest
        if chosen and chosen.acc > best["val_accuracy"]:
            best = latest
        yield dict(iteration=it, episode=n_episode, turn=turn + 1, parent=parent, candidates=cands, chosen=chosen,
                   best=best)


def new_episode(seed_archive, latest):
    """The official reset: the seeds plus the latest generated workflow; the reward's best is fixed at the best of
    these for the whole episode, and the previous turn is the latest workflow (the first seed before any)."""
    archive = seed_archive + ([latest] if latest else [])
    focus = latest or max(seed_archive, key=lambda w: w["val_accuracy"])
    return Episode(archive=archive, known=list(archive), focus=focus["name"], parent=focus,
                   best=max(w["val_accuracy"] for w in archive), prev=(latest or seed_archive[0])["val_accuracy"])


def play_turn(episode, meta, executor, run, it):
    """One step of the MDP. Draw m actions; complete, pre-screen and repair them; take the transition of those that
    passed (up to m evaluated in the turn, a pass past that is logged as "spare"); draw m more while fewer than m
    passed or none was kept, up to 3m drawn. Reward each kept candidate against the episode's best and the previous
    turn. Returns (every sample, the chosen one or None)."""
    m, cands = run.args.samples, []
    while len(cands) < 3 * m and not (n_evaluated(cands) >= m and chosen_from(cands)):
        new = draw_samples(meta, episode, run, it, first=len(cands), count=min(m, 3 * m - len(cands)))
        complete_code(meta, new, run)
        screen_and_repair(new, cands, episode.known, meta, run)
        room = m - n_evaluated(cands) if n_evaluated(cands) < m else m  # (m evaluated but none kept: m more)
        ready = [c for c in new if c.status is None]
        for c in ready[room:]:
            c.status, c.reason = "spare", f"passed the pre-screen after {m} others had: not evaluated"
        with phase(run, "candidate_check_and_evaluation"):
            list(run.meta_pool.map(lambda c: transition(c, episode.known, meta, executor, run), ready[:room]))
        cands += new
    for c in cands:
        c.cases = feedback_cases(c.ev, run.args.seed) if c.ev else []
        c.reward = reward(c.acc, episode.best, episode.prev, run.args.reward) if c.status == "ok" else None
    return cands, chosen_from(cands)


def draw_samples(meta, episode, run, it, first, count):
    """`count` fresh meta-agent samples on the fitted state, sample indices first, first + 1, ... of turn `it` (a
    local model decodes them in one batch)."""
    indices = range(first, first + count)
    with phase(run, "meta_agent_generation"):
        replies = list(run.meta_pool.map(lambda j: ask_meta(meta, episode, run, 100 * it + j), indices))
    return [Candidate(sample=j, seed=100 * it + j, messages=messages, action=reply, first_action=reply)
            for j, (messages, reply) in zip(indices, replies)]


def complete_code(meta, cands, run):
    """On a meta-agent that can continue its own message (a local one), a reply that ended without a python block
    goes on from its analysis into CODE_OPENING: the 1.5B stopped after its analysis in 14 of its 24 rejected
    samples. The action becomes the analysis, the prefilled opening and what the model wrote after it."""
    todo = [c for c in cands if meta.can_continue and not benchmarks.code_blocks(c.action)]

    def go(c):
        opened = c.action.rstrip() + "\n\n" + CODE_OPENING
        more = meta.chat(c.messages + [{"role": "assistant", "content": opened}], temperature=0.7,
                         max_tokens=run.args.meta_max_tokens, sample=c.seed, stop=META_STOP)
        c.action, c.prefilled = opened + more, CODE_OPENING
    with phase(run, "meta_agent_generation"):
        list(run.meta_pool.map(go, todo))


def screen_and_repair(new, earlier, known, meta, run):
    """Pre-screen each new sample against the episode's workflows and this turn's earlier passes (a copy of either
    teaches nothing), then repair the failures, all of them at once (a local model decodes them in one batch), at
    most REPAIR_ROUNDS times; each repair is pre-screened again. Sets each sample's code, status and reason."""
    def others():  # (a sample not screened yet has no code)
        return known + [dict(name=f"sample {c.sample} of this turn", code=c.code) for c in earlier + new
                        if c.code and c.status in (None, "spare", *EVALUATED)]
    for c in new:
        c.code, c.status, c.reason = prescreen(c.action, others(), run.probe, run.args.timeout)
    for _ in range(REPAIR_ROUNDS):
        failed = [c for c in new if c.status]
        if not failed:
            break
        with phase(run, "meta_agent_generation"):
            list(run.meta_pool.map(lambda c: repair(c, f"Your workflow failed the check before evaluation: "
                                                       f"{repair_hint(c)}", others(), meta, run), failed))


def repair_hint(cand):
    if cand.status == "near-copy":
        return (f"it is a {cand.reason}, which is already scored: evaluating it again teaches nothing. Change what "
                "the workflow does (a check of the answer, a vote over samples, a program run with "
                "agent.execute_code, a plan first).")
    return cand.reason


def n_evaluated(cands):
    return sum(c.status in EVALUATED for c in cands)


def chosen_from(cands):
    """Best-of-m: the kept candidate with the highest validation accuracy, or None."""
    return max((c for c in cands if c.status == "ok"), key=lambda c: c.acc, default=None)


def continue_episode(episode, chosen, name, seed):
    """The conversation goes on with the chosen action and its feedback, and the chosen workflow joins the archive;
    returns its archive entry. With none chosen the conversation stays as it was: a rejected or discarded reply
    shown as the meta-agent's own turn was copied by it (7 of 9 samples of the next turn)."""
    if not chosen:
        return None
    episode.turns.append(dict(action=chosen.action, acc=chosen.acc, ci=chosen.ev.ci, prev=episode.prev,
                              cases=chosen.cases))
    entry = archive_entry(name, chosen.code, chosen.ev, seed)
    episode.prev, episode.parent = chosen.acc, entry
    episode.known.append(entry)
    return entry


def evaluate_seeds(run, executor, log):
    """The archive starts with the task's seed workflows, all evaluated at once on the validation split."""
    seeds = {name: SEED_WORKFLOWS[name] for name in run.task.SEEDS}
    seeds.update(getattr(run.task, "EXTRA_SEEDS", {}) or {})
    with phase(run, "seed_evaluation"):
        evs = evaluate_all(seeds, run.val, executor, run, desc=f"{len(seeds)} seeds")
    archive = [archive_entry(name, code, evs[name], run.args.seed) for name, code in seeds.items()]
    for w in archive:
        log(f"seed {w['name']:12s} val {w['val_accuracy']:.2f} [{w['val_ci'][0]:.2f}, {w['val_ci'][1]:.2f}]  "
            f"({evs[w['name']].failed} failed)")
    return archive


def archive_entry(name, code, ev, seed):
    return dict(name=name, code=code, val_accuracy=ev.accuracy, val_ci=ev.ci, cases=feedback_cases(ev, seed))


def score_on_test(run, executor, seed_archive, best, log):
    """The held-out test split, scored once at the end (never seen before): the best workflow and the best seed,
    or every seed with --test-all-seeds, all at once."""
    best_seed = max(seed_archive, key=lambda w: w["val_accuracy"])
    chosen = seed_archive if run.args.test_all_seeds else [best_seed]
    workflows = {w["name"]: w["code"] for w in chosen + ([best] if best not in chosen else [])}
    with phase(run, "test_scoring"):
        evs = evaluate_all(workflows, run.test, executor, run, desc=f"test split, {len(workflows)} workflows")
    for name, ev in evs.items():
        log(f"test {name:12s} {ev.accuracy:.2f} [{ev.ci[0]:.2f}, {ev.ci[1]:.2f}]  (n={ev.n})")
    return {name: dict(accuracy=ev.accuracy, ci=ev.ci, n=ev.n, failed=ev.failed) for name, ev in evs.items()}


@contextlib.contextmanager
def phase(run, name):
    """Wall seconds per phase of the run, for report.json; a model loaded meanwhile counts as model_load instead."""
    t, load = time.time(), LLM.load_seconds
    yield
    run.phases[name] = run.phases.get(name, 0.0) + time.time() - t - (LLM.load_seconds - load)


# --------------------------------------------------------------------------------------------------------------------
# 2. State s_t: a conversation, as in the official main.py. The first user message is the initial state in the
#    official five parts (interface, guiding principles, task, archive, output format); each earlier turn of the
#    episode then adds the chosen action (assistant) and the feedback on it (user).

META_SYSTEM = "You are an expert at designing LLM workflows. You write concise, correct Python."
PRINCIPLES = """- The executor LLM (agent.call_llm) does the reasoning; Python only orchestrates, parses and checks.
- Change one thing at a time and keep what scored well. A few calls with clear jobs beat a long pipeline.
- Read the cases: "answer compared" is what the scorer saw. A wrong format, a cut-off reply and a wrong result
  need different fixes.
- Standard library only. Define every helper inside your block. No try/except that hides errors.
- Return only the final answer, in the format the task asks for.
- solver runs on every question of the task, unseen ones too: put `task` in the prompts, never a question or an
  answer from the cases."""
TECHNIQUES = """Techniques to combine (one or two lines each):
- Chain of thought: agent.call_llm(task + "\\nThink step by step. End with \\\\boxed{ANSWER}.")
- Self-consistency: replies = agent.call_llm(prompt, temperature=0.7, n=5), then a majority vote over the answers
  extracted from the replies (collections.Counter).
- Verify and refine: ask for a check ("Check this solution step by step: ..."); if it finds a mistake, ask for a
  corrected solution that uses the check.
- Decompose: first ask for a short plan or the sub-questions, then solve with the plan in the prompt.
- Roles and debate: messages=[{"role": "system", "content": "You are a careful mathematician."}, {"role": "user",
  "content": task}]; or two solvers and a judge call that picks one.
- Program of thought: ask for a function solution() that returns the answer, run it with agent.execute_code(code);
  if the result starts with "Error" or is empty, fall back to chain of thought.
- Answer format: extract the final answer (the last \\boxed{...}, the last number) and return it alone.
Worked example. Feedback on a program-of-thought workflow: 2 failing cases compared "" (the code printed nothing) and
1 an error. Analysis: an empty result is a failure too, so fall back to chain of thought on it, as on an error:
def solver(agent, task):
    reply = agent.call_llm("Write a Python function solution() that computes the answer to this problem and returns "
                           "it. Reply with only one ```python block.\\n\\n" + task)
    result = agent.execute_code(reply.split("```python")[-1].split("```")[0])
    if result.startswith("Error") or not result.strip():
        return agent.call_llm(task + "\\nThink step by step. End with \\\\boxed{ANSWER}.")
    return "\\\\boxed{" + result + "}\""""
# No skeleton or placeholder to paste: 20 of 27 replies of the untrained 0.5B began with the old format's own words
# and 4 put its placeholder inside solver. The code's opening is given where it helps: a local meta-agent's reply is
# continued from CODE_OPENING when it stopped after its analysis (complete_code), and a repair starts there.
OUTPUT_FORMAT = ("First explain, in at most 5 sentences, what the failing cases have in common and what you will "
                 "change. Then write the complete new workflow in one ```python block that defines solver(agent, "
                 "task), and stop after the block.")
NEXT_TURN = ("Now improve on it: explain what these cases show, then write the complete new workflow in one ```python "
             "block.")
CODE_OPENING = "```python\ndef solver(agent, task):\n"
# How much the state says, from most to least; fit_state() takes the first level that fits the meta-agent's
# context. In this order: fewer cases and shorter texts, then fewer earlier turns, then (for a 2k-token context)
# no technique catalogue and only the focus workflow's code. The rest of the initial state is always kept.
DETAIL = [dict(cases=10, archive_cases=1, chars=300, turns=None, techniques=True, all_code=True),
          dict(cases=5, archive_cases=1, chars=250, turns=None, techniques=True, all_code=True),
          dict(cases=3, archive_cases=0, chars=150, turns=1, techniques=True, all_code=True),
          dict(cases=2, archive_cases=0, chars=100, turns=0, techniques=False, all_code=False)]


def build_state(task, episode, d=DETAIL[0]):
    """s_t as chat messages. The archive holds validation results only: the test split never reaches this
    function. The focus workflow (the one the episode refines first) shows d['cases'] cases, the others fewer."""
    archive = ["# Archive of earlier workflows (validation accuracy, some validation cases)"]
    for w in episode.archive:
        focus = w["name"] == episode.focus
        code = f"\n```python\n{w['code'].strip()}\n```" if focus or d["all_code"] else ""
        cases = w["cases"][:d["cases"] if focus else d["archive_cases"]]
        archive.append(f"## {w['name']}: validation accuracy {w['val_accuracy']:.2f}{code}"
                       + "".join("\n" + case_text(c, d["chars"]) for c in cases))
    principles = PRINCIPLES + ("\n" + TECHNIQUES if d["techniques"] else "")
    initial = "\n\n".join([f"# Interface the workflow may use\n{INTERFACE_DOC}", f"# Guiding principles\n{principles}",
                           f"# Task\n{task.DESCRIPTION}", *archive, f"# Output format\n{OUTPUT_FORMAT}"])
    messages = [{"role": "system", "content": META_SYSTEM}, {"role": "user", "content": initial}]
    turns = episode.turns if d["turns"] is None else episode.turns[len(episode.turns) - d["turns"]:]
    for t in turns:
        messages += [{"role": "assistant", "content": t["action"]}, {"role": "user", "content": feedback(t, d)}]
    return messages


def feedback(turn, d):
    """The observation after a kept action: accuracy with its CI and trend, then the cases (failures first)."""
    lo, hi = turn["ci"]
    cases = "\n".join(case_text(c, d["chars"]) for c in turn["cases"][:d["cases"]])
    return (f"The evaluation feedback on your workflow: validation accuracy {turn['acc']:.2f} (95% CI [{lo:.2f}, "
            f"{hi:.2f}]). {trend(turn['acc'], turn['prev'])}\n{cases}\n\n{NEXT_TURN}")


def case_text(c, chars):
    """One validation case: the question (its middle shortened, never its end), the answer the scorer compared,
    the end of the raw output, the correct answer."""
    head = f"- {'correct' if c['correct'] else 'WRONG'}. question: {clip_middle(c['question'], chars)}\n"
    if c["error"]:
        return head + f"  error: {clip_middle(c['error'], chars)}\n  correct answer: {clip(c['expected'], 100)}"
    tail = c["got"] if len(c["got"]) <= chars // 2 else "..." + c["got"][-(chars // 2):]
    return (head + f"  answer compared: \"{clip(c['extracted'], 100)}\"\n  end of output: \"{tail}\"\n"
            f"  correct answer: {clip(c['expected'], 100)}")


def clip(s, n):
    s = str(s)
    return s if len(s) <= n else s[:n] + " ..."


def clip_middle(s, n):
    """Keep both ends: a question's end holds what is asked (DROP's question follows a long passage)."""
    s = str(s)
    return s if len(s) <= n else s[:n // 3] + " [...] " + s[-(n - n // 3):]


def estimate_tokens(messages):
    """A conservative count with no tokenizer at hand: code and English run ~3.5-4 characters a token."""
    return sum(len(m["content"]) // 3 + 8 for m in messages)


MIN_REPLY = 384  # tokens: a short analysis and a small workflow


def fit_state(episode, run):
    """(messages, reply budget) that fit the meta-agent's context, --meta-context or learned from a refusal. The
    most detailed level that leaves room for the whole reply budget wins, else the first that leaves MIN_REPLY."""
    levels = [(m, run.meta_context - estimate_tokens(m)) for m in (build_state(run.task, episode, d) for d in DETAIL)]
    for need in (run.args.meta_max_tokens, MIN_REPLY):
        for messages, room in levels:
            if room >= need:
                return messages, min(room, run.args.meta_max_tokens)
    raise UserError(f"the meta-agent's context of {run.meta_context} tokens cannot hold even the shortest state "
                    f"(~{run.meta_context - levels[-1][1]} tokens) plus a {MIN_REPLY}-token reply; give the "
                    "server a larger context (llama.cpp: -c 8192, Ollama: num_ctx) and set --meta-context")


def ask_meta(meta, episode, run, sample):
    """One meta-agent sample on the fitted state. A server that refuses the request for its length teaches us its
    context (from the error, else 3/4 of what we sent): shrink and retry once; a second refusal stops the run."""
    for attempt in range(2):
        messages, budget = fit_state(episode, run)
        try:
            return messages, meta.chat(messages, temperature=0.7, max_tokens=budget, sample=sample, stop=META_STOP)
        except ContextExceeded as e:
            sent = estimate_tokens(messages) + budget
            with run.lock:
                run.meta_context = min(run.meta_context, e.limit or sent * 3 // 4)
            if attempt:
                raise UserError(f"{meta.spec} refused the meta-agent's state twice for its length ({e}); set "
                                "--meta-context to the server's context size, or give the server a larger one")


META_STOP = ["\n```\n"]  # a small meta-agent rambles on after its block; stopping there saves most of a CPU turn


# --------------------------------------------------------------------------------------------------------------------
# 3. Action a_t -> workflow code, and the free pre-screen (no executor call)

UNPARSABLE = (RecursionError, MemoryError, ValueError)  # what ast raises on ~500+ nested operators or a null byte


def extract_workflow(reply):
    """Return (code, error). We take the FIRST ```python block that defines solver(agent, task): the 0.5B
    meta-agent often appends usage examples or a second variant after its workflow (measured: see LOG.md)."""
    blocks = benchmarks.code_blocks(reply)
    if not blocks:
        return None, "no ```python block in the reply"
    errors = []
    for block in blocks:
        try:
            tree = ast.parse(block)
        except SyntaxError as e:
            errors.append(f"SyntaxError: {e.msg} (line {e.lineno})")
            continue
        except UNPARSABLE as e:  # hostile or runaway code must not crash the run: it is just not a workflow
            errors.append(f"{type(e).__name__}: the code does not parse (nested too deeply, or a null byte)")
            continue
        fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solver"]
        if fns and len(fns[-1].args.args) == 2:
            return block.strip() + "\n", None
        if fns:
            errors.append("solver must take exactly two arguments: solver(agent, task)")
    return None, errors[0] if errors else "no block defines solver(agent, task)"


def prescreen(reply, archive, example, timeout):
    """(code, status, reason): status None when the reply passes the free checks: it holds a workflow, the workflow
    is not a near-copy of one in the archive, and two dry runs against canned executors that answer differently
    (DRY_WORLDS) do not crash, send the task to the executor, and return different answers. A workflow whose answer
    does not depend on what the executor says is a constant, however it dresses up: a reward hack, never a workflow;
    one that never shows the executor the task answers some other question."""
    code, error = extract_workflow(reply)
    if code is None:
        return None, "unextractable", error
    copied = near_copy(code, archive)
    if copied:
        return code, "near-copy", f"near-copy of {copied}"
    answers, sent = [], []
    with sandbox.Sandbox(code, prelude=AGENT_PRELUDE) as box:
        for world in DRY_WORLDS:
            dry, answer = solver_answer(box.run("__w4s_main__", example["question"], rpc=fake_agent_rpc(world, sent),
                                                timeout=min(timeout, 10), max_calls=MAX_CALLS))
            if not dry.ok:
                return code, "broken", f"(dry run with canned executor replies) {clip(dry.error, 1500)}"
            answers.append(answer)
    if not sent:  # a constant that happens to match a few validation answers is a reward hack
        return code, "broken", "(dry run) the workflow never called agent.call_llm: the executor must do the reasoning"
    if not any(example["question"].strip()[-40:] in text for text in sent):
        return code, "broken", ("(dry run) no agent.call_llm prompt held the task: the executor never saw the question "
                                "it must answer; put `task` in the prompt")
    if answers[0] == answers[1]:
        return code, "broken", (f"(dry run) the workflow returned {clip(answers[0], 80)!r} whatever the executor "
                                "answered: the answer must come from the executor's replies")
    return code, None, ""


DRY_WORLDS = [("42", "A"), ("17", "B")]  # the canned executor of each dry run: its number and its letter


def fake_agent_rpc(world, sent):
    """Canned executor replies for a free dry run (catches broken edits: undefined names, bad indexing, with no LLM
    call), appending the text of every executor prompt to `sent`. Calls are checked as evaluation checks them
    (executor_request): one it would refuse fails the dry run too; and execute_code runs the code for real, so that
    neither tells a dry run from evaluation (a workflow that behaved only in dry runs scored 1.0 on answers it had
    memorised). The reply holds a program printing the world's number, for workflows that run the executor's code."""
    number, letter = world

    def rpc(method, params):
        if method == "execute_code":
            return execute_code(params or {})
        messages, _, n, _, keys = executor_request(method, params or {}, 1)
        sent.extend(m["content"] for m in messages)
        one = {k: number for k in keys} if keys else (f"The answer is \\boxed{{{number}}} ({letter}).\n"
                                                      f"```python\nprint({number})\n```")
        return one if n == 1 else [one] * n
    return rpc


def solver_answer(out):
    """(outcome, answer) of one sandbox run of a workflow: a returned value that is not text fails the run."""
    got = out.value.get("answer") if out.ok and isinstance(out.value, dict) else out.value
    if out.ok and not isinstance(got, (str, int, float)):
        out = dataclasses.replace(out, ok=False, error=f"solver returned {type(got).__name__}, expected a string")
    return out, got


# --------------------------------------------------------------------------------------------------------------------
# 4. Transition: self-check and repair, evaluation. Observation: accuracy with a CI, the trend, the cases.

MAX_CALLS = 50  # executor calls one sample of a workflow may make
REPAIR_ROUNDS = 3  # repairs of one sample: a pre-screen failure or a self-check error (paper)


def transition(cand, known, meta, executor, run):
    """From a pre-screened action to an evaluated candidate. The paper's self-check is the first validation sample,
    run together with the rest of the split (a workflow that passed the dry runs nearly always passes it, and checking
    it alone first cost one serial chain of executor calls per candidate). On an error there, self-debug: a repair
    (repair()) shown the traceback with the workflow's own line numbers, then evaluate again, at most REPAIR_ROUNDS
    times. A candidate at accuracy <= 0.05 is discarded (paper): no reward, and not trained on."""
    for attempt in range(REPAIR_ROUNDS + 1):
        ev = evaluate(cand.code, run.val, executor, run, desc=f"candidate {cand.sample}")
        error = ev.cases[0]["error"]
        if error is None:
            discarded = ev.accuracy <= 0.05
            cand.status, cand.ev = "discarded" if discarded else "ok", ev
            cand.reason = f"validation accuracy {ev.accuracy:.2f}" if discarded else ""
            return
        if attempt == REPAIR_ROUNDS or not repair(cand, f"Your workflow failed on a validation case:\n{error}",
                                                  known, meta, run):
            cand.status, cand.reason = "error", clip(error, 1500)
            return


def repair(cand, failure, known, meta, run):
    """One repair round of a candidate: the meta-agent's fix must pass the same free pre-screen as any sample. On
    success the candidate takes the fixed code, and its action becomes its own analysis followed by that code, under
    its original state (what RLAO trains on, as the official pipeline splices it). Returns whether it passed."""
    messages = repair_messages(run.task, cand, failure, meta)
    reply = meta.chat(messages, temperature=0.7, max_tokens=run.args.meta_max_tokens,
                      sample=cand.seed + 10000 * len(cand.debug), stop=META_STOP)  # a new draw each round
    reply = messages[-1]["content"] + reply if messages[-1]["role"] == "assistant" else reply
    code, status, reason = prescreen(reply, known, run.probe, run.args.timeout)
    cand.debug.append(dict(code=cand.code, error=failure, reply=reply))
    if status:
        cand.code, cand.status, cand.reason = code or cand.code, status, reason
        return False
    analysis = cand.first_action.split("```")[0].strip()
    cand.code, cand.status, cand.reason = code, None, ""
    cand.action = f"{analysis}\n\n```python\n{code.strip()}\n```"
    return True


def repair_messages(task, cand, failure, meta):
    """A repair's short context (the authors' loop): the interface, the task, the failing reply's workflow (or the
    reply itself, with no workflow in it) and what failed. A local meta-agent's repair starts inside the code block."""
    shown = f"```python\n{cand.code.strip()}\n```" if cand.code else clip(cand.action, 3000)
    ask = (f"# Interface the workflow may use\n{INTERFACE_DOC}\n\n# Task\n{task.DESCRIPTION}\n\n# Your reply\n"
           f"{shown}\n\n{failure}\n\nFix it. Reply with only the whole corrected workflow: one ```python block that "
           "defines solver(agent, task), for any question of the task (use `task`; no question or answer from the "
           "cases). Do not use try/except.")
    messages = [{"role": "system", "content": META_SYSTEM}, {"role": "user", "content": ask}]
    return messages + ([{"role": "assistant", "content": "```python\n"}] if meta.can_continue else [])


@dataclasses.dataclass
class Evaluation:
    accuracy: float
    ci: tuple
    n: int
    failed: int  # samples that raised or timed out
    cases: list  # per sample: id, question, got, extracted, expected, score, error


def evaluate(code, examples, executor, run, desc="eval"):
    return evaluate_all({"workflow": code}, examples, executor, run, desc)["workflow"]


def evaluate_all(codes, examples, executor, run, desc="eval"):
    """{name: Evaluation} for several workflows at once: every sample of every workflow is in flight together (up
    to --concurrency), each in its own sandboxed process, so a local executor's batch fills up."""
    with contextlib.ExitStack() as stack:
        boxes = {n: stack.enter_context(sandbox.Sandbox(c, prelude=AGENT_PRELUDE)) for n, c in codes.items()}
        futures = {n: [] for n in codes}
        for ex in examples:  # example by example: no workflow's samples all wait at the back of the queue
            for n in codes:
                futures[n].append(run.pool.submit(run_sample, boxes[n], ex, executor, run))
        for _ in progress([f for fs in futures.values() for f in fs], desc):
            pass
    if run.ledger.exhausted:
        raise BudgetExhausted("budget reached during evaluation")
    out = {}
    for name, fs in futures.items():
        cases = [f.result() for f in fs]
        scores = [c["score"] for c in cases]
        out[name] = Evaluation(sum(scores) / max(len(scores), 1), bootstrap_ci(scores, run.args.seed), len(cases),
                               sum(c["error"] is not None for c in cases), cases)
    return out


def run_sample(box, example, executor, run):
    """One validation/test sample of one workflow, in the sandbox. The gold answer never enters the child."""
    out, got = solver_answer(box.run("__w4s_main__", example["question"], rpc=agent_rpc(executor, run.args.max_tokens),
                                     timeout=run.args.timeout, max_calls=MAX_CALLS))
    score = float(run.task.score(example, got)) if out.ok else 0.0
    return dict(id=example["id"], question=example["question"], got=clip_middle(got, 2000) if out.ok else None,
                extracted=clip(run.task.extract(example, got), 300) if out.ok else None,
                expected=example["answer"], score=score, error=None if out.ok else clip(out.error, 1500))


def progress(futures, desc):
    from tqdm import tqdm
    return tqdm(cf.as_completed(futures), total=len(futures), desc=f"  {desc}", leave=False, dynamic_ncols=True,
                file=sys.stderr)


def bootstrap_ci(scores, seed, rounds=1000):
    """95 % percentile-bootstrap interval of the mean: validation sets here are small, so show the uncertainty."""
    if not scores:
        return (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(rounds))
    return (round(means[int(0.025 * rounds)], 4), round(means[int(0.975 * rounds) - 1], 4))


def feedback_cases(ev, seed, k=10):
    """Up to k validation cases for the meta-agent, failures first (they carry the signal)."""
    rng = random.Random(seed)
    bad = [c for c in ev.cases if c["score"] < 1]
    good = [c for c in ev.cases if c["score"] >= 1]
    rng.shuffle(bad)
    rng.shuffle(good)
    return [dict(question=c["question"], got=c["got"] or "", extracted=c["extracted"] or "", expected=c["expected"],
                 correct=c["score"] >= 1, error=c["error"]) for c in (bad + good)[:k]]


# --------------------------------------------------------------------------------------------------------------------
# 5. Reward

def reward(acc, best, prev, form="discrete"):
    """Discrete (paper): 1 if acc beats the episode's best, 0.5 if it beats the previous turn, else 0; -0.1 more
    when acc < 0.3. Continuous: relative gain over the best, and 1 for any accuracy when the best is 0 (official)."""
    if form == "continuous":
        return (acc - best) / best if best > 0 else float(acc > 0)
    r = 1.0 if acc > best else 0.5 if acc > prev else 0.0
    return r - 0.1 if acc < 0.3 else r


def trend(acc, prev):
    if acc > prev:
        return f"Validation accuracy increased from {prev:.2f} to {acc:.2f}."
    if acc < prev:
        return f"Validation accuracy decreased from {prev:.2f} to {acc:.2f}."
    return f"Validation accuracy stayed at {acc:.2f}."


# --------------------------------------------------------------------------------------------------------------------
# 6. Workflow interface: what a workflow sees inside the sandbox. `rpc` is provided by sandbox.py and reaches
#    `agent_rpc` below, in this process, which owns the models, the cache and the budget.

AGENT_PRELUDE = '''
class Agent:
    def call_llm(self, prompt_or_messages, temperature=0.0, n=1, json_keys=None, max_tokens=None):
        return rpc("call_llm", {"messages": prompt_or_messages, "temperature": temperature, "n": n,
                                "json_keys": json_keys, "max_tokens": max_tokens})

    def execute_code(self, code, timeout=10):
        return rpc("execute_code", {"code": code, "timeout": timeout})

def __w4s_main__(task):
    return solver(Agent(), task)
'''
INTERFACE_DOC = """agent.call_llm(prompt_or_messages, temperature=0.0, n=1, json_keys=None) -> str
    Ask the executor LLM. prompt_or_messages: a string or a list of {"role", "content"} dicts.
    n > 1 returns a list of n samples (use temperature > 0 for diversity).
    json_keys=["reasoning", "answer"] returns a dict with exactly those keys.
agent.execute_code(code, timeout=10) -> str
    Run Python code that defines solution() (or prints its answer) in a sandbox; returns the result as a string,
    or a string starting with "Error:"."""


def agent_rpc(executor, max_tokens):
    """The parent-side handler of one sample's `agent` calls. Identical requests within a sample get increasing sample
    indices, so a workflow that loops over call_llm(temperature=0.7) gets distinct (and cached) samples. A call with
    a temperature no sampler can use, or a prompt over the cap, fails alone with a ValueError the workflow sees."""
    seen = collections.Counter()
    lock = threading.Lock()

    def one_call(messages, temperature, budget):
        with lock:
            k = json.dumps([messages, temperature])
            sample, seen[k] = seen[k], seen[k] + 1
        return executor.chat(messages, temperature, budget, sample=sample)

    def rpc(method, params):
        if method == "execute_code":
            return execute_code(params)
        messages, temperature, n, budget, keys = executor_request(method, params, max_tokens)
        with cf.ThreadPoolExecutor(n) as pool:  # n samples at once: a local executor batches them
            texts = list(pool.map(lambda _: one_call(messages, temperature, budget), range(n)))
        outs = [parse_json_reply(t, keys) for t in texts] if keys else texts
        return outs[0] if n == 1 else outs

    return rpc


PROMPT_CAP = 400_000  # characters of prompt a call, n included: tokenising 1 MB took the parent 120 MB and 1.4 s


def executor_request(method, params, max_tokens):
    """(messages, temperature, n, budget, json keys) of one call_llm, checked as the executor needs them; the dry run
    reads calls through this too, so no argument behaves differently there. A temperature is clamped into [0, 2];
    NaN, infinite and tiny ones are refused (they made the local sampler fail its batch), as is a prompt over the
    cap."""
    if method != "call_llm":
        raise ValueError(f"unknown agent method {method!r}")
    messages = as_messages(params.get("messages"))
    asked = float(params.get("temperature") or 0.0)  # "0.7" as well as 0.7
    temperature = llm.check_temperature(min(max(asked, 0.0), 2.0) if abs(asked) < float("inf") else asked)
    n = min(max(int(params.get("n") or 1), 1), 10)
    budget = min(int(params.get("max_tokens") or max_tokens), max_tokens)
    size = n * sum(len(m["content"]) for m in messages)
    if size > PROMPT_CAP:
        raise ValueError(f"call_llm: {size} characters of prompt (n={n} included), over the cap of {PROMPT_CAP}")
    keys = params.get("json_keys")
    if keys:
        messages = messages[:-1] + [dict(messages[-1], content=messages[-1]["content"] + "\n\nReply with only a "
                                         f"JSON object with the keys {json.dumps(list(keys))}.")]
    return messages, temperature, n, budget, keys


def execute_code(params):
    return run_snippet(str(params.get("code", "")), timeout=min(float(params.get("timeout") or 10), 60))


def as_messages(x):
    if isinstance(x, str):
        return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": x}]
    if isinstance(x, list) and x and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in x):
        msgs = [{"role": str(m.get("role", "user")), "content": m["content"]} for m in x]
        if msgs[0]["role"] != "system":  # chat templates inject their own default system prompt otherwise
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        return msgs
    raise ValueError("call_llm expects a prompt string or a non-empty list of {'role', 'content'} dicts")


def parse_json_reply(text, keys):
    """Best effort: the first JSON object in the reply; missing keys become ''. Small models wrap JSON in prose.
    Decoded only where an object can start ('{' then '"' or '}'), 16 tries at most, each linear: a greedy brace regex
    took 0.5 s of the parent's CPU on a reply of 32k braces, 18 s on 100k nested '{"a":'."""
    for start in [m.start() for m in re.finditer(r'\{\s*["}]', text)][:16]:
        try:
            obj = json.JSONDecoder().raw_decode(text, start)[0]
            break
        except (ValueError, RecursionError):  # not JSON from here on, or nested past Python's recursion limit
            continue
    else:
        obj = {}
    return {k: obj.get(k, "") if k in obj else (text if k == keys[-1] else "") for k in keys}


def snippet_harness(src):
    """execute_code, inside the sandbox (this function's source is what runs there, in a fresh fork of one warm
    sandbox per process): solution()'s value wins, else the last printed line (the 1.5B executor rarely defines
    solution() as asked); sympy results become LaTeX for MATH."""
    import contextlib, io, linecache, traceback
    out, env = io.StringIO(), {"__name__": "__main__"}
    linecache.cache["snippet.py"] = (len(src), None, src.splitlines(True), "snippet.py")  # traceback shows its lines
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(src, "snippet.py", "exec"), env)
            value = env["solution"]() if callable(env.get("solution")) else None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "snippet.py"]
        return "Error: " + "".join(traceback.format_list(frames)) + f"{type(e).__name__}: {e}"
    if value is None:
        lines = [line.strip() for line in out.getvalue().splitlines() if line.strip()]
        return lines[-1] if lines else ""
    if type(value).__module__.startswith("sympy"):
        import sympy
        return sympy.latex(value)
    return str(value)


SNIPPET_HARNESS = inspect.getsource(snippet_harness)  # read once, not on every execute_code call


def run_snippet(code, timeout):
    harness = sandbox.shared(SNIPPET_HARNESS, filename="harness.py", preimport=("sympy",))
    out = harness.run("snippet_harness", code, timeout=timeout)
    return str(out.value) if out.ok else f"Error: {out.error}"


# --------------------------------------------------------------------------------------------------------------------
# 7. Seed workflows (evaluated first; the archive starts with them)

def cot(agent, task):
    prompt = task + "\n\nThink step by step, then give the final answer as \\boxed{ANSWER}."
    return agent.call_llm(prompt)


def cot_sc(agent, task):
    prompt = task + "\n\nThink step by step, then give the final answer as \\boxed{ANSWER}."
    replies = agent.call_llm(prompt, temperature=0.7, n=5)
    finals = [r.split("boxed{")[-1] for r in replies]
    best = Counter(finals).most_common(1)[0][0]
    return replies[finals.index(best)]


def pot(agent, task):
    prompt = ("Write a Python function solution() that computes the answer to this problem and returns it. "
              "Reply with only one ```python block.\n\n" + task)
    reply = agent.call_llm(prompt)
    code = reply.split("```python")[-1].split("```")[0]
    result = agent.execute_code(code)
    if result.startswith("Error"):
        return agent.call_llm(task + "\n\nThink step by step, then give the final answer as \\boxed{ANSWER}.")
    return "\\boxed{" + result + "}"


def self_refine(agent, task):
    draft = agent.call_llm(task + "\n\nThink step by step, then give the final answer as \\boxed{ANSWER}.")
    feedback = agent.call_llm("Problem:\n" + task + "\n\nProposed solution:\n" + draft +
                              "\n\nCheck each step. List any mistakes, or say 'correct'.")
    if "correct" in feedback.lower()[:200] and "incorrect" not in feedback.lower()[:200]:
        return draft
    return agent.call_llm("Problem:\n" + task + "\n\nDraft:\n" + draft + "\n\nReview:\n" + feedback +
                          "\n\nWrite a corrected solution. End with the final answer as \\boxed{ANSWER}.")


def seed_source(fn, imports=""):
    """A seed as the sandbox runs it and the meta-agent reads it: its source, the function renamed `solver`."""
    return imports + inspect.getsource(fn).replace(f"def {fn.__name__}(", "def solver(", 1)


SEED_WORKFLOWS = {"cot": seed_source(cot), "cot_sc": seed_source(cot_sc, "from collections import Counter\n\n"),
                  "pot": seed_source(pot), "self_refine": seed_source(self_refine)}


# --------------------------------------------------------------------------------------------------------------------
# 8. Near-copy detection (the pre-screen's plumbing): two programs are the same workflow when they differ only in
#    names, comments, dead code and a few characters of their prompts.

def near_copy(code, archive):
    """Name of the archive workflow this code nearly copies, or None: the same structure (see normalized) and
    prompts that differ in at most 5 % or 3 characters. Any change to what the program does, however small, is a
    new workflow: the principles ask for one change at a time. Copies cost evaluation and teach nothing."""
    structure, prompts = normalized(code)
    for w in archive:
        other, other_prompts = normalized(w["code"])
        if structure == other and chars_changed(prompts, other_prompts) <= max(3, 0.05 * len(other_prompts)):
            return w["name"]
    return None


def chars_changed(a, b):
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


def normalized(code):
    """(structure, prompts) of code as it runs, for near-copy detection. The structure is the program with its
    string literals blanked, its local names renamed in order of appearance, names read once inlined, and no comments,
    docstrings, unused imports or statements after a return or raise (a seed with dead code appended is still the
    seed); the prompts are its string literals with whitespace collapsed."""
    try:
        return program_and_prompts(ast.parse(code))
    except (SyntaxError, *UNPARSABLE):  # too deep for ast.unparse: compare the text
        return code, ""


def program_and_prompts(tree):
    """normalized() on a parsed tree, which it edits in place."""
    for body in statement_lists(tree):
        end = next((i for i, s in enumerate(body) if isinstance(s, (ast.Return, ast.Raise))), len(body))
        body[:] = [s for s in body[:end + 1] if not is_docstring(s)] or [ast.Pass()]
    inline_single_uses(tree)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            node.names = [a for a in node.names if bound_name(a) in used]
    tree.body = [s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom)) or s.names]
    imported = {bound_name(a) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    names, prompts = {}, []
    for node in ast.walk(tree):  # breadth-first: two programs that differ only in names get the same numbering
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            prompts.append(" ".join(node.value.split()))
            node.value = ""
        elif isinstance(node, ast.Name) and node.id not in imported and not hasattr(builtins, node.id):
            node.id = names.setdefault(node.id, f"v{len(names)}")
        elif isinstance(node, ast.arg):
            node.arg = names.setdefault(node.arg, f"v{len(names)}")
        elif isinstance(node, ast.FunctionDef) and node.name != "solver":
            node.name = names.setdefault(node.name, f"v{len(names)}")
    return ast.unparse(tree), "\n".join(prompts)


def inline_single_uses(tree):
    """Replace a name assigned once and read once by its value, unless the value asks the executor or runs code:
    `prompt = task + "..."` then `agent.call_llm(prompt)` is `agent.call_llm(task + "...")`. Default-13's turn 1
    evaluated the pot seed twice, its prompt variable inlined, and rewarded it +0.5 for beating the first seed."""
    count = collections.Counter((n.id, type(n.ctx)) for n in ast.walk(tree) if isinstance(n, ast.Name))
    values = {}
    for body in statement_lists(tree):
        for stmt in list(body):
            name = stmt.targets[0].id if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) \
                and len(stmt.targets) == 1 else None
            if name and count[name, ast.Store] == 1 and count[name, ast.Load] == 1 and not calls_agent(stmt.value):
                values[name] = stmt.value
                body.remove(stmt)
        body[:] = body or [ast.Pass()]

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node):
            value = values.pop(node.id, None) if isinstance(node.ctx, ast.Load) else None
            return node if value is None else self.visit(value)
    Inline().visit(tree)


def statement_lists(tree):
    """Every list of statements in the tree: bodies, else branches, finally blocks (edited in place by callers)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                yield body


def calls_agent(node):
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in (
        "call_llm", "execute_code") for n in ast.walk(node))


def bound_name(alias):
    return (alias.asname or alias.name).split(".")[0]


def is_docstring(stmt):
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


# --------------------------------------------------------------------------------------------------------------------
# 9. Run records: trajectory rows, report.json (atomic), best_workflow.py; report.py writes the files
#    (trajectory.jsonl, curve.png, report.html)

def save_report(run, result, status):
    """report.json (atomic) and best_workflow.py from what the loop has yielded so far, plus curve.png."""
    best = result.get("best")
    # Everything that differs between two invocations of the same run (timestamps, wall time, what this process
    # paid vs. took from the cache) lives in `invocation`; the rest is the same on a --resume or a cached re-run.
    invocation = dict(started_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run.t0)),
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_seconds=round(time.time() - run.t0, 1),
                      resumed=bool(run.args.resume), paid=run.ledger.summary(paid=True),
                      phase_seconds=dict({k: round(v, 1) for k, v in run.phases.items()},
                                         model_load=round(LLM.load_seconds, 1)))
    report = dict(task=run.args.task, status=status, meta_agent=run.args.meta_agent, executor=run.args.executor,
                  isolation=sandbox.isolation_mode(), usage=run.ledger.summary(),
                  seeds={w["name"]: dict(val=w["val_accuracy"], val_ci=w["val_ci"], code=w["code"],
                                         test=result.get("test", {}).get(w["name"])) for w in result.get("seeds", [])},
                  best=dict(name=best["name"], val=best["val_accuracy"], val_ci=best["val_ci"],
                            test=result.get("test", {}).get(best["name"])) if best else None,
                  history=result["history"], splits=dict(val=[e["id"] for e in run.val],
                                                         test=[e["id"] for e in run.test]),
                  config=saved_config(run), invocation=invocation)
    report_html.write_atomic(os.path.join(run.out, "report.json"), json.dumps(report, indent=1))
    if best:
        report_html.write_atomic(os.path.join(run.out, "best_workflow.py"), f"# {best['name']}: validation accuracy "
                                 f"{best['val_accuracy']:.3f}\n" + best["code"])
    report_html.plot_curve(run.out, report)
    return report


def trajectory_rows(run, record):
    """RLAO's training data: one row per sample of a turn, evaluated or not, with the state it was drawn in."""
    for c in record["candidates"]:
        yield dict(run=os.path.basename(os.path.normpath(run.out)), task=run.args.task, episode=record["episode"],
                   turn=record["turn"], iteration=record["iteration"], sample=c.sample, parent=record["parent"],
                   messages=c.messages, action=c.action, first_action=c.first_action, prefilled=c.prefilled,
                   code=c.code, status=c.status, reason=c.reason, val_accuracy=c.acc, reward=c.reward,
                   chosen=c is record["chosen"], cases=c.cases, debug=c.debug)


def history_entry(record):
    cands, chosen = record["candidates"], record["chosen"]
    return dict(iteration=record["iteration"], accuracies=[c.acc for c in cands], chosen=chosen.acc if chosen else None,
                best=record["best"]["val_accuracy"], drawn=len(cands), evaluated=sum(c.acc is not None for c in cands),
                prefilled=sum(bool(c.prefilled) for c in cands), repaired=sum(bool(c.debug and c.ev) for c in cands),
                pasted=sum(pastes_the_format(c.first_action) for c in cands),
                rejected=dict(collections.Counter(c.status for c in cands if c.status not in ("ok", "discarded"))))


FORMAT_WORDS = {tuple(words[i:i + 6]) for text in (OUTPUT_FORMAT, NEXT_TURN) for words in [text.split()]
                for i in range(len(words) - 5)}


def pastes_the_format(reply):
    """Whether a reply holds six words in a row of the output format's instructions: a small model pastes them."""
    words = reply.split()
    return any(tuple(words[i:i + 6]) in FORMAT_WORDS for i in range(len(words) - 5))


def turn_summary(record, iterations, eta):
    cands, chosen, best = record["candidates"], record["chosen"], record["best"]
    summary = ", ".join(c.status + (f" {c.acc:.2f}" if c.acc is not None else "") for c in cands)
    return (f"iteration {record['iteration']}/{iterations} (episode {record['episode']}, turn {record['turn']}): "
            f"{len(cands)} drawn [{summary}] -> "
            + (f"chose {chosen.acc:.2f} (reward {chosen.reward:+.1f})" if chosen else
               "nothing kept: the conversation goes on from its last kept turn")
            + f"; best {best['val_accuracy']:.2f} ({best['name']}); ETA {eta / 60:.1f} min")


# --------------------------------------------------------------------------------------------------------------------
# CLI

VERSION = 3  # bump when the trajectory/report format changes: --resume refuses a run of another version


@dataclasses.dataclass
class Run:
    """What one invocation holds besides its flags (`args`, read-only after setup): the task and its fixed splits,
    the shared thread pools and ledger, the run directory, the phase timers, and the one thing the run learns as it
    goes, the meta-agent's context size (guarded by `lock`)."""
    args: argparse.Namespace
    task: object  # the task module (benchmarks/): DESCRIPTION, SEEDS, load, score, extract
    val: list
    test: list
    splits: dict  # the whole val and test splits, for --evaluate --limit
    probe: dict  # the dry runs' question (dry_run_example)
    ledger: Ledger
    pool: cf.ThreadPoolExecutor  # every validation sample in flight, across all workflows at once
    meta_pool: cf.ThreadPoolExecutor  # a turn's meta-agent samples (up to 2m at once) and its m candidates
    out: str
    meta_context: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    phases: dict = dataclasses.field(default_factory=dict)
    t0: float = dataclasses.field(default_factory=time.time)


def setup(args):
    """Resolve defaults, load the task and its fixed splits, build the run state and the two LLMs."""
    args = apply_defaults(load_resumed_config(args) if args.resume else args)
    try:
        task = benchmarks.get_task(args.task, args.scorer, args.description)
        val, test = task.load("val"), task.load("test")
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if not val:
        raise UserError(f"task {args.task} has no validation examples")
    ledger = Ledger(args.budget_usd, args.max_calls, prices_for(args))
    run = Run(args=args, task=task, splits=dict(val=val, test=test), ledger=ledger,
              val=validation_split(val, args.seed, args.val_size), probe=dry_run_example(val, args.seed, args.val_size),
              test=random.Random(args.seed + 1).sample(test, min(args.test_size, len(test))),
              pool=cf.ThreadPoolExecutor(args.concurrency), meta_pool=cf.ThreadPoolExecutor(max(2 * args.samples, 1)),
              out=args.out or os.path.join("runs", f"{args.task.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"),
              meta_context=args.meta_context)
    cache = Cache(os.path.join(llm.cache_root(), "calls.sqlite"))
    executor = LLM(args.executor, "executor", ledger, cache, args.concurrency)
    meta = LLM(args.meta_agent, "meta_agent", ledger, cache, args.concurrency)
    return run, executor, meta


def validation_split(rows, seed, size):
    """The run's fixed validation examples."""
    return random.Random(seed).sample(rows, min(size, len(rows)))


def dry_run_example(rows, seed, size):
    """The dry runs' question: a validation example outside the run's validation set, so one the meta-agent is never
    shown (a workflow that hard-codes a question from its feedback never sends this one to the executor, and fails);
    the first validation example where the split has no other. rlao.py finds a logged run's with this too."""
    shown = validation_split(rows, seed, size)
    unseen = [r for r in rows if r not in shown]
    return random.Random(seed).choice(unseen) if unseen else shown[0]


def saved_config(run):
    """config.json: the flags that define the run (what --resume restores), with the run directory chosen."""
    return dict({k: v for k, v in vars(run.args).items() if k not in ("resume", "evaluate", "split", "limit")},
                out=run.out)


def prices_for(args):
    """The price table plus --price; with --budget-usd, every API model must have a price, or the budget would
    count it as free and never stop the run."""
    prices = dict(PRICES)
    for item in args.price or []:
        model, _, pair = item.rpartition("=")
        try:
            prices[model] = tuple(float(x) for x in pair.split(","))
            assert model and len(prices[model]) == 2
        except (ValueError, AssertionError):
            raise UserError(f"--price {item!r}: expected MODEL=IN,OUT (dollars per million tokens)") from None
    for spec in (args.meta_agent, args.executor):
        model = spec.rsplit(":", 1)[1] if spec.startswith("http") else spec
        if args.budget_usd is not None and not is_local_spec(spec) and model not in prices:
            raise UserError(f"--budget-usd cannot count the cost of {model!r} (no known price): add --price "
                            f"{model}=IN,OUT (dollars per million prompt, completion tokens) or use --max-calls")
    return prices


def load_resumed_config(args):
    path = os.path.join(args.resume, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--resume {args.resume}: no config.json there (not a w4s run directory)")
    try:
        saved = json.load(open(path))
    except (ValueError, OSError) as e:
        raise UserError(f"--resume {args.resume}: config.json is unreadable ({e})") from None
    if not isinstance(saved, dict) or saved.get("version") != VERSION:
        saved = saved if isinstance(saved, dict) else {}
        raise UserError(f"--resume {args.resume}: written by w4s format version {saved.get('version')}, this is "
                        f"{VERSION}; start a new run")
    given = {k: v for k, v in vars(parse_args([])).items()}
    for k, v in vars(args).items():  # a flag given explicitly must agree with the run being resumed
        if k in saved and v != given.get(k) and v != saved[k] and k not in ("resume", "out", "budget_usd",
                                                                             "max_calls"):
            raise UserError(f"--resume {args.resume}: that run has {k}={saved[k]!r}, not {v!r}")
    merged = dict(vars(parse_args([])), **{k: v for k, v in saved.items() if k != "version"})
    for k in ("budget_usd", "max_calls"):  # a run stopped by its budget continues with a larger one
        if getattr(args, k) is not None:
            merged[k] = getattr(args, k)
    merged.update(resume=args.resume, out=args.resume)
    return argparse.Namespace(**merged)


def run_evaluate(run, executor):
    """--evaluate: one workflow file (or seed name) on one split, one JSON line out."""
    source = run.args.evaluate
    if source in SEED_WORKFLOWS or source in (getattr(run.task, "EXTRA_SEEDS", {}) or {}):
        code = SEED_WORKFLOWS.get(source) or run.task.EXTRA_SEEDS[source]
    elif os.path.isfile(source):
        code = open(source, encoding="utf-8").read()
    else:
        raise UserError(f"--evaluate {source}: no such file or seed ({', '.join(SEED_WORKFLOWS)})")
    examples = run.val if run.args.split == "val" else run.test
    if run.args.limit:
        examples = run.splits[run.args.split][:run.args.limit]  # the task file was read once, in setup()
    t = time.time()
    ev = evaluate(code, examples, executor, run, desc=f"evaluate {os.path.basename(source)}")
    print(json.dumps(dict(task=run.args.task, split=run.args.split, accuracy=ev.accuracy, ci=ev.ci, n=ev.n,
                          failed=ev.failed, seconds=round(time.time() - t, 3), usage=run.ledger.summary(),
                          errors=[c["error"][:200] for c in ev.cases if c["error"]][:5])))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.report:
            return write_reports(args.report)
        run, executor, meta = setup(args)
        if run.args.evaluate:
            return run_evaluate(run, executor)
        return run_optimization(run, executor, meta)
    except UserError as e:
        print(f"w4s: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the run directory exists: nothing to save
        print("w4s: interrupted", file=sys.stderr)
        return 130


def run_optimization(run, executor, meta):
    """Run the loop and persist every record it yields: trajectory rows (fsynced), report.json, the log line."""
    os.makedirs(run.out, exist_ok=True)
    report_html.write_atomic(os.path.join(run.out, "config.json"),
                             json.dumps(dict(saved_config(run), version=VERSION), indent=1))
    from tqdm import tqdm
    log = lambda msg: tqdm.write(f"[w4s] {msg}", file=sys.stderr)  # noqa: E731 (prints above the progress bars)
    trajectory = report_html.Trajectory(os.path.join(run.out, "trajectory.jsonl"), resume=bool(run.args.resume),
                                        log=log)
    if is_local_spec(run.args.meta_agent) and is_local_spec(run.args.executor):
        log(f"offline: local models, meta-agent {run.args.meta_agent} -> executor {run.args.executor} "
            "(set OPENAI_API_KEY or --executor to use an API)")
    log(f"task {run.args.task}: {len(run.val)} validation / {len(run.test)} test examples, {run.args.iterations} "
        f"iterations x {run.args.samples} samples, sandbox: {sandbox.isolation_mode()}; run dir {run.out}")
    result, status = dict(history=[]), "finished"
    bar = tqdm(total=run.args.iterations, desc="W4S iterations", file=sys.stderr, dynamic_ncols=True)
    try:
        for record in optimize(run, executor, meta, log):
            result["best"] = record["best"]
            if "seeds" in record:
                result["seeds"], started = record["seeds"], time.time()
            else:
                for row in trajectory_rows(run, record):
                    trajectory.write(row)
                result["history"].append(history_entry(record))
                bar.update()
                eta = (time.time() - started) / record["iteration"] * (run.args.iterations - record["iteration"])
                log(turn_summary(record, run.args.iterations, eta))
            save_report(run, result, "running")
        if run.test:
            result["test"] = score_on_test(run, executor, result["seeds"], result["best"], log)
    except BudgetExhausted as e:
        status = "stopped: budget"
        log(f"{e}; saving and stopping")
    except (KeyboardInterrupt, APIFailure) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        bar.close()
        save_report(run, result, "interrupted" if interrupted else "stopped: API error")
        # plain print, not tqdm.write (which redraws the bars below it): this must be the last line on screen
        print(f"\n[w4s] {'interrupted' if interrupted else f'error: {e}'}; progress saved; resume with: python "
              f"w4s.py --resume {run.out}", file=sys.stderr, flush=True)
        run.pool.shutdown(wait=False, cancel_futures=True)
        return 130 if interrupted else 1
    finally:
        bar.close()  # before any last line (an error, how to resume): a bar closed later would be drawn below it
    trajectory.finish()
    report = save_report(run, result, status)
    paid = report["invocation"]["paid"]
    log(f"{status}: best {report['best']['name'] if report['best'] else '-'}; "
        f"{sum(u['prompt'] + u['completion'] for k, u in report['usage'].items() if k != 'total_usd')} tokens, "
        f"${report['usage']['total_usd']:.4f} (this process paid ${paid['total_usd']:.4f} for "
        f"{sum(u['calls'] for k, u in paid.items() if k != 'total_usd')} calls), "
        f"{report['invocation']['wall_seconds'] / 60:.1f} min")
    log("time by phase: " + ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f} min"
                                      for k, v in report["invocation"]["phase_seconds"].items()))
    log(f"report: {report_html.write_report(run.out)}")
    return 0


def write_reports(run_dirs):
    for d in run_dirs:
        if not os.path.exists(os.path.join(d, "report.json")):
            raise UserError(f"--report {d}: no report.json there (not a w4s run directory)")
        print(report_html.write_report(d))
    if len(run_dirs) > 1:
        print(report_html.write_comparison(run_dirs, os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])),
                                                                   "compare.html")))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # after Ctrl-C, threads still blocked in calls or sandboxes would hold a normal exit
