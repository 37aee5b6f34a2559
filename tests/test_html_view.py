"""`--html`: one self-contained page that holds every token of every translation and reference, escaped, with
probability, loss, entropy and alternatives on hover, and that parses as balanced HTML."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT
from nmtkit.cli import main
from nmtkit.html_view import probability_colour, render_html
from nmtkit.records import Alternative, ReferenceScore, ReferenceToken, TokenStep, Translation

SOURCES = ["Tell me something about yourself", "Hello."]
REFERENCES = ["告诉我关于你的事情", "你好。"]
VOID = {"meta", "br", "hr", "img", "link", "input"}


class PageParser(HTMLParser):
    """Collects text, title attributes and external references, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.text: list[str] = []
        self.titles: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.stack.append(tag)
        for name, value in attrs:
            if name == "title" and value is not None:
                self.titles.append(value)
            if name in ("src", "href"):
                self.external.append(f"{tag} {name}={value}")
        if tag == "script":
            self.external.append("script")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.problems == [] and parser.stack == [], (parser.problems, parser.stack)
    assert parser.external == []  # self-contained: no scripts, links or images to fetch
    return parser


def step(position: int, piece: str, prob: float) -> TokenStep:
    return TokenStep(
        position, piece, 10 + position, prob, 0.5, 1.25, [Alternative(piece, 10 + position, prob), Alternative("<alt&>", 9, 0.01)]
    )


def test_markup_in_tokens_is_escaped_not_interpreted() -> None:
    nasty = ['<script>alert("x")</script>', "a&b", "\"quoted'", "</span>"]
    ref = ReferenceScore("<b>ref</b>", [ReferenceToken(0, "<i>", 5, 0.3, 1.2, False)], 1.2, 1.2)
    result = Translation("<src>", "".join(nasty), [step(i, p, 0.5) for i, p in enumerate(nasty)], 2.0, 0.5, ref)
    page = render_html([result])
    assert "<script>" not in page and "<i>" not in page and "<b>ref" not in page
    parsed = parse(page)
    text = "".join(parsed.text)
    for piece in [*nasty, "<i>", "<b>ref</b>", "<src>"]:
        assert piece in text  # shown as text, after unescaping
    assert any("<alt&> 0.0100" in title for title in parsed.titles)


def test_probability_colour_runs_from_red_to_green() -> None:
    assert probability_colour(0.0).startswith("hsl(0,") and probability_colour(1.0).startswith("hsl(120,")
    assert probability_colour(0.5).startswith("hsl(60,") and probability_colour(7.0) == probability_colour(1.0)


def test_translate_html_holds_every_token_and_reference_with_hover_details(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "view" / "out.html"
    argv = ["translate", "--checkpoint", str(trained_run), "--format", "jsonl", "--html", str(out), *SOURCES]
    assert main([*argv, "--reference", REFERENCES[0], "--reference", REFERENCES[1]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    parsed = parse(out.read_text(encoding="utf-8"))
    text = "".join(parsed.text)
    for record in records:
        assert record["source"] in text and record["translation"] in text
        for token in record["tokens"]:
            assert token["piece"] in text
            hover = f"prob {token['prob']:.4f}\nloss {token['loss']:.4f}\nentropy {token['entropy']:.4f} nats"
            assert any(hover in title for title in parsed.titles), hover
            assert any(", ".join(f"{a['piece']} {a['prob']:.4f}" for a in token["top_k"]) in title for title in parsed.titles)
        for token in record["reference"]["tokens"]:
            assert token["piece"] in text and f"{token['loss']:.2f}" in text  # its loss beside it


def test_translate_html_lists_the_nbest(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.html"
    assert (
        main(["translate", "--checkpoint", str(trained_run), "--beam", "3", "--nbest", "3", "--html", str(out), SOURCES[0]]) == 0
    )
    capsys.readouterr()
    page = out.read_text(encoding="utf-8")
    parse(page)
    assert page.count("<li>") == 3


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_render_script_screenshots_the_page_with_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(render_html([Translation("Hello.", "你好", [step(0, "你好", 0.9)], 0.1, 0.1)]), encoding="utf-8")
    png = tmp_path / "page.png"
    subprocess.run(["bash", str(ROOT / "scripts" / "render_html.sh"), str(page), str(png)], check=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
