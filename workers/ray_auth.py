"""Ray token authentication when joining a cluster (local clusters use it by default since Ray 2.5x).

``ray start`` / ``ray.init()`` save the cluster token in ``~/.ray/auth_token``; a process that *joins* the
cluster (``ray.init(address=...)``, ``JobSubmissionClient``) sends it only in token mode. This turns token
mode on when a token is available and ``RAY_AUTH_MODE`` does not say otherwise (what Ray's own CLI does).
"""
from __future__ import annotations

import os
from pathlib import Path


def use_local_auth_token() -> None:
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token_path:
        try:
            token_path = str(Path.home() / ".ray" / "auth_token")
        except RuntimeError:  # HOME unset and no passwd entry for this uid: no token saved in a home either
            token_path = ""
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_path and Path(token_path).is_file()):
        return
    try:  # Ray's own helper: sets RAY_AUTH_MODE=token and refreshes this process's already-loaded config
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    except ImportError:
        os.environ["RAY_AUTH_MODE"] = "token"
