"""The help screen: every screen's keys (read from their bindings), the palette, the files."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Markdown

from fsapp.tui.screens.compare import CompareScreen
from fsapp.tui.screens.dashboard import DashboardScreen
from fsapp.tui.screens.evaluate import EvaluateScreen
from fsapp.tui.screens.newrun import NewRunScreen
from fsapp.tui.screens.plugins import PluginsScreen
from fsapp.tui.screens.report import ReportScreen
from fsapp.tui.screens.runs import RunsScreen

INTRO = """\
# fsapp keys

Everywhere: **?** help · **ctrl+p** command palette (every action is there) · **ctrl+t**
light/dark theme · **escape** back · **q** quit (while jobs run it asks, then stops each run with a
checkpoint so it can be resumed).
"""

OUTRO = """
The New-run form is checked as you type by the CLI's own code: the line under it shows what
`fsapp train --preset P --set ...` would say; *more --set* takes extra `section.key=value` items.
Every training and evaluation started here is its own `fsapp train` / `fsapp eval` process. Runs
started with `fsapp train` elsewhere appear on the Runs screen too, and the dashboard's keys
(pause, stop, checkpoint, evaluate now) work on them as well: they go through the run's control
channel, like `fsapp ctl RUN ACTION`. Evaluation reports go to `eval/` next to the model file, as
with `fsapp eval`.
"""


def _key(binding: Binding) -> str:
    return binding.key_display or binding.key.split(",")[0]


def keys_markdown(title: str, screen: type[Screen[object]]) -> str:
    """A screen's keys as a Markdown table: every binding with a description (hidden ones too)."""
    rows = [f"| **{_key(b)}** | {b.tooltip or b.description.lower()} |" for b in screen.BINDINGS
            if isinstance(b, Binding) and b.description]
    return f"## {title}\n\n| key | what it does |\n|---|---|\n" + "\n".join(rows) + "\n"


def help_markdown() -> str:
    """The whole help text."""
    screens = [("Runs", RunsScreen), ("Dashboard", DashboardScreen), ("Report", ReportScreen),
               ("New run", NewRunScreen), ("Evaluate", EvaluateScreen), ("Compare", CompareScreen),
               ("Plugins", PluginsScreen)]
    tables = [keys_markdown(title, cls) for title, cls in screens]
    extra = ("On the Runs screen **enter** opens a run and the pane under the table shows the selected run "
             "in full. In the dashboard, keys the run's state does not allow (pause on a finished run) are "
             "hidden; a robustness row marked * comes from *evaluate now*; flags and a CE−margin gap above "
             "5% are red, and tab 2 explains each flag from docs/EVALUATION.md.")
    return INTRO + "\n" + "\n".join(tables) + "\n" + extra + "\n" + OUTRO


class HelpScreen(ModalScreen[None]):
    """Keys of every screen."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(help_markdown())
