"""Prefix affinity on the real engine: multi-turn chats through the daemon, affinity on vs off.

Several concurrent conversations, each with its own long system prompt (300-600 tokens) and
growing turns (the model's own replies, of varying length, are sent back), run through the
daemon with `affinity: true` and with `affinity: false`, each run on freshly started engines
with the same seeded workload; rounds alternate (on, off, off, on, ...) and each arm's
figures pool its rounds. Per request the time to first token and the prompt tokens the
engine took from its cache (`timings.cache_n`) are recorded.

    .venv/bin/python tests/bench/affinity.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tests.bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.balance import (
    MODEL,
    SAMPLING,
    WORDS,
    Daemon,
    Result,
    Sample,
    client_session,
    engine_binary,
    exit_on_sigterm,
    fmt,
    percentile,
    sample_load,
    started_pids,
    stream_chat,
    workdir_for,
)

TARGET_RATIO = 1.5
TOKENS_PER_WORD = 1.15  # Gemma 3's tokenizer on the WORDS vocabulary, measured
TOPICS = ("a bakery", "a bike shop", "a library", "a ferry line", "a dental clinic",
          "a chess club", "a weather station", "a zoo", "a print shop", "a ski school")


@dataclass(frozen=True)
class Conversation:
    """One seeded chat: its system prompt, user turns, think times and start offset."""

    index: int
    system: str
    users: tuple[str, ...]
    replies: tuple[int, ...]  # max_tokens of each turn's reply (ignore_eos: exactly that)
    thinks: tuple[float, ...]
    start: float


def make_workload(seed: int, conversations: int, turns: int, system_tokens: tuple[int, int],
                  reply_tokens: tuple[int, int]) -> list[Conversation]:
    """`conversations` chats of `turns` turns, each system prompt unique and long.

    Reply lengths vary per turn: with one fixed length every request takes the same time,
    the chats fall into lockstep (the same few always finish together on one engine and
    come back to the slots they freed), and a balancer without affinity keeps every chat
    on one replica by accident.
    """
    rng = random.Random(seed)
    out = []
    for c in range(conversations):
        tokens = rng.randint(*system_tokens)
        topic = TOPICS[c % len(TOPICS)]
        system = (f"You are the assistant of {topic}, desk number {c}. Answer briefly. "
                  "Reference notes follow: "
                  + " ".join(rng.choice(WORDS) for _ in range(int(tokens / TOKENS_PER_WORD))))
        users = tuple(
            f"Turn {t}: what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}? "
            + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24)))
            for t in range(turns))
        replies = tuple(rng.randint(*reply_tokens) for _ in range(turns))
        thinks = tuple(rng.uniform(0.2, 1.0) for _ in range(turns))
        out.append(Conversation(c, system, users, replies, thinks, rng.uniform(0.0, 2.0)))
    return out


@dataclass
class Turn:
    """One request of one conversation."""

    conversation: int
    turn: int
    result: Result


async def converse(session: Any, url: str, conv: Conversation, run: str, t0: float,
                   out: list[Turn]) -> None:
    """Play one conversation turn by turn, sending the model's own replies back."""
    await asyncio.sleep(conv.start)
    messages: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
    for t, user in enumerate(conv.users):
        messages.append({"role": "user", "content": user})
        body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": conv.replies[t], "seed": conv.index * 1000 + t, **SAMPLING,
                "messages": list(messages)}
        res = Result(run, 0, t, conv.replies[t], time.monotonic() - t0)
        await stream_chat(session, url, body, res)
        out.append(Turn(conv.index, t, res))
        messages.append({"role": "assistant", "content": res.text})
        await asyncio.sleep(conv.thinks[t])


def summarize(turns: list[Turn]) -> dict[str, Any]:
    """TTFT and cache figures for all requests and for the follow-up turns alone."""

    def figures(rows: list[Turn]) -> dict[str, Any]:
        ok = [r.result for r in rows if r.result.ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        cached = [r.cached_tokens or 0 for r in ok]
        prompt = [r.prompt_tokens or 0 for r in ok]
        return {
            "requests": len(rows), "ok": len(ok),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
            "cached_mean": sum(cached) / len(cached) if cached else None,
            "prompt_mean": sum(prompt) / len(prompt) if prompt else None,
            "cached_share": sum(cached) / sum(prompt) if sum(prompt) else None,
        }

    # A follow-up turn "hit" its prefix when the engine reused at least the previous
    # turn's prompt: the request went to the replica that held this conversation.
    prev: dict[int, int] = {}
    hits = follow = 0
    for row in sorted(turns, key=lambda r: (r.conversation, r.turn)):
        res = row.result
        if row.turn > 0 and res.ok and row.conversation in prev:
            follow += 1
            hits += (res.cached_tokens or 0) >= 0.9 * prev[row.conversation]
        if res.ok and res.prompt_tokens:
            prev[row.conversation] = res.prompt_tokens
    return {"all": figures(turns), "follow_up": figures([r for r in turns if r.turn > 0]),
            "prefix_hit_share": hits / follow if follow else None}


@dataclass
class Params:
    """What one run does."""

    quick: bool
    seed: int
    conversations: int
    turns: int
    reply_tokens: tuple[int, int]
    system_tokens: tuple[int, int]
    rounds: int
    supervisor_src: Path | None = None


def params_from(args: argparse.Namespace) -> Params:
    quick = bool(args.quick)
    return Params(
        quick=quick, seed=args.seed,
        conversations=args.conversations or (4 if quick else 8),
        turns=args.turns or (3 if quick else 6),
        reply_tokens=args.reply_tokens,
        system_tokens=(300, 400) if quick else (300, 600),
        rounds=args.rounds or (1 if quick else 2),
        supervisor_src=args.supervisor_src,
    )


@dataclass
class Played:
    """What one daemon run (one arm, one round) recorded."""

    turns: list[Turn]
    samples: list[Sample]
    wall_s: float
    pids: list[int]
    daemon_tokens: dict[str, int]


async def one_run(params: Params, workdir: Path, affinity: bool, round_: int) -> Played:
    """Start a daemon with affinity on or off, play every conversation, stop it."""
    run = "on" if affinity else "off"
    label = f"affinity {run}" + (f" (round {round_})" if params.rounds > 1 else "")
    daemon = Daemon(workdir / f"affinity-{run}-{round_}", affinity=affinity,
                    src=params.supervisor_src)
    turns: list[Turn] = []
    samples: list[Sample] = []
    try:
        started = time.monotonic()
        daemon.start()
        print(f"{label}: daemon ready on :{daemon.port} in "
              f"{time.monotonic() - started:.1f}s; engines on {daemon.engine_ports}", flush=True)
        workload = make_workload(params.seed, params.conversations, params.turns,
                                 params.system_tokens, params.reply_tokens)
        async with client_session() as session:
            t0 = time.monotonic()
            sampler = asyncio.create_task(
                sample_load(session, daemon.engine_ports, daemon.url, samples, t0))
            try:
                await asyncio.gather(*(converse(session, daemon.url, conv, run, t0, turns)
                                       for conv in workload))
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            wall = time.monotonic() - t0
        status = daemon.status()
    finally:
        daemon.stop()
    played = Played(turns, samples, wall, started_pids(daemon), status["models"][0]["tokens"])
    quick = summarize(turns)
    print(f"{label}: {quick['all']['ok']}/{quick['all']['requests']} ok in {wall:.1f}s; "
          f"TTFT p50 {fmt(quick['all']['ttft_p50_s'])}, cached mean "
          f"{quick['all']['cached_mean']:.0f} tokens, follow-up hits "
          f"{quick['prefix_hit_share'] or 0:.0%}", flush=True)
    return played


def pooled(runs: list[Played]) -> dict[str, Any]:
    """One arm's figures over all its rounds (each round on fresh engines)."""
    turns: list[Turn] = []
    for i, played in enumerate(runs):  # conversations are per round: keep them apart
        turns += [Turn(t.conversation + 1000 * i, t.turn, t.result) for t in played.turns]
    summary = summarize(turns)
    samples = [s for played in runs for s in played.samples]
    summary["rounds"] = [{"ttft_p50_s": summarize(p.turns)["all"]["ttft_p50_s"],
                          "prefix_hit_share": summarize(p.turns)["prefix_hit_share"],
                          "wall_s": p.wall_s} for p in runs]
    summary["wall_s"] = sum(p.wall_s for p in runs)
    summary["pids"] = [pid for p in runs for pid in p.pids]
    summary["daemon_tokens"] = {key: sum(p.daemon_tokens[key] for p in runs)
                                for key in runs[0].daemon_tokens}
    summary["busy_slots_mean"] = (sum(sum(p for p, _ in s.engines) for s in samples)
                                  / len(samples)) if samples else None
    summary["queued_mean"] = (sum((s.daemon_queue or 0) for s in samples)
                              / len(samples)) if samples else None
    summary["per_engine_busy_mean"] = [
        sum(s.engines[i][0] for s in samples) / len(samples) for i in range(2)
    ] if samples else None
    summary["samples"] = [asdict(x) for x in samples]
    summary["requests"] = [asdict(t.result) | {"text": None, "conversation": t.conversation,
                                               "turn": t.turn} for t in turns]
    return summary


async def bench(params: Params, workdir: Path) -> dict[str, Any]:
    """Rounds alternate on, off, off, on, ... so a box that drifts favours neither arm."""
    arms: dict[bool, list[Played]] = {True: [], False: []}
    for r in range(params.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for affinity in order:
            arms[affinity].append(await one_run(params, workdir, affinity, r))
    on, off = pooled(arms[True]), pooled(arms[False])
    p50_on, p50_off = on["all"]["ttft_p50_s"], off["all"]["ttft_p50_s"]
    ratio = p50_off / p50_on if p50_on and p50_off else None
    return {
        "bench": "affinity",
        "params": asdict(params) | {"supervisor_src": str(params.supervisor_src or "")},
        "on": on,
        "off": off,
        "ratio_ttft_p50": ratio,
        "target_ratio": TARGET_RATIO,
        "pass": None if ratio is None else ratio >= TARGET_RATIO,
    }


def report(out: dict[str, Any]) -> None:
    p = out["params"]
    print()
    print(f"affinity: {p['conversations']} conversations x {p['turns']} turns, system prompts "
          f"{p['system_tokens'][0]}-{p['system_tokens'][1]} tokens, replies "
          f"{p['reply_tokens'][0]}-{p['reply_tokens'][1]} tokens, 2 replicas x 2 slots, "
          f"{p['rounds']} round(s) per arm on fresh engines")
    print(f"{'run':4s} {'scope':9s} {'ok':>7s} {'ttft p50':>8s} {'ttft p95':>8s} "
          f"{'cached':>7s} {'prompt':>7s} {'cached%':>7s} {'hits':>5s}")
    for run in ("on", "off"):
        s = out[run]
        for scope in ("all", "follow_up"):
            f = s[scope]
            hits = s["prefix_hit_share"]
            hit_text = "-" if scope == "all" or hits is None else f"{hits:.0%}"
            share = "-" if f["cached_share"] is None else f"{f['cached_share']:.0%}"
            print(f"{run:4s} {scope:9s} {f['ok']:>3d}/{f['requests']:<3d} "
                  f"{fmt(f['ttft_p50_s']):>8s} {fmt(f['ttft_p95_s']):>8s} "
                  f"{(f['cached_mean'] or 0):7.1f} {(f['prompt_mean'] or 0):7.1f} "
                  f"{share:>7s} {hit_text:>5s}")
    for run in ("on", "off"):
        rounds = out[run]["rounds"]
        print(f"{run:4s} per round: TTFT p50 "
              + ", ".join(fmt(r["ttft_p50_s"]) for r in rounds) + "; hits "
              + ", ".join(f"{r['prefix_hit_share'] or 0:.0%}" for r in rounds))
    if out["ratio_ttft_p50"] is None:
        print("TTFT_off / TTFT_on (p50): n/a")
    else:
        verdict = "PASS" if out["pass"] else "MISS"
        print(f"TTFT_off / TTFT_on (p50) = {out['ratio_ttft_p50']:.3f} "
              f"(target >= {TARGET_RATIO}) {verdict}")


def token_range(text: str) -> tuple[int, int]:
    """`16` or `4-28`."""
    low, dash, high = text.partition("-")
    try:
        pair = (int(low), int(high if dash else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--conversations", type=int, help="concurrent chats (default 8; quick 4)")
    ap.add_argument("--turns", type=int, help="turns per chat (default 6; quick 3)")
    ap.add_argument("--reply-tokens", type=token_range, default=(4, 28), metavar="MIN-MAX",
                    help="reply length range, drawn per turn (default 4-28, mean 16)")
    ap.add_argument("--rounds", type=int,
                    help="daemon runs per arm, alternating on/off (default 2; quick 1)")
    ap.add_argument("--workdir", type=Path,
                    help="keep configs and logs here (default: a temporary directory)")
    ap.add_argument("--supervisor-src", type=Path, metavar="DIR",
                    help="run the daemon from the supervisor package in DIR (A/B a change)")
    args = ap.parse_args(argv)
    engine_binary()
    exit_on_sigterm()
    params = params_from(args)
    with workdir_for(args.workdir, "bench-affinity-") as work:
        out = asyncio.run(bench(params, work))
    report(out)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
