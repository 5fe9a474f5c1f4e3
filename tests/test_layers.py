"""The house rules of DESIGN.md §2, checked on the source: arrows point down only, memory policy stays in
the runtime."""

import ast
from pathlib import Path

import sdlite

SRC = Path(sdlite.__file__).parent

# a module may import from its own room and from rooms on lower floors only
FLOORS = {
    "errors": 0,
    "units": 1, "fileio": 1, "image_io": 1,
    "weights": 2, "tokenizer": 2, "samplers": 2,
    "models": 3,
    "runtime": 4,
    "request": 5,
    "pipeline": 6, "testing": 6,
    "serve": 7, "train": 7, "doctor": 7,
    "cli": 8, "__main__": 9,
}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """sdlite modules imported anywhere in the file (TYPE_CHECKING blocks included)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "sdlite" or n.startswith("sdlite."))
    return out


def test_arrows_point_down():
    upward = []
    for path in SRC.rglob("*.py"):
        here = room("sdlite." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        if here == "__init__":
            continue
        for target in imports_of(path):
            there = room(target)
            if there in ("__init__", here) or not ((SRC / there).is_dir() or (SRC / f"{there}.py").is_file()):
                continue  # the package itself, its own room, or a name defined in sdlite/__init__.py
            assert here in FLOORS and there in FLOORS, (path, target)
            if FLOORS[there] >= FLOORS[here]:
                upward.append(f"{path.relative_to(SRC)} -> {target}")
    assert not upward, upward


def test_memory_policy_stays_in_the_runtime():
    """Only the runtime calls gc, malloc_trim or the page-cache functions (DESIGN.md §2)."""
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("runtime/"):
            continue
        text = path.read_text()
        for needle in ("gc.freeze", "gc.collect", "malloc_trim", "posix_fadvise", "drop_file_cache",
                       "configure_allocator"):
            assert needle not in text or rel.startswith("serve/"), (rel, needle)
    pipeline = (SRC / "pipeline.py").read_text()
    assert "runtime import memory" not in pipeline and "import gc" not in pipeline
