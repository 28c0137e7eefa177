"""Where a benchmark writes its JSON report, and the header every report starts with.

    out = write_report("spec", device_name, args.smoke, args.out, {"rows": ..., "targets": ...})

The report goes to `--out` when given, else benchmarks/results/<name>_<device>_<date>.json (a
temporary folder for `--smoke` runs, which check the script and are not results), and a copy to
the folder `$OUT` names when that is set (the device tool brings back what a command writes
there). Every report starts with the device, the date, torch's version and whether it was a
smoke run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_label(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's architecture."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def write_report(name: str, device_name: str, smoke: bool, out: str, fields: dict[str, Any]) -> Path:
    """Write the header plus `fields` as JSON; returns the path written."""
    date = dt.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    default_dir = Path(tempfile.gettempdir()) if smoke else RESULTS
    path = Path(out) if out else default_dir / f"{name}_{slug}_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name, "date": date, "torch": torch.__version__, "smoke": smoke, **fields}
    path.write_text(json.dumps(report, indent=1, default=str))
    if os.environ.get("OUT"):
        copy = Path(os.environ["OUT"]) / path.name
        if copy.resolve() != path.resolve():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    return path
