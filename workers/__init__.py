"""How users reach the engine: the Ray Serve app (``app``, ``deployment``, ``ingress``), its HTTP API
(``api``), configuration (``config``), start-up (``launch``), benchmark Ray Jobs (``jobs``, ``bench_job``)
and the ``vlmguard serve`` / ``vlmguard job`` commands (``cli``). See ``workers/README.md``.

Submodules import Ray lazily where they can; ``import vlmguard.workers`` itself is cheap.
"""
