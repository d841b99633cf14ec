"""`llm-supervisor top` (a Textual client of /status) and the plain-text status table."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Footer, Static

logger = logging.getLogger(__name__)

Status = Mapping[str, Any]

STATE_STYLES = {
    "READY": "bold green",
    "STARTING": "yellow",
    "UNHEALTHY": "bold dark_orange",
    "BACKOFF": "dark_orange",
    "STOPPING": "cyan",
    "STOPPED": "dim",
    "FATAL": "bold red",
}
EVENT_STYLES = {
    "hang": "dark_orange",
    "crash": "bold red",
    "fatal": "bold red",
    "error": "red",
    "reload_error": "red",
    "ready": "green",
    "restart": "yellow",
    "eviction": "magenta",
}

GPU_COLUMNS = ("GPU", "NAME", "MEMORY", "USED", "UTIL", "TEMP", "POWER")
REPLICA_COLUMNS = (
    "REPLICA", "MODEL", "PLACE", "STATE", "PID", "UPTIME", "RESTARTS", "LOAD", "TOK/S", "REASON",
)  # fmt: skip
MODEL_COLUMNS = ("MODEL", "ENGINE", "READY", "QUEUE", "LAST WAIT", "REQUESTS", "ERRORS")
EVENT_COLUMNS = ("TIME", "KIND", "REPLICA", "MESSAGE")
BAR_WIDTH = 20
EVENTS_SHOWN = 50
ADMIN_TIMEOUT = 300.0


# ---- formatting shared by the TUI and format_status_table ------------------


def _duration(seconds: object) -> str:
    """12s, 3m05s, 2h04m, 5d03h; '-' when unknown."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _gib(n: object) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / 2**30:.1f}" if isinstance(n, int | float) else "-"


def _ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(set(numbers)):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _place(replica: Status) -> str:
    """'gpu 0,1' or 'cpu 0-3'."""
    gpus = [g for g in replica.get("gpus") or [] if isinstance(g, int)]
    if gpus:
        return "gpu " + ",".join(str(g) for g in gpus)
    cpus = [c for c in replica.get("cpus") or [] if isinstance(c, int)]
    return "cpu " + _ranges(cpus) if cpus else "-"


def _num(value: object, fmt: str = "{:.0f}", suffix: str = "") -> str:
    """Format a JSON number, '-' when absent."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt.format(value) + suffix
    return "-"


def _fraction(used: object, total: object) -> float | None:
    """used/total in [0, 1], or None when unknown."""
    if isinstance(used, int | float) and isinstance(total, int | float) and total > 0:
        return max(0.0, min(1.0, used / total))
    return None


def _bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """A text bar like '██████░░░░'."""
    if fraction is None:
        return "·" * width
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def _usage_colour(fraction: float | None) -> str:
    """Green below 80 %, yellow below 95 %, red above."""
    if fraction is None or fraction < 0.8:
        return "green"
    return "yellow" if fraction < 0.95 else "red"


def _clock(t: object) -> str:
    """Epoch seconds as local HH:MM:SS."""
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t))


def _headline(status: Status) -> str:
    """'llm-supervisor 0.1.0 · ready · up 1h02m'."""
    if status.get("draining"):
        state = "draining"
    elif status.get("ready"):
        state = "ready"
    else:
        state = "not ready"
    uptime = _duration(status.get("uptime_s"))
    line = f"llm-supervisor {status.get('version', '?')} · {state} · up {uptime}"
    config = status.get("config") or {}
    if isinstance(config, Mapping) and config.get("reload_error"):
        line += f" · reload refused: {config['reload_error']}"
    return line


def _cpu_line(status: Status) -> str:
    """'CPU-only host: N cores'."""
    return f"CPU-only host: {_num(status.get('cpus'))} cores"


def _gpu_row(gpu: Status) -> list[str]:
    """Cells for one GPU (MEMORY is the bar)."""
    used, total = gpu.get("memory_used"), gpu.get("memory_total")
    return [
        _num(gpu.get("index")),
        str(gpu.get("name", "")),
        _bar(_fraction(used, total)),
        f"{_gib(used)}/{_gib(total)} GiB",
        _num(gpu.get("utilization"), suffix="%"),
        _num(gpu.get("temperature"), suffix="°C"),
        _num(gpu.get("power_w"), suffix=" W"),
    ]


def _replica_row(replica: Status) -> list[str]:
    """Cells for one replica."""
    return [
        str(replica.get("id", "")),
        str(replica.get("model", "")),
        _place(replica),
        str(replica.get("state", "?")),
        _num(replica.get("pid")),
        _duration(replica.get("uptime_s")),
        _num(replica.get("restarts")),
        f"{_num(replica.get('in_flight'))}/{_num(replica.get('slots'))}",
        _num(replica.get("tokens_per_s"), "{:.1f}"),
        str(replica.get("reason") or ""),
    ]


def _model_row(model: Status) -> list[str]:
    """Cells for one model and its queue."""
    return [
        str(model.get("name", "")),
        str(model.get("engine", "")),
        f"{_num(model.get('ready'))}/{_num(model.get('replicas'))}",
        f"{_num(model.get('queue_depth'))}/{_num(model.get('queue_max'))}",
        _num(model.get("queue_wait_last_s"), "{:.2f}", "s"),
        _num(model.get("requests")),
        _num(model.get("errors")),
    ]


def _event_row(event: Status) -> list[str]:
    """Cells for one event."""
    return [
        _clock(event.get("time")),
        str(event.get("kind", "")),
        str(event.get("replica") or "-"),
        str(event.get("message", "")),
    ]


def _items(status: Status, key: str) -> list[Status]:
    """The list under key, keeping only objects."""
    value = status.get(key) or []
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def format_status_table(status: Status, events: int = 5) -> str:
    """The /status JSON as a plain-text report for `llm-supervisor status`."""
    sections = [_headline(status)]
    gpus = _items(status, "gpus")
    if gpus:
        rows = []
        for gpu in gpus:
            cells = _gpu_row(gpu)
            used = _fraction(gpu.get("memory_used"), gpu.get("memory_total"))
            cells[2] = _num(None if used is None else used * 100, suffix="%")
            rows.append(cells)
        sections.append(_text_table(GPU_COLUMNS, rows))
    else:
        sections.append(_cpu_line(status))
    replicas = _items(status, "replicas")
    if replicas:
        sections.append(_text_table(REPLICA_COLUMNS, [_replica_row(r) for r in replicas]))
    else:
        sections.append("no replicas")
    models = _items(status, "models")
    if models:
        sections.append(_text_table(MODEL_COLUMNS, [_model_row(m) for m in models]))
    recent = _items(status, "events")[-events:] if events > 0 else []
    if recent:
        sections.append(_text_table(EVENT_COLUMNS, [_event_row(e) for e in reversed(recent)]))
    return "\n\n".join(sections) + "\n"


def _error_message(body: str) -> str:
    """The message of an OpenAI-shaped error body, else the body itself, shortened."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:160]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:160]
    if isinstance(error, str):
        return error[:160]
    return body[:160]


def _reason(exc: BaseException, timeout: float) -> str:
    """A short human reason for a failed poll."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        detail = os.strerror(os_error.errno) if os_error.errno else str(os_error)
        return f"cannot connect to {exc.host}:{exc.port}: {detail}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".strip()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return str(exc) or type(exc).__name__


# ---- the Textual app ---------------------------------------------------------


class TopApp(App[None]):
    """A live view of one daemon's /status, with restart and drain on the selected replica."""

    TITLE = "llm-supervisor top"
    CSS = """
    Screen { layout: vertical; }
    #header { height: 1; padding: 0 1; background: $primary-background; text-style: bold; }
    #header.unreachable { background: $error; color: $text; }
    .title { height: 1; padding: 0 1; margin-top: 1; color: $accent; text-style: bold; }
    #cpus { height: 1; padding: 0 1; }
    DataTable { height: auto; }
    #gpus { max-height: 10; }
    #replicas { max-height: 20; }
    #queues { max-height: 10; }
    #events { height: 1fr; min-height: 3; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "restart", "Restart replica"),
        Binding("d", "drain", "Drain replica"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, url: str, admin_token: str | None = None, interval: float = 1.0) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.admin_token = admin_token
        self.interval = interval
        self.timeout = max(2.0, interval)
        self.status: Status | None = None
        self.error: str | None = None
        self.header_text = ""
        self._session: aiohttp.ClientSession | None = None
        self._polling = False

    def compose(self) -> ComposeResult:
        """Header, GPUs (or CPU line), replicas, queues, events, footer."""
        yield Static(f"{self.url} · connecting…", id="header")
        yield Static("GPUs", classes="title", id="gpus-title")
        yield Static("", id="cpus")
        yield DataTable(id="gpus", cursor_type="none", zebra_stripes=True)
        yield Static("Replicas", classes="title")
        yield DataTable(id="replicas", cursor_type="row", zebra_stripes=True)
        yield Static("Models and queues", classes="title")
        yield DataTable(id="queues", cursor_type="none", zebra_stripes=True)
        yield Static("Events (newest first)", classes="title")
        yield DataTable(id="events", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        """Set up the tables and start polling."""
        for table_id, columns in (
            ("#gpus", GPU_COLUMNS),
            ("#replicas", REPLICA_COLUMNS),
            ("#queues", MODEL_COLUMNS),
            ("#events", EVENT_COLUMNS),
        ):
            table = self.query_one(table_id, DataTable)
            for column in columns:
                table.add_column(column, key=column)
            if table_id != "#replicas":
                table.can_focus = False
        self.query_one("#cpus").display = False
        self.query_one("#replicas", DataTable).focus()
        self._session = aiohttp.ClientSession()
        self.set_interval(self.interval, self.poll)
        self.poll()

    async def on_unmount(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()

    def poll(self) -> None:
        """Start a fetch unless the last one is still out."""
        if not self._polling:
            self._polling = True
            self.fetch_status()

    @work(exclusive=True, group="poll", exit_on_error=False)
    async def fetch_status(self) -> None:
        """GET /status and show it, or show why not."""
        try:
            assert self._session is not None
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with self._session.get(
                self.url + "/status", headers=self._auth(), timeout=timeout
            ) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            if not isinstance(data, Mapping):
                raise ValueError("/status did not answer a JSON object")
        except aiohttp.ClientResponseError as exc:
            hint = " (an admin token or API key is needed)" if exc.status in (401, 403) else ""
            self.show_error(f"/status answered HTTP {exc.status} {exc.message}{hint}", False)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.show_error(_reason(exc, self.timeout))
        else:
            self.show_status(data)
        finally:
            self._polling = False

    def _auth(self) -> dict[str, str]:
        """The admin token as a Bearer header (it also opens /status when api_keys are set)."""
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    # ---- rendering -----------------------------------------------------------

    def _set_header(self, text: str, unreachable: bool) -> None:
        self.header_text = text
        header = self.query_one("#header", Static)
        header.update(Text(text))
        header.set_class(unreachable, "unreachable")

    def show_error(self, reason: str, unreachable: bool = True) -> None:
        """Keep the last tables; say the daemon is unreachable (or refused) and why."""
        if reason != self.error:
            logger.debug("failed to poll %s: %s", self.url, reason)
        self.error = reason
        what = "daemon unreachable: " if unreachable else ""
        self._set_header(f"{self.url} · {what}{reason} (retrying)", True)

    def show_status(self, status: Status) -> None:
        """Render one /status snapshot."""
        self.status = status
        self.error = None
        self._set_header(f"{self.url} · {_headline(status)}", False)

        gpus = _items(status, "gpus")
        self.query_one("#gpus", DataTable).display = bool(gpus)
        cpus = self.query_one("#cpus", Static)
        cpus.display = not gpus
        self.query_one("#gpus-title", Static).update("GPUs" if gpus else "CPUs")
        if gpus:
            rows = []
            for i, gpu in enumerate(gpus):
                cells: list[str | Text] = list(_gpu_row(gpu))
                fraction = _fraction(gpu.get("memory_used"), gpu.get("memory_total"))
                colour = _usage_colour(fraction)
                cells[2] = Text(str(cells[2]), style=colour)
                rows.append((f"gpu-{gpu.get('index', i)}", cells))
            _fill(self.query_one("#gpus", DataTable), GPU_COLUMNS, rows)
        else:
            cpus.update(_cpu_line(status))

        replica_rows = []
        for replica in _items(status, "replicas"):
            cells = list(_replica_row(replica))
            cells[3] = Text(str(cells[3]), style=STATE_STYLES.get(str(cells[3]), ""))
            replica_rows.append((str(replica.get("id", "")), cells))
        _fill(self.query_one("#replicas", DataTable), REPLICA_COLUMNS, replica_rows)

        model_rows = [
            (str(m.get("name", "")), list(_model_row(m))) for m in _items(status, "models")
        ]
        _fill(self.query_one("#queues", DataTable), MODEL_COLUMNS, model_rows)

        events = _items(status, "events")[-EVENTS_SHOWN:]
        event_rows = []
        for i, event in enumerate(reversed(events)):
            cells = list(_event_row(event))
            cells[1] = Text(str(cells[1]), style=EVENT_STYLES.get(str(cells[1]), ""))
            event_rows.append((f"{event.get('time')}:{len(events) - i}", cells))
        _fill(self.query_one("#events", DataTable), EVENT_COLUMNS, event_rows)

    # ---- actions -------------------------------------------------------------

    def selected_replica(self) -> str | None:
        """The id of the replica under the cursor."""
        table = self.query_one("#replicas", DataTable)
        if table.row_count == 0:
            return None
        row = min(table.cursor_row, table.row_count - 1)
        key = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        return str(key) if key is not None else None

    def action_restart(self) -> None:
        """Restart the selected replica."""
        self._admin("restart")

    def action_drain(self) -> None:
        """Drain the selected replica."""
        self._admin("drain")

    def _admin(self, verb: str) -> None:
        replica = self.selected_replica()
        if replica is None:
            self.notify("no replica selected", severity="warning")
            return
        self.post_admin(replica, verb)

    @work(group="admin", exit_on_error=False)
    async def post_admin(self, replica: str, verb: str) -> None:
        """POST /admin/replicas/{id}/{verb} with the admin token."""
        path = f"/admin/replicas/{quote(replica.replace('/', ':'), safe=':')}/{verb}"
        self.notify(f"{verb} {replica}: asked")
        try:
            assert self._session is not None
            # a drain answers once the replica's requests are done (up to drain_timeout)
            timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT)
            async with self._session.post(
                self.url + path, headers=self._auth(), timeout=timeout
            ) as resp:
                body = (await resp.text()).strip()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.notify(f"{verb} {replica} failed: {_reason(exc, ADMIN_TIMEOUT)}", severity="error")
            return
        if status < 300:
            self.notify(f"{verb} {replica}: done")
        elif status in (401, 403) and not self.admin_token:
            self.notify(
                f"{verb} {replica}: HTTP {status}: {_error_message(body)} (no admin token given)",
                severity="error",
            )
        else:
            self.notify(
                f"{verb} {replica} failed: HTTP {status}: {_error_message(body)}", severity="error"
            )
        self.poll()


def _fill(
    table: DataTable[Any], columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]]
) -> None:
    """Show rows in table: update cells in place when the keys are unchanged, else rebuild."""
    keys = [key for key, _ in rows]
    if [row_key.value for row_key in table.rows] == keys:
        for key, cells in rows:
            current = table.get_row(key)
            for column, old, new in zip(columns, current, cells, strict=False):
                if str(old) != str(new) or type(old) is not type(new):
                    table.update_cell(key, column, new)
        return
    selected: str | None = None
    if table.cursor_type == "row" and table.row_count:
        row = min(table.cursor_row, table.row_count - 1)
        value = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        selected = str(value) if value is not None else None
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected is not None and selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False)


if __name__ == "__main__":  # pragma: no cover - manual use: python -m supervisor.tui URL [TOKEN]
    import sys

    TopApp(
        sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080",
        sys.argv[2] if len(sys.argv) > 2 else None,
    ).run()
