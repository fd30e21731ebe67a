"""lsp: long-context training of linear-recurrent language models with sequence parallelism.

Public entry points (docs/design.md, The op contract):

- ``lsp.ops.linear_attention`` and ``lsp.ops.delta_rule``: the two op families;
- ``lsp.parallel``: sequence parallelism over ``torch.distributed`` (see that package);
- ``lsp.kernels``: the Triton kernels behind ``backend="triton"``.
"""

import pkgutil as _pkgutil

# The subpackages lsp.kernels, lsp.parallel and lsp.launch live in the repository's top-level
# folders kernels/, parallel/ and launch/ (setuptools package-dir). When Python runs from the
# repository root with a non-editable install, ./lsp shadows the installed package and lacks
# those folders; extend_path adds the installed copy so that they still import.
__path__ = _pkgutil.extend_path(__path__, __name__)

from lsp import ops, parallel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "parallel", "__version__"]
