"""Tests of load_settings: the order of environment variables, CLI flags and keyword overrides."""

from __future__ import annotations

import argparse

import pytest

from drnn_core.errors import ConfigError
from streamer.settings import load_settings


def test_load_settings_flag_wins_over_invalid_environment():
    args = argparse.Namespace(batch_size="7")

    settings = load_settings(args, environ={"DRNN_BATCH_SIZE": "abc"})

    assert settings.batch_size == 7


def test_load_settings_override_wins_over_invalid_environment():
    settings = load_settings(environ={"DRNN_BATCH_SIZE": "0"}, batch_size=9)

    assert settings.batch_size == 9


def test_load_settings_flag_wins_over_valid_environment():
    args = argparse.Namespace(batch_size="7")

    settings = load_settings(args, environ={"DRNN_BATCH_SIZE": "300"})

    assert settings.batch_size == 7


def test_load_settings_reads_environment_without_flag():
    settings = load_settings(argparse.Namespace(batch_size=None), environ={"DRNN_BATCH_SIZE": "300"})

    assert settings.batch_size == 300


def test_load_settings_rejects_invalid_environment():
    with pytest.raises(ConfigError, match="DRNN_BATCH_SIZE"):
        load_settings(environ={"DRNN_BATCH_SIZE": "abc"})
