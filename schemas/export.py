"""Export the JSON Schemas of the wire contracts: ``python -m schemas.export [DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.campaigns import CampaignCompleted
from schemas.events import ProviderEvent
from schemas.parking import ParkingNotice
from schemas.send_request import SendRequest

MODELS: dict[str, type[BaseModel]] = {
    "send_request": SendRequest,
    "provider_event": ProviderEvent,
    "parking_notice": ParkingNotice,
    "campaign_completed": CampaignCompleted,
}

JSON_DIR = Path(__file__).parent / "json"


def render(model: type[BaseModel]) -> str:
    schema: dict[str, Any] = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MODELS.items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(model))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else JSON_DIR
    for p in export(target):
        print(p)
