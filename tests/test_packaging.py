"""The repository's promises: environment.yml matches pyproject, badges point at real notebooks,
the shipped assets are package data, lines stay within 100 characters."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["course"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert "-e .[course]" in pip


def test_torch_requirement_admits_colab_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_req,) = [r for r in project["dependencies"] if _name(r) == "torch"]
    low = re.search(r">=\s*([\d.]+)", torch_req).group(1)
    assert tuple(map(int, low.split("."))) <= (2, 11)


def test_shipped_assets_are_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["dpo_minimal"]
    pkg = ROOT / "dpo_minimal"
    shipped = {p.relative_to(pkg).as_posix() for pattern in patterns for p in pkg.glob(pattern)}
    assert {"tokenizer/tokenizer.json", "data/truthy_mini_train.jsonl",
            "data/truthy_mini_test.jsonl", "data/conversations_mini.jsonl",
            "tokenizer/chat_template.jinja", "pretrained/gpt2/model.safetensors",
            "pretrained/gpt2/config.json", "data/task_prefs_train.jsonl"} <= shipped


def test_readme_commands_and_colab_badges():
    readme = (ROOT / "README.md").read_text()
    assert "make course" in readme and "make test" in readme
    links = re.findall(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/main/([^)\s]+)",
                       readme)
    notebooks = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(set(links)) == notebooks
    for nb in notebooks:
        text = (ROOT / nb).read_text()
        badge = re.search(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/main/([^)\s\"]+)",
                          text)
        assert badge and badge.group(1) == nb, f"{nb}: its Colab badge must point at itself"


def test_python_lines_within_100_characters():
    files = [*ROOT.glob("dpo_minimal/**/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]
    long = [f"{f.name}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, long


def test_every_subpackage_is_installed():
    # A subpackage missing from [tool.setuptools] packages works in an editable install and
    # is absent from a real one (pip install git+...): the course labs would not import.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    inits = (ROOT / "dpo_minimal").rglob("__init__.py")
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in inits}
    assert found == listed
