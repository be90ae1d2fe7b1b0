"""The Hub model card (README.md) of an adapter: front matter for the Hub, and how it was made."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(value: str | None) -> bool:
    """A Hub repo id (``org/name`` or ``name``), never a local path: the Hub rejects those."""
    if not value or not _HUB_ID.match(value) or ".." in value or "--" in value:
        return False
    return not Path(value).expanduser().exists()


def check_base_model_id(value: str | None) -> None:
    from ..errors import LoraToolError

    if value is not None and not is_hub_id(value):
        raise LoraToolError(
            f"--base-model-id {value!r} is not a Hub repo id",
            fix="give the base's id on the Hub (like meta-llama/Llama-3.2-1B), never a local path",
        )


# parameters that name local files: the card shows their last component only (the full paths stay
# in the provenance record of the weights file, which the user chose to publish)
_PATH_PARAMETERS = ("base", "finetuned", "adapters")


def _public(key: str, value: Any) -> Any:
    if key not in _PATH_PARAMETERS:
        return value
    if isinstance(value, str):
        return Path(value).name
    if isinstance(value, list):
        return [{**v, "path": Path(str(v.get("path", ""))).name} if isinstance(v, dict) else v for v in value]
    return value


def render_card(config: dict[str, Any], record: dict[str, Any] | None, *, base_model_id: str | None = None) -> str:
    """README.md for an adapter: YAML front matter and a body with provenance and the report."""
    base = base_model_id if is_hub_id(base_model_id) else None
    if base is None and is_hub_id(config.get("base_model_name_or_path")):
        base = config["base_model_name_or_path"]
    front = ["---", "library_name: peft"]
    tags = ["lora", "loratool", "peft"]
    if base:
        front += [f"base_model: {json.dumps(base)}", "base_model_relation: adapter"]
        tags.append(f"base_model:adapter:{base}")
    front += ["tags:"] + [f"- {json.dumps(t)}" for t in tags] + ["---", ""]
    body = [f"# LoRA adapter{f' for {base}' if base else ''}", ""]
    ranks = sorted({int(r) for r in [config.get("r"), *(config.get("rank_pattern") or {}).values()] if r is not None})
    body.append(f"A LoRA adapter (ranks {', '.join(map(str, ranks)) or '?'}) written by loratool.")
    body.append("")
    if base:
        body += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                 f"model = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
                 'model = PeftModel.from_pretrained(model, "<this repo>")', "```", ""]  # fmt: skip
    if record:
        body += ["## How it was made", ""]
        body.append(
            f"`loratool {record.get('operation')}` (loratool {record.get('version')}, {record.get('created')})."
        )
        params = {k: _public(k, v) for k, v in (record.get("parameters") or {}).items() if v is not None}
        if params:
            body += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(params.items()))]
        if record.get("inputs"):
            body += ["", "| input | sha256 |", "| --- | --- |"]
            body += [f"| `{Path(i['path']).name}` | `{i['sha256']}` |" for i in record["inputs"]]
        if record.get("report"):
            body += [
                "",
                "## Per-module report",
                "",
                "| module | rank | relative error | energy kept |",
                "| --- | ---: | ---: | ---: |",
            ]
            body += [
                f"| `{r['module']}` | {r['rank']} | {r['relative_error']:.3e} | {r['energy_kept']:.2%} |"
                for r in record["report"]
            ]
        body.append("")
    return "\n".join(front + body)
