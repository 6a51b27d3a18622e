"""Recompute tests/test_anthropic_tokens.py's REFERENCE: the corpus counted by the one Claude
tokenizer Anthropic published (Claude 1/2's, shipped as tokenizer.json in the `anthropic` Python
SDK up to 0.38.0). Needs pip and network access to PyPI; nothing is kept after the run.

    python bench/claude_reference.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unicodedata
import zipfile

import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.claude_corpus import CORPUS  # noqa: E402

# The GPT-2 pre-tokenizer split, which a HF ByteLevel pre-tokenizer (use_regex default) applies.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_of_char() -> dict[str, int]:
    """Invert GPT-2's byte -> printable character table, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def encoding(tokenizer_json: dict) -> tiktoken.Encoding:
    """The BPE as tiktoken ranks: single bytes first, then each merge's result in merge order."""
    byte_of = _byte_of_char()
    ranks = {bytes([b]): b for b in range(256)}
    for i, merge in enumerate(tokenizer_json["model"]["merges"]):
        left, right = merge.split(" ")
        ranks.setdefault(bytes(byte_of[c] for c in left + right), 256 + i)
    return tiktoken.Encoding("claude-published", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "anthropic==0.38.0", "--no-deps",
                        "-q", "-d", tmp], check=True)
        wheel = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
            enc = encoding(json.loads(z.read("anthropic/tokenizer.json")))
    counts = {name: len(enc.encode_ordinary(unicodedata.normalize("NFKC", text))) for name, text in CORPUS.items()}
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
