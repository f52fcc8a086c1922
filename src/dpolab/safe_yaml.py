"""The one YAML reader for configs: PyYAML's safe loader without anchors and aliases.

A 532-byte alias bomb (``a: &a [..]``, ``b: [*a, *a, ...]``, nested) expands to gigabytes in
PyYAML's safe loader; configs never need aliases, so any anchor or alias is refused with its line. A key given
twice in one mapping, which PyYAML resolves silently by keeping the last, is refused with both lines.
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

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys silently: `beta: 0.1` then `beta: 0.5` would train with 0.5.
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not None:
                    raise yaml.YAMLError(
                        f"line {key_node.start_mark.line + 1}: the key {key!r} appears twice in one mapping "
                        f"(first on line {first}); YAML would keep only the last"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load(text: str, source: str = "YAML"):
    """``text`` parsed as YAML (safe types only, no aliases); ``ValueError`` naming ``source`` otherwise."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: invalid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"{source}: invalid YAML: nested too deeply") from None
