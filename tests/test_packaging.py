"""Model Zoo packaging: metadata against the Zoo schema, network I/O check, versions pinned as in requirements.txt."""

import json
import pathlib
import re
import subprocess
import sys
from importlib.metadata import version

import jsonschema
import torch
from conftest import BUNDLE

ROOT = BUNDLE.parent
SCHEMA = BUNDLE / "docs" / "meta_schema.json"
METADATA = BUNDLE / "configs" / "metadata.json"
#: The schema the Model Zoo checks bundles against (named in metadata.json; docs/meta_schema.json stands in for it).
ZOO_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: Packages whose versions metadata.json keeps in its own keys rather than in required_packages_version.
VERSION_KEYS = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}


def monai_bundle(*args, timeout=300):
    """Run ``python -m monai.bundle ARGS`` from ``bundle/`` and return its output, asserting success."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def required_paths(schema, instance, defs, prefix=""):
    """Every (path, present) pair for the keys that ``schema`` requires of ``instance``, recursively."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(instance, dict):
        return []
    if "anyOf" in schema:  # a network argument: a plain value, or a tensor descriptor (the object branch)
        return [
            p
            for branch in schema["anyOf"]
            if "type" not in branch
            for p in required_paths(branch, instance, defs, prefix)
        ]
    found = [(f"{prefix}{key}", key in instance) for key in schema.get("required", [])]
    properties = schema.get("properties", {})
    for key, value in instance.items():
        sub = properties.get(key, schema.get("additionalProperties"))
        if isinstance(sub, dict):
            found += required_paths(sub, value, defs, f"{prefix}{key}#")
    return found


def test_metadata_has_every_field_the_zoo_schema_requires():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    metadata = json.loads(METADATA.read_text())
    assert metadata["schema"] == ZOO_SCHEMA_URL
    checked = required_paths(schema, metadata, schema["$defs"])
    missing = [path for path, present in checked if not present]
    assert not missing, f"metadata.json lacks {missing}"
    # the top level, network_data_format's inputs/outputs and each tensor's descriptor were all walked
    paths = {path for path, _ in checked}
    assert {"task", "required_packages_version", "network_data_format#inputs"} <= paths
    assert {"network_data_format#inputs#image#dtype", "network_data_format#outputs#pred#value_range"} <= paths
    jsonschema.validate(metadata, schema)
    # what the Zoo's CI checks beside the schema: the version has a changelog entry, and a display name
    assert metadata["version"] in metadata["changelog"] and metadata["name"]


def test_schema_rejects_incomplete_metadata():
    schema = json.loads(SCHEMA.read_text())
    metadata = json.loads(METADATA.read_text())
    for drop in ("required_packages_version", "network_data_format", "authors"):
        broken = {k: v for k, v in metadata.items() if k != drop}
        assert not jsonschema.Draft202012Validator(schema).is_valid(broken), drop
    broken = json.loads(METADATA.read_text())
    del broken["network_data_format"]["outputs"]["pred"]["dtype"]
    assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_verify_metadata_cli_passes_with_the_local_schema():
    log = monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "docs/meta_schema.json")
    assert "metadata is verified with no error" in log


def test_verify_net_in_out_cli_passes_and_output_is_the_central_crop():
    log = monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    assert "data shape of network is verified with no error" in log
    # verify_net_in_out checks channels and dtype; the spatial contract (64³ in, central 48³ out) is checked here
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.read_meta(str(METADATA))
    parser["features"] = [4, 4, 8, 8, 8, 4]
    net = parser.get_parsed_content("network_def").eval()
    io = parser.get("_meta_#network_data_format")
    shape_in, shape_out = io["inputs"]["image"]["spatial_shape"], io["outputs"]["pred"]["spatial_shape"]
    with torch.no_grad():
        out = net(torch.zeros(1, io["inputs"]["image"]["num_channels"], *shape_in))
    assert list(out.shape[2:]) == shape_out and out.shape[1] == io["outputs"]["pred"]["num_channels"]


def requirement_pins(path: pathlib.Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert match, f"{path.name}: {line!r} is not pinned as name==version"
        pins[match.group(1).lower()] = match.group(3)
    return pins


def test_requirements_and_metadata_pin_the_same_versions():
    pins = requirement_pins(ROOT / "requirements.txt")
    metadata = json.loads(METADATA.read_text())
    for package, key in VERSION_KEYS.items():
        assert metadata[key] == pins.pop(package), key
    assert {k.lower(): v for k, v in metadata["required_packages_version"].items()} == pins


def test_pinned_versions_are_the_ones_installed():
    """The pins are the versions the tests run with (a local build suffix such as +cpu aside)."""
    pins = requirement_pins(ROOT / "requirements.txt")
    pins.update(requirement_pins(ROOT / "requirements-test.txt"))
    wrong = {name: (pin, version(name)) for name, pin in pins.items() if version(name).split("+")[0] != pin}
    assert not wrong, f"pinned vs installed: {wrong}"


def _requirement_closure() -> set[str]:
    """Distributions that the requirements files bring in, with their dependencies (normalised names)."""
    from importlib import metadata

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    names = []
    for path in ROOT.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.append(norm(re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0]))
    seen, todo = set(), names
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[\s\[<>=!~;(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen


def test_every_import_resolves_from_the_requirements_files():
    """A fresh environment built from requirements*.txt has every third-party module the code and tests import, so
    packages installed by hand cannot hide a missing requirement (what .ci/run's fresh virtual environment checks)."""
    import ast
    from importlib import metadata

    allowed = _requirement_closure()
    local = {p.stem for p in ROOT.rglob("*.py")} | {p.name for p in ROOT.rglob("*") if p.is_dir()}
    distributions = metadata.packages_distributions()
    missing = {}
    for path in [*ROOT.glob("bundle/**/*.py"), *ROOT.glob("bench/**/*.py"), *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(top, [])}
                if not dists & allowed:
                    missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported but in no requirements file (module: first file): {missing}"
