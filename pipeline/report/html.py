"""report.html: report.md rendered into one file that opens offline, with nothing in it that can run or fetch."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f5f5f5;padding:0 .2em;word-break:break-all}
img{max-width:100%;border:1px solid #ddd}h1{border-bottom:2px solid #333}h2{border-bottom:1px solid #ccc;margin-top:2em}"""  # noqa: E501 (one stylesheet, its rules unbroken)


def report_html(markdown: str, folder: Path, title: str, figure_width: int, figures: Iterable[str] = ()) -> str:
    """The Markdown rendered with raw HTML disabled (so any markup that slipped through stays text), no script and
    no remote resource: one file that opens offline. Only the stage's own figures are embedded, as data URIs: an
    image whose source is `figures/<name>` for one of `figures` (the names in folder/figures). Any other image,
    a path or a URL, is shown as inert text, never read or fetched."""
    embedded = {f"figures/{name}": base64.b64encode((folder / "figures" / name).read_bytes()).decode("ascii")
                for name in figures}
    body = render_body(markdown, embedded, figure_width)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            f'style-src \'unsafe-inline\'">\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n')


def render_body(markdown: str, embedded: dict[str, str] | None = None, figure_width: int = 720) -> str:
    """The HTML of Markdown as report.html renders it (also a part of it: the sign-off block, rewritten in place
    by each sign-off). `embedded`: figure source -> base64 PNG."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    embedded = embedded or {}

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        alt = parser.renderer.renderInlineAsText(token.children or [], options, env)
        data = embedded.get(token.attrGet("src"))
        if data is None:
            return html.escape(f"![{alt}]({token.attrGet('src')})")
        return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
                f'style="max-width:{figure_width}px">')

    parser.add_render_rule("image", image)
    # the anchors are the only raw HTML the report writes itself; everything else is escaped
    body = parser.render(re.sub(r'^<a id="([a-z]+)"></a>$', r"{{anchor:\1}}", markdown, flags=re.M))
    return re.sub(r"<p>\{\{anchor:([a-z]+)\}\}</p>", r'<a id="\1"></a>', body)
