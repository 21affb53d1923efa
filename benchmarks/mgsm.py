"""MGSM: 250 GSM8K problems translated into 10 languages (+ English). `mgsm` = all languages (220 validation /
2530 test), `mgsm-XX` = one language (20 / 230). Every language uses the same shuffle, so a problem is validation in
all languages or test in all: its translation can never leak from validation into test.
Each example carries 'language' so the report can give per-language accuracy.

Score: numeric match of the final number. Leaves out: the MGSM few-shot exemplars and native-script numerals.
"""
import types
from . import MGSM_LANGUAGES, data_path, split, numeric_match, extract_number as extract

DESCRIPTION = ('Grade-school math word problems written in one of 11 languages (MGSM: Bengali, German, English, '
               'Spanish, French, Japanese, Russian, Swahili, Telugu, Thai, Chinese). Each answer is a single number; '
               'return only that number, e.g. "42".')
SEEDS = ['cot', 'cot_sc', 'pot', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 20, 0


def load(which, languages=MGSM_LANGUAGES):
    examples = []
    for lang in languages:
        with open(data_path(f'mgsm/mgsm_{lang}.tsv', download=True), encoding='utf-8') as f:
            rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
        examples += split([{'id': f'mgsm-{lang}/{i}', 'language': lang, 'question': q, 'answer': a.replace(',', '')}
                           for i, (q, a) in enumerate(rows)], which, N_VAL, SEED)
    return examples


def score(example, answer):
    return numeric_match(answer, example['answer'])


def for_language(lang):
    """The task mgsm-XX: the same names as this module, restricted to one language."""
    return types.SimpleNamespace(DESCRIPTION=DESCRIPTION, SEEDS=SEEDS, EXTRA_SEEDS=EXTRA_SEEDS, score=score,
                                 extract=extract, load=lambda which: load(which, [lang]))
