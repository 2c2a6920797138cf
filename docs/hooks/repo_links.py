"""mkdocs hook: relative links from docs/ to files elsewhere in the repository.

The guides link to plots and files outside docs/ (``../benchmarks/results/cpu/forgetting.png``) so that
they work when read in the repository. mkdocs only serves files under docs/, so such a link would be
reported as missing: this hook copies each linked file that exists into the site under ``repo/`` and
points the link there. A link to a file that does not exist is left alone, and mkdocs reports it.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

SITE_FOLDER = "repo"
LINK = re.compile(r"(\]\()([^)\s#]+)")


def _repo_path(page_uri: str, url: str, docs_dir: Path, repo: Path) -> str | None:
    """The repository-relative path ``url`` (from the page ``page_uri``) names, if outside docs/ and present."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("/"):
        return None
    if not posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), url)).startswith("../"):
        return None
    target = (docs_dir / posixpath.dirname(page_uri) / url).resolve()
    if not target.is_file() or not target.is_relative_to(repo):
        return None
    return target.relative_to(repo).as_posix()


def _linked_repo_files(markdown: str, page_uri: str, docs_dir: Path, repo: Path):
    for match in LINK.finditer(markdown):
        path = _repo_path(page_uri, match.group(2), docs_dir, repo)
        if path is not None:
            yield match, path


def _folders(config) -> tuple[Path, Path]:
    return Path(config.docs_dir).resolve(), Path(config.config_file_path).resolve().parent


def on_files(files, config):
    docs_dir, repo = _folders(config)
    added = set()
    for page in [f for f in files if f.is_documentation_page()]:
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for _, path in _linked_repo_files(text, page.src_uri, docs_dir, repo):
            if path not in added:
                added.add(path)
                files.append(File.generated(config, f"{SITE_FOLDER}/{path}", abs_src_path=str(repo / path)))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir, repo = _folders(config)
    page_dir = posixpath.dirname(page.file.src_uri)

    def relink(match: re.Match) -> str:
        path = _repo_path(page.file.src_uri, match.group(2), docs_dir, repo)
        if path is None:
            return match.group(0)
        return match.group(1) + posixpath.relpath(f"{SITE_FOLDER}/{path}", page_dir or ".")

    return LINK.sub(relink, markdown)
