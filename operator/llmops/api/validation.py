"""A spec as the API defines it, or every way it is wrong, each naming its field by its YAML path."""

from __future__ import annotations

import re
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

OWN_PATH = re.compile(r"^spec[\w.\[\]-]*: ")   # a validator's message that starts by naming its field


def spec_errors(error: ValidationError) -> str:
    """pydantic's errors as one sentence, each naming its field by its YAML path once."""
    parts = []
    for e in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        text = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        if not where:   # a rule across fields: its message names them
            parts.append(text if text.startswith("spec") else f"spec: {text}")
            continue
        text = OWN_PATH.sub("", text)   # the location names the field already
        parts.append(f"spec.{text}" if text.startswith(where[1:] + ".") else f"spec{where}: {text}")
    return "; ".join(parts)


def validated(model: type[BaseModel], body: Mapping[str, Any]) -> tuple[Any, str]:
    """The resource's spec through its model, and "" ; or None and what is wrong with it."""
    try:
        return model.model_validate(body.get("spec") or {}), ""
    except ValidationError as e:
        return None, spec_errors(e)
