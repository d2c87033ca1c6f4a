"""Checks that the README lists every setting and every metric the code defines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamer.metrics import WorkerMetrics
from streamer.settings import ENV_VARS, Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("env_var", sorted(ENV_VARS))
def test_readme_lists_setting(env_var):
    assert f"`{env_var}`" in README


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Settings)])
def test_readme_shows_setting_default(field):
    default = Settings.__dataclass_fields__[field].default
    row = next(line for line in README.splitlines() if f"`DRNN_{field.upper()}`" in line)
    shown = "(empty)" if default == "" else f"`{default}`"
    assert shown in row


def test_readme_lists_every_metric():
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in README, name
