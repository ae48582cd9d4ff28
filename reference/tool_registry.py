"""The reference Tool Registry: resolves tool names to the definitions of the reference tool
catalogue (reference.tools). The catalogue is the same for every tenant."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reference import fields
from reference.tools import ToolBox
from tools.v1 import tools_pb2, tools_pb2_grpc

if TYPE_CHECKING:
    from reference.fields import Context

# Names one request may resolve.
MAX_NAMES = 64


class ToolRegistryServicer(tools_pb2_grpc.ToolRegistryServiceServicer):
    def __init__(self, toolbox: ToolBox) -> None:
        self.toolbox = toolbox

    async def ResolveTools(
        self, request: tools_pb2.ResolveToolsRequest, context: Context
    ) -> tools_pb2.ResolveToolsResponse:
        async with fields.checked(context):
            fields.idents(request, "tenant_id")
            fields.count(request.names, "names", minimum=1, maximum=MAX_NAMES)
            for index, name in enumerate(request.names):
                fields.text(name, f"names[{index}]", max_chars=fields.TOOL_NAME_CHARS)
            try:
                specs = self.toolbox.resolve(request.names)
            except KeyError as unknown:
                raise fields.NotFound("names", f"no tool {unknown.args[0]!r}") from None
        return tools_pb2.ResolveToolsResponse(
            tools=[
                tools_pb2.ToolDefinition(
                    name=spec.name,
                    description=spec.description,
                    parameters_json_schema=spec.parameters_json_schema,
                )
                for spec in specs
            ]
        )
