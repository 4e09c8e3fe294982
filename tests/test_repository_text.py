"""The repository speaks of itself alone: its prose says what the code does and what was measured.

The README, the other text files and every comment and docstring of the Python sources are searched
for references that only make sense outside the repository: numbered tickets (`issue 12`, `#12`),
design notes kept elsewhere (DESIGN.md), work sessions, which hardware was or was not handed out,
the runs of particular work periods, and paths outside the repository other than the documented data
location ($IDJAX_SHARED_DATA, by default ../shared/data).
"""

import ast
import io
import pathlib
import re
import subprocess
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT_FILES = ("README.md", "Makefile", ".ci/run", "pyproject.toml")
TEXT_SUFFIXES = (".md", ".txt", ".rst")
PYTHON_DIRS = ("idjax", "models", "experiments", "configs", "benchmarks", "tests")
THIS_FILE = pathlib.Path(__file__).resolve()  # it spells out the patterns it forbids

FORBIDDEN = {
    "a numbered issue": r"\b(?:issue|ticket|bug)\s*(?:no\.?\s*)?#?\d+",
    "a '#<number>' reference": r"(?<![\w&/#])#\d+\b",
    "a design document": r"(?-i:\bDESIGN\b)|\bDESIGN\.md\b|\bdesign doc(?:ument)?s?\b",
    "a work session": r"\bsessions?\b",
    "a work item": r"\bwork[- ]items?\b",
    "lent hardware": r"\b(?:lent|lend|lending|not\s+lent)\b",
    "whether hardware was available": r"\b(?:no|without an?)\s+(?:GPU|TPU|accelerator)\s+(?:was|is|were)\s+available\b"
                                      r"|\b(?:GPU|TPU|accelerator)\s+was\s+(?:not\s+)?(?:available|given|granted)\b",
    "the run of a work period": r"\b(?:last|earlier|previous)\s+(?:session|sitting)\b|\bthis time\b"
                                r"|\b(?:in|during) (?:the|this|that) (?:last|previous|earlier) run\b",
    "a path outside the repository": r"(?<![\w.])\.\./(?!shared/data\b)|/work/|/tmp/p/",
}
PATTERNS = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in FORBIDDEN.items()}
ALLOWED = re.compile(r"""scope\s*=\s*["']session["']""")  # pytest's fixture scope


def _tracked(paths: tuple[str, ...]) -> list[pathlib.Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
                         cwd=REPO, capture_output=True, check=True)
    return [REPO / name for name in out.stdout.decode().split("\0") if name]


def python_prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python source."""
    prose = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for statement in body:  # docstrings and other bare strings between statements
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                    and isinstance(statement.value.value, str):
                for offset, line in enumerate(statement.value.value.splitlines()):
                    prose.append((statement.lineno + offset, line))
    return prose


def findings(lines: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """(line, what, text) for every forbidden reference in `lines`."""
    found = []
    for number, text in lines:
        cleaned = ALLOWED.sub("", text)
        found += [(number, name, text.strip()) for name, pattern in PATTERNS.items() if pattern.search(cleaned)]
    return found


def _prose_of(path: pathlib.Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return python_prose(text)
    return list(enumerate(text.splitlines(), start=1))


FILES = [path for path in _tracked(TEXT_FILES + ("docs",) + PYTHON_DIRS + ("launch.py",))
         if (path.suffix == ".py" or path.suffix in TEXT_SUFFIXES or path.relative_to(REPO).as_posix() in TEXT_FILES)
         and path.resolve() != THIS_FILE]


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_prose_refers_to_the_repository_alone(path):
    found = findings(_prose_of(path))
    assert not found, "\n".join(f"{path.relative_to(REPO)}:{line}: {what}: {text}" for line, what, text in found)


@pytest.mark.parametrize("text", [
    "# see issue 12 for the background", "Fixed in #123.", "as planned in DESIGN.md", "# measured in the last session",
    "timed on the machine we were lent", "# left for a later work item", "no GPU was available, so CPU only",
    "(see /work/notes.txt)", "read ../other_repo/README.md", "# slower this time because of load",
])
def test_the_check_catches_references_outside_the_repository(text):
    assert findings([(1, text)]), text


@pytest.mark.parametrize("text", [
    '@pytest.fixture(scope="session")', "datasets in ../shared/data (IDJAX_SHARED_DATA)", "colour #1f77b4",
    "`make test` runs the suite", "a rerun after a SIGKILL equals an uninterrupted run", "on accelerators",
    "the store written last", "## Design decisions",
])
def test_the_check_leaves_ordinary_prose_alone(text):
    assert not findings([(1, text)]), text


def test_comments_and_docstrings_are_what_is_searched():
    source = 'x = "session"  # from a session\n\ndef f():\n    """Planned in DESIGN.md."""\n    y = "DESIGN.md"\n'
    assert [(line, what) for line, what, _ in findings(python_prose(source))] == [
        (1, "a work session"), (4, "a design document")]
