"""The one logging setup: level filter, destination, plain lines."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import structlog

from btmm_core.errors import ConfigError
from btmm_core.log import configure_logging


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_level_filters_and_lines_go_to_the_stream() -> None:
    out = io.StringIO()
    configure_logging("warning", stream=out)
    log = structlog.get_logger("test")
    log.info("quiet")
    log.warning("peer roamed", inner="fd00::2")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert "quiet" not in text
    line = text.splitlines()[0]
    assert "[warning  ]" in line and "peer roamed" in line and "inner=fd00::2" in line
    assert line[:4].isdigit() and "Z" in line.split()[0]  # ISO 8601 in UTC first
    assert "\x1b[" not in text  # no colour codes
    assert "Traceback" in text and "ValueError: boom" in text


def test_debug_shows_everything() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    structlog.get_logger("test").debug("detail", n=1)
    assert "detail" in out.getvalue()


def test_unknown_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown log level 'loud'"):
        configure_logging("loud")
