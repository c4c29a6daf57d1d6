"""Command palette entries: the app's actions plus those of the screen the palette opened over."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider


class FsappCommands(Provider):
    """Every action of the app and of the current screen, as palette commands.

    The app and each screen list theirs in ``palette_commands()`` as ``(title, help, action)``.
    """

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        out = []
        for owner in (self.screen, self.app):
            listing = getattr(owner, "palette_commands", None)
            if listing is None:
                continue
            prefix = "" if owner is self.app else "screen."
            keys = {b.action: b.key_display or b.key.split(",")[0] for b in getattr(owner, "BINDINGS", [])
                    if isinstance(b, Binding)}
            for title, help_text, action in listing():
                target = action if "." in action else prefix + action
                key = keys.get(action) or keys.get(action.removeprefix("app."))
                shown = f"{help_text} · key {key}" if key else help_text
                out.append((title, shown, partial(self.app.run_action, target)))
        return out

    async def discover(self) -> Hits:
        for title, help_text, command in self._commands():
            yield DiscoveryHit(title, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, command in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), command, help=help_text)
