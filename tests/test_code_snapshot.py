"""A local sweep's workers run a copy of the code taken when the sweep started (sweep/code_snapshot.py):
the copy holds every package file and nothing compiled, and spawned workers import from it, not from
the checkout."""
import pathlib
import textwrap

from cameo_bench.sweep import code_snapshot
from cameo_bench.sweep.executors import run_local

REPO = pathlib.Path(__file__).resolve().parents[1]


def _files(root, package):
    return {p.relative_to(root) for p in (root / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_copy_holds_every_package_file_links_gin_and_carries_the_git_tags(tmp_path):
    snap = code_snapshot.take(tmp_path / "code", {"git.sha": "abc123", "git.dirty": "true"})
    for package in ("cameo_bench", "backbones"):
        assert _files(snap.root, package) == _files(REPO, package)
    assert not list(snap.root.rglob("__pycache__")) and not list(snap.root.rglob("*.pyc"))
    assert (snap.root / "cameo_bench" / "sweep" / "executors.py").read_bytes() == \
        (REPO / "cameo_bench" / "sweep" / "executors.py").read_bytes()
    assert (snap.root / "gin").resolve() == (REPO / "gin").resolve()  # includes resolve as in the checkout
    assert snap.tags == {"git.sha": "abc123", "git.dirty": "true", "sweep.code": str(snap.root)}
    assert snap.root.parent == (tmp_path / "code").resolve()


def test_pool_workers_import_the_copy_and_not_the_checkout(tmp_path):
    snap = code_snapshot.take(tmp_path / "code", {})
    # An edit that exists only in the copy: a worker that runs the copy reports where its code came from.
    with open(snap.root / "cameo_bench" / "sweep" / "executors.py", "a") as f:
        f.write(textwrap.dedent("""

            def run_trial(payload):
                import cameo_bench
                return TrialResult(payload["trial"], "FAILED", "copy:" + cameo_bench.__file__)
            """))
    payload = {"trial": "t0", "tracking_uri": f"sqlite:///{tmp_path / 'unused.db'}", "gin_files": [], "bindings": []}
    [result] = list(run_local([payload], workers=1, code_root=snap.root))
    assert result.error == "copy:" + str(snap.root / "cameo_bench" / "__init__.py")
    [control] = list(run_local([payload], workers=1))  # without the copy the checkout's run_trial runs
    assert not (control.error or "").startswith("copy:")
    assert str(snap.root) not in __import__("sys").path  # the parent's path is restored
