"""DROP (discrete reasoning over paragraphs), dev set in the ADAS format the W4S paper uses: 200 validation /
9336 test questions. Several references per question ('|'-separated in the data).

Score: token-level F1 as the official DROP evaluation (drop_eval.py) defines it: lower-case, tokenise on spaces and
hyphens, drop punctuation (not inside numbers, nor a full stop after one: "70.09." is 70.09, not 7009) and articles,
write numbers as floats, compare token sets; F1 is 0 when the reference has numbers and none of them appears in the
answer; max over references, rounded to 2 decimals. The answer is the reply's last \\boxed{} or what follows "the
answer is", else the whole reply (as ADAS scores it); only its last TAIL characters are read.
Leaves out: multi-span alignment (ADAS and W4S score each reference as one span, and so do we).
"""
import re, string
from . import data_path, read_jsonl, split, extract_answer

DESCRIPTION = ('Reading comprehension with discrete reasoning (DROP): the task text is a passage and a question '
               'needing counting, arithmetic, sorting or span extraction. Return only the short answer: a number, a '
               'date or a few words from the passage.')
SEEDS = ['cot', 'cot_sc', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 200, 0


def load(which):
    rows = read_jsonl(data_path('drop_v0_dev.jsonl.gz', download=True))
    examples = [{'id': f'drop/{i}', 'question': re.sub(r'\s*Answer:\s*$', '', r['context']).strip(),
                 'answer': r['ref_text'].split('|')} for i, r in enumerate(rows)]
    return split(examples, which, N_VAL, SEED)


def _is_number(token):
    try:
        float(token)
        return True
    except ValueError:
        return False


def _tokens(text):
    out = []
    for token in re.split(' |-', str(text).lower()):
        bare = token.rstrip(string.punctuation)  # "70.09." ends a sentence: the number 70.09, not 7009
        token = token if _is_number(token) else bare if _is_number(bare) else \
            ''.join(c for c in token if c not in string.punctuation)
        token = str(float(token)) if _is_number(token) else token
        out += re.sub(r'\b(a|an|the)\b', ' ', token).split()
    return set(out)


def f1(answer, reference):
    pred, gold = _tokens(answer), _tokens(reference)
    gold_numbers = {t for t in gold if _is_number(t)}
    if gold_numbers and not gold_numbers & pred:  # right words, wrong number: no credit
        return 0.0
    common = len(pred & gold)
    precision = common / len(pred) if pred else 1.0
    recall = common / len(gold) if gold else 1.0
    return round(2 * precision * recall / (precision + recall), 2) if common or not (pred or gold) else 0.0


def extract(example, answer):
    return extract_answer(answer)  # a CoT reply's \boxed{} answer, else the whole reply


def score(example, answer):
    refs, answer = example['answer'], extract(example, answer)
    return max(f1(answer, ref) for ref in (refs if isinstance(refs, list) else [refs]))
