"""What the daemon adds over a direct call to the engine, beside HAProxy leastconn.

Latency: sequential requests (concurrency 1), interleaved round by round over three
targets that share the same two fake engines: the engines directly, the daemon, and
HAProxy. Throughput: wrk (or the aiohttp load generator) through the daemon and through
HAProxy, in alternating segments. Run from the repository root:

    .venv/bin/python -m tests.bench.overhead [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: python tests/bench/overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import (
    CHAT,
    Daemon,
    HAProxy,
    LoadResult,
    RawClient,
    chat_body,
    closed_loop,
    ensure_tool,
    fmt,
    gc_paused,
    run_wrk,
    stop_on_sigterm,
    summarize,
    table,
    use_uvloop,
    write_json,
    wrk_script,
)

TARGET_P50_MS = 0.5
TARGET_P99_MS = 1.0
TARGET_RATIO = 0.5
MODES = ("non_stream", "stream")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (used by the smoke test): 30 requests, 1s segments")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    p.add_argument("--requests", type=int, default=None,
                   help="timed requests per target and mode (default 2000; quick 30)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed requests per target and mode first (default 100; quick 5)")
    p.add_argument("--max-tokens", type=int, default=4, help="max_tokens of each request")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of one throughput segment (default 5; quick 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="throughput segments per target, alternating (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    p.add_argument("--connections", type=int, default=32,
                   help="open connections of the load generator (wrk -c)")
    p.add_argument("--slots", type=int, default=64, help="slots per replica")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install haproxy or wrk when they are missing")
    p.add_argument("--no-wrk", action="store_true",
                   help="use the aiohttp load generator even when wrk is there")
    args = p.parse_args(argv)
    quick = args.quick
    args.requests = args.requests if args.requests is not None else (30 if quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (5 if quick else 100)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if quick else 5.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    return args


# ---- latency ----------------------------------------------------------------------------------


def _ok(mode: str, status: int, body: bytes) -> bool:
    if status != 200:
        return False
    if mode == "stream":
        return body.rstrip().endswith(b"data: [DONE]")
    return body.startswith(b"{") and b'"choices"' in body


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def measure_latency(targets: dict[str, list[int]], procs: dict[str, psutil.Process], *,
                    requests: int, warmup: int, max_tokens: int) -> dict[str, Any]:
    """Sequential requests, one target after another in every round (order rotates)."""
    names = list(targets)
    clients = {t: [RawClient(port, CHAT) for port in ports] for t, ports in targets.items()}
    payloads = {mode: json.dumps(chat_body(max_tokens, stream=mode == "stream")).encode()
                for mode in MODES}
    wire = {(t, mode, i): c.request_bytes(payloads[mode])
            for t, cs in clients.items() for i, c in enumerate(cs) for mode in MODES}
    samples: dict[str, dict[str, list[float]]] = {m: {t: [] for t in names} for m in MODES}
    errors: dict[str, dict[str, int]] = {m: dict.fromkeys(names, 0) for m in MODES}
    clock = time.perf_counter_ns
    started = time.monotonic()
    cpu0 = {t: cpu_seconds(p) for t, p in procs.items()}
    try:
        with gc_paused():
            for r in range(warmup + requests):
                order = names[r % len(names):] + names[:r % len(names)]
                for mode in MODES:
                    for t in order:
                        cs = clients[t]
                        i = r % len(cs)
                        t0 = clock()
                        try:
                            status, body = cs[i].post(wire[(t, mode, i)])
                        except OSError:
                            status, body = 0, b""
                        elapsed = clock() - t0
                        if r < warmup:
                            continue
                        if _ok(mode, status, body):
                            samples[mode][t].append(elapsed / 1e6)
                        else:
                            errors[mode][t] += 1
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()
    sent = (warmup + requests) * len(MODES)
    out: dict[str, Any] = {"requests": requests, "warmup": warmup, "max_tokens": max_tokens,
                           "seconds": time.monotonic() - started,
                           "cpu_us_per_request": {t: (cpu_seconds(p) - cpu0[t]) * 1e6 / sent
                                                  for t, p in procs.items()}}
    for mode in MODES:
        base = summarize(samples[mode]["direct"])
        rows: dict[str, Any] = {}
        for t in names:
            s = summarize(samples[mode][t])
            row: dict[str, Any] = {"p50_ms": s["p50"], "p99_ms": s["p99"], "mean_ms": s["mean"],
                                   "max_ms": s["max"], "ok": s["n"], "errors": errors[mode][t]}
            if t != "direct":
                row["added_p50_ms"] = s["p50"] - base["p50"]
                row["added_p99_ms"] = s["p99"] - base["p99"]
                row["pass_p50"] = row["added_p50_ms"] <= TARGET_P50_MS
                row["pass_p99"] = row["added_p99_ms"] <= TARGET_P99_MS
            rows[t] = row
        ratio: dict[str, float | None] = {"p50": None, "p99": None}
        if "haproxy" in rows:
            for q in ("p50", "p99"):
                ours = rows["daemon"][f"added_{q}_ms"]
                theirs = rows["haproxy"][f"added_{q}_ms"]
                ratio[q] = ours / theirs if theirs > 0 else None
        out[mode] = {"targets": rows, "daemon_vs_haproxy_added": ratio}
    return out


# ---- throughput -------------------------------------------------------------------------------


def measure_throughput(urls: dict[str, str], procs: dict[str, psutil.Process], *,
                       wrk: str | None, workdir: Path,
                       body: dict[str, Any], threads: int, connections: int, seconds: float,
                       rounds: int) -> dict[str, Any]:
    """Alternating segments of closed-loop load per target; rps summed over the segments."""
    script = wrk_script(workdir, body) if wrk else None
    totals = {t: LoadResult("wrk" if wrk else "aiohttp", 0, 0, 0.0) for t in urls}
    segments: dict[str, list[dict[str, Any]]] = {t: [] for t in urls}
    cpu = dict.fromkeys(urls, 0.0)
    for _ in range(rounds):
        for t, url in urls.items():
            cpu0 = cpu_seconds(procs[t])
            if wrk and script:
                res = run_wrk(wrk, url, script, threads=threads, connections=connections,
                              duration=seconds)
            else:
                res = asyncio.run(closed_loop(url, body, concurrency=connections,
                                              duration=seconds))
            cpu[t] += cpu_seconds(procs[t]) - cpu0
            segments[t].append(res.to_json())
            tot = totals[t]
            tot.requests += res.requests
            tot.errors += res.errors
            tot.seconds += res.seconds
    out: dict[str, Any] = {
        "tool": "wrk" if wrk else "aiohttp",
        "threads": threads if wrk else 1, "connections": connections,
        "segment_seconds": seconds, "rounds": rounds,
        "targets": {t: {"rps": totals[t].rps, "requests": totals[t].requests,
                        "errors": totals[t].errors, "seconds": totals[t].seconds,
                        "cpu_us_per_request": cpu[t] * 1e6 / max(1, totals[t].requests),
                        "segments": segments[t]} for t in urls},
        "ratio": None, "pass": None,
    }
    if "haproxy" in urls and totals["haproxy"].rps > 0:
        out["ratio"] = totals["daemon"].rps / totals["haproxy"].rps
        out["pass"] = out["ratio"] >= TARGET_RATIO
    return out


# ---- report -----------------------------------------------------------------------------------


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def _ratio(value: float | None) -> str:
    return "n/a (haproxy added <= 0)" if value is None else f"{value:.1f}x"


def report(results: dict[str, Any]) -> str:
    lat = results["latency"]
    lines = [f"llm-supervisor overhead bench  ({results['env']['summary']})", "",
             f"latency: sequential requests (concurrency 1), {lat['requests']} per target and "
             f"mode after {lat['warmup']} warm-up, interleaved round by round; max_tokens "
             f"{lat['max_tokens']}, fake engine instant",
             f"targets for the daemon: added p50 <= {TARGET_P50_MS} ms, added p99 <= "
             f"{TARGET_P99_MS} ms (informational)"]
    rows = []
    for mode in MODES:
        for t, row in lat[mode]["targets"].items():
            rows.append([mode, t, fmt(row["p50_ms"]), fmt(row["p99_ms"]),
                         fmt(row.get("added_p50_ms"), sign=True),
                         _mark(row.get("pass_p50")) if t == "daemon" else "",
                         fmt(row.get("added_p99_ms"), sign=True),
                         _mark(row.get("pass_p99")) if t == "daemon" else "",
                         str(row["errors"])])
    lines.append(table(["mode", "target", "p50 ms", "p99 ms", "added p50", "",
                        "added p99", "", "errors"], rows))
    for mode in MODES:
        ratio = lat[mode]["daemon_vs_haproxy_added"]
        lines.append(f"{mode}: daemon-added / haproxy-added: p50 {_ratio(ratio['p50'])}, "
                     f"p99 {_ratio(ratio['p99'])}")
    cpu = ", ".join(f"{t} {v:.0f} us" for t, v in lat["cpu_us_per_request"].items())
    lines.append(f"CPU per request, latency phase (both modes): {cpu}")
    thr = results["throughput"]
    lines += ["", f"throughput: {thr['tool']} ({thr['threads']} threads, "
                  f"{thr['connections']} connections), {thr['rounds']} x "
                  f"{thr['segment_seconds']:g}s per target, alternating; non-streaming, "
                  f"max_tokens {lat['max_tokens']}"]
    rows = [[t, fmt(v["rps"], 0), str(v["requests"]), str(v["errors"]),
             fmt(v["cpu_us_per_request"], 0),
             fmt(v["segments"][-1]["latency_ms"].get("p50"), 2),
             fmt(v["segments"][-1]["latency_ms"].get("p99"), 2)]
            for t, v in thr["targets"].items()]
    lines.append(table(["target", "req/s", "requests", "errors", "CPU us/req",
                        "p50 ms*", "p99 ms*"], rows))
    lines.append("(* latency under load, last segment)")
    lines.append(f"daemon req/s / haproxy req/s: {fmt(thr['ratio'], 2)}  "
                 f"(target >= {TARGET_RATIO}) {_mark(thr['pass'])}")
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)


def _version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
        text = (done.stdout or done.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else "?"
    return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    uvloop = use_uvloop()
    notes: list[str] = []
    haproxy_bin = ensure_tool("haproxy", "haproxy", install=not args.no_install)
    if haproxy_bin is None:
        print("HAProxy is unavailable; measuring without it", flush=True)
        notes.append("HAProxy is unavailable: no haproxy rows, no ratios")
    wrk_bin = None if args.no_wrk else ensure_tool("wrk", "wrk", install=not args.no_install)
    if wrk_bin is None:
        print("wrk is unavailable; throughput uses the aiohttp load generator", flush=True)
        notes.append("wrk is unavailable (or --no-wrk): throughput measured with the aiohttp "
                     "load generator")
    load1 = os.getloadavg()[0]
    haproxy_maxconn = None
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        daemon = stack.enter_context(Daemon(workdir, fake_args=["--fake-token-rate", "0"],
                                            replicas=2, slots=args.slots))
        engines = daemon.engine_ports()
        if len(engines) != 2:
            raise RuntimeError(f"expected 2 READY replicas, got ports {engines}")
        targets: dict[str, list[int]] = {"direct": engines, "daemon": [daemon.port]}
        procs = {"daemon": psutil.Process(daemon.pid)}
        urls = {"daemon": daemon.url + CHAT}
        if haproxy_bin is not None:
            try:
                haproxy = stack.enter_context(HAProxy(haproxy_bin, workdir, engines))
            except RuntimeError as exc:
                print(f"HAProxy is unavailable: {exc}", flush=True)
                notes.append("HAProxy failed to start: no haproxy rows, no ratios")
            else:
                targets["haproxy"] = [haproxy.port]
                assert haproxy.proc is not None
                procs["haproxy"] = psutil.Process(haproxy.proc.pid)
                haproxy_maxconn = haproxy.maxconn
                urls["haproxy"] = haproxy.url + CHAT
        print(f"daemon pid {daemon.pid} on {daemon.port}, engines on {engines}"
              + (f", haproxy on {targets['haproxy'][0]}" if "haproxy" in targets else ""),
              flush=True)
        print(f"latency: {args.requests} requests per target and mode ...", flush=True)
        latency = measure_latency(targets, procs, requests=args.requests, warmup=args.warmup,
                                  max_tokens=args.max_tokens)
        print(f"throughput: {args.rounds} x {args.seconds:g}s per target ...", flush=True)
        throughput = measure_throughput(
            urls, procs, wrk=wrk_bin, workdir=workdir, body=chat_body(args.max_tokens),
            threads=args.threads, connections=args.connections, seconds=args.seconds,
            rounds=args.rounds)
        daemon_cpu = daemon.cpu_seconds()
    load2 = os.getloadavg()[0]
    env = {
        "python": platform.python_version(), "uvloop": uvloop, "cpus": os.cpu_count(),
        "loadavg_1m_before": load1, "loadavg_1m_after": load2,
        "haproxy": _version([haproxy_bin, "-v"]) if haproxy_bin else None,
        "wrk": _version([wrk_bin, "-v"]) if wrk_bin else None,
        "daemon_cpu_s": daemon_cpu, "haproxy_maxconn": haproxy_maxconn,
    }
    env["summary"] = (f"{env['cpus']} CPUs, load {load1:.2f} -> {load2:.2f}, "
                      f"python {env['python']}, uvloop {'on' if uvloop else 'off'}")
    results = {"bench": "overhead", "quick": args.quick, "env": env, "latency": latency,
               "throughput": throughput, "haproxy": "haproxy" in targets, "notes": notes}
    print()
    print(report(results), flush=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process this bench started was stopped", file=sys.stderr)
        sys.exit(130)
