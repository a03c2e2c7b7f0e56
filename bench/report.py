"""Output of the tool comparison (bench/tools.py): Markdown tables, a description of the machine,
a bar chart (when matplotlib is importable) and the marked sections of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import textwrap
from pathlib import Path

from bench.measure import Run

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"


Results = dict[tuple[str, str], list[Run]]  # (scenario, tool) -> one Run per repeat


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def wall_cell(runs: list[Run]) -> str:
    w = [r.wall for r in runs]
    mark = "" if all(r.ok for r in runs) else " †"
    if len(w) == 1:
        return f"{w[0]:.2f}{mark}"
    return f"{_median(w):.2f} ({min(w):.2f}–{max(w):.2f}){mark}"


def table(results: Results, scenarios: list[tuple[str, str]], tools: list[str]) -> str:
    """scenarios: (key, label). One row per scenario and tool."""
    lines = ["| scenario | tool | wall s, median (min–max) | CPU s | peak RSS MB |", "|---|---|---|---|---|"]
    for key, label in scenarios:
        for tool in tools:
            runs = results.get((key, tool))
            if not runs:
                continue
            lines.append(f"| {label} | {tool} | {wall_cell(runs)} | {_median([r.cpu for r in runs]):.2f} | "
                         f"{max(r.rss_mb for r in runs):.0f} |")
    if any(not r.ok for runs in results.values() for r in runs):
        lines.append("\n† at least one run did not leave the expected messages or flags in its Maildir.")
    return "\n".join(lines)


def ratios(results: Results, scenarios: list[tuple[str, str]], tools: list[str], base: str = "mailsync") -> str:
    """Median wall time and CPU time of `base` divided by those of every other tool (below 1: base is faster)."""
    others = [t for t in tools if t != base]
    if base not in tools or not others:
        return ""
    head = "| scenario | " + " | ".join(f"{base}/{t} wall | {base}/{t} CPU" for t in others) + " |"
    lines = [head, "|---|" + "---|---|" * len(others)]
    for key, label in scenarios:
        mine = results.get((key, base))
        if not mine:
            continue
        cells = []
        for t in others:
            theirs = results.get((key, t))
            if not theirs:
                cells += ["", ""]
                continue
            w = _median([r.wall for r in mine]) / _median([r.wall for r in theirs])
            c_theirs = _median([r.cpu for r in theirs])
            c = _median([r.cpu for r in mine]) / c_theirs if c_theirs > 0 else float("nan")
            cells += [f"{w:.2f}", f"{c:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_line(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]) and not Path(cmd[0]).exists():
        return "not installed"
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def tool_versions(tools: list[str]) -> dict[str, str]:
    dovecot = shutil.which("dovecot") or "/usr/sbin/dovecot"
    v = {"Dovecot": _first_line([dovecot, "--version"])}
    if "mbsync" in tools:
        v["mbsync"] = _first_line(["mbsync", "--version"])
    if "offlineimap" in tools:
        v["OfflineIMAP"] = _first_line(["offlineimap", "--version"])
    if "mpop" in tools:
        v["mpop"] = _first_line(["mpop", "--version"])
    return v


def _named(name: str, version: str) -> str:
    """"Dovecot 2.3.19.1", "mbsync (isync 1.4.4)", "mpop 1.4.18" from each tool's own wording."""
    version = version.replace(" version ", " ")
    if version[:1].isdigit():
        return f"{name} {version}"
    if version.lower().startswith(name.lower()):
        return version
    return f"{name} ({version})"


def machine(tools: list[str]) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    distro = platform.system()
    try:
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.MULTILINE)
        distro = m.group(1) if m else distro
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    versions = ", ".join(_named(k, v) for k, v in tool_versions(tools).items())
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mailsync", "pyproject.toml"], check=False,
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    if commit and dirty:
        commit += " plus uncommitted changes"
    return (f"{os.cpu_count()} CPUs ({cpu}), {distro}, Linux {platform.release()}, "
            f"Python {platform.python_version()}; {versions}; mailsync at commit {commit or 'unknown'}")


def chart(results: Results, scenarios: list[tuple[str, str]], tools: list[str], path: Path, title: str) -> bool:
    """Grouped bars: median wall time per scenario (log scale, whiskers min–max) and peak RSS.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scen = [(k, label) for k, label in scenarios if any((k, t) in results for t in tools)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        xs, meds, lo, hi, rss = [], [], [], [], []
        for j, (key, _) in enumerate(scen):
            runs = results.get((key, tool))
            if not runs:
                continue
            w = [r.wall for r in runs]
            m = _median(w)
            xs.append(j + (i - (len(tools) - 1) / 2) * width)
            meds.append(m)
            lo.append(m - min(w))
            hi.append(max(w) - m)
            rss.append(max(r.rss_mb for r in runs))
        if not xs:
            continue
        ax1.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=tool)
        ax2.bar(xs, rss, width, label=tool)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels([textwrap.fill(label, 14) for _, label in scen], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("wall time, s (median, min–max; log scale)")
    ax2.set_ylabel("peak RSS, MB")
    ax1.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def write_section(section: str, body: str, doc: Path = DOCS) -> None:
    """Replace what is between the section's markers in doc; append the section if it has none."""
    start, end = markers(section)
    text = doc.read_text()
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
