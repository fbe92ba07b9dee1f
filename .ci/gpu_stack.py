"""Helpers of .ci/run for its second stack (the GPU machine's software); stdlib only.

    python .ci/gpu_stack.py requirements PYPROJECT   # fastres's dependencies + its test extra
    python .ci/gpu_stack.py sync SRC DST             # mirror SRC's files into DST by content

requirements: the GPU machine installs fastres with --no-deps, so the test environment gets
the project's own dependencies and its `test` extra from pyproject.toml, read here so that a
dependency added there later is picked up without editing .ci/run.

sync: the second stack builds fastres._C in a persistent copy of the tree, so that its build
directory (and the unchanged objects in it) outlives the fresh clone CI runs in. A file is
rewritten only when its content differs, so an unchanged source keeps its old mtime and is
not recompiled; files gone from SRC are removed from DST (build outputs are kept).
"""
import os
import shutil
import subprocess
import sys

# Build outputs of the copy, kept between runs (see setup.py: the persistent build dir).
KEEP = ("build/", "fastres.egg-info/", "fastres/_build_info.json")


def requirements(pyproject):
    import tomllib  # Python >= 3.11, as both stacks have
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        print(requirement)


def tracked_files(src):
    """The files of the tree: git's list where SRC is a checkout, else a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=src, check=True,
                             capture_output=True).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(src, p))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(src):
            dirs[:] = [d for d in dirs if d not in (".git", "build", "__pycache__")]
            files += [os.path.relpath(os.path.join(root, n), src) for n in names
                      if not n.endswith((".so", ".pyc"))]
        return files


def _same(a, b):
    if not os.path.exists(b) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def sync(src, dst):
    files = set(tracked_files(src))
    written = 0
    for rel in sorted(files):
        a, b = os.path.join(src, rel), os.path.join(dst, rel)
        if not _same(a, b):
            os.makedirs(os.path.dirname(b), exist_ok=True)
            shutil.copy2(a, b)
            os.utime(b)  # newer than any object built from the old content
            written += 1
    removed = 0
    for root, dirs, names in os.walk(dst):
        rel_root = os.path.relpath(root, dst)
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not (rel_root + d + "/").startswith(KEEP)
                   and d not in ("__pycache__", ".pytest_cache", ".hypothesis")]
        for name in names:
            rel = rel_root + name
            if rel not in files and not rel.startswith(KEEP) and not name.endswith(".so"):
                os.remove(os.path.join(root, name))
                removed += 1
    print(f"synced {len(files)} files into {dst}: {written} written, {removed} removed")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"requirements": requirements, "sync": sync}[command](*args)
