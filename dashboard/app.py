"""The vlmguard dashboard (Streamlit). Start it with ``vlmguard dashboard [--port P] [--db PATH] [--service URL]``.

Pages: Leaderboard (results database only), Playground, Chat, Jobs and Service (need the service).
"""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="vlmguard dashboard", page_icon=":material/shield:", layout="wide")

# Each page is a script of this package (runnable on its own, which is how the page tests drive them).
PAGES = [
    st.Page("leaderboard_page.py", title="Leaderboard", icon=":material/leaderboard:", url_path="leaderboard", default=True),
    st.Page("playground_page.py", title="Playground", icon=":material/science:", url_path="playground"),
    st.Page("chat_page.py", title="Chat", icon=":material/forum:", url_path="chat"),
    st.Page("jobs_page.py", title="Jobs", icon=":material/work:", url_path="jobs"),
    st.Page("service_page.py", title="Service", icon=":material/monitoring:", url_path="service"),
]

st.navigation(PAGES).run()
