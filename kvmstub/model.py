"""The host kernel as kvmstub plays it: KVM's VMs and vCPUs, AMD SEV inside KVM, and the SEV
firmware, with the kernel's checks, their order and their errnos.

Pure and synchronous: no sockets, no trio, no fds of its own (guest memory is reached only
through `kvmstub.memory.GuestMemory`, which the VMM's memfds back). The daemon owns fds and
credentials; it passes the sender's pid as `mm` to every VM and vCPU call, and this module
enforces `kvm->mm != current->mm || kvm->vm_dead -> EIO` (reference section 4).

Errors are `OSError(errno, message)` with the kernel's errno. A failed SEV firmware command is
`SevFwError`, an `OSError(EIO)` whose `fw_error` is the SEV status code (what KVM puts in
`kvm_sev_cmd.error`).

"The reference" below is kernel-sev-migration.md; section numbers (section 1 step 6, ...)
point into it. The kernel code followed is mainline `arch/x86/kvm/svm/sev.c` ([S1]), plus the
in-flight vCPU creation check of [S2].

Objects:
- `Host`: /dev/kvm plus the platform: ASID pool (SEV-ES ASIDs 1..min_sev_asid-1, SEV ASIDs
  min_sev_asid..max_sev_asid, freed ASIDs reusable only after a flush, as sev_alloc_asid does),
  misc cgroup charging, the SEV firmware. The default pool is an EPYC 7003 (Milan): 509 ASIDs
  with the BIOS "SEV-ES ASID space limit" at 100, so 99 SEV-ES ASIDs and 410 SEV ASIDs.
- `Vm`: struct kvm with its `SevInfo` (struct kvm_sev_info) and memory slots.
- `Vcpu`: registers (the kernel's copy), and for SEV-ES the VMSA, which holds the live
  registers once `guest_state_protected` is set and which MOVE carries to the destination.
- `SevFirmware`: guest contexts (handle, policy, VEK, TIK, launch digest, bound ASID) and the
  guest state machine of section 6 as a transition table.

Choices where the kernel or firmware leaves the model free (each marked where it is made):
- Memory addresses in SEV commands and encrypted regions are guest physical addresses (the
  daemon cannot see the VMM's address space). "Pinning" a range means every page of it is
  backed by a memory slot; an unbacked page fails as `pin_user_pages` does in sev_pin_memory:
  ENOMEM. The kernel's `dst_uaddr == 0 -> EINVAL` test of DBG is dropped (GPA 0 is valid).
- The model has no fd numbers: `SevInfo.fd` says whether kvm_sev_info.fd names /dev/sev.
  LAUNCH_START records it; MOVE does not transfer it (section 2 observation), so every later
  command from the destination that goes through sev_issue_cmd fails with EBADF, as on the
  kernel when fd 0 is not /dev/sev. A VMM that needs the policy after a move caches it.
- LAUNCH_UPDATE_DATA must be page aligned (firmware INVALID_ADDRESS / INVALID_LEN otherwise):
  private pages are AES-XTS with the page's GPA as tweak, so a partial page cannot be
  encrypted in place. Real firmware only needs 16-byte alignment.
- LAUNCH_START checks, in this order: a non-zero handle names a guest (INVALID_GUEST);
  reserved bits 6..15 set -> INVALID_PARAM; ES
  without SEV-ES on the platform -> UNSUPPORTED; API_MAJOR.MINOR above the firmware's ->
  POLICY_FAILURE; key sharing (non-zero handle) with NOKS set on either side or unequal
  policies -> POLICY_FAILURE. ACTIVATE then fails with POLICY_FAILURE when the policy's ES
  bit does not match the ASID's range (so an SEV-ES VM needs an ES policy and vice versa),
  and KVM decommissions the new context, as sev_launch_start does.
- Firmware commands check, in order: the handle names a guest (INVALID_GUEST), the guest
  state (INVALID_GUEST_STATE, table FIRMWARE_TRANSITIONS), the policy (POLICY_FAILURE: NODBG
  for DBG_*, NOSEND for SEND_START), an ASID bound to the guest (INACTIVE), then parameters.
- A second LAUNCH_UPDATE_VMSA succeeds, as the selftest's sev_vm_create needs (reference
  section 5: it sends one from sev_vm_launch and one more itself): mainline
  sev_es_sync_vmsa does not test guest_state_protected, the firmware guest is still in
  LUPDATE because no LAUNCH_MEASURE was sent, so KVM re-syncs each VMSA from the kernel's
  register copy and the firmware encrypts (and measures) it again.
- get_regs/set_regs fail with EINVAL once guest_state_protected is set, for every SEV-ES VM.
  The kernel refuses only for VM types with protected state (KVM_X86_SEV_ES_VM); a legacy
  KVM_SEV_ES_INIT VM gets KVM's stale register cache back. The model refuses rather than lie.
- KVM_RUN of an SEV VM without a firmware context bound to its ASID (no LAUNCH_START yet), or
  of an SEV-ES vCPU whose VMSA was never encrypted, returns KVM_EXIT_FAIL_ENTRY (VMRUN fails
  with VMEXIT_INVALID on hardware). KVM_RUN with no memory backing a page the guest touches
  raises OSError(EFAULT), what KVM_RUN returns when a guest page cannot be faulted in
  (KVM_EXIT_MEMORY_FAULT needs KVM_CAP_MEMORY_FAULT_INFO, which the stub does not offer).
- A pending exit (IN data, hypercall return) stays with its vCPU; MOVE does not carry it, as
  KVM's complete_userspace_io stays in the source vCPU. The VMM completes pending exits
  (KVM_RUN with immediate_exit) before it pauses.
- KVM_CAP_EXIT_HYPERCALL is per VM (kvm->arch) and is not moved: the new VMM enables it.
  So are the MSR filter, KVM_CAP_X86_USER_SPACE_MSR, manual dirty-log protection and the
  dirty logs (per slot of each VM), and the CPUID table is per vCPU: MOVE carries none.
- The guest's hypercalls other than KVM_HC_MAP_GPA_RANGE, and its MSRs, are not KVM's in
  the stub: every other hypercall is -KVM_ENOSYS, every MSR write is "unsupported" (what
  KVM says of MSR_KVM_MIGRATION_CONTROL, the only one the guest writes). CPUID leaves
  missing from the vCPU's table read as zeros (an AMD host's answer).
- `move_into_dead_ok` (reference section 2, "Pending change"): VM ioctls then skip the
  vm_dead half of the gate, so MOVE back into a moved-from VM succeeds; vCPU creation and
  vCPU ioctls on a dead VM still fail with EIO (Sean Christopherson's stated plan).
- The VM locks of sev_lock_two_vms are never contended here (no signals: its EINTR never
  fires). kvm_lock_all_vcpus (MOVE step 7) is a real wait: `Vm.enable_cap_steps` yields the
  vCPUs whose mutexes MOVE needs and the daemon resumes it once no KVM_RUN holds them.
  Contention is `SevInfo.migration_in_progress`, which a test may set to prove EBUSY. vCPU
  creation is atomic; `Vm.created_vcpus` may be raised by a test to stand for a creation in
  flight.
- Misc cgroups are flat: every cgroup is a child of the root "/", charges go to both, and
  each level checks its max and the capacity (misc_cg_try_charge: EBUSY over the limit,
  EINVAL for a zero capacity). `Host(cgroup_of=...)` maps an mm to its cgroup; by default
  every process is in "/". The kernel's accounting is followed where it is odd: an SEV-ES
  MOVE across cgroups charges SEV to the destination and uncharges SEV from the source
  (section 1 step 6 observation), and moving a mirror charges the destination's cgroup
  (a mirror has no misc_cg, so it never equals the caller's) with nothing ever uncharging it.
  Usage may go negative where the kernel would WARN; `Host.warnings` records it.

Cross-host migration (sev-live-migration.md sections 1.2-1.6): the firmware's SEND_START,
SEND_UPDATE_DATA, SEND_FINISH, SEND_CANCEL, RECEIVE_START, RECEIVE_UPDATE_DATA and
RECEIVE_FINISH with their checks in the firmware's order and their status codes, and the
crypto of `kvmstub.sev_crypto` byte for byte; the platform (`SevFirmware.platform`, a
`kvmstub.platform.Platform`: PDH key, PEK/OCA/CEK certificates under a simulated AMD root) and
its state UNINIT/INIT/WORKING; the /dev/sev commands PLATFORM_STATUS and PDH_CERT_EXPORT
(`Host.sev_issue_cmd`). Choices:
- The firmware trusts one AMD root: the one its platform's CEK is signed under (AMD's key id
  and the fused hash of its key, in amd_cert_validate_ark). A chain under another root fails
  SEND_START with INVALID_CERTIFICATE (policy SEV); a CEK that root did not sign,
  BAD_SIGNATURE. Each certificate's signature is checked before its fields (sev_cert.c).
- The platform is INIT from the start (the ccp driver INITs it at probe), WORKING from the
  first LAUNCH_START or RECEIVE_START, INIT again when DECOMMISSION removes the last guest.
- KVM_RUN of a guest whose context is SENT fails with EIO: stub policy, not kernel behaviour
  (KVM does not stop a sent guest; the VMM must never run it again).
- Buffers the kernel copies out (session, header, transport) are named by a non-zero
  `*_uaddr` and a length and come back as bytes; buffers it copies in are bytes.

Left out: SEV-SNP (VM type 4 is refused at creation; SNP command ids fail as they do on a
non-SNP VM), SEND/RECEIVE_UPDATE_VMSA (KVM has no handler: EINVAL), LAUNCH_SECRET (state
checked, then BAD_MEASUREMENT: no guest-owner session exists to wrap a secret),
GET_ATTESTATION_REPORT (firmware UNSUPPORTED), the blob-length query of LAUNCH_MEASURE, the
/dev/sev commands other than PLATFORM_STATUS and PDH_CERT_EXPORT (EOPNOTSUPP),
RLIMIT_MEMLOCK, and vm_bugged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac

from kvmstub import guest as guest_program
from kvmstub import sev_crypto, uapi
from kvmstub.memory import GuestMemory
from kvmstub.platform import Platform
from kvmstub.sev_crypto import AmdCert, BadMac, BadSignature, MalformedCertificate, SevCert
from kvmstub.uapi import PAGE_SIZE, REG_NAMES, CpuidEntry, MsrFilterRange, Regs, RunExit

# Kernel constants the uapi module does not carry (include/uapi/linux/kvm.h, asm/kvm.h).
KVM_X86_DEFAULT_VM = 0
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_CAP_VM_TYPES = 235
KVM_EXIT_FAIL_ENTRY = 9
KVM_MAX_VCPUS = 1024
# An x86 vCPU id is its APIC id, which encodes the topology and may exceed the vCPU count:
# KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO (arch/x86/include/asm/kvm_host.h).
KVM_VCPU_ID_RATIO = 4
KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << uapi.KVM_HC_MAP_GPA_RANGE
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2
SEV_SUPPORTED_VMSA_FEATURES = 0  # no DEBUG_SWAP on the modelled platform
ULONG_MAX = (1 << 64) - 1
KMALLOC_MAX_SIZE = 4 << 20  # the largest buffer kzalloc gives the SEND_UPDATE_DATA copies

# EPYC 7003 (Milan): max_sev_asid 509, BIOS SEV-ES ASID space limit 100.
DEFAULT_SEV_ES_ASIDS = 99
DEFAULT_SEV_ASIDS = 410

# Misc cgroup resources (MISC_CG_RES_SEV, MISC_CG_RES_SEV_ES).
MISC_SEV = "sev"
MISC_SEV_ES = "sev_es"
ROOT_CGROUP = "/"

# sev_mem_enc_ioctl: the commands a mirror VM may issue (is_cmd_allowed_from_mirror).
MIRROR_ALLOWED_CMDS = frozenset(
    {
        uapi.KVM_SEV_LAUNCH_UPDATE_VMSA,
        uapi.KVM_SEV_GUEST_STATUS,
        uapi.KVM_SEV_DBG_DECRYPT,
        uapi.KVM_SEV_DBG_ENCRYPT,
    }
)

# Policy bits 6..15 are reserved; 16..23 API_MAJOR, 24..31 API_MINOR (reference section 6).
SEV_POLICY_RESERVED = 0xFFC0
SEV_POLICY_MASK = 0xFFFFFFFF

_UNINIT = uapi.SEV_GUEST_STATE_UNINIT
_LUPDATE = uapi.SEV_GUEST_STATE_LUPDATE
_LSECRET = uapi.SEV_GUEST_STATE_LSECRET
_RUNNING = uapi.SEV_GUEST_STATE_RUNNING
_SUPDATE = uapi.SEV_GUEST_STATE_SUPDATE
_RUPDATE = uapi.SEV_GUEST_STATE_RUPDATE
_SENT = uapi.SEV_GUEST_STATE_SENT

SEV_PLATFORM_INIT = uapi.SEV_STATE_INIT
SEV_PLATFORM_WORKING = uapi.SEV_STATE_WORKING
SEV_PLATFORM_STATE_NAMES = uapi.SEV_STATE_NAMES

_LIVE_STATES = (_LUPDATE, _LSECRET, _RUNNING, _SUPDATE, _RUPDATE)

# The firmware's guest state machine (state_tbl_sev in AMD's sev_guest.c; reference section 6):
# command -> {state before: state after}. A command issued in a state missing from its row
# fails with INVALID_GUEST_STATE. LAUNCH_START and RECEIVE_START create the guest, so their
# row starts from UNINIT; DECOMMISSION removes a guest from any state and has no row.
# ACTIVATE is refused in SENT: that is the anti-cloning rule (a sent guest never runs again).
# Rows for DBG_* and ACTIVATE list every live state (a model choice: the ASPFW table was not
# re-read for them).
FIRMWARE_TRANSITIONS: dict[str, dict[int, int]] = {
    "LAUNCH_START": {_UNINIT: _LUPDATE},
    "LAUNCH_UPDATE_DATA": {_LUPDATE: _LUPDATE},
    "LAUNCH_UPDATE_VMSA": {_LUPDATE: _LUPDATE},
    "LAUNCH_MEASURE": {_LUPDATE: _LSECRET},
    "LAUNCH_SECRET": {_LSECRET: _LSECRET},
    "LAUNCH_FINISH": {_LSECRET: _RUNNING},
    "SEND_START": {_RUNNING: _SUPDATE},
    "SEND_UPDATE_DATA": {_SUPDATE: _SUPDATE},
    "SEND_FINISH": {_SUPDATE: _SENT},
    "SEND_CANCEL": {_SUPDATE: _RUNNING},
    "RECEIVE_START": {_UNINIT: _RUPDATE},
    "RECEIVE_UPDATE_DATA": {_RUPDATE: _RUPDATE},
    "RECEIVE_FINISH": {_RUPDATE: _RUNNING},
    "ACTIVATE": {s: s for s in _LIVE_STATES},
    "DBG_DECRYPT": {s: s for s in _LIVE_STATES},
    "DBG_ENCRYPT": {s: s for s in _LIVE_STATES},
    "GUEST_STATUS": {s: s for s in (*_LIVE_STATES, _SENT)},
}


class SevFwError(OSError):
    """A failed SEV firmware command: errno EIO, as KVM returns it, and the SEV status code
    (`kvm_sev_cmd.error`) in `fw_error`."""

    def __init__(
        self, fw_error: int, message: str, fields: dict[str, int | bytes] | None = None
    ) -> None:
        super().__init__(errno.EIO, message)
        self.fw_error = fw_error
        # Output fields KVM copies back even though the command failed (the lengths of the
        # query convention, SEND_START's policy and session_len).
        self.fields: dict[str, int | bytes] = dict(fields or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.fw_error, self.strerror, self.fields))


def _err(code: int, message: str) -> OSError:
    return OSError(code, f"{message} ({errno.errorcode.get(code, code)})")


# --------------------------------------------------------------------------------------------
# SEV firmware


@dataclass(eq=False)
class GuestContext:
    """One firmware guest context (GCTX): what the firmware knows of a guest."""

    handle: int
    policy: int
    vek: bytes  # AES-256-XTS key, 64 bytes; shared with another guest under key sharing
    tik: bytes  # transport integrity key, signs LAUNCH_MEASURE
    state: int = _UNINIT
    asid: int = 0  # bound by ACTIVATE, 0 when inactive
    launch_digest: Any = field(default_factory=hashlib.sha256)  # GCTX.LD, running SHA-256
    channel: Channel | None = None  # the transport channel of SEND_* / RECEIVE_*

    def digest(self) -> bytes:
        return bytes(self.launch_digest.copy().digest())


@dataclass(eq=False)
class Channel:
    """A guest's transport channel (sev_channel.c): TEK and TIK, opened by SEND_START or
    RECEIVE_START, zeroed by SEND_FINISH, SEND_CANCEL and RECEIVE_FINISH."""

    tek: bytearray
    tik: bytearray
    # The packet crypto under these keys, made at the channel's first packet and dropped
    # with the keys. It is keyed from the channel's own buffers and copies neither: it holds
    # only OpenSSL contexts (the TEK's key schedule, the TIK's keyed SHA-256 states), which
    # OpenSSL cleanses when the dropped cipher frees them.
    _packets: sev_crypto.PacketCipher | None = field(default=None, init=False, repr=False)

    def packets(self) -> sev_crypto.PacketCipher:
        """`seal_packet` and `open_packet` under this channel's TEK and TIK."""
        cipher = self._packets
        if cipher is None:
            cipher = self._packets = sev_crypto.PacketCipher(self.tek, self.tik)
        return cipher

    def zero(self) -> None:
        """sev_channel_close: the keys zeroed in place (the session's nonce and the master
        secret are never kept past SEND_START / RECEIVE_START)."""
        self.tek[:] = bytes(len(self.tek))
        self.tik[:] = bytes(len(self.tik))
        self._packets = None


class SevFirmware:
    """The SEV firmware (the PSP): guest contexts by handle, each guest's state, keys, policy,
    and the ASIDs bound to them; the platform (its state and its identity, `platform`).
    Commands raise SevFwError with the SEV status code."""

    def __init__(
        self,
        *,
        es_supported: bool,
        is_es_asid: Callable[[int], bool],
        platform: Platform | None = None,
    ) -> None:
        self.contexts: dict[int, GuestContext] = {}
        self.asid_owner: dict[int, int] = {}
        self._es_supported = es_supported
        self._is_es_asid = is_es_asid
        self._next_handle = 1
        self.platform = platform if platform is not None else Platform.ephemeral()
        # The ccp driver INITs the platform when it probes (sev_platform_init); the first
        # guest makes it WORKING and decommissioning the last one makes it INIT again.
        self.platform_state = SEV_PLATFORM_INIT

    def _require_platform(self, command: str, *allowed: int) -> None:
        if self.platform_state not in allowed:
            raise SevFwError(
                uapi.SEV_RET_INVALID_PLATFORM_STATE,
                f"firmware: {command}: platform is {SEV_PLATFORM_STATE_NAMES[self.platform_state]}",
            )

    # -- helpers

    def guest(self, handle: int) -> GuestContext:
        ctx = self.contexts.get(handle)
        if ctx is None:
            raise SevFwError(uapi.SEV_RET_INVALID_GUEST, f"firmware: no guest with handle {handle}")
        return ctx

    def _next_state(self, ctx: GuestContext, command: str) -> int:
        new = FIRMWARE_TRANSITIONS[command].get(ctx.state)
        if new is None:
            name = uapi.SEV_GUEST_STATE_NAMES[ctx.state]
            raise SevFwError(
                uapi.SEV_RET_INVALID_GUEST_STATE,
                f"firmware: {command} is not allowed for guest {ctx.handle} in state {name}",
            )
        return new

    @staticmethod
    def _require_active(ctx: GuestContext, command: str) -> None:
        if not ctx.asid:
            raise SevFwError(
                uapi.SEV_RET_INACTIVE, f"firmware: {command}: guest {ctx.handle} has no ASID"
            )

    def _checked_active(self, handle: int, command: str) -> tuple[GuestContext, int]:
        ctx = self.guest(handle)
        new = self._next_state(ctx, command)
        self._require_active(ctx, command)
        return ctx, new

    # -- launch

    def launch_start(self, handle: int, policy: int) -> GuestContext:
        """LAUNCH_START: a new guest in LUPDATE with a fresh VEK, or sharing the VEK of guest
        `handle` when it is non-zero (key sharing)."""
        shared = self.guest(handle) if handle else None
        if policy & ~SEV_POLICY_MASK or policy & SEV_POLICY_RESERVED:
            raise SevFwError(
                uapi.SEV_RET_INVALID_PARAM, f"firmware: reserved policy bits set in {policy:#x}"
            )
        if policy & uapi.SEV_POLICY_ES and not self._es_supported:
            raise SevFwError(uapi.SEV_RET_UNSUPPORTED, "firmware: SEV-ES is not enabled")
        api = ((policy >> 16) & 0xFF, (policy >> 24) & 0xFF)
        if api > (uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR):
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE,
                f"firmware: policy needs API {api[0]}.{api[1]}, firmware is "
                f"{uapi.SEV_API_MAJOR}.{uapi.SEV_API_MINOR}",
            )
        if shared is not None and (
            shared.policy != policy or (policy | shared.policy) & uapi.SEV_POLICY_NOKS
        ):
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE,
                f"firmware: key sharing with guest {handle} needs equal policies and NOKS clear",
            )
        ctx = GuestContext(
            handle=self._next_handle,
            policy=policy,
            vek=shared.vek if shared is not None else os.urandom(64),
            tik=os.urandom(16),
        )
        ctx.state = FIRMWARE_TRANSITIONS["LAUNCH_START"][_UNINIT]
        self._next_handle += 1
        self.contexts[ctx.handle] = ctx
        self.platform_state = SEV_PLATFORM_WORKING
        return ctx

    def activate(self, handle: int, asid: int) -> None:
        ctx = self.guest(handle)
        self._next_state(ctx, "ACTIVATE")
        owner = self.asid_owner.get(asid)
        if owner is not None and owner != handle:
            raise SevFwError(
                uapi.SEV_RET_ASID_OWNED, f"firmware: ASID {asid} is bound to guest {owner}"
            )
        if bool(ctx.policy & uapi.SEV_POLICY_ES) != self._is_es_asid(asid):
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE,
                f"firmware: policy {ctx.policy:#x} does not fit "
                f"{'an SEV-ES' if self._is_es_asid(asid) else 'an SEV'} ASID ({asid})",
            )
        ctx.asid = asid
        self.asid_owner[asid] = handle

    def deactivate(self, handle: int) -> None:
        ctx = self.guest(handle)
        if ctx.asid:
            del self.asid_owner[ctx.asid]
        ctx.asid = 0

    def decommission(self, handle: int) -> None:
        ctx = self.guest(handle)
        if ctx.asid:
            raise SevFwError(uapi.SEV_RET_ACTIVE, f"firmware: guest {handle} is still active")
        if ctx.channel is not None:
            ctx.channel.zero()
        del self.contexts[handle]
        if not self.contexts:
            self.platform_state = SEV_PLATFORM_INIT

    def launch_update_data(self, handle: int, memory: GuestMemory, gpa: int, length: int) -> None:
        """Encrypt [gpa, gpa+length) in place with the guest's VEK and measure the plaintext."""
        ctx, new = self._checked_active(handle, "LAUNCH_UPDATE_DATA")
        # Model restriction (module docstring): whole pages only.
        if gpa % PAGE_SIZE:
            raise SevFwError(uapi.SEV_RET_INVALID_ADDRESS, "firmware: address not page aligned")
        if length % PAGE_SIZE:
            raise SevFwError(uapi.SEV_RET_INVALID_LEN, "firmware: length not a page multiple")
        for page in range(gpa, gpa + length, PAGE_SIZE):
            plain = memory.read_page(page, None)
            ctx.launch_digest.update(plain)
            memory.write_page(page, plain, ctx.vek)
        ctx.state = new

    def launch_update_vmsa(self, handle: int, vmsa_image: bytes) -> None:
        ctx, new = self._checked_active(handle, "LAUNCH_UPDATE_VMSA")
        ctx.launch_digest.update(vmsa_image)
        ctx.state = new

    def launch_measure(self, handle: int) -> tuple[bytes, bytes]:
        """LAUNCH_MEASURE: (MEASURE, MNONCE), MEASURE = HMAC-SHA256 keyed with the TIK over
        0x04 || API_MAJOR || API_MINOR || BUILD || POLICY || LD || MNONCE (SEV API 6.5)."""
        ctx = self.guest(handle)
        new = self._next_state(ctx, "LAUNCH_MEASURE")
        mnonce = os.urandom(16)
        mac = hmac.HMAC(ctx.tik, hashes.SHA256())
        mac.update(bytes([0x04, uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR, uapi.SEV_BUILD]))
        mac.update(ctx.policy.to_bytes(4, "little"))
        mac.update(ctx.digest())
        mac.update(mnonce)
        ctx.state = new
        return mac.finalize(), mnonce

    def launch_secret(self, handle: int) -> None:
        ctx = self.guest(handle)
        self._next_state(ctx, "LAUNCH_SECRET")
        raise SevFwError(
            uapi.SEV_RET_BAD_MEASUREMENT,
            "firmware: LAUNCH_SECRET packet does not verify (the stub has no guest-owner session)",
        )

    def launch_finish(self, handle: int) -> None:
        ctx = self.guest(handle)
        ctx.state = self._next_state(ctx, "LAUNCH_FINISH")

    def guest_status(self, handle: int) -> GuestContext:
        ctx = self.guest(handle)
        self._next_state(ctx, "GUEST_STATUS")
        return ctx

    # -- debug

    def _dbg_checked(self, handle: int, command: str) -> GuestContext:
        ctx = self.guest(handle)
        self._next_state(ctx, command)
        if ctx.policy & uapi.SEV_POLICY_NODBG:
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE, f"firmware: {command}: guest policy has NODBG"
            )
        self._require_active(ctx, command)
        return ctx

    def dbg_decrypt(self, handle: int, memory: GuestMemory, gpa: int, length: int) -> bytes:
        """Decrypt within one page (KVM splits requests at page boundaries)."""
        ctx = self._dbg_checked(handle, "DBG_DECRYPT")
        base, offset = gpa - gpa % PAGE_SIZE, gpa % PAGE_SIZE
        return memory.read_page(base, ctx.vek)[offset : offset + length]

    def dbg_encrypt(self, handle: int, memory: GuestMemory, gpa: int, data: bytes) -> None:
        """Encrypt `data` into guest memory within one page (read-modify-write of the page)."""
        ctx = self._dbg_checked(handle, "DBG_ENCRYPT")
        base, offset = gpa - gpa % PAGE_SIZE, gpa % PAGE_SIZE
        page = bytearray(memory.read_page(base, ctx.vek))
        page[offset : offset + len(data)] = data
        memory.write_page(base, bytes(page), ctx.vek)

    # -- platform commands (/dev/sev)

    def platform_status(self) -> dict[str, int | bytes]:
        """PLATFORM_STATUS: struct sev_user_data_status (flags bit 8: SEV-ES configured)."""
        return {
            "api_major": self.platform.api[0],
            "api_minor": self.platform.api[1],
            "state": self.platform_state,
            "flags": (1 << 8) if self._es_supported else 0,
            "build": uapi.SEV_BUILD,
            "guest_count": len(self.contexts),
        }

    def pdh_cert_export(self, pdh_cert_len: int, cert_chain_len: int) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT: (PDH certificate, PEK || OCA || CEK). Buffers too small (the
        length query sends 0 for both) -> INVALID_LEN with both lengths written back."""
        self._require_platform("PDH_CERT_EXPORT", SEV_PLATFORM_INIT, SEV_PLATFORM_WORKING)
        pdh, chain = self.platform.pdh_cert_export()
        if pdh_cert_len < len(pdh) or cert_chain_len < len(chain):
            raise SevFwError(
                uapi.SEV_RET_INVALID_LEN,
                f"firmware: PDH_CERT_EXPORT needs {len(pdh)} and {len(chain)} bytes",
                fields={"pdh_cert_len": len(pdh), "cert_chain_len": len(chain)},
            )
        return pdh, chain

    # -- migration (reference sev-live-migration.md sections 1.2, 1.3, 1.5)
    #
    # Each command runs the checks of section 1.3 in the firmware's order; the status code of
    # the first that fails is the command's. Where a check writes a length back (the query
    # convention of section 1.6), the SevFwError carries it in `fields`.

    def _verify_target_chain(
        self, policy: int, pdh: bytes, plat_certs: bytes, amd_certs: bytes
    ) -> SevCert:
        """SEND_START's certificate checks by the guest's policy (section 1.3; AMD-ASPFW
        sev_mcmd.c validate_platform and validate_domain, amd_cert.c, sev_cert.c: each
        certificate's signature is checked before its fields). Returns the target's PDH
        certificate once it passed the sanity check of sev_channel_open_client."""
        cert_len = sev_crypto.SEV_CERT_LEN
        try:
            if policy & uapi.SEV_POLICY_SEV:
                if (
                    len(plat_certs) != 3 * cert_len
                    or len(pdh) != cert_len
                    or len(amd_certs) != 2 * sev_crypto.amd_cert_len()
                ):
                    raise SevFwError(
                        uapi.SEV_RET_INVALID_LEN, "firmware: SEND_START: certificate lengths"
                    )
                ask = AmdCert.parse(amd_certs[: len(amd_certs) // 2])
                ark = AmdCert.parse(amd_certs[len(amd_certs) // 2 :])
                # amd_cert_validate_ark: self-signed, then AMD's root key id and the fused
                # hash of its key: this firmware trusts its own platform's (simulated) root.
                ark.validate(ark, sev_crypto.USAGE_ARK)
                ours = self.platform.root.ark_public().public_numbers()
                if ark.key_id != sev_crypto.amd_key_id(self.platform.root.ark_public()) or (
                    ark.public_key.public_numbers() != ours
                ):
                    raise MalformedCertificate("the chain's ARK is not this firmware's AMD root")
                ask.validate(ark, sev_crypto.USAGE_ASK)
                pek, _oca, cek = self._platform_certs(plat_certs)
                target = SevCert.parse(pdh)
                sev_crypto.verify_sev_cert_signed_by(cek, ask.signer())
                sev_crypto.verify_sev_cert_signed_by(pek, cek.signer())
                sev_crypto.verify_sev_cert_signed_by(target, pek.signer())
                if (pek.api_major, pek.api_minor) < _policy_api(policy):
                    raise SevFwError(
                        uapi.SEV_RET_POLICY_FAILURE,
                        f"firmware: SEND_START: target firmware API {pek.api_major}."
                        f"{pek.api_minor} is below the policy's minimum "
                        f"{_policy_api(policy)[0]}.{_policy_api(policy)[1]}",
                    )
            if policy & uapi.SEV_POLICY_DOMAIN:
                if len(plat_certs) != 3 * cert_len or len(pdh) != cert_len:
                    raise SevFwError(
                        uapi.SEV_RET_INVALID_LEN, "firmware: SEND_START: certificate lengths"
                    )
                pek, oca, _cek = self._platform_certs(plat_certs)
                target = SevCert.parse(pdh)
                sev_crypto.verify_sev_cert_signed_by(oca, oca.signer())
                sev_crypto.verify_sev_cert_signed_by(pek, oca.signer())
                sev_crypto.verify_sev_cert_signed_by(target, pek.signer())
                if oca.raw != self.platform.oca_cert:  # memcmp of the whole certificate
                    raise SevFwError(
                        uapi.SEV_RET_POLICY_FAILURE,
                        "firmware: SEND_START: the target is not in this platform's domain "
                        "(its OCA differs)",
                    )
            # sev_channel_open_client: the PDH's length, then its sanity (usage PDH, ECDH).
            if len(pdh) != cert_len:
                raise SevFwError(uapi.SEV_RET_INVALID_LEN, "firmware: SEND_START: PDH length")
            target = SevCert.parse(pdh)
            sev_crypto.expect(target, sev_crypto.USAGE_PDH, sev_crypto.ALGO_ECDH_SHA256)
        except MalformedCertificate as e:
            raise SevFwError(
                uapi.SEV_RET_INVALID_CERTIFICATE, f"firmware: SEND_START: {e}"
            ) from None
        except BadSignature as e:
            raise SevFwError(uapi.SEV_RET_BAD_SIGNATURE, f"firmware: SEND_START: {e}") from None
        return target

    @staticmethod
    def _platform_certs(plat_certs: bytes) -> tuple[SevCert, SevCert, SevCert]:
        """PEK, OCA, CEK of a PEK || OCA || CEK blob (pdh_cert_chain_t)."""
        n = sev_crypto.SEV_CERT_LEN
        pek, oca, cek = (SevCert.parse(plat_certs[i * n : (i + 1) * n]) for i in range(3))
        return pek, oca, cek

    def send_start(
        self, handle: int, pdh: bytes, plat_certs: bytes, amd_certs: bytes, session_len: int
    ) -> tuple[bytes, int]:
        """SEND_START: (session blob, policy); the guest goes RUNNING -> SUPDATE with a fresh
        channel keyed for the platform whose PDH certificate is `pdh`."""
        self._require_platform("SEND_START", SEV_PLATFORM_WORKING)
        ctx = self.guest(handle)
        if session_len != sev_crypto.SESSION_LEN:
            raise SevFwError(
                uapi.SEV_RET_INVALID_LEN,
                f"firmware: SEND_START: the session buffer must be {sev_crypto.SESSION_LEN} "
                f"bytes, not {session_len}",
                fields={"session_len": sev_crypto.SESSION_LEN},
            )
        new = self._next_state(ctx, "SEND_START")
        if ctx.policy & uapi.SEV_POLICY_NOSEND:
            raise SevFwError(uapi.SEV_RET_POLICY_FAILURE, "firmware: SEND_START: policy NOSEND")
        target = self._verify_target_chain(ctx.policy, pdh, plat_certs, amd_certs)
        shared = sev_crypto.ecdh_shared_secret(self.platform.keys.pdh, target.ec_public_key())
        nonce = os.urandom(sev_crypto.KEY_LEN)
        tek, tik = os.urandom(sev_crypto.KEY_LEN), os.urandom(sev_crypto.KEY_LEN)
        keys = sev_crypto.derive_channel_keys(shared, nonce)
        session = sev_crypto.wrap_session(keys, nonce, tek, tik, ctx.policy)
        ctx.channel = Channel(bytearray(tek), bytearray(tik))
        ctx.state = new
        return session.pack(), ctx.policy

    def send_update_data(
        self,
        handle: int,
        memory: GuestMemory | None,
        gpa: int,
        guest_len: int,
        hdr_len: int,
        trans_len: int,
        *,
        vmsa: bool = False,
    ) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA (SEND_UPDATE_VMSA with `vmsa`, which KVM never issues): (packet
        header, ciphertext) of guest [gpa, gpa+guest_len), decrypted with the VEK and
        re-encrypted for the wire with the TEK (MAC context 0x02 for both, as this firmware
        does)."""
        command = "SEND_UPDATE_VMSA" if vmsa else "SEND_UPDATE_DATA"
        self._require_platform(command, SEV_PLATFORM_WORKING)
        if hdr_len < sev_crypto.PACKET_HEADER_LEN:  # before the handle, as in the firmware
            raise SevFwError(
                uapi.SEV_RET_INVALID_LEN,
                f"firmware: {command}: the header is {sev_crypto.PACKET_HEADER_LEN} bytes",
                fields={"hdr_len": sev_crypto.PACKET_HEADER_LEN},
            )
        ctx = self.guest(handle)
        self._next_state(ctx, "SEND_UPDATE_DATA")
        self._require_es_for_vmsa(ctx, vmsa, command)
        self._require_active(ctx, command)
        if (
            not 0 < guest_len <= sev_crypto.MAX_PACKET_LEN
            or guest_len % 16
            or trans_len < guest_len
        ):
            raise SevFwError(
                uapi.SEV_RET_INVALID_LEN,
                f"firmware: SEND_UPDATE_DATA: guest length {guest_len:#x}, transport length "
                f"{trans_len:#x}",
            )
        if gpa % 16:
            raise SevFwError(
                uapi.SEV_RET_INVALID_ADDRESS, f"firmware: SEND_UPDATE_DATA: {gpa:#x} not aligned"
            )
        assert memory is not None and ctx.channel is not None  # KVM pinned; SUPDATE has one
        plaintext = _read_private(memory, ctx.vek, gpa, guest_len)
        return ctx.channel.packets().seal(plaintext)

    @staticmethod
    def _require_es_for_vmsa(ctx: GuestContext, vmsa: bool, command: str) -> None:
        if vmsa and not ctx.policy & uapi.SEV_POLICY_ES:
            raise SevFwError(
                uapi.SEV_RET_UNSUPPORTED, f"firmware: {command}: guest {ctx.handle} is not SEV-ES"
            )

    def send_finish(self, handle: int) -> None:
        """SEND_FINISH: SUPDATE -> SENT, channel zeroed. The guest never runs again here."""
        self._close_channel(handle, "SEND_FINISH")

    def send_cancel(self, handle: int) -> None:
        """SEND_CANCEL: SUPDATE -> RUNNING, channel zeroed; a later SEND_START may follow."""
        self._close_channel(handle, "SEND_CANCEL")

    def _close_channel(self, handle: int, command: str) -> None:
        self._require_platform(command, SEV_PLATFORM_WORKING)
        ctx = self.guest(handle)
        new = self._next_state(ctx, command)
        if ctx.channel is not None:
            ctx.channel.zero()
            ctx.channel = None
        ctx.state = new

    def receive_start(self, handle: int, policy: int, pdh: bytes, session: bytes) -> GuestContext:
        """RECEIVE_START: a new guest in RUPDATE whose channel is unwrapped from `session` with
        this platform's PDH private key and the source's PDH certificate `pdh`. The source's
        chain is not verified (section 1.3)."""
        self._require_platform("RECEIVE_START", SEV_PLATFORM_INIT, SEV_PLATFORM_WORKING)
        if len(session) != sev_crypto.SESSION_LEN:
            raise SevFwError(uapi.SEV_RET_INVALID_LEN, "firmware: RECEIVE_START: session length")
        if len(pdh) != sev_crypto.SEV_CERT_LEN:
            raise SevFwError(uapi.SEV_RET_INVALID_LEN, "firmware: RECEIVE_START: PDH length")
        try:
            source = SevCert.parse(pdh)
            sev_crypto.expect(source, sev_crypto.USAGE_PDH, sev_crypto.ALGO_ECDH_SHA256)
            source_key = source.ec_public_key()
        except MalformedCertificate as e:
            raise SevFwError(
                uapi.SEV_RET_INVALID_CERTIFICATE, f"firmware: RECEIVE_START: source PDH: {e}"
            ) from None
        blob = sev_crypto.Session.unpack(session)
        shared = sev_crypto.ecdh_shared_secret(self.platform.keys.pdh, source_key)
        keys = sev_crypto.derive_channel_keys(shared, blob.nonce)
        try:
            tek, tik = sev_crypto.unwrap_session(keys, blob)
            sev_crypto.verify_policy_mac(tik, policy, blob)
        except BadMac as e:
            raise SevFwError(
                uapi.SEV_RET_BAD_MEASUREMENT, f"firmware: RECEIVE_START: {e}"
            ) from None
        if _policy_api(policy) > self.platform.api or policy & SEV_POLICY_RESERVED:
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE,
                f"firmware: RECEIVE_START: policy {policy:#x} needs a newer API or sets "
                "reserved bits",
            )
        shared_ctx = self.guest(handle) if handle else None
        if shared_ctx is not None and (
            shared_ctx.policy != policy or (policy | shared_ctx.policy) & uapi.SEV_POLICY_NOKS
        ):
            raise SevFwError(
                uapi.SEV_RET_POLICY_FAILURE,
                f"firmware: RECEIVE_START: key sharing with guest {handle} needs equal "
                "policies and NOKS clear",
            )
        if policy & uapi.SEV_POLICY_ES and not self._es_supported:
            raise SevFwError(uapi.SEV_RET_UNSUPPORTED, "firmware: SEV-ES is not enabled")
        ctx = GuestContext(
            handle=self._next_handle,
            policy=policy,
            vek=shared_ctx.vek if shared_ctx is not None else os.urandom(64),
            tik=os.urandom(16),
        )
        ctx.channel = Channel(bytearray(tek), bytearray(tik))
        ctx.state = FIRMWARE_TRANSITIONS["RECEIVE_START"][_UNINIT]
        self._next_handle += 1
        self.contexts[ctx.handle] = ctx
        self.platform_state = SEV_PLATFORM_WORKING
        return ctx

    def receive_update_data(
        self,
        handle: int,
        memory: GuestMemory | None,
        gpa: int,
        guest_len: int,
        hdr: bytes,
        trans: bytes,
        *,
        vmsa: bool = False,
    ) -> None:
        """RECEIVE_UPDATE_DATA: verify the packet's MAC (any failure: BAD_MEASUREMENT, guest
        memory unchanged), decrypt it with the TEK and write it under this guest's VEK."""
        command = "RECEIVE_UPDATE_VMSA" if vmsa else "RECEIVE_UPDATE_DATA"
        self._require_platform(command, SEV_PLATFORM_WORKING)
        ctx = self.guest(handle)
        self._next_state(ctx, "RECEIVE_UPDATE_DATA")
        self._require_es_for_vmsa(ctx, vmsa, command)
        self._require_active(ctx, command)
        trans_len = len(trans)
        if (
            not 0 < trans_len <= sev_crypto.MAX_PACKET_LEN
            or guest_len != trans_len
            or trans_len % 16
            or len(hdr) < sev_crypto.PACKET_HEADER_LEN
        ):
            raise SevFwError(
                uapi.SEV_RET_INVALID_LEN,
                f"firmware: RECEIVE_UPDATE_DATA: guest length {guest_len:#x}, transport "
                f"length {trans_len:#x}, header {len(hdr)} bytes",
            )
        if gpa % 16:
            raise SevFwError(
                uapi.SEV_RET_INVALID_ADDRESS,
                f"firmware: RECEIVE_UPDATE_DATA: {gpa:#x} not aligned",
            )
        header = sev_crypto.PacketHeader.unpack(hdr)
        if header.flags & sev_crypto.PACKET_FLAG_COMPRESSED:
            raise SevFwError(
                uapi.SEV_RET_UNSUPPORTED, "firmware: RECEIVE_UPDATE_DATA: compressed packet"
            )
        assert memory is not None and ctx.channel is not None  # KVM pinned; RUPDATE has one
        try:
            plaintext = ctx.channel.packets().open(header, trans)
        except BadMac as e:
            raise SevFwError(
                uapi.SEV_RET_BAD_MEASUREMENT, f"firmware: RECEIVE_UPDATE_DATA: {e}"
            ) from None
        _write_private(memory, ctx.vek, gpa, plaintext)

    def receive_finish(self, handle: int) -> None:
        """RECEIVE_FINISH: RUPDATE -> RUNNING, channel zeroed."""
        self._close_channel(handle, "RECEIVE_FINISH")


def _policy_api(policy: int) -> tuple[int, int]:
    """The minimum firmware API (major, minor) a policy asks for (bits 16-23, 24-31)."""
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


def _read_private(memory: GuestMemory, vek: bytes, gpa: int, length: int) -> bytes:
    """Guest bytes [gpa, gpa+length) as the guest sees them privately (decrypted)."""
    if length == PAGE_SIZE and not gpa % PAGE_SIZE:  # a whole page, as migration reads
        return memory.read_page(gpa, vek)
    out = bytearray()
    while len(out) < length:
        base, offset = gpa - gpa % PAGE_SIZE, gpa % PAGE_SIZE
        chunk = min(PAGE_SIZE - offset, length - len(out))
        out += memory.read_page(base, vek)[offset : offset + chunk]
        gpa += chunk
    return bytes(out)


def _write_private(memory: GuestMemory, vek: bytes, gpa: int, data: bytes) -> None:
    """Write `data` privately (encrypted with `vek`) at gpa, read-modify-write per page."""
    if len(data) == PAGE_SIZE and not gpa % PAGE_SIZE and type(data) is bytes:
        memory.write_page(gpa, data, vek)  # a whole page, as migration writes
        return
    done = 0
    while done < len(data):
        base, offset = gpa - gpa % PAGE_SIZE, gpa % PAGE_SIZE
        chunk = min(PAGE_SIZE - offset, len(data) - done)
        if chunk == PAGE_SIZE:
            page = bytearray(data[done : done + chunk])
        else:
            page = bytearray(memory.read_page(base, vek))
            page[offset : offset + chunk] = data[done : done + chunk]
        memory.write_page(base, bytes(page), vek)
        gpa += chunk
        done += chunk


# --------------------------------------------------------------------------------------------
# ASIDs and misc cgroups


class AsidPool:
    """The SEV ASID bitmaps of sev.c: ASIDs 1..min_sev_asid-1 for SEV-ES, min_sev_asid..max
    for SEV. A freed ASID goes to the reclaim set and is reused only after a flush, which
    sev_alloc_asid does once when its range is exhausted (and which frees both ranges)."""

    def __init__(self, *, sev_asids: int, sev_es_asids: int) -> None:
        if sev_asids < 0 or sev_es_asids < 0:
            raise ValueError("ASID counts must not be negative")
        self.min_sev_asid = sev_es_asids + 1
        self.max_sev_asid = sev_es_asids + sev_asids
        self.in_use: set[int] = set()
        self.reclaim: set[int] = set()
        self.flushes = 0

    def is_es(self, asid: int) -> bool:
        return 1 <= asid < self.min_sev_asid

    def bounds(self, es: bool) -> tuple[int, int]:
        return (1, self.min_sev_asid - 1) if es else (self.min_sev_asid, self.max_sev_asid)

    def alloc(self, es: bool) -> int | None:
        low, high = self.bounds(es)
        for attempt in range(2):
            for asid in range(low, high + 1):
                if asid not in self.in_use and asid not in self.reclaim:
                    self.in_use.add(asid)
                    return asid
            # __sev_recycle_asids: flush only when the range has something to reclaim.
            if attempt or not any(low <= a <= high for a in self.reclaim):
                return None
            self.reclaim.clear()
            self.flushes += 1
        return None

    def free(self, asid: int) -> None:
        self.in_use.remove(asid)
        self.reclaim.add(asid)

    def counts(self, es: bool) -> dict[str, int]:
        low, high = self.bounds(es)
        total = max(0, high - low + 1)
        used = sum(1 for a in self.in_use if low <= a <= high)
        pending = sum(1 for a in self.reclaim if low <= a <= high)
        return {"total": total, "used": used, "free": total - used, "reclaim_pending": pending}


class MiscCgroups:
    """misc cgroup charging for the "sev" and "sev_es" resources, flat under the root."""

    def __init__(self, capacity: dict[str, int], warnings: list[str]) -> None:
        self.capacity = dict(capacity)
        self.usage: dict[str, dict[str, int]] = {}
        self.max: dict[str, dict[str, int]] = {}
        self._warnings = warnings
        self._levels(ROOT_CGROUP)

    def _levels(self, cg: str) -> list[str]:
        for level in (cg, ROOT_CGROUP):
            self.usage.setdefault(level, {MISC_SEV: 0, MISC_SEV_ES: 0})
        return [cg] if cg == ROOT_CGROUP else [cg, ROOT_CGROUP]

    def set_max(self, cg: str, resource: str, value: int) -> None:
        self._levels(cg)
        self.max.setdefault(cg, {})[resource] = value

    def try_charge(self, cg: str, resource: str) -> None:
        """misc_cg_try_charge(type, cg, 1): EINVAL for a zero capacity, EBUSY over a limit."""
        capacity = self.capacity[resource]
        if not capacity:
            raise _err(errno.EINVAL, f"misc cgroup: {resource} has no capacity")
        levels = self._levels(cg)
        for i, level in enumerate(levels):
            new = self.usage[level][resource] + 1
            limit = self.max.get(level, {}).get(resource, capacity)
            if new > limit or new > capacity:
                for done in levels[:i]:
                    self.usage[done][resource] -= 1
                raise _err(errno.EBUSY, f"misc cgroup {level}: {resource} over its limit")
            self.usage[level][resource] = new

    def uncharge(self, cg: str | None, resource: str) -> None:
        if cg is None:  # misc_cg_uncharge(type, NULL, 1) does nothing
            return
        for level in self._levels(cg):
            self.usage[level][resource] -= 1
            if self.usage[level][resource] < 0:
                self._warnings.append(f"misc cgroup {level}: {resource} usage became negative")


# --------------------------------------------------------------------------------------------
# KVM objects


@dataclass(eq=False)
class EncRegion:
    """An entry of regions_list (KVM_MEMORY_ENCRYPT_REG_REGION): pinned guest pages."""

    addr: int
    size: int
    npages: int


@dataclass(eq=False)
class SevInfo:
    """struct kvm_sev_info (reference section 0). `fd` says whether kvm_sev_info.fd names
    /dev/sev: the model has no fd numbers, and False stands for the kernel's 0."""

    active: bool = False
    es_active: bool = False
    asid: int = 0
    handle: int = 0
    fd: bool = False
    policy: int = 0
    pages_locked: int = 0
    regions_list: list[EncRegion] = field(default_factory=list)
    mirror_vms: list[Vm] = field(default_factory=list)
    enc_context_owner: Vm | None = None
    misc_cg: str | None = None
    migration_in_progress: bool = False
    need_init: bool = False
    vmsa_features: int = 0
    ghcb_version: int = 0
    ap_jump_table: int = 0


@dataclass(eq=False)
class Vmsa:
    """An SEV-ES VMSA page. Opaque to the VMM: it holds the vCPU's live registers once the
    firmware has encrypted it, and only MOVE carries it to another VM."""

    regs: Regs
    sev_features: int = 0

    def image(self) -> bytes:
        """The page the firmware encrypts and measures."""
        data = b"".join(getattr(self.regs, n).to_bytes(8, "little") for n in REG_NAMES)
        data += self.sev_features.to_bytes(8, "little")
        return data.ljust(PAGE_SIZE, b"\0")


class _GuestPages:
    """The guest's view of memory (guest.PageAccess): private pages through the VEK of the
    VM's firmware context, shared pages (and every page of a plain VM) in the clear."""

    def __init__(self, memory: GuestMemory, vek: bytes | None) -> None:
        self._memory = memory
        self._vek = vek

    def read_page(self, gpa: int, private: bool) -> bytes:
        return self._memory.read_page(gpa, self._vek if private else None)

    def write_page(self, gpa: int, data: bytes, private: bool) -> None:
        # A guest write: marked in the dirty log of a slot that keeps one.
        self._memory.write_guest_page(gpa, data, self._vek if private else None)


# --------------------------------------------------------------------------------------------
# What KVM does for the guest's CPUID, WRMSR and VMCALL (guest.CpuAccess)

_X2APIC_MSRS = range(0x800, 0x900)
# kvm_set_msr_with_filter's results that may go to userspace, and the kvm_run.msr.reason
# each becomes (kvm_msr_reason): a filtered MSR, and one KVM does not implement.
_MSR_RET_FILTERED = "filtered"
_MSR_RET_UNSUPPORTED = "unsupported"
_MSR_REASON = {
    _MSR_RET_FILTERED: uapi.KVM_MSR_EXIT_REASON_FILTER,
    _MSR_RET_UNSUPPORTED: uapi.KVM_MSR_EXIT_REASON_UNKNOWN,
}


@dataclass(frozen=True)
class MsrFilter:
    """kvm->arch.msr_filter, as KVM_X86_SET_MSR_FILTER installs it."""

    default_allow: bool
    ranges: tuple[MsrFilterRange, ...]

    def allowed(self, index: int, access: int) -> bool:
        """kvm_msr_allowed: the first range that covers `index` for this access decides;
        none does: the default. x2APIC MSRs are never filtered."""
        if index in _X2APIC_MSRS:
            return True
        for r in self.ranges:
            if r.base <= index < r.base + r.nmsrs and r.flags & access:
                bit = index - r.base
                return bool(r.bitmap[bit >> 3] >> (bit & 7) & 1)
        return self.default_allow


def emulate_hypercall(
    vm: Vm, nr: int, a0: int, a1: int, a2: int, a3: int, *, op_64_bit: bool = True, cpl: int = 0
) -> RunExit | int:
    """KVM's hypercall handling (____kvm_emulate_hypercall, arch/x86/kvm/x86.c) for what
    kvmstub knows: KVM_HC_MAP_GPA_RANGE (reference sev-live-migration.md section 2).

    Returns the KVM_EXIT_HYPERCALL exit for the VMM (whose `hypercall.ret` then goes to RAX
    at the next KVM_RUN, complete_hypercall_exit), or the value KVM puts in RAX itself, as
    a u64: -KVM_EPERM from CPL > 0; -KVM_ENOSYS for MAP_GPA_RANGE when the VMM did not
    enable its exit with KVM_CAP_EXIT_HYPERCALL, and for every other hypercall number (the
    stub implements none of KVM's own); -KVM_EINVAL for a GPA not page aligned, no pages,
    or a range that wraps (`gpa_to_gfn(gpa) + npages <= gpa_to_gfn(gpa)`). KVM does not look
    at the attributes (a2): reserved bits and page sizes are the VMM's to refuse.
    """
    m = uapi.U64_MASK
    if not op_64_bit:  # 32-bit callers: registers truncated, and so is the return value
        nr, a0, a1, a2, a3 = (x & 0xFFFFFFFF for x in (nr, a0, a1, a2, a3))
    m_ret = m if op_64_bit else 0xFFFFFFFF
    if cpl:
        return -uapi.KVM_EPERM & m_ret
    if nr != uapi.KVM_HC_MAP_GPA_RANGE:
        return -uapi.KVM_ENOSYS & m_ret
    gpa, npages, attrs = a0 & m, a1 & m, a2 & m
    if not vm.exit_hypercall & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
        return -uapi.KVM_ENOSYS & m_ret
    gfn = gpa >> 12
    if gpa & (PAGE_SIZE - 1) or not npages or (gfn + npages) & m <= gfn:
        return -uapi.KVM_EINVAL & m_ret
    return RunExit(
        uapi.KVM_EXIT_HYPERCALL,
        hypercall=uapi.HypercallExit(nr, (gpa, npages, attrs, 0, 0, 0), int(op_64_bit)),
    )


def emulate_wrmsr(vm: Vm, index: int, data: int) -> RunExit | bool:
    """WRMSR from the guest (kvm_emulate_wrmsr, arch/x86/kvm/x86.c): the MSR filter first
    (kvm_set_msr_with_filter: a denied write is KVM_MSR_RET_FILTERED), then KVM's own MSRs,
    of which the stub models none: MSR_KVM_MIGRATION_CONTROL in particular is not KVM's
    (Documentation/virt/kvm/x86/msr.rst: userspace must filter it). A failed write exits
    to userspace (KVM_EXIT_X86_WRMSR) when the VM asked for that reason with
    KVM_CAP_X86_USER_SPACE_MSR (kvm_msr_user_space); else the guest takes #GP (False)."""
    index &= 0xFFFFFFFF
    data &= uapi.U64_MASK
    msr_filter = vm.msr_filter
    if msr_filter is not None and not msr_filter.allowed(index, uapi.KVM_MSR_FILTER_WRITE):
        result = _MSR_RET_FILTERED
    else:
        result = _MSR_RET_UNSUPPORTED
    reason = _MSR_REASON[result]
    if not vm.user_space_msr_mask & reason:
        return False
    return RunExit(uapi.KVM_EXIT_X86_WRMSR, msr=uapi.MsrExit(reason, index, data))


class _GuestCpu:
    """guest.CpuAccess for one vCPU: CPUID from its KVM_SET_CPUID2 table, WRMSR and VMCALL
    as KVM handles them."""

    __slots__ = ("_vcpu",)

    def __init__(self, vcpu: Vcpu) -> None:
        self._vcpu = vcpu

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        return self._vcpu.cpuid(function, index)

    def wrmsr(self, index: int, value: int) -> RunExit | bool:
        return emulate_wrmsr(self._vcpu.vm, index, value)

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int) -> RunExit | int:
        return emulate_hypercall(self._vcpu.vm, nr, a0, a1, a2, a3)


class Vcpu:
    """struct kvm_vcpu. `regs` is KVM's register copy; for SEV-ES, once
    `guest_state_protected` is set, the live registers are in `vmsa`."""

    def __init__(self, vm: Vm, vcpu_id: int, index: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.index = index  # vcpu_idx: creation order, what MOVE pairs vCPUs by
        self.regs = Regs()
        self.vmsa: Vmsa | None = None
        self.guest_state_protected = False
        self.pending: RunExit | None = None
        self.steps = 0
        self.slice_left_ns = 0  # guest time left in the current KVM_RUN's slice
        self.fd_open = True
        self.cpuid_entries: tuple[CpuidEntry, ...] = ()  # KVM_SET_CPUID2
        self.has_run = False  # kvm_vcpu_has_run: KVM_RUN got as far as entering the guest
        self._cpu = _GuestCpu(self)

    def _gate(self, mm: int, what: str) -> None:
        # kvm_vcpu_ioctl: kvm->mm != current->mm || kvm->vm_dead -> EIO (reference section 4).
        # With move_into_dead_ok vCPU ioctls of a dead VM still fail (section 2, pending change).
        vm = self.vm
        if mm != vm.creator:
            raise _err(errno.EIO, f"{what}: caller {mm} did not create VM {vm.id}")
        if vm.dead:
            raise _err(errno.EIO, f"{what}: VM {vm.id} is dead")

    def get_regs(self, mm: int) -> Regs:
        self._gate(mm, "KVM_GET_REGS")
        if self.guest_state_protected:
            raise _err(errno.EINVAL, "KVM_GET_REGS: guest state is protected (SEV-ES VMSA)")
        return self.regs

    def set_regs(self, mm: int, regs: Regs) -> None:
        self._gate(mm, "KVM_SET_REGS")
        if self.guest_state_protected:
            raise _err(errno.EINVAL, "KVM_SET_REGS: guest state is protected (SEV-ES VMSA)")
        self.regs = regs

    def _live_regs(self) -> Regs:
        if self.guest_state_protected:
            assert self.vmsa is not None
            return self.vmsa.regs
        return self.regs

    def _set_live_regs(self, regs: Regs) -> None:
        if self.guest_state_protected:
            assert self.vmsa is not None
            self.vmsa.regs = regs
        else:
            self.regs = regs

    def _complete_pending(
        self, io_data: bytes | None, hypercall_ret: int | None, msr_error: int | None = None
    ) -> None:
        # complete_userspace_io: IN data, the hypercall's return value or the MSR access's
        # error into the guest, as the kernel reads them from kvm_run (guest.complete pads
        # or defaults what is missing).
        if self.pending is not None:
            regs = guest_program.complete(
                self._live_regs(), self.pending, io_data, hypercall_ret, msr_error
            )
            self._set_live_regs(regs)
            self.pending = None

    # -- CPUID (KVM_SET_CPUID2)

    def set_cpuid2(self, mm: int, entries: Sequence[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (kvm_vcpu_ioctl_set_cpuid2, kvm_set_cpuid in arch/x86/kvm/cpuid.c):
        E2BIG for more than KVM_MAX_CPUID_ENTRIES; once the vCPU has run, only the very same
        table is accepted (kvm_cpuid_check_equal: EINVAL otherwise). The kernel's checks of
        the contents (XSAVE sizes, MAXPHYADDR, Hyper-V leaves) are not modelled."""
        self._gate(mm, "KVM_SET_CPUID2")
        if len(entries) > uapi.KVM_MAX_CPUID_ENTRIES:
            raise _err(errno.E2BIG, f"KVM_SET_CPUID2: {len(entries)} entries")
        table = tuple(entries)
        if self.has_run:
            if table != self.cpuid_entries:
                raise _err(errno.EINVAL, "KVM_SET_CPUID2: the vCPU has run; CPUID is fixed")
            return
        self.cpuid_entries = table

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        """What the guest's CPUID returns (kvm_cpuid): the entry for `function` (and `index`,
        where the entry says the index matters), else zeros (an AMD host's answer for a
        leaf the table lacks)."""
        for e in self.cpuid_entries:
            if e.function == function and (
                not e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == index
            ):
                return e.eax, e.ebx, e.ecx, e.edx
        return 0, 0, 0, 0

    def run(
        self,
        mm: int,
        *,
        immediate_exit: bool = False,
        io_data: bytes | None = None,
        hypercall_ret: int | None = None,
        msr_error: int | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> RunExit:
        """KVM_RUN: complete the pending exit, then run the guest for one slice.

        `interrupted` stands for a signal sent to the vCPU thread: checked between guest
        steps, it ends the slice early with KVM_EXIT_INTR (the VMM's kick). The daemon,
        which interleaves the vCPUs of every VM, calls `enter` and then `run_for` in
        quanta instead; this is the two in one go."""
        failed = self.enter(
            mm,
            immediate_exit=immediate_exit,
            io_data=io_data,
            hypercall_ret=hypercall_ret,
            msr_error=msr_error,
        )
        if failed is not None:
            return failed
        exit_ = self.run_for(self.vm.host.slice_ns, interrupted)
        return guest_program.INTR_EXIT if exit_ is None else exit_

    def enter(
        self,
        mm: int,
        *,
        immediate_exit: bool = False,
        io_data: bytes | None = None,
        hypercall_ret: int | None = None,
        msr_error: int | None = None,
    ) -> RunExit | None:
        """KVM_RUN up to the guest entry: the gate, the completion of the pending exit,
        immediate_exit (EINTR), then the entry checks. Returns the exit KVM_RUN ends with
        when the guest cannot be entered (KVM_EXIT_FAIL_ENTRY), None once it is entered; a
        new slice of `Host.slice_ns` guest time starts."""
        self._gate(mm, "KVM_RUN")
        # kvm_arch_vcpu_ioctl_run: complete_userspace_io first, then immediate_exit -> EINTR.
        self._complete_pending(io_data, hypercall_ret, msr_error)
        if immediate_exit:
            raise _err(errno.EINTR, "KVM_RUN: immediate_exit")
        self.has_run = True
        pages = self._guest_pages()
        if isinstance(pages, RunExit):
            return pages
        self.slice_left_ns = self.vm.host.slice_ns
        return None

    def _guest_pages(self) -> _GuestPages | RunExit:
        """What the guest's accesses go through, or the exit of a failed VM entry."""
        vm = self.vm
        vek: bytes | None = None
        if vm.sev.active:
            ctx = vm.host.firmware.contexts.get(vm.sev.handle) if vm.sev.handle else None
            if ctx is None or ctx.asid != vm.sev.asid:
                return RunExit(exit_reason=KVM_EXIT_FAIL_ENTRY)
            if ctx.state == _SENT:
                # Stub policy, not kernel behaviour (reference sev-live-migration.md section
                # 1.6: KVM does not block KVM_RUN in SENT): a sent guest runs on its target
                # only, so its source fails as a dead context does, with EIO.
                raise _err(errno.EIO, f"KVM_RUN: VM {vm.id}'s guest was sent (SENT)")
            if vm.sev.es_active and not self.guest_state_protected:
                return RunExit(exit_reason=KVM_EXIT_FAIL_ENTRY)
            vek = ctx.vek
        memory = vm.memory
        if memory is None:
            raise _err(errno.EFAULT, f"KVM_RUN: VM {vm.id} has no memory slots")
        return _GuestPages(memory, vek)

    def run_for(
        self, budget_ns: int, interrupted: Callable[[], bool] | None = None
    ) -> RunExit | None:
        """Run the entered guest for up to `budget_ns` (and no longer than what is left of
        its slice). Returns the exit that ends this KVM_RUN (an exit for the VMM, or
        KVM_EXIT_INTR when the slice is spent or `interrupted` said so), or None when only
        the budget is spent: the vCPU is still in KVM_RUN and runs on when called again.
        Registers and memory are consistent between calls, whatever happens."""
        pages = self._guest_pages()
        if isinstance(pages, RunExit):
            return pages
        if interrupted is not None and interrupted():
            # A signal pending at guest entry: KVM_RUN ends before the guest runs.
            self.pending = guest_program.INTR_EXIT
            return guest_program.INTR_EXIT
        host = self.vm.host
        clock = host.clock
        now = clock()
        budget = min(budget_ns, self.slice_left_ns)
        regs, run_exit, steps = guest_program.run_slice(
            self._live_regs(),
            pages,
            now_ns=now,
            budget_ns=budget,
            clock=clock,
            exit_hypercall=bool(self.vm.exit_hypercall & KVM_EXIT_HYPERCALL_VALID_MASK),
            interrupted=interrupted,
            cpu=self._cpu,
        )
        self._set_live_regs(regs)
        self.steps += steps
        if run_exit is guest_program.INTR_EXIT and not (interrupted is not None and interrupted()):
            self.slice_left_ns -= clock() - now
            if self.slice_left_ns > 0:
                return None  # only this quantum is spent
        self.pending = run_exit
        return run_exit

    def put(self) -> None:
        """The vCPU fd's last copy was closed: drop its VM reference (kvm_vcpu_release)."""
        if not self.fd_open:
            raise RuntimeError(f"vCPU {self.vcpu_id} of VM {self.vm.id}: fd already released")
        self.fd_open = False
        self.vm.put()


class Vm:
    """struct kvm. `refcount` counts the references that keep it alive: open fds, vCPU fds and
    mirrors (kvm_get_kvm/kvm_put_kvm). The last put destroys it."""

    def __init__(self, host: Host, vm_id: int, creator: int, vm_type: int) -> None:
        self.host = host
        self.id = vm_id
        self.creator = creator
        self.vm_type = vm_type
        self.dead = False
        self.destroyed = False
        self.refcount = 1
        self.created_vcpus = 0
        self.online_vcpus = 0
        self.max_vcpu_ids = 0  # kvm->arch.max_vcpu_ids: 0 until set (KVM_CAP_MAX_VCPU_ID)
        self.vcpus: list[Vcpu] = []
        self.sev = SevInfo(need_init=vm_type != KVM_X86_DEFAULT_VM)
        self.exit_hypercall = 0  # kvm->arch.hypercall_exit_enabled
        self.memory: GuestMemory | None = None
        self.manual_dirty_log_protect = 0  # kvm->manual_dirty_log_protect
        self.user_space_msr_mask = 0  # kvm->arch.user_space_msr_mask
        self.msr_filter: MsrFilter | None = None  # kvm->arch.msr_filter

    # -- predicates

    @property
    def is_mirror(self) -> bool:
        return self.sev.enc_context_owner is not None

    @property
    def sev_es_guest(self) -> bool:
        return self.sev.active and self.sev.es_active

    @property
    def mode(self) -> str:
        if not self.sev.active:
            return "plain"
        if self.is_mirror:
            return "mirror"
        return "sev-es" if self.sev.es_active else "sev"

    def _gate(self, mm: int, what: str) -> None:
        # kvm_vm_ioctl: kvm->mm != current->mm || kvm->vm_dead -> EIO (reference section 4).
        if mm != self.creator:
            raise _err(errno.EIO, f"{what}: caller {mm} did not create VM {self.id}")
        if self.dead and not self.host.move_into_dead_ok:
            raise _err(errno.EIO, f"{what}: VM {self.id} is dead")

    # -- lifetime

    def get(self) -> None:
        if self.destroyed:
            raise RuntimeError(f"VM {self.id} is already destroyed")
        self.refcount += 1

    def put(self) -> None:
        if self.destroyed or self.refcount <= 0:
            raise RuntimeError(f"VM {self.id}: put without a reference")
        self.refcount -= 1
        if self.refcount == 0:
            self._destroy()

    def _destroy(self) -> None:
        """kvm_destroy_vm: sev_vm_destroy (reference section 3, lifetime), the vCPUs, the
        memory slots."""
        self.destroyed = True
        self.host.vms.pop(self.id, None)
        self._sev_vm_destroy()
        self.vcpus.clear()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def _sev_vm_destroy(self) -> None:
        sev = self.sev
        if not sev.active:  # also a moved-from VM: its context lives on in the destination
            return
        if sev.mirror_vms:  # WARN_ON in the kernel: every mirror holds a reference
            self.host.warnings.append(f"VM {self.id} destroyed with mirrors")
        owner = sev.enc_context_owner
        if owner is not None:
            # A mirror unlinks itself and drops its owner reference, which may destroy the
            # owner. No DEACTIVATE, DECOMMISSION or ASID free: the owner does those.
            owner.sev.mirror_vms.remove(self)
            sev.enc_context_owner = None
            sev.active = False
            owner.put()
            return
        for region in sev.regions_list:
            sev.pages_locked -= region.npages
        sev.regions_list.clear()
        firmware = self.host.firmware
        if sev.handle:  # sev_unbind_asid: DEACTIVATE, then DECOMMISSION
            firmware.deactivate(sev.handle)
            firmware.decommission(sev.handle)
        self.host.sev_asid_free(sev)
        sev.active = False
        sev.handle = 0
        sev.asid = 0

    # -- vCPUs and memory

    def create_vcpu(self, mm: int, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU (kvm_vm_ioctl_create_vcpu). The vCPU holds a VM reference."""
        self._gate(mm, "KVM_CREATE_VCPU")
        if self.dead:  # move_into_dead_ok still refuses vCPU creation on a dead VM
            raise _err(errno.EIO, f"KVM_CREATE_VCPU: VM {self.id} is dead")
        if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS:
            raise _err(errno.EINVAL, f"KVM_CREATE_VCPU: id {vcpu_id} out of range")
        if self.created_vcpus >= KVM_MAX_VCPUS:
            raise _err(errno.EINVAL, f"KVM_CREATE_VCPU: VM {self.id} has {KVM_MAX_VCPUS} vCPUs")
        # kvm_arch_vcpu_precreate (x86.c): the first vCPU fixes the default limit.
        if not self.max_vcpu_ids:
            self.max_vcpu_ids = KVM_MAX_VCPU_IDS
        if vcpu_id >= self.max_vcpu_ids:
            raise _err(
                errno.EINVAL, f"KVM_CREATE_VCPU: id {vcpu_id} >= max_vcpu_ids {self.max_vcpu_ids}"
            )
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise _err(errno.EEXIST, f"KVM_CREATE_VCPU: VM {self.id} has vCPU {vcpu_id}")
        # Atomic here; the kernel bumps created_vcpus first and online_vcpus at the end.
        self.created_vcpus += 1
        vcpu = Vcpu(self, vcpu_id, len(self.vcpus))
        self.vcpus.append(vcpu)
        self.refcount += 1
        self.online_vcpus += 1
        return vcpu

    def set_user_memory_region(
        self,
        mm: int,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        fd: int,
        offset: int,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION over a memfd (the checks are GuestMemory's)."""
        self._gate(mm, "KVM_SET_USER_MEMORY_REGION")
        if self.memory is None:
            self.memory = GuestMemory()
        self.memory.set_region(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            fd,
            offset,
            dirty_initially_set=self.manual_dirty_log_protect == uapi.KVM_DIRTY_LOG_MANUAL_CAPS,
        )

    # -- dirty logging (KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG)

    def get_dirty_log(self, mm: int, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): the slot's dirty bitmap, cleared
        as it is read unless KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled. EINVAL for a bad
        slot id, ENOENT for a slot that does not exist or does not log dirty pages."""
        return self.get_dirty_log_runs(mm, slot).to_bytes()

    def get_dirty_log_runs(self, mm: int, slot: int) -> uapi.DirtyLog:
        """`get_dirty_log` as the runs of the bitmap that may be non-zero (`uapi.DirtyLog`):
        what the daemon sends, so a large slot's log costs what the guest dirtied."""
        self._gate(mm, "KVM_GET_DIRTY_LOG")
        memory = self.memory if self.memory is not None else GuestMemory()
        manual = bool(self.manual_dirty_log_protect & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        return memory.get_dirty_log(slot, manual_protect=manual)

    def clear_dirty_log(
        self, mm: int, slot: int, first_page: int, num_pages: int, bitmap: bytes
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect): clear the bits of `bitmap` in
        [first_page, first_page+num_pages) of the slot's log. The kernel accepts it with or
        without manual protection (kvm_vm_ioctl has no such check); see
        GuestMemory.clear_dirty_log for the errnos."""
        self._gate(mm, "KVM_CLEAR_DIRTY_LOG")
        memory = self.memory if self.memory is not None else GuestMemory()
        memory.clear_dirty_log(slot, first_page, num_pages, bitmap)

    # -- KVM_X86_SET_MSR_FILTER

    def set_msr_filter(self, mm: int, flags: int, ranges: Sequence[MsrFilterRange]) -> None:
        """KVM_X86_SET_MSR_FILTER (kvm_vm_ioctl_set_msr_filter, arch/x86/kvm/x86.c), in its
        order: EINVAL for flags other than KVM_MSR_FILTER_DEFAULT_DENY, and for a
        default-deny filter without ranges; then each range in turn (kvm_add_msr_filter):
        one with nmsrs 0 is skipped, EINVAL for flags outside READ|WRITE or none, EINVAL
        for a bitmap over KVM_MSR_FILTER_MAX_BITMAP_SIZE, EFAULT when the bitmap given is
        shorter than BITS_TO_LONGS(nmsrs) longs (memdup_user). A failure leaves the old
        filter in place. Up to KVM_MSR_FILTER_MAX_RANGES ranges; missing ones are empty."""
        what = "KVM_X86_SET_MSR_FILTER"
        self._gate(mm, what)
        if len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:  # struct kvm_msr_filter.ranges[16]
            raise _err(errno.EINVAL, f"{what}: more than {uapi.KVM_MSR_FILTER_MAX_RANGES} ranges")
        if not 0 <= flags <= 0xFFFFFFFF or flags & ~uapi.KVM_MSR_FILTER_VALID_MASK:
            raise _err(errno.EINVAL, f"{what}: flags {flags:#x}")
        default_allow = not flags & uapi.KVM_MSR_FILTER_DEFAULT_DENY
        if not default_allow and not any(r.nmsrs for r in ranges):
            raise _err(errno.EINVAL, f"{what}: a default-deny filter needs ranges")
        kept: list[MsrFilterRange] = []
        for r in ranges:
            if not r.nmsrs:
                continue
            if r.flags & ~uapi.KVM_MSR_FILTER_RANGE_VALID_MASK or not r.flags:
                raise _err(errno.EINVAL, f"{what}: range flags {r.flags:#x}")
            size = (r.nmsrs + 63) // 64 * 8  # BITS_TO_LONGS(nmsrs) * sizeof(long)
            if size > uapi.KVM_MSR_FILTER_MAX_BITMAP_SIZE:
                raise _err(errno.EINVAL, f"{what}: {r.nmsrs} MSRs in one range")
            if len(r.bitmap) < size:
                raise _err(errno.EFAULT, f"{what}: bitmap of {len(r.bitmap)} bytes, needs {size}")
            kept.append(MsrFilterRange(r.flags, r.nmsrs, r.base, bytes(r.bitmap[:size])))
        self.msr_filter = MsrFilter(default_allow, tuple(kept))

    def _pin(self, what: str, addr: int, length: int) -> int:
        """sev_pin_memory: EINVAL for an empty or wrapping range, ENOMEM when a page of it is
        not backed by a memory slot. Returns the number of pages."""
        if length == 0 or addr + length - 1 > ULONG_MAX:
            raise _err(errno.EINVAL, f"{what}: bad range {addr:#x}+{length:#x}")
        first, last = addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE
        need, end = first * PAGE_SIZE, (last + 1) * PAGE_SIZE
        if self.memory is not None:
            need = self.memory.backed_up_to(need, end)
        if need < end:
            raise _err(errno.ENOMEM, f"{what}: guest page {need:#x} is not backed")
        return last - first + 1

    # -- KVM_ENABLE_CAP

    def enable_cap(self, mm: int, cap: int, flags: int, args: Sequence[int | Vm | None]) -> int:
        """KVM_ENABLE_CAP on this VM (x86 kvm_vm_ioctl_enable_cap), for a caller that runs
        no vCPU meanwhile: every vCPU mutex MOVE asks for is free."""
        steps = self.enable_cap_steps(mm, cap, flags, args)
        try:
            while True:
                next(steps)
        except StopIteration as done:
            result: int = done.value
            return result

    def enable_cap_steps(
        self, mm: int, cap: int, flags: int, args: Sequence[int | Vm | None]
    ) -> Generator[list[Vcpu], None, int]:
        """KVM_ENABLE_CAP as a generator. MOVE yields once, at section 1 step 7, the vCPUs
        whose mutexes it takes (the destination's, then the source's): the caller resumes
        it once it holds them all (a vCPU in KVM_RUN holds its own) and releases them when
        the generator has finished. Closing it at the yield unwinds everything, as the
        killable lock's EINTR does. Other capabilities never yield."""
        self._gate(mm, "KVM_ENABLE_CAP")  # section 1 step 1
        if flags:  # section 1 step 2
            raise _err(errno.EINVAL, f"KVM_ENABLE_CAP({cap}): flags must be 0")
        arg0 = args[0] if args else 0
        if cap == uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM:
            yield from self._move_enc_context_from(mm, arg0)
            return 0
        if cap == uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM:
            self._copy_enc_context_from(arg0)
            return 0
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            mask = arg0 if isinstance(arg0, int) else -1
            if mask < 0 or mask & ~KVM_EXIT_HYPERCALL_VALID_MASK:
                raise _err(errno.EINVAL, f"KVM_CAP_EXIT_HYPERCALL: unsupported bits {mask:#x}")
            self.exit_hypercall = mask
            return 0
        if cap == uapi.KVM_CAP_MAX_VCPU_ID:
            # x86.c kvm_vm_ioctl_enable_cap: at most KVM_MAX_VCPU_IDS, and set once (the
            # same value again is fine; the first vCPU sets the default). Its
            # `bsp_vcpu_id > args[0]` refusal never fires: no KVM_SET_BOOT_CPU_ID here.
            limit = arg0 if isinstance(arg0, int) else -1
            if not 0 <= limit <= KVM_MAX_VCPU_IDS:
                raise _err(errno.EINVAL, f"KVM_CAP_MAX_VCPU_ID: {limit} > {KVM_MAX_VCPU_IDS}")
            if self.max_vcpu_ids not in (0, limit):
                raise _err(
                    errno.EINVAL, f"KVM_CAP_MAX_VCPU_ID: VM {self.id} has {self.max_vcpu_ids}"
                )
            self.max_vcpu_ids = limit
            return 0
        if cap == uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            # kvm_vm_ioctl_enable_cap_generic: INITIALLY_SET only with MANUAL_PROTECT_ENABLE.
            options = arg0 if isinstance(arg0, int) else -1
            allowed = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if options >= 0 and options & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = uapi.KVM_DIRTY_LOG_MANUAL_CAPS
            if options < 0 or options & ~allowed:
                raise _err(errno.EINVAL, f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: options {options:#x}")
            self.manual_dirty_log_protect = options
            return 0
        if cap == uapi.KVM_CAP_X86_USER_SPACE_MSR:
            mask = arg0 if isinstance(arg0, int) else -1
            if mask < 0 or mask & ~uapi.KVM_MSR_EXIT_REASON_VALID_MASK:
                raise _err(errno.EINVAL, f"KVM_CAP_X86_USER_SPACE_MSR: reasons {mask:#x}")
            self.user_space_msr_mask = mask
            return 0
        raise _err(errno.EINVAL, f"KVM_ENABLE_CAP: capability {cap} cannot be enabled")

    @staticmethod
    def _source_vm(arg: int | Vm | None, what: str) -> Vm:
        # Section 1 step 3: the fd is not open, or is not a KVM VM file -> EBADF.
        if not isinstance(arg, Vm) or arg.destroyed:
            raise _err(errno.EBADF, f"{what}: the source fd is not a KVM VM")
        return arg

    def _lock_two_vms(self, src: Vm, what: str) -> None:
        """sev_lock_two_vms (section 1 step 4); the caller releases with _unlock_two_vms."""
        if src is self:  # 4a
            raise _err(errno.EINVAL, f"{what}: source and destination are the same VM")
        if self.sev.migration_in_progress:  # 4b
            raise _err(errno.EBUSY, f"{what}: VM {self.id} is in a migration")
        self.sev.migration_in_progress = True
        if src.sev.migration_in_progress:  # 4c: dst's flag is released first
            self.sev.migration_in_progress = False
            raise _err(errno.EBUSY, f"{what}: VM {src.id} is in a migration")
        src.sev.migration_in_progress = True
        # 4d: mutex_lock_killable(dst->lock), then src->lock: no signals here, never EINTR.

    def _unlock_two_vms(self, src: Vm) -> None:
        self.sev.migration_in_progress = False
        src.sev.migration_in_progress = False

    def _move_enc_context_from(
        self, mm: int, arg: int | Vm | None
    ) -> Generator[list[Vcpu], None, None]:
        """sev_vm_move_enc_context_from: the checks of section 1 in order, then section 2.
        Yields at step 7 (see `enable_cap_steps`)."""
        what = "MOVE_ENC_CONTEXT_FROM"
        src = self._source_vm(arg, what)  # step 3
        self._lock_two_vms(src, what)  # step 4
        try:
            # Step 5: one EINVAL for type mismatch, dst already SEV, src not SEV.
            if self.vm_type != src.vm_type:
                raise _err(errno.EINVAL, f"{what}: VM types differ")
            if self.sev.active:
                raise _err(errno.EINVAL, f"{what}: destination VM {self.id} is already SEV")
            if not src.sev.active:
                raise _err(errno.EINVAL, f"{what}: source VM {src.id} is not an SEV guest")
            # Step 6: dst.misc_cg = the caller's cgroup; charge one unit when it differs from
            # src's, by dst.es_active (still false: SEV even for an SEV-ES guest).
            cgroups = self.host.cgroups
            resource = MISC_SEV_ES if self.sev.es_active else MISC_SEV
            dst_cg = self.host.cgroup_of(mm)
            charged = dst_cg != src.sev.misc_cg
            if charged:
                cgroups.try_charge(dst_cg, resource)
            try:
                # Step 7: kvm_lock_all_vcpus(dst), then (src), with the VM locks and the
                # migration flags held: a vCPU in KVM_RUN makes the caller wait here.
                yield [*self.vcpus, *src.vcpus]
                # Step 8: sev_check_source_vcpus.
                self._check_source_vcpus(src, what)
            except BaseException:
                if charged:  # unwind: nothing changes on failure (or on EINTR at step 7)
                    cgroups.uncharge(dst_cg, resource)
                raise
            # Step 9 (have_run_cpus ENOMEM) cannot fail here. Step 10: migrate, kill src.
            self.sev.misc_cg = dst_cg
            self._migrate_from(src)
            src.dead = True  # kvm_vm_dead(src)
            # Success: the cgroup cleanup operates on src (by src.es_active, now false).
            if charged:
                cgroups.uncharge(src.sev.misc_cg, MISC_SEV_ES if src.sev.es_active else MISC_SEV)
            src.sev.misc_cg = None
        finally:
            self._unlock_two_vms(src)

    def _check_source_vcpus(self, src: Vm, what: str) -> None:
        """sev_check_source_vcpus (section 1 step 8)."""
        if src.created_vcpus != src.online_vcpus or self.created_vcpus != self.online_vcpus:
            raise _err(errno.EBUSY, f"{what}: vCPU creation in flight")  # 8a
        if not src.sev_es_guest:  # 8b
            return
        if src.online_vcpus != self.online_vcpus:  # 8c
            raise _err(
                errno.EINVAL,
                f"{what}: SEV-ES source has {src.online_vcpus} vCPUs, "
                f"destination has {self.online_vcpus}",
            )
        for vcpu in src.vcpus:  # 8d
            if not vcpu.guest_state_protected:
                raise _err(errno.EINVAL, f"{what}: source vCPU {vcpu.vcpu_id} has no VMSA yet")

    def _migrate_from(self, src: Vm) -> None:
        """sev_migrate_from (section 2): move the context, clear it on src."""
        dst_sev, src_sev = self.sev, src.sev
        dst_sev.active = True
        dst_sev.asid = src_sev.asid
        dst_sev.handle = src_sev.handle
        dst_sev.pages_locked = src_sev.pages_locked
        dst_sev.enc_context_owner = src_sev.enc_context_owner
        dst_sev.es_active = src_sev.es_active
        dst_sev.vmsa_features = src_sev.vmsa_features
        # Not transferred: fd, policy, ghcb_version, ap_jump_table, need_init.
        src_sev.asid = 0
        src_sev.active = False
        src_sev.handle = 0
        src_sev.pages_locked = 0
        src_sev.enc_context_owner = None
        src_sev.es_active = False
        # Splice regions_list and mirror_vms; each mirror's reference moves from src to dst.
        dst_sev.regions_list = src_sev.regions_list
        src_sev.regions_list = []
        dst_sev.mirror_vms = src_sev.mirror_vms
        src_sev.mirror_vms = []
        for mirror in dst_sev.mirror_vms:
            self.refcount += 1  # kvm_get_kvm(dst)
            src.refcount -= 1  # kvm_put_kvm(src): the caller's fd keeps src alive
            mirror.sev.enc_context_owner = self
        # src was a mirror: dst takes its place in the owner's list (the reference is handed
        # over, the owner's refcount does not change).
        owner = dst_sev.enc_context_owner
        if owner is not None:
            owner.sev.mirror_vms.remove(src)
            owner.sev.mirror_vms.append(self)
        if not dst_sev.es_active:
            return
        # SEV-ES: vCPU i of dst takes the VMSA (and GHCB state) of vCPU i of src.
        for i, dst_vcpu in enumerate(self.vcpus):
            src_vcpu = src.vcpus[i]
            dst_vcpu.vmsa = src_vcpu.vmsa
            dst_vcpu.guest_state_protected = True
            src_vcpu.vmsa = None
            src_vcpu.guest_state_protected = False

    def _copy_enc_context_from(self, arg: int | Vm | None) -> None:
        """sev_vm_copy_enc_context_from: make this VM a mirror of the source (section 3)."""
        what = "COPY_ENC_CONTEXT_FROM"
        src = self._source_vm(arg, what)
        self._lock_two_vms(src, what)
        try:
            # One EINVAL: dst already SEV, src not SEV, src a mirror, dst has vCPUs.
            if self.sev.active:
                raise _err(errno.EINVAL, f"{what}: destination VM {self.id} is already SEV")
            if not src.sev.active:
                raise _err(errno.EINVAL, f"{what}: source VM {src.id} is not an SEV guest")
            if src.is_mirror:
                raise _err(errno.EINVAL, f"{what}: source VM {src.id} is itself a mirror")
            if self.created_vcpus:
                raise _err(errno.EINVAL, f"{what}: destination VM {self.id} has vCPUs")
            src.refcount += 1  # kvm_get_kvm(src): the mirror pins its owner
            src.sev.mirror_vms.append(self)
            sev = self.sev
            sev.enc_context_owner = src
            sev.active = True
            sev.asid = src.sev.asid
            sev.fd = src.sev.fd
            sev.es_active = src.sev.es_active
            sev.need_init = False
            sev.handle = src.sev.handle
            sev.regions_list = []
            sev.mirror_vms = []
            # Not copied: ap_jump_table, vmsa_features, policy. No ASID, no cgroup charge.
        finally:
            self._unlock_two_vms(src)

    # -- KVM_MEMORY_ENCRYPT_OP

    def sev_ioctl(
        self, mm: int, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """KVM_MEMORY_ENCRYPT_OP (sev_mem_enc_ioctl). `fields` is the command's struct;
        None is a NULL `data` pointer."""
        self._gate(mm, "KVM_MEMORY_ENCRYPT_OP")
        if not self.host.sev_enabled:
            raise _err(errno.ENOTTY, "KVM_MEMORY_ENCRYPT_OP: SEV is not enabled")
        # (A NULL argp returns 0 here in the kernel; the model always has a command.)
        # A mirror may only use the allowlist, checked before `data` is looked at.
        if self.is_mirror and cmd not in MIRROR_ALLOWED_CMDS:
            raise _err(errno.EINVAL, f"KVM_MEMORY_ENCRYPT_OP({cmd}): not allowed on a mirror")
        handler = _SEV_COMMANDS.get(cmd)
        if handler is None:
            raise _err(errno.EINVAL, f"KVM_MEMORY_ENCRYPT_OP: unknown command {cmd}")
        return handler(self, cmd, fields)

    def _need_sev(self, what: str, code: int = errno.ENOTTY) -> SevInfo:
        if not self.sev.active:
            raise _err(code, f"{what}: VM {self.id} is not an SEV guest")
        return self.sev

    @staticmethod
    def _data(what: str, fields: dict[str, int | bytes] | None) -> dict[str, int | bytes]:
        if fields is None:  # copy_from_user(NULL)
            raise _err(errno.EFAULT, f"{what}: data is NULL")
        return fields

    @staticmethod
    def _int(fields: dict[str, int | bytes], name: str) -> int:
        value = fields.get(name, 0)
        if not isinstance(value, int) or value < 0:
            raise _err(errno.EINVAL, f"field {name} must be an unsigned integer")
        return value

    @staticmethod
    def _bytes(fields: dict[str, int | bytes], name: str) -> bytes:
        value = fields.get(name, b"")
        if not isinstance(value, bytes):
            raise _err(errno.EINVAL, f"field {name} must be bytes")
        return value

    def _firmware_fd(self, what: str) -> SevFirmware:
        """sev_issue_cmd: the command goes through kvm_sev_info.fd (EBADF when it is not
        /dev/sev, e.g. in a MOVE destination, section 2 observation)."""
        if not self.sev.fd:
            raise _err(errno.EBADF, f"{what}: VM {self.id} has no /dev/sev fd recorded")
        return self.host.firmware

    def _sev_init(self, cmd: int, fields: dict[str, int | bytes] | None) -> dict[str, int | bytes]:
        """KVM_SEV_INIT / KVM_SEV_ES_INIT (sev_guest_init)."""
        es = cmd == uapi.KVM_SEV_ES_INIT
        what = "KVM_SEV_ES_INIT" if es else "KVM_SEV_INIT"
        if es and not self.host.sev_es_enabled:
            raise _err(errno.ENOTTY, f"{what}: SEV-ES is not enabled")
        if self.vm_type != KVM_X86_DEFAULT_VM:
            raise _err(errno.EINVAL, f"{what}: VM type {self.vm_type} needs KVM_SEV_INIT2")
        self._sev_guest_init(what, es, 0, GHCB_VERSION_MIN if es else 0, 0)
        return {}

    def _sev_init2(self, cmd: int, fields: dict[str, int | bytes] | None) -> dict[str, int | bytes]:
        what = "KVM_SEV_INIT2"
        if not self.sev.need_init:
            raise _err(errno.EINVAL, f"{what}: VM {self.id} does not take INIT2")
        if self.vm_type not in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM):
            raise _err(errno.EINVAL, f"{what}: VM type {self.vm_type} is not SEV")
        data = self._data(what, fields)
        self._sev_guest_init(
            what,
            self.vm_type == KVM_X86_SEV_ES_VM,
            self._int(data, "vmsa_features"),
            self._int(data, "ghcb_version"),
            self._int(data, "flags"),
        )
        return {}

    def _sev_guest_init(
        self, what: str, es: bool, vmsa_features: int, ghcb_version: int, flags: int
    ) -> None:
        """__sev_guest_init: EINVAL once vCPUs exist or SEV is active; then an ASID."""
        sev = self.sev
        if self.created_vcpus:
            raise _err(errno.EINVAL, f"{what}: VM {self.id} already has vCPUs")
        if flags:
            raise _err(errno.EINVAL, f"{what}: flags must be 0")
        valid_features = SEV_SUPPORTED_VMSA_FEATURES if es else 0
        if vmsa_features & ~valid_features:
            raise _err(errno.EINVAL, f"{what}: unsupported VMSA features {vmsa_features:#x}")
        if ghcb_version > GHCB_VERSION_MAX or (not es and ghcb_version):
            raise _err(errno.EINVAL, f"{what}: bad GHCB version {ghcb_version}")
        if es and not ghcb_version:
            ghcb_version = GHCB_VERSION_MAX
        if sev.active:
            raise _err(errno.EINVAL, f"{what}: VM {self.id} is already an SEV guest")
        sev.active = True
        sev.es_active = es
        sev.vmsa_features = vmsa_features
        sev.ghcb_version = ghcb_version
        try:
            self.host.sev_asid_new(sev, self.creator)
        except OSError:
            sev.vmsa_features = 0
            sev.es_active = False
            sev.active = False
            sev.ghcb_version = 0
            raise
        sev.regions_list = []
        sev.mirror_vms = []
        sev.need_init = False

    def _launch_start(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_START"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        firmware = self.host.firmware  # issued through argp->sev_fd: always /dev/sev here
        ctx = firmware.launch_start(self._int(data, "handle"), self._int(data, "policy"))
        try:
            firmware.activate(ctx.handle, sev.asid)  # sev_bind_asid
        except SevFwError:
            firmware.decommission(ctx.handle)
            raise
        sev.policy = ctx.policy
        sev.handle = ctx.handle
        sev.fd = True
        return {"handle": ctx.handle}

    def _launch_update_data(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_UPDATE_DATA"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        uaddr, length = self._int(data, "uaddr"), self._int(data, "len")
        self._pin(what, uaddr, length)
        firmware = self._firmware_fd(what)
        assert self.memory is not None  # _pin found slots
        firmware.launch_update_data(sev.handle, self.memory, uaddr, length)
        return {}

    def _launch_update_vmsa(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_UPDATE_VMSA"
        if not self.sev_es_guest:
            raise _err(errno.ENOTTY, f"{what}: VM {self.id} is not an SEV-ES guest")
        if self.created_vcpus != self.online_vcpus:  # [S2] kvm_is_vcpu_creation_in_progress
            raise _err(errno.EBUSY, f"{what}: vCPU creation in flight")
        for vcpu in self.vcpus:
            # sev_es_sync_vmsa: the VMSA is rebuilt from KVM's register copy before the
            # firmware call, even when it was encrypted already (mainline has no check).
            vcpu.vmsa = Vmsa(regs=vcpu.regs, sev_features=self.sev.vmsa_features)
            firmware = self._firmware_fd(what)
            firmware.launch_update_vmsa(self.sev.handle, vcpu.vmsa.image())
            vcpu.guest_state_protected = True
        return {}

    def _launch_measure(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_MEASURE"
        sev = self._need_sev(what)
        self._data(what, fields)
        measurement, mnonce = self._firmware_fd(what).launch_measure(sev.handle)
        return {"measurement": measurement, "mnonce": mnonce}

    def _launch_secret(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_SECRET"
        sev = self._need_sev(what)
        self._data(what, fields)
        self._firmware_fd(what).launch_secret(sev.handle)
        return {}

    def _launch_finish(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_LAUNCH_FINISH"
        sev = self._need_sev(what)
        self._firmware_fd(what).launch_finish(sev.handle)
        return {}

    def _guest_status(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_GUEST_STATUS"
        sev = self._need_sev(what)
        ctx = self._firmware_fd(what).guest_status(sev.handle)
        if fields is None:  # copy_to_user(NULL) after the firmware answered
            raise _err(errno.EFAULT, f"{what}: data is NULL")
        return {"handle": sev.handle, "policy": ctx.policy, "state": ctx.state}

    def _dbg_decrypt(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_DBG_DECRYPT"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        addr, length = self._int(data, "src_uaddr"), self._int(data, "len")
        if not length or addr + length - 1 > ULONG_MAX:
            raise _err(errno.EINVAL, f"{what}: bad range")
        out = bytearray()
        while len(out) < length:  # sev_dbg_crypt: one page at a time
            chunk = min(PAGE_SIZE - addr % PAGE_SIZE, length - len(out))
            self._pin(what, addr - addr % PAGE_SIZE, PAGE_SIZE)
            assert self.memory is not None
            out += self._firmware_fd(what).dbg_decrypt(sev.handle, self.memory, addr, chunk)
            addr += chunk
        return {"data": bytes(out)}

    def _dbg_encrypt(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_DBG_ENCRYPT"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        addr, payload = self._int(data, "dst_uaddr"), self._bytes(data, "data")
        if not payload or addr + len(payload) - 1 > ULONG_MAX:
            raise _err(errno.EINVAL, f"{what}: bad range")
        done = 0
        while done < len(payload):  # page by page: an error leaves earlier pages written
            chunk = min(PAGE_SIZE - addr % PAGE_SIZE, len(payload) - done)
            self._pin(what, addr - addr % PAGE_SIZE, PAGE_SIZE)
            assert self.memory is not None
            self._firmware_fd(what).dbg_encrypt(
                sev.handle, self.memory, addr, payload[done : done + chunk]
            )
            addr += chunk
            done += chunk
        return {}

    def _attestation_report(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_GET_ATTESTATION_REPORT"
        sev = self._need_sev(what)
        self._data(what, fields)
        firmware = self._firmware_fd(what)
        firmware.guest(sev.handle)
        raise SevFwError(uapi.SEV_RET_UNSUPPORTED, f"firmware: {what} is not modelled")

    # SEND_* / RECEIVE_* (reference sev-live-migration.md section 1.6). Struct fields by their
    # kernel names; a userspace buffer the kernel copies in is its bytes here (pdh_cert,
    # plat_certs, amd_certs, pdh, session, hdr, trans: empty stands for a NULL address or a
    # zero length), a buffer it copies out to is named by a non-zero `*_uaddr` and its `*_len`,
    # and comes back as bytes. `guest_uaddr` is a guest physical address, so the kernel's
    # `!guest_uaddr -> EINVAL` is dropped (GPA 0 is valid), as for DBG_*.

    @staticmethod
    def _u32(fields: dict[str, int | bytes], name: str) -> int:
        value = fields.get(name, 0)
        if not isinstance(value, int) or value < 0:  # `_int`'s check, inline (per page)
            raise _err(errno.EINVAL, f"field {name} must be an unsigned integer")
        if value > 0xFFFFFFFF:
            raise _err(errno.EINVAL, f"field {name} is a u32")
        return value

    @staticmethod
    def _blob(what: str, fields: dict[str, int | bytes], name: str) -> bytes:
        """psp_copy_user_blob: NULL, 0 or more than SEV_FW_BLOB_MAX_SIZE -> EINVAL."""
        blob = Vm._bytes(fields, name)
        if not blob or len(blob) > uapi.SEV_FW_BLOB_MAX_SIZE:
            raise _err(errno.EINVAL, f"{what}: {name} must be 1..{uapi.SEV_FW_BLOB_MAX_SIZE} bytes")
        return blob

    @staticmethod
    def _one_page(what: str, gpa: int, length: int) -> None:
        """ "Check if we are crossing the page boundary": one command moves at most a page."""
        if length > PAGE_SIZE or gpa % PAGE_SIZE + length > PAGE_SIZE:
            raise _err(errno.EINVAL, f"{what}: {gpa:#x}+{length:#x} crosses a page")

    def _send_start(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """sev_send_start: ENOTTY, EFAULT, the length query, EINVAL for the buffers, the
        three certificate blobs (all mandatory), the firmware; policy and session_len are
        written back whether or not the firmware succeeded."""
        what = "KVM_SEV_SEND_START"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        session_len = self._u32(data, "session_len")
        if session_len == 0:  # __sev_send_start_query_session_length
            firmware = self._firmware_fd(what)
            try:
                firmware.send_start(sev.handle, b"", b"", b"", 0)
            except SevFwError as e:
                e.fields = {"policy": 0, "session_len": e.fields.get("session_len", 0)}
                raise
            raise AssertionError("SEND_START accepted a zero-length session")  # pragma: no cover
        if (
            not self._bytes(data, "pdh_cert")
            or not self._int(data, "session_uaddr")
            or session_len > uapi.SEV_FW_BLOB_MAX_SIZE
        ):
            raise _err(errno.EINVAL, f"{what}: PDH certificate and a session buffer are required")
        pdh = self._blob(what, data, "pdh_cert")
        plat_certs = self._blob(what, data, "plat_certs")
        amd_certs = self._blob(what, data, "amd_certs")
        firmware = self._firmware_fd(what)
        try:
            session, policy = firmware.send_start(
                sev.handle, pdh, plat_certs, amd_certs, session_len
            )
        except SevFwError as e:
            e.fields = {"policy": 0, "session_len": e.fields.get("session_len", session_len)}
            raise
        return {"policy": policy, "session_len": session_len, "session": session}

    def _send_update_data(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """sev_send_update_data: the length query (hdr_len or trans_len 0), EINVAL for the
        buffers or a range crossing a page, pin, the kzalloc of each buffer (ENOMEM above
        KMALLOC_MAX_SIZE), sev_issue_cmd (EBADF without /dev/sev), the firmware; the
        transport buffer and the header come back at the lengths asked for."""
        what = "KVM_SEV_SEND_UPDATE_DATA"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        hdr_len, trans_len = self._u32(data, "hdr_len"), self._u32(data, "trans_len")
        gpa, guest_len = self._int(data, "guest_uaddr"), self._u32(data, "guest_len")
        if not hdr_len or not trans_len:  # __sev_send_update_data_query_lengths
            try:
                self._firmware_fd(what).send_update_data(sev.handle, None, 0, 0, 0, 0)
            except SevFwError as e:
                e.fields = {"hdr_len": e.fields.get("hdr_len", 0), "trans_len": 0}
                raise
            raise AssertionError("SEND_UPDATE_DATA accepted a zero header")  # pragma: no cover
        if not self._int(data, "trans_uaddr") or not guest_len or not self._int(data, "hdr_uaddr"):
            raise _err(errno.EINVAL, f"{what}: header, guest and transport buffers are required")
        self._one_page(what, gpa, guest_len)
        self._pin(what, gpa, guest_len)
        if hdr_len > KMALLOC_MAX_SIZE or trans_len > KMALLOC_MAX_SIZE:
            raise _err(errno.ENOMEM, f"{what}: buffers too large")
        firmware = self._firmware_fd(what)  # sev_issue_cmd: after the allocations
        hdr, trans = firmware.send_update_data(
            sev.handle, self.memory, gpa, guest_len, hdr_len, trans_len
        )
        # copy_to_user of the kernel's zeroed buffers, at the caller's lengths.
        return {
            "hdr": hdr[:hdr_len].ljust(hdr_len, b"\0"),
            "trans": trans[:trans_len].ljust(trans_len, b"\0"),
        }

    def _send_finish(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_SEND_FINISH" if cmd == uapi.KVM_SEV_SEND_FINISH else "KVM_SEV_SEND_CANCEL"
        sev = self._need_sev(what)
        firmware = self._firmware_fd(what)
        if cmd == uapi.KVM_SEV_SEND_FINISH:
            firmware.send_finish(sev.handle)
        else:
            firmware.send_cancel(sev.handle)
        return {}

    def _receive_start(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """sev_receive_start: EINVAL for missing blobs, the firmware (through argp->sev_fd),
        then bind the VM's ASID (DECOMMISSION if that fails), then handle and fd recorded.
        The VM must have done KVM_SEV_INIT: it owns an ASID and no handle yet."""
        what = "KVM_SEV_RECEIVE_START"
        sev = self._need_sev(what)
        data = self._data(what, fields)
        if not self._bytes(data, "pdh") or not self._bytes(data, "session"):
            raise _err(errno.EINVAL, f"{what}: PDH certificate and session are required")
        pdh = self._blob(what, data, "pdh")
        session = self._blob(what, data, "session")
        firmware = self.host.firmware  # argp->sev_fd: /dev/sev
        ctx = firmware.receive_start(
            self._u32(data, "handle"), self._u32(data, "policy"), pdh, session
        )
        try:
            firmware.activate(ctx.handle, sev.asid)  # sev_bind_asid
        except SevFwError:
            firmware.decommission(ctx.handle)
            raise
        sev.policy = ctx.policy
        sev.handle = ctx.handle
        sev.fd = True
        return {"handle": ctx.handle}

    def _receive_update_data(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """sev_receive_update_data: EINVAL unless every buffer is given and the range is
        within one page, the blobs copied in, the guest page pinned, the firmware."""
        what = "KVM_SEV_RECEIVE_UPDATE_DATA"
        sev = self._need_sev(what, errno.EINVAL)  # this one says EINVAL, not ENOTTY
        data = self._data(what, fields)
        gpa, guest_len = self._int(data, "guest_uaddr"), self._u32(data, "guest_len")
        hdr, trans = self._bytes(data, "hdr"), self._bytes(data, "trans")
        if not hdr or not guest_len or not trans:
            raise _err(errno.EINVAL, f"{what}: header, guest range and transport are required")
        self._one_page(what, gpa, guest_len)
        hdr = self._blob(what, data, "hdr")
        trans = self._blob(what, data, "trans")
        self._pin(what, gpa, guest_len)
        self._firmware_fd(what).receive_update_data(
            sev.handle, self.memory, gpa, guest_len, hdr, trans
        )
        return {}

    def _receive_finish(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        what = "KVM_SEV_RECEIVE_FINISH"
        sev = self._need_sev(what)
        self._firmware_fd(what).receive_finish(sev.handle)
        return {}

    def _snp(self, cmd: int, fields: dict[str, int | bytes] | None) -> dict[str, int | bytes]:
        # No SNP guests exist here: SNP_LAUNCH_START/FINISH say ENOTTY, SNP_LAUNCH_UPDATE
        # EINVAL, as on a non-SNP VM.
        code = errno.EINVAL if cmd == uapi.KVM_SEV_SNP_LAUNCH_UPDATE else errno.ENOTTY
        raise _err(code, f"KVM_MEMORY_ENCRYPT_OP({cmd}): VM {self.id} is not an SNP guest")

    # -- KVM_MEMORY_ENCRYPT_REG_REGION / UNREG_REGION

    def reg_region(self, mm: int, addr: int, size: int) -> None:
        """sev_mem_enc_register_region: pin [addr, addr+size) into regions_list."""
        what = "KVM_MEMORY_ENCRYPT_REG_REGION"
        self._gate(mm, what)
        sev = self._need_sev(what)
        if self.is_mirror:
            raise _err(errno.EINVAL, f"{what}: a mirror does not own the context")
        if addr > ULONG_MAX or size > ULONG_MAX:
            raise _err(errno.EINVAL, f"{what}: range too large")
        npages = self._pin(what, addr, size)
        sev.pages_locked += npages
        sev.regions_list.append(EncRegion(addr=addr, size=size, npages=npages))

    def unreg_region(self, mm: int, addr: int, size: int) -> None:
        """sev_mem_enc_unregister_region: the mirror check comes before the SEV check."""
        what = "KVM_MEMORY_ENCRYPT_UNREG_REGION"
        self._gate(mm, what)
        if self.is_mirror:
            raise _err(errno.EINVAL, f"{what}: a mirror does not own the context")
        sev = self._need_sev(what)
        for region in sev.regions_list:
            if region.addr == addr and region.size == size:
                sev.pages_locked -= region.npages
                sev.regions_list.remove(region)
                return
        raise _err(errno.EINVAL, f"{what}: no region {addr:#x}+{size:#x}")

    # -- stats

    def stats(self) -> dict[str, Any]:
        ctx = self.host.firmware.contexts.get(self.sev.handle) if self.sev.handle else None
        return {
            "id": self.id,
            "creator": self.creator,
            "dead": self.dead,
            "mode": self.mode,
            "asid": self.sev.asid,
            "handle": self.sev.handle,
            "firmware_state": uapi.SEV_GUEST_STATE_NAMES[ctx.state] if ctx else None,
            "owner": self.sev.enc_context_owner.id if self.sev.enc_context_owner else None,
            "mirrors": [m.id for m in self.sev.mirror_vms],
            "refcount": self.refcount,
            "vcpus": [
                {"id": v.vcpu_id, "steps": v.steps, "protected": v.guest_state_protected}
                for v in self.vcpus
            ],
        }


_SevHandler = Callable[[Vm, int, dict[str, int | bytes] | None], dict[str, int | bytes]]

# sev_mem_enc_ioctl's switch. Ids without a handler (SEND/RECEIVE_UPDATE_VMSA, CERT_EXPORT,
# 23..99, 103+) take its default: EINVAL.
_SEV_COMMANDS: dict[int, _SevHandler] = {
    uapi.KVM_SEV_INIT: Vm._sev_init,
    uapi.KVM_SEV_ES_INIT: Vm._sev_init,
    uapi.KVM_SEV_INIT2: Vm._sev_init2,
    uapi.KVM_SEV_LAUNCH_START: Vm._launch_start,
    uapi.KVM_SEV_LAUNCH_UPDATE_DATA: Vm._launch_update_data,
    uapi.KVM_SEV_LAUNCH_UPDATE_VMSA: Vm._launch_update_vmsa,
    uapi.KVM_SEV_LAUNCH_SECRET: Vm._launch_secret,
    uapi.KVM_SEV_LAUNCH_MEASURE: Vm._launch_measure,
    uapi.KVM_SEV_LAUNCH_FINISH: Vm._launch_finish,
    uapi.KVM_SEV_GUEST_STATUS: Vm._guest_status,
    uapi.KVM_SEV_DBG_DECRYPT: Vm._dbg_decrypt,
    uapi.KVM_SEV_DBG_ENCRYPT: Vm._dbg_encrypt,
    uapi.KVM_SEV_GET_ATTESTATION_REPORT: Vm._attestation_report,
    uapi.KVM_SEV_SEND_START: Vm._send_start,
    uapi.KVM_SEV_SEND_UPDATE_DATA: Vm._send_update_data,
    uapi.KVM_SEV_SEND_FINISH: Vm._send_finish,
    uapi.KVM_SEV_SEND_CANCEL: Vm._send_finish,
    uapi.KVM_SEV_RECEIVE_START: Vm._receive_start,
    uapi.KVM_SEV_RECEIVE_UPDATE_DATA: Vm._receive_update_data,
    uapi.KVM_SEV_RECEIVE_FINISH: Vm._receive_finish,
    uapi.KVM_SEV_SNP_LAUNCH_START: Vm._snp,
    uapi.KVM_SEV_SNP_LAUNCH_UPDATE: Vm._snp,
    uapi.KVM_SEV_SNP_LAUNCH_FINISH: Vm._snp,
}


_ALWAYS_ONE_CAPS = frozenset(
    {
        uapi.KVM_CAP_USER_MEMORY,
        uapi.KVM_CAP_READONLY_MEM,  # kvm_arch_has_readonly_mem for the default VM type
        uapi.KVM_CAP_IMMEDIATE_EXIT,
        uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
        uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM,
    }
)


def _root_cgroup(mm: int) -> str:
    return ROOT_CGROUP


class Host:
    """/dev/kvm and the platform under it: VMs, the ASID pool, misc cgroups, the firmware.

    Args:
        sev_asids: SEV ASIDs (min_sev_asid..max_sev_asid).
        sev_es_asids: SEV-ES ASIDs (1..min_sev_asid-1); 0 disables SEV-ES.
        move_into_dead_ok: the "pending change" of reference section 2 (default: EIO).
        slice_ns: the guest time one KVM_RUN may take before it returns KVM_EXIT_INTR.
        clock: monotonic nanoseconds, for the guest.
        cgroup_of: the misc cgroup of a process (by default all are in the root).
        platform: the SEV platform's identity (keys, certificates, AMD root); by default a
            fresh one under a root of its own.
    """

    def __init__(
        self,
        *,
        sev_asids: int = DEFAULT_SEV_ASIDS,
        sev_es_asids: int = DEFAULT_SEV_ES_ASIDS,
        move_into_dead_ok: bool = False,
        slice_ns: int = 200_000,
        clock: Callable[[], int] = time.monotonic_ns,
        cgroup_of: Callable[[int], str] = _root_cgroup,
        platform: Platform | None = None,
    ) -> None:
        self.asids = AsidPool(sev_asids=sev_asids, sev_es_asids=sev_es_asids)
        self.sev_enabled = sev_asids + sev_es_asids > 0
        self.sev_es_enabled = sev_es_asids > 0
        self.move_into_dead_ok = move_into_dead_ok
        self.slice_ns = slice_ns
        self.clock = clock
        self.cgroup_of = cgroup_of
        self.warnings: list[str] = []
        self.cgroups = MiscCgroups({MISC_SEV: sev_asids, MISC_SEV_ES: sev_es_asids}, self.warnings)
        self.firmware = SevFirmware(
            es_supported=self.sev_es_enabled, is_es_asid=self.asids.is_es, platform=platform
        )
        self.vms: dict[int, Vm] = {}
        self._next_vm_id = 1

    def get_api_version(self) -> int:
        return uapi.KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION (kvm_vm_ioctl_check_extension_generic, then x86.c's
        kvm_vm_ioctl_check_extension) for the capabilities the model implements. MOVE and
        COPY are reported whatever the vendor module: x86.c lists them among its
        unconditional caps (the ENABLE_CAP is what may fail)."""
        if cap in _ALWAYS_ONE_CAPS:
            return 1
        if cap == uapi.KVM_CAP_NR_VCPUS:  # min(num_online_cpus(), KVM_MAX_VCPUS)
            return min(os.cpu_count() or 1, KVM_MAX_VCPUS)
        if cap == uapi.KVM_CAP_MAX_VCPUS:
            return KVM_MAX_VCPUS
        if cap == uapi.KVM_CAP_MAX_VCPU_ID:
            return KVM_MAX_VCPU_IDS
        if cap == uapi.KVM_CAP_NR_MEMSLOTS:
            return uapi.KVM_USER_MEM_SLOTS
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        if cap == uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return uapi.KVM_DIRTY_LOG_MANUAL_CAPS
        if cap in (uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_CAP_X86_MSR_FILTER):
            return 1
        if cap == KVM_CAP_VM_TYPES:
            return self._supported_vm_types()
        return 0

    def _supported_vm_types(self) -> int:
        types = 1 << KVM_X86_DEFAULT_VM
        if self.sev_enabled:
            types |= 1 << KVM_X86_SEV_VM
        if self.sev_es_enabled:
            types |= 1 << KVM_X86_SEV_ES_VM
        return types

    def create_vm(self, mm: int, vm_type: int = KVM_X86_DEFAULT_VM) -> Vm:
        """KVM_CREATE_VM: a VM owned by process `mm`, with one reference (the new fd)."""
        if vm_type < 0 or vm_type >= 64 or not self._supported_vm_types() & (1 << vm_type):
            raise _err(errno.EINVAL, f"KVM_CREATE_VM: VM type {vm_type} is not supported")
        vm = Vm(self, self._next_vm_id, mm, vm_type)
        self._next_vm_id += 1
        self.vms[vm.id] = vm
        return vm

    # -- ASIDs (sev_asid_new / sev_asid_free)

    def sev_asid_new(self, sev: SevInfo, mm: int) -> None:
        low, high = self.asids.bounds(sev.es_active)
        if low > high:
            raise _err(errno.ENOTTY, "SEV INIT: no ASIDs for this guest type on this host")
        resource = MISC_SEV_ES if sev.es_active else MISC_SEV
        cg = self.cgroup_of(mm)
        self.cgroups.try_charge(cg, resource)
        asid = self.asids.alloc(sev.es_active)
        if asid is None:
            self.cgroups.uncharge(cg, resource)
            raise _err(errno.EBUSY, f"SEV INIT: no free {resource} ASID")
        sev.misc_cg = cg
        sev.asid = asid

    def sev_asid_free(self, sev: SevInfo) -> None:
        self.asids.free(sev.asid)
        self.cgroups.uncharge(sev.misc_cg, MISC_SEV_ES if sev.es_active else MISC_SEV)
        sev.misc_cg = None

    # -- /dev/sev

    def sev_issue_cmd(
        self, cmd: int, fields: dict[str, int | bytes] | None
    ) -> dict[str, int | bytes]:
        """The /dev/sev ioctl SEV_ISSUE_CMD (drivers/crypto/ccp/sev-dev.c sev_ioctl) for the
        platform commands a migrating VMM needs: PLATFORM_STATUS and PDH_CERT_EXPORT; plus
        kvmstub's stand-in for AMD's key server, KVMSTUB_SEV_AMD_CERT_CHAIN -> {amd_certs}.
        Fields by the kernel's struct names; out buffers as for KVM_SEV_SEND_START."""
        if not self.sev_enabled:
            raise _err(errno.ENODEV, "/dev/sev: no SEV on this host")
        firmware = self.firmware
        if cmd == uapi.KVMSTUB_SEV_AMD_CERT_CHAIN:
            return {"amd_certs": firmware.platform.amd_chain()}
        if cmd >= uapi.SEV_MAX:
            raise _err(errno.EINVAL, f"SEV_ISSUE_CMD: unknown command {cmd}")
        if fields is None and cmd != uapi.SEV_PLATFORM_STATUS:
            raise _err(errno.EFAULT, f"SEV_ISSUE_CMD({cmd}): data is NULL")
        if cmd == uapi.SEV_PLATFORM_STATUS:
            return firmware.platform_status()
        if cmd == uapi.SEV_PDH_CERT_EXPORT:
            assert fields is not None
            return self._pdh_cert_export(fields)
        raise _err(errno.EOPNOTSUPP, f"SEV_ISSUE_CMD({cmd}): not modelled by kvmstub")

    def _pdh_cert_export(self, data: dict[str, int | bytes]) -> dict[str, int | bytes]:
        """sev_ioctl_do_pdh_export: a length query when an address or the PDH length is 0
        (the firmware gets zero lengths and answers INVALID_LEN with both lengths filled in);
        a buffer over SEV_FW_BLOB_MAX_SIZE -> EFAULT; both lengths always written back."""
        pdh_len = Vm._u32(data, "pdh_cert_len")
        chain_len = Vm._u32(data, "cert_chain_len")
        query = not Vm._int(data, "pdh_cert_address") or not pdh_len
        query = query or not Vm._int(data, "cert_chain_address")
        if query:
            pdh_len = chain_len = 0
        elif pdh_len > uapi.SEV_FW_BLOB_MAX_SIZE or chain_len > uapi.SEV_FW_BLOB_MAX_SIZE:
            raise _err(errno.EFAULT, "SEV_PDH_CERT_EXPORT: buffer larger than 16 KiB")
        pdh, chain = self.firmware.pdh_cert_export(pdh_len, chain_len)
        return {
            "pdh_cert_len": len(pdh),
            "cert_chain_len": len(chain),
            "pdh_cert": pdh.ljust(pdh_len, b"\0"),
            "cert_chain": chain.ljust(chain_len, b"\0"),
        }

    # -- stats

    def stats(self) -> dict[str, Any]:
        firmware = self.firmware
        return {
            "platform": {
                "state": uapi.SEV_STATE_NAMES[firmware.platform_state],
                "api": f"{firmware.platform.api[0]}.{firmware.platform.api[1]}",
                **firmware.platform.identity(),
            },
            "vms": [vm.stats() for vm in self.vms.values()],
            "asids": {
                "sev": self.asids.counts(es=False),
                "sev_es": self.asids.counts(es=True),
            },
            "misc_cgroups": {cg: dict(usage) for cg, usage in self.cgroups.usage.items()},
            "firmware_guests": len(self.firmware.contexts),
            "warnings": list(self.warnings),
        }
