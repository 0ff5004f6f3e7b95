"""Structured logs: one JSON line per record, with the request's id, and nothing personal or secret in it.

Every logger of the process (the app's `logging.getLogger(__name__)` ones, Litestar's, uvicorn's,
structlog's) goes to the root logger's one handler, which formats in the logging thread (so the
request id is known) and leaves the writing to a background thread (a slow stderr never holds a
request). Formatting ends with `redact`, so a value that slipped into a message or an exception
is replaced before the line exists.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import structlog
from litestar.logging.config import LoggingConfig, StructLoggingConfig
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin
from structlog.typing import EventDict, Processor, WrappedLogger

from app.observability.request_ids import REQUEST_ID
from app.settings import Settings

ACCESS_LOGGER = "ecard.access"
REDACTED = "[redacted]"

# Fields that hold personal data or secrets whatever their value looks like.
_SENSITIVE_KEYS = re.compile(
    r"(?i)(citizen|id_number|name$|^name|card_number|token|api_key|apikey|secret|password|pin|"
    r"authorization|cookie|credential|phone|activation_code|signature)"
)
# Values that are personal or secret wherever they appear in a message or a traceback.
_SENSITIVE_VALUES = re.compile(
    "|".join(
        (
            r"\[parameters: .*?\](?=\s*(?:\(|\[|$))",  # SQLAlchemy's echo of a statement's values
            r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])",  # citizen identity number (GB 11643)
            r"(?<![0-9A-Za-z])\d{15}(?![0-9A-Za-z])",  # its 15-digit predecessor
            # A card number: nine upper-case letters or digits (an upper-case word of nine letters goes too).
            r"(?<![0-9A-Za-z_])[0-9A-Z]{9}(?![0-9A-Za-z_])",
            r"eyJ[\w-]*\.[\w-]*\.?[\w-]*",  # a JWT (holder, operator, step-up tokens)
            r"ecv1\.[0-9a-f]{32}\.[\w-]+",  # a terminal API key
            r"\brt_[\w-]+",  # a refresh token
            r"EC\d:[0-9A-Z $%*+\-./:]+",  # a credential as the QR carries it
            r"(?i:bearer)\s+\S+",
            r"(?<![0-9])\d{4}-\d{4}(?![0-9])",  # an activation code
            # Han characters: the service's own messages are English, so these are names or addresses.
            r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+",
        )
    ),
    re.DOTALL,
)


def redact_text(text: str) -> str:
    """The text with every personal or secret value it contains replaced by `[redacted]`."""
    return _SENSITIVE_VALUES.sub(REDACTED, text)


def _redacted(key: str, value: Any) -> Any:
    if _SENSITIVE_KEYS.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): _redacted(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(key, item) for item in value]
    return value


# Set by the formatter itself (the request id was checked when it was chosen): left as they are.
_OWN = frozenset({"level", "logger", "timestamp", "request_id"})
# Free text: searched for values, whatever its key says.
_TEXT = frozenset({"event", "exception"})


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A structlog processor, last before rendering: sensitive fields and values become `[redacted]`."""
    for key, value in event_dict.items():
        if key in _OWN:
            continue
        if key in _TEXT and isinstance(value, str):
            event_dict[key] = redact_text(value)
        else:
            event_dict[key] = _redacted(key, value)
    return event_dict


def add_request_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The id of the request being answered, when there is one."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


class JsonLineFormatter(structlog.stdlib.ProcessorFormatter):
    """Structlog's formatter of stdlib records as JSON; access lines, rendered by their maker, pass as they are."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        if record.name == ACCESS_LOGGER and isinstance(record.msg, str) and not record.args:
            return record.msg
        return super().format(record)


def _renderer(event_dict: EventDict, **_: Any) -> str:
    return msgspec.json.encode(event_dict, enc_hook=str).decode()


_PRE_CHAIN: list[Processor] = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    add_request_id,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def json_formatter() -> JsonLineFormatter:
    """The formatter of every log line (also what tests attach to a handler of their own)."""
    return JsonLineFormatter(
        foreign_pre_chain=_PRE_CHAIN,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(serializer=_renderer),
        ],
    )


class LineWriter(logging.Handler):
    """Formats each record in the caller (where the request id is known); a thread writes the lines, in batches.

    The thread wakes every FLUSH_INTERVAL and writes whatever accumulated in one call: a request
    never waits for stderr, and a line costs no thread switch (waking a writer per line cost a
    scan ~20 us of CPU). A line reaches stderr within FLUSH_INTERVAL; at exit the rest is written.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._stream = stream or sys.stderr
        self._lines: deque[str] = deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's line."""
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def append(self, line: str) -> None:
        """Queue a line rendered by its maker (the access line)."""
        self._lines.append(line)

    def _write(self) -> None:
        while not self._stopping.wait(FLUSH_INTERVAL):
            self._flush_lines()
        self._flush_lines()

    def _flush_lines(self) -> None:
        lines = self._lines
        batch = []
        while lines:
            batch.append(lines.popleft())
        if batch:
            try:
                self._stream.write("\n".join(batch) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nowhere to say so

    def stop(self) -> None:
        """Write what is queued, then end the thread (at exit)."""
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(timeout=2.0)


FLUSH_INTERVAL = 0.05
_writer: LineWriter | None = None


def line_writer() -> LineWriter:
    """The process's one writer (Litestar configures logging at each app creation; the thread is made once)."""
    global _writer
    if _writer is None:
        _writer = LineWriter()
    return _writer


def logging_plugin(settings: Settings) -> StructlogPlugin:
    """Litestar's structlog plugin, configured: JSON lines, levels per logger, no request body logging."""
    levels = dict(settings.log_levels)
    loggers: dict[str, dict[str, Any]] = {
        name: {"level": levels.pop(name, "INFO"), "propagate": True, "handlers": []}
        for name in ("litestar", "uvicorn", "uvicorn.error", ACCESS_LOGGER)
    }
    loggers.update({name: {"level": level, "propagate": True} for name, level in levels.items()})
    # uvicorn's access line prints the path and query string (card numbers): `access_line` replaces it.
    loggers["uvicorn.access"] = {"level": "WARNING", "propagate": False, "handlers": []}
    standard = LoggingConfig(
        formatters={"json": {"()": json_formatter}},
        handlers={
            "queue_listener": {"()": line_writer, "formatter": "json"},
            "console": {"class": "logging.StreamHandler", "formatter": "json"},
        },
        loggers=loggers,
        root={"handlers": ["queue_listener"], "level": settings.log_level},
        log_exceptions="never",
    )
    structured = StructLoggingConfig(
        processors=[
            structlog.stdlib.filter_by_level,
            *_PRE_CHAIN[:2],
            structlog.contextvars.merge_contextvars,
            add_request_id,
            _PRE_CHAIN[-1],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        standard_lib_logging_config=standard,
        log_exceptions="never",
        pretty_print_tty=False,
    )
    return StructlogPlugin(StructlogConfig(structlog_logging_config=structured, enable_middleware_logging=False))


_access = logging.getLogger(ACCESS_LOGGER)
_root = logging.getLogger()
_encode = msgspec.json.Encoder().encode


def access_line(method: str, route: str, status: int, seconds: float, request_id: str) -> None:
    """One line per answered request: no query string, no path parameters (the route's template)."""
    if not _access.isEnabledFor(logging.INFO):
        return
    line = {
        "event": "request",
        "level": "info",
        "logger": ACCESS_LOGGER,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "request_id": request_id,
        "method": method,
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
    text = _encode(line).decode()
    writer = _writer
    handlers = _root.handlers
    if (
        writer is not None
        and len(handlers) == 1
        and handlers[0] is writer
        and _access.propagate
        and not _access.handlers
    ):
        # The usual set-up: straight to the writer, without a LogRecord (they cost a scan several microseconds).
        writer.append(text)
        return
    _access.handle(logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, text, None, None))
