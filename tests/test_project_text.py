"""The project's text: the README's names exist in the code, every tracked file speaks of the project
itself (no tracker numbers, no words of how it was made, no files it lacks), and every progress bar
shows on a terminal only."""

import ast
import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("plumbing", "prepare_data", "posescore", "pretrain", "finetune", "reconstruct", "evaluate")


def tracked_text_files() -> dict[str, str]:
    """path -> text of every tracked file that is text (binary files and this file left out)."""
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for name in names:
        path = ROOT / name
        if name == "tests/test_project_text.py" or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            out[name] = data.decode()
        except UnicodeDecodeError:
            continue
    return out


# --- the README's names table -------------------------------------------------------------------------

def names_table() -> list[str]:
    """The first column of the README's Names table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Names"):].split("\n\n")[2]
    return [row.split("|")[1].strip() for row in table.splitlines()[2:]]


def test_every_name_in_the_readmes_names_table_exists_in_the_code():
    modules = {name: importlib.import_module(name) for name in STAGES}
    fields = {f for m in modules.values() for cls in ("Args", "TrainArgs", "ScoreArgs") if hasattr(m, cls)
              for f in getattr(m, cls).__dataclass_fields__}
    rows = names_table()
    assert len(rows) >= 10
    checked = 0
    for cell in rows:
        for token in re.findall(r"`([^`]+)`", cell):
            if token.startswith("--"):
                assert token[2:].replace("-", "_") in fields, f"flag {token} of the names table is no Args field"
            elif "." in token:
                module, attr = token.split(".", 1)
                assert hasattr(modules[module], attr), f"{token} of the names table does not exist"
            else:
                assert any(hasattr(m, token) for m in modules.values()), f"{token} of the names table does not exist"
            checked += 1
    assert checked >= 15


def test_names_table_check_catches_a_missing_name(monkeypatch):
    import pretrain

    monkeypatch.delattr(pretrain, "psnr")
    with pytest.raises(AssertionError, match="pretrain.psnr"):
        test_every_name_in_the_readmes_names_table_exists_in_the_code()


# --- the project speaks of the project -------------------------------------------------------------------

# Word -> what it catches. Each pattern ignores case; ALLOWED lists the legitimate uses.
FORBIDDEN = {
    r"\bi[s]sues?\b": "a ticket of the tracker, by name or number",
    r"(?<![\w&:#/])#\d{1,3}\b": "a ticket number (CSS colours and anchors are fine)",
    r"\bs[e]ssions?\b": "how the work was organised",
    r"\bl[e]as(e|ed|es|ing)\b": "machines on loan",
    r"\bl[e]nt\b": "machines on loan",
    r"\bd[e]vice (machine|minutes?|calls?|l[e]ase)\b": "machines on loan",
}
ALLOWED = [r'scope="session"']  # pytest's fixture scope


def offending_lines(files: dict[str, str]) -> list[str]:
    found = []
    for name, text in files.items():
        for number, line in enumerate(text.splitlines(), 1):
            clean = line
            for allowed in ALLOWED:
                clean = re.sub(allowed, "", clean)
            what = next((what for pattern, what in FORBIDDEN.items() if re.search(pattern, clean, re.IGNORECASE)), None)
            if what:
                found.append(f"{name}:{number}: {what}: {line.strip()[:100]}")
    return found


def test_no_tracked_file_speaks_of_trackers_sessions_or_borrowed_machines():
    assert offending_lines(tracked_text_files()) == []


def test_the_word_check_catches_what_it_should_and_spares_what_it_should():
    tracker, work, loan, gpu = "is" + "sue", "ses" + "sion", "le" + "ase", "de" + "vice"
    bad = {"a.md": f"see {tracker} 14\nmerged in #13\nle" + f"nt in an earlier {work}\nthe {gpu} {loan}\n30 {gpu} minutes"}
    assert len(offending_lines(bad)) == 5
    good = {"b.py": '@pytest.fixture(scope="session")\ncolor:#444\nsilent, talent, released, [link](#results)\n'}
    assert offending_lines(good) == []


# Files the repository lacks: every file name a document mentions (in backticks or as a link) must be a
# tracked file (by path, relative to the repository or to the document, or by name), a generated output
# under runs/, or a name the code itself writes (e.g. results.json, manifest.json).
FILE_NAME = re.compile(r"[\w.*<>/-]*\.(?:py|md|json|jsonl|sh|txt|log)\b")


def missing_files(files: dict[str, str]) -> list[str]:
    tracked = set(files) | set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                              check=True).stdout.split())
    basenames = {Path(t).name for t in tracked}
    code = "\n".join(text for name, text in files.items() if name.endswith((".py", ".sh")) or name == "Makefile")
    missing = []
    for name, text in files.items():
        if not name.endswith(".md"):
            continue
        mentioned = re.findall(r"`([^`]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text)
        for span in mentioned:
            for word in FILE_NAME.findall(span):
                word = word.rstrip("/")
                if word.startswith(("runs/", "~")) or "<" in word or "://" in word:
                    continue  # a run's outputs, the user's files, patterns of outputs
                here = (Path(name).parent / word).as_posix()
                found = (word in tracked or here in tracked or Path(word).name in basenames
                         or any(Path(t).match(word) for t in tracked) or f'"{Path(word).name}' in code
                         or f"'{Path(word).name}" in code or f"/ {Path(word).name}" in code)
                if not found:
                    missing.append(f"{name}: {word}")
    return missing


def test_documents_name_only_files_the_repository_has_or_its_code_writes():
    assert missing_files(tracked_text_files()) == []


def test_the_file_check_catches_a_missing_file():
    files = tracked_text_files()
    files["docs/x.md"] = "As `PLAN.md` allows; see `bench/results/nowhere.json` and [this](docs/gone.md)."
    found = missing_files(files)
    assert any("PLAN.md" in f for f in found) and any("nowhere.json" in f for f in found)
    assert any("gone.md" in f for f in found)
    files["docs/x.md"] = "`runs/demo/eval/report.html`, `results.json`, `bench/results/ablation.md`, `plumbing.py`"
    assert missing_files(files) == []


# --- progress bars on a terminal only -------------------------------------------------------------------

def test_every_progress_bar_shows_on_a_terminal_only():
    """tqdm(..., disable=None) draws nothing when its stream is not a terminal, so `make demo > log` gets
    each stage's summary lines and no carriage-return spam."""
    scripts = [ROOT / f"{name}.py" for name in STAGES] + sorted((ROOT / "bench").glob("*.py"))
    calls = 0
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "tqdm":
                disable = next((k.value for k in node.keywords if k.arg == "disable"), None)
                assert disable is not None, f"{script.name}:{node.lineno}: tqdm without disable=None"
                text = ast.unparse(disable)
                assert text == "None" or text.startswith("None if"), f"{script.name}:{node.lineno}: disable={text}"
                calls += 1
    assert calls >= 7
