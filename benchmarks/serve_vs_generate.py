"""One request through `calm serve` against `calm generate`, decode tokens/s, side by side (A B A B).

generate: `calm generate --json` (its decode tokens/s, load and prefill excluded).
serve: one streamed completion from a running `calm serve`, timed at the client from the
first content chunk to the last (the first chunk's tokens are not counted), so HTTP, SSE and
JSON costs are in it. Both use the same model, seed, temperature and token budget (EOS can
end a run early; both report the tokens they produced).

    python benchmarks/serve_vs_generate.py --model weights/default -n 128 --runs 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_rate(args: argparse.Namespace, seed: int, env: dict[str, str]) -> float:
    out = subprocess.run(
        ["calm", "generate", args.prompt, "-m", args.model, "-n", str(args.n), "--temp", str(args.temp), "--seed", str(seed),
         "--json", "--device", "cpu"],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(out.stdout)["tokens_per_s"]


def serve_rate(base: str, args: argparse.Namespace, seed: int, name: str) -> float:
    body = {"model": name, "prompt": args.prompt, "max_tokens": args.n, "temperature": args.temp, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    usage = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    # The first chunk holds one step's K tokens; the rest came in the time between the first and last chunk.
    return (usage["completion_tokens"] - args.k) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/default")
    parser.add_argument("--prompt", default="The history of the")
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--temp", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-k", type=int, default=2, help="tokens per step of the model (its K)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    name = os.path.basename(os.path.abspath(args.model))
    server = subprocess.Popen(["calm", "serve", "-m", args.model, "--port", str(port), "--device", "cpu"], env=env,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        serve_rate(base, args, 0, name)  # warm-up
        gen, srv = [], []
        for run in range(args.runs):
            gen.append(generate_rate(args, 100 + run, env))
            srv.append(serve_rate(base, args, 100 + run, name))
            print(f"run {run}: generate {gen[-1]:.1f} tok/s, serve {srv[-1]:.1f} tok/s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    g, s = statistics.fmean(gen), statistics.fmean(srv)
    print(json.dumps({"generate_tok_s": round(g, 2), "serve_tok_s": round(s, 2), "ratio": round(s / g, 3),
                      "runs": args.runs, "threads": args.threads, "max_tokens": args.n, "temp": args.temp}))


if __name__ == "__main__":
    main()
