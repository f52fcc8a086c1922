"""The one YAML reader for configs: PyYAML's safe loader without anchors and aliases.

A 532-byte alias bomb (``a: &a [..]``, ``b: [*a, *a, ...]``, nested) expands to gigabytes in
PyYAML's safe loader; configs never need aliases, so any anchor or alias is refused with its line.
"""

from __future__ import annotations

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not allowed in configs")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML anchors (&name) are not allowed in configs")
        return super().compose_node(parent, index)


def load(text: str, source: str = "YAML"):
    """``text`` parsed as YAML (safe types only, no aliases); ``ValueError`` naming ``source`` otherwise."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: invalid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"{source}: invalid YAML: nested too deeply") from None
