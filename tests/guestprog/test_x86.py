"""The x86 witness guest's image: the committed machine code is what witness.S assembles to,
and the launch image lays out parameters, code and page tables as guestprog.x86 documents."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import struct

import pytest

from guestprog import x86

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen", ROOT / "tools" / "gen_x86_witness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("as", "objcopy", "objdump")), reason="no GNU binutils"
)
def test_committed_code_is_what_the_source_assembles_to() -> None:
    gen = _generator()
    code, listing = gen.assemble()
    assert code == x86.CODE
    assert listing == x86.LISTING
    assert (ROOT / "guestprog" / "x86" / "code.py").read_text() == gen.render(code, listing)


def test_listing_starts_at_the_entry_point() -> None:
    first = x86.LISTING.splitlines()[0]
    assert first == f"{x86.CODE_GPA:016x} <entry>:"


PARAMS = x86.Params(vcpus=4, line_every=100, idle_us=2000, tsc_khz=2_000_000)


def test_image_holds_parameters_code_and_identity_page_tables() -> None:
    image = x86.build_image(PARAMS)
    assert len(image) == x86.IMAGE_SIZE
    magic, vcpus, line_every, idle_us, khz, ticks = struct.unpack_from("<8sIIIIQ", image, 0)
    assert (magic, vcpus, line_every, idle_us, khz) == (b"WITNESS1", 4, 100, 2000, 2_000_000)
    assert ticks == 4_000_000  # 2 ms at 2 GHz
    assert image[x86.CODE_GPA : x86.CODE_GPA + len(x86.CODE)] == x86.CODE
    pml4, pdpt = (struct.unpack_from("<Q", image, a)[0] for a in (0x2000, 0x3000))
    assert pml4 == 0x3000 | 0x7 and pdpt == 0x4000 | 0x7
    for i in (0, 1, 511):
        pde = struct.unpack_from("<Q", image, 0x4000 + 8 * i)[0]
        assert pde == (i << 21) | 0x87  # present, writable, user, 2 MiB


def test_every_vcpu_page_is_inside_required_memory_and_mapped() -> None:
    for vcpus in (1, 4, 256):
        end = x86.journal_gpa(vcpus - 1) + x86.PAGE_SIZE
        assert end == x86.required_memory(vcpus)
        assert end <= x86.MAPPED
    assert x86.required_memory(1) > x86.IMAGE_SIZE


def test_entry_state_is_cpl3_long_mode_with_iopl3() -> None:
    sys = x86.system_registers()
    assert sys.cs.dpl == 3 and sys.cs.l == 1 and sys.cs.selector & 3 == 3
    assert all(s.dpl == 3 and s.selector & 3 == 3 for s in (sys.ds, sys.ss))
    assert sys.efer & x86.EFER_LMA and sys.cr0 & x86.CR0_PG and sys.cr4 & x86.CR4_PAE
    regs = x86.entry_registers(2)
    assert regs["rflags"] >> 12 & 3 == 3
    assert regs["rip"] == x86.CODE_GPA
    assert regs["r15"] == 2 and regs["r14"] == x86.percpu_gpa(2)
    assert x86.percpu_gpa(2) < regs["rsp"] <= x86.journal_gpa(2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vcpus": 0},
        {"vcpus": x86.MAX_VCPUS + 1},
        {"line_every": 0},
        {"idle_us": -1},
        {"tsc_khz": 0},
        {"tsc_khz": 1 << 32},
    ],
)
def test_parameters_out_of_range_are_refused(kwargs: dict[str, int]) -> None:
    args = {"vcpus": 1, "line_every": 1, "idle_us": 0, "tsc_khz": 1_000_000} | kwargs
    with pytest.raises(ValueError):
        x86.Params(**args)
