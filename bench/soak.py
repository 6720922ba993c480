"""Soak: N concurrent streamed chats for M minutes against a running Babl, then a flood of bad requests.

    .venv/bin/python bench/soak.py [--clients 8] [--minutes 10] [--warmup-s 30] [--url http://...]

Without `--url` it starts the app as users do (`chainlit run app.py`, demo models built into a temp
folder) and owns its process, so it can read its memory. Each client streams chat completions one after
another (`POST /v1/chat/completions`, `stream: true`); every `--disconnect-every`-th request of a client
hangs up after a few chunks, as a closed browser tab does. Printed after the warm-up and at the end:
completed answers, errors, deliberate disconnects, p50/p95 latency of a whole answer, server RSS.

Then the flood (`--flood-s`): the requests that once froze the server (2,000 prompts × n 8, a body
just under and one far over the 2 MB limit, a 400,000-character history) sent by several threads, plus
more concurrent streams than the queue takes, while `/health` is timed every 100 ms. Goal (#17):
`/health` p95 < 1 s during the flood, and RSS 30 s after it within 10 % of its warm level. Absolute
times depend on the machine; the ratios are what count. JSON: bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import ROOT, percentile, say, write_result

MAX_MINUTES = 120  # bounded: a soak that forgets to stop is not a benchmark


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_of(pid: int | None) -> float | None:
    """Resident memory of process `pid` in MB (None when unknown)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Stats:
    """What the clients did since `reset()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.disconnected = 0
        self.refused = 0  # 429: admission control said "retry later"

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self, rss: float | None) -> dict:
        return {
            "completed": len(self.latencies),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "disconnected_on_purpose": self.disconnected,
            "refused_429": self.refused,
            "p50_s": round(percentile(self.latencies, 50), 3),
            "p95_s": round(percentile(self.latencies, 95), 3),
            "rss_mb": None if rss is None else round(rss, 1),
        }


async def client_loop(http, url: str, headers: dict, index: int, args, stats: Stats, stop_at: float) -> None:
    """One chat: stream answers back to back until `stop_at`; every k-th request hangs up early."""
    import httpx

    count = 0
    while time.monotonic() < stop_at:
        count += 1
        hang_up = args.disconnect_every > 0 and count % args.disconnect_every == 0
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": f"chat {index}, question {count}: write a function"}],
            "max_tokens": args.tokens,
            "temperature": 0.8,
            "stream": True,
        }
        start = time.monotonic()
        try:
            async with http.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                if response.status_code == 429:
                    stats.refused += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                if response.status_code != 200:
                    stats.error(f"http {response.status_code}")
                    await response.aread()
                    continue
                chunks, done, failed = 0, False, False
                async for line in response.aiter_lines():
                    if line.startswith("data: [DONE]"):
                        done = True
                        break
                    if line.startswith("data: "):
                        event = json.loads(line[len("data: ") :])
                        if "error" in event:
                            stats.error(f"error event: {event['error'].get('message', '')[:160]}")
                            failed = True
                            break
                        chunks += 1
                        if hang_up and chunks >= 3:
                            break  # leaving the block closes the connection mid-answer
                if failed:
                    continue
                if hang_up and not done:
                    stats.disconnected += 1
                elif done:
                    stats.latencies.append(time.monotonic() - start)
                else:
                    stats.error(f"stream ended without [DONE] after {chunks} chunks")
        except httpx.HTTPError as exc:
            stats.error(type(exc).__name__)
            await asyncio.sleep(0.5)


async def health_probe(url: str, until: asyncio.Event, out: list[float]) -> None:
    """Time `/health` every 100 ms until `until` is set (timeouts count as 30 s)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        while not until.is_set():
            start = time.monotonic()
            try:
                await http.get(f"{url}/health")
                out.append(time.monotonic() - start)
            except httpx.HTTPError:
                out.append(30.0)
            await asyncio.sleep(0.1)


def flood_requests(model: str) -> list[tuple[str, bytes]]:
    """(path, JSON body) of the requests a review used to freeze the server."""

    def chat(messages: list[dict]) -> bytes:
        return json.dumps({"model": model, "max_tokens": 1, "messages": messages}).encode()

    turn = [{"role": "user", "content": "word " * 40_000}, {"role": "assistant", "content": "ok " * 40_000}]
    question = [{"role": "user", "content": "and?"}]
    many = json.dumps({"model": model, "prompt": ["x"] * 2000, "n": 8, "max_tokens": 1}).encode()
    return [
        ("/v1/completions", many),  # 16,000 generations once
        ("/v1/chat/completions", chat([{"role": "user", "content": "y" * 1_900_000}])),  # just under 2 MB
        ("/v1/chat/completions", chat(turn * 30 + question)),  # a ~10 MB history
        ("/v1/chat/completions", chat(turn + question)),  # 320,000 characters: served, trimmed
    ]


async def flood(url: str, headers: dict, args) -> dict:
    """Bad requests from `--flood-threads` senders plus extra streams, while /health is timed."""
    import httpx

    bodies = flood_requests(args.model)
    statuses: dict[int, int] = {}
    stop = asyncio.Event()
    health: list[float] = []
    probe = asyncio.create_task(health_probe(url, stop, health))
    stop_at = time.monotonic() + args.flood_s

    async def sender(i: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            k = i
            while time.monotonic() < stop_at:
                path, body = bodies[k % len(bodies)]
                k += 1
                try:
                    response = await http.post(f"{url}{path}", content=body,
                                               headers={**headers, "content-type": "application/json"})  # fmt: skip
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1

    extra = Stats()
    async with httpx.AsyncClient(timeout=300) as http:
        streams = [
            client_loop(http, url, headers, 1000 + i, args, extra, stop_at) for i in range(args.flood_streams)
        ]
        await asyncio.gather(*(sender(i) for i in range(args.flood_threads)), *streams)
    stop.set()
    await probe
    return {
        "seconds": args.flood_s,
        "bad_request_statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "extra_streams": extra.summary(None),
        "health_samples": len(health),
        "health_p50_s": round(percentile(health, 50), 3),
        "health_p95_s": round(percentile(health, 95), 3),
        "health_max_s": round(max(health), 3) if health else None,
    }


async def soak(url: str, headers: dict, args, pid: int | None) -> dict:
    import httpx

    stats = Stats()
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        tasks = [
            asyncio.create_task(client_loop(http, url, headers, i, args, stats, stop_at))
            for i in range(args.clients)
        ]
        # Warm: the warm-up time has passed and every client finished an answer (the first loads the model).
        await asyncio.sleep(min(args.warmup_s, args.minutes * 60))
        while len(stats.latencies) < args.clients and time.monotonic() < stop_at:
            await asyncio.sleep(1)
        warm = stats.summary(rss_of(pid))
        warm["seconds"] = round(time.monotonic() - started, 1)
        say(f"after {warm['seconds']:.0f} s warm-up: {fmt(warm)}")
        warm_end = time.monotonic()
        stats.reset()  # the end figures cover the time after the warm-up
        await asyncio.gather(*tasks)
    end = stats.summary(rss_of(pid))
    end["seconds_after_warmup"] = round(time.monotonic() - warm_end, 1)
    say(f"end ({args.minutes:g} min, figures since the warm-up): {fmt(end)}")
    result = {"warm": warm, "end": end}
    # Floods one after another: RSS that grows after the first and then stays is the allocator keeping
    # freed memory; RSS that grows with every flood is a leak.
    result["floods"] = []
    for number in range(1, args.floods + 1 if args.flood_s > 0 else 1):
        say(f"flood {number}: {args.flood_threads} senders of bad requests + {args.flood_streams} streams")
        report = await flood(url, headers, args)
        say(f"flood {number}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
        await asyncio.sleep(args.settle_s)
        after = rss_of(pid)
        report["rss_after_mb"] = None if after is None else round(after, 1)
        if after is not None and warm["rss_mb"]:
            report["rss_after_vs_warm"] = round(after / warm["rss_mb"], 3)
            say(
                f"RSS {args.settle_s:g} s after flood {number}: {after:.0f} MB = {after / warm['rss_mb']:.2f}x warm"
            )
        result["floods"].append(report)
    return result


def fmt(summary: dict) -> str:
    rss = f", RSS {summary['rss_mb']:.0f} MB" if summary.get("rss_mb") else ""
    return (f"{summary['completed']} completed, {summary['errors']} errors {summary['error_kinds'] or ''}, "
            f"{summary['disconnected_on_purpose']} hung up on purpose, {summary['refused_429']} told to retry (429), "
            f"p50 {summary['p50_s']} s, p95 {summary['p95_s']} s{rss}")  # fmt: skip


def start_server(tmp: Path, args) -> tuple[subprocess.Popen, str]:
    """`chainlit run app.py` on the demo models (built into `tmp`), with every client from this address
    allowed `--clients` answers (the per-client share is otherwise 4)."""
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BABL_", "CHAINLIT_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", BABL_MODELS_DIR=str(tmp / "models"),
               BABL_DATA_DIR=str(tmp / "data"), BABL_MAX_PER_CLIENT=str(max(args.clients, 4) + args.flood_streams))  # fmt: skip
    subprocess.run([sys.executable, "-m", "babl_core", "demo", "--out", str(tmp / "models" / "demo")],
                   cwd=ROOT, env=env, check=True, capture_output=True)  # fmt: skip
    port = free_port()
    chainlit = shutil.which("chainlit", path=str(Path(sys.executable).parent)) or "chainlit"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([chainlit, "run", "app.py", "--headless", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer /health in 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent streamed chats (default 8)")
    parser.add_argument(
        "--minutes", type=float, default=10, help=f"how long (default 10, at most {MAX_MINUTES})"
    )
    parser.add_argument(
        "--warmup-s", type=float, default=30, help="seconds before the first figures (default 30)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each answer (default 64)")
    parser.add_argument("--model", default="demo-python", help="catalog id (default demo-python)")
    parser.add_argument("--disconnect-every", type=int, default=5,
                        help="every k-th request of a client hangs up mid-answer (0: never; default 5)")  # fmt: skip
    parser.add_argument("--flood-s", type=float, default=30, help="flood phase seconds (0: none; default 30)")
    parser.add_argument("--floods", type=int, default=2, help="floods one after another (default 2)")
    parser.add_argument("--flood-threads", type=int, default=4, help="senders of bad requests (default 4)")
    parser.add_argument(
        "--flood-streams", type=int, default=8, help="extra streams during the flood (default 8)"
    )
    parser.add_argument(
        "--settle-s", type=float, default=30, help="seconds after the flood before RSS (default 30)"
    )
    parser.add_argument("--url", help="a running server instead of starting one (no RSS then, unless --pid)")
    parser.add_argument("--pid", type=int, help="the running server's process id, for RSS")
    args = parser.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be above 0 and at most {MAX_MINUTES}")
    headers = (
        {"Authorization": f"Bearer {os.environ['BABL_API_KEY']}"} if os.environ.get("BABL_API_KEY") else {}
    )
    tmp = Path(tempfile.mkdtemp(prefix="babl-soak-"))
    proc = None
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            proc, url = start_server(tmp, args)
            pid = proc.pid
            say(f"server at {url} (pid {pid}), log {tmp / 'server.log'}")
        say(f"{args.clients} clients x {args.minutes:g} min, {args.tokens} tokens per answer, "
            f"every {args.disconnect_every}th request hangs up")  # fmt: skip
        result = asyncio.run(soak(url, headers, args, pid))
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("url", "pid")}
        say(f"JSON: {write_result('soak', result)}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
