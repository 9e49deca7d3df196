"""The documentation stays true to the code: a README a newcomer reads in five minutes that links every page of
docs/, the configuration reference generated from the typed config, every benchmark and every environment variable
the code reads documented, links that resolve, and no measured number in a module docstring (figures go stale:
they live in docs/ with the command that produced them and the date)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lfr.cli.main import BENCHES
from lfr.runtime import configdoc

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def test_the_readme_is_short_shows_the_two_commands_first_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) < 200, f"README.md has {len(text.splitlines())} lines: move depth into docs/"
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).splitlines()
    assert first_block[0].startswith("python3 -m pip install tox && tox -e demo"), first_block
    assert first_block[1].startswith("python3 -m pip install tox && tox "), first_block
    assert "tox -e lfr -- ARGS" in text
    assert "```mermaid" in text and "identification" in text  # the picture of the services and subjects
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
    assert "](deploy/k8s/README.md)" in text


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md")), ROOT / "deploy" / "k8s" / "README.md"]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, broken


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_anchor_linked_between_the_docs_exists():
    missing = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)#([^)\s]+)\)", page.read_text()):
            doc = (page.parent / target).resolve()
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)}
            if anchor not in anchors:
                missing.append(f"{page.relative_to(ROOT)} → {target}#{anchor}")
    assert not missing, missing


def test_the_configuration_reference_is_the_one_generated_from_the_typed_config():
    page = (DOCS / "configuration.md").read_text()
    assert configdoc.generated_part(page) == configdoc.table(), (
        "docs/configuration.md is out of date: run `python -m lfr.runtime.configdoc --write`")


def test_the_generated_table_names_every_setting_with_its_default_and_meaning():
    rows = configdoc.table().splitlines()[2:]
    assert any(r.startswith("| `LFR_FRESHNESS_MS` | `1000` | frames, faces and embeddings older") for r in rows)
    assert all(r.count(" | ") >= 2 and not r.endswith("|  |") for r in rows), "a setting without a meaning"


def test_every_lfr_variable_the_code_reads_from_the_environment_is_documented():
    page = (DOCS / "configuration.md").read_text()
    read = re.compile(r"""(?:environ|env|getenv)\s*(?:\.get)?\s*[(\[]\s*["'](LFR_[A-Z0-9_]+)["']""")
    names = set()
    for folder in ("libs", "services", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            names.update(read.findall(path.read_text()))
    assert len(names) > 10, names
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_every_benchmark_is_documented_with_its_command():
    page = (DOCS / "benchmarks.md").read_text()
    missing = [name for name in BENCHES if f"`lfr bench {name} " not in page and f"`lfr bench {name}`" not in page]
    assert not missing, f"docs/benchmarks.md does not list {missing}"


# -- no measured number in a module docstring --------------------------------------------------------------------
# A measured figure is a number with the unit or the metric it was measured in. Design constants ("at most every
# 50 ms", "FPIR 0.001", "1e-5") are not: the patterns below need a memory size, a throughput, a percentile with its
# value, an approximate or measured duration, a before → after pair, a metric followed by its value, or a pair of
# percentages.
MEASURED = [
    re.compile(r"\b\d[\d,.]*\s?[KMGT]i?B\b"),
    re.compile(r"\b\d[\d,.]*\s?(?:faces|frames|images|vectors|inserts|queries|searches|requests|calls)/s\b"),
    re.compile(r"\bp(?:50|90|95|99)\s*[:=]?\s*\d"),
    re.compile(r"\b(?:about|took|takes|measured(?: at)?)\s+~?\d[\d,.]*(?:\s?[-–]\s?\d[\d,.]*)?\s?"
               r"(?:ms|µs|s|seconds|minutes|min)\b"),
    re.compile(r"\b\d\.\d{2,}\s?(?:→|->)\s?\d\.\d{2,}"),
    re.compile(r"\b(?:TPIR|TAR|rank-1|recall(?:@\d+|_at_\d+| at \d+)?|accuracy|EER)(?:\s+(?:of|is|was|=|:))?\s+"
               r"0\.\d{3,}"),
    re.compile(r"\b\d+(?:\.\d+)?\s?%\s?/\s?\d+(?:\.\d+)?\s?%"),
]


def measured_numbers(text: str) -> list[str]:
    return [m.group(0) for pattern in MEASURED for m in pattern.finditer(text)]


def test_the_measured_number_patterns_catch_figures_and_spare_design_constants():
    for figure in ("RSS 586 MB after warm-up", "12,000 faces/s at batch 256", "search p99 41.1 ms",
                   "brute force (about 65 ms at 100 k vectors)", "it took 40-90 ms per query",
                   "SFace 0.950 → 0.957", "rank-1 0.980 on lfw-dev", "recall@10 0.972",
                   "they alert on 95 % / 54 % of people"):
        assert measured_numbers(figure), figure
    for constant in ("at most every 50 ms", "0 s after a stable run, then 1, 2, 4 ... 30 s",
                     "TPIR at FPIR 0.01 / 0.001", "a 1:1 false-accept rate of 1e-5", "At 10 fps, 100 ms apart",
                     "the autoscalers aim at 70 % CPU", "`LFR_MAX_IMAGE_BYTES`", "(1 % for N = 1000)"):
        assert not measured_numbers(constant), constant


def test_no_module_docstring_holds_a_measured_number():
    found = []
    for folder in ("libs", "services", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "pb" in path.relative_to(ROOT).parts:
                continue
            doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
            found += [f"{path.relative_to(ROOT)}: {hit!r}" for hit in measured_numbers(doc)]
    assert not found, "measured numbers belong in docs/ (with their command and date):\n" + "\n".join(found)


def test_every_file_and_module_the_docs_name_exists():
    """A path of this repository (`libs/...`, `services/...`, `tools/...`, ...) or a Python module (`lfr.x.y`) named
    in backticks by the README or a docs page exists: a moved file leaves no stale pointer behind."""
    import importlib.util

    def importable(dotted: str) -> bool:
        parts = dotted.split(".")
        for i in range(len(parts), 1, -1):  # `lfr.models.scoring.ExactIndex`: the module part is enough
            try:
                if importlib.util.find_spec(".".join(parts[:i])):
                    return True
            except (ImportError, ValueError):
                continue
        return False

    stale = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        for ref in set(re.findall(r"`((?:libs|services|tests|tools|deploy|protos|docs|\.ci)/[\w./-]+)`", text)):
            if not (ROOT / ref.rstrip("/")).exists():
                stale.append(f"{page.name}: {ref}")
        for ref in set(re.findall(r"`(lfr(?:\.\w+)+)`", text)):
            if not re.match(r"lfr\.(?:v\d|\w+\.v\d)\.", ref) and not importable(ref):  # subjects, proto packages
                stale.append(f"{page.name}: {ref}")
    assert not stale, sorted(stale)
