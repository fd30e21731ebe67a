"""The package layout (docs/design.md, Layout): top-level folders installed under the lsp
namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

import lsp
import lsp.kernels
import lsp.launch
import lsp.parallel

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for name, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    # nested mapped folders (lsp -> lsp/) are found once per mapping; compare the union
    assert found == listed, f"not listed: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_mapped_subpackages_import_from_their_folders():
    assert Path(lsp.kernels.__file__).parent.name == "kernels"
    assert Path(lsp.parallel.__file__).parent.name == "parallel"
    assert Path(lsp.launch.__file__).parent.name == "launch"
    assert callable(lsp.ops.linear_attention) and callable(lsp.ops.delta_rule)
