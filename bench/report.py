"""The results, as Markdown: printed to stdout and written to bench/RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.servers import ROOT

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    ok: bool
    miss: str = ""


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _cpu_per_request(result: dict[str, Any]) -> tuple[str, str]:
    """CPU milliseconds per request of the server under test and of PostgreSQL, over every
    request of the load (warm-up included, as the CPU was measured around all of it)."""
    requests = sum(result["statuses"].values())
    if not requests:
        return "n/a", "n/a"
    cpu = result["cpu"]
    return (
        f"{cpu['server_s'] * 1000 / requests:.2f} ms",
        f"{cpu['postgres_s'] * 1000 / requests:.2f} ms",
    )


def _statements(title: str, result: dict[str, Any]) -> list[str]:
    """The statements PostgreSQL spent most time on during a measurement (pg_stat_statements;
    the warm-up included). Background work (WAL writer, checkpointer, autovacuum) is not here."""
    rows = result.get("statements") or []
    if not rows:
        return []
    return [
        "",
        f"{title}: PostgreSQL's statement time, top {len(rows)} (pg_stat_statements)",
        "",
        table(
            ["statement", "calls", "total", "share"],
            [
                [
                    f"`{r['query'][:70]}`",
                    f"{r['calls']:,}",
                    f"{_num(r['total_ms'] / 1000, 2)} s",
                    _pct(r["share"]),
                ]
                for r in rows
            ],
        ),
    ]


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "src", "migrations"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit + (" (with uncommitted changes in src/ or migrations/)" if dirty else ""),
    }


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    ranges = results.get("ranges")
    if ranges:
        cell = next(
            c for c in ranges["cells"] if c["target"] == "busy org" and c["span"] == "365 days"
        )
        p50 = cell["api_p50_ms"]
        out.append(
            Verdict(
                "365-day range, busy org: p50 <= 10 ms over HTTP",
                f"{_num(p50, 2)} ms",
                p50 <= 10,
                f"{_num(p50 / 10, 2)}x the target" if p50 > 10 else "",
            )
        )
        speedup = cell["speedup"]
        out.append(
            Verdict(
                "365-day range, busy org: >= 50x faster than the naive query",
                f"{_num(speedup)}x (naive p50 {_num(cell['naive_p50_ms'])} ms)",
                speedup >= 50,
                f"{_num(speedup / 50 * 100, 0)}% of the target" if speedup < 50 else "",
            )
        )
    exact = results.get("exactness")
    if exact:
        out.append(
            Verdict(
                "0 mismatches in 1000 random ranges",
                f"{exact['mismatches']} in {exact['ranges']}",
                exact["mismatches"] == 0 and exact["ranges"] >= 1000,
            )
        )
    counters = results.get("counters")
    if counters:
        main = counters["main"]
        ratio = main["api"]["total"]["rps"] / main["floor"]["total"]["rps"]
        out.append(
            Verdict(
                "counter reads: >= 80% of the floor app's requests/s",
                f"{_num(ratio * 100)}% ({_num(main['api']['total']['rps'], 0)} vs "
                f"{_num(main['floor']['total']['rps'], 0)} req/s, {main['workers']} workers)",
                ratio >= 0.8,
                f"{_num((0.8 - ratio) * 100)} points short" if ratio < 0.8 else "",
            )
        )
    ingestion = results.get("ingestion")
    if ingestion:
        batch = ingestion["runs"]["batch"]["total"]
        out.append(
            Verdict(
                "batched ingestion: >= 20,000 events/s",
                f"{_num(batch['events_per_s'], 0)} events/s",
                batch["events_per_s"] >= 20_000 and batch["errors"] == 0,
                f"{_num(batch['events_per_s'] / 200, 0)}% of the target"
                if batch["events_per_s"] < 20_000
                else "",
            )
        )
        spread = ingestion["runs"]["single-spread"]
        busy = ingestion["runs"]["single-busy"]
        ratio = busy["total"]["events_per_s"] / spread["total"]["events_per_s"]
        errors = spread["total"]["errors"] + busy["total"]["errors"]
        deadlocks = spread["database"]["deadlocks"] + busy["database"]["deadlocks"]
        out.append(
            Verdict(
                "single events at one org: >= 80% of spread, no errors, no deadlocks",
                f"{_num(ratio * 100)}% ({_num(busy['total']['events_per_s'], 0)} vs "
                f"{_num(spread['total']['events_per_s'], 0)} events/s), {errors} errors, "
                f"{deadlocks} deadlocks",
                ratio >= 0.8 and errors == 0 and deadlocks == 0,
                "" if ratio >= 0.8 else f"{_num((0.8 - ratio) * 100)} points short",
            )
        )
        after = ingestion["after"]
        out.append(
            Verdict(
                "after ingestion: counters equal the log (every org and user), reads exact",
                f"{after['counter_mismatches']} counter rows differ; "
                f"{after['exactness']['mismatches']} of {after['exactness']['ranges']}"
                " ranges differ",
                after["counter_mismatches"] == 0
                and after["exactness"]["mismatches"] == 0
                and after["busy_all_time_matches"],
            )
        )
    return out


def render(run: dict[str, Any], results: dict[str, Any], notes: Path | None) -> str:
    m, pg, data = run["machine"], run["postgres"], run["dataset"]
    parts = [
        "# Benchmark results",
        "",
        f"Generated by `{run['command'].strip()}` on {m['date']} (commit {m['commit']}).",
        "Every figure below comes from that one run; see bench/README.md for the method.",
        "",
        "## Targets",
        "",
        table(
            ["target", "measured", "verdict"],
            [
                [
                    v.target,
                    v.measured,
                    "met" if v.ok else f"MISSED ({v.miss})" if v.miss else "MISSED",
                ]
                for v in verdicts(results)
            ],
        ),
        "",
        "## Machine and setup",
        "",
        table(
            ["", ""],
            [
                ["CPU", f"{m['nproc']} x {m['cpu']}"],
                ["memory (`free -h`)", m["memory"].splitlines()[1].split()[1] + " total"],
                ["kernel / Python", f"{m['kernel']} / {m['python']}"],
                ["PostgreSQL", f"{pg['settings']['server_version']} ({pg['where']})"],
                *[[f"`{k}`", v] for k, v in pg["settings"].items() if k != "server_version"],
                ["API server", run["api_server"]],
                [
                    "workers / pool",
                    f"{run['workers']} uvicorn workers;"
                    f" pool of {run['pool_size']} connections per worker",
                ],
                ["load generator", run["load_generator"]],
                ["dataset", data["summary"]],
                ["generation", data["generation"]],
                ["this run", f"{_num(run['seconds'], 0)} s (without generation)"],
                ["others' CPU", f"{_pct(run['cpu']['others'])} of the machine during this run"],
            ],
        ),
        "",
        "```",
        m["memory"],
        "```",
        "",
        "Tables after loading:",
        "",
        table(
            ["table", "rows (estimate)", "size"],
            [
                [t["table"], f"{t['rows']:,}", f"{t['bytes'] / 2**30:.2f} GiB"]
                for t in data["tables"]
            ],
        ),
    ]
    if "pgbench" in results:
        b = results["pgbench"]
        parts += [
            "",
            "## 4. Database floor: `pgbench -S`",
            "",
            f"`{b['version']}` (`{b['binary']}`), scale 10, `-M prepared -j 2`, same server.",
            "",
            table(
                ["clients", "transactions/s", "latency avg"],
                [
                    [str(r["clients"]), _num(r["tps"], 0), f"{_num(r['latency_ms'], 3)} ms"]
                    for r in b["runs"]
                ],
            ),
        ]
    if "ranges" in results:
        r = results["ranges"]
        parts += [
            "",
            "## 1. Ranges over HTTP",
            "",
            "One request at a time (so latency, not queueing); ranges start at a random second",
            "(never a whole minute) and last exactly the span. Naive: the raw SUM with FILTERs",
            "over `usage_events` for the same ranges, run directly with asyncpg (no HTTP, so the",
            "comparison flatters the naive query). Others' CPU: "
            f"{_pct(r['cpu']['http']['others'])} during the HTTP part, "
            f"{_pct(r['cpu']['naive']['others'])} during the naive part.",
            "",
            table(
                ["who", "span", "API p50", "API p99", "naive p50", "speedup", "requests", "errors"],
                [
                    [
                        c["target"],
                        c["span"],
                        f"{_num(c['api_p50_ms'], 2)} ms",
                        f"{_num(c['api_p99_ms'], 2)} ms",
                        f"{_num(c['naive_p50_ms'], 2)} ms",
                        f"{_num(c['speedup'])}x",
                        str(c["requests"]),
                        str(c["api_errors"]),
                    ]
                    for c in r["cells"]
                ],
            ),
        ]
    if "exactness" in results:
        e = results["exactness"]
        parts += [
            "",
            "### Exactness",
            "",
            f"{e['ranges']} random ranges (all the contract's forms and offsets, open sides, one",
            "minute to 420 days, organizations and users, 15% on the busy organization):",
            f"**{e['mismatches']} mismatches** against the raw SUM.",
            *[f"- `{x}`" for x in e["examples"]],
        ]
    if "series" in results:
        from bench.series_scenario import render as render_series

        parts += render_series(results["series"])
    if "counters" in results:
        c = results["counters"]
        rows = []
        for run_ in c["runs"]:
            for name in ("api", "baseline", "floor"):
                if name not in run_:
                    continue
                t = run_[name]["total"]
                rows.append(
                    [
                        str(run_["workers"]),
                        name,
                        _num(t["rps"], 0),
                        f"{_num(t['p50_ms'], 2)} ms",
                        f"{_num(t['p99_ms'], 2)} ms",
                        str(t["errors"]),
                        str(run_[name]["database"]["sessions"]),
                        *_cpu_per_request(run_[name]),
                        _num(run_[name]["cpu"]["server_s"] / run_[name]["cpu"]["elapsed_s"], 2),
                        _pct(run_[name]["cpu"]["others"]),
                        _num(run_[name]["total"]["rps"] / run_["floor"]["total"]["rps"] * 100) + "%"
                        if name != "floor"
                        else "",
                    ]
                )
        parts += [
            "",
            "## 2. All-time counter reads over HTTP",
            "",
            f"{run['connections']} keep-alive connections, {_num(run['duration_s'], 0)} s measured",
            "after a warm-up; 2000 reads, half organizations, half users. The floor app",
            "(bench/floor_app.py) does one asyncpg primary-key lookup per request, no key check,",
            "under the same uvicorn settings, workers and pool size. `new DB sessions`:",
            "connections opened during the measurement (pool filling, or churn). `app cores`:",
            "CPU the server's processes used, in cores (1 per busy worker).",
            "",
            table(
                [
                    "workers",
                    "app",
                    "requests/s",
                    "p50",
                    "p99",
                    "errors",
                    "new DB sessions",
                    "app CPU/req",
                    "PG CPU/req",
                    "app cores",
                    "others' CPU",
                    "API/floor",
                ],
                rows,
            ),
        ]
        every_round = "; ".join(
            f"{r['workers']} workers: " + ", ".join(f"{_num(x * 100)}%" for x in r["ratios"])
            for r in c["runs"]
            if "ratios" in r
        )
        if every_round:
            parts += [
                "",
                f"Each worker count: {len(c['runs'][0]['ratios'])} rounds of every app,"
                " alternating which goes first; the rows above are the round with the median"
                f" API/floor ratio. Every round's ratio: {every_round}.",
            ]
        if any("baseline_ratios" in r for r in c["runs"]):
            parts += [
                "",
                "The baseline (`--baseline-root`) in the same rounds, median over them:",
                "",
                table(
                    ["workers", "API/floor", "baseline/floor", "API req/s", "baseline req/s"],
                    [
                        [
                            str(r["workers"]),
                            f"{_num(statistics.median(r['ratios']) * 100)}%",
                            f"{_num(statistics.median(r['baseline_ratios']) * 100)}%",
                            _num(statistics.median(r["api_rps"]), 0),
                            _num(statistics.median(r["baseline_rps"]), 0),
                        ]
                        for r in c["runs"]
                    ],
                ),
            ]
        parts += _statements("API counter reads", c["main"]["api"])
    if "ingestion" in results:
        i = results["ingestion"]
        rows = []
        for name, r in i["runs"].items():
            t = r["total"]
            rows.append(
                [
                    name,
                    str(r["connections"]),
                    str(r["batch"]),
                    _num(t["events_per_s"], 0),
                    _num(t["rps"], 0),
                    f"{_num(t['p50_ms'], 2)} ms",
                    f"{_num(t['p99_ms'], 2)} ms",
                    str(t["errors"]),
                    str(r["database"]["deadlocks"]),
                    str(r["database"]["xact_rollback"]),
                    *_cpu_per_request(r),
                    _pct(r["cpu"]["others"]),
                ]
            )
        a = i["after"]
        parts += [
            "",
            "## 3. Ingestion",
            "",
            f"{_num(run['duration_s'], 0)} s measured after a warm-up, admin write key; events",
            "occur within the last hour; `single-spread` picks a random organization of the 1000",
            "for each event, `single-busy` always the busy one. Deadlocks and rollbacks are",
            "PostgreSQL's own counters (pg_stat_database) over the measurement.",
            "",
            table(
                [
                    "scenario",
                    "clients",
                    "batch",
                    "events/s",
                    "requests/s",
                    "p50",
                    "p99",
                    "errors",
                    "deadlocks",
                    "rollbacks",
                    "app CPU/req",
                    "PG CPU/req",
                    "others' CPU",
                ],
                rows,
            ),
            "",
            f"Then, with {a['pending_deltas']:,} deltas still unfolded:"
            f" {a['exactness']['mismatches']} mismatches in {a['exactness']['ranges']} random"
            " ranges over the new events; the folder caught up"
            f" {_num(a['fold_catch_up_s'])} s after the load ended;"
            f" {a['counter_mismatches']} counter rows (every organization and user) differ from"
            " the log; the busy organization's all-time read"
            f" {'equals' if a['busy_all_time_matches'] else 'DIFFERS from'} the raw SUM.",
            *[f"- `{x}`" for x in a["exactness"]["examples"]],
        ]
        for name, r in i["runs"].items():
            parts += _statements(f"`{name}`", r)
    if "ingest" in results:
        parts += _ingest(run, results["ingest"])
    dashboard = BENCH / "DASHBOARD.md"
    if dashboard.exists():
        # Its own run (a browser, the demo data): kept beside this one's figures.
        text = dashboard.read_text().strip().replace("# Dashboard benchmark", "## Dashboard", 1)
        parts += ["", text]
    if notes is not None and notes.exists():
        parts += ["", notes.read_text().strip()]
    return "\n".join(parts) + "\n"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} us"


def _ingest(run: dict[str, Any], ingest: dict[str, Any]) -> list[str]:
    """The ingest scenario: the API (and its baseline) beside the write floor."""

    def cpu(r: dict[str, Any]) -> float | None:
        app, pg = r["app_cpu_us_per_event"], r["pg_cpu_us_per_event"]
        return None if app is None or pg is None else float(app + pg)

    rows = []
    for case, servers in ingest["cases"].items():
        floor = servers["floor"]
        for name, r in servers.items():
            if name == "ratios":
                continue
            spent, least = cpu(r), cpu(floor)
            rows.append(
                [
                    case,
                    name,
                    _num(r["events_per_s"], 0),
                    f"{r['events_per_s'] / floor['events_per_s']:.2f}x",
                    f"{least / spent:.2f}x" if spent and least else "n/a",
                    _us(r["app_cpu_us_per_event"]),
                    _us(r["pg_cpu_us_per_event"]),
                    f"{_num(r['p50_ms'], 2)} ms",
                    str(r["errors"]),
                    _num(r.get("fold_catch_up_s"), 1) if "fold_catch_up_s" in r else "",
                    _pct(r["others"]),
                ]
            )
    for r in ingest["sql_floor"]:
        rows.append(
            [
                "batch",
                f"SQL only, {r['connections']} conn.",
                _num(r["events_per_s"], 0),
                "",
                "",
                "",
                _us(r["pg_cpu_us_per_event"]),
                "",
                "",
                "",
                _pct(r["others"]),
            ]
        )
    ratios = "; ".join(
        f"{case} " + ", ".join(f"{x:.2f}" for x in servers["ratios"])
        for case, servers in ingest["cases"].items()
    )
    parts = [
        "",
        "## Ingestion against the write floor",
        "",
        f"{_num(run['duration_s'], 0)} s measured after a warm-up; `single`: one new event a"
        f" request from {run['connections']} clients; `batch`: 1000 new events a request from 4"
        " clients; events over every organization. `floor` is bench/floor_app.py (FastAPI +"
        " asyncpg: validation, one statement checking targets, inserting with ON CONFLICT DO"
        " NOTHING and appending deltas); `SQL only` is that statement over generated rows, 1000"
        " a statement, with no client. CPU per event covers the whole load (warm-up included);"
        " `CPU vs floor` is the floor's app + PostgreSQL CPU per event over this server's (on"
        " a shared machine steadier than events/s, which follow the others' load)."
        " The fold column is how long the API's fold took to catch up after the load.",
        "",
        table(
            [
                "case",
                "server",
                "events/s",
                "vs floor",
                "CPU vs floor",
                "app CPU/event",
                "PG CPU/event",
                "p50",
                "errors",
                "fold s",
                "others' CPU",
            ],
            rows,
        ),
        "",
        f"{ingest['rounds']} round(s), alternating the order of the servers; the rows are the"
        f" round with the median API/floor ratio. Every round's ratio: {ratios}.",
    ]
    for case, servers in ingest["cases"].items():
        parts += _statements(f"`{case}` through the API", servers["api"])
    return parts
