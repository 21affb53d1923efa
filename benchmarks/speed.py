"""How close W4S runs to the physical limit. Every figure is a ratio of two things measured side by side in this run
(these machines are shared and noisy: no absolute time here is a result on its own).

  1. API-bound evaluation  the CoT-SC seed (5 executor calls per sample) on N samples through `w4s.main --evaluate`: the
                           real sandbox and openai client against test_w4s.StubOpenAI on 127.0.0.1, which answers each
                           call after a fixed delay. achieved/ideal with ideal = calls x delay / concurrency; per-call
                           overhead (sandbox -> parent -> client -> back) = wall x concurrency / calls - delay.
  2. Sandbox overhead      Sandbox.run (a fresh fork per task) of the CoT-SC solver with a canned agent vs the same
                           solver called in-process: median / p95 extra ms per sample; ms per RPC call; cold start of
                           one Sandbox (new + first run), in the mode isolation_mode() picks.
  3. Local backend         llm.LocalEngine (continuous batching) under a loop-like arrival pattern -- workflows start at
                           staggered times, each sends k requests at once, prompt lengths and output budgets differ --
                           vs one request at a time on an evenly spread subset of the same requests, greedy; answers
                           compared; peak RSS. llama.cpp single-stream on the same GGUF when llama_cpp is importable.
  4. RLAO trainer          rlao.py's micro-batch step (length-sorted batches, action-only vocabulary projection) vs a
                           plain loop (model(..., labels=), random batches padded to their longest), same data and batch
                           size, forward + backward; padding fraction of each; the same mean NLL per action token.
Left out: the optimiser step (the same in both trainer loops; skipping it keeps the weights, so the loss check, equal),
429 replies, the meta-agent, end-to-end runs (`python w4s.py --task math` is measured on its own), GPUs.
Usage: python benchmarks/speed.py [--quick] [--json] [--threads 1]
"""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not benchmarks/: its math.py shadows math

import argparse, contextlib, io, json, random, resource, statistics, tempfile, threading, time  # noqa: E402

import llm  # noqa: E402
import sandbox  # noqa: E402
import w4s  # noqa: E402

SIZES = {  # name: (full run, --quick, help)
    "samples": (128, 48, "eval: samples per concurrency level (--quick: 16 at concurrency 1)"),
    "sandbox_n": (200, 60, "sandbox: tasks timed"),
    "model": ("embedded:qwen2.5-coder-1.5b", "embedded:smollm2-135m", "local: executor spec"),
    "workflows": (8, 6, "local: concurrently running workflows, with staggered starts"),
    "k": (4, 3, "local: requests each workflow sends at once (CoT-SC-like)"),
    "single": (6, 4, "local: of those, requests also run one at a time (spread over prompt lengths)"),
    "max_tokens": (128, 16, "local: largest output budget (CoT-length replies: decoding, not prefill, dominates)"),
    "gap": (1.0, 0.2, "local: seconds between workflow starts"),
    "rlao_examples": (16, 8, "rlao: trajectory examples"),
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
    a("--rlao-model", default="embedded:smollm2-135m", help="rlao: policy spec")
    a("--batch-size", type=int, default=4, help="rlao: sequences per micro-batch")
    a("--threads", type=int, default=None, help="torch threads (default: torch's). On a CPU busy with other jobs, 1 "
      "keeps OpenMP threads from spinning against them")
    args = p.parse_args(argv)
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
    import test_w4s
    server, tmp = test_w4s.StubOpenAI(delay=args.delay), tempfile.mkdtemp(prefix="w4s-speed-")
    task = os.path.join(tmp, "sums.jsonl")
    with open(task, "w") as f:  # custom tasks keep 20 % of the lines for validation, the rest is the test split
        f.writelines(json.dumps(dict(id=f"s{i}", question=f"Compute {10 + i} + {3 * i}.", answer=str(10 + 4 * i)))
                     + "\n" for i in range(args.samples * 5 // 4 + 2))
    walls, rows, evaluate, root = [], [], w4s.evaluate, llm.CACHE_ROOT

    def timed_evaluate(*a, **kw):  # time evaluate() itself: the run's setup is not evaluation
        t = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            walls.append(time.perf_counter() - t)
    w4s.evaluate = timed_evaluate
    try:
        for c in args.concurrency:
            n = min(args.samples, 16) if args.quick and c == 1 else args.samples
            llm.CACHE_ROOT, out = tempfile.mkdtemp(dir=tmp), io.StringIO()  # a fresh call cache: no hits
            with contextlib.redirect_stdout(out):
                rc = w4s.main(["--task", task, "--scorer", "numeric", "--executor", server.url + ":exec", "--evaluate",
                               "cot_sc", "--split", "test", "--limit", str(n), "--concurrency", str(c)])
            res = json.loads(out.getvalue().strip().splitlines()[-1])
            calls, wall = res["usage"]["executor"]["calls"], walls[-1]
            assert rc == 0 and res["n"] == n and res["failed"] == 0, res
            ideal = calls * args.delay / c
            R[f"eval_ratio_c{c}"] = round(ideal / wall, 3)
            R[f"eval_overhead_ms_c{c}"] = round((wall * c / calls - args.delay) * 1000, 2)
            R[f"eval_raw_c{c}"] = dict(samples=n, calls=calls, wall_s=round(wall, 2), ideal_s=round(ideal, 2))
            rows.append((f"eval achieved/ideal, concurrency {c}", R[f"eval_ratio_c{c}"], ">= 0.8" if c == 32 else "",
                         f"{n} samples, {calls} calls in {wall:.2f} s, ideal {ideal:.2f} s; "
                         f"{R[f'eval_overhead_ms_c{c}']} ms per call beyond {args.delay * 1000:.0f} ms"))
    finally:
        w4s.evaluate, llm.CACHE_ROOT = evaluate, root
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
    reqs, b = requests_for(args), bar(f"local: load {args.model}", 1)
    engine = llm.LocalEngine(args.model)
    engine.generate(reqs[0]["messages"], 0.0, 2, seed=0)  # warm-up: first-call costs belong to neither side
    b.close()
    joins, join = [], engine.join  # count the prefills (a new request joining the running batch)
    engine.join = lambda active, cache, mask, new: (joins.append(len(new)), join(active, cache, mask, new))[1]
    gen = lambda r: engine.generate(r["messages"], 0.0, r["budget"], seed=0)  # noqa: E731
    batched, b = [None] * len(reqs), bar("local: loop arrival pattern", len(reqs))

    def workflow(w, start):
        time.sleep(max(0.0, start - time.perf_counter()))
        threads = [threading.Thread(target=lambda i=i: (batched.__setitem__(i, gen(reqs[i])), b.update()))
                   for i, r in enumerate(reqs) if r["w"] == w]
        [t.start() for t in threads], [t.join() for t in threads]
    t0 = time.perf_counter()
    flows = [threading.Thread(target=workflow, args=(w, t0 + w * args.gap)) for w in range(args.workflows)]
    [t.start() for t in flows], [t.join() for t in flows]
    t_batch, engine.join = time.perf_counter() - t0, join
    b.close()
    subset = sorted({round(j * (len(reqs) - 1) / max(1, args.single - 1)) for j in range(args.single)})
    b, t0 = bar("local: one at a time", len(subset)), time.perf_counter()
    single = {i: (gen(reqs[i]), b.update())[0] for i in subset}
    t_single = time.perf_counter() - t0
    b.close()
    tok_b, tok_1 = sum(x[2] for x in batched), sum(x[2] for x in single.values())
    differ = [i for i in subset if batched[i][0] != single[i][0]]
    for i in differ:  # greedy near-ties can flip: bf16 rounding depends on the batch's shape
        x, y = batched[i][0], single[i][0]
        k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        print(f"  local: request {i} differs from char {k}: batched {x[k:k + 40]!r} vs one at a time {y[k:k + 40]!r}")
    R.update(local_model=args.model, local_tok_s=round(tok_b / t_batch, 2),
             local_single_tok_s=round(tok_1 / t_single, 2),
             local_batch_speedup=round(tok_b / t_batch / (tok_1 / t_single), 2), local_differ=differ,
             local_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
             local_raw=dict(requests=len(reqs), batched_tokens=tok_b, batched_s=round(t_batch, 1), compared=len(subset),
                            single_tokens=tok_1, single_s=round(t_single, 1), prefills=len(joins),
                            prompt_tokens=[min(x[1] for x in batched), max(x[1] for x in batched)]))
    rows = [("local: loop arrivals / one at a time", R["local_batch_speedup"], ">= 10", f"{R['local_tok_s']} vs "
             f"{R['local_single_tok_s']} tok/s, {args.model} ({R['local_raw']}); {len(differ)} of {len(subset)} "
             f"answers differ; peak RSS {R['local_peak_rss_mb']} MB")]
    try:
        import llama_cpp
    except ImportError:
        return rows + [("local / llama.cpp one stream", "skipped", ">= 2", "llama_cpp is not importable")]
    d, f = llm.embedded_gguf(args.model.split(":", 1)[1])
    lcpp = llama_cpp.Llama(model_path=os.path.join(d, f), n_ctx=2048, n_threads=args.threads or os.cpu_count(),
                          verbose=False)
    t0, toks = time.perf_counter(), 0
    for i in subset:  # the same prompts and budgets as the one-at-a-time side, through the same chat template
        text = engine.tok.apply_chat_template(reqs[i]["messages"], add_generation_prompt=True, tokenize=False)
        toks += lcpp(text, max_tokens=reqs[i]["budget"], temperature=0.0)["usage"]["completion_tokens"]
    R["llamacpp_tok_s"] = round(toks / (time.perf_counter() - t0), 2)
    R["local_vs_llamacpp"] = round(R["local_tok_s"] / R["llamacpp_tok_s"], 2)
    return rows + [("local / llama.cpp one stream", R["local_vs_llamacpp"], ">= 2", f"{R['llamacpp_tok_s']} tok/s")]


# ------------------------------------------------------------------------------------------------- 4. RLAO trainer
def bench_rlao(args, R):
    import torch
    import rlao
    torch.manual_seed(0)
    model, tok = rlao.load_policy(args.rlao_model)
    rng, scale, words = random.Random(0), 1 if args.quick else 2, "archive workflow accuracy solver answer".split()
    exs = [dict(messages=[{"role": "system", "content": w4s.META_SYSTEM},  # trajectory states vary widely in length
                          {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 120) * scale))}],
                action=" ".join(rng.choices(words, k=rng.randint(5, 40) * scale)), reward=0.5)
           for _ in range(args.rlao_examples)]
    data = [rlao.encode(tok, e, 1 << 16) for e in exs]
    lengths, pad = [len(x["ids"]) for x in data], tok.pad_token_id or 0
    sorted_b, naive_b = (rlao.make_batches(lengths, args.batch_size, 0, sort=s) for s in (True, False))
    policy, bf16 = rlao.ActionLogProbs(model), rlao.use_bf16("auto", torch.device("cpu"))

    def rlao_step(items, train):  # what rlao.train does per micro-batch
        logp, mask = policy(*rlao.collate(items, pad, "cpu"))
        if train:
            rlao.rlao_loss(logp, mask, torch.ones(len(items)), len(data)).backward()
        return -(logp * mask).sum().item(), mask.sum().item()

    def plain_step(items, train):  # the reference: pad to the longest, labels=-100 off the action
        T = max(len(x["ids"]) for x in items)
        ids = torch.tensor([x["ids"] + [pad] * (T - len(x["ids"])) for x in items])
        attn = torch.tensor([[1] * len(x["ids"]) + [0] * (T - len(x["ids"])) for x in items])
        labels = torch.tensor([[-100] * x["n_prompt"] + x["ids"][x["n_prompt"]:] + [-100] * (T - len(x["ids"]))
                               for x in items])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward() if train else None
        n = (labels[:, 1:] != -100).sum().item()
        return loss.item() * n, n

    def run(step, batches, train=True):
        t0, nll, n = time.perf_counter(), 0.0, 0
        with contextlib.nullcontext() if train else torch.no_grad():
            for bt in batches:
                a, c = step([data[i] for i in bt], train)
                nll, n = nll + a, n + c
                model.zero_grad(set_to_none=True)
                pb.update()
        return time.perf_counter() - t0, nll / n

    model.train().to(torch.bfloat16 if bf16 else torch.float32)
    pb = bar(f"rlao {args.rlao_model} {'bf16' if bf16 else 'fp32'}", 1 + 2 * len(sorted_b))
    run(rlao_step, naive_b[:1])  # warm-up
    (t_plain, nll_plain), (t_rlao, nll_rlao) = run(plain_step, naive_b), run(rlao_step, sorted_b)
    pb.close()
    R["rlao_loss_diff_bf16"] = float(f"{abs(nll_plain - nll_rlao):.2e}")
    if bf16:  # bf16 rounding depends on batch shapes: check the loss identity in fp32
        model.float()
        pb = bar("rlao: fp32 loss check", 2 * len(sorted_b))
        nll_plain, nll_rlao = run(plain_step, naive_b, False)[1], run(rlao_step, sorted_b, False)[1]
        pb.close()
    real = sum(lengths)
    R.update(rlao_model=args.rlao_model, rlao_dtype="bf16" if bf16 else "fp32", rlao_tok_s=round(real / t_rlao, 1),
             rlao_plain_tok_s=round(real / t_plain, 1), rlao_speed_ratio=round(t_plain / t_rlao, 2),
             rlao_padding=round(rlao.padding_fraction(sorted_b, lengths), 3),
             rlao_plain_padding=round(rlao.padding_fraction(naive_b, lengths), 3),
             rlao_loss_diff=float(f"{abs(nll_plain - nll_rlao):.2e}"), rlao_nll=round(nll_rlao, 5), rlao_tokens=real)
    return [("rlao / plain loop, tok/s", R["rlao_speed_ratio"], ">= 1.2", f"{R['rlao_tok_s']} vs "
             f"{R['rlao_plain_tok_s']} tok/s ({args.rlao_model}, {R['rlao_dtype']}, {real} tokens); padding "
             f"{R['rlao_padding']:.1%} vs {R['rlao_plain_padding']:.1%}; |loss diff| {R['rlao_loss_diff']} fp32, "
             f"{R['rlao_loss_diff_bf16']} bf16")]


def main(argv=None):
    args = get_args(argv)
    R, t0 = dict(load_avg=os.getloadavg()[0], cpus=os.cpu_count(), quick=args.quick, threads=args.threads), time.time()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
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
