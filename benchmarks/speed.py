"""How close W4S runs to the physical limit. Every figure is a ratio of two things measured side by side in this run
(these machines are shared and noisy: no absolute time here is a result on its own).

  1. API-bound evaluation  the CoT-SC seed (5 executor calls per sample) on N samples through `w4s.main --evaluate`: the
                           real sandbox and openai client against benchmarks/openai_stub.py on 127.0.0.1, which answers each
                           call after a fixed delay. achieved/ideal with ideal = calls x delay / concurrency; per-call
                           overhead (sandbox -> parent -> client -> back) = wall x concurrency / calls - delay.
  2. Sandbox overhead      Sandbox.run (a fresh fork per task) of the CoT-SC solver with a canned agent vs the same
                           solver called in-process: median / p95 extra ms per sample; ms per RPC call; cold start of
                           one Sandbox (new + first run), in the mode isolation_mode() picks.
  3. Local backend         llm.LocalEngine under a loop-like arrival pattern -- workflows start at staggered times,
                           each sends k requests at once, prompt lengths and output budgets differ -- against the
                           previous engine (llm.py of --old-engine, read from git history), the engine with its
                           drafts off (MAX_DRAFT = 0), with no prompt prefix shared, and with int8 linear layers
                           (`@int8`), each in a process of its own:
                           tokens/s, answers compared, the longest step a decoding request waited behind a prefill, one
                           decode step at batch 32 vs the bare matmuls of the same shapes, the whole pattern's wall time
                           vs the bare matmuls of the engine's own steps (the floor no scheduling of those steps
                           beats), peak RSS; and the engine vs
                           one request at a time on an evenly spread subset of the same requests, greedy.
  4. RLAO trainer          rlao.py's micro-batch step (a state's prompt encoded once for its K actions, action-only
                           vocabulary projection) vs a plain loop (model(..., labels=), each action with its own copy of
                           the prompt, the K padded to their longest), same data, forward + backward: action tokens
                           per second; the same mean NLL per action token.
Left out: llama.cpp (no wheel for these machines), the optimiser step (the same in both trainer loops; skipping it keeps the weights, so the loss check, equal),
429 replies, the meta-agent, end-to-end runs (`python w4s.py --task math` is measured on its own), GPUs.
Usage, from the repository root: python -m benchmarks.speed [--quick] [--json] [--threads 1]
"""
import argparse, contextlib, io, json, os, random, resource, statistics, subprocess, sys, tempfile, threading, time, types

import llm
import sandbox
import w4s

SIZES = {  # name: (full run, --quick, help)
    "samples": (128, 48, "eval: samples per concurrency level (--quick: 16 at concurrency 1)"),
    "sandbox_n": (200, 60, "sandbox: tasks timed"),
    "model": ("embedded:qwen2.5-coder-1.5b", "embedded:smollm2-135m", "local: executor spec"),
    "workflows": (8, 6, "local: concurrently running workflows, with staggered starts"),
    "k": (4, 3, "local: requests each workflow sends at once (CoT-SC-like)"),
    "single": (6, 4, "local: of those, requests also run one at a time (spread over prompt lengths)"),
    "max_tokens": (128, 16, "local: largest output budget (CoT-length replies: decoding, not prefill, dominates)"),
    "gap": (1.0, 0.2, "local: seconds between workflow starts"),
    "rlao_states": (4, 2, "rlao: W4S states, each with --rlao-k sampled actions"),
    "rlao_k": (4, 4, "rlao: K, actions sampled per state (a micro-batch: the state's prompt once, its K actions)"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--quick", action="store_true", help="smaller sizes and the 135M model: under 2 minutes")
    a("--json", action="store_true", help="end with one JSON line of all figures")
    a("--phases", default="eval,sandbox,local,rlao", help="comma-separated subset to run")
    a("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="eval: concurrency levels")
    a("--delay", type=float, default=0.2, help="eval: the server's fixed seconds per call")
    for name, (full, quick, text) in SIZES.items():
        a("--" + name.replace("_", "-"), type=type(full), help=f"{text} (default {full}; --quick {quick})")
    a("--old-engine", default="2643442", help="local: the commit whose llm.py is the previous engine (default: the "
      "engine issue 17 measured, HF DynamicCache and whole joins)")
    a("--rlao-model", default="embedded:smollm2-135m", help="rlao: policy spec")
    a("--threads", type=int, default=None, help="torch threads (default: torch's). On a CPU busy with other jobs, 1 "
      "keeps OpenMP threads from spinning against them")
    # the child process of bench_local
    a("--local-engine", choices=["new", "nodraft", "noshare", "old", "int8"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name, (full, quick, _) in SIZES.items():
        setattr(args, name, getattr(args, name) or (quick if args.quick else full))
    return args


def bar(desc, total):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def ms(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


# ------------------------------------------------------------------------------------------------- 1. evaluation
def bench_eval(args, R):
    from benchmarks.openai_stub import OpenAIStub
    server, tmp = OpenAIStub(delay=args.delay), tempfile.mkdtemp(prefix="w4s-speed-")
    task = os.path.join(tmp, "sums.jsonl")
    with open(task, "w") as f:  # custom tasks keep 20 % of the lines for validation, the rest is the test split
        f.writelines(json.dumps(dict(id=f"s{i}", question=f"Compute {10 + i} + {3 * i}.", answer=str(10 + 4 * i)))
                     + "\n" for i in range(args.samples * 5 // 4 + 2))
    rows, cache = [], os.environ.get("W4S_CACHE_DIR")
    try:
        for c in args.concurrency:
            n = min(args.samples, 16) if args.quick and c == 1 else args.samples
            os.environ["W4S_CACHE_DIR"], out = tempfile.mkdtemp(dir=tmp), io.StringIO()  # a fresh call cache: no hits
            with contextlib.redirect_stdout(out):
                rc = w4s.main(["--task", task, "--scorer", "numeric", "--executor", server.url + ":exec", "--evaluate",
                               "cot_sc", "--split", "test", "--limit", str(n), "--concurrency", str(c)])
            res = json.loads(out.getvalue().strip().splitlines()[-1])
            calls, wall = res["usage"]["executor"]["calls"], res["seconds"]  # evaluate() alone, not the run's setup
            assert rc == 0 and res["n"] == n and res["failed"] == 0, res
            ideal = calls * args.delay / c
            R[f"eval_ratio_c{c}"] = round(ideal / wall, 3)
            R[f"eval_overhead_ms_c{c}"] = round((wall * c / calls - args.delay) * 1000, 2)
            R[f"eval_raw_c{c}"] = dict(samples=n, calls=calls, wall_s=round(wall, 2), ideal_s=round(ideal, 2))
            rows.append((f"eval achieved/ideal, concurrency {c}", R[f"eval_ratio_c{c}"], ">= 0.8" if c == 32 else "",
                         f"{n} samples, {calls} calls in {wall:.2f} s, ideal {ideal:.2f} s; "
                         f"{R[f'eval_overhead_ms_c{c}']} ms per call beyond {args.delay * 1000:.0f} ms"))
    finally:
        if cache is None:
            os.environ.pop("W4S_CACHE_DIR", None)
        else:
            os.environ["W4S_CACHE_DIR"] = cache
        server.shutdown()
    return rows


# ------------------------------------------------------------------------------------------------- 2. sandbox
def bench_sandbox(args, R):
    code, n, task, prelude = w4s.SEED_WORKFLOWS["cot_sc"], args.sandbox_n, "Compute 2 + 3.", w4s.AGENT_PRELUDE
    rpc = lambda method, params: json.loads(json.dumps(["The sum is \\boxed{5}."] * 5))  # noqa: E731
    scope = {"rpc": rpc}
    exec(prelude + code, scope)  # the same solver in this process (JSON round trips as over the RPC)
    b = bar("sandbox", 2 * n + 5)
    inproc = sorted(ms(lambda: json.loads(json.dumps(scope["__w4s_main__"](task)))) for _ in range(n))
    b.update(n)
    colds = sorted(ms(lambda: (sandbox.run_once(code, "__w4s_main__", task, prelude=prelude, rpc=rpc), b.update()))
                   for _ in range(5))
    with sandbox.Sandbox(code, prelude=prelude) as box:
        assert box.run("__w4s_main__", task, rpc=rpc).ok
        runs = sorted(ms(lambda: (box.run("__w4s_main__", task, rpc=rpc), b.update())) for _ in range(n))
    with sandbox.Sandbox("def calls(k):\n    for i in range(k):\n        rpc('echo', {'i': i})\n") as box:
        box.run("calls", 1, rpc=lambda m, p: p)
        one, many = (ms(lambda: box.run("calls", k, rpc=lambda m, p: p, max_calls=k)) for k in (1, 1001))
    b.close()
    over = [r - statistics.median(inproc) for r in runs]
    R.update(sandbox_mode=sandbox.isolation_mode(), sandbox_overhead_ms=round(statistics.median(over), 2),
             sandbox_overhead_p95_ms=round(over[int(0.95 * n)], 2), sandbox_cold_start_ms=round(colds[2], 1),
             sandbox_rpc_ms=round((many - one) / 1000, 3), sandbox_inprocess_ms=round(statistics.median(inproc), 4))
    return [("sandbox overhead, ms per sample", R["sandbox_overhead_ms"], "<= 2", f"{R['sandbox_mode']}: p95 "
             f"{R['sandbox_overhead_p95_ms']} ms; in-process {R['sandbox_inprocess_ms']} ms; {R['sandbox_rpc_ms']} ms "
             "per RPC call"),
            ("sandbox cold start, ms", R["sandbox_cold_start_ms"], "<= 100", "new + first run, median of 5")]


# ------------------------------------------------------------------------------------------------- 3. local backend
def requests_for(args):
    """Workflow w: a question of its own length, k CoT-SC-like variants, an output budget of its own."""
    rng, reqs = random.Random(0), []
    facts = ["A shop sells pencils in boxes.", "Each box is packed by hand.", "The shop opens at nine.",
             "Prices have not changed this year.", "Some customers pay in cash."]
    for w in range(args.workflows):
        q = " ".join(rng.choice(facts) for _ in range(1 + 4 * w)) + f" Compute {rng.randint(10, 99)} + {w}."
        for j in range(args.k):
            reqs.append(dict(w=w, budget=max(4, args.max_tokens * (4 - w % 3) // 4), messages=w4s.as_messages(
                f"{q}\n\nThink step by step (attempt {j + 1}), then give the final answer as \\boxed{{ANSWER}}.")))
    return reqs


def bench_local(args, R):
    """Each engine in a process of its own (a 1.5B model twice would double the RSS and blur each one's figure):
    the engine as it is, the same engine with its drafts off, then with no prompt prefix shared, then the engine of
    --old-engine, then the engine with int8 linear layers, on the same requests."""
    new, nodraft, noshare, old, int8 = (run_engine_child(args, which)
                                        for which in ("new", "nodraft", "noshare", "old", "int8"))
    differ = [i for i, (x, y) in enumerate(zip(new["texts"], old["texts"])) if x != y]
    int8_differ = [i for i, (x, y) in enumerate(zip(new["texts"], int8["texts"])) if x != y]
    R.update(local_model=args.model, local_tok_s=new["tok_s"], local_old_tok_s=old["tok_s"],
             local_vs_old=round(new["tok_s"] / old["tok_s"], 2), local_single_tok_s=new["single_tok_s"],
             local_nodraft_tok_s=nodraft["tok_s"], local_vs_nodraft=round(new["tok_s"] / nodraft["tok_s"], 2),
             local_drafts=new["drafts"], local_noshare_tok_s=noshare["tok_s"],
             local_vs_noshare=round(new["tok_s"] / noshare["tok_s"], 2), local_shared=new["shared"],
             local_batch_speedup=round(new["tok_s"] / new["single_tok_s"], 2), local_differ=new["differ"],
             local_old_differ=differ, local_step_s=new["step_s"], local_old_step_s=old["step_s"],
             local_matmul_s=new["matmul_s"], local_step_vs_matmul=round(new["step_s"] / new["matmul_s"], 2),
             local_peak_rss_mb=new["rss_mb"], local_old_peak_rss_mb=old["rss_mb"],
             local_int8_tok_s=int8["tok_s"], local_int8_vs_old=round(int8["tok_s"] / old["tok_s"], 2),
             local_int8_vs_new=round(int8["tok_s"] / new["tok_s"], 2), local_int8_differ=int8_differ,
             local_int8_step_s=int8["step_s"], local_int8_peak_rss_mb=int8["rss_mb"],
             local_floor_tok_s=round(new["raw"]["tokens"] / new["floor_s"], 2),
             local_vs_floor=round(new["raw"]["seconds"] / new["floor_s"], 2),
             local_raw=dict(new=new["raw"], old=old["raw"], int8=int8["raw"]))
    rows = [("local: loop arrivals, engine / previous engine", R["local_vs_old"], ">= 2",
             f"{new['tok_s']} vs {old['tok_s']} tok/s, {args.model}, {args.old_engine}'s engine built in the same run; "
             f"{len(differ)} of {len(new['texts'])} greedy answers differ between the two; peak RSS "
             f"{new['rss_mb']} vs {old['rss_mb']} MB"),
            ("local: loop arrivals, int8 engine / previous engine", R["local_int8_vs_old"], ">= 2",
             f"{int8['tok_s']} vs {old['tok_s']} tok/s, {args.model}@int8 (opt-in; {R['local_int8_vs_new']}x the bf16 "
             f"engine); {len(int8_differ)} of {len(new['texts'])} greedy answers differ from the bf16 engine's; "
             f"decode step at batch 32 {int8['step_s']} s; peak RSS {int8['rss_mb']} MB"),
            ("local: loop arrivals, wall / bare matmuls of the same steps", R["local_vs_floor"], "",
             f"{new['raw']['seconds']} s vs {new['floor_s']} s: {new['raw']['steps']} steps of "
             f"{new['raw']['mean_rows_per_step']} token rows on average; at the matmul floor these steps would give "
             f"{R['local_floor_tok_s']} tok/s"),
            ("local: loop arrivals, drafts / no drafts", R["local_vs_nodraft"], "", f"{new['tok_s']} vs "
             f"{nodraft['tok_s']} tok/s, the same engine with MAX_DRAFT = 0; {new['drafts'][0]} of "
             f"{new['drafts'][1]} drafted tokens kept"),
            ("local: loop arrivals, shared prefixes / none", R["local_vs_noshare"], "", f"{new['tok_s']} vs "
             f"{noshare['tok_s']} tok/s, the same engine with no prompt prefix copied; {new['shared'][0]} of "
             f"{new['shared'][1]} prompt tokens copied from another request's slot instead of prefilled"),
            ("local: decode step at batch 32 / bare matmuls", R["local_step_vs_matmul"], "<= 1.3",
             f"{new['step_s']} s vs {new['matmul_s']} s for the same matmul shapes alone (previous engine's step "
             f"{old['step_s']} s), context {STEP_CONTEXT} tokens"),
            ("local: longest wait behind a prefill, s", new["wait_s"], "", f"{new['wait_tokens']} prompt tokens in "
             f"that step (chunk {new['chunk']}); previous engine {old['wait_s']} s behind {old['wait_tokens']} tokens"),
            ("local: loop arrivals / one at a time", R["local_batch_speedup"], ">= 10", f"{new['tok_s']} vs "
             f"{new['single_tok_s']} tok/s; {len(new['differ'])} of {new['raw']['compared']} greedy answers differ "
             f"between the two ({args.model}, {'bf16' if new['bf16'] else 'fp32'})")]
    return rows


STEP_CONTEXT = 300


def run_engine_child(args, which):
    """This script again, with --local-engine: returns the one JSON line it prints."""
    argv = args.argv + ["--phases", "local", "--local-engine", which]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.speed"] + argv, stdout=subprocess.PIPE, text=True,
                         check=True, cwd=root).stdout
    return json.loads(out.strip().splitlines()[-1])


def engine_module(which, rev):
    """llm as it is, or the llm.py of --old-engine read from git history (so no copy of the old code is kept)."""
    if which != "old":
        return llm
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = subprocess.check_output(["git", "-C", root, "show", f"{rev}:llm.py"], text=True)
    mod = types.ModuleType("llm_" + rev)
    exec(compile(code, f"{rev}:llm.py", "exec"), mod.__dict__)
    return mod


def local_child(args, which):
    """The figures of one engine: tokens/s under the loop's arrival pattern, the longest step a decoding request
    waited behind a prefill, a decode step at batch 32; for the new engine also one request at a time and the bare
    matmuls of its decode step."""
    import torch
    reqs, mod = requests_for(args), engine_module(which, args.old_engine)
    engine = mod.LocalEngine(args.model + ("@int8" if which == "int8" else ""))
    if which == "nodraft":
        engine.MAX_DRAFT = 0
    if which == "noshare":
        engine.prefix_donor = lambda r: (None, 0)
    engine.generate(reqs[0]["messages"], 0.0, 2, seed=0)  # warm-up: first-call costs belong to neither side
    waits = record_prefill_waits(engine)
    rows_per_step = record_rows_per_step(mod) if which == "new" else []
    gen = lambda r: engine.generate(r["messages"], 0.0, r["budget"], seed=0)  # noqa: E731
    batched, b = [None] * len(reqs), bar(f"local ({which} engine): loop arrival pattern", len(reqs))

    def workflow(w, start):
        time.sleep(max(0.0, start - time.perf_counter()))
        threads = [threading.Thread(target=lambda i=i: (batched.__setitem__(i, gen(reqs[i])), b.update()))
                   for i, r in enumerate(reqs) if r["w"] == w]
        [t.start() for t in threads], [t.join() for t in threads]
    t0 = time.perf_counter()
    flows = [threading.Thread(target=workflow, args=(w, t0 + w * args.gap)) for w in range(args.workflows)]
    [t.start() for t in flows], [t.join() for t in flows]
    t_batch = time.perf_counter() - t0
    b.close()
    steps = list(rows_per_step)  # the arrival pattern's own steps only: later phases run more
    tok_b = sum(x[2] for x in batched)
    wait_s, wait_tokens = max(waits, default=(0.0, 0))
    res = dict(tok_s=round(tok_b / t_batch, 2), texts=[x[0] for x in batched], wait_s=round(wait_s, 2),
               drafts=[getattr(engine, "accepted", 0), getattr(engine, "drafted", 0)],
               shared=[getattr(engine, "shared", 0), getattr(engine, "prompted", 0)],
               wait_tokens=wait_tokens, chunk=getattr(engine, "CHUNK", None), bf16=llm.best_cpu_dtype() != torch.float32,
               raw=dict(requests=len(reqs), tokens=tok_b, seconds=round(t_batch, 1), steps_behind_prefill=len(waits),
                        prompt_tokens=[min(x[1] for x in batched), max(x[1] for x in batched)]))
    if which == "new":
        subset = sorted({round(j * (len(reqs) - 1) / max(1, args.single - 1)) for j in range(args.single)})
        b, t0 = bar("local: one at a time", len(subset)), time.perf_counter()
        single = {i: (gen(reqs[i]), b.update())[0] for i in subset}
        res["single_tok_s"] = round(sum(x[2] for x in single.values()) / (time.perf_counter() - t0), 2)
        b.close()
        res["differ"] = [i for i in subset if batched[i][0] != single[i][0]]
        res["raw"]["compared"] = len(subset)
        for i in res["differ"]:  # greedy near-ties can flip: bf16 rounding depends on the batch's shape
            x, y = batched[i][0], single[i][0]
            k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            print(f"  local: request {i} differs from char {k}: batched {x[k:k + 40]!r} vs one at a time "
                  f"{y[k:k + 40]!r}", file=sys.stderr)
    with torch.inference_mode():
        res["step_s"] = round((joined_decode_step if hasattr(engine, "join") else new_decode_step)(engine), 3)
        res["matmul_s"] = round(bare_matmuls(engine.model), 3) if which == "new" else None
        if which == "new":
            res["floor_s"], res["raw"]["steps"] = round(matmul_floor(engine.model, steps), 1), len(steps)
            res["raw"]["mean_rows_per_step"] = round(sum(steps) / max(1, len(steps)), 1)
    res["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(res), flush=True)
    # The figures are out: skip the interpreter's teardown, during which torch's thread pool and the engine's daemon
    # thread sometimes end in std::terminate (SIGABRT; 1 of 2 children of the engine of 666f031 too).
    os._exit(0)


def record_prefill_waits(engine):
    """(seconds, prompt tokens) of every engine step that prefilled while other requests were decoding."""
    waits = []
    if hasattr(engine, "join"):  # 2643442's engine: a join prefills the new requests' prompts as one padded batch
        join = engine.join

        def timed_join(active, cache, mask, new):
            t = time.perf_counter()
            try:
                return join(active, cache, mask, new)
            finally:
                if active:
                    tokens = len({tuple(r["ids"]) for r in new}) * max(len(r["ids"]) for r in new)
                    waits.append((time.perf_counter() - t, tokens))
        engine.join = timed_join
    else:
        step = engine.step

        def timed_step(decoding, prefilling):
            tokens = min(engine.CHUNK, sum(len(r["ids"]) - r["fed"] for r in prefilling))
            t = time.perf_counter()
            try:
                return step(decoding, prefilling)
            finally:
                if decoding and tokens:
                    waits.append((time.perf_counter() - t, tokens))
        engine.step = timed_step
    return waits


def record_rows_per_step(mod):
    """Token rows of every forward pass the engine makes from now on (decode tokens, prompt chunks, drafts)."""
    rows, forward = [], mod.forward

    def counted(model, kv, decode, prefill, verify=()):
        rows.append(len(decode) + sum(len(tokens) for _, tokens, _ in list(prefill) + list(verify)))
        return forward(model, kv, decode, prefill, verify)
    mod.forward = counted
    return rows


def matmul_floor(model, steps, sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
    """Seconds the bare matmuls of these steps take (every linear layer over each step's rows; rows between two
    measured sizes interpolated): no engine that takes the same steps runs faster, whatever its attention and
    bookkeeping cost."""
    times = {m: bare_matmuls(model, batch=m) for m in sizes}

    def at(m):
        lo = max((s for s in sizes if s <= m), default=sizes[0])
        hi = min((s for s in sizes if s >= m), default=sizes[-1])
        if lo == hi:
            return times[lo] * (m / lo if m > sizes[-1] else 1)
        return times[lo] + (times[hi] - times[lo]) * (m - lo) / (hi - lo)
    return sum(at(m) for m in steps)


def step_prompt(engine):
    return engine.tok("Count the pencils in every box. " * STEP_CONTEXT)["input_ids"][:STEP_CONTEXT]


def new_decode_step(engine, batch=32, reps=3):
    """Median seconds of one decode step of `batch` requests, each with about STEP_CONTEXT tokens of context: one
    prompt sent `batch` times through `generate` (prefilled once, the slot copied: a step's cost depends on the
    context, not on what it says), timing the engine's own steps that decode all of them and prefill nothing. (Driving
    `step` from this thread instead raced the engine's thread for its slots.)"""
    text, step, times = engine.tok.decode(step_prompt(engine)), engine.step, []

    def timed_step(decoding, prefilling):
        t = time.perf_counter()
        try:
            return step(decoding, prefilling)
        finally:
            if len(decoding) == batch and not prefilling:
                times.append(time.perf_counter() - t)
    engine.step = timed_step
    threads = [threading.Thread(target=engine.generate, args=(w4s.as_messages(text), 0.0, reps + 1, 0))
               for _ in range(batch)]
    [t.start() for t in threads], [t.join() for t in threads]
    engine.step = step
    return statistics.median(times) if times else float("nan")


def joined_decode_step(engine, batch=32, reps=3):
    ids = step_prompt(engine)
    running = [dict(ids=ids, out=[], temperature=0.0, max_tokens=10 ** 6, stop=None) for _ in range(batch)]
    active, cache, mask = engine.join([], None, None, running)
    times = []
    for _ in range(reps):
        times.append(ms(lambda: engine.step(active, cache, mask)) / 1000)
        mask = engine.torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
    return statistics.median(times)


def bare_matmuls(model, batch=32, reps=3):
    """Median seconds of the matmuls of one decode step alone: every linear layer of the model applied to `batch`
    rows."""
    import torch
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    return statistics.median(ms(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights]) / 1000
                             for _ in range(reps))


# ------------------------------------------------------------------------------------------------- 4. RLAO trainer
def bench_rlao(args, R):
    import torch
    import rlao
    torch.manual_seed(0)
    model, tok = rlao.load_policy(args.rlao_model)
    rng, scale, words = random.Random(0), 1 if args.quick else 4, "archive workflow accuracy solver answer".split()
    exs = []
    for s in range(args.rlao_states):  # W4S states are long (2-4k tokens) and K actions are sampled on each
        state = [{"role": "system", "content": w4s.META_SYSTEM},
                 {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(200, 400) * scale))}]
        exs += [dict(messages=state, action=" ".join(rng.choices(words, k=rng.randint(20, 60) * scale)), reward=0.5)
                for _ in range(args.rlao_k)]
    data = [rlao.encode(tok, e, 1 << 16) for e in exs]
    batches, pad = rlao.make_batches(data, args.rlao_k, 0), tok.pad_token_id or 0
    policy, bf16 = rlao.ActionLogProbs(model), rlao.use_bf16("auto", torch.device("cpu"))

    def rlao_step(items, train):  # what rlao.train does per micro-batch: the state's prompt once, its K actions
        logp, mask = policy(rlao.pack(items, "cpu"))
        if train:
            rlao.rlao_loss(logp, mask, torch.ones(len(items)), len(data)).backward()
        return -(logp * mask).sum().item(), mask.sum().item()

    def plain_step(items, train):  # the reference: each action with its own copy of the prompt, padded, labels=-100
        T = max(len(x["ids"]) for x in items)
        ids = torch.tensor([x["ids"] + [pad] * (T - len(x["ids"])) for x in items])
        attn = torch.tensor([[1] * len(x["ids"]) + [0] * (T - len(x["ids"])) for x in items])
        labels = torch.tensor([[-100] * x["n_prompt"] + x["ids"][x["n_prompt"]:] + [-100] * (T - len(x["ids"]))
                               for x in items])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward() if train else None
        n = (labels[:, 1:] != -100).sum().item()
        return loss.item() * n, n

    def run(step, train=True):
        t0, nll, n = time.perf_counter(), 0.0, 0
        with contextlib.nullcontext() if train else torch.no_grad():
            for bt in batches:
                a, c = step([data[i] for i in bt], train)
                nll, n = nll + a, n + c
                model.zero_grad(set_to_none=True)
                pb.update()
        return time.perf_counter() - t0, nll / n

    model.train().to(torch.bfloat16 if bf16 else torch.float32)
    pb = bar(f"rlao {args.rlao_model} {'bf16' if bf16 else 'fp32'}", 2 * len(batches) + 1)
    rlao_step([data[i] for i in batches[0]], True)  # warm-up
    pb.update()
    (t_plain, nll_plain), (t_rlao, nll_rlao) = run(plain_step), run(rlao_step)
    pb.close()
    R["rlao_loss_diff_bf16"] = float(f"{abs(nll_plain - nll_rlao):.2e}")
    if bf16:  # bf16 rounding depends on shapes: check the loss identity in fp32
        model.float()
        pb = bar("rlao: fp32 loss check", 2 * len(batches))
        nll_plain, nll_rlao = run(plain_step, False)[1], run(rlao_step, False)[1]
        pb.close()
    actions = sum(len(x["ids"]) - x["n_prompt"] for x in data)
    R.update(rlao_model=args.rlao_model, rlao_dtype="bf16" if bf16 else "fp32", rlao_k=args.rlao_k,
             rlao_action_tok_s=round(actions / t_rlao, 1), rlao_plain_action_tok_s=round(actions / t_plain, 1),
             rlao_speed_ratio=round(t_plain / t_rlao, 2), rlao_loss_diff=float(f"{abs(nll_plain - nll_rlao):.2e}"),
             rlao_nll=round(nll_rlao, 5), rlao_action_tokens=actions, rlao_tokens=sum(len(x["ids"]) for x in data))
    return [(f"rlao shared prompt / unshared, action tok/s (K={args.rlao_k})", R["rlao_speed_ratio"], ">= 3",
             f"{R['rlao_action_tok_s']} vs {R['rlao_plain_action_tok_s']} action tok/s ({args.rlao_model}, "
             f"{R['rlao_dtype']}, {args.rlao_states} states x {args.rlao_k} actions, {actions} action tokens of "
             f"{R['rlao_tokens']}); |loss diff| {R['rlao_loss_diff']} fp32, {R['rlao_loss_diff_bf16']} bf16")]


def main(argv=None):
    args = get_args(argv)
    R, t0 = dict(load_avg=os.getloadavg()[0], cpus=os.cpu_count(), quick=args.quick, threads=args.threads), time.time()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.local_engine:
        return local_child(args, args.local_engine)
    phases, rows = dict(eval=bench_eval, sandbox=bench_sandbox, local=bench_local, rlao=bench_rlao), []
    for name in args.phases.split(","):
        print(f"[speed] {name} ...", file=sys.stderr)
        rows += phases[name](args, R)
    R["load_avg_end"], R["seconds"] = os.getloadavg()[0], round(time.time() - t0)
    print(f"\nspeed.py{' --quick' if args.quick else ''}: {R['cpus']} CPUs, 1-minute load average {R['load_avg']:.1f} "
          f"at start, {R['load_avg_end']:.1f} at end; {R['seconds']} s")
    w = max(len(r[0]) for r in rows)
    print(f"{'figure':{w}s}  {'ratio':>8s}  {'goal':8s}  raw numbers")
    for name, ratio, goal, raw in rows:
        print(f"{name:{w}s}  {str(ratio):>8s}  {goal:8s}  {raw}")
    if args.json:
        print(json.dumps(R))
    return 0


if __name__ == "__main__":
    sys.exit(main())
