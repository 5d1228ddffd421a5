"""The tests and the package reach nothing outside the repository but what they name here.

A clone with nothing beside it must pass the suite, so no test builds a path to a sibling of
the repository ("../shared", `REPO.parent / "shared"`) or to a machine's own folders: the
datasets the tests read come from `tests/conftest.py`, the corpus from `tests/fixtures`.
"""

import re
from pathlib import Path

from conftest import REPO

ESCAPES = {
    "a parent-directory step in a string": re.compile(r"\.\./|[\"']\.\.[\"']"),
    "a path above the repository root": re.compile(r"\b(?:REPO|ROOT)\.parent\b"),
    "the shared folder beside the clone": re.compile(
        r"parent\s*/\s*[\"']shared[\"']|\bshared/datasets\b"),
    "an absolute path to a machine's folders": re.compile(
        r"[\"']/(?:usr|home|work|mnt|data|srv|opt|root|tmp)/"),
}
# (file, text on the line): the places allowed to reach outside, each for its reason.
ALLOWED = {
    # The Fashion-MNIST Debian package's folder, where the tests' fixture looks for it.
    ("tests/conftest.py", "/usr/share/datasets/"),
    # The package's own defaults for the Debian MNIST packages (apt-get install).
    ("scaling/data/idx.py", "/usr/share/datasets/"),
    ("scaling/data/images.py", "/usr/share/datasets/"),
    # A string the fuzzer types into every string field; nothing opens it.
    ("tests/test_config_fuzz.py", '"../../x"'),
}
FILE_PARENTS = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b)*)(?:\.parents\[(\d+)\])?")


def scanned_files() -> list[Path]:
    files = sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "scaling").rglob("*.py"))
    return [f for f in files if f != Path(__file__).resolve()]


def escapes_in(relative: Path, text: str) -> list[str]:
    """Each line of `text` (the file at `relative` to the repository) that reaches outside."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in ESCAPES.items():
            if pattern.search(line) and not any(
                    str(relative) == file and text in line for file, text in ALLOWED):
                found.append(f"{relative}:{number}: {what}: {line.strip()}")
        for match in FILE_PARENTS.finditer(line):
            steps = match.group(1).count(".parent") + (
                int(match.group(2)) + 1 if match.group(2) else 0)
            if steps > len(relative.parts):
                found.append(f"{relative}:{number}: {steps} folders above this file is outside "
                             f"the repository: {line.strip()}")
    return found


def test_no_test_or_module_builds_a_path_outside_the_repository():
    found = [escape for path in scanned_files()
             for escape in escapes_in(path.relative_to(REPO), path.read_text())]
    assert not found, ("paths outside the repository; take data from the fixtures in "
                       "tests/conftest.py instead:\n" + "\n".join(found))


def test_the_scan_finds_what_it_looks_for():
    """The patterns catch the ways the suite once reached for the corpus beside the clone,
    and leave paths inside the repository alone."""
    lines = ['DATA = REPO.parent / "shared" / "datasets"',
             'DATA = "../shared/datasets/tiny_shakespeare"',
             'DATA = Path("/work/shared/datasets")',
             "DATA = Path(__file__).resolve().parent.parent.parent",
             "DATA = Path(__file__).parents[2]",
             "DATA = REPO / 'tests' / 'fixtures'",
             'DATA = tmp_path / "shared"',
             "DATA = Path(__file__).resolve().parent.parent"]
    found = escapes_in(Path("tests/test_probe.py"), "\n".join(lines))
    flagged = {int(escape.split(":")[1]) for escape in found}
    assert flagged == {1, 2, 3, 4, 5}, found
