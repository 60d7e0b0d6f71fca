"""Service: what the running service has been doing, from its ``/metrics``: traffic, batching, failures and what
was done about them. Refreshes itself every few seconds while the page is open."""
from __future__ import annotations

import streamlit as st

from vlmguard.dashboard import charts
from vlmguard.dashboard import service_metrics as sm
from vlmguard.dashboard.ui import config, service_client, service_page

REFRESH_S = 5.0


def render() -> None:
    cfg = config()
    status = service_page(cfg, "Service", "This page", about="its traffic, batching and failures, from its /metrics")
    if status is None:
        return
    live = st.toggle(f"refresh every {REFRESH_S:g} s", value=True, key="svc_live")
    st.fragment(run_every=REFRESH_S if live else None)(_figures)(service_client(cfg))


def _figures(client) -> None:
    try:
        m = client.metrics()
    except Exception as e:  # noqa: BLE001 - shown on the page: the service went away, or refused /metrics
        st.error(f"The service's metrics could not be read: {getattr(e, 'message', None) or e}")
        return
    for title, figures in (("Traffic", sm.traffic(m)), ("Engine", sm.engine(m)),
                           ("Failures and recovery", sm.reliability(m))):
        st.subheader(title)
        for col, f in zip(st.columns(len(figures)), figures):
            col.metric(f.label, f.value, help=f.help)
    left, right = st.columns(2)
    with left:
        st.subheader("Requests by route")
        table = sm.requests_table(m)
        if table.empty:
            st.caption("No request answered yet.")
        else:
            st.table(table.set_index("route"))  # (a few rows: plain text, as a page read aloud or searched shows it)
        st.subheader("Latency")
        hist = sm.latency_histogram(m)
        if hist["requests"].sum():
            st.altair_chart(charts.latency_chart(hist), width="stretch")
        else:
            st.caption("No successful request yet.")
    with right:
        st.subheader("Batching")
        batches = sm.batch_table(m)
        if batches.empty:
            st.caption("No answer yet.")
        else:
            st.altair_chart(charts.batch_chart(batches), width="stretch")
            st.table(batches.set_index("requests together"))
    st.caption("Counts are this process of the API's since it started: behind several API processes (a model's "
               "replicas, or `ingress_replicas`), each reading comes from the one that answered it.")


if __name__ == "__main__":
    render()
