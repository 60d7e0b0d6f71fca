"""AdaptInfer keep-count schedules: which decoder layers prune, and how many visual tokens survive each.

Budget accounting (AdaptInfer / SparseVLM convention, used only to map a budget label to keep counts):
the label is the mean number of visual tokens per decoder layer, counting each pruning layer at its
post-prune count::

    official_avg = (l_1 * V + sum_s (l_{s+1} - l_s) * k_s) / L,   l_{S+1} = L

The tokens the GPU really processes ("actual" accounting, used for FLOPs and latency) count each
pruning layer at its pre-prune count (it runs on its input; its output is cut)::

    actual_avg = ((l_1 + 1) * V + sum_{s<S} (l_{s+1} - l_s) * k_s + (L - 1 - l_S) * k_S) / L

A stage whose k_s is >= the tokens still present is skipped (an explicit no-op).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from vlmguard.errors import InvalidInput

# Official LLaVA-1.5-7B table (32 layers, 576 visual tokens): stage layers and keep counts per label.
OFFICIAL_LAYERS_7B = (1, 10, 20)
OFFICIAL_KEEPS_7B = {128: (290, 72, 18), 64: (133, 27, 3), 48: (80, 24, 2), 32: (40, 12, 0),
                     192: (455, 114, 28)}  # 192 is our extension (spec section 2.1)
# Per-stage keep ratios of those rows (k1/V, k2/k1, k3/k2), used to scale to other models.
RATIO_PATTERNS = {label: (k[0] / 576, k[1] / k[0], (k[2] / k[1]) if k[1] else 0.0)
                  for label, k in OFFICIAL_KEEPS_7B.items()}
RELATIVE_DEPTHS = (0.03, 0.31, 0.64)
# The official Qwen2-VL-2B port (28 layers, text width 1536; spec section 2.2): stage layers and per-stage keep
# ratios, each applied to the count still present, k = max(1, min(floor(r * n), n)), per preset label.
QWEN2_VL_2B = ("qwen2_vl", 28, 1536)
QWEN2_VL_2B_LAYERS = (0, 9, 19)
QWEN2_VL_2B_RATIOS = {0.1: (0.17, 0.60, 0.30), 0.3: (0.50, 0.60, 0.30), 0.5: (0.70, 0.90, 0.30)}

# Stage layers found by ``vlmguard prune analyze`` for bundled models, keyed by
# (family, decoder layers, text hidden size, visual tokens per image).
# Not filled for the bundled tiny LLaVA: `vlmguard prune analyze --model tiny` gives histogram [0, 112, 0, 0]
# -> layers (1, 2), but with 4 layers and min_size 2 only the split after layer 1 is admissible, so that is
# by construction; the relative-depth rule (0, 2) is kept as its default (it is what the POPE numbers used).
# Use the analysis via `pruning_params={"schedule": "runs/adaptinfer_tiny_schedule.json"}`.
KNOWN_LAYERS: dict[tuple[str, int, int, int], tuple[int, ...]] = {}


@dataclass
class Schedule:
    layers: tuple[int, ...]
    keeps: tuple[int, ...]
    n_visual: int
    n_layers: int
    source: str

    @property
    def official_average(self) -> float:
        return official_average(self.layers, self.keeps, self.n_visual, self.n_layers)

    @property
    def actual_average(self) -> float:
        return actual_average(self.layers, self.keeps, self.n_visual, self.n_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["official_avg"] = round(self.official_average, 2)
        d["actual_avg"] = round(self.actual_average, 2)
        d["label_accounting"] = accounting_for(self.layers, self.n_layers)
        return d


def _effective(keeps: Sequence[int], n_visual: int) -> list[int]:
    """Counts actually left after each stage: a stage with k >= current count is skipped."""
    out, cur = [], n_visual
    for k in keeps:
        cur = cur if k >= cur else k
        out.append(cur)
    return out


def official_average(layers: Sequence[int], keeps: Sequence[int], n_visual: int, n_layers: int) -> float:
    """Mean visual tokens per layer, pruning layers counted at their post-prune count."""
    ks = _effective(keeps, n_visual)
    bounds = list(layers) + [n_layers]
    total = layers[0] * n_visual + sum((bounds[s + 1] - bounds[s]) * ks[s] for s in range(len(layers)))
    return total / n_layers


def actual_average(layers: Sequence[int], keeps: Sequence[int], n_visual: int, n_layers: int) -> float:
    """Mean visual tokens per layer as fed to the layers: a pruning layer still runs on its input."""
    ks = _effective(keeps, n_visual)
    per_layer = []
    cur = n_visual
    stage = 0
    for i in range(n_layers):
        per_layer.append(cur)
        if stage < len(layers) and layers[stage] == i:
            cur = ks[stage]
            stage += 1
    return sum(per_layer) / n_layers


def qwen2_vl_2b_preset(budget: int, n_visual: int) -> tuple[int, ...] | None:
    """Keep counts of the official Qwen2-VL-2B preset whose label (10 / 30 / 50% of V) is within 1% of V of
    ``budget``; None for other budgets (they are solved like any model's)."""
    frac = budget / n_visual
    label = next((lab for lab in QWEN2_VL_2B_RATIOS if abs(frac - lab) <= 0.01), None)
    if label is None:
        return None
    keeps, cur = [], n_visual
    for r in QWEN2_VL_2B_RATIOS[label]:
        cur = max(1, min(int(r * cur), cur))
        keeps.append(cur)
    return tuple(keeps)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Stage layers by relative depth (0.03 / 0.31 / 0.64 of L; two stages (0, 0.6 L) when L < 8)."""
    if n_layers < 2:
        raise InvalidInput("adaptinfer needs a model with at least 2 decoder layers")
    raw = [0.0, 0.6] if n_layers < 8 else list(RELATIVE_DEPTHS)
    out: list[int] = []
    for r in raw:
        li = min(int(round(r * n_layers)), n_layers - 2)
        while li in out and li < n_layers - 2:
            li += 1
        if li not in out:
            out.append(li)
    return tuple(sorted(out))


def ratio_pattern(budget: int, n_visual: int) -> tuple[float, ...]:
    """Per-stage ratio pattern of the official row whose budget fraction is nearest budget / V."""
    frac = budget / n_visual
    label = min(RATIO_PATTERNS, key=lambda lab: (abs(lab / 576 - frac), lab))
    return RATIO_PATTERNS[label]


def pruned_layers_average(layers: Sequence[int], keeps: Sequence[int], n_visual: int, n_layers: int) -> float:
    """Mean visual tokens fed to the layers after the first pruning layer (the "FastV @k" convention)."""
    ks = _effective(keeps, n_visual)
    fed, stage, cur = [], 0, n_visual
    for i in range(n_layers):
        if i > layers[0]:
            fed.append(cur)
        if stage < len(layers) and layers[stage] == i:
            cur = ks[stage]
            stage += 1
    return sum(fed) / max(len(fed), 1)


def accounting_for(layers: Sequence[int], n_layers: int) -> str:
    """"official" when the smallest standard label (64/576 of V) is reachable under it, else "pruned-layers".

    Shallow models cannot reach small labels under the official accounting when the first stage is not
    layer 0 (a 4-layer model pruning after layer 1 averages at least V / 4); there every label is read
    as the mean over the layers after the first cut, the convention of "FastV keeps k from layer K".
    Decided per layer set (not per budget), so keep counts grow with the label.
    """
    return "official" if layers[0] / n_layers < 64 / 576 else "pruned-layers"


def solve_keeps(layers: Sequence[int], budget: int, n_visual: int, n_layers: int) -> tuple[int, ...]:
    """Keep counts that hit ``budget`` under :func:`accounting_for`, with the matching ratio pattern.

    k_1 is searched over 1..V-1; later stages follow k_s = round(k_{s-1} * r_s). The closest average
    wins (ties: the smaller k_1). A budget above what the largest official row's pattern reaches (about 41% of V
    on LLaVA-1.5) gets :func:`lifted_keeps` instead.
    """
    pattern = ratio_pattern(budget, n_visual)
    average = official_average if accounting_for(layers, n_layers) == "official" \
        else pruned_layers_average
    best: tuple[float, int, tuple[int, ...]] | None = None
    for k1 in range(1, n_visual):
        keeps = _stage_keeps(k1, pattern, len(layers))
        err = abs(average(layers, keeps, n_visual, n_layers) - budget)
        cand = (err, k1, keeps)
        if best is None or cand[:2] < best[:2]:
            best = cand
    assert best is not None
    if best[0] > 1.0 and budget / n_visual > max(RATIO_PATTERNS) / 576:
        return lifted_keeps(layers, budget, n_visual, n_layers, average)
    return best[2]


def _stage_keeps(k1: int, pattern: Sequence[float], n_stages: int) -> tuple[int, ...]:
    keeps = [k1]
    for s in range(1, n_stages):
        keeps.append(int(round(keeps[-1] * pattern[min(s, len(pattern) - 1)])))
    return tuple(keeps)


def lifted_keeps(layers: Sequence[int], budget: int, n_visual: int, n_layers: int, average) -> tuple[int, ...]:
    """Keep counts for a budget above the official rows: every ratio of the largest row's pattern moved the
    same share t of the way to 1 (keep all), k_1 = round(r_1 V) included, with t found by bisection so that the
    average hits the budget (to within one rounding step). t = 0 is the largest row's shape, t = 1 no pruning."""
    top = RATIO_PATTERNS[max(RATIO_PATTERNS)]

    def keeps_at(t: float) -> tuple[int, ...]:
        pattern = [r + t * (1.0 - r) for r in top]
        return _stage_keeps(min(n_visual, int(round(pattern[0] * n_visual))), pattern, len(layers))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if average(layers, keeps_at(mid), n_visual, n_layers) < budget:
            lo = mid
        else:
            hi = mid
    return min((keeps_at(lo), keeps_at(hi)), key=lambda k: abs(average(layers, k, n_visual, n_layers) - budget))


def validate(layers: Sequence[int], keeps: Sequence[int] | None, n_layers: int | None) -> None:
    """Stage layers and keep counts, checked; ``n_layers`` None: only what needs no model (when the parameters
    are validated, before any model work)."""
    if not layers:
        raise InvalidInput("adaptinfer: at least one stage layer is needed")
    if list(layers) != sorted(set(layers)):
        raise InvalidInput(f"adaptinfer: stage layers must be strictly increasing, got {list(layers)}")
    if n_layers is None:
        if layers[0] < 0:
            raise InvalidInput(f"adaptinfer: stage layers must be >= 0, got {list(layers)}")
    elif layers[0] < 0 or layers[-1] >= n_layers - 1:
        raise InvalidInput(f"adaptinfer: stage layers must lie in [0, {n_layers - 2}] for a "
                           f"{n_layers}-layer model, got {list(layers)}")
    if keeps is not None:
        if len(keeps) != len(layers):
            raise InvalidInput(f"adaptinfer: {len(layers)} stage layers but {len(keeps)} keep counts")
        if any(k < 0 for k in keeps):
            raise InvalidInput(f"adaptinfer: keep counts must be >= 0, got {list(keeps)}")
        if any(b > a for a, b in zip(keeps, keeps[1:])):
            raise InvalidInput(f"adaptinfer: keep counts must not increase across stages, got {list(keeps)}")


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def check_schedule(data: Any, where: str) -> dict:
    """A schedule as ``vlmguard prune analyze`` writes it: {"layers": [int, ...], "keeps": {"<budget>": [int,
    ...]}, "n_visual": int, "n_layers": int} (keeps, n_visual and n_layers optional). One InvalidInput naming
    ``where`` and the bad key."""
    if not isinstance(data, dict) or "layers" not in data:
        raise InvalidInput(f"adaptinfer: {where} has no 'layers' list")
    if not _int_list(data["layers"]) or not data["layers"]:
        raise InvalidInput(f"adaptinfer: {where}: 'layers' must be a non-empty list of integers, got {data['layers']!r}")
    keeps = data.get("keeps")
    if keeps is not None and not (isinstance(keeps, dict) and all(_int_list(v) for v in keeps.values())):
        raise InvalidInput(f"adaptinfer: {where}: 'keeps' must map budgets to lists of integers, got {keeps!r}")
    for key in ("n_visual", "n_layers"):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidInput(f"adaptinfer: {where}: '{key}' must be a positive integer, got {v!r}")
    return data


def load_schedule_file(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"adaptinfer: schedule file not found: {p}") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"adaptinfer: schedule file {p} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"adaptinfer: cannot read schedule file {p}: {e}") from None
    return check_schedule(data, f"schedule file {p}")


def schedule_data(schedule: str | dict) -> tuple[dict, str]:
    """(checked schedule, its source label) from a file path or an inline schedule object."""
    if isinstance(schedule, dict):
        return check_schedule(schedule, "schedule"), "inline"
    if not schedule.strip():  # Path("") is the current directory: "cannot read schedule file ." would follow
        raise InvalidInput("adaptinfer: 'schedule' is empty: give a schedule file's path or an inline schedule")
    return load_schedule_file(schedule), f"file:{schedule}"


def make_schedule(*, family: str, n_layers: int, hidden: int, n_visual: int, budget: int,
                  layers: Sequence[int] | None = None, keeps: Sequence[int] | None = None,
                  schedule: tuple[dict, str] | None = None) -> Schedule:
    """Resolve the schedule for one row (V visual tokens, budget = visual tokens kept on average)."""
    if keeps is not None and layers is None:
        raise InvalidInput("adaptinfer: 'keeps' needs explicit 'layers'")
    source = "params"
    file_keeps = None
    if layers is None and schedule is not None:  # (checked data, source label), from ``schedule_data``
        data, source = schedule
        layers = tuple(data["layers"])
        table = data.get("keeps") or {}
        # keep counts solved for another token count or depth miss this budget: solved again for this model
        same_model = (data.get("n_visual", n_visual), data.get("n_layers", n_layers)) == (n_visual, n_layers)
        file_keeps = table.get(str(budget)) if same_model else None
    if layers is None:
        if n_layers == 32 and n_visual == 576 and budget in OFFICIAL_KEEPS_7B:
            validate(OFFICIAL_LAYERS_7B, OFFICIAL_KEEPS_7B[budget], n_layers)
            return Schedule(OFFICIAL_LAYERS_7B, OFFICIAL_KEEPS_7B[budget], n_visual, n_layers, "official-7b")
        qwen_2b = (family, n_layers, hidden) == QWEN2_VL_2B
        preset = qwen2_vl_2b_preset(budget, n_visual) if qwen_2b else None
        if preset is not None:
            validate(QWEN2_VL_2B_LAYERS, preset, n_layers)
            return Schedule(QWEN2_VL_2B_LAYERS, preset, n_visual, n_layers, "official-qwen2-vl-2b")
        known = KNOWN_LAYERS.get((family, n_layers, hidden, n_visual))
        if qwen_2b:  # another budget: the official port's layers, keep counts solved for it (spec section 2.2)
            layers, source = QWEN2_VL_2B_LAYERS, "official-qwen2-vl-2b-layers"
        elif known is not None:
            layers, source = known, "analyze"
        else:
            layers, source = default_layers(n_layers), "relative-depth"
    layers = tuple(int(x) for x in layers)
    if keeps is None:
        keeps = file_keeps
    if keeps is None:
        validate(layers, None, n_layers)
        if budget >= n_visual:
            keeps = tuple(n_visual for _ in layers)
        else:
            keeps = solve_keeps(layers, budget, n_visual, n_layers)
    keeps = tuple(int(x) for x in keeps)
    validate(layers, keeps, n_layers)
    return Schedule(layers, keeps, n_visual, n_layers, source)
