"""Every relative link in the project's Markdown files resolves to a file inside the repository."""

import glob
import os
import re

from helpers import ROOT


def test_every_relative_markdown_link_resolves_inside_the_repository():
    files = [
        os.path.join(ROOT, "README.md"),
        *glob.glob(os.path.join(ROOT, "*", "README.md")),
        *glob.glob(os.path.join(ROOT, "docs", "*.md")),
    ]
    assert len(files) >= 5
    broken = []
    for path in files:
        with open(path) as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith(("http://", "https://", "#", "mailto:")):
                continue
            target = os.path.normpath(os.path.join(os.path.dirname(path), link.split("#")[0]))
            if not target.startswith(ROOT + os.sep) or not os.path.exists(target):
                broken.append(f"{os.path.relpath(path, ROOT)}: {link}")
    assert not broken, broken
