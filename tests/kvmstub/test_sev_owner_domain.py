"""An owner's domain (guest policy DOMAIN, reference sev-live-migration.md section 1.3): the
OCA key file `kvmstub serve --oca-key FILE` reads (`keystore.load_oca_key`), the platforms it
makes, and SEND_START's DOMAIN check against them in the model. The same through two kvmstub
daemons is tests/kernel/test_sev_domain_two_hosts.py, and through `handoff migrate`
tests/handoff/test_migrate_domain.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvmstub import keystore, uapi
from kvmstub.cli import format_stats
from kvmstub.keystore import KeystoreError
from kvmstub.model import Host, SevFwError, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

PID = 1000
U = uapi
ROOT = AmdRoot()  # one simulated AMD root for the module (made on first use: RSA-4096)


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def oca_file(tmp_path: Path) -> Path:
    """An owner's OCA key file, as `openssl genpkey ... P-384` and `chmod 600` leave it."""
    return write_key(tmp_path / "owner-oca.pem", pem(ec.generate_private_key(ec.SECP384R1())))


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE_SIZE)
    yield fd
    os.close(fd)


def sev(vm: Vm, cmd: int, fields: dict[str, int | bytes] | None = None) -> dict[str, int | bytes]:
    return vm.sev_ioctl(PID, cmd, fields)


def launched(host: Host, fd: int, policy: int) -> Vm:
    vm = host.create_vm(PID)
    sev(vm, U.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, PAGE_SIZE, fd, 0)
    os.pwrite(fd, b"the owner's page".ljust(PAGE_SIZE, b"."), 0)
    sev(vm, U.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": policy})
    sev(vm, U.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": PAGE_SIZE})
    sev(vm, U.KVM_SEV_LAUNCH_MEASURE, {})
    sev(vm, U.KVM_SEV_LAUNCH_FINISH)
    return vm


def send_start_to(vm: Vm, target: Platform) -> dict[str, int | bytes]:
    pdh, chain = target.pdh_cert_export()
    fields: dict[str, int | bytes] = {
        "pdh_cert": pdh,
        "plat_certs": chain,
        "amd_certs": target.amd_chain(),
        "session_uaddr": 1,
        "session_len": 128,
    }
    return sev(vm, U.KVM_SEV_SEND_START, fields)


# --------------------------------------------------------------------------------------------
# the key file


def test_platforms_given_one_oca_key_share_the_oca_and_keep_their_own_pdh(
    tmp_path: Path, oca_file: Path
) -> None:
    oca = keystore.load_oca_key(oca_file)
    a = keystore.load_or_create_platform(tmp_path / "state-a", ROOT, oca)
    b = Platform(PlatformKeys.generate(oca=keystore.load_oca_key(oca_file)), ROOT)
    alone = keystore.load_or_create_platform(tmp_path / "state-c", ROOT)
    assert a.oca_cert == b.oca_cert and a.oca_fingerprint() == b.oca_fingerprint()
    assert a.pdh_fingerprint() != b.pdh_fingerprint()
    assert alone.oca_fingerprint() != a.oca_fingerprint()
    # The owner's key is only read: the platform's own file keeps its own OCA, and the same
    # state directory without the owner's key is a domain of one again.
    again = keystore.load_or_create_platform(tmp_path / "state-a", ROOT)
    assert again.pdh_fingerprint() == a.pdh_fingerprint()
    assert again.oca_fingerprint() != a.oca_fingerprint()
    assert pem(oca) not in (tmp_path / "state-a" / keystore.PLATFORM_FILE).read_bytes()
    assert oca_file.stat().st_mode & 0o777 == 0o600


def test_an_unusable_oca_key_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    p384 = pem(ec.generate_private_key(ec.SECP384R1()))

    def refused(path: Path) -> str:
        with pytest.raises(KeystoreError) as info:
            keystore.load_oca_key(path)
        return str(info.value)

    assert "does not exist" in refused(tmp_path / "missing.pem")
    assert "openssl genpkey" in refused(tmp_path / "missing.pem")
    assert "chmod 600" in refused(write_key(tmp_path / "open.pem", p384, 0o644))
    assert "chmod 600" in refused(write_key(tmp_path / "group.pem", p384, 0o640))
    two = write_key(tmp_path / "two.pem", p384 + pem(ec.generate_private_key(ec.SECP384R1())))
    assert "holds 2 keys, not 1" in refused(two) and "P-384" in refused(two)
    p256 = write_key(tmp_path / "p256.pem", pem(ec.generate_private_key(ec.SECP256R1())))
    assert "P-384" in refused(p256)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "P-384" in refused(write_key(tmp_path / "rsa.pem", pem(rsa_key)))
    assert "holds 0 keys" in refused(write_key(tmp_path / "empty.pem", b"\n"))
    garbage = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    assert "not a usable private key" in refused(write_key(tmp_path / "garbage.pem", garbage))
    link = tmp_path / "link.pem"
    link.symlink_to(write_key(tmp_path / "target.pem", p384))
    assert "cannot open" in refused(link)  # O_NOFOLLOW: a link is not the owner's file
    assert "not a regular file" in refused(tmp_path)


def test_serve_refuses_an_unusable_oca_key_before_it_listens(
    tmp_path: Path, serve_refused: Callable[..., str]
) -> None:
    key = write_key(tmp_path / "oca.pem", pem(ec.generate_private_key(ec.SECP384R1())), 0o644)
    stderr = serve_refused(tmp_path / "kvm.sock", "--oca-key", str(key))
    assert stderr.startswith("kvmstub: ") and "chmod 600" in stderr


def test_kvmstub_stats_shows_the_oca_an_operator_compares_between_hosts(oca_file: Path) -> None:
    platform = Platform(PlatformKeys.generate(oca=keystore.load_oca_key(oca_file)), ROOT)
    stats = {"vms": [], "platform": {"state": "INIT", "api": "1.55", **platform.identity()}}
    line = next(x for x in format_stats(stats).splitlines() if x.startswith("SEV platform:"))
    assert f"OCA {platform.oca_fingerprint()[:16]}," in line
    assert f"PDH {platform.pdh_fingerprint()[:16]}," in line


# --------------------------------------------------------------------------------------------
# SEND_START's DOMAIN check against platforms so made


def test_a_domain_guest_goes_to_a_platform_of_its_owner_and_no_other(
    oca_file: Path, memfd: int
) -> None:
    oca = keystore.load_oca_key(oca_file)
    src_host = Host(platform=Platform(PlatformKeys.generate(oca=oca), ROOT))
    same_owner = Platform(PlatformKeys.generate(oca=keystore.load_oca_key(oca_file)), ROOT)
    other_owner = Platform(PlatformKeys.generate(), ROOT)
    vm = launched(src_host, memfd, U.SEV_POLICY_DOMAIN)
    with pytest.raises(SevFwError) as info:
        send_start_to(vm, other_owner)
    assert (info.value.errno, info.value.fw_error) == (errno.EIO, U.SEV_RET_POLICY_FAILURE)
    assert info.value.fields == {"policy": 0, "session_len": 128}
    assert sev(vm, U.KVM_SEV_GUEST_STATUS, {})["state"] == U.SEV_GUEST_STATE_RUNNING
    ctx = src_host.firmware.contexts[vm.sev.handle]
    assert ctx.channel is None  # nothing opened
    out = send_start_to(vm, same_owner)
    assert out["policy"] == U.SEV_POLICY_DOMAIN and len(out["session"]) == 128  # type: ignore[arg-type]
    assert sev(vm, U.KVM_SEV_GUEST_STATUS, {})["state"] == U.SEV_GUEST_STATE_SUPDATE
