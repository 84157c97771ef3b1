"""MediaWiki: pages of an XML export, and their markup turned into plain prose in linear time.

``iter_wiki_pages`` streams the pages of an export of any schema version. ``clean_wikitext`` makes a
few scanning passes, with no backtracking regexes. What goes and what stays:

- Dropped with their content: comments, templates ``{{...}}`` (nested, and ``{{{params}}}``), tables
  ``{| ... |}`` (nested), ``File:``/``Image:``/``Media:`` and ``Category:`` links (English prefixes
  only: localised namespace names are out of scope), interlanguage links (``[[fr:Paris]]``), magic
  words (``__TOC__``), bare external links ``[http://x]``, and the tags in ``DROPPED_TAGS`` (references,
  maths, chemistry, galleries, timelines, scores, code, ``<pre>``): formulas and code are not prose.
- Kept as their text: links (``[[a|b]]`` -> ``b``, ``[[a]]s`` -> ``as``), labelled external links,
  formatting and layout tags (``<b>``, ``<span>``...), ``<nowiki>`` content (verbatim), list items
  (without their markers), headings (``== H ==`` -> ``H`` on a line of its own).
- Sections that are lists of links (``DROPPED_SECTIONS``: See also, References...) are dropped whole.

Unclosed templates and links stay as literal text (as MediaWiki shows them); an unclosed table or
comment runs to the end of the page (as MediaWiki closes it there).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from xml.etree import ElementTree

from data_pipeline.text.streams import Readable

# fmt: off
DROPPED_TAGS = (
    "ref", "references", "math", "chem", "ce", "gallery", "timeline", "score", "syntaxhighlight",
    "source", "pre", "graph", "mapframe", "maplink", "templatedata", "templatestyles", "imagemap",
    "hiero", "includeonly", "inputbox", "categorytree", "charinsert", "indicator", "section",
)
DROPPED_SECTIONS = frozenset({
    "see also", "references", "external links", "further reading", "notes", "footnotes", "citations",
    "sources", "notes and references", "references and notes", "bibliography",
})
# fmt: on
# Tags whose text is kept while the tag itself goes; any other "<word ...>" is left as text.
# fmt: off
KEPT_TAGS = (
    "b", "i", "u", "s", "strike", "sub", "sup", "span", "small", "big", "div", "p", "br", "hr",
    "center", "font", "blockquote", "poem", "abbr", "code", "var", "kbd", "tt", "strong", "em", "del",
    "ins", "cite", "q", "dfn", "mark", "samp", "bdi", "bdo", "ruby", "rb", "rp", "rt", "rtc", "wbr",
    "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "table", "tr", "td", "th",
    "caption", "thead", "tbody", "tfoot", "time", "data", "noinclude", "onlyinclude", "nowiki",
)
# fmt: on
_LINE_BREAK_TAGS = frozenset(
    {"br", "hr", "p", "div", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"}
)
_DROPPED_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
# Interlanguage prefixes are lower-case language codes: "de", "zh-yue", "be-tarask", "simple".
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
MAX_LINK_DEPTH = 8
"""Deeper ``[[`` are left as text, which keeps link replacement linear on pathological input."""

_SPECIAL_TAG = re.compile(r"<(" + "|".join(DROPPED_TAGS + ("nowiki",)) + r")\b[^<>]*?(/?)>", re.IGNORECASE)
_KEPT_TAG = re.compile(r"</?(" + "|".join(KEPT_TAGS) + r")\b[^<>]*>", re.IGNORECASE)
_BRACE_RUN = re.compile(r"\{\{+|\}\}+")
_TABLE_TOKEN = re.compile(r"^[ \t:]*(\{\||\|\})", re.MULTILINE)
_LINK_TOKEN = re.compile(r"\[\[|\]\]")
# Linear without possessive quantifiers (Python 3.10 has none): the URL, the spaces and the label's
# first character are disjoint classes, so a failed attempt backtracks in O(1) steps per character, and
# URL and label stop at the next "[", so attempts do not overlap.
_EXTERNAL_LINK = re.compile(
    r"\[(?:(?:https?|ftps?|sftp|mailto|news|nntp|irc|ircs|gopher|telnet|svn|git|mms|ssh|tel|xmpp|urn"
    r"|worldwind|geo|sip|sips|magnet):|//)[^\s\[\]<>\"]*(?:[ \t]+([^\[\]\s][^\[\]\n]*)?)?\]",
    re.IGNORECASE,
)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPHASIS = re.compile(r"'''''|'''|''")
_LIST_MARKER = re.compile(r"[*#:;]+[ \t]*")
_LINE_MARKUP_STARTS = frozenset("*#:;-")
# What removed templates leave behind: "()", "(; )", "(French pronunciation: )".
_EMPTY_PARENTHESES = re.compile(r"\((?:[^()\n]*:)?[ \t,;]*\)")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_STOP = re.compile(r"[ \t]+([,.])(?=\s|$)")
# Markup characters inside <nowiki> are moved to a private-use plane until the markup passes are done.
_MARKUP_CHARS = "{}[]|'<>=*#:;_&~-"
_PROTECT = str.maketrans({c: chr(0xF0000 + ord(c)) for c in _MARKUP_CHARS})
_UNPROTECT = str.maketrans({chr(0xF0000 + ord(c)): c for c in _MARKUP_CHARS})


# Namespaces whose titles carry a prefix, for old exports that have no <ns> element.
# fmt: off
_NAMESPACE_NAMES = (
    "user", "wikipedia", "file", "mediawiki", "template", "help", "category", "portal", "draft",
    "module", "timedtext", "book", "gadget",
)
# fmt: on
_NON_ARTICLE_PREFIXES = frozenset(
    {"talk", "image", "media", "special", "gadget definition"}
    | {name for base in _NAMESPACE_NAMES for name in (base, base + " talk")}
)


@dataclass(frozen=True)
class WikiPage:
    """One ``<page>`` of an export.

    Attributes:
        ordinal: Its position among the pages of the file, from 0.
        title: The page title.
        is_article: In the main namespace (0).
        is_redirect: Has a ``<redirect>`` element, or its text starts with ``#REDIRECT`` (any case).
        wikitext: The text of its last revision.
    """

    ordinal: int
    title: str
    is_article: bool
    is_redirect: bool
    wikitext: str


def iter_wiki_pages(stream: Readable, first_ordinal: int = 0) -> Iterator[WikiPage]:
    """Stream the pages of a MediaWiki XML export, any schema version, freeing each once read.

    Pages are numbered from ``first_ordinal`` (the pages before a range of a split dump). Defaults to 0.

    Raises:
        xml.etree.ElementTree.ParseError: The XML is malformed or truncated; the pages before the
            damage have been yielded.
    """
    root: ElementTree.Element | None = None
    ordinal = first_ordinal
    for event, element in ElementTree.iterparse(stream, events=("start", "end")):
        if root is None:
            root = element
        if event == "end" and _local_name(element.tag) == "page":
            yield _wiki_page(ordinal, element)
            ordinal += 1
            root.clear()  # Drops this page and every earlier one: the tree never grows.


def _local_name(tag: str) -> str:
    """``{http://www.mediawiki.org/xml/export-0.11/}page`` -> ``page``."""
    return tag.rpartition("}")[2]


def _children(element: ElementTree.Element) -> dict[str, ElementTree.Element]:
    """Children by local name; for a repeated name (revisions of a history dump) the last one."""
    return {_local_name(child.tag): child for child in element}


def _wiki_page(ordinal: int, page: ElementTree.Element) -> WikiPage:
    fields = _children(page)
    title = (fields["title"].text or "") if "title" in fields else ""
    revision = _children(fields["revision"]) if "revision" in fields else {}
    wikitext = (revision["text"].text or "") if "text" in revision else ""
    is_redirect = "redirect" in fields or wikitext.lstrip()[:9].upper() == "#REDIRECT"
    return WikiPage(ordinal, title, _is_article(title, fields.get("ns")), is_redirect, wikitext)


def _is_article(title: str, namespace: ElementTree.Element | None) -> bool:
    """Namespace 0; exports without ``<ns>`` are judged by the title's prefix."""
    if namespace is not None:
        return (namespace.text or "").strip() == "0"
    prefix, colon, _ = title.partition(":")
    return not colon or prefix.strip().lower().replace("_", " ") not in _NON_ARTICLE_PREFIXES


def clean_wikitext(wikitext: str) -> str:
    """Turn the wikitext of one page into clean prose (see the module docstring for what is kept).

    Args:
        wikitext: The ``<text>`` of a page revision.

    Returns:
        Paragraphs separated by one blank line; headings and list items on lines of their own; no
        leading or trailing blank lines. HTML entities are decoded.
    """
    text = _remove_comments(wikitext)
    text = _replace_special_tags(text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _replace_internal_links(text)
    text = _EXTERNAL_LINK.sub(lambda match: (match.group(1) or "").strip(), text)
    text = _KEPT_TAG.sub(lambda match: "\n" if match.group(1).lower() in _LINE_BREAK_TAGS else "", text)
    text = _MAGIC_WORD.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _clean_lines(text)
    return html.unescape(text.translate(_UNPROTECT))


def _remove_comments(text: str) -> str:
    """Drop ``<!-- ... -->``; an unclosed comment runs to the end, as in MediaWiki."""
    pieces = []
    position = 0
    while (start := text.find("<!--", position)) >= 0:
        pieces.append(text[position:start])
        end = text.find("-->", start + 4)
        position = len(text) if end < 0 else end + 3
    pieces.append(text[position:])
    return "".join(pieces)


class _CloserFinder:
    """Finds the next ``</name>`` after a position, remembering each search so the scan stays linear."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._patterns: dict[str, re.Pattern[str]] = {}
        # name -> (searched from, start, end) of the next closer; start -1 when there is none.
        self._found: dict[str, tuple[int, int, int]] = {}

    def find(self, name: str, position: int) -> tuple[int, int] | None:
        found = self._found.get(name)
        if found is None or found[0] > position or (found[1] != -1 and found[1] < position):
            pattern = self._patterns.setdefault(name, re.compile(rf"</{name}\s*>", re.IGNORECASE))
            match = pattern.search(self._text, position)
            found = (position, match.start(), match.end()) if match else (position, -1, -1)
            self._found[name] = found
        return None if found[1] == -1 else (found[1], found[2])


def _replace_special_tags(text: str) -> str:
    """Drop ``DROPPED_TAGS`` blocks with their content; protect ``<nowiki>`` content from markup passes.

    A self-closing tag (``<ref name="a" />``) goes alone; so does an opening tag never closed.
    """
    pieces = []
    position = 0
    closers = _CloserFinder(text)
    while match := _SPECIAL_TAG.search(text, position):
        pieces.append(text[position : match.start()])
        name = match.group(1).lower()
        position = match.end()
        if match.group(2):
            continue
        closer = closers.find(name, position)
        if closer is None:
            continue
        if name == "nowiki":
            pieces.append(text[position : closer[0]].translate(_PROTECT))
        position = closer[1]
    pieces.append(text[position:])
    return "".join(pieces)


def _remove_templates(text: str) -> str:
    """Drop ``{{templates}}`` and ``{{{parameters}}}``, nested to any depth, by matching brace runs.

    A run of 3 opening braces is a parameter, 2 a template, longer runs templates around an innermost
    parameter when odd; closing runs close the innermost open constructs they can.
    """
    spans: list[tuple[int, int]] = []  # outermost closed constructs so far, in text order
    stack: list[tuple[int, int, int]] = []  # (brace width, start, len(spans) when opened)
    for match in _BRACE_RUN.finditer(text):
        start, run = match.start(), match.end() - match.start()
        if text[start] == "{":
            widths = [2] * ((run - 3) // 2) + [3] if run % 2 else [2] * (run // 2)
            for width in widths:
                stack.append((width, start, len(spans)))
                start += width
            continue
        _close_braces(stack, spans, start, run)
    return _cut(text, spans)


def _close_braces(
    stack: list[tuple[int, int, int]], spans: list[tuple[int, int]], start: int, run: int
) -> None:
    """Close open brace constructs with a run of ``run`` closing braces at ``start``."""
    used = 0
    while run - used >= 2 and stack:
        width, opened_at, mark = stack.pop()
        used += width if run - used >= width else 2
        del spans[mark:]  # the constructs nested inside are covered by this one
        spans.append((opened_at, start + used))


def _remove_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables (nested) whose delimiters start a line; an unclosed one runs to the end."""
    spans: list[tuple[int, int]] = []
    stack: list[tuple[int, int]] = []  # (start, len(spans) when opened)
    for match in _TABLE_TOKEN.finditer(text):
        if match.group(1) == "{|":
            stack.append((match.start(), len(spans)))
        elif stack:
            opened_at, mark = stack.pop()
            del spans[mark:]
            spans.append((opened_at, match.end()))
    if stack:
        opened_at, mark = stack[0]
        del spans[mark:]
        spans.append((opened_at, len(text)))
    return _cut(text, spans)


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without the sorted, disjoint ``(start, end)`` spans."""
    pieces = []
    position = 0
    for start, end in spans:
        pieces.append(text[position:start])
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _replace_internal_links(text: str) -> str:
    """Replace ``[[...]]`` links, innermost first (file captions hold links), by their shown text."""
    frames: list[list[str]] = [[]]  # frames[0] is the output; one frame per open link
    position = 0
    for match in _LINK_TOKEN.finditer(text):
        frames[-1].append(text[position : match.start()])
        position = match.end()
        if match.group() == "[[" and len(frames) <= MAX_LINK_DEPTH:
            frames.append([])
        elif match.group() == "]]" and len(frames) > 1:
            content = "".join(frames.pop())
            frames[-1].append(_link_text(content))
        else:
            frames[-1].append(match.group())
    frames[-1].append(text[position:])
    while len(frames) > 1:  # unclosed links stay as text
        content = "".join(frames.pop())
        frames[-1].append("[[" + content)
    return "".join(frames[0])


def _link_text(content: str) -> str:
    """The shown text of a link whose inside is ``content``: the label, else the target."""
    target, pipe, label = content.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link, not a categorisation
        target = target[1:].strip()
    else:
        prefix, colon, _ = target.partition(":")
        if colon and (
            prefix.strip().lower() in _DROPPED_LINK_NAMESPACES or _LANGUAGE_PREFIX.fullmatch(prefix)
        ):
            return ""
    label = label.strip()
    if label:
        return label
    shown = target.replace("_", " ")
    return _pipe_trick(shown) if pipe else shown


def _pipe_trick(target: str) -> str:
    """``[[Paris (France)|]]`` shows ``Paris``: a final parenthesised part is left out."""
    opening = target.rfind("(")
    if target.endswith(")") and opening > 0 and ")" not in target[opening:-1]:
        return target[:opening].rstrip()
    return target


def _clean_lines(text: str) -> str:
    """Headings to their own lines, dropped sections skipped, list markers stripped, blank lines collapsed."""
    text = _EMPTY_PARENTHESES.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_STOP.sub(r"\1", text)
    lines: list[str] = []
    dropped_level = 0  # level of the heading of the section being dropped; 0 when none
    for line in text.split("\n"):
        line = line.strip()
        heading = _heading(line) if line[:1] == "=" else None
        if heading is not None:
            level, title = heading
            if dropped_level and level > dropped_level:
                continue
            dropped_level = level if title.lower() in DROPPED_SECTIONS else 0
            if not dropped_level:
                lines.extend(("", title, ""))
        elif not dropped_level:
            lines.append(_clean_line(line) if line[:1] in _LINE_MARKUP_STARTS else line)
    return _collapse_blank_lines(lines)


def _heading(line: str) -> tuple[int, str] | None:
    """``(level, title)`` of a stripped ``== Title ==`` line, else None."""
    level = min(len(line) - len(line.lstrip("=")), len(line) - len(line.rstrip("=")), 6)
    title = line[level:-level].strip()
    if level == 0 or len(line) <= 2 * level or not title:
        return None
    return level, title


def _clean_line(line: str) -> str:
    """A stripped body line starting with markup: a horizontal rule goes, list markers go."""
    if line.startswith("----") and not line.strip("-"):
        return ""
    if line[0] == "-":
        return line
    return _LIST_MARKER.sub("", line, count=1)


def _collapse_blank_lines(lines: list[str]) -> str:
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):
            kept.append(line)
    while kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept)
