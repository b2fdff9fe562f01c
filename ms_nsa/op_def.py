"""Op definitions read from ops_yaml/: argument order, validation rules and output inference.

Everything the package knows about an op's interface comes from its yaml file; nothing here lists an
argument by hand. ``load_op_def("nsa_select_attention")`` returns an :class:`OpDef` that validates
attribute values, binds the dimension symbols of the tensor shapes (checking every rule on the way)
and infers the outputs' shapes and dtypes.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

BACKENDS = ("cpu", "ascend")


def _yaml_dir() -> Path:
    # A source checkout or editable install keeps ops_yaml/ at the top of the repository; a regular
    # install ships it as the ms_nsa.ops_yaml package.
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "ops_yaml", here / "ops_yaml"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ops_yaml/ not found next to {here}")


_VALUE_RULES = ("choices", "range", "multiple_of")


def _for_backend(rules: Mapping[str, Any], backend: str) -> Dict[str, Any]:
    """A rule set with its backend-specific overrides (e.g. `cpu: {...}`) applied.

    An override replaces the keys it names; naming any value rule (choices, range, multiple_of)
    replaces all of them, so `cpu: {range: [1, 512]}` lifts a `choices: [128, 192]`.
    """
    override = rules.get(backend) or {}
    merged = {k: v for k, v in rules.items() if k not in BACKENDS}
    if any(k in override for k in _VALUE_RULES):
        merged = {k: v for k, v in merged.items() if k not in _VALUE_RULES}
    merged.update(override)
    return merged


def _describe_rules(rules: Mapping[str, Any]) -> str:
    parts = []
    if "choices" in rules:
        parts.append("one of " + ", ".join(map(str, rules["choices"])))
    if "range" in rules:
        lo, hi = rules["range"]
        parts.append(f"in [{lo}, {hi}]")
    if "multiple_of" in rules:
        parts.append(f"a multiple of {rules['multiple_of']}")
    return " and ".join(parts)


def _check_value(rules: Mapping[str, Any], value: int) -> bool:
    if "choices" in rules and value not in rules["choices"]:
        return False
    if "range" in rules and not rules["range"][0] <= value <= rules["range"][1]:
        return False
    if "multiple_of" in rules and value % rules["multiple_of"] != 0:
        return False
    return True


@dataclass(frozen=True)
class ArgDef:
    name: str
    kind: str                      # tensor | int_array | float | int | str
    rules: Mapping[str, Any]
    optional: bool = False
    default: Any = None

    def resolved(self, backend: str) -> Dict[str, Any]:
        return _for_backend(self.rules, backend)


@dataclass(frozen=True)
class OpDef:
    name: str
    aclnn: Optional[str]           # None: no aclnn op (an ms_nsa-defined gradient)
    cpu_entry: str
    args: Tuple[ArgDef, ...]
    dims: Mapping[str, Mapping[str, Any]]
    outputs: Tuple[Tuple[str, Mapping[str, Any]], ...]
    python: Mapping[str, Any]
    data_rules: Tuple[str, ...] = field(default=())

    # -- structure ------------------------------------------------------------------------------
    def arg(self, name: str) -> ArgDef:
        for arg in self.args:
            if arg.name == name:
                return arg
        raise KeyError(f"{self.name} has no argument {name!r}")

    def args_of_kind(self, *kinds: str) -> List[ArgDef]:
        return [a for a in self.args if a.kind in kinds]

    @property
    def tensor_args(self) -> List[ArgDef]:
        return self.args_of_kind("tensor")

    @property
    def attr_args(self) -> List[ArgDef]:
        """Scalar arguments (int, float, str), in aclnn order."""
        return self.args_of_kind("int", "float", "str")

    @property
    def output_names(self) -> List[str]:
        return [name for name, _ in self.outputs]

    # -- validation -----------------------------------------------------------------------------
    def _error(self, exc_type, message: str):
        return exc_type(f"{self.python['function']}: {message}")

    def check_attrs(self, values: Mapping[str, Any], backend: str) -> Dict[str, Any]:
        """Type and range checks of the scalar arguments, in aclnn order (so the first bad one is named).

        Returns the values normalised to Python int / float / str (NumPy scalars are accepted).
        """
        normalised = dict(values)
        for arg in self.attr_args:
            if arg.name not in values:
                continue
            value = values[arg.name]
            rules = arg.resolved(backend)
            if arg.kind == "int":
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise self._error(TypeError, f"{arg.name} must be an int, got {value!r} "
                                                 f"({type(value).__name__})")
                value = int(value)
            elif arg.kind == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise self._error(TypeError, f"{arg.name} must be a float, got {value!r} "
                                                 f"({type(value).__name__})")
                value = float(value)
                if not math.isfinite(value):
                    raise self._error(ValueError, f"{arg.name} must be finite, got {value!r}")
            elif arg.kind == "str":
                if not isinstance(value, str):
                    raise self._error(TypeError, f"{arg.name} must be a str, got {value!r}")
            if not _check_value(rules, value):
                raise self._error(ValueError, f"{arg.name} = {value!r} is not allowed: it must be "
                                              f"{_describe_rules(rules)}")
            normalised[arg.name] = value
        self._check_attr_relations(normalised, backend)
        return normalised

    # Rules between two int attributes: the arg's value must be <=, >= or a multiple of the other's.
    _RELATIONS = {
        "at_most_arg": (lambda a, b: a <= b, "at most"),
        "at_least_arg": (lambda a, b: a >= b, "at least"),
        "multiple_of_arg": (lambda a, b: b != 0 and a % b == 0, "a multiple of"),
    }

    def _check_attr_relations(self, values: Mapping[str, Any], backend: str) -> None:
        for arg in self.attr_args:
            rules = arg.resolved(backend)
            for key, (holds, words) in self._RELATIONS.items():
                other = rules.get(key)
                if other is None or arg.name not in values or other not in values:
                    continue
                if not holds(values[arg.name], values[other]):
                    raise self._error(ValueError, f"{arg.name} = {values[arg.name]!r} must be {words} {other} = "
                                                  f"{values[other]!r}")

    def python_tensor_args(self) -> List[str]:
        """The tensor arguments of the Python function, in its positional order."""
        return [name for name in self.python["positional"]
                if name == "grad" or self.arg(name).kind == "tensor"]

    def bind_dims(self, shapes: Mapping[str, Optional[Sequence[int]]], attrs: Mapping[str, Any],
                  backend: str) -> Dict[str, int]:
        """Binds the dimension symbols from the given shapes and checks every shape and dim rule.

        `shapes` maps argument names to shapes (None or missing for absent optionals). Int arrays
        contribute their length. Raises ValueError naming the argument, the shape and the rule.
        """
        dims: Dict[str, int] = {}
        origin: Dict[str, str] = {}

        def bind(symbol: str, value: int, where: str) -> None:
            if symbol in dims and dims[symbol] != value:
                raise self._error(ValueError, f"{where} is {value} but {origin[symbol]} is {dims[symbol]}; "
                                              f"both are the dimension {symbol} and must agree")
            dims.setdefault(symbol, value)
            origin.setdefault(symbol, where)

        for arg in self.args:
            shape = shapes.get(arg.name)
            if shape is None:
                continue
            shape = tuple(int(s) for s in shape)
            rules = arg.resolved(backend)
            if arg.kind == "int_array" and "length" in rules:
                if len(shape) != 1:
                    raise self._error(ValueError, f"{arg.name} must be 1-D, got shape {list(shape)}")
                bind(rules["length"], shape[0], f"the length of {arg.name}")
            if arg.kind != "tensor":
                continue
            if "rank" in rules and len(shape) != rules["rank"]:
                raise self._error(ValueError, f"{arg.name} must be {rules['rank']}-D, got shape {list(shape)}")
            pattern = rules.get("shape")
            if pattern is None:
                continue
            if len(shape) != len(pattern):
                raise self._error(ValueError, f"{arg.name} must have shape [{', '.join(map(str, pattern))}] "
                                              f"(layout TND), got shape {list(shape)}")
            for axis, (symbol, size) in enumerate(zip(pattern, shape)):
                where = f"{arg.name}.shape[{axis}]"
                if isinstance(symbol, int):
                    if size != symbol:
                        raise self._error(ValueError, f"{where} must be {symbol}, got {size}")
                elif symbol in attrs:
                    if size != attrs[symbol]:
                        raise self._error(ValueError, f"{where} is {size} but must equal {symbol} = "
                                                      f"{attrs[symbol]}")
                else:
                    bind(symbol, size, where)

        for symbol, raw_rules in self.dims.items():
            rules = _for_backend(raw_rules, backend)
            if "ratio" in rules:
                num, den = rules["ratio"]
                if num not in dims or den not in dims:
                    continue
                if dims[num] % dims[den] != 0:
                    raise self._error(ValueError, f"{num} = {dims[num]} ({origin[num]}) must be a multiple of "
                                                  f"{den} = {dims[den]} ({origin[den]})")
                dims[symbol] = dims[num] // dims[den]
                origin[symbol] = f"{num}/{den}"
            if symbol not in dims:
                continue
            value = dims[symbol]
            if not _check_value(rules, value):
                raise self._error(ValueError, f"{symbol} = {value} (from {origin[symbol]}) is not supported "
                                              f"on {backend}: it must be {_describe_rules(rules)}")
            bound = rules.get("at_most")
            if bound is not None and bound in dims and value > dims[bound]:
                raise self._error(ValueError, f"{symbol} = {value} (from {origin[symbol]}) must be at most "
                                              f"{bound} = {dims[bound]} (from {origin[bound]})")

        for arg in self.attr_args:
            target = arg.rules.get("equals")
            if target is not None and arg.name in attrs and target in dims and attrs[arg.name] != dims[target]:
                raise self._error(ValueError, f"{arg.name} = {attrs[arg.name]} must equal {target} = "
                                              f"{dims[target]} ({origin[target]})")
        return dims

    def check_dtypes(self, dtypes: Mapping[str, Optional[str]], backend: str) -> None:
        """`dtypes` maps tensor argument names to dtype names ('float16', ...); None = absent."""
        for arg in self.tensor_args:
            dtype = dtypes.get(arg.name)
            if dtype is None:
                continue
            allowed = self._allowed_dtypes(arg, dtypes, backend)
            if dtype not in allowed:
                rule = arg.resolved(backend)["dtype"]
                if isinstance(rule, dict):
                    raise self._error(TypeError, f"{arg.name} has dtype {dtype} but must have the dtype of "
                                                 f"{rule['same_as']} ({allowed[0]})")
                raise self._error(TypeError, f"{arg.name} has dtype {dtype}; allowed on {backend}: "
                                             f"{', '.join(allowed)}")

    def _allowed_dtypes(self, arg: ArgDef, dtypes: Mapping[str, Optional[str]], backend: str) -> List[str]:
        rule = arg.resolved(backend)["dtype"]
        if isinstance(rule, dict):
            return [dtypes[rule["same_as"]]]
        return list(rule)

    # -- inference ------------------------------------------------------------------------------
    def infer_shapes(self, dims: Mapping[str, int], attrs: Mapping[str, Any]) -> List[List[int]]:
        """Shapes of every output, in aclnn order."""
        return [[s if isinstance(s, int) else (attrs[s] if s in attrs else dims[s]) for s in spec["shape"]]
                for _, spec in self.outputs]

    def infer_dtypes(self, dtypes: Mapping[str, str]) -> List[str]:
        """dtype names of every output, in aclnn order."""
        return [dtypes[spec["dtype"]["same_as"]] if isinstance(spec["dtype"], dict) else spec["dtype"]
                for _, spec in self.outputs]


def _parse(name: str, body: Mapping[str, Any]) -> OpDef:
    args = []
    for arg_name, spec in body["args"].items():
        rules = {k: v for k, v in spec.items() if k not in ("kind", "optional", "default", "note")}
        args.append(ArgDef(arg_name, spec["kind"], rules, bool(spec.get("optional", False)), spec.get("default")))
    return OpDef(
        name=name,
        aclnn=body.get("aclnn"),
        cpu_entry=body["cpu_entry"],
        args=tuple(args),
        dims=body.get("dims", {}),
        outputs=tuple(body["outputs"].items()),
        python=body["python"],
        data_rules=tuple(body.get("data_rules", ())),
    )


@functools.lru_cache(maxsize=None)
def load_op_def(name: str) -> OpDef:
    path = _yaml_dir() / f"{name}.yaml"
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    if list(document) != [name]:
        raise ValueError(f"{path} must define exactly the op {name!r}, found {list(document)}")
    return _parse(name, document[name])


FORWARD = "nsa_select_attention"
BACKWARD = "nsa_select_attention_grad"
