"""Derive zotlb/data/zot-keys.json from shared/zot-config/zot-config-keys.json.

Run from the repository root:  python scripts/derive_zot_keys.py [SOURCE] [DEST]
The output is a compact, deterministic subset: only what the generator and the
checker in zotlb/zotcfg.py use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# zot's release tags (rc tags excluded) covered by the source file; the source
# only states the newest one, so the older ones are listed here.
_OLDER_RELEASES = [f"v2.0.{n}" for n in range(5)] + [f"v2.1.{n}" for n in range(20)]


def derive(source: dict[str, Any]) -> dict[str, Any]:
    newest = source["zot_tag"]
    releases = [*_OLDER_RELEASES, *([newest] if newest not in _OLDER_RELEASES else [])]
    keys: dict[str, Any] = {}
    for entry in source["keys"]:
        item: dict[str, Any] = {"type": entry["json_type"], "since": entry["since"]}
        if entry.get("items"):
            item["items"] = entry["items"]
        if entry.get("open_map"):
            item["open"] = True
        if entry.get("status", "active") != "active":
            item["status"] = entry["status"]
        if entry.get("allowed_values"):
            item["allowed"] = entry["allowed_values"]
        keys[entry["path"]] = item
    unreleased = {
        entry["path"]: {"type": entry["json_type"], "evidence": entry["evidence"]}
        for entry in source.get("unreleased_on_main", [])
    }
    return {
        "source": {
            "zot_tag": newest,
            "commit": source["commit"],
            "main_commit": source["compared_main"]["commit"],
        },
        "releases": releases,
        "keys": dict(sorted(keys.items())),
        "unreleased_on_main": dict(sorted(unreleased.items())),
    }


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    src = Path(argv[0] if argv else "../shared/zot-config/zot-config-keys.json")
    dest = Path(argv[1] if len(argv) > 1 else "zotlb/data/zot-keys.json")
    dest.write_text(render(derive(json.loads(src.read_text()))), encoding="utf-8")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
