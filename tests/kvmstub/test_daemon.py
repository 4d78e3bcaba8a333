"""The kvmstub daemon over real sockets: its fds behave like kernel fds, the credential gate,
fd arguments, release on close and on death, hostile input, the command line.

Raw tests speak the wire format on blocking sockets (`Raw`), so they can send what no client
would; the others use kvmstub.client.
"""

from __future__ import annotations

import array
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmstub import client, daemon, uapi, wire

KvmstubDaemon = Any  # tests/conftest.py's class; conftest modules are not imported by name

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM


# --- helpers --------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until true (the daemon notices closes asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Raw:
    """One kvmstub fd driven by hand on a blocking socket: any bytes, any fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(10)  # a daemon that stops answering fails the test, not hangs it
        self.sock = sock
        self.next_id = 100

    @classmethod
    def connect(cls, path: Path) -> Raw:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(str(path))
        return cls(sock)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], ancillary)

    def receive(self) -> tuple[wire.AnyReply, list[int]]:
        data, ancdata, _, _ = self.sock.recvmsg(wire.MAX_DATAGRAM, socket.CMSG_SPACE(64 * 4))
        assert data, "the daemon closed this fd instead of answering"
        fds: list[int] = []
        for _, _, payload in ancdata:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        return wire.decode_reply(data), fds

    def exchange(self, data: bytes, fds: Sequence[int] = ()) -> wire.AnyReply:
        """Send one datagram, return the reply; fds that come back are closed."""
        self.send(data, fds)
        reply, received = self.receive()
        for fd in received:
            os.close(fd)
        return reply

    def call(self, make: Callable[[int], wire.Request], fds: Sequence[int] = ()) -> wire.AnyReply:
        self.next_id += 1
        reply = self.exchange(wire.encode(make(self.next_id)), fds)
        assert reply.id == self.next_id
        return reply

    def new_object(self, make: Callable[[int], wire.Request]) -> Raw:
        self.next_id += 1
        self.send(wire.encode(make(self.next_id)))
        reply, fds = self.receive()
        assert isinstance(reply, wire.NewObject), reply
        # A VM comes alone; a vCPU with its kvm_run page (a memfd), which we do not need.
        assert len(fds) == (2 if reply.kind == "vcpu" else 1)
        for extra in fds[1:]:
            os.close(extra)
        return Raw(socket.socket(fileno=fds[0]))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def errno_of(reply: wire.AnyReply) -> int:
    assert isinstance(reply, wire.Error), reply
    return reply.errno


@pytest.fixture
def raw_objects(kvmstub_daemon: KvmstubDaemon) -> Iterator[tuple[Raw, Raw, Raw]]:
    """A system fd, a VM of ours and a vCPU of it, on raw sockets."""
    system = Raw.connect(kvmstub_daemon.socket)
    vm = system.new_object(lambda i: wire.CreateVm(i))
    vcpu = vm.new_object(lambda i: wire.CreateVcpu(i, 0))
    yield system, vm, vcpu
    for raw in (vcpu, vm, system):
        raw.close()


def settled_fd_count(kvmstub_daemon: KvmstubDaemon, expected: int) -> None:
    wait_for(lambda: kvmstub_daemon.open_fds() == expected)


def quiet_fd_count(kvmstub_daemon: KvmstubDaemon) -> int:
    """The daemon's fd count once it stops changing: it closes its copy of a new object's
    fd just after replying, so a client may look a moment too early."""
    before = kvmstub_daemon.open_fds()
    while True:
        time.sleep(0.05)
        now = kvmstub_daemon.open_fds()
        if now == before:
            return now
        before = now


def child(script: str, *args: str, pass_fds: Sequence[int] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        pass_fds=pass_fds,
        stdout=subprocess.PIPE,
        text=True,
    )


async def launch_sev(
    kvm: client.Kvm, *, es: bool, vcpus: int = 4
) -> tuple[client.Vm, list[client.Vcpu]]:
    """The selftest's sev_vm_create: INIT, vCPUs, LAUNCH_START, (ES) LAUNCH_UPDATE_VMSA."""
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_ES_INIT if es else uapi.KVM_SEV_INIT)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=uapi.SEV_POLICY_ES if es else 0)
    if es:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    return vm, cpus


# --- the process, its socket, its command line -------------------------------------------------


def test_ready_line_names_socket_pid_and_default_asid_counts(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    assert kvmstub_daemon.ready_line == (
        f"kvmstub: ready socket={kvmstub_daemon.socket} pid={kvmstub_daemon.pid} "
        "sev-asids=410 sev-es-asids=99"
    )


@pytest.mark.kvmstub_args("--sev-asids", "3", "--sev-es-asids", "1", "--slice-us", "50")
def test_serve_flags_reach_the_model(kvmstub_daemon: KvmstubDaemon) -> None:
    assert kvmstub_daemon.ready_line.endswith("sev-asids=3 sev-es-asids=1")
    asids = kvmstub_daemon.stats()["asids"]
    assert (asids["sev"]["total"], asids["sev_es"]["total"]) == (3, 1)


def test_socket_is_mode_0660_in_a_directory_created_for_it(kvmstub_dir: Path) -> None:
    path = kvmstub_dir / "not" / "yet" / "kvm.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"kvmstub: ready socket={path} ")
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    assert not path.exists(), "SIGINT must remove the socket too"


def test_socket_defaults_to_kvmstub_socket_then_xdg_runtime_dir(kvmstub_dir: Path) -> None:
    env = {"KVMSTUB_SOCKET": "/x/k.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert client.default_socket() == "/x/k.sock"
        mp.delenv("KVMSTUB_SOCKET")
        assert client.default_socket() == "/run/user/7/kvmstub/kvm.sock"
        mp.delenv("XDG_RUNTIME_DIR")
        assert client.default_socket() == "/run/kvmstub/kvm.sock"


def test_a_second_daemon_on_a_live_socket_is_refused_and_the_first_keeps_serving(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(kvmstub_daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert second.stderr.startswith("kvmstub: cannot serve ")
    assert "already serves" in second.stderr
    assert "Traceback" not in second.stderr
    assert kvmstub_daemon.socket.is_socket()
    assert kvmstub_daemon.stats()["vms"] == []


def test_a_stale_socket_left_by_a_dead_daemon_is_replaced(
    kvmstub_dir: Path, kvmstub_factory: Callable[..., KvmstubDaemon]
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(kvmstub_dir / "kvm.sock"))
    stale.close()  # the file stays, nobody listens
    replacement = kvmstub_factory(kvmstub_dir)
    assert replacement.stats()["vms"] == []


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--sev-asids", "-1"], "out of range"),
        (["--sev-es-asids", "lots"], "not an integer"),
        (["--slice-us", "0"], "out of range"),
        (["--halt-poll-us", "-5"], "out of range"),
    ],
)
def test_bad_flag_values_are_refused_with_a_message(flags: list[str], complaint: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", "/nonexistent/x", *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert complaint in result.stderr


def test_help_explains_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for flag in ("--socket", "--sev-asids", "--sev-es-asids", "--slice-us", "--halt-poll-us"):
        assert flag in result.stdout


async def test_stats_command_shows_vms_and_asids_as_a_table_and_as_json(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    _vm, _vcpus = await launch_sev(kvm, es=True)  # kept: their fds keep them alive
    argv = [sys.executable, "-m", "kvmstub.cli", "stats", "--socket", str(kvmstub_daemon.socket)]
    table = (await trio.run_process(argv, capture_stdout=True)).stdout.decode()
    as_json = json.loads((await trio.run_process([*argv, "--json"], capture_stdout=True)).stdout)
    assert as_json["vms"][0]["creator"] == os.getpid()
    assert as_json["vms"][0]["handoff_gap_us"] is None  # it took no guest over
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["VM", "CREATOR", "DEAD", "MODE"]
    assert header.split()[-2:] == ["HANDOFF", "GAP"]
    assert row.split() == [
        "1", str(os.getpid()), "no", "sev-es", "1", "1", "LUPDATE", "4", "0", "-"
    ]  # fmt: skip
    assert "SEV-ES ASIDs: 1 used, 98 free of 99" in table


async def test_statistics_bigger_than_a_datagram_arrive_whole_through_a_memfd(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vms = [await kvm.create_vm() for _ in range(6)]
    for vm in vms:
        for i in range(1024):  # a vCPU stays in its VM after its fd is closed
            (await vm.create_vcpu(i)).close()
    baseline = quiet_fd_count(kvmstub_daemon)
    assert len(msgspec.msgpack.encode(await kvm.stats())) > wire.MAX_DATAGRAM
    for stats in (await kvm.stats(), kvmstub_daemon.stats()):
        assert [len(vm["vcpus"]) for vm in stats["vms"]] == [1024] * 6
    assert quiet_fd_count(kvmstub_daemon) == baseline  # no memfd left behind


def test_a_socket_that_cannot_be_made_is_one_clear_line(kvmstub_dir: Path) -> None:
    blocker = kvmstub_dir / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(blocker / "kvm.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"kvmstub: cannot serve {blocker / 'kvm.sock'}: {blocker} is not a directory"
    ]


def test_stats_command_without_a_daemon_says_so(kvmstub_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "stats", "--socket", str(kvmstub_dir / "no.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot read stats" in result.stderr


# --- which fd answers what ---------------------------------------------------------------------


def test_an_ioctl_of_another_fd_kind_gets_what_that_kernel_file_answers(
    raw_objects: tuple[Raw, Raw, Raw],
) -> None:
    system, vm, vcpu = raw_objects
    # kvm_arch_dev_ioctl, kvm_arch_vm_ioctl and kvm_arch_vcpu_ioctl defaults.
    assert errno_of(system.call(lambda i: wire.CreateVcpu(i, 1))) == errno.EINVAL
    assert errno_of(system.call(lambda i: wire.Run(i))) == errno.EINVAL
    assert errno_of(vm.call(lambda i: wire.GetApiVersion(i))) == errno.ENOTTY
    assert errno_of(vm.call(lambda i: wire.GetRegs(i))) == errno.ENOTTY
    assert errno_of(vcpu.call(lambda i: wire.CreateVcpu(i, 1))) == errno.EINVAL
    assert errno_of(vcpu.call(lambda i: wire.Stats(i))) == errno.EINVAL


def test_check_extension_is_answered_on_a_vm_fd_as_well(raw_objects: tuple[Raw, Raw, Raw]) -> None:
    system, vm, _ = raw_objects
    for raw in (system, vm):
        reply = raw.call(lambda i: wire.CheckExtension(i, MOVE))
        assert isinstance(reply, wire.Ok) and reply.result == 1


# --- hostile and malformed input ---------------------------------------------------------------


def test_a_malformed_request_gets_einval_with_its_id_echoed(
    raw_objects: tuple[Raw, Raw, Raw],
) -> None:
    _, vm, _ = raw_objects
    reply = vm.exchange(msgspec.msgpack.encode(["CreateVcpu", 4242, -1]))
    assert isinstance(reply, wire.Error)
    assert (reply.id, reply.errno) == (4242, errno.EINVAL)
    assert "malformed" in reply.message


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1\xc1\xc1", b"\x00", b"", b"\x91" * 200_000, b"GET / HTTP/1.0\r\n\r\n"],
    ids=["reserved-bytes", "an-int", "empty", "nested-and-oversized", "http"],
)
def test_garbage_gets_einval_and_every_fd_keeps_working(
    kvmstub_daemon: KvmstubDaemon, raw_objects: tuple[Raw, Raw, Raw], garbage: bytes
) -> None:
    for raw in raw_objects:
        reply = raw.exchange(garbage)
        assert isinstance(reply, wire.Error) and reply.errno == errno.EINVAL
    system, vm, vcpu = raw_objects
    assert isinstance(system.call(lambda i: wire.GetApiVersion(i)), wire.Ok)
    assert isinstance(vm.call(lambda i: wire.CheckExtension(i, MOVE)), wire.Ok)
    assert isinstance(vcpu.call(lambda i: wire.GetRegs(i)), wire.RegsReply)
    assert len(kvmstub_daemon.stats()["vms"]) == 1


def test_an_empty_datagram_is_a_request_not_a_close(
    kvmstub_daemon: KvmstubDaemon, raw_objects: tuple[Raw, Raw, Raw]
) -> None:
    _, vm, _ = raw_objects
    assert errno_of(vm.exchange(b"")) == errno.EINVAL
    assert len(kvmstub_daemon.stats()["vms"]) == 1


def test_a_datagram_over_the_size_limit_is_refused_and_the_fd_keeps_working(
    raw_objects: tuple[Raw, Raw, Raw],
) -> None:
    _, vm, _ = raw_objects
    big = wire.encode(
        wire.SevIoctl(77, uapi.KVM_SEV_DBG_ENCRYPT, {"data": b"x" * wire.MAX_DATAGRAM})
    )
    reply = vm.exchange(big)
    assert isinstance(reply, wire.Error)
    assert (reply.id, reply.errno) == (77, errno.EINVAL)
    assert "larger than" in reply.message
    assert isinstance(vm.call(lambda i: wire.CheckExtension(i, MOVE)), wire.Ok)


def test_fds_beyond_what_a_request_declares_are_refused_and_closed_in_the_daemon(
    kvmstub_daemon: KvmstubDaemon, raw_objects: tuple[Raw, Raw, Raw]
) -> None:
    system, vm, _ = raw_objects
    baseline = quiet_fd_count(kvmstub_daemon)
    r, w = os.pipe()
    try:
        assert errno_of(system.call(lambda i: wire.GetApiVersion(i), [r])) == errno.EINVAL
        two = [r, w]
        assert errno_of(vm.call(lambda i: wire.EnableCap(i, MOVE, 0, (0,), 0), two)) == errno.EINVAL
        # Far more than the daemon makes room for: MSG_CTRUNC, refused, nothing kept.
        many = [r] * 40
        assert (
            errno_of(vm.call(lambda i: wire.EnableCap(i, MOVE, 0, (0,), 0), many)) == errno.EINVAL
        )
    finally:
        os.close(r)
        os.close(w)
    assert kvmstub_daemon.open_fds() == baseline


def test_daemon_refusals_to_another_process_are_eio_first(
    kvmstub_daemon: KvmstubDaemon, raw_objects: tuple[Raw, Raw, Raw]
) -> None:
    """kvm_vm_ioctl checks kvm->mm before the ioctl number, so even a malformed or unknown
    request from a process that did not create the VM gets EIO."""
    _, vm, vcpu = raw_objects
    script = """
        import errno, os, socket, sys, msgspec
        from kvmstub import wire
        out = []
        for fd in map(int, sys.argv[1:]):
            s = socket.socket(fileno=fd)
            s.settimeout(10)
            for data in (b"\\xc1", wire.encode(wire.GetApiVersion(1)), wire.encode(wire.Run(2))):
                s.send(data)
                out.append(wire.decode_reply(s.recv(wire.MAX_DATAGRAM)).errno)
        print(out)
    """
    fds = [vm.fileno(), vcpu.fileno()]
    proc = child(script, *map(str, fds), pass_fds=fds)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert stdout.strip() == str([errno.EIO] * 6)


_TAGS = [cls.__name__ for cls in wire.Request.__subclasses__()]
_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.sampled_from([0, 1, 4096, MOVE, COPY, uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12])
    | st.binary(max_size=64)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["handle", "policy", "uaddr", "len", "data", ""]), inner)
    ),
    max_leaves=10,
)
_request_like = st.builds(
    lambda tag, rid, fields: msgspec.msgpack.encode([tag, rid, *fields]),
    st.sampled_from(_TAGS) | st.text(max_size=12),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.lists(_value, max_size=7),
)


def _valid_request_prefix(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(min_value=0, max_value=len(data)).map(lambda n: data[:n])


_datagram = st.one_of(
    _request_like,
    st.binary(max_size=256),
    st.sampled_from([wire.encode(r) for r in (wire.Run(1), wire.SevIoctl(2, 0, {}))]).flatmap(
        _valid_request_prefix
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    datagrams=st.lists(
        st.tuples(_datagram, st.sampled_from(["system", "vm", "vcpu"]), st.integers(0, 3)),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_requests_get_answers_and_a_well_behaved_client_keeps_working(
    kvmstub_daemon: KvmstubDaemon, datagrams: list[tuple[bytes, str, int]]
) -> None:
    system = Raw.connect(kvmstub_daemon.socket)
    vm = system.new_object(lambda i: wire.CreateVm(i))
    vcpu = vm.new_object(lambda i: wire.CreateVcpu(i, 0))
    other = system.new_object(lambda i: wire.CreateVm(i))
    raws = {"system": system, "vm": vm, "vcpu": vcpu}
    memfd = os.memfd_create("hostile")
    os.ftruncate(memfd, 1 << 16)
    r, w = os.pipe()
    try:
        for data, target, nfds in datagrams:
            fds = [memfd, r, other.fileno(), vcpu.fileno()][:nfds]
            reply = raws[target].exchange(data, fds)  # an answer, never a closed fd
            if isinstance(reply, wire.Error):
                assert 1 <= reply.errno <= 4095
        # Someone else, on their own connection, is served normally throughout.
        well_behaved = Raw.connect(kvmstub_daemon.socket)
        ok = well_behaved.call(lambda i: wire.GetApiVersion(i))
        assert isinstance(ok, wire.Ok) and ok.result == uapi.KVM_API_VERSION
        well_behaved.close()
    finally:
        for fd in (memfd, r, w):
            os.close(fd)
        for raw in (vcpu, vm, other, system):
            raw.close()
    assert kvmstub_daemon.alive()
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])


# --- fd arguments ------------------------------------------------------------------------------


async def test_non_vm_fds_as_move_or_copy_source_are_ebadf(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, src_vcpus = await launch_sev(kvm, es=False)
    dst = await kvm.create_vm()
    memfd = os.memfd_create("not-a-vm")
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closed_fd = os.dup(r)
    os.close(closed_fd)
    not_vms = {
        "memfd": memfd,
        "pipe": r,
        "unrelated socket": a.fileno(),
        "system fd": kvm.fileno(),
        "vcpu fd": src_vcpus[0].fileno(),
        "closed fd": closed_fd,
    }
    for cap in (MOVE, COPY):
        for what, fd in not_vms.items():
            with pytest.raises(OSError) as info:
                await dst.enable_cap(cap, fd)
            assert info.value.errno == errno.EBADF, what
    # Nothing changed: the real source still moves.
    assert await dst.enable_cap(MOVE, src) == 0
    for fd in (memfd, r, w):
        os.close(fd)
    a.close()
    b.close()


async def test_a_dup_of_a_vm_fd_names_the_same_vm_and_keeps_it(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, _ = await launch_sev(kvm, es=False, vcpus=0)
    dst = await kvm.create_vm()
    dup = os.dup(src.fileno())
    src.close()
    assert await dst.enable_cap(MOVE, dup) == 0  # one file, one inode, one VM
    time.sleep(0.1)
    assert len(kvmstub_daemon.stats()["vms"]) == 2, "the dup keeps the moved-from VM"
    os.close(dup)
    wait_for(lambda: len(kvmstub_daemon.stats()["vms"]) == 1)


async def test_a_memory_slots_memfd_copy_is_the_models_and_goes_with_the_vm(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    baseline = quiet_fd_count(kvmstub_daemon)
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, 1 << 20)
    await vm.set_user_memory_region(0, 0, 1 << 20, memfd)
    assert kvmstub_daemon.open_fds() == baseline + 1  # the model's dup, nothing else
    with pytest.raises(OSError) as info:
        await vm.set_user_memory_region(1, 1 << 20, 4096, -1)  # no memfd sent
    assert info.value.errno == errno.EBADF
    assert kvmstub_daemon.open_fds() == baseline + 1
    vm.close()
    os.close(memfd)
    settled_fd_count(kvmstub_daemon, baseline - 1)  # the VM's end and the model's dup


# --- release -----------------------------------------------------------------------------------


async def test_closing_the_last_copy_of_a_vm_fd_releases_the_vm(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    copy = os.dup(vm.fileno())
    vm.close()
    time.sleep(0.1)
    assert len(kvmstub_daemon.stats()["vms"]) == 1, "a dup keeps the VM"
    os.close(copy)
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])


async def test_a_vcpu_fd_keeps_its_vm_alive_until_it_is_closed(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    vcpu = await vm.create_vcpu(0)
    vm.close()
    time.sleep(0.1)
    assert [v["refcount"] for v in kvmstub_daemon.stats()["vms"]] == [1]
    vcpu.close()
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])


async def test_a_mirror_keeps_its_owner_and_the_asid_until_the_mirror_goes(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    owner, owner_vcpus = await launch_sev(kvm, es=False)
    mirror = await kvm.create_vm()
    await mirror.enable_cap(COPY, owner)
    for v in owner_vcpus:
        v.close()
    owner.close()
    time.sleep(0.1)
    stats = kvmstub_daemon.stats()
    assert sorted(vm["mode"] for vm in stats["vms"]) == ["mirror", "sev"]
    assert stats["asids"]["sev"]["used"] == 1
    mirror.close()
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])
    assert kvmstub_daemon.stats()["asids"]["sev"]["used"] == 0


async def test_a_holder_that_only_shuts_its_fd_down_does_not_release_the_vm(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    """shutdown(SHUT_WR) gives the daemon EOF but the fd is still open (and could still be
    passed on): the VM must stay until the last close, as a kernel file would."""
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    holder = socket.socket(fileno=os.dup(vm.fileno()))
    vm.close()
    holder.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    assert len(kvmstub_daemon.stats()["vms"]) == 1
    holder.close()
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])


_DYING_CLIENT = """
    import sys, trio
    from kvmstub import client, uapi

    async def main(path):
        kvm = await client.open_kvm(path)
        keep = []
        vm = await kvm.create_vm()
        await vm.sev_ioctl(uapi.KVM_SEV_ES_INIT)
        keep += [await vm.create_vcpu(i) for i in range(2)]
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=uapi.SEV_POLICY_ES)
        mirror = await kvm.create_vm()
        await mirror.enable_cap(uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, vm)
        plain = await kvm.create_vm()
        keep += [vm, mirror, plain, await plain.create_vcpu(0)]
        print("ready", flush=True)
        await trio.sleep_forever()

    trio.run(main, sys.argv[1])
"""


def test_a_client_that_dies_releases_everything_it_held(kvmstub_daemon: KvmstubDaemon) -> None:
    baseline = quiet_fd_count(kvmstub_daemon)
    proc = child(_DYING_CLIENT, str(kvmstub_daemon.socket))
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    stats = kvmstub_daemon.stats()
    assert len(stats["vms"]) == 3
    assert all(vm["creator"] == proc.pid for vm in stats["vms"])
    assert stats["asids"]["sev_es"]["used"] == 1
    proc.kill()
    proc.wait()
    proc.stdout.close()
    wait_for(lambda: kvmstub_daemon.stats()["vms"] == [])
    assert kvmstub_daemon.stats()["asids"]["sev_es"]["used"] == 0
    settled_fd_count(kvmstub_daemon, baseline)


# --- two processes: the gate of reference section 4 -----------------------------------------------

_SECOND_PROCESS = """
    import errno, json, sys, trio
    from kvmstub import client, uapi

    async def attempt(out, name, call):
        try:
            await call()
            out[name] = 0
        except OSError as e:
            out[name] = e.errno

    async def main(path, vm_fd, vcpu_fd):
        src = client.Vm.from_fd(int(vm_fd))
        vcpu = client.Vcpu(__import__("socket").socket(fileno=int(vcpu_fd)))
        out = {}
        await attempt(out, "guest_status", lambda: src.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS))
        await attempt(out, "create_vcpu", lambda: src.create_vcpu(7))
        await attempt(out, "enable_cap", lambda: src.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0))
        await attempt(out, "run", lambda: vcpu.run())
        await attempt(out, "get_regs", lambda: vcpu.get_regs())
        kvm = await client.open_kvm(path)
        mine = await kvm.create_vm()
        await attempt(out, "move_from_passed_fd", lambda: mine.enable_cap(
            uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, src))
        out["vms"] = (await kvm.stats())["vms"]
        out["pid"] = __import__("os").getpid()
        print(json.dumps(out))

    trio.run(main, *sys.argv[1:])
"""


async def test_a_vm_fd_in_another_process_gets_eio_but_is_a_move_source_there(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, vcpus = await launch_sev(kvm, es=False)
    asid = kvmstub_daemon.stats()["vms"][0]["asid"]
    fds = [src.fileno(), vcpus[0].fileno()]
    result = await trio.run_process(
        [sys.executable, "-c", textwrap.dedent(_SECOND_PROCESS), str(kvmstub_daemon.socket)]
        + [str(fd) for fd in fds],
        pass_fds=fds,
        capture_stdout=True,
    )
    out = json.loads(result.stdout)
    for ioctl in ("guest_status", "create_vcpu", "enable_cap", "run", "get_regs"):
        assert out[ioctl] == errno.EIO, ioctl
    assert out["move_from_passed_fd"] == 0
    by_creator = {vm["creator"]: vm for vm in out["vms"]}
    assert by_creator[os.getpid()]["dead"] is True
    assert by_creator[os.getpid()]["mode"] == "plain"
    assert by_creator[out["pid"]]["mode"] == "sev"
    assert by_creator[out["pid"]]["asid"] == asid  # the context moved, no new ASID
    # And here, in the creator, the moved-from VM is dead: EIO (reference section 2).
    with pytest.raises(OSError) as info:
        await src.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
    assert info.value.errno == errno.EIO


# --- the daemon in this process: what the model may throw ---------------------------------------


class _BrokenHost:
    """A Host whose calls fail in ways the model never should."""

    move_into_dead_ok = False
    clock = staticmethod(time.monotonic_ns)

    def get_api_version(self) -> int:
        raise RuntimeError("a bug in the model")

    def check_extension(self, cap: int) -> int:
        raise ValueError(f"cannot check {cap}")

    def stats(self) -> dict[str, Any]:
        return {"not encodable": object()}


async def test_unexpected_model_exceptions_become_error_replies_and_the_daemon_lives_on(
    kvmstub_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = kvmstub_dir / "kvm.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, path, _BrokenHost())
        kvm = await client.open_kvm(path)
        for call, err in (
            (kvm.get_api_version, errno.EFAULT),
            (lambda: kvm.check_extension(1), errno.EINVAL),
            (kvm.stats, errno.EFAULT),
        ):
            with pytest.raises(OSError) as info:
                await call()
            assert info.value.errno == err
        with pytest.raises(OSError):
            await kvm.get_api_version()  # still answering
        nursery.cancel_scope.cancel()
    assert not path.exists(), "serve() removes its socket when cancelled"
    assert "a bug in the model" in caplog.text
