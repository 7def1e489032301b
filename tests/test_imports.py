"""The package's import graph: no circle, no module importing one of a higher layer, the CPU speed-ups
reached only through training, config parsing without JAX, and every import inside a function says why
(an optional dependency or a measured start-up cost)."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kd_landmarks"

# Layers, lowest first, named by the part of the package (a top-level module or a sub-package): a module
# imports only modules of its own layer or below. They read in the order the data flows: the method's data
# side (coordinates, shapes, metrics, datasets), its model side (augmentation, models, losses) and the
# configs, the CPU door, training, evaluation and the report, deployment, and the driver.
LAYERS = [
    {"errors", "files", "provenance", "coords", "shapes", "metrics", "datasets"},
    {"augment", "models", "losses", "config_lib"},
    {"cpu"},
    {"training"},
    {"evaluation"},
    {"deploy"},
    {"pipeline", "main"},
]
# The CPU door (kd_landmarks/cpu) is reached through training alone (train.training_kernels).
CPU_DOOR_USERS = ("kd_landmarks.cpu", "kd_landmarks.training.train")


def _module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module):
  short = module.split(".")[1] if "." in module else module
  for rank, names in enumerate(LAYERS):
    if short in names:
      return rank
  raise AssertionError(f"{module} is in no layer of tests/test_imports.py; add it")


def test_every_part_of_the_package_has_a_layer():
  for path in sorted(PACKAGE.rglob("*.py")):
    if _module_name(path) != "kd_landmarks":
      _layer(_module_name(path))


def _imports():
  """(importer, imported kd_landmarks module, line number, inside a function?) for every import."""
  edges = []
  for path in sorted(PACKAGE.rglob("*.py")):
    importer = _module_name(path)
    tree = ast.parse(path.read_text())
    local_lines = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if isinstance(inner, (ast.Import, ast.ImportFrom)):
            local_lines.add(inner.lineno)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
      for name in names:
        edges.append((importer, name, node.lineno, node.lineno in local_lines, path))
  return edges


def _package_module(name):
  """'kd_landmarks.datasets.info' -> 'kd_landmarks.datasets.info' if that module exists, else its parent."""
  parts = name.split(".")
  while parts:
    candidate = PACKAGE.parent.joinpath(*parts)
    if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
      return ".".join(parts)
    parts = parts[:-1]
  return None


def test_no_module_imports_a_higher_layer():
  wrong = []
  for importer, name, line, _, path in _imports():
    if not name.startswith("kd_landmarks") or importer == "kd_landmarks":
      continue
    imported = _package_module(name)
    if imported in (None, "kd_landmarks") or imported == importer:
      continue
    if _layer(imported) > _layer(importer):
      wrong.append(f"{path.name}:{line}: {importer} imports {imported}")
  assert not wrong, "\n".join(wrong)


def test_no_import_circle():
  graph = {}
  for importer, name, _, _, _ in _imports():
    imported = _package_module(name) if name.startswith("kd_landmarks") else None
    if imported and imported not in (importer, "kd_landmarks") and not importer.startswith(imported + "."):
      graph.setdefault(importer, set()).add(imported)
  seen, stack = set(), []

  def visit(node):
    if node in stack:
      raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
    if node in seen:
      return
    stack.append(node)
    for child in sorted(graph.get(node, ())):
      visit(child)
    stack.pop()
    seen.add(node)

  for node in sorted(graph):
    visit(node)


def test_every_import_inside_a_function_says_why():
  unexplained = []
  for _, name, line, local, path in _imports():
    if not local:
      continue
    lines = path.read_text().splitlines()
    # The reason is on the line, or in the comment lines just above it (a block of local imports).
    context = lines[line - 1]
    above = line - 2
    while above >= 0 and lines[above].strip().startswith(("#", "from ", "import ", "if ", "logging.",
                                                            "parallel.")):
      context += lines[above]
      above -= 1
    if "#" not in context:
      unexplained.append(f"{path.name}:{line}: {lines[line - 1].strip()}")
  assert not unexplained, "\n".join(unexplained)


def test_only_cpu_training_reaches_the_cpu_door():
  wrong = []
  for importer, name, line, _, path in _imports():
    imported = _package_module(name) if name.startswith("kd_landmarks") else None
    if imported and imported.startswith("kd_landmarks.cpu") and not importer.startswith(CPU_DOOR_USERS):
      wrong.append(f"{path.name}:{line}: {importer} imports {imported}")
  assert not wrong, "\n".join(wrong)


def test_config_parsing_imports_no_jax():
  # Flag and config errors answer before JAX's import (about 2 s), and config files load anywhere.
  code = ("import sys; from kd_landmarks import config_lib; import importlib.util, runpy; "
          "c = runpy.run_path('configs/demo.py')['get_config']('runlocal'); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=PACKAGE.parent).stdout.strip()
  assert out == "[]", out
