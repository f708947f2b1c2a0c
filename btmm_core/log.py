"""The one structlog setup of every ``btmm`` process.

Lines for people, not machines: level, UTC timestamp, event and its fields, plain tracebacks,
no colours (the output usually ends up in a journal or a test's log file). They go to stderr
because stdout is a JSON protocol in ``btmm tunnel`` and ``python -m btmm_core.keyex.cli``.
Modules only call ``structlog.get_logger``; the entry point calls ``configure_logging`` once.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from btmm_core.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Log ``level`` (one of ``LEVELS``) and above to ``stream`` (default: stderr)."""
    if level.lower() not in LEVELS:
        raise ConfigError(f"unknown log level {level!r}", hint=f"use one of {', '.join(LEVELS)}")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        # the registry and the daemon log on busy paths: resolve each logger's chain once
        cache_logger_on_first_use=True,
    )
