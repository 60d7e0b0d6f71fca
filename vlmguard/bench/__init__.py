"""Benchmarks: POPE, POPE-leading and CHAIR readers, parsers and metrics; the results database;
the resumable runner; reports. See ``../shared/benchmarks.md`` for the protocols reproduced here.

Modules (one job each):
  jsonio        JSON / JSON Lines reading with file:line errors
  pope_data     POPE question files (JSON Lines, SEEM JSON arrays, LLaVA's 8910-line file)
  pope_parsers  named answer parsers (``official`` default)
  pope_prompts  named prompt presets (LLaVA-1.5 protocol and variants)
  pope_metrics  accuracy / precision / recall / F1 / yes-ratio, joined by question id
  pope_leading  leading-query variants of POPE files and flip metrics (LQCD spec section 8)
  nltk_setup    the project-owned offline NLTK data directory
  chair_*       CHAIR synonyms, extraction, ground truth, scoring, truncation presets
  coco          COCO-format datasets (real COCO or SynthCOCO) through pycocotools
  datasets      resolving ``--dataset`` into images + question files + annotations
  db            the SQLite results database
  runner        ``run_benchmark``: batched, resumable, shardable
  sweep         methods x budgets x benchmarks from a YAML file
  report        tables, CSV and PNG plots from the database
  cli           ``vlmguard bench|score|report``
"""
