"""The README stands alone: it names no file outside the repository, and every path it lists exists."""
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_needs_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "the README points outside the repository: a user's clone has only the repository"
    for path in re.findall(r"^\| `([^`]+)` \|", text, flags=re.M):   # the layout table
        assert (ROOT / path).exists(), f"README lists {path}, which does not exist"
