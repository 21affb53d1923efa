"""Tests for report.py on synthetic run directories (the files w4s.py writes, built here by hand); no network.
The `slow` test opens the page in headless Chromium as a person would."""
import json
import os
import shutil
import subprocess
import time

import pytest

import report

XSS = "<script>alert(1)</script>"
SEEDS = {"cot": "def solver(agent, task):\n    return agent.call_llm(task)\n",
         "pot": "def solver(agent, task):\n    return agent.execute_code(agent.call_llm(task))\n"}
# A 1x1 PNG: enough for the page to inline; the Chromium test draws a real one.
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                         "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a2d0a5"
                         "b40000000049454e44ae426082")


def state(archive):
    """The archive part of w4s.build_state's prompt (the headings report.refined_workflow reads)."""
    parts = [f"## {name}: validation accuracy {acc:.2f}\n```python\n{code.strip()}\n```\n- question: q" for
             name, code, acc in archive]
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": "# Task\nt\n\n" + "\n\n".join(parts)}]


def make_run(path, iterations=3, samples=2, text="plain", curve=TINY_PNG):
    """A run dir: seeds cot (0.40) and pot (0.50); sample 0 of each iteration improves and is chosen."""
    os.makedirs(path, exist_ok=True)
    archive = [("cot", SEEDS["cot"], 0.4), ("pot", SEEDS["pot"], 0.5)]
    rows, history, best = [], [], 0.5
    for it in range(1, iterations + 1):
        messages, accs = state(archive), []
        for j in range(samples):
            acc = round(min(1.0, 0.5 + 0.01 * it) if j == 0 else 0.3, 3)
            code = f"def solver(agent, task):\n    print({text!r})\n    return agent.call_llm(task + ' v{it}.{j}')\n"
            rows.append(dict(run="r", task="math", episode=0, turn=it, iteration=it, sample=j, messages=messages,
                             action=f"Analysis {it}.{j}: {text}\n```python\n{code}```", code=code, status="ok",
                             reason=text if j else "", val_accuracy=acc, reward=1.0 if j == 0 else 0.0,
                             chosen=j == 0, failures=[dict(question=text, got=text, expected=text, correct=False,
                                                           error=text)],
                             debug=[dict(code=code, error=f"NameError: {text}")] if j == 1 else []))
            accs.append(acc)
        archive.append((f"iteration{it}", rows[-samples]["code"], accs[0]))
        best = max(best, accs[0])
        history.append(dict(iteration=it, accuracies=accs, chosen=accs[0], best=best))
    test = dict(accuracy=0.55, ci=[0.45, 0.65], n=100, failed=0)
    rep = dict(task=f"math {text}", status="finished", meta_agent=f"meta {text}", executor="exec", isolation="bwrap",
               usage={"executor": dict(calls=9, cached=0, prompt=1000, completion=500, usd=0.01),
                      "meta_agent": dict(calls=3, cached=0, prompt=300, completion=100, usd=0.002), "total_usd": 0.012},
               wall_seconds=61.0,
               seeds={n: dict(val=a, val_ci=[a - 0.1, a + 0.1], test=test) for n, _, a in archive[:2]},
               best=dict(name=f"iteration{iterations}", val=best, val_ci=[best - 0.1, best + 0.1], test=test),
               history=history, splits={}, config={}, finished_at="2026-01-01T00:00:00")
    with open(os.path.join(path, "report.json"), "w") as f:
        json.dump(rep, f)
    with open(os.path.join(path, "trajectory.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if curve:
        with open(os.path.join(path, "curve.png"), "wb") as f:
            f.write(curve)
    return str(path)


def render(run_dir):
    with open(report.write_report(run_dir), encoding="utf-8") as f:
        return f.read()


def test_page_opens_with_summary_and_seed_vs_best_table(tmp_path):
    page = render(make_run(tmp_path))
    for fact in ("math plain", "meta plain", "bwrap", "finished", "$0.0120", "61 s", "1,000 prompt"):
        assert fact in page
    assert page.index("Seeds vs best") < page.index("Optimisation curve") < page.index("Meta-agent actions")
    assert "seed cot" in page and "best: iteration3" in page
    assert "0.400 [0.30, 0.50]" in page and "0.550 [0.45, 0.65]" in page  # val and test, each with its 95 % CI


def test_curve_png_is_inlined(tmp_path):
    assert "src='data:image/png;base64,iVBORw0KGgo" in render(make_run(tmp_path))


def test_curve_falls_back_to_svg_without_png(tmp_path):
    assert "<svg class='curve'" in render(make_run(tmp_path, curve=None))


def test_model_and_dataset_text_is_escaped(tmp_path):
    run_dir = make_run(tmp_path / "run", text=XSS)
    comparison = open(report.write_comparison([run_dir], str(tmp_path / "c.html")), encoding="utf-8").read()
    for page in (render(run_dir), comparison):
        assert XSS not in page and "alert(1)" in page  # shown, as text
        assert page.count("<script") == 1  # only the page's own expand/collapse script


def test_run_that_stopped_early_renders(tmp_path):
    """A run stopped by its budget or an error: no test scores, no best, no actions, no curve yet."""
    (tmp_path / "report.json").write_text(json.dumps(dict(task="math", status="error", seeds={"cot": dict(
        val=0.4, val_ci=[0.3, 0.5], test=None)}, best=None, history=[])))
    page = render(str(tmp_path))
    assert "seed cot" in page and "Meta-agent actions (0)" in page and "<svg class='curve'" in page


def test_one_row_per_action_with_diff_against_refined_workflow(tmp_path):
    page = render(make_run(tmp_path, iterations=3, samples=2))
    assert page.count("<details class='act") == 6
    assert page.index("Analysis 1.0") < page.index("Analysis 1.1") < page.index("Analysis 2.0")
    assert page.count("diff against pot") == 2  # iteration 1 refines the best seed
    assert page.count("diff against iteration1") == 2 and page.count("diff against iteration2") == 2
    assert "self-debug round 1" in page


def test_comparison_lists_every_run(tmp_path):
    dirs = [make_run(tmp_path / name, iterations=i) for i, name in enumerate(["alpha", "beta", "gamma"], 2)]
    out = report.write_comparison(dirs, str(tmp_path / "compare.html"))
    page = open(out, encoding="utf-8").read()
    for name in ("alpha", "beta", "gamma"):
        assert f"href='{name}/report.html'" in page
    assert page.count("<polyline") == 3


def test_30_iteration_run_renders_quickly(tmp_path):
    run_dir = make_run(tmp_path, iterations=30, samples=3)
    start = time.perf_counter()
    page = render(run_dir)
    seconds = time.perf_counter() - start
    print(f"30 iterations x 3 samples: rendered {len(page) / 1e3:.0f} kB in {seconds:.2f} s")
    assert page.count("<details class='act") == 90 and seconds < 10


CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path, *args):
    """Run headless Chromium offline; returns (stdout, stderr). Console messages go to stderr as ':CONSOLE' lines."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_page_renders_in_chromium_without_console_errors(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = make_run(tmp_path / "run", iterations=8, samples=3, text=XSS, curve=None)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(9), [0.5 + 0.01 * i for i in range(9)], "o-")
    fig.savefig(os.path.join(run_dir, "curve.png"), dpi=110)
    plt.close(fig)
    # A probe, added to a copy only: the DOM dump then says whether the inline curve decoded and the script ran.
    probe = ("<script>addEventListener('load',()=>{const img=document.querySelector('img.curve');setAll(true);"
             "document.body.dataset.curve=img.complete?img.naturalWidth:0;});</script>")
    page = render(run_dir).replace("</body>", probe + "</body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page, encoding="utf-8")
    dom, log = chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", probed.as_uri())
    assert 'data-curve="660"' in dom  # 6 in x 110 dpi: the PNG decoded at its own width
    assert "<th>validation acc. [95% CI]</th>" in dom and dom.count("<details class=\"act") == 24
    assert "alert(1)" in dom and "<script>alert(1)" not in dom
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
    shot = tmp_path / "report.png"
    chromium(tmp_path, "--screenshot=" + str(shot), "--window-size=1200,2000", f"file://{run_dir}/report.html")
    assert shot.stat().st_size > 20_000  # a blank page is ~5 kB
    if os.environ.get("W4S_REPORT_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["W4S_REPORT_SCREENSHOT"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package (/usr/bin/chromium)")
def test_console_error_check_sees_errors(tmp_path):
    """The check above is not vacuous: a page with an uncaught error shows up as a ':CONSOLE' line."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    _, log = chromium(tmp_path, "--dump-dom", bad.as_uri())
    assert any(":CONSOLE" in line and "Uncaught ReferenceError" in line for line in log.splitlines())
