"""Streamlit pieces shared by the pages: configuration, the service/jobs handles, method parameter forms."""
from __future__ import annotations

import json
import math
from typing import Any

import streamlit as st

from vlmguard.dashboard.config import ENV_API_KEY, DashboardConfig
from vlmguard.dashboard.service import (
    CLIENT_KEY,
    JOBS_KEY,
    GenerationClient,
    JobsBackend,
    RayJobsBackend,
    ServiceStatus,
    make_client,
    model_label,
    probe_service,
)


def config() -> DashboardConfig:
    return DashboardConfig.from_env()


def service_client(cfg: DashboardConfig) -> GenerationClient:
    injected = st.session_state.get(CLIENT_KEY)
    return injected if injected is not None else make_client(cfg)


def service_status(cfg: DashboardConfig) -> ServiceStatus:
    injected = st.session_state.get(CLIENT_KEY)
    client = injected if injected is not None else make_client(cfg, probe=True)
    return probe_service(client, cfg.service_url)


def service_notice(status: ServiceStatus, what: str) -> None:
    if status.refused_key:  # it is up: starting it again is no help
        st.warning(
            f"**The vlmguard service at `{status.url}` refused the dashboard's API key** ({status.message}). "
            f"{what} needs it.\n\nStart the dashboard with the service's key in `{ENV_API_KEY}` (one of the keys of "
            "its `api_keys` / `api_key_env`). The **Leaderboard** works without it.",
            icon=":material/warning:",
        )
        return
    st.warning(
        f"**The vlmguard service is not reachable** at `{status.url}` ({status.message}). {what} needs it.\n\n"
        "Start it with `vlmguard serve` (or `make demo`), or point the dashboard at a running one with "
        "`vlmguard dashboard --service URL`. The **Leaderboard** works without it.",
        icon=":material/warning:",
    )


def service_page(cfg: DashboardConfig, title: str, what: str, about: str = "") -> ServiceStatus | None:
    """A page that needs the service: its title, then the service and its models in a caption (and ``about``), or
    the notice that says why ``what`` cannot work; None then, and the page stops there."""
    st.title(title)
    status = service_status(cfg)
    if not status.ok:
        service_notice(status, what)
        return None
    models = ", ".join(model_label(m, status.facts.get(m)) for m in status.models)
    st.caption(f"Service: `{status.url}` · models: {models}" + (f" · {about}" if about else ""))
    return status


def jobs_backend(cfg: DashboardConfig) -> JobsBackend:
    injected = st.session_state.get(JOBS_KEY)
    return injected if injected is not None else RayJobsBackend(cfg.jobs_address)


def number_bounds(prop: dict[str, Any]) -> tuple[float | None, float | None]:
    """A number parameter's (lowest, highest) value a widget may take from its JSON schema: an exclusive bound
    (``gt=0``: ``exclusiveMinimum``) becomes the nearest float inside it, so the widget cannot offer the bound itself,
    which the service refuses."""
    lo = prop.get("minimum")
    if lo is None and prop.get("exclusiveMinimum") is not None:
        lo = math.nextafter(float(prop["exclusiveMinimum"]), math.inf)
    hi = prop.get("maximum")
    if hi is None and prop.get("exclusiveMaximum") is not None:
        hi = math.nextafter(float(prop["exclusiveMaximum"]), -math.inf)
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


@st.cache_resource(show_spinner=False)
def method_schemas() -> dict[str, dict[str, dict[str, Any]]]:
    """``{"pruning": {name: json schema of Params}, "decoding": {...}}`` from the method registries."""
    import vlmguard.decoding  # noqa: F401 - registers the decoders
    import vlmguard.pruning  # noqa: F401 - registers the pruners
    from vlmguard.decoding.registry import DECODERS
    from vlmguard.pruning.registry import PRUNERS

    return {
        "pruning": {n: PRUNERS.get(n).Params.model_json_schema() for n in PRUNERS.names()},
        "decoding": {n: DECODERS.get(n).Params.model_json_schema() for n in DECODERS.names()},
    }


def params_form(schema: dict[str, Any], key: str) -> dict[str, Any]:
    """Widgets for a method's parameters; returns only the values that differ from the defaults."""
    out: dict[str, Any] = {}
    props = schema.get("properties") or {}
    if not props:
        st.caption("no parameters")
        return out
    for name, p in props.items():
        default = p.get("default")
        label = name
        help_ = p.get("description")
        wkey = f"{key}.{name}"
        typ = p.get("type")
        if "enum" in p:
            opts = list(p["enum"])
            val = st.selectbox(label, opts, index=opts.index(default) if default in opts else 0, key=wkey, help=help_)
        elif typ == "boolean":
            val = st.checkbox(label, value=bool(default), key=wkey, help=help_)
        elif typ == "integer":
            val = int(st.number_input(label, value=int(default or 0), step=1, key=wkey, help=help_,
                                      min_value=p.get("minimum"), max_value=p.get("maximum")))
        elif typ == "number":
            lo, hi = number_bounds(p)
            val = float(st.number_input(label, value=float(default or 0.0), key=wkey, help=help_, format="%.4g",
                                        min_value=lo, max_value=hi))
        elif typ == "string":
            val = st.text_input(label, value=default or "", key=wkey, help=help_)
        else:  # lists / optional values: JSON text
            text = st.text_input(f"{label} (JSON)", value=json.dumps(default), key=wkey, help=help_)
            try:
                val = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                st.error(f"{name}: not valid JSON")
                val = default
        if val != default:
            out[name] = val
    return out
