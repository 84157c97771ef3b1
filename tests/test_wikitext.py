"""MediaWiki markup cleaning: one test per construct, the fixture article, and pathological input."""

from __future__ import annotations

import pytest
from fixtures_text import LYON_CLEAN, LYON_WIKITEXT, PARIS_CLEAN, PARIS_WIKITEXT

from data_pipeline.text.wikitext import clean_wikitext


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        # templates, nested and with parameters; the parentheses they leave empty go too
        ("A {{t|x={{u|{{v}}}}}} B", "A B"),
        ("{{{1|default}}} and {{{{{name}}}|arg}} gone", "and gone"),
        ("Paris ({{IPA|paʁi}}) is", "Paris is"),
        ("Paris (French pronunciation: {{IPA|paʁi}}) is", "Paris is"),
        ("open {{ never closed", "open {{ never closed"),
        ("{{a}}} stray", "} stray"),
        # tables, nested, also indented with ":", leave a paragraph break; an unclosed one runs to the end
        (
            "Before\n{| class=x\n|-\n| cell {{t}}\n{|\n| inner\n|}\n| after inner\n|}\nAfter",
            "Before\n\nAfter",
        ),
        ("Before\n:{|\n| x\n|}\nAfter", "Before\n\nAfter"),
        ("Before\n{|\n| runaway", "Before"),
        # references: normal, named, self-closing, with templates inside, reference lists
        (
            'Fact.<ref>Book.</ref> More.<ref name="n">{{cite|a}}</ref> End.<ref name="n" />',
            "Fact. More. End.",
        ),
        ("A<ref group=note name=b/>B<references/>", "AB"),
        ("X<REF>upper case</REF>Y", "XY"),
        # comments, also multi-line and unclosed
        ("Keep <!-- drop\nthis --> this", "Keep this"),
        ("Keep <!-- runaway", "Keep"),
        # HTML tags: formatting keeps its text, line-breaking tags become new lines
        ("<b>bold</b> <i>it</i> H<sub>2</sub>O <span style='c'>s</span>", "bold it H2O s"),
        ("one<br/>two<br>three", "one\ntwo\nthree"),
        ("a < b and c > d", "a < b and c > d"),
        # content dropped: maths, galleries, code; nowiki kept verbatim
        ("E <math>x^{2}</math> = m", "E = m"),
        ("x <gallery>\nFile:A.jpg|cap\n</gallery> y", "x y"),
        ("x <syntaxhighlight lang=py>print(1)</syntaxhighlight> y", "x y"),
        ("Use <nowiki>{{tl}} and [[x]]</nowiki> here", "Use {{tl}} and [[x]] here"),
        # links
        ("[[a|b]] [[c]] [[d]]s [[e_f]]", "b c ds e f"),
        ("[[Paris (France)|]] and [[#History|history]]", "Paris and history"),
        ("[[File:X.jpg|thumb|A [[link]] in [[Caption|text]]]] Text", "Text"),
        ("[[Image:X.png]][[media:Y.ogg]]Text", "Text"),
        ("Text[[Category:Things]][[Category:More|sort key]]", "Text"),
        ("Text [[de:Text]] [[zh-yue:Text]] [[simple:Text]]", "Text"),
        ("See [[:Category:Things|things]] and [[:File:X.jpg]]", "See things and File:X.jpg"),
        ("[[open link", "[[open link"),
        # external links
        (
            "[http://x.org/a?b=c label text] and [https://y.org] and [//z.org proto]",
            "label text and and proto",
        ),
        ("bare http://x.org stays", "bare http://x.org stays"),
        # magic words, bold/italic
        ("__TOC__\n__NOTOC__Text", "Text"),
        ("'''bold''' ''it'' '''''both''''' l''''avion'''", "bold it both l'avion"),
        # headings, lists, rules, blank lines
        ("Intro\n== Life ==\nBorn.\n=== Early ===\nYoung.", "Intro\n\nLife\n\nBorn.\n\nEarly\n\nYoung."),
        ("* one\n** two\n# three\n#: four\n; term\n: def", "one\ntwo\nthree\nfour\nterm\ndef"),
        ("a\n----\nb", "a\n\nb"),
        ("a\n\n\n\n\nb\n\n", "a\n\nb"),
        # entities decoded last
        ("A&nbsp;B &amp; C &lt;ref&gt;", "A\u00a0B & C <ref>"),
    ],
)
def test_construct(wikitext: str, expected: str) -> None:
    assert clean_wikitext(wikitext) == expected


def test_link_sections_are_dropped_up_to_the_next_heading_of_the_same_level() -> None:
    wikitext = (
        "Body.\n== See also ==\n* [[X]]\n=== Sub ===\n* [[Y]]\n== Legacy ==\nKept.\n"
        "== References ==\n{{reflist}}\n== Further reading ==\n* Book\n== External links ==\n* [http://x X]\n"
        "== Notes ==\nn"
    )
    assert clean_wikitext(wikitext) == "Body.\n\nLegacy\n\nKept."


def test_fixture_articles() -> None:
    assert "Paris\n\n" + clean_wikitext(PARIS_WIKITEXT) == PARIS_CLEAN
    assert "Lyon\n\n" + clean_wikitext(LYON_WIKITEXT) == LYON_CLEAN


def test_empty_and_markup_only_pages() -> None:
    assert clean_wikitext("") == ""
    assert clean_wikitext("{{stub}}\n[[Category:X]]\n__NOTOC__") == ""


def test_pathological_5mb_input_completes() -> None:
    """Unclosed and deeply nested constructs of every kind: a quadratic pass would not finish."""
    unit = 5 * 1024 * 1024 // 14
    patterns = [
        "{{",
        "}}",
        "{{a|",
        "[[",
        "]]",
        "[[a|[[b",
        "[http://a ",
        "<ref>",
        "<!-",
        "<span ",
        "\n{|",
        "'",
        "(a:",
        "\n*",
    ]
    wikitext = "".join(pattern * (unit // len(pattern)) for pattern in patterns)
    cleaned = clean_wikitext(wikitext)
    assert len(cleaned) < len(wikitext)
    assert "<ref>" not in cleaned and "'''" not in cleaned
