"""Every tensor factory in the runtime packages names its device (issue #17, "GPU-ready by construction").

A factory without ``device=`` builds on torch's default device, the CPU: on a GPU run that tensor then
meets CUDA tensors (an all-gather into a CPU buffer, an index_add_ of a CUDA fragment, a CPU index) and
fails, or copies silently. So each call says where it builds: the device of the tensor, model or
fragment it serves, or ``device="cpu"`` with a comment where the CPU is meant (checkpoint I/O, host-side
data). ``*_like`` factories inherit their argument's device and are not checked. docs/ARCHITECTURE.md
"Devices" says where each kind of tensor lives.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_twist"
EXCLUDED: Tuple[str, ...] = ()  # paths under megatron_twist/ not scanned: none

FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "empty_strided",
        "full",
        "arange",
        "linspace",
        "logspace",
        "eye",
        "tensor",
        "as_tensor",
        "rand",
        "randn",
        "randint",
        "randperm",
        "Generator",  # RNG state
    }
)

# (path relative to the repository, enclosing function or class, "torch.<factory>") -> why no device is fine.
# Keyed by place, not line, so edits elsewhere in a file do not invalidate it. Keep it short; prefer an
# explicit device (``device="cpu"`` with a comment where the CPU is meant) to an entry here.
ALLOWED: Dict[Tuple[str, str, str], str] = {}


class _Scanner(ast.NodeVisitor):
    def __init__(self):
        self.torch_names = set()  # names bound to the torch module
        self.factory_names: Dict[str, str] = {}  # local name -> factory, from `from torch import zeros`
        self.scope: List[str] = []
        self.found: List[Tuple[int, str, str]] = []  # (line, enclosing scope, "torch.<factory>")

    def visit_Import(self, node):
        for a in node.names:
            if a.name == "torch":
                self.torch_names.add(a.asname or "torch")

    def visit_ImportFrom(self, node):
        if node.module == "torch" and node.level == 0:
            for a in node.names:
                if a.name in FACTORIES:
                    self.factory_names[a.asname or a.name] = a.name

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node):
        f = node.func
        name = None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in self.torch_names:
            name = f.attr if f.attr in FACTORIES else None
        elif isinstance(f, ast.Name):
            name = self.factory_names.get(f.id)
        if name is not None and not any(k.arg == "device" for k in node.keywords):
            self.found.append((node.lineno, ".".join(self.scope) or "<module>", f"torch.{name}"))
        self.generic_visit(node)


def undeviced(source: str) -> List[Tuple[int, str, str]]:
    """(line, enclosing scope, "torch.<factory>") of each tensor factory call without ``device=``."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return sorted(scanner.found)


def _runtime_files() -> Iterable[Path]:
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        if not any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in EXCLUDED):
            yield f


def test_scanner_finds_factories_without_a_device():
    source = (
        "import torch\n"
        "import torch as th\n"
        "from torch import arange as ar\n"
        "def f(x):\n"
        "    a = torch.zeros(3)\n"
        "    b = th.full((2,), 1.0, dtype=torch.float32)\n"
        "    c = ar(4)\n"
        "    d = torch.Generator()\n"
        "    ok = torch.zeros(3, device=x.device), torch.zeros_like(x), torch.cat([x]), x.new_zeros(2)\n"
        "    return torch.empty(2, device='cpu')\n"
    )
    assert undeviced(source) == [
        (5, "f", "torch.zeros"),
        (6, "f", "torch.full"),
        (7, "f", "torch.arange"),
        (8, "f", "torch.Generator"),
    ]


def test_runtime_tensor_factories_name_their_device():
    files = list(_runtime_files())
    assert len(files) > 50, f"scanned only {len(files)} files under {PACKAGE}"
    bad, used = [], set()
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        for line, scope, call in undeviced(f.read_text()):
            key = (rel, scope, call)
            if key in ALLOWED:
                used.add(key)
            else:
                bad.append(f"{rel}:{line} {call} in {scope}")
    assert not bad, "tensor factories without device= (name the device they serve):\n" + "\n".join(bad)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that match nothing (remove them): {stale}"
