"""The Plugins screen: every component by kind, its parameters and plugin, and failed plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from fsapp.registry import KINDS
from fsapp.tui.form import MODEL_BASE, to_text

if TYPE_CHECKING:
    from fsapp.plugins import Registry


def param_text(value: object) -> str:
    """A default as a user would type it (``8/255``); None as a dash."""
    return "—" if value is None else to_text(value)


class PluginsScreen(Screen[None]):
    """Components and plugins, as ``fsapp plugins list`` shows them."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, registry: Registry | None = None) -> None:
        super().__init__()
        self._registry = registry

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from fsapp.plugins import get_registry

            self._registry = get_registry()
        return self._registry

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="components", zebra_stripes=True, cursor_type="row")
        yield Static(id="component-detail")
        yield Static(id="failures")
        yield Footer()

    def on_mount(self) -> None:
        reg = self.registry
        self.sub_title = "plugins: " + ", ".join(f"{name} {ver}" for name, ver in reg.plugins.items())
        table = self.query_one("#components", DataTable)
        for label in ("kind", "name", "plugin", "parameters (defaults)"):
            table.add_column(label, key=label)
        for kind in KINDS:
            for name in reg.names(kind):
                c = reg.get(kind, name)
                rows = [r for r in c.param_table() if kind != "model" or r["name"] not in MODEL_BASE]
                params = ", ".join(f"{r['name']}={param_text(r['default'])}" for r in rows)
                table.add_row(kind, Text(name, style="bold"), Text(c.plugin), Text(params or "—"), key=f"{kind}:{name}")
        failures = self.query_one("#failures", Static)
        if reg.failures:
            failures.update(Text("\n").join(Text.assemble((f"✗ {f.plugin}", "bold red"), f": {f.reason}")
                                             for f in reg.failures))
            failures.add_class("-error")
        else:
            failures.update(Text.assemble(("✓", "green"), " every installed plugin loaded"))
        table.focus()
        self.show_detail(f"{KINDS[0]}:{reg.names(KINDS[0])[0]}" if reg.names(KINDS[0]) else "")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_detail(str(event.row_key.value))

    def show_detail(self, key: str) -> None:
        """The highlighted component: description and each parameter with type and default."""
        detail = self.query_one("#component-detail", Static)
        if ":" not in key:
            detail.update("")
            return
        kind, _, name = key.partition(":")
        c = self.registry.get(kind, name)
        params = [Text.assemble((r["name"], "bold"), f" {r['type']} = {param_text(r['default'])}")
                  for r in c.param_table()]
        detail.update(Text.assemble((f"{kind} {name}", "bold"), " from ", (c.plugin, "italic"),
                                    f": {c.description or 'no description'}\n",
                                    Text("  ").join(params) if params else "no parameters"))
