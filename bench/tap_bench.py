"""The SSE tap's cost per chunk, against a baseline revision of proxy/sse.py, in one run.

    python bench/tap_bench.py [REV]      # REV defaults to 9678215 (before the usage-member rule)

Feeds 2,000 OpenAI-shaped chat chunks (as the proxy sees them when it added include_usage), with
and without OpenAI's "obfuscation" pad, through UsageTap(drop_usage_chunk=True); alternates the
two versions 15 times and keeps each one's best, so a busy machine skews both alike.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from proxy.sse import UsageTap  # noqa: E402


def baseline(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:proxy/sse.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("proxy.sse_baseline", fh.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(fh.name)
    return module.UsageTap


def chunk(i: int, pad: bool) -> bytes:
    c = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
         "system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"content": f" word{i}"},
                                                  "logprobs": None, "finish_reason": None}], "usage": None}
    if pad:
        c["obfuscation"] = "AAatV4uAp"
    return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"


def main() -> None:
    old = baseline(sys.argv[1] if len(sys.argv) > 1 else "9678215")
    for pad in (False, True):
        reads = [chunk(i, pad) for i in range(2000)]
        best = {"baseline": float("inf"), "now": float("inf")}
        for _ in range(15):
            for name, cls in (("baseline", old), ("now", UsageTap)):
                start = time.perf_counter()
                tap = cls(True)
                for read in reads:
                    tap.feed(read)
                best[name] = min(best[name], time.perf_counter() - start)
        per = {k: f"{v / len(reads) * 1e6:.2f} µs" for k, v in best.items()}
        print(f"{'with' if pad else 'without'} obfuscation pad: {per}, ratio {best['now'] / best['baseline']:.2f}")


if __name__ == "__main__":
    main()
