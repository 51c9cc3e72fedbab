"""The conda environments are honest: every rule names one, it parses, its pins are pyproject's, and it
holds every library the rule's module imports (--use-conda cannot run here, so this is what checks them)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RULE_HEADER = re.compile(r"^(rule|checkpoint)\s+(\w+):", re.M)


def pin_map(requirements: list[str]) -> dict[str, str]:
    """``name==version`` lines as {normalised name: version}; anything unpinned is an error."""
    pins = {}
    for req in requirements:
        name, sep, version = req.partition("==")
        assert sep and version, f"'{req}' is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def pyproject_pins() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return pin_map(project["dependencies"])


def rules() -> dict[str, dict]:
    """name -> {file, conda, module} for every rule and checkpoint in workflow/rules and the Snakefile."""
    found = {}
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        text = path.read_text()
        headers = list(RULE_HEADER.finditer(text))
        for i, header in enumerate(headers):
            body = text[header.end():headers[i + 1].start() if i + 1 < len(headers) else len(text)]
            body = re.split(r"^\S", body, maxsplit=1, flags=re.M)[0]  # up to the next top-level line
            conda = re.search(r"^\s+conda:\s*\n\s+[\"']([^\"']+)[\"']", body, re.M)
            module = re.search(r"python -m (wsiomics(?:\.\w+)*)", body)
            found[header.group(2)] = {"file": path, "conda": conda and (path.parent / conda.group(1)).resolve(),
                                      "module": module and module.group(1), "runs": "shell:" in body}
    return found


def env_file(path: Path) -> dict:
    env = yaml.safe_load(path.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return {"env": env, "pip": pin_map(pip[0]["pip"] if pip else [])}


def module_file(name: str) -> Path | None:
    """What ``python -m name`` runs."""
    base = SRC.joinpath(*name.split("."))
    return next((p for p in (base / "__main__.py", base.with_suffix(".py")) if p.is_file()), None)


def third_party_imports(module: str) -> set[str]:
    """Top-level names of non-stdlib packages imported anywhere in ``module`` and the wsiomics modules it
    imports (function-level imports included: they run in the rule's env too)."""
    seen, todo, external = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__ run first
        base = SRC.joinpath(*parts)
        files = [base / "__init__.py", base.with_suffix(".py")] + ([base / "__main__.py"] if name == module else [])
        for path in files:
            if path.is_file():
                _scan(path, name, todo, external)
    return external


def _scan(path: Path, name: str, todo: list[str], external: set[str]) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; the project uses absolute imports")
            else:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top == "wsiomics":
                todo.append(target)
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)


RULES = rules()
RUNNABLE = {name: rule for name, rule in RULES.items() if rule["runs"]}


def test_rules_were_found():
    assert {"tile", "extract_features", "expression_cohort", "normalize_expression"} <= set(RUNNABLE)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_every_rule_has_an_existing_env_that_parses_with_pyproject_pins(name):
    rule = RUNNABLE[name]
    assert rule["conda"], f"rule {name} ({rule['file'].name}) has no conda: directive"
    assert rule["conda"].is_file(), f"rule {name}: {rule['conda']} does not exist"
    parsed = env_file(rule["conda"])
    deps = parsed["env"]["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    assert parsed["env"]["channels"][0] == "conda-forge"
    pins = pyproject_pins()
    for package, version in parsed["pip"].items():
        assert pins.get(package) == version, f"{rule['conda'].name}: {package}=={version}, pyproject has " \
                                             f"{pins.get(package)}"


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_env_holds_every_library_the_rules_module_imports(name):
    rule = RUNNABLE[name]
    assert rule["module"], f"rule {name} does not run `python -m wsiomics.<stage>`"
    assert module_file(rule["module"]), f"rule {name}: module {rule['module']} not found under src/"
    distributions = importlib.metadata.packages_distributions()
    pinned = env_file(rule["conda"])["pip"]
    missing = []
    for top in sorted(third_party_imports(rule["module"])):
        dists = {re.sub(r"[-_.]+", "-", d.lower()) for d in distributions.get(top, [top])}
        if not dists & set(pinned):
            missing.append(f"{top} ({', '.join(sorted(dists))})")
    assert not missing, f"{rule['conda'].name} lacks what {rule['module']} imports: {missing}"


def test_import_scan_sees_function_level_and_transitive_imports():
    imports = third_party_imports("wsiomics.features")
    assert {"torch", "timm", "openslide", "zarr", "h5py", "safetensors"} <= imports
    assert "anndata" in third_party_imports("wsiomics.expression")
