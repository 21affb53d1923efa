"""What a W4S run leaves on disk: trajectory.jsonl (Trajectory: append + fsync, safe to --resume), curve.png, and
report.html, one self-contained page per run, plus a comparison page for several runs.

write_report(run_dir) reads report.json, trajectory.jsonl and curve.png (written by w4s.py) and writes
RUN_DIR/report.html: the run summary and seed-vs-best scores, the optimisation curve, then one expandable row per
meta-agent action (analysis, highlighted workflow, diff against the workflow it refined, failure cases, self-debug
rounds). write_comparison(run_dirs, out_path) draws every run's best-so-far curve and a table of final scores.

Left out on purpose: no network (the plot is an inline image, CSS and JS are inline), no imports of w4s (this module
only reads files), no live view of a running run (re-render instead). Every string that came from a model, a dataset
or a file is escaped: a workflow that prints <script> shows as text.
"""
import base64
import difflib
import html
import json
import os
import threading
from urllib.parse import quote

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer, PythonLexer

FORMATTER = HtmlFormatter(cssclass="hl")
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1150px;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}pre{white-space:pre-wrap;margin:4px 0}
.grid{display:grid;grid-template-columns:repeat(5,7em) 6em 1fr;gap:4px;padding:3px 6px}
.head{font-weight:bold;background:#f3f3f3}details.act{border-top:1px solid #ddd}
details.act>summary{cursor:pointer;list-style:none}details.act>summary:hover{background:#f7f7ff}
details.act[open]>summary{background:#eef}.body{padding:4px 14px 12px}.chosen{background:#e9f8e9}
.st-error,.st-near-copy,.st-unextractable,.st-broken,.st-discarded{color:#a33}.hl{background:#f8f8f8;padding:2px 6px}
.err{background:#fff3f3}img.curve{max-width:100%}h3{margin:12px 0 4px;font-size:14px}
""" + FORMATTER.get_style_defs(".hl")
# The one script: expand/collapse all actions (the slow test checks the page logs no console errors).
SCRIPT = """function setAll(open){document.querySelectorAll('details.act').forEach(d=>{d.open=open;});}"""


def esc(value):
    return html.escape(str(value), quote=True)


def load_run(run_dir):
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    rows = []
    path = os.path.join(run_dir, "trajectory.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]  # a crash can leave no partial line (fsync'd)
    return report, rows


def fmt_acc(acc, ci=None):
    if acc is None:
        return "–"
    return f"{acc:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def fmt_cost(report):
    return f"${(report.get('usage') or {}).get('total_usd') or 0:.4f}"


def fmt_test(scores):
    """A workflow's test accuracy and CI; '–' when the test split was skipped (--test-size 0) or not reached yet."""
    test = scores.get("test") or {}
    return fmt_acc(test.get("accuracy"), test.get("ci"))


def page(title, body):
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
            f"</head><body>{body}<script>{SCRIPT}</script></body></html>")


def table(header, rows):
    """Cells are HTML already: callers escape what they put in. header None: a key/value table."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def summary_section(report):
    usage = report.get("usage") or {}
    when = report.get("invocation") or report  # w4s.py keeps timestamps in `invocation`; older runs at the top
    tokens = "; ".join(f"{r}: {u.get('calls', 0)} calls, {u.get('prompt', 0):,} prompt + {u.get('completion', 0):,} "
                       "completion tokens" for r, u in usage.items() if isinstance(u, dict))
    facts = [("task", report.get("task")), ("meta-agent", report.get("meta_agent")),
             ("executor", report.get("executor")), ("status", report.get("status")),
             ("isolation", report.get("isolation")), ("cost", fmt_cost(report)),
             ("wall time", f"{when.get('wall_seconds') or 0:.0f} s"), ("finished", when.get("finished_at"))]
    return table(None, [(f"<b>{k}</b>", esc(v)) for k, v in facts + [("tokens", tokens or "–")]])


def scores_section(report):
    entries = [(f"seed {name}", s) for name, s in (report.get("seeds") or {}).items()]
    if report.get("best"):
        entries.append((f"best: {report['best']['name']}", report["best"]))
    rows = [(esc(label), fmt_acc(s.get("val"), s.get("val_ci")), fmt_test(s),
             esc((s.get("test") or {}).get("n", "–"))) for label, s in entries]
    return table(("workflow", "validation acc. [95% CI]", "test acc. [95% CI]", "test n"), rows)


def svg_text(x, y, text, size=10, anchor="middle", color="#222"):
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' fill='{color}'>{esc(text)}</text>"


def svg_curves(series, plot_w=560, plot_h=220, pad=36):
    """series: [(label, [(iteration, accuracy)])] -> inline SVG (no plotting library in the page); the legend sits
    right of the plot so it never hides a curve. Used for comparisons and when curve.png is missing."""
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    xmax = max([x for _, pts in series for x, _ in pts] + [1])
    sx = lambda x: pad + x / xmax * plot_w  # noqa: E731 (two tiny coordinate maps)
    sy = lambda y: pad + (1 - y) * plot_h  # noqa: E731
    parts = [f"<path d='M{pad},{sy(1)}V{sy(0)}H{sx(xmax)}' fill='none' stroke='#999'/>",
             svg_text(sx(xmax / 2), sy(0) + 30, "iteration (0: best seed)", size=11)]
    parts += [svg_text(pad - 6, sy(v) + 4, f"{v:.1f}", anchor="end") for v in (0, 0.5, 1)]
    parts += [svg_text(sx(x), sy(0) + 14, x) for x in (0, xmax)]
    for i, (label, pts) in enumerate(series):
        color, pts = colors[i % len(colors)], [(x, y) for x, y in pts if y is not None]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{coords}'/>")
        final = f" ({pts[-1][1]:.3f})" if pts else ""
        parts.append(svg_text(sx(xmax) + 12, pad + 16 * i, f"{label}{final}", size=11, anchor="start", color=color))
    return (f"<svg class='curve' xmlns='http://www.w3.org/2000/svg' width='{plot_w + pad + 220}' "
            f"height='{plot_h + 2 * pad + 10}' role='img'>{''.join(parts)}</svg>")


def best_so_far(report):
    seed_best = max([s.get("val") or 0 for s in (report.get("seeds") or {}).values()] or [0])
    return [(0, seed_best)] + [(h["iteration"], h.get("best")) for h in report.get("history") or []]


def curve_section(run_dir, report):
    path = os.path.join(run_dir, "curve.png")
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return f"<img class='curve' alt='optimisation curve' src='data:image/png;base64,{data}'>"
    return svg_curves([("best so far", best_so_far(report))])


def workflow_codes(report, rows):
    """Name -> code of every workflow an action can refine: the seeds and each turn's chosen workflow."""
    codes = {name: s.get("code") for name, s in (report.get("seeds") or {}).items()}
    codes.update({f"iteration{r['iteration']}": r.get("code") for r in rows if r.get("chosen")})
    return codes


def analysis_of(action):
    """The meta-agent's reasoning: its reply up to the first code fence."""
    return (action or "").split("```", 1)[0].strip()


def diff_html(base, code):
    if not base or not code:
        return "<p>no workflow to compare with</p>"
    name, old = base
    lines = difflib.unified_diff(old.strip().splitlines(), code.strip().splitlines(), name, "this action", lineterm="")
    text = "\n".join(lines)
    return highlight(text, DiffLexer(), FORMATTER) if text else f"<p>identical to {esc(name)}</p>"


def cases_html(cases):
    rows = [("✔" if c.get("correct") else "✘", f"<pre>{esc(c.get('question', ''))}</pre>",
             f"<pre>{esc(c.get('extracted', ''))}</pre>", f"<pre>{esc(c.get('expected', ''))}</pre>",
             f"<pre>{esc((c.get('got') or '')[-300:])}</pre>", f"<pre>{esc(c.get('error') or '')}</pre>")
            for c in cases]
    return table(("", "question", "answer compared", "correct answer", "end of the output", "error"), rows) \
        if rows else "<p>none</p>"


def debug_html(rounds):
    """Each repair round: the workflow it was shown, what failed, and the meta-agent's reply."""
    return "".join(f"<h3>repair round {i + 1}: what failed, as shown to the meta-agent</h3><pre class='err'>"
                   f"{esc(r.get('error', ''))}</pre>" + code_html(r.get("code"))
                   + (f"<h3>its repair</h3><pre>{esc(r['reply'])}</pre>" if r.get("reply") else "")
                   for i, r in enumerate(rounds))


def fmt_reward(r):
    return "–" if r is None else f"{r:+.2f}"


def code_html(code):
    return highlight(code, PythonLexer(), FORMATTER) if code else "<p>no workflow</p>"


def action_row(row, codes):
    chosen, status = row.get("chosen"), esc(row.get("status"))
    cells = [row.get("episode"), row.get("turn"), row.get("iteration"), row.get("sample")]
    summary = "".join(f"<span>{esc(c)}</span>" for c in cells) + (
        f"<span>{fmt_acc(row.get('val_accuracy'))}</span><span>{fmt_reward(row.get('reward'))}</span>"
        f"<span class='st-{status}'>{'✔ chosen' if chosen else ''} {status} {esc(row.get('reason') or '')}</span>")
    code = row.get("code")
    parent = row.get("parent")
    base = (parent, codes[parent]) if codes.get(parent) else None
    body = [f"<h3>analysis</h3><pre>{esc(analysis_of(row.get('action'))) or '–'}</pre>",
            "<h3>workflow</h3>" + code_html(code),
            f"<h3>diff against {esc(base[0]) if base else 'nothing'}</h3>" + diff_html(base, code),
            "<h3>validation cases, failures first (the meta-agent's feedback when this action is chosen)</h3>"
            + cases_html(row.get("cases") or [])]
    if row.get("debug"):
        body.append(debug_html(row["debug"]))
    if row.get("prefilled"):
        body.append(f"<h3>the reply had no code: it was continued from this prefill</h3><pre>"
                    f"{esc(row['prefilled'])}</pre>")
    if row.get("first_action") and row["first_action"] != row.get("action"):
        body.append(f"<h3>the meta-agent's own reply, before completion and repair</h3><pre>"
                    f"{esc(row['first_action'])}</pre>")
    return (f"<details class='act{' chosen' if chosen else ''}'><summary class='grid'>{summary}</summary>"
            f"<div class='body'>{''.join(body)}</div></details>")


class Trajectory:
    """Append + fsync of whole lines. A --resume replays the run from the cache, so the same rows come again in the
    same order: a row equal to the line already on disk is skipped (lines written before a kill are never lost), a
    torn last line (kill -9 mid-write) is dropped, and the first row that differs replaces the rest of the file."""

    def __init__(self, path, resume=False, log=None):
        self.lock = threading.Lock()
        self.old, self.offsets, self.i, end = [], [], 0, 0
        if resume and os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.read().splitlines(keepends=True)
            for n, line in enumerate(lines, 1):
                try:
                    whole = line.endswith(b"\n") and isinstance(json.loads(line), dict)
                except ValueError:
                    whole = False
                if not whole:
                    (log or print)(f"trajectory.jsonl: dropped a torn line {n} of {len(lines)} (a kill mid-write)")
                    break
                self.old.append(line)
                self.offsets.append(end)
                end += len(line)
            self.f = open(path, "r+b")
            self.f.truncate(end)
            self.f.seek(end)
        else:
            self.f = open(path, "wb")  # a new run starts the file anew

    def write(self, row):
        line = (json.dumps(row) + "\n").encode("utf-8")
        with self.lock:
            if self.i < len(self.old):
                if self.old[self.i] == line:  # already on disk from before the interruption
                    self.i += 1
                    return
                self.f.seek(self.offsets[self.i])  # the replay differs from here on: it wins
                self.f.truncate()
                self.old = self.old[:self.i]
            self.f.write(line)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.i += 1

    def finish(self):
        """The run ended normally: rows beyond what it wrote (from an older, longer attempt) are stale."""
        with self.lock:
            if self.i < len(self.old):
                self.f.seek(self.offsets[self.i])
                self.f.truncate()
                self.old = self.old[:self.i]
            self.f.flush()
            os.fsync(self.f.fileno())


def plot_curve(out, report):
    if not report["seeds"]:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hist = report["history"]
    for h in hist:
        ax.scatter([h["iteration"]] * len([a for a in h["accuracies"] if a is not None]),
                   [a for a in h["accuracies"] if a is not None], color="lightgray", s=12)
    ax.plot([h["iteration"] for h in hist], [h["chosen"] for h in hist], "o-", label="chosen (best of m)")
    ax.step([0] + [h["iteration"] for h in hist], [max(s["val"] for s in report["seeds"].values())] +
            [h["best"] for h in hist], where="post", label="best so far")
    for i, (name, s) in enumerate(report["seeds"].items()):
        ax.axhline(s["val"], ls="--", lw=0.8, color=f"C{i + 2}", label=f"seed {name}")
    ax.set(xlabel="iteration", ylabel="validation accuracy", title=f"W4S on {report['task']}", ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    plt.close(fig)


def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(run_dir):
    """Render RUN_DIR/report.html from the run's files; returns its path."""
    report, rows = load_run(run_dir)
    codes = workflow_codes(report, rows)
    header = "".join(f"<span>{h}</span>" for h in ("episode", "turn", "iteration", "sample", "val acc.", "reward",
                                                    "status and reason"))
    body = (f"<h1>W4S run on {esc(report.get('task'))}</h1>{summary_section(report)}"
            f"<h2>Seeds vs best</h2>{scores_section(report)}<h2>Optimisation curve</h2>{curve_section(run_dir, report)}"
            f"<h2>Meta-agent actions ({len(rows)})</h2><button onclick='setAll(true)'>expand all</button> "
            f"<button onclick='setAll(false)'>collapse all</button><div class='grid head'>{header}</div>"
            + "".join(action_row(r, codes) for r in rows))
    path = os.path.join(run_dir, "report.html")
    write_atomic(path, page(f"W4S: {report.get('task')}", body))
    return path


def run_labels(run_dirs):
    """Distinct short names: paths relative to the runs' common folder (runs/a/out, runs/b/out -> a/out, b/out)."""
    full = [os.path.abspath(d) for d in run_dirs]
    common = os.path.commonpath(full) if len(set(full)) > 1 else os.path.dirname(full[0])
    return [os.path.relpath(d, common) for d in full]


def write_comparison(run_dirs, out_path):
    """One page comparing runs: every run's best-so-far curve and a table of final scores; returns out_path."""
    reports = [load_run(d)[0] for d in run_dirs]
    labels = run_labels(run_dirs)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    rows = []
    for d, label, report in zip(run_dirs, labels, reports):
        best = report.get("best") or {}
        link = quote(os.path.relpath(os.path.join(os.path.abspath(d), "report.html"), out_dir))
        rows.append((f"<a href='{esc(link)}'>{esc(label)}</a>", esc(report.get("task")),
                     esc(report.get("meta_agent")), esc(report.get("executor")), esc(best.get("name", "–")),
                     fmt_acc(best.get("val"), best.get("val_ci")), fmt_test(best), fmt_cost(report),
                     esc(report.get("status"))))
    curves = svg_curves([(label, best_so_far(r)) for label, r in zip(labels, reports)])
    body = (f"<h1>W4S: {len(reports)} runs compared</h1><h2>Best validation accuracy so far</h2>{curves}"
            "<h2>Final scores</h2>" + table(("run", "task", "meta-agent", "executor", "best", "val [95% CI]",
                                              "test [95% CI]", "cost", "status"), rows))
    write_atomic(out_path, page("W4S comparison", body))
    return out_path
