"""Shared fixtures: a real kvmstub daemon, run as a subprocess the way an operator runs it, and
VMMs on it. They live in `handoff.testing`, our pytest plugin (also loaded through its `pytest11`
entry point once the package is installed); imported here so that a bare checkout runs too.

    def test_something(kvmstub_daemon):            # `kvmstub serve --socket <tmp>/kvm.sock`
        kvm = await client.open_kvm(kvmstub_daemon.socket)
        ...
        assert kvmstub_daemon.stats()["vms"] == []

    @pytest.mark.kvmstub_args("--sev-es-asids", "1")   # extra `kvmstub serve` flags
    def test_with_one_es_asid(kvmstub_daemon): ...

`kvmstub_factory(directory, *flags)` starts another one (a daemon over a path the test
prepared, a second daemon). On teardown each daemon still running gets SIGTERM, must exit 0
and must have removed its socket. `vmm_factory`, `upgrade` and `serial_check`: see
`handoff.testing`.
"""

from __future__ import annotations

from handoff.testing import KvmstubDaemon, start_kvmstub_daemon  # noqa: F401
from handoff.testing.plugin import (  # noqa: F401 (fixtures and the hook, re-exported for pytest)
    kvmstub_daemon,
    kvmstub_dir,
    kvmstub_factory,
    pytest_configure,
    serial_check,
    upgrade,
    vmm_factory,
)
