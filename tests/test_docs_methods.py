"""Every method registered in the harness (``harness/catalog.py``, not the throw-away ones
the tests register) is described in docs/methods.md and has a section in
docs/fidelity.md naming it: a method added without its documentation fails here."""
from __future__ import annotations

import re

from harness import catalog

from .conftest import REPO


def _shipped() -> list[str]:
    return [m.name for m in catalog.METHODS if m.target and m.target.startswith("methods.")]


def test_every_registered_method_is_in_methods_md_and_fidelity_md():
    methods_md = (REPO / "docs" / "methods.md").read_text()
    headings = "\n".join(line for line in (REPO / "docs" / "fidelity.md").read_text().splitlines()
                         if line.startswith("## "))
    shipped = _shipped()
    assert {"fgd", "cwd", "icsd", "ssld"} <= set(shipped)
    missing_md = [m for m in shipped if f"`{m}`" not in methods_md and f"**{m}**" not in methods_md]
    missing_fid = [m for m in shipped if not re.search(rf"`{re.escape(m)}`", headings)]
    assert not missing_md, f"not described in docs/methods.md (as `name` or **name**): {missing_md}"
    assert not missing_fid, f"no docs/fidelity.md section heading names them (`name`): {missing_fid}"
