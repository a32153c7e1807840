"""The method is cited from inside the repository: every reference to docs/method.md names a
section that exists there, and no file points at an outside specification."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".sh", ".toml"}
SKIP_DIRS = {"__pycache__", "build", "dist", "runs"}
REFERENCE = re.compile(r"docs/method\.md ((?:§\d+(?:\s*(?:,|and|-)\s*)?)+)")


def _text_files():
    """The repository's text files; hidden folders (.venv, .git) and build outputs are not walked."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                   and not d.endswith(".egg-info")]
        for name in files:
            if Path(name).suffix in SUFFIXES:
                yield Path(folder) / name


def test_method_references_name_existing_sections():
    method = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, flags=re.MULTILINE)}
    assert sections == set(range(1, 10)), sections
    cited = {}
    for path in _text_files():
        for match in REFERENCE.finditer(path.read_text(errors="replace")):
            for number in re.findall(r"§(\d+)", match.group(1)):
                cited.setdefault(int(number), []).append(path.relative_to(ROOT).as_posix())
    assert cited, "no file cites docs/method.md"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"references to sections docs/method.md lacks: {missing}"


def test_no_reference_to_an_outside_specification():
    outside = re.compile(r"\b" + "SP" + r"EC\b")  # spelled apart so that this file does not match
    offenders = [path.relative_to(ROOT).as_posix() for path in _text_files()
                 if outside.search(path.read_text(errors="replace"))]
    assert not offenders, f"cite docs/method.md instead in: {offenders}"


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def test_relative_links_resolve():
    """README's and the docs pages' relative links name files that exist (the site build checks the
    anchors between pages: mkdocs build --strict)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages
              for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    listed = set(re.findall(r"^  - [^:]+: (\S+\.md)$", nav, flags=re.MULTILINE))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == pages, (listed - pages, pages - listed)


def test_method_module_table_names_every_module_and_only_modules_that_exist():
    """docs/method.md §9 maps the method to the code: each module it names exists, and each
    module of the product (an ``__init__.py`` or ``__main__.py`` aside) is named there."""
    method = (ROOT / "docs" / "method.md").read_text()
    table = method[method.index("## 9. "):]
    named = set(re.findall(r"`((?:pgnm_fast|kernels|pipelines)/[\w/]+\.py)`", table))
    modules = {p.relative_to(ROOT).as_posix() for folder in ("pgnm_fast", "kernels", "pipelines")
               for p in (ROOT / folder).rglob("*.py")}
    assert named <= modules, f"docs/method.md §9 names modules that do not exist: {sorted(named - modules)}"
    unnamed = {m for m in modules - named if Path(m).name not in ("__init__.py", "__main__.py")}
    assert not unnamed, f"modules docs/method.md §9 does not name: {sorted(unnamed)}"
