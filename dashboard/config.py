"""Where the dashboard reads from: the results database, the service URL and the Ray Jobs API.

``vlmguard dashboard --db PATH --service URL`` passes these to the Streamlit process as environment
variables (Streamlit runs the app as a script, so the environment is the simplest channel); tests set
them the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlmguard.bench.db import DEFAULT_DB

ENV_DB = "VLMGUARD_DB"
ENV_SERVICE = "VLMGUARD_SERVICE_URL"
ENV_JOBS = "VLMGUARD_JOBS_ADDRESS"
ENV_API_KEY = "VLMGUARD_API_KEY"
ENV_IMAGE_DIRS = "VLMGUARD_IMAGE_DIRS"  # extra folders searched for drill-down images (os.pathsep list)
DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class DashboardConfig:
    db: Path
    service_url: str
    jobs_address: str | None
    api_key: str | None
    image_dirs: tuple[Path, ...]

    @classmethod
    def from_env(cls) -> "DashboardConfig":
        dirs = tuple(Path(p) for p in os.environ.get(ENV_IMAGE_DIRS, "").split(os.pathsep) if p)
        return cls(
            db=Path(os.environ.get(ENV_DB) or DEFAULT_DB).expanduser(),
            service_url=(os.environ.get(ENV_SERVICE) or DEFAULT_SERVICE_URL).rstrip("/"),
            jobs_address=os.environ.get(ENV_JOBS) or None,
            api_key=os.environ.get(ENV_API_KEY) or None,
            image_dirs=dirs,
        )
