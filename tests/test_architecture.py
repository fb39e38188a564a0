"""The import direction of docs/ARCHITECTURE.md: a module imports only from its own layer or
the layers below it (function-level imports included), so formats never learn about stages,
the data stages never learn about the trainer, and nothing but the CLI and the demo knows the CLI."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmtok": "mmtok", "cli": "mmtok.cli", "trainer": "mmtok.trainer"}

# Lowest first. A module not named here fails the test: a new module must be given a layer.
LAYERS = {
    "formats": ["mmtok.tars", "mmtok.shards", "mmtok.shardwriter", "mmtok.indexfile", "mmtok.fs", "mmtok.locks", "mmtok.images", "mmtok.vocab", "mmtok.plan"],
    "runner": ["mmtok.runner", "mmtok.packing", "mmtok.ranks", "mmtok.actors", "mmtok.dispatch", "mmtok.stagelog",
               "mmtok.mirror"],
    "stages": ["mmtok.ingest", "mmtok.manifests", "mmtok.sniff", "mmtok.media", "mmtok.audio", "mmtok.video",
               "mmtok.bpe", "mmtok.tokenizer", "mmtok.tokenize", "mmtok.codes", "mmtok.detokenize", "mmtok.vq",
               "mmtok.chameleon", "mmtok.chameleon_vq", "mmtok.mix", "mmtok.holdout", "mmtok.loader", "mmtok.speech_standin"],
    "models": ["mmtok.trainer", "mmtok.trainer.config", "mmtok.trainer.context", "mmtok.trainer.attention",
               "mmtok.trainer.block", "mmtok.trainer.ffn", "mmtok.trainer.moe", "mmtok.trainer.depth",
               "mmtok.trainer.mot", "mmtok.trainer.kernels", "mmtok.trainer.model", "mmtok.trainer.unimoe",
               "mmtok.trainer.hf_modeling_mmtok"],
    "trainer": ["mmtok.trainer.parallel", "mmtok.trainer.checkpoint_io", "mmtok.trainer.checkpoint",
                "mmtok.trainer.job", "mmtok.trainer.metrics", "mmtok.trainer.train", "mmtok.trainer.vq_train", "mmtok.trainer.vq_memory", "mmtok.trainer.unimoe_data",
                "mmtok.trainer.unimoe_train", "mmtok.trainer.unimoe_prep", "mmtok.trainer.aux_routers",
                "mmtok.trainer.upcycle", "mmtok.trainer.export", "mmtok.trainer.hf_export",
                "mmtok.trainer.evaluate", "mmtok.trainer.generate", "mmtok.trainer.launch"],
    # mmtok/__init__.py only maps names to modules lazily (strings, not imports)
    "entry": ["mmtok", "mmtok.demo", "mmtok.cli"],
}
RANK = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
NAME = {i: name for i, name in enumerate(LAYERS)}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            found[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return found


def layer(module: str) -> int:
    if module in RANK:
        return RANK[module]
    if module.startswith("mmtok.cli."):
        return RANK["mmtok.cli"]
    raise KeyError(module)


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mmtok import runner` imports the module mmtok.runner
            names.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in RANK else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "mmtok" or n.startswith("mmtok.")}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if not (m in RANK or m.startswith("mmtok.cli."))]
    assert not missing, f"give these modules a layer in LAYERS and docs/ARCHITECTURE.md: {missing}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module):
    here = layer(module)
    upward = sorted(f"{dep} ({NAME[layer(dep)]})" for dep in imports(modules()[module])
                    if dep in RANK or dep.startswith("mmtok.cli.") if layer(dep) > here)
    assert not upward, f"{module} ({NAME[here]}) imports from a higher layer: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule must be able to fail: a format module importing the runner is caught."""
    bad = tmp_path / "shards.py"
    bad.write_text("def f():\n    from mmtok.runner import run_stage\n")
    assert any(layer(dep) > layer("mmtok.shards") for dep in imports(bad))
