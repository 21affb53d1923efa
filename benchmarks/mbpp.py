"""MBPP (sanitized "Mostly Basic Python Problems"), split 86 validation / 341 test as in AFlow and W4S (the W4S
release of the split files: $W4S_DATA_DIR, the cache, or a download checked against SHA256SUMS).

The task text is the problem statement and the function's signature plus its first test, so the workflow knows the
name and the calling convention, as in the original MBPP prompt. Score: pass@1 — the reply's code (the last ```python
block defining the function) runs in a sandboxed process of its own, the hidden check() with all tests in another,
calling the function through benchmarks.run_tests; a timeout.
Leaves out: MBPP's unsanitized 974-problem version and its few-shot prompt.
"""
from . import CODE_SEED, check_split, data_path, read_jsonl, extract_code, run_tests

DESCRIPTION = ('Python programming problems (MBPP). The task text states the problem, the function signature and one '
               'example test; return the complete Python code of the function (with any imports it needs). It is '
               'scored by running hidden unit tests.')
SEEDS = ['cot', 'self_refine']
EXTRA_SEEDS = {'code_self_test': CODE_SEED}
TIMEOUT = 10.0


def load(which):
    check_split(which)
    rows = read_jsonl(data_path(f'mbpp_{"validate" if which == "val" else "test"}.jsonl', download=True))
    return [dict(r, id=f"mbpp/{r['task_id']}", answer=r['code'],
                 question=f"{r['prompt'].rstrip()}\n\nYour code should pass this test:\n{r['test_list'][0]}")
            for r in rows]


def extract(example, answer):
    return extract_code(answer, example['entry_point'])  # the program the hidden tests run


def score(example, answer):
    code = extract(example, answer)
    imports = '\n'.join(example.get('test_imports') or [])
    return run_tests(f"{imports}\n{code}\n", f"{example['test']}\n\ncheck()\n", example['entry_point'],
                     context=imports, timeout=TIMEOUT)
