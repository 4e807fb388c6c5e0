#!/usr/bin/env python3
"""Checks the module structure the project keeps:

- no import loops between the files of a crate (a uses b, b uses a, directly or around a cycle);
- in server/, no module reaches up a layer: lifecycle and commands -> api -> routing ->
  scheduling -> telemetry -> {error, facts};
- no source file over MAX_FILE_LINES and no function over MAX_FN_LINES outside tests, except
  those listed in ALLOWED_LONG with a reason.

Reads `use crate::...`, `crate::...` paths and `super::` paths; re-exports in lib.rs and mod.rs
files are followed to the module that defines the item. Exits 1 with a list of problems.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = ["proto", "quantize", "model-store", "runtime", "preparation", "server"]
MAX_FILE_LINES = 700
MAX_FN_LINES = 100
# (crate-relative path, function name): why it may be longer.
ALLOWED_LONG = {}
SERVER_LAYERS = {
    "error": 0, "facts": 0, "telemetry": 1, "scheduling": 2, "routing": 3, "api": 4,
    "lifecycle": 5, "commands": 5, "cli": 6, "main": 7, "": 7,
}

PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\};", re.S)
FN_RE = re.compile(r"^\s*(pub(\([a-z]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def strip_comments_and_strings(text):
    """The code with comments removed and string and char literals emptied (lines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append("\n" * text.count("\n", i, n if j < 0 else j))
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            i += re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(src, path):
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("lib", "mod", "main"):
        parts = parts[:-1]
    return "::".join(parts)


def without_tests(text):
    """The file up to its `#[cfg(test)]` module (tests may reach anything)."""
    marker = text.find("#[cfg(test)]")
    return text if marker < 0 else text[:marker]


def references(module, code, modules):
    """Modules `code` (of `module`) refers to."""
    found = set()
    base = module.split("::") if module else []
    candidates = []
    for root, rest in PATH_RE.findall(code):
        candidates.append((root, rest.strip(":").split("::")))
    for root, prefix, group in USE_GROUP_RE.findall(code):
        for item in re.split(r"[,\s]+", re.sub(r"\{[^}]*\}", "", group)):
            item = item.strip()
            if item and item != "self":
                candidates.append((root, (prefix.strip(":").split("::") if prefix else []) + item.split("::")))
    for root, parts in candidates:
        parts = [p for p in parts if p]
        if root == "super":
            here = list(base)
            while parts and parts[0] == "super":
                parts = parts[1:]
                here = here[:-1]
            parts = here[:-1] + parts if here else parts
        target = None
        for n in range(len(parts), -1, -1):
            name = "::".join(parts[:n])
            if name in modules:
                target = name
                break
        if target is not None:
            found.add(target)
    return found


def reexports(text):
    """`pub use module::{A, B}` names of a lib.rs/mod.rs -> defining module (relative)."""
    names = {}
    for path, group in re.findall(r"pub use\s+([a-z_][a-z0-9_:]*)::\{([^;]*)\};", text, re.S):
        for item in re.split(r"[,\s]+", group):
            if item.strip():
                names[item.strip()] = path
    for path, item in re.findall(r"pub use\s+([a-z_][a-z0-9_:]*)::([A-Za-z_][A-Za-z0-9_]*);", text):
        names[item] = path
    return names


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def long_functions(text):
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("#[cfg(test)]")), len(lines))
    i = 0
    while i < end:
        match = FN_RE.match(lines[i])
        if match:
            depth, started, j = 0, False, i
            while j < len(lines):
                code = strip_comments_and_strings(lines[j])
                depth += code.count("{") - code.count("}")
                started = started or "{" in code
                if (started and depth <= 0) or (not started and code.rstrip().endswith(";")):
                    break
                j += 1
            if j - i + 1 > MAX_FN_LINES:
                yield match.group(6), j - i + 1
            i = j if started else i
        i += 1


def check_crate(crate, problems):
    src = ROOT / crate / "src"
    for test_file in sorted((ROOT / crate / "tests").rglob("*.rs")):
        rel = test_file.relative_to(ROOT / crate)
        lines = test_file.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES and (str(rel), "") not in ALLOWED_LONG:
            problems.append(f"{crate}/{rel}: {len(lines)} lines (limit {MAX_FILE_LINES})")
        for name, length in long_functions("\n".join(lines)):
            if (str(rel), name) not in ALLOWED_LONG:
                problems.append(f"{crate}/{rel}: fn {name} is {length} lines (limit {MAX_FN_LINES})")
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f): f for f in files}
    inline = {}
    for module, f in modules.items():
        for name in re.findall(r"^pub mod (\w+)\s*\{", f.read_text(), re.M):
            inline["::".join(p for p in [module, name] if p)] = f
    known = set(modules) | set(inline)
    graph = {}
    for module, f in modules.items():
        text = f.read_text()
        rel = f.relative_to(ROOT / crate)
        if len(text.splitlines()) > MAX_FILE_LINES and (str(rel), "") not in ALLOWED_LONG:
            problems.append(f"{crate}/{rel}: {len(text.splitlines())} lines (limit {MAX_FILE_LINES})")
        for name, length in long_functions(text):
            if (str(rel), name) not in ALLOWED_LONG:
                problems.append(f"{crate}/{rel}: fn {name} is {length} lines (limit {MAX_FN_LINES})")
        if f.name in ("lib.rs", "mod.rs") or (f.name == "main.rs" and crate != "server"):
            continue  # declaration and re-export hubs
        code = strip_comments_and_strings(without_tests(text))
        targets = references(module, code, known)
        resolved = set()
        for target in targets:
            hub = modules.get(target)
            if hub is not None and hub.name in ("lib.rs", "mod.rs"):
                names = reexports(hub.read_text())
                used = set(re.findall(r"\bcrate" + ("::" + target if target else "") + r"::([A-Z][A-Za-z0-9_]*|[a-z_][a-z0-9_]*)\b", code))
                for name in used & names.keys():
                    origin = "::".join(p for p in [target, names[name]] if p)
                    defining = [m for m in known if origin == m or origin.startswith(m + "::")]
                    if defining:
                        resolved.add(max(defining, key=len))
                continue
            resolved.add(target)
        graph[module] = {t for t in resolved if t != module and not module.startswith(t + "::")}
        if crate == "server":
            here = module.split("::")[0]
            for target in graph[module]:
                there = target.split("::")[0]
                if here != there and SERVER_LAYERS.get(there, 0) >= SERVER_LAYERS.get(here, 0):
                    problems.append(f"server: {module} reaches up to {target}")
    cycle = find_cycle(graph)
    if cycle:
        problems.append(f"{crate}: import loop: {' -> '.join(m or '(root)' for m in cycle)}")
    return graph


def main():
    problems = []
    verbose = "--graph" in sys.argv
    for crate in CRATES:
        graph = check_crate(crate, problems)
        if verbose:
            print(f"[{crate}]")
            for module in sorted(graph):
                print(f"  {module or '(root)'} -> {', '.join(sorted(graph[module])) or '-'}")
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print(f"module graph ok: no import loops, no upward imports in server, files <= {MAX_FILE_LINES} lines, functions <= {MAX_FN_LINES} lines")


if __name__ == "__main__":
    main()
