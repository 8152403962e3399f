"""YAML configs shipped with the suite; `config_path(name)` finds one in a source tree or an installed copy."""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    """Path of a shipped config by name (`gpstoken_m128`, `gpstoken_m128.yaml`) or an existing file path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config '{name}' is neither a file nor a shipped config (shipped: {available})")
