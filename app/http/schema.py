"""The base of every request and response body: msgspec Structs, strict about unknown fields, documented as such."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
from litestar.plugins import OpenAPISchemaPlugin

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Schema
    from litestar.typing import FieldDefinition


class WireModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A JSON body on the API. Unknown fields are an error, so a client's typo is not ignored."""

    # JSON Schema keywords the field types cannot say (Litestar `Schema` attribute names, e.g.
    # {"max_properties": 1}), added to the model's OpenAPI schema.
    openapi_extra: ClassVar[Mapping[str, Any]] = {}


class WireModelSchemaPlugin(OpenAPISchemaPlugin):
    """A WireModel's OpenAPI schema as it decodes: `additionalProperties: false`, its docstring, its `openapi_extra`.

    Litestar's own msgspec plugin makes the schema; this one, consulted first, adds what it leaves out.
    """

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        """Every WireModel (not a union of them: each member gets its own schema)."""
        return not field_definition.is_union and field_definition.is_subclass_of(WireModel)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        """The schema Litestar's next plugin for msgspec Structs makes, with the model's own rules added."""
        struct_plugin = next(
            plugin
            for plugin in schema_creator.plugins
            if plugin is not self and schema_creator.plugin_supports_field(plugin, field_definition)
        )
        schema = struct_plugin.to_openapi_schema(field_definition, schema_creator)
        model: type[WireModel] = field_definition.type_
        schema.additional_properties = False
        if model.__doc__ and not schema.description:
            schema.description = inspect.cleandoc(model.__doc__)
        for name, value in model.openapi_extra.items():
            setattr(schema, name, value)
        return schema
