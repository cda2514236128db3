"""Kernels from source: NVRTC through ``cuda.core``, and the :class:`CudaKernel` handle.

:meth:`CompileCalls.compile` translates NVRTC command-line options into
``cuda.core`` ``ProgramOptions`` fields, compiles to a cubin for the device and
loads the kernel; compile errors become gpuaio errors carrying NVRTC's log.
``cuda.core`` is imported only on the first compile (it takes about 0.5 s).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import cuda.bindings.driver as driver

from ..._core.errors import CudaError, InvalidArgumentError, make_cuda_error
from ._driver import DriverBase, _CUresult

_ERROR_TOKEN = re.compile(r"CUDA_ERROR_[A-Z0-9_]+")


class CudaKernel:
    """A launchable kernel: the handle ``cuLaunchKernel`` takes, plus its layout.

    ``function`` is a ``driver.CUfunction``; for kernels compiled by
    :meth:`CudaBackend.compile` it is the context-independent ``CUkernel``
    cast to ``CUfunction`` (``cuLaunchKernel`` accepts that and runs it in the
    launch stream's context). ``param_sizes`` holds the byte size of every
    parameter when the driver reported it, else ``None``. ``owner`` keeps the
    ``cuda.core`` objects that own the loaded code alive.
    """

    __slots__ = ("device", "function", "name", "owner", "param_sizes")

    def __init__(
        self,
        function: Any,
        name: str,
        device: int | None,
        param_sizes: tuple[int, ...] | None,
        owner: Any = None,
    ) -> None:
        self.function: Any = function
        self.name: str = name
        self.device: int | None = device
        self.param_sizes: tuple[int, ...] | None = param_sizes
        self.owner: Any = owner

    def __repr__(self) -> str:
        return f"<CudaKernel {self.name!r} device={self.device}>"


def _param_sizes(kernel: Any) -> tuple[int, ...] | None:
    """Byte sizes of a ``cuda.core`` kernel's parameters, or ``None`` if unknown."""
    try:
        infos = kernel.arguments_info
        return tuple(int(getattr(info, "size", None) or info[1]) for info in infos)
    except Exception:
        # cuKernelGetParamInfo needs a CUDA 12.4+ driver; without it launches
        # fall back to unchecked lowering.
        return None


# -- compile options ---------------------------------------------------

_BOOL_VALUES = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}
_SWITCHES = {  # NVRTC flag without a value -> ProgramOptions field set to True
    "use_fast_math": "use_fast_math",
    "use-fast-math": "use_fast_math",
    "G": "debug",
    "device-debug": "debug",
    "lineinfo": "lineinfo",
    "generate-line-info": "lineinfo",
    "w": "disable_warnings",
    "disable-warnings": "disable_warnings",
    "restrict": "restrict",
    "extra-device-vectorization": "extra_device_vectorization",
    "device-int128": "device_int128",
    "rdc": "relocatable_device_code",
}
_BOOL_OPTIONS = {  # NVRTC flag=true|false -> ProgramOptions field
    "fmad": "fma",
    "ftz": "ftz",
    "prec-div": "prec_div",
    "prec-sqrt": "prec_sqrt",
    "rdc": "relocatable_device_code",
    "relocatable-device-code": "relocatable_device_code",
}
_LIST_OPTIONS = {  # NVRTC flag=value (repeatable) -> ProgramOptions list field
    "define-macro": "define_macro",
    "undefine-macro": "undefine_macro",
    "include-path": "include_path",
    "pre-include": "pre_include",
    "include": "pre_include",
    "ptxas-options": "ptxas_options",
    "Xptxas": "ptxas_options",
    "diag-suppress": "diag_suppress",
    "diag-error": "diag_error",
    "diag-warn": "diag_warn",
}
_VALUE_OPTIONS = {  # NVRTC flag=value -> ProgramOptions scalar field
    "std": "std",
    "arch": "arch",
    "gpu-architecture": "arch",
    "maxrregcount": "max_register_count",
}
_SHORT_PREFIXES = {"-D": "define_macro", "-U": "undefine_macro", "-I": "include_path"}


def _program_option_fields(arch: str, name: str, options: Sequence[str]) -> dict[str, Any]:
    """Translate NVRTC command-line options into ``cuda.core`` ``ProgramOptions`` fields.

    ``cuda.core`` builds the NVRTC command line itself from typed fields, so
    each supported flag maps to one field; an unknown flag is rejected rather
    than silently dropped.
    """
    fields: dict[str, Any] = {"name": name, "arch": arch}
    lists: dict[str, list[Any]] = {}
    for option in options:
        if not isinstance(option, str):
            raise InvalidArgumentError(f"compile options must be strings, got {option!r}")
        try:
            _parse_option(option, fields, lists)
        except ValueError as exc:
            raise InvalidArgumentError(f"invalid compile option {option!r}: {exc}") from exc
    fields.update(lists)
    return fields


def _parse_option(option: str, fields: dict[str, Any], lists: dict[str, list[Any]]) -> None:
    short = option[:2]
    if short in _SHORT_PREFIXES and len(option) > 2 and not option.startswith("--"):
        key, value = _SHORT_PREFIXES[short], option[2:]
    else:
        flag, sep, value = option.lstrip("-").partition("=")
        if not sep and flag in _SWITCHES:
            fields[_SWITCHES[flag]] = True
            return
        if sep and flag in _BOOL_OPTIONS:
            if value.lower() not in _BOOL_VALUES:
                raise ValueError(f"expected true or false, got {value!r}")
            fields[_BOOL_OPTIONS[flag]] = _BOOL_VALUES[value.lower()]
            return
        if sep and flag in _VALUE_OPTIONS:
            field = _VALUE_OPTIONS[flag]
            fields[field] = int(value) if field == "max_register_count" else value
            return
        if not (sep and flag in _LIST_OPTIONS):
            known = dict.fromkeys((*_SWITCHES, *_BOOL_OPTIONS, *_LIST_OPTIONS, *_VALUE_OPTIONS))
            raise ValueError("unsupported; supported: -D, -U, -I, " + ", ".join(known))
        key = _LIST_OPTIONS[flag]
    if not value:
        raise ValueError("missing value")
    if key == "define_macro":
        macro, has_value, body = value.partition("=")
        lists.setdefault(key, []).append((macro, body if has_value else "1"))
    elif key.startswith("diag_"):
        lists.setdefault(key, []).extend(int(v) for v in value.split(","))
    else:
        lists.setdefault(key, []).append(value)


def _is_nvrtc_error(exc: BaseException) -> bool:
    """Whether ``exc`` is ``cuda.core``'s ``NVRTCError`` (a failed compile, not a missing NVRTC)."""
    return any(cls.__name__ == "NVRTCError" for cls in type(exc).__mro__)


def _core_error_to_cuda(call: str, exc: Exception) -> CudaError | None:
    """Map a ``cuda.core`` ``CUDAError`` naming a ``CUresult`` to a gpuaio error."""
    match = _ERROR_TOKEN.search(str(exc))
    if match is None:
        return None
    err = _CUresult.__members__.get(match.group(0))
    if err is None:
        return None
    return make_cuda_error(call, int(err), match.group(0), str(exc))


class CompileCalls(DriverBase):
    """The ``compile`` call of :class:`~gpuaio.backends.cuda.CudaBackend`."""

    # -- kernels -------------------------------------------------------
    def compile(
        self,
        device: int,
        source: str,
        name: str,
        options: Sequence[str],
        sim: Callable[..., None] | None,
    ) -> CudaKernel:
        """Compile CUDA C++ ``source`` for ``device`` with NVRTC and load kernel ``name``.

        Uses ``cuda.core``: ``Program(source, "c++", ProgramOptions(arch=sm_XY, ...))``
        compiled to a cubin for the device's compute capability, then
        ``ObjectCode.get_kernel(name)``. ``options`` are NVRTC flags; the
        supported ones (``-D``, ``-U``, ``-I``, ``-std=``, ``--use_fast_math``,
        ``--fmad=``, ``--ftz=``, ``--prec-div=``, ``--prec-sqrt=``, ``-G``,
        ``-lineinfo``, ``--maxrregcount=``, ``-arch=`` and a few more) are
        mapped onto ``ProgramOptions`` fields, any other raises
        :class:`~gpuaio._core.errors.InvalidArgumentError`. The kernel name must be
        unmangled (``extern "C"``). Compile errors and unknown kernel names
        raise ``InvalidArgumentError`` with NVRTC's log. ``sim`` is the
        simulated body used by the ``sim`` backend and is ignored here.

        The returned kernel is context-independent (a ``CUkernel``).
        """
        del sim  # only the sim backend runs Python bodies
        if not isinstance(source, str) or not isinstance(name, str):
            raise InvalidArgumentError("kernel source and name must be strings")
        major, minor = self.device_properties(device).compute_capability
        fields = _program_option_fields(f"sm_{major}{minor}", name, options)
        core = importlib.import_module("cuda.core")  # imported lazily: it takes ~0.5 s
        try:
            program_options = core.ProgramOptions(**fields)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"invalid compile options {list(options)!r}: {exc}") from exc
        _, prev = self._enter_device(device)
        try:
            # cuda.core keeps its own notion of the current device: with the
            # device's primary context current this finds it so and switches nothing.
            core.Device(device).set_current()
            kernel, object_code = self._load(core, source, name, program_options)
        finally:
            if prev is not None:
                self._leave(prev)
        function = driver.CUfunction(int(kernel.handle))
        return CudaKernel(function, name, device, _param_sizes(kernel), (kernel, object_code))

    @staticmethod
    def _load(core: Any, source: str, name: str, program_options: Any) -> tuple[Any, Any]:
        """Compile ``source`` to a cubin and get kernel ``name``: ``(kernel, object code)``."""
        program = core.Program(source, code_type="c++", options=program_options)
        try:
            object_code = program.compile("cubin")
        except Exception as exc:
            if not _is_nvrtc_error(exc):
                raise
            # cuda.core's NVRTCError carries NVRTC's log.
            raise InvalidArgumentError(f"compiling kernel {name!r} failed: {exc}") from exc
        finally:
            program.close()
        try:
            kernel = object_code.get_kernel(name)
        except Exception as exc:
            if "CUDA_ERROR_NOT_FOUND" in str(exc):
                raise InvalidArgumentError(
                    f'the compiled source has no kernel named {name!r} (declare it extern "C")'
                ) from exc
            mapped = _core_error_to_cuda("cuLibraryGetKernel", exc)
            if mapped is None:
                raise
            raise mapped from exc
        return kernel, object_code
