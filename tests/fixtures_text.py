"""A small hand-written MediaWiki XML export and the clean text expected from it."""

from __future__ import annotations

PARIS_WIKITEXT = """{{Short description|Capital of France}}
{{Infobox settlement
| name = Paris
| population = {{formatnum:{{#expr: 2100000 * 1}}}}
}}
'''Paris''' ({{IPA-fr|paʁi|lang}}) is the [[capital city|capital]] and largest city of [[France]].<ref name="census">{{cite web |url=https://insee.fr |title=Census}}</ref> It hosts many [[museum]]s.<ref name="census" /><!-- keep this sentence short -->

[[File:Paris Night.jpg|thumb|upright=1.2|The [[Eiffel Tower]] seen from the [[Seine|river]] at night]]
__TOC__
== History ==
The city was founded by the ''Parisii'', a [[Celts|Celtic]] people.<ref>Some book, p. 3.</ref> Read the [http://example.com/history official history] or [http://example.org/bare].

{| class="wikitable"
|+ Population
|-
! Year !! People
|-
| 1900 || {{formatnum:2714068}}
|}
=== Districts ===
* The city has twenty <b>arrondissements</b>.
# Each has a <span class="x">mayor</span>.
: Indented remark.

== See also ==
* [[Lyon]]
* [[Marseille]]

== References ==
{{Reflist}}

== External links ==
* [https://www.paris.fr Official site]

[[Category:Capitals in Europe]]
[[de:Paris]]
[[fr:Paris]]
"""

PARIS_CLEAN = """Paris

Paris is the capital and largest city of France. It hosts many museums.

History

The city was founded by the Parisii, a Celtic people. Read the official history or.

Districts

The city has twenty arrondissements.
Each has a mayor.
Indented remark."""

LYON_WIKITEXT = "'''Lyon''' is a city in [[France]] on the [[Rhône]]."
LYON_CLEAN = "Lyon\n\nLyon is a city in France on the Rhône."

_HEADER = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <namespaces>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
    </namespaces>
  </siteinfo>
"""
_FOOTER = "</mediawiki>\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def wiki_page(title: str, namespace: int, text: str, redirect: str | None = None) -> str:
    """One ``<page>`` element of an export, the text XML-escaped as in real dumps."""
    redirect_element = f'    <redirect title="{redirect}" />\n' if redirect else ""
    return (
        f"  <page>\n    <title>{_escape(title)}</title>\n    <ns>{namespace}</ns>\n    <id>1</id>\n"
        f"{redirect_element}    <revision>\n      <id>2</id>\n"
        f'      <text bytes="{len(text)}" xml:space="preserve">{_escape(text)}</text>\n'
        "    </revision>\n  </page>\n"
    )


PAGES = [
    wiki_page("Paris", 0, PARIS_WIKITEXT),
    wiki_page("Paris, France", 0, "#REDIRECT [[Paris]]", redirect="Paris"),
    wiki_page("Talk:Paris", 1, "Discussion about [[Paris]]."),
    wiki_page("Template:Infobox settlement", 10, "{{{name}}} infobox"),
    wiki_page("Lutetia", 0, "#redirect [[Paris]] {{R from alternative name}}"),
    wiki_page("Lyon", 0, LYON_WIKITEXT),
]
WIKI_DUMP = _HEADER + "".join(PAGES) + _FOOTER
# (kind, index, text or title) of each page, in order.
EXPECTED_WIKI_RECORDS = [
    ("doc", 0, PARIS_CLEAN),
    ("redirect", 1, "Paris, France"),
    ("namespace", 2, "Talk:Paris"),
    ("namespace", 3, "Template:Infobox settlement"),
    ("redirect", 4, "Lutetia"),
    ("doc", 5, LYON_CLEAN),
]


def multistream_parts() -> list[str]:
    """The dump cut like a multistream dump: header, then pages, then footer, each its own stream."""
    return [_HEADER, "".join(PAGES[:3]), "".join(PAGES[3:]) + _FOOTER]


# Plain English nouns for generated test corpora (tests of the tokenizer and the text pipeline).
WORDS = ["river", "stone", "light", "music", "window", "garden", "paper", "market", "winter", "engine", "forest", "signal", "harbour", "letter", "mountain", "number", "silver", "question", "morning", "village", "history", "science", "station", "pattern", "theory", "journey", "bridge", "candle", "doctor", "feather", "glacier", "hammer", "island", "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pencil"]
MORE_WORDS = ["quarry", "ribbon", "saddle", "tunnel", "umbrella", "valley", "wagon", "yellow", "zephyr", "anchor", "basket", "cellar", "desert", "empire", "falcon", "gravel", "harvest", "insect", "jungle", "kingdom", "lantern", "marble", "nectar", "oyster", "palace", "quiver", "rocket"]
