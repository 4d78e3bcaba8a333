"""kvmstub: a stand-in for the host kernel's KVM and AMD SEV firmware.

A daemon (`kvmstub serve`) owns the model of the kernel; VMMs talk to it through
`kvmstub.client`, whose calls mirror the KVM ioctls one for one.
"""
