"""Suite-wide set-up that must happen before any test module is collected.

Triton decides at *its own* import whether its standard-library functions (``tl.sigmoid``,
``tl.cdiv``, ...) are interpreted: imported without ``TRITON_INTERPRET=1`` they are compiled-only
``JITFunction``s, and an interpreted lsp kernel that calls one fails with "Cannot call
@triton.jit'd outside of the scope of a kernel". megatron-core imports Triton, so a test module
that imports megatron and is collected before the kernel tests (``pytest tests/parallel
tests/kernels``) broke them. Importing Triton here, under the interpreter, settles it for the
whole session; the variable is restored at once, and the kernel test modules set it again for
their own imports and tests (``triton_env.interpreted``).

The test folders mirror the package (``ops``, ``kernels``, ``parallel``, ``layers``, ``model``,
``train``, ``data``, ``launch``); shared helpers are in ``lsp.testing``. pytest puts this folder
on ``sys.path`` (it holds this conftest), so the test-only support modules beside it
(``triton_env``, ``train_runs``) import from every folder.
"""

from triton_env import interpreted

with interpreted():
    import triton.language  # noqa: F401
