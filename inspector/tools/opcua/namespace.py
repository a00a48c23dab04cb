"""The bridge's nodes on an asyncua server, laid out for a PLC engineer to browse:

    Objects/Inspector/Lines/<line>/<camera>/Verdict, AnomalyProbability, FrameId, Model, ModelVersion,
                                            InspectedAt, CapturedAt, ErrorCode, PassCount, FailCount,
                                            ErrorCount, Reject
    Objects/Inspector/Bridge/BrokerConnected, ResultsReceived, ResultsMalformed, ResultsOverCap

Every node id is a string in the bridge's namespace that spells its path from Inspector
(`ns=2;s=Lines/line1/cam1/Reject`), so a controller can be configured with it before the first verdict;
a line id holds no '/', so the path cannot be ambiguous. Clients read and subscribe; nothing is writable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua

from inspector.tools.opcua.board import Source, SourceState

NO_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)  # OPC UA's null DateTime
V = ua.VariantType

# name: (type, initial value, the value from a source's state); one table, the layout derives from it.
SOURCE_VARIABLES: dict[str, tuple[ua.VariantType, Any, Callable[[SourceState], Any]]] = {
    "Verdict": (V.String, "", lambda s: s.result.verdict if s.result else ""),
    "AnomalyProbability": (V.Double, math.nan,
                           lambda s: s.result.probability if s.result and s.result.probability is not None
                           else math.nan),
    "FrameId": (V.String, "", lambda s: s.result.frame_id if s.result else ""),
    "Model": (V.String, "", lambda s: s.result.model if s.result else ""),
    "ModelVersion": (V.String, "", lambda s: s.result.version if s.result else ""),
    "InspectedAt": (V.DateTime, NO_TIME, lambda s: (s.result and s.result.inspected_at) or NO_TIME),
    "CapturedAt": (V.DateTime, NO_TIME, lambda s: (s.result and s.result.captured_at) or NO_TIME),
    "ErrorCode": (V.String, "", lambda s: s.result.error_code if s.result else ""),
    "PassCount": (V.UInt64, 0, lambda s: s.counts["pass"]),
    "FailCount": (V.UInt64, 0, lambda s: s.counts["fail"]),
    "ErrorCount": (V.UInt64, 0, lambda s: s.counts["error"]),
    "Reject": (V.Boolean, False, lambda s: s.rejecting),
}
BRIDGE_VARIABLES: dict[str, tuple[ua.VariantType, Any]] = {
    "BrokerConnected": (V.Boolean, False),
    "ResultsReceived": (V.UInt64, 0),
    "ResultsMalformed": (V.UInt64, 0),
    "ResultsOverCap": (V.UInt64, 0),
}


def node_id(index: int, *path: str) -> ua.NodeId:
    return ua.NodeId("/".join(path), index)


class Namespace:
    """Creates a source's nodes when it is first seen and writes its values after every result."""

    def __init__(self, server: Server, index: int) -> None:
        self.server, self.index = server, index
        self._lines: dict[str, Any] = {}
        self._sources: set[Source] = set()

    async def build(self) -> None:
        objects = self.server.nodes.objects
        root = await objects.add_object(node_id(self.index, "Inspector"), ua.QualifiedName("Inspector", self.index))
        self._lines_folder = await root.add_folder(node_id(self.index, "Lines"), ua.QualifiedName("Lines", self.index))
        bridge = await root.add_object(node_id(self.index, "Bridge"), ua.QualifiedName("Bridge", self.index))
        for name, (kind, initial) in BRIDGE_VARIABLES.items():
            await bridge.add_variable(node_id(self.index, "Bridge", name), ua.QualifiedName(name, self.index),
                                      ua.Variant(initial, kind))

    async def add_source(self, source: Source, state: SourceState) -> None:
        """The nodes of a source, with its state's values; nothing when they exist already."""
        if source in self._sources:
            return
        line, camera = source
        if line not in self._lines:
            self._lines[line] = await self._lines_folder.add_object(
                node_id(self.index, "Lines", line), ua.QualifiedName(line, self.index))
        folder = await self._lines[line].add_object(node_id(self.index, "Lines", line, camera),
                                                    ua.QualifiedName(camera, self.index))
        for name, (kind, _, value) in SOURCE_VARIABLES.items():
            await folder.add_variable(node_id(self.index, "Lines", line, camera, name),
                                      ua.QualifiedName(name, self.index), ua.Variant(value(state), kind))
        self._sources.add(source)

    async def write_source(self, source: Source, state: SourceState) -> None:
        """Every variable of a source from its state (Reject last, once the values it acts on are there)."""
        for name, (kind, _, value) in SOURCE_VARIABLES.items():
            await self._write(node_id(self.index, "Lines", *source, name), value(state), kind)

    async def write_reject(self, source: Source, rejecting: bool) -> None:
        await self._write(node_id(self.index, "Lines", *source, "Reject"), rejecting, V.Boolean)

    async def write_bridge(self, name: str, value: Any) -> None:
        await self._write(node_id(self.index, "Bridge", name), value, BRIDGE_VARIABLES[name][0])

    async def _write(self, node: ua.NodeId, value: Any, kind: ua.VariantType) -> None:
        await self.server.write_attribute_value(node, ua.DataValue(ua.Variant(value, kind)))
