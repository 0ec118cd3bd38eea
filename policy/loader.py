"""Load a policy YAML file into :class:`policy.schema.Policy`, with errors that name
``file:line:column`` and say how to fix the problem."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from policy.schema import Policy, PolicyValueError

POLICY_DIR = Path(__file__).parent
DEFAULT_POLICY = POLICY_DIR / "default.yaml"


class PolicyError(ValueError):
    """One or more problems in a policy file; each line of the message is ``file:line:col: problem``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid policy:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    path: Path
    text: str
    sha256: str


def _position(node: yaml.Node | None, location: tuple) -> tuple[int, int] | None:
    """(line, column), 1-based, of the YAML node at a pydantic error location; the deepest
    existing node when the location names a key that is absent."""
    found = node
    for part in location:
        if isinstance(found, yaml.MappingNode):
            match = next((value for key, value in found.value if key.value == str(part)), None)
            if match is None:
                match = next((key for key, _ in found.value if key.value == str(part)), None)
                if match is None:
                    break
            found = match
        elif isinstance(found, yaml.SequenceNode) and isinstance(part, int) and part < len(found.value):
            found = found.value[part]
        else:
            break
    if found is None:
        return None
    return found.start_mark.line + 1, found.start_mark.column + 1


def _key_position(node: yaml.Node | None, location: tuple) -> tuple[int, int] | None:
    """Position of the *key* named last in ``location`` (for unknown-key errors)."""
    parent = node
    for part in location[:-1]:
        if not isinstance(parent, yaml.MappingNode):
            return _position(node, location)
        parent = next((value for key, value in parent.value if key.value == str(part)), None)
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if key.value == str(location[-1]):
                return key.start_mark.line + 1, key.start_mark.column + 1
    return _position(node, location)


def _duplicate_keys(node: yaml.Node, filename: str) -> list[str]:
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.value in seen:
                problems.append(f"{filename}:{line}:{key.start_mark.column + 1}: key '{key.value}' "
                                f"appears twice (first on line {seen[key.value]}); keep one")
            seen.setdefault(key.value, line)
            problems += _duplicate_keys(value, filename)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems += _duplicate_keys(item, filename)
    return problems


# How to fix a value that is out of range, for the keys a compliance officer sets most.
_HINTS = {
    "version": "this tool reads policy language v1: set `version: 1` (v0 files need no other change; "
               "add attributes.obfuscate and privacy: to use Stage II)",
    "privacy.epsilon": "epsilon must be a positive number: smaller is more private (0.5 strict, 1 usual, 4 weak)",
    "privacy.t": "t is a share between 0 and 1 (exclusive of 0): 0.1 is strict, 0.2 usual, 0.3 lenient",
    "privacy.budget": "the budget is the total epsilon a dataset may spend across releases, a positive number",
}


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if location in _HINTS and kind not in ("extra_forbidden", "value_error"):
        return f"'{location}': {error['msg']} (got {error.get('input')!r}); {_HINTS[location]}"
    if kind == "extra_forbidden":
        return f"unknown key '{error['loc'][-1]}' in '{'.'.join(map(str, error['loc'][:-1])) or 'top level'}'; " \
               f"remove it or check its spelling (`anonymousnet policy schema` lists the valid keys)"
    if kind == "missing":
        return f"'{location}' is required"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        return f"'{location}': {message} (got {error.get('input')!r})"
    if location:
        return f"'{location}': {message}"
    return message


def parse_policy(text: str, filename: str = "<policy>") -> Policy:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([f"{where}: YAML syntax error: {problem}"]) from None
    if root is None or data is None:
        raise PolicyError([f"{filename}:1:1: the policy file is empty; start from policy/default.yaml"])
    if not isinstance(data, dict):
        raise PolicyError([f"{filename}:1:1: a policy must be a mapping of keys (name:, obfuscation:, ...)"])
    problems = _duplicate_keys(root, filename)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            location = tuple(error["loc"])
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, PolicyValueError):  # a cross-field check names the key to point at
                location += cause.at
                error = {**error, "loc": location}
            position = (_key_position(root, location) if error["type"] == "extra_forbidden"
                        else _position(root, location)) or (1, 1)
            problems.append(f"{filename}:{position[0]}:{position[1]}: {_describe(error)}")
        policy = None
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy(path: str | Path | None = None) -> LoadedPolicy:
    """Read and validate a policy file (default: ``policy/default.yaml``)."""
    path = Path(path) if path else DEFAULT_POLICY
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError([f"{path}: file not found (the shipped policies are in {POLICY_DIR})"]) from None
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: not UTF-8 text; save the policy as UTF-8"]) from None
    return LoadedPolicy(policy=parse_policy(text, str(path)), path=path.resolve(), text=text,
                        sha256=hashlib.sha256(raw).hexdigest())


def key_position(text: str, location: tuple[str, ...]) -> tuple[int, int] | None:
    """(line, column) of the key at ``location`` in a policy's YAML text (the deepest
    existing key when it is absent; None when the text is not YAML)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    return _key_position(root, location)
