"""Many concurrent streams through the daemon: no stall, and the relay's cost per chunk.

Every phase opens all streams at once from one aiohttp session and records, per stream,
the largest gap between two arrivals of SSE events, the time to the first event and the
total. Phases alternate between the fake engines directly and the daemon in front of the
same engines. Run from the repository root:

    .venv/bin/python -m tests.bench.streaming [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

if __package__ in (None, ""):  # run as a script: python tests/bench/streaming.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import (
    CHAT,
    HOST,
    Daemon,
    chat_body,
    fmt,
    stop_on_sigterm,
    summarize,
    table,
    use_uvloop,
    write_json,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (used by the smoke test): 20 streams of 10 tokens")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    p.add_argument("--streams", type=int, default=None,
                   help="concurrent streams per phase (default 500; quick 20)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per stream (default 40; quick 10)")
    p.add_argument("--rate", type=float, default=None,
                   help="fake engine tokens/s per stream (default 20; quick 50)")
    p.add_argument("--rounds", type=int, default=None,
                   help="phases per target, alternating direct/daemon (default 2; quick 1)")
    p.add_argument("--slots", type=int, default=256, help="slots per replica (2 replicas)")
    p.add_argument("--no-install", action="store_true",
                   help="accepted for symmetry with overhead.py; this bench installs nothing")
    p.add_argument("--stall-ms", type=float, default=1000.0,
                   help="a gap between chunks longer than this counts as a stall")
    args = p.parse_args(argv)
    quick = args.quick
    args.streams = args.streams if args.streams is not None else (20 if quick else 500)
    args.tokens = args.tokens if args.tokens is not None else (10 if quick else 40)
    args.rate = args.rate if args.rate is not None else (50.0 if quick else 20.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    return args


@dataclass
class Stream:
    """What one stream did; times in seconds."""

    ok: bool
    events: int
    ttft: float
    max_gap: float
    total: float
    error: str | None = None


async def one_stream(session: aiohttp.ClientSession, url: str, payload: bytes) -> Stream:
    """POST a streaming chat request and time the arrival of its SSE events."""
    clock = time.perf_counter
    t0 = clock()
    events = 0
    last: float | None = None
    ttft = max_gap = 0.0
    done = False
    error: str | None = None
    buf = b""
    try:
        async with session.post(url, data=payload,
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}"
                await resp.read()
            else:
                async for data in resp.content.iter_any():
                    now = clock()
                    buf += data
                    cut = buf.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    complete, buf = buf[:cut + 2], buf[cut + 2:]
                    events += complete.count(b"\n\n")
                    if b'"error"' in complete:
                        error = "error event: " + complete.decode(errors="replace")[-200:]
                    if b"data: [DONE]" in complete:
                        done = True
                    if last is None:
                        ttft = now - t0
                    else:
                        max_gap = max(max_gap, now - last)
                    last = now
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    if error is None and not done:
        error = "ended without [DONE]"
    return Stream(error is None, events, ttft, max_gap, clock() - t0, error)


async def phase(session: aiohttp.ClientSession, urls: list[str], streams: int,
                payload: bytes) -> tuple[list[Stream], float]:
    """Open every stream at once (spread over the urls); results and wall seconds."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(session, urls[i % len(urls)], payload)
                                     for i in range(streams)))
    return list(results), time.perf_counter() - t0


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def run(args: argparse.Namespace,
              daemon: Daemon) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    engines = daemon.engine_ports()
    if len(engines) != 2:
        raise RuntimeError(f"expected 2 READY replicas, got ports {engines}")
    targets = {"direct": [f"http://{HOST}:{p}{CHAT}" for p in engines],
               "daemon": [daemon.url + CHAT]}
    payload = json.dumps(chat_body(args.tokens, stream=True)).encode()
    me = psutil.Process()
    daemon_proc = psutil.Process(daemon.pid)
    engine_procs = daemon_proc.children()
    per: dict[str, list[Stream]] = {t: [] for t in targets}
    phases: list[dict[str, Any]] = []
    acc = {t: {"wall_s": 0.0, "daemon_cpu_s": 0.0, "engines_cpu_s": 0.0, "client_cpu_s": 0.0}
           for t in targets}
    connector = aiohttp.TCPConnector(limit=args.streams * 2 + 16, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=max(60.0, 5 * args.tokens / args.rate + 30))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for r in range(args.rounds):
            for t, urls in targets.items():
                print(f"round {r + 1}/{args.rounds}: {args.streams} streams, {t} ...",
                      flush=True)
                d0, e0, c0 = cpu_of([daemon_proc]), cpu_of(engine_procs), cpu_of([me])
                results, wall = await phase(session, urls, args.streams, payload)
                d1, e1, c1 = cpu_of([daemon_proc]), cpu_of(engine_procs), cpu_of([me])
                per[t] += results
                ok = [s for s in results if s.ok]
                phases.append({
                    "round": r + 1, "target": t, "wall_s": wall, "failed": len(results) - len(ok),
                    "ttft_p99_ms": summarize([s.ttft * 1000 for s in ok])["p99"],
                    "max_gap_ms": summarize([s.max_gap * 1000 for s in ok])["max"],
                    "daemon_cpu_s": d1 - d0})
                a = acc[t]
                a["wall_s"] += wall
                a["daemon_cpu_s"] += d1 - d0
                a["engines_cpu_s"] += e1 - e0
                a["client_cpu_s"] += c1 - c0
    out: dict[str, Any] = {}
    for t, results in per.items():
        ok = [s for s in results if s.ok]
        errors: dict[str, int] = {}
        for s in results:
            if s.error is not None:
                key = s.error[:80]
                errors[key] = errors.get(key, 0) + 1
        events = sum(s.events for s in results)
        a = acc[t]
        row: dict[str, Any] = {
            "streams": len(results), "completed": len(ok), "failed": len(results) - len(ok),
            "errors": errors, "events": events,
            "events_per_stream": events / len(results) if results else 0.0,
            "max_gap_ms": summarize([s.max_gap * 1000 for s in ok]),
            "ttft_ms": summarize([s.ttft * 1000 for s in ok]),
            "total_ms": summarize([s.total * 1000 for s in ok]),
            "chunks_per_s": events / a["wall_s"] if a["wall_s"] > 0 else 0.0, **a,
        }
        out[t] = row
    d = out["daemon"]
    d["chunks_per_core_s"] = d["events"] / d["daemon_cpu_s"] if d["daemon_cpu_s"] > 0 else None
    return out, phases


def report(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"llm-supervisor streaming bench  ({results['env']['summary']})", "",
             f"{s['streams']} concurrent streams per phase, {s['tokens']} tokens each at "
             f"{s['rate']:g} tokens/s (ideal gap {1000 / s['rate']:.0f} ms), 2 replicas x "
             f"{s['slots']} slots, {s['rounds']} phase(s) per target, alternating"]
    rows = []
    for t, v in results["targets"].items():
        g, f, tot = v["max_gap_ms"], v["ttft_ms"], v["total_ms"]
        rows.append([t, f"{v['completed']}/{v['streams']}", str(v["failed"]),
                     fmt(g["p50"], 1), fmt(g["p99"], 1), fmt(g["max"], 1),
                     fmt(f["p50"], 1), fmt(f["p99"], 1), fmt(tot["p99"], 0),
                     fmt(v["chunks_per_s"], 0)])
    lines.append(table(["target", "completed", "failed", "gap p50", "gap p99", "gap max",
                        "ttft p50", "ttft p99", "total p99", "chunks/s"], rows))
    lines.append("(gap = per stream, the largest pause between chunks, ms; ttft, total: ms)")
    lines += ["", "per phase:"]
    lines.append(table(["round", "target", "wall s", "failed", "ttft p99", "gap max",
                        "daemon CPU s"],
                       [[str(p["round"]), p["target"], fmt(p["wall_s"], 2), str(p["failed"]),
                         fmt(p["ttft_p99_ms"], 1), fmt(p["max_gap_ms"], 1),
                         fmt(p["daemon_cpu_s"], 2)] for p in results["phases"]]))
    lines.append("")
    d = results["targets"]["daemon"]
    lines.append(f"daemon: {d['events']} chunks relayed on {d['daemon_cpu_s']:.2f} CPU s = "
                 f"{fmt(d['chunks_per_core_s'], 0)} chunks/s per core "
                 f"(engines {d['engines_cpu_s']:.2f} CPU s, client {d['client_cpu_s']:.2f} "
                 f"CPU s in the daemon phases)")
    lines.append(f"no stall (every stream completed, no gap > {s['stall_ms']:g} ms): "
                 f"{'PASS' if results['no_stall'] else 'MISS'}; daemon max gap "
                 f"{fmt(d['max_gap_ms']['max'], 1)} ms vs direct "
                 f"{fmt(results['targets']['direct']['max_gap_ms']['max'], 1)} ms")
    for t, v in results["targets"].items():
        for err, n in v["errors"].items():
            lines.append(f"{t}: {n} x {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    uvloop = use_uvloop()
    load1 = os.getloadavg()[0]
    fake_args = ["--fake-token-rate", f"{args.rate:g}", "--fake-tokens", str(args.tokens)]
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp, \
            Daemon(Path(tmp), fake_args=fake_args, replicas=2, slots=args.slots,
                   model={"max_queue": max(256, args.streams)},
                   server={"max_connections": max(1024, args.streams * 2)}) as daemon:
        print(f"daemon pid {daemon.pid} on {daemon.port}, engines on "
              f"{daemon.engine_ports()}", flush=True)
        targets, phases = asyncio.run(run(args, daemon))
    load2 = os.getloadavg()[0]
    d = targets["daemon"]
    no_stall = d["failed"] == 0 and d["completed"] > 0 and d["max_gap_ms"]["max"] <= args.stall_ms
    env = {"python": platform.python_version(), "uvloop": uvloop, "cpus": os.cpu_count(),
           "loadavg_1m_before": load1, "loadavg_1m_after": load2}
    env["summary"] = (f"{env['cpus']} CPUs, load {load1:.2f} -> {load2:.2f}, "
                      f"python {env['python']}, uvloop {'on' if uvloop else 'off'}")
    results = {
        "bench": "streaming", "quick": args.quick, "env": env,
        "settings": {"streams": args.streams, "tokens": args.tokens, "rate": args.rate,
                     "rounds": args.rounds, "slots": args.slots, "stall_ms": args.stall_ms},
        "targets": targets, "phases": phases, "chunks_per_core_s": d["chunks_per_core_s"],
        "no_stall": no_stall,
    }
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
