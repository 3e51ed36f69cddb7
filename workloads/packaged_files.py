"""Files that installed packages ship (data sets, model folders), found without importing the
package: nothing is downloaded at run time, and a package's own dependencies are never loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from storage.errors import BadInput


def packaged_file(package: str, parts: tuple[str, ...], missing: str) -> Path:
    """``<package folder>/<parts...>`` of the installed ``package`` (a file or folder);
    BadInput(``missing``) when the package or the path is not installed."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location).joinpath(*parts)
        if path.exists():
            return path
    raise BadInput(missing)
