"""Build signround's offline default calibration corpus from text that ships with CPython.

    python3 scripts/build_default_corpus.py

Sources (all under the PSF License 2.0, a permissive license): the Python language reference topics
in ``pydoc_data.topics`` (technical prose with interactive-session examples) and the source code of
a fixed list of standard-library modules (code with docstrings and comments). The records are
interleaved so any prefix mixes prose and code. Output: ``signround/calib/data/default_corpus.jsonl.gz``.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "signround" / "calib" / "data" / "default_corpus.jsonl.gz"
CODE_MODULES = [
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py",
    "datetime.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py",
    "string.py", "textwrap.py", "threading.py", "tokenize.py", "typing.py", "uuid.py", "zipfile.py",
]
CHUNK_CHARS = 12_000  # long records, so most survive a 2048-token length filter


def chunks(text: str) -> list[str]:
    parts, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= CHUNK_CHARS:
            parts.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and size > 2000:
        parts.append("\n\n".join(cur))
    return parts


def main() -> None:
    import pydoc_data.topics as topics

    prose = [("pydoc:" + k, c) for k in sorted(topics.topics) for c in chunks(topics.topics[k])]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [("stdlib:" + m, c) for m in CODE_MODULES for c in chunks((stdlib / m).read_text())]
    records = []
    for i in range(max(len(prose), len(code))):
        for group in (prose, code):
            if i < len(group):
                records.append({"source": group[i][0], "text": group[i][1]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    total = sum(len(r["text"]) for r in records)
    print(f"{len(records)} records, {total / 1e6:.2f} M characters -> {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
