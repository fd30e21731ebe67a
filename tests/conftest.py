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

The pytest process never holds a process group (``lsp.testing.distributed``: the test ranks are
forked from it, and a fork from a process with gloo's threads can deadlock or crash): a test that
leaves one behind fails in its teardown, naming itself; train or create groups in a child
(``run_in_child``, ``run_ranks``).
"""

import pytest

from triton_env import interpreted

with interpreted():
    import triton.language  # noqa: F401


def _held() -> list[str]:
    from lsp.testing.distributed import process_groups_held

    # cheap unless something is held: garbage is collected only then
    return process_groups_held(collect=False) and process_groups_held()


@pytest.fixture(autouse=True)
def _no_process_group_left_in_the_pytest_process(request):
    before = _held()  # not clean already: an earlier test has failed for it
    yield
    after = _held()
    if after and not before:
        pytest.fail(f"{request.node.nodeid} left {' and '.join(after)} in the pytest process; "
                    "a forked test rank could deadlock or crash on them: train or create process "
                    "groups in a child (lsp.testing.run_in_child or run_ranks)", pytrace=False)
