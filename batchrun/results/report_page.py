"""The report page: one HTML file, charts as inline SVG drawn here, no script, nothing fetched.

Why SVG written in Python rather than an embedded charting library: the charts are bars
and step lines over a few hundred aggregated points, which is ~150 lines here; a library
would add 200 KB-1 MB of JavaScript to every page, a dependency to keep current, and script
running next to text that came from a model. The page has no script at all, and its
Content-Security-Policy (`default-src 'none'`) lets it load nothing but its own inline
styles and `data:` images, so even a hostile answer that slipped past escaping could not
make a request. Everything from rows, answers and errors is redacted, then HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.base.redaction import redact, register_secret
from batchrun.flow import spend
from batchrun.job.spec import Job
from batchrun.ledger.checkpoint import DB_NAME, Checkpoint, checkpoint_folder
from batchrun.pipeline import images
from batchrun.results.output import report_path
from batchrun.results.report import LATENCY_STEP, TIME_BINS, Histogram, Report, TimeBins, collect, percentile

THUMB_SIDE = 192
THUMB_BYTES = 64_000  # without Pillow, images up to this size are embedded as they are
# Larger images are left out: decoding one to shrink it would take hundreds of MB (a relay may send any image).
THUMB_SOURCE_PIXELS = 40_000_000
IMAGES_BUDGET = 4_000_000  # all thumbnails of a page together, in bytes of data URI
CELL_CHARS = 400
ANSWER_CHARS = 1_500
W, PAD_L, PAD_R = 960, 56, 12
OK_COLOUR, ERROR_COLOUR, LIMIT_COLOUR, PAUSE_COLOUR = "#3b82f6", "#dc2626", "#7c3aed", "#fde68a"
RATE_COLOUR = "#f97316"
ANSWERED_COLOUR, PACED_COLOUR, LEARNED_COLOUR, COST_COLOUR = "#94a3b8", "#0d9488", "#111111", "#059669"
LEGEND_H = 18  # one row of an in-chart legend
AXIS_H = 34  # the time axis under a chart: clock time, then time elapsed since the first start
CHAR_W = 6.5  # about one character of the charts' 11 px text, to lay the legend out

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#111;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.glance{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:8px}
.glance div{background:#f5f5f5;border-radius:6px;padding:6px 10px}.glance b{display:block;font-size:17px}
.glance span{color:#555;font-size:12px}svg{display:block;margin:6px 0}svg text{font-size:11px;fill:#333}
table{border-collapse:collapse;width:100%;font-size:12px}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;
text-align:left}td pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.3 ui-monospace,monospace}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:200px;font-size:12px}
.gallery img,.pair img{max-width:192px;max-height:192px;border:1px solid #ccc}.pair{display:flex;gap:12px;margin:8px 0}
.legend span{margin-right:14px}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
.note{color:#666;font-size:12px}
"""


def render_page(report: Report) -> str:
    spec = report.job.spec
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        # Nothing may be fetched: only inline styles and data: images.
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>{_e(spec.name)} · batchrun report</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(spec.name)}</h1>",
        f"<p class=note>batchrun report of {_e(report.job.path)}, built {datetime.now():%Y-%m-%d %H:%M:%S}</p>",
        _glance(report),
        _over_time(report),
        _latency(report),
        _tokens(report),
        _prompt_cache(report),
        _samples(report),
    ]
    budget = [IMAGES_BUDGET]
    if report.gallery:
        parts.append(_gallery(report, budget))
    if report.captions:
        parts.append(_captions(report, budget))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _e(value: Any, limit: int | None = None) -> str:
    """Any text that came from outside: the key masked, cut to `limit`, escaped."""
    text = redact("" if value is None else str(value))
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    return html.escape(text, quote=True)


# --- the job at a glance --------------------------------------------------------------


def _glance(report: Report) -> str:
    spec = report.job.spec
    pricing = spec.pricing
    done = report.ok + report.error
    items: list[tuple[str, str, str]] = [
        ("model", spec.model or "", spec.provider.api),  # a Batch file's lines may name their own
        ("rows", f"{report.rows if report.rows is not None else '?'}", f"{done} done"),
        ("ok", str(report.ok), "rows"),
        ("error", str(report.error), ", ".join(f"{c} {n}" for c, n in report.errors.most_common()) or "none"),
        ("attempts", str(report.attempts), "requests sent, retries included"),
        ("429 answers", str(sum(report.time.rate_limited)) if report.time else "0", "push-back, all runs"),
        ("tokens", f"{report.prompt_tokens} in / {report.completion_tokens} out", "as the relay counted"),
    ]
    if pricing is not None and report.cost is not None:
        limit = spec.run.max_cost
        items.append(("cost", spend.money(report.cost, pricing), f"max_cost {limit}" if limit is not None else ""))
    if report.learned_limits:
        items.append(_learned_item(report.learned_limits))
    last = report.last_run
    wall = last.get("wall_s")
    items.append(("wall time", f"{wall:.1f} s" if wall is not None else "—", "the last run"))
    if report.span_s is not None:
        items.append(("span", _duration(report.span_s), "first start to last finish, all runs"))
    items.append(("exit state", report.exit_state, _when(last.get("updated_at"))))
    if report.in_flight_at_stop:
        items.append(("in flight at the stop", str(report.in_flight_at_stop), "sent or about to be, no answer"))
    cells = "".join(
        f"<div data-key='{_e(key)}'><span>{_e(key)}</span><b>{_e(value)}</b><span>{_e(note)}</span></div>"
        for key, value, note in items
    )
    estimate = ""
    if report.estimate:
        estimate = "<p class=note>the estimate (as <code>batchrun validate</code> prints it):</p><pre class=note>"
        estimate += _e("\n".join(report.estimate)) + "</pre>"
    note = f"<p class=note>{_e(report.input_note)}</p>" if report.input_note else ""
    return f"<h2>At a glance</h2><div class=glance>{cells}</div>{estimate}{note}"


def _learned_item(learned: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The limits learned for each key: the limit itself for one key, how many keys for several."""
    shown = [f"{item['requests']} per {item['window_s']:g} s" for item in learned]
    keys = ", ".join(f"{item['key']}: {limit} ({item['source']})" for item, limit in zip(learned, shown))
    return ("learned limit", shown[0] if len(shown) == 1 else f"{len(shown)} keys", keys)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _when(at: float | None) -> str:
    return f"at {datetime.fromtimestamp(at):%Y-%m-%d %H:%M:%S}" if at else ""


# --- charts ------------------------------------------------------------------------------


def _legend(*entries: tuple[str, str]) -> str:
    spans = "".join(f"<span><i class=swatch style='background:{c}'></i>{_e(label)}</span>" for label, c in entries)
    return f"<div class=legend>{spans}</div>"


def _svg(name: str, height: int, body: Iterable[str]) -> str:
    return (
        f"<svg class=chart data-chart={name} width={W} height={height} viewBox='0 0 {W} {height}' "
        f"xmlns='http://www.w3.org/2000/svg' role=img>{''.join(body)}</svg>"
    )


def _bars(
    values: Sequence[float], top: float, y0: float, h: float, colour: str, base: Sequence[float] | None = None
) -> str:
    """Bars along the plot width, `base` stacked below (same units); only non-zero bars are drawn."""
    width = (W - PAD_L - PAD_R) / max(len(values), 1)
    out = []
    for i, v in enumerate(values):
        if not v:
            continue
        below = base[i] if base else 0.0
        bar_h, bar_y = v / top * h, y0 + h - (v + below) / top * h
        out.append(
            f"<rect class=datum data-value='{v:g}' x='{PAD_L + i * width:.1f}' y='{bar_y:.1f}' "
            f"width='{max(width - 0.6, 0.6):.1f}' height='{max(bar_h, 0.5):.1f}' fill='{colour}'/>"
        )
    return "".join(out)


def _frame(y0: float, h: float, top: float, label: str) -> str:
    return (
        f"<line x1={PAD_L} y1={y0 + h} x2={W - PAD_R} y2={y0 + h} stroke='#999'/>"
        f"<line x1={PAD_L} y1={y0} x2={PAD_L} y2={y0 + h} stroke='#999'/>"
        f"<text x={PAD_L - 4} y={y0 + 10} text-anchor=end>{_num(top)}</text>"
        f"<text x={PAD_L - 4} y={y0 + h} text-anchor=end>0</text>"
        f"<text x={PAD_L + 4} y={y0 + 10}>{_e(label)}</text>"
    )


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def _svg_legend(entries: Sequence[tuple[str, str, str]]) -> tuple[str, int]:
    """A legend inside the chart (it travels with the picture), and the height it takes.

    `entries`: (label, colour, mark), mark "bar", "line" or "dash"; wraps to a new row at the chart's width.
    """
    out, x, y = ["<g class=legend>"], float(PAD_L), 0
    for label, colour, mark in entries:
        width = 22 + len(label) * CHAR_W + 14
        if x + width > W - PAD_R and x > PAD_L:
            x, y = float(PAD_L), y + LEGEND_H
        mid = y + LEGEND_H / 2
        if mark == "bar":
            out.append(f"<rect x='{x:.0f}' y='{mid - 5:.0f}' width=16 height=10 fill='{colour}'/>")
        else:
            dash = " stroke-dasharray='5 3'" if mark == "dash" else ""
            out.append(
                f"<line x1='{x:.0f}' y1='{mid:.0f}' x2='{x + 16:.0f}' y2='{mid:.0f}' stroke='{colour}' "
                f"stroke-width='2'{dash}/>"
            )
        out.append(f"<text class=legend-label x='{x + 22:.0f}' y='{mid + 4:.0f}'>{_e(label)}</text>")
        x += width
    out.append("</g>")
    return "".join(out), y + LEGEND_H + 4


def _time_axis(bins: TimeBins, y: float) -> str:
    """Ticks with the clock time and, under it, the time elapsed since the first start; `y`: the axis line."""
    out = [
        f"<text class=axis-label x={PAD_L - 4} y={y + 14:.0f} text-anchor=end>clock</text>",
        f"<text class=axis-label x={PAD_L - 4} y={y + 28:.0f} text-anchor=end>elapsed</text>",
    ]
    span = bins.width_s * TIME_BINS  # the bins' own span (at least a second), not the rows'
    for k in range(5):
        t = bins.t0 + k * span / 4
        x = PAD_L + k * (W - PAD_L - PAD_R) / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        out.append(f"<line x1={x:.0f} y1={y:.0f} x2={x:.0f} y2={y + 4:.0f} stroke='#999'/>")
        for row, text in ((14, f"{datetime.fromtimestamp(t):%H:%M:%S}"), (28, _elapsed(t - bins.t0, span))):
            out.append(f"<text class=tick x={x:.0f} y={y + row:.0f} text-anchor={anchor}>{text}</text>")
    return "".join(out)


def _elapsed(seconds: float, span: float) -> str:
    """Time since the first start, as precise as a chart of `span` seconds needs: +1.5 s, +45 s, +2:30, +1:02:30."""
    if span < 10:
        return f"+{seconds:.1f} s"
    if span < 120:
        return f"+{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"+{hours}:{minutes:02d}:{secs:02d}" if hours else f"+{minutes}:{secs:02d}"


def _learned_rate(report: Report) -> float | None:
    """The learned limits of all keys together, in requests per second; None when none was learned."""
    rates = [item["requests"] / item["window_s"] for item in report.learned_limits]
    return sum(rates) if rates else None


def _over_time(report: Report) -> str:
    bins = report.time
    if bins is None:
        return "<h2>Over time</h2><p class=note>no row has finished yet</p>"
    h, gap = 110, 26
    learned = _learned_rate(report)
    entries = [
        ("rows ok", OK_COLOUR, "bar"),
        ("rows error", ERROR_COLOUR, "bar"),
        ("429 answers", RATE_COLOUR, "bar"),
        ("other failed attempts", ERROR_COLOUR, "bar"),
        ("requests answered/s", ANSWERED_COLOUR, "bar"),
        ("paced rate", PACED_COLOUR, "line"),
        *([("learned limit", LEARNED_COLOUR, "dash")] if learned is not None else []),
        ("in-flight limit (lowest)", LIMIT_COLOUR, "line"),
        ("starts paused", PAUSE_COLOUR, "bar"),
    ]
    legend, top = _svg_legend(entries)
    y = [top + k * (h + gap) for k in range(4)]
    rows_top = max(max(a + b for a, b in zip(bins.ok, bins.error)), 1)
    fail_top = max(max(a + b for a, b in zip(bins.rate_limited, bins.other_errors)), 1)
    known = [v for v in bins.limit if v is not None]
    limit_top = max(known + [report.job.spec.run.concurrency, 1]) * 1.25  # the line stays clear of the top
    per_s = [n / bins.width_s for n in bins.answered]
    paced = [bins.paced_rate(i) for i in range(TIME_BINS)]
    rate_top = max([*per_s, *(r for r in paced if r is not None), learned or 0.0, 0.1]) * 1.15
    body = [
        legend,
        _frame(y[0], h, rows_top, "rows finished per interval"),
        _bars(bins.ok, rows_top, y[0], h, OK_COLOUR),
        _bars(bins.error, rows_top, y[0], h, ERROR_COLOUR, base=bins.ok),
        _frame(y[1], h, fail_top, "failed attempts per interval"),
        _bars(bins.rate_limited, fail_top, y[1], h, RATE_COLOUR),
        _bars(bins.other_errors, fail_top, y[1], h, ERROR_COLOUR, base=bins.rate_limited),
        _frame(y[2], h, rate_top, "requests per second"),
        _bars(per_s, rate_top, y[2], h, ANSWERED_COLOUR),
        _step_line(paced, rate_top, y[2], h, PACED_COLOUR, "paced"),
        _level(learned, rate_top, y[2], h),
        _frame(y[3], h, limit_top, "in-flight limit"),
        _pauses(bins, y[3], h),
        _step_line(bins.limit, limit_top, y[3], h, LIMIT_COLOUR, "in_flight"),
        _time_axis(bins, y[3] + h),
    ]
    note = (
        f"<p class=note>{TIME_BINS} intervals of {_seconds(bins.width_s)}; the paced rate is what the limiter "
        "allowed (none drawn while it did not pace); the limit, the pace and pauses are recorded by local runs "
        "(not by the Ray engine, nor by checkpoints written before batchrun recorded them)</p>"
    )
    return f"<h2>Over time</h2>{_svg('timeline', int(y[3] + h + AXIS_H), body)}{note}"


def _level(value: float | None, top: float, y0: float, h: float) -> str:
    """A dashed level across the plot: the learned limit."""
    if value is None:
        return ""
    y = y0 + h - value / top * h
    return (
        f"<line class=datum data-series=learned data-value='{value:g}' x1={PAD_L} y1='{y:.1f}' x2={W - PAD_R} "
        f"y2='{y:.1f}' stroke='{LEARNED_COLOUR}' stroke-width=1.5 stroke-dasharray='5 3'/>"
    )


def _pauses(bins: TimeBins, y0: float, h: float) -> str:
    width = (W - PAD_L - PAD_R) / TIME_BINS
    out = []
    for i, paused in enumerate(bins.paused_s):
        if paused > 0:
            share = min(1.0, paused / bins.width_s)
            out.append(
                f"<rect class=datum data-value='{paused:.2f}' x='{PAD_L + i * width:.1f}' y='{y0}' "
                f"width='{width:.1f}' height='{h}' fill='{PAUSE_COLOUR}' fill-opacity='{0.3 + 0.7 * share:.2f}'/>"
            )
    return "".join(out)


def _step_line(values: Sequence[float | None], top: float, y0: float, h: float, colour: str, series: str) -> str:
    """A step line, carried forward over intervals with no record."""
    width = (W - PAD_L - PAD_R) / len(values)
    points, current = [], None
    for i, v in enumerate(values):
        current = v if v is not None else current
        if current is None:
            continue
        y = y0 + h - current / top * h
        points += [f"{PAD_L + i * width:.1f},{y:.1f}", f"{PAD_L + (i + 1) * width:.1f},{y:.1f}"]
    if not points:
        return ""
    return (
        f"<polyline class=datum data-series={series} data-points={len(points)} points='{' '.join(points)}' "
        f"fill=none stroke='{colour}' stroke-width='2'/>"
    )


def _latency(report: Report) -> str:
    ok, error = report.latency_ok, report.latency_error
    if not ok and not error:
        return "<h2>Latency</h2><p class=note>no request has been answered yet</p>"
    lo, hi = min([*ok, *error]), max([*ok, *error]) + 1
    span = list(range(lo, hi))
    top = max([*ok.values(), *error.values()])
    h = 150
    body = [
        _frame(8, h, top, "rows per latency bin"),
        _bars([ok.get(b, 0) for b in span], top, 8, h, OK_COLOUR),
        _bars([error.get(b, 0) for b in span], top, 8, h, ERROR_COLOUR, base=[ok.get(b, 0) for b in span]),
    ]
    width = (W - PAD_L - PAD_R) / len(span)
    for k in range(5):
        b = lo + k * (len(span) - 1) / 4
        body.append(f"<text x={PAD_L + (b - lo) * width:.0f} y={h + 24}>{_seconds(LATENCY_STEP**b)}</text>")
    for q, dash in ((0.5, "4 2"), (0.9, "2 2"), (0.99, "1 2")):
        p = percentile(ok, q)
        if p is not None:
            x = PAD_L + (math.log(p) / math.log(LATENCY_STEP) - lo) * width
            body.append(f"<line x1={x:.1f} y1=8 x2={x:.1f} y2={8 + h} stroke='#111' stroke-dasharray='{dash}'/>")
            body.append(f"<text x={x + 3:.1f} y=20>p{q * 100:g}</text>")
    rows = "".join(
        f"<tr data-status={name}><th>{name}</th><td>{sum(c.values())}</td>"
        + "".join(f"<td>{_seconds(percentile(c, q))}</td>" for q in (0.5, 0.9, 0.99))
        + "</tr>"
        for name, c in (("ok", ok), ("error", error))
    )
    table = (
        f"<table style='width:auto'><tr><th></th><th>rows</th><th>p50</th><th>p90</th><th>p99</th></tr>{rows}</table>"
    )
    note = "<p class=note>per row, first attempt to answer (retries and their waits included); log scale</p>"
    legend = _legend(("ok", OK_COLOUR), ("error", ERROR_COLOUR))
    return f"<h2>Latency</h2>{legend}{_svg('latency', h + 32, body)}{table}{note}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _tokens(report: Report) -> str:
    parts = ["<h2>Tokens and cost</h2>"]
    for name, hist, colour in (
        ("tokens_in", report.prompt_hist, OK_COLOUR),
        ("tokens_out", report.completion_hist, LIMIT_COLOUR),
    ):
        if hist is None or not any(hist.counts):
            parts.append(f"<p class=note>{name.replace('_', ' ')}: no usage recorded</p>")
            continue
        parts.append(_histogram(name, hist, colour))
    bins = report.time
    if bins is not None and report.cost is not None and any(bins.cost):
        pricing = report.job.spec.pricing
        assert pricing is not None
        total, h = 0.0, 120
        running = []
        for spent in bins.cost:
            total += spent
            running.append(total)
        legend, top = _svg_legend(
            [("cost so far", COST_COLOUR, "line"), ("cost per interval (own scale)", "#cbd5e1", "bar")]
        )
        body = [
            legend,
            _frame(top, h, total, f"cost so far ({pricing.currency})"),
            _bars(bins.cost, max(bins.cost), top, h, "#cbd5e1"),
        ]
        width = (W - PAD_L - PAD_R) / TIME_BINS
        points = " ".join(f"{PAD_L + (i + 1) * width:.1f},{top + h - v / total * h:.1f}" for i, v in enumerate(running))
        body.append(
            f"<polyline class=datum data-series=cost points='{points}' fill=none stroke='{COST_COLOUR}' "
            "stroke-width='2'/>"
        )
        body.append(_time_axis(bins, top + h))
        parts.append(_svg("cost", int(top + h + AXIS_H), body))
    return "".join(parts)


def _prompt_cache(report: Report) -> str:
    """The share of input the provider read from its prompt cache, over time, and what it saved (docs/caching.md)."""
    cache, bins = report.cache, report.time
    if bins is None or not cache.cached_tokens:
        return ""
    sent = sum(cache.prompt)
    said = f"{cache.cached_tokens} of {sent} input tokens ({cache.cached_tokens / max(sent, 1):.0%}) were read from it"
    pricing = report.job.spec.pricing
    if pricing is not None and cache.saved is not None:
        said += f", which cost {spend.money(cache.saved, pricing)} less than input"
        if pricing.cached_input_per_million is None:
            said += " (nothing: set pricing.cached_input_per_million to count its lower price)"
    h = 100
    shares = [100 * c / p if p else 0.0 for c, p in zip(cache.cached, cache.prompt, strict=True)]
    body = [_frame(8, h, 100, "cached share of input tokens (%)"), _bars(shares, 100, 8, h, OK_COLOUR)]
    body.append(_time_axis(bins, 8 + h))
    return f"<h2>Prompt cache</h2><p class=note data-key=cache>{_e(said)}</p>{_svg('cache', 8 + h + AXIS_H, body)}"


def _histogram(name: str, hist: Histogram, colour: str) -> str:
    h = 90
    top = max(hist.counts)
    label = "input tokens per row" if name == "tokens_in" else "output tokens per row"
    body = [_frame(8, h, top, f"rows by {label}"), _bars([float(c) for c in hist.counts], top, 8, h, colour)]
    width = (W - PAD_L - PAD_R) / len(hist.counts)
    for k in range(0, len(hist.edges), 5):
        body.append(f"<text x={PAD_L + k * width:.0f} y={h + 24}>{hist.edges[k]}</text>")
    return _svg(name, h + 32, body)


# --- rows and images -----------------------------------------------------------------------


def _samples(report: Report) -> str:
    if not report.samples:
        return "<h2>Sample rows</h2><p class=note>no row has finished yet</p>"
    input_columns = list(dict.fromkeys(k for s in report.samples for k in s.inputs))
    parsed_columns = list(dict.fromkeys(k for s in report.samples for k in s.parsed))
    head = "".join(f"<th>{_e(c)}</th>" for c in ["row", "status", *input_columns, "answer", *parsed_columns])
    lines = []
    for s in report.samples:
        status = s.status if s.error_class is None else f"{s.status}: {s.error_class}"
        cells = [f"<td>{_e(s.row_id)}</td>", f"<td>{_e(status)}</td>"]
        cells += [f"<td><pre>{_e(s.inputs.get(c), CELL_CHARS)}</pre></td>" for c in input_columns]
        answer = s.answer if s.status == "ok" or s.error is None else s.error
        cells.append(f"<td><pre>{_e(answer, ANSWER_CHARS)}</pre></td>")
        cells += [f"<td><pre>{_e(_show(s.parsed.get(c)), CELL_CHARS)}</pre></td>" for c in parsed_columns]
        lines.append(f"<tr class=sample data-status='{_e(s.status)}'>{''.join(cells)}</tr>")
    note = "<p class=note>errors first, the first row of each class; then a sample of ok rows</p>"
    return f"<h2>Sample rows</h2>{note}<table><tr>{head}</tr>{''.join(lines)}</table>"


def _show(value: Any) -> str:
    return "" if value is None else str(value)


def _gallery(report: Report, budget: list[int]) -> str:
    figures, left_out = [], 0
    for s in report.gallery:
        for path in s.images:
            uri = _thumbnail(report, path, budget)
            if uri is None:
                left_out += 1
                continue
            figures.append(
                f"<figure class=generated data-row='{_e(s.row_id)}' data-image='{_e(Path(path).name)}'>"
                f"<img alt='{_e(s.row_id)}' src='{uri}'>"
                f"<figcaption><b>{_e(s.row_id)}</b> {_e(s.prompt, 200)}</figcaption></figure>"
            )
    note = (
        f"<p class=note>{left_out} images not shown: missing, unreadable, too large to decode (or to embed "
        f"without Pillow), or past the page's {IMAGES_BUDGET // 10**6} MB of images</p>"
        if left_out
        else ""
    )
    return f"<h2>Generated images</h2><div class=gallery>{''.join(figures)}</div>{note}"


def _captions(report: Report, budget: list[int]) -> str:
    pairs = []
    for s in report.captions:
        shown = []
        for ref, data in s.input_images:
            uri = _data_uri(data, budget) if data is not None else None
            shown.append(f"<img alt='{_e(ref, 80)}' src='{uri}'>" if uri else f"<span class=note>{_e(ref, 200)}</span>")
        pairs.append(
            f"<div class=pair data-row='{_e(s.row_id)}'>{''.join(shown)}"
            f"<div><b>{_e(s.row_id)}</b><p>{_e(s.answer, ANSWER_CHARS)}</p></div></div>"
        )
    return f"<h2>Input images and answers</h2>{''.join(pairs)}"


def _thumbnail(report: Report, path: str, budget: list[int]) -> str | None:
    file = report.job.resolve(path)
    try:
        data = file.read_bytes()
    except OSError:
        return None
    return _data_uri(data, budget)


def _data_uri(data: bytes, budget: list[int]) -> str | None:
    """A small image as a data URI, counted against the page's image budget; None when it does not fit."""
    mime = images.sniff_mime(data)
    if mime is None:
        return None
    if images.pillow_available():
        try:
            data, mime = _shrink(data)
        except OSError:
            return None
    elif len(data) > THUMB_BYTES:
        return None
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    if len(uri) > budget[0]:
        return None
    budget[0] -= len(uri)
    return uri


def _shrink(data: bytes) -> tuple[bytes, str]:
    """A thumbnail of the image; OSError when Pillow cannot read it or it is too large to decode here."""
    from PIL import Image

    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise OSError(str(e)) from None
    with opened as image:
        if image.width * image.height > THUMB_SOURCE_PIXELS:
            raise OSError(f"{image.width}x{image.height} pixels: too large to shrink for the page")
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA", "P"):
            image.save(out, format="PNG", optimize=True)
            return out.getvalue(), "image/png"
        image.convert("RGB").save(out, format="JPEG", quality=80)
        return out.getvalue(), "image/jpeg"


def write_report(job: Job) -> Path:
    """Builds the page from the job's checkpoint and writes it beside the output; returns its path."""
    folder = checkpoint_folder(job.output_path)
    if not (folder / DB_NAME).exists():
        raise JobError(f"{job.path}: no checkpoint at {folder}: run the job first (batchrun run {job.path})")
    for variable in job.spec.provider.key_variables:  # each key masked wherever it appears
        register_secret(os.environ.get(variable, "").strip())
    checkpoint = Checkpoint.for_reading(folder)
    try:
        report = collect(job, checkpoint)
    finally:
        checkpoint.close()
    target = report_path(job.output_path)
    with storage.replacing(target) as f:
        f.write(render_page(report).encode())
    return target
