"""A task from the user's own JSONL file: `python w4s.py --task my_task.jsonl --scorer numeric`.

One JSON object per line with `question` and `answer` (for --scorer code: `test` instead of `answer`, plus an optional
`entry_point`); optional `id` and `choices` (a list of options, shown as "A) ..." lines and scored by letter).
The split is reproducible: a seeded shuffle of the lines, 20 % (at most 100) for validation, the rest for test.
The description for the meta-agent is --description, else the text of a sidecar file next to the data
(my_task.jsonl -> my_task.description.txt), else a generic sentence naming the scorer.
Scorers: exact (case- and space-insensitive), numeric, math (MATH's math-verify), choice (option letter), f1 (DROP F1,
answer may be a list of references), code (the reply's code and `test` run in two sandboxed processes, see
benchmarks.run_tests; a `test` defining check(candidate) is called with entry_point, one defining check() is called
bare, plain asserts just run; the names `test` uses and does not define are the code's, called with plain data).
Leaves out: other file formats (CSV, Parquet) and per-example scorers.
"""
import json, os, re, types
from . import CODE_SEED, split, extract_answer, extract_number, numeric_match, choice_letter, extract_code, run_tests
from . import math as bmath, drop

SCORERS = ['exact', 'numeric', 'math', 'choice', 'f1', 'code']


def _code_score(example, answer):
    entry, tests = example.get('entry_point'), f"{example['test']}\n"
    if re.search(r'def check\(\s*\w', example['test']):
        entry = entry or 'solution'
        tests += f"\ncheck({entry})\n"
    elif 'def check()' in example['test']:
        tests += '\ncheck()\n'
    return run_tests(extract_code(answer, example.get('entry_point')), tests, entry, timeout=10.0)


def _exact(example, answer):
    same = lambda text: ' '.join(str(text).split()).casefold()  # noqa: E731
    return float(same(extract_answer(answer)) == same(example['answer']))


SCORE = {
    'exact': _exact,
    'numeric': lambda e, a: numeric_match(a, e['answer']),
    'math': bmath.score,
    'choice': lambda e, a: float(choice_letter(a, 'ABCDEFGHIJ'[:len(e.get('choices') or 'ABCD')]) == e['answer']),
    'f1': drop.score,
    'code': _code_score,
}
EXTRACT = {  # the part of the reply each scorer compares, shown to the meta-agent in its feedback
    'exact': lambda e, a: extract_answer(a),
    'numeric': extract_number,
    'math': bmath.extract,
    'choice': lambda e, a: choice_letter(a, 'ABCDEFGHIJ'[:len(e.get('choices') or 'ABCD')]) or '',
    'f1': drop.extract,
    'code': lambda e, a: extract_code(a, e.get('entry_point')),
}


def read_examples(path, scorer):
    examples, name = [], os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}: line {n}: not valid JSON ({e})') from None
            for field in ['question', 'test' if scorer == 'code' else 'answer']:
                if not isinstance(row, dict) or field not in row:
                    raise ValueError(f'{path}: line {n}: missing field "{field}" (scorer {scorer})')
            row = dict(row, id=str(row.get('id', f'{name}/{n}')), answer=row.get('answer'))
            if row.get('choices'):
                letters = 'ABCDEFGHIJ'[:len(row['choices'])]
                row['question'] += ''.join(f'\n{k}) {c}' for k, c in zip(letters, row['choices']))
                if row['answer'] in row['choices']:  # the gold may be given as the option's text or its letter
                    row['answer'] = letters[row['choices'].index(row['answer'])]
            examples.append(row)
    if len({e['id'] for e in examples}) != len(examples):
        raise ValueError(f'{path}: ids are not unique')
    if len(examples) < 2:
        raise ValueError(f'{path}: needs at least 2 examples (one for validation, one for test)')
    return examples


def make_task(path, scorer=None, description=None):
    scorer = scorer or 'exact'
    if scorer not in SCORERS:
        raise ValueError(f'unknown scorer {scorer!r}; choose one of {", ".join(SCORERS)}')
    examples = read_examples(path, scorer)
    sidecar = os.path.splitext(path)[0] + '.description.txt'
    if description is None and os.path.exists(sidecar):
        description = open(sidecar, encoding='utf-8').read().strip()
    n_val = max(1, min(100, len(examples) // 5))
    return types.SimpleNamespace(
        DESCRIPTION=description or f'Questions from {os.path.basename(path)}; answers are scored by {scorer} match.',
        SEEDS=['cot', 'self_refine'] if scorer == 'code' else ['cot', 'cot_sc', 'pot', 'self_refine'],
        EXTRA_SEEDS={'code_self_test': CODE_SEED} if scorer == 'code' else {},
        load=lambda which: split(examples, which, n_val, seed=0), score=SCORE[scorer], extract=EXTRACT[scorer])
