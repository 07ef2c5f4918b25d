"""The docs' pictures and performance tables, drawn from the runs kept in docs/assets/runs/.

`python scripts/make_figures.py` reads what `python scripts/docs_runs.py` kept (each run's outputs and the
NAME.json that says where they came from) and writes, in docs/assets/:

- architecture.svg: one frozen base, three LoRA adapters, and what flows between the roles;
- debug-print.svg: the first and the last debug print of the learning run, rendered from its ANSI colours;
- learning-curve.svg: the learning run's training loss and held-out exact match (its metrics.jsonl);
- serving.svg: requests/s and latency against concurrent clients (`python -m bench --serve --json`);
- data-prep.svg: launch to first step against records, empty and warm cache (`python -m bench --data --json`);

and the generated tables between `<!-- make_figures: NAME -->` and `<!-- /make_figures: NAME -->` in the
docs pages, each with the line that names its machine, date, commit and command. It runs nothing and
measures nothing, so the same files always give the same pictures (SVG without a date, a fixed id salt).
"""

from __future__ import annotations

import html
import io
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clara.files import write_text_atomic  # noqa: E402

ASSETS = REPO / "docs" / "assets"
RUNS = ASSETS / "runs"
GUESSING_EM = 6.25  # 16 possible values per fact in the example data: a guess is right 1 time in 16
SGR = re.compile(r"\x1b\[([0-9;]*)m")
plt.rcParams.update({"svg.hashsalt": "clara-docs", "font.size": 10, "figure.dpi": 100})


def provenance(name: str) -> dict:
    return json.loads((RUNS / f"{name}.json").read_text(encoding="utf-8"))


def source_line(name: str) -> str:
    """Where a run's figures came from, as one sentence for the page."""
    run = provenance(name)
    return (
        f"Measured on {run['machine']}, {run['date']}, commit `{run['commit']}`; 1-minute load average "
        f"{run['load_before'][0]} before the run and {run['load_after'][0]} after it (the machine was shared "
        f"when it is above 2). Command: `{run['command']}`; `python scripts/make_figures.py` draws the rest."
    )


def footnote(fig, name: str) -> None:
    run = provenance(name)
    fig.text(
        0.01, -0.02, f"{run['machine']}, {run['date']}, commit {run['commit']}", fontsize=7, color="#666666", va="top"
    )


def save_svg(fig, name: str) -> None:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    write_text_atomic(str(ASSETS / name), buffer.getvalue())
    print(f"wrote docs/assets/{name}")


def box(ax, x: float, y: float, w: float, h: float, text: str, colour: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#333333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "", style: str = "-") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.2, ls=style, color="#333333"))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.18, label, ha="center", fontsize=8)


def architecture() -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5.7)
    ax.axis("off")
    box(
        ax,
        0.2,
        0.3,
        9.6,
        0.8,
        "one frozen base LLM (e.g. Qwen3-14B, Mistral-7B): the same weights in all three roles",
        "#dddddd",
    )
    roles = [
        (0.2, "compressor\nencoder_adapter\n(trained in stage1, stage1_2)", "#cfe2f3"),
        (3.8, "query reasoner\nquery_reasoner_adapter\n(trained in stage2)", "#fce5cd"),
        (7.4, "generator\ndecoder_adapter\n(trained in every stage)", "#d9ead3"),
    ]
    for x, text, colour in roles:
        box(ax, x, 2.0, 2.4, 1.3, text, colour)
        ax.plot([x + 1.2, x + 1.2], [1.15, 1.95], ls=":", color="#555555")
    ax.text(1.55, 1.45, "LoRA adapters on every linear layer", fontsize=8, color="#555555")
    box(ax, 0.2, 4.6, 2.4, 0.8, "documents (text)", "#ffffff")
    box(ax, 3.8, 4.6, 2.4, 0.8, "question", "#ffffff")
    box(ax, 7.4, 4.6, 2.4, 0.8, "answer", "#ffffff")
    arrow(ax, (1.4, 4.55), (1.4, 3.4))
    arrow(ax, (5.0, 4.55), (5.0, 3.4))
    arrow(ax, (8.6, 3.4), (8.6, 4.55))
    arrow(ax, (2.7, 2.65), (3.7, 2.65))
    ax.text(3.2, 2.85, "n memory vectors\nper document", ha="center", fontsize=8)
    arrow(ax, (6.3, 2.65), (7.3, 2.65))
    ax.text(6.8, 2.85, "vectors of the\ntop k (cosine,\ndifferentiable)", ha="center", fontsize=8)
    arrow(ax, (6.25, 4.6), (7.6, 3.4), style="--")
    ax.text(7.2, 4.1, "the question", fontsize=8, color="#555555")
    save_svg(fig, "architecture.svg")


def debug_blocks(text: str) -> list[list[str]]:
    """Each debug print of a console log, as its lines (progress-bar redraws removed, colours kept)."""
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    blocks, current = [], None
    for line in lines:
        if "[Debug] CLaRa Training Debug" in line:
            current = [line]
        elif current is not None and line.startswith("=" * 20) and len(current) > 2:
            while not SGR.sub("", current[-1]).strip():  # the colour reset after the last token
                current.pop()
            blocks.append(current)
            current = None
        elif current is not None and not line.startswith("=" * 20):
            current.append(line)
    return blocks


def svg_line(line: str, x: int, y: int) -> str:
    """One console line as SVG text, each coloured run a tspan of its 24-bit colour."""
    parts, colour, position = [], "#d0d0d0", 0
    for match in SGR.finditer(line + "\x1b[0m"):
        chunk = line[position : match.start()]
        if chunk:
            parts.append(f'<tspan fill="{colour}">{html.escape(chunk)}</tspan>')
        codes = match.group(1).split(";")
        colour = "#%02x%02x%02x" % tuple(map(int, codes[2:5])) if codes[:2] == ["38", "2"] else "#d0d0d0"
        position = match.end()
    return f'<text x="{x}" y="{y}" xml:space="preserve">{"".join(parts)}</text>'


def debug_print() -> None:
    blocks = debug_blocks((RUNS / "learning.ansi").read_text(encoding="utf-8"))
    every = int(re.search(r"DEBUG_EVERY_STEPS=(\d+)", provenance("learning")["command"]).group(1))
    shown = [(0, blocks[0]), ((len(blocks) - 1) * every, blocks[-1])]
    size, line_height, pad = 13, 17, 14
    width = pad * 2 + int(0.62 * size * max(len(SGR.sub("", line)) for _, b in shown for line in b)) + 40
    rows, y = [], pad + size
    for step, block in shown:
        rows.append(f'<text x="{pad}" y="{y}" fill="#8ab4f8">— debug print at step {step:,} —</text>')
        y += line_height
        for line in block:
            rows.append(svg_line(line, pad, y))
            y += line_height
        y += line_height // 2
    run = provenance("learning")
    rows.append(
        f'<text x="{pad}" y="{y}" fill="#888888" font-size="10">{html.escape(run["machine"])}, {run["date"]}, '
        f"commit {run['commit']}</text>"
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + pad}" '
        f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{size}">\n'
        f'<rect width="100%" height="100%" fill="#1e1e1e" rx="6"/>\n' + "\n".join(rows) + "\n</svg>\n"
    )
    write_text_atomic(str(ASSETS / "debug-print.svg"), svg)
    print("wrote docs/assets/debug-print.svg")


def learning_rows() -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (RUNS / "learning-metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_exact_match" in r]


def learning_curve() -> None:
    train, evals = learning_rows()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, color="#3d85c6")
    left.set_yscale("log")
    left.set(xlabel="optimizer step", ylabel="training loss (log)", title="stage1_2, tiny model, example data")
    right.plot([r["step"] for r in evals], [100 * r["eval_exact_match"] for r in evals], "o-", color="#38761d")
    right.axhline(GUESSING_EM, ls="--", color="#999999")
    right.text(evals[0]["step"], GUESSING_EM + 2, "guessing (1 in 16)", fontsize=8, color="#666666")
    right.set(xlabel="optimizer step", ylabel="held-out exact match (%)", ylim=(0, 100), title="100 held-out questions")
    footnote(fig, "learning")
    save_svg(fig, "learning-curve.svg")


def serving() -> None:
    rows = json.loads((RUNS / "serve-bench.json").read_text(encoding="utf-8"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for server, colour in (("batched", "#38761d"), ("one at a time", "#cc0000")):
        mine = [r for r in rows if r["server"] == server]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["requests_per_s"] for r in mine], "o-", color=colour, label=server)
        right.plot(clients, [r["p50_ms"] for r in mine], "o-", color=colour, label=f"{server}, p50")
        right.plot(clients, [r["p99_ms"] for r in mine], "o--", color=colour, label=f"{server}, p99")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({r["clients"] for r in rows}), labels=[str(c) for c in sorted({r["clients"] for r in rows})]
        )
        ax.set_xlabel("concurrent clients")
    left.set(ylabel="requests per second", title="throughput")
    right.set(ylabel="latency (ms)", title="latency", yscale="log")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    footnote(fig, "serve")
    save_svg(fig, "serving.svg")


def data_rows() -> list[dict]:
    rows = json.loads((RUNS / "data-bench.json").read_text(encoding="utf-8"))["rows"]
    seen, unique = set(), []
    for row in rows:  # the small reference run is repeated before each size: keep its first
        key = (row["records"], row["cache"], row["num_gpus"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return sorted(unique, key=lambda r: (r["records"], r["cache"] != "empty"))


def data_prep() -> None:
    rows = data_rows()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for cache, colour in (("empty", "#cc0000"), ("warm", "#38761d")):
        mine = [r for r in rows if r["cache"] == cache]
        ax.plot([r["records"] for r in mine], [r["step1_s"] for r in mine], "o-", color=colour, label=f"{cache} cache")
    ax.set_xscale("log")
    ax.set(xlabel="stage-1 records (about 2 KB each)", ylabel="launch to first step (s)", ylim=(0, None))
    ax.set_title("data preparation: NUM_GPUS=1, tiny model")
    ax.legend()
    footnote(fig, "data")
    save_svg(fig, "data-prep.svg")


def serve_table() -> str:
    rows = json.loads((RUNS / "serve-bench.json").read_text(encoding="utf-8"))
    lines = [
        "| server | clients | requests/s | p50 ms | p99 ms | mean batch | requests | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
        f"{r['mean_batch']:.1f} | {r['requests']:,} | {r['failed']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n\n" + source_line("serve")


def data_table() -> str:
    lines = [
        "| records (JSONL) | prepared-data cache | launch to step 1 | to end of step 2 | to exit | preparation | "
        "peak RSS, largest process |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in data_rows():
        rate = f"{r['records_per_s']:,} records/s" if r["records_per_s"] else "(from the cache)"
        lines.append(
            f"| {r['records']:,} | {r['cache']} | {r['step1_s']} s | {r['step2_s']} s | {r['exit_s']} s | {rate} | "
            f"{r['peak_rss_mb']:,} MB |"
        )
    return "\n".join(lines) + "\n\n" + source_line("data")


def steps_table() -> str:
    report = json.loads((RUNS / "steps-bench.json").read_text(encoding="utf-8"))

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| rows | setting | step s | samples/s | tokens/s | peak MB | step MB | compr MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for r in report["results"]:
        group = "" if r["group"] == previous else f"{r['group']} ({r['stage']})"
        previous = r["group"]
        if "error" in r:
            lines.append(f"| {group} | {r['label'] or 'default'} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {group} | {r['label'] or 'default'} | {number(r.get('step_time_s'), '.3f')} | "
            f"{number(r.get('samples_per_s'), '.2f')} | {number(r.get('tokens_per_s'), '.0f')} | "
            f"{number(r.get('peak_memory_mb'), '.0f')} | {number(r.get('step_memory_mb'), '.0f')} | "
            f"{number(r.get('candidate_compression_memory_mb'), '.0f')} |"
        )
    return "\n".join(lines) + "\n\n" + source_line("steps")


def learning_table() -> str:
    _, evals = learning_rows()
    lines = ["| step | held-out exact match | eval loss |", "|---:|---:|---:|"]
    lines += [f"| {r['step']:,} | {100 * r['eval_exact_match']:.0f}% | {r['eval_loss']:.3f} |" for r in evals]
    return "\n".join(lines) + "\n\n" + source_line("learning")


def replace_block(page: str, name: str, text: str) -> None:
    path = REPO / "docs" / page
    start, end = f"<!-- make_figures: {name} -->", f"<!-- /make_figures: {name} -->"
    old = path.read_text(encoding="utf-8")
    if start not in old or end not in old:
        raise SystemExit(f"error: docs/{page} has no {start} ... {end} block to fill")
    before, rest = old.split(start, 1)
    write_text_atomic(str(path), f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    print(f"wrote docs/{page} ({name})")


def main() -> int:
    architecture()
    debug_print()
    learning_curve()
    serving()
    data_prep()
    replace_block("getting-started.md", "learning", learning_table())
    replace_block("performance/index.md", "serve", serve_table())
    replace_block("performance/index.md", "steps", steps_table())
    replace_block("guides/data-at-scale.md", "data", data_table())
    replace_block("guides/serving.md", "page", source_line("page").replace("Measured on", "Taken on"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
