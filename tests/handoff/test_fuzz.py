"""Hostile input to a real `handoff run --incoming` target, and bad flags to the CLI.

A fake source connects to a real target process (on a real kvmstub) and sends what no honest
source would: random bytes, truncated and oversized datagrams, wrong fd counts, fds of the wrong
kind (a pipe where a memfd or the control socket is expected, a memfd smaller than its slot),
messages out of order, a guest that does not match, a protocol-3 Switchover whose vCPU-state
memfd is missing, not a memfd, unsealed, of another size or full of states the guest cannot use.
Each time the target must refuse clearly (a `Refuse` naming the problem when the protocol still
allows one, and a log line that does), close what it received, exit with status 1, and leave
nothing behind: no VM and no extra fd in kvmstub, no socket file. kvmstub's own wire is fuzzed
in tests/kvmstub/test_daemon.py.
"""

from __future__ import annotations

import array
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff import protocol
from handoff.migration import messages
from handoff.protocol import HandoffConnection, MemfdSlot, Role
from handoff.testing import wait_listening

MEMORY = 8 << 20
PROGRAM = [sys.executable, "-m", "handoff.cli"]


@dataclass
class Target:
    proc: subprocess.Popen[bytes]
    path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def daemon_fds(daemon: Any, expect: int | None = None) -> int:
    """kvmstub's open fds once the count settles (it closes a connection's fd a moment after
    the peer's end goes), or as soon as it is `expect`."""
    last, same = -1, 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        if now == expect:
            return now
        same, last = (same + 1 if now == last else 0), now
        if same >= 10 and expect is None:
            return now
        time.sleep(0.01)
    return last


@pytest.fixture
def start_target(tmp_path: Path, kvmstub_daemon: Any) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(*flags: str) -> Target:
        n = len(started)
        path = tmp_path / "in" / f"t{n}.sock"
        log_path = tmp_path / f"t{n}.log"
        argv = [
            *PROGRAM, "run", "--name", "fz", "--mode", "plain", "--vcpus", "1",
            "--memory", "8M", "--kvm", str(kvmstub_daemon.socket),
            "--control", str(tmp_path / "run" / "fz.qmp"),
            "--serial-log", str(tmp_path / "serial.log"), "--handoff-timeout", "3",
            "--incoming", f"unix:{path}", *flags,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        target = Target(proc, path, log_path)
        started.append(target)
        wait_listening(path, proc, 30, "the target", target.log)
        return target

    yield start
    for target in started:
        if target.proc.poll() is None:
            target.proc.kill()
        target.proc.wait()


def connect(target: Target) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(15)
    sock.connect(str(target.path))
    return sock


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def receive(sock: socket.socket) -> tuple[protocol.Message | None, list[int]]:
    """The target's next message (None at EOF) and the fds that came with it."""
    try:
        data, anc, _, _ = sock.recvmsg(1 << 18, socket.CMSG_SPACE(16 * 4))
    except ConnectionResetError:
        return None, []
    fds = [fd for _, _, p in anc for fd in array.array("i", p[: len(p) - len(p) % 4])]
    return (protocol.decode(data) if data else None), fds


def source_hello(conn: HandoffConnection) -> bytes:
    hello = conn.make_hello(
        vm_name="fz", vm_uuid=uuid.uuid4(), nonce=secrets.token_bytes(protocol.NONCE_SIZE)
    )
    return conn.send(hello)


def greet(target: Target) -> tuple[socket.socket, HandoffConnection]:
    """Connect and exchange Hellos honestly."""
    sock = connect(target)
    conn = HandoffConnection(Role.SOURCE)
    send(sock, source_hello(conn))
    reply, fds = receive(sock)
    assert isinstance(reply, protocol.Hello) and fds == [], reply
    conn.receive(msgspec.msgpack.encode(reply), 0)
    return sock, conn


def describe(**changes: Any) -> protocol.Describe:
    fields: dict[str, Any] = {
        "vcpus": 1,
        "memory_bytes": MEMORY,
        "slots": (MemfdSlot(slot=0, guest_phys_addr=0, size=MEMORY, offset=0),),
        "mode": "plain",
        "policy": 0,
        "line_every": 200,
        "flip_every": 50,
    }
    fields.update(changes)
    return protocol.Describe(**fields)


def listening_socket() -> socket.socket:
    """What a source sends as its control socket: a listening Unix stream socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(f"\0handoff-fuzz-{secrets.token_hex(8)}")  # abstract: nothing in the file system
    sock.listen()
    return sock


def memfd(size: int) -> int:
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def assert_refused_and_gone(target: Target, daemon: Any, fds0: int, says: str) -> None:
    """The target exits 1 naming the problem, and leaves nothing behind."""
    assert target.proc.wait(20) == 1, target.log()
    assert says in target.log(), target.log()
    assert not target.path.exists(), "the target left its handoff socket"
    deadline = time.monotonic() + 10
    while daemon.stats()["vms"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.stats()["vms"] == []
    assert daemon_fds(daemon, expect=fds0) == fds0


def closed_by_peer(read_end: int) -> bool:
    """True once every other copy of the pipe's write end is closed (read sees EOF)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


# --- before any message is understood -------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (b"\xc1\xff not msgpack", "malformed message"),
        (b"\x87\xa4type\xa5hello", "malformed message"),  # a Hello cut short
        (msgspec.msgpack.encode({"type": "commit"}), "may not send Commit in state START"),
        (msgspec.msgpack.encode({"type": "warp", "x": 1}), "malformed message"),
        (msgspec.msgpack.encode([1, 2, 3]), "malformed message"),
    ],
    ids=["garbage", "truncated-hello", "out-of-order", "unknown-type", "not-a-map"],
)
def test_undecodable_or_out_of_order_first_message_is_refused_and_the_target_exits(
    start_target: Callable[..., Target], kvmstub_daemon: Any, first: bytes, says: str
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock = connect(target)
    send(sock, first)
    reply, _ = receive(sock)
    assert reply is None  # a broken protocol allows no further message: EOF
    assert_refused_and_gone(target, kvmstub_daemon, fds0, says)


def test_oversized_datagram_is_refused_and_the_target_exits(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock = connect(target)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        send(sock, b"\x00" * (300 * 1024))
    except OSError as exc:
        pytest.skip(f"this host's socket limits refuse a 300 KiB datagram ({exc})")
    receive(sock)
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "larger than")


def test_hello_carrying_fds_is_refused_and_they_are_closed(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock = connect(target)
    r, w = os.pipe()
    send(sock, source_hello(HandoffConnection(Role.SOURCE)), [w, w, w])
    os.close(w)
    assert receive(sock)[0] is None
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "must carry 0 fds")
    assert closed_by_peer(r)
    os.close(r)


# --- Describe: the message that carries guest memory ------------------------------------------


def test_describe_without_its_memfds_is_refused(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    send(sock, msgspec.msgpack.encode(describe()))  # declares 2 fds, carries none
    assert receive(sock)[0] is None
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "Describe must carry 2 fds")


def test_pipe_where_a_memfd_is_expected_is_refused_naming_the_slot(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    r, w = os.pipe()
    control = listening_socket()
    send(sock, msgspec.msgpack.encode(describe()), [w, control.fileno()])
    os.close(w)
    reply, _ = receive(sock)
    assert isinstance(reply, protocol.Refuse) and reply.code == "incompatible", reply
    assert "memory slot 0 did not come with a memfd" in reply.reason
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "did not come with a memfd")
    assert closed_by_peer(r)
    os.close(r)
    control.close()


def test_memfd_smaller_than_its_slot_is_refused_naming_both_sizes(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    small = memfd(1 << 20)
    control = listening_socket()
    send(sock, msgspec.msgpack.encode(describe()), [small, control.fileno()])
    reply, _ = receive(sock)
    assert isinstance(reply, protocol.Refuse), reply
    assert f"memfd is {1 << 20} bytes, smaller than the slot ({MEMORY} bytes)" in reply.reason
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "smaller than the slot")
    os.close(small)
    control.close()


def test_pipe_where_the_control_socket_is_expected_is_refused(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    mem = memfd(MEMORY)
    r, w = os.pipe()
    send(sock, msgspec.msgpack.encode(describe()), [mem, w])
    os.close(w)
    reply, fds = receive(sock)
    for fd in fds:
        os.close(fd)
    assert isinstance(reply, protocol.Refuse), "a VM fd went to a source that lied"
    assert "not the listening control socket" in reply.reason
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "not the listening control socket")
    assert closed_by_peer(r)
    os.close(r)
    os.close(mem)


def test_connected_socket_where_the_listening_control_socket_is_expected_is_refused(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    mem = memfd(MEMORY)
    a, b = socket.socketpair()
    send(sock, msgspec.msgpack.encode(describe()), [mem, a.fileno()])
    reply, _ = receive(sock)
    assert isinstance(reply, protocol.Refuse), reply
    assert "not the listening control socket" in reply.reason
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "not the listening control socket")
    for s in (a, b):
        s.close()
    os.close(mem)


def test_describe_of_another_guest_is_refused_naming_each_difference(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    mems = [memfd(MEMORY)]
    control = listening_socket()
    send(sock, msgspec.msgpack.encode(describe(vcpus=4, line_every=7)), [*mems, control.fileno()])
    reply, _ = receive(sock)
    assert isinstance(reply, protocol.Refuse) and reply.code == "incompatible", reply
    assert "vcpus: 1 here, 4 in the running VM" in reply.reason
    assert "line_every: 200 here, 7 in the running VM" in reply.reason
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "guest-visible config must match")
    for fd in mems:
        os.close(fd)
    control.close()


def test_garbage_instead_of_switchover_after_prepared_releases_the_targets_vm(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, conn = greet(target)
    mem = memfd(MEMORY)
    listening = listening_socket()
    send(sock, conn.send(describe()), [mem, listening.fileno()])
    reply, fds = receive(sock)
    assert isinstance(reply, protocol.Prepared) and len(fds) == 1, reply
    assert len(kvmstub_daemon.stats()["vms"]) == 1  # the target built its VM
    os.close(fds[0])  # the escrow: let it go, as a source that gives up does
    send(sock, b"\x92\x01\x02 and then some")
    assert receive(sock)[0] is None
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "malformed message")
    os.close(mem)
    listening.close()


def test_a_source_that_vanishes_after_hello_leaves_the_target_to_exit_cleanly(
    start_target: Callable[..., Target], kvmstub_daemon: Any
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    sock, _ = greet(target)
    sock.close()
    assert_refused_and_gone(target, kvmstub_daemon, fds0, "closed the connection")


# --- random datagrams with random fds --------------------------------------------------------

_fd_kinds = st.sampled_from(["pipe", "memfd", "small-memfd", "socket", "dir"])
_datagrams = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.sampled_from(
        [
            msgspec.msgpack.encode(describe()),
            msgspec.msgpack.encode(protocol.Commit()),
            msgspec.msgpack.encode(protocol.Moved()),
            msgspec.msgpack.encode(protocol.Refuse(code="busy", reason="x")),
        ]
    ),
)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    honest_hello=st.booleans(),
    datagram=_datagrams,
    kinds=st.lists(_fd_kinds, max_size=4),
)
def test_random_datagrams_with_random_fds_never_get_a_vm_fd_and_leave_nothing(
    start_target: Callable[..., Target],
    kvmstub_daemon: Any,
    tmp_path: Path,
    honest_hello: bool,
    datagram: bytes,
    kinds: list[str],
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    if honest_hello:
        sock, _ = greet(target)
    else:
        sock = connect(target)
    made: list[int] = []
    for kind in kinds:
        if kind == "pipe":
            r, w = os.pipe()
            made += [r, w]
        elif kind == "memfd":
            made.append(memfd(MEMORY))
        elif kind == "small-memfd":
            made.append(memfd(4096))
        elif kind == "socket":
            made.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach())
        else:
            made.append(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        send(sock, datagram, made[: len(kinds)])
        reply, fds = receive(sock)
        for fd in fds:
            os.close(fd)
        # Whatever came back, the target never handed over its VM (the escrow) for this.
        assert not isinstance(reply, protocol.Prepared)
        sock.close()
        assert target.proc.wait(20) == 1, target.log()
        assert not target.path.exists()
        deadline = time.monotonic() + 10
        while kvmstub_daemon.stats()["vms"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kvmstub_daemon.stats()["vms"] == []
        assert daemon_fds(kvmstub_daemon, expect=fds0) == fds0
        assert "Traceback" not in target.log(), target.log()
    finally:
        for fd in made:
            os.close(fd)


# --- Switchover's vCPU-state memfd (protocol 3) -----------------------------------------------
#
# A version-3 Switchover may say its vCPU states are in a sealed memfd of `vcpu_states_memfd`
# bytes, sent as its second fd. The target checks that fd (a memfd, sealed, of the declared
# size) and its content (one state per vCPU, of its backend) before it uses any of it. A
# Switchover that fails these checks is unusable: the target refuses (after which the table says
# ABORT for it and RESUME_OR_RECLAIM for the source, which keeps the guest), closes what came
# with it, and exits. One with the wrong number of fds breaks the protocol: EOF, no Refuse.


def prepared(target: Target, **changes: Any) -> tuple[socket.socket, HandoffConnection, list[int]]:
    """An honest handoff as far as the target's `Prepared`, in protocol 3: the connection, the
    source's machine, and the fds the source holds (guest memory, control socket, escrow).
    `changes` to the Describe."""
    sock, conn = greet(target)
    assert conn.version == protocol.VCPU_STATES_VERSION, conn.version
    mem = memfd(MEMORY)
    control = listening_socket()
    send(sock, conn.send(describe(**changes)), [mem, control.fileno()])
    reply, fds = receive(sock)
    assert isinstance(reply, protocol.Prepared) and len(fds) == 1, reply
    conn.receive(msgspec.msgpack.encode(reply), len(fds))
    # The target holds the guest's memfd now: `held_by` sees what it holds.
    assert set(held_by(target.proc.pid, [mem])) == {mem}
    return sock, conn, [mem, control.detach(), fds[0]]


def memfd_switchover(size: int) -> protocol.Switchover:
    """A Switchover whose vCPU states are in a memfd of `size` bytes, for the one-vCPU guest."""
    return protocol.Switchover(
        doorbell_sum=0,
        device_blobs={"doorbell": bytes(4)},  # the one vCPU's doorbell sum: 0
        regs=None,
        vcpu_states_memfd=size,
        paused_at_ns=time.monotonic_ns(),
    )


def kvm_state() -> protocol.VcpuStateWire:
    """A vCPU state as the target's backend (kvmstub: kvm_regs) writes it."""
    state = messages.regs_state(protocol.Regs(rip=0x1000, rflags=0x202))
    return protocol.VcpuStateWire(backend=state.backend, version=state.version, blob=state.blob)


ONE_STATE = protocol.encode_vcpu_states([kvm_state()])  # what an honest source sends
OTHER_BACKEND = protocol.encode_vcpu_states(
    [protocol.VcpuStateWire(backend="linux-kvm", version=7, blob=bytes(512))]
)
NOT_KVM_REGS = protocol.encode_vcpu_states(
    [protocol.VcpuStateWire(backend="kvmstub", version=1, blob=b"\xc1 not kvm_regs")]
)


def states_memfd(data: bytes, seals: int = messages.VCPU_STATES_SEALS) -> int:
    fd = os.memfd_create("fuzz-vcpu-states", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def state_fd(kind: str, tmp_path: Path, content: bytes = ONE_STATE) -> list[int]:
    """An fd of `kind` to send where the vCPU-state memfd is expected (the first of the fds
    returned; the caller closes them all). Memfds and the file hold `content`."""
    if kind == "pipe":
        r, w = os.pipe()
        return [w, r]
    if kind == "socket":
        return [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()]
    if kind == "directory":
        directory = tmp_path / "states.d"
        directory.mkdir(exist_ok=True)
        return [os.open(directory, os.O_RDONLY | os.O_DIRECTORY)]
    if kind == "regular-file":  # not a memfd: it takes no seals (or, on tmpfs, only F_SEAL_SEAL)
        fd = os.open(tmp_path / f"states-{secrets.token_hex(4)}", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, content)
        return [fd]
    if kind == "unsealed":
        return [states_memfd(content, seals=0)]
    if kind == "partly-sealed":  # it could still be written while the target reads it
        return [states_memfd(content, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)]
    assert kind == "sealed", kind
    return [states_memfd(content)]


def held_by(pid: int, fds: Sequence[int]) -> list[int]:
    """Those of our `fds` whose file process `pid` holds (in its /proc/<pid>/fd). A process
    that has exited holds nothing: ask while the target lives."""
    ours: dict[tuple[int, int], int] = {}
    for fd in fds:
        st = os.fstat(fd)
        ours[(st.st_dev, st.st_ino)] = fd
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    held: list[int] = []
    for name in names:
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if (st.st_dev, st.st_ino) in ours:
            held.append(ours[(st.st_dev, st.st_ino)])
    return held


def switch_over(
    target: Target, declared: int, states: Sequence[int]
) -> tuple[protocol.Message | None, HandoffConnection, list[int]]:
    """Take the target to `Prepared`, then send a Switchover declaring a vCPU-state memfd of
    `declared` bytes with `states` as the fds after the source VM's. The target's answer, the
    source's machine (having taken it) and which of `states` the target still held then.

    The source VM's fd is the target's own VM, sent back from escrow: a plain target does not
    use it before it has the vCPU states, and a hostile source has no better one to send."""
    sock, conn, held = prepared(target)
    try:
        send(sock, conn.send(memfd_switchover(declared)), [held[-1], *states])
        reply, fds = receive(sock)
        # At once: the target exits soon after it answers, and then holds nothing at all.
        still = held_by(target.proc.pid, states)
        for fd in fds:
            os.close(fd)
        if reply is not None:
            conn.receive(msgspec.msgpack.encode(reply), len(fds))
        return reply, conn, still
    finally:
        for fd in held:  # the escrow too: the source, its guest back, lets the target's VM go
            os.close(fd)
        sock.close()


NOT_A_MEMFD = "vCPU state fd is not a memfd (not a regular file)"
MALFORMED = "malformed vCPU states in the memfd"


@pytest.mark.parametrize(
    ("kind", "content", "declared", "says"),
    [
        pytest.param("pipe", ONE_STATE, 0, NOT_A_MEMFD, id="pipe"),
        pytest.param("socket", ONE_STATE, 0, NOT_A_MEMFD, id="socket"),
        pytest.param("directory", ONE_STATE, 0, NOT_A_MEMFD, id="directory"),
        pytest.param("unsealed", ONE_STATE, 0, "memfd is not sealed", id="unsealed-memfd"),
        pytest.param(
            "sealed",
            ONE_STATE,
            len(ONE_STATE) + 1,
            f"memfd holds {len(ONE_STATE)} bytes, Switchover said {len(ONE_STATE) + 1}",
            id="another-size",
        ),
        pytest.param("sealed", b"\xc1" * 64, 0, MALFORMED, id="garbage"),
        pytest.param("sealed", ONE_STATE[:-5], 0, MALFORMED, id="truncated-msgpack"),
        pytest.param(
            "sealed",
            protocol.encode_vcpu_states([kvm_state(), kvm_state()]),
            0,
            "memfd holds 2 states for a plain guest of 1 vCPUs",
            id="two-states-for-one-vcpu",
        ),
        pytest.param(
            "sealed",
            OTHER_BACKEND,
            0,
            "vCPU state from backend 'linux-kvm' format 7 cannot be loaded by backend 'kvmstub'",
            id="another-backend",
        ),
        pytest.param(
            "sealed",
            NOT_KVM_REGS,
            0,
            "vCPU state (kvmstub format 1) is malformed",
            id="kvmstub-state-not-kvm-regs",
        ),
    ],
)
def test_unusable_vcpu_state_memfd_is_refused_closed_and_the_target_exits(
    start_target: Callable[..., Target],
    kvmstub_daemon: Any,
    tmp_path: Path,
    kind: str,
    content: bytes,
    declared: int,
    says: str,
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    made = state_fd(kind, tmp_path, content)
    try:
        reply, conn, still = switch_over(target, declared or len(content), made[:1])
        assert isinstance(reply, protocol.Refuse), f"{reply!r}\n{target.log()}"
        assert says in reply.reason, reply.reason
        assert reply.reason.endswith("the source keeps running"), reply.reason
        assert still == [], "the target kept the vCPU-state fd after refusing"
        # The table: the source, refused after its Switchover, keeps the guest (resumes it, or
        # reclaims it from escrow); the target, having refused, aborts.
        assert conn.recovery() is protocol.Recovery.RESUME_OR_RECLAIM
        assert_refused_and_gone(target, kvmstub_daemon, fds0, says)
        assert "Traceback" not in target.log(), target.log()
    finally:
        for fd in made:
            os.close(fd)


@pytest.mark.parametrize("count", [0, 2], ids=["no-second-fd", "three-fds"])
def test_switchover_with_the_wrong_fd_count_for_its_memfd_breaks_the_protocol(
    start_target: Callable[..., Target], kvmstub_daemon: Any, count: int
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    made = [states_memfd(ONE_STATE) for _ in range(count)]
    try:
        reply, conn, still = switch_over(target, len(ONE_STATE), made)
        assert reply is None, reply  # a broken protocol allows no further message: EOF
        assert still == []
        # The source, its Switchover sent, sees EOF: it fences the target and resumes (or
        # reclaims) the guest. The target's machine rejected the Switchover: still PREPARED, ABORT.
        assert conn.recovery() is protocol.Recovery.RESUME_OR_RECLAIM
        says = f"Switchover must carry 2 fds, the datagram carried {count + 1}"
        assert_refused_and_gone(target, kvmstub_daemon, fds0, says)
        assert "Traceback" not in target.log(), target.log()
    finally:
        for fd in made:
            os.close(fd)


_state_fd_kinds = st.sampled_from(
    ["pipe", "socket", "directory", "regular-file", "unsealed", "partly-sealed", "sealed"]
)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(_state_fd_kinds, max_size=3),
    content=st.one_of(
        st.binary(max_size=256),
        st.sampled_from([ONE_STATE[:-1], ONE_STATE + b"\x00", OTHER_BACKEND, NOT_KVM_REGS]),
    ),
    declared=st.one_of(st.none(), st.integers(1, protocol.MAX_VCPU_STATES_BYTES)),
)
def test_random_vcpu_state_fds_never_get_the_guest_moved_and_leave_nothing(
    start_target: Callable[..., Target],
    kvmstub_daemon: Any,
    tmp_path: Path,
    kinds: list[str],
    content: bytes,
    declared: int | None,
) -> None:
    fds0 = daemon_fds(kvmstub_daemon)
    target = start_target()
    made = [state_fd(kind, tmp_path, content) for kind in kinds]
    try:
        sent = [fds[0] for fds in made]
        reply, _, still = switch_over(target, declared or max(1, len(content)), sent)
        if len(kinds) == 1:
            assert isinstance(reply, protocol.Refuse), f"{reply!r}\n{target.log()}"
        else:
            assert reply is None, reply
        assert still == [], "the target kept a vCPU-state fd after failing"
        assert target.proc.wait(20) == 1, target.log()
        assert not target.path.exists()
        deadline = time.monotonic() + 10
        while kvmstub_daemon.stats()["vms"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kvmstub_daemon.stats()["vms"] == []
        assert daemon_fds(kvmstub_daemon, expect=fds0) == fds0
        assert "Traceback" not in target.log(), target.log()
    finally:
        for fds in made:
            for fd in fds:
                os.close(fd)


# --- bad configuration and flags --------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--vcpus", "0"], "--vcpus 0 is out of range: 1 to 256"),
        (["--vcpus", "four"], "--vcpus 'four' is not a whole number"),
        (["--memory", "12Q"], "memory size '12Q' is not a size: use a number with K, M, G or T"),
        (["--memory", "1000"], "memory size '1000' is not a multiple of 4 KiB pages"),
        (["--memory", "128T"], "memory size '128T' is out of range: 4K to at most 64T"),
        (["--mode", "tdx"], "invalid choice: 'tdx' (choose from"),
        (["--policy", "zz"], "policy 'zz' is not hexadecimal"),
        (["--mode", "sev-es", "--policy", "0x1"], "--policy 0x1 lacks the ES bit (0x4)"),
        (["--mode", "sev", "--policy", "0x5"], "has the ES bit (0x4): use --mode sev-es"),
        (["--mode", "plain", "--policy", "0x1"], "a plain guest has no policy"),
        (["--handoff-timeout", "0"], "timeout 0.0 is out of range: 0.05 to 3600 s"),
        (["--incoming", "udp:1.2.3.4:5"], "use unix:PATH"),
        (["--incoming", "tcp:1.2.3.4:5"], "needs --tls-cert, --tls-key and --tls-ca"),
        (["--name", "a/b"], "--name 'a/b': use 1 to 64 letters, digits"),
        (["--allow-uid", "-1"], "--allow-uid -1 is out of range: 0 to 4294967294"),
        (["--line-every", "0"], "--line-every 0 is out of range: 1 to 1000000"),
        (["--blackout-poll-us", "-1"], "--blackout-poll-us -1 is out of range: 0 to 100000"),
        (["--x-fault", "target:lunch:crash"], "fault step 'lunch' for target: use one of"),
        (["--x-fault", "target:moved:melt"], "fault action 'melt': use one of crash, hang"),
        (["--x-fault", "nobody"], "fault 'nobody': use ROLE:STEP:ACTION"),
    ],
)
def test_bad_run_flag_is_refused_naming_the_value_and_what_is_accepted(
    flags: list[str], says: str
) -> None:
    done = subprocess.run(
        [*PROGRAM, "run", "--kvm", "/nonexistent/kvm.sock", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert says in done.stderr, done.stderr


def test_token_file_that_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o644)
    done = subprocess.run(
        [*PROGRAM, "run", "--kvm", "/nonexistent", "--control", str(tmp_path / "c.qmp"),
         "--token-file", str(token)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"--token-file {token}: mode 644 lets others read it; chmod 600 it" in done.stderr


def test_too_short_token_is_refused_saying_how_to_make_one(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("short")
    token.chmod(0o600)
    done = subprocess.run(
        [*PROGRAM, "run", "--kvm", "/nonexistent", "--control", str(tmp_path / "c.qmp"),
         "--token-file", str(token)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "the token must be 16 to 4096 bytes (it has 5)" in done.stderr
    assert "head -c 32 /dev/urandom" in done.stderr


def test_missing_kvmstub_is_refused_naming_the_path_and_the_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PROGRAM, "run", "--kvm", str(tmp_path / "nokvm.sock"),
         "--control", str(tmp_path / "c.qmp")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"cannot open kvmstub at {tmp_path / 'nokvm.sock'}" in done.stderr
    assert "(--kvm PATH)" in done.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["upgrade"], "name the VM (handoff upgrade NAME) or give --control PATH"),
        (["upgrade", "--control", "/nonexistent/x.qmp"], "/nonexistent/x.qmp"),
    ],
)
def test_bad_upgrade_invocation_is_refused_with_what_to_do(
    argv: list[str], says: str, tmp_path: Path
) -> None:
    env = {**os.environ, "HANDOFF_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run([*PROGRAM, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert says in done.stdout + done.stderr, (done.stdout, done.stderr)


def _bad_msr_state() -> bytes:
    """One real x86 vCPU's state as an honest source on this host would send it, but with an
    MSR index the kernel refuses: it passes every check of the target's (the layout, the
    sizes, the CPUID digest), and only KVM_SET_MSRS, in the load, fails."""
    from handoff.hv import linux

    async def read() -> linux.VcpuState:
        hv = linux.open_linux()
        try:
            vm = await hv.create_vm()
            vcpu = await vm.create_vcpu(0)
            state = vcpu.read_state()
            vcpu.close()
            vm.close()
            return state
        finally:
            hv.close()

    import trio

    state = trio.run(read)
    blob = bytearray(state.blob)
    (msrs,) = [a for tag, a, _ in linux._sections_at(state.blob, "x") if tag == linux._Tag.MSRS]
    blob[msrs + 8 : msrs + 12] = (0x4B564DFF).to_bytes(4, "little")  # the first entry's index
    wire = protocol.VcpuStateWire(backend=state.backend, version=state.version, blob=bytes(blob))
    return protocol.encode_vcpu_states([wire])


def test_a_state_the_kernel_refuses_after_moved_gives_the_guest_back_to_the_source(
    tmp_path: Path,
) -> None:
    """The target answers Moved before it loads the vCPU states (the load overlaps Moved and
    Commit on the wire). A load that fails then is refused like any failure of the target's
    before it holds the guest: the source, with Moved or even Commit sent, takes the guest
    back (the table's RESUME_OR_RECLAIM, or RECLAIM), and the target exits cleanly."""
    from handoff.hv.backends import kvm_problem

    if (problem := kvm_problem()) is not None:
        pytest.skip(f"the real KVM cannot run a guest here: {problem}")
    path = tmp_path / "in.sock"
    log_path = tmp_path / "t.log"
    argv = [
        *PROGRAM, "run", "--name", "fz", "--mode", "plain", "--vcpus", "1", "--memory", "8M",
        "--hypervisor", "kvm", "--control", str(tmp_path / "fz.qmp"),
        "--serial-log", str(tmp_path / "serial.log"), "--handoff-timeout", "3",
        "--incoming", f"unix:{path}",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    target = Target(proc, path, log_path)
    try:
        wait_listening(path, proc, 30, "the target", target.log)
        content = _bad_msr_state()
        made = state_fd("sealed", tmp_path, content)
        sock, conn, held = prepared(target, host_flags={messages.HYPERVISOR_FLAG: "kvm"})
        try:
            send(sock, conn.send(memfd_switchover(len(content))), [held[-1], *made])
            moved, fds = receive(sock)
            assert isinstance(moved, protocol.Moved) and fds == [], f"{moved!r}\n{target.log()}"
            conn.receive(msgspec.msgpack.encode(moved), 0)
            # (Had our Commit crossed the refusal, the table would say RECLAIM: the property
            # tests of tests/handoff/test_protocol.py take that race.)
            reply, fds = receive(sock)
            assert isinstance(reply, protocol.Refuse), f"{reply!r}\n{target.log()}"
            assert "KVM_SET_MSRS refused MSR 0x4b564dff" in reply.reason, reply.reason
            conn.receive(msgspec.msgpack.encode(reply), len(fds))
            assert conn.recovery() is protocol.Recovery.RESUME_OR_RECLAIM
        finally:
            for fd in [*held, *made]:
                os.close(fd)
            sock.close()
        assert proc.wait(15) == 1, target.log()
        assert "Traceback" not in target.log(), target.log()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
