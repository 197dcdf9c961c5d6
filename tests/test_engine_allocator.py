"""engine/allocator.py: glibc keeps freed memory for reuse, once per process, unless told not to."""

from __future__ import annotations

import platform

import pytest

from timeprest.engine import allocator
from timeprest.errors import ConfigError


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(allocator, "_done", None)
    return monkeypatch


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibc_takes_the_settings_once(fresh: pytest.MonkeyPatch) -> None:
    fresh.delenv(allocator.ENV, raising=False)
    assert allocator.keep_freed_memory() is True
    fresh.setenv(allocator.ENV, "nonsense")  # not read again: the process is set already
    assert allocator.keep_freed_memory() is True


def test_system_leaves_the_allocator_alone(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(allocator.ENV, "system")
    assert allocator.keep_freed_memory() is False


def test_a_bad_setting_is_one_clear_error(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ConfigError, match="TIMEPREST_MALLOC='jemalloc': expected keep"):
        allocator.keep_freed_memory()
    fresh.setenv(allocator.ENV, "keep")  # the failed call left nothing decided
    assert allocator.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
