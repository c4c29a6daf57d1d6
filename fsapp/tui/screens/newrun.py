"""The New-run screen: a preset, the components, their parameters, checked as you type."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Select, Static

from fsapp.config import PRESET_DESCRIPTIONS, PRESETS, Config, resolved_tables, to_toml
from fsapp.errors import FsappError
from fsapp.tui import form
from fsapp.tui.datacheck import data_problem
from fsapp.tui.messages import StartRun
from fsapp.tui.widgets import Field

HINTS = {
    "attacks": "specs separated by spaces, e.g. pgd:steps=20 cw:steps=20",
    "epsilon": "training budget (Linf), e.g. 8/255",
    "eval_eps": "live evaluation budget",
    "eval_n": "held-out samples evaluated after each epoch (0: none)",
    "train_limit": "0: every training sample",
    "device": "auto, cpu, cuda or cuda:N",
    "step_size": "the perturbation's step, e.g. 8/255",
    "loss": "soft-ce (the paper's, with label smoothing) or ce",
    "label_smoothing": "0 <= s < 1 (soft-ce)",
    "milestones": "epochs where lr is multiplied by gamma, e.g. [60, 90]",
    "seed": "the run's seed (data order, init, attacks)",
    "name": "empty: <time>-<perturbation>-<dataset>",
}


class NewRunScreen(Screen[None]):
    """Build a configuration from the registry and the presets, then start it or save it."""

    BINDINGS = [
        Binding("ctrl+r", "start", "Start"),
        Binding("ctrl+s", "save", "Save TOML", tooltip="save the resolved config as TOML"),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, runs_dir: Path, preset: str = "demo") -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.preset = preset
        self.inputs: dict[str, list[tuple[form.ParamRow, Input]]] = {}
        self.checked: list[str] = []
        self.config: Config | None = None
        self.error = ""
        self._building = False
        self.data_key = ""
        self.data_error: str | None = None  # None: not known yet

    # -- layout --------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        from fsapp.plugins import get_registry

        registry = get_registry()
        values = form.initial_values(self.preset)
        yield Header()
        with VerticalScroll(id="form"):
            yield Field("preset", Select([(Text(p), p) for p in PRESETS], value=self.preset, allow_blank=False,
                                         compact=True, id="preset"))
            yield Static(Text(PRESET_DESCRIPTIONS.get(self.preset, "")), id="preset-help", classes="hint")
            for fid, kind, _ in form.COMPONENTS:
                names = registry.names(kind)
                yield Field(fid, Select([(Text(n), n) for n in names], value=values[fid], allow_blank=False,
                                        compact=True, id=fid))
            for fid, label, _ in form.FIELDS:
                yield Field(label, Input(values[fid], placeholder=HINTS.get(fid, ""), compact=True, id=fid,
                                         tooltip=HINTS.get(fid)))
            yield Field("more --set", Input("", placeholder="section.key=value ... e.g. run.log_every=5",
                                            compact=True, id="extra"))
            for fid, _, _ in form.COMPONENTS:
                yield Static(id=f"title-{fid}", classes="section")
                yield Vertical(id=f"params-{fid}", classes="params")
        yield Static(id="status")
        with Horizontal(id="actions"):
            yield Button("Start (ctrl+r)", variant="success", id="start", compact=True)
            yield Button("Save TOML (ctrl+s)", id="save", compact=True)
            yield Input(str(self.runs_dir / f"{self.preset}.toml"), compact=True, id="save-path")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = "new run"
        for fid, _, _ in form.COMPONENTS:
            await self.rebuild_params(fid)
        self.query_one("#preset", Select).focus()
        self.check()

    async def rebuild_params(self, fid: str) -> None:
        """Replace the parameter inputs of component ``fid`` with the chosen component's."""
        kind = dict((f, k) for f, k, _ in form.COMPONENTS)[fid]
        name = str(self.query_one(f"#{fid}", Select).value)
        rows = form.param_rows(kind, name, self.preset)
        box = self.query_one(f"#params-{fid}", Vertical)
        await box.remove_children()
        self.query_one(f"#title-{fid}", Static).update(
            Text(f"{fid} '{name}' parameters" + ("" if rows else ": none")))
        inputs = [(row, Input(row.initial, placeholder=f"{row.type}, default {row.default or 'none'}",
                              compact=True, id=f"param-{fid}-{row.key}",
                              tooltip=f"{row.dotted}: {row.type}, default {row.default or 'none'}"))
                  for row in rows]
        self.inputs[fid] = inputs
        await box.mount_all([Field(row.key, widget) for row, widget in inputs])

    # -- state ---------------------------------------------------------------------------------
    def values(self) -> dict[str, str]:
        out = {fid: str(self.query_one(f"#{fid}", Select).value) for fid, _, _ in form.COMPONENTS}
        out.update({fid: self.query_one(f"#{fid}", Input).value for fid, _, _ in form.FIELDS})
        return out

    def param_values(self) -> list[tuple[form.ParamRow, str]]:
        return [(row, widget.value) for inputs in self.inputs.values() for row, widget in inputs]

    def overrides(self) -> list[str]:
        """The ``--set`` items equivalent to the form."""
        extra = self.query_one("#extra", Input).value
        return form.overrides(self.values(), self.param_values(), extra, runs_dir=self.runs_dir)

    def check(self) -> Config | None:
        """Validate with the CLI's code; show its message under the form."""
        status = self.query_one("#status", Static)
        try:
            sets = [f"preset {self.preset}"] + self.overrides()
            if sets == self.checked and self.config is not None:
                return self.config
            self.checked = sets
            self.config = form.validate(self.preset, sets[1:])
        except FsappError as exc:
            self.config, self.error = None, str(exc)
            status.update(Text(f"✗ {exc}"))
            status.set_class(True, "-error")
            self.mark_invalid(str(exc))
            return None
        self.error = ""
        self.mark_invalid("")
        cfg = self.config
        key = f"{cfg.data.name} {sorted(cfg.extras.get('data', {}).items())}"
        if key != self.data_key:
            self.data_key, self.data_error = key, None
            self.check_data(cfg, key)
        self.show_valid()
        return cfg

    def show_valid(self) -> None:
        """The validation line for a valid form: what would run, or why its data is missing."""
        cfg = self.config
        if cfg is None:
            return
        status = self.query_one("#status", Static)
        bad = bool(self.data_error)
        self.query_one("#dataset", Select).set_class(bad, "-invalid")
        status.set_class(bad, "-error")
        if bad:
            status.update(Text(f"✗ {self.data_error}"))
            return
        data = "data: checking…" if self.data_error is None else "data found"
        status.update(Text(f"✓ valid: {cfg.method.perturbation} on {cfg.data.name} with {cfg.model.name}, "
                           f"{cfg.schedule.epochs} epochs, batch {cfg.data.batch_size}, "
                           f"eval {len(cfg.eval.attacks)} attacks on {cfg.eval.n} samples · {data}"))

    @work(thread=True, group="datacheck", exclusive=True, exit_on_error=False)
    def check_data(self, cfg: Config, key: str) -> None:
        """Look for the dataset's files off the UI thread."""
        problem = data_problem(cfg) or ""
        self.app.call_from_thread(self.data_checked, key, problem)

    def data_checked(self, key: str, problem: str) -> None:
        if key == self.data_key:
            self.data_error = problem
            self.show_valid()

    def mark_invalid(self, message: str) -> None:
        """Flag the inputs that ``message`` names (``schedule.epochs``, ``[schedule]: epochs``...)."""
        for fid, _, dotted in form.FIELDS:
            bad = form.mentions(message, dotted) or (fid == "attacks" and "attack '" in message)
            self.query_one(f"#{fid}", Input).set_class(bad, "-invalid")
        for inputs in self.inputs.values():
            for row, widget in inputs:
                widget.set_class(form.mentions(message, row.dotted), "-invalid")

    # -- events --------------------------------------------------------------------------------
    @on(Select.Changed)
    async def select_changed(self, event: Select.Changed) -> None:
        if self._building or event.select.id is None:
            return
        if event.select.id == "preset":
            if str(event.value) != self.preset:
                await self.load_preset(str(event.value))
            return
        if event.select.id in {f for f, _, _ in form.COMPONENTS}:
            await self.rebuild_params(event.select.id)
        self.check()

    @on(Input.Changed)
    def input_changed(self, event: Input.Changed) -> None:
        if not self._building and event.input.id != "save-path":
            self.check()

    async def load_preset(self, preset: str) -> None:
        """Reset every field to ``preset``'s values."""
        self._building = True
        try:
            self.preset = preset
            values = form.initial_values(preset)
            for fid, _, _ in form.COMPONENTS:
                self.query_one(f"#{fid}", Select).value = values[fid]
            for fid, _, _ in form.FIELDS:
                self.query_one(f"#{fid}", Input).value = values[fid]
            self.query_one("#preset-help", Static).update(Text(PRESET_DESCRIPTIONS.get(preset, "")))
            self.query_one("#save-path", Input).value = str(self.runs_dir / f"{preset}.toml")
            for fid, _, _ in form.COMPONENTS:
                await self.rebuild_params(fid)
        finally:
            self.call_after_refresh(self._done_building)

    def _done_building(self) -> None:
        self._building = False
        self.check()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        elif event.button.id == "save":
            self.action_save()

    def palette_commands(self) -> list[tuple[str, str, str]]:
        return [
            ("Start the run", "Train the configuration in the form", "start"),
            ("Save the config as TOML", "Write the resolved configuration", "save"),
        ]

    def action_start(self) -> None:
        cfg = self.check()
        if cfg is None:
            self.notify(self.error, title="not started", severity="error", markup=False)
            return
        if self.data_error is None:  # not checked yet: the look at the files is quick
            self.data_error = data_problem(cfg) or ""
            self.show_valid()
        if self.data_error:
            self.notify(self.data_error, title="not started", severity="error", markup=False)
            self.query_one("#dataset", Select).focus()
            return
        self.post_message(StartRun(cfg))

    def action_save(self) -> None:
        cfg = self.check()
        if cfg is None:
            self.notify(self.error, title="not saved", severity="error", markup=False)
            return
        target = Path(self.query_one("#save-path", Input).value.strip() or "config.toml")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(to_toml(resolved_tables(cfg)), encoding="utf-8")
        except OSError as exc:
            self.notify(f"cannot write {target}: {exc.strerror}", severity="error", markup=False)
            return
        self.notify(f"saved {target}  (fsapp train {target})", markup=False)
