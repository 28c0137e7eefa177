"""Cut OpenAI's OpenAPI specification down to the routes tandem serves (run by hand, not by tests).

The whole specification (`openapi.yaml` / `openapi.json` of the openai/openai-openapi repository)
is about 3 MB; the tests need only the operations below and the components they reference. This
keeps those parts unchanged (schemas are copied as published, `nullable` and all) and drops the
rest, so the file in this folder is a faithful subset of the published document:

    python tests/data/openai-openapi/extract.py path/to/openapi.json [COMMIT] \\
        > tests/data/openai-openapi/openapi.subset.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# (path, method) of every operation tandem serves from the specification.
OPERATIONS = (
    ("/chat/completions", "post"),
    ("/completions", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
    ("/embeddings", "post"),
)
# Components no kept operation references, but the tests validate against.
EXTRA_SCHEMAS = ("ErrorResponse",)


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        loaded: dict[str, Any] = json.loads(text)
        return loaded
    import yaml

    return dict(yaml.safe_load(text))


def _refs(node: Any) -> list[str]:
    """Every local `$ref` under `node` ("#/components/schemas/Name")."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def extract(spec: dict[str, Any], commit: str = "") -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, method in OPERATIONS:
        item = spec["paths"][path]
        kept = {k: v for k, v in item.items() if k == method or k == "parameters"}
        paths.setdefault(path, {}).update(kept)
    components: dict[str, dict[str, Any]] = {}
    todo = _refs(paths) + [f"#/components/schemas/{name}" for name in EXTRA_SCHEMAS]
    while todo:
        ref = todo.pop()
        _, section, kind, name = ref.split("/")
        assert section == "components", ref
        if name in components.get(kind, {}):
            continue
        node = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = node
        todo += _refs(node)
    info = dict(spec["info"])
    if commit:
        info["x-tandem-source"] = f"openai/openai-openapi@{commit}"
    return {
        "openapi": spec["openapi"],
        "info": info,
        "paths": paths,
        "components": {kind: dict(sorted(items.items())) for kind, items in sorted(components.items())},
    }


def main() -> None:
    spec = _load(Path(sys.argv[1]))
    commit = sys.argv[2] if len(sys.argv) > 2 else ""
    json.dump(extract(spec, commit), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
