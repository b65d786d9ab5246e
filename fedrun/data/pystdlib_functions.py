"""`data=pystdlib_functions`: instruction examples from the documented functions of a folder of
Python sources, by default the running interpreter's standard library (tests excluded; needs no
file). An example's prompt is a function's (or method's) signature and docstring, the source from
`def` through the docstring; its response is the rest of the function's source. Functions
without a docstring are skipped. The client is the top-level module or package (as in
`data=pystdlib`): a natural, non-IID split by subject and author. Files are parsed with `ast`,
never imported or run; a file this Python cannot parse is skipped (and counted in the log)."""
from __future__ import annotations

import ast
import importlib.util
import logging
import re
import sysconfig
from typing import Annotated, Any

from fedrun.components import LocalPath, Range
from fedrun.core import FedrunError
from fedrun.data.examples import FederatedData
from fedrun.data.instructions import Instruction, check_template, instruction_data, natural_clients
from fedrun.data.pystdlib import module_of, python_files, stdlib_identity
from fedrun.data.text import TEST_FRACTION, Tokenizer

log = logging.getLogger(__name__)


class PyStdlibFunctions:
    data_kind = "text"

    def __init__(self, *, root: LocalPath | None, seq_len: Annotated[int, Range(ge=1)],
                 test_fraction: Annotated[float, TEST_FRACTION], min_samples: Annotated[int, Range(ge=1)],
                 max_clients: Annotated[int, Range(ge=1)] | None,
                 max_client_examples: Annotated[int, Range(ge=1)] | None, template: str | None):
        self.root, self.seq_len, self.test_fraction = root, seq_len, test_fraction  # root None: the stdlib
        self.min_samples, self.max_clients, self.max_client_examples = min_samples, max_clients, max_client_examples
        self.template = template
        if template is not None:
            check_template(template)

    def implicit_sources(self) -> list[dict[str, Any]]:
        return stdlib_identity(self.root)

    def load(self, *, seed: int, insert: Any = None, tokenizer: Tokenizer | None = None) -> FederatedData:
        if insert is not None:
            raise FedrunError("audit: the canary audit plants secrets in plain text; data=pystdlib_functions "
                              "is instruction data: use data=pystdlib, or audit=none")
        files, digest = python_files(self.root)
        clients = natural_clients(self.examples(files), min_samples=self.min_samples, max_clients=self.max_clients)
        identity = {"source": "pystdlib_functions", "path": self.root or sysconfig.get_paths()["stdlib"],
                    "bytes": sum(len(content) for _, content in files), "sha256": digest.hex(),
                    "max_client_examples": self.max_client_examples}
        return instruction_data(clients, seq_len=self.seq_len, test_fraction=self.test_fraction,
                                template=self.template, tokenizer=tokenizer, seed=seed, identity=identity)

    def examples(self, files: list) -> list[tuple[str, list[Instruction]]]:
        """Per top-level module (in name order), its documented functions in file and source
        order, the first max_client_examples of them."""
        clients: dict[str, list[Instruction]] = {}
        failed = 0
        for rel, content in files:
            client = clients.setdefault(module_of(rel), [])
            if self.max_client_examples is not None and len(client) >= self.max_client_examples:
                continue  # full: its other files are not parsed
            try:
                client += documented_functions(content)
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError) as e:
                failed += 1
                log.debug("data: %s skipped: %s", rel, e)
            del client[self.max_client_examples or len(client):]
        if failed:
            log.info("data: %s of %s Python files skipped: this Python cannot parse them", failed, len(files))
        return sorted((name, examples) for name, examples in clients.items() if examples)


def documented_functions(source: bytes) -> list[Instruction]:
    """(def .. docstring, rest of the body) of each function with a docstring, in source order;
    both dedented by the def's indentation, the response without the docstring line's end."""
    text = importlib.util.decode_source(source)  # its coding cookie honoured, newlines as "\n"
    tree = ast.parse(text)
    data = text.encode()  # ast's columns count UTF-8 bytes
    starts = [0] + [m.end() for m in re.finditer(rb"\n", data)]
    functions = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda n: (n.lineno, n.col_offset))
    examples = []
    for node in functions:
        if ast.get_docstring(node, clean=False) is None:
            continue
        doc = node.body[0]
        assert doc.end_lineno is not None and doc.end_col_offset is not None
        assert node.end_lineno is not None and node.end_col_offset is not None
        begin = starts[node.lineno - 1] + node.col_offset
        middle = starts[doc.end_lineno - 1] + doc.end_col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        prompt = _dedent(data[begin:middle].decode(), node.col_offset)
        rest = _dedent(data[middle:end].decode(), node.col_offset)
        first, newline, body = rest.partition("\n")
        response = body if newline and not first.strip() else rest
        if response.strip():  # a docstring-only function has nothing to answer with
            examples.append(Instruction(prompt, response))
    return examples


def _dedent(text: str, indent: int) -> str:
    """Up to `indent` leading spaces or tabs off every line after the first (which starts at `def`)."""
    return re.sub(rf"\n[ \t]{{0,{indent}}}", "\n", text) if indent else text
