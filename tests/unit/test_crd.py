"""The NASExperiment CRD file itself: one source of truth, structural, described, and its rules sound."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphml.experiment import CRD_FILE, _cel_program, _field_path_parts, crd_schema

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crds" / "nasexperiments.morphml.io.yaml"
COPIES = [
    ROOT / "runtime" / "morphml" / "crd" / "nasexperiments.morphml.io.yaml",  # packaged for `morphml run`
    ROOT / "helm" / "morphml" / "crds" / "nasexperiments.morphml.io.yaml",  # installed by helm before templates
]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def walk(schema: dict, path: str = ""):
    """Every (path, schema node) below and including `schema`."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("copy", COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_copies_are_byte_identical_to_crds_dir(copy: Path):
    assert copy.read_bytes() == SOURCE.read_bytes(), f"{copy} drifted from {SOURCE}; copy crds/ over it"


def test_runtime_reads_the_packaged_copy():
    assert COPIES[0] == CRD_FILE


def test_names_and_version():
    crd = load(SOURCE)
    assert crd["metadata"]["name"] == "nasexperiments.morphml.io"
    assert crd["spec"]["group"] == "morphml.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("NASExperiment", "nasexperiments", ["nasexp"])
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]


def test_every_field_has_a_description():
    # metadata is the one exception: the API server forbids anything but `type: object` there.
    undocumented = [path or "(root)" for path, node in walk(crd_schema())
                    if not node.get("description") and path != ".metadata"]
    assert undocumented == []


def test_schema_is_structural():
    # What the API server demands of a structural schema: a type everywhere (or int-or-string),
    # no additionalProperties next to properties, no uniqueItems, no $ref.
    for path, node in walk(crd_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "uniqueItems" not in node and "$ref" not in node, path


def test_lists_and_strings_under_cel_rules_are_bounded():
    # The API server estimates each CEL rule's worst-case cost from maxItems / maxLength and
    # refuses a CRD whose estimate is unbounded; everything under searchSpace carries bounds.
    space = crd_schema()["properties"]["spec"]["properties"]["searchSpace"]
    for path, node in walk(space, "spec.searchSpace"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path


def test_every_cel_rule_compiles_and_its_field_path_exists():
    rules = 0
    for path, node in walk(crd_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            _cel_program(rule["rule"])
            assert rule.get("message"), f"{path}: rule without a message: {rule['rule']}"
            target = node
            for part in _field_path_parts(rule.get("fieldPath", "")):
                target = target["properties"][part]
            rules += 1
    assert rules >= 20


def test_defaults_satisfy_their_own_schema_and_rules():
    # The API server refuses a CRD whose default value, as written (not itself defaulted),
    # fails the node's schema or CEL rules.
    import celpy
    import jsonschema

    for path, node in walk(crd_schema()):
        if "default" not in node:
            continue
        local = {k: v for k, v in node.items() if k not in ("default", "required", "x-kubernetes-validations")}
        jsonschema.Draft4Validator(local).validate(node["default"])
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue  # transition rules apply to updates only
            result = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(node["default"])})
            assert result is True or (bool(result) is True and isinstance(result, celpy.celtypes.BoolType)), (
                f"{path}: default {node['default']!r} fails {rule['rule']}: {result!r}")


def test_scale_subresource_paths_point_at_integers_and_a_selector():
    version = load(SOURCE)["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    schema = crd_schema()

    def node_at(json_path: str) -> dict:
        node = schema
        for part in json_path.strip(".").split("."):
            node = node["properties"][part]
        return node

    assert node_at(scale["specReplicasPath"])["type"] == "integer"
    assert node_at(scale["statusReplicasPath"])["type"] == "integer"
    assert node_at(scale["labelSelectorPath"])["type"] == "string"
    assert "status" in version["subresources"]


def test_printer_columns_show_phase_workers_trials_best_age():
    version = load(SOURCE)["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Phase", "Workers", "Trials", "Best", "Age"]
    schema = crd_schema()
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"] or (column["type"] == "string" and node["type"] == "string")


def test_docs_manifest_reference_matches_the_crd():
    from morphml.experiment import manifest_reference

    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    begin, end = "<!-- reference:begin -->\n", "<!-- reference:end -->"
    embedded = text[text.index(begin) + len(begin): text.index(end)]
    assert embedded == manifest_reference(), "docs/kubernetes.md's manifest reference is stale; regenerate it"
