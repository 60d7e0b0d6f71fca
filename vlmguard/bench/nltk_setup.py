"""The project-owned, offline NLTK data directory used by CHAIR (never a run-time download).

CHAIR's extraction pipeline (``../shared/benchmarks.md`` 2.3/2.5) needs two NLTK resources:

* ``corpora/wordnet``: WordNet 3.0 from the Debian packages ``wordnet-base`` and ``wordnet-sense-index``
  (``/usr/share/wordnet``), copied here plus a generated ``lexnames`` file (Princeton WordNet 3.0
  licence, permissive; see ``vlmguard/assets/nltk_data/README.md``).
* ``taggers/averaged_perceptron_tagger_eng``: the three JSON files NLTK >= 3.9 reads, written from the
  converted tagger the package ships (``vlmguard/assets/nltk_tagger/``, package data: nltk_data, Apache-2.0).
  That bundle was converted once from the official ``averaged_perceptron_tagger.zip`` pickle with a
  restricted unpickler that accepts only dicts, lists, tuples, floats, strings and ``set``
  (``python -m vlmguard.bench.nltk_setup --write-bundle ZIP``; a test checks that the bundle equals a fresh
  conversion of the refdata zip).

Sentence splitting uses an *untrained* Punkt splitter (no data file; see ``chair_extract``), as the
numbers "scored here" in the spec did.

``scripts/setup.d/20-nltk-data.sh`` fills the directory (``python -m vlmguard.bench.nltk_setup``).
The directory defaults to ``vlmguard/assets/nltk_data`` (git-ignored content) and can be moved with
``VLMGUARD_NLTK_DATA``. :func:`ensure_nltk_data` registers it on ``nltk.data.path``; a missing tagger is
written from the shipped bundle on the spot (a local file, no network).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

from vlmguard.errors import VlmguardError

TAGGER_NAME = "averaged_perceptron_tagger_eng"
TAGGER_FILES = tuple(f"{TAGGER_NAME}.{part}.json" for part in ("weights", "tagdict", "classes"))
TAGGER_PICKLE_IN_ZIP = "averaged_perceptron_tagger/averaged_perceptron_tagger.pickle"
# the converted tagger, shipped as package data: {"weights": ..., "tagdict": ..., "classes": [...]}
TAGGER_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "nltk_tagger" / f"{TAGGER_NAME}.json.gz"
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
# Files NLTK's WordNetCorpusReader opens (lexnames is written by us; index.sense / cntlist.rev are
# only needed for sense-key look-ups but are cheap to keep).
WORDNET_REQUIRED = tuple(
    f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")
) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
WORDNET_OPTIONAL = ("index.sense", "cntlist.rev", "cntlist")
# WordNet 3.0's lexicographer file numbers (lexnames(5WN)); syntactic category 1 noun 2 verb 3 adj 4 adv.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

SETUP_HINT = "run `bash scripts/setup.d/20-nltk-data.sh` (as root; part of `make setup`)"


def nltk_data_dir() -> Path:
    """The project's NLTK data directory (``VLMGUARD_NLTK_DATA`` or ``vlmguard/assets/nltk_data``)."""
    env = os.environ.get("VLMGUARD_NLTK_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[1] / "assets" / "nltk_data").resolve()


def shared_dir() -> Path:
    """``../shared`` beside the repository (or ``VLMGUARD_SHARED``)."""
    env = os.environ.get("VLMGUARD_SHARED")
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


def wordnet_dir(root: Path | None = None) -> Path:
    return (root or nltk_data_dir()) / "corpora" / "wordnet"


def tagger_dir(root: Path | None = None) -> Path:
    return (root or nltk_data_dir()) / "taggers" / TAGGER_NAME


def wordnet_installed(root: Path | None = None) -> bool:
    d = wordnet_dir(root)
    return all((d / f).is_file() for f in (*WORDNET_REQUIRED, "lexnames"))


def tagger_installed(root: Path | None = None) -> bool:
    d = tagger_dir(root)
    return all((d / f).is_file() for f in TAGGER_FILES)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except ``set`` (the tagger pickle holds dicts, floats, strings, one set)."""

    _ALLOWED = {("__builtin__", "set"): set, ("builtins", "set"): set}

    def find_class(self, module: str, name: str):  # noqa: D102
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in tagger pickle") from None


def tagger_from_zip(zip_path: Path) -> dict:
    """The tagger of NLTK's pickled ``averaged_perceptron_tagger.zip`` as {"weights", "tagdict", "classes"},
    read with the restricted unpickler (no global but ``set``)."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise VlmguardError(f"tagger archive not found: {zip_path}")
    with zipfile.ZipFile(zip_path) as zf:
        raw = zf.read(TAGGER_PICKLE_IN_ZIP)
    obj = _DataOnlyUnpickler(io.BytesIO(raw)).load()
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise VlmguardError(f"unexpected tagger pickle layout in {zip_path}")
    weights, tagdict, classes = obj
    if not (isinstance(weights, dict) and isinstance(tagdict, dict) and isinstance(classes, set)):
        raise VlmguardError(f"unexpected tagger pickle content in {zip_path}")
    return {"weights": weights, "tagdict": tagdict, "classes": sorted(classes)}


def tagger_from_bundle(path: Path = TAGGER_BUNDLE) -> dict:
    """The shipped converted tagger (see :data:`TAGGER_BUNDLE`)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError) as e:
        raise VlmguardError(f"cannot read the tagger bundle {path}: {e}") from None
    if not (isinstance(data, dict) and {"weights", "tagdict", "classes"} <= data.keys()):
        raise VlmguardError(f"unexpected tagger bundle content in {path}")
    return data


def write_tagger_bundle(zip_path: Path, out: Path = TAGGER_BUNDLE) -> Path:
    """Convert the official zip into the bundle the package ships (run once, by hand; reproducible bytes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(tagger_from_zip(zip_path)).encode("utf-8")
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text)
    return out


def install_tagger(source: Path | None = None, root: Path | None = None) -> Path:
    """Write the averaged-perceptron tagger in the JSON layout NLTK >= 3.9 loads, from the shipped bundle
    (``source`` None or a ``.json.gz``) or converted from NLTK's pickled zip (``source`` a ``.zip``)."""
    source = Path(source) if source is not None else TAGGER_BUNDLE
    data = tagger_from_zip(source) if source.suffix == ".zip" else tagger_from_bundle(source)
    dest = tagger_dir(root)
    dest.mkdir(parents=True, exist_ok=True)
    for name, key in zip(TAGGER_FILES, ("weights", "tagdict", "classes")):
        tmp = dest / (name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data[key], f)
        tmp.replace(dest / name)
    return dest


def install_wordnet(src: Path = DEBIAN_WORDNET_DIR, root: Path | None = None) -> Path:
    """Copy the Debian WordNet 3.0 database into ``corpora/wordnet`` and write ``lexnames``."""
    src = Path(src)
    missing = [f for f in WORDNET_REQUIRED if not (src / f).is_file()]
    if missing:
        raise VlmguardError(
            f"WordNet database incomplete in {src} (missing {', '.join(missing)}); "
            "install the Debian packages wordnet-base and wordnet-sense-index"
        )
    dest = wordnet_dir(root)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*WORDNET_REQUIRED, *WORDNET_OPTIONAL):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    lines = [f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
    (dest / "lexnames").write_text("".join(lines), encoding="ascii")
    return dest


def register_nltk_data() -> Path:
    """Put the project's data directory first on ``nltk.data.path`` (idempotent)."""
    import nltk

    root = nltk_data_dir()
    if str(root) in nltk.data.path:
        nltk.data.path.remove(str(root))
    nltk.data.path.insert(0, str(root))
    return root


def ensure_nltk_data() -> Path:
    """Register the data directory and make sure WordNet and the tagger are there.

    Falls back to local sources only (the shipped tagger bundle, the Debian WordNet directory); raises a
    :class:`VlmguardError` telling the user to run the setup script when WordNet is not there.
    """
    root = register_nltk_data()
    if not tagger_installed(root):
        install_tagger(None, root)
    if not wordnet_installed(root):
        if all((DEBIAN_WORDNET_DIR / f).is_file() for f in WORDNET_REQUIRED):
            install_wordnet(DEBIAN_WORDNET_DIR, root)
        else:
            raise VlmguardError(f"WordNet data missing in {root}; {SETUP_HINT}")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vlmguard.bench.nltk_setup", description="Install CHAIR's offline NLTK data."
    )
    p.add_argument("--dest", type=Path, default=None, help="data directory (default: VLMGUARD_NLTK_DATA or vlmguard/assets/nltk_data)")
    p.add_argument("--tagger-zip", type=Path, default=None,
                   help="convert the tagger from this averaged_perceptron_tagger.zip (default: the shipped bundle)")
    p.add_argument("--write-bundle", type=Path, default=None, metavar="ZIP",
                   help="rewrite the shipped bundle from this averaged_perceptron_tagger.zip, then stop")
    p.add_argument("--wordnet-src", type=Path, default=DEBIAN_WORDNET_DIR)
    p.add_argument("--force", action="store_true", help="reinstall even when present")
    p.add_argument("--check", action="store_true", help="only report what is installed")
    args = p.parse_args(argv)
    root = (args.dest or nltk_data_dir()).resolve()
    if args.write_bundle:
        try:
            print(f"tagger bundle -> {write_tagger_bundle(args.write_bundle)}")
        except VlmguardError as e:
            print(f"nltk_setup: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.check:
        ok_t, ok_w = tagger_installed(root), wordnet_installed(root)
        print(f"{root}: tagger {'ok' if ok_t else 'MISSING'}, wordnet {'ok' if ok_w else 'MISSING'}")
        return 0 if ok_t and ok_w else 1
    try:
        if args.force or not tagger_installed(root):
            print(f"tagger -> {install_tagger(args.tagger_zip, root)}")
        if args.force or not wordnet_installed(root):
            print(f"wordnet -> {install_wordnet(args.wordnet_src, root)}")
    except VlmguardError as e:
        print(f"nltk_setup: error: {e}", file=sys.stderr)
        return 2
    print(f"NLTK data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
