"""`make publish`: the built book onto the gh-pages branch of a git remote (ghp-import), offline, into a local bare
repository standing in for GitHub."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from synthgap_helpers import cli, runner


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(a git checkout with a built book in _build/html, a bare repository as its remote `pages`).

    Git's identity comes from the environment and no user or system config is read, as on a bare CI machine."""
    empty = tmp_path / "gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "synthgap test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@synthgap.invalid")
    bare = tmp_path / "pages.git"
    git("init", "-q", "--bare", str(bare))
    repo = tmp_path / "checkout"
    git("init", "-q", str(repo))
    git("remote", "add", "pages", str(bare), cwd=repo)
    html = repo / "_build" / "html"
    (html / "_static").mkdir(parents=True)
    (html / "index.html").write_text("<html><body>synthgap book v1</body></html>\n")
    (html / "_static" / "style.css").write_text("body { margin: 0; }\n")
    return html, bare


def test_publish_pushes_the_built_book_with_nojekyll_to_gh_pages(checkout, capsys):
    html, bare = checkout
    assert cli.main(["publish", "--remote", bare.as_uri(), "--html", str(html)]) == 0
    assert "pushed to the gh-pages branch" in capsys.readouterr().out
    assert git(f"--git-dir={bare}", "show", "gh-pages:index.html") == "<html><body>synthgap book v1</body></html>\n"
    assert git(f"--git-dir={bare}", "show", "gh-pages:_static/style.css") == "body { margin: 0; }\n"
    files = git(f"--git-dir={bare}", "ls-tree", "-r", "--name-only", "gh-pages").split()
    assert sorted(files) == [".nojekyll", "_static/style.css", "index.html"]

    # Again, by the remote's name (as `make publish REMOTE=pages`): the branch now holds the new build.
    (html / "index.html").write_text("<html><body>synthgap book v2</body></html>\n")
    runner.publish(html, remote="pages")
    assert "v2" in git(f"--git-dir={bare}", "show", "gh-pages:index.html")
    assert git(f"--git-dir={bare}", "cat-file", "-t", "gh-pages:.nojekyll").strip() == "blob"


def test_publish_without_a_built_book_says_to_build_it_first(tmp_path: Path, capsys):
    missing = tmp_path / "_build" / "html"
    with pytest.raises(FileNotFoundError, match="run make book first"):
        runner.publish(missing, remote=str(tmp_path / "nowhere.git"))
    assert cli.main(["publish", "--html", str(missing)]) == 2
    error = capsys.readouterr().err
    assert "index.html does not exist: run make book first" in error
