"""BFCL's own AST checker (from the installed ``bfcl-eval`` source), loaded without its heavy imports,
as the reference twin of ``opdplus.tasks.bfcl_match`` in the tests. Python categories only."""

from __future__ import annotations

import enum
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace


class Language(enum.Enum):
    PYTHON = "python"
    JAVA = "java"
    JAVASCRIPT = "javascript"


class _AnyModel(dict):
    def __missing__(self, key):
        return SimpleNamespace(underscore_to_dot=False)


def load_reference_checker():
    """BFCL's ``ast_checker(func_description, model_output, possible_answer, language, category, model)``."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        raise ModuleNotFoundError("bfcl-eval is not installed: pip install --no-deps bfcl-eval", name="bfcl_eval")
    if not spec.submodule_search_locations:
        raise ModuleNotFoundError("bfcl_eval is not a package directory; reinstall bfcl-eval", name="bfcl_eval")
    source_path = Path(spec.submodule_search_locations[0]) / "eval_checker/ast_eval/ast_checker.py"
    source = source_path.read_text()
    source = re.sub(r"^from bfcl_eval[^\n]*\((?:.|\n)*?\)\n|^from bfcl_eval[^\n]*\n", "", source, flags=re.M)
    namespace = {
        "Language": Language,
        "MODEL_CONFIG_MAPPING": _AnyModel(),
        "JAVA_TYPE_CONVERSION": {},
        "JS_TYPE_CONVERSION": {},
        "java_type_converter": None,
        "js_type_converter": None,
    }
    exec(compile(source, str(source_path), "exec"), namespace)
    checker = namespace["ast_checker"]

    def check(functions, calls, answers, category):
        return checker(functions, calls, answers, Language.PYTHON, category, "reference")["valid"]

    return check
