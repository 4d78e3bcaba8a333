"""Hypervisor backends behind one interface (DESIGN section 7, layer L2).

`base` holds the interfaces (`Hypervisor`, `Vm`, `Vcpu`) and the opaque `VcpuState`; `abi` the
kernel's numbers a machine reads in exits. Backends: `kvmstub` (the kernel stand-in's daemon),
`model` (the same kernel in-process, for tests). Only these two modules import `kvmstub`.
"""

from .base import (
    DirtyLogVm,
    ExitView,
    HypercallExitView,
    Hypervisor,
    IoExitView,
    NoSevMigration,
    PeerVm,
    SevLaunch,
    SevMigrationVm,
    SevPlatform,
    StateMismatch,
    Vcpu,
    VcpuState,
    Vm,
    check_state,
    fw_error,
    migration_vm,
    sev_platform,
)

__all__ = [
    "DirtyLogVm",
    "ExitView",
    "HypercallExitView",
    "Hypervisor",
    "IoExitView",
    "NoSevMigration",
    "PeerVm",
    "SevLaunch",
    "SevMigrationVm",
    "SevPlatform",
    "StateMismatch",
    "Vcpu",
    "VcpuState",
    "Vm",
    "check_state",
    "fw_error",
    "migration_vm",
    "sev_platform",
]
