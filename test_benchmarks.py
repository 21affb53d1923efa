"""Tests for benchmarks/: scorers agree with the references, splits are fixed and disjoint, custom tasks fail clearly.
Offline: data comes from W4S_DATA_DIR=../shared/data (or the PyPI data packages) or tiny files written here."""
import os
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
