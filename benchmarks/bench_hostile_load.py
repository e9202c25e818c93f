"""A bounded load test of `tessera serve` in which some clients are hostile (issue 15).

Well-behaved clients send greedy completions (half of them streamed) and check that each text equals the
text the same prompt gets served alone; their latencies are recorded. At the same time hostile clients send:
sampling values that cannot sample (NaN, a seed past 2**64: 400), extreme values that can (temperature
1e-45, top_p 1e-300: served), bodies past the size limit (413), too many prompts (400), lone surrogates
(400), a text prompt of nearly the body limit that takes seconds to tokenise (400, context exceeded), and
streams that disconnect after their first token. Everything runs on loopback with a bounded number of
clients and requests.

The same load runs twice, first calm (the well-behaved clients alone) and then hostile, so the latency bound
is stated against a baseline measured in the same run.

    python -m benchmarks.bench_hostile_load   # the demo parent, 3 rounds; writes <results>/cpu_hostile_load
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

from tessera.demo import CODE_PROMPTS

from .harness import wait_healthy

PROMPTS = CODE_PROMPTS
MAX_TOKENS = 24


@dataclass
class LoadReport:
    requests: int = 0  # all requests sent, hostile included
    hostile: int = 0
    good_errors: list[str] = field(default_factory=list)  # what went wrong for well-behaved clients
    hostile_unexpected: list[str] = field(default_factory=list)  # hostile requests not answered as expected
    latencies: list[float] = field(default_factory=list)  # of well-behaved requests, seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "hostile": self.hostile,
            "hostile_share": round(self.hostile / self.requests, 3) if self.requests else 0.0,
            "good_requests": len(self.latencies),
            "good_errors": len(self.good_errors),
            "hostile_unexpected": len(self.hostile_unexpected),
            "p50_s": round(statistics.median(self.latencies), 3),
            "p99_s": round(self.quantile(0.99), 3),
            "max_s": round(max(self.latencies), 3),
        }


async def _completion(http: httpx.AsyncClient, prompt: str, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if not stream:
        r = await http.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text = ""
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                text += event["choices"][0]["text"]
    return text


async def _good_client(http: httpx.AsyncClient, index: int, rounds: int, solo: dict[str, str], report: LoadReport):
    for k in range(rounds):
        prompt = PROMPTS[(index + k) % len(PROMPTS)]
        start = time.perf_counter()
        report.requests += 1
        try:
            text = await _completion(http, prompt, stream=(index + k) % 2 == 0)
        except Exception as e:  # every failure of a well-behaved client is a finding
            report.good_errors.append(f"{prompt!r}: {type(e).__name__}: {e}")
            continue
        report.latencies.append(time.perf_counter() - start)
        if text != solo[prompt]:
            report.good_errors.append(f"{prompt!r}: got {text!r}, served alone {solo[prompt]!r}")


def _hostile_requests(body_limit: int) -> list[tuple[str, object, int]]:
    """(what, request body as bytes or a JSON-able object, expected status)."""
    big_text = "x = 1; " * ((body_limit - 1000) // 7)  # just under the limit: seconds of tokenising
    return [
        ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', 400),
        ("seed 2**64", {"prompt": "x", "max_tokens": 4, "temperature": 1, "seed": 2**64}, 400),
        ("temperature 1e-45", {"prompt": "x =", "max_tokens": 8, "temperature": 1e-45}, 200),
        ("top_p 1e-300", {"prompt": "x =", "max_tokens": 8, "temperature": 1, "top_p": 1e-300}, 200),
        ("body past the limit", b'{"prompt": "' + b"y" * (2 * body_limit) + b'"}', 413),
        ("500 prompts", {"prompt": ["x"] * 500, "max_tokens": 2}, 400),
        ("lone surrogate", b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
        ("prompt near the body limit", {"prompt": big_text, "max_tokens": 2}, 400),
        ("disconnect mid-stream", {"prompt": "def f():", "max_tokens": 200, "ignore_eos": True, "stream": True}, 0),
    ]


async def _hostile_client(http: httpx.AsyncClient, index: int, rounds: int, body_limit: int, report: LoadReport):
    menu = _hostile_requests(body_limit)
    for k in range(rounds):
        what, body, expected = menu[(index * rounds + k) % len(menu)]
        report.requests += 1
        report.hostile += 1
        try:
            if expected == 0:  # read the first event, then hang up
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
                continue
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            if r.status_code != expected:
                report.hostile_unexpected.append(f"{what}: status {r.status_code}, expected {expected}")
        except httpx.HTTPError as e:
            if expected != 413:  # the server may close the connection while a refused body is still sent
                report.hostile_unexpected.append(f"{what}: {type(e).__name__}: {e}")


async def run_load(
    base: str, solo: dict[str, str], clients: int, rounds: int, hostile_share: float, body_limit: int
) -> LoadReport:
    """`clients` at once, each sending `rounds` requests one after another; a `hostile_share` of them hostile."""
    report = LoadReport()
    hostile = round(clients * hostile_share)
    limits = httpx.Limits(max_connections=2 * clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        tasks = [_hostile_client(http, i, rounds, body_limit, report) for i in range(hostile)]
        tasks += [_good_client(http, i, rounds, solo, report) for i in range(clients - hostile)]
        await asyncio.gather(*tasks)
    return report


def solo_texts(base: str) -> dict[str, str]:
    """Each prompt's greedy text served alone, one request at a time."""
    with httpx.Client(base_url=base, timeout=120) as http:
        return {
            p: http.post("/v1/completions", json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}).json()[
                "choices"
            ][0]["text"]
            for p in PROMPTS
        }


def calm_and_hostile(base: str, body_limit: int, clients: int = 24, rounds: int = 3, share: float = 1 / 3) -> dict:
    """The calm run (well-behaved clients only), then the same clients with hostile ones beside them."""
    solo = solo_texts(base)
    good = clients - round(clients * share)
    calm = asyncio.run(run_load(base, solo, good, rounds, 0.0, body_limit))
    hostile = asyncio.run(run_load(base, solo, clients, rounds, share, body_limit))
    return {"calm": calm, "hostile": hostile}


def main(rounds: int = 3) -> None:
    """`rounds` interleaved (calm, hostile) pairs against the demo parent; writes <results>/cpu_hostile_load."""
    import socket
    import threading

    import uvicorn

    from tessera.demo import PARENT_DIR
    from tessera.runtime.server import build_server

    from .harness import environment, write_results

    served = build_server(PARENT_DIR, max_batch=16, max_model_len=512)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(served.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(base, 60)
    pairs = [calm_and_hostile(base, served.max_request_bytes) for _ in range(rounds)]
    uv.should_exit = True
    thread.join(30)  # the server's shutdown stops the engine processes
    ratios = [p["hostile"].quantile(0.99) / p["calm"].quantile(0.99) for p in pairs]
    results = {
        **environment(),
        "setup": {
            "model": "demo parent",
            "max_batch": 16,
            "max_model_len": 512,
            "clients": 24,
            "hostile_clients": 8,
            "requests_per_client": 3,
            "max_tokens": MAX_TOKENS,
            "body_limit": served.max_request_bytes,
        },
        "rounds": [{k: r.summary() for k, r in p.items()} for p in pairs],
        "p99_ratio_median": round(statistics.median(ratios), 3),
        "p99_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "good_errors": sum(len(p["hostile"].good_errors) + len(p["calm"].good_errors) for p in pairs),
        "hostile_unexpected": [u for p in pairs for u in p["hostile"].hostile_unexpected],
    }
    lines = [
        f"# Hostile load on `tessera serve` ({results['device']}, commit {results['commit']})",
        "",
        "| round | requests | hostile | errors seen by well-behaved clients | calm p50 / p99 (s) | "
        "hostile p50 / p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for k, p in enumerate(pairs, 1):
        c, h = p["calm"].summary(), p["hostile"].summary()
        lines.append(
            f"| {k} | {h['requests']} | {h['hostile']} | {h['good_errors'] + c['good_errors']} | "
            f"{c['p50_s']} / {c['p99_s']} | {h['p50_s']} / {h['p99_s']} |"
        )
    lines += [
        "",
        f"p99 hostile / calm: median {results['p99_ratio_median']}x, range "
        f"{results['p99_ratio_range'][0]}-{results['p99_ratio_range'][1]}x",
    ]
    print(json.dumps(results, indent=1))
    print(write_results("cpu_hostile_load", results, "\n".join(lines)))


if __name__ == "__main__":
    main()
