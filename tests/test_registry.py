"""The node contract: declarations are checked once, packs are discovered three ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodegraph.context import Context
from nodegraph.registry import DeclarationError, Registry, load_registry
from nodegraph.schema import Input, Node, Output
from nodegraph.settings import Settings


def make(**attrs: Any) -> type[Node]:
    def run(self: Node, ctx: Context, **inputs: Any) -> dict[str, Any]:
        return {"x": 1}

    base: dict[str, Any] = {"type": "Good", "version": "1.0.0", "outputs": (Output("x", "INT"),), "run": run}
    return type("Declared", (Node,), {**base, **attrs})


def test_a_good_declaration_registers() -> None:
    node = make(inputs=(Input("n", "INT", default=1, min=0, max=3), Input("m", "MODEL")))
    assert Registry([node]).get("Good") is node


@pytest.mark.parametrize("attrs, message", [
    ({"type": "bad name"}, "type must be a name"),
    ({"version": "1.0"}, "semver"),
    ({"version": "v1.0.0"}, "semver"),
    ({"run": Node.run}, "does not implement run"),
    ({"outputs": ()}, "must be an output node"),
    ({"inputs": (Input("a", "INT"), Input("a", "FLOAT"))}, "declared twice"),
    ({"inputs": (Input("not ok", "INT"),)}, "identifier"),
    ({"inputs": (Input("a", "model"),)}, "upper case"),
    ({"inputs": (Input("a", "COMBO"),)}, "needs choices"),
    ({"inputs": (Input("a", "INT", choices=("1",)),)}, "only a COMBO"),
    ({"inputs": (Input("a", "INT", min=5, max=1),)}, "above max"),
    ({"inputs": (Input("a", "INT", default=9, max=3),)}, "default 9"),
    ({"inputs": (Input("a", "COMBO", default="z", choices=("x", "y")),)}, "default 'z'"),
    ({"inputs": (Input("a", "MODEL", mode="literal"),)}, "cannot be written as literals"),
    ({"inputs": (Input("a", "INT", mode="sometimes"),)}, "mode must be"),  # type: ignore[arg-type]
    ({"outputs": (Output("x", "INT"), Output("x", "INT"))}, "declared twice"),
])
def test_bad_declarations_fail_loudly(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises(DeclarationError, match=message) as err:
        Registry([make(**attrs)])
    assert "Declared" in str(err.value)


def test_not_a_node_class_is_refused() -> None:
    with pytest.raises(DeclarationError, match="not a subclass"):
        Registry([object])  # type: ignore[list-item]


def test_two_classes_with_one_type_name_are_refused() -> None:
    with pytest.raises(DeclarationError, match="already registered"):
        Registry([make(), make()])


def test_builtin_pack_comes_from_its_entry_point() -> None:
    registry = load_registry()
    assert {"Int", "Float", "String", "Boolean", "Math", "Format", "Show"} <= set(registry.nodes)
    assert registry.origin["Math"] == "entry point builtin"


PACK = '''
from nodegraph.schema import Input, Node, Output
from helper_{n} import GREETING

class Hello{n}(Node):
    type = "Hello{n}"
    version = "0.1.0"
    inputs = (Input("name", "STRING", default="you"),)
    outputs = (Output("text", "STRING"),)

    def run(self, ctx, name):
        return {{"text": GREETING + name}}

NODES = [Hello{n}]
'''


def test_packs_from_folders_as_files_and_packages(tmp_path: Path) -> None:
    (tmp_path / "single.py").write_text(PACK.format(n=1).replace("from helper_1 import GREETING", "GREETING = 'hi '"))
    package = tmp_path / "mypack"
    package.mkdir()
    (package / "__init__.py").write_text(PACK.format(n=2).replace("from helper_2", "from .helper_2"))
    (package / "helper_2.py").write_text("GREETING = 'hello '\n")
    (tmp_path / "notes.txt").write_text("not a pack")
    registry = load_registry([tmp_path])
    assert {"Hello1", "Hello2"} <= set(registry.nodes)
    assert registry.origin["Hello2"].endswith("__init__.py")


@pytest.mark.parametrize("source, message", [
    ("raise ImportError('no torch here')", "failed to import: ImportError: no torch here"),
    ("NODES = 3", "must define NODES"),
    ("x = 1", "must define NODES"),
])
def test_broken_folder_packs_name_the_file(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "broken.py").write_text(source)
    with pytest.raises(DeclarationError, match=message) as err:
        load_registry([tmp_path])
    assert "broken.py" in str(err.value)


def test_missing_nodes_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DeclarationError, match="does not exist"):
        load_registry([tmp_path / "nope"])


def test_catalog_computes_choices_at_request_time(tmp_path: Path) -> None:
    def files(settings: Settings) -> list[str]:
        return settings.model_files("loras")

    node = make(inputs=(Input("lora", "COMBO", choices=files),))
    registry = Registry([node])
    settings = Settings(models_dirs=(tmp_path,))
    (tmp_path / "loras").mkdir()
    assert registry.catalog(settings)["nodes"]["Good"]["inputs"][0]["choices"] == []
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"")
    spec = registry.catalog(settings)["nodes"]["Good"]
    assert spec["inputs"][0] == {"name": "lora", "type": "COMBO", "accepts": "either", "required": True,
                                 "choices": ["style.safetensors"]}
    assert spec["outputs"] == [{"name": "x", "type": "INT"}]
    assert (spec["type"], spec["version"], spec["output_node"]) == ("Good", "1.0.0", False)


def test_model_names_stay_inside_the_model_folders(tmp_path: Path) -> None:
    settings = Settings(models_dirs=(tmp_path / "a", tmp_path / "b"))
    (tmp_path / "b" / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "loras" / "sub" / "x.safetensors").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    assert settings.model_files("loras") == ["sub/x.safetensors"]
    assert settings.resolve_model("loras", "sub/x.safetensors") == tmp_path / "b" / "loras" / "sub" / "x.safetensors"
    for name in ("../../secret.safetensors", str(tmp_path / "secret.safetensors"), "", "nope.safetensors"):
        with pytest.raises(FileNotFoundError):
            settings.resolve_model("loras", name)


WARM_PACK = """
from nodegraph.schema import Node, Output

class Noop{n}(Node):
    type = "Noop{n}"
    version = "1.0.0"
    outputs = (Output("value", "INT"),)

    def run(self, ctx):
        return {{"value": {n}}}

NODES = [Noop{n}]
{warm}
"""


def test_packs_warm_up_hooks_run_in_order_and_a_failing_one_is_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ran = tmp_path / "ran.txt"
    hook = "def WARM_UP():\n    open({path!r}, 'a').write('{n} ')\n"
    (tmp_path / "a_first.py").write_text(WARM_PACK.format(n=1, warm=hook.format(path=str(ran), n=1)))
    (tmp_path / "b_failing.py").write_text(WARM_PACK.format(n=2, warm="def WARM_UP():\n    raise RuntimeError('no')\n"))
    (tmp_path / "c_last.py").write_text(WARM_PACK.format(n=3, warm=hook.format(path=str(ran), n=3)))
    (tmp_path / "d_none.py").write_text(WARM_PACK.format(n=4, warm=""))
    registry = load_registry([tmp_path])
    assert [origin.rsplit("/", 1)[-1] for origin, _ in registry.warm_ups if "tmp" in origin] == [
        "a_first.py", "b_failing.py", "c_last.py"]
    assert not ran.exists()  # registering runs nothing
    with caplog.at_level("WARNING", logger="nodegraph.registry"):
        registry.warm_up()
    assert ran.read_text() == "1 3 "
    assert "b_failing.py failed" in caplog.text


def test_a_warm_up_that_is_not_a_function_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(WARM_PACK.format(n=1, warm="WARM_UP = 3"))
    with pytest.raises(DeclarationError, match=r"bad\.py: WARM_UP must be a function"):
        load_registry([tmp_path])
