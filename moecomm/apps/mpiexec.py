"""Which mpiexec `moecomm demo --launcher mpirun` runs, and the command line it builds.

    choice = find_mpiexec()                    # MpiexecChoice(path, reason)
    cmd = mpirun_command(4, [sys.executable, "-m", "moecomm.apps.ep_demo"], choice.path)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import MoeCommValueError, UnsupportedHardwareError

# mpi4py >= 4.1 (the multi-ABI wheel) loads the first of these in a directory it searches
_LIBMPI_NAMES = ("libmpi.so", "libmpi.so.12", "libmpi.so.40", "libmpi.dylib", "libmpi.12.dylib", "libmpi.40.dylib")
_MPIEXEC_NAMES = ("mpiexec", "mpirun")


@dataclass(frozen=True)
class MpiexecChoice:
    """The launcher ``moecomm demo --launcher mpirun`` runs, and why that one.

    Attributes:
        path: the mpiexec/mpirun executable.
        reason: where it was found, e.g. "MOECOMM_MPIEXEC", "beside MPI4PY_LIBMPI=/x/lib/libmpi.so.40".
    """

    path: str
    reason: str


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _launcher_in(bin_dir: str) -> str | None:
    for name in _MPIEXEC_NAMES:
        if _executable(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    return None


def _has_libmpi(lib_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(lib_dir, name)) for name in _LIBMPI_NAMES)


def _libmpi_dirs(libmpi: str) -> list[str]:
    """The lib/ directory of the library mpi4py loads for MPI4PY_LIBMPI (an os.pathsep list of files, or
    of directories holding libmpi.so*: mpi4py takes the first that loads, here the first that exists),
    as given and with its symlinks resolved: a linked lib/ or libmpi.so may hide the prefix it is from."""
    for raw in libmpi.split(os.pathsep):
        raw = os.path.expanduser(os.path.expandvars(raw.strip()))
        if not raw or (os.sep not in raw and not os.path.isdir(raw)):
            continue  # a bare soname: dlopen searches the library path for it, not the working directory
        entry = os.path.abspath(raw)
        if os.path.isfile(entry):
            dirs = [os.path.dirname(entry), os.path.realpath(os.path.dirname(entry)),
                    os.path.dirname(os.path.realpath(entry))]
        elif os.path.isdir(entry) and _has_libmpi(entry):
            dirs = [entry, os.path.realpath(entry)]
        else:
            continue
        return list(dict.fromkeys(dirs))
    return []  # a bare soname (dlopen's search) or nothing that exists: no prefix to look beside


def _python_prefixes() -> list[str]:
    """Prefixes whose lib/ mpi4py's wheel searches for libmpi when MPI4PY_LIBMPI is unset (the venv,
    the user base, the interpreter's own), then the prefix of the python executable (the `mpich` wheel
    puts bin/mpiexec beside python and lib/libmpi.so in the prefix)."""
    import site

    prefixes = []
    if sys.exec_prefix != sys.base_exec_prefix:
        prefixes.append(sys.exec_prefix)
    if site.ENABLE_USER_SITE and site.USER_BASE:
        prefixes.append(os.path.abspath(site.USER_BASE))
    if sys.base_exec_prefix in site.PREFIXES:
        prefixes.append(sys.base_exec_prefix)
    prefixes.append(os.path.dirname(os.path.dirname(os.path.abspath(sys.executable))))
    return list(dict.fromkeys(prefixes))


def _mpi4py_config() -> dict[str, str]:
    try:
        import mpi4py
    except ImportError:
        return {}
    return dict(mpi4py.get_config())  # {} for the PyPI wheel; mpicc=... for builds from source or conda


def find_mpiexec(*, environ: Mapping[str, str] | None = None, mpi4py_config: Mapping[str, str] | None = None,
                 prefixes: Sequence[str] | None = None) -> MpiexecChoice:
    """The mpiexec that belongs to the MPI library mpi4py loads (another starts N singletons, or aborts).

    In order: MOECOMM_MPIEXEC (a path, or a name looked up on PATH); if MPI4PY_LIBMPI is set, the
    mpiexec/mpirun in bin/ beside that library's prefix (lib/../bin); else the one beside mpi4py's own
    MPI: the bin/ of the compilers in mpi4py.get_config() (builds from source), then the bin/ of a
    Python prefix whose lib/ holds libmpi (the `mpich` wheel beside python); last, PATH (under pyenv,
    say, PATH may hold the `mpich` wheel's mpiexec while MPI4PY_LIBMPI points mpi4py at Open MPI).

    Args:
        environ: the environment to read (default os.environ): MOECOMM_MPIEXEC, MPI4PY_LIBMPI, PATH.
        mpi4py_config: default mpi4py.get_config() ({} when mpi4py is not importable).
        prefixes: Python prefixes to look in, default the venv's, user base's and interpreter's.

    Returns:
        MpiexecChoice(path, reason).

    Raises:
        MoeCommValueError: MOECOMM_MPIEXEC names no executable.
        UnsupportedHardwareError: no launcher anywhere; the message lists where it looked.
    """
    env = os.environ if environ is None else environ
    search_path = env.get("PATH", os.defpath)
    forced = env.get("MOECOMM_MPIEXEC", "").strip()
    if forced:
        found = (os.path.abspath(os.path.expanduser(forced)) if os.sep in forced or (os.altsep and os.altsep in forced)
                 else shutil.which(forced, path=search_path))
        if found is None or not _executable(found):
            raise MoeCommValueError("moecomm demo: MOECOMM_MPIEXEC must name an executable mpiexec/mpirun (a path, "
                                    f"or a name on PATH), got {forced!r}")
        return MpiexecChoice(found, "MOECOMM_MPIEXEC")
    looked: list[str] = []
    libmpi = env.get("MPI4PY_LIBMPI", "").strip()
    if libmpi:
        for lib_dir in _libmpi_dirs(libmpi):
            bin_dir = os.path.join(os.path.dirname(lib_dir), "bin")
            looked.append(bin_dir)
            if (exe := _launcher_in(bin_dir)) is not None:
                return MpiexecChoice(exe, f"beside MPI4PY_LIBMPI={libmpi}")
        # no fall-back to the Python prefix's launcher here: mpi4py does not load that prefix's libmpi
        # when MPI4PY_LIBMPI is set, so its mpiexec (the `mpich` wheel's) is the likeliest mismatch
        mismatch_note = (f"; none beside MPI4PY_LIBMPI={libmpi} ({', '.join(looked) or 'no library file found'}), "
                         "so it may belong to another MPI: set MOECOMM_MPIEXEC if the ranks fail")
    else:
        mismatch_note = ""
        config = _mpi4py_config() if mpi4py_config is None else mpi4py_config
        bin_dirs = [os.path.join(config["mpi_dir"], "bin")] if config.get("mpi_dir") else []
        for key in ("mpicc", "mpicxx", "mpifort", "mpif90", "mpild"):
            words = (config.get(key) or "").split()  # "mpicc", or "/opt/mpi/bin/mpicc -some-flag"
            where = words and (words[0] if os.path.isabs(words[0]) else shutil.which(words[0], path=search_path))
            if where:
                bin_dirs.append(os.path.dirname(where))
        for bin_dir in dict.fromkeys(bin_dirs):
            looked.append(bin_dir)
            if (exe := _launcher_in(bin_dir)) is not None:
                return MpiexecChoice(exe, "beside mpi4py's MPI (mpi4py.get_config())")
        for prefix in _python_prefixes() if prefixes is None else prefixes:
            if _has_libmpi(os.path.join(prefix, "lib")):  # the library mpi4py's wheel loads from here
                looked.append(os.path.join(prefix, "bin"))
                if (exe := _launcher_in(os.path.join(prefix, "bin"))) is not None:
                    return MpiexecChoice(exe, f"beside mpi4py's MPI ({os.path.join(prefix, 'lib')})")
    for name in _MPIEXEC_NAMES:
        if (exe := shutil.which(name, path=search_path)) is not None:
            return MpiexecChoice(exe, "PATH" + mismatch_note)
    raise UnsupportedHardwareError(
        f"moecomm demo: launcher 'mpirun' needs {' or '.join(_MPIEXEC_NAMES)}; looked in "
        + "".join(f"{d}, " for d in looked) + f"and on PATH ({search_path}), found none (pip install mpi4py mpich, "
        "or set MOECOMM_MPIEXEC=/path/to/mpiexec)")


def mpirun_command(n: int, program: list[str], mpiexec: str | None = None) -> list[str]:
    """``mpiexec -n N <program>``, with the flags Open MPI needs to run as root and oversubscribed.

    Args:
        n: number of ranks.
        program: the per-rank command line.
        mpiexec: the launcher; default find_mpiexec()'s choice.
    """
    mpiexec = mpiexec or find_mpiexec().path
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    extra = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return [mpiexec, *extra, "-n", str(n), *program]


__all__ = ["MpiexecChoice", "find_mpiexec", "mpirun_command"]
