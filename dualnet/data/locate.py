"""Where datasets are looked for, in order, and how a complete set of files is recognised.

Search roots, first match wins:

1. ``data_dir`` (the ``--data-dir`` option), if given;
2. every directory in ``$DUALNET_DATA`` (``os.pathsep``-separated);
3. the user cache: ``$XDG_CACHE_HOME/dualnet`` or ``~/.cache/dualnet`` (downloads go here);
4. system copies: ``SYSTEM_DIRS`` (Debian's ``dataset-*`` packages install under /usr/share/datasets).

Under each root the files may sit in the root itself or in one of the dataset's sub-folders
(``<root>/<name>/``, ``<root>/MNIST/raw/`` as torchvision lays it out, ...).  A directory counts only
if it holds the *complete* set; partial sets are remembered so the not-found message can say what
is missing where.
"""
import os
from dataclasses import dataclass

from .cifar import BATCH_DIR

SYSTEM_DIRS = ("/usr/share/datasets",)


@dataclass(frozen=True)
class Root:
    """A search root: ``label`` says where it came from (shown in messages and ``Dataset.source``)."""
    label: str
    path: str


@dataclass(frozen=True)
class Location:
    """A complete set of files: ``paths`` maps each role (or batch name) to an existing file."""
    root: Root
    directory: str
    paths: dict
    layout: str = "files"


def cache_dir():
    """The user cache of dualnet: ``$XDG_CACHE_HOME/dualnet``, else ``~/.cache/dualnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dualnet")


def search_roots(data_dir=None, cache=None, system_dirs=None):
    """The ordered list of ``Root``s (see the module docstring); ``cache``/``system_dirs`` override."""
    roots = []
    if data_dir is not None:
        roots.append(Root("data_dir", os.fspath(data_dir)))
    for path in filter(None, os.environ.get("DUALNET_DATA", "").split(os.pathsep)):
        roots.append(Root("$DUALNET_DATA", path))
    roots.append(Root("cache", os.fspath(cache) if cache is not None else cache_dir()))
    for path in (SYSTEM_DIRS if system_dirs is None else system_dirs):
        roots.append(Root("system", os.fspath(path)))
    return roots


def candidate_dirs(spec, root):
    """Directories of ``root`` that may hold ``spec``'s files: the root, then its sub-folders."""
    subdirs = dict.fromkeys((spec.name,) + tuple(spec.subdirs))  # ordered, without repeats
    return [root.path] + [os.path.join(root.path, sub) for sub in subdirs]


def _existing(directory, names):
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _find_idx(spec, directory):
    return {role: _existing(directory, file_spec.local_names()) for role, file_spec in spec.files.items()}


def _find_cifar(spec, directory):
    batch_dir = os.path.join(directory, BATCH_DIR)
    members = {name: _existing(batch_dir, (name,)) for name in spec.members}
    if all(members.values()):
        return members, "directory"
    archive = {role: _existing(directory, (file_spec.name,)) for role, file_spec in spec.files.items()}
    if all(archive.values()) or not any(members.values()):
        return archive, "archive"
    return members, "directory"


def find_in_root(spec, root):
    """``(location or None, partials)``: the first complete set under ``root``; partial sets seen.

    ``partials`` is a list of ``(directory, missing_file_names)`` for directories holding some but
    not all of the files.
    """
    partials = []
    for directory in candidate_dirs(spec, root):
        if not os.path.isdir(directory):
            continue
        if spec.kind == "cifar":
            paths, layout = _find_cifar(spec, directory)
        else:
            paths, layout = _find_idx(spec, directory), "files"
        if all(paths.values()):
            return Location(root, directory, paths, layout), partials
        if any(paths.values()):
            missing = [role if layout == "directory" else spec.files[role].name
                       for role, path in paths.items() if path is None]
            partials.append((os.path.join(directory, BATCH_DIR) if layout == "directory" else directory, missing))
    return None, partials
