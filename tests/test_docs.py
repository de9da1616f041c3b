"""Every reference in the repository resolves inside the repository.

- A citation "docs/reference.md section N" (or "docs/reference.md §N") names an existing "## N." heading.
- No file points outside the repository at the planning notes the code was first written from: their
  facts now live in docs/reference.md, so a mention of those files is a stale citation.
- Every relative markdown link in README.md and docs/*.md points to a file that exists in the repository.

Fast, no network: it reads the files `git ls-files` lists (tracked, plus untracked ones not ignored).
"""
import functools
import pathlib
import re
import subprocess
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
THIS = pathlib.Path(__file__).resolve()

# "docs/reference.md section 2", "reference.md section 2" (from inside docs/), "docs/reference.md §2";
# a citation may wrap onto the next line of a comment.
CITATION = re.compile(r"(?:(?<![\w.])docs/|(?<![\w/.]))reference\.md[\s#*]*(?:sections?\s+|§\s*)(\d+)")
HEADING = re.compile(r"^## (\d+)\.\s+\S", re.MULTILINE)
# Files outside the repository that must no longer be cited (this file names them, so it is skipped).
STALE = re.compile(r"SPEC\.md|ARCHITECTURE\.md|\.\./shared|/work/shared|\bSPEC\b")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
LINK_DEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CITING_DIRS = ("maskformer_jax", "configs", "launch", "tests", "docs", "notebooks")
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pkl", ".npz", ".npy", ".pth", ".gz", ".zip", ".tar"}


@functools.lru_cache(maxsize=None)
def repo_files() -> tuple[pathlib.Path, ...]:
  """Repository-relative paths of the files git knows (tracked + untracked not ignored) that exist."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    pytest.skip(f"not a git checkout ({e}): cannot list the repository's files")
  paths = {pathlib.Path(p) for p in out.decode("utf-8", "surrogateescape").split("\0") if p}
  return tuple(sorted(p for p in paths if (ROOT / p).is_file()))


def text_files():
  for rel in repo_files():
    if rel.suffix.lower() in BINARY_SUFFIXES:
      continue
    data = (ROOT / rel).read_bytes()
    if b"\0" in data[:8192]:
      continue
    yield rel, data.decode("utf-8", "replace")


def line_of(text: str, index: int) -> int:
  return text.count("\n", 0, index) + 1


def reference_sections() -> set[int]:
  return {int(n) for n in HEADING.findall(strip_code_blocks(REFERENCE.read_text(encoding="utf-8")))}


def strip_code_blocks(markdown: str) -> str:
  """The markdown with fenced code blocks and inline code spans blanked (line numbers kept)."""
  out, fence = [], None
  for line in markdown.split("\n"):
    marker = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
    if fence is None and marker:
      fence = marker.group(1)[0] * len(marker.group(1))
      out.append("")
    elif fence is not None:
      if line.strip().startswith(fence):
        fence = None
      out.append("")
    else:
      out.append(re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line))
  return "\n".join(out)


def test_reference_sections_are_numbered_in_order():
  assert REFERENCE.is_file(), "docs/reference.md is missing"
  numbers = [int(n) for n in HEADING.findall(strip_code_blocks(REFERENCE.read_text(encoding="utf-8")))]
  assert numbers, "docs/reference.md has no '## N. Title' headings"
  assert numbers == list(range(1, len(numbers) + 1)), (
      f"docs/reference.md sections must run 1, 2, 3, ... without gaps or repeats (code cites them by "
      f"number); found {numbers}")


def test_reference_citations_resolve():
  sections = reference_sections()
  bad = []
  for rel, text in text_files():
    if (ROOT / rel).resolve() == THIS or not (rel.parts[0] in CITING_DIRS or rel == pathlib.Path("README.md")):
      continue  # this file's examples are not citations
    for m in CITATION.finditer(text):
      if int(m.group(1)) not in sections:
        bad.append(f"{rel}:{line_of(text, m.start())}: {m.group(0)!r}")
  if bad:
    pytest.fail(f"citations of sections docs/reference.md does not have (it has {sorted(sections)}):\n  "
                + "\n  ".join(bad), pytrace=False)


def test_no_citations_of_files_outside_the_repository():
  bad = []
  for rel, text in text_files():
    if (ROOT / rel).resolve() == THIS:
      continue
    for i, line in enumerate(text.split("\n"), 1):
      if STALE.search(line):
        bad.append(f"{rel}:{i}: {line.strip()[:160]}")
  if bad:
    pytest.fail(f"{len(bad)} lines cite planning notes outside the repository; cite docs/reference.md "
                "section N instead (same section numbers) or the README:\n  " + "\n  ".join(bad),
                pytrace=False)


def markdown_docs():
  return [rel for rel in repo_files()
          if rel == pathlib.Path("README.md") or (rel.parent == pathlib.Path("docs") and rel.suffix == ".md")]


def test_markdown_links_resolve():
  docs = markdown_docs()
  assert pathlib.Path("README.md") in docs
  root = ROOT.resolve()
  bad = []
  for rel in docs:
    text = strip_code_blocks((ROOT / rel).read_text(encoding="utf-8"))
    for pattern in (LINK, LINK_DEF):
      for m in pattern.finditer(text):
        target = m.group(1)
        if SCHEME.match(target) or target.startswith("#"):
          continue  # a URL (http:, mailto:, ...) or an anchor in the same file
        path = urllib.parse.unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:
          continue
        resolved = (root / path.lstrip("/")) if path.startswith("/") else ((ROOT / rel).parent / path)
        resolved = resolved.resolve()
        where = f"{rel}:{line_of(text, m.start())}: ({target})"
        if root != resolved and root not in resolved.parents:
          bad.append(f"{where} points outside the repository")
        elif not resolved.exists():
          bad.append(f"{where} does not exist")
  if bad:
    pytest.fail("broken relative links:\n  " + "\n  ".join(bad), pytrace=False)


@pytest.mark.parametrize("text, expected", [
    ("see docs/reference.md section 2.", ["2"]),
    ("(docs/reference.md §11)", ["11"]),
    ("reference facts (docs/reference.md\n  # section 3)", ["3"]),
    ("docs/reference.md sections 4", ["4"]),
    ("the file docs/reference.md", []),
    ("my_reference.md section 2", []),
    ("../docs/reference.md section 5", ["5"]),
])
def test_citation_pattern(text, expected):
  assert CITATION.findall(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("[a](docs/interfaces.md) and ![b](img/x.png \"title\")", ["docs/interfaces.md", "img/x.png"]),
    ("[c](https://example.com/x) [d](#anchor)", ["https://example.com/x", "#anchor"]),
])
def test_link_pattern(text, expected):
  assert LINK.findall(text) == expected


def test_code_is_not_scanned_for_links():
  text = "```\n[x](missing.md)\n```\nand `[y](missing.md)` but [z](real.md)"
  assert LINK.findall(strip_code_blocks(text)) == ["real.md"]
